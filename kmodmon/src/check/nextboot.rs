//! The reboot question: what the boot configuration will do with the kernel that boots next
//! (or any installed kernel). Each module configured to load at boot (where it is read),
//! expected by a running container, or required in the initramfs is judged against that
//! kernel's module tree, the modprobe.d rules with that boot entry's command line, and the
//! initramfs image that entry boots with; modules loaded now that the kernel will not have are
//! reported as `lost`.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use super::Warning;
use super::analyze::ContainerRef;
use super::boot::{BootConfig, Source, SourceKind};
use super::bootloader::{Confidence, MenuEntry, NextKernel, NextSource};
use super::cmdline::{KernelCmdline, PROC_CMDLINE};
use super::containers::ContainerExpectation;
use super::early::{EarlyConfig, Exclusion, Generator};
use super::initramfs::{self, Listing, Part};
use super::modprobe::{Blocker, ModprobeConfig};
use crate::escape::escape_bytes;
use crate::host::moddb::{LiveState, ModDb, RootFs};
use crate::modname;

/// Verdict for one module at the next boot. Ordered from most to least severe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NextStatus {
    /// Configured or expected, and that kernel has no such module, alias or built-in.
    NotAvailable,
    /// Blocked on that boot (modprobe.d, the boot entry's command line, dracut's omissions).
    Blacklisted,
    /// Must be in the initramfs (it is loaded from there) and the image lacks it or a
    /// dependency, or the image the entry names does not exist.
    NotInInitramfs,
    /// Loaded now, asked for by nothing, and that kernel has no such module: it will be gone.
    Lost,
    /// Compiled into that kernel while it is a loadable module now (always there; modprobe.d
    /// options and blacklists no longer apply to it).
    NowBuiltin,
    Ok,
}

impl NextStatus {
    pub const ALL: [NextStatus; 6] = [
        NextStatus::NotAvailable,
        NextStatus::Blacklisted,
        NextStatus::NotInInitramfs,
        NextStatus::Lost,
        NextStatus::NowBuiltin,
        NextStatus::Ok,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NextStatus::NotAvailable => "not_available",
            NextStatus::Blacklisted => "blacklisted",
            NextStatus::NotInInitramfs => "not_in_initramfs",
            NextStatus::Lost => "lost",
            NextStatus::NowBuiltin => "now_builtin",
            NextStatus::Ok => "ok",
        }
    }

    pub fn is_problem(self) -> bool {
        !matches!(self, NextStatus::Ok | NextStatus::NowBuiltin)
    }
}

/// The initramfs side of one module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InitramfsNeed {
    /// What says it must be in the initramfs.
    pub required_by: Vec<Source>,
    /// Whether the module and its dependencies are in the image; null when no image was read.
    pub in_image: Option<bool>,
    /// The module or dependencies the image lacks.
    pub missing: Vec<String>,
    /// Rules that keep it out of the image or from loading there.
    pub excluded_by: Vec<Exclusion>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NextModule {
    pub module: String,
    pub status: NextStatus,
    pub problem: bool,
    pub resolved: Vec<String>,
    pub builtin: bool,
    pub available: bool,
    /// Where it is configured to load at boot (only places that are read at boot).
    pub sources: Vec<Source>,
    pub containers: Vec<ContainerRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<InitramfsNeed>,
    pub blocked_by: Vec<Blocker>,
    /// A blocker applies on that boot that does not apply now.
    pub newly_blocked: bool,
    pub detail: String,
}

/// The kernel judged.
#[derive(Clone, Debug, Serialize)]
pub struct TargetKernel {
    #[serde(flatten)]
    pub kernel: NextKernel,
    /// Whether this kernel is the one running now.
    pub running: bool,
    /// Whether this kernel is the one that boots next (always true for `next_boot`).
    pub boots_next: bool,
    pub modules_dir: Option<String>,
    pub modules: Option<usize>,
    pub builtin: Option<usize>,
    /// Why the module tree could not be read.
    pub error: Option<String>,
}

/// The initramfs of that boot.
#[derive(Clone, Debug, Serialize)]
pub struct InitramfsReport {
    pub generator: Generator,
    pub generator_evidence: String,
    /// Modules that must be in it.
    pub required: usize,
    /// Images read (logical paths).
    pub images: Vec<String>,
    pub parts: Vec<Part>,
    /// Module trees in the images.
    pub kernels_in_image: Vec<String>,
    /// Why no image could be read (null when it was, or was not needed).
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NextSummary {
    pub ok: usize,
    pub now_builtin: usize,
    pub not_available: usize,
    pub blacklisted: usize,
    pub not_in_initramfs: usize,
    pub lost: usize,
    pub problems: usize,
}

impl NextSummary {
    fn count(modules: &[NextModule]) -> NextSummary {
        let mut s = NextSummary::default();
        for m in modules {
            *s.get_mut(m.status) += 1;
            s.problems += usize::from(m.problem);
        }
        s
    }

    fn get_mut(&mut self, status: NextStatus) -> &mut usize {
        match status {
            NextStatus::Ok => &mut self.ok,
            NextStatus::NowBuiltin => &mut self.now_builtin,
            NextStatus::NotAvailable => &mut self.not_available,
            NextStatus::Blacklisted => &mut self.blacklisted,
            NextStatus::NotInInitramfs => &mut self.not_in_initramfs,
            NextStatus::Lost => &mut self.lost,
        }
    }

    pub fn get(&self, status: NextStatus) -> usize {
        let mut s = self.clone();
        *s.get_mut(status)
    }

    pub fn sentence(&self) -> String {
        let problems: Vec<String> = NextStatus::ALL
            .iter()
            .filter(|s| s.is_problem() && self.get(**s) > 0)
            .map(|s| format!("{} {}", self.get(*s), s.as_str()))
            .collect();
        let head = match self.problems {
            0 => "no problems".to_string(),
            1 => format!("1 problem ({})", problems.join(", ")),
            n => format!("{n} problems ({})", problems.join(", ")),
        };
        format!("{head}; {} ok, {} now_builtin", self.ok, self.now_builtin)
    }
}

/// The judgement of one boot.
#[derive(Clone, Debug, Serialize)]
pub struct NextBoot {
    pub kernel: TargetKernel,
    /// The command line that boot passes (escaped), and where it was read.
    pub cmdline: Option<String>,
    pub cmdline_source: String,
    pub initramfs: InitramfsReport,
    pub modules: Vec<NextModule>,
    pub warnings: Vec<Warning>,
    pub summary: NextSummary,
}

/// What every judgement reads besides the kernel itself.
pub struct Inputs<'a> {
    pub root: &'a RootFs,
    pub boot: &'a BootConfig,
    pub containers: &'a [ContainerExpectation],
    pub live: &'a LiveState,
    /// The running kernel (None for an offline root without /proc).
    pub running: Option<&'a str>,
    pub running_db: Option<&'a ModDb>,
    pub running_cmdline: Option<&'a KernelCmdline>,
}

#[derive(Default)]
struct Want {
    sources: Vec<Source>,
    containers: Vec<ContainerRef>,
    early: Vec<Source>,
}

/// Judges one boot: `kernel` says which kernel and how it was chosen; `entry` is its boot
/// entry when the boot loader has one.
pub fn judge(inp: &Inputs, kernel: NextKernel, boots_next: bool) -> NextBoot {
    let mut warnings = Vec::new();
    let version = kernel.version.clone();
    let running = version.is_some() && version.as_deref() == inp.running;
    let db: Result<ModDb, String> = match &version {
        Some(v) => ModDb::for_kernel(inp.root, v).map_err(|e| e.to_string()),
        None => Err("no kernel was found to boot next".into()),
    };
    let entry = kernel.entry.clone();
    let (cmdline, cmdline_source): (Option<KernelCmdline>, String) = match entry
        .as_ref()
        .and_then(MenuEntry::kernel_cmdline)
    {
        Some(c) => (
            Some(c),
            format!(
                "boot entry {}",
                entry.as_ref().map_or("", |e| e.origin.as_str())
            ),
        ),
        None => match inp.running_cmdline {
            Some(c) => (
                Some(c.clone()),
                format!(
                    "{PROC_CMDLINE} of the running kernel (no boot entry gives this kernel's command line)"
                ),
            ),
            None => (None, "none (no boot entry and no /proc/cmdline)".into()),
        },
    };
    let cmdline_origin = entry
        .as_ref()
        .filter(|e| e.cmdline.is_some())
        .map_or(PROC_CMDLINE.to_string(), |e| e.origin.clone());
    let mut next_modprobe = match ModprobeConfig::read(inp.root, None) {
        Ok(m) => m,
        Err(e) => {
            warnings.push(Warning::general(format!("cannot read modprobe.d: {e}")));
            ModprobeConfig::default()
        }
    };
    if let Some(c) = &cmdline {
        next_modprobe.add_cmdline_from(c, &cmdline_origin);
    }
    let now_modprobe = ModprobeConfig::read(inp.root, inp.running_cmdline).unwrap_or_default();
    let early = EarlyConfig::read(inp.root, cmdline.as_ref(), &cmdline_origin);
    warnings.extend(early.warnings.iter().cloned());

    // What the boot will try to load.
    let mut wanted: BTreeMap<String, Want> = BTreeMap::new();
    for e in &inp.boot.entries {
        if e.source.read_at_boot && e.source.kind != SourceKind::KernelCmdline {
            wanted
                .entry(e.request.clone())
                .or_default()
                .sources
                .push(e.source.clone());
        }
    }
    if let Some(c) = &cmdline {
        for key in ["modules-load", "rd.modules-load"] {
            for request in c.list(key) {
                match modname::validate(&request) {
                    Ok(name) => wanted.entry(name).or_default().sources.push(Source {
                        kind: SourceKind::KernelCmdline,
                        path: cmdline_origin.clone(),
                        target: None,
                        line: None,
                        key: Some(key.into()),
                        read_at_boot: true,
                        note: None,
                    }),
                    Err(e) => warnings.push(Warning::at(
                        &cmdline_origin,
                        None,
                        format!(
                            "{key}: not a module name: {}",
                            escape_bytes(e.to_string().as_bytes())
                        ),
                    )),
                }
            }
        }
    }
    for c in inp.containers {
        for m in &c.modules {
            let r = ContainerRef {
                id: c.container_id.clone(),
                runtime: c.runtime.clone(),
                name: c.name.clone(),
            };
            let w = wanted.entry(modname::normalize(m)).or_default();
            if !w.containers.contains(&r) {
                w.containers.push(r);
            }
        }
    }
    for r in &early.required {
        wanted
            .entry(r.module.clone())
            .or_default()
            .early
            .push(r.source.clone());
    }

    // The initramfs image, when something must be in it.
    let mut image = InitramfsReport {
        generator: early.generator,
        generator_evidence: early.evidence.clone(),
        required: wanted.values().filter(|w| !w.early.is_empty()).count(),
        images: Vec::new(),
        parts: Vec::new(),
        kernels_in_image: Vec::new(),
        error: None,
    };
    let mut listing: Option<Listing> = None;
    // An image the boot entry names that does not exist: the boot itself fails.
    let mut named_but_absent: Vec<String> = Vec::new();
    if image.required > 0
        && let Some(v) = &version
    {
        let (found, absent) = find_images(inp.root, v, entry.as_ref());
        named_but_absent = absent;
        let mut all = Listing::default();
        let mut errors = Vec::new();
        for path in &found {
            match initramfs::list_file(
                &inp.root
                    .resolve_real(path)
                    .unwrap_or_else(|_| inp.root.real(path)),
            ) {
                Ok(l) => {
                    all.parts.extend(l.parts);
                    all.files.extend(l.files);
                }
                Err(e) => errors.push(format!("{}: {e}", escape_bytes(path.as_bytes()))),
            }
        }
        image.images = found.iter().map(|p| escape_bytes(p.as_bytes())).collect();
        if !errors.is_empty() {
            image.error = Some(errors.join("; "));
        } else if found.is_empty() {
            image.error = Some(if named_but_absent.is_empty() {
                format!(
                    "no initramfs image for {v} (looked for /boot/initrd.img-{v}, /boot/initramfs-{v}.img, /boot/initrd-{v})"
                )
            } else {
                format!(
                    "the boot entry names {}, which does not exist",
                    named_but_absent
                        .iter()
                        .map(|p| escape_bytes(p.as_bytes()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
        } else {
            image.parts = all.parts.clone();
            image.kernels_in_image = all
                .kernels()
                .into_iter()
                .map(|k| escape_bytes(k.as_bytes()))
                .collect();
            listing = Some(all);
        }
    }

    let ctx = Ctx {
        inp,
        version: version.as_deref().unwrap_or("(unknown)"),
        shown: escape_bytes(version.as_deref().unwrap_or("(unknown)").as_bytes()),
        db: db.as_ref().ok(),
        next_modprobe: &next_modprobe,
        now_modprobe: &now_modprobe,
        early: &early,
        listing: listing.as_ref(),
        image_error: image.error.as_deref(),
        image_absent: !named_but_absent.is_empty(),
    };
    let mut modules = Vec::new();
    let mut covered: BTreeSet<String> = BTreeSet::new();
    if version.is_some() {
        for (name, want) in wanted {
            let m = ctx.judge(name, want);
            covered.insert(m.module.clone());
            for r in &m.resolved {
                covered.insert(r.clone());
                if let Some(db) = ctx.db {
                    covered.extend(db.deps_of(r));
                }
            }
            modules.push(m);
        }
        modules.extend(ctx.loaded_now(&covered, running));
    }
    modules.sort_by(|a, b| {
        a.status
            .cmp(&b.status)
            .then_with(|| a.module.cmp(&b.module))
    });
    if let Ok(db) = &db
        && db.skipped_lines() > 0
    {
        warnings.push(Warning::at(
            &db.dir().display().to_string(),
            None,
            format!(
                "{} lines of the depmod files were not understood and were skipped",
                db.skipped_lines()
            ),
        ));
    }
    NextBoot {
        kernel: TargetKernel {
            running,
            boots_next,
            modules_dir: db.as_ref().ok().map(|d| d.dir().display().to_string()),
            modules: db.as_ref().ok().map(ModDb::module_count),
            builtin: db.as_ref().ok().map(ModDb::builtin_count),
            error: db.as_ref().err().cloned(),
            kernel: NextKernel {
                version: kernel.version.map(|v| escape_bytes(v.as_bytes())),
                ..kernel
            },
        },
        cmdline: cmdline
            .as_ref()
            .map(|c| escape_bytes(c.words().join(" ").as_bytes())),
        cmdline_source,
        initramfs: image,
        summary: NextSummary::count(&modules),
        modules,
        warnings,
    }
}

/// A [`NextKernel`] for an installed kernel judged with `--all-kernels`.
pub fn installed(version: &str, entry: Option<&MenuEntry>) -> NextKernel {
    NextKernel {
        version: Some(version.to_string()),
        source: NextSource::Installed,
        confidence: Confidence::High,
        bootloader: super::bootloader::Bootloader::None,
        evidence: match entry {
            Some(e) => format!("installed; boot entry '{}' ({})", e.title, e.origin),
            None => "installed (a module tree); no boot entry names it".into(),
        },
        entry: entry.cloned(),
    }
}

/// Images for `version`: those the boot entry names (relative to the boot partition, so
/// /boot and the ESP are tried), else the usual names. Returns (found, named but absent).
fn find_images(
    root: &RootFs,
    version: &str,
    entry: Option<&MenuEntry>,
) -> (Vec<String>, Vec<String>) {
    let mut found = Vec::new();
    let mut absent = Vec::new();
    let named: Vec<&String> = entry.map(|e| e.initrd.iter().collect()).unwrap_or_default();
    for p in &named {
        let p = format!("/{}", p.trim_start_matches('/'));
        let hit = [
            p.clone(),
            format!("/boot{p}"),
            format!("/boot/efi{p}"),
            format!("/efi{p}"),
        ]
        .into_iter()
        .find(|c| root.exists(c) && !root.is_dir(c));
        match hit {
            Some(h) => found.push(h),
            None => absent.push(p),
        }
    }
    if named.is_empty() {
        for c in [
            format!("/boot/initrd.img-{version}"),
            format!("/boot/initramfs-{version}.img"),
            format!("/boot/initrd-{version}"),
            format!("/boot/initramfs-{version}"),
        ] {
            if root.exists(&c) && !root.is_dir(&c) {
                found.push(c);
                break;
            }
        }
    }
    (found, absent)
}

struct Ctx<'a> {
    inp: &'a Inputs<'a>,
    /// The kernel release, for look-ups.
    version: &'a str,
    /// The same, escaped, for messages (it comes from a file or a directory name).
    shown: String,
    db: Option<&'a ModDb>,
    next_modprobe: &'a ModprobeConfig,
    now_modprobe: &'a ModprobeConfig,
    early: &'a EarlyConfig,
    listing: Option<&'a Listing>,
    image_error: Option<&'a str>,
    image_absent: bool,
}

impl Ctx<'_> {
    fn resolve(&self, name: &str) -> Vec<String> {
        let mut resolved = self.next_modprobe.resolve_alias(name);
        if resolved.is_empty()
            && let Some(db) = self.db
        {
            resolved = db.resolve_alias(name);
        }
        resolved
    }

    fn builtin(&self, m: &str) -> bool {
        self.db.is_some_and(|db| db.is_builtin(m))
    }

    fn builtin_now(&self, m: &str) -> bool {
        self.inp.running_db.is_some_and(|db| db.is_builtin(m)) || self.inp.live.is_builtin(m)
    }

    /// Blockers of that boot for `names`, and whether any of them does not apply now.
    fn blockers(&self, names: &[&String]) -> (Vec<Blocker>, bool) {
        let mut out: Vec<Blocker> = Vec::new();
        let mut newly = false;
        for m in names {
            for b in self.next_modprobe.blockers(m) {
                if !out.contains(b) {
                    out.push(b.clone());
                }
                // A file rule is the same rule in the same file; a command line rule is the
                // same word on both command lines.
                let same_now = self.now_modprobe.blockers(m).iter().any(|n| {
                    n.rule == b.rule && (n.path == b.path || (n.line.is_none() && b.line.is_none()))
                });
                newly |= !same_now;
            }
        }
        (out, newly)
    }

    fn judge(&self, name: String, want: Want) -> NextModule {
        let resolved = self.resolve(&name);
        let builtin = !resolved.is_empty() && resolved.iter().all(|m| self.builtin(m));
        let available = builtin
            || (!resolved.is_empty()
                && resolved
                    .iter()
                    .all(|m| self.builtin(m) || self.db.is_some_and(|db| db.contains(m))));
        let names: Vec<&String> = std::iter::once(&name).chain(&resolved).collect();
        let (blocked_by, newly_blocked) = self.blockers(&names);
        let wanted_by = describe(&want);
        let mut initramfs = None;
        let mut initramfs_problem: Option<String> = None;
        if !want.early.is_empty() {
            let excluded_by: Vec<Exclusion> = names
                .iter()
                .flat_map(|m| self.early.exclusions_for(m))
                .fold(Vec::new(), |mut v, e| {
                    if !v.contains(&e) {
                        v.push(e);
                    }
                    v
                });
            let mut need = InitramfsNeed {
                required_by: want.early.clone(),
                in_image: None,
                missing: Vec::new(),
                excluded_by,
            };
            if !builtin && available {
                if let Some(listing) = self.listing {
                    let mut missing = Vec::new();
                    for m in &resolved {
                        if self.builtin(m) {
                            continue;
                        }
                        let deps = self.db.map(|db| db.deps_of(m)).unwrap_or_default();
                        for x in std::iter::once(m.clone()).chain(deps) {
                            if !self.builtin(&x)
                                && !listing.has_module(self.version, &x)
                                && !missing.contains(&x)
                            {
                                missing.push(x);
                            }
                        }
                    }
                    need.in_image = Some(missing.is_empty());
                    if !missing.is_empty() {
                        let kernels: Vec<String> = listing
                            .kernels()
                            .into_iter()
                            .map(|k| escape_bytes(k.as_bytes()))
                            .collect();
                        let other = if listing.kernels().contains(self.version) {
                            String::new()
                        } else if kernels.is_empty() {
                            " (the image holds no module tree at all)".to_string()
                        } else {
                            format!(" (the image holds modules of {} only)", kernels.join(", "))
                        };
                        initramfs_problem = Some(format!(
                            "the initramfs lacks {}{other}: rebuild it (update-initramfs -u -k {v} or dracut -f --kver {v})",
                            missing.join(", "),
                            v = self.shown
                        ));
                    }
                    need.missing = missing;
                } else if self.image_absent {
                    initramfs_problem = Some(format!(
                        "it must be in the initramfs, but {}",
                        self.image_error.unwrap_or("the image is missing")
                    ));
                }
            }
            if !need.excluded_by.is_empty() && initramfs_problem.is_none() && !builtin {
                let rules: Vec<String> = need
                    .excluded_by
                    .iter()
                    .map(|e| format!("\"{}\" ({})", e.rule, e.path))
                    .collect();
                initramfs_problem = Some(format!(
                    "it must load from the initramfs, but {} keeps it out",
                    rules.join(", ")
                ));
            }
            initramfs = Some(need);
        }
        let (status, detail) = if !available {
            (
                NextStatus::NotAvailable,
                format!("{wanted_by}, but {}", self.why_missing(&name)),
            )
        } else if !blocked_by.is_empty() && !builtin {
            let rules: Vec<String> = blocked_by
                .iter()
                .map(|b| match b.line {
                    Some(l) => format!("\"{}\" ({}:{l})", b.rule, b.path),
                    None => format!("\"{}\" ({})", b.rule, b.path),
                })
                .collect();
            let new = if newly_blocked {
                " (new on that boot)"
            } else {
                ""
            };
            (
                NextStatus::Blacklisted,
                format!("{wanted_by}, but blocked by {}{new}", rules.join(", ")),
            )
        } else if let Some(p) = initramfs_problem {
            (NextStatus::NotInInitramfs, format!("{wanted_by}; {p}"))
        } else if builtin && resolved.iter().any(|m| !self.builtin_now(m)) {
            (
                NextStatus::NowBuiltin,
                format!(
                    "{wanted_by}; built into {} (a loadable module now): always there, but modprobe.d options and \
                     blacklists no longer apply to it (use {}.PARAM= on the kernel command line)",
                    self.shown,
                    resolved.first().map_or(name.as_str(), String::as_str)
                ),
            )
        } else if builtin {
            (
                NextStatus::Ok,
                format!("{wanted_by}; built into {}", self.shown),
            )
        } else {
            let img = match initramfs.as_ref().and_then(|n| n.in_image) {
                Some(true) => "; in the initramfs",
                _ => "",
            };
            (
                NextStatus::Ok,
                format!("{wanted_by}; {} has it{img}", self.shown),
            )
        };
        let detail = match (&initramfs, self.image_error, self.listing) {
            (Some(_), Some(err), None) if status == NextStatus::Ok && !builtin => {
                format!("{detail}; initramfs not checked: {err}")
            }
            _ => detail,
        };
        NextModule {
            problem: status.is_problem(),
            module: name,
            status,
            resolved,
            builtin,
            available,
            sources: want.sources,
            containers: want.containers,
            initramfs,
            blocked_by,
            newly_blocked,
            detail,
        }
    }

    /// Loaded now and asked for by nothing: lost when that kernel lacks them (another kernel
    /// only), blacklisted when a rule new on that boot blocks them.
    fn loaded_now(&self, covered: &BTreeSet<String>, running: bool) -> Vec<NextModule> {
        let Some(loaded) = self.inp.live.loaded_modules() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for m in loaded.keys().filter(|m| !covered.contains(*m)) {
            let there = self.builtin(m) || self.db.is_some_and(|db| db.contains(m));
            let (blocked_by, newly) = self.blockers(&[m]);
            let (status, detail) = if !there && !running {
                (
                    NextStatus::Lost,
                    format!(
                        "loaded now (nothing configures it: autoloaded or loaded by hand), but {}",
                        self.why_missing(m)
                    ),
                )
            } else if there && newly && !self.builtin(m) {
                let rules: Vec<String> = blocked_by
                    .iter()
                    .map(|b| format!("\"{}\" ({})", b.rule, b.path))
                    .collect();
                (
                    NextStatus::Blacklisted,
                    format!(
                        "loaded now, but on that boot {} blocks it",
                        rules.join(", ")
                    ),
                )
            } else {
                continue;
            };
            out.push(NextModule {
                module: m.clone(),
                status,
                problem: status.is_problem(),
                resolved: vec![m.clone()],
                builtin: false,
                available: there,
                sources: Vec::new(),
                containers: Vec::new(),
                initramfs: None,
                blocked_by,
                newly_blocked: newly,
                detail,
            });
        }
        out
    }

    /// Why that kernel lacks `name`, from what the running kernel's tree says about it.
    fn why_missing(&self, name: &str) -> String {
        let k = &self.shown;
        let Some(db) = self.db else {
            return format!(
                "kernel {k} has no module tree (/lib/modules/{k}): only built-ins exist on that boot"
            );
        };
        let now = self
            .inp
            .running
            .map_or("the running kernel".to_string(), |r| {
                escape_bytes(r.as_bytes())
            });
        let current = self.inp.running_db.and_then(|rdb| {
            let r = rdb.resolve_alias(name);
            r.first().and_then(|m| rdb.module(m)).cloned()
        });
        match current {
            Some(m)
                if m.path.starts_with("updates/")
                    || m.path.starts_with("extra/")
                    || m.path.contains("/dkms/") =>
            {
                format!(
                    "it is an out-of-tree module ({} in {now}'s tree) that was not built or installed for {k}: \
                 see `dkms status` or the package that ships it",
                    escape_bytes(m.path.as_bytes())
                )
            }
            Some(m) => {
                let dir = m.path.rsplit_once('/').map_or("", |(d, _)| d);
                let rdb = self.inp.running_db;
                let mut same_dir: Vec<&str> = db
                    .modules()
                    .filter(|x| x.path.rsplit_once('/').map_or("", |(d, _)| d) == dir)
                    .filter(|x| rdb.is_some_and(|r| !r.contains(&x.name)))
                    .map(|x| x.name.as_str())
                    .collect();
                same_dir.sort_unstable();
                let hint = if same_dir.is_empty() {
                    "removed from that kernel, or not packaged with it".to_string()
                } else {
                    format!(
                        "renamed? new in the same directory of {k}: {}",
                        same_dir.join(", ")
                    )
                };
                format!(
                    "kernel {k} has no module, alias or built-in of that name ({} in {now}): {hint}",
                    escape_bytes(m.path.as_bytes())
                )
            }
            None => format!(
                "kernel {k} has no module, alias or built-in of that name ({})",
                db.dir().display()
            ),
        }
    }
}

fn describe(w: &Want) -> String {
    let mut parts = Vec::new();
    if !w.sources.is_empty() {
        let list: Vec<String> = w.sources.iter().map(Source::describe).collect();
        parts.push(format!("configured in {}", list.join(", ")));
    }
    if !w.containers.is_empty() {
        let list: Vec<String> = w
            .containers
            .iter()
            .map(|c| {
                let short: String = c.id.chars().take(12).collect();
                match &c.name {
                    Some(n) if *n != c.id => format!("{n} ({} {short})", c.runtime),
                    _ => format!("{} {short}", c.runtime),
                }
            })
            .collect();
        parts.push(format!("expected by {}", list.join(", ")));
    }
    if !w.early.is_empty() {
        let list: Vec<String> = w.early.iter().map(Source::describe).collect();
        parts.push(format!("required in the initramfs by {}", list.join(", ")));
    }
    parts.join(" and ")
}

impl NextBoot {
    /// The human section.
    pub fn human(&self, heading: &str) -> String {
        let mut o = String::new();
        let k = &self.kernel;
        let version = k.kernel.version.as_deref().unwrap_or("(none found)");
        let conf = match k.kernel.confidence {
            Confidence::High => "high",
            Confidence::Medium => "medium",
            Confidence::Low => "low",
        };
        let running = if k.running {
            ", the running kernel"
        } else {
            ""
        };
        let _ = writeln!(o, "{heading}: kernel {version}{running}");
        let _ = writeln!(
            o,
            "  chosen by:    {} ({conf} confidence)",
            k.kernel.evidence
        );
        let tree = match (&k.modules_dir, &k.error) {
            (Some(d), _) => format!(
                "{d} ({} modules, {} built in)",
                k.modules.unwrap_or(0),
                k.builtin.unwrap_or(0)
            ),
            (None, Some(e)) => format!("none: {e}"),
            _ => "none".into(),
        };
        let _ = writeln!(o, "  modules:      {tree}");
        let _ = writeln!(
            o,
            "  command line: {} ({})",
            self.cmdline.as_deref().unwrap_or("(unknown)"),
            self.cmdline_source
        );
        let i = &self.initramfs;
        let must = match i.required {
            1 => "1 module must be in it".to_string(),
            n => format!("{n} modules must be in it"),
        };
        let img = if i.required == 0 {
            format!("{}; no module must be in it", i.generator.as_str())
        } else if let Some(e) = &i.error {
            format!("{}; {must}; {e}", i.generator.as_str())
        } else {
            let parts: Vec<String> = i
                .parts
                .iter()
                .map(|p| format!("{:?}", p.format).to_lowercase())
                .collect();
            format!(
                "{} ({}; {}); {must}",
                i.images.join(", "),
                i.generator.as_str(),
                parts.join(" + ")
            )
        };
        let _ = writeln!(o, "  initramfs:    {img}");
        if self.modules.is_empty() {
            o.push_str(
                "  Nothing is configured to load at boot, expected by a container or lost.\n",
            );
        } else {
            let ws = self
                .modules
                .iter()
                .map(|m| m.status.as_str().len())
                .max()
                .unwrap_or(6)
                .max(6);
            let wm = self
                .modules
                .iter()
                .map(|m| m.module.len())
                .max()
                .unwrap_or(6)
                .max(6);
            let _ = writeln!(o, "  {:<ws$}  {:<wm$}  WHY", "STATUS", "MODULE");
            for m in &self.modules {
                let _ = writeln!(
                    o,
                    "  {:<ws$}  {:<wm$}  {}",
                    m.status.as_str(),
                    m.module,
                    m.detail
                );
            }
        }
        for w in &self.warnings {
            let at = match (&w.path, w.line) {
                (Some(p), Some(l)) => format!("{p}:{l}: "),
                (Some(p), None) => format!("{p}: "),
                _ => String::new(),
            };
            let _ = writeln!(o, "  warning: {at}{}", w.message);
        }
        let _ = writeln!(o, "  {heading}: {}", self.summary.sentence());
        o
    }
}
