//! The byte streams a connection runs on: plain TCP or Unix sockets, or either wrapped in TLS after
//! STARTTLS. Transmission is generic over the halves, so one copy of it serves them all.

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::{tcp, unix, TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;

use std::os::fd::{AsRawFd, RawFd};

use crate::nbd::in_place::ReceiveInPlace;
use crate::nbd::sendfile::SendFile;

/// A connected stream that can be split into a reading and a writing half.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Reader: AsyncRead + ReceiveInPlace + Unpin + Send + 'static;
    type Writer: AsyncWrite + SendFile + Unpin + Send + 'static;

    fn into_halves(self) -> (Self::Reader, Self::Writer);

    /// The client's socket, watched for a hang-up (see `storage::attachments`).
    fn client_fd(&self) -> RawFd;
}

impl Transport for TcpStream {
    type Reader = tcp::OwnedReadHalf;
    type Writer = tcp::OwnedWriteHalf;

    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }

    fn client_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

impl Transport for UnixStream {
    type Reader = unix::OwnedReadHalf;
    type Writer = unix::OwnedWriteHalf;

    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }

    fn client_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

/// An accepted socket handed from the accepting event loop to the connection thread that serves
/// it: detached from the one, registered with the other.
pub trait Handoff: Sized {
    type Detached: Send + 'static;

    fn detach(self) -> std::io::Result<Self::Detached>;

    /// Must run on the receiving thread's runtime.
    fn attach(detached: Self::Detached) -> std::io::Result<Self>;
}

impl Handoff for TcpStream {
    type Detached = std::net::TcpStream;

    fn detach(self) -> std::io::Result<Self::Detached> {
        self.into_std()
    }

    fn attach(detached: Self::Detached) -> std::io::Result<Self> {
        TcpStream::from_std(detached)
    }
}

impl Handoff for UnixStream {
    type Detached = std::os::unix::net::UnixStream;

    fn detach(self) -> std::io::Result<Self::Detached> {
        self.into_std()
    }

    fn attach(detached: Self::Detached) -> std::io::Result<Self> {
        UnixStream::from_std(detached)
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
    fn client_fd(&self) -> RawFd {
        self.get_ref().0.client_fd()
    }
}
