//! Policy enforcement: BPF LSM programs on the hooks every module load goes through.
//!
//! - `kernel_module_request(char *kmod_name)`: an autoload request, in the requesting task;
//! - `kernel_read_file(struct file *, enum kernel_read_file_id, bool)` with READING_MODULE:
//!   finit_module, named by the file's name (the module's own name is not parsed yet), e.g.
//!   `ip_vs.ko.xz`;
//! - `kernel_load_data(enum kernel_load_data_id, bool)` with LOADING_MODULE: init_module from
//!   memory, which carries no name yet: where the kernel has the next hook (5.10+), the decision
//!   waits for it; else only an unrestricted cgroup may do it;
//! - `kernel_post_load_data(char *buf, loff_t size, enum kernel_load_data_id, char *)`: the
//!   init_module image, copied into the kernel: its name is read from the `struct module` in
//!   its `.gnu.linkonce.this_module` section (kmod decompressing `.ko.xz` itself loads this way).
//!
//! The decision: the deepest ancestor of the current task's cgroup2 that userspace mapped in
//! [`POLICY_CGROUPS`] (else the host entry, key 0; else allow), then the allow-set. In enforce
//! mode a denial returns -EPERM and sends a `denied` event; in audit mode the same decision
//! sends `would_deny` and returns 0. Userspace pins these maps and the programs' links, so the
//! policy keeps holding while kmodmon is down.
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated::bpf_get_current_ancestor_cgroup_id},
    macros::{lsm, map},
    maps::{Array, HashMap},
    programs::LsmContext,
};
use kmodmon_common::{
    EventKind, NAME_LEN, OFFSET_UNKNOWN, Op, Source,
    policy::{
        AllowKey, Decision, HOST_KEY, LsmConfig, MAX_CGROUP_DEPTH, MAX_IMAGE_SECTIONS,
        MODE_ENFORCE, MODE_OFF, NAME_KEY_LEN, RESTRICTED, Settings, THIS_MODULE_SECTION,
    },
    trunc,
};

use crate::{
    config::conf,
    kernel::{file_path, read_kernel_str, read_ptr},
    record::{begin, emit},
};

const EPERM: i32 = 1;

/// `enum kernel_read_file_id` / `kernel_load_data_id` values, set by userspace before load.
#[unsafe(no_mangle)]
pub static KMODMON_LSM_CONFIG: LsmConfig = LsmConfig::DEFAULT;

/// cgroup id → what applies to it and the cgroups below it; key 0 = the host.
#[map]
pub static POLICY_CGROUPS: HashMap<u64, Decision> = HashMap::with_max_entries(16384, 0);

/// (allow-set, normalized name) → 1.
#[map]
pub static POLICY_ALLOW: HashMap<AllowKey, u32> = HashMap::with_max_entries(16384, 0);

/// Slot 0: mode and generation.
#[map]
pub static POLICY_SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Slot 0: the [`kmodmon_common::CONTRACT_VERSION`] of the programs pinned with these maps,
/// written by userspace once they are in place (the programs do not read it).
#[map]
pub static CONTRACT: Array<u32> = Array::with_max_entries(1, 0);

/// What applies to the current task.
#[derive(Clone, Copy)]
struct Applies {
    decision: Decision,
    enforce: bool,
    /// [`Settings::generation`] when the decision was read.
    generation: u32,
}

/// The decision for the current task, or None when nothing applies.
#[inline(always)]
fn current_decision() -> Option<Applies> {
    let settings = POLICY_SETTINGS.get(0)?;
    // SAFETY: the map value is valid for the program's run.
    let mode = unsafe { core::ptr::read_volatile(&settings.mode) };
    if mode == MODE_OFF {
        return None;
    }
    // SAFETY: as above.
    let generation = unsafe { core::ptr::read_volatile(&settings.generation) };
    let mut found: Option<Decision> = None;
    for level in 0..MAX_CGROUP_DEPTH {
        // SAFETY: plain helper call; 0 means "no ancestor at this level".
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        // SAFETY: map values are valid for the program's run.
        if let Some(d) = unsafe { POLICY_CGROUPS.get(id) } {
            found = Some(*d);
        }
    }
    let decision = match found {
        Some(d) => d,
        // SAFETY: as above.
        None => *unsafe { POLICY_CGROUPS.get(HOST_KEY) }?,
    };
    Some(Applies {
        decision,
        enforce: mode == MODE_ENFORCE,
        generation,
    })
}

/// Whether `name` (normalized, NUL-padded) may load under `d`.
#[inline(always)]
fn allowed(d: &Decision, key: &mut AllowKey, named: bool) -> bool {
    if d.flags & RESTRICTED == 0 {
        return true;
    }
    if !named {
        return false;
    }
    key.set = d.allow_set;
    POLICY_ALLOW.get_ptr(*key).is_some()
}

/// '-' and '_' are the same character in module names.
#[inline(always)]
fn normalize(name: &mut [u8; NAME_KEY_LEN]) {
    for b in name.iter_mut() {
        if *b == b'-' {
            *b = b'_';
        }
    }
}

#[inline(always)]
fn add_offsets(a: u32, b: u32) -> Option<u32> {
    if a == OFFSET_UNKNOWN || b == OFFSET_UNKNOWN {
        return None;
    }
    a.checked_add(b)
}

/// Sends the denied / would_deny event and returns the hook's verdict.
#[inline(always)]
fn report(a: &Applies, op: Op, key: &AllowKey, cut: bool, file: u64) -> i32 {
    let enforce = a.enforce;
    let kind = if enforce {
        EventKind::Denied
    } else {
        EventKind::WouldDeny
    };
    let ret = if enforce { -EPERM } else { 0 };
    if let Some(ev) = begin(kind, Source::Lsm) {
        ev.op = op as u32;
        ev.rule_id = a.decision.rule;
        ev.policy_generation = a.generation;
        ev.ret = ret as i64;
        let n = if NAME_KEY_LEN < NAME_LEN {
            NAME_KEY_LEN
        } else {
            NAME_LEN
        };
        // finit_module: the module name comes from the path's leaf (userspace strips ".ko...").
        if file == 0 {
            ev.name[..n].copy_from_slice(&key.name[..n]);
        }
        if cut {
            ev.truncated |= trunc::NAME;
        }
        if file != 0 {
            match file_path(file, &mut ev.path, &mut ev.path_len) {
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
    let Some(a) = current_decision() else {
        return 0;
    };
    let mut key = AllowKey {
        set: 0,
        name: [0; NAME_KEY_LEN],
    };
    let name: u64 = ctx.arg(0);
    let (named, cut) = match read_kernel_str(name, &mut key.name) {
        Some((len, cut)) => (len > 0, cut),
        None => (false, false),
    };
    normalize(&mut key.name);
    if allowed(&a.decision, &mut key, named && !cut) {
        return 0;
    }
    report(&a, Op::None, &key, cut, 0)
}

#[lsm(hook = "kernel_read_file")]
pub fn kernel_read_file(ctx: LsmContext) -> i32 {
    let prior: i32 = ctx.arg(3);
    if prior != 0 {
        return prior;
    }
    let id: u32 = ctx.arg(1);
    // SAFETY: a read-only global, valid for the program's life.
    let reading_module = unsafe { core::ptr::read_volatile(&KMODMON_LSM_CONFIG.reading_module) };
    if id != reading_module {
        return 0;
    }
    let Some(a) = current_decision() else {
        return 0;
    };
    let file: u64 = ctx.arg(0);
    let mut key = AllowKey {
        set: 0,
        name: [0; NAME_KEY_LEN],
    };
    let leaf = add_offsets(conf!(file_f_path), conf!(path_dentry))
        .and_then(|off| read_ptr(file, off))
        .zip(add_offsets(conf!(dentry_d_name), conf!(qstr_name)))
        .and_then(|(dentry, off)| read_ptr(dentry, off));
    let (named, cut) = match leaf.and_then(|p| read_kernel_str(p, &mut key.name)) {
        Some((len, cut)) => (len > 0, cut),
        None => (false, false),
    };
    // The file name is looked up as it is ("ip_vs.ko.xz"): userspace stores each allowed name
    // with the module file suffixes, which keeps this program free of loops.
    normalize(&mut key.name);
    if allowed(&a.decision, &mut key, named && !cut) {
        return 0;
    }
    report(&a, Op::FinitModule, &key, cut, file)
}

#[lsm(hook = "kernel_load_data")]
pub fn kernel_load_data(ctx: LsmContext) -> i32 {
    let prior: i32 = ctx.arg(2);
    if prior != 0 {
        return prior;
    }
    let id: u32 = ctx.arg(0);
    // SAFETY: as above.
    let loading_module = unsafe { core::ptr::read_volatile(&KMODMON_LSM_CONFIG.loading_module) };
    if id != loading_module {
        return 0;
    }
    // SAFETY: as above.
    let name_images = unsafe { core::ptr::read_volatile(&KMODMON_LSM_CONFIG.name_images) };
    let contents: u64 = ctx.arg(1);
    if name_images == 1 && contents & 1 == 1 {
        // kernel_post_load_data decides, with the module's name from the image.
        return 0;
    }
    let Some(a) = current_decision() else {
        return 0;
    };
    let mut key = AllowKey {
        set: 0,
        name: [0; NAME_KEY_LEN],
    };
    if allowed(&a.decision, &mut key, false) {
        return 0;
    }
    report(&a, Op::InitModule, &key, false, 0)
}

#[lsm(hook = "kernel_post_load_data")]
pub fn kernel_post_load_data(ctx: LsmContext) -> i32 {
    let prior: i32 = ctx.arg(4);
    if prior != 0 {
        return prior;
    }
    let id: u32 = ctx.arg(2);
    // SAFETY: as above.
    let loading_module = unsafe { core::ptr::read_volatile(&KMODMON_LSM_CONFIG.loading_module) };
    if id != loading_module {
        return 0;
    }
    let Some(a) = current_decision() else {
        return 0;
    };
    if a.decision.flags & RESTRICTED == 0 {
        return 0;
    }
    let buf: u64 = ctx.arg(0);
    let size: u64 = ctx.arg(1);
    // SAFETY: as above.
    let name_off = unsafe { core::ptr::read_volatile(&KMODMON_LSM_CONFIG.module_name) };
    let mut key = AllowKey {
        set: 0,
        name: [0; NAME_KEY_LEN],
    };
    let named = image_module_name(buf, size, name_off, &mut key.name);
    normalize(&mut key.name);
    if allowed(&a.decision, &mut key, named) {
        return 0;
    }
    report(&a, Op::InitModule, &key, false, 0)
}

/// Elf64_Ehdr and Elf64_Shdr field offsets.
const E_SHOFF: u64 = 0x28;
const E_SHNUM: u64 = 0x3c;
const E_SHSTRNDX: u64 = 0x3e;
const SHDR_SIZE: u64 = 64;
const SH_OFFSET: u64 = 0x18;
/// "\x7fELF", read as a little-endian u32.
const ELF_MAGIC: u32 = 0x464c_457f;

#[inline(always)]
fn read_at<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// The section name [`THIS_MODULE_SECTION`] as four little-endian words (the last masked to
/// its two bytes "e\0").
#[inline(always)]
fn section_words() -> [u64; 4] {
    let s = THIS_MODULE_SECTION;
    let w = |i: usize| {
        let mut b = [0u8; 8];
        let mut j = 0;
        while j < 8 {
            if i + j < s.len() {
                b[j] = s[i + j];
            }
            j += 1;
        }
        u64::from_le_bytes(b)
    };
    [w(0), w(8), w(16), w(24)]
}

/// Reads the module's name from an init_module image of `size` bytes at `buf` (kernel
/// memory): the section headers are walked for `.gnu.linkonce.this_module`, which holds the
/// module's `struct module`, whose `name` is at `name_off`. Every offset is checked against
/// `size`; false when anything does not fit.
#[inline(always)]
fn image_module_name(buf: u64, size: u64, name_off: u32, out: &mut [u8; NAME_KEY_LEN]) -> bool {
    if buf == 0 || name_off == OFFSET_UNKNOWN || size < SHDR_SIZE {
        return false;
    }
    if read_at::<u32>(buf) != Some(ELF_MAGIC) {
        return false;
    }
    let (Some(shoff), Some(shnum), Some(shstrndx)) = (
        read_at::<u64>(buf + E_SHOFF),
        read_at::<u16>(buf + E_SHNUM),
        read_at::<u16>(buf + E_SHSTRNDX),
    ) else {
        return false;
    };
    let (shnum, shstrndx) = (shnum as u64, shstrndx as u64);
    if shoff > size || shnum * SHDR_SIZE > size - shoff || shstrndx >= shnum {
        return false;
    }
    let Some(strtab) = read_at::<u64>(buf + shoff + shstrndx * SHDR_SIZE + SH_OFFSET) else {
        return false;
    };
    if strtab >= size {
        return false;
    }
    let want = section_words();
    for i in 1..MAX_IMAGE_SECTIONS as u64 {
        if i >= shnum {
            break;
        }
        let sh = buf + shoff + i * SHDR_SIZE;
        let Some(sh_name) = read_at::<u32>(sh) else {
            return false;
        };
        let at = strtab + sh_name as u64;
        if at + 32 > size {
            continue;
        }
        let Some(words) = read_at::<[u64; 4]>(buf + at) else {
            return false;
        };
        if words[0] != want[0]
            || words[1] != want[1]
            || words[2] != want[2]
            || words[3] & 0xffff != want[3]
        {
            continue;
        }
        let Some(off) = read_at::<u64>(sh + SH_OFFSET) else {
            return false;
        };
        let name_at = off.saturating_add(name_off as u64);
        if name_at.saturating_add(NAME_KEY_LEN as u64) > size {
            return false;
        }
        return matches!(read_kernel_str(buf + name_at, out), Some((len, false)) if len > 0);
    }
    false
}
