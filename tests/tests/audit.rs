//! End-to-end tests of the audit log on real files, through the kmodmon binary: a writer
//! SIGKILLed in a loop, tampering named by `kmodmon log verify`, a full filesystem, and
//! `kmodmon export` filters and formats.
//!
//! The writer is the hidden `kmodmon log __write-test` command (the same `AuditLog` the daemon
//! uses, fed synthetic events whose `detail` is `run=<run> i=<i>`).
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::Duration;

use kmodmon_tests::{kmodmon_bin, require_root};
use serde_json::Value;

fn kmodmon(args: &[&str]) -> Output {
    Command::new(kmodmon_bin())
        .args(args)
        .output()
        .expect("run kmodmon")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write_test(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["log", "__write-test", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = kmodmon(&args);
    assert!(
        out.status.success(),
        "write-test failed: {}",
        text(&out.stderr)
    );
    out
}

fn verify_json(dir: &Path) -> (bool, Value) {
    let out = kmodmon(&["log", "verify", "--json", dir.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify --json: {e}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    assert_eq!(
        out.status.success(),
        v["ok"] == true,
        "exit status agrees with the verdict"
    );
    (out.status.success(), v)
}

/// Exported events (JSON lines) of `dir`, with extra export arguments.
fn export(dir: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["export", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = kmodmon(&args);
    assert!(
        out.status.success(),
        "export {extra:?}: {}",
        text(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "export warned: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("export line is JSON"))
        .collect()
}

/// (run, i) of a synthetic event.
fn run_and_index(ev: &Value) -> (String, u64) {
    let d = ev["detail"].as_str().expect("detail");
    let (run, i) = d.split_once(' ').expect("run=R i=I");
    (
        run.trim_start_matches("run=").to_string(),
        i.trim_start_matches("i=").parse().expect("index"),
    )
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-"))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn sigkill_in_a_loop_loses_no_reported_record_and_leaves_none_torn() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut durable: BTreeMap<String, u64> = BTreeMap::new();
    let mut tears = 0;
    for round in 0..12u64 {
        let run = format!("k{round}");
        let sync_every = (1 + round % 5).to_string();
        let mut args = vec![
            "log",
            "__write-test",
            d,
            "--count",
            "100000000",
            "--run",
            &run,
            "--sync-every",
            &sync_every,
            "--segment-size",
            "6KiB",
        ];
        if round % 2 == 1 {
            args.extend_from_slice(&["--compress", "--fsync", "20ms"]);
        }
        let mut child = Command::new(kmodmon_bin())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // The reader forwards each line as it comes, so the kill lands mid-write, after the
        // writer got going however slowly this machine starts it.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push(line);
            }
            all
        });
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the writer reports durable records");
            if line.starts_with("durable ") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20 + 37 * (round % 7)));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        assert!(lines[0].starts_with("open "), "{lines:?}");
        let last = lines
            .iter()
            .filter_map(|l| l.strip_prefix("durable "))
            .filter_map(|l| {
                l.split_whitespace()
                    .nth(1)?
                    .strip_prefix("i=")?
                    .parse::<u64>()
                    .ok()
            })
            .max();
        let Some(last) = last else {
            panic!("round {round}: nothing written before the kill: {lines:?}")
        };
        durable.insert(run, last);
        if round % 3 == 2 {
            // A write torn by the kill: a partial line at the end of the active segment.
            let active = segments(dir.path())
                .into_iter()
                .rfind(|p| p.extension().is_some_and(|e| e == "jsonl"))
                .unwrap();
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(active)
                .unwrap();
            f.write_all(br#"{"seq":999999999,"time":"2026-11-22T13:"#)
                .unwrap();
            tears += 1;
        }
    }
    // A last, clean run: it recovers whatever the last kill left.
    let out = write_test(dir.path(), &["--count", "3", "--run", "final"]);
    assert!(text(&out.stdout).starts_with("open "));

    let (ok, v) = verify_json(dir.path());
    assert!(ok, "verify after the kill loop: {v}");
    assert!(v["recoveries"].as_u64().unwrap() >= tears, "{v}");
    assert_eq!(v["lost"], 0, "blocking submits lose nothing: {v}");
    assert!(v["compressed_segments"].as_u64().unwrap() > 0, "{v}");

    let events = export(dir.path(), &[]);
    assert_eq!(events.len() as u64, v["events"].as_u64().unwrap());
    let mut seen: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut last_seq = 0;
    for ev in &events {
        let seq = ev["seq"].as_u64().unwrap();
        assert!(seq > last_seq, "export is in seq order");
        last_seq = seq;
        let (run, i) = run_and_index(ev);
        assert!(
            seen.entry(run.clone()).or_default().insert(i),
            "duplicate {run} i={i}"
        );
    }
    for (run, last) in &durable {
        let got = &seen[run];
        let max = *got.iter().next_back().unwrap();
        assert!(
            max >= *last,
            "{run}: i={last} was reported durable, the log ends at i={max}"
        );
        assert_eq!(
            got.len() as u64,
            max + 1,
            "{run}: the log has gaps: {got:?}"
        );
    }
    assert_eq!(seen["final"].len(), 3);
}

/// A log of a few segments to tamper with, and a fresh copy maker.
fn tamper_copy(src: &Path) -> tempfile::TempDir {
    let dst = tempfile::tempdir().unwrap();
    for p in segments(src) {
        std::fs::copy(&p, dst.path().join(p.file_name().unwrap())).unwrap();
    }
    dst
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn put_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn seq_of(line: &str) -> u64 {
    serde_json::from_str::<Value>(line).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

fn failure(dir: &Path) -> (String, String) {
    let out = kmodmon(&["log", "verify", dir.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "verify must fail: {}",
        text(&out.stdout)
    );
    let (_, v) = verify_json(dir);
    (
        text(&out.stdout),
        v["failure"]["problem"].as_str().unwrap().to_string(),
    )
}

#[test]
fn verify_names_the_record_edited_removed_reordered_or_truncated() {
    let src = tempfile::tempdir().unwrap();
    write_test(
        src.path(),
        &[
            "--count",
            "40",
            "--segment-size",
            "8KiB",
            "--sync-every",
            "0",
        ],
    );
    let segs = segments(src.path());
    assert!(segs.len() >= 3, "{segs:?}");
    let out = kmodmon(&["log", "verify", src.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("intact"));

    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
    let middle = &segs[1];
    let orig = lines(middle);
    assert!(orig.len() > 4);

    // Edited: a module name changed in place.
    let t = tamper_copy(src.path());
    let p = t.path().join(name(middle));
    let mut l = orig.clone();
    l[3] = l[3].replacen("\"comm\":\"insmod\"", "\"comm\":\"insmoe\"", 1);
    assert_ne!(l[3], orig[3]);
    put_lines(&p, &l);
    let (msg, problem) = failure(t.path());
    let want = format!("{} line 4 (seq {})", name(middle), seq_of(&orig[3]));
    assert!(msg.contains(&want), "{msg}");
    assert!(problem.starts_with("edited"), "{problem}");

    // Removed: one record deleted.
    let t = tamper_copy(src.path());
    let p = t.path().join(name(middle));
    let mut l = orig.clone();
    l.remove(2);
    put_lines(&p, &l);
    let (msg, problem) = failure(t.path());
    assert!(
        msg.contains(&format!(
            "{} line 3 (seq {})",
            name(middle),
            seq_of(&orig[3])
        )),
        "{msg}"
    );
    assert!(
        problem.starts_with("removed") && problem.contains(&seq_of(&orig[2]).to_string()),
        "{problem}"
    );

    // Reordered: two records swapped.
    let t = tamper_copy(src.path());
    let p = t.path().join(name(middle));
    let mut l = orig.clone();
    l.swap(2, 3);
    put_lines(&p, &l);
    let (msg, problem) = failure(t.path());
    assert!(
        msg.contains(&format!(
            "{} line 3 (seq {})",
            name(middle),
            seq_of(&orig[3])
        )),
        "{msg}"
    );
    assert!(problem.starts_with("reordered"), "{problem}");

    // Truncated: the end of a closed segment cut off (whole records).
    let t = tamper_copy(src.path());
    let p = t.path().join(name(middle));
    put_lines(&p, &orig[..orig.len() - 2]);
    let (msg, problem) = failure(t.path());
    assert!(msg.contains(&format!("{} line 1", name(&segs[2]))), "{msg}");
    assert!(
        problem.contains("previous segment was truncated"),
        "{problem}"
    );

    // Truncated: the last record cut mid-line.
    let t = tamper_copy(src.path());
    let last = t.path().join(name(segs.last().unwrap()));
    let bytes = std::fs::read(&last).unwrap();
    std::fs::write(&last, &bytes[..bytes.len() - 20]).unwrap();
    let (msg, problem) = failure(t.path());
    assert!(msg.contains(&name(segs.last().unwrap())), "{msg}");
    assert!(problem.starts_with("truncated"), "{problem}");

    // Removed: the first segment (no retention record explains it).
    let t = tamper_copy(src.path());
    std::fs::remove_file(t.path().join(name(&segs[0]))).unwrap();
    let (_, problem) = failure(t.path());
    assert!(
        problem.starts_with("removed") && problem.contains("no retention record"),
        "{problem}"
    );

    // An anchor catches whole records cut from the end.
    let (_, v) = verify_json(src.path());
    let anchor = format!("{}:{}", v["last_seq"], v["head"].as_str().unwrap());
    let t = tamper_copy(src.path());
    let last = t.path().join(name(segs.last().unwrap()));
    let l = lines(&last);
    put_lines(&last, &l[..l.len() - 1]);
    let (ok, _) = verify_json(t.path());
    assert!(ok, "a shorter chain is still a chain");
    let out = kmodmon(&[
        "log",
        "verify",
        "--anchor",
        &anchor,
        t.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("anchored record"),
        "{}",
        text(&out.stdout)
    );

    let none = tempfile::tempdir().unwrap();
    let out = kmodmon(&["log", "verify", none.path().to_str().unwrap()]);
    // 2: nothing could be verified (1 means "verified, and found tampering").
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no audit log segments"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn export_filters_and_formats_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    write_test(
        dir.path(),
        &[
            "--count",
            "120",
            "--start",
            "2026-01-01T00:00:00Z",
            "--step",
            "1min",
            "--segment-size",
            "8KiB",
            "--compress",
            "--sync-every",
            "0",
            "--fsync",
            "100ms",
        ],
    );
    assert!(
        segments(dir.path())
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "zst")),
        "closed segments are compressed"
    );
    let all = export(dir.path(), &[]);
    let idx: Vec<u64> = all.iter().map(|e| run_and_index(e).1).collect();
    assert_eq!(
        idx,
        (0..120).collect::<Vec<_>>(),
        "every event, in order, across segments"
    );
    assert!(
        all.iter()
            .all(|e| e["hash"].as_str().is_some_and(|h| h.len() == 64))
    );

    let pick = |args: &[&str]| -> Vec<u64> {
        export(dir.path(), args)
            .iter()
            .map(|e| run_and_index(e).1)
            .collect()
    };
    let expect = |f: &dyn Fn(&Value) -> bool| -> Vec<u64> {
        all.iter()
            .filter(|e| f(e))
            .map(|e| run_and_index(e).1)
            .collect()
    };
    assert_eq!(
        pick(&["--since", "2026-01-01T01:00:00Z"]),
        (60..120).collect::<Vec<_>>()
    );
    assert_eq!(
        pick(&["--since", "2026-01-01T02:00:00+01:00"]),
        (60..120).collect::<Vec<_>>()
    );
    assert_eq!(
        pick(&["--until", "2026-01-01 00:30:00"]),
        (0..30).collect::<Vec<_>>()
    );
    assert_eq!(
        pick(&[
            "--since",
            "2026-01-01T00:10:00Z",
            "--until",
            "2026-01-01T00:20:00Z"
        ]),
        (10..20).collect::<Vec<_>>()
    );
    assert!(
        pick(&["--since", "2h"]).is_empty(),
        "2026-01-01 is more than 2h ago"
    );
    assert_eq!(pick(&["--kind", "load"]), expect(&|e| e["kind"] == "load"));
    assert_eq!(
        pick(&["--module", "nf_conntrack"]),
        expect(&|e| e["module"] == "nf-conntrack")
    );
    assert_eq!(
        pick(&["--container", "host"]),
        expect(&|e| e["container"].is_null())
    );
    assert_eq!(
        pick(&["--container", "web-1"]),
        expect(&|e| e["container"]["name"] == "web-1")
    );
    assert_eq!(
        pick(&["--verdict", "unexpected", "--verdict", "none"]),
        expect(&|e| e["verdict"] == "unexpected" || e["verdict"].is_null())
    );
    let combo = pick(&[
        "--kind",
        "load_attempt",
        "--container",
        "host",
        "--since",
        "2026-01-01T00:30:00Z",
    ]);
    assert_eq!(
        combo,
        expect(&|e| e["kind"] == "load_attempt"
            && e["container"].is_null()
            && run_and_index(e).1 >= 30)
    );
    assert!(!combo.is_empty());

    let bad = kmodmon(&[
        "export",
        dir.path().to_str().unwrap(),
        "--since",
        "last tuesday",
    ]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("RFC 3339"),
        "{}",
        text(&bad.stderr)
    );
    let bad = kmodmon(&["export", dir.path().to_str().unwrap(), "--kind", "loaded"]);
    assert!(!bad.status.success());

    // CSV: a header row, one row per event, fields quoted where needed.
    let out = kmodmon(&["export", dir.path().to_str().unwrap(), "--format", "csv"]);
    assert!(out.status.success());
    let mut r = csv::Reader::from_reader(out.stdout.as_slice());
    let headers = r.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), all.len());
    // Formula-like cells carry one leading ' (README: remove it to get the value back).
    let back = |c: &str| c.strip_prefix('\'').unwrap_or(c).to_string();
    for (row, ev) in rows.iter().zip(&all) {
        assert_eq!(row[col("seq")], ev["seq"].to_string());
        assert_eq!(&row[col("time")], ev["time"].as_str().unwrap());
        assert_eq!(back(&row[col("module")]), ev["module"].as_str().unwrap());
        assert_eq!(&row[col("kind")], ev["kind"].as_str().unwrap());
        assert_eq!(&row[col("detail")], ev["detail"].as_str().unwrap());
        assert_eq!(&row[col("hash")], ev["hash"].as_str().unwrap());
        assert_eq!(&row[col("params")], ev["params"].as_str().unwrap_or(""));
        assert_eq!(
            &row[col("container_id")],
            ev["container"]["id"].as_str().unwrap_or("")
        );
    }
    assert!(
        text(&out.stdout).contains("\"evil,\"\"mod\"\"\""),
        "a module name with a comma and quotes is quoted"
    );
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

struct Stdin {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Stdin {
    /// Sends a command and parses the stats line it answers.
    fn cmd(&mut self, c: &str) -> BTreeMap<String, u64> {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("stats "), "{c}: {line:?}");
        line.split_whitespace()
            .skip(1)
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }
}

#[test]
fn a_full_filesystem_counts_lost_records_and_reports_them_when_writing_resumes() {
    if !require_root("a_full_filesystem_counts_lost_records_and_reports_them_when_writing_resumes")
    {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64k,mode=0700"),
    )
    .expect("mount a 64 KiB tmpfs (root can)");
    let _guard = Mount(mnt.clone());
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 40 * 1024]).unwrap();
    let log = mnt.join("audit");

    let mut child = Command::new(kmodmon_bin())
        .args([
            "log",
            "__write-test",
            log.to_str().unwrap(),
            "--stdin",
            "--queue",
            "100000",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut open = String::new();
    stdout.read_line(&mut open).unwrap();
    assert!(open.starts_with("open "), "{open}");
    let mut w = Stdin {
        child,
        stdin,
        stdout,
    };

    w.cmd("write 300");
    // A sync returns once the writer has taken everything queued before it.
    let full = w.cmd("sync");
    assert!(
        full["lost_write_error"] > 0,
        "64 KiB cannot hold 300 events: {full:?}"
    );
    assert!(
        full["events"] > 0,
        "some fit before the disk filled: {full:?}"
    );
    assert_eq!(full["events"] + full["lost_write_error"], 300, "{full:?}");

    std::fs::remove_file(&filler).unwrap();
    w.cmd("write 5");
    let resumed = w.cmd("sync");
    assert_eq!(
        resumed["events"],
        full["events"] + 5,
        "writing resumed: {resumed:?}"
    );
    assert_eq!(
        resumed["lost"], full["lost"],
        "nothing lost after space came back"
    );
    writeln!(w.stdin, "quit").unwrap();
    let status = w.child.wait().unwrap();
    assert!(status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(w.child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("cannot write"),
        "the failure was logged: {err}"
    );

    let (ok, v) = verify_json(&log);
    assert!(ok, "no torn record after ENOSPC: {v}");
    assert_eq!(v["lost"].as_u64(), Some(full["lost_write_error"]), "{v}");
    let meta = export(&log, &["--include-meta"]);
    let lost: Vec<&Value> = meta.iter().filter(|r| r["record"] == "lost").collect();
    // While the disk hovers at full, a smaller batch can still fit after a bigger one failed:
    // writing then resumes briefly and reports what was lost so far. However many reports,
    // together they count every lost record exactly once, and each names ENOSPC.
    assert!(!lost.is_empty(), "a report when writing resumed");
    let reported: u64 = lost.iter().filter_map(|r| r["write_error"].as_u64()).sum();
    assert_eq!(reported, full["lost_write_error"], "{lost:?}");
    for r in &lost {
        assert!(
            r["error"]
                .as_str()
                .unwrap_or_default()
                .contains("No space left"),
            "{r}"
        );
    }
    // Once the space came back, nothing more was lost: the last report comes before the first
    // event of the second write.
    let last_report = meta
        .iter()
        .rposition(|r| r["record"] == "lost")
        .unwrap_or(0);
    let first_after = meta
        .iter()
        .position(|r| r.get("record").is_none() && run_and_index(r).1 >= 300)
        .expect("the events written after the space came back");
    assert!(last_report < first_after, "{meta:?}");
}

/// `log verify --anchor-from` finds anchor lines in a syslog/journal export (any line, any
/// prefix), checks the log against the newest, and names records cut from the end.
#[test]
fn anchors_from_a_syslog_export_catch_records_cut_from_the_end() {
    let dir = tempfile::tempdir().unwrap();
    write_test(dir.path(), &["--count", "30", "--sync-every", "0"]);
    let (_, v) = verify_json(dir.path());
    let (last, head) = (v["last_seq"].as_u64().unwrap(), v["head"].as_str().unwrap());
    let early = {
        let segs = segments(dir.path());
        let l = lines(&segs[0]);
        let rec: Value = serde_json::from_str(&l[5]).unwrap();
        (
            rec["seq"].as_u64().unwrap(),
            rec["hash"].as_str().unwrap().to_string(),
        )
    };
    let anchors = dir.path().join("anchors.log");
    std::fs::write(
        &anchors,
        format!(
            "Nov 22 13:00:00 node kmodmon[7]: kmodmon-anchor seq={} hash={}\n\
             unrelated line\n\
             {{\"MESSAGE\":\"kmodmon-anchor seq={last} hash={head}\",\"_PID\":\"7\"}}\n",
            early.0, early.1
        ),
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let a = anchors.to_str().unwrap();
    let out = kmodmon(&["log", "verify", "--anchor-from", a, d]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("anchor: seq {last} from")),
        "{stdout}"
    );
    assert!(
        stdout.contains("the newest of 2 anchor line(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("unchanged"), "{stdout}");
    let out = kmodmon(&["log", "verify", "--json", "--anchor-from", a, d]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["anchor"]["result"], "matched", "{v}");
    assert_eq!(v["anchor"]["anchors_in_file"], 2);

    // Cut the last three records: a valid, shorter chain, caught by the anchor.
    let segs = segments(dir.path());
    let last_seg = segs.last().unwrap();
    let l = lines(last_seg);
    put_lines(last_seg, &l[..l.len() - 3]);
    assert!(verify_json(dir.path()).0, "without the anchor it verifies");
    let out = kmodmon(&["log", "verify", "--anchor-from", a, d]);
    assert_eq!(out.status.code(), Some(1));
    let msg = text(&out.stdout);
    assert!(
        msg.contains(&format!(
            "truncated: the log ends at seq {}, but the anchored record seq {last} existed",
            last - 3
        )),
        "{msg}"
    );
    // Standard input works too; a file with no anchor is an error (2), not a pass.
    let mut child = Command::new(kmodmon_bin())
        .args(["log", "verify", "--anchor-from", "-", d])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(std::fs::read(&anchors).unwrap().as_slice())
        .unwrap();
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(1));
    let none = dir.path().join("none.log");
    std::fs::write(&none, "nothing here\n").unwrap();
    let out = kmodmon(&["log", "verify", "--anchor-from", none.to_str().unwrap(), d]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("holds no `kmodmon-anchor"),
        "{}",
        text(&out.stderr)
    );
    // Two anchors for one seq that disagree: refused.
    std::fs::write(
        &none,
        format!(
            "kmodmon-anchor seq={last} hash={head}\nkmodmon-anchor seq={last} hash={}\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let out = kmodmon(&["log", "verify", "--anchor-from", none.to_str().unwrap(), d]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("disagree"),
        "{}",
        text(&out.stderr)
    );
}

/// CSV export neutralises formula cells reversibly and keeps numbers numbers.
#[test]
fn csv_export_neutralises_formulas_and_keeps_numbers() {
    let dir = tempfile::tempdir().unwrap();
    write_test(dir.path(), &["--count", "40", "--sync-every", "0"]);
    let out = kmodmon(&["export", "--format", "csv", dir.path().to_str().unwrap()]);
    assert!(out.status.success());
    let jsonl = export(dir.path(), &[]);
    let mut r = csv::Reader::from_reader(out.stdout.as_slice());
    let headers = r.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let mut formulas = 0;
    for (row, ev) in r.records().map(Result::unwrap).zip(&jsonl) {
        for cell in row.iter() {
            let formula = cell.starts_with(['=', '+', '-', '@', '\t', '\r']);
            assert!(
                !formula || cell.parse::<i64>().is_ok(),
                "formula cell {cell:?}"
            );
        }
        // Reversible: one leading ' removed gives the stored value.
        let module = &row[col("module")];
        let back = module.strip_prefix('\'').unwrap_or(module);
        assert_eq!(back, ev["module"].as_str().unwrap());
        if module.starts_with("'=") {
            formulas += 1;
        }
        if let Some(r) = ev["result"].as_i64() {
            assert_eq!(
                row[col("result")].parse::<i64>().unwrap(),
                r,
                "numbers stay numbers"
            );
        }
    }
    assert!(
        formulas > 0,
        "the synthetic events include a formula-like module name"
    );
}
