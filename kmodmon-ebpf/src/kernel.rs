//! Reading kernel and user memory with offsets userspace resolved from BTF. Every failure is
//! counted and reported to the caller; nothing here can fault.
use aya_ebpf::helpers::{bpf_probe_read_kernel, generated};
use kmodmon_common::{
    Counter, OFFSET_UNKNOWN, PATH_COMPONENT_LEN, PATH_LEN, PATH_MAX_STEPS, PATH_SLOTS,
};

use crate::{config::conf, maps::count};

/// Reads a pointer-sized value at `base + off`.
#[inline(always)]
pub fn read_ptr(base: u64, off: u32) -> Option<u64> {
    if base == 0 || off == OFFSET_UNKNOWN {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one returns an error.
    match unsafe { bpf_probe_read_kernel((base + off as u64) as *const u64) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(Counter::ErrReadKernel);
            None
        }
    }
}

#[inline(always)]
pub fn read_u32(base: u64, off: u32) -> Option<u32> {
    if base == 0 || off == OFFSET_UNKNOWN {
        return None;
    }
    // SAFETY: as above.
    match unsafe { bpf_probe_read_kernel((base + off as u64) as *const u32) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(Counter::ErrReadKernel);
            None
        }
    }
}

/// Copies a NUL-terminated user string into `dst`. Returns `(len, truncated)` where `len`
/// excludes the NUL, or `None` when the read failed (counted).
#[inline(always)]
pub fn read_user_str(src: u64, dst: &mut [u8]) -> Option<(usize, bool)> {
    if src == 0 {
        return None;
    }
    // SAFETY: the helper bounds the write to dst.len() and validates src.
    let n = unsafe {
        generated::bpf_probe_read_user_str(
            dst.as_mut_ptr().cast(),
            dst.len() as u32,
            src as *const _,
        )
    };
    str_result(n, dst.len(), Counter::ErrReadUser)
}

/// Copies a NUL-terminated kernel string into `dst` (see [`read_user_str`]).
#[inline(always)]
pub fn read_kernel_str(src: u64, dst: &mut [u8]) -> Option<(usize, bool)> {
    if src == 0 {
        return None;
    }
    // SAFETY: as above.
    let n = unsafe {
        generated::bpf_probe_read_kernel_str(
            dst.as_mut_ptr().cast(),
            dst.len() as u32,
            src as *const _,
        )
    };
    str_result(n, dst.len(), Counter::ErrReadKernel)
}

#[inline(always)]
fn str_result(n: i64, cap: usize, err: Counter) -> Option<(usize, bool)> {
    if n < 0 {
        count(err);
        return None;
    }
    let n = n as usize;
    if n == 0 {
        return Some((0, false));
    }
    // n counts the NUL. A string that filled the buffer may have been cut.
    Some((n - 1, n >= cap))
}

/// The current task's parent's tgid.
#[inline(always)]
pub fn current_ppid(task: u64) -> Option<u32> {
    let parent = read_ptr(task, conf!(task_real_parent))?;
    read_u32(parent, conf!(task_tgid))
}

/// The `struct file *` behind `fd` in the current task's file table.
#[inline(always)]
pub fn file_of_fd(task: u64, fd: i32) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    let files = read_ptr(task, conf!(task_files))?;
    let fdt = read_ptr(files, conf!(files_fdt))?;
    let max_fds = read_u32(fdt, conf!(fdtable_max_fds))?;
    if fd as u32 >= max_fds {
        return None;
    }
    let fd_array = read_ptr(fdt, conf!(fdtable_fd))?;
    let file = read_ptr(fd_array, (fd as u32).checked_mul(8)?)?;
    if file == 0 { None } else { Some(file) }
}

/// Writes the names of `file`'s dentry and its ancestors into `out`'s fixed slots, leaf
/// first, crossing mount points up to the global root (as d_path does). Returns
/// `(slots used, truncated)`; a read failure ends the walk early and marks it truncated.
///
/// The slot counter lives in `slots` (map memory) and is re-read each step through a volatile
/// load, so the verifier tracks it as a bounded range rather than an exact value: states of
/// the walk then prune, and verification stays cheap however deep the walk may go.
#[inline(always)]
pub fn file_path(file: u64, out: &mut [u8; PATH_LEN], slots: &mut u32) -> Option<bool> {
    let path_off = conf!(file_f_path);
    let dentry_off = conf!(path_dentry);
    let d_name = conf!(dentry_d_name);
    let qstr_name = conf!(qstr_name);
    let d_parent = conf!(dentry_d_parent);
    if path_off == OFFSET_UNKNOWN
        || dentry_off == OFFSET_UNKNOWN
        || d_name == OFFSET_UNKNOWN
        || qstr_name == OFFSET_UNKNOWN
        || d_parent == OFFSET_UNKNOWN
    {
        return None;
    }
    let mut dentry = read_ptr(file, path_off + dentry_off)?;
    // Mount walking is optional: without these offsets the path is relative to its mount.
    let path_mnt = conf!(path_mnt);
    let mnt_root_off = conf!(vfsmount_mnt_root);
    let mount_mnt = conf!(mount_mnt);
    let mount_parent = conf!(mount_parent);
    let mount_mountpoint = conf!(mount_mountpoint);
    let mut vfsmnt = if path_mnt != OFFSET_UNKNOWN
        && mnt_root_off != OFFSET_UNKNOWN
        && mount_mnt != OFFSET_UNKNOWN
        && mount_parent != OFFSET_UNKNOWN
        && mount_mountpoint != OFFSET_UNKNOWN
    {
        read_ptr(file, path_off + path_mnt).unwrap_or(0)
    } else {
        0
    };
    // SAFETY: `slots` is a valid, exclusive reference.
    unsafe { core::ptr::write_volatile(slots, 0) };
    let mut done = false;
    for _ in 0..PATH_MAX_STEPS {
        let Some(parent) = read_ptr(dentry, d_parent) else {
            break;
        };
        let mut at_mount_root = dentry == parent;
        if vfsmnt != 0 {
            let Some(mnt_root) = read_ptr(vfsmnt, mnt_root_off) else {
                break;
            };
            at_mount_root |= dentry == mnt_root;
        }
        if at_mount_root {
            if vfsmnt == 0 {
                done = true;
                break;
            }
            // Continue at the mount point, in the parent mount.
            let mount = vfsmnt - mount_mnt as u64;
            let Some(mnt_parent) = read_ptr(mount, mount_parent) else {
                break;
            };
            if mnt_parent == mount {
                done = true;
                break;
            }
            let Some(mountpoint) = read_ptr(mount, mount_mountpoint) else {
                break;
            };
            dentry = mountpoint;
            vfsmnt = mnt_parent + mount_mnt as u64;
            continue;
        }
        // SAFETY: as above.
        let slot = unsafe { core::ptr::read_volatile(slots) } as usize;
        if slot >= PATH_SLOTS {
            break;
        }
        let Some(name) = read_ptr(dentry, d_name + qstr_name) else {
            break;
        };
        // SAFETY: slot < PATH_SLOTS, so the window lies inside `out`.
        let window = unsafe {
            core::slice::from_raw_parts_mut(
                out.as_mut_ptr().add(slot * PATH_COMPONENT_LEN),
                PATH_COMPONENT_LEN,
            )
        };
        if read_kernel_str(name, window).is_none() {
            break;
        }
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(slots, slot as u32 + 1) };
        dentry = parent;
    }
    Some(!done)
}
