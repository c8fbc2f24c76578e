//! Making untrusted strings safe to print, in two steps.
//!
//! Module names, parameters and paths come from whoever called the syscall; cgroup names from
//! whoever may create a cgroup; container names from runtime state. They may be non-UTF-8 or
//! carry control characters, terminal escape sequences and bidi overrides.
//!
//! 1. **Where a string enters kmodmon**, [`escape_bytes`] (or [`escape_str`]) turns it into text
//!    that is valid UTF-8, has no control or invisible character, and loses nothing: every byte
//!    can be read back from the escaped form (`\\` is a backslash, `\xNN` a byte,
//!    `\u{NNNN}` a character).
//! 2. **At every sink** (human lines, JSON lines, the audit log, CSV, syslog, Prometheus labels),
//!    [`sanitize`] (for one string) or [`sanitize_event`] (for a whole event) runs once more.
//!    It changes nothing in text that step 1 produced, and escapes (in the same notation) any
//!    control, bidi or invisible character that reached a sink another way. It is idempotent;
//!    it does not double backslashes, so it is a guard, not a reversible encoding.
//!
//! Which characters are escaped: [`is_unsafe`].
use std::borrow::Cow;
use std::fmt::Write as _;

use crate::event::Event;

#[cfg(test)]
mod props;

/// Escapes `bytes`: printable UTF-8 is kept, `\` becomes `\\`, other bytes become `\xNN`, and
/// non-printing Unicode (bidi controls, zero-width and other invisible characters) becomes
/// `\u{NNNN}`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    // The usual case, checked a byte at a time: printable ASCII without a backslash.
    if bytes
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'\\')
    {
        return bytes.iter().map(|&b| b as char).collect();
    }
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

/// [`escape_bytes`] for a string that is already UTF-8 (a cgroup or container name).
pub fn escape_str(s: &str) -> String {
    escape_bytes(s.as_bytes())
}

fn push_hex(out: &mut String, b: u8) {
    let _ = write!(out, "\\x{b:02x}");
}

fn push_unsafe(out: &mut String, c: char) {
    if (c as u32) < 0x80 {
        push_hex(out, c as u8);
    } else {
        let _ = write!(out, "\\u{{{:04x}}}", c as u32);
    }
}

fn push_char(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        c if is_unsafe(c) => push_unsafe(out, c),
        c => out.push(c),
    }
}

/// Characters no sink may print as they are: ASCII controls (C0 and DEL), and [`is_invisible`].
pub fn is_unsafe(c: char) -> bool {
    c.is_ascii_control() || is_invisible(c)
}

/// Characters that render as nothing, reorder text or control a terminal: C1 controls, every
/// format character (Unicode category Cf: bidi embeddings, overrides and isolates, the Arabic
/// letter mark, zero-width characters, the tag characters), the line and paragraph separators,
/// and the other default-ignorable code points (Hangul and Khmer fillers, variation selectors,
/// the combining grapheme joiner, the Mongolian vowel separator and free variation selectors).
pub fn is_invisible(c: char) -> bool {
    matches!(c as u32,
        0x80..=0x9f             // C1 controls (CSI 0x9b starts a terminal escape sequence)
        | 0xad                  // soft hyphen
        | 0x34f                 // combining grapheme joiner
        | 0x600..=0x605         // Arabic number signs (Cf)
        | 0x61c                 // Arabic letter mark (bidi)
        | 0x6dd | 0x70f | 0x890..=0x891 | 0x8e2 // more Cf
        | 0x115f..=0x1160       // Hangul choseong/jungseong fillers
        | 0x17b4..=0x17b5       // Khmer inherent vowels (invisible)
        | 0x180b..=0x180f       // Mongolian free variation selectors, vowel separator
        | 0x200b..=0x200f       // zero width space/non-joiner/joiner, LRM, RLM
        | 0x2028..=0x202e       // line/paragraph separators, LRE RLE PDF LRO RLO
        | 0x2060..=0x206f       // word joiner, invisible operators, LRI RLI FSI PDI, deprecated
        | 0x3164                // Hangul filler
        | 0xfe00..=0xfe0f       // variation selectors
        | 0xfeff                // zero width no-break space (BOM)
        | 0xffa0                // halfwidth Hangul filler
        | 0xfff0..=0xfffb       // reserved default-ignorables, interlinear annotation
        | 0x110bd | 0x110cd     // Kaithi number signs (Cf)
        | 0x13430..=0x1343f     // Egyptian hieroglyph format controls
        | 0x1bca0..=0x1bca3     // shorthand format controls
        | 0x1d173..=0x1d17a     // musical symbol format controls
        | 0xe0000..=0xe0fff) // tag characters (E0000-E007F), variation selectors supplement
}

/// The sink-side guard: escapes every [`is_unsafe`] character of `s` as [`escape_bytes`] would,
/// and leaves everything else (backslashes included) as it is. Borrowed when nothing changes,
/// which is always the case for text [`escape_bytes`] produced.
pub fn sanitize(s: &str) -> Cow<'_, str> {
    // The usual case, checked a byte at a time: printable ASCII.
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Cow::Borrowed(s);
    }
    let Some(first) = s.find(is_unsafe) else {
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len() + 8);
    out.push_str(&s[..first]);
    for c in s[first..].chars() {
        if is_unsafe(c) {
            push_unsafe(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn sanitize_in_place(s: &mut String) {
    if let Cow::Owned(o) = sanitize(s) {
        *s = o;
    }
}

/// Every string of an event, for reading.
fn event_strs(ev: &Event) -> impl Iterator<Item = &str> {
    let c = ev
        .container
        .iter()
        .chain(ev.requested_by.iter().filter_map(|r| r.container.as_ref()));
    let container = c.flat_map(|c| {
        [Some(&c.id), Some(&c.runtime)]
            .into_iter()
            .chain([
                c.name.as_ref(),
                c.pod_uid.as_ref(),
                c.pod_name.as_ref(),
                c.pod_namespace.as_ref(),
                c.qos_class.as_ref(),
            ])
            .flatten()
    });
    let req = ev.requested_by.iter().flat_map(|r| [&r.requested, &r.comm]);
    [
        Some(&ev.time),
        Some(&ev.comm),
        ev.module.as_ref(),
        ev.path.as_ref(),
        ev.params.as_ref(),
        ev.taint_flags.as_ref(),
        ev.errno.as_ref(),
        ev.cgroup_path.as_ref(),
        ev.detail.as_ref(),
        ev.loaded_at.as_ref(),
        ev.severity.as_ref(),
    ]
    .into_iter()
    .flatten()
    .chain(container)
    .chain(req)
    .chain(ev.modules.iter())
    .chain(ev.truncated.iter())
    .chain(ev.missing.iter())
    .map(String::as_str)
    .chain(ev.identity.iter().flat_map(|i| i.strings()))
}

/// Every string of an event, for changing.
fn event_strings_mut(ev: &mut Event, f: &mut dyn FnMut(&mut String)) {
    f(&mut ev.time);
    f(&mut ev.comm);
    for s in [
        &mut ev.module,
        &mut ev.path,
        &mut ev.params,
        &mut ev.taint_flags,
        &mut ev.errno,
        &mut ev.cgroup_path,
        &mut ev.detail,
        &mut ev.loaded_at,
        &mut ev.severity,
    ]
    .into_iter()
    .flatten()
    {
        f(s);
    }
    let mut container = |c: &mut crate::event::Container| {
        f(&mut c.id);
        f(&mut c.runtime);
        for s in [
            &mut c.name,
            &mut c.pod_uid,
            &mut c.pod_name,
            &mut c.pod_namespace,
            &mut c.qos_class,
        ]
        .into_iter()
        .flatten()
        {
            f(s);
        }
    };
    if let Some(c) = ev.container.as_mut() {
        container(c);
    }
    if let Some(r) = ev.requested_by.as_mut() {
        if let Some(c) = r.container.as_mut() {
            container(c);
        }
        f(&mut r.requested);
        f(&mut r.comm);
    }
    for s in ev
        .modules
        .iter_mut()
        .chain(ev.truncated.iter_mut())
        .chain(ev.missing.iter_mut())
    {
        f(s);
    }
    if let Some(i) = ev.identity.as_mut() {
        i.strings_mut(f);
    }
}

/// [`sanitize`] applied to every string of an event (names, paths, parameters, cgroup path,
/// container and pod fields, detail...). Borrowed when nothing needs escaping (the usual case:
/// decoding escaped everything from the kernel already).
pub fn sanitize_event(ev: &Event) -> Cow<'_, Event> {
    if !event_strs(ev)
        .any(|s| !s.bytes().all(|b| (0x20..0x7f).contains(&b)) && s.contains(is_unsafe))
    {
        return Cow::Borrowed(ev);
    }
    let mut owned = ev.clone();
    event_strings_mut(&mut owned, &mut sanitize_in_place);
    Cow::Owned(owned)
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
    fn bidi_tags_fillers_and_variation_selectors_are_escaped() {
        for c in [
            '\u{61c}',
            '\u{e0001}',
            '\u{e0041}',
            '\u{e007f}',
            '\u{200b}',
            '\u{200f}',
            '\u{202a}',
            '\u{202e}',
            '\u{2066}',
            '\u{2069}',
            '\u{feff}',
            '\u{180e}',
            '\u{115f}',
            '\u{1160}',
            '\u{3164}',
            '\u{ffa0}',
            '\u{fe0f}',
            '\u{e0100}',
            '\u{2028}',
            '\u{9b}',
        ] {
            let s = format!("a{c}b");
            let e = escape_bytes(s.as_bytes());
            assert_eq!(e, format!("a\\u{{{:04x}}}b", c as u32), "{:x}", c as u32);
            assert_eq!(sanitize(&s), e);
        }
        // Visible text stays: letters of other scripts, emoji, ideographic space.
        for s in ["日本語", "ﬁ", "😀", "a\u{3000}b", "Ωmega"] {
            assert_eq!(escape_bytes(s.as_bytes()), s);
        }
    }

    #[test]
    fn sanitize_is_idempotent_and_changes_nothing_escaped() {
        let hostile = "\x1b[2J\u{202e}evil\\x41\n\u{e0041}";
        let once = sanitize(hostile).into_owned();
        assert_eq!(sanitize(&once), once.as_str());
        assert!(!once.contains(is_unsafe));
        let escaped = escape_bytes(hostile.as_bytes());
        assert!(matches!(sanitize(&escaped), Cow::Borrowed(_)));
        assert_eq!(sanitize("plain"), "plain");
        assert_eq!(once, "\\x1b[2J\\u{202e}evil\\x41\\x0a\\u{e0041}");
    }

    #[test]
    fn sanitize_event_reaches_every_string_field() {
        use crate::event::{Clock, Event, Kind};
        // Every field of the JSON schema that holds a string, filled; kind/source/syscall are
        // enums and stay valid.
        let full = serde_json::json!({
            "time": "t", "ktime_ns": 1, "kind": "load_attempt", "source": "fexit",
            "module": "m", "syscall": "finit_module", "path": "p", "params": "a=1",
            "flags": 0, "len": 1, "fd": 3, "taints": 0, "taint_flags": "OE", "wait": true,
            "result": -38, "errno": "ENOSYS", "duration_ns": 5, "pid": 1, "tid": 1, "ppid": 1,
            "uid": 0, "gid": 0, "comm": "c", "cgroup_id": 1, "cgroup_path": "/x",
            "container": {"id": "i", "runtime": "r", "name": "n", "pod_uid": "u",
                          "pod_name": "pn", "pod_namespace": "ns", "qos_class": "q"},
            "verdict": "unexpected",
            "requested_by": {"requested": "rq", "pid": 2, "comm": "rc", "cgroup_id": 2,
                             "container": {"id": "i2", "runtime": "r2", "name": "n2"}},
            "modules": ["a", "b"], "truncated": ["module"], "missing": ["ppid"], "detail": "d"
        });
        fn poison(v: &mut serde_json::Value, key: &str) {
            match v {
                serde_json::Value::String(s)
                    if !matches!(key, "kind" | "source" | "syscall" | "verdict") =>
                {
                    s.push_str("\u{202e}\x1b")
                }
                serde_json::Value::Object(m) => m.iter_mut().for_each(|(k, v)| poison(v, k)),
                serde_json::Value::Array(a) => a.iter_mut().for_each(|v| poison(v, key)),
                _ => {}
            }
        }
        let mut hostile = full.clone();
        poison(&mut hostile, "");
        let ev: Event = serde_json::from_value(hostile.clone()).unwrap();
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            hostile,
            "every field of the literal is a field of Event"
        );
        let clean = sanitize_event(&ev);
        assert!(matches!(clean, Cow::Owned(_)));
        let text = serde_json::to_string(&*clean).unwrap();
        assert!(
            !text.contains('\u{202e}') && !text.contains('\x1b'),
            "{text}"
        );
        assert_eq!(
            event_strs(&clean)
                .filter(|s| s.contains("\\u{202e}"))
                .count(),
            25
        );
        let plain = Event::synthetic(Kind::Load, &Clock::new());
        assert!(matches!(sanitize_event(&plain), Cow::Borrowed(_)));
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
