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
}

impl Enricher {
    pub fn new() -> Enricher {
        Enricher {
            cgroups: CgroupCache::new(),
        }
    }

    /// The kernel created (`mkdir`) or removed a cgroup2 directory.
    pub fn cgroup_changed(&mut self, mkdir: bool, id: u64, path: &str) {
        if mkdir {
            self.cgroups.created(id, path);
        } else {
            self.cgroups.removed(id, path);
        }
    }

    /// Fills cgroup path and container.
    pub fn enrich(&mut self, ev: &mut Event) {
        if ev.cgroup_path.is_none() && ev.cgroup_id != 0 {
            ev.cgroup_path = self.cgroups.lookup(ev.cgroup_id);
        }
        if ev.container.is_none()
            && let Some(path) = &ev.cgroup_path
        {
            ev.container = container::parse_cgroup_path(path);
        }
    }
}

impl Default for Enricher {
    fn default() -> Self {
        Self::new()
    }
}
