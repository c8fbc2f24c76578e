//! Return probes made through tracefs, with an explicit `maxactive`.
//!
//! A kretprobe tracks each call it must see return in one of `maxactive` instances; a call
//! made while all are in use is not probed at its return (the kernel only counts it as
//! missed). aya (like a perf kprobe PMU event) leaves `maxactive` to the kernel's default,
//! which is one instance per CPU on kernels without CONFIG_PREEMPTION (Debian 5.10): measured
//! in a 1-CPU VM, 4 threads × 20,000 delete_module attempts reached the return program about
//! 25,000 times. A tracefs kprobe event `rN:GROUP/NAME FUNC` sets maxactive to N; the BPF
//! program is then attached to that event's perf tracepoint with PERF_EVENT_IOC_SET_BPF.
//! One perf event serves every CPU: the kernel runs the event's programs before it looks at
//! per-CPU perf listeners.
//!
//! Each event is named after this process (`kmodmon/kmodmon_<pid>_<function>`) and removed on
//! drop; events left by a kmodmon that died are removed when the next one starts.
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The tracefs group of kmodmon's probe events.
pub const GROUP: &str = "kmodmon";

#[derive(Debug, Error)]
pub enum KretprobeError {
    #[error("creating kretprobe event {event} ({action}): {err}")]
    Event {
        event: String,
        action: &'static str,
        err: std::io::Error,
    },
    #[error("attaching to kretprobe event {event} ({call}): {err}")]
    Attach {
        event: String,
        call: &'static str,
        err: std::io::Error,
    },
}

/// A tracefs kretprobe event with a BPF program attached; detached and removed on drop.
#[derive(Debug)]
pub struct TracefsKretprobe {
    tracefs: PathBuf,
    event: String,
    /// The perf event the program is attached to (closed before the event is removed).
    perf: Option<OwnedFd>,
}

/// `struct perf_event_attr` up to `config1` (PERF_ATTR_SIZE_VER0, 64 bytes): the kernel
/// accepts the first version's size and zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == 64);

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// _IOW('$', 8, __u32)
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
/// _IO('$', 0)
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;

/// The event name for `func` in this process.
fn event_name(func: &str) -> String {
    format!(
        "kmodmon_{}_{}",
        std::process::id(),
        func.trim_start_matches('_')
    )
}

/// Writes one tracefs command in a single write(2) (tracefs parses each write as a command).
fn command(tracefs: &Path, cmd: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .append(true)
        .open(tracefs.join("kprobe_events"))?;
    f.write_all(cmd.as_bytes())
}

impl TracefsKretprobe {
    /// Creates `r<maxactive>:kmodmon/<name> <func>` and attaches the loaded kprobe-type
    /// program `prog_fd` to it.
    pub fn attach(
        tracefs: &Path,
        func: &str,
        maxactive: u32,
        prog_fd: RawFd,
    ) -> Result<TracefsKretprobe, KretprobeError> {
        let event = event_name(func);
        let full = format!("{GROUP}/{event}");
        command(tracefs, &format!("r{maxactive}:{full} {func}\n")).map_err(|err| {
            KretprobeError::Event {
                event: full.clone(),
                action: "write kprobe_events",
                err,
            }
        })?;
        // From here on, drop removes the event.
        let mut probe = TracefsKretprobe {
            tracefs: tracefs.to_path_buf(),
            event,
            perf: None,
        };
        let id_path = tracefs
            .join("events")
            .join(GROUP)
            .join(&probe.event)
            .join("id");
        let id: u64 = std::fs::read_to_string(&id_path)
            .and_then(|s| {
                s.trim()
                    .parse()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })
            .map_err(|err| KretprobeError::Event {
                event: full.clone(),
                action: "read its id",
                err,
            })?;
        let attr = PerfEventAttr {
            type_: PERF_TYPE_TRACEPOINT,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config: id,
            sample_period: 1,
            wakeup_events: 1,
            ..PerfEventAttr::default()
        };
        let attach_err = |call, err| KretprobeError::Attach {
            event: full.clone(),
            call,
            err,
        };
        // SAFETY: perf_event_open with a valid attr of the size it states; pid -1 and CPU 0:
        // the event's BPF programs run for every task on every CPU.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                -1,
                0,
                -1,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(attach_err(
                "perf_event_open",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: a new file descriptor we own.
        let perf = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // SAFETY: ioctls on our perf event fd with an integer argument.
        if unsafe { libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog_fd) } != 0 {
            return Err(attach_err(
                "PERF_EVENT_IOC_SET_BPF",
                std::io::Error::last_os_error(),
            ));
        }
        probe.perf = Some(perf);
        // SAFETY: as above.
        if unsafe { libc::ioctl(fd as RawFd, PERF_EVENT_IOC_ENABLE, 0) } != 0 {
            return Err(attach_err(
                "PERF_EVENT_IOC_ENABLE",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(probe)
    }

    /// The event's name in kprobe_profile.
    pub fn name(&self) -> &str {
        &self.event
    }
}

impl Drop for TracefsKretprobe {
    fn drop(&mut self) {
        // The event cannot be removed while a perf event uses it.
        drop(self.perf.take());
        if let Err(e) = command(&self.tracefs, &format!("-:{GROUP}/{}\n", self.event)) {
            log::warn!(
                "removing kretprobe event {GROUP}/{}: {e} (remove it with `echo '-:{GROUP}/{}' >> {}`)",
                self.event,
                self.event,
                self.tracefs.join("kprobe_events").display()
            );
        }
    }
}

/// Removes kmodmon's probe events whose process is gone (a kmodmon that was killed).
pub fn remove_stale(tracefs: &Path) {
    let Ok(list) = std::fs::read_to_string(tracefs.join("kprobe_events")) else {
        return;
    };
    for event in stale_events(&list, |pid| Path::new(&format!("/proc/{pid}")).exists()) {
        match command(tracefs, &format!("-:{GROUP}/{event}\n")) {
            Ok(()) => log::info!("removed kretprobe event {GROUP}/{event} left by a dead kmodmon"),
            Err(e) => log::debug!("removing stale {GROUP}/{event}: {e}"),
        }
    }
}

/// kmodmon events in a kprobe_events listing whose pid `alive` says is gone.
fn stale_events(list: &str, alive: impl Fn(u32) -> bool) -> Vec<String> {
    list.lines()
        .filter_map(|l| {
            // "r256:kmodmon/kmodmon_123_x64_sys_finit_module __x64_sys_finit_module"
            let spec = l.split_whitespace().next()?;
            let (_, name) = spec.split_once(':')?;
            let event = name.strip_prefix(GROUP)?.strip_prefix('/')?;
            let pid: u32 = event
                .strip_prefix("kmodmon_")?
                .split('_')
                .next()?
                .parse()
                .ok()?;
            (!alive(pid)).then(|| event.to_string())
        })
        .collect()
}

/// Missed returns of kmodmon's kretprobe `events`, from kprobe_profile
/// (`<event> <hits> <misses>` per line).
pub fn missed(tracefs: &Path, events: &[String]) -> Option<u64> {
    let text = std::fs::read_to_string(tracefs.join("kprobe_profile")).ok()?;
    Some(profile_misses(&text, events))
}

fn profile_misses(text: &str, events: &[String]) -> u64 {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            let misses = f.nth(1)?.parse::<u64>().ok()?;
            events.iter().any(|e| e == name).then_some(misses)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_events_are_those_of_dead_kmodmons() {
        let list = "r256:kmodmon/kmodmon_100_x64_sys_finit_module __x64_sys_finit_module\n\
                    r256:kmodmon/kmodmon_200_x64_sys_delete_module __x64_sys_delete_module\n\
                    p:kprobes/other do_sys_open\n\
                    r64:kmodmon/unrelated_300 foo\n";
        assert_eq!(
            stale_events(list, |pid| pid == 200),
            ["kmodmon_100_x64_sys_finit_module"]
        );
    }

    #[test]
    fn misses_are_summed_over_our_events() {
        let text = "  kmodmon_1_x64_sys_finit_module        10  2\n\
                    kmodmon_1_x64_sys_delete_module  5 3\n  other 1 99\n";
        let ours = [
            "kmodmon_1_x64_sys_finit_module".to_string(),
            "kmodmon_1_x64_sys_delete_module".to_string(),
        ];
        assert_eq!(profile_misses(text, &ours), 5);
        assert_eq!(profile_misses(text, &[]), 0);
    }

    #[test]
    fn event_names_fit_tracefs() {
        let n = event_name("__x64_sys_finit_module");
        assert!(n.starts_with("kmodmon_") && n.ends_with("_x64_sys_finit_module"));
        // MAX_EVENT_NAME_LEN is 64.
        assert!(n.len() < 64);
    }
}
