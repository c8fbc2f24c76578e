//! The signature appended to a module image (scripts/sign-file):
//!
//! `[module][PKCS#7 DER][struct module_signature, 12 bytes]["~Module signature appended~\n"]`
//!
//! `struct module_signature { u8 algo, hash, id_type, signer_len, key_id_len, pad[3];
//! __be32 sig_len; }` with `id_type` 2 (PKEY_ID_PKCS7). The signer and key id are those of the
//! PKCS#7 SignerInfo (parsed with the RustCrypto `cms` crate): the issuer's common name and
//! the serial number, or the subject key identifier — what `modinfo` shows as `signer` and
//! `sig_key`. This is a description, not a verification: the kernel's verdict is `sig_ok`.
use cms::{
    cert::IssuerAndSerialNumber,
    content_info::ContentInfo,
    signed_data::{SignedData, SignerIdentifier},
};
use der::{Decode as _, asn1::ObjectIdentifier};
use serde::{Deserialize, Serialize};

use crate::escape::escape_bytes;

pub const MAGIC: &[u8] = b"~Module signature appended~\n";
const PKEY_ID_PKCS7: u8 = 2;
const TRAILER: usize = 12;

/// What the appended signature says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// The image ends with the signature marker.
    pub signed: bool,
    /// `PKCS#7` (the only format current kernels accept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// The signer: the common name of the certificate's issuer (as modinfo's `signer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// The key: the certificate's serial number, or its subject key identifier (hex bytes
    /// separated by colons, as modinfo's `sig_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Digest algorithm of the signature (`sha256`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_algo: Option<String>,
    /// Why the signature could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Signature {
    pub fn strings_mut(&mut self, f: &mut dyn FnMut(&mut String)) {
        for s in [
            &mut self.format,
            &mut self.signer,
            &mut self.key_id,
            &mut self.hash_algo,
            &mut self.error,
        ]
        .into_iter()
        .flatten()
        {
            f(s);
        }
    }

    pub fn strings(&self) -> Vec<&str> {
        [
            &self.format,
            &self.signer,
            &self.key_id,
            &self.hash_algo,
            &self.error,
        ]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect()
    }
}

/// Whether the running kernel refuses modules without a valid signature.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEnforcement {
    /// `module.sig_enforce` (/sys/module/module/parameters/sig_enforce; CONFIG_MODULE_SIG_FORCE
    /// or `module.sig_enforce=1` on the command line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig_enforce: Option<bool>,
    /// The lockdown mode (`none`, `integrity`, `confidentiality`); from `integrity` on, modules
    /// without a valid signature are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lockdown: Option<String>,
    /// Either of the two: an unsigned or badly signed module cannot load.
    pub enforced: bool,
}

/// The running kernel's signature enforcement.
pub fn enforcement() -> SignatureEnforcement {
    let sig_enforce = std::fs::read_to_string("/sys/module/module/parameters/sig_enforce")
        .ok()
        .map(|s| s.trim() == "Y" || s.trim() == "1");
    let lockdown = crate::sensor::lockdown::mode();
    let enforced = sig_enforce == Some(true)
        || lockdown
            .as_deref()
            .is_some_and(|m| m == "integrity" || m == "confidentiality");
    SignatureEnforcement {
        sig_enforce,
        lockdown,
        enforced,
    }
}

/// Reads the signature trailer of `image` (never fails: problems are in `error`).
pub fn parse(image: &[u8]) -> Signature {
    let Some(body) = image.strip_suffix(MAGIC) else {
        return Signature::default();
    };
    let mut sig = Signature {
        signed: true,
        ..Signature::default()
    };
    let Some(trailer) = body.len().checked_sub(TRAILER).map(|at| &body[at..]) else {
        sig.error = Some("the signature trailer is cut short".into());
        return sig;
    };
    let id_type = trailer[2];
    let sig_len = u32::from_be_bytes([trailer[8], trailer[9], trailer[10], trailer[11]]) as usize;
    if id_type != PKEY_ID_PKCS7 {
        sig.error = Some(format!(
            "signature id type {id_type} (only PKCS#7, 2, is used)"
        ));
        return sig;
    }
    sig.format = Some("PKCS#7".into());
    let Some(der) = (body.len() - TRAILER)
        .checked_sub(sig_len)
        .map(|at| &body[at..body.len() - TRAILER])
    else {
        sig.error = Some(format!("signature length {sig_len} exceeds the image"));
        return sig;
    };
    if let Err(e) = describe(der, &mut sig) {
        sig.error = Some(format!("PKCS#7: {e}"));
    }
    sig
}

fn describe(der: &[u8], sig: &mut Signature) -> Result<(), der::Error> {
    let ci = ContentInfo::from_der(der)?;
    let sd: SignedData = ci.content.decode_as()?;
    let Some(si) = sd.signer_infos.0.iter().next() else {
        sig.error = Some("PKCS#7 without a signer".into());
        return Ok(());
    };
    sig.hash_algo = Some(digest_name(&si.digest_alg.oid));
    match &si.sid {
        SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer,
            serial_number,
        }) => {
            sig.key_id = Some(colon_hex(serial_number.as_bytes()));
            sig.signer = common_name(issuer);
        }
        SignerIdentifier::SubjectKeyIdentifier(skid) => {
            sig.key_id = Some(colon_hex(skid.0.as_bytes()));
        }
    }
    Ok(())
}

/// The issuer's commonName (2.5.4.3), escaped.
fn common_name(name: &x509_cert::name::Name) -> Option<String> {
    const CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
    name.0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == CN)
        .map(|atv| escape_bytes(atv.value.value()))
}

fn digest_name(oid: &ObjectIdentifier) -> String {
    match oid.to_string().as_str() {
        "1.3.14.3.2.26" => "sha1",
        "2.16.840.1.101.3.4.2.4" => "sha224",
        "2.16.840.1.101.3.4.2.1" => "sha256",
        "2.16.840.1.101.3.4.2.2" => "sha384",
        "2.16.840.1.101.3.4.2.3" => "sha512",
        "2.16.840.1.101.3.4.2.8" => "sha3-256",
        "2.16.840.1.101.3.4.2.9" => "sha3-384",
        "2.16.840.1.101.3.4.2.10" => "sha3-512",
        other => return other.to_string(),
    }
    .to_string()
}

/// `25:5E:A7` (modinfo's notation; serial numbers keep their leading zero byte dropped).
fn colon_hex(bytes: &[u8]) -> String {
    let trimmed = match bytes {
        [0, rest @ ..] if !rest.is_empty() && rest[0] & 0x80 != 0 => rest,
        b => b,
    };
    trimmed
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsigned_images_have_no_signature() {
        assert!(!parse(b"\x7fELF...").signed);
        assert!(!parse(b"").signed);
    }

    #[test]
    fn a_bad_trailer_is_reported_not_fatal() {
        let mut img = b"short".to_vec();
        img.extend_from_slice(MAGIC);
        let s = parse(&img);
        assert!(s.signed && s.error.is_some(), "{s:?}");
        let mut img = vec![0u8; 40];
        img.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0x10, 0]);
        img.extend_from_slice(MAGIC);
        let s = parse(&img);
        assert!(s.error.as_deref().unwrap().contains("exceeds"), "{s:?}");
        let mut img = vec![0u8; 40];
        img.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 8]);
        img.extend_from_slice(MAGIC);
        let s = parse(&img);
        assert!(s.error.as_deref().unwrap().starts_with("PKCS#7"), "{s:?}");
    }

    #[test]
    fn serials_print_like_modinfo() {
        assert_eq!(colon_hex(&[0x25, 0x5e, 0xa7]), "25:5E:A7");
        assert_eq!(colon_hex(&[0x00, 0x9a]), "9A");
        assert_eq!(colon_hex(&[0x00, 0x1a]), "00:1A");
    }
}
