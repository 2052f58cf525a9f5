//! Making the objects of a `file://` store durable before a manifest names them.
//!
//! A manifest is written only once every object it names is on disk. This used to be one
//! `syncfs` of the store's filesystem, which flushed everything dirty there, not just the
//! backup's objects. By default the store sits under the data directory, beside the volumes,
//! so every backup forced out the clients' unflushed writes as well and waited for them. With
//! 8 GB just written by another program, a 1% incremental of 4 GiB took 1.91-1.97 s with
//! `syncfs` and 0.32-0.63 s syncing its own objects (0.12-0.17 s with nothing else dirty).
//!
//! Now the objects written since the last sync are fsynced (several at once, so that they share
//! the journal's commits), then their directories (the renames that put them in place, and any
//! directories created for them). So are the chunks a manifest names that this job did not
//! store and no earlier manifest named: found in the store, written by another daemon sharing
//! it or before a restart. Those are recorded nowhere else, so the first sync after a start is
//! still a whole `syncfs`.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::backup::error::BackupError;

/// A sync starts in the background once this much has been written since the last one, so
/// the sync before the manifest has little left to do (the kernel would otherwise keep
/// gigabytes dirty until then).
const BACKGROUND_SYNC_BYTES: u64 = 256 << 20;

pub struct LocalSync {
    root: PathBuf,
    pending: Mutex<Pending>,
    /// Held while objects are made durable, so a manifest never overtakes a sync that took
    /// its objects off the list and is still running. True once the whole filesystem has been
    /// synced by this process.
    syncing: tokio::sync::Mutex<bool>,
    background_running: AtomicBool,
    /// Objects of ours removed because their fdatasync failed, with the error: a manifest
    /// naming one must not be written. An object written again at the same path leaves it.
    lost: Mutex<HashMap<PathBuf, String>>,
    /// fdatasync of one object (a test puts a failing one here).
    sync_data: SyncData,
}

type SyncData = fn(&Path, &File) -> std::io::Result<()>;

#[derive(Default)]
struct Pending {
    /// Objects written and not yet made durable.
    paths: Vec<PathBuf>,
    bytes: u64,
}

impl LocalSync {
    pub fn new(root: PathBuf) -> Arc<LocalSync> {
        Arc::new(LocalSync {
            root,
            pending: Mutex::new(Pending::default()),
            syncing: tokio::sync::Mutex::new(false),
            background_running: AtomicBool::new(false),
            lost: Mutex::new(HashMap::new()),
            sync_data,
        })
    }

    /// Records an object of `len_bytes` written at `path` (below the root); it becomes
    /// durable at the next sync. True when a background sync is due (`start_background`):
    /// one runs every `BACKGROUND_SYNC_BYTES`. Blocking-safe: takes a short lock only.
    pub fn record(&self, path: PathBuf, len_bytes: u64) -> bool {
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&path);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.paths.push(path);
        pending.bytes += len_bytes;
        pending.bytes >= BACKGROUND_SYNC_BYTES
    }

    /// Starts a sync in the background unless one is running. Call from the runtime.
    pub fn start_background(self: &Arc<Self>) {
        if self.background_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = this.sync(Vec::new()).await {
                tracing::warn!(error = %e, "background sync of the backup store failed");
            }
            this.background_running.store(false, Ordering::Release);
        });
    }

    /// Makes every object recorded so far durable, and the `foreign` ones (objects others
    /// wrote, which a manifest is about to name). An object of ours whose fdatasync failed may
    /// have lost data the kernel will not report again: it is removed from the store, not
    /// retried, and remembered as lost (see `check_named`); the sync itself goes on, since the
    /// object may be another job's. Objects that could not be opened stay on the list for the
    /// next sync.
    pub async fn sync(&self, foreign: Vec<PathBuf>) -> Result<(), BackupError> {
        let mut whole_synced = self.syncing.lock().await;
        let own = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.bytes = 0;
            std::mem::take(&mut pending.paths)
        };
        let root = self.root.clone();
        let whole = !*whole_synced;
        let sync_data = self.sync_data;
        let joined = tokio::task::spawn_blocking(move || {
            if whole {
                // Objects older than this process are not on the list: sync them all once.
                match sync_filesystem(&root) {
                    Ok(()) => sync_objects(&root, &[], &foreign, sync_data),
                    // Our own objects one by one: that finds which of them, if any, failed
                    // (each file reports its own writeback error once).
                    Err(e) => {
                        let mut outcome = sync_objects(&root, &own, &foreign, sync_data);
                        outcome.error = Some(e);
                        outcome
                    }
                }
            } else {
                sync_objects(&root, &own, &foreign, sync_data)
            }
        })
        .await;
        let outcome = match joined {
            Ok(outcome) => outcome,
            Err(e) => {
                // The listed objects went with the task: the next sync covers everything.
                *whole_synced = false;
                return Err(BackupError::Failed(format!("sync task: {e}")));
            }
        };
        if !outcome.retry.is_empty() {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.paths.extend(outcome.retry);
        }
        if !outcome.lost.is_empty() {
            let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
            for (path, reason) in outcome.lost {
                tracing::warn!(path = %path.display(), %reason, "a backup object could not be made durable and was removed; a manifest naming it will not be written");
                lost.insert(path, reason);
            }
        }
        if let Some(e) = outcome.error {
            return Err(e);
        }
        *whole_synced = true;
        Ok(())
    }

    /// Fails when one of `named` (objects a manifest is about to name) was removed after a
    /// failed fdatasync, by this sync or an earlier one, and not written again since. Call
    /// after `sync`: every object written before it has then been synced or found lost.
    pub fn check_named<'a>(
        &self,
        named: impl IntoIterator<Item = &'a PathBuf>,
    ) -> Result<(), BackupError> {
        let lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        if lost.is_empty() {
            return Ok(());
        }
        for path in named {
            if let Some(reason) = lost.get(path) {
                return Err(BackupError::LocalStore {
                    path: path.display().to_string(),
                    reason: format!(
                        "{reason}; the object was removed and the backup must be taken again"
                    ),
                });
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn pending_paths(&self) -> Vec<PathBuf> {
        self.pending.lock().unwrap().paths.clone()
    }
}

/// What a sync of listed objects left: its first error, the objects to try again, and our
/// objects removed because their fdatasync failed (with the error).
struct SyncOutcome {
    error: Option<BackupError>,
    retry: Vec<PathBuf>,
    lost: Vec<(PathBuf, String)>,
}

fn sync_data(_path: &Path, file: &File) -> std::io::Result<()> {
    file.sync_data()
}

/// Whether `path` still names the open `file`.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// One object to sync.
struct Listed<'a> {
    path: &'a PathBuf,
    /// Written by this process: removed when its fdatasync fails, fine to find gone.
    is_own: bool,
    /// Named by a manifest about to be written: must be there.
    is_foreign: bool,
}

/// How one object's fdatasync went wrong.
enum ObjectSync {
    OpenFailed(std::io::Error),
    /// Ours, removed (the reason): its data may be lost.
    Removed(String),
    /// Ours, failed, but its path names another file now.
    Replaced,
    /// Another's: its error.
    Failed(std::io::Error),
}

/// fdatasync of each object in `own` and `foreign`, then fsync of each directory from theirs
/// up to `root`. An own object gone since it was written was replaced or deleted: nothing of
/// it is left to make durable. A foreign one must be there: a manifest is about to name it.
fn sync_objects(
    root: &Path,
    own: &[PathBuf],
    foreign: &[PathBuf],
    sync_data: SyncData,
) -> SyncOutcome {
    let failed = |path: &Path, what: &str, e: std::io::Error| BackupError::LocalStore {
        path: path.display().to_string(),
        reason: format!("{what}: {e}"),
    };
    let mut error = None;
    let mut retry = Vec::new();
    let mut lost = Vec::new();
    let mut synced = Vec::new();
    // Each path once, so no two threads sync one file: ours if listed as ours, and required
    // to be there if listed as foreign.
    let mut objects: Vec<Listed> = Vec::with_capacity(own.len() + foreign.len());
    let mut at: HashMap<&PathBuf, usize> = HashMap::new();
    let listed = own
        .iter()
        .map(|p| (p, true))
        .chain(foreign.iter().map(|p| (p, false)));
    for (path, is_own) in listed {
        let index = *at.entry(path).or_insert_with(|| {
            objects.push(Listed {
                path,
                is_own: false,
                is_foreign: false,
            });
            objects.len() - 1
        });
        let object = &mut objects[index];
        object.is_own |= is_own;
        object.is_foreign |= !is_own;
    }
    let results = in_parallel(
        &objects,
        |&Listed {
             path,
             is_own,
             is_foreign,
         }| {
            let file = File::open(path).map_err(ObjectSync::OpenFailed)?;
            match sync_data(path, &file) {
                Ok(()) => Ok(()),
                // Written back with an error, the pages are clean now and a second fdatasync
                // would succeed: the object cannot be trusted again. Unless the path now names
                // another file (the object was written again meanwhile): that one is synced on
                // its own.
                Err(e) if is_own => {
                    if same_file(&file, path) {
                        let _ = std::fs::remove_file(path);
                        Err(ObjectSync::Removed(format!("fdatasync: {e}")))
                    } else if is_foreign {
                        // A manifest names what is there now: that must be durable too.
                        let file = File::open(path).map_err(ObjectSync::OpenFailed)?;
                        sync_data(path, &file).map_err(ObjectSync::Failed)
                    } else {
                        Err(ObjectSync::Replaced)
                    }
                }
                Err(e) => Err(ObjectSync::Failed(e)),
            }
        },
    );
    for (object, result) in objects.iter().zip(results) {
        let Listed {
            path,
            is_own,
            is_foreign,
        } = *object;
        match result {
            Ok(()) => synced.push((path, is_own)),
            Err(ObjectSync::OpenFailed(e))
                if e.kind() == ErrorKind::NotFound && is_own && !is_foreign => {}
            Err(ObjectSync::OpenFailed(e)) => {
                error.get_or_insert(failed(path, "open for fdatasync", e));
                if is_own {
                    retry.push(path.clone());
                }
            }
            Err(ObjectSync::Removed(reason)) => lost.push((path.clone(), reason)),
            Err(ObjectSync::Replaced) => {}
            // Others' objects are theirs to deal with; this manifest cannot name it.
            Err(ObjectSync::Failed(e)) => {
                error.get_or_insert(failed(path, "fdatasync", e));
            }
        }
    }
    let mut dirs = BTreeSet::new();
    for (path, _) in &synced {
        let mut dir = path.parent();
        while let Some(d) = dir {
            if !d.starts_with(root) || !dirs.insert(d.to_path_buf()) {
                break;
            }
            dir = d.parent();
        }
    }
    let dirs: Vec<PathBuf> = dirs.into_iter().collect();
    let results = in_parallel(&dirs, |dir| File::open(dir).and_then(|d| d.sync_all()));
    for (dir, result) in dirs.iter().zip(results) {
        if let Err(e) = result {
            error.get_or_insert(failed(dir, "fsync", e));
            // Their data is durable; the entries naming them may not be.
            retry.extend(
                synced
                    .iter()
                    .filter(|(p, is_own)| *is_own && p.starts_with(dir))
                    .map(|(p, _)| p.to_path_buf()),
            );
        }
    }
    SyncOutcome { error, retry, lost }
}

/// Threads that fsync at once: concurrent fsyncs share the filesystem journal's commits,
/// one after another each waits for a commit of its own (a few milliseconds apiece here).
const SYNC_THREADS: usize = 8;

/// `op` on every item, on up to `SYNC_THREADS` threads; the results in the items' order.
fn in_parallel<T: Sync, R: Send>(items: &[T], op: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() <= 1 {
        return items.iter().map(&op).collect();
    }
    let per_thread = items.len().div_ceil(SYNC_THREADS);
    std::thread::scope(|scope| {
        let parts: Vec<_> = items
            .chunks(per_thread)
            .map(|part| scope.spawn(|| part.iter().map(&op).collect::<Vec<R>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|part| match part.join() {
                Ok(results) => results,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// syncfs(2) on the filesystem holding `dir`.
fn sync_filesystem(dir: &Path) -> Result<(), BackupError> {
    use std::os::fd::AsRawFd;
    let handle = File::open(dir).map_err(|e| BackupError::LocalStore {
        path: dir.display().to_string(),
        reason: format!("open for syncfs: {e}"),
    })?;
    // SAFETY: syncfs only reads the descriptor, which `handle` keeps open for the call.
    let rc = unsafe { libc::syncfs(handle.as_raw_fd()) };
    if rc != 0 {
        return Err(BackupError::LocalStore {
            path: dir.display().to_string(),
            reason: format!("syncfs: {}", std::io::Error::last_os_error()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn objects_leave_the_list_when_synced_and_stay_on_it_when_the_sync_fails() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let object = root.join("chunks/ab/abcd");
        std::fs::create_dir_all(object.parent().unwrap()).unwrap();
        std::fs::write(&object, b"chunk").unwrap();
        let sync = LocalSync::new(root.clone());
        // The first sync is of the whole filesystem; later ones are of the listed objects.
        sync.sync(Vec::new()).await.unwrap();
        assert!(!sync.record(object.clone(), 5));
        assert!(!sync.record(root.join("chunks/ab/gone"), 5));
        assert_eq!(sync.pending_paths().len(), 2);
        sync.sync(Vec::new()).await.unwrap();
        assert!(sync.pending_paths().is_empty());
        // A foreign object a manifest names must be there.
        let err = sync
            .sync(vec![root.join("chunks/ab/other")])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("chunks/ab/other"), "{err}");
        sync.sync(vec![object.clone()]).await.unwrap();
        // An object that cannot be opened (not a missing one: its "directory" is a file) fails
        // the sync and stays listed, with what was written after it.
        std::fs::write(root.join("chunks/ab/not-a-dir"), b"").unwrap();
        let bad = root.join("chunks/ab/not-a-dir/x");
        sync.record(bad.clone(), 1);
        let err = sync.sync(Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("not-a-dir"), "{err}");
        sync.record(object.clone(), 5);
        assert_eq!(sync.pending_paths(), vec![bad, object]);
        // Listed as ours and as foreign at once: synced once, and still required to be there.
        let both = root.join("chunks/ab/both");
        std::fs::write(&both, b"both").unwrap();
        sync.sync(Vec::new()).await.unwrap_err(); // `bad` again
        std::fs::remove_file(root.join("chunks/ab/not-a-dir")).unwrap();
        sync.record(both.clone(), 4);
        sync.sync(vec![both.clone()]).await.unwrap();
        std::fs::remove_file(&both).unwrap();
        sync.record(both.clone(), 4);
        let err = sync.sync(vec![both.clone()]).await.unwrap_err();
        assert!(err.to_string().contains("chunks/ab/both"), "{err}");
        // A background sync is due once enough was written.
        assert!(sync.record(root.join("chunks/ab/big"), BACKGROUND_SYNC_BYTES));
    }

    /// An object whose fdatasync fails is removed and remembered, whichever sync found it (a
    /// background one here): a manifest naming it is refused until it is written again.
    #[tokio::test]
    async fn an_object_whose_fdatasync_failed_is_removed_and_no_manifest_may_name_it() {
        fn fail_bad(path: &Path, file: &File) -> std::io::Result<()> {
            let name = path.file_name().unwrap().to_string_lossy();
            if name.starts_with("bad") {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            file.sync_data()
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        std::fs::create_dir_all(root.join("chunks/ab")).unwrap();
        let good = root.join("chunks/ab/good");
        let bad = root.join("chunks/ab/bad");
        std::fs::write(&good, b"good").unwrap();
        std::fs::write(&bad, b"bad").unwrap();
        let mut sync = LocalSync::new(root.clone());
        Arc::get_mut(&mut sync).unwrap().sync_data = fail_bad;
        sync.sync(Vec::new()).await.unwrap(); // the first: syncfs
        sync.record(good.clone(), 4);
        sync.record(bad.clone(), 3);
        // The sync goes on (the object may be another job's) and the good one is durable.
        sync.sync(Vec::new()).await.unwrap();
        assert!(sync.pending_paths().is_empty());
        assert!(good.exists());
        assert!(
            !bad.exists(),
            "an object that failed its fdatasync stays in the store"
        );
        sync.check_named([&good]).unwrap();
        let err = sync.check_named([&good, &bad]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("chunks/ab/bad") && text.contains("fdatasync"),
            "{text}"
        );
        // A later sync does not forget it.
        sync.sync(Vec::new()).await.unwrap();
        assert!(sync.check_named([&bad]).is_err());
        // Written again (by a retried upload or another job): it may be named once synced.
        std::fs::write(&bad, b"bad").unwrap();
        sync.record(bad.clone(), 3);
        sync.check_named([&bad]).unwrap();
        // A foreign object that fails its fdatasync fails the sync and is left in place.
        let foreign_bad = root.join("chunks/ab/bad-foreign");
        std::fs::write(&foreign_bad, b"x").unwrap();
        let err = sync.sync(vec![foreign_bad.clone()]).await.unwrap_err();
        assert!(err.to_string().contains("bad-foreign: fdatasync"), "{err}");
        assert!(foreign_bad.exists());
    }

    #[test]
    fn present_objects_and_their_directories_are_synced_and_missing_ones_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let object = root.join("packs/p1");
        std::fs::create_dir_all(object.parent().unwrap()).unwrap();
        std::fs::write(&object, b"pack").unwrap();
        let outcome = sync_objects(
            &root,
            &[object.clone(), root.join("packs/missing")],
            &[],
            sync_data,
        );
        assert!(outcome.error.is_none() && outcome.retry.is_empty() && outcome.lost.is_empty());
        // Removed with its directory after it was written: nothing left to sync.
        let outcome = sync_objects(&root, &[root.join("lost/obj")], &[object], sync_data);
        assert!(outcome.error.is_none() && outcome.retry.is_empty() && outcome.lost.is_empty());
    }
}
