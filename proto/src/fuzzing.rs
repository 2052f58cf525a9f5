//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay test, so the
//! stable test run exercises exactly what the fuzzer does.

use bytes::BytesMut;

use crate::consts::*;
use crate::export::{BlockSize, ExportCatalog, ExportInfo, ExportRefusal};
use crate::handshake::{HandshakeConfig, Negotiated, ServerHandshake, Step, TlsMode};
use crate::reply::ReplyTo;
use crate::request::{decode_request, Command, ExportLimits};
use crate::ReplyMode;

/// The fuzz catalog: "vol0" (also the default ""), "secure" (TLS-only), "full" (refused by
/// policy) and nothing else. Like the daemon's catalog, it knows whether TLS is up: "secure" is
/// refused with TlsRequired only before STARTTLS, and opens after it.
struct FixedCatalog {
    tls: bool,
}

const VOL0_BYTES: u64 = 1 << 30;
const SECURE_BYTES: u64 = 1 << 20;

impl FixedCatalog {
    fn info(name: &str, size_bytes: u64) -> ExportInfo {
        ExportInfo {
            name: name.into(),
            description: "fuzz".into(),
            size_bytes,
            read_only: name == "secure",
            rotational: false,
            fast_zero: true,
            block_size: BlockSize::default(),
            meta_contexts: vec!["base:allocation".into(), "qemu:allocation-depth".into()],
        }
    }
}

impl ExportCatalog for FixedCatalog {
    fn export(&self, name: &str) -> Result<ExportInfo, ExportRefusal> {
        match name {
            "" | "vol0" => Ok(Self::info("vol0", VOL0_BYTES)),
            // What the daemon's access rules produce for a TLS-only or a full export.
            "secure" if self.tls => Ok(Self::info("secure", SECURE_BYTES)),
            "secure" => Err(ExportRefusal::TlsRequired),
            "full" => Err(ExportRefusal::Policy("connection limit reached".into())),
            _ => Err(ExportRefusal::Unknown),
        }
    }
    fn list(&self) -> Vec<(String, String)> {
        let mut list = vec![("vol0".to_owned(), "fuzz".to_owned())];
        if self.tls {
            list.push(("secure".into(), "fuzz".into()));
        }
        list
    }
}

/// What the harness knows of the negotiation from the replies alone.
struct Model {
    tls: TlsMode,
    /// An accepted STARTTLS was seen; the harness continues as if the TLS handshake succeeded.
    tls_up: bool,
    /// The reply mode the ACKs so far imply.
    mode: ReplyMode,
    /// The server began shutting down: every option since gets ERR_SHUTDOWN (ABORT its ACK).
    shutting_down: bool,
}

/// Feeds `data` to a server handshake, split at points chosen by the data's first byte, and
/// checks every byte produced against the spec and the [`Model`]. The first byte's top two bits
/// pick the TLS mode (0 off, 1 on, 2 required) or, with 3, TLS on and the server beginning to
/// shut down once the first piece is handled; an accepted STARTTLS continues as if TLS were up.
///
/// Invariants: every reply is a well-formed option reply whose type fits its option; error
/// messages are UTF-8 strings of at most 4096 bytes without NUL; TlsMode::Off never sends
/// ERR_TLS_REQD, nor does any mode once TLS is up; in Require mode before STARTTLS every option
/// but STARTTLS and ABORT gets ERR_TLS_REQD; STARTTLS is ACKed only when it ends the call with
/// Step::StartTls; transmission starts only on "vol0", or on "secure" over TLS, with the mode,
/// flags and meta contexts the replies announced; a GO that reached transmission, then refused
/// late, gets exactly one ERR_UNKNOWN and negotiation goes on; an EXPORT_NAME cannot be refused;
/// once shutting down, every reply is ERR_SHUTDOWN but ABORT's ACK and nothing reaches
/// transmission.
pub fn handshake(data: &[u8]) {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let step_len = usize::from(split % 64) + 1;
    let tls = match split >> 6 {
        0 => TlsMode::Off,
        2 => TlsMode::Require,
        _ => TlsMode::On,
    };
    let shutdown_after_first_piece = split >> 6 == 3;
    let config = HandshakeConfig {
        max_option_bytes: 1024,
        max_options: 64,
        extended_headers: true,
        tls,
    };
    let mut model = Model {
        tls,
        tls_up: false,
        mode: ReplyMode::Simple,
        shutting_down: false,
    };
    let mut hs = ServerHandshake::new(config);
    let mut input = BytesMut::new();
    for piece in data.chunks(step_len) {
        input.extend_from_slice(piece);
        // Runs again at once, without new input, after a late refusal: what the client sent
        // after its GO is already here.
        let mut refused = false;
        loop {
            let mut out = BytesMut::new();
            let step = hs.advance(&mut input, &FixedCatalog { tls: model.tls_up }, &mut out);
            if std::mem::take(&mut refused) {
                assert!(
                    !matches!(step, Err(crate::HandshakeError::AlreadyFinished)),
                    "negotiation did not go on after a late refusal"
                );
            }
            let (replies, rest) = option_replies(&out);
            for reply in &replies {
                model.check(reply);
            }
            // An accepted STARTTLS ends the call: its ACK is the last reply and the step is StartTls.
            let acks_starttls = |r: &Reply| r.option == OPT_STARTTLS && r.kind == REP_ACK;
            if let Some(at) = replies.iter().position(acks_starttls) {
                assert!(
                    at + 1 == replies.len() && matches!(step, Ok(Step::StartTls) | Err(_)),
                    "STARTTLS ACKed without Step::StartTls"
                );
            }
            if !matches!(step, Ok(Step::Transmission(_))) {
                assert!(rest.is_empty(), "stray bytes after the option replies");
            }
            match step {
                Ok(Step::NeedInput) => break,
                // The replies so far went out; the options still waiting are handled next.
                Ok(Step::SendFirst) => {
                    assert!(!out.is_empty(), "SendFirst with nothing to send");
                }
                Ok(Step::StartTls) => {
                    assert!(replies.last().is_some_and(acks_starttls));
                    assert!(model.tls != TlsMode::Off && !model.tls_up);
                    model.tls_up = true;
                    model.mode = ReplyMode::Simple;
                    break;
                }
                Ok(Step::Aborted) => {
                    let last = replies.last().expect("ABORT without an ACK");
                    assert!(last.option == OPT_ABORT && last.kind == REP_ACK);
                    return;
                }
                Err(_) => return,
                Ok(Step::Transmission(n)) => {
                    assert!(!model.shutting_down, "transmission began during shutdown");
                    // The final reply starts on a reply boundary, after the burst's others.
                    let (before, between) = option_replies(&out[..n.final_reply_at]);
                    assert!(between.is_empty(), "final_reply_at inside a reply");
                    assert!(before
                        .iter()
                        .all(|r| r.kind != REP_ACK || r.option != OPT_GO));
                    model.check_transmission(&n, &replies, rest);
                    // As if the export went away before the runtime attached: GO is answered
                    // with the refusal and negotiation goes on; EXPORT_NAME can only be closed.
                    let ended_by = n.ended_by;
                    let mut refusal = BytesMut::new();
                    let late = hs.refuse_late(n, crate::ExportRefusal::Unknown, &mut refusal);
                    assert_eq!(late, ended_by == OPT_GO);
                    if !late {
                        assert!(refusal.is_empty());
                        return;
                    }
                    let (replies, rest) = option_replies(&refusal);
                    assert!(rest.is_empty() && replies.len() == 1);
                    assert!(replies[0].option == OPT_GO && replies[0].kind == REP_ERR_UNKNOWN);
                    model.check(&replies[0]);
                    refused = true;
                }
            }
        }
        if shutdown_after_first_piece && !model.shutting_down {
            hs.begin_shutdown();
            model.shutting_down = true;
        }
    }
}

/// One option reply as it appears in the output.
struct Reply<'a> {
    option: u32,
    kind: u32,
    payload: &'a [u8],
}

/// Splits the option replies off the start of `out`, checking their framing; returns them and
/// what follows (the EXPORT_NAME reply, if any).
fn option_replies(mut out: &[u8]) -> (Vec<Reply<'_>>, &[u8]) {
    let mut replies = Vec::new();
    while out.len() >= 8 && out[..8] == OPTION_REPLY_MAGIC.to_be_bytes() {
        assert!(out.len() >= 20, "truncated option reply");
        let word = |at: usize| u32::from_be_bytes(out[at..at + 4].try_into().unwrap());
        let (option, kind, len) = (word(8), word(12), word(16) as usize);
        assert!(out.len() >= 20 + len, "reply length runs past the output");
        replies.push(Reply {
            option,
            kind,
            payload: &out[20..20 + len],
        });
        out = &out[20 + len..];
    }
    (replies, out)
}

impl Model {
    fn check(&mut self, reply: &Reply) {
        let Reply {
            option,
            kind,
            payload,
        } = *reply;
        // EXPORT_NAME is answered with the export's data or a disconnect, never an option reply.
        assert_ne!(option, OPT_EXPORT_NAME, "an option reply to EXPORT_NAME");
        if kind & (1 << 31) != 0 {
            let message = std::str::from_utf8(payload).expect("error message is not UTF-8");
            assert!(message.len() <= MAX_STRING_BYTES, "error message too long");
            assert!(!message.contains('\0'), "error message contains NUL");
        }
        if self.shutting_down {
            assert!(
                kind == REP_ERR_SHUTDOWN || (option == OPT_ABORT && kind == REP_ACK),
                "option {option} answered {kind:#x} during shutdown"
            );
            return;
        }
        if kind == REP_ERR_TLS_REQD {
            assert!(self.tls != TlsMode::Off, "ERR_TLS_REQD without TLS");
            assert!(!self.tls_up, "ERR_TLS_REQD once TLS is up");
        }
        if self.tls == TlsMode::Require
            && !self.tls_up
            && option != OPT_STARTTLS
            && option != OPT_ABORT
        {
            assert_eq!(kind, REP_ERR_TLS_REQD, "option {option} before STARTTLS");
        }
        match kind {
            REP_SERVER => assert_eq!(option, OPT_LIST),
            REP_INFO => assert!(option == OPT_INFO || option == OPT_GO),
            REP_META_CONTEXT => {
                assert!(option == OPT_LIST_META_CONTEXT || option == OPT_SET_META_CONTEXT)
            }
            REP_ACK if option == OPT_STRUCTURED_REPLY => {
                assert_eq!(self.mode, ReplyMode::Simple);
                self.mode = ReplyMode::Structured;
            }
            REP_ACK if option == OPT_EXTENDED_HEADERS => {
                assert_ne!(self.mode, ReplyMode::Extended);
                self.mode = ReplyMode::Extended;
            }
            REP_ACK if option == OPT_SET_META_CONTEXT => {
                assert_ne!(self.mode, ReplyMode::Simple);
            }
            _ => {}
        }
    }

    fn check_transmission(&self, n: &Negotiated, replies: &[Reply], rest: &[u8]) {
        let export = &n.export;
        match export.name.as_str() {
            "vol0" => assert_eq!(export.size_bytes, VOL0_BYTES),
            "secure" => assert!(self.tls_up, "TLS-only export served in plaintext"),
            other => panic!("transmission on export {other:?}"),
        }
        if self.tls == TlsMode::Require {
            assert!(self.tls_up, "transmission before STARTTLS in Require mode");
        }
        assert_eq!(n.mode, self.mode, "mode differs from the ACKed options");
        assert_eq!(
            n.transmission_flags,
            export.transmission_flags(n.mode != ReplyMode::Simple)
        );
        if !n.meta_contexts.is_empty() {
            assert_ne!(
                n.mode,
                ReplyMode::Simple,
                "meta contexts without structured replies"
            );
        }
        for (index, context) in n.meta_contexts.iter().enumerate() {
            assert_eq!(context.id as usize, index + 1);
            assert!(export.meta_contexts.contains(&context.name));
        }
        let mut wire = export.size_bytes.to_be_bytes().to_vec();
        wire.extend_from_slice(&n.transmission_flags.to_be_bytes());
        if rest.is_empty() {
            // GO: INFO_EXPORT announced this size and these flags, and the ACK ends the output.
            let last = replies.last().expect("GO without replies");
            assert!(last.option == OPT_GO && last.kind == REP_ACK);
            assert_eq!(n.ended_by, OPT_GO);
            let announced = replies.iter().rev().find(|r| {
                r.option == OPT_GO
                    && r.kind == REP_INFO
                    && r.payload.starts_with(&INFO_EXPORT.to_be_bytes())
            });
            assert_eq!(
                announced.expect("GO without INFO_EXPORT").payload[2..],
                wire
            );
        } else {
            // EXPORT_NAME: size, flags and, unless NO_ZEROES, 124 zero bytes.
            assert!(
                rest.len() == 10 || rest.len() == 134,
                "EXPORT_NAME reply of {} bytes",
                rest.len()
            );
            assert_eq!(rest[..10], wire);
            assert!(rest[10..].iter().all(|&b| b == 0));
            assert_eq!(n.ended_by, OPT_EXPORT_NAME);
        }
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

/// Reads the fuzz input as a little script; every read past the end gives `None`.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_be_bytes)
    }
}

/// A transmission reply as a client reads its header back.
struct ChunkHeader {
    flags: u16,
    chunk_type: u16,
    payload_len: u64,
}

/// Reads one reply header from `out` as a client in `mode` would, checking the magic, cookie and
/// (extended) offset echo; returns the chunk header, or `None` for a simple reply (whose error
/// field goes into `simple_error`).
fn read_reply_header(
    out: &mut &[u8],
    mode: ReplyMode,
    to: ReplyTo,
    simple_error: &mut u32,
) -> Option<ChunkHeader> {
    let mut r = Script(out);
    let magic = r.u32().expect("reply magic");
    let header = match magic {
        SIMPLE_REPLY_MAGIC => {
            *simple_error = r.u32().expect("simple reply error");
            assert_eq!(r.u64(), Some(to.cookie));
            None
        }
        STRUCTURED_REPLY_MAGIC => {
            assert_eq!(
                mode,
                ReplyMode::Structured,
                "compact chunk in {mode:?} mode"
            );
            let flags = r.u16().expect("flags");
            let chunk_type = r.u16().expect("type");
            assert_eq!(r.u64(), Some(to.cookie));
            let payload_len = r.u32().expect("length").into();
            Some(ChunkHeader {
                flags,
                chunk_type,
                payload_len,
            })
        }
        EXTENDED_REPLY_MAGIC => {
            assert_eq!(mode, ReplyMode::Extended, "extended chunk in {mode:?} mode");
            let flags = r.u16().expect("flags");
            let chunk_type = r.u16().expect("type");
            assert_eq!(r.u64(), Some(to.cookie));
            assert_eq!(r.u64(), Some(to.offset));
            let payload_len = r.u64().expect("length");
            Some(ChunkHeader {
                flags,
                chunk_type,
                payload_len,
            })
        }
        other => panic!("reply magic {other:#x}"),
    };
    *out = r.0;
    header
}

/// Characters error messages are built from: ASCII, two- and four-byte UTF-8, a control char.
const MESSAGE_CHARS: [char; 5] = ['a', 'é', '€', '😀', '\u{1}'];

/// Encodes the transmission replies `data` describes with the `reply` module in the mode its
/// first byte picks, reads each back as a client would and checks it says what was encoded:
/// magic, flags (DONE), type, cookie, offset echo, payload length, and the payload itself (error
/// messages cut to at most 4096 bytes on a char boundary, extents in the mode's width). Stays
/// within the encoders' documented preconditions: no chunks in simple mode, 32-bit lengths in
/// compact mode.
pub fn reply(data: &[u8]) {
    use crate::reply::*;
    use crate::Errno;

    let mut script = Script(data);
    let Some(first) = script.u8() else {
        return;
    };
    let mode = match first % 3 {
        0 => ReplyMode::Simple,
        1 => ReplyMode::Structured,
        _ => ReplyMode::Extended,
    };
    let compact = mode != ReplyMode::Extended;
    let done_flag = |done: bool| if done { REPLY_FLAG_DONE } else { 0 };
    while let (Some(op), Some(cookie), Some(offset)) = (script.u8(), script.u64(), script.u64()) {
        let to = ReplyTo { cookie, offset };
        let done = op & 0x80 != 0;
        let mut out = BytesMut::new();
        let mut simple_error = u32::MAX;
        match op % 6 {
            0 => {
                let Some(error) = script.u32() else { return };
                put_simple(&mut out, cookie, error);
                let mut wire = &out[..];
                assert!(
                    read_reply_header(&mut wire, ReplyMode::Simple, to, &mut simple_error)
                        .is_none()
                );
                assert_eq!(simple_error, error);
                assert!(wire.is_empty());
            }
            1 => {
                put_ok(&mut out, mode, to);
                let mut wire = &out[..];
                match read_reply_header(&mut wire, mode, to, &mut simple_error) {
                    None => {
                        assert_ne!(
                            mode,
                            ReplyMode::Extended,
                            "simple reply with extended headers"
                        );
                        assert_eq!(simple_error, 0)
                    }
                    Some(h) => {
                        assert_eq!(mode, ReplyMode::Extended, "chunk for a plain success");
                        assert_eq!(
                            (h.flags, h.chunk_type, h.payload_len),
                            (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
                        );
                    }
                }
                assert!(wire.is_empty());
            }
            2 => {
                let (Some(code), Some(len), Some(c)) = (script.u8(), script.u16(), script.u8())
                else {
                    return;
                };
                let errno = Errno::from_code(code.into());
                let fill = MESSAGE_CHARS[usize::from(c) % MESSAGE_CHARS.len()];
                // Up to 15 raw bytes first (lossy), then the fill character.
                let (head, rest) = script.0.split_at(script.0.len().min(usize::from(c >> 4)));
                script.0 = rest;
                let mut message = String::from_utf8_lossy(head).into_owned();
                while message.len() < usize::from(len % 6000) {
                    message.push(fill);
                }
                put_error(&mut out, mode, to, errno, &message);
                let mut wire = &out[..];
                match read_reply_header(&mut wire, mode, to, &mut simple_error) {
                    None => assert_eq!(simple_error, errno.code()),
                    Some(h) => {
                        assert_eq!((h.flags, h.chunk_type), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR));
                        assert_eq!(h.payload_len, wire.len() as u64);
                        let mut r = Script(wire);
                        assert_eq!(r.u32(), Some(errno.code()));
                        let sent = usize::from(r.u16().expect("message length"));
                        assert_eq!(r.0.len(), sent);
                        let sent = std::str::from_utf8(r.0).expect("message is not UTF-8");
                        assert!(sent.len() <= MAX_STRING_BYTES);
                        assert!(message.starts_with(sent));
                        // Cut only as far as the limit needs.
                        assert!(sent == message || sent.len() > MAX_STRING_BYTES - 4);
                        wire = &[];
                    }
                }
                assert!(wire.is_empty());
            }
            3 => {
                let (Some(data_offset), Some(len)) = (script.u64(), script.u32()) else {
                    return;
                };
                // Compact chunks carry 8 + len in 32 bits; the daemon's reads are far smaller.
                let data_len = if compact {
                    u64::from(len >> 1)
                } else {
                    u64::from(len) << 8
                };
                put_read_data_header(&mut out, mode, to, data_offset, data_len, done);
                let mut wire = &out[..];
                match read_reply_header(&mut wire, mode, to, &mut simple_error) {
                    None => assert_eq!(simple_error, 0),
                    Some(h) => {
                        assert_eq!(h.flags, done_flag(done));
                        assert_eq!(h.chunk_type, REPLY_TYPE_OFFSET_DATA);
                        assert_eq!(h.payload_len, 8 + data_len);
                        assert_eq!(wire, data_offset.to_be_bytes());
                        wire = &[];
                    }
                }
                assert!(wire.is_empty());
            }
            4 if mode != ReplyMode::Simple => {
                let (Some(hole_offset), Some(hole_len)) = (script.u64(), script.u32()) else {
                    return;
                };
                put_read_hole(&mut out, mode, to, hole_offset, hole_len, done);
                let mut wire = &out[..];
                let h = read_reply_header(&mut wire, mode, to, &mut simple_error)
                    .expect("hole as a simple reply");
                assert_eq!(h.flags, done_flag(done));
                assert_eq!(h.chunk_type, REPLY_TYPE_OFFSET_HOLE);
                assert_eq!(h.payload_len, 12);
                let mut r = Script(wire);
                assert_eq!((r.u64(), r.u32()), (Some(hole_offset), Some(hole_len)));
                assert!(r.0.is_empty());
            }
            5 if mode != ReplyMode::Simple => {
                let (Some(context_id), Some(count)) = (script.u32(), script.u8()) else {
                    return;
                };
                let mut extents = Vec::new();
                for _ in 0..count % 16 {
                    let (Some(length), Some(flags)) = (script.u64(), script.u32()) else {
                        return;
                    };
                    // Compact mode: the caller clips extents to the 32-bit request.
                    let length_bytes = if compact {
                        length & u64::from(u32::MAX)
                    } else {
                        length
                    };
                    extents.push(Extent {
                        length_bytes,
                        flags,
                    });
                }
                // At least one extent: the spec allows no empty BLOCK_STATUS chunk, and the
                // daemon never builds one (it answers an emptied range with one safe extent).
                if extents.is_empty() {
                    extents.push(Extent {
                        length_bytes: 4096,
                        flags: 0,
                    });
                }
                put_block_status(&mut out, mode, to, context_id, &extents, done);
                let mut wire = &out[..];
                let h = read_reply_header(&mut wire, mode, to, &mut simple_error)
                    .expect("block status as a simple reply");
                assert_eq!(h.flags, done_flag(done));
                assert_eq!(h.payload_len, wire.len() as u64);
                let mut r = Script(wire);
                assert_eq!(r.u32(), Some(context_id));
                if compact {
                    assert_eq!(h.chunk_type, REPLY_TYPE_BLOCK_STATUS);
                    for e in &extents {
                        assert_eq!(r.u32().map(u64::from), Some(e.length_bytes));
                        assert_eq!(r.u32(), Some(e.flags));
                    }
                } else {
                    assert_eq!(h.chunk_type, REPLY_TYPE_BLOCK_STATUS_EXT);
                    assert_eq!(r.u32(), Some(extents.len() as u32));
                    for e in &extents {
                        assert_eq!(r.u64(), Some(e.length_bytes));
                        assert_eq!(r.u64(), Some(u64::from(e.flags)));
                    }
                }
                assert!(r.0.is_empty());
            }
            _ => {}
        }
    }
}
