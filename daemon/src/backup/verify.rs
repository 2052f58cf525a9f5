//! A verify job: every distinct chunk of a backup downloaded and checked (checksum,
//! decompression, BLAKE3 against its id); each bad one is reported, none is repaired.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::Value;

use crate::backup::chunk::ChunkId;
use crate::backup::error::BackupError;
use crate::backup::fetch;
use crate::backup::job::Job;
use crate::backup::manifest::BackupManifest;
use crate::backup::retry::with_retry;
use crate::backup::Backups;

#[derive(Debug, Serialize)]
pub struct BadChunk {
    pub index: u64,
    pub chunk_id: String,
    pub error: String,
}

pub async fn run(
    svc: &Arc<Backups>,
    job: &Arc<Job>,
    manifest: &BackupManifest,
) -> Result<Value, BackupError> {
    // A shared store lock, as a backup holds: no GC of any daemon sharing the store deletes
    // the chunks being checked until the job has ended. The manifest was read before the lock:
    // it must still be there once the lock is held, or its chunks may be gone already and
    // would be reported bad.
    let lock = svc.lock_for_reading(job, &job.id).await?;
    let still_there = with_retry(job, &svc.shutdown, "reading the manifest", || {
        svc.store.get_manifest(&manifest.backup_id)
    })
    .await;
    let result = match still_there {
        Ok(_) => verify_locked(svc, job, manifest).await,
        Err(BackupError::BackupNotFound(id)) => Err(BackupError::Failed(format!(
            "backup {id} was deleted as its verify started"
        ))),
        Err(e) => Err(e),
    };
    if let Some(lock) = lock {
        lock.release().await;
    }
    result
}

async fn verify_locked(
    svc: &Arc<Backups>,
    job: &Arc<Job>,
    manifest: &BackupManifest,
) -> Result<Value, BackupError> {
    // Each distinct chunk once at each length a restore reads it at (the last chunk may be
    // shorter: a chunk named there and elsewhere is checked at both), reported at the first
    // index that uses it so.
    let mut first_index: BTreeMap<(ChunkId, u64), u64> = BTreeMap::new();
    for (i, id) in manifest.chunks.iter().enumerate() {
        if let Some(id) = id {
            let len = manifest.chunk_len_bytes(i as u64);
            first_index.entry((*id, len)).or_insert(i as u64);
        }
    }
    job.set_total(
        first_index
            .values()
            .map(|&i| manifest.chunk_len_bytes(i))
            .sum(),
    );
    let checked = first_index.len() as u64;
    let shared = Arc::new(manifest.clone());
    let mut results =
        futures_util::stream::iter(first_index.into_iter().map(|((id, _), index)| {
            let svc = Arc::clone(svc);
            let job = Arc::clone(job);
            let manifest = Arc::clone(&shared);
            let len = manifest.chunk_len_bytes(index);
            let task: futures_util::future::BoxFuture<
                'static,
                Result<Option<BadChunk>, BackupError>,
            > = Box::pin(async move {
                let fetched = fetch::chunk_into(
                    &svc,
                    &job,
                    id,
                    vec![0u8; len as usize],
                    fetch::ChunkMap::strict(&manifest),
                    None,
                )
                .await
                .map(|_| ());
                let problem = match fetched {
                    Err(BackupError::Store {
                        source: missing @ object_store::Error::NotFound { .. },
                        ..
                    }) => Some(format!(
                        "missing from the store (or a chunk it patches is): {missing}"
                    )),
                    Err(BackupError::Chunk(e)) => Some(e.to_string()),
                    Err(e) => return Err(e),
                    Ok(_) => None,
                };
                job.add_done(len);
                Ok(problem.map(|error| BadChunk {
                    index,
                    chunk_id: id.to_string(),
                    error,
                }))
            });
            task
        }))
        .buffer_unordered(svc.config.upload_concurrency.max(1) * 2);
    let mut bad_chunks = Vec::new();
    while let Some(result) = results.next().await {
        if let Some(bad) = result? {
            tracing::error!(backup = %manifest.backup_id, index = bad.index, chunk = %bad.chunk_id, error = %bad.error, "bad chunk");
            bad_chunks.push(bad);
        }
        if let Some(stopped) = job.stopped(&svc.shutdown) {
            return Err(stopped);
        }
    }
    bad_chunks.sort_by_key(|b| b.index);
    Ok(serde_json::json!({ "chunks_checked": checked, "bad_chunks": bad_chunks }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::backup::chunk::CHUNK_SIZE_BYTES;
    use crate::backup::job::JobState;
    use crate::backup::manifest::chunk_list_digest;
    use crate::backup::sets::tests::volume_backed_up;
    use crate::io::{EngineConfig, EngineKind, IoEngine};

    /// A whole chunk named again as the shorter last chunk cannot be restored there: verify
    /// checks it at that length too (it checked each id once, at its first length).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_named_at_two_lengths_is_checked_at_both() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let (_registry, backups, backup_id) =
            volume_backed_up(dir.path(), engine, CHUNK_SIZE_BYTES + 4096).await;

        let mut manifest = backups.store.get_manifest(&backup_id).await.unwrap();
        assert_eq!(manifest.chunks.len(), 2);
        manifest.chunks[1] = manifest.chunks[0];
        manifest.chunk_list_digest = chunk_list_digest(&manifest.chunks);
        backups.store.put_manifest(&manifest, &[]).await.unwrap();

        let verify = backups.verify(&backup_id).await.unwrap();
        let job = backups.job(&verify.id).unwrap();
        job.wait_finished(Duration::from_secs(60)).await;
        let info = job.info();
        assert_eq!(info.state, JobState::Succeeded, "{:?}", info.error);
        let result = info.result.expect("a verify result");
        let bad: Vec<u64> = result["bad_chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["index"].as_u64().unwrap())
            .collect();
        assert_eq!(bad, [1], "{result:#}");
        assert_eq!(result["chunks_checked"], 2, "{result:#}");
    }
}
