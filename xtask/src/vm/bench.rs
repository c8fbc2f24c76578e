//! `cargo xtask vm-bench [--kernel K]`: what module monitoring costs an unrelated syscall.
//! tests/vm/bench/bench.sh runs a getppid loop (tests/vm/bench/getppid.rs) with no monitor,
//! with kmodmon, with kmodmon forced onto raw_syscalls, and with auditd's module rule, in
//! rounds within one boot; this reports the median time per call and the median of the
//! per-round ratios to "none" (pairing cancels slow phases of the host).
use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};

use super::{SCENARIO_DIR, prepare, qemu::VmConfig, run_script_env};
use crate::util::workspace_root;

/// Samples parsed from the script's `BENCH mode=M round=R ns=N` lines.
#[derive(Debug, Default)]
pub struct Samples {
    /// mode → round → (mean ns per call, ns per call of the fastest chunk).
    pub by_mode: BTreeMap<String, BTreeMap<u32, (f64, Option<f64>)>>,
    /// `BENCH-INFO` and `BENCH-ERROR` lines.
    pub notes: Vec<String>,
    /// mode → CPU clock ticks the monitor itself used during the loops (all rounds).
    pub monitor_ticks: BTreeMap<String, u64>,
    /// Latency source (host, runc) → rounds of (p50 µs, p99 µs).
    pub latency: BTreeMap<String, Vec<(f64, f64)>>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

pub fn parse(lines: &[String]) -> Samples {
    let mut s = Samples::default();
    for line in lines {
        if let Some(rest) = line.strip_prefix("BENCH ") {
            let mode = field(rest, "mode");
            let round = field(rest, "round").and_then(|r| r.parse().ok());
            let ns = field(rest, "ns").and_then(|n| n.parse().ok());
            let best = field(rest, "best").and_then(|n| n.parse().ok());
            match (mode, round, ns) {
                (Some(m), Some(r), Some(ns)) => {
                    s.by_mode
                        .entry(m.to_string())
                        .or_default()
                        .insert(r, (ns, best));
                }
                _ => s.notes.push(format!("unreadable: {line}")),
            }
        } else if let Some(rest) = line.strip_prefix("BENCH-CPU ") {
            let mode = field(rest, "mode");
            let ticks = field(rest, "ticks").and_then(|t| t.parse::<u64>().ok());
            if let (Some(m), Some(t)) = (mode, ticks) {
                *s.monitor_ticks.entry(m.to_string()).or_default() += t;
            }
        } else if let Some(rest) = line.strip_prefix("BENCH-LAT ") {
            let src = field(rest, "source");
            let p50 = field(rest, "p50").and_then(|v| v.parse::<f64>().ok());
            let p99 = field(rest, "p99").and_then(|v| v.parse::<f64>().ok());
            match (src, p50, p99) {
                (Some(src), Some(a), Some(b)) if a.is_finite() && b.is_finite() => {
                    s.latency.entry(src.to_string()).or_default().push((a, b));
                }
                _ => s.notes.push(format!("no latency: {line}")),
            }
        } else if line.starts_with("BENCH-INFO ") || line.starts_with("BENCH-ERROR ") {
            s.notes.push(line.clone());
        }
    }
    s
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// One row of the report.
#[derive(Debug, PartialEq)]
pub struct Row {
    pub mode: String,
    /// Median over rounds of the mean ns per call.
    pub mean: f64,
    /// Median over rounds of (this mode's mean / its baseline's mean in the same round): the
    /// baseline is "none", or "none+seccomp" for the modes measured under seccomp.
    pub paired_ratio: Option<f64>,
    /// The smallest and largest per-round ratio.
    pub paired_range: Option<(f64, f64)>,
    /// Fastest chunk over all rounds, ns per call: the cost without host interference.
    pub best: Option<f64>,
    /// best / best of "none".
    pub best_ratio: Option<f64>,
}

impl Samples {
    /// One row per mode, "none" first and "auditd" last; modes measured under seccomp
    /// (`+seccomp`) follow the unconfined ones and are paired with "none+seccomp".
    pub fn table(&self) -> Vec<Row> {
        let fastest = |rounds: &BTreeMap<u32, (f64, Option<f64>)>| {
            rounds.values().filter_map(|r| r.1).min_by(f64::total_cmp)
        };
        let mut modes: Vec<&String> = self.by_mode.keys().collect();
        modes.sort_by_key(|m| {
            let confined = m.ends_with("+seccomp");
            let base = m.trim_end_matches("+seccomp");
            (confined, base != "none", base == "auditd", m.to_string())
        });
        let mut rows = Vec::new();
        for mode in modes {
            let baseline = self.by_mode.get(if mode.ends_with("+seccomp") {
                "none+seccomp"
            } else {
                "none"
            });
            let rounds = &self.by_mode[mode];
            let Some(mean) = median(rounds.values().map(|r| r.0).collect()) else {
                continue;
            };
            let ratios: Vec<f64> = rounds
                .iter()
                .filter_map(|(r, (ns, _))| baseline.and_then(|n| n.get(r)).map(|base| ns / base.0))
                .collect();
            let best = fastest(rounds);
            rows.push(Row {
                mode: mode.clone(),
                mean,
                paired_range: (!ratios.is_empty()).then(|| {
                    (
                        ratios.iter().copied().fold(f64::INFINITY, f64::min),
                        ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    )
                }),
                paired_ratio: median(ratios),
                best,
                best_ratio: best.zip(baseline.and_then(fastest)).map(|(b, n)| b / n),
            });
        }
        rows
    }
}

fn percent(ratio: Option<f64>) -> String {
    ratio.map_or("-".to_string(), |r| format!("{:+.1}%", (r - 1.0) * 100.0))
}

pub fn vm_bench(kernel: Option<&str>, seccomp: bool, icount: bool) -> Result<()> {
    let path = workspace_root().join(SCENARIO_DIR).join(if seccomp {
        "bench/seccomp.sh"
    } else {
        "bench/bench.sh"
    });
    let script = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let p = prepare(kernel, true)?;
    let mut env = Vec::new();
    for var in [
        "KMODMON_BENCH_CALLS",
        "KMODMON_BENCH_ROUNDS",
        "KMODMON_BENCH_LAT_N",
        "KMODMON_BENCH_LAT_ROUNDS",
    ] {
        if let Ok(v) = std::env::var(var) {
            env.push((var, v));
        }
    }
    let cfg = VmConfig {
        qemu_args: if icount {
            vec!["-icount".into(), "shift=0".into()]
        } else {
            Vec::new()
        },
        // A run with icount takes longer in wall time.
        timeout: VmConfig::default()
            .timeout
            .max(std::time::Duration::from_secs(1800)),
        ..VmConfig::default()
    };
    let clock = if icount {
        "QEMU -icount shift=0: instruction-counted guest time (a cost model, repeatable)"
    } else {
        "QEMU TCG wall clock (noisy on a shared host)"
    };
    // One VM at a time: two TCG guests on this machine's cores would disturb each other.
    for k in &p.kernels {
        eprintln!("xtask vm-bench: {} ({clock})", k.label());
        let (vm, dir) = run_script_env(&p, k, "bench", &script, &cfg, &env)?;
        if let Some(why) = vm.failure() {
            bail!(
                "the benchmark VM on {} failed: {why}\n  (output in {})",
                k.label(),
                dir.display()
            );
        }
        let samples = parse(&vm.transcript.output);
        if samples.by_mode.is_empty() {
            bail!(
                "the benchmark on {} printed no samples; its output:\n{}",
                k.label(),
                vm.transcript.output.join("\n")
            );
        }
        println!(
            "\nvm-bench on {} [{clock}]: getppid ns per call (mean: median of rounds; vs none: median of per-round ratios; best: fastest chunk)",
            k.label()
        );
        println!(
            "  {:<20} {:>8} {:>8} {:>15} {:>9} {:>8}  monitor CPU",
            "mode", "mean", "vs none", "(min–max)", "best", "vs none"
        );
        for row in samples.table() {
            let cpu = samples
                .monitor_ticks
                .get(&row.mode)
                .map(|t| format!("{t} ticks"))
                .unwrap_or_default();
            let (paired, range, best_ratio) = if row.mode.trim_end_matches("+seccomp") == "none" {
                (String::new(), String::new(), String::new())
            } else {
                (
                    percent(row.paired_ratio),
                    row.paired_range
                        .map_or("-".into(), |(a, b)| format!("({a:.2}–{b:.2})")),
                    percent(row.best_ratio),
                )
            };
            println!(
                "  {:<20} {:>8.1} {:>8} {:>15} {:>9} {:>8}  {cpu}",
                row.mode,
                row.mean,
                paired,
                range,
                row.best.map_or("-".to_string(), |b| format!("{b:.1}")),
                best_ratio,
            );
        }
        let rounds: Vec<String> = samples
            .by_mode
            .iter()
            .map(|(m, r)| {
                let v: Vec<String> = r.values().map(|(ns, _)| format!("{ns:.0}")).collect();
                format!("{m}: {}", v.join(" "))
            })
            .collect();
        println!("  mean per round: {}", rounds.join("; "));
        for (src, v) in &samples.latency {
            let p50: Vec<f64> = v.iter().map(|x| x.0).collect();
            let p99: Vec<f64> = v.iter().map(|x| x.1).collect();
            println!(
                "  latency syscall → JSON line, {src}: p50 {} µs, p99 {} µs (median over {} rounds; min–max p99 {:.0}–{:.0})",
                median(p50).map_or("-".into(), |m| format!("{m:.0}")),
                median(p99.clone()).map_or("-".into(), |m| format!("{m:.0}")),
                v.len(),
                p99.iter().copied().fold(f64::INFINITY, f64::min),
                p99.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            );
        }
        for note in &samples.notes {
            println!("  {note}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_pair_rounds_and_report_medians() {
        let lines: Vec<String> = [
            "BENCH mode=none round=1 ns=100.0 best=90.0",
            "BENCH mode=kmodmon round=1 ns=101.0 best=91.8",
            "BENCH mode=auditd round=1 ns=150.0 best=140",
            "BENCH mode=none round=2 ns=200.0 best=95",
            "BENCH mode=kmodmon round=2 ns=204.0 best=99",
            "BENCH mode=auditd round=2 ns=300.0",
            "BENCH mode=none round=3 ns=110.0",
            "BENCH mode=kmodmon round=3 ns=110.0",
            "BENCH-INFO mode=kmodmon attempts: fexit",
            "BENCH-CPU mode=kmodmon round=1 ticks=2",
            "BENCH-CPU mode=kmodmon round=2 ticks=1",
            "BENCH-LAT source=runc round=1 p50=120.5 p99=900.0 n=400",
            "BENCH-LAT source=runc round=2 p50=NaN p99=NaN n=0",
            "noise",
            "BENCH mode=none round=x ns=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s = parse(&lines);
        assert_eq!(s.notes.len(), 3);
        assert_eq!(s.latency["runc"], vec![(120.5, 900.0)]);
        assert_eq!(s.monitor_ticks["kmodmon"], 3);
        let t = s.table();
        let modes: Vec<&str> = t.iter().map(|r| r.mode.as_str()).collect();
        assert_eq!(modes, ["none", "kmodmon", "auditd"]);
        assert_eq!(
            (t[0].mean, t[0].paired_ratio, t[0].best),
            (110.0, Some(1.0), Some(90.0))
        );
        // kmodmon ratios 1.01, 1.02, 1.0 → median 1.01; best 91.8 vs 90 → +2%
        assert!((t[1].paired_ratio.unwrap() - 1.01).abs() < 1e-9);
        let (lo, hi) = t[1].paired_range.unwrap();
        assert!((lo - 1.0).abs() < 1e-9 && (hi - 1.02).abs() < 1e-9);
        assert!((t[1].best_ratio.unwrap() - 1.02).abs() < 1e-9);
        assert_eq!(t[2].mean, 225.0);
        assert!((t[2].paired_ratio.unwrap() - 1.5).abs() < 1e-9);
        assert_eq!(t[2].best, Some(140.0));
        assert_eq!(percent(Some(1.5)), "+50.0%");
        assert_eq!(percent(None), "-");
    }

    #[test]
    fn confined_modes_pair_with_the_confined_baseline() {
        let lines: Vec<String> = [
            "BENCH mode=none round=1 ns=100 best=90",
            "BENCH mode=kmodmon round=1 ns=101 best=90",
            "BENCH mode=none+seccomp round=1 ns=200 best=180",
            "BENCH mode=kmodmon+seccomp round=1 ns=300 best=270",
            "BENCH mode=none round=2 ns=110",
            "BENCH mode=kmodmon round=2 ns=110",
            "BENCH mode=none+seccomp round=2 ns=200",
            "BENCH mode=kmodmon+seccomp round=2 ns=200",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let t = parse(&lines).table();
        let modes: Vec<&str> = t.iter().map(|r| r.mode.as_str()).collect();
        assert_eq!(
            modes,
            ["none", "kmodmon", "none+seccomp", "kmodmon+seccomp"]
        );
        // kmodmon+seccomp: 300/200 = 1.5 and 200/200 = 1.0 → median 1.25, range 1.0–1.5.
        assert!((t[3].paired_ratio.unwrap() - 1.25).abs() < 1e-9);
        assert_eq!(t[3].paired_range, Some((1.0, 1.5)));
        assert!((t[3].best_ratio.unwrap() - 1.5).abs() < 1e-9);
        assert!((t[1].paired_ratio.unwrap() - 1.005).abs() < 1e-9);
    }

    #[test]
    fn median_handles_even_odd_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN]), None);
    }
}
