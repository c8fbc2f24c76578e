//! Declarations from pod annotations, end to end on this machine: real `kmodmon tail --json`
//! and `kmodmon policy show` against containers whose runtime state carries the annotations
//! the way a CRI runtime records them.
//!
//! - containerd: a real containerd (started here with its metadata in a temporary directory,
//!   its state in /run/containerd where kmodmon reads task bundles) runs a container through
//!   `ctr run` with the annotations containerd's CRI plugin writes into a container's OCI spec
//!   (`io.kubernetes.cri.*`, and the pod annotations a runtime handler's `pod_annotations`
//!   passes through). No kubelet or CRI client runs here (no crictl in Debian), so the CRI
//!   plugin itself does not create the spec: `ctr` writes the same annotations.
//! - cri-o: there is no cri-o here. A real runc container runs from a bundle whose config
//!   carries cri-o's container annotations, and its pod sandbox's config.json is written where
//!   cri-o keeps it (/run/containers/storage/overlay-containers/<sandbox>/userdata), with the
//!   pod annotations in `io.kubernetes.cri-o.Annotations`.
use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use kmodmon_tests::{
    container::{Bundle, random_id},
    have, require_root,
    tail::Tail,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const POD_UID: &str = "6b1e1c52-7d1a-4a53-9c3e-2f0a9b8c7d6e";

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ready(test: &str, tools: &[&str]) -> Option<std::sync::MutexGuard<'static, ()>> {
    if !require_root(test) {
        return None;
    }
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    kmodmon_tests::kmodmon_bin();
    for tool in tools {
        assert!(
            have(tool),
            "{tool} is not installed: `cargo xtask setup` installs it"
        );
    }
    Some(guard)
}

const RUN: &str = "insmod /lib/modules/ip_vs.ko; insmod /lib/modules/kmodmon_other.ko; sleep 0.3";

fn module_files() -> [(&'static str, &'static [u8]); 2] {
    [
        ("/lib/modules/ip_vs.ko", b"\x7fELF not a module"),
        ("/lib/modules/kmodmon_other.ko", b"\x7fELF not a module"),
    ]
}

fn attempt<'a>(events: &'a [Value], module: &str) -> Option<&'a Value> {
    events
        .iter()
        .find(|e| e["kind"] == "load_attempt" && e["module"] == module)
}

fn done(events: &[Value]) -> bool {
    attempt(events, "ip_vs").is_some()
        && attempt(events, "kmodmon_other").is_some()
        && events.iter().any(|e| e["kind"] == "expectation")
}

/// What both runtimes must show: ip_vs is expected by the annotation, the other module is
/// not, and the expectation names the annotation and the KERNEL_MODULES it overrode.
fn assert_judged_by_annotation(events: &[Value], id: &str, runtime: &str, key: &str, file: &Path) {
    let ip_vs = attempt(events, "ip_vs").unwrap_or_else(|| panic!("no ip_vs: {events:#?}"));
    let other =
        attempt(events, "kmodmon_other").unwrap_or_else(|| panic!("no kmodmon_other: {events:#?}"));
    for e in [ip_vs, other] {
        assert_eq!(e["container"]["id"], id, "{e}");
        assert_eq!(e["container"]["runtime"], runtime, "{e}");
        assert_eq!(e["container"]["name"], "lb", "{e}");
        assert_eq!(e["container"]["pod_name"], "lb-0", "{e}");
    }
    assert_eq!(ip_vs["verdict"], "expected", "{ip_vs}");
    assert_eq!(other["verdict"], "unexpected", "{other}");
    let detail = other["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!("not in annotation {key}=ip_vs,ip_vs_wrr")),
        "{other}"
    );
    let exp = events
        .iter()
        .find(|e| e["kind"] == "expectation")
        .expect("expectation");
    let detail = exp["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!(
            "{key}=ip_vs,ip_vs_wrr (annotation in {})",
            file.display()
        )),
        "{exp}"
    );
    assert!(
        detail.contains("KERNEL_MODULES (")
            && detail.contains(&format!("says dummy; annotation {key} wins")),
        "{exp}"
    );
}

/// A containerd of our own: metadata in a temp dir, state in /run/containerd (where kmodmon
/// reads task bundles), its socket in the temp dir. Killed on drop.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--root")
            .arg(dir.path().join("root"))
            .args(["--state", "/run/containerd", "--address"])
            .arg(dir.path().join("containerd.sock"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let c = Containerd { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Command::new("ctr")
            .arg("--address")
            .arg(c.socket())
            .arg("version")
            .output()
            .map_or(true, |o| !o.status.success())
        {
            assert!(
                Instant::now() < deadline,
                "containerd did not answer:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn log(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(self.dir.path().join("containerd.log"))
            .and_then(|mut f| f.read_to_string(&mut s));
        s
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io"]);
        cmd
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn containerd_task_bundle_annotations_declare_the_modules() {
    let Some(_serial) = ready(
        "containerd_task_bundle_annotations_declare_the_modules",
        &["containerd", "ctr", "runc"],
    ) else {
        return;
    };
    let containerd = Containerd::start();
    let id = random_id();
    let sandbox = random_id();
    // The rootfs (busybox and two fake module files); ctr runs it with --rootfs.
    let bundle = Bundle::new("unused", "/unused", &[], &["/bin/true"], &module_files());
    let rootfs = bundle.path().join("rootfs");
    let cgroup = format!("/kubepods/besteffort/pod{POD_UID}/{id}");
    let annotations = [
        ("io.kubernetes.cri.container-type", "container"),
        ("io.kubernetes.cri.container-name", "lb"),
        ("io.kubernetes.cri.sandbox-id", sandbox.as_str()),
        ("io.kubernetes.cri.sandbox-name", "lb-0"),
        ("io.kubernetes.cri.sandbox-namespace", "edge"),
        ("io.kubernetes.cri.sandbox-uid", POD_UID),
        ("io.kubernetes.cri.image-name", "registry.example/lb:1.2"),
        // pod_annotations = ["*kmodmon.io/*"] passes these through.
        ("kmodmon.io/kernel-modules", "ip_vs,ip_vs_wrr"),
        ("kernel-modules.kmodmon.io/other-container", "nf_nat"),
    ];
    let mut tail = Tail::start(&["--container", &id[..12]]);
    let mut run = containerd.ctr();
    run.args([
        "run",
        "--rootfs",
        "--cgroup",
        &cgroup,
        "--env",
        "KERNEL_MODULES=dummy",
    ]);
    for (k, v) in annotations {
        run.arg("--annotation").arg(format!("{k}={v}"));
    }
    run.arg(&rootfs).arg(&id).args(["/bin/sh", "-c", RUN]);
    let out = run.output().expect("ctr run");
    assert!(
        out.status.success(),
        "ctr run: {out:?}\n{}",
        containerd.log()
    );
    let events = tail.collect_until(WAIT, done);
    drop(tail);
    let _ = containerd.ctr().args(["containers", "rm", &id]).output();
    let config = PathBuf::from(format!(
        "/run/containerd/io.containerd.runtime.v2.task/k8s.io/{id}/config.json"
    ));
    assert_judged_by_annotation(
        &events,
        &id,
        "containerd",
        "kmodmon.io/kernel-modules",
        &config,
    );
}

/// `policy show` (which reads the same registry as `check` and the enforcer) while a
/// containerd container with an annotation runs: `trust_kernel_modules` allows what the
/// annotation declares, not the image's KERNEL_MODULES.
#[test]
fn policy_show_trusts_the_annotation() {
    let Some(_serial) = ready(
        "policy_show_trusts_the_annotation",
        &["containerd", "ctr", "runc"],
    ) else {
        return;
    };
    let containerd = Containerd::start();
    let id = random_id();
    let bundle = Bundle::new("unused", "/unused", &[], &["/bin/true"], &[]);
    let rootfs = bundle.path().join("rootfs");
    let cgroup = format!("/kubepods/besteffort/pod{POD_UID}/{id}");
    let mut run = containerd.ctr();
    run.args([
        "run",
        "--rootfs",
        "--cgroup",
        &cgroup,
        "--env",
        "KERNEL_MODULES=dummy",
    ])
    .args([
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.container-name=lb",
        "--annotation",
        "kernel-modules.kmodmon.io/lb=ip_vs,ip_vs_wrr",
    ])
    .arg(&rootfs)
    .arg(&id)
    .args(["/bin/sleep", "20"])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = run.spawn().expect("ctr run");
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        policy.path(),
        "mode = \"audit\"\n[[rule]]\nname = \"lb\"\ncontainer_name = \"lb\"\nallow = []\ntrust_kernel_modules = true\n",
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    let line = loop {
        let out = Command::new(kmodmon_tests::kmodmon_bin())
            .args(["policy", "show"])
            .arg(policy.path())
            .output()
            .expect("policy show");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if let Some(l) = text.lines().find(|l| l.contains(&id[..12])) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "container not shown:\n{text}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let _ = containerd
        .ctr()
        .args(["tasks", "kill", "-s", "SIGKILL", &id])
        .output();
    let _ = child.wait();
    let _ = containerd.ctr().args(["containers", "rm", &id]).output();
    assert!(
        line.contains("only ip_vs, ip_vs_wrr may load (ip_vs, ip_vs_wrr from its declaration)")
            && line.contains("[declared in annotation kernel-modules.kmodmon.io/lb]"),
        "{line}"
    );
}

/// Removes a directory tree when dropped (the sandbox config written where cri-o keeps it).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn crio_sandbox_annotations_declare_the_modules() {
    let Some(_serial) = ready("crio_sandbox_annotations_declare_the_modules", &["runc"]) else {
        return;
    };
    let id = random_id();
    let sandbox = random_id();
    // The pod sandbox's config, where cri-o keeps it, with the pod annotations as cri-o
    // records them (one JSON object in io.kubernetes.cri-o.Annotations).
    let sandbox_dir = PathBuf::from("/run/containers/storage/overlay-containers").join(&sandbox);
    let _cleanup = RemoveOnDrop(sandbox_dir.clone());
    let sandbox_config = sandbox_dir.join("userdata/config.json");
    std::fs::create_dir_all(sandbox_config.parent().unwrap()).unwrap();
    let pod_annotations = serde_json::json!({
        "kmodmon.io/kernel-modules": "ip_vs,ip_vs_wrr",
        "kubernetes.io/config.source": "api",
    });
    let spec = serde_json::json!({
        "ociVersion": "1.0.2-dev",
        "annotations": {
            "io.kubernetes.cri-o.Annotations": pod_annotations.to_string(),
            "io.kubernetes.cri-o.ContainerType": "sandbox",
            "io.kubernetes.cri-o.SandboxID": sandbox,
            "io.kubernetes.cri-o.KubeName": "lb-0",
            "io.kubernetes.pod.name": "lb-0",
            "io.kubernetes.pod.namespace": "edge",
            "io.kubernetes.pod.uid": POD_UID,
            "kmodmon.io/kernel-modules": "ip_vs,ip_vs_wrr",
        }
    });
    std::fs::write(&sandbox_config, spec.to_string()).unwrap();
    // The container: cri-o's annotations in its config; runc runs it under cri-o's cgroup.
    let cgroup = format!("/kubepods/besteffort/pod{POD_UID}/crio-{id}");
    let bundle = Bundle::new(
        &id,
        &cgroup,
        &["KERNEL_MODULES=dummy"],
        &["/bin/sh", "-c", RUN],
        &module_files(),
    );
    bundle.annotate(&[
        ("io.container.manager", "cri-o"),
        ("io.kubernetes.cri-o.ContainerType", "container"),
        ("io.kubernetes.cri-o.ContainerID", &id),
        ("io.kubernetes.cri-o.SandboxID", &sandbox),
        (
            "io.kubernetes.cri-o.Annotations",
            r#"{"io.kubernetes.container.restartCount":"0"}"#,
        ),
        ("io.kubernetes.container.name", "lb"),
        ("io.kubernetes.pod.name", "lb-0"),
        ("io.kubernetes.pod.namespace", "edge"),
        ("io.kubernetes.pod.uid", POD_UID),
    ]);
    let mut tail = Tail::start(&["--container", &id[..12]]);
    let out = bundle.run();
    assert!(out.status.success(), "runc run: {out:?}");
    let events = tail.collect_until(WAIT, done);
    drop(tail);
    assert_judged_by_annotation(
        &events,
        &id,
        "cri-o",
        "kmodmon.io/kernel-modules",
        &sandbox_config,
    );
}
