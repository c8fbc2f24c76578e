//! A plain HTTP GET on loopback, for the daemon's endpoints and Prometheus' API.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// GET over HTTP/1.0 with short timeouts: (status, body); status 0 when nothing came back.
/// HTTP/1.0 so that servers answer with the whole body and close (no chunked encoding: Go's
/// server, Prometheus', chunks larger HTTP/1.1 answers).
pub fn get(addr: &str, path: &str) -> (u16, String) {
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return (0, String::new());
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
        return (0, String::new());
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// A loopback address with a port that was free a moment ago.
pub fn free_loopback_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = l.local_addr().expect("local_addr").port();
    format!("127.0.0.1:{port}")
}
