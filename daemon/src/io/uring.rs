//! io_uring engine: each ring is owned by one dedicated thread that submits requests arriving
//! over a bounded channel and hands completions back to tokio through oneshot channels.
//!
//! Buffers and files travel with the request into the thread's in-flight table and are only
//! released after the kernel's completion has been reaped, so an abandoned (dropped) future
//! can never free memory the kernel is still reading or writing.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::{EngineConfig, EngineError, Pieces};

/// Requests queued per ring (channel + in flight). Bounds memory held by waiting requests;
/// callers beyond this wait asynchronously on the semaphore.
const QUEUE_CAPACITY_PER_RING: usize = 4096;

/// user_data of the eventfd read; no request's user_data (see `UserData`) reaches it, since
/// slot indices stay below the kernel's SQ limit of 32768.
const EVENTFD_TOKEN: u64 = u64::MAX;

/// At most this many pieces of a write go to the kernel as one chain of linked SQEs. A chain
/// must fit in the SQ at once (split over two submissions it would become two chains), and the
/// ring's SQ may be tiny (tests use 4).
const MAX_LINKED_PIECES: usize = 16;

/// Back-off when the kernel reports a transient resource shortage with nothing to reap.
const ENTER_RETRY_DELAY: Duration = Duration::from_millis(1);

pub(crate) struct UringEngine {
    rings: Vec<RingHandle>,
    next_ring: AtomicUsize,
}

impl UringEngine {
    pub(crate) fn new(config: &EngineConfig) -> Result<Self, EngineError> {
        Self::with_queue_capacity(config, QUEUE_CAPACITY_PER_RING)
    }

    fn with_queue_capacity(
        config: &EngineConfig,
        queue_capacity: usize,
    ) -> Result<Self, EngineError> {
        if config.ring_threads == 0 {
            return Err(EngineError::InvalidConfig(
                "ring_threads must be at least 1".into(),
            ));
        }
        if config.ring_entries == 0 {
            return Err(EngineError::InvalidConfig(
                "ring_entries must be at least 1".into(),
            ));
        }
        let mut rings = Vec::with_capacity(config.ring_threads);
        for index in 0..config.ring_threads {
            // On error, rings already started are shut down by RingHandle's Drop.
            rings.push(RingHandle::spawn(
                index,
                config.ring_entries,
                queue_capacity,
                Duration::from_micros(config.ring_spin_us),
            )?);
        }
        Ok(UringEngine {
            rings,
            next_ring: AtomicUsize::new(0),
        })
    }

    pub(crate) async fn read_into(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: BytesMut,
        buf_start: usize,
    ) -> (BytesMut, io::Result<usize>) {
        let op = Op::Read {
            buf,
            buf_start,
            offset,
        };
        let reply = self.submit(file, op).await;
        (reply.buf.unwrap_or_default(), reply.result)
    }

    pub(crate) async fn write_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: Bytes,
        dsync: bool,
        pieces: Pieces,
    ) -> io::Result<usize> {
        let op = Op::Write {
            data,
            offset,
            dsync,
            pieces,
            written_bytes: 0,
            chain_pieces: 0,
        };
        self.submit(file, op).await.result
    }

    pub(crate) async fn sync(&self, file: &Arc<File>, datasync: bool) -> io::Result<()> {
        self.submit(file, Op::Sync { datasync })
            .await
            .result
            .map(drop)
    }

    pub(crate) async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let op = Op::Fallocate {
            mode,
            offset,
            len_bytes: len,
        };
        self.submit(file, op).await.result.map(drop)
    }

    /// Whether a ring has failed (`RingWorker::fail_everything` closed its queue): every
    /// request sent to it from then on fails.
    pub(crate) fn is_broken(&self) -> bool {
        self.rings
            .iter()
            .any(|ring| ring.shared.queue_permits.is_closed())
    }

    /// Whether a failed ring had writes or fallocates in the kernel when it failed. Nothing
    /// says when those end: one could land after a later write to the same blocks and undo it,
    /// so no other engine may take over.
    pub(crate) fn lost_writes(&self) -> bool {
        self.rings
            .iter()
            .any(|ring| ring.shared.lost_writes.load(Ordering::SeqCst))
    }

    /// Marks the failed rings as having had writes in flight, for tests of what follows.
    #[cfg(test)]
    pub(crate) fn mark_lost_writes_for_test(&self) {
        for ring in &self.rings {
            ring.shared.lost_writes.store(true, Ordering::SeqCst);
        }
    }

    #[cfg(test)]
    pub(crate) fn stale_completions(&self) -> u64 {
        self.rings
            .iter()
            .map(|ring| ring.shared.stale_completions.load(Ordering::Relaxed))
            .sum()
    }

    /// Keeps every ring from taking requests off its channel until it is broken, for tests of
    /// requests queued when a ring fails.
    #[cfg(test)]
    pub(crate) fn hold_rings_for_test(&self) {
        for ring in &self.rings {
            ring.shared.held.store(true, Ordering::SeqCst);
        }
    }

    /// Lets held rings take their requests again (see [`UringEngine::hold_rings_for_test`]).
    #[cfg(test)]
    pub(crate) fn release_rings_for_test(&self) {
        for ring in &self.rings {
            ring.shared.held.store(false, Ordering::SeqCst);
            ring.shared.wake();
        }
    }

    /// Makes every ring fail as soon as it has handed requests to the kernel, for tests of
    /// requests in flight when a ring fails.
    #[cfg(test)]
    pub(crate) fn fail_after_submit_for_test(&self) {
        for ring in &self.rings {
            ring.shared.fail_after_submit.store(true, Ordering::SeqCst);
        }
    }

    /// Makes every ring fail as if the kernel had refused it, for tests of what follows.
    #[cfg(test)]
    pub(crate) fn break_rings_for_test(&self) {
        for ring in &self.rings {
            ring.shared.poisoned.store(true, Ordering::SeqCst);
            ring.shared.wake();
        }
    }

    async fn submit(&self, file: &Arc<File>, op: Op) -> Reply {
        // Round-robin is enough: ops on one file need no ordering between rings, because the
        // NBD layer only promises flushes cover writes that had already completed.
        let index = self.next_ring.fetch_add(1, Ordering::Relaxed) % self.rings.len();
        match self.rings.get(index) {
            Some(ring) => ring.submit(file, op).await,
            None => Reply::failed(op, engine_closed()),
        }
    }
}

/// Producer-side handle to one ring thread.
struct RingHandle {
    /// Only `None` while dropping; taking it disconnects the channel to stop the thread.
    requests: Option<SyncSender<Request>>,
    shared: Arc<RingShared>,
    thread: Option<JoinHandle<()>>,
}

/// State shared between producers and one ring thread.
struct RingShared {
    /// Set by the ring thread just before it may block in the kernel; see `RingWorker::run`.
    sleeping: AtomicBool,
    /// How long the ring thread polls for more work before it sleeps.
    spin_before_sleep: Duration,
    wake_fd: OwnedFd,
    /// One permit per request queued or in flight; sized to the channel capacity so a send
    /// after acquiring a permit never finds the channel full.
    queue_permits: Arc<Semaphore>,
    /// Set when the ring failed with writes or fallocates in flight (before the queue closes).
    lost_writes: AtomicBool,
    /// Completions that matched no request in flight (see `UserData`); logged as errors.
    stale_completions: AtomicU64,
    /// Set by a test to make the ring thread fail.
    #[cfg(test)]
    poisoned: AtomicBool,
    /// Set by a test to keep requests in the channel.
    #[cfg(test)]
    held: AtomicBool,
    /// Set by a test to make the ring thread fail once it has handed requests to the kernel,
    /// before it reaps them.
    #[cfg(test)]
    fail_after_submit: AtomicBool,
}

impl RingShared {
    fn wake_if_sleeping(&self) {
        // Pairs with the fence in `RingWorker::run`; see the lost-wakeup argument there.
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }

    fn wake(&self) {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a live local u64 to an eventfd owned by `self`.
            let written = unsafe {
                libc::write(
                    self.wake_fd.as_raw_fd(),
                    (&one as *const u64).cast::<libc::c_void>(),
                    std::mem::size_of::<u64>(),
                )
            };
            if written >= 0 {
                return;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                // Only possible if the counter is near u64::MAX, i.e. already signalled.
                tracing::error!(error = %err, "waking io_uring thread failed");
                return;
            }
        }
    }
}

impl RingHandle {
    fn spawn(
        index: usize,
        ring_entries: u32,
        queue_capacity: usize,
        spin_before_sleep: Duration,
    ) -> Result<Self, EngineError> {
        // SAFETY: eventfd takes no pointers; the returned descriptor is checked below.
        let raw_fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw_fd < 0 {
            return Err(EngineError::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: `raw_fd` is a freshly created descriptor that nothing else owns.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(raw_fd) };
        let shared = Arc::new(RingShared {
            sleeping: AtomicBool::new(false),
            spin_before_sleep,
            wake_fd,
            queue_permits: Arc::new(Semaphore::new(queue_capacity)),
            lost_writes: AtomicBool::new(false),
            stale_completions: AtomicU64::new(0),
            #[cfg(test)]
            poisoned: AtomicBool::new(false),
            #[cfg(test)]
            held: AtomicBool::new(false),
            #[cfg(test)]
            fail_after_submit: AtomicBool::new(false),
        });
        let (requests, request_rx) = mpsc::sync_channel(queue_capacity);
        let (setup_tx, setup_rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("evsd-uring-{index}"))
            .spawn(move || ring_thread_main(ring_entries, request_rx, thread_shared, setup_tx))
            .map_err(EngineError::ThreadSpawn)?;
        let handle = RingHandle {
            requests: Some(requests),
            shared,
            thread: Some(thread),
        };
        // The ring has to be created on its own thread (SINGLE_ISSUER ties it to the creating
        // task), so setup errors come back over a channel.
        match setup_rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(err)) => Err(err),
            Err(mpsc::RecvError) => Err(EngineError::ThreadSpawn(io::Error::other(
                "io_uring thread exited during setup",
            ))),
        }
    }

    async fn submit(&self, file: &Arc<File>, op: Op) -> Reply {
        let Some(requests) = &self.requests else {
            return Reply::failed(op, engine_closed());
        };
        // Waiting here (not in a blocking send) is the back-pressure that keeps tokio workers
        // free when the disk falls behind.
        let permit = match Arc::clone(&self.shared.queue_permits).acquire_owned().await {
            Ok(permit) => permit,
            // Closed only by `fail_everything`: the ring has failed.
            Err(_) => {
                let err = ring_failed(io::ErrorKind::BrokenPipe, "io_uring ring failed".into());
                return Reply::failed(op, err);
            }
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        let request = Request {
            file: Arc::clone(file),
            op,
            reply: reply_tx,
            _permit: permit,
        };
        if let Err(err) = requests.try_send(request) {
            // Full cannot happen while permits match the channel capacity; either way the
            // request never reached the thread, so its buffer can be handed back, and another
            // engine may serve it (the thread is gone: its ring failed, or the engine stops).
            let (TrySendError::Full(request) | TrySendError::Disconnected(request)) = err;
            let err = ring_failed(io::ErrorKind::BrokenPipe, "io_uring ring is gone".into());
            return Reply::failed(request.op, err);
        }
        self.shared.wake_if_sleeping();
        reply_rx.await.unwrap_or_else(|_| Reply {
            buf: None,
            result: Err(engine_closed()),
        })
    }
}

impl Drop for RingHandle {
    fn drop(&mut self) {
        // A test that failed while holding the ring must not hang in the join below.
        #[cfg(test)]
        self.shared.held.store(false, Ordering::SeqCst);
        drop(self.requests.take());
        // The thread may already be asleep with its recheck done; the eventfd counter stays
        // set until read, so this wake cannot be lost and it will observe the disconnect.
        self.shared.wake();
        if let Some(thread) = self.thread.take() {
            // Joining blocks the dropping thread until orphaned in-flight ops finish, which
            // guarantees no write is still in the kernel once the engine is gone.
            if thread.join().is_err() {
                tracing::error!("io_uring thread panicked");
            }
        }
    }
}

enum Op {
    Read {
        buf: BytesMut,
        buf_start: usize,
        offset: u64,
    },
    Write {
        data: Bytes,
        offset: u64,
        dsync: bool,
        /// Written in pieces: up to `MAX_LINKED_PIECES` of them go to the kernel as a chain of
        /// linked SQEs that answers with one completion (see `Request::sqes`); the ring thread
        /// submits the next chain when one completes, and answers once, when all are written or
        /// a piece comes back short or failed.
        pieces: Pieces,
        /// What the chains completed so far wrote.
        written_bytes: usize,
        /// Pieces in the chain now in the kernel.
        chain_pieces: usize,
    },
    Sync {
        datasync: bool,
    },
    Fallocate {
        mode: i32,
        offset: u64,
        len_bytes: u64,
    },
}

struct Request {
    file: Arc<File>,
    op: Op,
    reply: oneshot::Sender<Reply>,
    /// Released on drop, i.e. only once the request has fully left the engine.
    _permit: OwnedSemaphorePermit,
}

/// What follows a request's completion (see `Request::next_piece`).
enum AfterCompletion {
    /// Submit it again, for its next chain of pieces.
    Again(Request),
    /// Keep it in its slot: more of its chain is in the kernel.
    Wait(Request),
    /// Answer it with this result.
    Answer(Request, io::Result<usize>),
}

struct Reply {
    /// The read buffer, handed back to the caller; `None` for other ops.
    buf: Option<BytesMut>,
    result: io::Result<usize>,
}

impl Reply {
    fn failed(op: Op, err: io::Error) -> Reply {
        let buf = match op {
            Op::Read { buf, .. } => Some(buf),
            _ => None,
        };
        Reply {
            buf,
            result: Err(err),
        }
    }
}

impl Request {
    /// After the completion of piece `piece` of the request's chain: the request back if it is
    /// a write with pieces still to write (the chain completed whole), else the result to answer
    /// with. A chain answers once: with its last piece when every piece was written in full
    /// (the others skip their completions), or with the first piece that came back short or
    /// failed, which cancels the rest without completions of their own. A piece that failed
    /// after others were written answers with what was written: the caller's loop resumes
    /// there and meets the error itself.
    fn next_piece(mut self, piece: usize, result: io::Result<usize>) -> AfterCompletion {
        let Op::Write {
            data,
            offset,
            pieces: pieces @ Pieces::Of(_),
            written_bytes,
            chain_pieces,
            ..
        } = &mut self.op
        else {
            return AfterCompletion::Answer(self, result);
        };
        // What the chain's pieces before this one wrote, in full.
        let mut before = *written_bytes;
        for _ in 0..piece.min(*chain_pieces) {
            before += pieces.next_len(*offset + before as u64, data.len() - before);
        }
        let asked = pieces.next_len(*offset + before as u64, data.len() - before);
        let last = piece + 1 >= *chain_pieces;
        match result {
            // A completion the chain asked the kernel to skip: the pieces after this one may
            // still be running, so the request keeps its slot (and buffer) until the last.
            Ok(n) if n == asked && !last => AfterCompletion::Wait(self),
            Ok(n) if n == asked && last && before + n < data.len() => {
                *written_bytes = before + n;
                AfterCompletion::Again(self)
            }
            Ok(n) => AfterCompletion::Answer(self, Ok(before + n)),
            Err(_) if before > 0 => AfterCompletion::Answer(self, Ok(before)),
            Err(e) => AfterCompletion::Answer(self, Err(e)),
        }
    }

    /// Must only be called once the kernel no longer references the request's buffer.
    fn complete(self, result: io::Result<usize>) {
        let Request { op, reply, .. } = self;
        let buf = match op {
            Op::Read { buf, .. } => Some(buf),
            _ => None,
        };
        // A send error means the caller gave up; the buffer is simply dropped here.
        let _ = reply.send(Reply { buf, result });
    }

    /// The request's SQEs, into `chain` (empty on entry): one, or for a write in pieces a chain
    /// of up to `max_linked` (at least one) pieces, each linked to the next and skipping its
    /// completion when it succeeds, so that the chain completes once (see `next_piece`). The
    /// kernel runs a chain's pieces one after another, on one of its workers where the
    /// filesystem has no non-blocking buffered writes, without a trip back to this thread.
    fn sqes(&mut self, max_linked: usize, chain: &mut Vec<squeue::Entry>) {
        let fd = types::Fd(self.file.as_raw_fd());
        if let Op::Write {
            data,
            offset,
            dsync,
            pieces: pieces @ Pieces::Of(_),
            written_bytes,
            chain_pieces,
        } = &mut self.op
        {
            let mut at_bytes = *written_bytes;
            while at_bytes < data.len() && chain.len() < max_linked {
                let at = *offset + at_bytes as u64;
                let len = pieces.next_len(at, data.len() - at_bytes);
                let piece = data.get(at_bytes..at_bytes + len).unwrap_or_default();
                let entry = opcode::Write::new(fd, piece.as_ptr(), clamp_len(len))
                    .offset(at)
                    .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
                    .build();
                chain.push(entry);
                at_bytes += len;
            }
            *chain_pieces = chain.len();
            let linked = chain.len().saturating_sub(1);
            for entry in chain.iter_mut().take(linked) {
                *entry = entry
                    .clone()
                    .flags(squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS);
            }
            return;
        }
        chain.push(self.sqe(fd));
    }

    fn sqe(&mut self, fd: types::Fd) -> squeue::Entry {
        match &mut self.op {
            Op::Read {
                buf,
                buf_start,
                offset,
            } => {
                let dst = buf.get_mut(*buf_start..).unwrap_or_default();
                opcode::Read::new(fd, dst.as_mut_ptr(), clamp_len(dst.len()))
                    .offset(*offset)
                    .build()
            }
            // Whole: writes in pieces are built by `sqes`.
            Op::Write {
                data,
                offset,
                dsync,
                ..
            } => opcode::Write::new(fd, data.as_ptr(), clamp_len(data.len()))
                .offset(*offset)
                .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            Op::Sync { datasync } => {
                let flags = if *datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(fd).flags(flags).build()
            }
            Op::Fallocate {
                mode,
                offset,
                len_bytes,
            } => opcode::Fallocate::new(fd, *len_bytes)
                .offset(*offset)
                .mode(*mode)
                .build(),
        }
    }
}

/// Larger transfers become short reads/writes, which the `*_exact`/`*_all` loops resume.
fn clamp_len(len_bytes: usize) -> u32 {
    u32::try_from(len_bytes).unwrap_or(u32::MAX)
}

fn engine_closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "io_uring engine has shut down")
}

/// Why a request failed with its ring. Before the kernel saw it (`in_kernel` false), sending it
/// to another engine cannot undo or hide anything. A read the kernel had (`in_kernel` true)
/// comes back without its buffer, which is leaked with the ring since the kernel may still write
/// into it; reading changes nothing, so it may run again elsewhere, into another buffer.
#[derive(Debug)]
struct RingFailed {
    reason: String,
    in_kernel: bool,
}

impl std::fmt::Display for RingFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.reason)
    }
}

impl std::error::Error for RingFailed {}

fn ring_failed(kind: io::ErrorKind, reason: String) -> io::Error {
    io::Error::new(
        kind,
        RingFailed {
            reason,
            in_kernel: false,
        },
    )
}

fn ring_failure(err: &io::Error) -> Option<&RingFailed> {
    err.get_ref().and_then(|e| e.downcast_ref::<RingFailed>())
}

/// Whether `err` is a request's failure with its ring before the kernel saw it, which another
/// engine may serve again with the same buffer (see `RingFailed`).
pub(crate) fn may_retry_elsewhere(err: &io::Error) -> bool {
    ring_failure(err).is_some_and(|f| !f.in_kernel)
}

/// Whether `err` is a read's failure with its ring while the kernel had it (see `RingFailed`):
/// it came back without its bytes, and only a new buffer can retry it.
pub(crate) fn read_lost_with_ring(err: &io::Error) -> bool {
    ring_failure(err).is_some_and(|f| f.in_kernel)
}

fn ring_thread_main(
    ring_entries: u32,
    requests: Receiver<Request>,
    shared: Arc<RingShared>,
    setup_tx: mpsc::Sender<Result<(), EngineError>>,
) {
    let mut worker = match RingWorker::new(ring_entries, requests, shared) {
        Ok(worker) => worker,
        Err(err) => {
            let _ = setup_tx.send(Err(err));
            return;
        }
    };
    let _ = setup_tx.send(Ok(()));
    // A panic must not unwind through the worker: dropping it would free buffers the kernel
    // may still be writing into (requests in flight). Nothing here is known to panic; if
    // something does, the process ends at once, as a crash would, losing no flushed write.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
    match ran {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            worker.fail_everything(&err);
            worker.refuse_late_requests(&err);
        }
        Err(_) => {
            tracing::error!("an io_uring ring thread panicked with requests in flight; aborting");
            std::process::abort();
        }
    }
}

fn build_ring(ring_entries: u32) -> Result<IoUring, EngineError> {
    let tuned = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(ring_entries);
    match tuned {
        Ok(ring) => Ok(ring),
        Err(err) => {
            // Both flags are optimisations (kernels >= 6.0 / 5.19); older kernels say EINVAL.
            tracing::debug!(error = %err, "io_uring setup flags refused, using a plain ring");
            IoUring::new(ring_entries).map_err(EngineError::RingSetup)
        }
    }
}

fn probe_opcodes(ring: &IoUring) -> Result<(), EngineError> {
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(EngineError::Probe)?;
    let needed = [
        (opcode::Read::CODE, "IORING_OP_READ"),
        (opcode::Write::CODE, "IORING_OP_WRITE"),
        (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
        (opcode::Fallocate::CODE, "IORING_OP_FALLOCATE"),
    ];
    match needed.iter().find(|(code, _)| !probe.is_supported(*code)) {
        Some((_, name)) => Err(EngineError::Unsupported((*name).to_string())),
        None => Ok(()),
    }
}

/// What a request's SQEs carry as user_data: its slot, which piece of its chain, and the
/// slot's generation, so that a completion the kernel posts after the request was answered
/// (it cannot, by the rules of linked SQEs, but a mistake there must not answer whichever
/// request took the slot next, and free its buffer under the kernel) is recognised as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UserData {
    slot: usize,
    piece: usize,
    generation: u32,
}

impl UserData {
    const SLOT_BITS: u32 = 16;
    const MASK: u64 = (1 << Self::SLOT_BITS) - 1;

    fn encode(self) -> u64 {
        (u64::from(self.generation) << 32)
            | ((self.piece as u64 & Self::MASK) << Self::SLOT_BITS)
            | (self.slot as u64 & Self::MASK)
    }

    fn decode(user_data: u64) -> UserData {
        UserData {
            slot: (user_data & Self::MASK) as usize,
            piece: ((user_data >> Self::SLOT_BITS) & Self::MASK) as usize,
            generation: (user_data >> 32) as u32,
        }
    }
}

/// In-flight requests keyed by their io_uring user_data (see `UserData`).
struct Slots {
    entries: Vec<Option<Request>>,
    generations: Vec<u32>,
    free: Vec<usize>,
}

impl Slots {
    fn new(capacity: usize) -> Self {
        Slots {
            entries: (0..capacity).map(|_| None).collect(),
            generations: vec![0; capacity],
            free: (0..capacity).rev().collect(),
        }
    }

    fn in_flight(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    /// The request's place, and the user_data of its first SQE.
    fn insert(&mut self, request: Request) -> Result<(UserData, &mut Request), Request> {
        let Some(index) = self.free.pop() else {
            return Err(request);
        };
        let (Some(slot), Some(generation)) =
            (self.entries.get_mut(index), self.generations.get_mut(index))
        else {
            return Err(request);
        };
        *generation = generation.wrapping_add(1);
        let user_data = UserData {
            slot: index,
            piece: 0,
            generation: *generation,
        };
        Ok((user_data, slot.insert(request)))
    }

    /// Puts back a request `remove` took out, under the same user_data.
    fn restore(&mut self, user_data: UserData, request: Request) {
        if let Some(slot) = self.entries.get_mut(user_data.slot) {
            *slot = Some(request);
            self.free.retain(|&free| free != user_data.slot);
        }
    }

    /// The request a completion belongs to, out of its slot; None for an unknown or stale one.
    fn remove(&mut self, user_data: UserData) -> Option<Request> {
        if self.generations.get(user_data.slot) != Some(&user_data.generation) {
            return None;
        }
        let request = self.entries.get_mut(user_data.slot)?.take()?;
        self.free.push(user_data.slot);
        Some(request)
    }
}

/// Owns one ring; lives entirely on its thread.
struct RingWorker {
    ring: IoUring,
    requests: Receiver<Request>,
    shared: Arc<RingShared>,
    slots: Slots,
    /// Heap target of the armed eventfd read. A raw allocation rather than a Box field because
    /// the kernel writes it behind Rust's back while the read is armed.
    wake_buf: *mut u64,
    wake_read_armed: bool,
    wake_read_error: Option<io::Error>,
    disconnected: bool,
    /// Set when the ring broke with ops possibly still in the kernel: their memory is leaked.
    leak_wake_buf: bool,
    /// Writes whose chain of pieces completed, to submit again for their next one. Out of the
    /// kernel and out of `slots` meanwhile; each one's slot was freed by that completion, so
    /// there is room for all of them.
    next_pieces: Vec<Request>,
    /// Pieces per chain of linked SQEs: 1 where the kernel cannot skip the completions of
    /// pieces that succeed (before 5.17).
    max_linked_pieces: usize,
    /// SQEs of the request being started; kept to reuse its allocation.
    chain: Vec<squeue::Entry>,
    /// SQEs pushed since the ring was set up.
    pushed_sqes: u64,
    /// Where the chains of linked SQEs still in the SQ start and end, counted in `pushed_sqes`.
    queued_chains: VecDeque<(u64, u64)>,
}

impl RingWorker {
    fn new(
        ring_entries: u32,
        requests: Receiver<Request>,
        shared: Arc<RingShared>,
    ) -> Result<Self, EngineError> {
        let ring = build_ring(ring_entries)?;
        probe_opcodes(&ring)?;
        // The kernel rounds the SQ size up to a power of two. Capping user ops at it (plus the
        // one eventfd read) keeps in-flight work within the CQ, which is twice the SQ, so
        // completions can never overflow.
        let max_in_flight_ops = ring.params().sq_entries() as usize;
        let max_linked_pieces = if ring.params().is_feature_skip_cqe_on_success() {
            MAX_LINKED_PIECES.min(max_in_flight_ops)
        } else {
            1
        };
        Ok(RingWorker {
            ring,
            requests,
            shared,
            slots: Slots::new(max_in_flight_ops),
            wake_buf: Box::into_raw(Box::new(0u64)),
            wake_read_armed: false,
            wake_read_error: None,
            disconnected: false,
            leak_wake_buf: false,
            next_pieces: Vec::new(),
            max_linked_pieces,
            chain: Vec::with_capacity(max_linked_pieces),
            pushed_sqes: 0,
            queued_chains: VecDeque::new(),
        })
    }

    fn run(&mut self) -> io::Result<()> {
        loop {
            self.reap_completions();
            let mut waiting = std::mem::take(&mut self.next_pieces).into_iter();
            while let Some(request) = waiting.next() {
                if let Err(err) = self.start(request) {
                    // Kept for `fail_everything`, which answers them with what they wrote.
                    self.next_pieces.extend(waiting);
                    return Err(err);
                }
            }
            #[cfg(test)]
            if self.shared.poisoned.load(Ordering::SeqCst) {
                return Err(io::Error::other("ring failed on purpose (test)"));
            }
            if let Some(err) = self.wake_read_error.take() {
                // Without the eventfd read the thread could sleep through new requests.
                return Err(err);
            }
            self.accept_requests()?;
            #[cfg(test)]
            if self.shared.fail_after_submit.load(Ordering::SeqCst) && self.slots.in_flight() > 0 {
                self.submit()?;
                return Err(io::Error::other(
                    "ring failed on purpose after a submit (test)",
                ));
            }

            if self.disconnected {
                if self.slots.in_flight() == 0 && self.next_pieces.is_empty() {
                    return self.disarm_wake_read();
                }
                self.wait_for_completion()?;
                continue;
            }
            if !self.has_room() {
                // Queued requests cannot start until something completes, and a completion
                // ends this wait by itself, so no wake-up from producers is needed.
                self.wait_for_completion()?;
                continue;
            }

            if self.spin_for_work()? {
                continue;
            }
            self.arm_wake_read()?;
            // Lost-wakeup argument. Producers do: send; fence; `sleeping.swap(false)`; if it
            // was true, write the eventfd. We do: `sleeping = true`; fence; re-check the
            // channel; block. The two SeqCst fences are totally ordered:
            // - our fence first: the producer's swap comes after our store, reads true (or a
            //   later value written only by another producer that then writes the eventfd, or
            //   by us after waking), so the eventfd is written and the armed read completes,
            //   ending the wait below;
            // - the producer's fence first: its send precedes that fence, so our re-check
            //   after our fence must observe the request and we do not block.
            // The eventfd counter persists until read, so a write landing before the read is
            // submitted still completes it immediately; at worst we get a spurious wake-up.
            self.shared.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            match self.next_request() {
                Ok(request) => {
                    self.shared.sleeping.store(false, Ordering::SeqCst);
                    self.start(request)?;
                    continue;
                }
                Err(TryRecvError::Disconnected) => {
                    self.shared.sleeping.store(false, Ordering::SeqCst);
                    self.disconnected = true;
                    continue;
                }
                Err(TryRecvError::Empty) => {}
            }
            let waited = self.wait_for_completion();
            self.shared.sleeping.store(false, Ordering::SeqCst);
            waited?;
        }
    }

    /// Blocks until a completion arrives, unless writes wait to be restarted for their next
    /// piece: a completion reaped inside a submit (see `recover_enter_error`) can leave them
    /// there with nothing else in flight, and the loop's top restarts them.
    fn wait_for_completion(&mut self) -> io::Result<()> {
        if !self.next_pieces.is_empty() {
            return Ok(());
        }
        self.submit_and_wait_one()
    }

    /// Submits what is queued, then polls briefly for a completion or a new request before the
    /// thread goes to sleep. Under load the next request arrives within microseconds; catching it
    /// here saves its producer an eventfd write and this thread a sleep and a wake-up, which
    /// together cost more CPU than the spin.
    fn spin_for_work(&mut self) -> io::Result<bool> {
        let spin = self.shared.spin_before_sleep;
        if spin.is_zero() {
            return Ok(false);
        }
        if !self.ring.submission().is_empty() {
            self.submit()?;
        }
        let deadline = Instant::now() + spin;
        loop {
            if !self.ring.completion().is_empty() || !self.next_pieces.is_empty() {
                return Ok(true);
            }
            match self.next_request() {
                Ok(request) => {
                    self.start(request)?;
                    return Ok(true);
                }
                Err(TryRecvError::Disconnected) => {
                    self.disconnected = true;
                    return Ok(true);
                }
                Err(TryRecvError::Empty) => {}
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// The next request from the channel (a test can hold them there).
    fn next_request(&self) -> Result<Request, TryRecvError> {
        #[cfg(test)]
        if self.shared.held.load(Ordering::SeqCst) {
            return Err(TryRecvError::Empty);
        }
        self.requests.try_recv()
    }

    fn accept_requests(&mut self) -> io::Result<()> {
        while !self.disconnected && self.has_room() {
            match self.next_request() {
                Ok(request) => self.start(request)?,
                Err(TryRecvError::Empty) => break,
                // std's mpsc yields every queued request before reporting the disconnect, so
                // nothing that was accepted into the channel is lost at shutdown.
                Err(TryRecvError::Disconnected) => self.disconnected = true,
            }
        }
        Ok(())
    }

    /// Whether a new request may start: a slot is free beyond those the writes waiting for
    /// their next piece will take (each freed one when its piece completed).
    fn has_room(&self) -> bool {
        self.slots.free.len() > self.next_pieces.len()
    }

    fn start(&mut self, request: Request) -> io::Result<()> {
        let (user_data, request) = match self.slots.insert(request) {
            Ok(inserted) => inserted,
            Err(request) => {
                // Unreachable given the has_room() checks, but an error beats a panic.
                request.complete(Err(io::Error::other("io_uring in-flight table full")));
                return Ok(());
            }
        };
        // The SQEs are built from the request only after it sits in its slot, so the buffer
        // they point to is already owned by the in-flight table.
        let mut chain = std::mem::take(&mut self.chain);
        chain.clear();
        request.sqes(self.max_linked_pieces, &mut chain);
        let pushed = self.push_chain(user_data, &mut chain);
        self.chain = chain;
        pushed
    }

    /// Queues a request's SQEs, all in one submission: a chain split over two would become
    /// two chains, each completing on its own.
    fn push_chain(
        &mut self,
        user_data: UserData,
        chain: &mut Vec<squeue::Entry>,
    ) -> io::Result<()> {
        let linked = chain.len() > 1;
        if linked {
            let free = {
                let queue = self.ring.submission();
                queue.capacity() - queue.len()
            };
            if free < chain.len() {
                self.submit()?;
                let queue = self.ring.submission();
                if queue.capacity() - queue.len() < chain.len() {
                    // The kernel left SQEs behind (see `check_chains_taken`); pushing would
                    // split the chain.
                    return Err(io::Error::other("no room in the SQ for a chain of pieces"));
                }
            }
            let start = self.pushed_sqes;
            self.queued_chains
                .push_back((start, start + chain.len() as u64));
        }
        for (piece, entry) in chain.drain(..).enumerate() {
            let user_data = UserData { piece, ..user_data };
            self.push(&entry.user_data(user_data.encode()))?;
        }
        Ok(())
    }

    fn arm_wake_read(&mut self) -> io::Result<()> {
        if self.wake_read_armed {
            return Ok(());
        }
        let entry = opcode::Read::new(
            types::Fd(self.shared.wake_fd.as_raw_fd()),
            self.wake_buf.cast::<u8>(),
            std::mem::size_of::<u64>() as u32,
        )
        .build()
        .user_data(EVENTFD_TOKEN);
        self.push(&entry)?;
        self.wake_read_armed = true;
        Ok(())
    }

    /// At shutdown the eventfd read must complete before `wake_buf` can be freed.
    fn disarm_wake_read(&mut self) -> io::Result<()> {
        if self.wake_read_armed {
            self.shared.wake();
        }
        while self.wake_read_armed {
            self.submit_and_wait_one()?;
            self.reap_completions();
        }
        Ok(())
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entry's pointers target either a buffer owned by a request in
            // `self.slots` or `wake_buf`. Both stay allocated, unmoved and untouched by Rust
            // until the CQE with this user_data is reaped (or are leaked if the ring breaks);
            // the fd is kept open by the request's Arc<File> or by `self.shared`.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.pushed_sqes += 1;
                return Ok(());
            }
            // SQ full: hand the queued entries to the kernel to make room.
            self.submit()?;
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return self.check_chains_taken(),
                Err(err) => self.recover_enter_error(err)?,
            }
        }
    }

    fn submit_and_wait_one(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => self.check_chains_taken(),
            // Callers re-evaluate their state in a loop, so a retried wait is just another pass.
            Err(err) => self.recover_enter_error(err),
        }
    }

    /// After a submission: the kernel may stop short of the queued SQEs (out of memory for its
    /// requests, or one that fails to set up), and if that cut through a chain, the chain's
    /// first part runs on its own, with no completion to say when it is done with the buffer.
    /// The ring is then given up: `fail_everything` leaks the buffers of what is in flight
    /// rather than free them. A chain not taken at all stays whole for the next submission.
    fn check_chains_taken(&mut self) -> io::Result<()> {
        let taken = self.pushed_sqes - self.ring.submission().len() as u64;
        while let Some(&(start, end)) = self.queued_chains.front() {
            if end <= taken {
                self.queued_chains.pop_front();
            } else if start < taken {
                return Err(io::Error::other(
                    "the kernel took only part of a chain of linked SQEs",
                ));
            } else {
                break;
            }
        }
        Ok(())
    }

    /// Ok means "retry"; anything else means the ring is unusable.
    fn recover_enter_error(&mut self, err: io::Error) -> io::Result<()> {
        match err.raw_os_error() {
            Some(libc::EINTR) => Ok(()),
            // EBUSY: the kernel holds overflowed completions we must reap first. EAGAIN: it is
            // short of memory. Both are transient.
            Some(libc::EBUSY | libc::EAGAIN) => {
                if self.reap_completions() == 0 {
                    std::thread::sleep(ENTER_RETRY_DELAY);
                }
                Ok(())
            }
            _ => Err(err),
        }
    }

    fn reap_completions(&mut self) -> usize {
        let mut reaped = 0;
        for cqe in self.ring.completion() {
            reaped += 1;
            let res = cqe.result();
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            };
            if cqe.user_data() == EVENTFD_TOKEN {
                self.wake_read_armed = false;
                if let Err(err) = result {
                    self.wake_read_error = Some(err);
                }
                continue;
            }
            let user_data = UserData::decode(cqe.user_data());
            match self.slots.remove(user_data) {
                Some(request) => match request.next_piece(user_data.piece, result) {
                    AfterCompletion::Again(request) => self.next_pieces.push(request),
                    AfterCompletion::Wait(request) => {
                        tracing::error!(
                            piece = user_data.piece,
                            "io_uring posted a completion a chain asked it to skip"
                        );
                        self.slots.restore(user_data, request);
                    }
                    AfterCompletion::Answer(request, result) => request.complete(result),
                },
                None => {
                    self.shared
                        .stale_completions
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        user_data = cqe.user_data(),
                        "io_uring completion for an unknown request"
                    );
                }
            }
        }
        reaped
    }

    /// The ring broke with requests possibly still owned by the kernel and no CQE will tell
    /// us when they are released, so their buffers and files are leaked rather than freed.
    fn fail_everything(&mut self, err: &io::Error) {
        tracing::error!(error = %err, "io_uring thread failed; failing outstanding I/O");
        let failure = || io::Error::new(err.kind(), format!("io_uring ring failed: {err}"));
        let retryable = || ring_failed(err.kind(), format!("io_uring ring failed: {err}"));
        let writes_in_flight = self
            .slots
            .entries
            .iter()
            .flatten()
            .any(|request| matches!(request.op, Op::Write { .. } | Op::Fallocate { .. }));
        // Before the queue closes, so that whoever sees it closed also sees this.
        self.shared
            .lost_writes
            .store(writes_in_flight, Ordering::SeqCst);
        self.shared.queue_permits.close();
        for slot in &mut self.slots.entries {
            if let Some(request) = slot.take() {
                let Request {
                    file, op, reply, ..
                } = request;
                let read = matches!(op, Op::Read { .. });
                std::mem::forget(op);
                std::mem::forget(file);
                // Reads may run again into a new buffer. Nothing else is retried elsewhere,
                // syncs included: this one may have reported (or may yet report) a
                // write-back error, which a second fsync would not see again.
                let result = if read {
                    // Never `Interrupted`, which a reader would retry with the empty buffer
                    // it got back, taking that for a read that is done.
                    Err(io::Error::other(RingFailed {
                        reason: format!("io_uring ring failed during the read: {err}"),
                        in_kernel: true,
                    }))
                } else {
                    Err(failure())
                };
                let _ = reply.send(Reply { buf: None, result });
            }
        }
        self.leak_wake_buf = self.wake_read_armed;
        // Between two pieces, out of the kernel: answered with what their pieces wrote.
        for request in std::mem::take(&mut self.next_pieces) {
            let written = match &request.op {
                Op::Write { written_bytes, .. } => *written_bytes,
                _ => 0,
            };
            request.complete(Ok(written));
        }
        // Requests still in the channel never reached the kernel: they get their buffers back
        // and may be served elsewhere.
        while let Ok(request) = self.requests.try_recv() {
            request.complete(Err(retryable()));
        }
    }

    /// After `fail_everything`: a producer that had its permit before the queue closed may
    /// still send. Its request never reaches the kernel, so it is answered here, marked for
    /// another engine, until the engine drops its sender (dropped with the channel instead,
    /// it would fail unmarked).
    fn refuse_late_requests(&mut self, err: &io::Error) {
        while let Ok(request) = self.requests.recv() {
            request.complete(Err(ring_failed(
                err.kind(),
                format!("io_uring ring failed: {err}"),
            )));
        }
    }
}

impl Drop for RingWorker {
    fn drop(&mut self) {
        if !self.leak_wake_buf {
            // SAFETY: `wake_buf` came from Box::into_raw in `new` and is freed only here. When
            // not leaked, the eventfd read is not armed (shutdown waits for its CQE, and the
            // fatal path sets `leak_wake_buf` if it was), so the kernel no longer uses it.
            drop(unsafe { Box::from_raw(self.wake_buf) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::threads::write_in_pieces;
    use super::*;

    fn config(ring_threads: usize, ring_entries: u32) -> EngineConfig {
        EngineConfig {
            ring_threads,
            ring_entries,
            inline_cached_io: false,
            ring_spin_us: 0,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn back_pressure_with_tiny_queues() {
        // 2 rings x 4 queued requests, 4 in flight each: most callers must wait on permits.
        let engine = UringEngine::with_queue_capacity(&config(2, 4), 4).expect("engine");
        many_writes_and_reads(engine).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn spinning_ring_threads_serve_every_request() {
        let spinning = EngineConfig {
            ring_spin_us: 50,
            ..config(2, 8)
        };
        let engine = UringEngine::with_queue_capacity(&spinning, 8).expect("engine");
        many_writes_and_reads(engine).await;
        // And after an idle gap longer than the spin, the sleeping path still wakes up.
        let engine = UringEngine::new(&spinning).expect("engine");
        tokio::time::sleep(Duration::from_millis(20)).await;
        many_writes_and_reads(engine).await;
    }

    async fn many_writes_and_reads(engine: UringEngine) {
        many_writes_and_reads_on(Arc::new(engine)).await;
    }

    async fn many_writes_and_reads_on(engine: Arc<UringEngine>) {
        let file = Arc::new(tempfile::tempfile().expect("tempfile"));
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..500u64 {
            let engine = Arc::clone(&engine);
            let file = Arc::clone(&file);
            tasks.spawn(async move {
                let data = Bytes::from(vec![index as u8; 512]);
                let written = engine
                    .write_at(&file, index * 512, data, false, Pieces::Whole)
                    .await?;
                assert_eq!(written, 512);
                let (buf, result) = engine
                    .read_into(&file, index * 512, BytesMut::zeroed(512), 0)
                    .await;
                assert_eq!(result?, 512);
                assert!(buf.iter().all(|&b| b == index as u8));
                io::Result::Ok(())
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.expect("join").expect("io");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wakes_after_idle_sleep() {
        let engine = UringEngine::new(&config(1, 8)).expect("engine");
        let file = Arc::new(tempfile::tempfile().expect("tempfile"));
        for round in 0..5u8 {
            // Long enough for the ring thread to be blocked in io_uring_enter.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let data = Bytes::from(vec![round; 16]);
            engine
                .write_at(&file, 0, data, false, Pieces::Whole)
                .await
                .expect("write");
            engine.sync(&file, true).await.expect("fdatasync");
        }
    }

    #[test]
    fn shutdown_finishes_orphaned_ops() {
        use std::future::Future;
        use std::pin::pin;
        use std::task::{Context, Waker};

        let engine = UringEngine::new(&config(2, 16)).expect("engine");
        let file = Arc::new(tempfile::tempfile().expect("tempfile"));
        let mut cx = Context::from_waker(Waker::noop());
        for index in 0..64u64 {
            let data = Bytes::from(vec![0xC3; 64 * 1024]);
            // Half of them in pieces: a write between two pieces is in no slot of the ring.
            let pieces = if index % 2 == 0 {
                Pieces::Whole
            } else {
                Pieces::Of(16 * 1024)
            };
            let mut write = pin!(engine.write_at(&file, index * 64 * 1024, data, false, pieces));
            // Submitted on the first poll, then abandoned.
            let _ = write.as_mut().poll(&mut cx);
        }
        // Must neither hang nor free buffers early; all abandoned writes land before it returns.
        drop(engine);
        let len_bytes = file.metadata().expect("metadata").len();
        assert_eq!(len_bytes, 64 * 64 * 1024);
        let mut back = vec![0u8; 64 * 64 * 1024];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut back, 0).expect("read back");
        assert!(back.iter().all(|&b| b == 0xC3), "every piece landed");
    }

    /// About the largest offset a byte can be written at in `file` (the filesystem's file size
    /// limit: 16 TiB on ext4, the largest `off_t` on xfs or tmpfs), found by writing single
    /// bytes.
    fn max_file_bytes(file: &File) -> u64 {
        use std::os::unix::fs::FileExt;
        // A byte can be written at `fits - 1`, not at `too_far - 1` (or not tried there).
        let (mut fits, mut too_far) = (1u64 << 20, i64::MAX as u64);
        while too_far - fits > 1 {
            let mid = fits + (too_far - fits) / 2;
            match file.write_at(&[0], mid - 1) {
                Ok(1) => fits = mid,
                _ => too_far = mid,
            }
        }
        fits
    }

    /// Chains of linked pieces that run into the file size limit answer what plain pwrites of
    /// the same pieces give (`threads::write_in_pieces`; ext4: the piece that crosses the limit is short; xfs, tmpfs: it
    /// fails), with no completion left over for the cancelled pieces; one that starts at the
    /// limit fails whole. With 4-entry rings the writes take several chains, and the limit
    /// falls in the first or a later one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chains_of_pieces_answer_what_they_wrote_at_the_size_limit() {
        let piece = 16 * 1024;
        let data: Bytes = (0..8 * piece).map(|i| (i % 251) as u8 + 1).collect();
        for ring_entries in [4, 64] {
            let engine = Arc::new(UringEngine::new(&config(1, ring_entries)).expect("engine"));
            let file = Arc::new(tempfile::tempfile().expect("tempfile"));
            let model = tempfile::tempfile().expect("tempfile");
            let limit = max_file_bytes(&file);
            for before_limit in [3 * piece + 1000, 6 * piece + 1000] {
                let offset = limit - before_limit as u64;
                let expected =
                    write_in_pieces(&model, offset, &data, Pieces::Of(piece)).expect("model");
                assert!(
                    expected > 0 && expected < data.len(),
                    "the limit falls inside"
                );
                let written = engine
                    .write_at(&file, offset, data.clone(), false, Pieces::Of(piece))
                    .await
                    .expect("a short write");
                assert_eq!(written, expected, "ring of {ring_entries}");
                let mut back = vec![0u8; written];
                std::os::unix::fs::FileExt::read_exact_at(&*file, &mut back, offset)
                    .expect("read back");
                assert!(back[..] == data[..written], "the bytes before the limit");
            }
            let model_err =
                write_in_pieces(&model, limit, &data, Pieces::Of(piece)).expect_err("model");
            let err = engine
                .write_at(&file, limit, data.clone(), false, Pieces::Of(piece))
                .await
                .expect_err("nothing fits past the limit");
            assert_eq!(err.raw_os_error(), model_err.raw_os_error());
            // The ring goes on serving, and no completion ever came for an answered request.
            many_writes_and_reads_on(Arc::clone(&engine)).await;
            assert_eq!(engine.stale_completions(), 0, "ring of {ring_entries}");
        }
    }

    #[test]
    fn oversized_ring_is_a_setup_error() {
        // Far beyond IORING_MAX_ENTRIES (32768): the kernel must refuse it.
        match UringEngine::new(&config(1, 1 << 30)) {
            Err(EngineError::RingSetup(_)) => {}
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("kernel accepted a 2^30-entry ring"),
        }
    }
}
