//! Joins captured images to the events of the same task: the kernel records a capture at
//! load_module (or security_kernel_post_load_data), then `module_load`, then the syscall's
//! return, all on one thread; the reader hands the IMAGES ring's records on before the events
//! (it drains that ring first), so an event finds its image already here.
use std::collections::HashMap;

use kmodmon_common::identity::{ImageVerdict, SIG_OK_UNKNOWN, image_via};

use super::{
    Identity, MODULE_INIT_COMPRESSED_FILE,
    assemble::Image,
    origin::{self, Packages},
    signature,
};
use crate::escape::{escape_bytes, until_nul};
use crate::event::{Event, Kind, Syscall};

/// How long a capture waits for its events (one syscall: microseconds to seconds).
const WINDOW_NS: u64 = 120_000_000_000;
/// Most captures remembered; the oldest go first.
const CAPACITY: usize = 256;

struct Captured {
    identity: Identity,
    ktime_ns: u64,
    via: u32,
    load_flags: u32,
    mnt_ns: u32,
}

/// Counts of what happened to captures, for the exit summary and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct JoinStats {
    /// Images hashed.
    pub hashed: u64,
    /// Captures that arrived incomplete (no hash; the event's identity says why).
    pub incomplete: u64,
    /// Successful loads for which no capture arrived at all.
    pub missing: u64,
}

pub struct IdentityJoin {
    by_tid: HashMap<u32, Captured>,
    packages: Packages,
    host_ns: Option<u32>,
    /// Whether images are captured at all (else a load without one is no failure).
    enabled: bool,
    pub stats: JoinStats,
}

impl Default for IdentityJoin {
    fn default() -> Self {
        IdentityJoin::new(Packages::new("/"))
    }
}

impl IdentityJoin {
    pub fn new(packages: Packages) -> IdentityJoin {
        IdentityJoin {
            by_tid: HashMap::new(),
            packages,
            host_ns: origin::host_mnt_ns(),
            enabled: true,
            stats: JoinStats::default(),
        }
    }

    /// No capture runs (identity off): loads without an image are not failures.
    pub fn disabled() -> IdentityJoin {
        IdentityJoin {
            enabled: false,
            ..IdentityJoin::default()
        }
    }

    /// A finished capture: hash and parse it (the enrich task's work).
    pub fn image(&mut self, img: Image) {
        let h = img.header;
        let mut identity = if img.complete {
            self.stats.hashed += 1;
            Identity::of_image(&img.data)
        } else {
            self.stats.incomplete += 1;
            let mut id = Identity {
                size: Some(h.len),
                ..Identity::default()
            };
            id.add_error(&format!(
                "no hash: {}",
                img.problem
                    .as_deref()
                    .unwrap_or("the capture is incomplete")
            ));
            id
        };
        identity.loaded_from_memory = Some(h.via == image_via::POST_LOAD_DATA);
        identity.decompressed_by_kernel = h.load_flags & MODULE_INIT_COMPRESSED_FILE != 0;
        identity.signature_enforcement = Some(signature::enforcement());
        if self.by_tid.len() >= CAPACITY {
            let now = h.id;
            self.by_tid
                .retain(|_, c| now.saturating_sub(c.ktime_ns) < WINDOW_NS);
            if self.by_tid.len() >= CAPACITY {
                self.by_tid.clear();
            }
        }
        self.by_tid.insert(
            h.tid,
            Captured {
                identity,
                ktime_ns: h.id,
                via: h.via,
                load_flags: h.load_flags,
                mnt_ns: h.mnt_ns,
            },
        );
    }

    /// The kernel's signature verdict on a module that loaded.
    pub fn verdict(&mut self, v: ImageVerdict) {
        if let Some(c) = self.by_tid.get_mut(&v.tid)
            && c.ktime_ns <= v.ktime_ns
        {
            c.identity.sig_ok = (v.sig_ok != SIG_OK_UNKNOWN).then_some(v.sig_ok == 1);
            if c.identity.name.is_none() {
                let n = until_nul(&v.name);
                c.identity.name = (!n.is_empty()).then(|| escape_bytes(n));
            }
        }
    }

    /// Attaches the identity of this task's image to a load, attempt or decision.
    pub fn observe(&mut self, ev: &mut Event) {
        let end = ev.ktime_ns.saturating_add(ev.duration_ns.unwrap_or(0));
        let fits = |c: &Captured| c.ktime_ns <= end && end - c.ktime_ns < WINDOW_NS;
        match ev.kind {
            Kind::Load | Kind::Denied | Kind::WouldDeny => {
                if let Some(c) = self.by_tid.get(&ev.tid).filter(|c| fits(c)) {
                    ev.identity = Some(Box::new(c.identity.clone()));
                }
            }
            Kind::LoadAttempt
                if matches!(ev.syscall, Some(Syscall::InitModule | Syscall::FinitModule)) =>
            {
                match self.by_tid.remove(&ev.tid) {
                    Some(c) if fits(&c) => {
                        let mut id = c.identity;
                        let from_file = ev.syscall == Some(Syscall::FinitModule)
                            && c.via == image_via::LOAD_MODULE;
                        id.loaded_from_memory = Some(!from_file);
                        id.decompressed_by_kernel =
                            from_file && c.load_flags & MODULE_INIT_COMPRESSED_FILE != 0;
                        let path = if from_file { ev.path.as_deref() } else { None };
                        let ns = (c.mnt_ns != 0).then_some(c.mnt_ns);
                        id.origin =
                            Some(origin::origin(path, ns, self.host_ns, &mut self.packages));
                        ev.identity = Some(Box::new(id));
                    }
                    // None, or a capture older than this syscall (never claimed): dropped.
                    _ => {
                        if self.enabled && ev.result == Some(0) {
                            self.stats.missing += 1;
                            let mut id = Identity::default();
                            id.add_error(
                                "no image was captured for this load (identity off, or the \
                                 capture was lost: see the identity_* counters)",
                            );
                            ev.identity = Some(Box::new(id));
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use kmodmon_common::identity::{ImageHeader, image_kind};

    use super::*;
    use crate::event::{Clock, Event};

    fn image(tid: u32, t: u64, data: &[u8], via: u32, flags: u32) -> Image {
        Image {
            header: ImageHeader {
                kind: image_kind::HEADER,
                status: 0,
                pid: tid,
                tid,
                id: t,
                len: data.len() as u64,
                chunks: 1,
                load_flags: flags,
                cgroup_id: 1,
                mnt_ns: 9,
                via,
            },
            data: data.to_vec(),
            complete: true,
            problem: None,
        }
    }

    fn ev(kind: Kind, syscall: Option<Syscall>, tid: u32, t: u64, result: Option<i64>) -> Event {
        let mut e = Event::synthetic(kind, &Clock::new());
        e.tid = tid;
        e.ktime_ns = t;
        e.syscall = syscall;
        e.result = result;
        e
    }

    fn join() -> IdentityJoin {
        let mut j = IdentityJoin::new(Packages::new("/nonexistent"));
        j.host_ns = Some(9);
        j
    }

    #[test]
    fn load_and_attempt_of_the_same_task_carry_the_identity() {
        let mut j = join();
        j.image(image(
            7,
            100,
            b"abc",
            image_via::LOAD_MODULE,
            MODULE_INIT_COMPRESSED_FILE,
        ));
        let mut name = [0u8; 64];
        name[..3].copy_from_slice(b"kmt");
        j.verdict(ImageVerdict {
            kind: image_kind::VERDICT,
            sig_ok: 0,
            ktime_ns: 150,
            pid: 7,
            tid: 7,
            taints: 1 << 13,
            name,
        });
        let mut load = ev(Kind::Load, None, 7, 160, None);
        j.observe(&mut load);
        let id = load.identity.as_ref().expect("load has identity");
        assert_eq!(id.sig_ok, Some(false));
        assert_eq!(
            id.name.as_deref(),
            Some("kmt"),
            "from the kernel when .modinfo has none"
        );
        let mut attempt = ev(
            Kind::LoadAttempt,
            Some(Syscall::FinitModule),
            7,
            200,
            Some(0),
        );
        attempt.path = Some("/tmp/kmt.ko.xz".into());
        j.observe(&mut attempt);
        let id = attempt.identity.expect("attempt has identity");
        assert_eq!(id.sha256, load.identity.unwrap().sha256);
        assert_eq!(id.loaded_from_memory, Some(false));
        assert!(id.decompressed_by_kernel);
        let o = id.origin.unwrap();
        assert_eq!(o.path.as_deref(), Some("/tmp/kmt.ko.xz"));
        assert_eq!(o.mount_ns, "host");
        // Claimed once.
        let mut again = ev(
            Kind::LoadAttempt,
            Some(Syscall::FinitModule),
            7,
            300,
            Some(-17),
        );
        j.observe(&mut again);
        assert!(
            again.identity.is_none(),
            "a failure without a capture has no identity"
        );
    }

    #[test]
    fn init_module_images_are_from_memory_and_successes_without_one_say_so() {
        let mut j = join();
        j.image(image(3, 10, b"x", image_via::POST_LOAD_DATA, 0));
        let mut denied = ev(Kind::Denied, None, 3, 20, None);
        j.observe(&mut denied);
        assert!(
            denied.identity.is_some(),
            "the decision carries the identity"
        );
        let mut a = ev(
            Kind::LoadAttempt,
            Some(Syscall::InitModule),
            3,
            30,
            Some(-1),
        );
        j.observe(&mut a);
        let id = a.identity.unwrap();
        assert_eq!(id.loaded_from_memory, Some(true));
        assert_eq!(id.origin.unwrap().path, None);
        let mut ok = ev(Kind::LoadAttempt, Some(Syscall::InitModule), 4, 30, Some(0));
        j.observe(&mut ok);
        assert!(ok.identity.unwrap().error.unwrap().contains("no image"));
        assert_eq!(j.stats.missing, 1);
        // Another task's image is not taken.
        j.image(image(5, 10, b"y", image_via::LOAD_MODULE, 0));
        let mut other = ev(
            Kind::LoadAttempt,
            Some(Syscall::FinitModule),
            6,
            30,
            Some(-2),
        );
        j.observe(&mut other);
        assert!(other.identity.is_none());
    }
}
