//! The durable form of the policies: DATA_DIR/policies.json.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::schedule::Schedule;
use super::{PolicyError, PolicySpec, Target};
use crate::storage::manifest::write_durably;

pub const FILE_NAME: &str = "policies.json";
const FORMAT_VERSION: u32 = 1;

/// What a policy has done so far; persisted beside its spec.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    pub enabled: bool,
    pub created_unix_secs: u64,
    /// The schedule slot most recently started; a slot at or before it never starts again.
    pub last_slot_unix_secs: Option<u64>,
    pub last_run_unix_secs: Option<u64>,
    pub last_success_unix_secs: Option<u64>,
    pub last_failure_unix_secs: Option<u64>,
    pub last_error: Option<String>,
    pub backups_kept: u64,
    pub stored_bytes: u64,
    /// Set while a run is going; found set at start, the daemon stopped during that run, which
    /// then runs again (files of earlier versions have no such field: none was going).
    #[serde(default)]
    pub run_in_progress: bool,
}

#[derive(Serialize, Deserialize)]
struct Record {
    name: String,
    /// The printed schedule ("daily 02:00"): readable, and parsed back on load.
    schedule: String,
    keep: Option<u32>,
    keep_days: Option<u32>,
    target: Target,
    #[serde(flatten)]
    state: PolicyState,
}

#[derive(Serialize, Deserialize)]
struct File {
    format_version: u32,
    policies: Vec<Record>,
}

fn file_error(path: &Path, reason: impl ToString) -> PolicyError {
    PolicyError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Loads the policies; a missing file is an empty set (a fresh data directory).
pub fn load(path: &Path) -> Result<Vec<(PolicySpec, PolicyState)>, PolicyError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file_error(path, format!("cannot read: {e}"))),
    };
    let file: File = serde_json::from_slice(&bytes)
        .map_err(|e| file_error(path, format!("not valid policy JSON: {e}")))?;
    if file.format_version != FORMAT_VERSION {
        return Err(file_error(
            path,
            format!(
                "format_version {} is not supported (expected {FORMAT_VERSION})",
                file.format_version
            ),
        ));
    }
    file.policies
        .into_iter()
        .map(|record| {
            let schedule: Schedule = record
                .schedule
                .parse()
                .map_err(|e| file_error(path, format!("policy {:?}: {e}", record.name)))?;
            let spec = PolicySpec {
                name: record.name,
                schedule,
                keep: record.keep,
                keep_days: record.keep_days,
                target: record.target,
            };
            Ok((spec, record.state))
        })
        .collect()
}

/// Replaces the file durably, so a crash leaves either the old or the new set.
pub fn save<'a>(
    path: &Path,
    policies: impl Iterator<Item = (&'a PolicySpec, &'a PolicyState)>,
) -> Result<(), PolicyError> {
    let file = File {
        format_version: FORMAT_VERSION,
        policies: policies
            .map(|(spec, state)| Record {
                name: spec.name.clone(),
                schedule: spec.schedule.to_string(),
                keep: spec.keep,
                keep_days: spec.keep_days,
                target: spec.target.clone(),
                state: state.clone(),
            })
            .collect(),
    };
    let bytes = serde_json::to_vec_pretty(&file)
        .map_err(|e| file_error(path, format!("cannot encode: {e}")))?;
    write_durably(path, &bytes).map_err(|e| file_error(path, e))
}
