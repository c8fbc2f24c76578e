//! Node labels in the style of the Kernel Module Management operator: `kmodmon.io/module.NAME`
//! on the node for every module a running container on it declares and the kernel has
//! (`loaded`, or `builtin`). Schedulers and people can then select nodes by module
//! (`nodeSelector`, `kubectl get nodes -l kmodmon.io/module.ip_vs`).
//!
//! Opt-in (`[node_labels] enabled = true`), and only where the DaemonSet's service account may
//! get and patch nodes. The [`NodeLabeler`] learns the node's kmodmon labels once (GET), then
//! sends one JSON merge patch when the set changes — at most one per `min_interval`, failures
//! logged, counted and retried with a growing delay — on a task of its own: the event pipeline
//! never waits for the API server.
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{ApiClient, KubeError};
use crate::host::moddb::LiveState;

/// Every label kmodmon manages starts with this.
pub const PREFIX: &str = "kmodmon.io/module.";
/// The longest label name (the part after `kmodmon.io/`).
const NAME_MAX: usize = 63;
/// Longest delay between retries after failures.
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The label key for a module, when its name can be a label name (63 characters at most,
/// alphanumerics, `-`, `_`, `.`, alphanumeric at both ends): `kmodmon.io/module.ip_vs`.
pub fn label_key(module: &str) -> Option<String> {
    let name = format!("module.{module}");
    let ok = name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    ok.then(|| format!("kmodmon.io/{name}"))
}

/// The labels the node should carry: each declared module the kernel has, `loaded` or
/// `builtin`. Modules whose names cannot be label names are returned apart (to log).
pub fn desired<'a>(
    declared: impl IntoIterator<Item = &'a String>,
    live: &LiveState,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut labels = BTreeMap::new();
    let mut unlabelable = Vec::new();
    for m in declared.into_iter().collect::<BTreeSet<_>>() {
        let value = if live.is_builtin(m) {
            "builtin"
        } else if live.is_loaded(m) == Some(true) {
            "loaded"
        } else {
            continue;
        };
        match label_key(m) {
            Some(k) => {
                labels.insert(k, value.to_string());
            }
            None => unlabelable.push(m.clone()),
        }
    }
    (labels, unlabelable)
}

/// The merge patch from `current` (kmodmon's labels on the node) to `desired`: values to set,
/// and `None` (JSON null) for labels to remove. Empty when nothing changes.
pub fn changes(
    current: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for (k, v) in desired {
        if current.get(k) != Some(v) {
            out.insert(k.clone(), Some(v.clone()));
        }
    }
    for k in current.keys() {
        if !desired.contains_key(k) {
            out.insert(k.clone(), None);
        }
    }
    out
}

/// What one [`NodeLabeler::sync`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The node already carries exactly these labels.
    Unchanged,
    /// Labels were set and removed (how many of each).
    Patched { set: usize, removed: usize },
    /// A change is due but the last request was too recent, or a retry is not due yet.
    Deferred,
}

/// Keeps one node's kmodmon labels equal to a desired set.
pub struct NodeLabeler {
    client: ApiClient,
    node: String,
    min_interval: Duration,
    /// kmodmon's labels as the node carries them (None: unknown, GET first).
    known: Option<BTreeMap<String, String>>,
    last_request: Option<Instant>,
    failures: u32,
    retry_at: Option<Instant>,
}

impl NodeLabeler {
    pub fn new(client: ApiClient, node: String, min_interval: Duration) -> NodeLabeler {
        NodeLabeler {
            client,
            node,
            min_interval,
            known: None,
            last_request: None,
            failures: 0,
            retry_at: None,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// kmodmon's labels as last seen on or written to the node.
    pub fn known(&self) -> Option<&BTreeMap<String, String>> {
        self.known.as_ref()
    }

    /// Brings the node's labels to `desired` (or defers, see [`Outcome`]). An error leaves
    /// the labels unknown (read again on the next try) and delays the next try.
    pub async fn sync(
        &mut self,
        desired: &BTreeMap<String, String>,
        now: Instant,
    ) -> Result<Outcome, KubeError> {
        if self.retry_at.is_some_and(|t| now < t) {
            return Ok(Outcome::Deferred);
        }
        let result = self.sync_now(desired, now).await;
        match &result {
            Err(_) => {
                self.known = None;
                self.failures += 1;
                let delay = self
                    .min_interval
                    .max(Duration::from_secs(1))
                    .saturating_mul(1 << self.failures.min(10))
                    .min(BACKOFF_MAX);
                self.retry_at = Some(now + delay);
            }
            Ok(Outcome::Deferred) => {}
            Ok(_) => {
                self.failures = 0;
                self.retry_at = None;
            }
        }
        result
    }

    async fn sync_now(
        &mut self,
        desired: &BTreeMap<String, String>,
        now: Instant,
    ) -> Result<Outcome, KubeError> {
        if self.known.is_none() {
            let labels = self.client.node_labels(&self.node).await?;
            self.known = Some(
                labels
                    .into_iter()
                    .filter(|(k, _)| k.starts_with(PREFIX))
                    .collect(),
            );
        }
        let current = self.known.as_ref().cloned().unwrap_or_default();
        let patch = changes(&current, desired);
        if patch.is_empty() {
            return Ok(Outcome::Unchanged);
        }
        if self
            .last_request
            .is_some_and(|t| now.duration_since(t) < self.min_interval)
        {
            return Ok(Outcome::Deferred);
        }
        self.last_request = Some(now);
        self.client.patch_node_labels(&self.node, &patch).await?;
        self.known = Some(desired.clone());
        let set = patch.values().filter(|v| v.is_some()).count();
        Ok(Outcome::Patched {
            set,
            removed: patch.len() - set,
        })
    }
}
