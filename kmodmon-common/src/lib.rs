//! The kernel/user contract of kmodmon: every type that crosses the eBPF boundary.
//!
//! All types are `#[repr(C)]`, contain no padding the kernel could leave uninitialised, and use
//! `u32` for flags (never `bool`). Field offsets inside *kernel* structures are never hard-coded
//! here: userspace resolves them at start-up (tracefs `format` files, BTF) and hands them to the
//! programs in [`Config`].
#![no_std]

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
/// cgroup path bytes carried by cgroup mkdir/rmdir records.
pub const CGROUP_PATH_LEN: usize = 256;

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

/// A cgroup2 directory was created or removed (cgroup:cgroup_mkdir / cgroup_rmdir).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawCgroupEvent {
    /// 1 = mkdir, 2 = rmdir.
    pub op: u32,
    /// Bitmask: 1 = path truncated.
    pub truncated: u32,
    pub id: u64,
    pub ktime_ns: u64,
    pub path: [u8; CGROUP_PATH_LEN],
}

pub const CGROUP_MKDIR: u32 = 1;
pub const CGROUP_RMDIR: u32 = 2;

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

/// A field inside a tracepoint record: where it starts and how wide it is. For `__data_loc`
/// fields `offset` locates the u32 descriptor (low 16 bits: offset, high 16: length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Everything the programs need to know about this kernel, resolved by userspace at start-up
/// and written into the programs' read-only data before load.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Syscall numbers on this architecture.
    pub nr_init_module: u32,
    pub nr_finit_module: u32,
    pub nr_delete_module: u32,
    /// 1 = the module:* tracepoints are attached, so attempt programs need not
    /// duplicate anything (reserved; attempts are always reported).
    pub have_module_tracepoints: u32,

    // raw_syscalls:sys_enter / sys_exit
    pub raw_enter_id: Field,
    pub raw_enter_args: Field,
    pub raw_exit_id: Field,
    pub raw_exit_ret: Field,

    // syscalls:sys_enter_init_module (umod, len, uargs)
    pub init_umod: Field,
    pub init_len: Field,
    pub init_uargs: Field,
    // syscalls:sys_enter_finit_module (fd, uargs, flags)
    pub finit_fd: Field,
    pub finit_uargs: Field,
    pub finit_flags: Field,
    // syscalls:sys_enter_delete_module (name_user, flags)
    pub delete_name: Field,
    pub delete_flags: Field,
    // syscalls:sys_exit_* (ret)
    pub sys_exit_ret: Field,

    // module:module_load (taints, name), module_free (name), module_request (wait, name)
    pub load_taints: Field,
    pub load_name: Field,
    pub free_name: Field,
    pub request_wait: Field,
    pub request_name: Field,

    // cgroup:cgroup_mkdir / cgroup_rmdir (root, id, path)
    pub cgroup_root: Field,
    pub cgroup_id: Field,
    pub cgroup_path: Field,
    /// Hierarchy id of the cgroup2 (default) hierarchy.
    pub cgroup_dfl_hierarchy: u32,

    /// Kernel structure member offsets from BTF; 0xffff_ffff when unknown.
    pub pt_regs_arg: [u32; 3],
    pub task_real_parent: u32,
    pub task_tgid: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_f_path: u32,
    pub path_dentry: u32,
    pub dentry_d_name: u32,
    pub dentry_d_parent: u32,
    pub qstr_name: u32,
    pub path_mnt: u32,
    pub vfsmount_mnt_root: u32,
    /// Offset of `struct vfsmount mnt` inside `struct mount` (container_of).
    pub mount_mnt: u32,
    pub mount_parent: u32,
    pub mount_mountpoint: u32,
    /// `struct pt_regs` member holding the syscall number (x86_64 `orig_ax`, arm64
    /// `syscallno`), for the raw tracepoint on sys_exit.
    pub pt_regs_syscall_nr: u32,
}

/// Marks an offset BTF did not provide.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

impl Field {
    pub const UNSET: Field = Field { offset: 0, size: 0 };
}

impl Config {
    /// A configuration with nothing resolved: every program that needs a value returns early.
    pub const fn unset() -> Self {
        Self {
            nr_init_module: u32::MAX,
            nr_finit_module: u32::MAX,
            nr_delete_module: u32::MAX,
            have_module_tracepoints: 0,
            raw_enter_id: Field::UNSET,
            raw_enter_args: Field::UNSET,
            raw_exit_id: Field::UNSET,
            raw_exit_ret: Field::UNSET,
            init_umod: Field::UNSET,
            init_len: Field::UNSET,
            init_uargs: Field::UNSET,
            finit_fd: Field::UNSET,
            finit_uargs: Field::UNSET,
            finit_flags: Field::UNSET,
            delete_name: Field::UNSET,
            delete_flags: Field::UNSET,
            sys_exit_ret: Field::UNSET,
            load_taints: Field::UNSET,
            load_name: Field::UNSET,
            free_name: Field::UNSET,
            request_wait: Field::UNSET,
            request_name: Field::UNSET,
            cgroup_root: Field::UNSET,
            cgroup_id: Field::UNSET,
            cgroup_path: Field::UNSET,
            cgroup_dfl_hierarchy: 0,
            pt_regs_arg: [OFFSET_UNKNOWN; 3],
            task_real_parent: OFFSET_UNKNOWN,
            task_tgid: OFFSET_UNKNOWN,
            task_files: OFFSET_UNKNOWN,
            files_fdt: OFFSET_UNKNOWN,
            fdtable_max_fds: OFFSET_UNKNOWN,
            fdtable_fd: OFFSET_UNKNOWN,
            file_f_path: OFFSET_UNKNOWN,
            path_dentry: OFFSET_UNKNOWN,
            dentry_d_name: OFFSET_UNKNOWN,
            dentry_d_parent: OFFSET_UNKNOWN,
            qstr_name: OFFSET_UNKNOWN,
            path_mnt: OFFSET_UNKNOWN,
            vfsmount_mnt_root: OFFSET_UNKNOWN,
            mount_mnt: OFFSET_UNKNOWN,
            mount_parent: OFFSET_UNKNOWN,
            mount_mountpoint: OFFSET_UNKNOWN,
            pt_regs_syscall_nr: OFFSET_UNKNOWN,
        }
    }
}

/// Policy enforcement (BPF LSM): the maps userspace fills and the LSM programs read.
pub mod policy {
    /// Bytes of a module (or autoload request) name in an allow-set key: MODULE_NAME_LEN, which
    /// is also the longest name `request_module` passes on. Names are stored normalized
    /// ('-' → '_'), NUL-padded.
    pub const NAME_KEY_LEN: usize = 60;
    /// How many cgroup levels the programs look up, deepest first.
    pub const MAX_CGROUP_DEPTH: u32 = 16;
    /// Key of the entry that applies to cgroups with no mapped ancestor (the host).
    pub const HOST_KEY: u64 = 0;

    /// `Settings::mode`.
    pub const MODE_OFF: u32 = 0;
    pub const MODE_AUDIT: u32 = 1;
    pub const MODE_ENFORCE: u32 = 2;

    /// `Decision::flags`: only modules in `allow_set` may load; everything else is denied.
    pub const RESTRICTED: u32 = 1 << 0;

    /// What applies to one cgroup (and the cgroups below it).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Decision {
        /// Policy rule id, reported in denied / would_deny events.
        pub rule: u32,
        /// Allow-set id ([`AllowKey::set`]).
        pub allow_set: u32,
        /// [`RESTRICTED`] or 0 (everything allowed).
        pub flags: u32,
        pub _reserved: u32,
    }

    /// Key of the allow-set map: (set id, normalized name).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct AllowKey {
        pub set: u32,
        pub name: [u8; NAME_KEY_LEN],
    }

    /// Global settings, slot 0 of the settings array.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Settings {
        /// MODE_OFF, MODE_AUDIT or MODE_ENFORCE.
        pub mode: u32,
        /// Bumped by every policy (re)load.
        pub generation: u32,
    }

    /// `enum kernel_read_file_id` / `enum kernel_load_data_id` values the programs compare
    /// against, resolved from BTF by userspace (written into `KMODMON_LSM_CONFIG`), and how
    /// init_module images are named.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct LsmConfig {
        pub reading_module: u32,
        pub loading_module: u32,
        /// 1 when the kernel_post_load_data program is attached: kernel_load_data then lets
        /// init_module through to it, where the image is read for the module's name.
        pub name_images: u32,
        /// Offset of `name` in `struct module` (BTF), or OFFSET_UNKNOWN.
        pub module_name: u32,
    }

    impl LsmConfig {
        /// The values in every kernel since 5.7 (include/linux/kernel_read_file.h); images not
        /// named.
        pub const DEFAULT: LsmConfig = LsmConfig {
            reading_module: 2,
            loading_module: 2,
            name_images: 0,
            module_name: crate::OFFSET_UNKNOWN,
        };
    }

    /// The section of a module's ELF image that holds its `struct module` (and so its name).
    pub const THIS_MODULE_SECTION: &[u8; 26] = b".gnu.linkonce.this_module\0";
    /// Section headers the image parser looks at, at most.
    pub const MAX_IMAGE_SECTIONS: u32 = 128;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers and integer arrays, and
    // every bit pattern is valid for them.
    unsafe impl aya::Pod for super::RawEvent {}
    unsafe impl aya::Pod for super::RawCgroupEvent {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Field {}
    unsafe impl aya::Pod for super::policy::Decision {}
    unsafe impl aya::Pod for super::policy::AllowKey {}
    unsafe impl aya::Pod for super::policy::Settings {}
    unsafe impl aya::Pod for super::policy::LsmConfig {}
}
