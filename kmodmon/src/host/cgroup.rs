//! cgroup2 id → path. Filled by a walk of the cgroup2 tree at start, kept current from the
//! kernel's own cgroup_mkdir / cgroup_rmdir records, and re-walked (rate-limited) on a miss.
//! Removed cgroups are evicted late, so an event from a container that lived 100 ms and whose
//! cgroup is already gone still gets its path.
use std::{
    collections::HashMap,
    os::unix::ffi::OsStrExt as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::escape::escape_bytes;

/// How long a removed cgroup's path stays known.
pub const REMOVED_TTL: Duration = Duration::from_secs(600);
/// Never re-walk the tree more often than this, nor more often than ten times the last walk's
/// duration (a walk of 10,000 cgroups takes ~400 ms: misses must not eat the enricher).
pub const RESCAN_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
struct Entry {
    path: String,
    removed_at: Option<Instant>,
}

/// Names the host's cgroup2 hierarchy when kmodmon runs in a container with a cgroup namespace
/// of its own (a Kubernetes DaemonSet): a bind mount of the host's /sys/fs/cgroup, e.g.
/// `/host/sys/fs/cgroup`. The container's own /sys/fs/cgroup shows only its own subtree.
pub const CGROUP_ROOT_ENV: &str = "KMODMON_CGROUP_ROOT";

/// The cgroup2 root given in [`CGROUP_ROOT_ENV`], if set and not empty.
pub fn cgroup_root_override() -> Option<PathBuf> {
    std::env::var_os(CGROUP_ROOT_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The inode number of the initial cgroup namespace (the kernel's fixed PROC_CGROUP_INIT_INO).
const INIT_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;

/// Whether kmodmon runs in a cgroup namespace other than the initial one: its cgroup2 mount
/// then shows a subtree, not the host's tree.
pub fn in_cgroup_namespace() -> bool {
    std::fs::metadata("/proc/self/ns/cgroup").is_ok_and(|m| m.ino() != INIT_CGROUP_NS_INO)
}

/// Where the host's cgroup2 hierarchy is: [`CGROUP_ROOT_ENV`] when set, else the first cgroup2
/// mount in /proc/self/mounts (pure v2: /sys/fs/cgroup; hybrid: usually
/// /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Option<PathBuf> {
    if let Some(root) = cgroup_root_override() {
        return Some(root);
    }
    crate::mounts::first_of_type("cgroup2")
}

/// [`cgroup2_mount`], with a warning that says what to do when kmodmon runs in a cgroup
/// namespace of its own without [`CGROUP_ROOT_ENV`]: it would see only its own subtree.
pub fn host_cgroup_root() -> Option<PathBuf> {
    if cgroup_root_override().is_none() && in_cgroup_namespace() {
        log::warn!(
            "kmodmon runs in a cgroup namespace of its own: its cgroup2 mount shows only its \
             own subtree, so events cannot be tied to containers that started before it. \
             Bind-mount the host's /sys/fs/cgroup (e.g. at /host/sys/fs/cgroup) and set \
             {CGROUP_ROOT_ENV}=/host/sys/fs/cgroup"
        );
    }
    cgroup2_mount()
}

/// The id → path map.
#[derive(Debug)]
pub struct CgroupCache {
    root: Option<PathBuf>,
    entries: HashMap<u64, Entry>,
    last_scan: Option<Instant>,
    /// How long the last walk took.
    last_scan_cost: Duration,
    /// Lookups that found nothing even after a re-walk.
    pub misses: u64,
    /// Re-walks of the tree.
    pub rescans: u64,
}

impl CgroupCache {
    /// A cache over the host's cgroup2 hierarchy (empty when there is none).
    pub fn new() -> CgroupCache {
        Self::with_root(host_cgroup_root())
    }

    pub fn with_root(root: Option<PathBuf>) -> CgroupCache {
        let mut c = CgroupCache {
            root,
            entries: HashMap::new(),
            last_scan: None,
            last_scan_cost: Duration::ZERO,
            misses: 0,
            rescans: 0,
        };
        c.scan();
        c
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The kernel created a cgroup.
    pub fn created(&mut self, id: u64, path: &str) {
        self.entries.insert(
            id,
            Entry {
                path: path.to_string(),
                removed_at: None,
            },
        );
    }

    /// The kernel removed a cgroup: keep its path for a while.
    pub fn removed(&mut self, id: u64, path: &str) {
        let now = Instant::now();
        self.entries
            .entry(id)
            .and_modify(|e| e.removed_at = Some(now))
            .or_insert(Entry {
                path: path.to_string(),
                removed_at: Some(now),
            });
        self.evict(now);
    }

    fn evict(&mut self, now: Instant) {
        self.entries.retain(|_, e| {
            e.removed_at
                .is_none_or(|t| now.duration_since(t) < REMOVED_TTL)
        });
    }

    /// Path of cgroup `id`, walking the tree again (at most every RESCAN_INTERVAL) on a miss.
    pub fn lookup(&mut self, id: u64) -> Option<String> {
        if let Some(e) = self.entries.get(&id) {
            return Some(e.path.clone());
        }
        let interval = RESCAN_INTERVAL.max(self.last_scan_cost * 10);
        let due = self.last_scan.is_none_or(|t| t.elapsed() >= interval);
        if due {
            self.scan();
            if let Some(e) = self.entries.get(&id) {
                return Some(e.path.clone());
            }
        }
        self.misses += 1;
        None
    }

    /// Cached path only, no I/O.
    pub fn get(&self, id: u64) -> Option<&str> {
        self.entries.get(&id).map(|e| e.path.as_str())
    }

    /// Walks the whole cgroup2 tree: on cgroup2 a directory's inode number is its cgroup id.
    pub fn scan(&mut self) {
        let started = Instant::now();
        self.walk();
        self.last_scan = Some(Instant::now());
        self.last_scan_cost = started.elapsed();
    }

    fn walk(&mut self) {
        let Some(root) = self.root.clone() else {
            return;
        };
        self.rescans += 1;
        let mut stack = vec![(root.clone(), String::from("/"))];
        while let Some((dir, rel)) = stack.pop() {
            if let Ok(meta) = std::fs::metadata(&dir) {
                self.entries.entry(meta.ino()).or_insert(Entry {
                    path: rel.clone(),
                    removed_at: None,
                });
            }
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in rd.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    // Escaped like the kernel's mkdir records: a cgroup name is chosen by
                    // whoever may create cgroups (delegated subtrees, containers).
                    let name = escape_bytes(entry.file_name().as_bytes());
                    let child_rel = if rel == "/" {
                        format!("/{name}")
                    } else {
                        format!("{rel}/{name}")
                    };
                    stack.push((entry.path(), child_rel));
                }
            }
        }
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }
}

impl Default for CgroupCache {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_maps_inodes_to_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let c1 = dir.path().join("docker/abc");
        std::fs::create_dir_all(&c1).unwrap();
        let ino = std::fs::metadata(&c1).unwrap().ino();
        let root_ino = std::fs::metadata(dir.path()).unwrap().ino();
        let mut cache = CgroupCache::with_root(Some(dir.path().to_path_buf()));
        assert_eq!(cache.lookup(ino).as_deref(), Some("/docker/abc"));
        assert_eq!(cache.lookup(root_ino).as_deref(), Some("/"));
    }

    #[test]
    fn hostile_cgroup_names_are_escaped_as_in_kernel_records() {
        let dir = tempfile::tempdir().unwrap();
        let evil = dir.path().join("x\x1b[31m\u{202e}y");
        std::fs::create_dir_all(&evil).unwrap();
        let ino = std::fs::metadata(&evil).unwrap().ino();
        let mut cache = CgroupCache::with_root(Some(dir.path().to_path_buf()));
        let path = cache.lookup(ino).unwrap();
        assert_eq!(path, "/x\\x1b[31m\\u{202e}y");
        assert!(!path.chars().any(|c| c.is_control()));
    }

    #[test]
    fn removed_cgroups_are_remembered() {
        let mut cache = CgroupCache::with_root(None);
        cache.created(77, "/docker/short");
        cache.removed(77, "/docker/short");
        assert_eq!(cache.lookup(77).as_deref(), Some("/docker/short"));
        // rmdir seen without mkdir (created before we started) still names it
        cache.removed(78, "/kubepods/x");
        assert_eq!(cache.get(78), Some("/kubepods/x"));
    }

    #[test]
    fn miss_is_counted_and_rescan_is_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = CgroupCache::with_root(Some(dir.path().to_path_buf()));
        let scans = cache.rescans;
        assert_eq!(cache.lookup(123_456_789), None);
        assert_eq!(cache.lookup(123_456_789), None);
        assert_eq!(cache.misses, 2);
        // The constructor's scan was just now: no further walk within the interval.
        assert_eq!(cache.rescans, scans);
        // A cgroup created after the first walk is found after the interval.
        let new = dir.path().join("late");
        std::fs::create_dir(&new).unwrap();
        let ino = std::fs::metadata(&new).unwrap().ino();
        std::thread::sleep(RESCAN_INTERVAL);
        assert_eq!(cache.lookup(ino).as_deref(), Some("/late"));
    }
}
