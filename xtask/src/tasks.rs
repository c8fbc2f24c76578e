//! run, test and lint.
use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{
    setup::setup,
    util::{EBPF_RUSTFLAGS, cargo, is_root, run as run_cmd, workspace_root},
};

/// Builds kmodmon in release mode and replaces this process with it (via sudo when not root).
pub fn run(args: &[String]) -> Result<()> {
    setup()?;
    let bin = crate::build::release_kmodmon()?;
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(&bin);
        c
    };
    cmd.args(args);
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not run {}", bin.display()))
}

pub fn lint() -> Result<()> {
    let root = workspace_root();
    run_cmd(
        cargo()
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]),
    )
    .context("formatting differs: run `cargo fmt --all`")?;
    run_cmd(cargo().current_dir(&root).args([
        "clippy",
        "--workspace",
        "--exclude",
        "kmodmon-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate is linted separately for its own target, as aya-template does.
    run_cmd(
        Command::new("rustup")
            .current_dir(root.join("kmodmon-ebpf"))
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--target-dir",
            ])
            .arg(root.join("target/ebpf-lint"))
            .args(["--", "-D", "warnings"])
            .env("CARGO_ENCODED_RUSTFLAGS", EBPF_RUSTFLAGS),
    )?;
    Ok(())
}

pub fn test(no_vm: bool) -> Result<()> {
    setup()?;
    let root = workspace_root();
    lint()?;
    if !is_root() {
        eprintln!(
            "\n!!! xtask test: NOT ROOT — the end-to-end tests that load eBPF will be SKIPPED.\n\
             !!! Run as root (CI does) for the full suite.\n"
        );
    }
    run_cmd(cargo().current_dir(&root).args([
        "test",
        "--workspace",
        "--exclude",
        "kmodmon-ebpf",
        "--no-fail-fast",
    ]))?;
    // Shipping: the Debian package installed with dpkg; manifests and Dockerfile validated.
    crate::ship::test_deb()?;
    crate::ship::validate_deploy()?;
    if no_vm {
        eprintln!("xtask test: --no-vm given, VM scenarios skipped");
        return Ok(());
    }
    if std::env::var_os("KMODMON_SKIP_VM").is_some() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("KMODMON_SKIP_VM is set in CI: the VM scenarios must run there");
        }
        eprintln!("\n!!! xtask test: KMODMON_SKIP_VM set — VM scenarios SKIPPED\n");
        return Ok(());
    }
    crate::vm::vm_test(None, None)
}
