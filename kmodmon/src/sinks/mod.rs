//! Where enriched events go: terminal lines ([`human`]), JSON lines ([`json`]), the audit log
//! ([`audit`]), syslog ([`syslog`]) and Prometheus counters ([`metrics`]).
//!
//! Every sink is an [`Output`]: the sink, the [`Filter`] that chooses its events, an optional
//! limit (`tail --count`) and its [`SinkCounters`]. The pipeline hands each event to the
//! [`Fanout`], which runs on a thread of its own (sinks may block on a pipe or a socket), so
//! for every sink `accepted + filtered + skipped` equals what reached the fan-out, and every
//! accepted event ends as `emitted` or as `lost` with a reason the sink names.
pub mod audit;
pub mod human;
pub mod json;
pub mod lines;
pub mod metrics;
pub mod syslog;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::event::Event;
use crate::filter::Filter;

/// One destination of events.
pub trait Sink: Send {
    /// Writes (or queues) one event; counts it in `c` as emitted or lost.
    fn emit(&mut self, ev: &Event, c: &SinkCounters);
    /// Called when no more events are waiting: push buffered output out.
    fn flush(&mut self, c: &SinkCounters);
    /// The end: flush, close, and settle what was only queued (the audit log counts what
    /// its writer really wrote).
    fn close(self: Box<Self>, c: &SinkCounters);
    /// Whether the sink can take nothing more (its reader went away: `tail | head`).
    fn gone(&self) -> bool {
        false
    }
    /// Called about once a second (periodic work: rate-limit summaries).
    fn tick(&mut self, _c: &SinkCounters) {}
    /// The audit chain's head, to be published where this sink publishes (stdout, syslog).
    fn anchor(&mut self, _a: &crate::audit::Anchor, _c: &SinkCounters) {}
}

/// What happened to the events offered to one sink. Live (shared with whoever reports).
#[derive(Debug, Default)]
pub struct SinkCounters {
    pub name: String,
    /// Events that did not match the sink's filter.
    pub filtered: AtomicU64,
    /// Events offered after the sink's limit was reached (`tail --count`).
    pub skipped: AtomicU64,
    /// Events passed to the sink.
    pub accepted: AtomicU64,
    /// Events the sink wrote.
    pub emitted: AtomicU64,
    /// Events the sink represents by a summary instead (the audit log's rate limit).
    pub aggregated: AtomicU64,
    /// Events the sink accepted but could not write, by reason.
    lost: Mutex<BTreeMap<String, u64>>,
    /// Accepted events whose fate the sink does not know yet (queued in the audit writer).
    pub pending: AtomicU64,
}

impl SinkCounters {
    pub fn new(name: &str) -> SinkCounters {
        SinkCounters {
            name: name.to_string(),
            ..SinkCounters::default()
        }
    }

    pub fn emitted(&self, n: u64) {
        self.emitted.fetch_add(n, Relaxed);
    }

    pub fn lost(&self, reason: &str, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut m) = self.lost.lock() {
            *m.entry(reason.to_string()).or_default() += n;
        }
    }

    /// Moves `n` events from emitted to lost (buffered output that then failed to flush).
    pub fn unemit(&self, reason: &str, n: u64) {
        self.emitted.fetch_sub(n, Relaxed);
        self.lost(reason, n);
    }

    /// A consistent copy.
    pub fn report(&self) -> SinkReport {
        let lost = self.lost.lock().map(|m| m.clone()).unwrap_or_default();
        SinkReport {
            name: self.name.clone(),
            emitted: self.emitted.load(Relaxed),
            aggregated: self.aggregated.load(Relaxed),
            filtered: self.filtered.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            lost_total: lost.values().sum(),
            lost,
            pending: self.pending.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
        }
    }
}

/// [`SinkCounters`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SinkReport {
    pub name: String,
    pub emitted: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub aggregated: u64,
    pub filtered: u64,
    pub skipped: u64,
    pub lost_total: u64,
    pub lost: BTreeMap<String, u64>,
    /// Accepted but not settled yet (only while running).
    #[serde(skip_serializing_if = "is_zero")]
    pub pending: u64,
    #[serde(skip)]
    pub accepted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl SinkReport {
    /// Everything offered to this sink.
    pub fn offered(&self) -> u64 {
        self.accepted + self.filtered + self.skipped
    }

    /// Whether every accepted event is accounted for (emitted, aggregated, lost or still
    /// pending).
    pub fn balanced(&self) -> bool {
        self.accepted == self.emitted + self.aggregated + self.lost_total + self.pending
    }

    /// Every outcome of an accepted event.
    pub fn settled(&self) -> u64 {
        self.emitted + self.aggregated + self.lost_total
    }
}

/// A sink with its filter, limit and counters.
pub struct Output {
    sink: Box<dyn Sink>,
    filter: Filter,
    limit: Option<u64>,
    counters: Arc<SinkCounters>,
}

impl Output {
    pub fn new(name: &str, sink: Box<dyn Sink>) -> Output {
        Output {
            sink,
            filter: Filter::default(),
            limit: None,
            counters: Arc::new(SinkCounters::new(name)),
        }
    }

    pub fn filter(mut self, filter: Filter) -> Output {
        self.filter = filter;
        self
    }

    /// Stop after `n` events (what comes after is counted as skipped).
    pub fn limit(mut self, n: Option<u64>) -> Output {
        self.limit = n;
        self
    }

    pub fn counters(&self) -> Arc<SinkCounters> {
        self.counters.clone()
    }

    /// The limit counts events handed to the sink (a line sink counts them emitted only once
    /// they are flushed).
    fn full(&self) -> bool {
        self.limit
            .is_some_and(|n| self.counters.accepted.load(Relaxed) >= n)
    }

    /// Wants nothing more: its limit is reached or its reader went away.
    fn done(&self) -> bool {
        self.full() || self.sink.gone()
    }
}

/// Every output, fed one event at a time.
pub struct Fanout {
    outputs: Vec<Output>,
    /// Called once when every output is done (tail --count reached, or its reader gone).
    on_done: Option<Box<dyn FnOnce() + Send>>,
}

impl Fanout {
    pub fn new(outputs: Vec<Output>) -> Fanout {
        Fanout {
            outputs,
            on_done: None,
        }
    }

    /// `f` runs once, when every output wants nothing more.
    pub fn on_done(mut self, f: impl FnOnce() + Send + 'static) -> Fanout {
        self.on_done = Some(Box::new(f));
        self
    }

    pub fn counters(&self) -> Vec<Arc<SinkCounters>> {
        self.outputs.iter().map(Output::counters).collect()
    }

    /// Offers `ev` to every output.
    pub fn deliver(&mut self, ev: &Event) {
        for o in &mut self.outputs {
            if o.done() {
                o.counters.skipped.fetch_add(1, Relaxed);
            } else if !o.filter.matches(ev) {
                o.counters.filtered.fetch_add(1, Relaxed);
            } else {
                o.counters.accepted.fetch_add(1, Relaxed);
                o.sink.emit(ev, &o.counters);
                if o.full() {
                    o.sink.flush(&o.counters);
                }
            }
        }
        if self.on_done.is_some()
            && self.outputs.iter().all(Output::done)
            && let Some(f) = self.on_done.take()
        {
            f();
        }
    }

    /// Nothing more is waiting right now.
    pub fn flush(&mut self) {
        for o in &mut self.outputs {
            o.sink.flush(&o.counters);
        }
    }

    /// About once a second.
    pub fn tick(&mut self) {
        for o in &mut self.outputs {
            o.sink.tick(&o.counters);
        }
    }

    /// Publishes the audit chain's head through every sink that publishes anchors.
    pub fn anchor(&mut self, a: &crate::audit::Anchor) {
        for o in &mut self.outputs {
            o.sink.anchor(a, &o.counters);
        }
    }

    /// Closes every sink; returns their final reports.
    pub fn close(self) -> Vec<SinkReport> {
        self.outputs
            .into_iter()
            .map(|o| {
                let c = o.counters.clone();
                o.sink.close(&c);
                c.report()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Clock, Kind};

    /// Emits into a Vec; fails every third event.
    struct Collect(Arc<Mutex<Vec<String>>>, u64);

    impl Sink for Collect {
        fn emit(&mut self, ev: &Event, c: &SinkCounters) {
            self.1 += 1;
            if self.1.is_multiple_of(3) {
                c.lost("test_error", 1);
                return;
            }
            if let Ok(mut v) = self.0.lock() {
                v.push(ev.kind.to_string());
            }
            c.emitted(1);
        }
        fn flush(&mut self, _c: &SinkCounters) {}
        fn close(self: Box<Self>, _c: &SinkCounters) {}
    }

    #[test]
    fn every_offered_event_is_counted_once_per_sink() {
        let a = Arc::new(Mutex::new(Vec::new()));
        let b = Arc::new(Mutex::new(Vec::new()));
        let only_loads = Filter::new(&[], &["load".to_string()], &[], &[]).unwrap();
        let hit = Arc::new(AtomicU64::new(0));
        // "all" has no limit, so the fan-out is never done.
        let h = hit.clone();
        let mut f = Fanout::new(vec![
            Output::new("all", Box::new(Collect(a.clone(), 0))),
            Output::new("loads", Box::new(Collect(b.clone(), 0)))
                .filter(only_loads)
                .limit(Some(2)),
        ])
        .on_done(move || {
            h.fetch_add(1, Relaxed);
        });
        let clock = Clock::new();
        for i in 0..10 {
            let kind = if i % 2 == 0 { Kind::Load } else { Kind::Unload };
            f.deliver(&Event::synthetic(kind, &clock));
        }
        let reports = f.close();
        let all = &reports[0];
        assert_eq!(all.offered(), 10);
        assert_eq!((all.emitted, all.lost_total), (7, 3));
        assert!(all.balanced());
        let loads = &reports[1];
        assert_eq!(loads.offered(), 10);
        // Offers 0 (load) and 2 (load) fill the limit; 1 is filtered; 3..9 are skipped.
        assert_eq!(
            (loads.accepted, loads.emitted, loads.filtered, loads.skipped),
            (2, 2, 1, 7)
        );
        assert!(loads.balanced());
        assert_eq!(
            hit.load(Relaxed),
            0,
            "an unlimited output keeps the fan-out going"
        );
    }
}
