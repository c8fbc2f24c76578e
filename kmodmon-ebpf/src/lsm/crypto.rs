//! Crypto templates are autoloaded by the kernel's crypto manager: a task asking for
//! `pcbc(aes)` requests `crypto-pcbc(aes)` itself, then a kernel thread (`cryptomgr_probe`, in
//! the root cgroup) requests the template (`crypto-pcbc`) and whatever the instance needs. Left
//! alone, those requests are the host's. Here a task's `crypto-<alg>` request records its
//! decision under `<alg>`, and the manager's threads are judged by the decision recorded for the
//! algorithm they instantiate (their larval's name), which they pass on to what they request.
use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_current_task, bpf_ktime_get_ns, generated},
};
use kmodmon_common::{
    Counter, DecidedBy, OFFSET_UNKNOWN,
    policy::{CRYPTO_WINDOW_NS, RESTRICTED},
};

use super::{CRYPTO_REQUESTS, Scratch, lconf, read_name, walk::Applies};
use crate::{
    kernel::{read_ptr, read_u32},
    maps::count,
};

/// "crypto-" as a little-endian word (7 bytes).
const CRYPTO_PREFIX: u64 = u64::from_le_bytes(*b"crypto-\0");
const PREFIX_MASK: u64 = 0x00ff_ffff_ffff_ffff;

/// Which crypto manager thread the current task is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Manager {
    Probe,
    Test,
}

/// "cryptomgr_probe\0" and "cryptomgr_test\0\0" as two little-endian words each.
const PROBE: [u64; 2] = [
    u64::from_le_bytes(*b"cryptomg"),
    u64::from_le_bytes(*b"r_probe\0"),
];
const TEST: [u64; 2] = [
    u64::from_le_bytes(*b"cryptomg"),
    u64::from_le_bytes(*b"r_test\0\0"),
];

#[inline(always)]
fn manager() -> Option<Manager> {
    let mut comm = core::mem::MaybeUninit::<[u64; 2]>::uninit();
    // SAFETY: the helper fills all 16 bytes (TASK_COMM_LEN, NUL-padded) on success.
    if unsafe { generated::bpf_get_current_comm(comm.as_mut_ptr().cast(), 16) } < 0 {
        return None;
    }
    // SAFETY: written by the helper above.
    let w = unsafe { comm.assume_init() };
    let which = if w == PROBE {
        Manager::Probe
    } else if w == TEST {
        Manager::Test
    } else {
        return None;
    };
    // Only a kernel thread is the crypto manager (a task may call itself anything).
    let task = unsafe { bpf_get_current_task() };
    let flags = read_u32(task, lconf!(task_flags))?;
    let kthread = lconf!(pf_kthread);
    if kthread == 0 || flags & kthread == 0 {
        return None;
    }
    Some(which)
}

/// Reads the name of the algorithm the current crypto manager thread works on into `s.alg`.
#[inline(always)]
fn manager_alg(s: &mut Scratch, which: Manager) -> Option<()> {
    let task = unsafe { bpf_get_current_task() };
    let kthread = read_ptr(task, lconf!(task_worker_private))?;
    let data = read_ptr(kthread, lconf!(kthread_data))?;
    let name = match which {
        Manager::Probe => {
            let larval = read_ptr(data, lconf!(cryptomgr_param_larval))?;
            let off = lconf!(crypto_larval_name);
            if larval == 0 || off == OFFSET_UNKNOWN {
                return None;
            }
            larval + off as u64
        }
        Manager::Test => {
            let off = lconf!(crypto_test_param_alg);
            if data == 0 || off == OFFSET_UNKNOWN {
                return None;
            }
            data + off as u64
        }
    };
    let (named, _) = read_name(name, &mut s.alg, false);
    named.then_some(())
}

/// Reads the algorithm of a `crypto-<alg>` request (at `request`, kernel memory) into
/// `s.alg`; false for other requests.
#[inline(always)]
fn requested_alg(s: &mut Scratch, request: u64) -> bool {
    // The request lies in a MODULE_NAME_LEN buffer (__request_module): 8 bytes are readable.
    let raw = match read_ptr(request, 0) {
        Some(w) => w,
        None => return false,
    };
    if raw & PREFIX_MASK != CRYPTO_PREFIX {
        return false;
    }
    read_name(request + 7, &mut s.alg, false).0
}

/// For an autoload request: when the current task is a crypto manager thread working for an
/// algorithm a task asked for within [`CRYPTO_WINDOW_NS`], `a` becomes that task's decision.
/// Then, for a `crypto-<alg>` request, the decision in force is recorded under `<alg>` for the
/// threads that will instantiate it (a restricted decision is not replaced by an unrestricted
/// one within the window: when a restricted task and another ask for the same algorithm at
/// once, the manager's threads are restricted).
#[inline(always)]
pub fn inherit_and_record(s: &mut Scratch, a: &mut Applies, request: u64) {
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(which) = manager()
        && manager_alg(s, which).is_some()
        // SAFETY: map values are valid for the program's run.
        && let Some(origin) = unsafe { CRYPTO_REQUESTS.get(&s.alg) }
        && now.wrapping_sub(origin.ktime_ns) < CRYPTO_WINDOW_NS
    {
        a.decision = origin.decision;
        a.ceiling = origin.ceiling;
        a.how = DecidedBy::CryptoRequester as u32;
        a.at = origin.cgroup_id;
        count(Counter::LsmCryptoInherited);
    }
    if !requested_alg(s, request) {
        return;
    }
    let restricted = a.restricted();
    // SAFETY: as above.
    if !restricted
        && let Some(old) = unsafe { CRYPTO_REQUESTS.get(&s.alg) }
        && now.wrapping_sub(old.ktime_ns) < CRYPTO_WINDOW_NS
        && (old.decision.flags | old.ceiling.flags) & RESTRICTED != 0
    {
        return;
    }
    let cgroup_id = if a.how == DecidedBy::CryptoRequester as u32 {
        a.at
    } else {
        unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() }
    };
    s.origin.decision = a.decision;
    s.origin.ceiling = a.ceiling;
    s.origin.cgroup_id = cgroup_id;
    s.origin.ktime_ns = now;
    if CRYPTO_REQUESTS
        .insert(&s.alg, &s.origin, BPF_ANY as u64)
        .is_err()
    {
        count(Counter::LsmCryptoRecordFailed);
    }
}
