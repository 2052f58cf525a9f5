//! What the handshake needs to know about exports, supplied by the daemon.

use crate::consts::*;

/// Block-size constraints advertised in `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min_bytes: u32,
    pub preferred_bytes: u32,
    pub max_payload_bytes: u32,
}

impl Default for BlockSize {
    /// The values the issue fixes (and the spec's defaults): 1 / 4 KiB / 32 MiB.
    fn default() -> Self {
        BlockSize {
            min_bytes: 1,
            preferred_bytes: 4096,
            max_payload_bytes: 32 << 20,
        }
    }
}

/// One export as the handshake presents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name (what INFO_NAME reports, even when the client asked for the default "").
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub rotational: bool,
    /// Whether WRITE_ZEROES with FAST_ZERO can be honoured (zeroing is metadata-only).
    pub fast_zero: bool,
    pub block_size: BlockSize,
    /// Metadata contexts this export can report, e.g. `base:allocation`.
    pub meta_contexts: Vec<String>,
}

impl ExportInfo {
    /// Transmission flags for this export; DF is only offered once structured replies exist.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE;
        if self.read_only {
            flags |= TFLAG_READ_ONLY;
        } else {
            flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
            if self.fast_zero {
                flags |= TFLAG_SEND_FAST_ZERO;
            }
        }
        if self.rotational {
            flags |= TFLAG_ROTATIONAL;
        }
        if structured {
            flags |= TFLAG_SEND_DF;
        }
        flags
    }
}

/// Why the catalog will not hand an export to this client. The catalog decides (it knows the
/// client, its TLS state and each export's access rules); the handshake only maps the refusal to
/// the reply the spec gives for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportRefusal {
    /// No such export, or one this client may not see: ERR_UNKNOWN (a hidden export must look
    /// exactly like a missing one).
    Unknown,
    /// The export is served over TLS only and this connection has not negotiated it yet:
    /// ERR_TLS_REQD (ERR_POLICY on a server that offers no TLS, where the spec forbids TLS_REQD).
    TlsRequired,
    /// The export exists and is visible but refuses this client for now, e.g. its connection
    /// limit is reached: ERR_POLICY with this message.
    Policy(String),
}

/// The daemon's view of its exports, asked during the handshake. Lookups are in-memory and
/// synchronous, so the state machine stays free of I/O.
pub trait ExportCatalog {
    /// Resolves a client-supplied name ("" is the default export) to an export this client may
    /// open.
    fn export(&self, name: &str) -> Result<ExportInfo, ExportRefusal>;
    /// `(name, description)` of every export this client may open, for LIST.
    fn list(&self) -> Vec<(String, String)>;
}
