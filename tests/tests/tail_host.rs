//! End-to-end on this machine: real kmodmon, real module syscalls, real runc containers.
//! The host kernel may lack module support (then every attempt fails with ENOSYS); the tests
//! compare kmodmon's report with the errno the syscall really returned, so they hold on any
//! kernel.
use std::{ffi::CString, os::fd::AsRawFd as _, time::Duration};

use kmodmon_tests::{
    container::{Bundle, random_id},
    have, own_cgroup_id, require_root,
    tail::{Tail, assert_accounting, split_repeats},
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// The tests share this process (and its pid, which they filter on) and the kernel-wide
/// counters: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Calls a module syscall; returns the negative errno (or 0), as the kernel reports it.
fn errno_of(ret: libc::c_long) -> i64 {
    if ret < 0 {
        -(std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as i64)
    } else {
        ret
    }
}

fn finit_module(fd: i32, params: &[u8], flags: i32) -> i64 {
    let p = CString::new(params).unwrap();
    errno_of(unsafe { libc::syscall(libc::SYS_finit_module, fd, p.as_ptr(), flags) })
}

fn init_module(image: &[u8], params: &[u8]) -> i64 {
    let p = CString::new(params).unwrap();
    errno_of(unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            image.len(),
            p.as_ptr(),
        )
    })
}

fn delete_module(name: &[u8], flags: i32) -> i64 {
    let n = CString::new(name).unwrap();
    errno_of(unsafe { libc::syscall(libc::SYS_delete_module, n.as_ptr(), flags) })
}

fn gettid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

fn errno_name(result: i64) -> Value {
    if result < 0 {
        Value::from(format!("{:?}", nix::errno::Errno::from_raw(-result as i32)))
    } else {
        Value::Null
    }
}

fn ours(events: &[Value]) -> Vec<Value> {
    let me = std::process::id() as u64;
    events
        .iter()
        .filter(|e| e["pid"].as_u64() == Some(me))
        .cloned()
        .collect()
}

#[test]
fn attempts_from_this_process_are_reported_exactly() {
    if !require_root("attempts_from_this_process_are_reported_exactly") {
        return;
    }
    let _serial = serial();
    let mut tail = Tail::start(&["--pid", &std::process::id().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let ko = dir.path().join("kmodmon_e2e-probe.ko");
    std::fs::write(&ko, b"not really an ELF").unwrap();
    let file = std::fs::File::open(&ko).unwrap();
    let r_finit = finit_module(file.as_raw_fd(), b"answer=42 name=x", 0);
    let r_init = init_module(&[0u8; 64], b"p=1");
    let r_delete = delete_module(b"kmodmon_e2e_gone", libc::O_NONBLOCK);
    let tid = gettid();
    let events = tail.collect_until(WAIT, |e| ours(e).len() >= 3);
    let (rest, summary) = tail.stop();
    let all: Vec<Value> = events.into_iter().chain(rest).collect();
    let mine = ours(&all);
    assert_eq!(
        mine.len(),
        3,
        "expected exactly 3 events from this process, got {mine:#?}"
    );

    let finit = &mine[0];
    assert_eq!(finit["kind"], "load_attempt");
    assert_eq!(finit["syscall"], "finit_module");
    assert_eq!(
        finit["module"], "kmodmon_e2e_probe",
        "module from file name, dash → underscore"
    );
    let canonical = std::fs::canonicalize(&ko).unwrap();
    assert_eq!(finit["path"], canonical.to_str().unwrap());
    assert_eq!(finit["params"], "answer=42 name=x");
    assert_eq!(finit["fd"], file.as_raw_fd());
    assert_eq!(finit["flags"], 0);
    assert_eq!(finit["result"], r_finit);
    assert_eq!(finit["errno"], errno_name(r_finit));

    let init = &mine[1];
    assert_eq!(init["kind"], "load_attempt");
    assert_eq!(init["syscall"], "init_module");
    assert_eq!(init["len"], 64);
    assert_eq!(init["params"], "p=1");
    assert_eq!(init["result"], r_init);

    let delete = &mine[2];
    assert_eq!(delete["kind"], "unload_attempt");
    assert_eq!(delete["syscall"], "delete_module");
    assert_eq!(delete["module"], "kmodmon_e2e_gone");
    assert_eq!(delete["flags"], libc::O_NONBLOCK);
    assert_eq!(delete["result"], r_delete);
    assert_eq!(delete["errno"], errno_name(r_delete));

    for e in &mine {
        assert_eq!(e["tid"], tid);
        assert_eq!(e["uid"], 0);
        assert_eq!(e["ppid"], std::os::unix::process::parent_id());
        if let Some(id) = own_cgroup_id() {
            assert_eq!(e["cgroup_id"], id, "cgroup id of this process");
        }
        assert!(e["cgroup_path"].is_string(), "cgroup path resolved: {e}");
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        assert!(e["container"].is_null());
    }
    assert_accounting(&summary);
    assert_eq!(summary["dropped"], 0);
}

#[test]
fn untrusted_strings_are_escaped_and_overlong_ones_marked() {
    if !require_root("untrusted_strings_are_escaped_and_overlong_ones_marked") {
        return;
    }
    let _serial = serial();
    let mut tail = Tail::start(&["--pid", &std::process::id().to_string()]);
    init_module(&[0u8; 8], b"\x1b[31mred\x1b[0m \xff\xfe tab\there");
    let long = vec![b'a'; 1000];
    init_module(&[0u8; 8], &long);
    delete_module(&vec![b'm'; 400], 0);
    let events = tail.collect_until(WAIT, |e| ours(e).len() >= 3);
    drop(tail);
    let mine = ours(&events);
    assert_eq!(mine.len(), 3, "{mine:#?}");
    assert_eq!(
        mine[0]["params"],
        "\\x1b[31mred\\x1b[0m \\xff\\xfe tab\\x09here"
    );
    let p = mine[1]["params"].as_str().unwrap();
    assert!(
        p.len() > 200 && p.len() < 1000 && p.bytes().all(|b| b == b'a'),
        "{p}"
    );
    assert_eq!(mine[1]["truncated"], serde_json::json!(["params"]));
    assert!(mine[0].get("truncated").is_none());
    assert_eq!(mine[2]["truncated"], serde_json::json!(["module"]));
}

#[test]
fn filters_and_count() {
    if !require_root("filters_and_count") {
        return;
    }
    let _serial = serial();
    let pid = std::process::id().to_string();
    let tail = Tail::start(&[
        "--pid",
        &pid,
        "--kind",
        "unload_attempt",
        "--module",
        "kmodmon-filter-b",
        "--count",
        "2",
    ]);
    delete_module(b"kmodmon_filter_a", 0);
    init_module(&[0u8; 8], b"");
    delete_module(b"kmodmon_filter_b", 0);
    delete_module(b"kmodmon-filter-b", 0);
    delete_module(b"kmodmon_filter_b", 0);
    // --count 2 makes kmodmon exit by itself.
    let (events, summary) = tail.finish();
    assert_eq!(events.len(), 2, "{events:#?}");
    for e in &events {
        assert_eq!(e["kind"], "unload_attempt");
        assert!(e["module"] == "kmodmon_filter_b" || e["module"] == "kmodmon-filter-b");
    }
    assert_eq!(summary["printed"], 2);
    assert_accounting(&summary);
}

#[test]
fn a_storm_is_fully_accounted_for() {
    if !require_root("a_storm_is_fully_accounted_for") {
        return;
    }
    let _serial = serial();
    let mut tail = Tail::start(&["--pid", &std::process::id().to_string()]);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(|| {
                for _ in 0..500 {
                    delete_module(b"kmodmon_storm", 0);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Identical attempts of a thread are aggregated; the repeats come in summaries once the
    // threads have exited (the sweep runs every 200 ms).
    let mut events = tail.collect_until(WAIT, |e| {
        let (single, repeats) = split_repeats(e);
        single + repeats >= 2000
    });
    let (rest, summary) = tail.stop();
    events.extend(rest);
    assert_accounting(&summary);
    let seen = summary["counters"]["seen_unload_attempt"].as_u64().unwrap();
    assert!(
        seen >= 2000,
        "kernel saw {seen} of 2000 attempts: {summary}"
    );
    let k = |key: &str| summary[key].as_u64().unwrap();
    let (single, repeats) = split_repeats(&events);
    assert!(
        k("aggregated") > 0,
        "identical attempts were aggregated: {summary}"
    );
    assert_eq!(
        repeats,
        k("repeats"),
        "printed repeats = reported: {summary}"
    );
    assert_eq!(
        single + repeats + k("dropped") + k("in_flight") + k("unread") + k("repeats_unreported"),
        k("seen"),
        "printed + repeats + dropped + in flight + unread = seen: {summary}"
    );
    for e in events.iter().filter(|e| e.get("repeat").is_some()) {
        assert_eq!(e["module"], "kmodmon_storm", "{e}");
        assert!(e["first_time"].as_str() <= e["last_time"].as_str(), "{e}");
        assert_eq!(e["time"], e["last_time"], "{e}");
    }
}

#[test]
fn distinct_attempts_and_a_zero_window_are_not_aggregated() {
    if !require_root("distinct_attempts_and_a_zero_window_are_not_aggregated") {
        return;
    }
    let _serial = serial();
    for (window, names) in [(None, true), (Some("0"), false)] {
        let pid = std::process::id().to_string();
        let mut args = vec!["--pid", pid.as_str()];
        if let Some(w) = window {
            args.extend(["--repeat-window", w]);
        }
        let mut tail = Tail::start(&args);
        for i in 0..50 {
            let name = if names {
                format!("kmodmon_norepeat_{i}")
            } else {
                "kmodmon_norepeat".to_string()
            };
            delete_module(name.as_bytes(), 0);
        }
        let events = tail.collect_until(WAIT, |e| e.len() >= 50);
        let (rest, summary) = tail.stop();
        let n = events.len() + rest.len();
        assert_accounting(&summary);
        assert_eq!(summary["aggregated"], 0, "window {window:?}: {summary}");
        assert_eq!(
            n, 50,
            "every attempt printed on its own (window {window:?}): {summary}"
        );
    }
}

/// Container scenarios: a busybox container under a cgroup path laid out like each runtime.
fn container_attempts(runtime: &str, cgroups_path: &str, id: &str, pod_uid: Option<&str>) {
    if !require_root(&format!("container_attempts[{runtime}]")) {
        return;
    }
    let _serial = serial();
    assert!(
        have("runc"),
        "runc is not installed: `cargo xtask setup` installs it"
    );
    let name = format!("kmodmon-e2e-{}", &id[..12]);
    let bundle = Bundle::new(
        &name,
        cgroups_path,
        &["KERNEL_MODULES=ip_vs,ip_vs_wrr"],
        &[
            "/bin/sh",
            "-c",
            "insmod /lib/modules/e2e_dummy.ko x=1; rmmod e2e_dummy; exit 0",
        ],
        &[("/lib/modules/e2e_dummy.ko", b"\x7fELF not a module")],
    );
    let mut tail = Tail::start(&["--container", &id[..12]]);
    let out = bundle.run();
    assert!(out.status.success(), "runc run failed: {out:?}");
    let events = tail.collect_until(WAIT, |e| {
        e.iter().any(|x| x["kind"] == "unload_attempt")
            && e.iter().any(|x| x["kind"] == "load_attempt")
    });
    drop(tail);
    let load = events
        .iter()
        .find(|e| e["kind"] == "load_attempt")
        .unwrap_or_else(|| panic!("no load attempt: {events:#?}"));
    let unload = events
        .iter()
        .find(|e| e["kind"] == "unload_attempt")
        .unwrap_or_else(|| panic!("no unload attempt: {events:#?}"));
    assert_eq!(unload["module"], "e2e_dummy");
    assert_eq!(unload["comm"], "rmmod");
    for e in [load, unload] {
        assert_eq!(e["container"]["id"], id, "{e}");
        assert_eq!(e["container"]["runtime"], runtime, "{e}");
        if let Some(uid) = pod_uid {
            assert_eq!(e["container"]["pod_uid"], uid, "{e}");
        }
        assert!(e["cgroup_path"].as_str().unwrap().ends_with(id), "{e}");
        assert!(
            e["result"].as_i64().unwrap() < 0,
            "insmod of garbage cannot succeed: {e}"
        );
    }
    let finit = events.iter().find(|e| e["syscall"] == "finit_module");
    if let Some(f) = finit {
        assert_eq!(f["module"], "e2e_dummy");
        // The path as the container sees it: the walk stops at the container's root mount.
        assert_eq!(f["path"], "/lib/modules/e2e_dummy.ko", "{f}");
        assert_eq!(f["params"].as_str().map(str::trim), Some("x=1"), "{f}");
    }
}

#[test]
fn container_docker_cgroupfs_layout() {
    let id = random_id();
    container_attempts("docker", &format!("/docker/{id}"), &id, None);
}

#[test]
fn container_kubernetes_cgroupfs_layout() {
    let id = random_id();
    let pod = "0f3c3b1e-5d2a-4c8e-9a6b-2f1d7e9c4b11";
    // The cgroupfs layout names no CRI runtime: "cri" unless runtime state says more.
    container_attempts(
        "cri",
        &format!("/kubepods/burstable/pod{pod}/{id}"),
        &id,
        Some(pod),
    );
}

#[test]
fn container_isulad_layout() {
    let id = random_id();
    container_attempts("isulad", &format!("/isulad/{id}"), &id, None);
}
