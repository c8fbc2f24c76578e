//! Writer, verify and export together, on real files.
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::segment::{self, Segment};
use super::testkit::synthetic_event;
use super::verify::{Outcome, Problem};
use super::*;
use crate::event::Event;
use crate::metrics::Metrics;

fn cfg(dir: &Path) -> AuditConfig {
    let mut c = AuditConfig::new(dir);
    c.fsync = FsyncPolicy::EveryRecord;
    c
}

fn write(c: AuditConfig, run: &str, n: u64) -> (AuditStats, OpenReport) {
    let (log, report) = AuditLog::open(c, Arc::new(Metrics::new())).unwrap();
    for i in 0..n {
        log.submit_blocking(synthetic_event(run, i, SystemTime::now()))
            .unwrap();
    }
    (log.close(), report)
}

fn intact(dir: &Path) -> VerifyReport {
    match verify(dir, None).unwrap() {
        Outcome::Intact(r) => r,
        Outcome::Broken(f, _) => panic!("verify failed: {f}"),
    }
}

fn broken(dir: &Path) -> verify::Failure {
    match verify(dir, None).unwrap() {
        Outcome::Intact(r) => panic!("verify passed: {r:?}"),
        Outcome::Broken(f, _) => f,
    }
}

fn exported(dir: &Path) -> Vec<Event> {
    let mut out = Vec::new();
    export(dir, &Filter::default(), Format::Jsonl, false, &mut out).unwrap();
    out.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}

fn details(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.detail.clone().unwrap()).collect()
}

fn lines_of(seg: &Segment) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = std::fs::read(&seg.path)
        .unwrap()
        .split(|b| *b == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    v.pop();
    v
}

fn write_lines(seg: &Segment, lines: &[Vec<u8>]) {
    let mut bytes = Vec::new();
    for l in lines {
        bytes.extend_from_slice(l);
        bytes.push(b'\n');
    }
    std::fs::write(&seg.path, bytes).unwrap();
}

#[test]
fn chain_continues_across_rotation_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.segment_size = 4000;
    let (s1, r1) = write(c.clone(), "a", 60);
    assert_eq!(r1.next_seq, 1);
    assert_eq!((s1.events, s1.lost()), (60, 0));
    let (s2, r2) = write(c, "b", 40);
    assert_eq!(r2.next_seq, s1.last_seq + 1);
    assert!(r2.recovered.is_empty());
    assert_eq!(s2.durable_seq, s2.last_seq);
    let report = intact(dir.path());
    assert!(report.from_genesis);
    assert_eq!(report.events, 100);
    assert_eq!(report.records, s2.last_seq);
    assert!(report.segments > 3, "{report:?}");
    let got = details(&exported(dir.path()));
    let want: Vec<String> = (0..60)
        .map(|i| format!("run=a i={i}"))
        .chain((0..40).map(|i| format!("run=b i={i}")))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn metrics_follow_the_log() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.segment_size = 3000;
    c.compress = true;
    let metrics = Arc::new(Metrics::new());
    let (log, _) = AuditLog::open(c, metrics.clone()).unwrap();
    for i in 0..40 {
        log.submit_blocking(synthetic_event("m", i, SystemTime::now()))
            .unwrap();
    }
    let s = log.close();
    let (bytes, count) = segment::usage(dir.path()).unwrap();
    assert_eq!(metrics.audit.bytes.load(Relaxed), bytes);
    assert_eq!(metrics.audit.segments.load(Relaxed), count);
    assert_eq!(metrics.audit.events.load(Relaxed), 40);
    assert_eq!(metrics.audit.records.load(Relaxed), s.records);
    let text = metrics.render();
    assert!(
        text.contains(&format!("kmodmon_audit_log_bytes {bytes}\n")),
        "{text}"
    );
}

#[test]
fn rotation_happens_at_the_first_record_past_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.segment_size = 3000;
    write(c, "r", 50);
    let segs = segment::list(dir.path()).unwrap();
    assert!(segs.len() >= 3);
    let mut next_first = 1;
    for (i, s) in segs.iter().enumerate() {
        let lines = lines_of(s);
        let first = record::parse(&lines[0]).unwrap().envelope;
        assert_eq!(first.record.as_deref(), Some("segment_start"));
        assert_eq!(first.seq, s.first_seq);
        assert_eq!(s.first_seq, next_first);
        next_first += lines.len() as u64;
        let len: usize = lines.iter().map(|l| l.len() + 1).sum();
        if i + 1 < segs.len() {
            let last = lines.last().unwrap().len() + 1;
            assert!(len >= 3000, "segment {i} closed early at {len} bytes");
            assert!(len - last < 3000, "segment {i} not rotated in time");
        }
    }
}

#[test]
fn files_are_private_and_one_writer_at_a_time() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("audit");
    let (log, _) = AuditLog::open(cfg(&dir), Arc::new(Metrics::new())).unwrap();
    assert!(log.submit(synthetic_event("p", 0, SystemTime::now())));
    log.sync().unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for s in segment::list(&dir).unwrap() {
        assert_eq!(mode(&s.path), 0o600);
    }
    let second = AuditLog::open(cfg(&dir), Arc::new(Metrics::new()));
    assert!(matches!(second, Err(AuditError::Locked(_))));
    log.close();
    assert!(!log.submit(synthetic_event("p", 1, SystemTime::now())));
    assert_eq!(log.stats().lost_queue_full, 1);
}

#[test]
fn a_full_queue_counts_losses_and_the_log_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.queue = 1;
    let metrics = Arc::new(Metrics::new());
    let (log, _) = AuditLog::open(c, metrics.clone()).unwrap();
    let mut refused = 0;
    for i in 0..2000 {
        if !log.submit(synthetic_event("q", i, SystemTime::now())) {
            refused += 1;
        }
    }
    log.sync().unwrap();
    let s = log.close();
    assert!(
        refused > 0,
        "fsync per record should not keep up with a tight loop"
    );
    assert_eq!(s.lost_queue_full, refused);
    assert_eq!(s.events + refused, 2000);
    let m = metrics
        .audit
        .lost_queue_full
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(m, refused);
    let report = intact(dir.path());
    assert_eq!(report.lost, refused);
    assert_eq!(report.events, s.events);
}

#[test]
fn a_torn_tail_is_cut_on_open_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    write(cfg(dir.path()), "t", 5);
    let seg = segment::list(dir.path()).unwrap().pop().unwrap();
    let before = std::fs::read(&seg.path).unwrap();
    let mut torn = before.clone();
    torn.extend_from_slice(br#"{"seq":7,"time":"2026-"#);
    std::fs::write(&seg.path, &torn).unwrap();
    assert!(matches!(
        broken(dir.path()).problem,
        Problem::Torn { last_segment: true }
    ));
    let (_, report) = write(cfg(dir.path()), "u", 2);
    assert_eq!(report.recovered.len(), 1);
    assert_eq!(report.recovered[0].cut_bytes, 22);
    let r = intact(dir.path());
    assert_eq!((r.recoveries, r.events), (1, 7));
    assert!(std::fs::read(&seg.path).unwrap().starts_with(&before));
}

/// A log of 3 segments with 10 events each, and its segments.
fn sample(dir: &Path) -> Vec<Segment> {
    let mut c = cfg(dir);
    c.segment_size = 1;
    c.segment_age = None;
    let (log, _) = AuditLog::open(c, Arc::new(Metrics::new())).unwrap();
    for i in 0..30 {
        log.submit_blocking(synthetic_event("s", i, SystemTime::now()))
            .unwrap();
    }
    log.close();
    segment::list(dir).unwrap()
}

#[test]
fn verify_names_the_first_edited_removed_reordered_or_truncated_record() {
    let dir = tempfile::tempdir().unwrap();
    let segs = sample(dir.path());
    assert!(segs.len() > 5);
    let seg = &segs[2];
    let orig = lines_of(seg);
    let seq_of = |l: &[u8]| record::parse(l).unwrap().envelope.seq;

    // Edited: one character of the module name.
    let mut lines = orig.clone();
    let text = String::from_utf8(lines[1].clone()).unwrap();
    lines[1] = text
        .replacen("\"module\":\"", "\"module\":\"X", 1)
        .into_bytes();
    write_lines(seg, &lines);
    let f = broken(dir.path());
    assert_eq!(
        (f.segment.as_str(), f.line, f.seq),
        (seg.name().as_str(), 2, Some(seq_of(&orig[1])))
    );
    assert_eq!(f.problem, Problem::Edited);

    // Edited: the seq itself.
    let mut lines = orig.clone();
    let s = seq_of(&orig[1]);
    let text = String::from_utf8(lines[1].clone()).unwrap();
    lines[1] = text
        .replacen(
            &format!("{{\"seq\":{s},"),
            &format!("{{\"seq\":{},", s + 100),
            1,
        )
        .into_bytes();
    write_lines(seg, &lines);
    let f = broken(dir.path());
    assert_eq!((f.line, f.problem), (2, Problem::Edited));

    // Duplicated: a record copied after itself.
    let mut lines = orig.clone();
    lines.push(orig[1].clone());
    write_lines(seg, &lines);
    let f = broken(dir.path());
    assert_eq!(f.line, 3);
    assert_eq!(
        f.problem,
        Problem::Repeated {
            expected: seq_of(&orig[1]) + 1
        }
    );
    write_lines(seg, &orig);
    intact(dir.path());

    // Removed: the event of segment 2 (its segment then ends at the header).
    write_lines(seg, &orig[..1]);
    let f = broken(dir.path());
    assert_eq!(f.segment, segs[3].name());
    assert_eq!(f.line, 1);
    assert_eq!(
        f.problem,
        Problem::Removed {
            from: seq_of(&orig[1]),
            to: seq_of(&orig[1]),
            at_segment_start: true
        }
    );
    write_lines(seg, &orig);

    // Removed: a whole segment.
    let saved = std::fs::read(&segs[3].path).unwrap();
    std::fs::remove_file(&segs[3].path).unwrap();
    let f = broken(dir.path());
    assert_eq!((f.segment.clone(), f.line), (segs[4].name(), 1));
    assert!(matches!(
        f.problem,
        Problem::Removed {
            at_segment_start: true,
            ..
        }
    ));
    std::fs::write(&segs[3].path, saved).unwrap();

    // Removed: the oldest segment, with no retention record to account for it.
    let saved = std::fs::read(&segs[0].path).unwrap();
    std::fs::remove_file(&segs[0].path).unwrap();
    let f = broken(dir.path());
    assert!(
        matches!(
            f.problem,
            Problem::MissingStart {
                first_seq: 3,
                retained_from: None
            }
        ),
        "{f}"
    );
    std::fs::write(&segs[0].path, saved).unwrap();

    // Truncated: the last line of the last segment cut short.
    let last = segs.last().unwrap();
    let saved = std::fs::read(&last.path).unwrap();
    std::fs::write(&last.path, &saved[..saved.len() - 10]).unwrap();
    let f = broken(dir.path());
    assert_eq!(f.problem, Problem::Torn { last_segment: true });
    std::fs::write(&last.path, &saved).unwrap();
    intact(dir.path());
}

#[test]
fn verify_tells_a_swap_from_a_removal_inside_a_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (..) = write(cfg(dir.path()), "w", 6);
    let seg = segment::list(dir.path()).unwrap().pop().unwrap();
    let orig = lines_of(&seg);
    let seq_of = |l: &[u8]| record::parse(l).unwrap().envelope.seq;

    let mut swapped = orig.clone();
    swapped.swap(2, 3);
    write_lines(&seg, &swapped);
    let f = broken(dir.path());
    assert_eq!((f.line, f.seq), (3, Some(seq_of(&orig[3]))));
    assert_eq!(
        f.problem,
        Problem::Reordered {
            expected: seq_of(&orig[2])
        }
    );

    let mut removed = orig.clone();
    removed.remove(2);
    write_lines(&seg, &removed);
    let f = broken(dir.path());
    assert_eq!(f.line, 3);
    let s = seq_of(&orig[2]);
    assert_eq!(
        f.problem,
        Problem::Removed {
            from: s,
            to: s,
            at_segment_start: false
        }
    );

    // A later edit that recomputes that record's hash still breaks the next link.
    let mut rehashed = orig.clone();
    let p = record::parse(&orig[2]).unwrap();
    let mut body = String::from_utf8(p.canonical.clone()).unwrap();
    body = body.replacen("run=w", "run=W", 1);
    let prev = record::parse(&orig[1]).unwrap().hash;
    let inner = format!("{{{}", &body[body.find(',').unwrap() + 1..]);
    let enc = record::encode(s, inner.as_bytes(), &prev).unwrap();
    rehashed[2] = enc.line[..enc.line.len() - 1].to_vec();
    write_lines(&seg, &rehashed);
    let f = broken(dir.path());
    assert_eq!((f.line, f.problem), (4, Problem::Edited));

    write_lines(&seg, &orig);
    let head = intact(dir.path());
    let anchor: verify::Anchor = format!("{}:{}", head.last_seq.unwrap(), head.head.unwrap())
        .parse()
        .unwrap();
    assert!(matches!(
        verify(dir.path(), Some(anchor)).unwrap(),
        Outcome::Intact(_)
    ));
    // Cutting whole records off the end leaves a valid chain, but not the anchored record.
    write_lines(&seg, &orig[..orig.len() - 2]);
    intact(dir.path());
    match verify(dir.path(), Some(anchor)).unwrap() {
        Outcome::Broken(f, _) => assert!(
            matches!(f.problem, Problem::AnchorMissing { seq, .. } if seq == anchor.seq),
            "{f}"
        ),
        Outcome::Intact(_) => panic!("anchor not checked"),
    }
}

#[test]
fn retention_and_compression_keep_the_log_verifiable_and_exportable() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.segment_size = 2500;
    c.retain_segments = Some(4);
    c.compress = true;
    c.fsync = FsyncPolicy::Interval(std::time::Duration::from_millis(50));
    let (s, _) = write(c.clone(), "c", 200);
    assert_eq!(s.lost(), 0);
    let segs = segment::list(dir.path()).unwrap();
    assert_eq!(segs.len(), 4, "{segs:?}");
    assert!(segs[..3].iter().all(|s| s.compressed), "{segs:?}");
    assert!(!segs[3].compressed);
    let r = intact(dir.path());
    assert!(!r.from_genesis);
    assert_eq!(r.compressed, 3);
    let events = exported(dir.path());
    assert_eq!(events.len() as u64, r.events);
    let last = details(&events).pop().unwrap();
    assert_eq!(last, "run=c i=199");
    // Deleting more than retention did is still caught.
    std::fs::remove_file(&segs[0].path).unwrap();
    assert!(matches!(
        broken(dir.path()).problem,
        Problem::MissingStart { .. }
    ));
}

#[test]
fn a_restart_continues_after_a_compressed_last_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.segment_size = 2000;
    c.compress = true;
    write(c.clone(), "x", 30);
    let last = segment::list(dir.path()).unwrap().pop().unwrap();
    assert!(compress::compress_segment(&last, 3, &std::sync::Mutex::new(())).unwrap());
    assert!(
        segment::list(dir.path())
            .unwrap()
            .iter()
            .all(|s| s.compressed)
    );
    let (_, report) = write(c, "y", 3);
    assert!(report.continued.is_none());
    assert_eq!(report.next_seq, seq_after_compressed(dir.path()));
    let r = intact(dir.path());
    assert!(r.from_genesis);
    assert_eq!(r.events, 33);
}

/// The seq after the last record of the compressed segments: where a new writer continues.
fn seq_after_compressed(dir: &Path) -> u64 {
    let segs = segment::list(dir).unwrap();
    let compressed: Vec<_> = segs.iter().filter(|s| s.compressed).collect();
    let last = compressed.last().unwrap();
    let mut lines = last.lines().unwrap();
    let mut seq = 0;
    while let Some(l) = lines.next_line().unwrap() {
        seq = record::parse(l.bytes).unwrap().envelope.seq;
    }
    seq + 1
}
#[test]
fn a_damaged_compressed_segment_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.segment_size = 2000;
    c.compress = true;
    write(c, "z", 40);
    let segs = segment::list(dir.path()).unwrap();
    let z = segs.iter().find(|s| s.compressed).unwrap();
    let mut bytes = std::fs::read(&z.path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&z.path, &bytes).unwrap();
    let f = broken(dir.path());
    assert_eq!(f.segment, z.name());
}

#[test]
fn sinks_can_be_shared_between_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<AuditLog>();
    shared::<Metrics>();
    shared::<crate::sinks::syslog::Syslog>();
}

#[test]
fn the_size_cap_deletes_the_oldest_segments_and_says_so() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.segment_size = 3000;
    c.retain_size = Some(12_000);
    let metrics = Arc::new(Metrics::new());
    let (log, _) = AuditLog::open(c, metrics.clone()).unwrap();
    for i in 0..200 {
        log.submit_blocking(synthetic_event("s", i, SystemTime::now()))
            .unwrap();
    }
    log.close();
    let (bytes, _) = segment::usage(dir.path()).unwrap();
    // The cap, give or take the active segment's last record.
    assert!(bytes <= 12_000 + 3000, "{bytes}");
    let report = intact(dir.path());
    assert!(!report.from_genesis, "{report:?}");
    assert!(metrics.audit.removed_segments.get(["size"]) > 0);
    let mut meta = Vec::new();
    export(
        dir.path(),
        &Filter::default(),
        Format::Jsonl,
        true,
        &mut meta,
    )
    .unwrap();
    let retention: Vec<serde_json::Value> = meta
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice::<serde_json::Value>(l).unwrap())
        .filter(|v| v["record"] == "retention")
        .collect();
    let last = retention.last().expect("a retention record");
    assert_eq!(last["reason"], "size");
    assert!(last["removed_from_seq"].as_u64().unwrap() < last["kept_from_seq"].as_u64().unwrap());
    assert!(last["freed_bytes"].as_u64().unwrap() > 0);
    assert_eq!(report.first_seq, last["kept_from_seq"].as_u64());
    assert!(
        metrics
            .render()
            .contains("kmodmon_audit_removed_segments_total{reason=\"size\"}")
    );
    // The reserve is there, and is not a segment.
    let reserve = std::fs::metadata(dir.path().join(writer::RESERVE_FILE)).unwrap();
    assert_eq!(reserve.len(), writer::RESERVE);
    assert_eq!(metrics.audit.bytes.load(Relaxed), bytes);
}

#[test]
fn a_failed_fsync_is_not_retried_and_its_records_are_counted_unsure() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    // Only the explicit syncs below fsync.
    c.fsync = FsyncPolicy::Interval(std::time::Duration::from_secs(3600));
    let metrics = Arc::new(Metrics::new());
    let (log, _) = AuditLog::open(c, metrics.clone()).unwrap();
    for i in 0..5 {
        log.submit_blocking(synthetic_event("f", i, SystemTime::now()))
            .unwrap();
    }
    let before = log.sync().unwrap();
    let head = log.head().expect("a head after a sync");
    assert_eq!(head.seq, before);
    log.fail_next_fsyncs(1);
    for i in 5..8 {
        log.submit_blocking(synthetic_event("f", i, SystemTime::now()))
            .unwrap();
    }
    log.sync().unwrap();
    let s = log.stats();
    assert_eq!(s.unsure, 3, "{s:?}");
    assert_eq!(
        log.head(),
        Some(head),
        "the head does not move past an unsure record"
    );
    for i in 8..10 {
        log.submit_blocking(synthetic_event("f", i, SystemTime::now()))
            .unwrap();
    }
    let after = log.sync().unwrap();
    // A second failure counts only its own records.
    log.fail_next_fsyncs(1);
    log.submit_blocking(synthetic_event("f", 10, SystemTime::now()))
        .unwrap();
    log.sync().unwrap();
    assert_eq!(
        log.stats().unsure,
        3 + 1,
        "only the record since the last good fsync"
    );
    let s = log.close();
    assert!(s.durable_seq >= after);
    assert_eq!(s.events, 11);
    // A new segment began after each failure, and says what is unsure.
    let segs = segment::list(dir.path()).unwrap();
    assert_eq!(segs.len(), 3, "{segs:?}");
    let first_of_new = lines_of(&segs[1]);
    let rec: serde_json::Value = serde_json::from_slice(&first_of_new[1]).unwrap();
    assert_eq!(rec["record"], "sync_failed", "{rec}");
    assert_eq!(rec["from_seq"].as_u64(), Some(before + 1));
    assert_eq!(rec["count"], 3);
    let report = intact(dir.path());
    assert_eq!(report.unsure, 3 + 1);
    assert_eq!(report.events, 11);
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(metrics.audit.unsure.load(Relaxed), 3 + 1);
    assert_eq!(metrics.audit.fsync_errors.load(Relaxed), 2);
}

#[test]
fn notes_and_summaries_are_never_dropped_uncounted() {
    use crate::ratelimit::{Admit, RateLimitConfig, RateLimiter};
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let (log, _) = AuditLog::open(cfg(dir.path()), metrics.clone()).unwrap();
    let mut rl = RateLimiter::new(RateLimitConfig {
        rate: 1,
        burst: 3,
        ..Default::default()
    });
    let now = std::time::Instant::now();
    let mut recorded = 0;
    for i in 0..50 {
        let ev = synthetic_event("r", i, SystemTime::now());
        let mut ev = ev;
        ev.kind = crate::event::Kind::UnloadAttempt;
        if rl.admit_at(&ev, now) == Admit::Record {
            log.submit_blocking(ev).unwrap();
            recorded += 1;
        }
    }
    for s in rl.flush() {
        assert!(log.submit_summary(s));
    }
    assert!(log.note("a note"));
    log.sync().unwrap();
    let s = log.close();
    assert_eq!(recorded, 3);
    assert_eq!(s.events, 3);
    let report = intact(dir.path());
    assert_eq!(report.rate_limited, 47);
    assert_eq!(report.events + report.rate_limited, 50);
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(metrics.audit.rate_limited.load(Relaxed), 47);
    // After close, nothing can be queued: counted, not dropped.
    assert!(!log.note("too late"));
    assert!(!log.submit_summary(crate::ratelimit::Summary {
        count: 4,
        ..Default::default()
    }));
    let s = log.stats();
    assert_eq!((s.lost_notes, s.lost_queue_full), (1, 4));
    assert_eq!(metrics.audit.lost_notes.load(Relaxed), 1);
}

#[test]
fn the_head_is_the_last_durable_record_and_verifies_as_an_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = AuditLog::open(cfg(dir.path()), Arc::new(Metrics::new())).unwrap();
    for i in 0..7 {
        log.submit_blocking(synthetic_event("h", i, SystemTime::now()))
            .unwrap();
    }
    log.sync().unwrap();
    let head = log.head().unwrap();
    log.close();
    let report = intact(dir.path());
    assert_eq!(Some(head.seq), report.last_seq);
    assert_eq!(Some(record::to_hex(&head.hash)), report.head);
    match verify(dir.path(), Some(head)).unwrap() {
        Outcome::Intact(r) => assert_eq!(r.anchor, Some(verify::AnchorCheck::Matched)),
        Outcome::Broken(f, _) => panic!("{f}"),
    }
    // Cut the last two records: the anchor names the truncation.
    let segs = segment::list(dir.path()).unwrap();
    let seg = segs.last().unwrap();
    let lines = lines_of(seg);
    write_lines(seg, &lines[..lines.len() - 2]);
    match verify(dir.path(), Some(head)).unwrap() {
        Outcome::Broken(f, _) => {
            let msg = f.problem.to_string();
            assert!(msg.starts_with("truncated: the log ends at seq"), "{msg}");
            assert!(msg.contains(&format!("seq {}", head.seq)), "{msg}");
        }
        Outcome::Intact(r) => panic!("the truncation was not caught: {r:?}"),
    }
}

/// Writes `n` events through a one-slot queue (fsync per record cannot keep up, so some are
/// refused and counted lost); returns (refused, stats).
fn write_lossy(c: AuditConfig, run: &str, n: u64) -> (u64, AuditStats) {
    let (log, _) = AuditLog::open(c, Arc::new(Metrics::new())).unwrap();
    let mut refused = 0;
    for i in 0..n {
        if !log.submit(synthetic_event(run, i, SystemTime::now())) {
            refused += 1;
        }
    }
    log.sync().unwrap();
    (refused, log.close())
}

/// Sum of the `count` of the `lost` records still in the log.
fn in_lost_records(dir: &Path) -> u64 {
    segment::list(dir)
        .unwrap()
        .iter()
        .flat_map(lines_of)
        .filter_map(|l| record::parse(&l).ok())
        .filter(|p| p.envelope.record.as_deref() == Some("lost"))
        .map(|p| p.envelope.count.unwrap_or(0))
        .sum()
}

#[test]
fn losses_survive_the_deletion_of_the_segments_that_recorded_them_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.queue = 1;
    c.segment_size = 3000;
    c.retain_segments = Some(2);
    let mut refused = 0;
    for run in ["a", "b"] {
        let (r, s) = write_lossy(c.clone(), run, 2000);
        assert_eq!(s.lost_queue_full, r);
        refused += r;
        // Each run's losses, and the first run's after a restart, are in the log's total.
        assert_eq!(intact(dir.path()).lost, refused, "after run {run}");
    }
    assert!(refused > 0, "fsync per record should not keep up");
    let report = intact(dir.path());
    assert!(
        !report.from_genesis,
        "retention removed the oldest segments"
    );
    // Some `lost` records went with the deleted segments; their counts did not.
    assert!(in_lost_records(dir.path()) < refused);
}
