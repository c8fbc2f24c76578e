//! The enricher as a stream stage, on a fake host: a cgroup2 tree, /proc, runtime state and
//! /proc/modules under a temporary directory.
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::*;
use crate::event::{SourceName, Verdict};
use crate::host::moddb::DepmodFiles;
use crate::host::runtime_state::StateConfig;
use crate::host::{Registry, RegistryOptions};

const HEX: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new(proc_modules: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/fs/cgroup/unified")).unwrap();
        std::fs::create_dir_all(dir.path().join("proc/self")).unwrap();
        std::fs::write(dir.path().join("proc/modules"), proc_modules).unwrap();
        Host { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn cg_root(&self) -> PathBuf {
        self.root().join("sys/fs/cgroup/unified")
    }

    /// Creates a cgroup; returns its id.
    fn mkdir(&self, rel: &str) -> u64 {
        let d = self.cg_root().join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cgroup.procs"), "").unwrap();
        std::fs::metadata(&d).unwrap().ino()
    }

    fn procs(&self, rel: &str, pids: &[u32]) {
        let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(
            self.cg_root()
                .join(rel.trim_start_matches('/'))
                .join("cgroup.procs"),
            text,
        )
        .unwrap();
    }

    fn process(&self, pid: u32, comm: &str, environ: &[u8]) {
        let d = self.root().join("proc").join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("environ"), environ).unwrap();
        std::fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
    }

    fn enricher(&self) -> Enricher {
        self.enricher_with(false)
    }

    fn enricher_with(&self, load_expected: bool) -> Enricher {
        let registry = Registry::open(RegistryOptions {
            state: Some(StateConfig::under(self.root())),
            cgroup_root: Some(self.cg_root()),
            live_root: Some(self.root().to_path_buf()),
            no_moddb: true,
            ..RegistryOptions::default()
        });
        let mut e = Enricher::new(registry, EnrichOptions { load_expected });
        let files = DepmodFiles {
            dep: "kernel/ip_vs_wrr.ko: kernel/ip_vs.ko kernel/nf_conntrack.ko\n\
                  kernel/ip_vs.ko: kernel/nf_conntrack.ko\n\
                  kernel/nf_conntrack.ko:\n\
                  kernel/iptable_nat.ko: kernel/nf_nat.ko kernel/nf_conntrack.ko\n\
                  kernel/nf_nat.ko: kernel/nf_conntrack.ko\n\
                  kernel/other.ko:\n"
                .into(),
            alias: Some("alias net-pf-10 ipv6\nalias fs-xfs xfs\n".into()),
            ..DepmodFiles::default()
        };
        e.set_moddb(Some(ModDb::parse("test", &files)));
        e
    }
}

fn event(kind: Kind, module: &str, cgroup_id: u64, pid: u32, ktime_ns: u64) -> Event {
    let mut ev = Event::synthetic(kind, &Clock::new());
    ev.source = SourceName::RawSyscalls;
    ev.module = Some(module.to_string());
    ev.cgroup_id = cgroup_id;
    ev.pid = pid;
    ev.ppid = None;
    ev.comm = "insmod".to_string();
    ev.ktime_ns = ktime_ns;
    ev
}

/// Polls (as the pipeline does) until `n` events are ready or 2 s pass.
fn drain(e: &mut Enricher, n: usize) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        e.poll();
        out.extend(e.take_ready());
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

#[test]
fn a_starting_container_is_captured_and_its_events_judged() {
    let h = Host::new("ip_vs 1 0 - Live 0x0\n");
    let mut e = h.enricher();
    let path = format!("/docker/{HEX}");
    let id = h.mkdir(&path);
    // The cgroup appears with runc's init in it: not the container's environment yet.
    h.process(100, "runc:[2:INIT]", b"_LIBCONTAINER_INITPIPE=3\0");
    h.procs(&path, &[100]);
    e.cgroup_created(id, &path);
    e.handle(event(Kind::LoadAttempt, "ip_vs_wrr", id, 101, 1));
    e.handle(event(Kind::LoadAttempt, "nf_conntrack", id, 101, 2));
    e.handle(event(Kind::LoadAttempt, "other", id, 101, 3));
    assert!(
        e.take_ready().is_empty(),
        "held while the declaration is read"
    );
    // The program runs: its environment declares the modules.
    h.process(
        100,
        "sh",
        b"PATH=/bin\0KERNEL_MODULES=ip_vs,ip-vs-wrr,bad name\0",
    );
    let out = drain(&mut e, 4);
    let kinds: Vec<Kind> = out.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            Kind::Expectation,
            Kind::LoadAttempt,
            Kind::LoadAttempt,
            Kind::LoadAttempt
        ],
        "{out:#?}"
    );
    let x = &out[0];
    assert_eq!(
        x.modules,
        vec!["ip_vs_wrr"],
        "ip_vs is loaded per /proc/modules"
    );
    assert_eq!(x.container.as_ref().unwrap().id, HEX);
    let d = x.detail.as_deref().unwrap();
    assert!(d.contains("bad name"), "{d}");
    let verdicts: Vec<_> = out[1..].iter().map(|e| e.verdict).collect();
    assert_eq!(
        verdicts,
        vec![
            Some(Verdict::Expected),
            Some(Verdict::Expected),
            Some(Verdict::Unexpected)
        ]
    );
    assert!(out[2].detail.as_deref().unwrap().contains("dependency of"));
    assert_eq!(out[1].container.as_ref().unwrap().runtime, "docker");
    // Later events pass straight through.
    e.handle(event(Kind::UnloadAttempt, "ip_vs", id, 102, 4));
    let now = e.take_ready();
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].verdict, Some(Verdict::Expected));
}

#[test]
fn a_100ms_container_is_judged_after_its_cgroup_is_gone() {
    let h = Host::new("");
    let mut e = h.enricher();
    let path = format!("/isulad/{HEX}");
    let id = h.mkdir(&path);
    h.process(200, "sh", b"KERNEL_MODULES=ip_vs\0");
    h.procs(&path, &[200]);
    e.cgroup_created(id, &path);
    // Gone before any event is handled: the process and the cgroup.
    std::fs::remove_dir_all(h.root().join("proc/200")).unwrap();
    std::fs::remove_dir_all(h.cg_root().join(path.trim_start_matches('/'))).unwrap();
    e.cgroup_removed(id, &path);
    e.handle(event(Kind::LoadAttempt, "ip_vs", id, 201, 1));
    e.handle(event(Kind::LoadAttempt, "other", id, 201, 2));
    let out = drain(&mut e, 3);
    assert_eq!(out[0].kind, Kind::Expectation, "{out:#?}");
    assert_eq!(out[0].modules, vec!["ip_vs"]);
    assert_eq!(out[1].cgroup_path.as_deref(), Some(path.as_str()));
    assert_eq!(out[1].container.as_ref().unwrap().runtime, "isulad");
    assert_eq!(out[1].verdict, Some(Verdict::Expected));
    assert_eq!(out[2].verdict, Some(Verdict::Unexpected));
}

#[test]
fn an_unreadable_declaration_is_reported_not_waited_for_forever() {
    let h = Host::new("");
    let path = format!("/docker/{HEX}");
    let id = h.mkdir(&path);
    let mut e = h.enricher();
    e.handle(event(Kind::LoadAttempt, "ip_vs", id, 300, 1));
    assert!(e.take_ready().is_empty());
    e.flush();
    let out = e.take_ready();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].verdict, Some(Verdict::Unexpected));
    assert!(
        out[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("KERNEL_MODULES unknown"),
        "{:?}",
        out[0].detail
    );
}

#[test]
fn a_cgroup_outside_the_tree_gets_no_verdict_rather_than_host() {
    // kmodmon in a cgroup namespace without the host's tree: a container's cgroup id is in no
    // directory kmodmon reads. "host" would be a guess.
    let h = Host::new("");
    let mut e = h.enricher();
    e.handle(event(Kind::LoadAttempt, "ip_vs", 987_654_321, 1, 1));
    let out = e.take_ready();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].verdict, None);
    assert!(out[0].cgroup_path.is_none());
    let detail = out[0].detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains("cgroup 987654321 not found under") && detail.contains("no verdict"),
        "{detail}"
    );
}

#[test]
fn host_events_pass_straight_through() {
    let h = Host::new("");
    let id = h.mkdir("/system.slice/cron.service");
    let mut e = h.enricher();
    e.handle(event(Kind::LoadAttempt, "ip_vs", id, 1, 1));
    let out = e.take_ready();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].verdict, Some(Verdict::Host));
    assert_eq!(
        out[0].cgroup_path.as_deref(),
        Some("/system.slice/cron.service")
    );
    assert!(out[0].container.is_none());
    assert_eq!(out[0].detail, None);
}

#[test]
fn autoloads_are_joined_to_the_requesting_container() {
    let h = Host::new("");
    let mut e = h.enricher();
    let path = format!("/kubepods/burstable/pod0f3c3b1e-5d2a-4c8e-9a6b-2f1d7e9c4b11/{HEX}");
    let id = h.mkdir(&path);
    let root = h.mkdir("/");
    h.process(400, "iptables", b"KERNEL_MODULES=iptable_nat\0");
    h.procs(&path, &[400]);
    e.cgroup_created(id, &path);
    let mut req = event(Kind::Request, "iptable_nat", id, 400, 1_000);
    req.comm = "iptables".into();
    e.handle(req);
    // The kernel's modprobe, in the root cgroup, loads the dependencies and the module, and
    // something else that nobody asked for.
    for (i, m) in ["nf_conntrack", "nf_nat", "iptable_nat", "ip_vs"]
        .iter()
        .enumerate()
    {
        let mut ld = event(Kind::Load, m, root, 500, 2_000 + i as u64);
        ld.comm = "modprobe".into();
        ld.source = SourceName::ModuleTracepoint;
        e.handle(ld);
    }
    let out = drain(&mut e, 6);
    assert_eq!(out.len(), 6, "{out:#?}");
    assert_eq!(out[0].kind, Kind::Expectation);
    assert_eq!(out[0].modules, vec!["iptable_nat"]);
    assert_eq!(out[1].kind, Kind::Request);
    assert_eq!(out[1].verdict, Some(Verdict::Expected));
    assert_eq!(out[1].container.as_ref().unwrap().runtime, "cri");
    for ld in &out[2..5] {
        let r = ld.requested_by.as_ref().expect("requested_by");
        assert_eq!(r.requested, "iptable_nat");
        assert_eq!(r.pid, 400);
        assert_eq!(r.comm, "iptables");
        assert_eq!(r.container.as_ref().unwrap().id, HEX);
        assert!(ld.container.is_none(), "the load itself ran on the host");
        assert_eq!(ld.verdict, Some(Verdict::Expected), "{ld:?}");
    }
    let stray = &out[5];
    assert_eq!(stray.module.as_deref(), Some("ip_vs"));
    assert!(stray.requested_by.is_none());
    assert_eq!(stray.verdict, Some(Verdict::Host));
}

#[test]
fn an_autoload_for_an_undeclared_module_is_unexpected() {
    let h = Host::new("");
    let mut e = h.enricher();
    let path = format!("/docker/{HEX}");
    let id = h.mkdir(&path);
    let root = h.mkdir("/");
    h.process(600, "sh", b"HOME=/\0");
    h.procs(&path, &[600]);
    e.cgroup_created(id, &path);
    e.handle(event(Kind::Request, "fs-xfs", id, 600, 10));
    let mut ld = event(Kind::Load, "xfs", root, 700, 20);
    ld.comm = "modprobe".into();
    e.handle(ld);
    let out = drain(&mut e, 2);
    assert_eq!(
        out.len(),
        2,
        "no expectation event: nothing declared; {out:#?}"
    );
    assert_eq!(out[0].verdict, Some(Verdict::Unexpected));
    assert_eq!(out[1].requested_by.as_ref().unwrap().requested, "fs-xfs");
    assert_eq!(out[1].verdict, Some(Verdict::Unexpected));
    assert!(
        out[1]
            .detail
            .as_deref()
            .unwrap()
            .contains("declares no KERNEL_MODULES")
    );
}

#[test]
fn load_expected_reports_and_joins_its_own_modprobe() {
    let h = Host::new("");
    let root = h.mkdir("/");
    let mut e = h.enricher_with(true);
    let path = format!("/docker/{HEX}");
    let id = h.mkdir(&path);
    h.process(800, "sh", b"KERNEL_MODULES=kmodmon_unit_absent\0");
    h.procs(&path, &[800]);
    e.cgroup_created(id, &path);
    // This machine's modprobe cannot load a module of that name: the run fails, and says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < 2 && Instant::now() < deadline {
        e.poll();
        out.extend(e.take_ready());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(out.len(), 2, "{out:#?}");
    assert_eq!(out[0].kind, Kind::SelfLoad);
    assert!(out[0].modules.is_empty());
    assert!(
        out[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("failed: kmodmon_unit_absent"),
        "{:?}",
        out[0].detail
    );
    assert_eq!(out[1].kind, Kind::Expectation);
    assert_eq!(out[1].modules, vec!["kmodmon_unit_absent"]);
    // Had modprobe loaded it, the load (by modprobe, on the host) is joined to kmodmon's run
    // for that container.
    let mut ld = event(
        Kind::Load,
        "kmodmon_unit_absent",
        root,
        900,
        crate::event::monotonic_ns(),
    );
    ld.comm = "modprobe".into();
    e.handle(ld);
    let got = e.take_ready();
    let r = got[0].requested_by.as_ref().expect("joined");
    assert_eq!(r.comm, "kmodmon");
    assert_eq!(r.container.as_ref().unwrap().id, HEX);
    assert_eq!(got[0].verdict, Some(Verdict::Expected));
}
