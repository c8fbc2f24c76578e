//! `kmodmon run`: the daemon. Probes and enrichment as in `tail`, with sinks for operations:
//! the tamper-evident audit log, Prometheus metrics, JSON lines on stdout, syslog. It logs its
//! own health on stderr (start, sources, drops, reloads) and into the audit log as notes.
pub mod config;

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

pub use self::config::RunArgs;
use crate::{
    audit::AuditLog,
    enforce::{Enforcer, StartOptions, scan_running},
    enrich::Enricher,
    event::{Clock, Event, raw_from_bytes},
    metrics::{Metrics, MetricsServer},
    output::json_line,
    probe::Options,
    session::{Session, summarize},
    syslog::Syslog,
};

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
            .parse::<crate::syslog::Facility>()
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
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let metrics = Arc::new(Metrics::new());
    let audit = match cfg.audit.clone() {
        Some(a) => {
            let dir = a.dir.clone();
            let (log, report) = AuditLog::open(a, metrics.clone())
                .with_context(|| format!("opening the audit log in {}", dir.display()))?;
            log::info!("audit log {}: {report:?}", dir.display());
            Some(log)
        }
        None => {
            log::warn!(
                "no audit log configured (--audit-dir or [audit] dir): events are not recorded"
            );
            None
        }
    };
    let syslog = if cfg.forward.syslog {
        let facility = cfg
            .forward
            .syslog_facility
            .parse()
            .map_err(|e| anyhow::anyhow!("syslog facility: {e}"))?;
        Some(
            Syslog::connect(&cfg.forward.syslog_socket, facility).with_context(|| {
                format!(
                    "connecting to syslog at {} (is a syslog daemon running?)",
                    cfg.forward.syslog_socket.display()
                )
            })?,
        )
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
        tokio::spawn(async move {
            if let Err(e) = server.serve(m).await {
                log::error!("metrics server stopped: {e}");
            }
        });
    }

    // Enforcement first: if a policy is configured and cannot be enforced, refuse to start
    // rather than pretend.
    let mut enforcer = match &cfg.policy {
        Some(path) => {
            let enf = Enforcer::start(StartOptions::new(path))
                .with_context(|| format!("enforcing the policy {}", path.display()))?;
            log::info!(
                "policy {} in force (mode {}, {:?}, {} containers mapped)",
                path.display(),
                enf.mode(),
                enf.installed,
                enf.container_count()
            );
            Some(enf)
        }
        None => None,
    };
    let mut policy_events = enforcer.as_mut().and_then(Enforcer::take_events);
    let clock = Clock::new();

    let opts = Options {
        no_fexit: cfg.probe.no_fexit,
        force_raw_syscalls: cfg.probe.force_raw_syscalls,
    };
    let mut session = Session::start(opts, Enricher::new())?;
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

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut policy_tick = tokio::time::interval(Duration::from_millis(200));
    let mut last = session.summary();
    let sinks = Sinks {
        metrics: &metrics,
        stdout: cfg.forward.stdout,
        syslog: syslog.as_ref(),
        audit: audit.as_ref(),
    };
    loop {
        tokio::select! {
            ev = session.events.recv() => {
                let Some(ev) = ev else { break };
                sinks.deliver(ev);
            }
            _ = policy_tick.tick(), if policy_events.is_some() => {
                // Denials recorded by the pinned LSM programs, including any made while the
                // daemon was down.
                if let (Some(ring), Some(enf)) = (policy_events.as_mut(), enforcer.as_ref()) {
                    while let Some(item) = ring.next() {
                        match raw_from_bytes(&item).and_then(|r| Event::from_raw(&r, &clock)) {
                            Ok(mut ev) => {
                                enf.describe(&mut ev);
                                sinks.deliver(ev);
                            }
                            Err(e) => log::warn!("undecodable policy record: {e}"),
                        }
                    }
                }
            }
            _ = tick.tick() => {
                metrics.health.beat();
                // Keep the policy maps current as containers come and go.
                if let Some(enf) = enforcer.as_mut()
                    && let Err(e) = enf.sync(scan_running())
                {
                    log::warn!("updating the policy maps failed: {e}");
                }
                let now = session.summary();
                for (reason, n) in &now.drops {
                    let before = last.drops.get(reason).copied().unwrap_or(0);
                    if *n > before {
                        metrics.drop_events(reason, n - before);
                        let msg = format!("dropped {} events ({reason})", n - before);
                        log::warn!("{msg}");
                        if let Some(log) = &audit {
                            log.note(msg);
                        }
                    }
                }
                last = now;
            }
            _ = sighup.recv() => {
                let msg = match enforcer.as_mut() {
                    Some(enf) => match enf.reload(None) {
                        Ok(()) => format!("SIGHUP: policy reloaded (mode {})", enf.mode()),
                        Err(e) => format!(
                            "SIGHUP: new policy rejected, the previous one stays in force: {e}"
                        ),
                    },
                    None => "SIGHUP: no policy configured; the config file is read at start \
                             (restart to apply changes)"
                        .to_string(),
                };
                log::warn!("{msg}");
                if let Some(log) = &audit {
                    log.note(msg);
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    let summary = summarize(&session.counters.snapshot(), &session.accounting);
    let text = format!(
        "stopping: kernel saw {} = delivered {} + dropped {} + in flight {} + unread {}",
        summary.seen, summary.delivered, summary.dropped, summary.in_flight, summary.unread
    );
    eprintln!("kmodmon: {text}");
    if let Some(enf) = enforcer {
        // Pins stay: enforcement outlives the daemon; `kmodmon enforce off` removes it.
        if let Err(e) = enf.shutdown(false) {
            log::warn!("leaving enforcement in place: {e}");
        }
    }
    if let Some(log) = &audit {
        log.note(text);
        let stats = log.close();
        eprintln!("kmodmon: audit log closed: {stats:?}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Where every event goes.
struct Sinks<'a> {
    metrics: &'a Metrics,
    stdout: bool,
    syslog: Option<&'a Syslog>,
    audit: Option<&'a AuditLog>,
}

impl Sinks<'_> {
    fn deliver(&self, ev: Event) {
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics.event(&ev);
        if self.stdout {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{}", json_line(&ev))
                .and_then(|_| out.flush())
                .is_err()
            {
                self.metrics.forward.stdout_errors.fetch_add(1, Relaxed);
            }
        }
        if let Some(s) = self.syslog {
            let counter = match s.send_event(&ev) {
                Ok(()) => &self.metrics.forward.syslog_sent,
                Err(_) => &self.metrics.forward.syslog_errors,
            };
            counter.fetch_add(1, Relaxed);
        }
        if let Some(log) = self.audit {
            // Never blocks: a full queue or a failing disk is counted as lost.
            log.submit(ev);
        }
    }
}
