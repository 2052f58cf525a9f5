//! The object store backups live in: chunks, manifests and locks under one prefix, reached
//! through the object_store crate (a local directory by default, any S3-compatible service by
//! URL). Keys are documented in docs/backup-format.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use crate::backup::chunk::{self, ChunkId};
use crate::backup::error::BackupError;
use crate::backup::local_read;
use crate::backup::local_sync::LocalSync;
use crate::backup::local_write;
use crate::backup::manifest::{self, BackupManifest};
use crate::backup::pack::{self, PackedAt};
use crate::storage::aligned::AlignedPool;

/// The largest backup-set record read: one names its members (about 100 bytes each), and a
/// server has tens of volumes, not tens of thousands.
const MAX_SET_RECORD_BYTES: u64 = 16 << 20;

/// The largest manifest read: one of the largest volume, every chunk named with its delta
/// bases down the deepest chain (`MAX_DELTA_DEPTH`) and each one's pack location (about 3 KiB
/// of JSON per chunk at most), with room to spare. A larger object under a manifest's name is
/// damaged or not ours, and read whole it could exhaust memory.
const MAX_MANIFEST_BYTES: u64 =
    (crate::storage::registry::MAX_VOLUME_SIZE_BYTES / chunk::CHUNK_SIZE_BYTES) * 4096 + (1 << 20);

/// S3 settings from the config file; each overrides the matching AWS_* environment variable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub allow_http: Option<bool>,
}

/// One listed object: its key below the store's prefix, size and the store's modification time.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub size_bytes: u64,
    pub modified_unix_secs: i64,
}

pub struct BackupStore {
    url: String,
    objects: Arc<dyn ObjectStore>,
    /// The same store with fsync after each put (local directories only): manifests and
    /// locks, whose loss after a power cut would lose a backup or break the GC protocol.
    durable: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// The local directory behind a `file://` store.
    local_root: Option<PathBuf>,
    /// What a local store wrote and has not made durable yet (see `local_sync`).
    local_sync: Option<Arc<LocalSync>>,
}

impl std::fmt::Debug for BackupStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupStore")
            .field("url", &self.url)
            .finish()
    }
}

impl BackupStore {
    /// Opens the store at `url`: `file:///abs/dir` (created if missing) or `s3://BUCKET/PREFIX`.
    pub fn open(url: &str, s3: &S3Options) -> Result<BackupStore, BackupError> {
        let bad = |reason: String| BackupError::BadStoreUrl {
            url: url.to_owned(),
            reason,
        };
        if let Some(path) = url.strip_prefix("file://") {
            let dir = PathBuf::from(path);
            if !dir.is_absolute() {
                return Err(bad("a file:// URL needs an absolute path".into()));
            }
            std::fs::create_dir_all(&dir).map_err(|e| bad(format!("creating it: {e}")))?;
            let plain = LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| bad(e.to_string()))?
                .with_automatic_cleanup(true);
            let durable = LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| bad(e.to_string()))?
                .with_automatic_cleanup(true)
                .with_fsync(true);
            return Ok(BackupStore {
                url: url.to_owned(),
                objects: Arc::new(plain),
                durable: Arc::new(durable),
                prefix: ObjectPath::default(),
                local_sync: Some(LocalSync::new(dir.clone())),
                local_root: Some(dir),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("an s3:// URL needs a bucket: s3://BUCKET/PREFIX".into()));
            }
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                // The uploader retries with its own backoff (and reports it); the client's
                // retries only smooth over a lost packet.
                .with_retry(RetryConfig {
                    backoff: BackoffConfig::default(),
                    max_retries: 2,
                    retry_timeout: Duration::from_secs(20),
                });
            if let Some(endpoint) = &s3.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if let Some(region) = &s3.region {
                builder = builder.with_region(region);
            }
            if let Some(key) = &s3.access_key_id {
                builder = builder.with_access_key_id(key);
            }
            if let Some(secret) = &s3.secret_access_key {
                builder = builder.with_secret_access_key(secret);
            }
            if let Some(allow) = s3.allow_http {
                builder = builder.with_allow_http(allow);
            }
            let store: Arc<dyn ObjectStore> =
                Arc::new(builder.build().map_err(|e| bad(e.to_string()))?);
            let prefix = ObjectPath::parse(prefix.trim_matches('/'))
                .map_err(|e| bad(format!("prefix {prefix:?}: {e}")))?;
            return Ok(BackupStore {
                url: url.to_owned(),
                objects: Arc::clone(&store),
                durable: store,
                prefix,
                local_root: None,
                local_sync: None,
            });
        }
        Err(bad("use file:///DIR or s3://BUCKET/PREFIX".into()))
    }

    /// The default store: `DATA_DIR/backups`.
    pub fn default_url(data_dir: &Path) -> Result<String, BackupError> {
        std::fs::create_dir_all(data_dir).map_err(|e| BackupError::BadStoreUrl {
            url: data_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let abs = std::fs::canonicalize(data_dir).map_err(|e| BackupError::BadStoreUrl {
            url: data_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(format!("file://{}", abs.join("backups").display()))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.as_ref().is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn strip<'a>(&self, location: &'a ObjectPath) -> &'a str {
        let full = location.as_ref();
        let prefix = self.prefix.as_ref();
        if prefix.is_empty() {
            full
        } else {
            full.strip_prefix(prefix)
                .and_then(|k| k.strip_prefix('/'))
                .unwrap_or(full)
        }
    }

    /// Stores a chunk object from an aligned buffer: `padded` is the object's `len` bytes
    /// followed by padding to whole 4 KiB blocks. A local store writes it with O_DIRECT (see
    /// `local_write`); other stores get the `len` bytes.
    pub async fn put_chunk_padded(
        &self,
        id: &ChunkId,
        padded: Bytes,
        len: usize,
    ) -> Result<(), BackupError> {
        self.put_padded(chunk::chunk_key(id), padded, len).await
    }

    async fn put_padded(&self, key: String, padded: Bytes, len: usize) -> Result<(), BackupError> {
        let Some(root) = &self.local_root else {
            self.objects
                .put(
                    &self.path(&key),
                    PutPayload::from_bytes(padded.slice(..len)),
                )
                .await
                .map_err(|e| BackupError::store("put", key, e))?;
            return Ok(());
        };
        // A file:// store has no prefix: the key is the path below its root.
        let path = root.join(&key);
        let sync = self.local_sync.clone();
        let written = tokio::task::spawn_blocking(move || {
            local_write::write_object(&path, &padded, len)?;
            // Recorded here, not after the await: a cancelled upload's write still ends in
            // the store, and must not end there unrecorded.
            Ok::<_, std::io::Error>(sync.is_some_and(|sync| sync.record(path, len as u64)))
        })
        .await
        .map_err(|e| BackupError::Failed(format!("a worker thread failed: {e}")))?;
        let sync_due = written.map_err(|e| {
            let source = local_read::store_error(&key, e);
            BackupError::store("put", key, source)
        })?;
        if sync_due {
            if let Some(sync) = &self.local_sync {
                sync.start_background();
            }
        }
        Ok(())
    }

    pub async fn get_chunk(&self, id: &ChunkId) -> Result<Bytes, BackupError> {
        let key = chunk::chunk_key(id);
        let result = self
            .objects
            .get(&self.path(&key))
            .await
            .map_err(|e| BackupError::store("get", &key, e))?;
        // Not read whole when larger than any valid object (damaged, or not ours).
        if result.meta.size > chunk::MAX_OBJECT_BYTES {
            return Err(chunk::ChunkError::LengthMismatch {
                id: *id,
                what: "stored object (at most)",
                expected: chunk::MAX_OBJECT_BYTES,
                actual: result.meta.size,
            }
            .into());
        }
        result
            .bytes()
            .await
            .map_err(|e| BackupError::store("get", key, e))
    }

    /// As [`Self::get_chunk`], but a local store's file is read into a buffer from `buffers`
    /// (see `local_read`); other stores' objects come in buffers of their own.
    pub async fn get_chunk_pooled(
        &self,
        id: &ChunkId,
        buffers: &Arc<AlignedPool>,
    ) -> Result<Bytes, BackupError> {
        let Some(root) = &self.local_root else {
            return self.get_chunk(id).await;
        };
        let key = chunk::chunk_key(id);
        // A file:// store has no prefix: the key is the path below its root.
        let path = root.join(&key);
        let buffers = Arc::clone(buffers);
        let read = tokio::task::spawn_blocking(move || local_read::read_object(&path, &buffers))
            .await
            .map_err(|e| BackupError::Failed(format!("a worker thread failed: {e}")))?;
        read.map_err(|e| {
            let source = local_read::store_error(&key, e);
            BackupError::store("get", key, source)
        })
    }

    /// The first `len` bytes of a chunk object (its header), without reading the rest.
    pub async fn get_chunk_prefix(&self, id: &ChunkId, len: u64) -> Result<Bytes, BackupError> {
        let key = chunk::chunk_key(id);
        self.objects
            .get_range(&self.path(&key), 0..len)
            .await
            .map_err(|e| BackupError::store("get", key, e))
    }

    pub async fn delete_chunk(&self, id: &ChunkId) -> Result<(), BackupError> {
        let key = chunk::chunk_key(id);
        self.delete(&key).await
    }

    /// Stores pack `name` (see `pack`): the first `len` bytes of `padded`, which is aligned
    /// and padded for a local store's O_DIRECT write (see `local_write`).
    pub async fn put_pack(&self, name: &str, padded: Bytes, len: usize) -> Result<(), BackupError> {
        let key = pack::pack_key(name);
        self.put_padded(key, padded, len).await
    }

    /// The packed object at `at`: a ranged read of its pack.
    pub async fn get_packed(&self, at: &PackedAt) -> Result<Bytes, BackupError> {
        let key = pack::pack_key(&at.pack);
        let path = self.path(&key);
        let range = at.offset_bytes..at.offset_bytes + at.len_bytes;
        match self.objects.get_range(&path, range.clone()).await {
            Ok(bytes) => Ok(bytes),
            Err(error) => {
                // A pack cut short fails the ranged read with an error that looks like any
                // other (retried without end): when the pack is there but ends before the
                // range, the chunk is missing, which no retry cures.
                if !matches!(error, object_store::Error::NotFound { .. }) {
                    if let Ok(meta) = self.objects.head(&path).await {
                        if meta.size < range.end {
                            let reason = format!(
                                "the pack holds {} bytes; the chunk lies at {}..{}",
                                meta.size, range.start, range.end
                            );
                            let source = object_store::Error::NotFound {
                                path: key.clone(),
                                source: reason.into(),
                            };
                            return Err(BackupError::store("get", key, source));
                        }
                    }
                }
                Err(BackupError::store("get", key, error))
            }
        }
    }

    pub async fn delete_pack(&self, name: &str) -> Result<(), BackupError> {
        self.delete(&pack::pack_key(name)).await
    }

    /// Every pack in the store with its size.
    pub async fn list_packs(&self) -> Result<HashMap<String, u64>, BackupError> {
        Ok(self
            .list("packs")
            .await?
            .into_iter()
            .filter_map(|l| pack::parse_pack_key(&l.key).map(|name| (name, l.size_bytes)))
            .collect())
    }

    /// Every chunk in the store with its stored size: one LIST per thousand chunks instead of
    /// a HEAD per chunk.
    pub async fn list_chunks(&self) -> Result<HashMap<ChunkId, u64>, BackupError> {
        Ok(self
            .list("chunks")
            .await?
            .into_iter()
            .filter_map(|l| chunk::parse_chunk_key(&l.key).map(|id| (id, l.size_bytes)))
            .collect())
    }

    /// Whether chunk `id` is stored as an object of its own of a plausible size. An error
    /// counts as no.
    pub async fn has_chunk(&self, id: &ChunkId) -> bool {
        let key = chunk::chunk_key(id);
        match self.objects.head(&self.path(&key)).await {
            Ok(meta) => chunk::plausible_object_len(meta.size),
            Err(object_store::Error::NotFound { .. }) => false,
            Err(error) => {
                tracing::debug!(key, %error, "asking the store for a chunk failed");
                false
            }
        }
    }

    /// Writes a manifest after making the chunks it names durable (local stores): what this
    /// daemon wrote, and the `foreign` chunks it names that others wrote.
    pub async fn put_manifest(
        &self,
        manifest: &BackupManifest,
        foreign: &[ChunkId],
    ) -> Result<(), BackupError> {
        if let (Some(sync), Some(root)) = (&self.local_sync, &self.local_root) {
            let started = std::time::Instant::now();
            // A file:// store has no prefix: the key is the path below its root.
            let foreign = foreign
                .iter()
                .map(|id| root.join(chunk::chunk_key(id)))
                .collect();
            sync.sync(foreign).await?;
            // Every object the manifest names, whole chunks and packs: none may be one whose
            // fdatasync failed (it was removed), whichever sync found it.
            let named: Vec<PathBuf> = manifest
                .chunks
                .iter()
                .flatten()
                .chain(manifest.delta_bases.values())
                .map(|id| root.join(chunk::chunk_key(id)))
                .chain(
                    manifest
                        .packed
                        .values()
                        .map(|at| root.join(pack::pack_key(&at.pack))),
                )
                .collect();
            sync.check_named(&named)?;
            tracing::debug!(
                sync_ms = started.elapsed().as_millis() as u64,
                "backup store synced before its manifest"
            );
        }
        self.put_durable(
            manifest::manifest_key(&manifest.backup_id),
            manifest.to_json_bytes(),
        )
        .await
    }

    /// Reads and validates a manifest (format version, digest, chunk count).
    pub async fn get_manifest(&self, backup_id: &str) -> Result<BackupManifest, BackupError> {
        manifest::validate_backup_id(backup_id)?;
        let key = manifest::manifest_key(backup_id);
        // A manifest lists every chunk of its volume (about 70 bytes per 4 MiB chunk, more with
        // deltas and packs): bounded by the largest volume, not by a small fixed size.
        let bytes = match self.get(&key, MAX_MANIFEST_BYTES).await {
            Err(BackupError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => return Err(BackupError::BackupNotFound(backup_id.to_owned())),
            other => other?,
        };
        Ok(BackupManifest::from_json_bytes(backup_id, &bytes)?)
    }

    /// Whether the manifest of backup `backup_id` is stored.
    pub async fn has_manifest(&self, backup_id: &str) -> Result<bool, BackupError> {
        manifest::validate_backup_id(backup_id)?;
        let key = manifest::manifest_key(backup_id);
        match self.objects.head(&self.path(&key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(BackupError::Store {
                op: "head",
                key,
                source,
            }),
        }
    }

    pub async fn list_manifest_ids(&self) -> Result<Vec<String>, BackupError> {
        let mut ids: Vec<String> = self
            .list("manifests")
            .await?
            .into_iter()
            .filter_map(|l| manifest::parse_manifest_key(&l.key))
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub async fn delete_manifest(&self, backup_id: &str) -> Result<(), BackupError> {
        manifest::validate_backup_id(backup_id)?;
        self.delete_durable(&manifest::manifest_key(backup_id))
            .await
    }

    /// Backup sets (server backups): `backup-sets/<id>.json`, written after their members.
    pub async fn put_set(&self, set_id: &str, body: Vec<u8>) -> Result<(), BackupError> {
        manifest::validate_backup_id(set_id)?;
        self.put_durable(format!("backup-sets/{set_id}.json"), body)
            .await
    }

    pub async fn get_set(&self, set_id: &str) -> Result<Bytes, BackupError> {
        manifest::validate_backup_id(set_id)?;
        match self
            .get(&format!("backup-sets/{set_id}.json"), MAX_SET_RECORD_BYTES)
            .await
        {
            Err(BackupError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Err(BackupError::SetNotFound(set_id.to_owned())),
            other => other,
        }
    }

    pub async fn list_set_ids(&self) -> Result<Vec<String>, BackupError> {
        let mut ids: Vec<String> = self
            .list("backup-sets")
            .await?
            .into_iter()
            .filter_map(|l| {
                let id = l.key.strip_prefix("backup-sets/")?.strip_suffix(".json")?;
                manifest::validate_backup_id(id).ok()?;
                Some(id.to_owned())
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub async fn delete_set(&self, set_id: &str) -> Result<(), BackupError> {
        manifest::validate_backup_id(set_id)?;
        self.delete_durable(&format!("backup-sets/{set_id}.json"))
            .await
    }

    pub async fn put_lock(&self, name: &str, body: Vec<u8>) -> Result<(), BackupError> {
        self.put_durable(format!("locks/{name}"), body).await
    }

    pub async fn delete_lock(&self, name: &str) -> Result<(), BackupError> {
        self.delete(&format!("locks/{name}")).await
    }

    /// The lock objects: (file name, store modification time).
    pub async fn list_locks(&self) -> Result<Vec<Listed>, BackupError> {
        Ok(self
            .list("locks")
            .await?
            .into_iter()
            .map(|mut l| {
                l.key = l.key.trim_start_matches("locks/").to_owned();
                l
            })
            .collect())
    }

    async fn put_durable(&self, key: String, body: Vec<u8>) -> Result<(), BackupError> {
        self.durable
            .put(&self.path(&key), PutPayload::from(body))
            .await
            .map(|_| ())
            .map_err(|e| BackupError::store("put", key, e))
    }

    /// Reads a whole object, refused unread when larger than `max_bytes` (damaged, or not
    /// ours): every listing reads these.
    async fn get(&self, key: &str, max_bytes: u64) -> Result<Bytes, BackupError> {
        let path = self.path(key);
        let result = self
            .objects
            .get(&path)
            .await
            .map_err(|e| BackupError::store("get", key, e))?;
        if result.meta.size > max_bytes {
            return Err(BackupError::Failed(format!(
                "object {key:?} holds {} bytes, more than the {max_bytes} any valid one does",
                result.meta.size
            )));
        }
        result
            .bytes()
            .await
            .map_err(|e| BackupError::store("get", key, e))
    }

    /// `delete`, durable before it returns on a local store (its folder fsynced): a manifest or
    /// set record whose removal a power cut undid would name chunks or members a GC deleted
    /// after it. (S3 deletes are durable once answered.)
    async fn delete_durable(&self, key: &str) -> Result<(), BackupError> {
        self.delete(key).await?;
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let object = root.join(self.path(key).as_ref());
        let Some(dir) = object.parent().map(std::path::Path::to_path_buf) else {
            return Ok(());
        };
        // No folder: nothing was there to remove.
        let sync_dir = move || match std::fs::File::open(&dir) {
            Ok(folder) => folder.sync_all(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        let synced = tokio::task::spawn_blocking(sync_dir)
            .await
            .map_err(std::io::Error::other)
            .and_then(|synced| synced);
        synced
            .map_err(|e| BackupError::Failed(format!("making the removal of {key:?} durable: {e}")))
    }

    async fn delete(&self, key: &str) -> Result<(), BackupError> {
        match self.durable.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(BackupError::store("delete", key, e)),
        }
    }

    async fn list(&self, dir: &str) -> Result<Vec<Listed>, BackupError> {
        let prefix = self.path(dir);
        let mut stream = self.objects.list(Some(&prefix));
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = match meta {
                Ok(meta) => meta,
                // A listing of a prefix nobody wrote yet (a fresh local store).
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => return Err(BackupError::store("list", dir, e)),
            };
            out.push(Listed {
                key: self.strip(&meta.location).to_owned(),
                size_bytes: meta.size,
                modified_unix_secs: meta.last_modified.timestamp(),
            });
        }
        Ok(out)
    }
}

impl BackupStore {
    /// Removes the staging files (`<key>#<n>`) that uploads to a local store left when the
    /// daemon died mid-write and that are older than `min_age` (younger ones may be live
    /// uploads of another daemon sharing the directory). Returns how many went.
    pub async fn remove_stale_staging(&self, min_age: Duration) -> u64 {
        let Some(root) = self.local_root.clone() else {
            return 0;
        };
        tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            let mut dirs = vec![
                root.join("chunks"),
                root.join("manifests"),
                root.join("packs"),
            ];
            while let Some(dir) = dirs.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let path = entry.path();
                    let Ok(meta) = entry.metadata() else { continue };
                    if meta.is_dir() {
                        dirs.push(path);
                        continue;
                    }
                    let stale = meta
                        .modified()
                        .ok()
                        .and_then(|m| m.elapsed().ok())
                        .is_some_and(|age| age >= min_age);
                    if stale
                        && entry.file_name().to_string_lossy().contains('#')
                        && std::fs::remove_file(&path).is_ok()
                    {
                        removed += 1;
                    }
                }
            }
            removed
        })
        .await
        .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_store() -> (tempfile::TempDir, BackupStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let store = BackupStore::open(&url, &Default::default()).unwrap();
        (dir, store)
    }

    /// A backup-set record larger than any valid one is refused without being read whole;
    /// one within the cap reads back.
    #[tokio::test]
    async fn a_manifest_larger_than_any_volume_needs_is_refused_unread() {
        let (dir, store) = local_store();
        let id = "b-20261206T000000Z-0a1b2c3d";
        let path = dir.path().join(manifest::manifest_key(id));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // Sparse: nothing is written, and nothing may be read.
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_MANIFEST_BYTES + 1).unwrap();
        match store.get_manifest(id).await {
            Err(BackupError::Failed(message)) => {
                assert!(message.contains("more than"), "{message}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Manifest and set record deletes on a local store sync the folder they were in (not
    /// observable short of a power cut); one of an object, or a folder, never written is no
    /// error.
    #[tokio::test]
    async fn durable_deletes_remove_the_object_and_take_one_never_written() {
        let (dir, store) = local_store();
        let id = "s-20261207T000000Z-0a1b2c3d";
        store.delete_set(id).await.unwrap();
        store
            .delete_manifest("b-20261207T000000Z-0a1b2c3d")
            .await
            .unwrap();
        store.put_set(id, b"{}".to_vec()).await.unwrap();
        assert_eq!(store.list_set_ids().await.unwrap(), [id]);
        store.delete_set(id).await.unwrap();
        assert!(store.list_set_ids().await.unwrap().is_empty());
        assert!(!dir.path().join(format!("backup-sets/{id}.json")).exists());
        store.delete_set(id).await.unwrap();
    }

    #[tokio::test]
    async fn an_oversized_set_record_is_refused_unread() {
        let (_dir, store) = local_store();
        let id = "s-20261206T000000Z-0a1b2c3d";
        store.put_set(id, b"{}".to_vec()).await.unwrap();
        assert_eq!(&store.get_set(id).await.unwrap()[..], b"{}");
        let big = vec![b' '; MAX_SET_RECORD_BYTES as usize + 1];
        store.put_set(id, big).await.unwrap();
        match store.get_set(id).await {
            Err(BackupError::Failed(message)) => {
                assert!(message.contains("more than"), "{message}")
            }
            other => panic!("expected a refusal, got {:?}", other.map(|b| b.len())),
        }
    }
}
