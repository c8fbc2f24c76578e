//! cgroup path → container (ID, runtime, pod).
//!
//! [`parse_cgroup_path`] is pure and cheap (no I/O, no regex, one pass over the path's
//! components), so it can run for every event; callers still cache its result per cgroup.
//!
//! # Rules
//! - The path is the cgroup v2 path as in `/proc/PID/cgroup` (`0::/…`) or the
//!   `cgroup:cgroup_mkdir` tracepoint (`/docker/<id>`). Empty, `.` and `..` components are
//!   skipped, so paths seen from inside a cgroup namespace (`/../../docker/<id>`) work too.
//! - Each component is matched against the runtimes' naming schemes (table in
//!   [`match_container`]). The **deepest** matching component names the container: a
//!   container inside a k8s pod inside a systemd slice, or docker-in-docker
//!   (`/docker/<a>/docker/<b>` → `<b>`). Components below the match (`/init`, `/payload`,
//!   `/container`, a systemd running inside the container) belong to that container.
//! - Runtime helpers that live next to a container but are host processes are *not* the
//!   container: `crio-conmon-<id>`, `libpod-conmon-<id>`, `lxc.monitor.<name>`, and the
//!   `supervisor` cgroup of a systemd-nspawn machine scope. libvirt's `machine-qemu-*` scopes
//!   are virtual machines (the qemu process runs on the host), so they are not containers.
//! - A Kubernetes pod component (`pod<uid>` under a `kubepods` cgroup, or a
//!   `kubepods[-<qos>]-pod<uid>.slice`) between the previous container and the matched one
//!   gives `pod_uid` (systemd's underscores turned back into dashes) and `qos_class`
//!   (`Guaranteed`, `Burstable`, `BestEffort`, spelled as in the pod's `status.qosClass`).
//! - Runtimes that use a 64-hex ID get the full ID. A bare 64-hex component is named after
//!   its parent: `docker` → docker, `isulad` → isulad, a k8s pod → `cri` (a CRI runtime that
//!   the cgroupfs layout does not name; runtime state refines it), containerd namespaces
//!   `default` / `k8s.io` → containerd, anything else → `unknown`.
//! - Plain runc (`runc run NAME` without `linux.cgroupsPath` → `/NAME`) is **not** recognised
//!   from the path: `/NAME` is indistinguishable from any cgroup a service manager or an
//!   administrator creates (`/init.scope`, `/user.slice`, this machine's `/process_api`).
//!   Such containers are recognised from the runtime's state directory instead, which records
//!   each container's cgroup (see [`super::runtime_state::StateIndex::by_cgroup_path`]).
use crate::escape::escape_bytes;
use crate::event::Container;

pub const DOCKER: &str = "docker";
pub const CONTAINERD: &str = "containerd";
pub const CRIO: &str = "cri-o";
pub const PODMAN: &str = "podman";
pub const ISULAD: &str = "isulad";
pub const LXC: &str = "lxc";
pub const NSPAWN: &str = "systemd-nspawn";
pub const LIBVIRT_LXC: &str = "libvirt-lxc";
pub const RUNC: &str = "runc";
pub const CRUN: &str = "crun";
/// A Kubernetes CRI runtime the cgroupfs layout does not name (`/kubepods/…/pod<uid>/<id>`).
pub const CRI: &str = "cri";
/// A 64-hex container ID under a parent no known runtime uses.
pub const UNKNOWN: &str = "unknown";

/// Whether `runtime` is a placeholder that runtime state should replace when it knows better
/// (`runc` and `crun` are shared by several engines).
pub fn is_generic_runtime(runtime: &str) -> bool {
    matches!(runtime, CRI | UNKNOWN | RUNC | CRUN | "")
}

/// Recognises the container a cgroup path belongs to (rules in the module docs).
pub fn parse_cgroup_path(path: &str) -> Option<Container> {
    let mut best: Option<Found> = None;
    // The match before `best`, for helpers (nspawn's supervisor) that are not the container.
    let mut outer: Option<Found> = None;
    let mut pod: Option<Pod> = None;
    let mut in_kubepods = false;
    let mut parent = Parent::Other("");
    for comp in path.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            continue;
        }
        if let Some(m) = match_container(comp, parent) {
            parent = if m.runtime == NSPAWN {
                Parent::Nspawn
            } else {
                Parent::Container
            };
            outer = best.take();
            best = Some(Found { m, pod: pod.take() });
            in_kubepods = false;
            continue;
        }
        if parent == Parent::Nspawn && comp == "supervisor" {
            best = outer.take();
            pod = None;
            parent = Parent::Other(comp);
            continue;
        }
        if let Some(p) = match_pod(comp, parent, in_kubepods) {
            pod = Some(p);
            parent = Parent::Pod;
            continue;
        }
        if is_kubepods(comp) {
            in_kubepods = true;
        }
        parent = Parent::Other(comp);
    }
    let found = best?;
    let mut c = Container {
        id: found.m.id,
        runtime: found.m.runtime.to_string(),
        name: found.m.name,
        ..Container::default()
    };
    if let Some(p) = found.pod {
        c.pod_uid = Some(p.uid);
        c.qos_class = Some(p.qos.to_string());
    }
    Some(c)
}

/// The cgroup v2 path in the text of `/proc/PID/cgroup` (the `0::` line).
pub fn unified_path_from_proc_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// What the previous component was, as far as matching the next one needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Parent<'a> {
    Container,
    Nspawn,
    Pod,
    Other(&'a str),
}

#[derive(Debug)]
struct Match {
    id: String,
    runtime: &'static str,
    name: Option<String>,
}

#[derive(Debug)]
struct Pod {
    uid: String,
    qos: &'static str,
}

#[derive(Debug)]
struct Found {
    m: Match,
    pod: Option<Pod>,
}

/// `<prefix><64 hex>[.scope]` components and the runtime each prefix names. The conmon
/// variants (`crio-conmon-`, `libpod-conmon-`) never match: their rest is not 64 hex.
const HEX_PREFIXES: [(&str, &str); 6] = [
    ("docker-", DOCKER),
    ("cri-containerd-", CONTAINERD),
    ("crio-", CRIO),
    ("libpod-", PODMAN),
    ("isulad-", ISULAD),
    ("nerdctl-", CONTAINERD),
];

/// Matches one path component against the runtimes' naming schemes:
///
/// | component                            | runtime            | driver             |
/// |--------------------------------------|--------------------|--------------------|
/// | `docker-<id>.scope`                  | docker             | systemd            |
/// | `cri-containerd-<id>.scope`          | containerd         | systemd            |
/// | `crio-<id>.scope`, `crio-<id>`       | cri-o              | systemd, cgroupfs  |
/// | `libpod-<id>.scope`, `libpod-<id>`   | podman             | systemd, cgroupfs  |
/// | `isulad-<id>.scope`                  | isulad             | systemd            |
/// | `nerdctl-<id>.scope`                 | containerd         | systemd            |
/// | `<id>` (64 hex)                      | by parent (above)  | cgroupfs           |
/// | `lxc.payload.<name>`, `lxc.payload/<name>`, `lxc/<name>` | lxc |              |
/// | `machine-<name>.scope`               | systemd-nspawn     | systemd            |
/// | `machine-lxc-<pid>-<name>.scope`     | libvirt-lxc        | systemd            |
fn match_container(comp: &str, parent: Parent<'_>) -> Option<Match> {
    let hex_match = |id: &str, runtime: &'static str| {
        is_hex64(id).then(|| Match {
            id: id.to_string(),
            runtime,
            name: None,
        })
    };
    let stem = comp.strip_suffix(".scope").unwrap_or(comp);
    for (prefix, runtime) in HEX_PREFIXES {
        if let Some(id) = stem.strip_prefix(prefix) {
            return hex_match(id, runtime);
        }
    }
    if is_hex64(comp) {
        let runtime = match parent {
            Parent::Pod => CRI,
            Parent::Other("docker") => DOCKER,
            Parent::Other("isulad") => ISULAD,
            Parent::Other("default" | "k8s.io") => CONTAINERD,
            _ => UNKNOWN,
        };
        return hex_match(comp, runtime);
    }
    if let Some(name) = comp.strip_prefix("lxc.payload.") {
        return named(name, LXC);
    }
    if matches!(parent, Parent::Other("lxc" | "lxc.payload")) {
        return named(comp, LXC);
    }
    if let Some(esc) = comp
        .strip_prefix("machine-")
        .and_then(|r| r.strip_suffix(".scope"))
    {
        let name = systemd_unescape(esc);
        if name.starts_with("qemu-") {
            return None;
        }
        let runtime = if name.starts_with("lxc-") {
            LIBVIRT_LXC
        } else {
            NSPAWN
        };
        return named(&name, runtime);
    }
    None
}

fn named(name: &str, runtime: &'static str) -> Option<Match> {
    (!name.is_empty()).then(|| Match {
        id: name.to_string(),
        runtime,
        name: Some(name.to_string()),
    })
}

/// `kubepods`, `kubepods.slice`, `kubepods-burstable.slice`, `kubelet-kubepods.slice`.
fn is_kubepods(comp: &str) -> bool {
    comp == "kubepods" || (comp.ends_with(".slice") && comp.contains("kubepods"))
}

/// A pod component: `pod<uid>` under a kubepods cgroup (cgroupfs driver), or
/// `…kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd driver).
fn match_pod(comp: &str, parent: Parent<'_>, in_kubepods: bool) -> Option<Pod> {
    if let Some(stem) = comp.strip_suffix(".slice") {
        if !stem.contains("kubepods") {
            return None;
        }
        let (head, last) = stem.rsplit_once('-')?;
        let uid = pod_uid(last.strip_prefix("pod")?)?;
        let qos = head.rsplit('-').next().map_or(GUARANTEED, qos_of);
        return Some(Pod { uid, qos });
    }
    if !in_kubepods {
        return None;
    }
    let uid = pod_uid(comp.strip_prefix("pod")?)?;
    let qos = match parent {
        Parent::Other(p) => qos_of(p),
        _ => GUARANTEED,
    };
    Some(Pod { uid, qos })
}

const GUARANTEED: &str = "Guaranteed";

fn qos_of(comp: &str) -> &'static str {
    match comp {
        "burstable" => "Burstable",
        "besteffort" => "BestEffort",
        _ => GUARANTEED,
    }
}

/// A pod UID as kubelet writes it: 32 hex digits, optionally split by 4 dashes (cgroupfs) or
/// underscores (systemd). Returned with dashes.
fn pod_uid(s: &str) -> Option<String> {
    let hex = s.bytes().filter(u8::is_ascii_hexdigit).count();
    let seps = s.bytes().filter(|b| matches!(b, b'-' | b'_')).count();
    (hex == 32 && seps + hex == s.len() && (seps == 0 || seps == 4))
        .then(|| s.replace('_', "-").to_ascii_lowercase())
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Undoes systemd's unit-name escaping (`\x2d` → `-`); the result is escaped for display
/// with [`escape_bytes`] so names with odd bytes stay printable.
fn systemd_unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') {
            let hex = b
                .get(i + 2..i + 4)
                .and_then(|h| std::str::from_utf8(h).ok());
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    escape_bytes(&out)
}

#[cfg(test)]
mod tests;
