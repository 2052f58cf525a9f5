//! Reading a chunk's plaintext out of the store: a whole chunk is one object; a delta is
//! followed down to the whole chunk (or zeroes) it patches, at most `MAX_DELTA_DEPTH` deep,
//! and every level's plaintext must hash to that level's id before anything is returned.

use std::collections::BTreeMap;
use std::ops::DerefMut;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::backup::chunk::{
    self, ChunkError, ChunkId, Decoded, Delta, CHUNK_SIZE_BYTES, MAX_DELTA_DEPTH,
};
use crate::backup::error::BackupError;
use crate::backup::job::Job;
use crate::backup::manifest::BackupManifest;
use crate::backup::pack::PackedAt;
use crate::backup::retry::with_retry;
use crate::backup::tree::{self, SPAN_BYTES};
use crate::backup::upload::blocking;
use crate::backup::Backups;
use crate::storage::aligned::AlignedPool;
use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};

/// A chunk's plaintext, and where its data can be when the chunk patches zeroes.
pub struct Fetched<B> {
    pub plaintext: B,
    /// For a delta chain over zeroes: the 4 KiB block runs any delta of the chain wrote, in
    /// order and merged; every other block is zero. None for a chain over a whole chunk.
    /// With runs, only their bytes in `plaintext` are meaningful: zeroing a whole 4 MiB buffer
    /// for a few changed blocks cost a restore of such chunks a tenth of its CPU.
    pub data_runs: Option<Vec<(u32, u32)>>,
}

/// What a manifest says of its chunks: where the packed ones lie, and what each delta patches.
#[derive(Clone, Copy)]
pub struct ChunkMap<'a> {
    pub packed: &'a BTreeMap<ChunkId, PackedAt>,
    pub delta_bases: &'a BTreeMap<ChunkId, ChunkId>,
    /// Fail a delta whose base the manifest does not record as its base (verify): GC keeps
    /// only the bases manifests name, so such a chunk reads now and is lost later.
    pub require_named_bases: bool,
}

impl<'a> ChunkMap<'a> {
    pub fn of(manifest: &'a BackupManifest) -> ChunkMap<'a> {
        ChunkMap {
            packed: &manifest.packed,
            delta_bases: &manifest.delta_bases,
            require_named_bases: false,
        }
    }

    /// As [`ChunkMap::of`], also failing deltas whose bases the manifest does not name.
    pub fn strict(manifest: &'a BackupManifest) -> ChunkMap<'a> {
        ChunkMap {
            require_named_bases: true,
            ..ChunkMap::of(manifest)
        }
    }
}

/// One stored object: a ranged read of its pack when packed, else its own object.
async fn stored_object(
    svc: &Backups,
    job: &Job,
    id: ChunkId,
    map: ChunkMap<'_>,
    pooled: Option<&Arc<AlignedPool>>,
) -> Result<Bytes, BackupError> {
    // A local store's EIO is a bad sector more likely than an outage: after a few tries the
    // chunk counts as damaged (named by a restore's failure, listed by a verify), where
    // retrying for ever would leave the job stuck.
    let read_errors = AtomicU32::new(0);
    with_retry(job, &svc.shutdown, "downloading a chunk", || async {
        let attempt = match (map.packed.get(&id), pooled) {
            (Some(at), _) => svc.store.get_packed(at).await,
            (None, Some(buffers)) => svc.store.get_chunk_pooled(&id, buffers).await,
            (None, None) => svc.store.get_chunk(&id).await,
        };
        match attempt {
            Err(e) if e.is_local_read_error() => {
                let failures = read_errors.fetch_add(1, Ordering::Relaxed) + 1;
                if failures >= MAX_LOCAL_READ_ERRORS {
                    return Err(BackupError::Chunk(ChunkError::Unreadable {
                        id,
                        reason: e.to_string(),
                    }));
                }
                Err(e)
            }
            other => other,
        }
    })
    .await
}

/// Tries at reading a chunk a local store answers with EIO before it counts as damaged.
const MAX_LOCAL_READ_ERRORS: u32 = 3;

/// Fills `out` (the chunk's length, from the manifest) with chunk `id`'s plaintext and gives
/// it back. `map`: what the manifest says of its chunks. `pooled`: read a local store's
/// whole-chunk objects into these buffers.
pub async fn chunk_into<B>(
    svc: &Backups,
    job: &Job,
    id: ChunkId,
    mut out: B,
    map: ChunkMap<'_>,
    pooled: Option<&Arc<AlignedPool>>,
) -> Result<Fetched<B>, BackupError>
where
    B: DerefMut<Target = [u8]> + Send + 'static,
{
    // Every level of the chain the manifest knows is downloaded at once, not one after the
    // other: from S3 a level costs a round trip. The objects themselves still decide the
    // chain; a level the manifest did not name is downloaded when it is reached.
    let mut chain = vec![id];
    while let Some(base) = map.delta_bases.get(chain.last().expect("starts with id")) {
        if chain.len() > MAX_DELTA_DEPTH {
            break;
        }
        chain.push(*base);
    }
    // Taken in order as the levels are reached, while all download at once: a level never
    // reached (a base the manifest names for a chunk stored whole) is dropped unawaited, so
    // its failure, or a store retrying it without end, neither fails nor holds the chunk.
    let mut prefetched: FuturesOrdered<_> = chain
        .iter()
        .map(|level| async move { (*level, stored_object(svc, job, *level, map, pooled).await) })
        .collect();
    let mut over_zeroes = false;
    let mut deltas: Vec<(ChunkId, Delta)> = Vec::new();
    let mut current = id;
    loop {
        let stored = match prefetched.next().await {
            Some((level, stored)) if level == current => stored?,
            _ => {
                prefetched.clear();
                stored_object(svc, job, current, map, pooled).await?
            }
        };
        // Under a delta a whole chunk is checked through its tree below.
        let by_tree = !deltas.is_empty() && out.len() as u64 == CHUNK_SIZE_BYTES;
        let (back, decoded) = blocking(move || {
            let decoded = if by_tree {
                chunk::decode_into_unverified(&current, &stored, &mut out)
            } else {
                chunk::decode_into(&current, &stored, &mut out)
            };
            (out, decoded)
        })
        .await?;
        out = back;
        match decoded? {
            Decoded::Plain => break,
            Decoded::Delta(delta) => {
                if deltas.len() == MAX_DELTA_DEPTH {
                    return Err(ChunkError::BadDelta {
                        id,
                        reason: format!("its chain of deltas is longer than {MAX_DELTA_DEPTH}"),
                    }
                    .into());
                }
                let base = delta.base;
                if map.require_named_bases && base != map.delta_bases.get(&current).copied() {
                    return Err(ChunkError::BadDelta {
                        id,
                        reason: format!(
                            "chunk {current} patches {}, which the manifest does not record as its base (a garbage collection may remove it)",
                            base.map_or_else(|| "zeroes".to_owned(), |b| b.to_string())
                        ),
                    }
                    .into());
                }
                deltas.push((current, delta));
                match base {
                    Some(base) => current = base,
                    None => {
                        over_zeroes = true;
                        break;
                    }
                }
            }
        }
    }
    if deltas.is_empty() {
        return Ok(Fetched {
            plaintext: out,
            data_runs: None,
        });
    }
    let data_runs = over_zeroes.then(|| merged_runs(deltas.iter().map(|(_, d)| d)));
    let bottom = current;
    let plaintext = blocking(move || {
        if over_zeroes {
            zero_patched_spans(&mut out, deltas.iter().map(|(_, d)| d));
        }
        if out.len() as u64 != CHUNK_SIZE_BYTES {
            for (level, delta) in deltas.iter().rev() {
                delta.apply(&mut out);
                chunk::check_hash(*level, &out)?;
            }
            return Ok::<_, BackupError>(out);
        }
        // The bottom's span CVs (one pass, as hashing it would be), then per delta only the
        // spans it patched: each level still checked against its own id.
        let mut cvs = if over_zeroes {
            tree::zero_cvs().to_vec()
        } else {
            let cvs = tree::span_cvs(&out);
            check_root(bottom, &cvs)?;
            cvs
        };
        for (level, delta) in deltas.iter().rev() {
            delta.apply(&mut out);
            for &(first, count) in delta.runs() {
                for span in tree::spans_of_blocks(first, count) {
                    cvs[span] =
                        tree::span_cv(span, &out[span * SPAN_BYTES..(span + 1) * SPAN_BYTES]);
                }
            }
            check_root(*level, &cvs)?;
        }
        Ok(out)
    })
    .await??;
    Ok(Fetched {
        plaintext,
        data_runs,
    })
}

/// Zeroes what a chain of deltas over zeroes reads of the buffer: the whole of a short chunk
/// (checked by one hash over it), else the BLAKE3 spans the deltas' blocks lie in (each
/// checked by its span's CV; the others are known zero spans).
fn zero_patched_spans<'a>(out: &mut [u8], deltas: impl Iterator<Item = &'a Delta>) {
    if out.len() as u64 != CHUNK_SIZE_BYTES {
        out.fill(0);
        return;
    }
    for delta in deltas {
        for &(first, count) in delta.runs() {
            let spans = tree::spans_of_blocks(first, count);
            out[spans.start * SPAN_BYTES..spans.end * SPAN_BYTES].fill(0);
        }
    }
}

fn check_root(id: ChunkId, cvs: &[tree::Cv]) -> Result<(), ChunkError> {
    let actual = tree::root(cvs);
    if actual != id {
        return Err(ChunkError::HashMismatch { id, actual });
    }
    Ok(())
}

/// The union of the deltas' block runs, sorted and merged.
fn merged_runs<'a>(deltas: impl Iterator<Item = &'a Delta>) -> Vec<(u32, u32)> {
    let mut all: Vec<(u32, u32)> = deltas.flat_map(|d| d.runs().iter().copied()).collect();
    all.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(all.len());
    for (first, count) in all {
        match merged.last_mut() {
            Some(last) if last.0 + last.1 >= first => {
                last.1 = last.1.max(first + count - last.0);
            }
            _ => merged.push((first, count)),
        }
    }
    merged
}

/// The chunk a stored chunk patches, when it is a delta over another chunk: the header says
/// whether it is a delta, and only a delta (small) is read whole.
pub async fn delta_base(
    svc: &Backups,
    job: &Job,
    id: ChunkId,
    len_bytes: usize,
) -> Result<Option<ChunkId>, BackupError> {
    let header = with_retry(job, &svc.shutdown, "reading a chunk header", || {
        svc.store
            .get_chunk_prefix(&id, chunk::HEADER_LEN_BYTES as u64)
    })
    .await?;
    if !chunk::is_delta_header(&header) {
        return Ok(None);
    }
    let stored = with_retry(job, &svc.shutdown, "reading a stored chunk", || {
        svc.store.get_chunk(&id)
    })
    .await?;
    let decoded = blocking(move || {
        let mut out = vec![0u8; len_bytes];
        chunk::decode_into(&id, &stored, &mut out)
    })
    .await??;
    Ok(match decoded {
        Decoded::Plain => None,
        Decoded::Delta(delta) => delta.base,
    })
}
