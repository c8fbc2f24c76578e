//! Module names and module file names as the kernel and kmod treat them: `-` and `_` are the
//! same character in a name, and a module file is `NAME.ko`, maybe compressed (`.ko.xz`, ...).
//! Shared by kmodmon, its tests and xtask's VM harness, and part of the policy contract: the
//! `kernel_read_file` program sees file names, so userspace stores each allowed name with
//! every [`FILE_SUFFIXES`] entry.

/// The names module files have, after the module's name: plain, and as kmod compresses them.
pub const FILE_SUFFIXES: [&str; 4] = [".ko", ".ko.xz", ".ko.gz", ".ko.zst"];

/// The module part of a module file's path: directories and everything from `.ko` on dropped
/// (`kernel/net/nf-nat.ko.zst` → `nf-nat`). `None` when the file name has no `.ko` or nothing
/// before it.
pub fn file_stem(path: &str) -> Option<&str> {
    let file = path.rsplit('/').next().unwrap_or(path);
    let end = file.find(".ko")?;
    (end > 0).then(|| &file[..end])
}

/// The canonical form of a module name: dashes become underscores, as the kernel does.
#[cfg(feature = "alloc")]
pub fn normalize(name: &str) -> alloc::string::String {
    name.replace('-', "_")
}

/// The module a module file holds, by the kernel's naming: `.../ip-vs.ko.xz` → `ip_vs`.
#[cfg(feature = "alloc")]
pub fn from_file(path: &str) -> Option<alloc::string::String> {
    file_stem(path).map(normalize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_drop_directories_and_module_suffixes() {
        assert_eq!(file_stem("ip_vs.ko"), Some("ip_vs"));
        assert_eq!(file_stem("kernel/net/nf-nat.ko.zst"), Some("nf-nat"));
        for s in FILE_SUFFIXES {
            let mut buf = [0u8; 32];
            let name = b"/lib/m/x";
            buf[..name.len()].copy_from_slice(name);
            buf[name.len()..name.len() + s.len()].copy_from_slice(s.as_bytes());
            let path = core::str::from_utf8(&buf[..name.len() + s.len()]).unwrap();
            assert_eq!(file_stem(path), Some("x"), "{path}");
        }
        assert_eq!(file_stem("README"), None);
        assert_eq!(file_stem("x.o"), None);
        assert_eq!(file_stem(".ko"), None);
        assert_eq!(file_stem("dir.ko/.ko"), None);
    }

    #[cfg(feature = "alloc")]
    #[test]
    fn names_from_files_are_normalized() {
        assert_eq!(from_file("ip_vs.ko").as_deref(), Some("ip_vs"));
        assert_eq!(
            from_file("kernel/a/nf-nat.ko.zst").as_deref(),
            Some("nf_nat")
        );
        assert_eq!(from_file("README"), None);
        assert_eq!(normalize("nf-conntrack"), "nf_conntrack");
    }
}
