//! What must be in the initramfs: the modules the initramfs generator is told to include and
//! load early, and the kernel command line words that load modules from the initramfs.
//!
//! - initramfs-tools (Debian, Ubuntu): `/etc/initramfs-tools/modules`, one module per line
//!   (`name [parameters]`), copied into the image and loaded by its init.
//! - dracut (RHEL family, Fedora, SUSE, some Debian): `add_drivers`, `force_drivers` (loaded
//!   early, before udev) and `omit_drivers` in `/etc/dracut.conf` and `dracut.conf.d/*.conf`
//!   (`/etc` hides `/usr/lib` by name); `rd.driver.pre=` / `rd.driver.post=` /
//!   `rd.modules-load=` on the kernel command line load modules from the image, and
//!   `rd.driver.blacklist=` keeps them out of it.
use std::path::Path;

use serde::Serialize;

use super::Warning;
use super::boot::{Source, SourceKind};
use super::cmdline::KernelCmdline;
use super::conf;
use crate::escape::escape_bytes;
use crate::host::moddb::RootFs;
use crate::modname;

pub const INITRAMFS_TOOLS_MODULES: &str = "/etc/initramfs-tools/modules";
const DRACUT_CONF: &str = "/etc/dracut.conf";
const DRACUT_DIRS: [&str; 2] = ["/etc/dracut.conf.d", "/usr/lib/dracut/dracut.conf.d"];
const DRACUT_BINS: [&str; 3] = ["/usr/bin/dracut", "/usr/sbin/dracut", "/sbin/dracut"];
const MKINITRAMFS_BINS: [&str; 2] = ["/usr/sbin/mkinitramfs", "/sbin/mkinitramfs"];

/// Which tool builds the initramfs images.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Generator {
    Dracut,
    InitramfsTools,
    /// Neither is installed.
    None,
}

impl Generator {
    pub fn as_str(self) -> &'static str {
        match self {
            Generator::Dracut => "dracut",
            Generator::InitramfsTools => "initramfs-tools",
            Generator::None => "none",
        }
    }
}

/// The generator, and what that was decided from.
pub fn detect_generator(root: &RootFs) -> (Generator, String) {
    if let Some(bin) = DRACUT_BINS.iter().find(|b| root.exists(b)) {
        return (Generator::Dracut, format!("{bin} is installed"));
    }
    if let Some(bin) = MKINITRAMFS_BINS.iter().find(|b| root.exists(b)) {
        return (Generator::InitramfsTools, format!("{bin} is installed"));
    }
    if root.exists(DRACUT_CONF) || root.is_dir(DRACUT_DIRS[0]) {
        return (
            Generator::Dracut,
            format!("{DRACUT_CONF} or {} exists", DRACUT_DIRS[0]),
        );
    }
    if root.exists("/etc/initramfs-tools/initramfs.conf") {
        return (
            Generator::InitramfsTools,
            "/etc/initramfs-tools/initramfs.conf exists".into(),
        );
    }
    (
        Generator::None,
        "neither dracut nor initramfs-tools is installed".into(),
    )
}

/// A module that must be in the initramfs, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub module: String,
    pub source: Source,
}

/// A rule that keeps a module out of the initramfs or from loading there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Exclusion {
    /// "omit_drivers+=\" floppy \"", "rd.driver.blacklist=nouveau".
    pub rule: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// dracut's omit_drivers are regular expressions; the matched pattern.
    #[serde(skip)]
    pattern: String,
}

impl Exclusion {
    pub fn applies_to(&self, module: &str) -> bool {
        let m = modname::normalize(module);
        if self.rule.starts_with("omit_drivers") {
            // dracut matches omit_drivers as an extended regular expression against the
            // module name; plain names (the usual case) compare as names, `*` as a glob.
            let p = modname::normalize(&self.pattern);
            if p.contains(['*', '?', '[']) {
                crate::host::moddb::fnmatch(&p.replace(".*", "*"), &m)
            } else {
                p == m
            }
        } else {
            modname::normalize(&self.pattern) == m
        }
    }
}

#[derive(Clone, Debug)]
pub struct EarlyConfig {
    pub generator: Generator,
    pub evidence: String,
    pub required: Vec<Requirement>,
    pub exclusions: Vec<Exclusion>,
    pub warnings: Vec<Warning>,
}

impl EarlyConfig {
    /// Reads the generator's configuration and the command line that the next boot passes
    /// (`cmdline_origin` names where it came from).
    pub fn read(
        root: &RootFs,
        cmdline: Option<&KernelCmdline>,
        cmdline_origin: &str,
    ) -> EarlyConfig {
        let (generator, evidence) = detect_generator(root);
        let mut cfg = EarlyConfig {
            generator,
            evidence,
            required: Vec::new(),
            exclusions: Vec::new(),
            warnings: Vec::new(),
        };
        match root.read_text(INITRAMFS_TOOLS_MODULES) {
            Ok(Some(text)) => {
                let lines: Vec<(usize, String)> = text
                    .lines()
                    .enumerate()
                    .map(|(i, l)| (i + 1, l.trim().to_string()))
                    .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
                    .collect();
                if generator == Generator::InitramfsTools {
                    for (line, l) in lines {
                        let name = l.split_whitespace().next().unwrap_or_default();
                        cfg.require(
                            name,
                            SourceKind::InitramfsTools,
                            INITRAMFS_TOOLS_MODULES,
                            Some(line),
                            None,
                        );
                    }
                } else if !lines.is_empty() {
                    cfg.warnings.push(Warning::at(
                        INITRAMFS_TOOLS_MODULES,
                        None,
                        format!(
                            "read by nothing on this system: the initramfs is built by {} ({}), not initramfs-tools",
                            generator.as_str(),
                            cfg.evidence
                        ),
                    ));
                }
            }
            Ok(None) => {}
            Err(e) => cfg.warnings.push(Warning::at(
                INITRAMFS_TOOLS_MODULES,
                None,
                format!("cannot read: {e}"),
            )),
        }
        if generator == Generator::Dracut {
            cfg.read_dracut(root);
        }
        if let Some(cmdline) = cmdline {
            let keys = ["rd.driver.pre", "rd.driver.post", "rd.modules-load"];
            for key in keys {
                for name in cmdline.list(key) {
                    if generator == Generator::Dracut {
                        cfg.require(
                            &name,
                            SourceKind::KernelCmdline,
                            cmdline_origin,
                            None,
                            Some(key),
                        );
                    } else {
                        cfg.warnings.push(Warning::at(
                            cmdline_origin,
                            None,
                            format!(
                                "{key}={} is read by dracut's initramfs, which this system does not use ({})",
                                escape_bytes(name.as_bytes()),
                                cfg.evidence
                            ),
                        ));
                    }
                }
            }
            for name in cmdline.list("rd.driver.blacklist") {
                cfg.exclusions.push(Exclusion {
                    rule: escape_bytes(format!("rd.driver.blacklist={name}").as_bytes()),
                    path: cmdline_origin.to_string(),
                    line: None,
                    pattern: name,
                });
            }
        }
        cfg
    }

    fn require(
        &mut self,
        name: &str,
        kind: SourceKind,
        path: &str,
        line: Option<usize>,
        key: Option<&str>,
    ) {
        match modname::validate(name) {
            Ok(module) => self.required.push(Requirement {
                module,
                source: Source {
                    kind,
                    path: path.to_string(),
                    target: None,
                    line,
                    key: key.map(str::to_string),
                    read_at_boot: true,
                    note: None,
                },
            }),
            Err(e) => self.warnings.push(Warning::at(
                path,
                line,
                format!(
                    "not a module name, ignored: {}",
                    escape_bytes(e.to_string().as_bytes())
                ),
            )),
        }
    }

    /// dracut.conf, then dracut.conf.d/*.conf in name order (/etc hides /usr/lib).
    fn read_dracut(&mut self, root: &RootFs) {
        let mut files: Vec<String> = Vec::new();
        if root.exists(DRACUT_CONF) {
            files.push(DRACUT_CONF.to_string());
        }
        match conf::collect(root, &DRACUT_DIRS, false) {
            Ok(list) => files.extend(
                list.into_iter()
                    .filter(|f| f.state == conf::FileState::Used)
                    .map(|f| f.read_path().to_string_lossy().into_owned()),
            ),
            Err(e) => self.warnings.push(Warning::at(
                DRACUT_DIRS[0],
                None,
                format!("cannot read: {e}"),
            )),
        }
        // Words of add_drivers, force_drivers and omit_drivers: `=` replaces what earlier
        // lines set, `+=` appends, as the shell that sources these files would.
        struct Word {
            key: &'static str,
            word: String,
            file: String,
            line: usize,
        }
        let mut words_set: Vec<Word> = Vec::new();
        for file in &files {
            let text = match root.read_text(Path::new(file)) {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(e) => {
                    self.warnings
                        .push(Warning::at(file, None, format!("cannot read: {e}")));
                    continue;
                }
            };
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some(words) = shlex::split(line) else {
                    self.warnings.push(Warning::at(
                        file,
                        Some(i + 1),
                        "unbalanced quotes; line skipped".into(),
                    ));
                    continue;
                };
                let Some(first) = words.first() else { continue };
                let (key, append, value) = match first.split_once("+=") {
                    Some((k, v)) => (k, true, v),
                    None => match first.split_once('=') {
                        Some((k, v)) => (k, false, v),
                        None => continue,
                    },
                };
                let key: &'static str = match key {
                    "add_drivers" => "add_drivers",
                    "force_drivers" => "force_drivers",
                    "omit_drivers" => "omit_drivers",
                    _ => continue,
                };
                if !append {
                    words_set.retain(|w| w.key != key);
                }
                for word in value.split_whitespace() {
                    words_set.push(Word {
                        key,
                        word: word.to_string(),
                        file: file.clone(),
                        line: i + 1,
                    });
                }
            }
        }
        for w in words_set {
            let path = escape_bytes(w.file.as_bytes());
            if w.key == "omit_drivers" {
                self.exclusions.push(Exclusion {
                    rule: escape_bytes(format!("omit_drivers+=\" {} \"", w.word).as_bytes()),
                    path,
                    line: Some(w.line),
                    pattern: w.word,
                });
            } else {
                self.require(
                    &w.word,
                    SourceKind::DracutConf,
                    &path,
                    Some(w.line),
                    Some(w.key),
                );
            }
        }
    }

    /// Rules that keep `module` out of the initramfs.
    pub fn exclusions_for(&self, module: &str) -> Vec<Exclusion> {
        self.exclusions
            .iter()
            .filter(|e| e.applies_to(module))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::tests::write;

    #[test]
    fn initramfs_tools_modules() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "/usr/sbin/mkinitramfs", "");
        write(
            d,
            INITRAMFS_TOOLS_MODULES,
            "# comment\nraid1\n  dm-crypt  extra=1\n\nbad/name\n",
        );
        let cfg = EarlyConfig::read(
            &RootFs::new(d),
            Some(&KernelCmdline::parse("rd.driver.pre=x")),
            "/proc/cmdline",
        );
        assert_eq!(cfg.generator, Generator::InitramfsTools);
        let got: Vec<(String, Option<usize>)> = cfg
            .required
            .iter()
            .map(|r| (r.module.clone(), r.source.line))
            .collect();
        assert_eq!(
            got,
            vec![("raid1".into(), Some(2)), ("dm_crypt".into(), Some(3))]
        );
        assert_eq!(cfg.warnings.len(), 2, "{:?}", cfg.warnings);
        assert!(
            cfg.warnings
                .iter()
                .any(|w| w.message.contains("rd.driver.pre=x is read by dracut"))
        );
    }

    #[test]
    fn dracut_conf_and_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "/usr/bin/dracut", "");
        write(d, "/etc/dracut.conf", "add_drivers+=\" virtio_blk \"\n");
        write(
            d,
            "/usr/lib/dracut/dracut.conf.d/01-dist.conf",
            "add_drivers+=\" from_vendor \"\n",
        );
        write(
            d,
            "/etc/dracut.conf.d/01-dist.conf",
            "omit_drivers+=\" floppy \"\n",
        );
        write(
            d,
            "/etc/dracut.conf.d/50-ipvs.conf",
            "# ipvs\nforce_drivers+=\" ip_vs ip_vs_rr \"\nadd_drivers=\"nvme\"\n",
        );
        let cmdline =
            KernelCmdline::parse("ro rd.driver.pre=vfio-pci,vfio rd.driver.blacklist=nouveau");
        let cfg = EarlyConfig::read(
            &RootFs::new(d),
            Some(&cmdline),
            "/boot/loader/entries/x.conf",
        );
        assert_eq!(cfg.generator, Generator::Dracut);
        let got: Vec<(String, Option<String>)> = cfg
            .required
            .iter()
            .map(|r| (r.module.clone(), r.source.key.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("ip_vs".into(), Some("force_drivers".into())),
                ("ip_vs_rr".into(), Some("force_drivers".into())),
                ("nvme".into(), Some("add_drivers".into())),
                ("vfio_pci".into(), Some("rd.driver.pre".into())),
                ("vfio".into(), Some("rd.driver.pre".into())),
            ],
            "add_drivers= replaces the earlier virtio_blk; the vendor file is hidden by /etc's"
        );
        assert_eq!(
            cfg.required[0].source.path,
            "/etc/dracut.conf.d/50-ipvs.conf"
        );
        assert_eq!(cfg.required[0].source.line, Some(2));
        assert_eq!(cfg.exclusions_for("floppy").len(), 1);
        assert_eq!(
            cfg.exclusions_for("nouveau")[0].rule,
            "rd.driver.blacklist=nouveau"
        );
        assert!(cfg.exclusions_for("nvme").is_empty());
    }
}
