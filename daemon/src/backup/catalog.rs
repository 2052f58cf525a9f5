//! What `backup list` / `backup show` report: one summary per manifest in the store, cached
//! (manifests never change once written) and brought in line with the store's listing at each
//! `list`, so a backup made by another daemon sharing the store shows up and a deleted one
//! goes. The search for an incremental's base asks `list_known`, which answers from memory.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::backup::error::BackupError;
use crate::backup::job::JobInfo;
use crate::backup::manifest::BackupManifest;
use crate::backup::store::BackupStore;

#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    pub id: String,
    /// "complete", or "running" for a backup whose job has not written its manifest yet.
    pub state: &'static str,
    pub volume: String,
    pub volume_uuid: String,
    pub size_bytes: u64,
    pub created_unix_secs: u64,
    pub snapshot: String,
    pub snapshot_created_unix_secs: u64,
    pub parent: Option<String>,
    pub incremental: bool,
    pub group_id: Option<String>,
    pub policy: Option<String>,
    pub chunks: u64,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    pub new_chunks: u64,
    pub new_stored_bytes: u64,
    /// New chunks stored as deltas of the parent backup's chunks.
    pub delta_chunks: u64,
    pub read_bytes: u64,
    pub duration_ms: u64,
    pub job: Option<JobInfo>,
}

impl BackupInfo {
    pub fn of(manifest: &BackupManifest) -> BackupInfo {
        BackupInfo {
            id: manifest.backup_id.clone(),
            state: "complete",
            volume: manifest.volume_name.clone(),
            volume_uuid: manifest.volume_uuid.clone(),
            size_bytes: manifest.size_bytes,
            created_unix_secs: manifest.created_unix_secs,
            snapshot: manifest.source_snapshot.clone(),
            snapshot_created_unix_secs: manifest.source_snapshot_created_unix_secs,
            parent: manifest.parent_backup_id.clone(),
            incremental: !manifest.stats.full,
            group_id: manifest.group_id.clone(),
            policy: manifest.policy.clone(),
            chunks: manifest.chunks.len() as u64,
            data_chunks: manifest.stats.data_chunks,
            zero_chunks: manifest.stats.zero_chunks,
            new_chunks: manifest.stats.new_chunks,
            new_stored_bytes: manifest.stats.new_stored_bytes,
            delta_chunks: manifest.stats.delta_chunks,
            read_bytes: manifest.stats.read_bytes,
            duration_ms: manifest.stats.duration_ms,
            job: None,
        }
    }
}

pub struct Catalog {
    store: Arc<BackupStore>,
    /// Each summary with the number of the listings begun before it was remembered.
    known: Mutex<BTreeMap<String, (u64, BackupInfo)>>,
    /// Whether a listing of the store has filled `known` since the start.
    listed: AtomicBool,
    /// Listings begun: one that began before a backup was remembered did not see it.
    listings: AtomicU64,
    /// The manifests the last listing found but could not read, with why.
    unreadable: Mutex<BTreeMap<String, String>>,
    /// Backups this daemon deleted, with the number of listings begun before: a listing (or
    /// a `get`) that read one's manifest before it went must not remember it afterwards. Ids
    /// are never used again, so any read of one is stale; kept until no listing begun before
    /// the delete can still be running (`FORGOTTEN_FOR_LISTINGS` later).
    forgotten: Mutex<BTreeMap<String, u64>>,
}

/// Listings after a delete for which its backup stays forgotten: far more than can overlap.
const FORGOTTEN_FOR_LISTINGS: u64 = 64;

impl Catalog {
    pub fn new(store: Arc<BackupStore>) -> Catalog {
        Catalog {
            store,
            known: Mutex::new(BTreeMap::new()),
            listed: AtomicBool::new(false),
            listings: AtomicU64::new(0),
            unreadable: Mutex::new(BTreeMap::new()),
            forgotten: Mutex::new(BTreeMap::new()),
        }
    }

    /// The manifests the last listing could not read (id, why), for `backup list` to show:
    /// left out of the list, they still hold chunks and stop every GC.
    pub fn unreadable(&self) -> Vec<(String, String)> {
        let unreadable = self.unreadable.lock().unwrap_or_else(|p| p.into_inner());
        unreadable
            .iter()
            .map(|(id, why)| (id.clone(), why.clone()))
            .collect()
    }

    fn known(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (u64, BackupInfo)>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forgotten(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.forgotten.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every complete backup in the store, oldest first. A manifest that cannot be read is
    /// logged, left out and kept in `unreadable`, never deleted.
    pub async fn list(&self) -> Result<Vec<BackupInfo>, BackupError> {
        let listing = self.begin_listing();
        let ids = self.store.list_manifest_ids().await?;
        let missing: Vec<String> = {
            let known = self.known();
            ids.iter()
                .filter(|id| !known.contains_key(*id))
                .cloned()
                .collect()
        };
        let mut unreadable = BTreeMap::new();
        for id in missing {
            match self.store.get_manifest(&id).await {
                Ok(manifest) => self.remember_listed(&manifest),
                Err(e) if e.is_transient() => return Err(e),
                // Deleted since the listing: gone, not unreadable.
                Err(BackupError::BackupNotFound(_)) => {}
                Err(e) => {
                    tracing::error!(backup = %id, error = %e, "unreadable backup manifest");
                    unreadable.insert(id, e.to_string());
                }
            }
        }
        {
            // Under the summaries' lock: a manifest read meanwhile is in them and left out
            // here, or is read after this and takes itself out of the new map.
            let known = self.known();
            unreadable.retain(|id, _| !known.contains_key(id));
            *self.unreadable.lock().unwrap_or_else(|p| p.into_inner()) = unreadable;
        }
        Ok(self.end_listing(listing, &ids))
    }

    /// Numbers a listing about to begin.
    fn begin_listing(&self) -> u64 {
        self.listings.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Brings the summaries in line with listing number `listing`, which found `ids` (sorted).
    fn end_listing(&self, listing: u64, ids: &[String]) -> Vec<BackupInfo> {
        let mut known = self.known();
        // A backup this daemon stored since this listing began stays: its manifest may have
        // landed after the listing looked.
        known.retain(|id, (seen, _)| *seen >= listing || ids.binary_search(id).is_ok());
        self.forgotten()
            .retain(|_, at| *at + FORGOTTEN_FOR_LISTINGS >= listing);
        self.listed.store(true, Ordering::Release);
        sorted(&known)
    }

    /// Every backup this daemon knows of, asking the store only until a listing has succeeded
    /// once. From then on it holds every backup this daemon made (each is remembered when its
    /// manifest is stored) and loses those it deleted; a backup another daemon sharing the
    /// store made or deleted since may be missing or still there. For the base of an
    /// incremental, which is always this daemon's own backup and is read from the store
    /// anyway: a listing per backup costs as much as the store holds manifests.
    pub async fn list_known(&self) -> Result<Vec<BackupInfo>, BackupError> {
        if !self.listed.load(Ordering::Acquire) {
            return self.list().await;
        }
        Ok(sorted(&self.known()))
    }

    /// A backup whose manifest this daemon has just stored: kept by a listing that began
    /// before (and may have looked before the manifest landed).
    pub fn remember_stored(&self, manifest: &BackupManifest) {
        let listings = self.listings.load(Ordering::Acquire);
        self.remember_as(manifest, listings);
    }

    /// A manifest read from the store: kept by the next listing only if it lists it (it may
    /// have been deleted since it was read).
    fn remember_listed(&self, manifest: &BackupManifest) {
        self.remember_as(manifest, 0);
    }

    fn remember_as(&self, manifest: &BackupManifest, listings: u64) {
        // Under the summaries' lock, which `forget` takes first too: a delete either finds
        // the summary to remove or is seen here.
        let mut known = self.known();
        if self.forgotten().contains_key(&manifest.backup_id) {
            return;
        }
        known.insert(
            manifest.backup_id.clone(),
            (listings, BackupInfo::of(manifest)),
        );
        drop(known);
        // Read since: no longer unreadable, whatever the last listing found.
        self.not_unreadable(&manifest.backup_id);
    }

    pub fn forget(&self, backup_id: &str) {
        let mut known = self.known();
        known.remove(backup_id);
        let listings = self.listings.load(Ordering::Acquire);
        self.forgotten().insert(backup_id.to_owned(), listings);
        drop(known);
        self.not_unreadable(backup_id);
    }

    fn not_unreadable(&self, backup_id: &str) {
        self.unreadable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(backup_id);
    }

    /// One backup's summary, from the cache or the store.
    pub async fn get(&self, backup_id: &str) -> Result<BackupInfo, BackupError> {
        if let Some((_, info)) = self.known().get(backup_id) {
            return Ok(info.clone());
        }
        let manifest = self.store.get_manifest(backup_id).await?;
        self.remember_listed(&manifest);
        Ok(BackupInfo::of(&manifest))
    }
}

/// The summaries oldest first.
fn sorted(known: &BTreeMap<String, (u64, BackupInfo)>) -> Vec<BackupInfo> {
    let mut out: Vec<BackupInfo> = known.values().map(|(_, info)| info.clone()).collect();
    out.sort_by(|a, b| (a.created_unix_secs, &a.id).cmp(&(b.created_unix_secs, &b.id)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::{manifest_key, sample_for_test};

    fn ids(infos: &[BackupInfo]) -> Vec<&str> {
        infos.iter().map(|i| i.id.as_str()).collect()
    }

    /// A local store in `dir`.
    fn store_in(dir: &std::path::Path) -> Arc<BackupStore> {
        let url = format!("file://{}", dir.display());
        Arc::new(BackupStore::open(&url, &Default::default()).unwrap())
    }

    /// Writes `bytes` as manifest `id` of the local store in `dir`.
    fn put_manifest(dir: &std::path::Path, id: &str, bytes: &[u8]) {
        let path = dir.join(manifest_key(id));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    #[tokio::test]
    async fn known_backups_come_from_memory_once_listed_and_survive_a_racing_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path());
        let file = |id: &str| put_manifest(dir.path(), id, &sample_for_test(id).to_json_bytes());
        let (a, b, c, d) = (
            "b-20261201T000000Z-0000000a",
            "b-20261201T000001Z-0000000b",
            "b-20261201T000002Z-0000000c",
            "b-20261201T000003Z-0000000d",
        );
        file(a);
        let catalog = Catalog::new(store);
        // Nothing listed yet: the store is asked.
        assert_eq!(ids(&catalog.list_known().await.unwrap()), [a]);
        // Another daemon's backup: not asked for again until a real listing.
        file(b);
        assert_eq!(ids(&catalog.list_known().await.unwrap()), [a]);
        assert_eq!(ids(&catalog.list().await.unwrap()), [a, b]);
        // Stored by this daemon while a listing runs (after the listing looked): the listing
        // keeps it; one only read from the store meanwhile is not kept unless listed.
        let listing = catalog.begin_listing();
        catalog.remember_stored(&sample_for_test(c));
        catalog.remember_listed(&sample_for_test(d));
        let listed = [a.to_owned(), b.to_owned()];
        assert_eq!(ids(&catalog.end_listing(listing, &listed)), [a, b, c]);
        // A later listing that does not find it drops it (deleted by another daemon).
        assert_eq!(ids(&catalog.list().await.unwrap()), [a, b]);
        catalog.forget(a);
        assert_eq!(ids(&catalog.list_known().await.unwrap()), [b]);
    }

    /// The manifests a listing could not read stay listed as unreadable only until one is read
    /// after all or forgotten (deleted), not until the next whole listing.
    #[tokio::test]
    async fn an_unreadable_manifest_read_later_or_deleted_is_no_longer_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = ("b-20261201T000000Z-0000000a", "b-20261201T000001Z-0000000b");
        put_manifest(dir.path(), a, b"{ not a manifest");
        put_manifest(dir.path(), b, b"{ not a manifest either");
        let catalog = Catalog::new(store_in(dir.path()));
        assert!(catalog.list().await.unwrap().is_empty());
        let unreadable =
            |c: &Catalog| -> Vec<String> { c.unreadable().into_iter().map(|(id, _)| id).collect() };
        assert_eq!(unreadable(&catalog), [a, b]);
        // Repaired, and read by id.
        put_manifest(dir.path(), a, &sample_for_test(a).to_json_bytes());
        assert_eq!(catalog.get(a).await.unwrap().id, a);
        assert_eq!(unreadable(&catalog), [b]);
        // Deleted.
        catalog.forget(b);
        assert!(unreadable(&catalog).is_empty());
    }

    /// A listing that read a manifest just before this daemon deleted its backup does not
    /// bring it back, though the listing found it.
    #[tokio::test]
    async fn a_backup_deleted_while_a_listing_reads_it_stays_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = ("b-20261201T000000Z-0000000a", "b-20261201T000001Z-0000000b");
        let catalog = Catalog::new(store_in(dir.path()));
        let listing = catalog.begin_listing();
        let listed = [a.to_owned(), b.to_owned()];
        // The listing found both and read a; then a is deleted; then the listing remembers it.
        catalog.forget(a);
        catalog.remember_listed(&sample_for_test(a));
        catalog.remember_listed(&sample_for_test(b));
        assert_eq!(ids(&catalog.end_listing(listing, &listed)), [b]);
        assert_eq!(ids(&catalog.list_known().await.unwrap()), [b]);
        // A `get` that read it before the delete does not either.
        catalog.remember_listed(&sample_for_test(a));
        assert_eq!(ids(&catalog.list_known().await.unwrap()), [b]);
        // The mark goes once no listing begun before the delete can be running.
        for _ in 0..=FORGOTTEN_FOR_LISTINGS {
            let listing = catalog.begin_listing();
            catalog.end_listing(listing, &listed);
        }
        assert!(catalog.forgotten().is_empty());
    }
}
