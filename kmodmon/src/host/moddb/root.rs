//! A root directory that stands for `/` of some system: the running host (`/`) or an offline
//! root filesystem (`--root DIR`). Paths are written as that system sees them ("logical", e.g.
//! `/etc/modules`) and symlinks are followed the way that system would follow them: an
//! absolute link target starts again at the root, and `..` never climbs above it.
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Symlinks followed before giving up, as the kernel does (MAXSYMLINKS).
const MAX_SYMLINKS: usize = 40;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootFs {
    root: PathBuf,
}

impl RootFs {
    /// `root` is the directory that stands for `/`.
    pub fn new(root: impl Into<PathBuf>) -> RootFs {
        RootFs { root: root.into() }
    }

    /// The running host.
    pub fn host() -> RootFs {
        RootFs::new("/")
    }

    /// The directory on this machine that stands for `/`.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Whether this root is the running host's `/` (then /proc and /sys describe it).
    pub fn is_host(&self) -> bool {
        self.root == Path::new("/")
            || std::fs::canonicalize(&self.root).is_ok_and(|p| p == Path::new("/"))
    }

    /// The path on this machine of a logical path, without following any symlink (`..` is
    /// applied lexically and never climbs above the root).
    pub fn real(&self, logical: impl AsRef<Path>) -> PathBuf {
        let mut rel = PathBuf::new();
        for comp in logical.as_ref().components() {
            match comp {
                Component::Normal(s) => rel.push(s),
                Component::ParentDir => {
                    rel.pop();
                }
                _ => {}
            }
        }
        self.root.join(rel)
    }

    /// Follows every symlink in `logical` inside the root and returns the logical path it ends
    /// at. Components that do not exist are kept as written. Fails only on a symlink loop or
    /// an unreadable link.
    pub fn resolve(&self, logical: impl AsRef<Path>) -> io::Result<PathBuf> {
        let mut pending: Vec<OsString> = Vec::new();
        push_components(&mut pending, logical.as_ref());
        let mut done: Vec<OsString> = Vec::new();
        let mut links = 0usize;
        // `pending` is a stack: its last element is the next component.
        while let Some(comp) = pending.pop() {
            if comp == ".." {
                done.pop();
                continue;
            }
            if comp == "." || comp.is_empty() {
                continue;
            }
            let mut candidate: PathBuf = done.iter().collect();
            candidate.push(&comp);
            let real = self.root.join(&candidate);
            match std::fs::symlink_metadata(&real) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(io::Error::other(format!(
                            "too many levels of symbolic links under {}",
                            real.display()
                        )));
                    }
                    let target = std::fs::read_link(&real)?;
                    if target.is_absolute() {
                        done.clear();
                    }
                    push_components(&mut pending, &target);
                }
                _ => done.push(comp),
            }
        }
        let mut out = PathBuf::from("/");
        out.extend(done);
        Ok(out)
    }

    /// The path on this machine of `logical` after following its symlinks inside the root.
    pub fn resolve_real(&self, logical: impl AsRef<Path>) -> io::Result<PathBuf> {
        Ok(self.real(self.resolve(logical)?))
    }

    /// Reads a file (following symlinks inside the root) as text; bytes that are not UTF-8
    /// become U+FFFD. `Ok(None)` when the file does not exist.
    pub fn read_text(&self, logical: impl AsRef<Path>) -> io::Result<Option<String>> {
        let real = self.resolve_real(logical)?;
        match std::fs::read(&real) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether `logical` exists (following symlinks inside the root).
    pub fn exists(&self, logical: impl AsRef<Path>) -> bool {
        self.resolve_real(logical).is_ok_and(|p| p.exists())
    }

    /// Whether `logical` is a directory (following symlinks inside the root).
    pub fn is_dir(&self, logical: impl AsRef<Path>) -> bool {
        self.resolve_real(logical).is_ok_and(|p| p.is_dir())
    }

    /// Names of the entries of a directory, sorted; empty when it does not exist.
    pub fn list_dir(&self, logical: impl AsRef<Path>) -> io::Result<Vec<OsString>> {
        let real = self.resolve_real(logical)?;
        let entries = match std::fs::read_dir(&real) {
            Ok(entries) => entries,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in entries {
            names.push(entry?.file_name());
        }
        names.sort();
        Ok(names)
    }
}

/// Pushes the components of `path` onto the stack so that the first component is on top.
fn push_components(stack: &mut Vec<OsString>, path: &Path) {
    let comps: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    stack.extend(comps.into_iter().rev());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn absolute_links_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootFs::new(dir.path());
        std::fs::create_dir_all(dir.path().join("usr/lib/modules/6.1")).unwrap();
        std::fs::create_dir_all(dir.path().join("etc/modules-load.d")).unwrap();
        std::fs::write(dir.path().join("etc/modules"), "loop\n").unwrap();
        // Absolute target: must land in the root, not on this machine's /usr.
        symlink("/usr/lib", dir.path().join("lib")).unwrap();
        symlink(
            "../modules",
            dir.path().join("etc/modules-load.d/modules.conf"),
        )
        .unwrap();
        symlink("/etc/modules", dir.path().join("etc/abs.conf")).unwrap();
        symlink(
            "../../../../../etc/modules",
            dir.path().join("etc/climb.conf"),
        )
        .unwrap();

        assert_eq!(
            root.resolve("/lib/modules/6.1").unwrap(),
            Path::new("/usr/lib/modules/6.1")
        );
        assert!(root.is_dir("/lib/modules/6.1"));
        assert_eq!(
            root.resolve("/etc/modules-load.d/modules.conf").unwrap(),
            Path::new("/etc/modules")
        );
        assert_eq!(
            root.resolve("/etc/abs.conf").unwrap(),
            Path::new("/etc/modules")
        );
        assert_eq!(
            root.resolve("/etc/climb.conf").unwrap(),
            Path::new("/etc/modules")
        );
        assert_eq!(
            root.read_text("/etc/abs.conf").unwrap().as_deref(),
            Some("loop\n")
        );
        assert_eq!(root.read_text("/etc/nothing").unwrap(), None);
        assert_eq!(
            root.resolve("/no/such/./file").unwrap(),
            Path::new("/no/such/file")
        );
    }

    #[test]
    fn symlink_loops_are_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        symlink("b", dir.path().join("a")).unwrap();
        symlink("a", dir.path().join("b")).unwrap();
        let root = RootFs::new(dir.path());
        assert!(root.resolve("/a").is_err());
        assert!(!root.exists("/a"));
    }

    #[test]
    fn real_paths_ignore_dot_dot() {
        let root = RootFs::new("/srv/root");
        assert_eq!(root.real("/etc/../etc/x"), Path::new("/srv/root/etc/x"));
        assert_eq!(root.real("/../../x"), Path::new("/srv/root/x"));
        assert_eq!(
            root.real("/etc/modules"),
            Path::new("/srv/root/etc/modules")
        );
    }
}
