//! Where a module image came from: the file's path (as the loading task saw it), whether that
//! task was in the host's mount namespace, and which package owns the file on the host — read
//! from the dpkg database directly (`/var/lib/dpkg/info/*.list`, `/var/lib/dpkg/status`), never
//! by running a tool per event.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

/// Where an image came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// finit_module: the file's path as the loading task saw it (null for init_module: the
    /// image came from the caller's memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `host` (the loading task shares kmodmon's view of the host's mount namespace: the path
    /// is a host path), `other` (another mount namespace, e.g. a container's root file
    /// system: the path is inside it), or `unknown`.
    pub mount_ns: String,
    /// The mount namespace's inode number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mnt_ns_inode: Option<u32>,
    /// `dpkg` (a package owns the file), `unpackaged` (no package in the host's dpkg
    /// database does), `unknown` (not a host path, no path, or no package database here).
    pub owner: String,
    /// The owning package, `name version` (dpkg).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
}

impl Origin {
    pub fn strings_mut(&mut self, f: &mut dyn FnMut(&mut String)) {
        f(&mut self.mount_ns);
        f(&mut self.owner);
        for s in [&mut self.path, &mut self.package].into_iter().flatten() {
            f(s);
        }
    }

    pub fn strings(&self) -> Vec<&str> {
        let mut v = vec![self.mount_ns.as_str(), self.owner.as_str()];
        v.extend(
            [&self.path, &self.package]
                .into_iter()
                .flatten()
                .map(String::as_str),
        );
        v
    }
}

/// The mount namespace inode of `/proc/PID/ns/mnt` (`mnt:[4026531840]`).
pub fn mnt_ns_of(link: &Path) -> Option<u32> {
    let target = std::fs::read_link(link).ok()?;
    let s = target.to_str()?;
    s.strip_prefix("mnt:[")?.strip_suffix(']')?.parse().ok()
}

/// The host's mount namespace as kmodmon sees it: pid 1's (kmodmon in a pod shares the host's
/// PID namespace), else kmodmon's own.
pub fn host_mnt_ns() -> Option<u32> {
    mnt_ns_of(Path::new("/proc/1/ns/mnt")).or_else(|| mnt_ns_of(Path::new("/proc/self/ns/mnt")))
}

/// The host's dpkg database, indexed on first use and again when it changes.
pub struct Packages {
    root: PathBuf,
    /// path → package
    owners: HashMap<String, String>,
    indexed: Option<(SystemTime, Instant)>,
    versions: HashMap<String, String>,
}

/// How often the database's change time is looked at.
const RECHECK: Duration = Duration::from_secs(10);

impl Packages {
    /// The database under `root` (`/` on a host).
    pub fn new(root: impl Into<PathBuf>) -> Packages {
        Packages {
            root: root.into(),
            owners: HashMap::new(),
            indexed: None,
            versions: HashMap::new(),
        }
    }

    fn info_dir(&self) -> PathBuf {
        self.root.join("var/lib/dpkg/info")
    }

    /// Whether a dpkg database exists here.
    pub fn exists(&self) -> bool {
        self.info_dir().is_dir()
    }

    fn refresh(&mut self) {
        let now = Instant::now();
        if let Some((_, at)) = self.indexed
            && now.duration_since(at) < RECHECK
        {
            return;
        }
        let dir = self.info_dir();
        let mtime = std::fs::metadata(&dir).and_then(|m| m.modified()).ok();
        if let (Some((seen, _)), Some(m)) = (self.indexed, mtime)
            && seen == m
        {
            self.indexed = Some((m, now));
            return;
        }
        let started = Instant::now();
        let mut owners = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pkg) = name.to_str().and_then(|n| n.strip_suffix(".list")) else {
                    continue;
                };
                let pkg = pkg.split(':').next().unwrap_or(pkg).to_string();
                let Ok(text) = std::fs::read_to_string(e.path()) else {
                    continue;
                };
                for line in text
                    .lines()
                    .filter(|l| l.ends_with(".ko") || l.contains(".ko."))
                {
                    owners.insert(line.to_string(), pkg.clone());
                }
            }
        }
        self.versions = read_versions(&self.root.join("var/lib/dpkg/status"));
        log::debug!(
            "dpkg: {} module files of {} packages indexed in {:?}",
            owners.len(),
            self.versions.len(),
            started.elapsed()
        );
        self.owners = owners;
        self.indexed = Some((mtime.unwrap_or(SystemTime::UNIX_EPOCH), now));
    }

    /// The package owning `path` (a host path), as `name version`; tries the merged-/usr
    /// twin (`/usr/lib/modules/...` is `/lib/modules/...` in packages built before the merge).
    pub fn owner(&mut self, path: &str) -> Option<String> {
        self.refresh();
        let twin = match path.strip_prefix("/usr") {
            Some(rest) if rest.starts_with('/') => rest.to_string(),
            _ => format!("/usr{path}"),
        };
        let pkg = self.owners.get(path).or_else(|| self.owners.get(&twin))?;
        Some(match self.versions.get(pkg) {
            Some(v) => format!("{pkg} {v}"),
            None => pkg.clone(),
        })
    }
}

/// Package → version of installed packages in a dpkg status file.
fn read_versions(status: &Path) -> HashMap<String, String> {
    let Ok(text) = std::fs::read_to_string(status) else {
        return HashMap::new();
    };
    let mut out = HashMap::new();
    for stanza in text.split("\n\n") {
        let field = |k: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(':').map(str::trim))
        };
        if let (Some(p), Some(v)) = (field("Package"), field("Version")) {
            out.insert(p.to_string(), v.to_string());
        }
    }
    out
}

/// The origin of an image loaded by a task in mount namespace `mnt_ns` from `path`.
pub fn origin(
    path: Option<&str>,
    mnt_ns: Option<u32>,
    host_ns: Option<u32>,
    packages: &mut Packages,
) -> Origin {
    let mount_ns = match (mnt_ns, host_ns) {
        (Some(a), Some(b)) if a == b => "host",
        (Some(_), Some(_)) => "other",
        _ => "unknown",
    };
    let (owner, package) = match path {
        Some(p) if mount_ns == "host" && packages.exists() => match packages.owner(p) {
            Some(pkg) => ("dpkg", Some(pkg)),
            None => ("unpackaged", None),
        },
        _ => ("unknown", None),
    };
    Origin {
        path: path.map(str::to_string),
        mount_ns: mount_ns.to_string(),
        mnt_ns_inode: mnt_ns,
        owner: owner.to_string(),
        package,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_owner_with_merged_usr_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let info = dir.path().join("var/lib/dpkg/info");
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(
            info.join("linux-image-6.1.0-57-cloud-amd64:amd64.list"),
            "/.\n/lib/modules/6.1.0-57-cloud-amd64/kernel/drivers/net/dummy.ko\n/boot/vmlinuz\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("var/lib/dpkg/status"),
            "Package: linux-image-6.1.0-57-cloud-amd64\nStatus: install ok installed\nVersion: 6.1.192-3\n\nPackage: other\nVersion: 1\n",
        )
        .unwrap();
        let mut p = Packages::new(dir.path());
        let want = Some("linux-image-6.1.0-57-cloud-amd64 6.1.192-3".to_string());
        assert_eq!(
            p.owner("/usr/lib/modules/6.1.0-57-cloud-amd64/kernel/drivers/net/dummy.ko"),
            want
        );
        assert_eq!(
            p.owner("/lib/modules/6.1.0-57-cloud-amd64/kernel/drivers/net/dummy.ko"),
            want
        );
        assert_eq!(p.owner("/tmp/dummy.ko"), None);
        let o = origin(Some("/tmp/dummy.ko"), Some(5), Some(5), &mut p);
        assert_eq!(
            (o.mount_ns.as_str(), o.owner.as_str()),
            ("host", "unpackaged")
        );
        let o = origin(Some("/tmp/dummy.ko"), Some(6), Some(5), &mut p);
        assert_eq!(
            (o.mount_ns.as_str(), o.owner.as_str()),
            ("other", "unknown")
        );
        let o = origin(None, None, Some(5), &mut p);
        assert_eq!(o.mount_ns, "unknown");
    }

    #[test]
    fn own_mount_namespace_is_readable() {
        assert!(mnt_ns_of(Path::new("/proc/self/ns/mnt")).is_some());
    }
}
