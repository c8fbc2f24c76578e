//! Building events: the parts every source shares.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_ktime_get_ns, generated,
    },
    programs::TracePointContext,
};
use aya_log_ebpf::debug;
use kmodmon_common::{Counter, EventKind, Field, NAME_LEN, Op, RawEvent, Source, missing, trunc};

use crate::{
    ancestry, cgroup_v1,
    config::conf,
    kernel::{current_ppid, file_of_fd, file_path, read_kernel_str, read_ptr, read_user_str},
    maps::{EVENTS, PENDING, SCRATCH, count},
};

/// Takes this CPU's scratch event and fills in who and when. Counts `kind` as seen; when no
/// scratch is available the event is counted as dropped and `None` returned.
#[inline(always)]
pub fn begin(kind: EventKind, source: Source) -> Option<&'static mut RawEvent> {
    count(kind.seen_counter());
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        count(Counter::DropNoScratch);
        return None;
    };
    // SAFETY: per-CPU slot, exclusive to this program invocation.
    let ev = unsafe { &mut *ev };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let now = unsafe { bpf_ktime_get_ns() };
    ev.kind = kind as u32;
    ev.source = source as u32;
    ev.op = Op::None as u32;
    ev.truncated = 0;
    ev.missing = 0;
    ev.taints = 0;
    ev.wait = 0;
    ev.rule_id = 0;
    ev.policy_generation = 0;
    ev.flags = 0;
    ev.fd = -1;
    ev.decided_by = 0;
    ev.named_by = 0;
    ev.lsm_flags = 0;
    ev.decided_at = 0;
    ev.ktime_ns = now;
    ev.end_ktime_ns = now;
    ev.len = 0;
    ev.ret = 0;
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    ev.pid = (pid_tgid >> 32) as u32;
    ev.tid = pid_tgid as u32;
    ev.uid = uid_gid as u32;
    ev.gid = (uid_gid >> 32) as u32;
    ev.path_len = 0;
    // SAFETY: the helper writes at most COMM_LEN bytes into the record's comm.
    let got = unsafe {
        generated::bpf_get_current_comm(ev.comm.as_mut_ptr().cast(), ev.comm.len() as u32)
    };
    if got < 0 {
        ev.comm = [0; 16];
    }
    // Whole buffers, not just the first byte: an attempt is compared with the previous one
    // byte for byte (repeat.rs), and nothing of an earlier event may show through.
    crate::repeat::clear_strings(ev);
    ev.blocked_by = 0;
    ev.signal = 0;
    ev.repeat = 0;
    ev.repeat_final = 0;
    ev._reserved3 = 0;
    let task = unsafe { bpf_get_current_task() };
    match current_ppid(task) {
        Some(ppid) => ev.ppid = ppid,
        None => {
            ev.ppid = 0;
            ev.missing |= missing::PPID;
        }
    }
    ev._reserved2 = 0;
    ev.cgroup_v1_id = match cgroup_v1::task_id(task) {
        Ok(id) => id.unwrap_or(0),
        Err(()) => {
            ev.missing |= missing::CGROUP_V1;
            0
        }
    };
    ancestry::fill(task, ev);
    Some(ev)
}

/// Sends a finished event; a full ring buffer is counted, never silent. False when dropped.
#[inline(always)]
pub fn emit(ev: &RawEvent) -> bool {
    if EVENTS.output::<RawEvent>(ev, 0).is_err() {
        count(Counter::DropRingbufFull);
        return false;
    }
    true
}

/// Reads a `__data_loc char[]` tracepoint field into `dst`.
#[inline(always)]
pub fn read_data_loc_str(
    ctx: &TracePointContext,
    field: Field,
    dst: &mut [u8],
) -> Option<(usize, bool)> {
    if field.size == 0 {
        return None;
    }
    // SAFETY: offset comes from the tracepoint's format file; the helper validates the read.
    let loc: u32 = unsafe { ctx.read_at(field.offset as usize) }.ok()?;
    let off = (loc & 0xffff) as u64;
    read_kernel_str(ctx.as_ptr() as u64 + off, dst)
}

/// Reads a scalar tracepoint field of 1, 2, 4 or 8 bytes (zero-extended).
#[inline(always)]
pub fn read_field(ctx: &TracePointContext, field: Field) -> Option<u64> {
    let off = field.offset as usize;
    // SAFETY: offsets come from the format file; reads are validated by the helper.
    unsafe {
        match field.size {
            1 => ctx.read_at::<u8>(off).ok().map(u64::from),
            2 => ctx.read_at::<u16>(off).ok().map(u64::from),
            4 => ctx.read_at::<u32>(off).ok().map(u64::from),
            8 => ctx.read_at::<u64>(off).ok(),
            _ => None,
        }
    }
}

/// The scalar a module tracepoint carries besides the name.
#[derive(Clone, Copy)]
pub enum Extra {
    None,
    /// module_load's taint mask.
    Taints(Field),
    /// module_request's `wait`.
    Wait(Field),
}

/// Records a kernel-side module event (load / unload / request).
#[inline(always)]
pub fn module_record(ctx: &TracePointContext, kind: EventKind, name: Field, extra: Extra) {
    debug!(ctx, "module event kind={}", kind as u32);
    let Some(ev) = begin(kind, Source::ModuleTracepoint) else {
        return;
    };
    match extra {
        Extra::None => {}
        Extra::Taints(f) => ev.taints = read_field(ctx, f).unwrap_or(0) as u32,
        Extra::Wait(f) => ev.wait = u32::from(read_field(ctx, f).unwrap_or(0) != 0),
    }
    let name_buf: &mut [u8; NAME_LEN] = &mut ev.name;
    match read_data_loc_str(ctx, name, name_buf) {
        Some((_, cut)) => {
            if cut {
                ev.truncated |= trunc::NAME;
            }
        }
        None => ev.missing |= missing::NAME,
    }
    emit(ev);
}

/// Fills the op-specific part of an attempt from the syscall's first three arguments.
#[inline(always)]
pub fn fill_attempt(ev: &mut RawEvent, op: Op, a0: u64, a1: u64, a2: u64) {
    ev.op = op as u32;
    match op {
        Op::InitModule => {
            ev.len = a1;
            params(ev, a2);
        }
        Op::FinitModule => {
            ev.fd = a0 as i32;
            ev.flags = a2 as u32;
            params(ev, a1);
            let task = unsafe { bpf_get_current_task() };
            let path = file_of_fd(task, ev.fd)
                .and_then(|file| file_path(file, &mut ev.path, &mut ev.path_len));
            match path {
                Some(cut) => {
                    if cut {
                        ev.truncated |= trunc::PATH;
                    }
                }
                None => ev.missing |= missing::PATH,
            }
        }
        Op::DeleteModule => {
            ev.flags = a1 as u32;
            match read_user_str(a0, &mut ev.name) {
                Some((_, cut)) => {
                    if cut {
                        ev.truncated |= trunc::NAME;
                    }
                }
                None => ev.missing |= missing::NAME,
            }
        }
        Op::None => {}
    }
}

#[inline(always)]
fn params(ev: &mut RawEvent, uargs: u64) {
    match read_user_str(uargs, &mut ev.params) {
        Some((_, cut)) => {
            if cut {
                ev.truncated |= trunc::PARAMS;
            }
        }
        None => ev.missing |= missing::PARAMS,
    }
}

#[inline(always)]
pub fn attempt_kind(op: Op) -> EventKind {
    if matches!(op, Op::DeleteModule) {
        EventKind::UnloadAttempt
    } else {
        EventKind::LoadAttempt
    }
}

/// An attempt seen only when its syscall returns (the sys_exit sources): the syscall number,
/// arguments and result come from the task's saved user registers `regs`. This also sees
/// attempts a seccomp filter refused before the syscall ran (they never enter it).
#[inline(always)]
pub fn exit_attempt(source: Source, op: Op, regs: u64, ret: i64) {
    let Some(ev) = begin(attempt_kind(op), source) else {
        return;
    };
    let a0 = read_ptr(regs, conf!(pt_regs_arg[0])).unwrap_or(0);
    let a1 = read_ptr(regs, conf!(pt_regs_arg[1])).unwrap_or(0);
    let a2 = read_ptr(regs, conf!(pt_regs_arg[2])).unwrap_or(0);
    fill_attempt(ev, op, a0, a1, a2);
    ev.ret = ret;
    // An exit record is also what a seccomp-refused attempt leaves (the filter runs before the
    // syscall; `ret` is what the caller got): decided before the attempt is delivered or
    // aggregated.
    crate::seccomp::classify_exit_only(ev, regs, ret);
    crate::repeat::deliver(ev);
}

/// Syscall entry (tracepoint and kprobe sources): record the attempt and park it until the exit.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "`&*ev` keeps the 1176-byte event in map memory; by value it would be copied onto the 512-byte BPF stack"
)]
pub fn syscall_enter(source: Source, op: Op, a0: u64, a1: u64, a2: u64) {
    let Some(ev) = begin(attempt_kind(op), source) else {
        return;
    };
    fill_attempt(ev, op, a0, a1, a2);
    let key = bpf_get_current_pid_tgid();
    if PENDING.insert(key, &*ev, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Either the map is full or a stale entry of a task that died inside the syscall is there.
    if PENDING.get_ptr(key).is_some() {
        count(Counter::DropPendingLost);
        if PENDING.insert(key, &*ev, BPF_ANY as u64).is_ok() {
            return;
        }
    }
    count(Counter::DropPendingFull);
}

/// Syscall exit (tracepoint and kretprobe sources): complete the parked attempt with its result
/// and send it. False when no entry was parked (see `seccomp::unmatched_exit`).
#[inline(always)]
pub fn syscall_exit<C: EbpfContext>(ctx: &C, ret: i64) -> bool {
    debug!(ctx, "module syscall returned {}", ret);
    let key = bpf_get_current_pid_tgid();
    let Some(ev) = PENDING.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: map value owned by this task until removed below.
    let ev = unsafe { &mut *ev };
    ev.ret = ret;
    ev.end_ktime_ns = unsafe { bpf_ktime_get_ns() };
    crate::repeat::deliver(ev);
    if PENDING.remove(key).is_err() {
        count(Counter::ErrPendingRemove);
    }
    true
}
