//! Turns storage results into reply frames. A frame is a list of pieces sent back to back: buffers,
//! so read data goes out without being copied, or file ranges sent from the page cache, or ranges
//! of a mapping the kernel copies from the page cache.

use bytes::{Bytes, BytesMut};
use evsd_proto::consts::{STATE_HOLE, STATE_ZERO};
use evsd_proto::{reply, Errno, ReplyMode, ReplyTo};

use crate::storage::volume::{MappedBytes, EXTENT_HOLE, EXTENT_ZERO};
use crate::storage::{FileRange, StatusQuery};

/// Reads at least this long are scanned for zero runs to send as OFFSET_HOLE chunks.
const HOLE_SCAN_MIN_BYTES: usize = 64 << 10;
/// Granularity of the zero scan, and the shortest zero run worth a hole chunk.
const HOLE_BLOCK_BYTES: usize = 4096;
const HOLE_MIN_RUN_BYTES: usize = 64 << 10;

/// Part of a reply on the wire.
pub enum Piece {
    Bytes(Bytes),
    /// Sent with `sendfile`, only on streams that can (see `nbd::sendfile`).
    File(FileRange),
    /// Written from the head's mapping by the kernel, only on streams that can (see
    /// `nbd::sendfile`).
    Mapped(MappedBytes),
}

impl Piece {
    pub fn len_bytes(&self) -> u64 {
        match self {
            Piece::Bytes(bytes) => bytes.len() as u64,
            Piece::File(range) => range.length_bytes,
            Piece::Mapped(mapped) => mapped.rest_bytes() as u64,
        }
    }
}

pub type Frame = Vec<Piece>;

pub fn ok(mode: ReplyMode, to: ReplyTo) -> Frame {
    let mut head = BytesMut::with_capacity(32);
    reply::put_ok(&mut head, mode, to);
    vec![Piece::Bytes(head.freeze())]
}

pub fn error(mode: ReplyMode, to: ReplyTo, errno: Errno, message: &str) -> Frame {
    let mut head = BytesMut::with_capacity(64 + message.len());
    reply::put_error(&mut head, mode, to, errno, message);
    vec![Piece::Bytes(head.freeze())]
}

/// A successful READ whose bytes are `range` of a file: one data chunk (or simple reply) whose
/// payload the socket takes straight from the page cache. No zero scan: the bytes are never
/// looked at, and a range from a layer's data file is allocated data anyway.
pub fn read_from_file(mode: ReplyMode, to: ReplyTo, offset: u64, range: FileRange) -> Frame {
    let mut head = BytesMut::with_capacity(48);
    reply::put_read_data_header(&mut head, mode, to, offset, range.length_bytes, true);
    vec![Piece::Bytes(head.freeze()), Piece::File(range)]
}

/// A successful READ whose bytes lie in the head's mapping: one data chunk (or simple reply)
/// whose payload the kernel copies from the page cache into the socket. No zero scan, as for
/// [`read_from_file`].
pub fn read_from_mapping(mode: ReplyMode, to: ReplyTo, offset: u64, mapped: MappedBytes) -> Frame {
    let mut head = BytesMut::with_capacity(48);
    let length_bytes = mapped.rest_bytes() as u64;
    reply::put_read_data_header(&mut head, mode, to, offset, length_bytes, true);
    vec![Piece::Bytes(head.freeze()), Piece::Mapped(mapped)]
}

/// A successful READ of `data` at `offset`. With structured replies and without DF, long runs of
/// zeroes become hole chunks, which saves their bytes on the wire.
pub fn read(mode: ReplyMode, to: ReplyTo, offset: u64, data: Bytes, df: bool) -> Frame {
    let runs = if mode == ReplyMode::Simple || df || data.len() < HOLE_SCAN_MIN_BYTES {
        vec![(0, data.len(), false)]
    } else {
        zero_runs(&data)
    };
    let mut frame = Vec::with_capacity(runs.len() * 2);
    let last = runs.len() - 1;
    for (i, (start, end, zero)) in runs.into_iter().enumerate() {
        let mut head = BytesMut::with_capacity(48);
        let chunk_offset = offset + start as u64;
        let len = end - start;
        if zero {
            reply::put_read_hole(&mut head, mode, to, chunk_offset, len as u32, i == last);
            frame.push(Piece::Bytes(head.freeze()));
        } else {
            reply::put_read_data_header(&mut head, mode, to, chunk_offset, len as u64, i == last);
            frame.push(Piece::Bytes(head.freeze()));
            frame.push(Piece::Bytes(data.slice(start..end)));
        }
    }
    frame
}

/// Splits `data` into `(start, end, is_zero)` runs; zero runs shorter than HOLE_MIN_RUN_BYTES
/// are folded into their neighbours as data.
fn zero_runs(data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in data.chunks(HOLE_BLOCK_BYTES).enumerate() {
        let start = i * HOLE_BLOCK_BYTES;
        let zero = is_all_zero(block);
        match runs.last_mut() {
            Some(run) if run.2 == zero => run.1 = start + block.len(),
            _ => runs.push((start, start + block.len(), zero)),
        }
    }
    let mut merged: Vec<(usize, usize, bool)> = Vec::with_capacity(runs.len());
    for (start, end, zero) in runs {
        let zero = zero && end - start >= HOLE_MIN_RUN_BYTES;
        match merged.last_mut() {
            Some(prev) if prev.2 == zero => prev.1 = end,
            _ => merged.push((start, end, zero)),
        }
    }
    merged
}

fn is_all_zero(block: &[u8]) -> bool {
    // Eight bytes at a time; real data fails on the first word, so the scan is nearly free.
    let mut words = block.chunks_exact(8);
    let tail = words.remainder();
    tail.iter().all(|&b| b == 0)
        && words.all(|w| u64::from_ne_bytes(w.try_into().expect("chunks_exact(8)")) == 0)
}

/// BLOCK_STATUS for one context: storage's `(length, value)` runs as NBD extents. Allocation
/// values become `base:allocation` flags; depths and changed bits are already the wire values.
pub fn status_extents(query: &StatusQuery, runs: &[(u64, u32)]) -> Vec<evsd_proto::Extent> {
    runs.iter()
        .map(|&(length_bytes, value)| evsd_proto::Extent {
            length_bytes,
            flags: match query {
                StatusQuery::Allocation => {
                    (if value & EXTENT_HOLE != 0 {
                        STATE_HOLE
                    } else {
                        0
                    }) | (if value & EXTENT_ZERO != 0 {
                        STATE_ZERO
                    } else {
                        0
                    })
                }
                StatusQuery::Depth | StatusQuery::ChangedSince { .. } => value,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_fold_short_holes_into_data() {
        let mut data = vec![1u8; 256 << 10];
        data[64 << 10..192 << 10].fill(0); // 128 KiB hole
        data[200 << 10..204 << 10].fill(0); // 4 KiB: too short to be a hole
        assert_eq!(
            zero_runs(&data),
            [
                (0, 64 << 10, false),
                (64 << 10, 192 << 10, true),
                (192 << 10, 256 << 10, false)
            ]
        );
        assert_eq!(zero_runs(&vec![0u8; 1 << 20]), [(0, 1 << 20, true)]);
    }

    #[test]
    fn structured_read_of_zeroes_is_one_hole_chunk() {
        let to = ReplyTo {
            cookie: 7,
            offset: 0,
        };
        let frame = read(
            ReplyMode::Structured,
            to,
            0,
            Bytes::from(vec![0u8; 1 << 20]),
            false,
        );
        assert_eq!(frame.len(), 1);
        assert_eq!(frame[0].len_bytes(), 32);
        // DF forbids holes: one data chunk.
        let frame = read(
            ReplyMode::Structured,
            to,
            0,
            Bytes::from(vec![0u8; 1 << 20]),
            true,
        );
        assert_eq!(frame.len(), 2);
        assert_eq!(frame[1].len_bytes(), 1 << 20);
        // Simple replies always carry the bytes.
        let frame = read(
            ReplyMode::Simple,
            to,
            0,
            Bytes::from(vec![0u8; 1 << 20]),
            false,
        );
        assert_eq!(frame[0].len_bytes(), 16);
        assert_eq!(frame[1].len_bytes(), 1 << 20);
    }

    #[test]
    fn all_zero_detects_a_single_set_byte() {
        let mut block = vec![0u8; 4096 + 3];
        assert!(is_all_zero(&block));
        block[4097] = 1;
        assert!(!is_all_zero(&block));
        block[4097] = 0;
        block[17] = 1;
        assert!(!is_all_zero(&block));
    }
}
