//! The daemon's health, as the metrics endpoint reports it to orchestrators: `/ready` (probes
//! attached and the event loop turning) for readiness probes and load balancers, `/healthz`
//! (the event loop has not stalled) for liveness probes.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Readiness fails when the event loop has not turned for this long (it turns every second).
pub const READY_STALE_MS: u64 = 10_000;
/// Liveness fails when the event loop has not turned for this long.
pub const LIVE_STALE_MS: u64 = 60_000;

/// Shared health state: the daemon marks itself attached once its probes (and policy, if any)
/// are in place, and beats once per turn of its event loop.
pub struct Health {
    origin: Instant,
    attached: AtomicBool,
    /// Milliseconds since `origin` of the last beat; 0 = never.
    last_beat: AtomicU64,
}

/// The answer for one probe: HTTP status and a one-line reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Status {
    pub ok: bool,
    pub reason: String,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            origin: Instant::now(),
            attached: AtomicBool::new(false),
            last_beat: AtomicU64::new(0),
        }
    }
}

impl Health {
    /// Probes are attached (and the policy, if configured, is in force).
    pub fn set_attached(&self) {
        self.beat();
        self.attached.store(true, Relaxed);
    }

    /// The event loop turned.
    pub fn beat(&self) {
        let ms = self.origin.elapsed().as_millis();
        self.last_beat
            .store(u64::try_from(ms).unwrap_or(u64::MAX).max(1), Relaxed);
    }

    fn since_beat_ms(&self) -> Option<u64> {
        match self.last_beat.load(Relaxed) {
            0 => None,
            at => Some(
                u64::try_from(self.origin.elapsed().as_millis())
                    .unwrap_or(u64::MAX)
                    .saturating_sub(at),
            ),
        }
    }

    /// Ready: attached, and the event loop turned within [`READY_STALE_MS`].
    pub fn ready(&self) -> Status {
        if !self.attached.load(Relaxed) {
            return Status::fail("starting: probes not attached yet");
        }
        match self.since_beat_ms() {
            Some(ms) if ms <= READY_STALE_MS => Status::pass("ready"),
            Some(ms) => Status::fail(format!("event loop stalled for {ms} ms")),
            None => Status::fail("event loop not started"),
        }
    }

    /// Live: not stalled for [`LIVE_STALE_MS`] (still starting counts as live: attaching can take
    /// seconds on a slow machine and a restart would not make it faster).
    pub fn live(&self) -> Status {
        match self.since_beat_ms() {
            Some(ms) if ms > LIVE_STALE_MS => {
                Status::fail(format!("event loop stalled for {ms} ms"))
            }
            _ => Status::pass("alive"),
        }
    }
}

impl Status {
    fn pass(reason: impl Into<String>) -> Status {
        Status {
            ok: true,
            reason: reason.into(),
        }
    }

    fn fail(reason: impl Into<String>) -> Status {
        Status {
            ok: false,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_until_attached_then_ready_while_beating() {
        let h = Health::default();
        assert!(!h.ready().ok);
        assert!(h.ready().reason.contains("not attached"));
        assert!(h.live().ok, "starting counts as live");
        h.set_attached();
        assert_eq!(h.ready(), Status::pass("ready"));
        assert!(h.live().ok);
    }

    #[test]
    fn a_stalled_loop_fails_both() {
        let h = Health::default();
        h.set_attached();
        // Pretend the last beat was long ago.
        h.last_beat.store(1, Relaxed);
        let Some(origin) =
            Instant::now().checked_sub(std::time::Duration::from_millis(LIVE_STALE_MS + 5_000))
        else {
            return; // the monotonic clock is younger than a minute: nothing to pretend with
        };
        let h = Health { origin, ..h };
        let r = h.ready();
        assert!(!r.ok && r.reason.contains("stalled"), "{r:?}");
        assert!(!h.live().ok);
    }
}
