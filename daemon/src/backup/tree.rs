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
//! volume with a record per chunk index (`VolumeTrees`). A cached tree is trusted only when it
//! is filed under the id asked for and its root, merged again, equals that id, so a torn or
//! stale record costs a full read, never a wrong id.

use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
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

/// Bytes of one chunk's record in a volume's tree file: the chunk id, then its span CVs.
const RECORD_BYTES: u64 = 32 + TREE_BYTES as u64;

/// The cached trees: one file per volume under `dir`, named by the volume's uuid, holding a
/// fixed-size record per chunk index (so caching a chunk's tree is one write into a file that
/// exists, not a file created per chunk and deleted when the next backup replaces it).
pub struct TreeCache {
    dir: PathBuf,
}

impl TreeCache {
    pub fn new(dir: PathBuf) -> TreeCache {
        TreeCache { dir }
    }

    /// The tree file of the volume with `volume_uuid`, created when missing. Blocking.
    pub fn open_volume(&self, volume_uuid: &str) -> std::io::Result<VolumeTrees> {
        // The uuid comes from the volume's own metadata; anything that could leave the
        // directory is refused rather than trusted.
        if volume_uuid.is_empty()
            || !volume_uuid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                format!("volume uuid {volume_uuid:?} cannot name a tree file"),
            ));
        }
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(format!("{volume_uuid}.trees"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        Ok(VolumeTrees { file, path })
    }

    /// Forgets the trees of the volume with `volume_uuid`. Blocking.
    pub fn remove_volume(&self, volume_uuid: &str) {
        let path = self.dir.join(format!("{volume_uuid}.trees"));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "removing chunk trees failed")
            }
        }
    }

    /// Removes the one-file-per-chunk cache of earlier versions (`<hex[0..2]>/<hex>`), which
    /// nothing reads any more. Blocking.
    pub fn remove_legacy(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let legacy = name.len() == 2
                && name
                    .to_str()
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_hexdigit()));
            if legacy && entry.file_type().is_ok_and(|t| t.is_dir()) {
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    tracing::debug!(path = %entry.path().display(), error = %e, "removing old chunk trees failed");
                }
            }
        }
    }
}

/// One volume's tree file.
pub struct VolumeTrees {
    file: std::fs::File,
    path: PathBuf,
}

impl VolumeTrees {
    /// The CVs of chunk `index`, when its record is filed under `id` and they merge to `id`.
    /// Blocking.
    pub fn load(&self, index: u64, id: &ChunkId) -> Option<Vec<Cv>> {
        let mut record = vec![0u8; RECORD_BYTES as usize];
        match self.file.read_exact_at(&mut record, index * RECORD_BYTES) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return None,
            Err(e) => {
                tracing::debug!(path = %self.path.display(), index, error = %e, "cached chunk tree unreadable");
                return None;
            }
        }
        let (filed_under, cvs) = record.split_at(32);
        if filed_under != id.as_bytes() {
            return None;
        }
        let cvs: Vec<Cv> = cvs
            .chunks_exact(32)
            .map(|cv| cv.try_into().expect("32-byte pieces"))
            .collect();
        if root(&cvs) != *id {
            tracing::warn!(chunk = %id, index, "cached chunk tree does not hash to its id; ignored");
            return None;
        }
        Some(cvs)
    }

    /// Files `cvs` as chunk `index`'s tree, under `id`. Written in place, not fsynced: a torn
    /// or lost record fails the checks in `load` and costs a full read of the chunk, nothing
    /// else. Blocking; a failure is logged, not returned, for the same reason.
    pub fn store(&self, index: u64, id: &ChunkId, cvs: &[Cv]) {
        let mut record = Vec::with_capacity(RECORD_BYTES as usize);
        record.extend_from_slice(id.as_bytes());
        record.extend_from_slice(cvs.as_flattened());
        if let Err(e) = self.file.write_all_at(&record, index * RECORD_BYTES) {
            tracing::warn!(chunk = %id, index, path = %self.path.display(), error = %e, "caching a chunk tree failed");
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
        let trees = cache.open_volume("0f3c-uuid").unwrap();
        let chunk = pseudo_random(6, CHUNK_SIZE_BYTES as usize);
        let cvs = span_cvs(&chunk);
        let id = ChunkId::of(&chunk);
        assert!(trees.load(3, &id).is_none());
        trees.store(3, &id, &cvs);
        assert_eq!(trees.load(3, &id).unwrap(), cvs);
        // Another index, another id, a tree filed under an id it does not hash to: all misses.
        assert!(trees.load(2, &id).is_none());
        let other = ChunkId::of(b"other");
        assert!(trees.load(3, &other).is_none());
        trees.store(5, &other, &cvs);
        assert!(trees.load(5, &other).is_none());
        // Reopened, the record is still there; a flipped byte or a torn record is ignored.
        drop(trees);
        let trees = cache.open_volume("0f3c-uuid").unwrap();
        assert_eq!(trees.load(3, &id).unwrap(), cvs);
        let path = dir.path().join("trees/0f3c-uuid.trees");
        let mut bytes = std::fs::read(&path).unwrap();
        let at = 3 * RECORD_BYTES as usize + 100;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(trees.load(3, &id).is_none());
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes[..at]).unwrap();
        assert!(trees.load(3, &id).is_none());
        cache.remove_volume("0f3c-uuid");
        assert!(!path.exists());
        for hostile in ["", "../x", "a/b", "x.trees\0"] {
            assert!(cache.open_volume(hostile).is_err(), "{hostile:?}");
        }
    }

    #[test]
    fn legacy_per_chunk_trees_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("trees");
        std::fs::create_dir_all(root.join("ab")).unwrap();
        std::fs::write(root.join("ab/abcd"), b"old").unwrap();
        let cache = TreeCache::new(root.clone());
        let trees = cache.open_volume("v-1").unwrap();
        drop(trees);
        cache.remove_legacy();
        assert!(!root.join("ab").exists());
        assert!(root.join("v-1.trees").exists());
    }
}
