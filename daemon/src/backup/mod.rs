//! Backups (VBS): frozen snapshot data streamed to object storage as content-addressed chunks,
//! restored from there. Reads storage's frozen layers; never on the NBD I/O path.
//!
//! `Backups` is the service the admin socket calls; each long operation runs as a [`job::Job`]
//! in the background: `upload.rs` (backup), `restore.rs`, `verify.rs`; `gc.rs` collects
//! chunks no manifest references. docs/backup-format.md describes what lands in the store.

pub mod catalog;
pub mod chunk;
pub mod delta;
pub mod error;
pub mod fetch;
pub mod gc;
pub mod holds;
pub mod job;
pub mod local_read;
pub mod local_sync;
pub mod local_write;
pub mod locks;
pub mod manifest;
pub mod pack;
pub mod policy_run;
pub mod raw_frame;
pub mod records;
pub mod restore;
pub mod retry;
pub mod scratch;
pub mod set_restore;
pub mod sets;
pub mod store;
pub mod throttle;
pub mod tree;
pub mod tree_cache;
pub mod upload;
pub mod verify;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::backup::catalog::{BackupInfo, Catalog};
use crate::backup::error::BackupError;
use crate::backup::job::{new_job_id, CancelRefused, Job, JobInfo, JobKind};
use crate::backup::records::{BackupRecord, JobFiles, JobRecord, RestoreRecord};
use crate::backup::store::{BackupStore, S3Options};
use crate::backup::throttle::Throttle;
use crate::error::StorageError;
use crate::metrics::backup::{JobLabels, OutcomeLabels};
use crate::metrics::Metrics;
use crate::storage::attachments::{CloseRefused, Closure};
use crate::storage::entry::{now_unix_secs, since_epoch, VolumeEntry};
use crate::storage::restore_mark::RestoreMark;
use crate::storage::Registry;

/// Prefix of the snapshots backups take; the newest of each volume is kept as the base of its
/// next incremental backup.
pub const BACKUP_SNAPSHOT_PREFIX: &str = "vbs-";
/// Finished jobs `job list` keeps showing.
const FINISHED_JOBS_KEPT: usize = 100;
/// How long a restore waits for the clients it disconnected to finish their requests: longer
/// than the 10 s a closing connection's untaken replies may wait, so a client that stopped
/// reading is let go before this ends.
const RESTORE_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// A deferred GC is tried again after this, then at doubling intervals up to `GC_RETRY_MAX`:
/// each try lists the store's locks, so it stays cheap for a store busy for hours.
const GC_RETRY_FIRST: Duration = Duration::from_secs(5);
const GC_RETRY_MAX: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq)]
pub struct BackupConfig {
    pub store_url: String,
    pub s3: S3Options,
    pub upload_concurrency: usize,
    pub rate_limit_bytes_per_sec: Option<u64>,
    pub zstd_level: i32,
}

pub struct Backups {
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: Arc<BackupStore>,
    pub(crate) catalog: Catalog,
    pub(crate) files: JobFiles,
    /// The BLAKE3 trees of the chunks of each volume's latest backup (see `tree.rs`, `tree_cache.rs`).
    pub(crate) trees: tree_cache::TreeCache,
    /// Aligned buffers whole chunks are encoded into (see `local_write`), and packs of deltas
    /// are filled in.
    pub(crate) encode_buffers: Arc<crate::storage::aligned::AlignedPool>,
    /// Trees changed chunks are named in, and buffers their deltas are encoded in (see
    /// `scratch`).
    pub(crate) name_scratch: scratch::Pool<delta::NameScratch>,
    pub(crate) delta_buffers: scratch::Pool<Vec<u8>>,
    /// Batches of changed chunks read and named at once, across backups
    /// (`delta::NAMING_BATCHES_PER_CORE`). More only spread the memory they use over more
    /// threads and buffers.
    pub(crate) naming_permits: tokio::sync::Semaphore,
    /// Backups reading their snapshots at once (`MAX_BACKUPS_READING`): a policy over many
    /// volumes starts a job for each, and each holds chunk buffers while it reads.
    reading_slots: tokio::sync::Semaphore,
    pub(crate) config: BackupConfig,
    pub(crate) throttle: Throttle,
    pub(crate) shutdown: CancellationToken,
    pub(crate) metrics: Arc<Metrics>,
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    pub(crate) running_sets: sets::RunningSets,
    /// Volumes with a backup or restore job running: one at a time per volume.
    busy_volumes: Mutex<HashSet<String>>,
    /// A GC was deferred by running backups: run it when they end.
    gc_pending: AtomicBool,
    /// A task retries a deferred GC on a timer (see [`Backups::gc`]).
    gc_retrying: AtomicBool,
    /// This daemon's GCs run one at a time: two at once would defer each other, and a sweep
    /// that ends clears the pending flag only when it began after the deferral it answers.
    gc_serial: tokio::sync::Mutex<()>,
    /// The backups restore and verify jobs read and deletes delete, kept apart.
    pub(crate) holds: holds::BackupHolds,
    /// Members of server restores kept closed until each restore has decided.
    set_restore_holds: set_restore::SetRestoreHolds,
    /// Whether a server of that name exists (set once the servers are read): a set that ends
    /// after its server was deleted leaves no metric series of it behind.
    server_exists: std::sync::OnceLock<ServerLookup>,
}

type ServerLookup = Box<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    pub deferred: bool,
    pub reason: Option<String>,
    /// Why the collection after a delete failed (the delete stands; see `gc_after_delete`).
    pub failed: Option<String>,
    pub manifests: u64,
    pub chunks_kept: u64,
    pub chunks_deleted: u64,
    pub packs_kept: u64,
    pub packs_deleted: u64,
    pub bytes_freed: u64,
}

impl Backups {
    pub fn open(
        data_dir: &Path,
        config: BackupConfig,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Backups>, BackupError> {
        let store = Arc::new(BackupStore::open(&config.store_url, &config.s3)?);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let naming_batches = delta::NAMING_BATCHES_PER_CORE * cores;
        let trees_dir = data_dir.join("backup-trees");
        let trees = tree_cache::TreeCache::new(trees_dir.clone());
        // A large old cache takes a while to delete; the daemon does not wait for it.
        let spawned = std::thread::Builder::new()
            .name("evsd-tree-cleanup".into())
            .spawn(move || tree_cache::TreeCache::new(trees_dir).remove_legacy());
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start removing the old chunk tree cache");
        }
        Ok(Arc::new(Backups {
            registry,
            catalog: Catalog::new(Arc::clone(&store)),
            store,
            files: JobFiles::open(data_dir)?,
            trees,
            encode_buffers: crate::storage::aligned::AlignedPool::new(
                chunk::HEADER_LEN_BYTES + chunk::CHUNK_SIZE_BYTES as usize,
                config.upload_concurrency.max(pack::BUFFERS_PER_BACKUP),
            ),
            // As many idle as can be in use: one scratch per batch, a delta per chunk.
            name_scratch: scratch::Pool::new(naming_batches, |_| true),
            delta_buffers: scratch::Pool::new(naming_batches * delta::BATCH_CHUNKS, |buffer| {
                buffer.capacity() <= delta::MAX_KEPT_DELTA_BYTES
            }),
            naming_permits: tokio::sync::Semaphore::new(naming_batches),
            reading_slots: tokio::sync::Semaphore::new(MAX_BACKUPS_READING),
            throttle: Throttle::new(config.rate_limit_bytes_per_sec),
            config,
            shutdown,
            metrics,
            jobs: Mutex::new(BTreeMap::new()),
            running_sets: sets::RunningSets::default(),
            busy_volumes: Mutex::new(HashSet::new()),
            gc_pending: AtomicBool::new(false),
            gc_retrying: AtomicBool::new(false),
            gc_serial: tokio::sync::Mutex::new(()),
            holds: holds::BackupHolds::default(),
            set_restore_holds: set_restore::SetRestoreHolds::default(),
            server_exists: std::sync::OnceLock::new(),
        }))
    }

    /// Tells the service which servers exist (see `server_exists`); the first call counts.
    pub fn know_servers(&self, exists: impl Fn(&str) -> bool + Send + Sync + 'static) {
        let _ = self.server_exists.set(Box::new(exists));
    }

    /// Whether server `name` exists (true until the servers are known).
    pub(crate) fn server_exists(&self, name: &str) -> bool {
        self.server_exists.get().is_none_or(|exists| exists(name))
    }

    /// Drops what the daemon keeps locally for backing up a deleted volume (its chunk trees);
    /// its backups stay in the store. Blocking.
    pub fn forget_volume(&self, volume_uuid: &str) {
        self.trees.remove_volume(volume_uuid);
    }

    pub fn store_url(&self) -> &str {
        self.store.url()
    }

    /// Keeps the job series of the metrics endpoint current (each second) until shutdown.
    pub fn spawn_metrics_updates(self: &Arc<Self>) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => this.publish_metrics(),
                    _ = this.shutdown.cancelled() => return,
                }
            }
        });
    }

    fn publish_metrics(&self) {
        let m = self.metrics.backup();
        let jobs: Vec<JobInfo> = self.jobs();
        let mut listed = HashSet::with_capacity(jobs.len());
        for info in jobs {
            let labels = JobLabels {
                job: info.id.clone(),
                kind: serde_json::to_value(info.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                volume: info.volume.clone(),
            };
            let p = &info.progress;
            let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            m.bytes_done.get_or_create(&labels).set(clamp(p.bytes_done));
            m.bytes_total
                .get_or_create(&labels)
                .set(clamp(p.bytes_total));
            m.bytes_uploaded
                .get_or_create(&labels)
                .set(clamp(p.bytes_uploaded));
            m.rate_bytes_per_second
                .get_or_create(&labels)
                .set(clamp(p.rate_bytes_per_sec));
            m.eta_seconds
                .get_or_create(&labels)
                .set(p.eta_secs.map_or(-1, clamp));
            m.running
                .get_or_create(&labels)
                .set(i64::from(!info.state.is_finished()));
            listed.insert(labels);
        }
        m.keep_only_jobs(listed);
    }

    /// Restarts the jobs a crash or shutdown interrupted, and removes the volumes made for
    /// restores whose job was never recorded.
    pub async fn resume(self: &Arc<Self>) {
        let records = self.files.load_all();
        self.discard_unrecorded_restore_volumes(&records).await;
        let set_restores = self.hold_interrupted_set_restores();
        for record in self.release_unstarted_sets(records) {
            tracing::info!(job = record.job_id(), "resuming an interrupted job");
            match record {
                JobRecord::Backup(r) => {
                    if !self.claim(&r.volume) {
                        tracing::error!(job = %r.job_id, volume = %r.volume, "two unfinished jobs for one volume; dropping this one");
                        self.files.remove(&r.job_id);
                        continue;
                    }
                    let job = self.register(&r.job_id, JobKind::Backup, &r.volume, &r.backup_id);
                    job.set_policy(r.policy.clone());
                    self.spawn_backup(job, r, true);
                }
                JobRecord::Set(set) => self.spawn_set(set),
                JobRecord::Restore(r) => {
                    if !self.claim(&r.volume) {
                        self.files.remove(&r.job_id);
                        continue;
                    }
                    // The job's own mark says it has not completed. Without it the record
                    // outlived its job (its removal was lost in a crash) or its job never
                    // marked the volume (a crash right after the record was saved), and the
                    // volume may hold what clients wrote since: running it would overwrite
                    // that. Without the volume (a failed restore's new volume was discarded,
                    // or the volume deleted), a job would fill whatever took the name next.
                    let Some(entry) = self.registry.entry(&r.volume) else {
                        tracing::warn!(job = %r.job_id, volume = %r.volume, "dropping the record of a restore whose volume is gone");
                        self.files.remove(&r.job_id);
                        self.unclaim(&r.volume);
                        continue;
                    };
                    let ours = entry
                        .volume()
                        .restore_mark()
                        .is_some_and(|mark| mark.job_id == r.job_id);
                    if !ours {
                        tracing::warn!(job = %r.job_id, volume = %r.volume, "dropping the record of a restore whose volume does not carry its mark: it completed or never started");
                        self.files.remove(&r.job_id);
                        self.unclaim(&r.volume);
                        continue;
                    }
                    let _ = entry.volume().attachments().close(true, Closure::Restore);
                    if let Some(set) = self.set_restore_holds.restore_of(&r.volume) {
                        set.expect(&r.volume);
                    }
                    let job = self.register(&r.job_id, JobKind::Restore, &r.volume, &r.backup_id);
                    self.spawn_restore(job, r, false);
                }
            }
        }
        for set in set_restores {
            self.spawn_set_restore(set);
        }
    }

    /// A volume made for a restore is marked from birth, before the job's record is saved: a
    /// crash in between left one that refuses clients, with no job to fill or remove it, and
    /// whose name a retry could not take. No record names its job: it holds nothing, and goes.
    async fn discard_unrecorded_restore_volumes(&self, records: &[JobRecord]) {
        let recorded = |job_id: &str| records.iter().any(|r| r.job_id() == job_id);
        for entry in self.registry.entries() {
            let Some(mark) = entry.volume().restore_mark() else {
                continue;
            };
            if !mark.made_for_restore || recorded(&mark.job_id) {
                continue;
            }
            let (name, uuid) = (
                entry.name().to_owned(),
                entry.volume().identity().uuid.clone(),
            );
            tracing::warn!(volume = %name, job = %mark.job_id, "removing a volume made for a restore whose job was never recorded");
            self.discard_volume(&name, Some(&uuid)).await;
        }
    }

    fn claim(&self, volume: &str) -> bool {
        self.busy_volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(volume.to_owned())
    }

    /// Whether a backup or restore job has `volume` now.
    pub(crate) fn is_claimed(&self, volume: &str) -> bool {
        self.busy_volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(volume)
    }

    fn unclaim(&self, volume: &str) {
        self.busy_volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume);
    }

    fn register(&self, job_id: &str, kind: JobKind, volume: &str, backup_id: &str) -> Arc<Job> {
        let job = Arc::new(Job::new(
            job_id.to_owned(),
            kind,
            volume.to_owned(),
            backup_id.to_owned(),
            &self.shutdown,
        ));
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.insert(job_id.to_owned(), Arc::clone(&job));
        // Forget the oldest finished jobs beyond the cap (ids sort by nothing useful, so by
        // finish time).
        let mut finished: Vec<(u64, String)> = jobs
            .values()
            .filter_map(|j| {
                let info = j.info();
                info.finished_unix_secs.map(|t| (t, info.id))
            })
            .collect();
        if finished.len() > FINISHED_JOBS_KEPT {
            finished.sort();
            for (_, id) in &finished[..finished.len() - FINISHED_JOBS_KEPT] {
                jobs.remove(id);
            }
        }
        job
    }

    pub fn jobs(&self) -> Vec<JobInfo> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<JobInfo> = jobs.values().map(|j| j.info()).collect();
        out.sort_by(|a, b| (a.started_unix_secs, &a.id).cmp(&(b.started_unix_secs, &b.id)));
        out
    }

    pub fn job(&self, id: &str) -> Result<Arc<Job>, BackupError> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| BackupError::JobNotFound(id.to_owned()))
    }

    /// Stops a running job (`job.cancel`) and waits up to `max` for it to end. A backup
    /// releases its snapshot, a restore into a volume it created removes it, and neither
    /// resumes at the next start.
    pub async fn cancel_job(&self, id: &str, max: Duration) -> Result<JobInfo, BackupError> {
        let job = self.job(id)?;
        match job.cancel() {
            Ok(()) => tracing::info!(job = id, volume = %job.volume, "cancelling job"),
            // Asked twice: this call waits as the first one does.
            Err(CancelRefused::AlreadyRequested) => {}
            Err(CancelRefused::Finished) => {
                return Err(BackupError::JobFinished {
                    id: id.to_owned(),
                    state: serde_json::to_value(job.info().state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                })
            }
            Err(CancelRefused::Committed) => {
                return Err(BackupError::JobFinished {
                    id: id.to_owned(),
                    state: "storing its manifest: the backup completes".into(),
                })
            }
        }
        job.wait_finished(max).await;
        Ok(job.info())
    }

    fn running_backup_count(&self) -> usize {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|j| j.kind == JobKind::Backup && !j.state().is_finished())
            .count()
    }

    fn job_for_backup(&self, backup_id: &str) -> Option<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|j| j.kind == JobKind::Backup && j.backup_id == backup_id)
            .cloned()
    }

    /// Starts one backup job per volume. Each volume's snapshot is taken before this returns,
    /// so the backup holds every write acknowledged before the call.
    pub async fn create(
        self: &Arc<Self>,
        volumes: &[String],
        full: bool,
        policy: Option<String>,
    ) -> Result<Vec<JobInfo>, BackupError> {
        if volumes.is_empty() {
            return Err(BackupError::InvalidArgument(
                "name at least one volume to back up".into(),
            ));
        }
        let mut unique = HashSet::new();
        for volume in volumes {
            if !unique.insert(volume) {
                return Err(BackupError::InvalidArgument(format!(
                    "volume {volume:?} named twice"
                )));
            }
            if self.registry.entry(volume).is_none() {
                return Err(StorageError::NotFound(volume.clone()).into());
            }
        }
        // All volumes are claimed, and all their snapshots taken, before any job starts: a
        // busy volume, or one whose snapshot fails, refuses the whole call and starts nothing.
        self.claim_all(volumes)?;
        let mut prepared: Vec<(Arc<VolumeEntry>, BackupRecord)> = Vec::new();
        for volume in volumes {
            let taken = match self.registry.entry(volume) {
                Some(entry) => {
                    let record = new_record(&entry, volume, full, None, policy.clone());
                    self.take_backup_snapshot(&entry, record)
                        .await
                        .map(|record| (entry, record))
                }
                None => Err(StorageError::NotFound(volume.clone()).into()),
            };
            match taken {
                Ok(ready) => prepared.push(ready),
                Err(e) => {
                    for (entry, record) in &prepared {
                        self.files.remove(&record.job_id);
                        self.drop_unused_snapshot(entry, &record.snapshot).await;
                    }
                    for volume in volumes {
                        self.unclaim(volume);
                    }
                    return Err(e);
                }
            }
        }
        Ok(prepared
            .into_iter()
            .map(|(_, record)| self.start_recorded(record))
            .collect())
    }

    /// Records a backup job and takes its snapshot; on failure neither is left.
    async fn take_backup_snapshot(
        &self,
        entry: &Arc<VolumeEntry>,
        mut record: BackupRecord,
    ) -> Result<BackupRecord, BackupError> {
        let taken = async {
            self.files.save(&JobRecord::Backup(record.clone()))?;
            entry.create_snapshot_durable(&record.snapshot).await?;
            // Not saved again here (a journal commit on every backup's path): a job resumed
            // with `snapshot_taken` false finds the snapshot under its own name, or fails if
            // there is none (`upload::run`).
            record.snapshot_taken = true;
            Ok::<_, BackupError>(())
        }
        .await;
        if let Err(e) = taken {
            self.files.remove(&record.job_id);
            self.drop_unused_snapshot(entry, &record.snapshot).await;
            return Err(e);
        }
        Ok(record)
    }

    /// Deletes the snapshot of a backup that did not start. One whose manifest could not be
    /// saved (a full data dir) may exist in memory only: deleting it also saves the manifest
    /// again, which lets FLUSH succeed once there is room.
    async fn drop_unused_snapshot(&self, entry: &VolumeEntry, snapshot: &str) {
        if entry.manifest().snapshot(snapshot).is_some() {
            if let Err(error) = entry.delete_snapshot(snapshot).await {
                tracing::warn!(volume = entry.name(), snapshot, %error, "could not remove the snapshot of a backup that did not start");
            }
        }
    }

    /// Registers and starts the job of a backup whose record (and snapshot) exist.
    pub(crate) fn start_recorded(self: &Arc<Self>, record: BackupRecord) -> JobInfo {
        let job = self.register(
            &record.job_id,
            JobKind::Backup,
            &record.volume,
            &record.backup_id,
        );
        job.set_policy(record.policy.clone());
        tracing::info!(job = %record.job_id, backup = %record.backup_id, volume = %record.volume, full = record.full, group = ?record.group_id, "backup started");
        let info = job.info();
        self.spawn_backup(job, record, false);
        info
    }

    /// Claims `volumes` for backups: none of them, and Err naming one, when a job has it or a
    /// server restore still deciding holds it (a backup would take data the set may roll back).
    pub(crate) fn claim_all(&self, volumes: &[String]) -> Result<(), BackupError> {
        if let Some(held) = volumes.iter().find(|v| self.set_restore_holds.holds(v)) {
            return Err(BackupError::JobRunning(held.clone()));
        }
        for (i, volume) in volumes.iter().enumerate() {
            if !self.claim(volume) {
                for earlier in &volumes[..i] {
                    self.unclaim(earlier);
                }
                return Err(BackupError::JobRunning(volume.clone()));
            }
        }
        Ok(())
    }

    pub(crate) fn unclaim_all(&self, volumes: &[String]) {
        for volume in volumes {
            self.unclaim(volume);
        }
    }

    /// Waits for one of the `MAX_BACKUPS_READING` slots for `job` to read its snapshot in (its
    /// snapshot is taken already: waiting changes nothing of what it backs up). Ends early when
    /// the job is cancelled or the daemon stops.
    pub(crate) async fn reading_slot(
        &self,
        job: &Job,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, BackupError> {
        let stopped = || {
            job.stopped(&self.shutdown)
                .unwrap_or_else(|| BackupError::Cancelled("the job was stopped".into()))
        };
        if let Ok(slot) = self.reading_slots.try_acquire() {
            return Ok(slot);
        }
        tracing::info!(job = %job.id, max = MAX_BACKUPS_READING, "waiting for another backup to finish reading");
        tokio::select! {
            slot = self.reading_slots.acquire() => {
                slot.map_err(|_| BackupError::Failed("the backup slots were closed".into()))
            }
            _ = job.stop_requested() => Err(stopped()),
            _ = self.shutdown.cancelled() => Err(stopped()),
        }
    }

    /// Runs a backup job; `resumed`: recorded by an earlier run of the daemon.
    fn spawn_backup(self: &Arc<Self>, job: Arc<Job>, record: BackupRecord, resumed: bool) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            // A panic fails the job like an error: its claim on the volume, and the hold it
            // puts on GC, end with it.
            let run = upload::run(&this, &job, record.clone(), resumed);
            let outcome = std::panic::AssertUnwindSafe(run)
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| Err(BackupError::Failed(panic_message(panic.as_ref()))));
            let mut cleanup = String::new();
            if matches!(&outcome, Err(e) if !matches!(e, BackupError::Cancelled(_))) {
                // The record goes before the snapshot: a crash or shutdown during the cleanup
                // must not resume the job, which (its record may still say the snapshot was
                // not taken) would take a new snapshot under the backup's name.
                this.files.remove(&record.job_id);
                // A failed or cancelled backup's snapshot is no base for anything.
                let snapshot = &record.snapshot;
                let released = match this.registry.entry(&record.volume) {
                    Some(entry) => entry.delete_snapshot(snapshot).await.map(|_| ()),
                    None => Ok(()),
                };
                cleanup = match released {
                    Ok(()) | Err(StorageError::SnapshotNotFound { .. }) => {
                        format!("snapshot {snapshot} released")
                    }
                    Err(e) => format!(
                        "snapshot {snapshot} could not be released ({e}); the volume's next backup releases it"
                    ),
                };
                cleanup.push_str("; chunks it stored go at the next backup gc");
            }
            this.finish_job(&job, &record.job_id, &record.volume, outcome, &cleanup);
            // Backups still running here would defer it again; the last one to end runs it.
            if this.running_backup_count() == 0 {
                this.run_owed_gc().await;
            }
        });
    }

    /// Records how a backup or restore job ended. `cleanup`: what was undone if it was
    /// cancelled, for `job.show`.
    fn finish_job(
        &self,
        job: &Job,
        job_id: &str,
        volume: &str,
        outcome: Result<Option<serde_json::Value>, BackupError>,
        cleanup: &str,
    ) {
        match outcome {
            Err(BackupError::CancelledByRequest) => {
                tracing::info!(job = job_id, volume, cleanup, "job cancelled");
                self.files.remove(job_id);
                job.finish_cancelled(cleanup);
            }
            Err(BackupError::Cancelled(why)) => {
                // Shutdown: the job file stays so the job resumes at the next start.
                tracing::info!(job = job_id, reason = %why, "job interrupted; it resumes at the next start");
                job.finish(Err(format!(
                    "interrupted: {why}; resumes at the next start"
                )));
            }
            Err(e) => {
                tracing::error!(job = job_id, volume, error = %e, "job failed");
                self.files.remove(job_id);
                job.finish(Err(e.to_string()));
            }
            Ok(result) => {
                tracing::info!(job = job_id, volume, "job succeeded");
                self.files.remove(job_id);
                job.finish(Ok(result));
            }
        }
        self.unclaim(volume);
        self.count_finished(job);
    }

    fn count_finished(&self, job: &Job) {
        let info = job.info();
        let kind = serde_json::to_value(info.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let outcome = match info.state {
            job::JobState::Succeeded => "succeeded",
            job::JobState::Cancelled => "cancelled",
            _ => "failed",
        };
        self.metrics
            .backup()
            .jobs_finished
            .get_or_create(&OutcomeLabels {
                kind,
                outcome: outcome.to_owned(),
            })
            .inc();
        self.publish_metrics();
    }

    pub async fn list(&self, volume: Option<&str>) -> Result<Vec<BackupInfo>, BackupError> {
        let mut all = self.catalog.list().await?;
        if let Some(volume) = volume {
            all.retain(|b| b.volume == volume);
        }
        Ok(all)
    }

    /// The manifests the last `list` found in the store but could not read (id, why).
    pub fn unreadable_manifests(&self) -> Vec<(String, String)> {
        self.catalog.unreadable()
    }

    /// A backup's summary; a backup still being taken shows as "running" with its job.
    pub async fn show(&self, backup_id: &str) -> Result<BackupInfo, BackupError> {
        manifest::validate_backup_id(backup_id)?;
        let job = self.job_for_backup(backup_id);
        if let Some(job) = job.as_ref().filter(|j| !j.state().is_finished()) {
            let info = job.info();
            return Ok(BackupInfo {
                id: backup_id.to_owned(),
                state: "running",
                volume: info.volume.clone(),
                volume_uuid: String::new(),
                size_bytes: 0,
                created_unix_secs: info.started_unix_secs,
                snapshot: backup_snapshot_name(backup_id),
                snapshot_created_unix_secs: info.started_unix_secs,
                parent: None,
                incremental: false,
                group_id: None,
                policy: None,
                chunks: 0,
                data_chunks: 0,
                zero_chunks: 0,
                new_chunks: 0,
                new_stored_bytes: 0,
                delta_chunks: 0,
                read_bytes: 0,
                duration_ms: 0,
                job: Some(info),
            });
        }
        let mut info = self.catalog.get(backup_id).await?;
        info.job = job.map(|j| j.info());
        Ok(info)
    }

    /// Deletes a backup's manifest and the local snapshot it kept as an incremental base, then
    /// collects the chunks nothing references any more.
    /// A member of a recorded server backup set is refused: the set would name a backup that
    /// is gone, and restoring it would restore part of the server.
    pub async fn delete(self: &Arc<Self>, backup_id: &str) -> Result<GcReport, BackupError> {
        match self.catalog.get(backup_id).await {
            Ok(info) => {
                if let Some(set_id) = &info.group_id {
                    // Its members' manifests checked, the set's record may land any moment.
                    if self.running_sets.is_recording(set_id) {
                        return Err(BackupError::BackupInUse {
                            backup_id: backup_id.to_owned(),
                            doing: "a member of a server backup still being recorded: try again once that has ended",
                        });
                    }
                    match self.get_set(set_id).await {
                        Ok(_) => {
                            return Err(BackupError::InvalidArgument(format!(
                                "backup {backup_id} is a member of server backup {set_id}: delete that (backup-set delete {set_id})"
                            )))
                        }
                        Err(BackupError::SetNotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            // Unknown whether it belongs to a set: not deleted on a guess.
            Err(e) if e.is_transient() => return Err(e),
            // Missing or damaged: the delete says so, or removes the damaged manifest.
            Err(_) => {}
        }
        self.delete_without_gc(backup_id).await?;
        Ok(self.gc_after_delete().await)
    }

    /// The collection after a delete. The delete stands whatever happens to it, so a failure
    /// (a manifest it cannot read, the store down) is reported in the result, not as the
    /// delete's error; a later delete or `backup gc` collects what it left.
    pub(crate) async fn gc_after_delete(self: &Arc<Self>) -> GcReport {
        match self.gc().await {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!(error = %e, "garbage collection after a delete failed");
                GcReport {
                    failed: Some(e.to_string()),
                    ..GcReport::default()
                }
            }
        }
    }

    /// Whether volume `name` of this daemon is the one with `uuid` (backups name both).
    pub(crate) fn is_local_volume(&self, name: &str, uuid: &str) -> bool {
        self.registry
            .entry(name)
            .is_some_and(|entry| entry.volume().identity().uuid == uuid)
    }

    /// The shared store lock a restore or verify job holds while it reads (see `restore::run`).
    /// A store that refuses the lock's write for good (read-only credentials) is read without
    /// one, as before locks were taken for reading: a warning says what that risks.
    pub(crate) async fn lock_for_reading(
        &self,
        job: &Arc<Job>,
        owner: &str,
    ) -> Result<Option<locks::HeldLock>, BackupError> {
        let locked = retry::with_retry(job, &self.shutdown, "locking the store", || {
            locks::acquire_shared(&self.store, owner)
        })
        .await;
        match locked {
            Ok(lock) => Ok(Some(lock)),
            // Transient store errors were retried; refused access (credentials, a read-only
            // local store) stays refused.
            Err(e) if e.is_refused_access() => {
                tracing::warn!(job = %job.id, error = %e, "cannot write a lock into the backup store (read-only?): reading without one; a GC on another daemon sharing the store could delete what this job reads");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Refused while a restore or verify job of this daemon reads the backup (see `holds`).
    pub(crate) async fn delete_without_gc(&self, backup_id: &str) -> Result<(), BackupError> {
        let _deleting = self.holds.delete(backup_id)?;
        let manifest = match self.store.get_manifest(backup_id).await {
            Ok(manifest) => Some(manifest),
            // A damaged manifest can still be deleted (it would otherwise block every GC).
            Err(BackupError::Manifest(e)) => {
                tracing::warn!(backup = backup_id, error = %e, "deleting a damaged manifest");
                None
            }
            Err(e) => return Err(e),
        };
        self.store.delete_manifest(backup_id).await?;
        self.catalog.forget(backup_id);
        let Some(manifest) = manifest else {
            return Ok(());
        };
        tracing::info!(backup = backup_id, volume = %manifest.volume_name, "deleted backup");
        for entry in self.registry.entries() {
            if entry.volume().identity().uuid == manifest.volume_uuid
                && entry
                    .manifest()
                    .snapshot(&manifest.source_snapshot)
                    .is_some()
            {
                if let Err(e) = entry.delete_snapshot(&manifest.source_snapshot).await {
                    tracing::warn!(snapshot = %manifest.source_snapshot, error = %e, "keeping the deleted backup's snapshot");
                }
            }
        }
        Ok(())
    }

    /// Deletes the chunks no manifest references, unless a backup is running anywhere on the
    /// store. Then it is deferred: re-run here when this daemon's backups end, and tried again
    /// on a timer, since the backups holding it back may be another daemon's (which never end
    /// here) or this daemon's may follow each other without a gap.
    pub async fn gc(self: &Arc<Self>) -> Result<GcReport, BackupError> {
        let _one_at_a_time = self.gc_serial.lock().await;
        let report = self.gc_locked().await?;
        if report.deferred {
            self.retry_gc_later();
        }
        Ok(report)
    }

    /// A GC if one is still owed once any other of this daemon's has ended (several jobs
    /// ending together, and the retry timer, ask for one each).
    async fn gc_if_owed(self: &Arc<Self>) -> Result<(), BackupError> {
        let _one_at_a_time = self.gc_serial.lock().await;
        if !self.gc_pending.load(Ordering::SeqCst) {
            return Ok(());
        }
        if self.gc_locked().await?.deferred {
            self.retry_gc_later();
        }
        Ok(())
    }

    /// [`Backups::gc_if_owed`] when a GC is owed, its failure logged (the timer tries again).
    async fn run_owed_gc(self: &Arc<Self>) {
        if !self.gc_pending.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.gc_if_owed().await {
            tracing::warn!(error = %e, "deferred garbage collection failed");
        }
    }

    /// One GC, under `gc_serial`; records whether one is still owed.
    async fn gc_locked(self: &Arc<Self>) -> Result<GcReport, BackupError> {
        if self.shutdown.is_cancelled() {
            return Err(BackupError::Cancelled("the daemon is shutting down".into()));
        }
        // This daemon's own backups first: the store's locks alone would let a GC through
        // once a running backup's lock looked stale (its heartbeats failed while the store
        // was unreachable), and it would delete what that backup uploaded and its manifest
        // does not name yet.
        let running = self.running_backup_count();
        let report = if running > 0 {
            let reason = format!("{running} backup(s) of this daemon are running");
            tracing::info!(%reason, "garbage collection deferred");
            GcReport {
                deferred: true,
                reason: Some(reason),
                ..GcReport::default()
            }
        } else {
            gc::run(self).await?
        };
        // A sweep that ran began after every deferral recorded so far: it answers them all.
        self.gc_pending.store(report.deferred, Ordering::SeqCst);
        Ok(report)
    }

    /// Tries a deferred GC again, after `GC_RETRY_FIRST`, then at doubling intervals up to
    /// `GC_RETRY_MAX`, until one runs or shutdown. One such task at a time.
    fn retry_gc_later(self: &Arc<Self>) {
        if self.gc_retrying.swap(true, Ordering::SeqCst) {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut wait = GC_RETRY_FIRST;
            while this.gc_pending.load(Ordering::SeqCst) {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = this.shutdown.cancelled() => break,
                }
                wait = (wait * 2).min(GC_RETRY_MAX);
                this.run_owed_gc().await;
            }
            this.gc_retrying.store(false, Ordering::SeqCst);
            // A GC deferred between the last look and the flag's reset starts its own task.
            if this.gc_pending.load(Ordering::SeqCst) && !this.shutdown.is_cancelled() {
                this.retry_gc_later();
            }
        });
    }

    /// Starts a job that downloads every chunk of a backup and checks it.
    pub async fn verify(self: &Arc<Self>, backup_id: &str) -> Result<JobInfo, BackupError> {
        let reading = self.holds.read(backup_id)?;
        let manifest = self.store.get_manifest(backup_id).await?;
        let job = self.register(
            &new_job_id(),
            JobKind::Verify,
            &manifest.volume_name,
            backup_id,
        );
        let this = Arc::clone(self);
        let info = job.info();
        tokio::spawn(async move {
            let outcome = verify::run(&this, &job, &manifest).await;
            // Released before the job shows as ended: a delete asked for then goes through.
            drop(reading);
            match outcome {
                Ok(result) => job.finish(Ok(Some(result))),
                Err(BackupError::CancelledByRequest) => {
                    job.finish_cancelled("the backup was not changed");
                }
                Err(e) => job.finish(Err(e.to_string())),
            }
            this.count_finished(&job);
            // A GC the job's store lock deferred runs now, not at the retry timer's next turn.
            this.run_owed_gc().await;
        });
        Ok(info)
    }

    /// Restores a backup into an existing volume of the same size. Refused while clients are
    /// connected unless `force`, which disconnects them; nobody can connect until it is done.
    pub async fn restore(
        self: &Arc<Self>,
        backup_id: &str,
        to: &str,
        force: bool,
    ) -> Result<JobInfo, BackupError> {
        // Until the job holds it (see `spawn_restore`): no delete meanwhile.
        let _reading = self.holds.read(backup_id)?;
        self.take_for_restore(backup_id, to, force).await?;
        self.start_restore(backup_id, to, false, new_job_id()).await
    }

    /// Makes volume `to` ready for an in-place restore of `backup_id`: the sizes match, no job
    /// has it (it is claimed), and it is closed with no client attached (disconnected with
    /// `force`). Undone on failure. [`Self::release_for_restore`] undoes it for a restore that
    /// then does not start.
    pub(crate) async fn take_for_restore(
        &self,
        backup_id: &str,
        to: &str,
        force: bool,
    ) -> Result<(), BackupError> {
        let manifest = self.store.get_manifest(backup_id).await?;
        let entry = self
            .registry
            .entry(to)
            .ok_or_else(|| StorageError::NotFound(to.to_owned()))?;
        let size_bytes = entry.volume().size_bytes();
        if size_bytes != manifest.size_bytes {
            return Err(BackupError::SizeMismatch {
                volume: to.to_owned(),
                size_bytes,
                backup_id: backup_id.to_owned(),
                backup_size_bytes: manifest.size_bytes,
            });
        }
        if !self.claim(to) {
            return Err(BackupError::JobRunning(to.to_owned()));
        }
        let attachments = Arc::clone(entry.volume().attachments());
        let closed = attachments
            .close(force, Closure::Restore)
            .map_err(|refused| match refused {
                CloseRefused::Busy(connections) => StorageError::Busy {
                    name: to.to_owned(),
                    connections,
                },
                CloseRefused::AlreadyClosed(closure) => entry.closed_error(closure),
            });
        let disconnected = match closed {
            Ok(n) => n,
            Err(e) => {
                self.unclaim(to);
                return Err(e.into());
            }
        };
        if disconnected > 0 && !attachments.wait_detached(RESTORE_DRAIN_TIMEOUT).await {
            // A connection still attached could write through the page cache over what the
            // restore writes with O_DIRECT: nothing is restored then.
            attachments.reopen(Closure::Restore);
            self.unclaim(to);
            return Err(StorageError::Busy {
                name: to.to_owned(),
                connections: attachments.count(),
            }
            .into());
        }
        Ok(())
    }

    /// Undoes [`Self::take_for_restore`].
    pub(crate) fn release_for_restore(&self, to: &str) {
        self.reopen(to);
        self.unclaim(to);
    }

    /// Starts the in-place restore of `backup_id` into `to`, which
    /// [`Self::take_for_restore`] made ready.
    pub(crate) async fn start_taken_restore(
        self: &Arc<Self>,
        backup_id: &str,
        to: &str,
    ) -> Result<JobInfo, BackupError> {
        self.start_restore(backup_id, to, false, new_job_id()).await
    }

    /// Creates volume `name` with a backup's size and restores the backup into it; the
    /// volume accepts clients once the restore has finished.
    pub async fn create_volume(
        self: &Arc<Self>,
        name: &str,
        backup_id: &str,
    ) -> Result<JobInfo, BackupError> {
        self.create_volume_in(name, backup_id, None).await
    }

    /// [`Backups::create_volume`]; `set`: the server restore this member volume is made for.
    /// A name a server restore holds is refused to anyone else.
    pub(crate) async fn create_volume_in(
        self: &Arc<Self>,
        name: &str,
        backup_id: &str,
        set: Option<&Arc<set_restore::SetRestore>>,
    ) -> Result<JobInfo, BackupError> {
        // Until the job holds it (see `spawn_restore`): no delete meanwhile.
        let _reading = self.holds.read(backup_id)?;
        let manifest = self.store.get_manifest(backup_id).await?;
        let held = self.set_restore_holds.restore_of(name);
        let ours = match (&held, set) {
            (None, _) => true,
            (Some(held), Some(set)) => Arc::ptr_eq(held, set),
            (Some(_), None) => false,
        };
        if !ours || !self.claim(name) {
            return Err(BackupError::JobRunning(name.to_owned()));
        }
        let registry = Arc::clone(&self.registry);
        let (volume_name, size_bytes) = (name.to_owned(), manifest.size_bytes);
        // Marked from birth: a crash before the job is recorded leaves a volume that refuses
        // clients, not an empty one that looks whole.
        let job_id = new_job_id();
        let mark = RestoreMark {
            backup_id: backup_id.to_owned(),
            job_id: job_id.clone(),
            started_unix_secs: now_unix_secs(),
            made_for_restore: true,
            set_id: self
                .set_restore_holds
                .restore_of(name)
                .map(|s| s.set_id.clone()),
        };
        let created = tokio::task::spawn_blocking(move || {
            registry.create_marked(&volume_name, size_bytes, &mark)
        })
        .await
        .map_err(|e| BackupError::Failed(format!("a worker thread failed: {e}")))
        .and_then(|r| r.map_err(BackupError::from));
        let (closed, uuid) = match created {
            Ok(volume) => (
                volume.attachments().close(true, Closure::Restore),
                volume.identity().uuid.clone(),
            ),
            Err(e) => {
                self.unclaim(name);
                return Err(e);
            }
        };
        let started = match closed {
            Ok(_) => self.start_restore(backup_id, name, true, job_id).await,
            // A delete or shrink of the new volume got there first: it is not ours to fill.
            Err(CloseRefused::AlreadyClosed(closure)) => Err(match self.registry.entry(name) {
                Some(entry) => entry.closed_error(closure).into(),
                None => StorageError::NotFound(name.to_owned()).into(),
            }),
            // Not refused when forced; mapped all the same.
            Err(CloseRefused::Busy(connections)) => Err(StorageError::Busy {
                name: name.to_owned(),
                connections,
            }
            .into()),
        };
        if started.is_err() {
            // No job will fill it: an empty volume of that name would pass for the restore.
            // Only that very volume: a delete and a create of the name may have come between.
            self.discard_volume(name, Some(&uuid)).await;
            self.unclaim(name);
        }
        started
    }

    /// Records and starts a restore into `volume`, which the caller has closed to clients.
    /// An existing volume is marked as holding an incomplete restore first (see
    /// `storage::restore_mark`): until the job completes, and for good if it does not, the
    /// volume refuses clients.
    async fn start_restore(
        self: &Arc<Self>,
        backup_id: &str,
        volume: &str,
        created_volume: bool,
        job_id: String,
    ) -> Result<JobInfo, BackupError> {
        let record = RestoreRecord {
            job_id,
            backup_id: backup_id.to_owned(),
            volume: volume.to_owned(),
            created_volume,
        };
        // The record before the mark: a crash between the two leaves a record whose volume
        // lacks its mark, which `resume` drops, the volume untouched. (The other way round, it
        // left a volume refusing clients with no job to complete or clear it.)
        if let Err(e) = self.files.save(&JobRecord::Restore(record.clone())) {
            // A volume made for this restore is the caller's to remove.
            if !created_volume {
                self.reopen(volume);
                self.unclaim(volume);
            }
            return Err(e);
        }
        // Whether the volume was whole before: only then may a restore that never started
        // take its mark away again.
        let mut was_whole = true;
        let mark = RestoreMark {
            backup_id: backup_id.to_owned(),
            job_id: record.job_id.clone(),
            started_unix_secs: now_unix_secs(),
            made_for_restore: created_volume,
            set_id: self
                .set_restore_holds
                .restore_of(volume)
                .map(|s| s.set_id.clone()),
        };
        let marked = match self.registry.entry(volume) {
            Some(entry) => {
                was_whole = entry.volume().restore_mark().is_none();
                entry.mark_restore(mark).await
            }
            None => Err(StorageError::NotFound(volume.to_owned())),
        };
        if let Err(e) = marked {
            self.files.remove(&record.job_id);
            // A volume made for this restore is the caller's to remove.
            if !created_volume {
                self.reopen(volume);
                self.unclaim(volume);
            }
            return Err(e.into());
        }
        let job = self.register(&record.job_id, JobKind::Restore, volume, backup_id);
        let info = job.info();
        self.spawn_restore(job, record, was_whole);
        Ok(info)
    }

    /// Opens `volume` to clients again after a restore, unless a server restore holds it
    /// until it has decided (see `set_restore`).
    fn reopen(&self, volume: &str) {
        if self.set_restore_holds.holds(volume) {
            return;
        }
        if let Some(entry) = self.registry.entry(volume) {
            entry.volume().attachments().reopen(Closure::Restore);
        }
    }

    /// Removes a volume made for a restore that will not complete. Under its admin lock, as
    /// `volume.delete`: a snapshot delete or resize someone started on it finishes first.
    /// With `uuid`, only the volume of that identity: another of the same name is left alone.
    async fn discard_volume(&self, volume: &str, uuid: Option<&str>) -> bool {
        let Some(entry) = self.registry.entry(volume) else {
            return true;
        };
        if uuid.is_some_and(|uuid| entry.volume().identity().uuid != uuid) {
            tracing::info!(
                volume,
                "the volume made for a failed restore was replaced meanwhile: the new one stays"
            );
            return true;
        }
        let Ok(_admin) = entry.lock_admin().await else {
            // Deleted meanwhile.
            return true;
        };
        let registry = Arc::clone(&self.registry);
        let name = volume.to_owned();
        let removed = tokio::task::spawn_blocking(move || {
            registry.remove(&name).and_then(|hidden| {
                std::fs::remove_dir_all(&hidden).map_err(|e| StorageError::fs("remove", &hidden, e))
            })
        })
        .await;
        match removed {
            Ok(Ok(())) => {
                tracing::info!(volume, "removed the volume made for a failed restore");
                true
            }
            Ok(Err(error)) => {
                tracing::warn!(volume, %error, "removing the volume made for a failed restore failed");
                false
            }
            Err(error) => {
                tracing::warn!(volume, %error, "removing the volume made for a failed restore failed");
                false
            }
        }
    }

    /// Runs a restore job. `was_whole`: the target held whole data when this job marked it
    /// (false for a job resumed after a restart, which may have written before): a job that
    /// ends before writing anything then takes its mark away again.
    fn spawn_restore(self: &Arc<Self>, job: Arc<Job>, record: RestoreRecord, was_whole: bool) {
        // Cannot be refused: the caller holds the backup for reading, or the daemon is starting
        // (no delete yet).
        let reading = self.holds.read(&record.backup_id).inspect_err(|e| {
            tracing::warn!(job = %record.job_id, error = %e, "a restore runs without holding its backup");
        });
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = restore::run(&this, &job, &record).await;
            if matches!(&outcome, Err(BackupError::CancelledByRequest)) {
                // Gone before the cleanup: a shutdown during it must not resume the job.
                this.files.remove(&record.job_id);
            }
            let mut cleanup = String::new();
            let outcome = match outcome {
                Ok(()) => this.clear_mark(&record.volume).await.map_err(|e| {
                    BackupError::Failed(format!(
                        "the restore completed but its mark on the volume could not be removed: {e}"
                    ))
                }),
                // Shutdown: the job resumes at the next start, the volume stays closed.
                Err(e @ BackupError::Cancelled(_)) => Err(e),
                Err(e) => {
                    cleanup = this.undo_restore(&job, &record, was_whole).await;
                    match e {
                        BackupError::CancelledByRequest => Err(e),
                        other => Err(BackupError::Failed(format!("{other}; {cleanup}"))),
                    }
                }
            };
            // A server restore's member ends with its set's decision (see `set_restore`).
            let set = this.set_restore_holds.restore_of(&record.volume);
            let outcome = match (set, outcome) {
                (Some(set), outcome) if !matches!(&outcome, Err(BackupError::Cancelled(_))) => {
                    match (
                        set.member_done(&record.volume, &this.shutdown).await,
                        outcome,
                    ) {
                        (Some(Err(why)), Ok(())) => Err(BackupError::Failed(format!(
                            "the volume was restored, then the {why}"
                        ))),
                        (Some(Err(why)), Err(BackupError::Failed(e))) => {
                            Err(BackupError::Failed(format!("{e}; then the {why}")))
                        }
                        (_, outcome) => outcome,
                    }
                }
                (_, outcome) => outcome,
            };
            if !matches!(&outcome, Err(BackupError::Cancelled(_))) {
                // A volume still marked refuses clients anyway; a removed one is not found.
                this.reopen(&record.volume);
            }
            // Released before the job shows as ended: a delete asked for then goes through.
            drop(reading);
            this.finish_job(
                &job,
                &record.job_id,
                &record.volume,
                outcome.map(|()| None),
                &cleanup,
            );
            // A GC the job's store lock deferred runs now, not at the retry timer's next turn.
            this.run_owed_gc().await;
        });
    }

    /// What is left of a restore that failed or was cancelled, said for its job: a volume made
    /// for it goes (half a disk is worse than none); an existing one keeps its mark unless
    /// nothing was written to it.
    async fn undo_restore(&self, job: &Job, record: &RestoreRecord, was_whole: bool) -> String {
        let volume = &record.volume;
        let ours = self.registry.entry(volume).is_some_and(|entry| {
            (entry.volume().restore_mark()).is_some_and(|mark| mark.job_id == record.job_id)
        });
        if !ours {
            // Deleted, or deleted and made again under the name, while the job waited.
            return format!(
                "volume {volume:?} is no longer the one this restore marked: left alone"
            );
        }
        if record.created_volume {
            return if self.discard_volume(volume, None).await {
                format!("volume {volume:?} made for it was removed")
            } else {
                format!(
                    "volume {volume:?} made for it could not be removed: it holds part of the backup's data and refuses clients"
                )
            };
        }
        // A server restore's member keeps its mark: the restore decides for all its members
        // by their marks, and rolls each back (see `set_restore`).
        if was_whole && !job.touched() && !self.set_restore_holds.holds(volume) {
            match self.clear_mark(volume).await {
                Ok(()) => return format!("volume {volume:?} was not written to and is unchanged"),
                Err(e) => {
                    tracing::warn!(volume, error = %e, "cannot remove the restore mark of a volume the restore did not write to")
                }
            }
        }
        format!(
            "volume {volume:?} holds part of backup {}'s data and refuses clients until a restore into it succeeds",
            record.backup_id
        )
    }

    /// Removes a restore's mark from `volume` (see `storage::restore_mark`).
    async fn clear_mark(&self, volume: &str) -> Result<(), StorageError> {
        match self.registry.entry(volume) {
            Some(entry) => entry.clear_restore_mark().await,
            None => Ok(()),
        }
    }
}

/// The name of the snapshot backup `backup_id` takes of its volume.
pub(crate) fn backup_snapshot_name(backup_id: &str) -> String {
    format!("{BACKUP_SNAPSHOT_PREFIX}{backup_id}")
}

/// The record of a new backup of `entry` (its snapshot not taken yet).
pub(crate) fn new_record(
    entry: &VolumeEntry,
    volume: &str,
    full: bool,
    group_id: Option<String>,
    policy: Option<String>,
) -> BackupRecord {
    let backup_id = manifest::new_backup_id(since_epoch());
    BackupRecord {
        job_id: new_job_id(),
        snapshot: backup_snapshot_name(&backup_id),
        backup_id,
        volume: volume.to_owned(),
        volume_uuid: entry.volume().identity().uuid.clone(),
        snapshot_taken: false,
        full,
        group_id,
        policy,
        started_unix_secs: now_unix_secs(),
        done: Vec::new(),
    }
}

/// Backups of this daemon reading their snapshots at once; the others wait their turn. Each
/// holds its whole chunks in flight (`upload_concurrency` of them, 4 MiB each, and their encoded
/// copies); four keep a two-core machine's disk and cores busy.
const MAX_BACKUPS_READING: usize = 4;

/// What a panic carried, for a job's error.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    format!("the job panicked: {what}")
}

#[cfg(test)]
mod slot_tests {
    use std::time::Duration;

    use super::*;
    use crate::backup::sets::tests::backups_with;
    use crate::io::{EngineConfig, EngineKind, IoEngine};

    /// At most `MAX_BACKUPS_READING` backups read at once; one waiting for its turn ends when
    /// it is cancelled, and the next gets the slot a finished one gives back.
    #[tokio::test]
    async fn backups_read_a_few_at_a_time_and_a_waiting_one_can_be_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let (_registry, backups) = backups_with(dir.path(), engine);
        let job = |n: usize| {
            Job::new(
                format!("j-{n}"),
                JobKind::Backup,
                "v".into(),
                "b".into(),
                &backups.shutdown,
            )
        };
        let jobs: Vec<Job> = (0..MAX_BACKUPS_READING + 2).map(job).collect();
        let mut reading = Vec::new();
        for job in &jobs[..MAX_BACKUPS_READING] {
            reading.push(backups.reading_slot(job).await.unwrap());
        }
        let waiting = &jobs[MAX_BACKUPS_READING];
        let waited =
            tokio::time::timeout(Duration::from_millis(50), backups.reading_slot(waiting)).await;
        assert!(waited.is_err(), "a fifth backup read at once");
        let (cancelled, ()) = tokio::join!(backups.reading_slot(waiting), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            waiting.cancel().unwrap();
        });
        assert!(matches!(cancelled, Err(BackupError::CancelledByRequest)));
        let next = &jobs[MAX_BACKUPS_READING + 1];
        let (slot, ()) = tokio::join!(backups.reading_slot(next), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            reading.pop();
        });
        let _slot = slot.expect("the slot a finished backup gave back");
    }
}
