//! The set of volumes under `DATA_DIR/volumes/`, loaded at start and created on demand.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::StorageError;
use crate::io::IoEngine;
use crate::storage::attachments::{CloseRefused, Closure};
use crate::storage::buffers::BufferPool;
use crate::storage::entry::off_runtime;
use crate::storage::entry::VolumeEntry;
use crate::storage::layer;
use crate::storage::manifest::{self, LayerRecord, VolumeManifest};
use crate::storage::name::{validate_snapshot_name, validate_volume_name};
use crate::storage::restore_mark::RestoreMark;
use crate::storage::volume::Volume;

pub const VOLUME_ALIGN_BYTES: u64 = 4096;

/// Idle read buffers kept per size class, shared by all volumes.
const IDLE_BUFFER_BYTES_PER_CLASS: usize = 64 << 20;

pub struct Registry {
    /// Folders of volumes that failed to load at open (named as their volumes): still there,
    /// so whatever is kept for them elsewhere (access rules) stays, and no first-start default
    /// volume is made in their place.
    unloaded: Vec<String>,
    volumes_dir: PathBuf,
    engine: IoEngine,
    buffers: Arc<BufferPool>,
    volumes: RwLock<BTreeMap<String, Arc<VolumeEntry>>>,
    /// Names whose volume is being made on disk. The directory work (files, fsyncs, a rename)
    /// runs without the `volumes` lock, which every NBD handshake takes to find its export.
    creating: Mutex<BTreeSet<String>>,
    /// Held by `remove` (see there).
    removing: Mutex<()>,
}

impl Registry {
    /// Opens (creating if needed) the data directory and loads every volume in it. A volume whose
    /// manifest cannot be read is skipped with an error in the log, never deleted. Merges a
    /// crash interrupted are finished by [`Registry::resume_compaction`].
    pub fn open(data_dir: &Path, engine: IoEngine) -> Result<Registry, StorageError> {
        let volumes_dir = data_dir.join("volumes");
        std::fs::create_dir_all(&volumes_dir)
            .map_err(|e| StorageError::fs("create", &volumes_dir, e))?;
        let buffers = BufferPool::new(IDLE_BUFFER_BYTES_PER_CLASS);
        let mut volumes = BTreeMap::new();
        let mut unloaded = Vec::new();
        let entries = std::fs::read_dir(&volumes_dir)
            .map_err(|e| StorageError::fs("list", &volumes_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::fs("list", &volumes_dir, e))?;
            let dir = entry.path();
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if file_name.starts_with('.') {
                // A creation that crashed before its rename, or a deletion after its rename:
                // never visible, safe to drop.
                tracing::info!(path = %dir.display(), "removing unfinished volume creation");
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
            let loaded = VolumeEntry::load_shared(&dir, engine.clone(), Arc::clone(&buffers))
                .and_then(|volume| {
                    // Folders are found by name (delete, clone): a copied or renamed folder
                    // whose manifest names another volume would shadow it or be taken for it.
                    if volume.name() == file_name {
                        Ok(volume)
                    } else {
                        Err(StorageError::BadManifest {
                            path: dir.join(crate::storage::manifest::MANIFEST_FILE),
                            reason: format!(
                                "it names volume {:?}, but its folder is {file_name:?}: rename the folder or remove the copy",
                                volume.name()
                            ),
                        })
                    }
                });
            match loaded {
                Ok(volume) => {
                    if let Some(mark) = volume.volume().restore_mark() {
                        tracing::warn!(volume = volume.name(), backup = %mark.backup_id, job = %mark.job_id, "the volume holds an incomplete restore: it refuses clients until a restore into it succeeds, it is rolled back or deleted");
                    }
                    volumes.insert(volume.name().to_owned(), volume);
                }
                Err(e) => {
                    tracing::error!(path = %dir.display(), error = %e, "skipping volume");
                    unloaded.push(file_name);
                }
            }
        }
        Ok(Registry {
            unloaded,
            volumes_dir,
            engine,
            buffers,
            volumes: RwLock::new(volumes),
            creating: Mutex::new(BTreeSet::new()),
            removing: Mutex::new(()),
        })
    }

    /// Finishes, volume by volume, what a crash or a failure left of snapshot compaction: a
    /// merge the manifest records, then the layers left redundant (an old head after a
    /// rollback, a merge's predecessor). Runs beside serving (merges always do): a volume
    /// serves the same bytes before, during and after. One that fails is logged and served as
    /// it is, every layer in place, and tried again at its next snapshot delete or start; the
    /// others go on. Returns how many failed.
    pub async fn resume_compaction(&self) -> usize {
        let mut failed = 0;
        for entry in self.entries() {
            match entry.resume_compaction().await {
                Ok(()) => {}
                // Deleted meanwhile.
                Err(StorageError::NotFound(_)) => {}
                Err(error) => {
                    failed += 1;
                    tracing::error!(volume = entry.name(), %error, "finishing this volume's interrupted snapshot merges failed; it is served as it is (every layer still in place), and they are tried again at its next snapshot delete or start");
                }
            }
        }
        failed
    }

    /// Creates a sparse volume. Durable when it returns: the directory appears by rename only
    /// once its manifest and layer files are complete.
    pub fn create(&self, name: &str, size_bytes: u64) -> Result<Arc<Volume>, StorageError> {
        validate_volume_name(name)?;
        check_size(size_bytes)?;
        self.create_with(name, |tmp_dir| {
            VolumeEntry::initialise(tmp_dir, name, size_bytes)
        })
        .inspect(|_| tracing::info!(volume = name, size_bytes, "created volume"))
    }

    /// Creates a sparse volume that carries restore mark `mark` from the start (see
    /// `restore_mark`): a crash before its restore is recorded leaves a volume that refuses
    /// clients, never an empty one that looks whole.
    pub fn create_marked(
        &self,
        name: &str,
        size_bytes: u64,
        mark: &RestoreMark,
    ) -> Result<Arc<Volume>, StorageError> {
        validate_volume_name(name)?;
        check_size(size_bytes)?;
        self.create_with(name, |tmp_dir| {
            VolumeEntry::initialise(tmp_dir, name, size_bytes)?;
            mark.store(tmp_dir)
        })
        .inspect(|_| tracing::info!(volume = name, size_bytes, backup = %mark.backup_id, "created volume for a restore"))
    }

    /// Creates `name` as a clone of `source@snapshot`: an independent volume whose bottom
    /// layers are hard links of the snapshot's frozen layers (never written again, so sharing
    /// them is safe) under a new empty head. O(layers), not O(size).
    pub async fn create_from_snapshot(
        self: &Arc<Self>,
        name: &str,
        source: &str,
        snapshot: &str,
    ) -> Result<Arc<Volume>, StorageError> {
        validate_volume_name(name)?;
        validate_snapshot_name(snapshot)?;
        let entry = self
            .entry(source)
            .ok_or_else(|| StorageError::NotFound(source.to_owned()))?;
        // No merge may move or rewrite the source's layers while they are being linked. The
        // links and fsyncs run off the runtime, with the lock held.
        let _admin = entry.lock_admin().await?;
        // The layers are linked as memory's manifest has them: one the disk does not record
        // yet (a background persist failed) could be the head again after a power loss, and
        // the source would write into the clone's base.
        entry.repair_manifest_locked().await?;
        // The clone's own instances of the linked layers start clean: its FLUSH never syncs
        // them. Whatever the source has not synced of them yet is synced now, through the
        // source's instances (which settle their maps too) and, for layers no longer in the
        // source's chain, by path below.
        entry.volume().sync_frozen().await?;
        let source_manifest = entry.manifest();
        let record = source_manifest
            .snapshot(snapshot)
            .ok_or_else(|| StorageError::SnapshotNotFound {
                volume: source.to_owned(),
                name: snapshot.to_owned(),
            })?
            .clone();
        let ids = source_manifest.ancestry(&record.layer).unwrap_or_default();
        let source_dir = self.volumes_dir.join(source);
        let this = Arc::clone(self);
        let new_name = name.to_owned();
        let volume = off_runtime("create", self.volumes_dir.join(name), move || {
            this.create_with(&new_name, |tmp_dir| {
                let mut layers: Vec<LayerRecord> = Vec::new();
                for id in &ids {
                    for (from, to) in [
                        (
                            layer::data_path(&source_dir, id),
                            layer::data_path(tmp_dir, id),
                        ),
                        (
                            layer::map_path(&source_dir, id),
                            layer::map_path(tmp_dir, id),
                        ),
                    ] {
                        std::fs::File::open(&from)
                            .and_then(|file| file.sync_all())
                            .map_err(|e| StorageError::fs("sync", &from, e))?;
                        std::fs::hard_link(&from, &to)
                            .map_err(|e| StorageError::fs("link", &from, e))?;
                    }
                    if let Some(l) = source_manifest.layer(id) {
                        layers.push(l.clone());
                    }
                }
                let size_bytes = layers.first().map_or(0, |l| l.size_bytes);
                let head = layer::new_layer_id()?;
                layer::Layer::create(tmp_dir, &head, size_bytes)?;
                layers.push(LayerRecord {
                    id: head.clone(),
                    parent: Some(record.layer.clone()),
                    size_bytes,
                });
                VolumeManifest {
                    format_version: manifest::FORMAT_VERSION,
                    name: new_name.clone(),
                    uuid: manifest::new_uuid()?,
                    size_bytes,
                    created_unix_secs: crate::storage::entry::now_unix_secs(),
                    head,
                    layers,
                    snapshots: Vec::new(),
                    merge: None,
                }
                .store(tmp_dir)
            })
        })
        .await?;
        tracing::info!(
            volume = name,
            source,
            snapshot,
            "created volume from snapshot"
        );
        Ok(volume)
    }

    /// Builds a volume folder under a hidden name with `fill`, then renames it into place.
    fn create_with(
        &self,
        name: &str,
        fill: impl FnOnce(&Path) -> Result<(), StorageError>,
    ) -> Result<Arc<Volume>, StorageError> {
        let final_dir = self.volumes_dir.join(name);
        {
            let volumes = self.volumes.read().unwrap_or_else(|p| p.into_inner());
            let mut creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
            if volumes.contains_key(name) || final_dir.exists() || !creating.insert(name.to_owned())
            {
                return Err(StorageError::AlreadyExists(name.to_owned()));
            }
        }
        let _reserved = Reservation {
            creating: &self.creating,
            name,
        };
        let tmp_dir = self.volumes_dir.join(format!(".{name}.creating"));
        let _ = std::fs::remove_dir_all(&tmp_dir);
        std::fs::create_dir(&tmp_dir).map_err(|e| StorageError::fs("create", &tmp_dir, e))?;
        if let Err(e) = fill(&tmp_dir) {
            let _ = std::fs::remove_dir_all(&tmp_dir);
            return Err(e);
        }
        manifest::sync_dir(&tmp_dir)?;
        std::fs::rename(&tmp_dir, &final_dir)
            .map_err(|e| StorageError::fs("rename", &tmp_dir, e))?;
        let loaded = manifest::sync_dir(&self.volumes_dir).and_then(|()| {
            VolumeEntry::load_shared(&final_dir, self.engine.clone(), Arc::clone(&self.buffers))
        });
        let entry = match loaded {
            Ok(entry) => entry,
            Err(e) => {
                // Not registered: its directory goes again, or the name would be taken with no
                // volume behind it until a restart.
                match std::fs::rename(&final_dir, &tmp_dir) {
                    Ok(()) => {
                        let _ = std::fs::remove_dir_all(&tmp_dir);
                    }
                    Err(error) => {
                        tracing::warn!(volume = name, %error, "could not take back the directory of a volume that failed to load");
                    }
                }
                return Err(e);
            }
        };
        let volume = Arc::clone(entry.volume());
        self.volumes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), entry);
        Ok(volume)
    }

    /// Changes a volume's size online. Durable when it returns: the manifest (the truth at
    /// load) is rewritten by temp + fsync + rename. Growing is always allowed; shrinking only
    /// with `allow_shrink` and while no client is connected, since a client may be using the
    /// blocks that would go. Returns the old size.
    pub async fn resize(
        &self,
        name: &str,
        size_bytes: u64,
        allow_shrink: bool,
    ) -> Result<u64, StorageError> {
        check_size(size_bytes)?;
        let entry = self
            .entry(name)
            .ok_or_else(|| StorageError::NotFound(name.to_owned()))?;
        let volume = Arc::clone(entry.volume());
        // Attaching waits on this lock, so a client cannot slip in between the check and the
        // shrink; a shrink closes the volume for its duration.
        let shrinking = volume.attachments().with_count_locked(|connections| {
            let connections = connections.map_err(|closure| entry.closed_error(closure))?;
            let old_bytes = volume.size_bytes();
            if size_bytes < old_bytes {
                if connections > 0 {
                    return Err(StorageError::Busy {
                        name: name.to_owned(),
                        connections,
                    });
                }
                if !allow_shrink {
                    return Err(StorageError::ShrinkNotAllowed {
                        name: name.to_owned(),
                        from_bytes: old_bytes,
                        to_bytes: size_bytes,
                    });
                }
            }
            Ok(size_bytes < old_bytes)
        })?;
        if shrinking {
            volume.attachments().close(false, Closure::Shrink).map_err(
                |refused| match refused {
                    CloseRefused::Busy(connections) => StorageError::Busy {
                        name: name.to_owned(),
                        connections,
                    },
                    CloseRefused::AlreadyClosed(closure) => entry.closed_error(closure),
                },
            )?;
        }
        let result = entry.resize(size_bytes, shrinking).await;
        if shrinking {
            volume.attachments().reopen(Closure::Shrink);
        }
        let old_bytes = result?;
        if old_bytes != size_bytes {
            tracing::info!(volume = name, old_bytes, size_bytes, "resized volume");
        }
        Ok(old_bytes)
    }

    /// Takes a volume out of the registry and renames its directory to a hidden one, durably:
    /// after a crash, `open` removes the hidden directory. Returns that directory for the caller
    /// to remove once connections have let go of the files. The caller has already closed
    /// the volume to new connections, and holds its admin lock where other operations on it
    /// may run. Blocking: call it off the runtime.
    pub fn remove(&self, name: &str) -> Result<PathBuf, StorageError> {
        // One remove at a time, the map looked up under it: a second remove of the name finds
        // it gone rather than the first one's hidden directory. The map itself is locked only
        // to take the entry out, not across the renames and fsyncs.
        let _one_at_a_time = self.removing.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = self.entry(name) else {
            return Err(StorageError::NotFound(name.to_owned()));
        };
        let dir = self.volumes_dir.join(name);
        let hidden = self.volumes_dir.join(format!(".{name}.deleting"));
        if hidden.exists() {
            std::fs::remove_dir_all(&hidden).map_err(|e| StorageError::fs("remove", &hidden, e))?;
        }
        std::fs::rename(&dir, &hidden).map_err(|e| StorageError::fs("rename", &dir, e))?;
        // From here the name may be taken again: operations waiting for this entry's admin
        // lock must not write into `dir`.
        entry
            .removed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // The rename is done: the volume goes whatever the fsync says. Failing here would leave
        // a volume listed and writable whose files are in the directory the next start removes.
        if let Err(error) = manifest::sync_dir(&self.volumes_dir) {
            tracing::warn!(volume = name, %error, "the deleted volume's directory rename may not be durable; a crash could bring the volume back");
        }
        for view in entry.views() {
            let _ = view.attachments().close(true, Closure::Deletion);
        }
        self.volumes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        tracing::info!(volume = name, "deleted volume");
        Ok(hidden)
    }

    /// A volume or a snapshot export (`vol@snap`).
    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        match name.split_once('@') {
            Some((volume, snapshot)) => self.entry(volume)?.view(snapshot),
            None => self.entry(name).map(|e| Arc::clone(e.volume())),
        }
    }

    /// Whether `entry`'s volume was deleted and its name not taken again. Records kept beside
    /// the volumes (access rules, server membership) are stored after a check that the volume
    /// exists; a delete whose clean-up ran in between would leave them behind, so the caller
    /// asks this after storing and takes its change back.
    pub fn was_deleted(&self, entry: &Arc<VolumeEntry>) -> bool {
        entry.check_present().is_err()
            && self
                .entry(entry.name())
                .is_none_or(|now| Arc::ptr_eq(&now, entry))
    }

    pub fn entry(&self, name: &str) -> Option<Arc<VolumeEntry>> {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The folders of volumes that failed to load at open.
    pub fn unloaded(&self) -> &[String] {
        &self.unloaded
    }

    pub fn entries(&self) -> Vec<Arc<VolumeEntry>> {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The volumes (not their snapshot exports).
    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.entries()
            .iter()
            .map(|e| Arc::clone(e.volume()))
            .collect()
    }

    /// Every export: each volume followed by its snapshots.
    pub fn exports(&self) -> Vec<Arc<Volume>> {
        let mut out = Vec::new();
        for entry in self.entries() {
            out.push(Arc::clone(entry.volume()));
            out.extend(entry.views());
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// The shutdown's last step: flushes every volume, syncs every layer it keeps (in its chain
    /// or not: a rollback leaves the old branch's) and stops it for good, with the marker that
    /// spares its next load the walk over its head (see `VolumeEntry::mark_stopped_cleanly`);
    /// returns the first failure after trying them all.
    pub async fn stop_all(&self) -> Result<(), StorageError> {
        /// Connections are drained before this: what still holds a volume's gate is a
        /// background merge's step, or a write stuck on the disk.
        const GATE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
        let mut first_error = None;
        let mut flushed = Vec::new();
        // Every volume flushed before any is held for good: a group freeze waiting for a
        // held gate would keep its other members' flushes waiting with it.
        for entry in self.entries() {
            match entry.flush_for_stop().await {
                Ok(()) => flushed.push(entry),
                Err(e) => {
                    tracing::error!(volume = entry.name(), error = %e, "final flush failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        for entry in flushed {
            if let Err(e) = entry.mark_stopped_cleanly(GATE_WAIT).await {
                tracing::error!(volume = entry.name(), error = %e, "final flush failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The largest volume (cloud disks stop at 32-64 TiB). A layer's block map grows with the
/// volume: 2 bits per 4 KiB block in a mapped file (4 GiB, sparse, at 64 TiB) and one summary
/// bit in memory per 2 MiB (4 MiB at 64 TiB). At 1 EiB the summary alone asked for 64 GiB.
pub const MAX_VOLUME_SIZE_BYTES: u64 = 64 << 40;

/// A name reserved in `Registry::creating`, released however the create ends.
struct Reservation<'a> {
    creating: &'a Mutex<BTreeSet<String>>,
    name: &'a str,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.name);
    }
}

fn check_size(size_bytes: u64) -> Result<(), StorageError> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(VOLUME_ALIGN_BYTES) {
        return Err(StorageError::UnalignedSize(size_bytes));
    }
    if size_bytes > MAX_VOLUME_SIZE_BYTES {
        return Err(StorageError::SizeTooLarge {
            size_bytes,
            max_bytes: MAX_VOLUME_SIZE_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{EngineConfig, EngineKind};

    #[test]
    fn a_volume_created_for_a_restore_carries_its_mark_from_the_start_and_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let reg = Registry::open(dir.path(), engine.clone()).unwrap();
        let mark = RestoreMark {
            backup_id: "b-1".into(),
            job_id: "j-1".into(),
            started_unix_secs: 7,
            made_for_restore: true,
            set_id: None,
        };
        let vol = reg.create_marked("r", 1 << 20, &mark).unwrap();
        assert_eq!(vol.restore_mark(), Some(mark.clone()));
        drop((vol, reg));
        // As after a crash before the job was recorded: still marked.
        let reg = Registry::open(dir.path(), engine).unwrap();
        assert_eq!(reg.get("r").unwrap().restore_mark(), Some(mark));
    }

    /// Creates and removes race only through the name: of eight creates of one name exactly
    /// one wins, and of two removes one, the other finding it gone.
    #[test]
    fn racing_creates_and_removes_of_one_name_have_one_winner() {
        let (_dir, reg) = temp_registry();
        for round in 0..4 {
            let created: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| s.spawn(|| reg.create("v", 1 << 20)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(
                created.iter().filter(|r| r.is_ok()).count(),
                1,
                "round {round}"
            );
            assert!(created
                .iter()
                .filter_map(|r| r.as_ref().err())
                .all(|e| matches!(e, StorageError::AlreadyExists(_))));
            assert!(reg.creating.lock().unwrap().is_empty());
            let removed: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..2).map(|_| s.spawn(|| reg.remove("v"))).collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let hidden: Vec<_> = removed.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(hidden.len(), 1, "round {round}");
            assert!(
                hidden[0].exists(),
                "the winner's hidden directory is left for its caller"
            );
            assert!(removed
                .iter()
                .filter_map(|r| r.as_ref().err())
                .all(|e| matches!(e, StorageError::NotFound(_))));
            std::fs::remove_dir_all(hidden[0]).unwrap();
            assert!(reg.entry("v").is_none());
        }
    }

    #[test]
    fn create_reload_and_refuse_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let reg = Registry::open(dir.path(), engine.clone()).unwrap();
        assert!(reg.is_empty());
        reg.create("vol0", 1 << 30).unwrap();
        assert!(matches!(
            reg.create("vol0", 1 << 30),
            Err(StorageError::AlreadyExists(_))
        ));
        assert!(matches!(
            reg.create("../x", 4096),
            Err(StorageError::InvalidName(_))
        ));
        // 64 TiB is served; a block more, or petabytes, is refused before any file exists.
        assert!(matches!(
            reg.create("huge", MAX_VOLUME_SIZE_BYTES + 4096),
            Err(StorageError::SizeTooLarge { size_bytes, .. }) if size_bytes == MAX_VOLUME_SIZE_BYTES + 4096
        ));
        assert!(matches!(
            reg.create("huge", u64::MAX - 4095),
            Err(StorageError::SizeTooLarge { .. })
        ));
        assert!(!dir.path().join("volumes/huge").exists());
        // (Not created here: ext4 files stop at 16 TiB.)
        assert!(check_size(MAX_VOLUME_SIZE_BYTES).is_ok());
        assert!(matches!(
            reg.create("odd", 4097),
            Err(StorageError::UnalignedSize(4097))
        ));
        // A half-made volume from a crash is cleaned up, a broken one skipped, not deleted.
        std::fs::create_dir(dir.path().join("volumes/.half.creating")).unwrap();
        std::fs::create_dir(dir.path().join("volumes/broken")).unwrap();
        // A copy of a volume's folder under another name names the volume it was copied from:
        // skipped, not served as a second vol0 (or in its place).
        let copy = dir.path().join("volumes/copy");
        std::fs::create_dir(&copy).unwrap();
        for file in std::fs::read_dir(dir.path().join("volumes/vol0")).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), copy.join(file.file_name())).unwrap();
        }
        drop(reg);
        let reg = Registry::open(dir.path(), engine).unwrap();
        assert_eq!(reg.list().len(), 1);
        assert_eq!(reg.get("vol0").unwrap().size_bytes(), 1 << 30);
        assert!(!dir.path().join("volumes/.half.creating").exists());
        assert!(dir.path().join("volumes/broken").exists());
        let mut unloaded = reg.unloaded().to_vec();
        unloaded.sort();
        assert_eq!(unloaded, ["broken", "copy"]);
        assert_eq!(
            reg.entry("vol0").unwrap().dir,
            dir.path().join("volumes/vol0")
        );
    }

    #[tokio::test]
    async fn resize_and_remove_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let reg = Registry::open(dir.path(), engine.clone()).unwrap();
        let vol = reg.create("v", 1 << 20).unwrap();
        let uuid = vol.identity().uuid.clone();
        assert_eq!(uuid.len(), 36);
        assert_eq!(reg.resize("v", 2 << 20, false).await.unwrap(), 1 << 20);
        assert_eq!(vol.size_bytes(), 2 << 20);
        let data_len = |_: &Path| {
            let entry = reg.entry("v").unwrap();
            let head = entry.manifest().head;
            std::fs::metadata(crate::storage::layer::data_path(&entry.dir, &head))
                .unwrap()
                .len()
        };
        assert_eq!(data_len(dir.path()), 2 << 20);
        assert!(matches!(
            reg.resize("v", 1 << 20, false).await,
            Err(StorageError::ShrinkNotAllowed { from_bytes, to_bytes, .. })
                if from_bytes == 2 << 20 && to_bytes == 1 << 20
        ));
        let stop = tokio_util::sync::CancellationToken::new();
        let held = vol.attachments().attach(stop, None).unwrap();
        assert!(matches!(
            reg.resize("v", 1 << 20, true).await,
            Err(StorageError::Busy { connections: 1, .. })
        ));
        drop(held);
        assert!(matches!(
            reg.resize("v", 1000, true).await,
            Err(StorageError::UnalignedSize(1000))
        ));
        assert!(matches!(
            reg.resize("nope", 4096, true).await,
            Err(StorageError::NotFound(_))
        ));

        let reg = Registry::open(dir.path(), engine.clone()).unwrap();
        let vol = reg.get("v").unwrap();
        assert_eq!(vol.size_bytes(), 2 << 20);
        assert_eq!(vol.identity().uuid, uuid);
        // A resize checked as a grow that finds the volume grown past it meanwhile (another
        // resize, a rollback) is a shrink nobody checked: refused, the size kept.
        let entry = reg.entry("v").unwrap();
        assert!(matches!(
            entry.resize(1 << 20, false).await,
            Err(StorageError::SizeChanged { now_bytes, size_bytes, .. })
                if now_bytes == 2 << 20 && size_bytes == 1 << 20
        ));
        assert_eq!(vol.size_bytes(), 2 << 20);
        assert_eq!(reg.resize("v", 8192, true).await.unwrap(), 2 << 20);
        assert_eq!(data_len(dir.path()), 8192);

        // Once a deletion has closed the volume, resize treats it as gone.
        assert_eq!(vol.attachments().close(false, Closure::Deletion), Ok(0));
        assert!(matches!(
            reg.resize("v", 4 << 20, false).await,
            Err(StorageError::NotFound(_))
        ));
        let hidden = reg.remove("v").unwrap();
        assert!(reg.get("v").is_none());
        assert!(!dir.path().join("volumes/v").exists());
        assert!(hidden.exists());
        assert!(matches!(reg.remove("v"), Err(StorageError::NotFound(_))));
        // A crash before the hidden directory went: the volume stays gone.
        let reg = Registry::open(dir.path(), engine).unwrap();
        assert!(reg.is_empty());
        assert!(!hidden.exists());
    }

    #[test]
    fn a_deleted_entry_is_told_apart_from_a_new_volume_of_its_name() {
        let (_dir, reg) = temp_registry();
        reg.create("v", 1 << 20).unwrap();
        let old = reg.entry("v").unwrap();
        assert!(!reg.was_deleted(&old));
        reg.remove("v").unwrap();
        assert!(reg.was_deleted(&old));
        reg.create("v", 1 << 20).unwrap();
        assert!(!reg.was_deleted(&old));
        assert!(!reg.was_deleted(&reg.entry("v").unwrap()));
    }

    /// The snapshot's data a clone is made of is durable once the clone exists: the clone's
    /// FLUSH never syncs the layers it shares with the source.
    #[tokio::test]
    async fn a_clone_syncs_the_snapshot_layers_it_links() {
        let (_dir, reg) = temp_registry();
        let reg = Arc::new(reg);
        reg.create("v", 1 << 20).unwrap();
        let entry = reg.entry("v").unwrap();
        entry.volume().write_bulk(0, tagged(7, 4096)).await.unwrap();
        entry.create_snapshot("s").await.unwrap();
        let frozen = Arc::clone(&entry.volume().chain().layers()[1]);
        assert!(frozen.is_dirty(), "the snapshot's layer was never synced");
        reg.create_from_snapshot("c", "v", "s").await.unwrap();
        assert!(!frozen.is_dirty(), "the clone left its base unsynced");
    }

    /// A BLOCK_STATUS over the grown part of a volume with a smaller layer below is one step
    /// per answer, not one per block past that layer's end (256 MiB per answer, not 4 GiB).
    #[tokio::test]
    async fn block_status_jumps_over_what_a_smaller_lower_layer_cannot_hold() {
        use crate::storage::volume::{EXTENT_HOLE, EXTENT_ZERO};
        let (_dir, reg) = temp_registry();
        reg.create("v", 1 << 20).unwrap();
        let entry = reg.entry("v").unwrap();
        entry.volume().write_bulk(0, tagged(1, 4096)).await.unwrap();
        entry.create_snapshot("s").await.unwrap();
        reg.resize("v", 1 << 40, false).await.unwrap();
        let volume = reg.get("v").unwrap();
        let query = crate::storage::StatusQuery::Allocation;
        let extents = volume
            .block_status(&query, 1 << 20, 8 << 30, 16)
            .await
            .unwrap();
        assert_eq!(extents, [(4 << 30, EXTENT_HOLE | EXTENT_ZERO)]);
    }

    /// A registry over a fresh data dir (kept while the returned guard lives).
    fn temp_registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let reg = Registry::open(dir.path(), engine).unwrap();
        (dir, reg)
    }

    fn tagged(tag: u8, length_bytes: usize) -> bytes::Bytes {
        bytes::Bytes::from(vec![tag; length_bytes])
    }

    #[tokio::test]
    async fn a_durable_snapshot_makes_the_writes_before_it_durable() {
        let (_dir, reg) = temp_registry();
        let vol = reg.create("v", 1 << 20).unwrap();
        vol.write(0, tagged(0x31, 4096), false).await.unwrap();
        let frozen = Arc::clone(&vol.chain().layers()[0]);
        assert!(frozen.is_dirty());
        let entry = reg.entry("v").unwrap();
        entry.create_snapshot_durable("s").await.unwrap();
        assert!(
            !frozen.is_dirty(),
            "a backup would read writes a power loss can take"
        );
        assert_eq!(
            &vol.read(0, 4096).await.unwrap()[..],
            &tagged(0x31, 4096)[..]
        );
    }

    #[tokio::test]
    async fn a_shrink_whose_manifest_write_fails_loses_nothing() {
        let (_dir, reg) = temp_registry();
        let vol = reg.create("v", 2 << 20).unwrap();
        let tail_offset = (1 << 20) + 8192;
        vol.write(tail_offset, tagged(0x5a, 4096), false)
            .await
            .unwrap();
        // A snapshot below: a tail marked absent would read it instead.
        vol.write(tail_offset + 4096, tagged(0x11, 4096), false)
            .await
            .unwrap();
        reg.entry("v").unwrap().create_snapshot("s").await.unwrap();
        vol.write(tail_offset + 4096, tagged(0x22, 4096), false)
            .await
            .unwrap();
        // `volume.json` cannot be written: its temp name is taken by a directory.
        let blocker = reg.entry("v").unwrap().dir.join("volume.tmp");
        std::fs::create_dir(&blocker).unwrap();
        assert!(reg.resize("v", 1 << 20, true).await.is_err());
        assert_eq!(vol.size_bytes(), 2 << 20);
        let tail = vol.read(tail_offset, 8192).await.unwrap();
        assert_eq!(
            &tail[..4096],
            &tagged(0x5a, 4096)[..],
            "the failed shrink lost the tail"
        );
        assert_eq!(&tail[4096..], &tagged(0x22, 4096)[..]);

        std::fs::remove_dir(&blocker).unwrap();
        assert_eq!(reg.resize("v", 1 << 20, true).await.unwrap(), 2 << 20);
        assert_eq!(vol.size_bytes(), 1 << 20);
        let entry = reg.entry("v").unwrap();
        let head = entry.manifest().head;
        let data = crate::storage::layer::data_path(&entry.dir, &head);
        assert_eq!(std::fs::metadata(&data).unwrap().len(), 1 << 20);
        assert_eq!(reg.resize("v", 2 << 20, false).await.unwrap(), 1 << 20);
        let tail = vol.read(tail_offset, 8192).await.unwrap();
        assert!(
            tail.iter().all(|&b| b == 0),
            "a regrown tail shows old data"
        );
    }

    /// What a crash between a shrink's manifest and its cut leaves: a smaller volume whose head
    /// files still hold the old tail. Growing it again must not bring the tail back.
    #[tokio::test]
    async fn a_grow_after_an_uncut_shrink_reads_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let reg = Registry::open(dir.path(), engine.clone()).unwrap();
        let vol = reg.create("v", 2 << 20).unwrap();
        vol.write(0, tagged(0x77, 2 << 20), false).await.unwrap();
        vol.flush().await.unwrap();
        let volume_dir = reg.entry("v").unwrap().dir.clone();
        drop((vol, reg));
        // 261 blocks: the last map word is partly the old tail's.
        let shrunk_bytes = (1 << 20) + 5 * 4096;
        let mut manifest = VolumeManifest::load(&volume_dir).unwrap();
        manifest.size_bytes = shrunk_bytes;
        let head = manifest.head.clone();
        manifest
            .layers
            .iter_mut()
            .find(|l| l.id == head)
            .unwrap()
            .size_bytes = shrunk_bytes;
        manifest.store(&volume_dir).unwrap();

        let reg = Registry::open(dir.path(), engine).unwrap();
        let vol = reg.get("v").unwrap();
        assert_eq!(vol.size_bytes(), shrunk_bytes);
        let kept = vol.read(shrunk_bytes - 4096, 4096).await.unwrap();
        assert_eq!(&kept[..], &tagged(0x77, 4096)[..]);
        assert_eq!(reg.resize("v", 2 << 20, false).await.unwrap(), shrunk_bytes);
        let regrown = vol
            .read(shrunk_bytes, ((2 << 20) - shrunk_bytes) as usize)
            .await
            .unwrap();
        let shown = regrown.iter().position(|&b| b != 0);
        assert_eq!(
            shown, None,
            "old tail data at offset {shown:?} past the shrunk end"
        );
        let entry = reg.entry("v").unwrap();
        let layer = Arc::clone(&entry.volume().chain().layers()[0]);
        assert_eq!(layer.map().present_blocks(), shrunk_bytes / 4096);
    }
}
