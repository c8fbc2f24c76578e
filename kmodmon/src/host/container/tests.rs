//! Table-driven tests: real-world cgroup paths of each runtime and cgroup driver.
use super::*;

const ID: &str = "3f1b5c0e9a7d4e2f8b6c1a0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";
const ID2: &str = "8e2d4c6b0a1f3e5d7c9b1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d";
const UID: &str = "0f1a2b3c-4d5e-6789-abcd-ef0123456789";
const UID_US: &str = "0f1a2b3c_4d5e_6789_abcd_ef0123456789";

struct Want {
    id: &'static str,
    runtime: &'static str,
    name: Option<&'static str>,
    pod_uid: Option<&'static str>,
    qos: Option<&'static str>,
}

fn want(id: &'static str, runtime: &'static str) -> Want {
    Want {
        id,
        runtime,
        name: None,
        pod_uid: None,
        qos: None,
    }
}

fn pod(id: &'static str, runtime: &'static str, qos: &'static str) -> Want {
    Want {
        pod_uid: Some(UID),
        qos: Some(qos),
        ..want(id, runtime)
    }
}

fn named(name: &'static str, runtime: &'static str) -> Want {
    Want {
        name: Some(name),
        ..want(name, runtime)
    }
}

fn check(path: &str, w: Option<Want>) {
    let got = parse_cgroup_path(path);
    match (got, w) {
        (None, None) => {}
        (Some(c), Some(w)) => {
            assert_eq!(c.id, w.id, "id of {path}");
            assert_eq!(c.runtime, w.runtime, "runtime of {path}");
            assert_eq!(c.name.as_deref(), w.name, "name of {path}");
            assert_eq!(c.pod_uid.as_deref(), w.pod_uid, "pod uid of {path}");
            assert_eq!(c.qos_class.as_deref(), w.qos, "qos of {path}");
            assert_eq!(c.pod_name, None);
        }
        (Some(c), None) => panic!("{path} is not a container, got {c:?}"),
        (None, Some(w)) => panic!("{path} should be {} {}, got nothing", w.runtime, w.id),
    }
}

#[test]
fn docker_cgroupfs_and_systemd() {
    check(&format!("/docker/{ID}"), Some(want(ID, DOCKER)));
    check(
        &format!("/system.slice/docker-{ID}.scope"),
        Some(want(ID, DOCKER)),
    );
    // docker:dind moves its entrypoint to an `init` sub-cgroup.
    check(&format!("/docker/{ID}/init"), Some(want(ID, DOCKER)));
    // Rootless docker under the user's systemd.
    check(
        &format!("/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{ID}.scope"),
        Some(want(ID, DOCKER)),
    );
    // Seen from inside a cgroup namespace.
    check(&format!("/../../docker/{ID}"), Some(want(ID, DOCKER)));
}

#[test]
fn docker_in_docker_gives_innermost() {
    check(
        &format!("/docker/{ID}/docker/{ID2}"),
        Some(want(ID2, DOCKER)),
    );
    check(
        &format!("/system.slice/docker-{ID}.scope/docker/{ID2}"),
        Some(want(ID2, DOCKER)),
    );
    // The inner dockerd itself is in the outer container.
    check(
        &format!("/system.slice/docker-{ID}.scope/system.slice/docker.service"),
        Some(want(ID, DOCKER)),
    );
}

#[test]
fn containerd_cri_systemd_and_cgroupfs() {
    check(
        &format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/cri-containerd-{ID}.scope"
        ),
        Some(pod(ID, CONTAINERD, "Burstable")),
    );
    check(
        &format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_US}.slice/cri-containerd-{ID}.scope"
        ),
        Some(pod(ID, CONTAINERD, "BestEffort")),
    );
    check(
        &format!("/kubepods.slice/kubepods-pod{UID_US}.slice/cri-containerd-{ID}.scope"),
        Some(pod(ID, CONTAINERD, "Guaranteed")),
    );
    check(
        &format!("/system.slice/cri-containerd-{ID}.scope"),
        Some(want(ID, CONTAINERD)),
    );
    // cgroupfs driver: the runtime is not named by the path.
    check(
        &format!("/kubepods/burstable/pod{UID}/{ID}"),
        Some(pod(ID, CRI, "Burstable")),
    );
    check(
        &format!("/kubepods/besteffort/pod{UID}/{ID}"),
        Some(pod(ID, CRI, "BestEffort")),
    );
    check(
        &format!("/kubepods/pod{UID}/{ID}"),
        Some(pod(ID, CRI, "Guaranteed")),
    );
    // Plain containerd (ctr/nerdctl) namespaces.
    check(&format!("/default/{ID}"), Some(want(ID, CONTAINERD)));
    check(&format!("/k8s.io/{ID}"), Some(want(ID, CONTAINERD)));
    check(
        &format!("/system.slice/nerdctl-{ID}.scope"),
        Some(want(ID, CONTAINERD)),
    );
}

#[test]
fn kind_cluster_nested_in_docker() {
    // kind: a k8s node is a docker container; its pods use kubelet.slice.
    check(
        &format!(
            "/system.slice/docker-{ID2}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_US}.slice/cri-containerd-{ID}.scope"
        ),
        Some(pod(ID, CONTAINERD, "BestEffort")),
    );
    check(
        &format!("/docker/{ID2}/kubelet/kubepods/burstable/pod{UID}/{ID}"),
        Some(pod(ID, CRI, "Burstable")),
    );
    // Docker inside a pod's container: the pod is the outer container's, not the inner's.
    check(
        &format!("/kubepods/burstable/pod{UID}/{ID}/docker/{ID2}"),
        Some(want(ID2, DOCKER)),
    );
}

#[test]
fn cri_o() {
    check(
        &format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/crio-{ID}.scope"
        ),
        Some(pod(ID, CRIO, "Burstable")),
    );
    check(
        &format!("/kubepods/burstable/pod{UID}/crio-{ID}"),
        Some(pod(ID, CRIO, "Burstable")),
    );
    // conmon is a host process next to the container.
    check(
        &format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/crio-conmon-{ID}.scope"
        ),
        None,
    );
    check(&format!("/system.slice/crio-conmon-{ID}.scope"), None);
}

#[test]
fn podman() {
    check(
        &format!("/machine.slice/libpod-{ID}.scope"),
        Some(want(ID, PODMAN)),
    );
    check(
        &format!("/machine.slice/libpod-{ID}.scope/container"),
        Some(want(ID, PODMAN)),
    );
    check(
        &format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"),
        Some(want(ID, PODMAN)),
    );
    check(
        &format!("/machine.slice/machine-libpod_pod_{ID2}.slice/libpod-{ID}.scope"),
        Some(want(ID, PODMAN)),
    );
    check(
        &format!("/libpod_parent/libpod-{ID}"),
        Some(want(ID, PODMAN)),
    );
    check(&format!("/machine.slice/libpod-conmon-{ID}.scope"), None);
    check("/libpod_parent/conmon", None);
}

#[test]
fn isulad() {
    check(&format!("/isulad/{ID}"), Some(want(ID, ISULAD)));
    check(
        &format!("/system.slice/isulad-{ID}.scope"),
        Some(want(ID, ISULAD)),
    );
    check(
        &format!("/kubepods/besteffort/pod{UID}/{ID}"),
        Some(pod(ID, CRI, "BestEffort")),
    );
}

#[test]
fn lxc() {
    check("/lxc.payload.web1", Some(named("web1", LXC)));
    check(
        "/lxc.payload.web.example/init.scope",
        Some(named("web.example", LXC)),
    );
    check("/lxc.payload/web1", Some(named("web1", LXC)));
    check("/lxc/web1", Some(named("web1", LXC)));
    check("/lxc/web1/ns", Some(named("web1", LXC)));
    check("/lxc.monitor.web1", None);
    check("/lxc.pivot", None);
    check("/lxc", None);
}

#[test]
fn systemd_nspawn_and_machines() {
    check(
        "/machine.slice/machine-debian.scope",
        Some(named("debian", NSPAWN)),
    );
    check(
        "/machine.slice/machine-my\\x2dbox.scope/payload",
        Some(named("my-box", NSPAWN)),
    );
    // nspawn itself runs in `supervisor`, on the host side.
    check("/machine.slice/machine-my\\x2dbox.scope/supervisor", None);
    check(
        &format!("/docker/{ID}/machine.slice/machine-inner.scope/supervisor"),
        Some(want(ID, DOCKER)),
    );
    // libvirt: qemu is a VM (host process); libvirt-lxc is a container.
    check(
        "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope/libvirt/emulator",
        None,
    );
    check(
        "/machine.slice/machine-lxc\\x2d4242\\x2dweb.scope",
        Some(named("lxc-4242-web", LIBVIRT_LXC)),
    );
    // Bad escapes are kept; control bytes are escaped for display.
    check(
        "/machine.slice/machine-a\\x1b.scope",
        Some(named("a\\x1b", NSPAWN)),
    );
    check(
        "/machine.slice/machine-a\\xZZ.scope",
        Some(named("a\\\\xZZ", NSPAWN)),
    );
}

#[test]
fn generic_hex_ids() {
    check(&format!("/{ID}"), Some(want(ID, UNKNOWN)));
    check(&format!("/ecs/task1/{ID}"), Some(want(ID, UNKNOWN)));
}

#[test]
fn host_cgroups_are_not_containers() {
    for path in [
        "/",
        "",
        "/init.scope",
        "/user.slice",
        "/user.slice/user-1000.slice/session-3.scope",
        "/system.slice/ssh.service",
        "/system.slice/docker.service",
        "/system.slice/containerd.service",
        "/system.slice/crio.service",
        "/docker",
        "/kubepods",
        "/kubepods/burstable",
        "/kubepods.slice/kubepods-burstable.slice",
        // A pod cgroup has no container of its own.
        &format!("/kubepods/burstable/pod{UID}"),
        &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice"),
        // `pod<uid>` outside kubepods is just a name.
        &format!("/pod{UID}"),
        // Plain runc names are recognised from runtime state, not from the path.
        "/kmc-test1",
        "/process_api/5fd9f1755958cd4ebf07c5165c1e2db3",
        // Short, upper-case or over-long IDs are not a runtime's.
        "/docker/3f1b5c0e9a7d",
        &format!("/docker/{}", ID.to_ascii_uppercase()),
        &format!("/docker/{ID}0"),
        &format!("/system.slice/docker-{ID}x.scope"),
        "/machine.slice/machine-.scope",
        "/lxc.payload.",
    ] {
        check(path, None);
    }
}

#[test]
fn pod_uid_forms() {
    assert_eq!(pod_uid(UID).as_deref(), Some(UID));
    assert_eq!(pod_uid(UID_US).as_deref(), Some(UID));
    // Static pods: a 32-hex hash without separators.
    assert_eq!(
        pod_uid("5d1f7f4e6c0f3e9b8a2c1d0e9f8a7b6c").as_deref(),
        Some("5d1f7f4e6c0f3e9b8a2c1d0e9f8a7b6c")
    );
    assert_eq!(pod_uid("0f1a2b3c-4d5e"), None);
    assert_eq!(pod_uid("0f1a2b3c-4d5e-6789-abcd-ef012345678g"), None);
    assert_eq!(pod_uid(""), None);
}

#[test]
fn proc_cgroup_unified_line() {
    let text = "9:name=systemd:/\n4:memory:/x\n0::/docker/abc\n";
    assert_eq!(unified_path_from_proc_cgroup(text), Some("/docker/abc"));
    assert_eq!(unified_path_from_proc_cgroup("1:cpu:/\n"), None);
}

#[test]
fn generic_runtimes() {
    assert!(is_generic_runtime(CRI));
    assert!(is_generic_runtime(UNKNOWN));
    assert!(!is_generic_runtime(DOCKER));
}
