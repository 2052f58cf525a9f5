//! The per-volume manifest (`volume.json`) and the durable way to write files: temp + fsync +
//! rename + fsync of the directory.
//!
//! A manifest can also be put in place before it is durable ([`VolumeManifest::store_visible`]):
//! snapshot create answers then, and the fsyncs run in the background (`persist.rs`). A crash
//! in that window can leave `volume.json` torn (its rename reached the disk before its bytes);
//! a durable copy of the last durable manifest, `volume.json.prev`, is loaded instead.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::StorageError;

pub const MANIFEST_FILE: &str = "volume.json";
/// A durable copy of the last manifest known durable, for a crash that tears a newer one.
pub const PREV_MANIFEST_FILE: &str = "volume.json.prev";
/// The single data file of a format-1 volume (before layers); migrated at load.
pub const LEGACY_DATA_FILE: &str = "data.img";
pub const FORMAT_VERSION: u32 = 2;
pub(crate) const LEGACY_FORMAT_VERSION: u32 = 1;

/// One layer the volume links: its files are `<id>.data` and `<id>.map` in the volume folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRecord {
    pub id: String,
    /// The layer below; None for the bottom layer.
    pub parent: Option<String>,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    pub name: String,
    /// The frozen layer the snapshot reads through (with its parents).
    pub layer: String,
    pub created_unix_secs: u64,
}

/// A merge that was started and must be finished at the next start: `victim`'s blocks are
/// being folded into `survivor`, after which `victim` leaves the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeRecord {
    pub victim: String,
    pub survivor: String,
    /// True when the survivor is the lower layer (the victim's blocks overwrite it); false
    /// when the victim is the lower layer (its blocks fill the survivor's absent ones).
    pub survivor_is_lower: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeManifest {
    pub format_version: u32,
    pub name: String,
    pub uuid: String,
    pub size_bytes: u64,
    pub created_unix_secs: u64,
    /// The writable layer.
    #[serde(default)]
    pub head: String,
    #[serde(default)]
    pub layers: Vec<LayerRecord>,
    /// Oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord>,
    #[serde(default)]
    pub merge: Option<MergeRecord>,
}

impl VolumeManifest {
    /// Reads the manifest; a format-1 manifest (no layers) is returned as is, with
    /// `format_version` 1, for the caller to migrate.
    #[cfg(test)]
    pub fn load(dir: &Path) -> Result<VolumeManifest, StorageError> {
        VolumeManifest::load_or_previous(dir).map(|(manifest, _)| manifest)
    }

    /// Like [`VolumeManifest::load`], but when `volume.json` is missing or torn (empty, cut
    /// short, garbage: what a crash before its fsync can leave), the previous manifest is
    /// returned instead, with [`ManifestSource::Previous`]. A manifest that parses but is
    /// wrong (an unknown field or format version, a broken tree) is an error, never a reason
    /// to go back: it may come from a newer evsd.
    pub fn load_or_previous(dir: &Path) -> Result<(VolumeManifest, ManifestSource), StorageError> {
        match read_manifest(&dir.join(MANIFEST_FILE)) {
            Ok(manifest) => Ok((manifest, ManifestSource::Current)),
            Err(ReadFailure::Invalid(e)) => Err(e),
            Err(ReadFailure::Torn(e)) => match read_manifest(&dir.join(PREV_MANIFEST_FILE)) {
                Ok(manifest) => {
                    tracing::warn!(
                        dir = %dir.display(),
                        error = %e,
                        "the volume manifest is torn or missing; using the previous one"
                    );
                    Ok((manifest, ManifestSource::Previous))
                }
                Err(_) => Err(e),
            },
        }
    }

    fn to_bytes(&self, dir: &Path) -> Result<Vec<u8>, StorageError> {
        serde_json::to_vec_pretty(self).map_err(|e| StorageError::BadManifest {
            path: dir.join(MANIFEST_FILE),
            reason: e.to_string(),
        })
    }

    /// Writes the manifest durably, then its `.prev` copy: after a crash `volume.json` holds
    /// this manifest or the one before, whole. The caller makes sure no persist of this folder
    /// is pending (`ManifestPersist::settle`), or an older one could overwrite `.prev` after.
    pub fn store(&self, dir: &Path) -> Result<(), StorageError> {
        match self.store_then_previous(dir)? {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// As [`VolumeManifest::store`], telling the two failures apart: Err when `volume.json`
    /// was not written (it may hold this manifest or the one before); Ok(Some) when it holds
    /// this one durably and only the `.prev` copy failed (the change stands, `.prev` is stale).
    pub fn store_then_previous(&self, dir: &Path) -> Result<Option<StorageError>, StorageError> {
        let bytes = self.to_bytes(dir)?;
        write_durably(&dir.join(MANIFEST_FILE), &bytes)?;
        Ok(write_durably(&dir.join(PREV_MANIFEST_FILE), &bytes).err())
    }

    /// Makes `.prev` a durable copy of this manifest (just loaded from `volume.json`) unless it
    /// already is: a crash can leave it one manifest behind, and the next snapshot create
    /// relies on it.
    pub fn store_previous_if_stale(&self, dir: &Path) -> Result<(), StorageError> {
        let prev = dir.join(PREV_MANIFEST_FILE);
        if read_manifest(&prev).ok().as_ref() == Some(self) {
            return Ok(());
        }
        write_durably(&prev, &self.to_bytes(dir)?)
    }

    /// Writes the manifest and renames it into place without any fsync: a restart loads it,
    /// a power loss may not (then `.prev`, the last durable one, is loaded). Nothing may report
    /// data durable that depends on this manifest until [`UnsyncedManifest::sync`] returns.
    pub fn store_visible(&self, dir: &Path) -> Result<UnsyncedManifest, VisibleStoreError> {
        let untouched = |error| VisibleStoreError {
            error,
            in_place: false,
        };
        let started = std::time::Instant::now();
        let bytes = self.to_bytes(dir).map_err(untouched)?;
        let serialized_us = started.elapsed().as_micros() as u64;
        let path = dir.join(MANIFEST_FILE);
        // A fresh name each time: the one before may still hold a replaced manifest that the
        // background persist has not removed yet. Leftovers go at load (`.tmp`).
        static NEXT_TMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT_TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("volume.{n}.tmp"));
        let file = match write_new(&tmp, &bytes) {
            Ok(file) => file,
            Err(e) => {
                // A full disk, say: what was written of it is no use to anyone.
                let _ = std::fs::remove_file(&tmp);
                return Err(untouched(e));
            }
        };
        let written_us = started.elapsed().as_micros() as u64;
        let mut replaced = Vec::new();
        let exchanged = exchange(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            untouched(StorageError::fs("rename", &tmp, e))
        })?;
        if exchanged {
            // The old manifest now sits under the temp name (`.prev` has its durable copy). It
            // is removed in the background: freeing its blocks can stall here (this disk
            // discards freed blocks synchronously).
            replaced.push(tmp);
        }
        let renamed_us = started.elapsed().as_micros() as u64;
        // Opened now: the folder may be renamed (volume delete) before the sync runs.
        let dir_file = File::open(dir).map_err(|e| VisibleStoreError {
            error: StorageError::fs("open", dir, e),
            in_place: true,
        })?;
        tracing::debug!(
            manifest_bytes = bytes.len(),
            serialized_us,
            written_us,
            renamed_us,
            visible_us = started.elapsed().as_micros() as u64,
            "manifest in place, not yet durable"
        );
        Ok(UnsyncedManifest {
            file,
            dir: dir_file,
            dir_path: dir.to_owned(),
            path,
            bytes,
            replaced,
        })
    }

    pub fn is_legacy(&self) -> bool {
        self.format_version == LEGACY_FORMAT_VERSION
    }

    /// The tree is well formed: the head and every parent and snapshot layer exist, ids are
    /// plain file names listed once, parents lead to the bottom without cycles, snapshot names
    /// are listed once and none names the head (the layer writes go to), and sizes are whole
    /// blocks within the largest volume served.
    pub fn check(&self) -> Result<(), String> {
        let sizes =
            std::iter::once(self.size_bytes).chain(self.layers.iter().map(|l| l.size_bytes));
        for size_bytes in sizes {
            if size_bytes % 4096 != 0
                || size_bytes > crate::storage::registry::MAX_VOLUME_SIZE_BYTES
            {
                return Err(format!(
                    "size {size_bytes} bytes is not a whole number of 4 KiB blocks within 64 TiB"
                ));
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            if layer.id.is_empty()
                || !layer.id.bytes().all(|b| b.is_ascii_alphanumeric())
                || layer.id.len() > 64
            {
                return Err(format!("layer id {:?} is not a plain name", layer.id));
            }
            if self.layers[..i].iter().any(|l| l.id == layer.id) {
                return Err(format!("layer {:?} is listed twice", layer.id));
            }
        }
        for (i, snapshot) in self.snapshots.iter().enumerate() {
            if self.snapshots[..i].iter().any(|s| s.name == snapshot.name) {
                return Err(format!("snapshot {:?} is listed twice", snapshot.name));
            }
            if snapshot.layer == self.head {
                return Err(format!(
                    "snapshot {:?} names the head layer {:?}, which takes writes",
                    snapshot.name, self.head
                ));
            }
        }
        if self.layer(&self.head).is_none() {
            return Err(format!("head layer {:?} is not listed", self.head));
        }
        for layer in &self.layers {
            if self.ancestry(&layer.id).is_none() {
                return Err(format!("layer {:?} has a broken parent chain", layer.id));
            }
        }
        if let Some(merge) = &self.merge {
            for id in [&merge.victim, &merge.survivor] {
                if self.layer(id).is_none() {
                    return Err(format!("the recorded merge names missing layer {id:?}"));
                }
            }
        }
        for snapshot in &self.snapshots {
            if self.layer(&snapshot.layer).is_none() {
                return Err(format!(
                    "snapshot {:?} names missing layer {:?}",
                    snapshot.name, snapshot.layer
                ));
            }
        }
        Ok(())
    }

    pub fn layer(&self, id: &str) -> Option<&LayerRecord> {
        self.layers.iter().find(|l| l.id == id)
    }

    pub fn snapshot(&self, name: &str) -> Option<&SnapshotRecord> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    /// `id` and its parents, topmost first; None when a parent is missing or loops.
    pub fn ancestry(&self, id: &str) -> Option<Vec<String>> {
        let mut out = Vec::new();
        let mut next = Some(id.to_owned());
        while let Some(current) = next {
            if out.len() > self.layers.len() {
                return None;
            }
            let record = self.layer(&current)?;
            next = record.parent.clone();
            out.push(current);
        }
        Some(out)
    }

    /// Layers whose parent is `id`.
    pub fn children(&self, id: &str) -> Vec<String> {
        self.layers
            .iter()
            .filter(|l| l.parent.as_deref() == Some(id))
            .map(|l| l.id.clone())
            .collect()
    }

    /// Layers that are not the head, hold no snapshot and have at most one child: no view
    /// needs them on their own, so they can be dropped or merged into their child.
    pub fn redundant_layers(&self) -> Vec<String> {
        self.layers
            .iter()
            .map(|l| l.id.as_str())
            .filter(|id| {
                *id != self.head
                    && !self.snapshots.iter().any(|s| s.layer == *id)
                    && self.children(id).len() <= 1
            })
            .map(str::to_owned)
            .collect()
    }
}

/// Where [`VolumeManifest::load_or_previous`] found the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestSource {
    /// `volume.json`.
    Current,
    /// `volume.json.prev`: the current one was missing or torn.
    Previous,
}

/// Why a manifest file could not be used.
enum ReadFailure {
    /// Missing, empty, cut short or with zero bytes in it: a write a crash cut short.
    Torn(StorageError),
    /// Readable JSON that is not a manifest this evsd accepts, or an I/O error.
    Invalid(StorageError),
}

fn read_manifest(path: &Path) -> Result<VolumeManifest, ReadFailure> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReadFailure::Torn(StorageError::fs("read", path, e)))
        }
        Err(e) => return Err(ReadFailure::Invalid(StorageError::fs("read", path, e))),
    };
    let bad = |reason: String| StorageError::BadManifest {
        path: path.to_owned(),
        reason,
    };
    let manifest: VolumeManifest = serde_json::from_slice(&text).map_err(|e| {
        use serde_json::error::Category;
        // A crash leaves a file cut short or blocks of zeroes. Any other syntax error is an
        // edit gone wrong: falling back to `.prev` would silently undo it and remove the
        // layer files only it names.
        match e.classify() {
            Category::Eof => ReadFailure::Torn(bad(e.to_string())),
            Category::Syntax if text.contains(&0) => ReadFailure::Torn(bad(e.to_string())),
            Category::Syntax | Category::Data | Category::Io => {
                ReadFailure::Invalid(bad(e.to_string()))
            }
        }
    })?;
    if manifest.format_version != FORMAT_VERSION && manifest.format_version != LEGACY_FORMAT_VERSION
    {
        return Err(ReadFailure::Invalid(bad(format!(
            "format_version {} is not {FORMAT_VERSION}",
            manifest.format_version
        ))));
    }
    if manifest.format_version == FORMAT_VERSION {
        manifest.check().map_err(|r| ReadFailure::Invalid(bad(r)))?;
    }
    Ok(manifest)
}

/// A manifest in place but not durable yet (see [`VolumeManifest::store_visible`]).
#[derive(Debug)]
pub struct UnsyncedManifest {
    file: File,
    dir: File,
    dir_path: std::path::PathBuf,
    path: std::path::PathBuf,
    bytes: Vec<u8>,
    /// Replaced manifests left under temp names, to remove once this one is durable.
    replaced: Vec<std::path::PathBuf>,
}

impl UnsyncedManifest {
    /// Makes the manifest durable: its bytes, then its name. Blocking.
    pub fn sync(&self) -> Result<(), StorageError> {
        self.file
            .sync_all()
            .map_err(|e| StorageError::fs("fsync", &self.path, e))?;
        self.dir
            .sync_all()
            .map_err(|e| StorageError::fs("fsync directory", &self.dir_path, e))
    }

    /// Takes over the replaced files of `older`, which this manifest supersedes unsynced.
    pub fn absorb(&mut self, older: UnsyncedManifest) {
        self.replaced.extend(older.replaced);
    }

    /// Removes the replaced manifests (after [`UnsyncedManifest::sync`]). Blocking.
    pub fn remove_replaced(&self) {
        for path in &self.replaced {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::debug!(path = %path.display(), error = %e, "removing a replaced manifest failed; the next load does");
            }
        }
    }

    /// The volume folder (its name when the manifest was written).
    pub fn dir_path(&self) -> &Path {
        &self.dir_path
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Puts `from` in place of `to` atomically. Where `to` exists, the two are swapped
/// (`RENAME_EXCHANGE`) and true returned: a plain rename over an existing file makes ext4
/// (`auto_da_alloc`) start writeback of `from` inside the call, which stalls for tens of
/// milliseconds behind a busy disk, and snapshot create answers only after this. Falls back to
/// a plain rename (false) where the filesystem cannot exchange.
fn exchange(from: &Path, to: &Path) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: both pointers are NUL-terminated strings that live across the call; renameat2
    // only reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // No `to` yet, or no exchange on this filesystem or kernel.
        Some(libc::ENOENT) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            std::fs::rename(from, to).map(|()| false)
        }
        _ => Err(e),
    }
}

/// Creates (or truncates) `path` and writes `bytes` to it, without syncing.
fn write_new(path: &Path, bytes: &[u8]) -> Result<File, StorageError> {
    let mut file = File::create(path).map_err(|e| StorageError::fs("create", path, e))?;
    file.write_all(bytes)
        .map_err(|e| StorageError::fs("write", path, e))?;
    Ok(file)
}

/// A failed [`VolumeManifest::store_visible`]: what failed, and whether `volume.json` may hold
/// the new manifest (false: it was not touched).
#[derive(Debug)]
pub struct VisibleStoreError {
    pub error: StorageError,
    pub in_place: bool,
}

/// Writes `bytes` to `path` so that after a crash the file holds either the old or the new
/// content, never a mix.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let tmp = path.with_extension("tmp");
    let file = write_new(&tmp, bytes)?;
    file.sync_all()
        .map_err(|e| StorageError::fs("fsync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| StorageError::fs("rename", &tmp, e))?;
    if let Some(parent) = parent_dir(path) {
        sync_dir(parent)?;
    }
    Ok(())
}

/// The directory whose entry names `path`. A bare file name ("ready.json") has the empty path
/// as its parent, which cannot be opened: its directory is the current one.
fn parent_dir(path: &Path) -> Option<&Path> {
    match path.parent() {
        Some(parent) if parent.as_os_str().is_empty() => Some(Path::new(".")),
        other => other,
    }
}

pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::fs("fsync directory", dir, e))
}

/// A random RFC 4122 version-4 UUID from the kernel's generator.
pub fn new_uuid() -> Result<String, StorageError> {
    let mut b = [0u8; 16];
    let mut urandom =
        File::open("/dev/urandom").map_err(|e| StorageError::fs("open", "/dev/urandom", e))?;
    std::io::Read::read_exact(&mut urandom, &mut b)
        .map_err(|e| StorageError::fs("read", "/dev/urandom", e))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        assert_eq!(parent_dir(Path::new("ready.json")), Some(Path::new(".")));
        assert_eq!(
            parent_dir(Path::new("run/ready.json")),
            Some(Path::new("run"))
        );
        assert_eq!(parent_dir(Path::new("/ready.json")), Some(Path::new("/")));
        assert_eq!(parent_dir(Path::new("/")), None);
        // What write_durably syncs after its rename must open as a directory.
        sync_dir(parent_dir(Path::new("ready.json")).unwrap()).unwrap();
    }

    #[test]
    fn manifest_round_trip_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let m = VolumeManifest {
            format_version: FORMAT_VERSION,
            name: "vol0".into(),
            uuid: new_uuid().unwrap(),
            size_bytes: 1 << 30,
            created_unix_secs: 1,
            head: "b".into(),
            layers: vec![
                LayerRecord {
                    id: "a".into(),
                    parent: None,
                    size_bytes: 1 << 30,
                },
                LayerRecord {
                    id: "b".into(),
                    parent: Some("a".into()),
                    size_bytes: 1 << 30,
                },
            ],
            snapshots: vec![SnapshotRecord {
                name: "s1".into(),
                layer: "a".into(),
                created_unix_secs: 2,
            }],
            merge: None,
        };
        m.store(dir.path()).unwrap();
        assert_eq!(VolumeManifest::load(dir.path()).unwrap(), m);
        std::fs::write(
            dir.path().join(MANIFEST_FILE),
            br#"{"format_version":1,"bogus":1}"#,
        )
        .unwrap();
        assert!(matches!(
            VolumeManifest::load(dir.path()),
            Err(StorageError::BadManifest { .. })
        ));
        assert_eq!(m.uuid.len(), 36);
        assert_eq!(m.ancestry("b").unwrap(), ["b", "a"]);
        assert_eq!(m.children("a"), ["b"]);
        assert!(m.redundant_layers().is_empty());
    }

    fn one_layer() -> VolumeManifest {
        VolumeManifest {
            format_version: FORMAT_VERSION,
            name: "v".into(),
            uuid: "u".into(),
            size_bytes: 4096,
            created_unix_secs: 0,
            head: "a".into(),
            layers: vec![LayerRecord {
                id: "a".into(),
                parent: None,
                size_bytes: 4096,
            }],
            snapshots: vec![],
            merge: None,
        }
    }

    /// `m` with a snapshot of its head under `name` and a new head `id` above.
    fn snapshotted(m: &VolumeManifest, name: &str, id: &str) -> VolumeManifest {
        let mut next = m.clone();
        next.layers.push(LayerRecord {
            id: id.into(),
            parent: Some(m.head.clone()),
            size_bytes: 4096,
        });
        next.snapshots.push(SnapshotRecord {
            name: name.into(),
            layer: m.head.clone(),
            created_unix_secs: 1,
        });
        next.head = id.into();
        next
    }

    fn read_prev(dir: &Path) -> VolumeManifest {
        read_manifest(&dir.join(PREV_MANIFEST_FILE))
            .ok()
            .expect("a valid previous manifest")
    }

    #[test]
    fn prev_is_the_last_durable_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let m0 = one_layer();
        m0.store(dir.path()).unwrap();
        assert_eq!(read_prev(dir.path()), m0);
        let m1 = snapshotted(&m0, "s1", "b");
        m1.store(dir.path()).unwrap();
        assert_eq!(read_prev(dir.path()), m1);
        let m2 = snapshotted(&m1, "s2", "c");
        let unsynced = m2.store_visible(dir.path()).unwrap();
        // In place at once (a restart loads it); `.prev` stays the durable one.
        assert_eq!(VolumeManifest::load(dir.path()).unwrap(), m2);
        assert_eq!(read_prev(dir.path()), m1);
        unsynced.sync().unwrap();
        unsynced.remove_replaced();
        assert_eq!(
            unsynced.bytes(),
            std::fs::read(dir.path().join(MANIFEST_FILE)).unwrap()
        );
        assert_eq!(
            VolumeManifest::load_or_previous(dir.path()).unwrap(),
            (m2.clone(), ManifestSource::Current)
        );
        m2.store_previous_if_stale(dir.path()).unwrap();
        assert_eq!(read_prev(dir.path()), m2);
        // No temp file is left behind.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [MANIFEST_FILE, PREV_MANIFEST_FILE]);
    }

    #[test]
    fn a_torn_or_missing_manifest_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        let m0 = one_layer();
        m0.store(dir.path()).unwrap();
        let m1 = snapshotted(&m0, "s1", "b");
        drop(m1.store_visible(dir.path()).unwrap());
        let whole = std::fs::read(&path).unwrap();
        let half = whole.len() / 2;
        let mut zero_tail = whole.clone();
        zero_tail[half..].fill(0);
        // What a crash between the rename and the fsyncs can leave in place of the new file.
        for torn in [
            Vec::new(),
            whole[..half].to_vec(),
            whole[..whole.len() - 1].to_vec(),
            vec![0u8; whole.len()],
            zero_tail,
        ] {
            std::fs::write(&path, &torn).unwrap();
            assert_eq!(
                VolumeManifest::load_or_previous(dir.path()).unwrap(),
                (m0.clone(), ManifestSource::Previous),
                "torn manifest of {} bytes",
                torn.len()
            );
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            VolumeManifest::load_or_previous(dir.path()).unwrap(),
            (m0.clone(), ManifestSource::Previous)
        );
        // Nothing to go back to: the error is about volume.json.
        std::fs::remove_file(dir.path().join(PREV_MANIFEST_FILE)).unwrap();
        assert!(matches!(
            VolumeManifest::load_or_previous(dir.path()),
            Err(StorageError::Fs { path, .. }) if path == dir.path().join(MANIFEST_FILE)
        ));
        std::fs::write(&path, b"{\"format_version\": 2, \"na").unwrap();
        assert!(matches!(
            VolumeManifest::load_or_previous(dir.path()),
            Err(StorageError::BadManifest { .. })
        ));
    }

    #[test]
    fn a_whole_manifest_that_is_refused_never_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        let m0 = one_layer();
        m0.store(dir.path()).unwrap();
        m0.store(dir.path()).unwrap();
        assert_eq!(read_prev(dir.path()), m0);
        // From a newer evsd (a field or a format this one does not know), or a broken tree:
        // loading an older manifest instead would silently undo changes.
        let mut newer = serde_json::to_value(snapshotted(&m0, "s1", "b")).unwrap();
        newer["format_version"] = 3.into();
        let mut unknown = serde_json::to_value(snapshotted(&m0, "s1", "b")).unwrap();
        unknown["retention"] = "7d".into();
        let mut broken = snapshotted(&m0, "s1", "b");
        broken.head = "gone".into();
        // Edited by hand with a slip (a trailing comma): not a torn write either.
        let mut edited = serde_json::to_vec_pretty(&snapshotted(&m0, "s1", "b")).unwrap();
        let close = edited.iter().rposition(|&b| b == b'}').unwrap();
        edited.insert(close, b',');
        let refused = [newer, unknown, serde_json::to_value(broken).unwrap()]
            .map(|v| serde_json::to_vec(&v).unwrap());
        for refused in refused.into_iter().chain([edited]) {
            std::fs::write(&path, refused).unwrap();
            assert!(matches!(
                VolumeManifest::load_or_previous(dir.path()),
                Err(StorageError::BadManifest { .. })
            ));
        }
    }

    #[test]
    fn broken_trees_are_refused() {
        let mut m = one_layer();
        m.layers[0].parent = Some("b".into());
        assert!(m.check().unwrap_err().contains("parent"));
        m.layers[0].parent = Some("a".into());
        assert!(m.check().is_err(), "a self-loop is refused");
        m.layers[0].parent = None;
        m.check().unwrap();
        m.merge = Some(MergeRecord {
            victim: "gone".into(),
            survivor: "a".into(),
            survivor_is_lower: false,
        });
        assert!(m.check().unwrap_err().contains("merge"));
        m.merge = None;
        let mut twice = snapshotted(&snapshotted(&m, "s1", "b"), "s1", "c");
        assert!(twice
            .check()
            .unwrap_err()
            .contains("\"s1\" is listed twice"));
        twice.snapshots.pop();
        twice.check().unwrap();
        twice.layers[2].id = "b".into();
        twice.head = "b".into();
        assert!(twice.check().unwrap_err().contains("listed twice"));
        let mut on_head = snapshotted(&m, "s1", "b");
        on_head.snapshots[0].layer = "b".into();
        assert!(on_head.check().unwrap_err().contains("head"));
        for bad in [4097, crate::storage::registry::MAX_VOLUME_SIZE_BYTES + 4096] {
            let mut odd = m.clone();
            odd.size_bytes = bad;
            assert!(odd.check().unwrap_err().contains("4 KiB"));
        }
        m.layers[0].id = "../x".into();
        m.head = "../x".into();
        assert!(m.check().unwrap_err().contains("plain"));
    }
}
