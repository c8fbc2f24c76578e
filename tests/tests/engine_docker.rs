//! Docker (Debian's docker.io) on this machine's kernel, started by the test with networking
//! off and every root private (`engines::Dockerd`), an image imported from a local busybox
//! rootfs tarball. Checked: attribution (full ID, runtime, name), the KERNEL_MODULES
//! declaration read as the container starts (an `expectation` event, verdicts), and Docker's
//! default seccomp profile on (the attempt refused with EPERM, `blocked_by: "seccomp"`) and off
//! (`--security-opt seccomp=unconfined`: the syscall runs; ENOSYS on a kernel without module
//! support).
use std::time::Duration;

use kmodmon_tests::{
    engines::{
        self, Dockerd, assert_container, assert_ran, assert_refused, attempt, expectation,
        expected_modules,
    },
    require_root,
    tail::Tail,
};

const WAIT: Duration = Duration::from_secs(60);
const IMAGE: &str = "kmodmon-busybox:e2e";

/// One dockerd at a time in this file (they share the `/docker` parent cgroup, which the
/// first to finish would remove).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn docker_containers_are_attributed_judged_and_seccomp_refusals_reported() {
    if !require_root("docker_containers_are_attributed_judged_and_seccomp_refusals_reported") {
        return;
    }
    let _serial = serial();
    kmodmon_tests::kmodmon_bin();
    let dockerd = Dockerd::start();
    let work = tempfile::tempdir().expect("tempdir");
    let (_rootfs, tar) = engines::busybox_rootfs(work.path());
    dockerd.import(&tar, IMAGE);

    let pid = std::process::id();
    let (on, off) = (
        format!("kmodmon-e2e-docker-{pid}"),
        format!("kmodmon-e2e-docker-{pid}-unconfined"),
    );
    let undeclared = format!("kmd{pid}_undeclared");
    let declared = format!("kmd{pid}_declared");
    let unconfined = format!("kmd{pid}_unconfined");

    let mut args: Vec<String> = vec![
        "--container".into(),
        on.clone(),
        "--container".into(),
        off.clone(),
    ];
    args.extend(dockerd.state_dir_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut tail = Tail::start(&args);

    let env = format!("KERNEL_MODULES=ip_vs,{declared}");
    let script = format!(
        "rmmod {undeclared}; rmmod {declared}; insmod /lib/modules/kmodmon_e2e.ko; sleep 1"
    );
    let run_on = dockerd.run(&["--name", &on, "-e", &env], IMAGE, &["sh", "-c", &script]);
    let script_off = format!("rmmod {unconfined}; sleep 1");
    let run_off = dockerd.run(
        &[
            "--name",
            &off,
            "--security-opt",
            "seccomp=unconfined",
            "-e",
            &env,
        ],
        IMAGE,
        &["sh", "-c", &script_off],
    );
    assert_eq!(run_on.id.len(), 64, "docker run: {:?}", run_on.output);
    assert_eq!(run_off.id.len(), 64, "docker run: {:?}", run_off.output);
    // What the callers saw, in their own words (busybox rmmod prints strerror).
    let said = String::from_utf8_lossy(&run_on.output.stderr).into_owned();
    assert!(said.contains("Operation not permitted"), "{said}");
    let said_off = String::from_utf8_lossy(&run_off.output.stderr).into_owned();
    assert!(!said_off.contains("Operation not permitted"), "{said_off}");

    let events = tail.collect_until(WAIT, |e| {
        [
            &undeclared,
            &declared,
            &unconfined,
            &"kmodmon_e2e".to_string(),
        ]
        .iter()
        .all(|m| attempt(e, m).is_some())
            && expectation(e, &on).is_some()
            && expectation(e, &off).is_some()
    });
    drop(tail);

    let get =
        |m: &str| attempt(&events, m).unwrap_or_else(|| panic!("no attempt for {m}: {events:#?}"));
    for m in [&undeclared, &declared, &"kmodmon_e2e".to_string()] {
        let e = get(m);
        assert_eq!(e["blocked_by"], "seccomp", "{m}: {e:#}");
        assert_eq!(e["result"], -1, "{m}: {e:#}");
        assert_eq!(e["errno"], "EPERM", "{m}: {e:#}");
        let c = &e["container"];
        assert_eq!(c["id"], run_on.id.as_str(), "{e:#}");
        assert_eq!(c["runtime"], "docker", "{e:#}");
        assert_eq!(c["name"], on.as_str(), "{e:#}");
        assert!(
            e["cgroup_path"]
                .as_str()
                .is_some_and(|p| p.ends_with(&run_on.id)),
            "{e:#}"
        );
    }
    assert_eq!(get(&undeclared)["verdict"], "unexpected");
    assert_eq!(
        get(&declared)["verdict"],
        "expected",
        "the declaration was read"
    );
    assert_eq!(get("kmodmon_e2e")["kind"], "load_attempt");

    let e = get(&unconfined);
    assert_ran(e);
    assert_container(e, &run_off.id, "docker", &off);

    // The declaration, read as each container started: what it declares and this host
    // lacks.
    for (name, id) in [(&on, &run_on.id), (&off, &run_off.id)] {
        let x = expectation(&events, name).expect("expectation");
        assert!(expected_modules(x).contains(&declared), "{x:#}");
        assert_container(x, id, "docker", name);
    }
}

/// kmodmon itself in a Docker container as the DaemonSet runs it: Docker's default seccomp
/// profile, all capabilities dropped but the DaemonSet's (Docker 20.10 knows no CAP_BPF or
/// CAP_PERFMON: CAP_SYS_ADMIN, which the DaemonSet has too, covers both), the host's PID namespace, the
/// host's cgroup tree at /host/sys/fs/cgroup (`KMODMON_CGROUP_ROOT`), tracefs and bpffs, the
/// engine's state read-only. The binary under test and the host's libraries are bind-mounted
/// into the busybox image. It must attach, and report a workload container's refused attempt
/// (attributed) and a confined host process's.
#[test]
fn kmodmon_runs_under_dockers_default_seccomp_profile() {
    if !require_root("kmodmon_runs_under_dockers_default_seccomp_profile") {
        return;
    }
    let _serial = serial();
    let kmodmon = kmodmon_tests::kmodmon_bin();
    let dockerd = Dockerd::start();
    let work = tempfile::tempdir().expect("tempdir");
    let (_rootfs, tar) = engines::busybox_rootfs(work.path());
    dockerd.import(&tar, IMAGE);

    let pid = std::process::id();
    let workload = format!("kmodmon-e2e-docker-{pid}-workload");
    let in_ctr = format!("kmd{pid}_from_container");
    let on_host = format!("kmd{pid}_from_host");
    let data = dockerd.data_root().display().to_string();
    let exec = dockerd.exec_root().display().to_string();
    let vol =
        |src: &str, dst: &str, ro: bool| format!("{src}:{dst}{}", if ro { ":ro" } else { "" });
    let mut cmd = dockerd.cmd(&["run", "--rm", "--name"]);
    cmd.arg(format!("kmodmon-e2e-docker-{pid}-monitor")).args([
        "--network",
        "none",
        "--pid",
        "host",
        "--cap-drop",
        "ALL",
    ]);
    // The DaemonSet's capabilities this machine can grant (its sandbox's bounding set lacks
    // CAP_SYS_RESOURCE, which kmodmon only needs for memlock on kernels before 5.11).
    for (cap, bit) in [
        ("SYS_RESOURCE", CAP_SYS_RESOURCE),
        ("SYS_ADMIN", CAP_SYS_ADMIN),
        ("SYS_PTRACE", CAP_SYS_PTRACE),
        ("DAC_READ_SEARCH", CAP_DAC_READ_SEARCH),
    ] {
        if in_bounding_set(bit) {
            cmd.args(["--cap-add", cap]);
        }
    }
    for (src, dst, ro) in [
        ("/usr", "/usr", true),
        ("/usr/lib", "/lib", true),
        ("/usr/lib64", "/lib64", true),
        (kmodmon.to_str().expect("utf-8 path"), "/kmodmon", true),
        ("/sys/kernel/tracing", "/sys/kernel/tracing", true),
        ("/sys/fs/bpf", "/sys/fs/bpf", false),
        ("/sys/fs/cgroup", "/host/sys/fs/cgroup", true),
        (data.as_str(), data.as_str(), true),
        (exec.as_str(), exec.as_str(), true),
    ] {
        cmd.args(["-v", &vol(src, dst, ro)]);
    }
    let cgroup_root = match kmodmon_tests::cgroup2_root() {
        Some(r) if r.ends_with("unified") => "/host/sys/fs/cgroup/unified",
        _ => "/host/sys/fs/cgroup",
    };
    cmd.args(["-e", &format!("KMODMON_CGROUP_ROOT={cgroup_root}")])
        .arg(IMAGE)
        .args([
            "/kmodmon", "tail", "--json", "--module", &in_ctr, "--module", &on_host,
        ]);
    cmd.args(dockerd.state_dir_args());
    let mut tail = Tail::spawn(cmd);

    let script = format!("rmmod {in_ctr}; sleep 1");
    let run = dockerd.run(&["--name", &workload], IMAGE, &["sh", "-c", &script]);
    assert_eq!(run.id.len(), 64, "docker run: {:?}", run.output);
    let load = env!("CARGO_BIN_EXE_kmodmon-load");
    let out = engines::must(
        std::process::Command::new(load)
            .args(["seccomp", "errno", load, "delete"])
            .arg(&on_host),
    );
    assert!(out.contains("ret=-1 errno=1"), "{out}");

    let events = tail.collect_until(WAIT, |e| {
        attempt(e, &in_ctr).is_some() && attempt(e, &on_host).is_some()
    });
    let (rest, summary) = tail.stop();
    let events: Vec<_> = events.into_iter().chain(rest).collect();
    let e = attempt(&events, &in_ctr).unwrap_or_else(|| panic!("{events:#?}"));
    assert_refused(e);
    assert_container(e, &run.id, "docker", &workload);
    let e = attempt(&events, &on_host).unwrap_or_else(|| panic!("{events:#?}"));
    assert_refused(e);
    assert_eq!(e["verdict"], "host", "{e:#}");
    kmodmon_tests::tail::assert_accounting(&summary);
}

// Capability numbers (include/uapi/linux/capability.h; libc does not export them).
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether capability `bit` is in this process's bounding set.
fn in_bounding_set(bit: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << bit) != 0)
}
