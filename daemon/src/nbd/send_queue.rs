//! How much a client has not taken yet of what was written to its socket (`SIOCOUTQ`). The
//! kernel wakes a blocked writer only once a good part of its send buffer is free again (three
//! quarters of a Unix socket's), so a client reading slowly can leave the daemon without a
//! single write for a long time: the queue shrinking is what tells it from a client that reads
//! nothing. Under TLS the socket's queue is looked at too: what rustls holds only adds to it.

use std::os::fd::RawFd;

/// On TCP the bytes not acknowledged (the client's receive window holds those back until it
/// reads), on a Unix socket the memory of the messages not read (more than their bytes, and it
/// shrinks a whole message at a time). None when the socket cannot tell. `socket` must be open
/// for the call.
pub fn queued_bytes(socket: RawFd) -> Option<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: the caller keeps `socket` open for the call (its stream is alive), and the kernel
    // writes one c_int into `queued`, a live local.
    let rc = unsafe { libc::ioctl(socket, libc::TIOCOUTQ, &mut queued) };
    (rc == 0).then_some(u64::try_from(queued).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_queue_holds_unread_bytes_and_empties_when_they_are_read() {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        assert_eq!(queued_bytes(ours.as_raw_fd()), Some(0));
        ours.write_all(&[7u8; 1000]).unwrap();
        let queued = queued_bytes(ours.as_raw_fd()).unwrap();
        assert!(queued >= 1000, "{queued} queued after 1000 bytes unread");
        let mut buf = [0u8; 1000];
        theirs.read_exact(&mut buf).unwrap();
        assert_eq!(queued_bytes(ours.as_raw_fd()), Some(0));
    }
}
