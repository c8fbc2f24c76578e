//! `kmodmon log verify`: walks every segment in order and checks seq continuity and the hash
//! chain, naming the first record that was edited, removed, reordered or truncated.
//!
//! What a chain without a secret can and cannot show: any change to a record breaks the chain
//! at that record, unless every later hash was recomputed too. Records cut from the *end* of
//! the log leave a valid shorter chain; compare the reported head (last seq and hash) with one
//! kept elsewhere (`--anchor SEQ:HASH`, e.g. from syslog) to catch that.
use std::path::Path;

use super::record::{self, GENESIS, Hash};
use super::segment::{self, Segment};
use super::{AuditError, io_err};

/// What a verification walked through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub segments: usize,
    pub compressed: usize,
    pub records: u64,
    pub events: u64,
    /// Events the log itself says were lost: its oldest `segment_start`'s `lost_before` (what
    /// deleted segments stated) plus every `lost` record.
    pub lost: u64,
    /// kmodmon's own records the log says were lost (notes about drops, reloads...).
    pub lost_notes: u64,
    /// Torn tails cut at start-up (`recovered` records).
    pub recoveries: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Hash of the last record, hex.
    pub head: Option<String>,
    /// The log starts at seq 1; otherwise retention removed its beginning.
    pub from_genesis: bool,
    /// Events the log says were aggregated by the rate limit (sum of `rate_limited` records).
    pub rate_limited: u64,
    /// Records whose durability the log says is unknown (sum of `sync_failed` records).
    pub unsure: u64,
    /// What became of the anchor given, if any.
    pub anchor: Option<AnchorCheck>,
}

/// What verification did with an anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnchorCheck {
    /// The anchored record is in the log, unchanged.
    Matched,
    /// The anchored record is older than the oldest record kept, and a retention record
    /// accounts for its removal: nothing to compare.
    RemovedByRetention,
}

/// What is wrong at the failing record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The file could not be read or decompressed.
    Unreadable(String),
    /// A last line with no newline: a write cut short.
    Torn { last_segment: bool },
    /// Not a record at all.
    Malformed(String),
    /// A segment with no records.
    EmptySegment,
    /// The first record of a segment is not its `segment_start` record.
    MissingHeader,
    /// A `segment_start` record in the middle of a segment.
    MisplacedHeader,
    /// The file name's seq differs from the segment's first record.
    Renamed { name_seq: u64 },
    /// The record's hash does not match its bytes and the previous hash.
    Edited,
    /// Records `from..=to` are missing.
    Removed {
        from: u64,
        to: u64,
        at_segment_start: bool,
    },
    /// The expected record comes later: records were moved.
    Reordered { expected: u64 },
    /// A seq at or below one already seen: moved or duplicated.
    Repeated { expected: u64 },
    /// The log starts after seq 1 and no retention record accounts for that.
    MissingStart {
        first_seq: u64,
        retained_from: Option<u64>,
    },
    /// The anchored record has another hash.
    AnchorMismatch,
    /// The anchored record is not in the log (and retention did not remove it).
    AnchorMissing {
        seq: u64,
        /// The last seq the log holds.
        last_seq: Option<u64>,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Unreadable(e) => write!(f, "cannot read the segment: {e}"),
            Problem::Torn { last_segment: true } => f.write_str(
                "truncated: the last line is incomplete (a crash mid-write? `kmodmon run` cuts it and records that on start)",
            ),
            Problem::Torn { last_segment: false } => {
                f.write_str("truncated: the segment ends in an incomplete line")
            }
            Problem::Malformed(e) => write!(f, "edited: not a valid record ({e})"),
            Problem::EmptySegment => f.write_str(
                "truncated: the segment is empty (a crash right after rotation? `kmodmon run` removes it on start)",
            ),
            Problem::MissingHeader => f.write_str(
                "removed or reordered: the segment does not start with its segment_start record",
            ),
            Problem::MisplacedHeader => {
                f.write_str("reordered: a segment_start record in the middle of a segment")
            }
            Problem::Renamed { name_seq } => write!(
                f,
                "renamed: the file name says the segment starts at seq {name_seq}"
            ),
            Problem::Edited => f.write_str(
                "edited: the hash does not match the record's content and the previous hash (this record, or the hash of the one before it, was changed)",
            ),
            Problem::Removed {
                from,
                to,
                at_segment_start,
            } => {
                let what = if from == to {
                    format!("record seq {from} is missing")
                } else {
                    format!("records seq {from}..{to} are missing")
                };
                if *at_segment_start {
                    write!(
                        f,
                        "removed: {what} (the previous segment was truncated or a segment was deleted)"
                    )
                } else {
                    write!(f, "removed: {what}")
                }
            }
            Problem::Reordered { expected } => write!(
                f,
                "reordered: expected seq {expected} here, it comes later in the segment"
            ),
            Problem::Repeated { expected } => write!(
                f,
                "reordered or duplicated: expected seq {expected}, found an earlier seq"
            ),
            Problem::MissingStart {
                first_seq,
                retained_from,
            } => match retained_from {
                Some(k) => write!(
                    f,
                    "removed: the log starts at seq {first_seq} but retention only removed records before seq {k}"
                ),
                None => write!(
                    f,
                    "removed: the log starts at seq {first_seq} and no retention record accounts for the earlier records"
                ),
            },
            Problem::AnchorMismatch => {
                f.write_str("edited: the record's hash differs from the anchor given")
            }
            Problem::AnchorMissing {
                seq,
                last_seq: Some(last),
            } if last < seq => write!(
                f,
                "truncated: the log ends at seq {last}, but the anchored record seq {seq} existed: records {}..={seq} at least were cut from its end",
                last + 1
            ),
            Problem::AnchorMissing { seq, .. } => write!(
                f,
                "truncated: the anchored record seq {seq} is not in the log (records were cut from its end?)"
            ),
        }
    }
}

/// Where verification failed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub segment: String,
    /// 1-based; 0 when the problem is about the whole segment.
    pub line: u64,
    pub seq: Option<u64>,
    pub problem: Problem,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.segment)?;
        if self.line > 0 {
            write!(f, " line {}", self.line)?;
        }
        if let Some(s) = self.seq {
            write!(f, " (seq {s})")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Intact(VerifyReport),
    /// The first failure, and what was checked before it.
    Broken(Failure, VerifyReport),
}

/// Optional external knowledge: record `seq` must have hash `hash`. The daemon emits the chain
/// head as an anchor line ([`Anchor::line`]) to places an attacker who rewrites the log does
/// not also control (syslog, the journal, a log shipper); `kmodmon log verify --anchor-from`
/// reads them back ([`anchors_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: Hash,
}

/// The word that starts an anchor line: `kmodmon-anchor seq=N hash=H`.
pub const ANCHOR_TAG: &str = "kmodmon-anchor";

impl Anchor {
    /// The anchor as one greppable line: `kmodmon-anchor seq=N hash=<64 hex>`.
    pub fn line(&self) -> String {
        format!(
            "{ANCHOR_TAG} seq={} hash={}",
            self.seq,
            record::to_hex(&self.hash)
        )
    }

    /// The anchor as one JSON object, for JSON-lines outputs (stdout forwarding):
    /// `{"record":"anchor","seq":N,"hash":"H","anchor":"kmodmon-anchor seq=N hash=H"}`.
    pub fn json(&self) -> String {
        serde_json::json!({
            "record": "anchor",
            "seq": self.seq,
            "hash": record::to_hex(&self.hash),
            "anchor": self.line(),
        })
        .to_string()
    }
}

/// Every anchor line in `text` (a file, a syslog or journal export, JSON or plain): each
/// occurrence of `kmodmon-anchor` followed by `seq=N` and `hash=H` (in that order, separated by
/// spaces), wherever it stands in its line. Lines without one are ignored.
pub fn anchors_in(text: impl std::io::BufRead) -> std::io::Result<Vec<Anchor>> {
    let mut out = Vec::new();
    for line in text.split(b'\n') {
        let line = line?;
        let line = String::from_utf8_lossy(&line);
        let mut rest: &str = &line;
        while let Some(at) = rest.find(ANCHOR_TAG) {
            rest = &rest[at + ANCHOR_TAG.len()..];
            let mut words = rest
                .split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '\\'))
                .filter(|w| !w.is_empty());
            let seq = words.next().and_then(|w| w.strip_prefix("seq="));
            let hash = words.next().and_then(|w| w.strip_prefix("hash="));
            if let (Some(seq), Some(hash)) = (seq, hash)
                && let (Ok(seq), Some(hash)) = (seq.parse(), record::from_hex(hash))
            {
                out.push(Anchor { seq, hash });
            }
        }
    }
    Ok(out)
}

/// The newest anchor (highest seq) of `anchors`; an error when two anchors give the same seq
/// different hashes (two logs' anchors mixed, or one of them forged).
pub fn newest_anchor(anchors: &[Anchor]) -> Result<Option<Anchor>, String> {
    let Some(newest) = anchors.iter().max_by_key(|a| a.seq) else {
        return Ok(None);
    };
    if let Some(other) = anchors
        .iter()
        .find(|a| a.seq == newest.seq && a.hash != newest.hash)
    {
        return Err(format!(
            "two anchors for seq {} disagree ({} and {}): anchors of two logs mixed, or one forged",
            newest.seq,
            record::to_hex(&newest.hash),
            record::to_hex(&other.hash)
        ));
    }
    Ok(Some(*newest))
}

impl std::str::FromStr for Anchor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("anchor {s:?}: expected SEQ:HASH (a seq and its 64-hex-digit hash)");
        let (seq, hash) = s.split_once(':').ok_or_else(bad)?;
        Ok(Anchor {
            seq: seq.trim().parse().map_err(|_| bad())?,
            hash: record::from_hex(hash.trim()).ok_or_else(bad)?,
        })
    }
}

struct Walk {
    report: VerifyReport,
    prev: Hash,
    expect: Option<u64>,
    max_kept_from: Option<u64>,
    anchor: Option<Anchor>,
    anchor_seen: bool,
    losses: record::LossTally,
}

/// Verifies the log in `dir`. `Err` only when the directory cannot be listed or holds no
/// segments; damage inside files is an [`Outcome::Broken`].
pub fn verify(dir: &Path, anchor: Option<Anchor>) -> Result<Outcome, AuditError> {
    let segments = segment::list(dir).map_err(io_err("read directory", dir))?;
    if segments.is_empty() {
        return Err(AuditError::Empty(dir.to_path_buf()));
    }
    let mut w = Walk {
        report: VerifyReport::default(),
        prev: GENESIS,
        expect: None,
        max_kept_from: None,
        anchor,
        anchor_seen: false,
        losses: record::LossTally::default(),
    };
    for (i, seg) in segments.iter().enumerate() {
        w.report.segments += 1;
        w.report.compressed += usize::from(seg.compressed);
        if let Err(f) = w.segment(seg, segments.get(i + 1)) {
            return Ok(Outcome::Broken(f, w.report));
        }
    }
    let first = &segments[0];
    let fail = |problem| Failure {
        segment: first.name(),
        line: 1,
        seq: w.report.first_seq,
        problem,
    };
    if !w.report.from_genesis {
        let first_seq = w.report.first_seq.unwrap_or(first.first_seq);
        if w.max_kept_from.is_none_or(|k| first_seq > k) {
            let f = fail(Problem::MissingStart {
                first_seq,
                retained_from: w.max_kept_from,
            });
            return Ok(Outcome::Broken(f, w.report));
        }
    }
    if let Some(a) = w.anchor {
        if w.anchor_seen {
            w.report.anchor = Some(AnchorCheck::Matched);
        } else if w.report.first_seq.is_some_and(|f| a.seq < f) && !w.report.from_genesis {
            // Older than everything kept, and retention accounted for the start (checked above).
            w.report.anchor = Some(AnchorCheck::RemovedByRetention);
        } else {
            let f = Failure {
                segment: segments.last().map(Segment::name).unwrap_or_default(),
                line: 0,
                seq: None,
                problem: Problem::AnchorMissing {
                    seq: a.seq,
                    last_seq: w.report.last_seq,
                },
            };
            return Ok(Outcome::Broken(f, w.report));
        }
    }
    Ok(Outcome::Intact(w.report))
}

impl Walk {
    fn segment(&mut self, seg: &Segment, next: Option<&Segment>) -> Result<(), Failure> {
        let last_segment = next.is_none();
        let name = seg.name();
        let fail = |line: u64, seq: Option<u64>, problem| Failure {
            segment: name.clone(),
            line,
            seq,
            problem,
        };
        let mut lines = seg
            .lines()
            .map_err(|e| fail(0, None, Problem::Unreadable(e.to_string())))?;
        let mut n = 0;
        loop {
            let line = match lines.next_line() {
                Ok(Some(l)) => l,
                Ok(None) => break,
                Err(e) => return Err(fail(n + 1, None, Problem::Unreadable(e.to_string()))),
            };
            n = line.number;
            if !line.complete {
                return Err(fail(n, None, Problem::Torn { last_segment }));
            }
            let p = record::parse(line.bytes)
                .map_err(|e| fail(n, None, Problem::Malformed(e.to_string())))?;
            let seq = p.envelope.seq;
            let fail = |problem| fail(n, Some(seq), problem);
            let is_header = p.envelope.record.as_deref() == Some("segment_start");
            if n == 1 {
                if !is_header {
                    return Err(fail(Problem::MissingHeader));
                }
                if seq != seg.first_seq {
                    return Err(fail(Problem::Renamed {
                        name_seq: seg.first_seq,
                    }));
                }
                if self.expect.is_none() {
                    self.start_chain(&p.envelope).map_err(&fail)?;
                }
            } else if is_header {
                return Err(fail(Problem::MisplacedHeader));
            }
            let expect = self.expect.unwrap_or(seq);
            if seq != expect {
                let after = look_ahead(seg, next, n, expect);
                return Err(fail(if after.next_seq == Some(expect + 1) {
                    // Its neighbours fit: the seq itself was changed.
                    Problem::Edited
                } else if seq < expect {
                    Problem::Repeated { expected: expect }
                } else if n > 1 && after.expected_later {
                    Problem::Reordered { expected: expect }
                } else {
                    Problem::Removed {
                        from: expect,
                        to: seq - 1,
                        at_segment_start: n == 1,
                    }
                }));
            }
            if is_header && n == 1 && self.report.records > 0 {
                // The header's own account of the chain must agree with what precedes it.
                let prev_hex = record::to_hex(&self.prev);
                if p.envelope.prev_seq != Some(expect - 1)
                    || p.envelope.prev_hash.as_deref() != Some(prev_hex.as_str())
                {
                    return Err(fail(Problem::Edited));
                }
            }
            if record::chain_hash(&self.prev, &p.canonical) != p.hash {
                return Err(fail(Problem::Edited));
            }
            if let Some(a) = self.anchor
                && a.seq == seq
            {
                self.anchor_seen = true;
                if a.hash != p.hash {
                    return Err(fail(Problem::AnchorMismatch));
                }
            }
            self.account(&p.envelope);
            self.prev = p.hash;
            self.expect = Some(seq + 1);
            self.report.last_seq = Some(seq);
            self.report.head = Some(record::to_hex(&p.hash));
        }
        if n == 0 {
            return Err(fail(0, None, Problem::EmptySegment));
        }
        Ok(())
    }

    /// The first record seen: a `segment_start` whose prev fields anchor the chain.
    fn start_chain(&mut self, env: &record::Envelope) -> Result<(), Problem> {
        let prev = env
            .prev_hash
            .as_deref()
            .and_then(record::from_hex)
            .ok_or_else(|| Problem::Malformed("segment_start without a valid prev_hash".into()))?;
        match env.prev_seq {
            None if env.seq == 1 && prev == GENESIS => self.report.from_genesis = true,
            Some(p) if p.checked_add(1) == Some(env.seq) => {}
            _ => {
                return Err(Problem::Malformed(
                    "segment_start whose prev_seq/prev_hash do not fit its seq".into(),
                ));
            }
        }
        self.prev = prev;
        self.expect = Some(env.seq);
        self.report.first_seq = Some(env.seq);
        Ok(())
    }

    fn account(&mut self, env: &record::Envelope) {
        self.report.records += 1;
        self.losses.observe(env);
        self.report.lost = self.losses.events;
        self.report.lost_notes = self.losses.notes;
        match env.record.as_deref() {
            None => self.report.events += 1,
            Some("recovered") => self.report.recoveries += 1,
            Some("rate_limited") => self.report.rate_limited += env.count.unwrap_or(0),
            Some("sync_failed") => self.report.unsure += env.count.unwrap_or(0),
            Some("retention") => {
                self.max_kept_from = self.max_kept_from.max(env.kept_from_seq);
            }
            Some(_) => {}
        }
    }
}

struct LookAhead {
    /// A record with the expected seq appears later in the segment.
    expected_later: bool,
    /// Seq of the record right after the failing line.
    next_seq: Option<u64>,
}

/// Reads the rest of a segment after line `after` (and the first record of the next segment
/// when that line was the last), to tell a move from a removal or an edit.
fn look_ahead(seg: &Segment, next: Option<&Segment>, after: u64, expected: u64) -> LookAhead {
    let mut out = LookAhead {
        expected_later: false,
        next_seq: None,
    };
    let seq_of = |bytes: &[u8]| record::parse(bytes).ok().map(|p| p.envelope.seq);
    let mut next_found = false;
    if let Ok(mut lines) = seg.lines() {
        while let Ok(Some(l)) = lines.next_line() {
            if l.number <= after {
                continue;
            }
            let seq = seq_of(l.bytes);
            if l.number == after + 1 {
                out.next_seq = seq;
                next_found = true;
            }
            if seq == Some(expected) {
                out.expected_later = true;
                break;
            }
        }
    }
    if !next_found
        && let Some(Ok(mut lines)) = next.map(Segment::lines)
        && let Ok(Some(l)) = lines.next_line()
    {
        out.next_seq = seq_of(l.bytes);
    }
    out
}

#[cfg(test)]
mod anchor_tests {
    use super::*;

    #[test]
    fn anchor_lines_are_found_in_plain_syslog_and_journal_json() {
        let h = record::chain_hash(&GENESIS, b"x");
        let a = Anchor { seq: 42, hash: h };
        let line = a.line();
        assert_eq!(
            line,
            format!("kmodmon-anchor seq=42 hash={}", record::to_hex(&h))
        );
        let b = Anchor {
            seq: 7,
            hash: GENESIS,
        };
        let text = format!(
            "Nov 22 13:00:00 node kmodmon[12]: {line}\n\
             <29>1 2026-11-22T13:00:01Z node kmodmon 12 anchor - {}\n\
             {{\"MESSAGE\":\"{}\",\"_PID\":\"12\"}}\n\
             {}\n\
             kmodmon-anchor seq=x hash=y\nunrelated\n\
             kmodmon-anchor seq=9 hash={}\n",
            b.line(),
            a.line(),
            a.json().replace('"', "\\\""),
            "z".repeat(64),
        );
        let found = anchors_in(text.as_bytes()).unwrap();
        assert_eq!(found, vec![a, b, a, a]);
        assert_eq!(newest_anchor(&found), Ok(Some(a)));
        let forged = Anchor {
            seq: 42,
            hash: GENESIS,
        };
        assert!(newest_anchor(&[a, forged]).is_err());
        assert_eq!(newest_anchor(&[]), Ok(None));
        let json: serde_json::Value = serde_json::from_str(&a.json()).unwrap();
        assert_eq!(json["seq"], 42);
        assert_eq!(json["anchor"], line);
    }
}
