//! `evsctl backup …`: create, list, show, delete, gc, verify, restore.

use clap::Subcommand;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::Call;
use crate::error::CliError;
use crate::job::{job_fields, job_table, jobs_in, JobInfo, JobSlot, JobState};
use crate::progress::progress_line;
use crate::render::{fields, iec_size, table, utc_time};
use crate::volume::missing;

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up volumes to the backup store: incremental from the last backup unless --full.
    Create {
        #[arg(value_name = "VOL", required = true)]
        volumes: Vec<String>,
        /// Read and hash every chunk instead of only those changed since the last backup.
        #[arg(long)]
        full: bool,
        /// Wait for the jobs, drawing their progress on stderr; exit 7 if one fails.
        #[arg(long)]
        wait: bool,
    },
    /// List backups, oldest first.
    List {
        /// Only the backups of this volume.
        #[arg(long, value_name = "VOL")]
        volume: Option<String>,
    },
    /// Show one backup (with its progress while it runs).
    Show { id: String },
    /// Delete a backup, then collect the chunks no other backup uses.
    Delete { id: String },
    /// Delete the chunks no backup uses.
    Gc,
    /// Read back every chunk of a backup and check it (waits; exit 7 if any chunk is bad).
    Verify { id: String },
    /// Write a backup's content over an existing volume.
    Restore {
        id: String,
        /// The volume to overwrite (it must have the backup's size).
        #[arg(long, value_name = "VOL")]
        to: String,
        /// Disconnect the volume's clients first instead of refusing.
        #[arg(long)]
        force: bool,
        /// Wait for the restore, drawing its progress on stderr; exit 7 if it fails.
        #[arg(long)]
        wait: bool,
    },
}

impl BackupCommand {
    pub fn call(&self) -> Call {
        let (method, params) = match self {
            BackupCommand::Create { volumes, full, .. } => {
                ("backup.create", json!({"volumes": volumes, "full": full}))
            }
            // Only a chosen filter is sent.
            BackupCommand::List { volume: None } => ("backup.list", json!({})),
            BackupCommand::List {
                volume: Some(volume),
            } => ("backup.list", json!({"volume": volume})),
            BackupCommand::Show { id } => ("backup.show", json!({"id": id})),
            BackupCommand::Delete { id } => ("backup.delete", json!({"id": id})),
            BackupCommand::Gc => ("backup.gc", json!({})),
            BackupCommand::Verify { id } => ("backup.verify", json!({"id": id})),
            BackupCommand::Restore { id, to, force, .. } => (
                "backup.restore",
                json!({"id": id, "to": to, "force": force}),
            ),
        };
        Call { method, params }
    }

    /// Where the result carries the jobs to wait for, when this command waits.
    pub fn waits(&self) -> Option<JobSlot> {
        match self {
            BackupCommand::Create { wait: true, .. } => Some(JobSlot::Jobs),
            BackupCommand::Restore { wait: true, .. } | BackupCommand::Verify { .. } => {
                Some(JobSlot::Job)
            }
            _ => None,
        }
    }

    /// Failures beyond a failed job: a verify that found bad chunks.
    pub fn problems(&self, result: &Value) -> Result<Vec<CliError>, CliError> {
        let BackupCommand::Verify { id } = self else {
            return Ok(Vec::new());
        };
        let job = job_in(result)?;
        // A failed job is reported as such already (whether or not it lists bad chunks).
        let bad = match &job.result {
            Some(report) if job.state != JobState::Failed => {
                VerifyReport::parse(report)?.bad_chunks.len()
            }
            _ => 0,
        };
        Ok((bad > 0)
            .then(|| CliError::JobFailed {
                job_id: job.id.clone(),
                error: format!("backup {id} has {bad} bad chunk(s)"),
            })
            .into_iter()
            .collect())
    }

    pub fn render(&self, result: &Value) -> Result<String, CliError> {
        match self {
            BackupCommand::Create { .. } => job_table(jobs_in(result, "jobs")?),
            BackupCommand::List { .. } => {
                let backups = result["backups"]
                    .as_array()
                    .ok_or_else(|| missing(result, "backups"))?;
                let rows = backups
                    .iter()
                    .map(|b| BackupInfo::parse(b).map(|b| b.row()))
                    .collect::<Result<Vec<_>, CliError>>()?;
                let mut out = table(
                    &["ID", "VOLUME", "CREATED", "SIZE", "TYPE", "NEW", "STATE"],
                    &rows,
                );
                // Daemons before 2026-12-05 do not send it.
                for entry in result["unreadable"].as_array().into_iter().flatten() {
                    let (Some(id), Some(error)) = (entry["id"].as_str(), entry["error"].as_str())
                    else {
                        return Err(CliError::Protocol(format!(
                            "unreadable manifest entry {entry} is malformed"
                        )));
                    };
                    out.push_str(&format!("unreadable manifest {id}: {error}\n"));
                }
                Ok(out)
            }
            BackupCommand::Show { .. } => BackupInfo::parse(result)?.fields(),
            BackupCommand::Delete { .. } => deletion_summary("backup", result),
            BackupCommand::Gc => Ok(format!("{}\n", GcReport::parse(result)?.summary())),
            BackupCommand::Verify { id } => render_verify(id, &job_in(result)?),
            BackupCommand::Restore { id, to, .. } => {
                let job = job_in(result)?;
                Ok(format!(
                    "restore of backup {id} to volume {to}: job {} {}\n",
                    job.id,
                    job.state.as_str()
                ))
            }
        }
    }
}

/// `deleted backup ID; gc deleted 12 chunks, freed 40.0 MiB` for a `{"deleted": ID, "gc":
/// GcReport}` result (`backup.delete`, `backup_set.delete`); `what` names the deleted thing.
pub fn deletion_summary(what: &str, result: &Value) -> Result<String, CliError> {
    let deleted = result["deleted"]
        .as_str()
        .ok_or_else(|| missing(result, "deleted"))?;
    let gc = result.get("gc").ok_or_else(|| missing(result, "gc"))?;
    Ok(format!(
        "deleted {what} {deleted}; gc {}\n",
        GcReport::parse(gc)?.summary()
    ))
}

/// The `job` of a `{"job": JobInfo}` result.
pub fn job_in(result: &Value) -> Result<JobInfo, CliError> {
    JobInfo::parse(result.get("job").ok_or_else(|| missing(result, "job"))?)
}

/// A verify's outcome, or the job's description while it has none (still running, or failed
/// as a whole).
fn render_verify(id: &str, job: &JobInfo) -> Result<String, CliError> {
    let Some(report) = &job.result else {
        return Ok(job_fields(job));
    };
    let report = VerifyReport::parse(report)?;
    let mut out = format!(
        "verified backup {id}: {} chunks checked, {} bad\n",
        report.chunks_checked,
        report.bad_chunks.len()
    );
    for bad in &report.bad_chunks {
        out.push_str(&format!(
            "chunk {} {}: {}\n",
            bad.index, bad.chunk_id, bad.error
        ));
    }
    Ok(out)
}

/// A backup as `backup.list` / `backup.show` describe it.
#[derive(Debug, Deserialize)]
struct BackupInfo {
    id: String,
    state: String,
    volume: String,
    volume_uuid: String,
    size_bytes: u64,
    created_unix_secs: u64,
    snapshot: String,
    #[serde(default)]
    parent: Option<String>,
    incremental: bool,
    chunks: u64,
    data_chunks: u64,
    zero_chunks: u64,
    new_chunks: u64,
    new_stored_bytes: u64,
    #[serde(default)]
    delta_chunks: u64,
    read_bytes: u64,
    duration_ms: u64,
    #[serde(default)]
    job: Option<Value>,
}

impl BackupInfo {
    fn parse(value: &Value) -> Result<BackupInfo, CliError> {
        BackupInfo::deserialize(value)
            .map_err(|e| CliError::Protocol(format!("backup {value} is malformed: {e}")))
    }

    fn kind(&self) -> &'static str {
        if self.incremental {
            "incremental"
        } else {
            "full"
        }
    }

    fn row(self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.volume.clone(),
            utc_time(self.created_unix_secs),
            iec_size(self.size_bytes),
            self.kind().to_owned(),
            iec_size(self.new_stored_bytes),
            self.state,
        ]
    }

    fn fields(&self) -> Result<String, CliError> {
        let mut pairs = vec![
            ("id", self.id.clone()),
            ("volume", format!("{} ({})", self.volume, self.volume_uuid)),
            ("state", self.state.clone()),
            ("created", utc_time(self.created_unix_secs)),
            (
                "size",
                format!("{} ({} bytes)", iec_size(self.size_bytes), self.size_bytes),
            ),
            ("type", self.kind().to_owned()),
            ("parent", self.parent.clone().unwrap_or_else(|| "-".into())),
            ("snapshot", self.snapshot.clone()),
            (
                "chunks",
                format!(
                    "{} ({} data, {} zero)",
                    self.chunks, self.data_chunks, self.zero_chunks
                ),
            ),
            (
                "new",
                format!(
                    "{} chunks ({} as deltas), {} stored",
                    self.new_chunks,
                    self.delta_chunks,
                    iec_size(self.new_stored_bytes)
                ),
            ),
            ("read", iec_size(self.read_bytes)),
            (
                "duration",
                format!("{:.1} s", self.duration_ms as f64 / 1000.0),
            ),
        ];
        if let Some(job) = &self.job {
            let job = JobInfo::parse(job)?;
            pairs.push(("job", format!("{} ({})", job.id, job.state.as_str())));
            if !job.state.is_finished() {
                pairs.push(("progress", progress_line(&job)));
            }
        }
        Ok(fields(&pairs))
    }
}

/// What `backup.gc` (and `backup.delete`'s collection) did.
#[derive(Debug, Deserialize)]
struct GcReport {
    deferred: bool,
    #[serde(default)]
    reason: Option<String>,
    chunks_deleted: u64,
    /// Packs of chunks (daemons before packs do not send it).
    #[serde(default)]
    packs_deleted: u64,
    bytes_freed: u64,
    /// Why the collection after a delete failed (the delete itself succeeded).
    #[serde(default)]
    failed: Option<String>,
}

impl GcReport {
    fn parse(value: &Value) -> Result<GcReport, CliError> {
        GcReport::deserialize(value)
            .map_err(|e| CliError::Protocol(format!("gc report {value} is malformed: {e}")))
    }

    fn summary(&self) -> String {
        if let Some(failed) = &self.failed {
            format!("failed: {failed}; the next delete or `evsctl backup gc` collects")
        } else if self.deferred {
            let reason = self.reason.as_deref().unwrap_or("no reason given");
            format!("deferred: {reason}")
        } else {
            let packs = match self.packs_deleted {
                0 => String::new(),
                1 => " and 1 pack".to_owned(),
                n => format!(" and {n} packs"),
            };
            format!(
                "deleted {} chunks{packs}, freed {}",
                self.chunks_deleted,
                iec_size(self.bytes_freed)
            )
        }
    }
}

/// A finished verify job's `result`.
#[derive(Debug, Deserialize)]
struct VerifyReport {
    chunks_checked: u64,
    bad_chunks: Vec<BadChunk>,
}

#[derive(Debug, Deserialize)]
struct BadChunk {
    index: u64,
    chunk_id: String,
    error: String,
}

impl VerifyReport {
    fn parse(value: &Value) -> Result<VerifyReport, CliError> {
        VerifyReport::deserialize(value)
            .map_err(|e| CliError::Protocol(format!("verify result {value} is malformed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::tests::sample;

    fn backup(id: &str, incremental: bool, job: Value) -> Value {
        json!({"id": id, "state": if job.is_null() { "complete" } else { "running" },
               "volume": "vol0", "volume_uuid": "u-1", "size_bytes": 4u64 << 30,
               "created_unix_secs": 1_700_000_000, "snapshot": format!("vbs-{id}"),
               "parent": if incremental { json!("b-1") } else { Value::Null },
               "incremental": incremental, "group_id": null, "chunks": 1024, "data_chunks": 1000,
               "zero_chunks": 24, "new_chunks": 10, "new_stored_bytes": 40u64 << 20,
               "read_bytes": 1u64 << 30, "duration_ms": 12_345, "job": job})
    }

    #[test]
    fn list_renders_a_table() {
        let list = BackupCommand::List { volume: None };
        let result = json!({"backups": [backup("b-1", false, Value::Null),
                                        backup("b-2", true, sample("j-1", "running", 1, 2))]});
        assert_eq!(
            list.render(&result).unwrap(),
            "ID   VOLUME  CREATED                  SIZE     TYPE         NEW       STATE\n\
             b-1  vol0    2023-11-14 22:13:20 UTC  4.0 GiB  full         40.0 MiB  complete\n\
             b-2  vol0    2023-11-14 22:13:20 UTC  4.0 GiB  incremental  40.0 MiB  running\n"
        );
        let with_unreadable = json!({"backups": [backup("b-1", false, Value::Null)],
            "unreadable": [{"id": "b-0", "error": "unsupported format version 4"}]});
        assert!(list
            .render(&with_unreadable)
            .unwrap()
            .ends_with("complete\nunreadable manifest b-0: unsupported format version 4\n"));
        assert!(list.render(&json!({})).is_err());
        let mut partial = backup("b-1", false, Value::Null);
        partial.as_object_mut().unwrap().remove("new_stored_bytes");
        assert!(list.render(&json!({"backups": [partial]})).is_err());
    }

    #[test]
    fn show_includes_progress_while_running() {
        let show = BackupCommand::Show { id: "b-2".into() };
        let running = show
            .render(&backup(
                "b-2",
                true,
                sample("j-1", "running", 1 << 30, 4 << 30),
            ))
            .unwrap();
        assert!(
            running.starts_with("id:       b-2\nvolume:   vol0 (u-1)\n"),
            "{running}"
        );
        assert!(running.contains("parent:   b-1\n"));
        assert!(running.contains("chunks:   1024 (1000 data, 24 zero)\n"));
        assert!(running.contains("new:      10 chunks (0 as deltas), 40.0 MiB stored\n"));
        assert!(running.contains("duration: 12.3 s\n"));
        assert!(running.contains("job:      j-1 (running)\n"));
        assert!(running.contains("progress: vol0 backup  [#####---------------]  25%"));
        let complete = show.render(&backup("b-1", false, Value::Null)).unwrap();
        assert!(complete.contains("type:     full\n"));
        assert!(complete.contains("parent:   -\n"));
        assert!(!complete.contains("progress"));
    }

    #[test]
    fn gc_and_delete_summaries() {
        let report = json!({"deferred": false, "reason": null, "manifests": 5,
                            "chunks_kept": 300, "chunks_deleted": 12, "bytes_freed": 40u64 << 20});
        assert_eq!(
            BackupCommand::Gc.render(&report).unwrap(),
            "deleted 12 chunks, freed 40.0 MiB\n"
        );
        let with_packs = json!({"deferred": false, "reason": null, "manifests": 5,
                                "chunks_kept": 300, "chunks_deleted": 2, "packs_kept": 1,
                                "packs_deleted": 3, "bytes_freed": 1u64 << 20});
        assert_eq!(
            BackupCommand::Gc.render(&with_packs).unwrap(),
            "deleted 2 chunks and 3 packs, freed 1.0 MiB\n"
        );
        let deferred = json!({"deferred": true, "reason": "backup j-1 is running",
                              "manifests": 0, "chunks_kept": 0, "chunks_deleted": 0,
                              "bytes_freed": 0});
        assert_eq!(
            BackupCommand::Gc.render(&deferred).unwrap(),
            "deferred: backup j-1 is running\n"
        );
        let delete = BackupCommand::Delete { id: "b-1".into() };
        assert_eq!(
            delete
                .render(&json!({"deleted": "b-1", "gc": report}))
                .unwrap(),
            "deleted backup b-1; gc deleted 12 chunks, freed 40.0 MiB\n"
        );
        assert!(delete.render(&json!({"deleted": "b-1"})).is_err());
        assert!(BackupCommand::Gc
            .render(&json!({"deferred": false}))
            .is_err());
    }

    fn verified(bad_chunks: Value) -> Value {
        let mut job = sample("j-5", "succeeded", 8, 8);
        job["kind"] = json!("verify");
        job["result"] = json!({"chunks_checked": 1024, "bad_chunks": bad_chunks});
        json!({"job": job})
    }

    #[test]
    fn verify_prints_bad_chunks_and_fails() {
        let verify = BackupCommand::Verify { id: "b-1".into() };
        assert_eq!(verify.waits(), Some(JobSlot::Job));
        let clean = verified(json!([]));
        assert_eq!(
            verify.render(&clean).unwrap(),
            "verified backup b-1: 1024 chunks checked, 0 bad\n"
        );
        assert!(verify.problems(&clean).unwrap().is_empty());
        let bad = verified(json!([
            {"index": 3, "chunk_id": "ab12", "error": "crc32c mismatch"},
            {"index": 70, "chunk_id": "cd34", "error": "chunk missing"}
        ]));
        assert_eq!(
            verify.render(&bad).unwrap(),
            "verified backup b-1: 1024 chunks checked, 2 bad\n\
             chunk 3 ab12: crc32c mismatch\n\
             chunk 70 cd34: chunk missing\n"
        );
        let problems = verify.problems(&bad).unwrap();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].exit_code(), 7);
        assert_eq!(
            problems[0].to_string(),
            "job j-5 failed: backup b-1 has 2 bad chunk(s)"
        );
        // A verify that failed as a whole shows the job (its failure is reported by the wait).
        let mut failed = sample("j-5", "failed", 0, 8);
        failed["error"] = json!("store unreachable");
        let failed = json!({"job": failed});
        assert!(verify
            .render(&failed)
            .unwrap()
            .contains("error:    store unreachable\n"));
        assert!(verify.problems(&failed).unwrap().is_empty());
        assert!(verify.render(&verified(json!([{"index": 3}]))).is_err());
        // A daemon failing the job over bad chunks: the lines still print, the job's failure
        // (reported by the wait) is the only one.
        let mut failed_with_report = bad.clone();
        failed_with_report["job"]["state"] = json!("failed");
        assert!(verify
            .render(&failed_with_report)
            .unwrap()
            .contains("chunk 3 ab12: crc32c mismatch\n"));
        assert!(verify.problems(&failed_with_report).unwrap().is_empty());
    }

    #[test]
    fn commands_become_calls() {
        let create = BackupCommand::Create {
            volumes: vec!["vol0".into(), "vol1".into()],
            full: true,
            wait: false,
        };
        assert_eq!(create.call().method, "backup.create");
        assert_eq!(
            create.call().params,
            json!({"volumes": ["vol0", "vol1"], "full": true})
        );
        assert_eq!(create.waits(), None);
        assert_eq!(
            BackupCommand::List { volume: None }.call().params,
            json!({})
        );
        assert_eq!(
            BackupCommand::List {
                volume: Some("vol0".into())
            }
            .call()
            .params,
            json!({"volume": "vol0"})
        );
        let restore = BackupCommand::Restore {
            id: "b-1".into(),
            to: "vol1".into(),
            force: false,
            wait: true,
        };
        assert_eq!(
            restore.call().params,
            json!({"id": "b-1", "to": "vol1", "force": false})
        );
        assert_eq!(restore.waits(), Some(JobSlot::Job));
        let mut job = sample("j-2", "running", 0, 1);
        job["kind"] = json!("restore");
        assert_eq!(
            restore.render(&json!({"job": job})).unwrap(),
            "restore of backup b-1 to volume vol1: job j-2 running\n"
        );
        assert_eq!(BackupCommand::Gc.call().method, "backup.gc");
    }
}
