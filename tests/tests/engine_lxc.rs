//! LXC (Debian's lxc 5.0) on this machine's kernel: a container from the busybox template under
//! a private lxcpath (`engines::Lxc`), run with `lxc-execute`, no network. Checked: attribution
//! (cgroup `/lxc.payload.<name>`, runtime `lxc`, the name confirmed by LXC's own state), the
//! KERNEL_MODULES declaration (`lxc.environment`), and LXC's seccomp policy (common.seccomp:
//! the module syscalls get EPERM) on and off.
use std::time::Duration;

use kmodmon_tests::{
    engines::{Lxc, assert_ran, assert_refused, attempt, expectation, expected_modules},
    require_root,
    tail::Tail,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_lxc(e: &Value, name: &str) {
    let c = &e["container"];
    assert_eq!(c["runtime"], "lxc", "{e:#}");
    assert_eq!(c["id"], name, "{e:#}");
    assert!(c["name"].is_null() || c["name"] == name, "{e:#}");
    assert_eq!(e["cgroup_path"], format!("/lxc.payload.{name}"), "{e:#}");
}

#[test]
fn lxc_containers_are_attributed_and_seccomp_refusals_reported() {
    if !require_root("lxc_containers_are_attributed_and_seccomp_refusals_reported") {
        return;
    }
    kmodmon_tests::kmodmon_bin();
    let pid = std::process::id();
    let lxc = Lxc::create(&format!("kmodmon-e2e-lxc-{pid}"));
    let undeclared = format!("kml{pid}_undeclared");
    let declared = format!("kml{pid}_declared");
    let unconfined = format!("kml{pid}_unconfined");
    let mut args: Vec<String> = vec!["--container".into(), lxc.name.clone()];
    args.extend(lxc.state_dir_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut tail = Tail::start(&args);

    let env = format!("KERNEL_MODULES=ip_vs,{declared}");
    let script = format!("rmmod {undeclared}; rmmod {declared}; sleep 1");
    let on = lxc.execute(true, &[&env], &["/bin/sh", "-c", &script]);
    assert!(
        said(&on).contains("Operation not permitted"),
        "{}",
        said(&on)
    );
    let events = tail.collect_until(WAIT, |e| {
        attempt(e, &undeclared).is_some()
            && attempt(e, &declared).is_some()
            && expectation(e, &lxc.name).is_some()
    });
    // The same container, run again without LXC's seccomp policy.
    let script_off = format!("rmmod {unconfined}; sleep 1");
    let off = lxc.execute(false, &[&env], &["/bin/sh", "-c", &script_off]);
    assert!(
        !said(&off).contains("Operation not permitted"),
        "{}",
        said(&off)
    );
    let more = tail.collect_until(WAIT, |e| attempt(e, &unconfined).is_some());
    drop(tail);
    let events: Vec<Value> = events.into_iter().chain(more).collect();
    let get =
        |m: &str| attempt(&events, m).unwrap_or_else(|| panic!("no attempt for {m}: {events:#?}"));
    for m in [&undeclared, &declared] {
        let e = get(m);
        assert_refused(e);
        assert_lxc(e, &lxc.name);
    }
    assert_eq!(get(&undeclared)["verdict"], "unexpected");
    assert_eq!(
        get(&declared)["verdict"],
        "expected",
        "the declaration was read"
    );
    let e = get(&unconfined);
    assert_ran(e);
    assert_lxc(e, &lxc.name);
    let x = expectation(&events, &lxc.name).expect("expectation");
    assert!(expected_modules(x).contains(&declared), "{x:#}");
}
