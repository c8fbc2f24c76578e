//! A sink that writes one line per event to a stream (stdout for `tail` and `run`'s
//! forwarding), in a format given as a function ([`super::human::line`],
//! [`super::json::line`]). Output is buffered and flushed whenever no more events are waiting;
//! events written into the buffer count as emitted only once a flush succeeds.
use std::io::{ErrorKind, Write};

use super::{Sink, SinkCounters};
use crate::event::Event;

/// Why a line sink lost events.
pub const WRITE_ERROR: &str = "write_error";
/// The reader went away (`kmodmon tail | head`): not an error, but the events are not shown.
pub const READER_GONE: &str = "reader_gone";

pub struct LineSink<W: Write + Send> {
    out: std::io::BufWriter<W>,
    format: Box<dyn Fn(&Event) -> String + Send>,
    /// Lines in the buffer, not yet flushed.
    unflushed: u64,
    gone: bool,
    /// Whether audit anchors are written too (as JSON lines: `kmodmon run --stdout`).
    anchors: bool,
}

impl<W: Write + Send> LineSink<W> {
    pub fn new(out: W, format: impl Fn(&Event) -> String + Send + 'static) -> LineSink<W> {
        LineSink {
            out: std::io::BufWriter::with_capacity(64 << 10, out),
            format: Box::new(format),
            unflushed: 0,
            gone: false,
            anchors: false,
        }
    }

    /// Also writes the audit chain's head as a JSON line when the daemon publishes it.
    pub fn with_anchors(mut self) -> LineSink<W> {
        self.anchors = true;
        self
    }

    /// Writes a line that is not an event (a header) and flushes it.
    pub fn preamble(mut self, line: &str) -> LineSink<W> {
        if writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .is_err()
        {
            self.gone = true;
        }
        self
    }

    fn failed(&mut self, e: &std::io::Error, c: &SinkCounters, n: u64) {
        let reason = if e.kind() == ErrorKind::BrokenPipe {
            READER_GONE
        } else {
            log::warn!("{}: cannot write: {e}", c.name);
            WRITE_ERROR
        };
        self.gone = true;
        c.lost(reason, n);
    }
}

impl<W: Write + Send> Sink for LineSink<W> {
    fn emit(&mut self, ev: &Event, c: &SinkCounters) {
        if self.gone {
            c.lost(READER_GONE, 1);
            return;
        }
        let line = (self.format)(ev);
        match writeln!(self.out, "{line}") {
            Ok(()) => self.unflushed += 1,
            Err(e) => {
                // BufWriter wrote part of its buffer: those lines and this one are lost.
                let n = self.unflushed + 1;
                self.unflushed = 0;
                self.failed(&e, c, n);
            }
        }
    }

    fn flush(&mut self, c: &SinkCounters) {
        if self.unflushed == 0 {
            return;
        }
        let n = std::mem::take(&mut self.unflushed);
        match self.out.flush() {
            Ok(()) => c.emitted(n),
            Err(e) => self.failed(&e, c, n),
        }
    }

    fn close(mut self: Box<Self>, c: &SinkCounters) {
        self.flush(c);
    }

    fn gone(&self) -> bool {
        self.gone
    }

    fn anchor(&mut self, a: &crate::audit::Anchor, c: &SinkCounters) {
        if !self.anchors || self.gone {
            return;
        }
        // Flushed with the events around it, in order.
        if let Err(e) = writeln!(self.out, "{}", a.json()) {
            let n = std::mem::take(&mut self.unflushed);
            self.failed(&e, c, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Clock, Kind};

    /// A writer that accepts `ok` bytes, then fails with `kind`.
    struct Limited {
        ok: usize,
        kind: ErrorKind,
        got: Vec<u8>,
    }

    impl Write for Limited {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.got.len() + buf.len() > self.ok {
                return Err(std::io::Error::from(self.kind));
            }
            self.got.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_count_as_emitted_when_flushed_and_a_closed_pipe_loses_the_rest() {
        let c = SinkCounters::new("stdout");
        let w = Limited {
            ok: 10,
            kind: ErrorKind::BrokenPipe,
            got: Vec::new(),
        };
        let mut s = LineSink::new(w, |_| "0123".to_string());
        let ev = Event::synthetic(Kind::Load, &Clock::new());
        s.emit(&ev, &c);
        s.emit(&ev, &c);
        assert_eq!(c.report().emitted, 0, "buffered, not yet written");
        s.flush(&c);
        assert_eq!(c.report().emitted, 2);
        s.emit(&ev, &c);
        s.flush(&c);
        s.emit(&ev, &c);
        let r = c.report();
        assert_eq!(r.emitted, 2);
        assert_eq!(r.lost.get(READER_GONE), Some(&2));
        assert!(s.gone());
    }
}
