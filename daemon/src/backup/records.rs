//! The state a job keeps on disk (`DATA_DIR/jobs/<job id>.json`) so that it resumes after a
//! crash or restart where it stopped.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backup::chunk::ChunkId;
use crate::backup::error::BackupError;
use crate::storage::manifest::write_durably;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum JobRecord {
    Backup(BackupRecord),
    Restore(RestoreRecord),
    Set(SetRecord),
}

impl JobRecord {
    pub fn job_id(&self) -> &str {
        match self {
            JobRecord::Backup(r) => &r.job_id,
            JobRecord::Restore(r) => &r.job_id,
            JobRecord::Set(r) => &r.set_id,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRecord {
    pub job_id: String,
    pub backup_id: String,
    pub volume: String,
    pub volume_uuid: String,
    /// The snapshot the backup reads (`vbs-<backup id>`).
    pub snapshot: String,
    pub snapshot_taken: bool,
    pub full: bool,
    /// Server backups (issue 6): shared by the members of one backup set.
    #[serde(default)]
    pub group_id: Option<String>,
    /// The policy that started it (None: a manual backup).
    #[serde(default)]
    pub policy: Option<String>,
    pub started_unix_secs: u64,
    /// Chunks already processed: (index, id or None for an all-zero chunk). Checkpointed
    /// while the job runs; a resumed job neither reads nor uploads them again.
    #[serde(default)]
    pub done: Vec<(u64, Option<ChunkId>)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRecord {
    pub job_id: String,
    pub backup_id: String,
    pub volume: String,
    /// The volume was created for this restore (`volume create --from-backup`): zero chunks
    /// need no writing, and a failed restore deletes it.
    pub created_volume: bool,
}

/// A server backup waiting for its member backups, to record the set when they are done.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRecord {
    pub set_id: String,
    pub server: String,
    pub created_unix_secs: u64,
    pub barrier_hold_us: u64,
    pub policy: Option<String>,
    /// (volume, backup id, job id) per member.
    pub members: Vec<(String, String, String)>,
    /// False while the set is being started: its record is written before the group
    /// snapshot, so that a crash before every member is recorded leaves a record naming the
    /// snapshots to release (see `Backups::resume`). Records without it are started sets.
    /// Written only while false, so that started sets read as before to older daemons.
    #[serde(default = "started_by_default", skip_serializing_if = "is_started")]
    pub members_recorded: bool,
}

fn started_by_default() -> bool {
    true
}

fn is_started(members_recorded: &bool) -> bool {
    *members_recorded
}

#[derive(Clone)]
pub struct JobFiles {
    dir: PathBuf,
}

impl JobFiles {
    pub fn open(data_dir: &Path) -> Result<JobFiles, BackupError> {
        let dir = data_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(|e| BackupError::JobFile {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(JobFiles { dir })
    }

    fn path(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{job_id}.json"))
    }

    pub fn save(&self, record: &JobRecord) -> Result<(), BackupError> {
        let path = self.path(record.job_id());
        let bytes = serde_json::to_vec(record).map_err(|e| BackupError::JobFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        write_durably(&path, &bytes).map_err(BackupError::Storage)
    }

    /// Removes a finished job's record durably: one that came back after a crash would run
    /// the job again (a restore over data clients wrote since).
    pub fn remove(&self, job_id: &str) {
        let path = self.path(job_id);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "removing a finished job's file failed");
            }
            return;
        }
        if let Err(e) = crate::storage::manifest::sync_dir(&self.dir) {
            tracing::warn!(path = %path.display(), error = %e, "the removal of a finished job's file may not be durable");
        }
    }

    /// Every unfinished job; an unreadable file is logged and left in place for inspection.
    pub fn load_all(&self) -> Vec<JobRecord> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                let _ = std::fs::remove_file(&path); // a temp file from an interrupted save
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<JobRecord>(&b).map_err(|e| e.to_string()))
            {
                Ok(record) => records.push(record),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable job file")
                }
            }
        }
        // Member backups first, so a set's coordinator finds their jobs when it resumes.
        records.sort_by_key(|r| matches!(r, JobRecord::Set(_)));
        records
    }
}
