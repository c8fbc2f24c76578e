//! Module syscalls refused before they ran: a seccomp filter (Docker's and Kubernetes' default
//! profiles refuse init_module, finit_module and delete_module) answers for the kernel, so
//! neither the syscall's kernel function nor a syscall-enter tracepoint runs. What is left, per
//! kernel, and used here:
//!
//! - the syscall-exit record (raw tracepoint / tracepoints on sys_exit), which still fires: an
//!   exit with no recorded entry from a task under seccomp is such a refusal; the arguments are
//!   read from the task's saved user registers ([`unmatched_exit`]);
//! - where attempts come from fexit on the syscall functions (nothing on sys_exit), fexit on
//!   `__seccomp_filter`, which only tasks under seccomp call: it leaves at once unless the
//!   syscall is a module syscall and the filter refused it ([`fexit_seccomp_filter`]);
//! - a task killed by SIGSYS inside the filter (RET_KILL_THREAD of a thread that is not the
//!   last one; every kill on 5.10) returns through neither: its exit reports it, unless one of
//!   the two above already did — at the entry of `do_exit` ([`seccomp_do_exit`], where the
//!   task's memory is still there to read the arguments from: kernels that kill inside the
//!   filter, such as 5.10, tear a dying process's memory down before the exit tracepoint),
//!   else at `sched_process_exit` ([`seccomp_task_exit`]).
//!
//! The result the caller saw is the user `ax` after the filter (RET_ERRNO's -errno, a tracer's
//! or supervisor's value). RET_TRAP and RET_KILL roll the registers back (`ax == orig_ax`):
//! the caller got SIGSYS instead of a result, reported as `signal`.
use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, generated},
    macros::{fentry, fexit, map, raw_tracepoint},
    maps::{Array, LruHashMap},
    programs::{FEntryContext, FExitContext, RawTracePointContext},
};
use kmodmon_common::{
    BlockedBy, Counter, OFFSET_UNKNOWN, Op, RawEvent, Source, USER_REGS_HELPER, USER_REGS_STACK,
    missing,
};

use crate::{
    config::conf,
    kernel::{read_ptr, read_u32},
    maps::count,
    op_of,
    record::{attempt_kind, begin, emit, fill_attempt},
};

/// Slot 0: where a task's saved user registers lie, as an offset from `task->stack`, written by
/// [`calibrate_user_regs`] (kernels without `bpf_task_pt_regs`); 0 until measured.
#[map]
pub static USER_REGS_OFFSET: Array<u64> = Array::with_max_entries(1, 0);

/// Thread id → start time of tasks whose SIGSYS from seccomp was reported when the filter
/// returned, so their exit does not report it again. LRU: a task that caught the signal and
/// lived on leaves an entry that ages out.
#[map]
pub static SECCOMP_SIGNALLED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);

/// The current task's saved user registers (its `struct pt_regs` at syscall entry).
#[inline(always)]
pub fn current_user_regs() -> Option<u64> {
    let mode = conf!(user_regs);
    if mode == USER_REGS_HELPER {
        // SAFETY: both helpers take and return kernel-checked BTF pointers (Linux 5.15+; this
        // branch is dead, and never verified, where userspace chose another mode).
        let regs = unsafe { generated::bpf_task_pt_regs(generated::bpf_get_current_task_btf()) };
        return Some(regs as u64);
    }
    if mode == USER_REGS_STACK {
        // SAFETY: returns the current task pointer; reads go through bpf_probe_read_kernel.
        let task = unsafe { bpf_get_current_task() };
        let off = USER_REGS_OFFSET.get(0).copied().unwrap_or(0);
        if let Some(stack) = read_ptr(task, conf!(task_stack))
            && stack != 0
            && off != 0
        {
            return Some(stack + off);
        }
    }
    count(Counter::ErrUserRegs);
    None
}

/// Whether the current task runs under seccomp (`task->seccomp.mode` non-zero).
#[inline(always)]
fn confined() -> bool {
    // SAFETY: as above.
    let task = unsafe { bpf_get_current_task() };
    read_u32(task, conf!(task_seccomp_mode)).is_some_and(|m| m != 0)
}

/// A module syscall's exit record with no entry recorded for it (`nr` is already known to be a
/// module syscall). From a task under seccomp it is a refusal: reported with what the caller
/// saw. Otherwise (the call began before kmodmon attached) it is counted, as it always was.
#[inline(always)]
pub fn unmatched_exit(source: Source, nr: u64, regs: Option<u64>, ret: i64) {
    let Some(op) = op_of(nr) else {
        return;
    };
    if conf!(seccomp_attempts) == 0 || conf!(task_seccomp_mode) == OFFSET_UNKNOWN || !confined() {
        count(Counter::ExitWithoutEnter);
        return;
    }
    // 0: unknown. Plain integers, not Options, from here on: the verifier rejects the spill
    // of a None's undefined payload that the compiler may emit.
    let regs = match regs {
        Some(r) => r,
        None => current_user_regs().unwrap_or(0),
    };
    // Rolled back (`ax == orig_ax`): RET_TRAP or RET_KILL, the caller gets SIGSYS.
    if ret as u64 == nr {
        mark_signalled();
        report(source, op, regs, 0, conf!(sigsys));
    } else {
        report(source, op, regs, ret, 0);
    }
}

/// An attempt seen only at its syscall's exit (the exit-only sources): whether a seccomp
/// filter refused it. Rolled back registers (`ax == orig_ax`) mean RET_TRAP/RET_KILL (SIGSYS).
/// An errno from a task under seccomp counts as refused only where the syscall itself can only
/// fail with ENOSYS (no module support: the stubs return nothing else); where modules exist,
/// a refusal cannot be told from a failure at the exit alone, and is not claimed.
#[inline(always)]
pub fn classify_exit_only(ev: &mut RawEvent, regs: u64, ret: i64) {
    if conf!(seccomp_attempts) == 0 || conf!(task_seccomp_mode) == OFFSET_UNKNOWN || !confined() {
        return;
    }
    let nr = read_ptr(regs, conf!(pt_regs_syscall_nr)).unwrap_or(u64::MAX);
    if ret as u64 == nr {
        mark_signalled();
        ev.blocked_by = BlockedBy::Seccomp as u32;
        ev.signal = conf!(sigsys);
        ev.ret = 0;
    } else if conf!(have_module_tracepoints) == 0 && ret != -ENOSYS {
        ev.blocked_by = BlockedBy::Seccomp as u32;
    }
}

/// ENOSYS, what a kernel without module support answers every module syscall with.
const ENOSYS: i64 = 38;

/// Remembers that this task's SIGSYS was reported (see [`SECCOMP_SIGNALLED`]).
#[inline(always)]
fn mark_signalled() {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: as above.
    let task = unsafe { bpf_get_current_task() };
    let start = read_ptr(task, conf!(task_start_time)).unwrap_or(0);
    if SECCOMP_SIGNALLED
        .insert(tid, start, BPF_ANY as u64)
        .is_err()
    {
        count(Counter::ErrSeccompMark);
    }
}

/// Sends a refused attempt: arguments from the user registers (missing without them), the
/// result the caller saw, or the signal it got instead.
#[inline(always)]
fn report(source: Source, op: Op, regs: u64, ret: i64, signal: u32) {
    let Some(ev) = begin(attempt_kind(op), source) else {
        return;
    };
    fill_from_regs(ev, op, regs);
    ev.blocked_by = BlockedBy::Seccomp as u32;
    ev.signal = signal;
    ev.ret = if signal != 0 { 0 } else { ret };
    // Only the end is seen: no duration.
    ev.end_ktime_ns = ev.ktime_ns;
    // A container looping on a refused insmod is aggregated like any repeated attempt.
    crate::repeat::deliver(ev);
}

#[inline(always)]
fn fill_from_regs(ev: &mut RawEvent, op: Op, regs: u64) {
    if regs != 0 {
        let a0 = read_ptr(regs, conf!(pt_regs_arg[0])).unwrap_or(0);
        let a1 = read_ptr(regs, conf!(pt_regs_arg[1])).unwrap_or(0);
        let a2 = read_ptr(regs, conf!(pt_regs_arg[2])).unwrap_or(0);
        fill_attempt(ev, op, a0, a1, a2);
    } else {
        ev.op = op as u32;
        ev.missing |= match op {
            Op::InitModule => missing::PARAMS,
            Op::FinitModule => missing::PARAMS | missing::PATH,
            Op::DeleteModule => missing::NAME,
            Op::None => 0,
        };
    }
}

/// After the filter ran for `nr` with verdict `verdict` (0 = allowed, -1 = refused).
#[inline(always)]
fn filter_returned(nr: u64, verdict: i32) {
    // Every syscall of every task under seccomp comes through here: leave at once.
    if op_of(nr).is_none() || verdict != -1 {
        // Not a module syscall, or allowed: the syscall runs and the attempt source reports it.
        return;
    }
    refused(nr, current_user_regs().unwrap_or(0));
}

/// The filter refused syscall `nr` of the current task, whose saved user registers are at
/// `regs` (0: unknown).
#[inline(always)]
fn refused(nr: u64, regs: u64) {
    let Some(op) = op_of(nr) else {
        return;
    };
    // Both registers or neither, as plain integers (see unmatched_exit).
    let mut known = false;
    let mut ax = 0u64;
    let mut orig = 0u64;
    if regs != 0
        && let Some(a) = read_ptr(regs, conf!(pt_regs_ret))
        && let Some(o) = read_ptr(regs, conf!(pt_regs_syscall_nr))
    {
        known = true;
        ax = a;
        orig = o;
    }
    match known {
        true if ax == orig => {
            mark_signalled();
            report(Source::Seccomp, op, regs, 0, conf!(sigsys));
        }
        true => report(Source::Seccomp, op, regs, ax as i64, 0),
        _ => {
            let Some(ev) = begin(attempt_kind(op), Source::Seccomp) else {
                return;
            };
            fill_from_regs(ev, op, regs);
            ev.blocked_by = BlockedBy::Seccomp as u32;
            ev.signal = 0;
            ev.ret = 0;
            ev.missing |= missing::RESULT;
            emit(ev);
        }
    }
}

/// fexit `__seccomp_filter(int this_syscall, const struct seccomp_data *sd, bool recheck)`
/// (Linux 5.10 to 6.12): the verdict follows the three arguments.
#[fexit]
pub fn fexit_seccomp_filter(ctx: FExitContext) -> i32 {
    let nr: i32 = ctx.arg(0);
    let verdict: i64 = ctx.arg(3);
    filter_returned(nr as u32 as u64, verdict as i32);
    0
}

/// fexit `__seccomp_filter(int this_syscall, bool recheck_after_trace)` (later kernels).
#[fexit]
pub fn fexit_seccomp_filter_2(ctx: FExitContext) -> i32 {
    let nr: i32 = ctx.arg(0);
    let verdict: i64 = ctx.arg(2);
    filter_returned(nr as u32 as u64, verdict as i32);
    0
}

/// The current task is exiting with `code` (`do_exit`'s argument, or the `exit_code` it set):
/// one that dies of SIGSYS while its saved syscall number is a module syscall was killed by
/// seccomp in it.
#[inline(always)]
fn task_exiting(task: u64, code: u32) {
    let signal = code & 0x7f;
    if signal == 0 || signal != conf!(sigsys) || !confined() {
        return;
    }
    let Some(regs) = current_user_regs() else {
        return;
    };
    let Some(nr) = read_ptr(regs, conf!(pt_regs_syscall_nr)) else {
        return;
    };
    let Some(op) = op_of(nr) else {
        return;
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: a plain value copied out of the map entry at once.
    if let Some(start) = unsafe { SECCOMP_SIGNALLED.get(tid) }.copied() {
        let _ = SECCOMP_SIGNALLED.remove(tid);
        if read_ptr(task, conf!(task_start_time)) == Some(start) {
            // Reported when the filter returned.
            return;
        }
    }
    report(Source::TaskExit, op, regs, 0, signal);
}

/// `sched_process_exit(struct task_struct *p, ...)`, in the exiting task (after its memory
/// is released: a process's last thread can no longer have its arguments read).
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn seccomp_task_exit(ctx: RawTracePointContext) -> i32 {
    let task: u64 = ctx.arg(0);
    if let Some(code) = read_u32(task, conf!(task_exit_code)) {
        task_exiting(task, code);
    }
    0
}

/// fentry `do_exit(long code)`: the same, before anything of the task is released.
#[fentry]
pub fn seccomp_do_exit(ctx: FEntryContext) -> i32 {
    let code: i64 = ctx.arg(0);
    // SAFETY: as above.
    let task = unsafe { bpf_get_current_task() };
    task_exiting(task, code as u32);
    0
}

/// Raw tracepoint `sys_enter(struct pt_regs *regs, long id)`, attached for a moment at start-up
/// on kernels without `bpf_task_pt_regs`: measures where the saved user registers lie from
/// `task->stack` (the same for every task of a kernel build).
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn calibrate_user_regs(ctx: RawTracePointContext) -> i32 {
    let regs: u64 = ctx.arg(0);
    // SAFETY: as above.
    let task = unsafe { bpf_get_current_task() };
    let Some(stack) = read_ptr(task, conf!(task_stack)) else {
        return 0;
    };
    if stack == 0 || regs <= stack || regs - stack >= 1 << 20 {
        return 0;
    }
    if let Some(slot) = USER_REGS_OFFSET.get_ptr_mut(0) {
        // SAFETY: an array slot of this map; every writer writes the same value.
        unsafe { *slot = regs - stack };
    }
    0
}
