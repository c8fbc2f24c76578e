//! A small writer for the cpio "newc" format, the one the kernel unpacks as an initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst). Directories, regular files and
//! symlinks only; every entry has nlink 1, uid/gid 0 and mtime 0 so archives are reproducible.
use std::{
    collections::BTreeSet,
    io::{self, Write},
};

const MAGIC: &str = "070701";
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

/// Writes a newc archive. Parent directories are created on demand, each once.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
    names: BTreeSet<String>,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer {
            out,
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
            names: BTreeSet::new(),
        }
    }

    /// Whether an entry (file, symlink or directory) was already written at this path.
    pub fn contains(&self, path: &str) -> bool {
        let path = clean(path);
        self.names.contains(&path) || self.dirs.contains(&path)
    }

    /// A directory (and its parents) with the given permission bits.
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let path = clean(path);
        if path.is_empty() || self.dirs.contains(&path) {
            return Ok(());
        }
        self.parents(&path)?;
        self.dirs.insert(path.clone());
        self.entry(&path, S_IFDIR | (perm & 0o7777), &[])
    }

    /// A regular file with the given permission bits.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = self.claim(path)?;
        self.entry(&path, S_IFREG | (perm & 0o7777), data)
    }

    /// A symbolic link at `path` pointing to `target` (stored as given).
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = self.claim(path)?;
        self.entry(&path, S_IFLNK | 0o777, target.as_bytes())
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, &[])?;
        // Pad to 512 bytes, as cpio(1) does, so archives can be concatenated.
        let rest = (512 - self.written % 512) % 512;
        self.out.write_all(&vec![0; rest as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn claim(&mut self, path: &str) -> io::Result<String> {
        let path = clean(path);
        if path.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cpio entry with an empty path",
            ));
        }
        if !self.names.insert(path.clone()) || self.dirs.contains(&path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("cpio entry {path:?} written twice"),
            ));
        }
        self.parents(&path)?;
        Ok(path)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is larger than 4 GiB, too big for cpio newc"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let namesize = name.len() + 1;
        let fields: [u32; 13] = [
            ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            namesize as u32,
            0, // check
        ];
        let mut header = String::with_capacity(110);
        header.push_str(MAGIC);
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.align()?;
        self.put(data)?;
        self.align()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn align(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..pad as usize])
    }
}

/// "/usr//bin/" → "usr/bin".
fn clean(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal newc reader for the tests: (name, mode, data) per entry.
    fn parse(mut buf: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&buf[..6], MAGIC.as_bytes(), "magic at offset {offset}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[6 + i * 8..14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap() as usize
            };
            let (mode, size, namesize) = (field(1), field(6), field(11));
            let name = std::str::from_utf8(&buf[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(buf[110 + namesize - 1], 0);
            let data_start = (110 + namesize).div_ceil(4) * 4;
            let data = buf[data_start..data_start + size].to_vec();
            let next = (data_start + size).div_ceil(4) * 4;
            buf = &buf[next..];
            offset += next;
            if name == "TRAILER!!!" {
                assert!(buf.iter().all(|&b| b == 0));
                assert_eq!((offset + buf.len()) % 512, 0);
                return out;
            }
            out.push((name, mode as u32, data));
        }
    }

    #[test]
    fn writes_parents_files_and_symlinks() {
        let mut w = Writer::new(Vec::new());
        w.file("/usr/bin/busybox", 0o755, b"ELF...").unwrap();
        w.symlink("usr/bin/sh", "busybox").unwrap();
        w.dir("usr/bin", 0o700).unwrap(); // already there: not written again
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let entries = parse(&w.finish().unwrap());
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["usr", "usr/bin", "usr/bin/busybox", "usr/bin/sh", "init"]
        );
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(
            entries[2],
            (
                "usr/bin/busybox".into(),
                S_IFREG | 0o755,
                b"ELF...".to_vec()
            )
        );
        assert_eq!(
            entries[3],
            ("usr/bin/sh".into(), S_IFLNK | 0o777, b"busybox".to_vec())
        );
    }

    #[test]
    fn alignment_holds_for_every_name_and_data_length() {
        let mut w = Writer::new(Vec::new());
        for n in 1..=9 {
            let name = "x".repeat(n);
            w.file(&name, 0o644, &vec![b'a'; n * 3]).unwrap();
        }
        let entries = parse(&w.finish().unwrap());
        assert_eq!(entries.len(), 9);
        for (i, (name, _, data)) in entries.iter().enumerate() {
            assert_eq!(name.len(), i + 1);
            assert_eq!(data.len(), (i + 1) * 3);
        }
    }

    #[test]
    fn duplicate_and_empty_paths_are_errors() {
        let mut w = Writer::new(Vec::new());
        w.file("a/b", 0o644, b"").unwrap();
        assert_eq!(
            w.file("/a/b", 0o644, b"").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(
            w.symlink("a", "x").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(
            w.file("/", 0o644, b"").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(w.contains("a") && w.contains("/a/b") && !w.contains("a/c"));
    }
}
