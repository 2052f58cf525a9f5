//! Listeners, the accept loops, the connection limit and graceful shutdown.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept_failures::AcceptFailures;
use crate::access::ClientAddr;
use crate::activation::InheritedUnix;
use crate::metrics::{Limit, Metrics};
use crate::nbd::connection::{self, Client, ConnectionConfig};
use crate::nbd::shutdown::Shutdown;
use crate::nbd::stream::{Handoff, Transport};
use crate::nbd::tcp_congestion::{self, TcpCongestion};
use crate::nbd::threads::ConnectionThreads;
use crate::nbd::unix_buffer;
use crate::storage::Registry;

/// How long, once the grace period ran out, connections get to see their requests in flight
/// through (replies dropped) before the final flush goes ahead without them.
const GIVE_UP_WAIT: Duration = Duration::from_secs(5);

/// Where the server listens.
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<BoundUnix>,
}

/// The mode of the NBD Unix socket evsd binds itself.
const NBD_SOCKET_MODE: u32 = 0o660;

pub struct BoundUnix {
    pub listener: UnixListener,
    pub socket_file: SocketFile,
}

/// A Unix socket's path and, when we bound it, its inode, so shutdown never removes a file a
/// newer daemon bound since.
pub struct SocketFile {
    pub path: PathBuf,
    /// None for a socket the service manager bound: the file is its to keep or remove.
    inode: Option<u64>,
}

impl SocketFile {
    /// Binds a Unix socket at `path`, replacing a socket file a killed daemon left behind;
    /// refused while a live server listens on it.
    pub fn bind(path: PathBuf) -> std::io::Result<(UnixListener, SocketFile)> {
        // A socket file left by a killed daemon would make bind fail with EADDRINUSE.
        if std::fs::symlink_metadata(&path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            if someone_listens(&path)? {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "{} is in use: another process accepts connections on it",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        let inode = std::fs::metadata(&path)?.ino();
        Ok((
            listener,
            SocketFile {
                path,
                inode: Some(inode),
            },
        ))
    }

    /// A socket passed by the service manager: reported, never removed.
    pub fn inherited(path: PathBuf) -> SocketFile {
        SocketFile { path, inode: None }
    }

    pub fn remove(&self) {
        let Some(inode) = self.inode else {
            return;
        };
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether a process listens on the socket file at `path`. Replacing the file would take its
/// path from a running server, whose clients would then reach us instead. Only a refused
/// connect means a stale file: a listener with a full backlog answers EAGAIN (the connect does
/// not block), one we may not write to EACCES, one of another socket type EPROTOTYPE.
fn someone_listens(path: &Path) -> std::io::Result<bool> {
    let addr = socket2::SockAddr::unix(path)?;
    let socket = socket2::Socket::new(
        socket2::Domain::UNIX,
        socket2::Type::STREAM.nonblocking(),
        None,
    )?;
    Ok(match socket.connect(&addr) {
        Ok(()) => true,
        Err(e) => !matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT)),
    })
}

impl Listeners {
    pub async fn bind(
        tcp: Option<SocketAddr>,
        unix: Option<PathBuf>,
    ) -> std::io::Result<Listeners> {
        let tcp = match tcp {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let unix = match unix {
            Some(path) => {
                let (listener, socket_file) = SocketFile::bind(path)?;
                // Clients in the daemon's group may connect, whatever the umask (the service
                // runs with 0077), as through the socket unit's SocketMode=0660.
                std::fs::set_permissions(
                    &socket_file.path,
                    std::os::unix::fs::PermissionsExt::from_mode(NBD_SOCKET_MODE),
                )?;
                Some(BoundUnix {
                    listener,
                    socket_file,
                })
            }
            None => None,
        };
        Ok(Listeners { tcp, unix })
    }

    /// Serves on the listeners the service manager passed instead of binding any.
    pub fn from_inherited(
        tcp: Option<std::net::TcpListener>,
        unix: Option<InheritedUnix>,
    ) -> std::io::Result<Listeners> {
        let tcp = tcp.map(TcpListener::from_std).transpose()?;
        let unix = match unix {
            Some(inherited) => Some(BoundUnix {
                listener: UnixListener::from_std(inherited.listener)?,
                socket_file: SocketFile::inherited(inherited.path),
            }),
            None => None,
        };
        Ok(Listeners { tcp, unix })
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }
}

pub struct Server {
    pub registry: Arc<Registry>,
    pub config: Arc<ConnectionConfig>,
    pub metrics: Arc<Metrics>,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub tcp_congestion: TcpCongestion,
    pub threads: Arc<ConnectionThreads>,
}

impl Server {
    /// Accepts clients until `shutdown` fires, then stops accepting, lets connections answer
    /// what they already received, and flushes every volume.
    pub async fn run(self, listeners: Listeners, shutdown: CancellationToken) {
        let shutdown = Shutdown {
            stop: shutdown,
            give_up: CancellationToken::new(),
        };
        let tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(self.max_connections));
        if let Some(tcp) = listeners.tcp {
            let ctx = self.accept_context(&limit, &tracker, &shutdown);
            tracker.spawn(accept_tcp(tcp, ctx, self.tcp_congestion.clone()));
        }
        if let Some(unix) = listeners.unix {
            let ctx = self.accept_context(&limit, &tracker, &shutdown);
            tracker.spawn(accept_unix(unix, ctx));
        }
        shutdown.stop.cancelled().await;
        tracing::info!("shutting down: no new connections, finishing requests in flight");
        tracker.close();
        if tokio::time::timeout(self.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_secs = self.shutdown_grace.as_secs(),
                "connections still open after the grace period: their unsent replies are dropped"
            );
            shutdown.give_up.cancel();
            if tokio::time::timeout(GIVE_UP_WAIT, tracker.wait())
                .await
                .is_err()
            {
                tracing::error!(
                    wait_secs = GIVE_UP_WAIT.as_secs(),
                    "requests still in flight after the grace period: flushing without them"
                );
            }
        }
        match self.registry.stop_all().await {
            Ok(()) => tracing::info!("final flush done"),
            Err(e) => tracing::error!(error = %e, "final flush failed"),
        }
        // After the flush: work the connections spawned (a map being persisted) may still run
        // on their threads until then.
        let threads = Arc::clone(&self.threads);
        let _ = tokio::task::spawn_blocking(move || threads.stop()).await;
    }

    fn accept_context(
        &self,
        limit: &Arc<Semaphore>,
        tracker: &TaskTracker,
        shutdown: &Shutdown,
    ) -> AcceptContext {
        AcceptContext {
            registry: Arc::clone(&self.registry),
            config: Arc::clone(&self.config),
            metrics: Arc::clone(&self.metrics),
            limit: Arc::clone(limit),
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            threads: Arc::clone(&self.threads),
        }
    }
}

struct AcceptContext {
    registry: Arc<Registry>,
    config: Arc<ConnectionConfig>,
    metrics: Arc<Metrics>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: Shutdown,
    threads: Arc<ConnectionThreads>,
}

impl AcceptContext {
    /// Starts serving a connection if a slot is free; otherwise closes it at once. The permit
    /// travels with the task, so the slot frees itself however the connection ends.
    /// It runs on the connection thread serving the fewest connections.
    fn admit<S: Transport + Handoff>(&self, stream: S, client: Client) {
        let peer = client.peer.clone();
        let Ok(permit) = Arc::clone(&self.limit).try_acquire_owned() else {
            self.metrics.connection_refused("limit");
            self.metrics.limit_hit(Limit::Connections, &peer);
            return;
        };
        let detached = match stream.detach() {
            Ok(detached) => detached,
            Err(error) => {
                tracing::warn!(%peer, %error, "could not hand the connection to a thread");
                return;
            }
        };
        self.metrics.connection_accepted();
        let registry = Arc::clone(&self.registry);
        let config = Arc::clone(&self.config);
        let metrics = Arc::clone(&self.metrics);
        let shutdown = self.shutdown.clone();
        let (runtime, seat) = self.threads.assign();
        let serve = async move {
            match S::attach(detached) {
                Ok(stream) => {
                    connection::serve(stream, client, registry, config, metrics, shutdown).await
                }
                Err(error) => tracing::warn!(%peer, %error, "could not register the connection"),
            }
            drop((permit, seat));
        };
        self.tracker.spawn_on(serve, &runtime);
    }
}

async fn accept_tcp(listener: TcpListener, ctx: AcceptContext, congestion: TcpCongestion) {
    let mut failures = AcceptFailures::new("nbd tcp");
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                // Before any switch: BBR's pacing outlives it (see `nbd::sendfile`).
                let paced_from_the_start = tcp_congestion::paces(&stream);
                if let Ok(local) = stream.local_addr() {
                    congestion.apply_to_connection(&stream, addr.ip(), local.ip());
                }
                let client = Client {
                    peer: addr.to_string(),
                    addr: ClientAddr::tcp(addr.ip()),
                    may_send_files: !paced_from_the_start,
                };
                ctx.admit(stream, client);
            }
            Err(e) => failures.failed(e).await,
        }
    }
}

async fn accept_unix(
    BoundUnix {
        listener,
        socket_file,
    }: BoundUnix,
    ctx: AcceptContext,
) {
    let mut failures = AcceptFailures::new("nbd unix");
    let mut sequence: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.stop.cancelled() => {
                // Gone before the listener, while nobody else can have bound the path (a
                // daemon starting would find us listening): removed after the grace period,
                // it could be another daemon's socket by then.
                socket_file.remove();
                return;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                unix_buffer::enlarge_send_buffer(&stream);
                sequence += 1;
                let client = Client {
                    peer: format!("unix#{sequence}"),
                    addr: ClientAddr::Unix,
                    may_send_files: true,
                };
                ctx.admit(stream, client);
            }
            Err(e) => failures.failed(e).await,
        }
    }
}
