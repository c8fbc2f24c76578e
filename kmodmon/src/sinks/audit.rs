//! The audit log as a sink: events are queued to its writer thread (never blocking the
//! pipeline); at close the writer's own counts say how many were written and how many lost.
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::{Sink, SinkCounters};
use crate::audit::{AuditLog, AuditStats};
use crate::event::Event;

pub struct AuditSink {
    log: Arc<AuditLog>,
    /// The writer's counts when this sink started (the log may have written notes before).
    start: AuditStats,
}

impl AuditSink {
    pub fn new(log: Arc<AuditLog>) -> AuditSink {
        let start = log.stats();
        AuditSink { log, start }
    }

    /// Moves what the writer settled since the last call from pending to emitted / lost.
    fn settle(&mut self, c: &SinkCounters) {
        let now = self.log.stats();
        let written = now.events - self.start.events;
        let full = now.lost_queue_full - self.start.lost_queue_full;
        let failed = now.lost_write_error - self.start.lost_write_error;
        let before = c.report();
        let was_written = before.emitted;
        let was_full = before.lost.get(QUEUE_FULL).copied().unwrap_or(0);
        let was_failed = before.lost.get(WRITE_ERROR).copied().unwrap_or(0);
        let settled = (written - was_written) + (full - was_full) + (failed - was_failed);
        c.emitted(written - was_written);
        c.lost(QUEUE_FULL, full - was_full);
        c.lost(WRITE_ERROR, failed - was_failed);
        c.pending
            .fetch_sub(settled.min(c.pending.load(Relaxed)), Relaxed);
    }
}

/// The writer's queue was full (the disk does not keep up).
pub const QUEUE_FULL: &str = "audit_queue_full";
/// Writing failed (disk full, I/O error).
pub const WRITE_ERROR: &str = "audit_write_error";

impl Sink for AuditSink {
    fn emit(&mut self, ev: &Event, c: &SinkCounters) {
        // Never blocks: a full queue or a failing disk is counted by the log as lost.
        c.pending.fetch_add(1, Relaxed);
        self.log.submit(ev.clone());
    }

    fn flush(&mut self, c: &SinkCounters) {
        self.settle(c);
    }

    fn close(mut self: Box<Self>, c: &SinkCounters) {
        // The daemon closes the log itself (after its last notes); wait for the writer to
        // have written everything queued so far.
        if let Err(e) = self.log.sync() {
            log::warn!("audit log: {e}");
        }
        self.settle(c);
    }
}
