//! The ring-buffer reader: copies records off the monitor's event ring, the cgroup ring and
//! the enforcement ring, and hands them to the enrich task over a bounded queue. It does no
//! other I/O; a full queue is a counted loss, never a stall of the reader (a stalled reader
//! would only move the loss into the kernel's ring).
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use aya::maps::{MapData, RingBuf};
use kmodmon_common::{CGROUP_MKDIR, CGROUP_RMDIR, RawCgroupEvent, RawEvent};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use super::Accounting;
use crate::escape::{escape_bytes, until_nul};
use crate::event::raw_from_bytes;
use crate::identity::assemble::{Assembler, Image, Record};

/// Most records per batch.
pub const BATCH: usize = 256;

/// What the reader hands to the enrich task.
pub enum Msg {
    /// Monitor records copied off the ring in one drain.
    Events(Vec<RawEvent>),
    /// Enforcement records (denied / would_deny).
    Policy(Vec<RawEvent>),
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
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            guard = readable(&mut rings.images) => {
                let Some(mut guard) = guard else { break };
                drain_images(guard.get_inner_mut(), &mut assembler, &tx, &acc);
                guard.clear_ready();
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
                drain_events(guard.get_inner_mut(), &tx, &acc, false);
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
                drain_events(guard.get_inner_mut(), &tx, &acc, true);
                guard.clear_ready();
            }
        }
        if *stop.borrow() || tx.is_closed() {
            break;
        }
    }
}

/// Copies records off the ring in batches (decoding happens on the enrich task).
fn drain_events(
    ring: &mut RingBuf<MapData>,
    tx: &mpsc::Sender<Msg>,
    acc: &Accounting,
    policy: bool,
) {
    let delivered = if policy {
        &acc.delivered_policy
    } else {
        &acc.delivered
    };
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(item) = ring.next() {
        delivered.fetch_add(1, Relaxed);
        match raw_from_bytes(&item) {
            Ok(raw) => batch.push(raw),
            Err(e) => {
                acc.undecodable.fetch_add(1, Relaxed);
                log::warn!("undecodable event record: {e}");
            }
        }
        drop(item);
        if batch.len() == BATCH {
            send(
                tx,
                std::mem::replace(&mut batch, Vec::with_capacity(BATCH)),
                acc,
                policy,
            );
        }
    }
    if !batch.is_empty() {
        send(tx, batch, acc, policy);
    }
}

fn send(tx: &mpsc::Sender<Msg>, batch: Vec<RawEvent>, acc: &Accounting, policy: bool) {
    let n = batch.len() as u64;
    let msg = if policy {
        Msg::Policy(batch)
    } else {
        Msg::Events(batch)
    };
    if tx.try_send(msg).is_err() {
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
