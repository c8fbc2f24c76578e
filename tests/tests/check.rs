//! End-to-end tests of `kmodmon check`: the real binary against the fixture root filesystems
//! in tests/fixtures/check/ (see the README there), and once against this host.
use std::path::Path;
use std::process::{Command, Output, Stdio};

use kmodmon_tests::{fixture, fixture_copy, kmodmon_bin};
use serde_json::Value;

/// Runs `kmodmon check --root ROOT ARGS...` with stdin closed.
fn check(root: &Path, args: &[&str]) -> Output {
    Command::new(kmodmon_bin())
        .arg("check")
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running kmodmon")
}

fn json(root: &Path, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--json", "--no-containers"];
    all.extend_from_slice(args);
    let out = check(root, &all);
    let text = String::from_utf8_lossy(&out.stdout);
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), value)
}

/// (module, status) pairs in report order.
fn statuses(report: &Value) -> Vec<(String, String)> {
    report["modules"]
        .as_array()
        .expect("modules array")
        .iter()
        .map(|m| {
            (
                m["module"].as_str().unwrap_or("?").to_string(),
                m["status"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn module<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["modules"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["module"] == name))
        .unwrap_or_else(|| panic!("{name} not reported: {:?}", statuses(report)))
}

#[test]
fn seed_etc_modules_on_systemd_will_not_load_at_boot() {
    let root = fixture("check/seed");
    let out = check(&root, &["--no-containers"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("/etc/modules: NOT read at boot"), "{text}");
    assert!(
        text.contains("/etc/init.d/kmod exists but systemd does not run it"),
        "{text}"
    );
    for m in ["iptable_nat", "iptable_filter"] {
        let line = text
            .lines()
            .find(|l| l.contains(m) && l.starts_with("will_not_load_at_boot"));
        assert!(
            line.is_some(),
            "no will_not_load_at_boot line for {m}:\n{text}"
        );
    }
    assert!(
        text.contains("Result: 2 problems (2 will_not_load_at_boot)"),
        "{text}"
    );

    let (code, report) = json(&root, &[]);
    assert_eq!(code, 1);
    assert_eq!(
        statuses(&report),
        pairs(&[
            ("iptable_filter", "will_not_load_at_boot"),
            ("iptable_nat", "will_not_load_at_boot"),
            ("br_netfilter", "ok"),
            ("overlay", "ok"),
            ("nft_chain_nat", "loaded_unconfigured"),
            ("veth", "loaded_unconfigured"),
        ])
    );
    let nat = module(&report, "iptable_nat");
    assert_eq!(nat["loaded"], false);
    assert_eq!(nat["sources"][0]["path"], "/etc/modules");
    assert_eq!(nat["sources"][0]["line"], 7);
    assert_eq!(nat["sources"][0]["read_at_boot"], false);
    assert_eq!(report["init"]["system"], "systemd");
    assert_eq!(report["kernel"]["chosen_by"], "running");
}

#[test]
fn debian_link_makes_etc_modules_count() {
    let dir = fixture_copy("check/seed");
    std::os::unix::fs::symlink(
        "../modules",
        dir.path().join("etc/modules-load.d/modules.conf"),
    )
    .unwrap();
    let (code, report) = json(dir.path(), &[]);
    assert_eq!(report["etc_modules"]["read_at_boot"], true);
    assert_eq!(
        report["etc_modules"]["read_by"],
        "systemd-modules-load via /etc/modules-load.d/modules.conf"
    );
    // Read at boot now, but still not loaded: missing, not will_not_load_at_boot.
    assert_eq!(module(&report, "iptable_nat")["status"], "missing");
    assert_eq!(
        module(&report, "iptable_nat")["sources"][0]["target"],
        "/etc/modules"
    );
    assert_eq!(code, 1);
}

#[test]
fn override_precedence_and_masking() {
    let (code, report) = json(&fixture("check/precedence"), &[]);
    assert_eq!(
        statuses(&report),
        pairs(&[("loop", "ok"), ("overlay", "ok")])
    );
    assert_eq!(code, 0, "{report:#}");
    let files: Vec<(String, String)> = report["modules_load_d"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        files,
        pairs(&[
            ("/etc/modules-load.d/x.conf", "used"),
            ("/usr/lib/modules-load.d/x.conf", "shadowed"),
            ("/run/modules-load.d/y.conf", "masked"),
            ("/usr/lib/modules-load.d/y.conf", "shadowed"),
            ("/usr/lib/modules-load.d/z.conf", "used"),
        ])
    );
    assert_eq!(
        report["modules_load_d"][1]["by"],
        "/etc/modules-load.d/x.conf"
    );
    // No /proc/sys/kernel/osrelease in this root: the newest installed kernel is used.
    assert_eq!(report["kernel"]["chosen_by"], "newest_installed");
    assert_eq!(
        report["kernel"]["modules_dir"],
        "/lib/modules/6.1.0-55-cloud-amd64"
    );
}

#[test]
fn blacklists_install_false_and_the_command_line() {
    let (code, report) = json(&fixture("check/blacklist"), &[]);
    assert_eq!(code, 1);
    assert_eq!(
        statuses(&report),
        pairs(&[
            ("dummy", "blacklisted"),
            ("ip_vs", "blacklisted"),
            ("veth", "blacklisted"),
            ("overlay", "ok")
        ])
    );
    assert_eq!(
        module(&report, "dummy")["blocked_by"][0]["path"],
        "/etc/modprobe.d/blacklist.conf"
    );
    assert_eq!(
        module(&report, "veth")["blocked_by"][0]["rule"],
        "install veth /bin/false"
    );
    assert_eq!(
        module(&report, "ip_vs")["blocked_by"][0]["rule"],
        "module_blacklist=ip_vs"
    );
    assert_eq!(
        module(&report, "overlay")["blocked_by"],
        serde_json::json!([]),
        "the vendor blacklist is shadowed"
    );
}

#[test]
fn comments_blank_lines_and_parameters() {
    let (code, report) = json(&fixture("check/comments"), &[]);
    assert_eq!(
        statuses(&report),
        pairs(&[
            ("loop", "will_not_load_at_boot"),
            ("br_netfilter", "ok"),
            ("overlay", "ok")
        ])
    );
    assert_eq!(code, 1);
    let lines: Vec<u64> = ["overlay", "br_netfilter", "loop"]
        .iter()
        .map(|m| module(&report, m)["sources"][0]["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![4, 6, 7]);
    let note = module(&report, "loop")["sources"][0]["note"]
        .as_str()
        .unwrap();
    assert!(note.contains("options loop"), "{note}");
}

#[test]
fn missing_and_not_available_modules() {
    let (code, report) = json(&fixture("check/missing"), &[]);
    assert_eq!(code, 1);
    assert_eq!(
        statuses(&report),
        pairs(&[
            ("nf_conntrack_ipv4", "not_available"),
            ("br_netfilter", "missing"),
            ("ip_conntrack", "missing"),
            ("overlay", "ok"),
        ])
    );
    assert_eq!(
        module(&report, "ip_conntrack")["resolved"],
        serde_json::json!(["nf_conntrack"])
    );
    assert_eq!(report["summary"]["problems"], 3);
}

#[test]
fn builtin_modules_are_always_there() {
    let (code, report) = json(&fixture("check/builtin"), &[]);
    assert_eq!(
        statuses(&report),
        pairs(&[("crc32c_generic", "ok"), ("ext4", "ok"), ("fs_ext4", "ok")])
    );
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        module(&report, "fs_ext4")["resolved"],
        serde_json::json!(["ext4"])
    );
    assert_eq!(module(&report, "crc32c_generic")["builtin"], true);
    assert_eq!(
        module(&report, "crc32c_generic")["sources"][0]["read_at_boot"],
        false
    );
}

#[test]
fn sysvinit_reads_etc_modules() {
    let (code, report) = json(&fixture("check/sysvinit"), &[]);
    assert_eq!(report["init"]["system"], "sysvinit");
    assert_eq!(report["etc_modules"]["read_by"], "/etc/init.d/kmod");
    assert_eq!(statuses(&report), pairs(&[("loop", "ok")]));
    assert_eq!(code, 0);
}

#[test]
fn json_shape() {
    let (_, report) = json(&fixture("check/seed"), &[]);
    let keys: Vec<&str> = report
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for key in [
        "root",
        "kernel",
        "loaded",
        "init",
        "etc_modules",
        "kernel_cmdline",
        "modules_load_d",
        "modprobe_d",
        "containers",
        "modules",
        "warnings",
        "summary",
    ] {
        assert!(keys.contains(&key), "missing top-level {key}: {keys:?}");
    }
    assert!(!keys.contains(&"fix"), "fix appears only with --fix");
    for key in [
        "version",
        "chosen_by",
        "modules_dir",
        "modules",
        "builtin",
        "error",
    ] {
        assert!(report["kernel"].get(key).is_some(), "kernel.{key}");
    }
    assert_eq!(report["loaded"]["source"], "proc_modules");
    assert_eq!(report["loaded"]["count"], 14);
    let m = module(&report, "iptable_nat");
    for key in [
        "module",
        "status",
        "problem",
        "loaded",
        "builtin",
        "available",
        "resolved",
        "configured_at_boot",
        "sources",
        "containers",
        "blocked_by",
        "fixable",
        "detail",
    ] {
        assert!(m.get(key).is_some(), "module.{key} missing: {m:#}");
    }
    assert_eq!(m["problem"], true);
    assert_eq!(m["fixable"], true);
    for key in [
        "ok",
        "missing",
        "will_not_load_at_boot",
        "blacklisted",
        "not_available",
        "loaded_unconfigured",
        "problems",
    ] {
        assert!(report["summary"][key].is_u64(), "summary.{key}");
    }
    assert_eq!(report["summary"]["will_not_load_at_boot"], 2);
}

#[test]
fn containers_expectations_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("containers.json");
    std::fs::write(
        &file,
        r#"[{"container_id":"0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
             "runtime":"docker","name":"dind","modules":["iptable_nat","overlay","ip_vs"]}]"#,
    )
    .unwrap();
    let out = check(
        &fixture("check/seed"),
        &["--json", "--containers-file", file.to_str().unwrap()],
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        module(&report, "iptable_nat")["containers"][0]["name"],
        "dind"
    );
    assert_eq!(
        module(&report, "iptable_nat")["status"],
        "will_not_load_at_boot"
    );
    assert_eq!(module(&report, "ip_vs")["status"], "missing");
    assert_eq!(module(&report, "ip_vs")["fixable"], true);
    assert_eq!(report["containers"]["expecting_modules"], 1);
}

#[test]
fn fix_yes_writes_modules_load_d() {
    let dir = fixture_copy("check/seed");
    let root = dir.path();
    let out = check(root, &["--no-containers", "--fix", "--yes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("+++ b/etc/modules-load.d/kmodmon.conf"),
        "{text}"
    );
    assert!(text.contains("+iptable_nat"), "{text}");
    assert!(
        text.contains("modprobe -a iptable_filter iptable_nat"),
        "{text}"
    );
    // Configured now, but still not loaded: missing until loaded or rebooted.
    assert_eq!(out.status.code(), Some(1), "{text}");
    let written = std::fs::read_to_string(root.join("etc/modules-load.d/kmodmon.conf")).unwrap();
    let lines: Vec<&str> = written.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines, vec!["iptable_filter", "iptable_nat"]);

    let (_, report) = json(root, &[]);
    assert_eq!(module(&report, "iptable_nat")["status"], "missing");
    assert_eq!(module(&report, "iptable_nat")["configured_at_boot"], true);

    // Once loaded (as after the next boot), everything is ok.
    let mut proc_modules = std::fs::read_to_string(root.join("proc/modules")).unwrap();
    proc_modules.push_str("iptable_nat 12288 0 - Live 0xffffffffc0d00000\niptable_filter 12288 0 - Live 0xffffffffc0d10000\n");
    std::fs::write(root.join("proc/modules"), proc_modules).unwrap();
    let (code, report) = json(root, &[]);
    assert_eq!(code, 0, "{report:#}");
    // A second --fix has nothing to add.
    let out = check(root, &["--no-containers", "--fix", "--yes"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to add"));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn fix_without_yes_and_without_a_terminal_refuses() {
    let dir = fixture_copy("check/seed");
    let out = check(dir.path(), &["--no-containers", "--fix"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("standard input is not a terminal"), "{err}");
    assert!(err.contains("--fix --yes"), "{err}");
    assert!(!dir.path().join("etc/modules-load.d/kmodmon.conf").exists());
}

#[test]
fn fix_json_reports_what_was_written() {
    let dir = fixture_copy("check/seed");
    let (code, report) = json(dir.path(), &["--fix", "--yes"]);
    assert_eq!(code, 1);
    assert_eq!(report["fix"]["written"], true);
    assert_eq!(
        report["fix"]["added"],
        serde_json::json!(["iptable_filter", "iptable_nat"])
    );
    assert_eq!(report["fix"]["path"], "/etc/modules-load.d/kmodmon.conf");
    assert_eq!(
        module(&report, "iptable_nat")["status"],
        "missing",
        "the report is the one after the fix"
    );
}

#[test]
fn unknown_kernel_version() {
    let (code, report) = json(&fixture("check/missing"), &["--kernel", "9.9.9-nope"]);
    assert_eq!(code, 1);
    assert_eq!(report["kernel"]["chosen_by"], "argument");
    assert!(
        report["kernel"]["error"]
            .as_str()
            .unwrap()
            .contains("9.9.9-nope")
    );
    assert_eq!(module(&report, "br_netfilter")["status"], "not_available");
    assert_eq!(
        module(&report, "overlay")["status"],
        "ok",
        "loaded now, so this kernel has it"
    );
}

#[test]
fn a_bad_root_is_a_clear_error() {
    let out = check(Path::new("/nonexistent/kmodmon-root"), &[]);
    // 2: the check could not be done (1 would mean "drift found").
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
}

/// The real host: must not crash, whatever it has (this project's machines have no
/// loadable-module support at all).
#[test]
fn this_host() {
    let out = Command::new(kmodmon_bin())
        .args(["check", "--json", "--no-containers"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(report["kernel"]["version"], release.trim());
    let expected_source = if Path::new("/proc/modules").exists() {
        "proc_modules"
    } else {
        "no_module_support"
    };
    assert_eq!(report["loaded"]["source"], expected_source);
    assert_eq!(
        report["summary"]["problems"].as_u64().map(|n| n > 0),
        Some(out.status.code() == Some(1))
    );
}
