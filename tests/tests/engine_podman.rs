//! podman (Debian's podman 4.3) on this machine's kernel: storage and run roots private to the
//! test (`engines::Podman`), the runc runtime (Debian's default crun refuses this machine's
//! hybrid cgroup layout), explicit `--ulimit`s below the sandbox's hard limits, no network, an
//! image imported from a local busybox rootfs tarball. Checked as for Docker: attribution
//! (full ID, runtime `podman`, name), the KERNEL_MODULES declaration, podman's default seccomp
//! profile on (EPERM, `blocked_by: "seccomp"`) and off (`--security-opt seccomp=unconfined`).
use std::time::Duration;

use kmodmon_tests::{
    engines::{
        self, Podman, assert_container, assert_ran, assert_refused, attempt, expectation,
        expected_modules,
    },
    require_root,
    tail::Tail,
};

const WAIT: Duration = Duration::from_secs(60);
const IMAGE: &str = "localhost/kmodmon-busybox:e2e";

#[test]
fn podman_containers_are_attributed_judged_and_seccomp_refusals_reported() {
    if !require_root("podman_containers_are_attributed_judged_and_seccomp_refusals_reported") {
        return;
    }
    kmodmon_tests::kmodmon_bin();
    let podman = Podman::new();
    let work = tempfile::tempdir().expect("tempdir");
    let (_rootfs, tar) = engines::busybox_rootfs(work.path());
    podman.import(&tar, IMAGE);

    let pid = std::process::id();
    let (on, off) = (
        format!("kmodmon-e2e-podman-{pid}"),
        format!("kmodmon-e2e-podman-{pid}-unconfined"),
    );
    let undeclared = format!("kmp{pid}_undeclared");
    let declared = format!("kmp{pid}_declared");
    let unconfined = format!("kmp{pid}_unconfined");

    let mut args: Vec<String> = vec![
        "--container".into(),
        on.clone(),
        "--container".into(),
        off.clone(),
    ];
    args.extend(podman.state_dir_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut tail = Tail::start(&args);

    let env = format!("KERNEL_MODULES=ip_vs,{declared}");
    let script = format!("rmmod {undeclared}; rmmod {declared}; sleep 1");
    let run_on = podman.run(&["--name", &on, "-e", &env], IMAGE, &["sh", "-c", &script]);
    let script_off = format!("rmmod {unconfined}; sleep 1");
    let run_off = podman.run(
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
    assert_eq!(run_on.id.len(), 64, "podman run: {:?}", run_on.output);
    assert_eq!(run_off.id.len(), 64, "podman run: {:?}", run_off.output);
    let said = String::from_utf8_lossy(&run_on.output.stderr).into_owned();
    assert!(said.contains("Operation not permitted"), "{said}");
    let said_off = String::from_utf8_lossy(&run_off.output.stderr).into_owned();
    assert!(!said_off.contains("Operation not permitted"), "{said_off}");

    let events = tail.collect_until(WAIT, |e| {
        [&undeclared, &declared, &unconfined]
            .iter()
            .all(|m| attempt(e, m).is_some())
            && expectation(e, &on).is_some()
            && expectation(e, &off).is_some()
    });
    drop(tail);

    let get =
        |m: &str| attempt(&events, m).unwrap_or_else(|| panic!("no attempt for {m}: {events:#?}"));
    for m in [&undeclared, &declared] {
        let e = get(m);
        assert_refused(e);
        assert_container(e, &run_on.id, "podman", &on);
        assert_eq!(
            e["cgroup_path"],
            format!("/libpod_parent/libpod-{}", run_on.id),
            "{e:#}"
        );
    }
    assert_eq!(get(&undeclared)["verdict"], "unexpected");
    assert_eq!(
        get(&declared)["verdict"],
        "expected",
        "the declaration was read"
    );
    let e = get(&unconfined);
    assert_ran(e);
    assert_container(e, &run_off.id, "podman", &off);
    for (name, id) in [(&on, &run_on.id), (&off, &run_off.id)] {
        let x = expectation(&events, name).expect("expectation");
        assert!(expected_modules(x).contains(&declared), "{x:#}");
        assert_container(x, id, "podman", name);
    }
}
