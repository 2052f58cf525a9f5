//! One client connection from accept to close: handshake, then transmission.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use evsd_proto::{HandshakeConfig, Negotiated};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::nbd::handshake::{negotiate, Established, HandshakeFailure, Handshaken};
use crate::nbd::stream::Transport;
use crate::nbd::tls::TlsContext;
use crate::nbd::transmission::{self, ClientStream, TransmissionConfig, TransmissionEnd};
use crate::storage::Registry;

pub struct ConnectionConfig {
    pub handshake_timeout: Duration,
    pub handshake: HandshakeConfig,
    pub transmission: TransmissionConfig,
    /// Present when STARTTLS is accepted (`--tls on|require`).
    pub tls: Option<Arc<TlsContext>>,
}

/// Serves one client. Never panics on client input and logs at most one line per failure.
pub async fn serve<S: Transport>(
    stream: S,
    peer: String,
    registry: Arc<Registry>,
    config: Arc<ConnectionConfig>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let handshake = negotiate(
        stream,
        &registry,
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
        leftover,
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
            tracing::warn!(%peer, timeout_secs = config.handshake_timeout.as_secs(), "handshake timed out");
            return;
        }
    };
    let attached = Attached {
        negotiated,
        leftover,
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
    leftover: BytesMut,
    peer: String,
    registry: Arc<Registry>,
    config: Arc<ConnectionConfig>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Attached {
    async fn transmit<S: Transport>(self, stream: S, tls: bool) {
        let Attached {
            negotiated,
            leftover,
            peer,
            registry,
            config,
            metrics,
            shutdown,
        } = self;
        let Some(volume) = registry.get(&negotiated.export.name) else {
            tracing::warn!(%peer, export = %negotiated.export.name, "export vanished during the handshake");
            return;
        };
        // Ends on global shutdown or when the volume is force-deleted, whichever comes first.
        let stop = shutdown.child_token();
        let Some(_attachment) = volume.attachments().attach(stop.clone()) else {
            tracing::warn!(%peer, export = volume.name(), "export deleted during the handshake");
            return;
        };
        let volume_metrics = metrics.volume(volume.name());
        let _connected = volume_metrics.connect();
        tracing::info!(%peer, export = volume.name(), mode = ?negotiated.mode, contexts = negotiated.meta_contexts.len(), tls, "client attached");
        let (reader, writer) = stream.into_halves();
        let client = ClientStream {
            reader,
            writer,
            buffered: leftover,
            peer: peer.clone(),
        };
        let end = transmission::serve(
            client,
            negotiated,
            volume,
            &volume_metrics,
            &config.transmission,
            stop,
        )
        .await;
        match end {
            TransmissionEnd::Disconnect | TransmissionEnd::Eof | TransmissionEnd::Shutdown => {
                tracing::info!(%peer, reason = %end, "client detached");
            }
            other => tracing::warn!(%peer, error = %other, "connection closed"),
        }
    }
}
