//! Module identity: copies the exact image the kernel received to userspace, where kmodmon
//! hashes it (SHA-256) and reads its `.modinfo` and signature trailer.
//!
//! - fentry `load_module(struct load_info *info, ...)`: every load that got as far as the
//!   kernel parsing an image: finit_module (the file's bytes as read; on kernels that
//!   decompress, `info->hdr` is already the decompressed image) and init_module (the user
//!   buffer, copied into the kernel);
//! - fentry `security_kernel_post_load_data(buf, size, id, desc)`: init_module images before
//!   the LSMs decide, so a denied init_module still has its identity; load_module then skips
//!   the same buffer (the [`IMAGE_CAPTURED`] map);
//! - raw tracepoint `module_load(struct module *)`: the kernel's signature verdict
//!   (`mod->sig_ok`) and the module's taints.
//!
//! Every capture that cannot send the whole image says why in its header and is counted.
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_ktime_get_ns, generated,
    },
    macros::{fentry, map, raw_tracepoint},
    maps::{LruHashMap, RingBuf},
    programs::{FEntryContext, RawTracePointContext},
};
use kmodmon_common::{
    Counter, OFFSET_UNKNOWN,
    identity::{
        IMAGE_CHUNK_LEN, IMAGE_MAX_CHUNKS, IdentityConfig, ImageChunk, ImageHeader, ImageVerdict,
        SIG_OK_UNKNOWN, VERDICT_NAME_LEN, image_kind, image_status, image_via,
    },
};

use crate::{
    kernel::{read_kernel_str, read_ptr, read_u32},
    maps::count,
};

/// Filled in by userspace before load.
#[unsafe(no_mangle)]
pub static KMODMON_IDENTITY_CONFIG: IdentityConfig = IdentityConfig::UNSET;

macro_rules! iconf {
    ($field:ident) => {
        // SAFETY: a read-only global, valid for the program's life.
        unsafe { core::ptr::read_volatile(&KMODMON_IDENTITY_CONFIG.$field) }
    };
}

/// Images on their way to userspace. Declared with one page: userspace sets the real size
/// (`EbpfLoader::map_max_entries`) when it attaches the identity programs.
#[map]
pub static IMAGES: RingBuf = RingBuf::with_byte_size(4096, 0);

/// pid_tgid → the init_module buffer already captured at security_kernel_post_load_data.
#[map]
pub static IMAGE_CAPTURED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(1024, 0);

/// Copies `len` bytes at `buf` (kernel memory) to the IMAGES ring: a header, then the chunks.
///
/// Everything that differs between the loop's exits (chunks sent, status) is written into the
/// header's ring memory, not kept in registers: after the loop every path is the same state
/// for the verifier, which keeps its work linear in the loop bound.
#[inline(always)]
fn capture(buf: u64, len: u64, load_flags: u32, via: u32) {
    count(Counter::IdentityCaptured);
    let task = unsafe { bpf_get_current_task() };
    let mnt_ns = read_ptr(task, iconf!(task_nsproxy))
        .and_then(|nsproxy| read_ptr(nsproxy, iconf!(nsproxy_mnt_ns)))
        .and_then(|ns| read_u32(ns, iconf!(mnt_ns_inum)))
        .unwrap_or(0);
    let max_chunks = {
        let m = iconf!(max_chunks);
        if m > IMAGE_MAX_CHUNKS {
            IMAGE_MAX_CHUNKS
        } else {
            m
        }
    };
    let Some(mut header) = IMAGES.reserve::<ImageHeader>(0) else {
        count(Counter::IdentityRingFull);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let id = unsafe { bpf_ktime_get_ns() };
    let tid = pid_tgid as u32;
    let h = header.as_mut_ptr();
    // SAFETY: the reservation is ours and holds an ImageHeader; every field is written.
    unsafe {
        (*h).kind = image_kind::HEADER;
        (*h).status = 0;
        (*h).pid = (pid_tgid >> 32) as u32;
        (*h).tid = tid;
        (*h).id = id;
        (*h).len = len;
        (*h).chunks = 0;
        (*h).load_flags = load_flags;
        (*h).cgroup_id = bpf_get_current_cgroup_id();
        (*h).mnt_ns = mnt_ns;
        (*h).via = via;
    }
    if buf == 0 || len == 0 {
        // SAFETY: as above.
        unsafe { (*h).status = image_status::NO_IMAGE };
        count(Counter::IdentityReadFailed);
    } else if len > max_chunks as u64 * IMAGE_CHUNK_LEN as u64 {
        // SAFETY: as above.
        unsafe { (*h).status = image_status::TOO_LARGE };
        count(Counter::IdentityTooLarge);
    } else {
        // Whole chunks first (a constant copy size), then the rest (masked: a power of two),
        // so every loop iteration is one path for the verifier.
        const _: () = assert!(IMAGE_CHUNK_LEN.is_power_of_two());
        let whole = len / IMAGE_CHUNK_LEN as u64;
        let rest = len & (IMAGE_CHUNK_LEN as u64 - 1);
        let mut ok = true;
        for i in 0..IMAGE_MAX_CHUNKS {
            if i as u64 >= whole {
                break;
            }
            let off = i as u64 * IMAGE_CHUNK_LEN as u64;
            if !send_chunk(h, id, tid, i, buf + off, IMAGE_CHUNK_LEN as u32) {
                ok = false;
                break;
            }
        }
        if ok && rest > 0 && whole < IMAGE_MAX_CHUNKS as u64 {
            let i = whole as u32;
            send_chunk(
                h,
                id,
                tid,
                i,
                buf + whole * IMAGE_CHUNK_LEN as u64,
                rest as u32,
            );
        }
    }
    header.submit(0);
}

/// Sends chunk `i` (`n` ≤ IMAGE_CHUNK_LEN bytes at `src`); on failure records why in the
/// header `h` and returns false.
#[inline(always)]
fn send_chunk(h: *mut ImageHeader, id: u64, tid: u32, i: u32, src: u64, n: u32) -> bool {
    let n = n & (2 * IMAGE_CHUNK_LEN as u32 - 1);
    if n > IMAGE_CHUNK_LEN as u32 {
        return false;
    }
    let Some(mut entry) = IMAGES.reserve::<ImageChunk>(0) else {
        // SAFETY: `h` is the caller's reserved header.
        unsafe { (*h).status = image_status::RING_FULL };
        count(Counter::IdentityRingFull);
        return false;
    };
    let chunk = entry.as_mut_ptr();
    // SAFETY: the reservation is ours and holds an ImageChunk; the helper bounds the copy to
    // `n` ≤ IMAGE_CHUNK_LEN bytes and validates the source address.
    let ret = unsafe {
        (*chunk).kind = image_kind::CHUNK;
        (*chunk).len = n;
        (*chunk).id = id;
        (*chunk).tid = tid;
        (*chunk).index = i;
        generated::bpf_probe_read_kernel((*chunk).data.as_mut_ptr().cast(), n, src as *const _)
    };
    if ret != 0 {
        entry.discard(0);
        // SAFETY: as above.
        unsafe { (*h).status = image_status::READ_FAILED };
        count(Counter::IdentityReadFailed);
        return false;
    }
    entry.submit(0);
    // SAFETY: as above.
    unsafe { (*h).chunks = i + 1 };
    true
}

#[fentry(function = "load_module")]
pub fn identity_load_module(ctx: FEntryContext) -> i32 {
    let info: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(2);
    let hdr_off = iconf!(load_info_hdr);
    let len_off = iconf!(load_info_len);
    let (buf, len) = if hdr_off == OFFSET_UNKNOWN || len_off == OFFSET_UNKNOWN {
        (0, 0)
    } else {
        (
            read_ptr(info, hdr_off).unwrap_or(0),
            read_ptr(info, len_off).unwrap_or(0),
        )
    };
    let key = bpf_get_current_pid_tgid();
    // SAFETY: map values are valid for the program's run.
    if let Some(seen) = unsafe { IMAGE_CAPTURED.get(key) } {
        let seen = *seen;
        if IMAGE_CAPTURED.remove(key).is_err() {
            count(Counter::IdentityMapFailed);
        }
        if seen == buf && buf != 0 {
            // The same init_module buffer, captured before the LSMs decided.
            return 0;
        }
    }
    capture(buf, len, flags as u32, image_via::LOAD_MODULE);
    0
}

#[fentry(function = "security_kernel_post_load_data")]
pub fn identity_post_load_data(ctx: FEntryContext) -> i32 {
    let id: u32 = ctx.arg(2);
    if id != iconf!(loading_module) {
        return 0;
    }
    let buf: u64 = ctx.arg(0);
    let size: u64 = ctx.arg(1);
    capture(buf, size, 0, image_via::POST_LOAD_DATA);
    let key = bpf_get_current_pid_tgid();
    if IMAGE_CAPTURED.insert(key, buf, 0).is_err() {
        // load_module then captures the same image a second time.
        count(Counter::IdentityMapFailed);
    }
    0
}

/// module_load(struct module *mod)
#[raw_tracepoint(tracepoint = "module_load")]
pub fn identity_module_load(ctx: RawTracePointContext) -> i32 {
    let module: u64 = ctx.arg(0);
    let Some(mut entry) = IMAGES.reserve::<ImageVerdict>(0) else {
        count(Counter::IdentityRingFull);
        return 0;
    };
    let sig_off = iconf!(module_sig_ok);
    let sig_ok = if sig_off == OFFSET_UNKNOWN {
        SIG_OK_UNKNOWN
    } else {
        match read_u32(module, sig_off) {
            // `bool sig_ok`: only its own byte counts.
            Some(v) => u32::from(v & 0xff != 0),
            None => SIG_OK_UNKNOWN,
        }
    };
    let taints = read_ptr(module, iconf!(module_taints)).unwrap_or(0);
    let pid_tgid = bpf_get_current_pid_tgid();
    let name_off = iconf!(module_name);
    let v = entry.as_mut_ptr();
    // SAFETY: the reservation is ours and holds an ImageVerdict; every field is written.
    unsafe {
        (*v).kind = image_kind::VERDICT;
        (*v).sig_ok = sig_ok;
        (*v).ktime_ns = bpf_ktime_get_ns();
        (*v).pid = (pid_tgid >> 32) as u32;
        (*v).tid = pid_tgid as u32;
        (*v).taints = taints;
        (*v).name = [0; VERDICT_NAME_LEN];
        if name_off != OFFSET_UNKNOWN && module != 0 {
            let _ = read_kernel_str(module + name_off as u64, &mut (*v).name);
        }
    }
    entry.submit(0);
    0
}
