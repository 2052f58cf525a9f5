//! The per-volume manifest (`volume.json`) and the durable way to write files: temp + fsync +
//! rename + fsync of the directory.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::StorageError;

pub const MANIFEST_FILE: &str = "volume.json";
/// The single data file of a format-1 volume (before layers); migrated at load.
pub const LEGACY_DATA_FILE: &str = "data.img";
pub const FORMAT_VERSION: u32 = 2;
const LEGACY_FORMAT_VERSION: u32 = 1;

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
    pub fn load(dir: &Path) -> Result<VolumeManifest, StorageError> {
        let path = dir.join(MANIFEST_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| StorageError::fs("read", &path, e))?;
        let manifest: VolumeManifest =
            serde_json::from_str(&text).map_err(|e| StorageError::BadManifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if manifest.format_version != FORMAT_VERSION
            && manifest.format_version != LEGACY_FORMAT_VERSION
        {
            return Err(StorageError::BadManifest {
                path,
                reason: format!(
                    "format_version {} is not {FORMAT_VERSION}",
                    manifest.format_version
                ),
            });
        }
        if manifest.format_version == FORMAT_VERSION {
            manifest
                .check()
                .map_err(|reason| StorageError::BadManifest { path, reason })?;
        }
        Ok(manifest)
    }

    pub fn store(&self, dir: &Path) -> Result<(), StorageError> {
        let text = serde_json::to_vec_pretty(self).map_err(|e| StorageError::BadManifest {
            path: dir.join(MANIFEST_FILE),
            reason: e.to_string(),
        })?;
        write_durably(&dir.join(MANIFEST_FILE), &text)
    }

    pub fn is_legacy(&self) -> bool {
        self.format_version == LEGACY_FORMAT_VERSION
    }

    /// The tree is well formed: the head and every parent and snapshot layer exist, ids are
    /// plain file names, and parents lead to the bottom without cycles.
    pub fn check(&self) -> Result<(), String> {
        for layer in &self.layers {
            if layer.id.is_empty()
                || !layer.id.bytes().all(|b| b.is_ascii_alphanumeric())
                || layer.id.len() > 64
            {
                return Err(format!("layer id {:?} is not a plain name", layer.id));
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

/// Writes `bytes` to `path` so that after a crash the file holds either the old or the new
/// content, never a mix.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(|e| StorageError::fs("create", &tmp, e))?;
    file.write_all(bytes)
        .map_err(|e| StorageError::fs("write", &tmp, e))?;
    file.sync_all()
        .map_err(|e| StorageError::fs("fsync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| StorageError::fs("rename", &tmp, e))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
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

    #[test]
    fn broken_trees_are_refused() {
        let mut m = VolumeManifest {
            format_version: FORMAT_VERSION,
            name: "v".into(),
            uuid: "u".into(),
            size_bytes: 4096,
            created_unix_secs: 0,
            head: "a".into(),
            layers: vec![LayerRecord {
                id: "a".into(),
                parent: Some("b".into()),
                size_bytes: 4096,
            }],
            snapshots: vec![],
            merge: None,
        };
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
        m.layers[0].id = "../x".into();
        m.head = "../x".into();
        assert!(m.check().unwrap_err().contains("plain"));
    }
}
