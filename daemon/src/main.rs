//! evsd: serves block volumes over NBD.

mod admin;
mod config;
mod error;
mod io;
mod nbd;
mod storage;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use evsd_proto::HandshakeConfig;
use tokio_util::sync::CancellationToken;

use crate::admin::server::AdminListener;
use crate::admin::{AdminContext, ListenerAddresses};
use crate::config::Args;
use crate::io::{EngineConfig, IoEngine};
use crate::nbd::connection::ConnectionConfig;
use crate::nbd::server::{Listeners, Server};
use crate::nbd::transmission::TransmissionConfig;
use crate::storage::Registry;

/// mimalloc keeps freed memory for reuse: glibc's malloc returned the 1 MiB read buffers to the
/// kernel and faulted them back in, page by page, on every large read.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Size of the volume created on a first start.
const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log_format)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.worker_threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = builder
        .enable_all()
        .thread_name("evsd-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

fn init_logging(format: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "human" => builder.init(),
        "json" => builder.json().init(),
        other => anyhow::bail!("--log-format {other:?}: use human or json"),
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let engine_config = EngineConfig {
        ring_threads: args.ring_threads.max(1),
        ..EngineConfig::default()
    };
    let engine =
        IoEngine::new(args.io_engine, &engine_config).context("starting the I/O engine")?;
    tracing::info!(engine = %engine.kind(), "I/O engine ready");
    let io_engine = engine.kind().to_string();

    let registry = Arc::new(
        Registry::open(&args.data_dir, engine)
            .with_context(|| format!("opening data directory {}", args.data_dir.display()))?,
    );
    // A first start (no volume yet) gets `vol0`, so the README's run command is usable as is.
    if registry.is_empty() && !args.no_default_volume {
        registry
            .create(nbd::catalog::DEFAULT_EXPORT, DEFAULT_VOLUME_BYTES)
            .context("creating the default volume")?;
    }
    for (name, size_bytes) in args.volumes_to_create()? {
        if registry.get(&name).is_none() {
            registry
                .create(&name, size_bytes)
                .with_context(|| format!("creating volume {name}"))?;
        }
    }

    let listeners = Listeners::bind(args.tcp_addr()?, args.unix.clone())
        .await
        .context("binding listeners")?;
    if listeners.tcp.is_none() && listeners.unix.is_none() {
        anyhow::bail!("nothing to listen on: --listen off needs --unix PATH");
    }
    let admin_path = args.admin_socket_path();
    let admin = AdminListener::bind(admin_path.clone())
        .with_context(|| format!("binding admin socket {}", admin_path.display()))?;
    let admin_context = Arc::new(AdminContext {
        registry: Arc::clone(&registry),
        started,
        listeners: ListenerAddresses {
            tcp: listeners.tcp_addr().map(|a| a.to_string()),
            unix: listeners
                .unix
                .as_ref()
                .map(|u| u.socket_file.path.display().to_string()),
            admin: admin.path().display().to_string(),
        },
        io_engine,
    });
    announce(&args, &listeners, &registry)?;

    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    let server = Server {
        registry,
        config: Arc::new(ConnectionConfig {
            handshake_timeout: Duration::from_secs(args.handshake_timeout_secs),
            handshake: HandshakeConfig::default(),
            transmission: TransmissionConfig {
                max_inflight_requests: args.max_inflight_requests.max(1),
                max_inflight_bytes: args.max_inflight_mib.max(1) << 20,
            },
        }),
        max_connections: args.max_connections.max(1),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
    };
    tokio::join!(
        server.run(listeners, shutdown.clone()),
        admin.run(admin_context, shutdown)
    );
    tracing::info!("stopped");
    Ok(())
}

/// Logs the URIs to use and writes the ready file.
fn announce(args: &Args, listeners: &Listeners, registry: &Registry) -> anyhow::Result<()> {
    let tcp = listeners.tcp_addr();
    let unix = listeners.unix.as_ref().map(|u| u.socket_file.path.clone());
    for volume in registry.list() {
        if let Some(addr) = tcp {
            tracing::info!(uri = %format!("nbd://{addr}/{}", volume.name()), size_bytes = volume.size_bytes(), "serving");
        }
        if let Some(path) = &unix {
            tracing::info!(uri = %format!("nbd+unix:///{}?socket={}", volume.name(), path.display()), "serving");
        }
    }
    if let Some(path) = &args.ready_file {
        let ready = serde_json::json!({
            "tcp": tcp.map(|a| a.to_string()),
            "unix": unix.map(|p| p.display().to_string()),
            "pid": std::process::id(),
        });
        storage::manifest::write_durably(path, ready.to_string().as_bytes())
            .with_context(|| format!("writing ready file {}", path.display()))?;
    }
    Ok(())
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop evsd with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
