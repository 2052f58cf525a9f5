//! A chunk's BLAKE3 tree, kept so an incremental backup can name a changed chunk without
//! reading all of it.
//!
//! BLAKE3 hashes its input as a binary tree of 1 KiB leaves. A whole chunk (4 MiB, a power of
//! two) is a perfect tree, and every aligned 16 KiB span of it is a subtree with a chaining value
//! (CV) of its own. With the 256 span CVs of the previous backup's chunk, the new chunk's id
//! only needs the spans that hold changed blocks hashed again and the 255 parent nodes merged:
//! for 1% scattered 4 KiB writes that reads 4% of the chunk instead of all of it.
//!
//! The CVs of the chunks of each volume's latest backup are cached on local disk, one file per
//! chunk id (`TREE_BYTES`). A cached tree is trusted only after its root is merged again and
//! equals the id it is filed under, so a torn or stale file costs a full read, never a wrong id.

use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::sync::OnceLock;

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};

use crate::backup::chunk::{ChunkId, CHUNK_SIZE_BYTES};

/// Bytes of chunk under one cached chaining value: 16 leaves, the widest batch BLAKE3's SIMD
/// code hashes at once (AVX-512). With 8 KiB spans a full backup's hashing took about 1 CPU-s
/// more per 2 GiB than hashing whole chunks.
pub const SPAN_BYTES: usize = 16 << 10;
/// Spans in a whole chunk.
pub const SPANS: usize = CHUNK_SIZE_BYTES as usize / SPAN_BYTES;
/// Bytes of one cached tree file.
pub const TREE_BYTES: usize = SPANS * 32;

pub type Cv = [u8; 32];

/// The chaining value of span `index` of a whole chunk.
pub fn span_cv(index: usize, span: &[u8]) -> Cv {
    debug_assert_eq!(span.len(), SPAN_BYTES);
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset((index * SPAN_BYTES) as u64);
    hasher.update(span);
    hasher.finalize_non_root()
}

/// The spans holding blocks `first..first + count` (4 KiB blocks of a chunk).
pub fn spans_of_blocks(first: u32, count: u32) -> std::ops::Range<usize> {
    let block = crate::backup::chunk::DELTA_BLOCK_BYTES;
    let start = first as usize * block / SPAN_BYTES;
    let end = ((first + count) as usize * block).div_ceil(SPAN_BYTES);
    start..end
}

/// The span CVs of a whole chunk.
pub fn span_cvs(chunk: &[u8]) -> Vec<Cv> {
    assert_eq!(
        chunk.len() as u64,
        CHUNK_SIZE_BYTES,
        "only whole chunks have a tree"
    );
    chunk
        .chunks_exact(SPAN_BYTES)
        .enumerate()
        .map(|(i, span)| span_cv(i, span))
        .collect()
}

/// The chunk id (the BLAKE3 root) from its span CVs.
pub fn root(cvs: &[Cv]) -> ChunkId {
    assert_eq!(cvs.len(), SPANS);
    let mut level: Vec<Cv> = cvs.to_vec();
    while level.len() > 2 {
        level = level
            .chunks_exact(2)
            .map(|pair| merge_subtrees_non_root(&pair[0], &pair[1], Mode::Hash))
            .collect();
    }
    ChunkId::from_bytes(*merge_subtrees_root(&level[0], &level[1], Mode::Hash).as_bytes())
}

/// The span CVs of an all-zero chunk, computed once.
pub fn zero_cvs() -> &'static [Cv] {
    static ZERO: OnceLock<Vec<Cv>> = OnceLock::new();
    ZERO.get_or_init(|| {
        let zeroes = vec![0u8; SPAN_BYTES];
        (0..SPANS).map(|i| span_cv(i, &zeroes)).collect()
    })
}

/// The cached trees, one file per chunk id under `dir`.
pub struct TreeCache {
    dir: PathBuf,
}

impl TreeCache {
    pub fn new(dir: PathBuf) -> TreeCache {
        TreeCache { dir }
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// The CVs of `id`'s chunk, when a file holds them and they merge to `id`. Blocking.
    pub fn load(&self, id: &ChunkId) -> Option<Vec<Cv>> {
        let bytes = match std::fs::read(self.path(id)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::debug!(chunk = %id, error = %e, "cached chunk tree unreadable");
                return None;
            }
        };
        if bytes.len() != TREE_BYTES {
            return None;
        }
        let cvs: Vec<Cv> = bytes
            .chunks_exact(32)
            .map(|cv| cv.try_into().expect("32-byte pieces"))
            .collect();
        if root(&cvs) != *id {
            tracing::warn!(chunk = %id, "cached chunk tree does not hash to its id; ignored");
            return None;
        }
        Some(cvs)
    }

    /// Files `cvs` under `id`. Written in place, not fsynced: a torn or lost file fails the
    /// check in `load` and costs a full read of the chunk, nothing else. Blocking; a failure is
    /// logged, not returned, for the same reason.
    pub fn store(&self, id: &ChunkId, cvs: &[Cv]) {
        let path = self.path(id);
        let result = (|| {
            let write = |path: &PathBuf| -> std::io::Result<()> {
                std::fs::File::create(path)?.write_all(cvs.as_flattened())
            };
            match write(&path) {
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    std::fs::create_dir_all(
                        path.parent().expect("two levels below the cache dir"),
                    )?;
                    write(&path)
                }
                other => other,
            }
        })();
        if let Err(e) = result {
            tracing::warn!(chunk = %id, path = %path.display(), error = %e, "caching a chunk tree failed");
        }
    }

    /// Forgets `id`'s tree. Blocking.
    pub fn remove(&self, id: &ChunkId) {
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => tracing::debug!(chunk = %id, error = %e, "removing a chunk tree failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn root_of_span_cvs_is_the_blake3_hash() {
        let chunk = pseudo_random(1, CHUNK_SIZE_BYTES as usize);
        let cvs = span_cvs(&chunk);
        assert_eq!(root(&cvs), ChunkId::of(&chunk));
    }

    #[test]
    fn spans_of_blocks_cover_exactly_the_spans_touched() {
        // 16 KiB spans hold four 4 KiB blocks.
        assert_eq!(spans_of_blocks(0, 1), 0..1);
        assert_eq!(spans_of_blocks(3, 1), 0..1);
        assert_eq!(spans_of_blocks(3, 2), 0..2);
        assert_eq!(spans_of_blocks(4, 4), 1..2);
        assert_eq!(spans_of_blocks(1023, 1), 255..256);
    }

    #[test]
    fn zero_cvs_are_those_of_a_zero_chunk() {
        let zero = vec![0u8; CHUNK_SIZE_BYTES as usize];
        assert_eq!(zero_cvs(), span_cvs(&zero).as_slice());
        assert_eq!(root(zero_cvs()), ChunkId::of(&zero));
    }

    #[test]
    fn updating_changed_spans_gives_the_new_chunks_id() {
        let mut chunk = pseudo_random(2, CHUNK_SIZE_BYTES as usize);
        let mut cvs = span_cvs(&chunk);
        for (i, offset) in [
            (3u64, 4096usize),
            (4, 17 * SPAN_BYTES),
            (5, 4 << 20),
            (6, 3 * SPAN_BYTES + 8192),
        ] {
            let at = offset.min(chunk.len() - 4096);
            chunk[at..at + 4096].copy_from_slice(&pseudo_random(i, 4096));
            let span = at / SPAN_BYTES;
            cvs[span] = span_cv(span, &chunk[span * SPAN_BYTES..(span + 1) * SPAN_BYTES]);
        }
        assert_eq!(root(&cvs), ChunkId::of(&chunk));
    }

    #[test]
    fn cache_returns_only_trees_that_hash_to_their_id() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TreeCache::new(dir.path().join("trees"));
        let chunk = pseudo_random(6, CHUNK_SIZE_BYTES as usize);
        let cvs = span_cvs(&chunk);
        let id = ChunkId::of(&chunk);
        assert!(cache.load(&id).is_none());
        cache.store(&id, &cvs);
        assert_eq!(cache.load(&id).unwrap(), cvs);
        // A tree filed under another id, a torn file, a flipped byte: all ignored.
        let other = ChunkId::of(b"other");
        cache.store(&other, &cvs);
        assert!(cache.load(&other).is_none());
        let path = cache.path(&id);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(cache.load(&id).is_none());
        std::fs::write(&path, &bytes[..1000]).unwrap();
        assert!(cache.load(&id).is_none());
        cache.remove(&id);
        assert!(!path.exists());
    }
}
