//! Audit-log settings: [`AuditConfig`] (from a config file via serde, or built in code) and
//! [`AuditArgs`] (the `kmodmon run` flags that override it).
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Deserializer};

/// When records are forced to stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// No record counts as written (durable seq, `sync`) before an fdatasync covers it.
    /// Records queued together share one fdatasync (group commit).
    EveryRecord,
    /// fdatasync at most this long after a record was written (and on rotation and close).
    Interval(Duration),
}

impl Default for FsyncPolicy {
    fn default() -> Self {
        FsyncPolicy::Interval(Duration::from_secs(1))
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;

    /// `always` (or `record`, `every-record`), or a duration such as `100ms`, `1s`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "always" | "record" | "every-record" => Ok(FsyncPolicy::EveryRecord),
            other => match humantime::parse_duration(other) {
                Ok(d) if d.is_zero() => Ok(FsyncPolicy::EveryRecord),
                Ok(d) => Ok(FsyncPolicy::Interval(d)),
                Err(e) => Err(format!(
                    "fsync policy {other:?}: expected \"always\" or a duration such as \"100ms\" ({e})"
                )),
            },
        }
    }
}

impl std::fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsyncPolicy::EveryRecord => f.write_str("always"),
            FsyncPolicy::Interval(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the writer does when the file system refuses a record for lack of space (ENOSPC,
/// EDQUOT). Named after auditd's `disk_full_action` values they correspond to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum DiskFullAction {
    /// Delete the oldest closed segments until the record fits (auditd's `rotate`). A
    /// `retention` record (reason `disk_full`) names what was deleted; the chain stays
    /// verifiable. With no closed segment left to delete, records are counted lost.
    #[default]
    KeepNewest,
    /// Delete nothing: every record is still tried, and those that do not fit are counted
    /// lost (auditd's `ignore`/`syslog` with auditd's `keep_logs` spirit: old evidence stays).
    KeepOldest,
    /// Stop writing (auditd's `suspend`): no record is tried while the disk is full, each one
    /// is counted lost; free space is checked every second and writing resumes, with a `lost`
    /// record, once enough is free again.
    Suspend,
}

impl DiskFullAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFullAction::KeepNewest => "keep_newest",
            DiskFullAction::KeepOldest => "keep_oldest",
            DiskFullAction::Suspend => "suspend",
        }
    }
}

/// The default cap on the audit log's size (`retain_size`).
pub const DEFAULT_RETAIN_SIZE: u64 = 1 << 30;

/// Everything the audit-log writer needs. `Default` gives the documented defaults with
/// `dir` empty (callers must set it).
///
/// In a TOML config file (all keys optional but `dir`):
/// ```toml
/// [audit]
/// dir = "/var/lib/kmodmon/audit"
/// fsync = "1s"              # or "always"
/// segment_size = "64MiB"
/// segment_age = "1day"
/// retain_segments = 100
/// retain_age = "90days"
/// retain_size = "1GiB"      # or "none"
/// disk_full_action = "keep_newest"   # or "keep_oldest", "suspend"
/// compress = true
/// compression_level = 3
/// queue = 8192
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    /// Rotate when the active segment reaches this many bytes.
    #[serde(deserialize_with = "de_size")]
    pub segment_size: u64,
    /// Rotate a segment whose first record is older than this (checked at the next write).
    #[serde(deserialize_with = "de_opt_duration")]
    pub segment_age: Option<Duration>,
    /// Keep at most this many segments (the active one included); older ones are deleted.
    pub retain_segments: Option<usize>,
    /// Delete closed segments last written longer ago than this.
    #[serde(deserialize_with = "de_opt_duration")]
    pub retain_age: Option<Duration>,
    /// Delete the oldest closed segments while all segments together are larger than this
    /// (`None`: no cap). Default [`DEFAULT_RETAIN_SIZE`].
    #[serde(deserialize_with = "de_opt_size")]
    pub retain_size: Option<u64>,
    /// What to do when the file system is full.
    pub disk_full_action: DiskFullAction,
    /// zstd-compress closed segments.
    pub compress: bool,
    pub compression_level: i32,
    /// Events waiting for the writer; beyond this `submit` counts them lost instead of blocking.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            dir: PathBuf::new(),
            fsync: FsyncPolicy::default(),
            segment_size: 64 << 20,
            segment_age: Some(Duration::from_secs(24 * 3600)),
            retain_segments: None,
            retain_age: None,
            retain_size: Some(DEFAULT_RETAIN_SIZE),
            disk_full_action: DiskFullAction::KeepNewest,
            compress: false,
            compression_level: 3,
            queue: 8192,
        }
    }
}

impl AuditConfig {
    /// Settings that cannot work together.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(cap) = self.retain_size
            && cap < 2 * self.segment_size
        {
            return Err(format!(
                "audit retain_size ({cap} bytes) must be at least twice segment_size ({} bytes): \
                 the active segment is never deleted, so a smaller cap cannot be kept",
                self.segment_size
            ));
        }
        Ok(())
    }

    /// Defaults, writing to `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        AuditConfig {
            dir: dir.into(),
            ..Default::default()
        }
    }
}

/// Parses `4096`, `64KiB`, `64 MiB`, `1GB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s.trim()).map_err(|e| format!("size {s:?}: {e} (e.g. \"64MiB\")"))
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(b) => Ok(b),
        Size::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

/// `none` (or `unlimited`, `0`) for no cap, else a size.
pub fn parse_opt_size(s: &str) -> Result<Option<u64>, String> {
    match s.trim() {
        "none" | "unlimited" | "0" => Ok(None),
        other => parse_size(other).map(Some),
    }
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(0) => Ok(None),
        Size::Bytes(b) => Ok(Some(b)),
        Size::Text(t) => parse_opt_size(&t).map_err(serde::de::Error::custom),
    }
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// `kmodmon run` flags for the audit log (`#[command(flatten)]` them into the run arguments).
/// Each one given overrides the config file.
#[derive(Args, Debug, Clone, Default)]
pub struct AuditArgs {
    /// Write the tamper-evident audit log to DIR (created 0700).
    #[arg(long = "audit-dir", value_name = "DIR")]
    pub audit_dir: Option<PathBuf>,
    /// "always" (fsync every record) or an interval such as "100ms" [default: 1s].
    #[arg(long = "audit-fsync", value_name = "POLICY")]
    pub audit_fsync: Option<FsyncPolicy>,
    /// Rotate segments at this size [default: 64MiB].
    #[arg(long = "audit-segment-size", value_name = "SIZE", value_parser = parse_size)]
    pub audit_segment_size: Option<u64>,
    /// Rotate segments older than this, e.g. "1day" [default: 1day].
    #[arg(long = "audit-segment-age", value_name = "DURATION")]
    pub audit_segment_age: Option<humantime::Duration>,
    /// Keep at most N segments.
    #[arg(long = "audit-retain-segments", value_name = "N")]
    pub audit_retain_segments: Option<usize>,
    /// Delete closed segments older than this, e.g. "90days".
    #[arg(long = "audit-retain-age", value_name = "DURATION")]
    pub audit_retain_age: Option<humantime::Duration>,
    /// Delete the oldest segments while the log is larger than SIZE, or "none" [default: 1GiB].
    #[arg(long = "audit-retain-size", value_name = "SIZE", value_parser = parse_opt_size)]
    pub audit_retain_size: Option<Option<u64>>,
    /// When the disk is full: keep_newest (delete the oldest segments), keep_oldest (delete
    /// nothing; records that do not fit are counted lost), suspend (stop writing until space
    /// returns; records counted lost) [default: keep_newest].
    #[arg(long = "audit-disk-full-action", value_name = "ACTION")]
    pub audit_disk_full_action: Option<DiskFullAction>,
    /// zstd-compress closed segments.
    #[arg(long = "audit-compress")]
    pub audit_compress: bool,
}

impl AuditArgs {
    /// Applies the flags given on top of `base` (a config file's `[audit]` table, or defaults).
    /// `None` when no directory is configured: no audit log.
    pub fn apply(&self, base: Option<AuditConfig>) -> Option<AuditConfig> {
        let mut cfg = base.unwrap_or_default();
        if let Some(d) = &self.audit_dir {
            cfg.dir = d.clone();
        }
        if cfg.dir.as_os_str().is_empty() {
            return None;
        }
        if let Some(p) = self.audit_fsync {
            cfg.fsync = p;
        }
        if let Some(s) = self.audit_segment_size {
            cfg.segment_size = s;
        }
        if let Some(a) = self.audit_segment_age {
            cfg.segment_age = Some(a.into());
        }
        if let Some(n) = self.audit_retain_segments {
            cfg.retain_segments = Some(n);
        }
        if let Some(a) = self.audit_retain_age {
            cfg.retain_age = Some(a.into());
        }
        if let Some(s) = self.audit_retain_size {
            cfg.retain_size = s;
        }
        if let Some(a) = self.audit_disk_full_action {
            cfg.disk_full_action = a;
        }
        cfg.compress |= self.audit_compress;
        Some(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses() {
        assert_eq!("always".parse(), Ok(FsyncPolicy::EveryRecord));
        assert_eq!("0s".parse(), Ok(FsyncPolicy::EveryRecord));
        assert_eq!(
            "250ms".parse(),
            Ok(FsyncPolicy::Interval(Duration::from_millis(250)))
        );
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
    }

    #[test]
    fn config_from_toml_like_json_and_flags_override() {
        let cfg: AuditConfig = serde_json::from_str(
            r#"{"dir":"/x","fsync":"always","segment_size":"1MiB","retain_age":"2days","compress":true}"#,
        )
        .unwrap();
        assert_eq!(cfg.segment_size, 1 << 20);
        assert_eq!(cfg.fsync, FsyncPolicy::EveryRecord);
        assert_eq!(cfg.retain_age, Some(Duration::from_secs(2 * 86400)));
        let args = AuditArgs {
            audit_segment_size: Some(4096),
            ..Default::default()
        };
        let merged = args.apply(Some(cfg)).unwrap();
        assert_eq!(merged.segment_size, 4096);
        assert!(merged.compress);
        assert_eq!(AuditArgs::default().apply(None), None);
        assert!(serde_json::from_str::<AuditConfig>(r#"{"dri":"/x"}"#).is_err());
    }

    #[test]
    fn retain_size_and_disk_full_action_parse_and_validate() {
        let cfg: AuditConfig = serde_json::from_str(r#"{"dir":"/x"}"#).unwrap();
        assert_eq!(cfg.retain_size, Some(DEFAULT_RETAIN_SIZE));
        assert_eq!(cfg.disk_full_action, DiskFullAction::KeepNewest);
        assert!(cfg.validate().is_ok());
        let cfg: AuditConfig = serde_json::from_str(
            r#"{"dir":"/x","retain_size":"none","disk_full_action":"suspend"}"#,
        )
        .unwrap();
        assert_eq!(cfg.retain_size, None);
        assert_eq!(cfg.disk_full_action, DiskFullAction::Suspend);
        let cfg: AuditConfig =
            serde_json::from_str(r#"{"dir":"/x","retain_size":"100MiB","segment_size":"64MiB"}"#)
                .unwrap();
        assert!(cfg.validate().unwrap_err().contains("twice segment_size"));
        assert!(serde_json::from_str::<AuditConfig>(r#"{"disk_full_action":"halt"}"#).is_err());
        let args = AuditArgs {
            audit_dir: Some("/d".into()),
            audit_retain_size: Some(Some(4 << 30)),
            audit_disk_full_action: Some(DiskFullAction::KeepOldest),
            ..Default::default()
        };
        let merged = args.apply(None).unwrap();
        assert_eq!(merged.retain_size, Some(4 << 30));
        assert_eq!(merged.disk_full_action, DiskFullAction::KeepOldest);
        assert_eq!(parse_opt_size("none"), Ok(None));
        assert_eq!(parse_opt_size("2GiB"), Ok(Some(2 << 30)));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
    }
}
