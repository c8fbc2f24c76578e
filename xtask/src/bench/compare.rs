//! `cargo xtask bench-compare OTHER`: this tree's kmodmon and another kmodmon binary (an older
//! release, a branch) measured side by side in one run. Every measurement alternates the two
//! binaries round by round (A B, then B A, ...) and reports medians with min–max, so a machine
//! that gets busier during the run affects both alike.
//!
//! Measured: the cost of an unrelated syscall (getppid) with each attached; the latency from a
//! module syscall to its JSON line on `tail --json`'s stdout (p50, p99); a storm's delivery
//! (4 threads × 50,000 delete_module attempts: delivered and dropped); RSS idle and peak.
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{Bins, field, median, output_of, rss_kib, start_tail, stop, stop_with_summary};
use crate::util::{is_root, workspace_root};

/// Attempts per latency round, and the gap between them.
const LATENCY_ATTEMPTS: u64 = 2000;
const LATENCY_GAP_US: u64 = 500;

#[derive(Default)]
struct Figures {
    getppid_ns: Vec<f64>,
    lat_p50_us: Vec<f64>,
    lat_p99_us: Vec<f64>,
    storm_delivered_pct: Vec<f64>,
    rss_idle_mb: Vec<f64>,
    rss_peak_mb: Vec<f64>,
}

pub fn bench_compare(other: &Path, rounds: usize) -> Result<()> {
    crate::setup::setup()?;
    if !is_root() {
        bail!("the benchmarks load eBPF programs: run as root");
    }
    let other = other
        .canonicalize()
        .with_context(|| format!("{}: no such kmodmon binary", other.display()))?;
    let bins = super::build_bins()?;
    let sides: [(&str, PathBuf); 2] = [("this tree", bins.kmodmon.clone()), ("other", other)];
    let mut figs: [Figures; 2] = Default::default();
    let mut none = Vec::new();
    for r in 0..rounds {
        none.push(super::getppid_ns(&bins)?);
        // A B in even rounds, B A in odd ones.
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let kmodmon = &sides[i].1;
            let f = &mut figs[i];
            let (mut child, _) = start_tail(kmodmon, &[])?;
            f.getppid_ns.push(super::getppid_ns(&bins)?);
            stop(&mut child);
            let (p50, p99) = latency(kmodmon, &bins)?;
            f.lat_p50_us.push(p50);
            f.lat_p99_us.push(p99);
            let (pct, idle, peak) = storm(kmodmon, &bins)?;
            f.storm_delivered_pct.push(pct);
            f.rss_idle_mb.push(idle);
            f.rss_peak_mb.push(peak);
        }
        eprintln!("bench-compare: round {} of {rounds} done", r + 1);
    }
    let mut report = String::new();
    let mut say = |line: String| {
        println!("{line}");
        report.push_str(&line);
        report.push('\n');
    };
    say(format!(
        "# kmodmon side by side ({rounds} interleaved rounds, kernel {})\n",
        super::uname_r()
    ));
    say(format!(
        "A = this tree ({}), B = {}\n",
        sides[0].1.display(),
        sides[1].1.display()
    ));
    say("| measurement | A median (min–max) | B median (min–max) | A / B |".into());
    say("|---|---|---|---|".into());
    let none_m = median(&mut none.clone());
    say(format!(
        "| getppid, no monitor (ns/call) | {} | | |",
        spread(&mut none)
    ));
    let [a, b] = &mut figs;
    let rows: [(&str, &mut Vec<f64>, &mut Vec<f64>); 6] = [
        (
            "getppid with tail attached (ns/call)",
            &mut a.getppid_ns,
            &mut b.getppid_ns,
        ),
        (
            "syscall → JSON line p50 (µs)",
            &mut a.lat_p50_us,
            &mut b.lat_p50_us,
        ),
        (
            "syscall → JSON line p99 (µs)",
            &mut a.lat_p99_us,
            &mut b.lat_p99_us,
        ),
        (
            "storm: delivered (% of seen)",
            &mut a.storm_delivered_pct,
            &mut b.storm_delivered_pct,
        ),
        ("RSS idle (MB)", &mut a.rss_idle_mb, &mut b.rss_idle_mb),
        (
            "RSS peak in the storm (MB)",
            &mut a.rss_peak_mb,
            &mut b.rss_peak_mb,
        ),
    ];
    for (name, va, vb) in rows {
        let ma = median(&mut va.clone());
        let mb = median(&mut vb.clone());
        say(format!(
            "| {name} | {} | {} | {:.2} |",
            spread(va),
            spread(vb),
            if mb == 0.0 { f64::NAN } else { ma / mb }
        ));
    }
    say(format!(
        "\ngetppid ratio to no monitor: A {:.2}, B {:.2}",
        median(&mut a.getppid_ns.clone()) / none_m,
        median(&mut b.getppid_ns.clone()) / none_m
    ));
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("compare.md"), report)?;
    println!("\n(written to {})", dir.join("compare.md").display());
    Ok(())
}

/// "median (min–max)".
fn spread(v: &mut [f64]) -> String {
    let m = median(v);
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.1} ({lo:.1}–{hi:.1})")
}

/// CLOCK_MONOTONIC now, in ns (the clock of the events' ktime_ns).
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
    })
}

/// Paced attempts while `tail --json` runs: (p50, p99) of the time from each event's kernel
/// timestamp to its line arriving here, in µs.
fn latency(kmodmon: &Path, bins: &Bins) -> Result<(f64, f64)> {
    let name = format!("kmodmon_bench_lat_{}", std::process::id());
    let mut child = Command::new(kmodmon)
        .args(["tail", "--json", "--module", &name])
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
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(k) = v["ktime_ns"].as_u64()
            {
                lat.push(now.saturating_sub(k) as f64 / 1000.0);
            }
        }
        lat
    });
    let out = output_of(Command::new(&bins.load).args([
        "paced",
        &LATENCY_ATTEMPTS.to_string(),
        &LATENCY_GAP_US.to_string(),
        &name,
    ]))?;
    if field(&out, "attempts=").is_none() {
        bail!("unexpected load output {out:?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    stop(&mut child);
    let mut lat = reader
        .join()
        .map_err(|_| anyhow!("latency reader panicked"))?;
    if lat.len() < (LATENCY_ATTEMPTS as usize) / 2 {
        bail!("only {} of {LATENCY_ATTEMPTS} events arrived", lat.len());
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    Ok((at(0.5), at(0.99)))
}

/// A storm against `tail --json > /dev/null`: (delivered % of seen, RSS idle MB, VmHWM MB).
fn storm(kmodmon: &Path, bins: &Bins) -> Result<(f64, f64, f64)> {
    let (mut child, _) = start_tail(kmodmon, &["--json"])?;
    std::thread::sleep(Duration::from_millis(300));
    let idle = rss_kib(child.id(), "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    let t0 = Instant::now();
    output_of(Command::new(&bins.load).args(["storm", "4", "50000"]))?;
    std::thread::sleep(Duration::from_millis(500).saturating_sub(t0.elapsed() / 10));
    let peak = rss_kib(child.id(), "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    let summary = stop_with_summary(&mut child)?;
    let n = |k: &str| summary["summary"][k].as_u64().unwrap_or(0) as f64;
    let pct = if n("seen") > 0.0 {
        100.0 * n("delivered") / n("seen")
    } else {
        0.0
    };
    Ok((pct, idle, peak))
}
