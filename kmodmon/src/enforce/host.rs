//! What this kernel allows: is the BPF LSM active, does the kernel load modules at all, is
//! bpffs mounted.
use std::path::Path;

use super::EnforceError;

const SECURITYFS: &str = "/sys/kernel/security";
const LSM_LIST: &str = "/sys/kernel/security/lsm";
pub const BPFFS: &str = "/sys/fs/bpf";

/// The active LSMs, in order (mounting securityfs when it is not mounted and we may).
pub fn active_lsms() -> Result<Vec<String>, EnforceError> {
    if !Path::new(LSM_LIST).exists() {
        mount_if_missing(SECURITYFS, "securityfs")?;
    }
    let text = std::fs::read_to_string(LSM_LIST).map_err(|e| {
        EnforceError::Host(format!(
            "cannot read {LSM_LIST}: {e} (mount it with `mount -t securityfs securityfs {SECURITYFS}`)"
        ))
    })?;
    Ok(parse_lsm_list(&text))
}

pub fn parse_lsm_list(text: &str) -> Vec<String> {
    text.trim()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Fails with instructions when the BPF LSM is not among the active LSMs.
pub fn require_bpf_lsm() -> Result<Vec<String>, EnforceError> {
    let lsms = active_lsms()?;
    if lsms.iter().any(|l| l == "bpf") {
        return Ok(lsms);
    }
    Err(EnforceError::BpfLsmInactive {
        active: lsms.join(","),
    })
}

/// The `lsm=` value to suggest: the active list with bpf appended.
pub fn suggested_lsm_param(active: &str) -> String {
    if active.is_empty() {
        "lsm=lockdown,capability,landlock,yama,apparmor,bpf".to_string()
    } else {
        format!("lsm={active},bpf")
    }
}

/// Why enforcement has nothing to hook on a kernel without module support.
pub const NO_MODULES_EXPLANATION: &str = "this kernel has no module support (CONFIG_MODULES is \
    unset: there is no /proc/modules). init_module and finit_module fail with ENOSYS before any \
    LSM hook runs and request_module is an empty stub, so the kernel_module_request, \
    kernel_read_file(READING_MODULE) and kernel_load_data(LOADING_MODULE) hooks exist in BTF and \
    can be attached, but they never fire for a module: enforcement has nothing to hook, and \
    nothing can load a module here anyway";

/// Mounts bpffs at /sys/fs/bpf when it is not mounted.
pub fn ensure_bpffs() -> Result<(), EnforceError> {
    if is_fs(BPFFS, "bpf") {
        return Ok(());
    }
    mount_if_missing(BPFFS, "bpf")
}

fn is_fs(dir: &str, fstype: &str) -> bool {
    crate::mounts::is_mounted(Path::new(dir), fstype)
}

fn mount_if_missing(dir: &str, fstype: &str) -> Result<(), EnforceError> {
    if is_fs(dir, fstype) {
        return Ok(());
    }
    nix::mount::mount(
        Some(fstype),
        dir,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        EnforceError::Host(format!(
            "{dir} is not mounted and mounting {fstype} there failed: {e} (run as root, or \
             `mount -t {fstype} {fstype} {dir}`)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsm_list_parses_and_suggestion_appends_bpf() {
        let l = parse_lsm_list("lockdown,capability,landlock\n");
        assert_eq!(l, ["lockdown", "capability", "landlock"]);
        assert_eq!(
            suggested_lsm_param(&l.join(",")),
            "lsm=lockdown,capability,landlock,bpf"
        );
        assert!(parse_lsm_list("").is_empty());
    }
}
