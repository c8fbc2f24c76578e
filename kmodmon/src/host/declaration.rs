//! Expected modules: what a container declares, where that declaration is read from, and the
//! verdict on a module event.
//!
//! A container declares the modules it needs in one of four places, most specific first
//! ([`resolve`] takes the first that is there; the others are kept only to say that they
//! disagree):
//!
//! 1. the pod annotation `kernel-modules.kmodmon.io/<container name>` ([`CONTAINER_ANNOTATION_PREFIX`]),
//! 2. the pod annotation `kmodmon.io/kernel-modules` ([`POD_ANNOTATION`], every container of the pod),
//! 3. `KERNEL_MODULES` in the container's environment ([`ENV_VAR`]),
//! 4. Kata Containers' pod annotation `io.katacontainers.config.agent.kernel_modules`
//!    ([`KATA_ANNOTATION`]).
//!
//! Annotations are read as the CRI runtime recorded them in its state (see
//! [`crate::host::runtime_state`]); never from the API server.
//!
//! - [`Expected::parse`] turns `ip_vs, ip_vs_wrr,` into normalized names; entries no module
//!   can have are kept as [`BadEntry`] with the reason, never dropped silently. Empty items
//!   (a trailing comma, `a,,b`) and spaces around items are tolerated. [`Expected::parse_kata`]
//!   reads Kata's `name param=value ...; name2` list.
//! - [`declaration`] reads `KERNEL_MODULES` from the OCI config's `process.env` when the bundle
//!   was found, else from `/proc/<pid>/environ` of the container's first process.
//! - [`from_annotations`] finds the annotation declarations, [`resolve`] picks one.
//! - [`judge`] gives `host`, `expected` (declared, or a dependency of a declared module) or
//!   `unexpected`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::escape::escape_bytes;
pub use crate::event::Verdict;
use crate::modname;

/// The environment variable a container declares its modules in.
pub const ENV_VAR: &str = "KERNEL_MODULES";
/// The pod annotation that declares modules for every container of the pod.
pub const POD_ANNOTATION: &str = "kmodmon.io/kernel-modules";
/// The pod annotation prefix that declares modules for one container: the Kubernetes container
/// name follows (as AppArmor's `container.apparmor.security.beta.kubernetes.io/<name>`).
pub const CONTAINER_ANNOTATION_PREFIX: &str = "kernel-modules.kmodmon.io/";
/// Kata Containers' pod annotation: modules its agent loads into the guest kernel,
/// `;`-separated, each `name [param=value ...]`.
pub const KATA_ANNOTATION: &str = "io.katacontainers.config.agent.kernel_modules";
/// Annotations that mark a pod's sandbox (pause) container: containerd's CRI, cri-o.
const SANDBOX_TYPE: [&str; 2] = [
    "io.kubernetes.cri.container-type",
    "io.kubernetes.cri-o.ContainerType",
];
/// Annotations holding the Kubernetes container name: cri-o (and kubelet labels), containerd.
const K8S_CONTAINER_NAME: [&str; 2] = [
    "io.kubernetes.container.name",
    "io.kubernetes.cri.container-name",
];

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
    /// Parses a `KERNEL_MODULES` value (or a kmodmon annotation's: the same syntax). Bytes,
    /// because `/proc/PID/environ` need not be UTF-8.
    pub fn parse(value: &[u8]) -> Expected {
        let mut out = Expected::default();
        for item in value.split(|&b| b == b',') {
            out.push_item(item);
        }
        out
    }

    /// Parses Kata Containers' `kernel_modules` annotation: `;`-separated entries, each a
    /// module name followed by its parameters (whitespace-separated), as Kata's runtime splits
    /// it (`e1000e InterruptThrottleRate=3000,3000,3000 EEE=1; i915`). Parameters are not
    /// judged; empty entries are skipped.
    pub fn parse_kata(value: &[u8]) -> Expected {
        let mut out = Expected::default();
        for entry in value.split(|&b| b == b';') {
            if let Some(name) = entry
                .split(|b| b.is_ascii_whitespace())
                .find(|w| !w.is_empty())
            {
                out.push_item(name);
            }
        }
        out
    }

    /// One entry: a module name, or a bad entry with the reason; blanks are skipped.
    fn push_item(&mut self, item: &[u8]) {
        let item = item.trim_ascii();
        if item.is_empty() {
            return;
        }
        let text = match std::str::from_utf8(item) {
            Ok(t) => t,
            Err(_) => {
                self.bad.push(BadEntry {
                    entry: escape_bytes(item),
                    reason: "not valid UTF-8".to_string(),
                });
                return;
            }
        };
        match modname::validate(text) {
            Ok(name) if self.modules.contains(&name) => {}
            Ok(name) => self.modules.push(name),
            Err(e) => self.bad.push(BadEntry {
                entry: escape_bytes(item),
                reason: escape_bytes(e.to_string().as_bytes()),
            }),
        }
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
    /// A pod annotation as the runtime recorded it: the key, and the state file it was read
    /// from (the container's OCI config, runc's state, or the pod sandbox's config for cri-o).
    Annotation { key: String, file: Option<PathBuf> },
}

impl Source {
    /// What the declaration is called in messages: `KERNEL_MODULES`, or the annotation key.
    pub fn what(&self) -> String {
        match self {
            Source::Config(_) | Source::Environ(_) => ENV_VAR.to_string(),
            Source::Annotation { key, .. } => {
                format!("annotation {}", escape_bytes(key.as_bytes()))
            }
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Config(p) => write!(f, "{}", p.display()),
            Source::Environ(pid) => write!(f, "/proc/{pid}/environ"),
            Source::Annotation { key, file } => {
                write!(f, "annotation {}", escape_bytes(key.as_bytes()))?;
                match file {
                    Some(p) => write!(f, " in {}", p.display()),
                    None => Ok(()),
                }
            }
        }
    }
}

/// A container's declaration and where it came from. `declared` is false when no source had
/// one (then `expected` is empty and `source` is where `KERNEL_MODULES` was looked for).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Declaration {
    pub declared: bool,
    pub expected: Expected,
    pub source: Source,
    /// Lower-precedence declarations that list other modules than `expected` (they are not
    /// used; see [`resolve`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub overridden: Vec<Overridden>,
}

/// A declaration that lost to a more specific one and says something else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Overridden {
    pub source: Source,
    pub modules: Vec<String>,
}

impl Declaration {
    /// `KERNEL_MODULES`, or the annotation the declaration came from.
    pub fn what(&self) -> String {
        self.source.what()
    }

    /// `KERNEL_MODULES=ip_vs,ip_vs_wrr (/proc/42/environ)`, or for an annotation
    /// `kmodmon.io/kernel-modules=ip_vs (annotation in /run/.../config.json)`.
    pub fn describe(&self) -> String {
        let modules = self.expected.modules.join(",");
        match &self.source {
            Source::Annotation { key, file } => format!(
                "{}={modules} (annotation{})",
                escape_bytes(key.as_bytes()),
                file.as_ref()
                    .map(|f| format!(" in {}", f.display()))
                    .unwrap_or_default()
            ),
            other => format!("{ENV_VAR}={modules} ({other})"),
        }
    }

    /// One line per disagreement, for warnings and details.
    pub fn disagreements(&self) -> Vec<String> {
        self.overridden
            .iter()
            .map(|o| {
                format!(
                    "{} ({}) says {}; {} wins",
                    o.source.what(),
                    o.source,
                    if o.modules.is_empty() {
                        "nothing".to_string()
                    } else {
                        o.modules.join(",")
                    },
                    self.what()
                )
            })
            .collect()
    }
}

/// The annotations of one container, as its runtime state recorded them.
#[derive(Clone, Copy, Debug)]
pub struct Annotated<'a> {
    /// The container's own OCI annotations (with containerd, pod annotations passed through
    /// by the runtime handler's `pod_annotations`) and where they were read.
    pub own: &'a BTreeMap<String, String>,
    pub own_file: Option<&'a Path>,
    /// The pod's annotations from the pod sandbox's state (cri-o) and where they were read.
    pub pod: &'a BTreeMap<String, String>,
    pub pod_file: Option<&'a Path>,
}

/// A declaration found in annotations, and its rank (0 most specific).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub rank: u8,
    pub source: Source,
    pub expected: Expected,
}

/// The rank of `KERNEL_MODULES` among the sources (between the kmodmon and Kata annotations).
const ENV_RANK: u8 = 2;

impl Annotated<'_> {
    fn get(&self, key: &str) -> Option<(&str, Option<&Path>)> {
        if let Some(v) = self.own.get(key) {
            return Some((v.as_str(), self.own_file));
        }
        self.pod.get(key).map(|v| (v.as_str(), self.pod_file))
    }

    fn any(&self, keys: &[&str]) -> Option<&str> {
        keys.iter().find_map(|k| self.get(k)).map(|(v, _)| v)
    }

    /// Whether this is a pod's sandbox (pause) container, which declares nothing of the pod's.
    pub fn is_sandbox(&self) -> bool {
        self.any(&SANDBOX_TYPE) == Some("sandbox")
    }

    /// The Kubernetes container name, as recorded (not escaped: a lookup key).
    pub fn container_name(&self) -> Option<&str> {
        self.any(&K8S_CONTAINER_NAME).filter(|n| !n.is_empty())
    }
}

/// The declarations in a container's annotations, most specific first: the per-container
/// kmodmon annotation (rank 0), the pod-wide one (1), Kata's (3). A pod's sandbox container
/// gets none of them.
pub fn from_annotations(a: &Annotated<'_>) -> Vec<Found> {
    if a.is_sandbox() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut add = |rank, key: String, parse: fn(&[u8]) -> Expected| {
        if let Some((value, file)) = a.get(&key) {
            out.push(Found {
                rank,
                expected: parse(value.as_bytes()),
                source: Source::Annotation {
                    key,
                    file: file.map(Path::to_path_buf),
                },
            });
        }
    };
    if let Some(name) = a.container_name() {
        add(
            0,
            format!("{CONTAINER_ANNOTATION_PREFIX}{name}"),
            Expected::parse,
        );
    }
    add(1, POD_ANNOTATION.to_string(), Expected::parse);
    add(3, KATA_ANNOTATION.to_string(), Expected::parse_kata);
    out
}

/// Picks a container's declaration: the most specific source that has one — an annotation
/// found in its state, or `env` (its `KERNEL_MODULES`, read from the OCI config or the
/// process). Sources that lose and list other modules are kept in `overridden`.
///
/// While `env` cannot be read yet (a retryable error), the answer waits for it unless a
/// kmodmon annotation decides anyway; Kata's annotation decides only when the environment has
/// no `KERNEL_MODULES` or cannot be read at all.
pub fn resolve(
    annotated: Vec<Found>,
    env: Result<Declaration, ExpectError>,
) -> Result<Declaration, ExpectError> {
    let mut candidates = annotated;
    let env_source = match env {
        Ok(d) if d.declared => {
            candidates.push(Found {
                rank: ENV_RANK,
                source: d.source,
                expected: d.expected,
            });
            None
        }
        Ok(d) => Some(d.source),
        Err(e) if e.is_retryable() && !candidates.iter().any(|c| c.rank < ENV_RANK) => {
            return Err(e);
        }
        Err(e) if candidates.is_empty() => return Err(e),
        Err(_) => None,
    };
    candidates.sort_by_key(|c| c.rank);
    let mut rest = candidates.into_iter();
    let Some(first) = rest.next() else {
        return Ok(Declaration {
            declared: false,
            expected: Expected::default(),
            // Ok(undeclared) is the only way here with no candidate.
            source: env_source.unwrap_or(Source::Environ(0)),
            overridden: Vec::new(),
        });
    };
    let overridden = rest
        .filter(|c| !same_modules(&c.expected, &first.expected))
        .map(|c| Overridden {
            source: c.source,
            modules: c.expected.modules,
        })
        .collect();
    Ok(Declaration {
        declared: true,
        expected: first.expected,
        source: first.source,
        overridden,
    })
}

/// Whether two declarations name the same modules (order and bad entries aside).
fn same_modules(a: &Expected, b: &Expected) -> bool {
    let set = |e: &Expected| {
        e.modules
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    set(a) == set(b)
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
/// crun, or a runtime re-executed from a sealed memfd copy of itself, which the kernel names
/// after the memfd or the descriptor's number: crun's `memfd:crun_clon` on 6.1, `3` on 5.10),
/// LXC's init for application containers (`lxc-execute` runs itself, or `init.lxc`, as the
/// container's pid 1 with the caller's environment; the program it starts has the
/// container's), or an empty environ (mid-execve; a container's process always has some).
pub fn is_runtime_init(environ: &[u8], comm: &str) -> bool {
    environ.is_empty()
        || comm.starts_with("runc:[")
        || comm == "runc"
        || comm == "crun"
        || crate::host::runtime_process::is_exec_from_fd(comm)
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
            overridden: Vec::new(),
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
        overridden: Vec::new(),
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
    judge_as(module, container, deps, ENV_VAR)
}

/// [`judge`], naming the declaration `what` (`KERNEL_MODULES`, or the annotation it came from:
/// [`Declaration::what`]) in the reason.
pub fn judge_as(
    module: &str,
    container: Option<&Expected>,
    deps: &dyn DepResolver,
    what: &str,
) -> Judgement {
    let Some(expected) = container else {
        return Judgement {
            verdict: Verdict::Host,
            reason: "not in a container".to_string(),
        };
    };
    if expected.declares(module) {
        return Judgement {
            verdict: Verdict::Expected,
            reason: format!("declared in {what}"),
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
                reason: format!("dependency of {declared}, declared in {what}"),
            };
        }
    }
    let reason = if expected.modules.is_empty() {
        format!("the container declares no {what}")
    } else {
        format!(
            "not in {what}={} nor their dependencies",
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
        // crun re-executed from its sealed memfd copy, before it execs the container program.
        assert!(is_runtime_init(b"PATH=/bin\0", "memfd:crun_clon"));
        assert!(is_runtime_init(b"PATH=/bin\0", "3"), "crun on 5.10");
        assert!(!is_runtime_init(b"PATH=/bin\0", "sleep"));
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
    fn parses_kata_module_lists() {
        // Kata's documented example: parameters follow the name; ';' separates modules.
        let e = Expected::parse_kata(
            b"e1000e InterruptThrottleRate=3000,3000,3000 EEE=1; i915 enable_ppgtt=0",
        );
        assert_eq!(e.modules, vec!["e1000e", "i915"]);
        assert!(e.bad.is_empty());
        let e = Expected::parse_kata(b"  ;ip-vs;\tip_vs_wrr\t weight=1 ;; ip_vs");
        assert_eq!(e.modules, vec!["ip_vs", "ip_vs_wrr"]);
        // A comma list is one (bad) name to Kata too.
        let e = Expected::parse_kata(b"ip_vs,ip_vs_wrr");
        assert!(e.modules.is_empty());
        assert_eq!(e.bad[0].entry, "ip_vs,ip_vs_wrr");
        assert!(Expected::parse_kata(b" ; ").is_empty());
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn env_decl(v: Option<&str>) -> Result<Declaration, ExpectError> {
        Ok(Declaration {
            declared: v.is_some(),
            expected: v.map(|v| Expected::parse(v.as_bytes())).unwrap_or_default(),
            source: Source::Environ(7),
            overridden: Vec::new(),
        })
    }

    #[test]
    fn precedence_container_annotation_pod_annotation_env_kata() {
        let own = map(&[
            ("io.kubernetes.cri.container-name", "web"),
            ("kernel-modules.kmodmon.io/web", "nf_nat"),
            ("kernel-modules.kmodmon.io/other", "dummy"),
            (POD_ANNOTATION, "ip_vs"),
        ]);
        let pod = map(&[(KATA_ANNOTATION, "wireguard")]);
        let a = Annotated {
            own: &own,
            own_file: Some(Path::new("/c/config.json")),
            pod: &pod,
            pod_file: Some(Path::new("/s/config.json")),
        };
        let found = from_annotations(&a);
        let keys: Vec<String> = found.iter().map(|f| f.source.what()).collect();
        assert_eq!(
            keys,
            [
                "annotation kernel-modules.kmodmon.io/web",
                "annotation kmodmon.io/kernel-modules",
                "annotation io.katacontainers.config.agent.kernel_modules"
            ]
        );
        let d = resolve(found.clone(), env_decl(Some("ip_vs"))).unwrap();
        assert_eq!(d.expected.modules, ["nf_nat"]);
        // The env agrees with the pod-wide annotation: both differ from the winner.
        assert_eq!(d.overridden.len(), 3);
        assert_eq!(
            d.overridden[2].source,
            Source::Annotation {
                key: KATA_ANNOTATION.into(),
                file: Some("/s/config.json".into())
            }
        );
        // Without the kmodmon annotations, KERNEL_MODULES beats Kata's.
        let kata_only: Vec<Found> = found.iter().filter(|f| f.rank == 3).cloned().collect();
        let d = resolve(kata_only.clone(), env_decl(Some("ip_vs"))).unwrap();
        assert_eq!(d.source, Source::Environ(7));
        assert_eq!(d.overridden[0].modules, ["wireguard"]);
        // No KERNEL_MODULES: Kata's decides.
        let d = resolve(kata_only.clone(), env_decl(None)).unwrap();
        assert_eq!(d.expected.modules, ["wireguard"]);
        assert!(d.overridden.is_empty());
        // Nothing anywhere: undeclared, looked for in the environment.
        let d = resolve(Vec::new(), env_decl(None)).unwrap();
        assert!(!d.declared);
        assert_eq!(d.source, Source::Environ(7));
    }

    #[test]
    fn an_unreadable_environment_waits_unless_a_kmodmon_annotation_decides() {
        let starting = || {
            Err(ExpectError::Starting {
                pid: 3,
                comm: "runc:[2:INIT]".into(),
            })
        };
        let own = map(&[(POD_ANNOTATION, "ip_vs")]);
        let empty = BTreeMap::new();
        let a = Annotated {
            own: &own,
            own_file: None,
            pod: &empty,
            pod_file: None,
        };
        let d = resolve(from_annotations(&a), starting()).unwrap();
        assert_eq!(d.expected.modules, ["ip_vs"]);
        assert_eq!(d.describe(), "kmodmon.io/kernel-modules=ip_vs (annotation)");
        let kata = map(&[(KATA_ANNOTATION, "ip_vs")]);
        let a = Annotated {
            own: &kata,
            own_file: None,
            pod: &empty,
            pod_file: None,
        };
        let err = resolve(from_annotations(&a), starting()).unwrap_err();
        assert!(err.is_retryable(), "Kata's waits for KERNEL_MODULES: {err}");
        // Gone for good: Kata's is what is left.
        let d = resolve(from_annotations(&a), Err(ExpectError::Nowhere)).unwrap();
        assert_eq!(d.expected.modules, ["ip_vs"]);
        assert!(resolve(Vec::new(), Err(ExpectError::Nowhere)).is_err());
    }

    #[test]
    fn a_sandbox_container_takes_none_of_the_pods_annotations() {
        for (k, v) in [
            ("io.kubernetes.cri.container-type", "sandbox"),
            ("io.kubernetes.cri-o.ContainerType", "sandbox"),
        ] {
            let own = map(&[
                (k, v),
                (POD_ANNOTATION, "ip_vs"),
                (KATA_ANNOTATION, "ip_vs"),
            ]);
            let empty = BTreeMap::new();
            let a = Annotated {
                own: &own,
                own_file: None,
                pod: &empty,
                pod_file: None,
            };
            assert!(a.is_sandbox());
            assert!(from_annotations(&a).is_empty());
        }
    }

    #[test]
    fn annotation_values_are_escaped_where_shown() {
        let own = map(&[
            ("io.kubernetes.cri.container-name", "w\x1beb"),
            (POD_ANNOTATION, "ip_vs,\x1b[31m"),
        ]);
        let empty = BTreeMap::new();
        let a = Annotated {
            own: &own,
            own_file: None,
            pod: &empty,
            pod_file: None,
        };
        let d = resolve(from_annotations(&a), env_decl(None)).unwrap();
        assert_eq!(d.expected.modules, ["ip_vs"]);
        assert_eq!(d.expected.bad[0].entry, "\\x1b[31m");
        assert!(!d.describe().contains('\x1b'));
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
        let j = judge_as(
            "ip_vs_wrr",
            Some(&e),
            &deps,
            "annotation kmodmon.io/kernel-modules",
        );
        assert_eq!(j.reason, "declared in annotation kmodmon.io/kernel-modules");
        assert_eq!(Verdict::Unexpected.as_str(), "unexpected");
        assert_eq!(
            serde_json::to_value(Verdict::Host).unwrap(),
            serde_json::json!("host")
        );
    }
}
