//! Changed chunks named from their parent's cached tree and stored as deltas, a batch at a
//! time.
//!
//! An incremental after scattered 4 KiB writes has a few changed blocks in nearly every chunk,
//! so the per-chunk work is small (a few 16 KiB spans read and hashed, a tree merged, a delta
//! encoded) and the hand-offs around it showed: one trip to the blocking pool per chunk put
//! about a sixth of the daemon's CPU into waking and switching threads. A batch of neighbouring
//! chunks reads all its spans at once and makes one trip.
//!
//! A span's unchanged blocks are read from the parent backup's snapshot, where the whole span
//! is one read from one layer, and its changed blocks from the new snapshot, whose newest
//! layer holds them (recently written, usually still cached). Read from the new snapshot alone,
//! a span with a changed block in its middle took a read from each side of it: when other work
//! had pushed the volume out of the page cache, those reads went to the disk, and an incremental
//! after scattered writes was bound by its random reads.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::try_join_all;

use crate::backup::chunk::{self, ChunkId, CHUNK_SIZE_BYTES, DELTA_BLOCK_BYTES};
use crate::backup::error::BackupError;
use crate::backup::tree::{self, VolumeTrees, SPAN_BYTES};
use crate::backup::upload::{blocking, ChunkCtx};
use crate::storage::volume::Volume;

/// Chunks named in one trip to the blocking pool.
pub const BATCH_CHUNKS: usize = 8;

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

/// `chunks` (index and plan), each named from its parent's cached tree and the spans holding
/// its changed blocks, and stored as a delta of the parent's chunk when the store lacks it.
/// For each, in order: its id (None: zeroes), or None when the parent's tree is not cached
/// here, for the caller to read that chunk whole.
pub(super) async fn process_batch(
    ctx: &ChunkCtx<'_>,
    chunks: Vec<(u64, Arc<DeltaPlan>)>,
) -> Result<Vec<Option<Option<ChunkId>>>, BackupError> {
    let Some(trees) = ctx.trees.map(Arc::clone) else {
        return Ok(vec![None; chunks.len()]);
    };
    let view = ctx.view()?;
    // Without the parent's snapshot (deleted meanwhile), the new one serves the unchanged
    // blocks too: they are the same there.
    let base_view = ctx
        .base_snapshot
        .and_then(|name| ctx.entry.view(name))
        .unwrap_or_else(|| Arc::clone(&view));
    let reads = chunks
        .iter()
        .map(|(index, plan)| read_chunk(&view, &base_view, *index * CHUNK_SIZE_BYTES, plan));
    let read = try_join_all(reads).await?;
    let read_bytes: u64 = read
        .iter()
        .flat_map(|r| r.spans.iter().map(|(_, b)| b).chain(&r.blocks))
        .map(|b| b.len() as u64)
        .sum();
    ctx.counters
        .read_chunks
        .fetch_add(chunks.len() as u64, Ordering::Relaxed);
    ctx.counters
        .read_bytes
        .fetch_add(read_bytes, Ordering::Relaxed);
    let level = ctx.svc.config.zstd_level;
    let work: Vec<_> = chunks.iter().cloned().zip(read).collect();
    let named = blocking(move || {
        let mut scratch = Vec::new();
        work.into_iter()
            .map(|((index, plan), read)| name(&trees, index, &plan, &read, &mut scratch, level))
            .collect::<Vec<_>>()
    })
    .await?;
    let mut ids = Vec::with_capacity(chunks.len());
    for ((_, plan), named) in chunks.iter().zip(named) {
        ids.push(match named {
            None => None,
            Some(Named::Zero) => Some(None),
            Some(Named::Chunk(id, None)) => Some(Some(id)),
            Some(Named::Chunk(id, Some(stored))) => {
                if !ctx.is_known(&id) {
                    ctx.put_packed(id, stored, plan.base).await?;
                }
                Some(Some(id))
            }
        });
    }
    Ok(ids)
}

/// What naming one changed chunk needs read.
struct ChunkRead {
    /// The spans holding changed blocks as they were in the parent's snapshot, as (first span,
    /// bytes) pieces, neighbouring spans read together.
    spans: Vec<(u32, Bytes)>,
    /// The new bytes of each of the plan's runs.
    blocks: Vec<Bytes>,
}

/// Reads what naming the chunk at `offset_bytes` needs: its changed spans from `base_view`,
/// its changed blocks from `view`.
async fn read_chunk(
    view: &Volume,
    base_view: &Volume,
    offset_bytes: u64,
    plan: &DeltaPlan,
) -> Result<ChunkRead, BackupError> {
    let mut span_runs: Vec<(u32, u32)> = Vec::new();
    for &(first, count) in &plan.runs {
        let spans = tree::spans_of_blocks(first, count);
        let (a, z) = (spans.start as u32, spans.end as u32);
        match span_runs.last_mut() {
            Some(last) if last.0 + last.1 >= a => last.1 = last.1.max(z - last.0),
            _ => span_runs.push((a, z - a)),
        }
    }
    let spans = try_join_all(span_runs.iter().map(|&(first, count)| {
        let at = offset_bytes + u64::from(first) * SPAN_BYTES as u64;
        base_view.read(at, count as usize * SPAN_BYTES)
    }));
    let blocks = try_join_all(plan.runs.iter().map(|&(first, count)| {
        let at = offset_bytes + u64::from(first) * DELTA_BLOCK_BYTES as u64;
        view.read(at, count as usize * DELTA_BLOCK_BYTES)
    }));
    let (spans, blocks) = futures_util::try_join!(spans, blocks)?;
    Ok(ChunkRead {
        spans: span_runs.iter().map(|r| r.0).zip(spans).collect(),
        blocks,
    })
}

/// Names chunk `index` from its parent's tree (None when not cached) with the CVs of the
/// spans read put in, once the new blocks are laid over them (in `scratch`), caches its new tree
/// and encodes its delta. Blocking.
fn name(
    trees: &VolumeTrees,
    index: u64,
    plan: &DeltaPlan,
    read: &ChunkRead,
    scratch: &mut Vec<u8>,
    zstd_level: i32,
) -> Option<Named> {
    let mut cvs = match plan.base {
        None => tree::zero_cvs().to_vec(),
        Some(base) => trees.load(index, &base)?,
    };
    let blocks_per_span = (SPAN_BYTES / DELTA_BLOCK_BYTES) as u32;
    for (first, old) in &read.spans {
        scratch.clear();
        scratch.extend_from_slice(old);
        let start = first * blocks_per_span;
        let end = start + (old.len() / DELTA_BLOCK_BYTES) as u32;
        for (&(run_first, run_count), new) in plan.runs.iter().zip(&read.blocks) {
            let (a, z) = (run_first.max(start), (run_first + run_count).min(end));
            if a < z {
                let from = (a - run_first) as usize * DELTA_BLOCK_BYTES;
                let to = (a - start) as usize * DELTA_BLOCK_BYTES;
                let len = (z - a) as usize * DELTA_BLOCK_BYTES;
                scratch[to..to + len].copy_from_slice(&new[from..from + len]);
            }
        }
        for (k, span) in scratch.chunks_exact(SPAN_BYTES).enumerate() {
            let at = *first as usize + k;
            cvs[at] = tree::span_cv(at, span);
        }
    }
    let id = tree::root(&cvs);
    if Some(id) == plan.base {
        return Some(Named::Chunk(id, None));
    }
    if id == tree::root(tree::zero_cvs()) {
        return Some(Named::Zero);
    }
    trees.store(index, &id, &cvs);
    // The new bytes of the changed blocks, run after run.
    let stored = chunk::encode_delta(
        CHUNK_SIZE_BYTES as usize,
        plan.base.as_ref(),
        &plan.runs,
        &read.blocks.concat(),
        zstd_level,
    );
    Some(Named::Chunk(id, Some(stored)))
}
