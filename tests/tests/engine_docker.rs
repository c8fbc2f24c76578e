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

#[test]
fn docker_containers_are_attributed_judged_and_seccomp_refusals_reported() {
    if !require_root("docker_containers_are_attributed_judged_and_seccomp_refusals_reported") {
        return;
    }
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
