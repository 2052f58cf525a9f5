//! Chunk objects: content id, compression, checksums.
//!
//! A chunk object is a 24-byte header followed by the payload (raw or zstd). The object is named
//! by the BLAKE3 of the plaintext, so the same data is stored once however many backups use it.
//! The format is documented in docs/backup-format.md; changing it needs a new magic.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Backups cut a volume into chunks of this size at fixed offsets; only the last may be shorter.
pub const CHUNK_SIZE_BYTES: u64 = 4 << 20;

/// Length of the fixed header in front of every payload.
pub const HEADER_LEN_BYTES: usize = 24;

const MAGIC: &[u8; 8] = b"EVSCHNK1";
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// Compressing the whole chunk is skipped unless this prefix compresses, so random data
/// (encrypted or already compressed volumes) costs almost no CPU.
const SAMPLE_LEN_BYTES: usize = 64 << 10;
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

    #[cfg(test)]
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
    #[error("chunk {id}: unknown codec {codec} (known: 0 = raw, 1 = zstd)")]
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
            | ChunkError::HashMismatch { id, .. } => *id,
        }
    }
}

/// Builds the stored object for one chunk of plaintext.
///
/// # Panics
/// If `plaintext` is longer than [`CHUNK_SIZE_BYTES`]: that is a caller bug, and writing an
/// object every reader rejects would be worse.
pub fn encode(plaintext: &[u8], zstd_level: i32) -> Vec<u8> {
    assert!(
        plaintext.len() as u64 <= CHUNK_SIZE_BYTES,
        "chunk plaintext of {} bytes exceeds {CHUNK_SIZE_BYTES}",
        plaintext.len()
    );
    match compress(plaintext, zstd_level) {
        Some(compressed) => with_header(CODEC_ZSTD, plaintext.len(), &compressed),
        None => with_header(CODEC_RAW, plaintext.len(), plaintext),
    }
}

/// The zstd payload when compressing pays off, else `None` (store raw).
fn compress(plaintext: &[u8], zstd_level: i32) -> Option<Vec<u8>> {
    let sample = &plaintext[..plaintext.len().min(SAMPLE_LEN_BYTES)];
    // A compressor error cannot come from the data itself; storing raw is always correct.
    let sample_compressed = zstd::bulk::compress(sample, zstd_level).ok()?;
    if sample_compressed.len() * 100 > sample.len() * SAMPLE_MAX_PERCENT {
        return None;
    }
    let compressed = if sample.len() == plaintext.len() {
        sample_compressed
    } else {
        zstd::bulk::compress(plaintext, zstd_level).ok()?
    };
    (compressed.len() < plaintext.len()).then_some(compressed)
}

fn with_header(codec: u8, plaintext_len: usize, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN_BYTES + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(codec);
    out.extend_from_slice(&[0, 0, 0]);
    // Both fit: plaintext <= 4 MiB (asserted by encode) and payload < plaintext or == it.
    out.extend_from_slice(&(plaintext_len as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Checks a stored object completely and returns its plaintext.
///
/// The checks run cheapest first and the final BLAKE3 comparison makes any corruption that slips
/// past the others (or an object stored under the wrong name) an error, never wrong data.
pub fn decode(id: &ChunkId, stored: &[u8]) -> Result<Vec<u8>, ChunkError> {
    let id = *id;
    let checked = check(id, stored)?;
    let plaintext = match checked.codec {
        Codec::Raw => checked.payload.to_vec(),
        Codec::Zstd => {
            // The capacity bounds the output buffer: a frame claiming (or producing) more than
            // the header's plaintext length fails instead of allocating it.
            let plaintext = zstd::bulk::decompress(checked.payload, checked.plaintext_len)
                .map_err(|e| ChunkError::Decompress {
                    id,
                    reason: e.to_string(),
                })?;
            check_decompressed_len(id, checked.plaintext_len, plaintext.len())?;
            plaintext
        }
    };
    check_hash(id, &plaintext)?;
    Ok(plaintext)
}

/// As [`decode`], into `out`, whose length must be the plaintext's (a restore knows it from the
/// manifest): no allocation, and `out` may be an aligned buffer a direct write takes as is.
/// On error `out` holds unspecified bytes.
pub fn decode_into(id: &ChunkId, stored: &[u8], out: &mut [u8]) -> Result<(), ChunkError> {
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
            let n = zstd::bulk::decompress_to_buffer(checked.payload, out).map_err(|e| {
                ChunkError::Decompress {
                    id,
                    reason: e.to_string(),
                }
            })?;
            check_decompressed_len(id, checked.plaintext_len, n)?;
        }
    }
    check_hash(id, out)
}

enum Codec {
    Raw,
    Zstd,
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

fn check_hash(id: ChunkId, plaintext: &[u8]) -> Result<(), ChunkError> {
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
