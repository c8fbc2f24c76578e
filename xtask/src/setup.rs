//! `cargo xtask setup`: rust-src for the nightly, bpf-linker built against the nightly's own
//! LLVM, and the Debian packages the tests use. Idempotent and quiet when everything is there.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::util::{cargo, output, run, succeeds};

/// Debian packages the project's tests, VM harness and benchmarks use.
pub const APT_PACKAGES: &[&str] = &[
    // containers on the host and inside the VM
    "runc",
    "crun",
    "busybox-static",
    // the real container engines of the engine end-to-end tests (tests/tests/engine_*.rs),
    // started by the tests themselves with private roots and no network
    "docker.io",
    "podman",
    // containerd and ctr also carry the CRI annotations of tests/tests/annotations.rs
    "containerd",
    "lxc",
    // the VM harness
    "qemu-system-x86",
    "kmod",
    "iptables",
    // benchmarks: peers measured side by side
    "bpftrace",
    // the VM benchmark's audit peer (auditd + auditctl go into the VM's initramfs)
    "auditd",
    // loop-mounted filesystems for the audit-log disk-full test
    "e2fsprogs",
    // the .deb install test: `man -l`, `systemd-analyze verify`
    "man-db",
    "systemd",
    // promtool: the alert rules and the dashboard's queries (validate-deploy); prometheus
    // itself scrapes a running kmodmon in tests/tests/prometheus.rs
    "prometheus",
];

/// Runs the setup once per xtask invocation: every task calls it first, and `test` (lint,
/// package, VM) reaches it several times. A failure is returned to every caller.
pub fn setup() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| setup_once().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn setup_once() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    apt_packages()?;
    Ok(())
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context(
        "rustup must be installed with a nightly toolchain (`rustup toolchain install nightly`)",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask setup: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The nightly's LLVM: (major version, path of its shared library).
fn nightly_llvm() -> Result<(String, PathBuf)> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .ok_or_else(|| anyhow!("`rustc +nightly -vV` did not print an LLVM version"))?;
    let major = version
        .split('.')
        .next()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| anyhow!("unexpected LLVM version {version:?}"))?
        .to_string();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let prefix = format!("libLLVM.so.{major}");
    let found = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .ok_or_else(|| anyhow!("no {prefix}* in {}", lib.display()))?;
    Ok((major, found))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn bpf_linker() -> Result<()> {
    let (major, libllvm) = nightly_llvm()?;
    let nightly = output(Command::new("rustc").args(["+nightly", "--version"]))?;
    // The linker is linked against this directory's libLLVM.so (its rpath points here), so it
    // lives under the cargo home, next to the linker itself.
    let llvm_dir = cargo_home().join("kmodmon-llvm");
    let stamp = llvm_dir.join("stamp");
    let want = format!("{}|{}", nightly.trim(), libllvm.display());
    let have_linker = which::which("bpf-linker").is_ok();
    if have_linker && fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    if have_linker && !stamp.exists() && succeeds(Command::new("bpf-linker").arg("--version")) {
        // Installed by hand following the platform notes: trust it once, but record the
        // toolchain so a later nightly update triggers a rebuild.
        if linker_uses_llvm(&llvm_dir, &libllvm) {
            fs::write(&stamp, &want)?;
            return Ok(());
        }
    }
    eprintln!(
        "xtask setup: building bpf-linker against the nightly's LLVM {major} (about a minute)"
    );
    fs::create_dir_all(llvm_dir.join("lib"))?;
    let link = llvm_dir.join("lib").join("libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {} to {}", link.display(), libllvm.display()))?;
    run(cargo()
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &llvm_dir))
    .context("building bpf-linker failed")?;
    fs::write(&stamp, &want)?;
    Ok(())
}

fn linker_uses_llvm(llvm_dir: &Path, libllvm: &Path) -> bool {
    fs::read_link(llvm_dir.join("lib").join("libLLVM.so"))
        .map(|target| target == libllvm)
        .unwrap_or(false)
}

/// Packages whose maintainer scripts would start a system daemon: docker.io (dockerd, with
/// its bridge and iptables rules), containerd, lxc (lxc-net's bridge and dnsmasq), podman
/// (its restart unit). They are installed with service starts denied, so installing them
/// changes nothing on the machine or its network; the tests start private daemons themselves.
const NO_START: &[&str] = &["docker.io", "containerd", "lxc", "podman"];

/// Debian's way to keep maintainer scripts from starting services (invoke-rc.d and
/// deb-systemd-invoke ask it; exit status 101 = "action forbidden").
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::util::is_root() {
        bail!(
            "these Debian packages are missing and installing them needs root: {}\n  run: sudo apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    // A policy-rc.d of our own only while installing, and only where none exists.
    let deny_starts =
        missing.iter().any(|p| NO_START.contains(p)) && !Path::new(POLICY_RC_D).exists();
    if deny_starts {
        use std::os::unix::fs::PermissionsExt as _;
        fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# kmodmon xtask setup: no service starts while installing\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755))?;
    }
    let installed = run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if deny_starts {
        fs::remove_file(POLICY_RC_D).with_context(|| format!("removing {POLICY_RC_D}"))?;
    }
    installed
}

fn dpkg_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .map(|s| s.contains("install ok installed"))
        .unwrap_or(false)
}
