//! The live event path, the same for every front end (`tail`, `run`, `enforce --foreground`):
//!
//! ```text
//! rings (events, cgroups, policy) ─▶ reader ─▶ enrich task ─▶ sink thread ─▶ sinks
//!                                              │  registry, enricher
//!                                              └─ enforcer (follows the registry)
//! ```
//!
//! - the [`reader`] only copies records off the rings (a full queue is a counted loss);
//! - the enrich task decodes them, feeds cgroup records to the host registry, enriches every
//!   event (monitor and enforcement records alike), passes the registry's changes to the
//!   enforcer so a new container's cgroup is mapped as soon as its mkdir record is read, and
//!   answers [`Control`] requests (policy reload);
//! - the sink thread offers each event to the [`Fanout`] (sinks may block on a pipe or a
//!   socket without stalling enrichment).
//!
//! Shutdown loses nothing delivered: [`Pipeline::stop`] stops the reader; the enrich task
//! works through its queue, releases held events (their container's declaration then says it
//! was not read), and the sink thread writes everything and closes the sinks.
//! [`Pipeline::finish`] waits for all of it. See [`accounting`] for the exact identity.
pub mod accounting;
pub mod packed;
pub mod reader;
pub mod repeats;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use kmodmon_common::{CGROUP_DFL_HIERARCHY, RawEvent};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};

pub use self::accounting::{Accounting, Flow};
use self::reader::{Msg, Rings};
use crate::enforce::Enforcer;
use crate::enrich::{Enricher, init_names::InitNames};
use crate::event::{Clock, Event, Kind, SourceName};
use crate::identity::join::IdentityJoin;
use crate::ledger::Ledger;
use crate::sinks::{Fanout, SinkReport};

/// Capacity of the reader → enrich queue, in messages (a batch of up to
/// [`reader::BATCH`] records, or one cgroup record).
pub const QUEUE: usize = 4096;
/// Bytes of packed records the reader → enrich queue holds at most: the 16 MiB of the 64
/// batches of 256 whole records the memory budget was measured with, which hold five times as
/// many records packed ([`packed`]).
pub const QUEUE_BYTES: u64 = 16 << 20;
/// Capacity of the enrich → sink queue, in batches of at most [`OUT_BATCH`] events (1024
/// events in all: the size the memory budget was measured with).
pub const OUT_QUEUE: usize = 4;
/// Most events per message to the sink thread (a message per event cost a wake-up each).
pub const OUT_BATCH: usize = 256;
/// How often an idle enrich task turns (captures due, finished modprobe runs, liveness).
const IDLE_POLL: Duration = Duration::from_millis(250);
/// How often an idle enrich task tells the sink thread it is alive.
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum PipelineError {
    #[error("polling a ring buffer: {0}")]
    Poll(std::io::Error),
    #[error("starting the sink thread: {0}")]
    Thread(std::io::Error),
}

/// The rings to read; any may be absent (`enforce --foreground` has no monitor ring).
#[derive(Default)]
pub struct Inputs {
    pub events: Option<RingBuf<MapData>>,
    pub cgroups: Option<RingBuf<MapData>>,
    pub policy: Option<RingBuf<MapData>>,
    /// Module images (identity).
    pub images: Option<RingBuf<MapData>>,
    /// Where the module ledger is written for `kmodmon modules` (the daemon's); the ledger
    /// itself runs whenever the monitor's events are read.
    pub ledger_file: Option<std::path::PathBuf>,
    /// The kernel's open repeat bursts and the repeat window (when attempts are aggregated).
    pub repeats: Option<(crate::sensor::RepeatMap, Duration)>,
}

/// Requests to the enrich task.
pub enum Control {
    /// Re-read the policy file; the reply says what happened.
    ReloadPolicy {
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Runs a function with the live registry (read-only), on the enrich task.
    WithRegistry(Box<dyn FnOnce(&crate::host::Registry) + Send>),
}

enum Out {
    Events(Vec<Event>),
    /// The enrich task is alive (about once a second): periodic work in the sinks.
    Tick,
    /// The audit chain's head, for the sinks that publish it.
    Anchor(crate::audit::Anchor),
}

/// Reads the live registry from another task: the function runs on the enrich task, between
/// two events (so the registry is never shared across threads).
#[derive(Clone)]
pub struct RegistryHandle {
    control: mpsc::Sender<Control>,
}

impl RegistryHandle {
    /// `None` once the pipeline has stopped.
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::host::Registry) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let job = Box::new(move |r: &crate::host::Registry| {
            let _ = tx.send(f(r));
        });
        self.control.send(Control::WithRegistry(job)).await.ok()?;
        rx.await.ok()
    }
}

/// What the pipeline ended with.
pub struct Finished {
    /// The sinks' final reports.
    pub sinks: Vec<SinkReport>,
    /// The enforcer, handed back for its shutdown.
    pub enforcer: Option<Enforcer>,
    /// A task that failed (panicked), if any: the front end exits non-zero.
    pub failure: Option<String>,
}

/// A running pipeline.
pub struct Pipeline {
    stop: watch::Sender<bool>,
    control: mpsc::Sender<Control>,
    pub accounting: Arc<Accounting>,
    /// For messages to the sink thread besides events (dropped at finish, so the sink
    /// thread ends once the enrich task has).
    to_sinks: Option<mpsc::Sender<Out>>,
    reader: tokio::task::JoinHandle<()>,
    enrich: tokio::task::JoinHandle<Option<Enforcer>>,
    sinks: std::thread::JoinHandle<Vec<SinkReport>>,
}

impl Pipeline {
    /// Starts the reader, the enrich task and the sink thread. Must run inside a tokio
    /// runtime.
    pub fn start(
        inputs: Inputs,
        enricher: Enricher,
        enforcer: Option<Enforcer>,
        fanout: Fanout,
    ) -> Result<Pipeline, PipelineError> {
        let register = |r: Option<RingBuf<MapData>>| {
            r.map(reader::register)
                .transpose()
                .map_err(PipelineError::Poll)
        };
        let identity = inputs.images.is_some();
        let ledger = inputs
            .events
            .is_some()
            .then(|| Ledger::start("/", inputs.ledger_file.clone()));
        let rings = Rings {
            events: register(inputs.events)?,
            cgroups: register(inputs.cgroups)?,
            policy: register(inputs.policy)?,
            images: register(inputs.images)?,
            repeats: inputs
                .repeats
                .map(|(map, window)| repeats::Repeats::new(map, window)),
        };
        let accounting = Arc::new(Accounting::default());
        accounting.watch_sinks(fanout.counters());
        let (raw_tx, raw_rx) = mpsc::channel(QUEUE);
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (ctl_tx, ctl_rx) = mpsc::channel(4);
        let (stop_tx, stop_rx) = watch::channel(false);

        let acc = accounting.clone();
        let sinks = std::thread::Builder::new()
            .name("kmodmon-sinks".into())
            .spawn(move || sink_thread(fanout, out_rx, &acc))
            .map_err(PipelineError::Thread)?;
        let reader = tokio::spawn(reader::run(rings, raw_tx, accounting.clone(), stop_rx));
        let to_sinks = Some(out_tx.clone());
        let identities = if identity {
            IdentityJoin::default()
        } else {
            IdentityJoin::disabled()
        };
        let enrich = tokio::spawn(enrich_task(
            (identities, ledger),
            raw_rx,
            ctl_rx,
            enricher,
            enforcer,
            out_tx,
            accounting.clone(),
        ));
        Ok(Pipeline {
            stop: stop_tx,
            control: ctl_tx,
            accounting,
            to_sinks,
            reader,
            enrich,
            sinks,
        })
    }

    /// Stops reading new records; what was delivered still flows to the sinks.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Sends a request to the enrich task.
    pub async fn control(&self, c: Control) -> bool {
        self.control.send(c).await.is_ok()
    }

    /// Re-reads the policy; the answer is the line to log.
    pub async fn reload_policy(&self) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        if !self.control(Control::ReloadPolicy { reply }).await {
            return Err("the pipeline has stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the pipeline has stopped".into()))
    }

    /// A handle for reading the live registry from another task.
    pub fn registry_handle(&self) -> RegistryHandle {
        RegistryHandle {
            control: self.control.clone(),
        }
    }

    /// Publishes the audit chain's head through the sinks that publish it (in order with
    /// the events, so a line is never split).
    pub async fn anchor(&self, a: crate::audit::Anchor) {
        if let Some(tx) = &self.to_sinks {
            let _ = tx.send(Out::Anchor(a)).await;
        }
    }

    /// Whether a task ended on its own (a failure: they run until stopped).
    pub fn has_failed(&self) -> bool {
        self.reader.is_finished() || self.enrich.is_finished() || self.sinks.is_finished()
    }

    /// Stops (if not yet) and waits until everything delivered is written and the sinks are
    /// closed.
    pub async fn finish(mut self) -> Finished {
        self.stop();
        self.to_sinks = None;
        let mut failure = None;
        if let Err(e) = self.reader.await {
            failure = Some(format!("the ring-buffer reader failed: {e}"));
        }
        let enforcer = match self.enrich.await {
            Ok(e) => e,
            Err(e) => {
                failure.get_or_insert(format!("the enrich task failed: {e}"));
                None
            }
        };
        let sinks = match tokio::task::spawn_blocking(move || self.sinks.join()).await {
            Ok(Ok(reports)) => reports,
            Ok(Err(_)) | Err(_) => {
                failure.get_or_insert("the sink thread failed".to_string());
                self.accounting.flow().sinks
            }
        };
        Finished {
            sinks,
            enforcer,
            failure,
        }
    }
}

/// Decodes, enriches and hands events on until the reader is gone; then releases what is
/// held and hands back the enforcer.
/// `stages`: the identity join and the module ledger.
async fn enrich_task(
    stages: (IdentityJoin, Option<Ledger>),
    mut rx: mpsc::Receiver<Msg>,
    mut control: mpsc::Receiver<Control>,
    mut enricher: Enricher,
    mut enforcer: Option<Enforcer>,
    out: mpsc::Sender<Out>,
    acc: Arc<Accounting>,
) -> Option<Enforcer> {
    let clock = Clock::new();
    let mut init_names = InitNames::default();
    let (mut identities, mut ledger) = stages;
    let mut last_tick = Instant::now();
    // The changes of the registry's start-up scan reach the enforcer (it synced with the
    // registry when it started, so this only repeats what it knows); what it found at start
    // (tamper, lost records) goes out first.
    follow(&mut enricher, enforcer.as_mut());
    if let Some(enf) = enforcer.as_mut() {
        for ev in enf.take_reports() {
            enricher.inject(ev);
        }
    }
    let mut sinks_dead = false;
    loop {
        acc.enrich_turned();
        let wakeup = enricher
            .next_wakeup()
            .unwrap_or_else(|| Instant::now() + IDLE_POLL)
            .min(Instant::now() + IDLE_POLL);
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => handle(m, &mut enricher, enforcer.as_ref(), &mut init_names, &mut identities, &clock, &acc),
                None => break,
            },
            Some(c) = control.recv() => match c {
                Control::ReloadPolicy { reply } => {
                    let answer = match enforcer.as_mut() {
                        Some(enf) => enf.reload(None, enricher.registry()),
                        None => Err("no policy configured".to_string()),
                    };
                    let _ = reply.send(answer);
                }
                Control::WithRegistry(f) => f(enricher.registry()),
            },
            _ = tokio::time::sleep_until(wakeup.into()) => {}
        }
        enricher.poll();
        follow(&mut enricher, enforcer.as_mut());
        if !forward(
            &mut enricher,
            ledger.as_mut(),
            enforcer.as_ref(),
            &out,
            &acc,
        )
        .await
        {
            sinks_dead = true;
            break;
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            // Enforcement's self-check; its tamper / lost events go out like any other.
            if let Some(enf) = enforcer.as_mut() {
                enf.tick();
                for ev in enf.take_reports() {
                    enricher.inject(ev);
                }
            }
            if !forward(
                &mut enricher,
                ledger.as_mut(),
                enforcer.as_ref(),
                &out,
                &acc,
            )
            .await
            {
                sinks_dead = true;
                break;
            }
            if out.send(Out::Tick).await.is_err() {
                sinks_dead = true;
                break;
            }
        }
    }
    if sinks_dead {
        // Nothing can be written any more: count what is queued and held as lost.
        rx.close();
        let mut lost = enricher.held() as u64;
        while let Ok(m) = rx.try_recv() {
            lost += match m {
                Msg::Events(b) | Msg::Policy(b) => b.len() as u64,
                Msg::Cgroup { .. } | Msg::Image(_) | Msg::Verdict(_) => 0,
            };
        }
        acc.sinks_gone.fetch_add(lost, Relaxed);
        return enforcer;
    }
    // The reader is gone: work through what it queued, then let held events go.
    while let Ok(m) = rx.try_recv() {
        handle(
            m,
            &mut enricher,
            enforcer.as_ref(),
            &mut init_names,
            &mut identities,
            &clock,
            &acc,
        );
        follow(&mut enricher, enforcer.as_mut());
        forward(
            &mut enricher,
            ledger.as_mut(),
            enforcer.as_ref(),
            &out,
            &acc,
        )
        .await;
    }
    enricher.flush();
    follow(&mut enricher, enforcer.as_mut());
    forward(
        &mut enricher,
        ledger.as_mut(),
        enforcer.as_ref(),
        &out,
        &acc,
    )
    .await;
    enforcer
}

fn handle(
    msg: Msg,
    enricher: &mut Enricher,
    enforcer: Option<&Enforcer>,
    init_names: &mut InitNames,
    identities: &mut IdentityJoin,
    clock: &Clock,
    acc: &Accounting,
) {
    match msg {
        Msg::Image(img) => identities.image(*img),
        Msg::Verdict(v) => identities.verdict(v),
        Msg::Cgroup {
            mkdir,
            hierarchy,
            id,
            path,
        } => match (mkdir, hierarchy == CGROUP_DFL_HIERARCHY) {
            (true, true) => enricher.cgroup_created(id, &path),
            (false, true) => enricher.cgroup_removed(id, &path),
            (true, false) => enricher.cgroup_v1_created(hierarchy, id, &path),
            (false, false) => enricher.cgroup_v1_removed(hierarchy, id, &path),
        },
        Msg::Events(batch) => {
            acc.queued_bytes.fetch_sub(batch.byte_len() as u64, Relaxed);
            for raw in batch.iter() {
                if let Some(mut ev) = decode(&raw, clock, acc) {
                    init_names.observe(&mut ev);
                    identities.observe(&mut ev);
                    enricher.handle(ev);
                }
            }
        }
        Msg::Policy(batch) => {
            acc.queued_bytes.fetch_sub(batch.byte_len() as u64, Relaxed);
            for raw in batch.iter() {
                if let Some(mut ev) = decode(&raw, clock, acc) {
                    if let Some(enf) = enforcer {
                        enf.describe(&mut ev);
                    }
                    identities.observe(&mut ev);
                    enricher.handle(ev);
                }
            }
        }
    }
}

fn decode(raw: &RawEvent, clock: &Clock, acc: &Accounting) -> Option<Event> {
    match Event::from_raw(raw, clock) {
        Ok(ev) => Some(ev),
        Err(e) => {
            acc.undecodable.fetch_add(1, Relaxed);
            log::warn!("undecodable event record: {e}");
            None
        }
    }
}

/// Hands the registry's changes to the enforcer.
fn follow(enricher: &mut Enricher, enforcer: Option<&mut Enforcer>) {
    let changes = enricher.take_changes();
    if let Some(enf) = enforcer {
        for c in &changes {
            enf.follow(c, enricher.registry());
        }
    }
}

/// Sends the ready events on, in batches; false when the sink thread is gone.
async fn forward(
    enricher: &mut Enricher,
    ledger: Option<&mut Ledger>,
    enforcer: Option<&Enforcer>,
    out: &mpsc::Sender<Out>,
    acc: &Accounting,
) -> bool {
    let mut ready = enricher.take_ready();
    if let Some(enf) = enforcer {
        // The policy's identity requirements, verified now that the identity is known.
        let mismatches: Vec<Event> = ready
            .iter()
            .filter_map(|ev| enf.verify_identity(ev))
            .collect();
        ready.extend(mismatches);
    }
    if let Some(l) = ledger {
        for ev in &ready {
            l.observe(ev);
        }
        ready.extend(l.check());
    }
    // Events kmodmon made itself (expectation, self_load, the module ledger's, enforcement's
    // tamper and lost: a `lost` event names the LSM as its source, yet no record carried it).
    let synthesized = ready
        .iter()
        .filter(|ev| ev.source == SourceName::Kmodmon || matches!(ev.kind, Kind::Lost))
        .count();
    acc.synthesized.fetch_add(synthesized as u64, Relaxed);
    let mut gone = 0u64;
    while !ready.is_empty() {
        let rest = ready.split_off(ready.len().min(OUT_BATCH));
        let n = ready.len() as u64;
        if gone > 0 || out.send(Out::Events(ready)).await.is_err() {
            gone += n;
        }
        ready = rest;
    }
    if gone > 0 {
        acc.sinks_gone.fetch_add(gone, Relaxed);
        log::error!("the sink thread is gone: {gone} events not written");
        return false;
    }
    true
}

fn sink_thread(
    mut fanout: Fanout,
    mut rx: mpsc::Receiver<Out>,
    acc: &Accounting,
) -> Vec<SinkReport> {
    acc.sink_turned();
    while let Some(m) = rx.blocking_recv() {
        acc.sink_turned();
        match m {
            Out::Events(batch) => {
                for ev in &batch {
                    fanout.deliver(ev);
                }
            }
            Out::Tick => fanout.tick(),
            Out::Anchor(a) => fanout.anchor(&a),
        }
        if rx.is_empty() {
            fanout.flush();
        }
    }
    fanout.close()
}
