//! The task's ancestors (parent first), recorded with each event: pid, start time and comm of
//! each, so userspace can tell which process started the one that loaded a module (a
//! container runtime running an OCI hook, `runc exec`) even after they have exited.
//! Offsets from BTF: `task_struct.real_parent`, `group_leader`, `tgid`, `start_boottime`,
//! `comm`.
use kmodmon_common::{OFFSET_UNKNOWN, RawEvent};

use crate::{
    config::conf,
    kernel::{read_kernel_str, read_ptr, read_u32},
};

/// Fills `ev.ancestors` from `task` upwards; stops at pid 1 (recorded) or the idle task.
#[inline(always)]
pub fn fill(task: u64, ev: &mut RawEvent) {
    ev.ancestors_len = 0;
    let parent_off = conf!(task_real_parent);
    let leader_off = conf!(task_group_leader);
    let tgid_off = conf!(task_tgid);
    let start_off = conf!(task_start_boottime);
    let comm_off = conf!(task_comm);
    let usable = parent_off != OFFSET_UNKNOWN
        && leader_off != OFFSET_UNKNOWN
        && tgid_off != OFFSET_UNKNOWN
        && start_off != OFFSET_UNKNOWN
        && comm_off != OFFSET_UNKNOWN;
    // Cleared first, then walked with one way out: a walk that ends early leaves no
    // per-iteration branches behind for the verifier to explore (the LSM programs, which
    // share this with their own decision code, must stay far below its instruction limit).
    for a in ev.ancestors.iter_mut() {
        a.tgid = 0;
        a._reserved = 0;
        a.start_boottime_ns = 0;
        a.comm[0] = 0;
    }
    let mut cur = if usable { task } else { 0 };
    let mut n = 0u32;
    for a in ev.ancestors.iter_mut() {
        if cur == 0 {
            break;
        }
        let parent = read_ptr(cur, parent_off).unwrap_or(0);
        // real_parent may be any thread of the parent process (the one that forked): the
        // process is its thread-group leader.
        let leader = read_ptr(parent, leader_off).unwrap_or(0);
        let leader = if leader == 0 { parent } else { leader };
        let tgid = if parent == 0 || parent == cur {
            0
        } else {
            read_u32(leader, tgid_off).unwrap_or(0)
        };
        if tgid == 0 {
            break;
        }
        a.tgid = tgid;
        a.start_boottime_ns = read_ptr(leader, start_off).unwrap_or(0);
        // The helper zero-fills the buffer when the read fails: an empty comm.
        let _ = read_kernel_str(leader + comm_off as u64, &mut a.comm);
        n += 1;
        cur = if tgid == 1 { 0 } else { leader };
    }
    ev.ancestors_len = n;
}
