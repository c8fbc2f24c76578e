//! Module identity: the image the kernel received, copied to userspace on its own ring buffer
//! (`IMAGES`) so kmodmon can hash it and read its `.modinfo` and signature trailer.
//!
//! One capture is a [`ImageHeader`] followed by the [`ImageChunk`]s of the image, all with the
//! same `id`. The header is reserved first and submitted last (after every chunk), so a reader
//! sees it before the chunks and it already says how many chunks were sent and whether the
//! capture is complete. [`ImageVerdict`] records the kernel's signature verdict for a module
//! that loaded (`struct module`'s `sig_ok`, read at `module:module_load`).

/// Bytes of image per chunk record.
pub const IMAGE_CHUNK_LEN: usize = 64 * 1024;
/// Most chunks one capture sends (the loop bound of the capture program): 16 MiB images.
pub const IMAGE_MAX_CHUNKS: u32 = 256;
/// Bytes of module name in an [`ImageVerdict`] (MODULE_NAME_LEN).
pub const VERDICT_NAME_LEN: usize = 64;

/// `kind`, the first u32 of every record on the IMAGES ring.
pub mod image_kind {
    pub const HEADER: u32 = 1;
    pub const CHUNK: u32 = 2;
    pub const VERDICT: u32 = 3;
}

/// Bits of [`ImageHeader::status`]: why a capture is incomplete (0 = complete).
pub mod image_status {
    /// The image is larger than the capture limit (`max_chunks` chunks): no chunk was sent.
    pub const TOO_LARGE: u32 = 1 << 0;
    /// The ring buffer had no room for a chunk: the chunks after `chunks` are missing.
    pub const RING_FULL: u32 = 1 << 1;
    /// Reading the image out of kernel memory failed at chunk `chunks`.
    pub const READ_FAILED: u32 = 1 << 2;
    /// The image pointer or length could not be read (BTF offsets missing, bad pointer).
    pub const NO_IMAGE: u32 = 1 << 3;
}

/// Where a capture was taken ([`ImageHeader::via`]).
pub mod image_via {
    /// fentry on `load_module`: the image about to be parsed (finit_module: the file's bytes
    /// as read, after the kernel's own decompression; init_module: the copied user buffer).
    pub const LOAD_MODULE: u32 = 1;
    /// fentry on `security_kernel_post_load_data` (init_module, before the LSM decides):
    /// the same bytes load_module would get, captured even when an LSM denies the load.
    pub const POST_LOAD_DATA: u32 = 2;
}

/// [`ImageVerdict::sig_ok`] when the kernel's BTF has no `module.sig_ok`.
pub const SIG_OK_UNKNOWN: u32 = 2;

/// Starts a capture (see the module documentation).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ImageHeader {
    /// [`image_kind::HEADER`].
    pub kind: u32,
    /// [`image_status`] bits; 0 when every byte was sent.
    pub status: u32,
    pub pid: u32,
    pub tid: u32,
    /// bpf_ktime_get_ns() when the capture started; the chunks carry the same id.
    pub id: u64,
    /// Length of the image the kernel handed over.
    pub len: u64,
    /// Chunks sent (each [`IMAGE_CHUNK_LEN`] bytes but the last).
    pub chunks: u32,
    /// load_module's `flags` (MODULE_INIT_*), 0 for [`image_via::POST_LOAD_DATA`].
    pub load_flags: u32,
    pub cgroup_id: u64,
    /// Inode number of the loading task's mount namespace (0 when unreadable).
    pub mnt_ns: u32,
    /// [`image_via`].
    pub via: u32,
}

/// A piece of an image.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ImageChunk {
    /// [`image_kind::CHUNK`].
    pub kind: u32,
    /// Valid bytes in `data`.
    pub len: u32,
    /// The capture's [`ImageHeader::id`].
    pub id: u64,
    pub tid: u32,
    /// Position: the chunk's bytes start at `index * IMAGE_CHUNK_LEN`.
    pub index: u32,
    pub data: [u8; IMAGE_CHUNK_LEN],
}

/// The kernel's signature verdict on a module that loaded (module:module_load).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ImageVerdict {
    /// [`image_kind::VERDICT`].
    pub kind: u32,
    /// `struct module`'s `sig_ok`: 1 a valid signature, 0 none or not verified,
    /// [`SIG_OK_UNKNOWN`] when the kernel's BTF has no such member.
    pub sig_ok: u32,
    pub ktime_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// `struct module`'s `taints` (TAINT_* bits of this module).
    pub taints: u64,
    pub name: [u8; VERDICT_NAME_LEN],
}

/// What the identity programs need to know about this kernel, from BTF (OFFSET_UNKNOWN when
/// absent), written into `KMODMON_IDENTITY_CONFIG` before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityConfig {
    /// `struct load_info`: `hdr`, `len`.
    pub load_info_hdr: u32,
    pub load_info_len: u32,
    /// `struct module`: `sig_ok`, `taints`, `name`.
    pub module_sig_ok: u32,
    pub module_taints: u32,
    pub module_name: u32,
    /// task_struct.nsproxy, nsproxy.mnt_ns, and mnt_namespace.ns + ns_common.inum.
    pub task_nsproxy: u32,
    pub nsproxy_mnt_ns: u32,
    pub mnt_ns_inum: u32,
    /// Most chunks per capture (≤ [`IMAGE_MAX_CHUNKS`]; the ring's size sets it).
    pub max_chunks: u32,
    /// `enum kernel_load_data_id` LOADING_MODULE (BTF).
    pub loading_module: u32,
}

impl IdentityConfig {
    pub const UNSET: IdentityConfig = IdentityConfig {
        load_info_hdr: crate::OFFSET_UNKNOWN,
        load_info_len: crate::OFFSET_UNKNOWN,
        module_sig_ok: crate::OFFSET_UNKNOWN,
        module_taints: crate::OFFSET_UNKNOWN,
        module_name: crate::OFFSET_UNKNOWN,
        task_nsproxy: crate::OFFSET_UNKNOWN,
        nsproxy_mnt_ns: crate::OFFSET_UNKNOWN,
        mnt_ns_inum: crate::OFFSET_UNKNOWN,
        max_chunks: 0,
        loading_module: 2,
    };
}

/// No implicit padding in any record (the kernel must not leak uninitialised bytes).
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(offset_of!(ImageHeader, via) + 4 == size_of::<ImageHeader>());
    assert!(offset_of!(ImageChunk, data) == 24);
    assert!(offset_of!(ImageChunk, data) + IMAGE_CHUNK_LEN == size_of::<ImageChunk>());
    assert!(offset_of!(ImageVerdict, name) + VERDICT_NAME_LEN == size_of::<ImageVerdict>());
    assert!(offset_of!(ImageVerdict, taints) == 24);
};
