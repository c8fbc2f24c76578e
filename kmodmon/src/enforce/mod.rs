//! Policy enforcement in the kernel: BPF LSM programs (kmodmon-ebpf `lsm/`) deciding every
//! module load and autoload request from maps keyed by cgroup id, which this module keeps
//! equal to the [`Policy`] as containers come and go.
//!
//! Programs, links and maps are pinned under /sys/fs/bpf/kmodmon (see [`pins`]), so a dead
//! daemon leaves enforcement in force; a restarted one adopts the pins. Only
//! [`Enforcer::shutdown`] with `remove = true` (`kmodmon enforce off`) takes them away.
//!
//! What the kernel decides for a task (kmodmon_common::policy): the entry of its cgroup or of
//! the nearest ancestor with one; below a container parent (`/docker`, ...) or under a
//! container's name (`docker-<id>.scope`, ...) with no entry, `[unselected]`; else the host.
//! So a container is restricted from the moment its cgroup exists, and the enforcer only
//! refines that when the registry knows it: it follows the host [`Registry`]'s changes
//! ([`Enforcer::follow`]), no polling. A container's entry never allows more than the entry
//! of a container enclosing it (docker-in-docker).
//!
//! The calls: [`Enforcer::start`] once, with the registry; [`Enforcer::follow`] for every
//! registry [`Change`]; [`Enforcer::tick`] every second (the self-check and lost records);
//! [`Enforcer::take_reports`] for the `tamper` / `lost` events that made;
//! [`Enforcer::reload`] on SIGHUP; [`Enforcer::take_events`] for the ring buffer carrying
//! `denied` / `would_deny` records; [`Enforcer::describe`] to explain them.
pub mod bpf;
pub mod cgroups;
pub mod cli;
pub mod host;
pub mod pins;
pub mod selfcheck;
pub mod state;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
};

use aya::maps::{MapData, RingBuf};
use kmodmon_common::{
    Counter, DecidedBy, NamedBy,
    policy::{ACK_LOST, HOST_KEY, UNSELECTED_KEY},
};
use thiserror::Error;

pub use self::pins::{Installed, PinDir};
use self::{
    cgroups::CgroupView,
    pins::{PolicyMaps, Prepared},
    selfcheck::{Finding, Guard},
    state::{KernelState, StoreError},
};
use crate::{
    event::{Clock, Container, Event, Kind, RequestedBy},
    host::{
        Change, Registry,
        moddb::{ModDb, RootFs, live::module_support, running_kernel},
        tracking::Tracked,
    },
    policy::{Effective, LoadError, Mode, Policy, Subject},
};

#[derive(Debug, Error)]
pub enum EnforceError {
    #[error("enforcement needs root (CAP_SYS_ADMIN and CAP_BPF); try `sudo kmodmon ...`")]
    NotRoot,
    #[error(
        "the BPF LSM is not active (active LSMs: {active}), so kmodmon cannot enforce or audit \
         module loads. Add `{}` to the kernel command line (e.g. GRUB_CMDLINE_LINUX in \
         /etc/default/grub, then update-grub and reboot); the kernel must also be built with \
         CONFIG_BPF_LSM=y",
        host::suggested_lsm_param(active)
    )]
    BpfLsmInactive { active: String },
    #[error(
        "{}; nothing was installed (--force installs the programs anyway, e.g. to test pinning)",
        host::NO_MODULES_EXPLANATION
    )]
    NoModuleSupport,
    #[error("{0}")]
    Host(String),
    #[error("policy: {0}")]
    Policy(#[from] LoadError),
    #[error("policy {path}: {why}; nothing was installed")]
    DoesNotFit { path: String, why: String },
    #[error("loading the LSM programs: {0}")]
    Load(String),
    #[error("bpffs pins: {0}")]
    Pin(String),
    #[error("policy maps: {0}")]
    Map(String),
    #[error(
        "enforcement is not installed (no pins under {0}); run `kmodmon enforce on` or `kmodmon run` with a policy"
    )]
    NotInstalled(String),
    #[error(
        "{0}. kmodmon's LSM programs decide by a task's cgroup2 cgroup and do not yet decide \
         on cgroup v1, so every such container would be decided as the host: nothing was \
         installed. Boot with the unified hierarchy (systemd.unified_cgroup_hierarchy=1 on \
         the kernel command line), or have the runtime place containers in cgroup2 as well \
         (hybrid hosts); monitoring (`kmodmon tail`, `kmodmon run` without a policy) \
         attributes cgroup v1 containers"
    )]
    CgroupV1(String),
}

/// Why enforcement cannot tell containers apart on this host, if it cannot: a v1-only
/// layout (every task is in the cgroup2 root), or running containers that are in cgroup v1
/// only (hybrid hosts whose runtime uses only the v1 controllers).
pub fn cgroup_v1_refusal(registry: &Registry) -> Option<String> {
    if registry.cgroup_layout() == crate::host::cgroup_v1::CgroupLayout::Legacy {
        return Some(
            "this host has only cgroup v1 hierarchies (no cgroup2 is mounted): every task, \
             containers included, is in the cgroup2 root"
                .to_string(),
        );
    }
    let v1_only: Vec<String> = registry
        .running()
        .into_iter()
        .filter(|t| t.cgroup_id == 0 && t.cgroup_v1_id != 0)
        .map(|t| {
            format!(
                "{} ({})",
                t.container.id,
                t.cgroup_v1_path.as_deref().unwrap_or("?")
            )
        })
        .collect();
    (!v1_only.is_empty()).then(|| {
        format!(
            "containers in cgroup v1 only (their cgroup2 is their parent's): {}",
            v1_only.join(", ")
        )
    })
}

/// How to start.
#[derive(Clone, Debug)]
pub struct StartOptions {
    pub policy_path: PathBuf,
    /// Overrides the policy's `mode`.
    pub mode: Option<Mode>,
    /// Install even on a kernel without module support (the hooks then never fire).
    pub force: bool,
    /// Replace pinned programs with this binary's (upgrade) instead of adopting them.
    pub replace: bool,
    pub pins: PinDir,
}

impl StartOptions {
    pub fn new(policy_path: impl Into<PathBuf>) -> StartOptions {
        StartOptions {
            policy_path: policy_path.into(),
            mode: None,
            force: false,
            replace: false,
            pins: PinDir::default(),
        }
    }
}

/// What the policy needs to know about one container.
#[derive(Clone, Debug, Default)]
pub struct ContainerInfo {
    pub container: Container,
    pub labels: BTreeMap<String, String>,
    /// Valid names it declared (annotation or KERNEL_MODULES, see host::declaration).
    pub declared: Vec<String>,
    /// Its cgroup2 path (to find the containers it encloses).
    pub cgroup_path: Option<String>,
}

impl ContainerInfo {
    /// What the registry knows about a container.
    pub fn of(t: &Tracked) -> ContainerInfo {
        ContainerInfo {
            container: t.container.clone(),
            labels: t.labels(),
            declared: t.declared_modules().to_vec(),
            cgroup_path: t.cgroup_path.clone(),
        }
    }
}

/// The registry's running containers that have a cgroup of their own (a container in the
/// root cgroup cannot be told apart from the host).
pub fn containers_of(registry: &Registry) -> Vec<(u64, ContainerInfo)> {
    let mut out = Vec::new();
    for t in registry.running() {
        let Some(key) = CgroupView::key_of(t) else {
            log::warn!(
                "container {} has no cgroup kmodmon can find: the policy cannot be applied to it",
                t.container.id
            );
            continue;
        };
        out.push((key, ContainerInfo::of(t)));
    }
    out
}

/// Counts the enforcer keeps for metrics and `describe`.
#[derive(Clone, Debug, Default)]
pub struct EnforceStats {
    /// `tamper` findings, by object kind (`link`, `program`, `map`, `map contents`, ...).
    pub tamper: BTreeMap<String, u64>,
    /// Records the kernel counted as lost and kmodmon reported.
    pub lost: u64,
    /// Containers that fell back to less than their full decision because a map was full.
    pub fallbacks: u64,
}

/// Enforcement, installed or adopted, with the policy in force.
pub struct Enforcer {
    policy: Policy,
    opts: StartOptions,
    kernel: KernelState<PolicyMaps>,
    /// Mapped containers, by cgroup id.
    subjects: HashMap<u64, ContainerInfo>,
    /// Containers that did not get their full decision (cgroup id → why).
    fallbacks: HashMap<u64, String>,
    /// The running kernel's modules.dep: allowing a module allows what it depends on.
    moddb: Option<ModDb>,
    view: CgroupView,
    guard: Option<Guard>,
    /// `container_parents` whose parent cgroup does not exist yet (retried every tick).
    unresolved: Vec<String>,
    reports: Vec<Event>,
    clock: Clock,
    events: Option<RingBuf<MapData>>,
    pub stats: EnforceStats,
    /// What `start` did with the pins.
    pub installed: Installed,
}

/// Fails unless we are root, the BPF LSM is active and (unless forced) modules exist.
pub fn preflight(force: bool) -> Result<Vec<String>, EnforceError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(EnforceError::NotRoot);
    }
    let lsms = host::require_bpf_lsm()?;
    if !module_support() && !force {
        return Err(EnforceError::NoModuleSupport);
    }
    host::ensure_bpffs()?;
    Ok(lsms)
}

impl Enforcer {
    /// Validates the policy, checks the kernel, installs (or adopts) the pinned programs and
    /// maps, and applies the policy to the host and every running container the registry
    /// knows. New programs are attached only after their maps hold the policy. An invalid
    /// policy, one that does not fit the kernel's maps, or an inactive BPF LSM installs
    /// nothing.
    pub fn start(opts: StartOptions, registry: &Registry) -> Result<Enforcer, EnforceError> {
        let policy = Policy::load(&opts.policy_path)?;
        if let Some(why) = cgroup_v1_refusal(registry) {
            return Err(EnforceError::CgroupV1(why));
        }
        preflight(opts.force)?;
        if !module_support() {
            log::warn!("{}", host::NO_MODULES_EXPLANATION);
        }
        let clock = Clock::new();
        let mut reports = Vec::new();
        let mut replace = opts.replace;
        // What changed while no kmodmon watched: pins gone, or naming other maps.
        let expected = crate::sensor::lsm::expected_programs();
        if pins::pinned_contract(&opts.pins) == Some(kmodmon_common::CONTRACT_VERSION) {
            let missing: Vec<&str> = expected
                .iter()
                .filter(|(p, _)| !opts.pins.link(p).exists())
                .map(|(p, _)| *p)
                .collect();
            if !missing.is_empty() && missing.len() < expected.len() {
                reports.push(tamper_event(
                    &clock,
                    &Finding {
                        object: format!("links {}", missing.join(", ")),
                        detail: "the link pins were removed while no kmodmon ran: those hooks \
                                 were not enforced until now"
                            .to_string(),
                        repair: Some(Ok("attached kmodmon's programs again".into())),
                    },
                ));
            }
            let foreign = Guard::foreign_map_pins(&opts.pins, &expected);
            if !foreign.is_empty() {
                for pin in &foreign {
                    let _ = pins::remove_if_present(&opts.pins.map(pin));
                }
                replace = true;
                reports.push(tamper_event(
                    &clock,
                    &Finding {
                        object: format!("maps {}", foreign.join(", ")),
                        detail: "the map pins name maps kmodmon's programs do not use (replaced \
                                 while no kmodmon ran)"
                            .to_string(),
                        repair: Some(Ok(
                            "loaded and attached kmodmon's programs with new maps".into()
                        )),
                    },
                ));
            }
        }
        let prepared = pins::prepare(&opts.pins, replace)?;
        let mut maps = PolicyMaps::open(&opts.pins)?;
        let events = maps.events.take();
        let kernel = KernelState::adopt(maps)?;
        let lists: Vec<BTreeSet<String>> = policy
            .own_lists()
            .into_iter()
            .map(|e| with_deps(open_moddb().as_ref(), e))
            .filter(|e| e.restrict)
            .map(|e| e.allowed)
            .collect();
        if let Err(why) = kernel.fits(&lists) {
            return Err(EnforceError::DoesNotFit {
                path: opts.policy_path.display().to_string(),
                why,
            });
        }
        let mut e = Enforcer {
            policy,
            opts,
            kernel,
            subjects: HashMap::new(),
            fallbacks: HashMap::new(),
            moddb: open_moddb(),
            view: CgroupView::of(registry),
            guard: None,
            unresolved: Vec::new(),
            reports,
            clock,
            events,
            stats: EnforceStats::default(),
            installed: Installed::Adopted,
        };
        e.sync_inner(containers_of(registry), true)?;
        e.installed = match prepared {
            Prepared::Adopt => Installed::Adopted,
            Prepared::Load {
                loaded,
                stale,
                pinned_before,
            } => pins::commit(&e.opts.pins, loaded, stale, pinned_before)?,
        };
        e.guard = Some(Guard::open(&e.opts.pins, &expected)?);
        e.report_lost();
        Ok(e)
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn mode(&self) -> Mode {
        self.opts.mode.unwrap_or(self.policy.mode)
    }

    /// How many container cgroups have an entry.
    pub fn container_count(&self) -> usize {
        self.subjects.len()
    }

    /// Containers that did not get their full decision, and why.
    pub fn fallbacks(&self) -> impl Iterator<Item = (&u64, &String)> {
        self.fallbacks.iter()
    }

    /// What applies to a container: its rule (with dependencies), capped by the container
    /// enclosing it, if any. `with_declaration`: include its own KERNEL_MODULES (if trusted).
    fn decide_for(&self, info: &ContainerInfo, with_declaration: bool) -> Effective {
        let s = subject(info);
        let own = if with_declaration {
            self.policy.decide(&s)
        } else {
            self.policy.decide_without_declaration(&s)
        };
        let own = self.with_deps(own);
        match self.enclosing(info) {
            Some(outer) => own.capped_by(&self.decide_for(outer, with_declaration)),
            None => own,
        }
    }

    /// The mapped container whose cgroup most closely encloses `info`'s.
    fn enclosing(&self, info: &ContainerInfo) -> Option<&ContainerInfo> {
        self.subjects
            .values()
            .filter(|o| cgroups::is_below(info, o))
            .max_by_key(|o| o.cgroup_path.as_ref().map_or(0, String::len))
    }

    /// A container's cgroup appeared, or kmodmon learnt more about it: (re)decide it, then the
    /// containers it encloses. A map that is full makes this container (only) fall back: to
    /// its rule's own list when its declaration does not fit, else to no entry of its own
    /// (what its parent, its name or the host decide).
    pub fn container_appeared(
        &mut self,
        cgroup_id: u64,
        info: ContainerInfo,
    ) -> Result<(), EnforceError> {
        if cgroup_id == HOST_KEY || cgroup_id == UNSELECTED_KEY {
            return Ok(());
        }
        let path = info.cgroup_path.clone();
        self.subjects.insert(cgroup_id, info);
        self.map_one(cgroup_id)?;
        // The containers it encloses are capped by its decision.
        let inner: Vec<u64> = match &path {
            Some(_) => {
                let me = &self.subjects[&cgroup_id];
                self.subjects
                    .iter()
                    .filter(|(_, o)| cgroups::is_below(o, me))
                    .map(|(id, _)| *id)
                    .collect()
            }
            None => Vec::new(),
        };
        for id in inner {
            self.map_one(id)?;
        }
        Ok(())
    }

    fn map_one(&mut self, cgroup_id: u64) -> Result<(), EnforceError> {
        let Some(info) = self.subjects.get(&cgroup_id).cloned() else {
            return Ok(());
        };
        let eff = self.decide_for(&info, true);
        let first = match self.kernel.apply(cgroup_id, &eff, true) {
            Ok(()) => {
                self.fallbacks.remove(&cgroup_id);
                return Ok(());
            }
            Err(StoreError::Other(e)) => return Err(EnforceError::Map(e)),
            Err(StoreError::Full(map)) => map,
        };
        let name = describe_container(&info.container);
        let why = if first == "policy_allow" {
            // Its own list always fits (the policy was checked); its declaration does not.
            let fallback = self.decide_for(&info, false);
            match self.kernel.apply(cgroup_id, &fallback, true) {
                Ok(()) => format!(
                    "its KERNEL_MODULES ({} names with dependencies) do not fit in the kernel's \
                     allow map: only its rule's own list applies",
                    eff.allowed.len()
                ),
                Err(StoreError::Other(e)) => return Err(EnforceError::Map(e)),
                Err(StoreError::Full(_)) => self.unmap_fallback(cgroup_id, &info)?,
            }
        } else {
            self.unmap_fallback(cgroup_id, &info)?
        };
        log::error!("container {name}: {why}");
        if self.fallbacks.insert(cgroup_id, why).is_none() {
            self.stats.fallbacks += 1;
        }
        Ok(())
    }

    /// No room for an entry: the container keeps none, and the kernel decides for it by its
    /// parent or name (`[unselected]`), else as the host. Says which.
    fn unmap_fallback(
        &mut self,
        cgroup_id: u64,
        info: &ContainerInfo,
    ) -> Result<String, EnforceError> {
        self.kernel.remove(cgroup_id)?;
        let named = info
            .cgroup_path
            .as_deref()
            .is_some_and(|p| cgroups::named_container(p, &self.policy.container_parents));
        Ok(if named {
            "no room in the kernel's cgroup map: it keeps the [unselected] decision its \
             parent or name gives it"
                .to_string()
        } else {
            "no room in the kernel's cgroup map, and neither its parent nor its name marks it \
             as a container: the host's decision applies to it"
                .to_string()
        })
    }

    /// A container's cgroup was removed.
    pub fn container_gone(&mut self, cgroup_id: u64) -> Result<(), EnforceError> {
        self.subjects.remove(&cgroup_id);
        self.fallbacks.remove(&cgroup_id);
        if cgroup_id == HOST_KEY || cgroup_id == UNSELECTED_KEY {
            return Ok(());
        }
        Ok(self.kernel.remove(cgroup_id)?)
    }

    /// Makes the maps hold exactly the host entry, `[unselected]`, the name rules and
    /// `containers` (entries of cgroups not listed are removed), and the mode the policy's.
    pub fn sync(
        &mut self,
        containers: impl IntoIterator<Item = (u64, ContainerInfo)>,
    ) -> Result<(), EnforceError> {
        self.sync_inner(containers, false)
    }

    /// As [`Self::sync`]; `new_policy` bumps the generation even when the mode is unchanged.
    fn sync_inner(
        &mut self,
        containers: impl IntoIterator<Item = (u64, ContainerInfo)>,
        new_policy: bool,
    ) -> Result<(), EnforceError> {
        let host = self.with_deps(self.policy.host_decision());
        self.kernel.apply(HOST_KEY, &host, false)?;
        let unselected = self.with_deps(self.policy.unselected_decision());
        self.kernel.apply(UNSELECTED_KEY, &unselected, false)?;
        self.kernel.set_prefixes(&cgroups::PREFIX_RULES)?;
        self.resolve_parents()?;
        let list: Vec<(u64, ContainerInfo)> = containers.into_iter().collect();
        let keep: HashSet<u64> = list.iter().map(|(cg, _)| *cg).collect();
        self.subjects.retain(|cg, _| keep.contains(cg));
        for (cg, info) in &list {
            self.subjects.insert(*cg, info.clone());
        }
        for (cg, _) in &list {
            self.map_one(*cg)?;
        }
        self.fallbacks.retain(|cg, _| keep.contains(cg));
        let dropped = self.kernel.retain(&keep)?;
        if dropped > 0 {
            log::info!("dropped {dropped} policy entries of cgroups that are gone");
        }
        let want = Some(self.mode());
        if new_policy || self.kernel.mode() != want {
            self.kernel.set_mode(want)?;
        }
        Ok(())
    }

    /// Writes the container-parent keys that can be resolved now.
    fn resolve_parents(&mut self) -> Result<(), EnforceError> {
        let (keys, unresolved) = self.view.parent_keys(&self.policy.container_parents);
        if unresolved != self.unresolved && !unresolved.is_empty() {
            log::warn!(
                "container_parents {} do not exist yet: kmodmon adds them within a second of \
                 their parent cgroup appearing",
                unresolved.join(", ")
            );
        }
        self.unresolved = unresolved;
        Ok(self.kernel.set_parents(&keys)?)
    }

    /// Follows a change the registry made: maps a container's cgroup as soon as it appears,
    /// re-decides it when its name, labels or declaration become known, unmaps it when it
    /// goes. A failure is logged; the maps keep what they had (and the kernel's name rules
    /// keep an unmapped container restricted).
    pub fn follow(&mut self, change: &Change, registry: &Registry) {
        let result = match change {
            Change::Appeared { key, .. } | Change::Updated { key } | Change::Settled { key } => {
                if let Change::Appeared { .. } = change
                    && let Some(t) = registry.container(key)
                    && t.cgroup_id == 0
                    && t.cgroup_v1_id != 0
                {
                    log::error!(
                        "container {key} is in cgroup v1 only ({}): the policy cannot be \
                         applied to it, it is decided as its cgroup2 parent (the host)",
                        t.cgroup_v1_path.as_deref().unwrap_or("?")
                    );
                }
                match registry.container(key) {
                    Some(t) if t.gone_at.is_none() => match CgroupView::key_of(t) {
                        Some(cg) => self.container_appeared(cg, ContainerInfo::of(t)),
                        None => Ok(()),
                    },
                    _ => Ok(()),
                }
            }
            Change::Gone { cgroup_id, .. } => self.container_gone(*cgroup_id),
        };
        if let Err(e) = result {
            log::error!("updating the policy maps for {change:?} failed: {e}");
        }
    }

    /// Re-reads the policy (from `path`, else the current file) and says what happened, truly:
    /// `Err` when nothing changed (invalid, or does not fit: the previous policy stays in
    /// force), `Ok` when the new one is in force, naming containers that fell back and any
    /// write that failed (the self-check then repairs it within a second).
    pub fn reload(&mut self, path: Option<&Path>, registry: &Registry) -> Result<String, String> {
        let path = path.map_or_else(|| self.opts.policy_path.clone(), Path::to_path_buf);
        let rejected =
            |e: String| format!("new policy rejected, the previous one stays in force: {e}");
        let policy = Policy::load(&path).map_err(|e| rejected(e.to_string()))?;
        let moddb = open_moddb();
        let lists: Vec<BTreeSet<String>> = policy
            .own_lists()
            .into_iter()
            .map(|e| with_deps(moddb.as_ref(), e))
            .filter(|e| e.restrict)
            .map(|e| e.allowed)
            .collect();
        self.kernel
            .fits(&lists)
            .map_err(|why| rejected(format!("{}: {why}", path.display())))?;
        self.policy = policy;
        self.opts.policy_path = path;
        self.moddb = moddb;
        let before = self.stats.fallbacks;
        let result = self.sync_inner(containers_of(registry), true);
        let mut msg = format!(
            "policy reloaded (mode {}, generation {}): {} container cgroup(s) mapped",
            self.mode(),
            self.kernel.generation(),
            self.subjects.len()
        );
        if self.stats.fallbacks > before || !self.fallbacks.is_empty() {
            msg.push_str(&format!(
                "; {} container(s) got less than their rule because a kernel map is full (see \
                 the log)",
                self.fallbacks.len()
            ));
        }
        if let Err(e) = result {
            msg.push_str(&format!(
                "; but writing it failed part-way ({e}): the self-check retries within a second"
            ));
            log::error!("{msg}");
        }
        Ok(msg)
    }

    /// The ring buffer of denied / would_deny records (once; RawEvent layout).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The `tamper` and `lost` events made since the last call.
    pub fn take_reports(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.reports)
    }

    /// Every second: the self-check (pins, links, map contents; each difference reported and
    /// repaired), container parents that appeared, and records the kernel counted as lost.
    pub fn tick(&mut self) {
        if let Some(g) = self.guard.as_mut() {
            for f in g.check() {
                self.tampered(f);
            }
        }
        match self.kernel.verify(true) {
            Ok(drift) => {
                for d in drift {
                    self.tampered(Finding {
                        object: format!("map {}", d.map),
                        detail: format!(
                            "its contents are not what kmodmon wrote ({})",
                            d.describe()
                        ),
                        repair: Some(Ok("wrote kmodmon's entries back".into())),
                    });
                }
            }
            Err(e) => log::error!("the self-check could not read the policy maps: {e:?}"),
        }
        if !self.unresolved.is_empty()
            && let Err(e) = self.resolve_parents()
        {
            log::error!("writing container parents: {e}");
        }
        self.report_lost();
    }

    fn tampered(&mut self, f: Finding) {
        let what = f.object.split(' ').next().unwrap_or("?").to_string();
        *self.stats.tamper.entry(what).or_default() += 1;
        log::error!(
            "tamper: {}: {}{}",
            f.object,
            f.detail,
            match &f.repair {
                Some(Ok(r)) => format!("; {r}"),
                Some(Err(e)) => format!("; REPAIR FAILED: {e}"),
                None => String::new(),
            }
        );
        self.reports.push(tamper_event(&self.clock, &f));
    }

    /// Compares the kernel's count of records it could not record with what was reported
    /// (stored beside the pins, so a restarted kmodmon reports only what is new), and makes a
    /// `lost` event for the difference.
    fn report_lost(&mut self) {
        let store = self.kernel.store_mut();
        let total: u64 = Counter::ALL
            .iter()
            .filter(|c| c.is_event_drop())
            .filter_map(|c| store.counters.get(&(*c as u32), 0).ok())
            .map(|per_cpu| per_cpu.iter().sum::<u64>())
            .sum();
        let acked = store.ack.get(&ACK_LOST, 0).unwrap_or(0);
        if total == acked {
            return;
        }
        if total > acked {
            let n = total - acked;
            let mut ev = Event::synthetic(Kind::Lost, &self.clock);
            ev.source = crate::event::SourceName::Lsm;
            ev.count = Some(n);
            ev.detail = Some(format!(
                "the LSM programs counted {n} denied/would_deny record(s) they could not \
                 record: the pinned ring was full (kmodmon down or not reading)"
            ));
            log::error!("{}", ev.detail.as_deref().unwrap_or_default());
            self.stats.lost += n;
            self.reports.push(ev);
        }
        // Counters of new maps start at zero: follow them either way.
        if let Err(e) = store.ack.set(ACK_LOST, total, 0) {
            log::error!("recording the reported loss count: {e}");
        }
    }

    /// Explains a denied / would_deny event: the rule by name, the container, how the name was
    /// read, and for the crypto manager the container that asked.
    pub fn describe(&self, ev: &mut Event) {
        if !matches!(ev.kind, Kind::Denied | Kind::WouldDeny) {
            return;
        }
        let mut parts = Vec::new();
        if let Some(id) = ev.rule_id {
            parts.push(format!("policy: {}", self.policy.describe_rule(id)));
        }
        match ev.decided_by.as_deref().and_then(DecidedBy::from_name) {
            Some(DecidedBy::ContainerParent) => parts.push(
                "a container cgroup kmodmon had not mapped yet, below a container parent: \
                 [unselected] applies"
                    .to_string(),
            ),
            Some(DecidedBy::ContainerName) => parts.push(
                "a cgroup named like a container that kmodmon had not mapped yet: [unselected] \
                 applies"
                    .to_string(),
            ),
            Some(DecidedBy::CryptoRequester) => {
                parts.push(
                    "the kernel's crypto manager instantiating an algorithm for the cgroup that \
                     asked for it: that cgroup's decision applies"
                        .to_string(),
                );
                if let Some(cg) = ev.deciding_cgroup_id {
                    ev.requested_by = Some(RequestedBy {
                        requested: ev.module.clone().unwrap_or_default(),
                        pid: 0,
                        comm: String::new(),
                        cgroup_id: cg,
                        container: self.subjects.get(&cg).map(|i| i.container.clone()),
                    });
                }
            }
            _ => {}
        }
        if ev.file_module.is_some() {
            parts.push(format!(
                "the file is named {} but holds module {}: a restricted cgroup may not load a \
                 renamed module",
                ev.file_module.as_deref().unwrap_or("?"),
                ev.module.as_deref().unwrap_or("?")
            ));
        }
        if let Some(other) = &ev.modinfo_name {
            parts.push(format!(
                "the image's .modinfo says name={other}: an image that names itself twice is \
                 refused"
            ));
        }
        match ev.named_by.as_deref().and_then(NamedBy::from_name) {
            Some(NamedBy::Kernel) => parts.push(
                "decided by the kernel's own name of the module as it made /sys/module/<name> \
                 (after decompressing it); the loader sees ENOMEM, which is this denial"
                    .to_string(),
            ),
            Some(NamedBy::Unnamed) => parts.push(
                "the module could not be named before the kernel would run its code (an image \
                 that does not parse, or a compressed file with parameters, whose handlers run \
                 before the kernel names it)"
                    .to_string(),
            ),
            Some(NamedBy::File) => parts.push(
                "judged by the file's name: this kernel offers no hook on the module's own name"
                    .to_string(),
            ),
            _ => {}
        }
        ev.detail = Some(parts.join("; "));
        if ev.container.is_none()
            && let Some(info) = self.subjects.get(&ev.cgroup_id)
        {
            ev.container = Some(info.container.clone());
        }
    }

    /// Stops managing the maps. With `remove`, turns enforcement off and removes every pin
    /// (`kmodmon enforce off`); without, the pins keep enforcing the last policy.
    pub fn shutdown(mut self, remove: bool) -> Result<(), EnforceError> {
        if remove {
            self.guard = None;
            self.kernel.set_mode(None)?;
            pins::remove(&self.opts.pins)?;
        }
        Ok(())
    }

    /// Adds the dependencies (modules.dep) of every allowed module: modprobe loads them first,
    /// from the same cgroup.
    fn with_deps(&self, eff: Effective) -> Effective {
        with_deps(self.moddb.as_ref(), eff)
    }
}

impl Enforcer {
    /// The policy's identity requirements (`sha256:` pins, `signed = true`) for a successful
    /// load: the kernel decided by name; this checks the identity of what it loaded and returns
    /// an `identity_mismatch` event when the policy does not allow that image.
    pub fn verify_identity(&self, ev: &Event) -> Option<Event> {
        let eff = match ev.container.as_ref().and_then(|c| {
            self.subjects
                .values()
                .find(|i| i.container.id == c.id)
                .map(|i| self.decide_for(i, true))
        }) {
            Some(e) => e,
            None => self.policy.host_decision(),
        };
        identity_mismatch(&self.policy, &eff, ev)
    }
}

/// The `identity_mismatch` event for a successful load whose identity `eff` does not allow.
pub fn identity_mismatch(policy: &Policy, eff: &Effective, ev: &Event) -> Option<Event> {
    let loaded = match ev.kind {
        Kind::LoadAttempt => {
            ev.result == Some(0)
                && matches!(
                    ev.syscall,
                    Some(crate::event::Syscall::InitModule | crate::event::Syscall::FinitModule)
                )
        }
        _ => false,
    };
    if !loaded || (eff.pins.is_empty() && !eff.signed) {
        return None;
    }
    let id = ev.identity.as_deref();
    let mut why = Vec::new();
    if !eff.pins.is_empty() {
        match id.and_then(|i| i.sha256.as_deref()) {
            Some(h) if eff.pins.contains(h) => {}
            Some(h) => why.push(format!("sha256 {h} is not pinned")),
            None => why.push("its image could not be hashed, so no pin can match".to_string()),
        }
    }
    if eff.signed {
        match id.and_then(|i| i.sig_ok) {
            Some(true) => {}
            Some(false) => why.push("the kernel did not verify a signature (sig_ok false)".into()),
            None => why.push("the kernel's signature verdict is unknown".into()),
        }
    }
    if why.is_empty() {
        return None;
    }
    let mut m = ev.clone();
    m.kind = Kind::IdentityMismatch;
    m.source = crate::event::SourceName::Kmodmon;
    m.severity = Some("high".to_string());
    m.loaded_at = Some(ev.time.clone());
    m.rule_id = Some(Policy::rule_id(eff.rule));
    m.detail = Some(format!(
        "loaded (allowed in the kernel by name), but {}: {}; kmodmon verifies identity after the \
         load, it did not stop it",
        policy.describe_rule(Policy::rule_id(eff.rule)),
        why.join("; ")
    ));
    Some(m)
}

fn with_deps(db: Option<&ModDb>, mut eff: Effective) -> Effective {
    if let Some(db) = db
        && eff.restrict
    {
        let deps: Vec<String> = eff.allowed.iter().flat_map(|m| db.deps_of(m)).collect();
        eff.allowed.extend(deps);
    }
    eff
}

/// A `tamper` event for a finding.
fn tamper_event(clock: &Clock, f: &Finding) -> Event {
    let mut ev = Event::synthetic(Kind::Tamper, clock);
    ev.object = Some(f.object.clone());
    ev.repaired = Some(matches!(f.repair, Some(Ok(_))));
    ev.detail = Some(match &f.repair {
        Some(Ok(r)) => format!("{}; {r}", f.detail),
        Some(Err(e)) => format!("{}; the repair failed: {e}", f.detail),
        None => f.detail.clone(),
    });
    ev
}

fn describe_container(c: &Container) -> String {
    match &c.name {
        Some(n) => format!("{n} ({})", c.id),
        None => c.id.clone(),
    }
}

fn open_moddb() -> Option<ModDb> {
    let root = RootFs::host();
    let kernel = running_kernel(&root)?;
    match ModDb::for_kernel(&root, &kernel) {
        Ok(db) => Some(db),
        Err(e) => {
            log::info!(
                "modules.dep unavailable ({e}): allowed modules' dependencies are not added"
            );
            None
        }
    }
}

fn subject(info: &ContainerInfo) -> Subject<'_> {
    Subject {
        container: &info.container,
        labels: &info.labels,
        declared: &info.declared,
    }
}

#[cfg(test)]
mod tests {
    use kmodmon_common::{DecidedBy, EventKind, NamedBy, Op, RawEvent, Source, lsm};

    use crate::{
        event::{Clock, Event, Kind, SourceName, Syscall},
        policy::Policy,
    };

    fn decision(kind: EventKind, op: Op, rule: u32) -> Event {
        let mut r = RawEvent::zeroed();
        r.kind = kind as u32;
        r.source = Source::Lsm as u32;
        r.op = op as u32;
        r.rule_id = rule;
        r.policy_generation = 5;
        r.ret = if kind == EventKind::Denied { -1 } else { 0 };
        r.name[..5].copy_from_slice(b"dummy");
        r.decided_by = DecidedBy::OwnEntry as u32;
        r.named_by = NamedBy::Image as u32;
        Event::from_raw(&r, &Clock::new()).unwrap()
    }

    #[test]
    fn lsm_records_decode_with_their_rule() {
        let ev = decision(EventKind::Denied, Op::FinitModule, 2);
        assert_eq!(ev.kind, Kind::Denied);
        assert_eq!(ev.source, SourceName::Lsm);
        assert_eq!(ev.syscall, Some(Syscall::FinitModule));
        assert_eq!(ev.errno.as_deref(), Some("EPERM"));
        assert_eq!((ev.params.as_deref(), ev.fd, ev.flags), (None, None, None));
        assert_eq!(ev.detail.as_deref(), Some("policy rule #2"));
        assert_eq!((ev.rule_id, ev.policy_generation), (Some(2), Some(5)));
        assert_eq!(ev.decided_by.as_deref(), Some("own_entry"));
        assert_eq!(ev.named_by.as_deref(), Some("image"));

        let ev = decision(EventKind::WouldDeny, Op::None, 1);
        assert_eq!(ev.kind, Kind::WouldDeny);
        assert_eq!(ev.module.as_deref(), Some("dummy"));
        assert_eq!(ev.syscall, None);
        assert_eq!(ev.errno, None, "audit mode: nothing failed");

        let p = Policy::parse(
            "mode = \"audit\"\n[[rule]]\nname = \"lb\"\nruntime = \"runc\"\n",
            "p",
        )
        .unwrap();
        assert_eq!(p.describe_rule(2), "rule \"lb\" (line 2)");
        assert_eq!(p.describe_rule(1), "unselected containers");
    }

    /// A renamed file: the record names the module, the file's path, both names differ.
    #[test]
    fn a_renamed_file_is_reported_with_both_names() {
        let mut r = RawEvent::zeroed();
        r.kind = EventKind::Denied as u32;
        r.source = Source::Lsm as u32;
        r.op = Op::FinitModule as u32;
        r.ret = -1;
        r.name[..5].copy_from_slice(b"dummy");
        r.named_by = NamedBy::Image as u32;
        r.decided_by = DecidedBy::ContainerParent as u32;
        r.decided_at = 77;
        r.lsm_flags = lsm::NAME_MISMATCH | lsm::MODINFO_MISMATCH;
        r.params[..5].copy_from_slice(b"other");
        // Leaf first: ip_vs.ko, mods, tmp → /tmp/mods/ip_vs.ko
        for (i, c) in [&b"ip_vs.ko"[..], b"mods", b"tmp"].iter().enumerate() {
            r.path[i * kmodmon_common::PATH_COMPONENT_LEN..][..c.len()].copy_from_slice(c);
        }
        r.path_len = 3;
        let ev = Event::from_raw(&r, &Clock::new()).unwrap();
        assert_eq!(ev.module.as_deref(), Some("dummy"));
        assert_eq!(ev.path.as_deref(), Some("/tmp/mods/ip_vs.ko"));
        assert_eq!(ev.file_module.as_deref(), Some("ip_vs"));
        assert_eq!(ev.modinfo_name.as_deref(), Some("other"));
        assert_eq!(ev.decided_by.as_deref(), Some("container_parent"));
        assert_eq!(ev.deciding_cgroup_id, Some(77));
        // Without the mismatch bits, neither second name is claimed.
        r.lsm_flags = 0;
        let ev = Event::from_raw(&r, &Clock::new()).unwrap();
        assert_eq!((ev.file_module, ev.modinfo_name), (None, None));
        // A kernfs denial reaches the loader as ENOMEM.
        r.named_by = NamedBy::Kernel as u32;
        r.ret = -12;
        let ev = Event::from_raw(&r, &Clock::new()).unwrap();
        assert_eq!(ev.errno.as_deref(), Some("ENOMEM"));
        assert_eq!(ev.named_by.as_deref(), Some("kernel"));
    }
}
