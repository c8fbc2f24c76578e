//! The one event model: what the kernel side sent, decoded, then enriched. Serialised as one JSON
//! object per line by `tail --json`, the audit log and exports (see README "JSON schema").
use kmodmon_common::EventKind;
use serde::{Deserialize, Serialize};

use super::clock::{Clock, monotonic_ns};

/// Event kinds, as they appear in output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Load,
    Unload,
    Request,
    LoadAttempt,
    UnloadAttempt,
    /// A container appeared whose declared modules are not all loaded (see enrich).
    Expectation,
    /// kmodmon itself loaded a module (`--load-expected`).
    SelfLoad,
    /// The policy denied a load (enforcement mode).
    Denied,
    /// The policy would have denied a load (audit mode).
    WouldDeny,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Load,
        Kind::Unload,
        Kind::Request,
        Kind::LoadAttempt,
        Kind::UnloadAttempt,
        Kind::Expectation,
        Kind::SelfLoad,
        Kind::Denied,
        Kind::WouldDeny,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Load => "load",
            Kind::Unload => "unload",
            Kind::Request => "request",
            Kind::LoadAttempt => "load_attempt",
            Kind::UnloadAttempt => "unload_attempt",
            Kind::Expectation => "expectation",
            Kind::SelfLoad => "self_load",
            Kind::Denied => "denied",
            Kind::WouldDeny => "would_deny",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub(super) fn from_raw(kind: EventKind) -> Kind {
        match kind {
            EventKind::Load => Kind::Load,
            EventKind::Unload => Kind::Unload,
            EventKind::Request => Kind::Request,
            EventKind::LoadAttempt => Kind::LoadAttempt,
            EventKind::UnloadAttempt => Kind::UnloadAttempt,
            EventKind::Denied => Kind::Denied,
            EventKind::WouldDeny => Kind::WouldDeny,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which kernel hook saw the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceName {
    ModuleTracepoint,
    Fexit,
    SyscallTracepoint,
    RawSyscalls,
    Lsm,
    Kmodmon,
}

impl SourceName {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceName::ModuleTracepoint => "module_tracepoint",
            SourceName::Fexit => "fexit",
            SourceName::SyscallTracepoint => "syscall_tracepoint",
            SourceName::RawSyscalls => "raw_syscalls",
            SourceName::Lsm => "lsm",
            SourceName::Kmodmon => "kmodmon",
        }
    }
}

/// The module syscall an attempt used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Syscall {
    InitModule,
    FinitModule,
    DeleteModule,
}

/// A container, as far as kmodmon could tell.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// Full container ID (64 hex for most runtimes; the runtime's own name otherwise).
    pub id: String,
    /// docker, containerd, cri-o, podman, isulad, lxc, systemd-nspawn, runc, ...
    pub runtime: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos_class: Option<String>,
}

/// Who made an autoload request that led to a load (filled by enrichment).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestedBy {
    pub requested: String,
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
}

/// One module event. Field names are the stable JSON schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock time, RFC 3339 with nanoseconds, UTC.
    pub time: String,
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) when the event started.
    pub ktime_ns: u64,
    pub kind: Kind,
    pub source: SourceName,
    /// Module name: from the kernel record, delete_module's argument, or the file name of
    /// finit_module's file. Escaped (see README); null when unknown.
    pub module: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syscall: Option<Syscall>,
    /// finit_module's file path (best effort, relative to its mount). Escaped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Module parameters of init_module / finit_module. Escaped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<String>,
    /// finit_module / delete_module flags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<u32>,
    /// init_module image length in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// module_load taint mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taints: Option<u32>,
    /// Taint letters as in /proc/modules (e.g. "OE").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taint_flags: Option<String>,
    /// module_request: whether the requester waits for modprobe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
    /// Syscall result: 0 or a negative errno (attempts only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<i64>,
    /// Symbolic errno of a failed attempt ("ENOSYS").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    /// Syscall duration (attempts seen at entry and exit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ns: Option<u64>,
    pub pid: u32,
    pub tid: u32,
    pub ppid: Option<u32>,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub cgroup_path: Option<String>,
    pub container: Option<Container>,
    /// host, expected, unexpected (see README "Verdicts").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<RequestedBy>,
    /// Modules named by an `expectation` event, or loaded by `self_load`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    /// Fields cut to fit the kernel's buffers ("module", "params", "path").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub truncated: Vec<String>,
    /// Fields the kernel side failed to read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// Free-form explanation (policy rule, enrichment notes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Event {
    /// A bare event of kmodmon's own making (expectation, self_load).
    pub fn synthetic(kind: Kind, clock: &Clock) -> Event {
        let now = monotonic_ns();
        Event {
            time: clock.rfc3339(now),
            ktime_ns: now,
            kind,
            source: SourceName::Kmodmon,
            module: None,
            syscall: None,
            path: None,
            params: None,
            flags: None,
            len: None,
            fd: None,
            taints: None,
            taint_flags: None,
            wait: None,
            result: None,
            errno: None,
            duration_ns: None,
            pid: std::process::id(),
            tid: std::process::id(),
            ppid: None,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            comm: "kmodmon".to_string(),
            cgroup_id: 0,
            cgroup_path: None,
            container: None,
            verdict: None,
            requested_by: None,
            modules: Vec::new(),
            truncated: Vec::new(),
            missing: Vec::new(),
            detail: None,
        }
    }

    /// The errno of a failed attempt, positive.
    pub fn errno_value(&self) -> Option<i64> {
        self.result.filter(|r| *r < 0).map(|r| -r)
    }
}
