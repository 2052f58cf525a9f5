//! The admin socket spoken directly (docs/admin-protocol.md), so tests do not depend on
//! evsctl, and whole exports read back with nbdcopy and compared byte for byte.

use std::fs;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{require_tool, run_timeout, Daemon};

/// Long admin calls (`snapshot.delete` answers once its merge is done): be generous.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client that has just disconnected may still count as attached.
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(10);
const BLOCK: usize = 4096;

#[derive(Debug, Clone)]
pub struct AdminError {
    pub code: String,
    pub message: String,
}

/// One admin connection: greeting read, then one request and one response line at a time.
pub struct Admin {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Admin {
    pub fn try_connect(path: &Path) -> io::Result<Admin> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(ADMIN_TIMEOUT))?;
        s.set_write_timeout(Some(ADMIN_TIMEOUT))?;
        let writer = s.try_clone()?;
        let mut reader = BufReader::new(s);
        let mut greeting = String::new();
        reader.read_line(&mut greeting)?;
        let v: Value = serde_json::from_str(&greeting).map_err(|e| {
            io::Error::new(
                ErrorKind::InvalidData,
                format!("admin greeting {greeting:?}: {e}"),
            )
        })?;
        if v["evsd"]["protocol"] != json!(1) {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("unexpected admin greeting {greeting:?}"),
            ));
        }
        Ok(Admin {
            reader,
            writer,
            next_id: 1,
        })
    }

    pub fn connect(path: &Path) -> Admin {
        Self::try_connect(path).unwrap_or_else(|e| panic!("admin socket {}: {e}", path.display()))
    }

    /// Send one request; returns its id.
    pub fn send(&mut self, method: &str, params: &Value) -> io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line =
            serde_json::to_string(&json!({"id": id, "method": method, "params": params})).unwrap();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        Ok(id)
    }

    /// The response to request `id`; an I/O error when the connection ended first (a line cut
    /// short by a killed daemon counts as no answer).
    pub fn recv(&mut self, id: u64) -> io::Result<Result<Value, AdminError>> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                format!("admin connection closed before a full response (got {line:?})"),
            ));
        }
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("admin response is not JSON ({e}): {line}"));
        assert_eq!(v["id"], json!(id), "response to another request: {line}");
        if let Some(e) = v.get("error") {
            return Ok(Err(AdminError {
                code: e["code"].as_str().unwrap_or_default().to_owned(),
                message: e["message"].as_str().unwrap_or_default().to_owned(),
            }));
        }
        let result = v
            .get("result")
            .cloned()
            .unwrap_or_else(|| panic!("admin response has neither result nor error: {line}"));
        Ok(Ok(result))
    }

    pub fn call(&mut self, method: &str, params: &Value) -> io::Result<Result<Value, AdminError>> {
        let id = self.send(method, params)?;
        self.recv(id)
    }
}

pub fn admin_at(path: &Path, method: &str, params: Value) -> Result<Value, AdminError> {
    Admin::connect(path)
        .call(method, &params)
        .unwrap_or_else(|e| panic!("admin {method} {params}: {e}"))
}

pub fn admin(d: &Daemon, method: &str, params: Value) -> Result<Value, AdminError> {
    admin_at(d.admin_path(), method, params)
}

pub fn admin_ok(d: &Daemon, method: &str, params: Value) -> Value {
    admin(d, method, params.clone())
        .unwrap_or_else(|e| panic!("admin {method} {params} failed: {e:?}"))
}

/// Asserts that the call fails with `code`; returns the message.
pub fn admin_err(d: &Daemon, method: &str, params: Value, code: &str) -> String {
    match admin(d, method, params.clone()) {
        Ok(v) => panic!("admin {method} {params} should fail with {code}, but returned {v}"),
        Err(e) => {
            assert_eq!(e.code, code, "admin {method} {params}: {e:?}");
            assert!(
                !e.message.is_empty(),
                "admin {method} {params}: empty message"
            );
            e.message
        }
    }
}

/// Like [`admin_ok`] but retries while the answer is `busy`: a client that has just exited
/// (qemu-io, nbdcopy) may still be attached for a moment.
pub fn admin_ok_when_idle_at(path: &Path, method: &str, params: Value) -> Value {
    let start = Instant::now();
    loop {
        match admin_at(path, method, params.clone()) {
            Ok(v) => return v,
            Err(e) if e.code == "busy" && start.elapsed() < DETACH_TIMEOUT => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("admin {method} {params} failed: {e:?}"),
        }
    }
}

pub fn admin_ok_when_idle(d: &Daemon, method: &str, params: Value) -> Value {
    admin_ok_when_idle_at(d.admin_path(), method, params)
}

static DUMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// The whole export at `uri`, copied with nbdcopy into a file under `work` and read back.
pub fn read_uri(uri: &str, work: &Path) -> Vec<u8> {
    require_tool("nbdcopy");
    let path = work.join(format!(
        "dump-{}.img",
        DUMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let dst = path.display().to_string();
    run_timeout("nbdcopy", &[uri, dst.as_str()], Duration::from_secs(120));
    let data = fs::read(&path).unwrap_or_else(|e| panic!("{dst}: {e}"));
    fs::remove_file(&path).ok();
    data
}

/// Copies an export out with nbdcopy. Returns once the daemon has let nbdcopy's connections
/// go (nbdcopy exits as soon as it has sent NBD_CMD_DISC), so an in-place restore or a resize
/// right after does not find the volume busy with them.
pub fn read_export(d: &Daemon, export: &str) -> Vec<u8> {
    // `volume.show` takes `vol@snap` too, with the view's own clients.
    let before = connections(d, export);
    let data = read_uri(&d.unix_uri(export), d.work_dir());
    wait_clients_at_most(d, export, before);
    data
}

/// Clients attached to `volume` (the admin socket's `connections`); None when it is not there.
pub fn connections(d: &Daemon, volume: &str) -> Option<u64> {
    admin(d, "volume.show", json!({"name": volume}))
        .ok()
        .and_then(|v| v["connections"].as_u64())
}

/// Waits (up to 10 s) until at most `count` clients are attached to `volume` (None: any
/// number, as when it did not exist before).
pub fn wait_clients_at_most(d: &Daemon, volume: &str, count: Option<u64>) {
    let Some(count) = count else { return };
    let start = Instant::now();
    while connections(d, volume).is_some_and(|now| now > count) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{volume} still has more than {count} client(s) attached after 10 s"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Panics with the first differing offset and the differing 4 KiB blocks.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} bytes, expected {}",
        got.len(),
        want.len()
    );
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
    let bad: Vec<usize> = (0..got.len())
        .step_by(BLOCK)
        .filter(|&o| {
            let e = (o + BLOCK).min(got.len());
            got[o..e] != want[o..e]
        })
        .collect();
    panic!(
        "{what}: content differs; first difference at byte {first} (got {:#04x}, expected \
         {:#04x}); {} differing 4 KiB blocks, the first at {:?}",
        got[first],
        want[first],
        bad.len(),
        &bad[..bad.len().min(16)]
    );
}
