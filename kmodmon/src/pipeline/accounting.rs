//! What happened to every record the pipeline took off a ring buffer, and to every event it
//! made itself. For each sink, exactly:
//!
//! `delivered + delivered_policy + synthesized + summaries = undecodable + queue_full
//!  + in_pipeline + filtered + skipped + emitted + aggregated + lost + pending`
//!
//! `summaries` are the repeat summaries the reader made (from the kernel's repeat records and
//! its open bursts, see [`super::repeats`]); `repeats` is the attempts they stand for, which
//! the kernel counted as `aggregated`.
//!
//! where `in_pipeline` is zero once the pipeline has finished (a forced exit reports it as
//! not written), and `pending` is zero once the sinks are closed.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::sinks::{SinkCounters, SinkReport};

#[derive(Debug)]
pub struct Accounting {
    origin: Instant,
    /// Records taken off the monitor's event ring.
    pub delivered: AtomicU64,
    /// Records taken off the enforcement (policy) ring: denied / would_deny.
    pub delivered_policy: AtomicU64,
    /// Events kmodmon made (expectation, self_load).
    pub synthesized: AtomicU64,
    /// Repeat records taken off the monitor's ring (not events: see `summaries`).
    pub repeat_records: AtomicU64,
    /// Repeat summaries handed on (each stands for `repeat` identical attempts).
    pub summaries: AtomicU64,
    /// The attempts those summaries stand for.
    pub repeats: AtomicU64,
    /// Records that could not be decoded.
    pub undecodable: AtomicU64,
    /// Records lost because the enrich task's queue was full.
    pub queue_full: AtomicU64,
    /// cgroup records lost because the queue was full (the registry rescans on a miss).
    pub cgroup_queue_full: AtomicU64,
    /// Events lost because the sink thread was gone (it failed).
    pub sinks_gone: AtomicU64,
    /// Image records (identity) that fit no capture, or finished captures the enrich queue
    /// had no room for: the loads they belong to say they have no identity.
    pub identity_stray: AtomicU64,
    /// Bytes of packed records queued from the reader to the enrich task (not reported).
    pub queued_bytes: AtomicU64,
    /// Milliseconds since `origin` when the enrich task and the sink thread last turned.
    enrich_turn: AtomicU64,
    sink_turn: AtomicU64,
    sinks: Mutex<Vec<Arc<SinkCounters>>>,
}

impl Default for Accounting {
    fn default() -> Self {
        Accounting {
            origin: Instant::now(),
            delivered: AtomicU64::new(0),
            delivered_policy: AtomicU64::new(0),
            synthesized: AtomicU64::new(0),
            repeat_records: AtomicU64::new(0),
            summaries: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            undecodable: AtomicU64::new(0),
            queue_full: AtomicU64::new(0),
            cgroup_queue_full: AtomicU64::new(0),
            sinks_gone: AtomicU64::new(0),
            identity_stray: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            enrich_turn: AtomicU64::new(0),
            sink_turn: AtomicU64::new(0),
            sinks: Mutex::new(Vec::new()),
        }
    }
}

/// The accounting at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Flow {
    pub delivered: u64,
    pub delivered_policy: u64,
    pub synthesized: u64,
    pub repeat_records: u64,
    pub summaries: u64,
    pub repeats: u64,
    pub undecodable: u64,
    pub queue_full: u64,
    pub cgroup_queue_full: u64,
    pub sinks_gone: u64,
    pub sinks: Vec<SinkReport>,
}

impl Flow {
    /// Everything that entered the pipeline.
    pub fn entered(&self) -> u64 {
        self.delivered + self.delivered_policy + self.synthesized + self.summaries
    }

    /// Lost before reaching any sink.
    pub fn lost_before_sinks(&self) -> u64 {
        self.undecodable + self.queue_full + self.sinks_gone
    }

    /// Events still between the ring and `sink` (0 once the pipeline has finished).
    pub fn in_pipeline(&self, sink: &SinkReport) -> u64 {
        self.entered()
            .saturating_sub(self.lost_before_sinks() + sink.offered())
    }

    /// Whether the identity of the module docs holds exactly for every sink, with nothing
    /// in the pipeline and nothing pending.
    pub fn balanced(&self) -> bool {
        self.sinks.iter().all(|s| {
            s.balanced()
                && s.pending == 0
                && self.entered() == self.lost_before_sinks() + s.offered()
        })
    }
}

impl Accounting {
    pub fn watch_sinks(&self, sinks: Vec<Arc<SinkCounters>>) {
        if let Ok(mut s) = self.sinks.lock() {
            *s = sinks;
        }
    }

    pub fn flow(&self) -> Flow {
        let sinks = self
            .sinks
            .lock()
            .map(|s| s.iter().map(|c| c.report()).collect())
            .unwrap_or_default();
        Flow {
            delivered: self.delivered.load(Relaxed),
            delivered_policy: self.delivered_policy.load(Relaxed),
            synthesized: self.synthesized.load(Relaxed),
            repeat_records: self.repeat_records.load(Relaxed),
            summaries: self.summaries.load(Relaxed),
            repeats: self.repeats.load(Relaxed),
            undecodable: self.undecodable.load(Relaxed),
            queue_full: self.queue_full.load(Relaxed),
            cgroup_queue_full: self.cgroup_queue_full.load(Relaxed),
            sinks_gone: self.sinks_gone.load(Relaxed),
            sinks,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    pub(super) fn enrich_turned(&self) {
        self.enrich_turn.store(self.now_ms(), Relaxed);
    }

    pub(super) fn sink_turned(&self) {
        self.sink_turn.store(self.now_ms(), Relaxed);
    }

    /// Milliseconds since the slower of the enrich task and the sink thread last turned
    /// (they turn at least every second while running).
    pub fn stalled_ms(&self) -> u64 {
        let oldest = self
            .enrich_turn
            .load(Relaxed)
            .min(self.sink_turn.load(Relaxed));
        self.now_ms().saturating_sub(oldest)
    }
}
