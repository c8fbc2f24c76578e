//! A project-owned apt: its own sources list, lists, cache and status under target/vm/apt, so
//! kernel packages of other Debian releases can be found and downloaded by name while the
//! system's apt configuration stays untouched (only read, to reuse its mirror).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::util::{is_root, output, run};

/// Where the system's apt fetches Debian from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// The main archive ("http://deb.debian.org/debian").
    pub archive: String,
    /// The security archive, when the system uses one.
    pub security: Option<String>,
    /// The keyring the system's entry names (or Debian's archive keyring).
    pub keyring: Option<String>,
}

const FALLBACK_ARCHIVE: &str = "http://deb.debian.org/debian";
const FALLBACK_SECURITY: &str = "http://deb.debian.org/debian-security";
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// One `deb` entry of the system's sources (either syntax).
#[derive(Debug, Default, Clone)]
struct Entry {
    uris: Vec<String>,
    suites: Vec<String>,
    signed_by: Option<String>,
}

/// Entries of a deb822 `.sources` file (only `Types: deb`, enabled ones).
fn parse_deb822(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut entry = Entry::default();
        let (mut is_deb, mut enabled) = (false, true);
        for line in stanza.lines() {
            if line.starts_with('#') || line.starts_with(char::is_whitespace) {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let words = || value.split_whitespace().map(str::to_string);
            match key.trim().to_ascii_lowercase().as_str() {
                "types" => is_deb = words().any(|t| t == "deb"),
                "uris" => entry.uris = words().collect(),
                "suites" => entry.suites = words().collect(),
                "signed-by" => entry.signed_by = words().next(),
                "enabled" => enabled = value.trim() != "no",
                _ => {}
            }
        }
        if is_deb && enabled && !entry.uris.is_empty() {
            out.push(entry);
        }
    }
    out
}

/// Entries of a one-line `sources.list` file: `deb [opts] URI SUITE COMPONENT...`.
fn parse_one_line(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_string);
            rest = after.trim_start();
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(Entry {
                uris: vec![uri.to_string()],
                suites: vec![suite.to_string()],
                signed_by,
            });
        }
    }
    out
}

/// Picks the archive and security URIs from the system's entries for its own codename.
fn mirror_from(entries: &[Entry], codename: &str) -> Option<Mirror> {
    let find = |suite: &str| {
        entries
            .iter()
            .find(|e| e.suites.iter().any(|s| s == suite))
            .and_then(|e| Some((e.uris.first()?.trim_end_matches('/').to_string(), e)))
    };
    let (archive, entry) = find(codename)?;
    let security = find(&format!("{codename}-security")).map(|(uri, _)| uri);
    let keyring = entry
        .signed_by
        .clone()
        .filter(|k| k.starts_with('/') && Path::new(k).exists());
    Some(Mirror {
        archive,
        security,
        keyring,
    })
}

/// The mirror the system's apt uses, or deb.debian.org when it cannot be told.
pub fn system_mirror() -> Mirror {
    let codename = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    let mut entries = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        entries.extend(parse_one_line(&text));
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            match path.extension().and_then(|e| e.to_str()) {
                Some("sources") => entries.extend(parse_deb822(&text)),
                Some("list") => entries.extend(parse_one_line(&text)),
                _ => {}
            }
        }
    }
    let found = (!codename.is_empty())
        .then(|| mirror_from(&entries, &codename))
        .flatten();
    let mut mirror = found.unwrap_or_else(|| {
        eprintln!(
            "xtask vm: no Debian mirror found in the system's apt sources (codename {codename:?}); using {FALLBACK_ARCHIVE}"
        );
        Mirror {
            archive: FALLBACK_ARCHIVE.to_string(),
            security: Some(FALLBACK_SECURITY.to_string()),
            keyring: None,
        }
    });
    if mirror.keyring.is_none() && Path::new(DEBIAN_KEYRING).exists() {
        mirror.keyring = Some(DEBIAN_KEYRING.to_string());
    }
    mirror
}

/// The sources list for the given suites (each with its -security suite when there is one).
pub fn sources_list(mirror: &Mirror, suites: &[&str]) -> String {
    let opts = mirror
        .keyring
        .as_ref()
        .map(|k| format!("[signed-by={k}] "))
        .unwrap_or_default();
    let mut out =
        String::from("# Written by `cargo xtask vm-fetch`: Debian kernels for the VM tests.\n");
    for suite in suites {
        out.push_str(&format!("deb {opts}{} {suite} main\n", mirror.archive));
        if let Some(sec) = &mirror.security {
            out.push_str(&format!("deb {opts}{sec} {suite}-security main\n"));
        }
    }
    out
}

/// A package version available from one suite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub package: String,
    pub version: String,
    /// "bookworm-security/main amd64 Packages" → "bookworm-security".
    pub suite: String,
}

/// Parses `apt-cache madison` lines: `name | version | URI suite/component arch Packages`.
pub fn parse_madison(text: &str) -> Vec<Candidate> {
    text.lines()
        .filter_map(|line| {
            let mut cols = line.split('|').map(str::trim);
            let package = cols.next()?.to_string();
            let version = cols.next()?.to_string();
            let source = cols.next()?;
            let suite = source
                .split_whitespace()
                .nth(1)?
                .split('/')
                .next()?
                .to_string();
            (!package.is_empty() && !version.is_empty()).then_some(Candidate {
                package,
                version,
                suite,
            })
        })
        .collect()
}

/// The private apt under `dir`.
pub struct Apt {
    dir: PathBuf,
}

impl Apt {
    pub fn new(dir: PathBuf) -> Apt {
        Apt { dir }
    }

    fn options(&self) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let mut opts = vec![
            format!("Dir::Etc::SourceList={}", d("sources.list")),
            format!("Dir::Etc::SourceParts={}", d("sources.list.d")),
            format!("Dir::Etc::Preferences={}", d("preferences")),
            format!("Dir::Etc::PreferencesParts={}", d("preferences.d")),
            format!("Dir::State::Lists={}", d("lists")),
            format!("Dir::State::status={}", d("status")),
            format!("Dir::Cache={}", d("cache")),
            "APT::Architecture=amd64".to_string(),
            "APT::Architectures::=amd64".to_string(),
            "Acquire::Languages=none".to_string(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_string(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".to_string(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_string(),
            "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false".to_string(),
        ];
        if is_root() {
            // Downloads land in a root-owned project directory that _apt cannot write.
            opts.push("APT::Sandbox::User=root".to_string());
        }
        opts
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for o in self.options() {
            cmd.arg("-o").arg(o);
        }
        cmd
    }

    /// Writes the sources list (and the empty files apt expects) and refreshes the lists.
    pub fn update(&self, sources: &str) -> Result<()> {
        for sub in [
            "sources.list.d",
            "preferences.d",
            "lists/partial",
            "cache/archives/partial",
        ] {
            fs::create_dir_all(self.dir.join(sub))
                .with_context(|| format!("creating {}", self.dir.join(sub).display()))?;
        }
        fs::write(self.dir.join("sources.list"), sources)?;
        for empty in ["status", "preferences"] {
            let p = self.dir.join(empty);
            if !p.exists() {
                fs::write(&p, "")?;
            }
        }
        eprintln!(
            "xtask vm: refreshing the private package lists in {}",
            self.dir.display()
        );
        run(self.command("apt-get").args(["-q", "update"])).context(
            "apt-get update (private sources list) failed: is the Debian mirror reachable?",
        )
    }

    /// Package names matching `keep`, among the names apt-cache finds for `pattern` (a regex).
    pub fn search(&self, pattern: &str, keep: impl Fn(&str) -> bool) -> Result<Vec<String>> {
        let text = output(
            self.command("apt-cache")
                .args(["search", "--names-only", pattern]),
        )?;
        Ok(text
            .lines()
            .filter_map(|l| l.split(" - ").next())
            .map(str::trim)
            .filter(|n| keep(n))
            .map(str::to_string)
            .collect())
    }

    pub fn madison(&self, packages: &[String]) -> Result<Vec<Candidate>> {
        if packages.is_empty() {
            return Ok(Vec::new());
        }
        Ok(parse_madison(&output(
            self.command("apt-cache").arg("madison").args(packages),
        )?))
    }

    /// Downloads `package=version` into `into` and returns the .deb's path.
    pub fn download(&self, c: &Candidate, into: &Path) -> Result<PathBuf> {
        fs::create_dir_all(into)?;
        let before: Vec<PathBuf> = debs_in(into)?;
        let spec = format!("{}={}", c.package, c.version);
        let status = self
            .command("apt-get")
            .current_dir(into)
            .args(["-q", "download", &spec])
            .status()
            .context("could not run apt-get")?;
        if !status.success() {
            bail!("apt-get download {spec} failed ({status})");
        }
        debs_in(into)?
            .into_iter()
            .find(|p| !before.contains(p) && file_name_starts(p, &format!("{}_", c.package)))
            .with_context(|| {
                format!(
                    "apt-get download left no {}_*.deb in {}",
                    c.package,
                    into.display()
                )
            })
    }
}

fn debs_in(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect())
}

fn file_name_starts(p: &Path, prefix: &str) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(prefix))
}

/// Sorts candidates newest first by Debian version order (dpkg --compare-versions).
pub fn newest_first(mut cands: Vec<Candidate>) -> Result<Vec<Candidate>> {
    let mut failure = None;
    cands.sort_by(|a, b| {
        if a.version == b.version {
            return std::cmp::Ordering::Equal;
        }
        match Command::new("dpkg")
            .args(["--compare-versions", &a.version, "gt", &b.version])
            .status()
        {
            Ok(s) if s.success() => std::cmp::Ordering::Less,
            Ok(s) if s.code() == Some(1) => std::cmp::Ordering::Greater,
            other => {
                failure = Some(format!(
                    "dpkg --compare-versions {} gt {}: {other:?}",
                    a.version, b.version
                ));
                std::cmp::Ordering::Equal
            }
        }
    });
    if let Some(f) = failure {
        bail!("could not order kernel versions: {f}");
    }
    Ok(cands)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\n# http://snapshot.debian.org/archive/debian/2025\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security/\nSuites: bookworm-security\nComponents: main\n\nTypes: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n";

    #[test]
    fn deb822_entries_skip_sources_and_disabled_stanzas() {
        let entries = parse_deb822(DEB822);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].suites, ["bookworm", "bookworm-updates"]);
        let m = mirror_from(&entries, "bookworm").unwrap();
        assert_eq!(m.archive, "http://deb.debian.org/debian");
        assert_eq!(
            m.security.as_deref(),
            Some("http://deb.debian.org/debian-security")
        );
        assert!(mirror_from(&entries, "trixie").is_none());
    }

    #[test]
    fn one_line_entries_with_options_and_comments() {
        let text = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian/ trixie main contrib\ndeb-src http://m.example/debian trixie main\ndeb http://m.example/debian-security trixie-security main # sec\n";
        let entries = parse_one_line(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].signed_by.as_deref(), Some("/k.gpg"));
        let m = mirror_from(&entries, "trixie").unwrap();
        assert_eq!(m.archive, "http://m.example/debian");
        assert_eq!(
            m.security.as_deref(),
            Some("http://m.example/debian-security")
        );
        // The keyring named does not exist on this machine, so it is not used.
        assert_eq!(m.keyring, None);
    }

    #[test]
    fn sources_list_has_each_suite_and_its_security_suite() {
        let m = Mirror {
            archive: "http://a/debian".into(),
            security: Some("http://a/debian-security".into()),
            keyring: Some("/k.gpg".into()),
        };
        let text = sources_list(&m, &["bullseye", "trixie"]);
        assert!(text.contains("deb [signed-by=/k.gpg] http://a/debian bullseye main\n"));
        assert!(
            text.contains("deb [signed-by=/k.gpg] http://a/debian-security trixie-security main\n")
        );
        assert_eq!(text.lines().filter(|l| l.starts_with("deb ")).count(), 4);
    }

    #[test]
    fn madison_lines_give_package_version_and_suite() {
        let text = "linux-image-6.1.0-56-cloud-amd64-unsigned |  6.1.192-2 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages\nlinux-image-6.1.0-47-cloud-amd64-unsigned | 6.1.170-3 | http://deb.debian.org/debian bookworm/main amd64 Packages\ngarbage\n";
        let c = parse_madison(text);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].version, "6.1.192-2");
        assert_eq!(c[0].suite, "bookworm-security");
        assert_eq!(c[1].suite, "bookworm");
    }

    #[test]
    fn newest_first_uses_debian_version_order() {
        if Command::new("dpkg").arg("--version").output().is_err() {
            return; // not a Debian host
        }
        let c = |v: &str| Candidate {
            package: format!("p{v}"),
            version: v.into(),
            suite: "s".into(),
        };
        let sorted = newest_first(vec![
            c("6.12.9-1"),
            c("6.12.115-1+deb13u1"),
            c("6.12.115-1"),
            c("6.12.10~rc1-1"),
        ])
        .unwrap();
        let versions: Vec<_> = sorted.iter().map(|c| c.version.as_str()).collect();
        assert_eq!(
            versions,
            [
                "6.12.115-1+deb13u1",
                "6.12.115-1",
                "6.12.10~rc1-1",
                "6.12.9-1"
            ]
        );
    }
}
