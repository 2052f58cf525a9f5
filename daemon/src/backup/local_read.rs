//! Chunk objects of a `file://` store read straight from their files into recycled buffers.
//!
//! object_store's local reader zero-fills a new allocation for every object before reading into
//! it; in a restore that memset and the page faults of the fresh memory took a quarter of the
//! daemon's CPU. A job's pool hands the same few buffers round instead.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::storage::aligned::{AlignedPool, ALIGN_BYTES};

/// The whole file at `path`, in a buffer from `buffers` when it fits one: read with O_DIRECT
/// where the filesystem allows it. A buffered read copies out of the page cache, and on this
/// VM that copy into freshly allocated cache pages was two thirds of a restore's CPU.
pub fn read_object(path: &Path, buffers: &Arc<AlignedPool>) -> io::Result<Bytes> {
    let direct = if DIRECT_REFUSED.load(Ordering::Relaxed) {
        None
    } else {
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => Some(file),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                DIRECT_REFUSED.store(true, Ordering::Relaxed);
                None
            }
            Err(e) => return Err(e),
        }
    };
    let is_direct = direct.is_some();
    let file = match direct {
        Some(file) => file,
        None => File::open(path)?,
    };
    let len = file.metadata()?.len();
    match usize::try_from(len) {
        Ok(len) if len.next_multiple_of(ALIGN_BYTES) <= buffers.capacity() => {
            if !is_direct {
                let mut buf = buffers.take(len);
                // A file cut short meanwhile fails here (and is retried); one grown meanwhile is
                // read as it was, and decoding judges it.
                file.read_exact_at(&mut buf, 0)?;
                return Ok(buffers.freeze(buf));
            }
            // Direct reads ask for whole blocks; the file ends inside the last one.
            let mut buf = buffers.take(len.next_multiple_of(ALIGN_BYTES));
            let mut got = 0;
            while got < len {
                match file.read_at(&mut buf[got..], got as u64) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("object file ended at {got} of {len} bytes"),
                        ))
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                // A direct read stops short only at the end of the file.
                if got % ALIGN_BYTES != 0 {
                    break;
                }
            }
            buf.set_len(got.min(len));
            Ok(buffers.freeze(buf))
        }
        // Larger than any chunk this daemon writes: decoding will say what is wrong with it.
        // Cut after one byte more than any valid object, so that much memory at most.
        _ => {
            let mut all = Vec::new();
            File::open(path)?
                .take(crate::backup::chunk::MAX_OBJECT_BYTES + 1)
                .read_to_end(&mut all)?;
            Ok(Bytes::from(all))
        }
    }
}

static DIRECT_REFUSED: AtomicBool = AtomicBool::new(false);

/// The store error for a failed local read or write of `key`: "not found" when the file is
/// missing (a missing chunk), "permission denied" (not retried) when access is refused, a
/// generic (retried) store error otherwise.
pub fn store_error(key: &str, error: io::Error) -> object_store::Error {
    if error.kind() == io::ErrorKind::NotFound {
        object_store::Error::NotFound {
            path: key.to_owned(),
            source: Box::new(error),
        }
    } else if error.kind() == io::ErrorKind::PermissionDenied {
        // Not retried: it does not change by itself (as an S3 store's 403).
        object_store::Error::PermissionDenied {
            path: key.to_owned(),
            source: Box::new(error),
        }
    } else {
        object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_read_whole_into_pooled_or_own_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let pool = AlignedPool::new(8192, 2);
        let small = dir.path().join("small");
        std::fs::write(&small, b"chunk bytes").unwrap();
        let got = read_object(&small, &pool).unwrap();
        assert_eq!(&got[..], b"chunk bytes");
        drop(got);
        // The recycled buffer held longer content: only the new length is exposed.
        std::fs::write(&small, b"abc").unwrap();
        assert_eq!(&read_object(&small, &pool).unwrap()[..], b"abc");
        // Objects that end inside, and exactly at, a 4 KiB block (direct reads ask for whole
        // blocks).
        for len in [4096 + 24, 4096, 8192] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let path = dir.path().join(format!("len{len}"));
            std::fs::write(&path, &data).unwrap();
            assert_eq!(read_object(&path, &pool).unwrap(), data, "length {len}");
        }
        let big = dir.path().join("big");
        std::fs::write(&big, vec![7u8; 10_000]).unwrap();
        assert_eq!(read_object(&big, &pool).unwrap(), vec![7u8; 10_000]);
        // Larger than any valid object: read only one byte past the limit, for decoding to
        // refuse.
        let limit = crate::backup::chunk::MAX_OBJECT_BYTES as usize;
        std::fs::write(&big, vec![7u8; limit + 4096]).unwrap();
        assert_eq!(read_object(&big, &pool).unwrap().len(), limit + 1);
        let missing = read_object(&dir.path().join("nope"), &pool).unwrap_err();
        assert!(matches!(
            store_error("chunks/ab/nope", missing),
            object_store::Error::NotFound { path, .. } if path == "chunks/ab/nope"
        ));
        let other = io::Error::from_raw_os_error(libc::EIO);
        assert!(matches!(
            store_error("k", other),
            object_store::Error::Generic { .. }
        ));
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        let denied = crate::backup::error::BackupError::store("get", "k", store_error("k", denied));
        assert!(!denied.is_transient(), "{denied}");
    }
}
