//! Kernel records → [`Event`]: the RawEvent layout read out of a ring-buffer record, then
//! decoded field by field. Enrichment (cgroup path, container, verdict) comes later.
use kmodmon_common::{
    ANCESTORS, DecidedBy, EventKind, NamedBy, Op, PATH_COMPONENT_LEN, PATH_SLOTS, RawEvent, Source,
    lsm, missing, trunc,
};

use super::clock::Clock;
use super::model::{Ancestor, BlockedBy, CgroupV1, Event, Kind, SourceName, Syscall};
use crate::escape::{escape_bytes, until_nul};
use crate::modname;

/// Letters for taint bits, in the kernel's order (kernel/panic.c taint_flags).
const TAINT_LETTERS: [(u32, char); 20] = [
    (0, 'P'),
    (1, 'F'),
    (2, 'S'),
    (3, 'R'),
    (4, 'M'),
    (5, 'B'),
    (6, 'U'),
    (7, 'D'),
    (8, 'A'),
    (9, 'W'),
    (10, 'C'),
    (11, 'I'),
    (12, 'O'),
    (13, 'E'),
    (14, 'L'),
    (15, 'K'),
    (16, 'X'),
    (17, 'T'),
    (18, 'N'),
    (19, 'J'),
];

pub fn taint_letters(mask: u32) -> String {
    TAINT_LETTERS
        .iter()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, c)| *c)
        .collect()
}

/// Symbolic name of an errno value ("ENOSYS"), or "E<n>" when unknown.
pub fn errno_name(errno: i32) -> String {
    let e = nix::errno::Errno::from_raw(errno);
    if e == nix::errno::Errno::UnknownErrno {
        format!("E{errno}")
    } else {
        format!("{e:?}")
    }
}

/// Rebuilds a path from the kernel's leaf-first component slots (`slots` of them used).
pub fn path_from_components(raw: &[u8], slots: usize) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = raw
        .chunks(PATH_COMPONENT_LEN)
        .take(slots.min(PATH_SLOTS))
        .map(until_nul)
        .collect();
    parts.reverse();
    let mut out = Vec::with_capacity(raw.len() + 1);
    for p in parts {
        out.push(b'/');
        out.extend_from_slice(p);
    }
    out
}

/// Why a raw record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event ({1} bytes)")]
    Short(usize, usize),
    #[error("unknown event kind {0}")]
    Kind(u32),
    #[error("unknown event source {0}")]
    Source(u32),
    #[error("unknown syscall op {0}")]
    Op(u32),
    #[error("unknown blocked_by {0}")]
    BlockedBy(u32),
}

/// The name of a signal ("SIGSYS"), or "signal N" when unknown.
pub fn signal_name(signal: u32) -> String {
    i32::try_from(signal)
        .ok()
        .and_then(|n| nix::sys::signal::Signal::try_from(n).ok())
        .map_or_else(|| format!("signal {signal}"), |s| s.as_str().to_string())
}

/// Reads a RawEvent out of a ring-buffer record without assuming alignment.
pub fn raw_from_bytes(bytes: &[u8]) -> Result<RawEvent, DecodeError> {
    let size = std::mem::size_of::<RawEvent>();
    if bytes.len() < size {
        return Err(DecodeError::Short(bytes.len(), size));
    }
    // SAFETY: RawEvent is repr(C) plain data (every bit pattern valid) and the length was checked.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawEvent>()) })
}

impl Event {
    /// Decodes a kernel record. Enrichment (cgroup path, container, verdict) comes later.
    pub fn from_raw(raw: &RawEvent, clock: &Clock) -> Result<Event, DecodeError> {
        let kind = EventKind::from_u32(raw.kind).ok_or(DecodeError::Kind(raw.kind))?;
        let source = Source::from_u32(raw.source).ok_or(DecodeError::Source(raw.source))?;
        let op = Op::from_u32(raw.op).ok_or(DecodeError::Op(raw.op))?;
        let blocked_by = kmodmon_common::BlockedBy::from_u32(raw.blocked_by)
            .ok_or(DecodeError::BlockedBy(raw.blocked_by))?;
        let mut truncated = Vec::new();
        let mut missing_fields = Vec::new();
        let name_bytes = until_nul(&raw.name);
        let mut module = (!name_bytes.is_empty()).then(|| escape_bytes(name_bytes));
        let syscall = Syscall::from_kernel(op);
        let attempt = syscall.is_some();
        // The module name the file's name claims (its leaf up to the first '.', as the LSM
        // programs compare it).
        let mut file_module = None;
        let path = if op == Op::FinitModule && raw.path_len > 0 {
            let p = path_from_components(&raw.path, raw.path_len as usize);
            let escaped = escape_bytes(&p);
            let leaf = p.rsplit(|&b| b == b'/').next().unwrap_or(&[]);
            let stem = leaf.split(|&b| b == b'.').next().unwrap_or(&[]);
            if !stem.is_empty() {
                file_module = Some(modname::normalize(&escape_bytes(stem)));
            }
            if module.is_none() {
                module = modname::from_file(&escape_bytes(leaf));
            }
            Some(escaped)
        } else {
            None
        };
        // LSM hooks see neither parameters, flags nor the fd.
        let lsm = source == Source::Lsm;
        let decision = matches!(kind, EventKind::Denied | EventKind::WouldDeny);
        let params = match op {
            Op::InitModule | Op::FinitModule if !lsm => Some(escape_bytes(until_nul(&raw.params))),
            _ => None,
        };
        for (bit, field) in [
            (trunc::NAME, "module"),
            (trunc::PARAMS, "params"),
            (trunc::PATH, "path"),
        ] {
            if raw.truncated & bit != 0 {
                truncated.push(field.to_string());
            }
        }
        for (bit, field) in [
            (missing::NAME, "module"),
            (missing::PARAMS, "params"),
            (missing::PATH, "path"),
            (missing::PPID, "ppid"),
            (missing::RESULT, "result"),
            (missing::CGROUP_V1, "cgroup_v1"),
        ] {
            if raw.missing & bit != 0 {
                missing_fields.push(field.to_string());
            }
        }
        // A caller that got a signal instead of a result (seccomp TRAP / KILL) saw no result.
        let signal = (attempt && raw.signal != 0).then(|| signal_name(raw.signal));
        // A denial fails what it denied: its result is the errno the caller saw.
        let result = ((attempt && signal.is_none() && raw.missing & missing::RESULT == 0)
            || kind == EventKind::Denied)
            .then_some(raw.ret);
        let errno = match result {
            Some(r) if r < 0 => Some(errno_name((-r) as i32)),
            _ => None,
        };
        // A repeat summary is dated by its last repeat; its first attempt was reported alone.
        let repeat = (raw.repeat > 0).then_some(raw.repeat);
        let duration_ns = (attempt && repeat.is_none() && raw.end_ktime_ns > raw.ktime_ns)
            .then(|| raw.end_ktime_ns - raw.ktime_ns);
        let ktime_ns = if repeat.is_some() {
            raw.end_ktime_ns
        } else {
            raw.ktime_ns
        };
        Ok(Event {
            time: clock.rfc3339(ktime_ns),
            ktime_ns,
            kind: Kind::from(kind),
            source: SourceName::from(source),
            module,
            syscall,
            path,
            params,
            flags: (!lsm && matches!(op, Op::FinitModule | Op::DeleteModule)).then_some(raw.flags),
            len: (!lsm && op == Op::InitModule).then_some(raw.len),
            fd: (!lsm && op == Op::FinitModule).then_some(raw.fd),
            taints: (kind == EventKind::Load).then_some(raw.taints),
            taint_flags: (kind == EventKind::Load).then(|| taint_letters(raw.taints)),
            wait: (kind == EventKind::Request).then_some(raw.wait != 0),
            result,
            errno,
            blocked_by: BlockedBy::from_kernel(blocked_by),
            signal,
            duration_ns,
            repeat,
            first_time: repeat.map(|_| clock.rfc3339(raw.ktime_ns)),
            last_time: repeat.map(|_| clock.rfc3339(raw.end_ktime_ns)),
            pid: raw.pid,
            tid: raw.tid,
            ppid: (raw.missing & missing::PPID == 0).then_some(raw.ppid),
            uid: raw.uid,
            gid: raw.gid,
            comm: escape_bytes(until_nul(&raw.comm)),
            cgroup_id: raw.cgroup_id,
            cgroup_path: None,
            container: None,
            verdict: None,
            rule_id: decision.then_some(raw.rule_id),
            policy_generation: decision.then_some(raw.policy_generation),
            decided_by: decision
                .then(|| DecidedBy::from_u32(raw.decided_by).map(|d| d.name().to_string()))
                .flatten(),
            deciding_cgroup_id: (decision && raw.decided_at != 0).then_some(raw.decided_at),
            named_by: decision
                .then(|| NamedBy::from_u32(raw.named_by).map(|d| d.name().to_string()))
                .flatten(),
            file_module: (decision && raw.lsm_flags & lsm::NAME_MISMATCH != 0)
                .then(|| file_module.clone())
                .flatten(),
            modinfo_name: (decision && raw.lsm_flags & lsm::MODINFO_MISMATCH != 0)
                .then(|| escape_bytes(until_nul(&raw.params))),
            count: None,
            object: None,
            repaired: None,
            requested_by: None,
            modules: Vec::new(),
            truncated,
            missing: missing_fields,
            // Enforcer::describe replaces this with the rule's name (from `rule_id`).
            detail: decision.then(|| format!("policy rule #{}", raw.rule_id)),
            // Enrichment keeps it where it decided attribution (and fills the rest).
            cgroup_v1: (raw.cgroup_v1_id != 0).then(|| CgroupV1 {
                id: raw.cgroup_v1_id,
                ..CgroupV1::default()
            }),
            on_behalf_of: None,
            ancestors: raw
                .ancestors
                .iter()
                .take((raw.ancestors_len as usize).min(ANCESTORS))
                .map(|a| Ancestor {
                    pid: a.tgid,
                    start_boottime_ns: a.start_boottime_ns,
                    comm: escape_bytes(until_nul(&a.comm)),
                })
                .collect(),
            identity: None,
            cross_view: None,
            loaded_at: None,
            severity: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmodmon_common::{COMM_LEN, NAME_LEN};

    fn raw(kind: EventKind, op: Op) -> RawEvent {
        let mut r = RawEvent::zeroed();
        r.kind = kind as u32;
        r.source = Source::RawSyscalls as u32;
        r.op = op as u32;
        r.pid = 42;
        r.tid = 43;
        r.ppid = 1;
        r.comm[..6].copy_from_slice(b"insmod");
        r.ktime_ns = 1_000;
        r.end_ktime_ns = 1_500;
        r
    }

    #[test]
    fn finit_attempt_decodes_path_and_module() {
        let mut r = raw(EventKind::LoadAttempt, Op::FinitModule);
        for (i, c) in ["ip_vs.ko", "ipvs", "netfilter", "lib"].iter().enumerate() {
            let at = i * PATH_COMPONENT_LEN;
            r.path[at..at + c.len()].copy_from_slice(c.as_bytes());
        }
        r.path_len = 4;
        r.ret = -38;
        r.fd = 3;
        let e = Event::from_raw(&r, &Clock::new()).unwrap();
        assert_eq!(e.kind, Kind::LoadAttempt);
        assert_eq!(e.path.as_deref(), Some("/lib/netfilter/ipvs/ip_vs.ko"));
        assert_eq!(e.module.as_deref(), Some("ip_vs"));
        assert_eq!(e.errno.as_deref(), Some("ENOSYS"));
        assert_eq!(e.result, Some(-38));
        assert_eq!(e.fd, Some(3));
        assert_eq!(e.duration_ns, Some(500));
        assert_eq!(e.comm, "insmod");
        assert_eq!(e.params.as_deref(), Some(""));
    }

    #[test]
    fn delete_attempt_uses_name_and_escapes_it() {
        let mut r = raw(EventKind::UnloadAttempt, Op::DeleteModule);
        r.name[..7].copy_from_slice(b"bad\x1b[1m");
        r.truncated = trunc::NAME;
        let e = Event::from_raw(&r, &Clock::new()).unwrap();
        assert_eq!(e.module.as_deref(), Some("bad\\x1b[1m"));
        assert_eq!(e.truncated, vec!["module".to_string()]);
        assert_eq!(e.result, Some(0));
        assert_eq!(e.errno, None);
    }

    #[test]
    fn a_repeat_summary_is_dated_by_its_last_repeat() {
        let mut r = raw(EventKind::UnloadAttempt, Op::DeleteModule);
        r.source = Source::SysExit as u32;
        r.name[..1].copy_from_slice(b"x");
        r.ret = -2;
        r.repeat = 49_999;
        r.ktime_ns = 1_000;
        r.end_ktime_ns = 9_000;
        let clock = Clock::new();
        let e = Event::from_raw(&r, &clock).unwrap();
        assert_eq!(e.repeat, Some(49_999));
        assert_eq!(e.ktime_ns, 9_000);
        assert_eq!(e.time, clock.rfc3339(9_000));
        assert_eq!(e.first_time.as_deref(), Some(clock.rfc3339(1_000).as_str()));
        assert_eq!(e.last_time.as_deref(), Some(e.time.as_str()));
        assert_eq!(e.duration_ns, None, "not one syscall's duration");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["repeat"], 49_999);
        assert_eq!(json["source"], "sys_exit");
        // An ordinary event has none of the three.
        let e = Event::from_raw(&raw(EventKind::UnloadAttempt, Op::DeleteModule), &clock).unwrap();
        let json = serde_json::to_value(&e).unwrap();
        for k in ["repeat", "first_time", "last_time"] {
            assert!(json.get(k).is_none(), "{k} in {json}");
        }
    }

    #[test]
    fn load_has_taints_and_no_result() {
        let mut r = raw(EventKind::Load, Op::None);
        r.source = Source::ModuleTracepoint as u32;
        r.taints = (1 << 12) | (1 << 13);
        r.name[..5].copy_from_slice(b"ip_vs");
        let e = Event::from_raw(&r, &Clock::new()).unwrap();
        assert_eq!(e.taint_flags.as_deref(), Some("OE"));
        assert_eq!(e.result, None);
        assert_eq!(e.syscall, None);
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["kind"], "load");
        assert_eq!(json["source"], "module_tracepoint");
        assert!(json.get("result").is_none());
    }

    #[test]
    fn each_scalar_has_its_own_field() {
        let mut r = raw(EventKind::Request, Op::None);
        r.source = Source::ModuleTracepoint as u32;
        r.wait = 1;
        r.taints = 7;
        r.rule_id = 9;
        let e = Event::from_raw(&r, &Clock::new()).unwrap();
        assert_eq!(e.wait, Some(true));
        assert_eq!(
            (e.taints, e.rule_id, e.policy_generation),
            (None, None, None)
        );

        let mut r = raw(EventKind::Denied, Op::FinitModule);
        r.source = Source::Lsm as u32;
        r.rule_id = 3;
        r.policy_generation = 12;
        r.taints = 1;
        r.wait = 1;
        let e = Event::from_raw(&r, &Clock::new()).unwrap();
        assert_eq!((e.rule_id, e.policy_generation), (Some(3), Some(12)));
        assert_eq!((e.taints, e.wait), (None, None));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["rule_id"], 3);
        assert_eq!(json["policy_generation"], 12);

        let e = Event::from_raw(&raw(EventKind::Load, Op::None), &Clock::new()).unwrap();
        let json = serde_json::to_value(&e).unwrap();
        assert!(json.get("rule_id").is_none() && json.get("policy_generation").is_none());
    }

    #[test]
    fn bad_kind_is_an_error_not_a_panic() {
        let mut r = raw(EventKind::Load, Op::None);
        r.kind = 99;
        assert_eq!(
            Event::from_raw(&r, &Clock::new()),
            Err(DecodeError::Kind(99))
        );
        assert!(matches!(
            raw_from_bytes(&[0u8; 10]),
            Err(DecodeError::Short(10, _))
        ));
    }

    #[test]
    fn ancestors_and_the_v1_cgroup_are_decoded() {
        let mut r = raw(EventKind::LoadAttempt, Op::FinitModule);
        r.cgroup_v1_id = 5216;
        r.ancestors_len = 2;
        r.ancestors[0].tgid = 900;
        r.ancestors[0].start_boottime_ns = 12_340_000_000;
        r.ancestors[0].comm[..2].copy_from_slice(b"sh");
        r.ancestors[1].tgid = 800;
        r.ancestors[1].comm[..4].copy_from_slice(b"ru\x1bc");
        // Stale entries beyond ancestors_len are ignored.
        r.ancestors[2].tgid = 700;
        let e = Event::from_raw(&r, &Clock::new()).unwrap();
        assert_eq!(e.cgroup_v1.as_ref().map(|c| c.id), Some(5216));
        assert_eq!(e.ancestors.len(), 2);
        assert_eq!(
            (e.ancestors[0].pid, e.ancestors[0].start_boottime_ns),
            (900, 12_340_000_000)
        );
        assert_eq!(e.ancestors[1].comm, "ru\\x1bc");
        let json = serde_json::to_value(&e).unwrap();
        assert!(json.get("ancestors").is_none(), "not part of the schema");
        r.ancestors_len = 99;
        r.missing = missing::CGROUP_V1;
        r.cgroup_v1_id = 0;
        let e = Event::from_raw(&r, &Clock::new()).unwrap();
        assert_eq!(e.ancestors.len(), kmodmon_common::ANCESTORS);
        assert_eq!(
            (e.cgroup_v1, e.missing),
            (None, vec!["cgroup_v1".to_string()])
        );
    }

    #[test]
    fn json_round_trips() {
        let mut r = raw(EventKind::LoadAttempt, Op::InitModule);
        r.params[..4].copy_from_slice(b"a=1\xff");
        r.len = 4096;
        let e = Event::from_raw(&r, &Clock::new()).unwrap();
        let s = serde_json::to_string(&e).unwrap();
        let back: Event = serde_json::from_str(&s).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.params.as_deref(), Some("a=1\\xff"));
        let _ = (COMM_LEN, NAME_LEN);
    }

    #[test]
    fn taint_letters_in_kernel_order() {
        assert_eq!(taint_letters(0), "");
        assert_eq!(taint_letters(1 | (1 << 12)), "PO");
    }
}
