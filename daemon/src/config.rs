//! Command-line flags. Every setting is optional here so a flag left out falls back to the
//! config file and then to the default; `settings` does that merge.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "evsd",
    version,
    about = "Serves block volumes (EVS disks) over NBD"
)]
pub struct Args {
    /// TOML config file; flags given on the command line override its values.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Print a complete, commented config file with every default, then exit.
    #[arg(long)]
    pub print_default_config: bool,

    /// TCP address to listen on, or "off" [default: 127.0.0.1:10809].
    #[arg(long, value_name = "ADDR:PORT|off")]
    pub listen: Option<String>,

    /// Also listen on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,

    /// Where volumes live [default: ./evs-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Admin socket for evsctl (mode 0600) [default: DATA_DIR/admin.sock].
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,

    /// Do not create the 1 GiB volume `vol0` on a first start with no volumes.
    #[arg(long)]
    pub no_default_volume: bool,

    /// Create this volume at start if it does not exist (repeatable), e.g. `vol1:256M`.
    /// Replaces the config file's `create_volumes` list when given.
    #[arg(long = "create-volume", value_name = "NAME:SIZE")]
    pub create_volumes: Vec<String>,

    /// Disk I/O engine; by default io_uring, falling back to threads when unavailable.
    #[arg(long, value_name = "uring|threads")]
    pub io_engine: Option<String>,

    /// TCP congestion control for client connections: "auto" serves clients on this host with
    /// cubic (or reno) instead of BBR, whose pacing reorders loopback traffic; "system" keeps
    /// the system's algorithm; a name (e.g. "cubic") is used for every connection, and the
    /// start fails if the kernel refuses it [default: auto].
    #[arg(long, value_name = "auto|system|NAME")]
    pub tcp_congestion: Option<String>,

    /// Number of io_uring threads [default: 1].
    #[arg(long, value_name = "N")]
    pub ring_threads: Option<usize>,

    /// Threads serving NBD connections, each with an event loop of its own; a connection stays on
    /// the thread serving the fewest when it arrived (default: one per core).
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,

    /// Microseconds an io_uring thread polls for more work before sleeping (0: never) [default: 0].
    #[arg(long, value_name = "US")]
    pub ring_spin_us: Option<u64>,

    /// Send every read and write through the I/O engine, even page-cache hits that
    /// preadv2/pwritev2 with RWF_NOWAIT would complete inline without blocking, and small
    /// writes done inline where the filesystem has no non-blocking buffered writes.
    #[arg(long)]
    pub no_inline_cached_io: bool,

    /// Microseconds a thread serving a single Unix-socket connection polls it for the rest of a
    /// large WRITE payload it receives into the page cache, before sleeping (0: never)
    /// [default: 50].
    #[arg(long, value_name = "US")]
    pub payload_wait_us: Option<u64>,

    /// Write a JSON file with the bound addresses and pid once listening.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,

    /// Most client connections served at once; more are closed at accept [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Requests one connection may have in flight before the server stops reading from it
    /// [default: 256].
    #[arg(long, value_name = "N")]
    pub max_inflight_requests: Option<usize>,

    /// MiB of read/write data one connection may hold in flight (one request always runs)
    /// [default: 256].
    #[arg(long, value_name = "MIB")]
    pub max_inflight_mib: Option<u64>,

    /// A client that has not finished the handshake by then is disconnected [default: 30].
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout_secs: Option<u64>,

    /// Close a connection that has had no request in flight, no reply to send and nothing
    /// received for this long, or whose client took no byte of its waiting replies that long;
    /// 0 for never [default: 0].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout_secs: Option<u64>,

    /// How long shutdown waits for connections to finish their requests [default: 30].
    #[arg(long, value_name = "SECS")]
    pub shutdown_grace_secs: Option<u64>,

    /// Close an admin-socket client that sends no request for this long, or does not read a
    /// response for this long [default: 300].
    #[arg(long, value_name = "SECS")]
    pub admin_idle_timeout_secs: Option<u64>,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics, or "off" [default: 127.0.0.1:9810].
    #[arg(long, value_name = "ADDR:PORT|off")]
    pub metrics_listen: Option<String>,

    /// Where backups are stored: file:///DIR or s3://BUCKET/PREFIX (S3 endpoint, region and
    /// credentials from the AWS_* environment variables or the config file)
    /// [default: file://DATA_DIR/backups].
    #[arg(long, value_name = "URL")]
    pub backup_store: Option<String>,

    /// Chunks a backup, restore or verify job transfers at once [default: 4].
    #[arg(long, value_name = "N")]
    pub backup_upload_concurrency: Option<usize>,

    /// Upload bandwidth limit for backups in MiB/s, 0 for none [default: 0].
    #[arg(long, value_name = "MIB")]
    pub backup_rate_limit_mib_per_sec: Option<u64>,

    /// STARTTLS: "off" refuses it, "on" offers it, "require" refuses every other option until
    /// TLS is up [default: off].
    #[arg(long, value_name = "off|on|require")]
    pub tls: Option<String>,

    /// Server certificate chain (PEM), needed when --tls is on or require.
    #[arg(long, value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,

    /// Server private key (PEM).
    #[arg(long, value_name = "PATH")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM); when set, clients must present a certificate signed by one.
    #[arg(long, value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,

    /// Log format: human or json [default: human].
    #[arg(long, value_name = "human|json")]
    pub log_format: Option<String>,
}
