//! A backup job: read the chunks of a frozen snapshot that changed since the volume's previous
//! backup (known from the layer maps), upload the ones the store lacks, then write the
//! manifest. Runs under a shared store lock so GC cannot delete a chunk it counts on.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_util::task::AbortOnDropHandle;

use crate::backup::catalog::BackupInfo;
use crate::backup::chunk::{self, ChunkId, CHUNK_SIZE_BYTES, DELTA_BLOCK_BYTES, MAX_DELTA_DEPTH};
use crate::backup::delta::{self, DeltaPlan};
use crate::backup::error::BackupError;
use crate::backup::fetch;
use crate::backup::job::Job;
use crate::backup::locks::{self, LockHealth};
use crate::backup::manifest::{
    self, chunk_list_digest, BackupManifest, BackupStats, MANIFEST_FORMAT_VERSION,
};
use crate::backup::pack::{self, FullPack, PackWriter, PackedAt};
use crate::backup::records::{BackupRecord, JobRecord};
use crate::backup::retry::with_retry;
use crate::backup::tree::ChunkTree;
use crate::backup::tree_cache::{VolumeTrees, WrittenBy};
use crate::backup::{Backups, BACKUP_SNAPSHOT_PREFIX};
use crate::error::StorageError;
use crate::storage::aligned::ALIGN_BYTES;
use crate::storage::entry::{now_unix_secs, VolumeEntry};
use crate::storage::layer::BLOCK_BYTES;
use crate::storage::snapshots::SnapshotInfo;
use crate::storage::volume::EXTENT_ZERO;
use crate::storage::StatusQuery;

/// How often a running job records the chunks it has done, for a resume after a crash.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);
/// Checkpoints are at least this many times their own duration apart (at most 5% of a job's
/// time goes to them).
const CHECKPOINT_COST_FACTOR: u32 = 20;

type ChunkTask =
    futures_util::future::BoxFuture<'static, Result<Vec<(u64, Option<ChunkId>)>, BackupError>>;

fn chunk_len(size_bytes: u64, index: u64) -> u64 {
    CHUNK_SIZE_BYTES.min(size_bytes - index * CHUNK_SIZE_BYTES)
}

/// Chunk tasks in flight per whole chunk allowed in flight (see `whole_permits`). A task is one
/// chunk read whole or a batch of up to `delta::BATCH_CHUNKS` deltas, whose reads (the changed
/// 4 KiB blocks) are small.
const TASKS_PER_WHOLE_CHUNK: usize = 8;

/// A changed chunk with more changed blocks than this is read and stored whole.
const MAX_DELTA_BLOCKS: u32 = (CHUNK_SIZE_BYTES as usize / DELTA_BLOCK_BYTES / 4) as u32;
// Deltas are packed in the encode buffers (a chunk's size and header): the largest, 1 MiB of
// blocks plus its run list and framing, fits with room to spare.
const _: () =
    assert!(2 * MAX_DELTA_BLOCKS as usize * DELTA_BLOCK_BYTES <= CHUNK_SIZE_BYTES as usize);

#[derive(Default)]
pub(super) struct Counters {
    pub(super) read_chunks: AtomicU64,
    pub(super) read_bytes: AtomicU64,
    new_chunks: AtomicU64,
    new_stored_bytes: AtomicU64,
    delta_chunks: AtomicU64,
    packs: AtomicU64,
    /// Chunks this job stored (whole or packed).
    stored: Mutex<HashSet<ChunkId>>,
}

/// What the job knows of stored chunks: for each, the chunk it patches (None: a whole chunk or
/// a delta over zeroes). Seeded from the parent manifest; the rest is read from the store.
type KnownBases = Mutex<HashMap<ChunkId, Option<ChunkId>>>;

/// Runs backup job `record`; `resumed`: the job was recorded by an earlier run of the daemon.
pub async fn run(
    svc: &Arc<Backups>,
    job: &Arc<Job>,
    mut record: BackupRecord,
    resumed: bool,
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
        // Recorded before its snapshot was taken and not saved since: the daemon stopped
        // before the snapshot, or after it (the name is this backup's own).
        if entry.manifest().snapshot(&record.snapshot).is_none() {
            // Never taken (the caller had no answer), or released by a job whose record
            // outlived it: a snapshot taken now would hold later data under this backup's id.
            return Err(BackupError::Failed(format!(
                "the daemon stopped before the snapshot of backup {} was taken; nothing was backed up",
                record.backup_id
            )));
        }
        // If the daemon stopped inside `create_snapshot_durable`, the snapshot's layers may
        // not all be synced: the flush syncs the chain.
        entry.volume().flush().await?;
        record.snapshot_taken = true;
        svc.files.save(&JobRecord::Backup(record.clone()))?;
    }
    let _pin = entry.pin_snapshot(&record.snapshot)?;
    let stored = if resumed {
        stored_manifest(svc, job, &record.backup_id).await?
    } else {
        None
    };
    let manifest = match stored {
        Some(manifest)
            if manifest.volume_uuid != record.volume_uuid
                || manifest.source_snapshot != record.snapshot =>
        {
            // Not this job's: an id collision, never to be written over or taken for ours.
            return Err(BackupError::Failed(format!(
                "the store holds a backup {} of another volume or snapshot ({}, {}); this job's backup was not stored",
                manifest.backup_id, manifest.volume_uuid, manifest.source_snapshot
            )));
        }
        Some(manifest) => {
            // The daemon stopped after the manifest landed but before the job ended: the
            // backup is complete, and a second run would only redo it. Unless that run's
            // lock had lapsed and it was still checking the manifest's objects (it kept that in
            // memory): every object is checked again, under a lock.
            let lock = with_retry(job, &svc.shutdown, "locking the store", || {
                locks::acquire_shared(&svc.store, &record.job_id)
            })
            .await?;
            let stored = all_objects_stored(svc, job, &manifest).await;
            lock.release().await;
            match stored {
                Ok(()) => {}
                // Objects missing: a manifest with a hole must not stay.
                Err(e @ BackupError::Failed(_)) => {
                    with_retry(job, &svc.shutdown, "deleting the manifest", || {
                        svc.store.delete_manifest(&manifest.backup_id)
                    })
                    .await?;
                    svc.catalog.forget(&manifest.backup_id);
                    return Err(e);
                }
                // The store could not be listed: nothing is known against the manifest.
                Err(e) => return Err(e),
            }
            tracing::info!(job = %job.id, backup = %manifest.backup_id, "the resumed backup's manifest is stored already: it is complete");
            svc.catalog.remember_stored(&manifest);
            locks::remove_left_shared(&svc.store, &record.job_id).await;
            manifest
        }
        None => {
            let _slot = svc.reading_slot(job).await?;
            // The base is looked for while the lock is taken (a write and a listing): its
            // manifest read and parsed meanwhile, `upload` only asks under the lock whether
            // it is still there.
            let (lock, base) = tokio::join!(
                with_retry(job, &svc.shutdown, "locking the store", || {
                    locks::acquire_shared(&svc.store, &record.job_id)
                }),
                async {
                    if record.full {
                        return Ok(None);
                    }
                    let size_bytes = backup_snapshot(&entry, &record)?.size_bytes;
                    find_base(svc, job, &entry, &record, size_bytes)
                        .await
                        .map(Some)
                }
            );
            let lock = lock?;
            let result = match base {
                Ok(base) => {
                    let health = lock.health();
                    upload(svc, job, &entry, &mut record, &health, started, base).await
                }
                Err(e) => Err(e),
            };
            if matches!(&result, Err(BackupError::Cancelled(_))) && job.committed() {
                // A shutdown abandoned the manifest's write, which may still land (a local
                // write finishes on its thread; a sent PUT completes). The lock stays until it
                // goes stale, so no GC sweeps this backup's chunks before then.
                tracing::info!(job = %job.id, "keeping the store lock of a backup whose manifest may still land");
                lock.abandon();
            } else {
                lock.release().await;
            }
            result?.0
        }
    };
    // The backup is complete once its manifest is stored. Releasing the older base merges its
    // snapshot layer away and syncs the survivor, which can take longer than an incremental
    // backup itself: it runs after the job has answered. The next backup of this volume bases
    // itself on the newest backup snapshot, which this never deletes.
    // The older bases are listed now, while the volume is still claimed: listed in the task,
    // a next backup's snapshot, taken once this job has ended, could be among them.
    let older = older_bases(&entry, &record.snapshot);
    let entry_bg = Arc::clone(&entry);
    tokio::spawn(async move { release_bases(&entry_bg, older).await });
    Ok(Some(json!({ "backup": BackupInfo::of(&manifest) })))
}

async fn upload(
    svc: &Arc<Backups>,
    job: &Arc<Job>,
    entry: &Arc<VolumeEntry>,
    record: &mut BackupRecord,
    lock: &LockHealth,
    started: Instant,
    base: Option<Base>,
) -> Result<(BackupManifest, Option<BackupManifest>), BackupError> {
    let snapshot = backup_snapshot(entry, record)?;
    let size_bytes = snapshot.size_bytes;
    let chunk_count = size_bytes.div_ceil(CHUNK_SIZE_BYTES) as usize;
    let (parent, changed) = match base {
        None => (None, None),
        // Found before the lock was held: a base deleted meanwhile may have lost its chunks
        // to a GC. Under the lock no GC runs, so one whose manifest is still there keeps them.
        Some((Some(parent), changed)) => {
            let id = &parent.backup_id;
            let kept = with_retry(job, &svc.shutdown, "checking the parent manifest", || {
                svc.store.has_manifest(id)
            })
            .await?;
            if kept {
                (Some(parent), changed)
            } else {
                find_base(svc, job, entry, record, size_bytes).await?
            }
        }
        Some(no_parent) => no_parent,
    };
    // What the store holds. Under the shared lock no GC runs, so what is known now stays. An
    // incremental knows its parent's objects from its manifest and asks the store only about
    // the whole chunks it is about to write (see `ChunkCtx::stored_already`): listing every
    // object would make each incremental cost as much as the store is large.
    let listed_store = parent.is_none();
    let known: HashSet<ChunkId> = match &parent {
        Some(parent) => parent.named_chunks().copied().collect(),
        None => with_retry(job, &svc.shutdown, "listing chunks", || {
            svc.store.list_chunks()
        })
        .await?
        .into_iter()
        .filter(|&(_, len_bytes)| chunk::plausible_object_len(len_bytes))
        .map(|(id, _)| id)
        .collect(),
    };
    // A `--full` backup checks each whole chunk object the listing found before it reuses it
    // (once per object): one damaged in the store (the same length, other bytes: `backup
    // verify` names it) is written again, where it would otherwise be reused by every later
    // backup, `--full` included, so that none of them could be restored. The name is the
    // content's hash, so the object written again is the one the older backups name too. A
    // healthy object is never written over (a local store deletes an object whose sync failed;
    // a rename over it is not ordered with its data on every filesystem).
    let unchecked_listed =
        (record.full && listed_store).then(|| Arc::new(Mutex::new(known.clone())));
    let known = Arc::new(Mutex::new(known));

    let mut chunks: Vec<Option<Option<ChunkId>>> = vec![None; chunk_count];
    let bases: Arc<KnownBases> = Arc::new(Mutex::new(HashMap::new()));
    // The chunks earlier backups keep in packs are in the store too, though no listing shows
    // them: their manifests say where. An incremental learns them from its parent, a backup
    // in full for want of a base from the newest backups of the volume. Not one asked for
    // with `--full`, which checks what it reuses: a damaged pack would go on being named by
    // every later backup, and `--full` is the documented repair.
    let newest = match parent {
        Some(_) => Vec::new(),
        None if record.full => Vec::new(),
        None => newest_backups_of(svc, job, record).await?,
    };
    let previous: Vec<&BackupManifest> = parent.iter().chain(&newest).collect();
    // Where the chunks packed by earlier backups lie (see `seed`).
    let mut earlier_packed: HashMap<ChunkId, PackedAt> = HashMap::new();
    for previous in &previous {
        known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(previous.packed.keys().copied());
        seed(
            &mut bases.lock().unwrap_or_else(|p| p.into_inner()),
            &mut earlier_packed,
            previous,
        );
    }
    let mut plans: HashMap<u64, Arc<DeltaPlan>> = HashMap::new();
    if let (Some(parent), Some(changed)) = (&parent, changed) {
        for (i, slot) in chunks.iter_mut().enumerate() {
            if !changed.contains_key(&(i as u64)) {
                *slot = Some(parent.chunks[i]);
            }
        }
        // Seeded from the parent above.
        let known_bases = bases.lock().unwrap_or_else(|p| p.into_inner());
        for (i, runs) in changed {
            let base = parent.chunks[i as usize];
            let blocks: u32 = runs.iter().map(|r| r.1).sum();
            let depth = base.map_or(0, |b| chain_depth(&known_bases, b));
            // `depth` counts the deltas over other chunks; the bottom of the chain may be one
            // more (a delta over zeroes), and the new delta is on top.
            if chunk_len(size_bytes, i) == CHUNK_SIZE_BYTES
                && blocks <= MAX_DELTA_BLOCKS
                && depth + 2 <= MAX_DELTA_DEPTH
            {
                plans.insert(i, Arc::new(DeltaPlan { base, runs }));
            }
        }
    }
    let plans = Arc::new(plans);
    if !listed_store && !record.done.is_empty() {
        // A resumed incremental: the whole chunks its earlier run stored are in no manifest
        // yet. Asked for one by one (a listing would cost the whole store), so they are not
        // read again; packed ones were not kept (their pack may not have been stored).
        let unknown: Vec<ChunkId> = {
            let known = known.lock().unwrap_or_else(|p| p.into_inner());
            record
                .done
                .iter()
                .filter_map(|(_, id)| *id)
                .filter(|id| !known.contains(id))
                .collect()
        };
        let asked = futures_util::stream::iter(unknown)
            .map(|id| async move { svc.store.has_chunk(&id).await.then_some(id) })
            .buffer_unordered(svc.config.upload_concurrency.max(1))
            .filter_map(|found| async move { found })
            .collect::<Vec<ChunkId>>();
        // One question per chunk of the earlier run: many, and slow on a store that does not
        // answer. A cancel or a shutdown stops them as it stops the rest of the job.
        let found = tokio::select! {
            found = asked => found,
            () = job.stop_requested() => {
                return Err(job.stopped(&svc.shutdown).unwrap_or_else(|| {
                    BackupError::Cancelled("the job was stopped".into())
                }));
            }
        };
        known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(found);
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
    let prepared_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        job = %job.id,
        backup = %record.backup_id,
        parent = parent.as_ref().map(|p| p.backup_id.as_str()),
        chunks = chunk_count,
        to_read = todo.len(),
        listed_store,
        "uploading backup"
    );

    let uuid = record.volume_uuid.clone();
    let trees_svc = Arc::clone(svc);
    let trees = match blocking(move || trees_svc.trees.open_volume(&uuid)).await? {
        Ok(trees) => Some(Arc::new(trees)),
        Err(e) => {
            tracing::warn!(volume = %record.volume, error = %e, "no chunk tree cache: changed chunks are read whole");
            None
        }
    };
    let counters = Arc::new(Counters::default());
    let pack = Arc::new(PackWriter::new(
        &pack::run_name(&record.backup_id, now_unix_secs()),
        Arc::clone(&svc.encode_buffers),
    ));
    let new_packed: Arc<Mutex<BTreeMap<ChunkId, PackedAt>>> = Arc::default();
    // Whole chunks hold 4 MiB each in flight: `upload_concurrency` of them at a time. Deltas hold
    // a few blocks and wait mostly on small reads and writes, so many more run beside them.
    let concurrency = svc.config.upload_concurrency.max(1);
    let whole_permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    // Neighbouring chunks with a delta plan go in batches; any other chunk alone.
    let mut batches: Vec<Vec<u64>> = Vec::new();
    for i in todo {
        match batches.last_mut() {
            Some(last)
                if plans.contains_key(&i)
                    && plans.contains_key(&last[0])
                    && last.len() < delta::BATCH_CHUNKS =>
            {
                last.push(i)
            }
            _ => batches.push(vec![i]),
        }
    }
    let mut results = futures_util::stream::iter(batches.into_iter().map(|batch| {
        let svc = Arc::clone(svc);
        let job = Arc::clone(job);
        let entry = Arc::clone(entry);
        let known = Arc::clone(&known);
        let unchecked_listed = unchecked_listed.clone();
        let counters = Arc::clone(&counters);
        let bases = Arc::clone(&bases);
        let whole_permits = Arc::clone(&whole_permits);
        let trees = trees.clone();
        let pack = Arc::clone(&pack);
        let new_packed = Arc::clone(&new_packed);
        let snapshot = record.snapshot.clone();
        let planned: Vec<(u64, Arc<DeltaPlan>)> = batch
            .iter()
            .filter_map(|i| plans.get(i).map(|plan| (*i, Arc::clone(plan))))
            .collect();
        let task: ChunkTask = Box::pin(async move {
            let ctx = ChunkCtx {
                svc: &svc,
                job: &job,
                entry: &entry,
                snapshot: &snapshot,
                known: &known,
                unchecked_listed: unchecked_listed.as_deref(),
                bases: &bases,
                counters: &counters,
                listed_store,
                whole_permits: &whole_permits,
                trees: trees.as_ref(),
                pack: &pack,
                packed: &new_packed,
            };
            let named = if planned.is_empty() {
                vec![None; batch.len()]
            } else {
                delta::process_batch(&ctx, planned).await?
            };
            let mut done = Vec::with_capacity(batch.len());
            for (i, named) in batch.into_iter().zip(named) {
                let len = chunk_len(size_bytes, i);
                let id = match named {
                    Some(id) => id,
                    None => process_chunk(&ctx, i * CHUNK_SIZE_BYTES, len).await?,
                };
                job.add_done(len);
                done.push((i, id));
            }
            Ok(done)
        });
        // Started when the stream below pulls it, so no more run than it keeps in flight.
        spawn_chunk_task(task)
    }))
    .buffer_unordered(concurrency * TASKS_PER_WHOLE_CHUNK);
    let mut last_checkpoint = Instant::now();
    let mut checkpoint_every = CHECKPOINT_INTERVAL;
    let mut checkpoint_failed = false;
    while let Some(result) = results.next().await {
        for (i, id) in result? {
            chunks[i as usize] = Some(id);
            record.done.push((i, id));
        }
        // A checkpoint only saves work a restart would redo (resuming skips stored chunks):
        // one that cannot be written (data dir full) is logged, not fatal. It rewrites the
        // whole record, which grows with the chunks done (about 75 bytes each): written on the
        // blocking pool, and spaced out to CHECKPOINT_COST_FACTOR times what the last one took,
        // so a backup of terabytes spends a bounded share of its time (and writes) on them.
        if last_checkpoint.elapsed() >= checkpoint_every {
            let started = Instant::now();
            let files = svc.files.clone();
            let snapshot = JobRecord::Backup(record.clone());
            let saved = tokio::task::spawn_blocking(move || files.save(&snapshot))
                .await
                .unwrap_or_else(|e| {
                    Err(BackupError::JobFile {
                        path: job.id.clone(),
                        reason: e.to_string(),
                    })
                });
            if let Err(e) = saved {
                if !checkpoint_failed {
                    tracing::warn!(job = %job.id, error = %e, "cannot save the backup's progress; a restart resumes from its last saved point");
                    checkpoint_failed = true;
                }
            }
            checkpoint_every = CHECKPOINT_INTERVAL.max(started.elapsed() * CHECKPOINT_COST_FACTOR);
            last_checkpoint = Instant::now();
        }
        if let Some(stopped) = job.stopped(&svc.shutdown) {
            if matches!(stopped, BackupError::Cancelled(_)) {
                if let Err(e) = svc.files.save(&JobRecord::Backup(record.clone())) {
                    tracing::warn!(job = %job.id, error = %e, "cannot save the backup's progress before shutdown; it resumes from its last saved point");
                }
            }
            return Err(stopped);
        }
    }
    drop(results);
    if let Some(last) = pack.finish() {
        store_pack(svc, job, &counters, &pack, &new_packed, last).await?;
    }
    let chunks_done_ms = started.elapsed().as_millis() as u64;

    let chunks: Vec<Option<ChunkId>> = chunks.into_iter().map(|c| c.flatten()).collect();
    let delta_bases = resolve_delta_bases(svc, job, &bases, &chunks).await?;
    let data_chunks = chunks.iter().filter(|c| c.is_some()).count() as u64;
    // Where the packed chunks this manifest reaches lie: in this backup's packs or, for
    // chunks it shares with earlier backups, where the one its base came from says.
    let mut locations = new_packed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (id, at) in earlier_packed {
        locations.entry(id).or_insert(at);
    }
    let packed: BTreeMap<ChunkId, PackedAt> = chunks
        .iter()
        .flatten()
        .chain(delta_bases.keys())
        .chain(delta_bases.values())
        .filter_map(|id| locations.get(id).map(|at| (*id, at.clone())))
        .collect();
    let manifest = BackupManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        backup_id: record.backup_id.clone(),
        volume_name: record.volume.clone(),
        volume_uuid: record.volume_uuid.clone(),
        size_bytes,
        chunk_size_bytes: CHUNK_SIZE_BYTES,
        chunk_list_digest: chunk_list_digest(&chunks),
        delta_bases,
        packed,
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
            delta_chunks: counters.delta_chunks.load(Ordering::Relaxed),
            packs: counters.packs.load(Ordering::Relaxed),
        },
        chunks,
    };
    // The writer checks what every reader will check, before anything is stored.
    manifest.validate(&manifest.backup_id)?;
    let mut lapses = lock.lapses();
    if lapses > 0 {
        // Counted from the moment the lock was held again, before the listings: a lapse
        // during them must show at the check after the manifest.
        lapses = objects_still_stored(svc, job, &record.job_id, lock, &manifest).await?;
    }
    let foreign = foreign_chunks(&manifest, &previous, &counters);
    // No manifest of this job is stored (a resumed job's was looked for first): one under its
    // id is another daemon's backup that drew the same id, never to be written over.
    let taken = with_retry(job, &svc.shutdown, "checking the backup id is free", || {
        svc.store.has_manifest(&manifest.backup_id)
    })
    .await?;
    if taken {
        return Err(BackupError::Failed(format!(
            "the store already holds a backup {} (another daemon's, which drew the same id); this job's backup was not stored: take it again",
            manifest.backup_id
        )));
    }
    // From here the backup completes: a cancel is refused rather than racing the manifest,
    // which may land even if its write is abandoned.
    job.commit()?;
    with_retry(job, &svc.shutdown, "writing the manifest", || {
        svc.store.put_manifest(&manifest, &foreign)
    })
    .await?;
    if lock.lapses() > lapses {
        // The lock lapsed while the manifest was on its way: a GC elsewhere may have removed
        // what it names before it landed. A manifest with a hole must not stay.
        if let Err(e) = objects_still_stored(svc, job, &record.job_id, lock, &manifest).await {
            with_retry(job, &svc.shutdown, "deleting the manifest", || {
                svc.store.delete_manifest(&manifest.backup_id)
            })
            .await?;
            svc.catalog.forget(&manifest.backup_id);
            return Err(e);
        }
    }
    svc.catalog.remember_stored(&manifest);
    let manifest_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        job = %job.id,
        backup = %manifest.backup_id,
        new_chunks = manifest.stats.new_chunks,
        new_stored_bytes = manifest.stats.new_stored_bytes,
        read_bytes = manifest.stats.read_bytes,
        delta_chunks = manifest.stats.delta_chunks,
        packs = manifest.stats.packs,
        duration_ms = manifest.stats.duration_ms,
        prepared_ms,
        chunks_done_ms,
        manifest_ms,
        "backup complete"
    );
    Ok((manifest, parent))
}

/// After the job's store lock lapsed (see `locks::LockHealth`), a GC on another daemon may have
/// deleted objects this job chose to reuse: with the lock asserted again and no GC running,
/// every object the manifest names must be listed, or the backup fails rather than exist with
/// a hole (the next backup stores them again).
async fn objects_still_stored(
    svc: &Arc<Backups>,
    job: &Job,
    owner: &str,
    lock: &LockHealth,
    manifest: &BackupManifest,
) -> Result<u64, BackupError> {
    tracing::warn!(job = %job.id, "the store lock lapsed during the backup: checking that every object it names is still stored");
    with_retry(job, &svc.shutdown, "locking the store again", || {
        locks::reassert_shared(&svc.store, owner, lock)
    })
    .await?;
    // The lapses so far, the lock held again: one from now on (during the listings) is a
    // lapse the listings may not have seen through.
    let lapses = lock.lapses();
    all_objects_stored(svc, job, manifest).await?;
    Ok(lapses)
}

/// Fails, naming one, when an object `manifest` names is not in the store's listings. Run
/// under a store lock, so no GC removes one meanwhile.
async fn all_objects_stored(
    svc: &Arc<Backups>,
    job: &Job,
    manifest: &BackupManifest,
) -> Result<(), BackupError> {
    let chunks = with_retry(job, &svc.shutdown, "listing chunks", || {
        svc.store.list_chunks()
    })
    .await?;
    let packs = with_retry(job, &svc.shutdown, "listing packs", || {
        svc.store.list_packs()
    })
    .await?;
    let missing = missing_objects(manifest, &chunks, &packs);
    if missing.is_empty() {
        return Ok(());
    }
    Err(BackupError::Failed(format!(
        "{} object(s) the backup names are not in the store, e.g. {} (removed while its store lock had lapsed: the store was unreachable or the daemon stood still); the backup is not kept, and the next backup stores them again",
        missing.len(),
        missing[0]
    )))
}

/// The objects `manifest` names that are not in the listings: whole chunks (`chunks/<id>`)
/// and packs (`packs/<name>`).
fn missing_objects(
    manifest: &BackupManifest,
    chunks: &HashMap<ChunkId, u64>,
    packs: &HashMap<String, u64>,
) -> Vec<String> {
    let mut missing: BTreeSet<String> = BTreeSet::new();
    for id in manifest.named_chunks() {
        match manifest.packed.get(id) {
            Some(at) if !packs.contains_key(&at.pack) => {
                missing.insert(pack::pack_key(&at.pack));
            }
            Some(_) => {}
            // A chunk object too short or too long to be whole counts as missing.
            None if !chunks
                .get(id)
                .is_some_and(|&len_bytes| chunk::plausible_object_len(len_bytes)) =>
            {
                missing.insert(chunk::chunk_key(id));
            }
            None => {}
        }
    }
    missing.into_iter().collect()
}

/// The manifest of backup `backup_id` if it is in the store (a damaged one counts as absent:
/// the job writes it again).
async fn stored_manifest(
    svc: &Arc<Backups>,
    job: &Job,
    backup_id: &str,
) -> Result<Option<BackupManifest>, BackupError> {
    let found = with_retry(
        job,
        &svc.shutdown,
        "looking for the backup's manifest",
        || svc.store.get_manifest(backup_id),
    )
    .await;
    match found {
        Ok(manifest) => Ok(Some(manifest)),
        Err(BackupError::BackupNotFound(_)) | Err(BackupError::Manifest(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The snapshot backup `record` reads.
fn backup_snapshot(
    entry: &VolumeEntry,
    record: &BackupRecord,
) -> Result<SnapshotInfo, StorageError> {
    entry
        .snapshots()
        .into_iter()
        .find(|s| s.name == record.snapshot)
        .ok_or_else(|| StorageError::SnapshotNotFound {
            volume: record.volume.clone(),
            name: record.snapshot.clone(),
        })
}

/// An incremental's parent backup and the blocks changed since its snapshot; none: a full
/// backup.
type Base = (Option<BackupManifest>, Option<ChangedBlocks>);

/// The previous backup of this volume whose snapshot is still here, and the chunks changed
/// since it; (None, None) means a full read.
async fn find_base(
    svc: &Arc<Backups>,
    job: &Job,
    entry: &VolumeEntry,
    record: &BackupRecord,
    size_bytes: u64,
) -> Result<Base, BackupError> {
    let snapshots = entry.manifest().snapshots;
    // This daemon's catalog knows its own volumes' backups without asking the store (see
    // `Catalog::list_known`); a base another daemon deleted meanwhile sends it to the store.
    let mut fresh = false;
    let (base, parent) = loop {
        let backups = if fresh {
            with_retry(job, &svc.shutdown, "listing backups", || svc.catalog.list()).await?
        } else {
            with_retry(job, &svc.shutdown, "listing backups", || {
                svc.catalog.list_known()
            })
            .await?
        };
        let Some(base) = backups
            .into_iter()
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
        match with_retry(job, &svc.shutdown, "reading the parent manifest", || {
            svc.store.get_manifest(&base.id)
        })
        .await
        {
            Ok(parent)
                if parent.volume_uuid != record.volume_uuid
                    || parent.size_bytes != size_bytes
                    || parent.source_snapshot != base.snapshot =>
            {
                // Not the backup the catalog knows under that id (another daemon's that drew
                // the same id): its chunks are not this volume's.
                tracing::warn!(job = %job.id, parent = %base.id, "the parent backup's manifest is of another volume or snapshot: backing up in full");
                return Ok((None, None));
            }
            Ok(parent) => break (base, parent),
            Err(BackupError::BackupNotFound(_)) if !fresh => fresh = true,
            Err(BackupError::BackupNotFound(_)) => return Ok((None, None)),
            // Damaged, or of a newer format: no base, as a listing would leave it out (a
            // restart's first one does), rather than failing every backup of the volume.
            Err(BackupError::Manifest(e)) => {
                tracing::warn!(job = %job.id, parent = %base.id, error = %e, "the parent backup's manifest cannot be read: backing up in full");
                return Ok((None, None));
            }
            Err(e) => return Err(e),
        }
    };
    let changed = entry
        .changed_between(
            &base.snapshot,
            &record.snapshot,
            ChangedBlocks::new(),
            add_changed,
        )
        .await;
    let changed = match changed {
        Ok(Some(changed)) => changed,
        // Not an ancestor any more (a rollback), or deleted meanwhile: read everything.
        Ok(None) | Err(StorageError::SnapshotNotFound { .. }) => return Ok((None, None)),
        Err(e) => return Err(e.into()),
    };
    Ok((Some(parent), Some(changed)))
}

/// The manifests of the newest backups of the volume (by uuid) other than this one: all those
/// created in the newest second, since times within a second do not order them.
async fn newest_backups_of(
    svc: &Arc<Backups>,
    job: &Job,
    record: &BackupRecord,
) -> Result<Vec<BackupManifest>, BackupError> {
    let backups = with_retry(job, &svc.shutdown, "listing backups", || svc.catalog.list()).await?;
    let of_volume = || {
        backups
            .iter()
            .filter(|b| b.volume_uuid == record.volume_uuid && b.id != record.backup_id)
    };
    let Some(newest_secs) = of_volume().map(|b| b.created_unix_secs).max() else {
        return Ok(Vec::new());
    };
    let mut manifests = Vec::new();
    for newest in of_volume().filter(|b| b.created_unix_secs == newest_secs) {
        match with_retry(job, &svc.shutdown, "reading the newest manifests", || {
            svc.store.get_manifest(&newest.id)
        })
        .await
        {
            Ok(manifest) => manifests.push(manifest),
            // Deleted meanwhile, or unreadable (damaged, a newer format): its chunks are
            // nothing to count on.
            Err(BackupError::BackupNotFound(_)) => {}
            Err(BackupError::Manifest(e)) => {
                tracing::warn!(job = %job.id, backup = %newest.id, error = %e, "a newest backup's manifest cannot be read: its packed chunks are not reused");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(manifests)
}

/// Changed blocks per chunk index, as (first, count) runs relative to the chunk. A chunk with
/// more than [`MAX_DELTA_BLOCKS`] changed is read whole: its runs are one of the whole chunk,
/// so that scattered changes cost memory only where a delta may use them.
type ChangedBlocks = BTreeMap<u64, Vec<(u32, u32)>>;

/// Adds changed block run `[start, end)` (volume blocks, in order) to `changed`, split at
/// chunk boundaries.
fn add_changed(changed: &mut ChangedBlocks, start: u64, end: u64) {
    let blocks_per_chunk = CHUNK_SIZE_BYTES / BLOCK_BYTES;
    let whole = [(0, blocks_per_chunk as u32)];
    let mut at = start;
    while at < end {
        let chunk = at / blocks_per_chunk;
        let stop = end.min((chunk + 1) * blocks_per_chunk);
        let first = (at - chunk * blocks_per_chunk) as u32;
        let count = (stop - at) as u32;
        let list = changed.entry(chunk).or_default();
        if list[..] != whole[..] {
            match list.last_mut() {
                Some(last) if last.0 + last.1 == first => last.1 += count,
                _ => list.push((first, count)),
            }
            if list.iter().map(|r| r.1).sum::<u32>() > MAX_DELTA_BLOCKS {
                *list = whole.to_vec();
            }
        }
        at = stop;
    }
}

#[cfg(test)]
fn changed_per_chunk(runs: &[(u64, u64)]) -> ChangedBlocks {
    let mut changed = ChangedBlocks::new();
    for &(start, end) in runs {
        add_changed(&mut changed, start, end);
    }
    changed
}

/// Learns the chunks an earlier manifest names: each one's base (`known`) and, when packed,
/// where it lies (`packed`); its delta map is complete, so a chunk it names that is no delta
/// there patches nothing. Called newest manifest first; the first manifest to name a chunk
/// gives both, so a chunk two backups stored differently (a whole object in one, a packed
/// delta in the other) is never recorded with one's base and the other's location.
fn seed(
    known: &mut HashMap<ChunkId, Option<ChunkId>>,
    packed: &mut HashMap<ChunkId, PackedAt>,
    earlier: &BackupManifest,
) {
    for id in earlier.named_chunks() {
        if let std::collections::hash_map::Entry::Vacant(slot) = known.entry(*id) {
            slot.insert(earlier.delta_bases.get(id).copied());
            if let Some(at) = earlier.packed.get(id) {
                packed.insert(*id, at.clone());
            }
        }
    }
}

/// How many deltas lie between `id` and the whole chunk below it, as far as `known` tells.
/// An unknown chunk counts as the end of the chain: the manifest resolves it later, and a
/// reader refuses a chain that grew too long rather than misreading it.
fn chain_depth(known: &HashMap<ChunkId, Option<ChunkId>>, id: ChunkId) -> usize {
    let mut depth = 0;
    let mut current = id;
    while let Some(Some(base)) = known.get(&current) {
        depth += 1;
        if depth > MAX_DELTA_DEPTH {
            break;
        }
        current = *base;
    }
    depth
}

/// The delta map of a new manifest: every delta among `chunks` and below them, with unknown
/// chunks (stored by another backup, or by this job before a restart) looked up in the store.
async fn resolve_delta_bases(
    svc: &Arc<Backups>,
    job: &Arc<Job>,
    bases: &KnownBases,
    chunks: &[Option<ChunkId>],
) -> Result<BTreeMap<ChunkId, ChunkId>, BackupError> {
    let mut delta_bases = BTreeMap::new();
    let mut seen: HashSet<ChunkId> = HashSet::new();
    let mut frontier: Vec<ChunkId> = chunks.iter().flatten().copied().collect();
    // A chain readers accept is MAX_DELTA_DEPTH deltas, then the whole chunk below them: that
    // many levels, and one more pass to find the frontier empty.
    for _ in 0..MAX_DELTA_DEPTH + 2 {
        frontier.retain(|id| seen.insert(*id));
        if frontier.is_empty() {
            return Ok(delta_bases);
        }
        let unknown: Vec<ChunkId> = {
            let known = bases.lock().unwrap_or_else(|p| p.into_inner());
            frontier
                .iter()
                .filter(|id| !known.contains_key(id))
                .copied()
                .collect()
        };
        let looked_up: Vec<(ChunkId, Option<ChunkId>)> =
            futures_util::stream::iter(unknown.into_iter().map(|id| async move {
                // A delta is only ever of a whole chunk.
                let base = fetch::delta_base(svc, job, id, CHUNK_SIZE_BYTES as usize).await;
                base.map(|b| (id, b))
            }))
            .buffer_unordered(svc.config.upload_concurrency.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let known = {
            let mut known = bases.lock().unwrap_or_else(|p| p.into_inner());
            known.extend(looked_up);
            frontier
                .iter()
                .map(|id| (*id, known.get(id).copied().flatten()))
                .collect::<Vec<_>>()
        };
        frontier = Vec::new();
        for (id, base) in known {
            if let Some(base) = base {
                delta_bases.insert(id, base);
                frontier.push(base);
            }
        }
    }
    Err(BackupError::Failed(format!(
        "a chain of chunk deltas in the store is longer than {MAX_DELTA_DEPTH}"
    )))
}

/// What every chunk task works with.
pub(super) struct ChunkCtx<'a> {
    pub(super) svc: &'a Arc<Backups>,
    job: &'a Job,
    entry: &'a VolumeEntry,
    snapshot: &'a str,
    known: &'a Mutex<HashSet<ChunkId>>,
    /// For a `--full` backup, the whole chunk objects the listing found that no task of this
    /// job has checked yet (see `listed_object_damaged`).
    unchecked_listed: Option<&'a Mutex<HashSet<ChunkId>>>,
    bases: &'a KnownBases,
    pub(super) counters: &'a Counters,
    /// Whether `known` began as a listing of the store (else as the parent's objects).
    listed_store: bool,
    whole_permits: &'a tokio::sync::Semaphore,
    /// The volume's cached chunk trees (None: no cache, every changed chunk is read whole).
    pub(super) trees: Option<&'a Arc<VolumeTrees>>,
    /// The pack deltas go into, and where the packed ones lie once their pack is stored.
    pack: &'a PackWriter,
    packed: &'a Mutex<BTreeMap<ChunkId, PackedAt>>,
}

impl ChunkCtx<'_> {
    /// What the chunk trees this backup caches are marked with (see `tree_cache`).
    pub(super) fn written_by(&self) -> WrittenBy {
        WrittenBy::snapshot(self.snapshot)
    }

    pub(super) fn view(&self) -> Result<Arc<crate::storage::volume::Volume>, BackupError> {
        // Looked up per chunk: a merge of other snapshots may rebuild it meanwhile.
        Ok(self
            .entry
            .view(self.snapshot)
            .ok_or_else(|| StorageError::SnapshotNotFound {
                volume: self.entry.name().to_owned(),
                name: self.snapshot.to_owned(),
            })?)
    }

    /// Claims chunk `id` for this task to store: false when the store has it or another task
    /// of this job claimed it first. One object per id, so the base the manifest records for
    /// it is the one of the object stored (two tasks meeting the same new content, one whole
    /// and one as a delta, had each stored theirs, and the manifest paired one's location with
    /// the other's base).
    pub(super) fn claim(&self, id: ChunkId) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id)
    }

    /// Whether the store holds whole chunk `id` though this job did not know it: asked only
    /// when the job did not list the store (an incremental), so that a chunk another backup
    /// stored is not written again. Unsure (the store did not answer) counts as no: writing
    /// the same content again is harmless.
    async fn stored_already(&self, id: &ChunkId) -> bool {
        !self.listed_store && self.svc.store.has_chunk(id).await
    }

    /// For a `--full` backup, whether chunk `id`'s stored object (`len_bytes` of plaintext),
    /// which the listing found and no other task of this job has checked, fails its check:
    /// then the caller writes it again. False for every other chunk, and for one another task
    /// checks (it writes it again if need be, before the manifest is stored).
    async fn listed_object_damaged(
        &self,
        id: &ChunkId,
        len_bytes: usize,
    ) -> Result<bool, BackupError> {
        let Some(unchecked) = self.unchecked_listed else {
            return Ok(false);
        };
        if !unchecked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            return Ok(false);
        }
        let svc = self.svc;
        let stored = match with_retry(self.job, &svc.shutdown, "checking a stored chunk", || {
            svc.store.get_chunk(id)
        })
        .await
        {
            Ok(stored) => stored,
            Err(e @ BackupError::Cancelled(_)) => return Err(e),
            // Gone, cut short, unreadable: written again.
            Err(e) => {
                tracing::warn!(job = %self.job.id, chunk = %id, error = %e, "a stored chunk is damaged; the full backup writes it again");
                return Ok(true);
            }
        };
        let id = *id;
        let damaged = blocking(move || {
            let mut plain = vec![0u8; len_bytes];
            chunk::decode_into(&id, &stored, &mut plain).err()
        })
        .await?;
        if let Some(error) = &damaged {
            tracing::warn!(job = %self.job.id, chunk = %id, %error, "a stored chunk is damaged; the full backup writes it again");
        }
        Ok(damaged.is_some())
    }

    /// Puts a delta of `base` (None: of zeroes) named `id` into the backup's pack, and stores
    /// the pack when it is full.
    pub(super) async fn put_packed(
        &self,
        id: ChunkId,
        stored: &[u8],
        base: Option<ChunkId>,
    ) -> Result<(), BackupError> {
        self.pack.admit().await;
        let full = self.pack.append(id, stored);
        // A restarted job trusts only what it finds in the store (listed, or asked for), and
        // packed chunks are not objects of their own: it packs them again.
        self.note_new(id, base, stored.len());
        self.counters.delta_chunks.fetch_add(1, Ordering::Relaxed);
        match full {
            Some(full) => {
                store_pack(
                    self.svc,
                    self.job,
                    self.counters,
                    self.pack,
                    self.packed,
                    full,
                )
                .await
            }
            None => Ok(()),
        }
    }

    /// Records a chunk this job stored (or packed), having claimed it: its base, counted.
    fn note_new(&self, id: ChunkId, base: Option<ChunkId>, stored_len: usize) {
        self.bases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, base);
        self.counters
            .stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        self.counters.new_chunks.fetch_add(1, Ordering::Relaxed);
        self.counters
            .new_stored_bytes
            .fetch_add(stored_len as u64, Ordering::Relaxed);
    }

    /// Stores a whole chunk's object under `id`: its first `len` bytes of `padded` (padded to
    /// whole 4 KiB blocks in an aligned buffer).
    async fn put_whole(&self, id: ChunkId, padded: Bytes, len: usize) -> Result<(), BackupError> {
        let svc = self.svc;
        svc.throttle.take(len as u64).await;
        with_retry(self.job, &svc.shutdown, "uploading a chunk", || {
            svc.store.put_chunk_padded(&id, padded.clone(), len)
        })
        .await?;
        self.note_new(id, None, len);
        self.job.add_uploaded(len as u64);
        svc.metrics.backup().uploaded_bytes.inc_by(len as u64);
        Ok(())
    }
}

/// Runs `task` on a task of its own, so every runtime thread polls the chunk tasks: polled
/// from the job's one task, all the reads and pack appends of a backup ran on one thread.
/// Aborted when dropped (the job failed).
fn spawn_chunk_task(task: ChunkTask) -> ChunkTask {
    let handle = AbortOnDropHandle::new(tokio::spawn(task));
    Box::pin(async move {
        handle
            .await
            .map_err(|e| BackupError::Failed(format!("a chunk task failed: {e}")))?
    })
}

/// One chunk read whole: None when it reads as zeroes, else its id (uploaded if the store
/// lacked it). A whole-size chunk's tree is cached for the next incremental.
async fn process_chunk(
    ctx: &ChunkCtx<'_>,
    offset_bytes: u64,
    len_bytes: u64,
) -> Result<Option<ChunkId>, BackupError> {
    let view = ctx.view()?;
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
    let _permit = ctx
        .whole_permits
        .acquire()
        .await
        .map_err(|_| BackupError::Failed("the upload permits were closed".into()))?;
    let data = view.read(offset_bytes, len_bytes as usize).await?;
    ctx.counters.read_chunks.fetch_add(1, Ordering::Relaxed);
    ctx.counters
        .read_bytes
        .fetch_add(len_bytes, Ordering::Relaxed);
    let hashed = blocking(move || {
        if chunk::is_all_zero(&data) {
            None
        } else if data.len() as u64 == CHUNK_SIZE_BYTES {
            let (id, tree) = ChunkTree::of_chunk(&data);
            Some((id, Some(tree), data))
        } else {
            Some((ChunkId::of(&data), None, data))
        }
    })
    .await?;
    let Some((id, tree, data)) = hashed else {
        return Ok(None);
    };
    if let (Some(tree), Some(trees)) = (tree, ctx.trees) {
        let trees = Arc::clone(trees);
        let index = offset_bytes / CHUNK_SIZE_BYTES;
        let by = ctx.written_by();
        blocking(move || trees.store(index, &id, &tree, by)).await?;
    }
    if !ctx.claim(id) {
        if !ctx.listed_object_damaged(&id, data.len()).await? {
            return Ok(Some(id));
        }
    } else if ctx.stored_already(&id).await {
        return Ok(Some(id));
    }
    let level = ctx.svc.config.zstd_level;
    let pool = Arc::clone(&ctx.svc.encode_buffers);
    let (padded, len) = blocking(move || {
        let mut buf = pool.take(pool.capacity());
        let len = chunk::encode_into(&data, level, &mut buf);
        buf.set_len(len.next_multiple_of(ALIGN_BYTES));
        (pool.freeze(buf), len)
    })
    .await?;
    ctx.put_whole(id, padded, len).await?;
    Ok(Some(id))
}

/// Stores a full pack, then records where its chunks lie.
async fn store_pack(
    svc: &Backups,
    job: &Job,
    counters: &Counters,
    writer: &PackWriter,
    packed: &Mutex<BTreeMap<ChunkId, PackedAt>>,
    full: FullPack,
) -> Result<(), BackupError> {
    let _slot = writer.upload_slot().await;
    let len = full.len as u64;
    svc.throttle.take(len).await;
    with_retry(job, &svc.shutdown, "uploading a pack", || {
        svc.store
            .put_pack(&full.name, full.padded.clone(), full.len)
    })
    .await?;
    packed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(full.entries);
    counters.packs.fetch_add(1, Ordering::Relaxed);
    job.add_uploaded(len);
    svc.metrics.backup().uploaded_bytes.inc_by(len);
    Ok(())
}

/// CPU work (hashing, compression) off the runtime's threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackupError::Failed(format!("a worker thread failed: {e}")))
}

/// The whole chunk objects `manifest` names that neither this job stored nor an earlier
/// manifest (`previous`) named: found in the store (listed, or asked for by an incremental),
/// stored by another daemon sharing it or by this job before a restart. A local store makes them durable before the manifest
/// too (see `local_sync`). Packed chunks lie in this job's packs or in the earlier ones'.
fn foreign_chunks(
    manifest: &BackupManifest,
    previous: &[&BackupManifest],
    counters: &Counters,
) -> Vec<ChunkId> {
    let stored = counters.stored.lock().unwrap_or_else(|p| p.into_inner());
    let mut named_before: HashSet<&ChunkId> = HashSet::new();
    for earlier in previous {
        named_before.extend(earlier.chunks.iter().flatten());
        named_before.extend(earlier.delta_bases.values());
    }
    let mut foreign: Vec<ChunkId> = manifest
        .chunks
        .iter()
        .flatten()
        .chain(manifest.delta_bases.values())
        .filter(|id| {
            !stored.contains(id) && !named_before.contains(id) && !manifest.packed.contains_key(id)
        })
        .copied()
        .collect();
    foreign.sort_unstable();
    foreign.dedup();
    foreign
}

/// Whether snapshot `name` is one a backup took: the reserved prefix and a backup id of the
/// generated shape. A user's snapshot that only starts with the prefix (made before it was
/// reserved) is not one, and is never released.
fn is_backup_snapshot(name: &str) -> bool {
    name.strip_prefix(BACKUP_SNAPSHOT_PREFIX)
        .is_some_and(manifest::is_generated_backup_id)
}

/// The volume's backup snapshots other than `keep`.
fn older_bases(entry: &VolumeEntry, keep: &str) -> Vec<String> {
    entry
        .snapshots()
        .into_iter()
        .filter(|s| is_backup_snapshot(&s.name) && s.name != keep)
        .map(|s| s.name)
        .collect()
}

/// After a backup completes, its snapshot is the volume's base for the next incremental: the
/// older backup snapshots are released (VBS keeps one per disk).
async fn release_bases(entry: &VolumeEntry, snapshots: Vec<String>) {
    for snapshot in snapshots {
        match entry.delete_snapshot(&snapshot).await {
            Ok(_) => {
                tracing::info!(volume = entry.name(), %snapshot, "released the previous backup base")
            }
            Err(e) => {
                tracing::warn!(volume = entry.name(), %snapshot, error = %e, "could not release an old backup snapshot")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::{chunk_list_digest, BackupStats, MANIFEST_FORMAT_VERSION};

    fn id(n: u8) -> ChunkId {
        ChunkId::from_bytes([n; 32])
    }

    fn manifest(
        chunks: Vec<Option<ChunkId>>,
        delta_bases: &[(u8, u8)],
        packed: &[u8],
    ) -> BackupManifest {
        BackupManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            backup_id: "b-20261203T000000Z-00000000".to_owned(),
            volume_name: "v".to_owned(),
            volume_uuid: "5f0c3a9e-8f7d-4c1b-9a51-0d2f6e7b8c90".to_owned(),
            size_bytes: chunks.len() as u64 * CHUNK_SIZE_BYTES,
            chunk_size_bytes: CHUNK_SIZE_BYTES,
            chunk_list_digest: chunk_list_digest(&chunks),
            chunks,
            parent_backup_id: None,
            source_snapshot: "vbs-x".to_owned(),
            source_snapshot_created_unix_secs: 0,
            group_id: None,
            policy: None,
            created_unix_secs: 0,
            delta_bases: delta_bases.iter().map(|&(c, b)| (id(c), id(b))).collect(),
            packed: packed
                .iter()
                .map(|&c| {
                    let at = PackedAt {
                        pack: "p".to_owned(),
                        offset_bytes: 0,
                        len_bytes: 1,
                    };
                    (id(c), at)
                })
                .collect(),
            stats: BackupStats::default(),
        }
    }

    #[test]
    fn missing_objects_are_the_named_ones_no_listing_shows() {
        // 1 listed, 2 not listed, 3 packed in "p", which is not listed either.
        let m = manifest(vec![Some(id(1)), Some(id(2)), Some(id(3)), None], &[], &[3]);
        let chunks: HashMap<ChunkId, u64> = [(id(1), 100), (id(3), 100)].into();
        let missing = missing_objects(&m, &chunks, &HashMap::new());
        assert_eq!(missing, [chunk::chunk_key(&id(2)), pack::pack_key("p")]);
        let packs: HashMap<String, u64> = [("p".to_owned(), 10)].into();
        let chunks: HashMap<ChunkId, u64> = [(id(1), 100), (id(2), 100)].into();
        assert!(missing_objects(&m, &chunks, &packs).is_empty());
        // A listed chunk object cut short counts as missing.
        let chunks: HashMap<ChunkId, u64> = [(id(1), 100), (id(2), 0)].into();
        assert_eq!(
            missing_objects(&m, &chunks, &packs),
            [chunk::chunk_key(&id(2))]
        );
    }

    #[test]
    fn a_chunk_takes_its_base_and_its_location_from_the_same_manifest() {
        // Chunk 7: a whole object in the newer manifest, a packed delta over 8 in the older.
        let newer = manifest(vec![Some(id(7)), Some(id(9))], &[(9, 7)], &[9]);
        let older = manifest(vec![Some(id(7))], &[(7, 8)], &[7]);
        let (mut known, mut packed) = (HashMap::new(), HashMap::new());
        for earlier in [&newer, &older] {
            seed(&mut known, &mut packed, earlier);
        }
        assert_eq!(known[&id(7)], None);
        assert!(!packed.contains_key(&id(7)), "{packed:?}");
        assert_eq!(known[&id(9)], Some(id(7)));
        assert!(packed.contains_key(&id(9)));
        // 8 is only the older manifest's base of its own 7: learnt, but not packed.
        assert_eq!(known.get(&id(8)), Some(&None));
        assert!(!packed.contains_key(&id(8)));
        // In the other order the packed delta wins both ways.
        let (mut known, mut packed) = (HashMap::new(), HashMap::new());
        for earlier in [&older, &newer] {
            seed(&mut known, &mut packed, earlier);
        }
        assert_eq!(known[&id(7)], Some(id(8)));
        assert!(packed.contains_key(&id(7)));
    }

    #[test]
    fn only_snapshots_named_after_a_backup_are_released() {
        let taken = format!(
            "{BACKUP_SNAPSHOT_PREFIX}{}",
            manifest::new_backup_id(std::time::Duration::from_secs(1_764_654_240))
        );
        assert!(is_backup_snapshot(&taken), "{taken}");
        for kept in [
            "vbs-mine",
            "vbs-",
            "vbs-b-1",
            "nightly",
            "b-20251202T054400Z-0123abcd",
        ] {
            assert!(!is_backup_snapshot(kept), "{kept}");
        }
    }

    /// Only chunks found in the store must be synced before the manifest: not the
    /// job's own (synced as written), not earlier manifests' (synced before those), not packed
    /// ones (their packs are objects of the job or of earlier manifests).
    #[test]
    fn foreign_chunks_are_the_named_ones_nobody_here_stored_or_named() {
        let earlier = manifest(vec![Some(id(1)), Some(id(2))], &[(2, 20)], &[]);
        let counters = Counters::default();
        counters.stored.lock().unwrap().extend([id(3), id(4)]);
        let current = manifest(
            vec![
                Some(id(1)), // named before
                Some(id(3)), // stored by this job
                None,
                Some(id(5)), // foreign
                Some(id(6)), // packed
                Some(id(5)), // foreign again: listed once
                Some(id(7)), // a delta over a foreign base
                Some(id(20)),
            ],
            // 3 patches 4 (also stored here), which patches 2 (named before).
            &[(7, 8), (3, 4), (4, 2), (6, 9)],
            &[6],
        );
        let foreign = foreign_chunks(&current, &[&earlier], &counters);
        // 8 is the base of 7 (listed by neither), 9 the base of a packed chunk (still a
        // whole object somewhere: synced too), 20 an earlier manifest's delta base.
        assert_eq!(foreign, vec![id(5), id(7), id(8), id(9)]);
        // With no earlier manifest and nothing stored, every named whole chunk is foreign.
        let alone = foreign_chunks(&current, &[], &Counters::default());
        assert_eq!(
            alone,
            vec![
                id(1),
                id(2),
                id(3),
                id(4),
                id(5),
                id(7),
                id(8),
                id(9),
                id(20)
            ]
        );
    }

    /// Two daemons sharing a store that drew the same backup id: the manifest under it is not
    /// the backup this daemon's catalog knows, and the next backup is not built on it (its
    /// chunks are another volume's).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_id_another_daemon_drew_too_is_no_parent() {
        use crate::backup::job::JobState;
        use crate::backup::sets::tests::backups_with;
        use crate::io::{EngineConfig, EngineKind, IoEngine};
        use std::time::Duration;

        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let (registry, backups) = backups_with(dir.path(), engine);
        let size_bytes = 2 * CHUNK_SIZE_BYTES;
        let mut ids = Vec::new();
        for (name, tag) in [("a", 0xa1u8), ("b", 0xb2)] {
            registry.create(name, size_bytes).unwrap();
            let volume = registry.get(name).unwrap();
            let data = Bytes::from(vec![tag; size_bytes as usize]);
            volume.write_bulk(0, data).await.unwrap();
            ids.push(backup(&backups, name).await);
        }
        // b's manifest under a's backup id, as the other daemon would have written it.
        let mut foreign = backups.store.get_manifest(&ids[1]).await.unwrap();
        foreign.backup_id = ids[0].clone();
        backups.store.put_manifest(&foreign, &[]).await.unwrap();

        // a's next backup: a changed block, the rest as a's first backup had it.
        let a = registry.get("a").unwrap();
        a.write_bulk(0, Bytes::from(vec![0x5a; 4096]))
            .await
            .unwrap();
        let next = backups
            .store
            .get_manifest(&backup(&backups, "a").await)
            .await
            .unwrap();
        assert_eq!(
            next.parent_backup_id, None,
            "built on another volume's backup"
        );
        let b_chunks: std::collections::HashSet<_> = foreign.chunks.iter().flatten().collect();
        assert!(
            next.chunks.iter().flatten().all(|c| !b_chunks.contains(c)),
            "a's backup names b's chunks"
        );

        async fn backup(backups: &Arc<crate::backup::Backups>, volume: &str) -> String {
            let started = backups.create(&[volume.into()], false, None).await.unwrap();
            let job = backups.job(&started[0].id).unwrap();
            job.wait_finished(Duration::from_secs(60)).await;
            assert_eq!(job.state(), JobState::Succeeded, "{:?}", job.info().error);
            started[0].backup_id.clone()
        }
    }

    /// Changed runs are split at chunk edges and merged within a chunk; a chunk with more
    /// changed blocks than a delta takes is kept as one whole run, however scattered.
    #[test]
    fn changed_blocks_per_chunk_keep_runs_only_where_a_delta_may_use_them() {
        let per_chunk = CHUNK_SIZE_BYTES / BLOCK_BYTES;
        let mut runs: Vec<(u64, u64)> = (0..per_chunk / 2).map(|i| (2 * i, 2 * i + 1)).collect();
        runs.extend([
            (per_chunk + 3, per_chunk + 5),
            (per_chunk + 5, per_chunk + 6),
            (2 * per_chunk - 1, 2 * per_chunk + 2),
        ]);
        let changed = changed_per_chunk(&runs);
        let whole = vec![(0, per_chunk as u32)];
        assert_eq!(changed[&0], whole);
        assert_eq!(changed[&1], [(3, 3), (per_chunk as u32 - 1, 1)]);
        assert_eq!(changed[&2], [(0, 2)]);
        assert_eq!(changed.len(), 3);
    }
}
