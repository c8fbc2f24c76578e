//! OCI runtime processes (`runc`, `crun`) and the container each one works on, from its
//! command line: `runc [global options] create|run|start|exec|delete [options] <id>`.
//!
//! An OCI hook (prestart, createRuntime, poststart, poststop) runs as a child of the runtime
//! process that creates, starts or deletes the container, in that process's cgroup — the
//! host's. So does any helper a runtime starts. The kernel side records every event's
//! ancestors (pid, start time, comm); the registry ([`super::Registry::on_behalf_of`]) looks
//! for a runtime process among them, reads its command line here (checking by start time that
//! the pid still is that process) and resolves the container it names: for `create` and `run`
//! from the bundle (`--bundle`, else the process's working directory: the same id, pid and
//! bundle a hook reads as the state on its stdin), for the other commands from the runtime's
//! state.
use std::path::{Path, PathBuf};

use procfs::process::Process;

use crate::escape::escape_bytes;
use crate::event::Ancestor;
use crate::host::container;

/// Program names of OCI runtimes (argv[0]'s file name, and the comm the kernel records) →
/// runtime.
pub const RUNTIMES: [(&str, &str); 3] = [
    ("runc", container::RUNC),
    ("docker-runc", container::RUNC),
    ("crun", container::CRUN),
];

/// Runtime subcommands that work on one container, named by the first operand.
const COMMANDS: [&str; 7] = [
    "create", "run", "start", "exec", "delete", "kill", "restore",
];

/// Options taking a value (in the next argument, unless given as `--opt=value`) of runc
/// 1.1 and crun 1.8: global ones, then per command. Others are flags.
const GLOBAL_VALUE_OPTIONS: [&str; 7] = [
    "--log",
    "--log-format",
    "--log-level",
    "--root",
    "--criu",
    "--rootless",
    "--cgroup-manager",
];
/// create, run, restore (`-f` is crun's `--config` here, but `delete --force` elsewhere).
const CREATE_VALUE_OPTIONS: [&str; 7] = [
    "--bundle",
    "-b",
    "--config",
    "-f",
    "--console-socket",
    "--pid-file",
    "--preserve-fds",
];
const EXEC_VALUE_OPTIONS: [&str; 18] = [
    "--console-socket",
    "--pid-file",
    "--preserve-fds",
    "--cwd",
    "--env",
    "-e",
    "--user",
    "-u",
    "--additional-gids",
    "-g",
    "--process",
    "-p",
    "--process-label",
    "--apparmor",
    "--cap",
    "-c",
    "--cgroup",
    "--config",
];

/// Whether option `name` takes a value, before (`command` None) or after the subcommand.
fn takes_value(command: Option<&str>, name: &str) -> bool {
    match command {
        None => GLOBAL_VALUE_OPTIONS.contains(&name),
        Some("create" | "run" | "restore") => CREATE_VALUE_OPTIONS.contains(&name),
        Some("exec") => EXEC_VALUE_OPTIONS.contains(&name),
        Some(_) => false,
    }
}

/// Whether a comm (15 bytes at most) may be an OCI runtime's: its program name, or a
/// runtime re-executed from a sealed in-memory copy of itself (crun and runc do this to
/// protect their binary). The kernel then names the process after the memfd
/// (`memfd:crun_clon`, seen on 6.1 and 6.12) or, executed through the descriptor
/// (`execveat(fd, "", AT_EMPTY_PATH)`), after its number (`3`, seen on 5.10). Its command line
/// decides ([`parse`] checks argv[0]).
pub fn is_runtime_comm(comm: &str) -> bool {
    RUNTIMES.iter().any(|(name, _)| *name == comm) || is_exec_from_fd(comm)
}

/// Whether a comm is what the kernel gives a program executed from a file descriptor: the
/// memfd's name, or the descriptor's number.
pub fn is_exec_from_fd(comm: &str) -> bool {
    comm.starts_with("memfd:") || (!comm.is_empty() && comm.bytes().all(|b| b.is_ascii_digit()))
}

/// One runtime invocation, parsed from its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// `runc` or `crun`.
    pub runtime: &'static str,
    /// `create`, `run`, `start`, `exec`, `delete`, `kill` or `restore`.
    pub command: String,
    /// The container ID operand.
    pub id: String,
    /// `--bundle`/`-b` as given (may be relative to the process's working directory).
    pub bundle: Option<PathBuf>,
    /// `--root` (the runtime's state directory) as given.
    pub root: Option<PathBuf>,
}

impl Invocation {
    /// Whether the command creates the container from a bundle (where the bundle defaults
    /// to the working directory).
    pub fn from_bundle(&self) -> bool {
        matches!(self.command.as_str(), "create" | "run" | "restore")
    }
}

/// Parses `argv` when it is an OCI runtime working on one container.
pub fn parse(argv: &[String]) -> Option<Invocation> {
    let exe = Path::new(argv.first()?).file_name()?.to_str()?;
    let runtime = RUNTIMES.iter().find(|(n, _)| *n == exe)?.1;
    let mut command: Option<String> = None;
    let (mut bundle, mut root) = (None, None);
    let mut args = argv[1..].iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            let id = args.next()?;
            return command.map(|command| Invocation {
                runtime,
                command,
                id: id.clone(),
                bundle,
                root,
            });
        }
        if arg.starts_with('-') && arg.len() > 1 {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (arg.as_str(), None),
            };
            let value = match (takes_value(command.as_deref(), name), inline) {
                (_, Some(v)) => Some(v),
                (true, None) => Some(args.next()?.clone()),
                (false, None) => None,
            };
            match (name, value) {
                ("--bundle" | "-b", Some(v)) => bundle = Some(PathBuf::from(v)),
                ("--root", Some(v)) => root = Some(PathBuf::from(v)),
                _ => {}
            }
            continue;
        }
        match &command {
            None if COMMANDS.contains(&arg.as_str()) => command = Some(arg.clone()),
            // `runc init`, `runc state`, `runc list`, ...: not a container's runtime process.
            None => return None,
            Some(c) => {
                return Some(Invocation {
                    runtime,
                    command: c.clone(),
                    id: arg.clone(),
                    bundle,
                    root,
                });
            }
        }
    }
    None
}

/// A runtime process among an event's ancestors, read from /proc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeProcess {
    pub pid: u32,
    /// Escaped.
    pub comm: String,
    pub invocation: Invocation,
    /// Its working directory (a relative `--bundle`, or none, is resolved against it).
    pub cwd: Option<PathBuf>,
    /// Its root directory as /proc shows it (`/proc/<pid>/root`): paths it names can be read
    /// through it from another mount namespace.
    pub proc_dir: PathBuf,
}

impl RuntimeProcess {
    /// The bundle directory: `--bundle` (relative to the working directory), else the
    /// working directory for commands that create the container.
    pub fn bundle(&self) -> Option<PathBuf> {
        match (&self.invocation.bundle, &self.cwd) {
            (Some(b), _) if b.is_absolute() => Some(b.clone()),
            (Some(b), Some(cwd)) => Some(cwd.join(b)),
            (None, Some(cwd)) if self.invocation.from_bundle() => Some(cwd.clone()),
            _ => None,
        }
    }
}

/// Clock ticks of a start time in ns (`/proc/<pid>/stat` field 22's unit).
pub fn start_ticks(start_boottime_ns: u64) -> u64 {
    start_boottime_ns / (1_000_000_000 / procfs::ticks_per_second().max(1))
}

/// Most processes of a cgroup looked at by [`parents_of_cgroup`].
const MAX_PROCS: usize = 8;

/// The parents that look like OCI runtimes (by comm) of the processes in cgroup directory
/// `dir` that are still runtime processes themselves (a container's init before it runs the
/// container's program), as [`Ancestor`]s.
pub fn parents_of_cgroup(proc_root: &Path, dir: &Path) -> Vec<Ancestor> {
    let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return Vec::new();
    };
    let ns_per_tick = 1_000_000_000 / procfs::ticks_per_second().max(1);
    let stat = |pid: u32| {
        Process::new_with_root(proc_root.join(pid.to_string()))
            .and_then(|p| p.stat())
            .ok()
    };
    let mut out: Vec<Ancestor> = Vec::new();
    for pid in text
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .take(MAX_PROCS)
    {
        let Some(child) = stat(pid) else {
            continue;
        };
        let init = child.comm.starts_with("runc:[") || is_runtime_comm(&child.comm);
        let Ok(ppid) = u32::try_from(child.ppid) else {
            continue;
        };
        if !init || ppid == 0 {
            continue;
        }
        let Some(parent) = stat(ppid) else {
            continue;
        };
        if is_runtime_comm(&parent.comm) && !out.iter().any(|a| a.pid == ppid) {
            out.push(Ancestor {
                pid: ppid,
                start_boottime_ns: parent.starttime * ns_per_tick,
                comm: escape_bytes(parent.comm.as_bytes()),
            });
        }
    }
    out
}

/// Reads ancestor `a` from `proc_root` if it is an OCI runtime working on a container:
/// `Ok(None)` when it is not one, `Err` when it cannot be read or is no longer that process
/// (exited, or its pid was reused: its start time differs from the kernel's record).
pub fn read(proc_root: &Path, a: &Ancestor) -> Result<Option<RuntimeProcess>, String> {
    if !is_runtime_comm(&a.comm) {
        return Ok(None);
    }
    let dir = proc_root.join(a.pid.to_string());
    let p = Process::new_with_root(dir.clone()).map_err(|e| format!("{}: {e}", dir.display()))?;
    if a.start_boottime_ns != 0 {
        let stat = p
            .stat()
            .map_err(|e| format!("{}/stat: {e}", dir.display()))?;
        if stat.starttime != start_ticks(a.start_boottime_ns) {
            return Err(format!(
                "pid {} is no longer the {} the kernel recorded (it started at tick {}, not {})",
                a.pid,
                a.comm,
                stat.starttime,
                start_ticks(a.start_boottime_ns)
            ));
        }
    }
    let argv = p
        .cmdline()
        .map_err(|e| format!("{}/cmdline: {e}", dir.display()))?;
    let Some(invocation) = parse(&argv) else {
        return Ok(None);
    };
    Ok(Some(RuntimeProcess {
        pid: a.pid,
        // Escaped already (decoded from the kernel record, or read by parents_of_cgroup).
        comm: a.comm.clone(),
        invocation,
        cwd: p.cwd().ok(),
        proc_dir: dir,
    }))
}

/// `/proc/PID/stat` after the start time (fields 23-52 of a real line), for fake /proc trees.
#[cfg(test)]
pub(crate) const STAT_TAIL: &str = " 3133440 392 18446744073709551615 94145461321728 94145461341609 140735385619136 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 94145461357616 94145461359232 94145707905024 140735385627362 140735385627382 140735385627382 140735385628651 0";

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn runc_and_crun_command_lines() {
        let i = parse(&argv("runc run obs1")).unwrap();
        assert_eq!(
            (
                i.runtime,
                i.command.as_str(),
                i.id.as_str(),
                i.bundle.as_deref()
            ),
            ("runc", "run", "obs1", None)
        );
        assert!(i.from_bundle());
        // containerd's shim.
        let i = parse(&argv(
            "/usr/sbin/runc --root /run/containerd/runc/k8s.io --log /run/x/log.json \
             --log-format json create --bundle /run/containerd/io.containerd.runtime.v2.task/k8s.io/abc \
             --pid-file /run/x/init.pid abc",
        ))
        .unwrap();
        assert_eq!(i.command, "create");
        assert_eq!(i.id, "abc");
        assert_eq!(
            i.root.as_deref(),
            Some(Path::new("/run/containerd/runc/k8s.io"))
        );
        assert_eq!(
            i.bundle.as_deref(),
            Some(Path::new(
                "/run/containerd/io.containerd.runtime.v2.task/k8s.io/abc"
            ))
        );
        let i = parse(&argv(
            "crun --root=/run/c --cgroup-manager=cgroupfs run -d -b=b x1",
        ))
        .unwrap();
        assert_eq!((i.runtime, i.id.as_str()), ("crun", "x1"));
        assert_eq!(i.bundle.as_deref(), Some(Path::new("b")));
        assert_eq!(i.root.as_deref(), Some(Path::new("/run/c")));
        let i = parse(&argv(
            "runc --systemd-cgroup run --no-pivot -d -b /tmp/ctr/a a",
        ))
        .unwrap();
        assert_eq!(
            (i.id.as_str(), i.bundle.as_deref()),
            ("a", Some(Path::new("/tmp/ctr/a")))
        );
        // exec: the operand after the options is the container; the command follows.
        let i = parse(&argv(
            "runc exec -e K=V --cap CAP_SYS_MODULE -t ctr modprobe dummy",
        ))
        .unwrap();
        assert_eq!((i.command.as_str(), i.id.as_str()), ("exec", "ctr"));
        assert!(!i.from_bundle());
        let i = parse(&argv("runc delete -f -- -odd-id")).unwrap();
        assert_eq!(i.id, "-odd-id");
        let i = parse(&argv("docker-runc start c")).unwrap();
        assert_eq!((i.runtime, i.command.as_str()), ("runc", "start"));
    }

    #[test]
    fn other_programs_and_commands_are_not_runtime_processes() {
        for s in [
            "runc init",
            "runc state x",
            "runc list",
            "runc",
            "runc run",
            "runc --root",
            "containerd-shim-runc-v2 -namespace moby -id x",
            "sh -c runc run x",
            "",
        ] {
            assert_eq!(parse(&argv(s)), None, "{s:?}");
        }
        assert!(is_runtime_comm("runc") && is_runtime_comm("crun"));
        // crun re-executed from its memfd copy (seen in the test VMs).
        assert!(is_runtime_comm("memfd:crun_clon") && is_runtime_comm("3"));
        assert!(!is_runtime_comm("runc:[2:INIT]") && !is_runtime_comm("sh"));
    }

    #[test]
    fn the_bundle_defaults_to_the_working_directory() {
        let mut p = RuntimeProcess {
            pid: 1,
            comm: "runc".into(),
            invocation: parse(&argv("runc create c")).unwrap(),
            cwd: Some("/b".into()),
            proc_dir: "/proc/1".into(),
        };
        assert_eq!(p.bundle().as_deref(), Some(Path::new("/b")));
        p.invocation = parse(&argv("runc create -b rel c")).unwrap();
        assert_eq!(p.bundle().as_deref(), Some(Path::new("/b/rel")));
        p.invocation = parse(&argv("runc start c")).unwrap();
        assert_eq!(p.bundle(), None);
    }

    #[test]
    fn a_reused_pid_is_not_taken_for_the_runtime() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("4242");
        std::fs::create_dir_all(&dir).unwrap();
        let tps = procfs::ticks_per_second();
        let stat = format!(
            "4242 (runc) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 777{}",
            STAT_TAIL
        );
        std::fs::write(dir.join("stat"), stat).unwrap();
        std::fs::write(dir.join("cmdline"), b"runc\0run\0-b\0/x\0c1\0").unwrap();
        std::os::unix::fs::symlink("/tmp", dir.join("cwd")).unwrap();
        let a = |start_ticks: u64, comm: &str| Ancestor {
            pid: 4242,
            start_boottime_ns: start_ticks * (1_000_000_000 / tps),
            comm: comm.to_string(),
        };
        let p = read(t.path(), &a(777, "runc")).unwrap().unwrap();
        assert_eq!(p.invocation.id, "c1");
        assert_eq!(p.bundle().as_deref(), Some(Path::new("/x")));
        assert_eq!(p.cwd.as_deref(), Some(Path::new("/tmp")));
        let e = read(t.path(), &a(778, "runc")).unwrap_err();
        assert!(e.contains("no longer"), "{e}");
        assert_eq!(
            read(t.path(), &a(777, "sh")),
            Ok(None),
            "not a runtime's comm"
        );
        assert!(
            read(
                t.path(),
                &Ancestor {
                    pid: 1,
                    ..a(1, "runc")
                }
            )
            .is_err()
        );
    }
}
