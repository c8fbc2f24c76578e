//! Keeping the pinned policy maps equal to what the policy says for each cgroup.
//!
//! Allow-sets are shared: cgroups whose allowed names are the same use one set id. A set's keys
//! are written before any cgroup points at it, and removed only after no cgroup does, so every
//! update moves a cgroup from one complete decision to another.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use kmodmon_common::policy::{
    AllowKey, Decision, HOST_KEY, MODE_AUDIT, MODE_ENFORCE, MODE_OFF, NAME_KEY_LEN, RESTRICTED,
    Settings,
};

use super::{EnforceError, pins::PolicyMaps};
use crate::modname;
use crate::policy::{Effective, Mode, Policy};

/// Every allow-set key of a normalized name: the name (autoload requests) and the names its
/// module file may have (the LSM program compares finit_module's file name as it is).
pub fn allow_keys(set: u32, name: &str) -> Vec<AllowKey> {
    std::iter::once("")
        .chain(modname::FILE_SUFFIXES)
        .filter_map(|s| allow_key(set, &format!("{name}{s}")))
        .collect()
}

/// The allow-set key of a normalized name, or None when it cannot fit.
pub fn allow_key(set: u32, name: &str) -> Option<AllowKey> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= NAME_KEY_LEN {
        return None;
    }
    let mut key = AllowKey {
        set,
        name: [0; NAME_KEY_LEN],
    };
    for (d, s) in key.name.iter_mut().zip(bytes) {
        *d = if *s == b'-' { b'_' } else { *s };
    }
    Some(key)
}

struct SetRef {
    id: u32,
    refs: usize,
}

/// The kernel's policy maps and what kmodmon knows is in them.
pub struct KernelState {
    maps: PolicyMaps,
    sets: HashMap<BTreeSet<String>, SetRef>,
    /// cgroup → allowed names of its set (None: unrestricted).
    entries: HashMap<u64, Option<BTreeSet<String>>>,
    next_set: u32,
}

fn map_err(what: &str) -> impl Fn(aya::maps::MapError) -> EnforceError + '_ {
    move |e| EnforceError::Map(format!("{what}: {e}"))
}

impl KernelState {
    /// Takes over maps that may hold a previous run's state.
    pub fn adopt(maps: PolicyMaps) -> Result<KernelState, EnforceError> {
        let mut by_id: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for key in maps.allow.keys() {
            let key = key.map_err(map_err("reading policy_allow"))?;
            let end = key
                .name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(NAME_KEY_LEN);
            let name = String::from_utf8_lossy(&key.name[..end]).into_owned();
            // File-name variants belong to the plain name (see allow_keys).
            let name = modname::file_stem(&name).unwrap_or(&name).to_string();
            by_id.entry(key.set).or_default().insert(name);
        }
        let mut state = KernelState {
            next_set: by_id.keys().next_back().map_or(1, |m| m.saturating_add(1)),
            sets: HashMap::new(),
            entries: HashMap::new(),
            maps,
        };
        let mut entries = Vec::new();
        for item in state.maps.cgroups.iter() {
            entries.push(item.map_err(map_err("reading policy_cgroups"))?);
        }
        for (cg, d) in entries {
            let names = if d.flags & RESTRICTED != 0 {
                Some(by_id.get(&d.allow_set).cloned().unwrap_or_default())
            } else {
                None
            };
            if let Some(n) = &names {
                let r = state.sets.entry(n.clone()).or_insert(SetRef {
                    id: d.allow_set,
                    refs: 0,
                });
                r.refs += 1;
            }
            state.entries.insert(cg, names);
        }
        // Keys of sets no cgroup uses (an interrupted update) are dropped.
        let used: HashSet<u32> = state.sets.values().map(|s| s.id).collect();
        for (id, names) in by_id {
            if !used.contains(&id) {
                state.delete_keys(id, &names)?;
            }
        }
        Ok(state)
    }

    pub fn events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.maps.events.take()
    }

    pub fn settings(&self) -> Result<Settings, EnforceError> {
        self.maps
            .settings
            .get(&0, 0)
            .map_err(map_err("reading policy_settings"))
    }

    /// The mode in force (None: off or unknown).
    pub fn mode(&self) -> Result<Option<Mode>, EnforceError> {
        Ok(match self.settings()?.mode {
            MODE_AUDIT => Some(Mode::Audit),
            MODE_ENFORCE => Some(Mode::Enforce),
            _ => None,
        })
    }

    /// Sets the mode (Off disables every decision at once) and bumps the generation.
    pub fn set_mode(&mut self, mode: Option<Mode>) -> Result<u32, EnforceError> {
        let old = self.settings().unwrap_or_default();
        let s = Settings {
            mode: match mode {
                None => MODE_OFF,
                Some(Mode::Audit) => MODE_AUDIT,
                Some(Mode::Enforce) => MODE_ENFORCE,
            },
            generation: old.generation.wrapping_add(1),
        };
        self.maps
            .settings
            .set(0, s, 0)
            .map_err(map_err("writing policy_settings"))?;
        Ok(s.generation)
    }

    /// Points `cgroup` at `eff` (the host when `cgroup` is HOST_KEY).
    pub fn apply(&mut self, cgroup: u64, eff: &Effective) -> Result<(), EnforceError> {
        let want = eff.restrict.then(|| eff.allowed.clone());
        let rule = Policy::rule_id(eff.rule);
        let decision = match &want {
            None => Decision {
                rule,
                allow_set: 0,
                flags: 0,
                _reserved: 0,
            },
            Some(names) => Decision {
                rule,
                allow_set: self.acquire(names)?,
                flags: RESTRICTED,
                _reserved: 0,
            },
        };
        self.maps
            .cgroups
            .insert(cgroup, decision, 0)
            .map_err(map_err("writing policy_cgroups"))?;
        let old = self.entries.insert(cgroup, want);
        if let Some(Some(old)) = old {
            self.release(&old)?;
        }
        Ok(())
    }

    /// Drops `cgroup`'s entry (it falls back to its nearest mapped ancestor, or the host).
    pub fn remove(&mut self, cgroup: u64) -> Result<(), EnforceError> {
        let Some(old) = self.entries.remove(&cgroup) else {
            return Ok(());
        };
        match self.maps.cgroups.remove(&cgroup) {
            Ok(()) => {}
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err("removing from policy_cgroups")(e)),
        }
        if let Some(old) = old {
            self.release(&old)?;
        }
        Ok(())
    }

    /// Removes every container entry not in `keep` (the host entry stays).
    pub fn retain(&mut self, keep: &HashSet<u64>) -> Result<usize, EnforceError> {
        let stale: Vec<u64> = self
            .entries
            .keys()
            .copied()
            .filter(|c| *c != HOST_KEY && !keep.contains(c))
            .collect();
        for c in &stale {
            self.remove(*c)?;
        }
        Ok(stale.len())
    }

    fn acquire(&mut self, names: &BTreeSet<String>) -> Result<u32, EnforceError> {
        if let Some(r) = self.sets.get_mut(names) {
            r.refs += 1;
            return Ok(r.id);
        }
        let id = self.next_set;
        self.next_set = self.next_set.checked_add(1).ok_or_else(|| {
            EnforceError::Map("allow-set ids exhausted; run `kmodmon enforce on --replace`".into())
        })?;
        for n in names {
            for key in allow_keys(id, n) {
                self.maps
                    .allow
                    .insert(key, 1, 0)
                    .map_err(map_err("writing policy_allow"))?;
            }
        }
        self.sets.insert(names.clone(), SetRef { id, refs: 1 });
        Ok(id)
    }

    fn release(&mut self, names: &BTreeSet<String>) -> Result<(), EnforceError> {
        let Some(r) = self.sets.get_mut(names) else {
            return Ok(());
        };
        r.refs = r.refs.saturating_sub(1);
        if r.refs > 0 {
            return Ok(());
        }
        let id = r.id;
        self.sets.remove(names);
        self.delete_keys(id, names)
    }

    fn delete_keys(&mut self, id: u32, names: &BTreeSet<String>) -> Result<(), EnforceError> {
        for n in names {
            for key in allow_keys(id, n) {
                match self.maps.allow.remove(&key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err("removing from policy_allow")(e)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_keys_are_normalized_and_bounded() {
        let k = allow_key(3, "ip-vs").unwrap();
        assert_eq!(k.set, 3);
        assert_eq!(&k.name[..6], b"ip_vs\0");
        assert!(allow_key(1, "").is_none());
        assert!(allow_key(1, &"x".repeat(NAME_KEY_LEN)).is_none());
        assert!(allow_key(1, &"x".repeat(NAME_KEY_LEN - 1)).is_some());
        let all = allow_keys(2, "ip_vs");
        assert_eq!(all.len(), 5);
        assert_eq!(&all[2].name[..12], b"ip_vs.ko.xz\0");
    }
}
