//! The transmission phase: read requests, run each as its own task against storage, and send the
//! replies as they complete, in whatever order that is.
//!
//! socket → decode (proto) → validate (proto) → storage → io engine → reply frame → writer task.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use evsd_proto::consts::{
    CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE,
};
use evsd_proto::meta::BASE_ALLOCATION;
use evsd_proto::{
    decode_request, reply, request_header_len, Command, ExportLimits, MetaContext, Negotiated,
    ReplyMode, ReplyTo, Request,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::StorageError;
use crate::nbd::replies::{self, Frame};
use crate::storage::{Volume, ZeroMode};

/// Most extents one BLOCK_STATUS reply carries per context (the spec allows 2^20).
const MAX_EXTENTS_PER_REPLY: usize = 4096;
/// Buffers handed to one writev (Linux allows 1024).
const MAX_IOVECS_PER_WRITE: usize = 512;

/// Why transmission ended.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionEnd {
    #[error("client sent NBD_CMD_DISC")]
    Disconnect,
    #[error("client closed the connection")]
    Eof,
    #[error("server is shutting down")]
    Shutdown,
    #[error("protocol violation: {0}")]
    Protocol(#[from] evsd_proto::RequestError),
    #[error("client closed the connection in the middle of a request")]
    Truncated,
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything a request task needs, shared by all tasks of one connection.
struct Session {
    volume: Arc<Volume>,
    mode: ReplyMode,
    meta_contexts: Vec<MetaContext>,
    peer: String,
}

/// A client's socket halves, the bytes already read past the handshake, and its name for logs.
pub struct ClientStream<R, W> {
    pub reader: R,
    pub writer: W,
    pub buffered: BytesMut,
    pub peer: String,
}

pub struct TransmissionConfig {
    pub max_inflight_requests: usize,
}

/// Serves requests until the client disconnects, breaks the protocol, or shutdown is requested.
/// Requests already received are always answered before this returns.
pub async fn serve<R, W>(
    client: ClientStream<R, W>,
    negotiated: Negotiated,
    volume: Arc<Volume>,
    config: &TransmissionConfig,
    shutdown: CancellationToken,
) -> TransmissionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let ClientStream {
        mut reader,
        writer,
        buffered: mut input,
        peer,
    } = client;
    let mode = negotiated.mode;
    let limits = ExportLimits {
        size_bytes: volume.size_bytes(),
        read_only: negotiated.export.read_only,
        max_payload_bytes: u64::from(negotiated.export.block_size.max_payload_bytes),
        mode,
        meta_contexts: negotiated.meta_contexts.len(),
    };
    let session = Arc::new(Session {
        volume,
        mode,
        meta_contexts: negotiated.meta_contexts,
        peer,
    });
    let inflight = Arc::new(Semaphore::new(config.max_inflight_requests));
    let (frames, frames_rx) = mpsc::channel::<Frame>(config.max_inflight_requests);
    let writer_task = tokio::spawn(write_frames(writer, frames_rx));
    let header_len = request_header_len(mode);

    let end = loop {
        // Back-pressure: a request is read only once it has a slot.
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break TransmissionEnd::Shutdown,
            permit = Arc::clone(&inflight).acquire_owned() => permit.expect("semaphore never closed"),
        };
        match fill(&mut reader, &mut input, header_len, &shutdown).await {
            Ok(true) => {}
            Ok(false) => break TransmissionEnd::Eof,
            Err(end) => break end,
        }
        let request = match decode_request(&input, mode) {
            Ok(Some(request)) => request,
            Ok(None) => unreachable!("fill returned a whole header"),
            Err(e) => break e.into(),
        };
        input.advance(header_len);
        if let Err(e) = limits.check_payload(&request) {
            break e.into();
        }
        let payload_len = request.payload_len(mode) as usize;
        let payload = if payload_len > 0 {
            match fill(&mut reader, &mut input, payload_len, &shutdown).await {
                Ok(true) => input.split_to(payload_len).freeze(),
                Ok(false) => break TransmissionEnd::Truncated,
                Err(end) => break end,
            }
        } else {
            Bytes::new()
        };
        if request.command == Command::Disc {
            break TransmissionEnd::Disconnect;
        }
        let to = ReplyTo {
            cookie: request.cookie,
            offset: request.offset,
        };
        if let Err(errno) = limits.validate(&request) {
            let message = format!(
                "{:?} at offset {} length {} refused",
                request.command, request.offset, request.length
            );
            if frames
                .send(replies::error(mode, to, errno, &message))
                .await
                .is_err()
            {
                break TransmissionEnd::Io(std::io::ErrorKind::BrokenPipe.into());
            }
            continue;
        }
        let session = Arc::clone(&session);
        let frames = frames.clone();
        tokio::spawn(async move {
            let frame = execute(&session, &request, payload).await;
            // A closed channel means the writer died with the socket; nothing left to tell.
            let _ = frames.send(frame).await;
            drop(permit);
        });
    };

    // Answer everything already accepted before closing: wait until every slot is free again.
    let all = u32::try_from(config.max_inflight_requests).unwrap_or(u32::MAX);
    let _drained = inflight.acquire_many(all).await;
    drop(frames);
    match writer_task.await {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(e)) => tracing::debug!(peer = %session.peer, error = %e, "reply writer stopped"),
    }
    end
}

/// Reads until `input` holds at least `wanted` bytes. Ok(false) on a clean EOF before any byte of
/// a new message; a partial message followed by EOF is `Truncated`.
async fn fill<R: AsyncRead + Unpin>(
    reader: &mut R,
    input: &mut BytesMut,
    wanted: usize,
    shutdown: &CancellationToken,
) -> Result<bool, TransmissionEnd> {
    if input.len() < wanted {
        input.reserve(wanted - input.len());
    }
    while input.len() < wanted {
        let started_empty = input.is_empty();
        let n = tokio::select! {
            biased;
            n = reader.read_buf(input) => n?,
            _ = shutdown.cancelled(), if started_empty => return Err(TransmissionEnd::Shutdown),
        };
        if n == 0 {
            return if started_empty {
                Ok(false)
            } else {
                Err(TransmissionEnd::Truncated)
            };
        }
    }
    Ok(true)
}

/// Writes frames as they complete. Whatever frames are waiting go out together in one writev, so
/// a burst of small replies shares a syscall and read data is never copied into a buffer.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut frames: mpsc::Receiver<Frame>,
) -> std::io::Result<()> {
    let mut pending: VecDeque<Bytes> = VecDeque::new();
    while let Some(frame) = frames.recv().await {
        pending.extend(frame);
        while pending.len() < MAX_IOVECS_PER_WRITE {
            match frames.try_recv() {
                Ok(frame) => pending.extend(frame),
                Err(_) => break,
            }
        }
        write_all_vectored(&mut writer, &mut pending).await?;
    }
    writer.shutdown().await
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    pending: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !pending.is_empty() {
        let slices: Vec<IoSlice<'_>> = pending
            .iter()
            .take(MAX_IOVECS_PER_WRITE)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut written = writer.write_vectored(&slices).await?;
        drop(slices);
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let Some(front) = pending.front_mut() else {
                break;
            };
            if written >= front.len() {
                written -= front.len();
                pending.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

/// Runs one validated request against storage and builds its reply.
async fn execute(session: &Session, request: &Request, payload: Bytes) -> Frame {
    let mode = session.mode;
    let to = ReplyTo {
        cookie: request.cookie,
        offset: request.offset,
    };
    let volume = &session.volume;
    let fua = request.has_flag(CMD_FLAG_FUA);
    let (offset, length) = (request.offset, request.length);
    let result: Result<Frame, StorageError> = match request.command {
        Command::Read => volume
            .read(offset, length as usize)
            .await
            .map(|data| replies::read(mode, to, offset, data, request.has_flag(CMD_FLAG_DF))),
        Command::Write => volume
            .write(offset, payload, fua)
            .await
            .map(|()| replies::ok(mode, to)),
        Command::Flush => volume.flush().await.map(|()| replies::ok(mode, to)),
        Command::Trim => volume
            .trim(offset, length, fua)
            .await
            .map(|()| replies::ok(mode, to)),
        Command::WriteZeroes => {
            let zero_mode = ZeroMode {
                may_trim: !request.has_flag(CMD_FLAG_NO_HOLE),
                fast_only: request.has_flag(CMD_FLAG_FAST_ZERO),
            };
            volume
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
    result.unwrap_or_else(|e| {
        let errno = e.to_errno();
        // FAST_ZERO refusals are part of normal operation; everything else is worth a line.
        if errno != evsd_proto::Errno::NotSup {
            tracing::warn!(peer = %session.peer, volume = volume.name(), error = %e, "request failed");
        }
        replies::error(mode, to, errno, &e.to_string())
    })
}

async fn block_status(
    session: &Session,
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
    for (i, context) in session.meta_contexts.iter().enumerate() {
        let extents = match context.name.as_str() {
            BASE_ALLOCATION => {
                let found = session
                    .volume
                    .block_status(request.offset, request.length, max_extents)
                    .await?;
                replies::allocation_extents(&found)
            }
            // Only contexts the catalog offered can be selected; this is the safe answer anyway.
            _ => vec![evsd_proto::Extent {
                length_bytes: request.length,
                flags: 0,
            }],
        };
        reply::put_block_status(&mut head, session.mode, to, context.id, &extents, i == last);
    }
    Ok(vec![head.freeze()])
}
