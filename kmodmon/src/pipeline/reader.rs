//! The ring-buffer reader: copies records off the monitor's event ring, the cgroup ring and
//! the enforcement ring, and hands them to the enrich task over a bounded queue. It does no
//! other I/O; a full queue is a counted loss, never a stall of the reader (a stalled reader
//! would only move the loss into the kernel's ring). It also turns repeat records and the
//! kernel's open bursts into summary records ([`super::repeats`]).
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use aya::maps::{MapData, RingBuf};
use kmodmon_common::{CGROUP_MKDIR, CGROUP_RMDIR, RawCgroupEvent, RawEvent};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use super::packed::Packed;
use super::repeats::{Repeats, SWEEP};
use super::{Accounting, QUEUE_BYTES};
use crate::escape::{escape_bytes, until_nul};
use crate::event::raw_from_bytes;
use crate::identity::assemble::{Assembler, Image, Record};

/// Most records per batch.
pub const BATCH: usize = 256;

/// What the reader hands to the enrich task.
pub enum Msg {
    /// Monitor records copied off the ring in one drain.
    Events(Packed),
    /// Enforcement records (denied / would_deny).
    Policy(Packed),
    Cgroup {
        mkdir: bool,
        /// The hierarchy (`CGROUP_DFL_HIERARCHY` for cgroup2).
        hierarchy: u32,
        id: u64,
        path: String,
    },
    /// A module image put back together off the IMAGES ring (identity).
    Image(Box<Image>),
    /// The kernel's signature verdict on a module that loaded (identity).
    Verdict(kmodmon_common::identity::ImageVerdict),
}

type Ring = AsyncFd<RingBuf<MapData>>;

/// The rings the pipeline reads (any may be absent).
pub struct Rings {
    pub events: Option<Ring>,
    pub cgroups: Option<Ring>,
    pub policy: Option<Ring>,
    /// Module images (identity).
    pub images: Option<Ring>,
    /// The kernel's open repeat bursts (when attempts are aggregated).
    pub repeats: Option<Repeats>,
}

/// Registers a ring buffer with the runtime.
pub fn register(ring: RingBuf<MapData>) -> std::io::Result<Ring> {
    // SAFETY: the ring buffer owns its map fd and keeps it open and unchanged for as long as
    // the AsyncFd (which owns the ring buffer) lives.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

async fn readable(
    ring: &mut Option<Ring>,
) -> Option<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>> {
    match ring {
        Some(r) => r.readable_mut().await.ok(),
        None => std::future::pending().await,
    }
}

/// Reads until `stop` turns true (or the enrich task goes away). Records still in a ring then
/// stay there: the kernel's counters report them as unread.
pub async fn run(
    mut rings: Rings,
    tx: mpsc::Sender<Msg>,
    acc: Arc<Accounting>,
    mut stop: watch::Receiver<bool>,
) {
    let mut assembler = Assembler::default();
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            guard = readable(&mut rings.images) => {
                let Some(mut guard) = guard else { break };
                drain_images(guard.get_inner_mut(), &mut assembler, &tx, &acc);
                guard.clear_ready();
            }
            _ = sweep.tick(), if rings.repeats.is_some() => {
                // Drain first: the sweep must follow every record sent before it (repeats.rs).
                if let Some(r) = rings.events.as_mut() {
                    drain_events(r.get_mut(), &tx, &acc, false, rings.repeats.as_mut());
                }
                sweep_repeats(&mut rings.repeats, &tx, &acc, false);
            }
            guard = readable(&mut rings.cgroups) => {
                let Some(mut guard) = guard else { break };
                drain_cgroups(guard.get_inner_mut(), &tx, &acc);
                guard.clear_ready();
            }
            guard = readable(&mut rings.events) => {
                let Some(mut guard) = guard else { break };
                // cgroup records first, so a mkdir precedes events from that cgroup; images
                // too, so an event finds its task's image already joined.
                if let Some(c) = rings.cgroups.as_mut() {
                    drain_cgroups(c.get_mut(), &tx, &acc);
                }
                if let Some(i) = rings.images.as_mut() {
                    drain_images(i.get_mut(), &mut assembler, &tx, &acc);
                }
                drain_events(guard.get_inner_mut(), &tx, &acc, false, rings.repeats.as_mut());
                guard.clear_ready();
            }
            guard = readable(&mut rings.policy) => {
                let Some(mut guard) = guard else { break };
                if let Some(c) = rings.cgroups.as_mut() {
                    drain_cgroups(c.get_mut(), &tx, &acc);
                }
                if let Some(i) = rings.images.as_mut() {
                    drain_images(i.get_mut(), &mut assembler, &tx, &acc);
                }
                drain_events(guard.get_inner_mut(), &tx, &acc, true, None);
                guard.clear_ready();
            }
        }
        if *stop.borrow() || tx.is_closed() {
            break;
        }
    }
    // The end: every burst still open is reported as far as it went (records still in the
    // ring stay unread, like events).
    sweep_repeats(&mut rings.repeats, &tx, &acc, true);
}

/// Sends the summaries of the bursts the kernel's map shows quiet or over (all, at the end).
fn sweep_repeats(
    repeats: &mut Option<Repeats>,
    tx: &mpsc::Sender<Msg>,
    acc: &Accounting,
    all: bool,
) {
    let Some(r) = repeats.as_mut() else { return };
    let batch = r.sweep(crate::event::monotonic_ns(), all);
    if batch.is_empty() {
        return;
    }
    for chunk in batch.chunks(BATCH) {
        let mut packed = Packed::with_capacity(chunk.len() * PACKED_GUESS);
        for raw in chunk {
            acc.summaries.fetch_add(1, Relaxed);
            acc.repeats.fetch_add(raw.repeat, Relaxed);
            packed.push(raw);
        }
        send(tx, packed, acc, false);
    }
}

/// Bytes a packed attempt usually takes (a delete_module: about 160).
const PACKED_GUESS: usize = 200;

/// Copies records off the ring in batches (decoding happens on the enrich task). Repeat
/// records become summaries of the repeats not reported before (or nothing).
fn drain_events(
    ring: &mut RingBuf<MapData>,
    tx: &mpsc::Sender<Msg>,
    acc: &Accounting,
    policy: bool,
    mut repeats: Option<&mut Repeats>,
) {
    let delivered = if policy {
        &acc.delivered_policy
    } else {
        &acc.delivered
    };
    let mut batch = Packed::with_capacity(BATCH * PACKED_GUESS);
    while let Some(item) = ring.next() {
        // Repeat records are rare: decoded whole, their count made an increment.
        if is_repeat_record(&item) {
            match raw_from_bytes(&item) {
                Ok(mut raw) => {
                    acc.repeat_records.fetch_add(1, Relaxed);
                    let new = match repeats.as_deref_mut() {
                        Some(r) => r.record(&mut raw),
                        // Not aggregating, yet a repeat record: report it as it is.
                        None => true,
                    };
                    if new {
                        acc.summaries.fetch_add(1, Relaxed);
                        acc.repeats.fetch_add(raw.repeat, Relaxed);
                        batch.push(&raw);
                    }
                }
                Err(e) => {
                    // A summary that entered and was lost: the identities stay exact, its
                    // repeats show as unreported.
                    acc.repeat_records.fetch_add(1, Relaxed);
                    acc.summaries.fetch_add(1, Relaxed);
                    acc.undecodable.fetch_add(1, Relaxed);
                    log::warn!("undecodable repeat record: {e}");
                }
            }
        } else {
            delivered.fetch_add(1, Relaxed);
            if let Err(e) = batch.push_bytes(&item) {
                acc.undecodable.fetch_add(1, Relaxed);
                log::warn!("undecodable event record: {e}");
            }
        }
        drop(item);
        if batch.len() == BATCH {
            send(
                tx,
                std::mem::replace(&mut batch, Packed::with_capacity(BATCH * PACKED_GUESS)),
                acc,
                policy,
            );
        }
    }
    if !batch.is_empty() {
        send(tx, batch, acc, policy);
    }
}

/// Whether a ring record is a repeat record (`repeat` > 0) rather than an event.
fn is_repeat_record(rec: &[u8]) -> bool {
    const AT: usize = std::mem::offset_of!(RawEvent, repeat);
    rec.get(AT..AT + 8)
        .is_some_and(|b| b.iter().any(|&x| x != 0))
}

/// Queues a batch for the enrich task. The queue is bounded by the bytes it holds
/// ([`QUEUE_BYTES`]): a full queue is a counted loss.
fn send(tx: &mpsc::Sender<Msg>, batch: Packed, acc: &Accounting, policy: bool) {
    let n = batch.len() as u64;
    if n == 0 {
        return;
    }
    let bytes = batch.byte_len() as u64;
    let fits = acc
        .queued_bytes
        .fetch_update(Relaxed, Relaxed, |q| {
            (q + bytes <= QUEUE_BYTES).then_some(q + bytes)
        })
        .is_ok();
    if !fits {
        acc.queue_full.fetch_add(n, Relaxed);
        return;
    }
    let msg = if policy {
        Msg::Policy(batch)
    } else {
        Msg::Events(batch)
    };
    if tx.try_send(msg).is_err() {
        acc.queued_bytes.fetch_sub(bytes, Relaxed);
        acc.queue_full.fetch_add(n, Relaxed);
    }
}

/// Copies image records off the IMAGES ring and hands on each finished capture.
fn drain_images(
    ring: &mut RingBuf<MapData>,
    assembler: &mut Assembler,
    tx: &mpsc::Sender<Msg>,
    acc: &Accounting,
) {
    while let Some(item) = ring.next() {
        let msg = match assembler.record(&item) {
            Record::Pending => None,
            Record::Image(img) => Some(Msg::Image(img)),
            Record::Verdict(v) => Some(Msg::Verdict(v)),
            Record::Stray(why) => {
                acc.identity_stray.fetch_add(1, Relaxed);
                log::warn!("identity: {why}");
                None
            }
        };
        drop(item);
        if let Some(m) = msg
            && tx.try_send(m).is_err()
        {
            // The events of this image then say they have none.
            acc.identity_stray.fetch_add(1, Relaxed);
        }
    }
}

fn drain_cgroups(ring: &mut RingBuf<MapData>, tx: &mpsc::Sender<Msg>, acc: &Accounting) {
    while let Some(item) = ring.next() {
        let size = std::mem::size_of::<RawCgroupEvent>();
        if item.len() < size {
            log::warn!("undecodable cgroup record of {} bytes", item.len());
            acc.cgroup_queue_full.fetch_add(1, Relaxed);
            continue;
        }
        // SAFETY: plain-data repr(C) type, length checked.
        let rec: RawCgroupEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        drop(item);
        if rec.op != CGROUP_MKDIR && rec.op != CGROUP_RMDIR {
            log::warn!("cgroup record with unknown op {}", rec.op);
            continue;
        }
        let path = escape_bytes(until_nul(&rec.path));
        let msg = Msg::Cgroup {
            mkdir: rec.op == CGROUP_MKDIR,
            hierarchy: rec.hierarchy,
            id: rec.id,
            path,
        };
        if tx.try_send(msg).is_err() {
            // The registry finds the cgroup by a rescan when an event names it.
            acc.cgroup_queue_full.fetch_add(1, Relaxed);
        }
    }
}
