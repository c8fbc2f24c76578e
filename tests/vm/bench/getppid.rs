//! The VM benchmark's workload: an unrelated syscall (getppid) in a loop.
//! `kmodmon-vm-bench [CALLS]` makes CALLS calls in chunks of 10,000 and prints two numbers:
//! the mean nanoseconds per call, and the per-call time of the fastest chunk. Under QEMU TCG
//! on a shared host, other host work stretches some chunks; the fastest chunk is the
//! syscall's own cost. Built by `cargo xtask` with plain rustc (std only, static).
use std::time::{Duration, Instant};

const CHUNK: u64 = 10_000;

fn main() {
    let calls: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 1_000_000,
        Some(Ok(n)) if n >= CHUNK => n,
        Some(_) => {
            eprintln!("usage: kmodmon-vm-bench [CALLS]  (a number, at least {CHUNK})");
            std::process::exit(2);
        }
    };
    let chunks = calls / CHUNK;
    let mut sum = 0u64;
    let mut best = Duration::MAX;
    let start = Instant::now();
    for _ in 0..chunks {
        let t = Instant::now();
        for _ in 0..CHUNK {
            // std::os::unix::process::parent_id() is getppid(2); glibc does not cache it.
            sum = sum.wrapping_add(u64::from(std::os::unix::process::parent_id()));
        }
        best = best.min(t.elapsed());
    }
    let total = start.elapsed();
    std::hint::black_box(sum);
    let per_call = |d: Duration, n: u64| d.as_nanos() as f64 / n as f64;
    println!("{:.2} {:.2}", per_call(total, chunks * CHUNK), per_call(best, CHUNK));
}
