//! `--fix`: adds the modules that are expected but not configured to load at boot to
//! ROOT/etc/modules-load.d/kmodmon.conf. When the kmodmon.conf in effect lives in a directory
//! of lower precedence (/usr/lib/modules-load.d), its lines are kept, since the new file hides
//! it. Written atomically (temporary file + rename), never through a symlink.
use std::io::Write as _;
use std::path::Path;

use super::conf::FileState;
use super::report::{FixSummary, Report};
use super::{CheckError, Status};
use crate::host::moddb::RootFs;

/// Logical path of the file `--fix` writes.
pub const FIX_FILE: &str = "/etc/modules-load.d/kmodmon.conf";
const FIX_NAME: &str = "kmodmon.conf";

const HEADER: &str = "# Written by `kmodmon check --fix`: modules expected on this host (configured in a place\n\
# that is not read at boot, or declared by a container) that were not configured to load at boot.\n";

/// What `--fix` would write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixPlan {
    pub added: Vec<String>,
    /// Expected modules left out, and why.
    pub skipped: Vec<(String, String)>,
    pub old: String,
    pub new: String,
}

/// The plan, or `None` when nothing needs adding.
pub fn plan(root: &RootFs, report: &Report) -> Result<Option<FixPlan>, CheckError> {
    let added: Vec<String> = report
        .modules
        .iter()
        .filter(|m| m.fixable)
        .map(|m| m.module.clone())
        .collect();
    let skipped: Vec<(String, String)> = report
        .modules
        .iter()
        .filter(|m| matches!(m.status, Status::NotAvailable | Status::Blacklisted))
        .map(|m| {
            let why = if m.status == Status::NotAvailable {
                "this kernel does not have it".to_string()
            } else {
                "it is blacklisted; listing it would not load it".to_string()
            };
            (m.module.clone(), why)
        })
        .collect();
    if added.is_empty() {
        return Ok(None);
    }
    let current = report
        .modules_load_d
        .iter()
        .find(|f| f.name == FIX_NAME && !matches!(f.state, FileState::Shadowed(_)));
    let old = match current {
        Some(f) if f.state == FileState::Masked && f.path == FIX_FILE && f.target.is_some() => {
            return Err(CheckError::Fix(format!(
                "{FIX_FILE} masks kmodmon.conf (it links to {}); remove that link or add the modules elsewhere by hand",
                f.read_path().display()
            )));
        }
        // A mask in a directory of lower precedence is overridden by the new file.
        Some(f) if f.state == FileState::Used => root
            .read_text(f.read_path())
            .map_err(|source| CheckError::Io {
                path: root.real(f.read_path()),
                source,
            })?
            .unwrap_or_default(),
        _ => String::new(),
    };
    let mut new = old.clone();
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    if !new.contains("kmodmon check --fix") {
        new.push_str(HEADER);
    }
    for m in &added {
        new.push_str(m);
        new.push('\n');
    }
    Ok(Some(FixPlan {
        added,
        skipped,
        old,
        new,
    }))
}

impl FixPlan {
    /// Unified diff of the change, with paths relative to the root.
    pub fn diff(&self) -> String {
        similar::TextDiff::from_lines(&self.old, &self.new)
            .unified_diff()
            .context_radius(3)
            .header(&format!("a{FIX_FILE}"), &format!("b{FIX_FILE}"))
            .to_string()
    }

    pub fn summary(&self, written: bool) -> FixSummary {
        FixSummary {
            path: FIX_FILE.into(),
            added: self.added.clone(),
            written,
        }
    }

    /// Writes ROOT/etc/modules-load.d/kmodmon.conf (mode 0644), replacing what is there.
    pub fn write(&self, root: &RootFs) -> Result<(), CheckError> {
        let dir_logical = Path::new(FIX_FILE).parent().unwrap_or(Path::new("/"));
        let dir = root
            .resolve_real(dir_logical)
            .map_err(|source| CheckError::Io {
                path: root.real(dir_logical),
                source,
            })?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let target = dir.join(FIX_NAME);
        let tmp = dir.join(format!(".{FIX_NAME}.kmodmon-{}", std::process::id()));
        let result = (|| -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(self.new.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &target)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io(&target))
    }
}
