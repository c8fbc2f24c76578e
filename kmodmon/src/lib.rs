//! kmodmon: a kernel-module event monitor.
//!
//! The data flows one way: [`probe`] loads and attaches the eBPF programs and reads their ring
//! buffers → [`event`] decodes each record into the one event model → [`enrich`] ties it to a
//! cgroup, a container and that container's expected modules → sinks ([`output`] for `tail`).
pub mod daemon;
pub mod enrich;
pub mod escape;
pub mod modname;
pub mod event;
pub mod output;
pub mod pipeline;
pub mod probe;
pub mod session;
pub mod tail;
pub mod cli;
pub mod check;
pub mod moddb;
pub mod audit;
pub mod metrics;
pub mod syslog;
pub mod policy;
pub mod enforce;
