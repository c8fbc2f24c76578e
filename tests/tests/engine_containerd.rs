//! containerd (Debian's containerd 1.6) on this machine's kernel, driven with `ctr`: a daemon
//! private to the test (`engines::Containerd`: its own root, state, socket and config, the CRI
//! plugin off), containers from a local busybox rootfs (`ctr run --rootfs`, no image, no
//! registry), containerd's own network namespace per task (no network).
//!
//! 1. Plain `ctr run`: attribution (ID, runtime), the declaration, containerd's default
//!    seccomp profile on (`--seccomp`: EPERM, `blocked_by: "seccomp"`) and off (ctr's default:
//!    no profile).
//! 2. A Kubernetes-style container as the CRI plugin lays it out: namespace `k8s.io`, cgroup
//!    `/kubepods/burstable/pod<uid>/<id>`, the CRI's pod annotations in the OCI spec, the
//!    RuntimeDefault (containerd's default) profile: pod fields and container name come from
//!    the annotations.
use std::time::Duration;

use kmodmon_tests::{
    container::random_id,
    engines::{
        self, Containerd, assert_ran, assert_refused, attempt, expectation, expected_modules,
    },
    require_root,
    tail::Tail,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// One containerd at a time in this file.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn ctr_containers_are_attributed_and_seccomp_refusals_reported() {
    if !require_root("ctr_containers_are_attributed_and_seccomp_refusals_reported") {
        return;
    }
    let _serial = serial();
    kmodmon_tests::kmodmon_bin();
    let containerd = Containerd::start();
    let work = tempfile::tempdir().expect("tempdir");
    let (rootfs, _tar) = engines::busybox_rootfs(work.path());

    let pid = std::process::id();
    let (on, off) = (
        format!("kmodmon-e2e-ctr-{pid}"),
        format!("kmodmon-e2e-ctr-{pid}-unconfined"),
    );
    let undeclared = format!("kmc{pid}_undeclared");
    let declared = format!("kmc{pid}_declared");
    let unconfined = format!("kmc{pid}_unconfined");
    let mut args: Vec<String> = vec![
        "--container".into(),
        on.clone(),
        "--container".into(),
        off.clone(),
    ];
    args.extend(containerd.state_dir_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut tail = Tail::start(&args);

    let env = format!("KERNEL_MODULES=ip_vs,{declared}");
    let script = format!("rmmod {undeclared}; rmmod {declared}; sleep 1");
    let out_on = containerd.run(
        "kmodmon",
        &["--seccomp", "--env", "PATH=/bin", "--env", &env],
        &rootfs,
        &on,
        &["/bin/sh", "-c", &script],
    );
    let script_off = format!("rmmod {unconfined}; sleep 1");
    let out_off = containerd.run(
        "kmodmon",
        &["--env", "PATH=/bin", "--env", &env],
        &rootfs,
        &off,
        &["/bin/sh", "-c", &script_off],
    );
    assert!(
        said(&out_on).contains("Operation not permitted"),
        "{}",
        said(&out_on)
    );
    assert!(
        !said(&out_off).contains("Operation not permitted"),
        "{}",
        said(&out_off)
    );

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
        assert_ctr(e, &on);
    }
    assert_eq!(get(&undeclared)["verdict"], "unexpected");
    assert_eq!(
        get(&declared)["verdict"],
        "expected",
        "the declaration was read"
    );
    let e = get(&unconfined);
    assert_ran(e);
    assert_ctr(e, &off);
    for name in [&on, &off] {
        let x = expectation(&events, name).expect("expectation");
        assert!(expected_modules(x).contains(&declared), "{x:#}");
    }
}

/// A plain containerd container: its ID is its name; cgroup `/<namespace>/<id>`.
fn assert_ctr(e: &Value, id: &str) {
    let c = &e["container"];
    assert_eq!(c["id"], id, "{e:#}");
    assert_eq!(c["runtime"], "containerd", "{e:#}");
    assert!(c["name"].is_null() || c["name"] == id, "{e:#}");
    assert_eq!(e["cgroup_path"], format!("/kmodmon/{id}"), "{e:#}");
}

#[test]
fn a_kubernetes_pod_container_is_named_with_its_pod() {
    if !require_root("a_kubernetes_pod_container_is_named_with_its_pod") {
        return;
    }
    let _serial = serial();
    kmodmon_tests::kmodmon_bin();
    let mut containerd = Containerd::start();
    let work = tempfile::tempdir().expect("tempdir");
    let (rootfs, _tar) = engines::busybox_rootfs(work.path());

    let pid = std::process::id();
    let id = random_id();
    let sandbox = random_id();
    let pod_uid = format!("0c6e3a2e-5f1d-4b7e-9a33-{:012x}", pid);
    let cgroup = format!("/kubepods/burstable/pod{pod_uid}/{id}");
    let pod_cgroup = format!("/kubepods/burstable/pod{pod_uid}");
    containerd
        .cgroups
        .add(&["/kubepods", "/kubepods/burstable", &pod_cgroup]);
    let pod_name = format!("lb-{pid}");
    let declared = format!("kmk{pid}_declared");
    let undeclared = format!("kmk{pid}_undeclared");
    let annotations = [
        "io.kubernetes.cri.container-type=container".to_string(),
        "io.kubernetes.cri.container-name=balancer".to_string(),
        format!("io.kubernetes.cri.sandbox-id={sandbox}"),
        format!("io.kubernetes.cri.sandbox-name={pod_name}"),
        "io.kubernetes.cri.sandbox-namespace=kmodmon-e2e".to_string(),
        format!("io.kubernetes.cri.sandbox-uid={pod_uid}"),
    ];
    let mut args: Vec<String> = vec!["--container".into(), pod_name.clone()];
    args.extend(containerd.state_dir_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut tail = Tail::start(&args);

    let env = format!("KERNEL_MODULES=ip_vs,{declared}");
    let mut run_args: Vec<&str> = vec![
        "--seccomp",
        "--cgroup",
        &cgroup,
        "--env",
        "PATH=/bin",
        "--env",
        &env,
    ];
    for a in &annotations {
        run_args.extend(["--annotation", a.as_str()]);
    }
    let script = format!("rmmod {undeclared}; rmmod {declared}; sleep 1");
    let out = containerd.run(
        "k8s.io",
        &run_args,
        &rootfs,
        &id,
        &["/bin/sh", "-c", &script],
    );
    assert!(
        said(&out).contains("Operation not permitted"),
        "{}",
        said(&out)
    );
    let events = tail.collect_until(WAIT, |e| {
        attempt(e, &undeclared).is_some() && attempt(e, &declared).is_some()
    });
    drop(tail);
    for m in [&undeclared, &declared] {
        let e = attempt(&events, m).unwrap_or_else(|| panic!("no attempt for {m}: {events:#?}"));
        assert_refused(e);
        let c = &e["container"];
        assert_eq!(c["id"], id.as_str(), "{e:#}");
        assert_eq!(c["runtime"], "containerd", "{e:#}");
        assert_eq!(c["name"], "balancer", "{e:#}");
        assert_eq!(c["pod_name"], pod_name.as_str(), "{e:#}");
        assert_eq!(c["pod_namespace"], "kmodmon-e2e", "{e:#}");
        assert_eq!(c["pod_uid"], pod_uid.as_str(), "{e:#}");
        assert_eq!(c["qos_class"], "Burstable", "{e:#}");
        assert_eq!(e["cgroup_path"], cgroup.as_str(), "{e:#}");
    }
    assert_eq!(
        attempt(&events, &undeclared).expect("seen")["verdict"],
        "unexpected"
    );
    assert_eq!(
        attempt(&events, &declared).expect("seen")["verdict"],
        "expected"
    );
}
