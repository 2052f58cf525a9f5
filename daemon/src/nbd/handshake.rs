//! Drives the protocol crate's handshake state machine over a socket, upgrading it to TLS when the
//! state machine accepts STARTTLS.

use bytes::BytesMut;
use evsd_proto::{HandshakeConfig, HandshakeError, Negotiated, ServerHandshake, Step};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::server::TlsStream;

use crate::access::{cert_names, AccessStore, ClientIdentity};
use crate::metrics::Metrics;
use crate::nbd::catalog::RegistryCatalog;
use crate::nbd::stream::Transport;
use crate::nbd::tls::TlsContext;
use crate::storage::Registry;

/// How a handshake ended without reaching transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error("protocol violation: {0}")]
    Protocol(#[from] HandshakeError),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("STARTTLS accepted but the server has no TLS configuration")]
    TlsUnconfigured,
    #[error("client closed the connection during the handshake")]
    Closed,
    #[error("client aborted the handshake")]
    Aborted,
}

impl HandshakeFailure {
    /// Short label used in logs (and later as a metrics label).
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeFailure::Protocol(HandshakeError::UnknownClientFlags(_)) => "bad_client_flags",
            HandshakeFailure::Protocol(HandshakeError::BadOptionMagic(_)) => "bad_option_magic",
            HandshakeFailure::Protocol(HandshakeError::UnknownExport(_)) => "unknown_export",
            HandshakeFailure::Protocol(HandshakeError::TlsRequired(_)) => "tls_required",
            HandshakeFailure::Protocol(HandshakeError::ExportRefused { .. }) => "export_refused",
            HandshakeFailure::Protocol(_) => "protocol",
            HandshakeFailure::Io(_) => "io",
            HandshakeFailure::Tls(_) | HandshakeFailure::TlsUnconfigured => "tls",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Aborted => "aborted",
        }
    }
}

/// The stream transmission runs on: the socket itself, or TLS over it.
pub enum Established<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

/// A finished handshake: the stream, the negotiation, the reply that ends it, and any bytes the
/// client already sent past it (pipelined first requests).
pub struct Handshaken<S> {
    pub stream: Established<S>,
    pub negotiated: Negotiated,
    /// The last reply (EXPORT_NAME's export data, or GO's information and ACK), not yet sent: the
    /// client may use the export as soon as it has it, so the connection attaches to the volume
    /// first. Otherwise a snapshot delete or a connection limit could miss a client that already
    /// counts itself connected.
    pub final_reply: BytesMut,
    pub leftover: BytesMut,
    /// The client as its access was decided: with TLS and certificate names once STARTTLS ran.
    pub client: ClientIdentity,
}

/// What the handshake looks exports up in.
pub struct Exports<'a> {
    pub registry: &'a Registry,
    pub access: &'a AccessStore,
    /// Where refusals for a volume's connection limit are counted, under this peer.
    pub metrics: &'a Metrics,
    pub peer: &'a str,
}

impl<'a> Exports<'a> {
    /// The exports as `client` may see them.
    fn catalog<'c>(&self, client: &'c ClientIdentity) -> RegistryCatalog<'c>
    where
        'a: 'c,
    {
        RegistryCatalog {
            registry: self.registry,
            access: self.access,
            client,
            metrics: self.metrics,
            peer: self.peer,
        }
    }
}

/// Where one run of options stopped.
enum Phase {
    /// With the final reply, unsent.
    Transmission(Negotiated, BytesMut),
    StartTls,
}

/// Runs the handshake, including a STARTTLS upgrade when the config allows it.
pub async fn negotiate<S: Transport>(
    mut stream: S,
    exports: Exports<'_>,
    mut client: ClientIdentity,
    config: HandshakeConfig,
    tls: Option<&TlsContext>,
) -> Result<Handshaken<S>, HandshakeFailure> {
    let mut handshake = ServerHandshake::new(config);
    let mut out = BytesMut::with_capacity(1024);
    handshake.write_greeting(&mut out);
    stream.write_all(&out).await?;
    let mut input = BytesMut::with_capacity(4096);
    let catalog = exports.catalog(&client);
    match run_options(&mut handshake, &mut stream, &mut input, &catalog).await? {
        Phase::Transmission(negotiated, final_reply) => {
            return Ok(Handshaken {
                stream: Established::Plain(stream),
                negotiated,
                final_reply,
                leftover: input,
                client,
            })
        }
        Phase::StartTls => {}
    }
    let acceptor = tls.ok_or(HandshakeFailure::TlsUnconfigured)?.acceptor();
    // The state machine refused STARTTLS if bytes followed it, so nothing is lost here.
    let mut stream = acceptor
        .accept(stream)
        .await
        .map_err(HandshakeFailure::Tls)?;
    // rustls only hands out a client certificate its verifier accepted (`--tls-ca`).
    client.tls = true;
    client.cert_names = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(cert_names::names)
        .unwrap_or_default();
    let catalog = exports.catalog(&client);
    match run_options(&mut handshake, &mut stream, &mut input, &catalog).await? {
        Phase::Transmission(negotiated, final_reply) => Ok(Handshaken {
            stream: Established::Tls(Box::new(stream)),
            negotiated,
            final_reply,
            leftover: input,
            client,
        }),
        // The state machine answers a second STARTTLS with ERR_INVALID; never reached.
        Phase::StartTls => Err(HandshakeFailure::Protocol(HandshakeError::AlreadyFinished)),
    }
}

/// Feeds options to the state machine until it reaches transmission or accepts STARTTLS. The
/// reply that enters transmission is returned, not sent.
async fn run_options<S>(
    handshake: &mut ServerHandshake,
    stream: &mut S,
    input: &mut BytesMut,
    catalog: &RegistryCatalog<'_>,
) -> Result<Phase, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(1024);
    loop {
        out.clear();
        match handshake.advance(input, catalog, &mut out)? {
            Step::Transmission(negotiated) => return Ok(Phase::Transmission(negotiated, out)),
            Step::NeedInput => {
                send(stream, &out).await?;
                if stream.read_buf(input).await? == 0 {
                    return Err(HandshakeFailure::Closed);
                }
            }
            Step::StartTls => {
                send(stream, &out).await?;
                return Ok(Phase::StartTls);
            }
            Step::Aborted => {
                send(stream, &out).await?;
                return Err(HandshakeFailure::Aborted);
            }
        }
    }
}

/// Writes replies and flushes them: TLS buffers written records until flushed, and the client
/// waits for our replies.
pub async fn send<S: AsyncWrite + Unpin>(stream: &mut S, out: &[u8]) -> std::io::Result<()> {
    if !out.is_empty() {
        stream.write_all(out).await?;
    }
    stream.flush().await
}
