//! The kernel side's per-CPU counters.

/// Per-CPU counters (one `u64` slot each in the `COUNTERS` map). Every path that sees an event
/// increments exactly one `Seen*`; every path that loses one increments exactly one `Drop*`;
/// every failed helper call increments an `Err*` (the event still goes out, with the field
/// marked missing).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    SeenLoad = 0,
    SeenUnload = 1,
    SeenRequest = 2,
    SeenLoadAttempt = 3,
    SeenUnloadAttempt = 4,
    /// bpf_ringbuf_reserve/output failed: ring buffer full.
    DropRingbufFull = 5,
    /// The enter→exit join map was full, the attempt could not be tracked.
    DropPendingFull = 6,
    /// The per-CPU scratch buffer was unavailable.
    DropNoScratch = 7,
    /// A parked attempt was replaced before its exit was seen (its task died inside the
    /// syscall and the pid was reused).
    DropPendingLost = 8,
    /// Reading a user string failed.
    ErrReadUser = 9,
    /// Reading kernel memory failed.
    ErrReadKernel = 10,
    /// A syscall exit with no recorded entry (the call began before kmodmon attached).
    ExitWithoutEnter = 11,
    /// cgroup mkdir/rmdir records seen.
    SeenCgroup = 12,
    /// cgroup mkdir/rmdir records lost to a full ring buffer.
    DropCgroupRingbufFull = 13,
    /// fexit could not read the syscall's return value.
    ErrFuncRet = 14,
    /// Removing a completed attempt from the join map failed.
    ErrPendingRemove = 15,
    /// denied / would_deny decisions taken by the LSM programs.
    PolicyDecision = 16,
}

pub const COUNTER_SLOTS: u32 = 17;

impl Counter {
    pub const ALL: [Counter; 17] = [
        Counter::SeenLoad,
        Counter::SeenUnload,
        Counter::SeenRequest,
        Counter::SeenLoadAttempt,
        Counter::SeenUnloadAttempt,
        Counter::DropRingbufFull,
        Counter::DropPendingFull,
        Counter::DropNoScratch,
        Counter::DropPendingLost,
        Counter::ErrReadUser,
        Counter::ErrReadKernel,
        Counter::ExitWithoutEnter,
        Counter::SeenCgroup,
        Counter::DropCgroupRingbufFull,
        Counter::ErrFuncRet,
        Counter::ErrPendingRemove,
        Counter::PolicyDecision,
    ];

    /// Stable snake_case name used in output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::SeenLoad => "seen_load",
            Self::SeenUnload => "seen_unload",
            Self::SeenRequest => "seen_request",
            Self::SeenLoadAttempt => "seen_load_attempt",
            Self::SeenUnloadAttempt => "seen_unload_attempt",
            Self::DropRingbufFull => "ringbuf_full",
            Self::DropPendingFull => "pending_map_full",
            Self::DropNoScratch => "no_scratch",
            Self::DropPendingLost => "pending_lost",
            Self::ErrReadUser => "read_user_failed",
            Self::ErrReadKernel => "read_kernel_failed",
            Self::ExitWithoutEnter => "exit_without_enter",
            Self::SeenCgroup => "seen_cgroup",
            Self::DropCgroupRingbufFull => "cgroup_ringbuf_full",
            Self::ErrFuncRet => "func_ret_failed",
            Self::ErrPendingRemove => "pending_remove_failed",
            Self::PolicyDecision => "policy_decision",
        }
    }

    /// Counters that each stand for one lost module event.
    pub const fn is_event_drop(self) -> bool {
        matches!(
            self,
            Self::DropRingbufFull
                | Self::DropPendingFull
                | Self::DropNoScratch
                | Self::DropPendingLost
        )
    }

    pub const fn is_seen(self) -> bool {
        matches!(
            self,
            Self::SeenLoad
                | Self::SeenUnload
                | Self::SeenRequest
                | Self::SeenLoadAttempt
                | Self::SeenUnloadAttempt
        )
    }
}
