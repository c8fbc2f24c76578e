//! The kernel command line (ROOT/proc/cmdline): words split on white space, double quotes
//! grouping, and `key=value` look-ups where `-` and `_` in keys are the same (as systemd's
//! proc_cmdline_key_streq treats them).
use crate::host::moddb::RootFs;

pub const PROC_CMDLINE: &str = "/proc/cmdline";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    words: Vec<String>,
}

impl KernelCmdline {
    /// Reads ROOT/proc/cmdline; `Ok(None)` when the root has none (an offline root).
    pub fn read(root: &RootFs) -> std::io::Result<Option<KernelCmdline>> {
        Ok(root
            .read_text(PROC_CMDLINE)?
            .map(|t| KernelCmdline::parse(&t)))
    }

    pub fn parse(text: &str) -> KernelCmdline {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        let mut in_word = false;
        for c in text.chars() {
            match c {
                '"' => {
                    quoted = !quoted;
                    in_word = true;
                }
                c if c.is_whitespace() && !quoted => {
                    if in_word {
                        words.push(std::mem::take(&mut cur));
                        in_word = false;
                    }
                }
                c => {
                    cur.push(c);
                    in_word = true;
                }
            }
        }
        if in_word {
            words.push(cur);
        }
        KernelCmdline { words }
    }

    pub fn words(&self) -> &[String] {
        &self.words
    }

    /// Values of every `key=value` word whose key equals `key` (`-` and `_` equivalent).
    pub fn values(&self, key: &str) -> Vec<&str> {
        self.words
            .iter()
            .filter_map(|w| w.split_once('='))
            .filter(|(k, _)| crate::modname::same(k, key))
            .map(|(_, v)| v)
            .collect()
    }

    /// Comma-separated lists of every `key=a,b,c` word, flattened, empty items dropped.
    pub fn list(&self, key: &str) -> Vec<String> {
        self.values(key)
            .into_iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_quotes_and_equivalent_keys() {
        let c = KernelCmdline::parse(
            "BOOT_IMAGE=/vmlinuz root=UUID=x ro modules-load=ip_vs,br_netfilter \
             rd.modules_load=overlay, quiet acpi=\"a b\" \"modprobe.blacklist=floppy\" module_blacklist=pcspkr\n",
        );
        assert_eq!(c.list("modules-load"), vec!["ip_vs", "br_netfilter"]);
        assert_eq!(c.list("modules_load"), vec!["ip_vs", "br_netfilter"]);
        assert_eq!(c.list("rd.modules-load"), vec!["overlay"]);
        assert_eq!(c.values("acpi"), vec!["a b"]);
        assert_eq!(c.list("modprobe.blacklist"), vec!["floppy"]);
        assert_eq!(c.values("root"), vec!["UUID=x"]);
        assert!(c.list("init").is_empty());
        assert!(c.words().contains(&"quiet".to_string()));
        assert_eq!(KernelCmdline::parse("  ").words().len(), 0);
        assert_eq!(KernelCmdline::parse("a=\"\"").values("a"), vec![""]);
    }
}
