//! What a scenario sent back, parsed, and the checks every scenario shares: kmodmon's events
//! against the kernel's own module tracepoints (the oracle), and against a scenario's list of
//! expected events, exactly (no event missing, none extra).
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use serde::Deserialize;

/// The fields of kmodmon's JSON events that the checks look at (the rest is ignored).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Event {
    pub kind: String,
    pub module: Option<String>,
    pub syscall: Option<String>,
    pub path: Option<String>,
    pub result: Option<i64>,
    pub errno: Option<String>,
    #[serde(default)]
    pub tid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub cgroup_id: u64,
    pub cgroup_path: Option<String>,
    pub container: Option<Container>,
    pub taints: Option<u32>,
    pub taint_flags: Option<String>,
    pub verdict: Option<String>,
    pub requested_by: Option<RequestedBy>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct RequestedBy {
    pub container: Option<Container>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub runtime: String,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}",
            self.kind,
            self.module.as_deref().unwrap_or("<none>")
        )?;
        if let Some(s) = &self.syscall {
            write!(f, " {s}")?;
        }
        if let Some(r) = self.result {
            write!(f, " result={r}")?;
        }
        if let Some(e) = &self.errno {
            write!(f, " ({e})")?;
        }
        write!(
            f,
            " by {}[{}] cgroup {}",
            self.comm,
            self.tid,
            self.cgroup_path.as_deref().unwrap_or("?")
        )?;
        if let Some(c) = &self.container {
            write!(f, " container {}:{}", c.runtime, short(&c.id))?;
        }
        Ok(())
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// kmodmon's `tail --json` output: one event per line.
pub fn parse_events(text: &str) -> Result<Vec<Event>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("events.jsonl line {}: {l}", i + 1))
        })
        .collect()
}

/// The kernel's module tracepoints, as tracefs prints them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OracleEvent {
    /// module_load, module_free or module_request.
    pub event: String,
    pub module: String,
    pub tid: u32,
    /// module_load: taint letters (P, O, F, C, E); module_request: "wait=N".
    pub detail: String,
}

impl OracleEvent {
    /// The kmodmon kind the kernel event corresponds to.
    pub fn kind(&self) -> &'static str {
        match self.event.as_str() {
            "module_load" => "load",
            "module_free" => "unload",
            _ => "request",
        }
    }
}

/// Lines like `   modprobe-192  [000] .N...  15.750171: module_load: crc32c_intel OE`.
pub fn parse_oracle(text: &str) -> Vec<OracleEvent> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        for event in ["module_load", "module_free", "module_request"] {
            let marker = format!(": {event}: ");
            let Some((head, payload)) = line.split_once(&marker) else {
                continue;
            };
            let task = head.split_whitespace().next().unwrap_or("");
            let tid = task
                .rsplit_once('-')
                .and_then(|(_, t)| t.parse().ok())
                .unwrap_or(0);
            let mut words = payload.split_whitespace();
            let module = words.next().unwrap_or("").to_string();
            let detail = words.next().unwrap_or("").to_string();
            out.push(OracleEvent {
                event: event.to_string(),
                module,
                tid,
                detail,
            });
        }
    }
    out
}

/// `key=value` lines.
pub fn parse_facts(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Module names in a /proc/modules snapshot.
pub fn parse_proc_modules(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The JSON summary kmodmon prints on stderr at exit: problems in it.
pub fn summary_problems(tail_err: &str) -> Vec<String> {
    let Some(line) = tail_err
        .lines()
        .rev()
        .find(|l| l.starts_with("{\"summary\""))
    else {
        return vec!["kmodmon printed no summary at exit".to_string()];
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return vec![format!("kmodmon's summary is not JSON: {line}")];
    };
    let s = &v["summary"];
    let mut out = Vec::new();
    for field in ["dropped", "undecodable", "unread", "in_flight"] {
        if s[field].as_u64().unwrap_or(0) != 0 {
            out.push(format!("kmodmon summary: {field} = {}", s[field]));
        }
    }
    if s["errors"].as_object().is_some_and(|e| !e.is_empty()) {
        out.push(format!("kmodmon summary: errors {}", s["errors"]));
    }
    out
}

/// `kmodmon sources` (what it would attach here) must say what `tail` then attached: the
/// user-facing statement of each kernel's degradations has to be true.
pub fn sources_agree(sources: &str, tail_err: &str) -> Vec<String> {
    // The first line is the plan; notes (reasons, degradations) follow it.
    let predicted = sources.lines().next().unwrap_or_default().trim();
    let Some(attached) = tail_err.lines().find_map(|l| {
        l.strip_prefix("kmodmon: attached in ")?
            .split_once(": ")
            .map(|(_, w)| w.trim())
    }) else {
        return vec!["kmodmon printed no `attached` line".to_string()];
    };
    if predicted == attached {
        return Vec::new();
    }
    let note = tail_err
        .lines()
        .find_map(|l| l.strip_prefix("kmodmon: note: "))
        .map(|n| format!("\n  its note: {}", n.chars().take(300).collect::<String>()))
        .unwrap_or_default();
    vec![format!(
        "`kmodmon sources` said\n    {predicted}\n  but `kmodmon tail` attached\n    {attached}{note}"
    )]
}

/// Every module_load / module_free / module_request the kernel recorded appears in kmodmon's
/// stream exactly once, with the same name and thread; kmodmon has no such event the kernel
/// did not record. Load taints must agree on the letters the tracepoint prints.
pub fn against_oracle(events: &[Event], oracle: &[OracleEvent]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut used = vec![false; events.len()];
    for o in oracle {
        let found = events.iter().enumerate().find(|(i, e)| {
            !used[*i]
                && e.kind == o.kind()
                && e.module.as_deref() == Some(o.module.as_str())
                && e.tid == o.tid
        });
        match found {
            Some((i, e)) => {
                used[i] = true;
                if o.event == "module_load" {
                    let letters: String = e.taint_flags.clone().unwrap_or_default();
                    let shown: BTreeSet<char> =
                        letters.chars().filter(|c| "POFCE".contains(*c)).collect();
                    let kernel: BTreeSet<char> = o.detail.chars().collect();
                    if e.taints.is_none() {
                        problems.push(format!("load of {} has no taints field", o.module));
                    } else if shown != kernel {
                        problems.push(format!(
                            "load of {}: kernel taint letters {:?}, kmodmon {:?}",
                            o.module, o.detail, letters
                        ));
                    }
                }
            }
            None => problems.push(format!(
                "the kernel recorded {} {} (thread {}), kmodmon has no {} event for it",
                o.event,
                o.module,
                o.tid,
                o.kind()
            )),
        }
    }
    for (i, e) in events.iter().enumerate() {
        if !used[i] && ["load", "unload", "request"].contains(&e.kind.as_str()) {
            problems.push(format!(
                "kmodmon reported `{e}`, the kernel's tracepoints did not"
            ));
        }
    }
    problems
}

/// An event a scenario expects; None fields are not checked.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    pub kind: &'static str,
    pub module: Option<String>,
    /// The event may also have no module name (init_module: kmodmon cannot always tell).
    pub module_may_be_unknown: bool,
    pub syscall: Option<&'static str>,
    pub result: Option<i64>,
    pub errno: Option<&'static str>,
    /// finit_module: the file's path ends with this (the module's path in modules.dep).
    pub path_suffix: Option<String>,
    pub comm: Option<String>,
    pub cgroup_id: Option<u64>,
    pub cgroup_path: Option<String>,
    /// Some(None): no container; Some(Some(c)): exactly this container.
    pub container: Option<Option<Container>>,
    /// host / expected / unexpected.
    pub verdict: Option<&'static str>,
    /// The ID of the container whose autoload request led to this event.
    pub requested_by: Option<String>,
}

impl Expect {
    pub fn new(kind: &'static str, module: &str) -> Expect {
        Expect {
            kind,
            module: Some(module.to_string()),
            ..Expect::default()
        }
    }

    fn matches(&self, e: &Event) -> bool {
        e.kind == self.kind
            && self.module.as_ref().is_none_or(|m| {
                e.module.as_ref() == Some(m) || (self.module_may_be_unknown && e.module.is_none())
            })
            && self.syscall.is_none_or(|s| e.syscall.as_deref() == Some(s))
            && self.result.is_none_or(|r| e.result == Some(r))
            && self.errno.is_none_or(|x| e.errno.as_deref() == Some(x))
            && self
                .path_suffix
                .as_ref()
                .is_none_or(|p| e.path.as_ref().is_some_and(|ep| ep.ends_with(p.as_str())))
            && self.comm.as_ref().is_none_or(|c| &e.comm == c)
            && self.cgroup_id.is_none_or(|c| e.cgroup_id == c)
            && self
                .cgroup_path
                .as_ref()
                .is_none_or(|p| e.cgroup_path.as_ref() == Some(p))
            && self.container.as_ref().is_none_or(|c| &e.container == c)
            && self.verdict.is_none_or(|v| e.verdict.as_deref() == Some(v))
            && self.requested_by.as_ref().is_none_or(|id| {
                e.requested_by
                    .as_ref()
                    .and_then(|r| r.container.as_ref())
                    .is_some_and(|c| &c.id == id)
            })
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}",
            self.kind,
            self.module.as_deref().unwrap_or("<any>")
        )?;
        if self.module_may_be_unknown {
            write!(f, " (or no name)")?;
        }
        if let Some(s) = self.syscall {
            write!(f, " {s}")?;
        }
        if let Some(r) = self.result {
            write!(f, " result={r}")?;
        }
        if let Some(e) = self.errno {
            write!(f, " ({e})")?;
        }
        if let Some(p) = &self.path_suffix {
            write!(f, " path …/{p}")?;
        }
        if let Some(c) = &self.comm {
            write!(f, " by {c}")?;
        }
        if let Some(p) = &self.cgroup_path {
            write!(f, " cgroup {p}")?;
        }
        if let Some(id) = self.cgroup_id {
            write!(f, " cgroup id {id}")?;
        }
        match &self.container {
            Some(Some(c)) => write!(f, " container {}:{}", c.runtime, short(&c.id))?,
            Some(None) => write!(f, " no container")?,
            None => {}
        }
        if let Some(v) = self.verdict {
            write!(f, " verdict={v}")?;
        }
        if let Some(r) = &self.requested_by {
            write!(f, " requested_by={}", &r[..r.len().min(12)])?;
        }
        Ok(())
    }
}

/// Matches kmodmon's events of the module kinds one-to-one against `expected`.
pub fn exactly(events: &[Event], expected: &[Expect]) -> Vec<String> {
    const KINDS: [&str; 5] = [
        "load",
        "unload",
        "request",
        "load_attempt",
        "unload_attempt",
    ];
    let mut used = vec![false; events.len()];
    let mut problems = Vec::new();
    for x in expected {
        match events
            .iter()
            .enumerate()
            .find(|(i, e)| !used[*i] && x.matches(e))
        {
            Some((i, _)) => used[i] = true,
            None => {
                let near: Vec<String> = events
                    .iter()
                    .enumerate()
                    .filter(|(i, e)| {
                        !used[*i]
                            && e.kind == x.kind
                            && (e.module == x.module || e.module.is_none())
                    })
                    .map(|(_, e)| format!("\n        got: {e}"))
                    .collect();
                problems.push(format!("missing event: {x}{}", near.concat()));
            }
        }
    }
    for (i, e) in events.iter().enumerate() {
        if !used[i] && KINDS.contains(&e.kind.as_str()) {
            problems.push(format!("unexpected event: {e}"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "# tracer: nop\n#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION\n        modprobe-192     [000] .N...    15.750171: module_load: crc32c_intel \n     kworker/u2:1-33 [000] .....    16.0: module_request: iptable_nat wait=1 call_site=xt_find_table_lock+0x10\n        modprobe-196     [000] .N...    16.097704: module_free: ip_vs_wrr\n    insmod-7 [000] ..... 1.0: module_load: evil OE\n";

    fn ev(kind: &str, module: &str, tid: u32) -> Event {
        Event {
            kind: kind.into(),
            module: Some(module.into()),
            tid,
            taints: Some(0),
            taint_flags: Some(String::new()),
            ..Event::default()
        }
    }

    #[test]
    fn oracle_lines_parse_with_thread_and_detail() {
        let o = parse_oracle(TRACE);
        assert_eq!(o.len(), 4);
        assert_eq!(
            (
                o[0].kind(),
                o[0].module.as_str(),
                o[0].tid,
                o[0].detail.as_str()
            ),
            ("load", "crc32c_intel", 192, "")
        );
        assert_eq!(
            (o[1].kind(), o[1].module.as_str(), o[1].tid),
            ("request", "iptable_nat", 33)
        );
        assert_eq!(o[1].detail, "wait=1");
        assert_eq!((o[2].kind(), o[2].tid), ("unload", 196));
        assert_eq!(o[3].detail, "OE");
    }

    #[test]
    fn oracle_check_finds_missing_extra_and_taint_mismatch() {
        let o = parse_oracle(TRACE);
        let mut evil = ev("load", "evil", 7);
        evil.taints = Some(1 << 12 | 1 << 13);
        evil.taint_flags = Some("OE".into());
        let good = vec![
            ev("load", "crc32c_intel", 192),
            ev("request", "iptable_nat", 33),
            ev("unload", "ip_vs_wrr", 196),
            evil.clone(),
            ev("load_attempt", "x", 1),
        ];
        assert_eq!(against_oracle(&good, &o), Vec::<String>::new());

        let mut bad = good.clone();
        bad[3].taint_flags = Some("O".into());
        bad.remove(2);
        bad.push(ev("load", "crc32c_intel", 192)); // twice
        let p = against_oracle(&bad, &o);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(p[0].contains("module_free ip_vs_wrr"));
        assert!(p[1].contains("taint letters"));
        assert!(p[2].contains("kmodmon reported `load crc32c_intel"));
    }

    #[test]
    fn exact_matching_reports_missing_and_unexpected() {
        let mut a = ev("load_attempt", "ip_vs", 5);
        a.result = Some(-17);
        a.errno = Some("EEXIST".into());
        let events = vec![a, ev("load", "ip_vs", 5), ev("expectation", "x", 1)];
        let mut want = Expect::new("load_attempt", "ip_vs");
        want.result = Some(-17);
        want.errno = Some("EEXIST");
        assert!(exactly(&events, &[want.clone(), Expect::new("load", "ip_vs")]).is_empty());
        want.result = Some(0);
        let p = exactly(&events, &[want]);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(p[0].starts_with("missing event: load_attempt ip_vs result=0"));
        assert!(p[0].contains("got: load_attempt ip_vs result=-17 (EEXIST)"));
        assert!(p[1].starts_with("unexpected event: load_attempt ip_vs"));
        assert!(p[2].starts_with("unexpected event: load ip_vs"));
    }

    #[test]
    fn sources_must_match_what_was_attached() {
        let sources = "module events: module tracepoints; attempts: fexit\n";
        let ok = "kmodmon: attached in 12 ms: module events: module tracepoints; attempts: fexit\n";
        assert!(sources_agree(sources, ok).is_empty());
        let with_notes =
            "module events: module tracepoints; attempts: fexit\nnote: a degradation\n";
        assert!(
            sources_agree(with_notes, ok).is_empty(),
            "notes after the plan line are not the plan"
        );
        let fell_back = "kmodmon: attached in 9 ms: module events: module tracepoints; attempts: syscall_tracepoint\nkmodmon: note: fexit failed (verifier)\n";
        let p = sources_agree(sources, fell_back);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("attempts: syscall_tracepoint") && p[0].contains("fexit failed"),
            "{}",
            p[0]
        );
        assert_eq!(sources_agree(sources, "").len(), 1);
    }

    #[test]
    fn events_facts_modules_and_summary_parse() {
        let e = parse_events("{\"kind\":\"load\",\"module\":\"a\",\"container\":{\"id\":\"ab\",\"runtime\":\"docker\"},\"extra\":1}\n\n").unwrap();
        assert_eq!(e[0].container.as_ref().unwrap().runtime, "docker");
        assert!(
            parse_events("not json")
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
        let f = parse_facts("rc.modprobe=0\nctr.a.cgroup_path=/docker/x=y\n");
        assert_eq!(f["ctr.a.cgroup_path"], "/docker/x=y");
        let m = parse_proc_modules("ip_vs 1 0 - Live 0x0\nnf_conntrack 2 1 ip_vs, Live 0x0\n");
        assert_eq!(m.into_iter().collect::<Vec<_>>(), ["ip_vs", "nf_conntrack"]);
        assert!(
            summary_problems("kmodmon: attached\n{\"summary\":{\"dropped\":0,\"errors\":{}}}")
                .is_empty()
        );
        assert_eq!(
            summary_problems("{\"summary\":{\"dropped\":2,\"errors\":{\"x\":1}}}").len(),
            2
        );
        assert_eq!(summary_problems("").len(), 1);
    }
}
