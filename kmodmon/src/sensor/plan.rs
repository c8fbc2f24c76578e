//! Which source serves each kind of event on this kernel, and the configuration the programs
//! get: decided from what tracefs and BTF say exists.
use kmodmon_common::{Config, OFFSET_UNKNOWN, identity::IdentityConfig, names::program};

use super::{
    Options, SensorError,
    btf::{KernelBtf, syscall_func},
    tracefs::{Format, Tracefs},
};
use crate::host::cgroup_v1::{self, CgroupLayout, V1Hierarchy};

/// Where load/unload attempts come from, cheapest first (the order [`Plan::make`] tries them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptSource {
    /// fexit on the syscalls' kernel functions.
    Fexit,
    /// kprobe on the same functions, tracefs kretprobes (explicit maxactive) on their return.
    Kprobe,
    /// tp_btf on sys_exit alone (BTF types; the syscall number by a direct load).
    BtfSysExit,
    SyscallTracepoint,
    /// A raw tracepoint on sys_exit alone (BTF gives the pt_regs layout).
    RawTracepoint,
    /// Classic raw_syscalls:sys_enter/sys_exit tracepoints.
    RawSyscalls,
    None,
}

impl AttemptSource {
    /// Every source, cheapest first.
    pub const CHAIN: [AttemptSource; 6] = [
        AttemptSource::Fexit,
        AttemptSource::Kprobe,
        AttemptSource::BtfSysExit,
        AttemptSource::SyscallTracepoint,
        AttemptSource::RawTracepoint,
        AttemptSource::RawSyscalls,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptSource::Fexit => "fexit",
            AttemptSource::Kprobe => "kprobe",
            AttemptSource::BtfSysExit => "sys_exit (tp_btf)",
            AttemptSource::SyscallTracepoint => "syscall_tracepoint",
            AttemptSource::RawTracepoint => "sys_exit (raw tracepoint)",
            AttemptSource::RawSyscalls => "raw_syscalls (tracepoint)",
            AttemptSource::None => "none",
        }
    }

    /// Whether this source makes every syscall on the machine take the tracing slow path
    /// (any syscall tracepoint or raw syscall tracepoint does, for every task).
    pub fn taxes_all_syscalls(self) -> bool {
        matches!(
            self,
            AttemptSource::BtfSysExit
                | AttemptSource::SyscallTracepoint
                | AttemptSource::RawTracepoint
                | AttemptSource::RawSyscalls
        )
    }

    /// What it costs unrelated syscalls, in words (measured, see BENCHMARKS.md).
    pub fn cost(self) -> &'static str {
        match self {
            AttemptSource::Fexit | AttemptSource::Kprobe => "no cost to other syscalls",
            AttemptSource::BtfSysExit => {
                "every syscall takes the tracing slow path and runs one program at exit"
            }
            AttemptSource::RawTracepoint => {
                "every syscall takes the tracing slow path and runs one program at exit (helper reads)"
            }
            AttemptSource::SyscallTracepoint | AttemptSource::RawSyscalls => {
                "every syscall takes the tracing slow path"
            }
            AttemptSource::None => "nothing attached",
        }
    }
}

/// Most concurrent returns each kretprobe tracks (kernel limit KRETPROBE_MAXACTIVE_MAX).
const MAXACTIVE_MAX: u32 = 4096;

/// The maxactive for the tracefs kretprobes: room for many tasks sleeping inside a module
/// syscall at once (boot-time udev runs dozens of modprobes). A return beyond it is missed,
/// counted by the kernel (kprobe_profile) and reported as `kretprobe_missed`.
pub fn kretprobe_maxactive() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    cpus.saturating_mul(8).clamp(256, MAXACTIVE_MAX)
}

/// How often a burst of identical attempts is reported while it goes on.
const REPEAT_REPORT: std::time::Duration = std::time::Duration::from_secs(1);

/// module:* tracepoints (event names, the kernel's) and the program attached to each.
const MODULE_EVENTS: [(&str, &str); 3] = [
    ("module_load", program::MODULE_LOAD),
    ("module_free", program::MODULE_FREE),
    ("module_request", program::MODULE_REQUEST),
];
const SYSCALLS: [&str; 3] = ["init_module", "finit_module", "delete_module"];

/// The cgroup v1 hierarchy the programs read each task's cgroup in.
#[derive(Clone, Debug)]
pub struct CgroupV1Plan {
    pub hierarchy: V1Hierarchy,
    /// The controller's subsystem id (`enum cgroup_subsys_id`, from BTF).
    pub ssid: u32,
}

/// The decision, with the configuration it implies.
#[derive(Clone, Debug)]
pub struct Plan {
    /// module:* tracepoints that exist (and are attached).
    pub module_events: Vec<&'static str>,
    pub attempts: AttemptSource,
    pub cgroups: bool,
    pub config: Config,
    /// Degradations and fallbacks, in words, for the user.
    pub notes: Vec<String>,
    /// The host's cgroup layout.
    pub cgroup_layout: CgroupLayout,
    /// The cgroup v1 hierarchy followed (v1-only and hybrid hosts), when one can be.
    pub cgroup_v1: Option<CgroupV1Plan>,
    /// Where module syscalls refused by seccomp come from (see `sensor::seccomp`).
    pub seccomp: String,
    /// Tasks killed by seccomp are caught by fentry on `do_exit` (see `seccomp::configure`).
    pub seccomp_exit_fentry: bool,
    /// Module identity (image capture), when planned: the identity programs' configuration.
    pub identity: Option<IdentityConfig>,
    /// Attempt sources still to try when the current one fails to load or attach, in order.
    next: Vec<AttemptSource>,
    /// Why sources were passed over (planning, or a failed load/attach).
    passed_over: Vec<(AttemptSource, String)>,
}

impl Plan {
    pub fn make(
        tracefs: &Tracefs,
        btf: Option<&KernelBtf>,
        opts: Options,
    ) -> Result<Plan, SensorError> {
        let mut config = Config::unset();
        let mut notes = Vec::new();
        set_syscall_numbers(&mut config);

        let mut module_events = Vec::new();
        for (ev, _) in MODULE_EVENTS {
            if !tracefs.has_event("module", ev) {
                continue;
            }
            let fmt = tracefs.format("module", ev)?;
            let r = match ev {
                "module_load" => fmt.scalar("taints").and_then(|t| {
                    config.load_taints = t;
                    fmt.data_loc("name").map(|n| config.load_name = n)
                }),
                "module_free" => fmt.data_loc("name").map(|n| config.free_name = n),
                _ => fmt.scalar("wait").and_then(|w| {
                    config.request_wait = w;
                    fmt.data_loc("name").map(|n| config.request_name = n)
                }),
            };
            match r {
                Ok(()) => module_events.push(ev),
                Err(e) => notes.push(format!("module:{ev} skipped: {e}")),
            }
        }
        if module_events.is_empty() {
            notes.push(
                "no module:* tracepoints (kernel without CONFIG_MODULES or tracepoints): only \
                 attempts are reported, not completed loads/unloads or autoload requests"
                    .to_string(),
            );
        }
        config.have_module_tracepoints = u32::from(!module_events.is_empty());

        let cgroups = match cgroup_fields(tracefs, &mut config) {
            Ok(()) => true,
            Err(e) => {
                notes.push(format!(
                    "cgroup tracepoints unusable ({e}): short-lived containers may go unnamed"
                ));
                false
            }
        };

        if let Some(btf) = btf {
            let missing = btf.fill(&mut config);
            if !missing.is_empty() {
                notes.push(format!(
                    "BTF lacks {}: ppid, finit_module paths or the processes behind an OCI \
                     hook may be missing",
                    missing.join(", ")
                ));
            }
        }
        let (cgroup_layout, v1) = cgroup_v1::detect();
        let cgroup_v1 = plan_cgroup_v1(cgroup_layout, v1, btf, &mut config, &mut notes);

        let modules_supported = crate::host::moddb::live::module_support();
        if !modules_supported {
            notes.push(
                "this kernel has no module support (no /proc/modules): module syscalls fail with \
                 ENOSYS; their stubs are hooked where the kernel allows it, else the syscall exit"
                    .to_string(),
            );
        }
        let seccomp_exit_fentry =
            super::seccomp::configure(&mut config, tracefs, btf, opts, &mut notes);
        let regs_ok = config.pt_regs_arg.iter().all(|&o| o != OFFSET_UNKNOWN);
        let nr_ok = config.pt_regs_syscall_nr != OFFSET_UNKNOWN;
        let mut passed_over = Vec::new();
        let mut viable = Vec::new();
        for source in AttemptSource::CHAIN {
            let why_not: Option<String> = match source {
                AttemptSource::Fexit if opts.no_fexit => Some("--no-fexit".into()),
                AttemptSource::Fexit | AttemptSource::Kprobe | AttemptSource::BtfSysExit
                    if opts.force_raw_syscalls =>
                {
                    Some("--force-raw-syscalls".into())
                }
                AttemptSource::Fexit => match btf {
                    None => Some("no kernel BTF".into()),
                    Some(_) if !regs_ok => Some("BTF lacks struct pt_regs".into()),
                    Some(b) => SYSCALLS
                        .iter()
                        .map(|s| syscall_func(s))
                        .find(|f| !b.has_func(f))
                        .map(|f| format!("BTF has no function {f}")),
                },
                AttemptSource::Kprobe => kprobe_missing(tracefs, regs_ok),
                AttemptSource::BtfSysExit => match btf {
                    None => Some("no kernel BTF".into()),
                    Some(_) if !(regs_ok && nr_ok) => Some("BTF lacks struct pt_regs".into()),
                    Some(_) => None,
                },
                AttemptSource::SyscallTracepoint if opts.force_raw_syscalls => {
                    Some("--force-raw-syscalls".into())
                }
                AttemptSource::SyscallTracepoint => syscall_fields(tracefs, &mut config)
                    .err()
                    .map(|e| e.to_string()),
                AttemptSource::RawTracepoint => {
                    (!(regs_ok && nr_ok)).then(|| "no struct pt_regs layout (BTF)".into())
                }
                AttemptSource::RawSyscalls => raw_fields(tracefs, &mut config)
                    .err()
                    .map(|e| format!("raw_syscalls unusable: {e}")),
                AttemptSource::None => Some("not a source".into()),
            };
            match why_not {
                None => viable.push(source),
                Some(why) => passed_over.push((source, why)),
            }
        }
        if config.task_start_time == OFFSET_UNKNOWN {
            if opts.repeat_window.is_none_or(|w| !w.is_zero()) {
                notes.push(
                    "BTF lacks task_struct.start_time: identical repeated attempts are not \
                     aggregated"
                        .to_string(),
                );
            }
        } else {
            let window = opts.repeat_window.unwrap_or(DEFAULT_REPEAT_WINDOW);
            config.repeat_window_us = u32::try_from(window.as_micros()).unwrap_or(u32::MAX);
            config.repeat_report_us = REPEAT_REPORT.as_micros() as u32;
        }
        let mut viable = viable.into_iter();
        let mut plan = Plan {
            module_events,
            attempts: viable.next().unwrap_or(AttemptSource::None),
            cgroups,
            config,
            notes,
            cgroup_layout,
            cgroup_v1,
            seccomp: String::new(),
            seccomp_exit_fentry,
            identity: None,
            next: viable.collect(),
            passed_over,
        };
        if !opts.no_identity && !opts.cgroups_only && modules_supported {
            plan.identity = plan_identity(btf, &mut plan.notes);
        }
        if opts.cgroups_only {
            // Enforcement in the foreground follows containers, not module events.
            plan.module_events.clear();
            plan.attempts = AttemptSource::None;
            if !plan.cgroups {
                return Err(SensorError::NothingAttachable(plan.notes.join("; ")));
            }
        } else if plan.attempts == AttemptSource::None && plan.module_events.is_empty() {
            let mut why = plan.notes.clone();
            why.extend(
                plan.passed_over
                    .iter()
                    .map(|(s, w)| format!("{}: {w}", s.as_str())),
            );
            return Err(SensorError::NothingAttachable(why.join("; ")));
        }
        plan.seccomp = super::seccomp::describe_unattached(
            &plan.config,
            plan.attempts,
            plan.seccomp_exit_fentry,
        );
        Ok(plan)
    }

    /// The next plan after `err` made this one fail, or None when nothing is left to try.
    pub fn fallback(&self, err: &SensorError) -> Option<Plan> {
        // The note keeps the first line; the whole verifier log goes to the debug log.
        log::debug!("{} failed: {err}", self.attempts.as_str());
        let full = err.to_string();
        let err = full.lines().next().unwrap_or_default();
        let mut next = self.clone();
        let source = *next.next.first()?;
        next.next.remove(0);
        next.passed_over
            .push((self.attempts, format!("failed: {err}")));
        next.notes.push(format!(
            "{} failed ({err}); falling back to {}",
            self.attempts.as_str(),
            source.as_str()
        ));
        next.attempts = source;
        Some(next)
    }

    /// Turns the aggregation of repeated attempts off (its task-exit program could not be
    /// attached), saying why.
    pub fn without_repeats(&self, why: &str) -> Plan {
        let mut next = self.clone();
        next.config.repeat_window_us = 0;
        next.config.repeat_report_us = 0;
        next.notes.push(format!(
            "identical repeated attempts are not aggregated: {why}"
        ));
        next
    }

    /// Whether identical repeated attempts are aggregated in the kernel.
    pub fn repeats(&self) -> bool {
        self.config.repeat_window_us > 0 && self.attempts != AttemptSource::None
    }

    /// The repeat window in force.
    pub fn repeat_window(&self) -> std::time::Duration {
        std::time::Duration::from_micros(u64::from(self.config.repeat_window_us))
    }

    /// (program, category, event) for every tracepoint this plan attaches.
    pub fn tracepoints(&self) -> Vec<(&'static str, &'static str, &'static str)> {
        let mut v: Vec<(&'static str, &'static str, &'static str)> = MODULE_EVENTS
            .iter()
            .filter(|(ev, _)| self.module_events.contains(ev))
            .map(|(ev, prog)| (*prog, "module", *ev))
            .collect();
        match self.attempts {
            AttemptSource::SyscallTracepoint => {
                v.extend([
                    (
                        program::SYS_ENTER_INIT_MODULE,
                        "syscalls",
                        "sys_enter_init_module",
                    ),
                    (
                        program::SYS_ENTER_FINIT_MODULE,
                        "syscalls",
                        "sys_enter_finit_module",
                    ),
                    (
                        program::SYS_ENTER_DELETE_MODULE,
                        "syscalls",
                        "sys_enter_delete_module",
                    ),
                    (program::SYS_EXIT_MODULE, "syscalls", "sys_exit_init_module"),
                    (
                        program::SYS_EXIT_MODULE,
                        "syscalls",
                        "sys_exit_finit_module",
                    ),
                    (
                        program::SYS_EXIT_MODULE,
                        "syscalls",
                        "sys_exit_delete_module",
                    ),
                ]);
            }
            AttemptSource::RawSyscalls => {
                v.push((program::RAW_SYS_ENTER, "raw_syscalls", "sys_enter"));
                v.push((program::RAW_SYS_EXIT, "raw_syscalls", "sys_exit"));
            }
            AttemptSource::Fexit
            | AttemptSource::Kprobe
            | AttemptSource::BtfSysExit
            | AttemptSource::RawTracepoint
            | AttemptSource::None => {}
        }
        if self.cgroups {
            v.push((program::CGROUP_MKDIR, "cgroup", "cgroup_mkdir"));
            v.push((program::CGROUP_RMDIR, "cgroup", "cgroup_rmdir"));
        }
        v
    }

    /// (program, raw tracepoint) for every raw tracepoint this plan attaches.
    pub fn raw_tracepoints(&self) -> Vec<(&'static str, &'static str)> {
        let mut v = Vec::new();
        if self.attempts == AttemptSource::RawTracepoint {
            v.push((program::RAW_TP_SYS_EXIT, "sys_exit"));
        }
        if self.repeats() {
            v.push((program::REPEAT_TASK_EXIT, "sched_process_exit"));
        }
        v
    }

    /// (program, kernel function) for every kprobe this plan attaches; the return program
    /// ([`program::KRETPROBE_MODULE`]) goes on a tracefs kretprobe of each function.
    pub fn kprobes(&self) -> Vec<(&'static str, String)> {
        if self.attempts != AttemptSource::Kprobe {
            return Vec::new();
        }
        vec![
            (program::KPROBE_INIT_MODULE, syscall_func("init_module")),
            (program::KPROBE_FINIT_MODULE, syscall_func("finit_module")),
            (program::KPROBE_DELETE_MODULE, syscall_func("delete_module")),
        ]
    }

    /// (program, BTF tracepoint) for every tp_btf program this plan attaches.
    pub fn btf_tracepoints(&self) -> Vec<(&'static str, &'static str)> {
        if self.attempts != AttemptSource::BtfSysExit {
            return Vec::new();
        }
        vec![(program::TP_BTF_SYS_EXIT, "sys_exit")]
    }

    /// Whether loading needs aya to parse the kernel's BTF (fexit, tp_btf).
    pub fn needs_btf(&self) -> bool {
        matches!(
            self.attempts,
            AttemptSource::Fexit | AttemptSource::BtfSysExit
        ) || self.identity.is_some()
            || super::seccomp::filter_program(&self.config, self.attempts).is_some()
            || (self.seccomp_exit_fentry && self.config.seccomp_attempts != 0)
    }

    /// (program, kernel function) for every fexit this plan attaches.
    pub fn fexits(&self) -> Vec<(&'static str, String)> {
        if self.attempts != AttemptSource::Fexit {
            return Vec::new();
        }
        vec![
            (program::FEXIT_INIT_MODULE, syscall_func("init_module")),
            (program::FEXIT_FINIT_MODULE, syscall_func("finit_module")),
            (program::FEXIT_DELETE_MODULE, syscall_func("delete_module")),
        ]
    }

    /// One line for the user: which source serves what.
    pub fn describe(&self) -> String {
        let modules = if self.module_events.is_empty() {
            "none (kernel has no module tracepoints)".to_string()
        } else {
            format!("module tracepoints ({})", self.module_events.join(", "))
        };
        // Why the cheaper sources were not used.
        let rank = |s: AttemptSource| AttemptSource::CHAIN.iter().position(|c| *c == s);
        let mut passed: Vec<&(AttemptSource, String)> = self
            .passed_over
            .iter()
            .filter(|(s, _)| rank(*s) < rank(self.attempts) || self.attempts == AttemptSource::None)
            .collect();
        passed.sort_by_key(|(s, _)| rank(*s));
        let cheaper: Vec<String> = passed
            .iter()
            .map(|(s, w)| {
                format!(
                    "not {}: {}",
                    s.as_str(),
                    w.trim_end_matches([' ', ':'])
                        .trim_end_matches(" Verifier output")
                )
            })
            .collect();
        let why = if cheaper.is_empty() {
            String::new()
        } else {
            format!("; {}", cheaper.join("; "))
        };
        let repeats = if self.repeats() {
            format!(
                "identical attempts within {} aggregated",
                humantime::format_duration(self.repeat_window())
            )
        } else {
            "not aggregated".to_string()
        };
        let v1 = self
            .cgroup_v1
            .as_ref()
            .map(|v| {
                format!(
                    " + cgroup v1 hierarchy {} ({})",
                    v.hierarchy.hierarchy_id, v.hierarchy.controller
                )
            })
            .unwrap_or_default();
        format!(
            "module events: {modules}; attempts: {} [{}{why}]; repeats: {repeats}; seccomp-refused attempts: {}; cgroups: {}{v1}; identity: {}",
            self.attempts.as_str(),
            self.attempts.cost(),
            self.seccomp,
            if self.cgroups {
                "cgroup tracepoints"
            } else {
                "rescan on miss"
            },
            if self.identity.is_some() {
                "image capture at load_module"
            } else {
                "off"
            }
        )
    }

    /// Which cgroups attribute events here, and why (`kmodmon sources`).
    pub fn describe_cgroups(&self) -> String {
        match &self.cgroup_v1 {
            Some(v) => format!(
                "cgroups: {} layout; cgroup v1 hierarchy {} ({}) at {}, read in the kernel as \
                 task->cgroups->subsys[{}] (ssid of {}_cgrp_id from BTF): {}",
                self.cgroup_layout.as_str(),
                v.hierarchy.hierarchy_id,
                v.hierarchy.controller,
                v.hierarchy.mount.display(),
                v.ssid,
                v.hierarchy.controller,
                v.hierarchy.why()
            ),
            None => format!(
                "cgroups: {} layout; cgroup2 only{}",
                self.cgroup_layout.as_str(),
                if self.cgroup_layout == CgroupLayout::Unified {
                    ""
                } else {
                    " (no cgroup v1 hierarchy can be followed: see the notes)"
                }
            ),
        }
    }
}

/// The cgroup v1 hierarchy to follow, with the kernel side's offsets filled; a note says why
/// none can be where one is mounted.
fn plan_cgroup_v1(
    layout: CgroupLayout,
    v1: Option<V1Hierarchy>,
    btf: Option<&KernelBtf>,
    config: &mut Config,
    notes: &mut Vec<String>,
) -> Option<CgroupV1Plan> {
    let Some(h) = v1 else {
        if layout != CgroupLayout::Unified {
            notes.push(format!(
                "cgroup layout {} but no cgroup v1 controller hierarchy can be followed (none \
                 mounted, or {} off): containers placed only in cgroup v1 cannot be told \
                 apart from the host",
                layout.as_str(),
                cgroup_v1::CGROUP_V1_ENV
            ));
        }
        return None;
    };
    let failed = |why: String| {
        format!(
            "cgroup v1 hierarchy {} ({}) is mounted but cannot be read in the kernel ({why}): \
             containers placed only in cgroup v1 cannot be told apart from the host",
            h.hierarchy_id, h.controller
        )
    };
    let Some(btf) = btf else {
        notes.push(failed("no BTF".into()));
        return None;
    };
    match btf.fill_cgroup_v1(config, &h.controller) {
        Ok(ssid) => {
            config.cgroup_v1_hierarchy = h.hierarchy_id;
            Some(CgroupV1Plan { hierarchy: h, ssid })
        }
        Err(e) => {
            notes.push(failed(e));
            None
        }
    }
}

/// Module identity needs BTF with load_module and struct load_info (see sensor::identity).
fn plan_identity(btf: Option<&KernelBtf>, notes: &mut Vec<String>) -> Option<IdentityConfig> {
    let Some(btf) = btf else {
        notes.push("identity off: module images are captured with fentry, which needs BTF".into());
        return None;
    };
    let (cfg, missing) = super::identity::config(btf);
    if let Err(e) = super::identity::supported(btf, &cfg) {
        notes.push(format!("identity off: {e}"));
        return None;
    }
    if !missing.is_empty() {
        notes.push(format!(
            "identity: BTF lacks {}: those identity fields stay empty",
            missing.join(", ")
        ));
    }
    Some(cfg)
}

/// Why kprobes on the syscalls' functions cannot be used here, or None when they can.
fn kprobe_missing(tracefs: &Tracefs, regs_ok: bool) -> Option<String> {
    if !regs_ok {
        return Some("no struct pt_regs layout (BTF)".into());
    }
    if !std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists() {
        return Some("no kprobes (CONFIG_KPROBES)".into());
    }
    if !tracefs.root().join("kprobe_events").exists() {
        return Some("no kprobe_events in tracefs (CONFIG_KPROBE_EVENTS)".into());
    }
    // Whether the functions can be probed shows when attaching (reading /proc/kallsyms to
    // check first would cost more than a failed attach).
    None
}

/// Identical attempts of one task closer than this are aggregated (`--repeat-window`).
pub const DEFAULT_REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

fn set_syscall_numbers(config: &mut Config) {
    config.nr_init_module = libc::SYS_init_module as u32;
    config.nr_finit_module = libc::SYS_finit_module as u32;
    config.nr_delete_module = libc::SYS_delete_module as u32;
}

fn fmt_err(e: String) -> SensorError {
    SensorError::Format(e)
}

fn cgroup_fields(tracefs: &Tracefs, config: &mut Config) -> Result<(), SensorError> {
    for ev in ["cgroup_mkdir", "cgroup_rmdir"] {
        if !tracefs.has_event("cgroup", ev) {
            return Err(SensorError::Format(format!("no cgroup:{ev}")));
        }
    }
    let mkdir = tracefs.format("cgroup", "cgroup_mkdir")?;
    let rmdir = tracefs.format("cgroup", "cgroup_rmdir")?;
    let fields = |f: &Format| -> Result<_, String> {
        Ok((f.scalar("root")?, f.scalar("id")?, f.data_loc("path")?))
    };
    let a = fields(&mkdir).map_err(fmt_err)?;
    let b = fields(&rmdir).map_err(fmt_err)?;
    if a != b {
        return Err(SensorError::Format(
            "cgroup_mkdir and cgroup_rmdir records differ in layout".into(),
        ));
    }
    config.cgroup_root = a.0;
    config.cgroup_id = a.1;
    config.cgroup_path = a.2;
    config.cgroup_dfl_hierarchy = kmodmon_common::CGROUP_DFL_HIERARCHY;
    Ok(())
}

fn syscall_fields(tracefs: &Tracefs, config: &mut Config) -> Result<(), SensorError> {
    for s in SYSCALLS {
        for dir in ["sys_enter_", "sys_exit_"] {
            let ev = format!("{dir}{s}");
            if !tracefs.has_event("syscalls", &ev) {
                return Err(SensorError::Format(format!("no syscalls:{ev}")));
            }
        }
    }
    let init = tracefs.format("syscalls", "sys_enter_init_module")?;
    let finit = tracefs.format("syscalls", "sys_enter_finit_module")?;
    let delete = tracefs.format("syscalls", "sys_enter_delete_module")?;
    let exit = tracefs.format("syscalls", "sys_exit_finit_module")?;
    (|| -> Result<(), String> {
        config.init_umod = init.scalar("umod")?;
        config.init_len = init.scalar("len")?;
        config.init_uargs = init.scalar("uargs")?;
        config.finit_fd = finit.scalar("fd")?;
        config.finit_uargs = finit.scalar("uargs")?;
        config.finit_flags = finit.scalar("flags")?;
        config.delete_name = delete.scalar("name_user")?;
        config.delete_flags = delete.scalar("flags")?;
        config.sys_exit_ret = exit.scalar("ret")?;
        Ok(())
    })()
    .map_err(fmt_err)
}

fn raw_fields(tracefs: &Tracefs, config: &mut Config) -> Result<(), SensorError> {
    if !tracefs.has_event("raw_syscalls", "sys_enter")
        || !tracefs.has_event("raw_syscalls", "sys_exit")
    {
        return Err(SensorError::Format("no raw_syscalls tracepoints".into()));
    }
    let enter = tracefs.format("raw_syscalls", "sys_enter")?;
    let exit = tracefs.format("raw_syscalls", "sys_exit")?;
    (|| -> Result<(), String> {
        config.raw_enter_id = enter.scalar("id")?;
        config.raw_enter_args = enter.u64_array("args", 3)?;
        config.raw_exit_id = exit.scalar("id")?;
        config.raw_exit_ret = exit.scalar("ret")?;
        Ok(())
    })()
    .map_err(fmt_err)
}
