//! Containers end to end on this machine: real `kmodmon tail --json`, real runc containers
//! (busybox), KERNEL_MODULES declared in the OCI config, module syscalls from inside.
//!
//! The host kernel may lack module support (every attempt fails with ENOSYS, /proc/modules
//! does not exist): attempts are still module events named after the file, so attribution
//! and verdicts are checked all the same, and "missing" is computed from what this host
//! really has loaded.
use std::{collections::BTreeSet, path::Path, time::Duration};

use kmodmon::modname;
use kmodmon_tests::{
    container::{Bundle, random_id},
    have, require_root,
    tail::Tail,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// One kmodmon and one container at a time (kmodmon's startup scan sees every container).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn ready(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    if !require_root(test) {
        return None;
    }
    let guard = serial();
    // Never a stale kmodmon.
    kmodmon_tests::kmodmon_bin();
    assert!(
        have("runc"),
        "runc is not installed: `cargo xtask setup` installs it"
    );
    Some(guard)
}

/// Modules loaded or built into the running kernel, as far as this host says.
fn present_modules() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(text) = std::fs::read_to_string("/proc/modules") {
        out.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(modname::normalize),
        );
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let builtin = Path::new("/lib/modules")
        .join(release.trim())
        .join("modules.builtin");
    if let Ok(text) = std::fs::read_to_string(builtin) {
        out.extend(text.lines().filter_map(modname::from_file));
    }
    out
}

fn missing_of(declared: &[&str]) -> Vec<String> {
    let present = present_modules();
    declared
        .iter()
        .map(|m| modname::normalize(m))
        .filter(|m| !present.contains(m))
        .collect()
}

const INSMODS: &str = "insmod /lib/modules/ip_vs.ko; insmod /lib/modules/kmodmon_other.ko";
/// Containers live at least 100 ms: the program keeps running that long after its attempts.
/// (Shorter lives are judged too when the runtime's state names the container by the ID in
/// its cgroup path, as docker's, containerd's and cri-o's do — see the insmod-only test;
/// with a cgroupsPath mimicking another runtime, only the process environment is left, and
/// on a loaded 2-core machine a program that exits within a few ms can be gone before it is
/// read: then the event says `KERNEL_MODULES unknown`.)
const RUN: &str = "insmod /lib/modules/ip_vs.ko; insmod /lib/modules/kmodmon_other.ko; sleep 0.1";

fn module_files() -> [(&'static str, &'static [u8]); 2] {
    [
        ("/lib/modules/ip_vs.ko", b"\x7fELF not a module"),
        ("/lib/modules/kmodmon_other.ko", b"\x7fELF not a module"),
    ]
}

fn attempts_done(events: &[Value]) -> bool {
    ["ip_vs", "kmodmon_other"].iter().all(|m| {
        events
            .iter()
            .any(|e| e["kind"] == "load_attempt" && e["module"] == *m)
    })
}

fn attempt<'a>(events: &'a [Value], module: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["kind"] == "load_attempt" && e["module"] == module)
        .unwrap_or_else(|| panic!("no load_attempt for {module}: {events:#?}"))
}

fn expectation(events: &[Value]) -> Option<&Value> {
    events.iter().find(|e| e["kind"] == "expectation")
}

/// A container under a cgroupsPath laid out like `runtime`'s declares ip_vs and ip_vs_wrr,
/// then tries to load ip_vs and something else.
fn verdicts_under(runtime: &str, cgroups_path: &str, id: &str) {
    let Some(_serial) = ready(&format!("verdicts_under[{runtime}]")) else {
        return;
    };
    let name = format!("kmodmon-e2e-{}", &id[..12]);
    let bundle = Bundle::new(
        &name,
        cgroups_path,
        &["KERNEL_MODULES=ip_vs,ip_vs_wrr"],
        &["/bin/sh", "-c", RUN],
        &module_files(),
    );
    let mut tail = Tail::start(&["--container", &id[..12]]);
    let out = bundle.run();
    assert!(out.status.success(), "runc run failed: {out:?}");
    let missing = missing_of(&["ip_vs", "ip_vs_wrr"]);
    let events = tail.collect_until(WAIT, |e| {
        attempts_done(e) && (missing.is_empty() || expectation(e).is_some())
    });
    drop(tail);
    let ip_vs = attempt(&events, "ip_vs");
    let other = attempt(&events, "kmodmon_other");
    for e in [ip_vs, other] {
        assert_eq!(e["container"]["id"], id, "{e}");
        assert_eq!(e["container"]["runtime"], runtime, "{e}");
        assert_eq!(
            e["container"]["name"],
            name.as_str(),
            "the runc ID from runtime state: {e}"
        );
    }
    assert_eq!(ip_vs["verdict"], "expected", "{ip_vs}");
    assert!(
        ip_vs.get("detail").is_none(),
        "declared: no detail: {ip_vs}"
    );
    assert_eq!(other["verdict"], "unexpected", "{other}");
    let why = other["detail"].as_str().unwrap_or_default();
    assert!(why.contains("ip_vs,ip_vs_wrr"), "{other}");
    if missing.is_empty() {
        assert!(expectation(&events).is_none(), "{events:#?}");
    } else {
        let x = expectation(&events).unwrap();
        assert_eq!(x["modules"], serde_json::json!(missing), "{x}");
        assert_eq!(x["container"]["id"], id, "{x}");
        assert_eq!(x["source"], "kmodmon");
        // The container's appearance comes before its events.
        let pos = |v: &Value| events.iter().position(|e| e == v).unwrap();
        assert!(pos(x) < pos(ip_vs), "{events:#?}");
    }
}

#[test]
fn verdicts_docker_layout() {
    let id = random_id();
    verdicts_under("docker", &format!("/docker/{id}"), &id);
}

#[test]
fn verdicts_kubernetes_layout() {
    let id = random_id();
    let pod = "7d0c5b3a-1e2f-4a6b-8c9d-0e1f2a3b4c5d";
    verdicts_under("cri", &format!("/kubepods/besteffort/pod{pod}/{id}"), &id);
}

#[test]
fn verdicts_isulad_layout() {
    let id = random_id();
    verdicts_under("isulad", &format!("/isulad/{id}"), &id);
}

/// `runc run NAME` without cgroupsPath: cgroup `/NAME`, which only runtime state identifies.
#[test]
fn plain_runc_is_attributed_through_runtime_state() {
    let Some(_serial) = ready("plain_runc_is_attributed_through_runtime_state") else {
        return;
    };
    let name = format!("kmodmon-e2e-plain-{}", &random_id()[..8]);
    let bundle = Bundle::new(
        &name,
        "/unused",
        &["KERNEL_MODULES=ip_vs"],
        &["/bin/sh", "-c", RUN],
        &module_files(),
    );
    let cfg_path = bundle.path().join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["linux"]
        .as_object_mut()
        .expect("linux section")
        .remove("cgroupsPath");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let mut tail = Tail::start(&["--container", &name]);
    let out = bundle.run();
    assert!(out.status.success(), "runc run failed: {out:?}");
    let events = tail.collect_until(WAIT, attempts_done);
    drop(tail);
    let ip_vs = attempt(&events, "ip_vs");
    let other = attempt(&events, "kmodmon_other");
    for e in [ip_vs, other] {
        assert_eq!(e["container"]["id"], name.as_str(), "{e}");
        assert_eq!(e["container"]["runtime"], "runc", "{e}");
        assert!(
            e["cgroup_path"].as_str().unwrap().ends_with(&name),
            "cgroup /NAME: {e}"
        );
    }
    assert_eq!(ip_vs["verdict"], "expected", "{ip_vs}");
    assert_eq!(other["verdict"], "unexpected", "{other}");
}

/// A declared module that is not loaded is named in an `expectation` event, and entries
/// that cannot be module names are reported.
#[test]
fn missing_and_bad_declarations_are_reported() {
    let Some(_serial) = ready("missing_and_bad_declarations_are_reported") else {
        return;
    };
    let id = random_id();
    let bundle = Bundle::new(
        &format!("kmodmon-e2e-{}", &id[..12]),
        &format!("/docker/{id}"),
        &["KERNEL_MODULES=kmodmon_e2e_absent, ip-vs ,../evil,bad name"],
        &["/bin/sh", "-c", "sleep 0.3"],
        &[],
    );
    let mut tail = Tail::start(&["--container", &id[..12], "--kind", "expectation"]);
    let out = bundle.run();
    assert!(out.status.success(), "runc run failed: {out:?}");
    let events = tail.collect_until(WAIT, |e| !e.is_empty());
    // Exactly one per container appearance.
    let more = tail.collect_until(Duration::from_millis(500), |_| false);
    drop(tail);
    assert_eq!(events.len() + more.len(), 1, "{events:#?} {more:#?}");
    let x = &events[0];
    let missing = missing_of(&["kmodmon_e2e_absent", "ip_vs"]);
    assert!(missing.contains(&"kmodmon_e2e_absent".to_string()));
    assert_eq!(x["modules"], serde_json::json!(missing), "{x}");
    assert_eq!(x["container"]["id"], id.as_str());
    let d = x["detail"].as_str().unwrap();
    assert!(d.contains("not loaded: kmodmon_e2e_absent"), "{d}");
    assert!(d.contains("\"../evil\""), "{d}");
    assert!(d.contains("\"bad name\""), "{d}");
    assert!(d.contains("config.json"), "read from the OCI config: {d}");
}

/// A container that lives about 100 ms and tries its loads just before it exits: its
/// declaration was captured while it ran; its events are judged after it is gone.
#[test]
fn a_100ms_container_is_attributed_and_judged() {
    let Some(_serial) = ready("a_100ms_container_is_attributed_and_judged") else {
        return;
    };
    let id = random_id();
    let bundle = Bundle::new(
        &format!("kmodmon-e2e-{}", &id[..12]),
        &format!("/docker/{id}"),
        &["KERNEL_MODULES=ip_vs"],
        &["/bin/sh", "-c", &format!("sleep 0.1; {INSMODS}; exit 0")],
        &module_files(),
    );
    let mut tail = Tail::start(&["--container", &id[..12], "--kind", "load_attempt"]);
    let started = std::time::Instant::now();
    let out = bundle.run();
    let lived = started.elapsed();
    assert!(out.status.success(), "runc run failed: {out:?}");
    let events = tail.collect_until(WAIT, attempts_done);
    drop(tail);
    assert!(
        lived < Duration::from_secs(2),
        "the container lived {lived:?}"
    );
    assert_eq!(
        attempt(&events, "ip_vs")["verdict"],
        "expected",
        "{events:#?}"
    );
    assert_eq!(attempt(&events, "kmodmon_other")["verdict"], "unexpected");
    assert_eq!(attempt(&events, "ip_vs")["container"]["id"], id.as_str());
}

/// The container's program is insmod itself: it exits within milliseconds of starting. The
/// runtime ID is the ID in the cgroup path, as with docker, containerd and cri-o (so the
/// runtime state is found by a direct lookup, without a rescan).
#[test]
fn a_container_that_only_runs_insmod_is_judged() {
    let Some(_serial) = ready("a_container_that_only_runs_insmod_is_judged") else {
        return;
    };
    let id = random_id();
    let bundle = Bundle::new(
        &id,
        &format!("/docker/{id}"),
        &["KERNEL_MODULES=ip_vs"],
        &["/bin/insmod", "/lib/modules/ip_vs.ko"],
        &module_files(),
    );
    let mut tail = Tail::start(&["--container", &id[..12], "--kind", "load_attempt"]);
    let _ = bundle.run(); // insmod fails (ENOSYS or a bad module): the container exits 1.
    let events = tail.collect_until(WAIT, |e| !e.is_empty());
    drop(tail);
    let e = attempt(&events, "ip_vs");
    assert_eq!(e["container"]["id"], id.as_str(), "{e}");
    assert_eq!(e["verdict"], "expected", "{e}");
}

/// `--load-expected`: kmodmon runs modprobe for a new container's missing modules, reports
/// that as a `self_load` event, then reports what is still missing.
#[test]
fn load_expected_runs_modprobe_and_reports_it() {
    let Some(_serial) = ready("load_expected_runs_modprobe_and_reports_it") else {
        return;
    };
    let id = random_id();
    let bundle = Bundle::new(
        &format!("kmodmon-e2e-{}", &id[..12]),
        &format!("/docker/{id}"),
        &["KERNEL_MODULES=kmodmon_e2e_absent"],
        // Long enough that a loaded machine cannot miss it: short lives are the subject of
        // `a_100ms_container_is_attributed_and_judged`, not of this test.
        &["/bin/sh", "-c", "sleep 2"],
        &[],
    );
    let mut tail = Tail::start(&[
        "--load-expected",
        "--container",
        &id[..12],
        "--kind",
        "self_load",
        "--kind",
        "expectation",
    ]);
    let out = bundle.run();
    assert!(out.status.success(), "runc run failed: {out:?}");
    let events = tail.collect_until(WAIT, |e| e.len() >= 2);
    drop(tail);
    assert_eq!(events.len(), 2, "{events:#?}");
    let (load, x) = (&events[0], &events[1]);
    assert_eq!(load["kind"], "self_load", "{events:#?}");
    assert_eq!(load["source"], "kmodmon");
    assert_eq!(load["container"]["id"], id.as_str());
    assert!(
        load.get("modules").is_none(),
        "no such module loads: {load}"
    );
    let d = load["detail"].as_str().unwrap();
    assert!(d.contains("failed: kmodmon_e2e_absent: "), "{d}");
    assert_eq!(x["kind"], "expectation");
    assert_eq!(
        x["modules"],
        serde_json::json!(["kmodmon_e2e_absent"]),
        "{x}"
    );
}
