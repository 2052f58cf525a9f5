//! One daemon per data directory: an exclusive lock on `DATA_DIR/evsd.lock`, held as long as
//! the process lives. The kernel drops it however the process ends, `kill -9` included, so a
//! crashed daemon never keeps its successor out.
//!
//! Two daemons on one directory would each keep their own map of the same volume files: one
//! would write under a snapshot the other had just frozen.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const LOCK_FILE_NAME: &str = "evsd.lock";

#[derive(Debug, thiserror::Error)]
pub enum DataDirLockError {
    #[error("creating data directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("opening {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "data directory {dir} is in use by another evsd ({holder}); one daemon per data directory"
    )]
    InUse { dir: PathBuf, holder: String },
    #[error("locking {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
}

/// Held while the daemon runs; dropping it (or exiting) frees the directory.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Creates `data_dir` if needed and locks it, or says which process holds it.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, DataDirLockError> {
        std::fs::create_dir_all(data_dir).map_err(|source| DataDirLockError::Create {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(LOCK_FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| DataDirLockError::Open {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(DataDirLockError::InUse {
                    dir: data_dir.to_path_buf(),
                    holder: holder(&mut file),
                })
            }
            Err(TryLockError::Error(source)) => {
                return Err(DataDirLockError::Lock { path, source });
            }
        }
        // Only the holder writes its pid, for the message another daemon gives. Nothing
        // depends on it: the lock, not the file's content, keeps others out.
        let pid = format!("pid {}\n", std::process::id());
        let written = file
            .set_len(0)
            .and_then(|()| file.write_all(pid.as_bytes()));
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "could not record our pid in the lock file");
        }
        Ok(DataDirLock { _file: file })
    }
}

/// What the lock file says about its holder ("pid N"), read without trusting it much.
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.take(64).read_to_string(&mut text);
    let text = text.trim();
    if text.starts_with("pid ") && text[4..].bytes().all(|b| b.is_ascii_digit()) && text.len() > 4 {
        text.to_owned()
    } else {
        "pid unknown".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let first = DataDirLock::acquire(&data_dir).unwrap();
        match DataDirLock::acquire(&data_dir) {
            Err(DataDirLockError::InUse { holder, .. }) => {
                assert_eq!(holder, format!("pid {}", std::process::id()))
            }
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        DataDirLock::acquire(&data_dir).expect("the directory is free again");
    }

    #[test]
    fn a_lock_file_with_garbage_names_no_pid() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE_NAME), "pid 12\u{1b}[31m x").unwrap();
        let mut file = File::open(dir.path().join(LOCK_FILE_NAME)).unwrap();
        assert_eq!(holder(&mut file), "pid unknown");
    }
}
