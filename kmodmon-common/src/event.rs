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

/// What happened.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The kernel finished loading a module (module:module_load).
    Load = 1,
    /// The kernel freed a module (module:module_free).
    Unload = 2,
    /// The kernel was asked to autoload a module (module:module_request).
    Request = 3,
    /// A task called init_module or finit_module (with its result).
    LoadAttempt = 4,
    /// A task called delete_module (with its result).
    UnloadAttempt = 5,
    /// The BPF LSM denied a load or autoload request (enforce mode). `taints` holds the
    /// policy rule id that decided.
    Denied = 6,
    /// The BPF LSM would have denied it (audit mode); `taints` holds the rule id.
    WouldDeny = 7,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Load,
        EventKind::Unload,
        EventKind::Request,
        EventKind::LoadAttempt,
        EventKind::UnloadAttempt,
        EventKind::Denied,
        EventKind::WouldDeny,
    ];

    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Load),
            2 => Some(Self::Unload),
            3 => Some(Self::Request),
            4 => Some(Self::LoadAttempt),
            5 => Some(Self::UnloadAttempt),
            6 => Some(Self::Denied),
            7 => Some(Self::WouldDeny),
            _ => None,
        }
    }

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

/// Which kernel hook produced an event.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// module:module_load / module_free / module_request tracepoints.
    ModuleTracepoint = 1,
    /// fexit on the syscall's own kernel function (no cost to other syscalls).
    Fexit = 2,
    /// syscalls:sys_enter_* / sys_exit_* tracepoints.
    SyscallTracepoint = 3,
    /// raw_syscalls:sys_enter / sys_exit, filtered in the kernel by syscall number.
    RawSyscalls = 4,
    /// BPF LSM hooks (policy enforcement).
    Lsm = 5,
}

impl Source {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::ModuleTracepoint),
            2 => Some(Self::Fexit),
            3 => Some(Self::SyscallTracepoint),
            4 => Some(Self::RawSyscalls),
            5 => Some(Self::Lsm),
            _ => None,
        }
    }
}

/// Which module syscall an attempt used.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    None = 0,
    InitModule = 1,
    FinitModule = 2,
    DeleteModule = 3,
}

impl Op {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::InitModule),
            2 => Some(Self::FinitModule),
            3 => Some(Self::DeleteModule),
            _ => None,
        }
    }
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
    /// module_load taints; module_request `wait`; denied / would_deny: the policy rule id.
    pub taints: u32,
    /// finit_module / delete_module flags.
    pub flags: u32,
    /// finit_module fd (-1 when not applicable).
    pub fd: i32,
    /// bpf_ktime_get_ns() when the event started (syscall entry for attempts).
    pub ktime_ns: u64,
    /// bpf_ktime_get_ns() when the syscall returned (attempts), else equal to `ktime_ns`.
    pub end_ktime_ns: u64,
    /// init_module image length.
    pub len: u64,
    /// Syscall return value (0 or -errno); 0 for kernel-record events.
    pub ret: i64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Slots used in `path` (components, leaf first).
    pub path_len: u32,
    pub comm: [u8; COMM_LEN],
    pub name: [u8; NAME_LEN],
    pub params: [u8; PARAMS_LEN],
    pub path: [u8; PATH_LEN],
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
            flags: 0,
            fd: -1,
            ktime_ns: 0,
            end_ktime_ns: 0,
            len: 0,
            ret: 0,
            cgroup_id: 0,
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
        }
    }
}
