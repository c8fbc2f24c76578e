//! `cargo xtask bench-seccomp`: what reporting module syscalls refused by seccomp costs every
//! other syscall, for a task under a seccomp filter and for one without, side by side in one
//! run. Each round starts each monitor once, in a rotating order (none, `kmodmon tail`,
//! `kmodmon tail --no-seccomp-attempts`), and measures under it `kmodmon-load getppid` both
//! unconfined and confined by `kmodmon-load seccomp errno` (the module syscalls refused with
//! EPERM, everything else allowed), the order alternating by round. Reported per monitor and
//! task: the median ns per call over rounds, and the median (min–max) over rounds of the ratio
//! to no monitor for the same task in the same round.
use std::{path::Path, process::Command};

use anyhow::{Result, anyhow, bail};

use super::{Bins, build_bins, field, output_of, start_tail, stop};
use crate::util::{is_root, workspace_root};

const CALLS: &str = "3000000";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Monitor {
    None,
    Kmodmon,
    KmodmonOff,
}

impl Monitor {
    const ALL: [Monitor; 3] = [Monitor::None, Monitor::Kmodmon, Monitor::KmodmonOff];

    fn label(self) -> &'static str {
        match self {
            Monitor::None => "none",
            Monitor::Kmodmon => "kmodmon tail",
            Monitor::KmodmonOff => "kmodmon tail --no-seccomp-attempts",
        }
    }
}

fn getppid(bins: &Bins, confined: bool) -> Result<f64> {
    let mut cmd = Command::new(&bins.load);
    if confined {
        cmd.args(["seccomp", "errno"]).arg(&bins.load);
    }
    let out = output_of(cmd.args(["getppid", CALLS]))?;
    field(&out, "ns_per_call=")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("unexpected load output {out:?}"))
}

/// (unconfined, confined) ns per call under `m`, in the order `round` gives.
fn measure(bins: &Bins, kmodmon: &Path, m: Monitor, round: usize) -> Result<(f64, f64, String)> {
    let mut tail = match m {
        Monitor::None => None,
        Monitor::Kmodmon => Some(start_tail(kmodmon, &[])?),
        Monitor::KmodmonOff => Some(start_tail(kmodmon, &["--no-seccomp-attempts"])?),
    };
    let attached = tail.as_ref().map(|t| t.1.clone()).unwrap_or_default();
    let result = if round.is_multiple_of(2) {
        getppid(bins, false).and_then(|u| Ok((u, getppid(bins, true)?)))
    } else {
        getppid(bins, true).and_then(|c| Ok((getppid(bins, false)?, c)))
    };
    if let Some((child, _)) = &mut tail {
        stop(child);
    }
    let (u, c) = result?;
    Ok((u, c, attached))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn bench_seccomp(rounds: usize) -> Result<()> {
    crate::setup::setup()?;
    if !is_root() {
        bail!("the benchmark loads eBPF programs: run as root");
    }
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let bins = build_bins()?;
    // [monitor][task: 0 unconfined, 1 confined][round]
    let mut ns = vec![[Vec::new(), Vec::new()]; Monitor::ALL.len()];
    let mut attached = String::new();
    for round in 0..rounds {
        for k in 0..Monitor::ALL.len() {
            let i = (round + k) % Monitor::ALL.len();
            let (u, c, a) = measure(&bins, &bins.kmodmon, Monitor::ALL[i], round)?;
            if Monitor::ALL[i] == Monitor::Kmodmon {
                attached = a;
            }
            ns[i][0].push(u);
            ns[i][1].push(c);
        }
    }
    let mut report = String::new();
    let mut say = |line: String| {
        println!("{line}");
        report.push_str(&line);
        report.push('\n');
    };
    say(format!(
        "# Seccomp-refused attempts: cost per getppid ({rounds} rounds × {CALLS} calls, kernel {})\n",
        super::uname_r()
    ));
    say(format!("kmodmon attached as: `{attached}`\n"));
    say(
        "| monitor | task | ns/call (median) | ratio to none, same task (median, min–max) |".into(),
    );
    say("|---|---|---|---|".into());
    for (i, m) in Monitor::ALL.iter().enumerate() {
        for (t, task) in ["unconfined", "seccomp-confined"].iter().enumerate() {
            let ratios: Vec<f64> = ns[i][t]
                .iter()
                .zip(&ns[0][t])
                .map(|(x, base)| x / base)
                .collect();
            let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let ratio = if *m == Monitor::None {
                "1".to_string()
            } else {
                format!("{:.2} ({lo:.2}–{hi:.2})", median(&ratios))
            };
            say(format!(
                "| {} | {task} | {:.1} | {ratio} |",
                m.label(),
                median(&ns[i][t])
            ));
        }
    }
    let per_round = |i: usize, t: usize| -> String {
        ns[i][t]
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    say("\nPer round (ns/call):".into());
    for (i, m) in Monitor::ALL.iter().enumerate() {
        say(format!(
            "- {}: unconfined {}; confined {}",
            m.label(),
            per_round(i, 0),
            per_round(i, 1)
        ));
    }
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("seccomp.md"), report)?;
    println!("\n(written to {})", dir.join("seccomp.md").display());
    Ok(())
}
