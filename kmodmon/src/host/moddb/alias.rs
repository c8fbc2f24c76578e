//! Alias patterns (modules.alias, modules.builtin.alias, modprobe.d `alias`): fnmatch-style
//! wildcards (`*`, `?`, `[...]`) mapping a request such as `fs-overlay` or
//! `pci:v00008086d...` to module names, indexed so that a lookup only tests the patterns whose
//! literal prefix is a prefix of the request.
use std::collections::HashMap;

use glob::{MatchOptions, Pattern};

use crate::modname;

/// fnmatch(3) with no flags, as kmod uses it: `*` also matches `/` and leading dots.
const FNMATCH: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: false,
    require_literal_leading_dot: false,
};

/// kmod's alias normalisation: `-` becomes `_` except inside `[...]`. `None` when brackets are
/// unbalanced (kmod rejects such an alias).
pub fn normalize_alias(alias: &str) -> Option<String> {
    let mut out = String::with_capacity(alias.len());
    let mut in_brackets = false;
    for c in alias.chars() {
        match c {
            '[' if !in_brackets => in_brackets = true,
            ']' if in_brackets => in_brackets = false,
            ']' => return None,
            '-' if !in_brackets => {
                out.push('_');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    (!in_brackets).then_some(out)
}

/// Whether an alias pattern has wildcards.
fn is_wild(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Whether `pattern` matches `text` the way fnmatch(pattern, text, 0) would.
pub fn fnmatch(pattern: &str, text: &str) -> bool {
    match Pattern::new(pattern) {
        Ok(p) => p.matches_with(text, FNMATCH),
        // A pattern glob cannot compile (e.g. "a**b") is compared as plain text.
        Err(_) => pattern == text,
    }
}

/// An index of `alias PATTERN MODULE` lines.
#[derive(Debug, Default, Clone)]
pub struct AliasIndex {
    exact: HashMap<String, Vec<String>>,
    /// Literal prefix (text before the first wildcard) → indices into `patterns`.
    by_prefix: HashMap<String, Vec<usize>>,
    patterns: Vec<(String, String)>,
}

impl AliasIndex {
    /// Adds one alias; both sides are normalised. Invalid aliases are ignored, as kmod does.
    pub fn insert(&mut self, pattern: &str, module: &str) {
        let Some(pattern) = normalize_alias(pattern) else {
            return;
        };
        let module = modname::normalize(module);
        if is_wild(&pattern) {
            let cut = pattern.find(['*', '?', '[']).unwrap_or(pattern.len());
            let prefix = pattern[..cut].to_string();
            self.by_prefix
                .entry(prefix)
                .or_default()
                .push(self.patterns.len());
            self.patterns.push((pattern, module));
        } else {
            let mods = self.exact.entry(pattern).or_default();
            if !mods.contains(&module) {
                mods.push(module);
            }
        }
    }

    /// Parses modules.alias-style text: `alias PATTERN MODULE` per line, `#` comments.
    /// Returns the number of lines that were not understood.
    pub fn parse_into(&mut self, text: &str) -> usize {
        let mut bad = 0;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("alias"), Some(pattern), Some(module), None) => self.insert(pattern, module),
                _ => bad += 1,
            }
        }
        bad
    }

    pub fn len(&self) -> usize {
        self.exact.values().map(Vec::len).sum::<usize>() + self.patterns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.patterns.is_empty()
    }

    /// Modules whose alias matches `request` (normalised here), in the order they were added,
    /// exact aliases first, without duplicates.
    pub fn lookup(&self, request: &str) -> Vec<String> {
        let Some(request) = normalize_alias(request) else {
            return Vec::new();
        };
        let mut out: Vec<String> = self.exact.get(&request).cloned().unwrap_or_default();
        let mut hits: Vec<usize> = Vec::new();
        for (i, _) in request.char_indices().chain([(request.len(), ' ')]) {
            if let Some(ids) = self.by_prefix.get(&request[..i]) {
                hits.extend(
                    ids.iter()
                        .copied()
                        .filter(|&id| fnmatch(&self.patterns[id].0, &request)),
                );
            }
        }
        hits.sort_unstable();
        for id in hits {
            let module = &self.patterns[id].1;
            if !out.contains(module) {
                out.push(module.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_keeps_dashes_in_brackets() {
        assert_eq!(normalize_alias("net-pf-10").as_deref(), Some("net_pf_10"));
        assert_eq!(normalize_alias("a[-x]-b").as_deref(), Some("a[-x]_b"));
        assert_eq!(normalize_alias("a[x"), None);
        assert_eq!(normalize_alias("a]x"), None);
    }

    #[test]
    fn fnmatch_semantics() {
        assert!(fnmatch(
            "pci:v00008086d*sv*",
            "pci:v00008086d00001234sv0000"
        ));
        assert!(fnmatch("a*b", "a/x/b"), "* crosses / without FNM_PATHNAME");
        assert!(fnmatch("x?z", "xyz"));
        assert!(fnmatch("dev[0-9]", "dev7"));
        assert!(!fnmatch("dev[0-9]", "devx"));
        assert!(fnmatch("dev[!0-9]", "devx"));
        assert!(!fnmatch("fs_ext4", "fs_ext"));
    }

    #[test]
    fn lookup_uses_exact_and_wildcard_aliases() {
        let mut idx = AliasIndex::default();
        let bad = idx.parse_into(
            "# Aliases extracted from modules themselves.\n\
             alias fs-overlay overlay\n\
             alias net-pf-10 ipv6\n\
             alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\n\
             alias pci:v00008086d*sv*sd*bc02sc00i* e1000e\n\
             alias pci:v*d*sv*sd*bc02sc00i* some-generic-nic\n\
             alias usb:v*p*d*dc*dsc*dp*ic08isc06ip50in* usb_storage\n\
             garbage line here\n",
        );
        assert_eq!(bad, 1);
        assert_eq!(idx.len(), 6);
        assert_eq!(idx.lookup("fs-overlay"), vec!["overlay"]);
        assert_eq!(idx.lookup("fs_overlay"), vec!["overlay"]);
        assert_eq!(idx.lookup("net-pf-10"), vec!["ipv6"]);
        assert_eq!(
            idx.lookup("pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00"),
            vec!["e1000e", "some_generic_nic"]
        );
        assert_eq!(
            idx.lookup("pci:v000010ECd00008168sv0sd0bc02sc00i00"),
            vec!["some_generic_nic"]
        );
        assert!(
            idx.lookup("pci:v000010ECd00008168sv0sd0bc03sc00i00")
                .is_empty()
        );
        assert_eq!(
            idx.lookup("usb:v0781p5567d0100dc00dsc00dp00ic08isc06ip50in00"),
            vec!["usb_storage"]
        );
        assert!(idx.lookup("fs-nothing").is_empty());
        assert!(idx.lookup("bad]").is_empty());
    }
}
