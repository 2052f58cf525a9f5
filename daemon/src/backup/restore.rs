//! A restore job: every chunk of a backup downloaded in parallel, checked against its id
//! before a byte of it is written, then written at its offset; zero chunks become trims.
//!
//! Chunks are decoded straight into page-aligned buffers that `Volume::write_bulk` hands to the
//! disk with O_DIRECT: a buffered restore spent most of its CPU copying into the page cache.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::backup::chunk::{self, CHUNK_SIZE_BYTES};
use crate::backup::error::BackupError;
use crate::backup::fetch;
use crate::backup::job::Job;
use crate::backup::records::RestoreRecord;
use crate::backup::retry::with_retry;
use crate::backup::Backups;
use crate::error::StorageError;
use crate::storage::aligned::AlignedPool;
use crate::storage::ZeroMode;

/// Bytes restored between two background flushes.
const BACKGROUND_FLUSH_BYTES: u64 = 512 << 20;

pub async fn run(
    svc: &Arc<Backups>,
    job: &Arc<Job>,
    record: &RestoreRecord,
) -> Result<(), BackupError> {
    // A shared store lock, as a backup holds, taken before the manifest is read: no GC of any
    // daemon sharing the store deletes the chunks this restore reads (its backup deleted there
    // meanwhile) until it has ended. (This daemon's own deletes wait for the job: `holds`.)
    let lock = svc.lock_for_reading(job, &record.job_id).await?;
    let result = restore_locked(svc, job, record).await;
    if let Some(lock) = lock {
        lock.release().await;
    }
    result
}

async fn restore_locked(
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
    // Only the volume this job marked: one deleted and made again under the name meanwhile
    // is someone else's (its clients are not shut out, its blocks not this backup's).
    if volume
        .restore_mark()
        .is_none_or(|mark| mark.job_id != record.job_id)
    {
        return Err(BackupError::Failed(format!(
            "volume {:?} no longer carries the mark of restore job {}: it was deleted or replaced while the job waited",
            record.volume, record.job_id
        )));
    }
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
    // Downloads wait on the store more than on the CPU. A 1 GiB restore from an S3 server on
    // loopback took 3.4 s with 8 chunks in flight, 2.6 s with 16, and no less with 32. From a
    // local store, a 1 GiB restore out of the page cache took 0.8 s with 8 or 16; a 4 GiB one
    // (half data) with the store's files not cached took 3.6-4.3 s with 8 and 2.7-3.2 s with
    // 16 or 32 (three rounds each): the disk needs the deeper queue for direct reads and writes.
    const CHUNKS_IN_FLIGHT_PER_TRANSFER: usize = 4;
    let concurrency = svc.config.upload_concurrency.max(1) * CHUNKS_IN_FLIGHT_PER_TRANSFER;
    // One buffer per chunk in flight, recycled once its write has completed.
    let buffers = AlignedPool::new(CHUNK_SIZE_BYTES as usize, concurrency);
    // The same for the stored objects a local store reads (header included).
    let stored_buffers = AlignedPool::new(
        CHUNK_SIZE_BYTES as usize + chunk::HEADER_LEN_BYTES,
        concurrency,
    );
    // Set once the restore has failed or is stopped: chunks not yet fetched are skipped, and
    // fetches under way are dropped (they touch nothing). Writes under way are not: each is
    // waited for before the job ends, so none lands after a retry or a rollback has begun.
    let failed = CancellationToken::new();
    let mut results = futures_util::stream::iter((0..manifest.chunks.len() as u64).map(|i| {
        let failed = failed.clone();
        let svc = Arc::clone(svc);
        let job = Arc::clone(job);
        let volume = Arc::clone(&volume);
        let manifest = Arc::clone(&manifest);
        let buffers = Arc::clone(&buffers);
        let stored_buffers = Arc::clone(&stored_buffers);
        let created = record.created_volume;
        let task: futures_util::future::BoxFuture<'static, Result<u64, BackupError>> =
            Box::pin(async move {
                if failed.is_cancelled() {
                    return Ok(0);
                }
                let offset = i * CHUNK_SIZE_BYTES;
                let len = manifest.chunk_len_bytes(i);
                match manifest.chunks[i as usize] {
                    None if created => {}
                    None => {
                        job.touch();
                        let mode = ZeroMode {
                            may_trim: true,
                            fast_only: false,
                        };
                        volume.write_zeroes(offset, len, mode, false).await?;
                    }
                    Some(id) => {
                        let buf = buffers.take(len as usize);
                        // The manifest's length is the buffer's: a chunk of another length fails
                        // to decode.
                        let fetch = fetch::chunk_into(
                            &svc,
                            &job,
                            id,
                            buf,
                            fetch::ChunkMap::of(&manifest),
                            Some(&stored_buffers),
                        );
                        let fetched = tokio::select! {
                            fetched = fetch => fetched,
                            _ = failed.cancelled() => return Ok(0),
                        };
                        if failed.is_cancelled() {
                            return Ok(0);
                        }
                        let fetched = fetched.map_err(|e| match e {
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
                        let plain = buffers.freeze(fetched.plaintext);
                        job.touch();
                        match fetched.data_runs {
                            None => volume.write_bulk(offset, plain).await?,
                            // Deltas over zeroes: the chunk is zeroes (a new volume already is;
                            // an existing one has the range trimmed) but for the blocks they
                            // wrote, which alone are written.
                            Some(runs) => {
                                if !created {
                                    let mode = ZeroMode {
                                        may_trim: true,
                                        fast_only: false,
                                    };
                                    volume.write_zeroes(offset, len, mode, false).await?;
                                }
                                for (first, count) in runs {
                                    let start = first as usize * chunk::DELTA_BLOCK_BYTES;
                                    let end = start + count as usize * chunk::DELTA_BLOCK_BYTES;
                                    volume
                                        .write_bulk(offset + start as u64, plain.slice(start..end))
                                        .await?;
                                }
                            }
                        }
                    }
                }
                job.add_done(len);
                Ok(len)
            });
        task
    }))
    .buffer_unordered(concurrency);
    let mut written_since_flush = 0u64;
    let mut background_flush: Option<tokio::task::JoinHandle<Result<(), StorageError>>> = None;
    let mut first_error = None;
    while let Some(result) = results.next().await {
        if first_error.is_none() {
            match result {
                Ok(written) => {
                    written_since_flush += written;
                    first_error = job.stopped(&svc.shutdown);
                }
                Err(e) => first_error = Some(e),
            }
        }
        if first_error.is_some() {
            // Drained to the end: the chunks still writing finish first.
            failed.cancel();
            continue;
        }
        // Flush as it goes (one flush at a time), so the final flush does not have to write
        // the whole volume back at once.
        if written_since_flush >= BACKGROUND_FLUSH_BYTES
            && background_flush.as_ref().is_none_or(|f| f.is_finished())
        {
            if let Some(done) = background_flush.take() {
                if let Err(e) = flushed(done).await {
                    first_error = Some(e);
                    failed.cancel();
                    continue;
                }
            }
            let volume = Arc::clone(&volume);
            background_flush = Some(tokio::spawn(async move { volume.flush().await }));
            written_since_flush = 0;
        }
    }
    drop(results);
    if let Some(error) = first_error {
        return Err(error);
    }
    if let Some(done) = background_flush.take() {
        flushed(done).await?;
    }
    volume.flush().await?;
    tracing::info!(job = %job.id, backup = %record.backup_id, volume = %record.volume, "restore complete");
    Ok(())
}

/// The outcome of a flush run in the background.
async fn flushed(
    task: tokio::task::JoinHandle<Result<(), StorageError>>,
) -> Result<(), BackupError> {
    task.await
        .map_err(|e| BackupError::Failed(format!("a flush task failed: {e}")))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use crate::backup::job::JobState;
    use crate::backup::sets::tests::volume_backed_up;
    use crate::io::{EngineConfig, EngineKind, IoEngine};

    /// A restore that fails waits for its chunk writes still on their way to the disk: none
    /// lands after the job has ended (where a retry or a rollback may have begun).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_restore_ends_after_its_writes_in_flight() {
        const CHUNKS: u64 = 6;
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let size_bytes = CHUNKS * super::CHUNK_SIZE_BYTES;
        let (registry, backups, backup_id) =
            volume_backed_up(dir.path(), engine.clone(), size_bytes).await;
        let volume = registry.get("a").unwrap();

        // The restore will fail on one damaged chunk while the others' writes are delayed.
        let manifest = backups.store.get_manifest(&backup_id).await.unwrap();
        let damaged = manifest.chunks[CHUNKS as usize - 1].unwrap().to_string();
        let mut found = 0;
        let chunks = dir.path().join("store/backups/chunks");
        for sub in std::fs::read_dir(&chunks).unwrap().flatten() {
            let path = sub.path().join(&damaged);
            if let Ok(mut bytes) = std::fs::read(&path) {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x40;
                std::fs::write(&path, &bytes).unwrap();
                found += 1;
            }
        }
        assert_eq!(found, 1, "chunk {damaged} not found under {chunks:?}");
        // Other data in the same blocks, where a late landing shows.
        let other = Bytes::from(vec![0xee; size_bytes as usize]);
        volume.write_bulk(0, other).await.unwrap();
        engine.delay_writes_for_test(Some(Duration::from_millis(800)));
        let restore = backups.restore(&backup_id, "a", true).await.unwrap();
        let job = backups.job(&restore.id).unwrap();
        job.wait_finished(Duration::from_secs(60)).await;
        assert_eq!(job.state(), JobState::Failed);
        let at_the_end = volume.read(0, size_bytes as usize).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let later = volume.read(0, size_bytes as usize).await.unwrap();
        assert!(
            at_the_end == later,
            "a chunk write landed after the failed restore had ended"
        );
        engine.delay_writes_for_test(None);
    }
}
