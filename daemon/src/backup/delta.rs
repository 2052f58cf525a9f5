//! Changed chunks named from their parent's cached tree and stored as deltas, a batch at a
//! time.
//!
//! An incremental after scattered 4 KiB writes has a few changed blocks in nearly every chunk,
//! so the per-chunk work is small (its changed blocks read and hashed, the nodes above them
//! merged, a delta encoded) and the hand-offs around it showed: one trip to the blocking pool
//! per chunk put about a sixth of the daemon's CPU into waking and switching threads. A batch
//! of neighbouring chunks reads all its blocks at once and makes one trip.
//!
//! Only the changed blocks are read, from the new snapshot, whose newest layer holds them
//! (recently written, usually still cached): the tree keeps a CV per 4 KiB block, so nothing
//! unchanged is hashed again.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::try_join_all;

use crate::backup::chunk::{self, ChunkId, CHUNK_SIZE_BYTES, DELTA_BLOCK_BYTES};
use crate::backup::error::BackupError;
use crate::backup::scratch::Pool;
use crate::backup::tree::{self, ChunkTree, Cv};
use crate::backup::tree_cache::{VolumeTrees, WrittenBy};
use crate::backup::upload::{blocking, ChunkCtx};
use crate::storage::volume::Volume;

/// Chunks named in one trip to the blocking pool.
pub const BATCH_CHUNKS: usize = 8;
/// Batches read and named at once per core (`Backups::naming_permits`): one can wait for its
/// reads while another hashes.
pub const NAMING_BATCHES_PER_CORE: usize = 2;
/// Delta buffers larger than this (many blocks of one chunk changed) are not kept.
pub const MAX_KEPT_DELTA_BYTES: usize = 256 << 10;
/// A new delta buffer's capacity: room for 31 changed blocks before it has to grow (growing
/// moves it to fresh memory).
const NEW_DELTA_BYTES: usize = 128 << 10;

/// What one blocking call names its batch in, reused chunk after chunk (see `scratch`).
pub struct NameScratch {
    /// The chunk's tree: the parent's, read from the tree file, then updated.
    tree: ChunkTree,
    /// The changed blocks' CVs.
    changed: Vec<(u32, Cv)>,
}

impl NameScratch {
    pub fn new() -> NameScratch {
        NameScratch {
            tree: ChunkTree::zero().1.clone(),
            changed: Vec::new(),
        }
    }
}

/// A changed chunk the incremental may store as a delta of the parent's chunk.
pub struct DeltaPlan {
    /// The parent's chunk (None: zeroes).
    pub base: Option<ChunkId>,
    /// Changed blocks, as (first, count) runs relative to the chunk.
    pub runs: Vec<(u32, u32)>,
}

/// What naming a changed chunk gave.
enum Named {
    /// The chunk's id, and its delta unless it equals its base.
    Chunk(ChunkId, Option<Vec<u8>>),
    /// The chunk reads as zeroes.
    Zero,
}

/// `chunks` (index and plan), each named from its parent's cached tree and its changed 4 KiB
/// blocks, and stored as a delta of the parent's chunk when the store lacks it. For each, in
/// order: its id (None: zeroes), or None when the parent's tree is not cached here or does not
/// prove the parent's id, for the caller to read that chunk whole.
pub(super) async fn process_batch(
    ctx: &ChunkCtx<'_>,
    chunks: Vec<(u64, Arc<DeltaPlan>)>,
) -> Result<Vec<Option<Option<ChunkId>>>, BackupError> {
    let Some(trees) = ctx.trees.map(Arc::clone) else {
        return Ok(vec![None; chunks.len()]);
    };
    // Records of chunks with a parent, in runs of neighbours; the first batches to wait for a
    // permit below read theirs meanwhile.
    let with_parent: Vec<u64> = chunks
        .iter()
        .filter(|(_, plan)| plan.base.is_some())
        .map(|(index, _)| *index)
        .collect();
    if !with_parent.is_empty() {
        // Not awaited, and off the runtime's threads: starting readahead can block on the
        // device's queue.
        let trees = Arc::clone(&trees);
        tokio::task::spawn_blocking(move || {
            for run in with_parent.chunk_by(|a, b| b.checked_sub(*a) == Some(1)) {
                trees.prefetch(run[0], run.len() as u64);
            }
        });
    }
    // Taken before the reads: a batch holds its blocks' buffers from the read to the end of
    // naming, and batches let read ahead only spread those over fresh memory.
    let naming = ctx
        .svc
        .naming_permits
        .acquire()
        .await
        .map_err(|_| BackupError::Failed("naming permits closed".into()))?;
    let view = ctx.view()?;
    let reads = chunks
        .iter()
        .map(|(index, plan)| read_blocks(&view, *index * CHUNK_SIZE_BYTES, plan));
    let read = try_join_all(reads).await?;
    let read_bytes: u64 = read.iter().flatten().map(|b| b.len() as u64).sum();
    ctx.counters
        .read_chunks
        .fetch_add(chunks.len() as u64, Ordering::Relaxed);
    ctx.counters
        .read_bytes
        .fetch_add(read_bytes, Ordering::Relaxed);
    let level = ctx.svc.config.zstd_level;
    let by = ctx.written_by();
    let work: Vec<_> = chunks.iter().cloned().zip(read).collect();
    let svc = Arc::clone(ctx.svc);
    let named = blocking(move || {
        let mut scratch = svc.name_scratch.take_or(NameScratch::new);
        let named: Vec<_> = work
            .into_iter()
            .map(|((index, plan), read)| {
                let deltas = &svc.delta_buffers;
                name(&trees, index, &plan, &read, by, level, &mut scratch, deltas)
            })
            .collect();
        svc.name_scratch.give(scratch);
        named
    })
    .await?;
    drop(naming);
    let mut ids = Vec::with_capacity(chunks.len());
    for ((_, plan), named) in chunks.iter().zip(named) {
        ids.push(match named {
            None => None,
            Some(Named::Zero) => Some(None),
            Some(Named::Chunk(id, None)) => Some(Some(id)),
            Some(Named::Chunk(id, Some(stored))) => {
                if ctx.claim(id) {
                    ctx.put_packed(id, &stored, plan.base).await?;
                }
                ctx.svc.delta_buffers.give(stored);
                Some(Some(id))
            }
        });
    }
    Ok(ids)
}

/// Reads the new bytes of each of `plan`'s runs in the chunk at `offset_bytes`.
async fn read_blocks(
    view: &Volume,
    offset_bytes: u64,
    plan: &DeltaPlan,
) -> Result<Vec<Bytes>, BackupError> {
    let reads = plan.runs.iter().map(|&(first, count)| {
        let at = offset_bytes + u64::from(first) * DELTA_BLOCK_BYTES as u64;
        view.read(at, count as usize * DELTA_BLOCK_BYTES)
    });
    Ok(try_join_all(reads).await?)
}

/// Names chunk `index` from its parent's tree (None when not cached here, or when it does not
/// prove the parent's id) with the CVs of the changed blocks put in, caches its new tree as
/// written `by` this backup and encodes its delta into a buffer from `deltas`. Resumed, the
/// backup finds the records it wrote before the stop instead of its parent's, filed under the
/// ids it gave them: putting the same blocks in gives the same id. Blocking.
#[allow(clippy::too_many_arguments)]
fn name(
    trees: &VolumeTrees,
    index: u64,
    plan: &DeltaPlan,
    blocks: &[Bytes],
    by: WrittenBy,
    zstd_level: i32,
    scratch: &mut NameScratch,
    deltas: &Pool<Vec<u8>>,
) -> Option<Named> {
    let NameScratch { tree, changed } = scratch;
    let base_id = match plan.base {
        None => {
            let (id, zero_tree) = ChunkTree::zero();
            tree.copy_from(zero_tree);
            *id
        }
        Some(base) => trees.load_into(index, &base, by, tree)?,
    };
    changed.clear();
    for (&(first, count), bytes) in plan.runs.iter().zip(blocks) {
        if bytes.len() != count as usize * DELTA_BLOCK_BYTES {
            // A short read would leave changed blocks out of the id: read the chunk whole.
            tracing::warn!(
                index,
                first,
                count,
                read_bytes = bytes.len(),
                "short read of changed blocks; the chunk is read whole"
            );
            return None;
        }
        for (k, block) in bytes.chunks_exact(DELTA_BLOCK_BYTES).enumerate() {
            let at = first as usize + k;
            changed.push((at as u32, tree::subtree_cv(at * DELTA_BLOCK_BYTES, block)));
        }
    }
    let id = match tree.update(&base_id, changed) {
        Ok(id) => id,
        Err(_) => {
            tracing::warn!(chunk = %base_id, index, "cached chunk tree does not prove its id; the chunk is read whole");
            return None;
        }
    };
    if Some(id) == plan.base {
        return Some(Named::Chunk(id, None));
    }
    if id == ChunkTree::zero().0 {
        return Some(Named::Zero);
    }
    trees.store(index, &id, tree, by);
    // The new bytes of the changed blocks, run after run, straight from the read buffers.
    let parts: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
    let mut stored = deltas.take_or(|| Vec::with_capacity(NEW_DELTA_BYTES));
    chunk::encode_delta_into(
        &mut stored,
        CHUNK_SIZE_BYTES as usize,
        plan.base.as_ref(),
        &plan.runs,
        &parts,
        zstd_level,
    );
    Some(Named::Chunk(id, Some(stored)))
}
