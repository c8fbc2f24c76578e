//! Robustness of the `kmodmon run` daemon under hostile load and hostile input: SIGKILL at
//! random points under load, a full disk (keep_newest and suspend), many held connections to
//! the metrics port, hostile names, parameters, paths and cgroup names through every sink, and
//! malformed configuration on start and on SIGHUP.
//!
//! Each test says what was kept, what was counted lost, and checks that the daemon still
//! answers `/ready`. Bounded in time (every wait has a deadline), loopback only. Needs root
//! (BPF, tmpfs mounts, cgroups).
use std::{
    collections::BTreeSet,
    ffi::CString,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use kmodmon_tests::{cgroup2_root, kmodmon_bin, require_root};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers

/// One kmodmon at a time in this file: every test here counts records exactly, and every
/// kmodmon on the host sees (and forwards, and may have to drop) the attempts of the storms
/// the others start. Run side by side, a storm overflowed another test's syslog socket, and
/// the full-disk test once counted 60 more losses in its metrics than in its log's `lost`
/// records (an open question, see the closing note of 2026-12-03).
static EXACT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    EXACT.lock().unwrap_or_else(|p| p.into_inner())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn kmodmon(args: &[&str]) -> Output {
    Command::new(kmodmon_bin())
        .args(args)
        .output()
        .expect("run kmodmon")
}

use kmodmon_tests::http::{free_loopback_addr as free_addr, get as http_get};

/// The value of one sample line `NAME{LABELS} V` (or `NAME V`) in Prometheus text.
fn sample(metrics: &str, series: &str) -> Option<u64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A `kmodmon run` child with its metrics endpoint on loopback; stderr is collected.
struct Daemon {
    child: Option<Child>,
    addr: String,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Option<mpsc::Receiver<String>>,
}

impl Daemon {
    /// Starts `kmodmon run ARGS --metrics ADDR` and waits (60 s at most) until it attached.
    fn start(args: &[&str], capture_stdout: bool) -> Daemon {
        let addr = free_addr();
        let mut cmd = Command::new(kmodmon_bin());
        cmd.arg("run").args(args);
        if !args.contains(&"--config") {
            cmd.args(["--metrics", &addr]);
        }
        // These tests count every record: no aggregation of attempts.
        if !args.contains(&"--audit-rate-limit") {
            cmd.args(["--audit-rate-limit", "0"]);
        }
        Self::spawn(cmd, addr, capture_stdout)
    }

    /// Starts `kmodmon run --config FILE` whose `[metrics] listen` is `addr`.
    fn with_config(config: &Path, addr: &str, capture_stdout: bool) -> Daemon {
        let mut cmd = Command::new(kmodmon_bin());
        cmd.arg("run").arg("--config").arg(config);
        cmd.args(["--audit-rate-limit", "0"]);
        Self::spawn(cmd, addr.to_string(), capture_stdout)
    }

    fn spawn(mut cmd: Command, addr: String, capture_stdout: bool) -> Daemon {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(if capture_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kmodmon run");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let lines = BufReader::new(child.stderr.take().unwrap()).lines();
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                for l in lines.map_while(Result::ok) {
                    if l.contains("started; attached") {
                        let _ = tx.send(());
                    }
                    stderr.lock().unwrap().push(l);
                }
            });
        }
        let stdout = child.stdout.take().map(|out| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
            rx
        });
        let d = Daemon {
            child: Some(child),
            addr,
            stderr,
            stdout,
        };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            panic!("the daemon did not attach: {:#?}", d.log());
        }
        // Ready follows the start-up line within moments.
        let deadline = Instant::now() + Duration::from_secs(10);
        while http_get(&d.addr, "/ready").0 != 200 {
            assert!(Instant::now() < deadline, "never ready: {:#?}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn log(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// `/ready` answers 200 `ready` within a second.
    fn assert_ready(&self, when: &str) {
        let t = Instant::now();
        let (status, body) = http_get(&self.addr, "/ready");
        assert_eq!(
            (status, body.as_str()),
            (200, "ready\n"),
            "{when}: /ready after {:?}; daemon log: {:#?}",
            t.elapsed(),
            self.log()
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{when}: /ready took {:?}",
            t.elapsed()
        );
    }

    fn metrics(&self) -> String {
        let (status, body) = http_get(&self.addr, "/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal");
    }

    /// SIGTERM, then the exit status (20 s at most) and the whole stderr.
    fn term(mut self) -> (std::process::ExitStatus, Vec<String>) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the daemon did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        std::thread::sleep(Duration::from_millis(100));
        (status, self.log())
    }

    fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn delete_module(name: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated name.
    unsafe { libc::syscall(libc::SYS_delete_module, n.as_ptr(), 0) };
}

/// A thread issuing delete_module("<prefix><n>") attempts, at most `limit`, a pause between.
struct Storm {
    stop: Arc<AtomicBool>,
    issued: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Storm {
    fn start(prefix: &str, limit: u64, pause: Duration) -> Storm {
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicU64::new(0));
        let (s, i, prefix) = (stop.clone(), issued.clone(), prefix.to_string());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                let n = i.load(Ordering::Relaxed);
                if n >= limit {
                    break;
                }
                delete_module(format!("{prefix}{n}").as_bytes());
                i.store(n + 1, Ordering::Relaxed);
                std::thread::sleep(pause);
            }
        });
        Storm {
            stop,
            issued,
            thread: Some(thread),
        }
    }

    /// Waits until `limit` were issued (or 30 s passed), then returns how many were.
    fn finish(mut self) -> u64 {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.issued.load(Ordering::Relaxed)
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.finish()
    }
}

fn verify(dir: &Path) -> Value {
    let out = kmodmon(&["log", "verify", "--json", dir.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify --json: {e}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    assert!(out.status.success() && v["ok"] == true, "log verify: {v}");
    v
}

/// Every record of the log (events and kmodmon's own), in order.
fn records(dir: &Path) -> Vec<Value> {
    let out = kmodmon(&["export", "--include-meta", dir.to_str().unwrap()]);
    assert!(out.status.success(), "export: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn record {l:?}: {e}")))
        .collect()
}

/// The numbers n of the events named `<prefix><n>`, in log order.
fn ours(records: &[Value], prefix: &str) -> Vec<u64> {
    records
        .iter()
        .filter(|r| r.get("record").is_none())
        .filter_map(|r| r["module"].as_str()?.strip_prefix(prefix)?.parse().ok())
        .collect()
}

/// Events lost by the audit log (all reasons), as its metrics say.
fn audit_lost(metrics: &str) -> u64 {
    ["queue_full", "write_error", "suspended"]
        .iter()
        .map(|r| {
            sample(
                metrics,
                &format!("kmodmon_audit_lost_records_total{{reason=\"{r}\"}}"),
            )
            .unwrap_or(0)
        })
        .sum()
}

/// The daemon's JSON summary at exit → events the kernel saw that never reached the sinks,
/// each counted: dropped in the kernel, in flight or unread at exit, and lost between the ring
/// and the sinks (the reader's queue full, undecodable, the sink thread gone).
fn not_delivered(log: &[String]) -> u64 {
    let summary = log
        .iter()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v.get("summary").is_some())
        })
        .unwrap_or_else(|| panic!("no final accounting: {log:#?}"));
    let n = |k: &str| {
        summary["summary"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {summary}"))
    };
    n("dropped")
        + n("in_flight")
        + n("unread")
        + n("queue_full")
        + n("undecodable")
        + n("sinks_gone")
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .expect("mount a tmpfs (root can)");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A small xorshift, seeded from the clock and printed, so a failing run can be repeated
/// (`KMODMON_ROBUSTNESS_SEED`).
fn rng() -> impl FnMut(u64) -> u64 {
    let seed = std::env::var("KMODMON_ROBUSTNESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("robustness seed: {seed} (set KMODMON_ROBUSTNESS_SEED to repeat)");
    let mut x = seed;
    move |below| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % below.max(1)
    }
}

// ---------------------------------------------------------------------------------------------
// SIGKILL

/// Kept: every event of ours in the log is one we issued, once, in order, and the chain
/// verifies across every kill (torn tails recovered). Lost: the log's `lost` records account
/// for what the writer could not write; events in the kernel ring or the daemon's queue at a
/// SIGKILL are gone with it (that is what a SIGKILL is); the final, clean run loses nothing
/// uncounted.
#[test]
fn sigkill_at_random_points_under_load_leaves_a_verifiable_log() {
    if !require_root("sigkill_at_random_points_under_load_leaves_a_verifiable_log") {
        return;
    }
    let _exact = exclusive();
    let mut rand = rng();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit");
    let logs = log.to_str().unwrap();
    let storm = Storm::start("rbk", 1_000_000, Duration::from_micros(200));
    for round in 0..5 {
        let fsync = if round % 2 == 0 { "always" } else { "50ms" };
        let d = Daemon::start(
            &[
                "--audit-dir",
                logs,
                "--audit-fsync",
                fsync,
                "--audit-segment-size",
                "32KiB",
            ],
            false,
        );
        d.assert_ready(&format!("round {round}, under load"));
        std::thread::sleep(Duration::from_millis(100 + rand(600)));
        d.kill();
    }
    let d = Daemon::start(
        &["--audit-dir", logs, "--audit-segment-size", "32KiB"],
        false,
    );
    std::thread::sleep(Duration::from_millis(300));
    let issued = storm.stop();
    // Let the pipeline drain before stopping.
    std::thread::sleep(Duration::from_millis(1500));
    d.assert_ready("after the kills");
    let lost_final = audit_lost(&d.metrics());
    let (status, stderr) = d.term();
    assert!(status.success(), "{status:?}: {stderr:#?}");

    let v = verify(&log);
    let all = records(&log);
    let kept = ours(&all, "rbk");
    assert!(kept.len() > 50, "too few events kept: {}", kept.len());
    let distinct: BTreeSet<u64> = kept.iter().copied().collect();
    assert_eq!(distinct.len(), kept.len(), "an event was recorded twice");
    assert!(kept.windows(2).all(|w| w[0] < w[1]), "events out of order");
    assert!(kept.iter().all(|&n| n < issued), "an event we never issued");
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "seq gaps");
    // The last run's losses are all in the log.
    let lost_in_log: u64 = all
        .iter()
        .filter(|r| r["record"] == "lost")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(v["lost"].as_u64(), Some(lost_in_log));
    assert!(lost_in_log >= lost_final, "{lost_in_log} < {lost_final}");
    eprintln!(
        "sigkill: issued {issued}, kept {}, recoveries {}, lost (logged) {lost_in_log}",
        kept.len(),
        v["recoveries"]
    );
}

// ---------------------------------------------------------------------------------------------
// Full disk

/// keep_newest (the default): the oldest segments are deleted to make room, with retention
/// records (reason disk_full) the chain verifies across; the newest events are kept; whatever
/// was lost is counted by the metrics and by `lost` records alike.
#[test]
fn a_full_disk_keeps_the_newest_records_and_a_verifiable_chain() {
    if !require_root("a_full_disk_keeps_the_newest_records_and_a_verifiable_chain") {
        return;
    }
    let _exact = exclusive();
    let base = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(&base.path().join("small"), "384k");
    let log = mnt.0.join("audit");
    let d = Daemon::start(
        &[
            "--audit-dir",
            log.to_str().unwrap(),
            "--audit-segment-size",
            "16KiB",
            "--audit-fsync",
            "100ms",
        ],
        false,
    );
    // About 700 bytes a record: 1500 need about 1 MiB, far beyond the 384 KiB.
    let issued = Storm::start("rbf", 1500, Duration::from_micros(300)).finish();
    assert_eq!(issued, 1500);
    std::thread::sleep(Duration::from_millis(1500));
    d.assert_ready("after filling the disk");
    let m = d.metrics();
    let triggered =
        sample(&m, "kmodmon_audit_disk_full_total{action=\"keep_newest\"}").unwrap_or(0);
    let removed = sample(
        &m,
        "kmodmon_audit_removed_segments_total{reason=\"disk_full\"}",
    )
    .unwrap_or(0);
    assert!(
        triggered >= 1 && removed >= 1,
        "the disk-full action never ran:\n{m}"
    );
    let lost = audit_lost(&m);
    let (status, stderr) = d.term();
    assert!(status.success(), "{status:?}: {stderr:#?}");
    assert!(
        stderr.iter().any(|l| l.contains("disk full; deleting the")),
        "the trigger was logged: {stderr:#?}"
    );

    let v = verify(&log);
    assert_eq!(v["from_genesis"], false, "the oldest records went: {v}");
    let all = records(&log);
    let retention: Vec<&Value> = all
        .iter()
        .filter(|r| r["record"] == "retention" && r["reason"] == "disk_full")
        .collect();
    assert!(
        !retention.is_empty(),
        "retention records name the deletions"
    );
    for r in &retention {
        assert!(
            r["removed_from_seq"].as_u64() < r["kept_from_seq"].as_u64(),
            "{r}"
        );
        assert!(r["freed_bytes"].as_u64().unwrap() > 0, "{r}");
    }
    let kept = ours(&all, "rbf");
    assert!(kept.windows(2).all(|w| w[0] < w[1]), "events out of order");
    assert!(
        !kept.is_empty() && (kept.len() as u64) < issued,
        "{}",
        kept.len()
    );
    // The newest were kept: the log ends with the last events issued.
    let newest = *kept.last().unwrap();
    assert!(
        newest + 20 >= issued,
        "the log ends at rbf{newest} of {issued}"
    );
    // Losses: the same number in the metrics and in the log's lost records.
    assert_eq!(v["lost"].as_u64(), Some(lost), "{v}");
    eprintln!(
        "keep_newest: issued {issued}, kept {} (rbf{}..rbf{newest}), deletions {removed}, lost {lost}",
        kept.len(),
        kept[0]
    );
}

/// suspend: writing stops while the disk is full, every event meanwhile is counted lost (the
/// metric, and a `lost` record once writing resumes), `/ready` keeps answering, and writing
/// resumes by itself when space returns; nothing is lost after that.
#[test]
fn a_full_disk_suspends_writing_counts_every_loss_and_resumes() {
    if !require_root("a_full_disk_suspends_writing_counts_every_loss_and_resumes") {
        return;
    }
    let _exact = exclusive();
    let base = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(&base.path().join("small"), "256k");
    let log = mnt.0.join("audit");
    let d = Daemon::start(
        &[
            "--audit-dir",
            log.to_str().unwrap(),
            "--audit-disk-full-action",
            "suspend",
            "--audit-fsync",
            "50ms",
        ],
        false,
    );
    // Fill what is left.
    let filler = mnt.0.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let issued = Storm::start("rbs", 300, Duration::from_micros(500)).finish();
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = d.metrics();
        if sample(&m, "kmodmon_audit_suspended") == Some(1) {
            break m;
        }
        assert!(Instant::now() < deadline, "never suspended:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    };
    d.assert_ready("while suspended");
    assert_eq!(
        sample(&m, "kmodmon_audit_disk_full_total{action=\"suspend\"}"),
        Some(1)
    );
    std::thread::sleep(Duration::from_millis(500));
    let m = d.metrics();
    let suspended_lost =
        sample(&m, "kmodmon_audit_lost_records_total{reason=\"suspended\"}").unwrap_or(0);
    assert!(suspended_lost > 0, "{m}");

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&d.metrics(), "kmodmon_audit_suspended") != Some(0) {
        assert!(Instant::now() < deadline, "writing did not resume");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = Storm::start("rbt", 40, Duration::from_millis(2)).finish();
    std::thread::sleep(Duration::from_millis(1500));
    d.assert_ready("after resuming");
    let m = d.metrics();
    let lost = audit_lost(&m);
    let (status, stderr) = d.term();
    assert!(status.success(), "{status:?}: {stderr:#?}");
    assert!(
        stderr.iter().any(|l| l.contains("writing suspended")),
        "{stderr:#?}"
    );
    assert!(
        stderr.iter().any(|l| l.contains("writing resumed")),
        "{stderr:#?}"
    );

    let v = verify(&log);
    let all = records(&log);
    // Kept: what fit before the disk filled, and everything after space returned.
    let kept_before = ours(&all, "rbs");
    let kept_after = ours(&all, "rbt");
    assert_eq!(
        kept_after,
        (0..after).collect::<Vec<_>>(),
        "nothing lost after resuming"
    );
    // Counted: every one of ours that is missing is in the loss count (which also counts other
    // processes' events seen meanwhile).
    assert!(
        issued - kept_before.len() as u64 <= lost,
        "{issued} {kept_before:?} {lost}"
    );
    assert_eq!(
        v["lost"].as_u64(),
        Some(lost),
        "metrics and the log agree: {v}"
    );
    let suspended_in_log: u64 = all
        .iter()
        .filter(|r| r["record"] == "lost")
        .filter_map(|r| r["suspended"].as_u64())
        .sum();
    assert_eq!(
        suspended_in_log,
        sample(&m, "kmodmon_audit_lost_records_total{reason=\"suspended\"}").unwrap_or(0)
    );
    eprintln!(
        "suspend: issued {issued}, kept {} before the disk filled, lost {lost} ({suspended_in_log} while suspended), {after} after resuming all kept",
        kept_before.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Held connections

/// 400 connections held open on the metrics port (half with a partial request, half silent):
/// the daemon keeps at most 64 open, `/ready` answers at once, and every event of a storm
/// meanwhile is recorded or counted.
#[test]
fn held_connections_to_the_metrics_port_starve_nothing() {
    if !require_root("held_connections_to_the_metrics_port_starve_nothing") {
        return;
    }
    let _exact = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit");
    let d = Daemon::start(&["--audit-dir", log.to_str().unwrap()], false);
    let addr: SocketAddr = d.addr.parse().unwrap();
    let storm = Storm::start("rbh", 400, Duration::from_millis(2));
    let mut held = Vec::new();
    for i in 0..400 {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            continue;
        };
        if i % 2 == 0 {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        }
        held.push(s);
        if i % 80 == 0 {
            d.assert_ready(&format!("with {i} connections held"));
        }
    }
    for _ in 0..5 {
        d.assert_ready("with 400 connections held");
        std::thread::sleep(Duration::from_millis(200));
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count();
    let issued = storm.finish();
    std::thread::sleep(Duration::from_millis(1500));
    let m = d.metrics();
    assert!(sample(&m, "kmodmon_http_connections").unwrap() <= 64, "{m}");
    let evicted = sample(&m, "kmodmon_http_connections_total{event=\"evicted\"}").unwrap_or(0);
    let timeouts = sample(&m, "kmodmon_http_connections_total{event=\"timeout\"}").unwrap_or(0);
    assert!(
        evicted + timeouts >= 300,
        "held connections were not shed:\n{m}"
    );
    assert!(fds < 200, "the daemon holds {fds} descriptors");
    let lost = audit_lost(&m);
    drop(held);
    let (status, stderr) = d.term();
    assert!(status.success(), "{status:?}");
    verify(&log);
    let kept = ours(&records(&log), "rbh");
    let missing = issued - kept.len() as u64;
    assert!(
        missing <= lost + not_delivered(&stderr),
        "{missing} of ours missing, {lost} lost in the audit log: {stderr:#?}"
    );
    eprintln!(
        "held connections: {fds} fds in the daemon, {evicted} evicted, {timeouts} timed out; {issued} issued, {} kept, {lost} lost",
        kept.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile strings

/// Whether `c` must never reach an output as it is (the same set as kmodmon::escape::is_unsafe,
/// written out here independently).
fn forbidden(c: char) -> bool {
    c.is_control()
        || matches!(c as u32,
            0xad | 0x34f | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x115f..=0x1160
            | 0x17b4..=0x17b5 | 0x180b..=0x180f | 0x200b..=0x200f | 0x2028..=0x202e
            | 0x2060..=0x206f | 0x3164 | 0xfe00..=0xfe0f | 0xfeff | 0xffa0 | 0xfff9..=0xfffb
            | 0xe0000..=0xe0fff)
}

fn assert_clean(sink: &str, out: &str) {
    for line in out.lines() {
        if let Some(c) = line.chars().find(|&c| forbidden(c)) {
            panic!("{sink}: U+{:04X} in {line:?}", c as u32);
        }
    }
}

const HOSTILE_NAMES: [&[u8]; 11] = [
    b"\x1b[2J\x1b[31mrbx0",
    "\u{202e}exe.rbx1".as_bytes(),
    b"=HYPERLINK(\"http://x\")rbx2",
    b"+cmd|' /C calc'!rbx3",
    b"@SUM(1+1)rbx4",
    b"-2+3rbx5",
    "\u{61c}\u{200f}\u{2066}rbx6".as_bytes(),
    "tag\u{e0041}\u{e007f}\u{3164}rbx7".as_bytes(),
    b"a\"b\\c'rbx8",
    b"\xff\xfe\x9b[31mrbx9",
    b"\tTAB\rCR\nrbx10",
];

/// Hostile module names (delete_module), parameters (init_module), a hostile file name
/// (finit_module) and a hostile cgroup name reach `tail` (human and JSON), the daemon's JSON
/// lines, syslog (a socket of our own), the audit log and its CSV export, and the metrics:
/// none of those outputs carries a control, bidi or invisible character, JSON and syslog parse,
/// CSV cells are no formulas, the human lines' only quotes are around params. Kept: every
/// hostile event is in every event sink.
#[test]
fn hostile_strings_reach_no_sink_unescaped() {
    if !require_root("hostile_strings_reach_no_sink_unescaped") {
        return;
    }
    let _exact = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit");
    let sock_path = dir.path().join("syslog.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let syslog_msgs = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (msgs, stop) = (syslog_msgs.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    msgs.lock().unwrap().push(text(&buf[..n]));
                }
            }
        })
    };
    let addr = free_addr();
    let config = dir.path().join("kmodmon.toml");
    std::fs::write(
        &config,
        format!(
            "[audit]\ndir = {:?}\n[metrics]\nlisten = {addr:?}\n[forward]\nstdout = true\n\
             syslog = true\nsyslog_socket = {:?}\n",
            log.to_str().unwrap(),
            sock_path.to_str().unwrap()
        ),
    )
    .unwrap();
    let d = Daemon::with_config(&config, &addr, true);
    let mut human = Command::new(kmodmon_bin())
        .args(["tail", "--color", "always"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let json = kmodmon_tests::tail::Tail::start(&[]);
    // `tail` (human) says it attached on stderr; wait for it.
    let human_err = BufReader::new(human.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in human_err.lines().map_while(Result::ok) {
            if l.contains("attached") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("tail attached");
    let human_out = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let out = BufReader::new(human.stdout.take().unwrap());
        let sink = human_out.clone();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
    }

    // The hostile calls.
    for name in HOSTILE_NAMES {
        delete_module(name);
    }
    let params = CString::new("p=\x1b]0;title\x07 q=\u{202e}x rbxp".as_bytes()).unwrap();
    let image = [0u8; 8];
    // SAFETY: valid pointers and lengths.
    unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            image.len(),
            params.as_ptr(),
        )
    };
    let ko = dir.path().join("\u{202e}gpj\x1b[2J.rbxf.ko");
    std::fs::write(&ko, b"not a module").unwrap();
    let f = std::fs::File::open(&ko).unwrap();
    let empty = CString::new("").unwrap();
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid fd and NUL-terminated params.
    unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), empty.as_ptr(), 0) };
    // A process in a cgroup with a hostile name.
    let cg_name = "kmrb\x1b[31m\u{202e}\u{e0041}cg";
    let cg = cgroup2_root().map(|root| root.join(cg_name));
    let _cg_guard = cg.as_ref().map(|cg| {
        let _ = std::fs::remove_dir(cg); // left by an interrupted run
        std::fs::create_dir(cg).expect("mkdir a cgroup2 directory");
        CgroupDir(cg.clone())
    });
    if let Some(cg) = &cg {
        let procs = cg.join("cgroup.procs");
        // busybox rmmod calls delete_module whether or not such a module is loaded.
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > '{}' && exec busybox rmmod rbxcg",
                procs.to_str().unwrap()
            ))
            .output()
            .unwrap();
        assert!(
            !text(&out.stderr).contains("cgroup.procs"),
            "moving into the cgroup failed: {}",
            text(&out.stderr)
        );
    }

    // Wait until every event reached the daemon's stdout.
    let expect = HOSTILE_NAMES.len() + 2 + usize::from(cg.is_some());
    let mut daemon_json = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let stdout = d.stdout.as_ref().unwrap();
    while daemon_json
        .iter()
        .filter(|l: &&String| l.contains("rbx"))
        .count()
        < expect
    {
        assert!(
            Instant::now() < deadline,
            "events missing on stdout: {daemon_json:#?}"
        );
        if let Ok(l) = stdout.recv_timeout(Duration::from_millis(200)) {
            daemon_json.push(l);
        }
    }
    let tail_json = json_lines_until(json, expect);
    std::thread::sleep(Duration::from_millis(1000));
    d.assert_ready("after the hostile events");
    let metrics = d.metrics();
    let _ = human.kill();
    let _ = human.wait();
    let (status, _) = d.term();
    assert!(status.success());
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();

    // JSON lines (daemon stdout, tail --json): clean, parse, and all our events are there.
    for (sink, lines) in [("daemon stdout", &daemon_json), ("tail --json", &tail_json)] {
        let ours: Vec<Value> = lines
            .iter()
            .filter(|l| l.contains("rbx"))
            .map(|l| {
                assert_clean(sink, l);
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{sink}: {e}: {l}"))
            })
            .collect();
        assert_eq!(ours.len(), expect, "{sink}: {ours:#?}");
        let params = ours
            .iter()
            .find(|e| e["params"].as_str().is_some_and(|p| p.contains("rbxp")));
        assert!(params.is_some(), "{sink}: the init_module params");
        if cg.is_some() {
            let cg_ev = ours
                .iter()
                .find(|e| e["module"] == "rbxcg")
                .unwrap_or_else(|| panic!("{sink}: the cgroup event"));
            let path = cg_ev["cgroup_path"].as_str().unwrap_or_default();
            assert!(
                path.contains("kmrb") && path.contains("\\u{202e}"),
                "{sink}: {cg_ev}"
            );
        }
    }
    // Human lines.
    let human_lines = human_out.lock().unwrap().clone();
    let ours_human: Vec<&String> = human_lines.iter().filter(|l| l.contains("rbx")).collect();
    assert_eq!(ours_human.len(), expect, "{human_lines:#?}");
    for l in &ours_human {
        // Colour was asked for: strip our own SGR sequences, then nothing else may remain.
        let stripped = strip_sgr(l);
        assert_clean("tail (human)", &stripped);
        let quotes = stripped.matches('"').count();
        assert!(quotes == 0 || quotes == 2, "bare quotes in {stripped:?}");
    }
    // Syslog.
    let msgs = syslog_msgs.lock().unwrap().clone();
    let ours_syslog: Vec<&String> = msgs.iter().filter(|m| m.contains("rbx")).collect();
    // The syslog socket is a datagram socket with a queue of net.unix.max_dgram_qlen (10)
    // messages: a burst larger than that, against a reader that is slow to drain it, is sent
    // in part and the rest counted as the sink's losses (never silent).
    let syslog_lost = sample(
        &metrics,
        &format!(
            "kmodmon_sink_events_total{{sink=\"syslog\",outcome=\"lost_{}\"}}",
            kmodmon::sinks::syslog::SEND_ERROR
        ),
    )
    .unwrap_or(0);
    assert!(
        ours_syslog.len() <= expect && ours_syslog.len() as u64 + syslog_lost >= expect as u64,
        "syslog: {} of {expect} received, {syslog_lost} counted lost: {msgs:#?}\n{metrics}",
        ours_syslog.len()
    );
    for m in ours_syslog {
        assert_clean("syslog", m);
        let json = m.split_once(" - ").map(|(_, j)| j).unwrap();
        serde_json::from_str::<Value>(json).unwrap_or_else(|e| panic!("syslog JSON: {e}: {m}"));
    }
    // The audit log and its CSV export.
    verify(&log);
    let out = kmodmon(&["export", "--format", "csv", log.to_str().unwrap()]);
    assert!(out.status.success());
    let csv_text = text(&out.stdout);
    assert_clean("CSV", &csv_text);
    let mut r = csv::Reader::from_reader(out.stdout.as_slice());
    let headers = r.headers().unwrap().clone();
    let result_col = headers.iter().position(|h| h == "result").unwrap();
    let mut rows = 0;
    for row in r.records() {
        let row = row.unwrap();
        if !row.iter().any(|c| c.contains("rbx")) {
            continue;
        }
        rows += 1;
        for cell in row.iter() {
            let formula = cell.starts_with([
                '=', '+', '-', '@', '\t', '\r', '\u{ff1d}', '\u{ff0b}', '\u{ff0d}', '\u{ff20}',
            ]);
            assert!(
                !formula || cell.parse::<i64>().is_ok(),
                "formula cell {cell:?}"
            );
        }
        assert!(
            row[result_col].parse::<i64>().is_ok_and(|r| r < 0),
            "result stays a number"
        );
    }
    assert_eq!(rows, expect);
    let formula_module = kmodmon(&["export", log.to_str().unwrap()]);
    assert!(text(&formula_module.stdout).contains("=HYPERLINK"));
    assert!(csv_text.contains("'=HYPERLINK"), "neutralised, reversibly");
    // Metrics.
    assert_clean("metrics", &metrics);
}

/// A cgroup directory, removed on drop (its one process has exited by then).
struct CgroupDir(PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn json_lines_until(mut tail: kmodmon_tests::tail::Tail, n: usize) -> Vec<String> {
    let events = tail.collect_until(Duration::from_secs(20), |evs| {
        evs.iter().filter(|e| e.to_string().contains("rbx")).count() >= n
    });
    events.iter().map(Value::to_string).collect()
}

/// Removes `ESC [ digits ; m` colour sequences (kmodmon's own, with --color always).
fn strip_sgr(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("\x1b[") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find(|c: char| !(c.is_ascii_digit() || c == ';'))
            .unwrap_or(after.len());
        assert!(after[end..].starts_with('m'), "a non-colour escape: {s:?}");
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Malformed configuration

/// A malformed config or policy stops the start with exit 2 and the file, line and column; a
/// malformed config on disk at SIGHUP changes nothing: the daemon keeps recording and
/// answering `/ready`, and says so in the audit log. (A malformed policy on SIGHUP needs
/// enforcement, which this host's kernel cannot do: tests/vm/enforce.sh covers it in the VMs.)
#[test]
fn malformed_config_and_policy_are_refused_on_start_and_survived_on_sighup() {
    if !require_root("malformed_config_and_policy_are_refused_on_start_and_survived_on_sighup") {
        return;
    }
    let _exact = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[audit]\ndri = \"/x\"\n").unwrap();
    for check in [false, true] {
        let mut args = vec!["run", "--config", bad.to_str().unwrap()];
        if check {
            args.push("--check-config");
        }
        let out = kmodmon(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("bad.toml") && err.contains("line 2, column 1"),
            "{err}"
        );
    }
    let small = dir.path().join("small.toml");
    std::fs::write(
        &small,
        "[audit]\ndir = \"/x\"\nsegment_size = \"64MiB\"\nretain_size = \"64MiB\"\n",
    )
    .unwrap();
    let out = kmodmon(&["run", "--config", small.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("twice segment_size"),
        "{}",
        text(&out.stderr)
    );
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "mode = \"enforce\"\n[host]\nrestrict = maybe\n").unwrap();
    for args in [
        vec![
            "run",
            "--check-config",
            "--policy",
            policy.to_str().unwrap(),
        ],
        vec!["run", "--policy", policy.to_str().unwrap()],
    ] {
        let out = kmodmon(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("policy.toml:3:"), "{args:?}: {err}");
    }

    // SIGHUP with the config file now malformed.
    let addr = free_addr();
    let good = dir.path().join("kmodmon.toml");
    std::fs::write(
        &good,
        format!(
            "[audit]\ndir = {:?}\n[metrics]\nlisten = {addr:?}\n",
            log.to_str().unwrap()
        ),
    )
    .unwrap();
    let d = Daemon::with_config(&good, &addr, false);
    d.assert_ready("started");
    std::fs::write(&good, "[audit\nthis is not toml\n").unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    d.assert_ready("after SIGHUP with a malformed config file");
    let issued = Storm::start("rbu", 30, Duration::from_millis(5)).finish();
    std::thread::sleep(Duration::from_millis(1500));
    d.assert_ready("recording after SIGHUP");
    let lost = audit_lost(&d.metrics());
    let (status, stderr) = d.term();
    assert!(status.success(), "{stderr:#?}");
    verify(&log);
    let all = records(&log);
    assert!(
        all.iter().any(|r| r["record"] == "note"
            && r["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("SIGHUP"))),
        "the SIGHUP is noted in the audit log"
    );
    let kept = ours(&all, "rbu");
    let missing = issued - kept.len() as u64;
    assert!(
        missing <= lost + not_delivered(&stderr),
        "recording went on after SIGHUP: {missing} of {issued} missing, {lost} counted lost"
    );
}
