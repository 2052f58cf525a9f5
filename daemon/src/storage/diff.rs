//! What readers outside the NBD path (the backup uploader) need of a volume's frozen
//! snapshots: which blocks changed between two of them, and a guard that keeps a snapshot
//! from being deleted while it is read.

use std::sync::Arc;

use crate::error::StorageError;
use crate::storage::entry::{chain_of, VolumeEntry};

/// Keeps a snapshot from being deleted until dropped (see [`VolumeEntry::pin_snapshot`]).
pub struct SnapshotPin {
    entry: Arc<VolumeEntry>,
    name: String,
}

impl Drop for SnapshotPin {
    fn drop(&mut self) {
        let mut pins = self.entry.pins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = pins.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.name);
            }
        }
    }
}

/// Blocks the walk of [`VolumeEntry::changed_between`] lists at a time (256 MiB): what it holds
/// besides the caller's fold is one window's runs, whatever the volume's size.
const CHANGED_WALK_WINDOW_BLOCKS: u64 = 1 << 16;

impl VolumeEntry {
    /// Folds into `init`, in order, the block runs `[start, end)` whose content in snapshot
    /// `name` may differ from snapshot `base`, read from the layer maps alone (no data is
    /// read). A run may come in pieces (the walk goes window by window). None when `base` is
    /// not an ancestor of `name` (a rollback cut it out of the line): everything must be read.
    ///
    /// The walk takes a step per changed block (seconds over terabytes just restored): it runs
    /// on the blocking pool over the chain's layers, the volume's state lock long released
    /// (a freeze, and FLUSHes behind it, would otherwise wait for it). Merges meanwhile only
    /// add blocks that read the same through every view, and the layers stay readable.
    pub async fn changed_between<T, F>(
        &self,
        base: &str,
        name: &str,
        init: T,
        mut fold: F,
    ) -> Result<Option<T>, StorageError>
    where
        T: Send + 'static,
        F: FnMut(&mut T, u64, u64) + Send + 'static,
    {
        let (chain, layers_above) = {
            let state = self.lock();
            let manifest = &state.manifest;
            let not_found = |snapshot: &str| StorageError::SnapshotNotFound {
                volume: self.name().to_owned(),
                name: snapshot.to_owned(),
            };
            let top = manifest.snapshot(name).ok_or_else(|| not_found(name))?;
            let below = manifest.snapshot(base).ok_or_else(|| not_found(base))?;
            let chain = chain_of(manifest, &state.layers, &top.layer)?;
            let Some(layers_above) = chain.position(&below.layer) else {
                return Ok(None);
            };
            (chain, layers_above)
        };
        let walk = tokio::task::spawn_blocking(move || {
            let blocks = chain.top().blocks();
            let mut folded = init;
            let mut start = 0;
            while start < blocks {
                let end = blocks.min(start + CHANGED_WALK_WINDOW_BLOCKS);
                for (a, z, changed) in chain.changed_runs(layers_above, start, end) {
                    if changed {
                        fold(&mut folded, a, z);
                    }
                }
                start = end;
            }
            folded
        });
        walk.await.map(Some).map_err(|e| {
            StorageError::io(
                "list the blocks changed between two snapshots",
                0,
                0,
                std::io::Error::other(e.to_string()),
            )
        })
    }

    /// Refuses the deletion of snapshot `name` until the returned pin is dropped.
    pub fn pin_snapshot(self: &Arc<Self>, name: &str) -> Result<SnapshotPin, StorageError> {
        // Under the state lock, which a delete holds from its last pin check to its commit:
        // a pin either comes first and refuses the delete, or finds the snapshot gone.
        let state = self.lock();
        if state.manifest.snapshot(name).is_none() {
            return Err(StorageError::SnapshotNotFound {
                volume: self.name().to_owned(),
                name: name.to_owned(),
            });
        }
        *self
            .pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_owned())
            .or_default() += 1;
        drop(state);
        Ok(SnapshotPin {
            entry: Arc::clone(self),
            name: name.to_owned(),
        })
    }

    pub(crate) fn is_pinned(&self, name: &str) -> bool {
        self.pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }
}
