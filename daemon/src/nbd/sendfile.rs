//! Sending file bytes from the page cache straight into a client's socket (`sendfile`).
//!
//! A large READ whose bytes are all cached costs two copies when it goes through a buffer (page
//! cache → buffer, buffer → socket); with `sendfile` the kernel hands the cached pages to the
//! socket and the only copy left is the client's own.
//!
//! Only Unix sockets use it. TLS has to see the bytes to encrypt them. Over TCP on loopback it
//! made the client slower than the copies it saves the server: 1 MiB reads at depth 8 went
//! from 2060-2211 to 1632-1860 MiB/s (A/B, same binary, three runs each), with the server's CPU
//! seconds down only 10%. The client's copy then reads the pages from memory, where after our
//! copies it finds them in the shared cache. Over a Unix socket the same A/B was even in
//! throughput at less than half the server CPU, and later benchmark runs put four connections
//! at 2.04-2.55x nbdkit's 1 MiB read throughput (1.36x in the last run before this path).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::task::{ready, Context, Poll};

use tokio::io::{Interest, WriteHalf};
use tokio::net::{tcp, unix, UnixStream};
use tokio_rustls::server::TlsStream;

/// Most bytes one `sendfile` call may move (the kernel's own cap).
const MAX_SENDFILE_BYTES: u64 = 0x7fff_f000;

/// The writing half of a connection, as far as sending file ranges goes. By default a stream
/// does not send them: its replies always go through buffers.
pub trait SendFile {
    /// Whether `poll_send_file` works on this stream.
    fn sends_files(&self) -> bool {
        false
    }

    /// Sends up to `length_bytes` of `file` from `offset_bytes`; ready with the number of bytes
    /// that went out, which is 0 only at the end of the file.
    fn poll_send_file(
        &mut self,
        _cx: &mut Context<'_>,
        _file: &File,
        _offset_bytes: u64,
        _length_bytes: u64,
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this stream does not send file ranges",
        )))
    }
}

/// One `sendfile` on a non-blocking socket.
fn send_file(
    socket: RawFd,
    file: &File,
    offset_bytes: u64,
    length_bytes: u64,
) -> io::Result<usize> {
    let mut offset = libc::off_t::try_from(offset_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset out of range"))?;
    let count = length_bytes.min(MAX_SENDFILE_BYTES) as usize;
    // SAFETY: both fds stay open for the whole synchronous call (`file` is borrowed, the socket
    // belongs to the stream borrowed by the caller), and `offset` is a live local the kernel
    // updates; no user memory is read or written otherwise.
    let sent = unsafe { libc::sendfile(socket, file.as_raw_fd(), &mut offset, count) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

impl SendFile for unix::OwnedWriteHalf {
    fn sends_files(&self) -> bool {
        true
    }

    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        file: &File,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Poll<io::Result<usize>> {
        let stream: &UnixStream = self.as_ref();
        loop {
            ready!(stream.poll_write_ready(cx))?;
            // A WouldBlock clears the readiness, so the next poll waits for room.
            match stream.try_io(Interest::WRITABLE, || {
                send_file(stream.as_raw_fd(), file, offset_bytes, length_bytes)
            }) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                other => return Poll::Ready(other),
            }
        }
    }
}

/// See the module comment for why TCP does not.
impl SendFile for tcp::OwnedWriteHalf {}
impl<S> SendFile for WriteHalf<TlsStream<S>> {}
