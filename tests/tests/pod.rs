//! kmodmon as the Kubernetes DaemonSet runs it (deploy/kubernetes/kmodmon.yaml), on this
//! machine: in a cgroup namespace and a mount namespace of its own, where /sys/fs/cgroup shows
//! only its own cgroup, with the host's cgroup tree bind-mounted elsewhere and named by
//! KMODMON_CGROUP_ROOT. A container that was running before kmodmon started (so its cgroup is
//! learnt from the tree, not from a cgroup_mkdir record) must still be recognised.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use kmodmon_tests::{
    container::{Bundle, random_id},
    have, require_root,
    tail::Tail,
};
use serde_json::Value;

/// The pod's own cgroup, removed when the test ends.
struct PodCgroup(PathBuf);

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // kmodmon has exited (Tail is dropped first): the cgroup is empty.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `kmodmon tail --json ARGS` inside a fresh cgroup namespace rooted at `pod` and a private
/// mount namespace: the host's cgroup2 tree bind-mounted at `host_cg`, then /sys/fs/cgroup
/// mounted anew (the namespace's view, as a container runtime gives a pod).
fn tail_in_pod(
    cg2: &Path,
    pod: &Path,
    host_cg: &Path,
    cgroup_root_env: bool,
    args: &[&str],
) -> Tail {
    let script = r#"
        echo $$ > "$POD/cgroup.procs" || exit 90
        exec unshare --cgroup --mount --propagation private sh -c '
            mount --bind "$CG2" "$HOST_CG" || exit 91
            # The kernel refuses the same superblock on its own root: put a tmpfs between.
            mount -t tmpfs pod-tmpfs "$CG2" || exit 92
            mount -t cgroup2 pod-cgroup2 "$CG2" || exit 93
            exec "$KMODMON" tail --json "$@"' kmodmon-pod "$@"
    "#;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg("pod")
        .args(args)
        .env("CG2", cg2)
        .env("POD", pod)
        .env("HOST_CG", host_cg)
        .env("KMODMON", kmodmon_tests::kmodmon_bin())
        .env_remove("KMODMON_CGROUP_ROOT");
    if !cgroup_root_env {
        // This case is about the cgroup2 tree alone: a host v1 hierarchy visible in the pod
        // would attribute the container correctly by itself (tests/tests/observe.rs).
        cmd.env("KMODMON_CGROUP_V1", "off");
    }
    if cgroup_root_env {
        cmd.env("KMODMON_CGROUP_ROOT", host_cg);
    }
    Tail::spawn(cmd)
}

fn wait_for(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A docker-layout container that waits for /go in its rootfs, then tries to load ip_vs.
/// Returns its ID, the ip_vs attempt kmodmon (in a pod, as configured) printed, and kmodmon's
/// stderr.
fn run_case(test: &str, cgroup_root_env: bool) -> Option<(String, Value, Vec<String>)> {
    if !require_root(test) {
        return None;
    }
    // One case at a time: each kmodmon sees every container on the machine.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    assert!(
        have("runc") && have("unshare"),
        "runc and unshare are needed"
    );
    let cg2 = kmodmon_tests::cgroup2_root().expect("no cgroup2 hierarchy mounted");
    let cg_root = cg2.as_path();
    let id = random_id();
    let bundle = Bundle::new(
        &format!("kmodmon-e2e-pod-{}", &id[..12]),
        &format!("/docker/{id}"),
        &["KERNEL_MODULES=ip_vs"],
        &[
            "/bin/sh",
            "-c",
            "while [ ! -e /go ]; do sleep 0.05; done; insmod /lib/modules/ip_vs.ko; sleep 0.2",
        ],
        &[("/lib/modules/ip_vs.ko", b"\x7fELF not a module")],
    );
    let go = bundle.path().join("rootfs/go");
    let container = std::thread::spawn(move || bundle.run());
    assert!(
        wait_for(&cg_root.join("docker").join(&id), Duration::from_secs(20)),
        "the container's cgroup never appeared"
    );

    let pod = PodCgroup(cg_root.join(format!("kmodmon-e2e-pod-{}", &id[..8])));
    std::fs::create_dir(&pod.0).expect("create the pod cgroup");
    let host_cg = tempfile::tempdir().expect("tempdir");
    let mut tail = tail_in_pod(
        cg_root,
        &pod.0,
        host_cg.path(),
        cgroup_root_env,
        &["--kind", "load_attempt"],
    );
    std::fs::write(&go, b"").expect("start the container's attempts");
    let events = tail.collect_until(Duration::from_secs(20), |e| {
        e.iter().any(|e| e["module"] == "ip_vs")
    });
    let log = tail.stop_log();
    let out = container.join().expect("container thread");
    assert!(out.status.success(), "runc run failed: {out:?}");
    let attempt = events
        .iter()
        .find(|e| e["module"] == "ip_vs")
        .unwrap_or_else(|| panic!("no ip_vs attempt: {events:#?}\n{}", log.join("\n")))
        .clone();
    Some((id, attempt, log))
}

#[test]
fn daemonset_layout_recognises_containers_through_the_host_cgroup_tree() {
    let Some((id, e, _)) = run_case(
        "daemonset_layout_recognises_containers_through_the_host_cgroup_tree",
        true,
    ) else {
        return;
    };
    assert_eq!(e["container"]["id"], id.as_str(), "{e}");
    assert_eq!(e["container"]["runtime"], "docker", "{e}");
    assert_eq!(e["verdict"], "expected", "{e}");
    assert_eq!(
        e["cgroup_path"],
        format!("/docker/{id}").as_str(),
        "the host's path, not the namespace's: {e}"
    );
}

/// The same pod without KMODMON_CGROUP_ROOT: kmodmon says what is wrong and how to fix it, and
/// the container it cannot see is not claimed.
#[test]
fn in_a_cgroup_namespace_without_the_host_tree_kmodmon_says_so() {
    let Some((id, e, log)) = run_case(
        "in_a_cgroup_namespace_without_the_host_tree_kmodmon_says_so",
        false,
    ) else {
        return;
    };
    let log = log.join("\n");
    assert!(
        log.contains("cgroup namespace of its own") && log.contains("KMODMON_CGROUP_ROOT="),
        "{log}"
    );
    // It cannot see the container's cgroup; it must not pretend the load came from the host
    // either. Either no verdict, saying why, or — the runtime process (`runc run`) being among
    // the task's ancestors — the right container through `on_behalf_of`.
    assert_ne!(e["container"]["id"], id.as_str(), "{e}");
    if e.get("on_behalf_of").is_some() {
        assert_eq!(e["on_behalf_of"]["container"]["id"], id.as_str(), "{e}");
        assert_ne!(e["verdict"], "host", "{e}");
    } else {
        assert!(
            e.get("verdict").is_none(),
            "no verdict without a cgroup: {e}"
        );
        let detail = e["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("not found under"), "{e}");
    }
}
