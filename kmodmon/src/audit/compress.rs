//! Compression of closed segments, on a thread of its own so the writer never waits for it.
//! A segment is compressed to `<name>.zst.tmp`, checked against the original, fsynced, renamed
//! to `<name>.zst`, and only then is the plain file removed.
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::segment::{self, Segment};
use super::shared::Shared;

/// How often closed segments are looked for without being told.
const PERIOD: Duration = Duration::from_secs(60);

/// Starts the compression thread. Send `()` once a new segment is active (the ones before it
/// are closed); drop the sender to stop it.
pub(crate) fn spawn(
    dir: PathBuf,
    level: i32,
    shared: Arc<Shared>,
) -> io::Result<(mpsc::Sender<()>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<()>();
    let h = std::thread::Builder::new()
        .name("audit-compress".into())
        .spawn(move || {
            compress_closed(&dir, level, &shared);
            // Woken by a closed segment, or every PERIOD; stops when the writer goes.
            while let Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(PERIOD) {
                compress_closed(&dir, level, &shared);
            }
        })?;
    Ok((tx, h))
}

fn compress_closed(dir: &Path, level: i32, shared: &Shared) {
    let Ok(segs) = segment::list(dir) else { return };
    let active = shared.active_first_seq.load(Relaxed);
    let mut changed = false;
    for s in segs
        .iter()
        .filter(|s| !s.compressed && s.first_seq < active)
    {
        match compress_segment(s, level, &shared.dir_lock) {
            Ok(done) => changed |= done,
            Err(e) => log::warn!("audit log: cannot compress {}: {e}", s.path.display()),
        }
    }
    if changed {
        shared.update_usage(dir);
    }
}

/// Compresses one plain segment in place. Returns false when the segment vanished meanwhile
/// (retention removed it).
pub(crate) fn compress_segment(
    s: &Segment,
    level: i32,
    dir_lock: &std::sync::Mutex<()>,
) -> io::Result<bool> {
    let name = s.name();
    let tmp = s
        .path
        .with_file_name(format!("{name}.zst{}", segment::TMP_EXT));
    let dst = s.path.with_file_name(format!("{name}.zst"));
    if let Err(e) = write_compressed(&s.path, &tmp, level) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let _guard = dir_lock.lock();
    if !s.path.exists() {
        let _ = std::fs::remove_file(&tmp);
        return Ok(false);
    }
    let dir = s.path.parent().unwrap_or(Path::new("."));
    std::fs::rename(&tmp, &dst)?;
    segment::sync_dir(dir)?;
    std::fs::remove_file(&s.path)?;
    segment::sync_dir(dir)?;
    Ok(true)
}

/// Writes the compressed copy with the original's mtime (for retention by age), checks that it
/// decompresses to the original, and fsyncs it.
fn write_compressed(src: &Path, tmp: &Path, level: i32) -> io::Result<()> {
    let mut input = File::open(src)?;
    let mtime = input.metadata()?.modified()?;
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)?;
    let mut enc = zstd::Encoder::new(out, level)?;
    io::copy(&mut input, &mut enc)?;
    let out = enc.finish()?;
    out.sync_all()?;
    out.set_modified(mtime)?;
    if !same_content(File::open(src)?, zstd::Decoder::new(File::open(tmp)?)?)? {
        return Err(io::Error::other(
            "the compressed copy does not match the original (segment kept uncompressed)",
        ));
    }
    Ok(())
}

fn same_content(mut a: impl Read, mut b: impl Read) -> io::Result<bool> {
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
        let n = read_full(&mut a, &mut ba)?;
        let m = read_full(&mut b, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_keeps_bytes_and_mtime_and_removes_the_plain_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment::plain_name(1));
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        std::fs::write(&path, &data).unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let seg = Segment {
            first_seq: 1,
            compressed: false,
            path: path.clone(),
        };
        assert!(compress_segment(&seg, 3, &std::sync::Mutex::new(())).unwrap());
        let segs = segment::list(dir.path()).unwrap();
        assert_eq!(segs.len(), 1);
        assert!(segs[0].compressed);
        assert!(!path.exists());
        let meta = std::fs::metadata(&segs[0].path).unwrap();
        assert_eq!(meta.modified().unwrap(), old);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let mut back = Vec::new();
        zstd::Decoder::new(File::open(&segs[0].path).unwrap())
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }
}
