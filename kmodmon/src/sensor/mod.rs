//! The sensor: choose, per kernel, the best source of each kind of event, load and attach the
//! monitor's eBPF programs, and hand out their ring buffers and counters; and load the
//! enforcement (BPF LSM) programs for [`crate::enforce`] ([`lsm`]). Programs and maps are
//! found by the names in `kmodmon_common::names`.
//!
//! Sources, best first:
//! - module records: `module:module_{load,free,request}` tracepoints (absent without
//!   CONFIG_MODULES);
//! - attempts, cheapest first: fexit on `__x64_sys_{init,finit,delete}_module` (no cost to
//!   other syscalls; on a kernel without module support, their ENOSYS stubs) → kprobe +
//!   tracefs kretprobe on the same functions (no cost either; [`kretprobe`]) → tp_btf on
//!   sys_exit alone → `syscalls:sys_{enter,exit}_*` → a raw tracepoint on sys_exit alone →
//!   `raw_syscalls:sys_{enter,exit}` (from tp_btf on, every syscall pays; see
//!   [`plan::AttemptSource::cost`]); identical repeated attempts aggregated in the kernel
//!   (`REPEATS`, reported by [`crate::pipeline::repeats`]);
//! - cgroups: `cgroup:cgroup_{mkdir,rmdir}` (else the cgroup tree is rescanned on a miss).
pub mod btf;
pub mod counters;
pub mod identity;
pub mod kretprobe;
pub mod lockdown;
pub mod lsm;
pub mod plan;
pub mod seccomp;
pub mod tracefs;

use std::process::ExitCode;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, RingBuf},
    programs::{BtfTracePoint, FExit, KProbe, RawTracePoint, TracePoint},
};
use kmodmon_common::names;
use kmodmon_common::{RepeatKey, RepeatSlot};
pub use plan::{AttemptSource, CgroupV1Plan, Plan};
use thiserror::Error;

use self::{btf::KernelBtf, counters::Counters, tracefs::Tracefs};

#[derive(Debug, Error)]
pub enum SensorError {
    #[error(
        "kmodmon must run as root (or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN); try `sudo kmodmon ...`"
    )]
    NotRoot,
    #[error("{0}")]
    Tracefs(String),
    #[error("tracepoint format: {0}")]
    Format(String),
    #[error("BTF: {0}")]
    Btf(String),
    #[error(
        "loading the eBPF object failed: {0}; if this says 'Operation not permitted', BPF is not \
         permitted here (root? kernel.unprivileged_bpf_disabled? a container without CAP_BPF?)"
    )]
    Load(String),
    #[error("attaching {program} to {target} failed: {reason}")]
    Attach {
        program: String,
        target: String,
        reason: String,
    },
    #[error("no source for module events could be attached on this kernel: {0}")]
    NothingAttachable(String),
    #[error("map {0} missing from the eBPF object")]
    Map(&'static str),
    #[error("{0}")]
    Kretprobe(#[from] kretprobe::KretprobeError),
    #[error("{error}; {note}")]
    LockedDown {
        error: Box<SensorError>,
        note: String,
    },
}

/// The compiled eBPF object, built by build.rs (aya-build).
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kmodmon"));

/// User choices that change source selection.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub no_fexit: bool,
    pub force_raw_syscalls: bool,
    /// Attach only the cgroup programs (enforcement follows containers; no module events).
    pub cgroups_only: bool,
    /// Do not report module syscalls refused by seccomp (see [`seccomp`]).
    pub no_seccomp_attempts: bool,
    /// Do not capture module images (no content identity).
    pub no_identity: bool,
    /// Identical attempts of a task closer than this are aggregated (`--repeat-window`);
    /// `None` for [`plan::DEFAULT_REPEAT_WINDOW`], zero to turn aggregation off.
    pub repeat_window: Option<std::time::Duration>,
}

/// The open repeat bursts (kernel map `REPEATS`).
pub type RepeatMap = BpfHashMap<MapData, RepeatKey, RepeatSlot>;

/// What a loaded object was loaded with: the programs' configuration, the identity
/// configuration, and whether aya had the kernel's BTF.
type Settings = (
    kmodmon_common::Config,
    Option<kmodmon_common::identity::IdentityConfig>,
    bool,
);

/// A loaded object, before anything of it is attached.
struct Loaded {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    settings: Settings,
}

/// Loaded and attached programs.
pub struct Sensor {
    /// Dropped first: the return probes are detached and their tracefs events removed before
    /// the programs go.
    kretprobes: Vec<kretprobe::TracefsKretprobe>,
    ebpf: Ebpf,
    pub plan: Plan,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    seccomp: seccomp::Attached,
    tracefs: std::path::PathBuf,
}

impl Sensor {
    /// Plans, loads and attaches. On failure of a preferred attempt source, falls back to the
    /// next one and records why in the plan's notes.
    pub fn attach(opts: Options) -> Result<Sensor, SensorError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(SensorError::NotRoot);
        }
        let _ = raise_memlock();
        let t0 = std::time::Instant::now();
        let tracefs = Tracefs::find_or_mount()?;
        let btf = KernelBtf::load();
        let mut plan = Plan::make(&tracefs, btf.as_ref().ok(), opts)?;
        log::debug!("planned in {:?}: {}", t0.elapsed(), plan.describe());
        if let Err(e) = &btf {
            plan.notes.push(e.to_string());
        }
        let locked_down = lockdown::blocking_note();
        if let Some(note) = &locked_down {
            plan.notes.push(note.clone());
        }
        kretprobe::remove_stale(tracefs.root());
        // Parsed at most once however many sources are tried.
        let mut aya_btf: Option<aya::Btf> = None;
        // The object as the last attempt left it when nothing of it was attached (its fexit
        // probe was refused): the next source loads nothing again when its settings match.
        let mut spare: Option<Loaded> = None;
        loop {
            let t1 = std::time::Instant::now();
            let attempt = Self::try_attach(
                &plan,
                tracefs.root(),
                btf.as_ref().ok(),
                &mut aya_btf,
                &mut spare,
            );
            log::debug!(
                "attach attempt ({}) took {:?}",
                plan.attempts.as_str(),
                t1.elapsed()
            );
            match attempt {
                Ok(mut sensor) => {
                    // The sensor's plan is this one, with what attaching the identity and
                    // seccomp programs found.
                    sensor.plan.seccomp = std::mem::take(&mut sensor.seccomp.describe);
                    let mut notes = std::mem::take(&mut sensor.seccomp.notes);
                    sensor.plan.notes.append(&mut notes);
                    // aya's parse of the kernel BTF (fexit, tp_btf) leaves tens of MB of freed
                    // heap behind: give it back (measured idle RSS 47 MB before, see below).
                    drop(aya_btf);
                    trim_heap();
                    return Ok(sensor);
                }
                // Without the task-exit program the kernel cannot close a dead task's bursts.
                Err(SensorError::Attach {
                    program, reason, ..
                }) if program == names::program::REPEAT_TASK_EXIT && plan.repeats() => {
                    plan = plan.without_repeats(&format!(
                        "attaching {program} to sched_process_exit failed: {reason}"
                    ));
                }
                Err(e) => match plan.fallback(&e) {
                    Some(next) => plan = next,
                    None => {
                        return Err(match locked_down {
                            Some(note) => SensorError::LockedDown {
                                error: Box::new(e),
                                note,
                            },
                            None => e,
                        });
                    }
                },
            }
        }
    }

    fn try_attach(
        plan: &Plan,
        tracefs: &std::path::Path,
        kernel_btf: Option<&KernelBtf>,
        btf_cache: &mut Option<aya::Btf>,
        spare: &mut Option<Loaded>,
    ) -> Result<Sensor, SensorError> {
        // aya parses the kernel's BTF itself when asked; only fexit and tp_btf need it (the
        // programs carry no CO-RE relocations), so skip that cost otherwise. From the bytes
        // already read for planning, when there are some.
        if plan.needs_btf() && btf_cache.is_none() {
            let parsed = match kernel_btf {
                Some(k) => aya::Btf::parse(k.raw(), aya::Endianness::default()),
                None => aya::Btf::from_sys_fs(),
            };
            *btf_cache = Some(parsed.map_err(|e| SensorError::Btf(e.to_string()))?);
        }
        let aya_btf = btf_cache.as_ref().filter(|_| plan.needs_btf());
        let settings = (plan.config, plan.identity, plan.needs_btf());
        let Loaded {
            mut ebpf, logger, ..
        } = match spare.take() {
            Some(l) if l.settings == settings => l,
            _ => Self::load(plan, aya_btf, settings)?,
        };
        // A kernel that refuses trampolines may verify a program fully before saying so
        // (measured here: 170 ms for fexit_init_module, then EPERM): ask with an empty one
        // first, so falling back costs no verification — and no new load of the object,
        // of which nothing is attached yet.
        if let (Some(aya_btf), Some((_, func))) = (aya_btf, plan.fexits().first())
            && let Err(e) = probe_fexit(&mut ebpf, func, aya_btf)
        {
            *spare = Some(Loaded {
                ebpf,
                logger,
                settings,
            });
            return Err(e);
        }
        Self::attach_programs(plan, tracefs, ebpf, logger, aya_btf)
    }

    /// Loads the object with the plan's settings (nothing attached yet).
    fn load(
        plan: &Plan,
        aya_btf: Option<&aya::Btf>,
        settings: Settings,
    ) -> Result<Loaded, SensorError> {
        let mut loader = EbpfLoader::new();
        loader
            .btf(aya_btf)
            .override_global(names::global::CONFIG, &plan.config, true);
        if let Some(icfg) = &plan.identity {
            loader
                .override_global(names::global::IDENTITY_CONFIG, icfg, true)
                .map_max_entries(names::map::IMAGES, identity::RING_BYTES);
        }
        // The enforcement maps are created with every load of the object; the monitor's
        // copies are never used.
        for m in names::map::LSM_ONLY {
            loader.map_max_entries(m, 1);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| SensorError::Load(format!("{e:#}")))?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("eBPF logging unavailable: {e}");
                None
            }
        };
        Ok(Loaded {
            ebpf,
            logger,
            settings,
        })
    }

    /// Attaches the plan's programs of a loaded object.
    fn attach_programs(
        plan: &Plan,
        tracefs: &std::path::Path,
        mut ebpf: Ebpf,
        logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
        aya_btf: Option<&aya::Btf>,
    ) -> Result<Sensor, SensorError> {
        for (program, category, name) in plan.tracepoints() {
            attach_tracepoint(&mut ebpf, program, category, name)?;
        }
        for (program, tp) in plan.raw_tracepoints() {
            attach_raw_tracepoint(&mut ebpf, program, tp)?;
        }
        if let Some(aya_btf) = aya_btf {
            for (program, func) in plan.fexits() {
                attach_fexit(&mut ebpf, program, &func, aya_btf)?;
            }
            for (program, tp) in plan.btf_tracepoints() {
                attach_btf_tracepoint(&mut ebpf, program, tp, aya_btf)?;
            }
        }
        let mut kretprobes = Vec::new();
        let kprobes = plan.kprobes();
        if !kprobes.is_empty() {
            // Returns first: an attempt that enters before its return is probed would stay
            // parked; a return without its entry is only counted (exit_without_enter).
            let ret: &mut KProbe = program_mut(&mut ebpf, names::program::KRETPROBE_MODULE)?;
            ret.load().map_err(|e| SensorError::Attach {
                program: names::program::KRETPROBE_MODULE.to_string(),
                target: "kretprobe".into(),
                reason: format!("{e:#}"),
            })?;
            let fd = {
                use std::os::fd::{AsFd as _, AsRawFd as _};
                ret.fd()
                    .map_err(|e| SensorError::Load(format!("{e:#}")))?
                    .as_fd()
                    .as_raw_fd()
            };
            let maxactive = plan::kretprobe_maxactive();
            for (_, func) in &kprobes {
                kretprobes.push(kretprobe::TracefsKretprobe::attach(
                    tracefs, func, maxactive, fd,
                )?);
            }
            for (program, func) in &kprobes {
                attach_kprobe(&mut ebpf, program, func)?;
            }
        }
        let mut plan = plan.clone();
        if plan.identity.is_some()
            && let Some(aya_btf) = aya_btf
        {
            // Identity is an addition: when this kernel refuses its programs, monitoring
            // goes on without it and says so.
            let attached = KernelBtf::load()
                .map_err(|e| SensorError::Btf(e.to_string()))
                .and_then(|kbtf| identity::attach(&mut ebpf, aya_btf, &kbtf));
            match attached {
                Ok(notes) => plan.notes.extend(notes),
                Err(e) => {
                    log::debug!("identity programs: {e}");
                    plan.notes.push(format!(
                        "identity off: {}",
                        e.to_string().lines().next().unwrap_or_default()
                    ));
                    plan.identity = None;
                }
            }
        }
        let seccomp = seccomp::attach(
            &mut ebpf,
            &plan.config,
            plan.attempts,
            plan.seccomp_exit_fentry,
            aya_btf,
        );
        Ok(Sensor {
            kretprobes,
            ebpf,
            plan,
            logger,
            seccomp,
            tracefs: tracefs.to_path_buf(),
        })
    }

    /// The module-event ring buffer.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, SensorError> {
        take_ringbuf(&mut self.ebpf, names::map::EVENTS)
    }

    /// The module-image ring buffer (identity), when the identity programs are attached.
    pub fn take_images(&mut self) -> Option<RingBuf<MapData>> {
        self.plan.identity.as_ref()?;
        take_ringbuf(&mut self.ebpf, names::map::IMAGES).ok()
    }

    /// The cgroup mkdir/rmdir ring buffer.
    pub fn take_cgroups(&mut self) -> Result<RingBuf<MapData>, SensorError> {
        take_ringbuf(&mut self.ebpf, names::map::CGROUPS)
    }

    /// The kernel-side counters.
    pub fn take_counters(&mut self) -> Result<Counters, SensorError> {
        let counters = self
            .ebpf
            .take_map(names::map::COUNTERS)
            .ok_or(SensorError::Map(names::map::COUNTERS))?;
        let pending = self
            .ebpf
            .take_map(names::map::PENDING)
            .ok_or(SensorError::Map(names::map::PENDING))?;
        let mut c = Counters::new(counters, pending)?;
        if !self.kretprobes.is_empty() {
            c.watch_kretprobes(
                self.tracefs.clone(),
                self.kretprobes
                    .iter()
                    .map(|k| k.name().to_string())
                    .collect(),
            );
        }
        Ok(c)
    }

    /// The open repeat bursts, for the pipeline's sweep; None when attempts are not
    /// aggregated.
    pub fn take_repeats(&mut self) -> Result<Option<RepeatMap>, SensorError> {
        if !self.plan.repeats() {
            return Ok(None);
        }
        let map = self
            .ebpf
            .take_map(names::map::REPEATS)
            .ok_or(SensorError::Map(names::map::REPEATS))?;
        BpfHashMap::try_from(map)
            .map(Some)
            .map_err(|_| SensorError::Map(names::map::REPEATS))
    }

    /// Takes the eBPF logger so its ring buffer can be polled.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }
}

fn take_ringbuf(ebpf: &mut Ebpf, name: &'static str) -> Result<RingBuf<MapData>, SensorError> {
    let map = ebpf.take_map(name).ok_or(SensorError::Map(name))?;
    RingBuf::try_from(map).map_err(|_| SensorError::Map(name))
}

/// Runs `f` on program `name` of type `P`, turning every failure into an attach error naming
/// the program and its target.
pub(crate) fn with_program<P>(
    ebpf: &mut Ebpf,
    program: &str,
    target: String,
    f: impl FnOnce(&mut P) -> Result<(), aya::programs::ProgramError>,
) -> Result<(), SensorError>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let err = |reason: String| SensorError::Attach {
        program: program.to_string(),
        target: target.clone(),
        reason,
    };
    let prog: &mut P = ebpf
        .program_mut(program)
        .ok_or_else(|| err("program missing from the object".into()))?
        .try_into()
        .map_err(|e| err(format!("{e}")))?;
    f(prog).map_err(|e| err(format!("{e:#}")))
}

/// Program `name` as type `P`.
fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, SensorError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let err = |reason: String| SensorError::Attach {
        program: name.to_string(),
        target: "load".into(),
        reason,
    };
    ebpf.program_mut(name)
        .ok_or_else(|| err("program missing from the object".into()))?
        .try_into()
        .map_err(|e| err(format!("{e}")))
}

fn attach_kprobe(ebpf: &mut Ebpf, program: &str, func: &str) -> Result<(), SensorError> {
    with_program(
        ebpf,
        program,
        format!("kprobe {func}"),
        |prog: &mut KProbe| {
            prog.load()?;
            prog.attach(func, 0).map(drop)
        },
    )
}

fn attach_btf_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    tp: &str,
    btf: &aya::Btf,
) -> Result<(), SensorError> {
    with_program(
        ebpf,
        program,
        format!("tp_btf {tp}"),
        |prog: &mut BtfTracePoint| {
            prog.load(tp, btf)?;
            prog.attach().map(drop)
        },
    )
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    category: &str,
    name: &str,
) -> Result<(), SensorError> {
    let target = format!("tracepoint {category}:{name}");
    with_program(ebpf, program, target, |prog: &mut TracePoint| {
        // A program attached to several tracepoints is loaded once.
        if prog.fd().is_err() {
            prog.load()?;
        }
        prog.attach(category, name).map(drop)
    })
}

fn attach_raw_tracepoint(ebpf: &mut Ebpf, program: &str, tp: &str) -> Result<(), SensorError> {
    with_program(
        ebpf,
        program,
        format!("raw tracepoint {tp}"),
        |prog: &mut RawTracePoint| {
            prog.load()?;
            prog.attach(tp).map(drop)
        },
    )
}

fn attach_fexit(
    ebpf: &mut Ebpf,
    program: &str,
    func: &str,
    btf: &aya::Btf,
) -> Result<(), SensorError> {
    with_program(
        ebpf,
        program,
        format!("fexit {func}"),
        |prog: &mut FExit| {
            prog.load(func, btf)?;
            prog.attach().map(drop)
        },
    )
}

/// Loads and attaches the empty fexit program to `func`, then detaches and unloads it.
/// Its failure names the probe as what it is, so that the fallback note reads right.
fn probe_fexit(ebpf: &mut Ebpf, func: &str, btf: &aya::Btf) -> Result<(), SensorError> {
    with_program(
        ebpf,
        names::program::FEXIT_PROBE,
        format!("fexit {func}"),
        |prog: &mut FExit| {
            prog.load(func, btf)?;
            prog.attach()?;
            prog.unload()
        },
    )
    .map_err(|e| match e {
        SensorError::Attach {
            program,
            target,
            reason,
        } => SensorError::Attach {
            program: format!("{program} (an empty fexit program, tried before the real ones)"),
            target,
            reason,
        },
        other => other,
    })
}

/// Returns freed heap memory to the system (glibc keeps it otherwise).
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock() -> nix::Result<()> {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(
        Resource::RLIMIT_MEMLOCK,
        libc::RLIM_INFINITY,
        libc::RLIM_INFINITY,
    )
}

/// `kmodmon sources`: what would be attached here, and why. As root the programs are really
/// loaded and attached (then detached), so the answer includes fallbacks the kernel forces
/// (e.g. a verifier that rejects fexit); otherwise it is the plan from tracefs and BTF alone.
pub fn explain() -> anyhow::Result<ExitCode> {
    if nix::unistd::geteuid().is_root() {
        let sensor = Sensor::attach(Options::default())?;
        println!("{}", sensor.plan.describe());
        println!("{}", sensor.plan.describe_cgroups());
        for n in &sensor.plan.notes {
            println!("note: {n}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(tracefs) = Tracefs::find() else {
        anyhow::bail!(
            "tracefs is not mounted; run as root (kmodmon mounts it) or `mount -t tracefs tracefs /sys/kernel/tracing`"
        );
    };
    let btf = KernelBtf::load();
    let plan = Plan::make(&tracefs, btf.as_ref().ok(), Options::default())?;
    println!("{} (planned without loading: not root)", plan.describe());
    println!("{}", plan.describe_cgroups());
    if let Err(e) = btf {
        println!("note: {e}");
    }
    if let Some(note) = lockdown::blocking_note() {
        println!("note: {note}");
    }
    for n in &plan.notes {
        println!("note: {n}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use kmodmon_common::names;
    use object::{Object as _, ObjectSymbol as _};

    use super::EBPF_OBJECT;

    /// Every program, map and global userspace names (kmodmon_common::names) is in the compiled
    /// object, and every program and map of the object is named there: a rename on either side
    /// fails here, not at attach time on some kernel.
    #[test]
    fn names_match_the_object() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded eBPF object parses");
        let programs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
        let named: BTreeSet<&str> = names::program::ALL.into_iter().collect();
        assert_eq!(
            programs, named,
            "programs in the object vs names::program::ALL"
        );
        assert_eq!(
            named.len(),
            names::program::ALL.len(),
            "a program is named twice"
        );

        // Global data sections (.rodata, .bss, ...) are maps to aya too; they are not named.
        let maps: BTreeSet<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|m| !m.starts_with('.'))
            .collect();
        let named: BTreeSet<&str> = names::map::ALL.into_iter().collect();
        assert_eq!(maps, named, "maps in the object vs names::map::ALL");
        assert_eq!(named.len(), names::map::ALL.len(), "a map is named twice");

        let elf = object::File::parse(EBPF_OBJECT).expect("the embedded object is ELF");
        for global in names::global::ALL {
            let sym = elf.symbol_by_name(global);
            assert!(
                sym.is_some_and(|s| s.is_global() && s.is_definition()),
                "global {global} is not defined in the eBPF object"
            );
        }
    }
}
