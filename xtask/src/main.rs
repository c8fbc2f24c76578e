//! `cargo xtask <task>`: everything the project needs besides cargo itself.
mod bench;
mod build;
mod setup;
mod ship;
mod tasks;
mod util;
mod vm;

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
    /// Build the Debian package (target/debian/kmodmon_VERSION-1_ARCH.deb).
    Package,
    /// Validate deploy/: the Kubernetes manifests against the Kubernetes schemas and what
    /// kmodmon needs, the Dockerfile with hadolint, then what validate-monitoring checks.
    ValidateDeploy,
    /// Only the monitoring part of validate-deploy: the PrometheusRule with `promtool check
    /// rules` and `promtool test rules`, the Grafana dashboard's queries with promtool.
    ValidateMonitoring,
    /// Host benchmarks, paired in one run as ratios (see BENCHMARKS.md).
    Bench {
        /// Rounds per measurement (medians are reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// This tree's kmodmon and another kmodmon binary side by side, interleaved: syscall cost,
    /// syscall → JSON line latency, storm delivery, RSS (writes target/bench/compare.md).
    BenchCompare {
        /// The other kmodmon binary (e.g. a previous release).
        other: std::path::PathBuf,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Run a shell script as root in a VM (Debian kernel with modules, kmodmon on PATH);
    /// prints its output and exits with its exit code.
    VmRun {
        /// Kernel series (5.10, 6.1, 6.12), Debian suite or release; default: the newest.
        #[arg(long)]
        kernel: Option<String>,
        script: std::path::PathBuf,
    },
    /// Run the VM scenarios (tests/vm) on every kernel of the matrix, checking kmodmon's events.
    VmTest {
        /// Only this kernel (series, suite or release).
        #[arg(long)]
        kernel: Option<String>,
        /// Only scenarios whose name contains this.
        #[arg(long)]
        scenario: Option<String>,
    },
    /// Download and unpack the VM kernels (cached under target/vm/kernels).
    VmFetch {
        #[arg(long)]
        kernel: Option<String>,
        /// Look for newer kernel packages even when one is cached.
        #[arg(long)]
        refresh: bool,
    },
    /// Measure getppid overhead in the VM (every kernel unless one is named): no monitor,
    /// kmodmon, kmodmon on raw_syscalls, auditd's module rule; then syscall → JSON line
    /// latency for a VM process and a runc container.
    VmBench {
        #[arg(long)]
        kernel: Option<String>,
        /// Instead: the cost of reporting seccomp-refused attempts, for a task under a
        /// seccomp filter and an unconfined one (no monitor, kmodmon, kmodmon
        /// --no-seccomp-attempts).
        #[arg(long)]
        seccomp: bool,
        /// Count instructions instead of wall time (QEMU `-icount shift=0`): deterministic, free
        /// of the host's load; a cost model for comparing mechanisms, not real time.
        #[arg(long)]
        icount: bool,
    },
    /// The cost of reporting seccomp-refused attempts on this host, for a task under a seccomp
    /// filter and an unconfined one, side by side (writes target/bench/seccomp.md).
    BenchSeccomp {
        #[arg(long, default_value_t = 7)]
        rounds: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::setup(),
        Task::Run { args } => tasks::run(&args),
        Task::Test { no_vm } => tasks::test(no_vm),
        Task::Lint => tasks::lint(),
        Task::Package => ship::package().map(|_| ()),
        Task::ValidateDeploy => ship::validate_deploy(),
        Task::ValidateMonitoring => ship::validate_monitoring(),
        Task::Bench { rounds } => bench::bench(rounds),
        Task::BenchCompare { other, rounds } => bench::bench_compare(&other, rounds),
        Task::VmRun { kernel, script } => vm::vm_run(kernel.as_deref(), &script),
        Task::VmTest { kernel, scenario } => vm::vm_test(kernel.as_deref(), scenario.as_deref()),
        Task::VmFetch { kernel, refresh } => vm::vm_fetch(kernel.as_deref(), refresh),
        Task::VmBench {
            kernel,
            seccomp,
            icount,
        } => vm::vm_bench(kernel.as_deref(), seccomp, icount),
        Task::BenchSeccomp { rounds } => bench::bench_seccomp(rounds),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
