//! Store-wide locks that keep garbage collection from deleting chunks a running backup is about
//! to reference, across every daemon sharing the store. Each side writes its lock first and
//! then lists the others, so of two racing parties at least one sees the other (restic's
//! scheme). Backups hold shared locks; GC holds the exclusive one and gives way to backups.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backup::error::BackupError;
use crate::backup::store::BackupStore;
use crate::storage::entry::now_unix_secs;

/// A lock whose heartbeat is older than this belongs to a daemon that died: ignored.
pub const LOCK_STALE_SECS: i64 = 300;
/// How often a held lock is rewritten.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);
/// How long releasing a lock waits for a refresh under way to land before it deletes the lock.
const HEARTBEAT_STOP_WAIT: Duration = Duration::from_secs(10);
/// How long a backup waits between looks while a GC holds the exclusive lock.
const EXCLUSIVE_POLL: Duration = Duration::from_millis(500);
/// A holder whose lock went this long without a successful refresh must assume another daemon
/// took it for stale (the store's clock and ours may differ by a heartbeat or so).
const LAPSE_MS: u64 = (LOCK_STALE_SECS as u64 - 2 * HEARTBEAT_INTERVAL.as_secs()) * 1000;

/// Whether a held lock has stayed fresh in the store since it was taken, as its holder can
/// tell: the heartbeat records each successful refresh. Times are CLOCK_BOOTTIME, which keeps
/// counting while the machine is suspended or the VM paused.
/// A refresh's time is taken before its write is sent: the store stamps the object no later
/// than that, so the holder never thinks its lock fresher than others see it.
#[derive(Debug)]
pub struct LockHealth {
    last_refresh_ms: AtomicU64,
    /// Lapses seen so far: gaps between refreshes that were too long.
    lapses: AtomicU64,
}

impl LockHealth {
    fn at(sent_ms: u64) -> LockHealth {
        LockHealth {
            last_refresh_ms: AtomicU64::new(sent_ms),
            lapses: AtomicU64::new(0),
        }
    }

    /// Records a successful write of the lock sent at `sent_ms`.
    fn refreshed_at(&self, sent_ms: u64) {
        let previous = self.last_refresh_ms.fetch_max(sent_ms, Ordering::SeqCst);
        if sent_ms.saturating_sub(previous) > LAPSE_MS {
            self.lapses.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn lapses_at(&self, now_ms: u64) -> u64 {
        let ongoing = now_ms.saturating_sub(self.last_refresh_ms.load(Ordering::SeqCst)) > LAPSE_MS;
        self.lapses.load(Ordering::SeqCst) + u64::from(ongoing)
    }

    /// How many times another daemon may have taken the lock for stale since it was taken
    /// (its refreshes failed, or this process stood still, for too long), the gap going on now
    /// included. When this grows, what the holder learnt of the store may be out of date.
    pub fn lapses(&self) -> u64 {
        self.lapses_at(boottime_ms())
    }
}

/// Milliseconds of CLOCK_BOOTTIME.
fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration, and
    // CLOCK_BOOTTIME is a clock id every supported Linux kernel has.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[derive(Serialize)]
struct LockBody<'a> {
    kind: &'a str,
    owner: &'a str,
    heartbeat_unix_secs: u64,
}

/// A held lock: its heartbeat runs until [`HeldLock::release`] (or drop, which releases in the
/// background).
pub struct HeldLock {
    store: Arc<BackupStore>,
    name: String,
    heartbeat: Option<JoinHandle<()>>,
    /// Stops the heartbeat between refreshes (see `release`).
    stop_heartbeat: CancellationToken,
    health: Arc<LockHealth>,
}

impl HeldLock {
    /// The lock `name`, written at `sent_ms`, held from now on.
    fn start(
        store: &Arc<BackupStore>,
        name: String,
        kind: &'static str,
        owner: &str,
        sent_ms: u64,
    ) -> HeldLock {
        let health = Arc::new(LockHealth::at(sent_ms));
        let stop_heartbeat = CancellationToken::new();
        HeldLock {
            store: Arc::clone(store),
            name,
            heartbeat: Some(start_heartbeat(
                store,
                kind,
                owner,
                Arc::clone(&health),
                stop_heartbeat.clone(),
            )),
            stop_heartbeat,
            health,
        }
    }

    /// How the lock has kept up since it was taken.
    pub fn health(&self) -> Arc<LockHealth> {
        Arc::clone(&self.health)
    }

    /// Leaves the lock in the store, refreshed for as long as this process runs, and then to go
    /// stale after [`LOCK_STALE_SECS`]: for a holder whose work may still land after it has
    /// stopped waiting for it.
    pub fn abandon(mut self) {
        // Dropping the handle detaches the heartbeat; Drop then has nothing to delete.
        drop(self.heartbeat.take());
    }

    pub async fn release(mut self) {
        if let Some(mut h) = self.heartbeat.take() {
            // Stopped between refreshes, not during one: an aborted refresh may still land
            // after the delete (a local store's write runs on a blocking thread that an abort
            // does not stop) and leave a fresh lock that defers every GC until it goes stale.
            // A refresh the store holds up past the bound is aborted after all.
            self.stop_heartbeat.cancel();
            if tokio::time::timeout(HEARTBEAT_STOP_WAIT, &mut h)
                .await
                .is_err()
            {
                h.abort();
                let _ = h.await;
            }
        }
        if let Err(e) = self.store.delete_lock(&self.name).await {
            tracing::warn!(lock = %self.name, error = %e, "releasing a backup store lock failed; it expires by itself");
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
            let store = Arc::clone(&self.store);
            let name = self.name.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = store.delete_lock(&name).await;
                });
            }
        }
    }
}

/// A lock just written and not yet held: deleted in the background if the caller's future is
/// dropped before it becomes a [`HeldLock`] (a job cancelled while it looks for conflicting
/// locks), which would otherwise put every GC off until the lock went stale. Error paths
/// delete it themselves, awaited, so a retry's write of the same name cannot be overtaken by
/// this delete.
struct Written<'a> {
    store: &'a Arc<BackupStore>,
    name: Option<String>,
}

impl<'a> Written<'a> {
    fn new(store: &'a Arc<BackupStore>, name: String) -> Written<'a> {
        Written {
            store,
            name: Some(name),
        }
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    /// The lock's name, now the caller's to hold or delete.
    fn keep(mut self) -> String {
        self.name.take().unwrap_or_default()
    }
}

impl Drop for Written<'_> {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            let store = Arc::clone(self.store);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = store.delete_lock(&name).await;
                });
            }
        }
    }
}

fn body(kind: &str, owner: &str) -> Vec<u8> {
    serde_json::to_vec(&LockBody {
        kind,
        owner,
        heartbeat_unix_secs: now_unix_secs(),
    })
    .unwrap_or_default()
}

async fn put(store: &BackupStore, kind: &str, owner: &str) -> Result<String, BackupError> {
    let name = format!("{kind}-{owner}.json");
    store.put_lock(&name, body(kind, owner)).await?;
    Ok(name)
}

fn start_heartbeat(
    store: &Arc<BackupStore>,
    kind: &'static str,
    owner: &str,
    health: Arc<LockHealth>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let store = Arc::clone(store);
    let owner = owner.to_owned();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
                _ = stop.cancelled() => return,
            }
            let sent_ms = boottime_ms();
            match put(&store, kind, &owner).await {
                Ok(_) => {
                    let lapses = health.lapses();
                    health.refreshed_at(sent_ms);
                    if health.lapses() > lapses {
                        tracing::warn!(owner, "this backup store lock went too long without a refresh: another daemon may have taken it for stale");
                    }
                }
                Err(e) => {
                    tracing::warn!(owner, error = %e, "refreshing a backup store lock failed")
                }
            }
        }
    })
}

/// Refreshes the shared lock `owner` holds and waits until no garbage collection holds the
/// store: after a lapse (see [`LockHealth`]) a listing taken once this returns is the truth
/// again, since any GC that starts later sees the lock.
pub async fn reassert_shared(
    store: &Arc<BackupStore>,
    owner: &str,
    health: &LockHealth,
) -> Result<(), BackupError> {
    loop {
        let sent_ms = boottime_ms();
        let name = put(store, "shared", owner).await?;
        health.refreshed_at(sent_ms);
        if others(store, "exclusive", &name).await? == 0 {
            return Ok(());
        }
        tracing::info!(owner, "waiting for the backup store's garbage collection");
        tokio::time::sleep(EXCLUSIVE_POLL).await;
    }
}

/// The fresh locks of `kind` other than `own`, judged by the store's own clock: the time the
/// store gave `own`, just written, stands for "now", so a skewed local clock does not matter
/// (nor does an object with a time in the future; the newest time listed stands in if `own`
/// is not listed).
async fn others(store: &BackupStore, kind: &str, own: &str) -> Result<usize, BackupError> {
    let locks = store.list_locks().await?;
    let now = locks
        .iter()
        .find(|l| l.key == own)
        .or_else(|| locks.iter().max_by_key(|l| l.modified_unix_secs))
        .map_or(0, |l| l.modified_unix_secs);
    Ok(locks
        .iter()
        .filter(|l| l.key != own && l.key.starts_with(&format!("{kind}-")))
        .filter(|l| now - l.modified_unix_secs <= LOCK_STALE_SECS)
        .count())
}

/// Removes the shared lock an earlier run of backup job `owner` left (see
/// [`HeldLock::abandon`]) once the job has found its work done.
pub async fn remove_left_shared(store: &BackupStore, owner: &str) {
    let name = format!("shared-{owner}.json");
    if let Err(e) = store.delete_lock(&name).await {
        tracing::warn!(lock = %name, error = %e, "removing a lock an earlier run left failed; it expires by itself");
    }
}

/// Takes a shared lock for a backup, waiting while a GC holds the exclusive one.
pub async fn acquire_shared(
    store: &Arc<BackupStore>,
    owner: &str,
) -> Result<HeldLock, BackupError> {
    loop {
        let sent_ms = boottime_ms();
        let written = Written::new(store, put(store, "shared", owner).await?);
        let conflicts = others(store, "exclusive", written.name()).await;
        if matches!(conflicts, Ok(0)) {
            let name = written.keep();
            return Ok(HeldLock::start(store, name, "shared", owner, sent_ms));
        }
        // Deleted while the guard still has it: a caller giving up during the delete (a job
        // cancelled while it waits for a GC) leaves it to the guard, not to staleness.
        let deleted = store.delete_lock(written.name()).await;
        let _ = written.keep();
        // Refused for good, the listing is no refusal of the lock's write (which went through):
        // a reader must not take it for one and read without a lock (`lock_for_reading`).
        conflicts.map_err(|e| {
            if e.is_refused_access() {
                BackupError::Failed(format!(
                    "the backup store let us write a lock but refuses to list them: {e}"
                ))
            } else {
                e
            }
        })?;
        deleted?;
        tracing::info!(owner, "waiting for the backup store's garbage collection");
        tokio::time::sleep(EXCLUSIVE_POLL).await;
    }
}

/// Takes the exclusive lock for a GC, or None (and no lock held) when a backup or another GC
/// holds a lock: the GC must run later.
pub async fn try_exclusive(
    store: &Arc<BackupStore>,
    owner: &str,
) -> Result<Result<HeldLock, String>, BackupError> {
    let sent_ms = boottime_ms();
    let written = Written::new(store, put(store, "exclusive", owner).await?);
    let counts = async {
        let shared = others(store, "shared", written.name()).await?;
        let exclusive = others(store, "exclusive", written.name()).await?;
        Ok::<_, BackupError>((shared, exclusive))
    }
    .await;
    let name = written.keep();
    let (shared, exclusive) = match counts {
        Ok(counts) => counts,
        Err(e) => {
            let _ = store.delete_lock(&name).await;
            return Err(e);
        }
    };
    if shared + exclusive > 0 {
        store.delete_lock(&name).await?;
        return Ok(Err(format!(
            "{shared} backup, restore or verify job(s) and {exclusive} other garbage collection(s) hold the store"
        )));
    }
    Ok(Ok(HeldLock::start(
        store,
        name,
        "exclusive",
        owner,
        sent_ms,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_lapses_when_a_refresh_comes_too_late_or_none_comes() {
        let health = LockHealth::at(1_000);
        let beat = HEARTBEAT_INTERVAL.as_millis() as u64;
        health.refreshed_at(1_000 + beat);
        health.refreshed_at(1_000 + 2 * beat);
        assert_eq!(health.lapses_at(1_000 + 2 * beat + LAPSE_MS), 0);
        // No refresh for too long: a lapse going on now...
        assert_eq!(health.lapses_at(1_000 + 2 * beat + LAPSE_MS + 1), 1);
        // ...counted for good once a refresh comes after such a gap.
        let late = 1_000 + 2 * beat + LAPSE_MS + 1;
        health.refreshed_at(late);
        assert_eq!(health.lapses_at(late), 1);
        assert_eq!(health.lapses_at(late + beat), 1);
        // A refresh that answers late does not move the lock's time back.
        health.refreshed_at(late - beat);
        assert_eq!(health.lapses_at(late + LAPSE_MS), 1);
        // A second long gap is a second lapse.
        health.refreshed_at(late + LAPSE_MS + beat);
        assert_eq!(health.lapses_at(late + LAPSE_MS + beat), 2);
        // Lapsing takes well under the staleness others judge by.
        assert!(LAPSE_MS < LOCK_STALE_SECS as u64 * 1000 - beat);
    }

    fn local_store() -> (tempfile::TempDir, Arc<BackupStore>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let store = BackupStore::open(&url, &Default::default()).unwrap();
        (dir, Arc::new(store))
    }

    async fn lock_names(store: &BackupStore) -> Vec<String> {
        let mut names: Vec<String> = store
            .list_locks()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.key)
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_written_lock_nobody_kept_is_deleted() {
        let (_dir, store) = local_store();
        let dropped = Written::new(&store, put(&store, "shared", "j-1").await.unwrap());
        let kept = Written::new(&store, put(&store, "shared", "j-2").await.unwrap());
        assert_eq!(kept.keep(), "shared-j-2.json");
        drop(dropped);
        let gone = async {
            while lock_names(&store).await.len() > 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .expect("the dropped lock stayed");
        assert_eq!(lock_names(&store).await, ["shared-j-2.json"]);
    }

    #[tokio::test]
    async fn an_object_dated_in_the_future_does_not_make_live_locks_stale() {
        let (dir, store) = local_store();
        put(&store, "exclusive", "gc-1").await.unwrap();
        let future = std::time::SystemTime::now() + Duration::from_secs(3600);
        let junk = dir.path().join("locks").join("zzz-junk");
        std::fs::write(&junk, b"x").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&junk)
            .unwrap()
            .set_modified(future)
            .unwrap();
        let own = put(&store, "shared", "j-1").await.unwrap();
        assert_eq!(others(&store, "exclusive", &own).await.unwrap(), 1);
        // A GC's lock last written long ago is stale all the same.
        let old = std::time::SystemTime::now() - Duration::from_secs(LOCK_STALE_SECS as u64 + 60);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("locks").join("exclusive-gc-1.json"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(others(&store, "exclusive", &own).await.unwrap(), 0);
    }

    #[test]
    fn boottime_moves_forward() {
        let a = boottime_ms();
        std::thread::sleep(Duration::from_millis(5));
        assert!(boottime_ms() >= a + 5);
    }
}
