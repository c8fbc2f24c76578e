//! The live event path: ring buffers → decode → enrich → consumer.
//!
//! The ring-buffer reader does no I/O besides draining the rings: it decodes records and hands
//! them to the enricher over a bounded queue (a full queue is a counted drop, never a stall of
//! the reader). The enricher owns the cgroup cache and may touch /proc and cgroupfs.
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use aya::maps::{MapData, RingBuf};
use kmodmon_common::{CGROUP_MKDIR, CGROUP_RMDIR, RawCgroupEvent, RawEvent};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::{
    enrich::{Enricher, init_names::InitNames},
    escape::{escape_bytes, until_nul},
    event::{Clock, Event, raw_from_bytes},
};

/// Capacity of the reader → enricher queue, in batches (one batch per ring drain).
pub const QUEUE: usize = 64;
/// Most records per batch.
pub const BATCH: usize = 256;
/// How often an idle enricher polls (finished modprobe runs, late runtime state).
const IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Userspace-side accounting, shared with whoever reports it.
#[derive(Debug, Default)]
pub struct Accounting {
    /// Events taken off the ring buffer.
    pub delivered: AtomicU64,
    /// Events lost because the enricher's queue was full.
    pub queue_full: AtomicU64,
    /// Records that could not be decoded (counted, reported, never silently skipped).
    pub undecodable: AtomicU64,
}

impl Accounting {
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
    pub fn queue_full(&self) -> u64 {
        self.queue_full.load(Ordering::Relaxed)
    }
    pub fn undecodable(&self) -> u64 {
        self.undecodable.load(Ordering::Relaxed)
    }
}

enum Msg {
    /// Raw records copied off the ring in one drain; decoded by the enricher.
    Events(Vec<RawEvent>),
    Cgroup {
        op: u32,
        id: u64,
        path: String,
    },
}

/// Starts the reader and enricher tasks; enriched events arrive on the returned channel.
pub fn start(
    events: RingBuf<MapData>,
    cgroups: RingBuf<MapData>,
    mut enricher: Enricher,
    accounting: Arc<Accounting>,
) -> anyhow::Result<mpsc::Receiver<Event>> {
    let (raw_tx, mut raw_rx) = mpsc::channel::<Msg>(QUEUE);
    let (out_tx, out_rx) = mpsc::channel::<Event>(1024);
    // SAFETY: the ring buffers own their map fds and keep them open and unchanged for as long
    // as the AsyncFd (which owns the ring buffer) lives.
    let mut events =
        unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {}", e))?;
    let mut cgroups =
        unsafe { AsyncFd::register_with_interest(cgroups, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("polling the cgroup ring buffer: {}", e))?;

    let clock = Clock::new();
    let acc = accounting.clone();
    let dec_acc = accounting.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                guard = cgroups.readable_mut() => {
                    let Ok(mut guard) = guard else { break };
                    drain_cgroups(guard.get_inner_mut(), &raw_tx, &acc);
                    guard.clear_ready();
                }
                guard = events.readable_mut() => {
                    let Ok(mut guard) = guard else { break };
                    // cgroup records first, so a mkdir precedes events from that cgroup.
                    drain_cgroups(cgroups.get_mut(), &raw_tx, &acc);
                    drain_events(guard.get_inner_mut(), &raw_tx, &acc);
                    guard.clear_ready();
                }
            }
            if raw_tx.is_closed() {
                break;
            }
        }
    });

    tokio::spawn(async move {
        let mut init_names = InitNames::default();
        loop {
            // The enricher may hold events back (a container still starting) and make its
            // own (expectation, self_load): wake when it has work, or when a message comes.
            let wakeup = enricher
                .next_wakeup()
                .unwrap_or_else(|| std::time::Instant::now() + IDLE_POLL);
            let msg = tokio::select! {
                msg = raw_rx.recv() => match msg {
                    Some(m) => Some(m),
                    None => break,
                },
                _ = tokio::time::sleep_until(wakeup.into()) => None,
            };
            match msg {
                Some(Msg::Cgroup { op, id, path }) => {
                    enricher.cgroup_changed(op == CGROUP_MKDIR, id, &path)
                }
                Some(Msg::Events(batch)) => {
                    for raw in batch {
                        match Event::from_raw(&raw, &clock) {
                            Ok(mut ev) => {
                                init_names.observe(&mut ev);
                                enricher.handle(ev)
                            }
                            Err(e) => {
                                dec_acc.undecodable.fetch_add(1, Ordering::Relaxed);
                                log::warn!("undecodable event record: {e}");
                            }
                        }
                    }
                }
                None => {}
            }
            enricher.poll();
            for ev in enricher.take_ready() {
                if out_tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
        enricher.flush();
        for ev in enricher.take_ready() {
            if out_tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    Ok(out_rx)
}

/// Copies records off the ring in batches (no decoding here: the reader only drains).
fn drain_events(ring: &mut RingBuf<MapData>, tx: &mpsc::Sender<Msg>, acc: &Accounting) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(item) = ring.next() {
        acc.delivered.fetch_add(1, Ordering::Relaxed);
        match raw_from_bytes(&item) {
            Ok(raw) => batch.push(raw),
            Err(e) => {
                acc.undecodable.fetch_add(1, Ordering::Relaxed);
                log::warn!("undecodable event record: {e}");
            }
        }
        drop(item);
        if batch.len() == BATCH {
            send_batch(
                tx,
                std::mem::replace(&mut batch, Vec::with_capacity(BATCH)),
                acc,
            );
        }
    }
    if !batch.is_empty() {
        send_batch(tx, batch, acc);
    }
}

fn send_batch(tx: &mpsc::Sender<Msg>, batch: Vec<RawEvent>, acc: &Accounting) {
    let n = batch.len() as u64;
    if tx.try_send(Msg::Events(batch)).is_err() {
        acc.queue_full.fetch_add(n, Ordering::Relaxed);
    }
}

fn drain_cgroups(ring: &mut RingBuf<MapData>, tx: &mpsc::Sender<Msg>, acc: &Accounting) {
    while let Some(item) = ring.next() {
        let size = std::mem::size_of::<RawCgroupEvent>();
        if item.len() < size {
            acc.undecodable.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // SAFETY: plain-data repr(C) type, length checked.
        let rec: RawCgroupEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        drop(item);
        if rec.op != CGROUP_MKDIR && rec.op != CGROUP_RMDIR {
            acc.undecodable.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let path = escape_bytes(until_nul(&rec.path));
        // Cgroup records are bookkeeping: when the queue is full the enricher's rescan covers.
        let _ = tx.try_send(Msg::Cgroup {
            op: rec.op,
            id: rec.id,
            path,
        });
    }
}
