//! `kmodmon tail`: a front end that streams events to stdout (human columns or JSON lines),
//! reports losses as they happen and the accounting at exit.
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use crate::{
    enrich::EnrichOptions,
    filter::Filter,
    host::RegistryOptions,
    sensor::Options,
    session::{Session, SessionOptions, Sig, Signals, Summary},
    sinks::{
        Fanout, Output,
        human::{self, ColorChoice},
        json,
        lines::LineSink,
    },
};

#[derive(Args, Debug, Clone, Default)]
pub struct TailArgs {
    /// One JSON object per line (schema in the README).
    #[arg(long)]
    pub json: bool,
    /// Only events for this module (repeatable; '-' and '_' are equivalent).
    #[arg(long = "module", value_name = "NAME")]
    pub modules: Vec<String>,
    /// Only events of this kind (repeatable): load, unload, request, load_attempt,
    /// unload_attempt, expectation, self_load, denied, would_deny, hidden_module,
    /// unseen_load, identity_mismatch, tamper, lost.
    #[arg(long = "kind", value_name = "KIND")]
    pub kinds: Vec<String>,
    /// Only events from this container (repeatable): a full ID, an ID prefix, a name, a pod
    /// name, or "host".
    #[arg(long = "container", value_name = "ID")]
    pub containers: Vec<String>,
    /// Only events with this verdict: host, expected, unexpected, none (repeatable).
    #[arg(long = "verdict", value_name = "V", value_parser = crate::filter::parse_verdict)]
    pub verdicts: Vec<crate::filter::VerdictArg>,
    /// Only events from this process ID (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Exit after printing N events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Colour in human output.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// Do not use fexit even where BTF allows it (use the next source in the chain).
    #[arg(long)]
    pub no_fexit: bool,
    /// Identical attempts of one task (same syscall, arguments and result) closer than this
    /// are aggregated in the kernel into repeat summaries; "0" reports every attempt on its
    /// own [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub repeat_window: Option<Duration>,
    /// Force the raw_syscalls fallback for attempts (for comparison and testing).
    #[arg(long)]
    pub force_raw_syscalls: bool,
    /// Do not report module syscalls that a seccomp filter refused before they ran (saves
    /// the cost seccomp-confined tasks pay for it on kernels where attempts come from fexit).
    /// Where attempts come from the syscall exit alone (source sys_exit) they are still
    /// reported as failed attempts, without blocked_by.
    #[arg(long)]
    pub no_seccomp_attempts: bool,
    /// Runtime state kept outside the runtime's default place, as KIND=DIR (repeatable):
    /// docker (data-root), docker-exec (exec-root), containerd (state), containers
    /// (graphroot or runroot), runc / crun (--root), lxc (lxcpath), isulad (root).
    #[arg(long = "state-dir", value_name = "KIND=DIR")]
    pub state_dirs: Vec<crate::host::runtime_state::StateDir>,
    /// Do not capture module images: no content identity (sha256, .modinfo, signature).
    #[arg(long)]
    pub no_identity: bool,
    /// Where modules.dep and modules.alias are read from (default /lib/modules/$(uname -r)).
    #[arg(long, value_name = "DIR")]
    pub modules_dir: Option<PathBuf>,
    /// Load (modprobe) a new container's KERNEL_MODULES that are not loaded, before reporting
    /// them; each run is reported as a self_load event.
    #[arg(long)]
    pub load_expected: bool,
}

pub fn run(args: TailArgs) -> anyhow::Result<ExitCode> {
    let filter = Filter::new(&args.modules, &args.kinds, &args.containers, &args.pids)?
        .verdicts(args.verdicts.iter().map(|v| v.0).collect());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(tail(args, filter))
}

async fn tail(args: TailArgs, filter: Filter) -> anyhow::Result<ExitCode> {
    let mut signals = Signals::install()?;
    let stdout = std::io::stdout();
    let sink = if args.json {
        LineSink::new(stdout, json::line)
    } else {
        let style = human::Style {
            color: human::want_color(args.color, std::io::stdout().is_terminal()),
        };
        LineSink::new(stdout, move |ev| human::line(ev, style)).preamble(&human::header())
    };
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let fanout = Fanout::new(vec![
        Output::new("stdout", Box::new(sink))
            .filter(filter)
            .limit(args.count),
    ])
    .on_done(move || {
        let _ = done_tx.send(true);
    });
    let opts = SessionOptions {
        sensor: Options {
            no_fexit: args.no_fexit,
            force_raw_syscalls: args.force_raw_syscalls,
            cgroups_only: false,
            no_seccomp_attempts: args.no_seccomp_attempts,
            no_identity: args.no_identity,
            repeat_window: args.repeat_window,
        },
        registry: RegistryOptions {
            modules_dir: args.modules_dir.clone(),
            state: (!args.state_dirs.is_empty())
                .then(|| crate::host::runtime_state::StateConfig::detect_with(&args.state_dirs)),
            ..RegistryOptions::default()
        },
        enrich: EnrichOptions {
            load_expected: args.load_expected,
        },
        ledger_file: None,
    };
    let mut session = Session::start(opts, |_| Ok(None), fanout)?;
    eprintln!(
        "kmodmon: attached in {} ms: {}",
        session.attach_ms,
        session.plan.describe()
    );
    for note in &session.plan.notes {
        eprintln!("kmodmon: note: {note}");
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    if args.count != Some(0) {
        loop {
            tokio::select! {
                sig = signals.next() => if sig == Sig::Stop { break },
                _ = done_rx.changed() => break,
                _ = tick.tick() => {
                    report_losses(&session.new_losses());
                    if session.pipeline.has_failed() {
                        break;
                    }
                }
            }
        }
    }
    let (finished, summary) = session.finish(&mut signals).await;
    print_summary(&summary, args.json)?;
    if let Some(why) = finished.failure {
        eprintln!("kmodmon: error: {why}");
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

fn report_losses(losses: &[(String, u64)]) {
    if losses.is_empty() {
        return;
    }
    let parts: Vec<String> = losses.iter().map(|(k, v)| format!("{v} {k}")).collect();
    eprintln!(
        "kmodmon: DROPPED events in the last second: {}",
        parts.join(", ")
    );
}

/// The exit summary on stderr: the kernel's identity and the pipeline's.
fn print_summary(s: &Summary, json: bool) -> anyhow::Result<()> {
    let printed = s.sinks.first().map_or(0, |r| r.emitted);
    if json {
        let mut v = serde_json::to_value(s)?;
        v["printed"] = printed.into();
        eprintln!("{}", serde_json::json!({ "summary": v }));
        return Ok(());
    }
    eprintln!("kmodmon: summary: printed {printed}; {}", s.describe());
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
    Ok(())
}
