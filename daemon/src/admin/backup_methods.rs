//! The admin methods for backups and jobs (`backup.*`, `job.*`); docs/admin-protocol.md
//! documents their params and results.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin::methods::to_json;
use crate::admin::protocol::{decode_params, unknown_method, AdminError, IdParams, NoParams};
use crate::admin::AdminContext;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    volumes: Vec<String>,
    #[serde(default)]
    full: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(default)]
    volume: Option<String>,
}

/// The longest `job.show` holds its answer for a job to finish.
const MAX_JOB_WAIT_MS: u64 = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobShowParams {
    id: String,
    /// Answer when the job finishes or this many milliseconds have passed (0: at once), so a
    /// waiting client learns of the end without polling often.
    #[serde(default)]
    wait_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreParams {
    id: String,
    to: String,
    #[serde(default)]
    force: bool,
}

pub async fn dispatch(
    ctx: &AdminContext,
    method: &str,
    params: Value,
) -> Result<Value, AdminError> {
    let backups = &ctx.backups;
    match method {
        "backup.create" => {
            let p: CreateParams = decode_params(method, params)?;
            Ok(json!({ "jobs": backups.create(&p.volumes, p.full, None).await? }))
        }
        "backup.list" => {
            let p: ListParams = decode_params(method, params)?;
            let list = backups.list(p.volume.as_deref()).await?;
            // Of whichever volume: an unreadable manifest does not say.
            let unreadable: Vec<_> = backups
                .unreadable_manifests()
                .into_iter()
                .map(|(id, error)| json!({ "id": id, "error": error }))
                .collect();
            Ok(json!({ "backups": list, "unreadable": unreadable }))
        }
        "backup.show" => {
            let p: IdParams = decode_params(method, params)?;
            to_json(&backups.show(&p.id).await?)
        }
        "backup.delete" => {
            let p: IdParams = decode_params(method, params)?;
            let gc = backups.delete(&p.id).await?;
            Ok(json!({ "deleted": p.id, "gc": gc }))
        }
        "backup.gc" => {
            decode_params::<NoParams>(method, params)?;
            to_json(&backups.gc().await?)
        }
        "backup.verify" => {
            let p: IdParams = decode_params(method, params)?;
            Ok(json!({ "job": backups.verify(&p.id).await? }))
        }
        "backup.restore" => {
            let p: RestoreParams = decode_params(method, params)?;
            Ok(json!({ "job": backups.restore(&p.id, &p.to, p.force).await? }))
        }
        "job.list" => {
            decode_params::<NoParams>(method, params)?;
            Ok(json!({ "jobs": backups.jobs() }))
        }
        "job.show" => {
            let p: JobShowParams = decode_params(method, params)?;
            let job = backups.job(&p.id)?;
            if p.wait_ms > 0 {
                let wait = Duration::from_millis(p.wait_ms.min(MAX_JOB_WAIT_MS));
                job.wait_finished(wait).await;
            }
            to_json(&job.info())
        }
        "job.cancel" => {
            let p: JobShowParams = decode_params(method, params)?;
            // Answers once the job has ended (its snapshot released, its volume removed)
            // or after wait_ms, 10 s by default; a job still ending then shows as running.
            let wait_ms = if p.wait_ms == 0 {
                MAX_JOB_WAIT_MS
            } else {
                p.wait_ms.min(MAX_JOB_WAIT_MS)
            };
            let info = backups
                .cancel_job(&p.id, Duration::from_millis(wait_ms))
                .await?;
            to_json(&info)
        }
        other => Err(unknown_method(other)),
    }
}
