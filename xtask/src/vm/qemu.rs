//! Boots a kernel and initrd under QEMU (TCG: KVM hangs on this machine kind), reads the
//! script's output from the first serial port, keeps the kernel console of the second in
//! console.log, enforces a timeout and tells why a run gave no result (panic, oops, timeout).
use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{kernels::Kernel, protocol::Transcript};

pub struct VmConfig {
    pub memory_mb: u32,
    pub timeout: Duration,
    /// Print the script's output live (vm-run) instead of only collecting it.
    pub echo: bool,
    /// Extra kernel command-line words.
    pub append: String,
    /// Instruction counting (`-icount shift=0`): the guest's clock advances one nanosecond per
    /// instruction executed, so timings inside are deterministic instruction counts (a cost
    /// model for comparing mechanisms, not wall time), free of the host's load.
    pub icount: bool,
    /// Extra qemu arguments (e.g. `-icount shift=0` for a deterministic instruction clock).
    pub qemu_args: Vec<String>,
}

impl Default for VmConfig {
    fn default() -> Self {
        let timeout = std::env::var("KMODMON_VM_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        VmConfig {
            memory_mb: 1024,
            timeout: Duration::from_secs(timeout),
            echo: false,
            append: String::new(),
            icount: false,
            qemu_args: Vec::new(),
        }
    }
}

pub struct VmRun {
    pub transcript: Transcript,
    /// The kernel's console (ttyS1).
    pub console: String,
    pub elapsed: Duration,
    pub timed_out: bool,
    pub status: Option<ExitStatus>,
    pub qemu_stderr: String,
}

/// Console lines that mean the kernel itself failed.
const KERNEL_TROUBLE: &[&str] = &[
    "Kernel panic",
    "BUG: ",
    "Oops: ",
    "general protection fault",
    "WARNING: CPU:",
    "Call Trace:",
];

impl VmRun {
    /// The script's exit code, when the VM got that far.
    pub fn rc(&self) -> Option<i32> {
        self.transcript.result.map(|(rc, _)| rc)
    }

    /// Lines of the kernel console that show a kernel problem (with a little context).
    pub fn kernel_trouble(&self) -> Vec<String> {
        let lines: Vec<&str> = self.console.lines().collect();
        let mut out = Vec::new();
        let mut until = 0;
        for (i, l) in lines.iter().enumerate() {
            if KERNEL_TROUBLE.iter().any(|t| l.contains(t)) {
                until = until.max(i + 12);
            }
            if i < until {
                out.push(l.to_string());
            }
        }
        out
    }

    /// Why the VM gave no usable result, in words; None when the script ran to its end.
    pub fn failure(&self) -> Option<String> {
        let trouble = self.kernel_trouble();
        let tail = |s: &str, n: usize| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n    ")
        };
        let why = if self.timed_out {
            format!(
                "timed out after {} s (set KMODMON_VM_TIMEOUT to wait longer)",
                self.elapsed.as_secs()
            )
        } else if self.transcript.result.is_some() {
            if trouble.iter().any(|l| l.contains("Kernel panic")) {
                "the kernel panicked after the script ended".to_string()
            } else {
                return None;
            }
        } else if trouble.iter().any(|l| l.contains("Kernel panic")) {
            "the kernel panicked".to_string()
        } else if self.transcript.booted.is_none() {
            format!(
                "the VM never reached the script (qemu exit: {:?})",
                self.status
            )
        } else {
            format!(
                "the VM stopped without a KMODMON-VM-RESULT line (qemu exit: {:?})",
                self.status
            )
        };
        let mut msg = why;
        if !trouble.is_empty() {
            msg.push_str(&format!(
                "\n  kernel console:\n    {}",
                trouble.join("\n    ")
            ));
        } else if !self.console.trim().is_empty() {
            msg.push_str(&format!(
                "\n  last kernel console lines:\n    {}",
                tail(&self.console, 15)
            ));
        }
        if !self.qemu_stderr.trim().is_empty() {
            msg.push_str(&format!("\n  qemu: {}", self.qemu_stderr.trim()));
        }
        Some(msg)
    }
}

/// The qemu command line (no KVM: it hangs here; `-cpu host` aborts).
pub fn command(kernel: &Kernel, initrd: &Path, console_log: &Path, cfg: &VmConfig) -> Command {
    // no_timer_check: under a loaded host, TCG's timer can be too slow for the kernel's
    // IO-APIC timer check, which then panics ("IO-APIC + timer doesn't work") before init.
    let mut append = String::from("console=ttyS1 panic=-1 quiet mitigations=off no_timer_check");
    if !cfg.append.is_empty() {
        append.push(' ');
        append.push_str(&cfg.append);
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .args(["-m", &cfg.memory_mb.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
        ])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .args([
            "-chardev",
            "stdio,id=data,signal=off",
            "-serial",
            "chardev:data",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console_log.display()))
        .args(&cfg.qemu_args);
    if cfg.icount {
        cmd.args(["-icount", "shift=0"]);
    }
    cmd
}

/// Boots the VM and waits for it to power off (or the timeout).
pub fn boot(kernel: &Kernel, initrd: &Path, run_dir: &Path, cfg: &VmConfig) -> Result<VmRun> {
    fs::create_dir_all(run_dir)?;
    let console_log: PathBuf = run_dir.join("console.log");
    let _ = fs::remove_file(&console_log);
    let start = Instant::now();
    let mut child = command(kernel, initrd, &console_log, cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let echo = cfg.echo;
    let reader = thread::spawn(move || {
        let mut t = Transcript::default();
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut buf) {
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf);
            if let Some(out) = t.feed(line.trim_end_matches('\n'))
                && echo
            {
                println!("{out}");
            }
            buf.clear();
        }
        t.finish();
        t
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > cfg.timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().ok();
        }
        thread::sleep(Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let transcript = reader.join().unwrap_or_default();
    let qemu_stderr = err_reader.join().unwrap_or_default();
    let console = fs::read(&console_log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Ok(VmRun {
        transcript,
        console,
        elapsed,
        timed_out,
        status,
        qemu_stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(console: &str, result: Option<i32>, timed_out: bool) -> VmRun {
        let mut transcript = Transcript::default();
        transcript.booted = Some(("r".into(), 1.0));
        transcript.result = result.map(|rc| (rc, None));
        VmRun {
            transcript,
            console: console.to_string(),
            elapsed: Duration::from_secs(3),
            timed_out,
            status: None,
            qemu_stderr: String::new(),
        }
    }

    #[test]
    fn a_finished_script_is_no_failure_even_with_a_nonzero_rc() {
        assert_eq!(run_with("boot\n", Some(1), false).failure(), None);
    }

    #[test]
    fn panic_and_timeout_are_named() {
        let panic = run_with(
            "a\nKernel panic - not syncing: Attempted to kill init!\nCPU: 0\n",
            None,
            false,
        );
        let msg = panic.failure().unwrap();
        assert!(msg.starts_with("the kernel panicked"), "{msg}");
        assert!(msg.contains("Attempted to kill init"), "{msg}");
        let msg = run_with("", None, true).failure().unwrap();
        assert!(msg.contains("timed out"), "{msg}");
        let msg = run_with("last words\n", None, false).failure().unwrap();
        assert!(
            msg.contains("without a KMODMON-VM-RESULT") && msg.contains("last words"),
            "{msg}"
        );
    }

    #[test]
    fn kernel_trouble_keeps_context_after_the_marker() {
        let console = "ok\nBUG: unable to handle page fault\n RIP: x\nfine\n";
        let run = run_with(console, Some(0), false);
        assert_eq!(
            run.kernel_trouble(),
            ["BUG: unable to handle page fault", " RIP: x", "fine"]
        );
    }
}
