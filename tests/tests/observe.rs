//! Loads on behalf of a container, and cgroup v1, end to end on this machine: real `kmodmon
//! tail --json`, real runc and crun containers.
//!
//! - An OCI prestart hook runs on the host, as a child of `runc run` / `crun run`, in the
//!   runtime's cgroup (the host's). Here it does what isulad-hooks does: it reads the
//!   container's state (id, pid, bundle) on its stdin, reads `KERNEL_MODULES` from the
//!   bundle's config.json and loads each module (busybox insmod: this kernel has no module
//!   support, so every attempt fails with ENOSYS and is still reported). kmodmon must give
//!   those attempts `on_behalf_of` the container and judge them against its declaration.
//! - This machine is hybrid (v1 controllers, cgroup2 at /sys/fs/cgroup/unified). crun refuses
//!   a hybrid host whose cgroup2 has a controller (hugetlb here), so it runs in a private
//!   mount namespace where the cgroup2 mount is hidden: it then sees a v1-only host and
//!   places the container in the v1 hierarchies only, its cgroup2 staying the root — exactly
//!   the case only the v1 hierarchy can attribute.
use std::{path::Path, process::Command, time::Duration};

use kmodmon_tests::{
    container::{Bundle, random_id},
    have, require_root,
    tail::Tail,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// One kmodmon and one container at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ready(test: &str, runtime: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    if !require_root(test) {
        return None;
    }
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    kmodmon_tests::kmodmon_bin();
    assert!(
        have(runtime),
        "{runtime} is not installed: `cargo xtask setup` installs it"
    );
    Some(guard)
}

/// The isulad-hooks way: the state on stdin names the bundle, whose config declares the
/// modules; each is loaded from `mods`, then one the container did not declare.
fn hook_script(dir: &Path) -> std::path::PathBuf {
    let mods = dir.join("mods");
    std::fs::create_dir_all(&mods).unwrap();
    for m in ["ip_vs", "kmodmon_other"] {
        std::fs::write(mods.join(format!("{m}.ko")), b"\x7fELF not a module").unwrap();
    }
    let hook = dir.join("load-declared.sh");
    let script = format!(
        r#"#!/bin/sh
state=$(cat)
bundle=$(printf '%s' "$state" | sed -n 's/.*"bundle": *"\([^"]*\)".*/\1/p')
mods=$(grep -o 'KERNEL_MODULES=[^"]*' "$bundle/config.json" | head -n 1 | cut -d= -f2 | tr ',' ' ')
for m in $mods kmodmon_other; do
    /bin/busybox insmod "{mods}/$m.ko" 2>/dev/null
done
exit 0
"#,
        mods = mods.display()
    );
    std::fs::write(&hook, script).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    hook
}

fn with_prestart_hook(bundle: &Bundle, hook: &Path) {
    let cfg_path = bundle.path().join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["hooks"] = serde_json::json!({"prestart": [{"path": hook}]});
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
}

/// `crun run`: in a private mount namespace without the cgroup2 mount when this host is
/// hybrid with controllers in cgroup2, which crun refuses (see the module docs).
fn crun_run(bundle: &Bundle) -> std::process::Output {
    let hide_unified = Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists()
        && std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
            .is_ok_and(|c| !c.trim().is_empty());
    let run = format!(
        "exec crun run --bundle '{}' '{}'",
        bundle.path().display(),
        bundle.name
    );
    let script = if hide_unified {
        format!("umount /sys/fs/cgroup/unified && {run}")
    } else {
        run
    };
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .expect("unshare crun run");
    let _ = Command::new("crun")
        .args(["delete", "-f", &bundle.name])
        .output();
    out
}

fn attempt<'a>(events: &'a [Value], module: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["kind"] == "load_attempt" && e["module"] == module)
        .unwrap_or_else(|| panic!("no load_attempt for {module}: {events:#?}"))
}

fn both_attempts(events: &[Value]) -> bool {
    ["ip_vs", "kmodmon_other"].iter().all(|m| {
        events
            .iter()
            .any(|e| e["kind"] == "load_attempt" && e["module"] == *m)
    })
}

/// The hook's attempts: the host's process, on behalf of the container, judged against its
/// KERNEL_MODULES.
fn check_hook_events(events: &[Value], id: &str, name: &str, runtime: &str) {
    let ip_vs = attempt(events, "ip_vs");
    let other = attempt(events, "kmodmon_other");
    for e in [ip_vs, other] {
        assert_eq!(
            e["container"],
            Value::Null,
            "the hook is a host process: {e}"
        );
        assert_eq!(e["comm"], "busybox", "{e}");
        let b = &e["on_behalf_of"];
        assert_eq!(b["container"]["id"], id, "{e}");
        assert_eq!(b["container"]["runtime"], "isulad", "{e}");
        assert_eq!(b["container"]["name"], name, "the runtime's ID: {e}");
        assert_eq!(b["how"], "runtime_cmdline", "{e}");
        assert_eq!(b["program"], runtime, "{e}");
        // The kernel's comm: the program's, or a memfd's when the runtime re-executed a
        // sealed copy of itself.
        let comm = b["comm"].as_str().unwrap_or_default();
        assert!(comm == runtime || comm.starts_with("memfd:"), "{e}");
        assert_eq!(b["command"], "run", "{e}");
        // busybox <- sh (the hook) <- runc/crun run
        assert_eq!(b["depth"], 2, "{e}");
        assert!(b["bundle"].as_str().is_some(), "{e}");
    }
    assert_eq!(ip_vs["verdict"], "expected", "declared: {ip_vs}");
    assert_eq!(other["verdict"], "unexpected", "{other}");
    assert!(
        other["detail"]
            .as_str()
            .unwrap_or("")
            .contains("KERNEL_MODULES=ip_vs"),
        "{other}"
    );
}

fn hook_test(runtime: &str) {
    let Some(_serial) = ready(&format!("a_{runtime}_prestart_hook"), runtime) else {
        return;
    };
    let id = random_id();
    let name = format!("kmodmon-e2e-hook-{}", &id[..8]);
    let dir = tempfile::tempdir().unwrap();
    let hook = hook_script(dir.path());
    let bundle = Bundle::new(
        &name,
        &format!("/isulad/{id}"),
        &["KERNEL_MODULES=ip_vs"],
        &["/bin/sh", "-c", "sleep 0.2"],
        &[],
    );
    with_prestart_hook(&bundle, &hook);
    // --container selects the hook's events too (by the container they are for).
    let mut tail = Tail::start(&["--container", &id[..12], "--kind", "load_attempt"]);
    let out = if runtime == "crun" {
        crun_run(&bundle)
    } else {
        bundle.run()
    };
    assert!(out.status.success(), "{runtime} run failed: {out:?}");
    let events = tail.collect_until(WAIT, both_attempts);
    drop(tail);
    check_hook_events(&events, &id, &name, runtime);
}

#[test]
fn a_runc_prestart_hook_loads_on_behalf_of_its_container() {
    hook_test("runc");
}

#[test]
fn a_crun_prestart_hook_loads_on_behalf_of_its_container() {
    hook_test("crun");
}

/// The memory hierarchy's id here (the hierarchy kmodmon follows on this host).
fn memory_hierarchy() -> u64 {
    let text = std::fs::read_to_string("/proc/cgroups").unwrap();
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("memory")).then(|| f.next()?.parse().ok())?
        })
        .expect("memory in /proc/cgroups")
}

/// A crun container in cgroup v1 only (its cgroup2 is the root) loads a module: attributed
/// by its v1 cgroup, which the event carries; `kmodmon sources` says which hierarchy and why.
#[test]
fn a_container_in_cgroup_v1_only_is_attributed_on_this_hybrid_host() {
    let Some(_serial) = ready("a_container_in_cgroup_v1_only", "crun") else {
        return;
    };
    let hierarchy = memory_hierarchy();
    let sources = Command::new(kmodmon_tests::kmodmon_bin())
        .arg("sources")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&sources.stdout);
    assert!(sources.status.success(), "{sources:?}");
    assert!(
        text.lines()
            .next()
            .unwrap_or("")
            .contains(&format!("+ cgroup v1 hierarchy {hierarchy} (memory)")),
        "{text}"
    );
    assert!(
        text.contains("cgroups: hybrid (cgroup v1 controllers and cgroup2) layout")
            && text.contains("task->cgroups->subsys[")
            && text.contains("at /sys/fs/cgroup/memory"),
        "{text}"
    );

    let id = random_id();
    let name = format!("kmodmon-e2e-v1-{}", &id[..8]);
    let path = format!("/isulad/{id}");
    let bundle = Bundle::new(
        &name,
        &path,
        &["KERNEL_MODULES=ip_vs"],
        &[
            "/bin/sh",
            "-c",
            "cat /proc/self/cgroup; insmod /lib/modules/ip_vs.ko; insmod /lib/modules/kmodmon_other.ko; sleep 0.2",
        ],
        &[
            ("/lib/modules/ip_vs.ko", b"\x7fELF not a module"),
            ("/lib/modules/kmodmon_other.ko", b"\x7fELF not a module"),
        ],
    );
    let mut tail = Tail::start(&["--container", &id[..12], "--kind", "load_attempt"]);
    let out = crun_run(&bundle);
    assert!(out.status.success(), "crun run failed: {out:?}");
    let cgroups = String::from_utf8_lossy(&out.stdout);
    assert!(
        cgroups.contains(&format!(":memory:{path}")) && cgroups.contains("0::/\n"),
        "the container is in cgroup v1 only: {cgroups}"
    );
    let events = tail.collect_until(WAIT, both_attempts);
    drop(tail);
    for m in ["ip_vs", "kmodmon_other"] {
        let e = attempt(&events, m);
        assert_eq!(e["cgroup_id"], 1, "cgroup2: the root: {e}");
        assert_eq!(e["container"]["id"], id.as_str(), "{e}");
        assert_eq!(e["container"]["runtime"], "isulad", "{e}");
        assert_eq!(
            e["container"]["name"],
            name.as_str(),
            "from crun's state: {e}"
        );
        let v1 = &e["cgroup_v1"];
        assert_eq!(v1["controller"], "memory", "{e}");
        assert_eq!(v1["hierarchy"], hierarchy, "{e}");
        assert_eq!(v1["path"], path.as_str(), "{e}");
        assert!(v1["id"].as_u64().is_some_and(|i| i > 1), "{e}");
        assert!(
            e.get("on_behalf_of").is_none(),
            "its own cgroup decides: {e}"
        );
    }
    assert_eq!(attempt(&events, "ip_vs")["verdict"], "expected");
    assert_eq!(attempt(&events, "kmodmon_other")["verdict"], "unexpected");
}
