//! The audit log as a sink: events are serialised here (on the sink thread) and queued to its
//! writer thread in batches (never blocking the pipeline; the writer chains and writes a batch
//! with one write(2)), attempts beyond a cgroup's rate limit are aggregated into `rate_limited`
//! summary records ([`crate::ratelimit`]); the writer's own counts then say how many were
//! written, aggregated and lost.
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::{Sink, SinkCounters};
use crate::audit::{AuditLog, AuditStats};
use crate::event::Event;
use crate::ratelimit::{Admit, RateLimiter};

pub struct AuditSink {
    log: Arc<AuditLog>,
    limiter: Option<RateLimiter>,
    /// The writer's counts when this sink started (the log may have written notes before).
    start: AuditStats,
    /// Serialised events not handed to the writer yet.
    batch: Vec<Vec<u8>>,
}

/// Events handed to the writer at once at most (more wait for the next flush).
const BATCH: usize = 256;

/// The writer's queue was full (the disk does not keep up).
pub const QUEUE_FULL: &str = "audit_queue_full";
/// Writing failed (disk full, I/O error).
pub const WRITE_ERROR: &str = "audit_write_error";
/// Writing is suspended (`disk_full_action = "suspend"`).
pub const SUSPENDED: &str = "audit_suspended";

impl AuditSink {
    pub fn new(log: Arc<AuditLog>, limiter: Option<RateLimiter>) -> AuditSink {
        let start = log.stats();
        AuditSink {
            log,
            limiter,
            start,
            batch: Vec::with_capacity(BATCH),
        }
    }

    /// Hands the batch to the writer (what its queue cannot take is counted lost by the log).
    fn submit(&mut self) {
        if !self.batch.is_empty() {
            let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
            self.log.submit_bodies(batch);
        }
    }

    /// Brings the sink's counters up to what the writer has settled.
    fn settle(&mut self, c: &SinkCounters) {
        let now = self.log.stats();
        let s = &self.start;
        let before = c.report();
        let lost = |r: &str| before.lost.get(r).copied().unwrap_or(0);
        let written = (now.events - s.events).saturating_sub(before.emitted);
        let aggregated = (now.aggregated - s.aggregated).saturating_sub(before.aggregated);
        let full = (now.lost_queue_full - s.lost_queue_full).saturating_sub(lost(QUEUE_FULL));
        let failed = (now.lost_write_error - s.lost_write_error).saturating_sub(lost(WRITE_ERROR));
        let suspended = (now.lost_suspended - s.lost_suspended).saturating_sub(lost(SUSPENDED));
        c.emitted(written);
        c.aggregated.fetch_add(aggregated, Relaxed);
        c.lost(QUEUE_FULL, full);
        c.lost(WRITE_ERROR, failed);
        c.lost(SUSPENDED, suspended);
        let settled = written + aggregated + full + failed + suspended;
        let _ = c
            .pending
            .fetch_update(Relaxed, Relaxed, |p| Some(p.saturating_sub(settled)));
    }

    fn submit_summaries(&mut self, summaries: Vec<crate::ratelimit::Summary>) {
        for s in summaries {
            // A summary the queue cannot take is counted lost by the log, like an event.
            self.log.submit_summary(s);
        }
    }
}

impl Sink for AuditSink {
    fn emit(&mut self, ev: &Event, c: &SinkCounters) {
        c.pending.fetch_add(1, Relaxed);
        let admit = self.limiter.as_mut().map_or(Admit::Record, |l| l.admit(ev));
        if admit == Admit::Record {
            match crate::audit::event_body(ev) {
                Ok(body) => self.batch.push(body),
                Err(e) => {
                    log::error!("audit log: cannot serialise an event: {e}");
                    self.log.count_unwritable(1);
                }
            }
            if self.batch.len() >= BATCH {
                // Never blocks: a full queue or a failing disk is counted by the log as lost.
                self.submit();
            }
        }
    }

    fn flush(&mut self, c: &SinkCounters) {
        self.submit();
        self.settle(c);
    }

    fn tick(&mut self, c: &SinkCounters) {
        self.submit();
        if let Some(l) = self.limiter.as_mut() {
            let due = l.due(Instant::now());
            self.submit_summaries(due);
        }
        self.settle(c);
    }

    fn close(mut self: Box<Self>, c: &SinkCounters) {
        self.submit();
        if let Some(l) = self.limiter.as_mut() {
            let rest = l.flush();
            self.submit_summaries(rest);
        }
        // The daemon closes the log itself (after its last notes); wait for the writer to
        // have written everything queued so far.
        if let Err(e) = self.log.sync() {
            log::warn!("audit log: {e}");
        }
        self.settle(c);
    }
}
