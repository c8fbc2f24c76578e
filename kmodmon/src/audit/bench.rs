//! Audit-log throughput: sustained records/s with fsync per record and with interval fsync.
//! `kmodmon log __bench` (hidden) runs it; `cargo xtask bench` calls that.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use clap::Args;
use serde::Serialize;

use super::config::{AuditConfig, FsyncPolicy};
use super::testkit::synthetic_event;
use super::writer::AuditLog;
use super::{AuditError, io_err};
use crate::metrics::Metrics;

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub fsync: String,
    /// Each record waited for before the next was submitted (one fsync per record, the
    /// latency-bound case); otherwise records are submitted as fast as the queue takes them
    /// (group commit).
    pub serial: bool,
    pub records: u64,
    pub seconds: f64,
    pub records_per_second: f64,
    pub bytes: u64,
    pub lost: u64,
    pub filesystem: String,
}

/// Writes `records` synthetic events to a fresh log in `dir` (which must not hold a log) as
/// fast as the writer takes them (or, `serial`, each after the previous one is durable), and
/// waits until they are durable.
pub fn measure(
    dir: &Path,
    records: u64,
    policy: FsyncPolicy,
    serial: bool,
) -> Result<BenchResult, AuditError> {
    let metrics = Arc::new(Metrics::new());
    let mut cfg = AuditConfig::new(dir);
    cfg.fsync = policy;
    let (log, _) = AuditLog::open(cfg, metrics.clone())?;
    let now = SystemTime::now();
    let started = Instant::now();
    for i in 0..records {
        log.submit_blocking(synthetic_event("bench", i, now))?;
        if serial {
            log.sync()?;
        }
    }
    log.sync()?;
    let seconds = started.elapsed().as_secs_f64();
    let stats = log.close();
    let (bytes, _) = super::segment::usage(dir).map_err(io_err("read directory", dir))?;
    Ok(BenchResult {
        fsync: policy.to_string(),
        serial,
        records,
        seconds,
        records_per_second: records as f64 / seconds.max(1e-9),
        bytes,
        lost: stats.lost(),
        filesystem: filesystem(dir),
    })
}

/// The filesystem type of `dir` (fsync costs depend on it: tmpfs makes it free).
pub fn filesystem(dir: &Path) -> String {
    use nix::sys::statfs::*;
    let Ok(fs) = statfs(dir) else {
        return "unknown".into();
    };
    let t = fs.filesystem_type();
    let known = [
        (TMPFS_MAGIC, "tmpfs"),
        (EXT4_SUPER_MAGIC, "ext4"),
        (XFS_SUPER_MAGIC, "xfs"),
        (BTRFS_SUPER_MAGIC, "btrfs"),
        (OVERLAYFS_SUPER_MAGIC, "overlayfs"),
    ];
    known
        .iter()
        .find(|(m, _)| *m == t)
        .map_or_else(|| format!("{:#x}", t.0), |(_, n)| n.to_string())
}

/// Hidden: measures audit-log throughput.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Where to write (a fresh subdirectory is made and removed) [default: /var/tmp].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Records for the interval-fsync run.
    #[arg(long, default_value_t = 100_000)]
    pub records: u64,
    /// Records for the fsync-per-record runs (the serial one writes a tenth of them).
    #[arg(long, default_value_t = 5_000)]
    pub fsync_records: u64,
    /// Interval of the interval-fsync run.
    #[arg(long, default_value = "1s")]
    pub interval: humantime::Duration,
    /// One JSON object per measurement.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let base = args.dir.unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let runs = [
        (FsyncPolicy::EveryRecord, args.fsync_records / 10, true),
        (FsyncPolicy::EveryRecord, args.fsync_records, false),
        (
            FsyncPolicy::Interval(args.interval.into()),
            args.records,
            false,
        ),
    ];
    for (i, (policy, n, serial)) in runs.into_iter().enumerate() {
        let dir = base.join(format!("kmodmon-audit-bench-{}-{i}", std::process::id()));
        let r = measure(&dir, n.max(1), policy, serial);
        let _ = std::fs::remove_dir_all(&dir);
        let r = r?;
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            let mode = if r.serial { "one at a time" } else { "burst" };
            println!(
                "audit log, fsync {:>6}, {mode:>13}: {:>9.0} records/s ({} records in {:.2} s, {} bytes, {}, lost {})",
                r.fsync, r.records_per_second, r.records, r.seconds, r.bytes, r.filesystem, r.lost
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
