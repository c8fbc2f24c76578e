//! Enrichment: cgroup id → cgroup path → container → expected modules → verdict, plus the
//! autoload join and kmodmon's own `expectation` / `self_load` events.
//!
//! The [`Enricher`] runs on the enricher task (never on the ring-buffer reader). Use it as a
//! stream stage: [`Enricher::handle`] each decoded event, [`Enricher::poll`] whenever a message
//! arrived or [`Enricher::next_wakeup`] passed, and send [`Enricher::take_ready`] onwards.
//! Events of a container whose `KERNEL_MODULES` is still being read are held back until it is
//! known (at most about 4 s, see [`expectations::RETRY_DELAYS`]); everything else passes
//! straight through, in order.
pub mod announce;
pub mod attribution;
pub mod autoload;
pub mod cgroup;
pub mod container;
pub mod expect;
pub mod expectations;
pub mod init_names;
pub mod runtime_state;
mod verdict;

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use self::announce::{Live, LoadResult, Subject};
use self::attribution::{Attribution, Resolved};
use self::autoload::{AutoloadJoin, ModuleResolver, NameOnly, Request};
use self::cgroup::CgroupCache;
use self::expectations::{DeclState, Expectations, MAX_HELD};
use self::runtime_state::StateConfig;
use crate::event::{Clock, Event, Kind};
use crate::moddb::{ModDb, RootFs};

/// How a new cgroup that is not recognisable from its path (plain runc's `/NAME`) is looked
/// for in runtime state again while its runtime writes its state: delays after the mkdir.
const CANDIDATE_DELAYS: [Duration; 7] = [
    Duration::from_millis(2),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(20),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(300),
];
/// How long after a container appears its runtime state is looked for on every event.
const YOUNG: Duration = Duration::from_secs(2);
/// Most candidate cgroups watched at once.
const MAX_CANDIDATES: usize = 256;

/// What the enricher reads and does. `Default` is right for a real host.
#[derive(Clone, Debug, Default)]
pub struct EnrichOptions {
    /// modules.dep / modules.alias directory (default /lib/modules/$(uname -r); absent → no
    /// dependency or alias resolution).
    pub modules_dir: Option<PathBuf>,
    /// Run `modprobe` for a new container's declared modules that are missing (and report
    /// it as a `self_load` event).
    pub load_expected: bool,
    /// Runtime state roots (default [`StateConfig::detect`]).
    pub state: Option<StateConfig>,
    /// The cgroup2 mount (default: from /proc/self/mounts).
    pub cgroup_root: Option<PathBuf>,
    /// Root of /proc/modules and /sys/module (default `/`).
    pub live_root: Option<PathBuf>,
    /// Do not read a module database (tests).
    pub no_moddb: bool,
}

#[derive(Debug)]
struct Candidate {
    id: u64,
    tries: usize,
    next_at: Instant,
}

/// Holds everything enrichment needs; runs on the enricher task, never on the ring reader.
pub struct Enricher {
    pub cgroups: CgroupCache,
    attribution: Attribution,
    expectations: Expectations,
    autoload: AutoloadJoin,
    moddb: Option<Arc<ModDb>>,
    load_expected: bool,
    live_root: RootFs,
    clock: Clock,
    ready: Vec<Event>,
    candidates: Vec<Candidate>,
    loads_tx: mpsc::Sender<LoadResult>,
    loads_rx: mpsc::Receiver<LoadResult>,
    loading: HashSet<String>,
}

impl Enricher {
    /// An enricher with the host's defaults.
    pub fn new() -> Enricher {
        Enricher::with_options(EnrichOptions::default())
    }

    /// Reads the cgroup tree, runtime state and the module database once, and starts
    /// tracking the containers already running.
    pub fn with_options(opts: EnrichOptions) -> Enricher {
        let cgroup_root = opts.cgroup_root.clone().or_else(cgroup::host_cgroup_root);
        let cgroups = CgroupCache::with_root(cgroup_root.clone());
        let state = opts.state.clone().unwrap_or_else(StateConfig::detect);
        let proc_root = state.proc_root.clone();
        let moddb = if opts.no_moddb {
            None
        } else {
            load_moddb(opts.modules_dir.as_deref())
        };
        let (loads_tx, loads_rx) = mpsc::channel();
        let mut e = Enricher {
            cgroups,
            attribution: Attribution::new(state),
            expectations: Expectations::new(proc_root, cgroup_root),
            autoload: AutoloadJoin::new(),
            moddb: moddb.map(Arc::new),
            load_expected: opts.load_expected,
            live_root: RootFs::new(opts.live_root.unwrap_or_else(|| PathBuf::from("/"))),
            clock: Clock::new(),
            ready: Vec::new(),
            candidates: Vec::new(),
            loads_tx,
            loads_rx,
            loading: HashSet::new(),
        };
        e.track_running();
        e
    }

    /// Replaces the module database (tests, or a reload).
    pub fn set_moddb(&mut self, db: Option<ModDb>) {
        self.moddb = db.map(Arc::new);
    }

    /// Containers running at startup, from runtime state.
    fn track_running(&mut self) {
        let metas: Vec<_> = self.attribution.index().iter().cloned().collect();
        for meta in metas {
            let Some(path) = meta.cgroup_path.clone() else {
                continue;
            };
            let id = self
                .cgroups
                .root()
                .and_then(|r| std::fs::metadata(r.join(path.trim_start_matches('/'))).ok())
                .map_or(0, |m| m.ino());
            let container = match container::parse_cgroup_path(&path) {
                Some(mut c) => {
                    attribution::complete(&mut c, &meta);
                    c
                }
                None => meta.to_container(),
            };
            let r = Resolved {
                path: Some(path),
                container: Some(container),
                meta: Some(Arc::new(meta)),
            };
            self.expectations.track(&r, id);
        }
    }

    /// The kernel created (`mkdir`) or removed a cgroup2 directory.
    pub fn cgroup_changed(&mut self, mkdir: bool, id: u64, path: &str) {
        self.attribution.invalidate(id);
        if !mkdir {
            self.cgroups.removed(id, path);
            self.expectations.cgroup_gone(id);
            self.candidates.retain(|c| c.id != id);
            return;
        }
        self.cgroups.created(id, path);
        let r = self.attribution.resolve(&mut self.cgroups, id);
        log::debug!(
            "cgroup {id} {path} created: container {:?}, runtime state {}",
            r.key(),
            if r.meta.is_some() {
                "found"
            } else {
                "not found"
            }
        );
        match r.key() {
            Some(key) => {
                let key = key.to_string();
                self.expectations.track(&r, id);
                self.expectations.revive(&key);
                self.try_capture(&key);
            }
            None if r.meta.is_none() && self.candidates.len() < MAX_CANDIDATES => {
                // Maybe a container whose runtime has not written its state yet.
                self.attribution.invalidate(id);
                self.candidates.push(Candidate {
                    id,
                    tries: 0,
                    next_at: Instant::now() + CANDIDATE_DELAYS[0],
                });
            }
            None => {}
        }
    }

    /// Fills cgroup path, container, verdict and `requested_by` at once (no holding back:
    /// a declaration still being read is judged as unknown). [`Enricher::handle`] is the
    /// stream version.
    pub fn enrich(&mut self, ev: &mut Event) {
        let key = self.prepare(ev);
        self.judge(ev, key.as_deref());
    }

    /// Takes one decoded event; it comes out of [`Enricher::take_ready`] enriched, at once or
    /// (container still starting) a little later.
    pub fn handle(&mut self, mut ev: Event) {
        let key = self.prepare(&mut ev);
        if let Some(k) = &key
            && self.is_pending(k)
        {
            if self.expectations.is_due(k, Instant::now()) {
                self.try_capture(k);
            }
            if self.is_pending(k)
                && let Some(t) = self.expectations.get_mut(k)
                && t.held.len() < MAX_HELD
            {
                t.held.push(ev);
                return;
            }
        }
        self.judge(&mut ev, key.as_deref());
        self.ready.push(ev);
    }

    /// Attribution and the autoload join; returns the key of the container whose
    /// expectations judge this event (the requester's, for an autoload).
    fn prepare(&mut self, ev: &mut Event) -> Option<String> {
        if matches!(ev.kind, Kind::Expectation | Kind::SelfLoad) {
            return None;
        }
        let mut own = None;
        if ev.cgroup_id != 0 && ev.cgroup_path.is_none() {
            let candidate = self.candidates.iter().position(|c| c.id == ev.cgroup_id);
            if candidate.is_some()
                && self
                    .attribution
                    .cached(ev.cgroup_id)
                    .is_none_or(|r| r.container.is_none())
            {
                // Not a container a moment ago; its runtime state may be there now.
                self.attribution.invalidate(ev.cgroup_id);
            }
            let mut r = self.attribution.resolve(&mut self.cgroups, ev.cgroup_id);
            if let Some(i) = candidate
                && r.container.is_some()
            {
                // Found: keep this answer (the state goes away when the container exits).
                self.candidates.swap_remove(i);
            }
            own = self.expectations.track(&r, ev.cgroup_id);
            if let Some(t) = own.as_deref().and_then(|k| self.expectations.get(k))
                && t.meta.is_none()
                && t.since.elapsed() < YOUNG
            {
                // A container that just appeared: its runtime state may have been written
                // since its cgroup was resolved.
                self.attribution.invalidate(ev.cgroup_id);
                let again = self.attribution.resolve(&mut self.cgroups, ev.cgroup_id);
                if again.meta.is_some() && again.key() == own.as_deref() {
                    self.expectations.track(&again, ev.cgroup_id);
                    r = again;
                }
            }
            ev.cgroup_path = r.path;
            ev.container = r.container;
        } else if let Some(c) = &ev.container {
            own = Some(c.id.clone());
        }
        if let Some(k) = &own {
            self.expectations.saw_pid(k, ev.pid);
            if let Some(pp) = ev.ppid {
                self.expectations.saw_pid(k, pp);
            }
        }
        let resolver: &dyn ModuleResolver = match &self.moddb {
            Some(db) => db.as_ref(),
            None => &NameOnly,
        };
        match (ev.kind, ev.module.as_deref()) {
            (Kind::Request, Some(name)) => {
                self.autoload.request(
                    Request {
                        ktime_ns: ev.ktime_ns,
                        requested: name,
                        pid: ev.pid,
                        comm: &ev.comm,
                        cgroup_id: ev.cgroup_id,
                        container: ev.container.as_ref(),
                    },
                    resolver,
                );
                own
            }
            (Kind::Load | Kind::LoadAttempt, Some(m)) if ev.container.is_none() => {
                match self.autoload.on_load(m, ev.kind, ev.ktime_ns) {
                    Some(a) => {
                        if a.requests > 1 {
                            verdict::add_detail(
                                ev,
                                &format!("{} identical requests merged", a.requests),
                            );
                        }
                        ev.requested_by = Some(a.requested_by);
                        a.container_key
                    }
                    None => None,
                }
            }
            _ => own,
        }
    }

    fn is_pending(&self, key: &str) -> bool {
        self.expectations
            .get(key)
            .is_some_and(|t| matches!(t.state, DeclState::Pending { .. }))
    }

    /// One capture attempt now; announces and releases held events when it settles.
    fn try_capture(&mut self, key: &str) {
        // Runtime state (the OCI config) may have appeared since the cgroup did.
        if let Some(t) = self.expectations.get(key)
            && t.meta.is_none()
            && t.cgroup_id != 0
        {
            let id = t.cgroup_id;
            self.attribution.invalidate(id);
            let r = self.attribution.resolve(&mut self.cgroups, id);
            if r.meta.is_some() && r.key() == Some(key) {
                self.expectations.track(&r, id);
            }
        }
        let settled = self.expectations.attempt(key, Instant::now());
        if let Some(t) = self.expectations.get(key) {
            log::debug!(
                "container {key}: {} attempt: {:?}",
                if t.meta.is_some() {
                    "config"
                } else {
                    "environ"
                },
                t.state
            );
        }
        if settled {
            self.settled(key);
        }
    }

    fn judge(&self, ev: &mut Event, key: Option<&str>) {
        let resolver: &dyn ModuleResolver = match &self.moddb {
            Some(db) => db.as_ref(),
            None => &NameOnly,
        };
        if key.is_none() && ev.container.is_none() && ev.cgroup_path.is_none() && ev.cgroup_id > 1 {
            // Not in the root cgroup and not found in the tree kmodmon reads: it may be a
            // container kmodmon cannot see, so "host" would be a guess.
            verdict::add_detail(
                ev,
                &format!(
                    "cgroup {} not found under {}: no verdict (host or container unknown)",
                    ev.cgroup_id,
                    self.cgroups
                        .root()
                        .map_or("(no cgroup2 mount)".to_string(), |r| r
                            .display()
                            .to_string())
                ),
            );
            return;
        }
        let state = key.map(|k| self.expectations.get(k).map(|t| &t.state));
        verdict::judge_event(ev, state, resolver);
    }

    /// A container's declaration is known (or could not be read): say what is missing, and
    /// let its held events go.
    fn settled(&mut self, key: &str) {
        let Some(t) = self.expectations.get_mut(key) else {
            return;
        };
        let held = std::mem::take(&mut t.held);
        let announce = !t.announced;
        t.announced = true;
        if announce {
            match &t.state {
                DeclState::Known(d) if d.declared => {
                    let d = d.clone();
                    self.announce(key, &d);
                }
                DeclState::Failed(why) => {
                    log::warn!(
                        "container {key}: cannot read its {}: {why}",
                        expect::ENV_VAR
                    );
                }
                _ => {}
            }
        }
        for mut ev in held {
            self.judge(&mut ev, Some(key));
            self.ready.push(ev);
        }
    }

    fn announce(&mut self, key: &str, d: &expect::Declaration) {
        let live = Live::read(&self.live_root, self.moddb.as_deref());
        let missing = announce::missing(d, &live);
        if self.load_expected && !missing.is_empty() {
            // The loads of kmodmon's own modprobe are joined like an autoload: requested by
            // kmodmon on behalf of this container, judged against its declaration.
            if let Some(t) = self.expectations.get(key) {
                let resolver: &dyn ModuleResolver = match &self.moddb {
                    Some(db) => db.as_ref(),
                    None => &NameOnly,
                };
                let now = crate::event::monotonic_ns();
                for m in &missing {
                    self.autoload.request(
                        Request {
                            ktime_ns: now,
                            requested: m,
                            pid: std::process::id(),
                            comm: "kmodmon",
                            cgroup_id: t.cgroup_id,
                            container: Some(&t.container),
                        },
                        resolver,
                    );
                }
            }
            self.loading.insert(key.to_string());
            announce::spawn_modprobe(key.to_string(), missing, self.loads_tx.clone());
            return;
        }
        self.push_expectation(key, d, &missing);
    }

    fn push_expectation(&mut self, key: &str, d: &expect::Declaration, missing: &[String]) {
        let Some(t) = self.expectations.get(key) else {
            return;
        };
        let s = Subject {
            container: &t.container,
            cgroup_id: t.cgroup_id,
            cgroup_path: t.cgroup_path.as_deref(),
        };
        if let Some(ev) = announce::expectation_event(&s, d, missing, &self.clock) {
            self.ready.push(ev);
        }
    }

    /// Due capture retries, candidate cgroups, finished modprobe runs.
    pub fn poll(&mut self) {
        let now = Instant::now();
        for key in self.expectations.due(now) {
            self.try_capture(&key);
        }
        let due: Vec<usize> = (0..self.candidates.len())
            .filter(|&i| self.candidates[i].next_at <= now)
            .collect();
        for i in due.into_iter().rev() {
            let id = self.candidates[i].id;
            self.attribution.invalidate(id);
            let r = self.attribution.resolve(&mut self.cgroups, id);
            let c = &mut self.candidates[i];
            if let Some(key) = r.key().map(str::to_string) {
                self.candidates.swap_remove(i);
                self.expectations.track(&r, id);
                self.try_capture(&key);
                continue;
            }
            self.attribution.invalidate(id);
            c.tries += 1;
            match CANDIDATE_DELAYS.get(c.tries) {
                Some(d) => c.next_at = now + *d,
                None => {
                    self.candidates.swap_remove(i);
                }
            }
        }
        while let Ok(r) = self.loads_rx.try_recv() {
            self.loaded(r);
        }
    }

    fn loaded(&mut self, r: LoadResult) {
        self.loading.remove(&r.key);
        let Some(t) = self.expectations.get(&r.key) else {
            return;
        };
        let s = Subject {
            container: &t.container,
            cgroup_id: t.cgroup_id,
            cgroup_path: t.cgroup_path.as_deref(),
        };
        self.ready
            .push(announce::self_load_event(&s, &r, &self.clock));
        if let DeclState::Known(d) = &t.state {
            let d = d.clone();
            let live = Live::read(&self.live_root, self.moddb.as_deref());
            let missing = announce::missing(&d, &live);
            self.push_expectation(&r.key, &d, &missing);
        }
    }

    /// When [`Enricher::poll`] has work next (`None`: only when events arrive).
    pub fn next_wakeup(&self) -> Option<Instant> {
        let candidates = self.candidates.iter().map(|c| c.next_at).min();
        let loading =
            (!self.loading.is_empty()).then(|| Instant::now() + Duration::from_millis(50));
        [self.expectations.next_due(), candidates, loading]
            .into_iter()
            .flatten()
            .min()
    }

    /// Events ready to go on, in order.
    pub fn take_ready(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.ready)
    }

    /// Shutdown: judges every held event with what is known and makes it ready.
    pub fn flush(&mut self) {
        for key in self.expectations.give_up_all() {
            self.settled(&key);
        }
    }

    /// Counters for diagnostics: (cache hits, state rescans, capture attempts, pending
    /// autoload requests).
    pub fn stats(&self) -> (u64, u64, u64, usize) {
        (
            self.attribution.hits,
            self.attribution.scans,
            self.expectations.attempts,
            self.autoload.len(),
        )
    }
}

impl Default for Enricher {
    fn default() -> Self {
        Self::new()
    }
}

/// The module database of the running kernel (or `dir`), when there is one.
fn load_moddb(dir: Option<&std::path::Path>) -> Option<ModDb> {
    let result = match dir {
        Some(d) => ModDb::open(d),
        None => {
            let root = RootFs::host();
            let kernel = crate::moddb::running_kernel(&root)?;
            ModDb::for_kernel(&root, &kernel)
        }
    };
    match result {
        Ok(db) => Some(db),
        Err(e) => {
            log::info!("no module database, so no dependency or alias resolution: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests;
