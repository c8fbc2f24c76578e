//! The module database of one kernel, as depmod leaves it in /lib/modules/VERSION:
//! modules.dep (what each module needs), modules.alias and modules.symbols (what a request
//! such as `fs-overlay` loads), modules.builtin and modules.builtin.alias (what is compiled
//! in), modules.softdep. Parsed once; lookups afterwards are map look-ups.
//!
//! Everything is read under a [`RootFs`], so the same code checks the running host and an
//! offline root filesystem. [`live`] reads what the running kernel has loaded.
//!
//! ```no_run
//! use kmodmon::host::moddb::{ModDb, RootFs};
//! let db = ModDb::for_kernel(&RootFs::host(), "6.1.0-13-cloud-amd64")?;
//! let deps = db.deps_of("ip_vs_wrr"); // ["ip_vs", "nf_conntrack", ...]
//! let mods = db.resolve_alias("fs-overlay"); // ["overlay"]
//! # Ok::<(), kmodmon::host::moddb::ModDbError>(())
//! ```
mod alias;
pub mod live;
mod root;

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use alias::{AliasIndex, fnmatch, normalize_alias};
pub use live::{LiveState, Loaded, LoadedModule, SysState};
pub use root::RootFs;

use crate::modname;

/// Where kmod and depmod look for module trees, in order.
pub const MODULE_BASE_DIRS: [&str; 2] = ["/lib/modules", "/usr/lib/modules"];

#[derive(Debug, Error)]
pub enum ModDbError {
    #[error(
        "no module directory for kernel {kernel} (looked for {looked}): this kernel has no \
         loadable modules installed; choose another kernel with --kernel"
    )]
    NoModulesDir { kernel: String, looked: String },
    #[error(
        "{dir} has no modules.dep: run `depmod {kernel}` (for an offline root: `depmod -b ROOT {kernel}`)"
    )]
    NoDepFile { dir: PathBuf, kernel: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A loadable module listed in modules.dep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    /// Path relative to the module directory, as in modules.dep.
    pub path: String,
    /// Dependencies as listed in modules.dep (depmod lists them all, in load order reversed).
    pub deps: Vec<String>,
}

/// `softdep` of modules.softdep: modules to load before (pre) and after (post).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SoftDep {
    pub pre: Vec<String>,
    pub post: Vec<String>,
}

/// The text of the depmod files of one kernel (absent files are `None`).
#[derive(Clone, Debug, Default)]
pub struct DepmodFiles {
    pub dep: String,
    pub alias: Option<String>,
    pub symbols: Option<String>,
    pub builtin: Option<String>,
    pub builtin_alias: Option<String>,
    /// modules.builtin.modinfo: NUL-separated `module.key=value` records; its `alias` keys
    /// are used when modules.builtin.alias is absent (depmod writes only its .bin form).
    pub builtin_modinfo: Option<String>,
    pub softdep: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct ModDb {
    kernel: String,
    dir: PathBuf,
    modules: HashMap<String, Module>,
    builtin: HashSet<String>,
    aliases: AliasIndex,
    builtin_aliases: AliasIndex,
    symbols: HashMap<String, Vec<String>>,
    softdeps: HashMap<String, SoftDep>,
    skipped_lines: usize,
}

impl ModDb {
    /// Opens ROOT/lib/modules/KERNEL (or ROOT/usr/lib/modules/KERNEL).
    pub fn for_kernel(root: &RootFs, kernel: &str) -> Result<ModDb, ModDbError> {
        let Some(dir) = modules_dir(root, kernel) else {
            let looked = MODULE_BASE_DIRS
                .iter()
                .map(|b| root.real(format!("{b}/{kernel}")).display().to_string())
                .collect::<Vec<_>>()
                .join(" and ");
            return Err(ModDbError::NoModulesDir {
                kernel: kernel.to_string(),
                looked,
            });
        };
        let real = root.resolve_real(&dir).map_err(|source| ModDbError::Io {
            path: root.real(&dir),
            source,
        })?;
        let mut db = ModDb::open(&real)?;
        db.kernel = kernel.to_string();
        db.dir = dir;
        Ok(db)
    }

    /// Opens a module directory on this machine (e.g. `--modules-dir`); the kernel name is the
    /// directory's name.
    pub fn open(dir: &Path) -> Result<ModDb, ModDbError> {
        let kernel = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let read = |name: &str| -> Result<Option<String>, ModDbError> {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(ModDbError::Io { path, source }),
            }
        };
        let Some(dep) = read("modules.dep")? else {
            return Err(ModDbError::NoDepFile {
                dir: dir.to_path_buf(),
                kernel,
            });
        };
        let files = DepmodFiles {
            dep,
            alias: read("modules.alias")?,
            symbols: read("modules.symbols")?,
            builtin: read("modules.builtin")?,
            builtin_alias: read("modules.builtin.alias")?,
            builtin_modinfo: read("modules.builtin.modinfo")?,
            softdep: read("modules.softdep")?,
        };
        let mut db = ModDb::parse(&kernel, &files);
        db.dir = dir.to_path_buf();
        Ok(db)
    }

    /// Builds the database from file contents. Lines that are not understood are skipped
    /// (counted by [`ModDb::skipped_lines`]).
    pub fn parse(kernel: &str, files: &DepmodFiles) -> ModDb {
        let mut db = ModDb {
            kernel: kernel.to_string(),
            ..ModDb::default()
        };
        for line in files.dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                db.skipped_lines += usize::from(!line.trim().is_empty());
                continue;
            };
            let Some(name) = modname::from_file(path.trim()) else {
                db.skipped_lines += 1;
                continue;
            };
            let deps = deps
                .split_whitespace()
                .filter_map(modname::from_file)
                .collect();
            db.modules.insert(
                name.clone(),
                Module {
                    name,
                    path: path.trim().to_string(),
                    deps,
                },
            );
        }
        if let Some(text) = &files.builtin {
            db.builtin
                .extend(text.lines().map(str::trim).filter_map(modname::from_file));
        }
        if let Some(text) = &files.alias {
            db.skipped_lines += db.aliases.parse_into(text);
        }
        if let Some(text) = &files.builtin_alias {
            db.skipped_lines += db.builtin_aliases.parse_into(text);
        } else if let Some(text) = &files.builtin_modinfo {
            for record in text.split('\0') {
                if let Some((module, alias)) = record.split_once(".alias=") {
                    db.builtin_aliases.insert(alias, module);
                }
            }
        }
        if let Some(text) = &files.symbols {
            for line in text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            {
                match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                    ["alias", symbol, module] => db
                        .symbols
                        .entry((*symbol).to_string())
                        .or_default()
                        .push(modname::normalize(module)),
                    _ => db.skipped_lines += 1,
                }
            }
        }
        if let Some(text) = &files.softdep {
            for line in text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            {
                match parse_softdep(line) {
                    Some((name, dep)) => {
                        db.softdeps.insert(name, dep);
                    }
                    None => db.skipped_lines += 1,
                }
            }
        }
        db
    }

    /// The kernel version this database belongs to.
    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    /// The module directory (a logical path under the root for [`ModDb::for_kernel`]).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `name` is a loadable module of this kernel (listed in modules.dep).
    pub fn contains(&self, name: &str) -> bool {
        self.modules.contains_key(&modname::normalize(name))
    }

    /// Whether `name` is compiled into this kernel (modules.builtin).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&modname::normalize(name))
    }

    pub fn module(&self, name: &str) -> Option<&Module> {
        self.modules.get(&modname::normalize(name))
    }

    /// Every loadable module of this kernel (in no particular order).
    pub fn modules(&self) -> impl Iterator<Item = &Module> {
        self.modules.values()
    }

    /// Every module `name` needs, transitively, nearest first, without duplicates and without
    /// `name` itself. Empty for an unknown or built-in module.
    pub fn deps_of(&self, name: &str) -> Vec<String> {
        let start = modname::normalize(name);
        let mut out: Vec<String> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::from([start.as_str()]);
        let mut queue: std::collections::VecDeque<&str> = [start.as_str()].into();
        while let Some(cur) = queue.pop_front() {
            let Some(module) = self.modules.get(cur) else {
                continue;
            };
            for dep in &module.deps {
                if seen.insert(dep) {
                    out.push(dep.clone());
                    queue.push_back(dep);
                }
            }
        }
        out
    }

    /// The modules a request names, resolved in kmod's order (kmod_module_new_from_lookup,
    /// less modprobe.d): a loadable module's name, then `symbol:` requests (modules.symbols),
    /// then modules.alias, then built-in names and aliases. So `crc32`, both built in and an
    /// alias of crc32_pclmul, resolves to the aliases as modprobe does. Empty when nothing
    /// matches. Names are normalised.
    pub fn resolve_alias(&self, request: &str) -> Vec<String> {
        let request = request.trim();
        let name = modname::normalize(request);
        if self.modules.contains_key(&name) {
            return vec![name];
        }
        if let Some(mods) = self.symbols.get(request) {
            return mods.clone();
        }
        let mods = self.aliases.lookup(request);
        if !mods.is_empty() {
            return mods;
        }
        if self.builtin.contains(&name) {
            return vec![name];
        }
        self.builtin_aliases.lookup(request)
    }

    /// modules.softdep entry of `name`.
    pub fn softdep(&self, name: &str) -> Option<&SoftDep> {
        self.softdeps.get(&modname::normalize(name))
    }

    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    pub fn builtin_count(&self) -> usize {
        self.builtin.len()
    }

    pub fn alias_count(&self) -> usize {
        self.aliases.len()
    }

    /// Lines of the depmod files that were not understood and were skipped.
    pub fn skipped_lines(&self) -> usize {
        self.skipped_lines
    }
}

/// `softdep NAME pre: a b post: c` → (NAME, SoftDep). Words before any `pre:`/`post:` are
/// ignored, as kmod ignores them (real modules.softdep has `softdep cifs gcm`, from a
/// MODULE_SOFTDEP without "pre:").
pub fn parse_softdep(line: &str) -> Option<(String, SoftDep)> {
    let mut words = line.split_whitespace();
    if words.next()? != "softdep" {
        return None;
    }
    let name = modname::normalize(words.next()?);
    let mut dep = SoftDep::default();
    let mut target: Option<&mut Vec<String>> = None;
    for word in words {
        match word {
            "pre:" => target = Some(&mut dep.pre),
            "post:" => target = Some(&mut dep.post),
            w => {
                if let Some(list) = target.as_mut() {
                    list.push(modname::normalize(w));
                }
            }
        }
    }
    Some((name, dep))
}

/// The module directory of `kernel` under the root (logical path), if one exists.
pub fn modules_dir(root: &RootFs, kernel: &str) -> Option<PathBuf> {
    if kernel.is_empty() || kernel.contains('/') || kernel == "." || kernel == ".." {
        return None;
    }
    MODULE_BASE_DIRS
        .iter()
        .map(|base| PathBuf::from(format!("{base}/{kernel}")))
        .find(|dir| root.is_dir(dir))
}

/// Kernel versions with a module directory under the root, newest first.
pub fn installed_kernels(root: &RootFs) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for base in MODULE_BASE_DIRS {
        for name in root.list_dir(base).unwrap_or_default() {
            let name = name.to_string_lossy().into_owned();
            if !out.contains(&name) && root.is_dir(format!("{base}/{name}")) {
                out.push(name);
            }
        }
    }
    out.sort_by(|a, b| version_cmp(b, a));
    out
}

/// The release of the kernel running the root (ROOT/proc/sys/kernel/osrelease, which is what
/// `uname -r` prints), when the root has a /proc.
pub fn running_kernel(root: &RootFs) -> Option<String> {
    let text = root.read_text("/proc/sys/kernel/osrelease").ok()??;
    let release = text.trim();
    (!release.is_empty()).then(|| release.to_string())
}

/// Orders version strings the way people read them: runs of digits compare as numbers.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let chunks = |s: &str| -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            let digit = c.is_ascii_digit();
            match out.last_mut() {
                Some((d, chunk)) if *d == digit => chunk.push(c),
                _ => out.push((digit, c.to_string())),
            }
        }
        out
    };
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ModDb {
        let files = DepmodFiles {
            dep: "\
kernel/net/netfilter/ipvs/ip_vs_wrr.ko: kernel/net/netfilter/ipvs/ip_vs.ko kernel/net/netfilter/nf_conntrack.ko\n\
kernel/net/netfilter/ipvs/ip_vs.ko: kernel/net/netfilter/nf_conntrack.ko\n\
kernel/net/netfilter/nf_conntrack.ko.xz: kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko.xz kernel/lib/libcrc32c.ko\n\
kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko.xz:\n\
kernel/lib/libcrc32c.ko:\n\
kernel/fs/overlayfs/overlay.ko.zst:\n\
kernel/drivers/net/dummy-thing.ko:\n\
not a dep line\n"
                .to_string(),
            alias: Some(
                "alias fs-overlay overlay\nalias net-pf-99 dummy_thing\nalias devname:dummy* dummy-thing\n\
                 alias ext4 overlay_is_not_ext4_but_aliases_win\n"
                    .into(),
            ),
            symbols: Some("alias symbol:nf_conntrack_in nf_conntrack\n".into()),
            builtin: Some("kernel/fs/ext4/ext4.ko\nkernel/crypto/crc32c_generic.ko\n".into()),
            builtin_alias: Some("alias fs-ext4 ext4\nalias crypto-crc32c* crc32c_generic\n".into()),
            builtin_modinfo: Some("ext4.alias=not-used-when-builtin-alias-exists\0".into()),
            softdep: Some("# Soft dependencies\nsoftdep ip_vs pre: nf_defrag_ipv6 post: ip_vs_wrr\nsoftdep cifs gcm pre: nls\nsoftdep\n".into()),
        };
        ModDb::parse("6.1.0-13-cloud-amd64", &files)
    }

    #[test]
    fn transitive_deps_nearest_first() {
        let db = sample();
        assert_eq!(db.module_count(), 7);
        assert_eq!(
            db.deps_of("ip_vs_wrr"),
            vec!["ip_vs", "nf_conntrack", "nf_defrag_ipv6", "libcrc32c"]
        );
        assert_eq!(
            db.deps_of("ip-vs"),
            vec!["nf_conntrack", "nf_defrag_ipv6", "libcrc32c"]
        );
        assert!(db.deps_of("overlay").is_empty());
        assert!(db.deps_of("no_such").is_empty());
        assert_eq!(
            db.module("nf_conntrack").map(|m| m.path.as_str()),
            Some("kernel/net/netfilter/nf_conntrack.ko.xz")
        );
    }

    #[test]
    fn deps_cycles_do_not_loop() {
        let files = DepmodFiles {
            dep: "a.ko: b.ko\nb.ko: a.ko c.ko\nc.ko:\n".into(),
            ..Default::default()
        };
        let db = ModDb::parse("x", &files);
        assert_eq!(db.deps_of("a"), vec!["b", "c"]);
    }

    #[test]
    fn alias_resolution_order() {
        let db = sample();
        assert_eq!(db.resolve_alias("overlay"), vec!["overlay"]);
        assert_eq!(db.resolve_alias("dummy-thing"), vec!["dummy_thing"]);
        assert_eq!(db.resolve_alias("fs-overlay"), vec!["overlay"]);
        assert_eq!(db.resolve_alias("net-pf-99"), vec!["dummy_thing"]);
        assert_eq!(db.resolve_alias("devname:dummy0"), vec!["dummy_thing"]);
        assert_eq!(
            db.resolve_alias("symbol:nf_conntrack_in"),
            vec!["nf_conntrack"]
        );
        assert_eq!(
            db.resolve_alias("ext4"),
            vec!["overlay_is_not_ext4_but_aliases_win"],
            "aliases before built-ins"
        );
        assert_eq!(db.resolve_alias("crc32c_generic"), vec!["crc32c_generic"]);
        assert_eq!(db.resolve_alias("fs-ext4"), vec!["ext4"]);
        assert_eq!(
            db.resolve_alias("crypto-crc32c-generic"),
            vec!["crc32c_generic"]
        );
        assert!(db.resolve_alias("nf_conntrack_ipv4").is_empty());
        assert!(db.is_builtin("crc32c-generic"));
        assert!(db.contains("nf-conntrack"));
    }

    #[test]
    fn builtin_aliases_from_modinfo() {
        let files = DepmodFiles {
            builtin: Some("kernel/fs/ext4/ext4.ko\n".into()),
            builtin_modinfo: Some("ext4.license=GPL\0ext4.alias=fs-ext4\0ext4.alias=ext3\0crc32c_generic.alias=crypto-crc32c\0".into()),
            ..Default::default()
        };
        let db = ModDb::parse("x", &files);
        assert_eq!(db.resolve_alias("fs-ext4"), vec!["ext4"]);
        assert_eq!(db.resolve_alias("ext3"), vec!["ext4"]);
        assert_eq!(db.resolve_alias("crypto-crc32c"), vec!["crc32c_generic"]);
        assert!(
            sample()
                .resolve_alias("not-used-when-builtin-alias-exists")
                .is_empty()
        );
    }

    #[test]
    fn softdeps() {
        let db = sample();
        let sd = db.softdep("ip-vs").unwrap();
        assert_eq!(sd.pre, vec!["nf_defrag_ipv6"]);
        assert_eq!(sd.post, vec!["ip_vs_wrr"]);
        let cifs = db.softdep("cifs").unwrap();
        assert_eq!(
            cifs.pre,
            vec!["nls"],
            "\"gcm\" before any pre:/post: is ignored"
        );
        assert_eq!(
            db.skipped_lines(),
            2,
            "\"not a dep line\" and \"softdep\" with no module"
        );
    }

    #[test]
    fn versions_sort_numerically() {
        assert_eq!(
            version_cmp("6.1.0-13-cloud-amd64", "6.1.0-9-cloud-amd64"),
            Ordering::Greater
        );
        assert_eq!(version_cmp("6.12.0", "6.9.7"), Ordering::Greater);
        assert_eq!(version_cmp("5.10.0", "5.10.0"), Ordering::Equal);
        assert_eq!(version_cmp("5.10", "5.10.1"), Ordering::Less);
    }

    #[test]
    fn opens_a_tree_under_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootFs::new(dir.path());
        assert!(matches!(
            ModDb::for_kernel(&root, "6.1.0"),
            Err(ModDbError::NoModulesDir { .. })
        ));
        std::fs::create_dir_all(dir.path().join("usr/lib/modules/6.1.0")).unwrap();
        std::fs::create_dir_all(dir.path().join("usr/lib/modules/6.10.2")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", dir.path().join("lib")).unwrap();
        let err = ModDb::for_kernel(&root, "6.1.0").unwrap_err();
        assert!(err.to_string().contains("depmod 6.1.0"), "{err}");
        std::fs::write(
            dir.path().join("usr/lib/modules/6.1.0/modules.dep"),
            "kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n",
        )
        .unwrap();
        let db = ModDb::for_kernel(&root, "6.1.0").unwrap();
        assert_eq!(db.deps_of("a"), vec!["b"]);
        assert_eq!(db.dir(), Path::new("/lib/modules/6.1.0"));
        assert_eq!(installed_kernels(&root), vec!["6.10.2", "6.1.0"]);
        assert!(modules_dir(&root, "../etc").is_none());
        assert_eq!(running_kernel(&root), None);
    }
}
