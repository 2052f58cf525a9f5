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

    /// An I/O error (EIO) reading an object of a local store: a bad sector, not an outage.
    pub fn is_local_read_error(&self) -> bool {
        let BackupError::Store {
            source: object_store::Error::Generic { source, .. },
            ..
        } = self
        else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
        while let Some(error) = cause {
            if let Some(io) = error.downcast_ref::<std::io::Error>() {
                return io.raw_os_error() == Some(libc::EIO);
            }
            cause = error.source();
        }
        false
    }

    /// Whether retrying the same operation later may succeed (the store was unreachable or
    /// answered with a server error), as opposed to a failure that will not change by itself.
    pub fn is_transient(&self) -> bool {
        match self {
            BackupError::Store { source, .. } => {
                !matches!(
                    source,
                    object_store::Error::NotFound { .. }
                        | object_store::Error::AlreadyExists { .. }
                        | object_store::Error::InvalidPath { .. }
                        | object_store::Error::NotSupported { .. }
                        | object_store::Error::NotImplemented { .. }
                ) && !self.is_refused_access()
            }
            _ => false,
        }
    }

    /// Whether the store refused access in a way that does not change by itself: credentials
    /// it turned down (an S3 store's 401 or 403), or a local store on a read-only filesystem or
    /// in a directory this process may not write. A local store's refusals arrive as generic
    /// errors with the `io::Error` inside.
    pub fn is_refused_access(&self) -> bool {
        let BackupError::Store { source, .. } = self else {
            return false;
        };
        match source {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => true,
            object_store::Error::Generic { source, .. } => {
                let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
                while let Some(error) = cause {
                    if let Some(io) = error.downcast_ref::<std::io::Error>() {
                        return matches!(
                            io.kind(),
                            std::io::ErrorKind::PermissionDenied
                                | std::io::ErrorKind::ReadOnlyFilesystem
                        );
                    }
                    cause = error.source();
                }
                refused_by_http(source.as_ref())
            }
            _ => false,
        }
    }
}

/// Whether an S3 request failed with 401 or 403. object_store maps those to `PermissionDenied`
/// or `Unauthenticated` for some requests only; a listing's (and others') arrive as `Generic`,
/// around an HTTP error whose type it does not export, so its text is what tells: the status
/// (`Server returned non-2xx status code: 403 Forbidden`), or S3's error code in a body sent
/// with another status.
fn refused_by_http(error: &(dyn std::error::Error + 'static)) -> bool {
    const REFUSALS: [&str; 6] = [
        "status code: 401",
        "status code: 403",
        "<Code>AccessDenied</Code>",
        "<Code>InvalidAccessKeyId</Code>",
        "<Code>SignatureDoesNotMatch</Code>",
        "<Code>InvalidToken</Code>",
    ];
    let text = error.to_string();
    REFUSALS.iter().any(|refusal| text.contains(refusal))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error of a store's own type with an `io::Error` as its cause, as object_store's
    /// local store wraps a failed file create.
    #[derive(Debug, thiserror::Error)]
    #[error("Unable to create file: {source}")]
    struct CreateFailed {
        source: std::io::Error,
    }

    fn generic(errno: i32) -> BackupError {
        BackupError::store(
            "put",
            "locks/x",
            object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(CreateFailed {
                    source: std::io::Error::from_raw_os_error(errno),
                }),
            },
        )
    }

    #[test]
    fn a_read_only_or_forbidden_local_store_is_refused_for_good_other_failures_are_retried() {
        for errno in [libc::EROFS, libc::EACCES, libc::EPERM] {
            let e = generic(errno);
            assert!(e.is_refused_access(), "{e}");
            assert!(!e.is_transient(), "{e}");
        }
        for errno in [libc::EIO, libc::ENOSPC, libc::ECONNREFUSED] {
            let e = generic(errno);
            assert!(!e.is_refused_access(), "{e}");
            assert!(e.is_transient(), "{e}");
            // Retried, but a chunk read that keeps failing so counts as damaged (`fetch`).
            assert_eq!(e.is_local_read_error(), errno == libc::EIO, "{e}");
        }
        let denied = BackupError::store(
            "put",
            "locks/x",
            object_store::Error::PermissionDenied {
                path: "locks/x".into(),
                source: "403".into(),
            },
        );
        assert!(denied.is_refused_access() && !denied.is_transient());
        let missing = BackupError::store(
            "get",
            "chunks/x",
            object_store::Error::NotFound {
                path: "chunks/x".into(),
                source: "404".into(),
            },
        );
        assert!(!missing.is_refused_access() && !missing.is_transient());
        assert!(!BackupError::Failed("x".into()).is_refused_access());
    }

    /// An S3 listing refused for bad credentials, as object_store 0.14 words it.
    #[test]
    fn an_s3_request_refused_with_403_is_refused_for_good() {
        #[derive(Debug, thiserror::Error)]
        #[error("Error performing GET http://127.0.0.1:9000/b?list-type=2 in 3ms - Server returned non-2xx status code: 403 Forbidden: <Error><Code>SignatureDoesNotMatch</Code></Error>")]
        struct ListRequest;
        let e = BackupError::store(
            "list",
            "manifests/",
            object_store::Error::Generic {
                store: "S3",
                source: Box::new(ListRequest),
            },
        );
        assert!(e.is_refused_access() && !e.is_transient(), "{e}");
        #[derive(Debug, thiserror::Error)]
        #[error("Error performing GET http://127.0.0.1:9000/b in 3ms - Server returned non-2xx status code: 503 Service Unavailable: slow down")]
        struct Busy;
        let e = BackupError::store(
            "list",
            "manifests/",
            object_store::Error::Generic {
                store: "S3",
                source: Box::new(Busy),
            },
        );
        assert!(!e.is_refused_access() && e.is_transient(), "{e}");
    }
}
