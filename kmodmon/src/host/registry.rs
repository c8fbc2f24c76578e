//! The container registry: one place that knows the host's cgroups, its containers and what
//! each declared, fed by the kernel's cgroup mkdir/rmdir records and by a rescan on a miss.
//!
//! Everyone reads the same registry: the enricher (events → containers), the enforcer
//! (policy maps keyed by cgroup), `kmodmon policy show` and `kmodmon check`. Whoever drives
//! it — the pipeline's enrich task in `tail` and `run` — calls [`Registry::cgroup_created`] /
//! [`Registry::cgroup_removed`] for every cgroup record, [`Registry::attribute`] for every
//! event, [`Registry::poll`] when [`Registry::next_wakeup`] passes, and hands the
//! [`Change`]s from [`Registry::take_changes`] to everyone who keeps state per container.
//!
//! A container is known from the first sign of it: its cgroup's mkdir record (recognised
//! from the path), its runtime state at start-up, or — for cgroups whose path says nothing
//! (plain `runc run NAME` → `/NAME`) — its runtime state found by a short series of lookups
//! after the mkdir ([`CANDIDATE_DELAYS`]). Its `KERNEL_MODULES` declaration is captured as it
//! starts (see [`super::tracking`]).
//!
//! cgroup v1: where a v1 hierarchy is mounted, the registry also follows the one the kernel
//! side reads ([`super::cgroup_v1`]): its tree (ids are directory inodes of that mount, unique
//! only within it), its mkdir/rmdir records ([`Registry::cgroup_v1_created`]) and
//! [`Registry::attribute_v1`] for events whose cgroup2 names no container.
//!
//! Runtime processes: [`Registry::on_behalf_of`] finds the container an OCI runtime process
//! among an event's ancestors works on (an OCI hook's event; see
//! [`super::runtime_process`]), and keeps what it learnt: the bundle's metadata and
//! declaration, given to the container when the registry tracks it.
use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::attribution::{self, Attribution, RECHECK, Resolved};
use super::cgroup::{self, CgroupCache};
use super::cgroup_v1::{CgroupLayout, V1Hierarchy};
use super::container;
use super::declaration::Declaration;
use super::moddb::{self, ModDb, RootFs};
use super::runtime_process;
use super::runtime_state::{self, ContainerMeta, StateConfig, StateKind, StateRoot};
use super::tracking::{CgroupRef, DeclState, Expectations, Tracked};
use crate::escape::escape_bytes;
use crate::event::{Ancestor, Container, OnBehalfOf};

/// How a new cgroup that is not recognisable from its path (plain runc's `/NAME`) is looked
/// for in runtime state again while its runtime writes its state: delays after the mkdir.
pub const CANDIDATE_DELAYS: [Duration; 7] = [
    Duration::from_millis(2),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(20),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(300),
];
/// How long after a container appears its runtime state is looked for on every event.
const YOUNG: Duration = Duration::from_secs(2);
/// Most candidate cgroups watched at once.
const MAX_CANDIDATES: usize = 256;
/// Most runtime processes (and bundle declarations) remembered; beyond it they are forgotten
/// and read again on demand.
const MAX_RUNTIME_PROCS: usize = 4096;

/// What the registry reads. `Default` is right for a real host.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// modules.dep / modules.alias directory (default /lib/modules/$(uname -r); absent → no
    /// dependency or alias resolution).
    pub modules_dir: Option<PathBuf>,
    /// Runtime state roots (default [`StateConfig::detect`]).
    pub state: Option<StateConfig>,
    /// The cgroup2 mount (default: [`cgroup::host_cgroup_root`]).
    pub cgroup_root: Option<PathBuf>,
    /// Root of /proc/modules and /sys/module (default `/`).
    pub live_root: Option<PathBuf>,
    /// Do not read a module database (tests).
    pub no_moddb: bool,
    /// The cgroup v1 hierarchy to follow (the one the kernel side reads; see
    /// [`super::cgroup_v1::detect`]); none when `None`.
    pub cgroup_v1: Option<V1Hierarchy>,
    /// The host's cgroup layout (default: from the v1 hierarchy given, else detected).
    pub cgroup_layout: Option<CgroupLayout>,
}

impl RegistryOptions {
    /// The host's defaults with the cgroup v1 hierarchy detected (`policy show`, `enforce`).
    pub fn detect() -> RegistryOptions {
        let (layout, v1) = super::cgroup_v1::detect();
        RegistryOptions {
            cgroup_v1: v1,
            cgroup_layout: Some(layout),
            ..RegistryOptions::default()
        }
    }
}

/// The container a host process acted for (see [`Registry::on_behalf_of`]).
#[derive(Clone, Debug)]
pub struct Behalf {
    pub on_behalf_of: OnBehalfOf,
    /// The registry key of that container (its ID): its declaration judges the event.
    pub key: String,
}

/// The v1 hierarchy followed: its tree and what its cgroups resolved to.
struct V1State {
    hierarchy: V1Hierarchy,
    cgroups: CgroupCache,
    resolved: std::collections::HashMap<u64, (Resolved, Instant)>,
}

/// Something the registry learnt that others keeping per-container state must follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A container became known: its cgroup appeared, or it was running at start-up. Its
    /// declaration may still be pending.
    Appeared { key: String, cgroup_id: u64 },
    /// More is known about it: its runtime state (name, labels) was found.
    Updated { key: String },
    /// Its declaration is known, or could not be read ([`DeclState::Known`] / `Failed`).
    Settled { key: String },
    /// Its cgroup was removed.
    Gone { key: String, cgroup_id: u64 },
}

/// What an event's cgroup resolved to.
#[derive(Clone, Debug, Default)]
pub struct Attributed {
    pub cgroup_path: Option<String>,
    pub container: Option<Container>,
    /// The registry key of the container (its ID), when it is one.
    pub key: Option<String>,
}

#[derive(Debug)]
struct Candidate {
    id: u64,
    tries: usize,
    next_at: Instant,
}

/// The host's cgroups and containers (see the module docs).
pub struct Registry {
    cgroups: CgroupCache,
    attribution: Attribution,
    tracked: Expectations,
    candidates: Vec<Candidate>,
    moddb: Option<Arc<ModDb>>,
    live_root: RootFs,
    changes: VecDeque<Change>,
    layout: CgroupLayout,
    cgroup_v1: Option<V1State>,
    proc_root: PathBuf,
    /// (pid, start) of runtime processes → the container each works on (`None`: none).
    runtime_procs: std::collections::HashMap<(u32, u64), Option<Behalf>>,
    /// Declarations read from bundles found through runtime processes, by container key.
    bundle_decls: std::collections::HashMap<String, Result<Declaration, String>>,
}

/// Counters for diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// cgroup lookups answered from the cache.
    pub cache_hits: u64,
    /// Full rescans of the runtimes' state.
    pub state_rescans: u64,
    /// Declaration capture attempts.
    pub captures: u64,
    /// Containers known (running and recently gone).
    pub containers: usize,
}

impl Registry {
    /// Walks the cgroup tree, reads runtime state and the module database once, and tracks
    /// the containers already running (each one queues a [`Change::Appeared`]).
    pub fn open(opts: RegistryOptions) -> Registry {
        let cgroup_root = opts.cgroup_root.clone().or_else(cgroup::host_cgroup_root);
        let state = opts.state.clone().unwrap_or_else(StateConfig::detect);
        let proc_root = state.proc_root.clone();
        let moddb = if opts.no_moddb {
            None
        } else {
            load_moddb(opts.modules_dir.as_deref())
        };
        let layout = opts
            .cgroup_layout
            .unwrap_or(match (&opts.cgroup_v1, &cgroup_root) {
                (Some(h), _) => h.layout(),
                (None, Some(_)) => CgroupLayout::Unified,
                (None, None) => CgroupLayout::Legacy,
            });
        let mut tracked = Expectations::new(proc_root.clone(), cgroup_root.clone());
        tracked.set_cgroup_v1_root(opts.cgroup_v1.as_ref().map(|h| h.mount.clone()));
        let cgroup_v1 = opts.cgroup_v1.map(|h| V1State {
            cgroups: CgroupCache::with_root(Some(h.mount.clone())),
            hierarchy: h,
            resolved: std::collections::HashMap::new(),
        });
        let mut r = Registry {
            cgroups: CgroupCache::with_root(cgroup_root.clone()),
            attribution: Attribution::new(state),
            tracked,
            candidates: Vec::new(),
            moddb: moddb.map(Arc::new),
            live_root: RootFs::new(opts.live_root.unwrap_or_else(|| PathBuf::from("/"))),
            changes: VecDeque::new(),
            layout,
            cgroup_v1,
            proc_root,
            runtime_procs: std::collections::HashMap::new(),
            bundle_decls: std::collections::HashMap::new(),
        };
        r.track_running();
        r
    }

    /// The host's cgroup layout.
    pub fn cgroup_layout(&self) -> CgroupLayout {
        self.layout
    }

    /// The cgroup v1 hierarchy followed, if any.
    pub fn cgroup_v1(&self) -> Option<&V1Hierarchy> {
        self.cgroup_v1.as_ref().map(|v| &v.hierarchy)
    }

    /// Replaces the module database (tests, or a reload).
    pub fn set_moddb(&mut self, db: Option<ModDb>) {
        self.moddb = db.map(Arc::new);
    }

    pub fn moddb(&self) -> Option<&ModDb> {
        self.moddb.as_deref()
    }

    /// Where /proc/modules and /sys/module are read.
    pub fn live_root(&self) -> &RootFs {
        &self.live_root
    }

    /// The cgroup2 mount read, when there is one.
    pub fn cgroup_root(&self) -> Option<&Path> {
        self.cgroups.root()
    }

    /// Containers running at start-up, from runtime state.
    fn track_running(&mut self) {
        let metas: Vec<_> = self.attribution.index().iter().cloned().collect();
        for meta in metas {
            let Some(path) = meta.cgroup_path.clone() else {
                continue;
            };
            let ino = |root: Option<&Path>| {
                root.and_then(|r| std::fs::metadata(r.join(path.trim_start_matches('/'))).ok())
                    .map_or(0, |m| m.ino())
            };
            let id = ino(self.cgroups.root());
            let v1_id = ino(self.cgroup_v1.as_ref().map(|v| v.hierarchy.mount.as_path()));
            let container = match container::parse_cgroup_path(&path) {
                Some(mut c) => {
                    attribution::complete(&mut c, &meta);
                    c
                }
                None => meta.to_container(),
            };
            let r = Resolved {
                path: Some(path),
                container: Some(container),
                meta: Some(Arc::new(meta)),
            };
            if id != 0 || v1_id == 0 {
                self.track(&r, id);
            }
            if v1_id != 0 {
                self.track_cg(&r, CgroupRef::V1(v1_id));
            }
        }
    }

    /// Tracks what `r` resolved to, queueing `Appeared` / `Updated` as it learns.
    fn track(&mut self, r: &Resolved, cgroup_id: u64) -> Option<String> {
        self.track_cg(r, CgroupRef::V2(cgroup_id))
    }

    /// [`Registry::track`] for a cgroup of either hierarchy. A container that gains runtime
    /// state, or its cgroup2 cgroup after being seen in v1 first, is `Updated`.
    fn track_cg(&mut self, r: &Resolved, cg: CgroupRef) -> Option<String> {
        let key = r.key()?.to_string();
        let state = |t: &Tracked| (t.meta.is_some(), t.cgroup_id);
        let before = self.tracked.get(&key).map(state);
        self.tracked.track_in(r, cg);
        let after = self.tracked.get(&key).map(state).unwrap_or_default();
        match before {
            None => self.changes.push_back(Change::Appeared {
                key: key.clone(),
                cgroup_id: after.1,
            }),
            Some((meta, id)) if (!meta && after.0) || (id == 0 && after.1 != 0) => {
                self.changes.push_back(Change::Updated { key: key.clone() })
            }
            Some(_) => {}
        }
        Some(key)
    }

    /// The kernel created a cgroup.
    pub fn cgroup_created(&mut self, id: u64, path: &str) {
        self.attribution.invalidate(id);
        self.cgroups.created(id, path);
        let r = self.attribution.resolve(&mut self.cgroups, id);
        log::debug!(
            "cgroup {id} {path} created: container {:?}, runtime state {}",
            r.key(),
            if r.meta.is_some() {
                "found"
            } else {
                "not found"
            }
        );
        match self.track(&r, id) {
            Some(key) => {
                self.tracked.revive(&key);
                self.capture(&key);
            }
            None if r.meta.is_none() && self.candidates.len() < MAX_CANDIDATES => {
                // Maybe a container whose runtime has not written its state yet.
                self.attribution.invalidate(id);
                self.candidates.push(Candidate {
                    id,
                    tries: 0,
                    next_at: Instant::now() + CANDIDATE_DELAYS[0],
                });
            }
            None => {}
        }
    }

    /// The kernel removed a cgroup.
    pub fn cgroup_removed(&mut self, id: u64, path: &str) {
        self.attribution.invalidate(id);
        self.cgroups.removed(id, path);
        self.candidates.retain(|c| c.id != id);
        for key in self.tracked.cgroup_gone(id) {
            self.changes.push_back(Change::Gone { key, cgroup_id: id });
        }
    }

    /// The cgroup path and container of an event's cgroup (`pid`, `ppid`: the task, whose
    /// environ may hold the declaration of a container still starting).
    pub fn attribute(&mut self, cgroup_id: u64, pid: u32, ppid: Option<u32>) -> Attributed {
        if cgroup_id == 0 {
            return Attributed::default();
        }
        let candidate = self.candidates.iter().position(|c| c.id == cgroup_id);
        if candidate.is_some()
            && self
                .attribution
                .cached(cgroup_id)
                .is_none_or(|r| r.container.is_none())
        {
            // Not a container a moment ago; its runtime state may be there now.
            self.attribution.invalidate(cgroup_id);
        }
        let mut r = self.attribution.resolve(&mut self.cgroups, cgroup_id);
        if let Some(i) = candidate
            && r.container.is_some()
        {
            // Found: keep this answer (the state goes away when the container exits).
            self.candidates.swap_remove(i);
        }
        let key = self.track(&r, cgroup_id);
        if let Some(t) = key.as_deref().and_then(|k| self.tracked.get(k))
            && t.meta.is_none()
            && t.since.elapsed() < YOUNG
        {
            // A container that just appeared: its runtime state may have been written
            // since its cgroup was resolved.
            self.attribution.invalidate(cgroup_id);
            let again = self.attribution.resolve(&mut self.cgroups, cgroup_id);
            if again.meta.is_some() && again.key() == key.as_deref() {
                self.track(&again, cgroup_id);
                r = again;
            }
        }
        if let Some(k) = &key {
            self.tracked.saw_pid(k, pid);
            if let Some(pp) = ppid {
                self.tracked.saw_pid(k, pp);
            }
        }
        Attributed {
            cgroup_path: r.path,
            container: self.tracked_container(key.as_deref()).or(r.container),
            key,
        }
    }

    /// A cgroup of the v1 hierarchy followed was created (`hierarchy` is checked).
    pub fn cgroup_v1_created(&mut self, hierarchy: u32, id: u64, path: &str) {
        let Some(v1) = self.cgroup_v1.as_mut() else {
            return;
        };
        if v1.hierarchy.hierarchy_id != hierarchy {
            return;
        }
        v1.resolved.remove(&id);
        v1.cgroups.created(id, path);
        let r = self.resolve_v1(id);
        log::debug!("cgroup v1 {id} {path} created: container {:?}", r.key());
        if let Some(key) = self.track_cg(&r, CgroupRef::V1(id)) {
            self.tracked.revive(&key);
            self.capture(&key);
        }
    }

    /// A cgroup of the v1 hierarchy followed was removed.
    pub fn cgroup_v1_removed(&mut self, hierarchy: u32, id: u64, path: &str) {
        let Some(v1) = self.cgroup_v1.as_mut() else {
            return;
        };
        if v1.hierarchy.hierarchy_id != hierarchy {
            return;
        }
        v1.resolved.remove(&id);
        v1.cgroups.removed(id, path);
        for key in self.tracked.cgroup_v1_gone(id) {
            self.changes.push_back(Change::Gone { key, cgroup_id: 0 });
        }
    }

    /// What v1 cgroup `id` resolves to (cached like cgroup2 ids, see [`RECHECK`]).
    fn resolve_v1(&mut self, id: u64) -> Resolved {
        let Some(v1) = self.cgroup_v1.as_mut() else {
            return Resolved::default();
        };
        if let Some((r, at)) = v1.resolved.get(&id)
            && (r.container.is_some() || at.elapsed() < RECHECK)
        {
            return r.clone();
        }
        let Some(path) = v1.cgroups.lookup(id) else {
            return Resolved::default();
        };
        let r = self.attribution.resolve_path(&path);
        if v1.resolved.len() >= attribution::MAX_CACHED {
            v1.resolved.clear();
        }
        v1.resolved.insert(id, (r.clone(), Instant::now()));
        r
    }

    /// [`Registry::attribute`] for a cgroup of the v1 hierarchy followed: its path there and
    /// its container (for events whose cgroup2 names none). Nothing without a v1 hierarchy.
    pub fn attribute_v1(&mut self, v1_id: u64, pid: u32, ppid: Option<u32>) -> Attributed {
        if v1_id == 0 || self.cgroup_v1.is_none() {
            return Attributed::default();
        }
        let mut r = self.resolve_v1(v1_id);
        let key = self.track_cg(&r, CgroupRef::V1(v1_id));
        if let Some(t) = key.as_deref().and_then(|k| self.tracked.get(k))
            && t.meta.is_none()
            && t.since.elapsed() < YOUNG
        {
            // A container that just appeared: its runtime state may be there by now.
            if let Some(v1) = self.cgroup_v1.as_mut() {
                v1.resolved.remove(&v1_id);
            }
            let again = self.resolve_v1(v1_id);
            if again.meta.is_some() && again.key() == key.as_deref() {
                self.track_cg(&again, CgroupRef::V1(v1_id));
                r = again;
            }
        }
        if let Some(k) = &key {
            self.tracked.saw_pid(k, pid);
            if let Some(pp) = ppid {
                self.tracked.saw_pid(k, pp);
            }
        }
        Attributed {
            cgroup_path: r.path,
            container: self.tracked_container(key.as_deref()).or(r.container),
            key,
        }
    }

    /// The container an OCI runtime process among `ancestors` (parent first, as the kernel
    /// recorded them) works on: for the event of a hook, or any process a runtime started
    /// while creating, starting or deleting a container. The nearest runtime process wins.
    /// What is learnt is kept: the container, if tracked, gets the bundle's metadata (and so
    /// its declaration at once); otherwise the declaration is kept under its key.
    pub fn on_behalf_of(&mut self, ancestors: &[Ancestor]) -> Option<Behalf> {
        for (depth, a) in ancestors.iter().enumerate() {
            if !runtime_process::is_runtime_comm(&a.comm) {
                continue;
            }
            let found = self.runtime_process(a);
            if let Some(mut b) = found {
                b.on_behalf_of.depth = depth as u32 + 1;
                if let Some(t) = self.tracked.get(&b.key) {
                    // What the registry knows now (a name from runtime state written since).
                    b.on_behalf_of.container = t.container.clone();
                }
                return Some(b);
            }
        }
        None
    }

    /// What runtime process `a` works on, read once per process (pid and start time) and
    /// remembered: a runtime that exits right after its hooks (`runc run -d`) may be gone by
    /// the time its hooks' events are enriched, so each new container's runtime process is
    /// also read as the container starts ([`Registry::learn_runtime_processes`]).
    fn runtime_process(&mut self, a: &Ancestor) -> Option<Behalf> {
        let k = (a.pid, runtime_process::start_ticks(a.start_boottime_ns));
        if let Some(f) = self.runtime_procs.get(&k) {
            return f.clone();
        }
        if self.runtime_procs.len() >= MAX_RUNTIME_PROCS {
            self.runtime_procs.clear();
        }
        // Reading it may capture a declaration, which looks for runtime processes again.
        self.runtime_procs.insert(k, None);
        let f = self.resolve_runtime_process(a);
        self.runtime_procs.insert(k, f.clone());
        f
    }

    /// Reads the runtime processes of container `key` while it starts: the parents of the
    /// processes in its cgroup that are still the runtime's (its init before it runs the
    /// container's program) are the `runc create|run` / `crun run` that also runs its hooks.
    fn learn_runtime_processes(&mut self, key: &str) {
        let Some(t) = self.tracked.get(key) else {
            return;
        };
        if !matches!(t.state, DeclState::Pending { .. }) {
            return;
        }
        let dir = match (
            self.cgroups.root(),
            &t.cgroup_path,
            &self.cgroup_v1,
            &t.cgroup_v1_path,
        ) {
            (Some(root), Some(p), _, _) if t.cgroup_id != 0 => root.join(p.trim_start_matches('/')),
            (_, _, Some(v1), Some(p)) => v1.hierarchy.mount.join(p.trim_start_matches('/')),
            _ => return,
        };
        for parent in runtime_process::parents_of_cgroup(&self.proc_root, &dir) {
            self.runtime_process(&parent);
        }
    }

    fn resolve_runtime_process(&mut self, a: &Ancestor) -> Option<Behalf> {
        let rp = match runtime_process::read(&self.proc_root, a) {
            Ok(p) => p?,
            Err(e) => {
                log::debug!("runtime process {} ({}): {e}", a.pid, a.comm);
                return None;
            }
        };
        let inv = &rp.invocation;
        let mut cfg = self.attribution.config().clone();
        if let Some(root) = &inv.root {
            // A state directory of its own (docker's, containerd's): look there first.
            let kind = if inv.runtime == container::CRUN {
                StateKind::Crun
            } else {
                StateKind::Runc
            };
            if !cfg.roots.iter().any(|r| &r.dir == root) {
                cfg.roots
                    .insert(0, StateRoot::new(root.clone(), kind, false, inv.runtime));
            }
        }
        let mut how = "runtime_cmdline";
        let mut meta = rp.bundle().and_then(|bundle| {
            let direct = runtime_state::from_bundle(&cfg, &inv.id, inv.runtime, &bundle);
            direct.meta.or_else(|| {
                // The runtime in another mount namespace: its files through /proc/PID/root.
                let seen = rp
                    .proc_dir
                    .join("root")
                    .join(bundle.strip_prefix("/").unwrap_or(&bundle));
                let mut m = runtime_state::from_bundle(&cfg, &inv.id, inv.runtime, &seen).meta?;
                m.bundle = Some(bundle.clone());
                Some(m)
            })
        });
        if meta.is_none() {
            how = "runtime_state";
            let l = runtime_state::lookup(&cfg, &inv.id);
            for p in l.problems {
                log::debug!("runtime state: {p}");
            }
            meta = l.meta;
        }
        let meta = meta.map(Arc::new);
        let key = self.tracked_key_for(&inv.id, meta.as_deref());
        let container = match (&key, &meta) {
            (Some(k), _) => self.tracked.get(k).map(|t| t.container.clone())?,
            (None, Some(m)) => m.to_container(),
            // Neither a bundle nor state names it: too little to trust the command line.
            (None, None) => return None,
        };
        let key = key.unwrap_or_else(|| container.id.clone());
        if let Some(m) = &meta {
            if self.tracked.adopt_meta(&key, m) {
                self.changes.push_back(Change::Updated { key: key.clone() });
                self.capture(&key);
            }
            if self.bundle_decls.len() >= MAX_RUNTIME_PROCS {
                self.bundle_decls.clear();
            }
            let d = m
                .declaration(&self.proc_root, None)
                .map_err(|e| e.to_string());
            self.bundle_decls.insert(key.clone(), d);
        }
        log::debug!(
            "runtime process {} ({} {} {}) works on container {key} ({how})",
            rp.pid,
            inv.runtime,
            inv.command,
            inv.id
        );
        Some(Behalf {
            on_behalf_of: OnBehalfOf {
                container,
                how: how.to_string(),
                program: inv.runtime.to_string(),
                pid: rp.pid,
                comm: rp.comm.clone(),
                command: escape_bytes(inv.command.as_bytes()),
                depth: 0,
                bundle: meta
                    .as_ref()
                    .and_then(|m| m.bundle.as_ref())
                    .map(|b| escape_bytes(b.as_os_str().as_encoded_bytes())),
            },
            key,
        })
    }

    /// The key of the tracked container a runtime's `id` (and its metadata) names.
    fn tracked_key_for(&self, id: &str, meta: Option<&ContainerMeta>) -> Option<String> {
        if self.tracked.get(id).is_some() {
            return Some(id.to_string());
        }
        if let Some(m) = meta {
            let cid = m.to_container().id;
            if self.tracked.get(&cid).is_some() {
                return Some(cid);
            }
        }
        self.tracked
            .iter()
            .find(|t| t.meta.as_ref().is_some_and(|m| m.id == id))
            .map(|t| t.container.id.clone())
    }

    /// The declaration that judges events of container `key`: what its bundle's config says
    /// when it was read through a runtime process (the environment the runtime gives the
    /// container), else what the registry captured, or its state (pending, failed). `None`:
    /// no record of it at all.
    pub fn declaration_state(&self, key: &str) -> Option<DeclState> {
        let tracked = self.tracked.get(key).map(|t| &t.state);
        match (tracked, self.bundle_decls.get(key)) {
            (_, Some(Ok(d))) | (Some(DeclState::Known(d)), _) => Some(DeclState::Known(d.clone())),
            (Some(s), _) => Some(s.clone()),
            (None, Some(Err(e))) => Some(DeclState::Failed(e.clone())),
            (None, None) => None,
        }
    }

    /// The tracked container `key` as the registry knows it now (what runtime state or a
    /// bundle added since its cgroup was first resolved).
    fn tracked_container(&self, key: Option<&str>) -> Option<Container> {
        key.and_then(|k| self.tracked.get(k))
            .map(|t| t.container.clone())
    }

    /// The container `key`, running or recently gone.
    pub fn container(&self, key: &str) -> Option<&Tracked> {
        self.tracked.get(key)
    }

    /// Every known container that has not gone, sorted by key.
    pub fn running(&self) -> Vec<&Tracked> {
        let mut v: Vec<&Tracked> = self
            .tracked
            .iter()
            .filter(|t| t.gone_at.is_none())
            .collect();
        v.sort_by(|a, b| a.container.id.cmp(&b.container.id));
        v
    }

    /// Runtime-state files the last rescan could not read or parse (for reports).
    pub fn state_problems(&self) -> &[String] {
        &self.attribution.problems
    }

    /// Whether `key`'s declaration is still being read (and no bundle gave it).
    pub fn is_pending(&self, key: &str) -> bool {
        self.tracked
            .get(key)
            .is_some_and(|t| matches!(t.state, DeclState::Pending { .. }))
            && !matches!(self.bundle_decls.get(key), Some(Ok(_)))
    }

    /// If `key`'s declaration is pending and an attempt is due, makes one now.
    pub fn capture_if_due(&mut self, key: &str) {
        if self.tracked.is_due(key, Instant::now()) {
            self.capture(key);
        }
    }

    /// One capture attempt now; queues `Settled` when it settles.
    fn capture(&mut self, key: &str) {
        self.learn_runtime_processes(key);
        // Runtime state (the OCI config) may have appeared since the cgroup did.
        if let Some(t) = self.tracked.get(key)
            && t.meta.is_none()
        {
            let (id, v1_id) = (t.cgroup_id, t.cgroup_v1_id);
            if id != 0 {
                self.attribution.invalidate(id);
                let r = self.attribution.resolve(&mut self.cgroups, id);
                if r.meta.is_some() && r.key() == Some(key) {
                    self.track(&r, id);
                }
            } else if v1_id != 0 {
                if let Some(v1) = self.cgroup_v1.as_mut() {
                    v1.resolved.remove(&v1_id);
                }
                let r = self.resolve_v1(v1_id);
                if r.meta.is_some() && r.key() == Some(key) {
                    self.track_cg(&r, CgroupRef::V1(v1_id));
                }
            }
        }
        let settled = self.tracked.attempt(key, Instant::now());
        if let Some(t) = self.tracked.get(key) {
            log::debug!(
                "container {key}: {} attempt: {:?}",
                if t.meta.is_some() {
                    "config"
                } else {
                    "environ"
                },
                t.state
            );
        }
        if settled {
            self.changes.push_back(Change::Settled {
                key: key.to_string(),
            });
        }
    }

    /// Due capture retries and candidate cgroups.
    pub fn poll(&mut self) {
        let now = Instant::now();
        for key in self.tracked.due(now) {
            self.capture(&key);
        }
        let due: Vec<usize> = (0..self.candidates.len())
            .filter(|&i| self.candidates[i].next_at <= now)
            .collect();
        for i in due.into_iter().rev() {
            let id = self.candidates[i].id;
            self.attribution.invalidate(id);
            let r = self.attribution.resolve(&mut self.cgroups, id);
            if let Some(key) = self.track(&r, id) {
                self.candidates.swap_remove(i);
                self.capture(&key);
                continue;
            }
            self.attribution.invalidate(id);
            let c = &mut self.candidates[i];
            c.tries += 1;
            match CANDIDATE_DELAYS.get(c.tries) {
                Some(d) => c.next_at = now + *d,
                None => {
                    self.candidates.swap_remove(i);
                }
            }
        }
    }

    /// When [`Registry::poll`] has work next (`None`: nothing scheduled).
    pub fn next_wakeup(&self) -> Option<Instant> {
        let candidates = self.candidates.iter().map(|c| c.next_at).min();
        [self.tracked.next_due(), candidates]
            .into_iter()
            .flatten()
            .min()
    }

    /// Reads every pending declaration until it settles or `deadline` passes (for one-shot
    /// commands: `policy show`, `check`, `enforce on`), then gives up on the rest.
    pub fn settle(&mut self, deadline: Instant) {
        while let Some(next) = self.tracked.next_due() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if next > now {
                std::thread::sleep((next - now).min(deadline - now));
            }
            self.poll();
        }
        self.give_up_all();
    }

    /// Ends every pending capture now (shutdown): what is unknown stays unknown, and each
    /// such container gets its `Settled`.
    pub fn give_up_all(&mut self) {
        for key in self.tracked.give_up_all() {
            self.changes.push_back(Change::Settled { key });
        }
    }

    /// What changed since the last call, in order.
    pub fn take_changes(&mut self) -> Vec<Change> {
        self.changes.drain(..).collect()
    }

    pub fn stats(&self) -> RegistryStats {
        RegistryStats {
            cache_hits: self.attribution.hits,
            state_rescans: self.attribution.scans,
            captures: self.tracked.attempts,
            containers: self.tracked.len(),
        }
    }
}

impl Tracked {
    /// Valid module names the container declared (empty while pending or unreadable).
    pub fn declared_modules(&self) -> &[String] {
        match &self.state {
            DeclState::Known(d) => &d.expected.modules,
            _ => &[],
        }
    }

    /// OCI annotations and engine labels from its runtime state.
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.meta
            .as_ref()
            .map(|m| m.annotations.clone())
            .unwrap_or_default()
    }
}

/// The module database of the running kernel (or `dir`), when there is one.
fn load_moddb(dir: Option<&Path>) -> Option<ModDb> {
    let result = match dir {
        Some(d) => ModDb::open(d),
        None => {
            let root = RootFs::host();
            let kernel = moddb::running_kernel(&root)?;
            ModDb::for_kernel(&root, &kernel)
        }
    };
    match result {
        Ok(db) => Some(db),
        Err(e) => {
            log::info!("no module database, so no dependency or alias resolution: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    struct Host(tempfile::TempDir);

    impl Host {
        fn new() -> Host {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("sys/fs/cgroup/unified")).unwrap();
            std::fs::create_dir_all(dir.path().join("proc")).unwrap();
            Host(dir)
        }
        fn cg_root(&self) -> PathBuf {
            self.0.path().join("sys/fs/cgroup/unified")
        }
        fn mkdir(&self, rel: &str) -> u64 {
            let d = self.cg_root().join(rel.trim_start_matches('/'));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::metadata(&d).unwrap().ino()
        }
        fn process(&self, pid: u32, comm: &str, environ: &[u8]) {
            let d = self.0.path().join("proc").join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("environ"), environ).unwrap();
            std::fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
        }
        fn registry(&self) -> Registry {
            Registry::open(RegistryOptions {
                state: Some(StateConfig::under(self.0.path())),
                cgroup_root: Some(self.cg_root()),
                live_root: Some(self.0.path().to_path_buf()),
                no_moddb: true,
                ..RegistryOptions::default()
            })
        }
    }

    #[test]
    fn a_container_cgroup_appears_settles_and_goes_in_order() {
        let h = Host::new();
        let mut r = h.registry();
        assert!(r.take_changes().is_empty(), "nothing runs yet");
        let path = format!("/docker/{HEX}");
        let id = h.mkdir(&path);
        std::fs::write(h.cg_root().join(&path[1..]).join("cgroup.procs"), "100\n").unwrap();
        h.process(100, "sh", b"KERNEL_MODULES=ip_vs\0");
        r.cgroup_created(id, &path);
        assert_eq!(
            r.take_changes(),
            vec![
                Change::Appeared {
                    key: HEX.into(),
                    cgroup_id: id
                },
                Change::Settled { key: HEX.into() }
            ]
        );
        let t = r.container(HEX).unwrap();
        assert_eq!(t.declared_modules(), ["ip_vs".to_string()]);
        assert_eq!(r.running().len(), 1);
        // Events from it are attributed without a new Appeared.
        let a = r.attribute(id, 100, None);
        assert_eq!(a.key.as_deref(), Some(HEX));
        assert_eq!(a.cgroup_path.as_deref(), Some(path.as_str()));
        assert!(r.take_changes().is_empty());
        r.cgroup_removed(id, &path);
        assert_eq!(
            r.take_changes(),
            vec![Change::Gone {
                key: HEX.into(),
                cgroup_id: id
            }]
        );
        assert!(r.running().is_empty());
        // Still named after it is gone.
        assert_eq!(r.attribute(id, 100, None).key.as_deref(), Some(HEX));
    }

    #[test]
    fn a_host_cgroup_is_no_container_and_changes_nothing() {
        let h = Host::new();
        let mut r = h.registry();
        let id = h.mkdir("/system.slice/cron.service");
        r.cgroup_created(id, "/system.slice/cron.service");
        let a = r.attribute(id, 1, None);
        assert_eq!(a.key, None);
        assert_eq!(a.cgroup_path.as_deref(), Some("/system.slice/cron.service"));
        assert!(r.take_changes().is_empty());
    }

    /// A containerd CRI container whose pod annotation declares modules: the registry (and so
    /// the enricher, `check`, `policy show` and the enforcer's `trust_kernel_modules`) sees
    /// the annotation, not the image's KERNEL_MODULES.
    #[test]
    fn a_pod_annotation_declares_for_everyone_who_reads_the_registry() {
        let h = Host::new();
        let path = format!("/kubepods/besteffort/pod0f1a2b3c-4d5e-6789-abcd-ef0123456789/{HEX}");
        let id = h.mkdir(&path);
        let bundle =
            h.0.path()
                .join("run/containerd/io.containerd.runtime.v2.task/k8s.io")
                .join(HEX);
        std::fs::create_dir_all(&bundle).unwrap();
        let config = serde_json::json!({
            "process": {"env": ["KERNEL_MODULES=dummy"]},
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.container-name": "lb",
                "kmodmon.io/kernel-modules": "ip_vs,ip_vs_wrr"
            },
            "linux": {"cgroupsPath": path}
        });
        std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
        let mut r = h.registry();
        r.cgroup_created(id, &path);
        let t = r.container(HEX).unwrap();
        assert_eq!(t.declared_modules(), ["ip_vs", "ip_vs_wrr"]);
        let DeclState::Known(d) = &t.state else {
            panic!("{:?}", t.state)
        };
        assert_eq!(d.what(), "annotation kmodmon.io/kernel-modules");
        assert_eq!(d.overridden[0].modules, ["dummy"]);

        let policy = crate::policy::Policy::parse(
            "mode = \"enforce\"\n[unselected]\nrestrict = true\ntrust_kernel_modules = true\n",
            "policy.toml",
        )
        .unwrap();
        let labels = t.labels();
        let eff = policy.decide(&crate::policy::Subject {
            container: &t.container,
            labels: &labels,
            declared: t.declared_modules(),
        });
        assert!(eff.allowed.contains("ip_vs_wrr") && !eff.allowed.contains("dummy"));

        let inputs = crate::check::containers::from_registry(&r);
        assert_eq!(inputs.list[0].modules, ["ip_vs", "ip_vs_wrr"]);
        assert_eq!(
            inputs.list[0].declared_in.as_deref(),
            Some("annotation kmodmon.io/kernel-modules")
        );
        assert!(
            inputs
                .warnings
                .iter()
                .any(|w| w.message.contains("KERNEL_MODULES (") && w.message.contains("says dummy")),
            "{:?}",
            inputs.warnings
        );
    }

    #[test]
    fn an_unreadable_declaration_settles_as_failed_on_give_up() {
        let h = Host::new();
        let mut r = h.registry();
        let path = format!("/isulad/{HEX}");
        let id = h.mkdir(&path);
        // The cgroup exists but has no process yet: pending.
        std::fs::write(h.cg_root().join(&path[1..]).join("cgroup.procs"), "").unwrap();
        r.cgroup_created(id, &path);
        assert!(r.is_pending(HEX));
        assert!(r.next_wakeup().is_some());
        r.take_changes();
        r.settle(Instant::now() + Duration::from_millis(50));
        assert_eq!(r.take_changes(), vec![Change::Settled { key: HEX.into() }]);
        assert!(matches!(
            r.container(HEX).unwrap().state,
            DeclState::Failed(_)
        ));
    }
}
