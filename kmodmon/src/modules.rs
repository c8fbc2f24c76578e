//! `kmodmon modules`: what is loaded now, who loaded each module and when, and what exactly it
//! is — from the running daemon's ledger (its state file) and, for what the ledger does not
//! know, the audit log's `load` records of this boot; `loaded_before_kmodmon` where neither
//! knows. The kernel's own attributes (/proc/modules, /sys/module/NAME/{srcversion,version})
//! are shown for every module.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;

use crate::{
    event::{Container, Event, Kind},
    filter::Filter,
    identity::{Identity, SignatureEnforcement, signature},
    ledger::{self, Entry, State},
};

#[derive(Args, Debug, Clone)]
pub struct ModulesArgs {
    /// One JSON object (the schema is in the README).
    #[arg(long)]
    pub json: bool,
    /// The daemon's ledger.
    #[arg(long, value_name = "FILE", default_value = ledger::DEFAULT_FILE)]
    pub ledger_file: PathBuf,
    /// An audit log to search for the loads the ledger does not know (this boot's records)
    /// [default: /var/lib/kmodmon/audit when it exists].
    #[arg(long, value_name = "DIR")]
    pub audit_dir: Option<PathBuf>,
}

/// One loaded module.
#[derive(Clone, Debug, Serialize)]
pub struct Loaded {
    pub module: String,
    /// /proc/modules: size in bytes, reference count, state (`Live`, `Loading`, `Unloading`),
    /// taint letters.
    pub size: u64,
    pub refcnt: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taint_flags: Option<String>,
    /// /sys/module/NAME/srcversion and version (the kernel's copy of .modinfo's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub srcversion: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `ledger` (the daemon saw the load), `audit_log` (a load record of this boot), or
    /// `none`.
    pub known_from: String,
    /// Neither the ledger nor the audit log saw this module load: it was loaded before
    /// kmodmon started (or while no kmodmon ran).
    pub loaded_before_kmodmon: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_by: Option<LoadedBy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<Box<Identity>>,
}

/// The task that loaded a module.
#[derive(Clone, Debug, Serialize)]
pub struct LoadedBy {
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
}

/// The whole answer.
#[derive(Clone, Debug, Serialize)]
pub struct Inventory {
    pub signature_enforcement: SignatureEnforcement,
    /// When the ledger started (this boot), if a daemon keeps one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger_started_at: Option<String>,
    pub modules: Vec<Loaded>,
}

impl From<&Entry> for LoadedBy {
    fn from(e: &Entry) -> Self {
        LoadedBy {
            pid: e.pid,
            comm: e.comm.clone(),
            uid: e.uid,
            cgroup_id: e.cgroup_id,
            cgroup_path: e.cgroup_path.clone(),
            container: e.container.clone(),
        }
    }
}

fn entry_of(ev: &Event) -> Entry {
    Entry {
        module: ev.module.clone().unwrap_or_default(),
        loaded_at: ev.time.clone(),
        ktime_ns: ev.ktime_ns,
        pid: ev.pid,
        tid: ev.tid,
        comm: ev.comm.clone(),
        uid: ev.uid,
        cgroup_id: ev.cgroup_id,
        cgroup_path: ev.cgroup_path.clone(),
        container: ev.container.clone(),
        identity: ev.identity.clone(),
    }
}

/// Loads of modules still loaded, from this boot's records of the audit log in `dir`: the
/// last load of each module not followed by an unload; a successful attempt's identity (with
/// origin) replaces the load record's.
pub fn from_audit_log(dir: &Path, boot: SystemTime) -> anyhow::Result<BTreeMap<String, Entry>> {
    let kinds = vec!["load,unload,load_attempt".to_string()];
    let filter = Filter::new(&[], &kinds, &[], &[])?.window(Some(boot), None);
    let mut buf = Vec::new();
    crate::audit::export::export(
        dir,
        &filter,
        crate::audit::export::Format::Jsonl,
        false,
        &mut buf,
    )
    .with_context(|| format!("reading the audit log {}", dir.display()))?;
    let mut out: BTreeMap<String, Entry> = BTreeMap::new();
    for line in buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(ev) = serde_json::from_slice::<Event>(line) else {
            continue;
        };
        let Some(m) = ev.module.as_deref().map(|m| m.replace('-', "_")) else {
            continue;
        };
        match ev.kind {
            Kind::Load => {
                out.insert(m, entry_of(&ev));
            }
            Kind::Unload => {
                out.remove(&m);
            }
            Kind::LoadAttempt if ev.result == Some(0) && ev.identity.is_some() => {
                if let Some(e) = out.get_mut(&m)
                    && e.tid == ev.tid
                {
                    e.identity = ev.identity.clone();
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

fn boot_time() -> Option<SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

fn sys_attr(module: &str, attr: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/sys/module").join(module).join(attr))
        .ok()
        .map(|s| crate::escape::escape_str(s.trim()))
}

/// What is loaded now, joined with the ledger and the audit log.
pub fn inventory(
    state: Option<&State>,
    audit: &BTreeMap<String, Entry>,
) -> anyhow::Result<Inventory> {
    let text = std::fs::read_to_string("/proc/modules").context(
        "reading /proc/modules (a kernel without module support has no loadable modules)",
    )?;
    let mut modules = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = f.first() else { continue };
        let name = crate::escape::escape_str(name);
        let taint = f
            .last()
            .filter(|t| t.starts_with('(') && t.ends_with(')'))
            .map(|t| t.trim_matches(|c| c == '(' || c == ')').to_string());
        let (entry, from) = match state.and_then(|s| s.live.get(&name)) {
            Some(e) => (Some(e), "ledger"),
            None => match audit.get(&name) {
                Some(e) => (Some(e), "audit_log"),
                None => (None, "none"),
            },
        };
        modules.push(Loaded {
            size: f.get(1).and_then(|s| s.parse().ok()).unwrap_or(0),
            refcnt: f.get(2).unwrap_or(&"").to_string(),
            state: f.get(4).unwrap_or(&"").to_string(),
            taint_flags: taint,
            srcversion: sys_attr(&name, "srcversion"),
            version: sys_attr(&name, "version"),
            known_from: from.to_string(),
            loaded_before_kmodmon: entry.is_none(),
            loaded_at: entry.map(|e| e.loaded_at.clone()),
            loaded_by: entry.map(LoadedBy::from),
            identity: entry.and_then(|e| e.identity.clone()),
            module: name,
        });
    }
    modules.sort_by(|a, b| a.module.cmp(&b.module));
    Ok(Inventory {
        signature_enforcement: signature::enforcement(),
        ledger_started_at: state.map(|s| s.started_at.clone()),
        modules,
    })
}

pub fn run(args: ModulesArgs) -> anyhow::Result<ExitCode> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let state = std::fs::read(&args.ledger_file)
        .ok()
        .and_then(|b| serde_json::from_slice::<State>(&b).ok())
        .filter(|s| s.boot_id == boot_id && !boot_id.is_empty());
    let audit_dir = args.audit_dir.clone().or_else(|| {
        let d = PathBuf::from("/var/lib/kmodmon/audit");
        d.is_dir().then_some(d)
    });
    let audit = match (&audit_dir, boot_time()) {
        (Some(d), Some(boot)) => match from_audit_log(d, boot) {
            Ok(a) => a,
            Err(e) if args.audit_dir.is_some() => return Err(e),
            Err(e) => {
                log::warn!("{e:#}");
                BTreeMap::new()
            }
        },
        _ => BTreeMap::new(),
    };
    let inv = inventory(state.as_ref(), &audit)?;
    if args.json {
        println!("{}", serde_json::to_string(&inv)?);
        return Ok(ExitCode::SUCCESS);
    }
    let e = &inv.signature_enforcement;
    println!(
        "signature enforcement: {} (module.sig_enforce {}, lockdown {}); ledger: {}",
        if e.enforced { "on" } else { "off" },
        e.sig_enforce
            .map_or("unknown", |b| if b { "Y" } else { "N" }),
        e.lockdown.as_deref().unwrap_or("unknown"),
        inv.ledger_started_at
            .as_deref()
            .map_or("none (no daemon keeps one this boot)".to_string(), |t| {
                format!("since {t}")
            }),
    );
    println!(
        "{:<24} {:<8} {:<29} {:<22} {:<17} SIGNER",
        "MODULE", "TAINT", "LOADED", "BY", "SHA256"
    );
    for m in &inv.modules {
        let when = m.loaded_at.as_deref().map_or_else(
            || "before kmodmon".to_string(),
            |t| t.chars().take(29).collect(),
        );
        let by = m
            .loaded_by
            .as_ref()
            .map_or(String::new(), |b| format!("{}/{}", b.pid, b.comm));
        let id = m.identity.as_deref();
        let hash = id
            .and_then(|i| i.sha256.as_deref())
            .map_or(String::new(), |h| h[..h.len().min(16)].to_string());
        let signer = match id {
            Some(i) => match (
                i.sig_ok,
                i.signature.as_ref().and_then(|s| s.signer.as_deref()),
            ) {
                (Some(true), Some(s)) => s.to_string(),
                (Some(false), _) => "(not verified)".to_string(),
                (_, Some(s)) => format!("{s} (verdict unknown)"),
                _ => String::new(),
            },
            None => String::new(),
        };
        println!(
            "{:<24} {:<8} {:<29} {:<22} {:<17} {}",
            m.module,
            m.taint_flags.as_deref().unwrap_or(""),
            when,
            by,
            hash,
            signer
        );
    }
    Ok(ExitCode::SUCCESS)
}
