//! The LSM programs, their links and the policy maps, pinned in bpffs so enforcement outlives
//! the process that installed it:
//!
//! ```text
//! /sys/fs/bpf/kmodmon/links/<program>   the attachments (a pinned link keeps its program attached)
//! /sys/fs/bpf/kmodmon/progs/<program>   the programs (for bpftool and inspection)
//! /sys/fs/bpf/kmodmon/maps/<map>        policy_cgroups, policy_allow, policy_settings,
//!                                       contract, events_v<N>
//! ```
//!
//! Installing when the links are already pinned adopts them (nothing is loaded twice);
//! `replace` loads the programs of this binary, reusing the pinned policy maps, and swaps each
//! link atomically (rename over the old pin), so an upgrade never leaves a gap.
//!
//! Pinned programs outlive the binary that loaded them, so the layouts they share with
//! userspace are versioned ([`kmodmon_common::CONTRACT_VERSION`]): `maps/contract` holds the
//! version of the pinned programs, written once all their links are in place, and the events
//! ring is pinned under a name carrying it. Pins of another version (or of no stored version)
//! are replaced, never adopted ([`decide`]); the old ring, whose records this binary cannot
//! read, is drained, counted and unpinned once the new programs are in place. The policy maps
//! are reused across a replace (they are what keeps enforcing during the swap): a change to
//! their layout needs new pin names for them too, as the ring has, not only a version bump.
use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
use kmodmon_common::{
    CONTRACT_VERSION, names,
    policy::{AllowKey, Decision, Settings},
};

use super::{EnforceError, host::BPFFS};
#[cfg(test)]
use crate::sensor::EBPF_OBJECT;
use crate::sensor::lsm::{self, PROGRAMS, expected_links};

/// Pin names of the maps (under `maps/`; bpffs refuses names with a '.').
pub mod pin {
    pub const POLICY_CGROUPS: &str = "policy_cgroups";
    pub const POLICY_ALLOW: &str = "policy_allow";
    pub const POLICY_SETTINGS: &str = "policy_settings";
    /// The contract version of the pinned programs.
    pub const CONTRACT: &str = "contract";
    /// The denied / would_deny ring: `events_v<CONTRACT_VERSION>`, so a daemon never reads a
    /// ring that programs of another record layout write.
    pub const EVENTS: &str = "events_v5";
    /// Every events ring pin name starts so (version 1 pinned it as plain `events`).
    pub const EVENTS_PREFIX: &str = "events";
}

/// (map in the object, pin name).
pub const MAPS: [(&str, &str); 5] = [
    (names::map::POLICY_CGROUPS, pin::POLICY_CGROUPS),
    (names::map::POLICY_ALLOW, pin::POLICY_ALLOW),
    (names::map::POLICY_SETTINGS, pin::POLICY_SETTINGS),
    (names::map::CONTRACT, pin::CONTRACT),
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

/// What [`install`] does, decided from what is pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Use the pinned programs: all there, of this contract version, no replace asked.
    Adopt,
    /// Load this binary's programs and pin them (over any pinned ones). `stale`: the pins are
    /// of another contract version (or none stored), so their events ring is drained and
    /// unpinned after the swap.
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

/// Loads, attaches and pins the LSM programs unless they are pinned already, of this contract
/// version (else, or with `replace`, this binary's replace them). A fresh install that fails
/// leaves no pins behind.
pub fn install(dir: &PinDir, replace: bool) -> Result<Installed, EnforceError> {
    let pinned = dir.pinned_links();
    let contract = pinned_contract(dir);
    let stale = match decide(pinned, expected_links(), contract, replace) {
        Action::Adopt => return Ok(Installed::Adopted),
        Action::Load { stale } => stale,
    };
    if stale && pinned > 0 {
        log::warn!(
            "the pinned LSM programs are of contract version {} and this kmodmon's is \
             {CONTRACT_VERSION}: replacing them instead of adopting them",
            contract.map_or_else(|| "1".to_string(), |v| v.to_string())
        );
    }
    let r = load_and_pin(dir).and_then(|()| write_contract(dir));
    if r.is_err() && pinned == 0 {
        let _ = remove(dir);
    }
    r?;
    if stale {
        discard_stale_rings(dir);
    }
    Ok(if pinned == 0 {
        Installed::Fresh
    } else {
        Installed::Replaced
    })
}

/// Events ring pins other than this version's, in `maps/`.
fn stale_rings(dir: &PinDir) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir.root.join("maps")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(pin::EVENTS_PREFIX) && n != pin::EVENTS)
        .map(|n| dir.map(&n))
        .collect()
}

/// Drains and unpins the rings of programs of another layout (their links are gone by now, so
/// nothing writes them any more): their records cannot be decoded here, but every one is
/// counted in the log.
fn discard_stale_rings(dir: &PinDir) {
    for path in stale_rings(dir) {
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
                "discarded {n} denied/would_deny record(s) left in {} by LSM programs of another \
                 contract version (this kmodmon cannot read their layout)",
                path.display()
            ),
            None => log::warn!(
                "{} is not a ring buffer kmodmon can read; unpinning it",
                path.display()
            ),
        }
        if let Err(e) = remove_if_present(&path) {
            log::warn!("{e}");
        }
    }
}

fn load_and_pin(dir: &PinDir) -> Result<(), EnforceError> {
    dir.mkdirs()?;
    let map_paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|(n, p)| (*n, dir.map(p))).collect();
    let mut loaded = lsm::load(&map_paths).map_err(|e| EnforceError::Load(e.to_string()))?;
    let links = std::mem::take(&mut loaded.links);
    for (name, link) in links {
        let err = |what: &str, e: String| EnforceError::Load(format!("{what} {name}: {e}"));
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
    paths.extend(stale_rings(dir));
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

#[cfg(test)]
mod tests {
    use aya::EbpfLoader;
    use kmodmon_common::{CONTRACT_VERSION, names};

    use super::*;

    #[test]
    fn pins_of_another_layout_are_replaced_not_adopted() {
        let v = Some(CONTRACT_VERSION);
        // All pinned, this version: adopted (unless a replace is asked for).
        assert_eq!(decide(4, 4, v, false), Action::Adopt);
        assert_eq!(decide(4, 4, v, true), Action::Load { stale: false });
        // Another version, or pins of version 1 (no version stored), or a version never
        // written (an install that did not complete): replaced, their ring discarded.
        for other in [
            Some(CONTRACT_VERSION + 1),
            Some(CONTRACT_VERSION - 1),
            None,
            Some(0),
        ] {
            assert_eq!(
                decide(4, 4, other, false),
                Action::Load { stale: true },
                "{other:?}"
            );
            assert_eq!(
                decide(4, 4, other, true),
                Action::Load { stale: true },
                "{other:?}"
            );
        }
        // Missing a program this kmodmon has: replaced; the layout decides about the ring.
        assert_eq!(decide(3, 4, v, false), Action::Load { stale: false });
        assert_eq!(decide(3, 4, None, false), Action::Load { stale: true });
        // Nothing pinned: a fresh install.
        assert_eq!(decide(0, 4, None, false), Action::Load { stale: true });
    }

    #[test]
    fn the_ring_pin_name_carries_the_contract_version() {
        assert_eq!(pin::EVENTS, format!("events_v{CONTRACT_VERSION}"));
        assert!(pin::EVENTS.starts_with(pin::EVENTS_PREFIX));
    }

    /// On a real bpffs (a directory of its own, not kmodmon's pins): the ring a version-1
    /// kmodmon pinned as `events` is found, drained and unpinned; this version's stays.
    #[test]
    fn stale_rings_are_drained_and_unpinned() {
        if !nix::unistd::geteuid().is_root() {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "needs root (BPF maps, bpffs), and CI runs as root");
            eprintln!("!!! SKIPPED stale_rings_are_drained_and_unpinned: needs root");
            return;
        }
        super::super::host::ensure_bpffs().unwrap();
        let dir = PinDir {
            root: Path::new(BPFFS).join(format!("kmodmon-unit-{}", std::process::id())),
        };
        dir.mkdirs().unwrap();
        for name in ["events", pin::EVENTS] {
            let mut loader = EbpfLoader::new();
            loader.map_pin_path(names::map::EVENTS, dir.map(name));
            // Creates the maps (pinning EVENTS) without loading any program.
            drop(loader.load(EBPF_OBJECT).unwrap());
            assert!(dir.map(name).exists(), "{name} pinned");
        }
        assert_eq!(stale_rings(&dir), vec![dir.map("events")]);
        discard_stale_rings(&dir);
        assert!(!dir.map("events").exists(), "the stale ring is unpinned");
        assert!(dir.map(pin::EVENTS).exists(), "this version's ring stays");
        assert_eq!(remove(&dir).unwrap(), 1);
        assert!(!dir.root.exists());
    }
}
