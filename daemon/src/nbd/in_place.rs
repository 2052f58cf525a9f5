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
use crate::storage::layer::BLOCK_BYTES;
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

    /// Bytes the socket holds, ready to receive.
    fn queued_bytes(&self) -> io::Result<usize> {
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

/// Bytes `socket` holds for reading (`FIONREAD`, `SIOCINQ` for TCP and Unix stream sockets).
fn queued_bytes(socket: &impl AsRawFd) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points at a live local; the
    // socket is borrowed, so its descriptor stays open.
    let result = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut queued) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(queued.max(0) as usize)
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

            fn queued_bytes(&self) -> io::Result<usize> {
                let stream: &$stream = self.as_ref();
                queued_bytes(stream)
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
    /// its payload is the write's unlanded bytes (`take_unlanded`) followed by what the socket
    /// holds next.
    Rest(Request),
    /// The socket failed.
    Failed(io::Error),
}

/// A WRITE whose payload is being received in place.
///
/// Bytes land in whole blocks only, so a write that stops landing (a snapshot, a fence, evicted
/// pages, paused copies) hands the ordinary path a rest that starts on a block boundary: a
/// rest starting mid-block would be merged onto whatever the block became meanwhile (a TRIM or
/// WRITE_ZEROES racing this write zeroes it), leaving a block that is part zeroes and part
/// payload, which neither order of the two requests gives. The start of a block that has not
/// all arrived waits in `unlanded`, and is written with `pwrite` once it is whole.
pub struct InPlaceWrite<'m> {
    pub request: Request,
    head: InPlaceHead,
    /// Bytes in the head, from the payload's start.
    landed_bytes: u64,
    /// Received bytes of the block after them, fewer than a block.
    unlanded: Vec<u8>,
    pub counted: RequestGuard<'m>,
    pub started: Instant,
}

impl<'m> InPlaceWrite<'m> {
    /// Starts receiving `request`'s payload into `head`, `read` being the part of it already
    /// read with the header (its whole blocks written here, with `pwrite`). `None` when that
    /// failed or the head changed: nothing is counted then, and the caller reads the payload
    /// the ordinary way.
    pub fn start(
        volume: &Volume,
        request: Request,
        head: InPlaceHead,
        read: &[u8],
        counted: impl FnOnce() -> RequestGuard<'m>,
    ) -> Option<InPlaceWrite<'m>> {
        let whole_bytes = read.len() - read.len() % BLOCK_BYTES as usize;
        if whole_bytes > 0 {
            match volume.land_read_in_place(
                &head,
                request.offset,
                &read[..whole_bytes],
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
            landed_bytes: whole_bytes as u64,
            unlanded: read[whole_bytes..].to_vec(),
            counted: counted(),
            started: Instant::now(),
        })
    }

    /// Payload bytes in the head so far.
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
            let received = if self.unlanded.is_empty() {
                self.land_whole_blocks(reader, volume, missing_bytes)
            } else {
                Some(self.receive_unlanded(reader))
            };
            let received = match received {
                None => return Poll::Ready(Landing::Rest(self.rest())),
                Some(received) => received,
            };
            match received {
                Ok(0) => return Poll::Ready(Landing::Eof),
                Ok(_) => {}
                // Readiness is cleared: the next poll registers for the socket.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                    // A page the kernel could not make writable (I/O error, full disk): the
                    // bytes stay in the socket, and the ordinary write reports the error.
                    tracing::debug!(
                        offset = self.request.offset + self.landed_bytes,
                        "receiving in place faulted; writing the rest the ordinary way"
                    );
                    return Poll::Ready(Landing::Rest(self.rest()));
                }
                Err(e) => return Poll::Ready(Landing::Failed(e)),
            }
            if self.unlanded.len() == BLOCK_BYTES as usize {
                let offset_bytes = self.request.offset + self.landed_bytes;
                match volume.land_read_in_place(
                    &self.head,
                    offset_bytes,
                    &self.unlanded,
                    MAX_CACHED_WRITE_PIECE_BYTES,
                ) {
                    Some(Ok(())) => {
                        self.landed_bytes += BLOCK_BYTES;
                        self.unlanded.clear();
                    }
                    Some(Err(error)) => {
                        tracing::debug!(%error, offset = offset_bytes, "writing a block of a payload in place failed; writing the rest the ordinary way");
                        return Poll::Ready(Landing::Rest(self.rest()));
                    }
                    None => return Poll::Ready(Landing::Rest(self.rest())),
                }
            }
            return Poll::Ready(if self.landed_bytes == self.request.length {
                Landing::Complete
            } else {
                Landing::Progress
            });
        }
    }

    /// Lands whole blocks of what the socket holds straight into the head's mapping, or, when
    /// it holds less than a block, receives that into `unlanded`. `None` when the head refused.
    fn land_whole_blocks<R: ReceiveInPlace>(
        &mut self,
        reader: &mut R,
        volume: &Volume,
        missing_bytes: u64,
    ) -> Option<io::Result<usize>> {
        let to_block_end = (BLOCK_BYTES - self.landed_bytes % BLOCK_BYTES) % BLOCK_BYTES;
        let piece_bytes = if to_block_end > 0 {
            // A recv stopped short inside a block (see below): the rest of that block lands in
            // the mapping too, and the next landing starts on a boundary again.
            to_block_end.min(missing_bytes)
        } else {
            let queued_bytes = match reader.queued_bytes() {
                Ok(queued_bytes) => queued_bytes as u64,
                Err(e) => return Some(Err(e)),
            };
            let whole_bytes = queued_bytes - queued_bytes % BLOCK_BYTES;
            if whole_bytes == 0 {
                return Some(self.receive_unlanded(reader));
            }
            // In pieces, as inline writes are copied: each piece's time is what the guard
            // against slow copies judges (a whole 1 MiB landing took over its 1 ms on a busy
            // machine and paused landing most of the time under four TCP clients).
            missing_bytes
                .min(whole_bytes)
                .min(MAX_CACHED_WRITE_PIECE_BYTES as u64)
        } as usize;
        let offset_bytes = self.request.offset + self.landed_bytes;
        let landed = volume.land_in_place(
            &self.head,
            offset_bytes,
            piece_bytes,
            // SAFETY: `land_in_place` hands out a range of the head's live shared mapping
            // (the head's layer, and so its mapping, is kept by `self.head`), and no
            // reference to mapped memory is ever made: only the kernel writes it.
            |at, length| unsafe { reader.try_receive_into(at, length) },
        )?;
        if let Ok(n) = landed {
            // The socket held them all, so the recv stops short only in odd cases (a signal):
            // the rest of that block then lands in the mapping too.
            self.landed_bytes += n as u64;
        }
        Some(landed)
    }

    /// One `recv` into `unlanded`, up to the end of its block.
    fn receive_unlanded<R: ReceiveInPlace>(&mut self, reader: &mut R) -> io::Result<usize> {
        let block_bytes = BLOCK_BYTES as usize;
        let held = self.unlanded.len();
        self.unlanded.resize(block_bytes, 0);
        let wanted = block_bytes - held;
        let at = NonNull::from(&mut self.unlanded[held..]).cast::<u8>();
        // SAFETY: `at..at + wanted` is the tail of our own buffer, borrowed mutably here and
        // not otherwise referenced while the kernel writes it.
        let received = unsafe { reader.try_receive_into(at, wanted) };
        let kept = held + *received.as_ref().unwrap_or(&0);
        self.unlanded.truncate(kept);
        received
    }

    /// The request for the part of the payload not landed yet (its first bytes being
    /// `take_unlanded`'s).
    pub fn rest(&self) -> Request {
        Request {
            offset: self.request.offset + self.landed_bytes,
            length: self.request.length - self.landed_bytes,
            ..self.request
        }
    }

    /// The received bytes that did not land, for the ordinary path to write with the rest.
    pub fn take_unlanded(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.unlanded)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;

    use bytes::Bytes;
    use evsd_proto::Command;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::io::{EngineConfig, EngineKind, IoEngine};
    use crate::metrics::Metrics;
    use crate::storage::Registry;

    const PAYLOAD_BYTES: u64 = 64 << 10;

    fn payload() -> Vec<u8> {
        (0..PAYLOAD_BYTES as usize)
            .map(|i| (i % 253) as u8)
            .collect()
    }

    /// One `poll_land` that made progress (the socket holds bytes).
    async fn land_once<R: ReceiveInPlace>(
        write: &mut InPlaceWrite<'_>,
        reader: &mut R,
        volume: &Volume,
    ) -> Landing {
        poll_fn(|cx| write.poll_land(cx, reader, volume)).await
    }

    #[test]
    fn landings_stop_only_on_block_boundaries_and_a_refused_one_hands_back_its_partial_block() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let engine =
                IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
            engine.ignore_slow_copies_for_test();
            let registry = Arc::new(Registry::open(dir.path(), engine.clone()).unwrap());
            let volume = registry.create("v", 1 << 20).unwrap();
            volume
                .write(0, Bytes::from(vec![1u8; 1 << 20]), false)
                .await
                .unwrap();
            let metrics = Metrics::new();
            let volume_metrics = metrics.volume("v");
            let (client, server) = tokio::net::UnixStream::pair().unwrap();
            let (mut reader, _writer) = server.into_split();
            let (_client_reader, mut client_writer) = client.into_split();
            let data = payload();
            let request = Request {
                flags: 0,
                command: Command::Write,
                cookie: 7,
                offset: 8192,
                length: PAYLOAD_BYTES,
            };
            let head = volume
                .in_place_head(8192, PAYLOAD_BYTES)
                .expect("cached head blocks");

            // Read with the header: 1000 bytes, less than a block: nothing lands yet.
            let mut write = InPlaceWrite::start(&volume, request, head, &data[..1000], || {
                volume_metrics.start(crate::metrics::Kind::Write)
            })
            .expect("started");
            assert_eq!(write.landed_bytes(), 0);

            // 3096 + 1904 more: the first block completes and lands, the rest waits.
            client_writer.write_all(&data[1000..6000]).await.unwrap();
            let mut landings = 0;
            while write.landed_bytes() < 4096 || write.unlanded.len() < 1904 {
                assert!(matches!(
                    land_once(&mut write, &mut reader, &volume).await,
                    Landing::Progress
                ));
                assert_eq!(write.landed_bytes() % 4096, 0, "landed mid-block");
                landings += 1;
                assert!(landings < 10, "no progress");
            }
            assert_eq!(write.landed_bytes(), 4096);

            // Enough for three whole blocks in the socket: they land from the mapping, the
            // partial block first through the buffer.
            client_writer.write_all(&data[6000..20480]).await.unwrap();
            while write.landed_bytes() < 20480 {
                assert!(matches!(
                    land_once(&mut write, &mut reader, &volume).await,
                    Landing::Progress
                ));
                assert_eq!(write.landed_bytes() % 4096, 0, "landed mid-block");
            }
            assert_eq!(write.landed_bytes(), 20480);

            // Landing paused: a partial block received is handed back with a rest that starts
            // on its block's boundary.
            client_writer.write_all(&data[20480..22000]).await.unwrap();
            assert!(matches!(
                land_once(&mut write, &mut reader, &volume).await,
                Landing::Progress
            ));
            engine.pause_inline_copies_for_test();
            client_writer.write_all(&data[22000..24576]).await.unwrap();
            let Landing::Rest(rest) = land_once(&mut write, &mut reader, &volume).await else {
                panic!("a paused landing goes the ordinary way");
            };
            assert_eq!(rest.offset, 8192 + 20480);
            assert_eq!(rest.length, PAYLOAD_BYTES - 20480);
            assert_eq!(rest.cookie, 7);
            assert_eq!(write.take_unlanded(), data[20480..24576]);

            let back = volume.read(0, 1 << 20).await.unwrap();
            assert!(back[..8192].iter().all(|&b| b == 1));
            assert_eq!(back[8192..8192 + 20480], data[..20480]);
            assert!(
                back[8192 + 20480..].iter().all(|&b| b == 1),
                "nothing of the partial block landed"
            );
        });
    }
}
