//! The chunk trees of each volume's latest backup, cached on local disk (not in the store).
//!
//! One file per volume, named by its uuid, with a fixed-size record per chunk index: caching a
//! chunk's tree is one write into a file that exists, not a file created per chunk and deleted
//! when the next backup replaces it. A record is the chunk id it is filed under, then the
//! tree's CVs (`ChunkTree::as_bytes`), then which backup snapshot wrote it (`WrittenBy`). It is
//! written in place and not fsynced: `ChunkTree::update` proves every node it uses against the
//! id, so a torn or stale record costs a full read of the chunk, nothing else.
//!
//! A backup overwrites the records of the chunks it names before it completes. Resumed after a
//! stop, it finds them filed under the ids it gave them rather than its parent's: it knows them
//! by `WrittenBy`, and a record it wrote is the tree of its own snapshot's chunk, whatever the
//! parent was.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::backup::chunk::ChunkId;
use crate::backup::tree::{ChunkTree, TREE_NODES};

/// Bytes of one record: the id and the CVs (49,120), padded to a multiple of 4 KiB so a record
/// is whole pages; the padding holds `WrittenBy` (zeroes in records of earlier versions).
const RECORD_BYTES: u64 = (32 + TREE_NODES as u64 * 32).next_multiple_of(4096);
const _: () = assert!(RECORD_BYTES as usize - 32 - TREE_NODES * 32 == 32);

/// The backup snapshot that writes records: a BLAKE3 key derived from its name, which is the
/// backup's own (`vbs-<backup id>`), never reused. A record carries the keyed hash of the id
/// it is filed under (`tag`), not the key alone: the id and the tag lie in different pages of
/// the record, and after a crash of the machine a record may hold one page of a later write
/// and another of an earlier one; a tag of this backup beside an older id must not pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrittenBy([u8; 32]);

impl WrittenBy {
    pub fn snapshot(name: &str) -> WrittenBy {
        WrittenBy(blake3::derive_key(
            "evsd 2026-12-05 chunk tree record written by backup snapshot",
            name.as_bytes(),
        ))
    }

    fn tag(&self, filed_under: &ChunkId) -> [u8; 32] {
        blake3::keyed_hash(&self.0, filed_under.as_bytes()).into()
    }
}
/// The tree file's suffix. Files of the earlier layout (`<uuid>.trees`: 16 KiB span CVs only)
/// are removed by `remove_legacy`.
const SUFFIX: &str = ".trees2";

pub struct TreeCache {
    dir: PathBuf,
}

impl TreeCache {
    pub fn new(dir: PathBuf) -> TreeCache {
        TreeCache { dir }
    }

    fn path(&self, volume_uuid: &str) -> PathBuf {
        self.dir.join(format!("{volume_uuid}{SUFFIX}"))
    }

    /// The tree file of the volume with `volume_uuid`, created when missing. Blocking.
    pub fn open_volume(&self, volume_uuid: &str) -> std::io::Result<VolumeTrees> {
        // The uuid comes from the volume's own metadata; anything that could leave the
        // directory is refused rather than trusted.
        if volume_uuid.is_empty()
            || !volume_uuid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                format!("volume uuid {volume_uuid:?} cannot name a tree file"),
            ));
        }
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(volume_uuid);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        Ok(VolumeTrees {
            file,
            path,
            writing: std::sync::Mutex::new(()),
        })
    }

    /// Forgets the trees of the volume with `volume_uuid`. Blocking.
    pub fn remove_volume(&self, volume_uuid: &str) {
        remove_file(&self.path(volume_uuid));
        remove_file(&self.dir.join(format!("{volume_uuid}.trees")));
    }

    /// Removes the caches of earlier versions, which nothing reads any more: one file per
    /// chunk (`<hex[0..2]>/<hex>`), and one file of span CVs per volume (`<uuid>.trees`).
    /// Blocking.
    pub fn remove_legacy(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let per_chunk_dir = name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if per_chunk_dir && entry.file_type().is_ok_and(|t| t.is_dir()) {
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    tracing::debug!(path = %entry.path().display(), error = %e, "removing old chunk trees failed");
                }
            } else if name
                .strip_suffix(".trees")
                .is_some_and(|uuid| !uuid.contains('.'))
            {
                remove_file(&entry.path());
            }
        }
    }
}

fn remove_file(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "removing chunk trees failed")
        }
    }
}

/// Where record `index` starts, as the kernel's file offset type (None: out of its range).
fn record_offset(index: u64) -> Option<libc::off_t> {
    index
        .checked_mul(RECORD_BYTES)
        .and_then(|offset| libc::off_t::try_from(offset).ok())
}

/// One volume's tree file.
pub struct VolumeTrees {
    file: std::fs::File,
    path: PathBuf,
    /// Held around each record write. Every write takes the file's inode lock, and the
    /// kernel's waiters for that lock spin while its holder copies: with the naming batches of
    /// an incremental writing at once on two cores, that spinning was a tenth of the daemon's
    /// CPU. Waiters on this lock sleep instead.
    writing: std::sync::Mutex<()>,
}

impl VolumeTrees {
    /// Reads chunk `index`'s record into `tree` (memory the caller reuses from chunk to chunk)
    /// and returns the id it is filed under if that is `base`, or if `by` wrote it (a backup
    /// resumed: its record is its snapshot's chunk). None: a miss, and `tree` holds whatever
    /// was read and must not be used. Nothing beyond that is checked here: `ChunkTree::update`
    /// proves what it uses against the id returned. Blocking.
    pub fn load_into(
        &self,
        index: u64,
        base: &ChunkId,
        by: WrittenBy,
        tree: &mut ChunkTree,
    ) -> Option<ChunkId> {
        let offset = record_offset(index)?;
        let mut filed_under = [0u8; 32];
        let mut written_by = [0u8; 32];
        let nodes = tree.as_bytes_mut();
        let wanted_bytes = filed_under.len() + nodes.len() + written_by.len();
        let parts = [
            libc::iovec {
                iov_base: filed_under.as_mut_ptr().cast(),
                iov_len: filed_under.len(),
            },
            libc::iovec {
                iov_base: nodes.as_mut_ptr().cast(),
                iov_len: nodes.len(),
            },
            libc::iovec {
                iov_base: written_by.as_mut_ptr().cast(),
                iov_len: written_by.len(),
            },
        ];
        // SAFETY: each iovec covers exactly a buffer borrowed mutably for the whole call (two
        // local arrays, the tree's nodes), so the kernel writes only into memory we own; the
        // file descriptor stays open while `self` lives.
        let read = unsafe {
            libc::preadv(
                self.file.as_raw_fd(),
                parts.as_ptr(),
                parts.len() as libc::c_int,
                offset,
            )
        };
        if read < 0 {
            let error = std::io::Error::last_os_error();
            tracing::debug!(path = %self.path.display(), index, %error, "cached chunk tree unreadable");
            return None;
        }
        // Short: past the end of the file (no record yet), a miss.
        if read as usize != wanted_bytes {
            return None;
        }
        let filed_under = ChunkId::from_bytes(filed_under);
        (filed_under == *base || written_by == by.tag(&filed_under)).then_some(filed_under)
    }

    /// Files `tree` as chunk `index`'s, under `id`, written `by` a backup's snapshot, from
    /// where it lies (no record is assembled). Blocking; a failure is logged, not returned: a
    /// missing or torn record costs a full read of the chunk, nothing else.
    pub fn store(&self, index: u64, id: &ChunkId, tree: &ChunkTree, by: WrittenBy) {
        // Whole pages are written, so a record not in the page cache is not read back first.
        let Some(offset) = record_offset(index) else {
            tracing::warn!(chunk = %id, index, "chunk index past the tree file's reach; its tree is not cached");
            return;
        };
        let nodes = tree.as_bytes();
        let tag = by.tag(id);
        let parts = [
            libc::iovec {
                iov_base: id.as_bytes().as_ptr().cast_mut().cast(),
                iov_len: 32,
            },
            libc::iovec {
                iov_base: nodes.as_ptr().cast_mut().cast(),
                iov_len: nodes.len(),
            },
            libc::iovec {
                iov_base: tag.as_ptr().cast_mut().cast(),
                iov_len: tag.len(),
            },
        ];
        let writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: each iovec covers exactly a buffer borrowed for the whole call (the id, the
        // tree's nodes, the writer's tag), which pwritev only reads; the file descriptor stays open
        // while `self` lives.
        let written = unsafe {
            libc::pwritev(
                self.file.as_raw_fd(),
                parts.as_ptr(),
                parts.len() as libc::c_int,
                offset,
            )
        };
        drop(writing);
        if written != RECORD_BYTES as isize {
            let error = if written < 0 {
                std::io::Error::last_os_error().to_string()
            } else {
                format!("short write of {written} bytes")
            };
            tracing::warn!(chunk = %id, index, path = %self.path.display(), %error, "caching a chunk tree failed");
        }
    }

    /// Asks the kernel to start reading the records of chunks `first..first + count` into the
    /// page cache. Batches wait for a naming permit with their records already on the way:
    /// read one by one when named, records that fell out of the cache (as after a full backup
    /// and an hour of other work) made an incremental wait on one 48 KiB read at a time.
    /// A hint; failure changes nothing.
    pub fn prefetch(&self, first: u64, count: u64) {
        let (Some(offset), Some(len)) = (record_offset(first), record_offset(count)) else {
            return;
        };
        if len == 0 {
            // A length of 0 would mean "to the end of the file".
            return;
        }
        // SAFETY: a plain syscall on a file descriptor this struct owns and keeps open.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset,
                len,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::chunk::CHUNK_SIZE_BYTES;
    use crate::backup::tree::subtree_cv;

    fn chunk(seed: u8) -> Vec<u8> {
        (0..CHUNK_SIZE_BYTES as usize)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    fn by() -> WrittenBy {
        WrittenBy::snapshot("vbs-b-20261205T000000Z-00000001")
    }

    fn load(trees: &VolumeTrees, index: u64, id: &ChunkId) -> Option<ChunkTree> {
        // Scratch that holds another tree: a hit must overwrite all of it.
        let mut tree = ChunkTree::of_chunk(&chunk(9)).1;
        let other = WrittenBy::snapshot("vbs-other");
        let filed = trees.load_into(index, id, other, &mut tree)?;
        assert_eq!(filed, *id);
        Some(tree)
    }

    #[test]
    fn records_are_returned_only_under_their_id_and_a_torn_one_fails_the_update() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TreeCache::new(dir.path().join("trees"));
        let trees = cache.open_volume("0f3c-uuid").unwrap();
        let (id, tree) = ChunkTree::of_chunk(&chunk(1));
        assert!(load(&trees, 3, &id).is_none());
        trees.store(3, &id, &tree, by());
        let file_len = std::fs::metadata(dir.path().join("trees/0f3c-uuid.trees2"))
            .unwrap()
            .len();
        assert_eq!(
            file_len,
            4 * RECORD_BYTES,
            "whole records, padding included"
        );
        assert_eq!(load(&trees, 3, &id).unwrap(), tree);
        // Another index, another id: misses.
        assert!(load(&trees, 2, &id).is_none());
        assert!(load(&trees, 3, &ChunkId::of(b"other")).is_none());
        // Reopened, the record is still there.
        drop(trees);
        let trees = cache.open_volume("0f3c-uuid").unwrap();
        assert_eq!(load(&trees, 3, &id).unwrap(), tree);
        // A flipped byte in the first block's CV: loaded, but an update of that block refuses it.
        let path = dir.path().join("trees/0f3c-uuid.trees2");
        let mut bytes = std::fs::read(&path).unwrap();
        let at = 3 * RECORD_BYTES as usize + 32;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let mut torn = load(&trees, 3, &id).unwrap();
        let changed = [(0, subtree_cv(0, &[7u8; 4096]))];
        assert!(torn.update(&id, &changed).is_err());
        // A record cut short is a miss.
        std::fs::write(&path, &bytes[..at]).unwrap();
        assert!(load(&trees, 3, &id).is_none());
        cache.remove_volume("0f3c-uuid");
        assert!(!path.exists());
        for hostile in ["", "../x", "a/b", "x.trees\0"] {
            assert!(cache.open_volume(hostile).is_err(), "{hostile:?}");
        }
    }

    /// A backup resumed after a stop finds the records it wrote (filed under the ids it gave
    /// them, not its parent's), and only those.
    #[test]
    fn a_record_is_found_by_the_backup_that_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TreeCache::new(dir.path().join("trees"));
        let trees = cache.open_volume("v-2").unwrap();
        let (parent, _) = ChunkTree::of_chunk(&chunk(1));
        let (id, tree) = ChunkTree::of_chunk(&chunk(2));
        trees.store(5, &id, &tree, by());
        let mut scratch = ChunkTree::of_chunk(&chunk(9)).1;
        assert_eq!(trees.load_into(5, &parent, by(), &mut scratch), Some(id));
        assert_eq!(scratch, tree);
        let other = WrittenBy::snapshot("vbs-b-20261205T000000Z-00000002");
        assert_eq!(trees.load_into(5, &parent, other, &mut scratch), None);
        // Its mark beside another id (the pages of two writes after a crash) does not pass.
        let path = dir.path().join("trees/v-2.trees2");
        let mut bytes = std::fs::read(&path).unwrap();
        let start = 5 * RECORD_BYTES as usize;
        let (older, _) = ChunkTree::of_chunk(&chunk(3));
        bytes[start..start + 32].copy_from_slice(older.as_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(trees.load_into(5, &parent, by(), &mut scratch), None);
        assert_eq!(trees.load_into(5, &older, by(), &mut scratch), Some(older));
        // Records of earlier versions have zeroes there, which no backup's mark equals.
        bytes[start..start + 32].copy_from_slice(id.as_bytes());
        let end = 6 * RECORD_BYTES as usize;
        bytes[end - 32..end].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(trees.load_into(5, &parent, by(), &mut scratch), None);
        assert_eq!(trees.load_into(5, &id, by(), &mut scratch), Some(id));
    }

    #[test]
    fn caches_of_earlier_layouts_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("trees");
        std::fs::create_dir_all(root.join("ab")).unwrap();
        std::fs::write(root.join("ab/abcd"), b"old").unwrap();
        std::fs::write(root.join("v-0.trees"), b"spans").unwrap();
        let cache = TreeCache::new(root.clone());
        drop(cache.open_volume("v-1").unwrap());
        cache.remove_legacy();
        assert!(!root.join("ab").exists());
        assert!(!root.join("v-0.trees").exists());
        assert!(root.join("v-1.trees2").exists());
    }
}
