//! Segment files: names that sort in log order, listing a directory, reading lines from plain
//! and zstd-compressed segments with constant memory.
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Segment names are `audit-<first seq, 20 digits>.jsonl`, `.jsonl.zst` once compressed.
pub const PREFIX: &str = "audit-";
pub const PLAIN_EXT: &str = ".jsonl";
pub const ZSTD_EXT: &str = ".jsonl.zst";
/// Suffix of a compression in progress (removed on start).
pub const TMP_EXT: &str = ".tmp";
/// Lock file that keeps two writers out of one directory.
pub const LOCK_FILE: &str = ".lock";

/// Lines longer than this are not records (an event is a few KiB at most).
pub const MAX_LINE: usize = 1 << 20;

/// The file name of the plain segment whose first record is `first_seq`.
pub fn plain_name(first_seq: u64) -> String {
    format!("{PREFIX}{first_seq:020}{PLAIN_EXT}")
}

/// `(first seq, compressed)` of a segment file name; `None` for other files.
pub fn parse_name(name: &str) -> Option<(u64, bool)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (digits, compressed) = if let Some(d) = rest.strip_suffix(ZSTD_EXT) {
        (d, true)
    } else {
        (rest.strip_suffix(PLAIN_EXT)?, false)
    };
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, compressed))
}

/// One segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub first_seq: u64,
    pub compressed: bool,
    pub path: PathBuf,
}

impl Segment {
    /// The file name, for messages.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Reads the segment's lines, decompressing if needed.
    pub fn lines(&self) -> io::Result<Lines> {
        let file = File::open(&self.path)?;
        let inner: Box<dyn BufRead + Send> = if self.compressed {
            Box::new(BufReader::new(zstd::Decoder::new(file)?))
        } else {
            Box::new(BufReader::with_capacity(64 * 1024, file))
        };
        Ok(Lines {
            inner,
            buf: Vec::new(),
            line_no: 0,
            offset: 0,
        })
    }
}

/// Segment files of `dir` in log order. When a plain and a compressed file exist for one
/// segment (a crash during compression), the plain one is listed and the other skipped.
pub fn list(dir: &Path) -> io::Result<Vec<Segment>> {
    let mut out: Vec<Segment> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((first_seq, compressed)) = parse_name(name) else {
            continue;
        };
        if !entry.file_type()?.is_file() {
            continue;
        }
        out.push(Segment {
            first_seq,
            compressed,
            path: entry.path(),
        });
    }
    // Plain before compressed for the same seq, then drop the duplicate.
    out.sort_by_key(|s| (s.first_seq, s.compressed));
    out.dedup_by_key(|s| s.first_seq);
    Ok(out)
}

/// One line of a segment.
#[derive(Debug)]
pub struct Line<'a> {
    /// 1-based.
    pub number: u64,
    /// Byte offset of the line's start in the (uncompressed) segment.
    pub offset: u64,
    /// Without the newline.
    pub bytes: &'a [u8],
    /// False for a last line with no newline (a torn write), or one cut at [`MAX_LINE`].
    pub complete: bool,
}

/// Streams the lines of a segment, one buffer reused.
pub struct Lines {
    inner: Box<dyn BufRead + Send>,
    buf: Vec<u8>,
    line_no: u64,
    offset: u64,
}

impl Lines {
    /// The next line, or `None` at the end.
    pub fn next_line(&mut self) -> io::Result<Option<Line<'_>>> {
        self.buf.clear();
        let n = (&mut self.inner)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut self.buf)?;
        if n == 0 {
            return Ok(None);
        }
        self.line_no += 1;
        let offset = self.offset;
        self.offset += n as u64;
        let complete = self.buf.last() == Some(&b'\n');
        if complete {
            self.buf.pop();
        }
        Ok(Some(Line {
            number: self.line_no,
            offset,
            bytes: &self.buf,
            complete,
        }))
    }
}

/// Sum of the sizes of the segment files, and their count.
pub fn usage(dir: &Path) -> io::Result<(u64, u64)> {
    let mut bytes = 0;
    let segments = list(dir)?;
    for s in &segments {
        bytes += std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0);
    }
    Ok((bytes, segments.len() as u64))
}

/// fsync a directory so that creations, renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn names_sort_in_log_order_and_parse_back() {
        let a = plain_name(9);
        let b = plain_name(10);
        let c = plain_name(u64::MAX);
        assert!(a < b && b < c);
        assert_eq!(parse_name(&a), Some((9, false)));
        assert_eq!(parse_name(&format!("{b}.zst")), Some((10, true)));
        assert_eq!(parse_name(&c), Some((u64::MAX, false)));
        assert_eq!(parse_name("audit-1.jsonl"), None);
        assert_eq!(parse_name(&format!("{a}.zst.tmp")), None);
        assert_eq!(parse_name(".lock"), None);
    }

    #[test]
    fn listing_prefers_the_plain_copy_and_skips_other_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            plain_name(5),
            format!("{}.zst", plain_name(5)),
            format!("{}.zst", plain_name(1)),
            plain_name(12),
            "notes.txt".to_string(),
            format!("{}.zst.tmp", plain_name(12)),
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let l = list(dir.path()).unwrap();
        let got: Vec<(u64, bool)> = l.iter().map(|s| (s.first_seq, s.compressed)).collect();
        assert_eq!(got, vec![(1, true), (5, false), (12, false)]);
    }

    #[test]
    fn lines_flag_a_torn_last_line_and_read_compressed_segments() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join(plain_name(1));
        std::fs::write(&plain, b"one\ntwo\nthr").unwrap();
        let zpath = dir.path().join(format!("{}.zst", plain_name(4)));
        let mut enc = zstd::Encoder::new(File::create(&zpath).unwrap(), 3).unwrap();
        enc.write_all(b"four\nfive\n").unwrap();
        enc.finish().unwrap();
        let segs = list(dir.path()).unwrap();
        let mut all = Vec::new();
        for s in &segs {
            let mut lines = s.lines().unwrap();
            while let Some(l) = lines.next_line().unwrap() {
                all.push((
                    String::from_utf8(l.bytes.to_vec()).unwrap(),
                    l.number,
                    l.offset,
                    l.complete,
                ));
            }
        }
        assert_eq!(
            all,
            vec![
                ("one".into(), 1, 0, true),
                ("two".into(), 2, 4, true),
                ("thr".into(), 3, 8, false),
                ("four".into(), 1, 0, true),
                ("five".into(), 2, 5, true),
            ]
        );
    }
}
