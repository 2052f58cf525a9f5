//! A restore job: every chunk of a backup downloaded in parallel, checked against its id
//! before a byte of it is written, then written at its offset; zero chunks become trims.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;

use crate::backup::chunk::{self, CHUNK_SIZE_BYTES};
use crate::backup::error::BackupError;
use crate::backup::job::Job;
use crate::backup::records::RestoreRecord;
use crate::backup::retry::with_retry;
use crate::backup::upload::blocking;
use crate::backup::Backups;
use crate::error::StorageError;
use crate::storage::ZeroMode;

/// Bytes restored between two background flushes.
const BACKGROUND_FLUSH_BYTES: u64 = 512 << 20;

pub async fn run(
    svc: &Arc<Backups>,
    job: &Arc<Job>,
    record: &RestoreRecord,
) -> Result<(), BackupError> {
    let manifest = with_retry(job, &svc.shutdown, "reading the manifest", || {
        svc.store.get_manifest(&record.backup_id)
    })
    .await?;
    let volume = svc
        .registry
        .get(&record.volume)
        .ok_or_else(|| StorageError::NotFound(record.volume.clone()))?;
    if volume.size_bytes() != manifest.size_bytes {
        return Err(BackupError::SizeMismatch {
            volume: record.volume.clone(),
            size_bytes: volume.size_bytes(),
            backup_id: record.backup_id.clone(),
            backup_size_bytes: manifest.size_bytes,
        });
    }
    job.set_total(manifest.size_bytes);
    let manifest = Arc::new(manifest);
    let mut results = futures_util::stream::iter((0..manifest.chunks.len() as u64).map(|i| {
        let svc = Arc::clone(svc);
        let job = Arc::clone(job);
        let volume = Arc::clone(&volume);
        let manifest = Arc::clone(&manifest);
        let created = record.created_volume;
        let task: futures_util::future::BoxFuture<'static, Result<u64, BackupError>> =
            Box::pin(async move {
                let offset = i * CHUNK_SIZE_BYTES;
                let len = manifest.chunk_len_bytes(i);
                match manifest.chunks[i as usize] {
                    None if created => {}
                    None => {
                        let mode = ZeroMode {
                            may_trim: true,
                            fast_only: false,
                        };
                        volume.write_zeroes(offset, len, mode, false).await?;
                    }
                    Some(id) => {
                        let stored = with_retry(&job, &svc.shutdown, "downloading a chunk", || {
                            svc.store.get_chunk(&id)
                        })
                        .await
                        .map_err(|e| match e {
                            BackupError::Store {
                                source: object_store::Error::NotFound { .. },
                                ..
                            } => BackupError::ChunkMissing {
                                backup_id: manifest.backup_id.clone(),
                                index: i,
                                chunk_id: id.to_string(),
                            },
                            other => other,
                        })?;
                        let plain = blocking(move || chunk::decode(&id, &stored)).await??;
                        if plain.len() as u64 != len {
                            return Err(BackupError::Failed(format!(
                            "chunk {i} ({id}) of backup {} holds {} bytes, the manifest says {len}",
                            manifest.backup_id,
                            plain.len()
                        )));
                        }
                        volume.write(offset, Bytes::from(plain), false).await?;
                    }
                }
                job.add_done(len);
                Ok(len)
            });
        task
    }))
    // Downloads wait on the store more than on the CPU: twice the upload concurrency.
    .buffer_unordered(svc.config.upload_concurrency.max(1) * 2);
    let mut written_since_flush = 0u64;
    let mut background_flush: Option<tokio::task::JoinHandle<Result<(), StorageError>>> = None;
    while let Some(result) = results.next().await {
        written_since_flush += result?;
        // Flush as it goes (one flush at a time), so the final flush does not have to write
        // the whole volume back at once.
        if written_since_flush >= BACKGROUND_FLUSH_BYTES
            && background_flush.as_ref().is_none_or(|f| f.is_finished())
        {
            if let Some(done) = background_flush.take() {
                done.await
                    .map_err(|e| BackupError::Failed(format!("a flush task failed: {e}")))??;
            }
            let volume = Arc::clone(&volume);
            background_flush = Some(tokio::spawn(async move { volume.flush().await }));
            written_since_flush = 0;
        }
        if svc.shutdown.is_cancelled() {
            return Err(BackupError::Cancelled("the daemon is shutting down".into()));
        }
    }
    drop(results);
    if let Some(done) = background_flush.take() {
        done.await
            .map_err(|e| BackupError::Failed(format!("a flush task failed: {e}")))??;
    }
    volume.flush().await?;
    tracing::info!(job = %job.id, backup = %record.backup_id, volume = %record.volume, "restore complete");
    Ok(())
}
