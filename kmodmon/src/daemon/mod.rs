//! `kmodmon run`: the daemon. Probes and enrichment as in `tail`, with sinks for operations:
//! the tamper-evident audit log, Prometheus metrics, JSON lines on stdout, syslog. It logs its
//! own health on stderr (start, sources, drops, reloads) and into the audit log as notes.
pub mod config;

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;

pub use self::config::RunArgs;
use crate::{
    audit::AuditLog,
    enforce::{Enforcer, StartOptions},
    metrics::{Metrics, MetricsServer},
    ratelimit::RateLimiter,
    sensor::Options,
    session::{Session, SessionOptions, Sig, Signals},
    sinks::{
        Fanout, Output,
        audit::AuditSink,
        json,
        lines::LineSink,
        metrics::MetricsSink,
        syslog::{Syslog, SyslogSink},
    },
};

/// How often the daemon publishes the audit chain's head.
const ANCHOR_EVERY: Duration = Duration::from_secs(60);

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = config::load(&args)?;
    if args.check_config {
        return check_config(&cfg);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(daemon(cfg))
}

/// `kmodmon run --check-config`: everything `run` would reject before attaching, without
/// attaching (no privileges needed).
fn check_config(cfg: &config::Effective) -> anyhow::Result<ExitCode> {
    let source = cfg
        .source
        .as_ref()
        .map_or("no config file (defaults and flags)".to_string(), |p| {
            p.display().to_string()
        });
    if let Some(addr) = &cfg.metrics {
        crate::metrics::parse_addr(addr).map_err(|e| anyhow::anyhow!("metrics listen: {e}"))?;
    }
    if cfg.forward.syslog {
        cfg.forward
            .syslog_facility
            .parse::<crate::sinks::syslog::Facility>()
            .map_err(|e| anyhow::anyhow!("syslog facility: {e}"))?;
    }
    let policy = match &cfg.policy {
        Some(path) => {
            let p = crate::policy::Policy::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
            format!(
                "policy {} (mode {}, {} rules)",
                path.display(),
                p.mode,
                p.rules.len()
            )
        }
        None => "no policy (monitoring only)".to_string(),
    };
    let audit = cfg.audit.as_ref().map_or("no audit log".to_string(), |a| {
        format!("audit log in {}", a.dir.display())
    });
    println!("{source}: ok; {audit}; {policy}");
    Ok(ExitCode::SUCCESS)
}

async fn daemon(cfg: config::Effective) -> anyhow::Result<ExitCode> {
    // Handlers first, so a signal during start-up is not lost.
    let mut signals = Signals::install()?;
    // Every connection, state file and segment needs a descriptor: take what the hard limit
    // allows, so a crowd on the metrics port cannot starve the rest.
    match crate::limits::raise_nofile_limit() {
        Ok(l) => log::info!(
            "RLIMIT_NOFILE {} -> {} (hard {})",
            l.soft_before,
            l.soft,
            l.hard
        ),
        Err(e) => log::warn!("cannot raise RLIMIT_NOFILE: {e}"),
    }
    let metrics = Arc::new(Metrics::new());
    let audit = match cfg.audit.clone() {
        Some(a) => {
            let dir = a.dir.clone();
            let (log, report) = AuditLog::open(a, metrics.clone())
                .with_context(|| format!("opening the audit log in {}", dir.display()))?;
            log::info!("audit log {}: {report:?}", dir.display());
            Some(Arc::new(log))
        }
        None => {
            log::warn!(
                "no audit log configured (--audit-dir or [audit] dir): events are not recorded"
            );
            None
        }
    };
    // Tasks that run as long as the daemon: one ending is a failure (non-zero exit, so the
    // service manager restarts kmodmon), never a quiet degradation.
    let mut essential: Vec<(&str, tokio::task::JoinHandle<()>)> = Vec::new();
    let syslog = if cfg.forward.syslog {
        let facility = cfg
            .forward
            .syslog_facility
            .parse()
            .map_err(|e| anyhow::anyhow!("syslog facility: {e}"))?;
        Some(Arc::new(
            Syslog::connect(&cfg.forward.syslog_socket, facility).with_context(|| {
                format!(
                    "connecting to syslog at {} (is a syslog daemon running?)",
                    cfg.forward.syslog_socket.display()
                )
            })?,
        ))
    } else {
        None
    };
    if let Some(addr) = &cfg.metrics {
        let addr =
            crate::metrics::parse_addr(addr).map_err(|e| anyhow::anyhow!("--metrics: {e}"))?;
        let server = MetricsServer::bind(addr)
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        log::info!("metrics on http://{}/metrics", server.local_addr()?);
        let m = metrics.clone();
        essential.push((
            "the metrics server",
            tokio::spawn(async move {
                if let Err(e) = server.serve(m).await {
                    log::error!("metrics server stopped: {e}");
                }
            }),
        ));
    }
    // A policy is validated (and the BPF LSM checked) before anything is attached: if it
    // cannot be enforced, refuse to start rather than pretend.
    if let Some(path) = &cfg.policy {
        crate::policy::Policy::load(path)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("enforcing the policy {}", path.display()))?;
        crate::enforce::preflight(false)
            .with_context(|| format!("enforcing the policy {}", path.display()))?;
    }

    let mut outputs = vec![Output::new(
        "metrics",
        Box::new(MetricsSink(metrics.clone())),
    )];
    if let Some(log) = &audit {
        let limiter = (cfg.rate_limit.rate > 0).then(|| RateLimiter::new(cfg.rate_limit.clone()));
        outputs.push(Output::new(
            "audit",
            Box::new(AuditSink::new(log.clone(), limiter)),
        ));
    }
    if cfg.forward.stdout {
        outputs.push(Output::new(
            "stdout",
            Box::new(LineSink::new(std::io::stdout(), json::line).with_anchors()),
        ));
    }
    if let Some(s) = &syslog {
        outputs.push(Output::new("syslog", Box::new(SyslogSink(s.clone()))));
    }
    let fanout = Fanout::new(outputs);
    metrics.watch_sinks(fanout.counters());
    let opts = SessionOptions {
        sensor: Options {
            no_fexit: cfg.probe.no_fexit,
            force_raw_syscalls: cfg.probe.force_raw_syscalls,
            cgroups_only: false,
            no_seccomp_attempts: !cfg.probe.seccomp_attempts,
            no_identity: cfg.probe.no_identity,
            repeat_window: cfg.probe.repeat_window,
        },
        registry: crate::host::RegistryOptions {
            state: (!cfg.state_dirs.is_empty())
                .then(|| crate::host::runtime_state::StateConfig::detect_with(&cfg.state_dirs)),
            ..crate::host::RegistryOptions::default()
        },
        ledger_file: Some(cfg.ledger_file.clone()),
        ..SessionOptions::default()
    };
    let policy = cfg.policy.clone();
    let mut session = Session::start(
        opts,
        |registry| {
            let Some(path) = &policy else { return Ok(None) };
            let enf = Enforcer::start(StartOptions::new(path), registry)
                .with_context(|| format!("enforcing the policy {}", path.display()))?;
            log::info!(
                "policy {} in force (mode {}, {:?}, {} containers mapped)",
                path.display(),
                enf.mode(),
                enf.installed,
                enf.container_count()
            );
            Ok(Some(enf))
        },
        fanout,
    )?;
    let started = format!(
        "kmodmon {} started; attached in {} ms: {}",
        env!("CARGO_PKG_VERSION"),
        session.attach_ms,
        session.plan.describe()
    );
    eprintln!("kmodmon: {started}");
    for note in &session.plan.notes {
        eprintln!("kmodmon: note: {note}");
    }
    if let Some(log) = &audit {
        log.note(started);
    }
    metrics.health.set_attached();
    if !cfg.check.interval.is_zero() {
        essential.push((
            "the periodic check",
            spawn_check(&session.pipeline, metrics.clone(), cfg.check.interval),
        ));
    }
    if cfg.node_labels.enabled
        && let Some(task) = spawn_node_labels(&session.pipeline, metrics.clone(), &cfg.node_labels)
    {
        essential.push(("the node labels", task));
    }
    // systemd (Type=notify): ready now; WATCHDOG=1 only while the pipeline turns.
    let watchdog = sd_notify::watchdog_enabled();
    notify(&[sd_notify::NotifyState::Ready]);

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut anchor_tick = tokio::time::interval(ANCHOR_EVERY);
    let mut last_anchor = None;
    let mut task_failure: Option<String> = None;
    loop {
        tokio::select! {
            _ = anchor_tick.tick() => {
                // The chain head, where someone else keeps it: the journal (stderr), syslog,
                // stdout. `kmodmon log verify --anchor-from` checks the log against it.
                if let Some(a) = audit.as_ref().and_then(|l| l.head())
                    && last_anchor != Some(a)
                {
                    eprintln!("kmodmon: {}", a.line());
                    session.pipeline.anchor(a).await;
                    last_anchor = Some(a);
                }
            }
            _ = tick.tick() => {
                if session.pipeline.has_failed() {
                    break;
                }
                if let Some((what, _)) = essential.iter().find(|(_, h)| h.is_finished()) {
                    task_failure = Some(format!("{what} stopped"));
                    break;
                }
                let stalled = session.pipeline.accounting.stalled_ms();
                if stalled < 5_000 {
                    metrics.health.beat();
                }
                // A stuck pipeline stops the pings: systemd kills and restarts the daemon.
                if let Some(w) = watchdog
                    && u128::from(stalled) < w.as_millis() / 2
                {
                    notify(&[sd_notify::NotifyState::Watchdog]);
                }
                for (reason, n) in session.new_losses() {
                    metrics.drop_events(&reason, n);
                    let msg = format!("dropped {n} events ({reason})");
                    log::warn!("{msg}");
                    if let Some(log) = &audit {
                        log.note(msg);
                    }
                }
            }
            sig = signals.next() => match sig {
                Sig::Stop => break,
                Sig::Hangup => {
                    let msg = match session.pipeline.reload_policy().await {
                        Ok(m) => format!("SIGHUP: {m}"),
                        Err(e) if policy.is_none() => format!(
                            "SIGHUP: {e}; the config file is read at start (restart to apply changes)"
                        ),
                        Err(e) => format!("SIGHUP: {e}"),
                    };
                    log::warn!("{msg}");
                    if let Some(log) = &audit {
                        log.note(msg);
                    }
                }
            },
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    let (finished, summary) = session.finish(&mut signals).await;
    let text = format!("stopping: {}", summary.describe());
    eprintln!("kmodmon: {text}");
    // The same, for machines (journald keeps it as one line).
    eprintln!("{}", serde_json::json!({ "summary": summary }));
    if let Some(enf) = finished.enforcer {
        // Pins stay: enforcement outlives the daemon; `kmodmon enforce off` removes it.
        if let Err(e) = enf.shutdown(false) {
            log::warn!("leaving enforcement in place: {e}");
        }
    }
    if let Some(log) = &audit {
        log.note(text);
        let stats = log.close();
        eprintln!("kmodmon: audit log closed: {stats:?}");
        if let Some(a) = log.head() {
            eprintln!("kmodmon: {}", a.line());
            if let Some(s) = &syslog
                && let Err(e) = s.send_anchor(&a)
            {
                log::warn!("syslog: cannot send the audit anchor: {e}");
            }
            if cfg.forward.stdout {
                println!("{}", a.json());
            }
        }
    }
    if let Some(why) = finished.failure.or(task_failure) {
        anyhow::bail!("{why}; kmodmon stopped (a supervisor should restart it)");
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `kmodmon check` now and every `interval`, with the containers of the live registry,
/// and serves the result as gauges on /metrics (the fleet view: configured modules missing at
/// the next boot, declared modules not loaded).
fn spawn_check(
    pipeline: &crate::pipeline::Pipeline,
    metrics: Arc<Metrics>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    use crate::check::{self, containers};
    use crate::host::moddb::RootFs;
    let registry = pipeline.registry_handle();
    tokio::spawn(async move {
        // The first check a little after start, out of the way of attaching.
        let first = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut tick = tokio::time::interval_at(first, interval);
        loop {
            tick.tick().await;
            let Some(inputs) = registry.with(containers::from_registry).await else {
                return; // the pipeline has stopped
            };
            let report = tokio::task::spawn_blocking(move || {
                check::gather(&RootFs::host(), None, inputs)
                    .map(|r| check::prom::render(&r, std::time::SystemTime::now()))
            })
            .await;
            match report {
                Ok(Ok(text)) => metrics.set_check(text),
                Ok(Err(e)) => log::warn!("periodic check: {e}"),
                Err(e) => log::warn!("periodic check failed: {e}"),
            }
        }
    })
}

/// Tells systemd (Type=notify) about the daemon's state; nothing when not run by systemd.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        log::warn!("sd_notify: {e}");
    }
}

/// Keeps this node's `kmodmon.io/module.NAME` labels equal to the modules its running
/// containers declare and the kernel has (see [`crate::kube::labels`]). A task of its own:
/// the API server never holds up the event pipeline. A configuration that cannot work is
/// logged and counted, and monitoring goes on without labels (`None`). The task ends only
/// when the pipeline stops.
fn spawn_node_labels(
    pipeline: &crate::pipeline::Pipeline,
    metrics: Arc<Metrics>,
    cfg: &config::NodeLabelsConfig,
) -> Option<tokio::task::JoinHandle<()>> {
    use crate::host::moddb::{LiveState, RootFs};
    use crate::kube::{ApiClient, labels};
    let client = cfg
        .resolve()
        .and_then(|(node, api)| Ok((node, ApiClient::new(api)?)));
    let (node, client) = match client {
        Ok(c) => c,
        Err(e) => {
            log::error!("node labels are off: {e:#}");
            metrics.node_labels.result("error");
            return None;
        }
    };
    log::info!("node labels: node {node} through {}", client.server());
    let registry = pipeline.registry_handle();
    let (interval, min_interval) = (cfg.interval, cfg.min_interval);
    Some(tokio::spawn(async move {
        let mut labeler = labels::NodeLabeler::new(client, node, min_interval);
        let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = std::collections::BTreeSet::new();
        loop {
            tick.tick().await;
            let Some(declared) = registry
                .with(|r| {
                    r.running()
                        .iter()
                        .flat_map(|t| t.declared_modules().iter().cloned())
                        .collect::<std::collections::BTreeSet<String>>()
                })
                .await
            else {
                return; // the pipeline has stopped
            };
            let live = match LiveState::read(&RootFs::host()) {
                Ok(l) => l,
                Err(e) => {
                    log::warn!("node labels: cannot tell which modules are loaded: {e}");
                    continue;
                }
            };
            let (desired, unlabelable) = labels::desired(&declared, &live);
            for m in unlabelable {
                if warned.insert(m.clone()) {
                    log::warn!(
                        "node labels: module {m} has a name no label can carry; not labelled"
                    );
                }
            }
            match labeler.sync(&desired, std::time::Instant::now()).await {
                Ok(labels::Outcome::Patched { set, removed }) => {
                    metrics.node_labels.result("ok");
                    metrics.node_labels.set_applied(desired.len());
                    log::info!(
                        "node labels: node {}: {set} set, {removed} removed ({} now)",
                        labeler.node(),
                        desired.len()
                    );
                }
                Ok(labels::Outcome::Unchanged) => {
                    metrics.node_labels.set_applied(desired.len());
                }
                Ok(labels::Outcome::Deferred) => {}
                Err(e) => {
                    metrics.node_labels.result("error");
                    log::warn!("node labels: node {}: {e}", labeler.node());
                }
            }
        }
    }))
}
