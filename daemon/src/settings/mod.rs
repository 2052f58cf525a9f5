//! Resolves the settings evsd runs with: command-line flag, else config file, else default.

mod file;
mod template;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use file::{ConfigFileError, FileConfig};
pub use template::DEFAULT_CONFIG;

use crate::access::{AccessError, AccessPolicy};
use crate::backup::store::S3Options;
use crate::config::Args;
use crate::error::StorageError;
use crate::io::EngineKind;
use crate::nbd::tcp_congestion::TcpCongestion;
use crate::nbd::tls::TlsPaths;
use evsd_proto::TlsMode;

const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
const DEFAULT_DATA_DIR: &str = "./evs-data";
const DEFAULT_RING_THREADS: usize = 1;
const DEFAULT_RING_SPIN_US: u64 = 0;
/// About two refills of a Unix socket's send buffer by a client on another core (see
/// `nbd::payload_wait`); 20 µs gained a third as much, 100 µs no more.
const DEFAULT_PAYLOAD_WAIT_US: u64 = 50;
const DEFAULT_MAX_CONNECTIONS: usize = 1024;
const DEFAULT_MAX_INFLIGHT_REQUESTS: usize = 256;
const DEFAULT_MAX_INFLIGHT_MIB: u64 = 256;
const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 30;
const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
const DEFAULT_ADMIN_IDLE_TIMEOUT_SECS: u64 = 300;
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9810";
const DEFAULT_BACKUP_UPLOAD_CONCURRENCY: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    File(#[from] ConfigFileError),
    #[error("{key} {value:?} is not ADDR:PORT or \"off\": {source}")]
    Address {
        key: &'static str,
        value: String,
        source: std::net::AddrParseError,
    },
    #[error("io_engine {value:?}: {message}")]
    Engine { value: String, message: String },
    #[error("tcp_congestion {value:?}: {message}")]
    TcpCongestion { value: String, message: String },
    #[error("create_volumes entry {spec:?} is not NAME:SIZE")]
    VolumeSpec { spec: String },
    #[error("create_volumes entry {spec:?}: {source}")]
    VolumeSize { spec: String, source: StorageError },
    #[error("log_format {value:?}: use \"human\" or \"json\"")]
    LogFormat { value: String },
    #[error("tls {value:?}: use \"off\", \"on\" or \"require\"")]
    TlsMode { value: String },
    #[error("tls = {mode:?} needs {key}")]
    TlsMissing { mode: String, key: &'static str },
    #[error("[access.{volume}]: {source}")]
    Access { volume: String, source: AccessError },
    #[error("[access.{0}]: not a valid volume name")]
    AccessVolume(String),
    #[error("{key} = {value} is out of range: at most {max}")]
    OutOfRange {
        key: &'static str,
        value: u64,
        max: u64,
    },
}

/// Upper bounds of numeric settings: past them a value is a typo, and some would overflow a
/// deadline (`Instant + secs` panics) or a semaphore, or start that many threads.
const MAX_CONNECTIONS: u64 = 1 << 20;
const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;
const MAX_RING_THREADS: u64 = 64;
const MAX_WORKER_THREADS: u64 = 1024;
const MAX_RING_SPIN_US: u64 = 1_000_000;
const MAX_PAYLOAD_WAIT_US: u64 = 10_000;
const MAX_INFLIGHT_REQUESTS: u64 = 1 << 16;
const MAX_UPLOAD_CONCURRENCY: u64 = 1024;

/// `value` when it is at most `max`.
fn at_most<T: Copy + Into<u64>>(
    key: &'static str,
    value: Option<T>,
    max: u64,
) -> Result<Option<T>, SettingsError> {
    match value {
        Some(v) if v.into() > max => Err(SettingsError::OutOfRange {
            key,
            value: v.into(),
            max,
        }),
        other => Ok(other),
    }
}

/// As [`at_most`] for `usize` settings.
fn at_most_usize(
    key: &'static str,
    value: Option<usize>,
    max: u64,
) -> Result<Option<usize>, SettingsError> {
    at_most(key, value.map(|v| v as u64), max).map(|v| v.map(|v| v as usize))
}

/// TLS settings when `tls` is not "off".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: TlsMode,
    pub paths: TlsPaths,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Everything evsd runs with, resolved and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// None: no TCP listener.
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub create_default_volume: bool,
    pub create_volumes: Vec<(String, u64)>,
    /// None: io_uring, falling back to threads.
    pub io_engine: Option<EngineKind>,
    pub tcp_congestion: TcpCongestion,
    pub ring_threads: usize,
    pub ring_spin_us: u64,
    pub inline_cached_io: bool,
    pub payload_wait_us: u64,
    pub worker_threads: Option<usize>,
    pub ready_file: Option<PathBuf>,
    pub max_connections: usize,
    pub max_inflight_requests: usize,
    pub max_inflight_bytes: u64,
    pub handshake_timeout: Duration,
    /// None: idle connections stay open.
    pub idle_timeout: Option<Duration>,
    pub shutdown_grace: Duration,
    /// An admin client idle (no request, or a response unread) this long is disconnected.
    pub admin_idle_timeout: Duration,
    /// None: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// None: `file://DATA_DIR/backups`.
    pub backup_store: Option<String>,
    pub backup_upload_concurrency: usize,
    /// None: no limit.
    pub backup_rate_limit_bytes_per_sec: Option<u64>,
    pub backup_s3: S3Options,
    /// None: TLS off, STARTTLS refused.
    pub tls: Option<TlsSettings>,
    /// Access rules from the config file's `[access.VOLUME]` tables.
    pub access: BTreeMap<String, AccessPolicy>,
    /// Re-read on SIGHUP for its access rules.
    pub config_file: Option<PathBuf>,
}

impl Settings {
    /// Reads `--config` if given and merges it under the flags.
    pub fn resolve(args: &Args) -> Result<Settings, SettingsError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Settings::merge(args, file)
    }

    pub fn merge(args: &Args, mut file: FileConfig) -> Result<Settings, SettingsError> {
        let listen = args
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let metrics_listen = args
            .metrics_listen
            .clone()
            .or(file.metrics_listen)
            .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.to_owned());
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let admin_socket = args
            .admin_socket
            .clone()
            .or(file.admin_socket)
            .unwrap_or_else(|| data_dir.join("admin.sock"));
        let create_volumes = if args.create_volumes.is_empty() {
            file.create_volumes.unwrap_or_default()
        } else {
            args.create_volumes.clone()
        };
        let io_engine = match args.io_engine.clone().or(file.io_engine) {
            Some(value) => Some(
                value
                    .parse::<EngineKind>()
                    .map_err(|message| SettingsError::Engine { value, message })?,
            ),
            None => None,
        };
        let tcp_congestion = match args.tcp_congestion.clone().or(file.tcp_congestion) {
            Some(value) => value
                .parse::<TcpCongestion>()
                .map_err(|message| SettingsError::TcpCongestion { value, message })?,
            None => TcpCongestion::default(),
        };
        let log_format = match args.log_format.as_deref().or(file.log_format.as_deref()) {
            None | Some("human") => LogFormat::Human,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(SettingsError::LogFormat {
                    value: other.to_owned(),
                })
            }
        };
        let access_tables = file.access.take();
        let tls = resolve_tls(
            args.tls.clone().or(file.tls),
            args.tls_cert.clone().or(file.tls_cert),
            args.tls_key.clone().or(file.tls_key),
            args.tls_ca.clone().or(file.tls_ca),
        )?;
        let max_inflight_mib = args
            .max_inflight_mib
            .or(file.max_inflight_mib)
            .unwrap_or(DEFAULT_MAX_INFLIGHT_MIB)
            .max(1);
        Ok(Settings {
            listen: parse_listen("listen", listen)?,
            unix: args.unix.clone().or(file.unix),
            admin_socket,
            create_default_volume: !(args.no_default_volume
                || file.no_default_volume.unwrap_or(false)),
            create_volumes: create_volumes
                .into_iter()
                .map(parse_volume_spec)
                .collect::<Result<_, _>>()?,
            io_engine,
            tcp_congestion,
            ring_threads: at_most_usize(
                "ring_threads",
                args.ring_threads.or(file.ring_threads),
                MAX_RING_THREADS,
            )?
            .unwrap_or(DEFAULT_RING_THREADS)
            .max(1),
            ring_spin_us: at_most(
                "ring_spin_us",
                args.ring_spin_us.or(file.ring_spin_us),
                MAX_RING_SPIN_US,
            )?
            .unwrap_or(DEFAULT_RING_SPIN_US),
            inline_cached_io: !(args.no_inline_cached_io
                || file.no_inline_cached_io.unwrap_or(false)),
            payload_wait_us: at_most(
                "payload_wait_us",
                args.payload_wait_us.or(file.payload_wait_us),
                MAX_PAYLOAD_WAIT_US,
            )?
            .unwrap_or(DEFAULT_PAYLOAD_WAIT_US),
            worker_threads: at_most_usize(
                "worker_threads",
                args.worker_threads.or(file.worker_threads),
                MAX_WORKER_THREADS,
            )?
            .map(|n| n.max(1)),
            ready_file: args.ready_file.clone().or(file.ready_file),
            max_connections: at_most_usize(
                "max_connections",
                args.max_connections.or(file.max_connections),
                MAX_CONNECTIONS,
            )?
            .unwrap_or(DEFAULT_MAX_CONNECTIONS)
            .max(1),
            max_inflight_requests: at_most_usize(
                "max_inflight_requests",
                args.max_inflight_requests.or(file.max_inflight_requests),
                MAX_INFLIGHT_REQUESTS,
            )?
            .unwrap_or(DEFAULT_MAX_INFLIGHT_REQUESTS)
            .max(1),
            max_inflight_bytes: max_inflight_mib.saturating_mul(1 << 20),
            handshake_timeout: Duration::from_secs(
                at_most(
                    "handshake_timeout_secs",
                    args.handshake_timeout_secs.or(file.handshake_timeout_secs),
                    MAX_TIMEOUT_SECS,
                )?
                .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_SECS)
                // 0 would time every handshake out at once: never a way to turn it off.
                .max(1),
            ),
            idle_timeout: at_most(
                "idle_timeout_secs",
                args.idle_timeout_secs.or(file.idle_timeout_secs),
                MAX_TIMEOUT_SECS,
            )?
            .filter(|&secs| secs > 0)
            .map(Duration::from_secs),
            shutdown_grace: Duration::from_secs(
                at_most(
                    "shutdown_grace_secs",
                    args.shutdown_grace_secs.or(file.shutdown_grace_secs),
                    MAX_TIMEOUT_SECS,
                )?
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECS),
            ),
            admin_idle_timeout: Duration::from_secs(
                at_most(
                    "admin_idle_timeout_secs",
                    args.admin_idle_timeout_secs
                        .or(file.admin_idle_timeout_secs),
                    MAX_TIMEOUT_SECS,
                )?
                .unwrap_or(DEFAULT_ADMIN_IDLE_TIMEOUT_SECS)
                .max(1),
            ),
            metrics_listen: parse_listen("metrics_listen", metrics_listen)?,
            log_format,
            backup_store: args.backup_store.clone().or(file.backup_store),
            backup_upload_concurrency: at_most_usize(
                "backup_upload_concurrency",
                args.backup_upload_concurrency
                    .or(file.backup_upload_concurrency),
                MAX_UPLOAD_CONCURRENCY,
            )?
            .unwrap_or(DEFAULT_BACKUP_UPLOAD_CONCURRENCY)
            .max(1),
            backup_rate_limit_bytes_per_sec: args
                .backup_rate_limit_mib_per_sec
                .or(file.backup_rate_limit_mib_per_sec)
                .filter(|&mib| mib > 0)
                .map(|mib| mib.saturating_mul(1 << 20)),
            backup_s3: S3Options {
                endpoint: file.backup_s3_endpoint,
                region: file.backup_s3_region,
                access_key_id: file.backup_s3_access_key_id,
                secret_access_key: file.backup_s3_secret_access_key,
                allow_http: file.backup_s3_allow_http,
            },
            data_dir,
            tls,
            access: access_rules(access_tables)?,
            config_file: args.config.clone(),
        })
    }
}

/// The config file's `[access.VOLUME]` tables, checked.
pub fn access_rules(
    tables: Option<BTreeMap<String, AccessPolicy>>,
) -> Result<BTreeMap<String, AccessPolicy>, SettingsError> {
    let tables = tables.unwrap_or_default();
    for (volume, policy) in &tables {
        if crate::storage::name::validate_volume_name(volume).is_err() {
            return Err(SettingsError::AccessVolume(volume.clone()));
        }
        policy.validate().map_err(|source| SettingsError::Access {
            volume: volume.clone(),
            source,
        })?;
    }
    Ok(tables)
}

/// What a SIGHUP found in the config file.
#[derive(Debug)]
pub struct Reloaded {
    /// The access rules, which take effect now.
    pub access: BTreeMap<String, AccessPolicy>,
    /// Whether other settings differ from the running ones: they wait for a restart.
    pub restart_needed: bool,
}

/// Re-reads the config file (SIGHUP) and checks all of it, with the same flags, as a start
/// would: a file the next start would refuse is refused now, while the daemon that reads it
/// can still say so.
pub fn reload(
    args: &Args,
    path: &std::path::Path,
    running: &Settings,
) -> Result<Reloaded, SettingsError> {
    let mut next = Settings::merge(args, FileConfig::load(path)?)?;
    let access = std::mem::take(&mut next.access);
    let mut rest = running.clone();
    rest.access = BTreeMap::new();
    Ok(Reloaded {
        access,
        restart_needed: next != rest,
    })
}

fn resolve_tls(
    mode: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> Result<Option<TlsSettings>, SettingsError> {
    let value = mode.unwrap_or_else(|| "off".to_owned());
    let mode = match value.as_str() {
        "off" => return Ok(None),
        "on" => TlsMode::On,
        "require" => TlsMode::Require,
        _ => return Err(SettingsError::TlsMode { value }),
    };
    let missing = |key| SettingsError::TlsMissing {
        mode: value.clone(),
        key,
    };
    let cert = cert.ok_or_else(|| missing("tls_cert (--tls-cert)"))?;
    let key = key.ok_or_else(|| missing("tls_key (--tls-key)"))?;
    Ok(Some(TlsSettings {
        mode,
        paths: TlsPaths { cert, key, ca },
    }))
}

fn parse_listen(key: &'static str, value: String) -> Result<Option<SocketAddr>, SettingsError> {
    if value == "off" {
        return Ok(None);
    }
    match value.parse() {
        Ok(addr) => Ok(Some(addr)),
        Err(source) => Err(SettingsError::Address { key, value, source }),
    }
}

fn parse_volume_spec(spec: String) -> Result<(String, u64), SettingsError> {
    let Some((name, size)) = spec.rsplit_once(':') else {
        return Err(SettingsError::VolumeSpec { spec });
    };
    match crate::storage::parse_size_bytes(size) {
        Ok(size_bytes) => Ok((name.to_owned(), size_bytes)),
        Err(source) => Err(SettingsError::VolumeSize { spec, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(flags: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("evsd").chain(flags.iter().copied()))
            .unwrap_or_else(|e| panic!("{flags:?}: {e}"))
    }

    fn file(text: &str) -> FileConfig {
        FileConfig::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn default_config_round_trips_to_the_defaults() {
        let parsed = file(DEFAULT_CONFIG);
        let from_file = Settings::merge(&args(&[]), parsed).unwrap();
        let built_in = Settings::merge(&args(&[]), FileConfig::default()).unwrap();
        assert_eq!(from_file, built_in);
        assert_eq!(from_file.listen, Some("127.0.0.1:10809".parse().unwrap()));
        assert_eq!(
            from_file.metrics_listen,
            Some("127.0.0.1:9810".parse().unwrap())
        );
        assert_eq!(from_file.max_connections, 1024);
        assert_eq!(from_file.max_inflight_bytes, 256 << 20);
        assert_eq!(from_file.handshake_timeout, Duration::from_secs(30));
        assert_eq!(from_file.idle_timeout, None);
        assert_eq!(
            from_file.admin_socket,
            PathBuf::from("./evs-data/admin.sock")
        );
        assert!(from_file.create_default_volume && from_file.inline_cached_io);
        assert_eq!(from_file.payload_wait_us, 50);
    }

    #[test]
    fn the_payload_wait_comes_from_the_flag_over_the_file() {
        let from_file = Settings::merge(&args(&[]), file("payload_wait_us = 0\n")).unwrap();
        assert_eq!(from_file.payload_wait_us, 0);
        let flag = Settings::merge(
            &args(&["--payload-wait-us", "120"]),
            file("payload_wait_us = 0\n"),
        )
        .unwrap();
        assert_eq!(flag.payload_wait_us, 120);
    }

    #[test]
    fn default_config_names_every_key() {
        // Uncommenting the example lines must give a file that sets every key.
        let uncommented: String = DEFAULT_CONFIG
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| !k.contains(' '))
                        || rest.starts_with('[') =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let parsed = file(&uncommented);
        let debug = format!("{parsed:?}");
        assert!(
            !debug.contains("None"),
            "keys missing from the template: {debug}"
        );
        let settings = Settings::merge(&args(&[]), parsed).unwrap();
        assert_eq!(settings.io_engine, Some(EngineKind::Uring));
        assert_eq!(settings.worker_threads, Some(4));
        let vol0 = &settings.access["vol0"];
        assert_eq!(vol0.allow_networks.len(), 2);
        assert_eq!(vol0.max_connections, Some(16));
    }

    /// Values past a setting's bound are refused by name: they used to panic later (a
    /// semaphore of 2^62 permits, an idle deadline past the end of time).
    #[test]
    fn numbers_out_of_range_are_refused_with_the_key_named() {
        for (text, key) in [
            ("max_connections = 4611686018427387904\n", "max_connections"),
            (
                "idle_timeout_secs = 9223372036854775807\n",
                "idle_timeout_secs",
            ),
            (
                "handshake_timeout_secs = 31536001\n",
                "handshake_timeout_secs",
            ),
            ("shutdown_grace_secs = 99999999999\n", "shutdown_grace_secs"),
            ("ring_threads = 65\n", "ring_threads"),
            ("worker_threads = 100000\n", "worker_threads"),
            ("ring_spin_us = 1000001\n", "ring_spin_us"),
            ("payload_wait_us = 10001\n", "payload_wait_us"),
            ("max_inflight_requests = 65537\n", "max_inflight_requests"),
            (
                "backup_upload_concurrency = 1025\n",
                "backup_upload_concurrency",
            ),
        ] {
            let err = Settings::merge(&args(&[]), file(text))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(key) && err.contains("at most"),
                "{text}: {err}"
            );
        }
        let err = Settings::merge(
            &args(&["--idle-timeout-secs", "18446744073709551615"]),
            FileConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("idle_timeout_secs = 18446744073709551615"),
            "{err}"
        );
        // The bounds themselves are accepted.
        let ok =
            file("max_connections = 1048576\nidle_timeout_secs = 31536000\nring_threads = 64\n");
        let settings = Settings::merge(&args(&[]), ok).unwrap();
        assert_eq!(settings.max_connections, 1 << 20);
        assert_eq!(settings.idle_timeout, Some(Duration::from_secs(31_536_000)));
    }

    #[test]
    fn access_tables_are_checked_at_load() {
        let err =
            FileConfig::parse("[access.vol0]\nallow_networks = [\"10.0.0.0/33\"]\n").unwrap_err();
        assert!(err.contains("10.0.0.0/33"), "{err}");
        let err = FileConfig::parse("[access.vol0]\nread_only = true\nextra = 1\n").unwrap_err();
        assert!(err.contains("extra"), "{err}");
        let zero = file("[access.vol0]\nmax_connections = 0\n");
        let err = Settings::merge(&args(&[]), zero).unwrap_err().to_string();
        assert!(
            err.contains("[access.vol0]") && err.contains("max_connections"),
            "{err}"
        );
        let bad_name = file("[access.\"../x\"]\nread_only = true\n");
        let err = Settings::merge(&args(&[]), bad_name)
            .unwrap_err()
            .to_string();
        assert!(err.contains("../x"), "{err}");
    }

    #[test]
    fn tls_flags_override_the_file() {
        let cfg = "tls = \"on\"\ntls_cert = \"/f/cert.pem\"\ntls_key = \"/f/key.pem\"\n";
        let s = Settings::merge(&args(&[]), file(cfg)).unwrap();
        let tls = s.tls.unwrap();
        assert_eq!(tls.mode, TlsMode::On);
        assert_eq!(tls.paths.cert, PathBuf::from("/f/cert.pem"));
        assert_eq!(tls.paths.ca, None);
        let s = Settings::merge(
            &args(&[
                "--tls",
                "require",
                "--tls-ca",
                "/a/ca.pem",
                "--tls-key",
                "/a/k.pem",
            ]),
            file(cfg),
        )
        .unwrap();
        let tls = s.tls.unwrap();
        assert_eq!(tls.mode, TlsMode::Require);
        assert_eq!(tls.paths.key, PathBuf::from("/a/k.pem"));
        assert_eq!(tls.paths.ca, Some(PathBuf::from("/a/ca.pem")));
        let s = Settings::merge(&args(&["--tls", "off"]), file(cfg)).unwrap();
        assert_eq!(s.tls, None);
    }

    #[test]
    fn shipped_systemd_config_loads() {
        let shipped = file(include_str!("../../../systemd/evsd.toml"));
        let s = Settings::merge(&args(&[]), shipped).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/var/lib/evsd"));
        assert_eq!(s.admin_socket, PathBuf::from("/var/lib/evsd/admin.sock"));
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9810".parse().unwrap()));
    }

    #[test]
    fn unknown_key_is_named_in_the_error() {
        let err = FileConfig::parse("lisen = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.contains("lisen"), "{err}");
        let err = FileConfig::parse("max_connections = \"many\"\n").unwrap_err();
        assert!(err.contains("max_connections"), "{err}");
    }

    #[test]
    fn load_reports_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evsd.toml");
        std::fs::write(&path, "bogus_key = 1\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("evsd.toml") && err.contains("bogus_key"),
            "{err}"
        );
        let missing = FileConfig::load(&dir.path().join("nope.toml")).unwrap_err();
        assert!(missing.to_string().contains("nope.toml"), "{missing}");
    }

    #[test]
    fn file_overrides_default_and_flags_override_file() {
        let cfg = "listen = \"127.0.0.1:7000\"\nmax_connections = 5\n\
                   create_volumes = [\"a:1M\"]\nno_default_volume = true\ndata_dir = \"/srv/evs\"\n";
        let s = Settings::merge(&args(&[]), file(cfg)).unwrap();
        assert_eq!(s.listen, Some("127.0.0.1:7000".parse().unwrap()));
        assert_eq!(s.max_connections, 5);
        assert_eq!(s.create_volumes, vec![("a".to_owned(), 1 << 20)]);
        assert!(!s.create_default_volume);
        assert_eq!(s.admin_socket, PathBuf::from("/srv/evs/admin.sock"));

        let s = Settings::merge(
            &args(&[
                "--listen",
                "off",
                "--max-connections",
                "9",
                "--create-volume",
                "b:2M",
            ]),
            file(cfg),
        )
        .unwrap();
        assert_eq!(s.listen, None);
        assert_eq!(s.max_connections, 9);
        assert_eq!(s.create_volumes, vec![("b".to_owned(), 2 << 20)]);
        // Not overridden: still the file's.
        assert_eq!(s.data_dir, PathBuf::from("/srv/evs"));
    }

    #[test]
    fn idle_timeout_is_off_unless_set_above_zero() {
        let s = Settings::merge(&args(&[]), file("idle_timeout_secs = 600\n")).unwrap();
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(600)));
        let s = Settings::merge(
            &args(&["--idle-timeout-secs", "5"]),
            file("idle_timeout_secs = 600\n"),
        )
        .unwrap();
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(5)));
        let s = Settings::merge(
            &args(&["--idle-timeout-secs", "0"]),
            file("idle_timeout_secs = 600\n"),
        )
        .unwrap();
        assert_eq!(s.idle_timeout, None);
        let s = Settings::merge(&args(&[]), file("idle_timeout_secs = 0\n")).unwrap();
        assert_eq!(s.idle_timeout, None);
    }

    #[test]
    fn a_handshake_timeout_of_zero_is_one_second() {
        let s = Settings::merge(&args(&["--handshake-timeout-secs", "0"]), file("")).unwrap();
        assert_eq!(s.handshake_timeout, Duration::from_secs(1));
        let s = Settings::merge(&args(&[]), file("handshake_timeout_secs = 7\n")).unwrap();
        assert_eq!(s.handshake_timeout, Duration::from_secs(7));
    }

    #[test]
    fn invalid_values_name_key_and_value() {
        let err = Settings::merge(
            &args(&["--metrics-listen", "nowhere"]),
            FileConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("metrics_listen") && err.contains("nowhere"),
            "{err}"
        );
        let err = Settings::merge(&args(&[]), file("log_format = \"xml\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("xml"), "{err}");
        let err = Settings::merge(&args(&[]), file("create_volumes = [\"novolsize\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("novolsize"), "{err}");
        let err = Settings::merge(&args(&["--tls", "maybe"]), FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("maybe"), "{err}");
        let err = Settings::merge(&args(&["--tls", "require"]), FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls_cert") && err.contains("require"), "{err}");
        let err = Settings::merge(&args(&["--io-engine", "spdk"]), FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("spdk"), "{err}");
    }
}
