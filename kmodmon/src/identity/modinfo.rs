//! A module image's `.modinfo` section: NUL-separated `key=value` strings (MODULE_INFO).
use std::collections::BTreeMap;

use object::{Object as _, ObjectSection as _};

/// Why `.modinfo` could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModinfoError {
    #[error("the image is not an ELF file ({0})")]
    NotElf(String),
    #[error("the image has no .modinfo section")]
    NoSection,
    #[error(".modinfo cannot be read: {0}")]
    Section(String),
}

/// The `.modinfo` entries (the first value of each key; `alias` and `depends` can repeat, the
/// identity fields cannot).
pub fn parse(image: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, ModinfoError> {
    let file = object::File::parse(image).map_err(|e| ModinfoError::NotElf(e.to_string()))?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or(ModinfoError::NoSection)?;
    let data = section
        .data()
        .map_err(|e| ModinfoError::Section(e.to_string()))?;
    let mut out = BTreeMap::new();
    for entry in data.split(|&b| b == 0).filter(|e| !e.is_empty()) {
        let Some(eq) = entry.iter().position(|&b| b == b'=') else {
            continue;
        };
        let key = String::from_utf8_lossy(&entry[..eq]).into_owned();
        out.entry(key).or_insert_with(|| entry[eq + 1..].to_vec());
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 relocatable with a `.modinfo` section holding `info`, as a module has.
    pub fn elf_with_modinfo(info: &[u8]) -> Vec<u8> {
        use object::write::Object;
        let mut obj = Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        );
        let id = obj.add_section(Vec::new(), b".modinfo".to_vec(), object::SectionKind::Data);
        obj.append_section_data(id, info, 1);
        obj.write().expect("writes")
    }

    #[test]
    fn reads_key_value_pairs() {
        let img = elf_with_modinfo(
            b"version=1.2\0license=GPL\0alias=a\0alias=b\0name=kmt\0vermagic=6.1.0 SMP\0",
        );
        let m = parse(&img).unwrap();
        assert_eq!(m["version"], b"1.2");
        assert_eq!(m["license"], b"GPL");
        assert_eq!(m["alias"], b"a", "the first value wins");
        assert_eq!(m["vermagic"], b"6.1.0 SMP");
        assert!(matches!(parse(b"nope"), Err(ModinfoError::NotElf(_))));
    }
}
