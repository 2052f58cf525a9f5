//! What a backup policy's run does: back up its volumes (or servers), wait for the jobs, then
//! apply retention to that policy's own backups (or backup sets) of each target and collect
//! the freed chunks. Manual backups and other policies' backups are never touched.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::backup::job::{Job, JobKind, JobState};
use crate::backup::sets::BackupSetInfo;
use crate::backup::{BackupError, Backups, GcReport};
use crate::policy::retention::to_delete;
use crate::policy::{PolicySpec, RunContext, RunReport, Runner, Target};
use crate::servers::Servers;
use crate::storage::entry::now_unix_secs;

const JOB_POLL: Duration = Duration::from_millis(200);

/// A volume's backup in one run.
enum Backed {
    /// Started now: its job (held, so that a long wait cannot see it forgotten among the
    /// finished jobs past their cap) and backup id.
    Started(Arc<Job>, String),
    /// Made by the run this one starts again (its backup id).
    Done(String),
}
/// How long a policy's backup of a volume waits for another job on it to end.
const MAX_WAIT_FOR_JOB: Duration = Duration::from_secs(3600);

pub struct PolicyRunner {
    pub backups: Arc<Backups>,
    pub servers: Arc<Servers>,
}

#[async_trait::async_trait]
impl Runner for PolicyRunner {
    async fn run(&self, policy: &PolicySpec, context: RunContext) -> Result<RunReport, String> {
        let result = match &policy.target {
            Target::Volumes(volumes) => self.run_volumes(policy, volumes, context).await,
            Target::Servers(servers) => self.run_servers(policy, servers, context).await,
        };
        result.map_err(|e| e.to_string())
    }
}

impl PolicyRunner {
    /// Waits until no backup or restore job has `volume`: one resumed after a restart, or
    /// started by hand, goes first, and this slot's backup follows it instead of failing.
    /// False when the job still has it after [`MAX_WAIT_FOR_JOB`] (a restore stuck on a dead
    /// store): the backup then fails as busy rather than hold the policy's later slots off.
    async fn wait_unclaimed(&self, volume: &str) -> bool {
        tracing::info!(
            volume,
            "a policy backup waits for the job running on its volume"
        );
        let deadline = tokio::time::Instant::now() + MAX_WAIT_FOR_JOB;
        // A server restore still deciding holds its members too, jobs or none.
        while self.backups.is_claimed(volume) || self.backups.in_set_restore(volume) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(JOB_POLL).await;
        }
        true
    }

    /// Waits for a backup job; Err with its error when it did not succeed.
    async fn wait_job(&self, job: &Job) -> Result<(), BackupError> {
        while !job.state().is_finished() {
            tokio::time::sleep(JOB_POLL).await;
        }
        let info = job.info();
        match info.state {
            JobState::Succeeded => Ok(()),
            _ => Err(BackupError::Failed(format!(
                "backup of volume {:?} failed: {}",
                info.volume,
                info.error.unwrap_or_else(|| format!("{:?}", info.state))
            ))),
        }
    }

    /// Starts this run's backup of `volume`, or, in a run started again after the daemon
    /// stopped (`since`: when the stopped run began), finds the one that run already made.
    async fn backup_volume(
        &self,
        policy: &PolicySpec,
        volume: &String,
        since: Option<u64>,
    ) -> Result<Backed, BackupError> {
        if let (Some(since), Some(entry)) = (since, self.backups.registry.entry(volume)) {
            let uuid = entry.volume().identity().uuid.clone();
            let made = self
                .backups
                .list(Some(volume))
                .await?
                .into_iter()
                .filter(|b| {
                    b.policy.as_deref() == Some(policy.name.as_str())
                        && b.volume_uuid == uuid
                        && b.created_unix_secs >= since
                })
                .max_by_key(|b| b.created_unix_secs);
            if let Some(made) = made {
                return Ok(Backed::Done(made.id));
            }
        }
        let mut jobs = self
            .backups
            .create(
                std::slice::from_ref(volume),
                false,
                Some(policy.name.clone()),
            )
            .await?;
        let info = jobs
            .pop()
            .ok_or_else(|| BackupError::Failed(format!("no backup job for volume {volume:?}")))?;
        Ok(Backed::Started(self.backups.job(&info.id)?, info.backup_id))
    }

    /// In a run started again after a restart (`since`: when the stopped run began), the
    /// backup of `volume` that the stopped run started and the restart resumed, while it runs:
    /// this run's own, waited for however long it takes, not another job holding the volume
    /// (which a run waits for [`MAX_WAIT_FOR_JOB`] at most).
    fn resumed_backup(
        &self,
        policy: &PolicySpec,
        volume: &str,
        since: Option<u64>,
    ) -> Option<Backed> {
        since?;
        let info = self.backups.jobs().into_iter().find(|j| {
            j.kind == JobKind::Backup
                && j.volume == volume
                && j.policy.as_deref() == Some(policy.name.as_str())
                && !j.state.is_finished()
        })?;
        let job = self.backups.job(&info.id).ok()?;
        Some(Backed::Started(job, info.backup_id))
    }

    /// Backs up each volume on its own, so one that cannot be backed up (deleted, a job of its
    /// own running, a failure) costs only its own backup of this slot; retention then applies
    /// to the volumes whose backup succeeded. Err names every volume that failed, after the
    /// others are done.
    async fn run_volumes(
        &self,
        policy: &PolicySpec,
        volumes: &[String],
        context: RunContext,
    ) -> Result<RunReport, BackupError> {
        let since = context.resumed_since;
        let mut started = Vec::new();
        let mut backed_up = Vec::new();
        let mut failures = Vec::new();
        // Every free volume in the first round; one another job has is tried again once that
        // job has ended, whichever frees first, all within one deadline: one under a long
        // restore does not hold the others up.
        let deadline = tokio::time::Instant::now() + MAX_WAIT_FOR_JOB;
        let mut pending: Vec<&String> = volumes.iter().collect();
        loop {
            let mut busy = Vec::new();
            for volume in pending {
                let result = if let Some(resumed) = self.resumed_backup(policy, volume, since) {
                    Ok(resumed)
                } else if self.backups.is_claimed(volume) {
                    Err(BackupError::JobRunning(volume.clone()))
                } else {
                    self.backup_volume(policy, volume, since).await
                };
                match result {
                    Err(BackupError::JobRunning(_)) => busy.push(volume),
                    Ok(Backed::Started(job, backup_id)) => started.push((volume, job, backup_id)),
                    Ok(Backed::Done(id)) => backed_up.push((volume, id)),
                    Err(e) => failures.push(format!("volume {volume:?}: {e}")),
                }
            }
            if busy.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                for volume in busy {
                    let e = BackupError::JobRunning(volume.clone());
                    failures.push(format!("volume {volume:?}: {e}"));
                }
                break;
            }
            tracing::debug!(policy = %policy.name, volumes = ?busy, "policy backups wait for the jobs running on their volumes");
            tokio::time::sleep(JOB_POLL).await;
            pending = busy;
        }
        for (volume, job, backup_id) in started {
            match self.wait_job(&job).await {
                Ok(()) => backed_up.push((volume, backup_id)),
                Err(e) => failures.push(e.to_string()),
            }
        }
        // A retention that fails (a store listing, a delete) is reported with the volumes not
        // backed up, not instead of them.
        let retention = self.volume_retention(policy, backed_up, context).await;
        let (report, retention_failed) = match retention {
            Ok((report, collection_failed)) => (report, collection_failed),
            Err(e) => (RunReport::default(), Some(format!("retention failed: {e}"))),
        };
        match (
            not_backed_up("volume", volumes.len(), &failures),
            retention_failed,
        ) {
            (Ok(()), None) => Ok(report),
            (Ok(()), Some(retention)) => Err(BackupError::Failed(retention)),
            (Err(e), None) => Err(e),
            (Err(e), Some(retention)) => Err(BackupError::Failed(format!("{e}; {retention}"))),
        }
    }

    /// Retention over the policy's own backups of each volume in `backed_up` (with the backup
    /// this run made of it). Ok carries what was kept and, when the deletes stood but the
    /// collection of their chunks failed, that failure.
    async fn volume_retention(
        &self,
        policy: &PolicySpec,
        backed_up: Vec<(&String, String)>,
        context: RunContext,
    ) -> Result<(RunReport, Option<String>), BackupError> {
        let now = now_unix_secs();
        // Members of server backup sets are the sets' to keep or delete (a server policy of
        // the same name, since deleted, made them): deleting one here would leave a recorded
        // set that no longer restores. Backups from before this policy was created are an
        // earlier policy's of the same name, whose deletion left them to the user.
        let mine: Vec<_> = self
            .backups
            .list(None)
            .await?
            .into_iter()
            .filter(|b| {
                b.policy.as_deref() == Some(policy.name.as_str())
                    && b.group_id.is_none()
                    && b.created_unix_secs >= context.created_unix_secs
            })
            .collect();
        let mut doomed = Vec::new();
        let mut kept_bytes = 0;
        let mut kept = 0;
        for (volume, just_made) in backed_up {
            // This volume, not an earlier one of the same name (deleted and made again) nor
            // another daemon's of the same name sharing the store: by uuid.
            let Some(entry) = self.backups.registry.entry(volume) else {
                continue;
            };
            let uuid = entry.volume().identity().uuid.clone();
            let ours: Vec<_> = mine
                .iter()
                .filter(|b| &b.volume == volume && b.volume_uuid == uuid)
                .collect();
            // The backup this run made is the newest, even when an older one has the same
            // second: retention never deletes it.
            let items: Vec<(String, u64)> = ours
                .iter()
                .map(|b| {
                    let created = if b.id == just_made {
                        u64::MAX
                    } else {
                        b.created_unix_secs
                    };
                    (b.id.clone(), created)
                })
                .collect();
            let gone = to_delete(&items, policy.keep, policy.keep_days, now);
            for b in &ours {
                if gone.contains(&b.id) {
                    doomed.push((b.id.clone(), b.new_stored_bytes));
                } else {
                    kept += 1;
                    kept_bytes += b.new_stored_bytes;
                }
            }
        }
        let mut deleted = 0;
        let mut collection_failed = None;
        for (id, stored_bytes) in doomed {
            if self.retire(&id).await? {
                deleted += 1;
            } else {
                // Read by a restore or verify: kept until a later run.
                kept += 1;
                kept_bytes += stored_bytes;
            }
        }
        if deleted > 0 {
            tracing::info!(policy = %policy.name, deleted, "retention deleted backups");
            // The deletes stand whatever the collection does.
            if let Err(e) = self.backups.gc().await {
                collection_failed = Some(format!(
                    "collecting the chunks of the {deleted} backup(s) retention deleted failed: {e}"
                ));
            }
        }
        let report = RunReport {
            backups_kept: kept,
            stored_bytes: kept_bytes,
        };
        Ok((report, collection_failed))
    }

    /// Backs up each server in turn; one that fails does not keep the others from their
    /// backup and retention. Err names every server that failed, after the others are done.
    async fn run_servers(
        &self,
        policy: &PolicySpec,
        servers: &[String],
        context: RunContext,
    ) -> Result<RunReport, BackupError> {
        let mut report = RunReport::default();
        let mut failures = Vec::new();
        for name in servers {
            if let Err(e) = self.run_server(policy, name, context, &mut report).await {
                failures.push(format!("server {name:?}: {e}"));
            }
        }
        not_backed_up("server", servers.len(), &failures)?;
        Ok(report)
    }

    /// The complete backup set of server `name` that the run this one starts again (begun at
    /// `since`) already made, if any. A set of that run still being finished (resumed after the
    /// restart) is waited for first: its members' volumes are free again before its record is
    /// written, and a new backup started in that gap would take the server a second time.
    async fn set_made_since(
        &self,
        policy: &PolicySpec,
        name: &str,
        context: RunContext,
    ) -> Result<Option<String>, BackupError> {
        let Some(since) = context.resumed_since else {
            return Ok(None);
        };
        let resumed: Vec<BackupSetInfo> = self
            .backups
            .server_sets(name, true)
            .await?
            .into_iter()
            .filter(|s| {
                s.state == "running"
                    && s.policy.as_deref() == Some(policy.name.as_str())
                    && s.created_unix_secs >= since
            })
            .collect();
        for set in &resumed {
            if let Err(error) = self.wait_set(set).await {
                tracing::info!(policy = %policy.name, server = name, set = %set.id, %error, "the interrupted run's server backup did not complete; this run takes one");
            }
        }
        Ok(self
            .policy_sets(policy, name, context)
            .await?
            .into_iter()
            .filter(|s| s.created_unix_secs >= since)
            .max_by_key(|s| s.created_unix_secs)
            .map(|s| s.id))
    }

    /// Deletes a backup retention gave up; true when it is gone. One already gone (deleted by
    /// hand meanwhile) is done; one a restore or verify job reads stays until a later run.
    async fn retire(&self, backup_id: &str) -> Result<bool, BackupError> {
        match self.backups.delete_without_gc(backup_id).await {
            Ok(()) | Err(BackupError::BackupNotFound(_)) => Ok(true),
            Err(e @ BackupError::BackupInUse { .. }) => {
                tracing::info!(backup = backup_id, reason = %e, "retention keeps a backup for now");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The policy's complete, non-empty backup sets of server `name`: what its retention counts.
    /// This daemon's only: another daemon sharing the store may have a server and a policy of
    /// the same names, and its sets are not ours to count or delete. A set is ours when one of
    /// its members is a backup of a volume here (by uuid). Sets from before the policy was
    /// created are an earlier policy's of the same name.
    async fn policy_sets(
        &self,
        policy: &PolicySpec,
        name: &str,
        context: RunContext,
    ) -> Result<Vec<BackupSetInfo>, BackupError> {
        let mut mine = Vec::new();
        for set in self.backups.server_sets(name, true).await? {
            if set.state == "complete"
                && !set.members.is_empty()
                && set.policy.as_deref() == Some(policy.name.as_str())
                && set.created_unix_secs >= context.created_unix_secs
                && self.has_member_here(&set).await?
            {
                mine.push(set);
            }
        }
        Ok(mine)
    }

    /// Whether one of the set's members is a backup of a volume of this daemon.
    async fn has_member_here(&self, set: &BackupSetInfo) -> Result<bool, BackupError> {
        for member in &set.members {
            let info = match self.backups.catalog.get(&member.backup_id).await {
                Ok(info) => info,
                Err(e) if e.is_transient() => return Err(e),
                Err(BackupError::BackupNotFound(_)) => continue,
                // One damaged manifest must not stop the policy (as listings skip it).
                Err(e) => {
                    tracing::error!(set = %set.id, backup = %member.backup_id, error = %e, "unreadable member of a backup set");
                    continue;
                }
            };
            if self
                .backups
                .is_local_volume(&info.volume, &info.volume_uuid)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn run_server(
        &self,
        policy: &PolicySpec,
        name: &str,
        context: RunContext,
        report: &mut RunReport,
    ) -> Result<(), BackupError> {
        let server = self.servers.get(name)?;
        let just_made = loop {
            if let Some(id) = self.set_made_since(policy, name, context).await? {
                break id;
            }
            let started = self
                .backups
                .server_backup(&server, false, Some(policy.name.clone()))
                .await;
            let set = match started {
                Err(BackupError::JobRunning(busy)) if self.wait_unclaimed(&busy).await => continue,
                other => other?,
            };
            if let Err(e) = self.wait_set(&set).await {
                self.retire_superseded_failed_members(policy, &set, context)
                    .await;
                return Err(e);
            }
            break set.id;
        };
        self.apply_set_retention(policy, name, &just_made, context, report)
            .await
    }

    /// Retires the members the policy's failed sets (made from its creation until
    /// `before_unix_secs`) left of the volumes the backups `newer` are of, then collects their
    /// chunks: `newer` are those volumes' bases now. Returns how many went.
    async fn retire_failed_members<'a>(
        &self,
        policy: &PolicySpec,
        newer: impl Iterator<Item = &'a str>,
        context: RunContext,
        before_unix_secs: u64,
    ) -> Result<usize, BackupError> {
        let mut volumes = Vec::new();
        for backup_id in newer {
            match self.backups.catalog.get(backup_id).await {
                Ok(info) => volumes.push((info.volume, info.volume_uuid)),
                Err(e) if e.is_transient() => return Err(e),
                Err(_) => {}
            }
        }
        if volumes.is_empty() {
            return Ok(0);
        }
        let left = self
            .backups
            .failed_set_members(
                &policy.name,
                &volumes,
                context.created_unix_secs..before_unix_secs,
            )
            .await?;
        let mut deleted = 0;
        for id in &left {
            deleted += usize::from(self.retire(id).await?);
        }
        if deleted > 0 {
            self.backups.gc().await?;
        }
        Ok(deleted)
    }

    /// After set `failed` of this run failed: the members of the policy's earlier failed sets
    /// of the volumes it did back up go, as a complete set's retention would retire them
    /// (this set's members are those volumes' newest backups and bases now). Without this,
    /// while one member keeps failing, every run would leave the others' backups for good.
    /// A failure here is logged: the run already fails with the set's own error.
    async fn retire_superseded_failed_members(
        &self,
        policy: &PolicySpec,
        failed: &BackupSetInfo,
        context: RunContext,
    ) {
        let retired = async {
            let shown = self.backups.show_set(&failed.id).await?;
            let backed_up = (shown.jobs.iter())
                .filter(|j| j.state == JobState::Succeeded)
                .map(|j| j.backup_id.as_str());
            self.retire_failed_members(policy, backed_up, context, failed.created_unix_secs)
                .await
        }
        .await;
        match retired {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::info!(policy = %policy.name, server = %failed.server, deleted, "deleted the members of earlier failed server backups")
            }
            Err(e) => {
                tracing::warn!(policy = %policy.name, server = %failed.server, error = %e, "cannot delete the members of earlier failed server backups")
            }
        }
    }

    /// Waits for server backup `set` to be recorded (its member jobs first); Err when it
    /// failed, with what its failed members said.
    async fn wait_set(&self, set: &BackupSetInfo) -> Result<(), BackupError> {
        loop {
            let shown = self.backups.show_set(&set.id).await?;
            match shown.state {
                "complete" => return Ok(()),
                "failed" => {
                    let mut reasons: Vec<String> = shown
                        .jobs
                        .iter()
                        .filter(|j| j.state != JobState::Succeeded)
                        .filter_map(|j| {
                            let error = j.error.as_ref()?;
                            Some(format!("backup of volume {:?} failed: {error}", j.volume))
                        })
                        .collect();
                    reasons.extend(shown.error);
                    return Err(BackupError::Failed(format!(
                        "server backup {} failed: {}",
                        set.id,
                        reasons.join("; ")
                    )));
                }
                _ => tokio::time::sleep(JOB_POLL).await,
            }
        }
    }

    /// Deletes the policy's backup sets of server `name` past its limits.
    /// `just_made`, the set this run made (or found made by the run it starts again), counts
    /// as the newest whatever its time says (a clock set back since an earlier set), as a
    /// volume policy's newest backup does: retention never deletes it.
    async fn apply_set_retention(
        &self,
        policy: &PolicySpec,
        name: &str,
        just_made: &str,
        context: RunContext,
        report: &mut RunReport,
    ) -> Result<(), BackupError> {
        let mine = self.policy_sets(policy, name, context).await?;
        let rank = |s: &BackupSetInfo| {
            if s.id == just_made {
                u64::MAX
            } else {
                s.created_unix_secs
            }
        };
        let items: Vec<(String, u64)> = mine.iter().map(|s| (s.id.clone(), rank(s))).collect();
        let mut doomed = to_delete(&items, policy.keep, policy.keep_days, now_unix_secs());
        // A volume that left the server (removed from it, or deleted) is in no later set:
        // retiring every set that holds it would delete the last backup of its data, which
        // the policy no longer ages out. The newest set holding each such volume stays.
        let members_now: HashSet<String> = self
            .servers
            .get(name)
            .map(|server| server.volumes.into_iter().collect())
            .unwrap_or_default();
        let mut newest_of_departed: HashMap<&str, &BackupSetInfo> = HashMap::new();
        for set in &mine {
            for member in &set.members {
                if members_now.contains(&member.volume) {
                    continue;
                }
                let newest = newest_of_departed.entry(&member.volume).or_insert(set);
                if rank(set) > rank(newest) {
                    *newest = set;
                }
            }
        }
        doomed.retain(|id| !newest_of_departed.values().any(|set| set.id == *id));
        let mut kept_for_now = Vec::new();
        for id in &doomed {
            match self.backups.delete_set(id).await {
                // The run fails as the other retention paths do when their collection fails.
                Ok(GcReport {
                    failed: Some(reason),
                    ..
                }) => return Err(BackupError::Failed(reason)),
                // Deleted by hand since the listing: gone, as retention wanted.
                Ok(_) | Err(BackupError::SetNotFound(_)) => {}
                Err(e @ BackupError::BackupInUse { .. }) => {
                    tracing::info!(set = %id, reason = %e, "retention keeps a backup set for now");
                    kept_for_now.push(id.clone());
                }
                Err(e) => return Err(e),
            }
        }
        doomed.retain(|id| !kept_for_now.contains(id));
        // Members of this policy's failed sets, of the volumes its newest set holds, older
        // than that set: its members are those volumes' bases now, so deleting them costs no
        // incremental its base.
        if let Some(newest) = mine.iter().max_by_key(|s| rank(s)) {
            let members = newest.members.iter().map(|m| m.backup_id.as_str());
            let deleted = self
                .retire_failed_members(policy, members, context, newest.created_unix_secs)
                .await?;
            if deleted > 0 {
                tracing::info!(policy = %policy.name, server = name, deleted, "deleted the members of failed server backups");
            }
        }
        report.backups_kept += (mine.len() - doomed.len()) as u64;
        for set in mine.iter().filter(|s| !doomed.contains(&s.id)) {
            for member in &set.members {
                if let Ok(info) = self.backups.catalog.get(&member.backup_id).await {
                    report.stored_bytes += info.new_stored_bytes;
                }
            }
        }
        Ok(())
    }
}

/// Err naming every target of `kind` that a run did not back up, when there is one.
fn not_backed_up(kind: &str, total: usize, failures: &[String]) -> Result<(), BackupError> {
    if failures.is_empty() {
        return Ok(());
    }
    Err(BackupError::Failed(format!(
        "{} of {total} {kind}(s) not backed up: {}",
        failures.len(),
        failures.join("; ")
    )))
}
