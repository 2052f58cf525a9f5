//! Transmission-phase requests: decoding the header and checking it against the export.

use crate::consts::*;
use crate::errno::Errno;
use crate::ReplyMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_wire(value: u16) -> Command {
        match value {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(other) => other,
        }
    }

    /// Flags the spec defines for this command (FUA is accepted everywhere: clients set it on
    /// non-write commands and the spec asks servers to tolerate that).
    fn allowed_flags(self, mode: ReplyMode) -> u16 {
        let payload_len = if mode == ReplyMode::Extended && self == Command::Write {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        CMD_FLAG_FUA
            | payload_len
            | match self {
                Command::Read => CMD_FLAG_DF,
                Command::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                Command::BlockStatus => CMD_FLAG_REQ_ONE,
                _ => 0,
            }
    }
}

/// A decoded request header. `length` is 64-bit to cover extended headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl Request {
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Bytes of payload that follow the header on the wire. WRITE always carries `length` bytes;
    /// with extended headers any command flagged PAYLOAD_LEN does too (and is then refused).
    /// The spec has a WRITE under extended headers flagged PAYLOAD_LEN, but qemu 10's client
    /// sends it without: its data follows all the same (refusing it broke every qemu write).
    pub fn payload_len(&self, mode: ReplyMode) -> u64 {
        if self.command == Command::Write
            || (mode == ReplyMode::Extended && self.has_flag(CMD_FLAG_PAYLOAD_LEN))
        {
            self.length
        } else {
            0
        }
    }
}

/// A request header that cannot be answered: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request magic {found:#010x}, expected {expected:#010x}")]
    BadMagic { found: u32, expected: u32 },
    #[error("request payload of {length_bytes} bytes exceeds the {max_bytes}-byte limit")]
    PayloadTooLarge { length_bytes: u64, max_bytes: u64 },
}

/// Header size for the negotiated mode.
pub fn request_header_len(mode: ReplyMode) -> usize {
    match mode {
        ReplyMode::Extended => EXTENDED_REQUEST_LEN,
        _ => COMPACT_REQUEST_LEN,
    }
}

/// Decodes one request header from the front of `buf`, or `None` when it is not all there yet.
pub fn decode_request(buf: &[u8], mode: ReplyMode) -> Result<Option<Request>, RequestError> {
    let header_len = request_header_len(mode);
    if buf.len() < header_len {
        return Ok(None);
    }
    let u16_at = |at: usize| u16::from_be_bytes([buf[at], buf[at + 1]]);
    let u32_at = |at: usize| u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
    let expected = match mode {
        ReplyMode::Extended => EXTENDED_REQUEST_MAGIC,
        _ => REQUEST_MAGIC,
    };
    let found = u32_at(0);
    if found != expected {
        return Err(RequestError::BadMagic { found, expected });
    }
    let length = match mode {
        ReplyMode::Extended => u64_at(24),
        _ => u64::from(u32_at(24)),
    };
    Ok(Some(Request {
        flags: u16_at(4),
        command: Command::from_wire(u16_at(6)),
        cookie: u64_at(8),
        offset: u64_at(16),
        length,
    }))
}

/// Encodes a request header (used by tests, benchmarks and fuzz seeds, and by the server to
/// re-queue the rest of a WRITE whose payload stopped landing in place).
pub fn encode_request(req: &Request, mode: ReplyMode, out: &mut Vec<u8>) {
    let extended = mode == ReplyMode::Extended;
    out.extend_from_slice(
        &(if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        })
        .to_be_bytes(),
    );
    out.extend_from_slice(&req.flags.to_be_bytes());
    out.extend_from_slice(&req.command.to_wire().to_be_bytes());
    out.extend_from_slice(&req.cookie.to_be_bytes());
    out.extend_from_slice(&req.offset.to_be_bytes());
    if extended {
        out.extend_from_slice(&req.length.to_be_bytes());
    } else {
        out.extend_from_slice(&(req.length as u32).to_be_bytes());
    }
}

/// What a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct ExportLimits {
    pub size_bytes: u64,
    pub read_only: bool,
    pub max_payload_bytes: u64,
    pub mode: ReplyMode,
    pub meta_contexts: usize,
}

impl ExportLimits {
    /// The payload check that decides between reading the payload and hanging up: a client that
    /// declares more than the advertised maximum cannot be kept in sync cheaply.
    pub fn check_payload(&self, req: &Request) -> Result<(), RequestError> {
        let length_bytes = req.payload_len(self.mode);
        if length_bytes > self.max_payload_bytes {
            return Err(RequestError::PayloadTooLarge {
                length_bytes,
                max_bytes: self.max_payload_bytes,
            });
        }
        Ok(())
    }

    /// The spec's error for a request that must not reach storage, or Ok.
    pub fn validate(&self, req: &Request) -> Result<(), Errno> {
        let command = req.command;
        if let Command::Unknown(_) = command {
            return Err(Errno::Inval);
        }
        if req.flags & !command.allowed_flags(self.mode) != 0 {
            return Err(Errno::Inval);
        }
        if req.has_flag(CMD_FLAG_DF) && self.mode == ReplyMode::Simple {
            return Err(Errno::Inval);
        }
        match command {
            Command::Disc => return Ok(()),
            Command::Flush => {
                return if req.offset == 0 && req.length == 0 {
                    Ok(())
                } else {
                    Err(Errno::Inval)
                };
            }
            _ => {}
        }
        let writes = matches!(
            command,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        if writes && self.read_only {
            return Err(Errno::Perm);
        }
        if command == Command::Read && req.length > self.max_payload_bytes {
            return Err(Errno::Overflow);
        }
        if req.length == 0 {
            return Err(Errno::Inval);
        }
        let in_range = req
            .offset
            .checked_add(req.length)
            .is_some_and(|end| end <= self.size_bytes);
        if !in_range {
            return Err(match command {
                Command::Write | Command::WriteZeroes => Errno::NoSpc,
                _ => Errno::Inval,
            });
        }
        if command == Command::BlockStatus && self.meta_contexts == 0 {
            return Err(Errno::Inval);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(command: Command, flags: u16, offset: u64, length: u64) -> Request {
        Request {
            flags,
            command,
            cookie: 0xdead_beef_0000_0001,
            offset,
            length,
        }
    }

    fn limits(mode: ReplyMode) -> ExportLimits {
        ExportLimits {
            size_bytes: 1 << 20,
            read_only: false,
            max_payload_bytes: 32 << 20,
            mode,
            meta_contexts: 1,
        }
    }

    #[test]
    fn compact_round_trip() {
        let r = req(Command::Write, CMD_FLAG_FUA, 4096, 512);
        let mut buf = Vec::new();
        encode_request(&r, ReplyMode::Structured, &mut buf);
        assert_eq!(buf.len(), COMPACT_REQUEST_LEN);
        assert_eq!(decode_request(&buf, ReplyMode::Structured), Ok(Some(r)));
        assert_eq!(decode_request(&buf[..27], ReplyMode::Structured), Ok(None));
    }

    #[test]
    fn extended_round_trip_with_64_bit_length() {
        let r = req(Command::Trim, 0, 1 << 40, 5 << 32);
        let mut buf = Vec::new();
        encode_request(&r, ReplyMode::Extended, &mut buf);
        assert_eq!(buf.len(), EXTENDED_REQUEST_LEN);
        assert_eq!(decode_request(&buf, ReplyMode::Extended), Ok(Some(r)));
    }

    #[test]
    fn wrong_magic_is_fatal() {
        let mut buf = Vec::new();
        encode_request(&req(Command::Read, 0, 0, 1), ReplyMode::Simple, &mut buf);
        buf[0] ^= 0xff;
        assert!(matches!(
            decode_request(&buf, ReplyMode::Simple),
            Err(RequestError::BadMagic {
                expected: REQUEST_MAGIC,
                ..
            })
        ));
        // A compact header on an extended connection is equally wrong.
        let mut buf = Vec::new();
        encode_request(&req(Command::Read, 0, 0, 1), ReplyMode::Simple, &mut buf);
        buf.extend_from_slice(&[0; 4]);
        assert!(decode_request(&buf, ReplyMode::Extended).is_err());
    }

    #[test]
    fn errors_follow_the_spec() {
        let l = limits(ReplyMode::Structured);
        assert_eq!(l.validate(&req(Command::Read, 0, 0, 4096)), Ok(()));
        assert_eq!(
            l.validate(&req(Command::Read, 0, (1 << 20) - 1, 2)),
            Err(Errno::Inval)
        );
        assert_eq!(
            l.validate(&req(Command::Write, 0, 1 << 20, 1)),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            l.validate(&req(Command::WriteZeroes, 0, 1 << 20, 1)),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            l.validate(&req(Command::Trim, 0, 1 << 20, 1)),
            Err(Errno::Inval)
        );
        assert_eq!(
            l.validate(&req(Command::Read, 0, u64::MAX, 2)),
            Err(Errno::Inval)
        );
        assert_eq!(
            l.validate(&req(Command::Read, 0, 0, 33 << 20)),
            Err(Errno::Overflow)
        );
        assert_eq!(
            l.validate(&req(Command::Unknown(99), 0, 0, 1)),
            Err(Errno::Inval)
        );
        assert_eq!(l.validate(&req(Command::Read, 0, 0, 0)), Err(Errno::Inval));
        assert_eq!(l.validate(&req(Command::Flush, 0, 0, 0)), Ok(()));
        assert_eq!(l.validate(&req(Command::Flush, 0, 1, 0)), Err(Errno::Inval));
        assert_eq!(l.validate(&req(Command::Disc, 0, 0, 0)), Ok(()));
    }

    #[test]
    fn flags_are_checked_per_command() {
        let l = limits(ReplyMode::Structured);
        // FUA is tolerated on any command.
        assert_eq!(l.validate(&req(Command::Read, CMD_FLAG_FUA, 0, 1)), Ok(()));
        assert_eq!(l.validate(&req(Command::Flush, CMD_FLAG_FUA, 0, 0)), Ok(()));
        assert_eq!(l.validate(&req(Command::Read, CMD_FLAG_DF, 0, 1)), Ok(()));
        assert_eq!(
            l.validate(&req(Command::Write, CMD_FLAG_DF, 0, 1)),
            Err(Errno::Inval)
        );
        assert_eq!(
            l.validate(&req(
                Command::WriteZeroes,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                0,
                1
            )),
            Ok(())
        );
        assert_eq!(
            l.validate(&req(Command::Trim, CMD_FLAG_NO_HOLE, 0, 1)),
            Err(Errno::Inval)
        );
        assert_eq!(
            l.validate(&req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 0, 1)),
            Ok(())
        );
        assert_eq!(
            l.validate(&req(Command::Read, 1 << 9, 0, 1)),
            Err(Errno::Inval)
        );
        // DF needs structured replies.
        let simple = limits(ReplyMode::Simple);
        assert_eq!(
            simple.validate(&req(Command::Read, CMD_FLAG_DF, 0, 1)),
            Err(Errno::Inval)
        );
        // PAYLOAD_LEN is only legal on WRITE with extended headers.
        let ext = limits(ReplyMode::Extended);
        assert_eq!(
            ext.validate(&req(Command::Write, CMD_FLAG_PAYLOAD_LEN, 0, 1)),
            Ok(())
        );
        assert_eq!(
            ext.validate(&req(Command::Trim, CMD_FLAG_PAYLOAD_LEN, 0, 1)),
            Err(Errno::Inval)
        );
        assert_eq!(
            l.validate(&req(Command::Write, CMD_FLAG_PAYLOAD_LEN, 0, 1)),
            Err(Errno::Inval)
        );
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let l = ExportLimits {
            read_only: true,
            ..limits(ReplyMode::Simple)
        };
        assert_eq!(l.validate(&req(Command::Write, 0, 0, 1)), Err(Errno::Perm));
        assert_eq!(l.validate(&req(Command::Trim, 0, 0, 1)), Err(Errno::Perm));
        assert_eq!(
            l.validate(&req(Command::WriteZeroes, 0, 0, 1)),
            Err(Errno::Perm)
        );
        assert_eq!(l.validate(&req(Command::Read, 0, 0, 1)), Ok(()));
    }

    #[test]
    fn block_status_needs_a_context() {
        let l = ExportLimits {
            meta_contexts: 0,
            ..limits(ReplyMode::Structured)
        };
        assert_eq!(
            l.validate(&req(Command::BlockStatus, 0, 0, 1)),
            Err(Errno::Inval)
        );
    }

    #[test]
    fn payload_cap_decides_disconnect() {
        let l = limits(ReplyMode::Simple);
        assert!(l
            .check_payload(&req(Command::Write, 0, 0, 32 << 20))
            .is_ok());
        assert!(l
            .check_payload(&req(Command::Write, 0, 0, (32 << 20) + 1))
            .is_err());
        // A huge READ has no payload: answered with EOVERFLOW, not a disconnect.
        assert!(l
            .check_payload(&req(Command::Read, 0, 0, u32::MAX as u64))
            .is_ok());
        let ext = limits(ReplyMode::Extended);
        let r = req(Command::BlockStatus, CMD_FLAG_PAYLOAD_LEN, 0, 64);
        assert_eq!(r.payload_len(ReplyMode::Extended), 64);
        assert!(ext.check_payload(&r).is_ok());
    }
}
