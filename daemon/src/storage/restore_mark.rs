//! The mark a volume carries while a restore overwrites it (`restore.json` in its folder):
//! written durably before the first byte is restored, removed once the restore has completed.
//! A volume whose restore failed, was cancelled or was cut short by a crash with its job lost
//! keeps the mark, and refuses NBD clients until a restore into it succeeds, it is rolled back
//! to a snapshot, or it is deleted: half of a backup's data over half of the old data is a
//! disk no client should boot from.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::storage::manifest::{sync_dir, write_durably};

pub const RESTORE_MARK_FILE: &str = "restore.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreMark {
    /// The backup being written over the volume.
    pub backup_id: String,
    /// The job writing it.
    pub job_id: String,
    pub started_unix_secs: u64,
    /// The volume was created for this restore and holds nothing else (marks of earlier
    /// versions have no such field: not known, so never taken for one).
    #[serde(default)]
    pub made_for_restore: bool,
    /// The server backup whose restore (all or nothing) this is part of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_id: Option<String>,
}

/// The job id an unreadable mark carries (no job id has this form).
const UNREADABLE_JOB_ID: &str = "(unknown)";

impl RestoreMark {
    /// Whether this mark stands for a mark file that could not be read: what restore (of which
    /// set) it was is not known.
    pub fn is_unreadable(&self) -> bool {
        self.job_id == UNREADABLE_JOB_ID
    }

    /// What a client refused because of the mark is told.
    pub fn refusal(&self, volume: &str) -> String {
        format!(
            "volume {volume} holds an incomplete restore of backup {} (job {}): it accepts \
             clients once a restore into it succeeds",
            self.backup_id, self.job_id
        )
    }

    /// The mark in `dir`, if any. One that cannot be read still marks the volume (it was
    /// written, so a restore started): its fields then say so.
    pub fn load(dir: &Path) -> Option<RestoreMark> {
        let path = dir.join(RESTORE_MARK_FILE);
        match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(mark) => Some(mark),
                Err(e) => Some(unreadable(&path, &e.to_string())),
            },
            Err(e) => Some(unreadable(&path, &e.to_string())),
        }
    }

    pub fn store(&self, dir: &Path) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| StorageError::BadManifest {
            path: dir.join(RESTORE_MARK_FILE),
            reason: e.to_string(),
        })?;
        write_durably(&dir.join(RESTORE_MARK_FILE), &bytes)
    }

    /// Removes the mark in `dir` durably; no mark is no error.
    pub fn remove(dir: &Path) -> Result<(), StorageError> {
        let path = dir.join(RESTORE_MARK_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::fs("remove", &path, e)),
        }
    }
}

fn unreadable(path: &Path, error: &str) -> RestoreMark {
    tracing::warn!(path = %path.display(), error, "unreadable restore mark: the volume still counts as holding an incomplete restore");
    RestoreMark {
        backup_id: format!("(unknown: {} unreadable: {error})", path.display()),
        job_id: UNREADABLE_JOB_ID.into(),
        started_unix_secs: 0,
        made_for_restore: false,
        set_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_survives_until_removed_and_a_torn_one_still_marks() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RestoreMark::load(dir.path()), None);
        RestoreMark::remove(dir.path()).unwrap();
        let mark = RestoreMark {
            backup_id: "b-20261203T000000Z-1a2b3c4d".into(),
            job_id: "j-0123456789ab".into(),
            started_unix_secs: 7,
            made_for_restore: false,
            set_id: None,
        };
        mark.store(dir.path()).unwrap();
        assert_eq!(RestoreMark::load(dir.path()), Some(mark.clone()));
        assert!(mark.refusal("vol1").contains("b-20261203T000000Z-1a2b3c4d"));
        RestoreMark::remove(dir.path()).unwrap();
        assert_eq!(RestoreMark::load(dir.path()), None);

        std::fs::write(dir.path().join(RESTORE_MARK_FILE), b"{\"backup_").unwrap();
        let torn = RestoreMark::load(dir.path()).expect("a torn mark still marks");
        assert!(torn.backup_id.contains("unreadable"), "{torn:?}");
    }
}
