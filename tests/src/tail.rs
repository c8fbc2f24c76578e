//! A running `kmodmon tail --json`.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub struct Tail {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    /// stderr lines seen so far.
    pub log: Vec<String>,
}

impl Tail {
    /// Starts `kmodmon tail --json ARGS` and waits until it says it is attached.
    pub fn start(args: &[&str]) -> Tail {
        let mut cmd = Command::new(crate::kmodmon_bin());
        cmd.arg("tail").arg("--json").args(args);
        Tail::spawn(cmd)
    }

    /// Starts `cmd` (which runs `kmodmon tail --json`, perhaps through a wrapper) and waits
    /// until kmodmon says it is attached.
    pub fn spawn(mut cmd: Command) -> Tail {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kmodmon");
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        let mut tail = Tail {
            child,
            stdout,
            stderr,
            log: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match tail.stderr.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let attached = line.starts_with("kmodmon: attached");
                    tail.log.push(line);
                    if attached {
                        return tail;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = tail.child.wait();
                    panic!(
                        "kmodmon exited before attaching ({status:?}):\n{}",
                        tail.log.join("\n")
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "kmodmon did not attach:\n{}",
                tail.log.join("\n")
            );
        }
    }

    /// Collects events until `done` says enough, or the timeout passes.
    pub fn collect_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        while !done(&events) && Instant::now() < deadline {
            if let Ok(line) = self.stdout.recv_timeout(Duration::from_millis(100)) {
                events.push(parse(&line));
            }
        }
        events
    }

    /// Stops kmodmon with SIGINT; returns the events it still printed and its JSON summary.
    pub fn stop(self) -> (Vec<Value>, Value) {
        self.stop_with(nix::sys::signal::Signal::SIGINT)
    }

    /// Stops kmodmon with `signal`; returns the events it still printed and its JSON summary.
    pub fn stop_with(self, signal: nix::sys::signal::Signal) -> (Vec<Value>, Value) {
        self.signal(signal);
        self.finish()
    }

    /// Sends `signal` to kmodmon (then [`Tail::finish`] waits for it).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
    }

    /// Stops kmodmon with SIGINT and returns everything it printed on stderr.
    pub fn stop_log(mut self) -> Vec<String> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let _ = self.child.wait();
        let rest: Vec<String> = self.stderr.iter().collect();
        self.log.extend(rest);
        std::mem::take(&mut self.log)
    }

    /// Waits for kmodmon to exit by itself (e.g. after --count).
    pub fn finish(mut self) -> (Vec<Value>, Value) {
        let status = self.child.wait().expect("wait kmodmon");
        let events: Vec<Value> = self.stdout.iter().map(|l| parse(&l)).collect();
        self.log.extend(self.stderr.iter());
        assert!(
            status.success(),
            "kmodmon failed: {status}\n{}",
            self.log.join("\n")
        );
        let summary = self
            .log
            .iter()
            .find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(|v| v.get("summary").is_some())
            })
            .unwrap_or_else(|| panic!("no JSON summary in:\n{}", self.log.join("\n")));
        (events, summary["summary"].clone())
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("kmodmon printed invalid JSON ({e}): {line:?}"))
}

fn lines<R: std::io::Read + Send + 'static>(r: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Checks the accounting identities of a summary: the kernel's
/// `seen = delivered + aggregated + dropped + in_flight + unread`, and the aggregated attempts'
/// `aggregated = repeats + repeats_unreported` (`repeats`: reported in repeat summaries).
pub fn assert_accounting(summary: &Value) {
    let n = |k: &str| {
        summary[k]
            .as_u64()
            .unwrap_or_else(|| panic!("summary lacks {k}: {summary}"))
    };
    assert_eq!(
        n("seen"),
        n("delivered") + n("aggregated") + n("dropped") + n("in_flight") + n("unread"),
        "accounting identity broken: {summary}"
    );
    assert_eq!(
        n("aggregated"),
        n("repeats") + n("repeats_unreported"),
        "aggregated attempts not all accounted for: {summary}"
    );
}

/// Events printed one by one, and the attempts the printed repeat summaries stand for.
pub fn split_repeats(events: &[Value]) -> (u64, u64) {
    let repeats: u64 = events.iter().filter_map(|e| e["repeat"].as_u64()).sum();
    let single = events.iter().filter(|e| e.get("repeat").is_none()).count() as u64;
    (single, repeats)
}
