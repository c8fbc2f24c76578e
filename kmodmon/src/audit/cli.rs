//! `kmodmon log ...` and `kmodmon export`: arguments (clap) and what they print.
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::export::{Filter, Format, export};
use super::timespec::parse_bound;
use super::verify::{
    ANCHOR_TAG, Anchor, AnchorCheck, Outcome, VerifyReport, anchors_in, newest_anchor, verify,
};
use super::{AuditError, bench, testkit};
use crate::event::Kind;

#[derive(Args, Debug)]
pub struct LogArgs {
    #[command(subcommand)]
    pub command: LogCommand,
}

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Check the whole hash chain of an audit log; names the first record edited, removed,
    /// reordered or truncated. Exit status 0 when intact, 1 otherwise.
    Verify(VerifyArgs),
    #[command(name = "__write-test", hide = true)]
    WriteTest(testkit::WriteTestArgs),
    #[command(name = "__bench", hide = true)]
    Bench(bench::BenchArgs),
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The audit log directory (as given to `kmodmon run --audit-dir`).
    pub dir: PathBuf,
    /// A record's seq and hash known from elsewhere (an earlier verify, syslog): the log
    /// must still hold it unchanged. Catches records cut from the end of the log.
    #[arg(long, value_name = "SEQ:HASH", conflicts_with = "anchor_from")]
    pub anchor: Option<Anchor>,
    /// Read anchors from FILE ("-": standard input): a syslog or journal export, or any file
    /// holding the daemon's `kmodmon-anchor seq=N hash=H` lines. The log is checked against
    /// the newest one; records cut from its end since then are reported as truncation.
    #[arg(long, value_name = "FILE")]
    pub anchor_from: Option<PathBuf>,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::parse(s).ok_or_else(|| {
        let all: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        format!("unknown kind {s:?}; one of: {}", all.join(", "))
    })
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The audit log directory.
    pub dir: PathBuf,
    /// Only events at or after T: RFC 3339 (2026-11-22T13:00:00Z, with any offset), a date,
    /// or a time ago (2h, 30min, 7days).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Only events before T (same forms as --since).
    #[arg(long, value_name = "T")]
    pub until: Option<String>,
    /// Only events from this container: full ID, ID prefix, name, or "host" (repeatable).
    #[arg(long = "container", value_name = "ID")]
    pub containers: Vec<String>,
    /// Only events for this module, '-' and '_' equivalent (repeatable).
    #[arg(long = "module", value_name = "NAME")]
    pub modules: Vec<String>,
    /// Only events of this kind (repeatable): load, unload, request, load_attempt,
    /// unload_attempt, expectation, self_load, denied, would_deny, hidden_module,
    /// unseen_load, identity_mismatch, tamper, lost.
    #[arg(long = "kind", value_name = "K", value_parser = parse_kind)]
    pub kinds: Vec<Kind>,
    /// Only events with this verdict: host, expected, unexpected, none (repeatable).
    #[arg(long = "verdict", value_name = "V", value_parser = crate::filter::parse_verdict)]
    pub verdicts: Vec<crate::filter::VerdictArg>,
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    pub format: Format,
    /// Also output kmodmon's own records (segment starts, losses, recoveries); jsonl only.
    #[arg(long)]
    pub include_meta: bool,
}

/// `kmodmon log ...`
pub fn run_log(args: LogArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        LogCommand::Verify(a) => run_verify(a),
        LogCommand::WriteTest(a) => testkit::run(a),
        LogCommand::Bench(a) => bench::run(a),
    }
}

/// The newest anchor in FILE (or stdin for "-"), and how many anchors it holds.
fn anchor_from(path: &std::path::Path) -> anyhow::Result<(Anchor, usize)> {
    let anchors = if path.as_os_str() == "-" {
        anchors_in(io::stdin().lock())
    } else {
        let f = std::fs::File::open(path)
            .with_context(|| format!("--anchor-from: cannot open {}", path.display()))?;
        anchors_in(io::BufReader::new(f))
    }
    .with_context(|| format!("--anchor-from: cannot read {}", path.display()))?;
    let newest = newest_anchor(&anchors)
        .map_err(|e| anyhow::anyhow!("--anchor-from {}: {e}", path.display()))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--anchor-from: {} holds no `{ANCHOR_TAG} seq=N hash=H` line (the daemon writes \
                 them to syslog, the journal and stdout)",
                path.display()
            )
        })?;
    Ok((newest, anchors.len()))
}

fn run_verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let from_file = args.anchor_from.as_deref().map(anchor_from).transpose()?;
    let anchor = args.anchor.or(from_file.map(|(a, _)| a));
    if let (Some((a, n)), Some(path)) = (from_file, &args.anchor_from)
        && !args.json
    {
        println!(
            "anchor: seq {} from {} (the newest of {n} anchor line(s))",
            a.seq,
            path.display()
        );
    }
    let outcome = verify(&args.dir, anchor)
        .with_context(|| format!("cannot verify {}", args.dir.display()))?;
    let dir = args.dir.display();
    let (report, failure) = match &outcome {
        Outcome::Intact(r) => (r, None),
        Outcome::Broken(f, r) => (r, Some(f)),
    };
    if args.json {
        let v = serde_json::json!({
            "ok": failure.is_none(),
            "failure": failure.map(|f| serde_json::json!({
                "segment": f.segment,
                "line": f.line,
                "seq": f.seq,
                "problem": f.problem.to_string(),
            })),
            "segments": report.segments,
            "compressed_segments": report.compressed,
            "records": report.records,
            "events": report.events,
            "lost": report.lost,
            "lost_notes": report.lost_notes,
            "recoveries": report.recoveries,
            "first_seq": report.first_seq,
            "last_seq": report.last_seq,
            "head": report.head,
            "from_genesis": report.from_genesis,
            "rate_limited": report.rate_limited,
            "unsure": report.unsure,
            "anchor": anchor.map(|a| serde_json::json!({
                "seq": a.seq,
                "hash": super::record::to_hex(&a.hash),
                "found_in": args.anchor_from.as_ref().map(|p| p.display().to_string()),
                "anchors_in_file": from_file.map(|(_, n)| n),
                "result": match (failure, report.anchor) {
                    (_, Some(AnchorCheck::Matched)) => "matched",
                    (_, Some(AnchorCheck::RemovedByRetention)) => "removed_by_retention",
                    (Some(_), None) => "not_reached_or_failed",
                    (None, None) => "unchecked",
                },
            })),
        });
        println!("{v}");
    } else if let Some(f) = failure {
        println!("audit log {dir}: FAILED: {f}");
        println!("checked before it: {}", summary(report));
    } else {
        println!("audit log {dir}: intact: {}", summary(report));
        if let (Some(seq), Some(h)) = (report.last_seq, &report.head) {
            println!("head: {seq}:{h}  (keep it elsewhere; pass it to --anchor later)");
        }
        match report.anchor {
            Some(AnchorCheck::Matched) => {
                println!("anchor: the anchored record is in the log, unchanged")
            }
            Some(AnchorCheck::RemovedByRetention) => println!(
                "anchor: older than the oldest record kept (removed by retention): not compared"
            ),
            None => {}
        }
        if report.lost > 0 || report.recoveries > 0 {
            println!(
                "the log records {} lost event(s) and {} crash recovery(ies)",
                report.lost, report.recoveries
            );
        }
        if report.rate_limited > 0 || report.unsure > 0 {
            println!(
                "the log records {} event(s) aggregated by the rate limit and {} record(s) whose \
                 durability is unknown (a failed fsync)",
                report.rate_limited, report.unsure
            );
        }
    }
    Ok(if failure.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn summary(r: &VerifyReport) -> String {
    let range = match (r.first_seq, r.last_seq) {
        (Some(a), Some(b)) => format!("seq {a}..{b}"),
        _ => "no records".into(),
    };
    let start = if r.from_genesis {
        "from the start of the log"
    } else {
        "older records removed by retention"
    };
    format!(
        "{} records ({} events) in {} segment(s) ({} compressed), {range}, {start}",
        r.records, r.events, r.segments, r.compressed
    )
}

/// `kmodmon export`
pub fn run_export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let now = SystemTime::now();
    let bound = |flag: &str, v: &Option<String>| {
        v.as_deref()
            .map(|s| parse_bound(s, now).with_context(|| format!("--{flag}")))
            .transpose()
    };
    let kinds: Vec<String> = args.kinds.iter().map(|k| k.to_string()).collect();
    let filter = Filter::new(&args.modules, &kinds, &args.containers, &[])?
        .verdicts(args.verdicts.into_iter().map(|v| v.0).collect())
        .window(bound("since", &args.since)?, bound("until", &args.until)?);
    let stdout = io::stdout();
    let result = export(
        &args.dir,
        &filter,
        args.format,
        args.include_meta,
        stdout.lock(),
    );
    let stats = match result {
        Ok(s) => s,
        // `kmodmon export DIR | head`: the reader is done, so are we.
        Err(AuditError::Io { err, .. }) if err.kind() == io::ErrorKind::BrokenPipe => {
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot export {}", args.dir.display())),
    };
    let _ = io::stdout().flush();
    if stats.malformed > 0 || stats.torn > 0 {
        eprintln!(
            "kmodmon export: skipped {} malformed and {} incomplete line(s); run `kmodmon log verify {}`",
            stats.malformed,
            stats.torn,
            args.dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
