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
use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::attribution::{self, Attribution, Resolved};
use super::cgroup::{self, CgroupCache};
use super::container;
use super::moddb::{self, ModDb, RootFs};
use super::runtime_state::StateConfig;
use super::tracking::{DeclState, Expectations, Tracked};
use crate::event::Container;

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
        let mut r = Registry {
            cgroups: CgroupCache::with_root(cgroup_root.clone()),
            attribution: Attribution::new(state),
            tracked: Expectations::new(proc_root, cgroup_root),
            candidates: Vec::new(),
            moddb: moddb.map(Arc::new),
            live_root: RootFs::new(opts.live_root.unwrap_or_else(|| PathBuf::from("/"))),
            changes: VecDeque::new(),
        };
        r.track_running();
        r
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
            let id = self
                .cgroups
                .root()
                .and_then(|r| std::fs::metadata(r.join(path.trim_start_matches('/'))).ok())
                .map_or(0, |m| m.ino());
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
            self.track(&r, id);
        }
    }

    /// Tracks what `r` resolved to, queueing `Appeared` / `Updated` as it learns.
    fn track(&mut self, r: &Resolved, cgroup_id: u64) -> Option<String> {
        let key = r.key()?.to_string();
        let before = self.tracked.get(&key).map(|t| t.meta.is_some());
        self.tracked.track(r, cgroup_id);
        let after = self.tracked.get(&key).is_some_and(|t| t.meta.is_some());
        match before {
            None => self.changes.push_back(Change::Appeared {
                key: key.clone(),
                cgroup_id,
            }),
            Some(false) if after => self.changes.push_back(Change::Updated { key: key.clone() }),
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
            container: r.container,
            key,
        }
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

    /// Whether `key`'s declaration is still being read.
    pub fn is_pending(&self, key: &str) -> bool {
        self.tracked
            .get(key)
            .is_some_and(|t| matches!(t.state, DeclState::Pending { .. }))
    }

    /// If `key`'s declaration is pending and an attempt is due, makes one now.
    pub fn capture_if_due(&mut self, key: &str) {
        if self.tracked.is_due(key, Instant::now()) {
            self.capture(key);
        }
    }

    /// One capture attempt now; queues `Settled` when it settles.
    fn capture(&mut self, key: &str) {
        // Runtime state (the OCI config) may have appeared since the cgroup did.
        if let Some(t) = self.tracked.get(key)
            && t.meta.is_none()
            && t.cgroup_id != 0
        {
            let id = t.cgroup_id;
            self.attribution.invalidate(id);
            let r = self.attribution.resolve(&mut self.cgroups, id);
            if r.meta.is_some() && r.key() == Some(key) {
                self.track(&r, id);
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
