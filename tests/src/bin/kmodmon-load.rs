//! Load generator for `cargo xtask bench` (not a test):
//!   kmodmon-load getppid N          → ns per getppid() over N calls
//!   kmodmon-load storm THREADS N    → THREADS threads × N delete_module attempts; prints
//!                                     "attempts=<total> seconds=<s> rate=<attempts/s>"
//!   kmodmon-load paced N MICROS NAME → N delete_module(NAME) attempts, one every MICROS µs
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, default: u64| -> u64 {
        args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
    };
    match args.get(1).map(String::as_str) {
        Some("getppid") => {
            let n = num(2, 5_000_000);
            let start = Instant::now();
            for _ in 0..n {
                // SAFETY: getppid has no preconditions.
                std::hint::black_box(unsafe { libc::getppid() });
            }
            let ns = start.elapsed().as_nanos() as f64 / n as f64;
            println!("ns_per_call={ns:.2}");
        }
        Some("storm") => {
            let threads = num(2, 4);
            let n = num(3, 50_000);
            let name = c"kmodmon_bench_storm";
            let start = Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    std::thread::spawn(move || {
                        for _ in 0..n {
                            // SAFETY: a valid NUL-terminated name; the call only reads it.
                            unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), 0) };
                        }
                    })
                })
                .collect();
            for h in handles {
                let _ = h.join();
            }
            let secs = start.elapsed().as_secs_f64();
            let total = threads * n;
            println!(
                "attempts={total} seconds={secs:.4} rate={:.0}",
                total as f64 / secs
            );
        }
        Some("paced") => {
            let n = num(2, 1000);
            let gap = std::time::Duration::from_micros(num(3, 1000));
            let name = std::ffi::CString::new(
                args.get(4)
                    .cloned()
                    .unwrap_or_else(|| "kmodmon_bench_paced".to_string()),
            )
            .unwrap_or_default();
            let mut next = Instant::now();
            for _ in 0..n {
                // SAFETY: a valid NUL-terminated name; the call only reads it.
                unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), 0) };
                next += gap;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            println!("attempts={n}");
        }
        _ => {
            eprintln!("usage: kmodmon-load getppid N | storm THREADS N | paced N MICROS NAME");
            std::process::exit(2);
        }
    }
}
