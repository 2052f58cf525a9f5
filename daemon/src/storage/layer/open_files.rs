//! Layer files open in this process, by device and inode, with how many `Layer`s hold each.
//! A clone hard-links its source's frozen layers: the two volumes' links are one file. Once
//! the source drops its link the clone's is the only one, but a reply of the source's still
//! held on a slow client may still read the file through the source's `Layer`; the clone must
//! not rewrite it in place (a merge copying down, a prune) until that `Layer` is gone.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, OnceLock};

fn open_files() -> &'static Mutex<HashMap<(u64, u64), usize>> {
    static OPEN: OnceLock<Mutex<HashMap<(u64, u64), usize>>> = OnceLock::new();
    OPEN.get_or_init(Mutex::default)
}

/// One `Layer`'s hold on its data file, counted while it lives.
#[derive(Debug)]
pub struct OpenFile {
    key: (u64, u64),
}

impl OpenFile {
    pub fn of(file: &File) -> std::io::Result<OpenFile> {
        let meta = file.metadata()?;
        let key = (meta.dev(), meta.ino());
        *open_files()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert(0) += 1;
        Ok(OpenFile { key })
    }

    /// Whether this is the only `Layer` of the process holding the file.
    pub fn alone(&self) -> bool {
        open_files()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.key)
            .is_some_and(|&holders| holders == 1)
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        let mut open = open_files().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(holders) = open.get_mut(&self.key) {
            *holders -= 1;
            if *holders == 0 {
                open.remove(&self.key);
            }
        }
    }
}
