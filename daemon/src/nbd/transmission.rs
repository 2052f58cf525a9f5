//! The transmission phase: read requests, run each as its own task against storage, and send the
//! replies as they complete, in whatever order that is.
//!
//! socket → decode (proto) → validate (proto) → storage → io engine → reply frame → writev.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use evsd_proto::consts::{
    CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE,
};
use evsd_proto::{
    decode_request, encode_request, reply, request_header_len, Command, Errno, ExportLimits,
    MetaContext, Negotiated, ReplyMode, ReplyTo, Request,
};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;
use tokio_util::sync::WaitForCancellationFuture;

use crate::error::StorageError;
use crate::metrics::{ConnectionLimits, Kind, Limit, VolumeMetrics};
use crate::nbd::catalog;
use crate::nbd::drain::{self, Drain};
use crate::nbd::idle::IdleTimer;
use crate::nbd::in_place::{self, InPlaceWrite, Landing, ReceiveInPlace};
use crate::nbd::payload_wait::PayloadWait;
use crate::nbd::replies::{self, Frame, Piece};
use crate::nbd::send_queue;
use crate::nbd::sendfile::SendFile;
use crate::nbd::shutdown::Shutdown;
use crate::nbd::threads;
use crate::storage::attachments::Attachment;
use crate::storage::{FileRange, StatusQuery, Volume, ZeroMode};

/// Most extents one BLOCK_STATUS reply carries per context (the spec allows 2^20).
const MAX_EXTENTS_PER_REPLY: usize = 4096;
/// Buffers handed to one writev (Linux allows 1024).
const MAX_IOVECS_PER_WRITE: usize = 512;
/// How long the end of a connection waits for TLS to send its close (and what it still holds).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long, and for how many bytes, a connection we ended waits for its client to close.
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
const LINGER_MAX_BYTES: usize = 64 << 20;
/// Free space kept in the input buffer before each socket read.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Requests (header and payload) from this size on are read up to their end and no further.
const LARGE_REQUEST_BYTES: usize = READ_CHUNK_BYTES;
/// How long replies may wait with no byte of them taken once the connection is closing on the
/// client's account (its end of stream, NBD_CMD_DISC, a protocol violation), whatever the idle
/// timeout (or none). A TCP client that shuts down both directions while its receive window is
/// zero reads what was queued without reopening the window and closes with nothing unread: its
/// kernel then keeps the connection in FIN-WAIT-2 at that zero window for `tcp_fin_timeout`
/// (60 s), answering our window probes, and no reset comes until it is gone. Without a bound
/// the connection held its seat for minutes.
pub const CLOSING_REPLY_STALL: Duration = Duration::from_secs(10);
/// READs at least this long are sent from the page cache with `sendfile` when all cached. Below
/// it the copy is cheap and one writev carries many replies, where each file range would take
/// a system call of its own.
const SEND_FROM_CACHE_MIN_BYTES: u64 = 64 << 10;
/// Replies waiting for the client beyond which READs are not written from the head's mapping.
const MAPPED_READ_MAX_QUEUED_BYTES: u64 = 256 << 10;
/// Bytes of mapped replies whose pages one `writev` prefetches, first ones first: about what
/// a socket's send buffer takes in one call.
const MAPPED_PREFETCH_MAX_BYTES: usize = 1 << 20;
/// The same for large READs (a paced TCP connection's, see `SendFile::maps_small_reads`): a
/// client at depth 8 of 1 MiB reads keeps this much waiting. Beyond it they take buffers, so a
/// client that stopped reading holds the chain (which pruning waits for) with no more.
const MAPPED_LARGE_READ_MAX_QUEUED_BYTES: u64 = 8 << 20;

/// Why transmission ended.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionEnd {
    #[error("client sent NBD_CMD_DISC")]
    Disconnect,
    #[error("client closed the connection")]
    Eof,
    #[error("server is shutting down")]
    Shutdown,
    #[error("idle for {idle_secs} s")]
    IdleTimeout { idle_secs: u64 },
    /// Our replies waited and the client took none of their bytes for the idle timeout.
    #[error("took none of its replies for {idle_secs} s")]
    RepliesUnread { idle_secs: u64 },
    #[error("protocol violation: {0}")]
    Protocol(#[from] evsd_proto::RequestError),
    #[error("client closed the connection in the middle of a request")]
    Truncated,
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// What request futures share: the volume and what the handshake fixed.
struct Session<'m> {
    volume: Arc<Volume>,
    metrics: &'m VolumeMetrics,
    mode: ReplyMode,
    meta_contexts: Vec<MetaContext>,
    /// Each context's query, fixed when the connection attached (see `catalog::status_query`).
    meta_queries: Vec<Option<StatusQuery>>,
    peer: String,
    /// Set once a failed request has been logged at warn level.
    warned_failure: AtomicBool,
    /// This connection's place among the volume's connections and at its write fence.
    attachment: &'m Attachment,
    /// The socket takes file ranges: large cached READs are sent from the page cache.
    sends_files: bool,
    /// The socket's writes take iovecs the kernel reads from a layer's mapping: other cached
    /// READs of the head are written from it (see `storage::volume::mapped_read`).
    writes_mapped: bool,
    /// READs smaller than `SEND_FROM_CACHE_MIN_BYTES` are written from the mapping too (a Unix
    /// socket); larger ones are when the socket takes no file ranges (a paced TCP connection).
    maps_small_reads: bool,
    /// Large WRITE payloads are copied into the page cache by this connection's thread (see
    /// `ClientStream::copies_large_writes`).
    copies_large_writes: bool,
}

/// A client's socket halves, the bytes already read past the handshake, and its name for logs.
pub struct ClientStream<R, W> {
    pub reader: R,
    pub writer: W,
    /// The client's socket under both halves (under TLS too), open as long as they are.
    pub socket_fd: RawFd,
    pub buffered: BytesMut,
    pub peer: String,
    /// Whether this socket may take `sendfile` at all (see [`crate::nbd::connection::Client`]).
    pub may_send_files: bool,
    /// Whether large WRITE payloads are copied into the page cache by the connection's own
    /// thread rather than the I/O engine's. True on TCP: the kernel holds megabytes of the
    /// client's next requests while the thread copies, so it only saves trips between threads
    /// (1 MiB writes at depth 8 over one connection: 3300-5000 IOPS against 1600-2700). A
    /// Unix socket holds only the client's send buffer (about 200 KiB), so the client stalls
    /// while the thread copies (2000-2600 against 2800-3400 through the engine).
    pub copies_large_writes: bool,
    /// Whether the thread waits awake for the rest of a payload it receives in place (see
    /// `payload_wait`). Only on Unix sockets, whose client blocks on its send buffer: over TCP
    /// the wait measured no difference (1 MiB writes at depth 8, three A/B rounds).
    pub waits_for_payloads: bool,
}

pub struct TransmissionConfig {
    /// Requests executing at once; the socket is not read while this many are in flight.
    pub max_inflight_requests: usize,
    /// Bytes of read and write data held by requests in flight (at least one request always runs).
    pub max_inflight_bytes: u64,
    /// None: an idle connection stays open.
    pub idle_timeout: Option<Duration>,
    /// How long a thread serving one connection polls the socket for the rest of a WRITE
    /// payload it receives in place before sleeping (see `payload_wait`); zero: never.
    pub payload_wait: Duration,
}

/// Memory a queued reply piece holds besides its bytes, rounded up: the `Bytes` and the
/// allocation behind it (a `BytesMut` frozen short of its capacity gets a shared header) and the
/// queue's slot.
const QUEUED_PIECE_MEMORY_BYTES: u64 = 256;

/// The WRITE the client sent, when the request taken is the rest of its payload that stopped
/// being received in place: its reply and its metrics are the client's request's.
#[derive(Debug, Clone, Copy)]
struct RestOf {
    offset: u64,
    length_bytes: u64,
    started: Instant,
}

/// A request taken off the input with its payload.
struct Taken {
    request: Request,
    payload: Bytes,
    to: ReplyTo,
    rest_of: Option<RestOf>,
}

/// A finished request.
struct Done {
    frame: Frame,
    /// Input-budget bytes it held.
    held_bytes: u64,
    /// It was a write, trim or zeroes: the fence counts it.
    changed_data: bool,
}

/// A request in flight.
type InFlight<'a> = Pin<Box<dyn Future<Output = Done> + Send + 'a>>;

/// Connection state of the transmission loop. Everything runs in the connection's own task:
/// requests are futures polled here, so a completion wakes this task once per batch and the
/// replies that are ready go out together in one writev.
struct Connection<'s, R, W> {
    session: &'s Session<'s>,
    limits: ExportLimits,
    header_len: usize,
    reader: R,
    writer: W,
    input: BytesMut,
    /// Header and payload bytes of the request at the front of the input while it is not all
    /// there yet; 0 when no such request is known.
    incomplete_bytes: usize,
    /// The last request taken carried a large payload (see `read_limit`).
    last_was_large: bool,
    inflight: FuturesUnordered<InFlight<'s>>,
    inflight_bytes: u64,
    max_inflight_requests: usize,
    max_inflight_bytes: u64,
    payload_wait: Duration,
    /// Reply pieces waiting for the socket, in order.
    outgoing: VecDeque<Piece>,
    outgoing_bytes: u64,
    /// Bytes were written since the last flush. Sockets need no flush, but TLS keeps records it
    /// could not send at once until flushed.
    unflushed: bool,
    /// Set when no more requests will be read; the loop then drains and returns it.
    end: Option<TransmissionEnd>,
    limit_hits: ConnectionLimits<'s>,
    /// Out of room with input waiting; a hit is counted when this turns true.
    blocked: bool,
    idle: Option<IdleTimer>,
    /// Expires once replies have waited with no byte of them taken for the idle timeout, or
    /// for [`CLOSING_REPLY_STALL`] once the client has ended the connection.
    reply_stall: Option<IdleTimer>,
    /// `reply_stall` is bounded for a closing connection (see `bound_closing_stall`).
    closing_stall: bool,
    /// The client's socket, for its send queue (see `send_queue`).
    socket_fd: RawFd,
    /// The socket's send queue when last looked at while replies waited (see `send_queue`).
    last_queued_bytes: Option<u64>,
    /// The client took none of its replies for the idle timeout: what waits is dropped.
    abandon_replies: bool,
    /// Shutdown's grace period ran out: no reply is sent any more (see `give_up`).
    gave_up: bool,
    /// Raises the volume's write fence while this connection drains writes after its end.
    drain: Drain<'s>,
    /// Large WRITE payloads may be received straight into the page cache (see `in_place`).
    receives_in_place: bool,
    /// The WRITE whose payload is being received in place; the socket holds nothing else
    /// until it is all in.
    in_place: Option<InPlaceWrite<'s>>,
    /// The request at the front of the input covers the rest of a payload that stopped being
    /// received in place: it is read the ordinary way, and its reply echoes the offset the
    /// client sent, not the rest's.
    rest_of: Option<RestOf>,
    /// The payload landing in place waited for the socket since departures were last
    /// checked (see `poll_in_place`).
    in_place_waited: bool,
    /// The queued requests were searched for NBD_CMD_DISC after a hang-up, to the end of the
    /// stream (`look_for_disc`).
    looked_for_disc: bool,
}

/// What `look_for_disc` read.
struct ReadAhead {
    /// Some bytes came.
    read: bool,
    /// Up to the end of what the client sent.
    to_the_end: bool,
}

/// Serves requests until the client disconnects, breaks the protocol, or shutdown is requested.
/// Requests already received are answered before this returns, or, when the socket failed,
/// completed or cancelled: a request future that may have submitted I/O is never dropped, and
/// the volume's write fence holds other connections' writes until they are done.
pub async fn serve<R, W>(
    client: ClientStream<R, W>,
    negotiated: Negotiated,
    volume: Arc<Volume>,
    metrics: &VolumeMetrics,
    attachment: &Attachment,
    config: &TransmissionConfig,
    shutdown: Shutdown,
) -> TransmissionEnd
where
    R: AsyncRead + ReceiveInPlace + Unpin + Send,
    W: AsyncWrite + SendFile + Unpin + Send,
{
    let mode = negotiated.mode;
    let meta_queries = negotiated
        .meta_contexts
        .iter()
        .map(|context| catalog::status_query(&context.name, &volume))
        .collect();
    let session = Session {
        volume,
        metrics,
        mode,
        meta_contexts: negotiated.meta_contexts,
        meta_queries,
        peer: client.peer,
        warned_failure: AtomicBool::new(false),
        attachment,
        sends_files: client.may_send_files && client.writer.sends_files(),
        writes_mapped: client.writer.writes_iovecs(),
        maps_small_reads: client.writer.maps_small_reads(),
        copies_large_writes: client.copies_large_writes,
    };
    let mut conn = Connection {
        limits: ExportLimits {
            size_bytes: session.volume.size_bytes(),
            read_only: negotiated.export.read_only,
            max_payload_bytes: u64::from(negotiated.export.block_size.max_payload_bytes),
            mode,
            meta_contexts: session.meta_contexts.len(),
        },
        session: &session,
        header_len: request_header_len(mode),
        receives_in_place: client.reader.receives_in_place(),
        reader: client.reader,
        writer: client.writer,
        input: client.buffered,
        incomplete_bytes: 0,
        last_was_large: false,
        inflight: FuturesUnordered::new(),
        inflight_bytes: 0,
        max_inflight_requests: config.max_inflight_requests.max(1),
        max_inflight_bytes: config.max_inflight_bytes,
        payload_wait: if client.waits_for_payloads {
            config.payload_wait
        } else {
            Duration::ZERO
        },
        outgoing: VecDeque::new(),
        outgoing_bytes: 0,
        unflushed: false,
        end: None,
        limit_hits: ConnectionLimits::new(session.metrics.limits(), &session.peer),
        blocked: false,
        idle: config.idle_timeout.map(IdleTimer::new),
        reply_stall: config.idle_timeout.map(IdleTimer::new),
        closing_stall: false,
        socket_fd: client.socket_fd,
        last_queued_bytes: None,
        abandon_replies: false,
        gave_up: false,
        drain: Drain::new(session.volume.fence(), attachment.seat()),
        in_place: None,
        rest_of: None,
        in_place_waited: false,
        looked_for_disc: false,
    };
    let cancelled = shutdown.stop.cancelled();
    tokio::pin!(cancelled);
    let given_up = shutdown.give_up.cancelled();
    tokio::pin!(given_up);
    if shutdown.give_up.is_cancelled() {
        // Attached after the grace period: not even the requests already received start.
        conn.give_up();
    }
    loop {
        if conn.end.is_none() {
            if let Err(end) = conn.start_requests() {
                conn.end = Some(end);
            }
        }
        // Both exits of this loop start the drain before the socket is dropped: a hang-up
        // reported after that finds the seat draining and raises nothing.
        if conn.end.is_some() {
            conn.bound_closing_stall();
            // The client may already be reconnecting: fence off its writes still in flight.
            if matches!(conn.end, Some(TransmissionEnd::Disconnect)) {
                conn.drain.client_disconnecting();
            }
            conn.drain.start(false);
            if conn.inflight.is_empty() && (!conn.replies_waiting() || conn.abandon_replies) {
                break;
            }
        }
        let polled = poll_fn(|cx| conn.poll_io(cx, cancelled.as_mut(), given_up.as_mut())).await;
        if let Err(e) = polled {
            // Nobody is left to answer, but the requests in flight may have submitted writes
            // that land whenever the disk gets to them: see them through behind the fence.
            conn.drain.start(true);
            conn.outgoing.clear();
            conn.outgoing_bytes = 0;
            poll_fn(|cx| conn.poll_abandoned(cx)).await;
            return TransmissionEnd::Io(e);
        }
    }
    if conn.abandon_replies {
        // What the client left untaken is dropped: a reset at close frees both kernels'
        // buffers now, instead of ours probing a zero window (see CLOSING_REPLY_STALL).
        if let Err(e) = send_queue::discard_on_close(conn.socket_fd) {
            tracing::debug!(peer = %session.peer, error = %e, "could not drop the unsent replies at close");
        }
    } else {
        // A TLS shutdown sends what it still holds first: a client that stopped reading would
        // hold it for good, and past the grace period of a shutdown not at all. Biased: a
        // plain socket's shutdown is done at once, grace period or not.
        tokio::select! {
            biased;
            _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.writer.shutdown()) => {}
            _ = given_up.as_mut() => {}
        }
        // We ended it (a stop, a revocation, a protocol error) and a pipelining client may
        // have sent more meanwhile: closing a TCP socket with unread bytes sends a reset,
        // which drops the replies the client has not taken yet. So its bytes are read and
        // dropped until it closes too (it sees our end of stream after its replies).
        let client_ended = matches!(
            conn.end,
            Some(TransmissionEnd::Eof | TransmissionEnd::Truncated | TransmissionEnd::Disconnect)
        );
        if !client_ended {
            // Not past the grace period of a shutdown: that ends every wait.
            tokio::select! {
                _ = tokio::time::timeout(LINGER_TIMEOUT, discard_input(&mut conn.reader)) => {}
                _ = given_up.as_mut() => {}
            }
        }
    }
    conn.end.take().unwrap_or(TransmissionEnd::Eof)
}

/// Reads and drops what the client still sends, up to its end of stream or
/// [`LINGER_MAX_BYTES`].
async fn discard_input<R: AsyncRead + Unpin>(reader: &mut R) {
    let mut scratch = vec![0u8; 64 << 10];
    let mut discarded_bytes = 0;
    while discarded_bytes < LINGER_MAX_BYTES {
        match reader.read(&mut scratch).await {
            Ok(0) | Err(_) => return,
            Ok(n) => discarded_bytes += n,
        }
    }
}

impl<'s, R, W> Connection<'s, R, W>
where
    R: AsyncRead + ReceiveInPlace + Unpin,
    W: AsyncWrite + SendFile + Unpin,
{
    /// Whether another request may start. Replies not yet written count against the byte budget
    /// too: a client that sends requests but does not read its replies must not make us buffer
    /// without bound.
    fn has_room(&self) -> bool {
        let idle = self.inflight.is_empty() && self.outgoing.is_empty();
        // A reply waiting costs memory beyond its wire bytes (its buffer, the queue's slot):
        // charged per piece, so a client pipelining requests with 16-byte replies (errors,
        // CACHE) and never reading them is held to the budget in memory too.
        let waiting_bytes =
            self.outgoing_bytes + self.outgoing.len() as u64 * QUEUED_PIECE_MEMORY_BYTES;
        self.inflight.len() < self.max_inflight_requests
            && (idle || self.inflight_bytes + waiting_bytes < self.max_inflight_bytes)
    }

    /// Reply bytes not yet handed to the socket: queued here, or held by TLS until a flush.
    fn replies_waiting(&self) -> bool {
        !self.outgoing.is_empty() || self.unflushed
    }

    fn queue_reply(&mut self, frame: Frame) {
        self.outgoing_bytes += frame.iter().map(Piece::len_bytes).sum::<u64>();
        self.outgoing.extend(frame);
    }

    /// Takes the next request and its payload off the input once both are complete (None
    /// until then, with room reserved for the payload). A payload over the limit ends the
    /// connection.
    fn take_request(&mut self) -> Result<Option<Taken>, TransmissionEnd> {
        if self.in_place.is_some() {
            return Ok(None);
        }
        let mode = self.session.mode;
        let Some(request) = decode_request(&self.input, mode)? else {
            return Ok(None);
        };
        if let Err(e) = self.limits.check_payload(&request) {
            self.limit_hits.hit(Limit::RequestSize);
            return Err(e.into());
        }
        let payload_len = request.payload_len(mode) as usize;
        let needed = self.header_len + payload_len;
        if self.input.len() < needed {
            // Tried once per request, when its header is first seen without all its payload:
            // a refusal stays one while the rest arrives.
            if needed >= LARGE_REQUEST_BYTES
                && self.incomplete_bytes == 0
                && self.start_in_place(request)
            {
                return Ok(None);
            }
            if needed >= LARGE_REQUEST_BYTES {
                // The payload and the next request's header, read with its end.
                let additional = needed + self.header_len - self.input.len();
                reserve_fresh(&mut self.input, additional);
            }
            self.incomplete_bytes = needed;
            return Ok(None);
        }
        self.incomplete_bytes = 0;
        // Extended replies carry the request's offset, which the client checks (libnbd fails
        // the command with EPROTO otherwise).
        let rest_of = self.rest_of.take();
        let to = ReplyTo {
            cookie: request.cookie,
            offset: rest_of.map_or(request.offset, |rest_of| rest_of.offset),
        };
        self.last_was_large = needed >= LARGE_REQUEST_BYTES;
        self.input.advance(self.header_len);
        // An empty payload must not be a slice of the input: it would keep the whole buffer
        // alive (and unreclaimable) for as long as its request runs.
        let payload = if payload_len == 0 {
            Bytes::new()
        } else {
            self.input.split_to(payload_len).freeze()
        };
        Ok(Some(Taken {
            request,
            payload,
            to,
            rest_of,
        }))
    }

    /// Starts receiving a large WRITE's payload in place when it qualifies (see `in_place`): the
    /// part read with the header is written now, and the rest lands as the socket gets it.
    /// The request is checked here as `start_requests` checks requests, so nothing out of
    /// range or refused lands; one that fails the checks is read the ordinary way and refused.
    fn start_in_place(&mut self, request: Request) -> bool {
        if !self.receives_in_place
            || self.end.is_some()
            || self.rest_of.is_some()
            || request.command != Command::Write
            || self.input.len() < self.header_len
            || self.limits.validate(&request).is_err()
        {
            return false;
        }
        let volume = &self.session.volume;
        self.fence_departed();
        // A forced close starts nothing more (see `drain::pass_fence`); a raised fence is
        // waited at there.
        if volume.fence().is_raised() || self.session.attachment.seat().is_forced() {
            // Writes wait at the fence; this one goes where the waiting is done.
            return false;
        }
        let Some(head) = volume.in_place_head(request.offset, request.length) else {
            return false;
        };
        let metrics = self.session.metrics;
        let read = &self.input[self.header_len..];
        let Some(write) =
            InPlaceWrite::start(volume, request, head, read, || metrics.start(Kind::Write))
        else {
            return false;
        };
        metrics.received_in_place(write.landed_bytes());
        self.input.clear();
        self.incomplete_bytes = 0;
        self.in_place = Some(write);
        true
    }

    /// Receives what the socket holds of the payload landing in place; true when something
    /// came of it.
    fn poll_in_place(&mut self, cx: &mut Context<'_>) -> std::io::Result<bool> {
        if self.in_place.is_none() {
            return Ok(false);
        }
        // A payload can take long to arrive (a stalled network): after each wait for it, as
        // before each buffered write, clients seen gone are fenced, this one included, and a
        // raised fence sends the rest where the waiting is done. A client that gave up on this
        // write and wrote the blocks again elsewhere must not have this one's late bytes land
        // over them. (Asked after waits only: asking costs a lock shared by the volume's
        // connections and a system call.)
        if std::mem::take(&mut self.in_place_waited) {
            self.fence_departed();
        }
        let fenced = self.session.volume.fence().is_raised();
        let Some(write) = self.in_place.as_mut() else {
            return Ok(false);
        };
        let before = write.landed_bytes();
        let landing = if fenced {
            Poll::Ready(Landing::Rest(write.rest()))
        } else {
            let wait = (!self.payload_wait.is_zero() && threads::alone_on_this_thread()).then_some(
                PayloadWait {
                    socket_fd: self.socket_fd,
                    budget: self.payload_wait,
                },
            );
            let landing = write.poll_land(cx, &mut self.reader, &self.session.volume, wait);
            // However short, a wait is a wait: a client seen gone meanwhile is fenced before
            // the next landing, as after the runtime's.
            if write.take_waited() {
                self.in_place_waited = true;
            }
            landing
        };
        self.session
            .metrics
            .received_in_place(write.landed_bytes() - before);
        match landing {
            Poll::Pending => {
                self.in_place_waited = true;
                Ok(false)
            }
            Poll::Ready(Landing::Progress) => Ok(true),
            Poll::Ready(Landing::Complete) => {
                self.complete_in_place();
                Ok(true)
            }
            Poll::Ready(Landing::Eof) => {
                self.in_place = None;
                self.end = Some(TransmissionEnd::Truncated);
                Ok(true)
            }
            Poll::Ready(Landing::Rest(rest)) => {
                // The input is empty while a payload lands in place: the rest's header goes
                // in front of its bytes (those of its first block that landed, then those still
                // in the socket), as if the client had sent it so.
                let mut header = Vec::with_capacity(self.header_len);
                encode_request(&rest, self.session.mode, &mut header);
                self.input.extend_from_slice(&header);
                if let Some(mut write) = self.in_place.take() {
                    self.input.extend_from_slice(&write.take_partial());
                    self.rest_of = Some(RestOf {
                        offset: write.request.offset,
                        length_bytes: write.request.length,
                        started: write.started,
                    });
                }
                Ok(true)
            }
            Poll::Ready(Landing::Failed(e)) => Err(e),
        }
    }

    /// A payload is all in: the WRITE is answered once FUA's flush, if asked for, is done.
    fn complete_in_place(&mut self) {
        let Some(write) = self.in_place.take() else {
            return;
        };
        self.last_was_large = true;
        let session = self.session;
        let request = write.request;
        let to = ReplyTo {
            cookie: request.cookie,
            offset: request.offset,
        };
        self.inflight.push(Box::pin(async move {
            let flushed = if request.has_flag(CMD_FLAG_FUA) {
                session.volume.flush().await
            } else {
                Ok(())
            };
            let (frame, ok) = match flushed {
                Ok(()) => (replies::ok(session.mode, to), true),
                Err(e) => failure_reply(session, to, &e),
            };
            write
                .counted
                .finish(request.length, ok, write.started.elapsed());
            Done {
                frame,
                held_bytes: 0,
                changed_data: false,
            }
        }));
    }

    /// Decodes every complete request in the input and starts it, while there is room.
    fn start_requests(&mut self) -> Result<(), TransmissionEnd> {
        let mode = self.session.mode;
        let mut departures_checked = false;
        while self.has_room() {
            self.blocked = false;
            let Some(Taken {
                request,
                payload,
                to,
                rest_of,
            }) = self.take_request()?
            else {
                return Ok(());
            };
            if request.command == Command::Disc {
                return Err(TransmissionEnd::Disconnect);
            }
            if let Err(errno) = self.limits.validate(&request) {
                let message = format!(
                    "{:?} at offset {} length {} refused",
                    request.command, request.offset, request.length
                );
                if let Some(kind) = metric_kind(request.command) {
                    self.session.metrics.refused(kind);
                }
                if errno == evsd_proto::Errno::Overflow {
                    self.limit_hits.hit(Limit::RequestSize);
                }
                self.queue_reply(replies::error(mode, to, errno, &message));
                continue;
            }
            let Some(kind) = metric_kind(request.command) else {
                // validate() refuses every command execute() cannot run; answer anyway so a
                // gap between the two never leaves a client waiting.
                let message = format!("{:?} cannot be executed", request.command);
                let errno = evsd_proto::Errno::Inval;
                self.queue_reply(replies::error(mode, to, errno, &message));
                continue;
            };
            if request.command == Command::Read && self.answer_from_mapping(&request, to) {
                continue;
            }
            let held_bytes = match request.command {
                Command::Read | Command::Write => request.length,
                _ => 0,
            };
            self.inflight_bytes += held_bytes;
            let changed_data = matches!(kind, Kind::Write | Kind::Trim | Kind::Zero);
            if (changed_data || kind == Kind::Flush) && !departures_checked {
                // A client may re-send on this connection what it gave up on another one: if
                // that one's client is gone, its queued writes must not land after this one's.
                departures_checked = true;
                self.fence_departed();
            }
            if changed_data {
                self.drain.write_started();
            }
            let session = self.session;
            let counted = session.metrics.start(kind);
            let started = rest_of.map_or_else(Instant::now, |rest_of| rest_of.started);
            self.inflight.push(Box::pin(async move {
                let (frame, ok) = execute(session, &request, to, payload).await;
                let moved_bytes = match kind {
                    Kind::Read | Kind::Trim | Kind::Zero => request.length,
                    Kind::Write => rest_of.map_or(request.length, |rest_of| rest_of.length_bytes),
                    _ => 0,
                };
                counted.finish(moved_bytes, ok, started.elapsed());
                Done {
                    frame,
                    held_bytes,
                    changed_data,
                }
            }));
        }
        // Counted on the transition only, and only with input waiting: a client is being held
        // back, not merely running at the limit. Data still in the socket is not looked at.
        if !self.blocked && !self.input.is_empty() {
            self.blocked = true;
            let limit = if self.inflight.len() >= self.max_inflight_requests {
                Limit::InflightRequests
            } else {
                Limit::InflightBytes
            };
            self.limit_hits.hit(limit);
        }
        Ok(())
    }

    /// Answers at once a READ whose bytes are all in the head's mapping and the page cache: the
    /// reply's `writev` takes an iovec into the mapping (see `storage::volume::mapped_read`).
    /// Nothing in it waits, and a request future per 4 KiB read (its allocation, its polling
    /// and waking in the set) cost more than the reply's making. The one place READs are
    /// written from the mapping: one that is not goes the future's way, with a buffer.
    fn answer_from_mapping(&mut self, request: &Request, to: ReplyTo) -> bool {
        let session = self.session;
        // Larger ones are `sendfile`'s where the socket takes file ranges. With replies
        // waiting for the client, READs take buffers: one that stopped reading must not hold
        // the volume's chain (which pruning waits for) with ever more replies.
        let allowed = if request.length >= SEND_FROM_CACHE_MIN_BYTES {
            !session.sends_files && self.outgoing_bytes <= MAPPED_LARGE_READ_MAX_QUEUED_BYTES
        } else {
            session.maps_small_reads && self.outgoing_bytes <= MAPPED_READ_MAX_QUEUED_BYTES
        };
        if !session.writes_mapped || !allowed {
            return false;
        }
        let started = Instant::now();
        let Some(mapped) =
            session
                .volume
                .mapped_cached_range(request.offset, request.length, started)
        else {
            return false;
        };
        session.metrics.written_from_mapping(request.length);
        let counted = session.metrics.start(Kind::Read);
        let frame = replies::read_from_mapping(session.mode, to, request.offset, mapped);
        counted.finish(request.length, true, started.elapsed());
        self.queue_reply(frame);
        true
    }

    /// Answers ESHUTDOWN to the complete requests already read but not started (the in-flight
    /// limits held them in the input) when the server stops serving this connection: the
    /// client must not wait for replies that never come. Stops at DISC, at a request not
    /// fully received or at one that breaks the protocol. A WRITE whose payload was being
    /// received in place, or whose rest was to be read the ordinary way, is answered too: its
    /// client may have sent it all, and only this side stopped taking it.
    fn refuse_buffered(&mut self) {
        let mode = self.session.mode;
        let message = "the server is shutting down";
        while let Ok(Some(Taken { request, to, .. })) = self.take_request() {
            if request.command == Command::Disc {
                return;
            }
            self.queue_reply(replies::error(mode, to, Errno::Shutdown, message));
        }
        let to = if let Some(write) = self.in_place.take() {
            let landed_bytes = write.landed_bytes();
            write
                .counted
                .finish(landed_bytes, false, write.started.elapsed());
            Some(ReplyTo {
                cookie: write.request.cookie,
                offset: write.request.offset,
            })
        } else if let Some(rest_of) = self.rest_of.take() {
            decode_request(&self.input, mode)
                .ok()
                .flatten()
                .map(|rest| ReplyTo {
                    cookie: rest.cookie,
                    offset: rest_of.offset,
                })
        } else {
            None
        };
        if let Some(to) = to {
            self.queue_reply(replies::error(mode, to, Errno::Shutdown, message));
        }
    }

    /// Shutdown's grace period ran out: the replies not yet sent, and those of the requests
    /// still in flight, are dropped; the connection closes once those requests are through.
    fn give_up(&mut self) {
        self.gave_up = true;
        // Requests waiting at the write fence never start: their replies would be dropped.
        self.drain.start(true);
        self.abandon_replies = true;
        self.end.get_or_insert(TransmissionEnd::Shutdown);
        self.outgoing.clear();
        self.outgoing_bytes = 0;
        self.unflushed = false;
    }

    /// Fences the volume's connections whose clients were seen gone.
    fn fence_departed(&self) {
        let fenced = self.session.attachment.fence_departed();
        if fenced > 0 {
            self.session.metrics.hangups_fenced(fenced);
            tracing::debug!(peer = %self.session.peer, export = self.session.volume.name(), fenced, "fenced the writes of connections whose clients are gone");
        }
    }

    /// After a hang-up of this connection's client was seen (by this task or another), before
    /// its queued requests come to the fence, where they would give up as a departed client's
    /// stale writes: a client that sent NBD_CMD_DISC and closed its socket looks the same until
    /// the DISC is read, and the requests before a DISC are to be served. The client can send
    /// nothing more, so what the socket holds is read now, whatever the in-flight limits (the
    /// kernel's receive buffer bounds it), and searched; a DISC found marks the seat as the
    /// client's own disconnect. Until the search reached the end of the stream (a TLS reader
    /// may not have been told yet that the socket holds more), it goes on in the next passes.
    ///
    /// A socket error is returned as the loop's own read would.
    fn look_for_disc(&mut self, cx: &mut Context<'_>) -> std::io::Result<ReadAhead> {
        let ahead = if self.receives_in_place {
            self.read_socket_ahead()?
        } else {
            self.read_stream_ahead(cx)?
        };
        self.looked_for_disc = ahead.to_the_end;
        // As `take_request` parses them: a request it would refuse ends the search.
        let mode = self.session.mode;
        let mut at = 0usize;
        while let Ok(Some(request)) = decode_request(&self.input[at..], mode) {
            if request.command == Command::Disc {
                tracing::debug!(peer = %self.session.peer, "a client that hung up had sent NBD_CMD_DISC: its queued requests are served");
                self.drain.client_disconnecting();
                self.looked_for_disc = true;
                break;
            }
            if self.limits.check_payload(&request).is_err() {
                break;
            }
            let Some(next) = usize::try_from(request.payload_len(mode))
                .ok()
                .and_then(|payload| at.checked_add(self.header_len)?.checked_add(payload))
            else {
                break;
            };
            if next >= self.input.len() {
                break;
            }
            at = next;
        }
        Ok(ahead)
    }

    /// `look_for_disc`'s read of a plain socket: what it holds, with raw `recv`s (the socket
    /// may be the one in-place landings receive from, around the reader), which see the
    /// socket itself: when they stop, nothing more is there.
    fn read_socket_ahead(&mut self) -> std::io::Result<ReadAhead> {
        let mut read = false;
        loop {
            self.input.reserve(READ_CHUNK_BYTES);
            let spare = self.input.spare_capacity_mut();
            let Some(at) = NonNull::new(spare.as_mut_ptr().cast::<u8>()) else {
                break;
            };
            // SAFETY: `spare` is the input's unused capacity, valid for `spare.len()` bytes and
            // referenced by nothing else; `recv` writes at most that many.
            match unsafe { in_place::receive_into(&self.socket_fd, at, spare.len()) } {
                // The end of the stream: the loop's own read sees it again.
                Ok(0) => break,
                Ok(received) => {
                    // SAFETY: `recv` initialised the first `received` bytes of the capacity.
                    unsafe { self.input.set_len(self.input.len() + received) };
                    read = true;
                }
                Err(error) => match error.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => break,
                    // Reported once by the kernel: the loop's read would not see it again.
                    _ => return Err(error),
                },
            }
        }
        Ok(ReadAhead {
            read,
            to_the_end: true,
        })
    }

    /// `look_for_disc`'s read of a TLS stream: the records the socket holds, decrypted, through
    /// the reader (records cannot be read around it). The reader goes by the readiness the
    /// event loop last reported, which may predate the client's last bytes: Pending is not the
    /// end, and leaves the reader armed to wake the loop when the report comes.
    fn read_stream_ahead(&mut self, cx: &mut Context<'_>) -> std::io::Result<ReadAhead> {
        let mut read = false;
        loop {
            self.input.reserve(READ_CHUNK_BYTES);
            match poll_read_buf(Pin::new(&mut self.reader), cx, &mut self.input) {
                // The loop's own read sees the end again.
                Poll::Ready(Ok(0)) => {
                    return Ok(ReadAhead {
                        read,
                        to_the_end: true,
                    })
                }
                Poll::Ready(Ok(_)) => read = true,
                // A client that closed without a close_notify (many TLS libraries do) may still
                // have sent a DISC; the reader reports this again to the loop's own read, which
                // comes only once what was read here is taken.
                Poll::Ready(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(ReadAhead {
                        read,
                        to_the_end: true,
                    })
                }
                Poll::Ready(Err(error)) => return Err(error),
                Poll::Pending => {
                    return Ok(ReadAhead {
                        read,
                        to_the_end: false,
                    })
                }
            }
        }
    }

    /// Collects finished requests, writes what is ready, and reads more when there is room.
    /// Ready when the loop has something new to do; an Err means the socket failed.
    fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        cancelled: Pin<&mut WaitForCancellationFuture<'_>>,
        given_up: Pin<&mut WaitForCancellationFuture<'_>>,
    ) -> Poll<std::io::Result<()>> {
        let was_busy = !self.inflight.is_empty() || self.replies_waiting();
        let was_waiting = self.replies_waiting();
        let had_room = self.has_room();
        let mut progress = false;
        // What the look-ahead read is taken by the requests first: a read now would meet the
        // end of the stream with them in the input and end the connection as truncated.
        let mut read_ahead = false;
        // While the search goes on, requests in flight are not polled: one waiting at the fence
        // would give up before a DISC still to be read is found.
        let mut searching_for_disc = false;
        if !self.looked_for_disc
            && self.session.volume.fence().is_raised()
            && self.in_place.is_none()
            && self.session.attachment.seat().hung_up_without_disc()
        {
            let ahead = self.look_for_disc(cx)?;
            read_ahead = ahead.read;
            searching_for_disc = !self.looked_for_disc;
            progress |= read_ahead;
        }
        // Only once the connection ended: the grace period starts after `cancelled` ended
        // every connection, and this keeps a lock off the busy path.
        if !self.gave_up && self.end.is_some() && given_up.poll(cx).is_ready() {
            self.give_up();
            progress = true;
        }
        if !searching_for_disc {
            while let Poll::Ready(Some(done)) = self.inflight.poll_next_unpin(cx) {
                let frame = self.finished(done);
                if !self.gave_up {
                    self.queue_reply(frame);
                }
                progress = true;
            }
        }
        self.poll_fence_overdue(cx);
        let unsent_before = self.outgoing_bytes;
        let mut blocked = false;
        while !self.outgoing.is_empty() {
            match self.poll_write(cx) {
                Poll::Ready(result) => result?,
                Poll::Pending => {
                    blocked = true;
                    break;
                }
            }
        }
        let mut wrote = self.outgoing_bytes < unsent_before;
        if self.outgoing.is_empty() && self.unflushed {
            match Pin::new(&mut self.writer).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.unflushed = false;
                    wrote = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        // Replies written can free the byte budget while requests already read wait in the
        // input; nothing else would wake the loop to start them.
        if !had_room && self.has_room() {
            progress = true;
        }
        if self.in_place.is_some() {
            if self.end.is_none() && self.poll_in_place(cx)? {
                progress = true;
            }
        } else if self.end.is_none() && self.has_room() && !self.blocked && !read_ahead {
            // Not while requests already read wait for room (`blocked`): room that just came
            // back is theirs (the loop starts them first), and the backlog stays in the socket,
            // holding the client back, instead of growing the input. An end of stream read
            // before they started would also drop them, DISC included.
            // No more than the read may take: the end of a large payload fits already.
            let max_bytes = read_limit(
                self.input.len(),
                self.incomplete_bytes,
                self.last_was_large,
                self.header_len,
            );
            reserve_fresh(&mut self.input, READ_CHUNK_BYTES.min(max_bytes));
            let mut input = (&mut self.input).limit(max_bytes);
            match poll_read_buf(Pin::new(&mut self.reader), cx, &mut input) {
                Poll::Ready(Ok(0)) => {
                    let end = if self.input.is_empty() {
                        TransmissionEnd::Eof
                    } else {
                        TransmissionEnd::Truncated
                    };
                    self.end = Some(end);
                    progress = true;
                }
                Poll::Ready(Ok(_)) => progress = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if self.end.is_none() && cancelled.poll(cx).is_ready() {
            self.end = Some(TransmissionEnd::Shutdown);
            self.refuse_buffered();
            progress = true;
        }
        let idle_now = self.inflight.is_empty() && !self.replies_waiting();
        if let Some(idle) = self.idle.as_mut() {
            if progress || was_busy {
                idle.touch();
            }
            if self.end.is_none() && idle_now && idle.poll_expired(cx).is_ready() {
                let idle_secs = idle.timeout().as_secs();
                self.limit_hits.hit(Limit::IdleTimeout);
                self.end = Some(TransmissionEnd::IdleTimeout { idle_secs });
                progress = true;
            }
        }
        if self.end.is_none() && (!self.has_room() || self.blocked) && self.watch_hang_up(cx) {
            progress = true;
        }
        if self.poll_reply_stall(cx, wrote || !was_waiting, blocked) {
            progress = true;
        }
        let drained = self.end.is_some()
            && self.inflight.is_empty()
            && (!self.replies_waiting() || self.abandon_replies);
        if progress || drained {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    /// Watches replies waiting on the client: once it has taken no byte of them for the idle
    /// timeout (an incoming request is no excuse), they are dropped and the connection ends.
    /// `moved`: reply bytes left, or replies started waiting, in this pass. True when it just
    /// gave up on them.
    fn poll_reply_stall(&mut self, cx: &mut Context<'_>, moved: bool, blocked: bool) -> bool {
        let waiting = self.replies_waiting();
        let Some(stall) = self.reply_stall.as_mut() else {
            return false;
        };
        if self.abandon_replies {
            return false;
        }
        if moved || !waiting {
            stall.touch();
            self.last_queued_bytes = None;
        }
        if !waiting {
            return false;
        }
        // The client may read without freeing enough of the send buffer to wake us.
        if blocked || stall.poll_expired(cx).is_ready() {
            let queued = send_queue::queued_bytes(self.socket_fd);
            if queued.is_some_and(|now| self.last_queued_bytes.is_some_and(|was| now < was)) {
                stall.touch();
            }
            self.last_queued_bytes = queued;
        }
        if stall.poll_expired(cx).is_pending() {
            return false;
        }
        let idle_secs = stall.timeout().as_secs();
        self.limit_hits.hit(if self.closing_stall {
            Limit::RepliesUnreadAtClose
        } else {
            Limit::RepliesUnread
        });
        self.abandon_replies = true;
        // A protocol error or a disconnect already ending it stays the reason.
        self.end
            .get_or_insert(TransmissionEnd::RepliesUnread { idle_secs });
        true
    }

    /// Once the connection is ending (the client ended it, or the server is closing it: a
    /// stop, a forced close by a rollback, restore or delete, a revoked rule), the replies still
    /// to come get at most [`CLOSING_REPLY_STALL`] without a byte taken (a shorter idle timeout
    /// stays). A forced close has no grace period of its own: a client that stopped reading
    /// held its seat, its volume and its queued replies for good. SIGTERM's grace period, when
    /// shorter, ends it first.
    fn bound_closing_stall(&mut self) {
        let client_ended = matches!(
            self.end,
            Some(
                TransmissionEnd::Eof
                    | TransmissionEnd::Truncated
                    | TransmissionEnd::Disconnect
                    | TransmissionEnd::Protocol(_)
                    | TransmissionEnd::Shutdown
            )
        );
        if client_ended {
            self.bound_replies_at_close();
        }
    }

    /// Gives the replies still to come [`CLOSING_REPLY_STALL`] without a byte taken, unless a
    /// bound as short is set already. True when it set it.
    fn bound_replies_at_close(&mut self) -> bool {
        let bounded = self
            .reply_stall
            .as_ref()
            .is_some_and(|stall| stall.timeout() <= CLOSING_REPLY_STALL);
        if bounded {
            return false;
        }
        self.reply_stall = Some(IdleTimer::new(CLOSING_REPLY_STALL));
        self.closing_stall = true;
        self.last_queued_bytes = None;
        true
    }

    /// While the connection reads nothing (its reply budget is full), it would not see its
    /// client end the connection: another connection of the volume that finds the client gone
    /// (see `Attachment::fence_departed`) raises the fence for it and wakes it here. Its
    /// replies then get [`CLOSING_REPLY_STALL`], as when it reads the end itself: a client that
    /// half-closed and takes none of them would otherwise hold every write of the volume at
    /// the fence for good. True when it just set that bound.
    fn watch_hang_up(&mut self, cx: &mut Context<'_>) -> bool {
        let seat = self.session.attachment.seat();
        seat.wake_on_hang_up(cx.waker());
        seat.was_hung_up() && self.bound_replies_at_close()
    }

    /// Accounts for a finished request; returns its reply.
    fn finished(&mut self, done: Done) -> Frame {
        self.inflight_bytes -= done.held_bytes;
        if done.changed_data {
            self.drain.write_finished();
        }
        done.frame
    }

    /// Runs the requests in flight to completion after the socket failed, discarding replies.
    fn poll_abandoned(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.inflight.poll_next_unpin(cx) {
                Poll::Ready(Some(done)) => drop(self.finished(done)),
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => {
                    self.poll_fence_overdue(cx);
                    return Poll::Pending;
                }
            }
        }
    }

    fn poll_fence_overdue(&mut self, cx: &mut Context<'_>) {
        let session = self.session;
        self.drain
            .poll_overdue(cx, &session.peer, session.volume.name());
    }

    /// One writev of the waiting reply bytes, or one sendfile when a file range is first.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(Piece::File(_)) = self.outgoing.front() {
            return self.poll_send_file(cx);
        }
        if self.session.writes_mapped {
            return self.poll_write_iovecs(cx);
        }
        let slices: Vec<IoSlice<'_>> = self
            .outgoing
            .iter()
            .take(MAX_IOVECS_PER_WRITE)
            .map_while(|piece| match piece {
                Piece::Bytes(b) => Some(IoSlice::new(b)),
                // Never queued on this stream.
                Piece::File(_) | Piece::Mapped(_) => None,
            })
            .collect();
        let written = match Pin::new(&mut self.writer).poll_write_vectored(cx, &slices) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        drop(slices);
        self.unflushed = true;
        self.sent(written);
        Poll::Ready(Ok(()))
    }

    /// `poll_write` on a plain socket: one writev of the waiting buffers and mapped ranges.
    fn poll_write_iovecs(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // More than a socket takes in one call is not worth fetching: a queue of large READs
        // (a paced TCP connection's) would have every call touch thousands of pages.
        let mut prefetch_budget_bytes = MAPPED_PREFETCH_MAX_BYTES;
        let iovecs: Vec<libc::iovec> = self
            .outgoing
            .iter()
            .take(MAX_IOVECS_PER_WRITE)
            .map_while(|piece| match piece {
                Piece::Bytes(b) => Some(libc::iovec {
                    iov_base: b.as_ptr().cast_mut().cast(),
                    iov_len: b.len(),
                }),
                Piece::Mapped(mapped) => {
                    // All of the batch's pages at once, so their page walks overlap.
                    prefetch_budget_bytes -= mapped.prefetch_rest(prefetch_budget_bytes);
                    Some(libc::iovec {
                        iov_base: mapped.rest_start().as_ptr().cast(),
                        iov_len: mapped.rest_bytes(),
                    })
                }
                Piece::File(_) => None,
            })
            .collect();
        let written = match self.writer.poll_write_iovecs(cx, &iovecs) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) if e.raw_os_error() == Some(libc::EFAULT) => {
                // Some mapped range the kernel could not read (a page that failed to come back
                // from the disk, a file cut short) and nothing went out; which range is not
                // told. The first one of the batch is read into a buffer, which reports a
                // disk's error as one; the next writev tells about the rest.
                drop(iovecs);
                return Poll::Ready(self.read_first_mapped(MAX_IOVECS_PER_WRITE));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        drop(iovecs);
        self.unflushed = true;
        self.sent(written);
        Poll::Ready(Ok(()))
    }

    /// Replaces the first mapped range among the first `within` pieces by its bytes read from
    /// the file (zeroes past its end, as through the read path). An EFAULT with none there, or
    /// a failed read (the reply's header already said success), ends the connection.
    fn read_first_mapped(&mut self, within: usize) -> std::io::Result<()> {
        let found = self
            .outgoing
            .iter_mut()
            .take(within)
            .take_while(|piece| !matches!(piece, Piece::File(_)))
            .find_map(|piece| match piece {
                Piece::Mapped(mapped) => Some(mapped.read_rest().map(|rest| (piece, rest))),
                _ => None,
            });
        let (piece, rest) = match found {
            Some(Ok(found)) => found,
            Some(Err(e)) => {
                tracing::warn!(
                    peer = %self.session.peer,
                    volume = self.session.volume.name(),
                    error = %e,
                    "a READ already answered as successful could not be read from the head's file; ending the connection"
                );
                return Err(e);
            }
            None => return Err(std::io::Error::from_raw_os_error(libc::EFAULT)),
        };
        tracing::debug!(
            peer = %self.session.peer,
            volume = self.session.volume.name(),
            length_bytes = rest.len(),
            "the kernel could not read a mapped READ range; read it into a buffer"
        );
        *piece = Piece::Bytes(Bytes::from(rest));
        Ok(())
    }

    /// Drops the first `written` bytes of the queued pieces (buffers and mapped ranges).
    fn sent(&mut self, mut written: usize) {
        self.outgoing_bytes -= written as u64;
        while written > 0 {
            let front_bytes = match self.outgoing.front_mut() {
                Some(Piece::Bytes(front)) => {
                    let taken = written.min(front.len());
                    front.advance(taken);
                    written -= taken;
                    front.len()
                }
                Some(Piece::Mapped(front)) => {
                    let taken = written.min(front.rest_bytes());
                    front.advance(taken);
                    written -= taken;
                    front.rest_bytes()
                }
                Some(Piece::File(_)) | None => break,
            };
            if front_bytes == 0 {
                self.outgoing.pop_front();
            }
        }
    }

    /// One sendfile of the file range at the front of the queue.
    fn poll_send_file(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Some(Piece::File(range)) = self.outgoing.front_mut() else {
            return Poll::Ready(Ok(()));
        };
        let sent = ready!(self.writer.poll_send_file(
            cx,
            &range.file,
            range.offset_bytes,
            range.length_bytes
        ))?;
        self.unflushed = true;
        if sent == 0 {
            // The file ends before the range does (a data file may be shorter than its
            // volume): what lies past its end reads as zeroes, as through the read path.
            let rest = range.length_bytes as usize;
            self.outgoing.pop_front();
            self.outgoing
                .push_front(Piece::Bytes(Bytes::from(vec![0u8; rest])));
            return Poll::Ready(Ok(()));
        }
        self.session.metrics.sent_from_cache(sent as u64);
        self.outgoing_bytes -= sent as u64;
        range.offset_bytes += sent as u64;
        range.length_bytes -= sent as u64;
        if range.length_bytes == 0 {
            self.outgoing.pop_front();
        }
        Poll::Ready(Ok(()))
    }
}

/// Room for `additional` more bytes in `input`: in its own allocation when that is not shared
/// any more (the live bytes move to its front), else in a fresh buffer holding only the live
/// bytes. Never by `BytesMut::reserve`'s growing the allocation in place, which copies the
/// spent bytes before the live ones (up to a whole payload) along.
fn reserve_fresh(input: &mut BytesMut, additional: usize) {
    if input.capacity() - input.len() >= additional || input.try_reclaim(additional) {
        return;
    }
    let mut fresh = BytesMut::with_capacity(input.len() + additional);
    fresh.extend_from_slice(input);
    *input = fresh;
}

/// The most the next socket read may take, never 0, with `held` bytes in the input and
/// `incomplete_bytes` (header and payload) of the request at its front when that one is not all
/// there yet (else 0). A large request is read up to its end and the next header, no further;
/// after one whose end came without the next header, the rest of that header is read alone.
/// Bytes of a request read before its header asked for room would be copied when the buffer
/// grows for its payload. Small requests are read many at a time.
fn read_limit(
    held: usize,
    incomplete_bytes: usize,
    last_was_large: bool,
    header_len: usize,
) -> usize {
    if incomplete_bytes >= LARGE_REQUEST_BYTES && incomplete_bytes > held {
        incomplete_bytes - held + header_len
    } else if last_was_large && incomplete_bytes == 0 && held < header_len {
        header_len - held
    } else {
        usize::MAX
    }
}

/// The metrics kind of a command that runs against storage.
fn metric_kind(command: Command) -> Option<Kind> {
    Some(match command {
        Command::Read => Kind::Read,
        Command::Write => Kind::Write,
        Command::Trim => Kind::Trim,
        Command::WriteZeroes => Kind::Zero,
        Command::Flush => Kind::Flush,
        Command::BlockStatus => Kind::BlockStatus,
        Command::Cache => Kind::Cache,
        Command::Disc | Command::Unknown(_) => return None,
    })
}

/// Runs one validated request against storage and builds its reply, addressed `to`; the flag
/// says whether it succeeded.
async fn execute(
    session: &Session<'_>,
    request: &Request,
    to: ReplyTo,
    payload: Bytes,
) -> (Frame, bool) {
    let mode = session.mode;
    let volume = &session.volume;
    let fua = request.has_flag(CMD_FLAG_FUA);
    let (offset, length) = (request.offset, request.length);
    // Flushes wait too, so that one from a new connection also covers the old one's writes.
    let fenced = matches!(
        request.command,
        Command::Write | Command::WriteZeroes | Command::Trim | Command::Flush
    );
    if fenced {
        if let Err(e) =
            drain::pass_fence(volume.fence(), session.attachment.seat(), session.metrics).await
        {
            // Its connection ended before it could start (a stop, a forced close, its client
            // gone without NBD_CMD_DISC): sent if the socket still takes it.
            return (
                replies::error(mode, to, Errno::Shutdown, &e.to_string()),
                false,
            );
        }
    }
    // A forced close after the fence withdraws them still (see `Volume::changes_of`).
    let changes = volume.changes_of(session.attachment.seat());
    let result: Result<Frame, StorageError> = match request.command {
        Command::Read => {
            // Those the head's mapping could answer were answered as they were taken.
            if let Some(range) = cached_range(session, offset, length) {
                Ok(replies::read_from_file(mode, to, offset, range))
            } else {
                volume.read(offset, length as usize).await.map(|data| {
                    replies::read(mode, to, offset, data, request.has_flag(CMD_FLAG_DF))
                })
            }
        }
        Command::Write => {
            let written = if session.copies_large_writes {
                changes.write_here(offset, payload, fua).await
            } else {
                changes.write(offset, payload, fua).await
            };
            written.map(|()| replies::ok(mode, to))
        }
        Command::Flush => volume.flush().await.map(|()| replies::ok(mode, to)),
        Command::Trim => changes
            .trim(offset, length, fua)
            .await
            .map(|()| replies::ok(mode, to)),
        Command::WriteZeroes => {
            let zero_mode = ZeroMode {
                may_trim: !request.has_flag(CMD_FLAG_NO_HOLE),
                fast_only: request.has_flag(CMD_FLAG_FAST_ZERO),
            };
            changes
                .write_zeroes(offset, length, zero_mode, fua)
                .await
                .map(|()| replies::ok(mode, to))
        }
        Command::Cache => {
            volume.cache(offset, length);
            Ok(replies::ok(mode, to))
        }
        Command::BlockStatus => block_status(session, request, to).await,
        Command::Disc | Command::Unknown(_) => unreachable!("filtered before execution"),
    };
    match result {
        Ok(frame) => (frame, true),
        Err(e) => failure_reply(session, to, &e),
    }
}

/// The error reply to a request that failed, logged as `execute` logs failures.
fn failure_reply(session: &Session<'_>, to: ReplyTo, e: &StorageError) -> (Frame, bool) {
    let errno = e.to_errno();
    // FAST_ZERO refusals are part of normal operation. Otherwise one warning per connection:
    // a full disk fails every write, and the log must not drown in them.
    if errno != evsd_proto::Errno::NotSup {
        let volume = session.volume.name();
        if session.warned_failure.swap(true, Ordering::Relaxed) {
            tracing::debug!(peer = %session.peer, volume, error = %e, "request failed");
        } else {
            tracing::warn!(peer = %session.peer, volume, error = %e, "request failed (further failures on this connection are logged at debug level)");
        }
    }
    (
        replies::error(session.mode, to, errno, &e.to_string()),
        false,
    )
}

/// The file range a large READ can be sent from, when this socket takes file ranges and the
/// bytes are all in the page cache.
fn cached_range(session: &Session<'_>, offset: u64, length: u64) -> Option<FileRange> {
    if !session.sends_files || length < SEND_FROM_CACHE_MIN_BYTES {
        return None;
    }
    session.volume.cached_range(offset, length)
}

async fn block_status(
    session: &Session<'_>,
    request: &Request,
    to: ReplyTo,
) -> Result<Frame, StorageError> {
    let max_extents = if request.has_flag(CMD_FLAG_REQ_ONE) {
        1
    } else {
        MAX_EXTENTS_PER_REPLY
    };
    let mut head = BytesMut::with_capacity(64);
    let last = session.meta_contexts.len() - 1;
    let contexts = session.meta_contexts.iter().zip(&session.meta_queries);
    for (i, (context, query)) in contexts.enumerate() {
        let extents = match query {
            Some(query) => {
                let runs = session
                    .volume
                    .block_status(query, request.offset, request.length, max_extents)
                    .await?;
                let extents = replies::status_extents(query, &runs);
                if extents.is_empty() {
                    // Nothing of the range is left (the volume shrank since the request was
                    // checked): the spec wants one extent at least, with the safe answer
                    // (data; changed, for a dirty bitmap).
                    let changed = matches!(query, StatusQuery::ChangedSince { .. });
                    vec![evsd_proto::Extent {
                        length_bytes: request.length,
                        flags: u32::from(changed),
                    }]
                } else {
                    extents
                }
            }
            // Only contexts the catalog offered can be selected; this is the safe answer anyway.
            None => vec![evsd_proto::Extent {
                length_bytes: request.length,
                flags: 0,
            }],
        };
        reply::put_block_status(&mut head, session.mode, to, context.id, &extents, i == last);
    }
    Ok(vec![Piece::Bytes(head.freeze())])
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: usize = 28;

    #[test]
    fn the_closing_limit_logs_the_bound_it_enforces() {
        let seconds = format!("for {} s", CLOSING_REPLY_STALL.as_secs());
        let description = Limit::RepliesUnreadAtClose.description();
        assert!(description.ends_with(&seconds), "{description}");
    }

    #[test]
    fn a_large_request_is_read_with_the_next_header_and_no_further() {
        for header in [28, 32] {
            let large = header + (1 << 20);
            // Its header decoded, some payload held: the rest and the next header.
            assert_eq!(read_limit(header + 100, large, false, header), large - 100);
            assert_eq!(read_limit(large - 1, large, true, header), 1 + header);
            // Taken with only part of the next header: the rest of that header alone.
            assert_eq!(read_limit(0, 0, true, header), header);
            assert_eq!(read_limit(10, 0, true, header), header - 10);
            // A whole header held but not decoded yet (no room to start it): no limit.
            assert_eq!(read_limit(header, 0, true, header), usize::MAX);
            // The request is all there, waiting for room to start: no limit either.
            assert_eq!(read_limit(large, large, false, header), usize::MAX);
            assert_eq!(read_limit(large + 5, large, true, header), usize::MAX);
        }
    }

    #[test]
    fn small_requests_are_read_many_at_a_time_and_the_limit_is_never_zero() {
        let small = HEADER + 4096;
        assert_eq!(read_limit(HEADER, small, false, HEADER), usize::MAX);
        assert_eq!(read_limit(0, 0, false, HEADER), usize::MAX);
        let sizes = [
            0,
            small,
            LARGE_REQUEST_BYTES - 1,
            LARGE_REQUEST_BYTES,
            1 << 20,
        ];
        for held in (0..=HEADER + 8).chain(sizes.iter().flat_map(|&n| [n, n + 1])) {
            for incomplete in sizes {
                for last in [false, true] {
                    assert!(read_limit(held, incomplete, last, HEADER) > 0);
                }
            }
        }
    }

    #[test]
    fn room_comes_from_a_fresh_buffer_while_payloads_share_the_old_one() {
        let mut input = BytesMut::with_capacity(1 << 20);
        input.extend_from_slice(&vec![7u8; (1 << 20) - 10]);
        input.extend_from_slice(b"next-head!");
        let payload = input.split_to((1 << 20) - 10).freeze();
        reserve_fresh(&mut input, 4096);
        assert_eq!(&input[..], b"next-head!");
        // Exactly the live bytes and the room asked for: nothing of the spent megabyte.
        assert_eq!(input.capacity(), 10 + 4096);
        assert!(payload.iter().all(|&b| b == 7));
        // Enough room already: the buffer stays as it is.
        let before = input.as_ptr();
        reserve_fresh(&mut input, 100);
        assert_eq!(input.as_ptr(), before);
    }

    #[test]
    fn room_is_reclaimed_in_place_once_the_payloads_are_gone() {
        let mut input = BytesMut::with_capacity(1 << 20);
        let start = input.as_ptr();
        input.extend_from_slice(&vec![7u8; (1 << 20) - 10]);
        input.extend_from_slice(b"next-head!");
        drop(input.split_to((1 << 20) - 10));
        reserve_fresh(&mut input, 4096);
        assert_eq!(&input[..], b"next-head!");
        assert_eq!(
            input.as_ptr(),
            start,
            "the live bytes moved to the allocation's front"
        );
        assert!(input.capacity() >= 4096 + 10);
    }
}
