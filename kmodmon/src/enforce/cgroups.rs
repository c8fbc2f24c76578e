//! The enforcer's view of cgroups: which id a container's policy entry is keyed by, the ids of
//! container parents' parents, and the names that mark containers in the kernel before kmodmon
//! maps them.
//!
//! cgroup2 only: ids are the inode numbers of the cgroup2 tree's directories (= the kernfs ids
//! the LSM programs read). This module is the one place a cgroup v1 variant slots in, together
//! with `task_cgroup` in kmodmon-ebpf `lsm/walk.rs`: [`CgroupView::key_of`] (the container's
//! id in the chosen v1 hierarchy instead) and [`CgroupView::id_of_path`] (paths in that
//! hierarchy's mount).
use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use kmodmon_common::policy::{PARENT_NAME_LEN, PREFIX_ID64, PREFIX_NAMED, PrefixRule};

use super::{ContainerInfo, state::ParentKeyOrd};
use crate::host::{Registry, tracking::Tracked};

/// Top-level cgroups that hold only containers: a cgroup below one of them that kmodmon has
/// not mapped gets `[unselected]` in the kernel, from the moment it exists. `machine.slice` is
/// not one: it also holds virtual machines (their qemu processes are no containers, and may
/// need modules); its containers are recognised by name ([`PREFIX_RULES`]).
pub const BUILTIN_PARENTS: [&str; 7] = [
    "docker",
    "kubepods",
    "kubepods.slice",
    "libpod_parent",
    "isulad",
    "lxc",
    "lxc.payload",
];

/// Names that mark a container cgroup wherever it is (the systemd cgroup driver's scopes,
/// LXC's payload cgroups, nspawn machines): the same naming schemes as
/// `crate::host::container` (a conmon scope is no container: its name has another length).
pub const PREFIX_RULES: [PrefixRule; 8] = [
    PrefixRule::new(b"docker-", PREFIX_ID64, true, b""),
    PrefixRule::new(b"cri-containerd-", PREFIX_ID64, true, b""),
    PrefixRule::new(b"crio-", PREFIX_ID64, true, b""),
    PrefixRule::new(b"libpod-", PREFIX_ID64, true, b""),
    PrefixRule::new(b"isulad-", PREFIX_ID64, true, b""),
    PrefixRule::new(b"nerdctl-", PREFIX_ID64, true, b""),
    PrefixRule::new(b"lxc.payload.", PREFIX_NAMED, false, b""),
    // systemd escapes '-' in unit names as \x2d: libvirt's VMs are machine-qemu\x2d<n>-<name>.
    PrefixRule::new(b"machine-", PREFIX_NAMED, true, b"qemu\\x2d"),
];

/// The cgroup tree as the enforcer keys it.
#[derive(Clone, Debug, Default)]
pub struct CgroupView {
    /// The cgroup2 mount (the registry's).
    root: Option<PathBuf>,
}

/// The cgroup2 root's id.
const ROOT_CGROUP: u64 = 1;

impl CgroupView {
    pub fn of(registry: &Registry) -> CgroupView {
        CgroupView {
            root: registry.cgroup_root().map(Path::to_path_buf),
        }
    }

    /// The id a container's policy entry is keyed by; `None` for a container kmodmon cannot
    /// tell from the host (no cgroup of its own).
    pub fn key_of(t: &Tracked) -> Option<u64> {
        (t.cgroup_id != 0 && t.cgroup_id != ROOT_CGROUP).then_some(t.cgroup_id)
    }

    /// The id of the cgroup at `path` (`/` the root), when it exists.
    pub fn id_of_path(&self, path: &str) -> Option<u64> {
        let root = self.root.as_ref()?;
        let rel = path.trim_start_matches('/');
        let p = if rel.is_empty() {
            root.clone()
        } else {
            root.join(rel)
        };
        std::fs::metadata(p).ok().map(|m| m.ino())
    }

    /// The container-parent keys: the built-in names below the root and the policy's
    /// `container_parents` whose parent cgroup exists now. Also returns the policy's paths
    /// that could not be resolved yet (their parent does not exist).
    pub fn parent_keys(&self, policy_parents: &[String]) -> (BTreeSet<ParentKeyOrd>, Vec<String>) {
        let mut keys = BTreeSet::new();
        let mut unresolved = Vec::new();
        let root = self.id_of_path("/").unwrap_or(ROOT_CGROUP);
        for name in BUILTIN_PARENTS {
            if let Some(k) = key(root, name) {
                keys.insert(k);
            }
        }
        for p in policy_parents {
            let (dir, name) = p.rsplit_once('/').unwrap_or(("", p));
            let parent = if dir.is_empty() {
                Some(root)
            } else {
                self.id_of_path(dir)
            };
            match parent.and_then(|id| key(id, name)) {
                Some(k) => {
                    keys.insert(k);
                }
                None => unresolved.push(p.clone()),
            }
        }
        (keys, unresolved)
    }
}

fn key(parent: u64, name: &str) -> Option<ParentKeyOrd> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= PARENT_NAME_LEN {
        return None;
    }
    let mut k = ParentKeyOrd {
        parent,
        name: [0; PARENT_NAME_LEN],
    };
    k.name[..b.len()].copy_from_slice(b);
    Some(k)
}

/// Whether `inner`'s cgroup lies below `outer`'s (component-wise).
pub fn is_below(inner: &ContainerInfo, outer: &ContainerInfo) -> bool {
    match (&inner.cgroup_path, &outer.cgroup_path) {
        (Some(i), Some(o)) => {
            let o = o.trim_end_matches('/');
            i.len() > o.len() && i.starts_with(o) && i.as_bytes()[o.len()] == b'/'
        }
        _ => false,
    }
}

/// Whether the kernel's name rules restrict a cgroup at `path` that has no entry (a
/// container parent among its ancestors, or a container name on its path): the reference the
/// README's description and `policy show` follow.
pub fn named_container(path: &str, policy_parents: &[String]) -> bool {
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if comps.first().is_some_and(|c| BUILTIN_PARENTS.contains(c)) {
        return true;
    }
    for p in policy_parents {
        let pc: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
        if comps.len() >= pc.len() && comps[..pc.len()] == pc[..] {
            return true;
        }
    }
    comps
        .iter()
        .any(|c| PREFIX_RULES.iter().any(|r| r.matches(c.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    /// The kernel's name rules cover what the registry recognises as containers by path
    /// (crate::host::container), and no host service.
    #[test]
    fn name_rules_cover_the_registrys_container_paths() {
        use crate::host::container::parse_cgroup_path;
        for path in [
            format!("/docker/{HEX}"),
            format!("/system.slice/docker-{HEX}.scope"),
            format!("/kubepods/burstable/pod0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9/{HEX}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6071_8293_a4b5c6d7e8f9.slice/cri-containerd-{HEX}.scope"
            ),
            format!("/libpod_parent/libpod-{HEX}"),
            format!("/machine.slice/libpod-{HEX}.scope"),
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{HEX}.scope"),
            format!("/isulad/{HEX}"),
            format!("/system.slice/crio-{HEX}.scope"),
            "/lxc.payload.web".to_string(),
            "/lxc/web".to_string(),
            "/machine.slice/machine-web.scope".to_string(),
        ] {
            assert!(parse_cgroup_path(&path).is_some(), "the registry: {path}");
            assert!(named_container(&path, &[]), "the kernel's rules: {path}");
        }
        for path in [
            "/system.slice/docker.service",
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-1.scope",
            "/init.scope",
            "/machine.slice/machine-qemu\\x2d1\\x2dvm.scope",
            &format!("/machine.slice/libpod-conmon-{HEX}.scope"),
            "/lxc.monitor.web",
        ] {
            assert!(!named_container(path, &[]), "a host cgroup: {path}");
        }
        assert!(named_container(
            "/ci/runners/job-1",
            &["/ci/runners".to_string()]
        ));
        assert!(!named_container("/ci/other", &["/ci/runners".to_string()]));
    }

    #[test]
    fn parent_keys_resolve_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("ci/runners")).unwrap();
        let view = CgroupView {
            root: Some(dir.path().to_path_buf()),
        };
        let (keys, unresolved) = view.parent_keys(&[
            "/ci/runners".to_string(),
            "/nope/x".to_string(),
            "/top".to_string(),
        ]);
        let ci = view.id_of_path("/ci").unwrap();
        let root = view.id_of_path("/").unwrap();
        assert!(keys.contains(&key(ci, "runners").unwrap()));
        assert!(keys.contains(&key(root, "top").unwrap()));
        assert!(keys.contains(&key(root, "docker").unwrap()));
        assert_eq!(unresolved, vec!["/nope/x".to_string()]);
        assert_eq!(keys.len(), BUILTIN_PARENTS.len() + 2);
    }
}
