//! The kernel side's per-CPU counters, summed, and the accounting identity
//! `seen == delivered + aggregated + dropped + in_flight` that `tail` checks at exit.
use std::collections::BTreeMap;

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use kmodmon_common::{Counter, CounterCategory, RawEvent, names};

use super::SensorError;

pub struct Counters {
    counters: PerCpuArray<MapData, u64>,
    pending: HashMap<MapData, u64, RawEvent>,
    /// tracefs and kmodmon's kretprobe events, whose missed returns kprobe_profile counts.
    kretprobes: Option<(std::path::PathBuf, Vec<String>)>,
}

/// A snapshot of all counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub values: BTreeMap<&'static str, u64>,
    /// Attempts entered but not yet returned (tracepoint and kprobe sources).
    pub in_flight: u64,
    /// Returns the kernel did not probe (kretprobe instances all busy): their attempts stay
    /// in flight until the task's next one replaces them (`pending_lost`).
    pub kretprobe_missed: u64,
}

impl Snapshot {
    pub fn get(&self, c: Counter) -> u64 {
        self.values.get(c.name()).copied().unwrap_or(0)
    }

    pub fn seen(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_seen())
            .map(|c| self.get(*c))
            .sum()
    }

    /// Attempts aggregated into repeat counts.
    pub fn aggregated(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_aggregated())
            .map(|c| self.get(*c))
            .sum()
    }

    pub fn dropped(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_event_drop())
            .map(|c| self.get(*c))
            .sum()
    }

    /// Drop counters (module events and cgroup records) that are not zero, by reason.
    pub fn drops(&self) -> Vec<(&'static str, u64)> {
        self.nonzero(|c| matches!(c, CounterCategory::EventDrop | CounterCategory::CgroupDrop))
    }

    /// Error counters that are not zero (events still delivered, a field marked missing).
    pub fn errors(&self) -> Vec<(&'static str, u64)> {
        let mut v = self.nonzero(|c| c == CounterCategory::Error);
        if self.kretprobe_missed > 0 {
            v.push(("kretprobe_missed", self.kretprobe_missed));
        }
        v
    }

    fn nonzero(&self, category: impl Fn(CounterCategory) -> bool) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .filter(|c| category(c.category()))
            .map(|c| (c.name(), self.get(*c)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// Difference to an earlier snapshot.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            values: self
                .values
                .iter()
                .map(|(k, v)| {
                    (
                        *k,
                        v.saturating_sub(earlier.values.get(k).copied().unwrap_or(0)),
                    )
                })
                .collect(),
            in_flight: self.in_flight,
            kretprobe_missed: self
                .kretprobe_missed
                .saturating_sub(earlier.kretprobe_missed),
        }
    }
}

impl Counters {
    pub(super) fn new(counters: Map, pending: Map) -> Result<Counters, SensorError> {
        Ok(Counters {
            counters: PerCpuArray::try_from(counters)
                .map_err(|_| SensorError::Map(names::map::COUNTERS))?,
            pending: HashMap::try_from(pending)
                .map_err(|_| SensorError::Map(names::map::PENDING))?,
            kretprobes: None,
        })
    }

    /// Reads the missed returns of these kretprobe events with every snapshot.
    pub(super) fn watch_kretprobes(&mut self, tracefs: std::path::PathBuf, events: Vec<String>) {
        self.kretprobes = Some((tracefs, events));
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut values = BTreeMap::new();
        for c in Counter::ALL {
            let v = self
                .counters
                .get(&(c as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum::<u64>())
                .unwrap_or(0);
            values.insert(c.name(), v);
        }
        let in_flight = self.pending.keys().filter(|k| k.is_ok()).count() as u64;
        let kretprobe_missed = self
            .kretprobes
            .as_ref()
            .and_then(|(t, e)| super::kretprobe::missed(t, e))
            .unwrap_or(0);
        Snapshot {
            values,
            in_flight,
            kretprobe_missed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(pairs: &[(Counter, u64)]) -> Snapshot {
        Snapshot {
            values: pairs.iter().map(|(c, v)| (c.name(), *v)).collect(),
            in_flight: 0,
            kretprobe_missed: 0,
        }
    }

    #[test]
    fn seen_and_dropped_sum_the_right_counters() {
        let s = snap(&[
            (Counter::SeenLoad, 2),
            (Counter::SeenLoadAttempt, 5),
            (Counter::DropRingbufFull, 1),
            (Counter::DropPendingFull, 2),
            (Counter::ErrReadUser, 7),
            (Counter::SeenCgroup, 100),
            (Counter::DropCgroupRingbufFull, 4),
            (Counter::PolicyDecision, 9),
            (Counter::Aggregated, 11),
            (Counter::RepeatRecord, 3),
        ]);
        assert_eq!(s.seen(), 7);
        assert_eq!(s.aggregated(), 11);
        assert_eq!(s.dropped(), 3);
        assert_eq!(
            s.drops(),
            vec![
                ("ringbuf_full", 1),
                ("pending_map_full", 2),
                ("cgroup_ringbuf_full", 4)
            ]
        );
        assert_eq!(s.errors(), vec![("read_user_failed", 7)]);
    }

    #[test]
    fn since_subtracts() {
        let a = snap(&[(Counter::SeenLoad, 2)]);
        let b = snap(&[(Counter::SeenLoad, 5)]);
        assert_eq!(b.since(&a).get(Counter::SeenLoad), 3);
    }
}
