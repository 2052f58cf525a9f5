//! The server side of the fixed-newstyle handshake as a pure state machine.
//!
//! The runtime feeds it whatever bytes arrived and sends whatever it produced; it never blocks and
//! never does I/O, so it can be fuzzed and unit-tested byte for byte.

use std::collections::HashSet;

use bytes::{Buf, BufMut, BytesMut};

use crate::consts::*;
use crate::export::{ExportCatalog, ExportInfo, ExportRefusal};
use crate::meta::{self, QueryUse};
use crate::reply::truncate_utf8;
use crate::ReplyMode;

/// Limits the handshake enforces.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// Largest option payload parsed; larger ones are skipped and refused with ERR_TOO_BIG.
    pub max_option_bytes: u32,
    /// Options accepted before the client is considered hostile.
    pub max_options: u32,
    /// Whether NBD_OPT_EXTENDED_HEADERS is accepted.
    pub extended_headers: bool,
    /// What STARTTLS does and whether options need TLS first.
    pub tls: TlsMode,
}

/// The server's TLS policy, fixed for the life of a connection (the spec's NOTLS, SELECTIVETLS and
/// FORCEDTLS modes). In "on" mode the catalog decides which exports are TLS-only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// STARTTLS is refused with ERR_POLICY.
    #[default]
    Off,
    /// STARTTLS is accepted; exports are served with or without TLS unless the catalog marks
    /// them TLS-only.
    On,
    /// Every option but STARTTLS and ABORT gets ERR_TLS_REQD until TLS is up; a plaintext
    /// EXPORT_NAME is disconnected.
    Require,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            max_option_bytes: 64 << 10,
            max_options: 4096,
            extended_headers: true,
            tls: TlsMode::Off,
        }
    }
}

/// Why the handshake ended the connection. Each is a hard disconnect the spec allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("client sent unknown handshake flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option header has magic {0:#018x}, expected IHAVEOPT")]
    BadOptionMagic(u64),
    #[error("EXPORT_NAME asked for export {0:?}, which does not exist")]
    UnknownExport(String),
    #[error("EXPORT_NAME of {length_bytes} bytes exceeds the {max_bytes}-byte cap")]
    ExportNameTooLong { length_bytes: u32, max_bytes: u32 },
    #[error("client sent more than {0} options")]
    TooManyOptions(u32),
    #[error("the handshake has already finished")]
    AlreadyFinished,
    #[error("EXPORT_NAME for export {0:?} before STARTTLS, and TLS is required")]
    TlsRequired(String),
    #[error("EXPORT_NAME for export {name:?} refused: {reason}")]
    ExportRefused { name: String, reason: String },
    #[error("client sent {0} bytes after STARTTLS before the TLS handshake")]
    BytesAfterStartTls(usize),
    /// The spec: a client that negotiated extended headers MUST NOT use EXPORT_NAME (whose
    /// reply cannot say transmission uses them); GO can.
    #[error("EXPORT_NAME for export {0:?} after extended headers were negotiated (use GO)")]
    ExportNameAfterExtendedHeaders(String),
    /// EXPORT_NAME has no error reply, so a server shutting down can only close.
    #[error("EXPORT_NAME for export {0:?} while the server shuts down")]
    ExportNameDuringShutdown(String),
}

/// A metadata context selected with SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// The result of a successful handshake: everything transmission needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportInfo,
    pub mode: ReplyMode,
    pub transmission_flags: u16,
    pub meta_contexts: Vec<MetaContext>,
    /// The option that ended the handshake: OPT_GO or OPT_EXPORT_NAME.
    pub ended_by: u32,
    /// Where, in the output of the `advance` call that returned this, the final option's reply
    /// begins. Replies before it answer options the client sent in the same burst: they may go
    /// out at once, while the final reply waits for the runtime (and a late refusal replaces
    /// only it).
    pub final_reply_at: usize,
}

/// What the runtime should do after `advance`. In every case it first sends `out`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the output, then read more input.
    NeedInput,
    /// Send the output, then call `advance` again before reading: replies had piled up, and
    /// more options may wait in the input (a client pipelining LISTs it never reads).
    SendFirst,
    /// Send the output; transmission starts with the remaining input bytes.
    Transmission(Negotiated),
    /// The client sent ABORT: send the output (the ACK) and close.
    Aborted,
    /// The client sent STARTTLS and it was accepted: send the output (the ACK), run the TLS
    /// handshake as server on the raw stream, and keep calling `advance` with input read from the
    /// TLS stream. Earlier negotiation state has already been discarded.
    StartTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    /// Skipping an oversized or unknown payload; `reply` goes out once it is consumed.
    Discarding {
        option: u32,
        remaining: u64,
        reply: u32,
    },
    Finished,
}

/// Server handshake state.
#[derive(Debug)]
pub struct ServerHandshake {
    config: HandshakeConfig,
    state: State,
    no_zeroes: bool,
    mode: ReplyMode,
    meta_export: Option<String>,
    meta_selected: Vec<MetaContext>,
    options_seen: u32,
    /// STARTTLS was accepted: everything after it runs over TLS.
    tls_active: bool,
    /// The server is shutting down: options from now on get ERR_SHUTDOWN (ABORT its ACK).
    shutting_down: bool,
}

impl ServerHandshake {
    pub fn new(config: HandshakeConfig) -> Self {
        ServerHandshake {
            config,
            state: State::ClientFlags,
            no_zeroes: false,
            mode: ReplyMode::Simple,
            meta_export: None,
            meta_selected: Vec::new(),
            options_seen: 0,
            tls_active: false,
            shutting_down: false,
        }
    }

    /// The 18-byte server greeting, sent as soon as the connection is accepted.
    pub fn write_greeting(&self, out: &mut BytesMut) {
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    }

    /// Consumes as much of `input` as forms complete messages and appends replies to `out`.
    pub fn advance(
        &mut self,
        input: &mut BytesMut,
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) -> Result<Step, HandshakeError> {
        loop {
            match self.state {
                State::Finished => return Err(HandshakeError::AlreadyFinished),
                State::ClientFlags => {
                    if input.len() < 4 {
                        return Ok(Step::NeedInput);
                    }
                    let flags = input.get_u32();
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        return Err(HandshakeError::UnknownClientFlags(flags));
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                State::Discarding {
                    option,
                    remaining,
                    reply,
                } => {
                    let take = remaining.min(input.len() as u64) as usize;
                    input.advance(take);
                    let remaining = remaining - take as u64;
                    if remaining > 0 {
                        self.state = State::Discarding {
                            option,
                            remaining,
                            reply,
                        };
                        return Ok(Step::NeedInput);
                    }
                    let msg = match reply {
                        REP_ERR_SHUTDOWN => SHUTDOWN_MESSAGE,
                        REP_ERR_TOO_BIG => "option payload too large",
                        REP_ERR_TLS_REQD => "TLS is required: send STARTTLS first",
                        _ => "option not supported",
                    };
                    put_reply(out, option, reply, msg.as_bytes());
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    if out.len() >= MAX_UNSENT_REPLY_BYTES {
                        return Ok(Step::SendFirst);
                    }
                    if input.len() < 16 {
                        return Ok(Step::NeedInput);
                    }
                    let magic = u64::from_be_bytes(input[0..8].try_into().expect("8 bytes"));
                    if magic != IHAVEOPT {
                        return Err(HandshakeError::BadOptionMagic(magic));
                    }
                    let option = u32::from_be_bytes(input[8..12].try_into().expect("4 bytes"));
                    let length = u32::from_be_bytes(input[12..16].try_into().expect("4 bytes"));
                    if option == OPT_SET_META_CONTEXT {
                        // "replaces all previously-set metadata contexts (including when this
                        // command fails)": whatever follows, a SET leaves none selected first.
                        self.clear_meta();
                    }
                    // EXPORT_NAME has no error reply, and a name is a string: the spec's cap on
                    // strings, not the options', bounds what is read (and logged) of it.
                    // (Nor a smaller option cap: a discarded option gets an error reply, which
                    // EXPORT_NAME cannot have.)
                    let max_name_bytes =
                        (MAX_STRING_BYTES as u32).min(self.config.max_option_bytes);
                    if option == OPT_EXPORT_NAME && length > max_name_bytes {
                        return Err(HandshakeError::ExportNameTooLong {
                            length_bytes: length,
                            max_bytes: max_name_bytes,
                        });
                    }
                    if option == OPT_ABORT && length > self.config.max_option_bytes {
                        // The spec: ACKed whatever it carries, which is ignored; nothing after
                        // it is read.
                        self.count_option()?;
                        input.advance(16);
                        put_reply(out, option, REP_ACK, &[]);
                        self.state = State::Finished;
                        return Ok(Step::Aborted);
                    }
                    if length > self.config.max_option_bytes {
                        self.count_option()?;
                        input.advance(16);
                        let reply = if self.shutting_down {
                            REP_ERR_SHUTDOWN
                        } else if self.tls_required_for(option) {
                            REP_ERR_TLS_REQD
                        } else if is_known_option(option, &self.config) {
                            REP_ERR_TOO_BIG
                        } else {
                            REP_ERR_UNSUP
                        };
                        self.state = State::Discarding {
                            option,
                            remaining: u64::from(length),
                            reply,
                        };
                        continue;
                    }
                    let total = 16 + length as usize;
                    if input.len() < total {
                        input.reserve(total - input.len());
                        return Ok(Step::NeedInput);
                    }
                    self.count_option()?;
                    input.advance(16);
                    let data = input.split_to(length as usize);
                    let reply_at = out.len();
                    if let Some(mut step) = self.handle_option(option, &data, catalog, out)? {
                        if let Step::Transmission(negotiated) = &mut step {
                            negotiated.final_reply_at = reply_at;
                        }
                        // The client must wait for the ACK before its ClientHello; anything already
                        // here was sent too early and cannot be handed to the TLS layer.
                        if step == Step::StartTls && !input.is_empty() {
                            return Err(HandshakeError::BytesAfterStartTls(input.len()));
                        }
                        return Ok(step);
                    }
                }
            }
        }
    }

    fn count_option(&mut self) -> Result<(), HandshakeError> {
        self.options_seen += 1;
        if self.options_seen > self.config.max_options {
            return Err(HandshakeError::TooManyOptions(self.config.max_options));
        }
        Ok(())
    }

    /// Whether this option must be refused (or, for EXPORT_NAME, disconnected) until TLS is up.
    fn tls_required_for(&self, option: u32) -> bool {
        self.config.tls == TlsMode::Require
            && !self.tls_active
            && option != OPT_STARTTLS
            && option != OPT_ABORT
    }

    /// Answers a GO that ended the handshake with the refusal it would have got a moment earlier,
    /// when the export, accepted by the catalog, cannot be served after all (deleted, closed or
    /// its connection limit reached between the catalog's answer and the runtime attaching the
    /// connection), and puts the handshake back to reading options: the client may go on
    /// negotiating, as after any failed GO. The contexts selected for that export stay selected.
    /// EXPORT_NAME has no error reply: returns false, writes nothing, and the runtime closes.
    pub fn refuse_late(
        &mut self,
        negotiated: Negotiated,
        refusal: ExportRefusal,
        out: &mut BytesMut,
    ) -> bool {
        if negotiated.ended_by != OPT_GO || self.state != State::Finished {
            return false;
        }
        // Only the catalog knows whether TLS is offered; a late refusal never needs it.
        let refusal = match refusal {
            ExportRefusal::TlsRequired => {
                ExportRefusal::Policy("it is served over TLS only".into())
            }
            other => other,
        };
        let (reply_type, msg) = refusal_reply(
            &negotiated.export.name,
            refusal,
            self.config.tls,
            self.tls_active,
        );
        put_reply(out, OPT_GO, reply_type, msg.as_bytes());
        if !negotiated.meta_contexts.is_empty() {
            // `finish` took them for this export; a later GO for it gets them again.
            self.meta_selected = negotiated.meta_contexts;
        }
        self.state = State::OptionHeader;
        true
    }

    /// The server has begun shutting down. The spec: every option received from now on, other
    /// than ABORT, SHOULD be answered with ERR_SHUTDOWN (the client then MUST abort); an
    /// EXPORT_NAME, which has no error reply, ends the connection.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Whether TLS has been negotiated on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    fn handle_starttls(&mut self, option: u32, data: &[u8], out: &mut BytesMut) -> Option<Step> {
        if self.config.tls == TlsMode::Off {
            put_reply(
                out,
                option,
                REP_ERR_POLICY,
                b"TLS is not enabled on this server",
            );
            return None;
        }
        if !data.is_empty() {
            put_reply(out, option, REP_ERR_INVALID, b"STARTTLS takes no data");
            return None;
        }
        if self.tls_active {
            put_reply(out, option, REP_ERR_INVALID, b"TLS is already active");
            return None;
        }
        put_reply(out, option, REP_ACK, &[]);
        // The spec: everything negotiated before STARTTLS is forgotten once TLS is up. A failed
        // TLS handshake ends the connection, so forgetting it now is the same.
        self.tls_active = true;
        self.mode = ReplyMode::Simple;
        self.clear_meta();
        Some(Step::StartTls)
    }

    fn handle_option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) -> Result<Option<Step>, HandshakeError> {
        if self.shutting_down && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Err(HandshakeError::ExportNameDuringShutdown(quoted_name(data)));
            }
            put_reply(out, option, REP_ERR_SHUTDOWN, SHUTDOWN_MESSAGE.as_bytes());
            return Ok(None);
        }
        if self.tls_required_for(option) {
            if option == OPT_EXPORT_NAME {
                // EXPORT_NAME has no error reply: the only refusal is to disconnect.
                return Err(HandshakeError::TlsRequired(quoted_name(data)));
            }
            put_reply(
                out,
                option,
                REP_ERR_TLS_REQD,
                b"TLS is required: send STARTTLS first",
            );
            return Ok(None);
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                // EXPORT_NAME has no error reply: every refusal is a disconnect.
                if self.mode == ReplyMode::Extended {
                    return Err(HandshakeError::ExportNameAfterExtendedHeaders(quoted_name(
                        data,
                    )));
                }
                let export = match catalog.export(&name) {
                    Ok(export) => export,
                    Err(ExportRefusal::Unknown) => {
                        return Err(HandshakeError::UnknownExport(quoted_name(data)))
                    }
                    Err(ExportRefusal::TlsRequired) => {
                        return Err(HandshakeError::TlsRequired(quoted_name(data)))
                    }
                    Err(ExportRefusal::Policy(reason)) => {
                        return Err(HandshakeError::ExportRefused {
                            name: quoted_name(data),
                            reason,
                        })
                    }
                };
                let negotiated = self.finish(export, &name, OPT_EXPORT_NAME);
                out.put_u64(negotiated.export.size_bytes);
                out.put_u16(negotiated.transmission_flags);
                if !self.no_zeroes {
                    out.put_bytes(0, 124);
                }
                return Ok(Some(Step::Transmission(negotiated)));
            }
            OPT_ABORT => {
                put_reply(out, option, REP_ACK, &[]);
                self.state = State::Finished;
                return Ok(Some(Step::Aborted));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    put_reply(out, option, REP_ERR_INVALID, b"LIST takes no data");
                } else {
                    for (name, description) in catalog.list() {
                        let mut payload = Vec::with_capacity(4 + name.len() + description.len());
                        payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        payload.extend_from_slice(name.as_bytes());
                        payload.extend_from_slice(description.as_bytes());
                        put_reply(out, option, REP_SERVER, &payload);
                    }
                    put_reply(out, option, REP_ACK, &[]);
                }
            }
            OPT_STARTTLS => return Ok(self.handle_starttls(option, data, out)),
            OPT_INFO | OPT_GO => return Ok(self.handle_info(option, data, catalog, out)),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    put_reply(
                        out,
                        option,
                        REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    );
                } else if self.mode == ReplyMode::Extended {
                    // The spec's answer: no downgrade from extended headers.
                    put_reply(
                        out,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        b"extended headers already negotiated",
                    );
                } else if self.mode != ReplyMode::Simple {
                    put_reply(
                        out,
                        option,
                        REP_ERR_INVALID,
                        b"structured replies already negotiated",
                    );
                } else {
                    self.mode = ReplyMode::Structured;
                    put_reply(out, option, REP_ACK, &[]);
                }
            }
            OPT_EXTENDED_HEADERS if self.config.extended_headers => {
                if !data.is_empty() {
                    put_reply(
                        out,
                        option,
                        REP_ERR_INVALID,
                        b"EXTENDED_HEADERS takes no data",
                    );
                } else if self.mode == ReplyMode::Extended {
                    put_reply(
                        out,
                        option,
                        REP_ERR_INVALID,
                        b"extended headers already negotiated",
                    );
                } else {
                    // Contexts already selected stay selected, as in qemu: the spec resets
                    // them only at STARTTLS, and ours all have 32-bit statuses.
                    self.mode = ReplyMode::Extended;
                    put_reply(out, option, REP_ACK, &[]);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.handle_meta(option, data, catalog, out);
            }
            _ => put_reply(out, option, REP_ERR_UNSUP, b"option not supported"),
        }
        Ok(None)
    }

    fn handle_info(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) -> Option<Step> {
        let Some((name, requests)) = parse_info_request(data) else {
            put_reply(out, option, REP_ERR_INVALID, b"malformed INFO/GO request");
            return None;
        };
        let export = match catalog.export(&name) {
            Ok(export) => export,
            Err(refusal) => {
                self.put_refusal(out, option, &name, refusal);
                return None;
            }
        };
        let flags = export.transmission_flags(self.mode != ReplyMode::Simple);
        let mut info = Vec::with_capacity(14);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.size_bytes.to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        put_reply(out, option, REP_INFO, &info);
        if requests.contains(&INFO_NAME) {
            let mut info = INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(export.name.as_bytes());
            put_reply(out, option, REP_INFO, &info);
        }
        if requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
            let mut info = INFO_DESCRIPTION.to_be_bytes().to_vec();
            info.extend_from_slice(export.description.as_bytes());
            put_reply(out, option, REP_INFO, &info);
        }
        // Sent unasked too, as qemu-nbd does: our values are the spec's defaults, so a client that
        // did not ask loses nothing, and one that did gets the limits it must obey.
        let bs = export.block_size;
        let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        info.extend_from_slice(&bs.min_bytes.to_be_bytes());
        info.extend_from_slice(&bs.preferred_bytes.to_be_bytes());
        info.extend_from_slice(&bs.max_payload_bytes.to_be_bytes());
        put_reply(out, option, REP_INFO, &info);
        put_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            return Some(Step::Transmission(self.finish(export, &name, OPT_GO)));
        }
        None
    }

    /// The option reply for an export the catalog refused.
    fn put_refusal(&self, out: &mut BytesMut, option: u32, name: &str, refusal: ExportRefusal) {
        let (reply_type, msg) = refusal_reply(name, refusal, self.config.tls, self.tls_active);
        put_reply(out, option, reply_type, msg.as_bytes());
    }

    fn handle_meta(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) {
        let set = option == OPT_SET_META_CONTEXT;
        if set && self.mode == ReplyMode::Simple {
            put_reply(
                out,
                option,
                REP_ERR_INVALID,
                b"negotiate structured replies first",
            );
            return;
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            put_reply(
                out,
                option,
                REP_ERR_INVALID,
                b"malformed meta context request",
            );
            return;
        };
        let export = match catalog.export(&name) {
            Ok(export) => export,
            // Selective TLS: ERR_TLS_REQD is for INFO, GO and EXPORT_NAME only; to any other
            // option it would say that nothing works before STARTTLS.
            Err(ExportRefusal::TlsRequired) if self.config.tls != TlsMode::Off => {
                let name = truncate_utf8(&name, MAX_QUOTED_NAME_BYTES);
                let msg = format!("export {name:?} is served over TLS only: send STARTTLS first");
                put_reply(out, option, REP_ERR_POLICY, msg.as_bytes());
                return;
            }
            Err(refusal) => {
                self.put_refusal(out, option, &name, refusal);
                return;
            }
        };
        let usage = if set { QueryUse::Set } else { QueryUse::List };
        let mut chosen: Vec<&str> = Vec::new();
        // A query list of a 64 KiB option against a volume with many snapshots: no quadratic
        // scan of `chosen`.
        let mut seen: HashSet<&str> = HashSet::new();
        if queries.is_empty() && !set {
            chosen.extend(export.meta_contexts.iter().map(String::as_str));
        }
        for query in &queries {
            for name in meta::select(query, &export.meta_contexts, usage) {
                if seen.insert(name) {
                    chosen.push(name);
                }
            }
        }
        if set {
            self.meta_export = Some(name);
        }
        for (index, context) in chosen.iter().enumerate() {
            // LIST replies carry id 0; SET assigns ids that BLOCK_STATUS replies will echo.
            let id = if set { index as u32 + 1 } else { 0 };
            let mut payload = id.to_be_bytes().to_vec();
            payload.extend_from_slice(context.as_bytes());
            put_reply(out, option, REP_META_CONTEXT, &payload);
            if set {
                self.meta_selected.push(MetaContext {
                    id,
                    name: (*context).to_owned(),
                });
            }
        }
        put_reply(out, option, REP_ACK, &[]);
    }

    fn clear_meta(&mut self) {
        self.meta_selected.clear();
        self.meta_export = None;
    }

    fn finish(&mut self, export: ExportInfo, requested_name: &str, ended_by: u32) -> Negotiated {
        self.state = State::Finished;
        // Contexts negotiated for another export do not apply to this one.
        let same_export = self.meta_export.as_deref() == Some(requested_name)
            || self.meta_export.as_deref() == Some(export.name.as_str());
        let meta_contexts = if same_export {
            std::mem::take(&mut self.meta_selected)
        } else {
            Vec::new()
        };
        Negotiated {
            transmission_flags: export.transmission_flags(self.mode != ReplyMode::Simple),
            mode: self.mode,
            export,
            meta_contexts,
            ended_by,
            final_reply_at: 0,
        }
    }
}

/// The error reply refusing export `name`, and its message.
fn refusal_reply(
    name: &str,
    refusal: ExportRefusal,
    tls: TlsMode,
    tls_active: bool,
) -> (u32, String) {
    // The message quotes the name escaped; cut it so the message stays far below the spec's
    // 4096-byte limit on strings (escaping can make a name six times longer).
    let name = truncate_utf8(name, MAX_QUOTED_NAME_BYTES);
    let (reply_type, msg) = match refusal {
        ExportRefusal::Unknown => (REP_ERR_UNKNOWN, format!("export {name:?} not found")),
        // The spec forbids ERR_TLS_REQD from a server that offers no TLS.
        ExportRefusal::TlsRequired if tls == TlsMode::Off => (
            REP_ERR_POLICY,
            format!("export {name:?} is served over TLS only, which this server does not offer"),
        ),
        // Nor once TLS is up (a catalog that still says so is wrong, but the wire stays right).
        ExportRefusal::TlsRequired if tls_active => (
            REP_ERR_POLICY,
            format!("export {name:?} is refused over this TLS session"),
        ),
        ExportRefusal::TlsRequired => (
            REP_ERR_TLS_REQD,
            format!("export {name:?} is served over TLS only: send STARTTLS first"),
        ),
        ExportRefusal::Policy(reason) => (REP_ERR_POLICY, format!("export {name:?}: {reason}")),
    };
    (reply_type, truncate_utf8(&msg, MAX_STRING_BYTES).to_owned())
}

fn is_known_option(option: u32, config: &HandshakeConfig) -> bool {
    matches!(
        option,
        OPT_EXPORT_NAME
            | OPT_ABORT
            | OPT_LIST
            | OPT_STARTTLS
            | OPT_INFO
            | OPT_GO
            | OPT_STRUCTURED_REPLY
            | OPT_LIST_META_CONTEXT
            | OPT_SET_META_CONTEXT
    ) || (option == OPT_EXTENDED_HEADERS && config.extended_headers)
}

/// Appends one option reply: magic, option, reply type, length, data.
pub fn put_reply(out: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    out.reserve(20 + data.len());
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// The longest prefix of a client's export name quoted in an error message.
/// The text of every ERR_SHUTDOWN reply.
const SHUTDOWN_MESSAGE: &str = "the server is shutting down";

const MAX_QUOTED_NAME_BYTES: usize = 256;

/// How much of the replies `advance` lets pile up before it has them sent (`Step::SendFirst`).
const MAX_UNSENT_REPLY_BYTES: usize = 64 << 10;

/// A client's export name as errors and logs quote it: at most [`MAX_QUOTED_NAME_BYTES`].
fn quoted_name(data: &[u8]) -> String {
    truncate_utf8(&String::from_utf8_lossy(data), MAX_QUOTED_NAME_BYTES).to_owned()
}

/// Reads a u32-length-prefixed string of at most MAX_STRING_BYTES.
fn take_string(data: &mut &[u8]) -> Option<String> {
    if data.len() < 4 {
        return None;
    }
    let len = data.get_u32() as usize;
    if len > MAX_STRING_BYTES || data.len() < len {
        return None;
    }
    let s = std::str::from_utf8(&data[..len]).ok()?.to_owned();
    data.advance(len);
    Some(s)
}

/// INFO/GO payload: u32 name length, name, u16 count, count × u16 info type.
fn parse_info_request(mut data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name = take_string(&mut data)?;
    if data.len() < 2 {
        return None;
    }
    let count = data.get_u16() as usize;
    if data.len() != count * 2 {
        return None;
    }
    let requests = (0..count).map(|_| data.get_u16()).collect();
    Some((name, requests))
}

/// LIST/SET_META_CONTEXT payload: u32 name length, name, u32 count, count × (u32 length, query).
fn parse_meta_request(mut data: &[u8]) -> Option<(String, Vec<String>)> {
    let name = take_string(&mut data)?;
    if data.len() < 4 {
        return None;
    }
    let count = data.get_u32() as usize;
    // Each query needs at least its 4-byte length: bounds the allocation by the payload size.
    if count > data.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(take_string(&mut data)?);
    }
    data.is_empty().then_some((name, queries))
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
