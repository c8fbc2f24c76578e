//! Making untrusted kernel strings safe to print.
//!
//! Module names, parameters and paths come from whoever called the syscall. They may be
//! non-UTF-8 or carry control characters and terminal escape sequences. [`escape_bytes`] turns
//! them into text that is valid UTF-8, has no control or invisible formatting characters, and
//! loses nothing: every byte can be read back from the escaped form.

/// Escapes `bytes`: printable UTF-8 is kept, `\` becomes `\\`, other bytes become `\xNN`, and
/// non-printing Unicode (bidi overrides, zero-width characters) becomes `\u{NNNN}`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            push_char(&mut out, c);
        }
        for b in chunk.invalid() {
            push_hex(&mut out, *b);
        }
    }
    out
}

fn push_hex(out: &mut String, b: u8) {
    use std::fmt::Write as _;
    let _ = write!(out, "\\x{b:02x}");
}

fn push_char(out: &mut String, c: char) {
    use std::fmt::Write as _;
    match c {
        '\\' => out.push_str("\\\\"),
        c if (c as u32) < 0x80 => {
            if c.is_ascii_graphic() || c == ' ' {
                out.push(c);
            } else {
                push_hex(out, c as u8);
            }
        }
        c if is_invisible(c) => {
            let _ = write!(out, "\\u{{{:04x}}}", c as u32);
        }
        c => out.push(c),
    }
}

/// Characters that render as nothing or reorder text: C1 controls, bidi controls, zero-width
/// and other format characters, line/paragraph separators.
fn is_invisible(c: char) -> bool {
    matches!(c as u32,
        0x80..=0x9f
        | 0xad
        | 0x200b..=0x200f
        | 0x2028..=0x202e
        | 0x2060..=0x2069
        | 0xfeff
        | 0xfff9..=0xfffb)
}

/// A Prometheus label value from an untrusted string (a file, a container's name): made safe
/// to show by [`escape_bytes`] (no control characters, every byte recoverable), then `\` and
/// `"` escaped as the text exposition format requires (a newline cannot remain).
pub fn prometheus_label(value: &str) -> String {
    let safe = escape_bytes(value.as_bytes());
    let mut out = String::with_capacity(safe.len() + 2);
    for c in safe.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

/// Takes bytes up to the first NUL of a fixed kernel buffer.
pub fn until_nul(buf: &[u8]) -> &[u8] {
    match buf.iter().position(|&b| b == 0) {
        Some(n) => &buf[..n],
        None => buf,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ascii_is_kept() {
        assert_eq!(escape_bytes(b"ip_vs_wrr"), "ip_vs_wrr");
        assert_eq!(escape_bytes(b"a=1 b=two"), "a=1 b=two");
    }

    #[test]
    fn control_and_escape_sequences_are_escaped() {
        assert_eq!(escape_bytes(b"\x1b[31mred\x1b[0m"), "\\x1b[31mred\\x1b[0m");
        assert_eq!(escape_bytes(b"a\nb\tc\r"), "a\\x0ab\\x09c\\x0d");
        assert_eq!(escape_bytes(b"\x7f"), "\\x7f");
    }

    #[test]
    fn invalid_utf8_is_hex_and_backslash_is_doubled() {
        assert_eq!(escape_bytes(b"\xff\xfeok"), "\\xff\\xfeok");
        assert_eq!(escape_bytes(b"a\\xff"), "a\\\\xff");
    }

    #[test]
    fn valid_unicode_kept_but_invisible_escaped() {
        assert_eq!(escape_bytes("mödule".as_bytes()), "mödule");
        assert_eq!(
            escape_bytes("evil\u{202e}txt".as_bytes()),
            "evil\\u{202e}txt"
        );
        assert_eq!(escape_bytes("a\u{200b}b".as_bytes()), "a\\u{200b}b");
        assert_eq!(escape_bytes("\u{85}".as_bytes()), "\\u{0085}");
    }

    #[test]
    fn output_has_no_control_characters() {
        let all: Vec<u8> = (0..=255u8).collect();
        let s = escape_bytes(&all);
        assert!(!s.chars().any(|c| c.is_control()));
    }

    #[test]
    fn prometheus_labels() {
        assert_eq!(prometheus_label("ip_vs"), "ip_vs");
        assert_eq!(prometheus_label("a\"b"), "a\\\"b");
        // The escaped backslash of escape_bytes is escaped again: the scraped value reads
        // back as escape_bytes' output.
        assert_eq!(prometheus_label("x\ny"), "x\\\\x0ay");
        assert_eq!(prometheus_label("\\"), "\\\\\\\\");
        assert!(!prometheus_label("\u{202e}\x1b").contains(['\n', '\u{202e}', '\x1b']));
    }

    #[test]
    fn until_nul_stops_at_first_nul() {
        assert_eq!(until_nul(b"abc\0def"), b"abc");
        assert_eq!(until_nul(b"abc"), b"abc");
        assert_eq!(until_nul(b"\0"), b"");
    }
}
