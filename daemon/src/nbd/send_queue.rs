//! How much a client has not taken yet of what was written to its socket (`SIOCOUTQ`). The
//! kernel wakes a blocked writer only once a good part of its send buffer is free again (three
//! quarters of a Unix socket's), so a client reading slowly can leave the daemon without a
//! single write for a long time: the queue shrinking is what tells it from a client that reads
//! nothing. Under TLS the socket's queue is looked at too: what rustls holds only adds to it.
//! Once the daemon gives up on a client's replies, the queue is discarded at close.

use std::io;
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

/// Makes closing `socket` drop what its send queue still holds and reset the connection
/// (`SO_LINGER` with a zero timeout) instead of the kernel going on trying to deliver it to a
/// client that takes nothing. `socket` must be open for the call.
pub fn discard_on_close(socket: RawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the caller keeps `socket` open for the call; the kernel reads `linger`, a live
    // local, for exactly the length given.
    let rc = unsafe {
        libc::setsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_discarded_queue_resets_the_client_at_close() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        // More than the two sockets' buffers hold: the rest stays queued on our side.
        let chunk = vec![7u8; 1 << 20];
        while server.write(&chunk).is_ok() {}
        assert!(queued_bytes(server.as_raw_fd()).unwrap() > 0);
        discard_on_close(server.as_raw_fd()).unwrap();
        drop(server);
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let error = loop {
            match client.read(&mut buf) {
                Ok(0) => panic!("an orderly end of stream, not a reset"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    }

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
