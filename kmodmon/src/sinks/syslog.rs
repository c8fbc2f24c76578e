//! Forwarding events to the local syslog daemon: RFC 5424 messages over the `/dev/log`
//! datagram socket, one event (its `tail --json` object) per message.
//!
//! `<PRI>1 TIMESTAMP HOSTNAME kmodmon PID KIND - {"time":...}` where PRI = facility × 8 +
//! severity: warning for denials, notice for unexpected loads, info otherwise.
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::event::{Event, Kind, Verdict};

/// The local syslog socket.
pub const DEFAULT_SOCKET: &str = "/dev/log";

/// Syslog facilities kmodmon may log under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Facility {
    User = 1,
    Daemon = 3,
    Auth = 4,
    Authpriv = 10,
    Local0 = 16,
    Local1 = 17,
    Local2 = 18,
    Local3 = 19,
    Local4 = 20,
    Local5 = 21,
    Local6 = 22,
    Local7 = 23,
}

impl FromStr for Facility {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use Facility::*;
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "user" => User,
            "daemon" => Daemon,
            "auth" => Auth,
            "authpriv" => Authpriv,
            "local0" => Local0,
            "local1" => Local1,
            "local2" => Local2,
            "local3" => Local3,
            "local4" => Local4,
            "local5" => Local5,
            "local6" => Local6,
            "local7" => Local7,
            other => {
                return Err(format!(
                    "syslog facility {other:?}: one of user, daemon, auth, authpriv, local0..local7"
                ));
            }
        })
    }
}

/// RFC 5424 severities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Emergency = 0,
    Alert = 1,
    Critical = 2,
    Error = 3,
    Warning = 4,
    Notice = 5,
    Informational = 6,
    Debug = 7,
}

/// How loud an event is in syslog.
pub fn severity_for(ev: &Event) -> Severity {
    match ev.kind {
        // Someone changed what enforces the policy, or denials went unrecorded.
        Kind::Tamper | Kind::Lost => Severity::Error,
        Kind::Denied | Kind::WouldDeny => Severity::Warning,
        _ if ev.verdict == Some(Verdict::Unexpected) => Severity::Notice,
        _ => Severity::Informational,
    }
}

/// Keeps PRINTUSASCII (33..=126), replacing anything else with '_', at most `max` bytes; "-"
/// (the nil value) when empty.
fn header_field(s: &str, max: usize) -> String {
    let out: String = s
        .chars()
        .map(|c| if ('!'..='~').contains(&c) { c } else { '_' })
        .take(max)
        .collect();
    if out.is_empty() { "-".into() } else { out }
}

/// The MSG of an event: its JSON object, every string through the sink guard.
pub fn event_message(ev: &Event) -> String {
    super::json::line(ev)
}

/// One RFC 5424 message (no structured data).
#[allow(clippy::too_many_arguments)]
pub fn format_message(
    facility: Facility,
    severity: Severity,
    time: SystemTime,
    hostname: &str,
    app_name: &str,
    procid: &str,
    msgid: &str,
    msg: &str,
) -> String {
    format!(
        "<{}>1 {} {} {} {} {} - {msg}",
        facility as u8 * 8 + severity as u8,
        humantime::format_rfc3339_micros(time),
        header_field(hostname, 255),
        header_field(app_name, 48),
        header_field(procid, 128),
        header_field(msgid, 32),
    )
}

/// A connection to the local syslog daemon. Sends never block: a full socket buffer is an
/// error the caller counts. If the daemon restarted, the next send reconnects.
pub struct Syslog {
    path: PathBuf,
    sock: Mutex<Option<UnixDatagram>>,
    facility: Facility,
    hostname: String,
    app_name: String,
    procid: String,
}

fn connect(path: &Path) -> io::Result<UnixDatagram> {
    let s = UnixDatagram::unbound()?;
    s.connect(path)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

impl Syslog {
    /// Connects to the datagram socket at `path` (usually [`DEFAULT_SOCKET`]).
    pub fn connect(path: impl AsRef<Path>, facility: Facility) -> io::Result<Syslog> {
        let path = path.as_ref().to_path_buf();
        let sock = connect(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot connect to syslog at {}: {e} (is a syslog daemon or journald running?)",
                    path.display()
                ),
            )
        })?;
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        Ok(Syslog {
            path,
            sock: Mutex::new(Some(sock)),
            facility,
            hostname,
            app_name: "kmodmon".into(),
            procid: std::process::id().to_string(),
        })
    }

    /// Sends one event: MSGID is its kind, MSG its JSON object (every string through the sink
    /// guard, [`crate::escape::sanitize_event`]).
    pub fn send_event(&self, ev: &Event) -> io::Result<()> {
        self.send(severity_for(ev), ev.kind.as_str(), &event_message(ev))
    }

    /// Sends the audit log's chain head as an anchor line (`kmodmon-anchor seq=N hash=H`),
    /// MSGID `anchor`, for `kmodmon log verify --anchor-from` to find in a syslog or journal
    /// export later.
    pub fn send_anchor(&self, anchor: &crate::audit::Anchor) -> io::Result<()> {
        self.send(Severity::Notice, "anchor", &anchor.line())
    }

    /// Sends one message. `msg` passes the sink guard ([`crate::escape::sanitize`]): no
    /// control character (a newline would split the message in some daemons), no bidi control.
    pub fn send(&self, severity: Severity, msgid: &str, msg: &str) -> io::Result<()> {
        let msg = crate::escape::sanitize(msg);
        let line = format_message(
            self.facility,
            severity,
            SystemTime::now(),
            &self.hostname,
            &self.app_name,
            &self.procid,
            msgid,
            &msg,
        );
        let mut guard = self
            .sock
            .lock()
            .map_err(|_| io::Error::other("syslog socket lock poisoned"))?;
        let first = match guard.as_ref() {
            Some(s) => s.send(line.as_bytes()).map(|_| ()),
            None => Err(io::Error::from(io::ErrorKind::NotConnected)),
        };
        match first {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::NotConnected
                        | io::ErrorKind::NotFound
                        | io::ErrorKind::ConnectionReset
                ) =>
            {
                // The daemon restarted (new socket at the same path): reconnect once.
                *guard = None;
                let s = connect(&self.path)?;
                s.send(line.as_bytes())?;
                *guard = Some(s);
                Ok(())
            }
            other => other,
        }
    }
}

/// Forwards every event to syslog (see [`Syslog::send_event`]).
pub struct SyslogSink(pub std::sync::Arc<Syslog>);

/// The syslog socket refused the message (daemon down, queue full).
pub const SEND_ERROR: &str = "syslog_send_error";

impl super::Sink for SyslogSink {
    fn emit(&mut self, ev: &Event, c: &super::SinkCounters) {
        match self.0.send_event(ev) {
            Ok(()) => c.emitted(1),
            Err(_) => c.lost(SEND_ERROR, 1),
        }
    }
    fn flush(&mut self, _c: &super::SinkCounters) {}
    fn close(self: Box<Self>, _c: &super::SinkCounters) {}
    fn anchor(&mut self, a: &crate::audit::Anchor, _c: &super::SinkCounters) {
        if let Err(e) = self.0.send_anchor(a) {
            log::warn!("syslog: cannot send the audit anchor: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Clock;

    #[test]
    fn message_follows_rfc5424() {
        let t = humantime::parse_rfc3339("2026-11-22T13:00:00.123456789Z").unwrap();
        let m = format_message(
            Facility::Daemon,
            Severity::Warning,
            t,
            "node 1",
            "kmodmon",
            "42",
            "load_attempt",
            "{\"a\":1}",
        );
        assert_eq!(
            m,
            "<28>1 2026-11-22T13:00:00.123456Z node_1 kmodmon 42 load_attempt - {\"a\":1}"
        );
        let long = format_message(
            Facility::Local7,
            Severity::Debug,
            t,
            "",
            "",
            "",
            &"x".repeat(40),
            "m",
        );
        assert!(long.starts_with("<191>1 "));
        assert!(long.contains(" - - - "), "{long}");
        assert!(long.contains(&format!(" {} - m", "x".repeat(32))), "{long}");
    }

    #[test]
    fn severities_follow_the_event() {
        let c = Clock::new();
        assert_eq!(
            severity_for(&Event::synthetic(Kind::Denied, &c)),
            Severity::Warning
        );
        let mut e = Event::synthetic(Kind::Load, &c);
        assert_eq!(severity_for(&e), Severity::Informational);
        e.verdict = Some(Verdict::Unexpected);
        assert_eq!(severity_for(&e), Severity::Notice);
        assert_eq!("LOCAL3".parse(), Ok(Facility::Local3));
        assert!("kern".parse::<Facility>().is_err());
    }

    #[test]
    fn events_reach_a_datagram_socket_and_survive_a_daemon_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let server = UnixDatagram::bind(&path).unwrap();
        let s = Syslog::connect(&path, Facility::Daemon).unwrap();
        let mut e = Event::synthetic(Kind::Load, &Clock::new());
        e.module = Some("ip_vs".into());
        s.send_event(&e).unwrap();
        let mut buf = vec![0u8; 65536];
        let n = server.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..n]).unwrap();
        let parts: Vec<&str> = msg.splitn(8, ' ').collect();
        assert_eq!(parts[0], "<30>1");
        assert!(humantime::parse_rfc3339(parts[1]).is_ok(), "{msg}");
        assert_eq!(parts[3], "kmodmon");
        assert_eq!(parts[4], std::process::id().to_string());
        assert_eq!(parts[5], "load");
        assert_eq!(parts[6], "-");
        let back: Event = serde_json::from_str(parts[7]).unwrap();
        assert_eq!(back, e);

        drop(server);
        std::fs::remove_file(&path).unwrap();
        let server = UnixDatagram::bind(&path).unwrap();
        s.send_event(&e).unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..n]).unwrap().ends_with('}'));
        drop(server);
        assert!(s.send_event(&e).is_err(), "no daemon: an error, not a hang");
        assert!(Syslog::connect(dir.path().join("none"), Facility::User).is_err());
    }
}
