//! The admin listener and the per-client loop: greeting, then one response per request line.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept_failures::AcceptFailures;
use crate::activation::InheritedUnix;
use crate::admin::methods::dispatch;
use crate::admin::protocol::{
    greeting_line, parse_request, response_line, AdminError, ErrorCode, MAX_LINE_BYTES,
};
use crate::admin::AdminContext;
use crate::nbd::server::SocketFile;

/// Admin clients served at once; more are told `busy` and closed.
const MAX_ADMIN_CLIENTS: usize = 64;

/// How long shutdown waits for admin requests in progress (a forced delete drains its clients).
const CLIENT_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Only the daemon's user may manage volumes.
const SOCKET_MODE: u32 = 0o600;

pub struct AdminListener {
    listener: UnixListener,
    socket_file: SocketFile,
    /// Clients must run as the daemon's user (or root): set for a socket we bound, whose file
    /// had the umask's mode from bind to chmod. An inherited socket's access is the unit's.
    owner_only: bool,
}

impl AdminListener {
    pub fn bind(path: PathBuf) -> std::io::Result<AdminListener> {
        let (listener, socket_file) = SocketFile::bind(path)?;
        // Set right after bind, before the first accept, so no client is served through a
        // socket with the umask's wider mode.
        std::fs::set_permissions(
            &socket_file.path,
            std::fs::Permissions::from_mode(SOCKET_MODE),
        )?;
        Ok(AdminListener {
            listener,
            socket_file,
            owner_only: true,
        })
    }

    /// Serves on a socket the service manager bound; its mode is the unit's SocketMode=.
    pub fn from_inherited(inherited: InheritedUnix) -> std::io::Result<AdminListener> {
        Ok(AdminListener {
            listener: UnixListener::from_std(inherited.listener)?,
            socket_file: SocketFile::inherited(inherited.path),
            owner_only: false,
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.socket_file.path
    }

    /// Serves admin clients until `shutdown`, then ends their loops and removes the socket file
    /// if we bound it.
    pub async fn run(
        self,
        ctx: Arc<AdminContext>,
        idle_timeout: Duration,
        shutdown: CancellationToken,
    ) {
        let tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(MAX_ADMIN_CLIENTS));
        let mut failures = AcceptFailures::new("admin");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    if self.owner_only && !is_own_user(&stream) {
                        // Never served: it connected while the socket's mode was wider.
                        continue;
                    }
                    let permit = Arc::clone(&limit).try_acquire_owned();
                    let ctx = Arc::clone(&ctx);
                    let shutdown = shutdown.clone();
                    tracker.spawn(async move {
                        match permit {
                            Ok(_permit) => {
                                serve_client(stream, &ctx, idle_timeout, &shutdown).await
                            }
                            Err(_) => refuse(stream).await,
                        }
                    });
                }
                Err(error) => failures.failed(error).await,
            }
        }
        tracker.close();
        // A client that stopped reading could hold its task in a write forever.
        if tokio::time::timeout(CLIENT_DRAIN_TIMEOUT, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("admin clients still busy at shutdown");
        }
        self.socket_file.remove();
    }
}

/// Whether the client runs as the daemon's user or as root.
fn is_own_user(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == own || cred.uid() == 0 => true,
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                "refused an admin client running as another user"
            );
            false
        }
        Err(error) => {
            tracing::warn!(%error, "refused an admin client whose user cannot be told");
            false
        }
    }
}

async fn refuse(mut stream: UnixStream) {
    let error = AdminError::new(
        ErrorCode::Busy,
        format!("too many admin clients (at most {MAX_ADMIN_CLIENTS})"),
    );
    let line = response_line(&serde_json::Value::Null, &Err(error));
    let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
}

/// One client: never panics on its input; a bad line costs that line, an overlong one the
/// connection. A client that sends no request or reads no response for `idle_timeout` is
/// disconnected: it holds one of the `MAX_ADMIN_CLIENTS` places.
async fn serve_client(
    stream: UnixStream,
    ctx: &AdminContext,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) {
    let (reader, mut writer) = stream.into_split();
    let mut lines = FramedRead::new(reader, LinesCodec::new_with_max_length(MAX_LINE_BYTES));
    if send(&mut writer, &greeting_line(), idle_timeout)
        .await
        .is_err()
    {
        return;
    }
    // Restarted by each request, not by blank lines: a client sending only those is idle.
    let mut idle_since = tokio::time::Instant::now();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(idle_since + idle_timeout) => {
                let error = AdminError::new(
                    ErrorCode::Busy,
                    format!("no request for {} s: disconnected", idle_timeout.as_secs()),
                );
                tracing::debug!("admin client idle: disconnected");
                let line = response_line(&serde_json::Value::Null, &Err(error));
                let _ = send(&mut writer, &line, idle_timeout).await;
                return;
            }
            next = lines.next() => next,
        };
        let line = match next {
            None => return,
            Some(Ok(line)) => line,
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                let error = AdminError::new(
                    ErrorCode::ParseError,
                    format!("request line longer than {MAX_LINE_BYTES} bytes"),
                );
                let _ = send(
                    &mut writer,
                    &response_line(&serde_json::Value::Null, &Err(error)),
                    idle_timeout,
                )
                .await;
                return;
            }
            Some(Err(LinesCodecError::Io(error))) => {
                // Invalid UTF-8 ends the stream like any read error; say why before closing.
                if error.kind() == std::io::ErrorKind::InvalidData {
                    let error = AdminError::new(
                        ErrorCode::ParseError,
                        format!("request line is not UTF-8: {error}"),
                    );
                    let _ = send(
                        &mut writer,
                        &response_line(&serde_json::Value::Null, &Err(error)),
                        idle_timeout,
                    )
                    .await;
                }
                tracing::debug!(%error, "admin client read failed");
                return;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let response = match parse_request(&line) {
            Ok(request) => {
                let started = std::time::Instant::now();
                let outcome = dispatch(ctx, &request.method, request.params).await;
                tracing::debug!(
                    method = %request.method,
                    took_us = started.elapsed().as_micros() as u64,
                    "admin request"
                );
                if let Err(e) = &outcome {
                    tracing::info!(method = %request.method, code = ?e.code, error = %e.message, "admin request failed");
                }
                response_line(&request.id, &outcome)
            }
            Err(rejected) => response_line(&rejected.id, &Err(rejected.error)),
        };
        if send(&mut writer, &response, idle_timeout).await.is_err() {
            return;
        }
        // Idle from its answer on (a long request is no idleness).
        idle_since = tokio::time::Instant::now();
    }
}

/// Writes one line; a client that does not read it within `timeout` is given up on.
async fn send(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    line: &str,
    timeout: Duration,
) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    match tokio::time::timeout(timeout, writer.write_all(&bytes)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the admin client read no response",
        )),
    }
}
