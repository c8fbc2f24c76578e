//! Container metadata from the runtimes' state on disk: name, pod, bundle, OCI config (for
//! `KERNEL_MODULES`), init pid and cgroup.
//!
//! Everything here reads files: call it off the event path (the enricher caches results).
//! Where each runtime keeps what (defaults in [`StateConfig::default`]):
//!
//! | runtime              | state (live containers)                                   | metadata |
//! |----------------------|-----------------------------------------------------------|----------|
//! | runc (plain, cri-o, podman) | `/run/runc/<id>/state.json` (`labels`: `bundle=…` + annotations; `cgroup_paths`) | bundle `config.json` |
//! | docker               | `/run/docker/runtime-runc/moby/<id>/state.json`           | `/var/lib/docker/containers/<id>/config.v2.json` (name, env) |
//! | containerd           | `/run/containerd/runc/<ns>/<id>/state.json`, task bundle `/run/containerd/io.containerd.runtime.v2.task/<ns>/<id>/{config.json,init.pid}` | |
//! | crun                 | `/run/crun/<id>/status` (`bundle`, `cgroup-path`, `pid`)  | bundle `config.json` |
//! | cri-o, podman        | (runc/crun above)                                         | `{/run,/var/lib}/containers/storage/overlay-containers/<id>/userdata/config.json`, `containers.json` (names) |
//! | iSulad               | `/var/lib/isulad/engines/<runtime>/<id>/config.v2.json` (`State.Running`, `Pid`) | same dir's `config.json` |
//!
//! A container is *running* when a state file names a live init pid (same start time when the
//! state records it), a containerd task bundle holds a live `init.pid`, or an engine's
//! config says running with a live pid.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::escape::escape_bytes;
use crate::event::Container;
use crate::host::cgroup::cgroup2_mount;
use crate::host::container::{self, is_generic_runtime, parse_cgroup_path};
#[cfg(test)]
use crate::host::declaration::BadEntry;
use crate::host::declaration::{self, Annotated, Declaration, ExpectError};

mod extra;
mod formats;
mod reader;
pub use extra::{StateDir, StateDirKind};
use formats::Partial;
pub use reader::pid_alive;
use reader::{Reader, check_id};

/// Largest state or config file read (real ones are tens of KiB).
const FILE_MAX: u64 = 4 << 20;

/// How a state root is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKind {
    /// runc / libcontainer: `<dir>/<id>/state.json`.
    Runc,
    /// crun: `<dir>/<id>/status`.
    Crun,
    /// One OCI bundle per container: `<dir>/<id>/config.json` (+ `init.pid`), containerd tasks.
    Bundle,
    /// containers/storage: `<dir>/<id>/userdata/config.json`, names in `<dir>/containers.json`.
    Storage,
    /// Docker engine: `<dir>/<id>/config.v2.json`.
    Docker,
    /// iSulad engines: `<dir>/<id>/config.v2.json` + `config.json`.
    Isulad,
}

impl StateKind {
    /// Whether entries of this kind show a container exists now (state), rather than being
    /// configuration kept for stopped containers too (metadata).
    fn enumerates(self) -> bool {
        matches!(
            self,
            StateKind::Runc | StateKind::Crun | StateKind::Bundle | StateKind::Isulad
        )
    }
}

/// One directory where a runtime keeps per-container state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateRoot {
    pub dir: PathBuf,
    pub kind: StateKind,
    /// `<dir>/<namespace>/<id>` (containerd namespaces, iSulad runtimes) instead of `<dir>/<id>`.
    pub namespaced: bool,
    /// The runtime that owns this directory (`runc` and `crun` are used by several engines).
    pub runtime: String,
}

impl StateRoot {
    pub fn new(dir: impl Into<PathBuf>, kind: StateKind, namespaced: bool, runtime: &str) -> Self {
        StateRoot {
            dir: dir.into(),
            kind,
            namespaced,
            runtime: runtime.to_string(),
        }
    }
}

/// Where to look. [`StateConfig::default`] has the runtimes' standard places; tests and
/// unusual hosts can point it anywhere ([`StateConfig::under`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateConfig {
    pub roots: Vec<StateRoot>,
    /// procfs mount, for environ and pid liveness.
    pub proc_root: PathBuf,
    /// cgroup2 mount points, most specific first, to turn runc's absolute cgroup dirs into
    /// cgroup paths.
    pub cgroup2_mounts: Vec<PathBuf>,
    /// Where runtimes that name containers by a name, not an ID, record them: a cgroup
    /// named like one of their containers counts only when this state confirms it (anyone
    /// with a delegated cgroup subtree can name a cgroup `lxc.payload.x`).
    pub named: NamedState,
}

/// State directories of the name-keyed runtimes (root-owned on a sane host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedState {
    /// LXC container directories (`<dir>/<name>/config`).
    pub lxc: Vec<PathBuf>,
    /// systemd-machined's registry (`<dir>/<name>`), nspawn machines.
    pub machines: PathBuf,
    /// libvirt-lxc domains (`<dir>/<name>.xml`).
    pub libvirt_lxc: PathBuf,
}

impl NamedState {
    /// Whether runtime state confirms that a container of this name-keyed runtime exists.
    /// Runtimes keyed by ID are not this function's business (true).
    pub fn confirms(&self, runtime: &str, name: &str) -> bool {
        if check_id(name).is_err() {
            return false;
        }
        match runtime {
            container::LXC => self
                .lxc
                .iter()
                .any(|d| d.join(name).join("config").is_file()),
            container::NSPAWN => self.machines.join(name).is_file(),
            container::LIBVIRT_LXC => {
                // `lxc-<pid>-<name>`: libvirt names its scope after the domain.
                let domain = name
                    .strip_prefix("lxc-")
                    .and_then(|r| r.split_once('-'))
                    .map_or(name, |(_, d)| d);
                self.libvirt_lxc.join(format!("{domain}.xml")).is_file()
            }
            _ => true,
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig::under(Path::new("/"))
    }
}

impl StateConfig {
    /// The standard layout with every state root below `prefix` (procfs and cgroup mounts
    /// too), e.g. a temporary directory holding fixtures.
    pub fn under(prefix: &Path) -> StateConfig {
        use StateKind::*;
        let at = |p: &str| prefix.join(p.trim_start_matches('/'));
        let root = |p: &str, kind, ns, rt| StateRoot::new(at(p), kind, ns, rt);
        StateConfig {
            roots: vec![
                root("/run/runc", Runc, false, container::RUNC),
                root("/run/docker/runtime-runc", Runc, true, container::DOCKER),
                root("/run/containerd/runc", Runc, true, container::CONTAINERD),
                root(
                    "/run/containerd/io.containerd.runtime.v2.task",
                    Bundle,
                    true,
                    container::CONTAINERD,
                ),
                root(
                    "/run/containerd/io.containerd.runtime.v1.linux",
                    Bundle,
                    true,
                    container::CONTAINERD,
                ),
                root("/run/crun", Crun, false, container::CRUN),
                root(
                    "/var/lib/docker/containers",
                    Docker,
                    false,
                    container::DOCKER,
                ),
                root("/var/lib/isulad/engines", Isulad, true, container::ISULAD),
                root(
                    "/run/containers/storage/overlay-containers",
                    Storage,
                    false,
                    container::CRIO,
                ),
                root(
                    "/var/lib/containers/storage/overlay-containers",
                    Storage,
                    false,
                    container::PODMAN,
                ),
            ],
            proc_root: at("/proc"),
            cgroup2_mounts: vec![at("/sys/fs/cgroup/unified"), at("/sys/fs/cgroup")],
            named: NamedState {
                lxc: vec![at("/var/lib/lxc")],
                machines: at("/run/systemd/machines"),
                libvirt_lxc: at("/run/libvirt/lxc"),
            },
        }
    }

    /// The defaults, with the cgroup2 root put first (see [`cgroup2_mount`]).
    pub fn detect() -> StateConfig {
        let mut cfg = StateConfig::default();
        if let Some(m) = cgroup2_mount() {
            cfg.cgroup2_mounts.retain(|p| p != &m);
            cfg.cgroup2_mounts.insert(0, m);
        }
        cfg
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source} (kmodmon needs root to read container runtime state)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {source} (unknown runtime version? please report it)")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} is larger than {FILE_MAX} bytes; skipped")]
    TooLarge { path: PathBuf },
    #[error("{0:?} is not a container ID or name (empty, '.', '..', or contains '/' or NUL)")]
    BadId(String),
}

/// What kmodmon learnt about one container from the runtime state on disk. Strings from
/// these files are escaped for display.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerMeta {
    /// The runtime's ID (the name, for plain runc).
    pub id: String,
    /// Best-known runtime: from annotations (podman, cri-o, containerd CRI), else the
    /// directory's owner.
    pub runtime: String,
    /// Container name: k8s container name, docker/iSulad/podman name.
    pub name: Option<String>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_uid: Option<String>,
    /// The container's init (first) process.
    pub pid: Option<u32>,
    pub running: bool,
    /// cgroup v2 path, as in /proc/PID/cgroup.
    pub cgroup_path: Option<String>,
    pub bundle: Option<PathBuf>,
    /// The OCI config.json that was read.
    pub config_path: Option<PathBuf>,
    /// `process.env` and the file it came from (OCI config, else an engine's config).
    pub env: Option<(PathBuf, Vec<String>)>,
    /// OCI annotations and engine labels (raw).
    pub annotations: BTreeMap<String, String>,
    /// The pod's annotations as its sandbox's state recorded them (cri-o: the sandbox
    /// config's `io.kubernetes.cri-o.Annotations`), and that file. Empty when unknown.
    pub pod_annotations: BTreeMap<String, String>,
    pub pod_config_path: Option<PathBuf>,
    /// Files this was read from.
    pub sources: Vec<PathBuf>,
}

const POD_NAME: [&str; 2] = ["io.kubernetes.pod.name", "io.kubernetes.cri.sandbox-name"];
const POD_NAMESPACE: [&str; 2] = [
    "io.kubernetes.pod.namespace",
    "io.kubernetes.cri.sandbox-namespace",
];
const POD_UID: [&str; 2] = ["io.kubernetes.pod.uid", "io.kubernetes.cri.sandbox-uid"];
const CONTAINER_NAME: [&str; 2] = [
    "io.kubernetes.container.name",
    "io.kubernetes.cri.container-name",
];

impl ContainerMeta {
    fn annotation(&self, keys: &[&str]) -> Option<String> {
        keys.iter()
            .find_map(|k| self.annotations.get(*k))
            .filter(|v| !v.is_empty())
            .map(|v| escape_bytes(v.as_bytes()))
    }

    /// The container as the cgroup path names it, completed with this metadata.
    pub fn to_container(&self) -> Container {
        let mut c = self
            .cgroup_path
            .as_deref()
            .and_then(parse_cgroup_path)
            .unwrap_or_else(|| Container {
                id: escape_bytes(self.id.as_bytes()),
                runtime: String::new(),
                ..Container::default()
            });
        self.apply_to(&mut c);
        c
    }

    /// Completes a container parsed from a cgroup path: a generic runtime (`cri`,
    /// `unknown`) is replaced by what the state knows, and name and pod fill what is empty.
    /// When the state's ID differs from the path's (a runc container whose cgroupsPath
    /// mimics another runtime), the state's ID becomes the name.
    pub fn apply_to(&self, c: &mut Container) {
        if is_generic_runtime(&c.runtime) && !self.runtime.is_empty() {
            c.runtime = self.runtime.clone();
        }
        if c.name.is_none() {
            c.name = self
                .name
                .clone()
                .or_else(|| (self.id != c.id).then(|| escape_bytes(self.id.as_bytes())));
        }
        if c.pod_name.is_none() {
            c.pod_name = self.pod_name.clone();
        }
        if c.pod_namespace.is_none() {
            c.pod_namespace = self.pod_namespace.clone();
        }
        if c.pod_uid.is_none() {
            c.pod_uid = self.pod_uid.clone();
        }
    }

    /// The container's declaration (see [`declaration::resolve`]): its annotations, else
    /// `KERNEL_MODULES` from the OCI config's `process.env`, else from the environ of `pid`
    /// (or the init pid).
    pub fn declaration(
        &self,
        proc_root: &Path,
        pid: Option<u32>,
    ) -> Result<Declaration, ExpectError> {
        let env = self.env.as_ref().map(|(p, e)| (p.as_path(), e.as_slice()));
        declaration::resolve(
            self.annotated_declarations(),
            declaration::declaration(env, self.pid.or(pid), proc_root),
        )
    }

    /// Its annotations, as the declaration reads them.
    pub fn annotated(&self) -> Annotated<'_> {
        Annotated {
            own: &self.annotations,
            own_file: self
                .config_path
                .as_deref()
                .or_else(|| self.sources.first().map(PathBuf::as_path)),
            pod: &self.pod_annotations,
            pod_file: self.pod_config_path.as_deref(),
        }
    }

    /// The declarations its annotations make, most specific first.
    pub fn annotated_declarations(&self) -> Vec<declaration::Found> {
        declaration::from_annotations(&self.annotated())
    }

    fn merge(&mut self, p: Partial, source: PathBuf, runtime: &str, rank: u8, best: &mut u8) {
        if rank > *best {
            self.runtime = runtime.to_string();
            *best = rank;
        }
        self.pid = self.pid.or(p.pid);
        self.cgroup_path = self.cgroup_path.take().or(p.cgroup_path);
        self.bundle = self.bundle.take().or(p.bundle);
        self.name = self
            .name
            .take()
            .or(p.name.map(|n| escape_bytes(n.as_bytes())));
        if self.env.is_none() || (p.config_path.is_some() && self.config_path.is_none()) {
            self.env = p.env.or(self.env.take());
        }
        self.config_path = self.config_path.take().or(p.config_path);
        for (k, v) in p.labels {
            self.annotations.entry(k).or_insert(v);
        }
        if self.pod_config_path.is_none() && p.pod_config_path.is_some() {
            self.pod_annotations = p.pod_annotations;
            self.pod_config_path = p.pod_config_path;
        }
        self.sources.push(source);
    }

    /// Runtime, name and pod from annotations, once every file is merged.
    fn finish(&mut self) {
        let a = &self.annotations;
        let by_annotation = if a.get("io.container.manager").map(String::as_str) == Some("libpod") {
            Some(container::PODMAN)
        } else if a.keys().any(|k| k.starts_with("io.kubernetes.cri-o.")) {
            Some(container::CRIO)
        } else if a.keys().any(|k| k.starts_with("io.kubernetes.cri.")) {
            Some(container::CONTAINERD)
        } else {
            None
        };
        if let Some(rt) = by_annotation {
            self.runtime = rt.to_string();
        }
        if let Some(n) = self.annotation(&CONTAINER_NAME) {
            self.name = Some(n);
        }
        self.pod_name = self.annotation(&POD_NAME);
        self.pod_namespace = self.annotation(&POD_NAMESPACE);
        self.pod_uid = self.annotation(&POD_UID);
    }
}

/// How much a root's runtime label says: engines' own dirs beat shared runc/crun roots.
fn rank(root: &StateRoot) -> u8 {
    match root.kind {
        StateKind::Runc | StateKind::Crun if is_generic_runtime(&root.runtime) => 1,
        StateKind::Storage => 1,
        _ => 2,
    }
}

/// The result of a lookup: the container if any file knew it, and the files that could not
/// be read or parsed (log them; they do not stop the lookup).
#[derive(Debug, Default)]
pub struct Lookup {
    pub meta: Option<ContainerMeta>,
    pub problems: Vec<StateError>,
}

/// Everything the state roots say about the container with this runtime ID (or runc name).
pub fn lookup(cfg: &StateConfig, id: &str) -> Lookup {
    let mut reader = Reader::new(cfg);
    let meta = reader.lookup(id);
    Lookup {
        meta,
        problems: reader.problems,
    }
}

/// What container `id`'s OCI bundle says, for a container its runtime (`runc`, `crun`) is
/// still creating and has written no state for: env (the declaration), annotations and
/// `linux.cgroupsPath` (default: none; a runtime then picks `/<id>`-like paths itself).
pub fn from_bundle(cfg: &StateConfig, id: &str, runtime: &str, bundle: &Path) -> Lookup {
    let mut reader = Reader::new(cfg);
    let meta = reader.bundle(id, runtime, bundle);
    Lookup {
        meta,
        problems: reader.problems,
    }
}

/// The container a cgroup path belongs to, from runtime state: by the ID the path names
/// (see [`parse_cgroup_path`]), else by the path's last components taken as runc container
/// names, accepted only when that container's recorded cgroup contains `cgroup_path`.
/// Containers whose state ID appears nowhere in their path (a runc container run with a
/// cgroupsPath that mimics another runtime) are found by [`StateIndex::by_cgroup_path`].
pub fn lookup_cgroup(cfg: &StateConfig, cgroup_path: &str) -> Lookup {
    let mut reader = Reader::new(cfg);
    let parsed = parse_cgroup_path(cgroup_path).map(|c| c.id);
    let mut meta = parsed.as_deref().and_then(|id| reader.lookup(id));
    if meta.is_none() {
        for name in cgroup_path.rsplit('/').filter(|c| !c.is_empty()).take(4) {
            if check_id(name).is_err() || parsed.as_deref() == Some(name) {
                continue;
            }
            if let Some(m) = reader.lookup(name)
                && m.cgroup_path
                    .as_deref()
                    .is_some_and(|cg| contains(cg, cgroup_path))
            {
                meta = Some(m);
                break;
            }
        }
    }
    Lookup {
        meta,
        problems: reader.problems,
    }
}

/// Whether cgroup `inner` is `outer` or below it.
fn contains(outer: &str, inner: &str) -> bool {
    let outer = outer.trim_end_matches('/');
    inner
        .strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The running containers the state roots know, by ID and by cgroup path. Build it at
/// startup and rebuild it (rate-limited) when a cgroup path is not found.
#[derive(Debug, Default)]
pub struct StateIndex {
    by_id: HashMap<String, ContainerMeta>,
    by_cgroup: HashMap<String, String>,
    pub problems: Vec<StateError>,
}

impl StateIndex {
    /// Reads every state root. Missing roots are normal (that runtime is not installed).
    pub fn scan(cfg: &StateConfig) -> StateIndex {
        let mut reader = Reader::new(cfg);
        let mut ids = std::collections::BTreeSet::new();
        for root in cfg.roots.iter().filter(|r| r.kind.enumerates()) {
            for dir in reader.container_dirs(root) {
                if let Some(id) = dir.file_name().and_then(|n| n.to_str()) {
                    ids.insert(id.to_string());
                }
            }
        }
        let mut index = StateIndex::default();
        for id in ids {
            if let Some(meta) = reader.lookup(&id).filter(|m| m.running) {
                if let Some(cg) = &meta.cgroup_path {
                    index.by_cgroup.insert(cg.clone(), id.clone());
                }
                index.by_id.insert(id, meta);
            }
        }
        index.problems = reader.problems;
        index
    }

    pub fn by_id(&self, id: &str) -> Option<&ContainerMeta> {
        self.by_id.get(id)
    }

    /// The container whose cgroup is `path` or contains it (sub-cgroups such as `/init`).
    pub fn by_cgroup_path(&self, path: &str) -> Option<&ContainerMeta> {
        let mut p = path.trim_end_matches('/');
        while !p.is_empty() {
            if let Some(id) = self.by_cgroup.get(p) {
                return self.by_id.get(id);
            }
            p = &p[..p.rfind('/')?];
        }
        None
    }

    pub fn iter(&self) -> impl Iterator<Item = &ContainerMeta> {
        self.by_id.values()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Each running container with its declaration (reads configs and /proc), sorted by ID
    /// (for tests of the state readers; the product reads containers through the registry).
    #[cfg(test)]
    pub fn running_containers(&self, cfg: &StateConfig) -> Vec<RunningContainer> {
        let mut out: Vec<RunningContainer> = self
            .by_id
            .values()
            .map(|meta| RunningContainer {
                container: meta.to_container(),
                declaration: meta
                    .declaration(&cfg.proc_root, None)
                    .map_err(|e| e.to_string()),
                meta: meta.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.meta.id.cmp(&b.meta.id));
        out
    }
}

/// A running container and what it declares (tests of the state readers).
#[cfg(test)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningContainer {
    pub container: Container,
    /// Bundle, config path, pid, cgroup and annotations.
    pub meta: ContainerMeta,
    /// Its `KERNEL_MODULES`, or why it could not be read.
    pub declaration: Result<Declaration, String>,
}

#[cfg(test)]
impl RunningContainer {
    /// Declared valid module names (empty when nothing or nothing readable was declared).
    pub fn expected_modules(&self) -> &[String] {
        self.declaration
            .as_ref()
            .map_or(&[], |d| d.expected.modules.as_slice())
    }

    /// Declared entries that are not module names.
    pub fn bad_entries(&self) -> &[BadEntry] {
        self.declaration
            .as_ref()
            .map_or(&[], |d| d.expected.bad.as_slice())
    }
}

/// Every running container with its declaration, and the state files that could not be read
/// (tests of the state readers).
#[cfg(test)]
pub fn running_containers(cfg: &StateConfig) -> (Vec<RunningContainer>, Vec<StateError>) {
    let index = StateIndex::scan(cfg);
    let list = index.running_containers(cfg);
    (list, index.problems)
}

#[cfg(test)]
mod tests;
