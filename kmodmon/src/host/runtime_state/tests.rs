//! Fixture tests: state directories laid out as the runtimes lay them out, under a temp dir.
//! The runc fixture is trimmed from a real `runc run -d` (runc 1.1.5) on this project's
//! machine; `real_runc_container` repeats that for real when run as root.
use std::path::Path;

use super::formats::{expand_slice, oci_cgroups_path, stat_start_time, stat_state, strip_mount};
use super::*;
use crate::host::declaration::Source;

const HEX: &str = "abababababababababababababababababababababababababababababababab";
const CID: &str = "3f1b5c0e9a7d4e2f8b6c1a0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";
const UID: &str = "0f1a2b3c-4d5e-6789-abcd-ef0123456789";

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A /proc/PID/stat whose start time (field 22) is `start`; comm with spaces and parens.
fn fake_proc(root: &Path, pid: u32, start: u64) {
    let stat = format!(
        "{pid} (sle (e) p) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 {start} 1 2 3"
    );
    write(&root.join(format!("proc/{pid}/stat")), &stat);
}

fn cfg(tmp: &Path) -> StateConfig {
    let mut c = StateConfig::under(tmp);
    // Fixture state files carry the host's absolute cgroup dirs.
    c.cgroup2_mounts = vec!["/sys/fs/cgroup/unified".into(), "/sys/fs/cgroup".into()];
    c
}

/// A runc state.json as runc 1.1 writes it (trimmed), `runc run -d` with a cgroupsPath.
fn runc_state(
    id: &str,
    pid: u32,
    start: u64,
    bundle: &Path,
    cgroup: &str,
    annotations: &[&str],
) -> String {
    let mut labels: Vec<String> = annotations.iter().map(|a| format!("{a:?}")).collect();
    labels.push(format!("\"bundle={}\"", bundle.display()));
    format!(
        r#"{{"id":"{id}","init_process_pid":{pid},"init_process_start":{start},
"created":"2026-11-22T13:34:23.507838873Z",
"config":{{"no_pivot_root":false,"rootfs":"{b}/rootfs","readonlyfs":true,
 "cgroups":{{"path":"{cgroup}","scope_prefix":"","devices":[],"memory":0}},
 "hostname":"runc","version":"1.0.2-dev","labels":[{labels}],"no_new_keyring":false}},
"rootless":false,
"cgroup_paths":{{"":"/sys/fs/cgroup/unified{cgroup}","cpu":"/sys/fs/cgroup/cpu{cgroup}",
 "memory":"/sys/fs/cgroup/memory{cgroup}","name=systemd":"/sys/fs/cgroup/systemd{cgroup}"}},
"namespace_paths":{{"NEWNET":"/proc/{pid}/ns/net"}},"external_descriptors":["/dev/null"],"intel_rdt_path":""}}"#,
        b = bundle.display(),
        labels = labels.join(",")
    )
}

/// An OCI config.json (trimmed `runc spec`), with env and annotations.
fn oci_config(env: &[&str], annotations: &[(&str, &str)], cgroups_path: &str) -> String {
    let env: Vec<String> = env.iter().map(|e| format!("{e:?}")).collect();
    let ann: Vec<String> = annotations
        .iter()
        .map(|(k, v)| format!("{k:?}:{v:?}"))
        .collect();
    format!(
        r#"{{"ociVersion":"1.0.2-dev","process":{{"terminal":false,"user":{{"uid":0,"gid":0}},
"args":["sleep","30"],"env":[{env}],"cwd":"/"}},"root":{{"path":"rootfs","readonly":true}},
"hostname":"runc","linux":{{"cgroupsPath":"{cgroups_path}","namespaces":[{{"type":"pid"}}]}},
"annotations":{{{ann}}}}}"#,
        env = env.join(","),
        ann = ann.join(",")
    )
}

#[test]
fn runc_container_mimicking_docker() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = cfg(t);
    let bundle = t.join("bundles/b1");
    let cgroup = format!("/docker/{HEX}");
    write(
        &t.join("run/runc/kmc-test1/state.json"),
        &runc_state(
            "kmc-test1",
            10927,
            54887,
            &bundle,
            &cgroup,
            &[
                "io.kubernetes.pod.name=web-0",
                "io.kubernetes.pod.namespace=default",
            ],
        ),
    );
    write(
        &bundle.join("config.json"),
        &oci_config(
            &["PATH=/bin", "TERM=xterm", "KERNEL_MODULES=ip_vs,ip_vs_wrr"],
            &[
                ("io.kubernetes.pod.name", "web-0"),
                ("io.kubernetes.pod.namespace", "default"),
            ],
            &cgroup,
        ),
    );
    fake_proc(t, 10927, 54887);

    let l = lookup(&cfg, "kmc-test1");
    assert!(l.problems.is_empty(), "{:?}", l.problems);
    let m = l.meta.unwrap();
    assert_eq!(m.pid, Some(10927));
    assert!(m.running);
    assert_eq!(m.cgroup_path.as_deref(), Some(cgroup.as_str()));
    assert_eq!(m.bundle.as_deref(), Some(bundle.as_path()));
    assert_eq!(m.config_path, Some(bundle.join("config.json")));
    assert_eq!(m.runtime, "runc");
    assert_eq!(m.pod_name.as_deref(), Some("web-0"));

    let c = m.to_container();
    assert_eq!(c.id, HEX);
    assert_eq!(c.runtime, "docker");
    assert_eq!(c.name.as_deref(), Some("kmc-test1"));
    assert_eq!(c.pod_namespace.as_deref(), Some("default"));

    let d = m.declaration(&cfg.proc_root, None).unwrap();
    assert_eq!(d.expected.modules, vec!["ip_vs", "ip_vs_wrr"]);
    assert_eq!(d.source, Source::Config(bundle.join("config.json")));

    // The path names an ID no state directory has: only the index finds it.
    assert!(lookup_cgroup(&cfg, &cgroup).meta.is_none());
    let index = StateIndex::scan(&cfg);
    assert_eq!(index.len(), 1);
    let found = index.by_cgroup_path(&format!("{cgroup}/init")).unwrap();
    assert_eq!(found.id, "kmc-test1");
    assert!(index.by_cgroup_path("/docker").is_none());
    assert!(index.by_cgroup_path("/").is_none());

    let (list, problems) = running_containers(&cfg);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].expected_modules(), ["ip_vs", "ip_vs_wrr"]);
    assert!(list[0].bad_entries().is_empty());
    assert_eq!(list[0].container.id, HEX);
}

#[test]
fn plain_runc_by_name_and_stale_state() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = cfg(t);
    // No cgroupsPath: runc puts it at /<name>. No bundle left: env from /proc.
    write(
        &t.join("run/runc/kmc-plain/state.json"),
        &runc_state("kmc-plain", 200, 7, &t.join("gone"), "/kmc-plain", &[]),
    );
    fake_proc(t, 200, 7);
    write(
        &t.join("proc/200/environ"),
        "HOME=/\0KERNEL_MODULES=xt_nat, bad/name\0",
    );
    // A stopped container whose pid was reused by another process (start time differs).
    write(
        &t.join("run/runc/old/state.json"),
        &runc_state("old", 300, 5, &t.join("gone"), "/old", &[]),
    );
    fake_proc(t, 300, 99);
    // A container whose init is a zombie.
    write(
        &t.join("run/runc/zombie/state.json"),
        &runc_state("zombie", 301, 5, &t.join("gone"), "/zombie", &[]),
    );
    write(
        &t.join("proc/301/stat"),
        "301 (sleep) Z 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0",
    );

    let m = lookup_cgroup(&cfg, "/kmc-plain").meta.unwrap();
    assert_eq!(m.id, "kmc-plain");
    let c = m.to_container();
    assert_eq!(
        (c.id.as_str(), c.runtime.as_str(), c.name),
        ("kmc-plain", "runc", None)
    );
    let d = m.declaration(&cfg.proc_root, None).unwrap();
    assert_eq!(d.source, Source::Environ(200));
    assert_eq!(d.expected.modules, vec!["xt_nat"]);
    assert_eq!(d.expected.bad[0].entry, "bad/name");
    // Sub-cgroups are the container's; other top-level cgroups are not.
    assert!(lookup_cgroup(&cfg, "/kmc-plain/sub").meta.is_some());
    assert!(
        lookup_cgroup(&cfg, "/process_api/5fd9f1755958cd4ebf07c5165c1e2db3")
            .meta
            .is_none()
    );
    assert!(lookup_cgroup(&cfg, "/init.scope").meta.is_none());

    let old = lookup(&cfg, "old").meta.unwrap();
    assert!(!old.running);
    let index = StateIndex::scan(&cfg);
    assert!(index.by_id("old").is_none());
    assert!(index.by_id("zombie").is_none());
    assert!(lookup(&cfg, "zombie").meta.is_some_and(|m| !m.running));
    assert!(index.by_id("kmc-plain").is_some());
}

#[test]
fn containerd_cri_with_systemd_cgroups() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = cfg(t);
    let uid_us = UID.replace('-', "_");
    let bundle = t.join(format!(
        "run/containerd/io.containerd.runtime.v2.task/k8s.io/{CID}"
    ));
    // runc state of the systemd driver: no unified path recorded, cgroups by parent/prefix.
    let state = format!(
        r#"{{"id":"{CID}","init_process_pid":4100,"init_process_start":11,
"config":{{"cgroups":{{"path":"","name":"{CID}","parent":"kubepods-burstable-pod{uid_us}.slice","scope_prefix":"cri-containerd","systemd":true}},
"labels":["bundle={b}"]}},"cgroup_paths":{{}}}}"#,
        b = bundle.display()
    );
    write(
        &t.join(format!("run/containerd/runc/k8s.io/{CID}/state.json")),
        &state,
    );
    write(
        &bundle.join("config.json"),
        &oci_config(
            &["KERNEL_MODULES=ip_vs"],
            &[
                ("io.kubernetes.cri.container-type", "container"),
                ("io.kubernetes.cri.container-name", "proxy"),
                ("io.kubernetes.cri.sandbox-name", "kube-proxy-x7k2p"),
                ("io.kubernetes.cri.sandbox-namespace", "kube-system"),
                ("io.kubernetes.cri.sandbox-uid", UID),
            ],
            &format!("kubepods-burstable-pod{uid_us}.slice:cri-containerd:{CID}"),
        ),
    );
    write(&bundle.join("init.pid"), "4100");
    fake_proc(t, 4100, 11);

    let cgroup = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_us}.slice/cri-containerd-{CID}.scope"
    );
    let l = lookup_cgroup(&cfg, &cgroup);
    assert!(l.problems.is_empty(), "{:?}", l.problems);
    let m = l.meta.unwrap();
    assert_eq!(m.cgroup_path.as_deref(), Some(cgroup.as_str()));
    assert!(m.running);
    assert_eq!(m.runtime, "containerd");
    let c = m.to_container();
    assert_eq!(c.id, CID);
    assert_eq!(c.runtime, "containerd");
    assert_eq!(c.name.as_deref(), Some("proxy"));
    assert_eq!(c.pod_name.as_deref(), Some("kube-proxy-x7k2p"));
    assert_eq!(c.pod_namespace.as_deref(), Some("kube-system"));
    assert_eq!(c.pod_uid.as_deref(), Some(UID));
    assert_eq!(c.qos_class.as_deref(), Some("Burstable"));
    assert_eq!(
        m.sources.len(),
        2,
        "runc state and task bundle: {:?}",
        m.sources
    );

    // The cgroupfs driver's path names no runtime; the state does.
    let mut c =
        crate::host::container::parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}/{CID}"))
            .unwrap();
    assert_eq!(c.runtime, "cri");
    m.apply_to(&mut c);
    assert_eq!(c.runtime, "containerd");
}

#[test]
fn docker_task_bundle_and_engine_config() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = cfg(t);
    let bundle = t.join(format!(
        "run/containerd/io.containerd.runtime.v2.task/moby/{CID}"
    ));
    write(
        &bundle.join("config.json"),
        &oci_config(
            &["KERNEL_MODULES=iptable_nat"],
            &[],
            &format!("/docker/{CID}"),
        ),
    );
    write(&bundle.join("init.pid"), "777\n");
    fake_proc(t, 777, 1);
    write(
        &t.join(format!("var/lib/docker/containers/{CID}/config.v2.json")),
        &format!(
            r#"{{"ID":"{CID}","Name":"/dind","State":{{"Running":true,"Pid":777}},
"Config":{{"Env":["KERNEL_MODULES=ignored_when_bundle_found"],"Labels":{{"com.example":"x"}}}}}}"#
        ),
    );
    let m = lookup(&cfg, CID).meta.unwrap();
    assert_eq!(m.runtime, "docker");
    assert_eq!(m.name.as_deref(), Some("dind"));
    assert!(m.running);
    let d = m.declaration(&cfg.proc_root, None).unwrap();
    assert_eq!(d.expected.modules, vec!["iptable_nat"]);
    let c = m.to_container();
    assert_eq!(
        (c.runtime.as_str(), c.name.as_deref()),
        ("docker", Some("dind"))
    );

    // Without the bundle, the engine's own config has the env.
    std::fs::remove_dir_all(&bundle).unwrap();
    let m = lookup(&cfg, CID).meta.unwrap();
    let d = m.declaration(&cfg.proc_root, None).unwrap();
    assert_eq!(d.expected.modules, vec!["ignored_when_bundle_found"]);
    assert!(matches!(d.source, Source::Config(p) if p.ends_with("config.v2.json")));
}

#[test]
fn podman_on_crun_with_storage_names() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = cfg(t);
    let userdata = t.join(format!(
        "var/lib/containers/storage/overlay-containers/{CID}/userdata"
    ));
    write(
        &t.join(format!("run/crun/{CID}/status")),
        &format!(
            "{{\n    \"pid\" : 555,\n    \"cgroup-path\" : \"/machine.slice/libpod-{CID}.scope/container\",\n    \"rootfs\" : \"/x\",\n    \"systemd-cgroup\" : \"true\",\n    \"bundle\" : \"{}\",\n    \"created\" : \"2026-11-22T13:34:23Z\",\n    \"detached\" : \"true\"\n}}\n",
            userdata.display()
        ),
    );
    write(
        &userdata.join("config.json"),
        &oci_config(
            &["KERNEL_MODULES=wireguard"],
            &[("io.container.manager", "libpod")],
            "",
        ),
    );
    write(
        &t.join("var/lib/containers/storage/overlay-containers/containers.json"),
        &format!(r#"[{{"id":"{CID}","names":["vpn"],"layer":"x"}},{{"id":"other","names":[]}}]"#),
    );
    fake_proc(t, 555, 3);
    let index = StateIndex::scan(&cfg);
    assert!(index.problems.is_empty(), "{:?}", index.problems);
    let m = index
        .by_cgroup_path(&format!("/machine.slice/libpod-{CID}.scope/container"))
        .unwrap();
    assert_eq!(m.runtime, "podman");
    assert_eq!(m.name.as_deref(), Some("vpn"));
    let list = index.running_containers(&cfg);
    assert_eq!(list[0].container.runtime, "podman");
    assert_eq!(list[0].container.name.as_deref(), Some("vpn"));
    assert_eq!(list[0].expected_modules(), ["wireguard"]);
}

#[test]
fn crio_and_isulad() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = cfg(t);
    // cri-o: runc state in /run/runc, bundle in the run root's userdata.
    let userdata = t.join(format!(
        "run/containers/storage/overlay-containers/{CID}/userdata"
    ));
    let cgroup = format!("/kubepods/besteffort/pod{UID}/crio-{CID}");
    write(
        &t.join(format!("run/runc/{CID}/state.json")),
        &runc_state(CID, 600, 1, &userdata, &cgroup, &[]),
    );
    write(
        &userdata.join("config.json"),
        &oci_config(
            &[],
            &[
                ("io.kubernetes.cri-o.ContainerType", "container"),
                ("io.kubernetes.container.name", "app"),
                ("io.kubernetes.pod.name", "app-0"),
                ("io.kubernetes.pod.namespace", "prod"),
                ("io.kubernetes.pod.uid", UID),
            ],
            &cgroup,
        ),
    );
    fake_proc(t, 600, 1);
    // iSulad (runc runtime): the engine dir holds both configs.
    let engine = t.join(format!("var/lib/isulad/engines/runc/{HEX}"));
    write(
        &engine.join("config.v2.json"),
        &format!(
            r#"{{"CommonConfig":{{"Name":"ipvs-test","id":"{HEX}","Config":{{"Env":["PATH=/bin"]}}}},
"State":{{"Running":true,"Pid":601,"PPid":1,"StartTime":9}}}}"#
        ),
    );
    write(
        &engine.join("config.json"),
        &oci_config(
            &["KERNEL_MODULES=ip_vs,ip_vs_wrr"],
            &[],
            &format!("/isulad/{HEX}"),
        ),
    );
    fake_proc(t, 601, 9);
    // A stopped iSulad container is not running.
    write(
        &t.join(format!("var/lib/isulad/engines/lcr/{CID}x/config.v2.json")),
        r#"{"CommonConfig":{"Name":"stopped"},"State":{"Running":false,"Pid":0}}"#,
    );

    let index = StateIndex::scan(&cfg);
    assert!(index.problems.is_empty(), "{:?}", index.problems);
    assert_eq!(index.len(), 2);
    let crio = index.by_cgroup_path(&cgroup).unwrap().to_container();
    assert_eq!(crio.runtime, "cri-o");
    assert_eq!(crio.name.as_deref(), Some("app"));
    assert_eq!(crio.pod_name.as_deref(), Some("app-0"));
    assert_eq!(crio.qos_class.as_deref(), Some("BestEffort"));
    let list = index.running_containers(&cfg);
    let crio = list.iter().find(|r| r.meta.id == CID).unwrap();
    let d = crio.declaration.as_ref().unwrap();
    assert!(!d.declared);
    let isulad = list.iter().find(|r| r.meta.id == HEX).unwrap();
    assert_eq!(isulad.container.runtime, "isulad");
    assert_eq!(isulad.container.name.as_deref(), Some("ipvs-test"));
    assert_eq!(isulad.expected_modules(), ["ip_vs", "ip_vs_wrr"]);
    assert_eq!(
        isulad.meta.cgroup_path.as_deref(),
        Some(format!("/isulad/{HEX}").as_str())
    );
}

#[test]
fn broken_files_are_reported_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = cfg(t);
    write(&t.join("run/runc/broken/state.json"), "{not json");
    write(
        &t.join("run/runc/ok/state.json"),
        &runc_state("ok", 700, 1, &t.join("none"), "/ok", &[]),
    );
    fake_proc(t, 700, 1);
    let index = StateIndex::scan(&cfg);
    assert_eq!(index.len(), 1);
    assert_eq!(index.problems.len(), 1);
    let msg = index.problems[0].to_string();
    assert!(msg.contains("broken/state.json"), "{msg}");
    for bad in ["", ".", "..", "a/b", "../etc"] {
        let l = lookup(&cfg, bad);
        assert!(l.meta.is_none());
        assert!(matches!(l.problems[..], [StateError::BadId(_)]), "{bad:?}");
    }
    // Nothing at all: no error either.
    let empty = StateConfig::under(&t.join("nowhere"));
    let index = StateIndex::scan(&empty);
    assert!(index.is_empty() && index.problems.is_empty());
}

#[test]
fn cgroup_path_helpers() {
    assert_eq!(
        expand_slice("system.slice").as_deref(),
        Some("/system.slice")
    );
    assert_eq!(
        expand_slice("kubepods-burstable-podx.slice").as_deref(),
        Some("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podx.slice")
    );
    assert_eq!(expand_slice("-.slice").as_deref(), Some("/"));
    assert_eq!(expand_slice("a--b.slice"), None);
    assert_eq!(expand_slice("nope"), None);
    assert_eq!(
        oci_cgroups_path("system.slice:docker:abc").as_deref(),
        Some("/system.slice/docker-abc.scope")
    );
    assert_eq!(
        oci_cgroups_path(":crio:abc").as_deref(),
        Some("/system.slice/crio-abc.scope")
    );
    assert_eq!(oci_cgroups_path("/isulad/x").as_deref(), Some("/isulad/x"));
    assert_eq!(oci_cgroups_path("relative/x"), None);
    assert_eq!(oci_cgroups_path(""), None);
    let mounts = ["/sys/fs/cgroup/unified".into(), "/sys/fs/cgroup".into()];
    assert_eq!(
        strip_mount("/sys/fs/cgroup/unified/docker/x", &mounts).as_deref(),
        Some("/docker/x")
    );
    assert_eq!(
        strip_mount("/sys/fs/cgroup/kmc", &mounts).as_deref(),
        Some("/kmc")
    );
    assert_eq!(strip_mount("/sys/fs/cgroupx/kmc", &mounts), None);
    assert_eq!(
        stat_start_time("1 (a) b) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 9"),
        Some(4242)
    );
    assert_eq!(stat_start_time("garbage"), None);
    assert_eq!(stat_state("1 (a) b) Z 1"), Some('Z'));
    assert_eq!(stat_state("garbage"), None);
}

#[test]
fn this_process_is_alive_with_its_start_time() {
    let proc_root = Path::new("/proc");
    let me = std::process::id();
    let stat = std::fs::read_to_string(format!("/proc/{me}/stat")).unwrap();
    let start = stat_start_time(&stat).unwrap();
    assert!(pid_alive(proc_root, me, Some(start)));
    assert!(pid_alive(proc_root, me, None));
    assert!(!pid_alive(proc_root, me, Some(start + 1)));
}

/// Runs a real runc container (busybox, cgroupsPath mimicking docker, KERNEL_MODULES set)
/// and finds it through the real state roots. Needs root, runc and busybox-static; skipped
/// (with a message) otherwise.
#[test]
fn real_runc_container() {
    let runc = std::process::Command::new("runc").arg("--version").output();
    if !nix::unistd::geteuid().is_root() || runc.is_err() || !Path::new("/bin/busybox").exists() {
        eprintln!(
            "skipped: needs root, runc and /bin/busybox (apt-get install runc busybox-static)"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path();
    let rootfs = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("sleep")).unwrap();
    let name = format!("kmodmon-unit-{}", std::process::id());
    let parent = format!("kmodmon-unit-{}", std::process::id());
    let cgroup = format!("/{parent}/docker/{CID}");
    write(
        &bundle.join("config.json"),
        &real_spec(&cgroup, &["KERNEL_MODULES=ip_vs,ip_vs_wrr", "PATH=/bin"]),
    );
    // runc's stdio is inherited by the container: never a pipe (output() would wait for the
    // container to exit), a file for runc's error message.
    let log = std::fs::File::create(tmp.path().join("runc.err")).unwrap();
    let status = std::process::Command::new("runc")
        .args(["run", "-d", "--bundle"])
        .arg(bundle)
        .arg(&name)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .status()
        .unwrap();
    let cleanup = || {
        let _ = std::process::Command::new("runc")
            .args(["delete", "-f", &name])
            .status();
        // runc leaves the parent cgroups it created; remove them where they are empty.
        let hierarchies = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten();
        for h in hierarchies
            .map(|e| e.path())
            .chain([std::path::PathBuf::from("/sys/fs/cgroup")])
        {
            let _ = std::fs::remove_dir(h.join(&parent).join("docker"));
            let _ = std::fs::remove_dir(h.join(&parent));
        }
    };
    let err = std::fs::read_to_string(tmp.path().join("runc.err")).unwrap_or_default();
    assert!(status.success(), "runc run: {err}");
    let result = std::panic::catch_unwind(|| {
        let cfg = StateConfig::detect();
        let m = lookup(&cfg, &name).meta.expect("runc state found");
        assert!(m.running);
        assert_eq!(m.cgroup_path.as_deref(), Some(cgroup.as_str()));
        let pid = m.pid.unwrap();
        let proc_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert_eq!(
            crate::host::container::unified_path_from_proc_cgroup(&proc_cgroup),
            Some(cgroup.as_str())
        );
        let d = m.declaration(&cfg.proc_root, None).unwrap();
        assert_eq!(d.expected.modules, vec!["ip_vs", "ip_vs_wrr"]);
        // Without the bundle: the container's own environ, once runc's init has exec'd
        // (right after `runc run -d` returns it sometimes has not).
        let mut tries = 0;
        let d = loop {
            match declaration::declaration(None, Some(pid), &cfg.proc_root) {
                Err(e) if e.is_retryable() && tries < 200 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other.unwrap(),
            }
        };
        assert_eq!(d.source, declaration::Source::Environ(pid));
        assert_eq!(
            d.expected.modules,
            vec!["ip_vs", "ip_vs_wrr"],
            "environ {:?}, comm {:?}",
            String::from_utf8_lossy(&declaration::read_environ(&cfg.proc_root, pid).unwrap()),
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
        );
        let index = StateIndex::scan(&cfg);
        let c = index
            .by_cgroup_path(&cgroup)
            .expect("indexed by cgroup")
            .to_container();
        assert_eq!((c.id.as_str(), c.runtime.as_str()), (CID, "docker"));
        assert_eq!(c.name.as_deref(), Some(name.as_str()));
    });
    cleanup();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn real_spec(cgroup: &str, env: &[&str]) -> String {
    let env: Vec<String> = env.iter().map(|e| format!("{e:?}")).collect();
    format!(
        r#"{{"ociVersion":"1.0.2-dev",
"process":{{"terminal":false,"user":{{"uid":0,"gid":0}},"args":["sleep","30"],"env":[{env}],"cwd":"/",
 "capabilities":{{"bounding":["CAP_KILL"],"effective":["CAP_KILL"],"permitted":["CAP_KILL"]}},"noNewPrivileges":true}},
"root":{{"path":"rootfs","readonly":true}},"hostname":"kmodmon-unit",
"mounts":[{{"destination":"/proc","type":"proc","source":"proc"}}],
"linux":{{"cgroupsPath":"{cgroup}","resources":{{"devices":[{{"allow":false,"access":"rwm"}}]}},
 "namespaces":[{{"type":"pid"}},{{"type":"ipc"}},{{"type":"uts"}},{{"type":"mount"}}]}}}}"#,
        env = env.join(",")
    )
}

/// An OCI config.json with these annotations (serde builds it, so any value is escaped as the
/// runtimes' Go encoders escape it), env and cgroupsPath: the shape containerd's CRI and cri-o
/// write (trimmed: mounts, capabilities, seccomp and resources left out).
fn cri_config(env: &[&str], annotations: &[(&str, String)], cgroups_path: &str) -> String {
    let ann: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["/usr/local/bin/lb"],
            "env": env,
            "cwd": "/",
            "oomScoreAdj": 1000
        },
        "root": {"path": "rootfs"},
        "hostname": "web-0",
        "annotations": ann,
        "linux": {
            "cgroupsPath": cgroups_path,
            "namespaces": [{"type": "pid"}, {"type": "ipc", "path": "/proc/4000/ns/ipc"}]
        }
    })
    .to_string()
}

const SANDBOX: &str = "9d5a1b2c3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b";

/// containerd's CRI with the runtime handler's `pod_annotations = ["*kmodmon.io/*",
/// "io.katacontainers.*"]`: the matching pod annotations are copied into every container's
/// OCI spec (and the sandbox's), beside containerd's own `io.kubernetes.cri.*` ones.
#[test]
fn containerd_records_passed_through_pod_annotations() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = cfg(t);
    let tasks = t.join("run/containerd/io.containerd.runtime.v2.task/k8s.io");
    let cgroup = |id: &str| format!("/kubepods/besteffort/pod{UID}/{id}");
    let pod = |extra: &[(&'static str, String)]| {
        let mut a = vec![
            ("io.kubernetes.cri.sandbox-id", SANDBOX.to_string()),
            ("io.kubernetes.cri.sandbox-name", "lb-0".to_string()),
            ("io.kubernetes.cri.sandbox-namespace", "edge".to_string()),
            ("io.kubernetes.cri.sandbox-uid", UID.to_string()),
            // Passed through: the pod's annotations that match pod_annotations.
            ("kmodmon.io/kernel-modules", "ip_vs, ip_vs_wrr".to_string()),
            (
                "kernel-modules.kmodmon.io/sidecar",
                "nf_conntrack".to_string(),
            ),
            (
                "io.katacontainers.config.agent.kernel_modules",
                "ip_vs; ip_vs_wrr weight=2".to_string(),
            ),
        ];
        a.extend(extra.iter().cloned());
        a
    };
    // The pause container: declares nothing of the pod's.
    write(
        &tasks.join(SANDBOX).join("config.json"),
        &cri_config(
            &["PATH=/bin"],
            &pod(&[
                ("io.kubernetes.cri.container-type", "sandbox".to_string()),
                (
                    "io.kubernetes.cri.sandbox-log-directory",
                    format!("/var/log/pods/edge_lb-0_{UID}"),
                ),
            ]),
            &cgroup(SANDBOX),
        ),
    );
    write(&tasks.join(SANDBOX).join("init.pid"), "4000");
    fake_proc(t, 4000, 1);
    // The main container: the pod-wide annotation, and an image that sets KERNEL_MODULES too.
    write(
        &tasks.join(CID).join("config.json"),
        &cri_config(
            &["PATH=/bin", "KERNEL_MODULES=ip_vs,ip_vs_sh"],
            &pod(&[
                ("io.kubernetes.cri.container-type", "container".to_string()),
                ("io.kubernetes.cri.container-name", "lb".to_string()),
                (
                    "io.kubernetes.cri.image-name",
                    "registry.example/lb:1.2".to_string(),
                ),
            ]),
            &cgroup(CID),
        ),
    );
    write(&tasks.join(CID).join("init.pid"), "4001");
    fake_proc(t, 4001, 2);
    // The sidecar: its own annotation wins over the pod-wide one.
    write(
        &tasks.join(HEX).join("config.json"),
        &cri_config(
            &["PATH=/bin"],
            &pod(&[
                ("io.kubernetes.cri.container-type", "container".to_string()),
                ("io.kubernetes.cri.container-name", "sidecar".to_string()),
            ]),
            &cgroup(HEX),
        ),
    );
    write(&tasks.join(HEX).join("init.pid"), "4002");
    fake_proc(t, 4002, 3);

    let (list, problems) = running_containers(&cfg);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(list.len(), 3);
    let by = |id: &str| list.iter().find(|r| r.meta.id == id).unwrap();

    let pause = by(SANDBOX).declaration.as_ref().unwrap();
    assert!(!pause.declared, "{pause:?}");

    let lb = by(CID);
    assert_eq!(lb.container.runtime, "containerd");
    assert_eq!(lb.container.name.as_deref(), Some("lb"));
    let d = lb.declaration.as_ref().unwrap();
    assert_eq!(d.expected.modules, ["ip_vs", "ip_vs_wrr"]);
    let config = tasks.join(CID).join("config.json");
    assert_eq!(
        d.source,
        Source::Annotation {
            key: "kmodmon.io/kernel-modules".into(),
            file: Some(config.clone())
        }
    );
    assert_eq!(d.what(), "annotation kmodmon.io/kernel-modules");
    // KERNEL_MODULES says something else and loses; Kata's agrees and is not mentioned.
    assert_eq!(d.overridden.len(), 1, "{:?}", d.overridden);
    assert_eq!(d.overridden[0].source, Source::Config(config.clone()));
    assert_eq!(d.overridden[0].modules, ["ip_vs", "ip_vs_sh"]);
    let lines = d.disagreements();
    assert!(
        lines[0].starts_with("KERNEL_MODULES (")
            && lines[0].ends_with("says ip_vs,ip_vs_sh; annotation kmodmon.io/kernel-modules wins"),
        "{lines:?}"
    );

    let side = by(HEX).declaration.as_ref().unwrap();
    assert_eq!(side.expected.modules, ["nf_conntrack"]);
    assert!(
        matches!(&side.source, Source::Annotation { key, .. } if key == "kernel-modules.kmodmon.io/sidecar")
    );
    assert_eq!(
        side.overridden.len(),
        2,
        "pod-wide and Kata: {:?}",
        side.overridden
    );
}

/// cri-o keeps the pod's annotations only in the sandbox's config.json (raw, and as one JSON
/// object in `io.kubernetes.cri-o.Annotations`); a container's config.json carries the
/// kubelet's container annotations and `io.kubernetes.cri-o.SandboxID`.
#[test]
fn crio_reads_pod_annotations_from_the_sandbox_config() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = cfg(t);
    let storage = t.join("run/containers/storage/overlay-containers");
    let cgroup = |id: &str| {
        format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{id}.scope",
            UID.replace('-', "_")
        )
    };
    let pod_annotations = serde_json::json!({
        "kubernetes.io/config.seen": "2026-12-01T10:00:00.000000000Z",
        "kubernetes.io/config.source": "api",
        "io.katacontainers.config.agent.kernel_modules": "wireguard; udp_tunnel",
    });
    let sandbox_name = format!("k8s_vpn-0_net_{UID}_0");
    let mut sandbox_ann = vec![
        (
            "io.kubernetes.cri-o.Annotations",
            pod_annotations.to_string(),
        ),
        ("io.kubernetes.cri-o.ContainerType", "sandbox".to_string()),
        ("io.kubernetes.cri-o.KubeName", "vpn-0".to_string()),
        ("io.kubernetes.cri-o.Namespace", "net".to_string()),
        ("io.kubernetes.cri-o.Name", sandbox_name.clone()),
        ("io.kubernetes.cri-o.SandboxID", SANDBOX.to_string()),
        ("io.kubernetes.cri-o.RuntimeHandler", String::new()),
        ("io.kubernetes.pod.name", "vpn-0".to_string()),
        ("io.kubernetes.pod.namespace", "net".to_string()),
        ("io.kubernetes.pod.uid", UID.to_string()),
        ("io.kubernetes.container.name", "POD".to_string()),
    ];
    // The raw pod annotations too, as cri-o adds them to the sandbox spec.
    sandbox_ann.push((
        "io.katacontainers.config.agent.kernel_modules",
        "wireguard; udp_tunnel".to_string(),
    ));
    write(
        &storage.join(SANDBOX).join("userdata/config.json"),
        &cri_config(
            &[],
            &sandbox_ann,
            &format!(
                "kubepods-besteffort-pod{}.slice:crio:{SANDBOX}",
                UID.replace('-', "_")
            ),
        ),
    );
    let container_annotations = serde_json::json!({
        "io.kubernetes.container.hash": "5f2e8a1b",
        "io.kubernetes.container.restartCount": "0",
        "io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
        "io.kubernetes.pod.terminationGracePeriod": "30",
    });
    let userdata = storage.join(CID).join("userdata");
    write(
        &userdata.join("config.json"),
        &cri_config(
            &["PATH=/usr/bin", "HOSTNAME=vpn-0"],
            &[
                ("io.container.manager", "cri-o".to_string()),
                (
                    "io.kubernetes.cri-o.Annotations",
                    container_annotations.to_string(),
                ),
                ("io.kubernetes.cri-o.ContainerID", CID.to_string()),
                ("io.kubernetes.cri-o.ContainerType", "container".to_string()),
                (
                    "io.kubernetes.cri-o.Labels",
                    r#"{"io.kubernetes.container.name":"wg","io.kubernetes.pod.name":"vpn-0"}"#
                        .to_string(),
                ),
                (
                    "io.kubernetes.cri-o.Metadata",
                    r#"{"name":"wg"}"#.to_string(),
                ),
                (
                    "io.kubernetes.cri-o.Name",
                    format!("k8s_wg_vpn-0_net_{UID}_0"),
                ),
                ("io.kubernetes.cri-o.SandboxID", SANDBOX.to_string()),
                ("io.kubernetes.cri-o.SandboxName", sandbox_name),
                ("io.kubernetes.container.hash", "5f2e8a1b".to_string()),
                ("io.kubernetes.container.name", "wg".to_string()),
                ("io.kubernetes.pod.name", "vpn-0".to_string()),
                ("io.kubernetes.pod.namespace", "net".to_string()),
                ("io.kubernetes.pod.uid", UID.to_string()),
            ],
            &format!(
                "kubepods-besteffort-pod{}.slice:crio:{CID}",
                UID.replace('-', "_")
            ),
        ),
    );
    // conmon runs it with runc, whose state names the bundle.
    write(
        &t.join(format!("run/runc/{CID}/state.json")),
        &runc_state(CID, 700, 5, &userdata, &cgroup(CID), &[]),
    );
    fake_proc(t, 700, 5);

    let l = lookup_cgroup(&cfg, &cgroup(CID));
    assert!(l.problems.is_empty(), "{:?}", l.problems);
    let m = l.meta.unwrap();
    assert_eq!(m.runtime, "cri-o");
    let sandbox_config = storage.join(SANDBOX).join("userdata/config.json");
    assert_eq!(m.pod_config_path.as_ref(), Some(&sandbox_config));
    assert_eq!(
        m.pod_annotations
            .get("kubernetes.io/config.source")
            .map(String::as_str),
        Some("api")
    );
    let d = m.declaration(&cfg.proc_root, None).unwrap();
    assert!(d.declared);
    assert_eq!(d.expected.modules, ["wireguard", "udp_tunnel"]);
    assert_eq!(
        d.source,
        Source::Annotation {
            key: "io.katacontainers.config.agent.kernel_modules".into(),
            file: Some(sandbox_config.clone())
        }
    );
    assert!(d.describe().starts_with(
        "io.katacontainers.config.agent.kernel_modules=wireguard,udp_tunnel (annotation in "
    ));

    // A sandbox whose annotation object is broken is reported, not fatal.
    let mut broken: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sandbox_config).unwrap()).unwrap();
    broken["annotations"]["io.kubernetes.cri-o.Annotations"] = "{not json".into();
    std::fs::write(&sandbox_config, broken.to_string()).unwrap();
    let l = lookup(&cfg, CID);
    assert_eq!(l.problems.len(), 1, "{:?}", l.problems);
    let m = l.meta.unwrap();
    assert!(m.pod_config_path.is_none());
    assert!(!m.declaration(&cfg.proc_root, None).unwrap().declared);
}
