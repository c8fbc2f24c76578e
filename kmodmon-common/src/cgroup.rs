//! cgroup directory records (cgroup:cgroup_mkdir / cgroup_rmdir) of the cgroup2 hierarchy and
//! of the one cgroup v1 hierarchy userspace follows, on their own ring buffer.

/// cgroup path bytes carried by cgroup mkdir/rmdir records.
pub const CGROUP_PATH_LEN: usize = 256;

/// A cgroup directory was created or removed (cgroup:cgroup_mkdir / cgroup_rmdir).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawCgroupEvent {
    /// 1 = mkdir, 2 = rmdir.
    pub op: u32,
    /// Bitmask: 1 = path truncated.
    pub truncated: u32,
    pub id: u64,
    pub ktime_ns: u64,
    pub path: [u8; CGROUP_PATH_LEN],
    /// The hierarchy (the tracepoint's `root`): `Config::cgroup_dfl_hierarchy` for cgroup2,
    /// `Config::cgroup_v1_hierarchy` for the v1 hierarchy followed. `id` is unique only within
    /// one hierarchy.
    pub hierarchy: u32,
    pub _reserved: u32,
}

/// The cgroup2 (default) hierarchy's id: the `0::` line of /proc/PID/cgroup, and the `root`
/// of its cgroup tracepoint records.
pub const CGROUP_DFL_HIERARCHY: u32 = 0;

pub const CGROUP_MKDIR: u32 = 1;
pub const CGROUP_RMDIR: u32 = 2;
