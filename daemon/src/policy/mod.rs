//! Backup policies: named schedules that back up volumes or servers and apply retention.
//!
//! [`Policies`] owns the durable set (DATA_DIR/policies.json) and decides when a policy is
//! due; a [`Runner`] supplied by the backup service does the actual work of a run.

// Wired into the daemon (admin methods, startup) by a later change; remove then.

mod engine;
mod error;
pub mod retention;
pub mod schedule;
mod store;

use serde::{Deserialize, Serialize};

use crate::storage::name::validate_volume_name;

pub use engine::Policies;
pub use error::PolicyError;
pub use schedule::Schedule;

/// The time source, replaceable so tests can move time by hand.
pub trait Clock: Send + Sync + 'static {
    fn now_unix_secs(&self) -> u64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_secs(&self) -> u64 {
        // A clock before 1970 is a broken host; treating it as the epoch only delays runs.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// What a policy backs up: each listed volume on its own, or each listed server as a set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Volumes(Vec<String>),
    Servers(Vec<String>),
}

impl Target {
    /// From the admin/CLI lists, of which exactly one must be non-empty.
    pub fn from_lists(volumes: Vec<String>, servers: Vec<String>) -> Result<Target, PolicyError> {
        match (volumes.is_empty(), servers.is_empty()) {
            (false, true) => Ok(Target::Volumes(volumes)),
            (true, false) => Ok(Target::Servers(servers)),
            _ => Err(PolicyError::InvalidArgument(format!(
                "give volumes or servers (exactly one non-empty list); got {} volume(s) and {} server(s)",
                volumes.len(),
                servers.len()
            ))),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Target::Volumes(_) => "volume",
            Target::Servers(_) => "server",
        }
    }

    pub fn names(&self) -> &[String] {
        match self {
            Target::Volumes(names) | Target::Servers(names) => names,
        }
    }

    /// Non-empty, every name valid (servers follow the volume name rules), none twice.
    fn validate(&self) -> Result<(), PolicyError> {
        let kind = self.kind();
        let names = self.names();
        if names.is_empty() {
            return Err(PolicyError::InvalidArgument(format!(
                "a policy needs at least one {kind}"
            )));
        }
        for (i, name) in names.iter().enumerate() {
            validate_volume_name(name).map_err(|_| {
                PolicyError::InvalidArgument(format!(
                    "invalid {kind} name {name:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'"
                ))
            })?;
            if names[..i].contains(name) {
                return Err(PolicyError::InvalidArgument(format!(
                    "{kind} {name:?} is listed twice"
                )));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct PolicySpec {
    pub name: String,
    pub schedule: Schedule,
    /// Keep at most this many backups per target (>= 1).
    pub keep: Option<u32>,
    /// Delete backups older than this many days (>= 1); the newest always stays.
    pub keep_days: Option<u32>,
    pub target: Target,
}

impl PolicySpec {
    pub fn validate(&self) -> Result<(), PolicyError> {
        validate_volume_name(&self.name)
            .map_err(|_| PolicyError::InvalidName(self.name.clone()))?;
        if self.keep == Some(0) {
            return Err(PolicyError::InvalidArgument(format!(
                "keep must be at least 1 (policy {:?})",
                self.name
            )));
        }
        if self.keep_days == Some(0) {
            return Err(PolicyError::InvalidArgument(format!(
                "keep_days must be at least 1 (policy {:?})",
                self.name
            )));
        }
        self.target.validate()
    }
}

/// The outcome of a successful run, after retention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Backups (volume targets) or backup sets (server targets) the policy keeps, all targets.
    pub backups_kept: u64,
    /// Bytes stored by those backups.
    pub stored_bytes: u64,
}

/// What a run knows of its policy beyond the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunContext {
    /// This runs again a run the daemon stopped during, which started then: what that run
    /// already backed up counts as done.
    pub resumed_since: Option<u64>,
    /// When the policy was created. Backups tagged with its name from before then are an
    /// earlier policy's of the same name (deleted: its backups stay), not this one's to count
    /// or delete.
    pub created_unix_secs: u64,
}

#[async_trait::async_trait]
pub trait Runner: Send + Sync + 'static {
    /// Takes the policy's backups, waits for them, applies retention; Err is a message for
    /// last_error.
    async fn run(&self, policy: &PolicySpec, context: RunContext) -> Result<RunReport, String>;
}

/// A policy as the admin protocol shows it.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct PolicyInfo {
    pub name: String,
    pub schedule: String,
    pub keep: Option<u32>,
    pub keep_days: Option<u32>,
    pub volumes: Vec<String>,
    pub servers: Vec<String>,
    pub enabled: bool,
    pub created_unix_secs: u64,
    pub next_run_unix_secs: Option<u64>,
    pub running: bool,
    pub last_run_unix_secs: Option<u64>,
    pub last_success_unix_secs: Option<u64>,
    pub last_failure_unix_secs: Option<u64>,
    pub last_error: Option<String>,
    pub backups_kept: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, target: Target) -> PolicySpec {
        PolicySpec {
            name: name.to_owned(),
            schedule: Schedule::Every { interval_secs: 60 },
            keep: Some(3),
            keep_days: None,
            target,
        }
    }

    #[test]
    fn specs_are_validated() {
        let vols = || Target::Volumes(vec!["a".into(), "b".into()]);
        assert!(spec("nightly", vols()).validate().is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(matches!(
                spec(bad, vols()).validate(),
                Err(PolicyError::InvalidName(n)) if n == bad
            ));
        }
        let err = spec("p", Target::Servers(vec![])).validate().unwrap_err();
        assert!(err.to_string().contains("at least one server"), "{err}");
        let err = spec("p", Target::Volumes(vec!["a".into(), "a".into()]))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("\"a\" is listed twice"), "{err}");
        let err = spec("p", Target::Volumes(vec!["../x".into()]))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("\"../x\""), "{err}");
        let mut zero_keep = spec("p", vols());
        zero_keep.keep = Some(0);
        assert!(zero_keep
            .validate()
            .unwrap_err()
            .to_string()
            .contains("keep must"));
        let mut zero_days = spec("p", vols());
        zero_days.keep_days = Some(0);
        assert!(zero_days
            .validate()
            .unwrap_err()
            .to_string()
            .contains("keep_days"));
    }

    #[test]
    fn targets_come_from_exactly_one_list() {
        assert_eq!(
            Target::from_lists(vec!["a".into()], vec![]).unwrap(),
            Target::Volumes(vec!["a".into()])
        );
        assert_eq!(
            Target::from_lists(vec![], vec!["s".into()]).unwrap(),
            Target::Servers(vec!["s".into()])
        );
        assert!(Target::from_lists(vec![], vec![]).is_err());
        assert!(Target::from_lists(vec!["a".into()], vec!["s".into()]).is_err());
    }

    #[test]
    fn system_clock_is_recent() {
        // 2023-11-14: any real host is past it.
        assert!(SystemClock.now_unix_secs() > 1_700_000_000);
    }
}
