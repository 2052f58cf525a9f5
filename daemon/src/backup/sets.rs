//! Server backups (CSBS): every volume of a server snapshotted from one instant (one write
//! barrier across them), each snapshot backed up as in VBS, and the whole recorded as a backup
//! set (`backup-sets/<id>.json`) once every member's manifest exists.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backup::error::BackupError;
use crate::backup::job::JobInfo;
use crate::backup::manifest;
use crate::backup::records::{JobRecord, SetRecord};
use crate::backup::retry;
use crate::backup::set_restore::SetRestore;
use crate::backup::{backup_snapshot_name, new_record, Backups, GcReport};
use crate::error::StorageError;
use crate::servers::ServerInfo;
use crate::storage::entry::{now_unix_secs, since_epoch};
use crate::storage::Registry;

pub const SET_FORMAT_VERSION: u32 = 1;
/// How often a set's coordinator looks at its member jobs.
const MEMBER_POLL: Duration = Duration::from_millis(200);
/// How long a set's last store request is retried before the set fails.
const STORE_RETRY_LIMIT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMember {
    pub volume: String,
    pub backup_id: String,
}

/// The stored record of a complete server backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSet {
    pub format_version: u32,
    pub set_id: String,
    pub server: String,
    /// The group id every member manifest carries.
    pub group_id: String,
    pub created_unix_secs: u64,
    pub barrier_hold_us: u64,
    pub policy: Option<String>,
    pub members: Vec<SetMember>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupSetInfo {
    pub id: String,
    pub server: String,
    /// "complete", "running", or "failed" (a member failed; the set was not recorded).
    pub state: &'static str,
    pub created_unix_secs: u64,
    pub barrier_hold_us: u64,
    pub policy: Option<String>,
    pub members: Vec<SetMember>,
    pub jobs: Vec<JobInfo>,
    pub error: Option<String>,
}

/// A set this process is finishing, with its outcome once known.
type TrackedSet = (SetRecord, Option<Result<(), String>>);

/// Sets whose member jobs are still running (or ended in this process), by id.
#[derive(Default)]
pub struct RunningSets {
    sets: Mutex<BTreeMap<String, TrackedSet>>,
}

/// Sets that ended in this process kept for `backup_set.show` (a failed one says why only
/// from here); the oldest beyond this are forgotten, as finished jobs are.
const FINISHED_SETS_KEPT: usize = 100;

impl RunningSets {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, TrackedSet>> {
        self.sets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether set `set_id` is being finished here and has no outcome yet: its record may be
    /// written any moment, naming its members.
    pub(crate) fn is_recording(&self, set_id: &str) -> bool {
        self.lock()
            .get(set_id)
            .is_some_and(|(_, outcome)| outcome.is_none())
    }

    /// Records set `set_id`'s outcome and forgets the oldest ended sets beyond
    /// `FINISHED_SETS_KEPT`.
    fn ended(&self, set_id: &str, outcome: Result<(), String>) {
        let mut sets = self.lock();
        if let Some(entry) = sets.get_mut(set_id) {
            entry.1 = Some(outcome);
        }
        // Not the one that just ended: a long-running set is old by creation time.
        let mut ended: Vec<(u64, String)> = sets
            .iter()
            .filter(|(id, (_, outcome))| outcome.is_some() && id.as_str() != set_id)
            .map(|(id, (set, _))| (set.created_unix_secs, id.clone()))
            .collect();
        if ended.len() >= FINISHED_SETS_KEPT {
            ended.sort();
            for (_, id) in &ended[..=ended.len() - FINISHED_SETS_KEPT] {
                sets.remove(id);
            }
        }
    }
}

fn members_of(set: &SetRecord) -> Vec<SetMember> {
    set.members
        .iter()
        .map(|(volume, backup_id, _)| SetMember {
            volume: volume.clone(),
            backup_id: backup_id.clone(),
        })
        .collect()
}

/// Deletes the (volume, snapshot) pairs of a server backup that never started; true when none
/// is left (deleted, or already gone with its volume).
async fn release_snapshots(registry: &Registry, snapshots: &[(String, String)]) -> bool {
    let mut all_gone = true;
    for (volume, snapshot) in snapshots {
        let Some(entry) = registry.entry(volume) else {
            continue;
        };
        match entry.delete_snapshot(snapshot).await {
            Ok(_) => {
                tracing::info!(%volume, %snapshot, "released the snapshot of a server backup that never started")
            }
            Err(StorageError::SnapshotNotFound { .. }) => {}
            Err(error) => {
                all_gone = false;
                tracing::warn!(%volume, %snapshot, %error, "could not release the snapshot of a server backup that never started; the next start tries again");
            }
        }
    }
    all_gone
}

pub fn new_set_id() -> String {
    let id = manifest::new_backup_id(since_epoch());
    format!("s-{}", id.trim_start_matches("b-"))
}

impl BackupSet {
    fn info(&self) -> BackupSetInfo {
        BackupSetInfo {
            id: self.set_id.clone(),
            server: self.server.clone(),
            state: "complete",
            created_unix_secs: self.created_unix_secs,
            barrier_hold_us: self.barrier_hold_us,
            policy: self.policy.clone(),
            members: self.members.clone(),
            jobs: Vec::new(),
            error: None,
        }
    }
}

impl Backups {
    /// Backs up every volume of `server` from one instant. Returns once the group snapshot is
    /// taken; the uploads run as one backup job per member.
    pub async fn server_backup(
        self: &Arc<Self>,
        server: &ServerInfo,
        full: bool,
        policy: Option<String>,
    ) -> Result<BackupSetInfo, BackupError> {
        let volumes = server.volumes.clone();
        if volumes.is_empty() {
            // An empty set would count as a server backup, and retention would keep it in
            // place of one that holds the disks.
            return Err(BackupError::InvalidArgument(format!(
                "server {:?} has no volumes: nothing to back up",
                server.name
            )));
        }
        let mut entries = Vec::with_capacity(volumes.len());
        for volume in &volumes {
            entries.push(
                self.registry
                    .entry(volume)
                    .ok_or_else(|| StorageError::NotFound(volume.clone()))?,
            );
        }
        self.claim_all(&volumes)?;
        let set_id = new_set_id();
        let mut records: Vec<_> = entries
            .iter()
            .zip(&volumes)
            .map(|(entry, volume)| {
                new_record(entry, volume, full, Some(set_id.clone()), policy.clone())
            })
            .collect();
        let mut set = SetRecord {
            set_id: set_id.clone(),
            server: server.name.clone(),
            created_unix_secs: now_unix_secs(),
            barrier_hold_us: 0,
            policy,
            members: records
                .iter()
                .map(|r| (r.volume.clone(), r.backup_id.clone(), r.job_id.clone()))
                .collect(),
            members_recorded: false,
        };
        let taken = async {
            // The set is recorded first, as not started: a crash from here until every member
            // is recorded leaves it naming the snapshots to release (see `Backups::resume`).
            self.files.save(&JobRecord::Set(set.clone()))?;
            // The members are recorded only once the group snapshot is taken, each with its
            // snapshot: one resumed after a crash never takes a snapshot of its own, which
            // would not be from the set's instant.
            let group: Vec<(String, String)> = records
                .iter()
                .map(|r| (r.volume.clone(), r.snapshot.clone()))
                .collect();
            set.barrier_hold_us = self.registry.snapshot_group(&group).await?;
            self.metrics
                .backup()
                .barrier_hold_seconds
                .observe(set.barrier_hold_us as f64 / 1e6);
            for record in &mut records {
                record.snapshot_taken = true;
                self.files.save(&JobRecord::Backup(record.clone()))?;
            }
            set.members_recorded = true;
            self.files.save(&JobRecord::Set(set.clone()))
        }
        .await;
        if let Err(e) = taken {
            // Not started, whatever the last save left on disk (it may have landed and failed
            // after): a crash during this cleanup then finds a set to release, not to resume.
            set.members_recorded = false;
            let _ = self.files.save(&JobRecord::Set(set.clone()));
            for record in &records {
                self.files.remove(&record.job_id);
            }
            let snapshots: Vec<(String, String)> = records
                .iter()
                .map(|r| (r.volume.clone(), r.snapshot.clone()))
                .collect();
            // Kept when a snapshot stays: the next start releases it.
            if release_snapshots(&self.registry, &snapshots).await {
                self.files.remove(&set.set_id);
            }
            self.unclaim_all(&volumes);
            return Err(e);
        }
        tracing::info!(set = %set_id, server = %server.name, hold_us = set.barrier_hold_us, "server backup started");
        let jobs: Vec<JobInfo> = records
            .into_iter()
            .map(|r| self.start_recorded(r))
            .collect();
        self.spawn_set(set.clone());
        let mut info = self.set_info_running(&set, None);
        info.jobs = jobs;
        Ok(info)
    }

    /// Takes out of `records` the server backups a crash or shutdown cut off before all their
    /// members were recorded, with the member records that were: such a set never started
    /// (its call never returned it), so its members' records go and the snapshots its group
    /// snapshot may have taken are released in the background; the set's own record goes once
    /// they are, so a restart meanwhile tries again. Returns the records left to resume.
    pub(crate) fn release_unstarted_sets(
        self: &Arc<Self>,
        records: Vec<JobRecord>,
    ) -> Vec<JobRecord> {
        let mut unstarted = Vec::new();
        let mut rest = Vec::with_capacity(records.len());
        for record in records {
            match record {
                JobRecord::Set(set) if !set.members_recorded => unstarted.push(set),
                other => rest.push(other),
            }
        }
        if unstarted.is_empty() {
            return rest;
        }
        rest.retain(|record| {
            let JobRecord::Backup(member) = record else {
                return true;
            };
            let of_unstarted = unstarted.iter().any(|set| {
                member.group_id.as_deref() == Some(set.set_id.as_str())
                    && set.members.iter().any(|(_, _, job)| *job == member.job_id)
            });
            if of_unstarted {
                self.files.remove(&member.job_id);
            }
            !of_unstarted
        });
        let this = Arc::clone(self);
        tokio::spawn(async move {
            for set in unstarted {
                tracing::warn!(set = %set.set_id, server = %set.server, "a server backup was cut off while it started; releasing its snapshots");
                let snapshots: Vec<(String, String)> = set
                    .members
                    .iter()
                    .map(|(volume, backup_id, _)| (volume.clone(), backup_snapshot_name(backup_id)))
                    .collect();
                if release_snapshots(&this.registry, &snapshots).await {
                    this.files.remove(&set.set_id);
                }
            }
        });
        rest
    }

    fn set_info_running(
        &self,
        set: &SetRecord,
        outcome: Option<&Result<(), String>>,
    ) -> BackupSetInfo {
        let jobs = set
            .members
            .iter()
            .filter_map(|(_, _, job_id)| self.job(job_id).ok().map(|j| j.info()))
            .collect();
        BackupSetInfo {
            id: set.set_id.clone(),
            server: set.server.clone(),
            state: match outcome {
                None => "running",
                Some(Ok(())) => "complete",
                Some(Err(_)) => "failed",
            },
            created_unix_secs: set.created_unix_secs,
            barrier_hold_us: set.barrier_hold_us,
            policy: set.policy.clone(),
            members: members_of(set),
            jobs,
            error: outcome.and_then(|o| o.clone().err()),
        }
    }

    /// Waits for a set's member jobs, then records the set (every member succeeded) or drops
    /// it. Also run for sets a restart interrupted.
    pub(crate) fn spawn_set(self: &Arc<Self>, set: SetRecord) {
        self.running_sets
            .lock()
            .insert(set.set_id.clone(), (set.clone(), None));
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = this.finish_set(&set).await;
            match &outcome {
                Ok(()) => {
                    tracing::info!(set = %set.set_id, server = %set.server, "server backup complete");
                    this.files.remove(&set.set_id);
                }
                Err(BackupError::Cancelled(_)) => return,
                Err(e) => {
                    tracing::error!(set = %set.set_id, server = %set.server, error = %e, "server backup failed");
                    this.files.remove(&set.set_id);
                }
            }
            this.note_server_outcome(&set.server, outcome.is_ok());
            this.running_sets
                .ended(&set.set_id, outcome.map_err(|e| e.to_string()));
        });
    }

    async fn finish_set(&self, set: &SetRecord) -> Result<(), BackupError> {
        loop {
            let running = set.members.iter().any(|(_, _, job_id)| {
                self.job(job_id)
                    .map(|j| !j.state().is_finished())
                    .unwrap_or(false)
            });
            if !running {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(MEMBER_POLL) => {}
                _ = self.shutdown.cancelled() => {}
            }
            if self.shutdown.is_cancelled() {
                break;
            }
        }
        // Members stopped by the shutdown resume at the next start, and so does this set.
        if self.shutdown.is_cancelled() {
            return Err(BackupError::Cancelled("the daemon is shutting down".into()));
        }
        // One limit for the set's last requests together (see `retrying_store`).
        let give_up_at = tokio::time::Instant::now() + STORE_RETRY_LIMIT;
        // Every member must have its manifest: a failed member fails the set.
        for (volume, backup_id, _) in &set.members {
            let found = self
                .retrying_store(set, give_up_at, "reading a member's manifest", || {
                    self.store.get_manifest(backup_id)
                })
                .await;
            match found {
                Ok(_) => {}
                Err(BackupError::BackupNotFound(_)) => {
                    return Err(BackupError::Failed(format!(
                        "the backup of member volume {volume:?} ({backup_id}) did not complete"
                    )))
                }
                Err(e) => return Err(e),
            }
        }
        let record = BackupSet {
            format_version: SET_FORMAT_VERSION,
            set_id: set.set_id.clone(),
            server: set.server.clone(),
            group_id: set.set_id.clone(),
            created_unix_secs: set.created_unix_secs,
            barrier_hold_us: set.barrier_hold_us,
            policy: set.policy.clone(),
            members: members_of(set),
        };
        let body = serde_json::to_vec_pretty(&record)
            .map_err(|e| BackupError::Failed(format!("encoding backup set: {e}")))?;
        self.retrying_store(set, give_up_at, "writing the set's record", || {
            self.store.put_set(&set.set_id, body.clone())
        })
        .await
    }

    /// Runs a store operation of `set`'s last step until it succeeds, fails for good, or
    /// fails past `give_up_at` ([`STORE_RETRY_LIMIT`] after the step began): every member is
    /// stored by then, and one unanswered request must not throw the set away (its members
    /// would go with the next complete set's retention). Stops at shutdown; the set resumes
    /// at the next start.
    async fn retrying_store<T, F, Fut>(
        &self,
        set: &SetRecord,
        give_up_at: tokio::time::Instant,
        what: &str,
        mut op: F,
    ) -> Result<T, BackupError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, BackupError>>,
    {
        let mut delay = retry::FIRST_DELAY;
        let mut failures = 0u32;
        loop {
            let outcome = tokio::select! {
                outcome = op() => outcome,
                _ = self.shutdown.cancelled() => {
                    return Err(BackupError::Cancelled("the daemon is shutting down".into()));
                }
            };
            match outcome {
                // Some errors counted transient never clear (a store refusing the object for
                // good): the set fails in the end rather than keep its policy waiting.
                Err(e) if e.is_transient() && tokio::time::Instant::now() < give_up_at => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(set = %set.set_id, what, error = %e, failures, "backup store failed; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => {}
                    }
                    delay = (delay * 2).min(retry::MAX_DELAY);
                }
                other => return other,
            }
        }
    }

    pub async fn get_set(&self, set_id: &str) -> Result<BackupSet, BackupError> {
        let bytes = self.store.get_set(set_id).await?;
        let set: BackupSet = serde_json::from_slice(&bytes).map_err(|e| {
            BackupError::Failed(format!("backup set {set_id:?} is unreadable: {e}"))
        })?;
        if set.format_version != SET_FORMAT_VERSION
            || set.set_id != set_id
            || set.group_id != set_id
        {
            return Err(BackupError::Failed(format!(
                "backup set {set_id:?} has format {} and id {:?}",
                set.format_version, set.set_id
            )));
        }
        // A set holds each volume once, each from a backup of its own: a record naming one
        // twice is damaged (a restore to new volumes would make the same volume twice and
        // take the second's failure for the first's).
        let mut volumes = HashSet::new();
        let mut backups = HashSet::new();
        for member in &set.members {
            if !volumes.insert(&member.volume) || !backups.insert(&member.backup_id) {
                return Err(BackupError::Failed(format!(
                    "backup set {set_id:?} is damaged: it names volume {:?} or backup {} twice",
                    member.volume, member.backup_id
                )));
            }
        }
        Ok(set)
    }

    /// A set's summary: running ones from memory, complete ones from the store.
    pub async fn show_set(&self, set_id: &str) -> Result<BackupSetInfo, BackupError> {
        manifest::validate_backup_id(set_id)?;
        let running = self.running_sets.lock().get(set_id).cloned();
        if let Some((set, outcome)) = running {
            if !matches!(outcome, Some(Ok(()))) {
                return Ok(self.set_info_running(&set, outcome.as_ref()));
            }
        }
        Ok(self.get_set(set_id).await?.info())
    }

    /// The server's sets, oldest first: complete ones from the store, plus running ones.
    /// `counted`: the server exists here, and its metric series are set from what is found
    /// (a name asked about that is no server gets no series).
    pub async fn server_sets(
        &self,
        server: &str,
        counted: bool,
    ) -> Result<Vec<BackupSetInfo>, BackupError> {
        let mut out = Vec::new();
        for id in self.store.list_set_ids().await? {
            match self.get_set(&id).await {
                Ok(set) if set.server == server => out.push(set.info()),
                Ok(_) => {}
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => tracing::error!(set = %id, error = %e, "unreadable backup set"),
            }
        }
        let running: Vec<_> = self.running_sets.lock().values().cloned().collect();
        for (set, outcome) in running {
            if set.server == server && outcome.is_none() {
                out.push(self.set_info_running(&set, None));
            }
        }
        out.sort_by(|a, b| (a.created_unix_secs, &a.id).cmp(&(b.created_unix_secs, &b.id)));
        if !counted {
            return Ok(out);
        }
        let mut stored_bytes = 0u64;
        let mut complete = 0i64;
        for set in out.iter().filter(|s| s.state == "complete") {
            complete += 1;
            for member in &set.members {
                if let Ok(info) = self.catalog.get(&member.backup_id).await {
                    stored_bytes += info.new_stored_bytes;
                }
            }
        }
        // Asked again after the (slow) listings, with nothing awaited before the series are
        // set: a server deleted meanwhile (a policy's retention running as it went) gets its
        // series back from nobody.
        if !self.server_exists(server) {
            return Ok(out);
        }
        let labels = crate::metrics::backup::ServerLabels {
            server: server.to_owned(),
        };
        let m = self.metrics.backup();
        m.server_backup_sets.get_or_create(&labels).set(complete);
        m.server_stored_bytes
            .get_or_create(&labels)
            .set(i64::try_from(stored_bytes).unwrap_or(i64::MAX));
        Ok(out)
    }

    /// Deletes a set and its member backups, then collects their chunks.
    pub async fn delete_set(self: &Arc<Self>, set_id: &str) -> Result<GcReport, BackupError> {
        manifest::validate_backup_id(set_id)?;
        // Memory before the store: a set being made here may be recorded right after the
        // store answered "not found", and its members would then go as a failed set's.
        if self.set_being_made(set_id) {
            return Err(being_made(set_id));
        }
        let set = match self.get_set(set_id).await {
            Ok(set) => set,
            Err(BackupError::SetNotFound(_)) => return self.delete_set_leftovers(set_id).await,
            Err(e) => return Err(e),
        };
        // Only backups that say they belong to this set: a damaged or edited record naming
        // another set's member, or a backup of its own, must not delete it.
        let mut ids: Vec<String> = Vec::with_capacity(set.members.len());
        for member in &set.members {
            match self.catalog.get(&member.backup_id).await {
                Ok(info) if info.group_id.as_deref() == Some(set_id) => {
                    ids.push(member.backup_id.clone())
                }
                Ok(info) => {
                    tracing::warn!(set = set_id, backup = %member.backup_id, group = ?info.group_id, "the set's record names a backup of another set (or none): it stays")
                }
                Err(BackupError::BackupNotFound(_)) => {}
                Err(e) if e.is_transient() => return Err(e),
                // Unreadable: whose it is cannot be told; the GC never collects what a
                // manifest it cannot read may need, and it can be deleted by hand.
                Err(e) => {
                    tracing::warn!(set = set_id, backup = %member.backup_id, error = %e, "an unreadable member of the set stays")
                }
            }
        }
        // Every member held for deleting before the record goes: no restore or verify of one
        // starts meanwhile, nor is one running now.
        let _deleting = self.holds.delete_all(&ids)?;
        // The record first: a set is never listed with members gone. Stopped halfway, the
        // members left are those of a set no record names: deletable one by one, and a
        // policy's retention deletes those of its own sets (see `failed_set_members`).
        self.store.delete_set(set_id).await?;
        self.running_sets.lock().remove(set_id);
        for id in &ids {
            match self.delete_without_gc(id).await {
                Ok(()) | Err(BackupError::BackupNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        tracing::info!(set = set_id, server = %set.server, "deleted backup set");
        Ok(self.gc_after_delete().await)
    }

    /// Whether set `set_id` is being made here (its members' jobs or its record under way).
    fn set_being_made(&self, set_id: &str) -> bool {
        matches!(
            self.running_sets
                .lock()
                .get(set_id)
                .map(|(_, o)| o.is_none()),
            Some(true)
        )
    }

    /// Deletes the member backups of set `set_id` when no record of it is stored: a set that
    /// failed, or one whose delete stopped after its record went. Only a set this daemon made
    /// (its members are backups of volumes here, by uuid), and not while it is being made: a
    /// set another daemon is making has no record yet either, and its members are its own.
    async fn delete_set_leftovers(self: &Arc<Self>, set_id: &str) -> Result<GcReport, BackupError> {
        manifest::validate_backup_id(set_id)?;
        let outcome = self.running_sets.lock().get(set_id).map(|(_, o)| o.clone());
        match outcome {
            Some(None) => return Err(being_made(set_id)),
            // Recorded here: the store said "not found" a moment ago, but a set recorded since
            // is a set again, not leftovers. Asked once more: still gone (deleted elsewhere,
            // or a delete that failed after it took effect), its memory entry goes too.
            Some(Some(Ok(()))) => match self.store.get_set(set_id).await {
                Err(BackupError::SetNotFound(_)) => {
                    self.running_sets.lock().remove(set_id);
                }
                Ok(_) => {
                    return Err(BackupError::Failed(format!(
                        "server backup {set_id} was just recorded: delete it again"
                    )))
                }
                Err(e) => return Err(e),
            },
            _ => {}
        }
        let members: Vec<_> = self
            .list(None)
            .await?
            .into_iter()
            .filter(|b| b.group_id.as_deref() == Some(set_id))
            .collect();
        if members.is_empty() {
            return Err(BackupError::SetNotFound(set_id.to_owned()));
        }
        for b in &members {
            if !self.is_local_volume(&b.volume, &b.volume_uuid) {
                return Err(BackupError::InvalidArgument(format!(
                    "server backup {set_id} has no record, and its member {} is of a volume {:?} not on this daemon (another daemon's, which may still be making the set, or deleted): delete it with backup delete",
                    b.id, b.volume
                )));
            }
        }
        let members: Vec<String> = members.into_iter().map(|b| b.id).collect();
        let _deleting = self.holds.delete_all(&members)?;
        for id in &members {
            match self.delete_without_gc(id).await {
                Ok(()) | Err(BackupError::BackupNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.running_sets.lock().remove(set_id);
        tracing::info!(
            set = set_id,
            members = members.len(),
            "deleted the members of an unrecorded backup set"
        );
        Ok(self.gc_after_delete().await)
    }

    /// The backups `policy` made as members of server backups that failed (so no set record
    /// names them), of the volumes `volumes` (name and uuid: this daemon's volumes only, never
    /// another daemon's sharing the store), created within `made_unix_secs` (from the policy's
    /// creation to its newest set). A failed set
    /// cannot be restored as a server backup and the policy's retention counts sets, so without
    /// this its members would stay forever. Sets still running here are not failed.
    pub(crate) async fn failed_set_members(
        &self,
        policy: &str,
        volumes: &[(String, String)],
        made_unix_secs: std::ops::Range<u64>,
    ) -> Result<Vec<String>, BackupError> {
        let mut sets: std::collections::BTreeSet<String> =
            self.store.list_set_ids().await?.into_iter().collect();
        sets.extend(
            self.running_sets
                .lock()
                .iter()
                .filter(|(_, (_, outcome))| !matches!(outcome, Some(Err(_))))
                .map(|(id, _)| id.clone()),
        );
        let mut orphans = Vec::new();
        for b in self.list(None).await? {
            let Some(group) = &b.group_id else {
                continue;
            };
            let candidate = b.policy.as_deref() == Some(policy)
                && !sets.contains(group)
                && made_unix_secs.contains(&b.created_unix_secs)
                && volumes
                    .iter()
                    .any(|(name, uuid)| &b.volume == name && &b.volume_uuid == uuid);
            if !candidate {
                continue;
            }
            // A listing may miss an object (an S3 service's listing can lag): asked by name,
            // the set must be gone.
            match self.store.get_set(group).await {
                Err(BackupError::SetNotFound(_)) => orphans.push(b.id),
                Ok(_) => {}
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::error!(set = %group, error = %e, "unreadable backup set: its members stay")
                }
            }
        }
        Ok(orphans)
    }

    /// Restores every member of a set: onto the original volumes (refused while any has
    /// clients unless `force`), or into new volumes named `<volume><suffix>`.
    pub async fn restore_set(
        self: &Arc<Self>,
        set_id: &str,
        to_new_suffix: Option<&str>,
        force: bool,
    ) -> Result<Vec<JobInfo>, BackupError> {
        let set = self.get_set(set_id).await?;
        // A server backup always has members: a record without any (edited, damaged) would
        // report a restore of the server that restored nothing.
        if set.members.is_empty() {
            return Err(BackupError::Failed(format!(
                "backup set {set_id:?} names no member backups: nothing to restore"
            )));
        }
        // Every backup that says it is of this set must be named by its record: one cut short
        // (edited, damaged) would restore part of the server and report it whole.
        let named: HashSet<&str> = set.members.iter().map(|m| m.backup_id.as_str()).collect();
        let unnamed: Vec<String> = self
            .list(None)
            .await?
            .into_iter()
            .filter(|b| b.group_id.as_deref() == Some(set_id) && !named.contains(b.id.as_str()))
            .map(|b| b.id)
            .collect();
        if !unnamed.is_empty() {
            return Err(BackupError::Failed(format!(
                "backup set {set_id:?} is damaged: its record does not name its member backup(s) {}; nothing restored",
                unnamed.join(", ")
            )));
        }
        // Held until each member's job holds its own: none deleted meanwhile.
        let _reading = set
            .members
            .iter()
            .map(|m| self.holds.read(&m.backup_id))
            .collect::<Result<Vec<_>, _>>()?;
        // Every target is checked before any restore starts: a set restored in part is a
        // server whose disks disagree.
        for member in &set.members {
            let manifest = self.store.get_manifest(&member.backup_id).await?;
            // The record names its members, and each member's manifest says whose it is: a
            // record that disagrees (edited, damaged) restores nothing.
            if manifest.group_id.as_deref() != Some(set.group_id.as_str())
                || manifest.volume_name != member.volume
            {
                return Err(BackupError::Failed(format!(
                    "backup set {set_id:?} names backup {} as volume {:?}'s, but that backup is of volume {:?} in set {:?}",
                    member.backup_id, member.volume, manifest.volume_name, manifest.group_id
                )));
            }
            let target = match to_new_suffix {
                Some(suffix) => {
                    let name = format!("{}{suffix}", member.volume);
                    crate::storage::name::validate_volume_name(&name)?;
                    if self.registry.entry(&name).is_some() {
                        return Err(StorageError::AlreadyExists(name).into());
                    }
                    name
                }
                None => {
                    let entry = self
                        .registry
                        .entry(&member.volume)
                        .ok_or_else(|| StorageError::NotFound(member.volume.clone()))?;
                    let connections = entry.volume().attachments().count();
                    if connections > 0 && !force {
                        return Err(StorageError::Busy {
                            name: member.volume.clone(),
                            connections,
                        }
                        .into());
                    }
                    // The originals are the volumes the set was taken of, not others of the
                    // same names (another daemon's sharing the store, or volumes deleted and
                    // made again): those take the set only as new volumes, or member by member
                    // with a restore that names its target.
                    let uuid = &entry.volume().identity().uuid;
                    if *uuid != manifest.volume_uuid {
                        return Err(BackupError::InvalidArgument(format!(
                            "volume {:?} here is not the volume backup set {set_id:?} was taken of (uuid {uuid}, the set's member has {}): restore the set to new volumes (to_new_suffix), or its member {} with backup.restore",
                            member.volume, manifest.volume_uuid, member.backup_id
                        )));
                    }
                    // The take-back rolls every member back to what it held: one holding an
                    // incomplete restore holds nothing whole to go back to.
                    if let Some(mark) = entry.volume().restore_mark() {
                        return Err(BackupError::InvalidArgument(format!(
                            "volume {:?} holds an incomplete restore of backup {}: restore it alone (backup.restore) or roll it back to a snapshot first",
                            member.volume, mark.backup_id
                        )));
                    }
                    let size_bytes = entry.volume().size_bytes();
                    if size_bytes != manifest.size_bytes {
                        return Err(BackupError::SizeMismatch {
                            volume: member.volume.clone(),
                            size_bytes,
                            backup_id: member.backup_id.clone(),
                            backup_size_bytes: manifest.size_bytes,
                        });
                    }
                    member.volume.clone()
                }
            };
            if self.is_claimed(&target) {
                return Err(BackupError::JobRunning(target));
            }
        }
        if to_new_suffix.is_none() {
            // Every original is taken (claimed, closed, its clients gone) before any restore
            // starts: a client that does not leave refuses the whole set, not its last members.
            for (i, member) in set.members.iter().enumerate() {
                if let Err(e) = self
                    .take_for_restore(&member.backup_id, &member.volume, force)
                    .await
                {
                    for taken in &set.members[..i] {
                        self.release_for_restore(&taken.volume);
                    }
                    return Err(e);
                }
            }
        }
        // Held closed until the set has decided (see `set_restore`); each member expected
        // before its job starts, so that a job ending at once finds the decision to wait for.
        let in_place = to_new_suffix.is_none();
        let targets: Vec<(String, String)> = (set.members.iter())
            .map(|member| match to_new_suffix {
                Some(suffix) => (format!("{}{suffix}", member.volume), String::new()),
                None => {
                    let uuid = (self.registry.entry(&member.volume))
                        .map(|e| e.volume().identity().uuid.clone())
                        .unwrap_or_default();
                    (member.volume.clone(), uuid)
                }
            })
            .collect();
        let restore = SetRestore::new(set_id, in_place, targets.clone());
        let release_taken = || {
            if in_place {
                for member in &set.members {
                    self.release_for_restore(&member.volume);
                }
            }
        };
        if let Err(taken) = self.set_restore_holds.hold(&restore) {
            release_taken();
            return Err(BackupError::JobRunning(taken));
        }
        if in_place {
            // A snapshot of each member to go back to, then a mark naming the set on each.
            let members: Vec<(String, String)> = (set.members.iter())
                .map(|m| (m.volume.clone(), m.backup_id.clone()))
                .collect();
            if let Err((e, mark_stayed)) = self.prepare_set_restore_in_place(set_id, &members).await
            {
                if mark_stayed {
                    // Closed and held until the next start takes the set back: an open member
                    // would take writes that the take-back then rolls away.
                    for member in &set.members {
                        self.unclaim(&member.volume);
                    }
                    return Err(e);
                }
                for (target, _) in &targets {
                    self.set_restore_holds.release(target, &restore);
                }
                release_taken();
                return Err(e);
            }
        }
        let mut jobs: Vec<JobInfo> = Vec::new();
        let mut refused = None;
        for (member, (target, _)) in set.members.iter().zip(&targets) {
            if refused.is_none() {
                restore.expect(target);
                let started = match to_new_suffix {
                    Some(_) => {
                        (self.create_volume_in(target, &member.backup_id, Some(&restore))).await
                    }
                    None => self.start_taken_restore(&member.backup_id, target).await,
                };
                match started {
                    Ok(job) => {
                        if let (false, Some(entry)) = (in_place, self.registry.entry(target)) {
                            restore.set_uuid(target, &entry.volume().identity().uuid);
                        }
                        jobs.push(job);
                        continue;
                    }
                    Err(e) => refused = Some((member.volume.clone(), e)),
                }
            }
            // No job for this member: the set is taken back. In place, the member keeps the
            // set's mark (so the take-back rolls it back too) and stays held, given up by no
            // job; a volume made for it was removed by `create_volume`.
            restore.not_started(target);
            if in_place {
                self.unclaim(target);
            }
        }
        self.spawn_set_restore(restore);
        match refused {
            None => Ok(jobs),
            Some((_, e)) if jobs.is_empty() => Err(e),
            // Something changed since the checks: the members started are taken back once
            // their jobs end; say which, so the user knows.
            Some((volume, e)) => {
                let started: Vec<String> = jobs
                    .iter()
                    .map(|j| format!("{} ({})", j.id, j.volume))
                    .collect();
                Err(BackupError::Failed(format!(
                    "restoring member volume {volume:?} did not start ({e}); the restores already started are taken back once they end: {}",
                    started.join(", ")
                )))
            }
        }
    }

    fn note_server_outcome(&self, server: &str, ok: bool) {
        // Deleted meanwhile: its series went with it and stay gone.
        if !self.server_exists(server) {
            return;
        }
        let labels = crate::metrics::backup::ServerLabels {
            server: server.to_owned(),
        };
        let m = self.metrics.backup();
        let now = i64::try_from(now_unix_secs()).unwrap_or(i64::MAX);
        if ok {
            m.server_last_success_unix_seconds
                .get_or_create(&labels)
                .set(now);
        } else {
            m.server_last_failure_unix_seconds
                .get_or_create(&labels)
                .set(now);
        }
    }
}

/// The refusal of a delete of a set still being made.
fn being_made(set_id: &str) -> BackupError {
    BackupError::InvalidArgument(format!(
        "server backup {set_id} is still being made: cancel its jobs first"
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backup::store::{BackupStore, S3Options};
    use crate::backup::BackupConfig;
    use crate::io::{EngineConfig, EngineKind, IoEngine};
    use crate::metrics::Metrics;
    use tokio_util::sync::CancellationToken;

    fn backups_in(data_dir: &std::path::Path) -> (Arc<Registry>, Arc<Backups>) {
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        backups_with(data_dir, engine)
    }

    /// Volumes and backups in `data_dir` (the store in `data_dir/store`), on `engine`.
    pub(crate) fn backups_with(
        data_dir: &std::path::Path,
        engine: IoEngine,
    ) -> (Arc<Registry>, Arc<Backups>) {
        let registry = Arc::new(Registry::open(data_dir, engine).unwrap());
        let config = BackupConfig {
            store_url: BackupStore::default_url(&data_dir.join("store")).unwrap(),
            s3: S3Options::default(),
            upload_concurrency: 2,
            rate_limit_bytes_per_sec: None,
            zstd_level: 1,
        };
        let backups = Backups::open(
            data_dir,
            config,
            Arc::clone(&registry),
            Arc::new(Metrics::new()),
            CancellationToken::new(),
        )
        .unwrap();
        (registry, backups)
    }

    /// Volume "a" of `size_bytes`, filled with a non-zero pattern, and its full backup,
    /// waited for: the registry, the service and the backup's id.
    pub(crate) async fn volume_backed_up(
        data_dir: &std::path::Path,
        engine: IoEngine,
        size_bytes: u64,
    ) -> (Arc<Registry>, Arc<Backups>, String) {
        let (registry, backups) = backups_with(data_dir, engine);
        registry.create("a", size_bytes).unwrap();
        let volume = registry.get("a").unwrap();
        let data: Vec<u8> = (0..size_bytes).map(|i| (i * 7 % 251) as u8 + 1).collect();
        volume
            .write_bulk(0, bytes::Bytes::from(data))
            .await
            .unwrap();
        volume.flush().await.unwrap();
        let started = backups.create(&["a".into()], true, None).await.unwrap();
        let job = backups.job(&started[0].id).unwrap();
        job.wait_finished(std::time::Duration::from_secs(60)).await;
        assert_eq!(
            job.state(),
            crate::backup::job::JobState::Succeeded,
            "{:?}",
            job.info().error
        );
        (registry, backups, started[0].backup_id.clone())
    }

    /// Started sets are written as before the flag existed, so older daemons still read them;
    /// records without it are started sets.
    #[test]
    fn only_a_set_not_started_yet_says_so_in_its_record() {
        let started = set("s-1", 1);
        let json = serde_json::to_string(&JobRecord::Set(started.clone())).unwrap();
        assert!(!json.contains("members_recorded"), "{json}");
        let JobRecord::Set(back) = serde_json::from_str(&json).unwrap() else {
            panic!("not a set: {json}");
        };
        assert!(back.members_recorded);
        let mut starting = started;
        starting.members_recorded = false;
        let json = serde_json::to_string(&JobRecord::Set(starting)).unwrap();
        let JobRecord::Set(back) = serde_json::from_str(&json).unwrap() else {
            panic!("not a set: {json}");
        };
        assert!(!back.members_recorded, "{json}");
    }

    /// A crash after a server backup's group snapshot, with one member recorded of two: on
    /// restart the set, its member's record and both snapshots go, no job runs, and snapshots
    /// of other backups stay.
    #[tokio::test]
    async fn a_server_backup_cut_off_while_it_started_is_released_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (records, set) = {
            let (registry, backups) = backups_in(dir.path());
            for volume in ["a", "b"] {
                registry.create(volume, 1 << 20).unwrap();
            }
            let records: Vec<_> = ["a", "b"]
                .iter()
                .map(|v| {
                    let entry = registry.entry(v).unwrap();
                    new_record(&entry, v, true, Some("s-1".into()), None)
                })
                .collect();
            let set = SetRecord {
                set_id: "s-1".into(),
                server: "web1".into(),
                created_unix_secs: 1,
                barrier_hold_us: 0,
                policy: None,
                members: records
                    .iter()
                    .map(|r| (r.volume.clone(), r.backup_id.clone(), r.job_id.clone()))
                    .collect(),
                members_recorded: false,
            };
            backups.files.save(&JobRecord::Set(set.clone())).unwrap();
            let group: Vec<_> = records
                .iter()
                .map(|r| (r.volume.clone(), r.snapshot.clone()))
                .collect();
            registry.snapshot_group(&group).await.unwrap();
            let mut first = records[0].clone();
            first.snapshot_taken = true;
            backups.files.save(&JobRecord::Backup(first)).unwrap();
            // Another backup's snapshot, which must survive.
            registry
                .entry("b")
                .unwrap()
                .create_snapshot_durable("vbs-keep")
                .await
                .unwrap();
            (records, set)
        };
        let (registry, backups) = backups_in(dir.path());
        backups.resume().await;
        let names = |v: &str| -> Vec<String> {
            registry
                .entry(v)
                .unwrap()
                .snapshots()
                .into_iter()
                .map(|s| s.name)
                .collect()
        };
        let started = std::time::Instant::now();
        let left = |b: &Backups| -> Vec<String> {
            b.files
                .load_all()
                .iter()
                .map(|r| r.job_id().to_owned())
                .collect()
        };
        // The set's own record goes last, once its snapshots have.
        while names("a").contains(&records[0].snapshot)
            || names("b").contains(&records[1].snapshot)
            || !left(&backups).is_empty()
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "left: snapshots {:?} {:?}, records {:?}",
                names("a"),
                names("b"),
                left(&backups)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(names("b"), vec!["vbs-keep".to_string()]);
        for record in &records {
            assert!(
                backups.job(&record.job_id).is_err(),
                "a member job was resumed"
            );
        }
        assert!(!backups.running_sets.lock().contains_key(&set.set_id));
    }

    /// A record naming a volume (or a backup) twice is damaged, not a set to restore.
    #[tokio::test]
    async fn a_set_record_naming_a_member_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let (_registry, backups) = backups_with(dir.path(), engine);
        let id = "s-20261207T000000Z-0a1b2c3d";
        let member = |volume: &str, backup_id: &str| SetMember {
            volume: volume.into(),
            backup_id: backup_id.into(),
        };
        let mut record = BackupSet {
            format_version: SET_FORMAT_VERSION,
            set_id: id.into(),
            server: "web1".into(),
            group_id: id.into(),
            created_unix_secs: 1,
            barrier_hold_us: 0,
            policy: None,
            members: vec![
                member("a", "b-20261207T000000Z-00000001"),
                member("b", "b-20261207T000000Z-00000002"),
            ],
        };
        let put = |record: &BackupSet| serde_json::to_vec(record).unwrap();
        backups.store.put_set(id, put(&record)).await.unwrap();
        assert_eq!(backups.get_set(id).await.unwrap().members.len(), 2);
        for twice in [
            member("a", "b-20261207T000000Z-00000003"),
            member("c", "b-20261207T000000Z-00000001"),
        ] {
            record.members.push(twice);
            backups.store.put_set(id, put(&record)).await.unwrap();
            match backups.get_set(id).await {
                Err(BackupError::Failed(message)) => {
                    assert!(message.contains("twice"), "{message}")
                }
                other => panic!("a damaged record was taken: {other:?}"),
            }
            record.members.pop();
        }
    }

    fn set(id: &str, created_unix_secs: u64) -> SetRecord {
        SetRecord {
            set_id: id.into(),
            server: "web1".into(),
            created_unix_secs,
            barrier_hold_us: 0,
            policy: None,
            members: Vec::new(),
            members_recorded: true,
        }
    }

    #[test]
    fn the_oldest_ended_sets_beyond_the_cap_are_forgotten_running_ones_never() {
        let sets = RunningSets::default();
        sets.lock()
            .insert("s-running".into(), (set("s-running", 0), None));
        for i in 0..FINISHED_SETS_KEPT as u64 + 5 {
            let id = format!("s-{i:03}");
            sets.lock().insert(id.clone(), (set(&id, 10 + i), None));
            let outcome = if i % 2 == 0 {
                Ok(())
            } else {
                Err("failed".into())
            };
            sets.ended(&id, outcome);
        }
        let kept = sets.lock();
        assert_eq!(kept.len(), FINISHED_SETS_KEPT + 1);
        assert!(
            kept.contains_key("s-running"),
            "a running set was forgotten"
        );
        for gone in 0..5 {
            assert!(!kept.contains_key(&format!("s-{gone:03}")));
        }
        assert_eq!(
            kept["s-104"].1,
            Some(Ok(())),
            "the newest keeps its outcome"
        );
        drop(kept);
        // A set created long ago that ends now is kept; the oldest of the others goes.
        sets.lock()
            .insert("s-long".into(), (set("s-long", 1), None));
        sets.ended("s-long", Err("failed".into()));
        let kept = sets.lock();
        assert!(
            kept.contains_key("s-long"),
            "the set that just ended was forgotten"
        );
        assert!(!kept.contains_key("s-005"));
        assert_eq!(kept.len(), FINISHED_SETS_KEPT + 1);
    }
}
