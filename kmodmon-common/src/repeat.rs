//! Identical attempts aggregated in the kernel (a task calling `delete_module("x")` in a loop
//! must not push other events out of the ring).
//!
//! Per task and syscall the kernel keeps the current **burst**: the last attempt it delivered
//! and how many identical attempts (same syscall, arguments and result — every field of the
//! [`RawEvent`](crate::RawEvent) but the times) followed it, each less than the repeat window
//! after the previous one. Every attempt the kernel sees ends as exactly one of: delivered (its
//! own record), aggregated (counted in its burst, [`crate::Counter::Aggregated`]) or dropped.
//!
//! Aggregated attempts are reported by **repeat records**: a `RawEvent` copy of the burst's
//! first attempt with `repeat` = the burst's count so far (cumulative), `ktime_ns` = the first
//! attempt's time and `end_ktime_ns` = the last repeat's. The kernel sends one at most every
//! `repeat_report_us` while a burst goes on, and a final one (`repeat_final = 1`) before a
//! burst with repeats is replaced. Userspace reports the bursts that went quiet (and those of
//! tasks that exited, marked `dead` by the task-exit program) from the [`RepeatSlot`]s in the
//! `REPEATS` map, and turns the cumulative counts into increments per burst, so every
//! aggregated attempt is reported exactly once.
//!
//! Only the task a slot belongs to writes it (no atomics needed); a new burst replaces the
//! map element as a whole, so userspace never reads a slot whose attempt is half rewritten.
use crate::event::RawEvent;

/// Bursts tracked at once (tasks × syscalls). The map is not preallocated.
pub const REPEAT_SLOTS: u32 = 8192;

/// One task's burst of one syscall.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RepeatKey {
    pub tid: u32,
    /// [`crate::Op`] as u32.
    pub op: u32,
    /// The task's `start_time`: a later task with the same tid has another key.
    pub start_time: u64,
}

/// The current burst of a [`RepeatKey`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RepeatSlot {
    /// Identical attempts counted since `ev` was delivered.
    pub total: u64,
    /// `total` when the kernel last sent a repeat record of this burst.
    pub sent: u64,
    /// When it did (or when the burst began).
    pub sent_ns: u64,
    /// bpf_ktime_get_ns() of the burst's last attempt.
    pub last_ns: u64,
    /// 1 once the task has exited: no more writes; userspace reports and deletes the slot.
    pub dead: u32,
    /// Always 0.
    pub _reserved: u32,
    /// The burst's first attempt, as delivered (`ktime_ns` identifies the burst).
    pub ev: RawEvent,
}

impl RepeatSlot {
    pub const fn zeroed() -> Self {
        RepeatSlot {
            total: 0,
            sent: 0,
            sent_ns: 0,
            last_ns: 0,
            dead: 0,
            _reserved: 0,
            ev: RawEvent::zeroed(),
        }
    }
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(offset_of!(RepeatSlot, ev) == 40);
    assert!(size_of::<RepeatSlot>() == 40 + size_of::<RawEvent>());
    assert!(size_of::<RepeatKey>() == 16);
};
