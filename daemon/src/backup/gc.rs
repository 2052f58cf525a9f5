//! Garbage collection: mark every chunk some manifest references, sweep the rest. Runs under
//! the store's exclusive lock, so no backup (on any daemon) is between choosing to reuse a
//! chunk and writing the manifest that references it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::backup::error::BackupError;
use crate::backup::job::new_job_id;
use crate::backup::locks;
use crate::backup::{Backups, GcReport};

/// Chunk deletions in flight at once.
const DELETE_CONCURRENCY: usize = 16;
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
                manifests: 0,
                chunks_kept: 0,
                chunks_deleted: 0,
                bytes_freed: 0,
            });
        }
    };
    let result = sweep(svc).await;
    lock.release().await;
    result
}

async fn sweep(svc: &Arc<Backups>) -> Result<GcReport, BackupError> {
    let ids = svc.store.list_manifest_ids().await?;
    let mut marked = HashSet::new();
    for id in &ids {
        // Any manifest that cannot be read stops the GC: sweeping after a partial mark would
        // delete chunks that backup still needs.
        let manifest = svc.store.get_manifest(id).await?;
        marked.extend(manifest.chunks.iter().flatten().copied());
        // The chunks deltas patch, down to the whole chunks below them.
        marked.extend(manifest.delta_bases.values().copied());
    }
    let chunks = svc.store.list_chunks().await?;
    let garbage: Vec<_> = chunks
        .iter()
        .filter(|(id, _)| !marked.contains(*id))
        .map(|(id, size)| (*id, *size))
        .collect();
    let garbage_count = garbage.len();
    let mut deletions = futures_util::stream::iter(garbage.into_iter().map(|(id, size)| {
        let svc = Arc::clone(svc);
        let task: futures_util::future::BoxFuture<'static, Result<u64, BackupError>> =
            Box::pin(async move { svc.store.delete_chunk(&id).await.map(|()| size) });
        task
    }))
    .buffer_unordered(DELETE_CONCURRENCY);
    let mut bytes_freed = 0;
    let mut chunks_deleted = 0;
    while let Some(result) = deletions.next().await {
        bytes_freed += result?;
        chunks_deleted += 1;
    }
    let staging_removed = svc.store.remove_stale_staging(STALE_STAGING_AGE).await;
    let report = GcReport {
        deferred: false,
        reason: None,
        manifests: ids.len() as u64,
        chunks_kept: (chunks.len() - garbage_count) as u64,
        chunks_deleted,
        bytes_freed,
    };
    tracing::info!(
        manifests = report.manifests,
        chunks_kept = report.chunks_kept,
        chunks_deleted,
        bytes_freed,
        staging_removed,
        "garbage collection done"
    );
    Ok(report)
}
