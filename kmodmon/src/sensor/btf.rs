//! Kernel structure layout from the running kernel's BTF (/sys/kernel/btf/vmlinux): the member
//! offsets the programs need to walk task → files → file → dentry and to read syscall
//! arguments out of `struct pt_regs`. Nothing is assumed about a kernel's layout.
use kmodmon_common::{Config, OFFSET_UNKNOWN};

use super::SensorError;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// The kernel's BTF, indexed just enough to answer "offset of member M in struct S" and "does
/// function F exist". A full BTF library (btf-rs) materialises all ~150k types of a distro
/// kernel, which cost ~250 ms of kmodmon's start-up here; this walks the type section once,
/// keeping only each type's position (≈10 ms). Cross-checked against btf-rs in the tests.
pub struct KernelBtf {
    data: Vec<u8>,
    strings_start: usize,
    strings_len: usize,
    /// Byte position of type id N at index N (index 0, void, unused).
    type_pos: Vec<usize>,
}

/// One decoded `struct btf_type` header.
#[derive(Clone, Copy)]
struct TypeHeader {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    size_or_type: u32,
    pos: usize,
}

impl KernelBtf {
    pub fn load() -> Result<KernelBtf, SensorError> {
        let started = std::time::Instant::now();
        let data = std::fs::read(VMLINUX).map_err(|e| {
            SensorError::Btf(format!(
                "cannot read {VMLINUX}: {e}; this kernel lacks BTF (CONFIG_DEBUG_INFO_BTF), so \
                 fexit, raw tracepoints and file paths are unavailable"
            ))
        })?;
        let btf = Self::parse(data).map_err(|e| SensorError::Btf(format!("{VMLINUX}: {e}")))?;
        log::debug!(
            "indexed {VMLINUX} ({} types) in {:?}",
            btf.type_pos.len() - 1,
            started.elapsed()
        );
        Ok(btf)
    }

    /// The BTF as read (for aya, which parses it again its own way).
    pub fn raw(&self) -> &[u8] {
        &self.data
    }

    pub fn parse(data: Vec<u8>) -> Result<KernelBtf, String> {
        let u16_at = |d: &[u8], at: usize| -> Option<u16> {
            d.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        if u16_at(&data, 0) != Some(BTF_MAGIC) {
            return Err("not little-endian BTF (bad magic)".into());
        }
        let hdr_len = read_u32(&data, 4).ok_or("truncated header")? as usize;
        let field = |i: usize| {
            read_u32(&data, 8 + 4 * i)
                .map(|v| v as usize)
                .ok_or("truncated header")
        };
        let (type_off, type_len, str_off, str_len) = (field(0)?, field(1)?, field(2)?, field(3)?);
        let types_start = hdr_len + type_off;
        let strings_start = hdr_len + str_off;
        if types_start + type_len > data.len() || strings_start + str_len > data.len() {
            return Err("sections extend past the end of the file".into());
        }
        let mut btf = KernelBtf {
            data,
            strings_start,
            strings_len: str_len,
            type_pos: vec![0],
        };
        let mut pos = types_start;
        let end = types_start + type_len;
        while pos < end {
            let t = btf
                .header_at(pos)
                .ok_or_else(|| format!("truncated type at byte {pos}"))?;
            btf.type_pos.push(pos);
            pos += 12
                + trailing_len(t.kind, t.vlen)
                    .ok_or_else(|| format!("unknown BTF kind {}", t.kind))?;
        }
        Ok(btf)
    }

    fn header_at(&self, pos: usize) -> Option<TypeHeader> {
        let info = read_u32(&self.data, pos + 4)?;
        Some(TypeHeader {
            name_off: read_u32(&self.data, pos)?,
            kind: (info >> 24) & 0x1f,
            vlen: info & 0xffff,
            kind_flag: info >> 31 == 1,
            size_or_type: read_u32(&self.data, pos + 8)?,
            pos,
        })
    }

    fn header(&self, id: u32) -> Option<TypeHeader> {
        self.type_pos
            .get(id as usize)
            .filter(|&&p| p != 0)
            .and_then(|&p| self.header_at(p))
    }

    fn name(&self, off: u32) -> &[u8] {
        let off = off as usize;
        if off >= self.strings_len {
            return b"";
        }
        let s = &self.data[self.strings_start + off..self.strings_start + self.strings_len];
        let n = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        &s[..n]
    }

    fn types_named<'a>(
        &'a self,
        name: &'a str,
        kinds: &'a [u32],
    ) -> impl Iterator<Item = TypeHeader> + 'a {
        (1..self.type_pos.len() as u32)
            .filter_map(|id| self.header(id))
            .filter(move |t| kinds.contains(&t.kind) && self.name(t.name_off) == name.as_bytes())
    }

    /// Whether the kernel has a function of this name (an fexit target).
    pub fn has_func(&self, name: &str) -> bool {
        self.types_named(name, &[KIND_FUNC]).next().is_some()
    }

    /// The type id of function `name` (what a tracing link's `target_btf_id` names).
    pub fn func_id(&self, name: &str) -> Option<u32> {
        (1..self.type_pos.len() as u32).find(|&id| {
            self.header(id)
                .is_some_and(|t| t.kind == KIND_FUNC && self.name(t.name_off) == name.as_bytes())
        })
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous structs/unions.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        self.types_named(name, &[KIND_STRUCT])
            .filter(|t| t.vlen > 0)
            .find_map(|t| self.find_member(t, member.as_bytes(), 0))
    }

    fn find_member(&self, t: TypeHeader, member: &[u8], depth: u32) -> Option<u32> {
        if depth > 4 {
            return None;
        }
        for i in 0..t.vlen as usize {
            let at = t.pos + 12 + 12 * i;
            let (name_off, ty, off) = (
                read_u32(&self.data, at)?,
                read_u32(&self.data, at + 4)?,
                read_u32(&self.data, at + 8)?,
            );
            let bits = if t.kind_flag { off & 0x00ff_ffff } else { off };
            let name = self.name(name_off);
            if name == member {
                return Some(bits / 8);
            }
            if name.is_empty()
                && let Some(inner) = self.resolve(ty)
                && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some(found) = self.find_member(inner, member, depth + 1)
            {
                return Some(bits / 8 + found);
            }
        }
        None
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<TypeHeader> {
        for _ in 0..16 {
            let t = self.header(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// The value of `variant` in `enum name` (`cgroup_subsys_id`, `memory_cgrp_id`).
    pub fn enum_value(&self, name: &str, variant: &str) -> Option<i64> {
        self.types_named(name, &[KIND_ENUM, KIND_ENUM64])
            .find_map(|t| {
                // btf_enum { name_off, s32 val }; btf_enum64 { name_off, val_lo32, val_hi32 }.
                let stride = if t.kind == KIND_ENUM64 { 12 } else { 8 };
                let signed = t.kind_flag;
                (0..t.vlen as usize).find_map(|i| {
                    let at = t.pos + 12 + stride * i;
                    if self.name(read_u32(&self.data, at)?) != variant.as_bytes() {
                        return None;
                    }
                    let lo = read_u32(&self.data, at + 4)?;
                    Some(if t.kind == KIND_ENUM64 {
                        let hi = read_u32(&self.data, at + 8)?;
                        ((u64::from(hi) << 32) | u64::from(lo)) as i64
                    } else if signed {
                        i64::from(lo as i32)
                    } else {
                        i64::from(lo)
                    })
                })
            })
    }

    /// How many parameters function `name` takes (its BTF prototype), if BTF has it.
    pub fn func_param_count(&self, name: &str) -> Option<u32> {
        const KIND_FUNC_PROTO: u32 = 13;
        let func = self.types_named(name, &[KIND_FUNC]).next()?;
        let proto = self.header(func.size_or_type)?;
        (proto.kind == KIND_FUNC_PROTO).then_some(proto.vlen)
    }

    /// Whether enum `name` has an enumerator `value` (e.g. a helper in `enum bpf_func_id`).
    pub fn has_enumerator(&self, name: &str, value: &str) -> bool {
        const KIND_ENUM: u32 = 6;
        const KIND_ENUM64: u32 = 19;
        self.types_named(name, &[KIND_ENUM, KIND_ENUM64]).any(|t| {
            let stride = if t.kind == KIND_ENUM { 8 } else { 12 };
            (0..t.vlen as usize).any(|i| {
                read_u32(&self.data, t.pos + 12 + stride * i)
                    .is_some_and(|off| self.name(off) == value.as_bytes())
            })
        })
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
        cfg.pt_regs_syscall_nr = syscall_nr_offset(&mut get);
        cfg.task_group_leader = get("task_struct", "group_leader");
        cfg.task_start_boottime = get("task_struct", "start_boottime");
        cfg.task_start_time = get("task_struct", "start_time");
        cfg.task_comm = get("task_struct", "comm");
        missing
    }

    /// Fills the cgroup v1 walk (`task->cgroups->subsys[ssid]->cgroup->kn->id`, `css->parent`)
    /// for `controller`'s hierarchy; returns the subsystem id (`<controller>_cgrp_id` in `enum
    /// cgroup_subsys_id`), or what BTF lacks. The configuration is left unchanged on error.
    pub fn fill_cgroup_v1(&self, cfg: &mut Config, controller: &str) -> Result<u32, String> {
        // The kernel names the io controller's v1 hierarchy by its legacy name, blkio.
        let subsys = if controller == "blkio" {
            "io"
        } else {
            controller
        };
        let variant = format!("{subsys}_cgrp_id");
        let ssid = self
            .enum_value("cgroup_subsys_id", &variant)
            .ok_or_else(|| format!("enum cgroup_subsys_id has no {variant}"))?;
        let count = self
            .enum_value("cgroup_subsys_id", "CGROUP_SUBSYS_COUNT")
            .ok_or("enum cgroup_subsys_id has no CGROUP_SUBSYS_COUNT")?;
        if ssid < 0 || ssid >= count || ssid >= 64 {
            return Err(format!(
                "{variant} = {ssid} is outside subsys[CGROUP_SUBSYS_COUNT = {count}]"
            ));
        }
        let mut missing = Vec::new();
        let mut get = |s: &str, m: &str| -> u32 {
            self.member_offset(s, m).unwrap_or_else(|| {
                missing.push(format!("{s}.{m}"));
                OFFSET_UNKNOWN
            })
        };
        let offsets = [
            get("task_struct", "cgroups"),
            get("css_set", "subsys"),
            get("cgroup_subsys_state", "cgroup"),
            get("cgroup_subsys_state", "parent"),
            get("cgroup", "kn"),
            get("kernfs_node", "id"),
        ];
        if !missing.is_empty() {
            return Err(format!("BTF lacks {}", missing.join(", ")));
        }
        cfg.cgroup_v1_ssid = ssid as u32;
        [
            cfg.task_cgroups,
            cfg.css_set_subsys,
            cfg.css_cgroup,
            cfg.css_parent,
            cfg.cgroup_kn,
            cfg.kernfs_node_id,
        ] = offsets;
        Ok(ssid as u32)
    }
}

/// Offsets in `struct pt_regs` of the first three syscall arguments on this architecture.
#[cfg(target_arch = "x86_64")]
fn syscall_arg_offsets(get: &mut impl FnMut(&str, &str) -> u32) -> [u32; 3] {
    [
        get("pt_regs", "di"),
        get("pt_regs", "si"),
        get("pt_regs", "dx"),
    ]
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

/// Offset in `struct pt_regs` of the syscall number.
#[cfg(target_arch = "x86_64")]
fn syscall_nr_offset(get: &mut impl FnMut(&str, &str) -> u32) -> u32 {
    get("pt_regs", "orig_ax")
}

#[cfg(target_arch = "aarch64")]
fn syscall_nr_offset(get: &mut impl FnMut(&str, &str) -> u32) -> u32 {
    get("pt_regs", "syscallno")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn syscall_nr_offset(_get: &mut impl FnMut(&str, &str) -> u32) -> u32 {
    OFFSET_UNKNOWN
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

fn read_u32(d: &[u8], at: usize) -> Option<u32> {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Bytes that follow a type's 12-byte header, by kind (include/uapi/linux/btf.h).
fn trailing_len(kind: u32, vlen: u32) -> Option<usize> {
    let vlen = vlen as usize;
    Some(match kind {
        1 => 4,                    // INT
        2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        3 => 12,                   // ARRAY
        4 | 5 => 12 * vlen,        // STRUCT, UNION
        6 => 8 * vlen,             // ENUM
        13 => 8 * vlen,            // FUNC_PROTO
        14 => 4,                   // VAR
        15 => 12 * vlen,           // DATASEC
        17 => 4,                   // DECL_TAG
        19 => 12 * vlen,           // ENUM64
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our index agrees with btf-rs (a full BTF library) on every member we use.
    #[test]
    fn agrees_with_btf_rs() {
        let Ok(ours) = KernelBtf::load() else {
            eprintln!("SKIP: no {VMLINUX} on this machine");
            return;
        };
        let theirs = btf_rs::Btf::from_file(VMLINUX).unwrap();
        fn find(btf: &btf_rs::Btf, st: &btf_rs::Struct, m: &str) -> Option<u32> {
            st.members.iter().find_map(|mem| {
                let name = btf.resolve_name(mem).ok()?;
                if name == m {
                    return Some(mem.bit_offset() / 8);
                }
                if !name.is_empty() {
                    return None;
                }
                match btf.resolve_chained_type(mem).ok()? {
                    btf_rs::Type::Struct(inner) | btf_rs::Type::Union(inner) => {
                        find(btf, &inner, m).map(|o| mem.bit_offset() / 8 + o)
                    }
                    _ => None,
                }
            })
        }
        let their_offset = |s: &str, m: &str| -> Option<u32> {
            let types = theirs.resolve_types_by_name(s).ok()?;
            types.iter().find_map(|t| match t {
                btf_rs::Type::Struct(st) if !st.members.is_empty() => find(&theirs, st, m),
                _ => None,
            })
        };
        for (s, m) in [
            ("task_struct", "real_parent"),
            ("task_struct", "tgid"),
            ("task_struct", "start_time"),
            ("task_struct", "files"),
            ("files_struct", "fdt"),
            ("fdtable", "fd"),
            ("file", "f_path"),
            ("path", "dentry"),
            ("path", "mnt"),
            ("dentry", "d_name"),
            ("dentry", "d_parent"),
            ("mount", "mnt_parent"),
            ("pt_regs", "orig_ax"),
        ] {
            let o = ours.member_offset(s, m);
            assert!(o.is_some(), "{s}.{m} not found");
            assert_eq!(o, their_offset(s, m), "{s}.{m}");
        }
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(KernelBtf::parse(vec![0; 8]).is_err());
        let mut hdr = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        hdr.extend_from_slice(&[0, 0, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(KernelBtf::parse(hdr).is_err(), "type section past the end");
    }

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
        // include/linux/kernel_read_file.h: READING_MODULE is 2 in every kernel since 5.7.
        assert_eq!(
            btf.enum_value("kernel_read_file_id", "READING_MODULE"),
            Some(2)
        );
        assert_eq!(btf.enum_value("kernel_read_file_id", "NO_SUCH_VALUE"), None);
        assert!(!btf.has_func("kmodmon_no_such_function"));
        assert!(btf.func_id("schedule").is_some());
        assert_eq!(btf.func_id("kmodmon_no_such_function"), None);
        // Enumerators: the kernel's values, as btf-rs reads them.
        let theirs = btf_rs::Btf::from_file(VMLINUX).unwrap();
        for (e, m) in [
            ("bpf_attach_type", "BPF_LSM_MAC"),
            ("bpf_link_type", "BPF_LINK_TYPE_TRACING"),
            ("kernel_read_file_id", "READING_MODULE"),
            ("kernel_load_data_id", "LOADING_MODULE"),
        ] {
            let want = theirs
                .resolve_types_by_name(e)
                .unwrap()
                .into_iter()
                .find_map(|t| match t {
                    btf_rs::Type::Enum(en) => en.members.iter().find_map(|x| {
                        (theirs.resolve_name(x).ok()? == m).then_some(x.val() as i64)
                    }),
                    _ => None,
                });
            assert_eq!(btf.enum_value(e, m), want, "{e}::{m}");
            assert!(want.is_some(), "{e}::{m} in BTF");
        }
        assert_eq!(btf.enum_value("bpf_attach_type", "NO_SUCH"), None);
        assert!(cfg.task_start_boottime != OFFSET_UNKNOWN && cfg.task_comm != OFFSET_UNKNOWN);
    }

    /// `enum cgroup_subsys_id` of this kernel agrees with /proc/cgroups, which lists the
    /// controllers in subsystem-id order; the v1 walk's offsets are all there.
    #[test]
    fn cgroup_subsys_ids_from_btf_match_proc_cgroups() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("SKIP: no {VMLINUX} on this machine");
            return;
        };
        let text = std::fs::read_to_string("/proc/cgroups").expect("/proc/cgroups");
        let names: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(!names.is_empty());
        for (i, name) in names.iter().enumerate() {
            let subsys = if *name == "blkio" { "io" } else { name };
            assert_eq!(
                btf.enum_value("cgroup_subsys_id", &format!("{subsys}_cgrp_id")),
                Some(i as i64),
                "{name}"
            );
        }
        assert_eq!(
            btf.enum_value("cgroup_subsys_id", "CGROUP_SUBSYS_COUNT"),
            Some(names.len() as i64)
        );
        assert_eq!(btf.enum_value("cgroup_subsys_id", "no_such_cgrp_id"), None);
        let mut cfg = Config::unset();
        assert_eq!(
            btf.fill_cgroup_v1(&mut cfg, "memory"),
            Ok(cfg.cgroup_v1_ssid)
        );
        assert!(cfg.kernfs_node_id != OFFSET_UNKNOWN && cfg.css_parent != OFFSET_UNKNOWN);
        let before = cfg.cgroup_v1_ssid;
        assert!(btf.fill_cgroup_v1(&mut cfg, "no_such").is_err());
        assert_eq!(cfg.cgroup_v1_ssid, before, "unchanged on error");
    }
}
