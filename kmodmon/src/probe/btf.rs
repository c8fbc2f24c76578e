//! Kernel structure layout from the running kernel's BTF (/sys/kernel/btf/vmlinux): the member
//! offsets the programs need to walk task → files → file → dentry and to read syscall
//! arguments out of `struct pt_regs`. Nothing is assumed about a kernel's layout.
use btf_rs::{Btf, Type};
use kmodmon_common::{Config, OFFSET_UNKNOWN};

use super::ProbeError;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load() -> Result<KernelBtf, ProbeError> {
        Btf::from_file(VMLINUX)
            .map(|btf| KernelBtf { btf })
            .map_err(|e| {
                ProbeError::Btf(format!(
                    "cannot read {VMLINUX}: {e}; this kernel lacks BTF (CONFIG_DEBUG_INFO_BTF), \
                     so fexit and file paths are unavailable"
                ))
            })
    }

    /// Whether the kernel has a function of this name (an fexit target).
    pub fn has_func(&self, name: &str) -> bool {
        self.btf
            .resolve_types_by_name(name)
            .map(|types| types.iter().any(|t| matches!(t, Type::Func(_))))
            .unwrap_or(false)
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous structs/unions.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let types = self.btf.resolve_types_by_name(name).ok()?;
        types.iter().find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => self.find_member(s, member, 0),
            _ => None,
        })
    }

    fn find_member(&self, s: &btf_rs::Struct, member: &str, depth: u32) -> Option<u32> {
        if depth > 4 {
            return None;
        }
        for m in &s.members {
            let name = self.btf.resolve_name(m).unwrap_or_default();
            if name == member {
                return Some(m.bit_offset() / 8);
            }
            if name.is_empty() {
                // Anonymous struct/union: its members are members of `s`.
                if let Ok(Type::Struct(inner) | Type::Union(inner)) = self.btf.resolve_chained_type(m)
                    && let Some(off) = self.find_member(&inner, member, depth + 1)
                {
                    return Some(m.bit_offset() / 8 + off);
                }
            }
        }
        None
    }

    /// Fills the kernel-structure part of the programs' configuration.
    pub fn fill(&self, cfg: &mut Config) -> Vec<String> {
        let mut missing = Vec::new();
        let mut get = |s: &str, m: &str| -> u32 {
            self.member_offset(s, m).unwrap_or_else(|| {
                missing.push(format!("{s}.{m}"));
                OFFSET_UNKNOWN
            })
        };
        cfg.task_real_parent = get("task_struct", "real_parent");
        cfg.task_tgid = get("task_struct", "tgid");
        cfg.task_files = get("task_struct", "files");
        cfg.files_fdt = get("files_struct", "fdt");
        cfg.fdtable_max_fds = get("fdtable", "max_fds");
        cfg.fdtable_fd = get("fdtable", "fd");
        cfg.file_f_path = get("file", "f_path");
        cfg.path_dentry = get("path", "dentry");
        cfg.dentry_d_name = get("dentry", "d_name");
        cfg.dentry_d_parent = get("dentry", "d_parent");
        cfg.qstr_name = get("qstr", "name");
        cfg.path_mnt = get("path", "mnt");
        cfg.vfsmount_mnt_root = get("vfsmount", "mnt_root");
        cfg.mount_mnt = get("mount", "mnt");
        cfg.mount_parent = get("mount", "mnt_parent");
        cfg.mount_mountpoint = get("mount", "mnt_mountpoint");
        cfg.pt_regs_arg = syscall_arg_offsets(&mut get);
        missing
    }
}

/// Offsets in `struct pt_regs` of the first three syscall arguments on this architecture.
#[cfg(target_arch = "x86_64")]
fn syscall_arg_offsets(get: &mut impl FnMut(&str, &str) -> u32) -> [u32; 3] {
    [get("pt_regs", "di"), get("pt_regs", "si"), get("pt_regs", "dx")]
}

#[cfg(target_arch = "aarch64")]
fn syscall_arg_offsets(get: &mut impl FnMut(&str, &str) -> u32) -> [u32; 3] {
    let regs = get("pt_regs", "regs");
    if regs == OFFSET_UNKNOWN {
        return [OFFSET_UNKNOWN; 3];
    }
    [regs, regs + 8, regs + 16]
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn syscall_arg_offsets(_get: &mut impl FnMut(&str, &str) -> u32) -> [u32; 3] {
    [OFFSET_UNKNOWN; 3]
}

/// The kernel function behind a syscall on this architecture, for fexit.
pub fn syscall_func(name: &str) -> String {
    #[cfg(target_arch = "x86_64")]
    let prefix = "__x64_sys_";
    #[cfg(target_arch = "aarch64")]
    let prefix = "__arm64_sys_";
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let prefix = "sys_";
    format!("{prefix}{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against this machine's real BTF when it has one (it does on CI's kernel).
    #[test]
    fn resolves_offsets_on_this_kernel() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("SKIP: no {VMLINUX} on this machine");
            return;
        };
        let mut cfg = Config::unset();
        let missing = btf.fill(&mut cfg);
        assert!(missing.is_empty(), "missing: {missing:?}");
        // qstr: { union { struct { u32 hash; u32 len; }; u64 hash_len; }; const char *name; }
        assert_eq!(cfg.qstr_name, 8);
        // path: { struct vfsmount *mnt; struct dentry *dentry; }
        assert_eq!(cfg.path_dentry, 8);
        assert!(cfg.task_tgid != OFFSET_UNKNOWN && cfg.task_tgid > 0);
        assert!(btf.member_offset("task_struct", "no_such_member").is_none());
        assert!(btf.has_func("schedule"));
        assert!(!btf.has_func("kmodmon_no_such_function"));
    }
}
