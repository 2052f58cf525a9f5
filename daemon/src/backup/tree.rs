//! A chunk's BLAKE3 tree: how a chunk id is recomputed from the parts of the chunk that changed.
//!
//! BLAKE3 hashes its input as a binary tree of 1 KiB leaves. A whole chunk (4 MiB, a power of
//! two) is a perfect tree, and every aligned 4 KiB block and 16 KiB span of it is a subtree with
//! a chaining value (CV) of its own.
//!
//! Two uses. A restore checks each delta it applies against the delta's id by re-hashing the
//! 16 KiB spans it patched and merging the 256 span CVs (`span_cvs`, `root`): the whole chunk
//! is in memory there, and 16 KiB is the widest batch BLAKE3's SIMD code hashes at once.
//! A backup names a changed chunk without reading its unchanged bytes (`ChunkTree`): with a CV
//! kept for every 4 KiB block, a changed block is hashed alone and only the nodes above it are
//! merged again. Kept per 16 KiB span instead, each changed block needed its span's other
//! 12 KiB read, and after scattered writes those random reads bounded the incremental.

use std::sync::OnceLock;

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};

use crate::backup::chunk::{ChunkId, CHUNK_SIZE_BYTES, DELTA_BLOCK_BYTES};

/// Bytes of chunk under one span CV: 16 leaves, the widest batch BLAKE3's SIMD code hashes at
/// once (AVX-512).
pub const SPAN_BYTES: usize = 16 << 10;
/// Spans in a whole chunk.
pub const SPANS: usize = CHUNK_SIZE_BYTES as usize / SPAN_BYTES;
/// 4 KiB blocks (the unit of a delta) in a whole chunk: the leaves of a `ChunkTree`.
pub const BLOCKS: usize = CHUNK_SIZE_BYTES as usize / DELTA_BLOCK_BYTES;
const BLOCKS_PER_SPAN: usize = SPAN_BYTES / DELTA_BLOCK_BYTES;

pub type Cv = [u8; 32];

/// The chaining value of the subtree of a whole chunk holding `bytes`, which start at
/// `offset_bytes` (a multiple of the subtree's power-of-two length).
pub fn subtree_cv(offset_bytes: usize, bytes: &[u8]) -> Cv {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(offset_bytes as u64);
    hasher.update(bytes);
    hasher.finalize_non_root()
}

/// The chaining value of span `index` of a whole chunk.
pub fn span_cv(index: usize, span: &[u8]) -> Cv {
    debug_assert_eq!(span.len(), SPAN_BYTES);
    subtree_cv(index * SPAN_BYTES, span)
}

/// The spans holding blocks `first..first + count` (4 KiB blocks of a chunk).
pub fn spans_of_blocks(first: u32, count: u32) -> std::ops::Range<usize> {
    let start = first as usize / BLOCKS_PER_SPAN;
    let end = (first + count) as usize;
    start..end.div_ceil(BLOCKS_PER_SPAN)
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
        level = level.chunks_exact(2).map(|p| merge(&p[0], &p[1])).collect();
    }
    root_of(&level[0], &level[1])
}

/// The span CVs of an all-zero chunk, computed once.
pub fn zero_cvs() -> &'static [Cv] {
    static ZERO: OnceLock<Vec<Cv>> = OnceLock::new();
    ZERO.get_or_init(|| {
        let zeroes = vec![0u8; SPAN_BYTES];
        (0..SPANS).map(|i| span_cv(i, &zeroes)).collect()
    })
}

fn merge(left: &Cv, right: &Cv) -> Cv {
    merge_subtrees_non_root(left, right, Mode::Hash)
}

fn root_of(left: &Cv, right: &Cv) -> ChunkId {
    ChunkId::from_bytes(*merge_subtrees_root(left, right, Mode::Hash).as_bytes())
}

/// Levels kept by a `ChunkTree`, bottom first: the 4 KiB blocks, then the 16 KiB spans and
/// every level above them up to the root's two children. The 8 KiB level is not kept: a span
/// is three merges of its four blocks.
const LEVEL_LENS: [usize; 9] = [BLOCKS, SPANS, 128, 64, 32, 16, 8, 4, 2];
/// CVs in a `ChunkTree`.
pub const TREE_NODES: usize = BLOCKS + 2 * SPANS - 2;
// The layout `merged` assumes: four blocks per span, then halving levels down to the root's
// two children, `TREE_NODES` in all.
const _: () = {
    assert!(BLOCKS_PER_SPAN == 4 && LEVEL_LENS[0] == BLOCKS && LEVEL_LENS[1] == SPANS);
    let mut level = 2;
    let mut total = BLOCKS + SPANS;
    while level < LEVEL_LENS.len() {
        assert!(LEVEL_LENS[level] * 2 == LEVEL_LENS[level - 1]);
        total += LEVEL_LENS[level];
        level += 1;
    }
    assert!(LEVEL_LENS[LEVEL_LENS.len() - 1] == 2 && total == TREE_NODES);
};

const fn level_start(level: usize) -> usize {
    let mut start = 0;
    let mut l = 0;
    while l < level {
        start += LEVEL_LENS[l];
        l += 1;
    }
    start
}

/// The CVs of a whole chunk's tree from its 4 KiB blocks up (see `LEVEL_LENS`).
///
/// `update` trusts no node it did not check: before a changed block's path is merged again,
/// each node on it must equal the merge of its (stored) children and the top must give the
/// base id, so every sibling it uses is proven part of that id's tree (a Merkle proof). A torn
/// or stale record costs a full read of the chunk, never a wrong id; nodes off the changed
/// paths are not used, so they need no check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkTree {
    nodes: Vec<Cv>,
}

/// Why a stored tree was not used: a node on a changed path is not the merge of its children,
/// or the top does not give the base id.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the cached chunk tree does not prove its chunk id")]
pub struct TreeMismatch;

impl ChunkTree {
    /// The id and tree of a whole chunk.
    pub fn of_chunk(chunk: &[u8]) -> (ChunkId, ChunkTree) {
        assert_eq!(
            chunk.len() as u64,
            CHUNK_SIZE_BYTES,
            "only whole chunks have a tree"
        );
        ChunkTree::of_blocks(
            chunk
                .chunks_exact(DELTA_BLOCK_BYTES)
                .enumerate()
                .map(|(i, block)| subtree_cv(i * DELTA_BLOCK_BYTES, block)),
        )
    }

    /// The id and tree of an all-zero chunk, computed once.
    pub fn zero() -> &'static (ChunkId, ChunkTree) {
        static ZERO: OnceLock<(ChunkId, ChunkTree)> = OnceLock::new();
        ZERO.get_or_init(|| {
            let zeroes = [0u8; DELTA_BLOCK_BYTES];
            ChunkTree::of_blocks((0..BLOCKS).map(|i| subtree_cv(i * DELTA_BLOCK_BYTES, &zeroes)))
        })
    }

    /// The id and tree over the CVs of a chunk's blocks, merged up.
    fn of_blocks(blocks: impl Iterator<Item = Cv>) -> (ChunkId, ChunkTree) {
        let mut nodes = Vec::with_capacity(TREE_NODES);
        nodes.extend(blocks);
        assert_eq!(nodes.len(), BLOCKS);
        nodes.resize(TREE_NODES, [0; 32]);
        let mut tree = ChunkTree { nodes };
        for (level, &len) in LEVEL_LENS.iter().enumerate().skip(1) {
            for i in 0..len {
                let cv = tree.merged(level, i);
                tree.nodes[level_start(level) + i] = cv;
            }
        }
        (tree.root(), tree)
    }

    /// A tree from the bytes `as_bytes` gave (`TREE_NODES` CVs); None if the length is wrong.
    /// (The tree file reads records in place, see `as_bytes_mut`.)
    #[cfg(test)]
    pub fn from_bytes(bytes: &[u8]) -> Option<ChunkTree> {
        if bytes.len() != TREE_NODES * 32 {
            return None;
        }
        let nodes = bytes
            .chunks_exact(32)
            .map(|cv| cv.try_into().expect("32-byte pieces"))
            .collect();
        Some(ChunkTree { nodes })
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.nodes.as_flattened()
    }

    /// The tree's memory in `as_bytes`' layout, to read a stored tree into without a copy.
    /// Nothing read there is trusted: `update` checks every node it uses.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        self.nodes.as_flattened_mut()
    }

    /// Makes this tree equal to `other` in the memory it already has.
    pub fn copy_from(&mut self, other: &ChunkTree) {
        self.nodes.copy_from_slice(&other.nodes);
    }

    /// The chunk id the tree's top gives.
    pub fn root(&self) -> ChunkId {
        let top = level_start(LEVEL_LENS.len() - 1);
        root_of(&self.nodes[top], &self.nodes[top + 1])
    }

    /// Node `i` of `level` merged from its children.
    fn merged(&self, level: usize, i: usize) -> Cv {
        let below = &self.nodes[level_start(level - 1)..];
        if level == 1 {
            let b = &below[i * BLOCKS_PER_SPAN..(i + 1) * BLOCKS_PER_SPAN];
            merge(&merge(&b[0], &b[1]), &merge(&b[2], &b[3]))
        } else {
            merge(&below[2 * i], &below[2 * i + 1])
        }
    }

    /// Puts in the CVs of the changed blocks, `(block index, CV)`, and gives the new chunk id,
    /// after checking every node on their paths against `base` (the id this tree was filed
    /// under). On a mismatch the tree is left as it was.
    pub fn update(
        &mut self,
        base: &ChunkId,
        changed: &[(u32, Cv)],
    ) -> Result<ChunkId, TreeMismatch> {
        // The dirty nodes of each level above the blocks, sorted.
        let mut dirty: Vec<Vec<usize>> = Vec::with_capacity(LEVEL_LENS.len());
        let mut below: Vec<usize> = changed.iter().map(|&(b, _)| b as usize).collect();
        below.sort_unstable();
        below.dedup();
        if below.last().is_some_and(|&b| b >= BLOCKS) {
            return Err(TreeMismatch);
        }
        dirty.push(below);
        for level in 1..LEVEL_LENS.len() {
            let per_parent = if level == 1 { BLOCKS_PER_SPAN } else { 2 };
            let mut parents: Vec<usize> = dirty[level - 1].iter().map(|i| i / per_parent).collect();
            parents.dedup();
            dirty.push(parents);
        }
        for (level, indexes) in dirty.iter().enumerate().skip(1) {
            for &i in indexes {
                if self.merged(level, i) != self.nodes[level_start(level) + i] {
                    return Err(TreeMismatch);
                }
            }
        }
        if self.root() != *base {
            return Err(TreeMismatch);
        }
        for &(block, cv) in changed {
            self.nodes[block as usize] = cv;
        }
        for (level, indexes) in dirty.iter().enumerate().skip(1) {
            for &i in indexes {
                let cv = self.merged(level, i);
                self.nodes[level_start(level) + i] = cv;
            }
        }
        Ok(self.root())
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
        assert_eq!(ChunkTree::zero().0, ChunkId::of(&zero));
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
    fn a_chunk_tree_roots_at_the_blake3_hash_and_its_spans_are_the_span_cvs() {
        let chunk = pseudo_random(7, CHUNK_SIZE_BYTES as usize);
        let (id, tree) = ChunkTree::of_chunk(&chunk);
        assert_eq!(id, ChunkId::of(&chunk));
        assert_eq!(tree.root(), id);
        let spans = &tree.nodes[BLOCKS..BLOCKS + SPANS];
        assert_eq!(spans, span_cvs(&chunk).as_slice());
        assert_eq!(ChunkTree::from_bytes(tree.as_bytes()).unwrap(), tree);
        assert!(ChunkTree::from_bytes(&tree.as_bytes()[32..]).is_none());
        // Read in place, and copied into memory that held another tree.
        let mut other = ChunkTree::zero().1.clone();
        other.as_bytes_mut().copy_from_slice(tree.as_bytes());
        assert_eq!(other, tree);
        other.copy_from(&ChunkTree::zero().1);
        assert_eq!(other, ChunkTree::zero().1);
    }

    /// Changes blocks of `chunk` (index, seed), returning the (index, CV) pairs `update` takes.
    fn change(chunk: &mut [u8], blocks: &[(u32, u64)]) -> Vec<(u32, Cv)> {
        blocks
            .iter()
            .map(|&(b, seed)| {
                let at = b as usize * DELTA_BLOCK_BYTES;
                let block = &mut chunk[at..at + DELTA_BLOCK_BYTES];
                block.copy_from_slice(&pseudo_random(seed, DELTA_BLOCK_BYTES));
                (b, subtree_cv(at, block))
            })
            .collect()
    }

    #[test]
    fn updating_changed_blocks_gives_the_new_chunks_id_and_tree() {
        let mut chunk = pseudo_random(8, CHUNK_SIZE_BYTES as usize);
        let (mut id, mut tree) = ChunkTree::of_chunk(&chunk);
        // Neighbours in one span, both ends, the same block twice, then nothing changed.
        for blocks in [
            vec![(0, 11), (1, 12), (3, 13)],
            vec![(1023, 14), (512, 15), (4, 16)],
            vec![(700, 17), (700, 18)],
            vec![],
        ] {
            let changed = change(&mut chunk, &blocks);
            let new_id = tree.update(&id, &changed).unwrap();
            assert_eq!(new_id, ChunkId::of(&chunk));
            assert_eq!(tree, ChunkTree::of_chunk(&chunk).1);
            id = new_id;
        }
        // From the zero tree: blocks written into a chunk of zeroes.
        let mut zero = vec![0u8; CHUNK_SIZE_BYTES as usize];
        let (zero_id, mut tree) = ChunkTree::zero().clone();
        let changed = change(&mut zero, &[(5, 21), (900, 22)]);
        assert_eq!(tree.update(&zero_id, &changed).unwrap(), ChunkId::of(&zero));
    }

    #[test]
    fn a_tree_that_does_not_prove_its_base_is_not_updated() {
        let mut chunk = pseudo_random(9, CHUNK_SIZE_BYTES as usize);
        let (id, tree) = ChunkTree::of_chunk(&chunk);
        let changed = change(&mut chunk, &[(40, 31)]);
        // Filed under another id.
        let mut t = tree.clone();
        assert_eq!(
            t.update(&ChunkId::of(b"other"), &changed),
            Err(TreeMismatch)
        );
        assert_eq!(t, tree);
        // A stale node on the changed path: the changed block's sibling, its span, a node near
        // the top, one of the root's children.
        for node in [41, BLOCKS + 10, level_start(6) + 1, TREE_NODES - 1] {
            let mut t = tree.clone();
            t.nodes[node][0] ^= 1;
            assert_eq!(t.update(&id, &changed), Err(TreeMismatch), "node {node}");
        }
        // A stale node off the path is not used: the update is still right.
        let mut t = tree.clone();
        t.nodes[600][0] ^= 1;
        assert_eq!(t.update(&id, &changed).unwrap(), ChunkId::of(&chunk));
        // A block past the chunk.
        let mut t = tree.clone();
        assert_eq!(
            t.update(&id, &[(BLOCKS as u32, [0; 32])]),
            Err(TreeMismatch)
        );
    }
}
