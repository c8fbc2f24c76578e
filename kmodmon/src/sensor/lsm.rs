//! The enforcement programs (BPF LSM, kmodmon-ebpf `lsm.rs`): which this kernel takes, and
//! loading and attaching them with their maps pinned where [`crate::enforce`] keeps them.
//! Pinning the links and programs (adopt, replace, remove) is the enforcer's business.
use std::path::PathBuf;

use aya::{
    EbpfLoader,
    programs::{Lsm, links::FdLink},
};
use kmodmon_common::{
    names::{self, program},
    policy::LsmConfig,
};

use super::{EBPF_OBJECT, SensorError, btf::KernelBtf};

/// (program in the object, LSM hook), in the order they are attached. [`IMAGE_PROGRAM`] names
/// init_module images; it needs the kernel_post_load_data hook (5.10+) and `struct module` in
/// BTF, and is left out without them. It comes before kernel_load_data, which defers to it:
/// while an older kernel_load_data (which denies every unnamed load) is being replaced, the
/// two together are stricter, never looser.
pub const PROGRAMS: [(&str, &str); 4] = [
    (program::KERNEL_MODULE_REQUEST, "kernel_module_request"),
    (program::KERNEL_READ_FILE, "kernel_read_file"),
    (IMAGE_PROGRAM, "kernel_post_load_data"),
    (program::KERNEL_LOAD_DATA, "kernel_load_data"),
];

/// The program that reads init_module images for the module's name.
pub const IMAGE_PROGRAM: &str = program::KERNEL_POST_LOAD_DATA;

/// The LSM settings for this kernel: whether init_module images can be named here.
pub fn lsm_config(kbtf: &KernelBtf) -> LsmConfig {
    let name = kbtf.member_offset("module", "name");
    let hook = PROGRAMS
        .iter()
        .find(|(p, _)| *p == IMAGE_PROGRAM)
        .is_some_and(|(_, hook)| kbtf.has_func(&format!("bpf_lsm_{hook}")));
    LsmConfig {
        name_images: u32::from(hook && name.is_some()),
        module_name: name.unwrap_or(kmodmon_common::OFFSET_UNKNOWN),
        ..LsmConfig::DEFAULT
    }
}

/// The programs this kernel takes.
pub fn programs_for(cfg: &LsmConfig) -> Vec<(&'static str, &'static str)> {
    PROGRAMS
        .iter()
        .copied()
        .filter(|(p, _)| *p != IMAGE_PROGRAM || cfg.name_images == 1)
        .collect()
}

/// How many programs this kernel takes (3 or 4).
pub fn expected_links() -> usize {
    match KernelBtf::load() {
        Ok(kbtf) => programs_for(&lsm_config(&kbtf)).len(),
        Err(_) => PROGRAMS.len() - 1,
    }
}

/// The attached programs: (program name, its link), in attach order. The object stays
/// loaded as long as this lives; pin the links to keep them attached beyond.
pub struct Attached {
    ebpf: aya::Ebpf,
    pub links: Vec<(&'static str, FdLink)>,
}

impl Attached {
    /// A loaded program (for pinning it).
    pub fn program(&mut self, name: &str) -> Option<&mut Lsm> {
        self.ebpf.program_mut(name)?.try_into().ok()
    }
}

/// Loads the object with its maps pinned at `map_pins` ((map name, pin path); existing pins
/// are reused), then loads and attaches every program this kernel takes.
pub fn load(map_pins: &[(&str, PathBuf)]) -> Result<Attached, SensorError> {
    let mut config = kmodmon_common::Config::unset();
    let kbtf = KernelBtf::load().map_err(|e| SensorError::Btf(e.to_string()))?;
    let missing = kbtf.fill(&mut config);
    if !missing.is_empty() {
        log::warn!(
            "BTF lacks {}: finit_module files may go unnamed (and be decided as unnamed)",
            missing.join(", ")
        );
    }
    let btf = aya::Btf::from_sys_fs().map_err(|e| {
        SensorError::Btf(format!(
            "the kernel's BTF (/sys/kernel/btf/vmlinux) is needed for LSM programs: {e}"
        ))
    })?;
    let lsm_cfg = lsm_config(&kbtf);
    if lsm_cfg.name_images == 0 {
        log::warn!(
            "this kernel has no kernel_post_load_data hook (5.10+) or no struct module in BTF: \
             init_module loads stay unnamed and are denied wherever loads are restricted"
        );
    }
    let mut loader = EbpfLoader::new();
    loader
        .btf(Some(&btf))
        .override_global(names::global::CONFIG, &config, true)
        .override_global(names::global::LSM_CONFIG, &lsm_cfg, true)
        // Unused by the LSM programs: keep them small.
        .map_max_entries(names::map::PENDING, 1);
    for (name, path) in map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|e| SensorError::Load(format!("{e:#}")))?;
    let mut attached = Vec::new();
    for (name, hook) in programs_for(&lsm_cfg) {
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
        prog.load(hook, &btf).map_err(|e| {
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
        let id = prog
            .attach()
            .map_err(|e| err("attaching", format!("{e:#}")))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| err("taking the link", format!("{e:#}")))?
            .into();
        attached.push((name, link));
    }
    Ok(Attached {
        ebpf,
        links: attached,
    })
}
