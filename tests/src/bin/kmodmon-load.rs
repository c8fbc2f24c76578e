//! Load generator for `cargo xtask bench` (not a test):
//!   kmodmon-load getppid N          → ns per getppid() over N calls
//!   kmodmon-load storm THREADS N [distinct] → THREADS threads × N delete_module attempts
//!                                     (each a distinct name with `distinct`); prints
//!                                     "attempts=<total> seconds=<s> rate=<attempts/s>"
//!   kmodmon-load paced N MICROS PREFIX → N delete_module(PREFIX_<i>) attempts, one every
//!                                     MICROS µs
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
            let distinct = args.get(4).is_some_and(|a| a == "distinct");
            let name = c"kmodmon_bench_storm";
            let start = Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    std::thread::spawn(move || {
                        for i in 0..n {
                            let each = distinct.then(|| {
                                std::ffi::CString::new(format!("kmodmon_bench_distinct_{t}_{i}"))
                                    .unwrap_or_default()
                            });
                            let p = each.as_deref().unwrap_or(name).as_ptr();
                            // SAFETY: a valid NUL-terminated name; the call only reads it.
                            unsafe { libc::syscall(libc::SYS_delete_module, p, 0) };
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
            let prefix = args
                .get(4)
                .cloned()
                .unwrap_or_else(|| "kmodmon_bench_paced".to_string());
            let mut next = Instant::now();
            for i in 0..n {
                // A name of its own each: identical attempts would be aggregated.
                let name = std::ffi::CString::new(format!("{prefix}_{i}")).unwrap_or_default();
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
            eprintln!(
                "usage: kmodmon-load getppid N | storm THREADS N [distinct] | paced N MICROS PREFIX"
            );
            std::process::exit(2);
        }
    }
}
