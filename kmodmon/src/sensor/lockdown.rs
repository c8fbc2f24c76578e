//! Kernel lockdown (/sys/kernel/security/lockdown). In `confidentiality` mode the kernel refuses
//! eBPF helpers that read kernel memory (bpf_probe_read_kernel and friends), so tracing
//! programs like kmodmon's cannot load; `integrity` mode (the usual Secure Boot default) does
//! not affect them.
use std::path::Path;

pub const PATH: &str = "/sys/kernel/security/lockdown";

/// The selected mode in the file's text (`none [integrity] confidentiality` → `integrity`).
pub fn parse(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
}

/// The running kernel's lockdown mode, when securityfs shows it.
pub fn mode() -> Option<String> {
    let text = std::fs::read_to_string(Path::new(PATH)).ok()?;
    parse(&text).map(str::to_string)
}

/// What to tell the user when the mode stops kmodmon.
pub fn blocking_note() -> Option<String> {
    (mode()? == "confidentiality").then(|| {
        format!(
            "the kernel is locked down in confidentiality mode ({PATH}): eBPF may not read \
             kernel memory, so kmodmon's programs are refused; boot with lockdown=integrity \
             (or without lockdown) to run kmodmon"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_mode_is_the_bracketed_one() {
        assert_eq!(parse("[none] integrity confidentiality\n"), Some("none"));
        assert_eq!(
            parse("none integrity [confidentiality]\n"),
            Some("confidentiality")
        );
        assert_eq!(parse(""), None);
        assert_eq!(parse("none integrity"), None);
    }
}
