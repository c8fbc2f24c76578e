//! Module names as the kernel treats them: '-' and '_' are the same character, and a name is
//! at most 55 bytes (MODULE_NAME_LEN - 1) of printable, non-space, non-slash characters. A
//! module file (`ip_vs.ko.xz`) names its module: [`from_file`] is the one place that reads a
//! name out of a file name (kmodmon_common::modname, shared with the eBPF policy's file-name
//! keys, the tests and xtask).
use thiserror::Error;

pub use kmodmon_common::modname::{FILE_SUFFIXES, file_stem, from_file, normalize};

/// Longest module name the kernel accepts (MODULE_NAME_LEN - 1 on 64-bit).
pub const MAX_NAME_LEN: usize = 55;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("empty module name")]
    Empty,
    #[error("module name {0:?} is longer than {MAX_NAME_LEN} bytes")]
    TooLong(String),
    #[error("module name {0:?} contains {1:?}, which no module name can contain")]
    BadChar(String, char),
}

/// Checks a module name the way the kernel and kmod would, and returns its canonical form.
pub fn validate(name: &str) -> Result<String, NameError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.to_string()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_graphic()) || matches!(c, '/' | ',' | '=' | '\\'))
    {
        return Err(NameError::BadChar(name.to_string(), c));
    }
    Ok(normalize(name))
}

/// Whether two module names denote the same module.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .all(|(x, y)| x == y || matches!((x, y), (b'-', b'_') | (b'_', b'-')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dash_and_underscore_are_equivalent() {
        assert!(same("ip-vs", "ip_vs"));
        assert!(!same("ip_vs", "ip_vs_wrr"));
        assert_eq!(normalize("nf-conntrack"), "nf_conntrack");
    }

    #[test]
    fn validation_rejects_what_the_kernel_would() {
        assert_eq!(validate(" ip_vs ").as_deref(), Ok("ip_vs"));
        assert_eq!(validate(""), Err(NameError::Empty));
        assert!(matches!(validate("a/b"), Err(NameError::BadChar(_, '/'))));
        assert!(matches!(validate("a b"), Err(NameError::BadChar(_, ' '))));
        assert!(matches!(validate("é"), Err(NameError::BadChar(_, 'é'))));
        assert!(matches!(
            validate(&"x".repeat(56)),
            Err(NameError::TooLong(_))
        ));
        assert!(validate(&"x".repeat(55)).is_ok());
    }
}
