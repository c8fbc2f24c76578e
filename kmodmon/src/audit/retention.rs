//! Retention: which old segments to delete (always a prefix of the log, never the active one).
use std::time::{Duration, SystemTime};

use super::segment::{self, Segment};

/// Segments to delete, oldest first, the first seq kept, and which rule asked for the most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub remove: Vec<Segment>,
    pub kept_from_seq: u64,
    /// "count", "age" or "size".
    pub reason: &'static str,
}

/// The size rule: keep all segments together (the active one's `active_len` included) at or
/// below `max_bytes`, sizes given by `size`.
pub(crate) struct SizeRule<F: Fn(&Segment) -> u64> {
    pub max_bytes: u64,
    pub active_len: u64,
    pub size: F,
}

/// Decides what to delete so that at most `keep` segments remain (the active one counts) and
/// no closed segment last written before `now - max_age` remains. Closed segments are those
/// whose first seq is below `active_first_seq`.
#[cfg(test)]
pub(crate) fn plan(
    segments: &[Segment],
    active_first_seq: u64,
    keep: Option<usize>,
    max_age: Option<Duration>,
    now: SystemTime,
    mtime: impl Fn(&Segment) -> Option<SystemTime>,
) -> Plan {
    plan_sized(
        segments,
        active_first_seq,
        keep,
        max_age,
        None::<SizeRule<fn(&Segment) -> u64>>,
        now,
        mtime,
    )
}

/// [`plan`], and also so that all segments together stay within the size rule.
pub(crate) fn plan_sized<F: Fn(&Segment) -> u64>(
    segments: &[Segment],
    active_first_seq: u64,
    keep: Option<usize>,
    max_age: Option<Duration>,
    size_rule: Option<SizeRule<F>>,
    now: SystemTime,
    mtime: impl Fn(&Segment) -> Option<SystemTime>,
) -> Plan {
    let closed = segments
        .iter()
        .take_while(|s| s.first_seq < active_first_seq)
        .count();
    // The active segment may not exist yet (its creation failed): it still counts as one.
    let active_exists = segments.iter().any(|s| s.first_seq == active_first_seq);
    let total = segments.len() + usize::from(!active_exists);
    let by_count = keep.map_or(0, |k| total.saturating_sub(k.max(1)));
    let by_age = max_age.map_or(0, |age| {
        segments[..closed]
            .iter()
            .take_while(|s| {
                mtime(s)
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|d| d > age)
            })
            .count()
    });
    let by_size = size_rule.map_or(0, |r| {
        let sizes: Vec<u64> = segments[..closed].iter().map(&r.size).collect();
        let mut total: u64 = sizes.iter().sum::<u64>() + r.active_len;
        let mut n = 0;
        while total > r.max_bytes && n < closed {
            total -= sizes[n];
            n += 1;
        }
        n
    });
    let n = by_count.max(by_age).max(by_size).min(closed);
    let reason = if by_size >= by_count.max(by_age) {
        "size"
    } else if by_count >= by_age {
        "count"
    } else {
        "age"
    };
    Plan {
        remove: segments[..n].to_vec(),
        kept_from_seq: segments.get(n).map_or(active_first_seq, |s| s.first_seq),
        reason,
    }
}

/// Removes a segment file and any other form of it (plain or compressed); errors are logged.
pub(crate) fn remove_segment(s: &Segment) {
    let plain = s.path.with_file_name(segment::plain_name(s.first_seq));
    let zst = s
        .path
        .with_file_name(format!("{}.zst", segment::plain_name(s.first_seq)));
    for p in [plain, zst] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("audit log retention: cannot remove {}: {e}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn segs(firsts: &[u64]) -> Vec<Segment> {
        firsts
            .iter()
            .map(|&f| Segment {
                first_seq: f,
                compressed: false,
                path: PathBuf::from(segment::plain_name(f)),
            })
            .collect()
    }

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn count_keeps_the_newest_and_never_the_active_one() {
        let s = segs(&[1, 10, 20, 30]);
        let now = SystemTime::now();
        let p = plan(&s, 30, Some(2), None, now, |_| Some(now));
        assert_eq!(p.remove, s[..2].to_vec());
        assert_eq!(p.kept_from_seq, 20);
        let p = plan(&s, 30, Some(0), None, now, |_| Some(now));
        assert_eq!(p.remove.len(), 3, "keep=0 still keeps the active segment");
        assert_eq!(p.kept_from_seq, 30);
        let p = plan(&s, 30, Some(10), None, now, |_| Some(now));
        assert!(p.remove.is_empty());
    }

    #[test]
    fn age_removes_only_a_prefix_of_old_segments() {
        let s = segs(&[1, 10, 20, 30]);
        let now = SystemTime::now();
        let ages = [10 * DAY, 1 * DAY, 9 * DAY, 20 * DAY];
        let mtime = |seg: &Segment| {
            let i = s.iter().position(|x| x == seg).unwrap();
            Some(now - ages[i])
        };
        let p = plan(&s, 30, None, Some(5 * DAY), now, mtime);
        // 20 is old but 10 is young: deleting 20 alone would leave a hole in the chain.
        assert_eq!(p.remove, s[..1].to_vec());
        assert_eq!(p.kept_from_seq, 10);
        let p = plan(&s, 30, None, Some(DAY / 2), now, mtime);
        assert_eq!(
            p.remove.len(),
            3,
            "the active segment is never removed by age"
        );
    }

    #[test]
    fn size_keeps_the_newest_within_the_cap_and_never_the_active_one() {
        let s = segs(&[1, 10, 20, 30]);
        let now = SystemTime::now();
        let rule = |max| {
            Some(SizeRule {
                max_bytes: max,
                active_len: 100,
                size: |_: &Segment| 100u64,
            })
        };
        // 400 bytes in all.
        let p = plan_sized(&s, 30, None, None, rule(400), now, |_| Some(now));
        assert!(p.remove.is_empty());
        let p = plan_sized(&s, 30, None, None, rule(250), now, |_| Some(now));
        assert_eq!(p.remove, s[..2].to_vec());
        assert_eq!((p.kept_from_seq, p.reason), (20, "size"));
        let p = plan_sized(&s, 30, None, None, rule(10), now, |_| Some(now));
        assert_eq!(
            p.remove.len(),
            3,
            "the active segment stays, whatever its size"
        );
        let p = plan_sized(&s, 30, Some(1), None, rule(350), now, |_| Some(now));
        assert_eq!((p.remove.len(), p.reason), (3, "count"));
    }

    #[test]
    fn a_missing_active_segment_still_counts() {
        let s = segs(&[1, 10]);
        let now = SystemTime::now();
        let p = plan(&s, 20, Some(2), None, now, |_| Some(now));
        assert_eq!(p.remove, s[..1].to_vec());
        assert_eq!(p.kept_from_seq, 10);
    }
}
