//! Policy enforcement (BPF LSM): the maps userspace fills and the LSM programs read.

/// Bytes of a module (or autoload request) name in an allow-set key: MODULE_NAME_LEN, which
/// is also the longest name `request_module` passes on. Names are stored normalized
/// ('-' → '_'), NUL-padded.
pub const NAME_KEY_LEN: usize = 60;
/// How many cgroup levels the programs look up, deepest first.
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Key of the entry that applies to cgroups with no mapped ancestor (the host).
pub const HOST_KEY: u64 = 0;

/// `Settings::mode`.
pub const MODE_OFF: u32 = 0;
pub const MODE_AUDIT: u32 = 1;
pub const MODE_ENFORCE: u32 = 2;

/// `Decision::flags`: only modules in `allow_set` may load; everything else is denied.
pub const RESTRICTED: u32 = 1 << 0;

/// What applies to one cgroup (and the cgroups below it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Policy rule id, reported in denied / would_deny events.
    pub rule: u32,
    /// Allow-set id ([`AllowKey::set`]).
    pub allow_set: u32,
    /// [`RESTRICTED`] or 0 (everything allowed).
    pub flags: u32,
    pub _reserved: u32,
}

/// Key of the allow-set map: (set id, normalized name).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowKey {
    pub set: u32,
    pub name: [u8; NAME_KEY_LEN],
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

/// `enum kernel_read_file_id` / `enum kernel_load_data_id` values the programs compare
/// against, resolved from BTF by userspace (written into `KMODMON_LSM_CONFIG`), and how
/// init_module images are named.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LsmConfig {
    pub reading_module: u32,
    pub loading_module: u32,
    /// 1 when the kernel_post_load_data program is attached: kernel_load_data then lets
    /// init_module through to it, where the image is read for the module's name.
    pub name_images: u32,
    /// Offset of `name` in `struct module` (BTF), or OFFSET_UNKNOWN.
    pub module_name: u32,
}

impl LsmConfig {
    /// The values in every kernel since 5.7 (include/linux/kernel_read_file.h); images not
    /// named.
    pub const DEFAULT: LsmConfig = LsmConfig {
        reading_module: 2,
        loading_module: 2,
        name_images: 0,
        module_name: crate::OFFSET_UNKNOWN,
    };
}

/// The section of a module's ELF image that holds its `struct module` (and so its name).
pub const THIS_MODULE_SECTION: &[u8; 26] = b".gnu.linkonce.this_module\0";
/// Section headers the image parser looks at, at most.
pub const MAX_IMAGE_SECTIONS: u32 = 128;
