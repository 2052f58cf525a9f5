//! Garbage collection: mark every chunk and pack some manifest references, sweep the rest.
//! A pack goes only when no manifest references any chunk in it. Runs under
//! the store's exclusive lock, so no backup (on any daemon) is between choosing to reuse a
//! chunk and writing the manifest that references it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::backup::chunk::ChunkId;
use crate::backup::error::BackupError;
use crate::backup::job::new_job_id;
use crate::backup::locks::{self, LockHealth};
use crate::backup::{Backups, GcReport};

/// Chunk deletions in flight at once.
const DELETE_CONCURRENCY: usize = 16;

/// An unreferenced object a collection deletes, with its size in bytes.
enum Garbage {
    Chunk(ChunkId, u64),
    Pack(String, u64),
}
/// A local store's staging file this old is a leftover of a crashed upload, not a live one.
const STALE_STAGING_AGE: Duration = Duration::from_secs(3600);

pub async fn run(svc: &Arc<Backups>) -> Result<GcReport, BackupError> {
    let owner = format!("gc-{}", new_job_id());
    let lock = match locks::try_exclusive(&svc.store, &owner).await? {
        Ok(lock) => lock,
        Err(reason) => {
            tracing::info!(%reason, "garbage collection deferred");
            return Ok(GcReport {
                deferred: true,
                reason: Some(reason),
                ..GcReport::default()
            });
        }
    };
    let result = sweep(svc, &lock.health()).await;
    lock.release().await;
    result
}

/// Refuses to go on once the GC's lock has lapsed (see `locks::LockHealth`): a backup may then
/// have taken the lock for stale and chosen to reuse what this GC is about to delete.
fn check_lock(lock: &LockHealth) -> Result<(), BackupError> {
    if lock.lapses() > 0 {
        return Err(BackupError::Failed(
            "the garbage collection's store lock lapsed (the store was unreachable or the daemon stood still): it stopped deleting; run backup gc again".into(),
        ));
    }
    Ok(())
}

/// Stops deleting at shutdown, so the GC ends (and its lock goes) while the daemon stops; what
/// it did not delete goes at the next GC.
fn check_running(svc: &Backups) -> Result<(), BackupError> {
    if svc.shutdown.is_cancelled() {
        return Err(BackupError::Cancelled("the daemon is shutting down".into()));
    }
    Ok(())
}

async fn sweep(svc: &Arc<Backups>, lock: &Arc<LockHealth>) -> Result<GcReport, BackupError> {
    let ids = svc.store.list_manifest_ids().await?;
    let mut marked = HashSet::new();
    let mut marked_packs: HashSet<String> = HashSet::new();
    let mut manifests_read = 0u64;
    let mut vanished: Vec<&String> = Vec::new();
    for id in &ids {
        // Any manifest that cannot be read stops the GC: sweeping after a partial mark would
        // delete chunks that backup still needs. One deleted since the listing marks nothing.
        let manifest = match svc.store.get_manifest(id).await {
            Err(BackupError::BackupNotFound(_)) => {
                vanished.push(id);
                continue;
            }
            Err(BackupError::Manifest(e)) => {
                return Err(BackupError::Failed(format!(
                    "garbage collection stopped before deleting anything: the manifest of backup {id} cannot be read ({e}), so the chunks it references cannot be marked; if a newer evsd sharing the store wrote it, collect there; if it is damaged, `backup delete {id}` removes it"
                )))
            }
            other => other?,
        };
        manifests_read += 1;
        marked.extend(manifest.chunks.iter().flatten().copied());
        // The chunks deltas patch, down to the whole chunks below them.
        marked.extend(manifest.delta_bases.values().copied());
        marked_packs.extend(manifest.packed.into_values().map(|at| at.pack));
    }
    if !vanished.is_empty() {
        // Deleted, or only not readable yet on a store whose reads lag its listings: a
        // manifest still listed is live, and its chunks were not marked.
        let listed: HashSet<String> = svc.store.list_manifest_ids().await?.into_iter().collect();
        if let Some(id) = vanished.iter().find(|id| listed.contains(**id)) {
            return Err(BackupError::Failed(format!(
                "manifest {id} is listed but could not be read: garbage collection stopped before deleting anything"
            )));
        }
    }
    let chunks = svc.store.list_chunks().await?;
    let garbage: Vec<_> = chunks
        .iter()
        .filter(|(id, _)| !marked.contains(*id))
        .map(|(id, size)| (*id, *size))
        .collect();
    let garbage_count = garbage.len();
    let packs = svc.store.list_packs().await?;
    let garbage_packs: Vec<(String, u64)> = packs
        .iter()
        .filter(|(name, _)| !marked_packs.contains(*name))
        .map(|(name, size)| (name.clone(), *size))
        .collect();
    let garbage_pack_count = garbage_packs.len();
    // Only the ids are kept until the deletions start: a store with millions of garbage
    // chunks would otherwise hold a future per chunk, built before any of them ran.
    let (chunk_count, pack_count) = (chunks.len(), packs.len());
    drop((chunks, packs, marked, marked_packs));
    let targets = garbage
        .into_iter()
        .map(|(id, size)| Garbage::Chunk(id, size))
        .chain(
            garbage_packs
                .into_iter()
                .map(|(name, size)| Garbage::Pack(name, size)),
        );
    let mut deletions = futures_util::stream::iter(targets)
        .map(|target| {
            let svc = Arc::clone(svc);
            let lock = Arc::clone(lock);
            async move {
                check_lock(&lock)?;
                check_running(&svc)?;
                match target {
                    Garbage::Chunk(id, size) => {
                        svc.store.delete_chunk(&id).await.map(|()| (size, true))
                    }
                    Garbage::Pack(name, size) => {
                        svc.store.delete_pack(&name).await.map(|()| (size, false))
                    }
                }
            }
        })
        .buffer_unordered(DELETE_CONCURRENCY);
    let mut bytes_freed = 0;
    let mut chunks_deleted = 0;
    let mut packs_deleted = 0;
    while let Some(result) = deletions.next().await {
        let (size, chunk) = result?;
        bytes_freed += size;
        if chunk {
            chunks_deleted += 1;
        } else {
            packs_deleted += 1;
        }
    }
    let staging_removed = svc.store.remove_stale_staging(STALE_STAGING_AGE).await;
    let report = GcReport {
        deferred: false,
        reason: None,
        failed: None,
        manifests: manifests_read,
        chunks_kept: (chunk_count - garbage_count) as u64,
        chunks_deleted,
        packs_kept: (pack_count - garbage_pack_count) as u64,
        packs_deleted,
        bytes_freed,
    };
    tracing::info!(
        manifests = report.manifests,
        chunks_kept = report.chunks_kept,
        chunks_deleted,
        packs_kept = report.packs_kept,
        packs_deleted,
        bytes_freed,
        staging_removed,
        "garbage collection done"
    );
    Ok(report)
}
