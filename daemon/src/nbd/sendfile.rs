//! Sending file bytes from the page cache straight into a client's socket (`sendfile`, and
//! `writev` from a file's mapping: `storage::volume::mapped_read`).
//!
//! A large READ whose bytes are all cached costs two copies when it goes through a buffer (page
//! cache → buffer, buffer → socket); with `sendfile` the kernel hands the cached pages to the
//! socket and the only copy left is the client's own.
//!
//! Unix sockets use it, and TCP connections whose congestion control does not pace itself and
//! never did: a connection switched off BBR after accept is still paced by the kernel, so its
//! large READs are written from the head's mapping instead (`connection::Client::may_send_files`,
//! `SendFile::maps_small_reads`).
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

/// The writing half of a connection, as far as sending file ranges and mapped ranges goes. By
/// default a stream does neither: its replies always go through buffers.
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

    /// Whether `poll_write_iovecs` works on this stream: a plain socket, whose `writev` has the
    /// kernel copy the bytes (TLS would read them in our own code). Which READs use it is
    /// `maps_small_reads`' and `sends_files`' say.
    fn writes_iovecs(&self) -> bool {
        false
    }

    /// Whether READs smaller than `sendfile`'s share are written from the mapping too (large
    /// ones are, on a stream that writes iovecs but takes no file ranges). Not on TCP: 4 KiB
    /// random reads over one loopback connection written from the mapping were 0.92x those
    /// copied through a buffer (median of three and four runs), against 1.3x over a Unix
    /// socket. In the profile the cold copy moved from `preadv2` into `tcp_sendmsg`, under the
    /// socket's lock: the backlog of the client's segments processed at its release doubled,
    /// and each `writev` carried fewer replies (1.49 segments per read against 1.25).
    fn maps_small_reads(&self) -> bool {
        self.writes_iovecs()
    }

    /// One `writev` of `iovecs`, which may address ranges of a layer's mapping
    /// (`storage::volume::MappedBytes`): only the kernel reads them, so a page it cannot make
    /// present fails the call with EFAULT (nothing sent) or ends it short. Ready with the
    /// number of bytes that went out.
    fn poll_write_iovecs(
        &mut self,
        _cx: &mut Context<'_>,
        _iovecs: &[libc::iovec],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this stream does not write from mappings",
        )))
    }
}

/// One `writev` on a non-blocking socket.
fn write_iovecs(socket: RawFd, iovecs: &[libc::iovec]) -> io::Result<usize> {
    let count = iovecs.len().min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: the socket belongs to the stream borrowed by the caller and stays open for the
    // whole synchronous call; each iovec addresses memory its owner keeps live until the caller
    // is done with the slice (buffers, or mapping ranges that only the kernel reads); `count`
    // is at most the slice's length.
    let written = unsafe { libc::writev(socket, iovecs.as_ptr(), count) };
    if written < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(written as usize)
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

/// `send` (a `sendfile` or a `writev` of the socket's fd) on a tokio socket, once there is
/// room.
macro_rules! poll_send_on {
    ($stream:expr, $cx:expr, $send:expr) => {{
        let stream = $stream;
        loop {
            ready!(stream.poll_write_ready($cx))?;
            // A WouldBlock clears the readiness, so the next poll waits for room.
            match stream.try_io(Interest::WRITABLE, || $send(stream.as_raw_fd())) {
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
        poll_send_on!(stream, cx, |fd| send_file(
            fd,
            file,
            offset_bytes,
            length_bytes
        ))
    }

    fn writes_iovecs(&self) -> bool {
        true
    }

    fn poll_write_iovecs(
        &mut self,
        cx: &mut Context<'_>,
        iovecs: &[libc::iovec],
    ) -> Poll<io::Result<usize>> {
        let stream: &UnixStream = self.as_ref();
        poll_send_on!(stream, cx, |fd| write_iovecs(fd, iovecs))
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
        poll_send_on!(stream, cx, |fd| send_file(
            fd,
            file,
            offset_bytes,
            length_bytes
        ))
    }

    /// For large cached READs on connections that do not take `sendfile` (paced from the
    /// start: see `connection::Client::may_send_files`): the kernel copies the page cache
    /// straight into the socket, where a buffer costs a second copy. 1 MiB reads at depth 8
    /// over loopback with BBR (A/B, same binary, three rounds each): one connection 3528-3654
    /// MiB/s against 2161-2673 through buffers, four 3236-3699 against 2550-2698, at 3.6-4.6
    /// server CPU seconds of 5 against 4.2-5.0.
    fn writes_iovecs(&self) -> bool {
        true
    }

    /// Not for small READs: see the trait's `maps_small_reads`.
    fn maps_small_reads(&self) -> bool {
        false
    }

    fn poll_write_iovecs(
        &mut self,
        cx: &mut Context<'_>,
        iovecs: &[libc::iovec],
    ) -> Poll<io::Result<usize>> {
        let stream: &TcpStream = self.as_ref();
        poll_send_on!(stream, cx, |fd| write_iovecs(fd, iovecs))
    }
}

impl<S> SendFile for WriteHalf<TlsStream<S>> {}
