//! A backup job: read the chunks of a frozen snapshot that changed since the volume's previous
//! backup (known from the layer maps), upload the ones the store lacks, then write the
//! manifest. Runs under a shared store lock so GC cannot delete a chunk it counts on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::backup::catalog::BackupInfo;
use crate::backup::chunk::{self, ChunkId, CHUNK_SIZE_BYTES};
use crate::backup::error::BackupError;
use crate::backup::job::Job;
use crate::backup::locks;
use crate::backup::manifest::{
    chunk_list_digest, BackupManifest, BackupStats, MANIFEST_FORMAT_VERSION,
};
use crate::backup::records::{BackupRecord, JobRecord};
use crate::backup::retry::with_retry;
use crate::backup::{Backups, BACKUP_SNAPSHOT_PREFIX};
use crate::error::StorageError;
use crate::storage::entry::{now_unix_secs, VolumeEntry};
use crate::storage::layer::BLOCK_BYTES;
use crate::storage::volume::EXTENT_ZERO;
use crate::storage::StatusQuery;

/// How often a running job records the chunks it has done, for a resume after a crash.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);

type ChunkTask =
    futures_util::future::BoxFuture<'static, Result<(u64, Option<ChunkId>), BackupError>>;

fn chunk_len(size_bytes: u64, index: u64) -> u64 {
    CHUNK_SIZE_BYTES.min(size_bytes - index * CHUNK_SIZE_BYTES)
}

#[derive(Default)]
struct Counters {
    read_chunks: AtomicU64,
    read_bytes: AtomicU64,
    new_chunks: AtomicU64,
    new_stored_bytes: AtomicU64,
}

pub async fn run(
    svc: &Arc<Backups>,
    job: &Arc<Job>,
    mut record: BackupRecord,
) -> Result<Option<Value>, BackupError> {
    let started = Instant::now();
    let entry = svc
        .registry
        .entry(&record.volume)
        .ok_or_else(|| StorageError::NotFound(record.volume.clone()))?;
    if entry.volume().identity().uuid != record.volume_uuid {
        return Err(BackupError::InvalidArgument(format!(
            "volume {:?} was deleted and created again since the backup started",
            record.volume
        )));
    }
    if !record.snapshot_taken {
        // The daemon stopped between recording the job and taking its snapshot.
        entry.create_snapshot_durable(&record.snapshot).await?;
        record.snapshot_taken = true;
        svc.files.save(&JobRecord::Backup(record.clone()))?;
    }
    let _pin = entry.pin_snapshot(&record.snapshot)?;
    let lock = with_retry(job, &svc.shutdown, "locking the store", || {
        locks::acquire_shared(&svc.store, &record.job_id)
    })
    .await?;
    let result = upload(svc, job, &entry, &mut record, started).await;
    lock.release().await;
    let manifest = result?;
    release_older_bases(&entry, &record.snapshot).await;
    Ok(Some(json!({ "backup": BackupInfo::of(&manifest) })))
}

async fn upload(
    svc: &Arc<Backups>,
    job: &Arc<Job>,
    entry: &Arc<VolumeEntry>,
    record: &mut BackupRecord,
    started: Instant,
) -> Result<BackupManifest, BackupError> {
    let snapshot = entry
        .snapshots()
        .into_iter()
        .find(|s| s.name == record.snapshot)
        .ok_or_else(|| StorageError::SnapshotNotFound {
            volume: record.volume.clone(),
            name: record.snapshot.clone(),
        })?;
    let size_bytes = snapshot.size_bytes;
    let chunk_count = size_bytes.div_ceil(CHUNK_SIZE_BYTES) as usize;
    // Under the shared lock no GC runs, so what is listed now stays in the store.
    let known: HashSet<ChunkId> = with_retry(job, &svc.shutdown, "listing chunks", || {
        svc.store.list_chunks()
    })
    .await?
    .into_keys()
    .collect();
    let known = Arc::new(Mutex::new(known));

    let mut chunks: Vec<Option<Option<ChunkId>>> = vec![None; chunk_count];
    let (parent, changed) = if record.full {
        (None, None)
    } else {
        find_base(svc, job, entry, record, size_bytes).await?
    };
    if let (Some(parent), Some(changed)) = (&parent, &changed) {
        for (i, slot) in chunks.iter_mut().enumerate() {
            if !changed.contains(&(i as u64)) {
                *slot = Some(parent.chunks[i]);
            }
        }
    }
    {
        let known = known.lock().unwrap_or_else(|p| p.into_inner());
        for (i, id) in &record.done {
            let usable = id.is_none_or(|id| known.contains(&id));
            if let Some(slot) = chunks.get_mut(*i as usize).filter(|_| usable) {
                *slot = Some(*id);
            }
        }
    }
    let todo: Vec<u64> = (0..chunk_count as u64)
        .filter(|&i| chunks[i as usize].is_none())
        .collect();
    job.set_total(todo.iter().map(|&i| chunk_len(size_bytes, i)).sum());
    tracing::info!(
        job = %job.id,
        backup = %record.backup_id,
        parent = parent.as_ref().map(|p| p.backup_id.as_str()),
        chunks = chunk_count,
        to_read = todo.len(),
        "uploading backup"
    );

    let counters = Arc::new(Counters::default());
    let mut results = futures_util::stream::iter(todo.into_iter().map(|i| {
        let svc = Arc::clone(svc);
        let job = Arc::clone(job);
        let entry = Arc::clone(entry);
        let known = Arc::clone(&known);
        let counters = Arc::clone(&counters);
        let snapshot = record.snapshot.clone();
        let task: ChunkTask = Box::pin(async move {
            let offset = i * CHUNK_SIZE_BYTES;
            let len = chunk_len(size_bytes, i);
            let id = process_chunk(
                &svc, &job, &entry, &snapshot, offset, len, &known, &counters,
            )
            .await?;
            job.add_done(len);
            Ok((i, id))
        });
        task
    }))
    .buffer_unordered(svc.config.upload_concurrency.max(1));
    let mut last_checkpoint = Instant::now();
    while let Some(result) = results.next().await {
        let (i, id) = result?;
        chunks[i as usize] = Some(id);
        record.done.push((i, id));
        if last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
            svc.files.save(&JobRecord::Backup(record.clone()))?;
            last_checkpoint = Instant::now();
        }
        if svc.shutdown.is_cancelled() {
            svc.files.save(&JobRecord::Backup(record.clone()))?;
            return Err(BackupError::Cancelled("the daemon is shutting down".into()));
        }
    }
    drop(results);

    let chunks: Vec<Option<ChunkId>> = chunks.into_iter().map(|c| c.flatten()).collect();
    let data_chunks = chunks.iter().filter(|c| c.is_some()).count() as u64;
    let manifest = BackupManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        backup_id: record.backup_id.clone(),
        volume_name: record.volume.clone(),
        volume_uuid: record.volume_uuid.clone(),
        size_bytes,
        chunk_size_bytes: CHUNK_SIZE_BYTES,
        chunk_list_digest: chunk_list_digest(&chunks),
        parent_backup_id: parent.as_ref().map(|p| p.backup_id.clone()),
        source_snapshot: record.snapshot.clone(),
        source_snapshot_created_unix_secs: snapshot.created_unix_secs,
        group_id: record.group_id.clone(),
        policy: record.policy.clone(),
        created_unix_secs: now_unix_secs(),
        stats: BackupStats {
            full: parent.is_none(),
            data_chunks,
            zero_chunks: chunks.len() as u64 - data_chunks,
            read_chunks: counters.read_chunks.load(Ordering::Relaxed),
            new_chunks: counters.new_chunks.load(Ordering::Relaxed),
            new_stored_bytes: counters.new_stored_bytes.load(Ordering::Relaxed),
            read_bytes: counters.read_bytes.load(Ordering::Relaxed),
            duration_ms: started.elapsed().as_millis() as u64,
        },
        chunks,
    };
    // The writer checks what every reader will check, before anything is stored.
    manifest.validate(&manifest.backup_id)?;
    with_retry(job, &svc.shutdown, "writing the manifest", || {
        svc.store.put_manifest(&manifest)
    })
    .await?;
    svc.catalog.remember(&manifest);
    tracing::info!(
        job = %job.id,
        backup = %manifest.backup_id,
        new_chunks = manifest.stats.new_chunks,
        new_stored_bytes = manifest.stats.new_stored_bytes,
        read_bytes = manifest.stats.read_bytes,
        duration_ms = manifest.stats.duration_ms,
        "backup complete"
    );
    Ok(manifest)
}

/// The previous backup of this volume whose snapshot is still here, and the chunks changed
/// since it; (None, None) means a full read.
async fn find_base(
    svc: &Arc<Backups>,
    job: &Job,
    entry: &VolumeEntry,
    record: &BackupRecord,
    size_bytes: u64,
) -> Result<(Option<BackupManifest>, Option<HashSet<u64>>), BackupError> {
    let backups = with_retry(job, &svc.shutdown, "listing backups", || svc.catalog.list()).await?;
    let snapshots = entry.manifest().snapshots;
    let Some(base) = backups
        .iter()
        .filter(|b| {
            b.volume_uuid == record.volume_uuid
                && b.id != record.backup_id
                && b.size_bytes == size_bytes
                && b.snapshot != record.snapshot
                && snapshots.iter().any(|s| s.name == b.snapshot)
        })
        .max_by_key(|b| (b.snapshot_created_unix_secs, b.created_unix_secs))
    else {
        return Ok((None, None));
    };
    let parent = match with_retry(job, &svc.shutdown, "reading the parent manifest", || {
        svc.store.get_manifest(&base.id)
    })
    .await
    {
        Ok(parent) => parent,
        Err(BackupError::BackupNotFound(_)) => return Ok((None, None)),
        Err(e) => return Err(e),
    };
    let runs = match entry.changed_between(&base.snapshot, &record.snapshot) {
        Ok(Some(runs)) => runs,
        // Not an ancestor any more (a rollback), or deleted meanwhile: read everything.
        Ok(None) | Err(StorageError::SnapshotNotFound { .. }) => return Ok((None, None)),
        Err(e) => return Err(e.into()),
    };
    let mut changed = HashSet::new();
    let blocks_per_chunk = CHUNK_SIZE_BYTES / BLOCK_BYTES;
    for (start, end) in runs {
        for i in start / blocks_per_chunk..end.div_ceil(blocks_per_chunk) {
            changed.insert(i);
        }
    }
    Ok((Some(parent), Some(changed)))
}

/// One chunk: None when it reads as zeroes, else its id (uploaded if the store lacked it).
#[allow(clippy::too_many_arguments)]
async fn process_chunk(
    svc: &Arc<Backups>,
    job: &Job,
    entry: &VolumeEntry,
    snapshot: &str,
    offset_bytes: u64,
    len_bytes: u64,
    known: &Mutex<HashSet<ChunkId>>,
    counters: &Counters,
) -> Result<Option<ChunkId>, BackupError> {
    // The view is looked up per chunk: a merge of other snapshots may rebuild it meanwhile.
    let view = entry
        .view(snapshot)
        .ok_or_else(|| StorageError::SnapshotNotFound {
            volume: entry.name().to_owned(),
            name: snapshot.to_owned(),
        })?;
    let status = view
        .block_status(
            &StatusQuery::Allocation,
            offset_bytes,
            len_bytes,
            usize::MAX,
        )
        .await?;
    let covered: u64 = status.iter().map(|(len, _)| len).sum();
    if covered == len_bytes && status.iter().all(|(_, v)| v & EXTENT_ZERO != 0) {
        return Ok(None);
    }
    let data = view.read(offset_bytes, len_bytes as usize).await?;
    counters.read_chunks.fetch_add(1, Ordering::Relaxed);
    counters.read_bytes.fetch_add(len_bytes, Ordering::Relaxed);
    let hashed = blocking(move || {
        if chunk::is_all_zero(&data) {
            None
        } else {
            Some((ChunkId::of(&data), data))
        }
    })
    .await?;
    let Some((id, data)) = hashed else {
        return Ok(None);
    };
    if known
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&id)
    {
        return Ok(Some(id));
    }
    let level = svc.config.zstd_level;
    let stored = Bytes::from(blocking(move || chunk::encode(&data, level)).await?);
    svc.throttle.take(stored.len() as u64).await;
    with_retry(job, &svc.shutdown, "uploading a chunk", || {
        svc.store.put_chunk(&id, stored.clone())
    })
    .await?;
    known.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
    counters.new_chunks.fetch_add(1, Ordering::Relaxed);
    counters
        .new_stored_bytes
        .fetch_add(stored.len() as u64, Ordering::Relaxed);
    job.add_uploaded(stored.len() as u64);
    svc.metrics
        .backup()
        .uploaded_bytes
        .inc_by(stored.len() as u64);
    Ok(Some(id))
}

/// CPU work (hashing, compression) off the runtime's threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackupError::Failed(format!("a worker thread failed: {e}")))
}

/// After a backup completes, its snapshot is the volume's base for the next incremental: the
/// older backup snapshots are released (VBS keeps one per disk).
async fn release_older_bases(entry: &VolumeEntry, keep: &str) {
    for snapshot in entry.snapshots() {
        if snapshot.name.starts_with(BACKUP_SNAPSHOT_PREFIX) && snapshot.name != keep {
            match entry.delete_snapshot(&snapshot.name).await {
                Ok(_) => {
                    tracing::info!(volume = entry.name(), snapshot = %snapshot.name, "released the previous backup base")
                }
                Err(e) => {
                    tracing::warn!(volume = entry.name(), snapshot = %snapshot.name, error = %e, "could not release an old backup snapshot")
                }
            }
        }
    }
}
