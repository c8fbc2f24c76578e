//! The verdict on one event, from the judging container's declaration (see
//! [`crate::host::declaration::judge`]). The reason goes into `detail` only when it says something the
//! verdict does not: why it is unexpected, which declared module it is a dependency of, that
//! the declaration could not be read.
use super::autoload::ModuleResolver;
use crate::event::{Event, Kind};
use crate::host::declaration::{self, ENV_VAR, Expected, Verdict};
use crate::host::tracking::DeclState;
use crate::modname;

/// Appends to an event's detail.
pub fn add_detail(ev: &mut Event, text: &str) {
    ev.detail = Some(match ev.detail.take() {
        Some(d) if !d.is_empty() => format!("{d}; {text}"),
        _ => text.to_string(),
    });
}

/// Sets `verdict` (and maybe `detail`). `state`: `None` for the host, `Some(None)` for a
/// container kmodmon has no record of, else the container's declaration state.
pub fn judge_event(
    ev: &mut Event,
    state: Option<Option<&DeclState>>,
    resolver: &dyn ModuleResolver,
) {
    if matches!(ev.kind, Kind::Expectation | Kind::SelfLoad) {
        return;
    }
    let Some(state) = state else {
        ev.verdict = Some(Verdict::Host);
        return;
    };
    let empty = Expected::default();
    let what = match state {
        Some(DeclState::Known(d)) => d.what(),
        _ => ENV_VAR.to_string(),
    };
    let (expected, note) = match state {
        Some(DeclState::Known(d)) => (&d.expected, None),
        Some(DeclState::Failed(why)) => (&empty, Some(format!("{ENV_VAR} unknown: {why}"))),
        Some(DeclState::Pending { last_error, .. }) => (
            &empty,
            Some(format!(
                "{ENV_VAR} not read yet{}",
                last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )),
        ),
        None => (
            &empty,
            Some(format!("no record of this container's {ENV_VAR}")),
        ),
    };
    let Some(module) = ev.module.clone() else {
        // A module whose name the kernel did not give (init_module of an image): cannot judge.
        if let Some(n) = note {
            add_detail(ev, &n);
        }
        return;
    };
    let deps = |m: &str| resolver.dependencies(m);
    let mut j = declaration::judge_as(&module, Some(expected), &deps, &what);
    if ev.kind == Kind::Request && j.verdict == Verdict::Unexpected {
        // A request names an alias (`net-pf-10`, `fs-xfs`): judge what it resolves to.
        let targets = resolver.resolve_request(&module);
        for t in targets.iter().filter(|t| !modname::same(t, &module)) {
            let jt = declaration::judge_as(t, Some(expected), &deps, &what);
            if jt.verdict == Verdict::Expected {
                j = declaration::Judgement {
                    verdict: jt.verdict,
                    reason: format!("resolves to {t}, {}", jt.reason),
                };
                break;
            }
        }
    }
    ev.verdict = Some(j.verdict);
    let useful = j.verdict == Verdict::Unexpected || !j.reason.starts_with("declared in");
    if useful && note.is_none() {
        add_detail(ev, &j.reason);
    }
    if let Some(n) = note {
        add_detail(ev, &n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Clock;
    use crate::host::declaration::{Declaration, Source};

    struct R;
    impl ModuleResolver for R {
        fn resolve_request(&self, request: &str) -> Vec<String> {
            match request {
                "net-pf-10" => vec!["ipv6".into()],
                _ => Vec::new(),
            }
        }
        fn dependencies(&self, module: &str) -> Vec<String> {
            match module {
                "ip_vs_wrr" => vec!["ip_vs".into(), "nf_conntrack".into()],
                _ => Vec::new(),
            }
        }
    }

    fn ev(kind: Kind, module: Option<&str>) -> Event {
        let mut e = Event::synthetic(kind, &Clock::new());
        e.module = module.map(str::to_string);
        e
    }

    fn known(v: &[u8]) -> DeclState {
        DeclState::Known(Declaration {
            declared: true,
            expected: Expected::parse(v),
            source: Source::Environ(1),
            overridden: Vec::new(),
        })
    }

    #[test]
    fn verdicts_and_tidy_details() {
        let s = known(b"ip_vs_wrr,ipv6");
        let mut e = ev(Kind::LoadAttempt, Some("ip_vs_wrr"));
        judge_event(&mut e, Some(Some(&s)), &R);
        assert_eq!(e.verdict, Some(Verdict::Expected));
        assert_eq!(e.detail, None, "declared: nothing to add");
        let mut e = ev(Kind::Load, Some("nf_conntrack"));
        judge_event(&mut e, Some(Some(&s)), &R);
        assert_eq!(e.verdict, Some(Verdict::Expected));
        assert_eq!(
            e.detail.as_deref(),
            Some("dependency of ip_vs_wrr, declared in KERNEL_MODULES")
        );
        let mut e = ev(Kind::LoadAttempt, Some("other"));
        judge_event(&mut e, Some(Some(&s)), &R);
        assert_eq!(e.verdict, Some(Verdict::Unexpected));
        assert!(
            e.detail
                .unwrap()
                .contains("not in KERNEL_MODULES=ip_vs_wrr,ipv6")
        );
        let mut e = ev(Kind::Request, Some("net-pf-10"));
        judge_event(&mut e, Some(Some(&s)), &R);
        assert_eq!(e.verdict, Some(Verdict::Expected));
        assert!(e.detail.unwrap().contains("resolves to ipv6"));
        let mut e = ev(Kind::Load, Some("anything"));
        judge_event(&mut e, None, &R);
        assert_eq!(e.verdict, Some(Verdict::Host));
        assert_eq!(e.detail, None);
    }

    #[test]
    fn unknown_declarations_say_so() {
        let f = DeclState::Failed("no process".into());
        let mut e = ev(Kind::LoadAttempt, Some("ip_vs"));
        judge_event(&mut e, Some(Some(&f)), &R);
        assert_eq!(e.verdict, Some(Verdict::Unexpected));
        assert_eq!(
            e.detail.as_deref(),
            Some("KERNEL_MODULES unknown: no process")
        );
        let mut e = ev(Kind::LoadAttempt, None);
        judge_event(&mut e, Some(None), &R);
        assert_eq!(e.verdict, None, "no module name: no verdict");
        assert!(e.detail.unwrap().contains("no record"));
        let mut e = ev(Kind::Expectation, Some("x"));
        judge_event(&mut e, None, &R);
        assert_eq!(e.verdict, None, "kmodmon's own events are not judged");
    }
}
