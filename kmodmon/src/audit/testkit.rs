//! Deterministic synthetic events and the hidden `kmodmon log __write-test` command that the
//! end-to-end tests (crash loop, full disk) drive as a child process.
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::Args;

use super::config::{AuditConfig, FsyncPolicy, parse_size};
use super::writer::AuditLog;
use crate::event::{Clock, Container, Event, Kind, Syscall, Verdict};
use crate::metrics::Metrics;

const MODULES: [&str; 6] = [
    "ip_vs",
    "nf-conntrack",
    "evil,\"mod\"",
    "overlay",
    "ip_vs_wrr",
    "=HYPERLINK(\"http://x\",\"y\")",
];
const VERDICTS: [Option<Verdict>; 4] = [
    Some(Verdict::Host),
    Some(Verdict::Expected),
    Some(Verdict::Unexpected),
    None,
];

/// Event `i` of run `run`, at `time`. Its `detail` is `run=<run> i=<i>`; kinds, modules
/// (including CSV-hostile names: a comma and quotes, a formula), containers and verdicts cycle with `i`.
pub fn synthetic_event(run: &str, i: u64, time: SystemTime) -> Event {
    let mut e = Event::synthetic(
        Kind::ALL[(i % Kind::ALL.len() as u64) as usize],
        &Clock::new(),
    );
    e.time = humantime::format_rfc3339_nanos(time).to_string();
    e.module = Some(MODULES[(i % MODULES.len() as u64) as usize].to_string());
    e.verdict = VERDICTS[(i % VERDICTS.len() as u64) as usize];
    e.pid = 1000 + (i % 97) as u32;
    e.tid = e.pid;
    e.comm = "insmod".into();
    e.container = match i % 3 {
        0 => None,
        1 => Some(Container {
            id: format!("{:064x}", 0xc0ffee_u64 + i % 2),
            runtime: "docker".into(),
            name: Some(format!("web-{}", i % 2)),
            ..Default::default()
        }),
        _ => Some(Container {
            id: format!("{:064x}", 0xbeef_u64),
            runtime: "containerd".into(),
            pod_name: Some("db-0".into()),
            pod_namespace: Some("prod".into()),
            ..Default::default()
        }),
    };
    if e.kind == Kind::LoadAttempt {
        e.syscall = Some(Syscall::FinitModule);
        e.result = Some(-38);
        e.errno = Some("ENOSYS".into());
        e.params = Some("a=1, b=\"two\"".into());
    }
    e.detail = Some(format!("run={run} i={i}"));
    e
}

/// Hidden: writes synthetic events to an audit log, for the end-to-end tests.
#[derive(Args, Debug)]
pub struct WriteTestArgs {
    pub dir: PathBuf,
    /// Events to write (ignored with --stdin).
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Run label put into each event's detail.
    #[arg(long, default_value = "r")]
    pub run: String,
    /// Sync and print "durable ..." after every K events (0: only at the end).
    #[arg(long, default_value_t = 1)]
    pub sync_every: u64,
    #[arg(long, default_value = "always")]
    pub fsync: FsyncPolicy,
    #[arg(long, value_parser = parse_size)]
    pub segment_size: Option<u64>,
    #[arg(long)]
    pub retain_segments: Option<usize>,
    #[arg(long, value_parser = super::config::parse_opt_size)]
    pub retain_size: Option<Option<u64>>,
    #[arg(long)]
    pub disk_full_action: Option<super::config::DiskFullAction>,
    #[arg(long)]
    pub compress: bool,
    #[arg(long)]
    pub queue: Option<usize>,
    /// Time of event 0 (RFC 3339) [default: now].
    #[arg(long)]
    pub start: Option<String>,
    /// Time between events.
    #[arg(long, default_value = "1s")]
    pub step: humantime::Duration,
    /// Read commands from stdin instead: "write N", "sync", "quit"; each answers a stats line.
    #[arg(long)]
    pub stdin: bool,
}

pub fn run(args: WriteTestArgs) -> anyhow::Result<std::process::ExitCode> {
    let mut cfg = AuditConfig::new(&args.dir);
    cfg.fsync = args.fsync;
    if let Some(s) = args.segment_size {
        cfg.segment_size = s;
    }
    cfg.retain_segments = args.retain_segments;
    if let Some(s) = args.retain_size {
        cfg.retain_size = s;
    }
    if let Some(a) = args.disk_full_action {
        cfg.disk_full_action = a;
    }
    cfg.compress = args.compress;
    if let Some(q) = args.queue {
        cfg.queue = q;
    }
    let start = match &args.start {
        Some(s) => humantime::parse_rfc3339_weak(s).with_context(|| format!("--start {s:?}"))?,
        None => SystemTime::now(),
    };
    let step: Duration = args.step.into();
    let (log, report) = AuditLog::open(cfg, Arc::new(Metrics::new()))?;
    let out = std::io::stdout();
    let mut out = out.lock();
    let cut: u64 = report.recovered.iter().map(|r| r.cut_bytes).sum();
    writeln!(
        out,
        "open next_seq={} cut_bytes={cut} removed={}",
        report.next_seq,
        report.removed.len()
    )?;
    out.flush()?;
    let event = |i: u64| {
        let offset = Duration::from_nanos((step.as_nanos() as u64).saturating_mul(i));
        synthetic_event(&args.run, i, start.checked_add(offset).unwrap_or(start))
    };
    if args.stdin {
        let mut i = 0;
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("write"), Some(n)) => {
                    for _ in 0..n.parse::<u64>().context("write N")? {
                        log.submit(event(i));
                        i += 1;
                    }
                }
                (Some("sync"), None) => {
                    log.sync()?;
                }
                (Some("quit"), None) => break,
                _ => anyhow::bail!("unknown command {line:?}"),
            }
            let s = log.stats();
            writeln!(
                out,
                "stats events={} lost={} lost_queue_full={} lost_write_error={} lost_suspended={} lost_notes={} last_seq={} durable_seq={}",
                s.events,
                s.lost(),
                s.lost_queue_full,
                s.lost_write_error,
                s.lost_suspended,
                s.lost_notes,
                s.last_seq,
                s.durable_seq
            )?;
            out.flush()?;
        }
    } else {
        for i in 0..args.count {
            log.submit_blocking(event(i))?;
            if args.sync_every > 0 && (i + 1) % args.sync_every == 0 {
                let seq = log.sync()?;
                writeln!(out, "durable run={} i={i} seq={seq}", args.run)?;
                out.flush()?;
            }
        }
    }
    let s = log.close();
    writeln!(
        out,
        "done events={} lost={} last_seq={}",
        s.events,
        s.lost(),
        s.last_seq
    )?;
    Ok(std::process::ExitCode::SUCCESS)
}
