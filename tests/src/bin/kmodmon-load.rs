//! Load generator for `cargo xtask bench` (not a test):
//!   kmodmon-load getppid N          → ns per getppid() over N calls
//!   kmodmon-load storm THREADS N [distinct] → THREADS threads × N delete_module attempts
//!                                     (each a distinct name with `distinct`); prints
//!                                     "attempts=<total> seconds=<s> rate=<attempts/s>"
//!   kmodmon-load paced N MICROS PREFIX → N delete_module(PREFIX_<i>) attempts, one every
//!                                     MICROS µs
//!   kmodmon-load seccomp ACTION CMD [ARGS...] → runs CMD under a seccomp filter that answers
//!                                     init_module, finit_module and delete_module with ACTION
//!                                     (errno[:N], kill-thread, kill-process, trap) and allows
//!                                     everything else, as container runtimes' default
//!                                     profiles do for these three
//!   kmodmon-load delete NAME         → one delete_module(NAME, O_NONBLOCK); prints "ret=R errno=E"
//!   kmodmon-load finit PATH [PARAMS] → one finit_module on PATH; prints "ret=R errno=E"
//!   kmodmon-load thread-delete NAME  → delete_module(NAME) in a second thread; the main thread
//!                                     prints "thread=ok|killed" and exits 0
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
        Some("seccomp") => {
            let Some(action) = args.get(2).and_then(|a| parse_action(a)) else {
                eprintln!(
                    "kmodmon-load seccomp: ACTION is errno[:N], kill-thread, kill-process or trap"
                );
                std::process::exit(2);
            };
            let Some(cmd) = args.get(3) else {
                eprintln!("kmodmon-load seccomp ACTION CMD [ARGS...]");
                std::process::exit(2);
            };
            if let Err(e) = confine(action) {
                eprintln!("kmodmon-load: installing the seccomp filter: {e}");
                std::process::exit(1);
            }
            use std::os::unix::process::CommandExt as _;
            let e = std::process::Command::new(cmd).args(&args[4..]).exec();
            eprintln!("kmodmon-load: exec {cmd}: {e}");
            std::process::exit(127);
        }
        Some("delete") => {
            let name = cstring(args.get(2).map_or("kmodmon_load_delete", String::as_str));
            // SAFETY: a valid NUL-terminated name; the call only reads it.
            let ret =
                unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) };
            report(ret);
        }
        Some("finit") => {
            let path = args.get(2).map_or("/dev/null", String::as_str);
            let params = cstring(args.get(3).map_or("", String::as_str));
            let file = match std::fs::File::open(path) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("kmodmon-load finit: {path}: {e}");
                    std::process::exit(1);
                }
            };
            use std::os::fd::AsRawFd as _;
            // SAFETY: an open fd and a valid NUL-terminated parameter string.
            let ret = unsafe {
                libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0)
            };
            report(ret);
        }
        Some("thread-delete") => {
            let name = cstring(args.get(2).map_or("kmodmon_load_thread", String::as_str));
            let t = std::thread::spawn(move || {
                // SAFETY: as above.
                unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) }
            });
            // A thread killed by seccomp never finishes: wait a bounded time for it.
            let deadline = Instant::now() + std::time::Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            println!("thread={}", if t.is_finished() { "ok" } else { "killed" });
            std::process::exit(0);
        }
        _ => {
            eprintln!(
                "usage: kmodmon-load getppid N | storm THREADS N [distinct] | paced N MICROS PREFIX | \
                 seccomp ACTION CMD [ARGS...] | delete NAME | finit PATH [PARAMS] | thread-delete NAME"
            );
            std::process::exit(2);
        }
    }
}

fn cstring(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).unwrap_or_default()
}

fn report(ret: libc::c_long) {
    let errno = if ret < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    };
    println!("ret={ret} errno={errno}");
}

fn parse_action(s: &str) -> Option<seccompiler::SeccompAction> {
    use seccompiler::SeccompAction;
    match s {
        "errno" => Some(SeccompAction::Errno(libc::EPERM as u32)),
        "kill-thread" => Some(SeccompAction::KillThread),
        "kill-process" => Some(SeccompAction::KillProcess),
        "trap" => Some(SeccompAction::Trap),
        _ => s
            .strip_prefix("errno:")
            .and_then(|n| n.parse().ok())
            .map(SeccompAction::Errno),
    }
}

/// Installs (with no_new_privs) a filter answering the three module syscalls with `action`.
fn confine(action: seccompiler::SeccompAction) -> Result<(), seccompiler::Error> {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let rules = [
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new()))
    .collect();
    #[cfg(target_arch = "x86_64")]
    let arch = TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    let arch = TargetArch::aarch64;
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, action, arch)?;
    let program: seccompiler::BpfProgram = filter.try_into()?;
    seccompiler::apply_filter(&program)
}
