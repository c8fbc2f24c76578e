//! The runtimes' files, as serde types, and what each says about a container ([`Partial`]).
//! Only the fields kmodmon uses are declared; everything else is ignored, and every field is
//! optional, because these files change between runtime versions.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What one file (or one state directory) told about a container.
#[derive(Clone, Debug, Default)]
pub(super) struct Partial {
    pub pid: Option<u32>,
    /// The pid's start time in clock ticks after boot (field 22 of /proc/PID/stat).
    pub pid_start: Option<u64>,
    /// The engine's own "running" flag (docker, iSulad).
    pub running_flag: Option<bool>,
    pub cgroup_path: Option<String>,
    pub bundle: Option<PathBuf>,
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub env: Option<(PathBuf, Vec<String>)>,
    pub config_path: Option<PathBuf>,
    /// The pod's annotations from its sandbox's config (cri-o), and that file.
    pub pod_annotations: BTreeMap<String, String>,
    pub pod_config_path: Option<PathBuf>,
}

/// libcontainer's state.json (runc): `<root>/<id>/state.json`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RuncState {
    pub init_process_pid: Option<u32>,
    pub init_process_start: Option<u64>,
    pub config: RuncConfig,
    /// Controller → absolute cgroup directory; "" is the cgroup2 (unified) hierarchy.
    pub cgroup_paths: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RuncConfig {
    /// `bundle=/path` and the OCI annotations as `key=value`.
    pub labels: Vec<String>,
    pub cgroups: RuncCgroups,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RuncCgroups {
    pub path: String,
    pub name: String,
    pub parent: String,
    pub scope_prefix: String,
}

/// crun's `<root>/<id>/status`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct CrunStatus {
    pub pid: Option<u32>,
    #[serde(rename = "cgroup-path")]
    pub cgroup_path: String,
    pub bundle: String,
}

/// The parts of an OCI runtime config.json kmodmon reads.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct OciConfig {
    pub process: Option<OciProcess>,
    pub annotations: BTreeMap<String, String>,
    pub linux: Option<OciLinux>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct OciProcess {
    pub env: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct OciLinux {
    pub cgroups_path: String,
}

/// cri-o records the kubelet's annotations of a pod sandbox (the pod's annotations) as one
/// JSON object in this annotation of the sandbox's config.json (and of a container's own
/// annotations in the container's).
pub(super) const CRIO_ANNOTATIONS: &str = "io.kubernetes.cri-o.Annotations";
/// cri-o: the pod sandbox a container belongs to (its ID is the sandbox's storage ID).
pub(super) const CRIO_SANDBOX_ID: &str = "io.kubernetes.cri-o.SandboxID";

/// The pod annotations a cri-o sandbox config records: the JSON object in
/// [`CRIO_ANNOTATIONS`]. `None` when absent; an error when it is not a JSON string map.
pub(super) fn crio_pod_annotations(
    sandbox: &OciConfig,
) -> Option<Result<BTreeMap<String, String>, serde_json::Error>> {
    let text = sandbox.annotations.get(CRIO_ANNOTATIONS)?;
    Some(serde_json::from_str(text))
}

/// Docker's `/var/lib/docker/containers/<id>/config.v2.json`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub(super) struct DockerConfigV2 {
    pub name: String,
    pub config: DockerConfig,
    pub state: EngineState,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub(super) struct DockerConfig {
    pub env: Option<Vec<String>>,
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub(super) struct EngineState {
    pub running: bool,
    pub pid: Option<u32>,
    /// iSulad: the process start time in clock ticks.
    pub start_time: Option<u64>,
}

/// iSulad's `/var/lib/isulad/engines/<runtime>/<id>/config.v2.json`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub(super) struct IsuladConfigV2 {
    pub common_config: IsuladCommon,
    pub state: EngineState,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub(super) struct IsuladCommon {
    pub name: String,
    pub config: DockerConfig,
}

/// One entry of containers/storage's `containers.json` (podman, cri-o).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct StorageContainer {
    pub id: String,
    pub names: Vec<String>,
}

impl Partial {
    pub fn from_runc(s: RuncState, cgroup2_mounts: &[PathBuf]) -> Partial {
        let mut p = Partial {
            pid: s.init_process_pid.filter(|&pid| pid > 0),
            pid_start: s.init_process_start,
            ..Partial::default()
        };
        for label in &s.config.labels {
            if let Some((k, v)) = label.split_once('=') {
                if k == "bundle" {
                    p.bundle = Some(PathBuf::from(v));
                } else {
                    p.labels.insert(k.to_string(), v.to_string());
                }
            }
        }
        p.cgroup_path = s
            .cgroup_paths
            .get("")
            .and_then(|abs| strip_mount(abs, cgroup2_mounts))
            .or_else(|| runc_cgroup_path(&s.config.cgroups));
        p
    }

    pub fn from_crun(s: CrunStatus) -> Partial {
        Partial {
            pid: s.pid.filter(|&pid| pid > 0),
            cgroup_path: absolute(&s.cgroup_path),
            bundle: (!s.bundle.is_empty()).then(|| PathBuf::from(&s.bundle)),
            ..Partial::default()
        }
    }

    /// Adds what an OCI config.json at `path` says.
    pub fn add_oci(&mut self, path: &Path, c: OciConfig) {
        if let Some(env) = c.process.and_then(|p| p.env) {
            self.env = Some((path.to_path_buf(), env));
        }
        self.labels.extend(c.annotations);
        if self.cgroup_path.is_none() {
            self.cgroup_path = c.linux.and_then(|l| oci_cgroups_path(&l.cgroups_path));
        }
        self.config_path = Some(path.to_path_buf());
    }

    pub fn from_docker(path: &Path, c: DockerConfigV2) -> Partial {
        let name = c.name.trim_start_matches('/');
        Partial {
            pid: c.state.pid.filter(|&pid| pid > 0),
            running_flag: Some(c.state.running),
            name: (!name.is_empty()).then(|| name.to_string()),
            labels: c.config.labels.unwrap_or_default(),
            env: c.config.env.map(|e| (path.to_path_buf(), e)),
            ..Partial::default()
        }
    }

    pub fn from_isulad(path: &Path, c: IsuladConfigV2) -> Partial {
        let name = c.common_config.name;
        Partial {
            pid: c.state.pid.filter(|&pid| pid > 0),
            pid_start: c.state.start_time,
            running_flag: Some(c.state.running),
            name: (!name.is_empty()).then_some(name),
            labels: c.common_config.config.labels.unwrap_or_default(),
            env: c.common_config.config.env.map(|e| (path.to_path_buf(), e)),
            ..Partial::default()
        }
    }
}

fn absolute(p: &str) -> Option<String> {
    p.starts_with('/').then(|| p.to_string())
}

/// `/sys/fs/cgroup/unified/docker/x` → `/docker/x`, for the first mount that is a prefix.
pub(super) fn strip_mount(abs: &str, mounts: &[PathBuf]) -> Option<String> {
    let abs = Path::new(abs);
    mounts.iter().find_map(|m| {
        let rest = abs.strip_prefix(m).ok()?;
        Some(format!("/{}", rest.to_str()?))
    })
}

/// A runc config's cgroup when `cgroup_paths` has no unified entry: the path as given, or
/// the systemd driver's `<parent slice>/<prefix>-<name>.scope`.
fn runc_cgroup_path(c: &RuncCgroups) -> Option<String> {
    if let Some(p) = absolute(&c.path) {
        return Some(p);
    }
    if c.name.is_empty() {
        return None;
    }
    if !c.parent.is_empty() || !c.scope_prefix.is_empty() {
        let spec = format!("{}:{}:{}", c.parent, c.scope_prefix, c.name);
        return oci_cgroups_path(&spec);
    }
    Some(format!("/{}", c.name))
}

/// An OCI `linux.cgroupsPath`: an absolute path, or the systemd driver's
/// `slice:prefix:name` (→ `/a.slice/a-b.slice/prefix-name.scope`).
pub(super) fn oci_cgroups_path(spec: &str) -> Option<String> {
    if let Some(p) = absolute(spec) {
        return Some(p);
    }
    let mut parts = spec.splitn(3, ':');
    let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
    if name.is_empty() || name.contains('/') {
        return None;
    }
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let mut path = expand_slice(slice)?;
    let unit = if name.ends_with(".slice") {
        name.to_string()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    if path != "/" {
        path.push('/');
    }
    path.push_str(&unit);
    Some(path)
}

/// systemd slice name → its cgroup path: `a-b-c.slice` → `/a.slice/a-b.slice/a-b-c.slice`.
pub(super) fn expand_slice(slice: &str) -> Option<String> {
    let stem = slice.strip_suffix(".slice")?;
    if stem == "-" {
        return Some("/".to_string());
    }
    if stem.is_empty() || stem.contains('/') || stem.starts_with('-') || stem.ends_with('-') {
        return None;
    }
    let mut out = String::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            return None;
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        out.push('/');
        out.push_str(&prefix);
        out.push_str(".slice");
    }
    Some(out)
}

/// The start time (clock ticks after boot) in the text of /proc/PID/stat.
pub(super) fn stat_start_time(stat: &str) -> Option<u64> {
    // Fields after the comm, which may itself contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The state letter (R, S, Z, ...) in the text of /proc/PID/stat.
pub(super) fn stat_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}
