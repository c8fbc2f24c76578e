//! Module syscalls refused by seccomp before they ran, on this machine's kernel: a real
//! `kmodmon tail --json` and real processes confined by a seccomp filter (`kmodmon-load
//! seccomp ACTION`, the three module syscalls answered the way runtimes' default profiles do,
//! everything else allowed). Each case checks what the caller saw (its own printed result, its
//! exit status) against the event.
use std::{process::Command, time::Duration};

use kmodmon_tests::{require_root, tail::Tail};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const LOAD: &str = env!("CARGO_BIN_EXE_kmodmon-load");

/// One kmodmon at a time in this file.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `kmodmon-load seccomp ACTION kmodmon-load ARGS...`; returns (stdout, exit status).
fn confined(action: &str, args: &[&str]) -> (String, std::process::ExitStatus) {
    let out = Command::new(LOAD)
        .args(["seccomp", action, LOAD])
        .args(args)
        .output()
        .expect("run kmodmon-load");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status,
    )
}

fn unconfined(args: &[&str]) -> String {
    let out = Command::new(LOAD)
        .args(args)
        .output()
        .expect("run kmodmon-load");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A module name no other test or agent uses.
fn unique(tag: &str) -> String {
    format!("kmsc_{}_{tag}", std::process::id())
}

fn events_for<'a>(events: &'a [Value], module: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["module"] == module).collect()
}

fn killed_by_sigsys(status: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt as _;
    status.signal() == Some(libc::SIGSYS)
}

#[test]
fn refused_attempts_are_reported_with_what_the_caller_saw() {
    if !require_root("refused_attempts_are_reported_with_what_the_caller_saw") {
        return;
    }
    let _serial = serial();
    let names: Vec<String> = [
        "errno", "errno0", "plain", "killp", "killt", "trap", "finit",
    ]
    .iter()
    .map(|t| unique(t))
    .collect();
    let module_args: Vec<&str> = names
        .iter()
        .flat_map(|n| ["--module", n.as_str()])
        .collect();
    let mut tail = Tail::start(&module_args);
    let attached = tail.log.join("\n");
    assert!(
        attached.contains("seccomp-refused attempts: ") && !attached.contains("attempts: off"),
        "{attached}"
    );

    let (out, status) = confined("errno", &["delete", &names[0]]);
    assert!(status.success() && out.contains("ret=-1 errno=1"), "{out}");
    let (out, status) = confined("errno:0", &["delete", &names[1]]);
    assert!(status.success() && out.contains("ret=0 errno=0"), "{out}");
    let plain = unconfined(&["delete", &names[2]]);
    let (_, status) = confined("kill-process", &["delete", &names[3]]);
    assert!(killed_by_sigsys(status), "{status:?}");
    let (out, status) = confined("kill-thread", &["thread-delete", &names[4]]);
    assert!(status.success() && out.contains("thread=killed"), "{out}");
    let (_, status) = confined("trap", &["delete", &names[5]]);
    assert!(killed_by_sigsys(status), "{status:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(format!("{}.ko", names[6]));
    std::fs::write(&file, b"\x7fELF not a module").expect("write");
    let file = file.to_str().expect("utf-8 path");
    let (out, status) = confined("errno", &["finit", file, "p=1"]);
    assert!(status.success() && out.contains("ret=-1 errno=1"), "{out}");

    let events = tail.collect_until(WAIT, |e| names.iter().all(|n| !events_for(e, n).is_empty()));
    // Late duplicates (a kill reported twice) would arrive within the drain.
    let (rest, summary) = tail.stop();
    let events: Vec<Value> = events.into_iter().chain(rest).collect();
    for n in &names {
        assert_eq!(events_for(&events, n).len(), 1, "{n}: {events:#?}");
    }
    let one = |i: usize| events_for(&events, &names[i])[0].clone();

    let e = one(0);
    assert_eq!(e["kind"], "unload_attempt");
    assert_eq!(e["syscall"], "delete_module");
    assert_eq!(e["blocked_by"], "seccomp");
    assert_eq!(e["result"], -1);
    assert_eq!(e["errno"], "EPERM");
    assert_eq!(e["flags"], libc::O_NONBLOCK);
    assert_eq!(e["comm"], "kmodmon-load");
    assert!(
        e.get("signal").is_none() && e.get("duration_ns").is_none(),
        "{e}"
    );

    let e = one(1);
    assert_eq!(e["blocked_by"], "seccomp");
    assert_eq!(e["result"], 0, "ERRNO(0) makes the caller see success: {e}");
    assert!(e.get("errno").is_none(), "{e}");

    // Not confined: the syscall ran; nothing says it was blocked.
    let e = one(2);
    assert!(e.get("blocked_by").is_none(), "{e}");
    let ret: i64 = plain
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ret="))
        .and_then(|r| r.parse().ok())
        .expect("ret=");
    let errno: i64 = plain
        .split_whitespace()
        .find_map(|w| w.strip_prefix("errno="))
        .and_then(|r| r.parse().ok())
        .expect("errno=");
    assert_eq!(e["result"], if ret < 0 { -errno } else { ret }, "{plain}");

    for (i, what) in [(3, "kill-process"), (4, "kill-thread"), (5, "trap")] {
        let e = one(i);
        assert_eq!(e["blocked_by"], "seccomp", "{what}: {e}");
        assert_eq!(e["signal"], "SIGSYS", "{what}: {e}");
        assert!(e.get("result").is_none(), "{what}: no result: {e}");
        assert_eq!(e["module"], names[i].as_str(), "{what}: argument read: {e}");
    }
    // The thread killed while its process lived on: only its exit shows it.
    let e = one(4);
    assert_eq!(e["source"], "task_exit", "{e}");
    assert_ne!(e["tid"], e["pid"], "{e}");

    let e = one(6);
    assert_eq!(e["kind"], "load_attempt");
    assert_eq!(e["syscall"], "finit_module");
    assert_eq!(e["blocked_by"], "seccomp");
    assert_eq!(e["errno"], "EPERM");
    assert_eq!(e["params"], "p=1");
    assert_eq!(e["path"], file, "path walked from the fd: {e}");

    kmodmon_tests::tail::assert_accounting(&summary);
}

#[test]
fn refused_attempts_can_be_turned_off() {
    if !require_root("refused_attempts_can_be_turned_off") {
        return;
    }
    let _serial = serial();
    let name = unique("off");
    let mut tail = Tail::start(&["--no-seccomp-attempts", "--module", &name]);
    let attached = tail.log.join("\n");
    assert!(
        attached.contains("seccomp-refused attempts: off"),
        "{attached}"
    );
    let (out, status) = confined("errno", &["delete", &name]);
    assert!(status.success() && out.contains("ret=-1 errno=1"), "{out}");
    // A marker the same kmodmon does report, so "nothing" is not just "not yet".
    let marker = unconfined(&["delete", &name]);
    let events = tail.collect_until(WAIT, |e| !events_for(e, &name).is_empty());
    let (rest, summary) = tail.stop();
    let events: Vec<Value> = events.into_iter().chain(rest).collect();
    let mine = events_for(&events, &name);
    let source = mine
        .iter()
        .find(|e| e["errno"] != "EPERM")
        .map(|e| e["source"].clone())
        .unwrap_or_else(|| panic!("the unconfined attempt ({marker}) is reported: {mine:#?}"));
    for e in &mine {
        assert!(e.get("blocked_by").is_none(), "nothing classified: {e:#}");
        assert!(e.get("signal").is_none(), "{e:#}");
    }
    if source == "sys_exit" {
        // The exit-only source: each exit is the attempt record, so the refused call is
        // still an attempt (with what the caller saw), only not called a seccomp refusal.
        assert_eq!(mine.len(), 2, "both attempts ({marker}): {mine:#?}");
        assert!(
            mine.iter()
                .any(|e| e["errno"] == "EPERM" && e["result"] == -1),
            "{mine:#?}"
        );
    } else {
        assert_eq!(
            mine.len(),
            1,
            "only the unconfined attempt ({marker}): {mine:#?}"
        );
        let without_enter = summary["counters"]["exit_without_enter"]
            .as_u64()
            .expect("exit_without_enter counter");
        assert!(
            without_enter >= 1 || source == "fexit" || source == "kprobe",
            "the refused attempt is counted as before: {summary}"
        );
    }
}
