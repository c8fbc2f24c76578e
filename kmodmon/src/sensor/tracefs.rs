//! tracefs: where it is (mounting it when nothing has), which events exist, and the layout of an
//! event's record read from its `format` file — never assumed.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use kmodmon_common::Field;

use super::SensorError;

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// A mounted tracefs.
#[derive(Clone, Debug)]
pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Finds tracefs, mounting it at /sys/kernel/tracing when it is not mounted anywhere.
    pub fn find_or_mount() -> Result<Tracefs, SensorError> {
        if let Some(t) = Self::find() {
            return Ok(t);
        }
        let target = Path::new(CANDIDATES[0]);
        nix::mount::mount(
            Some("tracefs"),
            target,
            Some("tracefs"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| {
            SensorError::Tracefs(format!(
                "tracefs is not mounted and mounting it at {} failed: {e}; mount it yourself with \
             `mount -t tracefs tracefs /sys/kernel/tracing` (needs root)",
                target.display()
            ))
        })?;
        Self::find().ok_or_else(|| {
            SensorError::Tracefs(format!(
                "mounted tracefs at {} but it has no events/ directory",
                target.display()
            ))
        })
    }

    /// Finds an already mounted tracefs.
    pub fn find() -> Option<Tracefs> {
        CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("events").is_dir())
            .map(|root| Tracefs { root })
    }

    /// A tracefs rooted somewhere else (tests).
    pub fn at(root: impl Into<PathBuf>) -> Tracefs {
        Tracefs { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `category:name` exists on this kernel.
    pub fn has_event(&self, category: &str, name: &str) -> bool {
        self.root
            .join("events")
            .join(category)
            .join(name)
            .join("format")
            .is_file()
    }

    /// Reads and parses `events/<category>/<name>/format`.
    pub fn format(&self, category: &str, name: &str) -> Result<Format, SensorError> {
        let path = self
            .root
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = fs::read_to_string(&path)
            .map_err(|e| SensorError::Tracefs(format!("reading {}: {e}", path.display())))?;
        Format::parse(&text).map_err(|e| SensorError::Format(format!("{}: {e}", path.display())))
    }
}

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatField {
    /// The C declaration without the name, e.g. `__data_loc char[]`, `unsigned long`.
    pub c_type: String,
    pub offset: u32,
    pub size: u32,
    /// Array length for `type name[N]` declarations.
    pub array_len: Option<u32>,
}

impl FormatField {
    pub fn is_data_loc(&self) -> bool {
        self.c_type.starts_with("__data_loc") || self.c_type.starts_with("__rel_loc")
    }

    pub fn as_field(&self) -> Field {
        Field {
            offset: self.offset,
            size: self.size,
        }
    }
}

/// A parsed `format` file.
#[derive(Clone, Debug, Default)]
pub struct Format {
    pub name: String,
    pub id: Option<u32>,
    pub fields: HashMap<String, FormatField>,
}

impl Format {
    pub fn parse(text: &str) -> Result<Format, String> {
        let mut fmt = Format::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix("name:") {
                fmt.name = name.trim().to_string();
            } else if let Some(id) = line.strip_prefix("ID:") {
                fmt.id = id.trim().parse().ok();
            } else if line.starts_with("field:") {
                let (name, field) = parse_field_line(line)?;
                fmt.fields.insert(name, field);
            }
        }
        if fmt.fields.is_empty() {
            return Err("no fields found".to_string());
        }
        Ok(fmt)
    }

    /// A field that must exist, with its size checked against what the programs can read.
    pub fn field(&self, name: &str) -> Result<&FormatField, String> {
        self.fields
            .get(name)
            .ok_or_else(|| format!("event {} has no field {name:?}", self.name))
    }

    /// A scalar field (1, 2, 4 or 8 bytes).
    pub fn scalar(&self, name: &str) -> Result<Field, String> {
        let f = self.field(name)?;
        if !matches!(f.size, 1 | 2 | 4 | 8) || f.is_data_loc() || f.array_len.is_some() {
            return Err(format!(
                "field {name:?} of {} is {} ({} bytes), not a scalar",
                self.name, f.c_type, f.size
            ));
        }
        Ok(f.as_field())
    }

    /// A `__data_loc char[]` string field.
    pub fn data_loc(&self, name: &str) -> Result<Field, String> {
        let f = self.field(name)?;
        if !f.c_type.starts_with("__data_loc") || f.size != 4 {
            return Err(format!(
                "field {name:?} of {} is {} ({} bytes), expected __data_loc char[]",
                self.name, f.c_type, f.size
            ));
        }
        Ok(f.as_field())
    }

    /// An array of 8-byte elements (raw_syscalls `args`).
    pub fn u64_array(&self, name: &str, min_len: u32) -> Result<Field, String> {
        let f = self.field(name)?;
        match f.array_len {
            Some(n) if n >= min_len && f.size == n * 8 => Ok(f.as_field()),
            _ => Err(format!(
                "field {name:?} of {} is {} ({} bytes), expected an array of at least {min_len} u64",
                self.name, f.c_type, f.size
            )),
        }
    }
}

/// `field:unsigned long args[6];<TAB>offset:16;<TAB>size:48;<TAB>signed:0;` (tab-separated)
fn parse_field_line(line: &str) -> Result<(String, FormatField), String> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    for part in line.split(';') {
        let part = part.trim();
        if let Some(d) = part.strip_prefix("field:") {
            decl = Some(d.trim());
        } else if let Some(o) = part.strip_prefix("offset:") {
            offset = o.trim().parse::<u32>().ok();
        } else if let Some(s) = part.strip_prefix("size:") {
            size = s.trim().parse::<u32>().ok();
        }
    }
    let (decl, offset, size) = match (decl, offset, size) {
        (Some(d), Some(o), Some(s)) => (d, o, s),
        _ => return Err(format!("malformed field line {line:?}")),
    };
    let (c_type, mut name) = match decl.rfind(|c: char| c.is_whitespace() || c == '*') {
        Some(i) => (decl[..=i].trim().to_string(), decl[i + 1..].to_string()),
        None => return Err(format!("malformed declaration {decl:?}")),
    };
    let mut array_len = None;
    if let Some(open) = name.find('[') {
        let inner = name[open + 1..].trim_end_matches(']');
        array_len = inner.parse::<u32>().ok();
        name.truncate(open);
    }
    if name.is_empty() {
        return Err(format!("malformed declaration {decl:?}"));
    }
    Ok((
        name,
        FormatField {
            c_type,
            offset,
            size,
            array_len,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULE_LOAD: &str = "name: module_load
ID: 460
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned int taints;\toffset:8;\tsize:4;\tsigned:0;
\tfield:__data_loc char[] name;\toffset:12;\tsize:4;\tsigned:0;

print fmt: \"%s %s\", __get_str(name), __print_flags(REC->taints, \"\", { (1UL << 0), \"P\" })
";

    const RAW_ENTER: &str = "name: sys_enter
ID: 21
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:long id;\toffset:8;\tsize:8;\tsigned:1;
\tfield:unsigned long args[6];\toffset:16;\tsize:48;\tsigned:0;
";

    const FINIT: &str = "name: sys_enter_finit_module
ID: 600
format:
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int fd;\toffset:16;\tsize:8;\tsigned:0;
\tfield:const char __attribute__((btf_type_tag(\"user\"))) * uargs;\toffset:24;\tsize:8;\tsigned:0;
\tfield:int flags;\toffset:32;\tsize:8;\tsigned:0;
";

    #[test]
    fn parses_module_load() {
        let f = Format::parse(MODULE_LOAD).unwrap();
        assert_eq!(f.name, "module_load");
        assert_eq!(f.id, Some(460));
        assert_eq!(f.scalar("taints"), Ok(Field { offset: 8, size: 4 }));
        assert_eq!(
            f.data_loc("name"),
            Ok(Field {
                offset: 12,
                size: 4
            })
        );
        assert!(f.scalar("name").is_err());
        assert!(f.data_loc("taints").is_err());
        assert!(f.field("nope").is_err());
    }

    #[test]
    fn parses_arrays_and_pointer_declarations() {
        let f = Format::parse(RAW_ENTER).unwrap();
        assert_eq!(f.scalar("id"), Ok(Field { offset: 8, size: 8 }));
        assert_eq!(
            f.u64_array("args", 3),
            Ok(Field {
                offset: 16,
                size: 48
            })
        );
        assert!(f.u64_array("args", 7).is_err());
        let g = Format::parse(FINIT).unwrap();
        assert_eq!(
            g.scalar("uargs"),
            Ok(Field {
                offset: 24,
                size: 8
            })
        );
        assert_eq!(
            g.scalar("fd"),
            Ok(Field {
                offset: 16,
                size: 8
            })
        );
        assert!(g.fields["uargs"].c_type.ends_with('*'));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Format::parse("").is_err());
        assert!(Format::parse("format:\n\tfield:int;\toffset:x;\n").is_err());
    }

    #[test]
    fn reads_from_a_tracefs_tree() {
        let dir = tempfile::tempdir().unwrap();
        let ev = dir.path().join("events/module/module_load");
        std::fs::create_dir_all(&ev).unwrap();
        std::fs::write(ev.join("format"), MODULE_LOAD).unwrap();
        let t = Tracefs::at(dir.path());
        assert!(t.has_event("module", "module_load"));
        assert!(!t.has_event("module", "module_free"));
        assert_eq!(t.format("module", "module_load").unwrap().fields.len(), 6);
        assert!(t.format("module", "module_free").is_err());
    }
}
