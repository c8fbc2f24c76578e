//! One audit record: its bytes on disk and its place in the hash chain.
//!
//! A record is one line of JSON: `{"seq":N,` then the body's members (an event's fields, or a
//! `"record":"<type>"` member and its fields for kmodmon's own records), then `"hash":"<hex>"}`
//! and a newline. `hash` is always the last member.
//!
//! The **canonical bytes** of a record are its line exactly as written, without the trailing
//! newline and without its final `,"hash":"<64 hex>"` member, that is: the line's bytes up to the
//! comma before `"hash"`, followed by `}`.
//!
//! `hash = hex(SHA-256(prev || canonical))`, where `prev` is the 32 raw bytes of the previous
//! record's hash (32 zero bytes for the very first record of a log) and `hex` is lowercase.
//! Hashing the bytes as written (not a re-serialisation) makes verification independent of any
//! JSON library. In a shell, for a record alone in FILE with its newline:
//! `(head -c 32 /dev/zero; head -c -76 FILE; printf '}') | sha256sum` is the first record's hash.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The `prev` of the first record of a log.
pub const GENESIS: Hash = [0; 32];

const HASH_MEMBER: &[u8] = b",\"hash\":\"";
/// `,"hash":"` + 64 hex digits + `"}`.
const HASH_TAIL_LEN: usize = HASH_MEMBER.len() + 64 + 2;

/// SHA-256 over the previous hash and this record's canonical bytes.
pub fn chain_hash(prev: &Hash, canonical: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical);
    h.finalize().into()
}

/// Lowercase hex of a hash.
pub fn to_hex(hash: &Hash) -> String {
    let mut s = Vec::with_capacity(64);
    push_hex(&mut s, hash);
    // Only ASCII hex digits were pushed.
    String::from_utf8(s).unwrap_or_default()
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends the lowercase hex of `hash` (a table lookup per nibble: this runs for every record).
fn push_hex(out: &mut Vec<u8>, hash: &Hash) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in hash {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
}

/// Parses 64 hex digits (either case).
pub fn from_hex(s: &str) -> Option<Hash> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Why bytes could not be made into a record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("a record body must be a JSON object")]
    NotAnObject,
}

/// A record ready to append: the line (with its newline) and its hash.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub line: Vec<u8>,
    pub hash: Hash,
}

/// Builds the line for record `seq` whose body is the serialised JSON object `body`, chained to
/// `prev`.
pub fn encode(seq: u64, body: &[u8], prev: &Hash) -> Result<Encoded, EncodeError> {
    let mut line = Vec::with_capacity(body.len() + 32 + HASH_TAIL_LEN);
    let hash = encode_into(&mut line, seq, body, prev)?;
    Ok(Encoded { line, hash })
}

/// [`encode`] appending the line to `out` (records written together share one buffer);
/// returns the record's hash. On an error `out` is left as it was.
pub fn encode_into(
    out: &mut Vec<u8>,
    seq: u64,
    body: &[u8],
    prev: &Hash,
) -> Result<Hash, EncodeError> {
    let inner = body
        .strip_prefix(b"{")
        .and_then(|b| b.strip_suffix(b"}"))
        .ok_or(EncodeError::NotAnObject)?;
    let inner_is_empty = inner.iter().all(u8::is_ascii_whitespace);
    let start = out.len();
    out.reserve(body.len() + 32 + HASH_TAIL_LEN);
    out.extend_from_slice(b"{\"seq\":");
    push_decimal(out, seq);
    if !inner_is_empty {
        out.push(b',');
        out.extend_from_slice(inner);
    }
    out.push(b'}');
    let hash = chain_hash(prev, &out[start..]);
    out.pop();
    out.extend_from_slice(HASH_MEMBER);
    push_hex(out, &hash);
    out.extend_from_slice(b"\"}\n");
    Ok(hash)
}

/// Splits a line (without its newline) into its canonical bytes and its stored hash; `None`
/// when the line does not end with a well-formed `"hash"` member.
pub fn split(line: &[u8]) -> Option<(Vec<u8>, Hash)> {
    if line.len() < HASH_TAIL_LEN + 2 || !line.ends_with(b"\"}") {
        return None;
    }
    let start = line.len() - HASH_TAIL_LEN;
    if &line[start..start + HASH_MEMBER.len()] != HASH_MEMBER {
        return None;
    }
    let hex = std::str::from_utf8(&line[start + HASH_MEMBER.len()..line.len() - 2]).ok()?;
    let hash = from_hex(hex)?;
    let mut canonical = Vec::with_capacity(start + 1);
    canonical.extend_from_slice(&line[..start]);
    canonical.push(b'}');
    Some((canonical, hash))
}

/// The members every reader looks at; everything else in a line is ignored here.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    pub seq: u64,
    /// Absent for events; the type of kmodmon's own records otherwise.
    #[serde(default)]
    pub record: Option<String>,
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub prev_seq: Option<u64>,
    #[serde(default)]
    pub prev_hash: Option<String>,
    #[serde(default)]
    pub kept_from_seq: Option<u64>,
    #[serde(default)]
    pub count: Option<u64>,
    /// kmodmon's own records lost (`lost` records).
    #[serde(default)]
    pub notes: Option<u64>,
    /// `segment_start` records: losses stated before the segment.
    #[serde(default)]
    pub lost_before: Option<u64>,
    #[serde(default)]
    pub lost_notes_before: Option<u64>,
}

/// The losses a log states, from its oldest `segment_start` on: that record's `lost_before`
/// (what deleted segments had stated), then every `lost` record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossTally {
    /// Events.
    pub events: u64,
    /// kmodmon's own records.
    pub notes: u64,
    based: bool,
}

impl LossTally {
    /// Takes one record into account, in log order.
    pub fn observe(&mut self, env: &Envelope) {
        match env.record.as_deref() {
            // Only the oldest: later ones restate what this tally already counted.
            Some("segment_start") if !self.based => {
                self.based = true;
                self.events += env.lost_before.unwrap_or(0);
                self.notes += env.lost_notes_before.unwrap_or(0);
            }
            Some("lost") => {
                self.events += env.count.unwrap_or(0);
                self.notes += env.notes.unwrap_or(0);
            }
            _ => {}
        }
    }
}

/// A line that parsed: its canonical bytes, stored hash and envelope.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub canonical: Vec<u8>,
    pub hash: Hash,
    pub envelope: Envelope,
}

/// Why a line is not a record.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("the line does not end with a \"hash\" member of 64 hex digits")]
    NoHash,
    #[error("the line is not a JSON object with a numeric \"seq\": {0}")]
    Json(String),
}

/// Parses one line (without its newline).
pub fn parse(line: &[u8]) -> Result<Parsed, ParseError> {
    let (canonical, hash) = split(line).ok_or(ParseError::NoHash)?;
    let envelope: Envelope =
        serde_json::from_slice(line).map_err(|e| ParseError::Json(e.to_string()))?;
    Ok(Parsed {
        canonical,
        hash,
        envelope,
    })
}

/// Record types kmodmon writes besides events (the `"record"` member).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Meta {
    /// First record of every segment: carries the chain over from the previous segment.
    SegmentStart {
        time: String,
        segment: String,
        /// Seq of the previous record (null at the start of a log).
        prev_seq: Option<u64>,
        /// Hash of the previous record (64 zeros at the start of a log).
        prev_hash: String,
        /// Events the log's `lost` records counted before this segment, since the log began
        /// (or since a kmodmon that writes this field first wrote to it): with it, the log's
        /// loss total survives the deletion of the segments whose `lost` records stated it.
        #[serde(default, skip_serializing_if = "is_zero")]
        lost_before: u64,
        /// The same for kmodmon's own records (`notes` of `lost` records).
        #[serde(default, skip_serializing_if = "is_zero")]
        lost_notes_before: u64,
    },
    /// Events that were not written: the queue was full, the disk failed or was full, or
    /// writing was suspended (`disk_full_action = "suspend"`). `count` is the sum of the three;
    /// `notes` counts kmodmon's own records lost (they are not events).
    Lost {
        time: String,
        count: u64,
        queue_full: u64,
        write_error: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        suspended: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        notes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A partial or unreadable tail cut off the active segment at start (after a crash).
    Recovered {
        time: String,
        segment: String,
        cut_bytes: u64,
        cut_lines: u64,
    },
    /// Old segments deleted by retention; records before `kept_from_seq` go. Written before
    /// the deletion (with the space kept in reserve for it when the disk is full); only when
    /// even that is impossible, right after it, with `after_removal` set.
    Retention {
        time: String,
        removed: Vec<String>,
        kept_from_seq: u64,
        /// First seq of the removed range (`removed_from_seq..kept_from_seq`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        removed_from_seq: Option<u64>,
        /// "age", "count", "size" or "disk_full".
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        freed_bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        after_removal: bool,
    },
    /// An fsync failed: records `from_seq..=to_seq` of `segment` may not be on disk. The
    /// segment was closed without another fsync (a later success would not bring them back)
    /// and writing continued in a new one.
    SyncFailed {
        time: String,
        segment: String,
        from_seq: u64,
        to_seq: u64,
        count: u64,
        error: String,
    },
    /// Events aggregated by the per-cgroup rate limit instead of being recorded one by one
    /// (see [`crate::ratelimit`]); `count` says how many.
    RateLimited(crate::ratelimit::Summary),
    /// A free-form note from the daemon (start, stop, policy reload).
    Note { time: String, message: String },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Now, as the RFC 3339 UTC text used in records.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_split_gives_back_canonical_bytes_and_hash() {
        let enc = encode(7, br#"{"kind":"load","module":"ip_vs"}"#, &GENESIS).unwrap();
        let line = enc.line.strip_suffix(b"\n").unwrap();
        let (canonical, hash) = split(line).unwrap();
        assert_eq!(canonical, br#"{"seq":7,"kind":"load","module":"ip_vs"}"#);
        assert_eq!(hash, enc.hash);
        assert_eq!(hash, chain_hash(&GENESIS, &canonical));
        let p = parse(line).unwrap();
        assert_eq!(p.envelope.seq, 7);
        assert_eq!(p.envelope.record, None);
    }

    #[test]
    fn chain_hash_matches_an_independent_sha256() {
        // SHA-256 of 32 zero bytes followed by `{"seq":1}`, computed with coreutils:
        // (head -c 32 /dev/zero; printf '{"seq":1}') | sha256sum
        let enc = encode(1, b"{}", &GENESIS).unwrap();
        assert_eq!(
            String::from_utf8(enc.line.clone()).unwrap(),
            format!("{{\"seq\":1,\"hash\":\"{}\"}}\n", to_hex(&enc.hash))
        );
        let mut h = Sha256::new();
        h.update([0u8; 32]);
        h.update(br#"{"seq":1}"#);
        let expected: Hash = h.finalize().into();
        assert_eq!(enc.hash, expected);
    }

    #[test]
    fn each_hash_depends_on_the_previous_one() {
        let a = encode(1, br#"{"x":1}"#, &GENESIS).unwrap();
        let b = encode(2, br#"{"x":2}"#, &a.hash).unwrap();
        let b_other_prev = encode(2, br#"{"x":2}"#, &GENESIS).unwrap();
        assert_ne!(b.hash, b_other_prev.hash);
        let edited = encode(1, br#"{"x":9}"#, &GENESIS).unwrap();
        assert_ne!(edited.hash, a.hash);
    }

    #[test]
    fn records_encoded_into_one_buffer_are_the_lines_encode_makes() {
        let mut buf = b"before".to_vec();
        let h1 = encode_into(&mut buf, u64::MAX, br#"{"a":1}"#, &GENESIS).unwrap();
        let h2 = encode_into(&mut buf, 0, b"{}", &h1).unwrap();
        let one = encode(u64::MAX, br#"{"a":1}"#, &GENESIS).unwrap();
        let two = encode(0, b"{}", &one.hash).unwrap();
        assert_eq!((h1, h2), (one.hash, two.hash));
        assert_eq!(buf, [&b"before"[..], &one.line, &two.line].concat());
        assert!(
            String::from_utf8(one.line)
                .unwrap()
                .starts_with("{\"seq\":18446744073709551615,")
        );
        let before = buf.clone();
        assert!(encode_into(&mut buf, 1, b"[]", &GENESIS).is_err());
        assert_eq!(buf, before, "nothing appended on an error");
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let h = chain_hash(&GENESIS, b"abc");
        assert_eq!(from_hex(&to_hex(&h)), Some(h));
        assert_eq!(from_hex(&to_hex(&h).to_uppercase()), Some(h));
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn lines_without_a_trailing_hash_are_rejected() {
        assert_eq!(split(br#"{"seq":1}"#), None);
        let enc = encode(1, br#"{"a":"b"}"#, &GENESIS).unwrap();
        let line = enc.line.strip_suffix(b"\n").unwrap();
        assert!(split(&line[..line.len() - 1]).is_none());
        assert!(matches!(
            encode(1, b"[1]", &GENESIS),
            Err(EncodeError::NotAnObject)
        ));
    }

    #[test]
    fn meta_records_are_tagged() {
        let m = Meta::Lost {
            time: "t".into(),
            count: 3,
            queue_full: 2,
            write_error: 1,
            suspended: 0,
            notes: 0,
            error: None,
        };
        let body = serde_json::to_vec(&m).unwrap();
        let enc = encode(5, &body, &GENESIS).unwrap();
        let p = parse(enc.line.strip_suffix(b"\n").unwrap()).unwrap();
        assert_eq!(p.envelope.record.as_deref(), Some("lost"));
        assert_eq!(p.envelope.count, Some(3));
    }
}
