use which::which;

/// Building this crate for the BPF target needs bpf-linker; rebuild when it changes so a
/// freshly built linker (e.g. against a new nightly's LLVM) is picked up.
fn main() {
    let bpf_linker = which("bpf-linker")
        .expect("bpf-linker not found on PATH: run `cargo xtask setup` to build it");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
