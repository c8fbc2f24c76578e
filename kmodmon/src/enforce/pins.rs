//! The LSM programs, their links and the policy maps, pinned in bpffs so enforcement outlives
//! the process that installed it:
//!
//! ```text
//! /sys/fs/bpf/kmodmon/links/<program>   the attachments (a pinned link keeps its program attached)
//! /sys/fs/bpf/kmodmon/progs/<program>   the programs (for bpftool and inspection)
//! /sys/fs/bpf/kmodmon/maps/<map>        policy_cgroups, policy_allow, policy_settings, events
//! ```
//!
//! Installing when the links are already pinned adopts them (nothing is loaded twice);
//! `replace` loads the programs of this binary, reusing the pinned maps, and swaps each link
//! atomically (rename over the old pin), so an upgrade never leaves a gap.
use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, Map, MapData, RingBuf},
    programs::{Lsm, links::FdLink},
};
use kmodmon_common::{
    names::{self, program},
    policy::{AllowKey, Decision, LsmConfig, Settings},
};

use super::{EnforceError, host::BPFFS};
use crate::probe::{EBPF_OBJECT, btf::KernelBtf};

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

/// Pin names of the maps (under `maps/`; bpffs refuses names with a '.').
pub mod pin {
    pub const POLICY_CGROUPS: &str = "policy_cgroups";
    pub const POLICY_ALLOW: &str = "policy_allow";
    pub const POLICY_SETTINGS: &str = "policy_settings";
    pub const EVENTS: &str = "events";
}

/// (map in the object, pin name).
pub const MAPS: [(&str, &str); 4] = [
    (names::map::POLICY_CGROUPS, pin::POLICY_CGROUPS),
    (names::map::POLICY_ALLOW, pin::POLICY_ALLOW),
    (names::map::POLICY_SETTINGS, pin::POLICY_SETTINGS),
    (names::map::EVENTS, pin::EVENTS),
];

/// Where kmodmon pins its enforcement objects.
#[derive(Clone, Debug)]
pub struct PinDir {
    pub root: PathBuf,
}

impl Default for PinDir {
    fn default() -> Self {
        PinDir {
            root: Path::new(BPFFS).join("kmodmon"),
        }
    }
}

impl PinDir {
    pub fn link(&self, prog: &str) -> PathBuf {
        self.root.join("links").join(prog)
    }
    pub fn prog(&self, prog: &str) -> PathBuf {
        self.root.join("progs").join(prog)
    }
    pub fn map(&self, pin: &str) -> PathBuf {
        self.root.join("maps").join(pin)
    }

    /// How many of the links are pinned.
    pub fn pinned_links(&self) -> usize {
        PROGRAMS
            .iter()
            .filter(|(p, _)| self.link(p).exists())
            .count()
    }

    fn mkdirs(&self) -> Result<(), EnforceError> {
        for d in ["links", "progs", "maps"] {
            let dir = self.root.join(d);
            std::fs::create_dir_all(&dir)
                .map_err(|e| EnforceError::Pin(format!("cannot create {}: {e}", dir.display())))?;
        }
        Ok(())
    }
}

/// The policy maps, opened from their pins.
pub struct PolicyMaps {
    pub cgroups: HashMap<MapData, u64, Decision>,
    pub allow: HashMap<MapData, AllowKey, u32>,
    pub settings: Array<MapData, Settings>,
    pub events: Option<RingBuf<MapData>>,
}

fn open_map(dir: &PinDir, pin: &str) -> Result<Map, EnforceError> {
    let path = dir.map(pin);
    let data = MapData::from_pin(&path)
        .map_err(|e| EnforceError::Pin(format!("cannot open {}: {e}", path.display())))?;
    Map::from_map_data(data)
        .map_err(|e| EnforceError::Pin(format!("{} is not a usable map: {e}", path.display())))
}

impl PolicyMaps {
    pub fn open(dir: &PinDir) -> Result<PolicyMaps, EnforceError> {
        let bad = |what: &str, e: aya::maps::MapError| {
            EnforceError::Pin(format!("pinned map {what} has the wrong type: {e}"))
        };
        Ok(PolicyMaps {
            cgroups: HashMap::try_from(open_map(dir, pin::POLICY_CGROUPS)?)
                .map_err(|e| bad(pin::POLICY_CGROUPS, e))?,
            allow: HashMap::try_from(open_map(dir, pin::POLICY_ALLOW)?)
                .map_err(|e| bad(pin::POLICY_ALLOW, e))?,
            settings: Array::try_from(open_map(dir, pin::POLICY_SETTINGS)?)
                .map_err(|e| bad(pin::POLICY_SETTINGS, e))?,
            events: open_map(dir, pin::EVENTS)
                .ok()
                .and_then(|m| RingBuf::try_from(m).ok()),
        })
    }
}

/// What [`install`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    /// The links were already pinned: nothing was loaded.
    Adopted,
    /// Programs were loaded, attached and pinned.
    Fresh,
    /// This binary's programs replaced the pinned ones.
    Replaced,
}

/// Loads, attaches and pins the LSM programs unless they are pinned already (or `replace`).
/// A fresh install that fails leaves no pins behind.
pub fn install(dir: &PinDir, replace: bool) -> Result<Installed, EnforceError> {
    let pinned = dir.pinned_links();
    // Pins of an older kmodmon may lack a program this one has: then it replaces them.
    if pinned == expected_links() && !replace {
        return Ok(Installed::Adopted);
    }
    let r = load_and_pin(dir);
    if r.is_err() && pinned == 0 {
        let _ = remove(dir);
    }
    r?;
    Ok(if pinned == 0 {
        Installed::Fresh
    } else {
        Installed::Replaced
    })
}

fn load_and_pin(dir: &PinDir) -> Result<(), EnforceError> {
    dir.mkdirs()?;
    let mut config = kmodmon_common::Config::unset();
    let kbtf = KernelBtf::load().map_err(|e| EnforceError::Load(e.to_string()))?;
    let missing = kbtf.fill(&mut config);
    if !missing.is_empty() {
        log::warn!(
            "BTF lacks {}: finit_module files may go unnamed (and be decided as unnamed)",
            missing.join(", ")
        );
    }
    let btf = aya::Btf::from_sys_fs().map_err(|e| {
        EnforceError::Load(format!(
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
    let map_paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|(n, p)| (*n, dir.map(p))).collect();
    let mut loader = EbpfLoader::new();
    loader
        .btf(Some(&btf))
        .override_global(names::global::CONFIG, &config, true)
        .override_global(names::global::LSM_CONFIG, &lsm_cfg, true)
        // Unused by the LSM programs: keep them small.
        .map_max_entries(names::map::PENDING, 1);
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|e| EnforceError::Load(format!("{e:#}")))?;
    for (name, hook) in programs_for(&lsm_cfg) {
        let err = |what: &str, e: String| EnforceError::Load(format!("{what} {name}: {e}"));
        let prog: &mut Lsm = ebpf
            .program_mut(name)
            .ok_or_else(|| err("finding", "missing from the eBPF object".into()))?
            .try_into()
            .map_err(|e| err("typing", format!("{e}")))?;
        prog.load(hook, &btf).map_err(|e| {
            let mut msg = format!("{e:#}");
            if msg.contains("Operation not permitted") {
                msg.push_str(
                    " (the kernel refused the LSM program before verifying it: check that                      nothing on this host restricts BPF LSM programs, e.g. a BPF LSM policy on                      bpf() or a sandbox, and that kmodmon has CAP_BPF, CAP_PERFMON and                      CAP_SYS_ADMIN)",
                );
            }
            err("loading", msg)
        })?;
        let id = prog
            .attach()
            .map_err(|e| err("attaching", format!("{e:#}")))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| err("taking the link of", format!("{e:#}")))?
            .into();
        // Pin beside the old pin, then rename over it: the old link (if any) is released only
        // once the new one is in place. (bpffs refuses names with a '.'.)
        let tmp = dir.link(&format!("{name}_new"));
        remove_if_present(&tmp)?;
        link.pin(&tmp)
            .map_err(|e| err("pinning the link of", chain(&e)))?;
        std::fs::rename(&tmp, dir.link(name))
            .map_err(|e| err("renaming the link pin of", e.to_string()))?;
        let ptmp = dir.prog(&format!("{name}_new"));
        remove_if_present(&ptmp)?;
        prog.pin(&ptmp).map_err(|e| err("pinning", chain(&e)))?;
        std::fs::rename(&ptmp, dir.prog(name))
            .map_err(|e| err("renaming the pin of", e.to_string()))?;
    }
    Ok(())
}

/// An error with its causes ("`BPF_OBJ_PIN` failed: Operation not permitted").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

fn remove_if_present(path: &Path) -> Result<(), EnforceError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(EnforceError::Pin(format!(
            "cannot remove {}: {e}",
            path.display()
        ))),
    }
}

/// Removes every pin (the caller turns the policy off first). Returns how many were removed.
pub fn remove(dir: &PinDir) -> Result<usize, EnforceError> {
    let mut n = 0;
    let mut paths: Vec<PathBuf> = Vec::new();
    for (p, _) in PROGRAMS {
        paths.push(dir.link(p));
        paths.push(dir.prog(p));
    }
    for (_, m) in MAPS {
        paths.push(dir.map(m));
    }
    for p in &paths {
        if p.exists() {
            remove_if_present(p)?;
            n += 1;
        }
    }
    for d in ["links", "progs", "maps"] {
        let _ = std::fs::remove_dir(dir.root.join(d));
    }
    let _ = std::fs::remove_dir(&dir.root);
    Ok(n)
}

/// How many LSM programs with kmodmon's program names are loaded in the kernel (pinned or
/// not): more than [`expected_links`] means duplicates.
pub fn loaded_program_count() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            let name = p.name_as_str().unwrap_or("");
            // The kernel keeps 15 bytes of a program's name.
            PROGRAMS
                .iter()
                .any(|(n, _)| !name.is_empty() && n.starts_with(name))
        })
        // BPF_PROG_TYPE_LSM (include/uapi/linux/bpf.h).
        .filter(|p| p.program_type() as u32 == 29)
        .count()
}
