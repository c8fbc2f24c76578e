//! A real Prometheus (Debian's package) scraping a running `kmodmon run` on loopback, with the
//! alert rules of deploy/prometheus loaded: the target is up, a kmodmon counter and the check
//! gauges arrive, the rule groups are loaded and evaluate without errors, and an alert whose
//! condition holds (a running container declares a module that is not loaded) is pending.
//! Everything runs on 127.0.0.1 with a temporary storage directory, bounded in time, and is
//! stopped at the end.
use std::{
    ffi::CString,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use kmodmon_tests::{
    container::{Bundle, random_id},
    have,
    http::{free_loopback_addr, get},
    kmodmon_bin, require_root,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `runc delete -f NAME` when dropped (after the container's `runc run` is stopped).
struct RuncDelete(String);

impl Drop for RuncDelete {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "-f", &self.0])
            .output();
    }
}

/// The PrometheusRule manifest's `spec` (a rules file's `groups:`), as JSON, which Prometheus
/// reads as YAML.
fn rules_file(dir: &Path) -> std::path::PathBuf {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/kmodmon-rules.yaml"
    ))
    .expect("read deploy/prometheus/kmodmon-rules.yaml");
    let doc: serde_json::Value =
        serde_yaml_ng::from_str(&manifest).expect("the PrometheusRule is YAML");
    assert_eq!(doc["kind"], "PrometheusRule");
    let path = dir.join("kmodmon-rules.json");
    std::fs::write(&path, doc["spec"].to_string()).expect("write rules");
    path
}

/// Prometheus' query API: the result vector of an instant query.
fn query(prom: &str, q: &str) -> Vec<Value> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = get(prom, &format!("/api/v1/query?query={enc}"));
    if status != 200 {
        return Vec::new();
    }
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn prometheus_scrapes_kmodmon_and_evaluates_the_rules() {
    if !require_root("prometheus_scrapes_kmodmon_and_evaluates_the_rules") {
        return;
    }
    assert!(
        have("prometheus") && have("runc"),
        "prometheus and runc are needed: `cargo xtask setup` installs them"
    );
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_loopback_addr();
    let config = dir.path().join("kmodmon.toml");
    std::fs::write(
        &config,
        format!("[metrics]\nlisten = \"{metrics}\"\n\n[check]\ninterval = \"2s\"\n"),
    )
    .unwrap();
    let mut child = Command::new(kmodmon_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kmodmon run");
    let stderr = child.stderr.take().expect("stderr");
    let kmodmon = Stopped(child);
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("stderr");
        let ready = line.contains("started; attached");
        seen.push(line);
        if ready {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("started; attached")),
        "kmodmon run did not start: {seen:#?}"
    );
    std::thread::spawn(move || for _ in lines {});

    // A container that declares a module this host does not have loaded, running while the
    // check runs: kmodmon_check_container_expected_not_loaded, and its alert.
    let id = random_id();
    let bundle = Bundle::new(
        &format!("kmodmon-prom-{}", &id[..12]),
        &format!("/docker/{id}"),
        &["KERNEL_MODULES=kmodmon_prom_e2e"],
        &["/bin/sleep", "120"],
        &[],
    );
    let container = Stopped(
        Command::new("runc")
            .args(["run", "--bundle"])
            .arg(bundle.path())
            .arg(&bundle.name)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("runc run"),
    );
    // Dropped before `container`: kills the container (its sleep ignores SIGTERM as pid 1).
    let delete = RuncDelete(bundle.name.clone());
    // One module syscall of ours: a counter with our module's name on it.
    let name = CString::new("kmodmon_prom_e2e").unwrap();
    // SAFETY: a valid NUL-terminated name; fails (ENOSYS/ENOENT) without side effects.
    unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), 0) };

    let prom_addr = free_loopback_addr();
    let rules = rules_file(dir.path());
    let prom_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [rules],
            "scrape_configs": [{
                "job_name": "kmodmon",
                "static_configs": [{"targets": [metrics]}]
            }]
        })
        .to_string(),
    )
    .unwrap();
    let prom_log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let prometheus = Stopped(
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(prom_log)
            .spawn()
            .expect("spawn prometheus"),
    );
    let log = || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();

    wait_for("Prometheus to be ready", || {
        (get(&prom_addr, "/-/ready").0 == 200).then_some(())
    });
    // The target, scraped.
    let up = wait_for("up{job=\"kmodmon\"} == 1", || {
        query(&prom_addr, "up{job=\"kmodmon\"}")
            .into_iter()
            .find(|s| s["value"][1] == "1")
    });
    assert_eq!(up["metric"]["instance"], metrics.as_str(), "{up}");
    // A kmodmon counter: our unload attempt.
    let events = wait_for("kmodmon_events_total for the unload attempt", || {
        query(
            &prom_addr,
            "kmodmon_events_total{job=\"kmodmon\",kind=\"unload_attempt\",verdict=\"host\"}",
        )
        .into_iter()
        .next()
    });
    let n: f64 = events["value"][1].as_str().unwrap_or("0").parse().unwrap();
    assert!(n >= 1.0, "{events}");
    // The check gauges (first check 5 s after start, then every 2 s).
    let stamp = wait_for("kmodmon_check_timestamp_seconds", || {
        query(&prom_addr, "kmodmon_check_timestamp_seconds")
            .into_iter()
            .next()
    });
    let t: f64 = stamp["value"][1].as_str().unwrap_or("0").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - t).abs() < 120.0, "check timestamp {t}, now {now}");
    let missing = wait_for("the container's module in the check gauges", || {
        query(
            &prom_addr,
            "kmodmon_check_container_expected_not_loaded{module=\"kmodmon_prom_e2e\"} == 1",
        )
        .into_iter()
        .next()
    });
    assert_eq!(missing["metric"]["container_id"], id.as_str(), "{missing}");

    // The rules: every group of the manifest loaded, evaluated, healthy; the container alert
    // pending (its `for:` is 15 minutes).
    let want: Vec<String> = {
        let text = std::fs::read_to_string(&rules).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        v["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap().to_string())
            .collect()
    };
    let groups = wait_for(
        "every rule group evaluated, the container alert pending, KmodmonDown and KmodmonAbsent inactive",
        || {
            let (status, body) = get(&prom_addr, "/api/v1/rules");
            if status != 200 {
                return None;
            }
            let v: Value = serde_json::from_str(&body).ok()?;
            let groups = v["data"]["groups"].as_array()?.clone();
            let evaluated = groups.len() == want.len()
                && groups.iter().all(|g| {
                    g["rules"].as_array().is_some_and(|r| {
                        r.iter().all(|r| {
                            r["lastEvaluation"]
                                .as_str()
                                .is_some_and(|t| !t.starts_with("0001-"))
                        })
                    })
                });
            let rules: Vec<Value> = groups
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let pending = rules.iter().any(|r| {
                r["name"] == "KmodmonContainerModuleNotLoaded"
                    && r["alerts"].as_array().is_some_and(|a| {
                        a.iter().any(|a| {
                            a["state"] == "pending" && a["labels"]["module"] == "kmodmon_prom_e2e"
                        })
                    })
            });
            // The target is there and up: KmodmonAbsent (pending for a moment before the first
            // scrape landed) and KmodmonDown are inactive.
            let up = rules
                .iter()
                .filter(|r| r["name"] == "KmodmonDown" || r["name"] == "KmodmonAbsent")
                .filter(|r| r["state"] == "inactive")
                .count()
                == 2;
            (evaluated && pending && up).then_some(groups)
        },
    );
    let mut names: Vec<&str> = groups.iter().filter_map(|g| g["name"].as_str()).collect();
    let mut want: Vec<&str> = want.iter().map(String::as_str).collect();
    names.sort_unstable();
    want.sort_unstable();
    assert_eq!(names, want);
    for g in &groups {
        for r in g["rules"].as_array().unwrap() {
            assert_eq!(
                r["health"],
                "ok",
                "rule {} of {}: {r}\n{}",
                r["name"],
                g["name"],
                log()
            );
        }
    }
    drop(prometheus);
    drop(delete);
    drop(container);
    drop(kmodmon);
}
