//! kmodmon: a kernel-module event monitor.
//!
//! The data flows one way: [`probe`] loads and attaches the eBPF programs and reads their ring
//! buffers → [`event`] decodes each record into the one event model → [`enrich`] ties it to a
//! cgroup, a container and that container's expected modules → sinks ([`output`] for `tail`).
pub mod audit;
pub mod check;
pub mod cli;
pub mod daemon;
pub mod docs;
pub mod enforce;
pub mod enrich;
pub mod escape;
pub mod event;
pub mod health;
pub mod metrics;
pub mod moddb;
pub mod modname;
pub mod mounts;
pub mod output;
pub mod pipeline;
pub mod policy;
pub mod probe;
pub mod session;
pub mod syslog;
pub mod tail;
