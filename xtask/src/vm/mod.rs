//! The VM harness: Debian cloud kernels (with module support) booted under QEMU TCG with an
//! initramfs built here, running a shell script as root with kmodmon on PATH.
//!
//! - `cargo xtask vm-run [--kernel K] SCRIPT`: run any script, print its output, pass its exit
//!   code through; files it sends back with `vm_export` (tests/vm/lib.sh) land in
//!   target/vm/runs/<series>/<script name>/files/.
//! - `cargo xtask vm-test [--kernel K] [--scenario S]`: every scenario of tests/vm on every
//!   kernel, with the event checks of scenarios.rs (part of `cargo xtask test`).
//! - `cargo xtask vm-fetch [--kernel K] [--refresh]`: download and unpack the kernels.
//! - `cargo xtask vm-bench [--kernel K]`: syscall overhead of monitors (bench.rs), on every
//!   kernel unless one is named.
//!
//! Everything is cached under target/vm: apt/ (private package lists), kernels/<series>/,
//! initramfs/ (userland and payload archives), build/ (test binaries), runs/ (last results).
mod apt;
mod bench;
mod check;
mod cpio;
mod initramfs;
mod kernels;
mod protocol;
mod qemu;
mod runner;
mod scenarios;
mod testmods;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

pub use bench::vm_bench;
pub use runner::vm_test;

use crate::{
    build::{TARGET, release_kmodmon},
    util::{run, workspace_root},
};
use kernels::{Cache, Kernel, KernelSpec, MATRIX};
use qemu::{VmConfig, VmRun};

/// Where the scenario scripts and their library live, relative to the workspace root.
const SCENARIO_DIR: &str = "tests/vm";
/// The default kernel of `vm-run`: the newest of the matrix.
fn default_kernel() -> &'static KernelSpec {
    &MATRIX[MATRIX.len() - 1]
}

fn vm_dir() -> PathBuf {
    std::env::var_os("KMODMON_VM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/vm"))
}

/// Everything a boot needs besides the kernel-specific module tree.
pub struct Prepared {
    pub vm_dir: PathBuf,
    pub kernels: Vec<Kernel>,
    userland: PathBuf,
    payload: PathBuf,
    lib_sh: Vec<u8>,
}

fn specs(kernel: Option<&str>, all: bool) -> Result<Vec<&'static KernelSpec>> {
    Ok(match kernel {
        Some(k) => vec![kernels::select(k)?],
        None if all => MATRIX.iter().collect(),
        None => vec![default_kernel()],
    })
}

/// Fetches the kernels, builds kmodmon (static) and the test binaries, packs the initramfs
/// parts. `all`: the whole matrix when no kernel is named (else the default kernel).
pub fn prepare(kernel: Option<&str>, all: bool) -> Result<Prepared> {
    crate::setup::setup()?;
    let vm_dir = vm_dir();
    let kernels = Cache::new(vm_dir.clone()).fetch_all(&specs(kernel, all)?, false)?;
    let root = workspace_root();
    let mut files = BTreeMap::new();
    files.insert("usr/bin/kmodmon".to_string(), release_kmodmon()?);
    files.insert(
        "usr/bin/kmodmon-vm-bench".to_string(),
        build_std_tool(&root, &vm_dir, "bench/getppid.rs", "kmodmon-vm-bench")?,
    );
    files.insert(
        "usr/bin/kmodmon-vm-tool".to_string(),
        build_std_tool(&root, &vm_dir, "tools/vmtool.rs", "kmodmon-vm-tool")?,
    );
    files.insert(
        "usr/bin/kmt-load".to_string(),
        testmods::build_loader(&vm_dir)?,
    );
    // Test modules built against each kernel's own headers (identity tests, testmods.rs).
    for k in &kernels {
        for (name, path) in testmods::build(k, &vm_dir)? {
            files.insert(format!("usr/lib/kmodmon-test/{}/{name}", k.release), path);
        }
    }
    let ramfs_dir = vm_dir.join("initramfs");
    let userland = initramfs::userland(&ramfs_dir)?;
    let payload = initramfs::payload(&ramfs_dir, &files)?;
    for k in &kernels {
        initramfs::modules(k)?;
    }
    let lib_path = root.join(SCENARIO_DIR).join("lib.sh");
    let lib_sh = fs::read(&lib_path).with_context(|| format!("reading {}", lib_path.display()))?;
    Ok(Prepared {
        vm_dir,
        kernels,
        userland,
        payload,
        lib_sh,
    })
}

/// Boots `kernel` to run `script`; the results are kept in target/vm/runs/<series>/<name>/.
pub fn run_script(
    p: &Prepared,
    kernel: &Kernel,
    name: &str,
    script: &[u8],
    cfg: &VmConfig,
) -> Result<(VmRun, PathBuf)> {
    run_script_env(p, kernel, name, script, cfg, &[])
}

/// run_script with extra environment variables for the script.
pub fn run_script_env(
    p: &Prepared,
    kernel: &Kernel,
    name: &str,
    script: &[u8],
    cfg: &VmConfig,
    extra_env: &[(&str, String)],
) -> Result<(VmRun, PathBuf)> {
    let run_dir = p.vm_dir.join("runs").join(&kernel.series).join(name);
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&run_dir)?;
    let modules = initramfs::modules(kernel)?;
    let mut env = vec![
        ("KMODMON_VM_SERIES", kernel.series.clone()),
        ("KMODMON_VM_SCENARIO", name.to_string()),
    ];
    env.extend(extra_env.iter().cloned());
    let run_part = initramfs::run_part(script, &p.lib_sh, &env)?;
    // Outside run_dir, and unique: another xtask may be running the same script right now.
    let tmp = p.vm_dir.join("tmp");
    fs::create_dir_all(&tmp)?;
    let initrd = tmp.join(format!(
        "initrd-{}-{}-{name}.img",
        std::process::id(),
        kernel.series
    ));
    initramfs::assemble(
        &[p.userland.clone(), modules, p.payload.clone()],
        &run_part,
        &initrd,
    )?;
    let mut result = qemu::boot(kernel, &initrd, &run_dir, cfg);
    // A VM that died before the script started (a boot-time panic under a starved emulator)
    // says nothing about kmodmon: boot it once more, and say so.
    if let Ok(vm) = &result
        && vm.transcript.booted.is_none()
        && let Some(why) = vm.failure()
    {
        eprintln!(
            "xtask vm: {name} on {}: the VM never reached the script ({}); booting once more",
            kernel.label(),
            why.lines().next().unwrap_or_default()
        );
        result = qemu::boot(kernel, &initrd, &run_dir, cfg);
    }
    let _ = fs::remove_file(&initrd);
    let vm = result?;
    fs::write(run_dir.join("output.txt"), vm.transcript.output.join("\n"))?;
    if !vm.transcript.files.is_empty() {
        let files = run_dir.join("files");
        fs::create_dir_all(&files)?;
        for (fname, data) in &vm.transcript.files {
            // Names come from the VM: keep them inside files/.
            let safe: String = fname
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            fs::write(files.join(safe.trim_start_matches('.')), data)?;
        }
    }
    Ok((vm, run_dir))
}

/// `cargo xtask vm-run`: runs the script, prints its output, exits with its exit code.
pub fn vm_run(kernel: Option<&str>, script: &Path) -> Result<()> {
    let text = fs::read(script).with_context(|| format!("reading {}", script.display()))?;
    let p = prepare(kernel, false)?;
    let k = &p.kernels[0];
    let name = script
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("script")
        .to_string();
    eprintln!(
        "xtask vm-run: booting {} to run {}",
        k.label(),
        script.display()
    );
    let cfg = VmConfig {
        echo: true,
        ..VmConfig::default()
    };
    let (vm, run_dir) = run_script(&p, k, &name, &text, &cfg)?;
    for e in &vm.transcript.errors {
        eprintln!("xtask vm-run: {e}");
    }
    if let Some(why) = vm.failure() {
        bail!(
            "{} on {}: {why}\n  (all output in {})",
            script.display(),
            k.label(),
            run_dir.display()
        );
    }
    let rc = vm.rc().unwrap_or(1);
    let boot = vm.transcript.booted.as_ref().map(|b| b.1).unwrap_or(0.0);
    eprintln!(
        "xtask vm-run: exit code {rc} ({:.1} s in all, script started {boot:.1} s after boot; files and console in {})",
        vm.elapsed.as_secs_f64(),
        run_dir.display()
    );
    std::process::exit(rc);
}

/// `cargo xtask vm-fetch`: downloads and unpacks the kernels (all by default).
pub fn vm_fetch(kernel: Option<&str>, refresh: bool) -> Result<()> {
    let cache = Cache::new(vm_dir());
    for k in cache.fetch_all(&specs(kernel, true)?, refresh)? {
        initramfs::modules(&k)?;
        println!(
            "{:<5} {:<28} {} {}",
            k.series, k.release, k.package, k.version
        );
    }
    Ok(())
}

/// A std-only test program of tests/vm (`rel`: the getppid benchmark, the enforcement
/// scripts' tool), compiled with rustc into a static binary named `name`.
fn build_std_tool(root: &Path, vm_dir: &Path, rel: &str, name: &str) -> Result<PathBuf> {
    let src = root.join(SCENARIO_DIR).join(rel);
    let out = vm_dir.join("build").join(name);
    let newer = |a: &Path, b: &Path| -> bool {
        let m = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        matches!((m(a), m(b)), (Some(x), Some(y)) if x > y)
    };
    if out.is_file() && newer(&out, &src) {
        return Ok(out);
    }
    fs::create_dir_all(vm_dir.join("build"))?;
    run(Command::new("rustc")
        .args([
            "--edition",
            "2024",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "--target",
            TARGET,
        ])
        .arg(&src)
        .arg("-o")
        .arg(&out))
    .with_context(|| format!("compiling {rel} failed"))?;
    Ok(out)
}
