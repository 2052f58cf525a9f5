//! One client connection from accept to close: handshake, then transmission.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use evsd_proto::{ExportRefusal, HandshakeConfig, Negotiated, RequestError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::access::{AccessStore, ClientAddr, ClientIdentity, Decision};
use crate::metrics::{Limit, Metrics};
use crate::nbd::catalog::closed_refusal;
use crate::nbd::handshake::{
    self, negotiate, Established, Exports, HandshakeFailure, Handshaken, SHUTDOWN_OPTION_WAIT,
};
use crate::nbd::shutdown::Shutdown;
use crate::nbd::stream::Transport;
use crate::nbd::tls::TlsContext;
use crate::nbd::transmission::{self, ClientStream, TransmissionConfig, TransmissionEnd};
use crate::storage::attachments::{AttachRefused, Attachment};
use crate::storage::{Registry, Volume};

pub struct ConnectionConfig {
    pub handshake_timeout: Duration,
    pub handshake: HandshakeConfig,
    pub transmission: TransmissionConfig,
    /// Present when STARTTLS is accepted (`--tls on|require`).
    pub tls: Option<Arc<TlsContext>>,
    /// Which client may open which volume.
    pub access: Arc<AccessStore>,
}

/// Who connected, and what their socket allows.
pub struct Client {
    /// For logs: `ADDR:PORT`, or `unix#N`.
    pub peer: String,
    pub addr: ClientAddr,
    /// Whether cached READs may go out with `sendfile`: not on a TCP socket that BBR started
    /// on, which the kernel keeps pacing after a switch (see `nbd::sendfile`).
    pub may_send_files: bool,
}

/// Serves one client. Never panics on client input and logs at most one line per failure.
pub async fn serve<S: Transport>(
    stream: S,
    Client {
        peer,
        addr,
        may_send_files,
    }: Client,
    registry: Arc<Registry>,
    config: Arc<ConnectionConfig>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    let client = ClientIdentity {
        addr,
        tls: false,
        cert_names: Vec::new(),
    };
    let exports = Exports {
        registry: &registry,
        access: &config.access,
        metrics: &metrics,
        peer: &peer,
        shutdown: &shutdown.stop,
    };
    let limits = HandshakeLimits {
        deadline: Instant::now() + config.handshake_timeout,
        timeout: config.handshake_timeout,
        stop: &shutdown.stop,
        give_up: &shutdown.give_up,
        stopped_until: std::sync::OnceLock::new(),
        metrics: &metrics,
        peer: &peer,
    };
    let tls = config.tls.as_deref();
    let negotiated = negotiate(stream, &exports, client, config.handshake.clone(), tls);
    let Some(handshaken) = limits.run(negotiated).await else {
        return;
    };
    let attach_volume =
        |h: &Handshaken<S>| attach(h, &registry, &config, &metrics, &peer, &shutdown.stop);
    let Some((handshaken, (volume, attachment, stop))) =
        attach_or_negotiate(handshaken, &limits, &exports, tls, attach_volume).await
    else {
        return;
    };
    let Handshaken {
        stream,
        negotiated,
        final_reply,
        leftover,
        client,
        ..
    } = handshaken;
    let attached = Attached {
        negotiated,
        final_reply,
        leftover,
        client,
        peer,
        may_send_files,
        volume,
        attachment,
        stop,
        give_up: shutdown.give_up,
        config,
        metrics,
    };
    match stream {
        Established::Plain(stream) => attached.transmit(stream, false).await,
        Established::Tls(stream) => attached.transmit(*stream, true).await,
    }
}

/// Attaches the connection to the export its handshake ended on. A GO refused here, when the
/// catalog had just said yes, lets the client negotiate on (the option limit and the handshake
/// deadline bound how long); `None`: the connection is done.
async fn attach_or_negotiate<S: Transport, T>(
    mut handshaken: Handshaken<S>,
    limits: &HandshakeLimits<'_>,
    exports: &Exports<'_>,
    tls: Option<&TlsContext>,
    mut attach: impl FnMut(&Handshaken<S>) -> Result<T, ExportRefusal>,
) -> Option<(Handshaken<S>, T)> {
    loop {
        // A snapshot's export made a moment ago serves once the writes still landing in its
        // layer are done.
        if let Some(volume) = exports.registry.get(&handshaken.negotiated.export.name) {
            limits
                .run(async {
                    volume.settled().await;
                    Ok::<_, HandshakeFailure>(())
                })
                .await?;
        }
        match attach(&handshaken) {
            Ok(attached) => return Some((handshaken, attached)),
            Err(refusal) => {
                handshaken = limits
                    .run(handshaken.refuse(refusal, exports, tls))
                    .await??;
            }
        }
    }
}

/// Beyond `SHUTDOWN_OPTION_WAIT`, for the ERR_SHUTDOWN reply and the client's ABORT to pass.
const SHUTDOWN_SLACK: Duration = Duration::from_millis(500);

/// What bounds a handshake, however many GOs it takes.
struct HandshakeLimits<'a> {
    deadline: Instant,
    timeout: Duration,
    /// The server is shutting down: a handshake under way answers the client's options with
    /// ERR_SHUTDOWN, and gets `SHUTDOWN_OPTION_WAIT` (and a little) for the rest, whatever it
    /// waits on (a TLS handshake, a client not reading its replies).
    stop: &'a CancellationToken,
    /// The shutdown's grace period is over.
    give_up: &'a CancellationToken,
    /// When the handshake ends at the latest, once the server is shutting down.
    stopped_until: std::sync::OnceLock<Instant>,
    metrics: &'a Metrics,
    peer: &'a str,
}

impl HandshakeLimits<'_> {
    /// Runs one stretch of negotiation until the handshake deadline or shutdown; logs and counts
    /// how it failed. `None`: the connection is done.
    async fn run<T>(
        &self,
        negotiation: impl Future<Output = Result<T, HandshakeFailure>>,
    ) -> Option<T> {
        let peer = self.peer;
        let stopped = async {
            self.stop.cancelled().await;
            // Once per connection, however many stretches its handshake takes.
            let until = *self
                .stopped_until
                .get_or_init(|| Instant::now() + SHUTDOWN_OPTION_WAIT + SHUTDOWN_SLACK);
            tokio::time::sleep_until(until).await;
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout_at(self.deadline, negotiation) => outcome,
            _ = self.give_up.cancelled() => return None,
            _ = stopped => return None,
        };
        match outcome {
            Ok(Ok(done)) => Some(done),
            Ok(Err(HandshakeFailure::Aborted | HandshakeFailure::Closed)) => {
                tracing::debug!(%peer, "client left during the handshake");
                None
            }
            Ok(Err(failure)) if failure.ended_by_shutdown() => {
                tracing::debug!(%peer, error = %failure, "handshake ended by the shutdown");
                None
            }
            Ok(Err(failure)) => {
                if self.metrics.handshake_failed(failure.reason(), peer) {
                    tracing::warn!(%peer, reason = failure.reason(), error = %failure, "handshake failed (logged once per client and reason; every one is counted in evsd_handshake_failures_total)");
                } else {
                    tracing::debug!(%peer, reason = failure.reason(), error = %failure, "handshake failed");
                }
                None
            }
            Err(_) => {
                self.metrics.count_handshake_failure("timeout");
                self.metrics.limit_hit(Limit::HandshakeTimeout, peer);
                tracing::debug!(%peer, timeout_secs = self.timeout.as_secs(), "handshake timed out");
                None
            }
        }
    }
}

/// Attaches the connection to the volume the handshake ended on, or says why it cannot be
/// served after all: the catalog's answer is a moment old.
fn attach<S: Transport>(
    handshaken: &Handshaken<S>,
    registry: &Registry,
    config: &ConnectionConfig,
    metrics: &Metrics,
    peer: &str,
    shutdown: &CancellationToken,
) -> Result<(Arc<Volume>, Attachment, CancellationToken), ExportRefusal> {
    let name = &handshaken.negotiated.export.name;
    let Some(volume) = registry.get(name) else {
        tracing::warn!(%peer, export = %name, "export vanished during the handshake");
        return Err(ExportRefusal::Unknown);
    };
    // Ends on global shutdown or when the volume is force-deleted, whichever comes first.
    let stop = shutdown.child_token();
    let max_connections = config
        .access
        .policy(volume.name())
        .0
        .max_connections
        .map(|max| max as usize);
    let attachment = match volume.attachments().attach_limited(
        stop.clone(),
        Some(handshaken.stream.client_fd()),
        max_connections,
    ) {
        Ok(attachment) => attachment,
        Err(AttachRefused::Closed(closure)) => {
            tracing::warn!(%peer, export = volume.name(), "export being {} during the handshake", closure.doing());
            return Err(closed_refusal(volume.name(), closure));
        }
        Err(AttachRefused::Full(max)) => {
            // Another client took the last slot between the handshake's check and now.
            metrics.limit_hit(Limit::VolumeConnections, peer);
            tracing::debug!(%peer, export = volume.name(), max_connections = max, "volume connection limit reached after the handshake");
            return Err(ExportRefusal::Policy(format!(
                "connection limit of {max} reached"
            )));
        }
    };
    // The rules as they are now, not as the handshake found them: requests pipelined behind
    // the GO would otherwise run before the watch on the rules ends the connection.
    match config.access.decide(volume.name(), &handshaken.client) {
        Decision::Deny => {
            drop(attachment);
            tracing::warn!(%peer, export = volume.name(), "access to the export withdrawn during the handshake");
            return Err(ExportRefusal::Unknown);
        }
        Decision::Allow { read_only: true } if !handshaken.negotiated.export.read_only => {
            drop(attachment);
            tracing::warn!(%peer, export = volume.name(), "the export became read-only for this client during the handshake");
            return Err(ExportRefusal::Policy(
                "the export became read-only for this client: negotiate again".into(),
            ));
        }
        Decision::NeedsTls => {
            drop(attachment);
            return Err(ExportRefusal::TlsRequired);
        }
        Decision::Allow { .. } => {}
    }
    // Checked again once attached: a restore that started after the handshake's check and
    // has failed since reopens its volume marked. (One still running would have closed
    // it; one starting from now on disconnects this connection first.)
    if let Some(mark) = volume.restore_mark() {
        drop(attachment);
        tracing::warn!(%peer, export = volume.name(), "export holds an incomplete restore since the handshake");
        return Err(ExportRefusal::Policy(mark.refusal(volume.name())));
    }
    // The size the handshake announced, checked once attached (a shrink or a rollback to a
    // smaller snapshot needs no client attached, so from now on none can change it): one that
    // shrank since would have the client address blocks past the end. (A grow only leaves the
    // client the smaller size, as a grow online does.)
    if volume.size_bytes() < handshaken.negotiated.export.size_bytes {
        drop(attachment);
        tracing::warn!(%peer, export = volume.name(), announced_bytes = handshaken.negotiated.export.size_bytes, size_bytes = volume.size_bytes(), "export shrank during the handshake");
        return Err(ExportRefusal::Policy(
            "the export shrank during the handshake: negotiate again".into(),
        ));
    }
    Ok((volume, attachment, stop))
}

/// What transmission needs once the handshake is done, whatever the stream.
struct Attached {
    negotiated: Negotiated,
    /// Sent once the connection is attached to its volume (see `Handshaken::final_reply`).
    final_reply: BytesMut,
    leftover: BytesMut,
    client: ClientIdentity,
    peer: String,
    may_send_files: bool,
    volume: Arc<Volume>,
    attachment: Attachment,
    /// Ends on global shutdown or when the volume is force-deleted.
    stop: CancellationToken,
    /// Shutdown's grace period ran out.
    give_up: CancellationToken,
    config: Arc<ConnectionConfig>,
    metrics: Arc<Metrics>,
}

impl Attached {
    async fn transmit<S: Transport>(self, mut stream: S, tls: bool) {
        let Attached {
            negotiated,
            final_reply,
            leftover,
            client,
            peer,
            may_send_files,
            volume,
            attachment,
            stop,
            give_up,
            config,
            metrics,
        } = self;
        let ends = [&stop, &give_up];
        let sent = send_final_reply(&mut stream, &final_reply, config.handshake_timeout, ends);
        if let Err(reason) = sent.await {
            tracing::debug!(%peer, %reason, "the handshake's last reply was not sent");
            return;
        }
        let volume_metrics = metrics.volume(volume.name());
        let _connected = volume_metrics.connect();
        tracing::info!(%peer, export = volume.name(), mode = ?negotiated.mode, contexts = negotiated.meta_contexts.len(), tls, "client attached");
        let socket_fd = stream.client_fd();
        let (reader, writer) = stream.into_halves();
        let stream_parts = ClientStream {
            reader,
            writer,
            socket_fd,
            buffered: leftover,
            peer: peer.clone(),
            may_send_files,
            copies_large_writes: matches!(client.addr, ClientAddr::Tcp(_)),
            waits_for_payloads: matches!(client.addr, ClientAddr::Unix),
        };
        let export = volume.name().to_owned();
        let granted_read_only = negotiated.export.read_only;
        let served_volume = Arc::clone(&volume);
        let end = {
            let served = transmission::serve(
                stream_parts,
                negotiated,
                volume,
                &volume_metrics,
                &attachment,
                &config.transmission,
                Shutdown {
                    stop: stop.clone(),
                    give_up,
                },
            );
            tokio::pin!(served);
            // Rules tightened under an open connection end it the way shutdown does: requests
            // already received are answered, nothing new is read. Asked first at every wake:
            // rules changed while the final reply was on its way end the connection before
            // the requests behind the GO are read.
            tokio::select! {
                biased;
                () = config.access.revoked(&export, &client, granted_read_only) => {
                    tracing::warn!(%peer, %export, "access rules changed: disconnecting the client");
                    stop.cancel();
                    served.await
                }
                end = &mut served => end,
            }
        };
        match end {
            TransmissionEnd::Disconnect
            | TransmissionEnd::Eof
            | TransmissionEnd::Shutdown
            | TransmissionEnd::IdleTimeout { .. }
            | TransmissionEnd::RepliesUnread { .. } => {
                tracing::info!(%peer, reason = %end, "client detached");
            }
            // Counted and logged once per client as a limit hit.
            TransmissionEnd::Protocol(RequestError::PayloadTooLarge { .. }) => {
                tracing::debug!(%peer, error = %end, "connection closed");
            }
            other => tracing::warn!(%peer, error = %other, "connection closed"),
        }
        drop(attachment);
        // Pages the head's mapping reached stay mapped, and a mapped page is not dropped by
        // POSIX_FADV_DONTNEED (`dd iflag=nocache`, a backup tool's cache hygiene), nor its
        // large folio split: 4 KiB writes into folios a sequential read left large cost ext4
        // a walk of every block of the folio (18k IOPS against 80k). With no client attached
        // the mapping serves nothing; the next one maps the file again.
        if served_volume.attachments().count() == 0 {
            served_volume.release_head_mapping();
        }
    }
}

/// Sends the handshake's last reply, bounded like the rest of the handshake: a client that
/// stopped reading during negotiation must not hold shutdown (or a forced close) up here.
async fn send_final_reply<S: tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    reply: &[u8],
    timeout: Duration,
    ends: [&CancellationToken; 2],
) -> Result<(), String> {
    tokio::select! {
        sent = handshake::send(stream, reply) => sent.map_err(|e| format!("client left: {e}")),
        () = tokio::time::sleep(timeout) => Err(format!("client took none of it for {} s", timeout.as_secs())),
        () = ends[0].cancelled() => Err("the connection is being closed".into()),
        () = ends[1].cancelled() => Err("the connection is being closed".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::handshake::tests::{final_go_reply, go, unix_client, Fixture};
    use evsd_proto::consts::{REP_ERR_POLICY, REP_ERR_UNKNOWN};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    #[tokio::test]
    async fn a_late_refusal_negotiates_on_until_an_attach_succeeds_or_the_deadline() {
        let fixture = Fixture::new(&[("v", 1 << 20)]);
        let exports = fixture.exports();
        let shutdown = CancellationToken::new();
        let identity = unix_client;
        let limits = |timeout: Duration| HandshakeLimits {
            deadline: Instant::now() + timeout,
            timeout,
            stop: &shutdown,
            give_up: &shutdown,
            stopped_until: std::sync::OnceLock::new(),
            metrics: &fixture.metrics,
            peer: "test",
        };

        // Refused twice, then attached: the client asks three times on one connection.
        let (server, mut client) = UnixStream::pair().unwrap();
        let limits_ok = limits(Duration::from_secs(10));
        let client_side = async {
            let mut greeting = [0u8; 18];
            client.read_exact(&mut greeting).await.unwrap();
            client.write_all(&3u32.to_be_bytes()).await.unwrap();
            for _ in 0..2 {
                client.write_all(&go("v")).await.unwrap();
                assert_eq!(final_go_reply(&mut client).await.0, REP_ERR_POLICY);
            }
            client.write_all(&go("v")).await.unwrap();
        };
        let server_side = async {
            let config = HandshakeConfig::default();
            let handshaken = negotiate(server, &exports, identity(), config, None)
                .await
                .unwrap();
            let mut tries = 0;
            let attach = |h: &Handshaken<UnixStream>| {
                tries += 1;
                assert_eq!(h.negotiated.export.name, "v");
                if tries <= 2 {
                    Err(ExportRefusal::Policy(format!("try {tries} refused")))
                } else {
                    Ok(tries)
                }
            };
            attach_or_negotiate(handshaken, &limits_ok, &exports, None, attach).await
        };
        let ((), attached) = tokio::join!(client_side, server_side);
        let (_, tries) = attached.expect("the third GO attaches");
        assert_eq!(tries, 3);

        // Refused, and the client asks nothing more: the handshake's deadline ends it.
        let (server, mut client) = UnixStream::pair().unwrap();
        let limits_short = limits(Duration::from_millis(300));
        let client_side = async {
            let mut greeting = [0u8; 18];
            client.read_exact(&mut greeting).await.unwrap();
            client.write_all(&3u32.to_be_bytes()).await.unwrap();
            client.write_all(&go("v")).await.unwrap();
            assert_eq!(final_go_reply(&mut client).await.0, REP_ERR_UNKNOWN);
            client
        };
        let server_side = async {
            let config = HandshakeConfig::default();
            let handshaken = negotiate(server, &exports, identity(), config, None)
                .await
                .unwrap();
            let refuse = |_: &Handshaken<UnixStream>| Err::<(), _>(ExportRefusal::Unknown);
            attach_or_negotiate(handshaken, &limits_short, &exports, None, refuse).await
        };
        let (_client, attached) = tokio::join!(client_side, server_side);
        assert!(attached.is_none());
    }

    /// A client that reads nothing: the last handshake reply gives up on the timeout or when
    /// the connection is closed, and goes out whole to a client that reads.
    #[tokio::test]
    async fn the_final_reply_is_bounded_by_the_timeout_and_the_close() {
        // Far more than a Unix socket's buffers hold.
        let reply = vec![7u8; 16 << 20];
        let (stop, give_up) = (CancellationToken::new(), CancellationToken::new());
        let (mut server, _client) = UnixStream::pair().unwrap();
        let short = Duration::from_millis(200);
        let sent = send_final_reply(&mut server, &reply, short, [&stop, &give_up]).await;
        assert!(sent.unwrap_err().contains("took none"));

        let (mut server, _client) = UnixStream::pair().unwrap();
        let long = Duration::from_secs(60);
        let closing = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            give_up.cancel();
        };
        let (sent, ()) = tokio::join!(
            send_final_reply(&mut server, &reply, long, [&stop, &give_up]),
            closing
        );
        assert!(sent.unwrap_err().contains("being closed"));

        let (mut server, mut client) = UnixStream::pair().unwrap();
        let fresh = CancellationToken::new();
        let reading = async {
            let mut got = vec![0u8; reply.len()];
            client.read_exact(&mut got).await.unwrap();
            got
        };
        let (sent, got) = tokio::join!(
            send_final_reply(&mut server, &reply, long, [&stop, &fresh]),
            reading
        );
        sent.unwrap();
        assert!(got == reply);
    }
}
