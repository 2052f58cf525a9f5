//! Which TCP congestion control a client connection sends with.
//!
//! Many distributions and cloud images make BBR the system default. BBR paces its sending
//! from a kernel timer when the interface has no `fq` qdisc, and loopback has none: the timer
//! sends from one CPU while our `writev` sends from another, so the client's socket sees
//! segments out of order and asks for them again. Measured here over 127.0.0.1 with fio (1 MiB
//! reads at depth 8, one connection, 6 s): 1480 retransmissions, 95 MB sent twice, 2610-2720
//! MiB/s. The same runs with the connection switched to reno or cubic: 3780-3980 MiB/s, and
//! 3300 to 4950 MiB/s with four connections. 4 KiB reads did not change. A client on the same
//! host (qemu beside its storage daemon) has no network to pace for, so by default a
//! connection from a loopback address is moved off a pacing algorithm; a remote one keeps the
//! administrator's choice.
//!
//! Only our sending side changes: a client's writes go out with its own socket's algorithm.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

/// The kernel's limit on an algorithm's name, terminating NUL included (TCP_CA_NAME_MAX).
const MAX_NAME_BYTES: usize = 15;

/// What loopback connections get in place of a pacing algorithm, in order of preference:
/// cubic may be refused to an unprivileged process (net.ipv4.tcp_allowed_congestion_control),
/// reno never is.
const LOOPBACK_ALGORITHMS: [&str; 2] = ["cubic", "reno"];

static LOOPBACK_CHANGE_REPORTED: AtomicBool = AtomicBool::new(false);

/// The `tcp_congestion` setting.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TcpCongestion {
    /// Loopback clients move off a pacing algorithm (BBR); others keep the system's.
    #[default]
    Auto,
    /// Every connection keeps the system's default.
    System,
    /// Every connection uses this algorithm; the listener is refused at start if the kernel
    /// does not allow it.
    Named(String),
}

impl FromStr for TcpCongestion {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "auto" => Ok(TcpCongestion::Auto),
            "system" => Ok(TcpCongestion::System),
            name if !name.is_empty()
                && name.len() <= MAX_NAME_BYTES
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                Ok(TcpCongestion::Named(name.to_owned()))
            }
            _ => Err(format!(
                "use \"auto\", \"system\" or an algorithm's name of at most {MAX_NAME_BYTES} letters, digits, '_' or '-'"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("tcp_congestion {name:?}: the kernel refused it ({source}); it allows {allowed}")]
pub struct CongestionRefused {
    name: String,
    allowed: String,
    source: std::io::Error,
}

impl TcpCongestion {
    /// Sets a named algorithm on the listener, whose accepted connections inherit it.
    pub fn apply_to_listener(&self, listener: &impl AsRawFd) -> Result<(), CongestionRefused> {
        let TcpCongestion::Named(name) = self else {
            return Ok(());
        };
        set(listener, name).map_err(|source| CongestionRefused {
            name: name.clone(),
            allowed: allowed_algorithms(),
            source,
        })
    }

    /// Moves a connection from a loopback client off a pacing algorithm (`Auto` only).
    pub fn apply_to_connection(&self, stream: &impl AsRawFd, peer: IpAddr) {
        if *self != TcpCongestion::Auto || !peer.to_canonical().is_loopback() {
            return;
        }
        let Ok(current) = get(stream) else {
            return;
        };
        if !paces_itself(&current) {
            return;
        }
        for algorithm in LOOPBACK_ALGORITHMS {
            if set(stream, algorithm).is_ok() {
                if !LOOPBACK_CHANGE_REPORTED.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        system = %current,
                        loopback = algorithm,
                        "loopback clients are served with TCP congestion control {algorithm}: the system's {current} paces loopback traffic, which reorders it (--tcp-congestion system keeps {current})"
                    );
                }
                return;
            }
        }
    }
}

/// Algorithms that pace their own sending and so reorder loopback traffic without `fq`.
fn paces_itself(algorithm: &str) -> bool {
    algorithm.starts_with("bbr")
}

fn get(socket: &impl AsRawFd) -> std::io::Result<String> {
    let mut name = [0u8; MAX_NAME_BYTES + 1];
    let mut length = name.len() as libc::socklen_t;
    // SAFETY: `name` is a live buffer of `length` bytes for the kernel to fill, and `length`
    // a live socklen_t it updates; the fd belongs to `socket`, borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_mut_ptr().cast(),
            &mut length,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let filled = &name[..(length as usize).min(name.len())];
    let end = filled.iter().position(|&b| b == 0).unwrap_or(filled.len());
    Ok(String::from_utf8_lossy(&filled[..end]).into_owned())
}

fn set(socket: &impl AsRawFd, algorithm: &str) -> std::io::Result<()> {
    // SAFETY: the kernel reads `algorithm.len()` bytes from the string's live buffer; the fd
    // belongs to `socket`, borrowed for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            algorithm.as_ptr().cast(),
            algorithm.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// For the refusal's message: what this process may choose.
fn allowed_algorithms() -> String {
    let read = |path| std::fs::read_to_string(path).map(|s: String| s.trim().to_owned());
    let allowed = read("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
        .unwrap_or_else(|_| "an unknown set".to_owned());
    match read("/proc/sys/net/ipv4/tcp_available_congestion_control") {
        Ok(available) => format!(
            "{allowed} to unprivileged processes; {available} are loaded (see net.ipv4.tcp_allowed_congestion_control)"
        ),
        Err(_) => allowed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modes_and_names() {
        assert_eq!("auto".parse(), Ok(TcpCongestion::Auto));
        assert_eq!("system".parse(), Ok(TcpCongestion::System));
        assert_eq!(
            "cubic".parse(),
            Ok(TcpCongestion::Named("cubic".to_owned()))
        );
        assert_eq!(
            "bbr2-x_1".parse(),
            Ok(TcpCongestion::Named("bbr2-x_1".to_owned()))
        );
        for bad in ["", "a b", "cubic\0", "../reno", "sixteen_letters_"] {
            assert!(bad.parse::<TcpCongestion>().is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn only_bbr_counts_as_pacing() {
        assert!(paces_itself("bbr"));
        assert!(!paces_itself("cubic"));
        assert!(!paces_itself("reno"));
    }

    #[test]
    fn named_algorithm_is_set_on_a_listener_and_a_bad_one_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        TcpCongestion::Named("reno".to_owned())
            .apply_to_listener(&listener)
            .unwrap();
        assert_eq!(get(&listener).unwrap(), "reno");
        let error = TcpCongestion::Named("no_such_algo".to_owned())
            .apply_to_listener(&listener)
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"no_such_algo\""), "{error}");
        assert!(error.contains("reno"), "{error}");
    }

    #[test]
    fn auto_moves_loopback_connections_off_bbr_only() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        set(&client, "bbr").expect("this test needs the kernel's bbr (modprobe tcp_bbr)");
        // A remote address keeps its algorithm, and so do the other modes.
        TcpCongestion::Auto.apply_to_connection(&client, "192.0.2.1".parse().unwrap());
        TcpCongestion::System.apply_to_connection(&client, "127.0.0.1".parse().unwrap());
        assert_eq!(get(&client).unwrap(), "bbr");
        TcpCongestion::Auto.apply_to_connection(&client, "::ffff:127.0.0.1".parse().unwrap());
        let now = get(&client).unwrap();
        assert!(LOOPBACK_ALGORITHMS.contains(&now.as_str()), "{now}");
        // A non-pacing algorithm stays as it is.
        set(&client, "reno").unwrap();
        TcpCongestion::Auto.apply_to_connection(&client, "127.0.0.1".parse().unwrap());
        assert_eq!(get(&client).unwrap(), "reno");
    }
}
