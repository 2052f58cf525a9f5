//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay test, so the
//! stable test run exercises exactly what the fuzzer does.

use bytes::BytesMut;

use crate::consts::*;
use crate::export::{BlockSize, ExportCatalog, ExportInfo, ExportRefusal};
use crate::handshake::{HandshakeConfig, ServerHandshake, Step, TlsMode};
use crate::request::{decode_request, Command, ExportLimits};
use crate::ReplyMode;

struct FixedCatalog;

impl ExportCatalog for FixedCatalog {
    fn export(&self, name: &str) -> Result<ExportInfo, ExportRefusal> {
        match name {
            "" | "vol0" => Ok(ExportInfo {
                name: "vol0".into(),
                description: "fuzz".into(),
                size_bytes: 1 << 30,
                read_only: false,
                rotational: false,
                fast_zero: true,
                block_size: BlockSize::default(),
                meta_contexts: vec!["base:allocation".into()],
            }),
            // What the daemon's access rules produce for a TLS-only or a full export.
            "secure" => Err(ExportRefusal::TlsRequired),
            "full" => Err(ExportRefusal::Policy("connection limit reached".into())),
            _ => Err(ExportRefusal::Unknown),
        }
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![("vol0".into(), "fuzz".into())]
    }
}

/// Feeds `data` to a server handshake, split at points chosen by the data's first byte, and
/// checks that every byte produced is a well-formed option reply (or the EXPORT_NAME reply). The
/// first byte's top two bits pick the TLS mode; an accepted STARTTLS continues as if TLS were up.
pub fn handshake(data: &[u8]) {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let step_len = usize::from(split % 64) + 1;
    let config = HandshakeConfig {
        max_option_bytes: 1024,
        max_options: 64,
        extended_headers: true,
        tls: match split >> 6 {
            0 => TlsMode::Off,
            1 => TlsMode::On,
            _ => TlsMode::Require,
        },
    };
    let mut hs = ServerHandshake::new(config);
    let mut input = BytesMut::new();
    for piece in data.chunks(step_len) {
        input.extend_from_slice(piece);
        let mut out = BytesMut::new();
        match hs.advance(&mut input, &FixedCatalog, &mut out) {
            Ok(Step::NeedInput | Step::StartTls) => check_option_replies(&out),
            Ok(Step::Aborted) | Err(_) => return,
            Ok(Step::Transmission(n)) => {
                assert!(n.export.name == "vol0");
                return;
            }
        }
    }
}

fn check_option_replies(mut out: &[u8]) {
    while !out.is_empty() {
        assert!(out.len() >= 20, "truncated option reply");
        assert_eq!(
            u64::from_be_bytes(out[..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(out.len() >= 20 + len, "reply length runs past the output");
        out = &out[20 + len..];
    }
}

/// Decodes `data` as a request header in every mode and validates it; must never panic.
pub fn request(data: &[u8]) {
    for mode in [
        ReplyMode::Simple,
        ReplyMode::Structured,
        ReplyMode::Extended,
    ] {
        if let Ok(Some(req)) = decode_request(data, mode) {
            let limits = ExportLimits {
                size_bytes: 1 << 30,
                read_only: data.len().is_multiple_of(2),
                max_payload_bytes: 32 << 20,
                mode,
                meta_contexts: data.len() % 3,
            };
            let _ = limits.check_payload(&req);
            // Whatever reaches storage must lie inside the export; DISC and FLUSH carry no range.
            let ranged = !matches!(req.command, Command::Disc | Command::Flush);
            if ranged && limits.validate(&req).is_ok() {
                let end = req.offset.checked_add(req.length);
                assert!(req.length > 0 && end.is_some_and(|end| end <= limits.size_bytes));
            }
        }
    }
}
