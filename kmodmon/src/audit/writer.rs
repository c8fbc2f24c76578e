//! The writer: [`AuditLog`] owns a background thread fed by a bounded queue. Events that cannot
//! be queued or written are counted as lost and reported in the log when writing works again.
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
#[cfg(test)]
use std::sync::atomic::AtomicU32;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};

use super::config::{AuditConfig, DiskFullAction, FsyncPolicy};
use super::record::{self, Hash, Meta};
use super::recovery::{self, Recovery};
use super::segment::{self, Segment};
use super::shared::Shared;
use super::verify::Anchor;
use super::{AuditError, compress, io_err, prepare_dir, retention};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::ratelimit::Summary;

/// Bytes kept free in the log directory (the file `.reserve`) so that, on a full disk,
/// retention can still write the record of what it deletes before deleting it.
pub const RESERVE: u64 = 16 << 10;
/// The reserve file's name.
pub const RESERVE_FILE: &str = ".reserve";
/// Free bytes after which suspended writing resumes (`disk_full_action = "suspend"`).
pub const RESUME_FREE: u64 = 64 << 10;

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
}

/// Bytes available to unprivileged writers on the file system holding `dir`.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// How often the writer looks at retention and unreported losses when idle.
const TICK: Duration = Duration::from_millis(500);
const RETENTION_EVERY: Duration = Duration::from_secs(30);
/// Most messages handled between two fsyncs under the every-record policy.
const BATCH: usize = 256;
/// Most events written together (with one write(2)); bounds the writer's memory.
const GROUP: usize = 1024;

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
    /// Events represented by `rate_limited` summary records written (not written one by one).
    pub aggregated: u64,
    /// Events dropped because the queue was full.
    pub lost_queue_full: u64,
    /// Events dropped because writing failed (disk full, I/O error).
    pub lost_write_error: u64,
    /// Events not written while writing was suspended for a full disk.
    pub lost_suspended: u64,
    /// kmodmon's own records (notes) not written.
    pub lost_notes: u64,
    /// Records written before an fsync that failed: they may not be on disk (each range is
    /// named in a `sync_failed` record).
    pub unsure: u64,
    /// Seq of the last record written.
    pub last_seq: u64,
    /// Seq up to which records are covered by a successful fsync (the `unsure` ones excepted).
    pub durable_seq: u64,
}

impl AuditStats {
    /// Events lost, all reasons.
    pub fn lost(&self) -> u64 {
        self.lost_queue_full + self.lost_write_error + self.lost_suspended
    }
}

enum Msg {
    Event(Box<Event>),
    /// Events already serialised ([`event_body`]), written together.
    Bodies(Vec<Vec<u8>>),
    Note(String),
    Summary(Box<Summary>),
    Sync(mpsc::Sender<u64>),
    Close,
}

/// A tamper-evident audit log being written. Cheap to share behind an `Arc`; every method
/// takes `&self`. Dropping it closes the log (like [`AuditLog::close`], ignoring errors).
pub struct AuditLog {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    /// Events the queue holds at most.
    queue: u64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl AuditLog {
    /// Opens (or creates, 0700) the log directory, takes its lock, recovers from a crash
    /// (cuts a torn tail and records that it did), and starts the writer thread.
    pub fn open(
        cfg: AuditConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(AuditLog, OpenReport), AuditError> {
        cfg.validate().map_err(AuditError::Config)?;
        prepare_dir(&cfg.dir)?;
        let lock = lock_dir(&cfg.dir)?;
        let state = recovery::recover(&cfg.dir)?;
        let last = state.next_seq.saturating_sub(1);
        let shared = Arc::new(Shared {
            metrics,
            records: AtomicU64::new(0),
            events: AtomicU64::new(0),
            aggregated: AtomicU64::new(0),
            lost_queue_full: AtomicU64::new(0),
            lost_write_error: AtomicU64::new(0),
            lost_suspended: AtomicU64::new(0),
            lost_notes: AtomicU64::new(0),
            unsure: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            head: Mutex::new(None),
            #[cfg(test)]
            fail_fsyncs: AtomicU32::new(0),
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
            reported_suspended: 0,
            reported_notes: 0,
            logged_losses: state.losses,
            suspended_since: None,
            room_exhausted: false,
            in_removal: false,
            unsure_to: 0,
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
        w.ensure_reserve();
        // Recorded now if the disk allows, else before the first record that can be written.
        w.report_lost();
        w.sync();
        report.next_seq = w.next_seq;
        w.publish_bytes();
        let (tx, rx) = mpsc::sync_channel(w.cfg.queue.max(1));
        let queue = w.cfg.queue.max(1) as u64;
        let dir = w.cfg.dir.clone();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || w.run(rx))
            .map_err(io_err("start the audit writer thread for", &dir))?;
        Ok((
            AuditLog {
                tx,
                shared,
                queue,
                thread: Mutex::new(Some(thread)),
            },
            report,
        ))
    }

    /// Takes room for `n` events in the queue; how many fit.
    fn reserve(&self, n: u64) -> u64 {
        let mut got = 0;
        let _ = self.shared.queued.fetch_update(Relaxed, Relaxed, |q| {
            got = n.min(self.queue.saturating_sub(q));
            Some(q + got)
        });
        got
    }

    fn count_queue_full(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.shared.lost_queue_full.fetch_add(n, Relaxed);
        self.shared
            .metrics
            .audit
            .lost_queue_full
            .fetch_add(n, Relaxed);
    }

    /// Queues events serialised by [`event_body`] without blocking, to be written together
    /// (one write(2) and, per the fsync policy, one fdatasync for all of them). Those beyond
    /// the queue's room are counted lost (queue full); returns how many were queued.
    pub fn submit_bodies(&self, mut bodies: Vec<Vec<u8>>) -> u64 {
        let n = bodies.len() as u64;
        if n == 0 {
            return 0;
        }
        let got = self.reserve(n);
        bodies.truncate(got as usize);
        self.count_queue_full(n - got);
        if got == 0 {
            return 0;
        }
        if self.tx.try_send(Msg::Bodies(bodies)).is_err() {
            self.shared.queued.fetch_sub(got, Relaxed);
            self.count_queue_full(got);
            return 0;
        }
        got
    }

    /// Counts an event that could not be serialised as lost (a write error).
    pub fn count_unwritable(&self, n: u64) {
        self.shared.lost_write_error.fetch_add(n, Relaxed);
        self.shared
            .metrics
            .audit
            .lost_write_error
            .fetch_add(n, Relaxed);
    }

    /// Queues an event without blocking. Returns false, and counts the event as lost, when
    /// the queue is full or the writer has stopped.
    pub fn submit(&self, event: Event) -> bool {
        if self.reserve(1) == 0 {
            self.count_queue_full(1);
            return false;
        }
        match self.tx.try_send(Msg::Event(Box::new(event))) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.queued.fetch_sub(1, Relaxed);
                self.count_queue_full(1);
                false
            }
        }
    }

    /// Queues an event, waiting for room. For tools and benchmarks, not for the event reader.
    pub fn submit_blocking(&self, event: Event) -> Result<(), AuditError> {
        // The wait is on the channel; the event count may run over the queue setting here.
        self.shared.queued.fetch_add(1, Relaxed);
        self.tx.send(Msg::Event(Box::new(event))).map_err(|_| {
            self.shared.queued.fetch_sub(1, Relaxed);
            AuditError::WriterGone
        })
    }

    /// Queues a `note` record (daemon start/stop, drops, policy reload), without blocking.
    /// A note that cannot be queued is counted (`lost_notes`, reported in the next `lost`
    /// record and in `kmodmon_audit_lost_records_total{reason="note"}`), never dropped silently.
    pub fn note(&self, message: impl Into<String>) -> bool {
        let ok = self.tx.try_send(Msg::Note(message.into())).is_ok();
        if !ok {
            self.shared.count_lost_note();
        }
        ok
    }

    /// Queues a rate-limit summary (see [`crate::ratelimit`]) as a `rate_limited` record,
    /// without blocking. When it cannot be queued, the events it stands for are counted lost
    /// (queue full), like events.
    pub fn submit_summary(&self, summary: Summary) -> bool {
        let count = summary.count;
        match self.tx.try_send(Msg::Summary(Box::new(summary))) {
            Ok(()) => true,
            Err(_) => {
                self.shared.lost_queue_full.fetch_add(count, Relaxed);
                self.shared
                    .metrics
                    .audit
                    .lost_queue_full
                    .fetch_add(count, Relaxed);
                false
            }
        }
    }

    /// The chain head: seq and hash of the last record an fsync covered (`None` before the
    /// first). Emit it as an anchor ([`Anchor::line`]) to syslog, the journal or stdout, so
    /// that `kmodmon log verify --anchor-from` can later catch records cut from the log's end.
    pub fn head(&self) -> Option<Anchor> {
        self.shared.head.lock().ok().and_then(|h| *h)
    }

    /// Test hook: the next `n` fsyncs fail with EIO.
    #[cfg(test)]
    pub(crate) fn fail_next_fsyncs(&self, n: u32) {
        self.shared.fail_fsyncs.store(n, Relaxed);
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
            aggregated: s.aggregated.load(Relaxed),
            lost_queue_full: s.lost_queue_full.load(Relaxed),
            lost_write_error: s.lost_write_error.load(Relaxed),
            lost_suspended: s.lost_suspended.load(Relaxed),
            lost_notes: s.lost_notes.load(Relaxed),
            unsure: s.unsure.load(Relaxed),
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

/// An event as the audit log writes it: sanitised (every string made safe to show) and
/// serialised as a JSON object. The sink does this on its own thread, the writer only chains
/// and writes.
pub fn event_body(ev: &Event) -> io::Result<Vec<u8>> {
    // An attempt's record is about 600 bytes: one allocation, no regrowth.
    let mut body = Vec::with_capacity(1024);
    serde_json::to_writer(&mut body, &*crate::escape::sanitize_event(ev))
        .map_err(io::Error::other)?;
    Ok(body)
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
    reported_suspended: u64,
    reported_notes: u64,
    /// What the log's records have stated lost so far (its oldest `segment_start`'s
    /// `lost_before` included): the next `segment_start` carries it on.
    logged_losses: record::LossTally,
    /// Writing is suspended for a full disk (`disk_full_action = "suspend"`) since then.
    suspended_since: Option<Instant>,
    /// A full disk found no closed segment to delete; set back when a record fits again.
    room_exhausted: bool,
    /// Segments are being removed (no nested retention from a rotation meanwhile).
    in_removal: bool,
    /// The last seq of a range whose fsync failed: the head never points at or before it
    /// until a later record is fsynced.
    unsure_to: u64,
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
            // Group commit: take what is already queued, write the events among it together
            // (one write(2)), then fsync once for all of it. No record counts as durable before
            // the fsync that covers it.
            let mut taken = 0;
            let mut bodies: Vec<Vec<u8>> = Vec::new();
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Event(ev) => {
                        self.shared.queued.fetch_sub(1, Relaxed);
                        match event_body(&ev) {
                            Ok(b) => bodies.push(b),
                            Err(e) => self.write_failed(&e, true),
                        }
                    }
                    Msg::Bodies(b) => {
                        self.shared.queued.fetch_sub(b.len() as u64, Relaxed);
                        if bodies.is_empty() {
                            bodies = b;
                        } else {
                            bodies.extend(b);
                        }
                    }
                    other => {
                        // In order: what came before is written first.
                        self.write_bodies(std::mem::take(&mut bodies));
                        if !self.handle(other) {
                            break 'run;
                        }
                    }
                }
                taken += 1;
                if taken < BATCH && bodies.len() < GROUP {
                    next = rx.try_recv().ok();
                }
            }
            self.write_bodies(bodies);
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
            Msg::Event(ev) => {
                self.shared.queued.fetch_sub(1, Relaxed);
                match event_body(&ev) {
                    Ok(b) => self.write_bodies(vec![b]),
                    Err(e) => self.write_failed(&e, true),
                }
            }
            Msg::Bodies(b) => {
                self.shared.queued.fetch_sub(b.len() as u64, Relaxed);
                self.write_bodies(b);
            }
            Msg::Note(message) => {
                if self.suspended_since.is_some() {
                    self.shared.count_lost_note();
                    return true;
                }
                let meta = Meta::Note {
                    time: record::now_rfc3339(),
                    message,
                };
                if let Err(e) = self.write_meta(&meta) {
                    self.shared.count_lost_note();
                    self.write_failed(&e, false);
                }
            }
            Msg::Summary(summary) => {
                let count = summary.count;
                if self.suspended_since.is_some() {
                    self.shared.count_lost_suspended(count);
                    return true;
                }
                match self.write_meta(&Meta::RateLimited(*summary)) {
                    Ok(()) => {
                        self.shared.aggregated.fetch_add(count, Relaxed);
                        self.shared
                            .metrics
                            .audit
                            .rate_limited
                            .fetch_add(count, Relaxed);
                    }
                    Err(e) => {
                        // The events it stands for are lost; count them as such.
                        self.write_failed(&e, true);
                        if count > 1 {
                            self.shared.lost_write_error.fetch_add(count - 1, Relaxed);
                            self.shared
                                .metrics
                                .audit
                                .lost_write_error
                                .fetch_add(count - 1, Relaxed);
                        }
                    }
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
        self.try_resume();
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
            + self.shared.lost_suspended.load(Relaxed)
            - self.reported_suspended
            + self.shared.lost_notes.load(Relaxed)
            - self.reported_notes
    }

    /// Writes events (serialised by [`event_body`]): all of them with one write(2) when nothing
    /// else is due first, else one by one (rotation, reports, a full disk are handled there).
    fn write_bodies(&mut self, bodies: Vec<Vec<u8>>) {
        if bodies.is_empty() {
            return;
        }
        let done = if self.suspended_since.is_none() {
            self.append_group(&bodies)
        } else {
            0
        };
        self.count_events(done as u64);
        for body in &bodies[done..] {
            if self.suspended_since.is_some() {
                self.shared.count_lost_suspended(1);
                continue;
            }
            match self.write_body(body) {
                Ok(()) => self.count_events(1),
                Err(e) => self.write_failed(&e, true),
            }
        }
    }

    fn count_events(&self, n: u64) {
        if n > 0 {
            self.shared.events.fetch_add(n, Relaxed);
            self.shared.metrics.audit.events.fetch_add(n, Relaxed);
        }
    }

    /// Whether the active segment is due to be closed before `extra` more bytes.
    fn rotation_due(&self, extra: u64) -> bool {
        let Some(seg) = &self.seg else {
            return true;
        };
        let full = seg.len + extra >= self.cfg.segment_size;
        let old = self
            .cfg
            .segment_age
            .is_some_and(|a| seg.started.elapsed().is_ok_and(|e| e >= a));
        full || (seg.records > 1 && old)
    }

    /// The fast path: appends every body with a single write(2), when the segment is open and
    /// sound, no other record is waiting to go first and the batch fits the segment. Returns
    /// how many were written (0 or all: on any failure the segment is cut back and the slow
    /// path writes them one by one, with its handling of full disks and rotation).
    fn append_group(&mut self, bodies: &[Vec<u8>]) -> usize {
        if !self.pending.is_empty() || self.pending_lost() > 0 {
            return 0;
        }
        match &self.seg {
            Some(seg) if !seg.needs_repair => {}
            _ => return 0,
        }
        let mut buf = Vec::with_capacity(bodies.iter().map(|b| b.len() + 128).sum());
        let (mut seq, mut hash) = (self.next_seq, self.last_hash);
        for body in bodies {
            let start = buf.len();
            match record::encode_into(&mut buf, seq, body, &hash) {
                Ok(h) if buf.len() - start <= segment::MAX_LINE => hash = h,
                _ => return 0,
            }
            seq += 1;
        }
        if self.rotation_due(buf.len() as u64) {
            return 0;
        }
        let Some(seg) = self.seg.as_mut() else {
            return 0;
        };
        if seg.file.write_all(&buf).is_err() {
            if seg.file.set_len(seg.len).is_err() {
                seg.needs_repair = true;
            }
            return 0;
        }
        let n = bodies.len();
        seg.len += buf.len() as u64;
        seg.records += n as u64;
        seg.dirty = true;
        self.room_exhausted = false;
        self.shared.last_seq.store(seq - 1, Relaxed);
        self.next_seq = seq;
        self.last_hash = hash;
        self.shared.records.fetch_add(n as u64, Relaxed);
        self.shared
            .metrics
            .audit
            .records
            .fetch_add(n as u64, Relaxed);
        self.publish_bytes();
        self.dirty_since.get_or_insert_with(Instant::now);
        n
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

    /// Rotates if due, reports earlier losses, then appends `body`. On a full disk, applies
    /// the disk-full action and tries again while it made room.
    fn write_body(&mut self, body: &[u8]) -> io::Result<()> {
        loop {
            match self.append_after_reports(body) {
                Err(e) if is_no_space(&e) => {
                    if !self.disk_full(&e) {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    fn append_after_reports(&mut self, body: &[u8]) -> io::Result<()> {
        self.ensure_segment()?;
        self.write_pending()?;
        self.write_lost_record()?;
        self.append(body)
    }

    /// The disk is full: applies `disk_full_action`. True when room was made (try again).
    fn disk_full(&mut self, e: &io::Error) -> bool {
        let action = self.cfg.disk_full_action;
        match action {
            DiskFullAction::KeepNewest => {
                if self.room_exhausted || self.in_removal {
                    return false;
                }
                if self.remove_oldest_for_room() {
                    return true;
                }
                self.room_exhausted = true;
                self.shared
                    .metrics
                    .audit
                    .disk_full
                    .add([action.as_str()], 1);
                log::error!(
                    "audit log {}: disk full ({e}) and no closed segment left to delete \
                     (disk_full_action = keep_newest): records are counted lost until space returns",
                    self.cfg.dir.display()
                );
                false
            }
            DiskFullAction::KeepOldest => {
                if !self.failing {
                    self.shared
                        .metrics
                        .audit
                        .disk_full
                        .add([action.as_str()], 1);
                    log::error!(
                        "audit log {}: disk full ({e}); nothing is deleted (disk_full_action = \
                         keep_oldest): records that do not fit are counted lost",
                        self.cfg.dir.display()
                    );
                }
                false
            }
            DiskFullAction::Suspend => {
                if self.suspended_since.is_none() {
                    self.suspended_since = Some(Instant::now());
                    let m = &self.shared.metrics.audit;
                    m.suspended.store(1, Relaxed);
                    m.disk_full.add([action.as_str()], 1);
                    log::error!(
                        "audit log {}: disk full ({e}); writing suspended (disk_full_action = \
                         suspend): every record is counted lost until {} KiB are free again",
                        self.cfg.dir.display(),
                        RESUME_FREE >> 10
                    );
                }
                false
            }
        }
    }

    /// Resumes suspended writing once enough space is free again.
    fn try_resume(&mut self) {
        let Some(since) = self.suspended_since else {
            return;
        };
        if free_bytes(&self.cfg.dir).is_none_or(|f| f < RESUME_FREE) {
            return;
        }
        self.suspended_since = None;
        self.shared.metrics.audit.suspended.store(0, Relaxed);
        let lost = self.shared.lost_suspended.load(Relaxed) - self.reported_suspended;
        log::warn!(
            "audit log {}: space is free again; writing resumed after {:.1} s suspended, \
             {lost} event(s) lost meanwhile (a `lost` record follows)",
            self.cfg.dir.display(),
            since.elapsed().as_secs_f64()
        );
        self.ensure_reserve();
    }

    /// keep_newest: deletes the oldest closed segments, at least `segment_size` (and four
    /// reserves) bytes of them, one segment at least. False when there is none.
    fn remove_oldest_for_room(&mut self) -> bool {
        let Ok(segs) = segment::list(&self.cfg.dir) else {
            return false;
        };
        let active = self.shared.active_first_seq.load(Relaxed);
        let closed: Vec<Segment> = segs.into_iter().filter(|s| s.first_seq < active).collect();
        let mut freed = 0;
        let mut n = 0;
        // Enough that the reserve, taken back after the deletion, leaves room behind.
        let want = self.cfg.segment_size.max(4 * RESERVE);
        while n < closed.len() && (n == 0 || freed < want) {
            freed += std::fs::metadata(&closed[n].path).map_or(0, |m| m.len());
            n += 1;
        }
        if n == 0 {
            return false;
        }
        let kept_from = closed.get(n).map_or(active, |s| s.first_seq);
        self.shared
            .metrics
            .audit
            .disk_full
            .add([DiskFullAction::KeepNewest.as_str()], 1);
        log::warn!(
            "audit log {}: disk full; deleting the {n} oldest segment(s) (records before seq \
             {kept_from}, {freed} bytes) to make room (disk_full_action = keep_newest)",
            self.cfg.dir.display()
        );
        self.remove_segments(&closed[..n], kept_from, "disk_full")
    }

    /// Writes one of kmodmon's own records now (after pending ones and the loss report).
    fn append_own(&mut self, meta: &Meta) -> io::Result<()> {
        let body = serde_json::to_vec(meta).map_err(io::Error::other)?;
        self.append_after_reports(&body)
    }

    /// Deletes `remove` (a prefix of the log) with a `retention` record naming it: first the
    /// record, fsynced, then the files. On a full disk the reserve is given up for the record;
    /// if even that fails (reason `disk_full` only), the files go first and the record, marked
    /// `after_removal`, right after. True when the files were deleted.
    fn remove_segments(&mut self, remove: &[Segment], kept_from_seq: u64, reason: &str) -> bool {
        let Some(first) = remove.first() else {
            return false;
        };
        let freed: u64 = remove
            .iter()
            .map(|s| std::fs::metadata(&s.path).map_or(0, |m| m.len()))
            .sum();
        let mut meta = Meta::Retention {
            time: record::now_rfc3339(),
            removed: remove.iter().map(Segment::name).collect(),
            kept_from_seq,
            removed_from_seq: Some(first.first_seq),
            reason: Some(reason.to_string()),
            freed_bytes: Some(freed),
            after_removal: false,
        };
        self.in_removal = true;
        let mut written = self.append_own(&meta);
        if written.as_ref().is_err_and(is_no_space) && self.release_reserve() {
            written = self.append_own(&meta);
        }
        let record_after = match written {
            Ok(()) => {
                self.sync();
                if self.shared.durable_seq.load(Relaxed) < self.shared.last_seq.load(Relaxed) {
                    log::error!(
                        "audit log {}: the retention record could not be fsynced; old segments are kept",
                        self.cfg.dir.display()
                    );
                    self.in_removal = false;
                    return false;
                }
                false
            }
            Err(e) if is_no_space(&e) && reason == "disk_full" => true,
            Err(e) => {
                log::error!(
                    "audit log {}: cannot record retention ({e}); old segments are kept",
                    self.cfg.dir.display()
                );
                self.in_removal = false;
                return false;
            }
        };
        {
            let _guard = self.shared.dir_lock.lock();
            for s in remove {
                retention::remove_segment(s);
            }
            let _ = segment::sync_dir(&self.cfg.dir);
        }
        if record_after {
            if let Meta::Retention {
                after_removal,
                time,
                ..
            } = &mut meta
            {
                *after_removal = true;
                *time = record::now_rfc3339();
            }
            match self.append_own(&meta) {
                Ok(()) => self.sync(),
                // Written before anything else once a record fits.
                Err(_) => self.pending.insert(0, meta),
            }
            log::warn!(
                "audit log {}: the disk was too full to record the deletion first; recorded after it",
                self.cfg.dir.display()
            );
        }
        self.in_removal = false;
        self.room_exhausted = false;
        self.shared
            .metrics
            .audit
            .removed_segments
            .add([reason], remove.len() as u64);
        self.shared.update_usage(&self.cfg.dir);
        self.publish_bytes();
        self.ensure_reserve();
        true
    }

    /// Gives up the reserve file; true when there was one.
    fn release_reserve(&mut self) -> bool {
        let path = self.cfg.dir.join(RESERVE_FILE);
        let released = std::fs::remove_file(&path).is_ok();
        if released {
            log::warn!(
                "audit log {}: disk full; using the {} KiB reserve to record a deletion",
                self.cfg.dir.display(),
                RESERVE >> 10
            );
        }
        released
    }

    /// Makes sure the reserve file exists and holds [`RESERVE`] real (not sparse) bytes.
    fn ensure_reserve(&mut self) {
        let path = self.cfg.dir.join(RESERVE_FILE);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == RESERVE) {
            return;
        }
        let made = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&vec![0u8; RESERVE as usize])?;
                f.sync_data()
            });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            log::warn!(
                "audit log {}: cannot keep the {} KiB reserve ({e}); retried after the next deletion",
                self.cfg.dir.display(),
                RESERVE >> 10
            );
        }
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
        let su = self.shared.lost_suspended.load(Relaxed) - self.reported_suspended;
        let notes = self.shared.lost_notes.load(Relaxed) - self.reported_notes;
        if qf + we + su + notes == 0 {
            return Ok(());
        }
        let meta = Meta::Lost {
            time: record::now_rfc3339(),
            count: qf + we + su,
            queue_full: qf,
            write_error: we,
            suspended: su,
            notes,
            error: self.last_error.clone(),
        };
        let body = serde_json::to_vec(&meta).map_err(io::Error::other)?;
        self.append(&body)?;
        self.logged_losses.events += qf + we + su;
        self.logged_losses.notes += notes;
        self.reported_queue_full += qf;
        self.reported_write_error += we;
        self.reported_suspended += su;
        self.reported_notes += notes;
        if self.failing {
            log::warn!(
                "audit log {}: writing again; {} event(s) were lost ({qf} queue full, {we} write \
                 errors, {su} while suspended) and {notes} of kmodmon's own record(s)",
                self.cfg.dir.display(),
                qf + we + su
            );
        }
        self.failing = false;
        self.last_error = None;
        Ok(())
    }

    /// Writes pending records and the report of losses, if any.
    fn report_lost(&mut self) {
        if self.suspended_since.is_some() || (self.pending_lost() == 0 && self.pending.is_empty()) {
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
    }

    fn open_segment(&mut self) -> io::Result<()> {
        let name = segment::plain_name(self.next_seq);
        let path = self.cfg.dir.join(&name);
        self.shared.active_first_seq.store(self.next_seq, Relaxed);
        // Every segment before this one is closed now: the compression thread may take them.
        // (Woken only after the store: woken before it, it would still see the last closed
        // segment as the active one and skip it, leaving it plain until the next rotation.)
        if let Some(tx) = &self.hk_tx {
            let _ = tx.send(());
        }
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
            lost_before: self.logged_losses.events,
            lost_notes_before: self.logged_losses.notes,
        };
        let body = serde_json::to_vec(&header).map_err(io::Error::other)?;
        if let Err(e) = self.append(&body) {
            self.seg = None;
            self.publish_bytes();
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.shared.update_usage(&self.cfg.dir);
        if !self.in_removal {
            self.retention();
        }
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
        self.room_exhausted = false;
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

    /// The chain head is durable up to the last record written.
    fn mark_durable(&self) {
        let last = self.shared.last_seq.load(Relaxed);
        self.shared.durable_seq.store(last, Relaxed);
        if last > self.unsure_to
            && let Ok(mut h) = self.shared.head.lock()
        {
            *h = Some(Anchor {
                seq: last,
                hash: self.last_hash,
            });
        }
    }

    /// fdatasync the active segment; advances the durable seq on success.
    ///
    /// A failed fsync is never retried (fsyncgate: after a failure the kernel may have dropped
    /// the dirty pages and marked them clean, so a later fsync can succeed without the data
    /// being on disk). Instead the records since the last good fsync are counted `unsure`, the
    /// segment is closed as it is, writing continues in a new segment, and a `sync_failed`
    /// record names the range.
    fn sync(&mut self) {
        self.dirty_since = None;
        let Some(seg) = &mut self.seg else {
            self.mark_durable();
            return;
        };
        if !seg.dirty {
            self.mark_durable();
            return;
        }
        #[cfg(test)]
        let injected = self
            .shared
            .fail_fsyncs
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok();
        #[cfg(not(test))]
        let injected = false;
        let result = if injected {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            seg.file.sync_data()
        };
        match result {
            Ok(()) => {
                seg.dirty = false;
                self.mark_durable();
            }
            Err(e) => {
                let from = self.shared.durable_seq.load(Relaxed).max(self.unsure_to) + 1;
                let to = self.shared.last_seq.load(Relaxed);
                let count = (to + 1).saturating_sub(from);
                let name = seg.segment.name();
                self.shared.unsure.fetch_add(count, Relaxed);
                self.unsure_to = to;
                let m = &self.shared.metrics.audit;
                m.fsync_errors.fetch_add(1, Relaxed);
                m.unsure.fetch_add(count, Relaxed);
                log::error!(
                    "audit log {}: fsync failed: {e}; records seq {from}..={to} ({count}) may not \
                     be on disk. Not retried (a later success would not bring them back); \
                     continuing in a new segment",
                    seg.segment.path.display()
                );
                self.seg = None;
                self.publish_bytes();
                self.pending.push(Meta::SyncFailed {
                    time: record::now_rfc3339(),
                    segment: name,
                    from_seq: from,
                    to_seq: to,
                    count,
                    error: e.to_string(),
                });
            }
        }
    }

    /// Deletes old segments per the retention settings (count, age, size), recording which.
    fn retention(&mut self) {
        self.last_retention = Instant::now();
        if self.cfg.retain_segments.is_none()
            && self.cfg.retain_age.is_none()
            && self.cfg.retain_size.is_none()
        {
            return;
        }
        let segs = match segment::list(&self.cfg.dir) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("audit log {}: retention: {e}", self.cfg.dir.display());
                return;
            }
        };
        let size_rule = self.cfg.retain_size.map(|max_bytes| retention::SizeRule {
            max_bytes,
            active_len: self.seg.as_ref().map_or(0, |s| s.len),
            size: |s: &Segment| std::fs::metadata(&s.path).map_or(0, |m| m.len()),
        });
        let plan = retention::plan_sized(
            &segs,
            self.shared.active_first_seq.load(Relaxed),
            self.cfg.retain_segments,
            self.cfg.retain_age,
            size_rule,
            SystemTime::now(),
            |s| std::fs::metadata(&s.path).and_then(|m| m.modified()).ok(),
        );
        if plan.remove.is_empty() {
            return;
        }
        self.remove_segments(&plan.remove, plan.kept_from_seq, plan.reason);
    }
}
