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
        "legacy_scripts",
        "next_boot",
    ] {
        assert!(keys.contains(&key), "missing top-level {key}: {keys:?}");
    }
    assert!(
        !keys.contains(&"all_kernels"),
        "all_kernels appears only with --all-kernels"
    );
    for key in [
        "kernel",
        "cmdline",
        "cmdline_source",
        "initramfs",
        "modules",
        "warnings",
        "summary",
    ] {
        assert!(report["next_boot"].get(key).is_some(), "next_boot.{key}");
    }
    for key in [
        "version",
        "source",
        "confidence",
        "bootloader",
        "evidence",
        "running",
        "boots_next",
    ] {
        assert!(
            report["next_boot"]["kernel"].get(key).is_some(),
            "next_boot.kernel.{key}"
        );
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

// ---- The reboot question: --next-boot, --all-kernels, boot loaders, RHEL, initramfs ----

const K55: &str = "6.1.0-55-cloud-amd64";
const K58: &str = "6.1.0-58-cloud-amd64";
const EL_OLD: &str = "4.18.0-305.el8.x86_64";
const EL_NEW: &str = "4.18.0-348.el8.x86_64";

/// `--next-boot --json` (and ARGS): exit code and the object.
fn next_json(root: &Path, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--next-boot"];
    all.extend_from_slice(args);
    json(root, &all)
}

/// (module, status) pairs of a next-boot object.
fn next_statuses(next: &Value) -> Vec<(String, String)> {
    statuses(next)
}

fn next_module<'a>(next: &'a Value, name: &str) -> &'a Value {
    module(next, name)
}

/// A GRUB environment block, padded to 1024 bytes as grub-editenv writes it.
fn grubenv(vars: &str) -> String {
    let mut body = format!("# GRUB Environment Block\n{vars}");
    while body.len() < 1024 {
        body.push('#');
    }
    body
}

fn write(root: &Path, path: &str, text: &str) {
    let p = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A cpio newc archive of `paths` (a trailing `/` makes a directory), padded to 512 bytes.
fn cpio_archive(paths: &[String]) -> Vec<u8> {
    use std::io::Write as _;
    let mut out = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let (name, mode, data): (&str, u32, &[u8]) = match p.strip_suffix('/') {
            Some(d) => (d, 0o040755, b""),
            None => (p.as_str(), 0o100644, b"\x7fELF module"),
        };
        let mut w = cpio::NewcBuilder::new(name)
            .ino(i as u32 + 1)
            .mode(mode)
            .nlink(1)
            .write(out, data.len() as u32);
        w.write_all(data).unwrap();
        out = w.finish().unwrap();
    }
    out = cpio::newc::trailer(out).unwrap();
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

#[derive(Clone, Copy, Debug)]
enum Compress {
    Gzip,
    Zstd,
    Xz,
}

/// An initramfs as dracut and initramfs-tools write it: an uncompressed early-microcode
/// archive, then the main archive compressed. `modules` are paths under lib/modules/KVER/.
fn initramfs(kver: &str, modules: &[&str], compress: Compress) -> Vec<u8> {
    use std::io::Write as _;
    let mut image = cpio_archive(&[
        "kernel/".into(),
        "kernel/x86/".into(),
        "kernel/x86/microcode/".into(),
        "kernel/x86/microcode/GenuineIntel.bin".into(),
    ]);
    let mut main: Vec<String> = vec![
        ".".into(),
        "usr/".into(),
        "usr/lib/".into(),
        format!("usr/lib/modules/{kver}/"),
        format!("usr/lib/modules/{kver}/modules.dep"),
        "init".into(),
    ];
    main.extend(
        modules
            .iter()
            .map(|m| format!("usr/lib/modules/{kver}/{m}")),
    );
    let main = cpio_archive(&main);
    let compressed = match compress {
        Compress::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&main).unwrap();
            e.finish().unwrap()
        }
        Compress::Zstd => zstd::encode_all(&main[..], 3).unwrap(),
        Compress::Xz => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(&main).unwrap();
            e.finish().unwrap()
        }
    };
    image.extend_from_slice(&compressed);
    image
}

#[test]
fn upgrade_out_of_tree_module_missing_and_one_now_built_in() {
    let root = fixture("check/upgrade");
    let (code, next) = next_json(&root, &[]);
    assert_eq!(code, 1, "{next:#}");
    let n = &next["next_boot"];
    assert_eq!(n["kernel"]["version"], K58);
    assert_eq!(n["kernel"]["source"], "grub_saved_entry");
    assert_eq!(n["kernel"]["confidence"], "high");
    assert_eq!(n["kernel"]["bootloader"], "grub");
    assert_eq!(n["kernel"]["running"], false);
    assert_eq!(
        n["kernel"]["entry"]["id"],
        format!("gnulinux-{K58}-advanced-6f1c2a3e-58f4-4b7e-9a51-0c2d7e8f9a10")
    );
    assert_eq!(
        next_statuses(n),
        pairs(&[
            ("zfs", "not_available"),
            ("spl", "lost"),
            ("overlay", "now_builtin"),
            ("br_netfilter", "ok"),
        ])
    );
    let zfs = next_module(n, "zfs");
    let detail = zfs["detail"].as_str().unwrap();
    assert!(
        detail.contains("out-of-tree module (updates/dkms/zfs.ko in 6.1.0-55"),
        "{detail}"
    );
    assert!(detail.contains("dkms status"), "{detail}");
    assert_eq!(zfs["sources"][0]["path"], "/etc/modules-load.d/zfs.conf");
    assert_eq!(next_module(n, "overlay")["builtin"], true);
    assert_eq!(next_module(n, "overlay")["problem"], false);
    assert_eq!(n["summary"]["problems"], 2);
    assert_eq!(n["summary"]["now_builtin"], 1);
    assert!(
        next.get("modules").is_none(),
        "--next-boot prints only the next boot"
    );

    // The human form says what will be lost and why.
    let out = check(&root, &["--next-boot", "--no-containers"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains(&format!("Next boot: kernel {K58}\n")),
        "{text}"
    );
    assert!(text.contains("(high confidence)"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("not_available  zfs")),
        "{text}"
    );
    assert!(
        text.contains("Next boot: 2 problems (1 not_available, 1 lost); 1 ok, 1 now_builtin"),
        "{text}"
    );
}

#[test]
fn default_check_has_a_next_boot_section_that_sets_the_exit_code() {
    let root = fixture("check/upgrade");
    let (code, report) = json(&root, &[]);
    // Nothing is wrong with the running kernel; the next one loses zfs.
    assert_eq!(report["summary"]["problems"], 0);
    assert_eq!(report["next_boot"]["summary"]["problems"], 2);
    assert_eq!(code, 1);
    let out = check(&root, &["--no-containers"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Result: no problems;"), "{text}");
    assert!(
        text.contains(&format!("Result at the next boot ({K58}): 2 problems")),
        "{text}"
    );
}

#[test]
fn grub_next_entry_is_the_next_boot_only() {
    let dir = fixture_copy("check/upgrade");
    let uuid = "6f1c2a3e-58f4-4b7e-9a51-0c2d7e8f9a10";
    let saved = format!("gnulinux-advanced-{uuid}>gnulinux-{K58}-advanced-{uuid}");
    let once = format!("gnulinux-advanced-{uuid}>gnulinux-{K55}-advanced-{uuid}");
    write(
        dir.path(),
        "/boot/grub/grubenv",
        &grubenv(&format!("saved_entry={saved}\nnext_entry={once}\n")),
    );
    let (code, next) = next_json(dir.path(), &[]);
    let n = &next["next_boot"];
    assert_eq!(n["kernel"]["version"], K55);
    assert_eq!(n["kernel"]["source"], "grub_next_entry");
    assert_eq!(n["kernel"]["running"], true);
    assert_eq!(n["summary"]["problems"], 0, "{n:#}");
    assert_eq!(code, 0);

    // No grubenv at all: `${saved_entry}` is empty and GRUB boots the first entry (58).
    std::fs::remove_file(dir.path().join("boot/grub/grubenv")).unwrap();
    let (_, next) = next_json(dir.path(), &[]);
    assert_eq!(next["next_boot"]["kernel"]["source"], "grub_first_entry");
    assert_eq!(next["next_boot"]["kernel"]["confidence"], "medium");
    assert_eq!(next["next_boot"]["kernel"]["version"], K58);
}

#[test]
fn all_kernels_judges_every_installed_kernel() {
    let (code, out) = next_json(&fixture("check/upgrade"), &["--all-kernels"]);
    assert_eq!(code, 1);
    let all = out["all_kernels"].as_array().expect("all_kernels");
    let got: Vec<(String, bool, u64)> = all
        .iter()
        .map(|k| {
            (
                k["kernel"]["version"].as_str().unwrap().to_string(),
                k["kernel"]["boots_next"].as_bool().unwrap(),
                k["summary"]["problems"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![(K58.to_string(), true, 2), (K55.to_string(), false, 0)]
    );
    assert_eq!(all[1]["kernel"]["source"], "installed");
    assert_eq!(all[1]["kernel"]["running"], true);
}

#[test]
fn systemd_boot_bls_entries_and_loader_conf() {
    let dir = fixture_copy("check/upgrade");
    let d = dir.path();
    std::fs::remove_dir_all(d.join("boot/grub")).unwrap();
    for k in [K55, K58] {
        write(
            d,
            &format!("/boot/efi/loader/entries/0123abcd-{k}.conf"),
            &format!(
                "title      Debian GNU/Linux 12 (bookworm)\nversion    {k}\nmachine-id 0123abcd\n\
                 linux      /0123abcd/{k}/linux\ninitrd     /0123abcd/{k}/initrd.img-{k}\n\
                 options    root=UUID=x ro quiet\n"
            ),
        );
    }
    // No default: systemd-boot boots the entry that sorts first, the newest.
    let (_, next) = next_json(d, &[]);
    let k = &next["next_boot"]["kernel"];
    assert_eq!(k["bootloader"], "bls");
    assert_eq!(k["source"], "bls_newest");
    assert_eq!(k["confidence"], "medium");
    assert_eq!(k["version"], K58);
    assert_eq!(next["next_boot"]["cmdline"], "root=UUID=x ro quiet");
    // loader.conf's default names the old kernel.
    write(
        d,
        "/boot/efi/loader/loader.conf",
        &format!("timeout 3\ndefault 0123abcd-{K55}.conf\n"),
    );
    let (code, next) = next_json(d, &[]);
    let k = &next["next_boot"]["kernel"];
    assert_eq!(k["source"], "loader_conf");
    assert_eq!(k["confidence"], "high");
    assert_eq!(k["version"], K55);
    assert_eq!(code, 0);
}

#[test]
fn no_boot_loader_means_the_newest_tree_with_low_confidence() {
    let dir = fixture_copy("check/upgrade");
    std::fs::remove_dir_all(dir.path().join("boot")).unwrap();
    let (code, next) = next_json(dir.path(), &[]);
    let k = &next["next_boot"]["kernel"];
    assert_eq!(k["source"], "newest_installed");
    assert_eq!(k["confidence"], "low");
    assert_eq!(k["version"], K58);
    assert_eq!(code, 1);
    // Without a boot entry, the running kernel's command line stands in.
    assert!(
        next["next_boot"]["cmdline_source"]
            .as_str()
            .unwrap()
            .starts_with("/proc/cmdline of the running kernel")
    );
}

#[test]
fn rhel8_sysconfig_modules_rc_modules_and_etc_modules() {
    let root = fixture("check/rhel8");
    let (code, report) = json(&root, &[]);
    assert_eq!(code, 1);
    assert_eq!(
        statuses(&report),
        pairs(&[
            ("br_netfilter", "will_not_load_at_boot"),
            ("dummy", "will_not_load_at_boot"),
            ("ip_vs", "ok"),
            ("ip_vs_wrr", "ok"),
            ("iptable_nat", "ok"),
            ("overlay", "ok"),
        ])
    );
    let legacy = &report["legacy_scripts"];
    assert_eq!(legacy["read_at_boot"], true);
    assert_eq!(legacy["read_by"], "loadmodules.service");
    let wrr = &module(&report, "ip_vs_wrr")["sources"][0];
    assert_eq!(wrr["kind"], "sysconfig_modules");
    assert_eq!(wrr["path"], "/etc/sysconfig/modules/ipvs.modules");
    assert_eq!(wrr["line"], 3);
    assert_eq!(
        module(&report, "iptable_nat")["sources"][0]["kind"],
        "rc_modules"
    );
    let ip_vs = module(&report, "ip_vs");
    assert_eq!(ip_vs["sources"][1]["key"], "rd.driver.pre");
    assert_eq!(ip_vs["sources"][1]["read_at_boot"], true, "dracut reads it");
    // A script the loader skips because it is not executable.
    let br = &module(&report, "br_netfilter")["sources"][0];
    assert_eq!(br["read_at_boot"], false);
    assert!(br["note"].as_str().unwrap().contains("chmod +x"), "{br}");
    // /etc/modules on a RHEL-family node: read by nothing, said by name.
    assert_eq!(
        module(&report, "dummy")["sources"][0]["path"],
        "/etc/modules"
    );
    let why = report["etc_modules"]["why"].as_str().unwrap();
    assert!(
        why.contains("RHEL-family system (ID=centos) nothing reads /etc/modules"),
        "{why}"
    );

    // The loader unit disabled: every legacy line becomes will_not_load_at_boot.
    let dir = fixture_copy("check/rhel8");
    std::fs::remove_file(
        dir.path()
            .join("etc/systemd/system/multi-user.target.wants/loadmodules.service"),
    )
    .unwrap();
    let (_, report) = json(dir.path(), &[]);
    assert_eq!(
        module(&report, "iptable_nat")["status"],
        "will_not_load_at_boot"
    );
    assert_eq!(
        module(&report, "ip_vs_wrr")["status"],
        "will_not_load_at_boot"
    );
    assert_eq!(
        module(&report, "ip_vs")["status"],
        "ok",
        "rd.driver.pre still loads it"
    );
    assert!(
        report["legacy_scripts"]["why"]
            .as_str()
            .unwrap()
            .contains("not enabled")
    );
}

#[test]
fn rhel8_bls_entries_under_grub_and_the_initramfs() {
    let dir = fixture_copy("check/rhel8");
    let d = dir.path();
    let image = d.join(format!("boot/initramfs-{EL_NEW}.img"));
    let (code, next) = next_json(d, &[]);
    let n = &next["next_boot"];
    assert_eq!(n["kernel"]["version"], EL_NEW);
    assert_eq!(n["kernel"]["source"], "grub_saved_entry");
    assert_eq!(n["kernel"]["confidence"], "high");
    assert_eq!(
        n["kernel"]["entry"]["origin"],
        format!("/boot/loader/entries/5f2c7e1d9a8b4c3e8d7f6a5b4c3d2e1f-{EL_NEW}.conf")
    );
    // $kernelopts comes from grubenv, with rd.driver.pre=ip_vs in it.
    assert!(
        n["cmdline"]
            .as_str()
            .unwrap()
            .ends_with("rd.driver.pre=ip_vs")
    );
    assert_eq!(n["initramfs"]["generator"], "dracut");
    assert_eq!(n["initramfs"]["required"], 2);
    // The entry names an image that does not exist.
    assert_eq!(code, 1);
    assert_eq!(next_module(n, "ip_vs")["status"], "not_in_initramfs");
    assert!(
        n["initramfs"]["error"]
            .as_str()
            .unwrap()
            .contains("does not exist")
    );

    // An image with ip_vs and its dependencies but without ip_vs_wrr (force_drivers).
    let base = [
        "kernel/net/netfilter/ipvs/ip_vs.ko.xz",
        "kernel/net/netfilter/nf_conntrack.ko.xz",
        "kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko.xz",
        "kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko.xz",
        "kernel/lib/libcrc32c.ko.xz",
    ];
    std::fs::write(&image, initramfs(EL_NEW, &base, Compress::Xz)).unwrap();
    let (code, next) = next_json(d, &[]);
    let n = &next["next_boot"];
    assert_eq!(code, 1);
    assert_eq!(next_module(n, "ip_vs")["status"], "ok", "{n:#}");
    assert_eq!(next_module(n, "ip_vs")["initramfs"]["in_image"], true);
    let wrr = next_module(n, "ip_vs_wrr");
    assert_eq!(wrr["status"], "not_in_initramfs");
    assert_eq!(
        wrr["initramfs"]["missing"],
        serde_json::json!(["ip_vs_wrr"])
    );
    assert_eq!(wrr["initramfs"]["required_by"][0]["key"], "force_drivers");
    let parts: Vec<&str> = n["initramfs"]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["format"].as_str().unwrap())
        .collect();
    assert_eq!(parts, vec!["cpio", "xz"]);
    assert_eq!(
        n["initramfs"]["kernels_in_image"],
        serde_json::json!([EL_NEW])
    );

    // An image built for the old kernel only: its modules do not count for the new one.
    let mut all = base.to_vec();
    all.push("kernel/net/netfilter/ipvs/ip_vs_wrr.ko.xz");
    std::fs::write(&image, initramfs(EL_OLD, &all, Compress::Gzip)).unwrap();
    let (_, next) = next_json(d, &[]);
    let detail = next_module(&next["next_boot"], "ip_vs")["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        detail.contains(&format!("modules of {EL_OLD} only")),
        "{detail}"
    );

    // Rebuilt (dracut -f): everything is in place.
    std::fs::write(&image, initramfs(EL_NEW, &all, Compress::Zstd)).unwrap();
    let (code, next) = next_json(d, &[]);
    assert_eq!(
        next["next_boot"]["summary"]["problems"], 0,
        "{:#}",
        next["next_boot"]
    );
    assert_eq!(code, 0);

    // A corrupt image is reported, not guessed about.
    let mut bytes = std::fs::read(&image).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 40);
    std::fs::write(&image, bytes).unwrap();
    let (_, next) = next_json(d, &[]);
    assert!(
        next["next_boot"]["initramfs"]["error"]
            .as_str()
            .unwrap()
            .contains("zstd"),
        "{:#}",
        next["next_boot"]["initramfs"]
    );
}

#[test]
fn initramfs_tools_image_missing_a_required_module() {
    let dir = fixture_copy("check/upgrade");
    let d = dir.path();
    write(d, "/etc/initramfs-tools/modules", "# early\nbr_netfilter\n");
    let image = d.join(format!("boot/initrd.img-{K58}"));
    let without = [
        "kernel/net/bridge/bridge.ko",
        "kernel/net/802/stp.ko",
        "kernel/net/llc/llc.ko",
    ];
    std::fs::write(&image, initramfs(K58, &without, Compress::Zstd)).unwrap();
    let (code, next) = next_json(d, &[]);
    assert_eq!(code, 1);
    let br = next_module(&next["next_boot"], "br_netfilter");
    assert_eq!(br["status"], "not_in_initramfs");
    assert_eq!(
        br["initramfs"]["missing"],
        serde_json::json!(["br_netfilter"])
    );
    assert_eq!(
        br["initramfs"]["required_by"][0]["path"],
        "/etc/initramfs-tools/modules"
    );
    assert!(
        br["detail"]
            .as_str()
            .unwrap()
            .contains("update-initramfs -u -k")
    );
    let mut with = without.to_vec();
    with.push("kernel/net/bridge/br_netfilter.ko");
    std::fs::write(&image, initramfs(K58, &with, Compress::Gzip)).unwrap();
    let (_, next) = next_json(d, &[]);
    let br = next_module(&next["next_boot"], "br_netfilter");
    assert_eq!(br["status"], "ok");
    assert_eq!(br["initramfs"]["in_image"], true);
}

#[test]
fn a_boot_entry_command_line_that_newly_blacklists_a_loaded_module() {
    let dir = fixture_copy("check/upgrade");
    let d = dir.path();
    let cfg = std::fs::read_to_string(d.join("boot/grub/grub.cfg")).unwrap();
    let cfg = cfg.replace(
        &format!("linux\t/boot/vmlinuz-{K58} root=UUID=6f1c2a3e-58f4-4b7e-9a51-0c2d7e8f9a10 ro console=tty0 console=ttyS0,115200 quiet\n\t\techo"),
        &format!("linux\t/boot/vmlinuz-{K58} root=UUID=6f1c2a3e-58f4-4b7e-9a51-0c2d7e8f9a10 ro quiet module_blacklist=veth,br_netfilter\n\t\techo"),
    );
    assert!(
        cfg.contains("module_blacklist=veth"),
        "the test edits the advanced 58 entry"
    );
    std::fs::write(d.join("boot/grub/grub.cfg"), cfg).unwrap();
    let (_, next) = next_json(d, &[]);
    let n = &next["next_boot"];
    let br = next_module(n, "br_netfilter");
    assert_eq!(br["status"], "blacklisted");
    assert_eq!(br["newly_blocked"], true);
    assert_eq!(br["blocked_by"][0]["rule"], "module_blacklist=br_netfilter");
    assert!(
        br["blocked_by"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("/boot/grub/grub.cfg:38"),
        "{br}"
    );
    let veth = next_module(n, "veth");
    assert_eq!(
        veth["status"], "blacklisted",
        "loaded now, blocked on that boot"
    );
    assert!(veth["detail"].as_str().unwrap().starts_with("loaded now"));
}
