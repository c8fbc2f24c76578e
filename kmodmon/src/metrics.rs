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

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::event::{Event, Kind, Verdict};
use crate::health::Health;

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
    pub write_errors: AtomicU64,
    pub fsync_errors: AtomicU64,
    /// Gauge: bytes of all segments.
    pub bytes: AtomicU64,
    /// Gauge: number of segments.
    pub segments: AtomicU64,
}

/// Forwarding counters (syslog, stdout).
#[derive(Default)]
pub struct ForwardMetrics {
    pub syslog_sent: AtomicU64,
    pub syslog_errors: AtomicU64,
    pub stdout_errors: AtomicU64,
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
    pub audit: AuditMetrics,
    pub forward: ForwardMetrics,
    /// Readiness and liveness, served on /ready and /healthz.
    pub health: Health,
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
            audit: AuditMetrics::default(),
            forward: ForwardMetrics::default(),
            health: Health::default(),
        }
    }

    /// Counts an event that went through the pipeline (after enrichment and policy).
    pub fn event(&self, ev: &Event) {
        let verdict = ev.verdict.map_or("none", Verdict::as_str);
        self.events.add([ev.kind.as_str(), verdict], 1);
        if ev.kind == Kind::Denied {
            self.denials.fetch_add(1, Relaxed);
        }
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
        let f = &self.forward;
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
        ];
        family(
            &mut out,
            "kmodmon_audit_lost_records_total",
            "counter",
            "Events not written to the audit log, by reason.",
            &["reason"],
            &lost,
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
        single(
            &mut out,
            "kmodmon_syslog_messages_total",
            "counter",
            "Events forwarded to syslog.",
            f.syslog_sent.load(Relaxed),
        );
        single(
            &mut out,
            "kmodmon_syslog_errors_total",
            "counter",
            "Events that could not be forwarded to syslog.",
            f.syslog_errors.load(Relaxed),
        );
        single(
            &mut out,
            "kmodmon_stdout_errors_total",
            "counter",
            "Events that could not be written to stdout.",
            f.stdout_errors.load(Relaxed),
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
        out
    }
}

/// Escapes a label value per the exposition format.
fn escape_label(v: &str) -> String {
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

/// Parses a `--metrics` address: `HOST:PORT`, `[V6]:PORT`, or `:PORT` (all interfaces).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let full = match s.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => s.to_string(),
    };
    full.parse().map_err(|e| {
        format!("metrics address {s:?}: {e} (expected e.g. 127.0.0.1:9464, [::1]:9464 or :9464)")
    })
}

/// The HTTP endpoint. Only `GET`/`HEAD` on `/metrics`, `/ready`, `/healthz` (and `/`) are
/// served; one request per connection.
pub struct MetricsServer {
    listener: TcpListener,
}

const MAX_REQUEST: usize = 8192;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

impl MetricsServer {
    /// Binds now, so a bad address or a port in use is reported at start.
    pub async fn bind(addr: SocketAddr) -> io::Result<MetricsServer> {
        Ok(MetricsServer {
            listener: TcpListener::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped. Each connection runs in a task of its own.
    pub async fn serve(self, metrics: Arc<Metrics>) -> io::Result<()> {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let m = metrics.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, &m).await {
                            log::debug!("metrics request: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    log::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

async fn handle(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let parsed = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(_)) => {
                    let method = req.method.unwrap_or("").to_string();
                    let path = req.path.unwrap_or("").to_string();
                    return Ok::<_, io::Error>(Some(Ok((method, path))));
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => {}
                Ok(httparse::Status::Partial) => return Ok(Some(Err(431))),
                Err(_) => return Ok(Some(Err(400))),
            }
        }
    })
    .await;
    let request = match parsed {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) | Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e),
    };
    let (status, reason, body, head_only, extra) = match request {
        Err(431) => (
            431,
            "Request Header Fields Too Large",
            String::new(),
            false,
            "",
        ),
        Err(_) => (400, "Bad Request", String::new(), false, ""),
        Ok((method, path)) => {
            let path = path.split('?').next().unwrap_or("");
            let head_only = method == "HEAD";
            if method != "GET" && !head_only {
                (
                    405,
                    "Method Not Allowed",
                    String::new(),
                    false,
                    "Allow: GET, HEAD\r\n",
                )
            } else if path == "/metrics" {
                (200, "OK", metrics.render(), head_only, "")
            } else if path == "/ready" || path == "/healthz" {
                let status = if path == "/ready" {
                    metrics.health.ready()
                } else {
                    metrics.health.live()
                };
                let body = format!("{}\n", status.reason);
                match status.ok {
                    true => (200, "OK", body, head_only, ""),
                    false => (503, "Service Unavailable", body, head_only, ""),
                }
            } else if path == "/" {
                let body =
                    "kmodmon: metrics at /metrics, readiness at /ready, liveness at /healthz\n"
                        .to_string();
                (200, "OK", body, head_only, "")
            } else {
                (
                    404,
                    "Not Found",
                    "not found; metrics are at /metrics, health at /ready and /healthz\n".into(),
                    false,
                    "",
                )
            }
        }
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
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
        m.drop_events("ringbuf_full", 5);
        m.enrichment_miss("container \"x\"\n");
        m.audit.lost_queue_full.fetch_add(2, Relaxed);
        let text = m.render();
        assert!(
            text.contains("kmodmon_events_total{kind=\"load\",verdict=\"unexpected\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("kmodmon_events_total{kind=\"denied\",verdict=\"none\"} 1\n"));
        assert!(text.contains("kmodmon_denials_total 1\n"));
        assert!(text.contains("kmodmon_drops_total{reason=\"ringbuf_full\"} 5\n"));
        assert!(
            text.contains("kmodmon_enrichment_misses_total{what=\"container \\\"x\\\"\\n\"} 1\n")
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
    fn addresses_parse() {
        assert_eq!(
            parse_addr(":9464").unwrap(),
            "0.0.0.0:9464".parse().unwrap()
        );
        assert_eq!(parse_addr("[::1]:80").unwrap(), "[::1]:80".parse().unwrap());
        assert!(parse_addr("localhost").is_err());
    }

    async fn request(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn http_endpoint_serves_metrics_and_rejects_the_rest() {
        let m = Arc::new(Metrics::new());
        m.drop_events("decode", 1);
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(server.serve(m.clone()));
        let ok = request(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"));
        assert!(ok.contains("kmodmon_drops_total{reason=\"decode\"} 1"));
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let head_only = request(addr, b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(head_only.starts_with("HTTP/1.1 200") && head_only.ends_with("\r\n\r\n"));
        let ready = request(addr, b"GET /ready HTTP/1.1\r\n\r\n").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(
            ready.ends_with("starting: probes not attached yet\n"),
            "{ready}"
        );
        m.health.set_attached();
        let ready = request(addr, b"GET /ready HTTP/1.1\r\n\r\n").await;
        assert!(ready.starts_with("HTTP/1.1 200") && ready.ends_with("\r\nready\n"));
        let live = request(addr, b"HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert!(live.starts_with("HTTP/1.1 200") && live.ends_with("\r\n\r\n"));
        assert!(
            request(addr, b"GET /nope HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 404")
        );
        assert!(
            request(addr, b"POST /metrics HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 405")
        );
        assert!(
            request(addr, b"\x00\x01garbage\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 400")
        );
        task.abort();
    }
}
