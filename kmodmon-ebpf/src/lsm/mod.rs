//! Policy enforcement: BPF LSM programs on the hooks every module load goes through.
//!
//! - `kernel_module_request(char *kmod_name)`: an autoload request, in the requesting task
//!   (or in the crypto manager's thread working for it, see [`crypto`]); named by the request;
//! - `kernel_read_file(struct file *, enum kernel_read_file_id, bool)` with READING_MODULE:
//!   finit_module is about to read its file. The file is stashed for the later hooks; the
//!   decision waits for the bytes (only without `kernel_post_read_file` is the file's name
//!   judged here);
//! - `kernel_post_read_file(struct file *, char *buf, loff_t, enum kernel_read_file_id)`: the
//!   bytes the kernel read. An ELF image is named from its `struct module` ([`image`]), cross-
//!   checked with `.modinfo`'s `name=` and with the file's name: in a restricted cgroup any
//!   mismatch is denied. A compressed file (the kernel decompresses it later) cannot be named
//!   here: it goes on to `kernfs_init_security` — unless it carries parameters, whose handlers
//!   (module code) the kernel runs before that hook: then a restricted cgroup is refused;
//! - `kernel_load_data(enum kernel_load_data_id, bool)` with LOADING_MODULE: init_module from
//!   memory, which carries no name yet: where the kernel has the next hook the decision waits
//!   for it; else only an unrestricted cgroup may do it;
//! - `kernel_post_load_data(char *buf, loff_t size, enum kernel_load_data_id, char *)`: the
//!   init_module image, named as above;
//! - `kernfs_init_security(struct kernfs_node *dir, struct kernfs_node *kn)`: the kernel makes
//!   `/sys/module/<name>` for a module it is loading — after decompression and the signature
//!   check, before the module's init runs — with the module's own name. Every load path goes
//!   through it; a denial here reaches the loader as ENOMEM (kernfs turns any error into it).
//!
//! What applies to the task: [`walk`]. In enforce mode a denial returns an error and sends a
//! `denied` record; in audit mode the same decision sends `would_deny` and returns 0. These
//! maps, the counters and the record ring are pinned with the programs' links, so the policy
//! keeps holding, and counting, while kmodmon is down.
// Map keys and values are passed as references into the per-CPU scratch map: by value they
// would be copied onto the 512-byte BPF stack.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values stay in map memory; by value they would be copied onto the BPF stack"
)]

mod crypto;
mod image;
mod walk;
mod words;

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_task_pt_regs,
    },
    macros::{lsm, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::LsmContext,
};
use kmodmon_common::{
    Counter, EventKind, NAME_LEN, NamedBy, OFFSET_UNKNOWN, Op, PARAMS_LEN, Source,
    policy::{
        ACK_SLOTS, AllowKey, CRYPTO_NAME_LEN, CryptoOrigin, Decision, LoadStash, LsmConfig,
        MODE_AUDIT, MODE_ENFORCE, MODE_OFF, MODINFO_TAIL, NAME_KEY_LEN, PREFIX_RULES, ParentKey,
        PrefixRule, RESTRICTED, STASH_WINDOW_NS, Settings,
    },
    trunc,
};

use self::{
    image::{Image, name_image},
    walk::{Applies, current_decision},
};
use crate::{
    config::conf,
    kernel::{file_path, read_kernel_str, read_ptr},
    maps::count,
    record::{begin, emit},
};

const EPERM: i32 = 1;

const _: () = {
    use core::mem::offset_of;
    use kmodmon_common::RawEvent;
    assert!(NAME_KEY_LEN <= NAME_LEN && NAME_KEY_LEN <= PARAMS_LEN);
    assert!(offset_of!(RawEvent, name) % 4 == 0 && offset_of!(RawEvent, params) % 4 == 0);
};
const ENOMEM: i64 = 12;

/// Values from BTF, set by userspace before load (see [`LsmConfig`]).
#[unsafe(no_mangle)]
pub static KMODMON_LSM_CONFIG: LsmConfig = LsmConfig::DEFAULT;

/// Reads one [`KMODMON_LSM_CONFIG`] field (volatile: the real values are set at load time).
macro_rules! lconf {
    ($field:ident) => {
        // SAFETY: a read-only global, valid for the program's life.
        unsafe { core::ptr::read_volatile(&$crate::lsm::KMODMON_LSM_CONFIG.$field) }
    };
}
pub(crate) use lconf;

/// cgroup id → what applies to it and the cgroups below it; key 0 = the host, key
/// `UNSELECTED_KEY` = containers not mapped (yet).
#[map]
pub static POLICY_CGROUPS: HashMap<u64, Decision> = HashMap::with_max_entries(16384, 0);

/// (allow-set, normalized name) → 1.
#[map]
pub static POLICY_ALLOW: HashMap<AllowKey, u32> = HashMap::with_max_entries(16384, 0);

/// Slot 0: mode and generation.
#[map]
pub static POLICY_SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Container parents by (parent cgroup id, name) → 1.
#[map]
pub static POLICY_PARENTS: HashMap<ParentKey, u32> = HashMap::with_max_entries(64, 0);

/// Names that mark a container cgroup at any depth.
#[map]
pub static POLICY_PREFIXES: Array<PrefixRule> = Array::with_max_entries(PREFIX_RULES, 0);

/// What a kmodmon already reported of the counters (written by userspace only).
#[map]
pub static POLICY_ACK: Array<u64> = Array::with_max_entries(ACK_SLOTS, 0);

/// Slot 0: the [`kmodmon_common::CONTRACT_VERSION`] of the programs pinned with these maps,
/// written by userspace once they are in place (the programs do not read it).
#[map]
pub static CONTRACT: Array<u32> = Array::with_max_entries(1, 0);

/// Algorithm name → the decision of the task that asked for it (see [`crypto`]).
#[map]
pub static CRYPTO_REQUESTS: LruHashMap<[u8; CRYPTO_NAME_LEN], CryptoOrigin> =
    LruHashMap::with_max_entries(1024, 0);

/// pid_tgid → a load's decision and file, for the hooks after its first one.
#[map]
pub static LOAD_STASH: LruHashMap<u64, LoadStash> = LruHashMap::with_max_entries(1024, 0);

/// Bytes of the cgroup name buffer (a power of two: offsets into it are masked).
pub const CGROUP_NAME_BUF: usize = 128;

/// Per-CPU working space (the BPF stack has 512 bytes). The name buffers are 4-byte aligned
/// (see [`words`]); the cgroup name is first, so 8-byte aligned.
#[repr(C)]
pub struct Scratch {
    /// The cgroup name being matched against the name rules.
    pub name: [u8; CGROUP_NAME_BUF],
    /// The end of `.modinfo`.
    pub tail: [u8; MODINFO_TAIL as usize],
    pub parent: ParentKey,
    pub origin: CryptoOrigin,
    pub stash: LoadStash,
    // The walk's state.
    pub decision: Decision,
    pub ceiling: Decision,
    pub at: u64,
    /// Positions found in loops (kept in map memory, see `image::Sections`).
    pub pos: u64,
    pub found: [u64; 2],
    /// An image's size during the section loops.
    pub depth_size: u64,
    pub how: u32,
    /// The task's cgroup level during the walk.
    pub depth: u32,
    /// The judged name (normalized) and the allow-set it is looked up in.
    pub key: AllowKey,
    /// `.modinfo`'s `name=`.
    pub alt: [u8; NAME_KEY_LEN],
    /// The file's name up to its first '.', normalized.
    pub stem: [u8; NAME_KEY_LEN],
    /// An algorithm name (crypto requests).
    pub alg: [u8; CRYPTO_NAME_LEN],
}

const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Scratch, key) % 4 == 0);
    assert!(offset_of!(Scratch, alt) % 4 == 0);
    assert!(offset_of!(Scratch, stem) % 4 == 0);
    assert!(offset_of!(Scratch, alg) % 4 == 0);
    assert!(offset_of!(Scratch, parent) % 8 == 0);
};

#[map]
pub static LSM_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: per-CPU slot, exclusive to this program invocation.
    LSM_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Whether `s.key.name` may load under `d`.
#[inline(always)]
fn allowed_by(d: &Decision, s: &mut Scratch) -> bool {
    if d.flags & RESTRICTED == 0 {
        return true;
    }
    s.key.set = d.allow_set;
    POLICY_ALLOW.get_ptr(&s.key).is_some()
}

/// Whether `s.key.name` may load under `a` (its decision and the ceiling that caps it).
#[inline(always)]
fn allowed(a: &Applies, s: &mut Scratch, named: bool) -> bool {
    if !a.restricted() {
        return true;
    }
    named && allowed_by(&a.decision, s) && allowed_by(&a.ceiling, s)
}

/// Reads the NUL-terminated kernel string at `src` into `buf`, everything past it cleared,
/// '-' → '_' with `normalize`. `(named, cut)`: a non-empty name was read; it was cut to fit.
#[inline(always)]
fn read_name<const B: usize>(src: u64, buf: &mut [u8; B], normalize: bool) -> (bool, bool) {
    match read_kernel_str(src, buf) {
        Some((len, cut)) => {
            words::cut(buf, false, normalize);
            (len > 0, cut)
        }
        None => {
            words::zero(buf);
            (false, false)
        }
    }
}

/// The file's name up to its first '.', normalized, into `s.stem`; false when unreadable.
#[inline(always)]
fn file_stem(s: &mut Scratch, file: u64) -> bool {
    let leaf = add(conf!(file_f_path), conf!(path_dentry))
        .and_then(|off| read_ptr(file, off))
        .zip(add(conf!(dentry_d_name), conf!(qstr_name)))
        .and_then(|(dentry, off)| read_ptr(dentry, off));
    let Some((len, _)) = leaf.and_then(|p| read_kernel_str(p, &mut s.stem)) else {
        words::zero(&mut s.stem);
        return false;
    };
    words::cut(&mut s.stem, true, true);
    len > 0
}

#[inline(always)]
fn add(a: u32, b: u32) -> Option<u32> {
    if a == OFFSET_UNKNOWN || b == OFFSET_UNKNOWN {
        return None;
    }
    a.checked_add(b)
}

/// What a denied / would_deny record says besides the decision.
struct Report {
    op: Op,
    named_by: NamedBy,
    /// lsm flag bits.
    flags: u32,
    /// The name in `s.key.name` was cut.
    cut: bool,
    /// finit_module's file (0: none).
    file: u64,
    /// What the loader sees when enforced (negative errno).
    errno: i64,
    /// Copy `s.alt` into the record's second-name field.
    alt: bool,
}

impl Report {
    const fn new(op: Op, named_by: NamedBy) -> Report {
        Report {
            op,
            named_by,
            flags: 0,
            cut: false,
            file: 0,
            errno: -(EPERM as i64),
            alt: false,
        }
    }
}

/// Sends the denied / would_deny record and returns the hook's verdict.
#[inline(always)]
fn report(a: &Applies, s: &Scratch, r: &Report) -> i32 {
    let enforce = a.enforce;
    let kind = if enforce {
        EventKind::Denied
    } else {
        EventKind::WouldDeny
    };
    let ret = if enforce { -EPERM } else { 0 };
    if let Some(ev) = begin(kind, Source::Lsm) {
        ev.op = r.op as u32;
        ev.rule_id = a.decision.rule;
        ev.policy_generation = a.generation;
        ev.ret = if enforce { r.errno } else { 0 };
        ev.decided_by = a.how;
        ev.decided_at = a.at;
        ev.named_by = r.named_by as u32;
        ev.lsm_flags = if a.ceiling.flags & RESTRICTED != 0 {
            r.flags | kmodmon_common::lsm::CAPPED
        } else {
            r.flags
        };
        // SAFETY: NAME_KEY_LEN fits in the record's name and params (checked at compile
        // time below); both are at 4-byte aligned offsets of the record.
        let name: &mut [u8; NAME_KEY_LEN] = unsafe { &mut *ev.name.as_mut_ptr().cast() };
        words::copy(name, &s.key.name);
        if r.alt {
            // SAFETY: as above.
            let alt: &mut [u8; NAME_KEY_LEN] = unsafe { &mut *ev.params.as_mut_ptr().cast() };
            words::copy(alt, &s.alt);
        }
        if r.cut {
            ev.truncated |= trunc::NAME;
        }
        if r.file != 0 {
            match file_path(r.file, &mut ev.path, &mut ev.path_len) {
                Some(true) => ev.truncated |= trunc::PATH,
                Some(false) => {}
                None => ev.path_len = 0,
            }
        }
        emit(ev);
    }
    ret
}

#[lsm(hook = "kernel_module_request")]
pub fn kernel_module_request(ctx: LsmContext) -> i32 {
    let prior: i32 = ctx.arg(1);
    if prior != 0 {
        return prior;
    }
    let Some(s) = scratch() else { return 0 };
    let Some(mut a) = current_decision(s) else {
        return 0;
    };
    let name: u64 = ctx.arg(0);
    crypto::inherit_and_record(s, &mut a, name);
    let (named, cut) = read_name(name, &mut s.key.name, true);
    if allowed(&a, s, named && !cut) {
        return 0;
    }
    let mut r = Report::new(Op::None, NamedBy::Request);
    r.cut = cut;
    report(&a, s, &r)
}

/// The first hook of a module load decided `a`: keep it (and the file) for the later hooks of
/// the same load, so the cgroup walk is made once per load.
#[inline(always)]
fn stash(s: &mut Scratch, a: &Applies, file: u64) {
    walk::copy_decision(&mut s.stash.decision, &a.decision);
    walk::copy_decision(&mut s.stash.ceiling, &a.ceiling);
    s.stash.at = a.at;
    s.stash.file = file;
    s.stash.ktime_ns = unsafe { bpf_ktime_get_ns() };
    s.stash.how = a.how;
    s.stash.generation = a.generation;
    s.stash.mode = if a.enforce { MODE_ENFORCE } else { MODE_AUDIT };
    words::copy(&mut s.stash.stem, &s.stem);
    let key = bpf_get_current_pid_tgid();
    if LOAD_STASH.insert(key, &s.stash, BPF_ANY as u64).is_err() {
        count(Counter::LsmStashFailed);
    }
}

/// What the first hook of this load decided (and which file it read, into `s.stem`); when
/// it left nothing (the policy was off then: `None`), or nothing usable (a stash lost:
/// `[unselected]`, counted, fail closed).
#[inline(always)]
fn stashed(s: &mut Scratch) -> Option<(Applies, u64)> {
    stashed_or(s, true)
}

/// [`stashed`], where a missing stash is `[unselected]` (`fail_closed`, counted) or no
/// decision at all (`None`: not a load whose first hook ran).
#[inline(always)]
fn stashed_or(s: &mut Scratch, fail_closed: bool) -> Option<(Applies, u64)> {
    let key = bpf_get_current_pid_tgid();
    let fresh = match LOAD_STASH.get_ptr(key) {
        // SAFETY: map values are valid for the program's run.
        Some(p) => unsafe {
            let st = &*p;
            if bpf_ktime_get_ns().wrapping_sub(st.ktime_ns) < STASH_WINDOW_NS {
                walk::copy_decision(&mut s.decision, &st.decision);
                walk::copy_decision(&mut s.ceiling, &st.ceiling);
                s.at = st.at;
                s.how = st.how;
                words::copy(&mut s.stem, &st.stem);
                Some((st.file, st.generation, st.mode))
            } else {
                None
            }
        },
        None => None,
    };
    let settings = POLICY_SETTINGS.get(0)?;
    // SAFETY: as above.
    let mode_now = unsafe { core::ptr::read_volatile(&settings.mode) };
    let (file, generation, mode) = match fresh {
        Some(f) => f,
        None if mode_now == MODE_OFF || !fail_closed => return None,
        None => {
            count(Counter::LsmStashMissed);
            walk::set_unselected(s);
            words::zero(&mut s.stem);
            // SAFETY: as above.
            (
                0,
                unsafe { core::ptr::read_volatile(&settings.generation) },
                mode_now,
            )
        }
    };
    if mode == MODE_OFF {
        return None;
    }
    Some((
        Applies {
            decision: s.decision,
            ceiling: s.ceiling,
            how: s.how,
            at: s.at,
            enforce: mode == MODE_ENFORCE,
            generation,
        },
        file,
    ))
}

#[lsm(hook = "kernel_read_file")]
pub fn kernel_read_file(ctx: LsmContext) -> i32 {
    let prior: i32 = ctx.arg(3);
    if prior != 0 {
        return prior;
    }
    let id: u32 = ctx.arg(1);
    if id != lconf!(reading_module) {
        return 0;
    }
    let Some(s) = scratch() else { return 0 };
    let Some(a) = current_decision(s) else {
        return 0;
    };
    let file: u64 = ctx.arg(0);
    let named = file_stem(s, file);
    if lconf!(name_files) == 1 || lconf!(name_kernfs) == 1 {
        stash(s, &a, file);
    }
    if lconf!(name_files) == 1 || !a.restricted() {
        // kernel_post_read_file decides, with the module's name from the bytes read.
        return 0;
    }
    // No later hook on this kernel: the file's name is all there is.
    words::copy(&mut s.key.name, &s.stem);
    if allowed(&a, s, named) {
        return 0;
    }
    let mut r = Report::new(Op::FinitModule, NamedBy::File);
    r.file = file;
    report(&a, s, &r)
}

/// Whether the current finit_module call passes a non-empty parameter string (true when that
/// cannot be read: fail closed).
#[inline(always)]
fn finit_has_params() -> bool {
    let (nr_off, arg_off) = (lconf!(pt_regs_nr), lconf!(pt_regs_arg1));
    if nr_off == OFFSET_UNKNOWN || arg_off == OFFSET_UNKNOWN {
        return true;
    }
    // SAFETY: helpers on the current task; the returned registers are read with
    // bpf_probe_read_kernel, which validates the address.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    if regs == 0 {
        return true;
    }
    let nr = image::read_at::<u64>(regs + nr_off as u64);
    if nr != Some(lconf!(nr_finit_module) as u64) {
        return true;
    }
    let Some(uargs) = image::read_at::<u64>(regs + arg_off as u64) else {
        return true;
    };
    if uargs == 0 {
        return false;
    }
    // SAFETY: bpf_probe_read_user validates the user address.
    !matches!(unsafe { bpf_probe_read_user(uargs as *const u8) }, Ok(0))
}

#[lsm(hook = "kernel_post_read_file")]
pub fn kernel_post_read_file(ctx: LsmContext) -> i32 {
    let prior: i32 = ctx.arg(4);
    if prior != 0 {
        return prior;
    }
    let id: u32 = ctx.arg(3);
    if id != lconf!(reading_module) {
        return 0;
    }
    let Some(s) = scratch() else { return 0 };
    let Some((a, _)) = stashed(s) else {
        return 0;
    };
    if !a.restricted() {
        return 0;
    }
    let file: u64 = ctx.arg(0);
    let buf: u64 = ctx.arg(1);
    let size: u64 = ctx.arg(2);
    let mut r = Report::new(Op::FinitModule, NamedBy::Image);
    r.file = file;
    // The stem came with the stash (an empty one if the file could not be named).
    let have_stem = s.stem[0] != 0;
    // One report below for every denial: each call site would be verified on its own.
    match name_image(s, buf, size, lconf!(module_name)) {
        Image::NotElf if lconf!(name_kernfs) == 1 => {
            // A compressed file: the kernel names it only after decompressing, in
            // kernfs_init_security — but runs its parameter handlers (module code) before.
            if !finit_has_params() {
                return 0;
            }
            r.flags |= kmodmon_common::lsm::COMPRESSED_WITH_PARAMS;
            r.named_by = NamedBy::Unnamed;
            words::copy(&mut s.key.name, &s.stem);
        }
        Image::NotElf => {
            // Nothing on this kernel names it: the file's name is all there is.
            words::copy(&mut s.key.name, &s.stem);
            r.named_by = NamedBy::File;
            if allowed(&a, s, have_stem) {
                return 0;
            }
        }
        Image::Unnamed => {
            r.named_by = NamedBy::Unnamed;
            words::copy(&mut s.key.name, &s.stem);
        }
        Image::Named { modinfo } => {
            if modinfo && !words::same(&s.alt, &s.key.name) {
                r.flags |= kmodmon_common::lsm::MODINFO_MISMATCH;
                r.alt = true;
            }
            if !have_stem || !words::same(&s.stem, &s.key.name) {
                r.flags |= kmodmon_common::lsm::NAME_MISMATCH;
            }
            if r.flags == 0 && allowed(&a, s, true) {
                return 0;
            }
        }
    }
    report(&a, s, &r)
}

#[lsm(hook = "kernel_load_data")]
pub fn kernel_load_data(ctx: LsmContext) -> i32 {
    let prior: i32 = ctx.arg(2);
    if prior != 0 {
        return prior;
    }
    let id: u32 = ctx.arg(0);
    if id != lconf!(loading_module) {
        return 0;
    }
    let Some(s) = scratch() else { return 0 };
    let Some(a) = current_decision(s) else {
        // Whatever an earlier load of this thread stashed is not this load.
        let _ = LOAD_STASH.remove(bpf_get_current_pid_tgid());
        return 0;
    };
    let contents: u64 = ctx.arg(1);
    if lconf!(name_images) == 1 && contents & 1 == 1 {
        // kernel_post_load_data decides, with the module's name from the image (and
        // kernfs_init_security sees no file: an init_module has none).
        words::zero(&mut s.stem);
        stash(s, &a, 0);
        return 0;
    }
    let _ = LOAD_STASH.remove(bpf_get_current_pid_tgid());
    if allowed(&a, s, false) {
        return 0;
    }
    words::zero(&mut s.key.name);
    report(&a, s, &Report::new(Op::InitModule, NamedBy::Unnamed))
}

#[lsm(hook = "kernel_post_load_data")]
pub fn kernel_post_load_data(ctx: LsmContext) -> i32 {
    let prior: i32 = ctx.arg(4);
    if prior != 0 {
        return prior;
    }
    let id: u32 = ctx.arg(2);
    if id != lconf!(loading_module) {
        return 0;
    }
    let Some(s) = scratch() else { return 0 };
    let Some((a, _)) = stashed(s) else {
        return 0;
    };
    if !a.restricted() {
        return 0;
    }
    let buf: u64 = ctx.arg(0);
    let size: u64 = ctx.arg(1);
    let mut r = Report::new(Op::InitModule, NamedBy::Image);
    match name_image(s, buf, size, lconf!(module_name)) {
        Image::NotElf | Image::Unnamed => {
            r.named_by = NamedBy::Unnamed;
            words::zero(&mut s.key.name);
        }
        Image::Named { modinfo } => {
            if modinfo && !words::same(&s.alt, &s.key.name) {
                r.flags |= kmodmon_common::lsm::MODINFO_MISMATCH;
                r.alt = true;
            }
            if r.flags == 0 && allowed(&a, s, true) {
                return 0;
            }
        }
    }
    report(&a, s, &r)
}

#[lsm(hook = "kernfs_init_security")]
pub fn kernfs_init_security(ctx: LsmContext) -> i32 {
    let prior: i32 = ctx.arg(2);
    if prior != 0 {
        return prior;
    }
    // Every kernfs node (sysfs, cgroupfs files) comes through here: leave at once unless it
    // is a directory made in /sys/module.
    let want = lconf!(sys_module_id);
    if want == 0 {
        return 0;
    }
    let dir: u64 = ctx.arg(0);
    if read_ptr(dir, lconf!(kn_id)) != Some(want) {
        return 0;
    }
    let Some(s) = scratch() else { return 0 };
    // The decision the first hook of this load made (no second cgroup walk: a program that
    // walks here exceeds 6.12's verifier budget). No stash: this directory is not made by a
    // module load a first hook saw (every load passes kernel_read_file or kernel_load_data,
    // whose failure to stash is counted there), e.g. a built-in driver's, so nothing to judge.
    let Some((a, file)) = stashed_or(s, false) else {
        return 0;
    };
    let _ = LOAD_STASH.remove(bpf_get_current_pid_tgid());
    if !a.restricted() {
        return 0;
    }
    let kn: u64 = ctx.arg(1);
    let (named, cut) = match read_ptr(kn, lconf!(kn_name)) {
        Some(p) => read_name(p, &mut s.key.name, true),
        None => {
            words::zero(&mut s.key.name);
            (false, false)
        }
    };
    let mut r = Report::new(Op::None, NamedBy::Kernel);
    r.errno = -ENOMEM;
    r.cut = cut;
    if file != 0 {
        r.op = Op::FinitModule;
        r.file = file;
        if !words::same(&s.stem, &s.key.name) {
            r.flags |= kmodmon_common::lsm::NAME_MISMATCH;
        }
    }
    if r.flags == 0 && allowed(&a, s, named && !cut) {
        return 0;
    }
    report(&a, s, &r)
}
