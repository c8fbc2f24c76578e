//! What keeps a module from loading: modprobe.d `blacklist` and `install NAME /bin/false`
//! (or `/bin/true`), `modprobe.blacklist=` and `module_blacklist=` on the kernel command line.
//! Also modprobe.d `alias` lines, which kmod consults before the kernel's own aliases.
use std::collections::BTreeMap;

use serde::Serialize;

use super::Warning;
use super::cmdline::{KernelCmdline, PROC_CMDLINE};
use super::conf::{self, ConfFile, FileState};
use crate::host::moddb::{AliasIndex, RootFs};
use crate::modname;

/// One rule that stops a module from loading.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Blocker {
    /// The rule as written, e.g. "blacklist floppy", "install usb_storage /bin/true",
    /// "modprobe.blacklist=floppy".
    pub rule: String,
    /// Logical path of the file, or /proc/cmdline.
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
}

#[derive(Clone, Debug, Default)]
pub struct ModprobeConfig {
    pub files: Vec<ConfFile>,
    blockers: BTreeMap<String, Vec<Blocker>>,
    aliases: AliasIndex,
    pub warnings: Vec<Warning>,
}

impl ModprobeConfig {
    /// Reads the modprobe.d directories under the root and the kernel command line.
    pub fn read(root: &RootFs, cmdline: Option<&KernelCmdline>) -> std::io::Result<ModprobeConfig> {
        let mut cfg = ModprobeConfig {
            files: conf::collect(root, &conf::MODPROBE_DIRS, false)?,
            ..Default::default()
        };
        for file in cfg
            .files
            .clone()
            .iter()
            .filter(|f| f.state == FileState::Used)
        {
            match root.read_text(file.read_path()) {
                Ok(Some(text)) => cfg.parse_file(&file.path, &text),
                Ok(None) => {}
                Err(e) => {
                    cfg.warnings
                        .push(Warning::at(&file.path, None, format!("cannot read: {e}")))
                }
            }
        }
        if let Some(cmdline) = cmdline {
            cfg.add_cmdline(cmdline);
        }
        Ok(cfg)
    }

    /// Adds `modprobe.blacklist=` (kmod) and `module_blacklist=` (the kernel refuses them).
    pub fn add_cmdline(&mut self, cmdline: &KernelCmdline) {
        self.add_cmdline_from(cmdline, PROC_CMDLINE);
    }

    /// [`Self::add_cmdline`] for a command line read from `origin` (a boot entry).
    pub fn add_cmdline_from(&mut self, cmdline: &KernelCmdline, origin: &str) {
        for key in ["modprobe.blacklist", "module_blacklist"] {
            for name in cmdline.list(key) {
                self.block(&name, format!("{key}={name}"), origin, None);
            }
        }
    }

    /// Parses one modprobe.d file (kmod's syntax: `\` continues a line, `#` starts a comment line).
    pub fn parse_file(&mut self, path: &str, text: &str) {
        let mut joined = String::new();
        let mut first_line = 0;
        for (i, raw) in text.lines().enumerate() {
            if joined.is_empty() {
                first_line = i + 1;
            }
            if let Some(head) = raw.strip_suffix('\\') {
                joined.push_str(head);
                joined.push(' ');
                continue;
            }
            joined.push_str(raw);
            let line = std::mem::take(&mut joined);
            self.parse_line(path, first_line, &line);
        }
        if !joined.is_empty() {
            self.parse_line(path, first_line, &joined);
        }
    }

    fn parse_line(&mut self, path: &str, line_no: usize, line: &str) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            // kmod reads the first word after the command and ignores the rest.
            ["blacklist", name, ..] => {
                self.block(name, format!("blacklist {name}"), path, Some(line_no))
            }
            ["install", name, command @ ..] if !command.is_empty() => {
                if refuses(command) {
                    let rule = format!("install {name} {}", command.join(" "));
                    self.block(name, rule, path, Some(line_no));
                }
            }
            ["alias", pattern, module, ..] => self.aliases.insert(pattern, module),
            [cmd, ..] if ["options", "remove", "softdep", "weakdep", "include"].contains(cmd) => {}
            _ => {
                let shown = crate::escape::escape_bytes(line.as_bytes());
                self.warnings.push(Warning::at(
                    path,
                    Some(line_no),
                    format!("line not understood by kmod: {shown}"),
                ));
            }
        }
    }

    fn block(&mut self, name: &str, rule: String, path: &str, line: Option<usize>) {
        let blocker = Blocker {
            rule: crate::escape::escape_bytes(rule.as_bytes()),
            path: path.to_string(),
            line,
        };
        let list = self.blockers.entry(modname::normalize(name)).or_default();
        if !list.contains(&blocker) {
            list.push(blocker);
        }
    }

    /// Rules that stop `module` from loading.
    pub fn blockers(&self, module: &str) -> &[Blocker] {
        self.blockers
            .get(&modname::normalize(module))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Modules a request resolves to through modprobe.d `alias` lines (empty when none match).
    pub fn resolve_alias(&self, request: &str) -> Vec<String> {
        self.aliases.lookup(request)
    }
}

/// Whether an install command does nothing or fails (`/bin/false`, `/bin/true`, `false`,
/// `true`, `/usr/bin/...`), so that the module itself is never inserted.
fn refuses(command: &[&str]) -> bool {
    let Some(first) = command.first() else {
        return false;
    };
    let first = first.trim_end_matches(';');
    matches!(
        first,
        "/bin/false" | "/bin/true" | "/usr/bin/false" | "/usr/bin/true" | "false" | "true"
    ) || (command.len() >= 2 && first == "exit" && command[1] != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blacklist_install_and_alias_lines() {
        let mut cfg = ModprobeConfig::default();
        cfg.parse_file(
            "/etc/modprobe.d/blacklist.conf",
            "# comment\nblacklist floppy\nblacklist pcspkr extra\n\
             install usb-storage /bin/true\ninstall cramfs /bin/false\n\
             install ip_vs /sbin/modprobe --ignore-install ip_vs && echo ok\n\
             install dccp \\\n   /bin/false\noptions loop max_loop=8\n\
             alias my-nic e1000e\nalias pci:v0000ABCD* weird-driver\nnonsense here\n",
        );
        assert_eq!(cfg.blockers("floppy")[0].rule, "blacklist floppy");
        assert_eq!(cfg.blockers("floppy")[0].line, Some(2));
        assert_eq!(
            cfg.blockers("pcspkr")[0].rule,
            "blacklist pcspkr",
            "kmod ignores extra words"
        );
        assert_eq!(
            cfg.blockers("usb_storage")[0].rule,
            "install usb-storage /bin/true"
        );
        assert_eq!(cfg.blockers("cramfs")[0].line, Some(5));
        assert!(
            cfg.blockers("ip_vs").is_empty(),
            "a real install command loads the module"
        );
        assert_eq!(
            cfg.blockers("dccp")[0].line,
            Some(7),
            "continued lines keep their first number"
        );
        assert_eq!(cfg.resolve_alias("my-nic"), vec!["e1000e"]);
        assert_eq!(cfg.resolve_alias("pci:v0000ABCDd1"), vec!["weird_driver"]);
        let warned: Vec<_> = cfg
            .warnings
            .iter()
            .map(|w| (w.line, w.message.as_str()))
            .collect();
        assert_eq!(
            warned,
            vec![(Some(12), "line not understood by kmod: nonsense here")]
        );
    }

    #[test]
    fn kernel_command_line_blacklists() {
        let mut cfg = ModprobeConfig::default();
        cfg.add_cmdline(&KernelCmdline::parse(
            "quiet modprobe.blacklist=nouveau,floppy module_blacklist=pcspkr",
        ));
        assert_eq!(
            cfg.blockers("nouveau")[0].rule,
            "modprobe.blacklist=nouveau"
        );
        assert_eq!(cfg.blockers("pcspkr")[0].path, "/proc/cmdline");
        assert_eq!(cfg.blockers("floppy").len(), 1);
        assert!(cfg.blockers("overlay").is_empty());
    }

    #[test]
    fn refusing_install_commands() {
        assert!(refuses(&["/bin/false"]));
        assert!(refuses(&["/bin/true"]));
        assert!(refuses(&["true;"]));
        assert!(refuses(&["exit", "1"]));
        assert!(!refuses(&["exit", "0"]));
        assert!(!refuses(&["/sbin/modprobe", "--ignore-install", "x"]));
    }
}
