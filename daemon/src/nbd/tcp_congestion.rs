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
//! connection from this host (a loopback address or any other of the host's) is moved off a
//! pacing algorithm; a remote one keeps the administrator's choice.
//!
//! Only our sending side changes: a client's writes go out with its own socket's algorithm.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;

/// The longest algorithm name the kernel takes: TCP_CA_NAME_MAX (16) less its terminating NUL.
const MAX_NAME_BYTES: usize = 15;

/// What loopback connections get in place of a pacing algorithm, in order of preference:
/// cubic may be refused to an unprivileged process (net.ipv4.tcp_allowed_congestion_control),
/// reno never is.
const LOOPBACK_ALGORITHMS: [&str; 2] = ["cubic", "reno"];

static LOOPBACK_CHANGE_REPORTED: AtomicBool = AtomicBool::new(false);

/// The `tcp_congestion` setting.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TcpCongestion {
    /// Clients on this host move off a pacing algorithm (BBR); others keep the system's.
    #[default]
    Auto,
    /// Every connection keeps the system's default.
    System,
    /// Every connection uses this algorithm; the start fails if the kernel does not allow it.
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
#[error("tcp_congestion {name:?}: the kernel refused it: {why}")]
pub struct CongestionRefused {
    name: String,
    why: String,
}

impl CongestionRefused {
    fn new(name: &str, error: &std::io::Error) -> CongestionRefused {
        let read = |path| std::fs::read_to_string(path).map(|s: String| s.trim().to_owned());
        let available = read("/proc/sys/net/ipv4/tcp_available_congestion_control")
            .unwrap_or_else(|_| "unknown".to_owned());
        let allowed = read("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .unwrap_or_else(|_| "unknown".to_owned());
        let why = match error.raw_os_error() {
            Some(libc::ENOENT) => format!(
                "no such algorithm is loaded (loaded: {available}; `modprobe tcp_{name}` loads a module)"
            ),
            Some(libc::EPERM) => format!(
                "an unprivileged process may use only {allowed} (net.ipv4.tcp_allowed_congestion_control)"
            ),
            _ => format!("{error} (loaded: {available}; allowed to unprivileged processes: {allowed})"),
        };
        CongestionRefused {
            name: name.to_owned(),
            why,
        }
    }
}

impl TcpCongestion {
    /// Checks a named algorithm on a socket of our own, before the daemon touches its data
    /// directory or binds anything: a refused name must stop the start with nothing done, even
    /// with no TCP listener at all.
    pub fn check(&self) -> Result<(), CongestionRefused> {
        let TcpCongestion::Named(name) = self else {
            return Ok(());
        };
        let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .or_else(|_| socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None))
            .map_err(|e| CongestionRefused::new(name, &e))?;
        set(&probe, name).map_err(|e| CongestionRefused::new(name, &e))
    }

    /// Readies the NBD listener before its accept loop starts. A named algorithm, or the
    /// loopback one on a listener bound to a loopback address, is set on the listener: its
    /// connections inherit it, so BBR never starts on them (switching a connection that BBR
    /// started leaves the kernel pacing it). A listener the service manager passed is left as
    /// it is, since the setting would outlive us on its socket; a named algorithm is then only
    /// checked on a socket of our own.
    pub fn prepare_listener(
        &self,
        listener: &TcpListener,
        inherited: bool,
    ) -> Result<(), CongestionRefused> {
        match self {
            TcpCongestion::System => Ok(()),
            TcpCongestion::Named(_) if inherited => self.check(),
            TcpCongestion::Named(name) => {
                set(listener, name).map_err(|e| CongestionRefused::new(name, &e))
            }
            TcpCongestion::Auto => {
                let loopback = listener
                    .local_addr()
                    .is_ok_and(|addr| addr.ip().to_canonical().is_loopback());
                if !inherited && loopback {
                    move_off_pacing(listener);
                }
                Ok(())
            }
        }
    }

    /// Each accepted connection: a named algorithm for those that arrived before the listener
    /// had it; under `Auto`, a client on this host (loopback, or any address of this host)
    /// moves off a pacing algorithm when the listener could not do it for all.
    pub fn apply_to_connection(&self, stream: &impl AsRawFd, peer: IpAddr, local: IpAddr) {
        match self {
            TcpCongestion::System => {}
            TcpCongestion::Named(name) => {
                if get(stream).is_ok_and(|current| current != *name) {
                    let _ = set(stream, name);
                }
            }
            TcpCongestion::Auto => {
                let peer = peer.to_canonical();
                // Pacing first: the address check may cost a socket of its own.
                if paces(stream)
                    && (peer.is_loopback() || peer == local.to_canonical() || is_ours(peer))
                {
                    move_off_pacing(stream);
                }
            }
        }
    }
}

/// Whether `address` belongs to this host, whose traffic to itself goes over loopback whatever
/// addresses it uses: only then may a socket be bound to it. (With net.ipv4.ip_nonlocal_bind
/// set any address binds, and a remote client would be served like a local one: without BBR.)
fn is_ours(address: IpAddr) -> bool {
    let domain = match address {
        IpAddr::V4(_) => socket2::Domain::IPV4,
        IpAddr::V6(_) => socket2::Domain::IPV6,
    };
    let Ok(probe) = socket2::Socket::new(domain, socket2::Type::STREAM, None) else {
        return false;
    };
    // Binding takes no port then (IP_BIND_ADDRESS_NO_PORT): a host out of ephemeral ports
    // still answers. Best effort; without it the bind takes one for a moment.
    let enable: libc::c_int = 1;
    // SAFETY: the kernel reads a c_int from `enable`, a live local, for the length given; the fd
    // belongs to `probe`, alive for the call.
    let _ = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&probe),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&enable as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    probe
        .bind(&std::net::SocketAddr::new(address, 0).into())
        .is_ok()
}

/// Switches a socket running a pacing algorithm to the first loopback algorithm the kernel
/// allows; says so once.
fn move_off_pacing(socket: &impl AsRawFd) {
    let Ok(current) = get(socket) else {
        return;
    };
    if !paces_itself(&current) {
        return;
    }
    for algorithm in LOOPBACK_ALGORITHMS {
        if set(socket, algorithm).is_ok() {
            if !LOOPBACK_CHANGE_REPORTED.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    system = %current,
                    loopback = algorithm,
                    "clients on this host are served with TCP congestion control {algorithm}: {current} paces loopback traffic, which reorders it (--tcp-congestion system keeps {current})"
                );
            }
            return;
        }
    }
}

/// Whether the socket's algorithm paces its own sending (or cannot be read): such a connection
/// gets its replies through buffers, not `sendfile` (see `nbd::sendfile`).
pub fn paces(socket: &impl AsRawFd) -> bool {
    get(socket).map_or(true, |algorithm| paces_itself(&algorithm))
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

    #[tokio::test]
    async fn named_algorithm_is_set_on_a_listener_and_a_bad_one_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let reno = TcpCongestion::Named("reno".to_owned());
        reno.prepare_listener(&listener, false).unwrap();
        assert_eq!(get(&listener).unwrap(), "reno");
        let bad = TcpCongestion::Named("no_such_algo".to_owned());
        for inherited in [false, true] {
            let error = bad
                .prepare_listener(&listener, inherited)
                .unwrap_err()
                .to_string();
            assert!(error.contains("\"no_such_algo\""), "{error}");
            assert!(error.contains("modprobe tcp_no_such_algo"), "{error}");
        }
        assert_eq!(get(&listener).unwrap(), "reno");
    }

    /// Needs the kernel's bbr, which this project's machines run as their default.
    fn bbr_socket() -> std::net::TcpStream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        set(&client, "bbr").expect("this test needs the kernel's bbr (modprobe tcp_bbr)");
        client
    }

    #[tokio::test]
    async fn auto_readies_a_loopback_listener_and_leaves_an_inherited_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        set(&listener, "bbr").expect("this test needs the kernel's bbr (modprobe tcp_bbr)");
        TcpCongestion::Auto
            .prepare_listener(&listener, true)
            .unwrap();
        TcpCongestion::System
            .prepare_listener(&listener, false)
            .unwrap();
        assert_eq!(get(&listener).unwrap(), "bbr");
        TcpCongestion::Auto
            .prepare_listener(&listener, false)
            .unwrap();
        let now = get(&listener).unwrap();
        assert!(LOOPBACK_ALGORITHMS.contains(&now.as_str()), "{now}");
    }

    #[test]
    fn auto_moves_clients_on_this_host_off_bbr_only() {
        let client = bbr_socket();
        let here: IpAddr = "10.1.2.3".parse().unwrap();
        // A remote client keeps its algorithm, and so do connections under the other modes.
        TcpCongestion::Auto.apply_to_connection(&client, "192.0.2.1".parse().unwrap(), here);
        TcpCongestion::System.apply_to_connection(&client, "127.0.0.1".parse().unwrap(), here);
        assert_eq!(get(&client).unwrap(), "bbr");
        TcpCongestion::Auto.apply_to_connection(&client, "::ffff:127.0.0.1".parse().unwrap(), here);
        let now = get(&client).unwrap();
        assert!(LOOPBACK_ALGORITHMS.contains(&now.as_str()), "{now}");
        // A client connecting to this host's own address.
        let client = bbr_socket();
        TcpCongestion::Auto.apply_to_connection(&client, here, here);
        let now = get(&client).unwrap();
        assert!(LOOPBACK_ALGORITHMS.contains(&now.as_str()), "{now}");
        // A non-pacing algorithm stays as it is.
        set(&client, "reno").unwrap();
        TcpCongestion::Auto.apply_to_connection(&client, "127.0.0.1".parse().unwrap(), here);
        assert_eq!(get(&client).unwrap(), "reno");
    }

    #[test]
    fn addresses_of_this_host_are_ours() {
        assert!(is_ours("127.0.0.1".parse().unwrap()));
        assert!(is_ours("::1".parse().unwrap()));
        // TEST-NET-3 and a documentation IPv6 prefix: never configured here.
        assert!(!is_ours("203.0.113.77".parse().unwrap()));
        assert!(!is_ours("2001:db8::77".parse().unwrap()));
    }

    #[test]
    fn check_refuses_before_any_listener_exists() {
        assert!(TcpCongestion::Named("reno".to_owned()).check().is_ok());
        assert!(TcpCongestion::Auto.check().is_ok());
        let error = TcpCongestion::Named("no_such_algo".to_owned())
            .check()
            .unwrap_err()
            .to_string();
        assert!(error.contains("modprobe tcp_no_such_algo"), "{error}");
    }

    #[test]
    fn named_algorithm_is_set_on_a_connection_that_lacks_it() {
        let client = bbr_socket();
        TcpCongestion::Named("reno".to_owned()).apply_to_connection(
            &client,
            "192.0.2.1".parse().unwrap(),
            "10.1.2.3".parse().unwrap(),
        );
        assert_eq!(get(&client).unwrap(), "reno");
    }
}
