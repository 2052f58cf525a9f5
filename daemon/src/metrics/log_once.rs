//! Which (client, kind) pairs were already logged, so that a client repeating a failure or
//! running into a limit logs one line, not one per connection. The memory is bounded: once it
//! remembers its capacity of clients, newcomers share one line per interval between them (a
//! crowd of addresses, say one client rotating through an IPv6 /64, cannot flood the log),
//! and a full set starts over once it is an hour old (its clients may then be logged again).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// How often a line for a client not remembered goes out once the set is full.
pub const OVERFLOW_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How old a full set must be to start over.
pub const FULL_SET_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Debug)]
pub struct LogOnce {
    /// Client → bit set of the kinds already logged for it.
    clients: HashMap<Box<str>, u16>,
    capacity: usize,
    /// When a client not remembered was last logged while the set was full.
    overflow_logged_at: Option<Instant>,
    /// When the set last started (empty).
    started_at: Option<Instant>,
}

impl LogOnce {
    pub fn new(capacity: usize) -> LogOnce {
        LogOnce {
            clients: HashMap::new(),
            capacity: capacity.max(1),
            overflow_logged_at: None,
            started_at: None,
        }
    }

    /// Whether to log `client`'s `kind` (a bit, one per kind) at `now`: the first time this
    /// client has it; for a client the full set does not remember, once per
    /// [`OVERFLOW_LOG_INTERVAL`] among all such.
    pub fn first(&mut self, kind: u16, client: &str, now: Instant) -> bool {
        let started_at = *self.started_at.get_or_insert(now);
        if self.clients.len() >= self.capacity
            && now.duration_since(started_at) >= FULL_SET_LIFETIME
        {
            self.clients.clear();
            self.started_at = Some(now);
        }
        if let Some(logged) = self.clients.get_mut(client) {
            let first = *logged & kind == 0;
            *logged |= kind;
            return first;
        }
        if self.clients.len() < self.capacity {
            self.clients.insert(client.into(), kind);
            return true;
        }
        let due = self
            .overflow_logged_at
            .is_none_or(|at| now.duration_since(at) >= OVERFLOW_LOG_INTERVAL);
        if due {
            self.overflow_logged_at = Some(now);
        }
        due
    }

    #[cfg(test)]
    pub fn remembered(&self) -> usize {
        self.clients.len()
    }
}

/// The client a peer name stands for: the IP address of a TCP peer ("127.0.0.1:54321" →
/// "127.0.0.1"), its /64 for IPv6 ("[2001:db8::5]:7" → "2001:db8::/64": one host holds a
/// whole /64), "unix" for any Unix-socket peer ("unix#7"). Ports and connection numbers change
/// with every connection; the client does not.
pub fn client_of(peer: &str) -> String {
    if peer.starts_with("unix") {
        return "unix".into();
    }
    let host = match peer.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host),
        _ => peer,
    };
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            format!("{}/64", Ipv6Addr::from(prefix))
        }
        _ => host.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_is_the_address_without_port_and_ipv6_its_64() {
        assert_eq!(client_of("127.0.0.1:54321"), "127.0.0.1");
        assert_eq!(client_of("[::1]:10809"), "::/64");
        assert_eq!(client_of("[2001:db8::5]:1"), "2001:db8::/64");
        assert_eq!(client_of("[2001:db8:0:0:ffff::9]:2"), "2001:db8::/64");
        assert_eq!(client_of("[::ffff:10.0.0.1]:3"), "::ffff:10.0.0.1");
        assert_eq!(client_of("[fe80::1%eth0]:1"), "fe80::1%eth0");
        assert_eq!(client_of("unix#1"), "unix");
        assert_eq!(client_of("unix#4711"), "unix");
        assert_eq!(client_of("no-port"), "no-port");
    }

    #[test]
    fn logs_once_per_kind_and_client() {
        let now = Instant::now();
        let mut set = LogOnce::new(16);
        assert!(set.first(1, "10.0.0.1", now));
        assert!(!set.first(1, "10.0.0.1", now));
        // Another kind of the same client, and the same kind of another client, are new.
        assert!(set.first(2, "10.0.0.1", now));
        assert!(set.first(1, "10.0.0.2", now));
        assert!(!set.first(2, "10.0.0.1", now));
        assert_eq!(set.remembered(), 2);
    }

    /// Past its capacity the set remembers no one more, and the clients it does not remember
    /// share one line per interval: a crowd of addresses logs a bounded number of lines.
    #[test]
    fn a_full_set_stays_bounded_and_so_does_the_log() {
        let start = Instant::now();
        let mut set = LogOnce::new(100);
        let mut logged = 0;
        for i in 0..10_000u32 {
            let client = format!("10.1.{}.{}", i / 256, i % 256);
            logged += u32::from(set.first(1, &client, start));
            assert!(set.remembered() <= 100);
        }
        assert_eq!(logged, 101, "the first 100, then one for the rest");
        assert!(!set.first(1, "10.9.9.9", start + OVERFLOW_LOG_INTERVAL / 2));
        assert!(set.first(1, "10.9.9.9", start + OVERFLOW_LOG_INTERVAL));
        // The remembered ones are still logged once per kind.
        assert!(!set.first(1, "10.1.0.0", start));
        assert!(set.first(2, "10.1.0.0", start));
        // An hour on, the full set starts over.
        let later = start + FULL_SET_LIFETIME;
        assert!(set.first(1, "10.1.0.0", later));
        assert_eq!(set.remembered(), 1);
    }
}
