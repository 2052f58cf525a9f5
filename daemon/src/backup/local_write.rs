//! Chunk objects written to a `file://` store with O_DIRECT.
//!
//! A buffered write copies every byte into the page cache. Under a 4 GiB full backup that copy
//! (copy_folio_from_iter_atomic, into freshly allocated page cache on this VM) was two thirds of
//! the daemon's CPU and held the backup under 1 GB/s. The object is encoded into an aligned
//! buffer instead, written to a staging file with O_DIRECT (whole 4 KiB blocks, the tail padded),
//! cut to its length and renamed into place, as object_store's local store does with its
//! `<key>#<n>` staging files. Durability is unchanged: the sync before the manifest still
//! comes first (`local_sync`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::storage::aligned::ALIGN_BYTES;

static DIRECT_REFUSED: AtomicBool = AtomicBool::new(false);
static NEXT_STAGING: AtomicU64 = AtomicU64::new(0);

/// Writes the first `len` bytes of `padded` (4 KiB-aligned in memory, its length `len` rounded
/// up to whole 4 KiB blocks) as the object at `path`.
pub fn write_object(path: &Path, padded: &[u8], len: usize) -> io::Result<()> {
    debug_assert_eq!(padded.len(), len.next_multiple_of(ALIGN_BYTES));
    debug_assert_eq!(padded.as_ptr() as usize % ALIGN_BYTES, 0);
    let staging = staging_path(path);
    let result = write_staged(&staging, padded, len).and_then(|()| std::fs::rename(&staging, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    result
}

fn staging_path(path: &Path) -> PathBuf {
    let n = NEXT_STAGING.fetch_add(1, Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!("#d{}-{n}", std::process::id()));
    PathBuf::from(name)
}

fn write_staged(staging: &Path, padded: &[u8], len: usize) -> io::Result<()> {
    let (file, direct) = match open(staging) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(staging.parent().expect("a key has a directory"))?;
            open(staging)?
        }
        other => other?,
    };
    if direct {
        file.write_all_at(padded, 0)?;
        file.set_len(len as u64)
    } else {
        file.write_all_at(&padded[..len], 0)
    }
}

/// The staging file opened for writing, with O_DIRECT unless the filesystem refuses it (then
/// buffered, with one warning per process). Returns whether it is direct.
fn open(path: &Path) -> io::Result<(File, bool)> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if !DIRECT_REFUSED.load(Ordering::Relaxed) {
        match options.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(file) => return Ok((file, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                if !DIRECT_REFUSED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        path = %path.display(),
                        "the backup store's filesystem refuses O_DIRECT; chunks are written through the page cache"
                    );
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok((options.open(path)?, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::aligned::AlignedBuf;

    #[test]
    fn objects_of_any_length_read_back_exactly_and_leave_no_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        for (i, len) in [1usize, 4095, 4096, 4097, 3 * 4096 + 24]
            .into_iter()
            .enumerate()
        {
            let mut buf = AlignedBuf::zeroed(len.next_multiple_of(ALIGN_BYTES));
            for (k, b) in buf.iter_mut().enumerate() {
                *b = (k * 7 + i) as u8;
            }
            let path = dir.path().join("chunks").join("ab").join(format!("obj{i}"));
            write_object(&path, &buf, len).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), &buf[..len], "length {len}");
            // Overwriting an object (a re-upload) leaves the new content.
            buf[0] ^= 0xff;
            write_object(&path, &buf, len).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), &buf[..len], "length {len}");
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("chunks").join("ab"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains('#'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
