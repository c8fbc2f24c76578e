//! Tests of the whole check on trees built in temporary directories.
use std::os::unix::fs::symlink;
use std::path::Path;

use super::*;

const KVER: &str = "6.1.0-13-cloud-amd64";

/// Writes `text` at `path` under the test root `root`, creating directories (shared by the
/// check modules' tests).
pub(super) fn write(root: &Path, path: &str, text: &str) {
    let p = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A systemd root with a small module tree; /proc/modules lists `loaded`.
fn host(loaded: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "/lib/systemd/systemd", "");
    std::fs::create_dir_all(d.join("sbin")).unwrap();
    symlink("/lib/systemd/systemd", d.join("sbin/init")).unwrap();
    let m = format!("/lib/modules/{KVER}");
    write(
        d,
        &format!("{m}/modules.dep"),
        "kernel/net/ipv4/netfilter/iptable_nat.ko: kernel/net/netfilter/nf_nat.ko kernel/net/netfilter/nf_conntrack.ko\n\
         kernel/net/ipv4/netfilter/iptable_filter.ko: kernel/net/ipv4/netfilter/ip_tables.ko\n\
         kernel/net/ipv4/netfilter/ip_tables.ko:\n\
         kernel/net/netfilter/nf_nat.ko: kernel/net/netfilter/nf_conntrack.ko\n\
         kernel/net/netfilter/nf_conntrack.ko:\n\
         kernel/net/bridge/br_netfilter.ko:\n\
         kernel/fs/overlayfs/overlay.ko:\n\
         kernel/drivers/block/floppy.ko:\n\
         kernel/drivers/usb/storage/usb-storage.ko:\n\
         kernel/drivers/net/dummy.ko:\n",
    );
    write(
        d,
        &format!("{m}/modules.alias"),
        "alias fs-overlay overlay\nalias usb:v*p*d*dc*dsc*dp*ic08isc06ip50in* usb_storage\n",
    );
    write(
        d,
        &format!("{m}/modules.builtin"),
        "kernel/fs/ext4/ext4.ko\n",
    );
    write(d, "/proc/sys/kernel/osrelease", &format!("{KVER}\n"));
    let lines: String = loaded
        .iter()
        .map(|name| {
            let users: &[&str] = match *name {
                "nf_conntrack" => &["nf_nat", "iptable_nat"],
                "nf_nat" => &["iptable_nat"],
                "ip_tables" => &["iptable_filter"],
                _ => &[],
            };
            let used_by: String = users
                .iter()
                .filter(|u| loaded.contains(u))
                .map(|u| format!("{u},"))
                .collect();
            let used_by = if used_by.is_empty() {
                "-".to_string()
            } else {
                used_by
            };
            format!("{name} 16384 0 {used_by} Live 0x0000000000000000\n")
        })
        .collect();
    write(d, "/proc/modules", &lines);
    dir
}

fn check(d: &Path, containers: Vec<ContainerExpectation>) -> Report {
    let inputs = ContainerInputs {
        list: containers,
        source: "test".into(),
        ..Default::default()
    };
    gather(&RootFs::new(d), None, inputs).unwrap()
}

fn statuses(r: &Report) -> Vec<(String, Status)> {
    r.modules
        .iter()
        .map(|m| (m.module.clone(), m.status))
        .collect()
}

fn module<'a>(r: &'a Report, name: &str) -> &'a ModuleReport {
    r.modules
        .iter()
        .find(|m| m.module == name)
        .unwrap_or_else(|| panic!("{name} not in {:?}", statuses(r)))
}

#[test]
fn the_seed_etc_modules_on_systemd() {
    let dir = host(&[
        "iptable_nat",
        "nf_nat",
        "nf_conntrack",
        "iptable_filter",
        "ip_tables",
    ]);
    write(
        dir.path(),
        "/etc/modules",
        "# /etc/modules\niptable_nat\niptable_filter\n",
    );
    let r = check(dir.path(), vec![]);
    assert_eq!(
        statuses(&r),
        vec![
            ("iptable_filter".into(), Status::WillNotLoadAtBoot),
            ("iptable_nat".into(), Status::WillNotLoadAtBoot)
        ]
    );
    assert_eq!(r.summary.problems, 2);
    assert!(!r.etc_modules.reader.read_at_boot);
    let m = module(&r, "iptable_nat");
    assert_eq!(m.loaded, Some(true));
    assert!(m.fixable);
    assert!(
        m.detail
            .starts_with("loaded now, but only in /etc/modules:2, which nothing reads at boot"),
        "{}",
        m.detail
    );
    assert_eq!(r.kernel.chosen_by, KernelChoice::Running);

    // The Debian link makes the same file count: everything is fine then.
    std::fs::create_dir_all(dir.path().join("etc/modules-load.d")).unwrap();
    symlink(
        "../modules",
        dir.path().join("etc/modules-load.d/modules.conf"),
    )
    .unwrap();
    let r = check(dir.path(), vec![]);
    assert_eq!(
        statuses(&r),
        vec![
            ("iptable_filter".into(), Status::Ok),
            ("iptable_nat".into(), Status::Ok)
        ]
    );
    assert_eq!(r.summary.problems, 0);
}

#[test]
fn every_status() {
    let dir = host(&["overlay", "floppy", "dummy", "nf_conntrack"]);
    let d = dir.path();
    write(
        d,
        "/etc/modules-load.d/k8s.conf",
        "overlay\nbr_netfilter\nnf_conntrack_ipv4\next4\nfloppy\n",
    );
    write(d, "/etc/modprobe.d/blacklist.conf", "blacklist floppy\n");
    let r = check(d, vec![]);
    assert_eq!(
        statuses(&r),
        vec![
            ("nf_conntrack_ipv4".into(), Status::NotAvailable),
            ("floppy".into(), Status::Blacklisted),
            ("br_netfilter".into(), Status::Missing),
            ("ext4".into(), Status::Ok),
            ("overlay".into(), Status::Ok),
            ("dummy".into(), Status::LoadedUnconfigured),
            ("nf_conntrack".into(), Status::LoadedUnconfigured),
        ]
    );
    assert!(module(&r, "ext4").builtin);
    assert_eq!(
        module(&r, "floppy").blocked_by[0].path,
        "/etc/modprobe.d/blacklist.conf"
    );
    assert!(
        !module(&r, "br_netfilter").fixable,
        "already configured: nothing to add"
    );
    assert_eq!(r.summary.problems, 3);
    assert_eq!(r.summary.loaded_unconfigured, 2);
    assert_eq!(
        r.summary.sentence(),
        "3 problems (1 not_available, 1 blacklisted, 1 missing); 2 ok, 2 loaded_unconfigured"
    );
}

#[test]
fn dependencies_of_wanted_or_loaded_modules_are_not_unconfigured() {
    let dir = host(&[
        "iptable_nat",
        "nf_nat",
        "nf_conntrack",
        "iptable_filter",
        "ip_tables",
    ]);
    write(dir.path(), "/etc/modules-load.d/nat.conf", "iptable_nat\n");
    let r = check(dir.path(), vec![]);
    assert_eq!(
        statuses(&r),
        vec![
            ("iptable_nat".into(), Status::Ok),
            ("iptable_filter".into(), Status::LoadedUnconfigured)
        ]
    );
}

#[test]
fn aliases_install_rules_and_the_command_line() {
    let dir = host(&["overlay"]);
    let d = dir.path();
    write(
        d,
        "/usr/lib/modules-load.d/fs.conf",
        "fs-overlay\nusb-storage\n",
    );
    write(
        d,
        "/etc/modprobe.d/usb.conf",
        "install usb-storage /bin/true\n",
    );
    write(
        d,
        "/proc/cmdline",
        "ro modules-load=dummy module_blacklist=br_netfilter rd.modules-load=br_netfilter\n",
    );
    let r = check(d, vec![]);
    assert_eq!(
        statuses(&r),
        vec![
            ("br_netfilter".into(), Status::Blacklisted),
            ("usb_storage".into(), Status::Blacklisted),
            ("dummy".into(), Status::Missing),
            ("fs_overlay".into(), Status::Ok),
        ]
    );
    assert_eq!(module(&r, "fs_overlay").resolved, vec!["overlay"]);
    assert_eq!(
        module(&r, "usb_storage").blocked_by[0].rule,
        "install usb-storage /bin/true"
    );
    assert_eq!(
        module(&r, "dummy").sources[0].key.as_deref(),
        Some("modules-load")
    );
}

#[test]
fn containers_expectations_join_the_check() {
    let dir = host(&["overlay"]);
    let web = ContainerExpectation {
        container_id: "3f2a9c1b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8".into(),
        runtime: "docker".into(),
        name: Some("dind".into()),
        modules: vec!["iptable-nat".into(), "overlay".into()],
        declared_in: Some("KERNEL_MODULES".into()),
    };
    let r = check(dir.path(), vec![web]);
    assert_eq!(
        statuses(&r),
        vec![
            ("iptable_nat".into(), Status::Missing),
            ("overlay".into(), Status::Ok)
        ]
    );
    let nat = module(&r, "iptable_nat");
    assert_eq!(nat.containers[0].name.as_deref(), Some("dind"));
    assert!(nat.fixable);
    assert!(
        nat.detail
            .contains("expected by container dind (docker 3f2a9c1b4d5e)"),
        "{}",
        nat.detail
    );
    let overlay = module(&r, "overlay");
    assert!(overlay.fixable, "loaded now but nothing loads it at boot");
    assert!(
        overlay.detail.contains("not configured to load at boot"),
        "{}",
        overlay.detail
    );
}

#[test]
fn offline_root_without_proc() {
    let dir = host(&[]);
    let d = dir.path();
    std::fs::remove_dir_all(d.join("proc")).unwrap();
    std::fs::create_dir_all(d.join("usr/lib/modules/5.10.0-old")).unwrap();
    write(d, "/etc/modules-load.d/a.conf", "overlay\nnosuch\n");
    let r = check(d, vec![]);
    assert_eq!(r.kernel.chosen_by, KernelChoice::NewestInstalled);
    assert_eq!(r.kernel.version.as_deref(), Some(KVER));
    assert_eq!(r.loaded.source, report::LoadedSource::Unknown);
    assert!(!r.kernel_cmdline);
    assert_eq!(
        statuses(&r),
        vec![
            ("nosuch".into(), Status::NotAvailable),
            ("overlay".into(), Status::Ok)
        ]
    );
    assert_eq!(module(&r, "overlay").loaded, None);

    // A kernel without a module tree: nothing loadable is available.
    let r = gather(
        &RootFs::new(d),
        Some("5.10.0-old"),
        ContainerInputs::default(),
    )
    .unwrap();
    assert!(
        r.kernel
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("depmod 5.10.0-old")
    );
    assert_eq!(module(&r, "overlay").status, Status::NotAvailable);
}

#[test]
fn a_kernel_without_module_support() {
    let dir = host(&[]);
    let d = dir.path();
    std::fs::remove_file(d.join("proc/modules")).unwrap();
    std::fs::create_dir_all(d.join("proc/self")).unwrap();
    std::fs::create_dir_all(d.join("sys/module/printk/parameters")).unwrap();
    write(d, "/etc/modules-load.d/a.conf", "printk\nbr_netfilter\n");
    let r = gather(
        &RootFs::new(d),
        Some("9.9.9-none"),
        ContainerInputs::default(),
    )
    .unwrap();
    assert_eq!(r.loaded.source, report::LoadedSource::NoModuleSupport);
    assert_eq!(
        statuses(&r),
        vec![
            ("br_netfilter".into(), Status::NotAvailable),
            ("printk".into(), Status::Ok)
        ]
    );
    assert!(
        module(&r, "br_netfilter")
            .detail
            .contains("no loadable-module support")
    );
}

#[test]
fn fix_plan_keeps_a_shadowed_vendor_file_and_writes_atomically() {
    let dir = host(&["iptable_nat", "nf_nat", "nf_conntrack"]);
    let d = dir.path();
    write(d, "/etc/modules", "iptable_nat\n");
    write(d, "/usr/lib/modules-load.d/kmodmon.conf", "overlay");
    let root = RootFs::new(d);
    let r = check(d, vec![]);
    let plan = fix::plan(&root, &r).unwrap().unwrap();
    assert_eq!(plan.added, vec!["iptable_nat"]);
    assert_eq!(plan.old, "overlay");
    assert!(
        plan.new
            .starts_with("overlay\n# Written by `kmodmon check --fix`")
    );
    assert!(plan.new.ends_with("\niptable_nat\n"));
    let diff = plan.diff();
    assert!(
        diff.contains("--- a/etc/modules-load.d/kmodmon.conf"),
        "{diff}"
    );
    assert!(diff.contains("+iptable_nat"), "{diff}");
    plan.write(&root).unwrap();
    let written = std::fs::read_to_string(d.join("etc/modules-load.d/kmodmon.conf")).unwrap();
    assert_eq!(written, plan.new);
    let after = check(d, vec![]);
    assert_eq!(module(&after, "iptable_nat").status, Status::Ok);
    assert_eq!(
        module(&after, "overlay").status,
        Status::Missing,
        "the vendor file's line is kept"
    );
    assert!(fix::plan(&root, &after).unwrap().is_none());
}

#[test]
fn fix_refuses_a_masked_file() {
    let dir = host(&[]);
    let d = dir.path();
    write(d, "/etc/modules", "overlay\n");
    std::fs::create_dir_all(d.join("etc/modules-load.d")).unwrap();
    symlink("/dev/null", d.join("etc/modules-load.d/kmodmon.conf")).unwrap();
    let r = check(d, vec![]);
    let err = fix::plan(&RootFs::new(d), &r).unwrap_err().to_string();
    assert!(err.contains("masks kmodmon.conf"), "{err}");
}

#[test]
fn hostile_file_names_and_contents_are_escaped() {
    let dir = host(&["overlay"]);
    let d = dir.path();
    write(
        d,
        "/etc/modules-load.d/evil\x1b[2J.conf",
        "overlay\nbad\x1b]0;title\x07\n",
    );
    let r = check(d, vec![]);
    let human = r.human();
    assert!(!human.contains('\x1b'), "{human}");
    assert!(!r.to_json().contains("\\u001b"), "{}", r.to_json());
    assert!(
        human.contains("/etc/modules-load.d/evil\\x1b[2J.conf"),
        "{human}"
    );
    assert_eq!(module(&r, "overlay").status, Status::Ok);
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
}
