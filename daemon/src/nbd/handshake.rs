//! Drives the protocol crate's handshake state machine over a socket.

use bytes::BytesMut;
use evsd_proto::{HandshakeConfig, HandshakeError, Negotiated, ServerHandshake, Step};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::nbd::catalog::RegistryCatalog;
use crate::storage::Registry;

/// How a handshake ended without reaching transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error("protocol violation: {0}")]
    Protocol(#[from] HandshakeError),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
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
            HandshakeFailure::Protocol(_) => "protocol",
            HandshakeFailure::Io(_) => "io",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Aborted => "aborted",
        }
    }
}

/// Runs the handshake; on success returns the negotiation and any bytes the client already sent
/// past it (pipelined first requests).
pub async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    registry: &Registry,
    config: HandshakeConfig,
) -> Result<(Negotiated, BytesMut), HandshakeFailure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut handshake = ServerHandshake::new(config);
    let mut out = BytesMut::with_capacity(1024);
    handshake.write_greeting(&mut out);
    writer.write_all(&out).await?;
    let catalog = RegistryCatalog { registry };
    let mut input = BytesMut::with_capacity(4096);
    loop {
        out.clear();
        let step = handshake.advance(&mut input, &catalog, &mut out)?;
        if !out.is_empty() {
            writer.write_all(&out).await?;
        }
        match step {
            Step::NeedInput => {
                if reader.read_buf(&mut input).await? == 0 {
                    return Err(HandshakeFailure::Closed);
                }
            }
            Step::Transmission(negotiated) => {
                writer.flush().await?;
                return Ok((negotiated, input));
            }
            Step::Aborted => {
                writer.flush().await?;
                return Err(HandshakeFailure::Aborted);
            }
        }
    }
}
