//! What each admin method does: decode its params, act on the registry, describe the result.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::admin::protocol::{
    decode_params, unknown_method, AdminError, ErrorCode, NameParams, NoParams, SizeParam,
};
use crate::admin::{access_methods, backup_methods, policy_methods, server_methods};
use crate::admin::{off_runtime, AdminContext};
use crate::backup::set_restore::PRE_RESTORE_PREFIX;
use crate::backup::BACKUP_SNAPSHOT_PREFIX;
use crate::error::StorageError;
use crate::storage::attachments::{CloseRefused, Closure};
use crate::storage::entry::VolumeEntry;
use crate::storage::name::validate_volume_name;
use crate::storage::restore_mark::RestoreMark;
use crate::storage::Volume;

/// How long a forced delete waits for its disconnected clients to finish the requests they had
/// sent; the directory goes afterwards either way (open files keep working until closed).
/// Longer than the 10 s the NBD side gives a closing client that takes none of its replies
/// (`nbd::transmission::CLOSING_REPLY_STALL`), so such a client is let go before this ends.
const DELETE_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

pub async fn dispatch(
    ctx: &AdminContext,
    method: &str,
    params: Value,
) -> Result<Value, AdminError> {
    match method {
        "volume.create" => create(ctx, decode_params(method, params)?).await,
        "volume.list" => {
            decode_params::<NoParams>(method, params)?;
            to_json(&VolumeList {
                volumes: ctx.registry.list().iter().map(|v| describe(v)).collect(),
            })
        }
        "volume.show" => {
            let NameParams { name } = decode_params(method, params)?;
            to_json(&describe(find(ctx, &name)?.as_ref()))
        }
        "volume.resize" => resize(ctx, decode_params(method, params)?).await,
        "volume.delete" => delete(ctx, decode_params(method, params)?).await,
        "snapshot.create" => {
            let p: SnapshotParams = decode_params(method, params)?;
            // Backups find their base by their prefix and release the older ones (a user's
            // snapshot named so would be deleted by the next backup, or taken for a base);
            // server restores find their unfinished work by theirs (see `backup::set_restore`).
            let reserved = [
                (BACKUP_SNAPSHOT_PREFIX, "backups"),
                (PRE_RESTORE_PREFIX, "server restores"),
            ];
            let taken = reserved
                .iter()
                .find(|(prefix, _)| p.name.starts_with(prefix));
            if let Some((prefix, whose)) = taken {
                return Err(AdminError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "snapshot name {:?}: names starting with {prefix:?} are reserved for the snapshots {whose} take",
                        p.name
                    ),
                ));
            }
            to_json(&entry(ctx, &p.volume)?.create_snapshot(&p.name).await?)
        }
        "snapshot.list" => {
            let p: VolumeParams = decode_params(method, params)?;
            to_json(&serde_json::json!({ "snapshots": entry(ctx, &p.volume)?.snapshots() }))
        }
        "snapshot.delete" => {
            let p: SnapshotParams = decode_params(method, params)?;
            // What a server restore deciding would roll its member back to.
            if p.name.starts_with(PRE_RESTORE_PREFIX) && ctx.backups.in_set_restore(&p.volume) {
                return Err(AdminError::new(
                    ErrorCode::Busy,
                    format!(
                        "snapshot {:?} of volume {:?} belongs to a server restore still deciding: wait for its jobs to end",
                        p.name, p.volume
                    ),
                ));
            }
            let deleted = entry(ctx, &p.volume)?.delete_snapshot(&p.name).await?;
            ctx.metrics
                .forget_volume(&format!("{}@{}", p.volume, p.name));
            to_json(&deleted)
        }
        "snapshot.rollback" => {
            let p: RollbackParams = decode_params(method, params)?;
            let entry = entry(ctx, &p.volume)?;
            entry.rollback(&p.name, p.force).await?;
            to_json(&describe(entry.volume()))
        }
        "status" => {
            decode_params::<NoParams>(method, params)?;
            status(ctx)
        }
        m if m.starts_with("backup.") || m.starts_with("job.") => {
            backup_methods::dispatch(ctx, method, params).await
        }
        m if m.starts_with("server.") || m.starts_with("backup_set.") => {
            server_methods::dispatch(ctx, method, params).await
        }
        m if m.starts_with("policy.") => policy_methods::dispatch(ctx, method, params).await,
        m if m.starts_with("access.") => access_methods::dispatch(ctx, method, params).await,
        other => Err(unknown_method(other)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    name: String,
    #[serde(default)]
    size: Option<SizeParam>,
    /// `VOL@SNAP`: create the volume as a clone of that snapshot.
    #[serde(default)]
    from_snapshot: Option<String>,
    /// A backup id: create the volume with the backup's size and restore it (a job).
    #[serde(default)]
    from_backup: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeParams {
    volume: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotParams {
    volume: String,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackParams {
    volume: String,
    name: String,
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeParams {
    name: String,
    size: SizeParam,
    #[serde(default)]
    allow_shrink: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    name: String,
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Serialize)]
struct VolumeInfo {
    name: String,
    size_bytes: u64,
    connections: usize,
    uuid: String,
    created_unix_secs: u64,
    /// Set while the volume holds an incomplete restore and refuses clients.
    incomplete_restore: Option<RestoreMark>,
    /// The operation the volume is closed to clients for, if any.
    closed_for: Option<Closure>,
}

#[derive(Debug, Serialize)]
struct VolumeList {
    volumes: Vec<VolumeInfo>,
}

#[derive(Debug, Serialize)]
struct VolumeSummary {
    name: String,
    size_bytes: u64,
    connections: usize,
}

#[derive(Debug, Serialize)]
struct Status<'a> {
    version: &'static str,
    uptime_secs: u64,
    listeners: &'a crate::admin::ListenerAddresses,
    io_engine: String,
    volumes: Vec<VolumeSummary>,
}

fn describe(volume: &Volume) -> VolumeInfo {
    VolumeInfo {
        name: volume.name().to_owned(),
        size_bytes: volume.size_bytes(),
        connections: volume.attachments().count(),
        uuid: volume.identity().uuid.clone(),
        created_unix_secs: volume.identity().created_unix_secs,
        incomplete_restore: volume.restore_mark(),
        closed_for: volume.attachments().closure(),
    }
}

fn find(ctx: &AdminContext, name: &str) -> Result<Arc<Volume>, AdminError> {
    ctx.registry
        .get(name)
        .ok_or_else(|| StorageError::NotFound(name.to_owned()).into())
}

fn entry(ctx: &AdminContext, name: &str) -> Result<Arc<VolumeEntry>, AdminError> {
    ctx.registry
        .entry(name)
        .ok_or_else(|| StorageError::NotFound(name.to_owned()).into())
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Result<Value, AdminError> {
    serde_json::to_value(value).map_err(|e| {
        AdminError::new(
            ErrorCode::Internal,
            format!("encoding the result failed: {e}"),
        )
    })
}

async fn create(ctx: &AdminContext, params: CreateParams) -> Result<Value, AdminError> {
    // The name first: a bad name is the more useful complaint when both are wrong.
    validate_volume_name(&params.name)?;
    let registry = Arc::clone(&ctx.registry);
    if let Some(backup_id) = &params.from_backup {
        if params.size.is_some() || params.from_snapshot.is_some() {
            return Err(AdminError::new(
                ErrorCode::InvalidArgument,
                "give exactly one of size, from_snapshot and from_backup",
            ));
        }
        let job = ctx.backups.create_volume(&params.name, backup_id).await?;
        let volume = find(ctx, &params.name)?;
        let mut described = serde_json::to_value(describe(&volume))
            .map_err(|e| AdminError::new(ErrorCode::Internal, e.to_string()))?;
        described["job"] = serde_json::to_value(job)
            .map_err(|e| AdminError::new(ErrorCode::Internal, e.to_string()))?;
        return Ok(described);
    }
    let volume = match (params.size, params.from_snapshot) {
        (Some(size), None) => {
            let size_bytes = size.to_bytes()?;
            off_runtime(move || registry.create(&params.name, size_bytes)).await?
        }
        (None, Some(source)) => {
            let Some((volume, snapshot)) = source.split_once('@') else {
                return Err(AdminError::new(
                    ErrorCode::InvalidArgument,
                    format!("from_snapshot {source:?} is not VOL@SNAP"),
                ));
            };
            registry
                .create_from_snapshot(&params.name, volume, snapshot)
                .await?
        }
        _ => {
            return Err(AdminError::new(
                ErrorCode::InvalidArgument,
                "give exactly one of size, from_snapshot and from_backup",
            ))
        }
    };
    to_json(&describe(&volume))
}

async fn resize(ctx: &AdminContext, params: ResizeParams) -> Result<Value, AdminError> {
    let size_bytes = params.size.to_bytes()?;
    let old_size_bytes = ctx
        .registry
        .resize(&params.name, size_bytes, params.allow_shrink)
        .await?;
    Ok(serde_json::json!({
        "name": params.name,
        "old_size_bytes": old_size_bytes,
        "size_bytes": size_bytes,
    }))
}

async fn delete(ctx: &AdminContext, params: DeleteParams) -> Result<Value, AdminError> {
    // The volume itself: a `vol@snap` name is not a volume (closing that view here would
    // leave it closed).
    let entry = entry(ctx, &params.name)?;
    let volume = Arc::clone(entry.volume());
    // Its snapshot exports (`vol@snap`) go with it: their clients refuse the delete too, unless
    // forced. Closed first, reopened if the delete does not happen.
    // A volume closed for a restore, rollback or shrink refuses the delete: said before any
    // export's clients are cut off for nothing.
    if let Some(closure) = volume.attachments().closure() {
        return Err(entry.closed_error(closure).into());
    }
    let all_views = entry.views();
    let views = close_views_for_deletion(&all_views, params.force)?;
    let disconnected = match volume.attachments().close(params.force, Closure::Deletion) {
        Ok(disconnected) => disconnected + views.disconnected,
        Err(refused) => {
            views.reopen();
            return Err(match refused {
                CloseRefused::Busy(connections) => StorageError::Busy {
                    name: params.name.clone(),
                    connections,
                },
                CloseRefused::AlreadyClosed(closure) => entry.closed_error(closure),
            }
            .into());
        }
    };
    // Snapshot deletes (merges), rollbacks, resizes and clones of this volume finish first,
    // and the ones waiting behind find it gone: once removed, its directory name may belong to
    // a new volume. The lock also lets a snapshot create's background fsyncs end.
    let admin_lock = match entry.lock_admin().await {
        Ok(guard) => guard,
        Err(e) => {
            volume.attachments().reopen(Closure::Deletion);
            views.reopen();
            return Err(e.into());
        }
    };
    // Snapshots taken while the delete waited for the lock have exports of their own: their
    // clients refuse the delete as well, unless forced (else the removal would cut them off).
    let later: Vec<Arc<Volume>> = entry
        .views()
        .into_iter()
        .filter(|view| !all_views.iter().any(|seen| Arc::ptr_eq(seen, view)))
        .collect();
    let later_views = match close_views_for_deletion(&later, params.force) {
        Ok(closed) => closed,
        Err(e) => {
            drop(admin_lock);
            volume.attachments().reopen(Closure::Deletion);
            views.reopen();
            return Err(e);
        }
    };
    let disconnected = disconnected + later_views.disconnected;
    let (registry, access, servers) = (
        Arc::clone(&ctx.registry),
        Arc::clone(&ctx.access),
        Arc::clone(&ctx.servers),
    );
    let name = params.name.clone();
    // Its rules and memberships go right after it, off the runtime (their files are written
    // durably): the name is free from here on, and a new volume's rules are not to be lost.
    let removed = off_runtime(move || {
        let hidden = registry.remove(&name)?;
        if let Err(e) = access.forget(&name) {
            tracing::warn!(volume = %name, error = %e, "removing the deleted volume's access rules failed");
        }
        if let Err(e) = servers.forget_volume(&name) {
            tracing::warn!(volume = %name, error = %e, "removing the deleted volume from its server failed");
        }
        Ok::<_, StorageError>(hidden)
    })
    .await;
    drop(admin_lock);
    let hidden = match removed {
        Ok(hidden) => hidden,
        Err(e) => {
            volume.attachments().reopen(Closure::Deletion);
            views.reopen();
            later_views.reopen();
            return Err(e);
        }
    };
    if !volume
        .attachments()
        .wait_detached(DELETE_DRAIN_TIMEOUT)
        .await
    {
        tracing::warn!(volume = %params.name, "clients still attached after the drain timeout");
    }
    ctx.metrics.forget_volume(&params.name);
    for view in all_views.iter().chain(&later) {
        ctx.metrics.forget_volume(view.name());
    }
    // Already durable (the hidden directory is dropped at the next start if this fails).
    let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&hidden)).await;
    if let Ok(Err(e)) | Err(e) = removed.map_err(std::io::Error::other) {
        tracing::warn!(volume = %params.name, error = %e, "removing the deleted volume's files failed");
    }
    let backups = Arc::clone(&ctx.backups);
    let uuid = volume.identity().uuid.clone();
    let _ = off_runtime(move || {
        backups.forget_volume(&uuid);
        Ok::<(), StorageError>(())
    })
    .await;
    Ok(serde_json::json!({"name": params.name, "disconnected": disconnected}))
}

/// Snapshot exports a volume delete closed, and the clients that dropped.
struct ClosedViews {
    closed: Vec<Arc<Volume>>,
    disconnected: usize,
}

impl ClosedViews {
    /// Opens again the exports closed for a deletion that did not happen.
    fn reopen(&self) {
        for view in &self.closed {
            view.attachments().reopen(Closure::Deletion);
        }
    }
}

/// Closes `views` for a deletion: refused (and nothing left closed) when one has clients and
/// `force` is not given. A view closed already for something else stays as it is.
fn close_views_for_deletion(views: &[Arc<Volume>], force: bool) -> Result<ClosedViews, AdminError> {
    let mut done = ClosedViews {
        closed: Vec::new(),
        disconnected: 0,
    };
    for view in views {
        match view.attachments().close(force, Closure::Deletion) {
            Ok(disconnected) => {
                done.disconnected += disconnected;
                done.closed.push(Arc::clone(view));
            }
            Err(CloseRefused::AlreadyClosed(_)) => {}
            Err(CloseRefused::Busy(connections)) => {
                done.reopen();
                return Err(StorageError::Busy {
                    name: view.name().to_owned(),
                    connections,
                }
                .into());
            }
        }
    }
    Ok(done)
}

fn status(ctx: &AdminContext) -> Result<Value, AdminError> {
    to_json(&Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: ctx.started.elapsed().as_secs(),
        listeners: &ctx.listeners,
        io_engine: ctx.io_engine.kind().to_string(),
        volumes: ctx
            .registry
            .list()
            .iter()
            .map(|v| VolumeSummary {
                name: v.name().to_owned(),
                size_bytes: v.size_bytes(),
                connections: v.attachments().count(),
            })
            .collect(),
    })
}
