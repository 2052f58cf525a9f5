//! Large WRITE payloads received from the socket straight into the volume's page cache (see
//! `storage::volume::in_place` for which writes qualify and what they hold).
//!
//! Each byte is then copied once, by the kernel's `recv`, where reading into a buffer and
//! writing that out costs two; the connection's thread does that one copy. Measured with the
//! benchmark's fio runs (1 MiB random writes at depth 8 on a cached 1 GiB volume, A/B, three
//! rounds, same hour): one connection over a Unix socket went from 2746-3293 to 3666-4679 IOPS,
//! four from 2864-3443 to 4969-5681; over TCP one from 3495-3924 to 3453-4469, four from
//! 2445-2579 to 3455-3787, with less server CPU in every run.
//!
//! TLS has to decrypt the bytes in user space, and a copy by our own code into the mapping could
//! take SIGBUS; TLS connections always read into buffers.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::task::{Context, Poll};
use std::time::Instant;

use evsd_proto::Request;
use tokio::io::{Interest, ReadHalf};
use tokio::net::{tcp, unix, TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;

use crate::io::MAX_CACHED_WRITE_PIECE_BYTES;
use crate::metrics::RequestGuard;
use crate::storage::volume::InPlaceHead;
use crate::storage::Volume;

/// The reading half of a connection, as far as receiving into the page cache goes. By default a
/// stream does not: its bytes always go through buffers.
pub trait ReceiveInPlace {
    /// Whether `poll_receive_ready` and `try_receive_into` work on this stream.
    fn receives_in_place(&self) -> bool {
        false
    }

    /// Ready once the socket has bytes to receive (or an error or end of stream to report).
    fn poll_receive_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }

    /// One `recv` of up to `length` bytes into `at`; `WouldBlock` when nothing was there (the
    /// next `poll_receive_ready` then waits).
    ///
    /// # Safety
    /// `at..at + length` must be valid for writes for the whole call, and nothing in this
    /// process may hold a reference to that memory meanwhile.
    unsafe fn try_receive_into(&self, _at: NonNull<u8>, _length: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// One `recv` on `socket`; the caller vouches for `at..at + length` (see `try_receive_into`).
///
/// # Safety
/// As for [`ReceiveInPlace::try_receive_into`].
unsafe fn receive_into(socket: &impl AsRawFd, at: NonNull<u8>, length: usize) -> io::Result<usize> {
    // SAFETY: the caller guarantees the range is writable and unaliased for this call; the
    // socket is borrowed, so its descriptor stays open.
    let received = unsafe { libc::recv(socket.as_raw_fd(), at.as_ptr().cast(), length, 0) };
    if received < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(received as usize)
    }
}

/// `ReceiveInPlace` on a tokio socket half: readiness from the runtime, and a `WouldBlock`
/// inside `try_io` clears it so the next poll waits for the socket.
macro_rules! receive_in_place_on {
    ($half:ty, $stream:ty) => {
        impl ReceiveInPlace for $half {
            fn receives_in_place(&self) -> bool {
                true
            }

            fn poll_receive_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                let stream: &$stream = self.as_ref();
                stream.poll_read_ready(cx)
            }

            unsafe fn try_receive_into(&self, at: NonNull<u8>, length: usize) -> io::Result<usize> {
                let stream: &$stream = self.as_ref();
                // SAFETY: passed on from our caller, who guarantees the range.
                stream.try_io(Interest::READABLE, || unsafe {
                    receive_into(stream, at, length)
                })
            }
        }
    };
}

receive_in_place_on!(tcp::OwnedReadHalf, TcpStream);
receive_in_place_on!(unix::OwnedReadHalf, UnixStream);

impl<S> ReceiveInPlace for ReadHalf<TlsStream<S>> {}

/// What became of a payload being received in place, once something did.
pub enum Landing {
    /// Some bytes landed; more are to come.
    Progress,
    /// Every byte is in.
    Complete,
    /// The client closed the connection before the payload was all there.
    Eof,
    /// The rest goes the ordinary way: this request (same cookie and flags) covers it, and
    /// its payload is what the socket holds next.
    Rest(Request),
    /// The socket failed.
    Failed(io::Error),
}

/// A WRITE whose payload is being received in place.
pub struct InPlaceWrite<'m> {
    pub request: Request,
    head: InPlaceHead,
    landed_bytes: u64,
    pub counted: RequestGuard<'m>,
    pub started: Instant,
}

impl<'m> InPlaceWrite<'m> {
    /// Starts receiving `request`'s payload into `head`, `read` being the part of it already
    /// read with the header (written here, with `pwrite`). `None` when that failed or the head
    /// changed: nothing is counted then, and the caller reads the payload the ordinary way.
    pub fn start(
        volume: &Volume,
        request: Request,
        head: InPlaceHead,
        read: &[u8],
        counted: impl FnOnce() -> RequestGuard<'m>,
    ) -> Option<InPlaceWrite<'m>> {
        if !read.is_empty() {
            match volume.land_read_in_place(
                &head,
                request.offset,
                read,
                MAX_CACHED_WRITE_PIECE_BYTES,
            )? {
                Ok(()) => {}
                Err(error) => {
                    tracing::debug!(%error, offset = request.offset, "writing the start of a payload in place failed; reading it into a buffer");
                    return None;
                }
            }
        }
        Some(InPlaceWrite {
            request,
            head,
            landed_bytes: read.len() as u64,
            counted: counted(),
            started: Instant::now(),
        })
    }

    pub fn landed_bytes(&self) -> u64 {
        self.landed_bytes
    }

    /// Receives what the socket holds of the payload, one `recv`.
    pub fn poll_land<R: ReceiveInPlace>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        volume: &Volume,
    ) -> Poll<Landing> {
        loop {
            let missing_bytes = self.request.length - self.landed_bytes;
            if missing_bytes == 0 {
                return Poll::Ready(Landing::Complete);
            }
            if let Err(e) = std::task::ready!(reader.poll_receive_ready(cx)) {
                return Poll::Ready(Landing::Failed(e));
            }
            let offset_bytes = self.request.offset + self.landed_bytes;
            // In pieces, as inline writes are copied: each piece's time is what the guard
            // against slow copies judges (a whole 1 MiB landing took over its 1 ms on a busy
            // machine and paused landing most of the time under four TCP clients).
            let piece_bytes = (missing_bytes as usize).min(MAX_CACHED_WRITE_PIECE_BYTES);
            let landed = volume.land_in_place(
                &self.head,
                offset_bytes,
                piece_bytes,
                // SAFETY: `land_in_place` hands out a range of the head's live shared mapping
                // (the head's layer, and so its mapping, is kept by `self.head`), and no
                // reference to mapped memory is ever made: only the kernel writes it.
                |at, length| unsafe { reader.try_receive_into(at, length) },
            );
            match landed {
                None => return Poll::Ready(Landing::Rest(self.rest())),
                Some(Ok(0)) => return Poll::Ready(Landing::Eof),
                Some(Ok(n)) => {
                    self.landed_bytes += n as u64;
                    return Poll::Ready(if self.landed_bytes == self.request.length {
                        Landing::Complete
                    } else {
                        Landing::Progress
                    });
                }
                // Readiness is cleared: the next poll registers for the socket.
                Some(Err(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Some(Err(e)) if e.raw_os_error() == Some(libc::EFAULT) => {
                    // A page the kernel could not make writable (I/O error, full disk): the
                    // bytes stay in the socket, and the ordinary write reports the error.
                    tracing::debug!(
                        offset = offset_bytes,
                        "receiving in place faulted; writing the rest the ordinary way"
                    );
                    return Poll::Ready(Landing::Rest(self.rest()));
                }
                Some(Err(e)) => return Poll::Ready(Landing::Failed(e)),
            }
        }
    }

    /// The request for the part of the payload not landed yet.
    pub fn rest(&self) -> Request {
        Request {
            offset: self.request.offset + self.landed_bytes,
            length: self.request.length - self.landed_bytes,
            ..self.request
        }
    }
}
