//! `kmodmon enforce on|off|status`.
use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use kmodmon_common::policy::{MODE_AUDIT, MODE_ENFORCE, MODE_OFF};

use super::{
    EnforceError, Enforcer, Installed, PinDir, StartOptions, host,
    pins::{self, PolicyMaps},
};
use crate::{
    host::{Registry, RegistryOptions, moddb::live::module_support},
    policy::{DEFAULT_PATH, Mode},
    session::{Session, SessionOptions, Sig, Signals},
    sinks::{Fanout, Output, json, lines::LineSink},
};

#[derive(Args, Debug)]
pub struct EnforceArgs {
    #[command(subcommand)]
    pub command: EnforceCommand,
}

#[derive(Subcommand, Debug)]
pub enum EnforceCommand {
    /// Install (or adopt) the pinned LSM programs and apply the policy to the host and the
    /// running containers. The pins keep enforcing after kmodmon exits; `kmodmon run` (or
    /// --foreground) keeps them current as containers come and go.
    On {
        /// The policy file.
        #[arg(long, value_name = "FILE", default_value = DEFAULT_PATH)]
        policy: PathBuf,
        /// Override the policy's mode.
        #[arg(long, value_parser = ["audit", "enforce"])]
        mode: Option<String>,
        /// Replace pinned programs with this binary's (after an upgrade) instead of adopting.
        #[arg(long)]
        replace: bool,
        /// Install even where the kernel has no module support (the hooks never fire there).
        #[arg(long)]
        force: bool,
        /// Stay in the foreground: map containers as their cgroups appear, reload the policy
        /// on SIGHUP, print denied / would_deny events (enriched) as JSON lines.
        #[arg(long)]
        foreground: bool,
        /// With --foreground: remove the pins on SIGTERM / SIGINT (default: leave them).
        #[arg(long, requires = "foreground")]
        off_on_exit: bool,
    },
    /// Turn enforcement off and remove every pin.
    Off,
    /// What is installed and in force.
    Status,
}

pub fn run(args: EnforceArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        EnforceCommand::On {
            policy,
            mode,
            replace,
            force,
            foreground,
            off_on_exit,
        } => {
            let mut opts = StartOptions::new(policy);
            opts.mode = mode.as_deref().and_then(Mode::parse);
            opts.replace = replace;
            opts.force = force;
            if foreground {
                return foreground_run(opts, off_on_exit);
            }
            let mut registry = Registry::open(RegistryOptions::detect());
            // Read what the running containers declare (trust_kernel_modules needs it).
            registry.settle(Instant::now() + SETTLE);
            let enforcer = match Enforcer::start(opts, &registry) {
                Ok(e) => e,
                Err(e @ (EnforceError::NoModuleSupport | EnforceError::BpfLsmInactive { .. })) => {
                    eprintln!("kmodmon: {e}");
                    return Ok(ExitCode::from(2));
                }
                Err(e) => return Err(e).context("enforce on"),
            };
            announce(&enforcer);
            println!(
                "note: containers started from now on get the [unselected] decision when their \
                 cgroup's parent or name marks them as containers (else the host's) until \
                 `kmodmon run` (or `kmodmon enforce on --foreground`) maps them to their rule"
            );
            enforcer.shutdown(false)?;
            Ok(ExitCode::SUCCESS)
        }
        EnforceCommand::Off => off(&PinDir::default()),
        EnforceCommand::Status => status(&PinDir::default()),
    }
}

fn off(dir: &PinDir) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        return Err(EnforceError::NotRoot.into());
    }
    if let Ok(maps) = PolicyMaps::open(dir) {
        let mut maps = maps;
        let s = maps.settings.get(&0, 0).unwrap_or_default();
        let off = kmodmon_common::policy::Settings {
            mode: MODE_OFF,
            generation: s.generation.wrapping_add(1),
        };
        if let Err(e) = maps.settings.set(0, off, 0) {
            eprintln!("warning: could not switch the policy off before unpinning: {e}");
        }
    }
    let n = pins::remove(dir)?;
    if n == 0 {
        println!(
            "enforcement was not installed (no pins under {})",
            dir.root.display()
        );
    } else {
        println!(
            "enforcement off: removed {n} pins under {}; a running `kmodmon run` still holding \
             the programs has them switched off",
            dir.root.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn status(dir: &PinDir) -> anyhow::Result<ExitCode> {
    match host::active_lsms() {
        Ok(l) if l.iter().any(|x| x == "bpf") => println!("BPF LSM: active ({})", l.join(",")),
        Ok(l) => println!(
            "BPF LSM: NOT active ({}); enable with the boot parameter `{}`",
            l.join(","),
            host::suggested_lsm_param(&l.join(","))
        ),
        Err(e) => println!("BPF LSM: unknown ({e})"),
    }
    if module_support() {
        println!("module support: yes");
    } else {
        println!("module support: no — {}", host::NO_MODULES_EXPLANATION);
    }
    let programs = crate::sensor::lsm::expected_programs();
    let links = dir.pinned_links(&programs);
    println!(
        "pinned links: {links}/{} under {}",
        programs.len(),
        dir.root.display()
    );
    if programs.is_empty() {
        match crate::sensor::lsm::plan_here() {
            Ok(_) => {}
            Err(e) => println!("this kernel cannot enforce: {e}"),
        }
    } else if links > 0 {
        for line in super::selfcheck::inspect(dir, &programs) {
            println!("self-check: {line}");
        }
    }
    if links > 0 {
        let this = kmodmon_common::CONTRACT_VERSION;
        match pins::pinned_contract(dir) {
            Some(v) if v == this => println!("contract version of the pins: {v} (this kmodmon's)"),
            Some(v) => println!(
                "contract version of the pins: {v}, this kmodmon's is {this}: `kmodmon enforce on` \
                 replaces them"
            ),
            None => println!(
                "contract version of the pins: none stored (1), this kmodmon's is {this}: \
                 `kmodmon enforce on` replaces them"
            ),
        }
    }
    println!(
        "kmodmon LSM programs loaded in the kernel: {}",
        pins::loaded_program_count()
    );
    match PolicyMaps::open(dir) {
        Ok(maps) => {
            let s = maps.settings.get(&0, 0).unwrap_or_default();
            let mode = match s.mode {
                MODE_AUDIT => "audit",
                MODE_ENFORCE => "enforce",
                MODE_OFF => "off",
                _ => "unknown",
            };
            println!("mode: {mode} (policy generation {})", s.generation);
            use aya::maps::IterableMap as _;
            let cap = |m: &aya::maps::MapData| m.info().map_or(0, |i| i.max_entries());
            println!(
                "cgroup entries: {}/{} (host and [unselected] included); allowed names: {}/{}; \
                 container parents: {}",
                maps.cgroups.keys().count(),
                cap(maps.cgroups.map()),
                maps.allow.keys().count(),
                cap(maps.allow.map()),
                maps.parents.keys().count()
            );
            let count = |c: kmodmon_common::Counter| {
                maps.counters
                    .get(&(c as u32), 0)
                    .map_or(0, |v| v.iter().sum::<u64>())
            };
            let lost: u64 = kmodmon_common::Counter::ALL
                .iter()
                .filter(|c| c.is_event_drop())
                .map(|c| count(*c))
                .sum();
            let acked = maps
                .ack
                .get(&kmodmon_common::policy::ACK_LOST, 0)
                .unwrap_or(0);
            println!(
                "kernel counters: {} denied/would_deny records made, {lost} lost ({acked} of them \
                 reported in a `lost` event), {} unmapped container decisions by name or parent, \
                 {} crypto manager requests judged as their requester",
                count(kmodmon_common::Counter::PolicyDecision),
                count(kmodmon_common::Counter::LsmNameRule),
                count(kmodmon_common::Counter::LsmCryptoInherited),
            );
        }
        Err(_) if links == 0 => println!("enforcement: not installed"),
        Err(e) => println!("policy maps: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// How long `enforce on` waits for running containers' declarations.
const SETTLE: Duration = Duration::from_secs(2);

fn announce(enforcer: &Enforcer) {
    let what = match enforcer.installed {
        Installed::Adopted => "adopted the pinned LSM programs (nothing loaded twice)",
        Installed::Fresh => "installed and pinned the LSM programs",
        Installed::Replaced => "replaced the pinned LSM programs with this binary's",
    };
    println!(
        "enforcement on: {what}; mode {}; policy applied to the host and {} container \
         cgroup(s)",
        enforcer.mode(),
        enforcer.container_count()
    );
    for (cg, why) in enforcer.fallbacks() {
        println!("warning: container cgroup {cg}: {why}");
    }
    if !module_support() {
        println!("warning: {}", host::NO_MODULES_EXPLANATION);
    }
}

/// `enforce on --foreground`: the pipeline with the cgroup programs only (no module events),
/// the enforcer following the registry, denied / would_deny events as JSON lines on stdout.
fn foreground_run(opts: StartOptions, off_on_exit: bool) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let mut signals = Signals::install()?;
        let fanout = Fanout::new(vec![Output::new(
            "stdout",
            Box::new(LineSink::new(std::io::stdout(), json::line)),
        )]);
        let session_opts = SessionOptions {
            sensor: crate::sensor::Options {
                cgroups_only: true,
                ..crate::sensor::Options::default()
            },
            ..SessionOptions::default()
        };
        let mut refused = None;
        let session = Session::start(
            session_opts,
            |registry| match Enforcer::start(opts, registry) {
                Ok(e) => {
                    announce(&e);
                    Ok(Some(e))
                }
                Err(e @ (EnforceError::NoModuleSupport | EnforceError::BpfLsmInactive { .. })) => {
                    refused = Some(e.to_string());
                    anyhow::bail!("{e}")
                }
                Err(e) => Err(e).context("enforce on"),
            },
            fanout,
        );
        let session = match session {
            Ok(s) => s,
            Err(_) if refused.is_some() => {
                eprintln!("kmodmon: {}", refused.unwrap_or_default());
                return Ok(ExitCode::from(2));
            }
            Err(e) => return Err(e),
        };
        loop {
            match signals.next().await {
                Sig::Stop => break,
                Sig::Hangup => match session.pipeline.reload_policy().await {
                    Ok(m) => eprintln!("kmodmon: {m}"),
                    Err(e) => eprintln!("kmodmon: policy reload: {e}"),
                },
            }
        }
        let (finished, summary) = session.finish(&mut signals).await;
        eprintln!("kmodmon: {}", summary.describe());
        if let Some(enf) = finished.enforcer {
            enf.shutdown(off_on_exit)?;
        }
        if let Some(why) = finished.failure {
            anyhow::bail!("{why}");
        }
        Ok(ExitCode::SUCCESS)
    })
}
