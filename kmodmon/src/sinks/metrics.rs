//! Prometheus counters per event (kind, verdict); the registry and its HTTP endpoint live in
//! [`crate::metrics`].
use std::sync::Arc;

use super::{Sink, SinkCounters};
use crate::event::Event;
use crate::metrics::Metrics;

pub struct MetricsSink(pub Arc<Metrics>);

impl Sink for MetricsSink {
    fn emit(&mut self, ev: &Event, c: &SinkCounters) {
        self.0.event(ev);
        c.emitted(1);
    }
    fn flush(&mut self, _c: &SinkCounters) {}
    fn close(self: Box<Self>, _c: &SinkCounters) {}
}
