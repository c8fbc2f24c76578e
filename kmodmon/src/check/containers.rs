//! What running containers expect: their `KERNEL_MODULES`. The check takes a plain list
//! ([`ContainerExpectation`]); where the list comes from is decided here.
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{CheckError, Warning};
use crate::escape::escape_bytes;
use crate::host::moddb::RootFs;
use std::time::{Duration, Instant};

use crate::host::runtime_state::StateConfig;
use crate::host::tracking::DeclState;
use crate::host::{Registry, RegistryOptions};
use crate::modname;

/// One container and the modules it declares.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerExpectation {
    pub container_id: String,
    /// docker, containerd, cri-o, podman, isulad, runc, ...
    pub runtime: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Module names as declared (normalised by the check).
    pub modules: Vec<String>,
    /// Where they were declared: `KERNEL_MODULES`, or `annotation KEY` (absent in a
    /// `--containers-file` that does not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared_in: Option<String>,
}

impl ContainerExpectation {
    /// "web (docker 3f2a9c1b4d5e)".
    pub fn describe(&self) -> String {
        let short: String = self.container_id.chars().take(12).collect();
        match &self.name {
            Some(name) if *name != self.container_id => {
                format!("{name} ({} {short})", self.runtime)
            }
            _ => format!("{} {short}", self.runtime),
        }
    }
}

/// The container list and where it came from.
#[derive(Clone, Debug, Default)]
pub struct ContainerInputs {
    pub list: Vec<ContainerExpectation>,
    /// "runtime state", "file PATH", "not checked (--no-containers)".
    pub source: String,
    /// Running containers seen, including those that declare nothing.
    pub running: usize,
    pub warnings: Vec<Warning>,
}

/// Running containers of the root, as the host registry knows them (runtime state under the
/// root for an offline root), with what each declares.
pub fn from_runtime_state(root: &RootFs) -> ContainerInputs {
    let opts = if root.is_host() {
        RegistryOptions {
            no_moddb: true,
            ..RegistryOptions::default()
        }
    } else {
        RegistryOptions {
            state: Some(StateConfig::under(root.dir())),
            cgroup_root: Some(root.dir().join("sys/fs/cgroup")),
            live_root: Some(root.dir().to_path_buf()),
            no_moddb: true,
            ..RegistryOptions::default()
        }
    };
    let mut registry = Registry::open(opts);
    registry.settle(Instant::now() + SETTLE);
    from_registry(&registry)
}

/// The running containers a registry knows (the daemon passes its live one), with what each
/// declares; declarations still being read are left out with a warning.
pub fn from_registry(registry: &Registry) -> ContainerInputs {
    let running = registry.running();
    let mut out = ContainerInputs {
        source: "runtime state".into(),
        running: running.len(),
        ..Default::default()
    };
    for problem in registry.state_problems() {
        out.warnings
            .push(Warning::general(format!("container state: {problem}")));
    }
    for t in running {
        let expectation = ContainerExpectation {
            container_id: t.container.id.clone(),
            runtime: t.container.runtime.clone(),
            name: t.container.name.clone(),
            modules: t.declared_modules().to_vec(),
            declared_in: match &t.state {
                DeclState::Known(d) if d.declared => Some(d.what()),
                _ => None,
            },
        };
        match &t.state {
            DeclState::Known(d) => {
                for bad in &d.expected.bad {
                    out.warnings.push(Warning::general(format!(
                        "container {}: {} entry {:?} ignored: {}",
                        expectation.describe(),
                        d.what(),
                        bad.entry,
                        bad.reason
                    )));
                }
                for line in d.disagreements() {
                    out.warnings.push(Warning::general(format!(
                        "container {}: {line}",
                        expectation.describe()
                    )));
                }
            }
            DeclState::Failed(e)
            | DeclState::Pending {
                last_error: Some(e),
                ..
            } => {
                out.warnings.push(Warning::general(format!(
                    "container {}: cannot read its KERNEL_MODULES: {e}",
                    expectation.describe()
                )));
            }
            DeclState::Pending { .. } => {}
        }
        if !expectation.modules.is_empty() {
            out.list.push(expectation);
        }
    }
    out
}

/// How long the check waits for running containers' declarations.
const SETTLE: Duration = Duration::from_secs(2);

/// A JSON array of [`ContainerExpectation`] objects (`--containers-file`).
pub fn from_file(path: &Path) -> Result<ContainerInputs, CheckError> {
    let text = std::fs::read(path).map_err(|source| CheckError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let list: Vec<ContainerExpectation> =
        serde_json::from_slice(&text).map_err(|source| CheckError::ContainersFile {
            path: path.to_path_buf(),
            source,
        })?;
    let mut out = ContainerInputs {
        source: format!("file {}", path.display()),
        running: list.len(),
        ..Default::default()
    };
    for mut c in list {
        // Shown to people: no control characters from the file.
        c.container_id = escape_bytes(c.container_id.as_bytes());
        c.runtime = escape_bytes(c.runtime.as_bytes());
        c.name = c.name.map(|n| escape_bytes(n.as_bytes()));
        let mut modules = Vec::new();
        for m in &c.modules {
            match modname::validate(m) {
                Ok(name) => modules.push(name),
                Err(e) => out.warnings.push(Warning::at(
                    &path.display().to_string(),
                    None,
                    format!(
                        "container {}: {}",
                        c.describe(),
                        escape_bytes(e.to_string().as_bytes())
                    ),
                )),
            }
        }
        c.modules = modules;
        out.list.push(c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_containers_file_and_rejects_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(
            &path,
            r#"[{"container_id":"3f2a9c1b4d5e6f70","runtime":"docker","name":"dind\u001b[31m","modules":["iptable-nat","bad/name"]},
                {"container_id":"abc","runtime":"runc","modules":[]}]"#,
        )
        .unwrap();
        let inputs = from_file(&path).unwrap();
        assert_eq!(inputs.list.len(), 2);
        assert_eq!(inputs.list[0].modules, vec!["iptable_nat"]);
        assert_eq!(
            inputs.list[0].describe(),
            "dind\\x1b[31m (docker 3f2a9c1b4d5e)"
        );
        assert_eq!(inputs.list[1].describe(), "runc abc");
        assert_eq!(inputs.warnings.len(), 1);

        std::fs::write(&path, "{not json").unwrap();
        let err = from_file(&path).unwrap_err().to_string();
        assert!(err.contains("c.json"), "{err}");
    }

    #[test]
    fn an_empty_offline_root_has_no_containers() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = from_runtime_state(&RootFs::new(dir.path()));
        assert!(inputs.list.is_empty());
        assert_eq!(inputs.running, 0);
    }
}
