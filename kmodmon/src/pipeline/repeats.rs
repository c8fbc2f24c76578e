//! Repeat reporting: turns the kernel's repeat records and its open bursts into summary events
//! (`repeat`, `first_time`, `last_time`), each aggregated attempt counted exactly once.
//!
//! The kernel reports a burst's count cumulatively (see `kmodmon_common::repeat`): in a repeat
//! record while the burst goes on and at its end, and in its `REPEATS` slot, which this sweep
//! reads every [`SWEEP`] for the bursts that went quiet (no identical attempt within the
//! window: the kernel sends nothing more for them until the task's next attempt) and for the
//! tasks that exited. Per burst this remembers how many repeats were reported and emits only
//! the increase, so a burst seen both in a record and in its slot is never counted twice.
//!
//! Bookkeeping ends with the burst: at its final record, or when the sweep deletes a dead
//! task's slot. A finished burst is forgotten once its slot shows another burst or is gone
//! (until then a slot read could still show it).
use std::collections::HashMap;
use std::time::Duration;

use kmodmon_common::{RawEvent, RepeatKey, RepeatSlot};

use crate::sensor::RepeatMap;

/// How often the open bursts are swept.
pub const SWEEP: Duration = Duration::from_millis(200);

/// A burst: one task's run of identical attempts of one syscall, named by the time of the
/// attempt that began it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BurstId {
    tid: u32,
    op: u32,
    start_ns: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Burst {
    /// Repeats reported so far (the kernel's counts are cumulative).
    reported: u64,
    /// The sweep during which the burst was known to be over (its final record, or its task's
    /// exit): nothing can raise its count any more.
    finished: Option<u64>,
}

/// The open bursts as the sweep reads them (the kernel's map, or a test's).
pub trait Slots {
    /// Every slot now (a slot that changes while it is read is read again, or left out).
    fn read(&mut self) -> Vec<(RepeatKey, RepeatSlot)>;
    /// Deletes the slot of a task that has exited.
    fn remove(&mut self, key: &RepeatKey);
}

impl Slots for RepeatMap {
    fn read(&mut self) -> Vec<(RepeatKey, RepeatSlot)> {
        let keys: Vec<RepeatKey> = self.keys().filter_map(Result::ok).collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            // The owner updates its count and time in place while the burst goes on; two
            // reads that agree are not torn.
            for _ in 0..3 {
                let (Ok(a), Ok(b)) = (self.get(&k, 0), self.get(&k, 0)) else {
                    break;
                };
                if same_read(&a, &b) {
                    out.push((k, a));
                    break;
                }
            }
        }
        out
    }

    fn remove(&mut self, key: &RepeatKey) {
        if let Err(e) = aya::maps::HashMap::remove(self, key) {
            log::debug!("removing a dead task's repeat slot: {e}");
        }
    }
}

fn same_read(a: &RepeatSlot, b: &RepeatSlot) -> bool {
    (a.total, a.last_ns, a.dead, a.ev.ktime_ns, a.ev.tid)
        == (b.total, b.last_ns, b.dead, b.ev.ktime_ns, b.ev.tid)
}

/// The reader's side of repeat reporting.
pub struct Repeats<S: Slots = RepeatMap> {
    slots: S,
    window_ns: u64,
    bursts: HashMap<BurstId, Burst>,
    /// Sweeps so far.
    sweeps: u64,
}

impl<S: Slots> Repeats<S> {
    pub fn new(slots: S, window: Duration) -> Repeats<S> {
        Repeats {
            slots,
            window_ns: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            bursts: HashMap::new(),
            sweeps: 0,
        }
    }

    /// A repeat record off the ring (`raw.repeat` > 0, cumulative): rewrites `raw.repeat` to
    /// the repeats not reported before and returns true, or false when there are none.
    pub fn record(&mut self, raw: &mut RawEvent) -> bool {
        let id = BurstId {
            tid: raw.tid,
            op: raw.op,
            start_ns: raw.ktime_ns,
        };
        let b = self.bursts.entry(id).or_default();
        let new = raw.repeat.saturating_sub(b.reported);
        b.reported = b.reported.max(raw.repeat);
        if raw.repeat_final != 0 {
            b.finished.get_or_insert(self.sweeps);
        }
        raw.repeat = new;
        new > 0
    }

    /// Reads the open bursts at `now_ns` (CLOCK_MONOTONIC) and returns a summary record for
    /// each quiet or dead one with repeats not reported yet (every one with `all`, at the
    /// end). Dead tasks' slots are deleted. Call it right after draining the ring: a record a
    /// task sent before it exited is then read before the sweep after next forgets its burst.
    pub fn sweep(&mut self, now_ns: u64, all: bool) -> Vec<RawEvent> {
        self.sweeps += 1;
        let mut out = Vec::new();
        let mut current: HashMap<(u32, u32), u64> = HashMap::new();
        for (key, slot) in self.slots.read() {
            let id = BurstId {
                tid: slot.ev.tid,
                op: slot.ev.op,
                start_ns: slot.ev.ktime_ns,
            };
            let dead = slot.dead != 0;
            if dead {
                self.slots.remove(&key);
            } else {
                current.insert((id.tid, id.op), id.start_ns);
            }
            let quiet = now_ns.saturating_sub(slot.last_ns) > self.window_ns;
            if !(dead || quiet || all) {
                continue;
            }
            let known = self.bursts.get(&id).copied();
            if known.is_some_and(|b| b.finished.is_some()) && !dead {
                continue;
            }
            let new = slot.total.saturating_sub(known.map_or(0, |b| b.reported));
            // Only bursts with something reported are remembered.
            if new > 0 || known.is_some() {
                let b = self.bursts.entry(id).or_default();
                b.reported = b.reported.max(slot.total);
                if dead {
                    b.finished.get_or_insert(self.sweeps);
                }
            }
            if new > 0 {
                let mut raw = slot.ev;
                raw.repeat = new;
                raw.repeat_final = u32::from(dead);
                raw.end_ktime_ns = slot.last_ns;
                out.push(raw);
            }
        }
        // A finished burst is forgotten once no slot shows it and one more drain has read
        // what its task sent before it ended; an unfinished one whose slot moved on still has
        // its final record coming.
        let sweeps = self.sweeps;
        self.bursts.retain(|id, b| match b.finished {
            None => true,
            Some(at) => current.get(&(id.tid, id.op)) == Some(&id.start_ns) || sweeps <= at + 1,
        });
        out
    }

    /// Bursts being tracked (for tests and the debug log).
    pub fn tracked(&self) -> usize {
        self.bursts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        slots: Vec<(RepeatKey, RepeatSlot)>,
        removed: Vec<RepeatKey>,
    }

    impl Slots for Fake {
        fn read(&mut self) -> Vec<(RepeatKey, RepeatSlot)> {
            self.slots.clone()
        }
        fn remove(&mut self, key: &RepeatKey) {
            self.slots.retain(|(k, _)| k != key);
            self.removed.push(*key);
        }
    }

    const MS: u64 = 1_000_000;

    fn key(tid: u32) -> RepeatKey {
        RepeatKey {
            tid,
            op: 3,
            start_time: 7,
        }
    }

    fn slot(tid: u32, start: u64, total: u64, last: u64, dead: bool) -> RepeatSlot {
        let mut s = RepeatSlot::zeroed();
        s.ev.tid = tid;
        s.ev.op = 3;
        s.ev.ktime_ns = start;
        s.total = total;
        s.last_ns = last;
        s.dead = u32::from(dead);
        s
    }

    fn record(tid: u32, start: u64, cum: u64, last: bool) -> RawEvent {
        let mut r = RawEvent::zeroed();
        r.tid = tid;
        r.op = 3;
        r.ktime_ns = start;
        r.repeat = cum;
        r.repeat_final = u32::from(last);
        r
    }

    fn total(v: &[RawEvent]) -> u64 {
        v.iter().map(|r| r.repeat).sum()
    }

    fn repeats() -> Repeats<Fake> {
        Repeats::new(Fake::default(), Duration::from_millis(100))
    }

    #[test]
    fn records_report_increments_of_cumulative_counts() {
        let mut r = repeats();
        let mut a = record(1, 10, 5, false);
        assert!(r.record(&mut a));
        assert_eq!(a.repeat, 5);
        let mut b = record(1, 10, 12, true);
        assert!(r.record(&mut b));
        assert_eq!(b.repeat, 7);
        // The same count again adds nothing.
        let mut c = record(1, 10, 12, true);
        assert!(!r.record(&mut c));
    }

    #[test]
    fn an_active_burst_waits_a_quiet_one_is_reported_once() {
        let mut r = repeats();
        r.slots
            .slots
            .push((key(1), slot(1, 10, 40, 1000 * MS, false)));
        // 50 ms after the last repeat: still going on (window 100 ms).
        assert!(r.sweep(1050 * MS, false).is_empty());
        let out = r.sweep(1200 * MS, false);
        assert_eq!(total(&out), 40);
        assert_eq!(out[0].end_ktime_ns, 1000 * MS);
        assert_eq!(out[0].ktime_ns, 10);
        assert!(r.sweep(1400 * MS, false).is_empty(), "reported once");
        // The task resumes the same burst: only the new repeats go out.
        r.slots.slots[0].1.total = 45;
        r.slots.slots[0].1.last_ns = 1500 * MS;
        assert!(r.sweep(1550 * MS, false).is_empty());
        assert_eq!(total(&r.sweep(1700 * MS, false)), 5);
    }

    #[test]
    fn record_and_sweep_of_one_burst_never_count_twice() {
        let mut r = repeats();
        // Interim record: 30 so far.
        let mut a = record(1, 10, 30, false);
        r.record(&mut a);
        // The burst went quiet at 50 repeats; the sweep reports the 20 not in a record.
        r.slots
            .slots
            .push((key(1), slot(1, 10, 50, 1000 * MS, false)));
        assert_eq!(total(&r.sweep(1200 * MS, false)), 20);
        // The task makes another attempt: the kernel sends the burst's final record (50)
        // and a new burst begins.
        let mut f = record(1, 10, 50, true);
        assert!(!r.record(&mut f));
        r.slots.slots[0].1 = slot(1, 2000 * MS, 0, 2000 * MS, false);
        assert!(r.sweep(2500 * MS, false).is_empty());
        assert!(r.sweep(2600 * MS, false).is_empty());
        assert_eq!(r.tracked(), 0, "the finished burst is forgotten");
    }

    #[test]
    fn a_final_record_read_before_the_slot_changed_is_not_counted_again() {
        let mut r = repeats();
        // The final record (50) is read while the slot still shows the old burst.
        let mut f = record(1, 10, 50, true);
        assert!(r.record(&mut f));
        r.slots
            .slots
            .push((key(1), slot(1, 10, 50, 1000 * MS, false)));
        assert!(r.sweep(5000 * MS, false).is_empty());
        assert!(r.sweep(5000 * MS, true).is_empty());
        assert_eq!(r.tracked(), 1, "kept while the slot shows it");
    }

    #[test]
    fn a_replaced_burst_keeps_its_count_until_its_final_record() {
        let mut r = repeats();
        r.slots
            .slots
            .push((key(1), slot(1, 10, 50, 1000 * MS, false)));
        assert_eq!(total(&r.sweep(1200 * MS, false)), 50);
        // The kernel replaced the burst; its final record (cumulative 50) is still on its way.
        r.slots.slots[0].1 = slot(1, 2000 * MS, 0, 2000 * MS, false);
        assert!(r.sweep(2500 * MS, false).is_empty());
        let mut f = record(1, 10, 50, true);
        assert!(!r.record(&mut f), "already reported by the sweep");
    }

    #[test]
    fn dead_tasks_are_reported_and_their_slots_deleted() {
        let mut r = repeats();
        r.slots
            .slots
            .push((key(1), slot(1, 10, 9, 1000 * MS, true)));
        r.slots
            .slots
            .push((key(2), slot(2, 20, 3, 1000 * MS, false)));
        let out = r.sweep(1010 * MS, false);
        assert_eq!(total(&out), 9, "the live one is still going on");
        assert_eq!(out[0].repeat_final, 1);
        assert_eq!(r.slots.removed, vec![key(1)]);
        // A record the dead task sent before it exited, read by the drain after the sweep
        // that saw it dead, adds nothing.
        let mut late = record(1, 10, 9, false);
        assert!(!r.record(&mut late));
        // At the end every open burst is reported.
        assert_eq!(total(&r.sweep(1020 * MS, true)), 3);
        assert!(r.sweep(1030 * MS, true).is_empty());
        assert_eq!(r.tracked(), 1, "only the live task's burst is left");
    }
}
