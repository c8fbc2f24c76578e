//! The kernel side's per-CPU counters.

/// What a counter counts, for the accounting
/// `seen == delivered + aggregated + dropped + in_flight` and for
/// what the exit summary and metrics list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CounterCategory {
    /// One module event a program saw (each event increments exactly one).
    Seen,
    /// One module event lost (each loss increments exactly one).
    EventDrop,
    /// One attempt aggregated in the kernel into the repeat count of an identical attempt
    /// delivered just before (reported by repeat records, see `kmodmon_common::repeat`).
    Aggregated,
    /// One cgroup mkdir/rmdir record lost (not a module event).
    CgroupDrop,
    /// A failed read or helper call: the event still went out, with the field marked missing.
    Error,
    /// Anything else: cgroup records seen, LSM decisions taken.
    Other,
}

contract_enum! {
    /// Per-CPU counters (one `u64` slot each in the `COUNTERS` map, indexed by value). Every
    /// path that sees an event increments exactly one [`CounterCategory::Seen`] counter; every
    /// path that loses one increments exactly one [`CounterCategory::EventDrop`]; every failed
    /// helper call increments a [`CounterCategory::Error`] (the event still goes out, with the
    /// field marked missing).
    pub enum Counter: category CounterCategory;
    SeenLoad = 0 => "seen_load", CounterCategory::Seen;
    SeenUnload = 1 => "seen_unload", CounterCategory::Seen;
    SeenRequest = 2 => "seen_request", CounterCategory::Seen;
    SeenLoadAttempt = 3 => "seen_load_attempt", CounterCategory::Seen;
    SeenUnloadAttempt = 4 => "seen_unload_attempt", CounterCategory::Seen;
    /// bpf_ringbuf_reserve/output failed: ring buffer full.
    DropRingbufFull = 5 => "ringbuf_full", CounterCategory::EventDrop;
    /// The enter→exit join map was full, the attempt could not be tracked.
    DropPendingFull = 6 => "pending_map_full", CounterCategory::EventDrop;
    /// The per-CPU scratch buffer was unavailable.
    DropNoScratch = 7 => "no_scratch", CounterCategory::EventDrop;
    /// A parked attempt was replaced before its exit was seen (its task died inside the
    /// syscall and the pid was reused).
    DropPendingLost = 8 => "pending_lost", CounterCategory::EventDrop;
    /// Reading a user string failed.
    ErrReadUser = 9 => "read_user_failed", CounterCategory::Error;
    /// Reading kernel memory failed.
    ErrReadKernel = 10 => "read_kernel_failed", CounterCategory::Error;
    /// A syscall exit with no recorded entry (the call began before kmodmon attached).
    ExitWithoutEnter = 11 => "exit_without_enter", CounterCategory::Error;
    /// cgroup mkdir/rmdir records seen.
    SeenCgroup = 12 => "seen_cgroup", CounterCategory::Other;
    /// cgroup mkdir/rmdir records lost to a full ring buffer.
    DropCgroupRingbufFull = 13 => "cgroup_ringbuf_full", CounterCategory::CgroupDrop;
    /// fexit could not read the syscall's return value.
    ErrFuncRet = 14 => "func_ret_failed", CounterCategory::Error;
    /// Removing a completed attempt from the join map failed.
    ErrPendingRemove = 15 => "pending_remove_failed", CounterCategory::Error;
    /// denied / would_deny decisions taken by the LSM programs.
    PolicyDecision = 16 => "policy_decision", CounterCategory::Other;
    /// A seccomp-refused attempt whose task's saved user registers could not be located: the
    /// event went out without its arguments.
    ErrUserRegs = 17 => "user_regs_failed", CounterCategory::Error;
    /// Remembering that a task's refused attempt was already reported failed: if that task
    /// then dies of SIGSYS, its exit reports the attempt a second time.
    ErrSeccompMark = 18 => "seccomp_mark_failed", CounterCategory::Error;
    /// Module images captured for identity (one per load_module or init_module image).
    IdentityCaptured = 19 => "identity_captured", CounterCategory::Other;
    /// An image capture lost chunks (or its header) to a full IMAGES ring: no hash.
    IdentityRingFull = 20 => "identity_ring_full", CounterCategory::Error;
    /// An image larger than the capture limit: no hash.
    IdentityTooLarge = 21 => "identity_too_large", CounterCategory::Error;
    /// Reading an image (or its pointer) out of kernel memory failed: no hash.
    IdentityReadFailed = 22 => "identity_read_failed", CounterCategory::Error;
    /// The map that keeps init_module images from being captured twice refused an update.
    IdentityMapFailed = 23 => "identity_map_failed", CounterCategory::Error;
    /// An attempt identical to the previous one of the same task (same syscall, arguments
    /// and result, within the repeat window): counted into its burst instead of sent.
    Aggregated = 24 => "aggregated", CounterCategory::Aggregated;
    /// Repeat records sent (a burst's count so far, or at its end).
    RepeatRecord = 25 => "repeat_records", CounterCategory::Other;
    /// A repeat record was due but the ring buffer was full: the burst stays open and is
    /// reported later (by a later record or userspace's sweep), nothing is lost.
    RepeatRecordDeferred = 26 => "repeat_record_deferred", CounterCategory::Other;
    /// A delivered attempt could not open a burst (the repeat map was full): identical
    /// attempts after it are delivered one by one.
    RepeatMapFull = 27 => "repeat_map_full", CounterCategory::Other;
    /// LSM: a restricted decision that an unmapped container cgroup got from its name or its
    /// parent's (`[unselected]` before kmodmon mapped it).
    LsmNameRule = 28 => "lsm_name_rule", CounterCategory::Other;
    /// LSM: a crypto manager thread judged by the decision of the task that asked for the
    /// algorithm.
    LsmCryptoInherited = 29 => "lsm_crypto_inherited", CounterCategory::Other;
    /// LSM: recording a task's `crypto-*` request for the crypto manager's threads failed.
    LsmCryptoRecordFailed = 30 => "lsm_crypto_record_failed", CounterCategory::Error;
    /// LSM: stashing a load's decision and file for its later hooks failed.
    LsmStashFailed = 31 => "lsm_stash_failed", CounterCategory::Error;
    /// LSM: the task's cgroup could not be read: the `[unselected]` decision applied.
    LsmCgroupUnreadable = 32 => "lsm_cgroup_unreadable", CounterCategory::Error;
    /// LSM: a load's later hook found no decision from its first hook: `[unselected]` applied.
    LsmStashMissed = 33 => "lsm_stash_missed", CounterCategory::Error;
}

/// Slots of the `COUNTERS` map.
pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;

impl Counter {
    /// Counters that each stand for one lost module event.
    pub const fn is_event_drop(self) -> bool {
        matches!(self.category(), CounterCategory::EventDrop)
    }

    /// Counters that each stand for one module event seen.
    pub const fn is_seen(self) -> bool {
        matches!(self.category(), CounterCategory::Seen)
    }

    /// Counters that each stand for one attempt aggregated into a repeat count.
    pub const fn is_aggregated(self) -> bool {
        matches!(self.category(), CounterCategory::Aggregated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_index_their_slots() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(
                *c as usize, i,
                "{c:?} must be slot {i}: COUNTERS is indexed by value"
            );
        }
        assert_eq!(COUNTER_SLOTS as usize, Counter::ALL.len());
    }
}
