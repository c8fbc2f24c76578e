use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds kmodmon-ebpf for the BPF target with the nightly toolchain (bpf-linker, -Z build-std)
/// and leaves the object in OUT_DIR, where src/probe/mod.rs includes it.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
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
    aya_build::build_ebpf([package], Toolchain::default())
}
