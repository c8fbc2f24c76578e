//! `cargo xtask bench`: measurements paired in one run, reported as ratios (the machines are
//! shared and noisy). Results go to stdout and target/bench/host.md.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::util::{is_root, run as run_cmd, workspace_root};

mod compare;
mod seccomp;

pub use compare::bench_compare;
pub use seccomp::bench_seccomp;

struct Bins {
    kmodmon: PathBuf,
    load: PathBuf,
}

/// The release kmodmon (the one binary run, the .deb and the VM use), and the load generator
/// built the same way, so they share what they have in common.
fn build_bins() -> Result<Bins> {
    let kmodmon = crate::build::release_kmodmon()?;
    run_cmd(crate::build::release_build().args(["-p", "kmodmon-tests", "--bin", "kmodmon-load"]))?;
    Ok(Bins {
        kmodmon,
        load: crate::build::release_dir()?.join("kmodmon-load"),
    })
}

pub fn bench(rounds: usize) -> Result<()> {
    crate::setup::setup()?;
    if !is_root() {
        bail!("the benchmarks load eBPF programs: run as root");
    }
    let root = workspace_root();
    let bins = build_bins()?;
    let mut report = String::new();
    let mut say = |line: String| {
        println!("{line}");
        report.push_str(&line);
        report.push('\n');
    };

    say(format!(
        "# kmodmon host benchmark ({} rounds, kernel {})\n",
        rounds,
        uname_r()
    ));
    // 1. Unrelated-syscall overhead, paired rounds: none / kmodmon / bpftrace.
    let bpftrace = which::which("bpftrace").ok();
    let mut base = Vec::new();
    let mut kmod = Vec::new();
    let mut bpft = Vec::new();
    let mut kmod_source = String::new();
    for _ in 0..rounds {
        base.push(getppid_ns(&bins)?);
        let (mut child, attached) = start_tail(&bins.kmodmon, &[])?;
        kmod_source = attached;
        kmod.push(getppid_ns(&bins)?);
        stop(&mut child);
        if let Some(bt) = &bpftrace {
            let mut child = start_bpftrace(bt)?;
            bpft.push(getppid_ns(&bins)?);
            stop(&mut child);
        }
    }
    let b = median(&mut base);
    let k = median(&mut kmod);
    say("## getppid() cost (median ns/call; ratio to no monitor)\n".into());
    say(format!("kmodmon attached as: `{kmod_source}`\n"));
    say("| monitor | ns/call | ratio |".into());
    say("|---|---|---|".into());
    say(format!("| none | {b:.1} | 1.00 |"));
    say(format!("| kmodmon tail | {k:.1} | {:.2} |", k / b));
    if !bpft.is_empty() {
        let t = median(&mut bpft);
        say(format!(
            "| bpftrace raw_syscalls one-liner | {t:.1} | {:.2} |",
            t / b
        ));
        say(format!("\nkmodmon / bpftrace = {:.2}\n", k / t));
    } else {
        say("\nbpftrace not installed: comparison skipped\n".into());
    }

    // 2. Storm of module syscall attempts with exact accounting.
    say("## Storm: 4 threads × 50,000 delete_module attempts, tail --json > /dev/null\n".into());
    say(
        "| round | attempts/s | kernel saw | delivered | dropped | in flight+unread | identity |"
            .into(),
    );
    say("|---|---|---|---|---|---|---|".into());
    let mut peak_rss = 0;
    for r in 0..rounds {
        let (mut child, _) = start_tail(&bins.kmodmon, &["--json"])?;
        let out = output_of(Command::new(&bins.load).args(["storm", "4", "50000"]))?;
        thread::sleep(Duration::from_millis(500));
        peak_rss = peak_rss.max(rss_kib(child.id(), "VmHWM:").unwrap_or(0));
        let summary = stop_with_summary(&mut child)?;
        let rate = field(&out, "rate=").unwrap_or_default();
        let n = |k: &str| summary["summary"][k].as_u64().unwrap_or(0);
        let ok = n("seen") == n("delivered") + n("dropped") + n("in_flight") + n("unread");
        say(format!(
            "| {r} | {rate} | {} | {} | {} | {} | {} |",
            n("seen"),
            n("delivered"),
            n("dropped"),
            n("in_flight") + n("unread"),
            if ok { "holds" } else { "BROKEN" }
        ));
    }

    // 3. Start-up to attached, and idle RSS.
    let mut startup = Vec::new();
    let mut idle_rss = 0;
    for _ in 0..rounds.max(5) {
        let t0 = Instant::now();
        let (mut child, _) = start_tail(&bins.kmodmon, &[])?;
        startup.push(t0.elapsed().as_secs_f64() * 1000.0);
        thread::sleep(Duration::from_millis(200));
        idle_rss = idle_rss.max(rss_kib(child.id(), "VmRSS:").unwrap_or(0));
        stop(&mut child);
    }
    say(format!(
        "\n## Start-up and memory\n\n| metric | value |\n|---|---|\n| spawn → attached (median) | {:.0} ms |\n| RSS idle (max over runs) | {:.1} MB |\n| RSS peak during storm (VmHWM) | {:.1} MB |",
        median(&mut startup),
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    ));

    // 4. The daemon as shipped (audit log, metrics, stdout): the memory the systemd unit's
    //    MemoryMax and the DaemonSet's requests/limits are sized from.
    say(
        "\n## Daemon memory: `kmodmon run` with audit log, metrics and --stdout > /dev/null\n"
            .into(),
    );
    say("| round | RSS idle | VmHWM after a storm of 4 × 50,000 attempts |".into());
    say("|---|---|---|".into());
    for r in 0..rounds.min(3) {
        let (idle, peak) = daemon_rss(&bins)?;
        say(format!(
            "| {r} | {:.1} MB | {:.1} MB |",
            idle as f64 / 1024.0,
            peak as f64 / 1024.0
        ));
    }
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("host.md"), report)?;
    println!("\n(written to {})", dir.join("host.md").display());
    Ok(())
}

/// One daemon run: (idle VmRSS, VmHWM after a storm), in KiB.
fn daemon_rss(bins: &Bins) -> Result<(u64, u64)> {
    const METRICS: &str = "127.0.0.1:9467";
    let dir = std::env::temp_dir().join(format!("kmodmon-bench-audit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = Command::new(&bins.kmodmon)
        .args(["run", "--stdout", "--metrics", METRICS, "--audit-dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting kmodmon run")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_ok(METRICS, "/ready") {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            stop(&mut child);
            bail!("kmodmon run did not become ready");
        }
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(child.id(), "VmRSS:").unwrap_or(0);
    output_of(Command::new(&bins.load).args(["storm", "4", "50000"]))?;
    thread::sleep(Duration::from_secs(2));
    let peak = rss_kib(child.id(), "VmHWM:").unwrap_or(0);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok((idle, peak))
}

/// Whether `GET path` on `addr` answers 200.
fn http_ok(addr: &str, path: &str) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = String::new();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .and_then(|_| s.read_to_string(&mut answer))
        .is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

fn uname_r() -> String {
    output_of(Command::new("uname").arg("-r"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn getppid_ns(bins: &Bins) -> Result<f64> {
    let out = output_of(Command::new(&bins.load).args(["getppid", "3000000"]))?;
    field(&out, "ns_per_call=")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("unexpected load output {out:?}"))
}

fn field(text: &str, key: &str) -> Option<String> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .map(str::to_string)
}

fn output_of(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `kmodmon tail` with stdout to /dev/null; returns once it says it is attached.
fn start_tail(kmodmon: &Path, extra: &[&str]) -> Result<(Child, String)> {
    let mut child = Command::new(kmodmon)
        .arg("tail")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kmodmon tail")?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("kmodmon: attached") {
            // Keep draining stderr so kmodmon never blocks on it.
            let (tx, rx) = std::sync::mpsc::channel();
            thread::spawn(move || {
                let rest: Vec<String> = lines.map_while(Result::ok).collect();
                let _ = tx.send(rest);
            });
            STDERR_TAILS.with(|t| t.borrow_mut().push((child.id(), rx)));
            return Ok((
                child,
                rest.trim_start_matches(|c: char| !c.is_alphabetic())
                    .to_string(),
            ));
        }
    }
    let status = child.wait()?;
    bail!("kmodmon exited before attaching: {status}")
}

type StderrRx = std::sync::mpsc::Receiver<Vec<String>>;

thread_local! {
    static STDERR_TAILS: std::cell::RefCell<Vec<(u32, StderrRx)>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn stop_with_summary(child: &mut Child) -> Result<serde_json::Value> {
    let id = child.id();
    stop(child);
    let rx = STDERR_TAILS
        .with(|t| {
            let mut t = t.borrow_mut();
            t.iter().position(|(p, _)| *p == id).map(|i| t.remove(i).1)
        })
        .ok_or_else(|| anyhow!("no stderr reader"))?;
    let lines = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    lines
        .iter()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .ok_or_else(|| anyhow!("no JSON summary from kmodmon: {lines:?}"))
}

fn start_bpftrace(bpftrace: &Path) -> Result<Child> {
    // The equivalent one-liner: every module syscall attempt with pid, comm and number.
    let prog = format!(
        "tracepoint:raw_syscalls:sys_enter /args->id == {} || args->id == {} || args->id == {}/ {{ printf(\"%d %s %d\\n\", pid, comm, args->id); }}",
        175, 313, 176
    );
    let mut child = Command::new(bpftrace)
        .arg("-e")
        .arg(prog)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting bpftrace")?;
    // bpftrace prints "Attaching 1 probe..." once attached.
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    thread::spawn(move || for _ in reader.lines() {});
    thread::sleep(Duration::from_millis(200));
    Ok(child)
}

fn rss_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}
