//! Validating the file into a [`Policy`], and deciding what applies to one container.
use std::collections::{BTreeMap, BTreeSet};

use toml::Spanned;

use super::{
    Allowance, Mode, Policy, Problem, Rule, Selector,
    file::{File, HostSection, RuleBody, RuleSection},
    line_col,
};
use crate::{event::Container, modname};

/// Most `container_parents` a policy may name (the kernel's map holds 64 with the built-in ones).
pub const MAX_CONTAINER_PARENTS: usize = 32;
use kmodmon_common::policy::PARENT_NAME_LEN;

/// Which part of the policy decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleRef {
    Host,
    Unselected,
    /// Index into [`Policy::rules`].
    Rule(usize),
}

/// A container as the policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub container: &'a Container,
    /// Labels / annotations the runtime recorded (empty when unknown).
    pub labels: &'a BTreeMap<String, String>,
    /// The container's KERNEL_MODULES (valid names), used only where the rule trusts it.
    pub declared: &'a [String],
}

/// The decision for one cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effective {
    pub rule: RuleRef,
    /// false: anything may load.
    pub restrict: bool,
    /// Normalized names that may load (when restricted).
    pub allowed: BTreeSet<String>,
    /// Names that came from the container's own KERNEL_MODULES (a subset of `allowed`).
    pub from_declaration: BTreeSet<String>,
    /// Images every load must be one of (empty: any); verified after the load.
    pub pins: BTreeSet<String>,
    /// Every load must carry a signature the kernel verified; verified after the load.
    pub signed: bool,
}

impl Policy {
    /// The rule that selects this container (first match in file order).
    pub fn select(&self, s: &Subject<'_>) -> RuleRef {
        self.rules
            .iter()
            .position(|r| r.selector.matches(s))
            .map_or(RuleRef::Unselected, RuleRef::Rule)
    }

    /// What applies to this container.
    pub fn decide(&self, s: &Subject<'_>) -> Effective {
        let rule = self.select(s);
        let a = match rule {
            RuleRef::Rule(i) => &self.rules[i].allowance,
            _ => &self.unselected,
        };
        effective(rule, a, s.declared)
    }

    /// What applies to this container leaving out its own KERNEL_MODULES: what it falls back
    /// to when its declaration does not fit in the kernel's maps.
    pub fn decide_without_declaration(&self, s: &Subject<'_>) -> Effective {
        self.decide(&Subject {
            declared: &[],
            ..*s
        })
    }

    /// What applies to host processes (and any cgroup no container owns).
    pub fn host_decision(&self) -> Effective {
        effective(RuleRef::Host, &self.host, &[])
    }

    /// What applies to containers no rule selects, and to containers kmodmon has not mapped
    /// (yet): `[unselected]` without any declaration.
    pub fn unselected_decision(&self) -> Effective {
        effective(RuleRef::Unselected, &self.unselected, &[])
    }

    /// The policy's own allow-lists (host, `[unselected]`, each rule), without what
    /// containers declare: what must fit in the kernel's maps whatever runs.
    pub fn own_lists(&self) -> Vec<Effective> {
        let mut out = vec![self.host_decision(), self.unselected_decision()];
        for (i, r) in self.rules.iter().enumerate() {
            out.push(effective(RuleRef::Rule(i), &r.allowance, &[]));
        }
        out
    }
}

impl Effective {
    /// At most what both allow: restricted if either is, the allowed names both allow.
    pub fn capped_by(mut self, cap: &Effective) -> Effective {
        // The enclosing container's identity requirements hold inside it too.
        self.signed |= cap.signed;
        if !cap.pins.is_empty() {
            if self.pins.is_empty() {
                self.pins = cap.pins.clone();
            } else {
                self.pins.retain(|h| cap.pins.contains(h));
            }
        }
        if !cap.restrict {
            return self;
        }
        if self.restrict {
            self.allowed.retain(|n| cap.allowed.contains(n));
            self.from_declaration.retain(|n| self.allowed.contains(n));
        } else {
            self.restrict = true;
            self.allowed = cap.allowed.clone();
            self.from_declaration.clear();
        }
        self
    }
}

fn effective(rule: RuleRef, a: &Allowance, declared: &[String]) -> Effective {
    let mut allowed = a.allow.clone();
    let mut from_declaration = BTreeSet::new();
    if a.restrict && a.trust_kernel_modules {
        for m in declared {
            if let Ok(n) = modname::validate(m)
                && allowed.insert(n.clone())
            {
                from_declaration.insert(n);
            }
        }
    }
    Effective {
        rule,
        restrict: a.restrict,
        allowed: if a.restrict { allowed } else { BTreeSet::new() },
        from_declaration,
        pins: a.pins.clone(),
        signed: a.signed,
    }
}

impl Selector {
    pub fn matches(&self, s: &Subject<'_>) -> bool {
        let c = s.container;
        self.runtime
            .as_ref()
            .is_none_or(|r| r.eq_ignore_ascii_case(&c.runtime))
            && self
                .container_id
                .as_ref()
                .is_none_or(|id| c.id.starts_with(id.as_str()))
            && self
                .container_name
                .as_ref()
                .is_none_or(|p| c.name.as_deref().is_some_and(|n| p.matches(n)))
            && self
                .k8s_namespace
                .as_ref()
                .is_none_or(|ns| c.pod_namespace.as_deref() == Some(ns.as_str()))
            && self
                .pod_labels
                .iter()
                .all(|(k, v)| s.labels.get(k) == Some(v))
    }
}

/// Collects every problem of a file while building the policy.
pub(super) struct Validator<'t> {
    text: &'t str,
    pub problems: Vec<Problem>,
}

impl<'t> Validator<'t> {
    pub fn new(text: &'t str) -> Self {
        Validator {
            text,
            problems: Vec::new(),
        }
    }

    fn problem(&mut self, at: usize, message: String) {
        let (line, column) = line_col(self.text, at);
        self.problems.push(Problem {
            line,
            column,
            message,
        });
    }

    pub fn policy(&mut self, raw: File) -> Option<Policy> {
        let mode = Mode::parse(raw.mode.get_ref());
        if mode.is_none() {
            self.problem(
                raw.mode.span().start,
                format!(
                    "mode must be \"audit\" or \"enforce\", not {:?}",
                    raw.mode.get_ref()
                ),
            );
        }
        let host = match raw.host {
            Some(h) => self.host(h.into_inner()),
            None => Allowance::default(),
        };
        let unselected = match raw.unselected {
            Some(u) => self.body(u.into_inner(), true),
            None => Allowance {
                restrict: true,
                ..Allowance::default()
            },
        };
        let mut rules: Vec<Rule> = Vec::new();
        for r in raw.rules {
            let start = r.span().start;
            if let Some(rule) = self.rule(r.into_inner(), start, &rules) {
                rules.push(rule);
            }
        }
        let container_parents = self.parents(&raw.container_parents);
        Some(Policy {
            mode: mode?,
            container_parents,
            host,
            unselected,
            rules,
        })
    }

    /// `container_parents`: absolute cgroup paths of plain components, the last shorter than
    /// the kernel's name key.
    fn parents(&mut self, list: &[Spanned<String>]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if list.len() > MAX_CONTAINER_PARENTS {
            self.problem(
                list[MAX_CONTAINER_PARENTS].span().start,
                format!("container_parents: at most {MAX_CONTAINER_PARENTS} entries"),
            );
        }
        for p in list {
            let path = p.get_ref().trim_end_matches('/');
            let comps: Vec<&str> = path.split('/').skip(1).collect();
            let bad = if !path.starts_with('/') || comps.is_empty() {
                Some("must be an absolute cgroup path such as \"/ci-runners\"".to_string())
            } else if comps
                .iter()
                .any(|c| c.is_empty() || *c == "." || *c == ".." || c.chars().any(char::is_control))
            {
                Some("has an empty, `.`, `..` or control-character component".to_string())
            } else if comps.last().is_some_and(|c| c.len() >= PARENT_NAME_LEN) {
                Some(format!(
                    "its last component must be shorter than {PARENT_NAME_LEN} bytes (the kernel's                      key)"
                ))
            } else {
                None
            };
            match bad {
                Some(why) => self.problem(
                    p.span().start,
                    format!("container_parents: {:?} {why}", p.get_ref()),
                ),
                None if out.iter().any(|o| o == path) => self.problem(
                    p.span().start,
                    format!("container_parents: {path:?} is listed twice"),
                ),
                None => out.push(path.to_string()),
            }
        }
        out
    }

    fn flag(v: &Option<Spanned<bool>>, default: bool) -> bool {
        v.as_ref().map_or(default, |b| *b.get_ref())
    }

    /// Module names and `sha256:HEX` pins of an `allow` list.
    fn names(
        &mut self,
        list: &[Spanned<String>],
        restrict: bool,
        restrict_at: Option<usize>,
    ) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut out = BTreeSet::new();
        let mut pins = BTreeSet::new();
        let mut first_name = None;
        for n in list {
            if let Some(hex) = n.get_ref().strip_prefix("sha256:") {
                if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    pins.insert(hex.to_ascii_lowercase());
                } else {
                    self.problem(
                        n.span().start,
                        "allow: a sha256 pin is \"sha256:\" and 64 hex digits (sha256sum of the \
                         module image, decompressed)"
                            .to_string(),
                    );
                }
                continue;
            }
            first_name.get_or_insert(n.span().start);
            match modname::validate(n.get_ref()) {
                Ok(v) => {
                    out.insert(v);
                }
                Err(e) => self.problem(n.span().start, format!("allow: {e}")),
            }
        }
        if !restrict && let Some(first) = first_name {
            let why = match restrict_at {
                Some(at) => format!("line {}", line_col(self.text, at).0),
                None => "the default".to_string(),
            };
            self.problem(
                first,
                format!(
                    "allow has no effect with restrict = false ({why}): either list modules and \
                     set restrict = true, or drop the list"
                ),
            );
        }
        if restrict
            && out.is_empty()
            && let Some(p) = list.first()
            && !pins.is_empty()
        {
            self.problem(
                p.span().start,
                "sha256 pins need the modules' names in allow too: the kernel decides by name \
                 before it has read (and kmodmon hashed) the image; pins are checked right after \
                 the load"
                    .to_string(),
            );
        }
        (out, pins)
    }

    fn host(&mut self, h: HostSection) -> Allowance {
        let restrict = Self::flag(&h.restrict, false);
        let at = h.restrict.as_ref().map(|r| r.span().start);
        let (allow, pins) = self.names(&h.allow, restrict, at);
        Allowance {
            restrict,
            allow,
            trust_kernel_modules: false,
            pins,
            signed: Self::flag(&h.signed, false),
        }
    }

    fn body(&mut self, b: RuleBody, default_restrict: bool) -> Allowance {
        let restrict = Self::flag(&b.restrict, default_restrict);
        let at = b.restrict.as_ref().map(|r| r.span().start);
        let trust = Self::flag(&b.trust_kernel_modules, false);
        if !restrict
            && trust
            && let Some(t) = &b.trust_kernel_modules
        {
            self.problem(
                t.span().start,
                "trust_kernel_modules has no effect with restrict = false".to_string(),
            );
        }
        let (allow, pins) = self.names(&b.allow, restrict, at);
        Allowance {
            restrict,
            allow,
            trust_kernel_modules: trust,
            pins,
            signed: Self::flag(&b.signed, false),
        }
    }

    fn rule(&mut self, r: RuleSection, start: usize, earlier: &[Rule]) -> Option<Rule> {
        let line = line_col(self.text, start).0;
        let name = r.name.get_ref().trim().to_string();
        if name.is_empty() {
            self.problem(r.name.span().start, "rule name is empty".to_string());
        } else if let Some(prev) = earlier.iter().find(|p| p.name == name) {
            self.problem(
                r.name.span().start,
                format!(
                    "rule name {name:?} is already used by the rule at line {}",
                    prev.line
                ),
            );
        }
        let mut ok = true;
        let mut text_field = |v: &Option<Spanned<String>>, what: &str| -> Option<String> {
            let v = v.as_ref()?;
            let s = v.get_ref().trim();
            if s.is_empty() || s.chars().any(char::is_whitespace) {
                self.problem(
                    v.span().start,
                    format!("{what} must be a non-empty word, not {:?}", v.get_ref()),
                );
                ok = false;
                return None;
            }
            Some(s.to_string())
        };
        let runtime = text_field(&r.runtime, "runtime");
        let container_id = text_field(&r.container_id, "container_id");
        let k8s_namespace = text_field(&r.k8s_namespace, "k8s_namespace");
        let name_glob = text_field(&r.container_name, "container_name");
        let container_name = match (name_glob, &r.container_name) {
            (Some(g), Some(at)) => match glob::Pattern::new(&g) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.problem(at.span().start, format!("container_name: bad pattern: {e}"));
                    ok = false;
                    None
                }
            },
            _ => None,
        };
        let selector = Selector {
            runtime,
            container_id,
            container_name,
            k8s_namespace,
            pod_labels: r.pod_labels.map(Spanned::into_inner).unwrap_or_default(),
        };
        let allowance = self.body(
            RuleBody {
                restrict: r.restrict,
                allow: r.allow,
                trust_kernel_modules: r.trust_kernel_modules,
                signed: r.signed,
            },
            true,
        );
        if ok && selector.is_empty() {
            self.problem(
                start,
                format!(
                    "rule {name:?} selects every container (no runtime, container_id, \
                     container_name, k8s_namespace or pod_labels); use [unselected] for that"
                ),
            );
        } else if ok && let Some(prev) = earlier.iter().find(|p| p.selector.same_as(&selector)) {
            self.problem(
                start,
                format!(
                    "rule {name:?} selects exactly what rule {:?} (line {}) selects; the first \
                     matching rule wins, so this one could never apply",
                    prev.name, prev.line
                ),
            );
        }
        Some(Rule {
            name,
            line,
            selector,
            allowance,
        })
    }
}
