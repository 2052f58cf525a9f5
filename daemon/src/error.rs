//! The daemon's typed errors and the one place they become NBD errnos.

use std::path::PathBuf;

use evsd_proto::Errno;

use crate::storage::attachments::Closure;

/// Failures of the storage layer, each naming what failed and with which value.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid volume name {0:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'")]
    InvalidName(String),
    #[error("invalid size {0:?}: use bytes or a K/M/G/T suffix")]
    InvalidSize(String),
    #[error("volume size {0} bytes is not a positive multiple of 4096")]
    UnalignedSize(u64),
    #[error("volume size {size_bytes} bytes is over the largest this daemon serves, {max_bytes} bytes (64 TiB)")]
    SizeTooLarge { size_bytes: u64, max_bytes: u64 },
    #[error("volume {0:?} already exists")]
    AlreadyExists(String),
    #[error("volume {0:?} not found")]
    NotFound(String),
    #[error("invalid snapshot name {0:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'")]
    InvalidSnapshotName(String),
    #[error("snapshot {volume:?}@{name:?} not found")]
    SnapshotNotFound { volume: String, name: String },
    #[error("snapshot {volume:?}@{name:?} already exists")]
    SnapshotExists { volume: String, name: String },
    #[error("snapshot {volume:?}@{name:?} is being read by a backup job; try again when it ends")]
    SnapshotInUse { volume: String, name: String },
    #[error("volume {name:?} is being {}: {}", closure.doing(), closure.advice())]
    Closed { name: String, closure: Closure },
    #[error("volume {name:?} holds an incomplete restore of backup {backup_id}: no snapshot or backup of it is taken until a restore into it succeeds")]
    IncompleteRestore { name: String, backup_id: String },
    #[error("volume {0:?} was closed under this connection (a rollback, restore or delete) before its change started; the change was not made")]
    Withdrawn(String),
    #[error("export {0:?} is read-only")]
    ReadOnly(String),
    #[error("volume {name:?} has {connections} connected client(s)")]
    Busy { name: String, connections: usize },
    #[error(
        "shrinking volume {name:?} from {from_bytes} to {to_bytes} bytes discards data: pass allow_shrink (evsctl --allow-shrink)"
    )]
    ShrinkNotAllowed {
        name: String,
        from_bytes: u64,
        to_bytes: u64,
    },
    #[error("volume {name:?} became {now_bytes} bytes while a resize to {size_bytes} bytes waited, which makes it a shrink: run it again (a shrink is checked for clients and allow_shrink)")]
    SizeChanged {
        name: String,
        now_bytes: u64,
        size_bytes: u64,
    },
    #[error("resizing volume {name:?} to {size_bytes} bytes failed: {source}")]
    Resize {
        name: String,
        size_bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("volume manifest {path} is unreadable: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("{op} at offset {offset_bytes} length {length_bytes} failed: {source}")]
    Io {
        op: &'static str,
        offset_bytes: u64,
        length_bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("zeroing {length_bytes} bytes at offset {offset_bytes} cannot be done fast")]
    FastZeroUnsupported {
        offset_bytes: u64,
        length_bytes: u64,
    },
    #[error("{action} {path} failed: {source}")]
    Fs {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    pub fn io(
        op: &'static str,
        offset_bytes: u64,
        length_bytes: u64,
        source: std::io::Error,
    ) -> Self {
        StorageError::Io {
            op,
            offset_bytes,
            length_bytes,
            source,
        }
    }

    pub fn fs(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Fs {
            action,
            path: path.into(),
            source,
        }
    }

    /// The NBD error a client gets for this failure.
    pub fn to_errno(&self) -> Errno {
        match self {
            StorageError::Io { source, .. }
            | StorageError::Fs { source, .. }
            | StorageError::Resize { source, .. } => source
                .raw_os_error()
                .map_or(Errno::Io, Errno::from_host_errno),
            StorageError::FastZeroUnsupported { .. } => Errno::NotSup,
            StorageError::ReadOnly(_) => Errno::Perm,
            StorageError::Withdrawn(_) => Errno::Shutdown,
            StorageError::SnapshotNotFound { .. }
            | StorageError::SnapshotExists { .. }
            | StorageError::SnapshotInUse { .. }
            | StorageError::IncompleteRestore { .. }
            | StorageError::Closed { .. } => Errno::Inval,
            StorageError::InvalidName(_)
            | StorageError::InvalidSnapshotName(_)
            | StorageError::InvalidSize(_)
            | StorageError::UnalignedSize(_)
            | StorageError::SizeTooLarge { .. }
            | StorageError::ShrinkNotAllowed { .. } => Errno::Inval,
            StorageError::NotFound(_)
            | StorageError::Busy { .. }
            | StorageError::SizeChanged { .. } => Errno::Inval,
            StorageError::AlreadyExists(_) => Errno::Inval,
            StorageError::BadManifest { .. } => Errno::Io,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_maps_to_enospc_and_others_to_eio() {
        let full = StorageError::io("write", 0, 4096, std::io::Error::from_raw_os_error(28));
        assert_eq!(full.to_errno(), Errno::NoSpc);
        let quota = StorageError::io("write", 0, 4096, std::io::Error::from_raw_os_error(122));
        assert_eq!(quota.to_errno(), Errno::NoSpc);
        let eio = StorageError::io("read", 0, 4096, std::io::Error::from_raw_os_error(5));
        assert_eq!(eio.to_errno(), Errno::Io);
        let other = StorageError::io("read", 0, 1, std::io::Error::other("boom"));
        assert_eq!(other.to_errno(), Errno::Io);
        let fast = StorageError::FastZeroUnsupported {
            offset_bytes: 0,
            length_bytes: 1,
        };
        assert_eq!(fast.to_errno(), Errno::NotSup);
        assert!(full.to_string().contains("offset 0 length 4096"));
    }
}
