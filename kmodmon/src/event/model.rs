//! The one event model: what the kernel side sent, decoded, then enriched. Serialised as one JSON
//! object per line by `tail --json`, the audit log and exports (see README "JSON schema").
use kmodmon_common::{EventKind, Op, Source};
use serde::{Deserialize, Serialize};

use super::clock::{Clock, monotonic_ns};

/// Builds an output enum from one of kmodmon-common's tables (`kmodmon_common::event_kinds!`
/// and friends call it with their rows): the same variants with the same names, then `extra`
/// variants only userspace makes. Serialised (and parsed) as the table's names; `Display` too.
/// With `mirrors K (all)` every row of K's table is here, so `From<K>` exists; with
/// `mirrors K` only `from_kernel` (K has values this enum leaves out).
macro_rules! mirror_enum {
    (@common
        [$(#[$meta:meta])*] $name:ident, $kernel:ident;
        [$( $(#[$xmeta:meta])* $extra:ident => $xname:literal; )*]
        $( [$(#[$vmeta:meta])*] $variant:ident => $sname:literal; )+
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
            $( $(#[$xmeta])* $extra, )*
        }

        impl $name {
            /// Every value: the kernel table's, then kmodmon's own.
            pub const ALL: [$name; kmodmon_common::__count!($($variant)+ $($extra)*)] =
                [$($name::$variant,)+ $($name::$extra,)*];

            /// The stable name output shows (the kernel table's name for kernel values).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $sname, )+
                    $( $name::$extra => $xname, )*
                }
            }

            /// The value with this name.
            pub fn parse(s: &str) -> Option<$name> {
                $name::ALL.into_iter().find(|v| v.as_str() == s)
            }

            /// The kernel's value; `None` for values only kmodmon makes.
            pub const fn kernel(self) -> Option<$kernel> {
                match self {
                    $( $name::$variant => Some($kernel::$variant), )+
                    $( $name::$extra => None, )*
                }
            }

            /// This enum's value for a kernel value; `None` for kernel values it leaves out.
            #[allow(unreachable_patterns)]
            pub const fn from_kernel(k: $kernel) -> Option<$name> {
                match k {
                    $( $kernel::$variant => Some($name::$variant), )+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::parse(&s).ok_or_else(|| {
                    let names: Vec<&str> = $name::ALL.iter().map(|v| v.as_str()).collect();
                    serde::de::Error::custom(format!(
                        "unknown {} {s:?}; one of: {}",
                        stringify!($name),
                        names.join(", ")
                    ))
                })
            }
        }
    };
    (
        $(#[$meta:meta])*
        pub enum $name:ident mirrors $kernel:ident (all);
        extra { $( $(#[$xmeta:meta])* $extra:ident => $xname:literal; )* }
        $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $sname:literal; )+
    ) => {
        mirror_enum! {
            @common [$(#[$meta])*] $name, $kernel;
            [$( $(#[$xmeta])* $extra => $xname; )*]
            $( [$(#[$vmeta])*] $variant => $sname; )+
        }

        impl From<$kernel> for $name {
            fn from(k: $kernel) -> $name {
                match k {
                    $( $kernel::$variant => $name::$variant, )+
                }
            }
        }
    };
    (
        $(#[$meta:meta])*
        pub enum $name:ident mirrors $kernel:ident;
        extra { $( $(#[$xmeta:meta])* $extra:ident => $xname:literal; )* }
        $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $sname:literal; )+
    ) => {
        mirror_enum! {
            @common [$(#[$meta])*] $name, $kernel;
            [$( $(#[$xmeta])* $extra => $xname; )*]
            $( [$(#[$vmeta])*] $variant => $sname; )+
        }
    };
}

kmodmon_common::event_kinds!(mirror_enum! {
    /// Event kinds, as they appear in output: the kernel's, then kmodmon's own.
    pub enum Kind mirrors EventKind (all);
    extra {
        /// A container appeared whose declared modules are not all loaded (see enrich).
        Expectation => "expectation";
        /// kmodmon itself loaded a module (`--load-expected`).
        SelfLoad => "self_load";
        /// A module the ledger saw load and never free is missing from the kernel's module
        /// list (or is in /sys/module but not in /proc/modules): it hides. High severity.
        HiddenModule => "hidden_module";
        /// A module appeared in /proc/modules after kmodmon started without a load kmodmon
        /// saw.
        UnseenLoad => "unseen_load";
        /// A load the kernel allowed by name whose identity the policy does not allow
        /// (sha256 pin or `signed = true`), found after the load.
        IdentityMismatch => "identity_mismatch";
        /// Enforcement's self-check found a pinned link, program, map or map content that is
        /// not what kmodmon installed (`object`, `detail`, `repaired`).
        Tamper => "tamper";
        /// The LSM programs counted denied / would_deny records they could not record (the
        /// pinned ring was full, e.g. while kmodmon was down): `count` of them.
        Lost => "lost";
    }
});

kmodmon_common::sources!(mirror_enum! {
    /// Which kernel hook saw the event (`kmodmon` for events kmodmon made itself).
    pub enum SourceName mirrors Source (all);
    extra {
        /// kmodmon's own events (expectation, self_load).
        Kmodmon => "kmodmon";
    }
});

kmodmon_common::syscall_ops!(mirror_enum! {
    /// The module syscall an attempt used.
    pub enum Syscall mirrors Op;
    extra {}
});

/// The verdict on a module event (see README "Containers, expectations and verdicts").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Not in a container.
    Host,
    /// Declared by the container, or a dependency of a declared module.
    Expected,
    /// Neither.
    Unexpected,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Host, Verdict::Expected, Verdict::Unexpected];

    /// The name output shows (the JSON value).
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Host => "host",
            Verdict::Expected => "expected",
            Verdict::Unexpected => "unexpected",
        }
    }

    /// The verdict with this name.
    pub fn parse(s: &str) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What refused an attempt before the syscall ran (the JSON `blocked_by`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockedBy {
    /// A seccomp filter (e.g. Docker's or Kubernetes' default profile).
    Seccomp,
}

impl BlockedBy {
    pub const fn as_str(self) -> &'static str {
        match self {
            BlockedBy::Seccomp => "seccomp",
        }
    }

    /// The output value for the kernel's; `None` for "not blocked".
    pub const fn from_kernel(k: kmodmon_common::BlockedBy) -> Option<BlockedBy> {
        match k {
            kmodmon_common::BlockedBy::None => None,
            kmodmon_common::BlockedBy::Seccomp => Some(BlockedBy::Seccomp),
        }
    }
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

/// The task's cgroup in the cgroup v1 hierarchy kmodmon follows (see
/// [`crate::host::cgroup_v1`]), on events where it decided attribution.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupV1 {
    /// The hierarchy id (/proc/cgroups).
    pub hierarchy: u32,
    /// The controller whose hierarchy it is (`memory`).
    pub controller: String,
    /// The cgroup's id: its directory's inode number in that hierarchy's mount.
    pub id: u64,
    /// Its path in the hierarchy (`/isulad/<id>`); null when not found.
    pub path: Option<String>,
}

/// The container a host process acted for: a process a container runtime started while
/// creating, starting, running or deleting that container (an OCI hook, a runtime helper),
/// found through the process's ancestors as the kernel recorded them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnBehalfOf {
    pub container: Container,
    /// How the container was found: `runtime_cmdline` (the runtime process's command line
    /// names the container and its bundle), `runtime_state` (it names the container, whose
    /// bundle the runtime's state on disk gives).
    pub how: String,
    /// The OCI runtime program (`runc`, `crun`), from its command line.
    pub program: String,
    /// The runtime process among the ancestors: pid, comm (as the kernel recorded it), its
    /// subcommand (`create`, `run`, `start`, `exec`, `delete`, ...) and how many generations
    /// above the event's task it is (1: the parent).
    pub pid: u32,
    pub comm: String,
    pub command: String,
    pub depth: u32,
    /// The container's OCI bundle, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
}

/// One ancestor of an event's task, as the kernel recorded it (not serialised).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ancestor {
    pub pid: u32,
    /// CLOCK_BOOTTIME ns of the process's start (`/proc/<pid>/stat` starttime, in ns).
    pub start_boottime_ns: u64,
    /// Escaped.
    pub comm: String,
}

/// One module event. Field names are the stable JSON schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock time, RFC 3339 with nanoseconds, UTC.
    pub time: String,
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) when the event started (repeat
    /// summaries: the last repeat).
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
    /// Attempts refused before the syscall ran: by what (`seccomp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<BlockedBy>,
    /// The signal the caller got instead of a result ("SIGSYS": seccomp RET_TRAP or
    /// RET_KILL); `result` is then absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Syscall duration (attempts seen at entry and exit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ns: Option<u64>,
    /// Repeat summaries only: this many attempts identical to the one reported at
    /// `first_time` (same task, syscall, arguments and result, each within the repeat window
    /// of the previous), aggregated in the kernel instead of reported one by one; `time` and
    /// `ktime_ns` are the last one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat: Option<u64>,
    /// Repeat summaries: when the burst's first attempt (reported on its own) was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_time: Option<String>,
    /// Repeat summaries: when the last of the `repeat` attempts was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_time: Option<String>,
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
    pub verdict: Option<Verdict>,
    /// denied / would_deny: the id of the policy rule that decided (0 the host entry, 1
    /// unselected containers, 2.. the `[[rule]]`s in order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<u32>,
    /// denied / would_deny: the generation of the policy in force (bumped by every load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_generation: Option<u32>,
    /// denied / would_deny: what decided (`own_entry`, `enclosing_entry`, `container_parent`,
    /// `container_name`, `host`, `crypto_requester`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// denied / would_deny: the cgroup whose entry or name decided (absent for the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deciding_cgroup_id: Option<u64>,
    /// denied / would_deny: where the judged name came from (`request`, `file`, `image`,
    /// `kernel`, `unnamed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_by: Option<String>,
    /// denied / would_deny: the module name the file's name claims, when it is not the
    /// module's. Escaped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_module: Option<String>,
    /// denied / would_deny: `.modinfo`'s `name=`, when it is not the module's. Escaped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modinfo_name: Option<String>,
    /// lost: how many records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// tamper: what was found changed (`link kernel_read_file`, `map policy_settings`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// tamper: whether kmodmon put it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repaired: Option<bool>,
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
    /// The task's cgroup v1, where it decided attribution (see [`CgroupV1`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_v1: Option<CgroupV1>,
    /// The container a host process acted for (see [`OnBehalfOf`]); the verdict is then
    /// judged against that container's declaration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<OnBehalfOf>,
    /// The task's ancestors, parent first, as the kernel recorded them (input to
    /// enrichment; not part of the schema).
    #[serde(skip)]
    pub ancestors: Vec<Ancestor>,
    /// What exactly was loaded (load, load_attempt, denied, would_deny; hidden_module ...):
    /// hash of the image the kernel received, `.modinfo`, signature, origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Box<crate::identity::Identity>>,
    /// hidden_module / unseen_load: where the module was seen and where not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_view: Option<CrossView>,
    /// hidden_module / identity_mismatch: when the module was loaded (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<String>,
    /// `high` (hidden_module, identity_mismatch) or `medium` (unseen_load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
}

/// Which of the kernel's views list a module.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrossView {
    /// Listed in /proc/modules (the kernel's module list).
    pub proc_modules: bool,
    /// /sys/module/NAME/initstate exists (the module's sysfs directory).
    pub sys_module: bool,
    /// /proc/kallsyms has symbols tagged `[NAME]` (null: not read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kallsyms: Option<bool>,
    /// The ledger saw the module load (and no free).
    pub ledger: bool,
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
            blocked_by: None,
            signal: None,
            duration_ns: None,
            repeat: None,
            first_time: None,
            last_time: None,
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
            rule_id: None,
            policy_generation: None,
            decided_by: None,
            deciding_cgroup_id: None,
            named_by: None,
            file_module: None,
            modinfo_name: None,
            count: None,
            object: None,
            repaired: None,
            requested_by: None,
            modules: Vec::new(),
            truncated: Vec::new(),
            missing: Vec::new(),
            detail: None,
            cgroup_v1: None,
            on_behalf_of: None,
            ancestors: Vec::new(),
            identity: None,
            cross_view: None,
            loaded_at: None,
            severity: None,
        }
    }

    /// The errno of a failed attempt, positive.
    pub fn errno_value(&self) -> Option<i64> {
        self.result.filter(|r| *r < 0).map(|r| -r)
    }
}

#[cfg(test)]
mod tests {
    use kmodmon_common::{EventKind, Op, Source};

    use super::*;

    fn json_names<T: Serialize>(all: &[T]) -> Vec<String> {
        all.iter()
            .map(|v| {
                serde_json::to_value(v)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn output_names_are_the_stable_schema() {
        assert_eq!(
            json_names(&Kind::ALL),
            [
                "load",
                "unload",
                "request",
                "load_attempt",
                "unload_attempt",
                "denied",
                "would_deny",
                "expectation",
                "self_load",
                "hidden_module",
                "unseen_load",
                "identity_mismatch",
                "tamper",
                "lost"
            ]
        );
        assert_eq!(
            json_names(&SourceName::ALL),
            [
                "module_tracepoint",
                "fexit",
                "syscall_tracepoint",
                "raw_syscalls",
                "lsm",
                "seccomp",
                "task_exit",
                "kprobe",
                "sys_exit",
                "kmodmon"
            ]
        );
        assert_eq!(
            json_names(&Syscall::ALL),
            ["init_module", "finit_module", "delete_module"]
        );
        assert_eq!(
            json_names(&Verdict::ALL),
            ["host", "expected", "unexpected"]
        );
        for v in Verdict::ALL {
            assert_eq!(json_names(&[v]), [v.as_str()]);
            assert_eq!(Verdict::parse(v.as_str()), Some(v));
        }
    }

    #[test]
    fn output_enums_follow_the_kernel_tables() {
        for k in EventKind::ALL {
            assert_eq!(Kind::from(k).as_str(), k.name());
            assert_eq!(Kind::from(k).kernel(), Some(k));
        }
        assert_eq!(Kind::Expectation.kernel(), None);
        for s in Source::ALL {
            assert_eq!(SourceName::from(s).as_str(), s.name());
        }
        assert_eq!(Syscall::from_kernel(Op::None), None);
        assert_eq!(
            Syscall::from_kernel(Op::FinitModule),
            Some(Syscall::FinitModule)
        );
        for v in Kind::ALL {
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(serde_json::from_str::<Kind>(&json).unwrap(), v);
            assert_eq!(Kind::parse(v.as_str()), Some(v));
        }
        let err = serde_json::from_str::<Kind>("\"loaded\"").unwrap_err();
        assert!(err.to_string().contains("load_attempt"), "{err}");
    }
}
