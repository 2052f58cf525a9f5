//! The NBD wire protocol, server side, with no I/O: a handshake state machine fed with bytes, a
//! request decoder with the spec's validation rules, and reply encoders. The daemon drives it.

pub mod consts;
pub mod errno;
pub mod export;
pub mod fuzzing;
pub mod handshake;
pub mod meta;
pub mod reply;
pub mod request;

pub use errno::Errno;
pub use export::{BlockSize, ExportCatalog, ExportInfo, ExportRefusal};
pub use handshake::{
    HandshakeConfig, HandshakeError, MetaContext, Negotiated, ServerHandshake, Step, TlsMode,
};
pub use reply::{Extent, ReplyTo};
pub use request::{
    decode_request, encode_request, request_header_len, Command, ExportLimits, Request,
    RequestError,
};

/// The reply format negotiated for a connection; it also fixes the request header size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyMode {
    /// Simple replies only (the kernel client, nbd-tester-client).
    Simple,
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged.
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS was acknowledged: 32-byte requests and replies, 64-bit lengths.
    Extended,
}
