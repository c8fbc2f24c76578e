//! Start-up recovery: leftovers of an interrupted compression are removed, a torn or unreadable
//! tail of the active segment is cut, and the chain continues from the last whole record.
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::record::{self, GENESIS, Hash, LossTally};
use super::segment::{self, Segment};
use super::{AuditError, io_err};

/// What start-up found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segment whose tail was cut.
    pub segment: String,
    pub cut_bytes: u64,
    /// Lines cut, the partial one included.
    pub cut_lines: u64,
}

/// The chain's position after recovery.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub next_seq: u64,
    pub last_hash: Hash,
    /// The losses the log states up to its last record (the last segment's `lost_before`
    /// and its `lost` records): where the next `segment_start`'s `lost_before` continues.
    pub losses: LossTally,
    /// The plain last segment to keep appending to, with its valid length.
    pub active: Option<Active>,
    pub cuts: Vec<Recovery>,
    /// Files removed (compression leftovers, empty segments).
    pub removed: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Active {
    pub segment: Segment,
    pub len: u64,
    /// When its first record was written (for rotation by age).
    pub started: SystemTime,
    /// Records in it (its header included).
    pub records: u64,
}

fn remove(path: &Path, removed: &mut Vec<String>) -> Result<(), AuditError> {
    std::fs::remove_file(path).map_err(io_err("remove", path))?;
    removed.push(file_name(path));
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Removes compression leftovers: `*.tmp`, and a compressed copy next to its plain original
/// (the plain file stays; it will be compressed again).
fn clean_leftovers(dir: &Path, removed: &mut Vec<String>) -> Result<(), AuditError> {
    let entries = std::fs::read_dir(dir).map_err(io_err("read directory", dir))?;
    let mut names = Vec::new();
    for e in entries {
        let e = e.map_err(io_err("read directory", dir))?;
        if let Some(n) = e.file_name().to_str() {
            names.push(n.to_string());
        }
    }
    for n in &names {
        let stale_tmp = n.starts_with(segment::PREFIX) && n.ends_with(segment::TMP_EXT);
        let duplicate = n.strip_suffix(".zst").is_some_and(|plain| {
            segment::parse_name(n).is_some() && names.iter().any(|m| m == plain)
        });
        if stale_tmp || duplicate {
            remove(&dir.join(n), removed)?;
        }
    }
    Ok(())
}

/// The last record of a compressed segment (closed segments are never cut), and the losses
/// stated up to it.
fn last_record(seg: &Segment) -> Result<Option<(u64, Hash, LossTally)>, AuditError> {
    let mut lines = seg.lines().map_err(io_err("open", &seg.path))?;
    let mut last = None;
    let mut losses = LossTally::default();
    while let Some(l) = lines.next_line().map_err(io_err("read", &seg.path))? {
        if l.complete
            && let Ok(p) = record::parse(l.bytes)
        {
            losses.observe(&p.envelope);
            last = Some((p.envelope.seq, p.hash, losses));
        }
    }
    Ok(last)
}

struct Scan {
    good_len: u64,
    total_len: u64,
    lines_after: u64,
    last: Option<(u64, Hash)>,
    started: Option<SystemTime>,
    records: u64,
    /// Losses stated up to the last whole record.
    losses: LossTally,
}

/// Finds the end of the last whole, parseable record of a plain segment.
fn scan(seg: &Segment) -> Result<Scan, AuditError> {
    let mut lines = seg.lines().map_err(io_err("open", &seg.path))?;
    let mut s = Scan {
        good_len: 0,
        total_len: 0,
        lines_after: 0,
        last: None,
        started: None,
        records: 0,
        losses: LossTally::default(),
    };
    while let Some(l) = lines.next_line().map_err(io_err("read", &seg.path))? {
        let end = l.offset + l.bytes.len() as u64 + u64::from(l.complete);
        s.total_len = end;
        match record::parse(l.bytes) {
            Ok(p) if l.complete => {
                s.losses.observe(&p.envelope);
                s.good_len = end;
                s.lines_after = 0;
                s.last = Some((p.envelope.seq, p.hash));
                s.records += 1;
                if s.started.is_none() {
                    s.started = p
                        .envelope
                        .time
                        .as_deref()
                        .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
                }
            }
            _ => s.lines_after += 1,
        }
    }
    Ok(s)
}

/// Brings `dir` to a state the writer can append to.
pub(crate) fn recover(dir: &Path) -> Result<State, AuditError> {
    let mut removed = Vec::new();
    let mut cuts = Vec::new();
    clean_leftovers(dir, &mut removed)?;
    let mut segments = segment::list(dir).map_err(io_err("read directory", dir))?;
    while let Some(last) = segments.pop() {
        if last.compressed {
            if let Some((seq, hash, losses)) = last_record(&last)? {
                return Ok(State {
                    next_seq: seq.saturating_add(1),
                    last_hash: hash,
                    losses,
                    active: None,
                    cuts,
                    removed,
                });
            }
            // An empty compressed segment cannot be produced by the writer; leave it for
            // `log verify` to report and continue from the one before.
            continue;
        }
        let s = scan(&last)?;
        if s.good_len < s.total_len {
            cut(&last.path, s.good_len)?;
            cuts.push(Recovery {
                segment: last.name(),
                cut_bytes: s.total_len - s.good_len,
                cut_lines: s.lines_after,
            });
        }
        let Some((seq, hash)) = s.last else {
            // Nothing whole in it (created just before a crash): drop it.
            remove(&last.path, &mut removed)?;
            continue;
        };
        return Ok(State {
            next_seq: seq.saturating_add(1),
            last_hash: hash,
            losses: s.losses,
            active: Some(Active {
                started: s.started.unwrap_or_else(SystemTime::now),
                len: s.good_len,
                records: s.records,
                segment: last,
            }),
            cuts,
            removed,
        });
    }
    Ok(State {
        next_seq: 1,
        last_hash: GENESIS,
        losses: LossTally::default(),
        active: None,
        cuts,
        removed,
    })
}

fn cut(path: &PathBuf, len: u64) -> Result<(), AuditError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    f.set_len(len).map_err(io_err("truncate", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Meta, encode};

    fn write_segment(dir: &Path, first: u64, n: u64, prev: Hash) -> (Vec<u8>, Hash) {
        let mut bytes = Vec::new();
        let mut h = prev;
        for seq in first..first + n {
            let body = if seq == first {
                serde_json::to_vec(&Meta::SegmentStart {
                    time: record::now_rfc3339(),
                    segment: segment::plain_name(first),
                    prev_seq: (first > 1).then(|| first - 1),
                    prev_hash: record::to_hex(&h),
                    lost_before: 0,
                    lost_notes_before: 0,
                })
                .unwrap()
            } else {
                format!(r#"{{"kind":"load","n":{seq}}}"#).into_bytes()
            };
            let e = encode(seq, &body, &h).unwrap();
            bytes.extend_from_slice(&e.line);
            h = e.hash;
        }
        std::fs::write(dir.join(segment::plain_name(first)), &bytes).unwrap();
        (bytes, h)
    }

    #[test]
    fn empty_directory_starts_at_genesis() {
        let dir = tempfile::tempdir().unwrap();
        let s = recover(dir.path()).unwrap();
        assert_eq!(s.next_seq, 1);
        assert_eq!(s.last_hash, GENESIS);
        assert!(s.active.is_none() && s.cuts.is_empty());
    }

    #[test]
    fn torn_last_line_is_cut_and_the_chain_continues() {
        let dir = tempfile::tempdir().unwrap();
        let (whole, last_hash) = write_segment(dir.path(), 1, 4, GENESIS);
        let path = dir.path().join(segment::plain_name(1));
        let mut torn = whole.clone();
        torn.extend_from_slice(br#"{"seq":5,"kind":"lo"#);
        std::fs::write(&path, &torn).unwrap();
        let s = recover(dir.path()).unwrap();
        assert_eq!(s.next_seq, 5);
        assert_eq!(s.last_hash, last_hash);
        assert_eq!(
            s.cuts,
            vec![Recovery {
                segment: segment::plain_name(1),
                cut_bytes: 19,
                cut_lines: 1
            }]
        );
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        let a = s.active.unwrap();
        assert_eq!((a.len, a.records), (whole.len() as u64, 4));
    }

    #[test]
    fn trailing_garbage_lines_are_cut_but_not_records_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let (whole, _) = write_segment(dir.path(), 1, 3, GENESIS);
        let path = dir.path().join(segment::plain_name(1));
        let mut bad = whole.clone();
        bad.extend_from_slice(b"\0\0\0\0\n\0\0");
        std::fs::write(&path, &bad).unwrap();
        let s = recover(dir.path()).unwrap();
        assert_eq!(s.cuts[0].cut_lines, 2);
        assert_eq!(std::fs::read(&path).unwrap(), whole);

        // Garbage in the middle is tampering or damage for `verify` to name, not a torn tail.
        let mut middle = b"garbage\n".to_vec();
        middle.extend_from_slice(&whole);
        std::fs::write(&path, &middle).unwrap();
        let s = recover(dir.path()).unwrap();
        assert!(s.cuts.is_empty());
        assert_eq!(s.next_seq, 4);
    }

    #[test]
    fn a_segment_with_no_whole_record_is_removed_and_the_previous_one_continues() {
        let dir = tempfile::tempdir().unwrap();
        let (_, h) = write_segment(dir.path(), 1, 3, GENESIS);
        std::fs::write(dir.path().join(segment::plain_name(4)), br#"{"seq":4,"rec"#).unwrap();
        std::fs::write(
            dir.path()
                .join(format!("{}.zst.tmp", segment::plain_name(1))),
            b"x",
        )
        .unwrap();
        let s = recover(dir.path()).unwrap();
        assert_eq!(s.next_seq, 4);
        assert_eq!(s.last_hash, h);
        assert_eq!(s.active.unwrap().segment.first_seq, 1);
        assert_eq!(s.removed.len(), 2);
        assert_eq!(segment::list(dir.path()).unwrap().len(), 1);
    }
}
