//! A server backup restored all or nothing (`server.restore`, see `sets::restore_set`).
//!
//! Each member volume is restored by a job of its own, and one can fail after the others have
//! written their volumes (a chunk missing from the store, a dead store, a cancel): a server
//! whose disks then hold different instants is worse than the server as it was. So the
//! members stay closed to clients until every member's restore has ended, and then:
//! - all restored: they open, with the set's data;
//! - one not: restored in place, every member rolls back to the snapshot taken of it before
//!   the restores began (`pre-restore-SET`), the restored ones included; restored to new
//!   volumes, every new volume is removed.
//!
//! The member jobs wait for that decision before they end, and a member restored then taken
//! back ends failed, saying why: when every job of a `server.restore` has ended, its volumes
//! are open or not as the jobs say.
//!
//! The snapshots are the durable part: a daemon stopped meanwhile finds them at its next start
//! (`hold_interrupted_set_restores`) and decides once the resumed member jobs have ended. A
//! restore to new volumes stopped meanwhile leaves each member's job to end on its own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

use crate::backup::{BackupError, Backups};
use crate::error::StorageError;
use crate::storage::attachments::Closure;

/// Snapshot names starting so are the server restores' (reserved in `snapshot.create`).
pub const PRE_RESTORE_PREFIX: &str = "pre-restore-";

/// The snapshot a server restore takes of each member before writing it.
pub fn pre_restore_snapshot(set_id: &str) -> String {
    format!("{PRE_RESTORE_PREFIX}{set_id}")
}

/// What a server restore decided: Err says why its members were taken back.
type Verdict = Option<Result<(), String>>;

/// One server restore: its members, and the decision they wait for.
pub struct SetRestore {
    pub set_id: String,
    /// The volumes restored: the originals, or the new ones (with their uuids).
    targets: Mutex<Vec<(String, String)>>,
    in_place: bool,
    /// In place: the members that have a snapshot to go back to (one that already held an
    /// incomplete restore has nothing whole to go back to).
    snapshotted: Vec<String>,
    /// Members whose jobs have not reached their end yet.
    pending: Mutex<HashSet<String>>,
    member_ended: Notify,
    /// Some member's restore did not even start: the set failed whatever the others do.
    failed_to_start: std::sync::atomic::AtomicBool,
    verdict: watch::Sender<Verdict>,
}

impl SetRestore {
    pub fn new(set_id: &str, in_place: bool, snapshotted: Vec<String>) -> Arc<SetRestore> {
        Arc::new(SetRestore {
            set_id: set_id.to_owned(),
            targets: Mutex::new(Vec::new()),
            in_place,
            snapshotted,
            pending: Mutex::new(HashSet::new()),
            member_ended: Notify::new(),
            failed_to_start: std::sync::atomic::AtomicBool::new(false),
            verdict: watch::channel(None).0,
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn targets(&self) -> Vec<(String, String)> {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `volume`'s restore is about to start (or was resumed): the decision waits for it.
    pub fn expect(&self, volume: &str, uuid: &str) {
        self.pending().insert(volume.to_owned());
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        if !targets.iter().any(|(name, _)| name == volume) {
            targets.push((volume.to_owned(), uuid.to_owned()));
        }
    }

    /// The uuid of `volume`, made for this restore once its job started.
    pub fn set_uuid(&self, volume: &str, uuid: &str) {
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(target) = targets.iter_mut().find(|(name, _)| name == volume) {
            target.1 = uuid.to_owned();
        }
    }

    /// `volume`'s restore did not start after all.
    pub fn not_started(&self, volume: &str) {
        self.failed_to_start
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.pending().remove(volume);
        (self.targets.lock().unwrap_or_else(|p| p.into_inner())).retain(|(name, _)| name != volume);
        self.member_ended.notify_one();
    }

    /// A member's job has done its part (restored, or failed and cleaned up); Some(Err) when the
    /// set took its members back. None: the daemon is stopping before a decision.
    pub async fn member_done(
        &self,
        volume: &str,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Verdict {
        self.pending().remove(volume);
        self.member_ended.notify_one();
        let mut verdict = self.verdict.subscribe();
        tokio::select! {
            decided = verdict.wait_for(Option::is_some) => decided.ok().and_then(|v| v.clone()),
            () = shutdown.cancelled() => None,
        }
    }
}

/// Volumes kept closed until their server restore has decided, with that restore.
#[derive(Default)]
pub struct SetRestoreHolds(Mutex<HashMap<String, Arc<SetRestore>>>);

impl SetRestoreHolds {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<SetRestore>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn holds(&self, volume: &str) -> bool {
        self.map().contains_key(volume)
    }

    pub fn restore_of(&self, volume: &str) -> Option<Arc<SetRestore>> {
        self.map().get(volume).cloned()
    }

    pub fn hold(&self, volumes: &[String], restore: &Arc<SetRestore>) {
        let mut map = self.map();
        for volume in volumes {
            map.insert(volume.clone(), Arc::clone(restore));
        }
    }

    pub fn release(&self, volume: &str) {
        self.map().remove(volume);
    }
}

impl Backups {
    /// Before the in-place restores of a set's members (each taken: claimed, closed): a durable
    /// snapshot of each whole member to go back to. On failure, none is left.
    pub(crate) async fn snapshot_before_set_restore(
        &self,
        set_id: &str,
        volumes: &[String],
    ) -> Result<Vec<String>, BackupError> {
        let name = pre_restore_snapshot(set_id);
        let mut taken: Vec<String> = Vec::new();
        for volume in volumes {
            let entry = self.registry.entry(volume);
            let snapshot = match &entry {
                None => Err(StorageError::NotFound(volume.clone())),
                Some(entry) if entry.volume().restore_mark().is_some() => continue,
                Some(entry) => entry.create_snapshot_durable(&name).await.map(|_| ()),
            };
            if let Err(e) = snapshot {
                self.drop_pre_restore_snapshots(set_id, &taken).await;
                return Err(e.into());
            }
            taken.push(volume.clone());
        }
        Ok(taken)
    }

    /// Decides `restore` once its members' jobs have done their part (see the module).
    pub(crate) fn spawn_set_restore(self: &Arc<Self>, restore: Arc<SetRestore>) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let waiting = restore.member_ended.notified();
                if restore.pending().is_empty() {
                    break;
                }
                tokio::select! {
                    // Decided at the next start (in place: from the snapshots).
                    () = this.shutdown.cancelled() => return,
                    () = waiting => {}
                }
            }
            let verdict = this.decide_set_restore(&restore).await;
            for (name, _) in restore.targets() {
                this.set_restore_holds.release(&name);
                this.reopen(&name);
            }
            restore.verdict.send_replace(Some(verdict));
        });
    }

    async fn decide_set_restore(&self, restore: &SetRestore) -> Result<(), String> {
        let set_id = &restore.set_id;
        let targets = restore.targets();
        let incomplete: Vec<&str> = (targets.iter())
            .filter(|(name, _)| {
                self.registry
                    .entry(name)
                    .is_none_or(|e| e.volume().restore_mark().is_some())
            })
            .map(|(name, _)| name.as_str())
            .collect();
        let failed_to_start = restore
            .failed_to_start
            .load(std::sync::atomic::Ordering::SeqCst);
        if incomplete.is_empty() && !failed_to_start {
            tracing::info!(set = %set_id, members = targets.len(), "server backup restored: every member holds it");
            self.drop_pre_restore_snapshots(set_id, &restore.snapshotted)
                .await;
            return Ok(());
        }
        let why = if failed_to_start && incomplete.is_empty() {
            "the restore of a member did not start".to_owned()
        } else {
            format!("member(s) {} not restored", incomplete.join(", "))
        };
        if restore.in_place {
            tracing::warn!(set = %set_id, %why, "every member of a server restore goes back to what it held before");
            let snapshot = pre_restore_snapshot(set_id);
            // Members whose restore never started were released, their snapshots dropped.
            let snapshotted: Vec<String> = (restore.snapshotted.iter())
                .filter(|name| targets.iter().any(|(target, _)| target == *name))
                .cloned()
                .collect();
            for name in &snapshotted {
                let Some(entry) = self.registry.entry(name) else {
                    continue;
                };
                if let Err(error) = entry.rollback_closed(&snapshot).await {
                    tracing::error!(set = %set_id, volume = %name, %error, "rolling a member of a failed server restore back failed: it keeps what the restore left");
                }
            }
            self.drop_pre_restore_snapshots(set_id, &snapshotted).await;
            Err(format!(
                "server restore of set {set_id} taken back ({why}): every member went back to what it held before"
            ))
        } else {
            tracing::warn!(set = %set_id, %why, "the volumes made for the members of a server restore are removed");
            for (name, uuid) in &targets {
                self.discard_volume(name, Some(uuid)).await;
            }
            Err(format!(
                "server restore of set {set_id} taken back ({why}): the volumes made for it were removed"
            ))
        }
    }

    pub(crate) async fn drop_pre_restore_snapshots(&self, set_id: &str, volumes: &[String]) {
        let snapshot = pre_restore_snapshot(set_id);
        for name in volumes {
            let Some(entry) = self.registry.entry(name) else {
                continue;
            };
            if let Err(error) = entry.delete_snapshot(&snapshot).await {
                tracing::warn!(volume = %name, %snapshot, %error, "cannot delete a server restore's snapshot; delete it by hand");
            }
        }
    }

    /// At start, before the jobs resume: the in-place server restores a stop interrupted,
    /// found by their snapshots. Their members are held closed; `resume` says which of them
    /// have a job to wait for (`SetRestore::expect`), then `spawn_set_restore` decides.
    pub(crate) fn hold_interrupted_set_restores(&self) -> Vec<Arc<SetRestore>> {
        let mut sets: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for entry in self.registry.entries() {
            for snapshot in entry.snapshots() {
                if let Some(set_id) = snapshot.name.strip_prefix(PRE_RESTORE_PREFIX) {
                    let members = sets.entry(set_id.to_owned()).or_default();
                    members.push(entry.name().to_owned());
                }
            }
        }
        let mut restores = Vec::new();
        for (set_id, members) in sets {
            tracing::info!(set = %set_id, ?members, "an interrupted server restore is decided once its members' jobs end");
            let restore = SetRestore::new(&set_id, true, members.clone());
            {
                let mut targets = restore.targets.lock().unwrap_or_else(|p| p.into_inner());
                targets.extend(members.iter().map(|m| (m.clone(), String::new())));
            }
            for name in &members {
                if let Some(entry) = self.registry.entry(name) {
                    // A member whose job ended before the stop waits for the decision closed.
                    let _ = entry.volume().attachments().close(true, Closure::Restore);
                }
            }
            self.set_restore_holds.hold(&members, &restore);
            restores.push(restore);
        }
        restores
    }
}
