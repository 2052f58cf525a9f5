//! One volume's access rules and the decision they give for one client.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::access::error::AccessError;

/// Longest client name accepted in an allow-list (a DNS name's limit).
const MAX_NAME_BYTES: usize = 255;

/// Where a client connected from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    Tcp(IpAddr),
    /// The local NBD Unix socket; its file permissions already vouch for the client.
    Unix,
}

impl ClientAddr {
    /// IPv4 clients of a dual-stack listener arrive as `::ffff:a.b.c.d`; rules are written for
    /// the IPv4 form.
    pub fn tcp(ip: IpAddr) -> ClientAddr {
        ClientAddr::Tcp(ip.to_canonical())
    }
}

/// Everything access rules can look at: fixed at accept, completed once TLS is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub addr: ClientAddr,
    /// TLS is negotiated on this connection.
    pub tls: bool,
    /// Names from the client certificate the CA verified (subject CN and DNS SANs); empty
    /// without TLS or without `--tls-ca`.
    pub cert_names: Vec<String>,
}

/// One entry of a network allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkRule {
    Net(IpNet),
    /// Clients of the NBD Unix socket.
    Unix,
}

impl NetworkRule {
    fn matches(&self, addr: ClientAddr) -> bool {
        match (self, addr) {
            (NetworkRule::Net(net), ClientAddr::Tcp(ip)) => net.contains(&ip),
            (NetworkRule::Unix, ClientAddr::Unix) => true,
            _ => false,
        }
    }
}

impl FromStr for NetworkRule {
    type Err = AccessError;

    fn from_str(value: &str) -> Result<NetworkRule, AccessError> {
        if value == "unix" {
            return Ok(NetworkRule::Unix);
        }
        let invalid = |reason: String| AccessError::InvalidNetwork {
            value: value.to_owned(),
            reason,
        };
        if value.contains('/') {
            let net: IpNet = value.parse().map_err(|e| invalid(format!("{e}")))?;
            // 10.1.2.3/8 is almost always a typo for 10.0.0.0/8: refuse rather than guess.
            if net.trunc() != net {
                return Err(invalid(format!(
                    "host bits are set; did you mean {}?",
                    net.trunc()
                )));
            }
            // Clients are compared in IPv4 form: an IPv4-mapped range is its IPv4 range
            // (::ffff:10.0.0.0/104 is 10.0.0.0/8), else it would never match.
            if let IpNet::V6(v6) = net {
                if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
                    let v4 = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                        .map_err(|e| invalid(format!("{e}")))?;
                    return Ok(NetworkRule::Net(IpNet::V4(v4)));
                }
            }
            return Ok(NetworkRule::Net(net));
        }
        let ip: IpAddr = value.parse().map_err(|e| invalid(format!("{e}")))?;
        Ok(NetworkRule::Net(IpNet::from(ip.to_canonical())))
    }
}

impl fmt::Display for NetworkRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkRule::Net(net) => write!(f, "{net}"),
            NetworkRule::Unix => f.write_str("unix"),
        }
    }
}

impl Serialize for NetworkRule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NetworkRule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A volume's rules. The default (every list empty, no flag) lets every client in, as a volume
/// without rules does. Both lists set means both must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessPolicy {
    /// Client certificate names (subject CN or DNS SAN, ASCII case-insensitive) allowed in.
    /// Setting any makes the volume TLS-only, since names only come from verified certificates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_names: Vec<String>,
    /// Source networks allowed in (`10.0.0.0/8`, `::1`, `unix`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_networks: Vec<NetworkRule>,
    /// Every client gets the volume read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Served only over TLS (the spec's SELECTIVETLS "TLS-only export").
    #[serde(default)]
    pub tls_only: bool,
    /// Connections to this volume at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// What the rules say about one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow {
        read_only: bool,
    },
    /// Would be decided after STARTTLS; the handshake answers ERR_TLS_REQD.
    NeedsTls,
    /// Not for this client: the volume is hidden from it (ERR_UNKNOWN, absent from LIST).
    Deny,
}

impl AccessPolicy {
    /// Refuses rules that could never have been meant.
    pub fn validate(&self) -> Result<(), AccessError> {
        for name in &self.allow_names {
            let printable = name.chars().all(|c| !c.is_control());
            if name.is_empty() || name.len() > MAX_NAME_BYTES || !printable {
                return Err(AccessError::InvalidName(name.clone()));
            }
        }
        if self.max_connections == Some(0) {
            return Err(AccessError::ZeroConnectionLimit);
        }
        Ok(())
    }

    /// True when the rules restrict nothing.
    pub fn is_open(&self) -> bool {
        *self == AccessPolicy::default()
    }

    /// Whether the volume is only reachable over TLS.
    pub fn needs_tls(&self) -> bool {
        self.tls_only || !self.allow_names.is_empty()
    }

    pub fn decide(&self, client: &ClientIdentity) -> Decision {
        // The network is known before TLS: a client from elsewhere learns nothing, not even
        // that TLS would be needed.
        if !self.allow_networks.is_empty()
            && !self
                .allow_networks
                .iter()
                .any(|rule| rule.matches(client.addr))
        {
            return Decision::Deny;
        }
        if self.needs_tls() && !client.tls {
            return Decision::NeedsTls;
        }
        if !self.allow_names.is_empty()
            && !client.cert_names.iter().any(|presented| {
                self.allow_names
                    .iter()
                    .any(|allowed| allowed.eq_ignore_ascii_case(presented))
            })
        {
            return Decision::Deny;
        }
        Decision::Allow {
            read_only: self.read_only,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(addr: &str, tls: bool, names: &[&str]) -> ClientIdentity {
        ClientIdentity {
            addr: if addr == "unix" {
                ClientAddr::Unix
            } else {
                ClientAddr::tcp(addr.parse().unwrap())
            },
            tls,
            cert_names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn networks(rules: &[&str]) -> Vec<NetworkRule> {
        rules.iter().map(|r| r.parse().unwrap()).collect()
    }

    #[test]
    fn open_policy_allows_everyone() {
        let policy = AccessPolicy::default();
        assert!(policy.is_open());
        for c in [client("10.1.1.1", false, &[]), client("unix", true, &["x"])] {
            assert_eq!(policy.decide(&c), Decision::Allow { read_only: false });
        }
    }

    #[test]
    fn networks_match_cidrs_hosts_mapped_v4_and_unix() {
        let policy = AccessPolicy {
            allow_networks: networks(&["10.0.0.0/8", "::1", "192.168.1.7"]),
            ..Default::default()
        };
        let allowed = Decision::Allow { read_only: false };
        assert_eq!(policy.decide(&client("10.200.3.4", false, &[])), allowed);
        assert_eq!(
            policy.decide(&client("::ffff:10.0.0.1", false, &[])),
            allowed
        );
        assert_eq!(policy.decide(&client("::1", false, &[])), allowed);
        assert_eq!(policy.decide(&client("192.168.1.7", false, &[])), allowed);
        assert_eq!(
            policy.decide(&client("192.168.1.8", false, &[])),
            Decision::Deny
        );
        assert_eq!(
            policy.decide(&client("11.0.0.1", false, &[])),
            Decision::Deny
        );
        assert_eq!(policy.decide(&client("unix", false, &[])), Decision::Deny);
        // An IPv4-mapped range is its IPv4 range.
        let mapped = AccessPolicy {
            allow_networks: networks(&["::ffff:172.16.0.0/108"]),
            ..Default::default()
        };
        assert_eq!(mapped.allow_networks[0].to_string(), "172.16.0.0/12");
        assert_eq!(mapped.decide(&client("172.20.1.1", false, &[])), allowed);
        assert_eq!(
            mapped.decide(&client("::ffff:172.20.1.1", false, &[])),
            allowed
        );
        assert_eq!(
            mapped.decide(&client("172.32.0.1", false, &[])),
            Decision::Deny
        );
        let with_unix = AccessPolicy {
            allow_networks: networks(&["unix"]),
            ..Default::default()
        };
        assert_eq!(with_unix.decide(&client("unix", false, &[])), allowed);
        assert_eq!(
            with_unix.decide(&client("127.0.0.1", false, &[])),
            Decision::Deny
        );
    }

    #[test]
    fn names_need_tls_then_a_matching_certificate() {
        let policy = AccessPolicy {
            allow_names: vec!["Client-A".into()],
            read_only: true,
            ..Default::default()
        };
        assert_eq!(
            policy.decide(&client("127.0.0.1", false, &[])),
            Decision::NeedsTls
        );
        assert_eq!(
            policy.decide(&client("127.0.0.1", true, &[])),
            Decision::Deny
        );
        assert_eq!(
            policy.decide(&client("127.0.0.1", true, &["client-b"])),
            Decision::Deny
        );
        assert_eq!(
            policy.decide(&client("127.0.0.1", true, &["x", "client-a"])),
            Decision::Allow { read_only: true }
        );
    }

    #[test]
    fn both_lists_must_match_and_network_is_checked_first() {
        let policy = AccessPolicy {
            allow_names: vec!["a".into()],
            allow_networks: networks(&["127.0.0.0/8"]),
            ..Default::default()
        };
        // From outside the network not even TLS_REQD is revealed.
        assert_eq!(
            policy.decide(&client("10.0.0.1", false, &[])),
            Decision::Deny
        );
        assert_eq!(
            policy.decide(&client("10.0.0.1", true, &["a"])),
            Decision::Deny
        );
        assert_eq!(
            policy.decide(&client("127.0.0.2", true, &["a"])),
            Decision::Allow { read_only: false }
        );
    }

    #[test]
    fn tls_only_without_names() {
        let policy = AccessPolicy {
            tls_only: true,
            ..Default::default()
        };
        assert_eq!(
            policy.decide(&client("unix", false, &[])),
            Decision::NeedsTls
        );
        assert_eq!(
            policy.decide(&client("unix", true, &[])),
            Decision::Allow { read_only: false }
        );
    }

    #[test]
    fn bad_rules_are_refused_with_the_value() {
        for bad in ["10.0.0.0/33", "10.1.2.3/8", "nonsense", "", "fe80::1/200"] {
            let err = bad.parse::<NetworkRule>().unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        let policy = AccessPolicy {
            allow_names: vec!["a\nb".into()],
            ..Default::default()
        };
        assert!(matches!(
            policy.validate(),
            Err(AccessError::InvalidName(_))
        ));
        let policy = AccessPolicy {
            max_connections: Some(0),
            ..Default::default()
        };
        assert!(matches!(
            policy.validate(),
            Err(AccessError::ZeroConnectionLimit)
        ));
    }

    #[test]
    fn serde_round_trip_uses_plain_strings() {
        let policy = AccessPolicy {
            allow_names: vec!["a".into()],
            allow_networks: networks(&["10.0.0.0/8", "unix", "::1"]),
            read_only: true,
            tls_only: false,
            max_connections: Some(3),
        };
        let json = serde_json::to_string(&policy).unwrap();
        assert!(
            json.contains(r#""allow_networks":["10.0.0.0/8","unix","::1/128"]"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<AccessPolicy>(&json).unwrap(), policy);
        assert!(serde_json::from_str::<AccessPolicy>(r#"{"allow_networks":["bad"]}"#).is_err());
    }
}
