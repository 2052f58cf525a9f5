//! Fallback engine: plain blocking syscalls on tokio's blocking thread pool. Used when
//! io_uring is unavailable (old kernel, seccomp, `io_uring_disabled` sysctl) or forced.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::Pieces;

/// Operations on the blocking pool at once, as many as one io_uring ring may have queued:
/// tokio's pool would otherwise grow to 512 threads and then queue without a bound.
const MAX_QUEUED_OPS: usize = 4096;

pub(crate) struct ThreadsEngine {
    /// One per operation on the blocking pool, held until its syscall returns (a caller that
    /// stopped waiting does not free its place early).
    permits: Arc<tokio::sync::Semaphore>,
}

impl ThreadsEngine {
    pub(crate) fn new() -> Self {
        Self::with_limit(MAX_QUEUED_OPS)
    }

    fn with_limit(max_queued_ops: usize) -> Self {
        ThreadsEngine {
            permits: Arc::new(tokio::sync::Semaphore::new(max_queued_ops)),
        }
    }

    /// Runs `op` on the blocking pool once a place is free.
    async fn run_blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, io::Error> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("the thread-pool engine is closed"))?;
        tokio::task::spawn_blocking(move || {
            let done = op();
            drop(permit);
            done
        })
        .await
        .map_err(join_error)
    }

    pub(crate) async fn read_into(
        &self,
        file: &Arc<File>,
        offset: u64,
        mut buf: BytesMut,
        buf_start: usize,
    ) -> (BytesMut, io::Result<usize>) {
        let file = Arc::clone(file);
        let joined = self
            .run_blocking(move || {
                let result = retry_eintr(|| file.read_at(&mut buf[buf_start..], offset));
                (buf, result)
            })
            .await;
        // The buffer moved into the closure is lost if the blocking task panicked or the
        // runtime shut down; an empty buffer plus the error is the best that can be returned.
        joined.unwrap_or_else(|err| (BytesMut::new(), Err(err)))
    }

    pub(crate) async fn write_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: Bytes,
        dsync: bool,
        pieces: Pieces,
    ) -> io::Result<usize> {
        let file = Arc::clone(file);
        self.run_blocking(move || {
            if dsync {
                return pwrite_dsync(&file, &data, offset);
            }
            write_in_pieces(&file, offset, &data, pieces)
        })
        .await?
    }

    pub(crate) async fn sync(&self, file: &Arc<File>, datasync: bool) -> io::Result<()> {
        let file = Arc::clone(file);
        self.run_blocking(move || {
            if datasync {
                file.sync_data()
            } else {
                file.sync_all()
            }
        })
        .await?
    }

    pub(crate) async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let file = Arc::clone(file);
        self.run_blocking(move || fallocate_blocking(&file, mode, offset, len))
            .await?
    }
}

/// Writes `data` at `offset` piece after piece on the calling thread; a short or failed piece
/// ends the call with what was written before it (the caller's loop resumes there and sees any
/// error itself), or with the error when it was the first.
pub(crate) fn write_in_pieces(
    file: &File,
    offset: u64,
    data: &[u8],
    pieces: Pieces,
) -> io::Result<usize> {
    let mut written_bytes = 0;
    while written_bytes < data.len() {
        let at = offset + written_bytes as u64;
        let len = pieces.next_len(at, data.len() - written_bytes);
        let piece = &data[written_bytes..written_bytes + len];
        match retry_eintr(|| file.write_at(piece, at)) {
            Ok(n) => {
                written_bytes += n;
                if n < len {
                    break;
                }
            }
            Err(e) if written_bytes == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(written_bytes)
}

/// fallocate(2) on the calling thread, retried on EINTR; EFBIG when a value does not fit in
/// off_t.
pub(crate) fn fallocate_blocking(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    retry_eintr(|| {
        // SAFETY: fallocate only reads its integer arguments; the fd is valid because `file`
        // is borrowed for the duration of the call.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    })
}

/// Write with RWF_DSYNC so only this write's data is made durable (cheaper than a whole-file
/// fdatasync); kernels or filesystems without pwritev2 flags get write + fdatasync instead.
fn pwrite_dsync(file: &File, data: &[u8], offset: u64) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let result = retry_eintr(|| {
        // SAFETY: `iov` points at `data`, which is borrowed (so alive and unmodified) for the
        // whole call, and pwritev2 only reads through it; iovcnt = 1 matches the one iovec.
        let written = unsafe {
            libc::pwritev2(
                file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_DSYNC,
            )
        };
        if written < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(written as usize)
        }
    });
    match result {
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP)) => {
            let written = retry_eintr(|| file.write_at(data, offset))?;
            file.sync_data()?;
            Ok(written)
        }
        other => other,
    }
}

fn retry_eintr<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn join_error(err: tokio::task::JoinError) -> io::Error {
    io::Error::other(format!("blocking I/O task failed: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No more operations run on the blocking pool at once than the engine's limit; one that
    /// finishes lets the next in.
    #[tokio::test]
    async fn operations_beyond_the_limit_wait_for_a_place() {
        let engine = Arc::new(ThreadsEngine::with_limit(2));
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Arc::new(std::sync::Mutex::new(held));
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut ops = Vec::new();
        for _ in 0..3 {
            let (engine, held, running) =
                (Arc::clone(&engine), Arc::clone(&held), Arc::clone(&running));
            ops.push(tokio::spawn(async move {
                engine
                    .run_blocking(move || {
                        running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        held.lock().unwrap().recv().unwrap();
                    })
                    .await
                    .unwrap();
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(running.load(std::sync::atomic::Ordering::SeqCst), 2);
        release.send(()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(running.load(std::sync::atomic::Ordering::SeqCst), 3);
        release.send(()).unwrap();
        release.send(()).unwrap();
        for op in ops {
            op.await.unwrap();
        }
    }

    #[tokio::test]
    async fn dsync_write_lands() {
        let engine = ThreadsEngine::new();
        let file = Arc::new(tempfile::tempfile().expect("tempfile"));
        let written = engine
            .write_at(
                &file,
                4096,
                Bytes::from_static(b"durable"),
                true,
                Pieces::Whole,
            )
            .await
            .expect("write");
        assert_eq!(written, 7);
        let (buf, result) = engine.read_into(&file, 4096, BytesMut::zeroed(7), 0).await;
        assert_eq!(result.expect("read"), 7);
        assert_eq!(&buf[..], b"durable");
    }
}
