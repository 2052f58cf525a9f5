//! `evsctl job …`: list, show, wait; plus the job object (JobInfo) that backup commands and
//! `volume create --from-backup` return, and where each command's result carries its jobs.

use clap::Subcommand;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::Call;
use crate::error::CliError;
use crate::progress::{format_eta, format_rate, percent};
use crate::render::{fields, iec_size, table, utc_time};
use crate::volume::missing;

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// List running and recently finished jobs.
    List,
    /// Show one job.
    Show { id: String },
    /// Wait for a job to finish, drawing its progress on stderr; exit 7 if it failed.
    Wait { id: String },
    /// Stop a running job for good: a backup releases its snapshot, a restore into a volume
    /// made for it removes that volume. Prints the job as it ended.
    Cancel { id: String },
}

impl JobCommand {
    pub fn call(&self) -> Call {
        let (method, params) = match self {
            JobCommand::List => ("job.list", json!({})),
            JobCommand::Show { id } | JobCommand::Wait { id } => ("job.show", json!({"id": id})),
            JobCommand::Cancel { id } => ("job.cancel", json!({"id": id})),
        };
        Call { method, params }
    }

    pub fn waits(&self) -> Option<JobSlot> {
        matches!(self, JobCommand::Wait { .. }).then_some(JobSlot::Whole)
    }

    pub fn render(&self, result: &Value) -> Result<String, CliError> {
        match self {
            JobCommand::List => job_table(jobs_in(result, "jobs")?),
            JobCommand::Show { .. } | JobCommand::Wait { .. } | JobCommand::Cancel { .. } => {
                Ok(job_fields(&JobInfo::parse(result)?))
            }
        }
    }
}

/// A job as the daemon describes it (`job.show`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JobInfo {
    pub id: String,
    pub kind: String,
    pub state: JobState,
    pub volume: String,
    #[serde(default)]
    pub backup_id: Option<String>,
    pub started_unix_secs: u64,
    #[serde(default)]
    pub finished_unix_secs: Option<u64>,
    pub progress: JobProgress,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub result: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Retrying,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JobProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    #[serde(default)]
    pub bytes_uploaded: u64,
    /// A float is accepted too: a rate is naturally a quotient.
    pub rate_bytes_per_sec: f64,
    #[serde(default)]
    pub eta_secs: Option<u64>,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl JobInfo {
    /// A malformed job object is a protocol error naming it.
    pub fn parse(value: &Value) -> Result<JobInfo, CliError> {
        JobInfo::deserialize(value)
            .map_err(|e| CliError::Protocol(format!("job {value} is malformed: {e}")))
    }

    /// Percent done; a succeeded job is 100% even when it had nothing to copy.
    pub fn percent(&self) -> u64 {
        match self.state {
            JobState::Succeeded => 100,
            _ => percent(self.progress.bytes_done, self.progress.bytes_total),
        }
    }

    /// The ETA column: only a running job has one.
    pub fn eta(&self) -> String {
        match (self.state, self.progress.eta_secs) {
            (JobState::Running, Some(secs)) => format_eta(secs),
            _ => "-".to_owned(),
        }
    }

    pub fn rate(&self) -> String {
        format_rate(self.progress.rate_bytes_per_sec)
    }

    /// The failure scripts see when this job was waited for (exit code 7), if it failed or
    /// was cancelled: either way what it was to do was not done.
    pub fn failure(&self) -> Option<CliError> {
        matches!(self.state, JobState::Failed | JobState::Cancelled).then(|| CliError::JobFailed {
            job_id: self.id.clone(),
            error: self
                .error
                .clone()
                .unwrap_or_else(|| "no error message".to_owned()),
        })
    }
}

/// Where a command's result carries the jobs `--wait` follows, so the result can be re-rendered
/// with their final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobSlot {
    /// `{"jobs": [JobInfo, …]}` (backup.create).
    Jobs,
    /// `{"job": JobInfo, …}` (backup.verify, backup.restore, volume.create from a backup).
    Job,
    /// The result is the job (job.show).
    Whole,
}

impl JobSlot {
    /// The ids of the jobs in `result`.
    pub fn ids(self, result: &Value) -> Result<Vec<String>, CliError> {
        let jobs = match self {
            JobSlot::Jobs => jobs_in(result, "jobs")?.iter().collect(),
            JobSlot::Job => vec![result.get("job").ok_or_else(|| missing(result, "job"))?],
            JobSlot::Whole => vec![result],
        };
        jobs.into_iter()
            .map(|job| {
                job["id"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| missing(job, "id"))
            })
            .collect()
    }

    /// Puts the jobs' final state (in the order of [`JobSlot::ids`]) back into `result`.
    pub fn replace(self, result: &mut Value, mut finals: Vec<Value>) -> Result<(), CliError> {
        let expected = match self {
            JobSlot::Jobs => jobs_in(result, "jobs")?.len(),
            JobSlot::Job | JobSlot::Whole => 1,
        };
        if finals.len() != expected {
            return Err(CliError::Protocol(format!(
                "waited for {} job(s), expected {expected}",
                finals.len()
            )));
        }
        match self {
            JobSlot::Jobs => result["jobs"] = Value::Array(finals),
            JobSlot::Job => result["job"] = finals.remove(0),
            JobSlot::Whole => *result = finals.remove(0),
        }
        Ok(())
    }
}

/// The array under `key`, or a protocol error.
pub fn jobs_in<'a>(result: &'a Value, key: &str) -> Result<&'a [Value], CliError> {
    result[key]
        .as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| missing(result, key))
}

/// The job list table: ID, KIND, VOLUME, BACKUP, STATE, PROGRESS, RATE, ETA.
pub fn job_table(jobs: &[Value]) -> Result<String, CliError> {
    let rows = jobs
        .iter()
        .map(|value| {
            let job = JobInfo::parse(value)?;
            Ok(vec![
                job.id.clone(),
                job.kind.clone(),
                job.volume.clone(),
                job.backup_id.clone().unwrap_or_else(|| "-".to_owned()),
                job.state.as_str().to_owned(),
                format!("{}%", job.percent()),
                job.rate(),
                job.eta(),
            ])
        })
        .collect::<Result<Vec<_>, CliError>>()?;
    Ok(table(
        &[
            "ID", "KIND", "VOLUME", "BACKUP", "STATE", "PROGRESS", "RATE", "ETA",
        ],
        &rows,
    ))
}

/// `key: value` lines describing one job.
pub fn job_fields(job: &JobInfo) -> String {
    let p = &job.progress;
    let mut pairs = vec![
        ("id", job.id.clone()),
        ("kind", job.kind.clone()),
        ("volume", job.volume.clone()),
        (
            "backup",
            job.backup_id.clone().unwrap_or_else(|| "-".to_owned()),
        ),
        ("state", job.state.as_str().to_owned()),
        ("started", utc_time(job.started_unix_secs)),
    ];
    if let Some(finished) = job.finished_unix_secs {
        pairs.push(("finished", utc_time(finished)));
    }
    pairs.push((
        "progress",
        format!(
            "{}%  {} / {}",
            job.percent(),
            iec_size(p.bytes_done),
            iec_size(p.bytes_total)
        ),
    ));
    if job.kind == "backup" {
        pairs.push(("uploaded", iec_size(p.bytes_uploaded)));
    }
    pairs.push(("rate", job.rate()));
    pairs.push(("eta", job.eta()));
    if let Some(error) = &job.error {
        pairs.push(("error", error.clone()));
    }
    fields(&pairs)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A sample JobInfo for tests across modules.
    pub fn sample(id: &str, state: &str, done: u64, total: u64) -> Value {
        json!({"id": id, "kind": "backup", "state": state, "volume": "vol0",
               "backup_id": "b-20261202T054400Z-1a2b3c4d", "started_unix_secs": 1_700_000_000,
               "finished_unix_secs": null,
               "progress": {"bytes_done": done, "bytes_total": total, "bytes_uploaded": done / 2,
                            "rate_bytes_per_sec": 612u64 << 20, "eta_secs": 4},
               "error": null, "result": null})
    }

    #[test]
    fn list_renders_a_table() {
        let result = json!({"jobs": [sample("j-1", "running", 45 << 20, 100 << 20),
                                     sample("j-22", "succeeded", 0, 0)]});
        assert_eq!(
            JobCommand::List.render(&result).unwrap(),
            "ID    KIND    VOLUME  BACKUP                       STATE      PROGRESS  RATE         ETA\n\
             j-1   backup  vol0    b-20261202T054400Z-1a2b3c4d  running    45%       612.0 MiB/s  4s\n\
             j-22  backup  vol0    b-20261202T054400Z-1a2b3c4d  succeeded  100%      612.0 MiB/s  -\n"
        );
        assert!(JobCommand::List.render(&json!({})).is_err());
        let mut bad = sample("j-1", "exploded", 0, 0);
        assert!(JobCommand::List
            .render(&json!({"jobs": [bad.clone()]}))
            .is_err());
        bad["state"] = json!("running");
        bad.as_object_mut().unwrap().remove("progress");
        assert!(JobCommand::List.render(&json!({"jobs": [bad]})).is_err());
    }

    #[test]
    fn show_renders_fields() {
        let mut job = sample("j-1", "failed", 1 << 30, 4 << 30);
        job["finished_unix_secs"] = json!(1_700_000_060);
        job["error"] = json!("backup store unreachable");
        let show = JobCommand::Show { id: "j-1".into() };
        assert_eq!(
            show.render(&job).unwrap(),
            "id:       j-1\n\
             kind:     backup\n\
             volume:   vol0\n\
             backup:   b-20261202T054400Z-1a2b3c4d\n\
             state:    failed\n\
             started:  2023-11-14 22:13:20 UTC\n\
             finished: 2023-11-14 22:14:20 UTC\n\
             progress: 25%  1.0 GiB / 4.0 GiB\n\
             uploaded: 512.0 MiB\n\
             rate:     612.0 MiB/s\n\
             eta:      -\n\
             error:    backup store unreachable\n"
        );
        let failure = JobInfo::parse(&job).unwrap().failure().unwrap();
        assert_eq!(failure.exit_code(), 7);
        assert!(JobInfo::parse(&sample("j", "succeeded", 0, 0))
            .unwrap()
            .failure()
            .is_none());
    }

    #[test]
    fn commands_become_calls() {
        let wait = JobCommand::Wait { id: "j-1".into() };
        assert_eq!(wait.call().method, "job.show");
        assert_eq!(wait.call().params, json!({"id": "j-1"}));
        assert_eq!(wait.waits(), Some(JobSlot::Whole));
        assert_eq!(JobCommand::Show { id: "j".into() }.waits(), None);
        assert_eq!(JobCommand::List.call().method, "job.list");
        let cancel = JobCommand::Cancel { id: "j-2".into() };
        assert_eq!(cancel.call().method, "job.cancel");
        assert_eq!(cancel.call().params, json!({"id": "j-2"}));
        assert_eq!(cancel.waits(), None);
    }

    #[test]
    fn a_cancelled_job_is_finished_and_a_failure() {
        let mut job = sample("j-3", "cancelled", 1 << 30, 4 << 30);
        job["error"] = json!("cancelled by job.cancel; snapshot vbs-b-1 released");
        let info = JobInfo::parse(&job).unwrap();
        assert!(info.state.is_finished());
        assert_eq!(info.eta(), "-");
        let rendered = JobCommand::Cancel { id: "j-3".into() }
            .render(&job)
            .unwrap();
        assert!(rendered.contains("state:    cancelled\n"), "{rendered}");
        assert!(
            rendered.contains("error:    cancelled by job.cancel"),
            "{rendered}"
        );
        assert_eq!(info.failure().unwrap().exit_code(), 7);
    }

    #[test]
    fn slots_find_and_replace_jobs() {
        let mut created =
            json!({"jobs": [sample("j-1", "running", 0, 1), sample("j-2", "running", 0, 1)]});
        assert_eq!(JobSlot::Jobs.ids(&created).unwrap(), ["j-1", "j-2"]);
        let finals = vec![
            sample("j-1", "succeeded", 1, 1),
            sample("j-2", "failed", 0, 1),
        ];
        JobSlot::Jobs.replace(&mut created, finals.clone()).unwrap();
        assert_eq!(created["jobs"][1]["state"], "failed");
        assert!(JobSlot::Jobs.replace(&mut created, vec![]).is_err());

        let mut volume = json!({"name": "v", "job": sample("j-3", "running", 0, 1)});
        assert_eq!(JobSlot::Job.ids(&volume).unwrap(), ["j-3"]);
        JobSlot::Job
            .replace(&mut volume, vec![sample("j-3", "succeeded", 1, 1)])
            .unwrap();
        assert_eq!(volume["name"], "v");
        assert_eq!(volume["job"]["state"], "succeeded");
        assert!(JobSlot::Job.ids(&json!({"name": "v"})).is_err());

        let mut job = sample("j-4", "running", 0, 1);
        assert_eq!(JobSlot::Whole.ids(&job).unwrap(), ["j-4"]);
        JobSlot::Whole
            .replace(&mut job, vec![sample("j-4", "failed", 0, 1)])
            .unwrap();
        assert_eq!(job["state"], "failed");
        assert!(JobSlot::Whole.ids(&json!({})).is_err());
    }
}
