//! The self-check: every second, is everything kmodmon pinned still what it pinned?
//!
//! kmodmon holds its own descriptors of every link, program and map it installed (so removing
//! a pin does not detach anything while it runs) and compares, for each program:
//! - its link: still a tracing link (BPF_LINK_TYPE_TRACING) attached as BPF_LSM_MAC to the
//!   expected hook (`target_btf_id` = the BTF id of `bpf_lsm_<hook>`) and running kmodmon's
//!   program (`prog_id`) — the values from the running kernel's BTF, never assumed;
//! - the pins `links/<p>` and `progs/<p>`: the same objects (by id);
//!
//! and for each map, that its pin is the map the programs use. Links to the same hooks that are
//! not kmodmon's are reported once each (they can add denials, never remove kmodmon's: a BPF
//! LSM hook returns the first error, and such a program returning 0 leaves kmodmon's to run).
//! The contents of the maps are compared by `state::KernelState::verify`.
//!
//! Each difference is a [`Finding`]; the enforcer reports it (a `tamper` event, an error log,
//! a metric) and repairs it: a pin is put back (from the descriptor kmodmon holds), a link that
//! no longer runs kmodmon's program on its hook is replaced by a freshly attached one.
use std::{
    collections::{HashMap, HashSet},
    os::fd::OwnedFd,
    path::PathBuf,
};

use super::{
    EnforceError,
    bpf::{self, LinkInfo},
    pins::{self, MAPS, PinDir},
};
use crate::sensor::{btf::KernelBtf, lsm};

/// One difference the self-check found, and what it did about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// `link <program>`, `program <program>`, `map <pin>`, `foreign link <id>`.
    pub object: String,
    /// What differs.
    pub detail: String,
    /// What kmodmon did (None: nothing to do; Some(Err): the repair failed, with why).
    pub repair: Option<Result<String, String>>,
}

/// A program kmodmon installed, held open.
struct HeldProgram {
    name: &'static str,
    hook: &'static str,
    /// The BTF id of `bpf_lsm_<hook>` in the running kernel.
    target_btf_id: u32,
    link: OwnedFd,
    link_id: u32,
    prog: OwnedFd,
    prog_id: u32,
}

struct HeldMap {
    pin: &'static str,
    fd: OwnedFd,
    id: u32,
}

/// kmodmon's own descriptors of what it pinned, and the kernel's values to compare with.
pub struct Guard {
    dir: PinDir,
    /// BPF_LINK_TYPE_TRACING and BPF_LSM_MAC in this kernel (from BTF).
    tracing_type: u32,
    lsm_mac: u32,
    programs: Vec<HeldProgram>,
    maps: Vec<HeldMap>,
    /// Foreign links already reported.
    reported: HashSet<u32>,
}

/// The UAPI enum values the link info is compared with, from the running kernel's BTF.
fn link_enums(kbtf: &KernelBtf) -> Result<(u32, u32), EnforceError> {
    let get = |e: &str, m: &str| {
        kbtf.enum_value(e, m)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| {
                EnforceError::Load(format!(
                    "the kernel's BTF lacks enum {e} {m}: the self-check cannot work"
                ))
            })
    };
    Ok((
        get("bpf_link_type", "BPF_LINK_TYPE_TRACING")?,
        get("bpf_attach_type", "BPF_LSM_MAC")?,
    ))
}

fn hold_program(
    dir: &PinDir,
    name: &'static str,
    hook: &'static str,
    kbtf: &KernelBtf,
    tracing_type: u32,
) -> Result<HeldProgram, EnforceError> {
    let open = |path: PathBuf| {
        bpf::obj_get(&path)
            .map_err(|e| EnforceError::Pin(format!("cannot open {}: {e}", path.display())))
    };
    let link = open(dir.link(name))?;
    let prog = open(dir.prog(name))?;
    let li = bpf::link_info(&link, tracing_type)
        .map_err(|e| EnforceError::Pin(format!("link info of {name}: {e}")))?;
    let pi = bpf::prog_info(&prog)
        .map_err(|e| EnforceError::Pin(format!("program info of {name}: {e}")))?;
    let target_btf_id = kbtf
        .func_id(&format!("bpf_lsm_{hook}"))
        .ok_or_else(|| EnforceError::Load(format!("the kernel's BTF has no bpf_lsm_{hook}")))?;
    Ok(HeldProgram {
        name,
        hook,
        target_btf_id,
        link,
        link_id: li.id,
        prog,
        prog_id: pi.id,
    })
}

impl Guard {
    /// Opens what is pinned for `programs` (the caller just installed or adopted it).
    pub fn open(
        dir: &PinDir,
        programs: &[(&'static str, &'static str)],
    ) -> Result<Guard, EnforceError> {
        let kbtf = KernelBtf::load().map_err(|e| EnforceError::Load(e.to_string()))?;
        let (tracing_type, lsm_mac) = link_enums(&kbtf)?;
        let mut held = Vec::new();
        for (name, hook) in programs {
            held.push(hold_program(dir, name, hook, &kbtf, tracing_type)?);
        }
        let mut maps = Vec::new();
        for (_, pin) in MAPS {
            let path = dir.map(pin);
            let fd = bpf::obj_get(&path)
                .map_err(|e| EnforceError::Pin(format!("cannot open {}: {e}", path.display())))?;
            let id = bpf::map_id(&fd)
                .map_err(|e| EnforceError::Pin(format!("map info of {pin}: {e}")))?;
            maps.push(HeldMap { pin, fd, id });
        }
        Ok(Guard {
            dir: dir.clone(),
            tracing_type,
            lsm_mac,
            programs: held,
            maps,
            reported: HashSet::new(),
        })
    }

    /// The map ids kmodmon's programs use that the pins must name (start-up check before
    /// adopting: a pin replaced while kmodmon was down names another map).
    pub fn foreign_map_pins(dir: &PinDir, programs: &[(&str, &str)]) -> Vec<&'static str> {
        let mut used: HashSet<u32> = HashSet::new();
        for (p, _) in programs {
            let Ok(fd) = bpf::obj_get(&dir.prog(p)) else {
                return Vec::new();
            };
            match bpf::prog_info(&fd) {
                Ok(pi) => used.extend(pi.map_ids),
                Err(_) => return Vec::new(),
            }
        }
        MAPS.iter()
            // Written and read by userspace only: no program refers to them.
            .filter(|(_, pin)| *pin != pins::pin::CONTRACT && *pin != pins::pin::POLICY_ACK)
            .filter_map(|(_, pin)| {
                let id = bpf::pinned_id(&dir.map(pin), bpf::Pinned::Map, 0)
                    .ok()
                    .flatten()?;
                (!used.contains(&id)).then_some(*pin)
            })
            .collect()
    }

    /// The ids of the held links (for `enforce status`-like reports and tests).
    pub fn link_ids(&self) -> Vec<(&'static str, u32)> {
        self.programs.iter().map(|p| (p.name, p.link_id)).collect()
    }

    /// Compares everything held with the kernel and the pins; repairs what it can.
    pub fn check(&mut self) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut reattach: Vec<&'static str> = Vec::new();
        for p in &self.programs {
            // The link itself.
            match bpf::link_info(&p.link, self.tracing_type) {
                Ok(li) => {
                    let want = LinkInfo {
                        link_type: self.tracing_type,
                        id: p.link_id,
                        prog_id: p.prog_id,
                        attach_type: self.lsm_mac,
                        target_obj_id: li.target_obj_id,
                        target_btf_id: p.target_btf_id,
                    };
                    if li != want {
                        out.push(Finding {
                            object: format!("link {}", p.name),
                            detail: format!(
                                "no longer runs kmodmon's program {} on bpf_lsm_{} (link type \
                                 {}, attach type {}, target BTF id {}, program {}; expected {}, \
                                 {}, {}, {})",
                                p.prog_id,
                                p.hook,
                                li.link_type,
                                li.attach_type,
                                li.target_btf_id,
                                li.prog_id,
                                want.link_type,
                                want.attach_type,
                                want.target_btf_id,
                                want.prog_id
                            ),
                            repair: None,
                        });
                        reattach.push(p.name);
                        continue;
                    }
                }
                Err(e) => {
                    out.push(Finding {
                        object: format!("link {}", p.name),
                        detail: format!("cannot read its link info: {e}"),
                        repair: None,
                    });
                    reattach.push(p.name);
                    continue;
                }
            }
            // Its pins.
            for (what, path, kind, fd, id) in [
                (
                    "link",
                    self.dir.link(p.name),
                    bpf::Pinned::Link,
                    &p.link,
                    p.link_id,
                ),
                (
                    "program",
                    self.dir.prog(p.name),
                    bpf::Pinned::Prog,
                    &p.prog,
                    p.prog_id,
                ),
            ] {
                let found = bpf::pinned_id(&path, kind, self.tracing_type);
                let detail = match found {
                    Ok(Some(x)) if x == id => continue,
                    Ok(Some(x)) => format!(
                        "{} names {what} {x}, not kmodmon's {what} {id}",
                        path.display()
                    ),
                    Ok(None) => format!("{} was removed", path.display()),
                    Err(e) => format!("{} cannot be read: {e}", path.display()),
                };
                let repair = bpf::pin_over(fd, &path)
                    .map(|()| format!("pinned kmodmon's {what} {id} again"))
                    .map_err(|e| format!("pinning {} failed: {e}", path.display()));
                out.push(Finding {
                    object: format!("{what} {}", p.name),
                    detail,
                    repair: Some(repair),
                });
            }
        }
        for m in &self.maps {
            let path = self.dir.map(m.pin);
            let found = bpf::pinned_id(&path, bpf::Pinned::Map, self.tracing_type);
            let detail = match found {
                Ok(Some(x)) if x == m.id => continue,
                Ok(Some(x)) => format!(
                    "{} names map {x}, not kmodmon's map {}",
                    path.display(),
                    m.id
                ),
                Ok(None) => format!("{} was removed", path.display()),
                Err(e) => format!("{} cannot be read: {e}", path.display()),
            };
            let repair = bpf::pin_over(&m.fd, &path)
                .map(|()| format!("pinned kmodmon's map {} again", m.id))
                .map_err(|e| format!("pinning {} failed: {e}", path.display()));
            out.push(Finding {
                object: format!("map {}", m.pin),
                detail,
                repair: Some(repair),
            });
        }
        if !reattach.is_empty() {
            let result = self.reattach(&reattach);
            for f in out
                .iter_mut()
                .filter(|f| f.repair.is_none() && f.object.starts_with("link "))
            {
                f.repair = Some(result.clone());
            }
        }
        out.extend(self.foreign_links());
        out
    }

    /// Loads and attaches fresh copies of `names` with the pinned maps, pins them over the old
    /// pins and holds them.
    fn reattach(&mut self, names: &[&'static str]) -> Result<String, String> {
        let map_paths: Vec<(&str, PathBuf)> =
            MAPS.iter().map(|(n, p)| (*n, self.dir.map(p))).collect();
        let mut loaded = lsm::load(&map_paths, Some(names)).map_err(|e| e.to_string())?;
        pins::attach_and_pin(&self.dir, &mut loaded, Some(names)).map_err(|e| e.to_string())?;
        let kbtf = KernelBtf::load().map_err(|e| e.to_string())?;
        for name in names {
            let Some(i) = self.programs.iter().position(|p| p.name == *name) else {
                continue;
            };
            let hook = self.programs[i].hook;
            self.programs[i] = hold_program(&self.dir, name, hook, &kbtf, self.tracing_type)
                .map_err(|e| e.to_string())?;
        }
        Ok(format!(
            "attached kmodmon's program{} {} again",
            if names.len() == 1 { "" } else { "s" },
            names.join(", ")
        ))
    }

    /// Links on kmodmon's hooks that are not kmodmon's (each reported once).
    fn foreign_links(&mut self) -> Vec<Finding> {
        let Ok(all) = bpf::all_links(self.tracing_type) else {
            return Vec::new();
        };
        let ours: HashSet<u32> = self.programs.iter().map(|p| p.link_id).collect();
        let hooks: HashMap<u32, &'static str> = self
            .programs
            .iter()
            .map(|p| (p.target_btf_id, p.hook))
            .collect();
        let mut out = Vec::new();
        for l in all {
            if l.link_type != self.tracing_type
                || l.attach_type != self.lsm_mac
                || ours.contains(&l.id)
                || self.reported.contains(&l.id)
            {
                continue;
            }
            let Some(hook) = hooks.get(&l.target_btf_id) else {
                continue;
            };
            self.reported.insert(l.id);
            out.push(Finding {
                object: format!("foreign link {}", l.id),
                detail: format!(
                    "program {} ({}) is attached to the LSM hook {hook} beside kmodmon's: it can \
                     add denials, not remove kmodmon's",
                    l.prog_id,
                    bpf::prog_name(l.prog_id).unwrap_or_else(|| "?".into())
                ),
                repair: None,
            });
        }
        out
    }
}

/// What `enforce status` shows: the same comparisons as [`Guard::check`] against the pins
/// (another process's view: nothing is held or repaired), one line each; "ok" lines when all
/// is as installed.
pub fn inspect(dir: &PinDir, programs: &[(&'static str, &'static str)]) -> Vec<String> {
    let kbtf = match KernelBtf::load() {
        Ok(k) => k,
        Err(e) => return vec![format!("cannot read BTF: {e}")],
    };
    let (tracing_type, lsm_mac) = match link_enums(&kbtf) {
        Ok(v) => v,
        Err(e) => return vec![e.to_string()],
    };
    let mut out = Vec::new();
    let mut good = 0;
    for (name, hook) in programs {
        let link = match bpf::obj_get(&dir.link(name)) {
            Ok(fd) => fd,
            Err(e) => {
                out.push(format!(
                    "link {name}: not pinned ({e}): hook {hook} is not enforced"
                ));
                continue;
            }
        };
        let prog_id = bpf::obj_get(&dir.prog(name))
            .ok()
            .and_then(|fd| bpf::prog_info(&fd).ok())
            .map(|p| p.id);
        let want_btf = kbtf.func_id(&format!("bpf_lsm_{hook}"));
        match bpf::link_info(&link, tracing_type) {
            Ok(li)
                if li.link_type == tracing_type
                    && li.attach_type == lsm_mac
                    && Some(li.target_btf_id) == want_btf
                    && Some(li.prog_id) == prog_id =>
            {
                good += 1;
            }
            Ok(li) => out.push(format!(
                "link {name}: link type {}, attach type {}, target BTF id {}, program {}; \
                 expected {tracing_type}, {lsm_mac}, {}, {} (the pinned program)",
                li.link_type,
                li.attach_type,
                li.target_btf_id,
                li.prog_id,
                want_btf.map_or("?".into(), |v| v.to_string()),
                prog_id.map_or("?".into(), |v| v.to_string())
            )),
            Err(e) => out.push(format!("link {name}: cannot read its info: {e}")),
        }
    }
    let foreign = Guard::foreign_map_pins(dir, programs);
    if !foreign.is_empty() {
        out.push(format!(
            "map pins {} name maps kmodmon's programs do not use",
            foreign.join(", ")
        ));
    }
    if out.is_empty() {
        out.push(format!(
            "ok: {good} link(s) attached as BPF_LSM_MAC to their hooks, running the pinned \
             programs, which use the pinned maps"
        ));
    }
    out
}
