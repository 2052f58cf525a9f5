//! A volume as the NBD side sees it: read, write, write_zeroes, trim, flush, block_status, size.
//!
//! Today a volume is one sparse file; the snapshot work replaces what sits behind these methods
//! (layered copy-on-write files) without the NBD side noticing.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::error::StorageError;
use crate::io::IoEngine;
use crate::storage::attachments::Attachments;
use crate::storage::buffers::BufferPool;

/// A run of blocks with one allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length_bytes: u64,
    /// Not backed by storage (a hole); writing there may need space.
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

/// How WRITE_ZEROES may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroMode {
    /// The range may be deallocated (no NO_HOLE flag).
    pub may_trim: bool,
    /// Fail with FastZeroUnsupported rather than write zero bytes (FAST_ZERO flag).
    pub fast_only: bool,
}

/// Largest buffer used when zeroes must be written out by hand.
const ZERO_WRITE_CHUNK_BYTES: u64 = 1 << 20;

/// Who a volume is, beyond its name: fixed at creation, shown by the admin socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeIdentity {
    pub uuid: String,
    pub created_unix_secs: u64,
}

pub struct Volume {
    name: String,
    /// Changed online by resize; a connection keeps the size it negotiated.
    size_bytes: AtomicU64,
    identity: VolumeIdentity,
    attachments: Arc<Attachments>,
    data: Arc<File>,
    engine: IoEngine,
    buffers: Arc<BufferPool>,
    /// Cleared the first time the filesystem refuses fallocate modes, so later zeroing goes
    /// straight to writing zero bytes (and FAST_ZERO is refused quickly).
    fallocate_works: AtomicBool,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("size_bytes", &self.size_bytes())
            .finish()
    }
}

impl Volume {
    pub fn new(
        name: String,
        size_bytes: u64,
        data: File,
        engine: IoEngine,
        buffers: Arc<BufferPool>,
    ) -> Volume {
        Volume {
            name,
            size_bytes: AtomicU64::new(size_bytes),
            identity: VolumeIdentity::default(),
            attachments: Arc::new(Attachments::default()),
            data: Arc::new(data),
            engine,
            buffers,
            fallocate_works: AtomicBool::new(true),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn with_identity(mut self, identity: VolumeIdentity) -> Volume {
        self.identity = identity;
        self
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    pub fn identity(&self) -> &VolumeIdentity {
        &self.identity
    }

    /// The NBD connections using this volume.
    pub fn attachments(&self) -> &Arc<Attachments> {
        &self.attachments
    }

    /// Sets the data file's length and fsyncs it; the caller records the size in the manifest
    /// and then publishes it with [`Volume::publish_size`]. Blocking: call it off the runtime.
    pub fn set_file_len(&self, size_bytes: u64) -> Result<(), StorageError> {
        self.data
            .set_len(size_bytes)
            .and_then(|()| self.data.sync_all())
            .map_err(|e| StorageError::Resize {
                name: self.name.clone(),
                size_bytes,
                source: e,
            })
    }

    /// New connections negotiate this size from now on.
    pub fn publish_size(&self, size_bytes: u64) {
        self.size_bytes.store(size_bytes, Ordering::Release);
    }

    /// Whether WRITE_ZEROES with FAST_ZERO can succeed (zeroing is a metadata operation).
    pub fn can_fast_zero(&self) -> bool {
        self.fallocate_works.load(Ordering::Relaxed)
    }

    pub async fn read(
        &self,
        offset_bytes: u64,
        length_bytes: usize,
    ) -> Result<Bytes, StorageError> {
        let buf = self.buffers.take(length_bytes);
        let (buf, result) = self
            .engine
            .read_exact_at(&self.data, offset_bytes, buf)
            .await;
        result.map_err(|e| StorageError::io("read", offset_bytes, length_bytes as u64, e))?;
        Ok(self.buffers.freeze(buf))
    }

    /// Writes `data`; with `fua` it is durable when this returns.
    pub async fn write(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), StorageError> {
        let length_bytes = data.len() as u64;
        self.engine
            .write_all_at(&self.data, offset_bytes, data, fua)
            .await
            .map_err(|e| StorageError::io("write", offset_bytes, length_bytes, e))
    }

    /// Makes the range read as zeroes, deallocating it when allowed.
    pub async fn write_zeroes(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<(), StorageError> {
        let fallocate_mode = if mode.may_trim {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if self.fallocate_works.load(Ordering::Relaxed) {
            match self
                .engine
                .fallocate(&self.data, fallocate_mode, offset_bytes, length_bytes)
                .await
            {
                Ok(()) => return self.sync_if(fua, offset_bytes, length_bytes).await,
                Err(e) if is_unsupported(&e) => {
                    tracing::warn!(volume = %self.name, error = %e, "fallocate unsupported here; zeroing by writing zero bytes");
                    self.fallocate_works.store(false, Ordering::Relaxed);
                }
                Err(e) => {
                    return Err(StorageError::io(
                        "write_zeroes",
                        offset_bytes,
                        length_bytes,
                        e,
                    ))
                }
            }
        }
        if mode.fast_only {
            return Err(StorageError::FastZeroUnsupported {
                offset_bytes,
                length_bytes,
            });
        }
        let zeroes = Bytes::from(vec![0u8; ZERO_WRITE_CHUNK_BYTES.min(length_bytes) as usize]);
        let mut done_bytes = 0;
        while done_bytes < length_bytes {
            let n = (length_bytes - done_bytes).min(ZERO_WRITE_CHUNK_BYTES);
            self.write(offset_bytes + done_bytes, zeroes.slice(..n as usize), false)
                .await?;
            done_bytes += n;
        }
        self.sync_if(fua, offset_bytes, length_bytes).await
    }

    /// Deallocates the range (advisory: the spec lets a server ignore it, so an unsupported
    /// filesystem is not an error).
    pub async fn trim(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        fua: bool,
    ) -> Result<(), StorageError> {
        if !self.fallocate_works.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self
            .engine
            .fallocate(&self.data, mode, offset_bytes, length_bytes)
            .await
        {
            Ok(()) => self.sync_if(fua, offset_bytes, length_bytes).await,
            Err(e) if is_unsupported(&e) => {
                self.fallocate_works.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(StorageError::io("trim", offset_bytes, length_bytes, e)),
        }
    }

    /// Makes every write completed before the call durable, whichever connection sent it: all
    /// connections share this one file and its page cache, which is what makes multi-conn true.
    pub async fn flush(&self) -> Result<(), StorageError> {
        self.engine
            .fdatasync(&self.data)
            .await
            .map_err(|e| StorageError::io("flush", 0, self.size_bytes(), e))
    }

    async fn sync_if(
        &self,
        fua: bool,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<(), StorageError> {
        if !fua {
            return Ok(());
        }
        self.engine
            .fdatasync(&self.data)
            .await
            .map_err(|e| StorageError::io("fua sync", offset_bytes, length_bytes, e))
    }

    /// Prefetch hint (NBD_CMD_CACHE): asks the kernel to read the range ahead.
    pub fn cache(&self, offset_bytes: u64, length_bytes: u64) {
        // SAFETY: posix_fadvise only reads its integer arguments; the fd stays open because
        // `self.data` holds the File for the whole call.
        let _ = unsafe {
            libc::posix_fadvise(
                self.data.as_raw_fd(),
                offset_bytes as libc::off_t,
                length_bytes as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }

    /// Allocation of `[offset, offset+length)` as at most `max_extents` runs, from the file's
    /// holes (SEEK_DATA/SEEK_HOLE). The runs cover the range exactly unless cut short by the cap.
    pub async fn block_status(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, StorageError> {
        let file = Arc::clone(&self.data);
        let end_bytes = offset_bytes
            .saturating_add(length_bytes)
            .min(self.size_bytes());
        let task = tokio::task::spawn_blocking(move || {
            scan_allocation(&file, offset_bytes, end_bytes, max_extents.max(1))
        });
        match task.await {
            Ok(result) => {
                result.map_err(|e| StorageError::io("block_status", offset_bytes, length_bytes, e))
            }
            Err(join) => Err(StorageError::io(
                "block_status",
                offset_bytes,
                length_bytes,
                std::io::Error::other(join),
            )),
        }
    }
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

fn lseek(file: &File, offset_bytes: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek takes the fd by value and touches no memory of ours; `file` keeps it open.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), offset_bytes as libc::off_t, whence) };
    if pos < 0 {
        let e = std::io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after the offset.
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(pos as u64))
}

fn scan_allocation(
    file: &File,
    start: u64,
    end: u64,
    max_extents: usize,
) -> std::io::Result<Vec<Extent>> {
    let mut extents = Vec::new();
    let mut pos = start;
    while pos < end && extents.len() < max_extents {
        let data_at = lseek(file, pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
        if data_at > pos {
            extents.push(Extent {
                length_bytes: data_at - pos,
                hole: true,
                zero: true,
            });
            pos = data_at;
            continue;
        }
        let hole_at = lseek(file, pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        // A filesystem without hole support reports the whole file as data: still truthful.
        let hole_at = hole_at.max(pos + 1).min(end);
        extents.push(Extent {
            length_bytes: hole_at - pos,
            hole: false,
            zero: false,
        });
        pos = hole_at;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{EngineConfig, EngineKind};

    async fn volume(kind: EngineKind, size_bytes: u64) -> (tempfile::TempDir, Volume) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(size_bytes).unwrap();
        // Both the inline page-cache path and the engines proper must give the same results.
        let config = EngineConfig {
            inline_cached_io: kind == EngineKind::Uring,
            ..EngineConfig::default()
        };
        let engine = IoEngine::new(Some(kind), &config).unwrap();
        (
            dir,
            Volume::new(
                "t".into(),
                size_bytes,
                file,
                engine,
                BufferPool::new(1 << 20),
            ),
        )
    }

    #[tokio::test]
    async fn write_read_zero_trim_and_status() {
        for kind in [EngineKind::Uring, EngineKind::Threads] {
            let (_dir, vol) = volume(kind, 4 << 20).await;
            let all = vol.block_status(0, 4 << 20, 100).await.unwrap();
            assert_eq!(
                all,
                [Extent {
                    length_bytes: 4 << 20,
                    hole: true,
                    zero: true
                }]
            );

            vol.write(1 << 20, Bytes::from(vec![0xab; 128 << 10]), false)
                .await
                .unwrap();
            vol.flush().await.unwrap();
            assert!(vol
                .read(1 << 20, 128 << 10)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0xab));
            let map = vol.block_status(0, 4 << 20, 100).await.unwrap();
            assert_eq!(map.iter().map(|e| e.length_bytes).sum::<u64>(), 4 << 20);
            let data: Vec<_> = map.iter().filter(|e| !e.hole).collect();
            assert_eq!(data.len(), 1);

            vol.write_zeroes(
                1 << 20,
                64 << 10,
                ZeroMode {
                    may_trim: true,
                    fast_only: true,
                },
                true,
            )
            .await
            .unwrap();
            assert!(vol
                .read(1 << 20, 64 << 10)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0));
            assert!(vol
                .read((1 << 20) + (64 << 10), 64 << 10)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0xab));

            vol.write_zeroes(
                (1 << 20) + (64 << 10),
                4096,
                ZeroMode {
                    may_trim: false,
                    fast_only: false,
                },
                false,
            )
            .await
            .unwrap();
            assert!(vol
                .read((1 << 20) + (64 << 10), 4096)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0));

            vol.trim(1 << 20, 128 << 10, false).await.unwrap();
            let map = vol.block_status(1 << 20, 128 << 10, 100).await.unwrap();
            assert_eq!(
                map,
                [Extent {
                    length_bytes: 128 << 10,
                    hole: true,
                    zero: true
                }]
            );
            // The cap limits the answer, and a one-extent request never overruns the range.
            let capped = vol.block_status(0, 4 << 20, 1).await.unwrap();
            assert_eq!(capped.len(), 1);
        }
    }
}
