//! Keeping the pinned policy maps equal to what the policy says, and knowing exactly what was
//! written (so the self-check can tell a change made by someone else from our own).
//!
//! Allow-sets are shared: cgroups whose allowed names are the same use one set id. A set's keys
//! are written before any cgroup points at it, and removed only after no cgroup does, so every
//! update moves a cgroup from one complete decision to another.
//!
//! Capacity: the allow map holds [`KernelState::allow_capacity`] keys. The policy's own lists
//! (host, `[unselected]`, every rule, with dependencies) may use at most a quarter of it — a
//! policy that needs more is refused before anything is written ([`KernelState::fits`]) — and
//! one set at most [`MAX_SET_NAMES`]. What a container adds from its own KERNEL_MODULES lives
//! in the rest; when it does not fit, that container (and only it) falls back to its rule's
//! own list, which always fits ([`Full`]).
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use aya::maps::IterableMap as _;
use kmodmon_common::policy::{
    AllowKey, CONTAINER, Decision, EMPTY_SET, HOST_KEY, MODE_AUDIT, MODE_ENFORCE, MODE_OFF,
    NAME_KEY_LEN, PREFIX_RULES, ParentKey, PrefixRule, RESTRICTED, Settings, UNSELECTED_KEY,
};

use super::{EnforceError, pins::PolicyMaps};
use crate::policy::{Effective, Mode, Policy};

/// Most names (with dependencies) one allow-set may hold.
pub const MAX_SET_NAMES: usize = 512;

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

/// A map update the kernel refused because the map is full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full {
    pub map: &'static str,
}

/// Why a store operation failed.
#[derive(Debug)]
pub enum StoreError {
    /// The map has no room (E2BIG).
    Full(&'static str),
    Other(String),
}

impl From<StoreError> for EnforceError {
    fn from(e: StoreError) -> EnforceError {
        match e {
            StoreError::Full(m) => EnforceError::Map(format!("{m} is full")),
            StoreError::Other(s) => EnforceError::Map(s),
        }
    }
}

/// The policy maps as the state sees them (the pinned maps, or a fake in tests).
pub trait Store {
    fn cgroups(&self) -> Result<Vec<(u64, Decision)>, StoreError>;
    fn set_cgroup(&mut self, id: u64, d: Decision) -> Result<(), StoreError>;
    fn remove_cgroup(&mut self, id: u64) -> Result<(), StoreError>;
    fn allow_keys(&self) -> Result<Vec<AllowKey>, StoreError>;
    fn add_allow(&mut self, k: AllowKey) -> Result<(), StoreError>;
    fn remove_allow(&mut self, k: &AllowKey) -> Result<(), StoreError>;
    fn parents(&self) -> Result<Vec<ParentKey>, StoreError>;
    fn add_parent(&mut self, k: ParentKey) -> Result<(), StoreError>;
    fn remove_parent(&mut self, k: &ParentKey) -> Result<(), StoreError>;
    fn prefixes(&self) -> Result<Vec<PrefixRule>, StoreError>;
    fn set_prefix(&mut self, i: u32, r: PrefixRule) -> Result<(), StoreError>;
    fn settings(&self) -> Result<Settings, StoreError>;
    fn set_settings(&mut self, s: Settings) -> Result<(), StoreError>;
    /// (allow map, cgroup map) capacity.
    fn capacity(&self) -> (usize, usize);
}

fn syscall_err(what: &'static str, e: aya::maps::MapError) -> StoreError {
    if let aya::maps::MapError::SyscallError(s) = &e
        && s.io_error.raw_os_error() == Some(libc::E2BIG)
    {
        return StoreError::Full(what);
    }
    StoreError::Other(format!("{what}: {e}"))
}

fn ignore_missing(
    what: &'static str,
    r: Result<(), aya::maps::MapError>,
) -> Result<(), StoreError> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(s))
            if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(syscall_err(what, e)),
    }
}

impl Store for PolicyMaps {
    fn cgroups(&self) -> Result<Vec<(u64, Decision)>, StoreError> {
        self.cgroups
            .iter()
            .map(|r| r.map_err(|e| syscall_err("policy_cgroups", e)))
            .collect()
    }
    fn set_cgroup(&mut self, id: u64, d: Decision) -> Result<(), StoreError> {
        self.cgroups
            .insert(id, d, 0)
            .map_err(|e| syscall_err("policy_cgroups", e))
    }
    fn remove_cgroup(&mut self, id: u64) -> Result<(), StoreError> {
        ignore_missing("policy_cgroups", self.cgroups.remove(&id))
    }
    fn allow_keys(&self) -> Result<Vec<AllowKey>, StoreError> {
        self.allow
            .keys()
            .map(|r| r.map_err(|e| syscall_err("policy_allow", e)))
            .collect()
    }
    fn add_allow(&mut self, k: AllowKey) -> Result<(), StoreError> {
        self.allow
            .insert(k, 1, 0)
            .map_err(|e| syscall_err("policy_allow", e))
    }
    fn remove_allow(&mut self, k: &AllowKey) -> Result<(), StoreError> {
        ignore_missing("policy_allow", self.allow.remove(k))
    }
    fn parents(&self) -> Result<Vec<ParentKey>, StoreError> {
        self.parents
            .keys()
            .map(|r| r.map_err(|e| syscall_err("policy_parents", e)))
            .collect()
    }
    fn add_parent(&mut self, k: ParentKey) -> Result<(), StoreError> {
        self.parents
            .insert(k, 1, 0)
            .map_err(|e| syscall_err("policy_parents", e))
    }
    fn remove_parent(&mut self, k: &ParentKey) -> Result<(), StoreError> {
        ignore_missing("policy_parents", self.parents.remove(k))
    }
    fn prefixes(&self) -> Result<Vec<PrefixRule>, StoreError> {
        (0..PREFIX_RULES)
            .map(|i| {
                self.prefixes
                    .get(&i, 0)
                    .map_err(|e| syscall_err("policy_prefixes", e))
            })
            .collect()
    }
    fn set_prefix(&mut self, i: u32, r: PrefixRule) -> Result<(), StoreError> {
        self.prefixes
            .set(i, r, 0)
            .map_err(|e| syscall_err("policy_prefixes", e))
    }
    fn settings(&self) -> Result<Settings, StoreError> {
        self.settings
            .get(&0, 0)
            .map_err(|e| syscall_err("policy_settings", e))
    }
    fn set_settings(&mut self, s: Settings) -> Result<(), StoreError> {
        self.settings
            .set(0, s, 0)
            .map_err(|e| syscall_err("policy_settings", e))
    }
    fn capacity(&self) -> (usize, usize) {
        let max = |m: Result<aya::maps::MapInfo, aya::maps::MapError>| {
            m.map_or(0, |i| i.max_entries() as usize)
        };
        (max(self.allow.map().info()), max(self.cgroups.map().info()))
    }
}

struct SetRef {
    id: u32,
    refs: usize,
}

/// One cgroup's entry as written.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    decision: Decision,
    /// The allowed names of its set (None: unrestricted).
    names: Option<BTreeSet<String>>,
}

/// What the self-check found different from what was written, per map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    pub map: &'static str,
    /// Entries written that are gone.
    pub missing: usize,
    /// Entries nobody wrote.
    pub extra: usize,
    /// Entries whose value changed.
    pub changed: usize,
}

impl Drift {
    fn new(map: &'static str) -> Drift {
        Drift {
            map,
            ..Drift::default()
        }
    }

    pub fn any(&self) -> bool {
        self.missing + self.extra + self.changed > 0
    }

    pub fn describe(&self) -> String {
        format!(
            "{}: {} entr{} missing, {} extra, {} changed",
            self.map,
            self.missing,
            if self.missing == 1 { "y" } else { "ies" },
            self.extra,
            self.changed
        )
    }
}

/// The kernel's policy maps and exactly what kmodmon wrote into them.
pub struct KernelState<S: Store> {
    store: S,
    sets: HashMap<BTreeSet<String>, SetRef>,
    entries: HashMap<u64, Entry>,
    parents: BTreeSet<ParentKeyOrd>,
    prefixes: Vec<PrefixRule>,
    settings: Option<Settings>,
    next_set: u32,
    allow_used: usize,
}

/// A [`ParentKey`] with an order (for the sets of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParentKeyOrd {
    pub parent: u64,
    pub name: [u8; kmodmon_common::policy::PARENT_NAME_LEN],
}

impl From<ParentKeyOrd> for ParentKey {
    fn from(k: ParentKeyOrd) -> ParentKey {
        ParentKey {
            parent: k.parent,
            name: k.name,
        }
    }
}

impl From<ParentKey> for ParentKeyOrd {
    fn from(k: ParentKey) -> ParentKeyOrd {
        ParentKeyOrd {
            parent: k.parent,
            name: k.name,
        }
    }
}

fn name_of(key: &AllowKey) -> String {
    let end = key
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(NAME_KEY_LEN);
    String::from_utf8_lossy(&key.name[..end]).into_owned()
}

impl<S: Store> KernelState<S> {
    /// Takes over maps that may hold a previous run's state (its sets are reused).
    pub fn adopt(store: S) -> Result<KernelState<S>, EnforceError> {
        let mut by_id: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for key in store.allow_keys()? {
            by_id.entry(key.set).or_default().insert(name_of(&key));
        }
        let mut state = KernelState {
            next_set: by_id
                .keys()
                .next_back()
                .map_or(1, |m| m.saturating_add(1))
                .max(1),
            sets: HashMap::new(),
            entries: HashMap::new(),
            parents: BTreeSet::new(),
            prefixes: Vec::new(),
            settings: None,
            allow_used: 0,
            store,
        };
        for (cg, d) in state.store.cgroups()? {
            let names = if d.flags & RESTRICTED != 0 {
                Some(by_id.get(&d.allow_set).cloned().unwrap_or_default())
            } else {
                None
            };
            if let Some(n) = &names
                && d.allow_set != EMPTY_SET
            {
                let r = state.sets.entry(n.clone()).or_insert(SetRef {
                    id: d.allow_set,
                    refs: 0,
                });
                r.refs += 1;
            }
            state.entries.insert(cg, Entry { decision: d, names });
        }
        // Keys of sets no cgroup uses (an interrupted update) are dropped.
        let used: HashSet<u32> = state.sets.values().map(|s| s.id).collect();
        for (id, names) in &by_id {
            if used.contains(id) {
                state.allow_used += names.len();
            } else {
                state.delete_keys(*id, names)?;
            }
        }
        state.parents = state.store.parents()?.into_iter().map(Into::into).collect();
        state.prefixes = state.store.prefixes()?;
        state.settings = Some(state.store.settings()?);
        Ok(state)
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Keys the allow map holds at most.
    pub fn allow_capacity(&self) -> usize {
        self.store.capacity().0
    }

    /// Keys in use (what kmodmon wrote).
    pub fn allow_used(&self) -> usize {
        self.allow_used
    }

    /// cgroup entries (host and `[unselected]` included).
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Whether a policy's own lists fit (see the module docs); the error says why not.
    pub fn fits(&self, lists: &[BTreeSet<String>]) -> Result<(), String> {
        let distinct: BTreeSet<&BTreeSet<String>> = lists.iter().collect();
        let budget = self.allow_capacity() / 4;
        if let Some(big) = distinct.iter().find(|l| l.len() > MAX_SET_NAMES) {
            return Err(format!(
                "one allow-list needs {} names with dependencies, more than the {MAX_SET_NAMES} \
                 one list may hold",
                big.len()
            ));
        }
        let need: usize = distinct.iter().map(|l| l.len()).sum();
        if need > budget {
            return Err(format!(
                "its allow-lists need {need} names with dependencies, more than the {budget} \
                 (a quarter of the kernel's allow map, {} keys) reserved for them",
                self.allow_capacity()
            ));
        }
        Ok(())
    }

    /// The policy generation as written.
    pub fn generation(&self) -> u32 {
        self.settings.map_or(0, |s| s.generation)
    }

    /// The settings as written (None: off or unknown).
    pub fn mode(&self) -> Option<Mode> {
        match self.settings.map(|s| s.mode) {
            Some(MODE_AUDIT) => Some(Mode::Audit),
            Some(MODE_ENFORCE) => Some(Mode::Enforce),
            _ => None,
        }
    }

    /// Sets the mode (Off disables every decision at once) and bumps the generation.
    pub fn set_mode(&mut self, mode: Option<Mode>) -> Result<u32, EnforceError> {
        let old = self.store.settings().unwrap_or_default();
        let s = Settings {
            mode: match mode {
                None => MODE_OFF,
                Some(Mode::Audit) => MODE_AUDIT,
                Some(Mode::Enforce) => MODE_ENFORCE,
            },
            generation: old.generation.wrapping_add(1),
        };
        self.store.set_settings(s)?;
        self.settings = Some(s);
        Ok(s.generation)
    }

    /// Points `cgroup` at `eff` (HOST_KEY: the host; UNSELECTED_KEY: `[unselected]`).
    /// `container`: the entry of a container (it caps name-rule cgroups below it). A full map
    /// is [`StoreError::Full`], with nothing changed.
    pub fn apply(
        &mut self,
        cgroup: u64,
        eff: &Effective,
        container: bool,
    ) -> Result<(), StoreError> {
        let want = eff.restrict.then(|| eff.allowed.clone());
        let rule = Policy::rule_id(eff.rule);
        let flags = if container { CONTAINER } else { 0 };
        let decision = match &want {
            None => Decision {
                rule,
                allow_set: 0,
                flags,
                _reserved: 0,
            },
            Some(names) => Decision {
                rule,
                allow_set: self.acquire(names)?,
                flags: flags | RESTRICTED,
                _reserved: 0,
            },
        };
        if let Some(old) = self.entries.get(&cgroup)
            && old.decision == decision
            && old.names == want
        {
            // Unchanged: give back the reference just taken.
            if let Some(names) = &want {
                self.release(names)?;
            }
            return Ok(());
        }
        if let Err(e) = self.store.set_cgroup(cgroup, decision) {
            if let Some(names) = &want {
                self.release(names)?;
            }
            return Err(e);
        }
        let old = self.entries.insert(
            cgroup,
            Entry {
                decision,
                names: want,
            },
        );
        if let Some(Entry {
            names: Some(old), ..
        }) = old
        {
            self.release(&old)?;
        }
        Ok(())
    }

    /// Drops `cgroup`'s entry (it falls back to what its ancestors and names say).
    pub fn remove(&mut self, cgroup: u64) -> Result<(), StoreError> {
        let Some(old) = self.entries.remove(&cgroup) else {
            return Ok(());
        };
        self.store.remove_cgroup(cgroup)?;
        if let Some(old) = old.names {
            self.release(&old)?;
        }
        Ok(())
    }

    /// The cgroups with an entry (host and `[unselected]` included).
    pub fn cgroups(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.keys().copied()
    }

    /// Removes every container entry not in `keep` (the host and `[unselected]` stay).
    pub fn retain(&mut self, keep: &HashSet<u64>) -> Result<usize, StoreError> {
        let stale: Vec<u64> = self
            .entries
            .keys()
            .copied()
            .filter(|c| *c != HOST_KEY && *c != UNSELECTED_KEY && !keep.contains(c))
            .collect();
        for c in &stale {
            self.remove(*c)?;
        }
        Ok(stale.len())
    }

    /// Makes the container-parent map hold exactly `want`.
    pub fn set_parents(&mut self, want: &BTreeSet<ParentKeyOrd>) -> Result<(), StoreError> {
        for k in want.difference(&self.parents.clone()) {
            self.store.add_parent((*k).into())?;
            self.parents.insert(*k);
        }
        for k in self.parents.clone().difference(want) {
            self.store.remove_parent(&(*k).into())?;
            self.parents.remove(k);
        }
        Ok(())
    }

    /// Writes the prefix rules (unused slots zeroed).
    pub fn set_prefixes(&mut self, rules: &[PrefixRule]) -> Result<(), StoreError> {
        let mut want = vec![PrefixRule::default(); PREFIX_RULES as usize];
        for (slot, r) in want.iter_mut().zip(rules) {
            *slot = *r;
        }
        for (i, r) in want.iter().enumerate() {
            if self.prefixes.get(i) != Some(r) {
                self.store.set_prefix(i as u32, *r)?;
            }
        }
        self.prefixes = want;
        Ok(())
    }

    fn acquire(&mut self, names: &BTreeSet<String>) -> Result<u32, StoreError> {
        if let Some(r) = self.sets.get_mut(names) {
            r.refs += 1;
            return Ok(r.id);
        }
        if names.is_empty() {
            return Ok(EMPTY_SET);
        }
        let (capacity, _) = self.store.capacity();
        if names.len() > MAX_SET_NAMES || self.allow_used + names.len() > capacity {
            return Err(StoreError::Full("policy_allow"));
        }
        let id = self.next_set;
        self.next_set = self
            .next_set
            .checked_add(1)
            .ok_or_else(|| StoreError::Other("allow-set ids exhausted".into()))?;
        let mut written = BTreeSet::new();
        for n in names {
            let Some(key) = allow_key(id, n) else {
                continue;
            };
            if let Err(e) = self.store.add_allow(key) {
                // Leave nothing half-written.
                let _ = self.delete_keys(id, &written);
                return Err(e);
            }
            written.insert(n.clone());
        }
        self.allow_used += names.len();
        self.sets.insert(names.clone(), SetRef { id, refs: 1 });
        Ok(id)
    }

    fn release(&mut self, names: &BTreeSet<String>) -> Result<(), StoreError> {
        let Some(r) = self.sets.get_mut(names) else {
            return Ok(());
        };
        r.refs = r.refs.saturating_sub(1);
        if r.refs > 0 {
            return Ok(());
        }
        let id = r.id;
        self.sets.remove(names);
        self.allow_used = self.allow_used.saturating_sub(names.len());
        self.delete_keys(id, names)
    }

    fn delete_keys(&mut self, id: u32, names: &BTreeSet<String>) -> Result<(), StoreError> {
        for n in names {
            if let Some(key) = allow_key(id, n) {
                self.store.remove_allow(&key)?;
            }
        }
        Ok(())
    }

    /// The allow keys kmodmon wrote.
    fn expected_keys(&self) -> HashSet<(u32, String)> {
        self.sets
            .iter()
            .flat_map(|(names, r)| names.iter().map(move |n| (r.id, n.replace('-', "_"))))
            .collect()
    }

    /// Compares every map with what was written; with `repair`, writes back what differs.
    /// Returns the maps that differ (what was found, before any repair).
    pub fn verify(&mut self, repair: bool) -> Result<Vec<Drift>, StoreError> {
        let mut out = Vec::new();
        // Settings.
        let mut d = Drift::new("policy_settings");
        if let Some(want) = self.settings
            && self.store.settings()? != want
        {
            d.changed = 1;
            if repair {
                self.store.set_settings(want)?;
            }
        }
        out.push(d);
        // cgroup entries.
        let mut d = Drift::new("policy_cgroups");
        let have: HashMap<u64, Decision> = self.store.cgroups()?.into_iter().collect();
        for (cg, e) in &self.entries {
            match have.get(cg) {
                None => d.missing += 1,
                Some(x) if *x != e.decision => d.changed += 1,
                _ => continue,
            }
            if repair {
                self.store.set_cgroup(*cg, e.decision)?;
            }
        }
        for cg in have.keys().filter(|c| !self.entries.contains_key(c)) {
            d.extra += 1;
            if repair {
                self.store.remove_cgroup(*cg)?;
            }
        }
        out.push(d);
        // Allow keys.
        let mut d = Drift::new("policy_allow");
        let want = self.expected_keys();
        let have: Vec<AllowKey> = self.store.allow_keys()?;
        let have_set: HashSet<(u32, String)> = have.iter().map(|k| (k.set, name_of(k))).collect();
        for (set, name) in want.difference(&have_set) {
            d.missing += 1;
            if repair && let Some(k) = allow_key(*set, name) {
                self.store.add_allow(k)?;
            }
        }
        for k in &have {
            if !want.contains(&(k.set, name_of(k))) {
                d.extra += 1;
                if repair {
                    self.store.remove_allow(k)?;
                }
            }
        }
        out.push(d);
        // Container parents.
        let mut d = Drift::new("policy_parents");
        let have: BTreeSet<ParentKeyOrd> =
            self.store.parents()?.into_iter().map(Into::into).collect();
        for k in self.parents.difference(&have) {
            d.missing += 1;
            if repair {
                self.store.add_parent((*k).into())?;
            }
        }
        for k in have.difference(&self.parents) {
            d.extra += 1;
            if repair {
                self.store.remove_parent(&(*k).into())?;
            }
        }
        out.push(d);
        // Prefix rules.
        let mut d = Drift::new("policy_prefixes");
        let have = self.store.prefixes()?;
        for (i, want) in self.prefixes.iter().enumerate() {
            if have.get(i) != Some(want) {
                d.changed += 1;
                if repair {
                    self.store.set_prefix(i as u32, *want)?;
                }
            }
        }
        out.push(d);
        Ok(out.into_iter().filter(Drift::any).collect())
    }
}

#[cfg(test)]
pub mod fake {
    //! An in-memory [`Store`] with the kernel maps' capacity rules.
    use super::*;

    #[derive(Default)]
    pub struct FakeStore {
        pub cgroups: HashMap<u64, Decision>,
        pub allow: HashSet<([u8; NAME_KEY_LEN], u32)>,
        pub parents: HashSet<(u64, [u8; 32])>,
        pub prefixes: Vec<PrefixRule>,
        pub settings: Settings,
        pub allow_cap: usize,
        pub cgroup_cap: usize,
    }

    impl FakeStore {
        pub fn new(allow_cap: usize, cgroup_cap: usize) -> FakeStore {
            FakeStore {
                prefixes: vec![PrefixRule::default(); PREFIX_RULES as usize],
                allow_cap,
                cgroup_cap,
                ..FakeStore::default()
            }
        }
    }

    impl Store for FakeStore {
        fn cgroups(&self) -> Result<Vec<(u64, Decision)>, StoreError> {
            Ok(self.cgroups.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn set_cgroup(&mut self, id: u64, d: Decision) -> Result<(), StoreError> {
            if !self.cgroups.contains_key(&id) && self.cgroups.len() >= self.cgroup_cap {
                return Err(StoreError::Full("policy_cgroups"));
            }
            self.cgroups.insert(id, d);
            Ok(())
        }
        fn remove_cgroup(&mut self, id: u64) -> Result<(), StoreError> {
            self.cgroups.remove(&id);
            Ok(())
        }
        fn allow_keys(&self) -> Result<Vec<AllowKey>, StoreError> {
            Ok(self
                .allow
                .iter()
                .map(|(name, set)| AllowKey {
                    set: *set,
                    name: *name,
                })
                .collect())
        }
        fn add_allow(&mut self, k: AllowKey) -> Result<(), StoreError> {
            if !self.allow.contains(&(k.name, k.set)) && self.allow.len() >= self.allow_cap {
                return Err(StoreError::Full("policy_allow"));
            }
            self.allow.insert((k.name, k.set));
            Ok(())
        }
        fn remove_allow(&mut self, k: &AllowKey) -> Result<(), StoreError> {
            self.allow.remove(&(k.name, k.set));
            Ok(())
        }
        fn parents(&self) -> Result<Vec<ParentKey>, StoreError> {
            Ok(self
                .parents
                .iter()
                .map(|(p, n)| ParentKey {
                    parent: *p,
                    name: *n,
                })
                .collect())
        }
        fn add_parent(&mut self, k: ParentKey) -> Result<(), StoreError> {
            self.parents.insert((k.parent, k.name));
            Ok(())
        }
        fn remove_parent(&mut self, k: &ParentKey) -> Result<(), StoreError> {
            self.parents.remove(&(k.parent, k.name));
            Ok(())
        }
        fn prefixes(&self) -> Result<Vec<PrefixRule>, StoreError> {
            Ok(self.prefixes.clone())
        }
        fn set_prefix(&mut self, i: u32, r: PrefixRule) -> Result<(), StoreError> {
            self.prefixes[i as usize] = r;
            Ok(())
        }
        fn settings(&self) -> Result<Settings, StoreError> {
            Ok(self.settings)
        }
        fn set_settings(&mut self, s: Settings) -> Result<(), StoreError> {
            self.settings = s;
            Ok(())
        }
        fn capacity(&self) -> (usize, usize) {
            (self.allow_cap, self.cgroup_cap)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::FakeStore, *};
    use crate::policy::RuleRef;

    fn eff(names: &[&str]) -> Effective {
        Effective {
            rule: RuleRef::Unselected,
            restrict: true,
            allowed: names.iter().map(|s| s.to_string()).collect(),
            from_declaration: BTreeSet::new(),
            pins: BTreeSet::new(),
            signed: false,
        }
    }

    #[test]
    fn allow_keys_are_normalized_and_bounded() {
        let k = allow_key(3, "ip-vs").unwrap();
        assert_eq!(k.set, 3);
        assert_eq!(&k.name[..6], b"ip_vs\0");
        assert!(allow_key(1, "").is_none());
        assert!(allow_key(1, &"x".repeat(NAME_KEY_LEN)).is_none());
        assert!(allow_key(1, &"x".repeat(NAME_KEY_LEN - 1)).is_some());
    }

    #[test]
    fn equal_sets_are_shared_and_freed_with_their_last_user() {
        let mut s = KernelState::adopt(FakeStore::new(100, 100)).unwrap();
        s.apply(10, &eff(&["a", "b"]), true).unwrap();
        s.apply(11, &eff(&["a", "b"]), true).unwrap();
        assert_eq!(s.store().allow.len(), 2, "one set for both");
        assert_eq!(
            s.store().cgroups[&10].allow_set,
            s.store().cgroups[&11].allow_set
        );
        assert_ne!(s.store().cgroups[&10].flags & CONTAINER, 0);
        s.remove(10).unwrap();
        assert_eq!(s.store().allow.len(), 2);
        s.remove(11).unwrap();
        assert!(s.store().allow.is_empty());
        assert_eq!(s.allow_used(), 0);
        // Nothing allowed: restricted with the empty set, which has no keys.
        s.apply(12, &eff(&[]), true).unwrap();
        assert_eq!(s.store().cgroups[&12].allow_set, EMPTY_SET);
        assert_eq!(s.store().cgroups[&12].flags & RESTRICTED, RESTRICTED);
    }

    /// A full allow map refuses one container's set and changes nothing else; the next
    /// container with a set that fits (or a shared one) still gets its entry.
    #[test]
    fn a_full_allow_map_refuses_one_set_and_leaves_the_rest() {
        let mut s = KernelState::adopt(FakeStore::new(5, 100)).unwrap();
        s.apply(10, &eff(&["a", "b", "c"]), true).unwrap();
        let before = s.store().cgroups.clone();
        assert!(matches!(
            s.apply(11, &eff(&["d", "e", "f"]), true),
            Err(StoreError::Full("policy_allow"))
        ));
        assert_eq!(s.store().cgroups, before, "nothing written for 11");
        assert_eq!(s.store().allow.len(), 3, "no half-written set");
        s.apply(11, &eff(&["a", "b", "c"]), true).unwrap();
        s.apply(12, &eff(&["d", "e"]), true).unwrap();
        assert_eq!(s.store().allow.len(), 5);
        // A set over the per-set cap is refused whatever room there is.
        let mut big = KernelState::adopt(FakeStore::new(10_000, 100)).unwrap();
        let names: Vec<String> = (0..=MAX_SET_NAMES).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        assert!(matches!(
            big.apply(1, &eff(&refs), true),
            Err(StoreError::Full("policy_allow"))
        ));
    }

    #[test]
    fn a_full_cgroup_map_leaves_no_orphan_set() {
        let mut s = KernelState::adopt(FakeStore::new(100, 1)).unwrap();
        s.apply(10, &eff(&["a"]), true).unwrap();
        assert!(matches!(
            s.apply(11, &eff(&["x", "y"]), true),
            Err(StoreError::Full("policy_cgroups"))
        ));
        assert_eq!(s.store().allow.len(), 1, "the refused entry's set is gone");
        // Changing an existing entry needs no room.
        s.apply(10, &eff(&["b"]), true).unwrap();
        assert_eq!(s.store().allow.len(), 1);
    }

    #[test]
    fn a_policy_whose_lists_do_not_fit_is_refused() {
        let s = KernelState::adopt(FakeStore::new(400, 100)).unwrap();
        let list = |n: usize| -> BTreeSet<String> { (0..n).map(|i| format!("m{i}")).collect() };
        assert!(
            s.fits(&[list(50), list(50)]).is_ok(),
            "equal lists count once"
        );
        let err = s.fits(&[list(60), list(50)]).unwrap_err();
        assert!(err.contains("need 110 names"), "{err}");
        assert!(err.contains("more than the 100"), "{err}");
    }

    /// The self-check sees every kind of change made behind kmodmon's back and puts back what
    /// was written.
    #[test]
    fn verify_finds_and_repairs_changes() {
        let mut s = KernelState::adopt(FakeStore::new(100, 100)).unwrap();
        s.set_mode(Some(Mode::Enforce)).unwrap();
        s.apply(
            HOST_KEY,
            &Effective {
                restrict: false,
                ..eff(&[])
            },
            false,
        )
        .unwrap();
        s.apply(10, &eff(&["a"]), true).unwrap();
        let parent = ParentKeyOrd {
            parent: 1,
            name: *b"docker\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        s.set_parents(&[parent].into_iter().collect()).unwrap();
        s.set_prefixes(&[PrefixRule::new(b"docker-", 1, true, b"")])
            .unwrap();
        assert!(s.verify(false).unwrap().is_empty(), "as written");

        let st = s.store_mut();
        st.settings.mode = MODE_OFF;
        st.cgroups.remove(&10);
        st.cgroups.insert(99, Decision::default());
        st.allow.insert((allow_key(7, "evil").unwrap().name, 7));
        st.parents.clear();
        st.prefixes[0] = PrefixRule::default();
        let drift = s.verify(true).unwrap();
        let by: HashMap<&str, &Drift> = drift.iter().map(|d| (d.map, d)).collect();
        assert_eq!(by["policy_settings"].changed, 1);
        assert_eq!(
            (by["policy_cgroups"].missing, by["policy_cgroups"].extra),
            (1, 1)
        );
        assert_eq!(by["policy_allow"].extra, 1);
        assert_eq!(by["policy_parents"].missing, 1);
        assert_eq!(by["policy_prefixes"].changed, 1);
        assert!(s.verify(false).unwrap().is_empty(), "repaired");
        assert_eq!(s.store().settings.mode, MODE_ENFORCE);
    }

    /// A restarted kmodmon takes over the maps as they are: sets, entries, parents.
    #[test]
    fn adoption_reads_back_what_was_written() {
        let mut s = KernelState::adopt(FakeStore::new(100, 100)).unwrap();
        s.apply(10, &eff(&["a", "b"]), true).unwrap();
        s.apply(11, &eff(&["a", "b"]), true).unwrap();
        let store = std::mem::replace(s.store_mut(), FakeStore::new(100, 100));
        let mut again = KernelState::adopt(store).unwrap();
        assert_eq!(again.allow_used(), 2);
        assert!(again.verify(false).unwrap().is_empty());
        again.remove(10).unwrap();
        again.remove(11).unwrap();
        assert!(again.store().allow.is_empty(), "the adopted set is freed");
    }
}
