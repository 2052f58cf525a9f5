//! `evsctl backup-set …`: show, delete; plus the backup set object (BackupSetInfo) that
//! `server backup` and `server backups` return.

use clap::Subcommand;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::backup::deletion_summary;
use crate::client::Call;
use crate::error::CliError;
use crate::job::job_table;
use crate::render::{fields, table, utc_time};

#[derive(Debug, Subcommand)]
pub enum BackupSetCommand {
    /// Show a server backup: its state, barrier hold time and member backups.
    Show { id: String },
    /// Delete a server backup and its member backups, then collect the chunks no other backup
    /// uses.
    Delete { id: String },
}

impl BackupSetCommand {
    pub fn call(&self) -> Call {
        let (method, params) = match self {
            BackupSetCommand::Show { id } => ("backup_set.show", json!({"id": id})),
            BackupSetCommand::Delete { id } => ("backup_set.delete", json!({"id": id})),
        };
        Call { method, params }
    }

    pub fn render(&self, result: &Value) -> Result<String, CliError> {
        match self {
            BackupSetCommand::Show { .. } => Ok(BackupSetInfo::parse(result)?.details()?),
            BackupSetCommand::Delete { .. } => deletion_summary("backup set", result),
        }
    }
}

/// One server backup as the daemon describes it.
#[derive(Debug, Deserialize)]
pub struct BackupSetInfo {
    pub id: String,
    pub server: String,
    pub state: String,
    pub created_unix_secs: u64,
    pub barrier_hold_us: u64,
    #[serde(default)]
    pub policy: Option<String>,
    pub members: Vec<Member>,
    /// The member backup jobs while the set is being made, else empty.
    #[serde(default)]
    pub jobs: Vec<Value>,
    /// Why a failed set failed (the daemon's own reason, besides its jobs' errors).
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Member {
    pub volume: String,
    pub backup_id: String,
}

impl BackupSetInfo {
    pub fn parse(value: &Value) -> Result<BackupSetInfo, CliError> {
        BackupSetInfo::deserialize(value)
            .map_err(|e| CliError::Protocol(format!("backup set {value} is malformed: {e}")))
    }

    fn policy(&self) -> String {
        self.policy.clone().unwrap_or_else(|| "-".to_owned())
    }

    /// A `server backups` row: ID, CREATED, MEMBERS, HOLD, POLICY, STATE.
    pub fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            utc_time(self.created_unix_secs),
            self.members.len().to_string(),
            hold_ms(self.barrier_hold_us),
            self.policy(),
            self.state.clone(),
        ]
    }

    /// `key: value` lines (the error of a failed set), the member table, and the jobs while
    /// there are any.
    pub fn details(&self) -> Result<String, CliError> {
        let mut lines = vec![
            ("id", self.id.clone()),
            ("server", self.server.clone()),
            ("state", self.state.clone()),
            ("created", utc_time(self.created_unix_secs)),
            ("barrier hold", hold_ms(self.barrier_hold_us)),
            ("policy", self.policy()),
        ];
        if let Some(error) = &self.error {
            lines.push(("error", error.clone()));
        }
        let mut out = fields(&lines);
        let members: Vec<Vec<String>> = self
            .members
            .iter()
            .map(|m| vec![m.volume.clone(), m.backup_id.clone()])
            .collect();
        out.push('\n');
        out.push_str(&table(&["VOLUME", "BACKUP"], &members));
        if !self.jobs.is_empty() {
            out.push('\n');
            out.push_str(&job_table(&self.jobs)?);
        }
        Ok(out)
    }
}

/// Microseconds as milliseconds with 2 decimals: `1234` → "1.23 ms".
pub fn hold_ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::job::tests::sample;

    /// A sample BackupSetInfo; `jobs` non-empty makes it a running one.
    pub fn set(id: &str, jobs: Vec<Value>) -> Value {
        let state = if jobs.is_empty() {
            "complete"
        } else {
            "running"
        };
        json!({"id": id, "server": "web1", "state": state, "created_unix_secs": 1_700_000_000,
               "barrier_hold_us": 1234, "policy": null,
               "members": [{"volume": "a", "backup_id": "b-1"}, {"volume": "b", "backup_id": "b-2"}],
               "jobs": jobs})
    }

    #[test]
    fn show_lists_fields_members_and_running_jobs() {
        let show = BackupSetCommand::Show { id: "s-1".into() };
        assert_eq!(
            show.render(&set("s-1", vec![])).unwrap(),
            "id:           s-1\n\
             server:       web1\n\
             state:        complete\n\
             created:      2023-11-14 22:13:20 UTC\n\
             barrier hold: 1.23 ms\n\
             policy:       -\n\
             \n\
             VOLUME  BACKUP\n\
             a       b-1\n\
             b       b-2\n"
        );
        let running = show
            .render(&set("s-1", vec![sample("j-1", "running", 1, 4)]))
            .unwrap();
        assert!(running.contains("state:        running\n"), "{running}");
        assert!(running.contains("\nID   KIND    VOLUME"), "{running}");
        // A failed set says why (the daemon's reason was dropped before).
        let mut failed = set("s-1", vec![]);
        failed["state"] = json!("failed");
        failed["error"] = json!("recording the set failed: store unreachable");
        let failed = show.render(&failed).unwrap();
        assert!(
            failed.contains("state:        failed\n")
                && failed.contains("error:        recording the set failed: store unreachable\n"),
            "{failed}"
        );
        let mut malformed = set("s-1", vec![]);
        malformed["members"] = json!([{"volume": "a"}]);
        assert!(matches!(
            show.render(&malformed),
            Err(CliError::Protocol(_))
        ));
        assert!(show.render(&json!({"id": "s-1"})).is_err());
    }

    #[test]
    fn delete_reports_gc() {
        let delete = BackupSetCommand::Delete { id: "s-1".into() };
        assert_eq!(delete.call().method, "backup_set.delete");
        assert_eq!(delete.call().params, json!({"id": "s-1"}));
        let gc = json!({"deferred": false, "reason": null, "manifests": 2, "chunks_kept": 3,
                        "chunks_deleted": 12, "bytes_freed": 40u64 << 20});
        assert_eq!(
            delete.render(&json!({"deleted": "s-1", "gc": gc})).unwrap(),
            "deleted backup set s-1; gc deleted 12 chunks, freed 40.0 MiB\n"
        );
        assert!(delete.render(&json!({"deleted": "s-1"})).is_err());
        assert_eq!(
            BackupSetCommand::Show { id: "s-1".into() }.call().method,
            "backup_set.show"
        );
    }

    #[test]
    fn hold_times_in_milliseconds() {
        assert_eq!(hold_ms(0), "0.00 ms");
        assert_eq!(hold_ms(1234), "1.23 ms");
        assert_eq!(hold_ms(9_999_999), "10000.00 ms");
    }
}
