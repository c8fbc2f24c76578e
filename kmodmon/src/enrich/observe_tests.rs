//! OCI hooks (`on_behalf_of`) and cgroup v1 attribution, on a fake host: cgroup trees, /proc,
//! an OCI bundle and a runtime process under a temporary directory.
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::*;
use crate::enforce::{EnforceError, Enforcer, StartOptions, cgroup_v1_refusal};
use crate::event::{Ancestor, Container, SourceName, Verdict};
use crate::host::cgroup_v1::{CgroupLayout, V1Hierarchy};
use crate::host::runtime_state::StateConfig;
use crate::host::{Registry, RegistryOptions};

const HEX: &str = "3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c";
/// The v1 hierarchy id of the fake memory hierarchy.
const MEMORY: u32 = 4;

struct Host(tempfile::TempDir);

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        for d in ["sys/fs/cgroup/unified", "sys/fs/cgroup/memory", "proc"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("proc/modules"), "").unwrap();
        Host(dir)
    }

    fn root(&self) -> &Path {
        self.0.path()
    }

    /// A cgroup directory under `tree` (`unified` or `memory`) with `pids`; its id.
    fn mkdir(&self, tree: &str, rel: &str, pids: &[u32]) -> u64 {
        let d = self
            .root()
            .join("sys/fs/cgroup")
            .join(tree)
            .join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&d).unwrap();
        let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(d.join("cgroup.procs"), text).unwrap();
        std::fs::metadata(&d).unwrap().ino()
    }

    fn process(&self, pid: u32, comm: &str, environ: &[u8]) -> PathBuf {
        let d = self.root().join("proc").join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("environ"), environ).unwrap();
        std::fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
        d
    }

    /// /proc/PID/stat of a process `comm` whose parent is `ppid`, started at `ticks`.
    fn stat(&self, pid: u32, comm: &str, ppid: u32, ticks: u64) {
        let stat = format!(
            "{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 {ticks}{}",
            crate::host::runtime_process::STAT_TAIL
        );
        let d = self.root().join("proc").join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("stat"), stat).unwrap();
    }

    /// A runtime process `pid` started at `ticks`, running `argv` in `cwd`.
    fn runtime_process(&self, pid: u32, ticks: u64, argv: &[&str], cwd: &Path) {
        let d = self.process(pid, argv[0], b"");
        self.stat(pid, argv[0], 1, ticks);
        let cmdline: Vec<u8> = argv
            .iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect();
        std::fs::write(d.join("cmdline"), cmdline).unwrap();
        std::os::unix::fs::symlink(cwd, d.join("cwd")).unwrap();
    }

    /// An OCI bundle declaring `env`, under cgroupsPath `cg`.
    fn bundle(&self, name: &str, env: &str, cg: &str) -> PathBuf {
        let b = self.root().join("bundles").join(name);
        std::fs::create_dir_all(&b).unwrap();
        let cfg = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"env": ["PATH=/bin", env]},
            "linux": {"cgroupsPath": cg},
        });
        std::fs::write(b.join("config.json"), cfg.to_string()).unwrap();
        b
    }

    fn options(&self, v1: bool, layout: CgroupLayout) -> RegistryOptions {
        RegistryOptions {
            state: Some(StateConfig::under(self.root())),
            cgroup_root: Some(self.root().join("sys/fs/cgroup/unified")),
            live_root: Some(self.root().to_path_buf()),
            no_moddb: true,
            cgroup_v1: v1.then(|| V1Hierarchy {
                controller: "memory".into(),
                hierarchy_id: MEMORY,
                mount: self.root().join("sys/fs/cgroup/memory"),
                cgroup2: (layout == CgroupLayout::Hybrid)
                    .then(|| self.root().join("sys/fs/cgroup/unified")),
            }),
            cgroup_layout: Some(layout),
            ..RegistryOptions::default()
        }
    }

    fn enricher(&self, v1: bool, layout: CgroupLayout) -> Enricher {
        Enricher::new(
            Registry::open(self.options(v1, layout)),
            EnrichOptions::default(),
        )
    }
}

fn attempt(module: &str, cgroup_id: u64, pid: u32) -> Event {
    let mut ev = Event::synthetic(Kind::LoadAttempt, &Clock::new());
    ev.source = SourceName::RawSyscalls;
    ev.module = Some(module.to_string());
    ev.cgroup_id = cgroup_id;
    ev.pid = pid;
    ev.ppid = None;
    ev.comm = "modprobe".into();
    ev
}

fn ns(ticks: u64) -> u64 {
    ticks * (1_000_000_000 / procfs::ticks_per_second())
}

fn ready_of(e: &mut Enricher, kind: Kind) -> Vec<Event> {
    e.poll();
    e.take_ready()
        .into_iter()
        .filter(|ev| ev.kind == kind)
        .collect()
}

/// A prestart hook (`sh`, child of `runc run -b BUNDLE c1`) runs modprobe on the host while
/// the container's cgroup holds only runc's init: judged against the bundle's declaration.
#[test]
fn a_hooks_loads_are_judged_for_the_container_its_runtime_creates() {
    let h = Host::new();
    let mut e = h.enricher(false, CgroupLayout::Unified);
    let path = format!("/isulad/{HEX}");
    h.process(40, "runc:[2:INIT]", b"_LIBCONTAINER_INITPIPE=3\0");
    let cg = h.mkdir("unified", &path, &[40]);
    e.cgroup_created(cg, &path);
    assert!(
        e.registry().is_pending(HEX),
        "runc's init is not the container yet"
    );
    let bundle = h.bundle("c1", "KERNEL_MODULES=ip_vs,ip_vs_wrr", &path);
    let b = bundle.to_str().unwrap();
    h.runtime_process(
        30,
        555,
        &["runc", "run", "--no-pivot", "-b", b, "c1"],
        h.root(),
    );
    let ancestors = vec![
        Ancestor {
            pid: 45,
            start_boottime_ns: ns(556),
            comm: "sh".into(),
        },
        Ancestor {
            pid: 30,
            start_boottime_ns: ns(555),
            comm: "runc".into(),
        },
    ];
    let mut ev = attempt("ip_vs_wrr", 1, 50);
    ev.ancestors = ancestors.clone();
    e.handle(ev);
    let mut other = attempt("kmodmon_other", 1, 51);
    other.ancestors = ancestors.clone();
    e.handle(other);
    let got = ready_of(&mut e, Kind::LoadAttempt);
    assert_eq!(
        got.len(),
        2,
        "not held: the bundle gave the declaration: {got:#?}"
    );
    let b0 = got[0]
        .on_behalf_of
        .as_ref()
        .expect("on behalf of the container");
    assert_eq!(got[0].container, None, "the hook is the host's process");
    assert_eq!(
        (b0.container.id.as_str(), b0.container.runtime.as_str()),
        (HEX, "isulad")
    );
    assert_eq!(b0.container.name.as_deref(), Some("c1"), "runc's ID");
    assert_eq!(
        (
            b0.how.as_str(),
            b0.pid,
            b0.comm.as_str(),
            b0.command.as_str(),
            b0.depth
        ),
        ("runtime_cmdline", 30, "runc", "run", 2)
    );
    assert_eq!(b0.bundle.as_deref(), Some(b));
    assert_eq!(got[0].verdict, Some(Verdict::Expected));
    assert_eq!(got[1].verdict, Some(Verdict::Unexpected));
    assert!(
        got[1]
            .detail
            .as_deref()
            .unwrap()
            .contains("ip_vs,ip_vs_wrr")
    );
    // The container the registry tracks got the bundle: its declaration is known at once.
    let t = e.registry().container(HEX).unwrap();
    assert_eq!(t.declared_modules(), ["ip_vs", "ip_vs_wrr"]);
    assert_eq!(t.container.name.as_deref(), Some("c1"));

    // The same pid with another start time is another process: nothing is claimed.
    let mut reused = attempt("ip_vs", 1, 52);
    reused.ancestors = vec![Ancestor {
        pid: 30,
        start_boottime_ns: ns(999),
        comm: "runc".into(),
    }];
    e.handle(reused);
    let got = ready_of(&mut e, Kind::LoadAttempt);
    assert_eq!(got[0].on_behalf_of, None);
    assert_eq!(got[0].verdict, Some(Verdict::Host));
}

/// `runc run -d` exits right after its hooks: its hooks' events may be enriched after it is
/// gone. It was read as its container started (the parent of the container's init).
#[test]
fn a_runtime_gone_before_its_hooks_events_is_known_from_its_containers_start() {
    let h = Host::new();
    let mut e = h.enricher(false, CgroupLayout::Unified);
    let path = format!("/docker/{HEX}");
    let bundle = h.bundle("quick", "KERNEL_MODULES=dummy", &path);
    let b = bundle.to_str().unwrap();
    h.runtime_process(33, 900, &["runc", "run", "-d", "-b", b, "quick"], h.root());
    h.process(41, "runc:[2:INIT]", b"_LIBCONTAINER_INITPIPE=3\0");
    h.stat(41, "runc:[2:INIT]", 33, 901);
    let cg = h.mkdir("unified", &path, &[41]);
    e.cgroup_created(cg, &path);
    // The runtime exits; then the hook's event is read.
    std::fs::remove_dir_all(h.root().join("proc/33")).unwrap();
    let mut ev = attempt("dummy", 1, 90);
    ev.ancestors = vec![
        Ancestor {
            pid: 44,
            start_boottime_ns: ns(902),
            comm: "sh".into(),
        },
        Ancestor {
            pid: 33,
            start_boottime_ns: ns(900),
            comm: "runc".into(),
        },
    ];
    e.handle(ev);
    let got = ready_of(&mut e, Kind::LoadAttempt);
    let b = got[0]
        .on_behalf_of
        .as_ref()
        .expect("known from the container's start");
    assert_eq!((b.container.id.as_str(), b.depth), (HEX, 2));
    assert_eq!(got[0].verdict, Some(Verdict::Expected));
}

/// crun, a container the registry has not seen (no cgroup yet), the bundle in the working
/// directory: the container comes from the bundle alone.
#[test]
fn a_crun_hook_names_a_container_from_its_working_directory() {
    let h = Host::new();
    let mut e = h.enricher(false, CgroupLayout::Unified);
    let bundle = h.bundle("plain", "KERNEL_MODULES=dummy", "");
    h.runtime_process(
        31,
        700,
        &["crun", "--root=/run/crun", "create", "plain"],
        &bundle,
    );
    let mut ev = attempt("dummy", 1, 60);
    ev.ancestors = vec![Ancestor {
        pid: 31,
        start_boottime_ns: ns(700),
        comm: "crun".into(),
    }];
    e.handle(ev);
    let got = ready_of(&mut e, Kind::LoadAttempt);
    let b = got[0].on_behalf_of.as_ref().unwrap();
    assert_eq!(
        (
            b.container.id.as_str(),
            b.container.runtime.as_str(),
            b.depth
        ),
        ("plain", "crun", 1)
    );
    assert_eq!(got[0].verdict, Some(Verdict::Expected));
    assert!(
        e.registry().container("plain").is_none(),
        "no phantom container tracked"
    );
    // An event in a container's own cgroup is that container's, whoever its ancestors are.
    let mut ev = attempt("dummy", 1, 61);
    ev.container = Some(Container {
        id: "x".into(),
        runtime: "runc".into(),
        ..Container::default()
    });
    ev.cgroup_path = Some("/x".into());
    ev.ancestors = got[0].ancestors.clone();
    e.handle(ev);
    assert_eq!(ready_of(&mut e, Kind::LoadAttempt)[0].on_behalf_of, None);
}

/// v1-only layout: every task is in the cgroup2 root; the memory hierarchy names the
/// container.
#[test]
fn a_v1_only_container_is_attributed_by_its_v1_cgroup() {
    let h = Host::new();
    let mut e = h.enricher(true, CgroupLayout::Legacy);
    let path = format!("/isulad/{HEX}");
    h.process(70, "sh", b"KERNEL_MODULES=dummy\0");
    let v1 = h.mkdir("memory", &path, &[70]);
    let host_v1 = h.mkdir("memory", "/system.slice/cron.service", &[]);
    e.cgroup_v1_created(MEMORY, host_v1, "/system.slice/cron.service");
    // A record of another hierarchy (ids collide across hierarchies) changes nothing.
    e.cgroup_v1_created(MEMORY + 1, v1, &path);
    assert!(e.take_changes().is_empty());
    e.cgroup_v1_created(MEMORY, v1, &path);
    assert_eq!(
        e.take_changes(),
        vec![
            Change::Appeared {
                key: HEX.into(),
                cgroup_id: 0
            },
            Change::Settled { key: HEX.into() }
        ]
    );
    let x = ready_of(&mut e, Kind::Expectation);
    assert_eq!(x[0].cgroup_v1.as_ref().map(|c| c.id), Some(v1));
    let mut ev = attempt("dummy", 1, 70);
    ev.cgroup_v1 = Some(CgroupV1 {
        id: v1,
        ..CgroupV1::default()
    });
    e.handle(ev);
    let mut host = attempt("dummy", 1, 71);
    host.cgroup_v1 = Some(CgroupV1 {
        id: host_v1,
        ..CgroupV1::default()
    });
    e.handle(host);
    let mut lost = attempt("dummy", 1, 72);
    lost.cgroup_v1 = Some(CgroupV1 {
        id: u64::MAX - 1,
        ..CgroupV1::default()
    });
    e.handle(lost);
    let got = ready_of(&mut e, Kind::LoadAttempt);
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].container.as_ref().unwrap().id, HEX);
    assert_eq!(got[0].verdict, Some(Verdict::Expected));
    assert_eq!(
        got[0].cgroup_v1,
        Some(CgroupV1 {
            hierarchy: MEMORY,
            controller: "memory".into(),
            id: v1,
            path: Some(path.clone())
        })
    );
    assert_eq!(got[1].container, None);
    assert_eq!(got[1].verdict, Some(Verdict::Host), "decided by v1: kept");
    assert_eq!(
        got[1].cgroup_v1.as_ref().unwrap().path.as_deref(),
        Some("/system.slice/cron.service")
    );
    assert_eq!(got[2].verdict, None, "unknown v1 cgroup: no guessed host");
    assert!(
        got[2]
            .detail
            .as_deref()
            .unwrap()
            .contains("not found under")
    );
    // Enforcement cannot tell these containers apart: it refuses, and says why.
    let why = cgroup_v1_refusal(e.registry()).unwrap();
    assert!(why.contains("only cgroup v1"), "{why}");
    e.cgroup_v1_removed(MEMORY, v1, &path);
    assert_eq!(
        e.take_changes(),
        vec![Change::Gone {
            key: HEX.into(),
            cgroup_id: 0
        }]
    );
}

/// Hybrid: a container seen in v1 first gains its cgroup2 cgroup (the enforcer is told);
/// one that stays in v1 only is named in the refusal.
#[test]
fn hybrid_containers_join_their_cgroup2_and_v1_only_ones_block_enforcement() {
    let h = Host::new();
    let mut e = h.enricher(true, CgroupLayout::Hybrid);
    let path = format!("/docker/{HEX}");
    h.process(80, "sh", b"KERNEL_MODULES=dummy\0");
    let v1 = h.mkdir("memory", &path, &[80]);
    e.cgroup_v1_created(MEMORY, v1, &path);
    assert!(cgroup_v1_refusal(e.registry()).unwrap().contains(HEX));
    let v2 = h.mkdir("unified", &path, &[80]);
    e.take_changes();
    e.cgroup_created(v2, &path);
    assert_eq!(e.take_changes(), vec![Change::Updated { key: HEX.into() }]);
    let t = e.registry().container(HEX).unwrap();
    assert_eq!((t.cgroup_id, t.cgroup_v1_id), (v2, v1));
    assert_eq!(cgroup_v1_refusal(e.registry()), None);
    // Its own cgroup2 decides its events: the v1 cgroup is not shown.
    let mut ev = attempt("dummy", v2, 80);
    ev.cgroup_v1 = Some(CgroupV1 {
        id: v1,
        ..CgroupV1::default()
    });
    e.handle(ev);
    let got = ready_of(&mut e, Kind::LoadAttempt);
    assert_eq!(got[0].container.as_ref().unwrap().id, HEX);
    assert_eq!(got[0].cgroup_v1, None);
}

/// `Enforcer::start` on a v1-only host refuses before touching the kernel, with the reason.
#[test]
fn enforcement_refuses_to_start_on_a_v1_only_host() {
    let h = Host::new();
    let policy = h.root().join("policy.toml");
    std::fs::write(&policy, "mode = \"enforce\"\n").unwrap();
    let registry = Registry::open(h.options(true, CgroupLayout::Legacy));
    let mut opts = StartOptions::new(&policy);
    opts.pins = crate::enforce::PinDir {
        root: h.root().join("pins"),
    };
    match Enforcer::start(opts, &registry) {
        Err(e @ EnforceError::CgroupV1(_)) => {
            let text = e.to_string();
            assert!(text.contains("only cgroup v1"), "{text}");
            assert!(text.contains("nothing was installed"), "{text}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("enforcement started on a v1-only host"),
    }
    assert!(!h.root().join("pins").exists(), "nothing pinned");
}

/// A hook's autoload request (iptables in a hook → `iptable_nat`): the request is on behalf of
/// the container, and the load the kernel's modprobe makes for it is judged for that
/// container through the autoload join.
#[test]
fn a_hooks_autoload_request_is_joined_to_its_container() {
    let h = Host::new();
    let mut e = h.enricher(false, CgroupLayout::Unified);
    let bundle = h.bundle("nat", "KERNEL_MODULES=iptable_nat", "");
    h.runtime_process(34, 800, &["runc", "create", "nat"], &bundle);
    let mut req = attempt("iptable_nat", 1, 95);
    req.kind = Kind::Request;
    req.ancestors = vec![Ancestor {
        pid: 34,
        start_boottime_ns: ns(800),
        comm: "runc".into(),
    }];
    e.handle(req);
    let mut ld = attempt("iptable_nat", 1, 96);
    ld.kind = Kind::Load;
    ld.ktime_ns = crate::event::monotonic_ns();
    e.handle(ld);
    e.poll();
    let got = e.take_ready();
    let (req, ld) = (&got[0], &got[1]);
    assert_eq!(req.on_behalf_of.as_ref().unwrap().container.id, "nat");
    assert_eq!(req.verdict, Some(Verdict::Expected));
    let by = ld
        .requested_by
        .as_ref()
        .expect("joined to the hook's request");
    assert_eq!(by.container.as_ref().unwrap().id, "nat");
    assert_eq!(
        ld.on_behalf_of, None,
        "the kernel's modprobe has no runtime ancestor"
    );
    assert_eq!(ld.verdict, Some(Verdict::Expected));
}
