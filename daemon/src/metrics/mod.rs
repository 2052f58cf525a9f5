//! Prometheus metrics: the registry, per-volume handles and the `/metrics` endpoint.

pub mod backup;
pub mod http;
mod labels;
pub mod limits;
mod log_once;
pub mod policy;
mod volume;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub use labels::Kind;
use labels::{ReasonLabels, ThreadLabels, VolumeKindLabels, VolumeLabels};
pub use limits::{ConnectionLimits, Limit, LimitHits};
pub use volume::{RequestGuard, VolumeMetrics};

/// Request latency buckets: 10 µs (a page-cache hit) up to ~1.5 s (a slow flush) by factors of 2.5.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(10e-6, 2.5, 14))
}

type LatencyFamily = Family<VolumeKindLabels, Histogram, fn() -> Histogram>;

/// Every metric evsd exports. Connections fetch their volume's handle once ([`Metrics::volume`])
/// and then only touch atomics, so the request path never looks a label set up.
pub struct Metrics {
    registry: Registry,
    operations: Family<VolumeKindLabels, Counter>,
    bytes: Family<VolumeKindLabels, Counter>,
    errors: Family<VolumeKindLabels, Counter>,
    latency: LatencyFamily,
    in_flight: Family<VolumeLabels, Gauge>,
    connections: Family<VolumeLabels, Gauge>,
    fence_waits: Family<VolumeLabels, Counter>,
    fence_wait_seconds: Family<VolumeLabels, Counter<f64, AtomicU64>>,
    hangup_fences: Family<VolumeLabels, Counter>,
    read_bytes_from_cache: Family<VolumeLabels, Counter>,
    read_bytes_from_mapping: Family<VolumeLabels, Counter>,
    write_bytes_in_place: Family<VolumeLabels, Counter>,
    accepted: Counter,
    thread_connections: Family<ThreadLabels, Gauge>,
    refused: Family<ReasonLabels, Counter>,
    handshake_failures: Family<ReasonLabels, Counter>,
    /// Which clients' handshake failures were logged, by reason.
    handshake_failures_logged: std::sync::Mutex<log_once::LogOnce>,
    limits: Arc<LimitHits>,
    backup: backup::BackupMetrics,
    policy: Arc<policy::PolicyMetrics>,
    /// One handle per volume name, shared by its connections.
    handles: Mutex<HashMap<String, Arc<VolumeMetrics>>>,
    /// Whether a name is still exported, asked at each scrape: the series of deleted volumes
    /// and snapshots that `forget_volume` could not drop (a connection still held them, or
    /// the snapshot went without an admin delete) go then. A volume made again under the
    /// name starts from zero, which Prometheus reads as a counter reset.
    is_exported: OnceLock<ExportCheck>,
}

type ExportCheck = Box<dyn Fn(&str) -> bool + Send + Sync>;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let operations = Family::<VolumeKindLabels, Counter>::default();
        let bytes = Family::<VolumeKindLabels, Counter>::default();
        let errors = Family::<VolumeKindLabels, Counter>::default();
        let latency: LatencyFamily = Family::new_with_constructor(latency_histogram);
        let in_flight = Family::<VolumeLabels, Gauge>::default();
        let connections = Family::<VolumeLabels, Gauge>::default();
        let fence_waits = Family::<VolumeLabels, Counter>::default();
        let fence_wait_seconds = Family::<VolumeLabels, Counter<f64, AtomicU64>>::default();
        let hangup_fences = Family::<VolumeLabels, Counter>::default();
        let read_bytes_from_cache = Family::<VolumeLabels, Counter>::default();
        let read_bytes_from_mapping = Family::<VolumeLabels, Counter>::default();
        let write_bytes_in_place = Family::<VolumeLabels, Counter>::default();
        let accepted = Counter::default();
        let thread_connections = Family::<ThreadLabels, Gauge>::default();
        let refused = Family::<ReasonLabels, Counter>::default();
        let handshake_failures = Family::<ReasonLabels, Counter>::default();
        // The encoder appends `_total` to counters.
        registry.register(
            "evsd_volume_operations",
            "NBD requests completed, by volume and kind",
            operations.clone(),
        );
        registry.register(
            "evsd_volume_bytes",
            "Bytes read, written, trimmed or zeroed by successful requests",
            bytes.clone(),
        );
        registry.register(
            "evsd_volume_errors",
            "NBD requests answered with an error",
            errors.clone(),
        );
        registry.register(
            "evsd_volume_request_latency_seconds",
            "Time from decoding a request to its reply being ready",
            latency.clone(),
        );
        registry.register(
            "evsd_volume_requests_in_flight",
            "Requests started and not yet answered",
            in_flight.clone(),
        );
        registry.register(
            "evsd_volume_connections",
            "Clients attached to the volume",
            connections.clone(),
        );
        registry.register(
            "evsd_volume_fence_waits",
            "Writes, trims, zeroes and flushes held until another connection's abandoned writes were done",
            fence_waits.clone(),
        );
        registry.register(
            "evsd_volume_fence_wait_seconds",
            "Time requests spent held by a write fence",
            fence_wait_seconds.clone(),
        );
        registry.register(
            "evsd_volume_hangup_fences",
            "Connections whose client was seen hanging up before the connection had read its way to the end: their writes were fenced from then on",
            hangup_fences.clone(),
        );
        registry.register(
            "evsd_volume_read_bytes_sent_from_cache",
            "READ bytes sent from the page cache straight to the client's socket (sendfile), never copied into a buffer",
            read_bytes_from_cache.clone(),
        );
        registry.register(
            "evsd_volume_read_bytes_written_from_mapping",
            "READ bytes the socket's writev copied straight from the volume's mapped head, never copied into a buffer",
            read_bytes_from_mapping.clone(),
        );
        registry.register(
            "evsd_volume_write_bytes_received_in_place",
            "WRITE bytes received from the client's socket straight into the volume's page cache, never copied into a buffer, counted as they land",
            write_bytes_in_place.clone(),
        );
        registry.register(
            "evsd_connections_accepted",
            "Client connections accepted and served",
            accepted.clone(),
        );
        registry.register(
            "evsd_connection_thread_connections",
            "Client connections served by each connection thread",
            thread_connections.clone(),
        );
        registry.register(
            "evsd_connections_refused",
            "Client connections closed at accept",
            refused.clone(),
        );
        registry.register(
            "evsd_handshake_failures",
            "Handshakes that ended without transmission, by reason",
            handshake_failures.clone(),
        );
        let limits = Arc::new(LimitHits::register(&mut registry));
        let backup = backup::BackupMetrics::default();
        backup.register(&mut registry);
        let policy = Arc::new(policy::PolicyMetrics::default());
        policy.register(&mut registry);
        Metrics {
            backup,
            policy,
            registry,
            operations,
            bytes,
            errors,
            latency,
            in_flight,
            connections,
            fence_waits,
            fence_wait_seconds,
            hangup_fences,
            read_bytes_from_cache,
            read_bytes_from_mapping,
            write_bytes_in_place,
            accepted,
            thread_connections,
            refused,
            handshake_failures,
            handshake_failures_logged: std::sync::Mutex::new(log_once::LogOnce::new(
                limits::LOGGED_CLIENTS_CAPACITY,
            )),
            limits,
            handles: Mutex::new(HashMap::new()),
            is_exported: OnceLock::new(),
        }
    }

    pub fn policy(&self) -> &Arc<policy::PolicyMetrics> {
        &self.policy
    }

    pub fn backup(&self) -> &backup::BackupMetrics {
        &self.backup
    }

    /// The handle a connection keeps for its volume.
    pub fn volume(&self, name: &str) -> Arc<VolumeMetrics> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = handles.get(name) {
            return Arc::clone(handle);
        }
        let handle = Arc::new(VolumeMetrics::new(self, name));
        handles.insert(name.to_owned(), Arc::clone(&handle));
        handle
    }

    /// The gauge counting connection thread `index`'s connections (its clones share the value).
    pub fn connection_thread(&self, index: usize) -> Gauge {
        let labels = ThreadLabels {
            thread: index.to_string(),
        };
        self.thread_connections.get_or_create(&labels).clone()
    }

    pub fn connection_accepted(&self) {
        self.accepted.inc();
    }

    pub fn connection_refused(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a failed handshake of `peer`; true when it is to be logged: the first failure
    /// of this client for this reason (see `log_once`), so that a client failing in a loop
    /// logs one line, not one per connection.
    pub fn handshake_failed(&self, reason: &str, peer: &str) -> bool {
        self.count_handshake_failure(reason);
        // One bit per reason: the reasons are a handful of fixed labels.
        const REASONS: [&str; 12] = [
            "bad_client_flags",
            "bad_option_magic",
            "unknown_export",
            "tls_required",
            "export_refused",
            "shutdown",
            "protocol",
            "io",
            "tls",
            "closed",
            "aborted",
            "timeout",
        ];
        let bit = 1u16 << REASONS.iter().position(|r| *r == reason).unwrap_or(15);
        self.handshake_failures_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first(bit, &log_once::client_of(peer), std::time::Instant::now())
    }

    /// Counts a failed handshake that is not logged (a timeout is a limit hit, logged as such):
    /// it takes no place among the clients remembered as logged.
    pub fn count_handshake_failure(&self, reason: &str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a client running into `limit` and logs it the first time this client does.
    /// `peer` is the connection's peer name ("ADDR:PORT" or "unix#N").
    pub fn limit_hit(&self, limit: Limit, peer: &str) {
        self.limits.hit(limit, peer);
    }

    /// Tells the scrapes which volume names are still exported (set once, at start).
    pub fn set_export_check(&self, is_exported: impl Fn(&str) -> bool + Send + Sync + 'static) {
        let _ = self.is_exported.set(Box::new(is_exported));
    }

    /// Drops the series of names no longer exported whose last connection has ended.
    fn forget_gone_volumes(&self) {
        let Some(is_exported) = self.is_exported.get() else {
            return;
        };
        let idle = |handle: &Arc<VolumeMetrics>| Arc::strong_count(handle) == 1;
        // Asked with the handles unlocked: the check takes the registry's lock.
        let candidates: Vec<String> = {
            let handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            handles
                .iter()
                .filter(|(_, handle)| idle(handle))
                .map(|(name, _)| name.clone())
                .collect()
        };
        let gone: Vec<String> = candidates
            .into_iter()
            .filter(|name| !is_exported(name))
            .collect();
        for name in gone {
            self.forget_volume(&name);
        }
    }

    /// Drops the series of `volume` (just deleted) unless a connection still holds its
    /// handle; then the first scrape after that connection has ended drops them. Called by
    /// the deletes, so that a volume made again under the name counts from zero whether or not
    /// a scrape came in between.
    pub fn forget_volume(&self, volume: &str) {
        let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        if handles
            .get(volume)
            .is_some_and(|handle| Arc::strong_count(handle) == 1)
        {
            handles.remove(volume);
            self.remove_series(volume);
        }
    }

    fn remove_series(&self, volume: &str) {
        for kind in Kind::ALL {
            let labels = VolumeKindLabels {
                volume: volume.to_owned(),
                kind,
            };
            self.operations.remove(&labels);
            self.bytes.remove(&labels);
            self.errors.remove(&labels);
            self.latency.remove(&labels);
        }
        let labels = VolumeLabels {
            volume: volume.to_owned(),
        };
        self.in_flight.remove(&labels);
        self.connections.remove(&labels);
        self.fence_waits.remove(&labels);
        self.fence_wait_seconds.remove(&labels);
        self.hangup_fences.remove(&labels);
        self.read_bytes_from_cache.remove(&labels);
        self.read_bytes_from_mapping.remove(&labels);
        self.write_bytes_in_place.remove(&labels);
    }

    /// Exports the I/O engine's count of large-write bytes copied by the connections' own
    /// threads (see `IoEngine::write_all_at_here`).
    pub fn register_io(&mut self, copied_here_bytes: Counter) {
        self.registry.register(
            "evsd_io_large_write_bytes_copied_by_connections",
            "Bytes of large WRITEs copied into the page cache by the connection threads themselves (TCP clients) rather than by the I/O engine, counted as each piece lands whether or not the rest of its WRITE succeeds",
            copied_here_bytes,
        );
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        self.forget_gone_volumes();
        let mut out = String::with_capacity(16 << 10);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line_value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
            .and_then(|l| l[prefix.len()..].trim().parse().ok())
    }

    #[test]
    fn request_counters_are_encoded_per_volume_and_kind() {
        let metrics = Metrics::new();
        let vol = metrics.volume("vol1");
        for _ in 0..3 {
            let req = vol.start(Kind::Write);
            req.finish(4096, true, Duration::from_micros(50));
        }
        vol.start(Kind::Read)
            .finish(512, false, Duration::from_millis(2));
        let text = metrics.encode();
        let wr = r#"{volume="vol1",kind="write"}"#;
        let rd = r#"{volume="vol1",kind="read"}"#;
        assert_eq!(
            line_value(&text, &format!("evsd_volume_operations_total{wr}")),
            Some(3.0)
        );
        assert_eq!(
            line_value(&text, &format!("evsd_volume_bytes_total{wr}")),
            Some(12288.0)
        );
        assert_eq!(
            line_value(&text, &format!("evsd_volume_operations_total{rd}")),
            Some(1.0)
        );
        // A failed read moves no bytes but counts as an error; the series exists from the start.
        assert_eq!(
            line_value(&text, &format!("evsd_volume_bytes_total{rd}")),
            Some(0.0)
        );
        assert_eq!(
            line_value(&text, &format!("evsd_volume_errors_total{rd}")),
            Some(1.0)
        );
        assert_eq!(
            line_value(
                &text,
                &format!("evsd_volume_request_latency_seconds_count{wr}")
            ),
            Some(3.0)
        );
        assert_eq!(
            line_value(&text, r#"evsd_volume_requests_in_flight{volume="vol1"}"#),
            Some(0.0)
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn in_flight_and_connections_follow_their_guards() {
        let metrics = Metrics::new();
        let vol = metrics.volume("v");
        let a = vol.start(Kind::Flush);
        let b = vol.start(Kind::Flush);
        let conn = vol.connect();
        let text = metrics.encode();
        assert_eq!(
            line_value(&text, r#"evsd_volume_requests_in_flight{volume="v"}"#),
            Some(2.0)
        );
        assert_eq!(
            line_value(&text, r#"evsd_volume_connections{volume="v"}"#),
            Some(1.0)
        );
        // Dropped without finishing (the client vanished): no longer in flight, not counted.
        drop(a);
        b.finish(0, true, Duration::ZERO);
        drop(conn);
        let text = metrics.encode();
        assert_eq!(
            line_value(&text, r#"evsd_volume_requests_in_flight{volume="v"}"#),
            Some(0.0)
        );
        assert_eq!(
            line_value(&text, r#"evsd_volume_connections{volume="v"}"#),
            Some(0.0)
        );
        assert_eq!(
            line_value(
                &text,
                r#"evsd_volume_operations_total{volume="v",kind="flush"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn handles_are_shared_per_volume() {
        let metrics = Metrics::new();
        metrics
            .volume("x")
            .start(Kind::Trim)
            .finish(10, true, Duration::ZERO);
        metrics
            .volume("x")
            .start(Kind::Trim)
            .finish(20, true, Duration::ZERO);
        let text = metrics.encode();
        assert_eq!(
            line_value(&text, r#"evsd_volume_bytes_total{volume="x",kind="trim"}"#),
            Some(30.0)
        );
    }

    #[test]
    fn series_of_names_no_longer_exported_go_once_unused() {
        let metrics = Metrics::new();
        let exported = Arc::new(Mutex::new(vec!["kept".to_owned(), "gone".to_owned()]));
        let names = Arc::clone(&exported);
        metrics.set_export_check(move |name| names.lock().unwrap().iter().any(|n| n == name));
        for name in ["kept", "gone", "held"] {
            metrics
                .volume(name)
                .start(Kind::Write)
                .finish(4096, true, Duration::ZERO);
        }
        // A connection of a deleted volume still draining keeps its handle.
        let held = metrics.volume("held");
        let _connected = held.connect();
        exported.lock().unwrap().retain(|n| n != "gone");
        let text = metrics.encode();
        let bytes = |text: &str, volume: &str| {
            line_value(
                text,
                &format!(r#"evsd_volume_bytes_total{{volume="{volume}",kind="write"}}"#),
            )
        };
        assert_eq!(bytes(&text, "kept"), Some(4096.0));
        assert_eq!(bytes(&text, "held"), Some(4096.0));
        assert_eq!(bytes(&text, "gone"), None, "{text}");
        assert!(!text.contains(r#"volume="gone""#), "{text}");
        drop(_connected);
        drop(held);
        let text = metrics.encode();
        assert!(!text.contains(r#"volume="held""#), "{text}");
        assert_eq!(bytes(&text, "kept"), Some(4096.0));
        // Made again under the name: counted from zero.
        metrics
            .volume("gone")
            .start(Kind::Write)
            .finish(512, true, Duration::ZERO);
        exported.lock().unwrap().push("gone".to_owned());
        assert_eq!(bytes(&metrics.encode(), "gone"), Some(512.0));
    }

    #[test]
    fn a_deleted_volume_forgotten_without_a_scrape_counts_from_zero_when_made_again() {
        let metrics = Metrics::new();
        let write = |m: &Metrics, bytes| {
            m.volume("v")
                .start(Kind::Write)
                .finish(bytes, true, Duration::ZERO)
        };
        write(&metrics, 4096);
        // A connection still attached keeps the handle; the scrape after it ends drops it.
        let held = metrics.volume("v");
        metrics.forget_volume("v");
        write(&metrics, 4096);
        drop(held);
        metrics.forget_volume("v");
        write(&metrics, 512);
        let text = metrics.encode();
        assert_eq!(
            line_value(&text, r#"evsd_volume_bytes_total{volume="v",kind="write"}"#),
            Some(512.0),
            "{text}"
        );
    }

    #[test]
    fn daemon_wide_counters() {
        let metrics = Metrics::new();
        metrics.connection_accepted();
        metrics.connection_accepted();
        metrics.connection_refused("limit");
        metrics.handshake_failed("bad_client_flags", "10.0.0.1:5");
        metrics.limit_hit(Limit::Connections, "127.0.0.1:1000");
        metrics.limit_hit(Limit::Connections, "127.0.0.1:1001");
        let conn = metrics.volume("v");
        let mut limits = ConnectionLimits::new(conn.limits(), "unix#3");
        limits.hit(Limit::InflightRequests);
        limits.hit(Limit::InflightRequests);
        let text = metrics.encode();
        assert_eq!(
            line_value(&text, r#"evsd_limit_hits_total{limit="connections"}"#),
            Some(2.0)
        );
        assert_eq!(
            line_value(&text, r#"evsd_limit_hits_total{limit="inflight_requests"}"#),
            Some(2.0)
        );
        // Every limit's series exists before its first hit.
        assert_eq!(
            line_value(
                &text,
                r#"evsd_limit_hits_total{limit="volume_connections"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            line_value(&text, "evsd_connections_accepted_total"),
            Some(2.0)
        );
        assert_eq!(
            line_value(&text, r#"evsd_connections_refused_total{reason="limit"}"#),
            Some(1.0)
        );
        assert_eq!(
            line_value(
                &text,
                r#"evsd_handshake_failures_total{reason="bad_client_flags"}"#
            ),
            Some(1.0)
        );
    }
}
