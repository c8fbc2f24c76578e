//! `cargo xtask bench-compare OTHER`: this tree's kmodmon and another kmodmon binary (an older
//! release, a branch) measured side by side in one run. Every measurement alternates the two
//! binaries round by round (A B, then B A, ...) and reports medians with min–max, so a machine
//! that gets busier during the run affects both alike.
//!
//! Measured: the cost of an unrelated syscall (getppid) with each attached; the latency from a
//! module syscall to its JSON line on `tail --json`'s stdout (p50, p99); storms of 4 threads ×
//! 50,000 delete_module attempts, identical and with distinct names, against `tail` and (distinct
//! names) against the daemon's audit log with its rate limit off; start-up; RSS idle and peak.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use super::measure::{self, Storm, StormResult};
use super::{Bins, median, spread, start_tail, stop};
use crate::util::{is_root, workspace_root};

#[derive(Default)]
struct Figures {
    getppid_ns: Vec<f64>,
    lat_p50_us: Vec<f64>,
    lat_p99_us: Vec<f64>,
    identical_recorded: Vec<f64>,
    identical_dropped: Vec<f64>,
    distinct_recorded: Vec<f64>,
    distinct_written: Vec<f64>,
    audit_lost_pct: Vec<f64>,
    audit_recorded: Vec<f64>,
    attach_ms: Vec<f64>,
    rss_idle_mb: Vec<f64>,
    rss_peak_mb: Vec<f64>,
}

fn one_side(kmodmon: &Path, bins: &Bins, f: &mut Figures) -> Result<()> {
    let (mut child, _) = start_tail(kmodmon, &[])?;
    f.getppid_ns.push(super::getppid_ns(bins)?);
    stop(&mut child);
    let (p50, p99) = measure::latency_host(kmodmon, bins)?;
    f.lat_p50_us.push(p50);
    f.lat_p99_us.push(p99);
    let r: StormResult = measure::storm_tail(kmodmon, bins, Storm::Identical)?;
    f.identical_recorded.push(r.recorded_pct());
    f.identical_dropped.push(r.dropped as f64);
    let r = measure::storm_tail(kmodmon, bins, Storm::Distinct)?;
    f.distinct_recorded.push(r.recorded_pct());
    // The same from the other end: lines the sink wrote (no repeats in a distinct storm).
    f.distinct_written
        .push(100.0 * r.written as f64 / r.seen.max(1) as f64);
    f.rss_peak_mb.push(r.peak_kib as f64 / 1024.0);
    // An older kmodmon's daemon may not say what it delivered (no JSON summary): that side's
    // audit rows then read "not measured", and the rest of the comparison stands.
    match measure::storm_daemon(kmodmon, bins, Storm::Distinct, 0) {
        Ok(r) => {
            f.audit_lost_pct.push(r.sink_lost_pct());
            f.audit_recorded.push(r.recorded_pct());
        }
        Err(e) => eprintln!(
            "bench-compare: {}: daemon storm not measured: {e:#}",
            kmodmon.display()
        ),
    }
    let (ms, rss) = measure::startup(kmodmon)?;
    f.attach_ms.push(ms);
    f.rss_idle_mb.push(rss as f64 / 1024.0);
    Ok(())
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
            one_side(&sides[i].1, &bins, &mut figs[i])?;
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
        spread(&none)
    ));
    let [a, b] = &mut figs;
    let rows: [(&str, &Vec<f64>, &Vec<f64>); 12] = [
        (
            "getppid with tail attached (ns/call)",
            &a.getppid_ns,
            &b.getppid_ns,
        ),
        ("syscall → JSON line p50 (µs)", &a.lat_p50_us, &b.lat_p50_us),
        ("syscall → JSON line p99 (µs)", &a.lat_p99_us, &b.lat_p99_us),
        (
            "identical storm, tail: recorded (% of seen)",
            &a.identical_recorded,
            &b.identical_recorded,
        ),
        (
            "identical storm, tail: dropped in the kernel",
            &a.identical_dropped,
            &b.identical_dropped,
        ),
        (
            "distinct storm, tail: recorded (% of seen)",
            &a.distinct_recorded,
            &b.distinct_recorded,
        ),
        (
            "distinct storm, tail: lines written (% of seen)",
            &a.distinct_written,
            &b.distinct_written,
        ),
        (
            "distinct storm, run: audit sink lost (%)",
            &a.audit_lost_pct,
            &b.audit_lost_pct,
        ),
        (
            "distinct storm, run: in the audit log (% of seen)",
            &a.audit_recorded,
            &b.audit_recorded,
        ),
        ("spawn → attached (ms)", &a.attach_ms, &b.attach_ms),
        ("RSS idle (MB)", &a.rss_idle_mb, &b.rss_idle_mb),
        (
            "RSS peak in the distinct storm, tail (MB)",
            &a.rss_peak_mb,
            &b.rss_peak_mb,
        ),
    ];
    for (name, va, vb) in rows {
        let ma = median(&mut va.clone());
        let mb = median(&mut vb.clone());
        let ratio = if va.is_empty() || vb.is_empty() || mb == 0.0 {
            "–".to_string()
        } else {
            format!("{:.2}", ma / mb)
        };
        say(format!(
            "| {name} | {} | {} | {ratio} |",
            spread(va),
            spread(vb)
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
