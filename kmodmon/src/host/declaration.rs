//! Expected modules: what a container declares in `KERNEL_MODULES`, where that declaration is
//! read from, and the verdict on a module event.
//!
//! - [`Expected::parse`] turns `ip_vs, ip_vs_wrr,` into normalized names; entries no module
//!   can have are kept as [`BadEntry`] with the reason, never dropped silently. Empty items
//!   (a trailing comma, `a,,b`) and spaces around items are tolerated.
//! - [`declaration`] reads it from the OCI config's `process.env` when the bundle was found,
//!   else from `/proc/<pid>/environ` of the container's first process.
//! - [`judge`] gives `host`, `expected` (declared, or a dependency of a declared module) or
//!   `unexpected`.
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::escape::escape_bytes;
pub use crate::event::Verdict;
use crate::modname;

/// The environment variable a container declares its modules in.
pub const ENV_VAR: &str = "KERNEL_MODULES";

/// Largest environ we read (Linux caps a process's strings at a quarter of its stack limit).
const ENVIRON_MAX: u64 = 8 << 20;

/// A container's declared modules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Expected {
    /// Valid names, normalized (`-` → `_`), without duplicates, in declared order.
    pub modules: Vec<String>,
    /// Entries that cannot be module names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bad: Vec<BadEntry>,
}

/// A `KERNEL_MODULES` entry that is not a module name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BadEntry {
    /// The entry as written, escaped for display.
    pub entry: String,
    pub reason: String,
}

impl Expected {
    /// Parses a `KERNEL_MODULES` value. Bytes, because `/proc/PID/environ` need not be UTF-8.
    pub fn parse(value: &[u8]) -> Expected {
        let mut out = Expected::default();
        for item in value.split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() {
                continue;
            }
            let text = match std::str::from_utf8(item) {
                Ok(t) => t,
                Err(_) => {
                    out.bad.push(BadEntry {
                        entry: escape_bytes(item),
                        reason: "not valid UTF-8".to_string(),
                    });
                    continue;
                }
            };
            match modname::validate(text) {
                Ok(name) if out.modules.contains(&name) => {}
                Ok(name) => out.modules.push(name),
                Err(e) => out.bad.push(BadEntry {
                    entry: escape_bytes(item),
                    reason: escape_bytes(e.to_string().as_bytes()),
                }),
            }
        }
        out
    }

    /// Whether `module` is declared ('-' and '_' equivalent).
    pub fn declares(&self, module: &str) -> bool {
        self.modules.iter().any(|m| modname::same(m, module))
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty() && self.bad.is_empty()
    }
}

/// The value of [`ENV_VAR`] in an OCI `process.env` list (`KEY=value` strings). The first
/// occurrence wins, as with getenv(3).
pub fn find_in_env_list<S: AsRef<str>>(env: &[S]) -> Option<&str> {
    env.iter()
        .find_map(|e| e.as_ref().strip_prefix(ENV_VAR)?.strip_prefix('='))
}

/// The value of [`ENV_VAR`] in NUL-separated environ bytes (`/proc/PID/environ`).
pub fn find_in_environ(environ: &[u8]) -> Option<&[u8]> {
    environ
        .split(|&b| b == 0)
        .find_map(|e| e.strip_prefix(ENV_VAR.as_bytes())?.strip_prefix(b"="))
}

/// Where a declaration was read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "from", content = "at")]
pub enum Source {
    /// `process.env` of an OCI config.json (or a container engine's own config file).
    Config(PathBuf),
    /// `/proc/<pid>/environ`.
    Environ(u32),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Config(p) => write!(f, "{}", p.display()),
            Source::Environ(pid) => write!(f, "/proc/{pid}/environ"),
        }
    }
}

/// A container's declaration and where it came from. `declared` is false when the
/// environment had no `KERNEL_MODULES` at all (then `expected` is empty).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Declaration {
    pub declared: bool,
    pub expected: Expected,
    pub source: Source,
}

#[derive(Debug, thiserror::Error)]
pub enum ExpectError {
    #[error(
        "cannot read {path}: {source} (the process may have exited; run kmodmon as root to read other users' processes)"
    )]
    Environ {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no OCI config and no process to read {ENV_VAR} from")]
    Nowhere,
    /// The pid is still becoming the container's program: runc's init before execve (its
    /// environ is runc's), or inside execve (for a moment the environ reads empty, or still
    /// shows the old one under the new comm). Seen for real right after `runc run -d`.
    #[error(
        "process {pid} ({comm}) has not finished starting the container's program; its environment is not the container's yet (retry shortly)"
    )]
    Starting { pid: u32, comm: String },
}

impl ExpectError {
    /// Whether the same read may succeed a little later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ExpectError::Starting { .. })
    }
}

/// Whether an environ and comm show a process that has not finished becoming the container's
/// program: an OCI runtime's init (runc's `runc:[2:INIT]` and `_LIBCONTAINER_*` variables,
/// crun), LXC's init for application containers (`lxc-execute` runs itself, or `init.lxc`,
/// as the container's pid 1 with the caller's environment; the program it starts has the
/// container's), or an empty environ (mid-execve; a container's process always has some).
pub fn is_runtime_init(environ: &[u8], comm: &str) -> bool {
    environ.is_empty()
        || comm.starts_with("runc:[")
        || comm == "runc"
        || comm == "crun"
        || comm == "lxc-execute"
        || comm == "init.lxc"
        || comm == "lxc-init"
        || environ.split(|&b| b == 0).any(|e| {
            e.starts_with(b"_LIBCONTAINER_INITPIPE=") || e.starts_with(b"_LIBCONTAINER_INITTYPE=")
        })
}

/// Reads `<proc_root>/<pid>/environ` (pass `/proc`).
pub fn read_environ(proc_root: &Path, pid: u32) -> Result<Vec<u8>, ExpectError> {
    use std::io::Read as _;
    let path = proc_root.join(pid.to_string()).join("environ");
    let err = |source| ExpectError::Environ {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(err)?;
    let mut buf = Vec::new();
    file.take(ENVIRON_MAX).read_to_end(&mut buf).map_err(err)?;
    Ok(buf)
}

/// A container's declaration: from `config_env` (the OCI config's `process.env` and the file
/// it came from) when the bundle was found, else from the environ of `pid` (the container's
/// first process) under `proc_root`.
pub fn declaration(
    config_env: Option<(&Path, &[String])>,
    pid: Option<u32>,
    proc_root: &Path,
) -> Result<Declaration, ExpectError> {
    if let Some((path, env)) = config_env {
        let value = find_in_env_list(env);
        return Ok(Declaration {
            declared: value.is_some(),
            expected: value
                .map(|v| Expected::parse(v.as_bytes()))
                .unwrap_or_default(),
            source: Source::Config(path.to_path_buf()),
        });
    }
    let pid = pid.ok_or(ExpectError::Nowhere)?;
    let environ = read_environ(proc_root, pid)?;
    let comm = std::fs::read(proc_root.join(pid.to_string()).join("comm")).unwrap_or_default();
    let comm = escape_bytes(comm.trim_ascii_end());
    if is_runtime_init(&environ, &comm) {
        return Err(ExpectError::Starting { pid, comm });
    }
    let value = find_in_environ(&environ);
    Ok(Declaration {
        declared: value.is_some(),
        expected: value.map(Expected::parse).unwrap_or_default(),
        source: Source::Environ(pid),
    })
}

/// A verdict and a one-line reason for the event's `detail`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub reason: String,
}

/// Transitive dependencies of a module per modules.dep (empty when unknown). Closures
/// `Fn(&str) -> Vec<String>` implement it.
pub trait DepResolver {
    fn dependencies(&self, module: &str) -> Vec<String>;
}

impl<F: Fn(&str) -> Vec<String>> DepResolver for F {
    fn dependencies(&self, module: &str) -> Vec<String> {
        self(module)
    }
}

/// A resolver that knows no dependencies.
pub struct NoDeps;

impl DepResolver for NoDeps {
    fn dependencies(&self, _module: &str) -> Vec<String> {
        Vec::new()
    }
}

/// Judges a module event. `container` is `None` for the host, else the container's declared
/// modules (pass `&Expected::default()` when the container's environment could not be read).
pub fn judge(module: &str, container: Option<&Expected>, deps: &dyn DepResolver) -> Judgement {
    let Some(expected) = container else {
        return Judgement {
            verdict: Verdict::Host,
            reason: "not in a container".to_string(),
        };
    };
    if expected.declares(module) {
        return Judgement {
            verdict: Verdict::Expected,
            reason: format!("declared in {ENV_VAR}"),
        };
    }
    for declared in &expected.modules {
        if deps
            .dependencies(declared)
            .iter()
            .any(|d| modname::same(d, module))
        {
            return Judgement {
                verdict: Verdict::Expected,
                reason: format!("dependency of {declared}, declared in {ENV_VAR}"),
            };
        }
    }
    let reason = if expected.modules.is_empty() {
        format!("the container declares no {ENV_VAR}")
    } else {
        format!(
            "not in {ENV_VAR}={} nor their dependencies",
            expected.modules.join(",")
        )
    };
    Judgement {
        verdict: Verdict::Unexpected,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_isula_style_values() {
        let e = Expected::parse(b"ip_vs,ip_vs_wrr");
        assert_eq!(e.modules, vec!["ip_vs", "ip_vs_wrr"]);
        assert!(e.bad.is_empty());
        let e = Expected::parse(b" ip-vs , ,nf_nat,,ip_vs, ");
        assert_eq!(e.modules, vec!["ip_vs", "nf_nat"]);
        assert!(e.bad.is_empty());
        assert!(Expected::parse(b"").is_empty());
        assert!(Expected::parse(b" , ,").is_empty());
    }

    #[test]
    fn bad_entries_are_reported_with_reasons() {
        let long = "x".repeat(56);
        let mut bytes = format!("ip_vs,a b,../evil,{long},\x1b[31m,").into_bytes();
        bytes.extend_from_slice(b"caf\xff,nf_nat");
        let e = Expected::parse(&bytes);
        assert_eq!(e.modules, vec!["ip_vs", "nf_nat"]);
        let entries: Vec<&str> = e.bad.iter().map(|b| b.entry.as_str()).collect();
        assert_eq!(
            entries,
            vec!["a b", "../evil", long.as_str(), "\\x1b[31m", "caf\\xff"]
        );
        assert!(e.bad[0].reason.contains("' '"), "{}", e.bad[0].reason);
        assert!(
            e.bad[2].reason.contains("longer than 55"),
            "{}",
            e.bad[2].reason
        );
        assert_eq!(e.bad[4].reason, "not valid UTF-8");
        // Reasons are printable even when the entry is not.
        assert!(!e.bad[3].reason.contains('\x1b'));
    }

    #[test]
    fn finds_the_variable_in_env_lists_and_environ() {
        let env = [
            "PATH=/bin".to_string(),
            "KERNEL_MODULES_X=no".to_string(),
            "KERNEL_MODULES=ip_vs".to_string(),
            "KERNEL_MODULES=second".to_string(),
        ];
        assert_eq!(find_in_env_list(&env), Some("ip_vs"));
        assert_eq!(find_in_env_list(&["KERNEL_MODULES".to_string()]), None);
        assert_eq!(find_in_env_list::<String>(&[]), None);
        let environ = b"HOME=/\0KERNEL_MODULES=ip_vs,\xffx\0TERM=xterm\0";
        assert_eq!(find_in_environ(environ), Some(&b"ip_vs,\xffx"[..]));
        assert_eq!(find_in_environ(b"HOME=/\0"), None);
        assert_eq!(find_in_environ(b""), None);
    }

    #[test]
    fn declaration_prefers_the_config_then_environ() {
        let dir = tempfile::tempdir().unwrap();
        let pid_dir = dir.path().join("4242");
        std::fs::create_dir(&pid_dir).unwrap();
        std::fs::write(pid_dir.join("environ"), b"A=1\0KERNEL_MODULES=nf_nat\0").unwrap();
        let cfg = Path::new("/bundle/config.json");
        let env = vec!["KERNEL_MODULES=ip_vs,ip_vs_wrr".to_string()];
        let d = declaration(Some((cfg, &env)), Some(4242), dir.path()).unwrap();
        assert!(d.declared);
        assert_eq!(d.expected.modules, vec!["ip_vs", "ip_vs_wrr"]);
        assert_eq!(d.source, Source::Config(cfg.to_path_buf()));
        // A config without the variable is authoritative: declared nothing.
        let d = declaration(Some((cfg, &[])), Some(4242), dir.path()).unwrap();
        assert!(!d.declared);
        assert!(d.expected.is_empty());
        // No bundle: the process's environ.
        let d = declaration(None, Some(4242), dir.path()).unwrap();
        assert_eq!(d.expected.modules, vec!["nf_nat"]);
        assert_eq!(d.source, Source::Environ(4242));
        assert_eq!(d.source.to_string(), "/proc/4242/environ");
        assert!(matches!(
            declaration(None, Some(4243), dir.path()),
            Err(ExpectError::Environ { .. })
        ));
        assert!(matches!(
            declaration(None, None, dir.path()),
            Err(ExpectError::Nowhere)
        ));
        // runc's init before exec: runc's environment, not the container's (seen for real
        // right after `runc run -d` returned).
        let init = dir.path().join("77");
        std::fs::create_dir(&init).unwrap();
        std::fs::write(
            init.join("environ"),
            b"GOMAXPROCS=\0_LIBCONTAINER_INITPIPE=3\0_LIBCONTAINER_INITTYPE=standard\0",
        )
        .unwrap();
        std::fs::write(init.join("comm"), b"runc:[2:INIT]\n").unwrap();
        let err = declaration(None, Some(77), dir.path()).unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains("runc:[2:INIT]"), "{err}");
        assert!(is_runtime_init(b"_LIBCONTAINER_INITPIPE=3\0", "sh"));
        assert!(is_runtime_init(b"", "crun"));
        assert!(!is_runtime_init(b"HOME=/\0", "sleep"));
        // LXC application containers: lxc-execute is pid 1 with the caller's environment.
        assert!(is_runtime_init(b"HOME=/root\0", "lxc-execute"));
        // Mid-execve: the new comm with runc's environ, then an empty one.
        assert!(is_runtime_init(
            b"GOMAXPROCS=\0_LIBCONTAINER_INITPIPE=3\0",
            "sleep"
        ));
        assert!(is_runtime_init(b"", "sleep"));
    }

    #[test]
    fn reads_this_process_environ() {
        let environ = read_environ(Path::new("/proc"), std::process::id()).unwrap();
        assert!(environ.split(|&b| b == 0).any(|e| e.starts_with(b"PATH=")));
    }

    fn deps(module: &str) -> Vec<String> {
        match module {
            "ip_vs_wrr" => vec![
                "ip_vs".into(),
                "nf_conntrack".into(),
                "nf_defrag_ipv6".into(),
            ],
            "ip_vs" => vec!["nf_conntrack".into(), "nf_defrag_ipv6".into()],
            _ => Vec::new(),
        }
    }

    #[test]
    fn verdicts() {
        let e = Expected::parse(b"ip_vs_wrr");
        let j = judge("ip_vs_wrr", Some(&e), &deps);
        assert_eq!(j.verdict, Verdict::Expected);
        assert_eq!(j.reason, "declared in KERNEL_MODULES");
        let j = judge("nf-conntrack", Some(&e), &deps);
        assert_eq!(j.verdict, Verdict::Expected);
        assert_eq!(
            j.reason,
            "dependency of ip_vs_wrr, declared in KERNEL_MODULES"
        );
        let j = judge("iptable_nat", Some(&e), &deps);
        assert_eq!(j.verdict, Verdict::Unexpected);
        assert!(j.reason.contains("ip_vs_wrr"), "{}", j.reason);
        // Without modules.dep only declared names are expected.
        assert_eq!(
            judge("ip_vs", Some(&e), &NoDeps).verdict,
            Verdict::Unexpected
        );
        assert_eq!(
            judge("ip-vs-wrr", Some(&e), &NoDeps).verdict,
            Verdict::Expected
        );
        let none = Expected::default();
        let j = judge("ip_vs", Some(&none), &deps);
        assert_eq!(j.verdict, Verdict::Unexpected);
        assert_eq!(j.reason, "the container declares no KERNEL_MODULES");
        assert_eq!(judge("ip_vs", None, &deps).verdict, Verdict::Host);
        assert_eq!(Verdict::Unexpected.as_str(), "unexpected");
        assert_eq!(
            serde_json::to_value(Verdict::Host).unwrap(),
            serde_json::json!("host")
        );
    }
}
