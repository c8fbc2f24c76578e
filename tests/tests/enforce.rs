//! `kmodmon policy check` and `kmodmon enforce on|status|off` on this host. Real denials need a
//! kernel with modules: see tests/vm/enforce.sh.
use std::{path::Path, process::Command};

use kmodmon_tests::{kmodmon_bin, require_root};

const GOOD: &str = r#"mode = "enforce"

[unselected]
allow = ["overlay"]

[[rule]]
name = "lb"
container_name = "lb-*"
allow = ["ip_vs"]
trust_kernel_modules = true
"#;

const PINS: &str = "/sys/fs/bpf/kmodmon";

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(kmodmon_bin())
        .args(args)
        .output()
        .expect("run kmodmon");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn policy_check_locates_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, GOOD).unwrap();
    let (rc, out, err) = run(&["policy", "check", good.to_str().unwrap()]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("ok (mode enforce, 1 rule)"), "{out}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "mode = \"enforce\"\n[[rule]]\nname = \"x\"\nruntime = \"runc\"\nallow = [\"ip_vs\"]\nbogus = 1\n",
    )
    .unwrap();
    let (rc, _, err) = run(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(rc, 1);
    assert!(
        err.contains(&format!("{}:6:1: unknown field `bogus`", bad.display())),
        "{err}"
    );

    let names = dir.path().join("names.toml");
    std::fs::write(
        &names,
        "mode = \"audit\"\n[unselected]\nallow = [\"fine\", \"not/a/module\"]\n",
    )
    .unwrap();
    let (rc, _, err) = run(&["policy", "check", names.to_str().unwrap()]);
    assert_eq!(rc, 1);
    assert!(err.contains(":3:18: allow: module name"), "{err}");
}

fn pinned_links() -> usize {
    use kmodmon_common::names::program;
    [
        program::KERNEL_MODULE_REQUEST,
        program::KERNEL_READ_FILE,
        program::KERNEL_POST_LOAD_DATA,
        program::KERNEL_LOAD_DATA,
        program::KERNEL_POST_READ_FILE,
        program::KERNFS_INIT_SECURITY,
    ]
    .iter()
    .filter(|p| Path::new(PINS).join("links").join(p).exists())
    .count()
}

/// N in "pinned links: X/N": the programs this kernel takes (3, up to 6 with the naming hooks
/// kernel_post_load_data, kernel_post_read_file and kernfs_init_security).
fn expected_links(status: &str) -> usize {
    status
        .lines()
        .find_map(|l| l.strip_prefix("pinned links: "))
        .and_then(|r| r.split_once('/'))
        .and_then(|(_, n)| n.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no 'pinned links: X/N' in {status}"))
}

fn loaded_programs(status: &str) -> Option<usize> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("kmodmon LSM programs loaded in the kernel: "))
        .and_then(|n| n.trim().parse().ok())
}

/// One test: the pins are machine-wide, so these steps must not interleave.
#[test]
fn enforce_on_status_adopt_off() {
    if !require_root("enforce_on_status_adopt_off") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, GOOD).unwrap();
    let policy = policy.to_str().unwrap();
    let _ = run(&["enforce", "off"]);

    let modules = kmodmon::host::moddb::live::module_support();
    if !modules {
        // Honest refusal: the hooks exist but can never fire for a module here.
        let (rc, out, err) = run(&["enforce", "on", "--policy", policy]);
        assert_eq!(rc, 2, "{out}{err}");
        assert!(err.contains("no module support"), "{err}");
        assert!(err.contains("nothing to hook"), "{err}");
        assert!(err.contains("nothing was installed"), "{err}");
        assert_eq!(pinned_links(), 0);
        let (_, status, _) = run(&["enforce", "status"]);
        assert!(status.contains("module support: no"), "{status}");
        assert!(status.contains("pinned links: 0/"), "{status}");
        assert!(matches!(expected_links(&status), 3..=6), "{status}");
    }

    // Installing anyway (--force) exercises loading, pinning and adoption.
    let (rc, out, err) = run(&["enforce", "on", "--policy", policy, "--force"]);
    if rc != 0 {
        // Some hosts refuse LSM programs outright; then nothing may be left behind.
        assert!(err.contains("loading the LSM programs"), "{out}{err}");
        assert!(
            !Path::new(PINS).exists(),
            "a failed install left pins behind"
        );
        eprintln!(
            "\n!!! enforce_on_status_adopt_off: this kernel refused the LSM programs, pinning \
             untested here: {err} !!!\n"
        );
        return;
    }
    assert!(out.contains("installed and pinned"), "{out}");
    let (_, status, _) = run(&["enforce", "status"]);
    let expected = expected_links(&status);
    assert_eq!(pinned_links(), expected);
    assert!(status.contains("mode: enforce"), "{status}");
    assert_eq!(loaded_programs(&status), Some(expected), "{status}");

    // A second start adopts: nothing is loaded twice.
    let (rc, out, err) = run(&["enforce", "on", "--policy", policy, "--force"]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("adopted"), "{out}");
    let (_, status, _) = run(&["enforce", "status"]);
    assert_eq!(loaded_programs(&status), Some(expected), "{status}");

    let (rc, out, err) = run(&["enforce", "off"]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("enforcement off"), "{out}");
    assert_eq!(pinned_links(), 0);
    assert!(!Path::new(PINS).exists());
    // The kernel frees released programs asynchronously.
    let mut status = String::new();
    for _ in 0..50 {
        status = run(&["enforce", "status"]).1;
        if loaded_programs(&status) == Some(0) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(loaded_programs(&status), Some(0), "{status}");
}
