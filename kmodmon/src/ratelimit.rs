//! A per-cgroup rate limit on audit records for what unprivileged processes can cause at will:
//! module syscall attempts, autoload requests, and the policy's decisions on them.
//!
//! Any process can call `delete_module("x")` in a loop and make a record of about 700 bytes
//! each time. [`RateLimiter`] gives every cgroup a token bucket (`rate` records a second,
//! bursts of `burst`); beyond it an event is not recorded on its own but **aggregated**: counted
//! by kind and module into a [`Summary`] that is recorded instead (the audit log writes it as a
//! `rate_limited` record whose `count` says how many events it stands for). Nothing is dropped
//! silently: every aggregated event is in exactly one summary, [`RateLimiter::due`] hands
//! summaries out periodically and [`RateLimiter::flush`] hands out the rest at shutdown.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use kmodmon::event::{Clock, Event, Kind};
//! use kmodmon::ratelimit::{Admit, RateLimitConfig, RateLimiter};
//!
//! let mut rl = RateLimiter::new(RateLimitConfig { rate: 1, burst: 2, ..Default::default() });
//! let ev = Event::synthetic(Kind::UnloadAttempt, &Clock::new());
//! let now = Instant::now();
//! assert_eq!(rl.admit_at(&ev, now), Admit::Record);
//! assert_eq!(rl.admit_at(&ev, now), Admit::Record);
//! assert_eq!(rl.admit_at(&ev, now), Admit::Aggregate);
//! let summaries = rl.due(now + Duration::from_secs(60));
//! assert_eq!(summaries[0].count, 1);
//! ```
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::event::{Event, Kind};

/// The limit. Defaults: 20 records a second per cgroup, bursts of 200, a summary at most
/// every 10 s per cgroup, 4096 cgroups tracked.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Records a second per cgroup (the bucket's refill rate). 0 turns the limit off.
    pub rate: u32,
    /// Records a cgroup may make at once (the bucket's size).
    pub burst: u32,
    /// How long events are aggregated before their summary is handed out.
    #[serde(with = "humantime_serde_secs")]
    pub summary_every: Duration,
    /// Cgroups tracked at once; beyond that, new cgroups share one bucket (their summary has
    /// no `cgroup_id`).
    pub max_cgroups: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            rate: 20,
            burst: 200,
            summary_every: Duration::from_secs(10),
            max_cgroups: 4096,
        }
    }
}

mod humantime_serde_secs {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// What to do with one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Record it as usual.
    Record,
    /// Do not record it on its own: it is counted into its cgroup's next [`Summary`].
    Aggregate,
}

/// Events of one cgroup that were aggregated instead of recorded. Serialised as the audit
/// log's `rate_limited` record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// When the summary was made.
    pub time: String,
    /// `None` for the shared bucket of cgroups beyond `max_cgroups`.
    pub cgroup_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// Events this summary stands for.
    pub count: u64,
    /// Per kind.
    pub kinds: BTreeMap<String, u64>,
    /// Per module name (the first [`MAX_MODULES`] distinct names).
    pub modules: BTreeMap<String, u64>,
    /// Events whose module is not among `modules` (more distinct names, or no name).
    pub other_modules: u64,
    /// Times of the first and last event aggregated.
    pub first_time: String,
    pub last_time: String,
    /// The limit in force.
    pub rate: u32,
    pub burst: u32,
}

/// Distinct module names a summary lists.
pub const MAX_MODULES: usize = 16;

/// Kinds an unprivileged process can cause at will, and which are therefore limited. Kernel
/// records of real loads and unloads, and kmodmon's own events, are never limited.
pub fn is_limited(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::LoadAttempt | Kind::UnloadAttempt | Kind::Request | Kind::Denied | Kind::WouldDeny
    )
}

struct Bucket {
    tokens: f64,
    last: Instant,
    agg: Option<(Instant, Summary)>,
}

/// The shared bucket's key (no cgroup has this id).
const OVERFLOW: u64 = u64::MAX;

/// Per-cgroup token buckets and the summaries of what they held back. Not thread-safe by
/// itself: own it in the pipeline task (or wrap it in a mutex).
pub struct RateLimiter {
    cfg: RateLimitConfig,
    buckets: HashMap<u64, Bucket>,
    pending: u64,
}

impl RateLimiter {
    pub fn new(cfg: RateLimitConfig) -> RateLimiter {
        RateLimiter {
            cfg,
            buckets: HashMap::new(),
            pending: 0,
        }
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.cfg
    }

    /// [`RateLimiter::admit_at`] now.
    pub fn admit(&mut self, ev: &Event) -> Admit {
        self.admit_at(ev, Instant::now())
    }

    /// Takes a token from the event's cgroup bucket, or aggregates the event.
    pub fn admit_at(&mut self, ev: &Event, now: Instant) -> Admit {
        if self.cfg.rate == 0 || !is_limited(ev.kind) {
            return Admit::Record;
        }
        let key = if self.buckets.contains_key(&ev.cgroup_id)
            || self.buckets.len() < self.cfg.max_cgroups.max(1)
        {
            ev.cgroup_id
        } else {
            OVERFLOW
        };
        let burst = f64::from(self.cfg.burst.max(1));
        let rate = f64::from(self.cfg.rate);
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            last: now,
            agg: None,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Admit::Record;
        }
        let (_, s) = b.agg.get_or_insert_with(|| {
            (
                now,
                Summary {
                    cgroup_id: (key != OVERFLOW).then_some(key),
                    cgroup_path: if key != OVERFLOW {
                        ev.cgroup_path.clone()
                    } else {
                        None
                    },
                    container_id: ev
                        .container
                        .as_ref()
                        .filter(|_| key != OVERFLOW)
                        .map(|c| c.id.clone()),
                    container_name: ev
                        .container
                        .as_ref()
                        .filter(|_| key != OVERFLOW)
                        .and_then(|c| c.name.clone()),
                    first_time: ev.time.clone(),
                    ..Default::default()
                },
            )
        });
        s.count += 1;
        *s.kinds.entry(ev.kind.as_str().to_string()).or_default() += 1;
        match &ev.module {
            Some(m) if s.modules.contains_key(m) || s.modules.len() < MAX_MODULES => {
                *s.modules.entry(m.clone()).or_default() += 1;
            }
            _ => s.other_modules += 1,
        }
        s.last_time = ev.time.clone();
        self.pending += 1;
        Admit::Aggregate
    }

    /// Summaries whose aggregation began at least `summary_every` before `now`; also forgets
    /// idle cgroups (full bucket, nothing held back). Call it about once a second.
    pub fn due(&mut self, now: Instant) -> Vec<Summary> {
        let every = self.cfg.summary_every;
        let out = self.take(|started| now.saturating_duration_since(started) >= every);
        let refill = Duration::from_secs_f64(
            f64::from(self.cfg.burst.max(1)) / f64::from(self.cfg.rate.max(1)),
        );
        self.buckets
            .retain(|_, b| b.agg.is_some() || now.saturating_duration_since(b.last) < refill);
        out
    }

    /// Every summary still pending (at shutdown: nothing aggregated may vanish).
    pub fn flush(&mut self) -> Vec<Summary> {
        self.take(|_| true)
    }

    /// Events aggregated and not yet handed out in a summary.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    fn take(&mut self, due: impl Fn(Instant) -> bool) -> Vec<Summary> {
        let time = crate::audit::record::now_rfc3339();
        let mut out = Vec::new();
        for b in self.buckets.values_mut() {
            if b.agg.as_ref().is_some_and(|(started, _)| due(*started))
                && let Some((_, mut s)) = b.agg.take()
            {
                s.time.clone_from(&time);
                s.rate = self.cfg.rate;
                s.burst = self.cfg.burst;
                self.pending -= s.count;
                out.push(s);
            }
        }
        out.sort_by_key(|s| s.cgroup_id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Clock, Container};

    fn ev(kind: Kind, cgroup: u64, module: &str) -> Event {
        let mut e = Event::synthetic(kind, &Clock::new());
        e.cgroup_id = cgroup;
        e.cgroup_path = Some(format!("/cg{cgroup}"));
        e.module = Some(module.to_string());
        e
    }

    fn cfg(rate: u32, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            rate,
            burst,
            summary_every: Duration::from_secs(10),
            max_cgroups: 3,
        }
    }

    #[test]
    fn a_burst_then_the_rate_per_cgroup() {
        let mut rl = RateLimiter::new(cfg(2, 5));
        let t0 = Instant::now();
        let admitted = (0..20)
            .filter(|_| rl.admit_at(&ev(Kind::UnloadAttempt, 7, "x"), t0) == Admit::Record)
            .count();
        assert_eq!(admitted, 5, "the burst");
        // Another cgroup has its own bucket.
        assert_eq!(
            rl.admit_at(&ev(Kind::UnloadAttempt, 8, "x"), t0),
            Admit::Record
        );
        // Two tokens a second come back.
        let t1 = t0 + Duration::from_secs(1);
        let admitted = (0..10)
            .filter(|_| rl.admit_at(&ev(Kind::LoadAttempt, 7, "y"), t1) == Admit::Record)
            .count();
        assert_eq!(admitted, 2);
        assert_eq!(rl.pending(), 15 + 8);
    }

    #[test]
    fn kernel_loads_and_own_events_are_never_limited() {
        let mut rl = RateLimiter::new(cfg(1, 1));
        let t = Instant::now();
        for kind in [Kind::Load, Kind::Unload, Kind::Expectation, Kind::SelfLoad] {
            for _ in 0..10 {
                assert_eq!(rl.admit_at(&ev(kind, 1, "m"), t), Admit::Record);
            }
        }
        assert!(is_limited(Kind::Request) && is_limited(Kind::Denied));
        let mut off = RateLimiter::new(cfg(0, 1));
        for _ in 0..100 {
            assert_eq!(
                off.admit_at(&ev(Kind::UnloadAttempt, 1, "m"), t),
                Admit::Record
            );
        }
    }

    #[test]
    fn every_aggregated_event_is_in_exactly_one_summary() {
        let mut rl = RateLimiter::new(cfg(1, 1));
        let t0 = Instant::now();
        let mut aggregated = 0;
        for i in 0..100u64 {
            let mut e = ev(Kind::UnloadAttempt, 1 + i % 2, &format!("m{}", i % 20));
            e.container = Some(Container {
                id: "c".repeat(64),
                runtime: "docker".into(),
                name: Some("web".into()),
                ..Default::default()
            });
            if i % 10 == 0 {
                e.kind = Kind::LoadAttempt;
            }
            if rl.admit_at(&e, t0 + Duration::from_millis(i)) == Admit::Aggregate {
                aggregated += 1;
            }
        }
        assert!(
            rl.due(t0 + Duration::from_secs(5)).is_empty(),
            "not due yet"
        );
        let first = rl.due(t0 + Duration::from_secs(11));
        assert_eq!(first.len(), 2, "one per cgroup");
        let total: u64 = first.iter().map(|s| s.count).sum();
        assert_eq!(total, aggregated);
        for s in &first {
            assert_eq!(s.kinds.values().sum::<u64>(), s.count);
            assert_eq!(s.modules.values().sum::<u64>() + s.other_modules, s.count);
            assert!(s.modules.len() <= MAX_MODULES);
            assert_eq!(s.container_name.as_deref(), Some("web"));
            assert_eq!(s.cgroup_path, Some(format!("/cg{}", s.cgroup_id.unwrap())));
            assert_eq!((s.rate, s.burst), (1, 1));
        }
        assert_eq!(rl.pending(), 0);
        assert!(rl.flush().is_empty());
        // Held back at shutdown: flush hands it out.
        rl.admit_at(
            &ev(Kind::UnloadAttempt, 1, "m"),
            t0 + Duration::from_secs(12),
        );
        rl.admit_at(
            &ev(Kind::UnloadAttempt, 1, "m"),
            t0 + Duration::from_secs(12),
        );
        let left = rl.flush();
        assert_eq!(left.iter().map(|s| s.count).sum::<u64>(), 1);
        assert_eq!(rl.pending(), 0);
    }

    #[test]
    fn cgroups_beyond_the_cap_share_one_bucket_and_idle_ones_are_forgotten() {
        let mut rl = RateLimiter::new(cfg(1, 1));
        let t0 = Instant::now();
        for cg in 1..=3 {
            rl.admit_at(&ev(Kind::UnloadAttempt, cg, "m"), t0);
        }
        // Cgroups 4 and 5 share the overflow bucket: one record between them.
        assert_eq!(
            rl.admit_at(&ev(Kind::UnloadAttempt, 4, "m"), t0),
            Admit::Record
        );
        assert_eq!(
            rl.admit_at(&ev(Kind::UnloadAttempt, 5, "m"), t0),
            Admit::Aggregate
        );
        let s = rl.due(t0 + Duration::from_secs(10));
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].cgroup_id, s[0].cgroup_path.as_deref()), (None, None));
        // All idle now: forgotten, so new cgroups get buckets of their own again.
        let _ = rl.due(t0 + Duration::from_secs(20));
        assert_eq!(
            rl.admit_at(
                &ev(Kind::UnloadAttempt, 9, "m"),
                t0 + Duration::from_secs(20)
            ),
            Admit::Record
        );
        assert_eq!(rl.buckets.len(), 1);
    }

    #[test]
    fn summaries_serialise_as_records_with_a_count() {
        let mut rl = RateLimiter::new(cfg(1, 1));
        let t0 = Instant::now();
        rl.admit_at(&ev(Kind::UnloadAttempt, 1, "m"), t0);
        rl.admit_at(&ev(Kind::UnloadAttempt, 1, "m"), t0);
        let s = rl.flush().remove(0);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["count"], 1);
        assert_eq!(v["kinds"]["unload_attempt"], 1);
        assert_eq!(v["modules"]["m"], 1);
        let back: Summary = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }
}
