//! JSON lines: one object per event, the schema of README "JSON schema" (`Event`'s serde form).
use crate::event::Event;

/// One JSON object, no newline; the schema is `Event`'s serde form. Every string passes the
/// sink guard ([`crate::escape::sanitize_event`]) first: serde_json escapes only C0 controls,
/// quotes and backslashes, and would pass C1 controls and bidi overrides through.
pub fn line(ev: &Event) -> String {
    serde_json::to_string(&*crate::escape::sanitize_event(ev)).unwrap_or_else(|e| {
        // Serialising plain strings and numbers cannot fail; if it ever does, say so in-band.
        format!(
            "{{\"error\":\"cannot serialise event: {}\"}}",
            e.to_string().replace(['"', '\\'], "'")
        )
    })
}
