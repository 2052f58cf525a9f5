//! The admin methods for volume access rules (`access.*`); docs/admin-protocol.md documents
//! them. Changes apply to new connections at once, and end open connections the new rules no
//! longer allow (or that were writing to a volume now made read-only).

use std::sync::Arc;

use evsd_proto::TlsMode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::access::{AccessPolicy, NetworkRule, PolicySource};
use crate::admin::methods::to_json;
use crate::admin::protocol::{decode_params, unknown_method, AdminError, NameParams, NoParams};
use crate::admin::{off_runtime, AdminContext};
use crate::error::StorageError;
use crate::storage::entry::VolumeEntry;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetParams {
    name: String,
    #[serde(default)]
    allow_names: Vec<String>,
    #[serde(default)]
    allow_networks: Vec<String>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    tls_only: bool,
    #[serde(default)]
    max_connections: Option<u32>,
}

#[derive(Debug, Serialize)]
struct AccessView {
    name: String,
    source: PolicySource,
    #[serde(flatten)]
    policy: AccessPolicy,
    /// Set when the rules need TLS and the server offers none: nobody can open the volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<String>,
}

pub async fn dispatch(
    ctx: &AdminContext,
    method: &str,
    params: Value,
) -> Result<Value, AdminError> {
    match method {
        "access.get" => {
            let p: NameParams = decode_params(method, params)?;
            existing_volume(ctx, &p.name)?;
            to_json(&view(ctx, &p.name))
        }
        "access.set" => {
            let p: SetParams = decode_params(method, params)?;
            let entry = existing_volume(ctx, &p.name)?;
            let allow_networks = p
                .allow_networks
                .iter()
                .map(|n| n.parse::<NetworkRule>())
                .collect::<Result<Vec<_>, _>>()?;
            let policy = AccessPolicy {
                allow_names: p.allow_names,
                allow_networks,
                read_only: p.read_only,
                tls_only: p.tls_only,
                max_connections: p.max_connections,
            };
            let access = Arc::clone(&ctx.access);
            let name = p.name.clone();
            off_runtime(move || access.set(&name, policy)).await?;
            if ctx.registry.was_deleted(&entry) {
                let access = Arc::clone(&ctx.access);
                let name = p.name.clone();
                if let Err(error) = off_runtime(move || access.forget(&name)).await {
                    tracing::warn!(volume = %p.name, %error, "removing the rules set for a volume deleted meanwhile failed");
                }
                return Err(StorageError::NotFound(p.name).into());
            }
            let view = view(ctx, &p.name);
            tracing::info!(volume = %p.name, rules = ?view.policy, "access rules set");
            to_json(&view)
        }
        "access.list" => {
            let _: NoParams = decode_params(method, params)?;
            let all: Vec<AccessView> = ctx
                .access
                .list()
                .into_iter()
                .map(|(name, _, _)| view(ctx, &name))
                .collect();
            to_json(&all)
        }
        other => Err(unknown_method(other)),
    }
}

/// Rules are kept for volumes only; `VOL@SNAP` exports follow `VOL`'s.
fn existing_volume(ctx: &AdminContext, name: &str) -> Result<Arc<VolumeEntry>, AdminError> {
    match ctx.registry.entry(name) {
        Some(entry) if !name.contains('@') => Ok(entry),
        _ => Err(StorageError::NotFound(name.to_owned()).into()),
    }
}

fn view(ctx: &AdminContext, name: &str) -> AccessView {
    let (policy, source) = ctx.access.policy(name);
    let warning = if policy.needs_tls() && ctx.tls_mode == TlsMode::Off {
        Some(
            "these rules need TLS, which is off on this server: no client can open the volume \
             until it runs with --tls on or require"
                .to_owned(),
        )
    } else if !policy.allow_names.is_empty() && !ctx.client_certificates {
        Some(
            "these rules name clients, but this server verifies no client certificates (no \
             --tls-ca): no client has a name, so none can open the volume"
                .to_owned(),
        )
    } else {
        None
    };
    AccessView {
        name: name.to_owned(),
        source,
        policy,
        warning,
    }
}
