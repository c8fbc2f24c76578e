//! Autoload join: `module_request` events (fired in the requesting task's context, so they
//! carry its container) → the modprobe the kernel spawns from a kernel thread in the host's
//! cgroup → the loads that modprobe causes.
//!
//! A request is remembered for [`WINDOW`] with the set of modules it can load: the request
//! string resolved through modules.alias / modules.symbols / module names (`net-pf-10` →
//! `ipv6`, `fs-xfs` → `xfs`, `iptable_nat` → `iptable_nat`), plus every dependency of those
//! per modules.dep. A later host-context load (or load attempt) of a module in that set is
//! attributed to the earliest pending request that covers it and has not yet been credited
//! with that module for that event kind. Identical requests (same string, same container)
//! within the window are merged into one (the latest requester is kept, a count grows).
use std::collections::{HashSet, VecDeque};

use crate::event::{Container, Kind, RequestedBy};
use crate::modname;

/// How long after a request a load is still attributed to it.
pub const WINDOW_NS: u64 = 10_000_000_000;
/// Most pending requests kept (a request storm must not grow memory without bound).
pub const MAX_PENDING: usize = 4096;

/// Resolves a request string to module names, and a module to its dependencies.
pub trait ModuleResolver {
    /// The modules a request names (normalized); empty when nothing is known.
    fn resolve_request(&self, request: &str) -> Vec<String>;
    /// Transitive dependencies of a module (normalized).
    fn dependencies(&self, module: &str) -> Vec<String>;
}

/// Most modules one dependency fan-out collects (a guard against odd databases).
const MAX_FANOUT: usize = 512;

impl ModuleResolver for crate::host::moddb::ModDb {
    fn resolve_request(&self, request: &str) -> Vec<String> {
        self.resolve_alias(request)
    }

    /// modules.dep dependencies and modules.softdep pre/post modules (resolved through
    /// aliases, e.g. libcrc32c's `pre: crc32c` → crc32c_intel), transitively: what modprobe
    /// loads along with `module`.
    fn dependencies(&self, module: &str) -> Vec<String> {
        let start = modname::normalize(module);
        let mut out: Vec<String> = Vec::new();
        let mut queue = vec![start.clone()];
        while let Some(cur) = queue.pop() {
            let mut next = self.deps_of(&cur);
            if let Some(sd) = self.softdep(&cur) {
                for name in sd.pre.iter().chain(&sd.post) {
                    next.extend(self.resolve_alias(name));
                }
            }
            for n in next {
                if n != start && !out.contains(&n) && out.len() < MAX_FANOUT {
                    out.push(n.clone());
                    queue.push(n);
                }
            }
        }
        out
    }
}

/// Without a module database a request names itself only.
pub struct NameOnly;

impl ModuleResolver for NameOnly {
    fn resolve_request(&self, _request: &str) -> Vec<String> {
        Vec::new()
    }
    fn dependencies(&self, _module: &str) -> Vec<String> {
        Vec::new()
    }
}

/// The modules a request can cause to load: what it resolves to (or the request itself,
/// when it is a valid module name and nothing resolves), plus their dependencies.
pub fn request_modules(request: &str, resolver: &dyn ModuleResolver) -> Vec<String> {
    let mut mods = resolver.resolve_request(request);
    if mods.is_empty()
        && let Ok(name) = modname::validate(request)
    {
        mods.push(name);
    }
    let mut out: Vec<String> = Vec::new();
    for m in &mods {
        let m = modname::normalize(m);
        if !out.contains(&m) {
            out.push(m.clone());
        }
        for d in resolver.dependencies(&m) {
            let d = modname::normalize(&d);
            if !out.contains(&d) {
                out.push(d);
            }
        }
    }
    out
}

/// One remembered request.
#[derive(Clone, Debug)]
struct Pending {
    /// First and latest time this request was made.
    first_ns: u64,
    ktime_ns: u64,
    requested_by: RequestedBy,
    /// Key of the requesting container (`None`: the host).
    container_key: Option<String>,
    modules: Vec<String>,
    /// (module, kind) pairs already attributed to this request.
    credited: HashSet<(String, Kind)>,
    merged: u32,
}

/// The result of a successful join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributed {
    pub requested_by: RequestedBy,
    /// Key of the requesting container (`None`: the host).
    pub container_key: Option<String>,
    /// How many identical requests were merged into this one (1 = just one).
    pub requests: u32,
}

/// The pending requests.
#[derive(Debug, Default)]
pub struct AutoloadJoin {
    pending: VecDeque<Pending>,
    /// Requests merged into an earlier identical one.
    pub merged: u64,
    /// Requests dropped because [`MAX_PENDING`] were waiting.
    pub overflow: u64,
}

/// What the join needs from a request event.
pub struct Request<'a> {
    pub ktime_ns: u64,
    pub requested: &'a str,
    pub pid: u32,
    pub comm: &'a str,
    pub cgroup_id: u64,
    pub container: Option<&'a Container>,
}

impl AutoloadJoin {
    pub fn new() -> AutoloadJoin {
        AutoloadJoin::default()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Remembers a `module_request`.
    pub fn request(&mut self, r: Request<'_>, resolver: &dyn ModuleResolver) {
        self.expire(r.ktime_ns);
        let key = r.container.map(|c| c.id.clone());
        if let Some(p) = self.pending.iter_mut().find(|p| {
            p.container_key == key && modname::same(&p.requested_by.requested, r.requested)
        }) {
            // The same container asking again (modprobe is slow, or several threads ask):
            // one request, refreshed.
            p.ktime_ns = p.ktime_ns.max(r.ktime_ns);
            p.requested_by.pid = r.pid;
            p.requested_by.comm = r.comm.to_string();
            p.requested_by.cgroup_id = r.cgroup_id;
            p.merged += 1;
            self.merged += 1;
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
            self.overflow += 1;
        }
        self.pending.push_back(Pending {
            first_ns: r.ktime_ns,
            ktime_ns: r.ktime_ns,
            requested_by: RequestedBy {
                requested: r.requested.to_string(),
                pid: r.pid,
                comm: r.comm.to_string(),
                cgroup_id: r.cgroup_id,
                container: r.container.cloned(),
            },
            container_key: key,
            modules: request_modules(r.requested, resolver),
            credited: HashSet::new(),
            merged: 1,
        });
    }

    /// A host-context load (`kind` Load or LoadAttempt) of `module` at `ktime_ns`: the
    /// request that caused it, if any.
    pub fn on_load(&mut self, module: &str, kind: Kind, ktime_ns: u64) -> Option<Attributed> {
        self.expire(ktime_ns);
        let module = modname::normalize(module);
        let p = self.pending.iter_mut().find(|p| {
            p.first_ns <= ktime_ns
                && p.modules.contains(&module)
                && !p.credited.contains(&(module.clone(), kind))
        })?;
        p.credited.insert((module, kind));
        Some(Attributed {
            requested_by: p.requested_by.clone(),
            container_key: p.container_key.clone(),
            requests: p.merged,
        })
    }

    /// Forgets requests older than the window (relative to `now_ns`, the newest event time).
    pub fn expire(&mut self, now_ns: u64) {
        self.pending
            .retain(|p| now_ns.saturating_sub(p.ktime_ns) <= WINDOW_NS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A small modules.alias / modules.dep world.
    struct World {
        aliases: HashMap<&'static str, Vec<&'static str>>,
        deps: HashMap<&'static str, Vec<&'static str>>,
    }

    fn world() -> World {
        World {
            aliases: HashMap::from([
                ("net-pf-10", vec!["ipv6"]),
                ("fs-xfs", vec!["xfs"]),
                ("iptable_nat", vec!["iptable_nat"]),
                ("ip_vs_wrr", vec!["ip_vs_wrr"]),
                ("char-major-10-200", vec!["tun"]),
            ]),
            deps: HashMap::from([
                ("xfs", vec!["libcrc32c"]),
                (
                    "iptable_nat",
                    vec!["ip_tables", "nf_nat", "nf_conntrack", "x_tables"],
                ),
                ("ip_vs_wrr", vec!["ip_vs", "nf_conntrack", "libcrc32c"]),
            ]),
        }
    }

    impl ModuleResolver for World {
        fn resolve_request(&self, request: &str) -> Vec<String> {
            self.aliases
                .get(request)
                .map(|v| v.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default()
        }
        fn dependencies(&self, module: &str) -> Vec<String> {
            self.deps
                .get(module)
                .map(|v| v.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default()
        }
    }

    fn container(id: &str) -> Container {
        Container {
            id: id.to_string(),
            runtime: "docker".to_string(),
            ..Container::default()
        }
    }

    fn req<'a>(t: u64, name: &'a str, pid: u32, c: Option<&'a Container>) -> Request<'a> {
        Request {
            ktime_ns: t,
            requested: name,
            pid,
            comm: "iptables",
            cgroup_id: 4000 + u64::from(pid),
            container: c,
        }
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn request_modules_resolves_aliases_and_fans_out_dependencies() {
        let w = world();
        assert_eq!(request_modules("net-pf-10", &w), vec!["ipv6"]);
        assert_eq!(request_modules("fs-xfs", &w), vec!["xfs", "libcrc32c"]);
        assert_eq!(
            request_modules("iptable_nat", &w),
            vec![
                "iptable_nat",
                "ip_tables",
                "nf_nat",
                "nf_conntrack",
                "x_tables"
            ]
        );
        // Unknown to the database, but a valid name: the name itself (dash-normalized).
        assert_eq!(request_modules("my-mod", &w), vec!["my_mod"]);
        // Neither resolvable nor a name: nothing can match it.
        assert!(request_modules("bad name/x", &w).is_empty());
        assert_eq!(request_modules("fs-xfs", &NameOnly), vec!["fs_xfs"]);
    }

    #[test]
    fn loads_after_a_request_are_attributed_with_dependencies() {
        let w = world();
        let c = container("aaa");
        let mut j = AutoloadJoin::new();
        j.request(req(10 * S, "iptable_nat", 77, Some(&c)), &w);
        // modprobe loads dependencies first, then the module.
        for m in [
            "x_tables",
            "ip_tables",
            "nf_conntrack",
            "nf_nat",
            "iptable_nat",
        ] {
            let a = j
                .on_load(m, Kind::Load, 10 * S + 5_000_000)
                .unwrap_or_else(|| panic!("{m} not attributed"));
            assert_eq!(a.requested_by.requested, "iptable_nat");
            assert_eq!(a.requested_by.pid, 77);
            assert_eq!(a.requested_by.comm, "iptables");
            assert_eq!(a.requested_by.container.as_ref(), Some(&c));
            assert_eq!(a.container_key.as_deref(), Some("aaa"));
        }
        // Something the request cannot cause is not attributed.
        assert_eq!(j.on_load("ipv6", Kind::Load, 11 * S), None);
        // The same module loading again (after an unload) is not credited twice.
        assert_eq!(j.on_load("iptable_nat", Kind::Load, 12 * S), None);
        // But the modprobe's finit_module attempt and the module_load tracepoint of the same
        // module are both attributed.
        assert!(
            j.on_load("iptable_nat", Kind::LoadAttempt, 12 * S)
                .is_some()
        );
    }

    #[test]
    fn aliases_resolve_and_dash_underscore_are_the_same() {
        let w = world();
        let mut j = AutoloadJoin::new();
        j.request(req(S, "fs-xfs", 5, None), &w);
        j.request(req(S, "net-pf-10", 6, None), &w);
        let a = j.on_load("libcrc32c", Kind::Load, 2 * S).unwrap();
        assert_eq!(a.requested_by.requested, "fs-xfs");
        assert_eq!(a.container_key, None, "a host request");
        let a = j.on_load("ipv6", Kind::Load, 2 * S).unwrap();
        assert_eq!(a.requested_by.pid, 6);
        let mut j = AutoloadJoin::new();
        j.request(req(S, "ip-vs-wrr", 5, None), &w);
        assert!(j.on_load("ip_vs_wrr", Kind::Load, 2 * S).is_some());
    }

    #[test]
    fn the_window_is_bounded() {
        let w = world();
        let mut j = AutoloadJoin::new();
        j.request(req(S, "fs-xfs", 5, None), &w);
        assert_eq!(j.on_load("xfs", Kind::Load, S + WINDOW_NS + 1), None);
        assert!(j.is_empty(), "expired requests are forgotten");
        // A load that happened before the request is not its result.
        j.request(req(20 * S, "fs-xfs", 5, None), &w);
        assert_eq!(j.on_load("xfs", Kind::Load, 19 * S), None);
        assert!(j.on_load("xfs", Kind::Load, 20 * S + 1).is_some());
    }

    #[test]
    fn duplicate_requests_are_merged_per_container() {
        let w = world();
        let (a, b) = (container("aaa"), container("bbb"));
        let mut j = AutoloadJoin::new();
        j.request(req(S, "iptable_nat", 10, Some(&a)), &w);
        j.request(req(S + 1, "iptable-nat", 11, Some(&a)), &w);
        j.request(req(S + 2, "iptable_nat", 12, Some(&a)), &w);
        j.request(req(S + 3, "iptable_nat", 20, Some(&b)), &w);
        assert_eq!(j.len(), 2, "one per container");
        assert_eq!(j.merged, 2);
        // The earliest request gets the load; the latest requester of the merged request is
        // named.
        let got = j.on_load("iptable_nat", Kind::Load, 2 * S).unwrap();
        assert_eq!(got.container_key.as_deref(), Some("aaa"));
        assert_eq!(got.requested_by.pid, 12);
        assert_eq!(got.requests, 3);
        // A second load of the same module (after an unload) goes to the other container.
        let got = j.on_load("iptable_nat", Kind::Load, 3 * S).unwrap();
        assert_eq!(got.container_key.as_deref(), Some("bbb"));
        assert_eq!(got.requests, 1);
    }

    #[test]
    fn a_merged_request_stays_alive_while_repeated() {
        let w = world();
        let mut j = AutoloadJoin::new();
        j.request(req(S, "fs-xfs", 1, None), &w);
        j.request(req(S + WINDOW_NS - 1, "fs-xfs", 2, None), &w);
        assert!(j.on_load("xfs", Kind::Load, S + WINDOW_NS + 5).is_some());
    }

    #[test]
    fn moddb_dependencies_include_softdeps() {
        let files = crate::host::moddb::DepmodFiles {
            dep: "kernel/nf_conntrack.ko: kernel/libcrc32c.ko\n\
                  kernel/libcrc32c.ko:\n\
                  kernel/crc32c-intel.ko:\n\
                  kernel/iptable_nat.ko: kernel/nf_conntrack.ko\n"
                .into(),
            alias: Some("alias crypto-crc32c crc32c_intel\nalias crc32c crc32c_intel\n".into()),
            softdep: Some("softdep libcrc32c pre: crc32c\n".into()),
            ..Default::default()
        };
        let db = crate::host::moddb::ModDb::parse("t", &files);
        assert_eq!(
            request_modules("iptable_nat", &db),
            vec!["iptable_nat", "nf_conntrack", "libcrc32c", "crc32c_intel"]
        );
        // Seen for real (Debian 6.1 VM): modprobe iptable_nat also loads crc32c_intel.
        let mut j = AutoloadJoin::new();
        j.request(req(S, "iptable_nat", 1, None), &db);
        assert!(j.on_load("crc32c_intel", Kind::Load, 2 * S).is_some());
    }

    #[test]
    fn pending_requests_are_capped() {
        let mut j = AutoloadJoin::new();
        let names: Vec<String> = (0..MAX_PENDING + 10).map(|i| format!("m{i}")).collect();
        for n in &names {
            j.request(req(S, n, 1, None), &NameOnly);
        }
        assert_eq!(j.len(), MAX_PENDING);
        assert_eq!(j.overflow, 10);
        assert_eq!(j.on_load("m0", Kind::Load, S + 1), None, "oldest dropped");
        assert!(
            j.on_load(&names[MAX_PENDING + 9], Kind::Load, S + 1)
                .is_some()
        );
    }
}
