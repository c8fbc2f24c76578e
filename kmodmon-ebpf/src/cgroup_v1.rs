//! The current task's cgroup in one cgroup v1 hierarchy, read through BTF offsets (no helper
//! reads v1 cgroups): `task->cgroups->subsys[ssid]` is the task's css of that hierarchy's
//! controller, `css->cgroup->kn->id` its cgroup's kernfs id (the directory's inode number in
//! that hierarchy's mount), and `css->parent` the css of the parent cgroup.
//!
//! `ssid` is the controller's value in `enum cgroup_subsys_id`, which userspace resolves from
//! BTF (it differs between kernels). A named hierarchy without a controller (`name=systemd`)
//! has no css in `subsys[]` and cannot be reached this way.
//!
//! Monitor records carry [`current_id`]; enforcement on a v1-only host can decide with the
//! same walk: start at [`current_css`], look up [`css_id`] in a map keyed by v1 ids, go up with
//! [`css_parent`] (the deepest mapped ancestor wins, as the cgroup2 walk does).
use kmodmon_common::OFFSET_UNKNOWN;

use crate::{config::conf, kernel::read_ptr};

/// Whether a v1 hierarchy is configured (and every offset the walk needs is known).
#[inline(always)]
pub fn configured() -> bool {
    conf!(cgroup_v1_ssid) != OFFSET_UNKNOWN
        && conf!(task_cgroups) != OFFSET_UNKNOWN
        && conf!(css_set_subsys) != OFFSET_UNKNOWN
        && conf!(css_cgroup) != OFFSET_UNKNOWN
        && conf!(cgroup_kn) != OFFSET_UNKNOWN
        && conf!(kernfs_node_id) != OFFSET_UNKNOWN
}

/// The css of `task` in the configured v1 hierarchy.
#[inline(always)]
pub fn task_css(task: u64) -> Option<u64> {
    let ssid = conf!(cgroup_v1_ssid);
    // `subsys` is an array of CGROUP_SUBSYS_COUNT pointers; userspace checked ssid against
    // the enum, this bounds the offset arithmetic.
    if ssid >= 64 {
        return None;
    }
    let cset = read_ptr(task, conf!(task_cgroups))?;
    let css = read_ptr(cset, conf!(css_set_subsys).checked_add(ssid * 8)?)?;
    if css == 0 { None } else { Some(css) }
}

/// The current task's css in the configured v1 hierarchy.
#[inline(always)]
#[allow(
    dead_code,
    reason = "the v1 enforcement walk starts here (see the module docs); monitor records use current_id"
)]
pub fn current_css() -> Option<u64> {
    // SAFETY: plain helper call.
    task_css(unsafe { aya_ebpf::helpers::bpf_get_current_task() })
}

/// The kernfs id of the cgroup a css belongs to.
#[inline(always)]
pub fn css_id(css: u64) -> Option<u64> {
    let cgrp = read_ptr(css, conf!(css_cgroup))?;
    let kn = read_ptr(cgrp, conf!(cgroup_kn))?;
    // `u64 id` since 5.5: the inode number on 64-bit kernels.
    read_ptr(kn, conf!(kernfs_node_id)).filter(|&id| id != 0)
}

/// The css of the parent cgroup (None at the hierarchy's root).
#[inline(always)]
#[allow(
    dead_code,
    reason = "the v1 enforcement walk goes up with it (see the module docs)"
)]
pub fn css_parent(css: u64) -> Option<u64> {
    let parent = read_ptr(css, conf!(css_parent))?;
    if parent == 0 { None } else { Some(parent) }
}

/// The task's cgroup id in the configured v1 hierarchy: `Ok(None)` when none is configured,
/// `Err(())` when the read failed (counted by the readers).
#[inline(always)]
pub fn task_id(task: u64) -> Result<Option<u64>, ()> {
    if !configured() {
        return Ok(None);
    }
    task_css(task).and_then(css_id).map(Some).ok_or(())
}
