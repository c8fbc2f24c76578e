//! One filter for every front end that selects events: `tail` (--module, --kind,
//! --container, --pid, --verdict) and `export` (the same, and a time window).
use std::time::SystemTime;

use thiserror::Error;

use crate::{
    event::{Event, Kind, Verdict, parse_event_time},
    modname,
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("unknown event kind {0:?}; kinds are: {1}")]
    Kind(String, String),
    #[error("--module {0:?}: {1}")]
    Module(String, modname::NameError),
}

/// `--verdict V`: a verdict, or `none` for events without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictArg(pub Option<Verdict>);

/// The `--verdict` value parser (clap).
pub fn parse_verdict(s: &str) -> Result<VerdictArg, String> {
    if s == "none" {
        return Ok(VerdictArg(None));
    }
    Verdict::parse(s)
        .map(|v| VerdictArg(Some(v)))
        .ok_or_else(|| {
            let all: Vec<&str> = Verdict::ALL.iter().map(|v| v.as_str()).collect();
            format!("unknown verdict {s:?}; one of: {}, none", all.join(", "))
        })
}

/// A conjunction of the given filters; each list is a disjunction.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    modules: Vec<String>,
    kinds: Vec<Kind>,
    containers: Vec<String>,
    pids: Vec<u32>,
    /// `None` matches events without a verdict.
    verdicts: Vec<Option<Verdict>>,
    /// Inclusive.
    since: Option<SystemTime>,
    /// Exclusive.
    until: Option<SystemTime>,
}

impl Filter {
    pub fn new(
        modules: &[String],
        kinds: &[String],
        containers: &[String],
        pids: &[u32],
    ) -> Result<Filter, FilterError> {
        let modules = modules
            .iter()
            .map(|m| modname::validate(m).map_err(|e| FilterError::Module(m.clone(), e)))
            .collect::<Result<Vec<_>, _>>()?;
        let kinds = kinds
            .iter()
            .flat_map(|k| k.split(','))
            .map(|k| {
                Kind::parse(k.trim()).ok_or_else(|| {
                    FilterError::Kind(
                        k.to_string(),
                        Kind::ALL
                            .iter()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Filter {
            modules,
            kinds,
            containers: containers.iter().map(|c| c.to_ascii_lowercase()).collect(),
            pids: pids.to_vec(),
            ..Filter::default()
        })
    }

    /// Only these verdicts (`None`: events without one).
    pub fn verdicts(mut self, verdicts: Vec<Option<Verdict>>) -> Filter {
        self.verdicts = verdicts;
        self
    }

    /// Only events whose time is in `[since, until)`.
    pub fn window(mut self, since: Option<SystemTime>, until: Option<SystemTime>) -> Filter {
        self.since = since;
        self.until = until;
        self
    }

    pub fn matches(&self, ev: &Event) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&ev.kind))
            && (self.pids.is_empty() || self.pids.contains(&ev.pid))
            && (self.verdicts.is_empty() || self.verdicts.contains(&ev.verdict))
            && (self.modules.is_empty() || self.module_matches(ev))
            && (self.containers.is_empty() || self.container_matches(ev))
            && self.in_window(ev)
    }

    fn in_window(&self, ev: &Event) -> bool {
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Some(t) = parse_event_time(&ev.time) else {
            return false;
        };
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t < u)
    }

    fn module_matches(&self, ev: &Event) -> bool {
        let mut names: Vec<&str> = ev.module.iter().map(String::as_str).collect();
        names.extend(ev.modules.iter().map(String::as_str));
        if let Some(r) = &ev.requested_by {
            names.push(&r.requested);
        }
        names
            .iter()
            .any(|n| self.modules.iter().any(|m| modname::same(m, n)))
    }

    /// The event's container, or the container its host process acted for
    /// (`on_behalf_of`); `host` selects events with neither.
    fn container_matches(&self, ev: &Event) -> bool {
        let c = ev
            .container
            .as_ref()
            .or(ev.on_behalf_of.as_ref().map(|b| &b.container));
        self.containers.iter().any(|want| match c {
            None => want == "host",
            Some(c) => {
                c.id.to_ascii_lowercase().starts_with(want.as_str())
                    || c.name
                        .as_deref()
                        .is_some_and(|n| n.eq_ignore_ascii_case(want))
                    || c.pod_name
                        .as_deref()
                        .is_some_and(|n| n.eq_ignore_ascii_case(want))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Clock, Container};

    fn ev(kind: Kind, module: &str, container: Option<&str>) -> Event {
        let mut e = Event::synthetic(kind, &Clock::new());
        e.module = Some(module.to_string());
        e.pid = 10;
        e.container = container.map(|id| Container {
            id: id.to_string(),
            runtime: "docker".into(),
            name: Some("web".into()),
            ..Default::default()
        });
        e
    }

    #[test]
    fn empty_filter_matches_all() {
        let f = Filter::new(&[], &[], &[], &[]).unwrap();
        assert!(f.matches(&ev(Kind::Load, "x", None)));
    }

    #[test]
    fn module_filter_treats_dash_as_underscore() {
        let f = Filter::new(&["ip-vs".into()], &[], &[], &[]).unwrap();
        assert!(f.matches(&ev(Kind::Load, "ip_vs", None)));
        assert!(!f.matches(&ev(Kind::Load, "ip_vs_wrr", None)));
    }

    #[test]
    fn kinds_accept_commas_and_reject_unknown() {
        let f = Filter::new(&[], &["load,unload".into()], &[], &[]).unwrap();
        assert!(f.matches(&ev(Kind::Unload, "x", None)));
        assert!(!f.matches(&ev(Kind::Request, "x", None)));
        let err = Filter::new(&[], &["loaded".into()], &[], &[]).unwrap_err();
        assert!(err.to_string().contains("load_attempt"));
    }

    #[test]
    fn container_by_prefix_name_or_host() {
        let id = "a".repeat(64);
        let f = Filter::new(&[], &[], &["aaaa".into()], &[]).unwrap();
        assert!(f.matches(&ev(Kind::Load, "x", Some(&id))));
        assert!(!f.matches(&ev(Kind::Load, "x", None)));
        let h = Filter::new(&[], &[], &["host".into()], &[]).unwrap();
        assert!(h.matches(&ev(Kind::Load, "x", None)));
        let n = Filter::new(&[], &[], &["WEB".into()], &[]).unwrap();
        assert!(n.matches(&ev(Kind::Load, "x", Some(&id))));
        // A hook's load: the host's process, on behalf of the container.
        let mut hook = ev(Kind::Load, "x", None);
        hook.on_behalf_of =
            ev(Kind::Load, "x", Some(&id))
                .container
                .map(|container| crate::event::OnBehalfOf {
                    container,
                    ..Default::default()
                });
        assert!(f.matches(&hook) && n.matches(&hook));
        assert!(!h.matches(&hook), "not the host's own");
    }

    #[test]
    fn pid_filter() {
        let f = Filter::new(&[], &[], &[], &[11]).unwrap();
        assert!(!f.matches(&ev(Kind::Load, "x", None)));
        let f = Filter::new(&[], &[], &[], &[10]).unwrap();
        assert!(f.matches(&ev(Kind::Load, "x", None)));
    }

    #[test]
    fn verdicts_and_time_window() {
        let mut e = ev(Kind::Load, "x", None);
        e.verdict = Some(Verdict::Unexpected);
        e.time = "2026-11-22T13:25:55.123456789Z".into();
        let f = Filter::default().verdicts(vec![Some(Verdict::Unexpected)]);
        assert!(f.matches(&e));
        let f = Filter::default().verdicts(vec![None]);
        assert!(!f.matches(&e));
        let t = parse_event_time("2026-11-22T13:25:55Z").unwrap();
        assert!(Filter::default().window(Some(t), None).matches(&e));
        assert!(!Filter::default().window(None, Some(t)).matches(&e));
        e.time = "not a time".into();
        assert!(!Filter::default().window(Some(t), None).matches(&e));
    }

    #[test]
    fn bad_module_name_is_rejected() {
        assert!(Filter::new(&["a/b".into()], &[], &[], &[]).is_err());
    }
}
