//! The set of volumes under `DATA_DIR/volumes/`, loaded at start and created on demand.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::StorageError;
use crate::io::IoEngine;
use crate::storage::buffers::BufferPool;
use crate::storage::manifest::{self, VolumeManifest, DATA_FILE, FORMAT_VERSION};
use crate::storage::name::validate_volume_name;
use crate::storage::volume::{Volume, VolumeIdentity};

pub const VOLUME_ALIGN_BYTES: u64 = 4096;

/// Idle read buffers kept per size class, shared by all volumes.
const IDLE_BUFFER_BYTES_PER_CLASS: usize = 64 << 20;

pub struct Registry {
    volumes_dir: PathBuf,
    engine: IoEngine,
    buffers: Arc<BufferPool>,
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
}

impl Registry {
    /// Opens (creating if needed) the data directory and loads every volume in it. A volume whose
    /// manifest cannot be read is skipped with an error in the log, never deleted.
    pub fn open(data_dir: &Path, engine: IoEngine) -> Result<Registry, StorageError> {
        let volumes_dir = data_dir.join("volumes");
        std::fs::create_dir_all(&volumes_dir)
            .map_err(|e| StorageError::fs("create", &volumes_dir, e))?;
        let buffers = BufferPool::new(IDLE_BUFFER_BYTES_PER_CLASS);
        let mut volumes = BTreeMap::new();
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
            match load_volume(&dir, engine.clone(), Arc::clone(&buffers)) {
                Ok(volume) => {
                    volumes.insert(volume.name().to_owned(), Arc::new(volume));
                }
                Err(e) => tracing::error!(path = %dir.display(), error = %e, "skipping volume"),
            }
        }
        Ok(Registry {
            volumes_dir,
            engine,
            buffers,
            volumes: RwLock::new(volumes),
        })
    }

    /// Creates a sparse volume. Durable when it returns: the directory appears by rename only
    /// once its manifest and data file are complete.
    pub fn create(&self, name: &str, size_bytes: u64) -> Result<Arc<Volume>, StorageError> {
        validate_volume_name(name)?;
        check_size(size_bytes)?;
        let mut volumes = self.volumes.write().unwrap_or_else(|p| p.into_inner());
        let final_dir = self.volumes_dir.join(name);
        if volumes.contains_key(name) || final_dir.exists() {
            return Err(StorageError::AlreadyExists(name.to_owned()));
        }
        let tmp_dir = self.volumes_dir.join(format!(".{name}.creating"));
        let _ = std::fs::remove_dir_all(&tmp_dir);
        std::fs::create_dir(&tmp_dir).map_err(|e| StorageError::fs("create", &tmp_dir, e))?;
        let data_path = tmp_dir.join(DATA_FILE);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&data_path)
            .map_err(|e| StorageError::fs("create", &data_path, e))?;
        data.set_len(size_bytes)
            .map_err(|e| StorageError::fs("size", &data_path, e))?;
        data.sync_all()
            .map_err(|e| StorageError::fs("fsync", &data_path, e))?;
        let created_unix_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        VolumeManifest {
            format_version: FORMAT_VERSION,
            name: name.to_owned(),
            uuid: manifest::new_uuid()?,
            size_bytes,
            created_unix_secs,
        }
        .store(&tmp_dir)?;
        std::fs::rename(&tmp_dir, &final_dir)
            .map_err(|e| StorageError::fs("rename", &tmp_dir, e))?;
        manifest::sync_dir(&self.volumes_dir)?;
        drop(data);
        let volume = Arc::new(load_volume(
            &final_dir,
            self.engine.clone(),
            Arc::clone(&self.buffers),
        )?);
        volumes.insert(name.to_owned(), Arc::clone(&volume));
        tracing::info!(volume = name, size_bytes, "created volume");
        Ok(volume)
    }

    /// Changes a volume's size online. Durable when it returns: the manifest (the truth at
    /// load) is rewritten by temp + fsync + rename. Growing is always allowed; shrinking only
    /// with `allow_shrink` and while no client is connected, since a client may be using the
    /// blocks that would go. Returns the old size. Blocking: call it off the runtime.
    pub fn resize(
        &self,
        name: &str,
        size_bytes: u64,
        allow_shrink: bool,
    ) -> Result<u64, StorageError> {
        check_size(size_bytes)?;
        let volume = self
            .get(name)
            .ok_or_else(|| StorageError::NotFound(name.to_owned()))?;
        // Attaching waits on this lock, so a client cannot slip in between the check and the
        // shrink.
        volume.attachments().with_count_locked(|connections| {
            let Some(connections) = connections else {
                return Err(StorageError::NotFound(name.to_owned()));
            };
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
            if size_bytes == old_bytes {
                return Ok(old_bytes);
            }
            let manifest = VolumeManifest {
                format_version: FORMAT_VERSION,
                name: name.to_owned(),
                uuid: volume.identity().uuid.clone(),
                size_bytes,
                created_unix_secs: volume.identity().created_unix_secs,
            };
            // A crash between the two steps is harmless: load makes the file match the
            // manifest. Growing extends the file first, shrinking records the size first, so
            // a new size is never published before the file holds it.
            if size_bytes > old_bytes {
                volume.set_file_len(size_bytes)?;
                manifest.store(&self.volumes_dir.join(name))?;
            } else {
                manifest.store(&self.volumes_dir.join(name))?;
                volume.set_file_len(size_bytes)?;
            }
            volume.publish_size(size_bytes);
            tracing::info!(volume = name, old_bytes, size_bytes, "resized volume");
            Ok(old_bytes)
        })
    }

    /// Takes a volume out of the registry and renames its directory to a hidden one, durably:
    /// after a crash, `open` removes the hidden directory. Returns that directory for the caller
    /// to remove once connections have let go of the data file. The caller has already closed
    /// the volume to new connections. Blocking: call it off the runtime.
    pub fn remove(&self, name: &str) -> Result<PathBuf, StorageError> {
        let mut volumes = self.volumes.write().unwrap_or_else(|p| p.into_inner());
        if !volumes.contains_key(name) {
            return Err(StorageError::NotFound(name.to_owned()));
        }
        let dir = self.volumes_dir.join(name);
        let hidden = self.volumes_dir.join(format!(".{name}.deleting"));
        if hidden.exists() {
            std::fs::remove_dir_all(&hidden).map_err(|e| StorageError::fs("remove", &hidden, e))?;
        }
        std::fs::rename(&dir, &hidden).map_err(|e| StorageError::fs("rename", &dir, e))?;
        manifest::sync_dir(&self.volumes_dir)?;
        volumes.remove(name);
        tracing::info!(volume = name, "deleted volume");
        Ok(hidden)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Flushes every volume (shutdown path); returns the first failure after trying them all.
    pub async fn flush_all(&self) -> Result<(), StorageError> {
        let mut first_error = None;
        for volume in self.list() {
            if let Err(e) = volume.flush().await {
                tracing::error!(volume = volume.name(), error = %e, "flush failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn load_volume(
    dir: &Path,
    engine: IoEngine,
    buffers: Arc<BufferPool>,
) -> Result<Volume, StorageError> {
    let manifest = VolumeManifest::load(dir)?;
    validate_volume_name(&manifest.name)?;
    let data_path = dir.join(DATA_FILE);
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data_path)
        .map_err(|e| StorageError::fs("open", &data_path, e))?;
    let len = data
        .metadata()
        .map_err(|e| StorageError::fs("stat", &data_path, e))?
        .len();
    if len != manifest.size_bytes {
        // The manifest is the truth; a shorter file only lacks trailing zeroes.
        tracing::warn!(path = %data_path.display(), file_bytes = len, manifest_bytes = manifest.size_bytes, "resizing data file to the manifest's size");
        data.set_len(manifest.size_bytes)
            .map_err(|e| StorageError::fs("size", &data_path, e))?;
    }
    Ok(
        Volume::new(manifest.name, manifest.size_bytes, data, engine, buffers).with_identity(
            VolumeIdentity {
                uuid: manifest.uuid,
                created_unix_secs: manifest.created_unix_secs,
            },
        ),
    )
}

fn check_size(size_bytes: u64) -> Result<(), StorageError> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(VOLUME_ALIGN_BYTES) {
        return Err(StorageError::UnalignedSize(size_bytes));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{EngineConfig, EngineKind};

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
        assert!(matches!(
            reg.create("odd", 4097),
            Err(StorageError::UnalignedSize(4097))
        ));
        // A half-made volume from a crash is cleaned up, a broken one skipped, not deleted.
        std::fs::create_dir(dir.path().join("volumes/.half.creating")).unwrap();
        std::fs::create_dir(dir.path().join("volumes/broken")).unwrap();
        let reg = Registry::open(dir.path(), engine).unwrap();
        assert_eq!(reg.list().len(), 1);
        assert_eq!(reg.get("vol0").unwrap().size_bytes(), 1 << 30);
        assert!(!dir.path().join("volumes/.half.creating").exists());
        assert!(dir.path().join("volumes/broken").exists());
    }

    #[test]
    fn resize_and_remove_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let reg = Registry::open(dir.path(), engine.clone()).unwrap();
        let vol = reg.create("v", 1 << 20).unwrap();
        let uuid = vol.identity().uuid.clone();
        assert_eq!(uuid.len(), 36);
        assert_eq!(reg.resize("v", 2 << 20, false).unwrap(), 1 << 20);
        assert_eq!(vol.size_bytes(), 2 << 20);
        let data_len = |d: &Path| {
            std::fs::metadata(d.join("volumes/v/data.img"))
                .unwrap()
                .len()
        };
        assert_eq!(data_len(dir.path()), 2 << 20);
        assert!(matches!(
            reg.resize("v", 1 << 20, false),
            Err(StorageError::ShrinkNotAllowed { from_bytes, to_bytes, .. })
                if from_bytes == 2 << 20 && to_bytes == 1 << 20
        ));
        let stop = tokio_util::sync::CancellationToken::new();
        let held = vol.attachments().attach(stop).unwrap();
        assert!(matches!(
            reg.resize("v", 1 << 20, true),
            Err(StorageError::Busy { connections: 1, .. })
        ));
        drop(held);
        assert!(matches!(
            reg.resize("v", 1000, true),
            Err(StorageError::UnalignedSize(1000))
        ));
        assert!(matches!(
            reg.resize("nope", 4096, true),
            Err(StorageError::NotFound(_))
        ));

        let reg = Registry::open(dir.path(), engine.clone()).unwrap();
        let vol = reg.get("v").unwrap();
        assert_eq!(vol.size_bytes(), 2 << 20);
        assert_eq!(vol.identity().uuid, uuid);
        assert_eq!(reg.resize("v", 8192, true).unwrap(), 2 << 20);
        assert_eq!(data_len(dir.path()), 8192);

        // Once a deletion has closed the volume, resize treats it as gone.
        assert_eq!(vol.attachments().close(false), Ok(0));
        assert!(matches!(
            reg.resize("v", 4 << 20, false),
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
}
