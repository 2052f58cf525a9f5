//! Disk I/O engine: positioned reads/writes, syncs and fallocate on backing files, executed
//! either on dedicated io_uring threads or on tokio's blocking thread pool.
//!
//! Buffers are passed by value (`BytesMut` / `Bytes`) rather than borrowed because with
//! io_uring the kernel keeps using the memory after the submitting future may have been
//! dropped; owning the buffer lets the engine keep it alive until the kernel is done.

mod error;
pub mod hangups;
mod inline_write;
mod nowait;
mod page_cache;
mod threads;
mod uring;

use std::fmt;
use std::fs::File;
use std::io;
use std::ptr::NonNull;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;

pub use error::EngineError;

use inline_write::InlineWrites;
use nowait::NoWait;
pub use page_cache::page_bytes;
use page_cache::Residency;
pub(crate) use threads::fallocate_blocking;
use threads::ThreadsEngine;
use uring::UringEngine;

/// Buffered writes larger than this reach the page cache as pieces of at most this size, each
/// ending at a multiple of it in the file, one after another within one trip to the engine (on
/// io_uring, a chain of linked SQEs that the kernel runs without coming back between pieces),
/// or on the caller's thread (`IoEngine::write_all_at_here`).
///
/// The kernel caches a buffered write in folios as large as the write (up to 2 MiB here), and
/// every later 4 KiB write into a cached folio walks all of the folio's blocks
/// (ext4_block_write_begin: 40% of the server's CPU after a 256 KiB fill). After a volume was
/// filled with 2 MiB writes, as `qemu-img convert` or `nbdcopy --request-size=2M` do, 4 KiB
/// random writes over a Unix socket ran at 19-21k IOPS until those pages left the cache;
/// filled in pieces, at 88-112k with 128 KiB pieces, 80-89k with 256 KiB, 112-139k with
/// 64 KiB. The price is paid by large writes that create cached pages: 1 MiB sequential
/// writes at depth 8 (medians of three) went from 3252 to 2627 IOPS over TCP and from 2947 to
/// 2907 over a Unix socket with 128 KiB pieces, with four connections 6-7% less (64 KiB:
/// about 30% less over TCP). nbdkit and qemu-nbd write what they are sent: in
/// `benches/peer-compare.sh`'s randwrite-4k-imported they ran at 19-24k IOPS, evsd at
/// 93-106k. Random writes after a bulk import are what a volume serving a VM lives on; a
/// stream of 1 MiB writes keeps most of its speed. (Those costs were measured with the ring
/// coming back for every piece; chained, 1 MiB writes over four Unix connections went from
/// 2306-2647 to 2857-3035 IOPS, and over TCP the connection copies large writes itself.)
pub(crate) const MAX_CACHED_WRITE_PIECE_BYTES: usize = 128 << 10;

/// How an engine hands a write to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pieces {
    /// One call for the whole buffer.
    Whole,
    /// Calls of at most this many bytes, each ending at a multiple of it in the file.
    Of(usize),
}

impl Pieces {
    /// The bytes of a write of `len_bytes` at `offset` that the next call takes.
    pub(crate) fn next_len(self, offset: u64, len_bytes: usize) -> usize {
        match self {
            Pieces::Whole => len_bytes,
            Pieces::Of(piece_bytes) => {
                let into_piece = (offset % piece_bytes as u64) as usize;
                len_bytes.min(piece_bytes - into_piece)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Uring,
    Threads,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "uring",
            EngineKind::Threads => "threads",
        })
    }
}

impl FromStr for EngineKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uring" => Ok(EngineKind::Uring),
            "threads" => Ok(EngineKind::Threads),
            other => Err(format!(
                "unknown I/O engine {other:?} (expected \"uring\" or \"threads\")"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Number of io_uring threads, each owning one ring.
    pub ring_threads: usize,
    /// Submission queue size of each ring; also caps that ring's in-flight operations.
    pub ring_entries: u32,
    /// Microseconds a ring thread polls for more work before sleeping (0: never spin).
    pub ring_spin_us: u64,
    /// Serve page-cache hits inline with RWF_NOWAIT before queueing to the engine, small
    /// writes inline where RWF_NOWAIT writes are unsupported (see `inline_write.rs`), and the
    /// large writes of callers that copy them themselves (`IoEngine::write_all_at_here`).
    pub inline_cached_io: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            ring_threads: 1,
            ring_entries: 256,
            inline_cached_io: true,
            ring_spin_us: 0,
        }
    }
}

/// Which writes `IoEngine::write_all` may do on the caller's thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inline {
    /// None: the file is open with O_DIRECT, whose writes wait for the device.
    Never,
    /// Small ones (page-cache hits, and small writes where the filesystem has no non-blocking
    /// buffered writes); large ones go to the engine.
    Small,
    /// Large ones too, in pieces (`IoEngine::write_all_at_here`).
    Large,
}

/// How long large writes copied on a caller's thread hold it before one of them lets the
/// thread's other work run (about 2-4 MiB of copying). Counted per thread, not per write: a
/// connection polls all its ready writes in one pass.
const HOLD_THREAD_FOR: Duration = Duration::from_micros(500);

thread_local! {
    /// Time large writes have spent copying on this thread since one of them last let the
    /// thread's other work run.
    static COPYING_SINCE_YIELD: std::cell::Cell<Duration> =
        const { std::cell::Cell::new(Duration::ZERO) };
}

/// Counts `took` of copying on this thread; true (and the count restarts) once the copies
/// since the last yield reach `HOLD_THREAD_FOR`.
fn time_to_yield(took: Duration) -> bool {
    COPYING_SINCE_YIELD.with(|held| {
        let total = held.get() + took;
        let due = total >= HOLD_THREAD_FOR;
        held.set(if due { Duration::ZERO } else { total });
        due
    })
}

/// Handle to the I/O engine. Clones share the same rings/threads; the io_uring threads shut
/// down (after finishing in-flight operations) when the last clone is dropped.
#[derive(Clone)]
pub struct IoEngine {
    backend: Arc<Backend>,
    /// The thread-pool engine that takes over once an io_uring ring has failed (the kernel
    /// refused it) with no write in the kernel: the requests the kernel had then fail, those
    /// still queued and later ones are served.
    fallback: Arc<std::sync::OnceLock<ThreadsEngine>>,
    nowait: Arc<NoWait>,
    inline_writes: Arc<InlineWrites>,
    residency: Arc<Residency>,
    /// Bytes large writes copied on their callers' threads (`write_all_at_here`). A shared
    /// count: the metrics endpoint reads it.
    copied_here_bytes: Counter,
    /// Set by tests: fallocate calls whose mode has any of these bits (or every call, for 0)
    /// fail with this errno.
    #[cfg(test)]
    failing_fallocate: Arc<std::sync::Mutex<Option<(i32, i32)>>>,
    /// Set by tests: every later sync fails with EIO after this long.
    #[cfg(test)]
    failing_syncs_after: Arc<std::sync::Mutex<Option<std::time::Duration>>>,
    /// Set by tests: `write_all*` calls land this long later, carried on by a task of their
    /// own whether or not their caller still waits, as a write in the kernel would be.
    #[cfg(test)]
    delayed_writes: Arc<std::sync::Mutex<Option<std::time::Duration>>>,
}

enum Backend {
    Uring(UringEngine),
    Threads(ThreadsEngine),
}

enum BackendRef<'a> {
    Uring(&'a UringEngine),
    Threads(&'a ThreadsEngine),
}

impl fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoEngine")
            .field("kind", &self.kind())
            .finish()
    }
}

impl IoEngine {
    /// `forced = None` means auto: try io_uring (ring creation plus an opcode probe), fall back
    /// to the thread pool with a warning. `Some(kind)`: exactly that engine or an error.
    pub fn new(forced: Option<EngineKind>, config: &EngineConfig) -> Result<IoEngine, EngineError> {
        let backend = match forced {
            Some(EngineKind::Uring) => Backend::Uring(UringEngine::new(config)?),
            Some(EngineKind::Threads) => Backend::Threads(ThreadsEngine::new()),
            None => match UringEngine::new(config) {
                Ok(engine) => Backend::Uring(engine),
                Err(err) => {
                    tracing::warn!(
                        error = %err,
                        "io_uring engine unavailable, falling back to the thread-pool engine"
                    );
                    Backend::Threads(ThreadsEngine::new())
                }
            },
        };
        Ok(IoEngine {
            backend: Arc::new(backend),
            fallback: Arc::default(),
            nowait: Arc::new(NoWait::new(config.inline_cached_io)),
            inline_writes: Arc::new(InlineWrites::new(config.inline_cached_io)),
            residency: Arc::new(Residency::new(config.inline_cached_io)),
            copied_here_bytes: Counter::default(),
            #[cfg(test)]
            failing_fallocate: Arc::default(),
            #[cfg(test)]
            failing_syncs_after: Arc::default(),
            #[cfg(test)]
            delayed_writes: Arc::default(),
        })
    }

    /// The engine requests go to: the thread pool once an io_uring ring has failed with no
    /// write in flight (with one, the failed ring stays, failing everything, as a write of it
    /// could still land over a later one).
    fn backend(&self) -> BackendRef<'_> {
        match &*self.backend {
            Backend::Uring(engine) if engine.is_broken() && !engine.lost_writes() => {
                BackendRef::Threads(self.fallback_engine())
            }
            Backend::Uring(engine) => BackendRef::Uring(engine),
            Backend::Threads(engine) => BackendRef::Threads(engine),
        }
    }

    /// The engine reads and syncs go to: as `backend`, but a failed ring hands them to the
    /// thread pool even with writes lost in it. They change no bytes a stray write could land
    /// over, so a volume that can take no more writes (see `check_writes_allowed`) still
    /// serves reads, and flushes what it was answered for.
    fn backend_for_reads(&self) -> BackendRef<'_> {
        match &*self.backend {
            Backend::Uring(engine) if engine.is_broken() => {
                BackendRef::Threads(self.fallback_engine())
            }
            _ => self.backend(),
        }
    }

    fn fallback_engine(&self) -> &ThreadsEngine {
        self.fallback.get_or_init(|| {
            tracing::error!("an io_uring ring failed: disk I/O goes through the thread-pool engine from now on (writes too, unless the ring failed with writes in the kernel)");
            ThreadsEngine::new()
        })
    }

    /// Refuses writes and fallocates once a ring failed with some in the kernel: one of those
    /// could still land over a later write to the same blocks, whichever path that took (done
    /// inline, or by another ring).
    fn check_writes_allowed(&self) -> io::Result<()> {
        match &*self.backend {
            Backend::Uring(engine) if engine.lost_writes() => Err(io::Error::other(
                "an io_uring ring failed with writes in the kernel: writes are refused until the daemon restarts",
            )),
            _ => Ok(()),
        }
    }

    /// The thread pool, when `err` is a request's failure with a ring that it took over from
    /// (see `uring::may_retry_elsewhere`): the request is served there instead of failing.
    fn takeover(&self, err: &io::Error) -> Option<&ThreadsEngine> {
        self.takeover_by(err, self.backend())
    }

    /// `takeover` for a read or sync (see `backend_for_reads`).
    fn takeover_for_reads(&self, err: &io::Error) -> Option<&ThreadsEngine> {
        self.takeover_by(err, self.backend_for_reads())
    }

    fn takeover_by<'a>(&self, err: &io::Error, now: BackendRef<'a>) -> Option<&'a ThreadsEngine> {
        if !uring::may_retry_elsewhere(err) {
            return None;
        }
        match now {
            BackendRef::Threads(engine) => Some(engine),
            BackendRef::Uring(_) => None,
        }
    }

    /// `result` of a ring, or the request run again by `retry` on the thread pool that took
    /// over from the ring (see `takeover`).
    async fn or_taken_over<'a, T, Fut>(
        &'a self,
        result: io::Result<T>,
        retry: impl FnOnce(&'a ThreadsEngine) -> Fut,
    ) -> io::Result<T>
    where
        Fut: std::future::Future<Output = io::Result<T>>,
    {
        match result {
            Err(e) => match self.takeover(&e) {
                Some(threads) => retry(threads).await,
                None => Err(e),
            },
            done => done,
        }
    }

    /// The count of bytes large writes copied on their callers' threads, shared with whoever
    /// exports it.
    pub fn copied_here_bytes(&self) -> Counter {
        self.copied_here_bytes.clone()
    }

    pub fn kind(&self) -> EngineKind {
        match *self.backend {
            Backend::Uring(_) if self.fallback.get().is_none() => EngineKind::Uring,
            Backend::Uring(_) | Backend::Threads(_) => EngineKind::Threads,
        }
    }

    /// One positioned read into `buf[..]` (its current length is the amount wanted). Returns
    /// the buffer with the number of bytes read, which may be short. A read lost with a failed
    /// ring (`uring::read_lost_with_ring`) comes back with an empty buffer: retry it with a new
    /// one, as `read_exact_at` does, never with that one.
    // Part of the engine's contract even while the daemon itself only uses read_exact_at.
    #[allow(dead_code)]
    pub async fn read_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: BytesMut,
    ) -> (BytesMut, io::Result<usize>) {
        self.read_into(file, offset, buf, 0).await
    }

    /// Whether a caller may copy into the page cache on its own thread now: inline page-cache
    /// I/O is on and not paused by slow copies (see `InlineWrites`), and writes are not refused
    /// after a ring failed with some in the kernel (one could land over the copy). For writes
    /// received in place (`storage::volume::in_place`), which copy through
    /// [`IoEngine::copy_inline`].
    pub fn copies_inline_now(&self) -> bool {
        self.inline_writes.allowed() && self.check_writes_allowed().is_ok()
    }

    /// Runs a large copy into the page cache made outside the engine, judged as the pieces of
    /// large inline writes are: copies that block for long pause inline copies for a while.
    pub fn copy_inline<T>(&self, copy: impl FnOnce() -> T) -> T {
        self.inline_writes.time_large_copy(copy)
    }

    /// Keeps inline copies on whatever copies take: a test of what lands in place must not see
    /// a copy that blocked on a busy machine pause them.
    #[cfg(test)]
    pub(crate) fn ignore_slow_copies_for_test(&self) {
        self.inline_writes.ignore_slow_writes_for_test();
    }

    /// Makes every later fallocate whose mode has any of `mode_bits` (every one, for 0) fail
    /// with `errno`: ENOSPC for punches on a full disk, EOPNOTSUPP where there is none.
    #[cfg(test)]
    pub(crate) fn fail_fallocate_for_test(&self, mode_bits: i32, errno: i32) {
        *self.failing_fallocate.lock().unwrap() = Some((mode_bits, errno));
    }

    /// Makes every later sync fail with EIO after `after` (None: syncs work again), as a
    /// write-back error the kernel reports once would.
    #[cfg(test)]
    pub(crate) fn fail_syncs_after_for_test(&self, after: Option<std::time::Duration>) {
        *self.failing_syncs_after.lock().unwrap() = after;
    }

    #[cfg(test)]
    pub(crate) fn delay_writes_for_test(&self, by: Option<std::time::Duration>) {
        *self.delayed_writes.lock().unwrap() = by;
    }

    /// Whether all of the range is in the page cache, so that sending it from there does not
    /// wait for the disk. False when unsure, and always when inline page-cache I/O is off.
    pub fn all_cached(&self, file: &File, offset: u64, length: u64) -> bool {
        self.residency.all_cached(file, offset, length)
    }

    /// Whether all of a range of a shared file mapping is in the page cache, so that the kernel
    /// copying from it does not wait for the disk. False when unsure, and always when inline
    /// page-cache I/O is off.
    pub fn all_resident(&self, start: NonNull<u8>, length_bytes: usize) -> bool {
        self.residency.all_resident(start, length_bytes)
    }

    /// `all_resident` page by page: one byte per page of the range into `vector` (bit 0 set
    /// for a page in the page cache), which must have exactly one per page the range touches.
    /// False when unsure, and always when inline page-cache I/O is off.
    pub fn resident_pages(
        &self,
        start: NonNull<u8>,
        length_bytes: usize,
        vector: &mut [u8],
    ) -> bool {
        self.residency.resident_pages(start, length_bytes, vector)
    }

    /// Fills all of `buf`, looping over short reads; bytes past end-of-file read as zeros.
    pub async fn read_exact_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        mut buf: BytesMut,
    ) -> (BytesMut, io::Result<()>) {
        let mut filled_bytes = 0;
        let wanted_bytes = buf.len();
        while filled_bytes < buf.len() {
            let Some(pos) = offset.checked_add(filled_bytes as u64) else {
                return (buf, Err(invalid_offset()));
            };
            let (returned, result) = self.read_into(file, pos, buf, filled_bytes).await;
            buf = returned;
            match result {
                // The buffer stayed with the failed ring's kernel, and the bytes read before
                // with it: the whole read starts again, into a new buffer, on the thread pool
                // that took over reads (writes too, unless the ring lost some).
                Err(err)
                    if uring::read_lost_with_ring(&err)
                        && matches!(self.backend_for_reads(), BackendRef::Threads(_)) =>
                {
                    buf = BytesMut::zeroed(wanted_bytes);
                    filled_bytes = 0;
                }
                Ok(0) => {
                    // Sparse volumes are allowed to be shorter than their nominal size;
                    // unwritten tail blocks read as zeros, just like holes.
                    buf[filled_bytes..].fill(0);
                    break;
                }
                Ok(n_bytes) => filled_bytes += n_bytes,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return (buf, Err(err)),
            }
        }
        (buf, Ok(()))
    }

    /// One positioned write. `dsync` gives RWF_DSYNC semantics: the data is durable when this
    /// returns (used for NBD FUA).
    pub async fn write_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: Bytes,
        dsync: bool,
    ) -> io::Result<usize> {
        check_offset(offset)?;
        self.check_writes_allowed()?;
        if !dsync {
            if let Some(result) = self.nowait.try_write(file, offset, &data) {
                return result;
            }
            if !self.nowait.writes_inline() {
                if let Some(result) = self.inline_writes.try_write(file, offset, &data) {
                    return result;
                }
            }
        }
        self.queue_write(file, offset, data, dsync, Pieces::Whole)
            .await
    }

    /// Hands a write to the engine; the caller has checked `offset` and `check_writes_allowed`.
    async fn queue_write(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: Bytes,
        dsync: bool,
        pieces: Pieces,
    ) -> io::Result<usize> {
        match self.backend() {
            BackendRef::Uring(engine) => {
                let written = engine
                    .write_at(file, offset, data.clone(), dsync, pieces)
                    .await;
                self.or_taken_over(written, |threads| {
                    threads.write_at(file, offset, data, dsync, pieces)
                })
                .await
            }
            BackendRef::Threads(engine) => engine.write_at(file, offset, data, dsync, pieces).await,
        }
    }

    /// Writes all of `data`, looping over short writes.
    pub async fn write_all_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: Bytes,
        dsync: bool,
    ) -> io::Result<()> {
        self.write_all(file, offset, data, dsync, Inline::Small)
            .await
    }

    /// `write_all_at` for a caller whose thread may copy a large write into the page cache
    /// itself, piece after piece (see `write_pieces_here`), instead of handing it to the engine.
    /// It holds the thread for the copy, which is what the engine's thread would spend on it;
    /// it saves the trips between threads (to the ring, to io_uring's own worker on a
    /// filesystem without non-blocking buffered writes, and back, for every piece).
    pub async fn write_all_at_here(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: Bytes,
        dsync: bool,
    ) -> io::Result<()> {
        self.write_all(file, offset, data, dsync, Inline::Large)
            .await
    }

    /// `write_all_at` for a file opened with O_DIRECT: always queued to the engine, never tried
    /// inline, because a direct write waits for the device even with RWF_NOWAIT and would hold
    /// a tokio worker meanwhile.
    pub async fn write_all_at_direct(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: Bytes,
    ) -> io::Result<()> {
        self.write_all(file, offset, data, false, Inline::Never)
            .await
    }

    async fn write_all(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: Bytes,
        dsync: bool,
        inline: Inline,
    ) -> io::Result<()> {
        #[cfg(test)]
        {
            let delay = *self.delayed_writes.lock().unwrap();
            if let Some(delay) = delay {
                let (engine, file) = (self.clone(), Arc::clone(file));
                let landing = tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    engine
                        .write_all_now(&file, offset, data, dsync, inline)
                        .await
                });
                return landing.await.expect("a delayed write's task");
            }
        }
        self.write_all_now(file, offset, data, dsync, inline).await
    }

    async fn write_all_now(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: Bytes,
        dsync: bool,
        inline: Inline,
    ) -> io::Result<()> {
        let mut written_bytes = 0;
        while written_bytes < data.len() {
            let pos = offset
                .checked_add(written_bytes as u64)
                .ok_or_else(invalid_offset)?;
            let rest = data.slice(written_bytes..);
            // A FUA write stays whole: in pieces it would wait for the disk once per piece.
            let in_pieces =
                inline != Inline::Never && !dsync && rest.len() > MAX_CACHED_WRITE_PIECE_BYTES;
            let written = if inline != Inline::Never && !in_pieces {
                self.write_at(file, pos, rest, dsync).await
            } else if let Err(e) = check_offset(pos).and_then(|()| self.check_writes_allowed()) {
                Err(e)
            } else if !in_pieces {
                self.queue_write(file, pos, rest, dsync, Pieces::Whole)
                    .await
            } else {
                let here = match inline {
                    Inline::Large => self.write_pieces_here(file, pos, &rest).await,
                    Inline::Small | Inline::Never => None,
                };
                match here {
                    Some(written) => written,
                    None => {
                        let pieces = Pieces::Of(MAX_CACHED_WRITE_PIECE_BYTES);
                        self.queue_write(file, pos, rest, dsync, pieces).await
                    }
                }
            };
            match written {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "positioned write returned 0 bytes",
                    ))
                }
                Ok(n_bytes) => written_bytes += n_bytes,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Copies `data` (a plain buffered write, offset checked) into the page cache on this
    /// thread, in the pieces the engines would write. Yields to the thread's other work once
    /// such copies have held the thread for `HOLD_THREAD_FOR` (a 32 MiB write takes
    /// milliseconds), and so also lets the connection read on. `None` when not a byte could be
    /// written here (the filesystem would block, or slow writes paused inline writes): the
    /// engine takes it. A piece refused, short or failed after others ends the call with the
    /// bytes written before it; the caller's loop resumes there.
    async fn write_pieces_here(
        &self,
        file: &File,
        offset: u64,
        data: &[u8],
    ) -> Option<io::Result<usize>> {
        let pieces = Pieces::Of(MAX_CACHED_WRITE_PIECE_BYTES);
        let mut written_bytes = 0;
        while written_bytes < data.len() {
            let at = offset + written_bytes as u64;
            let len = pieces.next_len(at, data.len() - written_bytes);
            let piece = &data[written_bytes..written_bytes + len];
            let began = Instant::now();
            let result = self.try_write_here(file, at, piece);
            let due = time_to_yield(began.elapsed());
            match result {
                Some(Ok(n)) => {
                    written_bytes += n;
                    self.copied_here_bytes.inc_by(n as u64);
                    if n < len {
                        break;
                    }
                }
                Some(Err(e)) if written_bytes == 0 => return Some(Err(e)),
                None if written_bytes == 0 => return None,
                Some(Err(_)) | None => break,
            }
            if written_bytes < data.len() && due {
                tokio::task::yield_now().await;
                // A ring may have failed with writes in the kernel meanwhile: what follows
                // is a later write, refused like any other (see `check_writes_allowed`).
                if self.check_writes_allowed().is_err() {
                    break;
                }
            }
        }
        Some(Ok(written_bytes))
    }

    /// One plain buffered write done on this thread if the filesystem allows it without
    /// blocking (RWF_NOWAIT), or where it has no non-blocking buffered writes, as a blocking
    /// write guarded by `InlineWrites`; `None` when the engine must take it.
    fn try_write_here(&self, file: &File, offset: u64, data: &[u8]) -> Option<io::Result<usize>> {
        if let Some(result) = self.nowait.try_write(file, offset, data) {
            return Some(result);
        }
        if self.nowait.writes_inline() {
            return None;
        }
        self.inline_writes.try_write_piece(file, offset, data)
    }

    pub async fn fdatasync(&self, file: &Arc<File>) -> io::Result<()> {
        self.sync(file, true).await
    }

    // Part of the engine's contract even while the daemon itself only needs fdatasync.
    #[allow(dead_code)]
    pub async fn fsync(&self, file: &Arc<File>) -> io::Result<()> {
        self.sync(file, false).await
    }

    /// fallocate(2) with the given mode bits (`libc::FALLOC_FL_*`).
    pub async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        check_offset(offset)?;
        check_offset(len)?;
        self.check_writes_allowed()?;
        #[cfg(test)]
        if let Some((mask, errno)) = *self.failing_fallocate.lock().unwrap() {
            if mask == 0 || mode & mask != 0 {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        match self.backend() {
            BackendRef::Uring(engine) => {
                // As the threads engine does: an io-wq worker signalled (at teardown) returns
                // EINTR, and fallocate is safe to repeat.
                let mut interrupted = 0;
                loop {
                    let done = engine.fallocate(file, mode, offset, len).await;
                    let done = self
                        .or_taken_over(done, |threads| threads.fallocate(file, mode, offset, len))
                        .await;
                    match done {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupted < 8 => {
                            interrupted += 1;
                        }
                        other => return other,
                    }
                }
            }
            BackendRef::Threads(engine) => engine.fallocate(file, mode, offset, len).await,
        }
    }

    async fn sync(&self, file: &Arc<File>, datasync: bool) -> io::Result<()> {
        #[cfg(test)]
        {
            let failing = *self.failing_syncs_after.lock().unwrap();
            if let Some(after) = failing {
                tokio::time::sleep(after).await;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        // As for fallocate: an interrupted worker (EINTR) reported no write-back error, and
        // the sync is safe to repeat; a failure recorded instead would fail every later FLUSH.
        let mut interrupted = 0;
        loop {
            let synced = match self.backend_for_reads() {
                BackendRef::Uring(engine) => match engine.sync(file, datasync).await {
                    Err(e) => match self.takeover_for_reads(&e) {
                        Some(threads) => threads.sync(file, datasync).await,
                        None => Err(e),
                    },
                    synced => synced,
                },
                BackendRef::Threads(engine) => engine.sync(file, datasync).await,
            };
            match synced {
                Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupted < 8 => {
                    interrupted += 1;
                }
                other => return other,
            }
        }
    }

    /// Reads into `buf[buf_start..]`; the offset into the buffer lets `read_exact_at` resume
    /// after a short read without splitting the buffer.
    async fn read_into(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: BytesMut,
        buf_start: usize,
    ) -> (BytesMut, io::Result<usize>) {
        if let Err(err) = check_offset(offset) {
            return (buf, Err(err));
        }
        if buf_start > buf.len() {
            let err = io::Error::new(io::ErrorKind::InvalidInput, "read start beyond buffer");
            return (buf, Err(err));
        }
        let mut buf = buf;
        if let Some(result) = self.nowait.try_read(file, offset, &mut buf[buf_start..]) {
            return (buf, result);
        }
        match self.backend_for_reads() {
            BackendRef::Uring(engine) => {
                match engine.read_into(file, offset, buf, buf_start).await {
                    // Only a read that never reached the kernel is retried here: it has its
                    // buffer. One that did is read again whole by `read_exact_at`.
                    (buf, Err(e)) => match self.takeover_for_reads(&e) {
                        Some(threads) => threads.read_into(file, offset, buf, buf_start).await,
                        None => (buf, Err(e)),
                    },
                    read => read,
                }
            }
            BackendRef::Threads(engine) => engine.read_into(file, offset, buf, buf_start).await,
        }
    }
}

/// Offsets above `i64::MAX` are negative `off_t`s; for io_uring, `u64::MAX` would even mean
/// "use and advance the file position", so reject them before they reach the kernel.
fn check_offset(offset: u64) -> io::Result<()> {
    if offset > i64::MAX as u64 {
        Err(invalid_offset())
    } else {
        Ok(())
    }
}

fn invalid_offset() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "file offset does not fit in off_t",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    /// The engines themselves are under test: no inline page-cache shortcut.
    fn engine_config(ring_threads: usize) -> EngineConfig {
        EngineConfig {
            ring_threads,
            ring_entries: 32,
            inline_cached_io: false,
            ring_spin_us: 0,
        }
    }

    fn engines() -> Vec<IoEngine> {
        let config = engine_config(2);
        vec![
            IoEngine::new(Some(EngineKind::Uring), &config).expect("io_uring engine"),
            IoEngine::new(Some(EngineKind::Threads), &config).expect("threads engine"),
        ]
    }

    fn temp_file() -> Arc<File> {
        Arc::new(tempfile::tempfile().expect("tempfile"))
    }

    /// xorshift64*: deterministic test patterns without pulling in a rand dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    fn uring_of(engine: &IoEngine) -> &UringEngine {
        let Backend::Uring(uring) = &*engine.backend else {
            panic!("not the io_uring engine");
        };
        uring
    }

    /// The io_uring engine of `engines()` and a file holding `len` bytes of pattern `seed`.
    async fn uring_with_data(seed: u64, len: usize) -> (IoEngine, Arc<File>, Bytes) {
        let engine = engines().remove(0);
        let file = temp_file();
        let data = Bytes::from(Rng(seed).bytes(len));
        engine
            .write_all_at(&file, 0, data.clone(), false)
            .await
            .unwrap();
        (engine, file, data)
    }

    /// Makes `engine`'s rings fail and waits until they have; returns the io_uring engine.
    async fn break_rings(engine: &IoEngine) -> &UringEngine {
        let uring = uring_of(engine);
        uring.break_rings_for_test();
        let started = std::time::Instant::now();
        while !uring.is_broken() {
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        uring
    }

    #[tokio::test]
    async fn a_failed_ring_hands_later_requests_to_the_thread_pool() {
        let engine = engines().remove(0);
        let file = temp_file();
        let data = Bytes::from(Rng(7).bytes(8192));
        engine
            .write_all_at(&file, 0, data.clone(), false)
            .await
            .unwrap();
        break_rings(&engine).await;
        // Served by the fallback: reads, writes, syncs, fallocate.
        let (back, read) = engine.read_exact_at(&file, 0, BytesMut::zeroed(8192)).await;
        read.unwrap();
        assert_eq!(&back[..], &data[..]);
        let more = Bytes::from(Rng(8).bytes(4096));
        engine
            .write_all_at(&file, 8192, more.clone(), true)
            .await
            .unwrap();
        engine.fdatasync(&file).await.unwrap();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        engine.fallocate(&file, punch, 0, 4096).await.unwrap();
        let (back, read) = engine
            .read_exact_at(&file, 0, BytesMut::zeroed(12288))
            .await;
        read.unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert_eq!(&back[4096..8192], &data[4096..]);
        assert_eq!(&back[8192..], &more[..]);
        assert_eq!(engine.kind(), EngineKind::Threads);
    }

    #[tokio::test]
    async fn requests_queued_for_a_ring_that_fails_are_served_by_the_thread_pool() {
        let (engine, file, data) = uring_with_data(9, 16384).await;
        let uring = uring_of(&engine);
        uring.hold_rings_for_test();
        // One of each kind, all queued at once, on ranges apart.
        let more = Bytes::from(Rng(10).bytes(4096));
        let read = {
            let (engine, file) = (engine.clone(), Arc::clone(&file));
            tokio::spawn(
                async move { engine.read_exact_at(&file, 0, BytesMut::zeroed(8192)).await },
            )
        };
        let written = {
            let (engine, file, more) = (engine.clone(), Arc::clone(&file), more.clone());
            tokio::spawn(async move { engine.write_all_at(&file, 8192, more, false).await })
        };
        let synced = {
            let (engine, file) = (engine.clone(), Arc::clone(&file));
            tokio::spawn(async move { engine.fdatasync(&file).await })
        };
        let punched = {
            let (engine, file) = (engine.clone(), Arc::clone(&file));
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            tokio::spawn(async move { engine.fallocate(&file, punch, 12288, 4096).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        for task in [
            read.is_finished(),
            written.is_finished(),
            synced.is_finished(),
            punched.is_finished(),
        ] {
            assert!(!task, "a held ring served a request");
        }
        assert_eq!(engine.kind(), EngineKind::Uring);
        break_rings(&engine).await;
        let (back, read) = read.await.unwrap();
        read.unwrap();
        assert_eq!(&back[..], &data[..8192]);
        written.await.unwrap().unwrap();
        synced.await.unwrap().unwrap();
        punched.await.unwrap().unwrap();
        let (back, read) = engine
            .read_exact_at(&file, 0, BytesMut::zeroed(16384))
            .await;
        read.unwrap();
        assert_eq!(&back[..8192], &data[..8192]);
        assert_eq!(&back[8192..12288], &more[..]);
        assert!(back[12288..].iter().all(|&b| b == 0));
        assert_eq!(engine.kind(), EngineKind::Threads);
    }

    #[tokio::test]
    async fn a_read_in_the_kernel_when_its_ring_fails_is_read_again_by_the_thread_pool() {
        let (engine, file, data) = uring_with_data(11, 16384).await;
        let uring = uring_of(&engine);
        uring.fail_after_submit_for_test();
        // Its buffer stays with the failed ring; the bytes come back in another.
        let (back, read) = engine
            .read_exact_at(&file, 0, BytesMut::zeroed(16384))
            .await;
        read.unwrap();
        assert_eq!(&back[..], &data[..]);
        assert!(!uring.lost_writes());
        assert_eq!(engine.kind(), EngineKind::Threads);
    }

    /// A read in the kernel with a write when their ring fails is read again by the thread
    /// pool, which takes reads over even when the ring lost writes.
    #[tokio::test]
    async fn a_read_in_the_kernel_with_a_lost_write_is_read_again_by_the_thread_pool() {
        // One ring, so that the read fails with the write its ring lost.
        let engine =
            IoEngine::new(Some(EngineKind::Uring), &engine_config(1)).expect("io_uring engine");
        let file = temp_file();
        let data = Bytes::from(Rng(12).bytes(16384));
        engine
            .write_all_at(&file, 0, data.clone(), false)
            .await
            .unwrap();
        let uring = uring_of(&engine);
        uring.hold_rings_for_test();
        let written = {
            let (engine, file) = (engine.clone(), Arc::clone(&file));
            let more = Bytes::from(vec![5u8; 4096]);
            tokio::spawn(async move { engine.write_all_at(&file, 16384, more, false).await })
        };
        let read = {
            let (engine, file) = (engine.clone(), Arc::clone(&file));
            tokio::spawn(async move {
                engine
                    .read_exact_at(&file, 0, BytesMut::zeroed(16384))
                    .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        uring.fail_after_submit_for_test();
        uring.release_rings_for_test();
        assert!(
            written.await.unwrap().is_err(),
            "a lost write reported success"
        );
        assert!(uring.lost_writes());
        let (back, read) = read.await.unwrap();
        read.expect("the read, read again by the thread pool");
        assert_eq!(&back[..], &data[..]);
    }

    #[tokio::test]
    async fn a_write_in_the_kernel_when_its_ring_fails_stops_every_write() {
        let engine = engines().remove(0);
        let file = temp_file();
        let uring = uring_of(&engine);
        uring.fail_after_submit_for_test();
        let written = engine
            .write_all_at(&file, 0, Bytes::from(vec![1u8; 4096]), false)
            .await;
        assert!(
            written.is_err(),
            "a write lost with its ring reported success"
        );
        // Found by the ring itself, not set by the test.
        assert!(uring.lost_writes());
        let again = engine
            .write_all_at(&file, 4096, Bytes::from(vec![2u8; 4096]), false)
            .await;
        assert!(again.is_err(), "a write went to another engine");
        assert_eq!(engine.kind(), EngineKind::Uring);
    }

    #[tokio::test]
    async fn a_ring_that_failed_with_writes_in_flight_is_not_replaced() {
        let engine = engines().remove(0);
        let file = temp_file();
        let uring = break_rings(&engine).await;
        // As if a write had been in the kernel: it may still land, so nothing takes over.
        uring.mark_lost_writes_for_test();
        let written = engine
            .write_all_at(&file, 0, Bytes::from(vec![1u8; 4096]), true)
            .await;
        assert!(written.is_err(), "a write went to another engine");
        assert_eq!(engine.kind(), EngineKind::Uring);
    }

    #[tokio::test]
    async fn after_a_ring_failed_with_writes_in_flight_no_path_writes() {
        let config = EngineConfig {
            ring_threads: 2,
            ring_entries: 32,
            // The inline page-cache paths too.
            inline_cached_io: true,
            ring_spin_us: 0,
        };
        let engine = IoEngine::new(Some(EngineKind::Uring), &config).expect("io_uring engine");
        let file = temp_file();
        let data = Bytes::from(vec![1u8; 4096]);
        engine
            .write_all_at(&file, 0, data.clone(), false)
            .await
            .unwrap();
        let uring = break_rings(&engine).await;
        uring.mark_lost_writes_for_test();
        for dsync in [false, true] {
            let written = engine
                .write_all_at(&file, 0, Bytes::from(vec![2u8; 4096]), dsync)
                .await;
            assert!(written.is_err(), "a write (dsync {dsync}) went through");
        }
        let direct = engine
            .write_all_at_direct(&file, 0, Bytes::from(vec![2u8; 4096]))
            .await;
        assert!(direct.is_err(), "a queued-only write went through");
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert!(engine.fallocate(&file, punch, 0, 4096).await.is_err());
        assert!(
            !engine.copies_inline_now(),
            "writes received in place would copy past the refusal"
        );
        // Reads and syncs are harmless: still served (the thread pool takes them over), the
        // data as the last completed write left it.
        let (back, read) = engine.read_exact_at(&file, 0, BytesMut::zeroed(4096)).await;
        read.unwrap();
        assert_eq!(&back[..], &data[..]);
        engine.fdatasync(&file).await.unwrap();
    }

    #[test]
    fn kind_display_and_parse_round_trip() {
        for kind in [EngineKind::Uring, EngineKind::Threads] {
            assert_eq!(kind.to_string().parse::<EngineKind>(), Ok(kind));
        }
        assert!("aio".parse::<EngineKind>().is_err());
    }

    #[test]
    fn engine_is_send_sync() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<IoEngine>();
    }

    #[test]
    fn forcing_uring_works_here() {
        let engine = IoEngine::new(Some(EngineKind::Uring), &EngineConfig::default())
            .expect("io_uring must be usable on the test machine");
        assert_eq!(engine.kind(), EngineKind::Uring);
        let auto = IoEngine::new(None, &EngineConfig::default()).expect("auto engine");
        assert_eq!(auto.kind(), EngineKind::Uring);
    }

    #[test]
    fn zero_ring_threads_is_an_error_not_a_panic() {
        let config = EngineConfig {
            ring_threads: 0,
            inline_cached_io: false,
            ring_spin_us: 0,
            ring_entries: 8,
        };
        assert!(IoEngine::new(Some(EngineKind::Uring), &config).is_err());
        let auto = IoEngine::new(None, &config).expect("auto falls back");
        assert_eq!(auto.kind(), EngineKind::Threads);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn write_then_read_back_patterns() {
        for engine in engines() {
            let file = temp_file();
            let mut rng = Rng(0x1234_5678_9abc_def1);
            let mut model = vec![0u8; 3 << 20];
            for _ in 0..64 {
                let len = 1 + (rng.next() % 70_000) as usize;
                let offset = (rng.next() as usize) % (model.len() - len);
                let data = rng.bytes(len);
                let dsync = rng.next() & 3 == 0;
                engine
                    .write_all_at(&file, offset as u64, Bytes::from(data.clone()), dsync)
                    .await
                    .expect("write");
                model[offset..offset + len].copy_from_slice(&data);
            }
            let written_len = file.metadata().expect("metadata").len() as usize;
            for _ in 0..64 {
                let len = 1 + (rng.next() % 70_000) as usize;
                let offset = (rng.next() as usize) % (model.len() - len);
                let (buf, result) = engine
                    .read_exact_at(&file, offset as u64, BytesMut::zeroed(len))
                    .await;
                result.expect("read");
                assert_eq!(&buf[..], &model[offset..offset + len], "{}", engine.kind());

                let (buf, result) = engine
                    .read_at(&file, offset as u64, BytesMut::zeroed(len))
                    .await;
                let n_bytes = result.expect("read_at");
                assert_eq!(n_bytes, len.min(written_len.saturating_sub(offset)));
                assert_eq!(&buf[..n_bytes], &model[offset..offset + n_bytes]);
            }
        }
    }

    #[test]
    fn pieces_end_at_multiples_of_their_size() {
        let piece = Pieces::Of(128 << 10);
        assert_eq!(Pieces::Whole.next_len(5, 3 << 20), 3 << 20);
        assert_eq!(piece.next_len(0, 3 << 20), 128 << 10);
        assert_eq!(piece.next_len(4096, 3 << 20), (128 << 10) - 4096);
        assert_eq!(piece.next_len(4096, 1000), 1000);
        assert_eq!(piece.next_len(128 << 10, 128 << 10), 128 << 10);
        // Walking a write piece by piece covers it exactly, every piece but the last ending
        // on a boundary.
        let (offset, len) = ((7 << 20) + 12_345u64, (2 << 20) + 777usize);
        let mut done = 0;
        while done < len {
            let at = offset + done as u64;
            let n = piece.next_len(at, len - done);
            assert!(n > 0 && n <= 128 << 10);
            done += n;
            assert!(done == len || (offset + done as u64).is_multiple_of(128 << 10));
        }
        assert_eq!(done, len);
    }

    /// Writes larger than a piece, at unaligned offsets and many at once, read back exactly
    /// from both engines; the ring's in-flight table is tiny, so writes wait for their next
    /// piece while others queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn large_writes_in_pieces_read_back_exactly() {
        // The ring thread sleeping between requests, and polling for them first.
        let setups = [
            (EngineKind::Uring, 0),
            (EngineKind::Uring, 50),
            (EngineKind::Threads, 0),
        ];
        for (kind, ring_spin_us) in setups {
            let config = EngineConfig {
                ring_threads: 1,
                ring_entries: 4,
                inline_cached_io: true,
                ring_spin_us,
            };
            let engine = IoEngine::new(Some(kind), &config).expect("engine");
            let file = temp_file();
            let mut rng = Rng(0x0bad_cafe_f00d_0001);
            let region_bytes = 3 << 20;
            let mut model = vec![0u8; 8 * region_bytes];
            let mut writes = Vec::new();
            for region in 0..8 {
                let len = MAX_CACHED_WRITE_PIECE_BYTES + 1 + (rng.next() % (2 << 20)) as usize;
                let offset = region * region_bytes + (rng.next() as usize) % (region_bytes - len);
                let data = rng.bytes(len);
                model[offset..offset + len].copy_from_slice(&data);
                let (engine, file) = (engine.clone(), Arc::clone(&file));
                // Half of them through `write_all_at_here`: copied on the caller's thread
                // (unless slow writes pause that, when the engine takes them).
                writes.push(tokio::spawn(async move {
                    let data = Bytes::from(data);
                    if region % 2 == 0 {
                        engine.write_all_at(&file, offset as u64, data, false).await
                    } else {
                        engine
                            .write_all_at_here(&file, offset as u64, data, false)
                            .await
                    }
                }));
            }
            for write in writes {
                write.await.expect("task").expect("write");
            }
            let (back, read) = engine
                .read_exact_at(&file, 0, BytesMut::zeroed(model.len()))
                .await;
            read.expect("read");
            assert!(
                back[..] == model[..],
                "{kind}: the file differs from the writes"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_large_write_to_a_read_only_file_fails_cleanly() {
        let inline = EngineConfig {
            inline_cached_io: true,
            ..EngineConfig::default()
        };
        let inline_engine = IoEngine::new(Some(EngineKind::Uring), &inline).expect("engine");
        for (engine, here) in engines()
            .into_iter()
            .map(|engine| (engine, false))
            .chain([(inline_engine, true)])
        {
            let path = tempfile::NamedTempFile::new().expect("tempfile");
            let file = Arc::new(File::open(path.path()).expect("open read-only"));
            let data = Bytes::from(vec![7u8; 3 * MAX_CACHED_WRITE_PIECE_BYTES + 5]);
            let written = if here {
                engine.write_all_at_here(&file, 4096, data, false).await
            } else {
                engine.write_all_at(&file, 4096, data, false).await
            };
            let err = written.expect_err("a read-only file takes no write");
            assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{}", engine.kind());
        }
    }

    /// A large write copied on the caller's thread needs no engine thread; once slow writes
    /// have paused inline writes, the engine takes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_writes_here_skip_the_engine_until_inline_writes_pause() {
        let config = EngineConfig {
            ring_threads: 1,
            inline_cached_io: true,
            ..EngineConfig::default()
        };
        let engine = IoEngine::new(Some(EngineKind::Uring), &config).expect("engine");
        // As on ext4: the blocking writes `InlineWrites` guards, not RWF_NOWAIT ones, and
        // never paused by a slow write on a busy machine until the test says so.
        engine.nowait.refuse_writes_for_test();
        engine.inline_writes.ignore_slow_writes_for_test();
        let uring = uring_of(&engine);
        uring.hold_rings_for_test();
        let file = temp_file();
        let first = Rng(21).bytes(MAX_CACHED_WRITE_PIECE_BYTES * 8 + 4097);
        let at = 4096 + 3;
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            engine.write_all_at_here(&file, at, Bytes::from(first.clone()), false),
        )
        .await
        .expect("copied here, not queued to the held ring")
        .expect("write");
        let mut back = vec![0u8; first.len()];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut back, at).expect("read");
        assert!(back == first, "the write copied here differs");
        assert_eq!(
            engine.copied_here_bytes().get(),
            first.len() as u64,
            "bytes counted as copied here"
        );

        engine.inline_writes.pause_for_test();
        let second = Rng(22).bytes(MAX_CACHED_WRITE_PIECE_BYTES * 3);
        let queued = {
            let (engine, file, data) = (engine.clone(), Arc::clone(&file), second.clone());
            tokio::spawn(async move {
                engine
                    .write_all_at_here(&file, 1 << 20, Bytes::from(data), false)
                    .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !queued.is_finished(),
            "written here while inline writes were paused"
        );
        // The ring fails; the thread pool serves what was queued for it.
        break_rings(&engine).await;
        queued.await.expect("task").expect("write");
        let mut back = vec![0u8; second.len()];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut back, 1 << 20).expect("read");
        assert!(back == second, "the write queued to the engine differs");
        assert_eq!(
            engine.copied_here_bytes().get(),
            first.len() as u64,
            "a queued write counted as copied here"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn read_exact_past_eof_zero_fills() {
        for engine in engines() {
            let file = temp_file();
            engine
                .write_all_at(&file, 0, Bytes::from_static(&[0xAB; 1000]), false)
                .await
                .expect("write");
            // Stale non-zero contents must be overwritten, not left behind.
            let (buf, result) = engine
                .read_exact_at(&file, 500, BytesMut::from(&[0xFF; 4096][..]))
                .await;
            result.expect("read");
            assert!(buf[..500].iter().all(|&b| b == 0xAB));
            assert!(buf[500..].iter().all(|&b| b == 0));

            let (buf, result) = engine
                .read_exact_at(&file, 1 << 30, BytesMut::from(&[0xFF; 512][..]))
                .await;
            result.expect("read far past eof");
            assert!(buf.iter().all(|&b| b == 0));

            let (buf, result) = engine.read_at(&file, 1 << 30, BytesMut::zeroed(512)).await;
            assert_eq!(result.expect("read_at past eof"), 0);
            assert_eq!(buf.len(), 512);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_concurrent_ops_complete() {
        const TASKS: usize = 8;
        const BLOCKS_PER_TASK: usize = 64;
        const BLOCK_BYTES: usize = 4096;
        for iteration in 0..5u8 {
            for engine in engines() {
                let file = temp_file();
                let mut handles = Vec::new();
                for task in 0..TASKS {
                    let engine = engine.clone();
                    let file = file.clone();
                    handles.push(tokio::spawn(async move {
                        // Writes are issued concurrently within a task too, so each ring
                        // sees bursts larger than its in-flight cap.
                        let mut writes = tokio::task::JoinSet::new();
                        for block in 0..BLOCKS_PER_TASK {
                            let engine = engine.clone();
                            let file = file.clone();
                            let index = task * BLOCKS_PER_TASK + block;
                            writes.spawn(async move {
                                let fill = (index as u8) ^ iteration;
                                let offset = (index * BLOCK_BYTES) as u64;
                                let data = Bytes::from(vec![fill; BLOCK_BYTES]);
                                engine.write_all_at(&file, offset, data, false).await
                            });
                        }
                        while let Some(result) = writes.join_next().await {
                            result.expect("join").expect("write");
                        }
                        for block in 0..BLOCKS_PER_TASK {
                            let index = task * BLOCKS_PER_TASK + block;
                            let offset = (index * BLOCK_BYTES) as u64;
                            let (buf, result) = engine
                                .read_exact_at(&file, offset, BytesMut::zeroed(BLOCK_BYTES))
                                .await;
                            result.expect("read");
                            let fill = (index as u8) ^ iteration;
                            assert!(buf.iter().all(|&b| b == fill));
                        }
                        engine.fdatasync(&file).await.expect("fdatasync");
                    }));
                }
                for handle in handles {
                    handle.await.expect("task");
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn punch_hole_reads_zeros() {
        for engine in engines() {
            let file = temp_file();
            engine
                .write_all_at(&file, 0, Bytes::from(vec![0x5A; 64 * 1024]), false)
                .await
                .expect("write");
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            engine
                .fallocate(&file, mode, 16 * 1024, 16 * 1024)
                .await
                .expect("punch hole");
            assert_eq!(file.metadata().expect("metadata").len(), 64 * 1024);
            let (buf, result) = engine
                .read_exact_at(&file, 0, BytesMut::zeroed(64 * 1024))
                .await;
            result.expect("read");
            assert!(buf[..16 * 1024].iter().all(|&b| b == 0x5A));
            assert!(buf[16 * 1024..32 * 1024].iter().all(|&b| b == 0));
            assert!(buf[32 * 1024..].iter().all(|&b| b == 0x5A));

            engine
                .fallocate(&file, 0, 0, 1 << 20)
                .await
                .expect("preallocate");
            assert_eq!(file.metadata().expect("metadata").len(), 1 << 20);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn syncs_succeed() {
        for engine in engines() {
            let file = temp_file();
            engine
                .write_all_at(&file, 0, Bytes::from_static(b"hello"), true)
                .await
                .expect("dsync write");
            engine.fdatasync(&file).await.expect("fdatasync");
            engine.fsync(&file).await.expect("fsync");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn errors_are_reported_not_panicked() {
        for engine in engines() {
            let file = temp_file();
            let (_, result) = engine.read_at(&file, u64::MAX, BytesMut::zeroed(8)).await;
            assert_eq!(
                result.expect_err("offset").kind(),
                io::ErrorKind::InvalidInput
            );

            // A read-only handle makes the kernel itself fail the write.
            let path = tempfile::NamedTempFile::new().expect("tempfile");
            let read_only = Arc::new(File::open(path.path()).expect("open"));
            let err = engine
                .write_at(&read_only, 0, Bytes::from_static(b"x"), false)
                .await
                .expect_err("write to read-only fd");
            assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{}", engine.kind());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn dropped_read_future_is_harmless() {
        for engine in engines() {
            let file = temp_file();
            let len = 8 << 20;
            engine
                .write_all_at(&file, 0, Bytes::from(vec![7u8; len]), false)
                .await
                .expect("write");
            for _ in 0..16 {
                let mut read = pin!(engine.read_at(&file, 0, BytesMut::zeroed(len)));
                let mut cx = Context::from_waker(Waker::noop());
                // One poll submits the read; dropping the future then abandons it mid-flight.
                if let Poll::Ready((_, result)) = read.as_mut().poll(&mut cx) {
                    result.expect("read");
                }
            }
            let (buf, result) = engine.read_exact_at(&file, 0, BytesMut::zeroed(len)).await;
            result.expect("read after drops");
            assert!(buf.iter().all(|&b| b == 7));
        }
    }
}
