use std::collections::BTreeMap;

use super::*;
use crate::event::Container;

const GOOD: &str = r#"mode = "enforce"

[host]
restrict = false

[unselected]
allow = ["overlay"]

[[rule]]
name = "lb"
container_name = "lb-*"
allow = ["ip-vs"]
trust_kernel_modules = true

[[rule]]
name = "kube"
k8s_namespace = "kube-system"
pod_labels = { app = "cni" }
allow = ["vxlan"]

[[rule]]
name = "free"
runtime = "podman"
restrict = false
"#;

fn container(name: Option<&str>, runtime: &str) -> Container {
    Container {
        id: "a".repeat(64),
        runtime: runtime.to_string(),
        name: name.map(str::to_string),
        ..Container::default()
    }
}

fn problems(text: &str) -> Vec<(usize, usize, String)> {
    match Policy::parse(text, "p.toml") {
        Ok(_) => panic!("policy unexpectedly valid:\n{text}"),
        Err(e) => e
            .problems
            .into_iter()
            .map(|p| (p.line, p.column, p.message))
            .collect(),
    }
}

#[test]
fn good_policy_parses() {
    let p = Policy::parse(GOOD, "p.toml").unwrap();
    assert_eq!(p.mode, Mode::Enforce);
    assert!(!p.host.restrict);
    assert!(p.unselected.restrict);
    assert_eq!(p.rules.len(), 3);
    assert_eq!(p.rules[0].line, 9);
    assert!(
        p.rules[0].allowance.allow.contains("ip_vs"),
        "names are normalized"
    );
    assert!(!p.rules[2].allowance.restrict);
}

#[test]
fn unknown_key_is_located() {
    let text =
        "mode = \"audit\"\n\n[[rule]]\nname = \"x\"\nruntime = \"runc\"\nallowed = [\"a\"]\n";
    let p = problems(text);
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].0, p[0].1), (6, 1));
    assert!(p[0].2.contains("allowed"), "{}", p[0].2);
}

#[test]
fn bad_mode_and_bad_module_are_located() {
    let text = "mode = \"deny\"\n[unselected]\nallow = [\"ok\", \"bad/name\"]\n";
    let p = problems(text);
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!((p[0].0, p[0].1), (1, 8));
    assert!(p[0].2.contains("audit"));
    assert_eq!((p[1].0, p[1].1), (3, 16));
    assert!(p[1].2.contains("bad/name"));
}

#[test]
fn conflicting_rules_are_reported() {
    let text = r#"mode = "audit"
[[rule]]
name = "a"
runtime = "docker"
allow = ["x"]
[[rule]]
name = "b"
runtime = "docker"
allow = ["y"]
[[rule]]
name = "a"
container_id = "abc"
[[rule]]
name = "all"
allow = ["z"]
"#;
    let p = problems(text);
    assert_eq!(p.len(), 3, "{p:?}");
    assert_eq!(p[0].0, 6);
    assert!(p[0].2.contains("could never apply"), "{}", p[0].2);
    assert_eq!((p[1].0, p[1].1), (11, 8));
    assert!(p[1].2.contains("already used"));
    assert_eq!(p[2].0, 13);
    assert!(p[2].2.contains("selects every container"));
}

#[test]
fn allow_without_restrict_is_an_error() {
    let text = "mode = \"audit\"\n[host]\nallow = [\"x\"]\n";
    let p = problems(text);
    assert_eq!((p[0].0, p[0].1), (3, 10));
    assert!(p[0].2.contains("restrict"));
}

#[test]
fn syntax_error_has_line_and_column() {
    let p = problems("mode = \"audit\"\n[[rule]\n");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0, 2);
}

#[test]
fn first_matching_rule_decides_and_trust_adds_declaration() {
    let p = Policy::parse(GOOD, "p.toml").unwrap();
    let labels = BTreeMap::new();
    let declared = vec!["ip_vs_wrr".to_string(), "ip_vs".to_string()];
    let c = container(Some("lb-1"), "docker");
    let e = p.decide(&Subject {
        container: &c,
        labels: &labels,
        declared: &declared,
    });
    assert_eq!(e.rule, RuleRef::Rule(0));
    assert!(e.restrict);
    assert_eq!(
        e.allowed.iter().map(String::as_str).collect::<Vec<_>>(),
        ["ip_vs", "ip_vs_wrr"]
    );
    assert_eq!(
        e.from_declaration
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["ip_vs_wrr"]
    );

    // Not trusted: the declaration is ignored.
    let other = container(Some("web"), "docker");
    let e = p.decide(&Subject {
        container: &other,
        labels: &labels,
        declared: &declared,
    });
    assert_eq!(e.rule, RuleRef::Unselected);
    assert_eq!(e.allowed.len(), 1);
    assert!(e.allowed.contains("overlay"));
}

#[test]
fn namespace_and_labels_must_all_match() {
    let p = Policy::parse(GOOD, "p.toml").unwrap();
    let mut c = container(None, "containerd");
    c.pod_namespace = Some("kube-system".into());
    let mut labels = BTreeMap::new();
    let select = |labels: &BTreeMap<String, String>| {
        p.select(&Subject {
            container: &c,
            labels,
            declared: &[],
        })
    };
    assert_eq!(select(&labels), RuleRef::Unselected);
    labels.insert("app".to_string(), "cni".to_string());
    assert_eq!(select(&labels), RuleRef::Rule(1));
}

#[test]
fn unrestricted_rule_allows_everything() {
    let p = Policy::parse(GOOD, "p.toml").unwrap();
    let c = container(Some("x"), "podman");
    let e = p.decide(&Subject {
        container: &c,
        labels: &BTreeMap::new(),
        declared: &[],
    });
    assert_eq!(e.rule, RuleRef::Rule(2));
    assert!(!e.restrict);
    assert!(p.host_decision().allowed.is_empty());
    assert_eq!(Policy::rule_id(e.rule), 4);
    assert!(p.describe_rule(4).contains("free"));
}

#[test]
fn line_col_counts_characters() {
    assert_eq!(line_col("ab\ncé d", 7), (2, 4));
    assert_eq!(line_col("x", 99), (1, 2));
}

/// A container inside another never gets more than the enclosing one.
#[test]
fn capping_keeps_what_both_allow() {
    use crate::policy::{Effective, RuleRef};
    let e = |restrict: bool, names: &[&str]| Effective {
        rule: RuleRef::Unselected,
        restrict,
        allowed: names.iter().map(|s| s.to_string()).collect(),
        from_declaration: Default::default(),
        pins: Default::default(),
        signed: false,
    };
    let capped = e(true, &["a", "b"]).capped_by(&e(true, &["b", "c"]));
    assert!(capped.restrict);
    assert_eq!(capped.allowed.iter().collect::<Vec<_>>(), ["b"]);
    let capped = e(false, &[]).capped_by(&e(true, &["c"]));
    assert!(
        capped.restrict,
        "an unrestricted container inside a restricted one is restricted"
    );
    assert_eq!(capped.allowed.iter().collect::<Vec<_>>(), ["c"]);
    let capped = e(true, &["a"]).capped_by(&e(false, &[]));
    assert_eq!(
        capped,
        e(true, &["a"]),
        "an unrestricted container caps nothing"
    );
    assert_eq!(
        capped.rule,
        RuleRef::Unselected,
        "the rule stays the container's own"
    );
    // Identity requirements of the enclosing container hold inside it.
    let mut outer = e(false, &[]);
    outer.signed = true;
    outer.pins = ["aa".repeat(32), "bb".repeat(32)].into_iter().collect();
    let mut inner = e(true, &["a"]);
    inner.pins = ["bb".repeat(32), "cc".repeat(32)].into_iter().collect();
    let capped = inner.capped_by(&outer);
    assert!(capped.signed, "the enclosing container asks for signatures");
    assert_eq!(capped.pins.iter().collect::<Vec<_>>(), [&"bb".repeat(32)]);
    let capped = e(true, &["a"]).capped_by(&outer);
    assert_eq!(
        capped.pins, outer.pins,
        "no pins of its own: the enclosing ones"
    );
}

/// `container_parents`: absolute paths of plain components; errors located.
#[test]
fn container_parents_are_validated() {
    let p = Policy::parse(
        "mode = \"enforce\"\ncontainer_parents = [\"/ci/runners\", \"/top/\"]\n",
        "p",
    )
    .unwrap();
    assert_eq!(p.container_parents, ["/ci/runners", "/top"]);
    for (bad, why) in [
        ("ci", "absolute"),
        ("/a/../b", "`..`"),
        ("/a//b", "empty"),
        ("/", "absolute"),
        ("/x/0123456789012345678901234567890123", "shorter than 32"),
    ] {
        let text = format!("mode = \"enforce\"\ncontainer_parents = [{bad:?}]\n");
        let err = Policy::parse(&text, "p").unwrap_err().to_string();
        assert!(err.contains("p:2:22: container_parents"), "{bad}: {err}");
        assert!(err.contains(why), "{bad}: {err}");
    }
    let err = Policy::parse(
        "mode = \"enforce\"\ncontainer_parents = [\"/a\", \"/a/\"]\n",
        "p",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("listed twice"), "{err}");
}

#[test]
fn sha256_pins_and_signed_are_identity_requirements() {
    let pin = "ab".repeat(32);
    let text = format!(
        "mode = \"enforce\"\n[host]\nsigned = true\n[[rule]]\nname = \"lb\"\ncontainer_name = \"lb\"\nallow = [\"ip_vs\", \"sha256:{}\"]\n",
        pin.to_uppercase()
    );
    let p = Policy::parse(&text, "p.toml").unwrap();
    let a = &p.rules[0].allowance;
    assert_eq!(
        a.allow.iter().collect::<Vec<_>>(),
        ["ip_vs"],
        "pins are not names"
    );
    assert!(a.pins.contains(&pin), "pins are kept in lower case");
    assert!(p.host.signed && !a.signed);

    let e = Policy::parse(
        "mode = \"enforce\"\n[[rule]]\nname = \"x\"\nruntime = \"runc\"\nallow = [\"sha256:12\"]\n",
        "p.toml",
    )
    .unwrap_err();
    assert!(e.to_string().contains("64 hex digits"), "{e}");
    let e = Policy::parse(
        &format!(
            "mode = \"enforce\"\n[[rule]]\nname = \"x\"\nruntime = \"runc\"\nallow = [\"sha256:{pin}\"]\n"
        ),
        "p.toml",
    )
    .unwrap_err();
    assert!(e.to_string().contains("need the modules' names"), "{e}");
}

#[test]
fn identity_mismatch_names_what_the_policy_does_not_allow() {
    use crate::enforce::identity_mismatch;
    use crate::event::{Clock, Event, Kind, Syscall};
    use crate::identity::Identity;
    let pin = "ab".repeat(32);
    let p = Policy::parse(
        &format!(
            "mode = \"enforce\"\n[unselected]\nallow = [\"ip_vs\", \"sha256:{pin}\"]\nsigned = true\n"
        ),
        "p.toml",
    )
    .unwrap();
    let c = container(Some("x"), "docker");
    let labels = BTreeMap::new();
    let eff = p.decide(&Subject {
        container: &c,
        labels: &labels,
        declared: &[],
    });
    let mut ev = Event::synthetic(Kind::LoadAttempt, &Clock::new());
    ev.syscall = Some(Syscall::FinitModule);
    ev.result = Some(0);
    ev.identity = Some(Box::new(Identity {
        sha256: Some(pin.clone()),
        sig_ok: Some(true),
        ..Identity::default()
    }));
    assert!(
        identity_mismatch(&p, &eff, &ev).is_none(),
        "pinned and signed"
    );
    ev.identity = Some(Box::new(Identity {
        sha256: Some("cd".repeat(32)),
        sig_ok: Some(false),
        ..Identity::default()
    }));
    let m = identity_mismatch(&p, &eff, &ev).expect("a mismatch");
    assert_eq!(m.kind, Kind::IdentityMismatch);
    assert_eq!(m.severity.as_deref(), Some("high"));
    let d = m.detail.unwrap();
    assert!(
        d.contains("is not pinned") && d.contains("sig_ok false"),
        "{d}"
    );
    assert!(m.identity.is_some(), "the decision carries the identity");
    ev.result = Some(-1);
    assert!(identity_mismatch(&p, &eff, &ev).is_none(), "only loads");
}
