//! Enrichment: each event gets its cgroup path, its container (from the host
//! [`Registry`]: by cgroup2, else by the cgroup v1 hierarchy followed, else — for a host
//! process an OCI runtime started, such as a hook — `on_behalf_of` the container that runtime
//! works on) and a verdict against that container's declared modules, plus the autoload join
//! (`requested_by`) and kmodmon's own `expectation` / `self_load` events.
//!
//! The [`Enricher`] runs on the pipeline's enrich task (never on the ring-buffer reader). Use
//! it as a stream stage: [`Enricher::cgroup_created`] / [`Enricher::cgroup_removed`] for every
//! cgroup record, [`Enricher::handle`] for each decoded event, [`Enricher::poll`] whenever a
//! message arrived or [`Enricher::next_wakeup`] passed, then pass [`Enricher::take_changes`]
//! to whoever follows containers (the enforcer) and send [`Enricher::take_ready`] onwards.
//! Events of a container whose `KERNEL_MODULES` is still being read are held back until it is
//! known (at most about 4 s, see [`crate::host::tracking::RETRY_DELAYS`]); everything else
//! passes straight through, in order.
pub mod announce;
pub mod autoload;
pub mod init_names;
mod verdict;

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use self::announce::{Live, LoadResult, Subject};
use self::autoload::{AutoloadJoin, ModuleResolver, NameOnly, Request};
pub use self::verdict::add_detail;
use crate::event::{CgroupV1, Clock, Event, Kind};
use crate::host::registry::{Change, Registry};
use crate::host::tracking::DeclState;
use crate::host::{declaration, moddb::ModDb};

/// Most events held for one container while its declaration is pending.
pub const MAX_HELD: usize = 1024;

/// What the enricher does beyond the registry. `Default` is right for a real host.
#[derive(Clone, Debug, Default)]
pub struct EnrichOptions {
    /// Run `modprobe` for a new container's declared modules that are missing (and report
    /// it as a `self_load` event).
    pub load_expected: bool,
}

/// Holds what enrichment needs besides the registry; runs on the enrich task.
pub struct Enricher {
    registry: Registry,
    autoload: AutoloadJoin,
    load_expected: bool,
    clock: Clock,
    ready: Vec<Event>,
    /// Events waiting for their container's declaration, by container key.
    held: HashMap<String, Vec<Event>>,
    /// Containers whose appearance was reported (expectation event decided).
    announced: HashSet<String>,
    /// Registry changes not yet taken by [`Enricher::take_changes`].
    changes: Vec<Change>,
    loads_tx: mpsc::Sender<LoadResult>,
    loads_rx: mpsc::Receiver<LoadResult>,
    loading: HashSet<String>,
}

impl Enricher {
    pub fn new(registry: Registry, opts: EnrichOptions) -> Enricher {
        let (loads_tx, loads_rx) = mpsc::channel();
        let mut e = Enricher {
            registry,
            autoload: AutoloadJoin::new(),
            load_expected: opts.load_expected,
            clock: Clock::new(),
            ready: Vec::new(),
            held: HashMap::new(),
            announced: HashSet::new(),
            changes: Vec::new(),
            loads_tx,
            loads_rx,
            loading: HashSet::new(),
        };
        e.follow_registry();
        e
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Replaces the module database (tests, or a reload).
    pub fn set_moddb(&mut self, db: Option<ModDb>) {
        self.registry.set_moddb(db);
    }

    fn resolver(&self) -> &dyn ModuleResolver {
        match self.registry.moddb() {
            Some(db) => db,
            None => &NameOnly,
        }
    }

    /// The kernel created a cgroup.
    pub fn cgroup_created(&mut self, id: u64, path: &str) {
        self.registry.cgroup_created(id, path);
        self.follow_registry();
    }

    /// The kernel removed a cgroup.
    pub fn cgroup_removed(&mut self, id: u64, path: &str) {
        self.registry.cgroup_removed(id, path);
        self.follow_registry();
    }

    /// The kernel created a cgroup in the v1 hierarchy `hierarchy`.
    pub fn cgroup_v1_created(&mut self, hierarchy: u32, id: u64, path: &str) {
        self.registry.cgroup_v1_created(hierarchy, id, path);
        self.follow_registry();
    }

    /// The kernel removed a cgroup in the v1 hierarchy `hierarchy`.
    pub fn cgroup_v1_removed(&mut self, hierarchy: u32, id: u64, path: &str) {
        self.registry.cgroup_v1_removed(hierarchy, id, path);
        self.follow_registry();
    }

    /// Fills cgroup path, container, verdict and `requested_by` at once (no holding back:
    /// a declaration still being read is judged as unknown). [`Enricher::handle`] is the
    /// stream version.
    pub fn enrich(&mut self, ev: &mut Event) {
        let key = self.prepare(ev);
        self.follow_registry();
        self.judge(ev, key.as_deref());
    }

    /// Takes one decoded event; it comes out of [`Enricher::take_ready`] enriched, at once or
    /// (container still starting) a little later.
    pub fn handle(&mut self, mut ev: Event) {
        let key = self.prepare(&mut ev);
        if let Some(k) = &key
            && self.registry.is_pending(k)
        {
            self.registry.capture_if_due(k);
            if self.registry.is_pending(k) {
                let held = self.held.entry(k.clone()).or_default();
                if held.len() < MAX_HELD {
                    held.push(ev);
                    self.follow_registry();
                    return;
                }
            }
        }
        self.follow_registry();
        self.judge(&mut ev, key.as_deref());
        self.ready.push(ev);
    }

    /// Attribution and the autoload join; returns the key of the container whose
    /// declaration judges this event (the requester's, for an autoload).
    fn prepare(&mut self, ev: &mut Event) -> Option<String> {
        if matches!(ev.kind, Kind::Expectation | Kind::SelfLoad) {
            return None;
        }
        let own = if ev.cgroup_id != 0 && ev.cgroup_path.is_none() {
            let a = self.registry.attribute(ev.cgroup_id, ev.pid, ev.ppid);
            ev.cgroup_path = a.cgroup_path;
            ev.container = a.container;
            a.key
        } else {
            ev.container.as_ref().map(|c| c.id.clone())
        };
        let mut own = self.attribute_v1(ev, own);
        if ev.container.is_none()
            && let Some(b) = self.registry.on_behalf_of(&ev.ancestors)
        {
            // A host process a container runtime started for a container (an OCI hook):
            // judged against that container's declaration.
            ev.on_behalf_of = Some(b.on_behalf_of);
            own = Some(b.key);
        }
        match (ev.kind, ev.module.as_deref()) {
            (Kind::Request, Some(name)) => {
                let resolver: &dyn ModuleResolver = match self.registry.moddb() {
                    Some(db) => db,
                    None => &NameOnly,
                };
                let container = ev
                    .container
                    .as_ref()
                    .or(ev.on_behalf_of.as_ref().map(|b| &b.container));
                self.autoload.request(
                    Request {
                        ktime_ns: ev.ktime_ns,
                        requested: name,
                        pid: ev.pid,
                        comm: &ev.comm,
                        cgroup_id: ev.cgroup_id,
                        container,
                    },
                    resolver,
                );
                own
            }
            (Kind::Load | Kind::LoadAttempt, Some(m))
                if ev.container.is_none() && ev.on_behalf_of.is_none() =>
            {
                match self.autoload.on_load(m, ev.kind, ev.ktime_ns) {
                    Some(a) => {
                        if a.requests > 1 {
                            add_detail(ev, &format!("{} identical requests merged", a.requests));
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

    /// The task's cgroup v1 where its cgroup2 names no container: the container it names,
    /// or, where the cgroup2 is the root (a v1-only layout), where the task is. `ev.cgroup_v1`
    /// stays only where it decided attribution.
    fn attribute_v1(&mut self, ev: &mut Event, own: Option<String>) -> Option<String> {
        let Some(h) = self.registry.cgroup_v1().cloned() else {
            ev.cgroup_v1 = None;
            return own;
        };
        let Some(v1) = ev.cgroup_v1.as_mut() else {
            return own;
        };
        if ev.container.is_some() || v1.path.is_some() {
            ev.cgroup_v1 = None;
            return own;
        }
        let a = self.registry.attribute_v1(v1.id, ev.pid, ev.ppid);
        v1.hierarchy = h.hierarchy_id;
        v1.controller = h.controller;
        v1.path = a.cgroup_path;
        if a.container.is_some() {
            ev.container = a.container;
            return a.key;
        }
        let in_cgroup2_root = ev.cgroup_id <= 1 || ev.cgroup_path.as_deref() == Some("/");
        if !in_cgroup2_root {
            // The task's own cgroup2 cgroup decided (the host's).
            ev.cgroup_v1 = None;
        }
        own
    }

    fn judge(&self, ev: &mut Event, key: Option<&str>) {
        if key.is_none()
            && ev.container.is_none()
            && let Some(v1) = ev.cgroup_v1.as_ref().filter(|v| v.path.is_none())
        {
            // Only the v1 cgroup could say where the task is, and it is not in the tree.
            let (id, controller) = (v1.id, v1.controller.clone());
            add_detail(
                ev,
                &format!(
                    "cgroup v1 {id} ({controller}) not found under {}: no verdict (host or \
                     container unknown)",
                    self.registry
                        .cgroup_v1()
                        .map_or("(no v1 mount)".to_string(), |h| h
                            .mount
                            .display()
                            .to_string())
                ),
            );
            return;
        }
        if key.is_none() && ev.container.is_none() && ev.cgroup_path.is_none() && ev.cgroup_id > 1 {
            // Not in the root cgroup and not found in the tree kmodmon reads: it may be a
            // container kmodmon cannot see, so "host" would be a guess.
            add_detail(
                ev,
                &format!(
                    "cgroup {} not found under {}: no verdict (host or container unknown)",
                    ev.cgroup_id,
                    self.registry
                        .cgroup_root()
                        .map_or("(no cgroup2 mount)".to_string(), |r| r
                            .display()
                            .to_string())
                ),
            );
            return;
        }
        let state = key.map(|k| self.registry.declaration_state(k));
        verdict::judge_event(ev, state.as_ref().map(Option::as_ref), self.resolver());
    }

    /// Takes the registry's changes: a settled declaration releases its held events and is
    /// announced; every change is kept for [`Enricher::take_changes`].
    fn follow_registry(&mut self) {
        for change in self.registry.take_changes() {
            match &change {
                Change::Settled { key } => self.settled(key),
                Change::Gone { .. } | Change::Appeared { .. } | Change::Updated { .. } => {}
            }
            self.changes.push(change);
        }
    }

    /// A container's declaration is known (or could not be read): say what is missing, and
    /// let its held events go.
    fn settled(&mut self, key: &str) {
        let held = self.held.remove(key).unwrap_or_default();
        if self.announced.insert(key.to_string()) {
            match self.registry.container(key).map(|t| &t.state) {
                Some(DeclState::Known(d)) if d.declared => {
                    let d = d.clone();
                    for line in d.disagreements() {
                        log::warn!("container {key}: {line}");
                    }
                    self.announce(key, &d);
                }
                Some(DeclState::Failed(why)) => {
                    log::warn!(
                        "container {key}: cannot read its {}: {why}",
                        declaration::ENV_VAR
                    );
                }
                _ => {}
            }
        }
        for mut ev in held {
            // What the registry learnt about the container while its events waited (its
            // name, from runtime state written meanwhile).
            if let (Some(c), Some(t)) = (ev.container.as_mut(), self.registry.container(key))
                && c.id == t.container.id
            {
                *c = t.container.clone();
            }
            self.judge(&mut ev, Some(key));
            self.ready.push(ev);
        }
    }

    fn announce(&mut self, key: &str, d: &declaration::Declaration) {
        let live = Live::read(self.registry.live_root(), self.registry.moddb());
        let missing = announce::missing(d, &live);
        if self.load_expected && !missing.is_empty() {
            // The loads of kmodmon's own modprobe are joined like an autoload: requested by
            // kmodmon on behalf of this container, judged against its declaration.
            if let Some(t) = self.registry.container(key) {
                let resolver: &dyn ModuleResolver = match self.registry.moddb() {
                    Some(db) => db,
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
            announce::spawn_modprobe(key.to_string(), missing, d.what(), self.loads_tx.clone());
            return;
        }
        self.push_expectation(key, d, &missing);
    }

    fn push_expectation(&mut self, key: &str, d: &declaration::Declaration, missing: &[String]) {
        let Some(t) = self.registry.container(key) else {
            return;
        };
        let s = Subject {
            container: &t.container,
            cgroup_id: t.cgroup_id,
            cgroup_path: t.cgroup_path.as_deref(),
        };
        if let Some(mut ev) = announce::expectation_event(&s, d, missing, &self.clock) {
            ev.cgroup_v1 = self.v1_only_cgroup(t);
            self.ready.push(ev);
        }
    }

    /// The v1 cgroup of a container that has no cgroup2 cgroup of its own (for kmodmon's own
    /// events about it).
    fn v1_only_cgroup(&self, t: &crate::host::tracking::Tracked) -> Option<CgroupV1> {
        let h = self.registry.cgroup_v1()?;
        (t.cgroup_id == 0 && t.cgroup_v1_id != 0).then(|| CgroupV1 {
            hierarchy: h.hierarchy_id,
            controller: h.controller.clone(),
            id: t.cgroup_v1_id,
            path: t.cgroup_v1_path.clone(),
        })
    }

    /// Due capture retries, candidate cgroups, finished modprobe runs.
    pub fn poll(&mut self) {
        self.registry.poll();
        self.follow_registry();
        while let Ok(r) = self.loads_rx.try_recv() {
            self.loaded(r);
        }
    }

    fn loaded(&mut self, r: LoadResult) {
        self.loading.remove(&r.key);
        let Some(t) = self.registry.container(&r.key) else {
            return;
        };
        let s = Subject {
            container: &t.container,
            cgroup_id: t.cgroup_id,
            cgroup_path: t.cgroup_path.as_deref(),
        };
        let mut ev = announce::self_load_event(&s, &r, &self.clock);
        ev.cgroup_v1 = self.v1_only_cgroup(t);
        self.ready.push(ev);
        if let DeclState::Known(d) = &t.state {
            let d = d.clone();
            let live = Live::read(self.registry.live_root(), self.registry.moddb());
            let missing = announce::missing(&d, &live);
            self.push_expectation(&r.key, &d, &missing);
        }
    }

    /// When [`Enricher::poll`] has work next (`None`: only when events arrive).
    pub fn next_wakeup(&self) -> Option<Instant> {
        let loading =
            (!self.loading.is_empty()).then(|| Instant::now() + Duration::from_millis(50));
        [self.registry.next_wakeup(), loading]
            .into_iter()
            .flatten()
            .min()
    }

    /// An event of kmodmon's own making that needs no enrichment (enforcement's `tamper` and
    /// `lost`): it goes on as it is, in order with the rest.
    pub fn inject(&mut self, ev: Event) {
        self.ready.push(ev);
    }

    /// Events ready to go on, in order.
    pub fn take_ready(&mut self) -> Vec<Event> {
        // Room for a batch kept, so a storm does not grow a new Vec from nothing each time.
        let room = self.ready.len().clamp(16, 256);
        std::mem::replace(&mut self.ready, Vec::with_capacity(room))
    }

    /// Registry changes since the last call, in order (for the enforcer).
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Shutdown: judges every held event with what is known and makes it ready.
    pub fn flush(&mut self) {
        self.registry.give_up_all();
        self.follow_registry();
        // Held events of containers the registry no longer knows as pending (evicted).
        let rest: Vec<String> = self.held.keys().cloned().collect();
        for key in rest {
            self.settled(&key);
        }
    }

    /// How many events are held back now.
    pub fn held(&self) -> usize {
        self.held.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod observe_tests;
#[cfg(test)]
mod tests;
