//! One volume's metric handles, resolved once so requests only touch atomics.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use super::labels::{Kind, VolumeKindLabels, VolumeLabels};
use super::limits::LimitHits;
use super::Metrics;

struct KindMetrics {
    operations: Counter,
    bytes: Counter,
    errors: Counter,
    latency: Histogram,
}

pub struct VolumeMetrics {
    kinds: [KindMetrics; Kind::ALL.len()],
    in_flight: Gauge,
    connections: Gauge,
    /// Daemon-wide, here so the transmission loop can count the limits its client hits.
    limits: Arc<LimitHits>,
    fence_waits: Counter,
    fence_wait_seconds: Counter<f64, AtomicU64>,
    hangup_fences: Counter,
    read_bytes_from_cache: Counter,
    read_bytes_from_mapping: Counter,
    write_bytes_in_place: Counter,
}

impl VolumeMetrics {
    pub(super) fn new(metrics: &Metrics, volume: &str) -> VolumeMetrics {
        let kinds = Kind::ALL.map(|kind| {
            let labels = VolumeKindLabels {
                volume: volume.to_owned(),
                kind,
            };
            KindMetrics {
                operations: metrics.operations.get_or_create_owned(&labels),
                bytes: metrics.bytes.get_or_create_owned(&labels),
                errors: metrics.errors.get_or_create_owned(&labels),
                latency: metrics.latency.get_or_create_owned(&labels),
            }
        });
        let labels = VolumeLabels {
            volume: volume.to_owned(),
        };
        VolumeMetrics {
            kinds,
            in_flight: metrics.in_flight.get_or_create_owned(&labels),
            connections: metrics.connections.get_or_create_owned(&labels),
            limits: Arc::clone(&metrics.limits),
            fence_waits: metrics.fence_waits.get_or_create_owned(&labels),
            fence_wait_seconds: metrics.fence_wait_seconds.get_or_create_owned(&labels),
            hangup_fences: metrics.hangup_fences.get_or_create_owned(&labels),
            read_bytes_from_cache: metrics.read_bytes_from_cache.get_or_create_owned(&labels),
            read_bytes_from_mapping: metrics.read_bytes_from_mapping.get_or_create_owned(&labels),
            write_bytes_in_place: metrics.write_bytes_in_place.get_or_create_owned(&labels),
        }
    }

    /// Marks a request in flight until the returned guard is finished or dropped.
    pub fn start(&self, kind: Kind) -> RequestGuard<'_> {
        self.in_flight.inc();
        RequestGuard { volume: self, kind }
    }

    /// Counts a request refused before it ran (e.g. out of range): an operation and an error,
    /// no latency sample.
    pub fn refused(&self, kind: Kind) {
        let m = &self.kinds[kind.index()];
        m.operations.inc();
        m.errors.inc();
    }

    pub fn limits(&self) -> &LimitHits {
        &self.limits
    }

    /// Counts a request that a write fence held before it could start.
    pub fn fence_waited(&self, waited: Duration) {
        self.fence_waits.inc();
        self.fence_wait_seconds.inc_by(waited.as_secs_f64());
    }

    /// Counts connections fenced because their client was seen gone early.
    pub fn hangups_fenced(&self, connections: usize) {
        self.hangup_fences.inc_by(connections as u64);
    }

    /// Counts READ bytes sent from the page cache to the socket without a copy in between.
    pub fn sent_from_cache(&self, length_bytes: u64) {
        self.read_bytes_from_cache.inc_by(length_bytes);
    }

    /// Counts READ bytes written to the socket straight from the head's mapping (see
    /// `storage::volume::mapped_read`).
    pub fn written_from_mapping(&self, length_bytes: u64) {
        self.read_bytes_from_mapping.inc_by(length_bytes);
    }

    /// Counts WRITE bytes received straight into the page cache (see `storage::volume::in_place`).
    pub fn received_in_place(&self, length_bytes: u64) {
        self.write_bytes_in_place.inc_by(length_bytes);
    }

    /// Counts an attached client until the guard drops.
    pub fn connect(&self) -> ConnectionGuard<'_> {
        self.connections.inc();
        ConnectionGuard { volume: self }
    }
}

/// A request in flight. Dropping it unfinished (the client went away) only ends "in flight".
pub struct RequestGuard<'v> {
    volume: &'v VolumeMetrics,
    kind: Kind,
}

impl RequestGuard<'_> {
    /// Records a completed request; `bytes` count only when it succeeded.
    pub fn finish(self, bytes: u64, ok: bool, latency: Duration) {
        let m = &self.volume.kinds[self.kind.index()];
        m.operations.inc();
        if ok {
            if bytes > 0 {
                m.bytes.inc_by(bytes);
            }
        } else {
            m.errors.inc();
        }
        m.latency.observe(latency.as_secs_f64());
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        self.volume.in_flight.dec();
    }
}

pub struct ConnectionGuard<'v> {
    volume: &'v VolumeMetrics,
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.volume.connections.dec();
    }
}
