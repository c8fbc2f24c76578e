use std::process::ExitCode;

use clap::Parser as _;
use kmodmon::cli::{Cli, Command};

fn main() -> ExitCode {
    // The pipeline's threads hand buffers to each other; glibc's per-thread malloc arenas then
    // each keep what was freed into them (a distinct-name storm peaked at 83–88 MB RSS with the
    // default arenas, 63–67 MB with two, 49 MB with one). Small blocks come from glibc's
    // per-thread caches without taking the arena's lock.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_target(false)
        .init();
    let result = match cli.command {
        Command::Tail(args) => kmodmon::tail::run(args),
        Command::Sources => kmodmon::sensor::explain(),
        Command::Modules(args) => kmodmon::modules::run(args),
        Command::Run(args) => kmodmon::daemon::run(args),
        Command::Policy(args) => kmodmon::policy::run(args),
        Command::Enforce(args) => kmodmon::enforce::cli::run(args),
        Command::Check(args) => kmodmon::check::run(args),
        Command::Log(args) => kmodmon::audit::cli::run_log(args),
        Command::Export(args) => kmodmon::audit::cli::run_export(args),
        Command::Completions { shell } => kmodmon::docs::print_completions(shell),
        Command::GenerateDocs { out } => kmodmon::docs::run_generate(&out),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kmodmon: error: {err:#}");
            // 2, like usage errors: "could not do the job", distinct from check's 1 ("drift found").
            ExitCode::from(2)
        }
    }
}
