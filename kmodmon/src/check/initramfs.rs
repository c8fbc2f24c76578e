//! The file list of an initramfs image, read the way the kernel unpacks it
//! (init/initramfs.c): a sequence of parts, each either a cpio `newc` archive (magic 070701 or
//! 070702, ending in `TRAILER!!!`) or a compressed stream that itself holds one or more such
//! archives; zero bytes between parts are padding. Images made by initramfs-tools and dracut
//! start with an uncompressed early-microcode archive and continue with the main archive
//! compressed with gzip, zstd, xz, lzma or lz4 (legacy frame format, `lz4 -l`).
//!
//! Archives are read with the `cpio` crate, streams with flate2, zstd, liblzma and lz4_flex;
//! nothing is decompressed into memory as a whole and file contents are skipped.
use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use serde::Serialize;
use thiserror::Error;

use crate::modname;

/// Largest block of the lz4 legacy format (8 MiB, `LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE`).
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot read {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("at byte {offset}: {format} data, which kmodmon cannot read (the kernel may)")]
    Unsupported { offset: u64, format: &'static str },
    #[error(
        "at byte {offset}: not a cpio archive or a known compressed stream (starts with {magic})"
    )]
    Unknown { offset: u64, magic: String },
    #[error("at byte {offset}: bad {format} data: {source}")]
    Corrupt {
        offset: u64,
        format: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The compression of one part of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Cpio,
    Gzip,
    Zstd,
    Xz,
    Lzma,
    Lz4,
}

/// One part of the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Part {
    /// Byte offset in the image file.
    pub offset: u64,
    pub format: Format,
    /// cpio entries in it (trailers not counted).
    pub entries: usize,
}

/// What an image holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Listing {
    pub parts: Vec<Part>,
    /// Every path, without a leading `./` or `/`.
    #[serde(skip)]
    pub files: BTreeSet<String>,
}

impl Listing {
    /// Modules of `kernel` in the image: normalised name → path. Both `lib/modules/K/...` and
    /// `usr/lib/modules/K/...` count (merged-/usr images).
    pub fn modules_for(&self, kernel: &str) -> std::collections::BTreeMap<String, String> {
        let prefixes = [
            format!("lib/modules/{kernel}/"),
            format!("usr/lib/modules/{kernel}/"),
        ];
        self.files
            .iter()
            .filter(|f| prefixes.iter().any(|p| f.starts_with(p.as_str())))
            .filter_map(|f| crate::modname::from_file(f.trim()).map(|n| (n, f.clone())))
            .collect()
    }

    /// Kernel releases with a module directory in the image.
    pub fn kernels(&self) -> BTreeSet<String> {
        self.files
            .iter()
            .filter_map(|f| {
                let rest = f
                    .strip_prefix("usr/lib/modules/")
                    .or_else(|| f.strip_prefix("lib/modules/"))?;
                let k = rest.split('/').next()?;
                (!k.is_empty()).then(|| k.to_string())
            })
            .collect()
    }

    /// Whether the module `name` (any spelling) of `kernel` is in the image.
    pub fn has_module(&self, kernel: &str, name: &str) -> bool {
        self.modules_for(kernel)
            .contains_key(&modname::normalize(name))
    }
}

/// Lists the image file at `path` (a path on this machine).
pub fn list_file(path: &Path) -> Result<Listing, ImageError> {
    let file = std::fs::File::open(path).map_err(|source| ImageError::Open {
        path: path.display().to_string(),
        source,
    })?;
    list(BufReader::with_capacity(1 << 16, file))
}

/// A reader that counts the bytes consumed from it.
struct Counted<R> {
    inner: R,
    pos: u64,
}

impl<R: BufRead> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Counted<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        self.pos += amt as u64;
        self.inner.consume(amt);
    }
}

/// Skips zero bytes (padding between parts); returns whether anything follows.
fn skip_zeros<R: BufRead>(r: &mut R) -> io::Result<bool> {
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(false);
        }
        let zeros = buf.iter().take_while(|b| **b == 0).count();
        let more = zeros < buf.len();
        r.consume(zeros);
        if more {
            return Ok(true);
        }
    }
}

/// The first bytes of `r` without consuming them (up to `n`, fewer at the end).
fn peek<R: BufRead>(r: &mut R, n: usize) -> io::Result<Vec<u8>> {
    let buf = r.fill_buf()?;
    Ok(buf[..buf.len().min(n)].to_vec())
}

fn detect(magic: &[u8]) -> Result<Format, Option<&'static str>> {
    match magic {
        [b'0', b'7', b'0', b'7', b'0', b'1' | b'2', ..] => Ok(Format::Cpio),
        [0x1f, 0x8b, ..] => Ok(Format::Gzip),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Ok(Format::Zstd),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Ok(Format::Xz),
        [0x5d, 0, 0, ..] => Ok(Format::Lzma),
        [0x02, 0x21, 0x4c, 0x18, ..] => Ok(Format::Lz4),
        [b'0', b'7', b'0', b'7', b'0', b'7', ..] => Err(Some("old (odc) cpio")),
        [b'B', b'Z', b'h', ..] => Err(Some("bzip2")),
        [0x89, b'L', b'Z', b'O', ..] => Err(Some("lzo")),
        _ => Err(None),
    }
}

/// Lists an image from a reader.
pub fn list<R: BufRead>(reader: R) -> Result<Listing, ImageError> {
    let mut r = Counted {
        inner: reader,
        pos: 0,
    };
    let mut out = Listing::default();
    let corrupt = |offset, format| {
        move |source| ImageError::Corrupt {
            offset,
            format,
            source,
        }
    };
    loop {
        if !skip_zeros(&mut r).map_err(corrupt(r.pos, "image"))? {
            break;
        }
        let offset = r.pos;
        let magic = peek(&mut r, 8).map_err(corrupt(offset, "image"))?;
        let format = match detect(&magic) {
            Ok(f) => f,
            Err(Some(format)) => return Err(ImageError::Unsupported { offset, format }),
            Err(None) => {
                return Err(ImageError::Unknown {
                    offset,
                    magic: magic.iter().map(|b| format!("{b:02x}")).collect(),
                });
            }
        };
        let mut entries = 0;
        let name = format_name(format);
        match format {
            Format::Cpio => {
                entries = read_archive(&mut r, &mut out.files).map_err(corrupt(offset, name))?;
            }
            Format::Gzip => {
                let d = flate2::bufread::GzDecoder::new(&mut r);
                entries += read_stream(d, &mut out.files).map_err(corrupt(offset, name))?;
            }
            Format::Zstd => {
                let d = zstd::stream::read::Decoder::with_buffer(&mut r)
                    .map_err(corrupt(offset, name))?
                    .single_frame();
                entries += read_stream(d, &mut out.files).map_err(corrupt(offset, name))?;
            }
            Format::Xz => {
                let d = liblzma::bufread::XzDecoder::new(&mut r);
                entries += read_stream(d, &mut out.files).map_err(corrupt(offset, name))?;
            }
            Format::Lzma => {
                let stream = liblzma::stream::Stream::new_lzma_decoder(u64::MAX)
                    .map_err(|e| corrupt(offset, name)(io::Error::other(e)))?;
                let d = liblzma::bufread::XzDecoder::new_stream(&mut r, stream);
                entries += read_stream(d, &mut out.files).map_err(corrupt(offset, name))?;
            }
            Format::Lz4 => {
                let d = Lz4Legacy::new(&mut r);
                entries += read_stream(d, &mut out.files).map_err(corrupt(offset, name))?;
            }
        }
        out.parts.push(Part {
            offset,
            format,
            entries,
        });
    }
    Ok(out)
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Cpio => "cpio",
        Format::Gzip => "gzip",
        Format::Zstd => "zstd",
        Format::Xz => "xz",
        Format::Lzma => "lzma",
        Format::Lz4 => "lz4",
    }
}

/// The decompressed content of one stream: cpio archives, possibly several, with zero
/// padding between them. Read to its end, so the compressed stream is consumed exactly.
fn read_stream<D: Read>(d: D, files: &mut BTreeSet<String>) -> io::Result<usize> {
    let mut r = BufReader::with_capacity(1 << 16, d);
    let mut entries = 0;
    while skip_zeros(&mut r)? {
        let magic = peek(&mut r, 6)?;
        if !matches!(detect(&magic), Ok(Format::Cpio)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the decompressed data is not a cpio newc archive",
            ));
        }
        entries += read_archive(&mut r, files)?;
    }
    Ok(entries)
}

/// One cpio archive up to and including its trailer; returns the number of entries.
fn read_archive<R: Read>(r: &mut R, files: &mut BTreeSet<String>) -> io::Result<usize> {
    let mut entries = 0;
    loop {
        let entry = cpio::NewcReader::new(&mut *r)?;
        if entry.entry().is_trailer() {
            entry.finish()?;
            return Ok(entries);
        }
        let name = entry.entry().name();
        let name = name.trim_start_matches("./").trim_start_matches('/');
        if !name.is_empty() && name != "." {
            files.insert(name.to_string());
        }
        entries += 1;
        entry.finish()?;
    }
}

/// The lz4 legacy frame format the kernel reads (`lz4 -l`): a magic number, then blocks of
/// `u32 LE compressed size` + an lz4 block of at most 8 MiB; the magic may repeat (streams
/// concatenated); the data ends at the end of input or at a zero size.
struct Lz4Legacy<R> {
    inner: R,
    block: Vec<u8>,
    at: usize,
    done: bool,
}

impl<R: BufRead> Lz4Legacy<R> {
    fn new(inner: R) -> Self {
        Lz4Legacy {
            inner,
            block: Vec::new(),
            at: 0,
            done: false,
        }
    }

    /// Reads the next block; false at the end of the stream.
    fn next_block(&mut self) -> io::Result<bool> {
        loop {
            let mut word = [0u8; 4];
            let head = peek(&mut self.inner, 4)?;
            if head.len() < 4 || head == [0, 0, 0, 0] {
                // End of input, or the zero padding that follows the stream.
                return Ok(false);
            }
            self.inner.read_exact(&mut word)?;
            if word == LZ4_LEGACY_MAGIC {
                continue;
            }
            let size = u32::from_le_bytes(word) as usize;
            // A compressed block is never much larger than the block it holds.
            if size > LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK / 255 + 16 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("lz4 block of {size} bytes is larger than any legacy block"),
                ));
            }
            let mut compressed = vec![0u8; size];
            self.inner.read_exact(&mut compressed)?;
            self.block = lz4_flex::block::decompress(&compressed, LZ4_LEGACY_BLOCK)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            self.at = 0;
            return Ok(true);
        }
    }
}

impl<R: BufRead> Read for Lz4Legacy<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at >= self.block.len() {
            if self.done || !self.next_block()? {
                self.done = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.block.len() - self.at);
        buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    /// A cpio newc archive of `files` (paths; those ending in `/` are directories), padded to
    /// 512 bytes as the kernel's and dracut's writers pad.
    pub fn archive(files: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let (name, mode, data): (&str, u32, &[u8]) = match f.strip_suffix('/') {
                Some(d) => (d, 0o040755, b""),
                None => (f, 0o100644, b"data"),
            };
            let w = cpio::NewcBuilder::new(name)
                .ino(i as u32 + 1)
                .mode(mode)
                .nlink(1)
                .write(out, data.len() as u32);
            let mut w = w;
            w.write_all(data).unwrap();
            out = w.finish().unwrap();
        }
        out = cpio::newc::trailer(out).unwrap();
        while out.len() % 512 != 0 {
            out.push(0);
        }
        out
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn lz4_legacy(data: &[u8]) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in data.chunks(4096) {
            let block = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(&block);
        }
        out
    }

    const K: &str = "6.1.0-13-amd64";

    fn main_files() -> Vec<String> {
        vec![
            ".".into(),
            "usr/".into(),
            format!("usr/lib/modules/{K}/"),
            format!("usr/lib/modules/{K}/kernel/fs/overlayfs/overlay.ko"),
            format!("usr/lib/modules/{K}/kernel/net/bridge/br_netfilter.ko.xz"),
            format!("usr/lib/modules/{K}/updates/dkms/zfs.ko.zst"),
            "init".into(),
        ]
    }

    #[test]
    fn early_microcode_then_each_compression() {
        let early = archive(&["kernel/", "kernel/x86/microcode/GenuineIntel.bin"]);
        let files = main_files();
        let refs: Vec<&str> = files.iter().map(String::as_str).collect();
        let main = archive(&refs);
        let compressed: Vec<(Format, Vec<u8>)> = vec![
            (Format::Gzip, gzip(&main)),
            (Format::Zstd, zstd::encode_all(&main[..], 3).unwrap()),
            (Format::Xz, {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
                e.write_all(&main).unwrap();
                e.finish().unwrap()
            }),
            (Format::Lz4, lz4_legacy(&main)),
            (Format::Cpio, main.clone()),
        ];
        for (format, data) in compressed {
            let mut image = early.clone();
            image.extend_from_slice(&data);
            let l = list(Cursor::new(&image)).unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!(l.parts.len(), 2, "{format:?}: {:?}", l.parts);
            assert_eq!(
                l.parts[0],
                Part {
                    offset: 0,
                    format: Format::Cpio,
                    entries: 2
                }
            );
            assert_eq!(l.parts[1].format, format);
            assert_eq!(l.parts[1].offset, early.len() as u64);
            assert!(l.has_module(K, "overlay"), "{format:?}");
            assert!(l.has_module(K, "br-netfilter"));
            assert!(l.has_module(K, "zfs"));
            assert!(!l.has_module(K, "iptable_nat"));
            assert!(!l.has_module("6.1.0-9-amd64", "overlay"));
            assert!(l.files.contains("kernel/x86/microcode/GenuineIntel.bin"));
            assert_eq!(l.kernels(), BTreeSet::from([K.to_string()]));
        }
    }

    #[test]
    fn concatenated_streams_and_archives_inside_one_stream() {
        let a = archive(&["a"]);
        let b = archive(&["lib/modules/6.1/kernel/b.ko"]);
        let mut both = a.clone();
        both.extend_from_slice(&b);
        // Two archives in one gzip stream, then a second gzip member, then padding.
        let mut image = gzip(&both);
        image.extend_from_slice(&gzip(&archive(&["c"])));
        image.extend_from_slice(&[0u8; 100]);
        let l = list(Cursor::new(&image)).unwrap();
        assert_eq!(l.parts.len(), 2);
        assert_eq!(l.parts[0].entries, 2);
        assert!(l.files.contains("a") && l.files.contains("c"));
        assert!(l.has_module("6.1", "b"));
    }

    #[test]
    fn bad_images_are_errors_not_panics() {
        assert!(list(Cursor::new(b"")).unwrap().parts.is_empty());
        assert!(matches!(
            list(Cursor::new(b"hello world")),
            Err(ImageError::Unknown { offset: 0, .. })
        ));
        assert!(matches!(
            list(Cursor::new(b"BZh91AY&SY")),
            Err(ImageError::Unsupported {
                format: "bzip2",
                ..
            })
        ));
        let mut truncated = archive(&["a", "b"]);
        truncated.truncate(150);
        assert!(matches!(
            list(Cursor::new(&truncated)),
            Err(ImageError::Corrupt { format: "cpio", .. })
        ));
        let mut gz = gzip(&archive(&["a"]));
        let n = gz.len();
        gz[n / 2] ^= 0xff;
        assert!(list(Cursor::new(&gz)).is_err());
        // Compressed data that is not a cpio archive.
        assert!(list(Cursor::new(gzip(b"not cpio at all"))).is_err());
        let mut lz = LZ4_LEGACY_MAGIC.to_vec();
        lz.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(list(Cursor::new(&lz)).is_err());
    }
}
