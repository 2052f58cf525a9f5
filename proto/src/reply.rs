//! Transmission-phase replies: simple, structured and extended, built into a caller's buffer.
//!
//! Read data is never copied in here: the encoder writes the header and the runtime sends the data
//! buffer right after it, so a 32 MiB read costs one header of work.

use bytes::{BufMut, BytesMut};

use crate::consts::*;
use crate::errno::Errno;
use crate::ReplyMode;

/// One `base:allocation`-style extent: `length_bytes` with state `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length_bytes: u64,
    pub flags: u32,
}

/// Which request a reply answers. `offset` is echoed in extended reply headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub cookie: u64,
    pub offset: u64,
}

pub fn put_simple(out: &mut BytesMut, cookie: u64, error: u32) {
    out.reserve(SIMPLE_REPLY_LEN);
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// A structured or extended chunk header; `payload_len` counts everything after the header.
pub fn put_chunk_header(
    out: &mut BytesMut,
    mode: ReplyMode,
    to: ReplyTo,
    flags: u16,
    chunk_type: u16,
    payload_len: u64,
) {
    debug_assert!(mode != ReplyMode::Simple, "chunks need structured replies");
    if mode == ReplyMode::Extended {
        out.reserve(EXTENDED_REPLY_HEADER_LEN);
        out.put_u32(EXTENDED_REPLY_MAGIC);
        out.put_u16(flags);
        out.put_u16(chunk_type);
        out.put_u64(to.cookie);
        out.put_u64(to.offset);
        out.put_u64(payload_len);
    } else {
        out.reserve(STRUCTURED_CHUNK_HEADER_LEN);
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(flags);
        out.put_u16(chunk_type);
        out.put_u64(to.cookie);
        out.put_u32(payload_len as u32);
    }
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Header for `data_len` bytes of read data at `data_offset`; the caller sends the bytes next.
/// In simple mode this is the whole-read header, so it must be the only data piece.
pub fn put_read_data_header(
    out: &mut BytesMut,
    mode: ReplyMode,
    to: ReplyTo,
    data_offset: u64,
    data_len: u64,
    done: bool,
) {
    if mode == ReplyMode::Simple {
        put_simple(out, to.cookie, 0);
        return;
    }
    put_chunk_header(
        out,
        mode,
        to,
        done_flag(done),
        REPLY_TYPE_OFFSET_DATA,
        8 + data_len,
    );
    out.put_u64(data_offset);
}

/// A run of the read that reads as zeroes, sent instead of the zero bytes.
pub fn put_read_hole(
    out: &mut BytesMut,
    mode: ReplyMode,
    to: ReplyTo,
    hole_offset: u64,
    hole_len: u32,
    done: bool,
) {
    put_chunk_header(out, mode, to, done_flag(done), REPLY_TYPE_OFFSET_HOLE, 12);
    out.put_u64(hole_offset);
    out.put_u32(hole_len);
}

/// Success with no payload, for any command but READ and BLOCK_STATUS (which always carry data):
/// a simple reply unless extended headers were negotiated, which allow only extended replies
/// (a NONE chunk with DONE then). Structured replies let other commands take either form; the
/// simple one is what qemu-nbd and nbdkit send, and a client reads it with one `recv` of 16
/// bytes where a 20-byte chunk header costs libnbd two.
pub fn put_ok(out: &mut BytesMut, mode: ReplyMode, to: ReplyTo) {
    if mode == ReplyMode::Extended {
        put_chunk_header(out, mode, to, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
    } else {
        put_simple(out, to.cookie, 0);
    }
}

/// A final error: a simple reply or an ERROR chunk with DONE carrying `message`.
pub fn put_error(out: &mut BytesMut, mode: ReplyMode, to: ReplyTo, errno: Errno, message: &str) {
    if mode == ReplyMode::Simple {
        put_simple(out, to.cookie, errno.code());
        return;
    }
    let message = truncate_utf8(message, 4096);
    put_chunk_header(
        out,
        mode,
        to,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + message.len() as u64,
    );
    out.put_u32(errno.code());
    out.put_u16(message.len() as u16);
    out.put_slice(message.as_bytes());
}

/// One BLOCK_STATUS chunk for one context. Compact mode needs every length to fit in 32 bits;
/// the caller clips extents to the request, which is itself 32-bit there. The spec requires at
/// least one extent: the caller never passes none.
pub fn put_block_status(
    out: &mut BytesMut,
    mode: ReplyMode,
    to: ReplyTo,
    context_id: u32,
    extents: &[Extent],
    done: bool,
) {
    debug_assert!(!extents.is_empty(), "a BLOCK_STATUS chunk without extents");
    if mode == ReplyMode::Extended {
        let payload = 8 + 16 * extents.len() as u64;
        put_chunk_header(
            out,
            mode,
            to,
            done_flag(done),
            REPLY_TYPE_BLOCK_STATUS_EXT,
            payload,
        );
        out.put_u32(context_id);
        out.put_u32(extents.len() as u32);
        for e in extents {
            out.put_u64(e.length_bytes);
            out.put_u64(u64::from(e.flags));
        }
    } else {
        let payload = 4 + 8 * extents.len() as u64;
        put_chunk_header(
            out,
            mode,
            to,
            done_flag(done),
            REPLY_TYPE_BLOCK_STATUS,
            payload,
        );
        out.put_u32(context_id);
        for e in extents {
            debug_assert!(e.length_bytes <= u64::from(u32::MAX));
            out.put_u32(e.length_bytes as u32);
            out.put_u32(e.flags);
        }
    }
}

/// The longest prefix of `s` of at most `max_bytes` bytes that ends on a char boundary.
pub(crate) fn truncate_utf8(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const TO: ReplyTo = ReplyTo {
        cookie: 0x0102_0304_0506_0708,
        offset: 0x1000,
    };

    #[test]
    fn simple_reply_bytes() {
        let mut out = BytesMut::new();
        put_error(
            &mut out,
            ReplyMode::Simple,
            TO,
            Errno::NoSpc,
            "ignored in simple mode",
        );
        assert_eq!(
            &out[..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 1, 2, 3, 4, 5, 6, 7, 8][..]
        );
        let mut out = BytesMut::new();
        put_read_data_header(&mut out, ReplyMode::Simple, TO, 0x1000, 4096, true);
        assert_eq!(out.len(), 16);
        assert_eq!(&out[4..8], &[0, 0, 0, 0]);
    }

    #[test]
    fn structured_data_chunk_bytes() {
        let mut out = BytesMut::new();
        put_read_data_header(&mut out, ReplyMode::Structured, TO, 0x2000, 512, false);
        assert_eq!(out.len(), 28);
        assert_eq!(&out[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..6], &[0, 0]); // not DONE
        assert_eq!(&out[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&out[8..16], &TO.cookie.to_be_bytes());
        assert_eq!(&out[16..20], &(8u32 + 512).to_be_bytes());
        assert_eq!(&out[20..28], &0x2000u64.to_be_bytes());
    }

    #[test]
    fn structured_hole_and_done() {
        let mut out = BytesMut::new();
        put_read_hole(&mut out, ReplyMode::Structured, TO, 0x3000, 65536, true);
        assert_eq!(out.len(), 32);
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[28..32], &65536u32.to_be_bytes());
    }

    #[test]
    fn ok_is_simple_unless_extended() {
        for mode in [ReplyMode::Simple, ReplyMode::Structured] {
            let mut out = BytesMut::new();
            put_ok(&mut out, mode, TO);
            assert_eq!(out.len(), 16, "{mode:?}");
            assert_eq!(&out[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
            assert_eq!(&out[4..8], &[0, 0, 0, 0]);
            assert_eq!(&out[8..16], &TO.cookie.to_be_bytes());
        }
        let mut out = BytesMut::new();
        put_ok(&mut out, ReplyMode::Extended, TO);
        assert_eq!(out.len(), 32);
        assert_eq!(&out[0..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_NONE.to_be_bytes());
        assert_eq!(&out[16..24], &TO.offset.to_be_bytes());
        assert_eq!(&out[24..32], &[0; 8]);
    }

    #[test]
    fn structured_error_carries_message() {
        let mut out = BytesMut::new();
        put_error(
            &mut out,
            ReplyMode::Structured,
            TO,
            Errno::Inval,
            "out of range",
        );
        assert_eq!(&out[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&out[16..20], &(6u32 + 12).to_be_bytes());
        assert_eq!(&out[20..24], &22u32.to_be_bytes());
        assert_eq!(&out[24..26], &12u16.to_be_bytes());
        assert_eq!(&out[26..], b"out of range");
    }

    #[test]
    fn extended_header_echoes_offset_with_64_bit_length() {
        let mut out = BytesMut::new();
        put_read_data_header(&mut out, ReplyMode::Extended, TO, 0x1000, 1 << 20, true);
        assert_eq!(out.len(), 40);
        assert_eq!(&out[0..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[16..24], &TO.offset.to_be_bytes());
        assert_eq!(&out[24..32], &(8u64 + (1 << 20)).to_be_bytes());
    }

    #[test]
    fn block_status_compact_and_extended() {
        let extents = [
            Extent {
                length_bytes: 4096,
                flags: 0,
            },
            Extent {
                length_bytes: 8192,
                flags: STATE_HOLE | STATE_ZERO,
            },
        ];
        let mut out = BytesMut::new();
        put_block_status(&mut out, ReplyMode::Structured, TO, 1, &extents, true);
        assert_eq!(out.len(), 20 + 4 + 16);
        assert_eq!(&out[6..8], &REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        assert_eq!(&out[20..24], &1u32.to_be_bytes());
        assert_eq!(&out[28..32], &0u32.to_be_bytes());
        assert_eq!(&out[32..36], &8192u32.to_be_bytes());
        assert_eq!(&out[36..40], &3u32.to_be_bytes());
        let mut out = BytesMut::new();
        put_block_status(&mut out, ReplyMode::Extended, TO, 1, &extents, true);
        assert_eq!(out.len(), 32 + 8 + 32);
        assert_eq!(&out[6..8], &REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
        assert_eq!(&out[36..40], &2u32.to_be_bytes());
        assert_eq!(&out[56..64], &8192u64.to_be_bytes());
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        let msg = "é".repeat(3000); // 6000 bytes
        let mut out = BytesMut::new();
        put_error(&mut out, ReplyMode::Structured, TO, Errno::Io, &msg);
        let len = u16::from_be_bytes([out[24], out[25]]) as usize;
        assert!(len <= 4096);
        assert!(std::str::from_utf8(&out[26..26 + len]).is_ok());
    }
}
