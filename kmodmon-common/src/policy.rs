//! Policy enforcement (BPF LSM): the maps userspace fills and the LSM programs read.
//!
//! How the programs decide for the current task (kmodmon-ebpf `lsm.rs`), over the task's
//! cgroup and its ancestors, root first (at most [`MAX_CGROUP_DEPTH`] levels below the root):
//!
//! 1. a cgroup with an entry in `POLICY_CGROUPS` (a container kmodmon mapped) decides for
//!    itself and everything below it;
//! 2. a cgroup without one whose name marks it as a container or a container parent
//!    ([`ParentKey`]: `/docker`, `/kubepods`, ...; [`PrefixRule`]: `docker-<id>.scope`,
//!    `lxc.payload.<name>`, ...) gets the `[unselected]` decision (key [`UNSELECTED_KEY`]),
//!    capped by the entry of an enclosing container ([`CONTAINER`]) if there is one: a
//!    container kmodmon has not mapped yet is restricted from the moment its cgroup exists;
//! 3. else the host entry ([`HOST_KEY`]).

/// Bytes of a module (or autoload request) name in an allow-set key: MODULE_NAME_LEN, which
/// is also the longest name `request_module` passes on. Names are stored normalized
/// ('-' → '_'), NUL-padded.
pub const NAME_KEY_LEN: usize = 60;
/// How many cgroup levels below the root the programs look at (a task deeper than this is
/// decided by its ancestors down to this level: a container's own cgroup is always shallower).
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Key of the entry that applies to cgroups nothing else decides for (the host).
pub const HOST_KEY: u64 = 0;
/// Key of the `[unselected]` decision: what container cgroups kmodmon has not mapped (yet)
/// get. No cgroup has this id (kernfs ids are an inode number and a generation).
pub const UNSELECTED_KEY: u64 = u64::MAX;

/// `Settings::mode`.
pub const MODE_OFF: u32 = 0;
pub const MODE_AUDIT: u32 = 1;
pub const MODE_ENFORCE: u32 = 2;

/// `Decision::flags`: only modules in `allow_set` may load; everything else is denied.
pub const RESTRICTED: u32 = 1 << 0;
/// `Decision::flags`: the entry of a container. A cgroup below it that a name rule marks as a
/// container gets `[unselected]` capped by this decision (never more than its container).
pub const CONTAINER: u32 = 1 << 1;

/// The allow-set id no key ever uses: a restricted decision with it allows nothing.
pub const EMPTY_SET: u32 = 0;

/// What applies to one cgroup (and the cgroups below it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Decision {
    /// Policy rule id, reported in denied / would_deny events.
    pub rule: u32,
    /// Allow-set id ([`AllowKey::set`]).
    pub allow_set: u32,
    /// [`RESTRICTED`], [`CONTAINER`].
    pub flags: u32,
    pub _reserved: u32,
}

/// Key of the allow-set map: (set id, normalized name).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowKey {
    pub set: u32,
    pub name: [u8; NAME_KEY_LEN],
}

/// Bytes of a container parent's name in [`ParentKey`].
pub const PARENT_NAME_LEN: usize = 32;

/// Key of the container-parent map: a cgroup named `name` directly below the cgroup `parent`
/// (1: the root) holds containers (`/docker`, `/kubepods`, ...). Value: 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParentKey {
    pub parent: u64,
    /// NUL-padded; names of [`PARENT_NAME_LEN`] bytes or more cannot be parents.
    pub name: [u8; PARENT_NAME_LEN],
}

/// Slots of the prefix-rule array.
pub const PREFIX_RULES: u32 = 8;
/// Longest prefix a [`PrefixRule`] holds.
pub const PREFIX_MAX: usize = 24;

/// `PrefixRule::kind`: the slot is unused.
pub const PREFIX_UNUSED: u32 = 0;
/// `PrefixRule::kind`: `<prefix><64 characters>` or `<prefix><64 characters>.scope`
/// (`docker-<id>.scope`, `libpod-<id>`, ...; `libpod-conmon-<id>` has another length).
pub const PREFIX_ID64: u32 = 1;
/// `PrefixRule::kind`: `<prefix><name>` with a non-empty name, ending in `.scope` when
/// `scope` is 1, and not starting with `exclude` after the prefix (`machine-<name>.scope`
/// but not `machine-qemu\x2d...`: virtual machines are no containers).
pub const PREFIX_NAMED: u32 = 2;

/// A cgroup name that marks a container at any depth (the systemd cgroup driver's scopes,
/// LXC's payload cgroups), for names no container parent covers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PrefixRule {
    /// The prefix's bytes, little-endian words, zero beyond `len`.
    pub words: [u64; 3],
    /// The bytes of each word that hold the prefix (all ones up to `len`, then zero).
    pub masks: [u64; 3],
    /// Prefix length (1..=[`PREFIX_MAX`]).
    pub len: u32,
    /// [`PREFIX_ID64`] or [`PREFIX_NAMED`] ([`PREFIX_UNUSED`]: an empty slot).
    pub kind: u32,
    /// [`PREFIX_NAMED`]: 1 when the name must end in `.scope`.
    pub scope: u32,
    /// [`PREFIX_NAMED`]: length of `exclude` (0: none).
    pub exclude_len: u32,
    /// [`PREFIX_NAMED`]: up to 8 bytes that, right after the prefix, mean "not a container".
    pub exclude: u64,
}

/// `.scope` and its NUL as a little-endian word (7 bytes: mask with [`SCOPE_MASK`]).
pub const SCOPE_WORD: u64 = u64::from_le_bytes(*b".scope\0\0");
pub const SCOPE_MASK: u64 = 0x00ff_ffff_ffff_ffff;

/// The mask that keeps the first `n` bytes (0..=8) of a little-endian word.
pub const fn byte_mask(n: u32) -> u64 {
    if n >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * n)) - 1
    }
}

impl PrefixRule {
    /// The rule for `prefix` (at most [`PREFIX_MAX`] bytes; longer ones are cut, which only
    /// makes the rule match more).
    pub const fn new(prefix: &[u8], kind: u32, scope: bool, exclude: &[u8]) -> PrefixRule {
        let mut words = [0u64; 3];
        let mut i = 0;
        let len = if prefix.len() > PREFIX_MAX {
            PREFIX_MAX
        } else {
            prefix.len()
        };
        while i < len {
            words[i / 8] |= (prefix[i] as u64) << (8 * (i % 8));
            i += 1;
        }
        let mut masks = [0u64; 3];
        let mut w = 0;
        while w < 3 {
            let start = 8 * w;
            masks[w] = if len <= start {
                0
            } else {
                byte_mask((len - start) as u32)
            };
            w += 1;
        }
        let mut ex = 0u64;
        let ex_len = if exclude.len() > 8 { 8 } else { exclude.len() };
        let mut j = 0;
        while j < ex_len {
            ex |= (exclude[j] as u64) << (8 * j);
            j += 1;
        }
        PrefixRule {
            words,
            masks,
            len: len as u32,
            kind,
            scope: scope as u32,
            exclude_len: ex_len as u32,
            exclude: ex,
        }
    }

    /// Whether the first three words of a name (little-endian, zero-padded) start with the
    /// prefix.
    /// (The bytes of `name` past its end must be zero, or the name at least `len` long.)
    pub const fn prefix_matches(&self, name: &[u64; 3]) -> bool {
        ((name[0] ^ self.words[0]) & self.masks[0])
            | ((name[1] ^ self.words[1]) & self.masks[1])
            | ((name[2] ^ self.words[2]) & self.masks[2])
            == 0
    }

    /// Whether a cgroup named `name` (its bytes, no NUL) is a container by this rule. The
    /// kernel side makes the same checks with reads of kernel memory; this is the reference
    /// the unit tests hold it to.
    pub fn matches(&self, name: &[u8]) -> bool {
        let mut words = [0u64; 3];
        for (i, b) in name.iter().take(24).enumerate() {
            words[i / 8] |= (*b as u64) << (8 * (i % 8));
        }
        let len = self.len as usize;
        if self.kind == PREFIX_UNUSED || !self.prefix_matches(&words) || name.len() <= len {
            return false;
        }
        match self.kind {
            PREFIX_ID64 => {
                name.len() == len + 64 || (name.len() == len + 70 && name.ends_with(b".scope"))
            }
            PREFIX_NAMED => {
                if self.scope == 1 && (name.len() < len + 7 || !name.ends_with(b".scope")) {
                    return false;
                }
                let ex = self.exclude_len as usize;
                if ex == 0 || name.len() < len + ex {
                    return true;
                }
                let mut w = 0u64;
                for (j, b) in name[len..len + ex].iter().enumerate() {
                    w |= (*b as u64) << (8 * j);
                }
                w != self.exclude & byte_mask(self.exclude_len)
            }
            _ => false,
        }
    }
}

/// Global settings, slot 0 of the settings array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// MODE_OFF, MODE_AUDIT or MODE_ENFORCE.
    pub mode: u32,
    /// Bumped by every policy (re)load.
    pub generation: u32,
}

/// Slots of the acknowledgement array (`POLICY_ACK`): what a kmodmon has already reported of
/// the kernel's counters, so a restarted one reports only what came since.
pub const ACK_SLOTS: u32 = 2;
/// `POLICY_ACK` slot: denied / would_deny records the kernel counted as lost (ring full, no
/// scratch space) and a kmodmon reported in a `lost` event.
pub const ACK_LOST: u32 = 0;

/// How long (ns) a container's `crypto-*` request lends its decision to the crypto manager's
/// kernel threads that instantiate the same algorithm.
pub const CRYPTO_WINDOW_NS: u64 = 10_000_000_000;
/// Bytes of an algorithm name kept as the key of the crypto-requester map.
pub const CRYPTO_NAME_LEN: usize = 64;

/// Who asked for an algorithm: the decision a `crypto-<alg>` request from a task was judged
/// by, which the crypto manager's threads (`cryptomgr_probe`, `cryptomgr_test`, in the root
/// cgroup) inherit for that algorithm.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CryptoOrigin {
    pub decision: Decision,
    /// The enclosing container's decision that caps `decision` (flags 0: none).
    pub ceiling: Decision,
    /// cgroup id of the requesting task.
    pub cgroup_id: u64,
    /// bpf_ktime_get_ns() of the request.
    pub ktime_ns: u64,
}

/// What the first hook of a module load (kernel_read_file for finit_module, kernel_load_data
/// for init_module) leaves for the later hooks of the same load, keyed by the loading
/// thread's pid_tgid: the decision (the cgroup walk is made once per load) and the file.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LoadStash {
    pub decision: Decision,
    pub ceiling: Decision,
    /// The cgroup that decided.
    pub at: u64,
    /// The `struct file *` being loaded (0: init_module); valid while the syscall runs.
    pub file: u64,
    /// bpf_ktime_get_ns() of the first hook.
    pub ktime_ns: u64,
    /// `DecidedBy` as u32.
    pub how: u32,
    /// `Settings::generation` and `Settings::mode` when it was decided.
    pub generation: u32,
    pub mode: u32,
    /// The file's name up to its first '.', normalized ('-' → '_'), NUL-padded.
    pub stem: [u8; NAME_KEY_LEN],
}

/// How long (ns) a load stash stays valid for the later hooks of the same load.
pub const STASH_WINDOW_NS: u64 = 60_000_000_000;

/// Values from the running kernel's BTF that the LSM programs need, written into their
/// read-only data by userspace before load (never hard-coded: each comes from BTF, and
/// [`crate::OFFSET_UNKNOWN`] marks what BTF lacks).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LsmConfig {
    /// kernfs id of /sys/module (0: unknown, the kernfs program decides nothing).
    pub sys_module_id: u64,
    /// `enum kernel_read_file_id` READING_MODULE.
    pub reading_module: u32,
    /// `enum kernel_load_data_id` LOADING_MODULE.
    pub loading_module: u32,
    /// 1 when the kernel_post_load_data program is attached: kernel_load_data then lets
    /// init_module through to it, where the image is read for the module's name.
    pub name_images: u32,
    /// 1 when the kernel_post_read_file program is attached: kernel_read_file then lets
    /// finit_module through to it, where the bytes the kernel read are named.
    pub name_files: u32,
    /// 1 when the kernfs_init_security program is attached: what the earlier hooks cannot
    /// name (a compressed file the kernel decompresses) is decided by the kernel's own name
    /// of the module as its /sys/module directory is made.
    pub name_kernfs: u32,
    /// Offset of `name` in `struct module`.
    pub module_name: u32,
    // The task's cgroup and its ancestors.
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_level: u32,
    pub cgroup_ancestors: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
    pub kn_name: u32,
    // The crypto manager's threads: task → kthread → their parameter → the algorithm.
    pub task_flags: u32,
    /// `PF_KTHREAD` (include/linux/sched.h; a #define, so not in BTF).
    pub pf_kthread: u32,
    pub task_worker_private: u32,
    pub kthread_data: u32,
    /// `cryptomgr_param.larval` (a pointer).
    pub cryptomgr_param_larval: u32,
    /// `crypto_larval.alg` + `crypto_alg.cra_name` (the algorithm's name in the larval).
    pub crypto_larval_name: u32,
    /// `crypto_test_param.alg`.
    pub crypto_test_param_alg: u32,
    /// The syscall's user registers: orig_ax-like syscall number and the second argument
    /// (finit_module's parameter string).
    pub nr_finit_module: u32,
    pub pt_regs_nr: u32,
    pub pt_regs_arg1: u32,
    pub _reserved: u32,
}

impl LsmConfig {
    /// Nothing known: every program that needs a value fails closed (restricted cgroups
    /// cannot be told apart, so nothing is decided) until userspace fills it in.
    pub const DEFAULT: LsmConfig = LsmConfig {
        sys_module_id: 0,
        reading_module: crate::OFFSET_UNKNOWN,
        loading_module: crate::OFFSET_UNKNOWN,
        name_images: 0,
        name_files: 0,
        name_kernfs: 0,
        module_name: crate::OFFSET_UNKNOWN,
        task_cgroups: crate::OFFSET_UNKNOWN,
        css_set_dfl_cgrp: crate::OFFSET_UNKNOWN,
        cgroup_level: crate::OFFSET_UNKNOWN,
        cgroup_ancestors: crate::OFFSET_UNKNOWN,
        cgroup_kn: crate::OFFSET_UNKNOWN,
        kn_id: crate::OFFSET_UNKNOWN,
        kn_name: crate::OFFSET_UNKNOWN,
        task_flags: crate::OFFSET_UNKNOWN,
        pf_kthread: 0,
        task_worker_private: crate::OFFSET_UNKNOWN,
        kthread_data: crate::OFFSET_UNKNOWN,
        cryptomgr_param_larval: crate::OFFSET_UNKNOWN,
        crypto_larval_name: crate::OFFSET_UNKNOWN,
        crypto_test_param_alg: crate::OFFSET_UNKNOWN,
        nr_finit_module: u32::MAX,
        pt_regs_nr: crate::OFFSET_UNKNOWN,
        pt_regs_arg1: crate::OFFSET_UNKNOWN,
        _reserved: 0,
    };
}

/// No implicit padding: the kernel reads this layout from the programs' read-only data.
const _: () = {
    assert!(core::mem::size_of::<LsmConfig>() == 8 + 24 * 4);
    assert!(core::mem::size_of::<Decision>() == 16);
    assert!(core::mem::size_of::<ParentKey>() == 8 + PARENT_NAME_LEN);
    assert!(core::mem::size_of::<PrefixRule>() == 2 * 3 * 8 + 4 * 4 + 8);
    assert!(core::mem::size_of::<CryptoOrigin>() == 2 * 16 + 2 * 8);
    assert!(core::mem::size_of::<LoadStash>() == 2 * 16 + 3 * 8 + 3 * 4 + NAME_KEY_LEN);
};

/// The section of a module's ELF image that holds its `struct module` (and so its name).
pub const THIS_MODULE_SECTION: &[u8; 26] = b".gnu.linkonce.this_module\0";
/// The section of `key=value` strings where modpost puts `name=<module>`.
pub const MODINFO_SECTION: &[u8; 9] = b".modinfo\0";
/// Section headers the image parser looks at, at most.
pub const MAX_IMAGE_SECTIONS: u32 = 128;
/// Bytes at the end of `.modinfo` searched for `name=` (modpost writes it last).
pub const MODINFO_TAIL: u32 = 256;

#[cfg(test)]
mod tests {
    extern crate std;
    use std::format;

    use super::*;

    fn docker() -> PrefixRule {
        PrefixRule::new(b"docker-", PREFIX_ID64, true, b"")
    }

    #[test]
    fn id64_prefixes_match_container_scopes_only() {
        let id = "a".repeat(64);
        let r = docker();
        assert!(r.matches(format!("docker-{id}.scope").as_bytes()));
        assert!(r.matches(format!("docker-{id}").as_bytes()));
        assert!(!r.matches(b"docker.service"));
        assert!(!r.matches(format!("docker-{id}.slice").as_bytes()));
        assert!(!r.matches(format!("docker-x{id}.scope").as_bytes()));
        let lib = PrefixRule::new(b"libpod-", PREFIX_ID64, true, b"");
        assert!(lib.matches(format!("libpod-{id}.scope").as_bytes()));
        assert!(!lib.matches(format!("libpod-conmon-{id}.scope").as_bytes()));
        let long = PrefixRule::new(b"cri-containerd-", PREFIX_ID64, true, b"");
        assert!(long.matches(format!("cri-containerd-{id}.scope").as_bytes()));
        assert!(!long.matches(format!("cri-container-{id}.scope").as_bytes()));
    }

    #[test]
    fn named_prefixes_honour_scope_and_exclusions() {
        let m = PrefixRule::new(b"machine-", PREFIX_NAMED, true, b"qemu\\x2d");
        assert!(m.matches(b"machine-web.scope"));
        assert!(!m.matches(b"machine-web"));
        assert!(!m.matches(b"machine-qemu\\x2d1\\x2dvm.scope"));
        assert!(!m.matches(b"machine-.scope"), "an empty name is none");
        let lxc = PrefixRule::new(b"lxc.payload.", PREFIX_NAMED, false, b"");
        assert!(lxc.matches(b"lxc.payload.web"));
        assert!(!lxc.matches(b"lxc.payload."));
        assert!(!lxc.matches(b"lxc.monitor.web"));
        assert!(!PrefixRule::default().matches(b"anything"));
    }

    #[test]
    fn masks_keep_leading_bytes() {
        assert_eq!(byte_mask(0), 0);
        assert_eq!(byte_mask(1), 0xff);
        assert_eq!(byte_mask(8), u64::MAX);
        assert_eq!(SCOPE_WORD & SCOPE_MASK, SCOPE_WORD);
    }
}
