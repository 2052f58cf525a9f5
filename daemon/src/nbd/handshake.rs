//! Drives the protocol crate's handshake state machine over a socket, upgrading it to TLS when the
//! state machine accepts STARTTLS.

use bytes::BytesMut;
use evsd_proto::{
    ExportRefusal, HandshakeConfig, HandshakeError, Negotiated, ServerHandshake, Step,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

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
    #[error("the server is shutting down and the client sent no option within {wait_ms} ms")]
    ShuttingDown { wait_ms: u128 },
}

/// How long a client in the handshake has, once the server starts shutting down, to send its
/// next option (answered with ERR_SHUTDOWN) or its ABORT before the connection is closed.
pub(crate) const SHUTDOWN_OPTION_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl HandshakeFailure {
    /// The server's shutdown ended the handshake, not the client.
    pub fn ended_by_shutdown(&self) -> bool {
        matches!(
            self,
            HandshakeFailure::Protocol(HandshakeError::ExportNameDuringShutdown(_))
                | HandshakeFailure::ShuttingDown { .. }
        )
    }

    /// Short label used in logs (and later as a metrics label).
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeFailure::Protocol(HandshakeError::UnknownClientFlags(_)) => "bad_client_flags",
            HandshakeFailure::Protocol(HandshakeError::BadOptionMagic(_)) => "bad_option_magic",
            HandshakeFailure::Protocol(HandshakeError::UnknownExport(_)) => "unknown_export",
            HandshakeFailure::Protocol(HandshakeError::TlsRequired(_)) => "tls_required",
            HandshakeFailure::Protocol(HandshakeError::ExportRefused { .. }) => "export_refused",
            HandshakeFailure::Protocol(HandshakeError::ExportNameDuringShutdown(_))
            | HandshakeFailure::ShuttingDown { .. } => "shutdown",
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
    /// Kept to go on negotiating when the export is refused after all (see [`Handshaken::refuse`]).
    handshake: ServerHandshake,
}

impl<S: Transport> Established<S> {
    /// The client socket, for the volume's attachment list.
    pub fn client_fd(&self) -> std::os::fd::RawFd {
        match self {
            Established::Plain(stream) => stream.client_fd(),
            Established::Tls(stream) => stream.client_fd(),
        }
    }
}

impl<S: Transport> Handshaken<S> {
    /// The export the handshake ended on cannot be served after all (deleted, closed or its
    /// connection limit reached since the catalog said yes). GO gets that refusal and the client
    /// may go on negotiating: returns the handshake it finishes next. EXPORT_NAME has no error
    /// reply: returns `None` and the caller closes.
    pub async fn refuse(
        self,
        refusal: ExportRefusal,
        exports: &Exports<'_>,
        tls: Option<&TlsContext>,
    ) -> Result<Option<Handshaken<S>>, HandshakeFailure> {
        let Handshaken {
            stream,
            negotiated,
            leftover: input,
            client,
            mut handshake,
            ..
        } = self;
        let mut out = BytesMut::new();
        if !handshake.refuse_late(negotiated, refusal, &mut out) {
            return Ok(None);
        }
        // A client gone by now has left during the handshake, like any other.
        let gone = |_| HandshakeFailure::Closed;
        match stream {
            Established::Plain(mut stream) => {
                send(&mut stream, &out).await.map_err(gone)?;
                negotiate_plain(handshake, stream, input, client, exports, tls)
                    .await
                    .map(Some)
            }
            Established::Tls(mut stream) => {
                send(&mut stream, &out).await.map_err(gone)?;
                negotiate_tls(handshake, *stream, input, client, exports)
                    .await
                    .map(Some)
            }
        }
    }
}

/// What the handshake looks exports up in.
pub struct Exports<'a> {
    pub registry: &'a Registry,
    pub access: &'a AccessStore,
    /// Where refusals for a volume's connection limit are counted, under this peer.
    pub metrics: &'a Metrics,
    pub peer: &'a str,
    /// Cancelled when the server begins shutting down: from then on options are answered with
    /// ERR_SHUTDOWN.
    pub shutdown: &'a CancellationToken,
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
    exports: &Exports<'_>,
    client: ClientIdentity,
    config: HandshakeConfig,
    tls: Option<&TlsContext>,
) -> Result<Handshaken<S>, HandshakeFailure> {
    let handshake = ServerHandshake::new(config);
    let mut out = BytesMut::with_capacity(1024);
    handshake.write_greeting(&mut out);
    stream.write_all(&out).await?;
    let input = BytesMut::with_capacity(4096);
    negotiate_plain(handshake, stream, input, client, exports, tls).await
}

/// Reads options on the plain socket until transmission, or until STARTTLS moves the rest of
/// the negotiation to TLS.
async fn negotiate_plain<S: Transport>(
    mut handshake: ServerHandshake,
    mut stream: S,
    mut input: BytesMut,
    mut client: ClientIdentity,
    exports: &Exports<'_>,
    tls: Option<&TlsContext>,
) -> Result<Handshaken<S>, HandshakeFailure> {
    let catalog = exports.catalog(&client);
    let options = run_options(
        &mut handshake,
        &mut stream,
        &mut input,
        &catalog,
        exports.shutdown,
    );
    match options.await? {
        Phase::Transmission(negotiated, final_reply) => {
            return Ok(Handshaken {
                stream: Established::Plain(stream),
                negotiated,
                final_reply,
                leftover: input,
                client,
                handshake,
            })
        }
        Phase::StartTls => {}
    }
    let acceptor = tls.ok_or(HandshakeFailure::TlsUnconfigured)?.acceptor();
    // The state machine refused STARTTLS if bytes followed it, so nothing is lost here.
    let stream = acceptor
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
    negotiate_tls(handshake, stream, input, client, exports).await
}

/// Reads options over TLS until transmission.
async fn negotiate_tls<S: Transport>(
    mut handshake: ServerHandshake,
    mut stream: TlsStream<S>,
    mut input: BytesMut,
    client: ClientIdentity,
    exports: &Exports<'_>,
) -> Result<Handshaken<S>, HandshakeFailure> {
    let catalog = exports.catalog(&client);
    let options = run_options(
        &mut handshake,
        &mut stream,
        &mut input,
        &catalog,
        exports.shutdown,
    );
    match options.await? {
        Phase::Transmission(negotiated, final_reply) => Ok(Handshaken {
            stream: Established::Tls(Box::new(stream)),
            negotiated,
            final_reply,
            leftover: input,
            client,
            handshake,
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
    shutdown: &CancellationToken,
) -> Result<Phase, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(1024);
    // Set once the server shuts down: the client's next option must come by then.
    let mut last_option_by: Option<Instant> = None;
    loop {
        out.clear();
        if last_option_by.is_none() && shutdown.is_cancelled() {
            handshake.begin_shutdown();
            last_option_by = Some(Instant::now() + SHUTDOWN_OPTION_WAIT);
        }
        match handshake.advance(input, catalog, &mut out)? {
            Step::Transmission(negotiated) => {
                // Options sent in the same burst are answered now; the final reply waits.
                let final_reply = out.split_off(negotiated.final_reply_at);
                if !out.is_empty() {
                    send(stream, &out).await?;
                }
                return Ok(Phase::Transmission(negotiated, final_reply));
            }
            Step::SendFirst => send(stream, &out).await?,
            Step::NeedInput => {
                send(stream, &out).await?;
                let read = match last_option_by {
                    None => tokio::select! {
                        read = stream.read_buf(input) => read?,
                        // Options read from now on get ERR_SHUTDOWN.
                        _ = shutdown.cancelled() => continue,
                    },
                    Some(deadline) => {
                        match tokio::time::timeout_at(deadline, stream.read_buf(input)).await {
                            Ok(read) => read?,
                            Err(_) => {
                                return Err(HandshakeFailure::ShuttingDown {
                                    wait_ms: SHUTDOWN_OPTION_WAIT.as_millis(),
                                })
                            }
                        }
                    }
                };
                if read == 0 {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::access::ClientAddr;
    use crate::io::{EngineConfig, EngineKind, IoEngine};
    use bytes::{Buf, BufMut};
    use evsd_proto::consts::{IHAVEOPT, OPTION_REPLY_MAGIC, OPT_GO, REP_ACK, REP_ERR_POLICY};
    use tokio::net::UnixStream;

    /// A registry with volumes, open access rules and metrics, in a temporary data dir.
    pub(crate) struct Fixture {
        _dir: tempfile::TempDir,
        pub(crate) registry: Registry,
        pub(crate) access: AccessStore,
        pub(crate) metrics: Metrics,
        pub(crate) shutdown: CancellationToken,
    }

    impl Fixture {
        pub(crate) fn new(volumes: &[(&str, u64)]) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let engine =
                IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
            let registry = Registry::open(dir.path(), engine).unwrap();
            for (name, size_bytes) in volumes {
                registry.create(name, *size_bytes).unwrap();
            }
            let access = AccessStore::open(dir.path(), Default::default()).unwrap();
            Fixture {
                _dir: dir,
                registry,
                access,
                metrics: Metrics::new(),
                shutdown: CancellationToken::new(),
            }
        }

        pub(crate) fn exports(&self) -> Exports<'_> {
            Exports {
                registry: &self.registry,
                access: &self.access,
                metrics: &self.metrics,
                peer: "test",
                shutdown: &self.shutdown,
            }
        }
    }

    pub(crate) fn unix_client() -> ClientIdentity {
        ClientIdentity {
            addr: ClientAddr::Unix,
            tls: false,
            cert_names: Vec::new(),
        }
    }

    /// An OPT_GO for export `name` with no information requests.
    pub(crate) fn go(name: &str) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u64(IHAVEOPT);
        out.put_u32(OPT_GO);
        out.put_u32(4 + name.len() as u32 + 2);
        out.put_u32(name.len() as u32);
        out.put_slice(name.as_bytes());
        out.put_u16(0);
        out.to_vec()
    }

    /// Reads option replies up to and including the first that is not REP_INFO; returns its
    /// type and data.
    pub(crate) async fn final_go_reply(client: &mut UnixStream) -> (u32, Vec<u8>) {
        loop {
            let mut header = [0u8; 20];
            client.read_exact(&mut header).await.unwrap();
            let mut header = &header[..];
            assert_eq!(header.get_u64(), OPTION_REPLY_MAGIC);
            assert_eq!(header.get_u32(), OPT_GO);
            let kind = header.get_u32();
            let mut data = vec![0u8; header.get_u32() as usize];
            client.read_exact(&mut data).await.unwrap();
            if kind != evsd_proto::consts::REP_INFO {
                return (kind, data);
            }
        }
    }

    #[tokio::test]
    async fn a_go_refused_after_the_catalog_said_yes_lets_the_client_ask_again() {
        let fixture = Fixture::new(&[("v", 1 << 20), ("w", 2 << 20)]);
        let exports = fixture.exports();
        let (server, mut client) = UnixStream::pair().unwrap();
        let identity = unix_client();

        let client_side = async {
            let mut greeting = [0u8; 18];
            client.read_exact(&mut greeting).await.unwrap();
            client.write_all(&3u32.to_be_bytes()).await.unwrap();
            client.write_all(&go("v")).await.unwrap();
            let (kind, message) = final_go_reply(&mut client).await;
            assert_eq!(kind, REP_ERR_POLICY);
            assert_eq!(
                String::from_utf8(message).unwrap(),
                "export \"v\": connection limit of 1 reached"
            );
            client.write_all(&go("w")).await.unwrap();
            client
        };
        let server_side = async {
            let config = HandshakeConfig::default();
            let first = negotiate(server, &exports, identity, config, None)
                .await
                .unwrap();
            assert_eq!(first.negotiated.export.name, "v");
            let refusal = ExportRefusal::Policy("connection limit of 1 reached".into());
            first.refuse(refusal, &exports, None).await.unwrap()
        };
        let (mut client, second) = tokio::join!(client_side, server_side);
        let second = second.expect("GO may be answered again");
        assert_eq!(second.negotiated.export.name, "w");
        assert_eq!(second.negotiated.export.size_bytes, 2 << 20);
        // The last reply (INFO_EXPORT ..., ACK) is the caller's to send once attached.
        let ack = &second.final_reply[second.final_reply.len() - 20..];
        let mut ack_fields = ack;
        assert_eq!(ack_fields.get_u64(), OPTION_REPLY_MAGIC);
        assert_eq!(ack_fields.get_u32(), OPT_GO);
        assert_eq!(ack_fields.get_u32(), REP_ACK);
        assert_eq!(ack_fields.get_u32(), 0);
        let mut probe = [0u8; 1];
        let nothing = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            client.read(&mut probe),
        )
        .await;
        assert!(nothing.is_err(), "the client got bytes before the attach");
    }
}
