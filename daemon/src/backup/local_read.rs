//! Chunk objects of a `file://` store read straight from their files into recycled buffers.
//!
//! object_store's local reader zero-fills a new allocation for every object before reading into
//! it; in a restore that memset and the page faults of the fresh memory took a quarter of the
//! daemon's CPU. A job's pool hands the same few buffers round instead.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::storage::aligned::AlignedPool;

/// The whole file at `path`, in a buffer from `buffers` when it fits one.
pub fn read_object(path: &Path, buffers: &Arc<AlignedPool>) -> io::Result<Bytes> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    match usize::try_from(len) {
        Ok(len) if len <= buffers.capacity() => {
            let mut buf = buffers.take(len);
            // A file cut short meanwhile fails here (and is retried); one grown meanwhile is
            // read as it was, and decoding judges it.
            file.read_exact_at(&mut buf, 0)?;
            Ok(buffers.freeze(buf))
        }
        // Larger than any chunk this daemon writes: decoding will say what is wrong with it.
        _ => {
            let mut all = Vec::new();
            file.read_to_end(&mut all)?;
            Ok(Bytes::from(all))
        }
    }
}

/// The error object_store's own local reader would have given for `key`: "not found" when the
/// file is missing (a missing chunk), a generic (retried) store error otherwise.
pub fn store_error(key: &str, error: io::Error) -> object_store::Error {
    if error.kind() == io::ErrorKind::NotFound {
        object_store::Error::NotFound {
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
        let big = dir.path().join("big");
        std::fs::write(&big, vec![7u8; 10_000]).unwrap();
        assert_eq!(read_object(&big, &pool).unwrap(), vec![7u8; 10_000]);
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
    }
}
