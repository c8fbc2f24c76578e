//! State shared by the audit log's caller side, its writer thread and its compression thread
//! (its own module, so the writer and the compressor both use it without using each other).
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[cfg(test)]
use std::sync::atomic::AtomicU32;

use super::segment::{self, Segment};
use super::verify::Anchor;
use crate::metrics::Metrics;

/// Counters shared by the caller side and the writer thread.
pub(crate) struct Shared {
    pub metrics: Arc<Metrics>,
    pub records: AtomicU64,
    pub events: AtomicU64,
    /// Events represented by `rate_limited` summary records written.
    pub aggregated: AtomicU64,
    pub lost_queue_full: AtomicU64,
    pub lost_write_error: AtomicU64,
    pub lost_suspended: AtomicU64,
    pub lost_notes: AtomicU64,
    pub unsure: AtomicU64,
    /// Events queued for the writer and not taken yet (bounded by the `queue` setting).
    pub queued: AtomicU64,
    /// Seq and hash of the last record an fsync covered.
    pub head: Mutex<Option<Anchor>>,
    #[cfg(test)]
    pub fail_fsyncs: AtomicU32,
    pub last_seq: AtomicU64,
    pub durable_seq: AtomicU64,
    /// First seq of the segment being written (closed segments are all below it).
    pub active_first_seq: AtomicU64,
    /// Bytes and count of closed segments, as last measured.
    pub closed_bytes: AtomicU64,
    pub closed_segments: AtomicU64,
    /// Bytes of the active segment; `u64::MAX` when none is open.
    pub active_len: AtomicU64,
    /// Held while files are renamed or removed (compression vs retention).
    pub dir_lock: Mutex<()>,
}

impl Shared {
    pub(super) fn count_lost_note(&self) {
        self.lost_notes.fetch_add(1, Relaxed);
        self.metrics.audit.lost_notes.fetch_add(1, Relaxed);
    }

    pub(super) fn count_lost_suspended(&self, n: u64) {
        self.lost_suspended.fetch_add(n, Relaxed);
        self.metrics.audit.lost_suspended.fetch_add(n, Relaxed);
    }

    pub fn update_usage(&self, dir: &std::path::Path) {
        let active = self.active_first_seq.load(Relaxed);
        if let Ok(segs) = segment::list(dir) {
            let closed: Vec<&Segment> = segs.iter().filter(|s| s.first_seq < active).collect();
            let bytes = closed
                .iter()
                .map(|s| std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0))
                .sum();
            self.closed_bytes.store(bytes, Relaxed);
            self.closed_segments.store(closed.len() as u64, Relaxed);
        }
        self.publish();
    }

    /// Sets the log size gauges.
    pub fn publish(&self) {
        let active = self.active_len.load(Relaxed);
        let m = &self.metrics.audit;
        let (bytes, open) = if active == u64::MAX {
            (0, 0)
        } else {
            (active, 1)
        };
        m.bytes
            .store(self.closed_bytes.load(Relaxed) + bytes, Relaxed);
        m.segments
            .store(self.closed_segments.load(Relaxed) + open, Relaxed);
    }
}
