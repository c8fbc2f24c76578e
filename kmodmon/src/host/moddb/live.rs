//! What a running kernel has now: loaded modules (/proc/modules) and the modules sysfs knows
//! (/sys/module: built-in ones with parameters, and loaded ones), read under a [`RootFs`].
use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{ModDbError, RootFs};
use crate::modname;

/// Whether the running kernel can load modules at all (CONFIG_MODULES): its /proc/modules
/// exists. Without it init_module and friends fail with ENOSYS and no module hook fires.
pub fn module_support() -> bool {
    std::path::Path::new("/proc/modules").exists()
}

/// One line of /proc/modules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedModule {
    pub name: String,
    pub size: u64,
    /// Modules that depend on this one.
    pub used_by: Vec<String>,
    /// Live, Loading or Unloading.
    pub state: String,
}

/// What is known about loaded modules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Loaded {
    /// Read from /proc/modules.
    Known(BTreeMap<String, LoadedModule>),
    /// /proc is mounted but has no modules file: the kernel was built without loadable-module
    /// support (CONFIG_MODULES unset), so only built-in modules exist.
    NoModuleSupport,
    /// An offline root: nothing says what is loaded.
    Unknown,
}

/// How /sys/module lists a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SysState {
    /// No `initstate` file: built into the kernel.
    Builtin,
    /// Has `initstate`: a loaded module.
    Loaded,
}

/// Loaded and built-in modules of the kernel running the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveState {
    pub loaded: Loaded,
    /// /sys/module entries; `None` when /sys is not there (offline root).
    pub sysfs: Option<BTreeMap<String, SysState>>,
}

impl LiveState {
    /// Reads ROOT/proc/modules and ROOT/sys/module. Missing files are not errors (they make
    /// the state `Unknown` or `NoModuleSupport`); unreadable ones are.
    pub fn read(root: &RootFs) -> Result<LiveState, ModDbError> {
        let io_err = |path: PathBuf| move |source| ModDbError::Io { path, source };
        let loaded = match root
            .read_text("/proc/modules")
            .map_err(io_err(root.real("/proc/modules")))?
        {
            Some(text) => Loaded::Known(parse_proc_modules(&text)),
            None if root.exists("/proc/self") => Loaded::NoModuleSupport,
            None => Loaded::Unknown,
        };
        let sysfs = if root.is_dir("/sys/module") {
            let mut map = BTreeMap::new();
            let names = root
                .list_dir("/sys/module")
                .map_err(io_err(root.real("/sys/module")))?;
            for name in names {
                let name = name.to_string_lossy().into_owned();
                let initstate = format!("/sys/module/{name}/initstate");
                let state = if root.exists(&initstate) {
                    SysState::Loaded
                } else {
                    SysState::Builtin
                };
                map.insert(modname::normalize(&name), state);
            }
            Some(map)
        } else {
            None
        };
        Ok(LiveState { loaded, sysfs })
    }

    /// Whether `name` is loaded now; `None` when that is not known.
    pub fn is_loaded(&self, name: &str) -> Option<bool> {
        let name = modname::normalize(name);
        match &self.loaded {
            Loaded::Known(map) => Some(map.contains_key(&name)),
            Loaded::NoModuleSupport => Some(false),
            Loaded::Unknown => match &self.sysfs {
                Some(sys) if sys.get(&name) == Some(&SysState::Loaded) => Some(true),
                _ => None,
            },
        }
    }

    /// Whether sysfs shows `name` as built in.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.sysfs
            .as_ref()
            .is_some_and(|s| s.get(&modname::normalize(name)) == Some(&SysState::Builtin))
    }

    /// The loaded modules, when known.
    pub fn loaded_modules(&self) -> Option<&BTreeMap<String, LoadedModule>> {
        match &self.loaded {
            Loaded::Known(map) => Some(map),
            _ => None,
        }
    }
}

/// Parses /proc/modules: `name size refcount used_by state address [taints]`. Lines that do not
/// have that shape are skipped.
pub fn parse_proc_modules(text: &str) -> BTreeMap<String, LoadedModule> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, size, _refcount, used_by, state, ..] = fields.as_slice() else {
            continue;
        };
        let Ok(size) = size.parse::<u64>() else {
            continue;
        };
        let used_by = used_by
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "-" && *s != "[permanent]")
            .map(modname::normalize)
            .collect();
        let name = modname::normalize(name);
        out.insert(
            name.clone(),
            LoadedModule {
                name,
                size,
                used_by,
                state: state.to_string(),
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_MODULES: &str = "\
iptable_nat 16384 1 - Live 0xffffffffc0a26000
nf_nat 49152 2 xt_MASQUERADE,iptable_nat, Live 0xffffffffc0a0f000
nf_conntrack 172032 3 xt_conntrack,xt_MASQUERADE,nf_nat, Live 0xffffffffc09c2000
vboxdrv 536576 2 vboxnetadp,vboxnetflt, Live 0xffffffffc0900000 (OE)
broken line
bad size x - Live 0x0
";

    #[test]
    fn parses_proc_modules() {
        let map = parse_proc_modules(PROC_MODULES);
        assert_eq!(map.len(), 4);
        assert_eq!(map["nf_nat"].used_by, vec!["xt_MASQUERADE", "iptable_nat"]);
        assert!(map["iptable_nat"].used_by.is_empty());
        assert_eq!(map["nf_conntrack"].size, 172032);
        assert_eq!(map["vboxdrv"].state, "Live");
    }

    #[test]
    fn reads_an_offline_root_and_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootFs::new(dir.path());
        // Nothing at all: unknown.
        let live = LiveState::read(&root).unwrap();
        assert_eq!(live.loaded, Loaded::Unknown);
        assert_eq!(live.is_loaded("x"), None);

        // /proc mounted without /proc/modules: no module support.
        std::fs::create_dir_all(dir.path().join("proc/self")).unwrap();
        std::fs::create_dir_all(dir.path().join("sys/module/printk/parameters")).unwrap();
        std::fs::create_dir_all(dir.path().join("sys/module/nf_nat")).unwrap();
        std::fs::write(dir.path().join("sys/module/nf_nat/initstate"), "live\n").unwrap();
        let live = LiveState::read(&root).unwrap();
        assert_eq!(live.loaded, Loaded::NoModuleSupport);
        assert_eq!(live.is_loaded("nf_nat"), Some(false));
        assert!(live.is_builtin("printk"));
        assert!(!live.is_builtin("nf_nat"));

        std::fs::write(dir.path().join("proc/modules"), PROC_MODULES).unwrap();
        let live = LiveState::read(&root).unwrap();
        assert_eq!(live.is_loaded("iptable-nat"), Some(true));
        assert_eq!(live.is_loaded("ip_vs"), Some(false));
        assert_eq!(live.loaded_modules().map(BTreeMap::len), Some(4));
    }
}
