//! End-to-end test harness for evsd.
//!
//! Every test starts its own daemon on a fresh temporary data directory with
//! `--listen 127.0.0.1:0 --unix <tmp>/nbd.sock --ready-file <tmp>/ready.json --metrics-listen 127.0.0.1:0
//! --admin-socket <tmp>/admin.sock` and talks to it with real NBD clients (qemu-img/qemu-io, libnbd tools,
//! fio, nbdfuse) or with the hand-written wire client in [`raw`]. Backup tests
//! add a real S3 server on loopback ([`s3::S3Server`]) and pass its
//! credentials to the daemon with [`DaemonOpts::envs`].
//!
//! Binary lookup: `$EVSD_BIN` if set, otherwise `evsd` next to the directory
//! holding the test executable (`<target>/<profile>/evsd`), otherwise
//! `$CARGO_TARGET_DIR/debug/evsd` or `<workspace>/target/debug/evsd`; evsctl
//! likewise (`$EVSCTL_BIN`, then the same places).
//! Build it first (`cargo build --workspace`); `scripts/test.sh` does that.
//!
//! Missing external tools are a hard failure ([`require_tool`]); no test is
//! ever skipped silently.

pub mod admin;
pub mod backups;
pub mod faults;
pub mod fio;
pub mod metrics;
pub mod peer;
pub mod pki;
pub mod raw;
pub mod s3;
pub mod tls_client;

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * 1024 * 1024;

/// Default timeout for external commands run through [`run`].
pub const CMD_TIMEOUT: Duration = Duration::from_secs(300);
/// How long to wait for the ready file after spawning the daemon.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a graceful shutdown may take.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(45);

// ---------------------------------------------------------------------------
// Binary lookup
// ---------------------------------------------------------------------------

/// Path of the evsd binary under test. Panics with instructions if missing.
pub fn evsd_bin() -> PathBuf {
    workspace_bin("evsd", "EVSD_BIN")
}

/// Path of the evsctl binary under test (`$EVSCTL_BIN`, else looked up like [`evsd_bin`]).
pub fn evsctl_bin() -> PathBuf {
    workspace_bin("evsctl", "EVSCTL_BIN")
}

fn workspace_bin(name: &str, env_var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{env_var}={} does not exist or is not a file",
            p.display()
        );
        return p;
    }
    let mut candidates = Vec::new();
    // <target>/<profile>/deps/<test-exe>  ->  <target>/<profile>/<name>
    if let Ok(exe) = std::env::current_exe() {
        if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
            candidates.push(profile_dir.join(name));
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("debug").join(name));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    candidates.push(workspace.join("target").join("debug").join(name));
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "{name} binary not found (looked at: {}). Build it first with `cargo build --workspace` \
         (scripts/test.sh does this) or point {env_var} at it.",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

// ---------------------------------------------------------------------------
// External tools
// ---------------------------------------------------------------------------

/// Find `name` in `$PATH` (plus the sbin directories, which root's tools live in).
pub fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(extra));
    }
    for d in dirs {
        let p = d.join(name);
        if let Ok(md) = fs::metadata(&p) {
            use std::os::unix::fs::PermissionsExt;
            if md.is_file() && md.permissions().mode() & 0o111 != 0 {
                return Some(p);
            }
        }
    }
    None
}

/// Panic with a clear message if `name` is not installed. Tests never skip.
pub fn require_tool(name: &str) -> PathBuf {
    which(name).unwrap_or_else(|| {
        panic!(
            "required tool `{name}` is not installed (not found in PATH). \
             Run `bash scripts/install-test-deps.sh` (as root) to install the e2e test dependencies."
        )
    })
}

/// Panic unless running as root (loop devices, mount).
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "{what} needs root (loop devices and mount); run the e2e tests as root (euid is {euid})"
    );
}

fn tail(s: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(s);
    if s.len() <= max {
        return s.into_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {} bytes cut ...]\n{}", start, &s[start..])
}

fn describe(cmd: &str, args: &[OsString]) -> String {
    let mut d = cmd.to_string();
    for a in args {
        if d.len() > 1500 {
            d.push_str(&format!(" [... {} args in all]", args.len()));
            break;
        }
        d.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            d.push_str(&format!("'{a}'"));
        } else {
            d.push_str(&a);
        }
    }
    d
}

/// Format a command's output for a panic message.
pub fn format_output(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        tail(&out.stdout, 16 * 1024),
        tail(&out.stderr, 16 * 1024)
    )
}

/// Run a command with a timeout; returns its output whatever the exit status.
pub fn run_unchecked_timeout<S: AsRef<OsStr>>(cmd: &str, args: &[S], timeout: Duration) -> Output {
    run_env_unchecked_timeout(cmd, args, &[], timeout)
}

/// Like [`run_unchecked_timeout`] with extra environment variables.
pub fn run_env_unchecked_timeout<S: AsRef<OsStr>>(
    cmd: &str,
    args: &[S],
    envs: &[(&str, OsString)],
    timeout: Duration,
) -> Output {
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
    let desc = describe(cmd, &args);
    let mut child = Command::new(cmd)
        .args(&args)
        .envs(envs.iter().map(|(k, v)| (*k, v.clone())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{desc}`: {e}"));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let to = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let te = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => panic!("waiting for `{desc}`: {e}"),
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let st = child.wait().ok();
            let out = Output {
                status: st.unwrap_or_else(|| ExitStatus::from_raw(9)),
                stdout: to.join().unwrap_or_default(),
                stderr: te.join().unwrap_or_default(),
            };
            panic!(
                "{}",
                format_output(&format!("`{desc}` timed out after {timeout:?}"), &out)
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: to.join().unwrap_or_default(),
        stderr: te.join().unwrap_or_default(),
    }
}

/// Run a command (default timeout), returning its output whatever the exit status.
pub fn run_unchecked<S: AsRef<OsStr>>(cmd: &str, args: &[S]) -> Output {
    run_unchecked_timeout(cmd, args, CMD_TIMEOUT)
}

/// Run a command and assert it succeeded; the panic message has stdout/stderr.
pub fn run_timeout<S: AsRef<OsStr>>(cmd: &str, args: &[S], timeout: Duration) -> Output {
    let out = run_unchecked_timeout(cmd, args, timeout);
    if !out.status.success() {
        let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
        panic!(
            "{}",
            format_output(&format!("command `{}` failed", describe(cmd, &args)), &out)
        );
    }
    out
}

/// Run a command and assert it succeeded; the panic message has stdout/stderr.
pub fn run<S: AsRef<OsStr>>(cmd: &str, args: &[S]) -> Output {
    run_timeout(cmd, args, CMD_TIMEOUT)
}

/// stdout of a successful command as a String.
pub fn run_stdout<S: AsRef<OsStr>>(cmd: &str, args: &[S]) -> String {
    String::from_utf8_lossy(&run(cmd, args).stdout).into_owned()
}

/// Run a Python script under `nbdsh -c` (python3-libnbd) and return stdout.
/// The system python is put first in PATH: nbdsh runs `python3 -m nbd`, and a
/// pyenv/virtualenv python3 earlier in PATH would not have the nbd module.
pub fn nbdsh(script: &str) -> String {
    require_tool("nbdsh");
    let mut path = OsString::from("/usr/bin:/bin:");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let out = run_env_unchecked_timeout("nbdsh", &["-c", script], &[("PATH", path)], CMD_TIMEOUT);
    if !out.status.success() {
        let hint = if String::from_utf8_lossy(&out.stderr).contains("No module named") {
            "\nhint: the python3-libnbd package is missing; run scripts/install-test-deps.sh"
        } else {
            ""
        };
        panic!(
            "{}{hint}",
            format_output(&format!("nbdsh script failed:\n{script}\n"), &out)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `qemu-io -f raw URI -c CMD...`, assert exit 0 and that no command
/// reported a failure. (qemu-io exits 0 when an `aio_read -P` pattern check
/// fails, so the output is searched as well.) Returns stdout+stderr.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(&[], uri, cmds)
}

/// [`qemu_io`] with `-r`: qemu refuses to open a read-only export (a snapshot) read-write.
pub fn qemu_io_read_only(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(&["-r"], uri, cmds)
}

fn qemu_io_with(options: &[&str], uri: &str, cmds: &[&str]) -> String {
    let mut args: Vec<String> = options.iter().map(|o| (*o).to_owned()).collect();
    args.extend(["-f".into(), "raw".into(), uri.into()]);
    for c in cmds {
        args.push("-c".into());
        args.push((*c).into());
    }
    let out = run("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("failed") || l.contains("error") || l.contains("mismatch")
        })
        .collect();
    assert!(
        bad.is_empty(),
        "qemu-io reported failures: {bad:?}\ncommands: {cmds:?}\n--- output ---\n{}",
        tail(text.as_bytes(), 16 * 1024)
    );
    text
}

// ---------------------------------------------------------------------------
// Data helpers
// ---------------------------------------------------------------------------

/// Small deterministic PRNG (xorshift64*), fast even in debug builds.
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Self {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let v = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&v[..n]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Write `size` bytes of random data (from /dev/urandom) to `path`.
pub fn write_random_file(path: &Path, size: u64) {
    let mut src = File::open("/dev/urandom").expect("open /dev/urandom");
    let mut dst = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let copied = io::copy(&mut (&mut src).take(size), &mut dst).expect("copy random data");
    assert_eq!(copied, size, "short random file");
    dst.sync_all().ok();
}

/// Byte-compare two files; panics with the first differing offset.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let la = fs::metadata(a)
        .unwrap_or_else(|e| panic!("{}: {e}", a.display()))
        .len();
    let lb = fs::metadata(b)
        .unwrap_or_else(|e| panic!("{}: {e}", b.display()))
        .len();
    assert_eq!(
        la,
        lb,
        "file sizes differ: {} is {la} bytes, {} is {lb} bytes",
        a.display(),
        b.display()
    );
    let mut fa = io::BufReader::with_capacity(4 << 20, File::open(a).unwrap());
    let mut fb = io::BufReader::with_capacity(4 << 20, File::open(b).unwrap());
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < la {
        let n = ((la - off) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!(
                "{} and {} differ at byte offset {} ({:#04x} vs {:#04x})",
                a.display(),
                b.display(),
                off + i as u64,
                ba[i],
                bb[i]
            );
        }
        off += n as u64;
    }
}

/// A fresh temporary directory (removed on drop).
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("evsd-e2e-")
        .tempdir()
        .expect("create temp dir")
}

/// Parse "256M" style sizes the way evsd does (bytes, or K/M/G = KiB/MiB/GiB).
pub fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K') | Some('k') => (&s[..s.len() - 1], KIB),
        Some('M') | Some('m') => (&s[..s.len() - 1], MIB),
        Some('G') | Some('g') => (&s[..s.len() - 1], GIB),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .unwrap_or_else(|_| panic!("bad size {s:?}"))
        * mult
}

/// Poll `f` until it returns true or `timeout` elapses.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// The daemon under test
// ---------------------------------------------------------------------------

/// Options for [`Daemon::start`].
#[derive(Clone, Debug)]
pub struct DaemonOpts {
    /// Pass `--no-default-volume` when false.
    pub default_volume: bool,
    /// `--create-volume NAME:SIZE` arguments.
    pub volumes: Vec<String>,
    /// `--io-engine`; when None, `$EVSD_E2E_IO_ENGINE` is used if set.
    pub io_engine: Option<String>,
    pub max_connections: Option<u32>,
    pub handshake_timeout_secs: Option<u64>,
    /// `--metrics-listen`; an ephemeral port by default so parallel daemons never collide.
    pub metrics_listen: String,
    /// `--listen`: `127.0.0.1:0` by default.
    pub listen: String,
    /// Anything else, appended verbatim.
    pub extra_args: Vec<String>,
    /// Extra environment variables for the evsd process (on top of the test's own
    /// environment, which it inherits), e.g. the S3 credentials from [`s3::S3Server::env`].
    /// Kept across [`Daemon::restart`].
    pub env: Vec<(String, String)>,
    /// `--data-dir` somewhere else than `<workdir>/data` (e.g. a small mounted filesystem).
    pub data_dir: Option<PathBuf>,
}

impl Default for DaemonOpts {
    fn default() -> Self {
        DaemonOpts {
            default_volume: true,
            volumes: Vec::new(),
            io_engine: None,
            max_connections: None,
            handshake_timeout_secs: None,
            metrics_listen: "127.0.0.1:0".into(),
            listen: "127.0.0.1:0".into(),
            extra_args: Vec::new(),
            env: Vec::new(),
            data_dir: None,
        }
    }
}

impl DaemonOpts {
    pub fn new() -> Self {
        Self::default()
    }
    /// Add `--create-volume SPEC` (e.g. "vol1:256M").
    pub fn volume(mut self, spec: &str) -> Self {
        self.volumes.push(spec.to_string());
        self
    }
    /// Explicitly create `vol0` (1 GiB) too. Tests that use vol0 next to
    /// `--create-volume` volumes say so, rather than depending on whether the
    /// default volume is made when other volumes are created.
    pub fn with_vol0(self) -> Self {
        self.volume("vol0:1G")
    }
    pub fn no_default_volume(mut self) -> Self {
        self.default_volume = false;
        self
    }
    pub fn io_engine(mut self, e: &str) -> Self {
        self.io_engine = Some(e.to_string());
        self
    }
    pub fn handshake_timeout(mut self, secs: u64) -> Self {
        self.handshake_timeout_secs = Some(secs);
        self
    }
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }
    /// `--listen ADDR:PORT` (e.g. "0.0.0.0:0").
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = addr.to_string();
        self
    }
    /// `--metrics-listen ADDR` (e.g. "off").
    pub fn metrics_listen(mut self, addr: &str) -> Self {
        self.metrics_listen = addr.to_string();
        self
    }
    pub fn arg(mut self, a: &str) -> Self {
        self.extra_args.push(a.to_string());
        self
    }
    /// Set environment variable `key` to `value` for the daemon process (a later value for the
    /// same key wins).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
    /// Use `dir` (which must exist) as `--data-dir` instead of `<workdir>/data`.
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }
    /// [`DaemonOpts::env`] for each pair, e.g. `.envs(s3.env())`.
    pub fn envs<K: Into<String>, V: Into<String>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }
}

/// A running evsd (or, for harness validation only, a peer server: see
/// [`peer`]) on its own temporary directory.
pub struct Daemon {
    dir: TempDir,
    opts: DaemonOpts,
    child: Option<Child>,
    tcp: SocketAddr,
    /// The metrics listener from the ready file; None when `off`.
    metrics: Option<SocketAddr>,
    unix: PathBuf,
    admin: PathBuf,
    pid: u32,
    generation: u32,
    peer: Option<peer::PeerProcs>,
}

impl Daemon {
    /// Start a daemon on a fresh data dir and wait for its ready file.
    pub fn start(opts: DaemonOpts) -> Daemon {
        let dir = tempdir();
        fs::create_dir_all(dir.path().join("data")).unwrap();
        let mut d = Daemon {
            unix: dir.path().join("nbd.sock"),
            admin: dir.path().join("admin.sock"),
            dir,
            opts,
            child: None,
            tcp: "127.0.0.1:0".parse().unwrap(),
            metrics: None,
            pid: 0,
            generation: 0,
            peer: None,
        };
        d.spawn();
        d
    }

    /// Start with default options (vol0 of 1 GiB).
    pub fn start_default() -> Daemon {
        Self::start(DaemonOpts::default())
    }

    pub fn data_dir(&self) -> PathBuf {
        match &self.opts.data_dir {
            Some(d) => d.clone(),
            None => self.dir.path().join("data"),
        }
    }
    pub fn work_dir(&self) -> &Path {
        self.dir.path()
    }
    fn ready_file(&self) -> PathBuf {
        self.dir.path().join("ready.json")
    }
    fn log_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("evsd-{}.stderr", self.generation))
    }

    /// The command line evsd is started with.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--listen".into(),
            self.opts.listen.clone(),
            "--unix".into(),
            self.unix.display().to_string(),
            "--data-dir".into(),
            self.data_dir().display().to_string(),
            "--ready-file".into(),
            self.ready_file().display().to_string(),
            "--admin-socket".into(),
            self.admin.display().to_string(),
            "--metrics-listen".into(),
            self.opts.metrics_listen.clone(),
        ];
        if !self.opts.default_volume {
            a.push("--no-default-volume".into());
        }
        for v in &self.opts.volumes {
            a.push("--create-volume".into());
            a.push(v.clone());
        }
        let engine = self.opts.io_engine.clone().or_else(|| {
            std::env::var("EVSD_E2E_IO_ENGINE")
                .ok()
                .filter(|s| !s.is_empty())
        });
        if let Some(e) = engine {
            a.push("--io-engine".into());
            a.push(e);
        }
        if let Some(n) = self.opts.max_connections {
            a.push("--max-connections".into());
            a.push(n.to_string());
        }
        if let Some(n) = self.opts.handshake_timeout_secs {
            a.push("--handshake-timeout-secs".into());
            a.push(n.to_string());
        }
        a.extend(self.opts.extra_args.iter().cloned());
        a
    }

    fn spawn(&mut self) {
        assert!(
            self.child.is_none() && self.peer.is_none(),
            "already running"
        );
        self.generation += 1;
        let _ = fs::remove_file(self.ready_file());
        if let Some(kind) = peer::peer_mode() {
            let p = peer::spawn_peer(
                &kind,
                &self.data_dir(),
                &self.unix,
                &self.opts,
                &self.log_path(),
            );
            self.tcp = p.tcp;
            self.pid = p.pid();
            self.peer = Some(p);
            return;
        }
        let bin = evsd_bin();
        let log = File::create(self.log_path()).expect("create daemon log");
        let args = self.args();
        let mut cmd = Command::new(&bin);
        cmd.args(&args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // Plain-text logs in test output; panics keep their backtraces, but
        // anyhow errors do not print one (RUST_BACKTRACE is often set by CI).
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
            cmd.env("RUST_LIB_BACKTRACE", "0");
        }
        // Last, so a test can override any of the above.
        cmd.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {} {:?}: {e}", bin.display(), args));
        self.pid = child.id();
        self.child = Some(child);
        self.wait_ready(&bin, &args);
    }

    fn wait_ready(&mut self, bin: &Path, args: &[String]) {
        let start = Instant::now();
        let ready = self.ready_file();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "evsd exited before becoming ready ({st})\ncommand: {} {}\n--- evsd stderr ---\n{}",
                    bin.display(),
                    args.join(" "),
                    self.stderr()
                );
            }
            if let Ok(text) = fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    let tcp = v["tcp"].as_str().unwrap_or_else(|| {
                        panic!(
                            "ready file {} has no \"tcp\" string: {text}",
                            ready.display()
                        )
                    });
                    self.tcp = tcp
                        .parse()
                        .unwrap_or_else(|e| panic!("ready file tcp {tcp:?} is not ADDR:PORT: {e}"));
                    if let Some(u) = v["unix"].as_str() {
                        assert_eq!(
                            Path::new(u),
                            self.unix.as_path(),
                            "ready file unix path differs from --unix"
                        );
                    } else {
                        panic!("ready file has no unix path although --unix was given: {text}");
                    }
                    if let Some(pid) = v["pid"].as_u64() {
                        assert_eq!(pid as u32, self.pid, "ready file pid mismatch: {text}");
                    } else {
                        panic!("ready file has no numeric pid: {text}");
                    }
                    assert_ne!(self.tcp.port(), 0, "ready file reports port 0: {text}");
                    self.metrics = match &v["metrics"] {
                        serde_json::Value::Null => None,
                        serde_json::Value::String(m) => Some(m.parse().unwrap_or_else(|e| {
                            panic!("ready file metrics {m:?} is not ADDR:PORT: {e}")
                        })),
                        other => panic!("ready file metrics is {other}, not a string or null"),
                    };
                    return;
                }
                // Partially written?  The daemon must write atomically, so
                // this is a bug unless it is fixed by the next poll.
            }
            if start.elapsed() > READY_TIMEOUT {
                let text = fs::read_to_string(&ready).unwrap_or_default();
                panic!(
                    "evsd did not write a valid ready file {} within {:?} (content: {:?})\ncommand: {} {}\n--- evsd stderr ---\n{}",
                    ready.display(),
                    READY_TIMEOUT,
                    text,
                    bin.display(),
                    args.join(" "),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }
    /// The metrics listener's address, None with `--metrics-listen off`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }
    pub fn unix_path(&self) -> &Path {
        &self.unix
    }
    pub fn pid(&self) -> u32 {
        self.pid
    }
    /// The admin socket (`<workdir>/admin.sock`).
    pub fn admin_path(&self) -> &Path {
        &self.admin
    }

    /// Run `evsctl --socket <admin socket> ARGS…`; returns its output whatever the exit status.
    pub fn evsctl(&self, args: &[&str]) -> Output {
        let bin = evsctl_bin();
        let socket = self.admin.display().to_string();
        let mut all = vec!["--socket", socket.as_str()];
        all.extend_from_slice(args);
        run_unchecked(&bin.display().to_string(), &all)
    }

    /// Like [`Daemon::evsctl`], asserting exit 0; returns stdout.
    pub fn evsctl_ok(&self, args: &[&str]) -> String {
        let out = self.evsctl(args);
        assert!(
            out.status.success(),
            "{}\n--- evsd stderr ---\n{}",
            format_output(&format!("evsctl {args:?}"), &out),
            self.stderr()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `evsctl --json ARGS…` (asserting exit 0), parsed.
    pub fn evsctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.evsctl_ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("evsctl --json {args:?}: {e}\n{out}"))
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.tcp, export)
    }
    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.unix.display())
    }

    /// Open a TCP connection to the daemon.
    pub fn connect_tcp(&self) -> TcpStream {
        TcpStream::connect(self.tcp).unwrap_or_else(|e| {
            panic!(
                "connect to {}: {e}\n--- evsd stderr ---\n{}",
                self.tcp,
                self.stderr()
            )
        })
    }

    /// Daemon stderr of the current (latest) start.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Daemon stderr of all starts so far.
    pub fn all_stderr(&self) -> String {
        let mut s = String::new();
        for g in 1..=self.generation {
            let p = self.dir.path().join(format!("evsd-{g}.stderr"));
            s.push_str(&format!("=== start #{g} ===\n"));
            s.push_str(&fs::read_to_string(p).unwrap_or_default());
        }
        s
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        if let Some(p) = self.peer.as_mut() {
            return p.is_running();
        }
        match self.child.as_mut() {
            None => false,
            Some(c) => c.try_wait().unwrap().is_none(),
        }
    }

    /// Panic (with the daemon's log) if it has exited.
    pub fn assert_alive(&mut self) {
        if !self.is_running() {
            let st = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            panic!(
                "evsd is not running any more (status {st:?})\n--- evsd stderr ---\n{}",
                self.stderr()
            );
        }
    }

    /// Send a signal to the daemon process.
    pub fn signal(&self, sig: i32) {
        if let Some(p) = self.peer.as_ref() {
            p.signal(sig);
            return;
        }
        assert!(self.child.is_some(), "daemon not running");
        // SAFETY: plain kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({}, {sig}) failed", self.pid);
    }

    /// Wait for the process to exit within `timeout`; panics on timeout
    /// (after killing it).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(mut p) = self.peer.take() {
            return p.wait_exit(timeout);
        }
        let mut child = self.child.take().expect("daemon not running");
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "evsd (pid {}) did not exit within {timeout:?}; killed it\n--- evsd stderr ---\n{}",
                    self.pid,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the daemon and reap it.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let st = self.wait_exit(Duration::from_secs(10));
        assert_eq!(st.signal(), Some(libc::SIGKILL), "unexpected status {st}");
    }

    /// SIGTERM the daemon, wait (bounded) and return its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(SHUTDOWN_TIMEOUT)
    }

    /// SIGTERM the daemon and assert that it exited with status 0.
    pub fn terminate_ok(&mut self) {
        let st = self.terminate();
        assert!(
            st.success(),
            "evsd did not exit 0 on SIGTERM: {st}\n--- evsd stderr ---\n{}",
            self.stderr()
        );
    }

    /// Start again on the same data dir (gracefully stopping it first if it is
    /// still running). The TCP port may change; the Unix socket path does not.
    pub fn restart(&mut self) {
        if self.is_running() {
            self.terminate_ok();
        }
        self.child = None;
        self.peer = None;
        self.spawn();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        if let Some(mut p) = self.peer.take() {
            p.kill();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if panicking {
            let log = self.all_stderr();
            let _ = writeln!(
                io::stderr(),
                "--- evsd stderr (test failed; last 16 KiB) ---\n{}\n--- end evsd stderr ---",
                tail(log.as_bytes(), 16 * 1024)
            );
        }
        if !panicking && peer::peer_mode().is_some() {
            panic!("{}", peer::PEER_MODE_FAILURE);
        }
    }
}

/// `nbdinfo --list --json` against `addr`: the export objects, in the server's order.
pub fn nbdinfo_list_json(addr: SocketAddr) -> Vec<serde_json::Value> {
    let out = run_stdout("nbdinfo", &["--list", "--json", &format!("nbd://{addr}")]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
    v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports array: {v:#}"))
        .clone()
}
