//! The comparison: each module that is meant to be there (configured for boot, or expected by
//! a running container) against what is loaded, built in, available and blocked; then the
//! loaded modules nobody asked for.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::boot::{BootEntry, Source};
use super::containers::ContainerExpectation;
use super::modprobe::{Blocker, ModprobeConfig};
use crate::host::moddb::{LiveState, Loaded, ModDb};
use crate::modname;

/// Per-module verdict. Ordered from most to least severe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Expected, but this kernel has no such module (not in modules.dep, aliases or built-ins).
    NotAvailable,
    /// Expected, but modprobe.d or the kernel command line blocks it.
    Blacklisted,
    /// Configured only in a place nothing reads at boot (e.g. /etc/modules on systemd).
    WillNotLoadAtBoot,
    /// Expected and available, but not loaded now.
    Missing,
    /// Loaded (or built in), and configured where it is read.
    Ok,
    /// Loaded, but no configuration or container asks for it (informational).
    LoadedUnconfigured,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::NotAvailable,
        Status::Blacklisted,
        Status::WillNotLoadAtBoot,
        Status::Missing,
        Status::Ok,
        Status::LoadedUnconfigured,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::NotAvailable => "not_available",
            Status::Blacklisted => "blacklisted",
            Status::WillNotLoadAtBoot => "will_not_load_at_boot",
            Status::Missing => "missing",
            Status::Ok => "ok",
            Status::LoadedUnconfigured => "loaded_unconfigured",
        }
    }

    /// Whether this status makes the check fail (non-zero exit).
    pub fn is_problem(self) -> bool {
        !matches!(self, Status::Ok | Status::LoadedUnconfigured)
    }
}

/// A container, as shown in a module's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContainerRef {
    pub id: String,
    pub runtime: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModuleReport {
    /// The module name or alias as configured (normalised).
    pub module: String,
    pub status: Status,
    pub problem: bool,
    /// Loaded now; null when that cannot be known (offline root without /proc/modules).
    pub loaded: Option<bool>,
    pub builtin: bool,
    /// This kernel has it (loadable, built in, or loaded).
    pub available: bool,
    /// The modules the name or alias resolves to.
    pub resolved: Vec<String>,
    /// Configured in a place that is read at boot.
    pub configured_at_boot: bool,
    pub sources: Vec<Source>,
    pub containers: Vec<ContainerRef>,
    pub blocked_by: Vec<Blocker>,
    /// `--fix` would add it to /etc/modules-load.d/kmodmon.conf.
    pub fixable: bool,
    /// One sentence: why this status, what to do.
    pub detail: String,
}

/// Everything the comparison needs.
pub struct Inputs<'a> {
    pub boot: &'a [BootEntry],
    pub containers: &'a [ContainerExpectation],
    pub modprobe: &'a ModprobeConfig,
    pub db: Option<&'a ModDb>,
    pub live: &'a LiveState,
    /// Kernel version, for messages.
    pub kernel: &'a str,
}

/// Compares; the result is sorted by status (most severe first), then name.
pub fn analyze(inp: &Inputs) -> Vec<ModuleReport> {
    #[derive(Default)]
    struct Wanted {
        sources: Vec<Source>,
        containers: Vec<ContainerRef>,
    }
    let mut wanted: BTreeMap<String, Wanted> = BTreeMap::new();
    for entry in inp.boot {
        wanted
            .entry(entry.request.clone())
            .or_default()
            .sources
            .push(entry.source.clone());
    }
    for c in inp.containers {
        for m in &c.modules {
            let r = ContainerRef {
                id: c.container_id.clone(),
                runtime: c.runtime.clone(),
                name: c.name.clone(),
            };
            let w = wanted.entry(modname::normalize(m)).or_default();
            if !w.containers.contains(&r) {
                w.containers.push(r);
            }
        }
    }

    let mut out = Vec::new();
    let mut covered: BTreeSet<String> = BTreeSet::new();
    for (name, w) in wanted {
        let report = judge(inp, name, w.sources, w.containers);
        for m in &report.resolved {
            covered.insert(m.clone());
            if let Some(db) = inp.db {
                covered.extend(db.deps_of(m));
                if let Some(sd) = db.softdep(m) {
                    covered.extend(sd.pre.iter().chain(&sd.post).cloned());
                }
            }
        }
        out.push(report);
    }
    out.extend(unconfigured(inp, &covered));
    out.sort_by(|a, b| {
        a.status
            .cmp(&b.status)
            .then_with(|| a.module.cmp(&b.module))
    });
    out
}

fn judge(
    inp: &Inputs,
    name: String,
    sources: Vec<Source>,
    containers: Vec<ContainerRef>,
) -> ModuleReport {
    // kmod's order: modprobe.d aliases, then the kernel's own names and aliases.
    let mut resolved = inp.modprobe.resolve_alias(&name);
    if resolved.is_empty()
        && let Some(db) = inp.db
    {
        resolved = db.resolve_alias(&name);
    }
    if resolved.is_empty()
        && (inp.live.is_loaded(&name) == Some(true) || inp.live.is_builtin(&name))
    {
        resolved = vec![name.clone()];
    }
    let is_builtin = |m: &str| inp.db.is_some_and(|db| db.is_builtin(m)) || inp.live.is_builtin(m);
    let builtin = !resolved.is_empty() && resolved.iter().all(|m| is_builtin(m));
    let loaded: Option<bool> = if resolved.is_empty() {
        inp.live.is_loaded(&name)
    } else {
        resolved
            .iter()
            .filter(|m| !is_builtin(m))
            .try_fold(true, |all, m| inp.live.is_loaded(m).map(|l| all && l))
    };
    let available = builtin
        || loaded == Some(true)
        || (!resolved.is_empty()
            && resolved
                .iter()
                .all(|m| is_builtin(m) || inp.db.is_some_and(|db| db.contains(m))));

    let mut blocked_by: Vec<Blocker> = Vec::new();
    for m in std::iter::once(&name).chain(&resolved) {
        for b in inp.modprobe.blockers(m) {
            if !blocked_by.contains(b) {
                blocked_by.push(b.clone());
            }
        }
    }
    let configured_at_boot = sources.iter().any(|s| s.read_at_boot);
    let has_boot_config = !sources.is_empty();
    let wanted_by = describe_wanted(&sources, &containers);

    let (status, detail) = if builtin {
        (
            Status::Ok,
            format!("built into kernel {}; {wanted_by}", inp.kernel),
        )
    } else if !available {
        (Status::NotAvailable, not_available_detail(inp, &wanted_by))
    } else if !blocked_by.is_empty() {
        let rules: Vec<String> = blocked_by.iter().map(describe_blocker).collect();
        (
            Status::Blacklisted,
            format!(
                "{wanted_by}, but blocked by {}: remove that rule, or stop expecting it",
                rules.join(", ")
            ),
        )
    } else if has_boot_config && !configured_at_boot {
        let places: Vec<String> = sources.iter().map(Source::describe).collect();
        let now = if loaded == Some(true) {
            "loaded now, but "
        } else {
            ""
        };
        let also = if containers.is_empty() {
            String::new()
        } else {
            format!("; also expected by {}", describe_containers(&containers))
        };
        let detail = match sources.iter().find_map(|s| s.note.clone()) {
            Some(note) => format!(
                "{now}{}: {note}{also}; kmodmon check --fix lists the bare name in /etc/modules-load.d/kmodmon.conf",
                places.join(", ")
            ),
            None => format!(
                "{now}only in {}, which nothing reads at boot{also}; list it in /etc/modules-load.d/ (kmodmon check --fix)",
                places.join(", ")
            ),
        };
        (Status::WillNotLoadAtBoot, detail)
    } else if loaded == Some(false) {
        let hint = if configured_at_boot {
            format!(
                "load it now with `modprobe {name}`; if it failed at boot see `journalctl -b -u systemd-modules-load`"
            )
        } else {
            format!(
                "load it with `modprobe {name}` and list it in /etc/modules-load.d/ (kmodmon check --fix)"
            )
        };
        (
            Status::Missing,
            format!("{wanted_by}, not loaded now: {hint}"),
        )
    } else if loaded.is_none() {
        (
            Status::Ok,
            format!(
                "{wanted_by}; whether it is loaded is not known (no /proc/modules under the root)"
            ),
        )
    } else if !configured_at_boot {
        (
            Status::Ok,
            format!(
                "loaded; {wanted_by}, but not configured to load at boot (kmodmon check --fix adds it)"
            ),
        )
    } else {
        (Status::Ok, format!("loaded; {wanted_by}"))
    };
    let fixable = matches!(
        status,
        Status::WillNotLoadAtBoot | Status::Missing | Status::Ok
    ) && !builtin
        && !configured_at_boot;
    ModuleReport {
        problem: status.is_problem(),
        module: name,
        status,
        loaded,
        builtin,
        available,
        resolved,
        configured_at_boot,
        sources,
        containers,
        blocked_by,
        fixable,
        detail,
    }
}

/// "configured in /etc/modules:3 (not read at boot) and expected by container web (docker 3f2a…)".
fn describe_wanted(sources: &[Source], containers: &[ContainerRef]) -> String {
    let mut parts = Vec::new();
    if !sources.is_empty() {
        let list: Vec<String> = sources
            .iter()
            .map(|s| {
                if s.read_at_boot {
                    s.describe()
                } else {
                    format!("{} (not read at boot)", s.describe())
                }
            })
            .collect();
        parts.push(format!("configured in {}", list.join(", ")));
    }
    if !containers.is_empty() {
        parts.push(format!("expected by {}", describe_containers(containers)));
    }
    parts.join(" and ")
}

/// "container dind (docker 0f1e2d3c4b5a)", "containers a (runc a), b (runc b)".
fn describe_containers(containers: &[ContainerRef]) -> String {
    let list: Vec<String> = containers
        .iter()
        .map(|c| {
            let short: String = c.id.chars().take(12).collect();
            match &c.name {
                Some(n) if *n != c.id => format!("{n} ({} {short})", c.runtime),
                _ => format!("{} {short}", c.runtime),
            }
        })
        .collect();
    let noun = if containers.len() == 1 {
        "container"
    } else {
        "containers"
    };
    format!("{noun} {}", list.join(", "))
}

fn describe_blocker(b: &Blocker) -> String {
    match b.line {
        Some(line) => format!("\"{}\" ({}:{line})", b.rule, b.path),
        None => format!("\"{}\" ({})", b.rule, b.path),
    }
}

fn not_available_detail(inp: &Inputs, wanted_by: &str) -> String {
    let why = match (inp.db, &inp.live.loaded) {
        (_, Loaded::NoModuleSupport) => {
            format!(
                "kernel {} has no loadable-module support (no /proc/modules) and does not have it built in",
                inp.kernel
            )
        }
        (None, _) => format!(
            "kernel {} has no module directory, so no loadable modules",
            inp.kernel
        ),
        (Some(db), _) => format!(
            "kernel {} has no module or alias of that name (modules.dep, modules.alias, modules.builtin in {})",
            inp.kernel,
            db.dir().display()
        ),
    };
    format!("{wanted_by}, but {why}")
}

/// Loaded modules that nothing asks for and that no other loaded module needs.
fn unconfigured(inp: &Inputs, covered: &BTreeSet<String>) -> Vec<ModuleReport> {
    let Some(loaded) = inp.live.loaded_modules() else {
        return Vec::new();
    };
    let mut needed: BTreeSet<String> = BTreeSet::new();
    if let Some(db) = inp.db {
        for m in loaded.keys() {
            needed.extend(db.deps_of(m));
        }
    }
    loaded
        .values()
        .filter(|m| m.used_by.is_empty() && !covered.contains(&m.name) && !needed.contains(&m.name))
        .map(|m| ModuleReport {
            module: m.name.clone(),
            status: Status::LoadedUnconfigured,
            problem: false,
            loaded: Some(true),
            builtin: false,
            available: true,
            resolved: vec![m.name.clone()],
            configured_at_boot: false,
            sources: Vec::new(),
            containers: Vec::new(),
            blocked_by: inp.modprobe.blockers(&m.name).to_vec(),
            fixable: false,
            detail: "loaded, but no boot configuration or container asks for it (autoloaded by udev or a \
                     request, or loaded by hand)"
                .into(),
        })
        .collect()
}
