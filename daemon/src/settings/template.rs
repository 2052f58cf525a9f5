//! The output of `evsd --print-default-config`.

/// Every key at its default. Keys without a default are commented out with an example value.
pub const DEFAULT_CONFIG: &str = r#"# evsd configuration. Flags given on the command line override these values.

# TCP address for NBD clients, or "off" (then `unix` must be set).
listen = "127.0.0.1:10809"

# Also listen on this Unix socket.
# unix = "/run/evsd/nbd.sock"

# Where volumes live.
data_dir = "./evs-data"

# Admin socket for evsctl (mode 0600); default DATA_DIR/admin.sock.
# admin_socket = "/run/evsd/admin.sock"

# Do not create the 1 GiB volume `vol0` on a first start with no volumes.
no_default_volume = false

# Volumes created at start when missing, as "NAME:SIZE" (e.g. "vol1:256M").
# A --create-volume flag replaces this list.
create_volumes = []

# Disk I/O engine, "uring" or "threads"; by default io_uring, falling back to threads.
# io_engine = "uring"

# TCP congestion control for client connections. "auto" serves clients on this host (loopback
# or any address of the host) with cubic, or reno where cubic is not allowed, instead of BBR, whose
# pacing reorders loopback traffic and makes large reads resend data; "system" keeps the
# system's algorithm; a name such as "cubic" is used for every connection, and the start
# fails if the kernel refuses it. A socket passed by systemd is not changed itself: set
# TCPCongestion= in the socket unit for that.
tcp_congestion = "auto"

# Number of io_uring threads.
ring_threads = 1

# Threads serving NBD connections, each with an event loop of its own; a connection
# stays on the thread serving the fewest when it arrived. Default: one per core.
# worker_threads = 4

# Microseconds an io_uring thread polls for more work before sleeping (0: never).
ring_spin_us = 0

# Send every read and write through the I/O engine, even page-cache hits that
# RWF_NOWAIT would complete inline.
no_inline_cached_io = false

# Microseconds a thread serving a single Unix-socket connection polls it for the rest
# of a large WRITE payload it receives into the page cache, before sleeping (0: never).
payload_wait_us = 50

# JSON file with the bound addresses and pid, written once listening.
# ready_file = "/run/evsd/ready.json"

# Most client connections served at once; more are closed at accept.
max_connections = 1024

# Requests one connection may have in flight before the server stops reading from it.
max_inflight_requests = 256

# MiB of read/write data one connection may hold in flight.
max_inflight_mib = 256

# A client that has not finished the handshake by then is disconnected.
handshake_timeout_secs = 30

# A connection with no request in flight, no reply to send and nothing received for this many
# seconds is closed, and so is one whose client takes no byte of its waiting replies that long;
# 0 keeps idle connections open.
idle_timeout_secs = 0

# How long shutdown waits for connections to finish their requests. Connections still busy
# then get no more replies and are closed before the final flush.
shutdown_grace_secs = 30

# An admin-socket client that sends no request, or reads no response, for this many seconds is
# disconnected (at most 64 are served at once, and idle ones must not lock evsctl out).
admin_idle_timeout_secs = 300

# Prometheus metrics at http://ADDR:PORT/metrics, or "off".
metrics_listen = "127.0.0.1:9810"

# Log format: "human" or "json". Under systemd (JOURNAL_STREAM set) logs go to the journal.
log_format = "human"

# Where backups are stored: "file:///DIR" or "s3://BUCKET/PREFIX"; default file://DATA_DIR/backups.
# For S3 the endpoint, region and credentials come from the standard AWS_* environment
# variables (AWS_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_ALLOW_HTTP) unless set by the backup_s3_* keys below.
# backup_store = "s3://backups/evsd"

# Chunks a backup, restore or verify job transfers at once.
backup_upload_concurrency = 4

# Upload bandwidth limit for backups in MiB/s; 0 for none.
backup_rate_limit_mib_per_sec = 0

# S3 settings overriding the AWS_* environment variables.
# backup_s3_endpoint = "http://127.0.0.1:9000"
# backup_s3_region = "us-east-1"
# backup_s3_access_key_id = "AKIA..."
# backup_s3_secret_access_key = "..."
# backup_s3_allow_http = true

# STARTTLS: "off" refuses it (ERR_POLICY), "on" offers it, "require" answers every option but
# STARTTLS and ABORT with ERR_TLS_REQD until TLS is up. TLS 1.2 and 1.3, X.509 certificates.
# SIGHUP re-reads the certificate, key and CA files; open connections keep going.
tls = "off"

# Server certificate chain and private key (PEM), needed when tls is "on" or "require".
# tls_cert = "/etc/evsd/tls/server-cert.pem"
# tls_key = "/etc/evsd/tls/server-key.pem"

# CA certificates (PEM); when set, clients must present a certificate signed by one of them.
# tls_ca = "/etc/evsd/tls/ca-cert.pem"

# Per-volume access rules, one table per volume (these must come last in the file). A volume
# with no table is open to every client; one set here cannot be changed through the admin
# socket (evsctl access), and SIGHUP re-reads these tables. VOL@SNAP exports follow VOL.
# Client names are the subject CN or a DNS SAN of a certificate verified by tls_ca; listing any
# makes the volume TLS-only. Networks are addresses, CIDRs or "unix" (the NBD Unix socket);
# with both lists a client must match both. Others see the volume neither in LIST nor in GO
# (ERR_UNKNOWN, as if it did not exist).
# [access.vol0]
# allow_names = ["client-a.example"]
# allow_networks = ["10.0.0.0/8", "unix"]
# read_only = false
# tls_only = true
# max_connections = 16
"#;
