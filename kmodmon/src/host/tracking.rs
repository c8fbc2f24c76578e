//! Per-container declared modules (`KERNEL_MODULES`), captured as early as possible and kept
//! after the container is gone.
//!
//! A container is tracked from the first sign of it: its cgroup's mkdir record, its first
//! event, or the state index at startup. Its declaration is read right away — from the OCI
//! config when runtime state names one, else from the environ of a process in its cgroup (the
//! init pid, `cgroup.procs`, then the pids of its events) — and, while the container is still
//! starting (runc's init has not exec'd the program yet, or the cgroup is still empty), read
//! again on a short schedule ([`RETRY_DELAYS`]) driven by the registry's poll, never by
//! sleeping. The enricher holds back (bounded) the events of a container whose declaration is
//! still pending, so even a container that lives 100 ms is judged against what it declared.
//! Entries live [`KEEP_AFTER_GONE`] after the container's cgroup is removed.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::attribution::Resolved;
use super::declaration::{self, Declaration, ExpectError};
use super::runtime_state::ContainerMeta;
use crate::event::Container;

/// Capture attempts 1 ms apart at first: a container's program may live only a few ms.
pub const FAST_RETRIES: usize = 40;
/// Delays between the later capture attempts. About 4 s in all.
pub const RETRY_DELAYS: [Duration; 10] = [
    Duration::from_millis(2),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(20),
    Duration::from_millis(40),
    Duration::from_millis(80),
    Duration::from_millis(150),
    Duration::from_millis(300),
    Duration::from_millis(1000),
    Duration::from_millis(2000),
];
/// How long a container's declaration is kept after its cgroup is removed.
pub const KEEP_AFTER_GONE: Duration = Duration::from_secs(600);
/// Most containers tracked; beyond it the longest-gone are evicted first.
pub const MAX_TRACKED: usize = 16_384;
/// Most processes of a cgroup whose environ is tried.
const MAX_PIDS: usize = 8;

/// Where a container's declaration stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeclState {
    Pending {
        attempts: usize,
        next_at: Instant,
        last_error: Option<String>,
    },
    Known(Declaration),
    /// Could not be read; the reason.
    Failed(String),
}

/// One tracked container.
#[derive(Debug)]
pub struct Tracked {
    pub container: Container,
    /// Its cgroup2 id; 0 when it has no cgroup2 cgroup of its own (seen only in cgroup v1, or
    /// only as the container an OCI hook ran for).
    pub cgroup_id: u64,
    pub cgroup_path: Option<String>,
    pub meta: Option<Arc<ContainerMeta>>,
    pub state: DeclState,
    /// Pids seen in its events (environ fallback).
    pub pids: Vec<u32>,
    pub gone_at: Option<Instant>,
    /// When kmodmon first saw it.
    pub since: Instant,
    /// Its cgroup in the v1 hierarchy kmodmon follows (0: none seen), and that cgroup's path.
    pub cgroup_v1_id: u64,
    pub cgroup_v1_path: Option<String>,
}

/// Which hierarchy a cgroup id belongs to (ids are unique only within one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupRef {
    V2(u64),
    V1(u64),
}

/// The tracked containers, by container ID.
#[derive(Debug)]
pub struct Expectations {
    map: HashMap<String, Tracked>,
    /// Keys whose state is `Pending` (so polling costs nothing when none is).
    pending: HashSet<String>,
    proc_root: PathBuf,
    cgroup_root: Option<PathBuf>,
    /// The mount of the cgroup v1 hierarchy followed (where `cgroup_v1_path`s are).
    cgroup_v1_root: Option<PathBuf>,
    /// Capture attempts made.
    pub attempts: u64,
}

impl Expectations {
    pub fn new(proc_root: PathBuf, cgroup_root: Option<PathBuf>) -> Expectations {
        Expectations {
            map: HashMap::new(),
            pending: HashSet::new(),
            proc_root,
            cgroup_root,
            cgroup_v1_root: None,
            attempts: 0,
        }
    }

    /// Where the v1 hierarchy followed is mounted (its processes are read for declarations
    /// of containers that have no cgroup2 cgroup of their own).
    pub fn set_cgroup_v1_root(&mut self, root: Option<PathBuf>) {
        self.cgroup_v1_root = root;
    }

    pub fn get(&self, key: &str) -> Option<&Tracked> {
        self.map.get(key)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Tracked> {
        self.map.get_mut(key)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Starts tracking the container a cgroup2 cgroup resolved to (no-op for the host).
    /// Returns its key. A known container gets the metadata it lacked.
    pub fn track(&mut self, r: &Resolved, cgroup_id: u64) -> Option<String> {
        self.track_in(r, CgroupRef::V2(cgroup_id))
    }

    /// [`Expectations::track`] for a cgroup of the v1 hierarchy followed.
    pub fn track_v1(&mut self, r: &Resolved, v1_id: u64) -> Option<String> {
        self.track_in(r, CgroupRef::V1(v1_id))
    }

    /// Tracks the container `r` resolved to from a cgroup of either hierarchy. A known
    /// container gets the metadata, and the cgroup of the other hierarchy, it lacked.
    pub fn track_in(&mut self, r: &Resolved, cg: CgroupRef) -> Option<String> {
        let c = r.container.as_ref()?;
        let key = c.id.clone();
        if !self.map.contains_key(&key) {
            if self.map.len() >= MAX_TRACKED {
                self.evict_oldest();
            }
            self.pending.insert(key.clone());
        }
        let t = self.map.entry(key.clone()).or_insert_with(|| Tracked {
            container: c.clone(),
            cgroup_id: 0,
            cgroup_path: None,
            meta: None,
            state: DeclState::Pending {
                attempts: 0,
                next_at: Instant::now(),
                last_error: None,
            },
            pids: Vec::new(),
            gone_at: None,
            since: Instant::now(),
            cgroup_v1_id: 0,
            cgroup_v1_path: None,
        });
        match cg {
            CgroupRef::V2(id) if t.cgroup_id == 0 && (id != 0 || t.cgroup_path.is_none()) => {
                t.cgroup_id = id;
                if r.path.is_some() {
                    t.cgroup_path = r.path.clone();
                }
            }
            CgroupRef::V1(id) if t.cgroup_v1_id == 0 && id != 0 => {
                t.cgroup_v1_id = id;
                t.cgroup_v1_path = r.path.clone();
            }
            _ => {}
        }
        if t.meta.is_none() && r.meta.is_some() {
            t.meta = r.meta.clone();
            t.container = c.clone();
        }
        Some(key)
    }

    /// Gives a container the runtime metadata it lacked (its bundle, found through an OCI
    /// hook's runtime process before the runtime wrote its state); true when it had none.
    pub fn adopt_meta(&mut self, key: &str, meta: &Arc<ContainerMeta>) -> bool {
        match self.map.get_mut(key) {
            Some(t) if t.meta.is_none() => {
                super::attribution::complete(&mut t.container, meta);
                t.meta = Some(meta.clone());
                true
            }
            _ => false,
        }
    }

    /// A cgroup of the container was created (again): it is not gone.
    pub fn revive(&mut self, key: &str) {
        if let Some(t) = self.map.get_mut(key) {
            t.gone_at = None;
        }
    }

    /// Remembers a pid of the container (from one of its events).
    pub fn saw_pid(&mut self, key: &str, pid: u32) {
        if let Some(t) = self.map.get_mut(key)
            && matches!(t.state, DeclState::Pending { .. })
            && !t.pids.contains(&pid)
            && t.pids.len() < MAX_PIDS
        {
            t.pids.push(pid);
        }
    }

    /// The cgroup2 cgroup of a container was removed; returns the keys of the containers that
    /// went with it (each once).
    pub fn cgroup_gone(&mut self, cgroup_id: u64) -> Vec<String> {
        self.gone(CgroupRef::V2(cgroup_id))
    }

    /// A v1 cgroup was removed: the containers that had only it (no cgroup2 cgroup of their
    /// own) are gone.
    pub fn cgroup_v1_gone(&mut self, v1_id: u64) -> Vec<String> {
        self.gone(CgroupRef::V1(v1_id))
    }

    fn gone(&mut self, cg: CgroupRef) -> Vec<String> {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (k, t) in self.map.iter_mut() {
            let its = match cg {
                CgroupRef::V2(id) => t.cgroup_id == id && id != 0,
                CgroupRef::V1(id) => t.cgroup_v1_id == id && t.cgroup_id == 0,
            };
            if its && t.gone_at.is_none() {
                t.gone_at = Some(now);
                gone.push(k.clone());
            }
        }
        let pending = &mut self.pending;
        self.map.retain(|k, t| {
            let keep = t
                .gone_at
                .is_none_or(|g| now.duration_since(g) < KEEP_AFTER_GONE);
            if !keep {
                pending.remove(k);
            }
            keep
        });
        gone
    }

    /// Every tracked container, gone ones included.
    pub fn iter(&self) -> impl Iterator<Item = &Tracked> {
        self.map.values()
    }

    fn evict_oldest(&mut self) {
        let victim = self
            .map
            .iter()
            .min_by_key(|(_, t)| (t.gone_at.is_none(), t.gone_at))
            .map(|(k, _)| k.clone());
        if let Some(k) = victim {
            self.map.remove(&k);
            self.pending.remove(&k);
        }
    }

    /// Keys whose capture attempt is due.
    pub fn due(&self, now: Instant) -> Vec<String> {
        self.pending
            .iter()
            .filter(|k| self.is_due(k, now))
            .cloned()
            .collect()
    }

    /// Whether `key`'s next capture attempt is due.
    pub fn is_due(&self, key: &str, now: Instant) -> bool {
        self.map.get(key).is_some_and(
            |t| matches!(t.state, DeclState::Pending { next_at, .. } if next_at <= now),
        )
    }

    /// When the next capture attempt is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending
            .iter()
            .filter_map(|k| self.map.get(k))
            .filter_map(|t| match t.state {
                DeclState::Pending { next_at, .. } => Some(next_at),
                _ => None,
            })
            .min()
    }

    /// One capture attempt for `key`; true when the state left `Pending`.
    pub fn attempt(&mut self, key: &str, now: Instant) -> bool {
        let Some(t) = self.map.get_mut(key) else {
            return false;
        };
        let DeclState::Pending { attempts, .. } = t.state else {
            return false;
        };
        self.attempts += 1;
        let cgroup_dir = match (&self.cgroup_root, &t.cgroup_path) {
            (Some(root), Some(p)) if t.cgroup_id != 0 => Some(root.join(p.trim_start_matches('/'))),
            _ => match (&self.cgroup_v1_root, &t.cgroup_v1_path) {
                (Some(root), Some(p)) => Some(root.join(p.trim_start_matches('/'))),
                _ => None,
            },
        };
        let result = capture(
            t.meta.as_deref(),
            cgroup_dir.as_deref(),
            &t.pids,
            &self.proc_root,
        );
        t.state = match result {
            Ok(d) => DeclState::Known(d),
            Err(e) => match retry_delay(attempts) {
                Some(delay) => DeclState::Pending {
                    attempts: attempts + 1,
                    next_at: now + delay,
                    last_error: Some(e.to_string()),
                },
                None => DeclState::Failed(e.to_string()),
            },
        };
        let settled = !matches!(t.state, DeclState::Pending { .. });
        if settled {
            self.pending.remove(key);
        }
        settled
    }

    /// Ends every pending capture now (shutdown): what is unknown is reported as such.
    pub fn give_up_all(&mut self) -> Vec<String> {
        let mut keys = Vec::new();
        for (k, t) in self.map.iter_mut() {
            if let DeclState::Pending { last_error, .. } = &t.state {
                t.state = DeclState::Failed(
                    last_error
                        .clone()
                        .unwrap_or_else(|| "kmodmon stopped before it was read".to_string()),
                );
                keys.push(k.clone());
            }
        }
        self.pending.clear();
        keys
    }
}

/// The delay before attempt `done + 1`, or `None` after the last.
pub fn retry_delay(done: usize) -> Option<Duration> {
    if done < FAST_RETRIES {
        return Some(Duration::from_millis(1));
    }
    RETRY_DELAYS.get(done - FAST_RETRIES).copied()
}

/// Reads a container's declaration once (see [`declaration::resolve`]): its annotations
/// from runtime state, else `KERNEL_MODULES` from the OCI config, else from the environ of its
/// init pid, of the processes in its cgroup, then of `pids`. A process that is still becoming
/// the container's program gives [`ExpectError::Starting`] (retry), and so does an existing
/// but empty cgroup.
pub fn capture(
    meta: Option<&ContainerMeta>,
    cgroup_dir: Option<&Path>,
    pids: &[u32],
    proc_root: &Path,
) -> Result<Declaration, ExpectError> {
    let annotated = meta
        .map(ContainerMeta::annotated_declarations)
        .unwrap_or_default();
    declaration::resolve(annotated, capture_env(meta, cgroup_dir, pids, proc_root))
}

/// `KERNEL_MODULES`, from the OCI config or a process of the container.
fn capture_env(
    meta: Option<&ContainerMeta>,
    cgroup_dir: Option<&Path>,
    pids: &[u32],
    proc_root: &Path,
) -> Result<Declaration, ExpectError> {
    if let Some((path, env)) = meta.and_then(|m| m.env.as_ref()) {
        return declaration::declaration(Some((path, env)), None, proc_root);
    }
    let mut candidates: Vec<u32> = meta.and_then(|m| m.pid).into_iter().collect();
    let mut cgroup_exists = false;
    if let Some(dir) = cgroup_dir
        && let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs"))
    {
        cgroup_exists = true;
        let mut procs: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        procs.sort_unstable();
        candidates.extend(procs.into_iter().take(MAX_PIDS));
    }
    candidates.extend_from_slice(pids);
    let mut starting = None;
    let mut other = None;
    let mut tried = Vec::new();
    for pid in candidates {
        if tried.contains(&pid) {
            continue;
        }
        tried.push(pid);
        match declaration::declaration(None, Some(pid), proc_root) {
            Ok(d) => return Ok(d),
            Err(e) if e.is_retryable() => starting = starting.or(Some(e)),
            Err(e) => other = other.or(Some(e)),
        }
    }
    if let Some(e) = starting {
        return Err(e);
    }
    if tried.is_empty() && cgroup_exists {
        return Err(ExpectError::Starting {
            pid: 0,
            comm: "(no process in the cgroup yet)".to_string(),
        });
    }
    Err(other.unwrap_or(ExpectError::Nowhere))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc_entry(root: &Path, pid: u32, comm: &str, environ: &[u8]) {
        let d = root.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("environ"), environ).unwrap();
        std::fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
    }

    fn resolved(id: &str, path: &str) -> Resolved {
        Resolved {
            path: Some(path.to_string()),
            container: Some(Container {
                id: id.to_string(),
                runtime: "docker".to_string(),
                ..Container::default()
            }),
            meta: None,
        }
    }

    #[test]
    fn capture_prefers_config_then_cgroup_processes_then_event_pids() {
        let t = tempfile::tempdir().unwrap();
        let proc_root = t.path().join("proc");
        let cg = t.path().join("cg");
        std::fs::create_dir_all(&cg).unwrap();
        proc_entry(&proc_root, 20, "sh", b"KERNEL_MODULES=ip_vs\0");
        proc_entry(&proc_root, 30, "insmod", b"KERNEL_MODULES=other\0");
        std::fs::write(cg.join("cgroup.procs"), "20\n").unwrap();
        let d = capture(None, Some(&cg), &[30], &proc_root).unwrap();
        assert_eq!(d.expected.modules, vec!["ip_vs"]);
        // The config wins when runtime state found one.
        let meta = ContainerMeta {
            env: Some((
                PathBuf::from("/b/config.json"),
                vec!["KERNEL_MODULES=nf_nat".to_string()],
            )),
            ..ContainerMeta::default()
        };
        let d = capture(Some(&meta), Some(&cg), &[], &proc_root).unwrap();
        assert_eq!(d.expected.modules, vec!["nf_nat"]);
        // Cgroup gone (the container exited): the pid of its event, if still there.
        let d = capture(None, Some(&t.path().join("gone")), &[30], &proc_root).unwrap();
        assert_eq!(d.expected.modules, vec!["other"]);
        assert!(matches!(
            capture(None, None, &[], &proc_root),
            Err(ExpectError::Nowhere)
        ));
    }

    #[test]
    fn capture_says_retry_while_the_container_starts() {
        let t = tempfile::tempdir().unwrap();
        let proc_root = t.path().join("proc");
        let cg = t.path().join("cg");
        std::fs::create_dir_all(&cg).unwrap();
        std::fs::write(cg.join("cgroup.procs"), "").unwrap();
        let e = capture(None, Some(&cg), &[], &proc_root).unwrap_err();
        assert!(e.is_retryable(), "empty cgroup: {e}");
        proc_entry(
            &proc_root,
            40,
            "runc:[2:INIT]",
            b"_LIBCONTAINER_INITPIPE=3\0",
        );
        std::fs::write(cg.join("cgroup.procs"), "40\n").unwrap();
        let e = capture(None, Some(&cg), &[], &proc_root).unwrap_err();
        assert!(e.is_retryable(), "runc init: {e}");
        proc_entry(&proc_root, 40, "sleep", b"KERNEL_MODULES=ip_vs,ip_vs_wrr\0");
        let d = capture(None, Some(&cg), &[], &proc_root).unwrap();
        assert_eq!(d.expected.modules, vec!["ip_vs", "ip_vs_wrr"]);
    }

    #[test]
    fn retries_follow_the_schedule_then_give_up() {
        let t = tempfile::tempdir().unwrap();
        let proc_root = t.path().join("proc");
        let cgroot = t.path().join("cgroot");
        let cg = cgroot.join("docker/abc");
        std::fs::create_dir_all(&cg).unwrap();
        std::fs::write(cg.join("cgroup.procs"), "").unwrap();
        let mut x = Expectations::new(proc_root.clone(), Some(cgroot));
        let key = x.track(&resolved("abc", "/docker/abc"), 9).unwrap();
        assert_eq!(
            x.track(&resolved("abc", "/docker/abc/init"), 10),
            Some(key.clone())
        );
        assert_eq!(x.len(), 1);
        let mut now = Instant::now();
        assert_eq!(x.due(now), vec![key.clone()]);
        assert!(!x.attempt(&key, now));
        assert!(x.due(now).is_empty(), "next attempt is later");
        now += retry_delay(0).unwrap();
        assert_eq!(x.due(now), vec![key.clone()]);
        // The program started: known on the next attempt.
        proc_entry(&proc_root, 50, "sh", b"KERNEL_MODULES=ip_vs\0");
        std::fs::write(cg.join("cgroup.procs"), "50\n").unwrap();
        assert!(x.attempt(&key, now));
        assert!(matches!(&x.get(&key).unwrap().state, DeclState::Known(d) if d.declared));
        assert_eq!(x.next_due(), None);

        // A container that can never be read fails after the whole schedule.
        let key2 = x.track(&resolved("def", "/docker/def"), 11).unwrap();
        let mut n = 0;
        while !x.attempt(&key2, now) {
            now += Duration::from_secs(3);
            n += 1;
            assert!(n <= FAST_RETRIES + RETRY_DELAYS.len(), "never gave up");
        }
        assert_eq!(n, FAST_RETRIES + RETRY_DELAYS.len());
        assert!(
            matches!(&x.get(&key2).unwrap().state, DeclState::Failed(e) if e.contains("no OCI config"))
        );
    }

    #[test]
    fn declarations_outlive_the_cgroup_for_a_while() {
        let mut x = Expectations::new(PathBuf::from("/nonexistent"), None);
        let key = x.track(&resolved("abc", "/docker/abc"), 9).unwrap();
        x.cgroup_gone(9);
        assert!(x.get(&key).unwrap().gone_at.is_some(), "kept, marked gone");
        x.track(&resolved("abc", "/docker/abc"), 9);
        assert!(
            x.get(&key).unwrap().gone_at.is_some(),
            "an event does not revive it"
        );
        x.revive(&key);
        assert!(x.get(&key).unwrap().gone_at.is_none(), "a new cgroup does");
        assert!(
            x.track(&Resolved::default(), 1).is_none(),
            "host: not tracked"
        );
    }

    #[test]
    fn pids_are_remembered_while_pending() {
        let mut x = Expectations::new(PathBuf::from("/nonexistent"), None);
        let key = x.track(&resolved("abc", "/docker/abc"), 9).unwrap();
        for pid in [5, 5, 6] {
            x.saw_pid(&key, pid);
        }
        assert_eq!(x.get(&key).unwrap().pids, vec![5, 6]);
        assert_eq!(x.give_up_all(), vec![key.clone()]);
        assert!(matches!(x.get(&key).unwrap().state, DeclState::Failed(_)));
    }
}
