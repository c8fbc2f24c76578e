//! Sinks for `tail`: filtering, human columns, JSON lines.
pub mod filter;
pub mod human;

use crate::event::Event;

/// One JSON object per line; the schema is `Event`'s serde form.
pub fn json_line(ev: &Event) -> String {
    serde_json::to_string(ev).unwrap_or_else(|e| {
        // Serialising plain strings and numbers cannot fail; if it ever does, say so in-band.
        format!(
            "{{\"error\":\"cannot serialise event: {}\"}}",
            e.to_string().replace('"', "'")
        )
    })
}
