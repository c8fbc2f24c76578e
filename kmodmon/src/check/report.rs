//! The check's result: one [`Report`], printed for people or as JSON (README "kmodmon check").
use std::fmt::Write as _;

use serde::Serialize;

use super::analyze::{ModuleReport, Status};
use super::boot::{BootConfig, EtcModules, Legacy};
use super::conf::ConfFile;
use super::containers::ContainerInputs;
use super::init::InitInfo;
use super::modprobe::ModprobeConfig;
use super::nextboot::NextBoot;
use super::{KernelChoice, Warning};
use crate::host::moddb::{LiveState, Loaded, ModDb, RootFs};

#[derive(Clone, Debug, Serialize)]
pub struct KernelInfo {
    pub version: Option<String>,
    pub chosen_by: KernelChoice,
    /// Logical path of /lib/modules/VERSION, when found.
    pub modules_dir: Option<String>,
    /// Loadable modules in modules.dep.
    pub modules: Option<usize>,
    /// Entries of modules.builtin.
    pub builtin: Option<usize>,
    /// Why the module database could not be read.
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadedSource {
    ProcModules,
    NoModuleSupport,
    Unknown,
}

#[derive(Clone, Debug, Serialize)]
pub struct LoadedInfo {
    pub source: LoadedSource,
    pub count: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ContainersInfo {
    pub source: String,
    pub running: usize,
    pub expecting_modules: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub ok: usize,
    pub missing: usize,
    pub will_not_load_at_boot: usize,
    pub blacklisted: usize,
    pub not_available: usize,
    pub loaded_unconfigured: usize,
    /// Modules with a problem status: non-zero makes the exit status 1.
    pub problems: usize,
}

impl Summary {
    fn count(modules: &[ModuleReport]) -> Summary {
        let mut s = Summary::default();
        for m in modules {
            *match m.status {
                Status::Ok => &mut s.ok,
                Status::Missing => &mut s.missing,
                Status::WillNotLoadAtBoot => &mut s.will_not_load_at_boot,
                Status::Blacklisted => &mut s.blacklisted,
                Status::NotAvailable => &mut s.not_available,
                Status::LoadedUnconfigured => &mut s.loaded_unconfigured,
            } += 1;
            s.problems += usize::from(m.problem);
        }
        s
    }

    fn get(&self, status: Status) -> usize {
        match status {
            Status::Ok => self.ok,
            Status::Missing => self.missing,
            Status::WillNotLoadAtBoot => self.will_not_load_at_boot,
            Status::Blacklisted => self.blacklisted,
            Status::NotAvailable => self.not_available,
            Status::LoadedUnconfigured => self.loaded_unconfigured,
        }
    }

    /// "2 problems (2 will_not_load_at_boot); 3 ok" or "no problems; 3 ok".
    pub fn sentence(&self) -> String {
        let problems: Vec<String> = Status::ALL
            .iter()
            .filter(|s| s.is_problem() && self.get(**s) > 0)
            .map(|s| format!("{} {}", self.get(*s), s.as_str()))
            .collect();
        let head = match self.problems {
            0 => "no problems".to_string(),
            1 => format!("1 problem ({})", problems.join(", ")),
            n => format!("{n} problems ({})", problems.join(", ")),
        };
        format!(
            "{head}; {} ok, {} loaded_unconfigured",
            self.ok, self.loaded_unconfigured
        )
    }
}

/// What `--fix` did (written by [`super::fix`], which depends on this module, not the reverse).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FixSummary {
    pub path: String,
    pub added: Vec<String>,
    pub written: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The directory checked as `/`.
    pub root: String,
    pub kernel: KernelInfo,
    pub loaded: LoadedInfo,
    pub init: InitInfo,
    pub etc_modules: EtcModules,
    /// RHEL-family /etc/sysconfig/modules/*.modules and /etc/rc.modules, and what runs them.
    pub legacy_scripts: Legacy,
    /// Whether a kernel command line was read (ROOT/proc/cmdline).
    pub kernel_cmdline: bool,
    pub modules_load_d: Vec<ConfFile>,
    pub modprobe_d: Vec<ConfFile>,
    pub containers: ContainersInfo,
    pub modules: Vec<ModuleReport>,
    pub warnings: Vec<Warning>,
    pub summary: Summary,
    /// The reboot question (README "kmodmon check", next boot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_boot: Option<NextBoot>,
    /// With --all-kernels: the same judgement for every installed kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_kernels: Option<Vec<NextBoot>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<FixSummary>,
}

/// What [`Report::new`] is built from.
pub struct Parts<'a> {
    pub root: &'a RootFs,
    pub kernel: Option<String>,
    pub choice: KernelChoice,
    pub db: &'a Result<ModDb, String>,
    pub live: &'a LiveState,
    pub boot: BootConfig,
    pub modprobe: ModprobeConfig,
    pub containers: ContainerInputs,
    pub modules: Vec<ModuleReport>,
    pub next_boot: Option<NextBoot>,
    pub all_kernels: Option<Vec<NextBoot>>,
}

impl Report {
    pub fn new(p: Parts) -> Report {
        let (source, count) = match &p.live.loaded {
            Loaded::Known(map) => (LoadedSource::ProcModules, Some(map.len())),
            Loaded::NoModuleSupport => (LoadedSource::NoModuleSupport, Some(0)),
            Loaded::Unknown => (LoadedSource::Unknown, None),
        };
        let mut warnings = p.boot.warnings;
        warnings.extend(p.modprobe.warnings);
        warnings.extend(p.containers.warnings);
        if let Ok(db) = p.db
            && db.skipped_lines() > 0
        {
            warnings.push(Warning::at(
                &db.dir().display().to_string(),
                None,
                format!(
                    "{} lines of the depmod files were not understood and were skipped",
                    db.skipped_lines()
                ),
            ));
        }
        Report {
            root: p.root.dir().display().to_string(),
            kernel: KernelInfo {
                version: p.kernel.map(|k| crate::escape::escape_bytes(k.as_bytes())),
                chosen_by: p.choice,
                modules_dir: p.db.as_ref().ok().map(|db| db.dir().display().to_string()),
                modules: p.db.as_ref().ok().map(ModDb::module_count),
                builtin: p.db.as_ref().ok().map(ModDb::builtin_count),
                error: p.db.as_ref().err().cloned(),
            },
            loaded: LoadedInfo { source, count },
            init: p.boot.init,
            etc_modules: p.boot.etc_modules,
            legacy_scripts: p.boot.legacy,
            kernel_cmdline: p.boot.cmdline_read,
            modules_load_d: p.boot.modules_load,
            modprobe_d: p.modprobe.files,
            containers: ContainersInfo {
                source: p.containers.source,
                running: p.containers.running,
                expecting_modules: p.containers.list.len(),
            },
            summary: Summary::count(&p.modules),
            modules: p.modules,
            warnings,
            next_boot: p.next_boot,
            all_kernels: p.all_kernels,
            fix: None,
        }
    }

    /// Problems at the next boot, and with --all-kernels with any installed kernel.
    pub fn next_boot_problems(&self) -> usize {
        self.next_boot.as_ref().map_or(0, |n| n.summary.problems)
            + self
                .all_kernels
                .iter()
                .flatten()
                .filter(|n| !n.kernel.boots_next)
                .map(|n| n.summary.problems)
                .sum::<usize>()
    }

    /// `--next-boot --json`: the root, the next boot and, with --all-kernels, every kernel.
    pub fn next_boot_json(&self) -> String {
        let v = serde_json::json!({
            "root": self.root,
            "next_boot": self.next_boot,
            "all_kernels": self.all_kernels,
        });
        serde_json::to_string_pretty(&v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The next-boot sections for people.
    pub fn next_boot_human(&self) -> String {
        let mut o = String::new();
        if let Some(n) = &self.next_boot {
            o.push_str(&n.human("Next boot"));
        }
        for k in self
            .all_kernels
            .iter()
            .flatten()
            .filter(|k| !k.kernel.boots_next)
        {
            o.push('\n');
            o.push_str(&k.human(&format!(
                "Installed kernel {}",
                k.kernel.kernel.version.as_deref().unwrap_or("?")
            )));
        }
        o
    }

    pub fn with_fix(mut self, fix: FixSummary) -> Report {
        self.fix = Some(fix);
        self
    }

    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The human report. Every string from files was escaped or validated on the way in.
    pub fn human(&self) -> String {
        let mut o = String::new();
        let kernel = self.kernel.version.as_deref().unwrap_or("(none found)");
        let _ = writeln!(o, "kmodmon check: root {}, kernel {kernel}", self.root);
        let db = match (&self.kernel.modules_dir, &self.kernel.error) {
            (Some(dir), _) => format!(
                "{dir} ({} modules, {} built in)",
                self.kernel.modules.unwrap_or(0),
                self.kernel.builtin.unwrap_or(0)
            ),
            (None, Some(err)) => format!("none: {err}"),
            (None, None) => "none".into(),
        };
        let _ = writeln!(o, "  modules:      {db}");
        let loaded = match self.loaded.source {
            LoadedSource::ProcModules => format!("{} loaded (/proc/modules)", self.loaded.count.unwrap_or(0)),
            LoadedSource::NoModuleSupport => {
                "none: /proc/modules does not exist, this kernel has no loadable-module support (CONFIG_MODULES=n); \
                 only built-in modules exist"
                    .into()
            }
            LoadedSource::Unknown => "unknown (no /proc/modules under the root)".into(),
        };
        let _ = writeln!(o, "  loaded now:   {loaded}");
        let used = self
            .modules_load_d
            .iter()
            .filter(|f| f.state == super::conf::FileState::Used)
            .count();
        let cmdline = if self.kernel_cmdline {
            "kernel command line"
        } else {
            "no kernel command line (offline root)"
        };
        let files = if used == 1 { "file" } else { "files" };
        let _ = writeln!(
            o,
            "  init:         {} ({})",
            self.init.system.as_str(),
            self.init.evidence
        );
        let _ = writeln!(
            o,
            "  boot config:  {used} {files} in modules-load.d, {cmdline}"
        );
        let em = &self.etc_modules;
        let etc = if !em.exists {
            "absent".to_string()
        } else if em.reader.read_at_boot {
            format!(
                "read at boot ({})",
                em.reader.read_by.as_deref().unwrap_or("?")
            )
        } else {
            format!("NOT read at boot: {}", em.reader.why)
        };
        let _ = writeln!(o, "  /etc/modules: {etc}");
        let containers = if self.containers.source.starts_with("not checked") {
            self.containers.source.clone()
        } else {
            format!(
                "{} running, {} declaring KERNEL_MODULES (from {})",
                self.containers.running, self.containers.expecting_modules, self.containers.source
            )
        };
        let _ = writeln!(o, "  containers:   {containers}");
        o.push('\n');

        let expected: Vec<&ModuleReport> = self
            .modules
            .iter()
            .filter(|m| m.status != Status::LoadedUnconfigured)
            .collect();
        if expected.is_empty() {
            o.push_str("No module is configured to load at boot or expected by a container.\n");
        } else {
            let w_status = expected
                .iter()
                .map(|m| m.status.as_str().len())
                .max()
                .unwrap_or(6)
                .max(6);
            let w_mod = expected
                .iter()
                .map(|m| m.module.len())
                .max()
                .unwrap_or(6)
                .max(6);
            let _ = writeln!(o, "{:<w_status$}  {:<w_mod$}  WHY", "STATUS", "MODULE");
            for m in &expected {
                let _ = writeln!(
                    o,
                    "{:<w_status$}  {:<w_mod$}  {}",
                    m.status.as_str(),
                    m.module,
                    m.detail
                );
            }
        }
        let unconfigured: Vec<&str> = self
            .modules
            .iter()
            .filter(|m| m.status == Status::LoadedUnconfigured)
            .map(|m| m.module.as_str())
            .collect();
        if !unconfigured.is_empty() {
            let _ = writeln!(
                o,
                "\nloaded_unconfigured ({}): loaded, but no boot configuration or container asks for them:\n  {}",
                unconfigured.len(),
                unconfigured.join(" ")
            );
        }
        if !self.warnings.is_empty() {
            o.push_str("\nWarnings:\n");
            for w in &self.warnings {
                let at = match (&w.path, w.line) {
                    (Some(p), Some(l)) => format!("{p}:{l}: "),
                    (Some(p), None) => format!("{p}: "),
                    _ => String::new(),
                };
                let _ = writeln!(o, "  {at}{}", w.message);
            }
        }
        let next = self.next_boot_human();
        if !next.is_empty() {
            o.push('\n');
            o.push_str(&next);
        }
        let _ = writeln!(o, "\nResult: {}", self.summary.sentence());
        if let Some(n) = &self.next_boot {
            let _ = writeln!(
                o,
                "Result at the next boot ({}): {}",
                n.kernel
                    .kernel
                    .version
                    .as_deref()
                    .unwrap_or("no kernel found"),
                n.summary.sentence()
            );
        }
        if self.modules.iter().any(|m| m.fixable) {
            let names: Vec<&str> = self
                .modules
                .iter()
                .filter(|m| m.fixable)
                .map(|m| m.module.as_str())
                .collect();
            let _ = writeln!(
                o,
                "Not configured to load at boot: {}. `kmodmon check --fix` adds them to /etc/modules-load.d/kmodmon.conf.",
                names.join(", ")
            );
        }
        o
    }
}
