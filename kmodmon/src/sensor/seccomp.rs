//! Module syscalls a seccomp filter refused before they ran (Docker's, podman's and
//! Kubernetes' default profiles refuse init_module, finit_module and delete_module with EPERM).
//! No syscall function and no syscall-enter tracepoint runs for them. Per attempt source:
//!
//! | attempt source | refused attempts from | cost to tasks without seccomp |
//! |---|---|---|
//! | syscall tracepoints, raw tracepoints, raw_syscalls | the syscall-exit record those sources already take (an exit with no entry, from a task under seccomp) | none beyond the source itself |
//! | fexit on the syscall functions | fexit on `__seccomp_filter`, filtered in the kernel by syscall number | none: only tasks under seccomp call it |
//!
//! and on every kernel a raw tracepoint on `sched_process_exit` for tasks killed by SIGSYS in
//! the filter (a cost only when a thread exits). Arguments come from the task's saved user
//! registers: `bpf_task_pt_regs` where the kernel has it (5.15+), else `task->stack` plus an
//! offset measured at start-up by a program attached to `sys_enter` for a moment.
//! `--no-seccomp-attempts` (`[probe] seccomp_attempts = false`) turns all of it off.
use aya::{
    Ebpf,
    maps::Array,
    programs::{FEntry, FExit, RawTracePoint},
};
use kmodmon_common::{
    Config, OFFSET_UNKNOWN, USER_REGS_HELPER, USER_REGS_NONE, USER_REGS_STACK,
    names::{map, program},
};

use super::{AttemptSource, Options, SensorError, btf::KernelBtf, tracefs::Tracefs};

/// The kernel's seccomp filter function (static; in BTF and traceable on Debian's kernels).
pub const FILTER_FUNC: &str = "__seccomp_filter";

/// Fills the seccomp part of the programs' configuration; notes say what is unavailable.
/// Returns whether killed tasks are to be caught at the entry of `do_exit` (fentry): on
/// kernels that kill inside the filter (no `force_sig_seccomp`, e.g. 5.10) a dying process's
/// memory is gone by `sched_process_exit`, and its arguments with it.
pub fn configure(
    config: &mut Config,
    tracefs: &Tracefs,
    btf: Option<&KernelBtf>,
    opts: Options,
    notes: &mut Vec<String>,
) -> bool {
    config.sigsys = libc::SIGSYS as u32;
    if let Ok(f) = tracefs.format("syscalls", "sys_exit_finit_module")
        && let Ok(nr) = f.scalar("__syscall_nr")
    {
        config.sys_exit_nr = nr;
    }
    if opts.no_seccomp_attempts || opts.cgroups_only {
        return false;
    }
    let Some(btf) = btf else {
        notes.push(
            "module syscalls refused by seccomp are not reported: they need BTF (task and \
             register layout)"
                .into(),
        );
        return false;
    };
    let off = |s: &str, m: &str| btf.member_offset(s, m).unwrap_or(OFFSET_UNKNOWN);
    let seccomp = off("task_struct", "seccomp");
    let mode = off("seccomp", "mode");
    config.task_seccomp_mode = if seccomp == OFFSET_UNKNOWN || mode == OFFSET_UNKNOWN {
        OFFSET_UNKNOWN
    } else {
        seccomp + mode
    };
    config.task_stack = off("task_struct", "stack");
    config.task_exit_code = off("task_struct", "exit_code");
    config.pt_regs_ret = ret_offset(btf);
    config.seccomp_filter_nargs = btf.func_param_count(FILTER_FUNC).unwrap_or(0);
    config.user_regs = if btf.has_enumerator("bpf_func_id", "BPF_FUNC_task_pt_regs")
        && btf.has_enumerator("bpf_func_id", "BPF_FUNC_get_current_task_btf")
    {
        USER_REGS_HELPER
    } else if config.task_stack != OFFSET_UNKNOWN {
        USER_REGS_STACK
    } else {
        USER_REGS_NONE
    };
    let needed = [
        ("task_struct.seccomp.mode", config.task_seccomp_mode),
        ("task_struct.exit_code", config.task_exit_code),
        ("pt_regs result register", config.pt_regs_ret),
        ("pt_regs syscall number", config.pt_regs_syscall_nr),
    ];
    let lacking: Vec<&str> = needed
        .iter()
        .filter(|(_, o)| *o == OFFSET_UNKNOWN)
        .map(|(n, _)| *n)
        .collect();
    if !lacking.is_empty() {
        notes.push(format!(
            "module syscalls refused by seccomp are not reported: BTF lacks {}",
            lacking.join(", ")
        ));
        return false;
    }
    if config.user_regs == USER_REGS_NONE {
        notes.push(
            "seccomp-refused attempts are reported without their arguments: no way to find a \
             task's saved registers (no bpf_task_pt_regs, no task_struct.stack in BTF)"
                .into(),
        );
    }
    config.seccomp_attempts = 1;
    !btf.has_func("force_sig_seccomp") && btf.has_func(EXIT_FUNC)
}

/// Where a task's exit is caught by fentry (see [`configure`]).
pub const EXIT_FUNC: &str = "do_exit";

#[cfg(target_arch = "x86_64")]
fn ret_offset(btf: &KernelBtf) -> u32 {
    btf.member_offset("pt_regs", "ax").unwrap_or(OFFSET_UNKNOWN)
}

#[cfg(target_arch = "aarch64")]
fn ret_offset(btf: &KernelBtf) -> u32 {
    btf.member_offset("pt_regs", "regs")
        .unwrap_or(OFFSET_UNKNOWN)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn ret_offset(_btf: &KernelBtf) -> u32 {
    OFFSET_UNKNOWN
}

/// Whether `attempts` already takes the syscall-exit record of refused calls (the tracepoint
/// pairs: an exit without an entry; the exit-only sources: every exit).
pub fn sees_exit_records(attempts: AttemptSource) -> bool {
    matches!(
        attempts,
        AttemptSource::SyscallTracepoint
            | AttemptSource::RawTracepoint
            | AttemptSource::RawSyscalls
            | AttemptSource::BtfSysExit
    )
}

/// The fexit program for this kernel's `__seccomp_filter`, when refused attempts need it.
pub fn filter_program(config: &Config, attempts: AttemptSource) -> Option<&'static str> {
    if config.seccomp_attempts == 0
        || attempts == AttemptSource::None
        || sees_exit_records(attempts)
    {
        return None;
    }
    match config.seccomp_filter_nargs {
        3 => Some(program::FEXIT_SECCOMP_FILTER),
        2 => Some(program::FEXIT_SECCOMP_FILTER_2),
        _ => None,
    }
}

/// What was attached for refused attempts, in words for `describe`, and problems for notes.
#[derive(Clone, Debug, Default)]
pub struct Attached {
    pub describe: String,
    pub notes: Vec<String>,
}

/// Attaches the programs `config` and the attempt source call for. Failures here never stop
/// kmodmon: they become notes (refused attempts are then not, or only partly, reported).
pub fn attach(
    ebpf: &mut Ebpf,
    config: &Config,
    attempts: AttemptSource,
    exit_fentry: bool,
    btf: Option<&aya::Btf>,
) -> Attached {
    let mut out = Attached::default();
    if config.seccomp_attempts == 0 || attempts == AttemptSource::None {
        out.describe = "off".into();
        return out;
    }
    let mut parts = Vec::new();
    if sees_exit_records(attempts) {
        parts.push("syscall exit records".to_string());
    } else {
        match (filter_program(config, attempts), btf) {
            (Some(prog), Some(btf)) => match attach_filter(ebpf, prog, btf) {
                Ok(()) => parts.push(format!("fexit {FILTER_FUNC}")),
                Err(e) => out.notes.push(format!(
                    "module syscalls refused by seccomp are not reported: {e}"
                )),
            },
            (None, _) => out.notes.push(format!(
                "module syscalls refused by seccomp are not reported: {FILTER_FUNC} is not in BTF \
                 with a known prototype ({} parameters)",
                config.seccomp_filter_nargs
            )),
            (Some(_), None) => out.notes.push(
                "module syscalls refused by seccomp are not reported: kernel BTF unavailable to \
                 the loader"
                    .into(),
            ),
        }
    }
    let fentry = match (exit_fentry, btf) {
        (true, Some(btf)) => match attach_fentry(ebpf, program::SECCOMP_DO_EXIT, EXIT_FUNC, btf) {
            Ok(()) => true,
            Err(e) => {
                out.notes.push(format!(
                    "tasks killed by seccomp are reported at sched_process_exit, without their \
                     arguments when the whole process died: {e}"
                ));
                false
            }
        },
        _ => false,
    };
    if fentry {
        parts.push(format!("task exit (SIGSYS, fentry {EXIT_FUNC})"));
    } else {
        match attach_raw_tp(ebpf, program::SECCOMP_TASK_EXIT, "sched_process_exit") {
            Ok(()) => parts.push("task exit (SIGSYS)".into()),
            Err(e) => out
                .notes
                .push(format!("tasks killed by seccomp are not reported: {e}")),
        }
    }
    if config.user_regs == USER_REGS_STACK {
        match calibrate(ebpf) {
            Ok(off) => log::debug!("user registers at task->stack + {off:#x}"),
            Err(e) => out.notes.push(format!(
                "seccomp-refused attempts are reported without their arguments: {e}"
            )),
        }
    }
    out.describe = if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" + ")
    };
    out
}

fn program_err(program: &str, target: &str, e: impl std::fmt::Display) -> SensorError {
    SensorError::Attach {
        program: program.to_string(),
        target: target.to_string(),
        reason: format!("{e:#}"),
    }
}

fn attach_filter(ebpf: &mut Ebpf, prog_name: &str, btf: &aya::Btf) -> Result<(), SensorError> {
    let target = format!("fexit {FILTER_FUNC}");
    let prog: &mut FExit = ebpf
        .program_mut(prog_name)
        .ok_or_else(|| program_err(prog_name, &target, "missing from the object"))?
        .try_into()
        .map_err(|e| program_err(prog_name, &target, e))?;
    prog.load(FILTER_FUNC, btf)
        .map_err(|e| program_err(prog_name, &target, e))?;
    prog.attach()
        .map_err(|e| program_err(prog_name, &target, e))?;
    Ok(())
}

fn attach_fentry(
    ebpf: &mut Ebpf,
    prog_name: &str,
    func: &str,
    btf: &aya::Btf,
) -> Result<(), SensorError> {
    let target = format!("fentry {func}");
    let prog: &mut FEntry = ebpf
        .program_mut(prog_name)
        .ok_or_else(|| program_err(prog_name, &target, "missing from the object"))?
        .try_into()
        .map_err(|e| program_err(prog_name, &target, e))?;
    prog.load(func, btf)
        .map_err(|e| program_err(prog_name, &target, e))?;
    prog.attach()
        .map_err(|e| program_err(prog_name, &target, e))?;
    Ok(())
}

fn attach_raw_tp(ebpf: &mut Ebpf, prog_name: &str, tp: &str) -> Result<(), SensorError> {
    let target = format!("raw tracepoint {tp}");
    let prog: &mut RawTracePoint = ebpf
        .program_mut(prog_name)
        .ok_or_else(|| program_err(prog_name, &target, "missing from the object"))?
        .try_into()
        .map_err(|e| program_err(prog_name, &target, e))?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|e| program_err(prog_name, &target, e))?;
    }
    prog.attach(tp)
        .map_err(|e| program_err(prog_name, &target, e))?;
    Ok(())
}

/// Measures where a task's saved user registers lie from its stack: attaches the calibration
/// program to `sys_enter`, makes syscalls until it has written the offset (at most 500 ms),
/// and detaches it.
fn calibrate(ebpf: &mut Ebpf) -> Result<u64, String> {
    let name = program::CALIBRATE_USER_REGS;
    let link = {
        let prog: &mut RawTracePoint = ebpf
            .program_mut(name)
            .ok_or("the calibration program is missing from the object")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        prog.load().map_err(|e| format!("loading {name}: {e:#}"))?;
        prog.attach("sys_enter")
            .map_err(|e| format!("attaching {name} to sys_enter: {e:#}"))?
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    let result = loop {
        let _ = nix::unistd::getppid();
        let read = ebpf
            .map(map::USER_REGS_OFFSET)
            .ok_or_else(|| format!("map {} missing", map::USER_REGS_OFFSET))
            .and_then(|m| Array::<_, u64>::try_from(m).map_err(|e| format!("{e}")))
            .and_then(|a| a.get(&0, 0).map_err(|e| format!("{e}")));
        match read {
            Ok(0) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(0) => break Err("the calibration program never ran (sys_enter)".to_string()),
            Ok(off) => break Ok(off),
            Err(e) => break Err(e),
        }
    };
    if let Some(prog) = ebpf.program_mut(name)
        && let Ok(prog) = <&mut RawTracePoint>::try_from(prog)
    {
        let _ = prog.detach(link);
        let _ = prog.unload();
    }
    result
}

/// The part of `kmodmon sources` that names the refused-attempt sources.
pub fn describe_unattached(config: &Config, attempts: AttemptSource, exit_fentry: bool) -> String {
    if config.seccomp_attempts == 0 || attempts == AttemptSource::None {
        return "off".into();
    }
    let exit = if exit_fentry {
        format!("task exit (SIGSYS, fentry {EXIT_FUNC})")
    } else {
        "task exit (SIGSYS)".to_string()
    };
    if sees_exit_records(attempts) {
        format!("syscall exit records + {exit}")
    } else if filter_program(config, attempts).is_some() {
        format!("fexit {FILTER_FUNC} + {exit}")
    } else {
        exit
    }
}
