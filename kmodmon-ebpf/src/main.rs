//! kmodmon's kernel side. Three kinds of source, attached per kernel by userspace:
//!
//! 1. `module:*` tracepoints: the kernel's own record of loads, frees and autoload requests;
//! 2. attempts (init_module / finit_module / delete_module with their result) from, cheapest
//!    first: fexit on the syscalls' kernel functions, kprobe + kretprobe on them (attempts.rs),
//!    tp_btf on sys_exit alone (attempts.rs), `syscalls:sys_{enter,exit}_*`, a raw tracepoint
//!    on sys_exit alone, or `raw_syscalls:sys_{enter,exit}` filtered here by syscall number;
//!    identical repeated attempts are aggregated (repeat.rs); attempts a seccomp filter refused
//!    before they ran (seccomp.rs);
//! 3. `cgroup:cgroup_{mkdir,rmdir}` of cgroup2 and of the cgroup v1 hierarchy userspace
//!    follows (if any), so userspace can name a cgroup after it is gone.
#![no_std]
#![no_main]

mod ancestry;
mod attempts;
mod cgroup_v1;
mod config;
mod identity;
mod kernel;
mod lsm;
mod maps;
mod record;
mod repeat;
mod seccomp;

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{fexit, raw_tracepoint, tracepoint},
    programs::{FExitContext, RawTracePointContext, TracePointContext},
};
use kmodmon_common::{
    CGROUP_MKDIR, CGROUP_RMDIR, Counter, EventKind, Field, OFFSET_UNKNOWN, Op, RawCgroupEvent,
    Source,
};

use crate::{
    config::conf,
    kernel::{read_kernel_str, read_ptr},
    maps::{CGROUPS, count},
    record::{
        Extra, attempt_kind, begin, exit_attempt, fill_attempt, module_record, read_field,
        syscall_enter, syscall_exit,
    },
};

// ---- 1. module:* tracepoints ----

#[tracepoint]
pub fn module_load(ctx: TracePointContext) -> u32 {
    module_record(
        &ctx,
        EventKind::Load,
        conf!(load_name),
        Extra::Taints(conf!(load_taints)),
    );
    0
}

#[tracepoint]
pub fn module_free(ctx: TracePointContext) -> u32 {
    module_record(&ctx, EventKind::Unload, conf!(free_name), Extra::None);
    0
}

#[tracepoint]
pub fn module_request(ctx: TracePointContext) -> u32 {
    module_record(
        &ctx,
        EventKind::Request,
        conf!(request_name),
        Extra::Wait(conf!(request_wait)),
    );
    0
}

// ---- 2a. fexit on the syscalls' kernel functions ----

/// The syscall wrappers take the user's `struct pt_regs *`; its argument registers' offsets
/// come from BTF.
#[inline(always)]
fn fexit_attempt(ctx: &FExitContext, op: Op) {
    let regs: u64 = ctx.arg(0);
    let Some(ev) = begin(attempt_kind(op), Source::Fexit) else {
        return;
    };
    let a0 = read_ptr(regs, conf!(pt_regs_arg[0])).unwrap_or(0);
    let a1 = read_ptr(regs, conf!(pt_regs_arg[1])).unwrap_or(0);
    let a2 = read_ptr(regs, conf!(pt_regs_arg[2])).unwrap_or(0);
    fill_attempt(ev, op, a0, a1, a2);
    match ctx.ret::<i64>() {
        Ok(ret) => ev.ret = ret,
        Err(_) => {
            // Older kernels lack bpf_get_func_ret; the return value follows the one argument.
            count(Counter::ErrFuncRet);
            ev.ret = ctx.arg::<i64>(1);
        }
    }
    // fexit sees only the return: the event's time is the syscall's end, and its duration is
    // unknown (not the time this program took).
    ev.end_ktime_ns = ev.ktime_ns;
    aya_log_ebpf::debug!(ctx, "fexit attempt op={} ret={}", op as u32, ev.ret);
    crate::repeat::deliver(ev);
}

#[fexit]
pub fn fexit_init_module(ctx: FExitContext) -> i32 {
    fexit_attempt(&ctx, Op::InitModule);
    0
}

#[fexit]
pub fn fexit_finit_module(ctx: FExitContext) -> i32 {
    fexit_attempt(&ctx, Op::FinitModule);
    0
}

#[fexit]
pub fn fexit_delete_module(ctx: FExitContext) -> i32 {
    fexit_attempt(&ctx, Op::DeleteModule);
    0
}

/// Does nothing: loaded and attached first, so that a kernel refusing trampolines says so
/// before the attempt programs above are verified.
#[fexit]
pub fn fexit_probe(_ctx: FExitContext) -> i32 {
    0
}

// ---- 2b. syscalls:sys_enter_* / sys_exit_* ----

#[tracepoint]
pub fn sys_enter_init_module(ctx: TracePointContext) -> u32 {
    let umod = read_field(&ctx, conf!(init_umod)).unwrap_or(0);
    let len = read_field(&ctx, conf!(init_len)).unwrap_or(0);
    let uargs = read_field(&ctx, conf!(init_uargs)).unwrap_or(0);
    syscall_enter(Source::SyscallTracepoint, Op::InitModule, umod, len, uargs);
    0
}

#[tracepoint]
pub fn sys_enter_finit_module(ctx: TracePointContext) -> u32 {
    let fd = read_field(&ctx, conf!(finit_fd)).unwrap_or(u64::MAX);
    let uargs = read_field(&ctx, conf!(finit_uargs)).unwrap_or(0);
    let flags = read_field(&ctx, conf!(finit_flags)).unwrap_or(0);
    syscall_enter(Source::SyscallTracepoint, Op::FinitModule, fd, uargs, flags);
    0
}

#[tracepoint]
pub fn sys_enter_delete_module(ctx: TracePointContext) -> u32 {
    let name = read_field(&ctx, conf!(delete_name)).unwrap_or(0);
    let flags = read_field(&ctx, conf!(delete_flags)).unwrap_or(0);
    syscall_enter(Source::SyscallTracepoint, Op::DeleteModule, name, flags, 0);
    0
}

/// Attached to all three sys_exit_* tracepoints.
#[tracepoint]
pub fn sys_exit_module(ctx: TracePointContext) -> u32 {
    let ret = read_field(&ctx, conf!(sys_exit_ret)).unwrap_or(0) as i64;
    if !syscall_exit(&ctx, ret) {
        let nr = read_field(&ctx, conf!(sys_exit_nr)).unwrap_or(u64::MAX);
        seccomp::unmatched_exit(Source::SyscallTracepoint, nr, None, ret);
    }
    0
}

// ---- 2c. raw_syscalls fallback ----

#[inline(always)]
pub(crate) fn op_of(nr: u64) -> Option<Op> {
    if nr == conf!(nr_finit_module) as u64 {
        Some(Op::FinitModule)
    } else if nr == conf!(nr_init_module) as u64 {
        Some(Op::InitModule)
    } else if nr == conf!(nr_delete_module) as u64 {
        Some(Op::DeleteModule)
    } else {
        None
    }
}

/// Reads an 8-byte field of the tracepoint record directly (no helper call): the offset is a
/// load-time constant from the frozen configuration, so the verifier can check the access.
/// Used on the per-syscall hot path.
#[inline(always)]
fn ctx_u64(ctx: &TracePointContext, offset: u32) -> u64 {
    // SAFETY: the offset comes from this tracepoint's format file and lies inside the record.
    unsafe { core::ptr::read_volatile((ctx_ptr(ctx) + offset as u64) as *const u64) }
}

#[tracepoint]
pub fn raw_sys_enter(ctx: TracePointContext) -> u32 {
    // Every syscall on the machine comes through here: leave as early as possible.
    let nr = ctx_u64(&ctx, conf!(raw_enter_id.offset));
    let Some(op) = op_of(nr) else {
        return 0;
    };
    let args = conf!(raw_enter_args);
    let arg = |i: u32| {
        read_field(
            &ctx,
            Field {
                offset: args.offset + i * 8,
                size: 8,
            },
        )
        .unwrap_or(0)
    };
    syscall_enter(Source::RawSyscalls, op, arg(0), arg(1), arg(2));
    0
}

#[tracepoint]
pub fn raw_sys_exit(ctx: TracePointContext) -> u32 {
    let nr = ctx_u64(&ctx, conf!(raw_exit_id.offset));
    if op_of(nr).is_none() {
        return 0;
    }
    let ret = read_field(&ctx, conf!(raw_exit_ret)).unwrap_or(0) as i64;
    if !syscall_exit(&ctx, ret) {
        seccomp::unmatched_exit(Source::RawSyscalls, nr, None, ret);
    }
    0
}

// ---- 2d. raw tracepoint on sys_exit alone (no BTF needed; see attempts.rs for tp_btf) ----

/// sys_exit(struct pt_regs *regs, long ret): an attempt seen at its exit only. No program on
/// sys_enter: every other syscall pays for one program instead of two.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_tp_sys_exit(ctx: RawTracePointContext) -> i32 {
    let regs: u64 = ctx.arg(0);
    let Some(nr) = read_ptr(regs, conf!(pt_regs_syscall_nr)) else {
        return 0;
    };
    let Some(op) = op_of(nr) else {
        return 0;
    };
    let ret: i64 = ctx.arg(1);
    exit_attempt(Source::SysExit, op, regs, ret);
    0
}

// ---- 3. cgroup directories (cgroup2, and the v1 hierarchy followed) ----

#[inline(always)]
fn cgroup_record(ctx: &TracePointContext, op: u32) {
    let root = read_field(ctx, conf!(cgroup_root)).unwrap_or(u64::MAX);
    // Ids are unique only within a hierarchy: the record says which one.
    if root != conf!(cgroup_dfl_hierarchy) as u64 && root != conf!(cgroup_v1_hierarchy) as u64 {
        return;
    }
    count(Counter::SeenCgroup);
    let Some(mut entry) = CGROUPS.reserve::<RawCgroupEvent>(0) else {
        count(Counter::DropCgroupRingbufFull);
        return;
    };
    // SAFETY: the reservation is exclusively ours and large enough for the type.
    let rec = unsafe { &mut *entry.as_mut_ptr() };
    rec.op = op;
    rec.truncated = 0;
    rec.hierarchy = root as u32;
    rec._reserved = 0;
    rec.id = read_field(ctx, conf!(cgroup_id)).unwrap_or(0);
    rec.ktime_ns = unsafe { bpf_ktime_get_ns() };
    rec.path[0] = 0;
    let path = conf!(cgroup_path);
    if path.offset != OFFSET_UNKNOWN {
        let loc = read_field(
            ctx,
            Field {
                offset: path.offset,
                size: 4,
            },
        )
        .unwrap_or(0);
        let src = ctx_ptr(ctx) + (loc & 0xffff);
        match read_kernel_str(src, &mut rec.path) {
            Some((_, true)) => rec.truncated = 1,
            Some(_) => {}
            None => rec.path[0] = 0,
        }
    }
    entry.submit(0);
}

#[inline(always)]
fn ctx_ptr(ctx: &TracePointContext) -> u64 {
    use aya_ebpf::EbpfContext;
    ctx.as_ptr() as u64
}

#[tracepoint]
pub fn cgroup_mkdir(ctx: TracePointContext) -> u32 {
    cgroup_record(&ctx, CGROUP_MKDIR);
    0
}

#[tracepoint]
pub fn cgroup_rmdir(ctx: TracePointContext) -> u32 {
    cgroup_record(&ctx, CGROUP_RMDIR);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
