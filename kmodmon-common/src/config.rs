//! What userspace resolved about this kernel (tracepoint layouts, BTF offsets), handed to the
//! programs before load.

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

    // cgroup v1 (kmodmon-ebpf cgroup_v1.rs): task->cgroups->subsys[ssid]->cgroup->kn->id.
    /// The subsystem id (`enum cgroup_subsys_id` in BTF, e.g. `memory_cgrp_id`) whose v1
    /// hierarchy attributes tasks; [`OFFSET_UNKNOWN`] when no v1 hierarchy is followed.
    pub cgroup_v1_ssid: u32,
    /// That hierarchy's id (/proc/cgroups; cgroup_mkdir's `root`): its mkdir/rmdir records go
    /// to the cgroup ring as well. [`OFFSET_UNKNOWN`] when none.
    pub cgroup_v1_hierarchy: u32,
    pub task_cgroups: u32,
    pub css_set_subsys: u32,
    pub css_cgroup: u32,
    pub css_parent: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    // Process ancestry recorded with each event.
    pub task_group_leader: u32,
    pub task_start_boottime: u32,
    pub task_comm: u32,
    // ---- module syscalls refused before they ran (seccomp) ----
    /// 1 = report them; 0 = count their exit records as `exit_without_enter`, as before.
    pub seccomp_attempts: u32,
    /// How a program finds the current task's saved user registers where its hook does not
    /// hand them over: one of [`USER_REGS_NONE`], [`USER_REGS_HELPER`], [`USER_REGS_STACK`].
    pub user_regs: u32,
    /// `task_struct.stack` (for [`USER_REGS_STACK`]).
    pub task_stack: u32,
    /// `task_struct.seccomp.mode`: non-zero when the task runs under seccomp.
    pub task_seccomp_mode: u32,
    /// `task_struct.exit_code` (the signal a task died of, in its low 7 bits).
    pub task_exit_code: u32,
    /// `task_struct.start_time` (tells a reused thread id from the task that had it).
    pub task_start_time: u32,
    /// `struct pt_regs` member the syscall's result is returned in (x86_64 `ax`, arm64
    /// `regs[0]`): what the caller saw.
    pub pt_regs_ret: u32,
    /// Parameters of `__seccomp_filter` (3 up to 6.12, 2 later): its result follows them in
    /// an fexit program's context.
    pub seccomp_filter_nargs: u32,
    /// SIGSYS on this architecture.
    pub sigsys: u32,
    /// syscalls:sys_exit_* `__syscall_nr`.
    pub sys_exit_nr: Field,
    /// Identical attempts of one task closer than this (µs) are aggregated into repeat
    /// records; 0 turns aggregation off.
    pub repeat_window_us: u32,
    /// While a burst goes on, a repeat record at most this often (µs).
    pub repeat_report_us: u32,
}

/// Marks an offset BTF did not provide.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

/// [`Config::user_regs`]: no way to find a task's user registers (arguments of refused
/// attempts are then missing).
pub const USER_REGS_NONE: u32 = 0;
/// [`Config::user_regs`]: `bpf_task_pt_regs(bpf_get_current_task_btf())` (Linux 5.15+).
pub const USER_REGS_HELPER: u32 = 1;
/// [`Config::user_regs`]: `task->stack` plus the offset a calibration program measured at
/// start-up (slot 0 of the `USER_REGS_OFFSET` map), for kernels without the helper.
pub const USER_REGS_STACK: u32 = 2;

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
            cgroup_v1_ssid: OFFSET_UNKNOWN,
            cgroup_v1_hierarchy: OFFSET_UNKNOWN,
            task_cgroups: OFFSET_UNKNOWN,
            css_set_subsys: OFFSET_UNKNOWN,
            css_cgroup: OFFSET_UNKNOWN,
            css_parent: OFFSET_UNKNOWN,
            cgroup_kn: OFFSET_UNKNOWN,
            kernfs_node_id: OFFSET_UNKNOWN,
            task_group_leader: OFFSET_UNKNOWN,
            task_start_boottime: OFFSET_UNKNOWN,
            task_comm: OFFSET_UNKNOWN,
            seccomp_attempts: 0,
            user_regs: USER_REGS_NONE,
            task_stack: OFFSET_UNKNOWN,
            task_seccomp_mode: OFFSET_UNKNOWN,
            task_exit_code: OFFSET_UNKNOWN,
            task_start_time: OFFSET_UNKNOWN,
            pt_regs_ret: OFFSET_UNKNOWN,
            seccomp_filter_nargs: 0,
            sigsys: 0,
            sys_exit_nr: Field::UNSET,
            repeat_window_us: 0,
            repeat_report_us: 0,
        }
    }
}
