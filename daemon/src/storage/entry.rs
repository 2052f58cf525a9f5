//! One volume on disk with everything that hangs off it: its folder, its manifest (the layer
//! tree and the snapshots), its open layers, the live `Volume` and the read-only snapshot
//! views. Snapshot operations live in `snapshots.rs`; this file loads, resizes and keeps the
//! in-memory state in step with the manifest.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::StorageError;
use crate::io::IoEngine;
use crate::storage::attachments::Closure;
use crate::storage::buffers::BufferPool;
use crate::storage::clean_stop;
use crate::storage::epoch::Epoch;
use crate::storage::layer::chain::Chain;
use crate::storage::layer::{self, blocks_for, BlockState, Layer, BLOCK_BYTES};
use crate::storage::manifest::{
    self, LayerRecord, ManifestSource, VolumeManifest, LEGACY_DATA_FILE,
};
use crate::storage::name::validate_volume_name;
use crate::storage::restore_mark::{RestoreMark, RESTORE_MARK_FILE};
use crate::storage::spare::SpareHead;
use crate::storage::volume::{SnapshotBase, Volume, VolumeIdentity};

pub struct VolumeEntry {
    pub(crate) dir: PathBuf,
    pub(crate) engine: IoEngine,
    pub(crate) buffers: Arc<BufferPool>,
    pub(crate) volume: Arc<Volume>,
    pub(crate) state: Mutex<EntryState>,
    /// Serialises the operations that change the tree (snapshot, rollback, resize, merges).
    pub(crate) admin: tokio::sync::Mutex<()>,
    /// Snapshot name -> readers that need it kept (see `diff.rs`).
    pub(crate) pins: Mutex<HashMap<String, usize>>,
    /// The next head, made ahead of the freeze that takes it (see `spare.rs`).
    pub(crate) spare_head: SpareHead,
    /// Set when the volume is deleted (under `admin`): its directory name may already belong
    /// to a new volume of the same name, so nothing may change the tree or write there again.
    pub(crate) removed: std::sync::atomic::AtomicBool,
}

pub(crate) struct EntryState {
    pub manifest: VolumeManifest,
    pub layers: HashMap<String, Arc<Layer>>,
    /// Snapshot name -> its read-only export.
    pub views: BTreeMap<String, Arc<Volume>>,
    /// Snapshot name -> its incarnation (see `SnapshotBase`), for as long as the name stays.
    pub incarnations: HashMap<String, u64>,
}

/// Numbers snapshot incarnations in this process; connections never outlive it.
static NEXT_INCARNATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub fn now_unix_secs() -> u64 {
    since_epoch().as_secs()
}

/// Now, as the time since the unix epoch (zero for a clock set before it).
pub fn since_epoch() -> std::time::Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl VolumeEntry {
    /// Loads the volume in `dir`: migrates a format-1 volume, opens its layers, removes layer
    /// files no manifest entry names (left by a crash between creating them and recording
    /// them). A merge recorded as started is finished by [`VolumeEntry::finish_merge`].
    pub fn load(
        dir: &Path,
        engine: IoEngine,
        buffers: Arc<BufferPool>,
    ) -> Result<VolumeEntry, StorageError> {
        let (mut manifest, source) = VolumeManifest::load_or_previous(dir)?;
        validate_volume_name(&manifest.name)?;
        let stopped_cleanly = clean_stop::take(dir);
        if source == ManifestSource::Previous {
            restore_previous(dir, &manifest)?;
        }
        if manifest.is_legacy() {
            manifest = migrate_legacy(dir, manifest)?;
        }
        // A stale `.prev` that cannot be written now (a full disk) does not keep the volume
        // from loading: `volume.json` is whole. FLUSH fails until the repair writes it (the
        // next in-place manifest relies on `.prev` as its fallback).
        let previous_stale = match manifest.store_previous_if_stale(dir) {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(volume = %manifest.name, error = %e, "cannot write the volume's manifest copy (.prev); serving it, FLUSH fails until the copy is written");
                true
            }
        };
        remove_orphans(dir, &manifest);
        let mut layers = HashMap::new();
        for record in &manifest.layers {
            let layer = if is_lost_head(dir, &manifest, &record.id) {
                // The manifest that named this head was in place but not yet durable when the
                // machine went down (snapshot create answers before its fsyncs), and the files'
                // names did not reach the disk. No FLUSH can have returned since the head was
                // started (FLUSH waits for that manifest to be durable), so it held nothing a
                // client was promised: start it again empty.
                tracing::warn!(volume = %manifest.name, layer = %record.id, "the head layer's files are missing; starting it empty");
                for path in [
                    layer::data_path(dir, &record.id),
                    layer::map_path(dir, &record.id),
                ] {
                    let _ = std::fs::remove_file(path);
                }
                let layer = Layer::create(dir, &record.id, record.size_bytes)?;
                layer.sync_created()?;
                manifest::sync_dir(dir)?;
                layer
            } else {
                Layer::open(dir, &record.id, record.size_bytes)?
            };
            layers.insert(record.id.clone(), Arc::new(layer));
        }
        if !stopped_cleanly {
            punch_unmapped_head(&manifest, &layers);
        }
        let chain = chain_of(&manifest, &layers, &manifest.head)?;
        let volume = Volume::new(
            manifest.name.clone(),
            manifest.size_bytes,
            chain,
            engine.clone(),
            Arc::clone(&buffers),
        )
        .with_identity(VolumeIdentity {
            uuid: manifest.uuid.clone(),
            created_unix_secs: manifest.created_unix_secs,
        });
        if let Some(mark) = RestoreMark::load(dir) {
            volume.set_restore_mark(Some(mark));
        }
        let entry = VolumeEntry {
            dir: dir.to_owned(),
            engine,
            buffers,
            volume: Arc::new(volume),
            state: Mutex::new(EntryState {
                manifest,
                layers,
                views: BTreeMap::new(),
                incarnations: HashMap::new(),
            }),
            admin: tokio::sync::Mutex::new(()),
            pins: Mutex::new(HashMap::new()),
            spare_head: SpareHead::default(),
            removed: std::sync::atomic::AtomicBool::new(false),
        };
        {
            let mut state = entry.lock();
            entry.refresh(&mut state)?;
        }
        if let (Some(writer), true) = (entry.volume.writer(), previous_stale) {
            writer
                .commit_failed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if entry.volume.writer().is_some() {
            let size_bytes = entry.manifest().size_bytes;
            entry.spare_head.replenish(&entry.dir, size_bytes);
        }
        Ok(entry)
    }

    /// [`VolumeEntry::load`], shared, with the manifest repair FLUSH runs after a failed
    /// manifest write installed (see `Writer::repair`).
    pub fn load_shared(
        dir: &Path,
        engine: IoEngine,
        buffers: Arc<BufferPool>,
    ) -> Result<Arc<VolumeEntry>, StorageError> {
        let entry = Arc::new(VolumeEntry::load(dir, engine, buffers)?);
        if let Some(writer) = entry.volume.writer() {
            let weak = Arc::downgrade(&entry);
            let _ = writer.repair.set(Box::new(move || {
                let weak = weak.clone();
                Box::pin(async move {
                    match weak.upgrade() {
                        Some(entry) => entry.repair_manifest().await,
                        None => Ok(()),
                    }
                })
            }));
        }
        Ok(entry)
    }

    /// Writes the in-memory manifest durably again after a manifest write failed (a freeze
    /// could not put its manifest in place, a background persist or a tree change's write
    /// failed): the volume runs on layers the disk may not record, and FLUSH fails until this
    /// succeeds. Waits a little for the admin lock (another FLUSH repairing, a short tree
    /// change: both leave the manifest written), not behind a long merge.
    pub(crate) async fn repair_manifest(&self) -> Result<(), StorageError> {
        const ADMIN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
        if self.volume.writer().is_none() {
            return Ok(());
        }
        let Ok(_admin) = tokio::time::timeout(ADMIN_WAIT, self.admin.lock()).await else {
            return Ok(());
        };
        self.check_present()?;
        self.repair_manifest_locked().await
    }

    /// [`VolumeEntry::repair_manifest`] for a caller holding `admin` (through `lock_admin`,
    /// which settled the persists: one that failed left nothing pending). Does nothing when no
    /// manifest write failed.
    pub(crate) async fn repair_manifest_locked(&self) -> Result<(), StorageError> {
        let Some(writer) = self.volume.writer() else {
            return Ok(());
        };
        writer.persist.settle().await;
        // Exclusive: no FLUSH reads a generation between the manifest read here and the
        // generation declared durable below (freezes are kept out by the admin lock; FLUSHes
        // hold the lock shared only for a moment).
        let _commit = writer.commit.write().await;
        if !writer.manifest_failed() {
            return Ok(());
        }
        let manifest = self.manifest();
        let dir = self.dir.clone();
        off_runtime("write", self.dir.join(manifest::MANIFEST_FILE), move || {
            manifest.store(&dir)
        })
        .await?;
        writer
            .commit_failed
            .store(false, std::sync::atomic::Ordering::SeqCst);
        writer.persist.all_durable();
        tracing::info!(
            volume = self.name(),
            "the volume manifest is saved again: FLUSH succeeds again"
        );
        Ok(())
    }

    /// Refuses what would capture a volume that holds an incomplete restore (a snapshot, and
    /// so a backup): its data is half one disk, half another. Every snapshot of a marked volume
    /// then predates its mark, so rolling back to one makes it whole.
    pub(crate) fn check_whole(&self) -> Result<(), StorageError> {
        match self.volume.restore_mark() {
            None => Ok(()),
            Some(mark) => Err(StorageError::IncompleteRestore {
                name: self.name().to_owned(),
                backup_id: mark.backup_id,
            }),
        }
    }

    /// Why an operation that must close the volume to clients finds it closed already for
    /// `closure`: a deleted volume is not found; any other operation makes it busy.
    pub fn closed_error(&self, closure: Closure) -> StorageError {
        match closure {
            Closure::Deletion => StorageError::NotFound(self.name().to_owned()),
            closure => StorageError::Closed {
                name: self.name().to_owned(),
                closure,
            },
        }
    }

    /// Marks the volume as holding an incomplete restore, durably, before a restore writes
    /// to it; the handshake refuses clients from then on. Under the admin lock: a volume
    /// deleted meanwhile (its folder name may be a new volume's) is not found.
    pub async fn mark_restore(&self, mark: RestoreMark) -> Result<(), StorageError> {
        let _admin = self.lock_admin().await?;
        let dir = self.dir.clone();
        let stored = mark.clone();
        off_runtime("write", self.dir.join(RESTORE_MARK_FILE), move || {
            stored.store(&dir)
        })
        .await?;
        self.volume.set_restore_mark(Some(mark));
        Ok(())
    }

    /// Removes the mark once the volume holds whole data again (a restore completed, a
    /// rollback); it accepts clients then. No mark is no error.
    pub async fn clear_restore_mark(&self) -> Result<(), StorageError> {
        if self.volume.restore_mark().is_none() {
            return Ok(());
        }
        let _admin = self.lock_admin().await?;
        self.clear_restore_mark_locked().await
    }

    /// [`VolumeEntry::clear_restore_mark`] for a caller already holding the admin lock.
    pub(crate) async fn clear_restore_mark_locked(&self) -> Result<(), StorageError> {
        if self.volume.restore_mark().is_none() {
            return Ok(());
        }
        let dir = self.dir.clone();
        off_runtime("remove", self.dir.join(RESTORE_MARK_FILE), move || {
            RestoreMark::remove(&dir)
        })
        .await?;
        self.volume.set_restore_mark(None);
        Ok(())
    }

    /// Creates a new empty volume's folder content in `dir` (one empty head layer).
    pub fn initialise(dir: &Path, name: &str, size_bytes: u64) -> Result<(), StorageError> {
        let head = layer::new_layer_id()?;
        Layer::create(dir, &head, size_bytes)?;
        VolumeManifest {
            format_version: manifest::FORMAT_VERSION,
            name: name.to_owned(),
            uuid: manifest::new_uuid()?,
            size_bytes,
            created_unix_secs: now_unix_secs(),
            head: head.clone(),
            layers: vec![LayerRecord {
                id: head,
                parent: None,
                size_bytes,
            }],
            snapshots: Vec::new(),
            merge: None,
        }
        .store(dir)
    }

    /// The shutdown's flush of this volume: the chain's, then every layer it keeps (each tried
    /// even when the chain's failed: as much as can be saved is saved).
    pub(crate) async fn flush_for_stop(&self) -> Result<(), StorageError> {
        let flushed = self.volume.flush().await;
        let synced = self.sync_all_layers().await;
        flushed.and(synced)
    }

    /// After [`VolumeEntry::flush_for_stop`] of every volume: holds this one's writes off for
    /// good, syncs its layers again (writes may have landed since) and leaves the clean-stop
    /// marker (see `storage/clean_stop.rs`). No marker when a write is still running after
    /// `gate_wait` (a stuck disk), or when a change failed midway in this run (see
    /// `Writer::unmapped_bytes`): the next load walks the head as after a crash.
    ///
    /// Nothing here waits for `Writer::commit`: a group freeze holds its members' commit locks
    /// while it waits for their gates, and a gate held here is never given back.
    pub(crate) async fn mark_stopped_cleanly(
        &self,
        gate_wait: std::time::Duration,
    ) -> Result<(), StorageError> {
        let Some(writer) = self.volume.writer() else {
            return Ok(());
        };
        let Ok(gate) = tokio::time::timeout(gate_wait, writer.gate.write()).await else {
            tracing::warn!(volume = self.name(), wait_ms = gate_wait.as_millis() as u64, "writes still running after the final flush; the next start checks the head as after a crash");
            return Ok(());
        };
        // Never given back: a write landing after the marker would make it a lie.
        std::mem::forget(gate);
        if writer
            .unmapped_bytes
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            tracing::info!(volume = self.name(), "a change failed midway in this run; the next start checks the head as after a crash");
            return Ok(());
        }
        self.sync_all_layers().await?;
        if self.removed.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        clean_stop::record(&self.dir)
    }

    /// Syncs every layer the volume keeps, those of snapshots off its chain included, trying
    /// them all; returns the first failure. Cheap for layers already clean.
    pub(crate) async fn sync_all_layers(&self) -> Result<(), StorageError> {
        let layers: Vec<Arc<Layer>> = self.lock().layers.values().cloned().collect();
        let mut first_error = None;
        for layer in layers {
            if let Err(e) = layer.sync(&self.engine).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Takes `admin` (the right to change the tree) once no manifest persist is pending: a
    /// snapshot create leaves its fsyncs running, and the other changes write durably in
    /// place (an older persist must not overwrite their `.prev` after), or share layers that
    /// must not become a head again after a crash (a clone).
    /// The admin lock, once nothing else changes the tree; fails when the volume was deleted
    /// while this waited for it.
    pub(crate) async fn lock_admin(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, StorageError> {
        let admin = self.admin.lock().await;
        self.check_present()?;
        if let Some(writer) = self.volume.writer() {
            writer.persist.settle().await;
        }
        Ok(admin)
    }

    /// NotFound once the volume has been deleted. Check it under the admin lock.
    pub(crate) fn check_present(&self) -> Result<(), StorageError> {
        if self.removed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StorageError::NotFound(self.name().to_owned()));
        }
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, EntryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        self.volume.name()
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    pub fn view(&self, snapshot: &str) -> Option<Arc<Volume>> {
        self.lock().views.get(snapshot).cloned()
    }

    pub fn views(&self) -> Vec<Arc<Volume>> {
        self.lock().views.values().cloned().collect()
    }

    pub fn manifest(&self) -> VolumeManifest {
        self.lock().manifest.clone()
    }

    /// Brings the live chain, the snapshot views and the "changed since" bases in line with
    /// the manifest, and drops open layers it no longer names.
    pub(crate) fn refresh(&self, state: &mut EntryState) -> Result<(), StorageError> {
        self.refresh_with(state, false).map(drop)
    }

    /// [`VolumeEntry::refresh`] after a freeze put a new head on top: writes starting from now
    /// on are in a new epoch. Returns the old one, whose writes may still be landing in the
    /// frozen layer.
    pub(crate) fn refresh_new_head(
        &self,
        state: &mut EntryState,
    ) -> Result<Arc<Epoch>, StorageError> {
        self.refresh_with(state, true)
            .map(|old| old.expect("a new head starts a new epoch"))
    }

    fn refresh_with(
        &self,
        state: &mut EntryState,
        new_head: bool,
    ) -> Result<Option<Arc<Epoch>>, StorageError> {
        let manifest = &state.manifest;
        state.layers.retain(|id, _| manifest.layer(id).is_some());
        let chain = chain_of(manifest, &state.layers, &manifest.head)?;
        // Only the head is written in place; the others' mappings would only pin page tables.
        for layer in state.layers.values() {
            if !Arc::ptr_eq(layer, chain.top()) {
                layer.release_mapping();
            }
        }
        let ancestry = manifest.ancestry(&manifest.head).unwrap_or_default();
        state
            .incarnations
            .retain(|name, _| manifest.snapshot(name).is_some());
        for snapshot in &manifest.snapshots {
            state
                .incarnations
                .entry(snapshot.name.clone())
                .or_insert_with(|| {
                    NEXT_INCARNATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                });
        }
        let bases = manifest
            .snapshots
            .iter()
            .filter(|s| ancestry.contains(&s.layer))
            .map(|s| SnapshotBase {
                name: s.name.clone(),
                layer: s.layer.clone(),
                incarnation: state.incarnations[&s.name],
            })
            .collect();
        let old_epoch = if new_head {
            Some(self.volume.set_chain_new_head(chain))
        } else {
            self.volume.set_chain(chain);
            None
        };
        self.volume.set_bases(bases);
        let mut views = BTreeMap::new();
        for snapshot in &manifest.snapshots {
            let chain = chain_of(manifest, &state.layers, &snapshot.layer)?;
            let view = match state.views.remove(&snapshot.name) {
                Some(view) => {
                    view.set_chain(chain);
                    view
                }
                None => {
                    let size_bytes = chain.top().size_bytes();
                    let view = Volume::read_only_view(
                        format!("{}@{}", manifest.name, snapshot.name),
                        size_bytes,
                        chain,
                        self.engine.clone(),
                        Arc::clone(&self.buffers),
                    )
                    .with_identity(self.volume.identity().clone());
                    // A snapshot just taken: its layer is the head just frozen, which may
                    // still take the writes in flight on it.
                    if let Some(epoch) = &old_epoch {
                        view.settle_after(Arc::clone(epoch));
                    }
                    Arc::new(view)
                }
            };
            views.insert(snapshot.name.clone(), view);
        }
        // Views of deleted snapshots: nobody can attach any more.
        for (_, gone) in std::mem::replace(&mut state.views, views) {
            let _ = gone.attachments().close(true, Closure::Deletion);
        }
        Ok(old_epoch)
    }

    /// Records `next` durably, then makes it the in-memory truth.
    pub(crate) fn commit(
        &self,
        state: &mut EntryState,
        next: VolumeManifest,
    ) -> Result<(), StorageError> {
        next.check().map_err(|reason| StorageError::BadManifest {
            path: self.dir.join(manifest::MANIFEST_FILE),
            reason,
        })?;
        let previous_failed = match next.store_then_previous(&self.dir) {
            Ok(previous_failed) => previous_failed,
            Err(e) => {
                // `volume.json` may hold `next` while memory keeps the manifest before it (a
                // directory fsync failed after the rename, say): the disk is not what the
                // volume runs on. FLUSH fails until the repair writes memory's manifest again.
                if let Some(writer) = self.volume.writer() {
                    writer
                        .commit_failed
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
                return Err(e);
            }
        };
        // `volume.json` holds `next` durably: the change stands (a restart would load it, so
        // reporting it failed and running on the manifest before would be undone by a crash).
        // A stale `.prev` is no fallback for the next in-place manifest, so FLUSH fails until
        // the repair has written both again.
        if let Some(e) = &previous_failed {
            tracing::warn!(volume = self.name(), error = %e, "the volume's change stands, but its manifest's .prev copy failed: FLUSH fails until it is written");
        }
        if let Some(writer) = self.volume.writer() {
            writer.commit_failed.store(
                previous_failed.is_some(),
                std::sync::atomic::Ordering::SeqCst,
            );
            writer.persist.all_durable();
        }
        state.manifest = next;
        self.refresh(state)
    }

    /// Changes the volume's size online (see `Registry::resize` for the rules). The head's
    /// files grow or shrink; when a layer below is larger than the old size (the volume was
    /// shrunk after a snapshot), the regrown blocks are masked as zero so old data never
    /// reappears. `shrink_checked`: the caller checked a shrink's rules and closed the volume;
    /// a resize that became a shrink while it waited for the lock (another resize, a rollback
    /// grew the volume) is refused instead, since clients may be using the blocks it cuts.
    pub async fn resize(&self, size_bytes: u64, shrink_checked: bool) -> Result<u64, StorageError> {
        let _admin = self.lock_admin().await?;
        let Some(writer) = self.volume.writer() else {
            return Err(StorageError::ReadOnly(self.name().to_owned()));
        };
        let _gate = writer.gate.write().await;
        let (old_bytes, head_id, head) = {
            let state = self.lock();
            let head_id = state.manifest.head.clone();
            let head = Arc::clone(&state.layers[&head_id]);
            (state.manifest.size_bytes, head_id, head)
        };
        if old_bytes == size_bytes {
            return Ok(old_bytes);
        }
        let shrink = size_bytes < old_bytes;
        if shrink && !shrink_checked {
            return Err(StorageError::SizeChanged {
                name: self.name().to_owned(),
                now_bytes: old_bytes,
                size_bytes,
            });
        }
        let largest_below = self.volume.chain().layers()[1..]
            .iter()
            .map(|l| l.size_bytes())
            .max()
            .unwrap_or(0);
        // The file work (a map scan, fsyncs of the data file and the map) runs off the
        // runtime's threads; the admin lock keeps the manifest as read above meanwhile.
        let resized = off_runtime("resize", self.dir.clone(), {
            let (dir, head) = (self.dir.clone(), Arc::clone(&head));
            move || resized_head(&dir, &head, old_bytes, size_bytes, largest_below)
        })
        .await
        .map_err(|e| match e {
            // The layer names its own id: the error is the volume's.
            StorageError::Resize {
                size_bytes, source, ..
            } => StorageError::Resize {
                name: self.name().to_owned(),
                size_bytes,
                source,
            },
            other => other,
        })?;
        {
            let mut state = self.lock();
            let mut next = state.manifest.clone();
            next.size_bytes = size_bytes;
            if let Some(record) = next.layers.iter_mut().find(|l| l.id == head_id) {
                record.size_bytes = size_bytes;
            }
            let before = state.layers.insert(head_id.clone(), Arc::new(resized));
            if let Err(e) = self.commit(&mut state, next) {
                // The volume keeps its old size (the live chain still reads the old head),
                // and memory must not hold a head of a size no manifest says.
                if let Some(before) = before {
                    state.layers.insert(head_id, before);
                }
                return Err(e);
            }
        }
        if shrink {
            // The gate still holds writes off, and the old instance maps the whole tail.
            let cut = off_runtime("cut", self.dir.clone(), move || head.cut_tail(size_bytes));
            if let Err(error) = cut.await {
                tracing::warn!(volume = self.name(), size_bytes, %error, "cutting a shrunk volume's tail failed; its files keep it until the volume grows again");
            }
        }
        self.volume.publish_size(size_bytes);
        Ok(old_bytes)
    }
}

/// The head instance of a volume resized from `old_bytes` to `size_bytes`, durable before the
/// manifest that names the new size. `largest_below`: the largest layer under the head.
fn resized_head(
    dir: &Path,
    head: &Layer,
    old_bytes: u64,
    size_bytes: u64,
    largest_below: u64,
) -> Result<Layer, StorageError> {
    if size_bytes < old_bytes {
        // Nothing is cut before the manifest with the new size is durable: a shrink that
        // fails loses nothing. The new instance starts dirty: writes acknowledged before the
        // shrink may not be synced yet, and a FLUSH syncs only dirty instances.
        return head.reopened(dir, size_bytes).inspect(Layer::mark_dirty);
    }
    let resized = head.grown(dir, size_bytes)?;
    if largest_below > old_bytes {
        let from = blocks_for(old_bytes);
        let to = blocks_for(largest_below.min(size_bytes));
        resized.set_range(from, to, BlockState::Zero)?;
        // A partial last block of the old size: its tail must not show old data either;
        // sizes are 4096-aligned, so there is none.
        debug_assert_eq!(old_bytes % BLOCK_BYTES, 0);
    }
    // Durable before the manifest with the new size: after a power loss the regrown range
    // would otherwise show the layers below it, or a cut tail's old states.
    resized.sync_map_blocking()?;
    Ok(resized)
}

/// The chain from layer `top` down to the bottom.
pub(crate) fn chain_of(
    manifest: &VolumeManifest,
    layers: &HashMap<String, Arc<Layer>>,
    top: &str,
) -> Result<Chain, StorageError> {
    let ids = manifest
        .ancestry(top)
        .ok_or_else(|| StorageError::BadManifest {
            path: PathBuf::from(manifest::MANIFEST_FILE),
            reason: format!("layer {top:?} has a broken parent chain"),
        })?;
    let mut chain = Vec::with_capacity(ids.len());
    for id in ids {
        let layer = layers.get(&id).ok_or_else(|| StorageError::BadManifest {
            path: PathBuf::from(manifest::MANIFEST_FILE),
            reason: format!("layer {id:?} is not open"),
        })?;
        chain.push(Arc::clone(layer));
    }
    Ok(Chain::new(chain))
}

/// Puts `previous` (loaded from `volume.json.prev` because `volume.json` was torn or missing)
/// back as the durable `volume.json`. The torn file goes first, so that writing the new one
/// does not link it as the previous manifest; `.prev` stays valid throughout.
fn restore_previous(dir: &Path, previous: &VolumeManifest) -> Result<(), StorageError> {
    let current = dir.join(manifest::MANIFEST_FILE);
    match std::fs::remove_file(&current) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StorageError::fs("remove", &current, e)),
    }
    previous.store(dir)
}

/// Whether `id` is the head, no other layer, snapshot or merge depends on it, and its files
/// are gone: what a crash can leave after a snapshot create whose manifest rename reached the
/// disk before the new head's file names (no journal orders them; one of the two may be
/// there). A data file that holds bytes is never taken for lost, whatever happened to the map
/// (a head that did take writes loads, or fails to load, but is not started again empty); nor
/// is a file whose presence cannot be told (EACCES, EIO).
fn is_lost_head(dir: &Path, manifest: &VolumeManifest, id: &str) -> bool {
    let missing = |path: PathBuf| matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    let (data, map) = (layer::data_path(dir, id), layer::map_path(dir, id));
    let files_lost = match (missing(data.clone()), missing(map)) {
        (true, _) => true,
        (false, true) => holds_no_bytes(&data),
        (false, false) => false,
    };
    id == manifest.head
        && manifest.children(id).is_empty()
        && !manifest.snapshots.iter().any(|s| s.layer == id)
        && manifest
            .merge
            .as_ref()
            .is_none_or(|m| m.victim != id && m.survivor != id)
        && files_lost
}

/// Whether the file at `path` is all holes; false when that cannot be told.
fn holds_no_bytes(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(meta) = file.metadata() else {
        return false;
    };
    crate::storage::holes::data_ranges(&file, 0, meta.len()).is_ok_and(|ranges| ranges.is_empty())
}

/// Runs a blocking file operation on `path` off the runtime's threads.
pub(crate) async fn off_runtime<T: Send + 'static>(
    action: &'static str,
    path: PathBuf,
    op: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(op)
        .await
        .map_err(|e| StorageError::fs(action, &path, std::io::Error::other(e)))?
}

/// See `storage/clean_stop.rs`. Never fails the load: what cannot be punched stays, as it
/// did before this walk existed.
fn punch_unmapped_head(manifest: &VolumeManifest, layers: &HashMap<String, Arc<Layer>>) {
    let Some(head) = layers.get(&manifest.head) else {
        return;
    };
    match head.punch_unmapped() {
        Ok(0) => {}
        Ok(punched_bytes) => {
            tracing::info!(volume = %manifest.name, layer = head.id(), punched_bytes, "the head held bytes no block map entry named (writes a crash cut short); punched them");
        }
        Err(error) => {
            tracing::warn!(volume = %manifest.name, layer = head.id(), %error, "cannot punch the bytes of writes a crash cut short out of the head; a block written again and lost in a later crash may read them");
        }
    }
}

/// Removes layer files (and temp files) that the manifest does not name.
fn remove_orphans(dir: &Path, manifest: &VolumeManifest) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some((stem, ext)) = file_name.rsplit_once('.') else {
            continue;
        };
        let orphan = match ext {
            "data" | "map" => manifest.layer(stem).is_none(),
            "tmp" => true,
            // A format-1 data file a migration linked under its layer's name and did not get to
            // remove: the layer would never count as exclusive, and the bytes never go.
            _ => file_name == LEGACY_DATA_FILE,
        };
        if orphan {
            tracing::info!(path = %entry.path().display(), "removing a layer file no manifest names");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Turns a format-1 volume (one `data.img`) into a one-layer volume. The old data file is
/// hard-linked under the layer's name and its map built once from the file's holes; the old
/// name goes only after the new manifest is durable, so a crash at any point leaves a volume
/// that loads (and migrates again).
fn migrate_legacy(dir: &Path, legacy: VolumeManifest) -> Result<VolumeManifest, StorageError> {
    let id = layer::new_layer_id()?;
    let old = dir.join(LEGACY_DATA_FILE);
    let new = layer::data_path(dir, &id);
    std::fs::hard_link(&old, &new).map_err(|e| StorageError::fs("link", &old, e))?;
    let map_path = layer::map_path(dir, &id);
    std::fs::File::create(&map_path)
        .and_then(|f| {
            crate::storage::holes::no_copy_on_write(&f, &map_path);
            f.set_len(layer::blockmap::map_file_bytes(blocks_for(
                legacy.size_bytes,
            )))
        })
        .map_err(|e| StorageError::fs("create", &map_path, e))?;
    let layer = Layer::open(dir, &id, legacy.size_bytes)?;
    for (start, end) in crate::storage::holes::data_ranges(layer.data(), 0, legacy.size_bytes)
        .map_err(|e| StorageError::fs("scan", &new, e))?
    {
        layer.set_range(
            start / BLOCK_BYTES,
            end.div_ceil(BLOCK_BYTES),
            BlockState::Data,
        )?;
    }
    let map_file = std::fs::File::open(&map_path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StorageError::fs("fsync", &map_path, e));
    map_file?;
    let migrated = VolumeManifest {
        format_version: manifest::FORMAT_VERSION,
        head: id.clone(),
        layers: vec![LayerRecord {
            id,
            parent: None,
            size_bytes: legacy.size_bytes,
        }],
        snapshots: Vec::new(),
        merge: None,
        ..legacy
    };
    migrated.store(dir)?;
    let _ = std::fs::remove_file(&old);
    tracing::info!(volume = %migrated.name, "migrated a format-1 volume to layers");
    Ok(migrated)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::io::{EngineConfig, EngineKind};
    use crate::storage::Registry;

    const SIZE_BYTES: u64 = 1 << 20;

    fn engine() -> IoEngine {
        IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap()
    }

    /// A volume with `0x11` flushed over its first 64 KiB, then snapshot `s1` taken (and
    /// returned from, its manifest maybe not durable yet), then `0x22` written over the same
    /// range without a flush. Returns the volume folder, the old head and the new head.
    async fn snapshot_then_write(data_dir: &Path) -> (PathBuf, String, String) {
        let reg = Registry::open(data_dir, engine()).unwrap();
        let vol = reg.create("v", SIZE_BYTES).unwrap();
        vol.write(0, Bytes::from(vec![0x11; 65536]), false)
            .await
            .unwrap();
        vol.flush().await.unwrap();
        let entry = reg.entry("v").unwrap();
        let old_head = entry.manifest().head;
        entry.create_snapshot("s1").await.unwrap();
        let new_head = entry.manifest().head;
        assert_ne!(old_head, new_head);
        vol.write(0, Bytes::from(vec![0x22; 65536]), false)
            .await
            .unwrap();
        // Whatever a crash leaves is simulated below on files the kernel has; let the
        // background persist end first so that it does not race the edits.
        vol.flush().await.unwrap();
        (entry.dir.clone(), old_head, new_head)
    }

    async fn read_first_block(reg: &Registry, export: &str) -> Vec<u8> {
        let vol = reg.get(export).unwrap();
        vol.read(0, 4096).await.unwrap().to_vec()
    }

    /// Volume "v" with 0x11 in its first block under snapshot `snapshot`, all flushed.
    async fn flushed_volume_with_snapshot(
        snapshot: &str,
    ) -> (
        tempfile::TempDir,
        Registry,
        Arc<crate::storage::Volume>,
        Arc<VolumeEntry>,
    ) {
        let data_dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(data_dir.path(), engine()).unwrap();
        let vol = reg.create("v", SIZE_BYTES).unwrap();
        vol.write(0, Bytes::from(vec![0x11; 4096]), false)
            .await
            .unwrap();
        let entry = reg.entry("v").unwrap();
        entry.create_snapshot(snapshot).await.unwrap();
        vol.flush().await.unwrap();
        (data_dir, reg, vol, entry)
    }

    /// A stale `.prev` that a full disk keeps from being written at start does not leave the
    /// volume unloaded (until the next restart): it loads, and FLUSH fails until the copy is
    /// written.
    #[tokio::test]
    async fn a_stale_prev_that_cannot_be_written_at_load_defers_to_flush() {
        let (data_dir, reg, vol, entry) = flushed_volume_with_snapshot("s").await;
        let dir = entry.dir.clone();
        drop((vol, entry, reg));
        std::fs::remove_file(dir.join(manifest::PREV_MANIFEST_FILE)).unwrap();
        let blocker = dir.join("volume.json.tmp");
        std::fs::create_dir(&blocker).unwrap();
        let reg = Registry::open(data_dir.path(), engine()).unwrap();
        assert!(reg.unloaded().is_empty(), "{:?}", reg.unloaded());
        assert_eq!(read_first_block(&reg, "v").await, vec![0x11; 4096]);
        let vol = reg.get("v").unwrap();
        assert!(vol.flush().await.is_err(), "FLUSH with .prev missing");
        std::fs::remove_dir(&blocker).unwrap();
        vol.flush().await.unwrap();
        assert!(dir.join(manifest::PREV_MANIFEST_FILE).exists());
    }

    /// A tree change whose `volume.json` lands but whose `.prev` copy fails stands (a restart
    /// would load it), and FLUSH, like a snapshot, fails until `.prev` is written again; then
    /// what was flushed survives a restart.
    #[tokio::test]
    async fn flush_fails_until_a_half_written_tree_change_is_written_over() {
        let (data_dir, reg, _vol, entry) = flushed_volume_with_snapshot("s1").await;
        // `write_durably` of `volume.json.prev` goes through `volume.json.tmp`: a directory
        // there fails that write only.
        let blocker = entry.dir.join("volume.json.tmp");
        std::fs::create_dir(&blocker).unwrap();
        let head = entry.manifest().head;
        // The rollback's volume.json landed durably: the rollback stands (it was reported
        // failed, memory keeping the old head, and a crash then applied it all the same).
        entry.rollback("s1", true).await.unwrap();
        let rolled_back = entry.manifest().head;
        assert_ne!(rolled_back, head, "memory runs on the rolled-back head");
        assert_eq!(
            VolumeManifest::load(&entry.dir).unwrap().head,
            rolled_back,
            "what a restart would load is what was reported"
        );
        assert_eq!(read_first_block(&reg, "v").await, vec![0x11; 4096]);
        let vol = reg.get("v").unwrap();
        vol.write(0, Bytes::from(vec![0x33; 4096]), false)
            .await
            .unwrap();
        assert!(
            vol.flush().await.is_err(),
            "FLUSH succeeded while volume.json.prev is stale"
        );
        // A snapshot puts its manifest in place trusting .prev as the last durable one: it
        // writes the stale copy first, and is refused while it cannot.
        assert!(
            entry.create_snapshot("s2").await.is_err(),
            "a snapshot was taken over a stale .prev"
        );
        std::fs::remove_dir(&blocker).unwrap();
        vol.flush().await.unwrap();
        assert_eq!(VolumeManifest::load(&entry.dir).unwrap().head, rolled_back);
        drop((vol, entry, reg));
        let reg = Registry::open(data_dir.path(), engine()).unwrap();
        assert_eq!(read_first_block(&reg, "v").await, vec![0x33; 4096]);
    }

    #[tokio::test]
    async fn a_torn_manifest_after_snapshot_create_loads_the_volume_before_it() {
        let data_dir = tempfile::tempdir().unwrap();
        let (dir, old_head, new_head) = snapshot_then_write(data_dir.path()).await;
        // The state of a crash after the rename, before the background persist: `volume.json`
        // torn, `.prev` still the manifest from before the snapshot.
        let before = VolumeManifest {
            head: old_head.clone(),
            layers: vec![LayerRecord {
                id: old_head.clone(),
                parent: None,
                size_bytes: SIZE_BYTES,
            }],
            snapshots: Vec::new(),
            ..VolumeManifest::load(&dir).unwrap()
        };
        manifest::write_durably(
            &dir.join(manifest::PREV_MANIFEST_FILE),
            &serde_json::to_vec(&before).unwrap(),
        )
        .unwrap();
        let path = dir.join(manifest::MANIFEST_FILE);
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        std::fs::write(&path, vec![0u8; len]).unwrap();

        let reg = Registry::open(data_dir.path(), engine()).unwrap();
        let entry = reg.entry("v").unwrap();
        let m = entry.manifest();
        assert!(m.snapshots.is_empty(), "the snapshot is all gone");
        assert_eq!(m.head, old_head);
        assert_eq!(m.layers.len(), 1);
        // The old head holds what was flushed (and here, since the page cache survived, the
        // later write too: either is allowed for an unflushed write).
        let got = read_first_block(&reg, "v").await;
        assert!(got == [0x11; 4096] || got == [0x22; 4096]);
        // The new head's files were orphans and went; volume.json is whole again.
        assert!(!layer::data_path(&dir, &new_head).exists());
        assert!(!layer::map_path(&dir, &new_head).exists());
        assert_eq!(
            VolumeManifest::load_or_previous(&dir).unwrap(),
            (m, ManifestSource::Current)
        );
        // The tree can change again.
        entry.create_snapshot("s1").await.unwrap();
        entry.delete_snapshot("s1").await.unwrap();
    }

    /// A snapshot delete whose record landed but whose compaction a crash cut off leaves the
    /// snapshot's layer redundant under the head; the next start finishes it: the layer merges
    /// away, its files go, and the volume reads the same.
    #[tokio::test]
    async fn a_compaction_cut_off_by_a_crash_is_finished_at_the_next_start() {
        let data_dir = tempfile::tempdir().unwrap();
        let (dir, old_head, new_head) = snapshot_then_write(data_dir.path()).await;
        let mut deleted = VolumeManifest::load(&dir).unwrap();
        deleted.snapshots.clear();
        deleted.store(&dir).unwrap();

        let reg = Registry::open(data_dir.path(), engine()).unwrap();
        let entry = reg.entry("v").unwrap();
        assert_eq!(entry.manifest().layers.len(), 2, "the layer is still there");
        assert_eq!(reg.resume_compaction().await, 0);
        let m = entry.manifest();
        assert_eq!(m.layers.len(), 1, "{m:?}");
        assert!(m.merge.is_none());
        // Whichever layer survived, the other's files went.
        let gone = if m.head == new_head {
            &old_head
        } else {
            &new_head
        };
        assert!(!layer::data_path(&dir, gone).exists());
        assert!(!layer::map_path(&dir, gone).exists());
        let vol = reg.get("v").unwrap();
        assert_eq!(
            vol.read(0, 65536).await.unwrap().to_vec(),
            vec![0x22; 65536]
        );
        assert_eq!(vol.read(65536, 4096).await.unwrap().to_vec(), vec![0; 4096]);
    }

    /// A format-1 volume (one `data.img`) loads as one layer with the same bytes and its holes
    /// absent; a crash after the new manifest but before `data.img` went leaves a link that
    /// the next load removes.
    #[tokio::test]
    async fn a_format_1_volume_migrates_and_a_leftover_data_img_goes() {
        let data_dir = tempfile::tempdir().unwrap();
        let dir = data_dir.path().join("volumes/old");
        std::fs::create_dir_all(&dir).unwrap();
        let legacy = VolumeManifest {
            format_version: manifest::LEGACY_FORMAT_VERSION,
            name: "old".into(),
            uuid: "u-old".into(),
            size_bytes: SIZE_BYTES,
            created_unix_secs: 0,
            head: String::new(),
            layers: Vec::new(),
            snapshots: Vec::new(),
            merge: None,
        };
        manifest::write_durably(
            &dir.join(manifest::MANIFEST_FILE),
            &serde_json::to_vec(&legacy).unwrap(),
        )
        .unwrap();
        let img = dir.join(LEGACY_DATA_FILE);
        let file = std::fs::File::create(&img).unwrap();
        file.set_len(SIZE_BYTES).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[0x5a; 8192], 65536).unwrap();
        drop(file);

        let reg = Registry::open(data_dir.path(), engine()).unwrap();
        let entry = reg.entry("old").unwrap();
        let m = entry.manifest();
        assert_eq!(m.format_version, manifest::FORMAT_VERSION);
        assert_eq!(m.layers.len(), 1);
        assert!(!img.exists(), "data.img stayed after the migration");
        let vol = reg.get("old").unwrap();
        assert_eq!(
            vol.read(65536, 8192).await.unwrap().to_vec(),
            vec![0x5a; 8192]
        );
        assert_eq!(vol.read(0, 4096).await.unwrap().to_vec(), vec![0; 4096]);
        let head = &entry.manifest().head;
        let layer = Arc::clone(&entry.lock().layers[head]);
        assert_eq!(layer.state(0), BlockState::Absent);
        assert_eq!(layer.state(16), BlockState::Data);
        // The crash between the manifest and the unlink: the link is back.
        std::fs::hard_link(layer::data_path(&dir, head), &img).unwrap();
        drop((layer, vol, entry, reg));
        let reg = Registry::open(data_dir.path(), engine()).unwrap();
        assert!(!img.exists(), "a leftover data.img was kept");
        let vol = reg.get("old").unwrap();
        assert_eq!(
            vol.read(65536, 8192).await.unwrap().to_vec(),
            vec![0x5a; 8192]
        );
    }

    #[tokio::test]
    async fn a_lost_head_after_snapshot_create_starts_empty() {
        let data_dir = tempfile::tempdir().unwrap();
        let (dir, old_head, new_head) = snapshot_then_write(data_dir.path()).await;
        // The manifest's rename reached the disk, the new head's file names did not.
        std::fs::remove_file(layer::data_path(&dir, &new_head)).unwrap();
        std::fs::remove_file(layer::map_path(&dir, &new_head)).unwrap();

        let reg = Registry::open(data_dir.path(), engine()).unwrap();
        let m = reg.entry("v").unwrap().manifest();
        assert_eq!(m.head, new_head);
        assert_eq!(m.snapshot("s1").unwrap().layer, old_head);
        assert_eq!(read_first_block(&reg, "v@s1").await, [0x11; 4096]);
        assert_eq!(read_first_block(&reg, "v").await, [0x11; 4096]);
        assert!(layer::data_path(&dir, &new_head).exists());
        assert!(layer::map_path(&dir, &new_head).exists());
        // A head whose data file holds bytes is not: without its map it fails to load, and
        // its data file stays.
        let other = tempfile::tempdir().unwrap();
        let (other_dir, _, other_head) = snapshot_then_write(other.path()).await;
        std::fs::remove_file(layer::map_path(&other_dir, &other_head)).unwrap();
        let other_reg = Registry::open(other.path(), engine()).unwrap();
        assert!(
            other_reg.entry("v").is_none(),
            "a head without its map loaded"
        );
        assert!(layer::data_path(&other_dir, &other_head).exists());
        // Only a head nobody depends on is started again: a missing frozen layer is an error.
        std::fs::remove_file(layer::map_path(&dir, &old_head)).unwrap();
        drop(reg);
        let reg = Registry::open(data_dir.path(), engine()).unwrap();
        assert!(
            reg.entry("v").is_none(),
            "a volume missing a frozen layer is skipped"
        );
    }

    #[tokio::test]
    async fn flush_waits_for_the_manifests_put_in_place_before_it() {
        let data_dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(data_dir.path(), engine()).unwrap();
        let vol = reg.create("v", SIZE_BYTES).unwrap();
        let entry = reg.entry("v").unwrap();
        let writer = vol.writer().unwrap();
        for name in ["s1", "s2", "s3"] {
            entry.create_snapshot(name).await.unwrap();
        }
        let visible = writer.persist.visible();
        assert_eq!(visible, 3);
        vol.flush().await.unwrap();
        // Returned only once all three are durable; `.prev` is the last.
        writer.persist.wait_durable(visible).await.unwrap();
        let prev = std::fs::read(entry.dir.join(manifest::PREV_MANIFEST_FILE)).unwrap();
        let current = std::fs::read(entry.dir.join(manifest::MANIFEST_FILE)).unwrap();
        assert_eq!(prev, current);
        // A tree change settles the persists first and writes both files durably itself.
        entry.create_snapshot("s4").await.unwrap();
        entry.delete_snapshot("s1").await.unwrap();
        let prev = std::fs::read(entry.dir.join(manifest::PREV_MANIFEST_FILE)).unwrap();
        let current = std::fs::read(entry.dir.join(manifest::MANIFEST_FILE)).unwrap();
        assert_eq!(prev, current);
        vol.flush().await.unwrap();
    }
}
