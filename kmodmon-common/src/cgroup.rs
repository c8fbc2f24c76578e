//! cgroup2 directory records (cgroup:cgroup_mkdir / cgroup_rmdir), on their own ring buffer.

/// cgroup path bytes carried by cgroup mkdir/rmdir records.
pub const CGROUP_PATH_LEN: usize = 256;

/// A cgroup2 directory was created or removed (cgroup:cgroup_mkdir / cgroup_rmdir).
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
}

pub const CGROUP_MKDIR: u32 = 1;
pub const CGROUP_RMDIR: u32 = 2;
