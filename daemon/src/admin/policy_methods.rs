//! The admin methods for backup policies (`policy.*`); docs/admin-protocol.md documents them.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin::methods::to_json;
use crate::admin::protocol::{decode_params, unknown_method, AdminError, NameParams, NoParams};
use crate::admin::{off_runtime, AdminContext};
use crate::error::StorageError;
use crate::policy::{PolicySpec, Schedule, Target};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    name: String,
    #[serde(default)]
    every: Option<String>,
    #[serde(default)]
    daily: Option<String>,
    #[serde(default)]
    weekly: Option<String>,
    #[serde(default)]
    keep: Option<u32>,
    #[serde(default)]
    keep_days: Option<u32>,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    servers: Vec<String>,
}

pub async fn dispatch(
    ctx: &AdminContext,
    method: &str,
    params: Value,
) -> Result<Value, AdminError> {
    let policies = &ctx.policies;
    match method {
        "policy.create" => {
            let p: CreateParams = decode_params(method, params)?;
            let schedule =
                Schedule::from_options(p.every.as_deref(), p.daily.as_deref(), p.weekly.as_deref())
                    .map_err(crate::policy::PolicyError::from)?;
            let target = Target::from_lists(p.volumes, p.servers)?;
            let spec = PolicySpec {
                name: p.name,
                schedule,
                keep: p.keep,
                keep_days: p.keep_days,
                target,
            };
            // The request's own values first (a bad name is invalid whatever its targets),
            // then whether its targets exist.
            spec.validate()?;
            match &spec.target {
                Target::Volumes(volumes) => {
                    for v in volumes {
                        if ctx.registry.entry(v).is_none() {
                            return Err(StorageError::NotFound(v.clone()).into());
                        }
                    }
                }
                Target::Servers(servers) => {
                    for s in servers {
                        ctx.servers.get(s)?;
                    }
                }
            }
            let policies = Arc::clone(policies);
            to_json(&off_runtime(move || policies.create(spec)).await?)
        }
        "policy.list" => {
            decode_params::<NoParams>(method, params)?;
            Ok(json!({ "policies": policies.list() }))
        }
        "policy.show" => {
            let p: NameParams = decode_params(method, params)?;
            to_json(&policies.show(&p.name)?)
        }
        "policy.enable" | "policy.disable" => {
            let p: NameParams = decode_params(method, params)?;
            let (policies, enabled) = (Arc::clone(policies), method == "policy.enable");
            to_json(&off_runtime(move || policies.set_enabled(&p.name, enabled)).await?)
        }
        "policy.delete" => {
            let p: NameParams = decode_params(method, params)?;
            let (policies, name) = (Arc::clone(policies), p.name.clone());
            off_runtime(move || policies.delete(&name)).await?;
            Ok(json!({ "deleted": p.name }))
        }
        "policy.run" => {
            let p: NameParams = decode_params(method, params)?;
            // Records the run's start durably, as its siblings write: off the runtime.
            let (policies, runner) = (Arc::clone(policies), ctx.policy_runner.clone());
            to_json(&off_runtime(move || policies.run_now(&p.name, runner)).await?)
        }
        other => Err(unknown_method(other)),
    }
}
