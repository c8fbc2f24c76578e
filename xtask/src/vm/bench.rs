//! `cargo xtask vm-bench` (work in progress).
use anyhow::Result;

pub fn vm_bench(_kernel: Option<&str>) -> Result<()> {
    anyhow::bail!("not yet")
}
