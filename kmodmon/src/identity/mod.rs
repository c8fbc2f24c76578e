//! Module identity: what exactly the kernel was given to load.
//!
//! The kernel side (kmodmon-ebpf `identity.rs`) copies every module image the kernel parses to
//! the IMAGES ring; [`assemble`] puts the chunks back together on the ring-buffer reader (copy
//! only); the enrich task computes the [`Identity`] — SHA-256 of exactly those bytes, size,
//! `.modinfo` ([`modinfo`]), the appended PKCS#7 signature ([`signature`]), the kernel's own
//! verdict (`sig_ok`), where the file came from ([`origin`]) — and [`join::IdentityJoin`]
//! attaches it to the `load`, `load_attempt`, `denied` and `would_deny` events of the same task.
pub mod assemble;
pub mod join;
pub mod modinfo;
pub mod origin;
pub mod signature;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use self::signature::{Signature, SignatureEnforcement};
use crate::escape::escape_bytes;

/// The identity of one module image. Every string that comes from the image is escaped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// SHA-256 (hex) of exactly the bytes the kernel parsed: the file as read (decompressed by
    /// the kernel where it decompresses), or init_module's buffer; signature trailer included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Bytes of that image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// true: init_module (an image from the caller's memory, e.g. kmod decompressing `.ko.xz`
    /// itself); false: finit_module (a file the kernel read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_from_memory: Option<bool>,
    /// finit_module with MODULE_INIT_COMPRESSED_FILE: the kernel decompressed the file, and
    /// `sha256` is of the decompressed image.
    #[serde(default, skip_serializing_if = "is_false")]
    pub decompressed_by_kernel: bool,
    /// From the image's `.modinfo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vermagic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srcversion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// The appended signature (parsed by kmodmon; not a verification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
    /// The kernel's verdict: `struct module`'s `sig_ok` at load (true: the signature verified
    /// against a trusted key). Absent when the module did not load or the kernel lacks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig_ok: Option<bool>,
    /// Whether this kernel refuses modules without a valid signature, when the image was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_enforcement: Option<SignatureEnforcement>,
    /// Where the image came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<origin::Origin>,
    /// Why a part of the identity is missing (never silent: the image could not be captured
    /// whole, or hashed, or parsed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// MODULE_INIT_COMPRESSED_FILE (include/uapi/linux/module.h).
pub const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

impl Identity {
    /// The identity of a complete image: hash, `.modinfo`, signature trailer.
    pub fn of_image(data: &[u8]) -> Identity {
        let mut id = Identity {
            sha256: Some(hex(&Sha256::digest(data))),
            size: Some(data.len() as u64),
            ..Identity::default()
        };
        let mut problems = Vec::new();
        match modinfo::parse(data) {
            Ok(info) => {
                let get = |k: &str| info.get(k).map(|v| escape_bytes(v));
                id.name = get("name");
                id.vermagic = get("vermagic");
                id.srcversion = get("srcversion");
                id.version = get("version");
                id.license = get("license");
            }
            Err(e) => problems.push(format!(".modinfo: {e}")),
        }
        let sig = signature::parse(data);
        if let Some(e) = &sig.error {
            problems.push(format!("signature: {e}"));
        }
        id.signature = Some(sig);
        if !problems.is_empty() {
            id.error = Some(problems.join("; "));
        }
        id
    }

    /// Adds a problem to `error`.
    pub fn add_error(&mut self, what: &str) {
        self.error = Some(match self.error.take() {
            Some(e) => format!("{e}; {what}"),
            None => what.to_string(),
        });
    }

    /// Every string, for the sinks' guard (crate::escape).
    pub fn strings_mut(&mut self, f: &mut dyn FnMut(&mut String)) {
        for s in [
            &mut self.sha256,
            &mut self.name,
            &mut self.vermagic,
            &mut self.srcversion,
            &mut self.version,
            &mut self.license,
            &mut self.error,
        ]
        .into_iter()
        .flatten()
        {
            f(s);
        }
        if let Some(s) = self.signature.as_mut() {
            s.strings_mut(f);
        }
        if let Some(o) = self.origin.as_mut() {
            o.strings_mut(f);
        }
        if let Some(e) = self.signature_enforcement.as_mut()
            && let Some(l) = e.lockdown.as_mut()
        {
            f(l);
        }
    }

    /// Every string, for reading.
    pub fn strings(&self) -> Vec<&str> {
        let mut all: Vec<&str> = Vec::new();
        for s in [
            &self.sha256,
            &self.name,
            &self.vermagic,
            &self.srcversion,
            &self.version,
            &self.license,
            &self.error,
        ]
        .into_iter()
        .flatten()
        {
            all.push(s);
        }
        if let Some(s) = &self.signature {
            all.extend(s.strings());
        }
        if let Some(o) = &self.origin {
            all.extend(o.strings());
        }
        if let Some(l) = self
            .signature_enforcement
            .as_ref()
            .and_then(|e| e.lockdown.as_deref())
        {
            all.push(l);
        }
        all
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_of_every_byte() {
        let id = Identity::of_image(b"abc");
        assert_eq!(
            id.sha256.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(id.size, Some(3));
        // Not ELF: the hash stands, the parse failure is said.
        assert!(id.error.as_deref().unwrap().contains(".modinfo"), "{id:?}");
        assert_eq!(id.signature.as_ref().map(|s| s.signed), Some(false));
    }

    #[test]
    fn errors_accumulate() {
        let mut id = Identity::default();
        id.add_error("a");
        id.add_error("b");
        assert_eq!(id.error.as_deref(), Some("a; b"));
        assert_eq!(id.strings(), vec!["a; b"]);
    }
}
