//! What can go wrong setting or storing access rules.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("invalid network {value:?}: {reason} (use an address, a CIDR such as 10.0.0.0/8, or \"unix\")")]
    InvalidNetwork { value: String, reason: String },
    #[error("invalid client name {0:?}: use 1-255 printable characters")]
    InvalidName(String),
    #[error("max_connections must be at least 1 (got 0); use read_only or the allow-lists to shut clients out")]
    ZeroConnectionLimit,
    #[error("access for volume {0:?} is set in the config file; change it there and send SIGHUP")]
    ManagedByConfig(String),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}
