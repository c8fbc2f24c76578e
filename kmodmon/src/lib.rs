//! kmodmon: a kernel-module event monitor.
//!
//! The data flows one way: [`sensor`] loads and attaches the eBPF programs (the monitor's and the enforcer's) → [`pipeline`] reads
//! their ring buffers and decodes each record into the one event model ([`event`]) →
//! [`enrich`] ties it to a cgroup, a container and that container's declared modules, all
//! known from the [`host`] registry (which the [`enforce`]r follows too) → [`sinks`].
pub mod audit;
pub mod check;
pub mod cli;
pub mod daemon;
pub mod docs;
pub mod enforce;
pub mod enrich;
pub mod escape;
pub mod event;
pub mod filter;
pub mod health;
pub mod host;
pub mod identity;
pub mod kube;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod modname;
pub mod modules;
pub mod mounts;
pub mod pipeline;
pub mod policy;
pub mod ratelimit;
pub mod sensor;
pub mod session;
pub mod sinks;
pub mod tail;
