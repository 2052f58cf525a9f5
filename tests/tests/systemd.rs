//! sd_notify readiness: evsd reports READY=1 only once it serves, and STOPPING=1 on SIGTERM.
//! Socket activation: evsd serves on the sockets `systemd-socket-activate` passes it.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
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

    // SAFETY: plain kill(2) on our own, not yet reaped, child.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    let stopping = recv(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// A port that was free a moment ago: systemd-socket-activate refuses port 0.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// Starts `systemd-socket-activate` listening on `listen` with `fdnames`, running evsd with
/// `evsd_args` once a client connects. Its output goes to `log`.
fn socket_activate(listen: &[String], fdnames: &str, evsd_args: &[&str], log: &Path) -> Kill {
    let activate = require_tool("systemd-socket-activate");
    let log = File::create(log).unwrap();
    let mut cmd = Command::new(activate);
    for addr in listen {
        cmd.arg(format!("--listen={addr}"));
    }
    let child = cmd
        .arg(format!("--fdname={fdnames}"))
        // The activator passes only LISTEN_* and --setenv variables on.
        .args(["--setenv=RUST_LOG=info", "--setenv=NO_COLOR=1", "--"])
        .arg(evsd_bin())
        .args(evsd_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Kill(child)
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn serves_nbd_and_admin_on_sockets_passed_by_systemd_socket_activate() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let dir = tempdir();
    let port = free_port();
    let nbd_sock = dir.path().join("nbd.sock");
    let admin_sock = dir.path().join("admin.sock");
    let unused_admin = dir.path().join("unused-admin.sock");
    let ready_file = dir.path().join("ready.json");
    let data = dir.path().join("data");
    let log = dir.path().join("evsd.log");
    let listen = [
        format!("127.0.0.1:{port}"),
        nbd_sock.display().to_string(),
        admin_sock.display().to_string(),
    ];
    let (data_s, ready_s, unused_s) = (
        data.display().to_string(),
        ready_file.display().to_string(),
        unused_admin.display().to_string(),
    );
    let mut child = socket_activate(
        &listen,
        "nbd:nbd:admin",
        &[
            "--listen",
            "off",
            "--metrics-listen",
            "off",
            "--no-default-volume",
            "--create-volume",
            "act1:64M",
            "--data-dir",
            &data_s,
            "--ready-file",
            &ready_s,
            // Where evsd would bind if it ignored the inherited admin socket.
            "--admin-socket",
            &unused_s,
        ],
        &log,
    );
    assert!(
        wait_until(Duration::from_secs(30), || admin_sock.exists()),
        "systemd-socket-activate did not bind {}\n{}",
        admin_sock.display(),
        read_log(&log)
    );

    // The first connection starts evsd; it answers through the socket it was given.
    let evsctl = evsctl_bin().display().to_string();
    let admin_s = admin_sock.display().to_string();
    let status = run_timeout(
        &evsctl,
        &["--socket", &admin_s, "--json", "status"],
        Duration::from_secs(60),
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let listeners = &status["listeners"];
    assert_eq!(
        listeners["tcp"],
        serde_json::json!(format!("127.0.0.1:{port}")),
        "{status:#}"
    );
    assert_eq!(
        listeners["unix"],
        serde_json::json!(nbd_sock.display().to_string()),
        "{status:#}"
    );
    assert_eq!(listeners["admin"], serde_json::json!(admin_s), "{status:#}");
    assert!(!unused_admin.exists(), "evsd bound its own admin socket");

    // The ready file reports the inherited addresses; the activator exec'd evsd in place.
    let ready: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready_file).unwrap()).unwrap();
    assert_eq!(ready["tcp"], serde_json::json!(format!("127.0.0.1:{port}")));
    assert_eq!(
        ready["unix"],
        serde_json::json!(nbd_sock.display().to_string())
    );
    assert_eq!(ready["pid"], serde_json::json!(child.0.id()));

    // Data written through the activated TCP socket reads back through the Unix one.
    let tcp_uri = format!("nbd://127.0.0.1:{port}/act1");
    let unix_uri = format!("nbd+unix:///act1?socket={}", nbd_sock.display());
    qemu_io(&tcp_uri, &["write -P 0x6e 1M 2M", "flush"]);
    qemu_io(&unix_uri, &["read -P 0x6e 1M 2M", "read -P 0 0 1M"]);

    // Volume management works through the inherited admin socket.
    run_timeout(
        &evsctl,
        &[
            "--socket", &admin_s, "volume", "create", "act2", "--size", "8M",
        ],
        Duration::from_secs(60),
    );
    let list = run_stdout("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]);
    assert!(list.contains("act2"), "{list}");

    // SAFETY: plain kill(2) on our own, not yet reaped, child (evsd, exec'd in its place).
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}\n{}", read_log(&log));
    // The socket files belong to whoever bound them: evsd leaves them in place.
    assert!(nbd_sock.exists(), "evsd removed the inherited NBD socket");
    assert!(
        admin_sock.exists(),
        "evsd removed the inherited admin socket"
    );
    let log = read_log(&log);
    assert!(
        log.contains("using NBD sockets passed by the service manager"),
        "{log}"
    );
}

#[test]
fn refuses_an_inherited_socket_with_an_unknown_name() {
    let dir = tempdir();
    let port = free_port();
    let log = dir.path().join("evsd.log");
    let data = dir.path().join("data").display().to_string();
    let mut child = socket_activate(
        &[format!("127.0.0.1:{port}")],
        "bogus",
        &[
            "--listen",
            "off",
            "--metrics-listen",
            "off",
            "--data-dir",
            &data,
        ],
        &log,
    );
    // Connecting starts evsd, which must fail and say which name it did not know.
    let connected = wait_until(Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(connected, "activator never listened\n{}", read_log(&log));
    let exited = wait_until(Duration::from_secs(30), || {
        matches!(child.0.try_wait(), Ok(Some(_)))
    });
    assert!(exited, "evsd kept running\n{}", read_log(&log));
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "{status}");
    let log = read_log(&log);
    assert!(log.contains("\"bogus\""), "{log}");
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let analyze = require_tool("systemd-analyze");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let dir = tempdir();
    let names = ["evsd.service", "evsd.socket", "evsd-admin.socket"];
    for name in names {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        // verify checks that ExecStart= exists: point it at the binary under test.
        let text = text.replace("/usr/local/bin/evsd", &evsd_bin().display().to_string());
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let paths: Vec<String> = names
        .iter()
        .map(|n| dir.path().join(n).display().to_string())
        .collect();
    let out = run_unchecked_timeout(
        &analyze.display().to_string(),
        &[&["verify".to_owned()], paths.as_slice()].concat(),
        Duration::from_secs(60),
    );
    // verify also reports problems in unrelated system units; only ours matter here.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("evsd")).collect();
    assert!(
        ours.is_empty(),
        "{}",
        format_output("systemd-analyze verify", &out)
    );
}

/// The unit's system call filter lets through the calls evsd's fast paths need (io_uring, and
/// mincore and cachestat for the reads sent from the page cache and the in-place writes), as
/// this machine's systemd expands its groups: a call refused with EPERM turns a path off.
#[test]
fn the_units_system_call_filter_allows_the_fast_paths() {
    let analyze = require_tool("systemd-analyze");
    let out = run_unchecked_timeout(
        &analyze.display().to_string(),
        &["syscall-filter".to_owned()],
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        format_output("syscall-filter", &out)
    );
    // Groups ("@name" lines), each followed by its indented members (calls or groups).
    let mut groups: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut current = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_owned());
        } else if let (Some(group), member) = (&current, line.trim()) {
            if !member.is_empty() && !member.starts_with('#') {
                groups
                    .entry(group.clone())
                    .or_default()
                    .push(member.to_owned());
            }
        }
    }
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/evsd.service"),
    )
    .unwrap();
    let expand = |denied: bool| {
        let mut names = std::collections::HashSet::new();
        let mut to_expand: Vec<String> = unit
            .lines()
            .filter_map(|l| l.strip_prefix("SystemCallFilter="))
            .filter_map(|l| match l.strip_prefix('~') {
                Some(rest) if denied => Some(rest),
                None if !denied => Some(l),
                _ => None,
            })
            .flat_map(|l| l.split_whitespace().map(str::to_owned))
            .collect();
        while let Some(name) = to_expand.pop() {
            if !names.insert(name.clone()) {
                continue;
            }
            if let Some(members) = groups.get(&name) {
                to_expand.extend(members.iter().cloned());
            }
        }
        names
    };
    let (allowed, denied) = (expand(false), expand(true));
    for call in [
        "io_uring_setup",
        "io_uring_enter",
        "mincore",
        "cachestat",
        "sendfile",
    ] {
        assert!(
            allowed.contains(call) && !denied.contains(call),
            "the unit's filter refuses {call}"
        );
    }
}
