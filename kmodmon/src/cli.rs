//! Command-line interface (clap). Each subcommand's options live here; the work lives in the
//! module named in its doc comment.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    Tail(crate::tail::TailArgs),
    /// Show which kernel sources kmodmon would attach here, and why, and which cgroups
    /// (cgroup2, a cgroup v1 hierarchy) attribute events (as root it attaches, then detaches).
    Sources,
    /// What is loaded now: who loaded each module and when (the daemon's ledger, the audit
    /// log), its identity (sha256, signature, origin), or loaded_before_kmodmon.
    Modules(crate::modules::ModulesArgs),
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;
    use crate::event::Kind;

    /// The `--kind` help of `tail` and `export` names every kind the filter accepts.
    #[test]
    fn kind_help_lists_every_kind() {
        let mut cli = Cli::command();
        for sub in ["tail", "export"] {
            let cmd = cli
                .find_subcommand_mut(sub)
                .unwrap_or_else(|| panic!("{sub} subcommand"));
            let help = cmd
                .get_arguments()
                .find(|a| a.get_id() == "kinds")
                .and_then(|a| a.get_help())
                .map(|h| h.to_string())
                .unwrap_or_else(|| panic!("{sub} --kind help"));
            for k in Kind::ALL {
                assert!(
                    help.contains(k.as_str()),
                    "{sub} --kind help lacks {}",
                    k.as_str()
                );
            }
        }
    }
}
