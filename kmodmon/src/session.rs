//! A live session, the machinery every front end (`tail`, `run`, `enforce --foreground`)
//! shares: the sensor attached, the host registry read, the enforcer built from it, the
//! pipeline running into the front end's sinks; per-second loss reports; and the end — a
//! first SIGINT/SIGTERM drains everything delivered into the sinks, a second one exits at
//! once and says how many events were not written.
use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{
    enforce::Enforcer,
    enrich::{EnrichOptions, Enricher},
    host::{Registry, RegistryOptions},
    pipeline::{Finished, Flow, Inputs, Pipeline},
    sensor::{
        Options, Sensor,
        counters::{Counters, Snapshot},
        plan::Plan,
    },
    sinks::{Fanout, SinkReport},
};

/// What a session attaches and reads.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    pub sensor: Options,
    pub registry: RegistryOptions,
    pub enrich: EnrichOptions,
    /// Where the module ledger is written (the daemon's), for `kmodmon modules`.
    pub ledger_file: Option<std::path::PathBuf>,
}

pub struct Session {
    pub plan: Plan,
    pub counters: Counters,
    pub pipeline: Pipeline,
    /// Time from start to all programs attached.
    pub attach_ms: u128,
    /// Owns the loaded programs and their links: dropping it detaches everything.
    _sensor: Sensor,
    /// Losses already reported by [`Session::new_losses`].
    reported: BTreeMap<String, u64>,
}

/// The signals that end a session (and SIGHUP, which the daemon answers).
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

/// What a signal asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sig {
    Stop,
    Hangup,
}

impl Signals {
    /// Installs the handlers. Do this first: a signal while attaching must not be lost.
    pub fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }

    pub async fn next(&mut self) -> Sig {
        tokio::select! {
            _ = self.int.recv() => Sig::Stop,
            _ = self.term.recv() => Sig::Stop,
            _ = self.hup.recv() => Sig::Hangup,
        }
    }
}

impl Session {
    /// Attaches the sensor, then reads the host (so nothing created in between is missed:
    /// the cgroup ring has it), lets `enforcer` build the enforcer from the registry (an
    /// error here stops everything before any event flows), and starts the pipeline. `policy`
    /// gives the enforcement ring. Must run inside a tokio runtime.
    pub fn start(
        opts: SessionOptions,
        enforcer: impl FnOnce(&Registry) -> anyhow::Result<Option<Enforcer>>,
        fanout: Fanout,
    ) -> anyhow::Result<Session> {
        let started = Instant::now();
        let mut sensor = Sensor::attach(opts.sensor)?;
        let attach_ms = started.elapsed().as_millis();
        let mut registry_opts = opts.registry;
        // The registry follows the v1 hierarchy the programs read (if any).
        if registry_opts.cgroup_v1.is_none() {
            registry_opts.cgroup_v1 = sensor.plan.cgroup_v1.as_ref().map(|v| v.hierarchy.clone());
        }
        if registry_opts.cgroup_layout.is_none() {
            registry_opts.cgroup_layout = Some(sensor.plan.cgroup_layout);
        }
        let registry = Registry::open(registry_opts);
        let mut enforcer = enforcer(&registry)?;
        let inputs = Inputs {
            events: (!opts.sensor.cgroups_only)
                .then(|| sensor.take_events())
                .transpose()?,
            cgroups: sensor
                .plan
                .cgroups
                .then(|| sensor.take_cgroups())
                .transpose()?,
            policy: enforcer.as_mut().and_then(Enforcer::take_events),
            images: sensor.take_images(),
            ledger_file: opts.ledger_file.clone(),
            repeats: if opts.sensor.cgroups_only {
                None
            } else {
                let window = sensor.plan.repeat_window();
                sensor.take_repeats()?.map(|m| (m, window))
            },
        };
        let counters = sensor.take_counters()?;
        spawn_logger(sensor.take_logger());
        let enricher = Enricher::new(registry, opts.enrich);
        let pipeline = Pipeline::start(inputs, enricher, enforcer, fanout)?;
        Ok(Session {
            plan: sensor.plan.clone(),
            counters,
            pipeline,
            attach_ms,
            _sensor: sensor,
            reported: BTreeMap::new(),
        })
    }

    /// The kernel's and the pipeline's counters now.
    pub fn summary(&self) -> Summary {
        Summary::new(&self.counters.snapshot(), self.pipeline.accounting.flow())
    }

    /// Losses since the last call, by reason (kernel drops, the reader's queue, each sink's).
    pub fn new_losses(&mut self) -> Vec<(String, u64)> {
        let now = self.summary().losses();
        let mut out = Vec::new();
        for (reason, n) in &now {
            let before = self.reported.get(reason).copied().unwrap_or(0);
            if *n > before {
                out.push((reason.clone(), n - before));
            }
        }
        self.reported = now;
        out
    }

    /// Drains the pipeline into the sinks (the reader stopped first). A second SIGINT or
    /// SIGTERM meanwhile exits the process at once, saying how many events were not written.
    pub async fn finish(self, signals: &mut Signals) -> (Finished, Summary) {
        let accounting = self.pipeline.accounting.clone();
        self.pipeline.stop();
        let counters = self.counters;
        // The programs stay attached until everything is written (their rings are read no
        // more, but the counters must stay exact).
        let _sensor = self._sensor;
        let finishing = self.pipeline.finish();
        tokio::pin!(finishing);
        loop {
            tokio::select! {
                f = &mut finishing => {
                    let summary = Summary::new(&counters.snapshot(), Flow {
                        sinks: f.sinks.clone(),
                        ..accounting.flow()
                    });
                    return (f, summary);
                }
                sig = signals.next() => {
                    if sig == Sig::Stop {
                        let s = Summary::new(&counters.snapshot(), accounting.flow());
                        eprintln!(
                            "kmodmon: forced exit: {} delivered events were not written",
                            s.not_written()
                        );
                        std::process::exit(130);
                    }
                }
            }
        }
    }
}

/// The exit (and periodic) accounting. Kernel side:
/// `seen = delivered + aggregated + dropped + in_flight + unread`, and the aggregated attempts
/// `aggregated = repeats + repeats_unreported` (`repeats`: reported in the `summaries`).
/// Pipeline, for each sink: `delivered + delivered_policy + synthesized + summaries = lost
/// before the sinks + filtered + skipped + emitted + aggregated + lost`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub seen: u64,
    pub delivered: u64,
    /// Attempts the kernel counted into repeat bursts instead of sending them.
    pub aggregated: u64,
    pub dropped: u64,
    pub drops: BTreeMap<String, u64>,
    pub in_flight: u64,
    pub unread: u64,
    pub errors: BTreeMap<String, u64>,
    pub counters: BTreeMap<&'static str, u64>,
    pub delivered_policy: u64,
    pub synthesized: u64,
    /// Repeat records read off the ring (their new counts went into `summaries`).
    pub repeat_records: u64,
    /// Repeat summaries handed to the sinks, and the aggregated attempts they stand for.
    pub summaries: u64,
    pub repeats: u64,
    /// Aggregated attempts not (yet) in a summary: in a burst still going on at exit, or in a
    /// repeat record left unread.
    pub repeats_unreported: u64,
    pub undecodable: u64,
    pub queue_full: u64,
    pub cgroup_queue_full: u64,
    pub sinks_gone: u64,
    pub sinks: Vec<SinkReport>,
}

impl Summary {
    pub fn new(snap: &Snapshot, flow: Flow) -> Summary {
        let seen = snap.seen();
        let dropped = snap.dropped();
        let aggregated = snap.aggregated();
        Summary {
            seen,
            delivered: flow.delivered,
            aggregated,
            dropped,
            drops: snap
                .drops()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            in_flight: snap.in_flight,
            unread: seen.saturating_sub(flow.delivered + aggregated + dropped + snap.in_flight),
            errors: snap
                .errors()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            counters: snap.values.clone(),
            delivered_policy: flow.delivered_policy,
            synthesized: flow.synthesized,
            repeat_records: flow.repeat_records,
            summaries: flow.summaries,
            repeats: flow.repeats,
            repeats_unreported: aggregated.saturating_sub(flow.repeats),
            undecodable: flow.undecodable,
            queue_full: flow.queue_full,
            cgroup_queue_full: flow.cgroup_queue_full,
            sinks_gone: flow.sinks_gone,
            sinks: flow.sinks,
        }
    }

    fn flow(&self) -> Flow {
        Flow {
            delivered: self.delivered,
            delivered_policy: self.delivered_policy,
            synthesized: self.synthesized,
            repeat_records: self.repeat_records,
            summaries: self.summaries,
            repeats: self.repeats,
            undecodable: self.undecodable,
            queue_full: self.queue_full,
            cgroup_queue_full: self.cgroup_queue_full,
            sinks_gone: self.sinks_gone,
            sinks: self.sinks.clone(),
        }
    }

    /// Whether every sink's identity holds with nothing left in flight.
    pub fn balanced(&self) -> bool {
        self.flow().balanced()
    }

    /// Events that entered the pipeline and reached no sink's outcome (the most over all
    /// sinks): what a forced exit leaves unwritten.
    pub fn not_written(&self) -> u64 {
        let flow = self.flow();
        flow.sinks
            .iter()
            .map(|s| flow.in_pipeline(s) + s.pending)
            .max()
            .unwrap_or(0)
    }

    /// Every loss so far, by reason: the kernel's drops, the reader's, each sink's.
    pub fn losses(&self) -> BTreeMap<String, u64> {
        let mut m = self.drops.clone();
        for (reason, n) in [
            ("userspace_queue_full", self.queue_full),
            ("undecodable", self.undecodable),
            ("sinks_gone", self.sinks_gone),
        ] {
            if n > 0 {
                m.insert(reason.to_string(), n);
            }
        }
        for s in &self.sinks {
            for (reason, n) in &s.lost {
                if reason != crate::sinks::lines::READER_GONE {
                    m.insert(format!("{}:{reason}", s.name), *n);
                }
            }
        }
        m
    }

    /// One line: the kernel identity, then each sink's.
    pub fn describe(&self) -> String {
        let drops = if self.drops.is_empty() {
            "none".to_string()
        } else {
            self.drops
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = format!(
            "kernel saw {} = delivered {} + aggregated {} + dropped {} + in flight {} + unread at exit {}; drops: {drops}",
            self.seen, self.delivered, self.aggregated, self.dropped, self.in_flight, self.unread
        );
        if self.aggregated > 0 || self.summaries > 0 {
            s.push_str(&format!(
                "; aggregated {} = in {} repeat summaries {} + unreported {}",
                self.aggregated, self.summaries, self.repeats, self.repeats_unreported
            ));
        }
        let lost_before = self.undecodable + self.queue_full + self.sinks_gone;
        for sink in &self.sinks {
            let lost = if sink.lost.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    sink.lost
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            s.push_str(&format!(
                "; {}: delivered {}{}{}{} = emitted {}{} + filtered {} + skipped {} + lost {}{lost} + lost before the sinks {lost_before}",
                sink.name,
                self.delivered,
                if self.delivered_policy > 0 {
                    format!(" + policy {}", self.delivered_policy)
                } else {
                    String::new()
                },
                if self.summaries > 0 {
                    format!(" + summaries {}", self.summaries)
                } else {
                    String::new()
                },
                if self.synthesized > 0 {
                    format!(" + own {}", self.synthesized)
                } else {
                    String::new()
                },
                sink.emitted,
                if sink.aggregated > 0 {
                    format!(" + aggregated {}", sink.aggregated)
                } else {
                    String::new()
                },
                sink.filtered,
                sink.skipped,
                sink.lost_total,
            ));
        }
        s
    }
}

/// Polls the eBPF log ring buffer so `RUST_LOG=debug` shows the programs' diagnostics.
fn spawn_logger(logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>) {
    let Some(logger) = logger else { return };
    // SAFETY: the logger owns its ring buffer's fd for as long as the AsyncFd lives.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = fd else { return };
    tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
