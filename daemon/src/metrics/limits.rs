//! Limit hits: every time a client runs into one of the server's limits it is counted in
//! `evsd_limit_hits_total{limit}` and, the first time a client hits a given limit, logged once.
//! A client that keeps hitting a limit must not flood the log, and a crowd of clients must not
//! grow the memory that remembers who was logged.

use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::log_once::{client_of, LogOnce};

/// Distinct clients remembered as already logged (see `log_once`).
pub const LOGGED_CLIENTS_CAPACITY: usize = 4096;

/// The limits the server enforces on clients.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Limit {
    /// `--max-connections`: the connection is closed at accept.
    Connections,
    /// A volume's own connection limit: the connection is refused for that volume.
    VolumeConnections,
    /// `--handshake-timeout-secs`: the handshake did not finish in time.
    HandshakeTimeout,
    /// `--idle-timeout-secs`: nothing happened on the connection for that long.
    IdleTimeout,
    /// `--idle-timeout-secs` too: the client took no byte of its waiting replies for that long.
    RepliesUnread,
    /// The connection was closing on its client's account (end of stream, NBD_CMD_DISC, a
    /// protocol violation) and the client took no byte of its waiting replies for
    /// `nbd::transmission::CLOSING_REPLY_STALL`.
    RepliesUnreadAtClose,
    /// `--max-inflight-requests`: the server stopped reading the connection.
    InflightRequests,
    /// `--max-inflight-mib`: the server stopped reading the connection.
    InflightBytes,
    /// A request over the maximum size (payload or READ length).
    RequestSize,
}

impl Limit {
    pub const ALL: [Limit; 9] = [
        Limit::Connections,
        Limit::VolumeConnections,
        Limit::HandshakeTimeout,
        Limit::IdleTimeout,
        Limit::RepliesUnread,
        Limit::RepliesUnreadAtClose,
        Limit::InflightRequests,
        Limit::InflightBytes,
        Limit::RequestSize,
    ];

    /// The `limit` label value; stable, dashboards and alerts select on it.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::VolumeConnections => "volume_connections",
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::IdleTimeout => "idle_timeout",
            Limit::RepliesUnread => "replies_unread",
            Limit::RepliesUnreadAtClose => "replies_unread_at_close",
            Limit::InflightRequests => "inflight_requests",
            Limit::InflightBytes => "inflight_bytes",
            Limit::RequestSize => "request_size",
        }
    }

    /// What happened, for the one log line per client.
    pub(crate) fn description(self) -> &'static str {
        match self {
            Limit::Connections => "connection refused: max_connections reached",
            Limit::VolumeConnections => "connection refused: the volume's connection limit reached",
            Limit::HandshakeTimeout => "connection closed: handshake_timeout_secs expired",
            Limit::IdleTimeout => "connection closed: idle for idle_timeout_secs",
            Limit::RepliesUnread => {
                "connection closed: the client took no byte of its replies for idle_timeout_secs"
            }
            Limit::RepliesUnreadAtClose => {
                "connection closed: it was ending (the client's end of stream, NBD_CMD_DISC or protocol violation, or the server closing it) and the client took no byte of its replies for 10 s"
            }
            Limit::InflightRequests => "reading paused: max_inflight_requests requests in flight",
            Limit::InflightBytes => "reading paused: max_inflight_mib of data in flight",
            Limit::RequestSize => "request over the maximum size refused",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn bit(self) -> u16 {
        1 << self.index()
    }
}

impl EncodeLabelValue for Limit {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: Limit,
}

/// The limit-hit counters and the set of clients already logged.
pub struct LimitHits {
    /// Indexed by [`Limit::index`]; every series exists from the start, at 0.
    counters: [Counter; Limit::ALL.len()],
    logged: Mutex<LogOnce>,
}

impl LimitHits {
    pub(super) fn register(registry: &mut Registry) -> LimitHits {
        let family = Family::<LimitLabels, Counter>::default();
        registry.register(
            "evsd_limit_hits",
            "Times a client ran into a server limit, by limit",
            family.clone(),
        );
        LimitHits {
            counters: Limit::ALL.map(|limit| family.get_or_create_owned(&LimitLabels { limit })),
            logged: Mutex::new(LogOnce::new(LOGGED_CLIENTS_CAPACITY)),
        }
    }

    /// Counts a hit by `peer` (a connection's peer name) and logs it if this client has not
    /// hit this limit before.
    pub fn hit(&self, limit: Limit, peer: &str) {
        self.counters[limit.index()].inc();
        self.log_once(limit, peer);
    }

    fn log_once(&self, limit: Limit, peer: &str) {
        let client = client_of(peer);
        // A poisoned lock only means another thread panicked mid-insert; the set is still valid.
        let first = self.logged.lock().unwrap_or_else(|e| e.into_inner()).first(
            limit.bit(),
            &client,
            Instant::now(),
        );
        if first {
            tracing::warn!(
                limit = limit.label(),
                %client,
                peer,
                "{} (logged once per client; every hit is counted in evsd_limit_hits_total)",
                limit.description()
            );
        }
    }
}

/// One connection's view of [`LimitHits`]. After a connection has hit a limit once, further
/// hits of it cost one atomic increment: a connection pipelining past its in-flight cap hits it
/// on almost every request.
pub struct ConnectionLimits<'a> {
    hits: &'a LimitHits,
    peer: &'a str,
    /// Bit set of the limits this connection already passed to the log-once set.
    noted: u16,
}

impl<'a> ConnectionLimits<'a> {
    pub fn new(hits: &'a LimitHits, peer: &'a str) -> ConnectionLimits<'a> {
        ConnectionLimits {
            hits,
            peer,
            noted: 0,
        }
    }

    pub fn hit(&mut self, limit: Limit) {
        self.hits.counters[limit.index()].inc();
        if self.noted & limit.bit() == 0 {
            self.noted |= limit.bit();
            self.hits.log_once(limit, self.peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::HashSet<_> = Limit::ALL.iter().map(|l| l.label()).collect();
        assert_eq!(labels.len(), Limit::ALL.len());
        assert!(Limit::ALL.iter().enumerate().all(|(i, l)| l.index() == i));
    }
}
