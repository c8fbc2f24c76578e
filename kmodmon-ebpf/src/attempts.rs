//! Attempt sources that cost other syscalls nothing, or as little as a syscall-wide hook can:
//!
//! - kprobe + kretprobe on the syscalls' kernel functions (kernels where fexit is refused, e.g.
//!   5.10, whose BTF describes `struct pt_regs` only as a forward declaration there). The entry
//!   builds the attempt from the user registers the function is given and parks it (as the
//!   syscall tracepoints do); the return completes it. Userspace attaches the return program to
//!   a tracefs kretprobe event with an explicit maxactive: the default of a perf kretprobe
//!   (one instance per CPU on a kernel without CONFIG_PREEMPTION) misses returns as soon as a
//!   few tasks sleep inside finit_module at once.
//! - tp_btf on sys_exit alone (kernels without kprobes and fexit, such as one without module
//!   support): one program instead of two, the syscall number read by a direct load.
//! - the task-exit program that closes the exiting task's repeat bursts (repeat.rs).
use aya_ebpf::{
    macros::{btf_tracepoint, kprobe, kretprobe, raw_tracepoint},
    programs::{BtfTracePointContext, ProbeContext, RawTracePointContext, RetProbeContext},
};
use kmodmon_common::{OFFSET_UNKNOWN, Op, Source};

use crate::{
    config::conf,
    kernel::read_ptr,
    op_of,
    record::{exit_attempt, syscall_enter, syscall_exit},
};

/// `__x64_sys_*(const struct pt_regs *regs)`: the entry of one module syscall.
#[inline(always)]
fn kprobe_enter(ctx: &ProbeContext, op: Op) {
    let regs: u64 = ctx.arg(0).unwrap_or(0);
    let a0 = read_ptr(regs, conf!(pt_regs_arg[0])).unwrap_or(0);
    let a1 = read_ptr(regs, conf!(pt_regs_arg[1])).unwrap_or(0);
    let a2 = read_ptr(regs, conf!(pt_regs_arg[2])).unwrap_or(0);
    syscall_enter(Source::Kprobe, op, a0, a1, a2);
}

#[kprobe]
pub fn kprobe_init_module(ctx: ProbeContext) -> u32 {
    kprobe_enter(&ctx, Op::InitModule);
    0
}

#[kprobe]
pub fn kprobe_finit_module(ctx: ProbeContext) -> u32 {
    kprobe_enter(&ctx, Op::FinitModule);
    0
}

#[kprobe]
pub fn kprobe_delete_module(ctx: ProbeContext) -> u32 {
    kprobe_enter(&ctx, Op::DeleteModule);
    0
}

/// The return of any of the three (the parked attempt says which).
#[kretprobe]
pub fn kretprobe_module(ctx: RetProbeContext) -> u32 {
    let ret: i64 = ctx.ret();
    syscall_exit(&ctx, ret);
    0
}

/// sys_exit(struct pt_regs *regs, long ret) with BTF types: the syscall number is read by a
/// direct load (no helper call) on the path every syscall takes.
#[btf_tracepoint(function = "sys_exit")]
pub fn tp_btf_sys_exit(ctx: BtfTracePointContext) -> i32 {
    let regs: u64 = ctx.arg(0);
    let off = conf!(pt_regs_syscall_nr);
    if off == OFFSET_UNKNOWN {
        return 0;
    }
    // SAFETY: `regs` is the kernel's typed `struct pt_regs *`; the offset of its syscall-number
    // member comes from BTF and the verifier checks the access against the type.
    let nr = unsafe { core::ptr::read_volatile((regs + off as u64) as *const u64) };
    let Some(op) = op_of(nr) else {
        return 0;
    };
    let ret: i64 = ctx.arg(1);
    exit_attempt(Source::SysExit, op, regs, ret);
    0
}

/// sched_process_exit(struct task_struct *p): the exiting task's bursts are closed.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn repeat_task_exit(_ctx: RawTracePointContext) -> i32 {
    crate::repeat::task_exit();
    0
}
