//! How many bytes a socket still holds for its peer (`SIOCOUTQ`). The kernel wakes a blocked
//! writer only once a good part of its send buffer is free again (three quarters of a Unix
//! socket's), so a client reading slowly can leave the daemon without a single write for a
//! long time: the queue shrinking is what tells it from a client that reads nothing.

use std::os::fd::{AsRawFd, RawFd};

use tokio::io::WriteHalf;
use tokio::net::{tcp, unix, TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;

pub trait SendQueue {
    /// What the peer has not taken yet of what was written to the socket: on TCP the bytes
    /// not acknowledged (the peer's receive window holds those back until it reads), on a Unix
    /// socket the memory of the messages not read (more than their bytes). It shrinks only
    /// when the peer takes some. None when the stream cannot tell.
    fn queued_bytes(&self) -> Option<u64> {
        None
    }
}

fn socket_queued_bytes(socket: RawFd) -> Option<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: `socket` is open for the whole call (the caller borrows its stream), and the
    // kernel writes one c_int into `queued`, a live local.
    let rc = unsafe { libc::ioctl(socket, libc::TIOCOUTQ, &mut queued) };
    (rc == 0).then_some(u64::try_from(queued).ok()).flatten()
}

impl SendQueue for unix::OwnedWriteHalf {
    fn queued_bytes(&self) -> Option<u64> {
        let stream: &UnixStream = self.as_ref();
        socket_queued_bytes(stream.as_raw_fd())
    }
}

impl SendQueue for tcp::OwnedWriteHalf {
    fn queued_bytes(&self) -> Option<u64> {
        let stream: &TcpStream = self.as_ref();
        socket_queued_bytes(stream.as_raw_fd())
    }
}

/// TLS keeps records of its own besides the socket's queue; its writes alone are the measure.
impl<S> SendQueue for WriteHalf<TlsStream<S>> {}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_queue_holds_unread_bytes_and_empties_when_they_are_read() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (_reader, mut writer) = ours.into_split();
        assert_eq!(writer.queued_bytes(), Some(0));
        writer.write_all(&[7u8; 1000]).await.unwrap();
        let queued = writer.queued_bytes().unwrap();
        assert!(queued >= 1000, "{queued} queued after 1000 bytes unread");
        let mut buf = [0u8; 1000];
        tokio::io::AsyncReadExt::read_exact(&mut theirs, &mut buf)
            .await
            .unwrap();
        assert_eq!(writer.queued_bytes(), Some(0));
    }
}
