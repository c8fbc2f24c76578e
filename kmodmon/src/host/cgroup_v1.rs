//! cgroup v1 ("legacy") hierarchies: which one kmodmon follows, and why.
//!
//! On a v1-only host every task sits in the cgroup2 root (or cgroup2 is not mounted at all),
//! so only a v1 hierarchy tells containers apart; on a hybrid host (v1 controllers, cgroup2 at
//! `/sys/fs/cgroup/unified`) most runtimes place containers in both, but a runtime that uses
//! only the v1 controllers leaves them in their parent's cgroup2. kmodmon therefore follows
//! one v1 hierarchy wherever one is mounted: the kernel side reads each task's cgroup in it
//! (`task->cgroups->subsys[ssid]`, BTF offsets) and sends its mkdir/rmdir records; the
//! registry maps its ids (directory inode numbers of that hierarchy's mount) to paths, and an
//! event whose cgroup2 names no container is attributed by its v1 cgroup.
//!
//! The hierarchy is that of the first controller of [`PREFERENCE`] that is enabled, bound to a
//! v1 hierarchy (/proc/cgroups) and mounted. A named hierarchy without a controller
//! (`name=systemd`) cannot be followed: a BPF program reaches a task's v1 cgroups only
//! through its controllers' css. `KMODMON_CGROUP_V1=CONTROLLER` picks another controller,
//! `KMODMON_CGROUP_V1=off` none.
use std::path::{Path, PathBuf};

use procfs::{FromBufRead as _, MountEntry};

/// Controllers in the order they are preferred: memory and pids are in every runtime's
/// cgroup set, cpu/cpuacct next.
pub const PREFERENCE: [&str; 14] = [
    "memory",
    "pids",
    "cpu",
    "cpuacct",
    "devices",
    "blkio",
    "freezer",
    "cpuset",
    "net_cls",
    "net_prio",
    "perf_event",
    "hugetlb",
    "rdma",
    "misc",
];

/// Chooses the controller instead of [`PREFERENCE`], or `off`.
pub const CGROUP_V1_ENV: &str = "KMODMON_CGROUP_V1";

/// How this host lays out its cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupLayout {
    /// cgroup2 only.
    Unified,
    /// cgroup v1 controllers and a cgroup2 hierarchy.
    Hybrid,
    /// cgroup v1 only: no cgroup2 hierarchy is mounted, every task is in its root.
    Legacy,
}

impl CgroupLayout {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupLayout::Unified => "unified (cgroup2 only)",
            CgroupLayout::Hybrid => "hybrid (cgroup v1 controllers and cgroup2)",
            CgroupLayout::Legacy => "legacy (cgroup v1 only)",
        }
    }
}

/// The v1 hierarchy kmodmon follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V1Hierarchy {
    /// The controller whose css the kernel side reads (`memory`).
    pub controller: String,
    /// Its hierarchy id (/proc/cgroups; the cgroup tracepoints' `root`).
    pub hierarchy_id: u32,
    /// Where it is mounted (its root directory: ids are inode numbers below it).
    pub mount: PathBuf,
    /// The cgroup2 mount, when there is one (hybrid).
    pub cgroup2: Option<PathBuf>,
}

impl V1Hierarchy {
    pub fn layout(&self) -> CgroupLayout {
        if self.cgroup2.is_some() {
            CgroupLayout::Hybrid
        } else {
            CgroupLayout::Legacy
        }
    }

    /// Why it is followed, for `kmodmon sources`.
    pub fn why(&self) -> String {
        let scope = match &self.cgroup2 {
            None => "no cgroup2 hierarchy is mounted, so every task is in the cgroup2 root and \
                     only cgroup v1 tells containers apart"
                .to_string(),
            Some(v2) => format!(
                "hybrid host (cgroup2 at {}): an event whose cgroup2 names no container is \
                 attributed by its cgroup here",
                v2.display()
            ),
        };
        format!(
            "{scope}; {} is the first of {} bound to a mounted v1 hierarchy (a named hierarchy \
             such as name=systemd has no controller a BPF program can read; {CGROUP_V1_ENV} \
             chooses another)",
            self.controller,
            PREFERENCE[..4].join(", ")
        )
    }
}

/// The host's layout and the v1 hierarchy to follow, from /proc/cgroups and /proc/self/mounts.
pub fn detect() -> (CgroupLayout, Option<V1Hierarchy>) {
    let controllers = std::fs::read("/proc/cgroups")
        .ok()
        .and_then(|b| procfs::CGroupControllers::from_buf_read(b.as_slice()).ok())
        .map(|c| c.0)
        .unwrap_or_default();
    let controllers: Vec<(String, u32, bool)> = controllers
        .into_iter()
        .map(|c| (c.name, c.hierarchy, c.enabled))
        .collect();
    let wanted = std::env::var(CGROUP_V1_ENV).ok().filter(|v| !v.is_empty());
    let cgroup2 = super::cgroup::cgroup2_mount();
    choose(
        &controllers,
        &crate::mounts::current(),
        cgroup2,
        wanted.as_deref(),
        super::cgroup::cgroup_root_override().as_deref(),
    )
}

/// [`detect`] without the file reads. `controllers`: (name, hierarchy id, enabled) rows of
/// /proc/cgroups; `wanted`: [`CGROUP_V1_ENV`]; `host_root`: `KMODMON_CGROUP_ROOT`, whose
/// directory (or its parent, for `…/unified`) is where the host's v1 mounts are looked for
/// first.
pub fn choose(
    controllers: &[(String, u32, bool)],
    mounts: &[MountEntry],
    cgroup2: Option<PathBuf>,
    wanted: Option<&str>,
    host_root: Option<&Path>,
) -> (CgroupLayout, Option<V1Hierarchy>) {
    let v1_mounts: Vec<(PathBuf, &MountEntry)> = mounts
        .iter()
        .filter(|m| m.fs_vfstype == "cgroup")
        .map(|m| (crate::mounts::mount_point(m), m))
        .collect();
    let layout = match (&cgroup2, v1_mounts.is_empty()) {
        (_, true) => CgroupLayout::Unified,
        (Some(_), false) => CgroupLayout::Hybrid,
        (None, false) => CgroupLayout::Legacy,
    };
    if wanted == Some("off") {
        return (layout, None);
    }
    let candidates: Vec<&str> = match wanted {
        Some(w) => vec![w],
        None => PREFERENCE.to_vec(),
    };
    let prefer: Vec<PathBuf> = host_root
        .map(|r| {
            let mut v = vec![r.to_path_buf()];
            v.extend(r.parent().map(Path::to_path_buf));
            v
        })
        .unwrap_or_default();
    for name in candidates {
        let Some(&(_, hierarchy, _)) = controllers
            .iter()
            .find(|(n, h, enabled)| n == name && *h != 0 && *enabled)
        else {
            continue;
        };
        let mut found: Vec<&PathBuf> = v1_mounts
            .iter()
            .filter(|(_, m)| m.fs_mntops.contains_key(name))
            .map(|(p, _)| p)
            .collect();
        // Inside a pod the host's tree is bind-mounted under KMODMON_CGROUP_ROOT's directory.
        found.sort_by_key(|p| !prefer.iter().any(|r| p.starts_with(r)));
        if let Some(mount) = found.first() {
            return (
                layout,
                Some(V1Hierarchy {
                    controller: name.to_string(),
                    hierarchy_id: hierarchy,
                    mount: (*mount).clone(),
                    cgroup2,
                }),
            );
        }
    }
    (layout, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts(text: &str) -> Vec<MountEntry> {
        Vec::<MountEntry>::from_buf_read(text.as_bytes()).unwrap()
    }

    fn rows(list: &[(&str, u32)]) -> Vec<(String, u32, bool)> {
        list.iter()
            .map(|(n, h)| (n.to_string(), *h, true))
            .collect()
    }

    /// This project's build machine, as /proc/cgroups and /proc/self/mounts show it.
    const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn hybrid_follows_memory() {
        let c = rows(&[("cpu", 1), ("memory", 4), ("pids", 8), ("hugetlb", 0)]);
        let (layout, h) = choose(
            &c,
            &mounts(HYBRID),
            Some("/sys/fs/cgroup/unified".into()),
            None,
            None,
        );
        assert_eq!(layout, CgroupLayout::Hybrid);
        let h = h.unwrap();
        assert_eq!(
            (h.controller.as_str(), h.hierarchy_id, h.mount.as_path()),
            ("memory", 4, Path::new("/sys/fs/cgroup/memory"))
        );
        assert!(h.why().contains("hybrid host"), "{}", h.why());
        // Chosen by hand; a controller bound to cgroup2 (hierarchy 0) cannot be chosen.
        let (_, h) = choose(&c, &mounts(HYBRID), None, Some("pids"), None);
        assert_eq!(h.unwrap().hierarchy_id, 8);
        assert!(
            choose(&c, &mounts(HYBRID), None, Some("hugetlb"), None)
                .1
                .is_none()
        );
        assert!(
            choose(&c, &mounts(HYBRID), None, Some("off"), None)
                .1
                .is_none()
        );
    }

    #[test]
    fn legacy_and_unified_layouts() {
        let c = rows(&[("memory", 2), ("pids", 3)]);
        let legacy = "\
tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
";
        let (layout, h) = choose(&c, &mounts(legacy), None, None, None);
        assert_eq!(layout, CgroupLayout::Legacy);
        let h = h.unwrap();
        assert_eq!(
            (h.controller.as_str(), h.layout()),
            ("memory", CgroupLayout::Legacy)
        );
        assert!(h.why().contains("no cgroup2"), "{}", h.why());
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        let c0 = rows(&[("memory", 0), ("pids", 0)]);
        let (layout, h) = choose(
            &c0,
            &mounts(unified),
            Some("/sys/fs/cgroup".into()),
            None,
            None,
        );
        assert_eq!((layout, h), (CgroupLayout::Unified, None));
        // Only a named hierarchy: nothing a BPF program can follow.
        let named = "cgroup /sys/fs/cgroup/systemd cgroup rw,name=systemd 0 0\n";
        let (layout, h) = choose(&c0, &mounts(named), None, None, None);
        assert_eq!((layout, h), (CgroupLayout::Legacy, None));
    }

    #[test]
    fn a_pod_prefers_the_host_tree() {
        let c = rows(&[("memory", 4)]);
        let m = "\
cgroup /sys/fs/cgroup/memory cgroup ro,memory 0 0
cgroup /host/sys/fs/cgroup/memory cgroup ro,memory 0 0
cgroup2 /host/sys/fs/cgroup/unified cgroup2 ro 0 0
";
        let root = Path::new("/host/sys/fs/cgroup/unified");
        let (_, h) = choose(&c, &mounts(m), Some(root.into()), None, Some(root));
        assert_eq!(h.unwrap().mount, Path::new("/host/sys/fs/cgroup/memory"));
    }
}
