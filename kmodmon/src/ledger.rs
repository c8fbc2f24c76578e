//! The module ledger: every load and free kmodmon saw, with who loaded the module, when, and
//! its identity; compared every [`INTERVAL`] with the kernel's own views — /proc/modules (the
//! module list), /sys/module/NAME/initstate (sysfs) and, to confirm, /proc/kallsyms:
//!
//! - a module the ledger saw load and never free that is missing from /proc/modules, or a
//!   module in /sys/module that /proc/modules does not list, is a `hidden_module` event (high
//!   severity, with the loader and the identity): unlinking itself from the module list is
//!   the first thing a rootkit does;
//! - a /proc/modules entry that was not there at start and that no load event explains is an
//!   `unseen_load` event.
//!
//! A discrepancy must be seen at two checks in a row (a load or free still in flight through
//! the ring buffer explains a single one). The ledger is written to a state file (the daemon's)
//! that `kmodmon modules` reads.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    event::{Clock, Container, CrossView, Event, Kind, Syscall, monotonic_ns},
    identity::Identity,
};

/// Where the daemon keeps the ledger (beside the audit log) and `kmodmon modules` reads it.
pub const DEFAULT_FILE: &str = "/var/lib/kmodmon/modules.json";

/// How often the ledger is compared with the kernel's views.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// Who loaded a module, when, and what it was.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub module: String,
    /// RFC 3339 time of the kernel's load record.
    pub loaded_at: String,
    pub ktime_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Box<Identity>>,
}

/// What the daemon writes for `kmodmon modules`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// /proc/sys/kernel/random/boot_id: a state of another boot is stale.
    pub boot_id: String,
    /// When the ledger started (RFC 3339).
    pub started_at: String,
    /// Modules loaded when it started (their loader is unknown to it).
    pub baseline: BTreeSet<String>,
    /// Modules loaded since, not freed.
    pub live: BTreeMap<String, Entry>,
}

/// The kernel's views of loaded modules, read once per check.
#[derive(Clone, Debug, Default)]
pub struct Views {
    pub proc_modules: BTreeSet<String>,
    pub sys_module: BTreeSet<String>,
}

impl Views {
    /// Reads /proc/modules and /sys/module under `root` (`/` on a host).
    pub fn read(root: &Path) -> std::io::Result<Views> {
        let text = std::fs::read_to_string(root.join("proc/modules"))?;
        let proc_modules = text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        let mut sys_module = BTreeSet::new();
        if let Ok(dir) = std::fs::read_dir(root.join("sys/module")) {
            for e in dir.flatten() {
                // Loadable modules have initstate; built-ins with parameters do not.
                if e.path().join("initstate").exists()
                    && let Some(n) = e.file_name().to_str()
                {
                    sys_module.insert(n.to_string());
                }
            }
        }
        Ok(Views {
            proc_modules,
            sys_module,
        })
    }
}

/// Module names with symbols in /proc/kallsyms (`addr type name [module]`).
pub fn kallsyms_modules(root: &Path) -> Option<HashSet<String>> {
    let text = std::fs::read_to_string(root.join("proc/kallsyms")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                let m = l.split_whitespace().nth(3)?;
                Some(m.strip_prefix('[')?.strip_suffix(']')?.to_string())
            })
            .collect(),
    )
}

pub struct Ledger {
    root: PathBuf,
    state: State,
    state_file: Option<PathBuf>,
    clock: Clock,
    last_check: Option<Instant>,
    /// Discrepancies seen at the last check (confirmed at the next).
    suspects: BTreeSet<String>,
    /// Reported already (until the module is loaded or freed again).
    reported: BTreeSet<String>,
    dirty: bool,
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

impl Ledger {
    /// Starts a ledger: the modules loaded now are its baseline. A state file of this boot
    /// (a previous run of the daemon) is continued.
    pub fn start(root: impl Into<PathBuf>, state_file: Option<PathBuf>) -> Ledger {
        let root = root.into();
        let clock = Clock::new();
        let boot_id = std::fs::read_to_string(root.join("proc/sys/kernel/random/boot_id"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let previous = state_file
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<State>(&b).ok())
            .filter(|s| !boot_id.is_empty() && s.boot_id == boot_id);
        let now = Views::read(&root).unwrap_or_default();
        let state = match previous {
            Some(mut s) => {
                // Frees missed while no daemon ran (a hidden module stays: its sysfs does).
                s.live
                    .retain(|m, _| now.proc_modules.contains(m) || now.sys_module.contains(m));
                s.baseline.retain(|m| now.proc_modules.contains(m));
                for m in &now.proc_modules {
                    if !s.live.contains_key(m) {
                        s.baseline.insert(m.clone());
                    }
                }
                s
            }
            None => State {
                boot_id,
                started_at: clock.rfc3339(monotonic_ns()),
                baseline: now.proc_modules.clone(),
                live: BTreeMap::new(),
            },
        };
        Ledger {
            root,
            state,
            state_file,
            clock,
            last_check: None,
            suspects: BTreeSet::new(),
            reported: BTreeSet::new(),
            dirty: true,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Follows an event on its way to the sinks.
    pub fn observe(&mut self, ev: &Event) {
        match ev.kind {
            Kind::Load => {
                let Some(m) = ev.module.as_deref() else {
                    return;
                };
                let m = normalize(m);
                self.reported.remove(&m);
                self.suspects.remove(&m);
                self.state.live.insert(
                    m.clone(),
                    Entry {
                        module: m,
                        loaded_at: ev.time.clone(),
                        ktime_ns: ev.ktime_ns,
                        pid: ev.pid,
                        tid: ev.tid,
                        comm: ev.comm.clone(),
                        uid: ev.uid,
                        cgroup_id: ev.cgroup_id,
                        cgroup_path: ev.cgroup_path.clone(),
                        container: ev.container.clone(),
                        identity: ev.identity.clone(),
                    },
                );
                self.dirty = true;
            }
            Kind::Unload => {
                if let Some(m) = ev.module.as_deref() {
                    let m = normalize(m);
                    self.state.live.remove(&m);
                    self.state.baseline.remove(&m);
                    self.reported.remove(&m);
                    self.suspects.remove(&m);
                    self.dirty = true;
                }
            }
            Kind::LoadAttempt
                if ev.result == Some(0)
                    && matches!(ev.syscall, Some(Syscall::InitModule | Syscall::FinitModule)) =>
            {
                // The attempt's identity is the fuller one (origin, sig_ok).
                let Some(id) = ev.identity.as_ref() else {
                    return;
                };
                if let Some(e) = self.state.live.values_mut().find(|e| e.tid == ev.tid)
                    && e.ktime_ns <= ev.ktime_ns.saturating_add(ev.duration_ns.unwrap_or(0))
                {
                    e.identity = Some(id.clone());
                    self.dirty = true;
                }
            }
            _ => {}
        }
    }

    /// When due, compares with the kernel's views and returns the events to report; writes
    /// the state file when it changed.
    pub fn check(&mut self) -> Vec<Event> {
        if self.last_check.is_some_and(|t| t.elapsed() < INTERVAL) {
            return Vec::new();
        }
        self.last_check = Some(Instant::now());
        let out = match Views::read(&self.root) {
            Ok(v) => self.compare(&v),
            Err(e) => {
                log::debug!("ledger: cannot read /proc/modules: {e}");
                Vec::new()
            }
        };
        if self.dirty {
            self.save();
        }
        out
    }

    /// The comparison itself (see the module documentation).
    pub fn compare(&mut self, v: &Views) -> Vec<Event> {
        let mut now: BTreeSet<String> = BTreeSet::new();
        for m in self.state.live.keys() {
            if !v.proc_modules.contains(m) {
                now.insert(m.clone());
            }
        }
        for m in &v.sys_module {
            if !v.proc_modules.contains(m) {
                now.insert(m.clone());
            }
        }
        for m in &v.proc_modules {
            if !self.state.live.contains_key(m) && !self.state.baseline.contains(m) {
                now.insert(m.clone());
            }
        }
        let confirmed: Vec<String> = now
            .iter()
            .filter(|m| self.suspects.contains(*m) && !self.reported.contains(*m))
            .cloned()
            .collect();
        self.suspects = now;
        if confirmed.is_empty() {
            return Vec::new();
        }
        let kallsyms = kallsyms_modules(&self.root);
        let mut out = Vec::new();
        for m in confirmed {
            self.reported.insert(m.clone());
            let entry = self.state.live.get(&m);
            let view = CrossView {
                proc_modules: v.proc_modules.contains(&m),
                sys_module: v.sys_module.contains(&m),
                kallsyms: kallsyms.as_ref().map(|k| k.contains(&m)),
                ledger: entry.is_some(),
            };
            out.push(self.event(&m, entry, view));
        }
        out
    }

    fn event(&self, m: &str, entry: Option<&Entry>, view: CrossView) -> Event {
        let hidden = !view.proc_modules;
        let mut ev = Event::synthetic(
            if hidden {
                Kind::HiddenModule
            } else {
                Kind::UnseenLoad
            },
            &self.clock,
        );
        ev.module = Some(m.to_string());
        ev.severity = Some(if hidden { "high" } else { "medium" }.to_string());
        if let Some(e) = entry {
            ev.pid = e.pid;
            ev.tid = e.tid;
            ev.comm = e.comm.clone();
            ev.uid = e.uid;
            ev.cgroup_id = e.cgroup_id;
            ev.cgroup_path = e.cgroup_path.clone();
            ev.container = e.container.clone();
            ev.identity = e.identity.clone();
            ev.loaded_at = Some(e.loaded_at.clone());
        }
        let detail = if !hidden {
            "in /proc/modules, not there when kmodmon started, and no load event for it was seen \
             (a load event lost to a full ring buffer, or a load that bypassed the module \
             loader)"
                .to_string()
        } else if view.sys_module || view.kallsyms == Some(true) {
            format!(
                "missing from /proc/modules but present in {}: the module unlinked itself from \
                 the kernel's module list{}",
                [
                    view.sys_module.then_some("/sys/module"),
                    (view.kallsyms == Some(true)).then_some("/proc/kallsyms"),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" and "),
                if entry.is_some() {
                    "; loaded by the task named here"
                } else {
                    "; loaded before kmodmon started (loader unknown)"
                }
            )
        } else {
            "loaded (the ledger saw it) and never freed, yet missing from every kernel view: \
             either its module_free record was lost (see the drop counters) or it also removed \
             its sysfs directory"
                .to_string()
        };
        ev.detail = Some(detail);
        ev.cross_view = Some(view);
        if entry.is_none() {
            ev.pid = 0;
            ev.tid = 0;
            ev.comm = String::new();
        }
        ev
    }

    /// Writes the state file (atomically: a temporary file renamed over it).
    fn save(&mut self) {
        let Some(path) = &self.state_file else {
            self.dirty = false;
            return;
        };
        let tmp = path.with_extension("tmp");
        let result = serde_json::to_vec(&self.state)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&tmp, b)?;
                std::fs::rename(&tmp, path)
            });
        match result {
            Ok(()) => self.dirty = false,
            Err(e) => log::warn!("module ledger: cannot write {}: {e}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(modules: &[&str], sys: &[&str], kallsyms: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("proc/sys/kernel/random")).unwrap();
        std::fs::write(d.path().join("proc/sys/kernel/random/boot_id"), "b1\n").unwrap();
        write_views(d.path(), modules, sys, kallsyms);
        d
    }

    fn write_views(r: &Path, modules: &[&str], sys: &[&str], kallsyms: &str) {
        let text: String = modules
            .iter()
            .map(|m| format!("{m} 16384 0 - Live 0x0000000000000000\n"))
            .collect();
        std::fs::write(r.join("proc/modules"), text).unwrap();
        let _ = std::fs::remove_dir_all(r.join("sys/module"));
        for m in sys {
            std::fs::create_dir_all(r.join("sys/module").join(m)).unwrap();
            std::fs::write(r.join("sys/module").join(m).join("initstate"), "live\n").unwrap();
        }
        std::fs::write(r.join("proc/kallsyms"), kallsyms).unwrap();
    }

    fn load(m: &str, pid: u32) -> Event {
        let mut e = Event::synthetic(Kind::Load, &Clock::new());
        e.module = Some(m.into());
        e.pid = pid;
        e.tid = pid;
        e.comm = "insmod".into();
        e
    }

    fn checks(l: &mut Ledger, r: &Path) -> Vec<Event> {
        let v = Views::read(r).unwrap();
        let mut out = l.compare(&v);
        out.extend(l.compare(&v));
        out
    }

    #[test]
    fn a_module_that_leaves_the_list_is_reported_once_with_its_loader() {
        let d = root(&["ext4"], &["ext4"], "");
        let state = d.path().join("state.json");
        let mut l = Ledger::start(d.path(), Some(state.clone()));
        assert!(l.state().baseline.contains("ext4"));
        l.observe(&load("kmt_hide", 42));
        write_views(
            d.path(),
            &["ext4"],
            &["ext4", "kmt_hide"],
            "ffff t hide_fn\t[kmt_hide]\n",
        );
        let v = Views::read(d.path()).unwrap();
        assert!(l.compare(&v).is_empty(), "one sighting is not enough");
        let evs = l.compare(&v);
        assert_eq!(evs.len(), 1);
        let e = &evs[0];
        assert_eq!(e.kind, Kind::HiddenModule);
        assert_eq!((e.pid, e.comm.as_str()), (42, "insmod"));
        assert_eq!(e.severity.as_deref(), Some("high"));
        let cv = e.cross_view.clone().unwrap_or_default();
        assert!(!cv.proc_modules && cv.sys_module && cv.ledger && cv.kallsyms == Some(true));
        assert!(l.compare(&v).is_empty(), "reported once");
        l.save();
        let back: State = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
        assert_eq!(back.live["kmt_hide"].pid, 42);
    }

    #[test]
    fn loads_in_flight_and_frees_are_not_reported() {
        let d = root(&["ext4"], &["ext4"], "");
        let mut l = Ledger::start(d.path(), None);
        // Loaded, its load record not read yet: one sighting only, then the record comes.
        write_views(d.path(), &["ext4", "dummy"], &["ext4", "dummy"], "");
        let v = Views::read(d.path()).unwrap();
        assert!(l.compare(&v).is_empty());
        l.observe(&load("dummy", 1));
        assert!(l.compare(&v).is_empty());
        // Freed: the free record removes it from the ledger.
        let mut free = Event::synthetic(Kind::Unload, &Clock::new());
        free.module = Some("dummy".into());
        l.observe(&free);
        write_views(d.path(), &["ext4"], &["ext4"], "");
        assert!(checks(&mut l, d.path()).is_empty());
    }

    #[test]
    fn an_unexplained_new_module_is_an_unseen_load() {
        let d = root(&["ext4"], &["ext4"], "");
        let mut l = Ledger::start(d.path(), None);
        write_views(d.path(), &["ext4", "sneaky"], &["ext4", "sneaky"], "");
        let evs = checks(&mut l, d.path());
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].kind, Kind::UnseenLoad);
        assert_eq!(evs[0].module.as_deref(), Some("sneaky"));
        assert!(evs[0].cross_view.as_ref().unwrap().proc_modules);
    }

    #[test]
    fn a_state_of_this_boot_is_continued() {
        let d = root(&["ext4", "dummy"], &["ext4", "dummy"], "");
        let state = d.path().join("state.json");
        {
            let mut l = Ledger::start(d.path(), Some(state.clone()));
            l.observe(&load("x", 5));
            l.save();
        }
        write_views(
            d.path(),
            &["ext4", "dummy", "x"],
            &["ext4", "dummy", "x"],
            "",
        );
        {
            let mut l = Ledger::start(d.path(), Some(state.clone()));
            l.observe(&load("x", 5));
            l.save();
        }
        let l = Ledger::start(d.path(), Some(state));
        assert_eq!(l.state().live["x"].pid, 5);
        assert!(!l.state().baseline.contains("x"));
    }
}
