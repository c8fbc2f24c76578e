//! What kmodmon says when a container appears: the `expectation` event (declared modules that
//! are neither loaded nor built in, and bad `KERNEL_MODULES` entries), and with
//! `--load-expected` the `self_load` event of kmodmon's own `modprobe` runs.
use std::sync::mpsc;

use crate::event::{Clock, Container, Event, Kind};
use crate::host::declaration::Declaration;
use crate::host::moddb::{LiveState, ModDb, RootFs};

/// What the running kernel has, for "is it missing?".
pub trait ModuleState {
    /// Whether `name` is loaded or built in (`None`: cannot tell).
    fn present(&self, name: &str) -> Option<bool>;
}

/// The live kernel state plus modules.builtin.
pub struct Live<'a> {
    pub state: Option<LiveState>,
    pub db: Option<&'a ModDb>,
}

impl<'a> Live<'a> {
    /// Reads /proc/modules and /sys/module under `root`.
    pub fn read(root: &RootFs, db: Option<&'a ModDb>) -> Live<'a> {
        let state = match LiveState::read(root) {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("cannot tell which modules are loaded: {e}");
                None
            }
        };
        Live { state, db }
    }
}

impl ModuleState for Live<'_> {
    fn present(&self, name: &str) -> Option<bool> {
        if self.db.is_some_and(|db| db.is_builtin(name)) {
            return Some(true);
        }
        let state = self.state.as_ref()?;
        if state.is_builtin(name) {
            return Some(true);
        }
        state.is_loaded(name)
    }
}

/// Declared modules not present (loaded or built in). Unknown presence is not "missing".
pub fn missing(decl: &Declaration, live: &dyn ModuleState) -> Vec<String> {
    decl.expected
        .modules
        .iter()
        .filter(|m| live.present(m) == Some(false))
        .cloned()
        .collect()
}

/// The container fields of a kmodmon-made event.
pub struct Subject<'a> {
    pub container: &'a Container,
    pub cgroup_id: u64,
    pub cgroup_path: Option<&'a str>,
}

fn base(kind: Kind, s: &Subject<'_>, clock: &Clock) -> Event {
    let mut ev = Event::synthetic(kind, clock);
    ev.container = Some(s.container.clone());
    ev.cgroup_id = s.cgroup_id;
    ev.cgroup_path = s.cgroup_path.map(str::to_string);
    ev
}

/// The `expectation` event, when there is something to say: declared modules missing, or bad
/// entries. `None` when everything declared is present (or nothing was declared).
pub fn expectation_event(
    s: &Subject<'_>,
    decl: &Declaration,
    missing: &[String],
    clock: &Clock,
) -> Option<Event> {
    if !decl.declared || (missing.is_empty() && decl.expected.bad.is_empty()) {
        return None;
    }
    let mut ev = base(Kind::Expectation, s, clock);
    ev.modules = missing.to_vec();
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "{}: not loaded: {}",
            decl.describe(),
            missing.join(", ")
        ));
    }
    if !decl.expected.bad.is_empty() {
        let bad: Vec<String> = decl
            .expected
            .bad
            .iter()
            .map(|b| format!("{:?}: {}", b.entry, b.reason))
            .collect();
        parts.push(format!("bad {} entries: {}", decl.what(), bad.join("; ")));
    }
    parts.extend(decl.disagreements());
    ev.detail = Some(parts.join("; "));
    Some(ev)
}

/// The result of kmodmon's own modprobe runs for one container.
#[derive(Debug)]
pub struct LoadResult {
    pub key: String,
    /// Modules modprobe loaded.
    pub loaded: Vec<String>,
    /// Module and why it failed.
    pub failed: Vec<(String, String)>,
    /// `KERNEL_MODULES`, or the annotation the modules were declared in.
    pub declared_in: String,
}

/// Runs `modprobe NAME` for each module on a thread of its own (modprobe can take seconds);
/// the result arrives on `tx`.
pub fn spawn_modprobe(
    key: String,
    modules: Vec<String>,
    declared_in: String,
    tx: mpsc::Sender<LoadResult>,
) {
    let spawned = std::thread::Builder::new()
        .name("kmodmon-modprobe".to_string())
        .spawn(move || {
            let mut r = LoadResult {
                key,
                loaded: Vec::new(),
                failed: Vec::new(),
                declared_in,
            };
            for m in modules {
                // Names were validated and normalized: no leading '-', no spaces, no '/'.
                match std::process::Command::new("modprobe").arg(&m).output() {
                    Ok(out) if out.status.success() => r.loaded.push(m),
                    Ok(out) => {
                        let err = String::from_utf8_lossy(&out.stderr);
                        let line = err.lines().next().unwrap_or("").trim();
                        let why = if line.is_empty() {
                            format!("modprobe exited with {}", out.status)
                        } else {
                            crate::escape::escape_bytes(line.as_bytes())
                        };
                        r.failed.push((m, why));
                    }
                    Err(e) => r.failed.push((m, format!("cannot run modprobe: {e}"))),
                }
            }
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        log::warn!("cannot start a thread for modprobe: {e}");
    }
}

/// The `self_load` event for one container's modprobe runs.
pub fn self_load_event(s: &Subject<'_>, r: &LoadResult, clock: &Clock) -> Event {
    let mut ev = base(Kind::SelfLoad, s, clock);
    ev.modules = r.loaded.clone();
    let mut detail = format!(
        "--load-expected: modprobe for {} of this container",
        r.declared_in
    );
    if !r.failed.is_empty() {
        let f: Vec<String> = r.failed.iter().map(|(m, w)| format!("{m}: {w}")).collect();
        detail.push_str(&format!("; failed: {}", f.join("; ")));
    }
    ev.detail = Some(detail);
    ev
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::declaration::{Expected, Source};
    use std::collections::HashSet;

    struct Fake(HashSet<&'static str>);
    impl ModuleState for Fake {
        fn present(&self, name: &str) -> Option<bool> {
            Some(self.0.contains(name))
        }
    }

    fn decl(v: &[u8]) -> Declaration {
        Declaration {
            declared: true,
            expected: Expected::parse(v),
            source: Source::Environ(42),
            overridden: Vec::new(),
        }
    }

    fn subject(c: &Container) -> Subject<'_> {
        Subject {
            container: c,
            cgroup_id: 7,
            cgroup_path: Some("/docker/x"),
        }
    }

    #[test]
    fn expectation_lists_missing_and_bad_entries() {
        let clock = Clock::new();
        let c = Container {
            id: "x".into(),
            runtime: "docker".into(),
            ..Container::default()
        };
        let live = Fake(HashSet::from(["ip_vs"]));
        let d = decl(b"ip_vs,ip_vs_wrr,a b");
        let m = missing(&d, &live);
        assert_eq!(m, vec!["ip_vs_wrr"]);
        let ev = expectation_event(&subject(&c), &d, &m, &clock).unwrap();
        assert_eq!(ev.kind, Kind::Expectation);
        assert_eq!(ev.modules, vec!["ip_vs_wrr"]);
        assert_eq!(ev.container.as_ref(), Some(&c));
        assert_eq!(ev.cgroup_id, 7);
        let detail = ev.detail.unwrap();
        assert!(detail.contains("not loaded: ip_vs_wrr"), "{detail}");
        assert!(detail.contains("/proc/42/environ"), "{detail}");
        assert!(detail.contains("\"a b\""), "{detail}");
        // All present, no bad entries: nothing to say.
        let d = decl(b"ip_vs");
        assert!(expectation_event(&subject(&c), &d, &missing(&d, &live), &clock).is_none());
        // Only a bad entry: still said.
        let d = decl(b"ip_vs,../x");
        let ev = expectation_event(&subject(&c), &d, &missing(&d, &live), &clock).unwrap();
        assert!(ev.modules.is_empty());
        assert!(ev.detail.unwrap().contains("../x"));
        // Nothing declared: nothing to say.
        let mut d = decl(b"");
        d.declared = false;
        assert!(expectation_event(&subject(&c), &d, &[], &clock).is_none());
    }

    #[test]
    fn unknown_presence_is_not_missing_and_builtins_are_present() {
        struct Unknown;
        impl ModuleState for Unknown {
            fn present(&self, _: &str) -> Option<bool> {
                None
            }
        }
        assert!(missing(&decl(b"ip_vs"), &Unknown).is_empty());
        let files = crate::host::moddb::DepmodFiles {
            dep: "kernel/ip_vs.ko:\n".into(),
            builtin: Some("kernel/net/unix.ko\n".into()),
            ..Default::default()
        };
        let db = ModDb::parse("test", &files);
        let live = Live {
            state: Some(LiveState {
                loaded: crate::host::moddb::Loaded::NoModuleSupport,
                sysfs: None,
            }),
            db: Some(&db),
        };
        assert_eq!(missing(&decl(b"unix,ip_vs"), &live), vec!["ip_vs"]);
    }

    #[test]
    fn self_load_names_what_loaded_and_what_failed() {
        let clock = Clock::new();
        let c = Container::default();
        let r = LoadResult {
            key: "x".into(),
            loaded: vec!["ip_vs".into()],
            failed: vec![(
                "nope".into(),
                "modprobe: FATAL: Module nope not found".into(),
            )],
            declared_in: "KERNEL_MODULES".into(),
        };
        let ev = self_load_event(&subject(&c), &r, &clock);
        assert_eq!(ev.kind, Kind::SelfLoad);
        assert_eq!(ev.modules, vec!["ip_vs"]);
        assert!(ev.detail.unwrap().contains("nope: modprobe: FATAL"));
    }
}
