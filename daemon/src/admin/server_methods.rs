//! The admin methods for servers (volume groups), their crash-consistent backups and backup
//! sets (`server.*`, `backup_set.*`); docs/admin-protocol.md documents them.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin::methods::to_json;
use crate::admin::protocol::{
    decode_params, unknown_method, AdminError, ErrorCode, IdParams, NameParams, NoParams,
};
use crate::admin::{off_runtime, AdminContext};
use crate::error::StorageError;
use crate::servers::ServerError;
use crate::storage::name::validate_volume_name;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    name: String,
    volumes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberParams {
    name: String,
    volume: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupParams {
    name: String,
    #[serde(default)]
    full: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreParams {
    set_id: String,
    #[serde(default)]
    to_new_suffix: Option<String>,
    #[serde(default)]
    force: bool,
}

pub async fn dispatch(
    ctx: &AdminContext,
    method: &str,
    params: Value,
) -> Result<Value, AdminError> {
    let servers = &ctx.servers;
    match method {
        "server.create" => {
            let p: CreateParams = decode_params(method, params)?;
            // A bad name is invalid whatever the volumes (checked again by `create`).
            if crate::storage::name::validate_volume_name(&p.name).is_err() {
                return Err(crate::servers::ServerError::InvalidName(p.name.clone()).into());
            }
            let mut entries = Vec::with_capacity(p.volumes.len());
            for volume in &p.volumes {
                match ctx.registry.entry(volume) {
                    Some(entry) => entries.push(entry),
                    None => return Err(StorageError::NotFound(volume.clone()).into()),
                }
            }
            let mut info = {
                let (servers, name, volumes) =
                    (Arc::clone(servers), p.name.clone(), p.volumes.clone());
                off_runtime(move || servers.create(&name, &volumes)).await?
            };
            // A member deleted meanwhile goes, as if the delete came just after; a server left
            // with none is not made (a server needs a volume).
            for entry in entries {
                if ctx.registry.was_deleted(&entry) {
                    forget_deleted_member(ctx, entry.name());
                    info = servers.get(&p.name)?;
                    if info.volumes.is_empty() {
                        servers.delete(&p.name)?;
                        return Err(StorageError::NotFound(entry.name().to_owned()).into());
                    }
                }
            }
            to_json(&info)
        }
        "server.add_volume" => {
            let p: MemberParams = decode_params(method, params)?;
            let Some(entry) = ctx.registry.entry(&p.volume) else {
                return Err(StorageError::NotFound(p.volume).into());
            };
            let info = {
                let (servers, name, volume) =
                    (Arc::clone(servers), p.name.clone(), p.volume.clone());
                off_runtime(move || servers.add_volume(&name, &volume)).await?
            };
            if ctx.registry.was_deleted(&entry) {
                forget_deleted_member(ctx, &p.volume);
                return Err(StorageError::NotFound(p.volume).into());
            }
            to_json(&info)
        }
        "server.remove_volume" => {
            let p: MemberParams = decode_params(method, params)?;
            let servers = Arc::clone(servers);
            to_json(&off_runtime(move || servers.remove_volume(&p.name, &p.volume)).await?)
        }
        "server.list" => {
            decode_params::<NoParams>(method, params)?;
            Ok(json!({ "servers": servers.list() }))
        }
        "server.show" => {
            let p: NameParams = decode_params(method, params)?;
            to_json(&servers.get(&p.name)?)
        }
        "server.delete" => {
            let p: NameParams = decode_params(method, params)?;
            let (servers, name) = (Arc::clone(servers), p.name.clone());
            off_runtime(move || servers.delete(&name)).await?;
            ctx.metrics.backup().forget_server(&p.name);
            Ok(json!({ "deleted": p.name }))
        }
        "server.backup" => {
            let p: BackupParams = decode_params(method, params)?;
            let server = servers.get(&p.name)?;
            if server.volumes.is_empty() {
                return Err(AdminError::new(
                    ErrorCode::InvalidArgument,
                    format!("server {:?} has no volumes", p.name),
                ));
            }
            to_json(&ctx.backups.server_backup(&server, p.full, None).await?)
        }
        "server.backups" => {
            let p: NameParams = decode_params(method, params)?;
            validate_volume_name(&p.name).map_err(|_| ServerError::InvalidName(p.name.clone()))?;
            // A deleted server's sets stay listed (backups outlive what they were taken of).
            let exists = servers.get(&p.name).is_ok();
            let sets = ctx.backups.server_sets(&p.name, exists).await?;
            if !exists && sets.is_empty() {
                return Err(ServerError::NotFound(p.name).into());
            }
            Ok(json!({ "backup_sets": sets }))
        }
        "server.restore" => {
            let p: RestoreParams = decode_params(method, params)?;
            let jobs = ctx
                .backups
                .restore_set(&p.set_id, p.to_new_suffix.as_deref(), p.force)
                .await?;
            Ok(json!({ "jobs": jobs }))
        }
        "backup_set.show" => {
            let p: IdParams = decode_params(method, params)?;
            to_json(&ctx.backups.show_set(&p.id).await?)
        }
        "backup_set.delete" => {
            let p: IdParams = decode_params(method, params)?;
            let gc = ctx.backups.delete_set(&p.id).await?;
            Ok(json!({ "deleted": p.id, "gc": gc }))
        }
        other => Err(unknown_method(other)),
    }
}

/// Takes back a membership stored while its volume was being deleted.
fn forget_deleted_member(ctx: &AdminContext, volume: &str) {
    if let Err(error) = ctx.servers.forget_volume(volume) {
        tracing::warn!(volume, %error, "removing a volume deleted meanwhile from its server failed");
    }
}
