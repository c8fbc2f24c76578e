//! Drop-in configuration directories as systemd and kmod read them: every `*.conf` of every
//! directory, ordered by file name; a name in an earlier directory hides the same name in a
//! later one; a file that is a symlink to /dev/null (or, for systemd, empty) is masked.
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::escape::escape_bytes;
use crate::host::moddb::RootFs;

/// systemd-modules-load's directories, highest precedence first (modules-load.d(5)).
pub const MODULES_LOAD_DIRS: [&str; 5] = [
    "/etc/modules-load.d",
    "/run/modules-load.d",
    "/usr/local/lib/modules-load.d",
    "/usr/lib/modules-load.d",
    "/lib/modules-load.d",
];

/// kmod's modprobe.d directories, highest precedence first (modprobe.d(5)).
pub const MODPROBE_DIRS: [&str; 5] = [
    "/etc/modprobe.d",
    "/run/modprobe.d",
    "/usr/local/lib/modprobe.d",
    "/usr/lib/modprobe.d",
    "/lib/modprobe.d",
];

/// What became of one file found in a configuration directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "by")]
pub enum FileState {
    /// Read.
    Used,
    /// A symlink to /dev/null or an empty file: hides same-named files, adds nothing.
    Masked,
    /// Not read: a file of the same name in a directory of higher precedence wins.
    Shadowed(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfFile {
    /// Logical path of the directory entry, e.g. /etc/modules-load.d/modules.conf (escaped
    /// for display: file names may hold any byte).
    pub path: String,
    /// Where its symlinks lead (logical, escaped), when that differs from `path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(flatten)]
    pub state: FileState,
    /// The file name, as precedence compares it.
    #[serde(skip)]
    pub name: OsString,
    /// The logical path that is read (symlinks followed), unescaped.
    #[serde(skip)]
    pub read: PathBuf,
}

impl ConfFile {
    /// The logical path that is actually read.
    pub fn read_path(&self) -> &Path {
        &self.read
    }
}

/// Lists the `*.conf` files of `dirs` (highest precedence first) under the root, sorted by
/// file name. Directories that resolve to one already listed (e.g. /lib → /usr/lib) are
/// skipped. `empty_masks`: an empty regular file masks (systemd) or is merely empty (kmod).
pub fn collect(root: &RootFs, dirs: &[&str], empty_masks: bool) -> std::io::Result<Vec<ConfFile>> {
    let mut seen_dirs: Vec<PathBuf> = Vec::new();
    let mut files: Vec<ConfFile> = Vec::new();
    for dir in dirs {
        let resolved = root.resolve(dir)?;
        if seen_dirs.contains(&resolved) {
            continue;
        }
        seen_dirs.push(resolved);
        for name in root.list_dir(dir)? {
            let bytes = name.as_bytes();
            if !bytes.ends_with(b".conf") || bytes.starts_with(b".") {
                continue;
            }
            let entry = Path::new(dir).join(&name);
            let path = escape_bytes(entry.as_os_str().as_bytes());
            let target = root.resolve(&entry)?;
            let real = root.real(&target);
            if real.is_dir() {
                continue;
            }
            let state = if let Some(winner) = files.iter().find(|f| f.name == name) {
                FileState::Shadowed(winner.path.clone())
            } else if target == Path::new("/dev/null")
                || (empty_masks && real.metadata().is_ok_and(|m| m.is_file() && m.len() == 0))
            {
                FileState::Masked
            } else {
                FileState::Used
            };
            files.push(ConfFile {
                target: (target != entry).then(|| escape_bytes(target.as_os_str().as_bytes())),
                path,
                state,
                name,
                read: target,
            });
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// The meaningful lines of a systemd-style list file: 1-based line number and trimmed text;
/// blank lines and lines starting with `#` or `;` are skipped.
pub fn list_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with(['#', ';']))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    use crate::check::tests::write;

    #[test]
    fn precedence_masking_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "/usr/lib/modules-load.d/x.conf", "from_usr\n");
        write(d, "/etc/modules-load.d/x.conf", "from_etc\n");
        write(d, "/usr/lib/modules-load.d/a.conf", "a\n");
        write(d, "/run/modules-load.d/b.conf", "");
        write(d, "/usr/lib/modules-load.d/b.conf", "b\n");
        write(d, "/usr/lib/modules-load.d/notconf.txt", "ignored\n");
        write(d, "/etc/modules", "m\n");
        std::fs::create_dir_all(d.join("usr/lib/modules-load.d/dir.conf")).unwrap();
        symlink("/dev/null", d.join("etc/modules-load.d/c.conf")).unwrap();
        write(d, "/usr/lib/modules-load.d/c.conf", "c\n");
        symlink("../modules", d.join("etc/modules-load.d/modules.conf")).unwrap();
        symlink("usr/lib", d.join("lib")).unwrap();

        let root = RootFs::new(d);
        let files = collect(&root, &MODULES_LOAD_DIRS, true).unwrap();
        let summary: Vec<(String, FileState)> = files
            .iter()
            .map(|f| (f.path.clone(), f.state.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("/usr/lib/modules-load.d/a.conf".into(), FileState::Used),
                ("/run/modules-load.d/b.conf".into(), FileState::Masked),
                (
                    "/usr/lib/modules-load.d/b.conf".into(),
                    FileState::Shadowed("/run/modules-load.d/b.conf".into())
                ),
                ("/etc/modules-load.d/c.conf".into(), FileState::Masked),
                (
                    "/usr/lib/modules-load.d/c.conf".into(),
                    FileState::Shadowed("/etc/modules-load.d/c.conf".into())
                ),
                ("/etc/modules-load.d/modules.conf".into(), FileState::Used),
                ("/etc/modules-load.d/x.conf".into(), FileState::Used),
                (
                    "/usr/lib/modules-load.d/x.conf".into(),
                    FileState::Shadowed("/etc/modules-load.d/x.conf".into())
                ),
            ]
        );
        assert_eq!(files[5].read_path(), Path::new("/etc/modules"));
        // kmod does not treat an empty file as a mask.
        let files = collect(&root, &MODULES_LOAD_DIRS, false).unwrap();
        assert_eq!(files[1].state, FileState::Used);
    }

    #[test]
    fn comment_and_blank_lines_are_skipped() {
        let text =
            "# comment\n; also a comment\n\n  overlay  \nbr_netfilter\n\t#indented comment\n";
        let lines: Vec<_> = list_lines(text).collect();
        assert_eq!(lines, vec![(4, "overlay"), (5, "br_netfilter")]);
    }
}
