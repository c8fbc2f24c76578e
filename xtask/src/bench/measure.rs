//! The measurements `cargo xtask bench` and `bench-compare` share: storms against `tail` and
//! the daemon, syscall → JSON line latency (host process and runc container), start-up.
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use super::{Bins, field, output_of, rss_kib, start_tail, stop, stop_with_summary};

/// Attempts per storm thread, and threads.
pub const STORM_THREADS: u64 = 4;
pub const STORM_N: u64 = 50_000;
/// Attempts per latency measurement, and the gap between them.
pub const LATENCY_ATTEMPTS: u64 = 2000;
pub const LATENCY_GAP_US: u64 = 500;
/// Container latency: busybox `rmmod` processes, one every 2 ms.
const CONTAINER_ATTEMPTS: u64 = 400;

/// Which storm: the same name from every thread, or a name of its own for every attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storm {
    Identical,
    Distinct,
}

impl Storm {
    pub fn label(self) -> &'static str {
        match self {
            Storm::Identical => "identical",
            Storm::Distinct => "distinct names",
        }
    }
}

/// What one storm left: the generator's rate, the summary's numbers, peak RSS.
#[derive(Clone, Debug, Default)]
pub struct StormResult {
    pub rate: f64,
    pub seen: u64,
    pub delivered: u64,
    pub aggregated: u64,
    pub dropped: u64,
    pub queue_full: u64,
    pub in_flight_unread: u64,
    /// Repeat summaries' attempts reported, and aggregated attempts not reported.
    pub repeats: u64,
    pub repeats_unreported: u64,
    /// The first sink (stdout for tail, the audit log for the daemon): written, aggregated
    /// into rate-limit summaries, lost.
    pub written: u64,
    pub sink_aggregated: u64,
    pub sink_lost: u64,
    /// VmHWM in the storm, KiB (the high-water mark reset once attached).
    pub peak_kib: u64,
    /// VmHWM at start-up (attaching), KiB.
    pub startup_peak_kib: u64,
    pub identity_holds: bool,
}

impl StormResult {
    fn from_summary(
        s: &Value,
        rate: f64,
        (startup_peak_kib, peak_kib): (u64, u64),
        sink: &str,
    ) -> StormResult {
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        let sink = s["sinks"]
            .as_array()
            .and_then(|v| v.iter().find(|x| x["name"] == sink))
            .cloned()
            .unwrap_or(Value::Null);
        let sn = |k: &str| sink[k].as_u64().unwrap_or(0);
        let r = StormResult {
            rate,
            seen: n("seen"),
            delivered: n("delivered"),
            aggregated: n("aggregated"),
            dropped: n("dropped"),
            // Binaries from before the one pipeline (78f3a3c; c2d47ab is one) report their
            // reader's queue drops as `drops.userspace_queue_full`, not `queue_full`: missing
            // them made c2d47ab's distinct storm look 88 % recorded when it printed 40 %.
            queue_full: n("queue_full") + s["drops"]["userspace_queue_full"].as_u64().unwrap_or(0),
            in_flight_unread: n("in_flight") + n("unread"),
            repeats: n("repeats"),
            repeats_unreported: n("repeats_unreported"),
            // Older binaries: no per-sink figures, `printed` is what stdout got.
            written: sink["emitted"].as_u64().unwrap_or_else(|| n("printed")),
            sink_aggregated: sn("aggregated"),
            sink_lost: sn("lost_total"),
            peak_kib,
            startup_peak_kib,
            identity_holds: false,
        };
        StormResult {
            identity_holds: r.seen == r.delivered + r.aggregated + r.dropped + r.in_flight_unread,
            ..r
        }
    }

    /// Of the attempts the kernel saw, the share recorded by the sink — written one by one,
    /// or counted in a repeat summary or a rate-limit summary: all but the kernel's drops, the
    /// reader's queue drops, the sink's losses and what was still in flight at exit.
    pub fn recorded_pct(&self) -> f64 {
        if self.seen == 0 {
            return 0.0;
        }
        let lost = self.dropped
            + self.queue_full
            + self.sink_lost
            + self.in_flight_unread
            + self.repeats_unreported;
        100.0 * self.seen.saturating_sub(lost) as f64 / self.seen as f64
    }

    /// Audit-log loss: accepted by the audit sink but not written nor aggregated, in % of
    /// what it was offered.
    pub fn sink_lost_pct(&self) -> f64 {
        let offered = self.written + self.sink_aggregated + self.sink_lost;
        if offered == 0 {
            return 0.0;
        }
        100.0 * self.sink_lost as f64 / offered as f64
    }
}

fn storm_args(storm: Storm) -> Vec<String> {
    let mut a = vec![
        "storm".to_string(),
        STORM_THREADS.to_string(),
        STORM_N.to_string(),
    ];
    if storm == Storm::Distinct {
        a.push("distinct".into());
    }
    a
}

/// The start-up high-water mark of `pid`, which is then reset (`clear_refs` 5), so that the
/// next reading is the peak of what follows.
fn reset_peak(pid: u32) -> u64 {
    let startup = rss_kib(pid, "VmHWM:").unwrap_or(0);
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    startup
}

/// A storm against `tail --json > /dev/null`.
pub fn storm_tail(kmodmon: &Path, bins: &Bins, storm: Storm) -> Result<StormResult> {
    let (mut child, _) = start_tail(kmodmon, &["--json"])?;
    std::thread::sleep(Duration::from_millis(300));
    let startup = reset_peak(child.id());
    let out = output_of(Command::new(&bins.load).args(storm_args(storm)))?;
    // The sweep reports the last bursts 200 ms after their threads exit.
    std::thread::sleep(Duration::from_millis(800));
    let peak = (startup, rss_kib(child.id(), "VmHWM:").unwrap_or(0));
    let summary = stop_with_summary(&mut child)?;
    let rate = field(&out, "rate=")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0.0);
    Ok(StormResult::from_summary(
        &summary["summary"],
        rate,
        peak,
        "stdout",
    ))
}

/// `kmodmon run` with the audit log (and metrics, for /ready); `rate_limit` 0 turns the
/// audit sink's per-cgroup limit off, None leaves kmodmon's default. Returns the child and its
/// stderr lines.
pub fn start_daemon(
    kmodmon: &Path,
    dir: &Path,
    rate_limit: Option<u32>,
) -> Result<(Child, std::sync::mpsc::Receiver<String>, Duration)> {
    let _ = std::fs::remove_dir_all(dir);
    // A binary from before the rate limiter (bench-compare against an older kmodmon) has no
    // limit to turn off; asking it for one only works where it exists.
    let mut args = vec!["run".to_string()];
    match rate_limit {
        None => {}
        Some(limit) if supports(kmodmon, "run", "--audit-rate-limit") => {
            args.extend(["--audit-rate-limit".to_string(), limit.to_string()]);
        }
        Some(0) => {}
        Some(_) => {
            bail!(
                "{} has no --audit-rate-limit: it cannot be measured with the limit on",
                kmodmon.display()
            );
        }
    }
    args.push("--audit-dir".into());
    let t0 = Instant::now();
    let mut child = Command::new(kmodmon)
        .args(&args)
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kmodmon run")?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut said = Vec::new();
    loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            stop(&mut child);
            bail!(
                "{} run did not start; it said:\n{}",
                kmodmon.display(),
                said.join("\n")
            );
        };
        if line.contains("started; attached") {
            return Ok((child, rx, t0.elapsed()));
        }
        said.push(line);
    }
}

/// Whether `kmodmon SUBCOMMAND --help` lists `flag`.
fn supports(kmodmon: &Path, subcommand: &str, flag: &str) -> bool {
    Command::new(kmodmon)
        .args([subcommand, "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
}

/// A storm against the daemon writing its audit log (in a directory on /var/tmp: tmpfs would
/// make fsync free).
pub fn storm_daemon(
    kmodmon: &Path,
    bins: &Bins,
    storm: Storm,
    rate_limit: u32,
) -> Result<StormResult> {
    let dir = audit_dir();
    let (mut child, rx, _) = start_daemon(kmodmon, &dir, Some(rate_limit))?;
    std::thread::sleep(Duration::from_millis(500));
    let startup = reset_peak(child.id());
    let out = output_of(Command::new(&bins.load).args(storm_args(storm)))?;
    std::thread::sleep(Duration::from_secs(2));
    let peak = (startup, rss_kib(child.id(), "VmHWM:").unwrap_or(0));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let summary = rx
        .iter()
        .find_map(|l| {
            serde_json::from_str::<Value>(&l)
                .ok()
                .filter(|v| v.get("summary").is_some())
        })
        .ok_or_else(|| anyhow!("no JSON summary from kmodmon run"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let rate = field(&out, "rate=")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0.0);
    Ok(StormResult::from_summary(
        &summary["summary"],
        rate,
        peak,
        "audit",
    ))
}

pub fn audit_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(format!(
        "/var/tmp/kmodmon-bench-audit-{}",
        std::process::id()
    ))
}

/// CLOCK_MONOTONIC now, in ns (the clock of the events' ktime_ns).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
    })
}

/// Starts `tail --json` and a thread collecting, for every line whose module starts with
/// `prefix`, the time from the event's kernel timestamp to the line's arrival (µs).
fn latency_tail(
    kmodmon: &Path,
    prefix: String,
) -> Result<(Child, std::thread::JoinHandle<Vec<f64>>)> {
    let mut child = Command::new(kmodmon)
        .args(["tail", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kmodmon tail --json")?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let mut err_lines = BufReader::new(stderr).lines();
    for line in err_lines.by_ref() {
        if line?.starts_with("kmodmon: attached") {
            break;
        }
    }
    std::thread::spawn(move || for _ in err_lines {});
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let reader = std::thread::spawn(move || {
        let mut lat = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let now = monotonic_ns();
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["module"].as_str().is_some_and(|m| m.starts_with(&prefix))
                && let Some(k) = v["ktime_ns"].as_u64()
            {
                lat.push(now.saturating_sub(k) as f64 / 1000.0);
            }
        }
        lat
    });
    Ok((child, reader))
}

fn percentiles(mut lat: Vec<f64>, expected: u64) -> Result<(f64, f64)> {
    if lat.len() < (expected as usize) / 2 {
        bail!("only {} of {expected} events arrived", lat.len());
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    Ok((at(0.5), at(0.99)))
}

/// Paced attempts from a host process while `tail --json` runs: (p50, p99) µs.
pub fn latency_host(kmodmon: &Path, bins: &Bins) -> Result<(f64, f64)> {
    let prefix = format!("kmodmon_bench_lat_{}", std::process::id());
    let (mut child, reader) = latency_tail(kmodmon, prefix.clone())?;
    output_of(Command::new(&bins.load).args([
        "paced",
        &LATENCY_ATTEMPTS.to_string(),
        &LATENCY_GAP_US.to_string(),
        &prefix,
    ]))?;
    std::thread::sleep(Duration::from_millis(300));
    stop(&mut child);
    let lat = reader
        .join()
        .map_err(|_| anyhow!("latency reader panicked"))?;
    percentiles(lat, LATENCY_ATTEMPTS)
}

/// The same for attempts made in a container that runc runs (busybox `rmmod`, a process
/// each, one every 2 ms; cgroup laid out like Docker's): (p50, p99) µs.
pub fn latency_container(kmodmon: &Path) -> Result<(f64, f64)> {
    let prefix = format!("kmodmon_bench_ctr_{}", std::process::id());
    let bundle = RuncBundle::new(&format!(
        "i=0; while [ $i -lt {CONTAINER_ATTEMPTS} ]; do rmmod {prefix}_$i; usleep 2000; i=$((i+1)); done"
    ))?;
    let (mut child, reader) = latency_tail(kmodmon, prefix)?;
    let run = bundle.run();
    std::thread::sleep(Duration::from_millis(300));
    stop(&mut child);
    run?;
    let lat = reader
        .join()
        .map_err(|_| anyhow!("latency reader panicked"))?;
    percentiles(lat, CONTAINER_ATTEMPTS)
}

/// A busybox container for runc running one shell command.
struct RuncBundle {
    dir: std::path::PathBuf,
    name: String,
}

impl RuncBundle {
    fn new(script: &str) -> Result<RuncBundle> {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| anyhow!("busybox-static is not installed (`cargo xtask setup`)"))?;
        let id: String = format!("{:016x}", monotonic_ns()).repeat(4);
        let dir = std::env::temp_dir().join(format!("kmodmon-bench-ctr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bin = dir.join("rootfs/bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::copy(busybox, bin.join("busybox"))?;
        for applet in ["sh", "rmmod", "usleep"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet))?;
        }
        output_of(Command::new("runc").arg("spec").current_dir(&dir))?;
        let cfg_path = dir.join("config.json");
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path)?)?;
        cfg["process"]["terminal"] = Value::Bool(false);
        cfg["process"]["args"] = serde_json::json!(["/bin/sh", "-c", script]);
        cfg["root"]["readonly"] = Value::Bool(false);
        cfg["linux"]["cgroupsPath"] = Value::from(format!("/docker/{id}"));
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
        Ok(RuncBundle {
            dir,
            name: format!("kmodmon-bench-{}", &id[..12]),
        })
    }

    fn run(&self) -> Result<()> {
        let out = Command::new("runc")
            .args(["run", "--bundle"])
            .arg(&self.dir)
            .arg(&self.name)
            .stdin(Stdio::null())
            .output()
            .context("runc run")?;
        let _ = Command::new("runc")
            .args(["delete", "-f", &self.name])
            .output();
        if !out.status.success() {
            bail!("runc run failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for RuncBundle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Spawn → "attached" of `tail`, ms; and RSS (KiB) 200 ms later.
pub fn startup(kmodmon: &Path) -> Result<(f64, u64)> {
    let t0 = Instant::now();
    let (mut child, _) = start_tail(kmodmon, &[])?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_millis(200));
    let rss = rss_kib(child.id(), "VmRSS:").unwrap_or(0);
    stop(&mut child);
    Ok((ms, rss))
}

/// The daemon's idle RSS (KiB), a second after it started.
pub fn daemon_idle(kmodmon: &Path) -> Result<u64> {
    let dir = audit_dir();
    let (mut child, _rx, _) = start_daemon(kmodmon, &dir, None)?;
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_kib(child.id(), "VmRSS:").unwrap_or(0);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rss)
}
