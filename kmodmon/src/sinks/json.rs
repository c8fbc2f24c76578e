//! JSON lines: one object per event, the schema of README "JSON schema" (`Event`'s serde form).
use crate::event::Event;

/// One JSON object, no newline.
pub fn line(ev: &Event) -> String {
    serde_json::to_string(ev).unwrap_or_else(|e| {
        // Serialising plain strings and numbers cannot fail; if it ever does, say so in-band.
        format!(
            "{{\"error\":\"cannot serialise event: {}\"}}",
            e.to_string().replace(['"', '\\'], "'")
        )
    })
}
