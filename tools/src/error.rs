//! What can go wrong in evsctl, and the exit code each failure gives scripts.

use std::path::PathBuf;

/// Exit codes scripts can rely on (documented in docs/admin-protocol.md).
pub mod exit {
    pub const OTHER: u8 = 1;
    /// Also what clap uses for usage errors.
    pub const INVALID_ARGUMENT: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const BUSY: u8 = 5;
    pub const ALREADY_EXISTS: u8 = 6;
    /// A job evsctl waited for failed, or `backup verify` found bad chunks.
    pub const JOB_FAILED: u8 = 7;
    /// The backup store is unreachable (daemon error code `unavailable`).
    pub const UNAVAILABLE: u8 = 8;
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("daemon unreachable at {}: {source}", socket.display())]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon at {} failed: {source}", socket.display())]
    Connection {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    /// The daemon refused the request: `code` is its stable error code.
    #[error("{message}")]
    Daemon { code: String, message: String },
    /// A job evsctl waited for ended in failure (or a verify found bad chunks).
    #[error("job {job_id} failed: {error}")]
    JobFailed { job_id: String, error: String },
    /// A server backup whose member jobs succeeded did not end complete (its record could not
    /// be made, or it did not settle in time).
    #[error("backup set {set_id} is {state}: {error}")]
    SetFailed {
        set_id: String,
        state: String,
        error: String,
    },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => exit::UNREACHABLE,
            CliError::Connection { .. } | CliError::Protocol(_) => exit::OTHER,
            CliError::Daemon { code, .. } => match code.as_str() {
                "invalid_argument" => exit::INVALID_ARGUMENT,
                "not_found" => exit::NOT_FOUND,
                "busy" => exit::BUSY,
                "already_exists" => exit::ALREADY_EXISTS,
                "unavailable" => exit::UNAVAILABLE,
                _ => exit::OTHER,
            },
            CliError::JobFailed { .. } | CliError::SetFailed { .. } => exit::JOB_FAILED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_codes_map_to_distinct_exit_codes() {
        let daemon = |code: &str| CliError::Daemon {
            code: code.into(),
            message: "m".into(),
        };
        assert_eq!(daemon("invalid_argument").exit_code(), 2);
        assert_eq!(daemon("not_found").exit_code(), 4);
        assert_eq!(daemon("busy").exit_code(), 5);
        assert_eq!(daemon("already_exists").exit_code(), 6);
        assert_eq!(daemon("unavailable").exit_code(), 8);
        assert_eq!(daemon("internal").exit_code(), 1);
        assert_eq!(daemon("unknown_method").exit_code(), 1);
        let unreachable = CliError::Unreachable {
            socket: "/x".into(),
            source: std::io::Error::from_raw_os_error(2),
        };
        assert_eq!(unreachable.exit_code(), 3);
        assert!(unreachable.to_string().contains("/x"));
        let failed = CliError::JobFailed {
            job_id: "j-1".into(),
            error: "store gone".into(),
        };
        assert_eq!(failed.exit_code(), 7);
        assert_eq!(failed.to_string(), "job j-1 failed: store gone");
    }
}
