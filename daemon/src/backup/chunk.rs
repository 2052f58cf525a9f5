//! Chunk objects: content id, compression, checksums.
//!
//! A chunk object is a 24-byte header followed by the payload (raw or zstd). The object is named
//! by the BLAKE3 of the plaintext, so the same data is stored once however many backups use it.
//! The format is documented in docs/backup-format.md; changing it needs a new magic.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::backup::raw_frame;

/// Backups cut a volume into chunks of this size at fixed offsets; only the last may be shorter.
pub const CHUNK_SIZE_BYTES: u64 = 4 << 20;

/// Length of the fixed header in front of every payload.
pub const HEADER_LEN_BYTES: usize = 24;
/// The largest stored object a reader takes in (a whole chunk stored raw is 4 MiB and a
/// header): a larger one is damaged or not ours, and is not read whole into memory.
pub const MAX_OBJECT_BYTES: u64 = 8 << 20;

/// Whether a listed chunk object of `len_bytes` can be a whole one. A shorter or longer one
/// (damaged, or cut short by a power loss) is not counted as stored: the backup stores it
/// again rather than reuse it.
pub fn plausible_object_len(len_bytes: u64) -> bool {
    (HEADER_LEN_BYTES as u64..=MAX_OBJECT_BYTES).contains(&len_bytes)
}

const MAGIC: &[u8; 8] = b"EVSCHNK1";
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const CODEC_DELTA: u8 = 2;

/// Blocks a delta patches are this size, the volume's block size.
pub const DELTA_BLOCK_BYTES: usize = 4096;
/// Longest chain of deltas a reader follows down to a whole chunk (or zeroes). Writers start a
/// whole chunk again before a chain gets longer; a longer (or cyclic) chain in a store is
/// corrupt.
pub const MAX_DELTA_DEPTH: usize = 8;
/// Fixed part of a delta's body: base kind, base id, run count.
const DELTA_FIXED_BYTES: usize = 1 + 32 + 4;

/// Compressing the whole chunk is skipped unless this prefix compresses, so random data
/// (encrypted or already compressed volumes) costs almost no CPU.
const SAMPLE_LEN_BYTES: usize = 64 << 10;
/// A delta's new blocks are compressed unless their first block does not compress: the
/// compressor's pass over incompressible blocks cost an incremental more CPU than hashing and
/// reading them.
const DELTA_SAMPLE_LEN_BYTES: usize = DELTA_BLOCK_BYTES;
/// Room for a compressed delta sample: at least zstd's bound for it (checked in the tests).
const DELTA_SAMPLE_ROOM_BYTES: usize = DELTA_SAMPLE_LEN_BYTES + 512;
/// The sample must shrink to at most this percentage of its length to be worth compressing.
const SAMPLE_MAX_PERCENT: usize = 97;

/// Content address of a chunk: BLAKE3 of its plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

/// A string that is not 64 hex digits was given as a chunk id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunk id {0:?}: expected 64 hex digits")]
pub struct InvalidChunkId(pub String);

impl ChunkId {
    pub fn of(plaintext: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(plaintext).as_bytes())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> ChunkId {
        ChunkId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, the form used in object keys and manifests.
    pub fn to_hex(self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Accepts exactly 64 hex digits of either case.
    pub fn parse_hex(s: &str) -> Result<ChunkId, InvalidChunkId> {
        blake3::Hash::from_hex(s)
            .map(|h| ChunkId(*h.as_bytes()))
            .map_err(|_| InvalidChunkId(s.to_owned()))
    }
}

impl FromStr for ChunkId {
    type Err = InvalidChunkId;

    fn from_str(s: &str) -> Result<ChunkId, InvalidChunkId> {
        ChunkId::parse_hex(s)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&blake3::Hash::from_bytes(self.0).to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&blake3::Hash::from_bytes(self.0).to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ChunkId, D::Error> {
        let s = String::deserialize(deserializer)?;
        ChunkId::parse_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// Object key of a chunk, relative to the store root. The two-hex directory keeps listings of
/// a file:// store from putting millions of files in one directory.
pub fn chunk_key(id: &ChunkId) -> String {
    let hex = id.to_hex();
    format!("chunks/{}/{hex}", &hex[..2])
}

/// The chunk id named by a listed object key (with any store prefix in front), or `None` for
/// anything that is not exactly what [`chunk_key`] produces, so GC never touches foreign objects.
pub fn parse_chunk_key(key: &str) -> Option<ChunkId> {
    let (_, hex) = key.rsplit_once('/')?;
    let id = ChunkId::parse_hex(hex).ok()?;
    let canonical = chunk_key(&id);
    let prefix = key.strip_suffix(canonical.as_str())?;
    (prefix.is_empty() || prefix.ends_with('/')).then_some(id)
}

/// Why a stored chunk object was rejected on read.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {id}: bad magic {found:02x?} (expected \"EVSCHNK1\")")]
    BadMagic { id: ChunkId, found: Vec<u8> },
    #[error("chunk {id}: unknown codec {codec} (known: 0 = raw, 1 = zstd, 2 = delta)")]
    UnknownCodec { id: ChunkId, codec: u8 },
    #[error("chunk {id}: reserved header bytes are {found:02x?}, expected zero")]
    ReservedNotZero { id: ChunkId, found: [u8; 3] },
    #[error("chunk {id}: object is {len} bytes, shorter than the {HEADER_LEN_BYTES}-byte header")]
    Truncated { id: ChunkId, len: usize },
    #[error("chunk {id}: {what} is {actual} bytes, expected {expected}")]
    LengthMismatch {
        id: ChunkId,
        what: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("chunk {id}: payload crc32c is {actual:08x}, header says {expected:08x}")]
    ChecksumMismatch {
        id: ChunkId,
        expected: u32,
        actual: u32,
    },
    #[error("chunk {id}: zstd decompression failed: {reason}")]
    Decompress { id: ChunkId, reason: String },
    #[error("chunk {id}: plaintext hashes to {actual}")]
    HashMismatch { id: ChunkId, actual: ChunkId },
    #[error("chunk {id}: bad delta: {reason}")]
    BadDelta { id: ChunkId, reason: String },
    #[error("chunk {id}: unreadable in the store ({reason})")]
    Unreadable { id: ChunkId, reason: String },
}

impl ChunkError {
    /// The chunk the error is about.
    #[cfg(test)]
    pub fn chunk_id(&self) -> ChunkId {
        match self {
            ChunkError::BadMagic { id, .. }
            | ChunkError::UnknownCodec { id, .. }
            | ChunkError::ReservedNotZero { id, .. }
            | ChunkError::Truncated { id, .. }
            | ChunkError::LengthMismatch { id, .. }
            | ChunkError::ChecksumMismatch { id, .. }
            | ChunkError::Decompress { id, .. }
            | ChunkError::HashMismatch { id, .. }
            | ChunkError::BadDelta { id, .. }
            | ChunkError::Unreadable { id, .. } => *id,
        }
    }
}

/// Builds the stored object for one chunk of plaintext.
///
/// # Panics
/// If `plaintext` is longer than [`CHUNK_SIZE_BYTES`]: that is a caller bug, and writing an
/// object every reader rejects would be worse.
#[cfg(test)]
pub fn encode(plaintext: &[u8], zstd_level: i32) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN_BYTES + plaintext.len()];
    let len = encode_into(plaintext, zstd_level, &mut out);
    out.truncate(len);
    out
}

/// [`encode`] into `out` (at least the header plus the plaintext long, for example an aligned
/// buffer a direct write takes as is); returns the object's length.
///
/// # Panics
/// As [`encode`], and if `out` is too short.
pub fn encode_into(plaintext: &[u8], zstd_level: i32, out: &mut [u8]) -> usize {
    assert!(
        plaintext.len() as u64 <= CHUNK_SIZE_BYTES,
        "chunk plaintext of {} bytes exceeds {CHUNK_SIZE_BYTES}",
        plaintext.len()
    );
    let payload_room = &mut out[HEADER_LEN_BYTES..HEADER_LEN_BYTES + plaintext.len()];
    let (codec, payload_len) = match compress_into(plaintext, zstd_level, payload_room) {
        Some(n) => (CODEC_ZSTD, n),
        None => {
            payload_room.copy_from_slice(plaintext);
            (CODEC_RAW, plaintext.len())
        }
    };
    let (header, rest) = out.split_at_mut(HEADER_LEN_BYTES);
    write_header(header, codec, plaintext.len(), &rest[..payload_len]);
    HEADER_LEN_BYTES + payload_len
}

thread_local! {
    /// zstd contexts per thread, reused: creating one per chunk cost more CPU than compressing
    /// a small delta.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
    /// A compressible delta's body (run list and new blocks) gathered for the compressor,
    /// reused from one delta to the next (see `encode_delta_into`).
    static DELTA_BODY: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A thread's delta body buffer is given back to the allocator when a delta made it larger
/// than this (a chunk rewritten whole), so idle threads do not hold megabytes.
const MAX_KEPT_DELTA_BODY_BYTES: usize = 256 << 10;

/// Runs `f` with this thread's compressor at `level`.
fn with_compressor<T>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if !matches!(&*slot, Some((at, _)) if *at == level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let (_, compressor) = slot.as_mut().expect("set just above");
        f(compressor)
    })
}

/// Runs `f` with this thread's decompressor.
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        f(slot.as_mut().expect("set just above"))
    })
}

/// Whether the start of a delta's new bytes (`first`, its first piece) shrinks enough to be
/// worth compressing. Compressed into room on the stack (the compressor's bound for a sample,
/// as a heap buffer would have).
fn delta_sample_compresses(first: &[u8], zstd_level: i32) -> bool {
    let sample = &first[..first.len().min(DELTA_SAMPLE_LEN_BYTES)];
    let mut room = [0u8; DELTA_SAMPLE_ROOM_BYTES];
    // A compressor error cannot come from the data itself; storing raw is always correct.
    with_compressor(zstd_level, |c| c.compress_to_buffer(sample, &mut room[..]))
        .is_ok_and(|compressed_len| compressed_len * 100 <= sample.len() * SAMPLE_MAX_PERCENT)
}

/// Compresses into `room` (the plaintext's length) when compressing pays off and the result is
/// smaller than the plaintext; `None`: store raw.
fn compress_into(plaintext: &[u8], zstd_level: i32, room: &mut [u8]) -> Option<usize> {
    let sample = &plaintext[..plaintext.len().min(SAMPLE_LEN_BYTES)];
    // A compressor error cannot come from the data itself; storing raw is always correct.
    let sample_compressed = with_compressor(zstd_level, |c| c.compress(sample)).ok()?;
    if sample_compressed.len() * 100 > sample.len() * SAMPLE_MAX_PERCENT {
        return None;
    }
    if sample.len() == plaintext.len() {
        if sample_compressed.len() >= plaintext.len() {
            return None;
        }
        room[..sample_compressed.len()].copy_from_slice(&sample_compressed);
        return Some(sample_compressed.len());
    }
    // A frame that does not fit in fewer bytes than the plaintext fails: stored raw.
    let room_len = room.len() - 1;
    with_compressor(zstd_level, |c| {
        c.compress_to_buffer(plaintext, &mut room[..room_len])
    })
    .ok()
}

fn write_header(header: &mut [u8], codec: u8, plaintext_len: usize, payload: &[u8]) {
    header[..8].copy_from_slice(MAGIC);
    header[8] = codec;
    header[9..12].copy_from_slice(&[0, 0, 0]);
    // Both fit: plaintext <= 4 MiB (asserted by the encoders) and payload <= 4 MiB + a margin.
    header[12..16].copy_from_slice(&(plaintext_len as u32).to_le_bytes());
    header[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[20..24].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
}

#[cfg(test)]
fn with_header(codec: u8, plaintext_len: usize, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN_BYTES + payload.len()];
    let (header, rest) = out.split_at_mut(HEADER_LEN_BYTES);
    rest.copy_from_slice(payload);
    write_header(header, codec, plaintext_len, payload);
    out
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// What decoding a stored object gave.
#[derive(Debug)]
pub enum Decoded {
    /// The plaintext is in the output buffer and hashes to the chunk's id.
    Plain,
    /// The object is a delta: the output buffer is untouched. Its base's plaintext goes into
    /// the buffer, then [`Delta::apply`], then [`check_hash`].
    Delta(Delta),
}

/// A chunk stored as the blocks that differ from another chunk (or from zeroes).
#[derive(Debug)]
pub struct Delta {
    /// The chunk patched, or None for an all-zero base.
    pub base: Option<ChunkId>,
    /// (first block, block count) runs, in order, not overlapping, inside the chunk.
    runs: Vec<(u32, u32)>,
    /// The runs' new bytes, one after another.
    data: Vec<u8>,
}

impl Delta {
    /// Writes the patched blocks over the base's plaintext in `out`.
    pub fn apply(&self, out: &mut [u8]) {
        let mut at = 0;
        for &(first, count) in &self.runs {
            let start = first as usize * DELTA_BLOCK_BYTES;
            let len = count as usize * DELTA_BLOCK_BYTES;
            out[start..start + len].copy_from_slice(&self.data[at..at + len]);
            at += len;
        }
    }

    /// The (first block, block count) runs it replaces, in order.
    pub fn runs(&self) -> &[(u32, u32)] {
        &self.runs
    }

    /// Bytes of blocks the delta replaces.
    #[cfg(test)]
    pub fn patched_bytes(&self) -> usize {
        self.data.len()
    }
}

/// Checks a stored object and decodes it into `out`, whose length must be the plaintext's (a
/// reader knows it from the manifest): no allocation for whole chunks, and `out` may be an
/// aligned buffer a direct write takes as is. On error `out` holds unspecified bytes.
///
/// The checks run cheapest first and the final BLAKE3 comparison makes any corruption that slips
/// past the others (or an object stored under the wrong name) an error, never wrong data. A
/// delta is checked the same way once its base is under it (see [`Decoded::Delta`]).
pub fn decode_into(id: &ChunkId, stored: &[u8], out: &mut [u8]) -> Result<Decoded, ChunkError> {
    let decoded = decode_into_unverified(id, stored, out)?;
    if let Decoded::Plain = decoded {
        check_hash(*id, out)?;
    }
    Ok(decoded)
}

/// [`decode_into`] without the final BLAKE3 check of a whole chunk's plaintext: the caller
/// must make it (a restore under a delta checks it through the chunk's BLAKE3 tree, which it
/// needs anyway to check the deltas above cheaply).
pub fn decode_into_unverified(
    id: &ChunkId,
    stored: &[u8],
    out: &mut [u8],
) -> Result<Decoded, ChunkError> {
    let id = *id;
    let checked = check(id, stored)?;
    if checked.plaintext_len != out.len() {
        return Err(ChunkError::LengthMismatch {
            id,
            what: "plaintext length in header (the manifest's chunk length)",
            expected: out.len() as u64,
            actual: checked.plaintext_len as u64,
        });
    }
    match checked.codec {
        Codec::Raw => out.copy_from_slice(checked.payload),
        Codec::Zstd => {
            // A frame producing more than `out` holds fails here rather than overflowing.
            let n = with_decompressor(|d| d.decompress_to_buffer(checked.payload, out)).map_err(
                |e| ChunkError::Decompress {
                    id,
                    reason: e.to_string(),
                },
            )?;
            check_decompressed_len(id, checked.plaintext_len, n)?;
        }
        Codec::Delta => {
            return parse_delta(id, checked.plaintext_len, checked.payload).map(Decoded::Delta)
        }
    }
    Ok(Decoded::Plain)
}

/// Whether an object's first bytes are a delta's header (the rest is checked when it is read).
pub fn is_delta_header(prefix: &[u8]) -> bool {
    prefix.len() > 8 && &prefix[..8] == MAGIC && prefix[8] == CODEC_DELTA
}

/// Builds the stored object for a whole chunk of `plaintext_len` bytes that equals `base` (or
/// zeroes) but for the blocks of `runs`, whose new bytes are `data`.
#[cfg(test)]
pub fn encode_delta(
    plaintext_len: usize,
    base: Option<&ChunkId>,
    runs: &[(u32, u32)],
    data: &[u8],
    zstd_level: i32,
) -> Vec<u8> {
    let mut out = Vec::new();
    encode_delta_into(&mut out, plaintext_len, base, runs, &[data], zstd_level);
    out
}

/// As `encode_delta`, with the new bytes in pieces (`parts`, concatenated in order) and the
/// object built in `out` (emptied first), memory the caller reuses: neither the pieces nor the
/// object is copied on the way.
pub fn encode_delta_into(
    out: &mut Vec<u8>,
    plaintext_len: usize,
    base: Option<&ChunkId>,
    runs: &[(u32, u32)],
    parts: &[&[u8]],
    zstd_level: i32,
) {
    let mut head = Vec::with_capacity(DELTA_FIXED_BYTES + runs.len() * 8);
    match base {
        Some(id) => {
            head.push(1);
            head.extend_from_slice(id.as_bytes());
        }
        None => {
            head.push(0);
            head.extend_from_slice(&[0; 32]);
        }
    }
    head.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for &(first, count) in runs {
        head.extend_from_slice(&first.to_le_bytes());
        head.extend_from_slice(&count.to_le_bytes());
    }
    let data_len: usize = parts.iter().map(|p| p.len()).sum();
    let body_len = head.len() + data_len;
    out.clear();
    let first = parts.first().copied().unwrap_or_default();
    if !delta_sample_compresses(first, zstd_level) {
        out.reserve(HEADER_LEN_BYTES + raw_frame::frame_len(body_len));
        out.resize(HEADER_LEN_BYTES, 0);
        let mut pieces = Vec::with_capacity(parts.len() + 1);
        pieces.push(&head[..]);
        pieces.extend_from_slice(parts);
        raw_frame::append(out, &pieces);
    } else {
        DELTA_BODY.with(|cell| {
            let mut body = cell.borrow_mut();
            body.clear();
            body.extend_from_slice(&head);
            for part in parts {
                body.extend_from_slice(part);
            }
            // Compressed straight behind the header's room. Compressing cannot fail on valid
            // input with room for the bound; the body stored raw would be unreadable, so a
            // failure here is a bug worth stopping for.
            out.resize(
                HEADER_LEN_BYTES + zstd::zstd_safe::compress_bound(body.len()),
                0,
            );
            let payload_len = with_compressor(zstd_level, |c| {
                c.compress_to_buffer(&body[..], &mut out[HEADER_LEN_BYTES..])
            })
            .expect("zstd compresses a delta body");
            out.truncate(HEADER_LEN_BYTES + payload_len);
            if body.capacity() > MAX_KEPT_DELTA_BODY_BYTES {
                *body = Vec::new();
            }
        });
    }
    let (header, payload) = out.split_at_mut(HEADER_LEN_BYTES);
    write_header(header, CODEC_DELTA, plaintext_len, payload);
}

fn parse_delta(id: ChunkId, plaintext_len: usize, payload: &[u8]) -> Result<Delta, ChunkError> {
    let bad = |reason: String| ChunkError::BadDelta { id, reason };
    if !plaintext_len.is_multiple_of(DELTA_BLOCK_BYTES) {
        return Err(bad(format!(
            "plaintext length {plaintext_len} is not a whole number of blocks"
        )));
    }
    let blocks = (plaintext_len / DELTA_BLOCK_BYTES) as u64;
    // The body holds at most every block once plus one run per block.
    let capacity = DELTA_FIXED_BYTES + blocks as usize * (8 + DELTA_BLOCK_BYTES);
    // Allocate what the frame says it holds (our writer records it), not the bound: a 4 MiB
    // buffer per delta cost a restore more page zeroing than the deltas' bytes. A frame that
    // claims more than the bound, or produces more than it claims, still fails.
    let capacity = match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n <= capacity as u64 => n as usize,
        _ => capacity,
    };
    let body = with_decompressor(|d| d.decompress(payload, capacity)).map_err(|e| {
        ChunkError::Decompress {
            id,
            reason: e.to_string(),
        }
    })?;
    if body.len() < DELTA_FIXED_BYTES {
        return Err(bad(format!("body of {} bytes is too short", body.len())));
    }
    let base_id = ChunkId::from_bytes(body[1..33].try_into().expect("32 bytes"));
    let base = match body[0] {
        0 => None,
        1 if base_id == id => return Err(bad("it names itself as its base".into())),
        1 => Some(base_id),
        kind => return Err(bad(format!("unknown base kind {kind}"))),
    };
    let run_count = le_u32(&body, 33) as usize;
    let runs_end = (run_count as u64)
        .checked_mul(8)
        .and_then(|n| n.checked_add(DELTA_FIXED_BYTES as u64))
        .filter(|&end| end <= body.len() as u64)
        .ok_or_else(|| bad(format!("{run_count} runs do not fit its body")))?
        as usize;
    let mut runs = Vec::with_capacity(run_count);
    let mut next_free = 0u64;
    let mut patched_blocks = 0u64;
    for r in 0..run_count {
        let at = DELTA_FIXED_BYTES + r * 8;
        let (first, count) = (le_u32(&body, at), le_u32(&body, at + 4));
        let end = u64::from(first) + u64::from(count);
        if count == 0 || u64::from(first) < next_free || end > blocks {
            return Err(bad(format!(
                "run {r} (blocks {first}+{count}) is empty, out of order or past block {blocks}"
            )));
        }
        next_free = end;
        patched_blocks += u64::from(count);
        runs.push((first, count));
    }
    let data = body[runs_end..].to_vec();
    if data.len() as u64 != patched_blocks * DELTA_BLOCK_BYTES as u64 {
        return Err(bad(format!(
            "{} bytes of data for {patched_blocks} patched blocks",
            data.len()
        )));
    }
    Ok(Delta { base, runs, data })
}

enum Codec {
    Raw,
    Zstd,
    Delta,
}

/// A stored object whose header and payload checksum are sound.
struct Checked<'a> {
    codec: Codec,
    plaintext_len: usize,
    payload: &'a [u8],
}

/// Every check short of decompressing and hashing, cheapest first.
fn check(id: ChunkId, stored: &[u8]) -> Result<Checked<'_>, ChunkError> {
    if stored.len() < HEADER_LEN_BYTES {
        return Err(ChunkError::Truncated {
            id,
            len: stored.len(),
        });
    }
    let (header, payload) = stored.split_at(HEADER_LEN_BYTES);
    if &header[0..8] != MAGIC {
        return Err(ChunkError::BadMagic {
            id,
            found: header[0..8].to_vec(),
        });
    }
    let codec = match header[8] {
        CODEC_RAW => Codec::Raw,
        CODEC_ZSTD => Codec::Zstd,
        CODEC_DELTA => Codec::Delta,
        codec => return Err(ChunkError::UnknownCodec { id, codec }),
    };
    let reserved = [header[9], header[10], header[11]];
    if reserved != [0, 0, 0] {
        return Err(ChunkError::ReservedNotZero {
            id,
            found: reserved,
        });
    }
    let plaintext_len = le_u32(header, 12);
    let payload_len = le_u32(header, 16);
    let expected_crc = le_u32(header, 20);
    if u64::from(plaintext_len) > CHUNK_SIZE_BYTES {
        return Err(ChunkError::LengthMismatch {
            id,
            what: "plaintext length in header (maximum)",
            expected: CHUNK_SIZE_BYTES,
            actual: u64::from(plaintext_len),
        });
    }
    if u64::from(payload_len) != payload.len() as u64 {
        return Err(ChunkError::LengthMismatch {
            id,
            what: "payload",
            expected: u64::from(payload_len),
            actual: payload.len() as u64,
        });
    }
    let actual_crc = crc32c::crc32c(payload);
    if actual_crc != expected_crc {
        return Err(ChunkError::ChecksumMismatch {
            id,
            expected: expected_crc,
            actual: actual_crc,
        });
    }
    if matches!(codec, Codec::Raw) && payload_len != plaintext_len {
        return Err(ChunkError::LengthMismatch {
            id,
            what: "raw payload",
            expected: u64::from(plaintext_len),
            actual: u64::from(payload_len),
        });
    }
    Ok(Checked {
        codec,
        // At most CHUNK_SIZE_BYTES, checked above.
        plaintext_len: plaintext_len as usize,
        payload,
    })
}

fn check_decompressed_len(id: ChunkId, expected: usize, actual: usize) -> Result<(), ChunkError> {
    if actual != expected {
        return Err(ChunkError::LengthMismatch {
            id,
            what: "decompressed plaintext",
            expected: expected as u64,
            actual: actual as u64,
        });
    }
    Ok(())
}

pub fn check_hash(id: ChunkId, plaintext: &[u8]) -> Result<(), ChunkError> {
    let actual = ChunkId::of(plaintext);
    if actual != id {
        return Err(ChunkError::HashMismatch { id, actual });
    }
    Ok(())
}

/// True when every byte is zero. Such chunks are recorded as `null` in manifests, never stored.
pub fn is_all_zero(data: &[u8]) -> bool {
    // OR-folding fixed 256-byte blocks vectorizes (about 3x faster than 64-byte blocks here);
    // the early exit is per block, not per byte.
    let mut blocks = data.chunks_exact(256);
    blocks.all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole (non-delta) object decoded into a buffer of the header's length.
    fn decode(id: &ChunkId, stored: &[u8]) -> Result<Vec<u8>, ChunkError> {
        let len = if stored.len() >= 16 {
            le_u32(stored, 12) as usize
        } else {
            0
        };
        let mut out = vec![0; len.min(CHUNK_SIZE_BYTES as usize)];
        match decode_into(id, stored, &mut out)? {
            Decoded::Plain => Ok(out),
            Decoded::Delta(_) => panic!("a delta where a whole chunk was expected"),
        }
    }

    fn patched(base: &[u8], runs: &[(u32, u32)], data: &[u8]) -> Vec<u8> {
        let mut out = base.to_vec();
        let mut at = 0;
        for &(first, count) in runs {
            let (start, len) = (first as usize * 4096, count as usize * 4096);
            out[start..start + len].copy_from_slice(&data[at..at + len]);
            at += len;
        }
        out
    }

    #[test]
    fn delta_decodes_onto_its_base_and_checks_the_result() {
        let base = random_bytes(64 << 10, 11);
        let base_id = ChunkId::of(&base);
        let runs = [(0u32, 1u32), (5, 2), (15, 1)];
        let data = random_bytes(4 * 4096, 12);
        let new = patched(&base, &runs, &data);
        let id = ChunkId::of(&new);
        let stored = encode_delta(new.len(), Some(&base_id), &runs, &data, 3);
        assert!(stored.len() < 5 * 4096, "{} bytes", stored.len());
        let mut out = vec![0u8; new.len()];
        let Decoded::Delta(delta) = decode_into(&id, &stored, &mut out).unwrap() else {
            panic!("not a delta");
        };
        assert_eq!(delta.base, Some(base_id));
        assert_eq!(delta.patched_bytes(), data.len());
        out.copy_from_slice(&base);
        delta.apply(&mut out);
        check_hash(id, &out).unwrap();
        assert_eq!(out, new);
        // The same delta over another base is caught by the hash.
        let mut wrong = random_bytes(64 << 10, 13);
        delta.apply(&mut wrong);
        assert!(matches!(
            check_hash(id, &wrong),
            Err(ChunkError::HashMismatch { .. })
        ));

        // Over zeroes.
        let zeros = vec![0u8; 64 << 10];
        let new = patched(&zeros, &runs, &data);
        let id = ChunkId::of(&new);
        let stored = encode_delta(new.len(), None, &runs, &data, 3);
        let Decoded::Delta(delta) = decode_into(&id, &stored, &mut out).unwrap() else {
            panic!("not a delta");
        };
        assert_eq!(delta.base, None);
        let mut out = zeros.clone();
        delta.apply(&mut out);
        assert_eq!(out, new);
    }

    #[test]
    fn deltas_of_incompressible_blocks_are_stored_raw_and_others_compressed() {
        let base = random_bytes(64 << 10, 21);
        let base_id = ChunkId::of(&base);
        let runs = [(1u32, 3u32)];
        let body_len = DELTA_FIXED_BYTES + runs.len() * 8 + 3 * 4096;
        for (data, raw) in [
            (random_bytes(3 * 4096, 22), true),
            (compressible_bytes(3 * 4096), false),
        ] {
            let stored = encode_delta(base.len(), Some(&base_id), &runs, &data, 3);
            let raw_len = HEADER_LEN_BYTES + raw_frame::frame_len(body_len);
            if raw {
                assert_eq!(stored.len(), raw_len);
            } else {
                assert!(stored.len() < raw_len / 2, "{} bytes", stored.len());
            }
            let new = patched(&base, &runs, &data);
            let id = ChunkId::of(&new);
            let mut out = vec![0u8; new.len()];
            let Decoded::Delta(delta) = decode_into(&id, &stored, &mut out).unwrap() else {
                panic!("not a delta");
            };
            out.copy_from_slice(&base);
            delta.apply(&mut out);
            assert_eq!(out, new);
        }
    }

    #[test]
    fn a_delta_sample_has_room_for_the_compressors_bound() {
        assert!(zstd::zstd_safe::compress_bound(DELTA_SAMPLE_LEN_BYTES) <= DELTA_SAMPLE_ROOM_BYTES);
    }

    #[test]
    fn a_delta_from_pieces_into_a_used_buffer_is_the_delta_of_their_concatenation() {
        let base_id = ChunkId::of(b"base");
        let runs = [(1u32, 2u32), (7, 1)];
        let mut out = vec![0xAAu8; 100_000];
        for data in [random_bytes(3 * 4096, 31), compressible_bytes(3 * 4096)] {
            let pieces = [&data[..4096], &data[4096..8192], &data[8192..]];
            encode_delta_into(&mut out, 64 << 10, Some(&base_id), &runs, &pieces, 3);
            assert_eq!(out, encode_delta(64 << 10, Some(&base_id), &runs, &data, 3));
        }
    }

    #[test]
    fn malformed_deltas_are_rejected_by_name() {
        let len = 64 << 10;
        let base_id = ChunkId::of(b"base");
        let id = ChunkId::of(b"new");
        let data = random_bytes(2 * 4096, 14);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "out of order",
                encode_delta(len, Some(&base_id), &[(5, 1), (2, 1)], &data, 1),
            ),
            (
                "overlapping",
                encode_delta(len, Some(&base_id), &[(2, 2), (3, 1)], &data[..4096 * 2], 1),
            ),
            (
                "past the end",
                encode_delta(len, Some(&base_id), &[(15, 2)], &data, 1),
            ),
            (
                "empty run",
                encode_delta(len, Some(&base_id), &[(1, 0), (2, 2)], &data, 1),
            ),
            (
                "short data",
                encode_delta(len, Some(&base_id), &[(1, 3)], &data, 1),
            ),
            (
                "names itself",
                encode_delta(len, Some(&id), &[(1, 2)], &data, 1),
            ),
            (
                "partial block chunk",
                encode_delta(len - 512, Some(&base_id), &[(1, 2)], &data, 1),
            ),
        ];
        for (what, stored) in cases {
            let mut out = vec![0u8; stored_len(&stored)];
            let err = decode_into(&id, &stored, &mut out).unwrap_err();
            assert!(matches!(err, ChunkError::BadDelta { .. }), "{what}: {err}");
        }
        // A run count that does not fit the body.
        let mut body = vec![1u8];
        body.extend_from_slice(base_id.as_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        let stored = with_header(CODEC_DELTA, len, &zstd::bulk::compress(&body, 1).unwrap());
        let err = decode_into(&id, &stored, &mut vec![0u8; len]).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        // A body that decompresses to more than any valid delta holds.
        let huge = vec![0u8; len + len / 4096 * 8 + 100];
        let stored = with_header(CODEC_DELTA, len, &zstd::bulk::compress(&huge, 1).unwrap());
        let err = decode_into(&id, &stored, &mut vec![0u8; len]).unwrap_err();
        assert!(matches!(err, ChunkError::Decompress { .. }), "{err}");
    }

    fn stored_len(stored: &[u8]) -> usize {
        le_u32(stored, 12) as usize
    }

    /// Deterministic pseudo-random bytes (xorshift), incompressible for zstd.
    fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.extend_from_slice(&seed.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn compressible_bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 512 % 7) as u8 + b'a').collect()
    }

    fn payload_len(stored: &[u8]) -> usize {
        le_u32(stored, 16) as usize
    }

    #[test]
    fn random_chunk_is_stored_raw_and_round_trips() {
        let data = random_bytes(CHUNK_SIZE_BYTES as usize, 1);
        let id = ChunkId::of(&data);
        let stored = encode(&data, 1);
        assert_eq!(stored[8], CODEC_RAW);
        assert_eq!(payload_len(&stored), data.len());
        assert_eq!(stored.len(), HEADER_LEN_BYTES + data.len());
        assert_eq!(decode(&id, &stored).unwrap(), data);
    }

    #[test]
    fn compressible_chunk_is_compressed_and_round_trips() {
        let data = compressible_bytes(CHUNK_SIZE_BYTES as usize);
        let id = ChunkId::of(&data);
        let stored = encode(&data, 1);
        assert_eq!(stored[8], CODEC_ZSTD);
        assert!(payload_len(&stored) < data.len() / 10);
        assert_eq!(decode(&id, &stored).unwrap(), data);
    }

    #[test]
    fn random_sample_skips_compression_of_compressible_rest() {
        let mut data = random_bytes(SAMPLE_LEN_BYTES, 2);
        data.extend(compressible_bytes(
            CHUNK_SIZE_BYTES as usize - SAMPLE_LEN_BYTES,
        ));
        let stored = encode(&data, 1);
        assert_eq!(stored[8], CODEC_RAW);
        assert_eq!(decode(&ChunkId::of(&data), &stored).unwrap(), data);
    }

    #[test]
    fn short_last_chunks_round_trip() {
        for len in [4096, 12288, SAMPLE_LEN_BYTES, 3 << 20] {
            for data in [compressible_bytes(len), random_bytes(len, len as u64)] {
                let stored = encode(&data, 3);
                assert_eq!(le_u32(&stored, 12) as usize, len);
                assert_eq!(decode(&ChunkId::of(&data), &stored).unwrap(), data);
            }
        }
    }

    #[test]
    fn decode_into_matches_decode_and_checks_the_same() {
        for data in [
            compressible_bytes(CHUNK_SIZE_BYTES as usize),
            random_bytes(CHUNK_SIZE_BYTES as usize, 3),
            compressible_bytes(12288),
        ] {
            let id = ChunkId::of(&data);
            let stored = encode(&data, 1);
            let mut out = vec![0xa5; data.len()];
            decode_into(&id, &stored, &mut out).unwrap();
            assert_eq!(out, data);
            // The manifest's length disagrees with the header's.
            let mut short = vec![0; data.len() - 4096];
            let err = decode_into(&id, &stored, &mut short).unwrap_err();
            assert!(matches!(err, ChunkError::LengthMismatch { .. }), "{err}");
            let other = ChunkId::of(b"other");
            let err = decode_into(&other, &stored, &mut out).unwrap_err();
            assert!(matches!(err, ChunkError::HashMismatch { .. }), "{err}");
            let mut bad = stored.clone();
            *bad.last_mut().unwrap() ^= 1;
            let err = decode_into(&id, &bad, &mut out).unwrap_err();
            assert!(matches!(err, ChunkError::ChecksumMismatch { .. }), "{err}");
        }
        // A frame producing more than its header (and the buffer) says.
        let zeros = vec![0u8; CHUNK_SIZE_BYTES as usize];
        let mut stored = with_header(CODEC_ZSTD, 4096, &zstd::bulk::compress(&zeros, 1).unwrap());
        rewrite_crc(&mut stored);
        let err = decode_into(&ChunkId::of(&zeros[..4096]), &stored, &mut [0; 4096]).unwrap_err();
        assert!(matches!(err, ChunkError::Decompress { .. }), "{err}");
    }

    fn stored_pair() -> (ChunkId, Vec<u8>) {
        let data = compressible_bytes(1 << 20);
        (ChunkId::of(&data), encode(&data, 1))
    }

    fn rewrite_crc(stored: &mut [u8]) {
        let crc = crc32c::crc32c(&stored[HEADER_LEN_BYTES..]);
        stored[20..24].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn flipped_payload_byte_fails_checksum() {
        let (id, mut stored) = stored_pair();
        let middle = HEADER_LEN_BYTES + (stored.len() - HEADER_LEN_BYTES) / 2;
        stored[middle] ^= 0x40;
        let err = decode(&id, &stored).unwrap_err();
        assert!(matches!(err, ChunkError::ChecksumMismatch { .. }), "{err}");
        assert!(err.to_string().starts_with(&format!("chunk {id}: ")));
    }

    #[test]
    fn flipped_header_bytes_are_detected() {
        let (id, stored) = stored_pair();
        type IsExpected = fn(&ChunkError) -> bool;
        let cases: [(usize, IsExpected); 6] = [
            (0, |e| matches!(e, ChunkError::BadMagic { .. })),
            (8, |e| {
                matches!(e, ChunkError::UnknownCodec { codec: 0x41, .. })
            }),
            (10, |e| matches!(e, ChunkError::ReservedNotZero { .. })),
            // A wrong plaintext length makes bounded decompression fail or come up short.
            (13, |e| {
                matches!(
                    e,
                    ChunkError::Decompress { .. } | ChunkError::LengthMismatch { .. }
                )
            }),
            (16, |e| matches!(e, ChunkError::LengthMismatch { .. })),
            (21, |e| matches!(e, ChunkError::ChecksumMismatch { .. })),
        ];
        for (offset, expected) in cases {
            let mut bad = stored.clone();
            bad[offset] ^= 0x40;
            let err = decode(&id, &bad).unwrap_err();
            assert!(expected(&err), "offset {offset}: {err}");
            assert_eq!(err.chunk_id(), id);
        }
    }

    #[test]
    fn raw_codec_on_compressed_payload_is_a_length_mismatch() {
        let (id, mut stored) = stored_pair();
        stored[8] = CODEC_RAW;
        let err = decode(&id, &stored).unwrap_err();
        assert!(
            matches!(
                err,
                ChunkError::LengthMismatch {
                    what: "raw payload",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_codec_is_rejected() {
        let (id, mut stored) = stored_pair();
        stored[8] = 7;
        let err = decode(&id, &stored).unwrap_err();
        assert!(matches!(err, ChunkError::UnknownCodec { codec: 7, .. }));
        assert!(err.to_string().contains("unknown codec 7"), "{err}");
    }

    #[test]
    fn truncation_is_detected() {
        let (id, stored) = stored_pair();
        let err = decode(&id, &stored[..10]).unwrap_err();
        assert!(
            matches!(err, ChunkError::Truncated { len: 10, .. }),
            "{err}"
        );
        let err = decode(&id, &stored[..stored.len() - 1]).unwrap_err();
        assert!(
            matches!(
                err,
                ChunkError::LengthMismatch {
                    what: "payload",
                    ..
                }
            ),
            "{err}"
        );
        let err = decode(&id, &[]).unwrap_err();
        assert!(matches!(err, ChunkError::Truncated { len: 0, .. }), "{err}");
    }

    #[test]
    fn wrong_id_is_a_hash_mismatch() {
        let (id, stored) = stored_pair();
        let other = ChunkId::of(b"something else");
        let err = decode(&other, &stored).unwrap_err();
        match err {
            ChunkError::HashMismatch { id: named, actual } => {
                assert_eq!(named, other);
                assert_eq!(actual, id);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn oversized_plaintext_length_is_rejected_before_allocating() {
        let (id, mut stored) = stored_pair();
        stored[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode(&id, &stored).unwrap_err();
        assert!(
            matches!(err, ChunkError::LengthMismatch { actual, .. } if actual == u64::from(u32::MAX)),
            "{err}"
        );
    }

    #[test]
    fn zstd_bomb_beyond_header_length_fails() {
        // A valid frame of 4 MiB zeros whose header claims only 4 KiB of plaintext.
        let zeros = vec![0u8; CHUNK_SIZE_BYTES as usize];
        let mut stored = with_header(CODEC_ZSTD, 4096, &zstd::bulk::compress(&zeros, 1).unwrap());
        rewrite_crc(&mut stored);
        let err = decode(&ChunkId::of(&zeros[..4096]), &stored).unwrap_err();
        assert!(matches!(err, ChunkError::Decompress { .. }), "{err}");
    }

    #[test]
    fn garbage_zstd_payload_fails_decompression() {
        let (id, mut stored) = stored_pair();
        for b in &mut stored[HEADER_LEN_BYTES..HEADER_LEN_BYTES + 8] {
            *b = 0xee;
        }
        rewrite_crc(&mut stored);
        let err = decode(&id, &stored).unwrap_err();
        assert!(matches!(err, ChunkError::Decompress { .. }), "{err}");
    }

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[]));
        assert!(is_all_zero(&vec![0u8; CHUNK_SIZE_BYTES as usize]));
        for len in [1, 63, 255, 256, 257, 4096, 4099] {
            let mut data = vec![0u8; len];
            assert!(is_all_zero(&data));
            for at in [0, len / 2, len - 1] {
                data[at] = 1;
                assert!(!is_all_zero(&data), "len {len} at {at}");
                data[at] = 0;
            }
        }
        let mut data = vec![0u8; CHUNK_SIZE_BYTES as usize];
        *data.last_mut().unwrap() = 0x80;
        assert!(!is_all_zero(&data));
    }

    #[test]
    fn hex_forms() {
        let id = ChunkId::of(b"abc");
        let hex = id.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, hex.to_lowercase());
        assert_eq!(id.to_string(), hex);
        assert_eq!(hex.parse::<ChunkId>().unwrap(), id);
        assert_eq!(ChunkId::parse_hex(&hex.to_uppercase()).unwrap(), id);
        assert_eq!(ChunkId::from_bytes(*id.as_bytes()), id);
        for bad in [
            "",
            &hex[..63],
            &format!("{hex}0"),
            &hex.replacen('a', "g", 1),
        ] {
            assert!(ChunkId::parse_hex(bad).is_err(), "{bad:?}");
        }
        let bad = format!("{}x", &hex[..63]);
        assert_eq!(
            ChunkId::parse_hex(&bad).unwrap_err().to_string(),
            format!("invalid chunk id {bad:?}: expected 64 hex digits")
        );
    }

    #[test]
    fn serde_uses_hex_strings() {
        let id = ChunkId::of(b"abc");
        let json = serde_json::to_string(&vec![Some(id), None]).unwrap();
        assert_eq!(json, format!("[\"{id}\",null]"));
        let back: Vec<Option<ChunkId>> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, vec![Some(id), None]);
        assert!(serde_json::from_str::<ChunkId>("\"abcd\"").is_err());
        assert!(serde_json::from_str::<ChunkId>("42").is_err());
    }

    #[test]
    fn key_round_trip() {
        let id = ChunkId::of(b"abc");
        let hex = id.to_hex();
        let key = chunk_key(&id);
        assert_eq!(key, format!("chunks/{}/{hex}", &hex[..2]));
        assert_eq!(parse_chunk_key(&key), Some(id));
        assert_eq!(parse_chunk_key(&format!("backups/prod/{key}")), Some(id));
    }

    #[test]
    fn bad_keys_are_rejected() {
        let id = ChunkId::of(b"abc");
        let hex = id.to_hex();
        let wrong_dir = if &hex[..2] == "00" { "01" } else { "00" };
        for bad in [
            String::new(),
            hex.clone(),
            format!("{}/{hex}", &hex[..2]),
            format!("chunks/{wrong_dir}/{hex}"),
            format!("chunks/{}/{}", &hex[..2], hex.to_uppercase()),
            format!("chunks/{}/{}", &hex[..2], &hex[..63]),
            format!("chunks/{}/{hex}.tmp", &hex[..2]),
            format!("xchunks/{}/{hex}", &hex[..2]),
            format!("manifests/{}/{hex}", &hex[..2]),
            format!("chunks/{}/{hex}/", &hex[..2]),
        ] {
            assert_eq!(parse_chunk_key(&bad), None, "{bad:?}");
        }
    }
}
