//! Command-line interface (clap). Each subcommand's options live here; the work lives in the
//! module named in its doc comment.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "kmodmon",
    version,
    about = "Kernel-module event monitor: who loaded which module, from which container, and was it expected",
    long_about = "Kernel-module event monitor: who loaded which module, from which container, \
                  and was it expected.\n\n\
                  kmodmon watches module loads, unloads, autoload requests and load/unload \
                  attempts (with their results) through eBPF, ties each to its cgroup, \
                  container and pod and to the modules that container declared in \
                  KERNEL_MODULES, and gives a verdict. `tail` streams them, `run` is the daemon \
                  (audit log, metrics, stdout, syslog, policy enforcement with BPF LSM), `check` \
                  compares what is configured to load at boot with what is loaded.",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Stream module events live (human-readable, or JSON lines with --json).
    Tail(TailArgs),
    /// Show which kernel sources kmodmon would attach here, and why (no attaching).
    Sources,
    /// The daemon: monitor continuously into the audit log, metrics, stdout and syslog.
    Run(crate::daemon::RunArgs),
    /// Enforcement policy: `kmodmon policy check FILE`, `kmodmon policy show [FILE]`.
    Policy(crate::policy::PolicyArgs),
    /// Kernel enforcement (BPF LSM): `kmodmon enforce on|off|status`.
    Enforce(crate::enforce::cli::EnforceArgs),
    /// Host drift check: modules configured to load at boot or expected by containers vs.
    /// what is loaded, built in, available and blacklisted (exit 1 when something is wrong).
    Check(crate::check::CheckArgs),
    /// Audit-log tools: `kmodmon log verify DIR` checks the hash chain.
    Log(crate::audit::cli::LogArgs),
    /// Stream events out of an audit log (filters; JSON lines or CSV).
    Export(crate::audit::cli::ExportArgs),
    /// Print a shell completion script to stdout, e.g.
    /// `kmodmon completions bash > /etc/bash_completion.d/kmodmon`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages and completion scripts into DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory: DIR/man/*.1 and DIR/completions/{kmodmon.bash,_kmodmon,kmodmon.fish}.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Output colouring.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum ColorChoice {
    /// Colour when stdout is a terminal and NO_COLOR is unset.
    #[default]
    Auto,
    Always,
    Never,
}

#[derive(Args, Debug, Clone, Default)]
pub struct TailArgs {
    /// One JSON object per line (schema in the README).
    #[arg(long)]
    pub json: bool,
    /// Only events for this module (repeatable; '-' and '_' are equivalent).
    #[arg(long = "module", value_name = "NAME")]
    pub modules: Vec<String>,
    /// Only events of this kind (repeatable): load, unload, request, load_attempt,
    /// unload_attempt, expectation, self_load, denied, would_deny.
    #[arg(long = "kind", value_name = "KIND")]
    pub kinds: Vec<String>,
    /// Only events from this container: a full ID, an ID prefix, a name, or "host".
    #[arg(long = "container", value_name = "ID")]
    pub containers: Vec<String>,
    /// Only events from this process ID (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Exit after printing N events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Colour in human output.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// Do not use fexit even where BTF allows it (use syscall tracepoints instead).
    #[arg(long)]
    pub no_fexit: bool,
    /// Force the raw_syscalls fallback for attempts (for comparison and testing).
    #[arg(long)]
    pub force_raw_syscalls: bool,
    /// Where modules.dep and modules.alias are read from (default /lib/modules/$(uname -r)).
    #[arg(long, value_name = "DIR")]
    pub modules_dir: Option<PathBuf>,
    /// Load (modprobe) a new container's KERNEL_MODULES that are not loaded, before reporting
    /// them; each run is reported as a self_load event.
    #[arg(long)]
    pub load_expected: bool,
}
