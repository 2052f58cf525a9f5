//! Which backups this daemon is reading (restores, verifies) or deleting, so that the two never
//! overlap: a delete takes a backup's manifest and then its chunks from under a reader, and a
//! reader starting on a backup being deleted would fail halfway, after overwriting its target.
//! Both sides take their hold before their first look at the manifest, under one lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::backup::error::BackupError;

#[derive(Default)]
struct Counts {
    reading: HashMap<String, usize>,
    deleting: HashMap<String, usize>,
}

#[derive(Clone, Default)]
pub struct BackupHolds {
    counts: Arc<Mutex<Counts>>,
}

/// Held while a backup is read; released on drop.
pub struct ReadHold {
    holds: BackupHolds,
    backup_id: String,
}

/// Held while a backup is deleted; released on drop.
pub struct DeleteHold {
    holds: BackupHolds,
    backup_id: String,
}

impl BackupHolds {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refused while the backup is being deleted.
    pub fn read(&self, backup_id: &str) -> Result<ReadHold, BackupError> {
        let mut counts = self.lock();
        if counts.deleting.contains_key(backup_id) {
            return Err(BackupError::BackupInUse {
                backup_id: backup_id.to_owned(),
                doing: "being deleted: it will be gone",
            });
        }
        *counts.reading.entry(backup_id.to_owned()).or_default() += 1;
        Ok(ReadHold {
            holds: self.clone(),
            backup_id: backup_id.to_owned(),
        })
    }

    /// Refused while a restore or verify job reads the backup.
    pub fn delete(&self, backup_id: &str) -> Result<DeleteHold, BackupError> {
        let mut counts = self.lock();
        if counts.reading.contains_key(backup_id) {
            return Err(BackupError::BackupInUse {
                backup_id: backup_id.to_owned(),
                doing: "being read by a restore or verify job: try again once that has ended",
            });
        }
        *counts.deleting.entry(backup_id.to_owned()).or_default() += 1;
        Ok(DeleteHold {
            holds: self.clone(),
            backup_id: backup_id.to_owned(),
        })
    }

    /// Holds every one of `backup_ids` for deleting, or none.
    pub fn delete_all(&self, backup_ids: &[String]) -> Result<Vec<DeleteHold>, BackupError> {
        backup_ids.iter().map(|id| self.delete(id)).collect()
    }
}

fn release(map: &mut HashMap<String, usize>, backup_id: &str) {
    if let Some(count) = map.get_mut(backup_id) {
        *count -= 1;
        if *count == 0 {
            map.remove(backup_id);
        }
    }
}

impl Drop for ReadHold {
    fn drop(&mut self) {
        release(&mut self.holds.lock().reading, &self.backup_id);
    }
}

impl Drop for DeleteHold {
    fn drop(&mut self) {
        release(&mut self.holds.lock().deleting, &self.backup_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_and_deleting_one_backup_exclude_each_other_until_released() {
        let holds = BackupHolds::default();
        let read = holds.read("b-1").unwrap();
        let second_read = holds.read("b-1").unwrap();
        assert!(matches!(
            holds.delete("b-1"),
            Err(BackupError::BackupInUse { .. })
        ));
        let other = holds.delete("b-2").unwrap();
        drop(read);
        assert!(holds.delete("b-1").is_err(), "one reader is left");
        drop(second_read);
        let deleting = holds.delete("b-1").unwrap();
        let _twice = holds.delete("b-1").unwrap();
        assert!(holds.read("b-1").is_err());
        assert!(holds.read("b-2").is_err());
        drop(other);
        holds.read("b-2").unwrap();
        drop(deleting);
        assert!(holds.read("b-1").is_err(), "one delete is left");
        drop(_twice);
        holds.read("b-1").unwrap();
        // All or none: a read of one of them refuses the lot.
        let _r = holds.read("b-4").unwrap();
        let ids = ["b-3".to_owned(), "b-4".to_owned()];
        assert!(holds.delete_all(&ids).is_err());
        holds.read("b-3").unwrap();
    }
}
