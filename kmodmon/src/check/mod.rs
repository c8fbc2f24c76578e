//! `kmodmon check`: the host drift check. What is configured to load at boot (as
//! systemd-modules-load reads it), what running containers expect, against what is loaded,
//! built in, available for the kernel and blocked; /etc/modules entries that nothing reads at
//! boot are reported as `will_not_load_at_boot`. See README "kmodmon check".
//!
//! Library use: [`gather`] builds a [`Report`] for a root; [`run`] is the CLI.
pub mod analyze;
pub mod boot;
pub mod bootloader;
pub mod cmdline;
pub mod conf;
pub mod containers;
pub mod early;
pub mod fix;
pub mod init;
pub mod initramfs;
pub mod legacy;
pub mod modprobe;
pub mod nextboot;
pub mod prom;
pub mod report;

#[cfg(test)]
mod tests;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use serde::Serialize;
use thiserror::Error;

pub use analyze::{ModuleReport, Status};
pub use containers::{ContainerExpectation, ContainerInputs};
pub use report::Report;

use crate::host::moddb::{self, LiveState, ModDb, RootFs};

/// Options of `kmodmon check`.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Print the report as one JSON object (schema in the README).
    #[arg(long)]
    pub json: bool,
    /// Check the root filesystem mounted at DIR instead of the running host.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Kernel version whose /lib/modules/VERSION to check against (default: the running
    /// kernel; under --root, the newest one installed there).
    #[arg(long, value_name = "VERSION")]
    pub kernel: Option<String>,
    /// Add the missing entries to /etc/modules-load.d/kmodmon.conf (shows the diff, asks first).
    #[arg(long)]
    pub fix: bool,
    /// With --fix: write without asking.
    #[arg(long, short = 'y', requires = "fix")]
    pub yes: bool,
    /// Read container expectations from FILE (a JSON array of {container_id, runtime, name,
    /// modules}) instead of the container runtimes' state.
    #[arg(long, value_name = "FILE", conflicts_with = "no_containers")]
    pub containers_file: Option<PathBuf>,
    /// Do not look at running containers.
    #[arg(long)]
    pub no_containers: bool,
    /// Only the reboot question: judge the boot configuration against the kernel that boots
    /// next (the boot loader's default entry, else the newest installed module tree).
    #[arg(long, conflicts_with = "fix")]
    pub next_boot: bool,
    /// Also judge the boot configuration against every installed kernel.
    #[arg(long)]
    pub all_kernels: bool,
}

/// What [`gather_with`] computes besides the running kernel's check.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The next-boot section (`next_boot`).
    pub next_boot: bool,
    /// A section per installed kernel (`all_kernels`).
    pub all_kernels: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            next_boot: true,
            all_kernels: false,
        }
    }
}

#[derive(Debug, Error)]
pub enum CheckError {
    #[error("--root {0}: not a directory")]
    RootNotDir(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not a JSON array of {{container_id, runtime, name, modules}} objects: {source}"
    )]
    ContainersFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Fix(String),
}

/// Something odd found while reading configuration; reported, never fatal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Warning {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    pub message: String,
}

impl Warning {
    pub fn at(path: &str, line: Option<usize>, message: String) -> Warning {
        Warning {
            path: Some(path.to_string()),
            line,
            message,
        }
    }

    pub fn general(message: String) -> Warning {
        Warning {
            path: None,
            line: None,
            message,
        }
    }
}

/// How the kernel version was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelChoice {
    /// --kernel.
    Argument,
    /// The kernel running the root (/proc/sys/kernel/osrelease, i.e. `uname -r`).
    Running,
    /// The newest of the module trees installed under the root.
    NewestInstalled,
    /// None could be found.
    None,
}

/// Picks the kernel: --kernel, else the running one (when the root has a /proc), else the
/// newest installed under the root.
pub fn choose_kernel(root: &RootFs, explicit: Option<&str>) -> (Option<String>, KernelChoice) {
    if let Some(k) = explicit {
        return (Some(k.to_string()), KernelChoice::Argument);
    }
    if let Some(k) = moddb::running_kernel(root) {
        return (Some(k), KernelChoice::Running);
    }
    match moddb::installed_kernels(root).into_iter().next() {
        Some(k) => (Some(k), KernelChoice::NewestInstalled),
        None => (None, KernelChoice::None),
    }
}

/// Reads everything under `root` and compares, with the next-boot section. `containers` is the
/// container list to check (see [`containers::from_runtime_state`]).
pub fn gather(
    root: &RootFs,
    kernel: Option<&str>,
    containers: ContainerInputs,
) -> Result<Report, CheckError> {
    gather_with(root, kernel, containers, Options::default())
}

/// [`gather`], choosing the sections.
pub fn gather_with(
    root: &RootFs,
    kernel: Option<&str>,
    containers: ContainerInputs,
    opts: Options,
) -> Result<Report, CheckError> {
    if !root.dir().is_dir() {
        return Err(CheckError::RootNotDir(root.dir().to_path_buf()));
    }
    let io = |path: &str| {
        let path = root.real(path);
        move |source| CheckError::Io { path, source }
    };
    let cmdline = cmdline::KernelCmdline::read(root).map_err(io(cmdline::PROC_CMDLINE))?;
    let boot = boot::BootConfig::read(root, cmdline.as_ref()).map_err(io("/etc/modules-load.d"))?;
    let modprobe =
        modprobe::ModprobeConfig::read(root, cmdline.as_ref()).map_err(io("/etc/modprobe.d"))?;
    let live = LiveState::read(root).map_err(|e| CheckError::Io {
        path: root.real("/proc/modules"),
        source: std::io::Error::other(e.to_string()),
    })?;
    let (kernel, choice) = choose_kernel(root, kernel);
    let db: Result<ModDb, String> = match &kernel {
        Some(k) => ModDb::for_kernel(root, k).map_err(|e| e.to_string()),
        None => Err(format!(
            "no kernel module trees under {} or {}: pass --kernel VERSION",
            root.real(moddb::MODULE_BASE_DIRS[0]).display(),
            root.real(moddb::MODULE_BASE_DIRS[1]).display()
        )),
    };
    // The version comes from the user or a file of the root: escaped wherever it is shown.
    let kernel_name = kernel.as_deref().map_or_else(
        || "(unknown)".into(),
        |k| crate::escape::escape_bytes(k.as_bytes()),
    );
    let modules = analyze::analyze(&analyze::Inputs {
        boot: &boot.entries,
        containers: &containers.list,
        modprobe: &modprobe,
        db: db.as_ref().ok(),
        live: &live,
        kernel: &kernel_name,
    });
    let (next_boot, all_kernels) = if opts.next_boot || opts.all_kernels {
        let mut warnings = Vec::new();
        let menu = bootloader::discover(root, &mut warnings);
        let running = moddb::running_kernel(root);
        let running_db = running
            .as_deref()
            .and_then(|k| ModDb::for_kernel(root, k).ok());
        let inp = nextboot::Inputs {
            root,
            boot: &boot,
            containers: &containers.list,
            live: &live,
            running: running.as_deref(),
            running_db: running_db.as_ref(),
            running_cmdline: cmdline.as_ref(),
        };
        let mut next = nextboot::judge(&inp, menu.next.clone(), true);
        next.warnings.splice(0..0, warnings);
        let all = opts.all_kernels.then(|| {
            let mut versions = moddb::installed_kernels(root);
            for e in &menu.entries {
                if let Some(v) = &e.version
                    && !versions.contains(v)
                {
                    versions.push(v.clone());
                }
            }
            versions
                .iter()
                .map(|v| {
                    if Some(v) == menu.next.version.as_ref() {
                        next.clone()
                    } else {
                        nextboot::judge(&inp, nextboot::installed(v, menu.entry_for(v)), false)
                    }
                })
                .collect()
        });
        (Some(next), all)
    } else {
        (None, None)
    };
    Ok(Report::new(report::Parts {
        root,
        kernel,
        choice,
        db: &db,
        live: &live,
        boot,
        modprobe,
        containers,
        modules,
        next_boot,
        all_kernels,
    }))
}

/// The CLI: prints the report, applies --fix, returns 0 when nothing expected is missing or
/// will not load at boot, 1 otherwise.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let root = RootFs::new(&args.root);
    let containers = || -> anyhow::Result<ContainerInputs> {
        Ok(if args.no_containers {
            ContainerInputs {
                source: "not checked (--no-containers)".into(),
                ..Default::default()
            }
        } else if let Some(path) = &args.containers_file {
            containers::from_file(path)?
        } else {
            containers::from_runtime_state(&root)
        })
    };
    let opts = Options {
        next_boot: true,
        all_kernels: args.all_kernels,
    };
    let report =
        gather_with(&root, args.kernel.as_deref(), containers()?, opts).context("kmodmon check")?;
    if args.next_boot {
        if args.json {
            println!("{}", report.next_boot_json());
        } else {
            print!("{}", report.next_boot_human());
        }
        return Ok(if report.next_boot_problems() > 0 {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        });
    }
    if !args.fix {
        print_report(&report, args.json);
        return Ok(exit_code(&report));
    }

    let Some(plan) = fix::plan(&root, &report)? else {
        print_report(&report, args.json);
        let msg = "--fix: nothing to add to /etc/modules-load.d/kmodmon.conf";
        if args.json {
            eprintln!("{msg}")
        } else {
            println!("\n{msg}")
        }
        return Ok(exit_code(&report));
    };
    if !args.json {
        print_report(&report, false);
        println!();
    }
    let diff = plan.diff();
    if args.json {
        eprint!("{diff}")
    } else {
        print!("{diff}")
    }
    for (module, why) in &plan.skipped {
        let line = format!("--fix: not adding {module}: {why}");
        if args.json {
            eprintln!("{line}")
        } else {
            println!("{line}")
        }
    }
    let confirmed = if args.yes {
        true
    } else if std::io::stdin().is_terminal() {
        ask(&format!(
            "Write {}? [y/N] ",
            root.real(fix::FIX_FILE).display()
        ))?
    } else {
        if args.json {
            print_report(&report.clone().with_fix(plan.summary(false)), true);
        }
        anyhow::bail!(
            "not writing {}: standard input is not a terminal, so kmodmon cannot ask for confirmation; \
             re-run with --fix --yes to write it",
            root.real(fix::FIX_FILE).display()
        );
    };
    if !confirmed {
        if args.json {
            print_report(&report.clone().with_fix(plan.summary(false)), true);
        } else {
            println!("Not written.");
        }
        return Ok(exit_code(&report));
    }
    plan.write(&root)?;
    let after = gather_with(&root, args.kernel.as_deref(), containers()?, opts)
        .context("kmodmon check after --fix")?;
    if args.json {
        print_report(&after.clone().with_fix(plan.summary(true)), true);
    } else {
        println!(
            "Wrote {} ({} added).",
            root.real(fix::FIX_FILE).display(),
            plan.added.join(", ")
        );
        let now: Vec<&str> = after
            .modules
            .iter()
            .filter(|m| m.loaded == Some(false) && plan.added.contains(&m.module))
            .map(|m| m.module.as_str())
            .collect();
        if !now.is_empty() {
            println!(
                "They load at the next boot; to load them now: modprobe -a {}",
                now.join(" ")
            );
        }
        println!("After the fix: {}", after.summary.sentence());
    }
    Ok(exit_code(&after))
}

fn print_report(report: &Report, json: bool) {
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.human());
    }
}

/// 1 when any expected module has a problem status, now or at the next boot (or, with
/// --all-kernels, with any installed kernel), else 0.
pub fn exit_code(report: &Report) -> ExitCode {
    if report.summary.problems > 0 || report.next_boot_problems() > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn ask(question: &str) -> anyhow::Result<bool> {
    use std::io::Write as _;
    eprint!("{question}");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("reading the answer from standard input")?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}
