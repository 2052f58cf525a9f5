//! Harness self-check mode: `EVSD_E2E_PEER=nbdkit` or `EVSD_E2E_PEER=qemu-nbd`
//! makes [`crate::Daemon`] start a peer NBD server on the same data dir
//! instead of evsd, so the clients' output parsing and the raw-wire framing of
//! the tests can be checked against a known-good server.
//!
//! This mode can never make the suite pass: every test whose daemon is dropped
//! without a failure panics with [`PEER_MODE_FAILURE`]. When checking the
//! harness, look for tests that fail with any *other* message. The peers'
//! behaviour differs from evsd's contract in places (nbdkit's file plugin has
//! no fast-zero, qemu-nbd serves a single export, their error codes differ),
//! so some real failures are expected there too.

use std::fs::{self, File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{parse_size, DaemonOpts, GIB};

pub const PEER_MODE_FAILURE: &str = "EVSD_E2E_PEER is set: the test ran against a PEER server, \
     not evsd. Its assertions passed, but this mode never counts as a pass. Unset EVSD_E2E_PEER \
     to test evsd.";

/// The peer selected by `$EVSD_E2E_PEER`, if any.
pub fn peer_mode() -> Option<String> {
    std::env::var("EVSD_E2E_PEER")
        .ok()
        .filter(|s| !s.is_empty())
}

pub struct PeerProcs {
    pub tcp: SocketAddr,
    procs: Vec<Child>,
}

impl PeerProcs {
    pub fn pid(&self) -> u32 {
        self.procs[0].id()
    }
    pub fn is_running(&mut self) -> bool {
        self.procs
            .iter_mut()
            .all(|c| c.try_wait().unwrap().is_none())
    }
    pub fn signal(&self, sig: i32) {
        for c in &self.procs {
            // SAFETY: kill(2) on our own children.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        let mut first = None;
        for c in &mut self.procs {
            loop {
                if let Some(st) = c.try_wait().unwrap() {
                    first.get_or_insert(st);
                    break;
                }
                if start.elapsed() > timeout {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("peer server did not exit within {timeout:?}");
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        first.unwrap()
    }
    pub fn kill(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn spawn_peer(
    kind: &str,
    data: &Path,
    unix: &Path,
    opts: &DaemonOpts,
    log: &Path,
) -> PeerProcs {
    // Create the volumes the way evsd would (sparse files named after them).
    let mut vols: Vec<(String, u64)> = Vec::new();
    if opts.default_volume {
        vols.push(("vol0".into(), GIB));
    }
    for v in &opts.volumes {
        let (name, size) = v.split_once(':').expect("NAME:SIZE");
        vols.push((name.into(), parse_size(size)));
    }
    for (name, size) in &vols {
        let p = data.join(name);
        if !p.exists() {
            let f = File::create(&p).unwrap();
            f.set_len(*size).unwrap();
        }
    }
    let _ = fs::remove_file(unix);
    let port = free_port();
    let logf = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let spawn = |args: Vec<String>, prog: &str| -> Child {
        Command::new(prog)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf.try_clone().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {prog}: {e}"))
    };
    let procs = match kind {
        "nbdkit" => {
            let common = |listen: Vec<String>| -> Vec<String> {
                let mut a: Vec<String> = vec!["--foreground".into(), "--exit-with-parent".into()];
                a.extend(listen);
                a.extend(
                    [
                        "--filter=blocksize-policy",
                        "file",
                        &format!("dir={}", data.display()),
                        "blocksize-minimum=1",
                        "blocksize-preferred=4096",
                        "blocksize-maximum=33554432",
                    ]
                    .iter()
                    .map(|s| s.to_string()),
                );
                a
            };
            vec![
                spawn(
                    common(vec![
                        "-i".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        port.to_string(),
                    ]),
                    "nbdkit",
                ),
                spawn(
                    common(vec!["-U".into(), unix.display().to_string()]),
                    "nbdkit",
                ),
            ]
        }
        "qemu-nbd" => {
            let (name, _) = vols.first().expect("qemu-nbd peer needs a volume");
            let img = format!(
                "driver=raw,file.driver=file,file.filename={},file.locking=off",
                data.join(name).display()
            );
            let common = |listen: Vec<String>| -> Vec<String> {
                let mut a: Vec<String> = vec![
                    "--image-opts".into(),
                    "--shared=16".into(),
                    "-t".into(),
                    "--cache=writeback".into(),
                    "--discard=unmap".into(),
                    "-x".into(),
                    name.clone(),
                ];
                a.extend(listen);
                a.push(img.clone());
                a
            };
            vec![
                spawn(
                    common(vec![
                        "-b".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        port.to_string(),
                    ]),
                    "qemu-nbd",
                ),
                spawn(
                    common(vec!["-k".into(), unix.display().to_string()]),
                    "qemu-nbd",
                ),
            ]
        }
        other => panic!("EVSD_E2E_PEER={other}: expected nbdkit or qemu-nbd"),
    };
    let tcp: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut p = PeerProcs { tcp, procs };
    let start = Instant::now();
    loop {
        if TcpStream::connect(tcp).is_ok() && UnixStream::connect(unix).is_ok() {
            break;
        }
        if !p.is_running() || start.elapsed() > Duration::from_secs(20) {
            p.kill();
            panic!(
                "peer {kind} did not come up\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    p
}
