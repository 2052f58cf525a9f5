//! What can go wrong with backups, each variant naming what failed and with which value.

use crate::backup::chunk::ChunkError;
use crate::backup::manifest::ManifestError;
use crate::error::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup store URL {url:?} is not usable: {reason}")]
    BadStoreUrl { url: String, reason: String },
    #[error("backup store {op} {key:?} failed: {source}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("backup {0:?} not found")]
    BackupNotFound(String),
    #[error("backup set {0:?} not found")]
    SetNotFound(String),
    #[error("job {0:?} not found")]
    JobNotFound(String),
    #[error("chunk {index} of backup {backup_id:?} is missing from the store (chunk {chunk_id})")]
    ChunkMissing {
        backup_id: String,
        index: u64,
        chunk_id: String,
    },
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    InvalidArgument(String),
    /// A task the job depends on failed (a worker thread, a member backup, a bad record).
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Server(#[from] crate::servers::ServerError),
    #[error("volume {volume:?} is {size_bytes} bytes but backup {backup_id:?} is {backup_size_bytes} bytes")]
    SizeMismatch {
        volume: String,
        size_bytes: u64,
        backup_id: String,
        backup_size_bytes: u64,
    },
    #[error("volume {0:?} already has a backup job running")]
    JobRunning(String),
    /// A restore or verify job of this daemon reads the backup while it would be deleted, or
    /// the other way round (see `holds`).
    #[error("backup {backup_id:?} is {doing}")]
    BackupInUse {
        backup_id: String,
        doing: &'static str,
    },
    #[error("job state file {path}: {reason}")]
    JobFile { path: String, reason: String },
    #[error("backup store directory {path}: {reason}")]
    LocalStore { path: String, reason: String },
    /// Interrupted by shutdown: the job resumes at the next start.
    #[error("the backup job was cancelled: {0}")]
    Cancelled(String),
    /// Ended by `job.cancel`: the job does not resume.
    #[error("the job was cancelled by job.cancel")]
    CancelledByRequest,
    #[error("job {id:?} can no longer be cancelled: {state}")]
    JobFinished { id: String, state: String },
}

impl BackupError {
    pub fn store(op: &'static str, key: impl Into<String>, source: object_store::Error) -> Self {
        BackupError::Store {
            op,
            key: key.into(),
            source,
        }
    }

    /// Whether retrying the same operation later may succeed (the store was unreachable or
    /// answered with a server error), as opposed to a failure that will not change by itself.
    pub fn is_transient(&self) -> bool {
        match self {
            BackupError::Store { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            _ => false,
        }
    }
}
