//! sd_notify readiness: evsd reports READY=1 only once it serves, and STOPPING=1 on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use evsd_e2e::raw::*;
use evsd_e2e::*;

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn recv(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no sd_notify message: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn notifies_ready_after_listening_and_stopping_on_sigterm() {
    let dir = tempdir();
    let notify_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let ready_file = dir.path().join("ready.json");
    let child = Command::new(evsd_bin())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--ready-file")
        .arg(&ready_file)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Kill(child);

    let ready = recv(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=serving 1 volume")),
        "{ready:?}"
    );
    // READY=1 comes after the listeners are bound: the NBD port answers at once.
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready_file).unwrap()).unwrap();
    let tcp = v["tcp"].as_str().unwrap().parse().unwrap();
    let mut c = Raw::handshake(tcp, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    assert_eq!(c.list(), vec!["vol0".to_string()]);

    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    let stopping = recv(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}");
}
