//! `kmodmon policy check FILE` and `kmodmon policy show [FILE]`.
use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};

use super::{DEFAULT_PATH, Effective, Policy, RuleRef, Subject};
use crate::host::tracking::DeclState;
use crate::host::{Registry, RegistryOptions};

#[derive(Args, Debug)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate a policy file: unknown keys, bad module names, conflicting rules are reported
    /// as FILE:LINE:COLUMN (exit 1).
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// The effective decision for the host and for each running container.
    Show {
        /// The policy file (default /etc/kmodmon/policy.toml).
        file: Option<PathBuf>,
    },
}

pub fn run(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        PolicyCommand::Check { file } => match Policy::load(&file) {
            Ok(p) => {
                println!(
                    "{}: ok (mode {}, {} rule{})",
                    file.display(),
                    p.mode,
                    p.rules.len(),
                    if p.rules.len() == 1 { "" } else { "s" }
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        PolicyCommand::Show { file } => {
            let path = file.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
            let policy = match Policy::load(&path) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            show(&policy);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn show(policy: &Policy) {
    println!("mode: {}", policy.mode);
    println!("{}", summary(policy, &policy.host_decision()));
    let mut registry = Registry::open(RegistryOptions::detect());
    registry.settle(std::time::Instant::now() + std::time::Duration::from_secs(2));
    let list = registry.running();
    if list.is_empty() {
        println!("no running containers found (runtime state directories are empty)");
    }
    for t in &list {
        let labels = t.labels();
        let subject = Subject {
            container: &t.container,
            labels: &labels,
            declared: t.declared_modules(),
        };
        let eff = policy.decide(&subject);
        let c = &t.container;
        let declared_in = match &t.state {
            DeclState::Known(d) if d.declared && !eff.from_declaration.is_empty() => {
                format!(" [declared in {}]", d.what())
            }
            _ => String::new(),
        };
        println!(
            "container {} ({}{}): {}{declared_in}",
            short_id(&c.id),
            if c.runtime.is_empty() {
                "unknown runtime"
            } else {
                &c.runtime
            },
            c.name
                .as_deref()
                .map(|n| format!(", name {n}"))
                .unwrap_or_default(),
            summary(policy, &eff)
        );
    }
}

fn short_id(id: &str) -> &str {
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        &id[..12]
    } else {
        id
    }
}

/// One line: which rule, and what may load.
pub fn summary(policy: &Policy, e: &Effective) -> String {
    let rule = policy.describe_rule(Policy::rule_id(e.rule));
    if !e.restrict {
        return format!("{rule}: any module may load");
    }
    let mut s = if e.allowed.is_empty() {
        format!("{rule}: no module may load")
    } else {
        format!(
            "{rule}: only {} may load",
            e.allowed.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    if !e.from_declaration.is_empty() {
        s.push_str(&format!(
            " ({} from its declaration)",
            e.from_declaration
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if matches!(e.rule, RuleRef::Unselected) {
        s.push_str(" [no rule selects it]");
    }
    s
}
