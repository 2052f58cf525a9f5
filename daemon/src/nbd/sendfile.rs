//! Sending file bytes from the page cache straight into a client's socket (`sendfile`).
//!
//! A large READ whose bytes are all cached costs two copies when it goes through a buffer (page
//! cache → buffer, buffer → socket); with `sendfile` the kernel hands the cached pages to the
//! socket and the only copy left is the client's own.
//!
//! Unix sockets use it, and TCP connections whose congestion control does not pace itself and
//! never did: a connection switched off BBR after accept is still paced by the kernel, so it
//! keeps the buffers (`connection::Client::may_send_files`).
//! TLS has to see the bytes to encrypt them. Over loopback TCP with BBR, which paces from a
//! timer and so reorders loopback segments (see `tcp_congestion`), it made the client slower
//! than the copies it saves the server: 1 MiB reads at depth 8 went from 2060-2211 to
//! 1632-1860 MiB/s in an early A/B, and from 2646-2677 to 2120-3113 MiB/s in a later one. With
//! cubic on our side (what `--tcp-congestion auto` gives loopback clients), the same reads went
//! from 3835-3939 to 4643-4674 MiB/s at a fifth of the server's CPU seconds (4.93 to 1.03),
//! and with four connections from 4977 to 9012 MiB/s (A/B, same binary). Over a Unix socket
//! the first A/B was even in throughput at less than half the server CPU, and later benchmark
//! runs put four connections at 2.04-2.55x nbdkit's 1 MiB read throughput.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::task::{ready, Context, Poll};

use tokio::io::{Interest, WriteHalf};
use tokio::net::{tcp, unix, TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;

use crate::nbd::tcp_congestion;

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

/// `poll_send_file` on a tokio socket: waits for room, then one `sendfile`.
macro_rules! poll_send_file_on {
    ($stream:expr, $cx:expr, $file:expr, $offset_bytes:expr, $length_bytes:expr) => {{
        let stream = $stream;
        loop {
            ready!(stream.poll_write_ready($cx))?;
            // A WouldBlock clears the readiness, so the next poll waits for room.
            match stream.try_io(Interest::WRITABLE, || {
                send_file(stream.as_raw_fd(), $file, $offset_bytes, $length_bytes)
            }) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                other => return Poll::Ready(other),
            }
        }
    }};
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
        poll_send_file_on!(stream, cx, file, offset_bytes, length_bytes)
    }
}

/// Asked once per connection, after `tcp_congestion` has set the algorithm.
impl SendFile for tcp::OwnedWriteHalf {
    fn sends_files(&self) -> bool {
        let stream: &TcpStream = self.as_ref();
        !tcp_congestion::paces(stream)
    }

    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        file: &File,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Poll<io::Result<usize>> {
        let stream: &TcpStream = self.as_ref();
        poll_send_file_on!(stream, cx, file, offset_bytes, length_bytes)
    }
}

impl<S> SendFile for WriteHalf<TlsStream<S>> {}
