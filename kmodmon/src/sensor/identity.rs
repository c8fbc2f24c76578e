//! The identity programs (kmodmon-ebpf `identity.rs`): what this kernel's BTF says about
//! `struct load_info`, `struct module` and mount namespaces, and attaching the programs.
//!
//! Mechanism (the same on every kernel with BTF and fentry, 5.10 included): fentry on
//! `load_module` copies `info->hdr[0..info->len]` — the image the kernel is about to parse,
//! after its own decompression where it decompresses (6.12 `MODULE_INIT_COMPRESSED_FILE`) —
//! to the IMAGES ring in 64 KiB chunks; fentry on `security_kernel_post_load_data` does the
//! same for init_module before the LSMs decide; a raw tracepoint on `module_load` reads the
//! kernel's `mod->sig_ok`.
use aya::{
    Btf, Ebpf,
    programs::{FEntry, RawTracePoint},
};
use kmodmon_common::{
    OFFSET_UNKNOWN,
    identity::{IMAGE_CHUNK_LEN, IMAGE_MAX_CHUNKS, IdentityConfig},
    names::program,
};

use super::{SensorError, btf::KernelBtf, with_program};

/// Bytes of the IMAGES ring: the largest image that can be captured whole (less one chunk of
/// room for the records' headers), 16 MiB: every module of the Debian kernels tested fits.
pub const RING_BYTES: u32 = 16 << 20;

/// The identity programs' configuration for this kernel, and the members BTF lacks.
pub fn config(kbtf: &KernelBtf) -> (IdentityConfig, Vec<String>) {
    let mut missing = Vec::new();
    let mut get = |s: &str, m: &str| -> u32 {
        kbtf.member_offset(s, m).unwrap_or_else(|| {
            missing.push(format!("{s}.{m}"));
            OFFSET_UNKNOWN
        })
    };
    let ns = get("mnt_namespace", "ns");
    let inum = get("ns_common", "inum");
    let cfg = IdentityConfig {
        load_info_hdr: get("load_info", "hdr"),
        load_info_len: get("load_info", "len"),
        module_sig_ok: get("module", "sig_ok"),
        module_taints: get("module", "taints"),
        module_name: get("module", "name"),
        task_nsproxy: get("task_struct", "nsproxy"),
        nsproxy_mnt_ns: get("nsproxy", "mnt_ns"),
        mnt_ns_inum: if ns == OFFSET_UNKNOWN || inum == OFFSET_UNKNOWN {
            OFFSET_UNKNOWN
        } else {
            ns + inum
        },
        max_chunks: max_chunks(RING_BYTES),
        loading_module: kbtf
            .enum_value("kernel_load_data_id", "LOADING_MODULE")
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or_else(|| {
                missing.push("enum kernel_load_data_id LOADING_MODULE".to_string());
                u32::MAX
            }),
    };
    (cfg, missing)
}

/// Chunks one capture may send with a ring of `ring_bytes` (each record has an 8-byte
/// ring header; one chunk's worth is left for the capture's header and verdicts).
pub fn max_chunks(ring_bytes: u32) -> u32 {
    let per = IMAGE_CHUNK_LEN as u32 + 24 + 8;
    (ring_bytes / per).saturating_sub(1).min(IMAGE_MAX_CHUNKS)
}

/// The largest image captured whole.
pub fn max_image_bytes() -> u64 {
    u64::from(max_chunks(RING_BYTES)) * IMAGE_CHUNK_LEN as u64
}

/// Whether this kernel can have identity at all: the function to hook and the image's
/// location in `struct load_info`.
pub fn supported(kbtf: &KernelBtf, cfg: &IdentityConfig) -> Result<(), String> {
    if !kbtf.has_func("load_module") {
        return Err("the kernel's BTF has no load_module function (no module support?)".into());
    }
    if cfg.load_info_hdr == OFFSET_UNKNOWN || cfg.load_info_len == OFFSET_UNKNOWN {
        return Err("the kernel's BTF has no struct load_info hdr/len".into());
    }
    Ok(())
}

/// Loads and attaches the identity programs. The capture on `load_module` is required;
/// the init_module capture before the LSMs and the sig_ok verdict are optional (a failure
/// there is returned as a note).
pub fn attach(ebpf: &mut Ebpf, btf: &Btf, kbtf: &KernelBtf) -> Result<Vec<String>, SensorError> {
    with_program(
        ebpf,
        program::IDENTITY_LOAD_MODULE,
        "fentry load_module".into(),
        |p: &mut FEntry| {
            p.load("load_module", btf)?;
            p.attach().map(drop)
        },
    )?;
    let mut notes = Vec::new();
    if kbtf.has_func("security_kernel_post_load_data")
        && let Err(e) = with_program(
            ebpf,
            program::IDENTITY_POST_LOAD_DATA,
            "fentry security_kernel_post_load_data".into(),
            |p: &mut FEntry| {
                p.load("security_kernel_post_load_data", btf)?;
                p.attach().map(drop)
            },
        )
    {
        notes.push(format!(
            "identity: init_module images denied by an LSM have no identity ({})",
            first_line(&e.to_string())
        ));
    }
    if let Err(e) = with_program(
        ebpf,
        program::IDENTITY_MODULE_LOAD,
        "raw tracepoint module_load".into(),
        |p: &mut RawTracePoint| {
            p.load()?;
            p.attach("module_load").map(drop)
        },
    ) {
        notes.push(format!(
            "identity: the kernel's signature verdict (sig_ok) is unavailable ({})",
            first_line(&e.to_string())
        ));
    }
    Ok(notes)
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_holds_its_largest_image() {
        let n = max_chunks(RING_BYTES);
        assert_eq!(n, 254);
        let per = IMAGE_CHUNK_LEN as u64 + 32;
        assert!(u64::from(n + 1) * per <= u64::from(RING_BYTES));
        assert!(max_image_bytes() > 10 << 20, "a 10 MB module fits");
        assert_eq!(max_chunks(4096), 0);
    }
}
