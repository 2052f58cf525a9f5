//! The per-volume manifest (`volume.json`) and the durable way to write files: temp + fsync +
//! rename + fsync of the directory.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::StorageError;

pub const MANIFEST_FILE: &str = "volume.json";
pub const DATA_FILE: &str = "data.img";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeManifest {
    pub format_version: u32,
    pub name: String,
    pub uuid: String,
    pub size_bytes: u64,
    pub created_unix_secs: u64,
}

impl VolumeManifest {
    pub fn load(dir: &Path) -> Result<VolumeManifest, StorageError> {
        let path = dir.join(MANIFEST_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| StorageError::fs("read", &path, e))?;
        let manifest: VolumeManifest =
            serde_json::from_str(&text).map_err(|e| StorageError::BadManifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(StorageError::BadManifest {
                path,
                reason: format!(
                    "format_version {} is not {FORMAT_VERSION}",
                    manifest.format_version
                ),
            });
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
    }
}
