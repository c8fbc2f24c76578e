//! Identical repeated attempts aggregated in the kernel (see `kmodmon_common::repeat` for the
//! protocol). Every finished attempt goes through [`deliver`], which makes it exactly one of
//! delivered (`emit`), aggregated ([`Counter::Aggregated`]) or dropped (counted by `emit`).
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC},
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, generated},
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use kmodmon_common::{
    Counter, NAME_LEN, Op, PARAMS_LEN, PATH_LEN, RawEvent, RepeatKey, RepeatSlot,
};

use crate::{
    config::conf,
    kernel::read_ptr,
    maps::{EVENTS, count},
    record::emit,
};

/// Open bursts, one per task and syscall. Not preallocated: a new burst replaces the element
/// (a fresh allocation), so a reader never sees an attempt half overwritten, and a deleted
/// element a program still points to stays valid until the program ends.
#[map]
pub static REPEATS: HashMap<RepeatKey, RepeatSlot> =
    HashMap::with_max_entries(kmodmon_common::REPEAT_SLOTS, BPF_F_NO_PREALLOC);

/// Where a new burst is built before it replaces the old one (it does not fit the stack).
#[map]
pub static REPEAT_SCRATCH: PerCpuArray<RepeatSlot> = PerCpuArray::with_max_entries(1, 0);

const WORDS: usize = core::mem::size_of::<RawEvent>() / 8;
const KTIME_WORD: usize = core::mem::offset_of!(RawEvent, ktime_ns) / 8;
const END_WORD: usize = core::mem::offset_of!(RawEvent, end_ktime_ns) / 8;
/// The repeat fields (two words, right after the strings); attempts never carry them.
const REPEAT_WORD: usize = core::mem::offset_of!(RawEvent, repeat) / 8;
const STR_FIRST_WORD: usize = core::mem::offset_of!(RawEvent, name) / 8;
const STR_WORDS: usize = (NAME_LEN + PARAMS_LEN + PATH_LEN) / 8;

const _: () = assert!(REPEAT_WORD + 2 <= WORDS && STR_FIRST_WORD + STR_WORDS == REPEAT_WORD);

/// Clears the string buffers (name, params, path) of a reused event, so that two identical
/// attempts are identical byte for byte (the helpers only write up to the NUL).
#[inline(always)]
pub fn clear_strings(ev: &mut RawEvent) {
    let words = (ev as *mut RawEvent).cast::<u64>();
    for i in 0..STR_WORDS {
        // SAFETY: inside the event (the const assertion above bounds the range).
        unsafe { core::ptr::write_volatile(words.add(STR_FIRST_WORD + i), 0) };
    }
}

/// Whether two attempts are the same attempt: every field but the times and the repeat
/// fields.
#[inline(always)]
fn same(a: &RawEvent, b: &RawEvent) -> bool {
    let a = (a as *const RawEvent).cast::<u64>();
    let b = (b as *const RawEvent).cast::<u64>();
    for i in 0..WORDS {
        if i == KTIME_WORD || i == END_WORD || i == REPEAT_WORD || i == REPEAT_WORD + 1 {
            continue;
        }
        // SAFETY: both point to whole events in map memory.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return false;
        }
    }
    true
}

/// The current task's start time (BTF offset): part of the burst key.
#[inline(always)]
fn task_start_time() -> Option<u64> {
    // SAFETY: a helper without preconditions.
    let task = unsafe { bpf_get_current_task() };
    read_ptr(task, conf!(task_start_time))
}

/// Copies `len` bytes of kernel memory; false (counted) when the helper fails.
#[inline(always)]
fn copy(dst: *mut u8, src: *const u8, len: usize) -> bool {
    // SAFETY: both are map or ring memory of at least `len` bytes.
    let r = unsafe { generated::bpf_probe_read_kernel(dst.cast(), len as u32, src.cast()) };
    if r != 0 {
        count(Counter::ErrReadKernel);
    }
    r == 0
}

/// Sends a repeat record for `slot`'s burst (its count so far); false when the ring is full.
#[inline(always)]
fn send_repeat(slot: &RepeatSlot, last: bool) -> bool {
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count(Counter::RepeatRecordDeferred);
        return false;
    };
    let rec = entry.as_mut_ptr();
    if !copy(
        rec.cast(),
        (&slot.ev as *const RawEvent).cast(),
        core::mem::size_of::<RawEvent>(),
    ) {
        entry.discard(0);
        return false;
    }
    // SAFETY: the reservation is ours and holds a whole event now.
    let rec = unsafe { &mut *rec };
    rec.repeat = slot.total;
    rec.repeat_final = u32::from(last);
    rec._reserved3 = 0;
    rec.end_ktime_ns = slot.last_ns;
    entry.submit(0);
    count(Counter::RepeatRecord);
    true
}

/// Sends a finished attempt (its `end_ktime_ns` set), or counts it into its task's current
/// burst when it repeats that burst's attempt.
#[inline(always)]
pub fn deliver(ev: &mut RawEvent) {
    ev.repeat = 0;
    ev.repeat_final = 0;
    ev._reserved3 = 0;
    let window = conf!(repeat_window_us) as u64 * 1000;
    if window == 0 || ev.op == Op::None as u32 {
        emit(ev);
        return;
    }
    let Some(start_time) = task_start_time() else {
        emit(ev);
        return;
    };
    let key = RepeatKey {
        tid: ev.tid,
        op: ev.op,
        start_time,
    };
    let now = ev.end_ktime_ns;
    if let Some(slot) = REPEATS.get_ptr_mut(key) {
        // SAFETY: only this task writes its own slots; the element outlives this program.
        let slot = unsafe { &mut *slot };
        if slot.dead == 0 && now.wrapping_sub(slot.last_ns) <= window && same(&slot.ev, ev) {
            slot.total += 1;
            slot.last_ns = now;
            count(Counter::Aggregated);
            let every = conf!(repeat_report_us) as u64 * 1000;
            if now.wrapping_sub(slot.sent_ns) >= every && send_repeat(slot, false) {
                slot.sent = slot.total;
                slot.sent_ns = now;
            }
            return;
        }
        // The burst is over. Its last count goes out first; when the ring cannot take it, the
        // burst stays (reported later) and this attempt goes on alone.
        if slot.total > 0 {
            if !send_repeat(slot, true) {
                emit(ev);
                return;
            }
            slot.sent = slot.total;
        }
        if !emit(ev) {
            // Dropped (counted). A burst whose end was reported must not go on.
            if slot.total > 0 {
                let _ = REPEATS.remove(key);
            }
            return;
        }
    } else if !emit(ev) {
        return;
    }
    // This attempt begins a new burst.
    let Some(next) = REPEAT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, exclusive to this program invocation.
    let next = unsafe { &mut *next };
    if !copy(
        (&mut next.ev as *mut RawEvent).cast(),
        (ev as *const RawEvent).cast(),
        core::mem::size_of::<RawEvent>(),
    ) {
        let _ = REPEATS.remove(key);
        return;
    }
    next.total = 0;
    next.sent = 0;
    next.sent_ns = now;
    next.last_ns = now;
    next.dead = 0;
    next._reserved = 0;
    if insert(key, next).is_err() {
        count(Counter::RepeatMapFull);
    }
}

/// `slot` stays in map memory (by value it would be copied onto the 512-byte BPF stack).
#[inline(always)]
fn insert(key: RepeatKey, slot: &RepeatSlot) -> Result<(), i64> {
    REPEATS
        .insert(key, slot, BPF_ANY as u64)
        .map_err(|e| e as i64)
}

/// The current task is exiting: its bursts get no more writes; userspace reports and deletes
/// them.
#[inline(always)]
pub fn task_exit() {
    if conf!(repeat_window_us) == 0 {
        return;
    }
    let Some(start_time) = task_start_time() else {
        return;
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    for op in [Op::InitModule, Op::FinitModule, Op::DeleteModule] {
        let key = RepeatKey {
            tid,
            op: op as u32,
            start_time,
        };
        if let Some(slot) = REPEATS.get_ptr_mut(key) {
            // SAFETY: the exiting task is the slot's only writer.
            unsafe { (*slot).dead = 1 };
        }
    }
}
