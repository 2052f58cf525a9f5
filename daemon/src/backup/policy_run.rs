//! What a backup policy's run does: back up its volumes (or servers), wait for the jobs, then
//! apply retention to that policy's own backups (or backup sets) of each target and collect
//! the freed chunks. Manual backups and other policies' backups are never touched.

use std::sync::Arc;
use std::time::Duration;

use crate::backup::{BackupError, Backups};
use crate::policy::retention::to_delete;
use crate::policy::{PolicySpec, RunReport, Runner, Target};
use crate::servers::Servers;
use crate::storage::entry::now_unix_secs;

const JOB_POLL: Duration = Duration::from_millis(200);

pub struct PolicyRunner {
    pub backups: Arc<Backups>,
    pub servers: Arc<Servers>,
}

#[async_trait::async_trait]
impl Runner for PolicyRunner {
    async fn run(&self, policy: &PolicySpec) -> Result<RunReport, String> {
        let result = match &policy.target {
            Target::Volumes(volumes) => self.run_volumes(policy, volumes).await,
            Target::Servers(servers) => self.run_servers(policy, servers).await,
        };
        result.map_err(|e| e.to_string())
    }
}

impl PolicyRunner {
    async fn wait_jobs(&self, job_ids: &[String]) -> Result<(), BackupError> {
        for id in job_ids {
            let job = self.backups.job(id)?;
            while !job.state().is_finished() {
                tokio::time::sleep(JOB_POLL).await;
            }
            let info = job.info();
            if let Some(error) = info
                .error
                .filter(|_| !matches!(info.state, crate::backup::job::JobState::Succeeded))
            {
                return Err(BackupError::Failed(format!(
                    "backup of volume {:?} failed: {error}",
                    info.volume
                )));
            }
        }
        Ok(())
    }

    async fn run_volumes(
        &self,
        policy: &PolicySpec,
        volumes: &[String],
    ) -> Result<RunReport, BackupError> {
        let jobs = self
            .backups
            .create(volumes, false, Some(policy.name.clone()))
            .await?;
        let ids: Vec<String> = jobs.into_iter().map(|j| j.id).collect();
        self.wait_jobs(&ids).await?;
        let now = now_unix_secs();
        let mine: Vec<_> = self
            .backups
            .list(None)
            .await?
            .into_iter()
            .filter(|b| b.policy.as_deref() == Some(policy.name.as_str()))
            .collect();
        let mut doomed = Vec::new();
        for volume in volumes {
            let items: Vec<(String, u64)> = mine
                .iter()
                .filter(|b| &b.volume == volume)
                .map(|b| (b.id.clone(), b.created_unix_secs))
                .collect();
            doomed.extend(to_delete(&items, policy.keep, policy.keep_days, now));
        }
        for id in &doomed {
            self.backups.delete_without_gc(id).await?;
        }
        if !doomed.is_empty() {
            tracing::info!(policy = %policy.name, deleted = doomed.len(), "retention deleted backups");
            self.backups.gc().await?;
        }
        let kept: Vec<_> = mine.iter().filter(|b| !doomed.contains(&b.id)).collect();
        Ok(RunReport {
            backups_kept: kept.len() as u64,
            stored_bytes: kept.iter().map(|b| b.new_stored_bytes).sum(),
        })
    }

    async fn run_servers(
        &self,
        policy: &PolicySpec,
        servers: &[String],
    ) -> Result<RunReport, BackupError> {
        let mut report = RunReport::default();
        for name in servers {
            let server = self.servers.get(name)?;
            let set = self
                .backups
                .server_backup(&server, false, Some(policy.name.clone()))
                .await?;
            let ids: Vec<String> = set.jobs.iter().map(|j| j.id.clone()).collect();
            self.wait_jobs(&ids).await?;
            loop {
                let shown = self.backups.show_set(&set.id).await?;
                match shown.state {
                    "complete" => break,
                    "failed" => {
                        return Err(BackupError::Failed(format!(
                            "server backup {} of {name:?} failed: {}",
                            set.id,
                            shown.error.unwrap_or_default()
                        )))
                    }
                    _ => tokio::time::sleep(JOB_POLL).await,
                }
            }
            let mine: Vec<_> = self
                .backups
                .server_sets(name)
                .await?
                .into_iter()
                .filter(|s| {
                    s.state == "complete"
                        && !s.members.is_empty()
                        && s.policy.as_deref() == Some(policy.name.as_str())
                })
                .collect();
            let items: Vec<(String, u64)> = mine
                .iter()
                .map(|s| (s.id.clone(), s.created_unix_secs))
                .collect();
            let doomed = to_delete(&items, policy.keep, policy.keep_days, now_unix_secs());
            for id in &doomed {
                self.backups.delete_set(id).await?;
            }
            report.backups_kept += (mine.len() - doomed.len()) as u64;
            for set in mine.iter().filter(|s| !doomed.contains(&s.id)) {
                for member in &set.members {
                    if let Ok(info) = self.backups.catalog.get(&member.backup_id).await {
                        report.stored_bytes += info.new_stored_bytes;
                    }
                }
            }
        }
        Ok(report)
    }
}
