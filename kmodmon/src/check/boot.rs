//! What is meant to load at boot, gathered the way systemd-modules-load does it: the
//! modules-load.d directories, `modules-load=` / `rd.modules-load=` on the kernel command
//! line, plus /etc/modules, whose lines count only when something reads it (see [`super::init`]).
use serde::Serialize;

use super::Warning;
use super::cmdline::{KernelCmdline, PROC_CMDLINE};
use super::conf::{self, ConfFile, FileState};
use super::early::{self, Generator};
use super::init::{self, ETC_MODULES, EtcModulesReader, InitInfo};
use super::legacy::{self, LegacyLoader, LegacyScript};
use crate::escape::escape_bytes;
use crate::host::moddb::RootFs;
use crate::modname;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A `*.conf` file of a modules-load.d directory.
    ModulesLoadD,
    /// `modules-load=` or `rd.modules-load=` on the kernel command line.
    KernelCmdline,
    /// /etc/modules, read directly (not through a modules-load.d link).
    EtcModules,
    /// A `modprobe`/`insmod` line of an /etc/sysconfig/modules/*.modules script (RHEL family).
    SysconfigModules,
    /// A `modprobe`/`insmod` line of /etc/rc.modules (RHEL family).
    RcModules,
    /// /etc/initramfs-tools/modules (must be in the initramfs).
    InitramfsTools,
    /// dracut.conf(.d) `add_drivers`/`force_drivers` (must be in the initramfs).
    DracutConf,
}

/// Where a module is configured to load at boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Source {
    pub kind: SourceKind,
    /// Logical path of the file, or /proc/cmdline.
    pub path: String,
    /// Where the file's symlinks lead, when that differs from `path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// The kernel command line key (`modules-load`, `rd.modules-load`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Whether this line is acted on at boot.
    pub read_at_boot: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Source {
    /// "/etc/modules-load.d/k8s.conf:3", "/etc/modules-load.d/modules.conf -> /etc/modules:2",
    /// "kernel command line modules-load=".
    pub fn describe(&self) -> String {
        if let Some(key) = &self.key
            && self.kind == SourceKind::KernelCmdline
        {
            return if self.path == PROC_CMDLINE {
                format!("kernel command line {key}=")
            } else {
                format!("{key}= on the command line of {}", self.path)
            };
        }
        let mut out = self.path.clone();
        if let Some(target) = &self.target {
            out.push_str(" -> ");
            out.push_str(target);
        }
        if let Some(line) = self.line {
            out.push_str(&format!(":{line}"));
        }
        if let Some(key) = &self.key {
            out.push_str(&format!(" ({key})"));
        }
        out
    }
}

/// One module request configured for boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// The name or alias as configured, normalised.
    pub request: String,
    pub source: Source,
}

/// /etc/modules and whether it counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EtcModules {
    pub path: &'static str,
    pub exists: bool,
    /// Module lines in it.
    pub entries: usize,
    #[serde(flatten)]
    pub reader: EtcModulesReader,
}

/// The RHEL family's legacy scripts and whether they run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Legacy {
    #[serde(flatten)]
    pub loader: LegacyLoader,
    pub scripts: Vec<LegacyScript>,
}

#[derive(Clone, Debug)]
pub struct BootConfig {
    pub init: InitInfo,
    pub legacy: Legacy,
    /// The tool that builds the initramfs, and why that is believed.
    pub initramfs_generator: (Generator, String),
    pub modules_load: Vec<ConfFile>,
    pub etc_modules: EtcModules,
    /// Whether a kernel command line was found (not on an offline root).
    pub cmdline_read: bool,
    pub entries: Vec<BootEntry>,
    pub warnings: Vec<Warning>,
}

impl BootConfig {
    pub fn read(root: &RootFs, cmdline: Option<&KernelCmdline>) -> std::io::Result<BootConfig> {
        let modules_load = conf::collect(root, &conf::MODULES_LOAD_DIRS, true)?;
        let init = init::detect_init(root, cmdline);
        let reader = init::etc_modules_reader(root, &init, &modules_load);
        let legacy = Legacy {
            loader: legacy::loader(root, &init),
            scripts: legacy::scripts(root),
        };
        let mut cfg = BootConfig {
            init,
            legacy,
            initramfs_generator: early::detect_generator(root),
            etc_modules: EtcModules {
                path: ETC_MODULES,
                exists: false,
                entries: 0,
                reader,
            },
            modules_load,
            cmdline_read: cmdline.is_some(),
            entries: Vec::new(),
            warnings: Vec::new(),
        };
        for file in cfg
            .modules_load
            .clone()
            .iter()
            .filter(|f| f.state == FileState::Used)
        {
            match root.read_text(file.read_path()) {
                Ok(Some(text)) => cfg.add_modules_load_file(file, &text),
                Ok(None) => cfg.warnings.push(Warning::at(
                    &file.path,
                    None,
                    "dangling symlink: nothing is read".into(),
                )),
                Err(e) => {
                    cfg.warnings
                        .push(Warning::at(&file.path, None, format!("cannot read: {e}")))
                }
            }
        }
        match root.read_text(ETC_MODULES) {
            Ok(Some(text)) => {
                cfg.etc_modules.exists = true;
                cfg.etc_modules.entries = conf::list_lines(&text).count();
                let via_link = cfg
                    .entries
                    .iter()
                    .any(|e| e.source.target.as_deref() == Some(ETC_MODULES));
                if !via_link {
                    cfg.add_etc_modules(&text);
                }
            }
            Ok(None) => {}
            Err(e) => {
                cfg.warnings
                    .push(Warning::at(ETC_MODULES, None, format!("cannot read: {e}")))
            }
        }
        for script in cfg.legacy.scripts.clone() {
            cfg.add_legacy_script(root, &script);
        }
        if let Some(cmdline) = cmdline {
            let dracut = cfg.initramfs_generator.0 == Generator::Dracut;
            let not_dracut = format!(
                "read by dracut's initramfs, which this system does not use ({})",
                cfg.initramfs_generator.1
            );
            for key in [
                "modules-load",
                "rd.modules-load",
                "rd.driver.pre",
                "rd.driver.post",
            ] {
                let by_dracut = key.starts_with("rd.driver");
                for request in cmdline.list(key) {
                    let source = Source {
                        kind: SourceKind::KernelCmdline,
                        path: PROC_CMDLINE.into(),
                        target: None,
                        line: None,
                        key: Some(key.into()),
                        read_at_boot: !by_dracut || dracut,
                        note: (by_dracut && !dracut).then(|| not_dracut.clone()),
                    };
                    cfg.add(&request, source);
                }
            }
        }
        Ok(cfg)
    }

    /// The modules a legacy script loads; they count when the loader runs and the script is
    /// executable.
    fn add_legacy_script(&mut self, root: &RootFs, script: &LegacyScript) {
        let text = match root.read_text(&script.path) {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(e) => {
                self.warnings.push(Warning::at(
                    &escape_bytes(script.path.as_bytes()),
                    None,
                    format!("cannot read: {e}"),
                ));
                return;
            }
        };
        let kind = if script.path == legacy::RC_MODULES {
            SourceKind::RcModules
        } else {
            SourceKind::SysconfigModules
        };
        let path = escape_bytes(script.path.as_bytes());
        let (found, unclear) = legacy::modules_in_script(&text);
        for (line, reason) in unclear {
            self.warnings.push(Warning::at(&path, Some(line), reason));
        }
        let loader = &self.legacy.loader;
        let note = if !loader.read_at_boot {
            Some(loader.why.clone())
        } else if !script.executable {
            Some(format!(
                "{} runs only executable scripts and this one is not: chmod +x {path}",
                loader.read_by.as_deref().unwrap_or("the loader")
            ))
        } else {
            None
        };
        for (line, request) in found {
            let source = Source {
                kind,
                path: path.clone(),
                target: None,
                line: Some(line),
                key: None,
                read_at_boot: note.is_none(),
                note: note.clone(),
            };
            self.add(&request, source);
        }
    }

    /// Lines of a modules-load.d file: each whole line is one module name or alias.
    fn add_modules_load_file(&mut self, file: &ConfFile, text: &str) {
        for (line, request) in conf::list_lines(text) {
            let mut source = Source {
                kind: SourceKind::ModulesLoadD,
                path: file.path.clone(),
                target: file.target.clone(),
                line: Some(line),
                key: None,
                read_at_boot: true,
                note: None,
            };
            let first = request.split_whitespace().next().unwrap_or_default();
            if first != request && modname::validate(first).is_ok() {
                // Debian's /etc/modules allows "name params"; systemd does not.
                source.read_at_boot = false;
                source.note = Some(format!(
                    "systemd-modules-load takes the whole line \"{}\" as a module name and fails; \
                     put the parameters in /etc/modprobe.d/*.conf as \"options {first} ...\"",
                    escape_bytes(request.as_bytes())
                ));
                self.add(first, source);
            } else {
                self.add(request, source);
            }
        }
    }

    /// /etc/modules read by an init script (or by nothing): "name [parameters]" per line.
    fn add_etc_modules(&mut self, text: &str) {
        for (line, content) in conf::list_lines(text) {
            let request = content.split_whitespace().next().unwrap_or_default();
            let source = Source {
                kind: SourceKind::EtcModules,
                path: ETC_MODULES.into(),
                target: None,
                line: Some(line),
                key: None,
                read_at_boot: self.etc_modules.reader.read_at_boot,
                note: None,
            };
            self.add(request, source);
        }
    }

    fn add(&mut self, request: &str, source: Source) {
        match modname::validate(request) {
            Ok(name) => self.entries.push(BootEntry {
                request: name,
                source,
            }),
            Err(e) => {
                let message = format!(
                    "not a module name, ignored at boot: {}",
                    escape_bytes(e.to_string().as_bytes())
                );
                let path = if source.key.is_some() {
                    PROC_CMDLINE.to_string()
                } else {
                    source.path.clone()
                };
                self.warnings.push(Warning::at(&path, source.line, message));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    use crate::check::tests::write;

    fn systemd_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "/lib/systemd/systemd", "");
        std::fs::create_dir_all(dir.path().join("sbin")).unwrap();
        symlink("/lib/systemd/systemd", dir.path().join("sbin/init")).unwrap();
        dir
    }

    fn requests(cfg: &BootConfig) -> Vec<(String, String, bool)> {
        cfg.entries
            .iter()
            .map(|e| {
                (
                    e.request.clone(),
                    e.source.describe(),
                    e.source.read_at_boot,
                )
            })
            .collect()
    }

    #[test]
    fn etc_modules_is_ignored_on_a_systemd_host_without_the_link() {
        let dir = systemd_root();
        let d = dir.path();
        write(
            d,
            "/etc/modules",
            "# /etc/modules\niptable_nat\niptable_filter\n",
        );
        write(
            d,
            "/etc/modules-load.d/k8s.conf",
            "; containers\nbr_netfilter\noverlay\n",
        );
        let cfg = BootConfig::read(&RootFs::new(d), None).unwrap();
        assert!(!cfg.etc_modules.reader.read_at_boot);
        assert_eq!(cfg.etc_modules.entries, 2);
        assert_eq!(
            requests(&cfg),
            vec![
                (
                    "br_netfilter".into(),
                    "/etc/modules-load.d/k8s.conf:2".into(),
                    true
                ),
                (
                    "overlay".into(),
                    "/etc/modules-load.d/k8s.conf:3".into(),
                    true
                ),
                ("iptable_nat".into(), "/etc/modules:2".into(), false),
                ("iptable_filter".into(), "/etc/modules:3".into(), false),
            ]
        );
    }

    #[test]
    fn etc_modules_through_the_debian_link_counts_once() {
        let dir = systemd_root();
        let d = dir.path();
        write(d, "/etc/modules", "loop max_loop=8\niptable-nat\n");
        std::fs::create_dir_all(d.join("etc/modules-load.d")).unwrap();
        symlink("../modules", d.join("etc/modules-load.d/modules.conf")).unwrap();
        let cmdline =
            KernelCmdline::parse("ro modules-load=ip_vs rd.modules-load=dm_crypt,bad/name");
        let cfg = BootConfig::read(&RootFs::new(d), Some(&cmdline)).unwrap();
        assert!(cfg.etc_modules.reader.read_at_boot);
        assert_eq!(
            requests(&cfg),
            vec![
                (
                    "loop".into(),
                    "/etc/modules-load.d/modules.conf -> /etc/modules:1".into(),
                    false
                ),
                (
                    "iptable_nat".into(),
                    "/etc/modules-load.d/modules.conf -> /etc/modules:2".into(),
                    true
                ),
                (
                    "ip_vs".into(),
                    "kernel command line modules-load=".into(),
                    true
                ),
                (
                    "dm_crypt".into(),
                    "kernel command line rd.modules-load=".into(),
                    true
                ),
            ]
        );
        assert!(
            cfg.entries[0]
                .source
                .note
                .as_deref()
                .unwrap_or_default()
                .contains("options loop")
        );
        assert_eq!(cfg.warnings.len(), 1);
        assert_eq!(cfg.warnings[0].path.as_deref(), Some("/proc/cmdline"));
    }
}
