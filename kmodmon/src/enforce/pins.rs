//! The LSM programs, their links and maps, pinned in bpffs so enforcement outlives the process
//! that installed it:
//!
//! ```text
//! /sys/fs/bpf/kmodmon/links/<program>   the attachments (a pinned link keeps its program attached)
//! /sys/fs/bpf/kmodmon/progs/<program>   the programs (for bpftool, inspection and the self-check)
//! /sys/fs/bpf/kmodmon/maps/<map>_v<N>   the policy maps, the records ring, the counters, ...
//! /sys/fs/bpf/kmodmon/maps/contract     the contract version of the pinned programs
//! ```
//!
//! Installing when the links are already pinned adopts them (nothing is loaded twice). Else
//! (nothing pinned, a program missing, another contract version, or `replace`) this binary's
//! programs are loaded with the pinned maps of its version (created when absent), the caller
//! fills the maps, and only then are the programs attached and each link swapped in atomically
//! (pinned beside the old pin, renamed over it): a new program never runs on empty maps, and an
//! upgrade never leaves a gap.
//!
//! Pinned programs outlive the binary that loaded them, so every layout they share with
//! userspace is versioned ([`kmodmon_common::CONTRACT_VERSION`]): each map pin carries the
//! version in its name and `maps/contract` holds the version of the pinned programs, written once
//! all their links are in place. Pins of another version (or of no stored version) are
//! replaced, never adopted ([`decide`]); after the swap their rings are drained and counted
//! (their records cannot be decoded here) and their maps unpinned.
use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf};
use kmodmon_common::{
    CONTRACT_VERSION, names,
    policy::{AllowKey, Decision, ParentKey, PrefixRule, Settings},
};

use super::{EnforceError, bpf, host::BPFFS};
use crate::sensor::lsm::{self, Loaded, PROGRAMS};

/// Pin names of the maps (under `maps/`; bpffs refuses names with a '.'). Each carries the
/// contract version, so programs of one layout never share a map with another's.
pub mod pin {
    pub const POLICY_CGROUPS: &str = "policy_cgroups_v6";
    pub const POLICY_ALLOW: &str = "policy_allow_v6";
    pub const POLICY_SETTINGS: &str = "policy_settings_v6";
    pub const POLICY_PARENTS: &str = "policy_parents_v6";
    pub const POLICY_PREFIXES: &str = "policy_prefixes_v6";
    pub const POLICY_ACK: &str = "policy_ack_v6";
    pub const CRYPTO_REQUESTS: &str = "crypto_requests_v6";
    pub const LOAD_STASH: &str = "load_stash_v6";
    /// The LSM programs' counters (drops, decisions, errors).
    pub const COUNTERS: &str = "counters_v6";
    /// The denied / would_deny ring.
    pub const EVENTS: &str = "events_v6";
    /// The contract version of the pinned programs (the same name in every version).
    pub const CONTRACT: &str = "contract";
    /// Every events ring pin name starts so (version 1 pinned it as plain `events`).
    pub const EVENTS_PREFIX: &str = "events";
}

/// (map in the object, pin name): every map the LSM programs share across loads.
pub const MAPS: [(&str, &str); 11] = [
    (names::map::POLICY_CGROUPS, pin::POLICY_CGROUPS),
    (names::map::POLICY_ALLOW, pin::POLICY_ALLOW),
    (names::map::POLICY_SETTINGS, pin::POLICY_SETTINGS),
    (names::map::POLICY_PARENTS, pin::POLICY_PARENTS),
    (names::map::POLICY_PREFIXES, pin::POLICY_PREFIXES),
    (names::map::POLICY_ACK, pin::POLICY_ACK),
    (names::map::CRYPTO_REQUESTS, pin::CRYPTO_REQUESTS),
    (names::map::LOAD_STASH, pin::LOAD_STASH),
    (names::map::COUNTERS, pin::COUNTERS),
    (names::map::EVENTS, pin::EVENTS),
    (names::map::CONTRACT, pin::CONTRACT),
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

    /// How many of `programs`' links are pinned.
    pub fn pinned_links(&self, programs: &[(&str, &str)]) -> usize {
        programs
            .iter()
            .filter(|(p, _)| self.link(p).exists())
            .count()
    }

    /// Whether any kmodmon link is pinned.
    pub fn any_pinned(&self) -> bool {
        self.pinned_links(&PROGRAMS) > 0
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
    pub parents: HashMap<MapData, ParentKey, u32>,
    pub prefixes: Array<MapData, PrefixRule>,
    pub ack: Array<MapData, u64>,
    pub counters: PerCpuArray<MapData, u64>,
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
            parents: HashMap::try_from(open_map(dir, pin::POLICY_PARENTS)?)
                .map_err(|e| bad(pin::POLICY_PARENTS, e))?,
            prefixes: Array::try_from(open_map(dir, pin::POLICY_PREFIXES)?)
                .map_err(|e| bad(pin::POLICY_PREFIXES, e))?,
            ack: Array::try_from(open_map(dir, pin::POLICY_ACK)?)
                .map_err(|e| bad(pin::POLICY_ACK, e))?,
            counters: PerCpuArray::try_from(open_map(dir, pin::COUNTERS)?)
                .map_err(|e| bad(pin::COUNTERS, e))?,
            events: open_map(dir, pin::EVENTS)
                .ok()
                .and_then(|m| RingBuf::try_from(m).ok()),
        })
    }
}

/// What [`prepare`] found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    /// The links were already pinned: nothing was loaded.
    Adopted,
    /// Programs were loaded, attached and pinned.
    Fresh,
    /// This binary's programs replaced the pinned ones.
    Replaced,
}

/// The contract version stored beside the pins: `None` when there is none (nothing pinned, or
/// pins of version 1, which stored none); `Some(0)` when programs were pinned but never
/// completed.
pub fn pinned_contract(dir: &PinDir) -> Option<u32> {
    let map = open_map(dir, pin::CONTRACT).ok()?;
    let slot: Array<MapData, u32> = Array::try_from(map).ok()?;
    slot.get(&0, 0).ok()
}

fn write_contract(dir: &PinDir) -> Result<(), EnforceError> {
    let mut slot: Array<MapData, u32> =
        Array::try_from(open_map(dir, pin::CONTRACT)?).map_err(|e| {
            EnforceError::Pin(format!(
                "pinned map {} has the wrong type: {e}",
                pin::CONTRACT
            ))
        })?;
    slot.set(0, CONTRACT_VERSION, 0)
        .map_err(|e| EnforceError::Pin(format!("writing the contract version: {e}")))
}

/// What [`prepare`] does, decided from what is pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Use the pinned programs: all there, of this contract version, no replace asked.
    Adopt,
    /// Load this binary's programs and pin them (over any pinned ones). `stale`: the pins are
    /// of another contract version (or none stored), so their maps are drained and unpinned
    /// after the swap.
    Load { stale: bool },
}

/// The install decision. Pins of an older kmodmon may lack a program this one has, or be of
/// another layout: then it replaces them.
pub fn decide(
    pinned_links: usize,
    expected_links: usize,
    pinned_contract: Option<u32>,
    replace: bool,
) -> Action {
    let same_layout = pinned_contract == Some(CONTRACT_VERSION);
    if pinned_links == expected_links && same_layout && !replace {
        Action::Adopt
    } else {
        Action::Load {
            stale: !same_layout,
        }
    }
}

/// What [`prepare`] leaves for the caller: the programs to attach once the maps are filled.
pub enum Prepared {
    Adopt,
    Load {
        loaded: Box<Loaded>,
        /// The pins were of another layout.
        stale: bool,
        /// How many links were pinned before (0: a fresh install).
        pinned_before: usize,
    },
}

/// Decides between adopting the pins and loading this binary's programs; when loading, the
/// maps of this version are pinned (created empty, or reused) and the programs verified, but
/// nothing is attached: fill the maps, then [`commit`].
pub fn prepare(dir: &PinDir, replace: bool) -> Result<Prepared, EnforceError> {
    let expected = lsm::expected_programs();
    if expected.is_empty() {
        // Let the loader say why (BTF).
        lsm::plan_here().map_err(|e| EnforceError::Load(e.to_string()))?;
    }
    let pinned = dir.pinned_links(&expected);
    let contract = pinned_contract(dir);
    let stale = match decide(pinned, expected.len(), contract, replace) {
        Action::Adopt => return Ok(Prepared::Adopt),
        Action::Load { stale } => stale,
    };
    let pinned_any = dir.pinned_links(&PROGRAMS);
    if stale && pinned_any > 0 {
        log::warn!(
            "the pinned LSM programs are of contract version {} and this kmodmon's is \
             {CONTRACT_VERSION}: replacing them instead of adopting them",
            contract.map_or_else(|| "1".to_string(), |v| v.to_string())
        );
    }
    dir.mkdirs()?;
    let map_paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|(n, p)| (*n, dir.map(p))).collect();
    let loaded = match lsm::load(&map_paths, None) {
        Ok(l) => l,
        Err(e) => {
            if pinned_any == 0 {
                let _ = remove(dir);
            }
            return Err(EnforceError::Load(e.to_string()));
        }
    };
    Ok(Prepared::Load {
        loaded: Box::new(loaded),
        stale,
        pinned_before: pinned_any,
    })
}

/// Attaches the loaded programs and swaps their links in (in [`PROGRAMS`] order), writes the
/// contract version and, for `stale` pins, drains and unpins the old layout's maps. A fresh
/// install that fails leaves no pins behind.
pub fn commit(
    dir: &PinDir,
    mut loaded: Box<Loaded>,
    stale: bool,
    pinned_before: usize,
) -> Result<Installed, EnforceError> {
    let r = attach_and_pin(dir, &mut loaded, None).and_then(|()| write_contract(dir));
    if r.is_err() && pinned_before == 0 {
        let _ = remove(dir);
    }
    r?;
    // Links of programs this kernel no longer takes (or an older kmodmon had) go.
    for (p, _) in PROGRAMS {
        if !loaded.plan.programs.iter().any(|(q, _)| *q == p) {
            let _ = remove_if_present(&dir.link(p));
            let _ = remove_if_present(&dir.prog(p));
        }
    }
    if stale {
        discard_stale(dir);
    }
    Ok(if pinned_before == 0 {
        Installed::Fresh
    } else {
        Installed::Replaced
    })
}

/// Attaches `only` (all when `None`) of the loaded programs and pins each link and program
/// over its old pin.
pub fn attach_and_pin(
    dir: &PinDir,
    loaded: &mut Loaded,
    only: Option<&[&str]>,
) -> Result<(), EnforceError> {
    let programs: Vec<&'static str> = loaded.plan.programs.iter().map(|(p, _)| *p).collect();
    for name in programs {
        if only.is_some_and(|o| !o.contains(&name)) {
            continue;
        }
        let err = |what: &str, e: String| EnforceError::Load(format!("{what} {name}: {e}"));
        let link = loaded
            .attach(name)
            .map_err(|e| err("attaching", e.to_string()))?;
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
        loaded
            .program(name)
            .ok_or_else(|| err("finding", "missing from the eBPF object".into()))?
            .pin(&ptmp)
            .map_err(|e| err("pinning", chain(&e)))?;
        std::fs::rename(&ptmp, dir.prog(name))
            .map_err(|e| err("renaming the pin of", e.to_string()))?;
    }
    Ok(())
}

/// Map pins in `maps/` that are not this version's.
fn stale_maps(dir: &PinDir) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir.root.join("maps")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !MAPS.iter().any(|(_, p)| p == n))
        .map(|n| dir.map(&n))
        .collect()
}

/// Drains the rings of programs of another layout (their links are gone by now, so nothing
/// writes them any more) — their records cannot be decoded here, but every one is counted in
/// the log — and unpins every map of that layout.
fn discard_stale(dir: &PinDir) {
    for path in stale_maps(dir) {
        let is_ring = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(pin::EVENTS_PREFIX));
        if is_ring {
            let drained = MapData::from_pin(&path)
                .ok()
                .and_then(|m| Map::from_map_data(m).ok())
                .and_then(|m| RingBuf::try_from(m).ok())
                .map(|mut ring| {
                    let mut n = 0u64;
                    while ring.next().is_some() {
                        n += 1;
                    }
                    n
                });
            match drained {
                Some(0) => {}
                Some(n) => log::warn!(
                    "discarded {n} denied/would_deny record(s) left in {} by LSM programs of \
                     another contract version (this kmodmon cannot read their layout)",
                    path.display()
                ),
                None => log::warn!(
                    "{} is not a ring buffer kmodmon can read; unpinning it",
                    path.display()
                ),
            }
        }
        if let Err(e) = remove_if_present(&path) {
            log::warn!("{e}");
        }
    }
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

pub fn remove_if_present(path: &Path) -> Result<(), EnforceError> {
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
        paths.push(dir.link(&format!("{p}_new")));
        paths.push(dir.prog(&format!("{p}_new")));
    }
    for (_, m) in MAPS {
        paths.push(dir.map(m));
    }
    paths.extend(stale_maps(dir));
    for p in &paths {
        if std::fs::symlink_metadata(p).is_ok() {
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
/// not): more than pinned links means duplicates.
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

/// The ids of the objects pinned for `programs` and the maps (for the self-check's report).
pub fn pinned_ids(
    dir: &PinDir,
    programs: &[(&str, &str)],
    tracing_type: u32,
) -> Vec<(String, Option<u32>)> {
    let mut out = Vec::new();
    for (p, _) in programs {
        for (what, path, kind) in [
            ("link", dir.link(p), bpf::Pinned::Link),
            ("prog", dir.prog(p), bpf::Pinned::Prog),
        ] {
            out.push((
                format!("{what} {p}"),
                bpf::pinned_id(&path, kind, tracing_type).ok().flatten(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use aya::EbpfLoader;
    use kmodmon_common::{CONTRACT_VERSION, names};

    use super::*;
    use crate::sensor::EBPF_OBJECT;

    #[test]
    fn pins_of_another_layout_are_replaced_not_adopted() {
        let v = Some(CONTRACT_VERSION);
        // All pinned, this version: adopted (unless a replace is asked for).
        assert_eq!(decide(6, 6, v, false), Action::Adopt);
        assert_eq!(decide(6, 6, v, true), Action::Load { stale: false });
        // Another version, or pins of version 1 (no version stored), or a version never
        // written (an install that did not complete): replaced, their maps discarded.
        for other in [
            Some(CONTRACT_VERSION + 1),
            Some(CONTRACT_VERSION - 1),
            None,
            Some(0),
        ] {
            assert_eq!(
                decide(6, 6, other, false),
                Action::Load { stale: true },
                "{other:?}"
            );
            assert_eq!(
                decide(6, 6, other, true),
                Action::Load { stale: true },
                "{other:?}"
            );
        }
        // Missing a program this kmodmon has (or one removed by someone): re-attached; the
        // layout decides about the maps.
        assert_eq!(decide(5, 6, v, false), Action::Load { stale: false });
        assert_eq!(decide(3, 6, None, false), Action::Load { stale: true });
        // Nothing pinned: a fresh install.
        assert_eq!(decide(0, 6, None, false), Action::Load { stale: true });
    }

    #[test]
    fn every_map_pin_carries_the_contract_version() {
        for (map, p) in MAPS {
            if p == pin::CONTRACT {
                continue;
            }
            assert!(
                p.ends_with(&format!("_v{CONTRACT_VERSION}")),
                "{map} is pinned as {p}"
            );
            assert!(!p.contains('.'), "bpffs refuses {p}");
        }
        assert!(pin::EVENTS.starts_with(pin::EVENTS_PREFIX));
    }

    /// On a real bpffs (a directory of its own, not kmodmon's pins): the ring and a map a
    /// version-2 kmodmon pinned as `events_v2` / `policy_cgroups` are found, the ring drained,
    /// both unpinned; this version's stay.
    #[test]
    fn stale_maps_are_drained_and_unpinned() {
        if !nix::unistd::geteuid().is_root() {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "needs root (BPF maps, bpffs), and CI runs as root");
            eprintln!("!!! SKIPPED stale_maps_are_drained_and_unpinned: needs root");
            return;
        }
        super::super::host::ensure_bpffs().unwrap();
        let dir = PinDir {
            root: Path::new(BPFFS).join(format!("kmodmon-unit-{}", std::process::id())),
        };
        dir.mkdirs().unwrap();
        for (map, name) in [
            (names::map::EVENTS, "events_v2"),
            (names::map::POLICY_CGROUPS, "policy_cgroups"),
            (names::map::EVENTS, pin::EVENTS),
        ] {
            let mut loader = EbpfLoader::new();
            loader.map_pin_path(map, dir.map(name));
            // Creates the maps (pinning the one named) without loading any program.
            drop(loader.load(EBPF_OBJECT).unwrap());
            assert!(dir.map(name).exists(), "{name} pinned");
        }
        let mut stale = stale_maps(&dir);
        stale.sort();
        assert_eq!(stale, vec![dir.map("events_v2"), dir.map("policy_cgroups")]);
        discard_stale(&dir);
        assert!(!dir.map("events_v2").exists(), "the stale ring is unpinned");
        assert!(
            !dir.map("policy_cgroups").exists(),
            "the stale map is unpinned"
        );
        assert!(dir.map(pin::EVENTS).exists(), "this version's ring stays");
        assert_eq!(remove(&dir).unwrap(), 1);
        assert!(!dir.root.exists());
    }
}
