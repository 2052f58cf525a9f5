//! Reading a chunk's plaintext out of the store: a whole chunk is one object; a delta is
//! followed down to the whole chunk (or zeroes) it patches, at most `MAX_DELTA_DEPTH` deep,
//! and every level's plaintext must hash to that level's id before anything is returned.

use std::ops::DerefMut;
use std::sync::Arc;

use crate::backup::chunk::{self, ChunkError, ChunkId, Decoded, Delta, MAX_DELTA_DEPTH};
use crate::backup::error::BackupError;
use crate::backup::job::Job;
use crate::backup::retry::with_retry;
use crate::backup::upload::blocking;
use crate::backup::Backups;
use crate::storage::aligned::AlignedPool;

/// Fills `out` (the chunk's length, from the manifest) with chunk `id`'s plaintext and gives
/// it back. `pooled`: read a local store's objects into these buffers.
pub async fn chunk_into<B>(
    svc: &Backups,
    job: &Job,
    id: ChunkId,
    mut out: B,
    pooled: Option<&Arc<AlignedPool>>,
) -> Result<B, BackupError>
where
    B: DerefMut<Target = [u8]> + Send + 'static,
{
    let mut deltas: Vec<(ChunkId, Delta)> = Vec::new();
    let mut current = id;
    loop {
        let stored = with_retry(job, &svc.shutdown, "downloading a chunk", || async {
            match pooled {
                Some(buffers) => svc.store.get_chunk_pooled(&current, buffers).await,
                None => svc.store.get_chunk(&current).await,
            }
        })
        .await?;
        let (back, decoded) = blocking(move || {
            let decoded = chunk::decode_into(&current, &stored, &mut out);
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
                deltas.push((current, delta));
                match base {
                    Some(base) => current = base,
                    None => {
                        out.fill(0);
                        break;
                    }
                }
            }
        }
    }
    if deltas.is_empty() {
        return Ok(out);
    }
    blocking(move || {
        for (level, delta) in deltas.iter().rev() {
            delta.apply(&mut out);
            chunk::check_hash(*level, &out)?;
        }
        Ok(out)
    })
    .await?
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
