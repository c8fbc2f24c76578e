//! Real container engines for the end-to-end tests, installed by `cargo xtask setup` (Debian's
//! docker.io, podman, containerd, lxc) and started here by the tests themselves: each daemon
//! and each engine's state lives under a temporary directory of its own (data root, exec root,
//! pid file, socket), networking is off (no bridge, no iptables rules, containers without a
//! network), images come from a local busybox rootfs tarball (no registry), and everything is
//! stopped, unmounted and removed when the handle is dropped — also when a test fails.
//!
//! Every command is bounded in time ([`run_bounded`]): a hung engine fails the test instead
//! of hanging the suite.
use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

/// How long one engine command may take (image import, container run).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a daemon may take to answer after it was started.
const DAEMON_START: Duration = Duration::from_secs(60);

/// Runs `cmd` with stdin closed, killing it after `timeout`. Output is what it printed; a
/// killed command has a failed status and says so on stderr.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        let _ = out.read_to_end(&mut o);
        o
    });
    let ereader = std::thread::spawn(move || {
        let mut e = Vec::new();
        let _ = err.read_to_end(&mut e);
        e
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                break child.wait().expect("wait");
            }
        }
    };
    let timed_out = Instant::now() >= deadline;
    let stdout = reader.join().unwrap_or_default();
    let mut stderr = ereader.join().unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(format!("\n[killed after {timeout:?}: {what}]").as_bytes());
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Like [`run_bounded`], failing the test unless the command succeeds.
pub fn must(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = run_bounded(cmd, COMMAND_TIMEOUT);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The absolute path of an engine's program, failing (in and out of CI: these tests exist to
/// run the real engines) when it is not installed.
pub fn program(name: &str) -> PathBuf {
    // Debian's packages install here; a docker client elsewhere on PATH (/usr/local/bin) may
    // speak another API version than Debian's engine.
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is not installed: `cargo xtask setup` installs the container engines \
         (docker.io, podman, containerd, lxc)"
    );
}

/// A busybox rootfs (sh, insmod, rmmod, modprobe, sleep, cat, env) under `dir/rootfs`, and a
/// tarball of it at `dir/rootfs.tar` (what `docker import` and `podman import` take).
pub fn busybox_rootfs(dir: &Path) -> (PathBuf, PathBuf) {
    let rootfs = dir.join("rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir rootfs/bin");
    for d in ["proc", "sys", "dev", "tmp", "etc", "lib/modules"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("mkdir rootfs");
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("busybox-static is not installed: `cargo xtask setup` installs it");
    std::fs::copy(busybox, bin.join("busybox")).expect("copy busybox");
    for applet in [
        "sh", "insmod", "rmmod", "modprobe", "sleep", "cat", "env", "grep",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet symlink");
    }
    std::fs::write(
        rootfs.join("lib/modules/kmodmon_e2e.ko"),
        b"\x7fELF not a module",
    )
    .expect("module file");
    let tar = dir.join("rootfs.tar");
    must(
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    (rootfs, tar)
}

/// Unmounts everything mounted at or below `dir` (deepest first, lazily), so a crashed engine
/// leaves nothing behind.
pub fn unmount_below(dir: &Path) {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> PathBuf {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt as _;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Stops a daemon: SIGTERM, up to `grace`, then SIGKILL.
fn stop_daemon(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                return child.wait().ok();
            }
        }
    }
}

/// Processes whose command line mentions `needle` (a private path), to find what a daemon
/// left running.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Kills what still runs from `dir` (shims and runtimes a daemon started), unmounts and
/// removes it.
fn sweep(dir: &Path) {
    let needle = dir.display().to_string();
    for pid in processes_mentioning(&needle) {
        if pid != std::process::id() as i32 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    unmount_below(dir);
}

/// Host directories an engine creates whatever its private roots say (dockerd's
/// /run/docker/plugins, containerd shims' /run/containerd/s): those absent before the engine
/// started are removed after it stopped.
struct Leftovers(Vec<PathBuf>);

impl Leftovers {
    fn watch(paths: &[&str]) -> Leftovers {
        Leftovers(
            paths
                .iter()
                .map(PathBuf::from)
                .filter(|p| !p.exists())
                .collect(),
        )
    }

    fn remove(&self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Parent cgroups an engine creates for its containers (`/docker`, `/libpod_parent`,
/// `/<containerd namespace>`, `/kubepods/...`) and leaves behind, empty, in every hierarchy
/// (cgroup2 and each v1 controller): those absent when the test began are removed at its
/// end, deepest first (a cgroup that still holds anything refuses, and is left).
pub struct CgroupLeftovers(Vec<PathBuf>);

impl CgroupLeftovers {
    pub fn watch(paths: &[&str]) -> CgroupLeftovers {
        let mut out = CgroupLeftovers(Vec::new());
        out.add(paths);
        out
    }

    /// Watches more cgroup paths (relative to each hierarchy's root, `/a/b`).
    pub fn add(&mut self, paths: &[&str]) {
        for mount in cgroup_mounts() {
            for p in paths {
                let dir = mount.join(p.trim_start_matches('/'));
                if !dir.exists() && !self.0.contains(&dir) {
                    self.0.push(dir);
                }
            }
        }
    }

    pub fn remove(&self) {
        let mut dirs = self.0.clone();
        dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

impl Drop for CgroupLeftovers {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Mount points of the cgroup2 hierarchy and of every v1 hierarchy.
fn cgroup_mounts() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let point = left.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| unescape_mount(point))
        })
        .collect()
}

/// The CLI's answer to a container run, with the container's full ID.
pub struct RunResult {
    pub id: String,
    pub output: Output,
}

// ---------------------------------------------------------------------------------------
// Docker

/// A private `dockerd` (Debian's docker.io): `--bridge=none --iptables=false
/// --ip6tables=false`, its own data root, exec root, pid file and socket.
pub struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
    pub sock: PathBuf,
    cli: PathBuf,
    leftovers: Leftovers,
    cgroups: CgroupLeftovers,
}

impl Dockerd {
    pub fn start() -> Dockerd {
        let dir = tempfile::Builder::new()
            .prefix("kmodmon-dockerd-")
            .tempdir()
            .expect("tempdir");
        let sock = dir.path().join("docker.sock");
        let log = std::fs::File::create(dir.path().join("dockerd.log")).expect("log");
        let leftovers = Leftovers::watch(&["/run/docker", "/run/containerd"]);
        let cgroups = CgroupLeftovers::watch(&["/docker"]);
        let child = Command::new(program("dockerd"))
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("docker.pid"))
            .arg("--host")
            .arg(format!("unix://{}", sock.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let d = Dockerd {
            child,
            dir,
            sock,
            cli: program("docker"),
            leftovers,
            cgroups,
        };
        let deadline = Instant::now() + DAEMON_START;
        while !run_bounded(&mut d.cmd(&["version"]), Duration::from_secs(10))
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within {DAEMON_START:?}:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        d
    }

    pub fn data_root(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn exec_root(&self) -> PathBuf {
        self.dir.path().join("exec")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// `docker -H unix://SOCK ARGS`.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.cli);
        c.arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args);
        c
    }

    /// Imports the busybox rootfs as IMAGE.
    pub fn import(&self, tar: &Path, image: &str) {
        must(self.cmd(&["import"]).arg(tar).arg(image));
    }

    /// `docker run --network none ARGS IMAGE CMD...` in the foreground, with `--cidfile`.
    pub fn run(&self, args: &[&str], image: &str, cmd: &[&str]) -> RunResult {
        let cid = self
            .dir
            .path()
            .join(format!("cid-{}", crate::container::random_id()));
        let output = run_bounded(
            self.cmd(&["run", "--network", "none", "--cidfile"])
                .arg(&cid)
                .args(args)
                .arg(image)
                .args(cmd),
            COMMAND_TIMEOUT,
        );
        let id = std::fs::read_to_string(&cid).unwrap_or_default();
        RunResult {
            id: id.trim().to_string(),
            output,
        }
    }

    /// kmodmon's `--state-dir` arguments for this daemon's private roots.
    pub fn state_dir_args(&self) -> Vec<String> {
        vec![
            "--state-dir".into(),
            format!("docker={}", self.data_root().display()),
            "--state-dir".into(),
            format!("docker-exec={}", self.exec_root().display()),
        ]
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let out = run_bounded(&mut self.cmd(&["ps", "-aq"]), Duration::from_secs(20));
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = run_bounded(&mut self.cmd(&["rm", "-f", id]), Duration::from_secs(20));
        }
        stop_daemon(&mut self.child, Duration::from_secs(30));
        sweep(self.dir.path());
        self.leftovers.remove();
        self.cgroups.remove();
    }
}

// ---------------------------------------------------------------------------------------
// containerd

/// A private `containerd` with its own root, state, socket and config (the CRI plugin off:
/// nothing here speaks CRI, and it would look for CNI).
pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    pub sock: PathBuf,
    leftovers: Leftovers,
    /// Parent cgroups of its containers: `/<namespace>` for plain ctr containers; tests add
    /// the ones they choose with `--cgroup`.
    pub cgroups: CgroupLeftovers,
}

/// The containerd namespaces the tests use (cleaned up when the daemon stops).
pub const CONTAINERD_NAMESPACES: [&str; 3] = ["default", "k8s.io", "kmodmon"];

impl Containerd {
    pub fn start() -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("kmodmon-containerd-")
            .tempdir()
            .expect("tempdir");
        let sock = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )
        .expect("config");
        let log = std::fs::File::create(dir.path().join("containerd.log")).expect("log");
        // The runc shim keeps runc's state in /run/containerd/runc/<namespace> and its
        // sockets in /run/containerd/s, whatever --state says.
        let leftovers = Leftovers::watch(&[
            "/run/containerd",
            "/run/containerd/runc/default",
            "/run/containerd/runc/k8s.io",
            "/run/containerd/runc/kmodmon",
        ]);
        let cgroups = CgroupLeftovers::watch(&["/default", "/k8s.io", "/kmodmon"]);
        let child = Command::new(program("containerd"))
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--address")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            child,
            dir,
            sock,
            leftovers,
            cgroups,
        };
        let deadline = Instant::now() + DAEMON_START;
        while !run_bounded(&mut c.ctr("default", &["version"]), Duration::from_secs(10))
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within {DAEMON_START:?}:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        c
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr --address SOCK -n NAMESPACE ARGS`.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program("ctr"));
        c.arg("--address")
            .arg(&self.sock)
            .args(["-n", namespace])
            .args(args);
        c
    }

    /// `ctr run --rm --rootfs ROOTFS ARGS ID CMD...` in the foreground (containerd's own
    /// network namespace for the task: no network).
    pub fn run(
        &self,
        namespace: &str,
        args: &[&str],
        rootfs: &Path,
        id: &str,
        cmd: &[&str],
    ) -> Output {
        run_bounded(
            self.ctr(namespace, &["run", "--rm"])
                .args(args)
                .arg("--rootfs")
                .arg(rootfs)
                .arg(id)
                .args(cmd),
            COMMAND_TIMEOUT,
        )
    }

    /// kmodmon's `--state-dir` arguments for this daemon's private state.
    pub fn state_dir_args(&self) -> Vec<String> {
        vec![
            "--state-dir".into(),
            format!("containerd={}", self.state_dir().display()),
        ]
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for ns in CONTAINERD_NAMESPACES {
            let out = run_bounded(
                &mut self.ctr(ns, &["tasks", "ls", "-q"]),
                Duration::from_secs(10),
            );
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = run_bounded(
                    &mut self.ctr(ns, &["tasks", "kill", "-s", "KILL", id]),
                    Duration::from_secs(10),
                );
                let _ = run_bounded(
                    &mut self.ctr(ns, &["tasks", "delete", "-f", id]),
                    Duration::from_secs(10),
                );
            }
            let out = run_bounded(
                &mut self.ctr(ns, &["containers", "ls", "-q"]),
                Duration::from_secs(10),
            );
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = run_bounded(
                    &mut self.ctr(ns, &["containers", "delete", id]),
                    Duration::from_secs(10),
                );
            }
        }
        stop_daemon(&mut self.child, Duration::from_secs(20));
        sweep(self.dir.path());
        self.leftovers.remove();
        self.cgroups.remove();
    }
}

// ---------------------------------------------------------------------------------------
// podman

/// podman (daemonless) with its own storage root, run root and temporary directory. Debian's
/// podman defaults to crun, which refuses this machine's hybrid cgroup layout ("cgroups in
/// hybrid mode not supported"), so containers run with runc; and it needs explicit limits
/// below the sandbox's hard limits (`--ulimit`).
pub struct Podman {
    dir: tempfile::TempDir,
    /// Whether podman's blob-info cache (root's is always /var/lib/containers/cache, whatever
    /// `--root` says) existed before this test: if not, the test removes what podman wrote.
    cache_existed: bool,
    cgroups: CgroupLeftovers,
}

/// Where root's podman keeps its blob-info cache, whatever `--root` says.
const PODMAN_CACHE: &str = "/var/lib/containers/cache";

/// What podman needs on this machine for every `run` (see [`Podman`]).
pub const PODMAN_RUN_ARGS: [&str; 6] = [
    "--network",
    "none",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

impl Podman {
    pub fn new() -> Podman {
        let dir = tempfile::Builder::new()
            .prefix("kmodmon-podman-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("tmp")).expect("mkdir");
        Podman {
            dir,
            cache_existed: Path::new(PODMAN_CACHE).exists(),
            cgroups: CgroupLeftovers::watch(&["/libpod_parent", "/libpod_parent/conmon"]),
        }
    }

    pub fn graph_root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `podman --root … --runroot … ARGS`.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(program("podman"));
        c.arg("--root")
            .arg(self.graph_root())
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .arg("--tmpdir")
            .arg(self.dir.path().join("tmp"))
            .args([
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                "--runtime",
                "runc",
            ])
            .args(args);
        c
    }

    pub fn import(&self, tar: &Path, image: &str) {
        must(self.cmd(&["import"]).arg(tar).arg(image));
    }

    /// `podman run --network none --ulimit … --cidfile F ARGS IMAGE CMD...`.
    pub fn run(&self, args: &[&str], image: &str, cmd: &[&str]) -> RunResult {
        let cid = self
            .dir
            .path()
            .join(format!("cid-{}", crate::container::random_id()));
        let output = run_bounded(
            self.cmd(&["run"])
                .args(PODMAN_RUN_ARGS)
                .arg("--cidfile")
                .arg(&cid)
                .args(args)
                .arg(image)
                .args(cmd),
            COMMAND_TIMEOUT,
        );
        let id = std::fs::read_to_string(&cid).unwrap_or_default();
        RunResult {
            id: id.trim().to_string(),
            output,
        }
    }

    /// kmodmon's `--state-dir` arguments: the private storage root (names).
    pub fn state_dir_args(&self) -> Vec<String> {
        vec![
            "--state-dir".into(),
            format!("containers={}", self.graph_root().display()),
        ]
    }
}

impl Default for Podman {
    fn default() -> Self {
        Podman::new()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = run_bounded(&mut self.cmd(&["rm", "-af"]), Duration::from_secs(60));
        let _ = run_bounded(&mut self.cmd(&["rmi", "-af"]), Duration::from_secs(60));
        sweep(self.dir.path());
        self.cgroups.remove();
        if !self.cache_existed {
            let _ = std::fs::remove_dir_all(PODMAN_CACHE);
            // Its parent too, when podman created it for the cache alone.
            let _ = std::fs::remove_dir("/var/lib/containers");
        }
    }
}

// ---------------------------------------------------------------------------------------
// What the engine tests check in kmodmon's events

/// The errno an attempt's syscall returns here when it runs (no module of that name).
pub fn unconfined_errno() -> &'static str {
    if Path::new("/proc/modules").exists() {
        "ENOENT"
    } else {
        "ENOSYS"
    }
}

/// The first load or unload attempt for `module`.
pub fn attempt<'a>(events: &'a [serde_json::Value], module: &str) -> Option<&'a serde_json::Value> {
    events.iter().find(|e| {
        e["module"] == module && e["kind"].as_str().is_some_and(|k| k.ends_with("_attempt"))
    })
}

/// The `expectation` event of the container named (or, where the ID is the name, with ID)
/// `name`.
pub fn expectation<'a>(
    events: &'a [serde_json::Value],
    name: &str,
) -> Option<&'a serde_json::Value> {
    events.iter().find(|e| {
        e["kind"] == "expectation"
            && (e["container"]["name"] == name || e["container"]["id"] == name)
    })
}

/// The event's container is exactly this one.
pub fn assert_container(e: &serde_json::Value, id: &str, runtime: &str, name: &str) {
    let c = &e["container"];
    assert_eq!(c["id"], id, "container id: {e:#}");
    assert_eq!(c["runtime"], runtime, "container runtime: {e:#}");
    assert_eq!(c["name"], name, "container name: {e:#}");
}

/// A module syscall the container's seccomp profile refused: EPERM, `blocked_by: seccomp`.
pub fn assert_refused(e: &serde_json::Value) {
    assert_eq!(e["blocked_by"], "seccomp", "{e:#}");
    assert_eq!(e["result"], -1, "{e:#}");
    assert_eq!(e["errno"], "EPERM", "{e:#}");
}

/// A module syscall that ran: not blocked, the kernel's own answer.
pub fn assert_ran(e: &serde_json::Value) {
    assert!(e.get("blocked_by").is_none(), "{e:#}");
    assert_eq!(e["errno"], unconfined_errno(), "{e:#}");
}

/// The modules an `expectation` event lists.
pub fn expected_modules(e: &serde_json::Value) -> Vec<String> {
    e["modules"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// LXC

/// An LXC container (Debian's lxc 5.0) created from the busybox template under a private
/// lxcpath, run with `lxc-execute` (an application container): no network
/// (`lxc.net.0.type = empty`), no AppArmor profile (this machine has no AppArmor), and LXC's
/// own seccomp policy (common.seccomp: the module syscalls get EPERM) when asked for.
pub struct Lxc {
    dir: tempfile::TempDir,
    pub name: String,
    leftovers: Leftovers,
    cgroups: CgroupLeftovers,
}

/// LXC's shipped seccomp policy (what `common.conf` applies to every container).
pub const LXC_SECCOMP: &str = "/usr/share/lxc/config/common.seccomp";

impl Lxc {
    pub fn create(name: &str) -> Lxc {
        let dir = tempfile::Builder::new()
            .prefix("kmodmon-lxc-")
            .tempdir()
            .expect("tempdir");
        let leftovers = Leftovers::watch(&["/run/lxc"]);
        let payload = format!("/lxc.payload.{name}");
        let monitor = format!("/lxc.monitor.{name}");
        let cgroups = CgroupLeftovers::watch(&["/lxc.pivot", &payload, &monitor]);
        must(
            Command::new(program("lxc-create"))
                .arg("-P")
                .arg(dir.path())
                .args(["-n", name, "-t", "busybox"]),
        );
        Lxc {
            dir,
            name: name.to_string(),
            leftovers,
            cgroups,
        }
    }

    pub fn lxcpath(&self) -> &Path {
        self.dir.path()
    }

    /// `lxc-execute` of CMD with `env` (lxc.environment), with or without LXC's seccomp
    /// policy; returns when CMD exits.
    pub fn execute(&self, seccomp: bool, env: &[&str], cmd: &[&str]) -> Output {
        let mut c = Command::new(program("lxc-execute"));
        c.arg("-P").arg(self.dir.path()).args(["-n", &self.name]);
        c.args([
            "-s",
            "lxc.net.0.type=empty",
            "-s",
            "lxc.apparmor.profile=unconfined",
        ]);
        if seccomp {
            c.arg("-s")
                .arg(format!("lxc.seccomp.profile={LXC_SECCOMP}"));
        }
        for e in env {
            c.arg("-s").arg(format!("lxc.environment={e}"));
        }
        c.arg("--").args(cmd);
        run_bounded(&mut c, COMMAND_TIMEOUT)
    }

    /// kmodmon's `--state-dir` arguments: the private lxcpath (confirms container names).
    pub fn state_dir_args(&self) -> Vec<String> {
        vec![
            "--state-dir".into(),
            format!("lxc={}", self.dir.path().display()),
        ]
    }
}

impl Drop for Lxc {
    fn drop(&mut self) {
        let base = |cmd: &str| {
            let mut c = Command::new(program(cmd));
            c.arg("-P").arg(self.dir.path()).args(["-n", &self.name]);
            c
        };
        let _ = run_bounded(base("lxc-stop").arg("-k"), Duration::from_secs(20));
        let _ = run_bounded(&mut base("lxc-destroy"), Duration::from_secs(30));
        sweep(self.dir.path());
        self.cgroups.remove();
        self.leftovers.remove();
    }
}
