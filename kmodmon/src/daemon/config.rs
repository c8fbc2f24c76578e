//! `kmodmon run` configuration: a TOML file (default /etc/kmodmon/kmodmon.toml), overridden by
//! flags.
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use crate::audit::{AuditArgs, AuditConfig};

pub const DEFAULT_CONFIG: &str = "/etc/kmodmon/kmodmon.toml";

/// The config file. Unknown keys are errors, reported with line and column.
///
/// ```toml
/// [audit]
/// dir = "/var/lib/kmodmon/audit"
/// fsync = "1s"
///
/// [metrics]
/// listen = "127.0.0.1:9464"
///
/// [forward]
/// stdout = true
/// syslog = false
/// syslog_socket = "/dev/log"
/// syslog_facility = "daemon"
///
/// [probe]
/// no_fexit = false
/// seccomp_attempts = true   # report module syscalls refused by seccomp
/// no_identity = false   # true: no module image capture (sha256, .modinfo, signature)
/// repeat_window = "1s"  # identical attempts aggregated in the kernel ("0s" = off)
///
/// [policy]
/// file = "/etc/kmodmon/policy.toml"
///
/// [check]               # `kmodmon check` every interval, as gauges on /metrics
/// interval = "15m"      # "0s" turns it off
///
/// [containers]          # runtime state outside the runtimes' default places
/// state_dirs = ["docker=/srv/docker", "docker-exec=/run/docker"]
///
/// [ledger]              # the module ledger `kmodmon modules` reads
/// file = "/var/lib/kmodmon/modules.json"
///
/// [rate_limit]          # audit records of attempts, per cgroup (0 = off)
/// rate = 20
/// burst = 200
/// summary_every = "10s"
///
/// [node_labels]         # kmodmon.io/module.NAME labels on this node (Kubernetes, opt-in)
/// enabled = false
/// node_name = ""        # default: $NODE_NAME (the downward API's spec.nodeName)
/// interval = "10s"      # how often the declared, loaded modules are compared
/// min_interval = "30s"  # at most one PATCH this often
/// # api_server, token_file, ca_file: default from the pod's service account
/// ```
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub audit: Option<AuditConfig>,
    pub metrics: MetricsConfig,
    pub forward: ForwardConfig,
    pub probe: ProbeConfig,
    pub policy: PolicyConfig,
    /// `[rate_limit]`: audit records of attempts per cgroup; beyond it they are aggregated
    /// into counted `rate_limited` records.
    pub rate_limit: crate::ratelimit::RateLimitConfig,
    pub check: CheckConfig,
    pub node_labels: NodeLabelsConfig,
    pub containers: ContainersConfig,
    /// `[ledger]`: where the module ledger is kept for `kmodmon modules`.
    pub ledger: LedgerConfig,
}

/// `[ledger]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// Default [`crate::ledger::DEFAULT_FILE`].
    pub file: Option<PathBuf>,
}

/// `[containers]`: where runtimes keep their state when not in their default places
/// (`KIND=DIR`, as `--state-dir`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ContainersConfig {
    pub state_dirs: Vec<crate::host::runtime_state::StateDir>,
}

/// `[node_labels]`: KMM-style `kmodmon.io/module.NAME` labels on this node through the
/// Kubernetes API (README "Node labels"). Off unless `enabled`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeLabelsConfig {
    pub enabled: bool,
    /// The node's name; empty: the `NODE_NAME` environment variable.
    pub node_name: String,
    #[serde(with = "humantime_serde_opt")]
    pub interval: std::time::Duration,
    #[serde(with = "humantime_serde_opt")]
    pub min_interval: std::time::Duration,
    /// `https://HOST:PORT`; default from KUBERNETES_SERVICE_HOST/PORT.
    pub api_server: Option<String>,
    /// Default: the service account's token.
    pub token_file: Option<PathBuf>,
    /// Default: the service account's ca.crt.
    pub ca_file: Option<PathBuf>,
}

impl Default for NodeLabelsConfig {
    fn default() -> Self {
        NodeLabelsConfig {
            enabled: false,
            node_name: String::new(),
            interval: std::time::Duration::from_secs(10),
            min_interval: std::time::Duration::from_secs(30),
            api_server: None,
            token_file: None,
            ca_file: None,
        }
    }
}

impl NodeLabelsConfig {
    /// The node name and the API configuration, from this section and the pod's environment.
    pub fn resolve(&self) -> anyhow::Result<(String, crate::kube::ApiConfig)> {
        let node = if self.node_name.is_empty() {
            std::env::var("NODE_NAME").map_err(|_| {
                anyhow::anyhow!(
                    "[node_labels]: no node name: set NODE_NAME from the downward API (spec.nodeName) or node_name"
                )
            })?
        } else {
            self.node_name.clone()
        };
        let in_cluster = crate::kube::ApiConfig::in_cluster();
        let server = match (&self.api_server, &in_cluster) {
            (Some(s), _) => s.clone(),
            (None, Ok(c)) => c.server.clone(),
            (None, Err(e)) => anyhow::bail!("[node_labels]: {e}"),
        };
        let sa = std::path::Path::new(crate::kube::SERVICE_ACCOUNT_DIR);
        Ok((
            node,
            crate::kube::ApiConfig {
                server,
                token_file: self.token_file.clone().unwrap_or_else(|| sa.join("token")),
                ca_file: self.ca_file.clone().unwrap_or_else(|| sa.join("ca.crt")),
            },
        ))
    }
}

/// `[check]`: the daemon runs `kmodmon check` (running kernel and next boot, containers from
/// its live registry) every `interval` and serves the result as gauges on /metrics.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CheckConfig {
    #[serde(with = "humantime_serde_opt")]
    pub interval: std::time::Duration,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            interval: std::time::Duration::from_secs(15 * 60),
        }
    }
}

/// `"15m"` ↔ Duration (humantime).
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// `[policy]`: enforcement (see README "Enforcement").
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// The policy file; enforcement (or audit-mode decisions) runs only when set.
    pub file: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardConfig {
    pub stdout: bool,
    pub syslog: bool,
    pub syslog_socket: PathBuf,
    pub syslog_facility: String,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            stdout: false,
            syslog: false,
            syslog_socket: PathBuf::from(crate::sinks::syslog::DEFAULT_SOCKET),
            syslog_facility: "daemon".to_string(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeConfig {
    pub no_fexit: bool,
    pub force_raw_syscalls: bool,
    /// Report module syscalls a seccomp filter refused before they ran (default true).
    pub seccomp_attempts: bool,
    pub no_identity: bool,
    /// Identical attempts of one task closer than this are aggregated in the kernel
    /// (`None`: the default, 1 s; zero: off).
    #[serde(deserialize_with = "duration_opt")]
    pub repeat_window: Option<std::time::Duration>,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            no_fexit: false,
            force_raw_syscalls: false,
            seccomp_attempts: true,
            no_identity: false,
            repeat_window: None,
        }
    }
}

fn duration_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<std::time::Duration>, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Config file (TOML). Default: /etc/kmodmon/kmodmon.toml when it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub audit: AuditArgs,
    /// Serve Prometheus metrics at ADDR (e.g. 127.0.0.1:9464 or :9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Also print every event as a JSON line on stdout (for log shippers).
    #[arg(long)]
    pub stdout: bool,
    /// Also send every event to syslog (RFC 5424 over the local socket).
    #[arg(long)]
    pub syslog: bool,
    /// Do not use fexit even where BTF allows it.
    #[arg(long)]
    pub no_fexit: bool,
    /// Force the raw_syscalls fallback for attempts.
    #[arg(long)]
    pub force_raw_syscalls: bool,
    /// Do not report module syscalls that a seccomp filter refused before they ran (saves
    /// the cost seccomp-confined tasks pay for it on kernels where attempts come from fexit).
    /// Where attempts come from the syscall exit alone (source sys_exit) they are still
    /// reported as failed attempts, without blocked_by.
    #[arg(long)]
    pub no_seccomp_attempts: bool,
    /// Runtime state kept outside the runtime's default place, as KIND=DIR (repeatable; adds
    /// to `[containers] state_dirs`). KIND: docker, docker-exec, containerd, containers, runc,
    /// crun, lxc, isulad.
    #[arg(long = "state-dir", value_name = "KIND=DIR")]
    pub state_dirs: Vec<crate::host::runtime_state::StateDir>,
    /// Do not capture module images: no content identity (sha256, .modinfo, signature).
    #[arg(long)]
    pub no_identity: bool,
    /// Identical attempts of one task closer than this are aggregated in the kernel into
    /// repeat summaries; "0" reports every attempt on its own [default: 1s, or
    /// `[probe] repeat_window`].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub repeat_window: Option<std::time::Duration>,
    /// Audit records of attempts per second and cgroup before they are aggregated into
    /// `rate_limited` records; 0 turns the limit off [default: 20, or `[rate_limit] rate`].
    #[arg(long, value_name = "RATE")]
    pub audit_rate_limit: Option<u32>,
    /// Enforce this policy (BPF LSM); its `mode` decides enforce or audit.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Where the module ledger (loads, loaders, identities) is kept for `kmodmon modules`
    /// [default: /var/lib/kmodmon/modules.json, or `[ledger] file`].
    #[arg(long, value_name = "FILE")]
    pub ledger_file: Option<PathBuf>,
    /// Only check the configuration (the config file, the flags, the policy file it names) and
    /// exit: 0 when valid, 2 with the file, line and column of the first error.
    #[arg(long)]
    pub check_config: bool,
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Effective {
    pub audit: Option<AuditConfig>,
    pub metrics: Option<String>,
    pub forward: ForwardConfig,
    pub probe: ProbeConfig,
    pub policy: Option<PathBuf>,
    pub rate_limit: crate::ratelimit::RateLimitConfig,
    pub check: CheckConfig,
    pub node_labels: NodeLabelsConfig,
    pub state_dirs: Vec<crate::host::runtime_state::StateDir>,
    pub source: Option<PathBuf>,
    pub ledger_file: PathBuf,
}

/// Reads the config file (if any) and applies the flags on top.
pub fn load(args: &RunArgs) -> anyhow::Result<Effective> {
    let (file, source) = match &args.config {
        Some(p) => (read(p)?, Some(p.clone())),
        None if Path::new(DEFAULT_CONFIG).exists() => (
            read(Path::new(DEFAULT_CONFIG))?,
            Some(PathBuf::from(DEFAULT_CONFIG)),
        ),
        None => (FileConfig::default(), None),
    };
    let eff = apply(file, args, source);
    if let Some(audit) = &eff.audit {
        audit.validate().map_err(|e| {
            let at = eff
                .source
                .as_ref()
                .map_or("flags".to_string(), |p| p.display().to_string());
            anyhow::anyhow!("{at}: [audit]: {e}")
        })?;
    }
    Ok(eff)
}

fn read(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Parses a config file; errors name the line and column.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    toml::from_str::<FileConfig>(text).map_err(|e| {
        let at = e
            .span()
            .map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!("line {line}, column {col}: ")
            })
            .unwrap_or_default();
        format!("{at}{}", e.message())
    })
}

fn apply(file: FileConfig, args: &RunArgs, source: Option<PathBuf>) -> Effective {
    let mut forward = file.forward;
    forward.stdout |= args.stdout;
    forward.syslog |= args.syslog;
    let mut probe = file.probe;
    probe.no_fexit |= args.no_fexit;
    probe.force_raw_syscalls |= args.force_raw_syscalls;
    probe.seccomp_attempts &= !args.no_seccomp_attempts;
    probe.no_identity |= args.no_identity;
    if args.repeat_window.is_some() {
        probe.repeat_window = args.repeat_window;
    }
    Effective {
        audit: args.audit.apply(file.audit),
        metrics: args.metrics.clone().or(file.metrics.listen),
        forward,
        probe,
        policy: args.policy.clone().or(file.policy.file),
        rate_limit: crate::ratelimit::RateLimitConfig {
            rate: args.audit_rate_limit.unwrap_or(file.rate_limit.rate),
            ..file.rate_limit
        },
        check: file.check,
        node_labels: file.node_labels,
        state_dirs: file
            .containers
            .state_dirs
            .into_iter()
            .chain(args.state_dirs.iter().cloned())
            .collect(),
        source,
        ledger_file: args
            .ledger_file
            .clone()
            .or(file.ledger.file)
            .unwrap_or_else(|| PathBuf::from(crate::ledger::DEFAULT_FILE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let cfg = parse(
            "[audit]\ndir = \"/var/lib/kmodmon/audit\"\nfsync = \"always\"\n\
             [metrics]\nlisten = \":9464\"\n[forward]\nstdout = true\n[probe]\nno_fexit = true\n",
        )
        .unwrap();
        assert_eq!(
            cfg.audit.as_ref().unwrap().dir,
            PathBuf::from("/var/lib/kmodmon/audit")
        );
        assert_eq!(cfg.metrics.listen.as_deref(), Some(":9464"));
        assert!(cfg.forward.stdout && cfg.probe.no_fexit);
        assert!(cfg.probe.seccomp_attempts, "on unless turned off");
        let off = parse("[probe]\nseccomp_attempts = false\n").unwrap();
        assert!(!off.probe.seccomp_attempts);
        let args = RunArgs {
            no_seccomp_attempts: true,
            ..Default::default()
        };
        assert!(
            !apply(FileConfig::default(), &args, None)
                .probe
                .seccomp_attempts
        );
        assert_eq!(cfg.probe.repeat_window, None);
        let cfg = parse("[probe]\nrepeat_window = \"250ms\"\n").unwrap();
        assert_eq!(
            cfg.probe.repeat_window,
            Some(std::time::Duration::from_millis(250))
        );
        assert!(parse("[probe]\nrepeat_window = \"soon\"\n").is_err());
    }

    #[test]
    fn unknown_keys_are_errors_with_position() {
        let err = parse("[metrics]\nlisten = \":1\"\nlisen = 2\n").unwrap_err();
        assert!(err.starts_with("line 3, column 1:"), "{err}");
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse("[metrics]\nlisten = \":1\"\n[audit]\ndir = \"/a\"\n").unwrap();
        let args = RunArgs {
            metrics: Some(":2".into()),
            stdout: true,
            audit: AuditArgs {
                audit_dir: Some("/b".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let eff = apply(file, &args, None);
        assert_eq!(eff.metrics.as_deref(), Some(":2"));
        assert_eq!(eff.audit.unwrap().dir, PathBuf::from("/b"));
        assert!(eff.forward.stdout);
    }

    #[test]
    fn audit_settings_that_cannot_work_are_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "[audit]\ndir = \"/a\"\nsegment_size = \"64MiB\"\nretain_size = \"100MiB\"\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let err = load(&args).unwrap_err().to_string();
        assert!(err.contains("twice segment_size"), "{err}");
        std::fs::write(
            &path,
            "[audit]\ndir = \"/a\"\nretain_size = \"none\"\ndisk_full_action = \"suspend\"\n",
        )
        .unwrap();
        let eff = load(&args).unwrap();
        let a = eff.audit.unwrap();
        assert_eq!(a.retain_size, None);
        assert_eq!(a.disk_full_action, crate::audit::DiskFullAction::Suspend);
    }

    #[test]
    fn the_rate_limit_table_parses_and_defaults() {
        let cfg = parse("[rate_limit]\nrate = 5\nburst = 10\nsummary_every = \"2s\"\n").unwrap();
        assert_eq!((cfg.rate_limit.rate, cfg.rate_limit.burst), (5, 10));
        assert_eq!(
            cfg.rate_limit.summary_every,
            std::time::Duration::from_secs(2)
        );
        let d = parse("").unwrap().rate_limit;
        assert_eq!(d, crate::ratelimit::RateLimitConfig::default());
        assert!(parse("[rate_limit]\nrat = 5\n").is_err());
    }

    #[test]
    fn no_audit_dir_means_no_audit_log() {
        let eff = apply(FileConfig::default(), &RunArgs::default(), None);
        assert!(eff.audit.is_none());
    }
}
