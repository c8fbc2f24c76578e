//! The audit log: a directory of hash-chained JSONL segments that `kmodmon run` appends to,
//! `kmodmon log verify` checks and `kmodmon export` reads.
//!
//! Layout of a log directory (0700, files 0600):
//! - `audit-<first seq, 20 digits>.jsonl`: segments, in order; closed ones may be compressed to
//!   `.jsonl.zst` (same bytes once decompressed).
//! - `.lock`: held (flock) by the one writer.
//! - `.reserve`: 16 KiB of zeros, given up on a full disk so that the record of a deletion can
//!   be written before the deletion (see [`writer`]).
//!
//! Every line is a record: an event (the `tail --json` object) or one of kmodmon's own records
//! (`"record": "segment_start" | "lost" | "recovered" | "retention" | "sync_failed" |
//! "rate_limited" | "note"`), with `seq` first
//! and `hash` last; see [`record`] for the exact hash definition. Every segment starts with a
//! `segment_start` record naming the previous record's seq and hash, so the chain runs across
//! rotation, compression and restarts.
//!
//! For the daemon: [`AuditLog::open`] → [`AuditLog::submit`] per event (never blocks) →
//! [`AuditLog::close`] on exit.
pub mod bench;
pub mod cli;
mod compress;
pub mod config;
pub mod export;
pub mod record;
mod recovery;
mod retention;
pub mod segment;
mod shared;
pub mod testkit;
#[cfg(test)]
mod tests;
pub mod timespec;
pub mod verify;
mod writer;

use std::io;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

pub use config::{AuditArgs, AuditConfig, DiskFullAction, FsyncPolicy};
pub use export::{ExportStats, Filter, Format, export};
pub use recovery::Recovery;
pub use verify::{
    ANCHOR_TAG, Anchor, AnchorCheck, Failure, Problem, VerifyReport, anchors_in, newest_anchor,
    verify,
};
pub use writer::{AuditLog, AuditStats, OpenReport, event_body};

/// Audit-log errors (I/O on a named file, or the log's state).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The I/O error is part of the message (not a `source()`), so that `{}` alone says it all.
    #[error("{action} {}: {err}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error(
        "another process is writing the audit log in {} (it holds {}/.lock); stop it or use another directory",
        .0.display(), .0.display()
    )]
    Locked(PathBuf),
    #[error("the audit writer has stopped (see earlier errors)")]
    WriterGone,
    #[error("audit log settings: {0}")]
    Config(String),
    #[error(
        "{} holds no audit log segments (audit-*.jsonl); give the directory passed to `kmodmon run --audit-dir`",
        .0.display()
    )]
    Empty(PathBuf),
}

/// `map_err` helper naming the file an I/O error is about.
pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> AuditError {
    let path = path.to_path_buf();
    move |err| AuditError::Io { action, path, err }
}

/// Creates the log directory 0700, or tightens an existing one to 0700.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), AuditError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create directory", dir))?;
    let meta = std::fs::metadata(dir).map_err(io_err("stat", dir))?;
    if meta.permissions().mode() & 0o077 != 0 {
        log::warn!(
            "audit log directory {} was readable by others; setting it to 0700",
            dir.display()
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod 0700", dir))?;
    }
    Ok(())
}
