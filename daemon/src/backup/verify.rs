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
    // Each distinct chunk once, reported at the first index that uses it.
    let mut first_index: BTreeMap<ChunkId, u64> = BTreeMap::new();
    for (i, id) in manifest.chunks.iter().enumerate() {
        if let Some(id) = id {
            first_index.entry(*id).or_insert(i as u64);
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
    let mut results = futures_util::stream::iter(first_index.into_iter().map(|(id, index)| {
        let svc = Arc::clone(svc);
        let job = Arc::clone(job);
        let manifest = Arc::clone(&shared);
        let len = manifest.chunk_len_bytes(index);
        let task: futures_util::future::BoxFuture<'static, Result<Option<BadChunk>, BackupError>> =
            Box::pin(async move {
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
