//! Enrichment: cgroup id → cgroup path → container → expected modules → verdict.
pub mod cgroup;
pub mod container;
pub mod expect;
pub mod runtime_state;

use self::cgroup::CgroupCache;
use crate::event::Event;

/// Holds everything enrichment needs; runs on the enricher task, never on the ring reader.
pub struct Enricher {
    pub cgroups: CgroupCache,
    /// cgroup id → (path, container): parsed once per cgroup, dropped when it changes.
    resolved: std::collections::HashMap<u64, (Option<String>, Option<crate::event::Container>)>,
}

impl Enricher {
    pub fn new() -> Enricher {
        Enricher {
            cgroups: CgroupCache::new(),
            resolved: std::collections::HashMap::new(),
        }
    }

    /// The kernel created (`mkdir`) or removed a cgroup2 directory.
    pub fn cgroup_changed(&mut self, mkdir: bool, id: u64, path: &str) {
        self.resolved.remove(&id);
        if mkdir {
            self.cgroups.created(id, path);
        } else {
            self.cgroups.removed(id, path);
        }
    }

    /// Fills cgroup path and container.
    pub fn enrich(&mut self, ev: &mut Event) {
        if ev.cgroup_id == 0 || ev.cgroup_path.is_some() {
            return;
        }
        if let Some((path, container)) = self.resolved.get(&ev.cgroup_id) {
            ev.cgroup_path = path.clone();
            ev.container = container.clone();
            return;
        }
        let path = self.cgroups.lookup(ev.cgroup_id);
        let container = path.as_deref().and_then(container::parse_cgroup_path);
        if path.is_some() {
            self.resolved.insert(ev.cgroup_id, (path.clone(), container.clone()));
        }
        ev.cgroup_path = path;
        ev.container = container;
    }
}

impl Default for Enricher {
    fn default() -> Self {
        Self::new()
    }
}
