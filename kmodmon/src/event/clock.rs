//! Kernel time (CLOCK_MONOTONIC, as bpf_ktime_get_ns gives it) and wall-clock time.

/// Converts between the kernel's monotonic clock and wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// wall_ns - monotonic_ns, sampled once.
    offset_ns: i128,
}

impl Clock {
    pub fn new() -> Self {
        let mono = monotonic_ns() as i128;
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Clock {
            offset_ns: wall - mono,
        }
    }

    pub fn wall(&self, ktime_ns: u64) -> std::time::SystemTime {
        let ns = (ktime_ns as i128 + self.offset_ns).max(0) as u128;
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64)
    }

    pub fn rfc3339(&self, ktime_ns: u64) -> String {
        humantime::format_rfc3339_nanos(self.wall(ktime_ns)).to_string()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of bpf_ktime_get_ns).
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}

/// An event's `time` (RFC 3339, as written) back as a point in time.
pub fn parse_event_time(s: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339(s).ok().or_else(|| {
        s.parse::<jiff::Timestamp>()
            .ok()
            .map(std::time::SystemTime::from)
    })
}
