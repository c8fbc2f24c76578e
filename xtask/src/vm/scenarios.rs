//! The expected events of each scenario of tests/vm, derived from what the scenario observed
//! independently of kmodmon (/proc/modules snapshots, step exit codes, container cgroups, the
//! kernel's modules.dep), and checked exactly against kmodmon's events.
use std::collections::{BTreeMap, BTreeSet};

use kmodmon_common::modname;

use super::{
    check::{self, Container, Event, Expect, OracleEvent},
    kernels::Kernel,
};

/// What a scenario run sent back, parsed.
pub struct Ctx<'a> {
    pub files: &'a BTreeMap<String, Vec<u8>>,
    pub events: Vec<Event>,
    pub oracle: Vec<OracleEvent>,
    pub facts: BTreeMap<String, String>,
    deps: ModDeps,
}

/// modules.dep: module name → (file path, direct dependencies).
#[derive(Default)]
pub struct ModDeps(BTreeMap<String, (String, Vec<String>)>);

impl ModDeps {
    pub fn parse(text: &str) -> ModDeps {
        let mut map = BTreeMap::new();
        for line in text.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let Some(module) = modname::from_file(path) else {
                continue;
            };
            let deps = deps
                .split_whitespace()
                .filter_map(modname::from_file)
                .collect();
            map.insert(module, (path.to_string(), deps));
        }
        ModDeps(map)
    }

    /// The module and everything it depends on, transitively.
    pub fn closure(&self, module: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut todo = vec![module.to_string()];
        while let Some(m) = todo.pop() {
            if out.insert(m.clone())
                && let Some((_, deps)) = self.0.get(&m)
            {
                todo.extend(deps.iter().cloned());
            }
        }
        out
    }

    /// The module's file, relative to /lib/modules/<release>.
    pub fn path(&self, module: &str) -> Option<&str> {
        self.0.get(module).map(|(p, _)| p.as_str())
    }

    /// Whether the module's file is compressed (.ko.xz, .ko.zst, .ko.gz).
    pub fn compressed(&self, module: &str) -> bool {
        self.0.get(module).is_some_and(|(p, _)| !p.ends_with(".ko"))
    }
}

impl<'a> Ctx<'a> {
    pub fn new(
        kernel: &'a Kernel,
        files: &'a BTreeMap<String, Vec<u8>>,
    ) -> Result<Ctx<'a>, String> {
        let text = |name: &str| {
            files
                .get(name)
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let events_text = text("events.jsonl")
            .ok_or("the scenario sent back no events.jsonl (did kmodmon start?)")?;
        let events = check::parse_events(&events_text).map_err(|e| format!("{e:#}"))?;
        let deps = std::fs::read_to_string(kernel.modules_dir().join("modules.dep"))
            .map(|t| ModDeps::parse(&t))
            .unwrap_or_default();
        Ok(Ctx {
            files,
            events,
            oracle: check::parse_oracle(&text("oracle.txt").unwrap_or_default()),
            facts: check::parse_facts(&text("facts.txt").unwrap_or_default()),
            deps,
        })
    }

    fn text(&self, name: &str) -> String {
        self.files
            .get(name)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    }

    /// Modules in /proc/modules snapshot `to` that were not in `from`.
    fn appeared(&self, from: &str, to: &str) -> BTreeSet<String> {
        let a = check::parse_proc_modules(&self.text(&format!("modules.{from}")));
        let b = check::parse_proc_modules(&self.text(&format!("modules.{to}")));
        b.difference(&a).cloned().collect()
    }

    fn fact(&self, key: &str) -> Option<&str> {
        self.facts.get(key).map(String::as_str)
    }

    /// A step's exit code must be (or not be) zero.
    fn step_rc(&self, step: &str, success: bool, problems: &mut Vec<String>) {
        match self.fact(&format!("rc.{step}")) {
            None => problems.push(format!("step {step} did not run")),
            Some(rc) if (rc == "0") != success => problems.push(format!(
                "step {step} exited {rc}, expected {}",
                if success { "0" } else { "an error" }
            )),
            Some(_) => {}
        }
    }

    /// The syscall kmod's modprobe/insmod uses for a module: finit_module for a plain .ko;
    /// for compressed ones kmod before 31 decompresses and calls init_module.
    fn load_syscall(&self, module: &str) -> Option<&'static str> {
        if !self.deps.compressed(module) {
            return Some("finit_module");
        }
        let kmod: u32 = self
            .fact("kmod.version")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        (kmod < 31).then_some("init_module")
    }

    /// (container, cgroup path, cgroup id) of a container the scenario started.
    fn container(&self, name: &str) -> Option<(Container, String, u64)> {
        let id = self.fact(&format!("ctr.{name}.id"))?;
        let path = self.fact(&format!("ctr.{name}.cgroup_path"))?;
        let cgid = self.fact(&format!("ctr.{name}.cgroup_id"))?.parse().ok()?;
        let runtime = if path.starts_with("/docker/") {
            "docker"
        } else {
            "runc"
        };
        Some((
            Container {
                id: id.to_string(),
                runtime: runtime.to_string(),
            },
            path.to_string(),
            cgid,
        ))
    }

    /// A successful load by `comm`: the load event and its load_attempt.
    fn loaded(&self, module: &str, comm: &str, place: &Place) -> [Expect; 2] {
        let mut load = place.apply(Expect::new("load", module));
        load.comm = Some(comm.to_string());
        let mut attempt = place.apply(Expect::new("load_attempt", module));
        attempt.comm = Some(comm.to_string());
        attempt.syscall = self.load_syscall(module);
        // A successful init_module is named from the kernel's load record (same task): the
        // name must be there.
        if attempt.syscall == Some("finit_module") {
            attempt.path_suffix = self.deps.path(module).map(|p| format!("/{p}"));
        }
        attempt.result = Some(0);
        [load, attempt]
    }
}

/// Where events are expected to come from: the host's root cgroup or a container.
enum Place {
    Host,
    Container(Container, String, u64),
}

impl Place {
    fn apply(&self, mut x: Expect) -> Expect {
        match self {
            Place::Host => {
                x.cgroup_path = Some("/".to_string());
                x.container = Some(None);
            }
            Place::Container(c, path, id) => {
                x.cgroup_path = Some(path.clone());
                x.cgroup_id = Some(*id);
                x.container = Some(Some(c.clone()));
            }
        }
        x
    }
}

fn failed(
    module: &str,
    kind: &'static str,
    syscall: Option<&'static str>,
    errno: i64,
    name: &'static str,
) -> Expect {
    Expect {
        syscall,
        result: Some(-errno),
        errno: Some(name),
        ..Expect::new(kind, module)
    }
}

/// Checks a scenario's run; returns the problems found (empty: passed).
pub fn check(name: &str, kernel: &Kernel, files: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let ctx = match Ctx::new(kernel, files) {
        Ok(c) => c,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    if ctx.fact("kmodmon.rc") != Some("0") {
        problems.push(format!(
            "kmodmon exited with {:?} (want 0)",
            ctx.fact("kmodmon.rc")
        ));
    }
    problems.extend(check::summary_problems(&ctx.text("tail.err")));
    if let Some(missing) = ctx.fact("oracle.missing") {
        problems.push(format!(
            "this kernel has no module:{missing} tracepoint to compare with"
        ));
    }
    problems.extend(check::against_oracle(&ctx.events, &ctx.oracle));
    problems.extend(check::sources_agree(
        &ctx.text("sources.txt"),
        &ctx.text("tail.err"),
    ));
    let expected = match name.split_once('-').map(|(n, _)| n) {
        Some("01") => modprobe_deps(&ctx, &mut problems),
        Some("02") => container_load(&ctx, &mut problems),
        Some("03") => container_autoload(&ctx, &mut problems),
        Some("04") => failures(&ctx, &mut problems),
        _ => return problems,
    };
    problems.extend(check::exactly(&ctx.events, &expected));
    problems
}

/// 01: modprobe ip_vs_wrr, then modprobe -r.
fn modprobe_deps(ctx: &Ctx, problems: &mut Vec<String>) -> Vec<Expect> {
    ctx.step_rc("modprobe", true, problems);
    ctx.step_rc("modprobe_r", true, problems);
    let loaded = ctx.appeared("before", "loaded");
    let unloaded = ctx.appeared("after", "loaded");
    for m in ctx.deps.closure("ip_vs_wrr") {
        if !loaded.contains(&m) {
            problems.push(format!(
                "modprobe ip_vs_wrr did not load {m} (modules.dep says it needs it)"
            ));
        }
    }
    let mut want = Vec::new();
    for m in &loaded {
        want.extend(ctx.loaded(m, "modprobe", &Place::Host));
    }
    for x in &mut want {
        x.verdict = Some("host");
    }
    for m in &unloaded {
        let unload = Expect {
            comm: Some("modprobe".into()),
            ..Place::Host.apply(Expect::new("unload", m))
        };
        let attempt = Expect {
            comm: Some("modprobe".into()),
            syscall: Some("delete_module"),
            result: Some(0),
            ..Place::Host.apply(Expect::new("unload_attempt", m))
        };
        want.extend([unload, attempt]);
    }
    if unloaded.is_empty() {
        problems.push("modprobe -r ip_vs_wrr unloaded nothing".into());
    }
    want
}

/// 02: a container with CAP_SYS_MODULE runs modprobe ip_vs_wrr.
fn container_load(ctx: &Ctx, problems: &mut Vec<String>) -> Vec<Expect> {
    ctx.step_rc("ctr_modprobe", true, problems);
    let Some((c, path, id)) = ctx.container("loader") else {
        problems.push("the scenario recorded no container facts".into());
        return Vec::new();
    };
    let loaded = ctx.appeared("before", "loaded");
    if !loaded.contains("ip_vs_wrr") || !loaded.contains("ip_vs") {
        problems.push(format!(
            "the container's modprobe did not load ip_vs and ip_vs_wrr (new: {loaded:?})"
        ));
    }
    let place = Place::Container(c, path, id);
    // It declared ip_vs and ip_vs_wrr: those and what they depend on are expected.
    loaded
        .iter()
        .flat_map(|m| ctx.loaded(m, "modprobe", &place))
        .map(|x| Expect {
            verdict: Some("expected"),
            ..x
        })
        .collect()
}

/// 03: iptables-legacy -t nat in a container makes the kernel request iptable_nat.
fn container_autoload(ctx: &Ctx, problems: &mut Vec<String>) -> Vec<Expect> {
    ctx.step_rc("preload", true, problems);
    ctx.step_rc("ctr_iptables", true, problems);
    let Some((c, path, id)) = ctx.container("nat") else {
        problems.push("the scenario recorded no container facts".into());
        return Vec::new();
    };
    let loaded = ctx.appeared("before", "loaded");
    if !loaded.contains("iptable_nat") {
        problems.push(format!(
            "iptable_nat was not autoloaded (new modules: {loaded:?})"
        ));
    }
    let requester = c.id.clone();
    // The container declared no KERNEL_MODULES: its request is unexpected, and so is every
    // load the kernel's modprobe makes for it (judged against the requester, named in
    // requested_by).
    let mut want = vec![Expect {
        comm: Some("iptables-legacy".into()),
        verdict: Some("unexpected"),
        ..Place::Container(c, path, id).apply(Expect::new("request", "iptable_nat"))
    }];
    for m in &loaded {
        want.extend(ctx.loaded(m, "modprobe", &Place::Host).map(|x| Expect {
            verdict: Some("unexpected"),
            requested_by: Some(requester.clone()),
            ..x
        }));
    }
    want
}

/// 04: failed loads and unloads.
fn failures(ctx: &Ctx, problems: &mut Vec<String>) -> Vec<Expect> {
    ctx.step_rc("preload", true, problems);
    for step in [
        "corrupt",
        "duplicate",
        "in_use",
        "nocap_insmod",
        "nocap_rmmod",
    ] {
        ctx.step_rc(step, false, problems);
    }
    let changed: BTreeSet<String> = ctx
        .appeared("before", "after")
        .union(&ctx.appeared("after", "before"))
        .cloned()
        .collect();
    if !changed.is_empty() {
        problems.push(format!(
            "failed attempts changed the loaded modules: {changed:?}"
        ));
    }
    let Some((c, path, id)) = ctx.container("nocap") else {
        problems.push("the scenario recorded no container facts".into());
        return Vec::new();
    };
    let inside = Place::Container(c, path, id);
    let with = |x: Expect, comm: &str, place: &Place| {
        let finit = x.syscall == Some("finit_module");
        let module = x.module.clone().unwrap_or_default();
        Expect {
            comm: Some(comm.to_string()),
            module_may_be_unknown: !finit && x.kind == "load_attempt",
            // The module tree's file, or the scenario's own (/tmp/bogus.ko).
            path_suffix: finit.then(|| {
                ctx.deps
                    .path(&module)
                    .map_or(format!("/{module}.ko"), |p| format!("/{p}"))
            }),
            ..place.apply(x)
        }
    };
    // EAGAIN and EWOULDBLOCK are one value: accept either name.
    let eagain = ctx
        .events
        .iter()
        .find(|e| {
            e.kind == "unload_attempt"
                && e.module.as_deref() == Some("ip_vs")
                && e.result == Some(-11)
        })
        .and_then(|e| e.errno.clone())
        .filter(|n| n == "EWOULDBLOCK")
        .map_or("EAGAIN", |_| "EWOULDBLOCK");
    vec![
        with(
            failed("bogus", "load_attempt", Some("finit_module"), 8, "ENOEXEC"),
            "insmod",
            &Place::Host,
        ),
        with(
            failed(
                "ip_vs",
                "load_attempt",
                ctx.load_syscall("ip_vs"),
                17,
                "EEXIST",
            ),
            "insmod",
            &Place::Host,
        ),
        with(
            failed("ip_vs", "unload_attempt", Some("delete_module"), 11, eagain),
            "busybox",
            &Place::Host,
        ),
        with(
            failed(
                "ip_vs_rr",
                "load_attempt",
                ctx.load_syscall("ip_vs_rr"),
                1,
                "EPERM",
            ),
            "insmod",
            &inside,
        ),
        with(
            failed(
                "ip_vs_wrr",
                "unload_attempt",
                Some("delete_module"),
                1,
                "EPERM",
            ),
            "rmmod",
            &inside,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/net/netfilter/ipvs/ip_vs_wrr.ko: kernel/net/netfilter/ipvs/ip_vs.ko kernel/net/netfilter/nf_conntrack.ko kernel/lib/libcrc32c.ko\nkernel/net/netfilter/ipvs/ip_vs.ko: kernel/net/netfilter/nf_conntrack.ko kernel/lib/libcrc32c.ko\nkernel/net/netfilter/nf_conntrack.ko: kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko.xz kernel/lib/libcrc32c.ko\nkernel/net/ipv6/netfilter/nf_defrag_ipv6.ko.xz:\nkernel/lib/libcrc32c.ko:\nkernel/arch/x86/crypto/crc32c-intel.ko:\n";

    #[test]
    fn closure_follows_modules_dep_transitively() {
        let d = ModDeps::parse(DEP);
        let c: Vec<String> = d.closure("ip_vs_wrr").into_iter().collect();
        assert_eq!(
            c,
            [
                "ip_vs",
                "ip_vs_wrr",
                "libcrc32c",
                "nf_conntrack",
                "nf_defrag_ipv6"
            ]
        );
        assert_eq!(d.closure("unknown").len(), 1);
        assert!(d.compressed("nf_defrag_ipv6"));
        assert!(!d.compressed("ip_vs"));
        assert!(d.0.contains_key("crc32c_intel"));
    }

    #[test]
    fn places_set_cgroup_and_container() {
        let c = Container {
            id: "ab".repeat(32),
            runtime: "docker".into(),
        };
        let x = Place::Container(c.clone(), "/docker/x".into(), 42).apply(Expect::new("load", "m"));
        assert_eq!(
            (x.cgroup_id, x.cgroup_path.as_deref()),
            (Some(42), Some("/docker/x"))
        );
        assert_eq!(x.container, Some(Some(c)));
        let h = Place::Host.apply(Expect::new("load", "m"));
        assert_eq!(
            (h.cgroup_path.as_deref(), h.container),
            (Some("/"), Some(None))
        );
    }
}
