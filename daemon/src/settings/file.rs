//! The TOML config file: every setting optional, unknown keys rejected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::access::AccessPolicy;

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// toml's message names the offending key (e.g. "unknown field `lisen`") and its line.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// What a config file may set; absent keys fall back to the defaults.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub unix: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    pub no_default_volume: Option<bool>,
    pub create_volumes: Option<Vec<String>>,
    pub io_engine: Option<String>,
    pub tcp_congestion: Option<String>,
    pub ring_threads: Option<usize>,
    pub worker_threads: Option<usize>,
    pub ring_spin_us: Option<u64>,
    pub no_inline_cached_io: Option<bool>,
    pub payload_wait_us: Option<u64>,
    pub ready_file: Option<PathBuf>,
    pub max_connections: Option<usize>,
    pub max_inflight_requests: Option<usize>,
    pub max_inflight_mib: Option<u64>,
    pub handshake_timeout_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
    pub admin_idle_timeout_secs: Option<u64>,
    pub metrics_listen: Option<String>,
    pub log_format: Option<String>,
    pub backup_store: Option<String>,
    pub backup_upload_concurrency: Option<usize>,
    pub backup_rate_limit_mib_per_sec: Option<u64>,
    pub backup_s3_endpoint: Option<String>,
    pub backup_s3_region: Option<String>,
    pub backup_s3_access_key_id: Option<String>,
    pub backup_s3_secret_access_key: Option<String>,
    pub backup_s3_allow_http: Option<bool>,
    pub tls: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// Per-volume access rules, `[access.VOLUME]` tables.
    pub access: Option<BTreeMap<String, AccessPolicy>>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        FileConfig::parse(&text).map_err(|message| ConfigFileError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }
}
