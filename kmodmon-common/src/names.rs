//! The name of every program, map and global in the eBPF object: userspace looks them up by
//! these constants only. The eBPF side names them by its functions and statics (the attribute
//! macros take no constants), so kmodmon's `probe::tests::names_match_the_object` opens the
//! compiled object and checks that both sides list the same names: a rename on one side fails
//! that test.

/// Programs (function names in kmodmon-ebpf).
pub mod program {
    /// module:module_load.
    pub const MODULE_LOAD: &str = "module_load";
    /// module:module_free.
    pub const MODULE_FREE: &str = "module_free";
    /// module:module_request.
    pub const MODULE_REQUEST: &str = "module_request";
    /// fexit on the syscalls' kernel functions.
    pub const FEXIT_INIT_MODULE: &str = "fexit_init_module";
    pub const FEXIT_FINIT_MODULE: &str = "fexit_finit_module";
    pub const FEXIT_DELETE_MODULE: &str = "fexit_delete_module";
    /// syscalls:sys_enter_* and (one program for all three) sys_exit_*.
    pub const SYS_ENTER_INIT_MODULE: &str = "sys_enter_init_module";
    pub const SYS_ENTER_FINIT_MODULE: &str = "sys_enter_finit_module";
    pub const SYS_ENTER_DELETE_MODULE: &str = "sys_enter_delete_module";
    pub const SYS_EXIT_MODULE: &str = "sys_exit_module";
    /// raw_syscalls:sys_enter / sys_exit tracepoints.
    pub const RAW_SYS_ENTER: &str = "raw_sys_enter";
    pub const RAW_SYS_EXIT: &str = "raw_sys_exit";
    /// Raw tracepoint on sys_exit (attempts from the saved registers at syscall exit).
    pub const RAW_TP_SYS_EXIT: &str = "raw_tp_sys_exit";
    /// cgroup:cgroup_mkdir / cgroup_rmdir.
    pub const CGROUP_MKDIR: &str = "cgroup_mkdir";
    pub const CGROUP_RMDIR: &str = "cgroup_rmdir";
    /// BPF LSM programs (policy enforcement), named after their hooks.
    pub const KERNEL_MODULE_REQUEST: &str = "kernel_module_request";
    pub const KERNEL_READ_FILE: &str = "kernel_read_file";
    pub const KERNEL_LOAD_DATA: &str = "kernel_load_data";
    pub const KERNEL_POST_LOAD_DATA: &str = "kernel_post_load_data";
    pub const KERNEL_POST_READ_FILE: &str = "kernel_post_read_file";
    pub const KERNFS_INIT_SECURITY: &str = "kernfs_init_security";
    /// fexit on `__seccomp_filter`: module syscalls a seccomp filter refused.
    pub const FEXIT_SECCOMP_FILTER: &str = "fexit_seccomp_filter";
    /// The same for the two-parameter `__seccomp_filter` of later kernels.
    pub const FEXIT_SECCOMP_FILTER_2: &str = "fexit_seccomp_filter_2";
    /// Raw tracepoint `sched_process_exit`: tasks killed by SIGSYS in a module syscall.
    pub const SECCOMP_TASK_EXIT: &str = "seccomp_task_exit";
    /// fentry on `do_exit`: the same, where the dying task's memory is still readable.
    pub const SECCOMP_DO_EXIT: &str = "seccomp_do_exit";
    /// Raw tracepoint `sys_enter`, attached for a moment at start-up: where a task's user
    /// registers lie relative to its stack (kernels without `bpf_task_pt_regs`).
    pub const CALIBRATE_USER_REGS: &str = "calibrate_user_regs";

    /// Module identity (kmodmon-ebpf identity.rs): fentry on load_module and on
    /// security_kernel_post_load_data (image capture), raw tracepoint module_load (sig_ok).
    pub const IDENTITY_LOAD_MODULE: &str = "identity_load_module";
    pub const IDENTITY_POST_LOAD_DATA: &str = "identity_post_load_data";
    pub const IDENTITY_MODULE_LOAD: &str = "identity_module_load";

    /// kprobes on the syscalls' kernel functions.
    pub const KPROBE_INIT_MODULE: &str = "kprobe_init_module";
    pub const KPROBE_FINIT_MODULE: &str = "kprobe_finit_module";
    pub const KPROBE_DELETE_MODULE: &str = "kprobe_delete_module";
    /// Return probe on the same functions (one program, attached to a tracefs kretprobe event
    /// of each).
    pub const KRETPROBE_MODULE: &str = "kretprobe_module";
    /// tp_btf on sys_exit (attempts from the saved registers at syscall exit).
    pub const TP_BTF_SYS_EXIT: &str = "tp_btf_sys_exit";
    /// Raw tracepoint on sched_process_exit: marks the exiting task's repeat bursts.
    pub const REPEAT_TASK_EXIT: &str = "repeat_task_exit";
    /// An empty fexit program: asks the kernel whether it lets a trampoline attach to the
    /// attempt functions before the real fexit programs pay for verification (a kernel that
    /// refuses them may do so only after verifying the whole program).
    pub const FEXIT_PROBE: &str = "fexit_probe";

    /// Every program in the object.
    pub const ALL: [&str; 36] = [
        MODULE_LOAD,
        MODULE_FREE,
        MODULE_REQUEST,
        FEXIT_INIT_MODULE,
        FEXIT_FINIT_MODULE,
        FEXIT_DELETE_MODULE,
        SYS_ENTER_INIT_MODULE,
        SYS_ENTER_FINIT_MODULE,
        SYS_ENTER_DELETE_MODULE,
        SYS_EXIT_MODULE,
        RAW_SYS_ENTER,
        RAW_SYS_EXIT,
        RAW_TP_SYS_EXIT,
        CGROUP_MKDIR,
        CGROUP_RMDIR,
        KERNEL_MODULE_REQUEST,
        KERNEL_READ_FILE,
        KERNEL_LOAD_DATA,
        KERNEL_POST_LOAD_DATA,
        KERNEL_POST_READ_FILE,
        KERNFS_INIT_SECURITY,
        FEXIT_SECCOMP_FILTER,
        FEXIT_SECCOMP_FILTER_2,
        SECCOMP_TASK_EXIT,
        SECCOMP_DO_EXIT,
        CALIBRATE_USER_REGS,
        IDENTITY_LOAD_MODULE,
        IDENTITY_POST_LOAD_DATA,
        IDENTITY_MODULE_LOAD,
        KPROBE_INIT_MODULE,
        KPROBE_FINIT_MODULE,
        KPROBE_DELETE_MODULE,
        KRETPROBE_MODULE,
        TP_BTF_SYS_EXIT,
        REPEAT_TASK_EXIT,
        FEXIT_PROBE,
    ];
}

/// Maps (static names in kmodmon-ebpf).
pub mod map {
    /// Module events ([`crate::RawEvent`] records); the LSM programs' denied / would_deny too.
    pub const EVENTS: &str = "EVENTS";
    /// cgroup mkdir/rmdir records ([`crate::RawCgroupEvent`]).
    pub const CGROUPS: &str = "CGROUPS";
    /// Per-CPU counters, indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Attempts between syscall entry and exit.
    pub const PENDING: &str = "PENDING";
    /// Per-CPU working space (kernel side only; listed so the object check is complete).
    pub const SCRATCH: &str = "SCRATCH";
    /// Policy: cgroup id → [`crate::policy::Decision`].
    pub const POLICY_CGROUPS: &str = "POLICY_CGROUPS";
    /// Policy: [`crate::policy::AllowKey`] → 1.
    pub const POLICY_ALLOW: &str = "POLICY_ALLOW";
    /// Policy: [`crate::policy::Settings`] in slot 0.
    pub const POLICY_SETTINGS: &str = "POLICY_SETTINGS";
    /// Slot 0: the [`crate::CONTRACT_VERSION`] of the pinned LSM programs.
    pub const CONTRACT: &str = "CONTRACT";
    /// Policy: [`crate::policy::ParentKey`] → 1 (container parents).
    pub const POLICY_PARENTS: &str = "POLICY_PARENTS";
    /// Policy: [`crate::policy::PrefixRule`]s (container names at any depth).
    pub const POLICY_PREFIXES: &str = "POLICY_PREFIXES";
    /// What a kmodmon already reported of the LSM programs' counters
    /// ([`crate::policy::ACK_LOST`]).
    pub const POLICY_ACK: &str = "POLICY_ACK";
    /// Algorithm name → [`crate::policy::CryptoOrigin`] (LRU).
    pub const CRYPTO_REQUESTS: &str = "CRYPTO_REQUESTS";
    /// pid_tgid → [`crate::policy::LoadStash`] (LRU).
    pub const LOAD_STASH: &str = "LOAD_STASH";
    /// Per-CPU working space of the LSM programs (kernel side only).
    pub const LSM_SCRATCH: &str = "LSM_SCRATCH";
    /// aya-log's ring buffer (aya-log-ebpf defines it; `aya_log::EbpfLogger` finds it).
    pub const AYA_LOGS: &str = "AYA_LOGS";
    /// Slot 0: offset of a task's saved user registers from its stack (calibrated).
    pub const USER_REGS_OFFSET: &str = "USER_REGS_OFFSET";
    /// Thread id → start time of tasks whose seccomp SIGSYS was already reported.
    pub const SECCOMP_SIGNALLED: &str = "SECCOMP_SIGNALLED";
    /// Module images for identity ([`crate::identity`] records).
    pub const IMAGES: &str = "IMAGES";
    /// pid_tgid → init_module image already captured at security_kernel_post_load_data.
    pub const IMAGE_CAPTURED: &str = "IMAGE_CAPTURED";

    /// Open repeat bursts: [`crate::RepeatKey`] → [`crate::RepeatSlot`].
    pub const REPEATS: &str = "REPEATS";
    /// Per-CPU staging for a new burst (kernel side only).
    pub const REPEAT_SCRATCH: &str = "REPEAT_SCRATCH";

    /// Maps only the LSM programs use (the monitor creates them at their smallest).
    pub const LSM_ONLY: [&str; 9] = [
        POLICY_CGROUPS,
        POLICY_ALLOW,
        POLICY_PARENTS,
        POLICY_PREFIXES,
        POLICY_ACK,
        CRYPTO_REQUESTS,
        LOAD_STASH,
        LSM_SCRATCH,
        CONTRACT,
    ];

    /// Every map in the object (not counting the sections of global data).
    pub const ALL: [&str; 22] = [
        EVENTS,
        CGROUPS,
        COUNTERS,
        PENDING,
        SCRATCH,
        POLICY_CGROUPS,
        POLICY_ALLOW,
        POLICY_SETTINGS,
        CONTRACT,
        AYA_LOGS,
        POLICY_PARENTS,
        POLICY_PREFIXES,
        POLICY_ACK,
        CRYPTO_REQUESTS,
        LOAD_STASH,
        LSM_SCRATCH,
        USER_REGS_OFFSET,
        SECCOMP_SIGNALLED,
        IMAGES,
        IMAGE_CAPTURED,
        REPEATS,
        REPEAT_SCRATCH,
    ];
}

/// Globals userspace writes before load (`EbpfLoader::override_global`).
pub mod global {
    /// [`crate::Config`].
    pub const CONFIG: &str = "KMODMON_CONFIG";
    /// [`crate::policy::LsmConfig`].
    pub const LSM_CONFIG: &str = "KMODMON_LSM_CONFIG";
    /// [`crate::identity::IdentityConfig`].
    pub const IDENTITY_CONFIG: &str = "KMODMON_IDENTITY_CONFIG";

    /// Every global userspace writes.
    pub const ALL: [&str; 3] = [CONFIG, LSM_CONFIG, IDENTITY_CONFIG];
}
