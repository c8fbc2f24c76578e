//! The kernel matrix (the one place that lists it) and the cache of unpacked Debian cloud
//! kernels under target/vm/kernels/<series>/: vmlinuz, config, and root/lib/modules/<release>
//! with modules.dep built by depmod.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::apt::{self, Apt, Candidate};
use crate::util::run;

/// One kernel of the matrix: a Debian release's cloud kernel series.
#[derive(Debug)]
pub struct KernelSpec {
    /// The kernel series ("6.1"); also the name `--kernel` takes and the cache directory.
    pub series: &'static str,
    /// The Debian suite whose kernel it is (its -security suite is searched too).
    pub suite: &'static str,
    /// Debian's release number ("12" for bookworm): 6.12 packages carry "+deb13" in the ABI.
    debian: &'static str,
    /// Package names are `{prefix}{ABI}-cloud-amd64-unsigned`.
    prefix: &'static str,
}

/// The kernel matrix: every VM test runs on each of these.
pub const MATRIX: &[KernelSpec] = &[
    KernelSpec {
        series: "5.10",
        suite: "bullseye",
        debian: "11",
        prefix: "linux-image-5.10.0-",
    },
    KernelSpec {
        series: "6.1",
        suite: "bookworm",
        debian: "12",
        prefix: "linux-image-6.1.0-",
    },
    KernelSpec {
        series: "6.12",
        suite: "trixie",
        debian: "13",
        prefix: "linux-image-6.12.",
    },
];

const SUFFIX: &str = "-cloud-amd64-unsigned";

impl KernelSpec {
    /// Whether a package name is this series' own cloud kernel: "5.10.0-46", "6.1.0-56" or
    /// "6.12.117+deb13(.1)" — not a backport built for another release ("6.1.0-0.deb11.48",
    /// "6.12.117+deb12").
    pub fn matches(&self, package: &str) -> bool {
        let Some(abi) = package
            .strip_prefix(self.prefix)
            .and_then(|rest| rest.strip_suffix(SUFFIX))
        else {
            return false;
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        match abi.split_once('+') {
            None => digits(abi),
            Some((upstream, tag)) => {
                let Some(rest) = tag.strip_prefix("deb") else {
                    return false;
                };
                let (release, rebuild) = rest.split_once('.').unwrap_or((rest, "0"));
                digits(upstream) && release == self.debian && digits(rebuild)
            }
        }
    }

    fn suites(&self) -> [String; 2] {
        [self.suite.to_string(), format!("{}-security", self.suite)]
    }
}

/// Finds a matrix entry by series ("6.1"), suite ("bookworm") or kernel release
/// ("6.1.0-56-cloud-amd64", as `uname -r` prints it).
pub fn select(name: &str) -> Result<&'static KernelSpec> {
    MATRIX
        .iter()
        .find(|s| {
            s.series == name
                || s.suite == name
                || name
                    .strip_suffix("-cloud-amd64")
                    .is_some_and(|abi| s.matches(&format!("linux-image-{abi}{SUFFIX}")))
        })
        .with_context(|| {
            let names: Vec<String> = MATRIX
                .iter()
                .map(|s| format!("{} ({})", s.series, s.suite))
                .collect();
            format!(
                "unknown kernel {name:?}: the matrix has {}",
                names.join(", ")
            )
        })
}

/// An unpacked kernel, ready to boot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kernel {
    pub series: String,
    pub package: String,
    pub version: String,
    /// `uname -r` of the kernel ("6.1.0-56-cloud-amd64").
    pub release: String,
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    /// The directory holding lib/modules/<release> (what `depmod -b` takes).
    pub fn modules_root(&self) -> PathBuf {
        self.dir.join("root")
    }
    pub fn modules_dir(&self) -> PathBuf {
        self.modules_root().join("lib/modules").join(&self.release)
    }
    /// A name for logs and result directories: "6.1 (6.1.0-56-cloud-amd64)".
    pub fn label(&self) -> String {
        format!("{} ({})", self.series, self.release)
    }
}

/// The cache: target/vm.
pub struct Cache {
    pub vm_dir: PathBuf,
}

impl Cache {
    pub fn new(vm_dir: PathBuf) -> Cache {
        Cache { vm_dir }
    }

    fn kernel_dir(&self, spec: &KernelSpec) -> PathBuf {
        self.vm_dir.join("kernels").join(spec.series)
    }

    /// The cached kernel, if it is complete.
    pub fn cached(&self, spec: &KernelSpec) -> Option<Kernel> {
        let dir = self.kernel_dir(spec);
        let text = fs::read_to_string(dir.join("kernel.json")).ok()?;
        let mut k: Kernel = serde_json::from_str(&text).ok()?;
        k.dir = dir;
        (k.vmlinuz().is_file() && k.modules_dir().join("modules.dep").is_file()).then_some(k)
    }

    /// The kernels, fetched when not cached (or always, with `refresh`).
    pub fn fetch_all(&self, specs: &[&'static KernelSpec], refresh: bool) -> Result<Vec<Kernel>> {
        let mut apt_ready = false;
        let mut out = Vec::new();
        for spec in specs {
            if !refresh && let Some(k) = self.cached(spec) {
                out.push(k);
                continue;
            }
            let apt = Apt::new(self.vm_dir.join("apt"));
            if !apt_ready {
                let mirror = apt::system_mirror();
                let suites: Vec<&str> = MATRIX.iter().map(|s| s.suite).collect();
                apt.update(&apt::sources_list(&mirror, &suites))?;
                apt_ready = true;
            }
            out.push(self.fetch(&apt, spec)?);
        }
        Ok(out)
    }

    fn fetch(&self, apt: &Apt, spec: &'static KernelSpec) -> Result<Kernel> {
        let names = apt.search(&format!("^{}.*{SUFFIX}$", regex_escape(spec.prefix)), |n| {
            spec.matches(n)
        })?;
        let suites = spec.suites();
        let cands: Vec<Candidate> = apt
            .madison(&names)?
            .into_iter()
            .filter(|c| suites.contains(&c.suite))
            .collect();
        let cands = apt::newest_first(cands)?;
        if cands.is_empty() {
            bail!(
                "no {}*{SUFFIX} package in {} or {}-security: does the mirror in target/vm/apt/sources.list serve {}?",
                spec.prefix,
                spec.suite,
                spec.suite,
                spec.suite
            );
        }
        let debs = self.vm_dir.join("apt/debs");
        let mut errors = Vec::new();
        for c in cands.iter().take(4) {
            eprintln!(
                "xtask vm: fetching {} {} ({})",
                c.package, c.version, c.suite
            );
            match apt.download(c, &debs) {
                Ok(deb) => {
                    let kernel = self.unpack(spec, c, &deb);
                    let _ = fs::remove_file(&deb);
                    return kernel;
                }
                Err(e) => {
                    eprintln!(
                        "xtask vm: {} {} could not be downloaded, trying an older one: {e:#}",
                        c.package, c.version
                    );
                    errors.push(format!("{}={}: {e:#}", c.package, c.version));
                }
            }
        }
        bail!(
            "no {} kernel could be downloaded:\n  {}",
            spec.series,
            errors.join("\n  ")
        )
    }

    fn unpack(&self, spec: &KernelSpec, c: &Candidate, deb: &Path) -> Result<Kernel> {
        let final_dir = self.kernel_dir(spec);
        let tmp = final_dir.with_extension("partial");
        let _ = fs::remove_dir_all(&tmp);
        let x = tmp.join("x");
        fs::create_dir_all(&x)?;
        run(Command::new("dpkg").arg("-x").arg(deb).arg(&x)).context("dpkg -x failed")?;
        let vmlinuz = fs::read_dir(x.join("boot"))
            .context("the package has no /boot")?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| file_name(p).starts_with("vmlinuz-"))
            .context("the package has no /boot/vmlinuz-*")?;
        let release = file_name(&vmlinuz)["vmlinuz-".len()..].to_string();
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| x.join(d).join(&release))
            .find(|p| p.is_dir())
            .with_context(|| format!("the package has no lib/modules/{release}"))?;
        fs::rename(&vmlinuz, tmp.join("vmlinuz"))?;
        fs::rename(
            x.join("boot").join(format!("config-{release}")),
            tmp.join("config"),
        )
        .context("the package has no /boot/config-*")?;
        let lib_modules = tmp.join("root/lib/modules");
        fs::create_dir_all(&lib_modules)?;
        fs::rename(&modules, lib_modules.join(&release))?;
        fs::remove_dir_all(&x)?;
        run(Command::new("depmod")
            .arg("-b")
            .arg(tmp.join("root"))
            .arg(&release))
        .context("depmod failed (apt-get install kmod)")?;
        let kernel = Kernel {
            series: spec.series.to_string(),
            package: c.package.clone(),
            version: c.version.clone(),
            release,
            dir: final_dir.clone(),
        };
        fs::write(
            tmp.join("kernel.json"),
            serde_json::to_string_pretty(&kernel)?,
        )?;
        let _ = fs::remove_dir_all(&final_dir);
        fs::rename(&tmp, &final_dir)
            .with_context(|| format!("moving {} to {}", tmp.display(), final_dir.display()))?;
        eprintln!(
            "xtask vm: kernel {} ready in {}",
            kernel.label(),
            final_dir.display()
        );
        Ok(kernel)
    }
}

fn file_name(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = ".+*?()[]{}|^$\\".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_series_matches_only_its_own_packages() {
        let [s510, s61, s612] = [&MATRIX[0], &MATRIX[1], &MATRIX[2]];
        assert!(s510.matches("linux-image-5.10.0-46-cloud-amd64-unsigned"));
        assert!(s61.matches("linux-image-6.1.0-56-cloud-amd64-unsigned"));
        assert!(!s61.matches("linux-image-6.1.0-0.deb11.48-cloud-amd64-unsigned"));
        assert!(!s61.matches("linux-image-6.1.0-56-cloud-amd64"));
        assert!(!s61.matches("linux-image-6.1.0-56-amd64-unsigned"));
        assert!(s612.matches("linux-image-6.12.117+deb13-cloud-amd64-unsigned"));
        assert!(s612.matches("linux-image-6.12.115+deb13.1-cloud-amd64-unsigned"));
        assert!(!s612.matches("linux-image-6.12.117+deb12-cloud-amd64-unsigned"));
        assert!(!s612.matches("linux-image-6.12.117+deb13.x-cloud-amd64-unsigned"));
        assert!(!s510.matches("linux-image-6.12.117+deb13-cloud-amd64-unsigned"));
    }

    #[test]
    fn select_by_series_suite_or_release() {
        assert_eq!(select("6.1").unwrap().suite, "bookworm");
        assert_eq!(select("trixie").unwrap().series, "6.12");
        assert_eq!(select("6.1.0-56-cloud-amd64").unwrap().series, "6.1");
        assert_eq!(select("6.12.117+deb13-cloud-amd64").unwrap().series, "6.12");
        assert_eq!(select("5.10.0-46-cloud-amd64").unwrap().series, "5.10");
        let err = select("4.19").unwrap_err().to_string();
        assert!(err.contains("5.10 (bullseye)"), "{err}");
    }

    #[test]
    fn regex_escape_escapes_dots_and_plus() {
        assert_eq!(regex_escape("linux-image-6.12."), "linux-image-6\\.12\\.");
        assert_eq!(regex_escape("a+b"), "a\\+b");
    }
}
