//! Maps shared by all programs. Userspace finds them by their names, which it takes from
//! `kmodmon_common::names` (a kmodmon unit test checks the two agree).
use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use kmodmon_common::{COUNTER_SLOTS, Counter, RawEvent};

/// Module events: 4 MiB holds about 3,590 events (1,168 bytes each with the record header).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// cgroup mkdir/rmdir records, kept apart so a cgroup storm cannot crowd out module events.
#[map]
pub static CGROUPS: RingBuf = RingBuf::with_byte_size(256 << 10, 0);

/// Per-CPU counters, indexed by [`Counter`].
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Syscall attempts between entry and exit, keyed by pid_tgid (tracepoint sources only).
#[map]
pub static PENDING: HashMap<u64, RawEvent> = HashMap::with_max_entries(8192, 0);

/// Per-CPU working space: a RawEvent does not fit on the 512-byte BPF stack.
#[map]
pub static SCRATCH: PerCpuArray<RawEvent> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot; BPF programs do not migrate CPUs while running.
        unsafe { *slot += 1 };
    }
}
