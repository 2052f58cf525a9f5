//! A server backup restored all or nothing (`server.restore`, see `sets::restore_set`).
//!
//! Each member volume is restored by a job of its own, and one can fail after the others have
//! written their volumes (a chunk missing from the store, a dead store, a cancel): a server
//! whose disks then hold different instants is worse than the server as it was. So the
//! members stay closed to clients until every member's job has done its part, and then:
//! - all restored: they open, with the set's data;
//! - one not: restored in place, every member rolls back to the snapshot taken of it before
//!   the restores began (`pre-restore-SET`), the restored ones included; restored to new
//!   volumes, every new volume is removed.
//!
//! The member jobs wait for that decision before they end, and a member restored then taken
//! back ends failed, saying why: when every job of a `server.restore` has ended, its volumes
//! are open or not as the jobs say.
//!
//! In place, what survives a crash is on the members themselves: the snapshots, and restore
//! marks naming the set (`RestoreMark::set_id`), put on every member before any job starts and
//! taken off by each member's completed restore. A member still marked was not restored; the
//! take-back rolls the restored members back first and the marked ones last, so a crash
//! midway leaves a mark to say the set is being taken back. At the next start
//! (`hold_interrupted_set_restores`) a set some member still carries a mark of is decided
//! again once its resumed jobs end; snapshots whose set no member is marked by are what a
//! decided set left (or one cut off before it marked anything), and are dropped. A restore to
//! new volumes stopped midway leaves each member's job to end on its own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

use crate::backup::{BackupError, Backups};
use crate::error::StorageError;
use crate::storage::attachments::Closure;
use crate::storage::restore_mark::RestoreMark;

/// Snapshot names starting so are the server restores' (reserved in `snapshot.create` and,
/// while their restore decides, in `snapshot.delete`).
pub const PRE_RESTORE_PREFIX: &str = "pre-restore-";

/// The snapshot a server restore takes of each member before writing it.
pub fn pre_restore_snapshot(set_id: &str) -> String {
    format!("{PRE_RESTORE_PREFIX}{set_id}")
}

/// What a server restore decided: Err says why its members were taken back.
type Verdict = Option<Result<(), String>>;

/// Why a server restore was not kept.
enum TakeBack {
    /// Its members went back to what they held (or the volumes made for it are gone).
    Done(String),
    /// A rollback failed midway: the members stay closed until the next start tries again.
    Stuck(String),
}

/// One server restore: its members, and the decision they wait for.
pub struct SetRestore {
    pub set_id: String,
    /// The volumes restored: the originals, or the new ones (with their uuids once made).
    targets: Mutex<Vec<(String, String)>>,
    in_place: bool,
    /// Members whose jobs have not done their part yet.
    pending: Mutex<HashSet<String>>,
    member_ended: Notify,
    verdict: watch::Sender<Verdict>,
}

impl SetRestore {
    /// A restore of set `set_id` into `targets` (volume names; uuids are learned as they are
    /// made, or are those of the originals).
    pub fn new(set_id: &str, in_place: bool, targets: Vec<(String, String)>) -> Arc<SetRestore> {
        Arc::new(SetRestore {
            set_id: set_id.to_owned(),
            targets: Mutex::new(targets),
            in_place,
            pending: Mutex::new(HashSet::new()),
            member_ended: Notify::new(),
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

    fn target_names(&self) -> Vec<String> {
        self.targets().into_iter().map(|(name, _)| name).collect()
    }

    /// `volume`'s restore is about to start (or was resumed): the decision waits for it.
    pub fn expect(&self, volume: &str) {
        self.pending().insert(volume.to_owned());
    }

    /// The uuid of `volume`, made for this restore once its job started.
    pub fn set_uuid(&self, volume: &str, uuid: &str) {
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(target) = targets.iter_mut().find(|(name, _)| name == volume) {
            target.1 = uuid.to_owned();
        }
    }

    /// `volume`'s restore did not start after all: the set is taken back (in place, its mark
    /// says so; to new volumes, it has none).
    pub fn not_started(&self, volume: &str) {
        self.pending().remove(volume);
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

    /// Holds every target of `restore`, or none when one is held by another restore already
    /// (Err names it).
    pub fn hold(&self, restore: &Arc<SetRestore>) -> Result<(), String> {
        let mut map = self.map();
        let names = restore.target_names();
        if let Some(taken) = names.iter().find(|name| map.contains_key(*name)) {
            return Err(taken.clone());
        }
        for name in names {
            map.insert(name, Arc::clone(restore));
        }
        Ok(())
    }

    /// Lets `volume` go if `restore` holds it.
    pub fn release(&self, volume: &str, restore: &Arc<SetRestore>) {
        let mut map = self.map();
        if map
            .get(volume)
            .is_some_and(|held| Arc::ptr_eq(held, restore))
        {
            map.remove(volume);
        }
    }
}

impl Backups {
    /// Whether a server restore holds `volume` until it decides.
    pub fn in_set_restore(&self, volume: &str) -> bool {
        self.set_restore_holds.holds(volume)
    }

    /// Before the in-place restores of a set's members (each taken: claimed, closed, whole): a
    /// durable snapshot of each to go back to, then a mark naming the set on each (see the
    /// module). On failure, the snapshots and marks made are taken off again.
    /// Err says whether a mark stayed on a member (`true`): its snapshot stays with it, and
    /// the caller keeps every member closed, the next start taking the set back.
    pub(crate) async fn prepare_set_restore_in_place(
        &self,
        set_id: &str,
        members: &[(String, String)],
    ) -> Result<(), (BackupError, bool)> {
        let name = pre_restore_snapshot(set_id);
        let volumes: Vec<String> = members.iter().map(|(v, _)| v.clone()).collect();
        let mut snapshotted: Vec<String> = Vec::new();
        let mut failed = None;
        for volume in &volumes {
            let snapshot = match self.registry.entry(volume) {
                None => Err(StorageError::NotFound(volume.clone())),
                Some(entry) => entry.create_snapshot_durable(&name).await.map(|_| ()),
            };
            if let Err(e) = snapshot {
                failed = Some(e);
                break;
            }
            snapshotted.push(volume.clone());
        }
        let mut marked: Vec<String> = Vec::new();
        if failed.is_none() {
            for (volume, backup_id) in members {
                let mark = RestoreMark {
                    backup_id: backup_id.clone(),
                    job_id: format!("(server restore {set_id})"),
                    started_unix_secs: crate::storage::entry::now_unix_secs(),
                    made_for_restore: false,
                    set_id: Some(set_id.to_owned()),
                };
                let marked_now = match self.registry.entry(volume) {
                    None => Err(StorageError::NotFound(volume.clone())),
                    Some(entry) => entry.mark_restore(mark).await,
                };
                if let Err(e) = marked_now {
                    failed = Some(e);
                    break;
                }
                marked.push(volume.clone());
            }
        }
        let Some(e) = failed else {
            return Ok(());
        };
        let mut mark_stayed = false;
        for volume in &marked {
            if let Some(entry) = self.registry.entry(volume) {
                if let Err(error) = entry.clear_restore_mark().await {
                    tracing::error!(volume = %volume, %error, "cannot take the mark of a server restore that did not start off its member: its members stay closed until the next start takes the set back");
                    mark_stayed = true;
                }
            }
        }
        // With a mark left, the next start takes the set back: every member needs its snapshot.
        if !mark_stayed {
            self.drop_pre_restore_snapshots(set_id, &snapshotted).await;
        }
        Err((e.into(), mark_stayed))
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
                    // Decided at the next start (in place: from the members' marks).
                    () = this.shutdown.cancelled() => return,
                    () = waiting => {}
                }
            }
            let verdict = match this.decide_set_restore(&restore).await {
                Ok(()) => Ok(()),
                Err(TakeBack::Done(why)) => Err(why),
                Err(TakeBack::Stuck(why)) => {
                    restore.verdict.send_replace(Some(Err(why)));
                    return;
                }
            };
            for name in restore.target_names() {
                this.set_restore_holds.release(&name, &restore);
                this.reopen(&name);
            }
            restore.verdict.send_replace(Some(verdict));
        });
    }

    /// Whether `volume` carries a mark of set `set_id`, or an unreadable one (which may be
    /// this set's): a member not restored (yet). A readable mark of a single-volume restore or
    /// of another set says nothing of this one.
    fn marked_by_set(&self, volume: &str, set_id: &str) -> bool {
        self.registry.entry(volume).is_some_and(|e| {
            e.volume()
                .restore_mark()
                .is_some_and(|mark| mark.set_id.as_deref() == Some(set_id) || mark.is_unreadable())
        })
    }

    async fn decide_set_restore(&self, restore: &SetRestore) -> Result<(), TakeBack> {
        let set_id = &restore.set_id;
        let targets = restore.targets();
        let not_restored: Vec<&str> = (targets.iter())
            .filter(|(name, uuid)| {
                if restore.in_place {
                    return self.marked_by_set(name, set_id);
                }
                // Made for this restore (its uuid learned when its job started), and restored.
                self.registry.entry(name).is_none_or(|e| {
                    e.volume().identity().uuid != *uuid || e.volume().restore_mark().is_some()
                })
            })
            .map(|(name, _)| name.as_str())
            .collect();
        let names: Vec<String> = targets.iter().map(|(name, _)| name.clone()).collect();
        if not_restored.is_empty() {
            tracing::info!(set = %set_id, members = targets.len(), "server backup restored: every member holds it");
            if restore.in_place {
                self.drop_pre_restore_snapshots(set_id, &names).await;
            }
            return Ok(());
        }
        let why = format!("member(s) {} not restored", not_restored.join(", "));
        if !restore.in_place {
            tracing::warn!(set = %set_id, %why, "the volumes made for the members of a server restore are removed");
            for (name, uuid) in &targets {
                if !uuid.is_empty() {
                    self.discard_volume(name, Some(uuid)).await;
                }
            }
            return Err(TakeBack::Done(format!(
                "server restore of set {set_id} taken back ({why}): the volumes made for it were removed"
            )));
        }
        tracing::warn!(set = %set_id, %why, "every member of a server restore goes back to what it held before");
        // The restored ones first: while any member is still marked, a crash leaves the set to
        // be taken back at the next start.
        let (marked, restored): (Vec<String>, Vec<String>) = names
            .iter()
            .cloned()
            .partition(|name| self.marked_by_set(name, set_id));
        let snapshot = pre_restore_snapshot(set_id);
        for name in restored.iter().chain(&marked) {
            let Some(entry) = self.registry.entry(name) else {
                continue;
            };
            if let Err(error) = entry.rollback_closed(&snapshot).await {
                // Stopped here, snapshots and marks left as they are: a member still marked
                // has the next start take the set back again. Until then every member stays
                // closed (a restored one not rolled back yet would serve the set's data).
                tracing::error!(set = %set_id, volume = %name, %error, "rolling a member of a failed server restore back failed: its members stay closed until the next start tries again");
                return Err(TakeBack::Stuck(format!(
                    "server restore of set {set_id} could not be taken back ({why}; rolling {name} back failed: {error}): its members stay closed, and the next start of the daemon tries again"
                )));
            }
        }
        self.drop_pre_restore_snapshots(set_id, &names).await;
        Err(TakeBack::Done(format!(
            "server restore of set {set_id} taken back ({why}): every member went back to what it held before"
        )))
    }

    pub(crate) async fn drop_pre_restore_snapshots(&self, set_id: &str, volumes: &[String]) {
        let snapshot = pre_restore_snapshot(set_id);
        for name in volumes {
            let Some(entry) = self.registry.entry(name) else {
                continue;
            };
            if !entry.snapshots().iter().any(|s| s.name == snapshot) {
                continue;
            }
            if let Err(error) = entry.delete_snapshot(&snapshot).await {
                tracing::warn!(volume = %name, %snapshot, %error, "cannot delete a server restore's snapshot; it is dropped at the next start, or delete it by hand");
            }
        }
    }

    /// At start, before the jobs resume: the in-place server restores a stop interrupted,
    /// found by their snapshots and marks (see the module). Their members are held closed;
    /// `resume` says which of them have a job to wait for (`SetRestore::expect`), then
    /// `spawn_set_restore` decides. Snapshots of sets no member carries a mark of are dropped.
    pub(crate) fn hold_interrupted_set_restores(self: &Arc<Self>) -> Vec<Arc<SetRestore>> {
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
            if !members.iter().any(|m| self.marked_by_set(m, &set_id)) {
                tracing::info!(set = %set_id, ?members, "dropping the snapshots of a server restore that was decided (or never began)");
                // In the background: a drop merges layers, which must not hold the start up.
                let this = Arc::clone(self);
                tokio::spawn(
                    async move { this.drop_pre_restore_snapshots(&set_id, &members).await },
                );
                continue;
            }
            tracing::info!(set = %set_id, ?members, "an interrupted server restore is decided once its members' jobs end");
            let targets = members.iter().map(|m| (m.clone(), String::new())).collect();
            let restore = SetRestore::new(&set_id, true, targets);
            if let Err(taken) = self.set_restore_holds.hold(&restore) {
                tracing::error!(set = %set_id, volume = %taken, "a member of an interrupted server restore is in another one: left as it is");
                continue;
            }
            for name in &members {
                if let Some(entry) = self.registry.entry(name) {
                    // A member whose job ended before the stop waits for the decision closed.
                    let _ = entry.volume().attachments().close(true, Closure::Restore);
                }
            }
            restores.push(restore);
        }
        restores
    }
}
