//! A check [`Report`] as Prometheus gauges (text exposition format 0.0.4), for a fleet to see
//! the reboot question of every node: modules configured but missing at the next boot, and
//! modules running containers expect that are not loaded. Label values that come from files,
//! the boot loader or containers go through [`crate::escape::prometheus_label`].
//!
//! The daemon serves these beside its counters once it runs the check periodically:
//!
//! ```no_run
//! use kmodmon::check::{self, containers, prom};
//! use kmodmon::host::moddb::RootFs;
//! let root = RootFs::host();
//! let report = check::gather(&root, None, containers::from_runtime_state(&root))?;
//! let text = prom::render(&report, std::time::SystemTime::now());
//! # Ok::<(), kmodmon::check::CheckError>(())
//! ```
use std::fmt::Write as _;
use std::time::SystemTime;

use super::analyze::Status;
use super::nextboot::NextStatus;
use super::report::Report;
use crate::escape::prometheus_label as label;

/// Every metric [`render`] writes (for dashboards and alert rules to be checked against).
pub const METRICS: &[&str] = &[
    "kmodmon_check_timestamp_seconds",
    "kmodmon_check_modules",
    "kmodmon_check_problems",
    "kmodmon_check_next_boot_info",
    "kmodmon_check_next_boot_modules",
    "kmodmon_check_next_boot_problems",
    "kmodmon_check_next_boot_problem",
    "kmodmon_check_container_expected_not_loaded",
];

/// The snake_case name serde gives a unit enum variant.
fn snake<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
}

/// The report's gauges. `now` is when the report was made.
pub fn render(report: &Report, now: SystemTime) -> String {
    let mut o = String::with_capacity(2048);
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    header(
        &mut o,
        "kmodmon_check_timestamp_seconds",
        "When the check whose results these are ran, in seconds since the epoch.",
    );
    let _ = writeln!(o, "kmodmon_check_timestamp_seconds {secs}");

    header(
        &mut o,
        "kmodmon_check_modules",
        "Modules of the running kernel's check, by status (kmodmon check).",
    );
    for s in Status::ALL {
        let n = report.modules.iter().filter(|m| m.status == s).count();
        let _ = writeln!(o, "kmodmon_check_modules{{status=\"{}\"}} {n}", s.as_str());
    }
    header(
        &mut o,
        "kmodmon_check_problems",
        "Expected modules with a problem on the running kernel (kmodmon check exits 1 when > 0).",
    );
    let _ = writeln!(o, "kmodmon_check_problems {}", report.summary.problems);

    if let Some(n) = &report.next_boot {
        let k = &n.kernel.kernel;
        let kernel = label(k.version.as_deref().unwrap_or(""));
        header(
            &mut o,
            "kmodmon_check_next_boot_info",
            "The kernel that boots next and how it was found (always 1).",
        );
        let _ = writeln!(
            o,
            "kmodmon_check_next_boot_info{{kernel=\"{kernel}\",source=\"{}\",confidence=\"{}\",bootloader=\"{}\",running=\"{}\"}} 1",
            snake(&k.source),
            snake(&k.confidence),
            snake(&k.bootloader),
            n.kernel.running
        );
        header(
            &mut o,
            "kmodmon_check_next_boot_modules",
            "Modules judged against the kernel that boots next, by status.",
        );
        for st in NextStatus::ALL {
            let c = n.modules.iter().filter(|m| m.status == st).count();
            let _ = writeln!(
                o,
                "kmodmon_check_next_boot_modules{{kernel=\"{kernel}\",status=\"{}\"}} {c}",
                st.as_str()
            );
        }
        header(
            &mut o,
            "kmodmon_check_next_boot_problems",
            "Modules configured, expected or loaded now that will be missing, blocked or lost at the next boot.",
        );
        let _ = writeln!(
            o,
            "kmodmon_check_next_boot_problems{{kernel=\"{kernel}\"}} {}",
            n.summary.problems
        );
        header(
            &mut o,
            "kmodmon_check_next_boot_problem",
            "1 for each module with a problem at the next boot (status: not_available, blacklisted, not_in_initramfs, lost).",
        );
        for m in n.modules.iter().filter(|m| m.problem) {
            let _ = writeln!(
                o,
                "kmodmon_check_next_boot_problem{{kernel=\"{kernel}\",module=\"{}\",status=\"{}\"}} 1",
                label(&m.module),
                m.status.as_str()
            );
        }
    }

    header(
        &mut o,
        "kmodmon_check_container_expected_not_loaded",
        "1 for each module a running container declares (KERNEL_MODULES) that is not loaded.",
    );
    for m in report.modules.iter().filter(|m| m.loaded == Some(false)) {
        for c in &m.containers {
            let _ = writeln!(
                o,
                "kmodmon_check_container_expected_not_loaded{{container_id=\"{}\",runtime=\"{}\",name=\"{}\",module=\"{}\",status=\"{}\"}} 1",
                label(&c.id),
                label(&c.runtime),
                label(c.name.as_deref().unwrap_or("")),
                label(&m.module),
                m.status.as_str()
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::containers::{ContainerExpectation, ContainerInputs};
    use crate::check::tests::write;
    use crate::host::moddb::RootFs;
    use std::collections::BTreeSet;

    /// The fixture tree of tests/fixtures/check/NAME.
    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/check")
            .join(name)
    }

    fn deploy(rel: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(rel);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// Names of the metric families in Prometheus text.
    fn families(text: &str) -> BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// Every metric kmodmon exports: the daemon's counters and these gauges.
    fn exported() -> BTreeSet<String> {
        let mut all = families(&crate::metrics::Metrics::new().render());
        all.extend(METRICS.iter().map(|s| s.to_string()));
        all
    }

    /// `kmodmon_*` names in a PromQL expression.
    fn names_in(expr: &str) -> Vec<String> {
        let mut out = Vec::new();
        let b = expr.as_bytes();
        let mut i = 0;
        while let Some(at) = expr[i..].find("kmodmon_") {
            let start = i + at;
            let before_ok =
                start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
            let mut end = start;
            while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                end += 1;
            }
            if before_ok {
                out.push(expr[start..end].to_string());
            }
            i = end;
        }
        out
    }

    #[test]
    fn gauges_of_an_upgrade_with_a_container() {
        let root = RootFs::new(fixture("upgrade"));
        let containers = ContainerInputs {
            list: vec![ContainerExpectation {
                container_id: "0f1e2d3c4b5a".into(),
                runtime: "containerd".into(),
                name: Some("we\"ird\nname".into()),
                modules: vec!["ip_vs".into(), "overlay".into()],
                declared_in: None,
            }],
            source: "test".into(),
            ..Default::default()
        };
        let report = crate::check::gather(&root, None, containers).unwrap();
        let t = render(
            &report,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
        );
        assert!(
            t.contains("kmodmon_check_timestamp_seconds 1800000000\n"),
            "{t}"
        );
        assert!(t.contains("kmodmon_check_next_boot_info{kernel=\"6.1.0-58-cloud-amd64\",source=\"grub_saved_entry\",confidence=\"high\",bootloader=\"grub\",running=\"false\"} 1\n"), "{t}");
        assert!(t.contains("kmodmon_check_next_boot_problem{kernel=\"6.1.0-58-cloud-amd64\",module=\"zfs\",status=\"not_available\"} 1\n"));
        assert!(t.contains("kmodmon_check_next_boot_problem{kernel=\"6.1.0-58-cloud-amd64\",module=\"spl\",status=\"lost\"} 1\n"));
        assert!(
            !t.contains("module=\"overlay\",status=\"now_builtin\""),
            "not a problem"
        );
        assert!(
            t.contains("kmodmon_check_next_boot_problems{kernel=\"6.1.0-58-cloud-amd64\"} 2\n"),
            "{t}"
        );
        assert!(t.contains("kmodmon_check_next_boot_modules{kernel=\"6.1.0-58-cloud-amd64\",status=\"now_builtin\"} 1\n"));
        // ip_vs: expected by the container, not loaded; the name is escaped.
        assert!(
            t.contains("kmodmon_check_container_expected_not_loaded{container_id=\"0f1e2d3c4b5a\",runtime=\"containerd\",name=\"we\\\"ird\\\\x0aname\",module=\"ip_vs\",status=\"missing\"} 1\n"),
            "{t}"
        );
        assert!(t.contains("kmodmon_check_problems 1\n"));
        assert!(t.contains("kmodmon_check_modules{status=\"missing\"} 1\n"));
        // Well-formed: every sample line is NAME{labels} VALUE with a number, no raw newline
        // inside labels, every family declared.
        let fams = families(&t);
        assert_eq!(fams, METRICS.iter().map(|s| s.to_string()).collect());
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let family = name.split('{').next().unwrap();
            assert!(fams.contains(family), "{line}");
        }
    }

    #[test]
    fn no_next_boot_section_no_next_boot_gauges() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "/etc/modules-load.d/x.conf", "loop\n");
        let report = crate::check::gather_with(
            &RootFs::new(dir.path()),
            None,
            ContainerInputs::default(),
            crate::check::Options {
                next_boot: false,
                all_kernels: false,
            },
        )
        .unwrap();
        let t = render(&report, SystemTime::now());
        assert!(!t.contains("kmodmon_check_next_boot"));
        assert!(t.contains("kmodmon_check_problems 1\n"), "{t}");
    }

    #[test]
    fn grafana_dashboard_names_only_exported_metrics() {
        let text = deploy("grafana/kmodmon.json");
        let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
        assert!(dash["title"].is_string());
        let known = exported();
        let panels = dash["panels"].as_array().expect("panels");
        assert!(panels.len() >= 6);
        let mut used = BTreeSet::new();
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?");
            if p["type"] == "row" {
                continue;
            }
            let targets = p["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("panel {title}: no targets"));
            assert!(!targets.is_empty(), "panel {title}: no targets");
            for t in targets {
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title}: a target without expr"));
                let names = names_in(expr);
                assert!(
                    !names.is_empty() || expr.contains("up{"),
                    "panel {title}: {expr} names no kmodmon metric"
                );
                for n in names {
                    assert!(
                        known.contains(&n),
                        "panel {title}: {n} is not a metric kmodmon exports ({known:?})"
                    );
                    used.insert(n);
                }
            }
        }
        for must in [
            "kmodmon_check_next_boot_problem",
            "kmodmon_check_container_expected_not_loaded",
            "kmodmon_drops_total",
            "kmodmon_denials_total",
        ] {
            assert!(used.contains(must), "the dashboard does not show {must}");
        }
    }

    #[test]
    fn alert_rules_name_only_exported_metrics_and_have_runbooks() {
        let rules = deploy("prometheus/kmodmon-rules.yaml");
        let known = exported();
        let mut alerts = Vec::new();
        for line in rules.lines() {
            if let Some(name) = line.trim().strip_prefix("- alert: ") {
                alerts.push(name.trim().to_string());
            }
            if line.trim_start().starts_with("expr:")
                || line.trim_start().starts_with("kmodmon_")
                || line.contains("(kmodmon_")
            {
                for n in names_in(line) {
                    assert!(
                        known.contains(&n),
                        "{n} in the rules is not exported: {line}"
                    );
                }
            }
        }
        assert!(alerts.len() >= 6, "{alerts:?}");
        let readme = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
        )
        .unwrap();
        for a in &alerts {
            assert!(
                readme.contains(&format!("#### {a}")),
                "README has no runbook section for {a}"
            );
            assert!(
                rules.contains(&format!("#{}", a.to_lowercase())),
                "{a}: runbook_url does not point at its README section"
            );
        }
    }
}
