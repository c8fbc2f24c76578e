//! What applies to the current task: its cgroup and that cgroup's ancestors, root first, each
//! looked up in the policy maps (the rules are in `kmodmon_common::policy`).
//!
//! The walk state lives in the per-CPU scratch map, not in registers: the verifier does not
//! track values in map memory, so the branches of one level (entry, name rule, nothing) do not
//! multiply the states it explores at the next.
use aya_ebpf::helpers::bpf_get_current_task;
use kmodmon_common::{
    Counter, DecidedBy, OFFSET_UNKNOWN,
    policy::{
        CONTAINER, Decision, EMPTY_SET, HOST_KEY, MAX_CGROUP_DEPTH, MODE_ENFORCE, MODE_OFF,
        PARENT_NAME_LEN, PREFIX_ID64, PREFIX_NAMED, PREFIX_RULES, PREFIX_UNUSED, RESTRICTED,
        SCOPE_MASK, SCOPE_WORD, UNSELECTED_KEY, byte_mask,
    },
};

use super::{
    CGROUP_NAME_BUF, POLICY_CGROUPS, POLICY_PARENTS, POLICY_PREFIXES, POLICY_SETTINGS, Scratch,
    lconf, words::u64_at,
};
use crate::{
    kernel::{read_kernel_str, read_ptr, read_u32},
    maps::count,
};

/// What applies to the current task (a copy out of the scratch map).
#[derive(Clone, Copy)]
pub struct Applies {
    pub decision: Decision,
    /// An enclosing container's decision that caps `decision` (not RESTRICTED: no cap).
    pub ceiling: Decision,
    pub how: u32,
    /// The cgroup whose entry or name decided (0: the host entry).
    pub at: u64,
    pub enforce: bool,
    /// [`kmodmon_common::policy::Settings::generation`] when the decision was read.
    pub generation: u32,
}

impl Applies {
    /// Whether any name could be refused.
    #[inline(always)]
    pub fn restricted(&self) -> bool {
        (self.decision.flags | self.ceiling.flags) & RESTRICTED != 0
    }
}

/// Copies a decision field by field (a struct copy would become a memcpy call).
#[inline(always)]
pub fn copy_decision(dst: &mut Decision, src: &Decision) {
    // SAFETY: valid, exclusive references; volatile keeps the stores apart.
    unsafe {
        core::ptr::write_volatile(&mut dst.rule, core::ptr::read_volatile(&src.rule));
        core::ptr::write_volatile(&mut dst.allow_set, core::ptr::read_volatile(&src.allow_set));
        core::ptr::write_volatile(&mut dst.flags, core::ptr::read_volatile(&src.flags));
        core::ptr::write_volatile(&mut dst._reserved, 0);
    }
}

/// Sets a decision that allows everything (no entry, no cap).
#[inline(always)]
fn clear_decision(dst: &mut Decision) {
    // SAFETY: as above.
    unsafe {
        core::ptr::write_volatile(&mut dst.rule, 0);
        core::ptr::write_volatile(&mut dst.allow_set, 0);
        core::ptr::write_volatile(&mut dst.flags, 0);
        core::ptr::write_volatile(&mut dst._reserved, 0);
    }
}

/// `s.decision` := `[unselected]`; restricted with nothing allowed when its entry is missing
/// (fail closed).
#[inline(always)]
fn unselected_into(s: &mut Scratch) {
    // SAFETY: map values are valid for the program's run.
    match unsafe { POLICY_CGROUPS.get(UNSELECTED_KEY) } {
        Some(d) => copy_decision(&mut s.decision, d),
        // SAFETY: as above.
        None => unsafe {
            core::ptr::write_volatile(&mut s.decision.rule, 1);
            core::ptr::write_volatile(&mut s.decision.allow_set, EMPTY_SET);
            core::ptr::write_volatile(&mut s.decision.flags, RESTRICTED);
        },
    }
}

/// The state of a load whose first hook's decision is lost: `[unselected]`, uncapped.
#[inline(always)]
pub fn set_unselected(s: &mut Scratch) {
    unselected_into(s);
    clear_decision(&mut s.ceiling);
    s.how = DecidedBy::ContainerName as u32;
    s.at = 0;
}

/// The current task's cgroup (`struct cgroup *`) in the hierarchy the policy is keyed by:
/// cgroup2, `task->cgroups->dfl_cgrp`. This is the one place that picks the hierarchy: a cgroup
/// v1 variant (`task->cgroups->subsys[ssid]->cgroup`) slots in here, and everything after it
/// works on a `struct cgroup *` the same way (level, ancestors, kernfs node id and name).
#[inline(always)]
fn task_cgroup() -> Option<u64> {
    let task = unsafe { bpf_get_current_task() };
    let cset = read_ptr(task, lconf!(task_cgroups))?;
    let cg = read_ptr(cset, lconf!(css_set_dfl_cgrp))?;
    if cg == 0 { None } else { Some(cg) }
}

/// The `level`-th ancestor of `cg` (0: the root; `cg`'s own level: itself).
#[inline(always)]
fn ancestor(cg: u64, level: u32) -> Option<u64> {
    let base = lconf!(cgroup_ancestors);
    if base == OFFSET_UNKNOWN {
        return None;
    }
    let p = read_ptr(cg, base.checked_add(level.checked_mul(8)?)?)?;
    if p == 0 { None } else { Some(p) }
}

/// Reads the decision for the current task into `s` and returns a copy; `None` when the
/// policy is off.
#[inline(always)]
pub fn current_decision(s: &mut Scratch) -> Option<Applies> {
    let settings = POLICY_SETTINGS.get(0)?;
    // SAFETY: the map value is valid for the program's run.
    let mode = unsafe { core::ptr::read_volatile(&settings.mode) };
    if mode == MODE_OFF {
        return None;
    }
    // SAFETY: as above.
    let generation = unsafe { core::ptr::read_volatile(&settings.generation) };
    // SAFETY: as above.
    match unsafe { POLICY_CGROUPS.get(HOST_KEY) } {
        Some(d) => copy_decision(&mut s.decision, d),
        None => clear_decision(&mut s.decision),
    }
    clear_decision(&mut s.ceiling);
    s.how = DecidedBy::Host as u32;
    s.at = 0;
    if walk(s).is_none() {
        // The task's cgroup could not be read: fail closed.
        count(Counter::LsmCgroupUnreadable);
        set_unselected(s);
    }
    Some(Applies {
        decision: s.decision,
        ceiling: s.ceiling,
        how: s.how,
        at: s.at,
        enforce: mode == MODE_ENFORCE,
        generation,
    })
}

/// The walk from the root's child down to the task's cgroup (at most [`MAX_CGROUP_DEPTH`]
/// levels). `None` when a read failed.
#[inline(always)]
fn walk(s: &mut Scratch) -> Option<()> {
    let cg = task_cgroup()?;
    let level_off = lconf!(cgroup_level);
    let level = read_u32(cg, level_off)?;
    let kn_off = lconf!(cgroup_kn);
    let id_off = lconf!(kn_id);
    let root = ancestor(cg, 0)?;
    let root_kn = read_ptr(root, kn_off)?;
    s.parent.parent = read_ptr(root_kn, id_off)?;
    // The loop never leaves early (see `image::Sections`): the level goes through map memory
    // and is read afresh each iteration, levels past it are skipped, a failed read is noted
    // in map memory and judged after the loop.
    // SAFETY: valid, exclusive fields of the scratch map.
    unsafe {
        core::ptr::write_volatile(&mut s.depth, level);
        core::ptr::write_volatile(&mut s.pos, 0);
    }
    for i in 1..=MAX_CGROUP_DEPTH {
        // SAFETY: as above.
        let level = unsafe { core::ptr::read_volatile(&s.depth) };
        if i > level {
            continue;
        }
        let Some(id) = ancestor(cg, i)
            .and_then(|anc| read_ptr(anc, kn_off))
            .and_then(|kn| read_ptr(kn, id_off).map(|id| (kn, id)))
        else {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(&mut s.pos, 1) };
            continue;
        };
        let (kn, id) = id;
        // SAFETY: map values are valid for the program's run.
        if let Some(d) = unsafe { POLICY_CGROUPS.get(id) } {
            copy_decision(&mut s.decision, d);
            clear_decision(&mut s.ceiling);
            s.how = if i == level {
                DecidedBy::OwnEntry as u32
            } else {
                DecidedBy::EnclosingEntry as u32
            };
            s.at = id;
        } else if let Some(how) = name_rule(s, kn) {
            count(Counter::LsmNameRule);
            // SAFETY: a valid, exclusive reference into the scratch map.
            let from_entry = unsafe { core::ptr::read_volatile(&s.decision.flags) } & CONTAINER;
            if from_entry != 0 {
                let d: *const Decision = &s.decision;
                // SAFETY: `decision` and `ceiling` are distinct fields of the scratch map.
                copy_decision(&mut s.ceiling, unsafe { &*d });
            }
            unselected_into(s);
            s.how = how;
            s.at = id;
        }
        s.parent.parent = id;
    }
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(&s.pos) } != 0 {
        return None;
    }
    Some(())
}

/// Whether the cgroup of kernfs node `kn` is a container parent ([`POLICY_PARENTS`], keyed by
/// the parent id already in `s.parent`) or named like a container ([`POLICY_PREFIXES`]).
#[inline(always)]
fn name_rule(s: &mut Scratch, kn: u64) -> Option<u32> {
    let name_ptr = read_ptr(kn, lconf!(kn_name))?;
    // Not zeroed first: every byte past the name is masked off below.
    let (len, cut) = read_kernel_str(name_ptr, &mut s.name)?;
    if len == 0 || cut {
        // Empty, or longer than any name the rules describe.
        return None;
    }
    let mask = |i: usize| -> u64 {
        let start = 8 * i;
        if len <= start {
            0
        } else {
            byte_mask((len - start) as u32)
        }
    };
    let words = [
        u64_at(&s.name, 0) & mask(0),
        u64_at(&s.name, 8) & mask(1),
        u64_at(&s.name, 16) & mask(2),
    ];
    if len < PARENT_NAME_LEN {
        let p: *mut u64 = s.parent.name.as_mut_ptr().cast();
        // SAFETY: the parent key's name is PARENT_NAME_LEN (32) bytes, 8-byte aligned (it
        // follows a u64); volatile keeps the stores from becoming a memcpy.
        unsafe {
            core::ptr::write_volatile(p, words[0]);
            core::ptr::write_volatile(p.add(1), words[1]);
            core::ptr::write_volatile(p.add(2), words[2]);
            core::ptr::write_volatile(p.add(3), u64_at(&s.name, 24) & mask(3));
        }
        if POLICY_PARENTS.get_ptr(&s.parent).is_some() {
            return Some(DecidedBy::ContainerParent as u32);
        }
    }
    for r in 0..PREFIX_RULES {
        let Some(rule) = POLICY_PREFIXES.get(r) else {
            break;
        };
        if rule.kind == PREFIX_UNUSED || !rule.prefix_matches(&words) {
            continue;
        }
        let plen = rule.len as usize;
        if rule.kind == PREFIX_ID64 {
            if len == plen + 64 || (len == plen + 70 && scope_at(s, plen + 64)) {
                return Some(DecidedBy::ContainerName as u32);
            }
        } else if rule.kind == PREFIX_NAMED && len > plen {
            if rule.scope == 1 && (len < plen + 7 || !scope_at(s, len - 6)) {
                continue;
            }
            let ex = rule.exclude_len;
            if ex > 0
                && len >= plen + ex as usize
                && u64_at(&s.name, plen) & byte_mask(ex) == rule.exclude
            {
                continue;
            }
            return Some(DecidedBy::ContainerName as u32);
        }
    }
    None
}

/// Whether `.scope` and the NUL stand at `at` in the name buffer.
#[inline(always)]
fn scope_at(s: &Scratch, at: usize) -> bool {
    u64_at(&s.name, at & (CGROUP_NAME_BUF - 1)) & SCOPE_MASK == SCOPE_WORD
}
