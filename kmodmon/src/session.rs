//! A live monitoring session: probes attached, the pipeline running, counters at hand. Shared by
//! `kmodmon tail` and `kmodmon run`.
use std::{sync::Arc, time::Instant};

use crate::{
    enrich::Enricher,
    event::Event,
    pipeline::{self, Accounting},
    probe::{
        Options, Probe,
        counters::{Counters, Snapshot},
        plan::Plan,
    },
};

pub struct Session {
    pub plan: Plan,
    pub counters: Counters,
    pub accounting: Arc<Accounting>,
    /// Enriched events, in kernel order.
    pub events: tokio::sync::mpsc::Receiver<Event>,
    /// Time from start to all programs attached.
    pub attach_ms: u128,
    /// Owns the loaded programs and their links: dropping it detaches everything.
    pub probe: Probe,
}

/// The exit/periodic accounting: seen = delivered + dropped + in flight + unread.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub seen: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub drops: std::collections::BTreeMap<String, u64>,
    pub in_flight: u64,
    pub unread: u64,
    pub undecodable: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
    pub counters: std::collections::BTreeMap<&'static str, u64>,
}

impl Session {
    /// Attaches the probes and starts the pipeline. Must run inside a tokio runtime.
    pub fn start(opts: Options, enricher: Enricher) -> anyhow::Result<Session> {
        let started = Instant::now();
        let mut probe = Probe::attach(opts)?;
        let events = probe.take_events()?;
        let cgroups = probe.take_cgroups()?;
        let counters = probe.take_counters()?;
        spawn_logger(probe.take_logger());
        let accounting = Arc::new(Accounting::default());
        let rx = pipeline::start(events, cgroups, enricher, accounting.clone())?;
        Ok(Session {
            plan: probe.plan.clone(),
            counters,
            accounting,
            events: rx,
            attach_ms: started.elapsed().as_millis(),
            probe,
        })
    }

    /// The kernel's and userspace's counters now.
    pub fn summary(&self) -> Summary {
        summarize(&self.counters.snapshot(), &self.accounting)
    }
}

pub fn summarize(snap: &Snapshot, acc: &Accounting) -> Summary {
    let seen = snap.seen();
    let dropped = snap.dropped();
    let delivered = acc.delivered();
    let mut drops: std::collections::BTreeMap<String, u64> = snap
        .drops()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    if acc.queue_full() > 0 {
        drops.insert("userspace_queue_full".to_string(), acc.queue_full());
    }
    Summary {
        seen,
        delivered,
        dropped,
        drops,
        in_flight: snap.in_flight,
        unread: seen.saturating_sub(delivered + dropped + snap.in_flight),
        undecodable: acc.undecodable(),
        errors: snap
            .errors()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        counters: snap.values.clone(),
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
