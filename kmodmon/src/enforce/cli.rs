//! `kmodmon enforce on|off|status`.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use kmodmon_common::policy::{MODE_AUDIT, MODE_ENFORCE, MODE_OFF};

use super::{
    EnforceError, Enforcer, Installed, PinDir, StartOptions, host,
    pins::{self, PolicyMaps},
    scan_running,
};
use crate::{
    event::{Clock, Event, raw_from_bytes},
    moddb::live::module_support,
    policy::{DEFAULT_PATH, Mode},
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
        /// Stay in the foreground: rescan containers every second, reload the policy on
        /// SIGHUP, print denied / would_deny events as JSON lines.
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
            let enforcer = match Enforcer::start(opts) {
                Ok(e) => e,
                Err(e @ (EnforceError::NoModuleSupport | EnforceError::BpfLsmInactive { .. })) => {
                    eprintln!("kmodmon: {e}");
                    return Ok(ExitCode::from(2));
                }
                Err(e) => return Err(e).context("enforce on"),
            };
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
            if !module_support() {
                println!("warning: {}", host::NO_MODULES_EXPLANATION);
            }
            if foreground {
                return foreground_loop(enforcer, off_on_exit);
            }
            println!(
                "note: containers started from now on fall under the host entry until `kmodmon \
                 run` (or `kmodmon enforce on --foreground`) maps them"
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
    let links = dir.pinned_links();
    println!(
        "pinned links: {links}/{} under {}",
        pins::expected_links(),
        dir.root.display()
    );
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
            println!(
                "cgroup entries: {} (host included); allowed names: {}",
                maps.cgroups.keys().count(),
                maps.allow.keys().count()
            );
        }
        Err(_) if links == 0 => println!("enforcement: not installed"),
        Err(e) => println!("policy maps: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn foreground_loop(mut enforcer: Enforcer, off_on_exit: bool) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let mut events = enforcer.take_events();
    let clock = Clock::new();
    rt.block_on(async {
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = hup.recv() => match enforcer.reload(None) {
                    Ok(()) => eprintln!("kmodmon: policy reloaded (mode {})", enforcer.mode()),
                    Err(e) => eprintln!(
                        "kmodmon: policy reload rejected, the previous policy stays in force: {e}"
                    ),
                },
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => {
                    n += 1;
                    if let Some(ring) = events.as_mut() {
                        while let Some(item) = ring.next() {
                            match raw_from_bytes(&item).and_then(|r| Event::from_raw(&r, &clock)) {
                                Ok(mut ev) => {
                                    enforcer.describe(&mut ev);
                                    if let Ok(line) = serde_json::to_string(&ev) {
                                        println!("{line}");
                                    }
                                }
                                Err(e) => eprintln!("kmodmon: undecodable record: {e}"),
                            }
                        }
                    }
                    if n.is_multiple_of(5)
                        && let Err(e) = enforcer.sync(scan_running())
                    {
                        eprintln!("kmodmon: updating the policy maps failed: {e}");
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    enforcer.shutdown(off_on_exit)?;
    Ok(ExitCode::SUCCESS)
}
