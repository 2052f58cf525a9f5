//! What the policy engine refuses or fails at, naming the value concerned.

use std::path::PathBuf;

use super::schedule::ScheduleError;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid policy name {0:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'")]
    InvalidName(String),
    #[error("invalid schedule {value:?}: {reason}")]
    InvalidSchedule { value: String, reason: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("policy {0:?} not found")]
    NotFound(String),
    #[error("policy {0:?} already exists")]
    AlreadyExists(String),
    #[error("policy {0:?} is running; wait for the run to finish")]
    Busy(String),
    #[error("policy file {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
}

impl From<ScheduleError> for PolicyError {
    fn from(e: ScheduleError) -> Self {
        PolicyError::InvalidSchedule {
            value: e.value,
            reason: e.reason,
        }
    }
}
