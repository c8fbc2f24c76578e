//! The kernel/user contract of kmodmon: every type that crosses the eBPF boundary.
//!
//! All types are `#[repr(C)]`, contain no padding the kernel could leave uninitialised, and use
//! `u32` for flags (never `bool`). Field offsets inside *kernel* structures are never hard-coded
//! here: userspace resolves them at start-up (tracefs `format` files, BTF) and hands them to the
//! programs in [`Config`].
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;

// First: the macros are used by the modules below.
#[macro_use]
pub mod macros;

/// Version of the layouts shared with programs that outlive kmodmon: [`RawEvent`] and the
/// policy maps ([`policy`]), which the pinned LSM programs write and read. Bump it with every
/// change to them. kmodmon stores it beside its pins and replaces (never adopts) pinned
/// programs of another version; version 1 was the layout before versions were stored; 3 and 4
/// added the cgroup v1 id, the ancestors, `blocked_by` and `signal` to [`RawEvent`]; 5 the
/// repeat fields; 6 `decided_by`, `named_by`, `lsm_flags` and `decided_at` in [`RawEvent`],
/// and the policy maps' container parents, prefix rules, crypto-requester and load stash maps,
/// acknowledgement array and pinned counters.
pub const CONTRACT_VERSION: u32 = 6;

pub mod cgroup;
pub mod config;
pub mod counter;
pub mod event;
pub mod identity;
pub mod modname;
pub mod names;
pub mod policy;
pub mod repeat;

pub use cgroup::{
    CGROUP_DFL_HIERARCHY, CGROUP_MKDIR, CGROUP_PATH_LEN, CGROUP_RMDIR, RawCgroupEvent,
};
pub use config::{
    Config, Field, OFFSET_UNKNOWN, USER_REGS_HELPER, USER_REGS_NONE, USER_REGS_STACK,
};
pub use counter::{COUNTER_SLOTS, Counter, CounterCategory};
pub use event::{
    ANCESTORS, BlockedBy, COMM_LEN, DecidedBy, EventKind, NAME_LEN, NamedBy, Op, PARAMS_LEN,
    PATH_COMPONENT_LEN, PATH_LEN, PATH_MAX_STEPS, PATH_SLOTS, RawAncestor, RawEvent, Source, lsm,
    missing, trunc,
};
pub use repeat::{REPEAT_SLOTS, RepeatKey, RepeatSlot};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers and integer arrays, and
    // every bit pattern is valid for them.
    unsafe impl aya::Pod for super::RawEvent {}
    unsafe impl aya::Pod for super::RawAncestor {}
    unsafe impl aya::Pod for super::RawCgroupEvent {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Field {}
    unsafe impl aya::Pod for super::policy::Decision {}
    unsafe impl aya::Pod for super::policy::AllowKey {}
    unsafe impl aya::Pod for super::policy::Settings {}
    unsafe impl aya::Pod for super::policy::LsmConfig {}
    unsafe impl aya::Pod for super::policy::ParentKey {}
    unsafe impl aya::Pod for super::policy::PrefixRule {}
    unsafe impl aya::Pod for super::policy::CryptoOrigin {}
    unsafe impl aya::Pod for super::policy::LoadStash {}
    unsafe impl aya::Pod for super::identity::IdentityConfig {}
    unsafe impl aya::Pod for super::repeat::RepeatKey {}
    unsafe impl aya::Pod for super::repeat::RepeatSlot {}
}
