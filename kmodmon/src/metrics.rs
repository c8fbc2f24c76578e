//! Prometheus metrics: [`Metrics`] holds atomic counters the pipeline increments, and
//! [`MetricsServer`] serves them as Prometheus text (format 0.0.4) on `GET /metrics`, and the
//! daemon's [`Health`] on `GET /ready` and `GET /healthz` (200 or 503, one line of text).
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use kmodmon::metrics::{Metrics, MetricsServer};
//! let metrics = Arc::new(Metrics::new());
//! let server = MetricsServer::bind("127.0.0.1:9464".parse().unwrap()).await?;
//! tokio::spawn(server.serve(metrics.clone()));
//! metrics.drop_events("ringbuf_full", 3);
//! # Ok(()) }
//! ```
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;

use crate::event::{Event, Kind, Verdict};
use crate::health::Health;
use crate::sinks::{SinkCounters, SinkReport};

/// Series per labelled family beyond which new label sets are counted under "other".
const MAX_SERIES: usize = 512;

/// A counter family with `N` labels. Increments take a read lock and an atomic add; a new
/// label set takes the write lock once.
pub struct Labeled<const N: usize> {
    series: RwLock<Vec<([String; N], AtomicU64)>>,
}

impl<const N: usize> Default for Labeled<N> {
    fn default() -> Self {
        Labeled {
            series: RwLock::new(Vec::new()),
        }
    }
}

impl<const N: usize> Labeled<N> {
    pub fn add(&self, labels: [&str; N], n: u64) {
        let find = |v: &Vec<([String; N], AtomicU64)>, labels: &[&str; N]| {
            v.iter()
                .position(|(l, _)| l.iter().zip(labels.iter()).all(|(a, b)| a == b))
        };
        if let Ok(v) = self.series.read()
            && let Some(i) = find(&v, &labels)
        {
            v[i].1.fetch_add(n, Relaxed);
            return;
        }
        let Ok(mut v) = self.series.write() else {
            return;
        };
        let labels = if v.len() >= MAX_SERIES && find(&v, &labels).is_none() {
            ["other"; N]
        } else {
            labels
        };
        match find(&v, &labels) {
            Some(i) => {
                v[i].1.fetch_add(n, Relaxed);
            }
            None => v.push((labels.map(str::to_string), AtomicU64::new(n))),
        }
    }

    pub fn get(&self, labels: [&str; N]) -> u64 {
        self.series.read().ok().map_or(0, |v| {
            v.iter()
                .find(|(l, _)| l.iter().zip(labels.iter()).all(|(a, b)| a == b))
                .map_or(0, |(_, c)| c.load(Relaxed))
        })
    }

    fn snapshot(&self) -> Vec<([String; N], u64)> {
        let mut out: Vec<_> = self.series.read().map_or_else(
            |_| Vec::new(),
            |v| {
                v.iter()
                    .map(|(l, c)| (l.clone(), c.load(Relaxed)))
                    .collect()
            },
        );
        out.sort();
        out
    }
}

/// Audit-log counters (the audit writer updates them).
#[derive(Default)]
pub struct AuditMetrics {
    pub records: AtomicU64,
    pub events: AtomicU64,
    pub lost_queue_full: AtomicU64,
    pub lost_write_error: AtomicU64,
    /// Events not written while writing was suspended (`disk_full_action = "suspend"`).
    pub lost_suspended: AtomicU64,
    /// kmodmon's own records (notes) not written.
    pub lost_notes: AtomicU64,
    /// Records whose fsync failed: they may not be on disk.
    pub unsure: AtomicU64,
    /// Events aggregated into `rate_limited` records instead of being recorded one by one.
    pub rate_limited: AtomicU64,
    /// Times the disk-full action triggered, by action.
    pub disk_full: Labeled<1>,
    /// Segments deleted, by reason (age, count, size, disk_full).
    pub removed_segments: Labeled<1>,
    /// Gauge: 1 while writing is suspended for a full disk.
    pub suspended: AtomicU64,
    pub write_errors: AtomicU64,
    pub fsync_errors: AtomicU64,
    /// Gauge: bytes of all segments.
    pub bytes: AtomicU64,
    /// Gauge: number of segments.
    pub segments: AtomicU64,
}

/// The HTTP endpoint's own counters.
#[derive(Default)]
pub struct HttpMetrics {
    /// Gauge: connections open now.
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    /// Connections closed to make room for a newer one (the cap was reached).
    pub evicted: AtomicU64,
    /// Connections closed for taking longer than the connection timeout.
    pub timeouts: AtomicU64,
    pub accept_errors: AtomicU64,
}

/// Every counter kmodmon exports. Share it as `Arc<Metrics>`.
pub struct Metrics {
    started: SystemTime,
    /// kind × verdict ("none" when the event has none).
    pub events: Labeled<2>,
    /// Events lost before the sinks, by reason (e.g. "ringbuf_full", "decode", "queue_full").
    pub drops: Labeled<1>,
    /// Enrichment that found nothing, by what was looked up (e.g. "cgroup_path", "container").
    pub enrichment_misses: Labeled<1>,
    /// Loads the policy denied.
    pub denials: AtomicU64,
    /// Enforcement's self-check findings, by what was found changed (`link`, `program`,
    /// `map`, `foreign`, ...).
    pub tamper: Labeled<1>,
    pub audit: AuditMetrics,
    /// The pipeline's sinks, whose counters are exported as they are.
    sinks: RwLock<Vec<Arc<SinkCounters>>>,
    /// The last periodic `check` as gauges (crate::check::prom), appended as it is.
    check: RwLock<String>,
    pub http: HttpMetrics,
    /// Readiness and liveness, served on /ready and /healthz.
    pub health: Health,
    /// The opt-in node labels (crate::kube::labels).
    pub node_labels: NodeLabelMetrics,
}

/// Node-label requests by result, and the labels kmodmon keeps on the node.
#[derive(Default)]
pub struct NodeLabelMetrics {
    /// API server PATCHes and configuration failures, by result (`ok`, `error`).
    pub updates: Labeled<1>,
    /// kmodmon.io/module.* labels on the node after the last successful sync.
    pub applied: AtomicU64,
}

impl NodeLabelMetrics {
    pub fn result(&self, result: &str) {
        self.updates.add([result], 1);
    }

    pub fn set_applied(&self, n: usize) {
        self.applied.store(n as u64, Relaxed);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            started: SystemTime::now(),
            events: Labeled::default(),
            drops: Labeled::default(),
            enrichment_misses: Labeled::default(),
            denials: AtomicU64::new(0),
            tamper: Labeled::default(),
            audit: AuditMetrics::default(),
            sinks: RwLock::new(Vec::new()),
            check: RwLock::new(String::new()),
            http: HttpMetrics::default(),
            health: Health::default(),
            node_labels: NodeLabelMetrics::default(),
        }
    }

    /// Counts an event that went through the pipeline (after enrichment and policy).
    pub fn event(&self, ev: &Event) {
        let verdict = ev.verdict.map_or("none", Verdict::as_str);
        // A repeat summary stands for `repeat` attempts, each seen by the kernel.
        self.events
            .add([ev.kind.as_str(), verdict], ev.repeat.unwrap_or(1));
        match ev.kind {
            Kind::Denied => {
                self.denials.fetch_add(1, Relaxed);
            }
            Kind::Tamper => {
                let what = ev
                    .object
                    .as_deref()
                    .and_then(|o| o.split(' ').next())
                    .unwrap_or("unknown");
                self.tamper.add([what], 1);
            }
            // Denied / would_deny records the LSM programs could not record.
            Kind::Lost => self.drops.add(["policy_ring_full"], ev.count.unwrap_or(0)),
            _ => {}
        }
    }

    /// Replaces the gauges of the last periodic check (Prometheus text, already rendered).
    pub fn set_check(&self, text: String) {
        if let Ok(mut c) = self.check.write() {
            *c = text;
        }
    }

    /// Exports these sinks' counters (the pipeline's outputs).
    pub fn watch_sinks(&self, sinks: Vec<Arc<SinkCounters>>) {
        if let Ok(mut w) = self.sinks.write() {
            *w = sinks;
        }
    }

    fn sink(&self, name: &str) -> Option<SinkReport> {
        let sinks = self.sinks.read().ok()?;
        sinks.iter().find(|c| c.name == name).map(|c| c.report())
    }

    /// Counts `n` events dropped for `reason`.
    pub fn drop_events(&self, reason: &str, n: u64) {
        self.drops.add([reason], n);
    }

    /// Counts an enrichment lookup that found nothing.
    pub fn enrichment_miss(&self, what: &str) {
        self.enrichment_misses.add([what], 1);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let a = &self.audit;
        let events = self.events.snapshot();
        family(
            &mut out,
            "kmodmon_events_total",
            "counter",
            "Module events seen, by kind and verdict.",
            &["kind", "verdict"],
            &events,
        );
        let drops = self.drops.snapshot();
        family(
            &mut out,
            "kmodmon_drops_total",
            "counter",
            "Events lost before reaching the sinks, by reason.",
            &["reason"],
            &drops,
        );
        single(
            &mut out,
            "kmodmon_denials_total",
            "counter",
            "Module loads denied by the policy.",
            self.denials.load(Relaxed),
        );
        let tamper = self.tamper.snapshot();
        family(
            &mut out,
            "kmodmon_tamper_total",
            "counter",
            "Changes to kmodmon's pinned enforcement (links, programs, maps, map contents) its \
             self-check found, by what was changed.",
            &["object"],
            &tamper,
        );
        let updates = self.node_labels.updates.snapshot();
        family(
            &mut out,
            "kmodmon_node_label_updates_total",
            "counter",
            "Node-label updates through the Kubernetes API, by result (ok, error).",
            &["result"],
            &updates,
        );
        single(
            &mut out,
            "kmodmon_node_labels",
            "gauge",
            "kmodmon.io/module.* labels on this node after the last successful sync.",
            self.node_labels.applied.load(Relaxed),
        );
        let misses = self.enrichment_misses.snapshot();
        family(
            &mut out,
            "kmodmon_enrichment_misses_total",
            "counter",
            "Enrichment lookups that found nothing, by what was looked up.",
            &["what"],
            &misses,
        );
        single(
            &mut out,
            "kmodmon_audit_records_total",
            "counter",
            "Records written to the audit log (events and kmodmon's own records).",
            a.records.load(Relaxed),
        );
        single(
            &mut out,
            "kmodmon_audit_events_total",
            "counter",
            "Events written to the audit log.",
            a.events.load(Relaxed),
        );
        let lost = [
            (["queue_full".to_string()], a.lost_queue_full.load(Relaxed)),
            (
                ["write_error".to_string()],
                a.lost_write_error.load(Relaxed),
            ),
            (["suspended".to_string()], a.lost_suspended.load(Relaxed)),
            (["note".to_string()], a.lost_notes.load(Relaxed)),
        ];
        family(
            &mut out,
            "kmodmon_audit_lost_records_total",
            "counter",
            "Events (and, reason note, kmodmon's own records) not written to the audit log, by reason.",
            &["reason"],
            &lost,
        );
        single(
            &mut out,
            "kmodmon_audit_unsure_records_total",
            "counter",
            "Records written before an fsync that failed: they may not be on disk.",
            a.unsure.load(Relaxed),
        );
        single(
            &mut out,
            "kmodmon_audit_rate_limited_total",
            "counter",
            "Events aggregated into rate_limited summary records by the per-cgroup rate limit.",
            a.rate_limited.load(Relaxed),
        );
        let disk_full = a.disk_full.snapshot();
        family(
            &mut out,
            "kmodmon_audit_disk_full_total",
            "counter",
            "Times the file system was full and the disk-full action triggered, by action.",
            &["action"],
            &disk_full,
        );
        let removed = a.removed_segments.snapshot();
        family(
            &mut out,
            "kmodmon_audit_removed_segments_total",
            "counter",
            "Audit-log segments deleted, by reason (age, count, size, disk_full).",
            &["reason"],
            &removed,
        );
        single(
            &mut out,
            "kmodmon_audit_suspended",
            "gauge",
            "1 while audit-log writing is suspended because the disk is full.",
            a.suspended.load(Relaxed),
        );
        single(
            &mut out,
            "kmodmon_audit_write_errors_total",
            "counter",
            "Failed audit-log writes.",
            a.write_errors.load(Relaxed),
        );
        single(
            &mut out,
            "kmodmon_audit_fsync_errors_total",
            "counter",
            "Failed audit-log fsyncs.",
            a.fsync_errors.load(Relaxed),
        );
        single(
            &mut out,
            "kmodmon_audit_log_bytes",
            "gauge",
            "Size of the audit log's segments in bytes.",
            a.bytes.load(Relaxed),
        );
        single(
            &mut out,
            "kmodmon_audit_log_segments",
            "gauge",
            "Number of audit-log segments.",
            a.segments.load(Relaxed),
        );
        let syslog = self.sink("syslog").unwrap_or_default();
        single(
            &mut out,
            "kmodmon_syslog_messages_total",
            "counter",
            "Events forwarded to syslog.",
            syslog.emitted,
        );
        single(
            &mut out,
            "kmodmon_syslog_errors_total",
            "counter",
            "Events that could not be forwarded to syslog.",
            syslog.lost_total,
        );
        single(
            &mut out,
            "kmodmon_stdout_errors_total",
            "counter",
            "Events that could not be written to stdout.",
            self.sink("stdout").map_or(0, |r| r.lost_total),
        );
        let mut by_sink = Vec::new();
        if let Ok(sinks) = self.sinks.read() {
            for c in sinks.iter() {
                let r = c.report();
                by_sink.push(([r.name.clone(), "emitted".to_string()], r.emitted));
                by_sink.push(([r.name.clone(), "filtered".to_string()], r.filtered));
                for (reason, n) in &r.lost {
                    by_sink.push(([r.name.clone(), format!("lost_{reason}")], *n));
                }
            }
        }
        family(
            &mut out,
            "kmodmon_sink_events_total",
            "counter",
            "Events offered to each sink, by outcome (emitted, filtered, lost_<reason>).",
            &["sink", "outcome"],
            &by_sink,
        );
        let h = &self.http;
        single(
            &mut out,
            "kmodmon_http_connections",
            "gauge",
            "Connections open to the metrics endpoint.",
            h.open.load(Relaxed),
        );
        let conns = [
            (["accepted".to_string()], h.accepted.load(Relaxed)),
            (["evicted".to_string()], h.evicted.load(Relaxed)),
            (["timeout".to_string()], h.timeouts.load(Relaxed)),
            (["accept_error".to_string()], h.accept_errors.load(Relaxed)),
        ];
        family(
            &mut out,
            "kmodmon_http_connections_total",
            "counter",
            "Connections to the metrics endpoint: accepted, closed to make room (evicted), \
             closed for taking too long (timeout), and failed accepts.",
            &["event"],
            &conns,
        );
        let start = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        single(
            &mut out,
            "kmodmon_start_time_seconds",
            "gauge",
            "When kmodmon started, in seconds since the epoch.",
            start,
        );
        let version = [([env!("CARGO_PKG_VERSION").to_string()], 1)];
        family(
            &mut out,
            "kmodmon_build_info",
            "gauge",
            "kmodmon's version.",
            &["version"],
            &version,
        );
        if let Ok(check) = self.check.read() {
            out.push_str(&check);
        }
        out
    }
}

/// Escapes a label value: the sink guard ([`crate::escape::sanitize`]: no control, bidi or
/// invisible character), then the exposition format's own escapes (`\\`, `\"`, `\n`).
pub fn escape_label(v: &str) -> String {
    let v = crate::escape::sanitize(v);
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn single(out: &mut String, name: &str, kind: &str, help: &str, v: u64) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {v}");
}

fn family<const N: usize>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    labels: &[&str; N],
    series: &[([String; N], u64)],
) {
    header(out, name, kind, help);
    for (values, v) in series {
        let pairs: Vec<String> = labels
            .iter()
            .zip(values.iter())
            .map(|(l, val)| format!("{l}=\"{}\"", escape_label(val)))
            .collect();
        let _ = writeln!(out, "{name}{{{}}} {v}", pairs.join(","));
    }
}

/// Parses a `--metrics` address: `HOST:PORT`, `[V6]:PORT`, or `:PORT` / `PORT` (loopback,
/// 127.0.0.1). Every interface must be asked for by name: `0.0.0.0:PORT` or `[::]:PORT`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let port_only = s.strip_prefix(':').unwrap_or(s);
    let full = if !port_only.is_empty() && port_only.bytes().all(|b| b.is_ascii_digit()) {
        format!("127.0.0.1:{port_only}")
    } else {
        s.to_string()
    };
    full.parse().map_err(|e| {
        format!(
            "metrics address {s:?}: {e} (expected e.g. 127.0.0.1:9464, [::1]:9464, :9464 for \
             loopback, or 0.0.0.0:9464 for every interface)"
        )
    })
}

/// Limits of the HTTP endpoint, against clients that open many connections or send slowly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once. A new connection beyond this closes the oldest one (a
    /// scraper or probe sends its request at once and is done in milliseconds; the oldest
    /// connection is the one most likely held open on purpose).
    pub max_connections: usize,
    /// Time a client has to send its whole request head.
    pub header_timeout: Duration,
    /// Longest a connection lives, request and response included.
    pub connection_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 64,
            header_timeout: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(5),
        }
    }
}

/// The HTTP endpoint (hyper, HTTP/1.1, one request per connection). Only `GET`/`HEAD` on
/// `/metrics`, `/ready`, `/healthz` (and `/`) are served; see [`HttpLimits`] for the rest.
pub struct MetricsServer {
    listener: TcpListener,
    limits: HttpLimits,
}

/// Open connections, oldest first, each with the sender that closes it.
#[derive(Default)]
struct Slots {
    next_id: u64,
    open: std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>,
}

impl MetricsServer {
    /// Binds now, so a bad address or a port in use is reported at start. Default limits.
    pub async fn bind(addr: SocketAddr) -> io::Result<MetricsServer> {
        Self::bind_with(addr, HttpLimits::default()).await
    }

    /// Binds with the given limits. Binding an address other than loopback is logged as a
    /// warning: whoever reaches it reads the metrics.
    pub async fn bind_with(addr: SocketAddr, limits: HttpLimits) -> io::Result<MetricsServer> {
        if !addr.ip().is_loopback() {
            log::warn!(
                "metrics endpoint on {addr}: reachable from the network; restrict it to the \
                 scraper (firewall, Kubernetes NetworkPolicy) or listen on 127.0.0.1"
            );
        }
        Ok(MetricsServer {
            listener: TcpListener::bind(addr).await?,
            limits,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped. Each connection runs in a task of its own.
    pub async fn serve(self, metrics: Arc<Metrics>) -> io::Result<()> {
        let slots = Arc::new(std::sync::Mutex::new(Slots::default()));
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout)
            .keep_alive(false);
        let http = Arc::new(http);
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    metrics.http.accept_errors.fetch_add(1, Relaxed);
                    log::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            metrics.http.accepted.fetch_add(1, Relaxed);
            let (close_tx, close_rx) = tokio::sync::oneshot::channel();
            let id = {
                let Ok(mut s) = slots.lock() else { continue };
                while s.open.len() >= self.limits.max_connections.max(1) {
                    if let Some((_, oldest)) = s.open.pop_front() {
                        let _ = oldest.send(());
                        metrics.http.evicted.fetch_add(1, Relaxed);
                    }
                }
                s.next_id += 1;
                let id = s.next_id;
                s.open.push_back((id, close_tx));
                metrics.http.open.store(s.open.len() as u64, Relaxed);
                id
            };
            let (m, slots, http) = (metrics.clone(), slots.clone(), http.clone());
            let deadline = self.limits.connection_timeout;
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req| {
                    let m = m.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&req, &m)) }
                });
                let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::select! {
                    r = tokio::time::timeout(deadline, conn) => match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => log::debug!("metrics connection: {e}"),
                        Err(_) => {
                            m.http.timeouts.fetch_add(1, Relaxed);
                        }
                    },
                    _ = close_rx => {}
                }
                if let Ok(mut s) = slots.lock() {
                    s.open.retain(|(i, _)| *i != id);
                    m.http.open.store(s.open.len() as u64, Relaxed);
                }
            });
        }
    }
}

type Body = http_body_util::Full<hyper::body::Bytes>;

/// The answer to one request.
fn respond<B>(req: &hyper::Request<B>, metrics: &Metrics) -> hyper::Response<Body> {
    use hyper::{Method, StatusCode};
    let text = |status: StatusCode, body: String| {
        let mut r = hyper::Response::new(Body::from(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, String::new());
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, metrics.render()),
        path @ ("/ready" | "/healthz") => {
            let status = if path == "/ready" {
                metrics.health.ready()
            } else {
                metrics.health.live()
            };
            let code = if status.ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(code, format!("{}\n", status.reason))
        }
        "/" => text(
            StatusCode::OK,
            "kmodmon: metrics at /metrics, readiness at /ready, liveness at /healthz\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics, health at /ready and /healthz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Clock, Kind};

    #[test]
    fn counters_render_as_prometheus_text() {
        let m = Metrics::new();
        let mut e = Event::synthetic(Kind::Load, &Clock::new());
        e.verdict = Some(Verdict::Unexpected);
        m.event(&e);
        m.event(&e);
        m.event(&Event::synthetic(Kind::Denied, &Clock::new()));
        // A repeat summary counts the attempts it stands for.
        let mut r = Event::synthetic(Kind::UnloadAttempt, &Clock::new());
        r.repeat = Some(41);
        m.event(&r);
        m.event(&Event::synthetic(Kind::UnloadAttempt, &Clock::new()));
        m.drop_events("ringbuf_full", 5);
        m.enrichment_miss("container \"x\"\n");
        m.audit.lost_queue_full.fetch_add(2, Relaxed);
        let text = m.render();
        assert!(
            text.contains("kmodmon_events_total{kind=\"load\",verdict=\"unexpected\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("kmodmon_events_total{kind=\"denied\",verdict=\"none\"} 1\n"));
        assert!(
            text.contains("kmodmon_events_total{kind=\"unload_attempt\",verdict=\"none\"} 42\n"),
            "{text}"
        );
        assert!(text.contains("kmodmon_denials_total 1\n"));
        assert!(text.contains("kmodmon_drops_total{reason=\"ringbuf_full\"} 5\n"));
        assert!(
            text.contains(
                "kmodmon_enrichment_misses_total{what=\"container \\\"x\\\"\\\\x0a\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains("kmodmon_audit_lost_records_total{reason=\"queue_full\"} 2\n"));
        assert!(text.contains("# TYPE kmodmon_audit_log_bytes gauge\n"));
        // Every sample line is NAME{labels} VALUE or NAME VALUE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
            assert!(name.starts_with("kmodmon_"), "{line}");
        }
    }

    #[test]
    fn label_sets_are_capped() {
        let l = Labeled::<1>::default();
        for i in 0..MAX_SERIES + 10 {
            l.add([&i.to_string()], 1);
        }
        assert_eq!(l.get(["other"]), 10);
        assert_eq!(l.snapshot().len(), MAX_SERIES + 1);
    }

    #[test]
    fn addresses_parse_and_default_to_loopback() {
        assert_eq!(
            parse_addr(":9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(
            parse_addr("9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(
            parse_addr("0.0.0.0:9464").unwrap(),
            "0.0.0.0:9464".parse().unwrap()
        );
        assert_eq!(parse_addr("[::1]:80").unwrap(), "[::1]:80".parse().unwrap());
        assert!(parse_addr("localhost").is_err());
        assert!(parse_addr(":").is_err());
    }

    #[test]
    fn hostile_label_values_are_escaped() {
        let m = Metrics::new();
        m.enrichment_miss("a\u{202e}b\x1b[2J\\\"\n");
        let text = m.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("kmodmon_enrichment_misses_total{"))
            .unwrap();
        assert_eq!(
            line,
            "kmodmon_enrichment_misses_total{what=\"a\\\\u{202e}b\\\\x1b[2J\\\\\\\"\\\\x0a\"} 1"
        );
        assert!(!text.contains(|c: char| crate::escape::is_unsafe(c) && c != '\n'));
    }

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    async fn request(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn serve(
        m: Arc<Metrics>,
        limits: HttpLimits,
    ) -> (SocketAddr, tokio::task::JoinHandle<io::Result<()>>) {
        let server = MetricsServer::bind_with("127.0.0.1:0".parse().unwrap(), limits)
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        (addr, tokio::spawn(server.serve(m)))
    }

    #[tokio::test]
    async fn http_endpoint_serves_metrics_and_rejects_the_rest() {
        let m = Arc::new(Metrics::new());
        m.drop_events("decode", 1);
        let (addr, task) = serve(m.clone(), HttpLimits::default()).await;
        let ok = request(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"));
        assert!(ok.contains("kmodmon_drops_total{reason=\"decode\"} 1"));
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let head_only = request(addr, b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(
            head_only.contains(" 200 OK") && head_only.ends_with("\r\n\r\n"),
            "{head_only}"
        );
        let ready = request(addr, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(
            ready.ends_with("starting: probes not attached yet\n"),
            "{ready}"
        );
        m.health.set_attached();
        let ready = request(addr, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            ready.starts_with("HTTP/1.1 200") && ready.ends_with("\r\nready\n"),
            "{ready}"
        );
        let live = request(addr, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            live.starts_with("HTTP/1.1 200") && live.ends_with("\r\n\r\n"),
            "{live}"
        );
        assert!(
            request(addr, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 404")
        );
        let post = request(addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(
            post.to_ascii_lowercase().contains("allow: get, head"),
            "{post}"
        );
        let bad = request(addr, b"\x00\x01garbage\r\n\r\n").await;
        assert!(bad.is_empty() || bad.starts_with("HTTP/1.1 400"), "{bad}");
        task.abort();
    }

    #[tokio::test]
    async fn held_connections_are_capped_timed_out_and_ready_still_answers() {
        let m = Arc::new(Metrics::new());
        m.health.set_attached();
        let limits = HttpLimits {
            max_connections: 8,
            header_timeout: Duration::from_millis(300),
            connection_timeout: Duration::from_secs(2),
        };
        let (addr, task) = serve(m.clone(), limits).await;
        // 40 clients that connect and send half a request head, then hold on.
        let mut held = Vec::new();
        for _ in 0..40 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHo").await.unwrap();
            held.push(s);
        }
        // A probe still gets its answer, at once.
        let t = std::time::Instant::now();
        let ready = request(addr, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            ready.starts_with("HTTP/1.1 200") && ready.ends_with("ready\n"),
            "{ready}"
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(m.http.open.load(Relaxed) <= 8);
        assert!(m.http.evicted.load(Relaxed) >= 32, "{}", m.render());
        // The held ones are closed: evicted at once, or after the header timeout.
        tokio::time::sleep(Duration::from_millis(800)).await;
        for mut s in held {
            let mut buf = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
            assert!(r.is_ok(), "a held connection stayed open");
        }
        assert_eq!(m.http.open.load(Relaxed), 0);
        let text = m.render();
        assert!(
            text.contains("kmodmon_http_connections_total{event=\"evicted\"}"),
            "{text}"
        );
        task.abort();
    }
}
