//! The one event model: what the kernel side sent, decoded, then enriched. Serialised as one JSON
//! object per line by `tail --json`, the audit log and exports (see README "JSON schema").
//!
//! - [`model`]: the types (what an event is);
//! - [`decode`]: a kernel record (RawEvent) → [`Event`];
//! - [`clock`]: kernel monotonic time ↔ wall-clock time.
mod clock;
mod decode;
mod model;

pub use clock::{Clock, monotonic_ns, parse_event_time};
pub use decode::{DecodeError, errno_name, path_from_components, raw_from_bytes, taint_letters};
pub use model::{
    Ancestor, BlockedBy, CgroupV1, Container, CrossView, Event, Kind, OnBehalfOf, RequestedBy,
    SourceName, Syscall, Verdict,
};
