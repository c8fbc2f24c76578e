//! Building kmodmon: the release binary is built once per xtask run, and it is one binary for
//! everything release — `cargo xtask run`, the .deb, the VM's initramfs and the benchmarks:
//! statically linked (glibc, crt-static), so it also runs on the VM's bare root.
use std::{path::PathBuf, process::Command, sync::OnceLock};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::util::{cargo, run, target_dir, workspace_root};

/// The target of the release build. Naming it (rather than building for the host) keeps the
/// static link flags to kmodmon: build scripts and proc macros are still built for the host
/// without them.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The rustflags of the release build.
const STATIC_RUSTFLAGS: (&str, &str) = (
    "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
    "-C target-feature=+crt-static",
);

/// `cargo build --release --target TARGET` with the static flags, for `packages` / `bins`.
pub fn release_build() -> Command {
    let mut cmd = cargo();
    cmd.current_dir(workspace_root())
        .args(["build", "--release", "--locked", "--target", TARGET])
        .env(STATIC_RUSTFLAGS.0, STATIC_RUSTFLAGS.1);
    cmd
}

/// Where [`release_build`] puts its binaries: `<target dir>/TARGET/release`.
pub fn release_dir() -> Result<PathBuf> {
    Ok(target_dir(&workspace_root())?.join(TARGET).join("release"))
}

/// The release kmodmon, built on the first call of this xtask run (later calls return the same
/// binary), checked to be statically linked.
pub fn release_kmodmon() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_release_kmodmon().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_release_kmodmon() -> Result<PathBuf> {
    run(release_build().args(["-p", "kmodmon", "--bin", "kmodmon"]))
        .context("building kmodmon (release, static) failed")?;
    let bin = release_dir()?.join("kmodmon");
    let ldd = Command::new("ldd").arg(&bin).output()?;
    let text =
        String::from_utf8_lossy(&ldd.stdout).into_owned() + &String::from_utf8_lossy(&ldd.stderr);
    if !text.contains("statically linked") && !text.contains("not a dynamic executable") {
        bail!(
            "{} is not statically linked (ldd: {}); the VM has no matching libraries",
            bin.display(),
            text.trim()
        );
    }
    Ok(bin)
}
