//! A layer's data file opened a second time with O_DIRECT, for bulk writes (restores).
//!
//! A buffered restore spent most of its CPU copying into the page cache, and then left
//! gigabytes dirty for writeback to chase. O_DIRECT sends the caller's buffer to the device.
//! Mixing it with buffered I/O on the same file is coherent for ranges not written both ways
//! at the same moment: the kernel writes back and drops cached pages of a range around each
//! direct write, so later buffered reads see the new bytes. The callers guarantee that (see
//! `Volume::write_bulk`).
//!
//! Only the open file differs: the allocation map, the dirty flag and fdatasync (through the
//! buffered handle, which syncs the inode whichever handle wrote it) stay as for any write.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::io::IoEngine;
use crate::storage::aligned::ALIGN_BYTES;

/// The O_DIRECT handle of one layer, opened on first use. Once the filesystem refuses O_DIRECT
/// (at open or at a write), the layer's bulk writes use the page cache.
#[derive(Default)]
pub struct DirectFile {
    file: OnceLock<Option<Arc<File>>>,
    refused: AtomicBool,
}

impl DirectFile {
    /// Writes `data` at `offset_bytes` with O_DIRECT. `None` means "use the page cache
    /// instead": the buffer or offset is not aligned, or O_DIRECT is refused here.
    pub async fn write(
        &self,
        engine: &IoEngine,
        data_file: &File,
        layer_id: &str,
        offset_bytes: u64,
        data: &Bytes,
    ) -> Option<io::Result<()>> {
        if !is_aligned(offset_bytes, data) {
            return None;
        }
        let file = self.handle(data_file, layer_id)?;
        match engine
            .write_all_at_direct(&file, offset_bytes, data.clone())
            .await
        {
            Err(e) if is_refusal(&e) => {
                // Part of the range may be written already; the buffered rewrite of all of it
                // replaces that part with the same bytes.
                self.refuse(layer_id, &e);
                None
            }
            result => Some(result),
        }
    }

    fn handle(&self, data_file: &File, layer_id: &str) -> Option<Arc<File>> {
        if self.refused.load(Ordering::Relaxed) {
            return None;
        }
        self.file
            .get_or_init(|| match reopen_direct(data_file) {
                Ok(file) => Some(Arc::new(file)),
                Err(e) => {
                    self.refuse(layer_id, &e);
                    None
                }
            })
            .clone()
    }

    /// From now on bulk writes to this layer go through the page cache. Logged for the first
    /// layer only: all layers live under one data directory, so the others say the same.
    pub fn refuse(&self, layer_id: &str, error: &io::Error) {
        static LOGGED: AtomicBool = AtomicBool::new(false);
        self.refused.store(true, Ordering::Relaxed);
        if !LOGGED.swap(true, Ordering::Relaxed) {
            tracing::warn!(layer = layer_id, %error, "O_DIRECT refused on this filesystem; restores write through the page cache");
        }
    }

    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        matches!(self.file.get(), Some(Some(_)))
    }

    #[cfg(test)]
    pub fn is_refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Opens the same inode again through /proc (a dup would share the file status flags, and
/// O_DIRECT must not reach the handle NBD writes use). Works for renamed or hard-linked files.
fn reopen_direct(data_file: &File) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", data_file.as_raw_fd()))
}

fn is_aligned(offset_bytes: u64, data: &Bytes) -> bool {
    !data.is_empty()
        && offset_bytes.is_multiple_of(ALIGN_BYTES as u64)
        && data.len().is_multiple_of(ALIGN_BYTES)
        && (data.as_ptr() as usize).is_multiple_of(ALIGN_BYTES)
}

/// EINVAL is how open(2) and write(2) say a filesystem (or this alignment) cannot do O_DIRECT.
fn is_refusal(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{EngineConfig, EngineKind};
    use crate::storage::aligned::AlignedPool;
    use std::os::unix::fs::FileExt;

    fn engines() -> Vec<IoEngine> {
        let config = EngineConfig {
            inline_cached_io: true,
            ..EngineConfig::default()
        };
        vec![
            IoEngine::new(Some(EngineKind::Uring), &config).unwrap(),
            IoEngine::new(Some(EngineKind::Threads), &config).unwrap(),
        ]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_write_is_seen_by_buffered_reads_of_cached_pages() {
        let pool = AlignedPool::new(64 << 10, 4);
        for engine in engines() {
            let file = tempfile::tempfile().unwrap();
            file.write_all_at(&[1u8; 64 << 10], 0).unwrap();
            // Cached (and dirty) pages of the range before the direct write.
            let mut before = vec![0u8; 64 << 10];
            file.read_exact_at(&mut before, 0).unwrap();
            let mut buf = pool.take(32 << 10);
            buf.fill(9);
            let data = pool.freeze(buf);
            let direct = DirectFile::default();
            let written = direct.write(&engine, &file, "t", 16 << 10, &data).await;
            assert!(matches!(written, Some(Ok(()))), "{written:?}");
            assert!(!direct.is_refused());
            let mut after = vec![0u8; 64 << 10];
            file.read_exact_at(&mut after, 0).unwrap();
            assert!(after[..16 << 10].iter().all(|&b| b == 1));
            assert!(after[16 << 10..48 << 10].iter().all(|&b| b == 9));
            assert!(after[48 << 10..].iter().all(|&b| b == 1));
        }
    }

    #[tokio::test]
    async fn unaligned_writes_are_left_to_the_page_cache() {
        let engine = engines().remove(1);
        let file = tempfile::tempfile().unwrap();
        let direct = DirectFile::default();
        let pool = AlignedPool::new(8192, 1);
        let aligned = pool.freeze(pool.take(8192));
        let odd_len = aligned.slice(..4000);
        let odd_ptr = aligned.slice(512..4608);
        for (offset, data) in [(100, &aligned), (0, &odd_len), (0, &odd_ptr)] {
            assert!(direct
                .write(&engine, &file, "t", offset, data)
                .await
                .is_none());
        }
        assert!(
            !direct.is_refused(),
            "alignment is checked before the kernel is asked"
        );
    }

    #[tokio::test]
    async fn a_refusal_is_remembered() {
        let engine = engines().remove(1);
        let file = tempfile::tempfile().unwrap();
        let direct = DirectFile::default();
        // What a write on a filesystem without O_DIRECT support answers.
        direct.refuse("t", &io::Error::from_raw_os_error(libc::EINVAL));
        let pool = AlignedPool::new(4096, 1);
        let data = pool.freeze(pool.take(4096));
        assert!(direct.write(&engine, &file, "t", 0, &data).await.is_none());
        assert!(direct.is_refused());
        assert!(is_refusal(&io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(!is_refusal(&io::Error::from_raw_os_error(libc::EIO)));
    }
}
