//! cgroup id → path → container, with the runtime's state on disk filling what the path
//! cannot say (name, pod, plain runc's `/NAME` cgroups, runc containers whose cgroupsPath
//! mimics another runtime).
//!
//! Runs on the enricher task, never on the ring-buffer reader. Cost control:
//! - results are cached per cgroup id until the cgroup changes or the enricher invalidates
//!   them (it does, while a container is young and its runtime state may still appear); a
//!   cgroup that is not a container is looked at again at most every [`RECHECK`] (plain runc's
//!   `/NAME` is only recognisable once runc has written its state);
//! - the targeted state lookup ([`runtime_state::lookup_cgroup`]) reads a handful of files;
//! - the full state index rescan ([`StateIndex::scan`]) runs at most every
//!   `max(MIN_RESCAN, 10 × last scan's duration)`, so it never takes more than about a tenth of
//!   the enricher's time however many containers there are.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cgroup::CgroupCache;
use super::container::{self, parse_cgroup_path};
use super::runtime_state::{self, ContainerMeta, StateConfig, StateIndex, StateKind};
use crate::event::Container;

/// How soon a cgroup that resolved to no container may be looked up again.
pub const RECHECK: Duration = Duration::from_secs(1);
/// Shortest interval between two full state rescans.
pub const MIN_RESCAN: Duration = Duration::from_millis(2);
/// Most IDs remembered as "not the container looked for" between rescans.
const MAX_NOT_IT: usize = 4096;
/// Most cgroups cached (beyond it the cache is cleared; it refills on demand).
pub const MAX_CACHED: usize = 65_536;

/// What one cgroup resolved to.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    pub path: Option<String>,
    pub container: Option<Container>,
    /// The runtime's state for that container, when found.
    pub meta: Option<Arc<ContainerMeta>>,
}

impl Resolved {
    /// The key expectations are kept under: the container's ID.
    pub fn key(&self) -> Option<&str> {
        self.container.as_ref().map(|c| c.id.as_str())
    }
}

#[derive(Debug)]
struct Cached {
    resolved: Resolved,
    at: Instant,
}

/// The cache and the state index.
#[derive(Debug)]
pub struct Attribution {
    cfg: StateConfig,
    index: StateIndex,
    last_scan: Option<Instant>,
    scan_cost: Duration,
    cache: HashMap<u64, Cached>,
    /// State IDs read since the last rescan that belonged to no cgroup looked for.
    not_it: HashSet<String>,
    /// Full state rescans done.
    pub scans: u64,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// State files the last rescan could not read or parse.
    pub problems: Vec<String>,
}

impl Attribution {
    /// Reads the state index once (startup).
    pub fn new(cfg: StateConfig) -> Attribution {
        let mut a = Attribution {
            cfg,
            index: StateIndex::default(),
            last_scan: None,
            scan_cost: Duration::ZERO,
            cache: HashMap::new(),
            not_it: HashSet::new(),
            scans: 0,
            hits: 0,
            problems: Vec::new(),
        };
        a.rescan();
        a
    }

    pub fn config(&self) -> &StateConfig {
        &self.cfg
    }

    pub fn index(&self) -> &StateIndex {
        &self.index
    }

    /// Forgets what cgroup `id` resolved to (it was created or removed).
    pub fn invalidate(&mut self, id: u64) {
        self.cache.remove(&id);
    }

    /// Rescans the state roots now.
    pub fn rescan(&mut self) {
        let started = Instant::now();
        self.index = StateIndex::scan(&self.cfg);
        self.not_it.clear();
        self.problems = self
            .index
            .problems
            .drain(..)
            .map(|p| p.to_string())
            .collect();
        for p in &self.problems {
            log::debug!("runtime state: {p}");
        }
        self.scan_cost = started.elapsed();
        log::debug!(
            "runtime state rescan: {} containers in {:?}",
            self.index.len(),
            self.scan_cost
        );
        self.last_scan = Some(Instant::now());
        self.scans += 1;
    }

    fn rescan_if_due(&mut self) -> bool {
        let interval = MIN_RESCAN.max(self.scan_cost * 10);
        if self.last_scan.is_none_or(|t| t.elapsed() >= interval) {
            self.rescan();
            true
        } else {
            false
        }
    }

    /// Cached answer only, no I/O.
    pub fn cached(&self, id: u64) -> Option<&Resolved> {
        self.cache.get(&id).map(|c| &c.resolved)
    }

    /// Resolves cgroup `id` (cache first; cgroupfs and runtime state on a miss).
    pub fn resolve(&mut self, cgroups: &mut CgroupCache, id: u64) -> Resolved {
        if let Some(c) = self.cache.get(&id)
            && (c.resolved.container.is_some() || c.at.elapsed() < RECHECK)
        {
            self.hits += 1;
            return c.resolved.clone();
        }
        let path = cgroups.lookup(id);
        let resolved = match &path {
            Some(p) => self.resolve_path(p),
            None => Resolved::default(),
        };
        if path.is_some() {
            if self.cache.len() >= MAX_CACHED {
                self.cache.clear();
            }
            self.cache.insert(
                id,
                Cached {
                    resolved: resolved.clone(),
                    at: Instant::now(),
                },
            );
        }
        resolved
    }

    /// Path → container, with runtime state (no caching).
    pub fn resolve_path(&mut self, path: &str) -> Resolved {
        // A name-keyed container (LXC, nspawn) counts only when its runtime's state confirms
        // it: the cgroup's name alone is whatever its creator chose.
        let parsed = parse_cgroup_path(path).filter(|c| {
            let ok = self.cfg.named.confirms(&c.runtime, &c.id);
            if !ok {
                log::debug!(
                    "cgroup {path} looks like {} container {:?}, but no runtime state confirms it",
                    c.runtime,
                    c.id
                );
            }
            ok
        });
        let meta = self.find_meta(path, parsed.as_ref()).map(Arc::new);
        let container = match (parsed, &meta) {
            (Some(mut c), Some(m)) => {
                complete(&mut c, m);
                Some(c)
            }
            (Some(c), None) => Some(c),
            (None, Some(m)) => Some(m.to_container()),
            (None, None) => None,
        };
        Resolved {
            path: Some(path.to_string()),
            container,
            meta,
        }
    }

    fn find_meta(&mut self, path: &str, parsed: Option<&Container>) -> Option<ContainerMeta> {
        let lookup = runtime_state::lookup_cgroup(&self.cfg, path);
        for p in lookup.problems {
            log::debug!("runtime state: {p}");
        }
        if lookup.meta.is_some() {
            return lookup.meta;
        }
        let from_index = |index: &StateIndex| {
            index
                .by_cgroup_path(path)
                .or_else(|| parsed.and_then(|c| index.by_id(&c.id)))
                .cloned()
        };
        if let Some(m) = from_index(&self.index) {
            return Some(m);
        }
        if let Some(m) = self.lookup_new_ids(path) {
            return Some(m);
        }
        if self.rescan_if_due() {
            return from_index(&self.index);
        }
        None
    }

    /// The cheap part of a rescan: list the state roots' container directories and read only
    /// the IDs the index has not seen (usually none or one), looking for the container whose
    /// recorded cgroup holds `path` (a runc container whose cgroupsPath mimics another
    /// runtime, right after it started).
    fn lookup_new_ids(&mut self, path: &str) -> Option<ContainerMeta> {
        let mut ids = Vec::new();
        for root in &self.cfg.roots {
            if !matches!(
                root.kind,
                StateKind::Runc | StateKind::Crun | StateKind::Bundle | StateKind::Isulad
            ) {
                continue;
            }
            let parents: Vec<PathBuf> = if root.namespaced {
                subdirs(&root.dir)
            } else {
                vec![root.dir.clone()]
            };
            for parent in parents {
                for dir in subdirs(&parent) {
                    if let Some(id) = dir.file_name().and_then(|n| n.to_str())
                        && self.index.by_id(id).is_none()
                        && !self.not_it.contains(id)
                        && !ids.iter().any(|i| i == id)
                    {
                        ids.push(id.to_string());
                    }
                }
            }
        }
        for id in ids {
            let Some(m) = runtime_state::lookup(&self.cfg, &id).meta else {
                continue; // Still being created (no state file yet): look again next time.
            };
            if !m.running {
                continue;
            }
            let holds = m.cgroup_path.as_deref().is_some_and(|cg| {
                path.strip_prefix(cg.trim_end_matches('/'))
                    .is_some_and(|r| r.is_empty() || r.starts_with('/'))
            });
            if holds {
                return Some(m);
            }
            if self.not_it.len() < MAX_NOT_IT {
                // A running container with another cgroup: skip it until the next rescan.
                self.not_it.insert(id);
            }
        }
        None
    }
}

/// Subdirectories of `dir` (none when it does not exist or cannot be read).
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Completes a path-parsed container with runtime metadata. The path's runtime is kept when
/// the state only names a low-level runtime shared by every engine (`cri` for a k8s pod says
/// more than the `runc` that ran it).
pub fn complete(c: &mut Container, meta: &ContainerMeta) {
    let keep = (c.runtime == container::CRI)
        && matches!(meta.runtime.as_str(), container::RUNC | container::CRUN);
    let runtime = c.runtime.clone();
    meta.apply_to(c);
    if keep {
        c.runtime = runtime;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;
    use std::path::Path;

    const HEX: &str = "4f1c2a9be0d8c7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2";

    /// A runc state dir for `name` with cgroup `cg` and a live init pid (this process).
    fn runc_state(root: &Path, name: &str, cg: &str, env: &[&str]) {
        if !root.join("proc").exists() {
            std::os::unix::fs::symlink("/proc", root.join("proc")).unwrap();
        }
        let bundle = root.join("bundles").join(name);
        std::fs::create_dir_all(&bundle).unwrap();
        let cfg = serde_json::json!({"ociVersion": "1.0.2", "process": {"env": env}});
        std::fs::write(bundle.join("config.json"), cfg.to_string()).unwrap();
        let dir = root.join("run/runc").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let state = serde_json::json!({
            "id": name,
            "init_process_pid": std::process::id(),
            "config": {
                "labels": [format!("bundle={}", bundle.display())],
                "cgroups": {"path": cg},
            },
            "cgroup_paths": {"": root.join("sys/fs/cgroup/unified").join(cg.trim_start_matches('/'))},
        });
        std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
    }

    fn cgroup(root: &Path, rel: &str) -> u64 {
        let dir = root
            .join("sys/fs/cgroup/unified")
            .join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::metadata(dir).unwrap().ino()
    }

    #[test]
    fn plain_runc_and_mimicking_cgroups_paths_get_names_from_state() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let plain = cgroup(root, "/e2e-plain");
        let mimic = cgroup(root, &format!("/docker/{HEX}"));
        let host = cgroup(root, "/system.slice/cron.service");
        runc_state(root, "e2e-plain", "/e2e-plain", &["KERNEL_MODULES=ip_vs"]);
        runc_state(root, "e2e-mimic", &format!("/docker/{HEX}"), &[]);
        let cfg = StateConfig::under(root);
        let mut cgroups = CgroupCache::with_root(Some(root.join("sys/fs/cgroup/unified")));
        let mut a = Attribution::new(cfg);
        assert_eq!(a.index().len(), 2, "{:?}", a.index());

        let r = a.resolve(&mut cgroups, plain);
        let c = r
            .container
            .as_ref()
            .expect("plain runc found through its state");
        assert_eq!((c.id.as_str(), c.runtime.as_str()), ("e2e-plain", "runc"));
        assert!(r.meta.is_some());
        assert_eq!(r.key(), Some("e2e-plain"));

        let r = a.resolve(&mut cgroups, mimic);
        let c = r.container.unwrap();
        assert_eq!(c.id, HEX, "the path's ID");
        assert_eq!(c.runtime, "docker", "the path's runtime is not generic");
        assert_eq!(
            c.name.as_deref(),
            Some("e2e-mimic"),
            "the state's ID as name"
        );

        let r = a.resolve(&mut cgroups, host);
        assert_eq!(r.path.as_deref(), Some("/system.slice/cron.service"));
        assert!(r.container.is_none());

        // Cached now: no more reads.
        let hits = a.hits;
        a.resolve(&mut cgroups, plain);
        a.resolve(&mut cgroups, host);
        assert_eq!(a.hits, hits + 2);
    }

    #[test]
    fn a_container_whose_state_appears_late_is_found_on_a_later_miss() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let mimic = cgroup(root, &format!("/isulad/{HEX}"));
        let mut cgroups = CgroupCache::with_root(Some(root.join("sys/fs/cgroup/unified")));
        let mut a = Attribution::new(StateConfig::under(root));
        let r = a.resolve(&mut cgroups, mimic);
        assert_eq!(r.container.as_ref().unwrap().runtime, "isulad");
        assert!(r.meta.is_none());
        runc_state(root, "late", &format!("/isulad/{HEX}"), &[]);
        a.invalidate(mimic);
        std::thread::sleep(MIN_RESCAN);
        let r = a.resolve(&mut cgroups, mimic);
        assert_eq!(r.container.unwrap().name.as_deref(), Some("late"));
    }

    #[test]
    fn lxc_and_nspawn_names_count_only_with_runtime_state() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let lxc = cgroup(root, "/lxc.payload.web");
        let forged = cgroup(root, "/user.slice/user-1000.slice/lxc.payload.evil");
        let machine = cgroup(root, "/machine.slice/machine-box.scope/payload");
        let fake_machine = cgroup(root, "/machine.slice/machine-ghost.scope");
        std::fs::create_dir_all(root.join("var/lib/lxc/web")).unwrap();
        std::fs::write(root.join("var/lib/lxc/web/config"), "lxc.uts.name = web\n").unwrap();
        std::fs::create_dir_all(root.join("run/systemd/machines")).unwrap();
        std::fs::write(root.join("run/systemd/machines/box"), "NAME=box\n").unwrap();
        let mut cgroups = CgroupCache::with_root(Some(root.join("sys/fs/cgroup/unified")));
        let mut a = Attribution::new(StateConfig::under(root));
        let c = a.resolve(&mut cgroups, lxc).container.unwrap();
        assert_eq!((c.runtime.as_str(), c.id.as_str()), ("lxc", "web"));
        assert!(a.resolve(&mut cgroups, forged).container.is_none());
        let c = a.resolve(&mut cgroups, machine).container.unwrap();
        assert_eq!(
            (c.runtime.as_str(), c.id.as_str()),
            ("systemd-nspawn", "box")
        );
        assert!(a.resolve(&mut cgroups, fake_machine).container.is_none());
    }

    #[test]
    fn k8s_cri_runtime_is_kept_over_plain_runc() {
        let mut c = parse_cgroup_path(&format!(
            "/kubepods/burstable/pod0f3c3b1e-5d2a-4c8e-9a6b-2f1d7e9c4b11/{HEX}"
        ))
        .unwrap();
        let meta = ContainerMeta {
            id: "e2e".into(),
            runtime: "runc".into(),
            ..ContainerMeta::default()
        };
        complete(&mut c, &meta);
        assert_eq!(c.runtime, "cri");
        assert_eq!(c.name.as_deref(), Some("e2e"));
        let mut u = parse_cgroup_path(&format!("/weird/{HEX}")).unwrap();
        assert_eq!(u.runtime, "unknown");
        complete(&mut u, &meta);
        assert_eq!(u.runtime, "runc");
    }

    /// Creates 10,000 container-like cgroups (docker and k8s layouts) under `base` and prints
    /// the lookup costs: the initial walk, cold resolution (path parse + runtime-state
    /// lookup), cached lookups, and a miss that re-walks the tree.
    fn bench(label: &str, cgroup_root: &Path, base_rel: &str, state_prefix: &Path) {
        const N: usize = 10_000;
        let base = cgroup_root.join(base_rel);
        let mut ids = Vec::with_capacity(N);
        let mut dirs = Vec::with_capacity(N);
        let started = Instant::now();
        for i in 0..N {
            let rel = if i % 2 == 0 {
                format!("docker/{i:064x}")
            } else {
                format!("kubepods/burstable/pod{i:032x}/{:064x}", i + 1)
            };
            let dir = base.join(&rel);
            std::fs::create_dir_all(&dir).unwrap();
            ids.push(std::fs::metadata(&dir).unwrap().ino());
            dirs.push(dir);
        }
        let created = started.elapsed();
        let cfg = StateConfig::under(state_prefix);
        let started = Instant::now();
        let mut cgroups = CgroupCache::with_root(Some(cgroup_root.to_path_buf()));
        let walk = started.elapsed();
        let mut a = Attribution::new(cfg);
        let started = Instant::now();
        for &id in &ids {
            assert!(a.resolve(&mut cgroups, id).container.is_some());
        }
        let cold = started.elapsed();
        let rounds = 20;
        let started = Instant::now();
        for _ in 0..rounds {
            for &id in &ids {
                std::hint::black_box(a.resolve(&mut cgroups, id));
            }
        }
        let cached = started.elapsed();
        std::thread::sleep(super::super::cgroup::RESCAN_INTERVAL);
        let started = Instant::now();
        assert!(cgroups.lookup(u64::MAX).is_none());
        let miss = started.elapsed();
        println!(
            "bench_cgroup_lookup[{label}]: {N} cgroups (created in {:.0} ms); initial walk \
             {:.1} ms; cold resolve {:.2} µs/cgroup; cached {:.3} µs/lookup; unknown id \
             (re-walk) {:.1} ms",
            created.as_secs_f64() * 1e3,
            walk.as_secs_f64() * 1e3,
            cold.as_secs_f64() * 1e6 / N as f64,
            cached.as_secs_f64() * 1e6 / (N * rounds) as f64,
            miss.as_secs_f64() * 1e3,
        );
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
            if let Some(p) = d.parent() {
                let _ = std::fs::remove_dir(p);
            }
        }
    }

    /// `cargo test -p kmodmon --lib bench_cgroup_lookup -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark: prints figures"]
    fn bench_cgroup_lookup_fake_tree() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("sys/fs/cgroup/unified");
        bench("fake tree on tmpfs/disk", &root, "", t.path());
    }

    /// The same on the real cgroup2 hierarchy (root only): 10,000 real cgroups.
    #[test]
    #[ignore = "benchmark: prints figures; needs root"]
    fn bench_cgroup_lookup_real_cgroup2() {
        let Some(mount) = crate::host::cgroup::cgroup2_mount() else {
            println!("no cgroup2 mount: skipped");
            return;
        };
        if !nix::unistd::geteuid().is_root() {
            println!("needs root: skipped");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let rel = format!("kmodmon-bench-{}", std::process::id());
        bench("real cgroup2", &mount, &rel, t.path());
        let _ = std::fs::remove_dir(mount.join(&rel).join("docker"));
        let _ = std::fs::remove_dir(mount.join(&rel).join("kubepods/burstable"));
        let _ = std::fs::remove_dir(mount.join(&rel).join("kubepods"));
        let _ = std::fs::remove_dir(mount.join(&rel));
    }
}
