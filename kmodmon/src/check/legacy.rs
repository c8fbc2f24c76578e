//! The RHEL family's legacy boot-time module scripts: every executable
//! `/etc/sysconfig/modules/*.modules`, then an executable `/etc/rc.modules`, run at boot by
//! - systemd: the legacy module-loading unit of `initscripts` (`rhel-loadmodules.service` on
//!   RHEL 7, `loadmodules.service` on RHEL 8 and later) when it is installed, enabled (linked in a
//!   `*.wants/` directory) and not masked;
//! - sysvinit/upstart (RHEL 6 and older): `/etc/rc.d/rc.sysinit`.
//!
//! On any other system nothing runs them. They are shell scripts: the modules are read from
//! their `modprobe` and `insmod` commands; lines whose modules cannot be told without running
//! the shell (variables, loops) are reported as warnings.
use serde::Serialize;

use super::init::{InitInfo, InitSystem};
use crate::host::moddb::RootFs;

pub const SYSCONFIG_MODULES: &str = "/etc/sysconfig/modules";
pub const RC_MODULES: &str = "/etc/rc.modules";
/// The units that run the scripts, newest name first.
pub const LOADER_UNITS: [&str; 2] = ["loadmodules.service", "rhel-loadmodules.service"];
const RC_SYSINIT: [&str; 2] = ["/etc/rc.d/rc.sysinit", "/etc/rc.sysinit"];

const UNIT_DIRS: [&str; 5] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// Who runs the legacy scripts at boot, if anyone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LegacyLoader {
    pub read_at_boot: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_by: Option<String>,
    pub why: String,
}

/// One legacy script and whether it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LegacyScript {
    pub path: String,
    pub executable: bool,
}

fn unit_state(root: &RootFs, unit: &str) -> Option<(String, bool, bool)> {
    let mut file = None;
    let mut masked = false;
    for dir in UNIT_DIRS {
        let path = format!("{dir}/{unit}");
        if root
            .resolve(&path)
            .is_ok_and(|t| t.as_os_str() == "/dev/null")
        {
            masked = true;
            break;
        }
        if root.exists(&path) {
            file = Some(path);
            break;
        }
    }
    if masked {
        return Some((format!("{unit} (masked)"), false, true));
    }
    let file = file?;
    let enabled = UNIT_DIRS.iter().any(|dir| {
        root.list_dir(dir).unwrap_or_default().iter().any(|wants| {
            let w = wants.to_string_lossy();
            w.ends_with(".wants") && root.exists(format!("{dir}/{w}/{unit}"))
        })
    });
    Some((file, enabled, false))
}

/// Decides whether the legacy scripts run at boot on this root.
pub fn loader(root: &RootFs, init: &InitInfo) -> LegacyLoader {
    match init.system {
        InitSystem::Systemd | InitSystem::Unknown => {
            for unit in LOADER_UNITS {
                match unit_state(root, unit) {
                    Some((path, true, false)) => {
                        return LegacyLoader {
                            read_at_boot: true,
                            read_by: Some(unit.to_string()),
                            why: format!("{unit} ({path}) is enabled and runs them at boot"),
                        };
                    }
                    Some((_, _, true)) => {
                        return LegacyLoader {
                            read_at_boot: false,
                            read_by: None,
                            why: format!(
                                "{unit} is masked (linked to /dev/null), so nothing runs them"
                            ),
                        };
                    }
                    Some((path, false, false)) => {
                        return LegacyLoader {
                            read_at_boot: false,
                            read_by: None,
                            why: format!(
                                "{unit} ({path}) is installed but not enabled: `systemctl enable {unit}`, \
                                 or list the modules in /etc/modules-load.d/"
                            ),
                        };
                    }
                    None => {}
                }
            }
            LegacyLoader {
                read_at_boot: false,
                read_by: None,
                why: format!(
                    "no {} unit is installed (the initscripts package on the RHEL family runs them); \
                     systemd-modules-load reads only modules-load.d",
                    LOADER_UNITS.join(" or ")
                ),
            }
        }
        InitSystem::Sysvinit | InitSystem::Openrc => {
            for rc in RC_SYSINIT {
                if let Ok(Some(text)) = root.read_text(rc)
                    && text.contains(SYSCONFIG_MODULES)
                {
                    return LegacyLoader {
                        read_at_boot: true,
                        read_by: Some(rc.to_string()),
                        why: format!("{rc} runs them at boot"),
                    };
                }
            }
            LegacyLoader {
                read_at_boot: false,
                read_by: None,
                why: format!(
                    "no {} runs them on this {} system",
                    RC_SYSINIT[0],
                    init.system.as_str()
                ),
            }
        }
    }
}

/// The scripts, in the order the loader runs them (`*.modules` sorted, then rc.modules).
pub fn scripts(root: &RootFs) -> Vec<LegacyScript> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |logical: &str| {
        root.resolve_real(logical)
            .ok()
            .and_then(|p| std::fs::metadata(p).ok())
            .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let mut out = Vec::new();
    for name in root.list_dir(SYSCONFIG_MODULES).unwrap_or_default() {
        let name = name.to_string_lossy().into_owned();
        if !name.ends_with(".modules") {
            continue;
        }
        let path = format!("{SYSCONFIG_MODULES}/{name}");
        if root.is_dir(&path) {
            continue;
        }
        out.push(LegacyScript {
            executable: executable(&path),
            path,
        });
    }
    if root.exists(RC_MODULES) {
        out.push(LegacyScript {
            path: RC_MODULES.into(),
            executable: executable(RC_MODULES),
        });
    }
    out
}

/// A line number and a text (a module name, or why the line cannot be read).
pub type LineItem = (usize, String);

/// Modules a shell script loads with `modprobe` or `insmod`: (line, name) pairs, and
/// (line, reason) for commands whose modules cannot be read without running the shell.
pub fn modules_in_script(text: &str) -> (Vec<LineItem>, Vec<LineItem>) {
    let mut found = Vec::new();
    let mut unclear = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let Some(words) = shlex::split(line) else {
            if line.contains("modprobe") || line.contains("insmod") {
                unclear.push((line_no, "unbalanced quotes".into()));
            }
            continue;
        };
        let mut k = 0;
        while k < words.len() {
            let base = words[k].rsplit('/').next().unwrap_or_default();
            if base != "modprobe" && base != "insmod" {
                k += 1;
                continue;
            }
            let insmod = base == "insmod";
            if insmod {
                // insmod FILE [PARAM=VALUE...]: the module is the file's name, whatever the
                // directory (`/lib/modules/$(uname -r)/extra/x.ko` splits into two words).
                k += 1;
                let mut file = None;
                while k < words.len() {
                    let w = &words[k];
                    if [";", "&&", "||", "|", "&", "then", "fi", "done", "else"]
                        .contains(&w.as_str())
                        || w.contains(['>', '<'])
                    {
                        break;
                    }
                    if file.is_none() && !w.contains('=') {
                        let base = w.rsplit('/').next().unwrap_or_default();
                        if base.contains(".ko") {
                            file = Some(w.clone());
                        }
                    }
                    k += 1;
                }
                match file {
                    Some(f)
                        if !f
                            .rsplit('/')
                            .next()
                            .unwrap_or_default()
                            .contains(['$', '`', '*']) =>
                    {
                        if let Some(name) = crate::modname::from_file(f.trim()) {
                            found.push((line_no, name));
                        }
                    }
                    _ => unclear.push((
                        line_no,
                        "insmod of a file kmodmon cannot name without running the shell".into(),
                    )),
                }
                continue;
            }
            let mut args = Vec::new();
            let mut all = false;
            let mut remove = false;
            k += 1;
            while k < words.len() {
                let w = &words[k];
                if [";", "&&", "||", "|", "&", "then", "fi", "done", "else"].contains(&w.as_str())
                    || w.contains(['>', '<'])
                {
                    break;
                }
                if w.starts_with('-') {
                    all |= w == "-a" || w == "--all";
                    remove |= w == "-r" || w == "--remove";
                    k += 1;
                    continue;
                }
                args.push(w.clone());
                k += 1;
            }
            if remove {
                continue;
            }
            let names: Vec<String> = if all {
                args
            } else {
                args.into_iter().take(1).collect()
            };
            for name in names {
                if name.contains(['$', '`', '*']) {
                    unclear.push((
                        line_no,
                        format!(
                            "the module {} is computed by the shell; kmodmon cannot tell which it is",
                            crate::escape::escape_bytes(name.as_bytes())
                        ),
                    ));
                    continue;
                }
                found.push((line_no, name));
            }
        }
    }
    (found, unclear)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::tests::write;
    use std::os::unix::fs::symlink;

    #[test]
    fn modprobe_and_insmod_lines() {
        let text = "#!/bin/sh\n# comment modprobe no\n/sbin/modprobe ip_vs\nexec /sbin/modprobe -a ip_vs_rr ip_vs_wrr >/dev/null 2>&1\n\
                    if [ ! -c /dev/uinput ] ; then modprobe uinput foo=1 ; fi\nmodprobe -r floppy\n\
                    insmod /lib/modules/$(uname -r)/extra/thing.ko\ninsmod /opt/x/vendor-nic.ko.xz\nfor m in a b; do modprobe $m; done\n";
        let (found, unclear) = modules_in_script(text);
        let names: Vec<(usize, &str)> = found.iter().map(|(l, n)| (*l, n.as_str())).collect();
        assert_eq!(
            names,
            vec![
                (3, "ip_vs"),
                (4, "ip_vs_rr"),
                (4, "ip_vs_wrr"),
                (5, "uinput"),
                (7, "thing"),
                (8, "vendor_nic")
            ]
        );
        assert_eq!(unclear.len(), 1, "{unclear:?}");
        assert_eq!(unclear[0].0, 9);
    }

    #[test]
    fn loader_unit_enabled_masked_missing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let root = RootFs::new(d);
        let systemd = InitInfo {
            system: InitSystem::Systemd,
            evidence: "test".into(),
        };
        assert!(!loader(&root, &systemd).read_at_boot);
        write(
            d,
            "/usr/lib/systemd/system/loadmodules.service",
            "[Service]\nExecStart=/usr/libexec/loadmodules\n",
        );
        let l = loader(&root, &systemd);
        assert!(!l.read_at_boot);
        assert!(l.why.contains("not enabled"), "{}", l.why);
        std::fs::create_dir_all(d.join("usr/lib/systemd/system/basic.target.wants")).unwrap();
        symlink(
            "../loadmodules.service",
            d.join("usr/lib/systemd/system/basic.target.wants/loadmodules.service"),
        )
        .unwrap();
        assert_eq!(
            loader(&root, &systemd).read_by.as_deref(),
            Some("loadmodules.service")
        );
        std::fs::create_dir_all(d.join("etc/systemd/system")).unwrap();
        symlink(
            "/dev/null",
            d.join("etc/systemd/system/loadmodules.service"),
        )
        .unwrap();
        assert!(loader(&root, &systemd).why.contains("masked"));

        let sysv = InitInfo {
            system: InitSystem::Sysvinit,
            evidence: "test".into(),
        };
        assert!(!loader(&root, &sysv).read_at_boot);
        write(
            d,
            "/etc/rc.d/rc.sysinit",
            "for file in /etc/sysconfig/modules/*.modules ; do\n  [ -x $file ] && $file\ndone\n",
        );
        assert!(loader(&root, &sysv).read_at_boot);
    }

    #[test]
    fn scripts_in_order_with_their_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "/etc/sysconfig/modules/b.modules", "modprobe b\n");
        write(d, "/etc/sysconfig/modules/a.modules", "modprobe a\n");
        write(d, "/etc/sysconfig/modules/README", "");
        write(d, "/etc/rc.modules", "modprobe r\n");
        for f in ["etc/sysconfig/modules/a.modules", "etc/rc.modules"] {
            std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let s = scripts(&RootFs::new(d));
        let got: Vec<(&str, bool)> = s.iter().map(|s| (s.path.as_str(), s.executable)).collect();
        assert_eq!(
            got,
            vec![
                ("/etc/sysconfig/modules/a.modules", true),
                ("/etc/sysconfig/modules/b.modules", false),
                ("/etc/rc.modules", true)
            ]
        );
    }
}
