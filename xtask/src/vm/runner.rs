//! `cargo xtask vm-test`: every scenario of tests/vm (NN-name.sh) on every kernel of the
//! matrix, two VMs at a time (each QEMU TCG guest uses one host core), each run checked by
//! scenarios.rs; and the self-checking scripts ([`SELF_CHECKING`]), judged by their exit code.
//! Prints one line per run and closes with "N passed, M failed".
use std::{
    collections::VecDeque,
    fs,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    Prepared, SCENARIO_DIR,
    kernels::Kernel,
    prepare,
    qemu::{VmConfig, VmRun},
    run_script, scenarios,
};
use crate::util::workspace_root;

struct Scenario {
    name: String,
    script: Vec<u8>,
    /// Judged by its exit code (and a clean kernel console), not by scenarios.rs.
    self_checking: bool,
}

/// tests/vm scripts that check themselves and exit non-zero on a failure.
const SELF_CHECKING: &[&str] = &[
    "check",
    "enforce",
    "enforce-new",
    "enforce-names",
    "enforce-guard",
    "pod",
    "hooks",
    "cgroup-v1",
    "seccomp",
    "identity",
    "storm",
];

/// tests/vm/NN-*.sh, in order.
fn discover(filter: Option<&str>) -> Result<Vec<Scenario>> {
    let dir = workspace_root().join(SCENARIO_DIR);
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".sh") && name.as_bytes().first().is_some_and(u8::is_ascii_digit)
        })
        .collect();
    paths.sort();
    paths.extend(SELF_CHECKING.iter().map(|n| dir.join(format!("{n}.sh"))));
    let mut out = Vec::new();
    for p in paths {
        let name = p
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("?")
            .to_string();
        if filter.is_some_and(|f| !name.contains(f)) {
            continue;
        }
        out.push(Scenario {
            script: fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            self_checking: SELF_CHECKING.contains(&name.as_str()),
            name,
        });
    }
    if out.is_empty() {
        bail!("no scenario in {} matches {filter:?}", dir.display());
    }
    Ok(out)
}

struct Outcome {
    kernel: String,
    scenario: String,
    problems: Vec<String>,
    elapsed: Duration,
    /// Uptime when the script started (boot time).
    boot: Option<f64>,
    sources: Option<String>,
    details: String,
}

fn judge(kernel: &Kernel, scenario: &Scenario, vm: &VmRun, run_dir: &std::path::Path) -> Outcome {
    let mut problems: Vec<String> = vm.transcript.errors.clone();
    if let Some(why) = vm.failure() {
        problems.push(why);
    } else {
        match vm.rc() {
            Some(0) => {}
            rc => problems.push(format!("the script exited with {rc:?}")),
        }
        if !scenario.self_checking {
            problems.extend(scenarios::check(
                &scenario.name,
                kernel,
                &vm.transcript.files,
            ));
        }
        let trouble = vm.kernel_trouble();
        if !trouble.is_empty() {
            problems.push(format!(
                "kernel console shows trouble:\n    {}",
                trouble.join("\n    ")
            ));
        }
    }
    let out = &vm.transcript.output;
    let tail = out[out.len().saturating_sub(25)..].join("\n    | ");
    Outcome {
        kernel: kernel.series.clone(),
        scenario: scenario.name.clone(),
        problems,
        elapsed: vm.elapsed,
        boot: vm.transcript.booted.as_ref().map(|b| b.1),
        sources: vm
            .transcript
            .files
            .get("tail.err")
            .map(|b| attached(&String::from_utf8_lossy(b))),
        details: format!(
            "  script output (last lines):\n    | {tail}\n  everything: {}",
            run_dir.display()
        ),
    }
}

/// What kmodmon said it attached, and its notes (first line of each).
fn attached(tail_err: &str) -> String {
    tail_err
        .lines()
        .filter_map(|l| {
            l.strip_prefix("kmodmon: attached in ")
                .and_then(|r| r.split_once(": ").map(|(_, what)| what.to_string()))
                .or_else(|| {
                    l.strip_prefix("kmodmon: note: ")
                        .map(|n| format!("note: {n}"))
                })
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn run_one(p: &Prepared, kernel: &Kernel, scenario: &Scenario) -> Outcome {
    match run_script(
        p,
        kernel,
        &scenario.name,
        &scenario.script,
        &VmConfig::default(),
    ) {
        Ok((vm, dir)) => judge(kernel, scenario, &vm, &dir),
        Err(e) => Outcome {
            kernel: kernel.series.clone(),
            scenario: scenario.name.clone(),
            problems: vec![format!("could not run the VM: {e:#}")],
            elapsed: Duration::ZERO,
            boot: None,
            sources: None,
            details: String::new(),
        },
    }
}

/// How many VMs run at once: KMODMON_VM_JOBS, else the number of cores (at most 4).
fn parallelism() -> usize {
    std::env::var("KMODMON_VM_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
}

pub fn vm_test(kernel: Option<&str>, filter: Option<&str>) -> Result<()> {
    let scenarios = discover(filter)?;
    let p = prepare(kernel, true)?;
    let mut queue: VecDeque<(&Kernel, &Scenario)> = VecDeque::new();
    for s in &scenarios {
        for k in &p.kernels {
            queue.push_back((k, s));
        }
    }
    let total = queue.len();
    let workers = parallelism().min(total);
    eprintln!(
        "xtask vm-test: {} scenarios on {} ({}), {workers} VMs at a time",
        scenarios.len(),
        p.kernels
            .iter()
            .map(Kernel::label)
            .collect::<Vec<_>>()
            .join(", "),
        if p.kernels.len() == 1 {
            "one kernel"
        } else {
            "all kernels"
        },
    );
    let start = Instant::now();
    let queue = Mutex::new(queue);
    let outcomes = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while let Some((k, sc)) = queue.lock().ok().and_then(|mut q| q.pop_front()) {
                    let o = run_one(&p, k, sc);
                    println!(
                        "{} {:<5} {:<24} {:>5.1} s (script started {})",
                        if o.problems.is_empty() {
                            "PASS"
                        } else {
                            "FAIL"
                        },
                        o.kernel,
                        o.scenario,
                        o.elapsed.as_secs_f64(),
                        o.boot
                            .map_or("never".to_string(), |b| format!("{b:.1} s after boot")),
                    );
                    if let Ok(mut v) = outcomes.lock() {
                        v.push(o);
                    }
                }
            });
        }
    });
    let mut outcomes = outcomes.into_inner().unwrap_or_default();
    outcomes.sort_by(|a, b| (&a.kernel, &a.scenario).cmp(&(&b.kernel, &b.scenario)));
    println!("\nwhat kmodmon attached, per kernel:");
    for k in &p.kernels {
        let sources = outcomes
            .iter()
            .find(|o| o.kernel == k.series && o.sources.is_some())
            .and_then(|o| o.sources.clone())
            .unwrap_or_else(|| "(no scenario reported them)".into());
        println!(
            "  {:<5} {}: {}",
            k.series,
            k.release,
            sources.replace('\n', "\n        ")
        );
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.problems.is_empty()).collect();
    for o in &failed {
        println!("\nFAIL {} on {}:", o.scenario, o.kernel);
        for problem in &o.problems {
            println!("  - {}", problem.replace('\n', "\n    "));
        }
        println!("{}", o.details);
    }
    let passed = outcomes.len() - failed.len();
    println!("\nvm-test: {:.0} s in all", start.elapsed().as_secs_f64());
    println!("{passed} passed, {} failed", failed.len());
    if !failed.is_empty() {
        bail!(
            "{} of {total} VM scenario runs failed (see above)",
            failed.len()
        );
    }
    Ok(())
}
