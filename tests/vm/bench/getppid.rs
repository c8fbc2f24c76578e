//! The VM benchmark's workload: an unrelated syscall (getppid) in a loop.
//! `kmodmon-vm-bench N` makes N calls and prints the mean nanoseconds per call.
//! Built by `cargo xtask` with plain rustc (std only, statically linked).
use std::time::Instant;

fn main() {
    let calls: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 1_000_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: kmodmon-vm-bench [CALLS]  (a positive number)");
            std::process::exit(2);
        }
    };
    let mut sum = 0u64;
    let start = Instant::now();
    for _ in 0..calls {
        // std::os::unix::process::parent_id() is getppid(2); glibc does not cache it.
        sum = sum.wrapping_add(u64::from(std::os::unix::process::parent_id()));
    }
    let elapsed = start.elapsed();
    std::hint::black_box(sum);
    println!("{:.2}", elapsed.as_nanos() as f64 / calls as f64);
}
