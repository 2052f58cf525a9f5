//! One client connection from accept to close: handshake, then transmission.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use evsd_proto::{ExportRefusal, HandshakeConfig, Negotiated, RequestError};
use tokio_util::sync::CancellationToken;

use crate::access::{AccessStore, ClientAddr, ClientIdentity};
use crate::metrics::{Limit, Metrics};
use crate::nbd::catalog::closed_refusal;
use crate::nbd::handshake::{self, negotiate, Established, Exports, HandshakeFailure, Handshaken};
use crate::nbd::stream::Transport;
use crate::nbd::tls::TlsContext;
use crate::nbd::transmission::{self, ClientStream, TransmissionConfig, TransmissionEnd};
use crate::storage::attachments::AttachRefused;
use crate::storage::Registry;

pub struct ConnectionConfig {
    pub handshake_timeout: Duration,
    pub handshake: HandshakeConfig,
    pub transmission: TransmissionConfig,
    /// Present when STARTTLS is accepted (`--tls on|require`).
    pub tls: Option<Arc<TlsContext>>,
    /// Which client may open which volume.
    pub access: Arc<AccessStore>,
}

/// Serves one client. Never panics on client input and logs at most one line per failure.
pub async fn serve<S: Transport>(
    stream: S,
    peer: String,
    addr: ClientAddr,
    registry: Arc<Registry>,
    config: Arc<ConnectionConfig>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
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
    };
    let handshake = negotiate(
        stream,
        exports,
        client,
        config.handshake.clone(),
        config.tls.as_deref(),
    );
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(config.handshake_timeout, handshake) => outcome,
        _ = shutdown.cancelled() => return,
    };
    let Handshaken {
        stream,
        negotiated,
        final_reply,
        leftover,
        client,
    } = match outcome {
        Ok(Ok(done)) => done,
        Ok(Err(HandshakeFailure::Aborted | HandshakeFailure::Closed)) => {
            tracing::debug!(%peer, "client left during the handshake");
            return;
        }
        Ok(Err(failure)) => {
            metrics.handshake_failed(failure.reason());
            tracing::warn!(%peer, reason = failure.reason(), error = %failure, "handshake failed");
            return;
        }
        Err(_) => {
            metrics.handshake_failed("timeout");
            metrics.limit_hit(Limit::HandshakeTimeout, &peer);
            tracing::debug!(%peer, timeout_secs = config.handshake_timeout.as_secs(), "handshake timed out");
            return;
        }
    };
    let attached = Attached {
        negotiated,
        final_reply,
        leftover,
        client,
        peer,
        registry,
        config,
        metrics,
        shutdown,
    };
    match stream {
        Established::Plain(stream) => attached.transmit(stream, false).await,
        Established::Tls(stream) => attached.transmit(*stream, true).await,
    }
}

/// What transmission needs once the handshake is done, whatever the stream.
struct Attached {
    negotiated: Negotiated,
    /// Sent once the connection is attached to its volume (see `Handshaken::final_reply`).
    final_reply: BytesMut,
    leftover: BytesMut,
    client: ClientIdentity,
    peer: String,
    registry: Arc<Registry>,
    config: Arc<ConnectionConfig>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Attached {
    async fn transmit<S: Transport>(self, mut stream: S, tls: bool) {
        let Attached {
            negotiated,
            final_reply,
            leftover,
            client,
            peer,
            registry,
            config,
            metrics,
            shutdown,
        } = self;
        let Some(volume) = registry.get(&negotiated.export.name) else {
            tracing::warn!(%peer, export = %negotiated.export.name, "export vanished during the handshake");
            refuse_late(&mut stream, &negotiated, ExportRefusal::Unknown).await;
            return;
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
            Some(stream.client_fd()),
            max_connections,
        ) {
            Ok(attachment) => attachment,
            Err(AttachRefused::Closed(closure)) => {
                tracing::warn!(%peer, export = volume.name(), "export being {} during the handshake", closure.doing());
                let refusal = closed_refusal(volume.name(), closure);
                refuse_late(&mut stream, &negotiated, refusal).await;
                return;
            }
            Err(AttachRefused::Full(max)) => {
                // Another client took the last slot between the handshake's check and now.
                metrics.limit_hit(Limit::VolumeConnections, &peer);
                tracing::debug!(%peer, export = volume.name(), max_connections = max, "volume connection limit reached after the handshake");
                let reason = format!("connection limit of {max} reached");
                refuse_late(&mut stream, &negotiated, ExportRefusal::Policy(reason)).await;
                return;
            }
        };
        // Checked again once attached: a restore that started after the handshake's check and
        // has failed since reopens its volume marked. (One still running would have closed
        // it; one starting from now on disconnects this connection first.)
        if let Some(mark) = volume.restore_mark() {
            drop(attachment);
            tracing::warn!(%peer, export = volume.name(), "export holds an incomplete restore since the handshake");
            let refusal = ExportRefusal::Policy(mark.refusal(volume.name()));
            refuse_late(&mut stream, &negotiated, refusal).await;
            return;
        }
        if let Err(error) = handshake::send(&mut stream, &final_reply).await {
            tracing::debug!(%peer, %error, "client left before the handshake's last reply");
            return;
        }
        let volume_metrics = metrics.volume(volume.name());
        let _connected = volume_metrics.connect();
        tracing::info!(%peer, export = volume.name(), mode = ?negotiated.mode, contexts = negotiated.meta_contexts.len(), tls, "client attached");
        let (reader, writer) = stream.into_halves();
        let stream_parts = ClientStream {
            reader,
            writer,
            buffered: leftover,
            peer: peer.clone(),
        };
        let export = volume.name().to_owned();
        let granted_read_only = negotiated.export.read_only;
        let served = transmission::serve(
            stream_parts,
            negotiated,
            volume,
            &volume_metrics,
            &attachment,
            &config.transmission,
            stop.clone(),
        );
        tokio::pin!(served);
        // Rules tightened under an open connection end it the way shutdown does: requests
        // already received are answered, nothing new is read.
        let end = tokio::select! {
            end = &mut served => end,
            () = config.access.revoked(&export, &client, granted_read_only) => {
                tracing::warn!(%peer, %export, "access rules changed: disconnecting the client");
                stop.cancel();
                served.await
            }
        };
        match end {
            TransmissionEnd::Disconnect
            | TransmissionEnd::Eof
            | TransmissionEnd::Shutdown
            | TransmissionEnd::IdleTimeout { .. } => {
                tracing::info!(%peer, reason = %end, "client detached");
            }
            // Counted and logged once per client as a limit hit.
            TransmissionEnd::Protocol(RequestError::PayloadTooLarge { .. }) => {
                tracing::debug!(%peer, error = %end, "connection closed");
            }
            other => tracing::warn!(%peer, error = %other, "connection closed"),
        }
    }
}

/// Tells a client whose GO was accepted that its export cannot be served after all, before the
/// connection closes (EXPORT_NAME has no error reply: the close is all it gets).
async fn refuse_late<S: Transport>(
    stream: &mut S,
    negotiated: &Negotiated,
    refusal: ExportRefusal,
) {
    if let Some(reply) = negotiated.late_refusal(refusal) {
        // The connection closes either way; a client already gone changes nothing.
        let _ = handshake::send(stream, &reply).await;
    }
}
