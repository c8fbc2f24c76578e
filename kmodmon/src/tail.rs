//! `kmodmon tail`: attach, stream events to stdout, report drops as they happen and a summary
//! (delivered + dropped + in flight = seen) at exit.
use std::{
    io::{IsTerminal as _, Write as _},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::TailArgs,
    enrich::{EnrichOptions, Enricher},
    output::{filter::Filter, human, json_line},
    pipeline::Accounting,
    probe::{
        Options,
        counters::{Counters, Snapshot},
    },
    session::{Session, summarize},
};

pub fn run(args: TailArgs) -> anyhow::Result<ExitCode> {
    let filter = Filter::new(&args.modules, &args.kinds, &args.containers, &args.pids)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(tail(args, filter))
}

async fn tail(args: TailArgs, filter: Filter) -> anyhow::Result<ExitCode> {
    // Handlers first: a SIGINT while attaching (possibly ignored by a non-interactive shell's
    // background job until a handler exists) must still stop tail.
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let opts = Options {
        no_fexit: args.no_fexit,
        force_raw_syscalls: args.force_raw_syscalls,
    };
    let Session {
        plan,
        counters,
        accounting,
        events: mut rx,
        attach_ms,
        probe: _probe,
    } = Session::start(
        opts,
        Enricher::with_options(EnrichOptions {
            modules_dir: args.modules_dir.clone(),
            load_expected: args.load_expected,
            ..EnrichOptions::default()
        }),
    )?;
    eprintln!("kmodmon: attached in {attach_ms} ms: {}", plan.describe());
    for note in &plan.notes {
        eprintln!("kmodmon: note: {note}");
    }

    let style = human::Style {
        color: human::want_color(args.color, std::io::stdout().is_terminal()),
    };
    let mut out = std::io::BufWriter::with_capacity(64 << 10, std::io::stdout().lock());
    if !args.json {
        writeln!(out, "{}", human::header())
            .and_then(|_| out.flush())
            .ok();
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = counters.snapshot();
    let mut last_queue_full = 0;
    let mut printed: u64 = 0;
    let limit = args.count;
    if limit == Some(0) {
        return finish(&counters, &accounting, printed, args.json);
    }
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                if !filter.matches(&ev) {
                    continue;
                }
                let text = if args.json { json_line(&ev) } else { human::line(&ev, style) };
                // Flush when nothing more is waiting: one write per burst, not per event.
                let written = writeln!(out, "{text}")
                    .and_then(|_| if rx.is_empty() { out.flush() } else { Ok(()) });
                if written.is_err() {
                    // stdout closed (e.g. `| head`): stop quietly.
                    break;
                }
                printed += 1;
                if limit.is_some_and(|n| printed >= n) {
                    break;
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {
                let now = counters.snapshot();
                report_drops(&now.since(&last), accounting.queue_full() - last_queue_full);
                last_queue_full = accounting.queue_full();
                last = now;
            }
        }
    }
    let _ = out.flush();
    drop(out);
    finish(&counters, &accounting, printed, args.json)
}

fn report_drops(delta: &Snapshot, queue_full: u64) {
    let mut parts: Vec<String> = delta
        .drops()
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    if queue_full > 0 {
        parts.push(format!("{queue_full} userspace_queue_full"));
    }
    if !parts.is_empty() {
        eprintln!(
            "kmodmon: DROPPED events in the last second: {}",
            parts.join(", ")
        );
    }
}

/// The exit summary. Identity: seen = delivered + dropped + in_flight + unread, where unread are
/// events still in the ring buffer when tail stopped (e.g. after --count).
fn finish(
    counters: &Counters,
    acc: &Accounting,
    printed: u64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let s = summarize(&counters.snapshot(), acc);
    if json {
        let mut v = serde_json::to_value(&s)?;
        v["printed"] = printed.into();
        eprintln!("{}", serde_json::json!({ "summary": v }));
    } else {
        let drops_text = if s.drops.is_empty() {
            "none".to_string()
        } else {
            s.drops
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        eprintln!(
            "kmodmon: summary: printed {printed}, delivered {}; kernel saw {} = delivered {} + \
             dropped {} + in flight {} + unread at exit {}; drops: {drops_text}",
            s.delivered, s.seen, s.delivered, s.dropped, s.in_flight, s.unread
        );
        if !s.errors.is_empty() {
            eprintln!(
                "kmodmon: kernel-side read errors (events delivered with fields marked missing): {}",
                s.errors
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
