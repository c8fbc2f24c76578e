use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds kmodmon-ebpf for the BPF target with the nightly toolchain (bpf-linker, -Z build-std)
/// and leaves the object in OUT_DIR, where src/sensor/mod.rs includes it.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("kmodmon has no parent directory"))?
        .join("kmodmon-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    let package = Package {
        name: "kmodmon-ebpf",
        root_dir: root,
        ..Default::default()
    };
    // The workspace's release profile asks for LTO (for the userspace binary); the eBPF object
    // is built without it, exactly as the VM suites verify it on every kernel.
    // SAFETY: the build script is single-threaded; the variable is for the cargo it starts.
    unsafe { std::env::set_var("CARGO_PROFILE_RELEASE_LTO", "false") };
    aya_build::build_ebpf([package], Toolchain::default())?;
    let object = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?).join("kmodmon");
    strip_dwarf(&object)
}

/// Removes the DWARF sections from the object (about 4.5 of its 5.9 MB). The kernel and aya
/// use only its BTF (`.BTF`, `.BTF.ext`, which carry the verifier's line info); the DWARF is
/// what bpf-linker made that BTF from. Without it the binary is smaller and loading touches
/// fewer of its pages (idle RSS). Uses the toolchain's own `rust-objcopy` (LLVM's objcopy,
/// shipped with rustup's rustc); a toolchain without it keeps the object whole, with a warning
/// (it works the same, only larger).
fn strip_dwarf(object: &Path) -> anyhow::Result<()> {
    if !object.exists() {
        // aya-build skipped the eBPF build (AYA_BUILD_SKIP): nothing to strip.
        return Ok(());
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let host = std::env::var("HOST").context("HOST")?;
    let out = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .with_context(|| format!("running {rustc} --print sysroot"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{rustc} --print sysroot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let objcopy = sysroot
        .join("lib/rustlib")
        .join(&host)
        .join("bin/rust-objcopy");
    if !objcopy.exists() {
        println!(
            "cargo:warning=no {} (a rustc not installed by rustup): the eBPF object keeps its \
             DWARF (binary about 4.5 MB larger, same behaviour)",
            objcopy.display()
        );
        return Ok(());
    }
    // rust-objcopy links the toolchain's libLLVM, which lives in the sysroot's lib.
    let mut libs = std::ffi::OsString::from(sysroot.join("lib"));
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        libs.push(":");
        libs.push(old);
    }
    let stripped = object.with_extension("stripped");
    let status = Command::new(&objcopy)
        .env("LD_LIBRARY_PATH", libs)
        .arg("--strip-debug")
        .arg(object)
        .arg(&stripped)
        .status()
        .with_context(|| format!("running {}", objcopy.display()))?;
    if !status.success() {
        anyhow::bail!(
            "{} --strip-debug {} failed: {status}",
            objcopy.display(),
            object.display()
        );
    }
    std::fs::rename(&stripped, object)
        .with_context(|| format!("replacing {} with its stripped copy", object.display()))
}
