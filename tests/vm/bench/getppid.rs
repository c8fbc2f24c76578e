//! The VM benchmark's workloads (std only, static; built by `cargo xtask` with plain rustc):
//!
//! - `kmodmon-vm-bench [CALLS]` (or `getppid CALLS`): an unrelated syscall (getppid) in a
//!   loop, in chunks of 10,000; prints two numbers: the mean nanoseconds per call, and the
//!   per-call time of the fastest chunk. Under QEMU TCG on a shared host, other host work
//!   stretches some chunks; the fastest chunk is the syscall's own cost.
//! - `storm THREADS N NAME [distinct]`: THREADS threads × N `delete_module(NAME)` attempts
//!   (`NAME_<thread>_<i>` each with `distinct`); prints `attempts=<total> seconds=<s>`.
//! - `paced N MICROS PREFIX`: N `delete_module(PREFIX_<i>)` attempts one every MICROS µs, each
//!   preceded by a line `sent <i> <CLOCK_MONOTONIC ns>` on stdout.
//! - `latency PREFIX`: reads `kmodmon tail --json` lines on stdin; for every event whose module
//!   starts with PREFIX, the time from its `ktime_ns` to the line's arrival; at the end prints
//!   `p50=<µs> p99=<µs> n=<events>`.
use std::ffi::CString;
use std::time::{Duration, Instant};

const CHUNK: u64 = 10_000;
const SYS_DELETE_MODULE: i64 = 176;

unsafe extern "C" {
    fn syscall(number: i64, ...) -> i64;
}

fn delete_module(name: &CString) {
    // SAFETY: a valid NUL-terminated name; delete_module only reads it.
    unsafe { syscall(SYS_DELETE_MODULE, name.as_ptr(), 0i64) };
}

fn usage() -> ! {
    eprintln!(
        "usage: kmodmon-vm-bench [CALLS] | getppid CALLS | storm THREADS N NAME [distinct] | paced N MICROS PREFIX | latency PREFIX"
    );
    std::process::exit(2);
}

fn num(args: &[String], i: usize) -> u64 {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage())
}

fn getppid(calls: u64) {
    if calls < CHUNK {
        usage();
    }
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
    println!(
        "{:.2} {:.2}",
        per_call(total, chunks * CHUNK),
        per_call(best, CHUNK)
    );
}

fn storm(threads: u64, n: u64, name: &str, distinct: bool) {
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let name = name.to_string();
            std::thread::spawn(move || {
                let same = CString::new(name.clone()).unwrap_or_default();
                for i in 0..n {
                    if distinct {
                        let each = CString::new(format!("{name}_{t}_{i}")).unwrap_or_default();
                        delete_module(&each);
                    } else {
                        delete_module(&same);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    println!(
        "attempts={} seconds={:.4}",
        threads * n,
        start.elapsed().as_secs_f64()
    );
}

/// CLOCK_MONOTONIC in ns (the clock of bpf_ktime_get_ns and of the events' `ktime_ns`).
fn monotonic_ns() -> u64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: CLOCK_MONOTONIC (1) and a valid out-pointer.
    unsafe { clock_gettime(1, &mut ts) };
    ts.sec as u64 * 1_000_000_000 + ts.nsec as u64
}

fn paced(n: u64, gap: Duration, prefix: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let mut next = Instant::now();
    for i in 0..n {
        let name = CString::new(format!("{prefix}_{i}")).unwrap_or_default();
        let _ = writeln!(out, "sent {i} {}", monotonic_ns());
        delete_module(&name);
        next += gap;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    let _ = out.flush();
}

/// The number after `"key":` in a JSON line (kmodmon's own output: no spaces).
fn json_u64(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = line[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn latency(prefix: &str) {
    use std::io::BufRead as _;
    let module = format!("\"module\":\"{prefix}");
    let mut lat: Vec<f64> = Vec::new();
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        let now = monotonic_ns();
        if line.contains(&module)
            && let Some(k) = json_u64(&line, "ktime_ns")
        {
            lat.push(now.saturating_sub(k) as f64 / 1000.0);
        }
    }
    lat.sort_by(f64::total_cmp);
    let at = |q: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!("p50={:.1} p99={:.1} n={}", at(0.5), at(0.99), lat.len());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        None => getppid(1_000_000),
        Some("getppid") => getppid(num(&args, 2)),
        Some("storm") => storm(
            num(&args, 2),
            num(&args, 3),
            args.get(4).map_or("kmodmon_vm_storm", String::as_str),
            args.get(5).is_some_and(|a| a == "distinct"),
        ),
        Some("latency") => latency(args.get(2).map_or("kmodmon_vm_paced", String::as_str)),
        Some("paced") => paced(
            num(&args, 2),
            Duration::from_micros(num(&args, 3)),
            args.get(4).map_or("kmodmon_vm_paced", String::as_str),
        ),
        Some(_) => getppid(num(&args, 1)),
    }
}
