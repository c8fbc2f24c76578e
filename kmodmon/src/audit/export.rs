//! `kmodmon export`: streams events out of the log in order, across rotated and compressed
//! segments, with constant memory, as JSON lines or CSV.
use std::borrow::Cow;
use std::io::{self, Write};
use std::path::Path;

use clap::ValueEnum;

use super::record;
use super::segment;
use super::{AuditError, io_err};
use crate::event::Event;
pub use crate::filter::Filter;

/// Output format.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    /// The records as stored: one JSON object per line (the event schema plus seq and hash).
    #[default]
    Jsonl,
    /// A header row, then one row per event (RFC 4180 quoting; cells that a spreadsheet would
    /// take for a formula get a leading `'`).
    Csv,
}

/// What an export read and wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    pub segments: u64,
    pub records: u64,
    pub written: u64,
    /// Incomplete last lines (a log being written, or a crash not yet recovered).
    pub torn: u64,
    /// Lines that are not records or not events (`log verify` says more).
    pub malformed: u64,
}

/// CSV columns, in order.
pub const CSV_HEADER: [&str; 30] = [
    "seq",
    "time",
    "kind",
    "verdict",
    "module",
    "modules",
    "source",
    "syscall",
    "result",
    "errno",
    "pid",
    "tid",
    "ppid",
    "uid",
    "gid",
    "comm",
    "cgroup_id",
    "cgroup_path",
    "container_id",
    "container_name",
    "container_runtime",
    "pod_namespace",
    "pod_name",
    "path",
    "params",
    "taint_flags",
    "requested_by",
    "truncated",
    "detail",
    "hash",
];

/// The JSON name of a unit enum value ("raw_syscalls").
fn json_str(v: &impl serde::Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Characters that make a spreadsheet (Excel, LibreOffice Calc, Google Sheets) read a cell as
/// a formula when they lead it: OWASP's CSV-injection list (`=` `+` `-` `@`, tab, carriage
/// return), line feed and NUL (OWASP ASVS 1.2.10), and the fullwidth forms `＝` `＋` `－` `＠`,
/// which some spreadsheets in East Asian locales also evaluate.
pub const FORMULA_TRIGGERS: [char; 12] = [
    '=', '+', '-', '@', '\t', '\r', '\n', '\0', '\u{ff1d}', '\u{ff0b}', '\u{ff0d}', '\u{ff20}',
];

/// A plain decimal number: an optional `-`, digits, optionally `.` and digits. Such a cell is
/// a number to every spreadsheet (`-38`, a failed syscall's result), never a formula.
fn is_number(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    all_digits(int) && frac.is_none_or(all_digits)
}

/// Makes one cell of a tabular export safe to open in a spreadsheet, reversibly, following
/// OWASP's CSV-injection guidance: a cell that begins with a [`FORMULA_TRIGGERS`] character
/// gets a `'` in front, which spreadsheets take as "this is text" and
/// do not show. So that this can be undone, a cell that already begins with `'` gets one more.
/// Numbers (`-38`) are left as they are.
///
/// To get the original value back: if the cell begins with `'`, remove that one `'`.
pub fn neutralize_cell(cell: &str) -> Cow<'_, str> {
    let risky = cell.starts_with(FORMULA_TRIGGERS) || cell.starts_with('\'');
    if risky && !is_number(cell) {
        Cow::Owned(format!("'{cell}"))
    } else {
        Cow::Borrowed(cell)
    }
}

/// The inverse of [`neutralize_cell`].
pub fn restore_cell(cell: &str) -> &str {
    cell.strip_prefix('\'').unwrap_or(cell)
}

pub(crate) fn csv_row(seq: u64, hash: &str, ev: &Event) -> Vec<String> {
    let ev = &*crate::escape::sanitize_event(ev);
    let row = csv_cells(seq, hash, ev);
    row.into_iter()
        .map(|c| match neutralize_cell(&c) {
            Cow::Borrowed(_) => c,
            Cow::Owned(o) => o,
        })
        .collect()
}

fn csv_cells(seq: u64, hash: &str, ev: &Event) -> Vec<String> {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let num = |v: Option<String>| v.unwrap_or_default();
    let c = ev.container.as_ref();
    vec![
        seq.to_string(),
        ev.time.clone(),
        ev.kind.to_string(),
        ev.verdict.map(|v| v.to_string()).unwrap_or_default(),
        opt(&ev.module),
        ev.modules.join(" "),
        json_str(&ev.source),
        ev.syscall.as_ref().map(json_str).unwrap_or_default(),
        num(ev.result.map(|r| r.to_string())),
        opt(&ev.errno),
        ev.pid.to_string(),
        ev.tid.to_string(),
        num(ev.ppid.map(|p| p.to_string())),
        ev.uid.to_string(),
        ev.gid.to_string(),
        ev.comm.clone(),
        ev.cgroup_id.to_string(),
        opt(&ev.cgroup_path),
        c.map(|c| c.id.clone()).unwrap_or_default(),
        c.and_then(|c| c.name.clone()).unwrap_or_default(),
        c.map(|c| c.runtime.clone()).unwrap_or_default(),
        c.and_then(|c| c.pod_namespace.clone()).unwrap_or_default(),
        c.and_then(|c| c.pod_name.clone()).unwrap_or_default(),
        opt(&ev.path),
        opt(&ev.params),
        opt(&ev.taint_flags),
        ev.requested_by
            .as_ref()
            .map(|r| format!("{} (pid {}, {})", r.comm, r.pid, r.requested))
            .unwrap_or_default(),
        ev.truncated.join(" "),
        opt(&ev.detail),
        hash.to_string(),
    ]
}

/// Streams the matching events of the log in `dir` to `out`. `include_meta` adds kmodmon's
/// own records (segment starts, losses, recoveries...) to JSON-lines output.
pub fn export(
    dir: &Path,
    filter: &Filter,
    format: Format,
    include_meta: bool,
    out: impl Write,
) -> Result<ExportStats, AuditError> {
    let segments = segment::list(dir).map_err(io_err("read directory", dir))?;
    if segments.is_empty() {
        return Err(AuditError::Empty(dir.to_path_buf()));
    }
    let out_err = io_err("write", Path::new("the output"));
    let mut stats = ExportStats::default();
    let mut sink = match format {
        Format::Jsonl => Sink::Jsonl(io::BufWriter::new(out)),
        Format::Csv => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(CSV_HEADER).map_err(|e| out_err(csv_io(e)))?;
            Sink::Csv(Box::new(w))
        }
    };
    for seg in &segments {
        stats.segments += 1;
        let mut lines = seg.lines().map_err(io_err("open", &seg.path))?;
        while let Some(line) = lines.next_line().map_err(io_err("read", &seg.path))? {
            if !line.complete {
                stats.torn += 1;
                continue;
            }
            let Ok(parsed) = record::parse(line.bytes) else {
                stats.malformed += 1;
                continue;
            };
            stats.records += 1;
            if parsed.envelope.record.is_some() {
                if include_meta && let Sink::Jsonl(w) = &mut sink {
                    write_line(w, line.bytes).map_err(io_err("write", Path::new("the output")))?;
                    stats.written += 1;
                }
                continue;
            }
            let Ok(ev) = serde_json::from_slice::<Event>(line.bytes) else {
                stats.malformed += 1;
                continue;
            };
            if !filter.matches(&ev) {
                continue;
            }
            let r = match &mut sink {
                Sink::Jsonl(w) => write_line(w, line.bytes),
                Sink::Csv(w) => {
                    let hash = record::to_hex(&parsed.hash);
                    w.write_record(csv_row(parsed.envelope.seq, &hash, &ev))
                        .map_err(csv_io)
                }
            };
            r.map_err(io_err("write", Path::new("the output")))?;
            stats.written += 1;
        }
    }
    match sink {
        Sink::Jsonl(mut w) => w.flush(),
        Sink::Csv(mut w) => w.flush(),
    }
    .map_err(io_err("write", Path::new("the output")))?;
    Ok(stats)
}

enum Sink<W: Write> {
    Jsonl(io::BufWriter<W>),
    Csv(Box<csv::Writer<W>>),
}

/// The I/O error inside a CSV error (so a closed pipe stays recognisable).
fn csv_io(e: csv::Error) -> io::Error {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => e,
        other => io::Error::other(format!("{other:?}")),
    }
}

fn write_line(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes)?;
    w.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Clock, Container, Kind, Verdict};

    fn ev(kind: Kind, module: &str) -> Event {
        let mut e = Event::synthetic(kind, &Clock::new());
        e.module = Some(module.to_string());
        e
    }

    #[test]
    fn export_uses_the_one_filter_of_tail() {
        let mut e = ev(Kind::Load, "ip-vs");
        e.time = "2026-11-22T13:00:00Z".into();
        e.verdict = Some(Verdict::Unexpected);
        e.container = Some(Container {
            id: "abcdef0123".into(),
            runtime: "docker".into(),
            name: Some("web".into()),
            ..Default::default()
        });
        let t = |s: &str| humantime::parse_rfc3339(s).unwrap();
        let by = |m: &[&str], k: &[&str], c: &[&str]| {
            let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
            Filter::new(&s(m), &s(k), &s(c), &[]).unwrap()
        };
        assert!(Filter::default().matches(&e));
        assert!(by(&["ip_vs"], &[], &[]).matches(&e));
        assert!(!by(&["ip_vs_wrr"], &[], &[]).matches(&e));
        assert!(by(&[], &[], &["abcd"]).matches(&e));
        assert!(by(&[], &[], &["web"]).matches(&e));
        assert!(!by(&[], &[], &["host"]).matches(&e));
        assert!(by(&[], &["unload", "load"], &[]).matches(&e));
        assert!(!by(&[], &["unload"], &[]).matches(&e));
        let v = |v| Filter::default().verdicts(vec![v]);
        assert!(v(Some(Verdict::Unexpected)).matches(&e));
        assert!(!v(None).matches(&e));
        let w = |a: Option<&str>, b: Option<&str>| Filter::default().window(a.map(t), b.map(t));
        assert!(w(Some("2026-11-22T13:00:00Z"), None).matches(&e));
        assert!(!w(None, Some("2026-11-22T13:00:00Z")).matches(&e));
        assert!(w(None, Some("2026-11-22T13:00:01Z")).matches(&e));
        assert!(
            !by(&["ip_vs"], &[], &[])
                .verdicts(vec![Some(Verdict::Host)])
                .matches(&e)
        );
        e.container = None;
        e.verdict = None;
        assert!(by(&[], &[], &["host"]).matches(&e));
        assert!(v(None).matches(&e));
    }

    #[test]
    fn csv_quotes_commas_quotes_and_newlines() {
        let mut e = ev(Kind::LoadAttempt, "evil,\"mod\"");
        e.detail = Some("line one\nline two".into());
        e.params = Some("a=1, b=\"x\"".into());
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(CSV_HEADER).unwrap();
        w.write_record(csv_row(9, "ab", &e)).unwrap();
        let bytes = w.into_inner().unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"evil,\"\"mod\"\"\""), "{text}");
        // The newline was escaped by the sink guard: one physical line per row.
        assert!(text.contains(",line one\\x0aline two,"), "{text}");
        let mut r = csv::Reader::from_reader(bytes.as_slice());
        assert_eq!(r.headers().unwrap().len(), CSV_HEADER.len());
        let row = r.records().next().unwrap().unwrap();
        assert_eq!(&row[0], "9");
        assert_eq!(&row[2], "load_attempt");
        assert_eq!(&row[4], "evil,\"mod\"");
        assert_eq!(&row[24], "a=1, b=\"x\"");
        assert_eq!(&row[28], "line one\\x0aline two");
        assert_eq!(&row[6], "kmodmon");
    }

    #[test]
    fn formula_cells_are_neutralized_reversibly_and_numbers_stay_numbers() {
        for (raw, want) in [
            (
                "=HYPERLINK(\"http://x\",\"y\")",
                "'=HYPERLINK(\"http://x\",\"y\")",
            ),
            ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
            ("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0"),
            (
                "@SUM(1+1)*cmd|' /C calc'!A0",
                "'@SUM(1+1)*cmd|' /C calc'!A0",
            ),
            ("\t=1", "'\t=1"),
            ("\r=1", "'\r=1"),
            ("\u{ff1d}1+1", "'\u{ff1d}1+1"),
            ("\u{ff20}SUM(A1)", "'\u{ff20}SUM(A1)"),
            ("'already", "''already"),
            ("-", "'-"),
            ("-x", "'-x"),
            ("1-", "1-"),
            ("ip_vs", "ip_vs"),
            ("a=1, b=2", "a=1, b=2"),
            ("", ""),
            ("-38", "-38"),
            ("0", "0"),
            ("-1.5", "-1.5"),
            ("12345678901234567890", "12345678901234567890"),
        ] {
            assert_eq!(neutralize_cell(raw), want, "{raw:?}");
            assert_eq!(restore_cell(&neutralize_cell(raw)), raw);
        }
        assert!(!is_number("-1.") && !is_number(".5") && !is_number("1e3") && !is_number("--1"));
    }

    #[test]
    fn csv_rows_carry_no_formula_and_keep_numeric_results() {
        let mut e = ev(Kind::LoadAttempt, "=HYPERLINK(\"http://evil\")");
        e.result = Some(-38);
        e.errno = Some("ENOSYS".into());
        e.params = Some("@SUM(1)".into());
        e.comm = "+cmd".into();
        e.detail = Some("\u{202e}-1+1".into());
        let row = csv_row(3, "ab", &e);
        let col = |name: &str| &row[CSV_HEADER.iter().position(|h| *h == name).unwrap()];
        assert_eq!(col("result"), "-38");
        assert_eq!(col("seq"), "3");
        assert_eq!(col("module"), "'=HYPERLINK(\"http://evil\")");
        assert_eq!(col("params"), "'@SUM(1)");
        assert_eq!(col("comm"), "'+cmd");
        // The bidi override is escaped first; the cell then starts with a backslash.
        assert_eq!(col("detail"), "\\u{202e}-1+1");
        for cell in &row {
            assert!(
                is_number(cell) || !cell.starts_with(FORMULA_TRIGGERS),
                "{cell:?}"
            );
        }
    }
}
