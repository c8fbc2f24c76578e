//! Reading the state roots: which directories exist for an ID, and what each file says.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::formats::{self, Partial};
use super::{ContainerMeta, FILE_MAX, StateConfig, StateError, StateKind, StateRoot, rank};
use crate::escape::escape_bytes;
use crate::host::container;

/// Checks an ID or name before it becomes a path component.
pub(super) fn check_id(id: &str) -> Result<(), StateError> {
    if id.is_empty() || id == "." || id == ".." || id.contains(['/', '\0']) {
        return Err(StateError::BadId(escape_bytes(id.as_bytes())));
    }
    Ok(())
}

/// Reads state files for one lookup or scan, collecting problems and caching the
/// containers/storage name lists.
pub(super) struct Reader<'a> {
    cfg: &'a StateConfig,
    pub problems: Vec<StateError>,
    storage_names: HashMap<PathBuf, HashMap<String, String>>,
    /// Namespace directories of namespaced roots, listed once per reader.
    namespaces: HashMap<PathBuf, Vec<PathBuf>>,
}

impl<'a> Reader<'a> {
    pub fn new(cfg: &'a StateConfig) -> Self {
        Reader {
            cfg,
            problems: Vec::new(),
            storage_names: HashMap::new(),
            namespaces: HashMap::new(),
        }
    }

    pub fn lookup(&mut self, id: &str) -> Option<ContainerMeta> {
        if let Err(e) = check_id(id) {
            self.problems.push(e);
            return None;
        }
        let mut meta = ContainerMeta {
            id: id.to_string(),
            ..ContainerMeta::default()
        };
        let (mut best, mut found) = (0, false);
        for root in &self.cfg.roots {
            for (dir, ns) in self.entry_dirs(root, id) {
                let Some(p) = self.read_entry(root, &dir) else {
                    continue;
                };
                let runtime =
                    if ns.as_deref() == Some("moby") && root.runtime == container::CONTAINERD {
                        container::DOCKER
                    } else {
                        root.runtime.as_str()
                    };
                meta.running |= self.live(&p);
                meta.merge(p, dir, runtime, rank(root), &mut best);
                found = true;
            }
        }
        if found {
            self.add_crio_pod(&mut meta);
        }
        meta.finish();
        found.then_some(meta)
    }

    /// What an OCI bundle's config.json says about container `id` of `runtime` (no state
    /// written yet: the runtime is still creating it). `None` when there is no config.
    pub fn bundle(&mut self, id: &str, runtime: &str, bundle: &Path) -> Option<ContainerMeta> {
        if let Err(e) = check_id(id) {
            self.problems.push(e);
            return None;
        }
        let config = bundle.join("config.json");
        let mut p = Partial {
            bundle: Some(bundle.to_path_buf()),
            ..Partial::default()
        };
        p.add_oci(&config, self.json(&config)?);
        let mut meta = ContainerMeta {
            id: id.to_string(),
            ..ContainerMeta::default()
        };
        let mut best = 0;
        meta.merge(p, config, runtime, 1, &mut best);
        // The pod's annotations too (cri-o keeps them with the sandbox): a bundle read before
        // the runtime wrote its state declares what the state would.
        self.add_crio_pod(&mut meta);
        meta.finish();
        Some(meta)
    }

    /// `<dir>/<id>` or `<dir>/<ns>/<id>` for each namespace, where it exists.
    fn entry_dirs(&mut self, root: &StateRoot, id: &str) -> Vec<(PathBuf, Option<String>)> {
        let parents = if root.namespaced {
            self.namespaces(&root.dir)
                .into_iter()
                .map(|d| {
                    let ns = d.file_name().and_then(|n| n.to_str()).map(str::to_string);
                    (d, ns)
                })
                .collect()
        } else {
            vec![(root.dir.clone(), None)]
        };
        parents
            .into_iter()
            .map(|(d, ns)| (d.join(id), ns))
            .filter(|(d, _)| d.is_dir())
            .collect()
    }

    /// Every container directory of a root.
    pub fn container_dirs(&mut self, root: &StateRoot) -> Vec<PathBuf> {
        if root.namespaced {
            let namespaces = self.namespaces(&root.dir);
            namespaces.iter().flat_map(|ns| self.subdirs(ns)).collect()
        } else {
            self.subdirs(&root.dir)
        }
    }

    fn namespaces(&mut self, dir: &Path) -> Vec<PathBuf> {
        if let Some(list) = self.namespaces.get(dir) {
            return list.clone();
        }
        let list = self.subdirs(dir);
        self.namespaces.insert(dir.to_path_buf(), list.clone());
        list
    }

    fn subdirs(&mut self, dir: &Path) -> Vec<PathBuf> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if is_absent(&e) => return Vec::new(),
            Err(source) => {
                self.problems.push(StateError::Read {
                    path: dir.to_path_buf(),
                    source,
                });
                return Vec::new();
            }
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }

    fn read_entry(&mut self, root: &StateRoot, dir: &Path) -> Option<Partial> {
        let mounts = &self.cfg.cgroup2_mounts;
        let mut p = match root.kind {
            StateKind::Runc => Partial::from_runc(self.json(&dir.join("state.json"))?, mounts),
            StateKind::Crun => Partial::from_crun(self.json(&dir.join("status"))?),
            StateKind::Bundle => {
                let mut p = Partial {
                    bundle: Some(dir.to_path_buf()),
                    ..Partial::default()
                };
                let config = dir.join("config.json");
                p.add_oci(&config, self.json(&config)?);
                p.pid = self.pid_file(&dir.join("init.pid"));
                return Some(p);
            }
            StateKind::Storage => {
                let config = dir.join("userdata").join("config.json");
                let mut p = Partial::default();
                p.add_oci(&config, self.json(&config)?);
                p.name = self.storage_name(&root.dir, dir);
                return Some(p);
            }
            StateKind::Docker => {
                let path = dir.join("config.v2.json");
                return Some(Partial::from_docker(&path, self.json(&path)?));
            }
            StateKind::Isulad => {
                let path = dir.join("config.v2.json");
                let mut p = Partial::from_isulad(&path, self.json(&path)?);
                let config = dir.join("config.json");
                if let Some(c) = self.json(&config) {
                    p.add_oci(&config, c);
                }
                return Some(p);
            }
        };
        // runc and crun: the bundle's config.json, if the bundle is still there.
        if let Some(bundle) = p.bundle.clone() {
            let config = bundle.join("config.json");
            if let Some(c) = self.json(&config) {
                p.add_oci(&config, c);
            }
        }
        Some(p)
    }

    /// cri-o keeps a pod's annotations only in its sandbox's config.json: find it in the
    /// containers/storage roots by the container's `io.kubernetes.cri-o.SandboxID`.
    fn add_crio_pod(&mut self, meta: &mut ContainerMeta) {
        let Some(sandbox) = meta.annotations.get(formats::CRIO_SANDBOX_ID).cloned() else {
            return;
        };
        if sandbox == meta.id || meta.pod_config_path.is_some() || check_id(&sandbox).is_err() {
            return;
        }
        let roots: Vec<PathBuf> = self
            .cfg
            .roots
            .iter()
            .filter(|r| r.kind == StateKind::Storage)
            .map(|r| r.dir.clone())
            .collect();
        for root in roots {
            let path = root.join(&sandbox).join("userdata").join("config.json");
            let Some(config) = self.json::<formats::OciConfig>(&path) else {
                continue;
            };
            match formats::crio_pod_annotations(&config) {
                Some(Ok(map)) => {
                    meta.pod_annotations = map;
                    meta.pod_config_path = Some(path.clone());
                    meta.sources.push(path);
                    return;
                }
                Some(Err(source)) => self.problems.push(StateError::Parse { path, source }),
                None => {}
            }
        }
    }

    fn storage_name(&mut self, root: &Path, dir: &Path) -> Option<String> {
        let id = dir.file_name()?.to_str()?;
        if !self.storage_names.contains_key(root) {
            let list: Vec<formats::StorageContainer> =
                self.json(&root.join("containers.json")).unwrap_or_default();
            let names = list
                .into_iter()
                .filter_map(|c| Some((c.id, c.names.into_iter().next()?)))
                .collect();
            self.storage_names.insert(root.to_path_buf(), names);
        }
        self.storage_names.get(root)?.get(id).cloned()
    }

    /// Reads and parses a JSON file; `None` when it is absent or broken (broken is recorded).
    fn json<T: serde::de::DeserializeOwned>(&mut self, path: &Path) -> Option<T> {
        let bytes = self.read(path)?;
        match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(source) => {
                self.problems.push(StateError::Parse {
                    path: path.to_path_buf(),
                    source,
                });
                None
            }
        }
    }

    fn pid_file(&mut self, path: &Path) -> Option<u32> {
        let bytes = self.read(path)?;
        std::str::from_utf8(&bytes)
            .ok()?
            .trim()
            .parse()
            .ok()
            .filter(|&p| p > 0)
    }

    fn read(&mut self, path: &Path) -> Option<Vec<u8>> {
        use std::io::Read as _;
        let result = std::fs::File::open(path).and_then(|f| {
            let mut buf = Vec::new();
            f.take(FILE_MAX + 1).read_to_end(&mut buf)?;
            Ok(buf)
        });
        match result {
            Ok(buf) if buf.len() as u64 > FILE_MAX => {
                self.problems.push(StateError::TooLarge {
                    path: path.to_path_buf(),
                });
                None
            }
            Ok(buf) => Some(buf),
            Err(e) if is_absent(&e) => None,
            Err(source) => {
                self.problems.push(StateError::Read {
                    path: path.to_path_buf(),
                    source,
                });
                None
            }
        }
    }

    /// Whether a partial shows a live container: its pid runs (and started when the state
    /// says), and the engine does not say it stopped.
    fn live(&self, p: &Partial) -> bool {
        p.running_flag != Some(false)
            && p.pid
                .is_some_and(|pid| pid_alive(&self.cfg.proc_root, pid, p.pid_start))
    }
}

fn is_absent(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// Whether `pid` runs under `proc_root` (exists and is not a zombie) and, when `start` is
/// known, is the same process (not a reused pid).
pub fn pid_alive(proc_root: &Path, pid: u32, start: Option<u64>) -> bool {
    let Ok(stat) = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")) else {
        return false;
    };
    if matches!(formats::stat_state(&stat), None | Some('Z' | 'X' | 'x')) {
        return false;
    }
    match start {
        Some(s) => formats::stat_start_time(&stat) == Some(s),
        None => true,
    }
}
