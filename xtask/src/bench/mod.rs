//! `cargo xtask bench`: measurements paired in one run, reported as ratios (the machines are
//! shared and noisy). Results go to stdout and target/bench/host.md.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::util::{is_root, run as run_cmd, workspace_root};

mod compare;
mod measure;
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

/// The monitors whose cost to an unrelated syscall is measured, each round in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Monitor {
    None,
    Tail,
    Bpftrace,
    Auditd,
}

impl Monitor {
    fn label(self) -> &'static str {
        match self {
            Monitor::None => "none",
            Monitor::Tail => "kmodmon tail",
            Monitor::Bpftrace => "bpftrace one-liner (raw_syscalls:sys_enter, filtered)",
            Monitor::Auditd => "auditd rule -S init_module,finit_module,delete_module",
        }
    }
}

/// getppid ns/call with `m` attached.
fn getppid_with(m: Monitor, bins: &Bins, source: &mut String) -> Result<f64> {
    match m {
        Monitor::None => getppid_ns(bins),
        Monitor::Tail => {
            let (mut child, attached) = start_tail(&bins.kmodmon, &[])?;
            *source = attached;
            let r = getppid_ns(bins);
            stop(&mut child);
            r
        }
        Monitor::Bpftrace => {
            let bt = which::which("bpftrace")?;
            let mut child = start_bpftrace(&bt)?;
            let r = getppid_ns(bins);
            stop(&mut child);
            r
        }
        Monitor::Auditd => {
            let _rule = AuditRule::add()?;
            getppid_ns(bins)
        }
    }
}

/// auditd's module rule, loaded with auditctl (audit enabled meanwhile); removed on drop.
struct AuditRule {
    was_enabled: bool,
}

const AUDIT_RULE: [&str; 7] = [
    "always,exit",
    "-F",
    "arch=b64",
    "-S",
    "init_module,finit_module,delete_module",
    "-k",
    "kmodmon-bench",
];

impl AuditRule {
    fn usable() -> bool {
        which::which("auditctl").is_ok()
            && Command::new("auditctl")
                .arg("-s")
                .output()
                .is_ok_and(|o| o.status.success())
    }

    fn add() -> Result<AuditRule> {
        let status = output_of(Command::new("auditctl").arg("-s"))?;
        let was_enabled = status.lines().any(|l| l.trim() == "enabled 1");
        output_of(Command::new("auditctl").args(["-e", "1"]))?;
        output_of(Command::new("auditctl").arg("-a").args(AUDIT_RULE))?;
        Ok(AuditRule { was_enabled })
    }
}

impl Drop for AuditRule {
    fn drop(&mut self) {
        let _ = Command::new("auditctl").arg("-d").args(AUDIT_RULE).output();
        if !self.was_enabled {
            let _ = Command::new("auditctl").args(["-e", "0"]).output();
        }
    }
}

/// "median (min–max)".
pub(crate) fn spread(v: &[f64]) -> String {
    if v.is_empty() {
        return "not measured".into();
    }
    let m = median(&mut v.to_vec());
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.1} ({lo:.1}–{hi:.1})")
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
        "# kmodmon host benchmark ({} rounds, kernel {}, load average {})\n",
        rounds,
        uname_r(),
        loadavg()
    ));
    // 1. Unrelated-syscall cost: every monitor once per round, the order rotated each round.
    let mut monitors = vec![Monitor::None, Monitor::Tail];
    if which::which("bpftrace").is_ok() {
        monitors.push(Monitor::Bpftrace);
    }
    if AuditRule::usable() {
        monitors.push(Monitor::Auditd);
    }
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); monitors.len()];
    let mut source = String::new();
    for r in 0..rounds {
        for k in 0..monitors.len() {
            let i = (k + r) % monitors.len();
            ns[i].push(getppid_with(monitors[i], &bins, &mut source)?);
        }
        eprintln!("bench: getppid round {} of {rounds} done", r + 1);
    }
    say("## Unrelated-syscall cost: getppid(), 3,000,000 calls per measurement\n".into());
    say(format!("kmodmon attached as: `{source}`\n"));
    say(
        "| monitor | ns/call: median (min–max) | ratio of medians | per-round ratio: median (min–max) |"
            .into(),
    );
    say("|---|---|---|---|".into());
    let base = median(&mut ns[0].clone());
    for (i, m) in monitors.iter().enumerate() {
        let ratios: Vec<f64> = ns[i].iter().zip(&ns[0]).map(|(a, b)| a / b).collect();
        say(format!(
            "| {} | {} | {:.2} | {} |",
            m.label(),
            spread(&ns[i]),
            median(&mut ns[i].clone()) / base,
            spread(&ratios)
        ));
    }
    for (m, why) in [
        (Monitor::Bpftrace, "bpftrace is not installed"),
        (Monitor::Auditd, "auditctl is not usable here"),
    ] {
        if !monitors.contains(&m) {
            say(format!("\n({}: {why})", m.label()));
        }
    }

    // 2. Storms, interleaved per round: tail and the daemon (audit log, limit off and on).
    use measure::{Storm, StormResult};
    let cases: [(&str, Storm, Option<u32>); 5] = [
        ("tail --json", Storm::Identical, None),
        ("run, audit log", Storm::Identical, Some(0)),
        ("tail --json", Storm::Distinct, None),
        ("run, audit log, rate limit off", Storm::Distinct, Some(0)),
        ("run, audit log, rate limit 20/s", Storm::Distinct, Some(20)),
    ];
    let mut storms: Vec<Vec<StormResult>> = vec![Vec::new(); cases.len()];
    for r in 0..rounds {
        for k in 0..cases.len() {
            let i = (k + r) % cases.len();
            let (_, storm, limit) = cases[i];
            storms[i].push(match limit {
                None => measure::storm_tail(&bins.kmodmon, &bins, storm)?,
                Some(l) => measure::storm_daemon(&bins.kmodmon, &bins, storm, l)?,
            });
        }
        eprintln!("bench: storm round {} of {rounds} done", r + 1);
    }
    say(format!(
        "\n## Storms: {} threads × {} delete_module attempts (medians over rounds, min–max)\n",
        measure::STORM_THREADS,
        measure::STORM_N
    ));
    say("| storm | consumer | attempts/s | kernel saw | delivered | aggregated (in repeat summaries) | dropped (kernel) | queue full (userspace) | sink wrote | sink aggregated (rate limit) | sink lost % | recorded % | identity | peak RSS MB |".into());
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|".into());
    for (i, (consumer, storm, _)) in cases.iter().enumerate() {
        let v = &storms[i];
        let f = |g: fn(&StormResult) -> f64| spread(&v.iter().map(g).collect::<Vec<_>>());
        let aggregated = format!(
            "{} ({})",
            f(|r| r.aggregated as f64),
            f(|r| r.repeats as f64)
        );
        say(format!(
            "| {} | {consumer} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            storm.label(),
            f(|r| r.rate),
            f(|r| r.seen as f64),
            f(|r| r.delivered as f64),
            aggregated,
            f(|r| r.dropped as f64),
            f(|r| r.queue_full as f64),
            f(|r| r.written as f64),
            f(|r| r.sink_aggregated as f64),
            f(|r| r.sink_lost_pct()),
            f(|r| r.recorded_pct()),
            if v.iter().all(|r| r.identity_holds) {
                "holds"
            } else {
                "BROKEN"
            },
            f(|r| r.peak_kib as f64 / 1024.0),
        ));
    }

    // 3. Latency, host process and runc container, interleaved.
    let mut host = (Vec::new(), Vec::new());
    let mut ctr = (Vec::new(), Vec::new());
    let runc = which::which("runc").is_ok();
    for r in 0..rounds {
        let (p50, p99) = measure::latency_host(&bins.kmodmon, &bins)?;
        host.0.push(p50);
        host.1.push(p99);
        if runc {
            let (p50, p99) = measure::latency_container(&bins.kmodmon)?;
            ctr.0.push(p50);
            ctr.1.push(p99);
        }
        eprintln!("bench: latency round {} of {rounds} done", r + 1);
    }
    say(format!(
        "\n## Latency: syscall → JSON line on `tail --json`'s stdout (µs; medians over rounds, min–max)\n\n\
         Host: {} paced delete_module attempts, {} µs apart, distinct names. Container: busybox \
         `rmmod` in a container run by runc (no other engine runs here), a process each, 2 ms apart.\n",
        measure::LATENCY_ATTEMPTS,
        measure::LATENCY_GAP_US
    ));
    say("| attempts from | p50 | p99 |".into());
    say("|---|---|---|".into());
    say(format!(
        "| host process | {} | {} |",
        spread(&host.0),
        spread(&host.1)
    ));
    if runc {
        say(format!(
            "| runc container | {} | {} |",
            spread(&ctr.0),
            spread(&ctr.1)
        ));
    } else {
        say("| runc container | runc not installed | |".into());
    }

    // 4. Start-up and memory.
    let mut attach = Vec::new();
    let mut tail_idle = Vec::new();
    let mut daemon_idle = Vec::new();
    for _ in 0..rounds.max(5) {
        let (ms, rss) = measure::startup(&bins.kmodmon)?;
        attach.push(ms);
        tail_idle.push(rss as f64 / 1024.0);
        daemon_idle.push(measure::daemon_idle(&bins.kmodmon)? as f64 / 1024.0);
    }
    let peak = |i: usize| {
        storms[i]
            .iter()
            .map(|r| r.peak_kib as f64 / 1024.0)
            .collect::<Vec<_>>()
    };
    say("\n## Start-up and memory (medians, min–max)\n".into());
    say("| metric | value |\n|---|---|".into());
    say(format!(
        "| spawn → attached (tail) | {} ms |",
        spread(&attach)
    ));
    say(format!("| RSS idle, tail | {} MB |", spread(&tail_idle)));
    say(format!(
        "| RSS idle, run (audit log) | {} MB |",
        spread(&daemon_idle)
    ));
    let startup_peak: Vec<f64> = storms
        .iter()
        .flatten()
        .map(|r| r.startup_peak_kib as f64 / 1024.0)
        .collect();
    say(format!(
        "| RSS peak while attaching (VmHWM before the storms) | {} MB |",
        spread(&startup_peak)
    ));
    for (i, (consumer, storm, _)) in cases.iter().enumerate() {
        say(format!(
            "| RSS peak in the storm (VmHWM reset once attached), {consumer}, {} storm | {} MB |",
            storm.label(),
            spread(&peak(i))
        ));
    }
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("host.md"), report)?;
    println!("\n(written to {})", dir.join("host.md").display());
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
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
