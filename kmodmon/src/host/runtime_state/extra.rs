//! Runtime state kept somewhere else than the runtimes' defaults: Docker with another
//! `data-root` / `exec-root`, containerd with another `state`, containers-storage (podman,
//! cri-o) with another `graphroot` / `runroot`, runc or crun with `--root`. Given as
//! `KIND=DIR` (`--state-dir`, `[containers] state_dirs`); each adds that runtime's layout
//! below DIR to the standard places.
use std::path::PathBuf;

use super::{StateConfig, StateKind, StateRoot};
use crate::host::container;

/// What a `KIND=DIR` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateDirKind {
    /// Docker's `data-root` (default /var/lib/docker): `containers/<id>/config.v2.json`.
    Docker,
    /// Docker's `exec-root` (default /run/docker): `runtime-runc/moby/<id>/state.json` and
    /// its containerd's task bundles.
    DockerExec,
    /// containerd's `state` directory (default /run/containerd): task bundles.
    Containerd,
    /// containers-storage's `graphroot` or `runroot` (podman, cri-o):
    /// `overlay-containers/<id>/userdata/config.json`, names in `containers.json`.
    Containers,
    /// runc's `--root` (default /run/runc): `<id>/state.json`.
    Runc,
    /// crun's `--root` (default /run/crun): `<id>/status`.
    Crun,
    /// LXC's lxcpath (default /var/lib/lxc): `<name>/config`.
    Lxc,
    /// iSulad's root (default /var/lib/isulad): `engines/<runtime>/<id>/`.
    Isulad,
}

impl StateDirKind {
    pub const ALL: [(&'static str, StateDirKind); 8] = [
        ("docker", StateDirKind::Docker),
        ("docker-exec", StateDirKind::DockerExec),
        ("containerd", StateDirKind::Containerd),
        ("containers", StateDirKind::Containers),
        ("runc", StateDirKind::Runc),
        ("crun", StateDirKind::Crun),
        ("lxc", StateDirKind::Lxc),
        ("isulad", StateDirKind::Isulad),
    ];
}

/// One `KIND=DIR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDir {
    pub kind: StateDirKind,
    pub dir: PathBuf,
}

impl std::str::FromStr for StateDir {
    type Err = String;

    fn from_str(s: &str) -> Result<StateDir, String> {
        let kinds = || {
            StateDirKind::ALL
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (kind, dir) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not KIND=DIR (KIND: {})", kinds()))?;
        let kind = StateDirKind::ALL
            .iter()
            .find(|(n, _)| *n == kind)
            .map(|(_, k)| *k)
            .ok_or_else(|| {
                format!(
                    "unknown state directory kind {kind:?} (one of: {})",
                    kinds()
                )
            })?;
        let dir = PathBuf::from(dir);
        if !dir.is_absolute() {
            return Err(format!("{s:?}: the directory must be an absolute path"));
        }
        Ok(StateDir { kind, dir })
    }
}

impl<'de> serde::Deserialize<'de> for StateDir {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StateDir, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl StateConfig {
    /// Adds the layout `d` names, ahead of the standard places.
    pub fn add_dir(&mut self, d: &StateDir) {
        use StateKind::*;
        let at = |rel: &str| d.dir.join(rel);
        let roots: Vec<StateRoot> = match d.kind {
            StateDirKind::Docker => vec![StateRoot::new(
                at("containers"),
                Docker,
                false,
                container::DOCKER,
            )],
            StateDirKind::DockerExec => vec![
                StateRoot::new(at("runtime-runc"), Runc, true, container::DOCKER),
                StateRoot::new(
                    at("containerd/daemon/io.containerd.runtime.v2.task"),
                    Bundle,
                    true,
                    container::DOCKER,
                ),
            ],
            StateDirKind::Containerd => vec![
                StateRoot::new(at("runc"), Runc, true, container::CONTAINERD),
                StateRoot::new(
                    at("io.containerd.runtime.v2.task"),
                    Bundle,
                    true,
                    container::CONTAINERD,
                ),
                StateRoot::new(
                    at("io.containerd.runtime.v1.linux"),
                    Bundle,
                    true,
                    container::CONTAINERD,
                ),
            ],
            StateDirKind::Containers => vec![StateRoot::new(
                at("overlay-containers"),
                Storage,
                false,
                container::PODMAN,
            )],
            StateDirKind::Runc => vec![StateRoot::new(d.dir.clone(), Runc, false, container::RUNC)],
            StateDirKind::Crun => vec![StateRoot::new(d.dir.clone(), Crun, false, container::CRUN)],
            StateDirKind::Isulad => vec![StateRoot::new(
                at("engines"),
                Isulad,
                true,
                container::ISULAD,
            )],
            StateDirKind::Lxc => {
                if !self.named.lxc.contains(&d.dir) {
                    self.named.lxc.insert(0, d.dir.clone());
                }
                Vec::new()
            }
        };
        for (i, r) in roots.into_iter().enumerate() {
            if !self.roots.contains(&r) {
                self.roots.insert(i, r);
            }
        }
    }

    /// The standard places plus `dirs`.
    pub fn detect_with(dirs: &[StateDir]) -> StateConfig {
        let mut cfg = StateConfig::detect();
        for d in dirs.iter().rev() {
            cfg.add_dir(d);
        }
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_dirs_parse_and_bad_ones_say_why() {
        let d: StateDir = "docker=/srv/docker".parse().unwrap();
        assert_eq!(d.kind, StateDirKind::Docker);
        assert_eq!(d.dir, PathBuf::from("/srv/docker"));
        let e = "dockr=/x".parse::<StateDir>().unwrap_err();
        assert!(e.contains("docker-exec") && e.contains("dockr"), "{e}");
        assert!(
            "docker"
                .parse::<StateDir>()
                .unwrap_err()
                .contains("KIND=DIR")
        );
        assert!(
            "docker=rel/dir"
                .parse::<StateDir>()
                .unwrap_err()
                .contains("absolute")
        );
    }

    #[test]
    fn a_docker_data_root_elsewhere_is_read_like_the_default() {
        let tmp = tempfile::tempdir().unwrap();
        let id = "a".repeat(64);
        let dir = tmp.path().join("data/containers").join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.v2.json"),
            format!(
                r#"{{"ID":"{id}","Name":"/web","State":{{"Running":false}},"Config":{{"Env":["KERNEL_MODULES=ip_vs"]}}}}"#
            ),
        )
        .unwrap();
        let mut cfg = StateConfig::under(tmp.path());
        assert!(super::super::lookup(&cfg, &id).meta.is_none());
        cfg.add_dir(&StateDir {
            kind: StateDirKind::Docker,
            dir: tmp.path().join("data"),
        });
        // Twice is the same as once.
        let before = cfg.roots.len();
        cfg.add_dir(&"docker=/x".parse().unwrap());
        cfg.add_dir(&"docker=/x".parse().unwrap());
        assert_eq!(cfg.roots.len(), before + 1);
        let meta = super::super::lookup(&cfg, &id).meta.expect("found");
        assert_eq!(meta.name.as_deref(), Some("web"));
        assert_eq!(meta.runtime, "docker");
    }
}
