//! Module event records: what the kernel side sends for each load, unload, request and
//! attempt ([`RawEvent`]), and the enums and bit sets its fields carry.
use crate::counter::Counter;

/// Longest module / request name kept. Module names are at most 55 bytes (MODULE_NAME_LEN - 1);
/// autoload requests can be aliases (`pci:v00008086d...`) and are longer.
pub const NAME_LEN: usize = 128;
/// Longest module parameter string kept (init_module / finit_module `uargs`).
pub const PARAMS_LEN: usize = 256;
/// The file path of finit_module is stored as fixed slots of NUL-terminated components, leaf
/// first (slot i at byte i * PATH_COMPONENT_LEN). Fixed slots keep the verifier's work small.
pub const PATH_SLOTS: usize = 10;
/// Bytes per path component slot (a component of PATH_COMPONENT_LEN - 1 bytes may be cut).
pub const PATH_COMPONENT_LEN: usize = 48;
pub const PATH_LEN: usize = PATH_SLOTS * PATH_COMPONENT_LEN;
/// How many steps (a dentry up, or a mount crossed) the path walk takes at most.
pub const PATH_MAX_STEPS: usize = 16;
/// `comm` length (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;
/// How many of the task's ancestors (parent first) each event records.
pub const ANCESTORS: usize = 4;

/// The kinds of event the kernel side records, one row each (`Variant = value => "name";`).
/// Calls `$callback! { HEAD ROWS }`: [`EventKind`] is built from it here, and kmodmon's output
/// `Kind` from the same rows (see [`crate::macros`]).
#[macro_export]
macro_rules! event_kinds {
    ($callback:ident! { $($head:tt)* }) => {
        $callback! {
            $($head)*
            /// The kernel finished loading a module (module:module_load).
            Load = 1 => "load";
            /// The kernel freed a module (module:module_free).
            Unload = 2 => "unload";
            /// The kernel was asked to autoload a module (module:module_request).
            Request = 3 => "request";
            /// A task called init_module or finit_module (with its result).
            LoadAttempt = 4 => "load_attempt";
            /// A task called delete_module (with its result).
            UnloadAttempt = 5 => "unload_attempt";
            /// The BPF LSM denied a load or autoload request (enforce mode), with the rule
            /// that decided and the policy generation.
            Denied = 6 => "denied";
            /// The BPF LSM would have denied it (audit mode); with rule and generation too.
            WouldDeny = 7 => "would_deny";
        }
    };
}

event_kinds!(contract_enum! {
    /// What happened.
    pub enum EventKind;
});

impl EventKind {
    /// Index of this kind's "seen" counter in [`Counter`].
    pub const fn seen_counter(self) -> Counter {
        match self {
            Self::Load => Counter::SeenLoad,
            Self::Unload => Counter::SeenUnload,
            Self::Request => Counter::SeenRequest,
            Self::LoadAttempt => Counter::SeenLoadAttempt,
            Self::UnloadAttempt => Counter::SeenUnloadAttempt,
            Self::Denied | Self::WouldDeny => Counter::PolicyDecision,
        }
    }
}

/// The kernel hooks that produce events, one row each (see [`event_kinds!`](crate::event_kinds)).
#[macro_export]
macro_rules! sources {
    ($callback:ident! { $($head:tt)* }) => {
        $callback! {
            $($head)*
            /// module:module_load / module_free / module_request tracepoints.
            ModuleTracepoint = 1 => "module_tracepoint";
            /// fexit on the syscall's own kernel function (no cost to other syscalls).
            Fexit = 2 => "fexit";
            /// syscalls:sys_enter_* / sys_exit_* tracepoints.
            SyscallTracepoint = 3 => "syscall_tracepoint";
            /// raw_syscalls:sys_enter / sys_exit, filtered in the kernel by syscall number.
            RawSyscalls = 4 => "raw_syscalls";
            /// BPF LSM hooks (policy enforcement).
            Lsm = 5 => "lsm";
            /// fexit on the kernel's seccomp filter function (`__seccomp_filter`): module
            /// syscalls a seccomp filter refused, on kernels whose attempt source never sees
            /// them (fexit on the syscall functions).
            Seccomp = 6 => "seccomp";
            /// The task's exit (raw tracepoint `sched_process_exit`): a task killed by SIGSYS
            /// in a module syscall (seccomp RET_KILL), where no other record exists.
            TaskExit = 7 => "task_exit";
            /// kprobe on the syscall's kernel function (entry) and a tracefs kretprobe with an
            /// explicit maxactive (return): no cost to other syscalls where fexit is refused.
            Kprobe = 8 => "kprobe";
            /// The syscall-exit hook alone (tp_btf, else a raw tracepoint, on sys_exit): the
            /// number, arguments and result from the task's saved registers.
            SysExit = 9 => "sys_exit";
        }
    };
}

sources!(contract_enum! {
    /// Which kernel hook produced an event.
    pub enum Source;
});

/// The module syscalls, one row each (see [`event_kinds!`](crate::event_kinds)); [`Op`] adds
/// `None` for records that are not attempts.
#[macro_export]
macro_rules! syscall_ops {
    ($callback:ident! { $($head:tt)* }) => {
        $callback! {
            $($head)*
            InitModule = 1 => "init_module";
            FinitModule = 2 => "finit_module";
            DeleteModule = 3 => "delete_module";
        }
    };
}

syscall_ops!(contract_enum! {
    /// Which module syscall an attempt used.
    pub enum Op;
    /// Not an attempt (a kernel record, or an LSM decision on an autoload request).
    None = 0 => "none";
});

contract_enum! {
    /// What refused an attempt before the syscall ran ([`RawEvent::blocked_by`]).
    pub enum BlockedBy;
    /// Nothing: the syscall ran (its result is the kernel's).
    None = 0 => "none";
    /// A seccomp filter (RET_ERRNO, RET_TRAP, RET_KILL_*, or a tracer / user-notification
    /// supervisor answering for it): the result is what the filter made the caller see.
    Seccomp = 1 => "seccomp";
}

/// Bits of [`RawEvent::truncated`] and friends.
pub mod trunc {
    pub const NAME: u32 = 1 << 0;
    pub const PARAMS: u32 = 1 << 1;
    pub const PATH: u32 = 1 << 2;
}

/// Bits of [`RawEvent::missing`]: a field the kernel side tried and failed to read.
pub mod missing {
    pub const NAME: u32 = 1 << 0;
    pub const PARAMS: u32 = 1 << 1;
    pub const PATH: u32 = 1 << 2;
    pub const PPID: u32 = 1 << 3;
    pub const RESULT: u32 = 1 << 4;
    /// A cgroup v1 hierarchy is configured but the task's cgroup in it could not be read.
    pub const CGROUP_V1: u32 = 1 << 5;
}

/// One ancestor of the task that caused an event, as the kernel saw it when the event began.
/// Userspace matches it to `/proc/<tgid>` by its start time, so a reused pid is never taken
/// for it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawAncestor {
    /// The process's start (its thread-group leader's `start_boottime`, CLOCK_BOOTTIME ns):
    /// `/proc/<tgid>/stat` field 22 is this in clock ticks.
    pub start_boottime_ns: u64,
    pub tgid: u32,
    pub _reserved: u32,
    /// The thread-group leader's `comm`.
    pub comm: [u8; COMM_LEN],
}

impl RawAncestor {
    pub const fn zeroed() -> Self {
        Self {
            start_boottime_ns: 0,
            tgid: 0,
            _reserved: 0,
            comm: [0; COMM_LEN],
        }
    }
}

/// What decided a denied / would_deny (see [`crate::policy`]), one row each (see
/// [`event_kinds!`](crate::event_kinds)).
#[macro_export]
macro_rules! decided_by {
    ($callback:ident! { $($head:tt)* }) => {
        $callback! {
            $($head)*
            /// The cgroup's own entry: a container kmodmon mapped.
            OwnEntry = 1 => "own_entry";
            /// The entry of an enclosing cgroup (a container's sub-cgroup).
            EnclosingEntry = 2 => "enclosing_entry";
            /// A cgroup below a container parent (`/docker`, ...) kmodmon has not mapped:
            /// `[unselected]`.
            ContainerParent = 3 => "container_parent";
            /// A cgroup named like a container (`docker-<id>.scope`, ...) kmodmon has not
            /// mapped: `[unselected]`.
            ContainerName = 4 => "container_name";
            /// The host entry.
            Host = 5 => "host";
            /// A crypto manager thread instantiating an algorithm a task asked for: that
            /// task's decision.
            CryptoRequester = 6 => "crypto_requester";
        }
    };
}

decided_by!(contract_enum! {
    /// What decided a denied / would_deny.
    pub enum DecidedBy;
});

/// Where the name a load was judged by came from, one row each.
#[macro_export]
macro_rules! named_by {
    ($callback:ident! { $($head:tt)* }) => {
        $callback! {
            $($head)*
            /// The autoload request's string (a module name or an alias).
            Request = 1 => "request";
            /// The module file's name (only where nothing better exists on this kernel).
            File = 2 => "file";
            /// The `struct module` in the bytes the kernel read (`.gnu.linkonce.this_module`).
            Image = 3 => "image";
            /// The kernel's own name of the module, as it makes /sys/module/<name>, after
            /// decompressing it (the loader then sees ENOMEM).
            Kernel = 4 => "kernel";
            /// No name could be read (an image that does not parse): denied wherever loads
            /// are restricted.
            Unnamed = 5 => "unnamed";
        }
    };
}

named_by!(contract_enum! {
    /// Where the judged name came from.
    pub enum NamedBy;
});

/// Bits of [`RawEvent::lsm_flags`].
pub mod lsm {
    /// The file's name (up to its first '.') is not the module's name: a restricted cgroup
    /// may not load it, whatever the names.
    pub const NAME_MISMATCH: u32 = 1 << 0;
    /// The image's `.modinfo` `name=` is not its `struct module` name (the other name is in
    /// `params`).
    pub const MODINFO_MISMATCH: u32 = 1 << 1;
    /// A compressed module file with a parameter string: the kernel would run the module's
    /// parameter handlers before it can be named, so a restricted cgroup may not.
    pub const COMPRESSED_WITH_PARAMS: u32 = 1 << 2;
    /// The decision was capped by an enclosing container's entry.
    pub const CAPPED: u32 = 1 << 3;
}

/// One module event, as the kernel side records it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawEvent {
    /// [`EventKind`] as u32.
    pub kind: u32,
    /// [`Source`] as u32.
    pub source: u32,
    /// [`Op`] as u32 (attempts only).
    pub op: u32,
    /// Bitmask of [`trunc`] flags.
    pub truncated: u32,
    /// Bitmask of [`missing`] flags.
    pub missing: u32,
    /// module_load: the kernel's taint mask for the module.
    pub taints: u32,
    /// module_request: 1 when the requester waits for modprobe, else 0.
    pub wait: u32,
    /// denied / would_deny: the id of the policy rule that decided
    /// ([`crate::policy::Decision::rule`]).
    pub rule_id: u32,
    /// denied / would_deny: the generation of the policy in force
    /// ([`crate::policy::Settings::generation`]).
    pub policy_generation: u32,
    /// finit_module / delete_module flags.
    pub flags: u32,
    /// finit_module fd (-1 when not applicable).
    pub fd: i32,
    /// denied / would_deny: what decided ([`DecidedBy`] as u32).
    pub decided_by: u32,
    /// denied / would_deny: where the judged name came from ([`NamedBy`] as u32).
    pub named_by: u32,
    /// denied / would_deny: bits of [`lsm`].
    pub lsm_flags: u32,
    /// bpf_ktime_get_ns() when the event started (syscall entry for attempts).
    pub ktime_ns: u64,
    /// bpf_ktime_get_ns() when the syscall returned (attempts), else equal to `ktime_ns`.
    pub end_ktime_ns: u64,
    /// init_module image length.
    pub len: u64,
    /// Syscall return value (0 or -errno); 0 for kernel-record events.
    pub ret: i64,
    pub cgroup_id: u64,
    /// denied / would_deny: the cgroup whose entry or name decided (0: the host entry); for
    /// the crypto manager's threads, the cgroup of the task that asked for the algorithm.
    pub decided_at: u64,
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Slots used in `path` (components, leaf first).
    pub path_len: u32,
    pub comm: [u8; COMM_LEN],
    pub name: [u8; NAME_LEN],
    /// init_module / finit_module parameters; for denied / would_deny, the name the image's
    /// `.modinfo` gives when it differs from its `struct module` ([`lsm::MODINFO_MISMATCH`]).
    pub params: [u8; PARAMS_LEN],
    pub path: [u8; PATH_LEN],
    /// 0 for an event. Non-zero: a repeat record (see [`crate::repeat`]) standing for identical
    /// attempts aggregated in the kernel: this many of them in the burst that began with the
    /// attempt delivered at `ktime_ns`, counted since that attempt (cumulative); the last of
    /// them at `end_ktime_ns`.
    pub repeat: u64,
    /// Repeat records: 1 when the burst has ended (no later record for it follows).
    pub repeat_final: u32,
    /// Always 0.
    pub _reserved3: u32,
    /// The task's cgroup in the cgroup v1 hierarchy userspace chose
    /// (`Config::cgroup_v1_ssid`): its kernfs id, which is the directory's inode number in that
    /// hierarchy's mount. 0 when no v1 hierarchy is configured or it could not be read.
    pub cgroup_v1_id: u64,
    /// Entries of `ancestors` filled (the walk stops at pid 1 or the idle task).
    pub ancestors_len: u32,
    pub _reserved2: u32,
    /// The task's parent, grandparent, ... (see [`RawAncestor`]).
    pub ancestors: [RawAncestor; ANCESTORS],
    /// [`BlockedBy`] as u32: what refused the attempt before the syscall ran.
    pub blocked_by: u32,
    /// The signal the caller got instead of a result (SIGSYS: seccomp RET_TRAP / RET_KILL),
    /// else 0; `ret` is then meaningless.
    pub signal: u32,
}

impl RawEvent {
    pub const fn zeroed() -> Self {
        Self {
            kind: 0,
            source: 0,
            op: 0,
            truncated: 0,
            missing: 0,
            taints: 0,
            wait: 0,
            rule_id: 0,
            policy_generation: 0,
            flags: 0,
            fd: -1,
            decided_by: 0,
            named_by: 0,
            lsm_flags: 0,
            ktime_ns: 0,
            end_ktime_ns: 0,
            len: 0,
            ret: 0,
            cgroup_id: 0,
            decided_at: 0,
            pid: 0,
            tid: 0,
            ppid: 0,
            uid: 0,
            gid: 0,
            path_len: 0,
            comm: [0; COMM_LEN],
            name: [0; NAME_LEN],
            params: [0; PARAMS_LEN],
            path: [0; PATH_LEN],
            cgroup_v1_id: 0,
            ancestors_len: 0,
            _reserved2: 0,
            ancestors: [RawAncestor::zeroed(); ANCESTORS],
            blocked_by: 0,
            signal: 0,
            repeat: 0,
            repeat_final: 0,
            _reserved3: 0,
        }
    }
}

/// The record carries no implicit padding: every byte is a field the programs set (the kernel
/// must not leak uninitialised memory into a record, and userspace reads it field by field).
const _: () = {
    use core::mem::{offset_of, size_of};
    let fields_end = offset_of!(RawEvent, signal) + 4;
    assert!(fields_end == size_of::<RawEvent>());
    // The repeat fields right after the strings: kmodmon-ebpf repeat.rs skips those words.
    assert!(offset_of!(RawEvent, repeat) == offset_of!(RawEvent, path) + PATH_LEN);
    assert!(offset_of!(RawEvent, cgroup_v1_id) == offset_of!(RawEvent, repeat) + 16);
    assert!(
        offset_of!(RawEvent, blocked_by)
            == offset_of!(RawEvent, ancestors) + ANCESTORS * size_of::<RawAncestor>()
    );
    assert!(size_of::<RawAncestor>() == 8 + 4 + 4 + COMM_LEN);
    // The size the ring buffer's sizing comment (kmodmon-ebpf maps.rs) assumes.
    assert!(size_of::<RawEvent>() == 1176);
    // kmodmon-ebpf compares attempts word by word and zeroes the strings as one block.
    assert!(size_of::<RawEvent>().is_multiple_of(8));
    assert!(offset_of!(RawEvent, name).is_multiple_of(8));
    assert!(offset_of!(RawEvent, params) == offset_of!(RawEvent, name) + NAME_LEN);
    assert!(offset_of!(RawEvent, path) == offset_of!(RawEvent, params) + PARAMS_LEN);
    assert!(offset_of!(RawEvent, ktime_ns) == 14 * 4);
    assert!(offset_of!(RawEvent, comm) == 14 * 4 + 6 * 8 + 6 * 4);
};
