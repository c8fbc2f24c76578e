//! Aligned, human-readable lines. Every field passes the sink guard
//! ([`crate::escape::sanitize_event`]), and `"` is written `\x22`, so the only quotes of a
//! line are the two around `params`; colour is added only when asked to.
use std::fmt::Write as _;

use crate::event::{Event, Kind};

pub const HEADER: [&str; 6] = ["TIME", "KIND", "MODULE", "RESULT", "PID/COMM", "CONTAINER"];
const WIDTHS: [usize; 5] = [12, 14, 24, 14, 24];

#[derive(Clone, Copy, Debug)]
pub struct Style {
    pub color: bool,
}

/// Output colouring (`--color`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ColorChoice {
    /// Colour when stdout is a terminal and NO_COLOR is unset.
    #[default]
    Auto,
    Always,
    Never,
}

/// Whether to colour: `--color always|never`, else only on a terminal and never with NO_COLOR.
pub fn want_color(choice: ColorChoice, is_tty: bool) -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => is_tty && !no_color,
    }
}

pub fn header() -> String {
    let mut s = String::new();
    for (i, h) in HEADER.iter().enumerate() {
        match WIDTHS.get(i) {
            Some(w) => {
                let _ = write!(s, "{h:<w$} ");
            }
            None => s.push_str(h),
        }
    }
    s.trim_end().to_string()
}

fn time_of_day(rfc3339: &str) -> &str {
    // 2026-11-22T13:25:55.123456789Z → 13:25:55.123
    rfc3339
        .split_once('T')
        .map(|(_, t)| t.get(..12).unwrap_or(t))
        .unwrap_or(rfc3339)
}

fn result_text(ev: &Event) -> String {
    let text = plain_result_text(ev);
    match ev.blocked_by {
        // `EPERM/seccomp`: the filter answered, the syscall never ran.
        Some(by) => format!("{text}/{}", by.as_str()),
        None => text,
    }
}

fn plain_result_text(ev: &Event) -> String {
    if let Some(signal) = &ev.signal {
        return signal.clone();
    }
    match (ev.kind, ev.result, &ev.errno) {
        (_, Some(_), Some(errno)) => errno.clone(),
        (_, Some(0), None) => "ok".into(),
        (_, Some(r), None) => r.to_string(),
        (Kind::Request, None, _) => match ev.wait {
            Some(true) => "wait".into(),
            _ => "nowait".into(),
        },
        (Kind::Load, None, _) => match ev.taint_flags.as_deref() {
            Some(t) if !t.is_empty() => format!("taint:{t}"),
            _ => "-".into(),
        },
        _ => "-".into(),
    }
}

fn module_text(ev: &Event) -> String {
    let mut m = match (&ev.module, &ev.path) {
        (Some(m), _) => m.clone(),
        (None, Some(p)) => p.clone(),
        (None, None) if !ev.modules.is_empty() => ev.modules.join(","),
        (None, None) => "?".into(),
    };
    // Keep the column readable: very long names (only ever hostile or aliases) are cut here
    // too, and marked; --json carries the whole value.
    let cut = m.chars().count() > MODULE_DISPLAY_MAX;
    if cut {
        m = m.chars().take(MODULE_DISPLAY_MAX - 1).collect();
    }
    if cut || ev.truncated.iter().any(|t| t == "module" || t == "path") {
        m.push('…');
    }
    m
}

/// Longest module text shown in the MODULE column.
const MODULE_DISPLAY_MAX: usize = 48;

fn container_text(ev: &Event) -> String {
    let mut s = String::new();
    let name = |c: &crate::event::Container| {
        let short = c.id.get(..12).unwrap_or(&c.id);
        match (&c.pod_namespace, &c.pod_name, &c.name) {
            (Some(ns), Some(pod), _) => format!("{}:{short} ({ns}/{pod})", c.runtime),
            (_, _, Some(name)) => format!("{}:{short} ({name})", c.runtime),
            _ => format!("{}:{short}", c.runtime),
        }
    };
    let mut text = match (&ev.container, &ev.on_behalf_of) {
        (Some(c), _) => name(c),
        // A hook's (or runtime helper's) event: the host's process, for a container.
        (None, Some(b)) => format!(
            "host for {} via {} {}[{}]",
            name(&b.container),
            b.program,
            b.command,
            b.pid
        ),
        (None, None) => "host".to_string(),
    };
    if let Some(v) = &ev.verdict {
        let _ = write!(text, " [{v}]");
    }
    if let Some(r) = &ev.requested_by {
        let _ = write!(
            text,
            " requested by {}[{}] as {}",
            r.comm, r.pid, r.requested
        );
    }
    s.push_str(&unquote(&text));
    if let Some(p) = ev.params.as_deref().filter(|p| !p.trim().is_empty()) {
        let _ = write!(s, " params=\"{}\"", unquote(p));
    }
    let mut rest = String::new();
    if let (Some(n), Some(first)) = (ev.repeat, &ev.first_time) {
        let _ = write!(
            rest,
            " repeated {n} more time{} since {}",
            if n == 1 { "" } else { "s" },
            time_of_day(first)
        );
    }
    if !ev.modules.is_empty() {
        let _ = write!(rest, " modules={}", ev.modules.join(","));
    }
    if let Some(d) = &ev.detail {
        let _ = write!(rest, " {d}");
    }
    s.push_str(&unquote(&rest));
    s
}

fn paint(text: &str, code: &str, style: Style) -> String {
    if style.color {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

fn kind_color(ev: &Event) -> &'static str {
    match ev.kind {
        _ if ev.result.is_some_and(|r| r < 0) => "31",
        Kind::Load | Kind::SelfLoad => "32",
        Kind::Unload => "33",
        Kind::Request => "36",
        Kind::Denied
        | Kind::WouldDeny
        | Kind::Expectation
        | Kind::HiddenModule
        | Kind::UnseenLoad
        | Kind::IdentityMismatch
        | Kind::Tamper
        | Kind::Lost => "1;31",
        Kind::LoadAttempt | Kind::UnloadAttempt => "0",
    }
}

/// `"` as `\x22` (the notation of [`crate::escape`]), so that the only quotes of a line are
/// the two around `params`.
fn unquote(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('"') {
        std::borrow::Cow::Owned(s.replace('"', "\\x22"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// One line for an event.
pub fn line(ev: &Event, style: Style) -> String {
    let ev = &*crate::escape::sanitize_event(ev);
    let cols = [
        time_of_day(&ev.time).to_string(),
        ev.kind.as_str().to_string(),
        unquote(&module_text(ev)).into_owned(),
        unquote(&result_text(ev)).into_owned(),
        format!("{}/{}", ev.pid, unquote(&ev.comm)),
    ];
    let mut s = String::new();
    for (i, c) in cols.iter().enumerate() {
        let w = WIDTHS[i];
        let padded = format!("{c:<w$}");
        let painted = match i {
            1 => paint(&padded, kind_color(ev), style),
            3 if ev.result.is_some_and(|r| r < 0) => paint(&padded, "31", style),
            _ => padded,
        };
        s.push_str(&painted);
        s.push(' ');
    }
    s.push_str(&container_text(ev));
    // Identity, short: the first 16 hex digits of the image's hash, and its signer.
    if let Some(id) = &ev.identity {
        if let Some(h) = &id.sha256 {
            s.push_str(&format!(" sha256:{}", &h[..h.len().min(16)]));
        }
        match (
            id.sig_ok,
            id.signature.as_ref().and_then(|g| g.signer.as_deref()),
        ) {
            (Some(true), Some(signer)) => s.push_str(&format!(" signed:{}", unquote(signer))),
            (Some(false), _) => s.push_str(" unsigned/unverified"),
            _ => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Clock, Container, Verdict};

    fn attempt() -> Event {
        let mut e = Event::synthetic(Kind::LoadAttempt, &Clock::new());
        e.time = "2026-11-22T13:25:55.123456789Z".into();
        e.module = Some("ip_vs".into());
        e.result = Some(-38);
        e.errno = Some("ENOSYS".into());
        e.pid = 4242;
        e.comm = "insmod".into();
        e
    }

    #[test]
    fn seccomp_refusals_say_so_in_the_result_column() {
        let mut e = attempt();
        e.result = Some(-1);
        e.errno = Some("EPERM".into());
        e.blocked_by = Some(crate::event::BlockedBy::Seccomp);
        assert!(line(&e, Style { color: false }).contains(" EPERM/seccomp "));
        e.result = None;
        e.errno = None;
        e.signal = Some("SIGSYS".into());
        assert!(line(&e, Style { color: false }).contains(" SIGSYS/seccomp "));
    }

    #[test]
    fn columns_are_aligned_and_plain_without_color() {
        let l = line(&attempt(), Style { color: false });
        assert!(l.starts_with("13:25:55.123 load_attempt   ip_vs"), "{l}");
        assert!(l.contains("ENOSYS"));
        assert!(l.contains("4242/insmod"));
        assert!(l.ends_with("host"));
        assert!(!l.contains('\x1b'));
        let h = header();
        assert_eq!(h.find("KIND"), l.find("load_attempt"));
        assert_eq!(h.find("CONTAINER"), l.find("host"));
    }

    #[test]
    fn long_names_are_cut_and_params_shown() {
        let mut e = attempt();
        e.module = Some("m".repeat(100));
        e.params = Some("a=1".into());
        let l = line(&e, Style { color: false });
        assert!(l.contains(&format!("{}…", "m".repeat(47))), "{l}");
        assert!(!l.contains(&"m".repeat(48)));
        assert!(l.ends_with("host params=\"a=1\""), "{l}");
    }

    #[test]
    fn a_repeat_summary_says_how_many_and_since_when() {
        let mut e = attempt();
        e.repeat = Some(49_999);
        e.first_time = Some("2026-11-22T13:25:54.000000001Z".into());
        e.last_time = Some(e.time.clone());
        let l = line(&e, Style { color: false });
        assert!(
            l.ends_with("host repeated 49999 more times since 13:25:54.000"),
            "{l}"
        );
    }

    #[test]
    fn color_only_when_asked() {
        let l = line(&attempt(), Style { color: true });
        assert!(l.contains("\x1b[31m"));
        assert!(want_color(ColorChoice::Always, false));
        assert!(!want_color(ColorChoice::Never, true));
        assert!(!want_color(ColorChoice::Auto, false));
    }

    #[test]
    fn container_and_truncation_marks() {
        let mut e = attempt();
        e.truncated = vec!["module".into()];
        e.container = Some(Container {
            id: "0123456789abcdef".repeat(4),
            runtime: "docker".into(),
            ..Default::default()
        });
        e.verdict = Some(Verdict::Unexpected);
        let l = line(&e, Style { color: false });
        assert!(l.contains("ip_vs…"));
        assert!(l.contains("docker:0123456789ab [unexpected]"));
        // A hook's load: the host's process, for the container its runtime works on.
        e.on_behalf_of = e
            .container
            .take()
            .map(|container| crate::event::OnBehalfOf {
                container,
                program: "runc".into(),
                command: "create".into(),
                pid: 77,
                ..Default::default()
            });
        e.verdict = Some(Verdict::Expected);
        let l = line(&e, Style { color: false });
        assert!(
            l.contains("host for docker:0123456789ab via runc create[77] [expected]"),
            "{l}"
        );
    }

    #[test]
    fn hostile_fields_are_escaped_and_quotes_cannot_end_params() {
        let mut e = attempt();
        e.module = Some("\u{202e}evil\x1b[2J".into());
        e.params = Some("a\" fake=\"b".into());
        e.detail = Some("x\"y\u{61c}".into());
        e.comm = "c\"\u{e0041}".into();
        let l = line(&e, Style { color: false });
        assert!(!l.contains(crate::escape::is_unsafe), "{l}");
        assert!(l.contains("\\u{202e}evil\\x1b[2J"), "{l}");
        assert!(l.contains(" params=\"a\\x22 fake=\\x22b\""), "{l}");
        assert!(l.contains("c\\x22\\u{e0041}"), "{l}");
        assert!(l.contains("x\\x22y\\u{061c}"), "{l}");
        assert_eq!(
            l.matches('"').count(),
            2,
            "only the quotes around params: {l}"
        );
    }
}
