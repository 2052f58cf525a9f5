//! evsd: serves block volumes over NBD.

mod accept_failures;
mod access;
mod activation;
mod admin;
mod backup;
mod config;
mod data_dir_lock;
mod error;
mod io;
mod logging;
mod metrics;
mod nbd;
mod policy;
mod servers;
mod settings;
mod storage;
mod systemd;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use evsd_proto::{HandshakeConfig, TlsMode};
use tokio_util::sync::CancellationToken;

use crate::access::{AccessStore, PolicySource};
use crate::activation::Inherited;
use crate::admin::server::AdminListener;
use crate::admin::{AdminContext, ListenerAddresses};
use crate::backup::policy_run::PolicyRunner;
use crate::backup::store::BackupStore;
use crate::backup::{BackupConfig, Backups};
use crate::config::Args;
use crate::data_dir_lock::DataDirLock;
use crate::io::{EngineConfig, IoEngine};
use crate::metrics::http::MetricsListener;
use crate::metrics::Metrics;
use crate::nbd::connection::ConnectionConfig;
use crate::nbd::server::{Listeners, Server};
use crate::nbd::threads::ConnectionThreads;
use crate::nbd::tls::TlsContext;
use crate::nbd::transmission::TransmissionConfig;
use crate::policy::{Policies, Runner, SystemClock};
use crate::servers::Servers;
use crate::settings::Settings;
use crate::storage::Registry;

/// mimalloc keeps freed memory for reuse: glibc's malloc returned the 1 MiB read buffers to the
/// kernel and faulted them back in, page by page, on every large read. It is built without
/// transparent huge pages (`no_thp` in Cargo.toml): with them, each first touch of a purged
/// arena page zeroed 2 MiB, which was 65% of the daemon's CPU in an incremental backup's many
/// small allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Size of the volume created on a first start.
const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;
/// zstd level for backup chunks: level 1 keeps compression well above disk and network speed.
const DEFAULT_ZSTD_LEVEL: i32 = 1;

fn main() -> anyhow::Result<()> {
    // Until the handlers go in (after the volumes are loaded), a SIGHUP (a reload, a log
    // rotation hook) would end the process by default: ignored meanwhile.
    // SAFETY: called before any thread exists; SIG_IGN is a valid disposition for SIGHUP.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", settings::DEFAULT_CONFIG);
        return Ok(());
    }
    let settings = Settings::resolve(&args)?;
    logging::init(settings.log_format).report();
    settings.tcp_congestion.check()?;
    // Before anything in the directory is read or changed; held until the process ends.
    let _data_dir_lock = DataDirLock::acquire(&settings.data_dir)?;
    // A ready file says a daemon is serving: the last run's (its pid, its ports) goes before
    // this one starts, and this one's when it stops, whether it became ready or not.
    let ready_file = settings.ready_file.clone();
    remove_ready_file(ready_file.as_deref());
    // Taken before the runtime starts, so no task can see the fds unowned.
    let inherited = Inherited::take().context("taking socket-activated listeners")?;
    // Connections run on threads of their own (`nbd::threads`); this runtime serves the rest:
    // accepting, the admin socket, backups, metrics.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("evsd-worker")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(run(settings, args, inherited));
    remove_ready_file(ready_file.as_deref());
    result
}

fn remove_ready_file(path: Option<&std::path::Path>) {
    let Some(path) = path else { return };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not remove the ready file")
        }
    }
}

async fn run(settings: Settings, args: Args, inherited: Inherited) -> anyhow::Result<()> {
    let started = Instant::now();
    let engine_config = EngineConfig {
        ring_threads: settings.ring_threads,
        ring_spin_us: settings.ring_spin_us,
        inline_cached_io: settings.inline_cached_io,
        ..EngineConfig::default()
    };
    let engine =
        IoEngine::new(settings.io_engine, &engine_config).context("starting the I/O engine")?;
    tracing::info!(engine = %engine.kind(), "I/O engine ready");
    let io_engine = engine.clone();

    let registry = Arc::new(
        Registry::open(&settings.data_dir, engine)
            .with_context(|| format!("opening data directory {}", settings.data_dir.display()))?,
    );
    // A first start (no volume yet) gets `vol0`, so the README's run command is usable as is.
    // Volumes that failed to load are volumes all the same: not a first start.
    if registry.is_empty() && registry.unloaded().is_empty() && settings.create_default_volume {
        registry
            .create(nbd::catalog::DEFAULT_EXPORT, DEFAULT_VOLUME_BYTES)
            .context("creating the default volume")?;
    }
    for (name, size_bytes) in &settings.create_volumes {
        // One that failed to load exists all the same: it was skipped and logged, and the
        // others are served.
        if registry.unloaded().iter().any(|unloaded| unloaded == name) {
            tracing::warn!(volume = %name, "not creating a volume that exists but failed to load");
            continue;
        }
        if registry.get(name).is_none() {
            registry
                .create(name, *size_bytes)
                .with_context(|| format!("creating volume {name}"))?;
        }
    }

    let has_nbd = inherited.has_nbd();
    let Inherited {
        nbd_tcp,
        nbd_unix,
        admin: inherited_admin,
    } = inherited;
    // Sockets passed by systemd replace --listen/--unix: the unit owns the addresses then.
    let listeners = if has_nbd {
        let listeners = Listeners::from_inherited(nbd_tcp, nbd_unix)
            .context("using the inherited NBD sockets")?;
        tracing::info!(
            tcp = ?listeners.tcp_addr(),
            unix = ?listeners.unix.as_ref().map(|u| u.socket_file.path.display().to_string()),
            "using NBD sockets passed by the service manager"
        );
        listeners
    } else {
        Listeners::bind(settings.listen, settings.unix.clone())
            .await
            .context("binding listeners")?
    };
    if listeners.tcp.is_none() && listeners.unix.is_none() {
        anyhow::bail!("nothing to listen on: --listen off needs --unix PATH");
    }
    if let Some(tcp) = &listeners.tcp {
        settings.tcp_congestion.prepare_listener(tcp, has_nbd)?;
    }
    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some(MetricsListener::bind(addr).await?),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|m| m.local_addr());
    let admin = match inherited_admin {
        Some(socket) => {
            let path = socket.path.clone();
            let admin = AdminListener::from_inherited(socket)
                .with_context(|| format!("using the inherited admin socket {}", path.display()))?;
            tracing::info!(path = %path.display(), "using the admin socket passed by the service manager");
            admin
        }
        None => {
            let path = settings.admin_socket.clone();
            AdminListener::bind(path.clone())
                .with_context(|| format!("binding admin socket {}", path.display()))?
        }
    };
    let tls = match &settings.tls {
        Some(tls) => {
            let context = TlsContext::load(tls.paths.clone()).context("loading TLS credentials")?;
            tracing::info!(mode = ?tls.mode, cert = %tls.paths.cert.display(), client_ca = ?tls.paths.ca, "TLS enabled");
            Some(Arc::new(context))
        }
        None => None,
    };
    let shutdown = CancellationToken::new();
    // Cancelled once the NBD server has let its last connection go.
    let served = CancellationToken::new();
    // Beside serving, as every merge runs: a long one must not hold every volume offline,
    // nor one that fails keep the daemon from starting. The end cuts it off as a crash would
    // (merges are redone from their records), but only once no client write can come: a copy
    // step dropped midway lets go of the blocks it holds with its write still queued, which
    // would land over a client's write to them.
    tokio::spawn({
        let (registry, served) = (Arc::clone(&registry), served.clone());
        async move {
            tokio::select! {
                _ = registry.resume_compaction() => {}
                _ = served.cancelled() => {}
            }
        }
    });
    let mut metrics = Metrics::new();
    metrics.register_io(io_engine.copied_here_bytes());
    let metrics = Arc::new(metrics);
    {
        let registry = Arc::clone(&registry);
        metrics.set_export_check(move |name| registry.get(name).is_some());
    }
    let store_url = match &settings.backup_store {
        Some(url) => url.clone(),
        None => BackupStore::default_url(&settings.data_dir)?,
    };
    let backups = Backups::open(
        &settings.data_dir,
        BackupConfig {
            store_url,
            s3: settings.backup_s3.clone(),
            upload_concurrency: settings.backup_upload_concurrency,
            rate_limit_bytes_per_sec: settings.backup_rate_limit_bytes_per_sec,
            zstd_level: DEFAULT_ZSTD_LEVEL,
        },
        Arc::clone(&registry),
        Arc::clone(&metrics),
        shutdown.clone(),
    )
    .context("opening the backup store")?;
    backups.spawn_metrics_updates();
    tracing::info!(url = backups.store_url(), "backup store");
    let servers =
        Arc::new(Servers::open(&settings.data_dir).context("reading the servers (volume groups)")?);
    {
        let servers = Arc::clone(&servers);
        backups.know_servers(move |name| servers.get(name).is_ok());
    }
    backups.resume().await;
    let policies = Policies::open(&settings.data_dir, Arc::new(SystemClock))
        .context("reading the backup policies")?
        .with_metrics(Arc::clone(metrics.policy()));
    let policy_runner: Arc<dyn Runner> = Arc::new(PolicyRunner {
        backups: Arc::clone(&backups),
        servers: Arc::clone(&servers),
    });
    policies.spawn(Arc::clone(&policy_runner), shutdown.clone());
    let access = Arc::new(
        AccessStore::open(&settings.data_dir, settings.access.clone())
            .context("reading the volume access rules")?,
    );
    prune_access_rules(&access, &registry);
    let admin_context = Arc::new(AdminContext {
        registry: Arc::clone(&registry),
        access: Arc::clone(&access),
        tls_mode: settings.tls.as_ref().map_or(TlsMode::Off, |tls| tls.mode),
        client_certificates: settings
            .tls
            .as_ref()
            .is_some_and(|tls| tls.paths.ca.is_some()),
        backups,
        servers,
        policies,
        policy_runner,
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
        metrics: Arc::clone(&metrics),
    });
    // Handlers go in before anyone is told we are ready, so an early SIGTERM is a clean stop.
    let signals = Signals::install().context("installing SIGTERM/SIGINT/SIGHUP handlers")?;
    tokio::spawn(signals.wait(
        shutdown.clone(),
        Reloadable {
            tls: tls.clone(),
            access: Arc::clone(&access),
            args,
            running: settings.clone(),
        },
    ));
    let serve_metrics = async {
        if let Some(listener) = metrics_listener {
            if let Some(addr) = metrics_addr {
                tracing::info!(url = %format!("http://{addr}/metrics"), "serving metrics");
            }
            listener.run(Arc::clone(&metrics), shutdown.clone()).await;
        }
    };
    let connection_threads = settings.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let threads = Arc::new(
        ConnectionThreads::start(connection_threads, &metrics)
            .context("starting connection threads")?,
    );
    // Ready once nothing left can fail the start.
    announce(&settings, &listeners, metrics_addr, &registry)?;

    systemd::ready(&format!(
        "serving {} volume(s), {} I/O",
        registry.list().len(),
        admin_context.io_engine.kind()
    ));

    let server = Server {
        registry,
        metrics: Arc::clone(&metrics),
        config: Arc::new(ConnectionConfig {
            handshake_timeout: settings.handshake_timeout,
            handshake: HandshakeConfig {
                tls: settings.tls.as_ref().map_or(TlsMode::Off, |tls| tls.mode),
                ..HandshakeConfig::default()
            },
            tls,
            access,
            transmission: TransmissionConfig {
                max_inflight_requests: settings.max_inflight_requests,
                max_inflight_bytes: settings.max_inflight_bytes,
                idle_timeout: settings.idle_timeout,
                payload_wait: Duration::from_micros(settings.payload_wait_us),
            },
        }),
        max_connections: settings.max_connections,
        shutdown_grace: settings.shutdown_grace,
        tcp_congestion: settings.tcp_congestion.clone(),
        threads,
    };
    tokio::join!(
        async {
            server.run(listeners, shutdown.clone()).await;
            served.cancel();
        },
        admin.run(admin_context, settings.admin_idle_timeout, shutdown.clone()),
        serve_metrics
    );
    tracing::info!("stopped");
    Ok(())
}

/// Logs the URIs to use and writes the ready file.
fn announce(
    settings: &Settings,
    listeners: &Listeners,
    metrics: Option<std::net::SocketAddr>,
    registry: &Registry,
) -> anyhow::Result<()> {
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
    if let Some(path) = &settings.ready_file {
        let ready = serde_json::json!({
            "tcp": tcp.map(|a| a.to_string()),
            "unix": unix.map(|p| p.display().to_string()),
            "metrics": metrics.map(|a| a.to_string()),
            "pid": std::process::id(),
        });
        storage::manifest::write_durably(path, ready.to_string().as_bytes())
            .with_context(|| format!("writing ready file {}", path.display()))?;
    }
    Ok(())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// SIGTERM/SIGINT stop the daemon; SIGHUP re-reads the TLS files (new handshakes use them,
    /// open connections keep theirs) and the config file's access rules.
    async fn wait(mut self, shutdown: CancellationToken, reloadable: Reloadable) {
        loop {
            tokio::select! {
                _ = self.term.recv() => {
                    tracing::info!("SIGTERM received");
                    break;
                }
                _ = self.int.recv() => {
                    tracing::info!("SIGINT received");
                    break;
                }
                _ = self.hup.recv() => {
                    reload_tls(reloadable.tls.as_deref());
                    reload_access(&reloadable);
                }
            }
        }
        systemd::stopping();
        shutdown.cancel();
    }
}

/// What SIGHUP re-reads.
struct Reloadable {
    tls: Option<Arc<TlsContext>>,
    access: Arc<AccessStore>,
    /// The flags and settings the daemon started with: a reload checks the file under the
    /// same flags and compares with these.
    args: Args,
    running: Settings,
}

fn reload_access(reloadable: &Reloadable) {
    let Some(path) = &reloadable.running.config_file else {
        return;
    };
    let reloaded = match settings::reload(&reloadable.args, path, &reloadable.running) {
        Ok(reloaded) => reloaded,
        Err(error) => {
            tracing::error!(config = %path.display(), %error, "SIGHUP: the config file is refused (the next start would refuse it too); keeping the old access rules");
            return;
        }
    };
    if reloaded.restart_needed {
        tracing::warn!(config = %path.display(), "SIGHUP: settings other than the access rules changed; they take effect at the next start");
    }
    let volumes = reloaded.access.len();
    match reloadable.access.replace_config(reloaded.access) {
        Ok(()) => {
            tracing::info!(config = %path.display(), volumes, "SIGHUP: access rules reloaded")
        }
        Err(error) => {
            tracing::error!(%error, "SIGHUP: access rules refused; keeping the old ones")
        }
    }
}

/// Drops admin-set rules of volumes that no longer exist (a delete interrupted before it
/// forgot them), so a new volume of that name starts open. A volume that failed to load
/// (an I/O error, a manifest of a newer version) still exists: dropping its rules would serve
/// it open to everyone once it loads again.
fn prune_access_rules(access: &AccessStore, registry: &Registry) {
    for (volume, _, source) in access.list() {
        let exists = registry.get(&volume).is_some() || registry.unloaded().contains(&volume);
        if source == PolicySource::Admin && !exists {
            if let Err(error) = access.forget(&volume) {
                tracing::warn!(%volume, %error, "dropping the access rules of a missing volume failed");
            }
        }
    }
}

fn reload_tls(tls: Option<&TlsContext>) {
    let Some(tls) = tls else {
        tracing::info!("SIGHUP received; TLS is off, nothing to reload");
        return;
    };
    match tls.reload() {
        Ok(()) => {
            tracing::info!(cert = %tls.paths().cert.display(), "SIGHUP: TLS credentials reloaded")
        }
        Err(error) => {
            tracing::error!(%error, "SIGHUP: reloading TLS credentials failed; keeping the old ones")
        }
    }
}
