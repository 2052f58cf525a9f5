//! A set of sockets watched for their peer hanging up (FIN) or resetting (RST), answered without
//! blocking: an epoll instance interested only in EPOLLRDHUP (EPOLLHUP and EPOLLERR come with it),
//! so requests arriving never make it ready, and one-shot, so each socket is reported once.
//!
//! Asking costs one `epoll_wait` with a zero timeout, which is what lets a connection check, just
//! before it starts a write, whether another connection of the volume has lost its client while
//! that connection's task is still reading the requests queued before the hang-up.
//!
//! Sockets are never removed explicitly: the kernel drops a descriptor's entry when its last
//! reference is closed, and removing by number after that could hit a new socket that reused
//! the number. A report for a key nobody holds any more is ignored by the caller.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Hang-ups collected by one [`HangupSet::take_hung_up`] call at most; more wait for the next.
const EVENTS_PER_CALL: usize = 32;

#[derive(Debug)]
pub struct HangupSet {
    epoll: OwnedFd,
}

impl HangupSet {
    pub fn new() -> io::Result<HangupSet> {
        // SAFETY: epoll_create1 takes no pointers; the flag is a valid constant.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1, is open, and nothing else owns it.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(HangupSet { epoll })
    }

    /// Watches the open socket `fd`; `key` comes back from `take_hung_up` once its peer hangs up
    /// (at once if it already has).
    pub fn watch(&self, fd: RawFd, key: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: key,
        };
        // SAFETY: `event` is a valid epoll_event borrowed for the call; the kernel only reads
        // it. A closed or non-socket `fd` is refused with an error, never undefined behaviour.
        let rc =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EEXIST) {
            return Err(error);
        }
        // Watched already: an attachment of this socket ended (a late refusal) and the client
        // negotiated on. Re-arm it under the new key.
        // SAFETY: as above.
        let rc =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Appends the keys of watched sockets whose peers hung up since the last call, each once.
    pub fn take_hung_up(&self, keys: &mut Vec<u64>) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_CALL];
        // SAFETY: `events` is a writable array of EVENTS_PER_CALL epoll_events that outlives
        // the call, and the count passed says so; the timeout of 0 makes it return at once.
        let ready = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                EVENTS_PER_CALL as i32,
                0,
            )
        };
        if ready < 0 {
            let error = io::Error::last_os_error();
            // A signal landing mid-call: nothing was reported, the next call sees it.
            if error.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(error);
        }
        keys.extend(events[..ready as usize].iter().map(|event| event.u64));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;

    use super::*;

    fn hung_up(set: &HangupSet) -> Vec<u64> {
        let mut keys = Vec::new();
        set.take_hung_up(&mut keys).unwrap();
        keys
    }

    #[test]
    fn reports_a_hang_up_behind_unread_data_once() {
        let set = HangupSet::new().unwrap();
        let (server, mut client) = UnixStream::pair().unwrap();
        set.watch(server.as_raw_fd(), 7).unwrap();
        client.write_all(b"queued request").unwrap();
        assert!(hung_up(&set).is_empty(), "data arriving is no hang-up");
        drop(client);
        assert_eq!(hung_up(&set), [7]);
        assert!(hung_up(&set).is_empty(), "reported once");
    }

    #[test]
    fn a_socket_watched_again_reports_under_its_new_key() {
        let set = HangupSet::new().unwrap();
        let (server, client) = UnixStream::pair().unwrap();
        set.watch(server.as_raw_fd(), 1).unwrap();
        set.watch(server.as_raw_fd(), 2).unwrap();
        drop(client);
        assert_eq!(hung_up(&set), [2]);
    }

    #[test]
    fn reports_a_half_close_and_a_reset_among_live_sockets() {
        let set = HangupSet::new().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for key in 0..3 {
            clients.push(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
            let (server, _) = listener.accept().unwrap();
            set.watch(server.as_raw_fd(), key).unwrap();
            servers.push(server);
        }
        clients[1].shutdown(Shutdown::Write).unwrap();
        let reset = clients.remove(2);
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: the socket is open and `linger` is a valid struct linger of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                reset.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        drop(reset);
        // Loopback delivers the FIN and the RST before the calls above return.
        let mut keys = hung_up(&set);
        keys.sort_unstable();
        assert_eq!(keys, [1, 2]);
    }

    #[test]
    fn a_closed_socket_leaves_the_set() {
        let set = HangupSet::new().unwrap();
        let (server, client) = UnixStream::pair().unwrap();
        set.watch(server.as_raw_fd(), 1).unwrap();
        drop(server);
        drop(client);
        assert!(hung_up(&set).is_empty());
        // Its number may be reused by the next socket, watched under a new key.
        let (server, client) = UnixStream::pair().unwrap();
        set.watch(server.as_raw_fd(), 2).unwrap();
        drop(client);
        assert_eq!(hung_up(&set), [2]);
    }

    #[test]
    fn refuses_a_descriptor_that_is_not_open() {
        let set = HangupSet::new().unwrap();
        // Not a descriptor just closed: tests running alongside could reuse its number at once.
        // No process may open this many files (the kernel's ceiling is 2^30).
        let never_open = RawFd::MAX;
        assert!(set.watch(never_open, 1).is_err());
    }
}
