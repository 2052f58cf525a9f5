//! A real S3-compatible server on loopback for the backup tests: `s3s-fs`.
//!
//! [`S3Server::start`] runs `s3s-fs --host 127.0.0.1 --port PORT --access-key
//! [`ACCESS_KEY`] --secret-key [`SECRET_KEY`] ROOT` on a free port with a fresh
//! temporary root directory, in which the bucket [`BUCKET`] exists. s3s-fs
//! models a bucket as a directory under its root and an object as a plain file
//! `ROOT/BUCKET/KEY` (slashes in keys become subdirectories); its own metadata
//! sidecars and temporary files live directly in ROOT, never inside the bucket
//! directory. Everything stays on disk, so [`S3Server::stop`] followed by
//! [`S3Server::start_again`] (same port, same root) keeps every object, and
//! the tests can count, measure and corrupt objects by looking at the files.
//! SigV4 is enforced with the fixed test credentials; requests are path-style
//! (`http://127.0.0.1:PORT/BUCKET/KEY`).
//!
//! The daemon gets the connection settings as the AWS environment variables
//! that object_store's `AmazonS3Builder::from_env` reads ([`S3Server::env`]),
//! and the store URL from [`S3Server::url`].
//!
//! Binary lookup: `$EVSD_S3S_FS` if set, otherwise
//! `$EVSD_TEST_TOOLS/bin/s3s-fs` (default `$HOME/.cache/evsd-test-tools/bin/s3s-fs`,
//! where `scripts/install-test-deps.sh` installs the pinned version), otherwise
//! `s3s-fs` in `PATH`. Missing: a panic that says how to install it. Tests never skip.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The bucket every [`S3Server`] has.
pub const BUCKET: &str = "evsd-test";
/// Access key s3s-fs accepts (AWS_ACCESS_KEY_ID).
pub const ACCESS_KEY: &str = "EVSDTESTACCESSKEY";
/// Secret key s3s-fs accepts (AWS_SECRET_ACCESS_KEY).
pub const SECRET_KEY: &str = "evsd-test-secret-key-0123456789";
/// Region the clients sign for (s3s-fs accepts any).
pub const REGION: &str = "us-east-1";
/// The s3s-fs version scripts/install-test-deps.sh installs.
pub const S3S_FS_VERSION: &str = "0.14.1";

/// How long s3s-fs may take to accept connections (it needs ~15 ms).
const S3_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of the s3s-fs binary; panics with install instructions if missing.
pub fn s3s_fs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EVSD_S3S_FS") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "EVSD_S3S_FS={} does not exist or is not a file",
            p.display()
        );
        return p;
    }
    let root = std::env::var_os("EVSD_TEST_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache")
                .join("evsd-test-tools")
        });
    let p = root.join("bin").join("s3s-fs");
    if p.is_file() {
        return p;
    }
    // The pinned build first: another s3s-fs on PATH (a stray `cargo install`) only after it.
    if let Some(found) = crate::which("s3s-fs") {
        return found;
    }
    panic!(
        "required tool `s3s-fs` (the S3 test server) is not installed: not in $EVSD_S3S_FS, PATH or {}. \
         Run `bash scripts/install-test-deps.sh`, which builds it with \
         `cargo install s3s-fs --version {S3S_FS_VERSION} --locked --features binary --root {}`.",
        p.display(),
        root.display()
    );
}

/// A running s3s-fs on 127.0.0.1 with its own temporary root directory.
/// Dropping it kills the server and removes the directory.
pub struct S3Server {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    generation: u32,
}

impl S3Server {
    /// Start s3s-fs on a free port with an empty bucket [`BUCKET`] and wait
    /// until it accepts connections.
    pub fn start() -> S3Server {
        let bin = s3s_fs_bin();
        let dir = tempfile::Builder::new()
            .prefix("evsd-e2e-s3-")
            .tempdir()
            .expect("create temp dir for s3s-fs");
        let root = dir.path().join("root");
        // A bucket is a directory under the root (what CreateBucket does).
        fs::create_dir_all(root.join(BUCKET))
            .unwrap_or_else(|e| panic!("create bucket dir under {}: {e}", root.display()));
        let mut s = S3Server {
            dir,
            bin,
            port: 0,
            child: None,
            generation: 0,
        };
        // The port is picked by binding :0 and closing it again; another process may take it in
        // between, so try a few ports before giving up.
        let mut errors = Vec::new();
        for _ in 0..5 {
            s.port = free_port();
            match s.spawn() {
                Ok(()) => return s,
                Err(e) => errors.push(e),
            }
        }
        panic!("s3s-fs did not start:\n{}", errors.join("\n"));
    }

    /// The root directory s3s-fs serves (buckets are its subdirectories).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    /// The directory holding the objects of [`BUCKET`].
    pub fn bucket_dir(&self) -> PathBuf {
        self.root().join(BUCKET)
    }
    pub fn bucket(&self) -> &'static str {
        BUCKET
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
    /// `http://127.0.0.1:PORT` (AWS_ENDPOINT).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    /// `s3://BUCKET/PREFIX` (`s3://BUCKET` for an empty prefix), the daemon's `--backup-store`.
    pub fn url(&self, prefix: &str) -> String {
        let p = prefix.trim_matches('/');
        if p.is_empty() {
            format!("s3://{BUCKET}")
        } else {
            format!("s3://{BUCKET}/{p}")
        }
    }
    /// Path-style HTTP URL of an object: `http://127.0.0.1:PORT/BUCKET/KEY`.
    pub fn http_url(&self, key: &str) -> String {
        format!(
            "{}/{BUCKET}/{}",
            self.endpoint(),
            key.trim_start_matches('/')
        )
    }

    /// The environment a client needs (object_store's `AmazonS3Builder::from_env` names):
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (and AWS_DEFAULT_REGION for other
    /// clients), AWS_ENDPOINT=http://127.0.0.1:PORT, AWS_ALLOW_HTTP=true.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_DEFAULT_REGION", REGION.to_string()),
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The file that holds object `key` (whether or not it exists). Keys are relative to the
    /// bucket, so a store at `s3://BUCKET/PREFIX` keeps `chunks/ab/ab…` at key `PREFIX/chunks/ab/ab…`.
    pub fn path_of(&self, key: &str) -> PathBuf {
        let key = key.trim_start_matches('/');
        assert!(
            !key.split('/').any(|c| c == ".." || c == "."),
            "object key {key:?} has . or .. components"
        );
        self.bucket_dir().join(key)
    }

    /// Keys of all objects whose key starts with `prefix` (a string prefix, as in S3: "p/chunks/"
    /// lists that "directory", "" lists everything), sorted, read from the files on disk.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.bucket_dir(), "", &mut |key, _len| {
            if key.starts_with(prefix) {
                out.push(key.to_string());
            }
        });
        out.sort();
        out
    }

    /// Number of objects whose key starts with `prefix` (see [`S3Server::keys`]).
    pub fn object_count(&self, prefix: &str) -> usize {
        self.keys(prefix).len()
    }

    /// Total size in bytes of the objects whose key starts with `prefix`.
    pub fn total_bytes(&self, prefix: &str) -> u64 {
        let mut total = 0;
        walk(&self.bucket_dir(), "", &mut |key, len| {
            if key.starts_with(prefix) {
                total += len;
            }
        });
        total
    }

    /// The stored bytes of object `key`; panics if it does not exist.
    pub fn read_object(&self, key: &str) -> Vec<u8> {
        let p = self.path_of(key);
        fs::read(&p).unwrap_or_else(|e| panic!("read object {key:?} ({}): {e}", p.display()))
    }

    /// Flip every bit of the byte at `offset` of object `key` in place on disk (the server does
    /// not notice: it serves the file as it is). Panics if the object is shorter.
    pub fn corrupt_object(&self, key: &str, offset: u64) {
        let p = self.path_of(key);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("open object {key:?} ({}) to corrupt it: {e}", p.display()));
        let len = f.metadata().unwrap().len();
        assert!(
            offset < len,
            "cannot corrupt byte {offset} of object {key:?}: it has only {len} bytes"
        );
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.read_exact(&mut b).unwrap();
        b[0] ^= 0xff;
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&b).unwrap();
        f.sync_all().unwrap();
    }

    /// True while the server process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => c.try_wait().unwrap().is_none(),
        }
    }

    /// Kill the server (SIGKILL, as an outage would) and reap it. Its data stays on disk.
    pub fn stop(&mut self) {
        let mut c = self.child.take().expect("s3s-fs is not running");
        let _ = c.kill();
        c.wait().expect("wait for s3s-fs");
        // The kernel closes the listening socket with the process; make sure it is gone.
        assert!(
            crate::wait_until(Duration::from_secs(5), || TcpStream::connect(self.addr())
                .is_err()),
            "port {} still accepts connections after s3s-fs was killed",
            self.port
        );
    }

    /// Start the server again on the same port and root directory (after [`S3Server::stop`]).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "s3s-fs is still running");
        // The port was ours a moment ago; retry briefly in case it is still being released.
        let start = Instant::now();
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if start.elapsed() > Duration::from_secs(10) => {
                    panic!("s3s-fs did not start again on port {}: {e}", self.port)
                }
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Suspend the server (SIGSTOP): connections are still accepted by the kernel but never
    /// answered, like a hung store. [`S3Server::resume`] continues it.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }
    /// Continue a server suspended by [`S3Server::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        let c = self.child.as_ref().expect("s3s-fs is not running");
        // SAFETY: plain kill(2) on our own child's pid.
        let r = unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill(s3s-fs pid {}, {sig}) failed", c.id());
    }

    /// The server's output (all starts so far).
    pub fn log(&self) -> String {
        let mut s = String::new();
        for g in 1..=self.generation {
            s.push_str(&format!("=== s3s-fs start #{g} ===\n"));
            s.push_str(&fs::read_to_string(self.log_path(g)).unwrap_or_default());
        }
        s
    }

    fn log_path(&self, generation: u32) -> PathBuf {
        self.dir.path().join(format!("s3s-fs-{generation}.log"))
    }

    /// Spawn on `self.port` and wait until it accepts connections. Err (with its output) if it
    /// exits first, e.g. because the port is taken.
    fn spawn(&mut self) -> Result<(), String> {
        self.generation += 1;
        let log_path = self.log_path(self.generation);
        let log = File::create(&log_path).expect("create s3s-fs log");
        let root = self.root();
        let port = self.port.to_string();
        let args = [
            "--host",
            "127.0.0.1",
            "--port",
            port.as_str(),
            "--access-key",
            ACCESS_KEY,
            "--secret-key",
            SECRET_KEY,
        ];
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its tracing output: errors and warnings only, unless asked for more.
            .env(
                "RUST_LOG",
                std::env::var("EVSD_S3S_FS_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1");
        let desc = format!(
            "{} {} {}",
            self.bin.display(),
            args.join(" "),
            root.display()
        );
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{desc}`: {e}"));
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return Err(format!(
                    "`{desc}` exited before accepting connections ({st}):\n{}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok() {
                // Something answers on the port; it is ours only if our s3s-fs did not exit
                // failing to bind it (another process took the port after it was picked): it
                // starts in ~15 ms, so a bind failure shows well within this.
                thread::sleep(Duration::from_millis(100));
                if let Some(st) = child.try_wait().unwrap() {
                    return Err(format!(
                        "`{desc}` exited ({st}) while another process answered on its port:\n{}",
                        fs::read_to_string(&log_path).unwrap_or_default()
                    ));
                }
                self.child = Some(child);
                return Ok(());
            }
            if start.elapsed() > S3_READY_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`{desc}` did not accept connections on {} within {S3_READY_TIMEOUT:?}:\n{}",
                    self.addr(),
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            let log = self.log();
            eprintln!(
                "--- s3s-fs output (test failed; last 8 KiB) ---\n{}\n--- end s3s-fs output ---",
                crate::tail(log.as_bytes(), 8 * 1024)
            );
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Call `f(key, len)` for every regular file under `dir`, key = path relative to the walk's
/// start with `/` separators.
fn walk(dir: &Path, prefix: &str, f: &mut dyn FnMut(&str, u64)) {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => panic!("read dir {}: {e}", dir.display()),
    };
    for ent in rd {
        let ent = ent.unwrap_or_else(|e| panic!("read dir {}: {e}", dir.display()));
        let name = ent.file_name();
        let name = name
            .to_str()
            .unwrap_or_else(|| panic!("non-UTF-8 file name {name:?} in {}", dir.display()));
        let key = format!("{prefix}{name}");
        let md = ent
            .metadata()
            .unwrap_or_else(|e| panic!("stat {}: {e}", ent.path().display()));
        if md.is_dir() {
            walk(&ent.path(), &format!("{key}/"), f);
        } else if md.is_file() {
            f(&key, md.len());
        }
    }
}
