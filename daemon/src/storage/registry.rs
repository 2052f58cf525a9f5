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
use crate::storage::volume::Volume;

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
                // A creation that crashed before its rename: never visible, safe to drop.
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
        if size_bytes == 0 || !size_bytes.is_multiple_of(VOLUME_ALIGN_BYTES) {
            return Err(StorageError::UnalignedSize(size_bytes));
        }
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
    Ok(Volume::new(
        manifest.name,
        manifest.size_bytes,
        data,
        engine,
        buffers,
    ))
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
}
