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
use crate::nbd::payload_wait::PayloadWait;
use crate::storage::layer::BLOCK_BYTES;
use crate::storage::stripes::ZeroGeneration;
use crate::storage::volume::{InPlaceHead, PartialBlock};
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

    /// As `try_receive_into`, after a `PayloadWait` saw the socket readable: the runtime's
    /// readiness, cleared by the last `WouldBlock`, is not asked.
    ///
    /// # Safety
    /// As for `try_receive_into`.
    unsafe fn receive_into_now(&self, _at: NonNull<u8>, _length: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// One `recv` on `socket` (non-blocking, as the runtime's sockets are); the caller vouches for
/// `at..at + length` (see `try_receive_into`).
///
/// # Safety
/// As for [`ReceiveInPlace::try_receive_into`].
pub(crate) unsafe fn receive_into(
    socket: &impl AsRawFd,
    at: NonNull<u8>,
    length: usize,
) -> io::Result<usize> {
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

            unsafe fn receive_into_now(&self, at: NonNull<u8>, length: usize) -> io::Result<usize> {
                let stream: &$stream = self.as_ref();
                // SAFETY: passed on from our caller, who guarantees the range.
                unsafe { receive_into(stream, at, length) }
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
    /// its payload is the landed bytes of the block it starts in (`take_partial`), then what the socket
    /// holds next.
    Rest(Request),
    /// The socket failed.
    Failed(io::Error),
}

/// A WRITE whose payload is being received in place.
///
/// A landing (one `recv`) ends wherever the socket's bytes did, often inside a block. The
/// landed part of that block is kept (`partial`, read back while the landing still counts as an
/// overwrite, so no TRIM or WRITE_ZEROES gives the block back in between), and a write that
/// stops landing (a snapshot, a fence, evicted pages, paused copies, a zero that gave the block
/// back) hands the ordinary path a rest that starts on the block's boundary with those bytes in
/// front. A rest starting mid-block would be merged onto whatever the block became meanwhile (a
/// racing TRIM zeroes it), leaving a block that is part zeroes and part payload, which neither
/// order of the two requests gives.
pub struct InPlaceWrite<'m> {
    pub request: Request,
    head: InPlaceHead,
    /// Bytes in the head, from the payload's start.
    landed_bytes: u64,
    /// The landed bytes of the block `landed_bytes` ends in (none when it ends on a boundary).
    partial: Vec<u8>,
    /// That block's zero generation when they landed: a zero of it since refuses the next
    /// landing (the part landed may be zeroes now).
    partial_zero_generation: Option<ZeroGeneration>,
    pub counted: RequestGuard<'m>,
    pub started: Instant,
    /// The last landing's bytes came after a wait saw the socket readable: the next one tries
    /// the socket before asking the runtime (see `poll_land`).
    direct: bool,
    /// A landing waited for the socket since `take_waited` was last asked.
    waited: bool,
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
        let partial_bytes = read.len() % BLOCK_BYTES as usize;
        // Taken before the bytes are written, as the landings' own are taken after them while
        // they still count as an overwrite: a zero of that block afterwards changes it either way.
        let partial_zero_generation =
            volume.zero_generation((request.offset + read.len() as u64) / BLOCK_BYTES);
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
            partial: read[read.len() - partial_bytes..].to_vec(),
            partial_zero_generation,
            counted: counted(),
            started: Instant::now(),
            direct: false,
            waited: false,
        })
    }

    /// Payload bytes in the head so far.
    pub fn landed_bytes(&self) -> u64 {
        self.landed_bytes
    }

    /// Whether a landing waited for the socket (`poll_land`'s `wait`) since the last call.
    pub fn take_waited(&mut self) -> bool {
        std::mem::take(&mut self.waited)
    }

    /// Receives what the socket holds of the payload, one `recv`. With `wait`, a socket found
    /// empty is polled for up to its budget before the task sleeps (see `payload_wait`), once
    /// per call when nothing comes.
    pub fn poll_land<R: ReceiveInPlace>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        volume: &Volume,
        mut wait: Option<PayloadWait>,
    ) -> Poll<Landing> {
        // Receive without asking the runtime: a wait saw bytes, in this call or before the last
        // landing. The runtime's readiness, cleared by the `WouldBlock` that started the wait,
        // would only be set again by a turn of its event loop.
        let mut direct = std::mem::take(&mut self.direct);
        // The last `recv` came straight after a wait said the socket was readable.
        let mut after_wait = false;
        loop {
            let missing_bytes = self.request.length - self.landed_bytes;
            if missing_bytes == 0 {
                return Poll::Ready(Landing::Complete);
            }
            if !direct {
                if let Err(e) = std::task::ready!(reader.poll_receive_ready(cx)) {
                    return Poll::Ready(Landing::Failed(e));
                }
            }
            let offset_bytes = self.request.offset + self.landed_bytes;
            // In pieces, as inline writes are copied: each piece's time is what the guard
            // against slow copies judges (a whole 1 MiB landing took over its 1 ms on a busy
            // machine and paused landing most of the time under four TCP clients).
            let piece_bytes = (missing_bytes as usize).min(MAX_CACHED_WRITE_PIECE_BYTES);
            let partial_block = (!self.partial.is_empty()).then_some(PartialBlock {
                block: offset_bytes / BLOCK_BYTES,
                zero_generation: self.partial_zero_generation,
            });
            let (head, partial) = (&self.head, &mut self.partial);
            let partial_zero_generation = &mut self.partial_zero_generation;
            let mut kept = Ok(());
            let landed = volume.land_in_place(
                head,
                offset_bytes,
                piece_bytes,
                partial_block,
                |at, length| {
                    // SAFETY: `land_in_place` hands out a range of the head's shared mapping
                    // and keeps it mapped until this closure returns: it holds the
                    // `MappedRange` (an `Arc` of the mapping) across the call, whatever the
                    // layer does with its own reference meanwhile (a snapshot or the touch
                    // budget lets it go). No reference to mapped memory is ever made: only the
                    // kernel writes it.
                    let received = unsafe {
                        if direct {
                            reader.receive_into_now(at, length)
                        } else {
                            reader.try_receive_into(at, length)
                        }
                    }?;
                    let end_bytes = offset_bytes + received as u64;
                    *partial_zero_generation = volume.zero_generation(end_bytes / BLOCK_BYTES);
                    kept = keep_partial(head, partial, offset_bytes, received);
                    Ok(received)
                },
            );
            match landed {
                None => return Poll::Ready(Landing::Rest(self.rest())),
                Some(Ok(0)) => return Poll::Ready(Landing::Eof),
                Some(Ok(n)) => {
                    self.landed_bytes += n as u64;
                    self.direct = direct;
                    if let Err(error) = kept {
                        // Without the block's landed part a rest could only start mid-block:
                        // the connection ends, the write unanswered.
                        tracing::warn!(%error, offset = offset_bytes, "reading back a landed block failed");
                        return Poll::Ready(Landing::Failed(error));
                    }
                    return Poll::Ready(if self.landed_bytes == self.request.length {
                        Landing::Complete
                    } else {
                        Landing::Progress
                    });
                }
                // The socket is empty: the next poll registers for it, unless a wait sees
                // bytes first. A wait that saw none, or whose bytes were not there after all,
                // leaves the rest of this call to the runtime.
                Some(Err(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    if after_wait {
                        wait = None;
                    }
                    self.waited |= wait.is_some();
                    direct = wait.is_some_and(|wait| wait.until_readable());
                    if !direct {
                        wait = None;
                    }
                    after_wait = direct;
                }
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

    /// The request for the part of the payload not landed yet, from the start of the block the
    /// landed part ends in (`take_partial`'s bytes come first).
    pub fn rest(&self) -> Request {
        let from_bytes = self.landed_bytes - self.partial.len() as u64;
        Request {
            offset: self.request.offset + from_bytes,
            length: self.request.length - from_bytes,
            ..self.request
        }
    }

    /// The landed bytes of the block the rest starts with.
    pub fn take_partial(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.partial)
    }
}

/// After `received` bytes landed at `offset_bytes`, keeps in `partial` the landed bytes of the
/// block the landing ended in: those of that block that landed before (when the landing started
/// in it) and the new ones, read back.
fn keep_partial(
    head: &InPlaceHead,
    partial: &mut Vec<u8>,
    offset_bytes: u64,
    received: usize,
) -> io::Result<()> {
    let end_bytes = offset_bytes + received as u64;
    let block_start = end_bytes - end_bytes % BLOCK_BYTES;
    if end_bytes == block_start {
        partial.clear();
    } else if block_start <= offset_bytes {
        let held = partial.len();
        partial.resize(held + received, 0);
        head.read_exact_at(&mut partial[held..], offset_bytes)?;
    } else {
        partial.resize((end_bytes - block_start) as usize, 0);
        head.read_exact_at(partial, block_start)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use evsd_proto::Command;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::io::{EngineConfig, EngineKind, IoEngine};
    use crate::metrics::Metrics;
    use crate::storage::{volume_of_ones, ZeroMode};

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
        poll_fn(|cx| write.poll_land(cx, reader, volume, None)).await
    }

    /// A volume of ones whose head takes landings, and its metrics.
    struct Landings {
        _dir: tempfile::TempDir,
        engine: IoEngine,
        _registry: std::sync::Arc<crate::storage::Registry>,
        volume: std::sync::Arc<Volume>,
        metrics: std::sync::Arc<crate::metrics::VolumeMetrics>,
    }

    impl Landings {
        async fn new() -> Landings {
            let dir = tempfile::tempdir().unwrap();
            let engine =
                IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
            engine.ignore_slow_copies_for_test();
            let (registry, volume) =
                volume_of_ones(dir.path(), Some(engine.clone()), 1 << 20).await;
            Landings {
                _dir: dir,
                engine,
                _registry: registry,
                volume,
                metrics: Metrics::new().volume("v"),
            }
        }

        /// A WRITE of `PAYLOAD_BYTES` at 8192 (cookie 7), its first `read` bytes of `data`
        /// taken with the header.
        fn start(&self, data: &[u8], read: usize) -> InPlaceWrite<'_> {
            let request = Request {
                flags: 0,
                command: Command::Write,
                cookie: 7,
                offset: 8192,
                length: PAYLOAD_BYTES,
            };
            let head = self
                .volume
                .in_place_head(8192, PAYLOAD_BYTES)
                .expect("cached head blocks");
            InPlaceWrite::start(&self.volume, request, head, &data[..read], || {
                self.metrics.start(crate::metrics::Kind::Write)
            })
            .expect("started")
        }
    }

    fn poll_once<R: ReceiveInPlace>(
        write: &mut InPlaceWrite<'_>,
        reader: &mut R,
        volume: &Volume,
        wait: Option<PayloadWait>,
    ) -> Poll<Landing> {
        write.poll_land(
            &mut Context::from_waker(std::task::Waker::noop()),
            reader,
            volume,
            wait,
        )
    }

    #[tokio::test]
    async fn a_waiting_landing_takes_bytes_sent_after_the_socket_ran_dry() {
        let landings = Landings::new().await;
        let volume = &landings.volume;
        let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let server = tokio::net::UnixStream::from_std(server).unwrap();
        let socket_fd = server.as_raw_fd();
        let (mut reader, _writer) = server.into_split();
        let data = payload();
        let mut write = landings.start(&data, 0);
        let wait = |budget| Some(PayloadWait { socket_fd, budget });

        let mut client = client;
        std::io::Write::write_all(&mut client, &data[..30_000]).unwrap();
        while write.landed_bytes() < 30_000 {
            let landed = land_once(&mut write, &mut reader, volume).await;
            assert!(matches!(landed, Landing::Progress));
        }

        // More arrives in two parts, each 50 ms into a wait: polls take both without ever
        // sleeping and without asking the runtime (whose readiness the empty socket cleared,
        // and which this test does not turn), the second straight after the first's landing.
        let parts = [data[30_000..45_000].to_vec(), data[45_000..60_000].to_vec()];
        let sender = std::thread::spawn(move || {
            for part in parts {
                std::thread::sleep(Duration::from_millis(50));
                std::io::Write::write_all(&mut client, &part).unwrap();
            }
            client
        });
        while write.landed_bytes() < 60_000 {
            match poll_once(
                &mut write,
                &mut reader,
                volume,
                wait(Duration::from_secs(30)),
            ) {
                Poll::Ready(Landing::Progress) => assert!(write.take_waited()),
                Poll::Ready(_) => panic!("the landing stopped"),
                // Only when a wait's bytes were not there after all: not on a local socket.
                Poll::Pending => panic!("slept with the wait's budget left"),
            }
        }
        let mut client = sender.join().unwrap();

        // Nothing comes within the budget: the task sleeps as without a wait, and the runtime
        // wakes it for the rest.
        let started = std::time::Instant::now();
        let budget = Duration::from_millis(2);
        assert!(poll_once(&mut write, &mut reader, volume, wait(budget)).is_pending());
        assert!(started.elapsed() >= budget, "the wait ran its budget");
        assert!(write.take_waited());
        std::io::Write::write_all(&mut client, &data[60_000..]).unwrap();
        while write.landed_bytes() < PAYLOAD_BYTES {
            let landed = land_once(&mut write, &mut reader, volume).await;
            assert!(matches!(landed, Landing::Progress | Landing::Complete));
        }
        let back = volume.read(8192, PAYLOAD_BYTES as usize).await.unwrap();
        assert_eq!(back[..], data[..]);
    }

    #[tokio::test]
    async fn a_landing_after_a_zero_of_its_block_hands_back_the_landed_part() {
        let landings = Landings::new().await;
        let (volume, engine) = (&landings.volume, &landings.engine);
        let (client, server) = tokio::net::UnixStream::pair().unwrap();
        let (mut reader, _writer) = server.into_split();
        let (_client_reader, mut client_writer) = client.into_split();
        let data = payload();

        // Read with the header: 1000 bytes, written at once.
        let mut write = landings.start(&data, 1000);
        assert_eq!(write.landed_bytes(), 1000);
        assert_eq!(write.partial, data[..1000]);

        // A landing across a block boundary, then one inside the next block.
        for (from, to) in [(1000, 6000), (6000, 6100)] {
            client_writer.write_all(&data[from..to]).await.unwrap();
            while write.landed_bytes() < to as u64 {
                assert!(matches!(
                    land_once(&mut write, &mut reader, volume).await,
                    Landing::Progress
                ));
            }
            assert_eq!(write.partial, data[4096..to], "the block's landed part");
        }

        // The block zeroed by a WRITE_ZEROES that keeps it allocated (its map still says data)
        // by writing zeroes, as where fallocate is unsupported, so its page stays cached: the
        // next landing is refused, and the rest starts on the block's boundary with its landed
        // part first, so the block is written whole.
        engine.fail_fallocate_for_test(0, libc::EOPNOTSUPP);
        let no_hole = ZeroMode {
            may_trim: false,
            fast_only: false,
        };
        volume
            .write_zeroes(8192 + 4096, 4096, no_hole, false)
            .await
            .unwrap();
        client_writer.write_all(&data[6100..8000]).await.unwrap();
        let Landing::Rest(rest) = land_once(&mut write, &mut reader, volume).await else {
            panic!("a landing into a block zeroed since goes the ordinary way");
        };
        assert_eq!(
            (rest.offset, rest.length),
            (8192 + 4096, PAYLOAD_BYTES - 4096)
        );
        assert_eq!(rest.cookie, 7);
        assert_eq!(write.take_partial(), data[4096..6100]);

        let back = volume.read(0, 1 << 20).await.unwrap();
        assert!(back[..8192].iter().all(|&b| b == 1));
        assert_eq!(back[8192..8192 + 4096], data[..4096]);
        assert!(back[8192 + 4096..8192 + 8192].iter().all(|&b| b == 0));
        assert!(back[8192 + 8192..].iter().all(|&b| b == 1));
    }
}
