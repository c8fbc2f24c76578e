//! The writer: [`AuditLog`] owns a background thread fed by a bounded queue. Events that cannot
//! be queued or written are counted as lost and reported in the log when writing works again.
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};

use super::config::{AuditConfig, FsyncPolicy};
use super::record::{self, Hash, Meta};
use super::recovery::{self, Recovery};
use super::segment::{self, Segment};
use super::shared::Shared;
use super::{AuditError, compress, io_err, prepare_dir, retention};
use crate::event::Event;
use crate::metrics::Metrics;

/// How often the writer looks at retention and unreported losses when idle.
const TICK: Duration = Duration::from_millis(500);
const RETENTION_EVERY: Duration = Duration::from_secs(30);
/// Most messages handled between two fsyncs under the every-record policy.
const BATCH: usize = 256;

/// What [`AuditLog::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Seq the next record will get.
    pub next_seq: u64,
    /// Torn or unreadable tails cut off (each is also recorded in the log).
    pub recovered: Vec<Recovery>,
    /// Leftover files removed (interrupted compression, segments with no whole record).
    pub removed: Vec<String>,
    /// The segment appended to, when the last one was continued.
    pub continued: Option<String>,
}

/// Counts since [`AuditLog::open`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Records written (events and kmodmon's own records).
    pub records: u64,
    pub events: u64,
    /// Events dropped because the queue was full.
    pub lost_queue_full: u64,
    /// Events dropped because writing failed (disk full, I/O error).
    pub lost_write_error: u64,
    /// Seq of the last record written.
    pub last_seq: u64,
    /// Seq up to which records are fsynced.
    pub durable_seq: u64,
}

impl AuditStats {
    pub fn lost(&self) -> u64 {
        self.lost_queue_full + self.lost_write_error
    }
}

enum Msg {
    Event(Box<Event>),
    Note(String),
    Sync(mpsc::Sender<u64>),
    Close,
}

/// A tamper-evident audit log being written. Cheap to share behind an `Arc`; every method
/// takes `&self`. Dropping it closes the log (like [`AuditLog::close`], ignoring errors).
pub struct AuditLog {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl AuditLog {
    /// Opens (or creates, 0700) the log directory, takes its lock, recovers from a crash
    /// (cuts a torn tail and records that it did), and starts the writer thread.
    pub fn open(
        cfg: AuditConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(AuditLog, OpenReport), AuditError> {
        prepare_dir(&cfg.dir)?;
        let lock = lock_dir(&cfg.dir)?;
        let state = recovery::recover(&cfg.dir)?;
        let last = state.next_seq.saturating_sub(1);
        let shared = Arc::new(Shared {
            metrics,
            records: AtomicU64::new(0),
            events: AtomicU64::new(0),
            lost_queue_full: AtomicU64::new(0),
            lost_write_error: AtomicU64::new(0),
            last_seq: AtomicU64::new(last),
            durable_seq: AtomicU64::new(last),
            active_first_seq: AtomicU64::new(
                state
                    .active
                    .as_ref()
                    .map_or(state.next_seq, |a| a.segment.first_seq),
            ),
            closed_bytes: AtomicU64::new(0),
            closed_segments: AtomicU64::new(0),
            active_len: AtomicU64::new(state.active.as_ref().map_or(u64::MAX, |a| a.len)),
            dir_lock: Mutex::new(()),
        });
        let mut report = OpenReport {
            next_seq: state.next_seq,
            recovered: state.cuts.clone(),
            removed: state.removed.clone(),
            continued: state.active.as_ref().map(|a| a.segment.name()),
        };
        let seg = match &state.active {
            Some(a) => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&a.segment.path)
                    .map_err(io_err("open", &a.segment.path))?;
                // What the previous process wrote may still be only in the page cache.
                file.sync_data().map_err(io_err("fsync", &a.segment.path))?;
                Some(Open {
                    file,
                    segment: a.segment.clone(),
                    len: a.len,
                    started: a.started,
                    records: a.records,
                    needs_repair: false,
                    dirty: false,
                })
            }
            None => None,
        };
        shared.update_usage(&cfg.dir);
        let (hk_tx, hk) = if cfg.compress {
            let (tx, h) = compress::spawn(cfg.dir.clone(), cfg.compression_level, shared.clone())
                .map_err(io_err("start the compression thread for", &cfg.dir))?;
            (Some(tx), Some(h))
        } else {
            (None, None)
        };
        let mut w = Writer {
            cfg,
            shared: shared.clone(),
            _lock: lock,
            seg,
            next_seq: state.next_seq,
            last_hash: state.last_hash,
            reported_queue_full: 0,
            reported_write_error: 0,
            last_error: None,
            failing: false,
            dirty_since: None,
            last_retention: Instant::now(),
            hk_tx,
            hk,
            pending: state
                .cuts
                .iter()
                .map(|cut| Meta::Recovered {
                    time: record::now_rfc3339(),
                    segment: cut.segment.clone(),
                    cut_bytes: cut.cut_bytes,
                    cut_lines: cut.cut_lines,
                })
                .collect(),
        };
        // Recorded now if the disk allows, else before the first record that can be written.
        w.report_lost();
        w.sync();
        report.next_seq = w.next_seq;
        w.publish_bytes();
        let (tx, rx) = mpsc::sync_channel(w.cfg.queue.max(1));
        let dir = w.cfg.dir.clone();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || w.run(rx))
            .map_err(io_err("start the audit writer thread for", &dir))?;
        Ok((
            AuditLog {
                tx,
                shared,
                thread: Mutex::new(Some(thread)),
            },
            report,
        ))
    }

    /// Queues an event without blocking. Returns false, and counts the event as lost, when
    /// the queue is full or the writer has stopped.
    pub fn submit(&self, event: Event) -> bool {
        match self.tx.try_send(Msg::Event(Box::new(event))) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.lost_queue_full.fetch_add(1, Relaxed);
                self.shared
                    .metrics
                    .audit
                    .lost_queue_full
                    .fetch_add(1, Relaxed);
                false
            }
        }
    }

    /// Queues an event, waiting for room. For tools and benchmarks, not for the event reader.
    pub fn submit_blocking(&self, event: Event) -> Result<(), AuditError> {
        self.tx
            .send(Msg::Event(Box::new(event)))
            .map_err(|_| AuditError::WriterGone)
    }

    /// Queues a `note` record (daemon start/stop, policy reload), without blocking.
    pub fn note(&self, message: impl Into<String>) -> bool {
        self.tx.try_send(Msg::Note(message.into())).is_ok()
    }

    /// Waits until everything queued before this call is written and fsynced; returns the
    /// durable seq. Records lost meanwhile are reported in the log first.
    pub fn sync(&self) -> Result<u64, AuditError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Msg::Sync(tx))
            .map_err(|_| AuditError::WriterGone)?;
        rx.recv().map_err(|_| AuditError::WriterGone)
    }

    pub fn stats(&self) -> AuditStats {
        let s = &self.shared;
        AuditStats {
            records: s.records.load(Relaxed),
            events: s.events.load(Relaxed),
            lost_queue_full: s.lost_queue_full.load(Relaxed),
            lost_write_error: s.lost_write_error.load(Relaxed),
            last_seq: s.last_seq.load(Relaxed),
            durable_seq: s.durable_seq.load(Relaxed),
        }
    }

    /// Writes what is queued, fsyncs and stops the writer. Later submits count as lost.
    pub fn close(&self) -> AuditStats {
        let handle = self.thread.lock().ok().and_then(|mut g| g.take());
        if let Some(h) = handle {
            let _ = self.tx.send(Msg::Close);
            if h.join().is_err() {
                log::error!("the audit writer thread panicked");
            }
        }
        self.stats()
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock_dir(dir: &std::path::Path) -> Result<Flock<File>, AuditError> {
    let path = dir.join(segment::LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err("open", &path))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            AuditError::Locked(dir.to_path_buf())
        } else {
            AuditError::Io {
                action: "lock",
                path,
                err: io::Error::from(errno),
            }
        }
    })
}

/// The active segment.
struct Open {
    file: File,
    segment: Segment,
    /// Bytes of whole records in it.
    len: u64,
    started: SystemTime,
    records: u64,
    /// A failed write may have left a partial record past `len`.
    needs_repair: bool,
    dirty: bool,
}

struct Writer {
    cfg: AuditConfig,
    shared: Arc<Shared>,
    _lock: Flock<File>,
    seg: Option<Open>,
    next_seq: u64,
    last_hash: Hash,
    reported_queue_full: u64,
    reported_write_error: u64,
    last_error: Option<String>,
    failing: bool,
    dirty_since: Option<Instant>,
    last_retention: Instant,
    hk_tx: Option<mpsc::Sender<()>>,
    hk: Option<JoinHandle<()>>,
    /// kmodmon's own records waiting to be written (recoveries found at open).
    pending: Vec<Meta>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        'run: loop {
            let mut next = match rx.recv_timeout(self.wait()) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            // Group commit: take what is already queued, then fsync once for all of it. No
            // record counts as durable before the fsync that covers it.
            let mut taken = 0;
            while let Some(msg) = next.take() {
                if !self.handle(msg) {
                    break 'run;
                }
                taken += 1;
                if taken < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if self.cfg.fsync == FsyncPolicy::EveryRecord && self.dirty_since.is_some() {
                self.sync();
            }
            self.tick();
        }
        self.report_lost();
        self.sync();
        drop(self.hk_tx.take());
        if let Some(h) = self.hk.take() {
            let _ = h.join();
        }
    }

    /// Handles one message; false to stop.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Event(ev) => self.write_event(&ev),
            Msg::Note(message) => {
                let meta = Meta::Note {
                    time: record::now_rfc3339(),
                    message,
                };
                if let Err(e) = self.write_meta(&meta) {
                    self.write_failed(&e, false);
                }
            }
            Msg::Sync(reply) => {
                self.report_lost();
                self.sync();
                let _ = reply.send(self.shared.durable_seq.load(Relaxed));
            }
            Msg::Close => return false,
        }
        true
    }

    fn wait(&self) -> Duration {
        match (self.cfg.fsync, self.dirty_since) {
            (FsyncPolicy::Interval(i), Some(since)) => i.saturating_sub(since.elapsed()).min(TICK),
            _ => TICK,
        }
    }

    fn tick(&mut self) {
        if let (FsyncPolicy::Interval(i), Some(since)) = (self.cfg.fsync, self.dirty_since)
            && since.elapsed() >= i
        {
            self.sync();
        }
        self.report_lost();
        if self.last_retention.elapsed() >= RETENTION_EVERY {
            self.retention();
        }
        if self.cfg.fsync == FsyncPolicy::EveryRecord && self.dirty_since.is_some() {
            self.sync();
        }
    }

    fn pending_lost(&self) -> u64 {
        self.shared.lost_queue_full.load(Relaxed) - self.reported_queue_full
            + self.shared.lost_write_error.load(Relaxed)
            - self.reported_write_error
    }

    fn write_event(&mut self, ev: &Event) {
        let body = match serde_json::to_vec(ev) {
            Ok(b) => b,
            Err(e) => {
                self.write_failed(&io::Error::other(e), true);
                return;
            }
        };
        match self.write_body(&body) {
            Ok(()) => {
                self.shared.events.fetch_add(1, Relaxed);
                self.shared.metrics.audit.events.fetch_add(1, Relaxed);
            }
            Err(e) => self.write_failed(&e, true),
        }
    }

    fn write_failed(&mut self, e: &io::Error, lost: bool) {
        if lost {
            self.shared.lost_write_error.fetch_add(1, Relaxed);
            self.shared
                .metrics
                .audit
                .lost_write_error
                .fetch_add(1, Relaxed);
        }
        self.shared.metrics.audit.write_errors.fetch_add(1, Relaxed);
        if !self.failing {
            log::error!(
                "audit log {}: cannot write: {e}; events are counted as lost until writing works again",
                self.cfg.dir.display()
            );
            self.failing = true;
        }
        self.last_error = Some(e.to_string());
    }

    fn write_meta(&mut self, meta: &Meta) -> io::Result<()> {
        let body = serde_json::to_vec(meta).map_err(io::Error::other)?;
        self.write_body(&body)
    }

    /// Rotates if due, reports earlier losses, then appends `body`.
    fn write_body(&mut self, body: &[u8]) -> io::Result<()> {
        self.ensure_segment()?;
        self.write_pending()?;
        self.write_lost_record()?;
        self.append(body)
    }

    fn write_pending(&mut self) -> io::Result<()> {
        while let Some(meta) = self.pending.first() {
            let body = serde_json::to_vec(meta).map_err(io::Error::other)?;
            self.append(&body)?;
            self.pending.remove(0);
        }
        Ok(())
    }

    /// Writes a `lost` record for losses not yet reported, if any.
    fn write_lost_record(&mut self) -> io::Result<()> {
        let qf = self.shared.lost_queue_full.load(Relaxed) - self.reported_queue_full;
        let we = self.shared.lost_write_error.load(Relaxed) - self.reported_write_error;
        if qf + we == 0 {
            return Ok(());
        }
        let meta = Meta::Lost {
            time: record::now_rfc3339(),
            count: qf + we,
            queue_full: qf,
            write_error: we,
            error: self.last_error.clone(),
        };
        let body = serde_json::to_vec(&meta).map_err(io::Error::other)?;
        self.append(&body)?;
        self.reported_queue_full += qf;
        self.reported_write_error += we;
        if self.failing {
            log::warn!(
                "audit log {}: writing again; {} event(s) were lost ({qf} queue full, {we} write errors)",
                self.cfg.dir.display(),
                qf + we
            );
        }
        self.failing = false;
        self.last_error = None;
        Ok(())
    }

    /// Writes pending records and the report of losses, if any.
    fn report_lost(&mut self) {
        if self.pending_lost() == 0 && self.pending.is_empty() {
            return;
        }
        let r = self
            .ensure_segment()
            .and_then(|()| self.write_pending())
            .and_then(|()| self.write_lost_record());
        if let Err(e) = r {
            self.write_failed(&e, false);
        }
    }

    fn ensure_segment(&mut self) -> io::Result<()> {
        if let Some(seg) = &mut self.seg {
            if seg.needs_repair {
                seg.file.set_len(seg.len)?;
                seg.needs_repair = false;
            }
            let full = seg.len >= self.cfg.segment_size;
            let old = self
                .cfg
                .segment_age
                .is_some_and(|a| seg.started.elapsed().is_ok_and(|e| e >= a));
            if seg.records <= 1 || !(full || old) {
                return Ok(());
            }
            self.close_segment();
        }
        self.open_segment()
    }

    fn close_segment(&mut self) {
        self.sync();
        self.seg = None;
        self.publish_bytes();
        if let Some(tx) = &self.hk_tx {
            let _ = tx.send(());
        }
    }

    fn open_segment(&mut self) -> io::Result<()> {
        let name = segment::plain_name(self.next_seq);
        let path = self.cfg.dir.join(&name);
        self.shared.active_first_seq.store(self.next_seq, Relaxed);
        // Only a segment of ours whose header could not be written can have this name.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        segment::sync_dir(&self.cfg.dir)?;
        self.seg = Some(Open {
            file,
            segment: Segment {
                first_seq: self.next_seq,
                compressed: false,
                path: path.clone(),
            },
            len: 0,
            started: SystemTime::now(),
            records: 0,
            needs_repair: false,
            dirty: false,
        });
        let header = Meta::SegmentStart {
            time: record::now_rfc3339(),
            segment: name,
            prev_seq: self.next_seq.checked_sub(1).filter(|s| *s > 0),
            prev_hash: record::to_hex(&self.last_hash),
        };
        let body = serde_json::to_vec(&header).map_err(io::Error::other)?;
        if let Err(e) = self.append(&body) {
            self.seg = None;
            self.publish_bytes();
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.shared.update_usage(&self.cfg.dir);
        self.retention();
        Ok(())
    }

    /// Appends one record to the active segment; on failure the segment is cut back to its
    /// last whole record.
    fn append(&mut self, body: &[u8]) -> io::Result<()> {
        let seg = self
            .seg
            .as_mut()
            .ok_or_else(|| io::Error::other("no open segment"))?;
        let enc = record::encode(self.next_seq, body, &self.last_hash).map_err(io::Error::other)?;
        if enc.line.len() > segment::MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "record of {} bytes is over the {} byte limit",
                    enc.line.len(),
                    segment::MAX_LINE
                ),
            ));
        }
        if let Err(e) = seg.file.write_all(&enc.line) {
            if seg.file.set_len(seg.len).is_err() {
                seg.needs_repair = true;
            }
            return Err(e);
        }
        seg.len += enc.line.len() as u64;
        seg.records += 1;
        seg.dirty = true;
        self.shared.last_seq.store(self.next_seq, Relaxed);
        self.next_seq += 1;
        self.last_hash = enc.hash;
        self.shared.records.fetch_add(1, Relaxed);
        self.shared.metrics.audit.records.fetch_add(1, Relaxed);
        self.publish_bytes();
        // Synced by the run loop: after this batch (every record) or within the interval.
        self.dirty_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    fn publish_bytes(&self) {
        let active = self.seg.as_ref().map_or(u64::MAX, |s| s.len);
        self.shared.active_len.store(active, Relaxed);
        self.shared.publish();
    }

    /// fdatasync the active segment; advances the durable seq on success.
    fn sync(&mut self) {
        self.dirty_since = None;
        let Some(seg) = &mut self.seg else {
            self.shared
                .durable_seq
                .store(self.shared.last_seq.load(Relaxed), Relaxed);
            return;
        };
        if !seg.dirty {
            self.shared
                .durable_seq
                .store(self.shared.last_seq.load(Relaxed), Relaxed);
            return;
        }
        match seg.file.sync_data() {
            Ok(()) => {
                seg.dirty = false;
                self.shared
                    .durable_seq
                    .store(self.shared.last_seq.load(Relaxed), Relaxed);
            }
            Err(e) => {
                self.shared.metrics.audit.fsync_errors.fetch_add(1, Relaxed);
                log::error!(
                    "audit log {}: fsync failed: {e}",
                    seg.segment.path.display()
                );
            }
        }
    }

    /// Deletes old segments per the retention settings, after durably recording which.
    fn retention(&mut self) {
        self.last_retention = Instant::now();
        if self.cfg.retain_segments.is_none() && self.cfg.retain_age.is_none() {
            return;
        }
        let segs = match segment::list(&self.cfg.dir) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("audit log {}: retention: {e}", self.cfg.dir.display());
                return;
            }
        };
        let plan = retention::plan(
            &segs,
            self.shared.active_first_seq.load(Relaxed),
            self.cfg.retain_segments,
            self.cfg.retain_age,
            SystemTime::now(),
            |s| std::fs::metadata(&s.path).and_then(|m| m.modified()).ok(),
        );
        if plan.remove.is_empty() {
            return;
        }
        let meta = Meta::Retention {
            time: record::now_rfc3339(),
            removed: plan.remove.iter().map(Segment::name).collect(),
            kept_from_seq: plan.kept_from_seq,
        };
        // The record goes first: `log verify` accepts a log that starts later only if a
        // retention record says so.
        let written = self
            .ensure_segment()
            .and_then(|()| self.write_pending())
            .and_then(|()| self.write_lost_record())
            .and_then(|()| {
                let body = serde_json::to_vec(&meta).map_err(io::Error::other)?;
                self.append(&body)
            });
        if let Err(e) = written {
            log::error!(
                "audit log {}: cannot record retention ({e}); old segments are kept",
                self.cfg.dir.display()
            );
            return;
        }
        self.sync();
        if self.shared.durable_seq.load(Relaxed) < self.shared.last_seq.load(Relaxed) {
            return;
        }
        {
            let _guard = self.shared.dir_lock.lock();
            for s in &plan.remove {
                retention::remove_segment(s);
            }
            let _ = segment::sync_dir(&self.cfg.dir);
        }
        self.shared.update_usage(&self.cfg.dir);
        self.publish_bytes();
    }
}
