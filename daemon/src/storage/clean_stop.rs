//! Whether a volume's last run ended with its files in order: a marker the shutdown leaves in
//! the volume's folder once nothing can write the volume any more and its layers are synced,
//! and that every load takes away (durably) before anything can write again.
//!
//! Why it matters: a write's bytes can reach the head's data file without the map entry that
//! makes them its block's (the daemon killed between the two, or a power loss that kept the
//! data page and lost the map page). Those bytes lie under a block the map calls absent, which
//! reads from the layers below, as it should. But when that block is written again and marked
//! "written", and a later crash loses the new bytes, the open after it finds bytes behind the
//! block and keeps it as data (see `layer/written.rs`): the first write's bytes come back,
//! though the block read as the layers below at every FLUSH since. So a load after anything but
//! a clean stop punches what the head holds under blocks that are not data
//! (`Layer::punch_unmapped`), and a load after a clean stop, where nothing can lie there, skips
//! that walk over the head's data.

use std::path::{Path, PathBuf};

use super::manifest::sync_dir;
use crate::error::StorageError;

/// The marker's name in a volume's folder.
const MARKER: &str = "clean-stop";

fn marker_path(dir: &Path) -> PathBuf {
    dir.join(MARKER)
}

/// Takes the marker away: true when the last run ended cleanly. Its removal is made durable
/// before this returns, so a crash in this run is never taken for a clean stop. A marker that
/// cannot be removed counts as no marker (the caller walks the head), and is logged: the next
/// load would trust it.
pub fn take(dir: &Path) -> bool {
    let path = marker_path(dir);
    match std::fs::remove_file(&path) {
        Ok(()) => match sync_dir(dir) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot make the removal of the clean-stop marker durable; checking the head as after a crash");
                false
            }
        },
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "cannot remove the clean-stop marker; checking the head as after a crash, but a crash in this run would be taken for a clean stop");
            false
        }
    }
}

/// Leaves the marker, durably. Call only once nothing writes the volume any more and every
/// layer is synced.
pub fn record(dir: &Path) -> Result<(), StorageError> {
    let path = marker_path(dir);
    std::fs::File::create(&path).map_err(|e| StorageError::fs("create", &path, e))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!take(dir.path()), "no marker: not a clean stop");
        record(dir.path()).unwrap();
        assert!(marker_path(dir.path()).exists());
        assert!(take(dir.path()));
        assert!(!marker_path(dir.path()).exists());
        assert!(!take(dir.path()), "taken: a crash from now on is not clean");
    }
}
