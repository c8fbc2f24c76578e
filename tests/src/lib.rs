//! Helpers for the end-to-end tests: find the kmodmon binary, require root (skipping loudly
//! outside CI, failing inside it), run `kmodmon tail --json` and collect what it prints, make
//! real runc containers, and start real container engines ([`engines`]).
pub mod container;
pub mod engines;
pub mod http;
pub mod tail;

use std::path::PathBuf;

/// Where the kmodmon binary of this test's profile lives (see [`kmodmon_bin`]).
fn bin_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KMODMON_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/kmodmon
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("kmodmon");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p kmodmon` (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// Whether this run is CI (where a missing capability is a failure, not a skip).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// True when the test may proceed as root. Outside CI a non-root run skips LOUDLY; in CI it
/// fails.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(!in_ci(), "{test}: needs root, and CI runs as root: failing");
    eprintln!("\n!!! SKIPPED {test}: needs root (BPF). Run as root, as CI does. !!!\n");
    false
}

/// Whether an executable is on PATH.
pub fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(cmd).is_file()))
        .unwrap_or(false)
}

/// Where the cgroup2 hierarchy is mounted (pure v2: /sys/fs/cgroup; hybrid:
/// /sys/fs/cgroup/unified), from /proc/self/mounts.
pub fn cgroup2_root() -> Option<PathBuf> {
    kmodmon::mounts::first_of_type("cgroup2")
}

/// The cgroup2 id of the calling process: the inode of its cgroup directory.
pub fn own_cgroup_id() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let root = cgroup2_root()?;
    let dir = format!("{}{}", root.display(), if rel == "/" { "" } else { rel });
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

/// The kmodmon binary, freshly built: runs `cargo build -p kmodmon --bin kmodmon` once per
/// test process (same cargo, workspace, target directory and profile as the running test), so
/// `cargo test -p kmodmon-tests` alone never runs a stale or missing binary. `KMODMON_BIN`
/// overrides (no build then).
pub fn kmodmon_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    if std::env::var_os("KMODMON_BIN").is_none() {
        let built = BUILT.get_or_init(|| {
            let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
            // <target>/<profile>/deps/<test>, or <target>/<triple>/<profile>/deps/<test>.
            let profile_dir = exe
                .parent()
                .and_then(|d| d.parent())
                .ok_or("test binary outside target/")?;
            let profile = profile_dir
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or("odd profile dir")?;
            let mut target_dir = profile_dir.parent().ok_or("odd target dir")?.to_path_buf();
            let mut cmd = std::process::Command::new(
                std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
            );
            cmd.args(["build", "--quiet", "-p", "kmodmon", "--bin", "kmodmon"]);
            if !target_dir.join(".rustc_info.json").exists()
                && let Some(parent) = target_dir
                    .parent()
                    .filter(|p| p.join(".rustc_info.json").exists())
            {
                let triple = target_dir
                    .file_name()
                    .map(|t| t.to_os_string())
                    .unwrap_or_default();
                cmd.arg("--target").arg(triple);
                target_dir = parent.to_path_buf();
            }
            let profile = if profile == "debug" { "dev" } else { profile };
            cmd.args(["--profile", profile])
                .arg("--target-dir")
                .arg(&target_dir);
            cmd.arg("--manifest-path")
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"));
            let status = cmd.status().map_err(|e| format!("running cargo: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("`cargo build -p kmodmon` failed: {status}"))
            }
        });
        if let Err(e) = built {
            panic!("{e}");
        }
    }
    bin_path()
}

/// A fixture directory: `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Copies a fixture tree into a new temporary directory (symlinks stay symlinks, so a root
/// filesystem keeps its absolute links), for tests that change it.
pub fn fixture_copy(rel: &str) -> tempfile::TempDir {
    fn copy(src: &std::path::Path, dst: &std::path::Path) -> std::io::Result<()> {
        let meta = std::fs::symlink_metadata(src)?;
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)
        } else if meta.is_dir() {
            std::fs::create_dir_all(dst)?;
            for entry in std::fs::read_dir(src)? {
                let entry = entry?;
                copy(&entry.path(), &dst.join(entry.file_name()))?;
            }
            Ok(())
        } else {
            std::fs::copy(src, dst).map(|_| ())
        }
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let src = fixture(rel);
    copy(&src, dir.path()).unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
    dir
}
