//! A head layer made ahead of time. Creating a layer's two files and its map costs milliseconds
//! (more on a busy filesystem, and more for a large volume's map); a snapshot create that had to
//! do it would spend them while its caller waits. So each volume keeps one empty layer ready,
//! made in the background after every freeze.
//!
//! The spare is named by no manifest until a freeze takes it: after a crash it is an orphan, and
//! the next load removes its files like any other.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::layer::{self, Layer};

#[derive(Debug, Default)]
pub struct SpareHead {
    slot: Arc<Mutex<Option<Arc<Layer>>>>,
}

fn lock(slot: &Mutex<Option<Arc<Layer>>>) -> MutexGuard<'_, Option<Arc<Layer>>> {
    // The slot is replaced whole: recover from poisoning.
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes the files of a layer nobody will use.
fn discard(dir: &Path, layer: &Layer) {
    for path in [
        layer::data_path(dir, layer.id()),
        layer::map_path(dir, layer.id()),
    ] {
        let _ = std::fs::remove_file(path);
    }
}

/// A folder's device and inode.
fn folder_identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

impl SpareHead {
    /// The spare, if one is ready for a volume of `size_bytes`. One made for another size (the
    /// volume was resized since) is removed.
    pub fn take(&self, dir: &Path, size_bytes: u64) -> Option<Arc<Layer>> {
        let spare = lock(&self.slot).take()?;
        if spare.size_bytes() == size_bytes {
            return Some(spare);
        }
        discard(dir, &spare);
        None
    }

    /// The ready spare's layer id.
    #[cfg(test)]
    pub fn id(&self) -> Option<String> {
        lock(&self.slot).as_ref().map(|layer| layer.id().to_owned())
    }

    /// Makes a spare for a volume of `size_bytes` in `dir` on the blocking pool, unless one is
    /// ready. Does nothing outside a tokio runtime (tools and tests that load volumes).
    pub fn replenish(&self, dir: &Path, size_bytes: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if lock(&self.slot).is_some() {
            return;
        }
        // The folder this volume has now: one deleted meanwhile is renamed away, and a volume
        // made again under its name has another folder at the same path.
        let Some(folder) = folder_identity(dir) else {
            return;
        };
        let slot = Arc::clone(&self.slot);
        let dir: PathBuf = dir.to_owned();
        runtime.spawn_blocking(move || make(&dir, folder, size_bytes, &slot));
    }
}

/// Makes a spare in `dir` and puts it in `slot`, unless the folder at `dir` is no longer
/// `folder` once it is made.
fn make(dir: &Path, folder: (u64, u64), size_bytes: u64, slot: &Mutex<Option<Arc<Layer>>>) {
    let made = layer::new_layer_id().and_then(|id| Layer::create(dir, &id, size_bytes));
    match made {
        Ok(layer) if folder_identity(dir) != Some(folder) => {
            tracing::debug!(dir = %dir.display(), "the volume's folder changed while its spare head was made");
            discard(dir, &layer);
        }
        Ok(layer) => {
            let mut slot = lock(slot);
            if slot.is_none() {
                *slot = Some(Arc::new(layer));
            } else {
                // Another replenish got there first.
                discard(dir, &layer);
            }
        }
        // The volume may have been deleted meanwhile (its folder renamed away); a freeze
        // without a spare makes its head itself.
        Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "no spare head layer"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn ready(spare: &SpareHead) {
        for _ in 0..500 {
            if lock(&spare.slot).is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("no spare made");
    }

    fn layer_files(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[tokio::test]
    async fn made_in_the_background_and_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let spare = SpareHead::default();
        assert!(spare.take(dir.path(), 1 << 20).is_none());
        spare.replenish(dir.path(), 1 << 20);
        ready(&spare).await;
        assert_eq!(layer_files(dir.path()), 2, "a data file and a map");
        spare.replenish(dir.path(), 1 << 20);
        let layer = spare.take(dir.path(), 1 << 20).expect("the spare");
        assert_eq!(layer.size_bytes(), 1 << 20);
        assert_eq!(layer.map().data_blocks(), 0, "empty");
        assert!(spare.take(dir.path(), 1 << 20).is_none(), "taken once");
        assert_eq!(
            layer_files(dir.path()),
            2,
            "the second replenish made nothing"
        );
    }

    #[tokio::test]
    async fn one_made_for_another_size_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spare = SpareHead::default();
        spare.replenish(dir.path(), 1 << 20);
        ready(&spare).await;
        assert!(spare.take(dir.path(), 2 << 20).is_none());
        assert_eq!(layer_files(dir.path()), 0);
    }

    /// The volume was deleted and made again under its name while the spare was made: the
    /// new folder gets no stray files.
    #[test]
    fn one_made_after_the_folder_changed_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("v");
        std::fs::create_dir(&dir).unwrap();
        let before = folder_identity(&dir).unwrap();
        std::fs::rename(&dir, root.path().join(".deleted-v")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        assert_ne!(folder_identity(&dir), Some(before));
        let slot = Mutex::new(None);
        make(&dir, before, 1 << 20, &slot);
        assert!(lock(&slot).is_none());
        assert_eq!(layer_files(&dir), 0);
        // Made where the folder is still the same, it is kept.
        let now = folder_identity(&dir).unwrap();
        make(&dir, now, 1 << 20, &slot);
        assert!(lock(&slot).is_some());
        assert_eq!(layer_files(&dir), 2);
    }

    #[test]
    fn nothing_outside_a_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let spare = SpareHead::default();
        spare.replenish(dir.path(), 1 << 20);
        assert!(spare.take(dir.path(), 1 << 20).is_none());
        assert_eq!(layer_files(dir.path()), 0);
    }
}
