//! Enforcement policy: which modules each container (and the host) may load.
//!
//! A TOML file (default [`DEFAULT_PATH`]) is parsed with unknown keys rejected and every error
//! located at a line and column; [`Policy::decide`] gives the effective decision for one
//! container. The kernel side of enforcement lives in `crate::enforce`.
//!
//! ```toml
//! mode = "enforce"              # or "audit": decide and report would_deny, never deny
//!
//! [host]                        # processes outside containers
//! restrict = false              # default: the host loads anything
//!
//! [unselected]                  # containers no rule selects
//! restrict = true               # default: only `allow` may load
//! allow = []
//!
//! [[rule]]                      # first matching rule wins
//! name = "load-balancers"
//! container_name = "lb-*"       # also: runtime, container_id (prefix), k8s_namespace, pod_labels
//! allow = ["ip_vs"]
//! trust_kernel_modules = true   # also allow what the container's KERNEL_MODULES declares
//! signed = true                 # and every module must carry a signature the kernel verified
//!
//! container_parents = ["/ci-runners"]  # (top level) cgroups whose children are containers
//! ```
//!
//! `allow` may also pin images: `"sha256:<64 hex>"`. The kernel decides by name before it has
//! read the image, so pins and `signed` are verified right after each load from the image's
//! identity (crate::identity) and a violation is an `identity_mismatch` event.
mod decide;
mod file;
mod show;

use std::{collections::BTreeSet, fmt, path::Path};

pub use self::{
    decide::{Effective, RuleRef, Subject},
    show::{PolicyArgs, PolicyCommand, run},
};

/// Where the policy is read from unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/kmodmon/policy.toml";

/// Whether a denial is enforced or only reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Decide, report `would_deny`, let the load proceed.
    Audit,
    /// Decide, return -EPERM and report `denied`.
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Audit => "audit",
            Mode::Enforce => "enforce",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "audit" => Some(Mode::Audit),
            "enforce" => Some(Mode::Enforce),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a rule, the host or unselected containers may load.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowance {
    /// false: anything may load.
    pub restrict: bool,
    /// Normalized module names (or autoload request strings).
    pub allow: BTreeSet<String>,
    /// Whether the container's own KERNEL_MODULES joins `allow`.
    pub trust_kernel_modules: bool,
    /// `sha256:HEX` entries of `allow`: every module loaded under this allowance must be one
    /// of these images (checked after the load: the kernel decides by name first).
    pub pins: BTreeSet<String>,
    /// `signed = true`: every module loaded under this allowance must carry a signature the
    /// kernel verified (`sig_ok`; checked after the load).
    pub signed: bool,
}

/// Which containers a rule selects: every given field must match.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub runtime: Option<String>,
    pub container_id: Option<String>,
    pub container_name: Option<glob::Pattern>,
    pub k8s_namespace: Option<String>,
    pub pod_labels: std::collections::BTreeMap<String, String>,
}

impl Selector {
    fn is_empty(&self) -> bool {
        self.runtime.is_none()
            && self.container_id.is_none()
            && self.container_name.is_none()
            && self.k8s_namespace.is_none()
            && self.pod_labels.is_empty()
    }

    fn same_as(&self, other: &Selector) -> bool {
        self.runtime == other.runtime
            && self.container_id == other.container_id
            && self.container_name.as_ref().map(glob::Pattern::as_str)
                == other.container_name.as_ref().map(glob::Pattern::as_str)
            && self.k8s_namespace == other.k8s_namespace
            && self.pod_labels == other.pod_labels
    }
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    /// Line of the `[[rule]]` in the file (1-based).
    pub line: usize,
    pub selector: Selector,
    pub allowance: Allowance,
}

/// A validated policy.
#[derive(Clone, Debug)]
pub struct Policy {
    pub mode: Mode,
    /// cgroup2 paths (`/a/b`, no trailing `/`) whose children are containers, besides the
    /// built-in ones (`crate::enforce::cgroups::BUILTIN_PARENTS`).
    pub container_parents: Vec<String>,
    pub host: Allowance,
    pub unselected: Allowance,
    pub rules: Vec<Rule>,
}

/// One problem in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Everything wrong with a policy file (never empty).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub struct PolicyError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: {}", self.file, p.line, p.column, p.message)?;
        }
        Ok(())
    }
}

/// Reading a policy failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "cannot read policy {path}: {source} (write one — see `kmodmon policy --help` — or pass another path)"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] PolicyError),
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let mut cut = offset;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let before = &text[..cut];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Policy::parse(&text, &path.display().to_string())?)
    }

    /// Parses and validates policy text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Policy, PolicyError> {
        let err = |problems| PolicyError {
            file: file.to_string(),
            problems,
        };
        let raw: file::File = toml::from_str(text).map_err(|e| {
            let (line, column) = line_col(text, e.span().map_or(0, |s| s.start));
            err(vec![Problem {
                line,
                column,
                message: e.message().trim().to_string(),
            }])
        })?;
        let mut v = decide::Validator::new(text);
        let policy = v.policy(raw);
        match policy {
            Some(p) if v.problems.is_empty() => Ok(p),
            _ => Err(err(v.problems)),
        }
    }

    /// The id the kernel reports for a rule (0 host, 1 unselected, 2.. rules in file order).
    pub fn rule_id(r: RuleRef) -> u32 {
        match r {
            RuleRef::Host => 0,
            RuleRef::Unselected => 1,
            RuleRef::Rule(i) => u32::try_from(i).unwrap_or(u32::MAX - 2).saturating_add(2),
        }
    }

    /// A rule id from the kernel, in words.
    pub fn describe_rule(&self, id: u32) -> String {
        match id {
            0 => "host".to_string(),
            1 => "unselected containers".to_string(),
            n => match self.rules.get((n - 2) as usize) {
                Some(r) => format!("rule {:?} (line {})", r.name, r.line),
                None => format!("rule #{n} (not in the current policy)"),
            },
        }
    }
}

#[cfg(test)]
mod tests;
