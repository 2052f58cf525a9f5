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
use crate::storage::buffers::BufferPool;
use crate::storage::layer::chain::Chain;
use crate::storage::layer::{self, blocks_for, BlockState, Layer, BLOCK_BYTES};
use crate::storage::manifest::{self, LayerRecord, VolumeManifest, LEGACY_DATA_FILE};
use crate::storage::name::validate_volume_name;
use crate::storage::volume::{Volume, VolumeIdentity};

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
}

pub(crate) struct EntryState {
    pub manifest: VolumeManifest,
    pub layers: HashMap<String, Arc<Layer>>,
    /// Snapshot name -> its read-only export.
    pub views: BTreeMap<String, Arc<Volume>>,
}

pub fn now_unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
        let mut manifest = VolumeManifest::load(dir)?;
        validate_volume_name(&manifest.name)?;
        if manifest.is_legacy() {
            manifest = migrate_legacy(dir, manifest)?;
        }
        remove_orphans(dir, &manifest);
        let mut layers = HashMap::new();
        for record in &manifest.layers {
            let layer = Layer::open(dir, &record.id, record.size_bytes)?;
            layers.insert(record.id.clone(), Arc::new(layer));
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
        let entry = VolumeEntry {
            dir: dir.to_owned(),
            engine,
            buffers,
            volume: Arc::new(volume),
            state: Mutex::new(EntryState {
                manifest,
                layers,
                views: BTreeMap::new(),
            }),
            admin: tokio::sync::Mutex::new(()),
            pins: Mutex::new(HashMap::new()),
        };
        {
            let mut state = entry.lock();
            entry.refresh(&mut state)?;
        }
        Ok(entry)
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
        let manifest = &state.manifest;
        state.layers.retain(|id, _| manifest.layer(id).is_some());
        let chain = chain_of(manifest, &state.layers, &manifest.head)?;
        let ancestry = manifest.ancestry(&manifest.head).unwrap_or_default();
        let bases = manifest
            .snapshots
            .iter()
            .filter(|s| ancestry.contains(&s.layer))
            .map(|s| (s.name.clone(), s.layer.clone()))
            .collect();
        self.volume.set_chain(chain);
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
                    Arc::new(
                        Volume::read_only_view(
                            format!("{}@{}", manifest.name, snapshot.name),
                            size_bytes,
                            chain,
                            self.engine.clone(),
                            Arc::clone(&self.buffers),
                        )
                        .with_identity(self.volume.identity().clone()),
                    )
                }
            };
            views.insert(snapshot.name.clone(), view);
        }
        // Views of deleted snapshots: nobody can attach any more.
        for (_, gone) in std::mem::replace(&mut state.views, views) {
            let _ = gone.attachments().close(true);
        }
        Ok(())
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
        next.store(&self.dir)?;
        if let Some(writer) = self.volume.writer() {
            writer
                .commit_failed
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        state.manifest = next;
        self.refresh(state)
    }

    /// Changes the volume's size online (see `Registry::resize` for the rules). The head's
    /// files grow or shrink; when a layer below is larger than the old size (the volume was
    /// shrunk after a snapshot), the regrown blocks are masked as zero so old data never
    /// reappears.
    pub async fn resize(&self, size_bytes: u64) -> Result<u64, StorageError> {
        let _admin = self.admin.lock().await;
        let Some(writer) = self.volume.writer() else {
            return Err(StorageError::ReadOnly(self.name().to_owned()));
        };
        let _gate = writer.gate.write().await;
        let mut state = self.lock();
        let old_bytes = state.manifest.size_bytes;
        if old_bytes == size_bytes {
            return Ok(old_bytes);
        }
        let head_id = state.manifest.head.clone();
        let head = Arc::clone(&state.layers[&head_id]);
        let resized = head.resized(&self.dir, size_bytes)?;
        if size_bytes > old_bytes {
            let chain = self.volume.chain();
            let largest_below = chain.layers()[1..]
                .iter()
                .map(|l| l.size_bytes())
                .max()
                .unwrap_or(0);
            if largest_below > old_bytes {
                let from = blocks_for(old_bytes);
                let to = blocks_for(largest_below.min(size_bytes));
                resized.set_range(from, to, BlockState::Zero);
                // A partial last block of the old size: its tail must not show old data
                // either; sizes are 4096-aligned, so there is none.
                debug_assert_eq!(old_bytes % BLOCK_BYTES, 0);
            }
        }
        let mut next = state.manifest.clone();
        next.size_bytes = size_bytes;
        if let Some(record) = next.layers.iter_mut().find(|l| l.id == head_id) {
            record.size_bytes = size_bytes;
        }
        state.layers.insert(head_id, Arc::new(resized));
        self.commit(&mut state, next)?;
        self.volume.publish_size(size_bytes);
        Ok(old_bytes)
    }
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

/// Layer files (and temp files) that the manifest does not name.
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
            _ => false,
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
            f.set_len(layer::blockmap::map_file_bytes(blocks_for(
                legacy.size_bytes,
            )))
        })
        .map_err(|e| StorageError::fs("create", &map_path, e))?;
    let layer = Layer::open(dir, &id, legacy.size_bytes)?;
    for (start, end) in data_ranges(layer.data(), legacy.size_bytes)
        .map_err(|e| StorageError::fs("scan", &new, e))?
    {
        layer.set_range(
            start / BLOCK_BYTES,
            end.div_ceil(BLOCK_BYTES),
            BlockState::Data,
        );
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

/// Byte ranges holding data, from SEEK_DATA/SEEK_HOLE: used once, to migrate a format-1 file.
fn data_ranges(file: &std::fs::File, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |pos: u64, whence: i32| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek takes the fd by value and touches no memory of ours; `file` keeps it
        // open for the call.
        let at = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
        if at < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(at as u64))
    };
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < end {
        let Some(data) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        ranges.push((data, hole.max(data + 1)));
        pos = hole.max(data + 1);
    }
    Ok(ranges)
}
