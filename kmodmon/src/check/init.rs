//! Which init system boots the root, and whether anything on it reads /etc/modules at boot.
//!
//! The rule (README "kmodmon check"):
//! 1. A modules-load.d file that is read (not masked or shadowed) and leads to /etc/modules
//!    (Debian and Ubuntu ship /etc/modules-load.d/modules.conf -> ../modules): /etc/modules
//!    is read by systemd-modules-load, and its lines count as modules-load.d lines.
//! 2. Otherwise, an init script in /etc/init.d that names /etc/modules (Debian's
//!    /etc/init.d/kmod, OpenRC's /etc/init.d/modules) reads it when it runs at boot:
//!    - under sysvinit, when it is linked as /etc/rcS.d/S??NAME or /etc/rc[2-5].d/S??NAME;
//!    - under OpenRC, when it is in /etc/runlevels/{sysinit,boot,default}/;
//!    - under systemd, only when no native unit NAME.service exists (Debian's kmod.service is
//!      an alias of systemd-modules-load.service, so /etc/init.d/kmod never runs) and it is
//!      linked in rcS.d/rc[2-5].d (systemd's SysV compatibility);
//!    - when the init system is not known, its presence is enough.
//! 3. Otherwise nothing reads /etc/modules at boot.
use std::path::Path;

use serde::Serialize;

use super::cmdline::KernelCmdline;
use super::conf::{ConfFile, FileState};
use crate::host::moddb::RootFs;

pub const ETC_MODULES: &str = "/etc/modules";

const UNIT_DIRS: [&str; 5] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InitSystem {
    Systemd,
    Sysvinit,
    Openrc,
    Unknown,
}

impl InitSystem {
    pub fn as_str(self) -> &'static str {
        match self {
            InitSystem::Systemd => "systemd",
            InitSystem::Sysvinit => "sysvinit",
            InitSystem::Openrc => "openrc",
            InitSystem::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InitInfo {
    pub system: InitSystem,
    /// What that was decided from, e.g. "/sbin/init -> /lib/systemd/systemd".
    pub evidence: String,
}

/// Who reads /etc/modules at boot, if anyone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EtcModulesReader {
    pub read_at_boot: bool,
    /// The reader ("systemd-modules-load via /etc/modules-load.d/modules.conf", "/etc/init.d/kmod").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_by: Option<String>,
    /// One sentence a person can act on.
    pub why: String,
}

/// Decides the init system from `init=` on the kernel command line, else /sbin/init.
pub fn detect_init(root: &RootFs, cmdline: Option<&KernelCmdline>) -> InitInfo {
    let from_cmdline = cmdline.and_then(|c| c.values("init").last().map(|v| v.to_string()));
    let init = from_cmdline
        .clone()
        .unwrap_or_else(|| "/sbin/init".to_string());
    let origin = if from_cmdline.is_some() {
        "init= on the kernel command line: "
    } else {
        ""
    };
    let resolved = root.resolve(&init).ok();
    let target = resolved.as_ref().map(|p| p.to_string_lossy().into_owned());
    let has = |p: &str| root.exists(p);
    let openrc = has("/sbin/openrc") || has("/usr/sbin/openrc") || has("/sbin/openrc-init");
    let info = |system, evidence: String| InitInfo {
        system,
        evidence: format!("{origin}{evidence}"),
    };
    match target {
        Some(t) if has(&t) => {
            let shown = if t == init {
                init.clone()
            } else {
                format!("{init} -> {t}")
            };
            let base = t.rsplit('/').next().unwrap_or_default();
            if t.contains("systemd") {
                info(InitSystem::Systemd, shown)
            } else if base.starts_with("openrc") || openrc {
                info(InitSystem::Openrc, format!("{shown}; OpenRC installed"))
            } else if has("/etc/inittab") {
                info(InitSystem::Sysvinit, format!("{shown}; /etc/inittab"))
            } else {
                info(
                    InitSystem::Unknown,
                    format!("{shown} is not systemd, OpenRC or sysvinit"),
                )
            }
        }
        _ if root.is_dir("/run/systemd/system") => info(
            InitSystem::Systemd,
            format!("{init} not found; /run/systemd/system exists"),
        ),
        _ if has("/lib/systemd/systemd") || has("/usr/lib/systemd/systemd") => info(
            InitSystem::Systemd,
            format!("{init} not found; systemd is installed"),
        ),
        _ => info(InitSystem::Unknown, format!("{init} not found")),
    }
}

/// Applies the module rule to decide whether /etc/modules is read at boot.
pub fn etc_modules_reader(
    root: &RootFs,
    init: &InitInfo,
    modules_load: &[ConfFile],
) -> EtcModulesReader {
    if let Some(link) = modules_load
        .iter()
        .find(|f| f.state == FileState::Used && f.read_path() == Path::new(ETC_MODULES))
    {
        return EtcModulesReader {
            read_at_boot: true,
            read_by: Some(format!("systemd-modules-load via {}", link.path)),
            why: format!(
                "{} links to {ETC_MODULES}, so its lines load at boot",
                link.path
            ),
        };
    }
    let scripts = reader_scripts(root);
    for script in &scripts {
        let enabled_sysv = sysv_enabled(root, script);
        let runs = match init.system {
            InitSystem::Sysvinit => enabled_sysv,
            InitSystem::Openrc => ["sysinit", "boot", "default"]
                .iter()
                .any(|lvl| root.exists(format!("/etc/runlevels/{lvl}/{script}"))),
            InitSystem::Systemd => enabled_sysv && !has_native_unit(root, script),
            InitSystem::Unknown => true,
        };
        if runs {
            return EtcModulesReader {
                read_at_boot: true,
                read_by: Some(format!("/etc/init.d/{script}")),
                why: format!("/etc/init.d/{script} reads {ETC_MODULES} at boot"),
            };
        }
    }
    let rhel = rhel_family(root)
        .map(|id| {
            format!(
                "; on this RHEL-family system ({id}) nothing reads {ETC_MODULES}: modules load at boot \
                 from /etc/modules-load.d/ (or /etc/sysconfig/modules/*.modules)"
            )
        })
        .unwrap_or_default();
    let why = match init.system {
        InitSystem::Systemd => {
            let scripts_note = if scripts.is_empty() {
                String::new()
            } else {
                let names: Vec<String> =
                    scripts.iter().map(|s| format!("/etc/init.d/{s}")).collect();
                format!(" ({} exists but systemd does not run it)", names.join(", "))
            };
            format!(
                "systemd boots this system ({}) and systemd-modules-load reads only modules-load.d, \
                 where no file links to {ETC_MODULES}{scripts_note}{rhel}",
                init.evidence
            )
        }
        _ if scripts.is_empty() => format!("no init script on this system reads {ETC_MODULES}"),
        _ => format!(
            "the init scripts that read {ETC_MODULES} ({}) are not enabled at boot",
            scripts.join(", ")
        ),
    };
    EtcModulesReader {
        read_at_boot: false,
        read_by: None,
        why,
    }
}

/// `ID=centos` when /etc/os-release (or /usr/lib/os-release) says the root is of the RHEL
/// family (ID or ID_LIKE naming rhel, fedora or centos).
pub fn rhel_family(root: &RootFs) -> Option<String> {
    let text = ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|p| root.read_text(p).ok().flatten())?;
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
    };
    let id = value("ID").unwrap_or_default();
    let like = value("ID_LIKE").unwrap_or_default();
    let family = ["rhel", "fedora", "centos"];
    let is = std::iter::once(id.as_str())
        .chain(like.split_whitespace())
        .any(|w| family.contains(&w));
    is.then(|| format!("ID={}", crate::escape::escape_bytes(id.as_bytes())))
}

/// Scripts in /etc/init.d whose text names /etc/modules itself (not /etc/modules-load.d).
fn reader_scripts(root: &RootFs) -> Vec<String> {
    let mut out = Vec::new();
    for name in root.list_dir("/etc/init.d").unwrap_or_default() {
        let name = name.to_string_lossy().into_owned();
        let Ok(Some(text)) = root.read_text(format!("/etc/init.d/{name}")) else {
            continue;
        };
        if names_etc_modules(&text) {
            out.push(name);
        }
    }
    out
}

/// Whether `text` mentions the path /etc/modules (and not only /etc/modules-load.d,
/// /etc/modules.conf or the like), outside comment lines.
fn names_etc_modules(text: &str) -> bool {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .any(|line| {
            line.match_indices(ETC_MODULES).any(|(i, m)| {
            let next = line[i + m.len()..].chars().next();
            !matches!(next, Some(c) if c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        })
        })
}

/// Whether an init script is linked to start in rcS.d or rc2-5.d.
fn sysv_enabled(root: &RootFs, script: &str) -> bool {
    ["rcS.d", "rc2.d", "rc3.d", "rc4.d", "rc5.d"]
        .iter()
        .any(|dir| {
            root.list_dir(format!("/etc/{dir}"))
                .unwrap_or_default()
                .iter()
                .any(|n| {
                    let n = n.to_string_lossy();
                    let b = n.as_bytes();
                    // "S", two digits, the script name; the first three bytes are checked to be ASCII
                    // before slicing there.
                    b.len() > 3
                        && b[0] == b'S'
                        && b[1..3].iter().all(u8::is_ascii_digit)
                        && n.get(3..) == Some(script)
                })
        })
}

/// Whether systemd has a native unit of the script's name (which makes it ignore the script).
fn has_native_unit(root: &RootFs, script: &str) -> bool {
    UNIT_DIRS.iter().any(|dir| {
        let path = format!("{dir}/{script}.service");
        root.exists(&path)
            || root
                .resolve(&path)
                .is_ok_and(|t| t.as_os_str() == "/dev/null")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    use crate::check::tests::write;

    const KMOD_SCRIPT: &str =
        "#!/bin/sh\n# Load the modules listed in /etc/modules.\nfiles=\"/etc/modules\"\n";

    #[test]
    fn detects_init_systems() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let root = RootFs::new(d);
        assert_eq!(detect_init(&root, None).system, InitSystem::Unknown);
        write(d, "/lib/systemd/systemd", "");
        std::fs::create_dir_all(d.join("sbin")).unwrap();
        symlink("/lib/systemd/systemd", d.join("sbin/init")).unwrap();
        let info = detect_init(&root, None);
        assert_eq!(info.system, InitSystem::Systemd);
        assert_eq!(info.evidence, "/sbin/init -> /lib/systemd/systemd");
        write(d, "/sbin/sysvinit", "");
        write(d, "/etc/inittab", "");
        let cmdline = KernelCmdline::parse("ro init=/sbin/sysvinit");
        assert_eq!(
            detect_init(&root, Some(&cmdline)).system,
            InitSystem::Sysvinit
        );
        write(d, "/sbin/openrc", "");
        assert_eq!(
            detect_init(&root, Some(&cmdline)).system,
            InitSystem::Openrc
        );
    }

    #[test]
    fn mentions_of_etc_modules() {
        assert!(names_etc_modules(KMOD_SCRIPT));
        assert!(names_etc_modules(
            "for f in /etc/modules /etc/modules-load.d/*.conf; do"
        ));
        assert!(!names_etc_modules(
            "ls /etc/modules-load.d/ /etc/modules.conf /etc/modules_x\n# /etc/modules\n"
        ));
    }

    #[test]
    fn systemd_ignores_the_kmod_script_when_a_unit_exists() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let root = RootFs::new(d);
        let systemd = InitInfo {
            system: InitSystem::Systemd,
            evidence: "test".into(),
        };
        write(d, "/etc/init.d/kmod", KMOD_SCRIPT);
        write(d, "/etc/rcS.d/S01kmod", "");
        write(d, "/etc/rcS.d/S1éx", "");
        // No native unit, script enabled: systemd's SysV compatibility runs it.
        assert_eq!(
            etc_modules_reader(&root, &systemd, &[]).read_by.as_deref(),
            Some("/etc/init.d/kmod")
        );
        std::fs::create_dir_all(d.join("lib/systemd/system")).unwrap();
        symlink(
            "systemd-modules-load.service",
            d.join("lib/systemd/system/kmod.service"),
        )
        .unwrap();
        write(
            d,
            "/lib/systemd/system/systemd-modules-load.service",
            "[Unit]\n",
        );
        let r = etc_modules_reader(&root, &systemd, &[]);
        assert!(!r.read_at_boot);
        assert!(
            r.why
                .contains("/etc/init.d/kmod exists but systemd does not run it"),
            "{}",
            r.why
        );

        let sysv = InitInfo {
            system: InitSystem::Sysvinit,
            evidence: "test".into(),
        };
        assert!(etc_modules_reader(&root, &sysv, &[]).read_at_boot);
        std::fs::remove_file(d.join("etc/rcS.d/S01kmod")).unwrap();
        assert!(!etc_modules_reader(&root, &sysv, &[]).read_at_boot);
    }

    #[test]
    fn a_modules_load_link_makes_it_read() {
        let root = RootFs::new("/nonexistent");
        let systemd = InitInfo {
            system: InitSystem::Systemd,
            evidence: "test".into(),
        };
        let mut link = ConfFile {
            path: "/etc/modules-load.d/modules.conf".into(),
            target: Some(ETC_MODULES.into()),
            state: FileState::Used,
            name: "modules.conf".into(),
            read: ETC_MODULES.into(),
        };
        let r = etc_modules_reader(&root, &systemd, std::slice::from_ref(&link));
        assert!(r.read_at_boot);
        assert_eq!(
            r.read_by.as_deref(),
            Some("systemd-modules-load via /etc/modules-load.d/modules.conf")
        );
        link.state = FileState::Masked;
        assert!(!etc_modules_reader(&root, &systemd, &[link]).read_at_boot);
    }
}
