//! What is mounted where, as this process sees it: /proc/self/mounts, parsed by the procfs
//! crate (octal escapes such as `\040` undone). The one place kmodmon (and its tests) read it.
use std::path::{Path, PathBuf};

use procfs::MountEntry;

/// The mounts this process sees; empty (and logged) when /proc/self/mounts cannot be read.
pub fn current() -> Vec<MountEntry> {
    match procfs::mounts() {
        Ok(m) => m,
        Err(e) => {
            log::debug!("reading /proc/self/mounts: {e}");
            Vec::new()
        }
    }
}

/// Where the first filesystem of type `fstype` is mounted (e.g. the cgroup2 hierarchy: pure
/// v2 at /sys/fs/cgroup, hybrid usually at /sys/fs/cgroup/unified).
pub fn first_of_type(fstype: &str) -> Option<PathBuf> {
    first_of_type_in(&current(), fstype)
}

/// Whether a filesystem of type `fstype` is mounted at `dir`.
pub fn is_mounted(dir: &Path, fstype: &str) -> bool {
    is_mounted_in(&current(), dir, fstype)
}

/// A mount point as a path. procfs 0.18 undoes the kernel's `\011 \012 \134 \043` escapes but
/// not `\040` (a space): that one is undone here. (Only a mount point with a literal backslash
/// before "040" would come out wrong.)
pub fn mount_point(m: &MountEntry) -> PathBuf {
    PathBuf::from(m.fs_file.replace("\\040", " "))
}

fn first_of_type_in(mounts: &[MountEntry], fstype: &str) -> Option<PathBuf> {
    mounts
        .iter()
        .find(|m| m.fs_vfstype == fstype)
        .map(mount_point)
}

fn is_mounted_in(mounts: &[MountEntry], dir: &Path, fstype: &str) -> bool {
    mounts
        .iter()
        .any(|m| m.fs_vfstype == fstype && mount_point(m) == dir)
}

#[cfg(test)]
mod tests {
    use procfs::FromBufRead as _;

    use super::*;

    const MOUNTS: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified\\040dir\\011x cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /second cgroup2 rw 0 0
bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
";

    #[test]
    fn finds_mounts_by_type_and_place() {
        let m = Vec::<MountEntry>::from_buf_read(MOUNTS.as_bytes()).unwrap();
        assert_eq!(
            first_of_type_in(&m, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified dir\tx"))
        );
        assert_eq!(first_of_type_in(&m, "tracefs"), None);
        assert!(is_mounted_in(&m, Path::new("/sys/fs/bpf"), "bpf"));
        assert!(!is_mounted_in(&m, Path::new("/sys/fs/bpf"), "tmpfs"));
        assert!(!is_mounted_in(&m, Path::new("/sys/fs"), "bpf"));
    }

    #[test]
    fn reads_this_process_mounts() {
        // /proc itself is always mounted where /proc/self/mounts can be read.
        assert!(is_mounted(Path::new("/proc"), "proc"));
    }
}
