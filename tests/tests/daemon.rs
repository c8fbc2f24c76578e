//! End-to-end: the `kmodmon run` daemon writing the audit log while module-syscall attempts
//! happen, SIGKILLed repeatedly mid-write and restarted; the chain must verify, with no torn
//! or duplicated record, and export must give the events back.
use std::{
    ffi::CString,
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use kmodmon_tests::{kmodmon_bin, require_root};
use serde_json::Value;

/// Starts the daemon and waits until it has attached.
fn start(dir: &std::path::Path, extra: &[&str]) -> Child {
    let mut child = Command::new(kmodmon_bin())
        .args(["run", "--audit-dir"])
        .arg(dir)
        .args(["--audit-fsync", "always"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kmodmon run");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("read stderr");
        let ready = line.contains("started; attached");
        seen.push(line);
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "daemon did not start: {seen:#?}");
    }
    assert!(
        seen.iter().any(|l| l.contains("started; attached")),
        "daemon exited before attaching: {seen:#?}"
    );
    std::thread::spawn(move || for _ in lines {});
    child
}

fn delete_module(name: &str) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated name.
    unsafe { libc::syscall(libc::SYS_delete_module, n.as_ptr(), 0) };
}

fn kmodmon(args: &[&str]) -> std::process::Output {
    Command::new(kmodmon_bin())
        .args(args)
        .output()
        .expect("run kmodmon")
}

#[test]
fn sigkill_loop_leaves_a_verifiable_log_without_torn_or_duplicate_records() {
    if !require_root("sigkill_loop_leaves_a_verifiable_log_without_torn_or_duplicate_records") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit");
    let logs = log.to_str().unwrap().to_string();

    // A generator issuing attempts the whole time, each with a unique name.
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let generator = {
        let (stop, issued) = (stop.clone(), issued.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                // This process's pid in the name: another test run on the host must not look
                // like a duplicate.
                delete_module(&format!("kmodmon_daemon_{}_{n}", std::process::id()));
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    };
    for round in 0..6 {
        let mut child = start(&log, &[]);
        std::thread::sleep(Duration::from_millis(150 + 70 * round));
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }
    // A last, clean run: SIGTERM closes the log.
    let mut child = start(&log, &[]);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    generator.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(child.wait().unwrap().success());

    let verify = kmodmon(&["log", "verify", &logs]);
    assert!(
        verify.status.success(),
        "verify failed: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let export = kmodmon(&["export", &logs, "--kind", "unload_attempt"]);
    assert!(export.status.success(), "{export:?}");
    let records: Vec<Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn record {l:?}: {e}")))
        .collect();
    let ours: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["module"]
                .as_str()
                .is_some_and(|m| m.starts_with(&format!("kmodmon_daemon_{}_", std::process::id())))
        })
        .collect();
    assert!(ours.len() > 20, "too few events recorded: {}", ours.len());
    let mut names: Vec<&str> = ours.iter().map(|r| r["module"].as_str().unwrap()).collect();
    let before = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), before, "a record was duplicated");
    let mut seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    let n = seqs.len();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "a sequence number repeats");
    for r in &ours {
        assert_eq!(r["kind"], "unload_attempt");
        assert!(r["hash"].as_str().is_some_and(|h| h.len() == 64));
    }
}

#[test]
fn daemon_serves_metrics_and_forwards_json_to_stdout() {
    if !require_root("daemon_serves_metrics_and_forwards_json_to_stdout") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = 20000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let mut child = start(&dir.path().join("audit"), &["--metrics", &addr, "--stdout"]);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    delete_module("kmodmon_metrics_probe");
    // Other tests may make module syscalls at the same time: look for ours.
    let deadline = Instant::now() + Duration::from_secs(20);
    let ours = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("an event on stdout");
        let ev: Value = serde_json::from_str(&line).expect("stdout carries JSON lines");
        if ev["module"] == "kmodmon_metrics_probe" {
            break ev;
        }
        assert!(Instant::now() < deadline, "our event never came");
    };
    assert_eq!(ours["kind"], "unload_attempt");
    let (status, body) = kmodmon_tests::http::get(&addr, "/metrics");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{body}");
    let line = body
        .lines()
        .find(|l| l.starts_with("kmodmon_events_total{") && l.contains("kind=\"unload_attempt\""))
        .unwrap_or_else(|| panic!("no unload_attempt counter in:\n{body}"));
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1, "{line}");
}

/// With a policy, the daemon enforces or refuses to start: on a kernel without module support
/// there is nothing to hook, and it must say so rather than pretend.
#[test]
fn daemon_with_a_policy_never_pretends_to_enforce() {
    if !require_root("daemon_with_a_policy_never_pretends_to_enforce") {
        return;
    }
    if kmodmon::host::moddb::live::module_support() {
        eprintln!("this kernel has module support: covered by the VM enforcement scenario");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "mode = \"enforce\"\n[host]\nrestrict = false\n").unwrap();
    let out = Command::new(kmodmon_bin())
        .arg("run")
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no module support") && err.contains("nothing to hook"),
        "{err}"
    );
}

#[test]
fn the_daemon_tells_systemd_it_is_ready_alive_and_stopping() {
    if !require_root("the_daemon_tells_systemd_it_is_ready_alive_and_stopping") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = Command::new(kmodmon_bin())
        .args(["run", "--audit-dir"])
        .arg(dir.path().join("audit"))
        .env("NOTIFY_SOCKET", &sock_path)
        // The watchdog as systemd sets it for WatchdogSec=2s.
        .env("WATCHDOG_USEC", "2000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kmodmon run");
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && !(got.iter().any(|m: &String| m == "READY=1")
            && got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2)
    {
        let Ok(n) = sock.recv(&mut buf) else { break };
        got.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    while !got.iter().any(|m| m == "STOPPING=1") {
        let Ok(n) = sock.recv(&mut buf) else { break };
        got.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let ready = got.iter().position(|m| m == "READY=1");
    let ping = got.iter().position(|m| m == "WATCHDOG=1");
    assert!(
        ready.is_some() && ping > ready,
        "READY=1 first, then watchdog pings: {got:?}"
    );
    assert!(got.iter().any(|m| m == "STOPPING=1"), "{got:?}");
}
