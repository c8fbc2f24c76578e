//! `cargo xtask <task>`: everything the project needs besides cargo itself.
mod setup;
mod tasks;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "kmodmon project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent, quiet when all is there).
    Setup,
    /// Build kmodmon (release) and run it as root: `cargo xtask run -- tail --json`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The whole test suite: formatting, lints, unit and end-to-end tests, VM tests.
    Test {
        /// Skip the VM scenarios (host tests only).
        #[arg(long)]
        no_vm: bool,
    },
    /// Lints only: rustfmt, clippy for the workspace and (separately) the eBPF crate.
    Lint,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::setup(),
        Task::Run { args } => tasks::run(&args),
        Task::Test { no_vm } => tasks::test(no_vm),
        Task::Lint => tasks::lint(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
