//! End-to-end: stopping `kmodmon tail` and `kmodmon run` loses nothing delivered. SIGINT or
//! SIGTERM in the middle of a storm, and right after a short-lived container's event: every
//! event taken off the ring is printed / written or counted, per sink:
//!
//! `delivered + delivered_policy + synthesized + summaries = undecodable + queue_full
//!  + sinks_gone + emitted + aggregated + filtered + skipped + lost`
//!
//! and the kernel's `seen = delivered + aggregated + dropped + in_flight + unread`, with every
//! aggregated attempt in a printed repeat summary or counted unreported.
use std::{
    ffi::CString,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use kmodmon_tests::{
    container::{Bundle, random_id},
    have, kmodmon_bin, require_root,
    tail::{Tail, assert_accounting, split_repeats},
};
use serde_json::Value;

/// The tests here storm the kernel's ring: one at a time, or one drowns the other's events.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn delete_module(name: &str) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated name.
    unsafe { libc::syscall(libc::SYS_delete_module, n.as_ptr(), 0) };
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// Checks the pipeline identity for every sink of a summary; returns the sinks by name.
fn assert_pipeline_identity(summary: &Value) -> Vec<(String, Value)> {
    let entered = n(summary, "delivered")
        + n(summary, "delivered_policy")
        + n(summary, "synthesized")
        + n(summary, "summaries");
    let before = n(summary, "undecodable") + n(summary, "queue_full") + n(summary, "sinks_gone");
    let sinks = summary["sinks"].as_array().expect("sinks").clone();
    assert!(!sinks.is_empty(), "no sinks in {summary}");
    let mut out = Vec::new();
    for s in sinks {
        let lost: u64 = s["lost"]
            .as_object()
            .expect("lost")
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(lost, n(&s, "lost_total"), "{s}");
        assert!(
            s.get("pending").is_none(),
            "events still pending after the sinks closed: {s}"
        );
        assert_eq!(
            entered,
            before
                + n(&s, "emitted")
                + s["aggregated"].as_u64().unwrap_or(0)
                + n(&s, "filtered")
                + n(&s, "skipped")
                + lost,
            "pipeline identity broken for sink {}: {summary}",
            s["name"]
        );
        out.push((s["name"].as_str().unwrap_or_default().to_string(), s));
    }
    out
}

/// A storm of delete_module attempts from 4 threads until `stop`: `name` every time (the
/// kernel aggregates them), or with `distinct` `name_<thread>_<n>` (each an event of its own).
fn storm(
    stop: Arc<AtomicBool>,
    issued: Arc<AtomicU64>,
    name: &'static str,
    distinct: bool,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..4)
        .map(|t| {
            let (stop, issued) = (stop.clone(), issued.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let n = issued.fetch_add(1, Ordering::Relaxed);
                    if distinct {
                        delete_module(&format!("{name}_{t}_{n}"));
                    } else {
                        delete_module(name);
                    }
                }
            })
        })
        .collect()
}

#[test]
fn tail_stopped_mid_storm_prints_or_counts_every_delivered_event() {
    if !require_root("tail_stopped_mid_storm_prints_or_counts_every_delivered_event") {
        return;
    }
    let _serial = serial();
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let tail = Tail::start(&[
            "--pid",
            &std::process::id().to_string(),
            "--module",
            "kmodmon_shutdown_storm",
        ]);
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicU64::new(0));
        let threads = storm(
            stop.clone(),
            issued.clone(),
            "kmodmon_shutdown_storm",
            false,
        );
        // Let the storm run, then stop kmodmon while it is still going.
        std::thread::sleep(Duration::from_millis(400));
        tail.signal(signal);
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        let (events, summary) = tail.finish();
        assert_accounting(&summary);
        let sinks = assert_pipeline_identity(&summary);
        let stdout = &sinks[0].1;
        assert_eq!(
            events.len() as u64,
            n(stdout, "emitted"),
            "printed lines = emitted ({signal}): {summary}"
        );
        assert_eq!(summary["printed"], stdout["emitted"]);
        // Four threads repeating one attempt: aggregated in the kernel.
        assert!(
            n(&summary, "delivered") + n(&summary, "aggregated") > 1000,
            "the storm reached kmodmon ({signal}, {} issued): {summary}",
            issued.load(Ordering::Relaxed)
        );
        assert!(n(&summary, "aggregated") > 0, "{summary}");
        // Printed summaries carry exactly the repeats the summary reports; what was still
        // aggregating at the stop is counted unreported, never lost silently.
        let (_, repeats) = split_repeats(&events);
        assert_eq!(repeats, n(&summary, "repeats"), "{summary}");
        for e in &events {
            assert_eq!(e["module"], "kmodmon_shutdown_storm");
        }
    }
}

#[test]
fn tail_stopped_right_after_a_short_lived_container_still_prints_its_event() {
    if !require_root("tail_stopped_right_after_a_short_lived_container_still_prints_its_event") {
        return;
    }
    let _serial = serial();
    assert!(
        have("runc"),
        "runc is not installed: `cargo xtask setup` installs it"
    );
    let id = random_id();
    // runc keeps its state under a private root that kmodmon does not read, so the
    // container's declaration can only come from its (quickly gone) processes.
    let state = tempfile::tempdir().unwrap();
    let bundle = Bundle::new(
        &format!("kmodmon-short-{}", &id[..12]),
        &format!("/docker/{id}"),
        &["KERNEL_MODULES=ip_vs"],
        &["/bin/sh", "-c", "rmmod kmodmon_short_lived"],
        &[],
    );
    let tail = Tail::start(&["--module", "kmodmon_short_lived"]);
    let out = Command::new("runc")
        .arg("--root")
        .arg(state.path())
        .args(["run", "--bundle"])
        .arg(bundle.path())
        .arg(&bundle.name)
        .output()
        .expect("runc run");
    let _ = Command::new("runc")
        .arg("--root")
        .arg(state.path())
        .args(["delete", "-f", &bundle.name])
        .output();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("error"),
        "runc: {out:?}"
    );
    // Half a second later: the declaration may still be pending, the event held.
    std::thread::sleep(Duration::from_millis(500));
    let (events, summary) = tail.stop();
    assert_accounting(&summary);
    assert_pipeline_identity(&summary);
    let ev = events
        .iter()
        .find(|e| e["kind"] == "unload_attempt")
        .unwrap_or_else(|| panic!("the container's rmmod was not printed: {summary}"));
    assert_eq!(ev["container"]["id"], id.as_str(), "{ev}");
    // Either the declaration was read in time (judged against it) or the event says it
    // was not: never silently dropped.
    let judged = ev["verdict"] == "unexpected";
    let said = ev["detail"]
        .as_str()
        .is_some_and(|d| d.contains("KERNEL_MODULES"));
    assert!(judged || said, "{ev}");
}

/// Starts `kmodmon run` and waits until it has attached; returns it with its stderr lines.
fn start_daemon(dir: &std::path::Path) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(kmodmon_bin())
        .args(["run", "--audit-dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kmodmon run");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("daemon did not start: {seen:#?}");
        };
        let ready = line.contains("started; attached");
        seen.push(line);
        if ready {
            return (child, rx);
        }
    }
}

#[test]
fn run_stopped_mid_storm_writes_or_counts_every_delivered_event() {
    if !require_root("run_stopped_mid_storm_writes_or_counts_every_delivered_event") {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit");
    let (mut child, stderr) = start_daemon(&log);
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let threads = storm(stop.clone(), issued.clone(), "kmodmon_daemon_storm", false);
    std::thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let status = child.wait().unwrap();
    let lines: Vec<String> = stderr.iter().collect();
    assert!(status.success(), "{status}: {lines:#?}");
    let summary = lines
        .iter()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v.get("summary").is_some())
        })
        .unwrap_or_else(|| panic!("no JSON summary: {lines:#?}"))["summary"]
        .clone();
    assert_accounting(&summary);
    assert!(n(&summary, "aggregated") > 0, "{summary}");
    let sinks = assert_pipeline_identity(&summary);
    let audit = &sinks
        .iter()
        .find(|(name, _)| name == "audit")
        .unwrap_or_else(|| panic!("no audit sink: {summary}"))
        .1;
    assert!(
        n(&summary, "delivered") + n(&summary, "aggregated") > 1000,
        "{summary}"
    );
    // What the audit sink says it wrote is what the log holds.
    let verify = Command::new(kmodmon_bin())
        .args(["log", "verify"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
    let export = Command::new(kmodmon_bin())
        .arg("export")
        .arg(&log)
        .output()
        .unwrap();
    assert!(export.status.success(), "{export:?}");
    let records = String::from_utf8_lossy(&export.stdout).lines().count() as u64;
    assert_eq!(
        records,
        n(audit, "emitted"),
        "audit records vs emitted: {summary}"
    );
}

#[test]
fn a_second_signal_exits_at_once_and_says_how_many_were_not_written() {
    if !require_root("a_second_signal_exits_at_once_and_says_how_many_were_not_written") {
        return;
    }
    let _serial = serial();
    // stdout is a pipe nobody reads: once it is full, the drain cannot finish.
    let mut child = Command::new(kmodmon_bin())
        .args(["tail", "--json", "--pid", &std::process::id().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kmodmon tail");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rx
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .expect("tail attaches")
        .starts_with("kmodmon: attached")
    {}
    let stop = Arc::new(AtomicBool::new(false));
    // Distinct names: identical attempts would be aggregated and never fill the pipe.
    let threads = storm(
        stop.clone(),
        Arc::new(AtomicU64::new(0)),
        "kmodmon_forced_exit",
        true,
    );
    std::thread::sleep(Duration::from_millis(300));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "tail cannot have finished draining into a full pipe"
    );
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    let started = Instant::now();
    let status = child.wait().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the second signal exits at once"
    );
    assert_eq!(status.code(), Some(130), "{status}");
    let lines: Vec<String> = rx.iter().collect();
    let forced = lines
        .iter()
        .find_map(|l| {
            l.strip_prefix("kmodmon: forced exit: ")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no forced-exit line: {lines:#?}"));
    assert!(forced > 0, "{lines:#?}");
}
