//! The page-cache fast path: `preadv2`/`pwritev2` with RWF_NOWAIT.
//!
//! With RWF_NOWAIT the kernel completes the call only if it can without blocking (the pages are
//! cached, or a buffered write can be absorbed) and fails with EAGAIN otherwise. So a tokio
//! worker can try it inline without ever stalling, and only operations that would really touch
//! the disk take the trip to a ring thread. That trip (two cross-thread wake-ups) costs more CPU
//! than the copy itself for a 4 KiB page-cache hit.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the kernel and filesystem accept RWF_NOWAIT at all; cleared on the first EOPNOTSUPP
/// (or EINVAL from a kernel that predates the flag), so unsupported setups pay for one try only.
pub(crate) struct NoWait {
    reads: AtomicBool,
    writes: AtomicBool,
}

impl NoWait {
    pub(crate) fn new(enabled: bool) -> NoWait {
        NoWait {
            reads: AtomicBool::new(enabled),
            writes: AtomicBool::new(enabled),
        }
    }

    /// `Some(result)` when the read finished without blocking, `None` when it must be queued.
    pub(crate) fn try_read(
        &self,
        file: &File,
        offset: u64,
        buf: &mut [u8],
    ) -> Option<io::Result<usize>> {
        if buf.is_empty() || !self.reads.load(Ordering::Relaxed) {
            return None;
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` points at `buf`, which is exclusively borrowed and valid for `buf.len()`
        // bytes for the whole (synchronous) call; the fd is kept open by `file`.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        self.outcome(n, &self.reads)
    }

    /// Behaves as on a filesystem without non-blocking buffered writes (ext4).
    #[cfg(test)]
    pub(crate) fn refuse_writes_for_test(&self) {
        self.writes.store(false, Ordering::Relaxed);
    }

    /// Whether non-blocking buffered reads are still believed to work here.
    #[cfg(test)]
    pub(crate) fn reads_inline(&self) -> bool {
        self.reads.load(Ordering::Relaxed)
    }

    /// Whether non-blocking buffered writes are still believed to work here.
    pub(crate) fn writes_inline(&self) -> bool {
        self.writes.load(Ordering::Relaxed)
    }

    /// As `try_read`, for a plain (not FUA) buffered write.
    pub(crate) fn try_write(
        &self,
        file: &File,
        offset: u64,
        data: &[u8],
    ) -> Option<io::Result<usize>> {
        if data.is_empty() || !self.writes.load(Ordering::Relaxed) {
            return None;
        }
        let iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: `iov` points at `data`, valid for `data.len()` bytes for the whole synchronous
        // call, and pwritev2 only reads through it; the fd is kept open by `file`.
        let n = unsafe {
            libc::pwritev2(
                file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        self.outcome(n, &self.writes)
    }

    fn outcome(&self, n: isize, enabled: &AtomicBool) -> Option<io::Result<usize>> {
        if n >= 0 {
            return Some(Ok(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) => None,
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                enabled.store(false, Ordering::Relaxed);
                None
            }
            // A real error (EIO, ENOSPC…) would recur on the slow path; report it now.
            _ => Some(Err(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn cached_read_and_write_complete_inline() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 8192]).unwrap();
        let nowait = NoWait::new(true);
        let mut buf = [0u8; 4096];
        // Just written, so cached: the read must complete inline with the data, unless the
        // filesystem refuses RWF_NOWAIT reads (tmpfs here), which turns them off for good.
        match nowait.try_read(&file, 4096, &mut buf) {
            Some(Ok(n)) => assert_eq!(n, 4096),
            None if !nowait.reads_inline() => {
                assert!(
                    nowait.try_read(&file, 4096, &mut buf).is_none(),
                    "turned off"
                );
                return;
            }
            other => panic!("expected an inline read, got {other:?}"),
        }
        assert!(buf.iter().all(|&b| b == 7));
        if let Some(result) = nowait.try_write(&file, 0, &[9u8; 512]) {
            assert_eq!(result.unwrap(), 512);
            assert_eq!(
                nowait.try_read(&file, 0, &mut buf[..512]).unwrap().unwrap(),
                512
            );
            assert!(buf[..512].iter().all(|&b| b == 9));
        }
        let disabled = NoWait::new(false);
        assert!(disabled.try_read(&file, 0, &mut buf).is_none());
    }
}
