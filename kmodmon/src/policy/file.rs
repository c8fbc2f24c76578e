//! The policy file as written (TOML), with the byte spans of every value so errors can point
//! at a line and column. Validation turns this into [`super::Policy`].
use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub mode: Spanned<String>,
    /// cgroups (paths in the cgroup2 tree) whose children are containers, besides the
    /// built-in ones.
    #[serde(default)]
    pub container_parents: Vec<Spanned<String>>,
    #[serde(default)]
    pub host: Option<Spanned<HostSection>>,
    #[serde(default)]
    pub unselected: Option<Spanned<RuleBody>>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<Spanned<RuleSection>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// false (default): host processes load anything.
    #[serde(default)]
    pub restrict: Option<Spanned<bool>>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub signed: Option<Spanned<bool>>,
}

/// What a rule (or `[unselected]`) allows.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleBody {
    /// true (default): only `allow` (and, if trusted, KERNEL_MODULES) may load.
    #[serde(default)]
    pub restrict: Option<Spanned<bool>>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub trust_kernel_modules: Option<Spanned<bool>>,
    #[serde(default)]
    pub signed: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    pub name: Spanned<String>,
    #[serde(default)]
    pub runtime: Option<Spanned<String>>,
    /// Full container ID or a prefix of it.
    #[serde(default)]
    pub container_id: Option<Spanned<String>>,
    /// Glob on the container name (`*`, `?`, `[...]`).
    #[serde(default)]
    pub container_name: Option<Spanned<String>>,
    #[serde(default)]
    pub k8s_namespace: Option<Spanned<String>>,
    /// Labels / annotations the runtime recorded; all must be equal.
    #[serde(default)]
    pub pod_labels: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    pub restrict: Option<Spanned<bool>>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub trust_kernel_modules: Option<Spanned<bool>>,
    #[serde(default)]
    pub signed: Option<Spanned<bool>>,
}
