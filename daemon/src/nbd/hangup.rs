//! Sees that a client hung up or reset its connection before the connection's task has read its
//! way to the end: `poll` with POLLRDHUP reports the peer's FIN or RST even while requests it sent
//! earlier are still queued unread (the task itself only finds out when a read returns 0 or
//! fails, after everything queued in front).

use std::os::fd::{AsFd, AsRawFd, RawFd};

use crate::storage::attachments::PeerProbe;

/// The socket's descriptor number, not a duplicate: a duplicate would double the descriptors
/// each connection costs. The number is only meaningful while the socket is open, and that
/// covers every time its answer matters: the transmission loop marks the connection's seat
/// draining before it drops the socket, and the fence ignores the probe of a draining seat. A
/// stale number polls as POLLNVAL (not "gone") or, if reused, may say anything about a seat
/// that no longer listens.
#[derive(Debug)]
pub struct SocketProbe {
    fd: RawFd,
}

impl SocketProbe {
    pub fn boxed(socket: &impl AsFd) -> Box<dyn PeerProbe> {
        Box::new(SocketProbe {
            fd: socket.as_fd().as_raw_fd(),
        })
    }
}

impl PeerProbe for SocketProbe {
    fn peer_gone(&self) -> bool {
        let mut pollfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: `pollfd` is one valid, exclusively borrowed pollfd for the call, and the
        // timeout of 0 makes it return at once. poll only reads the descriptor number: a closed
        // one is reported as POLLNVAL, never undefined behaviour.
        let ready = unsafe { libc::poll(&mut pollfd, 1, 0) };
        ready == 1 && pollfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn sees_a_hang_up_behind_unread_data() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let probe = SocketProbe::boxed(&server);
        assert!(!probe.peer_gone());
        client.write_all(b"queued request").unwrap();
        assert!(!probe.peer_gone(), "unread data is no hang-up");
        drop(client);
        assert!(probe.peer_gone());
    }

    #[test]
    fn sees_a_half_close() {
        let (server, client) = UnixStream::pair().unwrap();
        let probe = SocketProbe::boxed(&server);
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(probe.peer_gone());
    }
}
