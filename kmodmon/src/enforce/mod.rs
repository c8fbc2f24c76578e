//! Policy enforcement in the kernel: BPF LSM programs (kmodmon-ebpf `lsm.rs`) deciding every
//! module load and autoload request from maps keyed by cgroup id, which this module keeps
//! equal to the [`Policy`] as containers come and go.
//!
//! Programs, links and maps are pinned under /sys/fs/bpf/kmodmon (see [`pins`]), so a dead
//! daemon leaves enforcement in force; a restarted one adopts the pins. Only
//! [`Enforcer::shutdown`] with `remove = true` (`kmodmon enforce off`) takes them away.
//!
//! A task is decided by the deepest of its cgroup's ancestors (itself included) that has an
//! entry, else by the host entry: sub-cgroups a container makes stay under its rule. A new
//! container's cgroup falls under its parent's decision (usually the host's) until kmodmon maps
//! it, which it does as soon as the pipeline reads the cgroup's mkdir record: the enforcer
//! follows the host [`Registry`] (no polling).
//!
//! The calls: [`Enforcer::start`] once, with the registry; [`Enforcer::follow`] for every
//! registry [`Change`]; [`Enforcer::reload`] on SIGHUP; [`Enforcer::take_events`] for the
//! ring buffer carrying `denied` / `would_deny` records; [`Enforcer::describe`] to name the
//! rule in them.
pub mod cli;
pub mod host;
pub mod pins;
mod state;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
};

use aya::maps::{MapData, RingBuf};
use kmodmon_common::policy::HOST_KEY;
use thiserror::Error;

pub use self::pins::{Installed, PinDir};
use self::{pins::PolicyMaps, state::KernelState};
use crate::{
    event::{Container, Event, Kind},
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

/// The cgroup2 root's id.
const ROOT_CGROUP: u64 = 1;

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
}

impl ContainerInfo {
    /// What the registry knows about a container.
    pub fn of(t: &Tracked) -> ContainerInfo {
        ContainerInfo {
            container: t.container.clone(),
            labels: t.labels(),
            declared: t.declared_modules().to_vec(),
        }
    }
}

/// The registry's running containers that have a cgroup of their own (a container in the
/// root cgroup cannot be told apart from the host).
pub fn containers_of(registry: &Registry) -> Vec<(u64, ContainerInfo)> {
    let mut out = Vec::new();
    for t in registry.running() {
        if t.cgroup_id == HOST_KEY || t.cgroup_id == ROOT_CGROUP {
            log::warn!(
                "container {} has no cgroup kmodmon can find: the policy cannot be applied to it",
                t.container.id
            );
            continue;
        }
        out.push((t.cgroup_id, ContainerInfo::of(t)));
    }
    out
}

/// Enforcement, installed or adopted, with the policy in force.
pub struct Enforcer {
    policy: Policy,
    opts: StartOptions,
    kernel: KernelState,
    subjects: HashMap<u64, ContainerInfo>,
    /// The running kernel's modules.dep: allowing a module allows what it depends on.
    moddb: Option<ModDb>,
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
    /// knows. An invalid policy or an inactive BPF LSM installs nothing.
    pub fn start(opts: StartOptions, registry: &Registry) -> Result<Enforcer, EnforceError> {
        let policy = Policy::load(&opts.policy_path)?;
        if let Some(why) = cgroup_v1_refusal(registry) {
            return Err(EnforceError::CgroupV1(why));
        }
        preflight(opts.force)?;
        if !module_support() {
            log::warn!("{}", host::NO_MODULES_EXPLANATION);
        }
        let installed = pins::install(&opts.pins, opts.replace)?;
        let kernel = KernelState::adopt(PolicyMaps::open(&opts.pins)?)?;
        let mut e = Enforcer {
            policy,
            opts,
            kernel,
            subjects: HashMap::new(),
            moddb: open_moddb(),
            installed,
        };
        e.sync_inner(containers_of(registry), true)?;
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

    /// A container's cgroup appeared, or kmodmon learnt more about it: (re)decide it.
    pub fn container_appeared(
        &mut self,
        cgroup_id: u64,
        info: ContainerInfo,
    ) -> Result<(), EnforceError> {
        // The root cgroup (id 1) holds the host: a container there cannot be told apart.
        if cgroup_id == HOST_KEY || cgroup_id == ROOT_CGROUP {
            log::debug!("not mapping cgroup {cgroup_id}: it is the host's");
            return Ok(());
        }
        let eff = self.with_deps(self.policy.decide(&subject(&info)));
        self.kernel.apply(cgroup_id, &eff)?;
        self.subjects.insert(cgroup_id, info);
        Ok(())
    }

    /// A container's cgroup was removed.
    pub fn container_gone(&mut self, cgroup_id: u64) -> Result<(), EnforceError> {
        self.subjects.remove(&cgroup_id);
        if cgroup_id == HOST_KEY {
            return Ok(());
        }
        self.kernel.remove(cgroup_id)
    }

    /// Makes the maps hold exactly the host entry and `containers` (entries of cgroups not
    /// listed are removed), and the mode the policy's.
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
        self.kernel.apply(HOST_KEY, &host)?;
        let mut keep = HashSet::new();
        for (cg, info) in containers {
            keep.insert(cg);
            self.container_appeared(cg, info)?;
        }
        self.subjects.retain(|cg, _| keep.contains(cg));
        let dropped = self.kernel.retain(&keep)?;
        if dropped > 0 {
            log::info!("dropped {dropped} policy entries of cgroups that are gone");
        }
        let want = Some(self.mode());
        if new_policy || self.kernel.mode()? != want {
            self.kernel.set_mode(want)?;
        }
        Ok(())
    }

    /// Follows a change the registry made: maps a container's cgroup as soon as it appears,
    /// re-decides it when its name, labels or declaration become known, unmaps it when it
    /// goes. A failure is logged; the maps keep what they had.
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
                    Some(t) if t.gone_at.is_none() => {
                        self.container_appeared(t.cgroup_id, ContainerInfo::of(t))
                    }
                    _ => Ok(()),
                }
            }
            Change::Gone { cgroup_id, .. } => self.container_gone(*cgroup_id),
        };
        if let Err(e) = result {
            log::error!("updating the policy maps for {change:?} failed: {e}");
        }
    }

    /// Re-reads the policy (from `path`, else the current file). An invalid policy changes
    /// nothing and the error says why; a valid one is applied to the host and every running
    /// container the registry knows, each moving from its old complete decision to its new one.
    pub fn reload(&mut self, path: Option<&Path>, registry: &Registry) -> Result<(), EnforceError> {
        let path = path.map_or_else(|| self.opts.policy_path.clone(), Path::to_path_buf);
        let policy = Policy::load(&path)?;
        self.policy = policy;
        self.opts.policy_path = path;
        self.moddb = open_moddb();
        self.sync_inner(containers_of(registry), true)
    }

    /// The ring buffer of denied / would_deny records (once; RawEvent layout).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.kernel.events()
    }

    /// Names the rule of a denied / would_deny event in its `detail`.
    pub fn describe(&self, ev: &mut Event) {
        if !matches!(ev.kind, Kind::Denied | Kind::WouldDeny) {
            return;
        }
        name_rule(&self.policy, ev);
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
            self.kernel.set_mode(None)?;
            pins::remove(&self.opts.pins)?;
        }
        Ok(())
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
                .map(|i| self.policy.decide(&subject(i)))
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

/// Names the rule of a denied / would_deny event (its `rule_id`) in its `detail`.
fn name_rule(policy: &Policy, ev: &mut Event) {
    if let Some(id) = ev.rule_id {
        ev.detail = Some(format!("policy: {}", policy.describe_rule(id)));
    }
}

impl Enforcer {
    /// Adds the dependencies (modules.dep) of every allowed module: modprobe loads them first,
    /// from the same cgroup.
    fn with_deps(&self, mut eff: Effective) -> Effective {
        if let Some(db) = &self.moddb
            && eff.restrict
        {
            let deps: Vec<String> = eff.allowed.iter().flat_map(|m| db.deps_of(m)).collect();
            eff.allowed.extend(deps);
        }
        eff
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
    use kmodmon_common::{EventKind, Op, RawEvent, Source};

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

        let ev = decision(EventKind::WouldDeny, Op::None, 1);
        assert_eq!(ev.kind, Kind::WouldDeny);
        assert_eq!(ev.module.as_deref(), Some("dummy"));
        assert_eq!(ev.syscall, None);

        let p = Policy::parse(
            "mode = \"audit\"\n[[rule]]\nname = \"lb\"\nruntime = \"runc\"\n",
            "p",
        )
        .unwrap();
        assert_eq!(p.describe_rule(2), "rule \"lb\" (line 2)");
        assert_eq!(p.describe_rule(1), "unselected containers");

        // The rule comes from rule_id, never from parsing the text of `detail`.
        let mut ev = decision(EventKind::Denied, Op::FinitModule, 2);
        super::name_rule(&p, &mut ev);
        assert_eq!(ev.detail.as_deref(), Some("policy: rule \"lb\" (line 2)"));
        let mut ev = decision(EventKind::Denied, Op::FinitModule, 2);
        ev.rule_id = Some(1);
        super::name_rule(&p, &mut ev);
        assert_eq!(ev.detail.as_deref(), Some("policy: unselected containers"));
    }
}
