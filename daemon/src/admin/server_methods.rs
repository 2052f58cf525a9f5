//! The admin methods for servers (volume groups), their crash-consistent backups and backup
//! sets (`server.*`, `backup_set.*`); docs/admin-protocol.md documents them.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin::methods::to_json;
use crate::admin::protocol::{
    decode_params, unknown_method, AdminError, ErrorCode, IdParams, NameParams, NoParams,
};
use crate::admin::AdminContext;
use crate::error::StorageError;

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
            for volume in &p.volumes {
                if ctx.registry.entry(volume).is_none() {
                    return Err(StorageError::NotFound(volume.clone()).into());
                }
            }
            to_json(&servers.create(&p.name, &p.volumes)?)
        }
        "server.add_volume" => {
            let p: MemberParams = decode_params(method, params)?;
            if ctx.registry.entry(&p.volume).is_none() {
                return Err(StorageError::NotFound(p.volume).into());
            }
            to_json(&servers.add_volume(&p.name, &p.volume)?)
        }
        "server.remove_volume" => {
            let p: MemberParams = decode_params(method, params)?;
            to_json(&servers.remove_volume(&p.name, &p.volume)?)
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
            servers.delete(&p.name)?;
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
            Ok(json!({ "backup_sets": ctx.backups.server_sets(&p.name).await? }))
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
