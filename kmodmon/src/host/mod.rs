//! The host and its containers: the one place kmodmon knows what runs here.
//!
//! - [`cgroup`]: the cgroup tree (id → path), kept current from the kernel's cgroup
//!   mkdir/rmdir records and re-walked on a miss;
//! - [`cgroup_v1`]: the host's cgroup layout and the v1 hierarchy followed on v1-only and
//!   hybrid hosts (its tree is a second [`cgroup::CgroupCache`] in the registry);
//! - [`container`]: container identity from a cgroup path (docker, containerd/CRI, cri-o,
//!   podman, iSulad, LXC, nspawn);
//! - [`runtime_state`]: what the runtimes' state on disk adds (names, pods, bundles, init pids);
//! - [`runtime_process`]: OCI runtime processes (`runc|crun create|run|start|exec|delete ID`)
//!   among an event's ancestors → the container an OCI hook acted for;
//! - [`attribution`]: cgroup id → container, cached, with runtime state on a miss;
//! - [`declaration`]: a container's `KERNEL_MODULES`, read from its OCI config or environ;
//! - [`tracking`]: every container seen, with its declaration captured as it starts;
//! - [`moddb`]: the module database of a kernel (modules.dep, aliases, built-ins) and what the
//!   running kernel has loaded;
//! - [`registry`]: all of the above behind one type, [`Registry`], fed by the cgroup ring and
//!   read by the enricher, the enforcer, `policy show` and `check`.
pub mod attribution;
pub mod cgroup;
pub mod cgroup_v1;
pub mod container;
pub mod declaration;
pub mod moddb;
pub mod registry;
pub mod runtime_process;
pub mod runtime_state;
pub mod tracking;

pub use registry::{Behalf, Change, Registry, RegistryOptions};
