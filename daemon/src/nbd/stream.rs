//! The byte streams a connection runs on: plain TCP or Unix sockets, or either wrapped in TLS after
//! STARTTLS. Transmission is generic over the halves, so one copy of it serves them all.

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::{tcp, unix, TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;

use crate::nbd::hangup::SocketProbe;
use crate::storage::attachments::PeerProbe;

/// A connected stream that can be split into a reading and a writing half.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Reader: AsyncRead + Unpin + Send + 'static;
    type Writer: AsyncWrite + Unpin + Send + 'static;

    fn into_halves(self) -> (Self::Reader, Self::Writer);

    /// Watches for the client hanging up (see `hangup`).
    fn peer_probe(&self) -> Box<dyn PeerProbe>;
}

impl Transport for TcpStream {
    type Reader = tcp::OwnedReadHalf;
    type Writer = tcp::OwnedWriteHalf;

    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }

    fn peer_probe(&self) -> Box<dyn PeerProbe> {
        SocketProbe::boxed(self)
    }
}

impl Transport for UnixStream {
    type Reader = unix::OwnedReadHalf;
    type Writer = unix::OwnedWriteHalf;

    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }

    fn peer_probe(&self) -> Box<dyn PeerProbe> {
        SocketProbe::boxed(self)
    }
}

/// TLS state is shared by both directions, so the halves share the stream behind a lock; the
/// transmission loop polls both from one task, so they never contend.
impl<S: Transport> Transport for TlsStream<S> {
    type Reader = ReadHalf<TlsStream<S>>;
    type Writer = WriteHalf<TlsStream<S>>;

    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        tokio::io::split(self)
    }

    /// The socket under the TLS layer: a hang-up shows there first.
    fn peer_probe(&self) -> Box<dyn PeerProbe> {
        self.get_ref().0.peer_probe()
    }
}
