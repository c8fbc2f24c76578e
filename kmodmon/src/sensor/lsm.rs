//! The enforcement programs (BPF LSM, kmodmon-ebpf `lsm/`): which this kernel takes, what they
//! need to know about it (from BTF), and loading them in two steps — load (maps created or
//! reused from their pins, programs verified), then attach — so the caller can fill new maps
//! before any program reads them. Pinning links and programs is the enforcer's business.
use std::{os::unix::fs::MetadataExt as _, path::PathBuf};

use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{Lsm, links::FdLink},
};
use kmodmon_common::{
    OFFSET_UNKNOWN,
    names::{self, program},
    policy::LsmConfig,
};

use super::{EBPF_OBJECT, SensorError, btf::KernelBtf};

/// (program in the object, LSM hook), in the order they are attached. A program that lets a
/// load through for a later hook to decide comes after that hook's program: while pinned
/// programs are replaced one by one, the mix is stricter, never looser.
pub const PROGRAMS: [(&str, &str); 6] = [
    (program::KERNEL_MODULE_REQUEST, "kernel_module_request"),
    (program::KERNFS_INIT_SECURITY, "kernfs_init_security"),
    (program::KERNEL_POST_READ_FILE, "kernel_post_read_file"),
    (program::KERNEL_READ_FILE, "kernel_read_file"),
    (program::KERNEL_POST_LOAD_DATA, "kernel_post_load_data"),
    (program::KERNEL_LOAD_DATA, "kernel_load_data"),
];

/// `PF_KTHREAD` (include/linux/sched.h): a #define, so BTF cannot give it; its value has not
/// changed since it was introduced.
const PF_KTHREAD: u32 = 0x0020_0000;

/// Where /sys/module is; its directory's inode number is its kernfs id.
const SYS_MODULE: &str = "/sys/module";

/// The LSM settings for this kernel and what is missing for the parts that need more.
#[derive(Clone, Debug)]
pub struct LsmPlan {
    pub config: LsmConfig,
    /// The programs this kernel takes: (program, hook).
    pub programs: Vec<(&'static str, &'static str)>,
    /// What this kernel cannot do, in words (logged, and shown by `enforce status`).
    pub notes: Vec<String>,
}

/// What enforcement cannot do without (the task's cgroup and its ancestors).
fn required(kbtf: &KernelBtf, cfg: &mut LsmConfig) -> Result<(), SensorError> {
    let mut missing = Vec::new();
    let mut get = |s: &str, m: &str| {
        kbtf.member_offset(s, m).unwrap_or_else(|| {
            missing.push(format!("{s}.{m}"));
            OFFSET_UNKNOWN
        })
    };
    cfg.task_cgroups = get("task_struct", "cgroups");
    cfg.css_set_dfl_cgrp = get("css_set", "dfl_cgrp");
    cfg.cgroup_level = get("cgroup", "level");
    cfg.cgroup_ancestors = get("cgroup", "ancestors");
    cfg.cgroup_kn = get("cgroup", "kn");
    cfg.kn_id = get("kernfs_node", "id");
    cfg.kn_name = get("kernfs_node", "name");
    let mut enm = |e: &str, m: &str| {
        kbtf.enum_value(e, m)
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or_else(|| {
                missing.push(format!("enum {e} {m}"));
                OFFSET_UNKNOWN
            })
    };
    cfg.reading_module = enm("kernel_read_file_id", "READING_MODULE");
    cfg.loading_module = enm("kernel_load_data_id", "LOADING_MODULE");
    if missing.is_empty() {
        return Ok(());
    }
    Err(SensorError::Btf(format!(
        "enforcement needs {} in the kernel's BTF, and this kernel's lacks it (struct cgroup's \
         `ancestors` array came with Linux 5.19): enforcement is not possible on this kernel",
        missing.join(", ")
    )))
}

/// The LSM settings and programs for this kernel.
pub fn plan(kbtf: &KernelBtf, config: &kmodmon_common::Config) -> Result<LsmPlan, SensorError> {
    let mut cfg = LsmConfig::DEFAULT;
    required(kbtf, &mut cfg)?;
    let mut notes = Vec::new();
    let off = |s: &str, m: &str| kbtf.member_offset(s, m).unwrap_or(OFFSET_UNKNOWN);
    let has = |hook: &str| kbtf.has_func(&format!("bpf_lsm_{hook}"));
    cfg.module_name = off("module", "name");
    let named = cfg.module_name != OFFSET_UNKNOWN;
    cfg.name_images = u32::from(named && has("kernel_post_load_data"));
    cfg.name_files = u32::from(named && has("kernel_post_read_file"));
    if cfg.name_images == 0 {
        notes.push(
            "no kernel_post_load_data hook or no struct module in BTF: init_module loads stay \
             unnamed and are denied wherever loads are restricted"
                .to_string(),
        );
    }
    if cfg.name_files == 0 {
        notes.push(
            "no kernel_post_read_file hook or no struct module in BTF: finit_module loads are \
             judged by the file's name (named_by \"file\")"
                .to_string(),
        );
    }
    cfg.sys_module_id = std::fs::metadata(SYS_MODULE).map(|m| m.ino()).unwrap_or(0);
    cfg.name_kernfs = u32::from(has("kernfs_init_security") && cfg.sys_module_id != 0);
    if cfg.name_kernfs == 0 {
        notes.push(format!(
            "no kernfs_init_security hook or no {SYS_MODULE}: compressed module files the kernel \
             decompresses itself are judged by the file's name"
        ));
    }
    cfg.task_flags = off("task_struct", "flags");
    cfg.pf_kthread = PF_KTHREAD;
    cfg.task_worker_private = off("task_struct", "worker_private");
    cfg.kthread_data = off("kthread", "data");
    cfg.cryptomgr_param_larval = off("cryptomgr_param", "larval");
    let (alg, name) = (off("crypto_larval", "alg"), off("crypto_alg", "cra_name"));
    cfg.crypto_larval_name = if alg == OFFSET_UNKNOWN || name == OFFSET_UNKNOWN {
        OFFSET_UNKNOWN
    } else {
        alg + name
    };
    cfg.crypto_test_param_alg = off("crypto_test_param", "alg");
    if [
        cfg.task_flags,
        cfg.task_worker_private,
        cfg.kthread_data,
        cfg.cryptomgr_param_larval,
        cfg.crypto_larval_name,
    ]
    .contains(&OFFSET_UNKNOWN)
    {
        notes.push(
            "BTF lacks the crypto manager's thread parameters (task_struct.worker_private, \
             kthread.data, cryptomgr_param.larval, crypto_larval.alg): crypto templates a \
             container asks for are autoloaded under the host's decision"
                .to_string(),
        );
    }
    cfg.nr_finit_module = libc::SYS_finit_module as u32;
    cfg.pt_regs_nr = config.pt_regs_syscall_nr;
    cfg.pt_regs_arg1 = config.pt_regs_arg[1];
    let programs = PROGRAMS
        .iter()
        .copied()
        .filter(|(p, hook)| match *p {
            program::KERNEL_POST_LOAD_DATA => cfg.name_images == 1,
            program::KERNEL_POST_READ_FILE => cfg.name_files == 1,
            program::KERNFS_INIT_SECURITY => cfg.name_kernfs == 1,
            _ => has(hook),
        })
        .collect();
    Ok(LsmPlan {
        config: cfg,
        programs,
        notes,
    })
}

/// The plan for the running kernel.
pub fn plan_here() -> Result<(LsmPlan, kmodmon_common::Config), SensorError> {
    let mut config = kmodmon_common::Config::unset();
    let kbtf = KernelBtf::load().map_err(|e| SensorError::Btf(e.to_string()))?;
    let missing = kbtf.fill(&mut config);
    if !missing.is_empty() {
        log::warn!(
            "BTF lacks {}: finit_module files may go unnamed (and be decided as unnamed)",
            missing.join(", ")
        );
    }
    Ok((plan(&kbtf, &config)?, config))
}

/// The programs this kernel takes (for `enforce status`; empty when it cannot enforce).
pub fn expected_programs() -> Vec<(&'static str, &'static str)> {
    plan_here().map(|(p, _)| p.programs).unwrap_or_default()
}

/// The loaded object: maps created (or reused from their pins), programs verified, nothing
/// attached yet. The programs stay loaded as long as this lives.
pub struct Loaded {
    ebpf: Ebpf,
    btf: Btf,
    pub plan: LsmPlan,
}

impl Loaded {
    /// A loaded program (for pinning it).
    pub fn program(&mut self, name: &str) -> Option<&mut Lsm> {
        self.ebpf.program_mut(name)?.try_into().ok()
    }

    /// Attaches one loaded program to its hook.
    pub fn attach(&mut self, name: &str) -> Result<FdLink, SensorError> {
        let hook = self
            .plan
            .programs
            .iter()
            .find(|(p, _)| *p == name)
            .map_or("?", |(_, h)| *h);
        let err = |what: &str, e: String| SensorError::Attach {
            program: name.to_string(),
            target: format!("LSM hook {hook}"),
            reason: format!("{what}: {e}"),
        };
        let prog = self
            .program(name)
            .ok_or_else(|| err("finding", "not loaded".into()))?;
        let id = prog
            .attach()
            .map_err(|e| err("attaching", format!("{e:#}")))?;
        Ok(prog
            .take_link(id)
            .map_err(|e| err("taking the link", format!("{e:#}")))?
            .into())
    }
}

/// Loads the object with its maps pinned at `map_pins` ((map name, pin path); existing pins
/// are reused) and loads (verifies) `only` of this kernel's programs (all when `None`),
/// attaching none.
pub fn load(map_pins: &[(&str, PathBuf)], only: Option<&[&str]>) -> Result<Loaded, SensorError> {
    let (mut plan, config) = plan_here()?;
    for note in &plan.notes {
        log::warn!("{note}");
    }
    if let Some(only) = only {
        plan.programs.retain(|(p, _)| only.contains(p));
    }
    let btf = Btf::from_sys_fs().map_err(|e| {
        SensorError::Btf(format!(
            "the kernel's BTF (/sys/kernel/btf/vmlinux) is needed for LSM programs: {e}"
        ))
    })?;
    let mut loader = EbpfLoader::new();
    loader
        .btf(Some(&btf))
        .override_global(names::global::CONFIG, &config, true)
        .override_global(names::global::LSM_CONFIG, &plan.config, true)
        // Unused by the LSM programs: keep them small.
        .map_max_entries(names::map::PENDING, 1)
        .map_max_entries(names::map::CGROUPS, 4096);
    for (name, path) in map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|e| SensorError::Load(format!("{e:#}")))?;
    // The verifier gives up with EAGAIN when a signal is pending for the loading thread
    // (seen on 6.12, where verifying a program takes seconds under emulation): this thread
    // takes no signal while it loads (others, or this one afterwards, handle them), and a
    // load that still meets one is tried again.
    let _blocked = BlockSignals::new();
    for (name, hook) in plan.programs.clone() {
        let err = |what: &str, e: String| SensorError::Attach {
            program: name.to_string(),
            target: format!("LSM hook {hook}"),
            reason: format!("{what}: {e}"),
        };
        let prog: &mut Lsm = ebpf
            .program_mut(name)
            .ok_or_else(|| err("finding", "missing from the eBPF object".into()))?
            .try_into()
            .map_err(|e| err("typing", format!("{e}")))?;
        let started = std::time::Instant::now();
        let mut result = prog.load(hook, &btf);
        for _ in 0..3 {
            match &result {
                Err(e) if format!("{e:#}").contains("os error 11") => {
                    log::warn!("verifying {name} was interrupted (EAGAIN); trying again");
                    result = prog.load(hook, &btf);
                }
                _ => break,
            }
        }
        result.map_err(|e| {
            let mut msg = format!("{e:#}");
            if msg.contains("Operation not permitted") {
                msg.push_str(
                    " (the kernel refused the LSM program before verifying it: check that \
                     nothing on this host restricts BPF LSM programs, e.g. a BPF LSM policy on \
                     bpf() or a sandbox, and that kmodmon has CAP_BPF, CAP_PERFMON and \
                     CAP_SYS_ADMIN)",
                );
            }
            err("loading", msg)
        })?;
        log::info!(
            "{name}: loaded (verified) in {} ms",
            started.elapsed().as_millis()
        );
    }
    Ok(Loaded { ebpf, btf, plan })
}

/// Blocks every signal for the current thread while it lives (restoring the mask after).
struct BlockSignals(Option<nix::sys::signal::SigSet>);

impl BlockSignals {
    fn new() -> BlockSignals {
        use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
        let mut old = SigSet::empty();
        match pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old)) {
            Ok(()) => BlockSignals(Some(old)),
            Err(e) => {
                log::debug!("cannot block signals while loading: {e}");
                BlockSignals(None)
            }
        }
    }
}

impl Drop for BlockSignals {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            let _ = nix::sys::signal::pthread_sigmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&old),
                None,
            );
        }
    }
}

impl Loaded {
    /// The kernel's BTF as aya read it.
    pub fn btf(&self) -> &Btf {
        &self.btf
    }
}
