//! Man pages and shell completions, generated from the clap definitions in [`crate::cli`] so
//! they never drift from the real options: `kmodmon completions SHELL` prints one script;
//! `kmodmon generate-docs --out DIR` (hidden, used by `cargo xtask package`) writes them all.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::Cli;

const BIN: &str = "kmodmon";

/// The command line as users see it: without hidden subcommands (clap_complete's bash script
/// would otherwise offer `generate-docs`).
fn visible_command() -> clap::Command {
    let full = Cli::command();
    let subcommands: Vec<clap::Command> = full
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    clap::Command::new(BIN)
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .args(full.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .subcommands(subcommands)
}

/// Prints the completion script for `shell` to stdout.
pub fn print_completions(shell: Shell) -> anyhow::Result<ExitCode> {
    let mut cmd = visible_command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, BIN, &mut out);
    out.flush().context("writing the completion script")?;
    Ok(ExitCode::SUCCESS)
}

/// What [`generate`] wrote.
#[derive(Debug)]
pub struct Generated {
    pub man_pages: Vec<PathBuf>,
    pub completions: Vec<PathBuf>,
}

/// Writes `out/man/kmodmon.1`, one page per subcommand (`kmodmon-tail.1`, `kmodmon-policy-check.1`,
/// ...), and `out/completions/` scripts for bash, zsh and fish.
pub fn generate(out: &Path) -> anyhow::Result<Generated> {
    let man = out.join("man");
    let comp = out.join("completions");
    for dir in [&man, &comp] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // `kmodmon help SUB` is `kmodmon SUB --help`: no pages of its own.
    let mut pages = Cli::command().disable_help_subcommand(true);
    pages.build();
    let mut man_pages = Vec::new();
    write_pages(&pages, &man, &mut man_pages)?;
    let mut cmd = visible_command();
    let mut completions = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, BIN, &comp)
            .with_context(|| format!("writing the {shell} completions in {}", comp.display()))?;
        completions.push(path);
    }
    Ok(Generated {
        man_pages,
        completions,
    })
}

/// One page for `cmd`, then one for each visible subcommand, recursively. Pages are named by
/// the dashed display name clap gives built subcommands, as man(1) looks them up:
/// `man kmodmon-policy-check`.
fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    let mut buf = Vec::new();
    let man = clap_mangen::Man::new(cmd.clone());
    let rendered = if name == BIN {
        render_main(&man, &mut buf)
    } else {
        man.render(&mut buf)
    };
    rendered.with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

/// The sections of kmodmon(1) that no option describes: (heading, [(term, text)]).
const MAIN_SECTIONS: &[(&str, &[(&str, &str)])] = &[
    (
        "FILES",
        &[
            (
                "/etc/kmodmon/kmodmon.toml",
                "Configuration of kmodmon run (unknown keys are errors, reported with line and \
                 column; kmodmon run --check-config validates it).",
            ),
            (
                "/etc/kmodmon/policy.toml",
                "Enforcement policy, used when the configuration names it (kmodmon policy check \
                 validates it).",
            ),
            (
                "/var/lib/kmodmon/audit",
                "The audit log: hash-chained JSON-lines segments (kmodmon log verify, kmodmon \
                 export).",
            ),
            (
                "/sys/fs/bpf/kmodmon",
                "Pinned enforcement programs and maps; they outlive the daemon until kmodmon \
                 enforce off.",
            ),
        ],
    ),
    (
        "ENVIRONMENT",
        &[
            (
                "RUST_LOG",
                "kmodmon's own diagnostics and the eBPF programs' logs, e.g. RUST_LOG=debug.",
            ),
            ("NO_COLOR", "No colour in human output (as --color never)."),
            (
                "KMODMON_CGROUP_ROOT",
                "The host's cgroup2 hierarchy when kmodmon runs in a cgroup namespace of its \
                 own (a pod): e.g. /host/sys/fs/cgroup/unified.",
            ),
            (
                "KMODMON_CGROUP_V1",
                "The cgroup v1 controller whose hierarchy attributes events on v1-only and \
                 hybrid hosts (default: the first of memory, pids, cpu, ... mounted), or off.",
            ),
        ],
    ),
    (
        "EXIT STATUS",
        &[
            ("0", "Success."),
            (
                "1",
                "A check found a problem (check, policy check, log verify).",
            ),
            (
                "2",
                "kmodmon could not do the job: bad arguments or configuration, missing \
                 privileges, an unsupported kernel. The message says what to do.",
            ),
        ],
    ),
    (
        "PRIVILEGES",
        &[(
            "root",
            "Or CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE and CAP_SYS_ADMIN, plus CAP_SYS_PTRACE and \
             CAP_DAC_READ_SEARCH to read other processes' container state. kmodmon sources \
             says which kernel sources this machine offers.",
        )],
    ),
    (
        "SEE ALSO",
        &[(
            "modprobe(8), systemd-modules-load.service(8), bpf(2)",
            "and the README shipped in /usr/share/doc/kmodmon.",
        )],
    ),
];

/// kmodmon(1): clap_mangen's sections, then [`MAIN_SECTIONS`], then the version.
fn render_main(man: &clap_mangen::Man, w: &mut dyn Write) -> std::io::Result<()> {
    use clap_mangen::roff::{Roff, bold, roman};
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    man.render_subcommands_section(w)?;
    let mut roff = Roff::default();
    for (heading, entries) in MAIN_SECTIONS {
        roff.control("SH", [*heading]);
        for (term, text) in *entries {
            roff.control("TP", []);
            roff.text([bold(*term)]);
            roff.text([roman(*text)]);
        }
    }
    roff.to_writer(w)?;
    man.render_version_section(w)
}

/// `kmodmon generate-docs --out DIR`.
pub fn run_generate(out: &Path) -> anyhow::Result<ExitCode> {
    let g = generate(out)?;
    println!(
        "wrote {} man pages in {} and {} completion scripts in {}",
        g.man_pages.len(),
        out.join("man").display(),
        g.completions.len(),
        out.join("completions").display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_every_visible_subcommand_and_completions_every_shell() {
        let dir = tempfile::tempdir().unwrap();
        let g = generate(dir.path()).unwrap();
        let names: Vec<String> = g
            .man_pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "kmodmon.1",
            "kmodmon-tail.1",
            "kmodmon-run.1",
            "kmodmon-check.1",
            "kmodmon-policy-check.1",
            "kmodmon-enforce-on.1",
            "kmodmon-completions.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("generate-docs") || n.contains("help")),
            "{names:?}"
        );
        let main = std::fs::read_to_string(dir.path().join("man/kmodmon.1")).unwrap();
        assert!(
            main.starts_with(".ie"),
            "roff: {}",
            &main[..40.min(main.len())]
        );
        assert!(main.contains("kmodmon\\-tail(1)"), "subcommands listed");
        assert!(main.contains(".SH FILES") && main.contains(".SH \"EXIT STATUS\""));
        // Every page a page refers to exists.
        for sub in ["tail", "run", "policy", "policy-show", "log-verify"] {
            assert!(
                names.contains(&format!("kmodmon-{sub}.1")),
                "{sub}: {names:?}"
            );
        }
        let tail = std::fs::read_to_string(dir.path().join("man/kmodmon-tail.1")).unwrap();
        assert!(tail.contains("\\-\\-json"), "options rendered");
        let bash = std::fs::read_to_string(&g.completions[0]).unwrap();
        assert!(bash.contains("complete -F") && bash.contains("--load-expected"));
        for script in &g.completions {
            let text = std::fs::read_to_string(script).unwrap();
            assert!(!text.contains("generate-docs"), "{}", script.display());
            assert!(text.contains("check-config"), "{}", script.display());
        }
        assert_eq!(g.completions.len(), 3);
    }
}
