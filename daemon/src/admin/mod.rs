//! The admin socket: newline-delimited JSON requests that manage volumes while the daemon runs.
//! docs/admin-protocol.md is the contract; `evsctl` is its client.

pub mod access_methods;
pub mod backup_methods;
pub mod methods;
pub mod policy_methods;
pub mod protocol;
pub mod server;
pub mod server_methods;

use std::sync::Arc;
use std::time::Instant;

use evsd_proto::TlsMode;
use serde::Serialize;

use crate::access::AccessStore;
use crate::backup::Backups;
use crate::io::IoEngine;
use crate::metrics::Metrics;
use crate::policy::{Policies, Runner};
use crate::servers::Servers;
use crate::storage::Registry;

/// What the methods act on and report.
pub struct AdminContext {
    pub registry: Arc<Registry>,
    pub access: Arc<AccessStore>,
    /// The server's TLS mode, to warn when a rule needs TLS the server does not offer.
    pub tls_mode: TlsMode,
    /// Whether client certificates are verified (`--tls-ca`): without, no client has a name,
    /// and name rules admit nobody.
    pub client_certificates: bool,
    pub backups: Arc<Backups>,
    pub servers: Arc<Servers>,
    pub policies: Arc<Policies>,
    pub policy_runner: Arc<dyn Runner>,
    pub started: Instant,
    pub listeners: ListenerAddresses,
    /// Asked at each `status`: a failed io_uring ring can hand over to the thread pool.
    pub io_engine: IoEngine,
    /// To drop a deleted volume's series.
    pub metrics: Arc<Metrics>,
}

/// Where the daemon listens, as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerAddresses {
    pub tcp: Option<String>,
    pub unix: Option<String>,
    pub admin: String,
}

/// Runs a method's blocking file work (a durable write: fsyncs, a rename) off the async
/// workers, which accepting, backups and every other admin client share.
pub(crate) async fn off_runtime<T, E>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, protocol::AdminError>
where
    T: Send + 'static,
    E: Into<protocol::AdminError> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(Into::into),
        Err(join) => Err(protocol::AdminError::new(
            protocol::ErrorCode::Internal,
            format!("filesystem task failed: {join}"),
        )),
    }
}
