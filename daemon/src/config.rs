//! Command-line settings.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::io::EngineKind;

#[derive(Debug, Parser)]
#[command(
    name = "evsd",
    version,
    about = "Serves block volumes (EVS disks) over NBD"
)]
pub struct Args {
    /// TCP address to listen on, or "off".
    #[arg(long, default_value = "127.0.0.1:10809", value_name = "ADDR:PORT|off")]
    pub listen: String,

    /// Also listen on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,

    /// Where volumes live.
    #[arg(long, default_value = "./evs-data", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// Admin socket for evsctl (mode 0600) [default: DATA_DIR/admin.sock].
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,

    /// Do not create the 1 GiB volume `vol0` on a first start with no volumes.
    #[arg(long)]
    pub no_default_volume: bool,

    /// Create this volume at start if it does not exist (repeatable), e.g. `vol1:256M`.
    #[arg(long = "create-volume", value_name = "NAME:SIZE")]
    pub create_volumes: Vec<String>,

    /// Disk I/O engine; by default io_uring, falling back to threads when unavailable.
    #[arg(long, value_name = "uring|threads")]
    pub io_engine: Option<EngineKind>,

    /// Number of io_uring threads.
    #[arg(long, default_value_t = 1)]
    pub ring_threads: usize,

    /// Threads running connections (default: one per core).
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,

    /// Microseconds an io_uring thread polls for more work before sleeping (0: never).
    #[arg(long, default_value_t = 0)]
    pub ring_spin_us: u64,

    /// Send every read and write through the I/O engine, even page-cache hits that
    /// preadv2/pwritev2 with RWF_NOWAIT would complete inline without blocking.
    #[arg(long)]
    pub no_inline_cached_io: bool,

    /// Write a JSON file with the bound addresses and pid once listening.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,

    /// Most client connections served at once; more are closed at accept.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,

    /// Requests one connection may have in flight before the server stops reading from it.
    #[arg(long, default_value_t = 256)]
    pub max_inflight_requests: usize,

    /// MiB of read/write data one connection may hold in flight (one request always runs).
    #[arg(long, default_value_t = 256)]
    pub max_inflight_mib: u64,

    /// A client that has not finished the handshake by then is disconnected.
    #[arg(long, default_value_t = 30)]
    pub handshake_timeout_secs: u64,

    /// How long shutdown waits for connections to finish their requests.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Log format: human or json.
    #[arg(long, default_value = "human", value_name = "human|json")]
    pub log_format: String,
}

impl Args {
    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }

    pub fn tcp_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.listen == "off" {
            return Ok(None);
        }
        let addr = self
            .listen
            .parse()
            .map_err(|e| anyhow::anyhow!("--listen {:?} is not ADDR:PORT: {e}", self.listen))?;
        Ok(Some(addr))
    }

    /// `NAME:SIZE` pairs from `--create-volume`.
    pub fn volumes_to_create(&self) -> anyhow::Result<Vec<(String, u64)>> {
        self.create_volumes
            .iter()
            .map(|spec| {
                let (name, size) = spec
                    .rsplit_once(':')
                    .ok_or_else(|| anyhow::anyhow!("--create-volume {spec:?} is not NAME:SIZE"))?;
                Ok((name.to_owned(), crate::storage::parse_size_bytes(size)?))
            })
            .collect()
    }
}
