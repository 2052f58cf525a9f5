//! The admin socket and evsctl: volume create/list/show/resize/delete, status, exit codes, and
//! the raw newline-delimited JSON protocol.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use evsd_e2e::raw::*;
use evsd_e2e::*;
use serde_json::{json, Value};

/// Exit codes documented in docs/admin-protocol.md.
const EXIT_INVALID: i32 = 2;
const EXIT_UNREACHABLE: i32 = 3;
const EXIT_NOT_FOUND: i32 = 4;
const EXIT_BUSY: i32 = 5;
const EXIT_EXISTS: i32 = 6;

fn exports(d: &Daemon) -> Vec<(String, u64)> {
    nbdinfo_list_json(d.tcp_addr())
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_owned(),
                e["export-size"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn export_size(d: &Daemon, name: &str) -> u64 {
    let out = run_stdout("nbdinfo", &["--json", &d.tcp_uri(name)]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
    v["exports"][0]["export-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no export-size: {v:#}"))
}

/// Runs evsctl and asserts its exit code; returns stderr.
fn expect_exit(d: &Daemon, args: &[&str], code: i32) -> String {
    let out = d.evsctl(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        format_output(&format!("evsctl {args:?} should exit {code}"), &out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.trim().is_empty(),
        "evsctl {args:?}: no message on stderr"
    );
    stderr
}

fn connections(d: &Daemon, name: &str) -> u64 {
    d.evsctl_json(&["volume", "show", name])["connections"]
        .as_u64()
        .unwrap()
}

#[test]
fn create_is_exported_at_once_and_survives_kill9() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    let mut d = Daemon::start_default();
    let out = d.evsctl_ok(&["volume", "create", "v1", "--size", "64M"]);
    assert_eq!(out, "created volume v1 (64.0 MiB)\n");
    let listed = exports(&d);
    assert!(listed.contains(&("v1".into(), 64 * MIB)), "{listed:?}");
    qemu_io(
        &d.unix_uri("v1"),
        &["write -P 0x3c 0 1M", "write -P 0x3d 63M 1M", "flush"],
    );
    qemu_io(
        &d.tcp_uri("v1"),
        &["read -P 0x3c 0 1M", "read -P 0x3d 63M 1M"],
    );
    // Created with a number of bytes too, then killed right away.
    d.evsctl_ok(&["volume", "create", "v2", "--size", "8192"]);
    d.kill9();
    d.restart();
    let listed = exports(&d);
    assert!(listed.contains(&("v1".into(), 64 * MIB)), "{listed:?}");
    assert!(listed.contains(&("v2".into(), 8192)), "{listed:?}");
    assert!(listed.contains(&("vol0".into(), GIB)), "{listed:?}");
    qemu_io(&d.tcp_uri("v1"), &["read -P 0x3c 0 1M", "read -P 0 1M 62M"]);
}

#[test]
fn list_show_and_status_output() {
    let d = Daemon::start(DaemonOpts::new().with_vol0().volume("data-1:512M"));
    let list = d.evsctl_json(&["volume", "list"]);
    let volumes = list["volumes"].as_array().expect("volumes array");
    assert_eq!(volumes.len(), 2, "{list:#}");
    let vol0 = volumes.iter().find(|v| v["name"] == "vol0").expect("vol0");
    assert_eq!(vol0["size_bytes"], json!(GIB));
    assert_eq!(vol0["connections"], json!(0));
    assert_eq!(vol0["uuid"].as_str().unwrap().len(), 36, "{vol0:#}");
    assert!(vol0["created_unix_secs"].as_u64().unwrap() > 1_600_000_000);

    let human = d.evsctl_ok(&["volume", "list"]);
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.len(), 3, "{human}");
    assert!(
        lines[0].starts_with("NAME    SIZE       CONNECTIONS  STATE  UUID"),
        "{human}"
    );
    assert!(
        lines[1].starts_with("data-1  512.0 MiB  0            ready  "),
        "{human}"
    );
    assert!(
        lines[2].starts_with("vol0    1.0 GiB    0            ready  "),
        "{human}"
    );
    // The columns line up: UUIDs start at the same offset on every line.
    let uuid_col = lines[0].find("UUID").unwrap();
    assert_eq!(lines[2][uuid_col..].len(), 36, "{human}");

    let show = d.evsctl_json(&["volume", "show", "data-1"]);
    assert_eq!(show["name"], "data-1");
    assert_eq!(show["size_bytes"], json!(512 * MIB));
    let human = d.evsctl_ok(&["volume", "show", "data-1"]);
    assert!(human.contains("name:        data-1\n"), "{human}");
    assert!(
        human.contains("size:        512.0 MiB (536870912 bytes)\n"),
        "{human}"
    );
    assert!(
        human.contains(&format!(
            "uuid:        {}\n",
            show["uuid"].as_str().unwrap()
        )),
        "{human}"
    );

    let status = d.evsctl_json(&["status"]);
    assert_eq!(status["version"], "0.1.0", "{status:#}");
    assert_eq!(status["listeners"]["tcp"], d.tcp_addr().to_string());
    assert_eq!(
        status["listeners"]["unix"],
        d.unix_path().display().to_string()
    );
    assert_eq!(
        status["listeners"]["admin"],
        d.admin_path().display().to_string()
    );
    let engine = status["io_engine"].as_str().unwrap();
    assert!(engine == "uring" || engine == "threads", "{status:#}");
    assert!(status["uptime_secs"].as_u64().is_some(), "{status:#}");
    assert_eq!(status["volumes"].as_array().unwrap().len(), 2, "{status:#}");
    let human = d.evsctl_ok(&["status"]);
    assert!(human.contains("version:   0.1.0\n"), "{human}");
    assert!(human.contains("vol0    1.0 GiB    0"), "{human}");

    // A reader that went away (`evsctl volume list | head -0`): no panic, the usual exit.
    let socket = d.admin_path().display().to_string();
    let mut child = std::process::Command::new(evsctl_bin())
        .args(["--socket", &socket, "volume", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("evsctl starts");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

#[test]
fn resize_grows_online_and_refuses_unsafe_shrinks() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    let mut d = Daemon::start(DaemonOpts::new().with_vol0().volume("v:64M"));
    qemu_io(&d.unix_uri("v"), &["write -P 0x77 0 1M", "flush"]);
    let (mut held, info) = Raw::open(d.tcp_addr(), "v");
    assert_eq!(info.size, 64 * MIB);
    assert!(wait_until(Duration::from_secs(5), || connections(&d, "v") == 1));

    let out = d.evsctl_ok(&["volume", "resize", "v", "--size", "128M"]);
    assert_eq!(out, "resized volume v: 64.0 MiB -> 128.0 MiB\n");
    assert_eq!(export_size(&d, "v"), 128 * MIB);
    qemu_io(
        &d.tcp_uri("v"),
        &[
            "read -P 0x77 0 1M",
            "write -P 0x78 127M 1M",
            "read -P 0x78 127M 1M",
        ],
    );
    // The connection made before keeps working at the size it negotiated.
    assert!(held.read(1, 0, 4096).iter().all(|&b| b == 0x77));

    let err = expect_exit(
        &d,
        &["volume", "resize", "v", "--size", "32M", "--allow-shrink"],
        EXIT_BUSY,
    );
    assert!(err.contains("connected"), "{err}");
    held.disconnect();
    assert!(wait_until(Duration::from_secs(5), || connections(&d, "v") == 0));
    let err = expect_exit(
        &d,
        &["volume", "resize", "v", "--size", "32M"],
        EXIT_INVALID,
    );
    assert!(err.contains("allow-shrink"), "{err}");
    assert_eq!(export_size(&d, "v"), 128 * MIB);

    let resized = d.evsctl_json(&["volume", "resize", "v", "--size", "32M", "--allow-shrink"]);
    assert_eq!(
        resized,
        json!({"name": "v", "old_size_bytes": 128 * MIB, "size_bytes": 32 * MIB})
    );
    assert_eq!(export_size(&d, "v"), 32 * MIB);
    qemu_io(&d.tcp_uri("v"), &["read -P 0x77 0 1M"]);
    d.kill9();
    d.restart();
    assert_eq!(export_size(&d, "v"), 32 * MIB);
    // The head layer's data file (named in the manifest) holds exactly the new size.
    let dir = d.data_dir().join("volumes/v");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("volume.json")).unwrap()).unwrap();
    let head = manifest["head"].as_str().unwrap();
    let file = dir.join(format!("{head}.data"));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 32 * MIB);
    qemu_io(&d.tcp_uri("v"), &["read -P 0x77 0 1M", "read -P 0 1M 31M"]);
}

#[test]
fn delete_refused_while_connected_unless_forced() {
    require_tool("nbdinfo");
    // Created through evsctl: `--create-volume` would bring them back at the restart below.
    let mut d = Daemon::start_default();
    d.evsctl_ok(&["volume", "create", "v", "--size", "64M"]);
    d.evsctl_ok(&["volume", "create", "w", "--size", "8M"]);
    let (mut held, _) = Raw::open(d.tcp_addr(), "v");
    held.write(1, 0, 0, &[0xaa; 4096]);
    assert!(wait_until(Duration::from_secs(5), || connections(&d, "v") == 1));

    let err = expect_exit(&d, &["volume", "delete", "v"], EXIT_BUSY);
    assert!(
        err.contains("\"v\"") && err.contains("1 connected"),
        "{err}"
    );
    assert!(exports(&d).iter().any(|(n, _)| n == "v"));
    assert!(held.read(2, 0, 4096).iter().all(|&b| b == 0xaa));

    let out = d.evsctl_ok(&["volume", "delete", "v", "--force"]);
    assert_eq!(out, "deleted volume v (disconnected 1 client(s))\n");
    held.expect_closed("after a forced delete");
    let names: Vec<String> = exports(&d).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["vol0", "w"]);
    let volumes_dir = d.data_dir().join("volumes");
    let leftovers = || {
        std::fs::read_dir(&volumes_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains('v') && n != "vol0")
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(10), || leftovers().is_empty()),
        "files of the deleted volume remain: {:?}",
        leftovers()
    );
    expect_exit(&d, &["volume", "delete", "v"], EXIT_NOT_FOUND);
    expect_exit(&d, &["volume", "show", "v"], EXIT_NOT_FOUND);

    // Without clients no force is needed; durable across kill -9.
    assert_eq!(
        d.evsctl_json(&["volume", "delete", "w"]),
        json!({"name": "w", "disconnected": 0})
    );
    d.kill9();
    d.restart();
    let names: Vec<String> = exports(&d).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["vol0"]);
    // The name is free again.
    d.evsctl_ok(&["volume", "create", "v", "--size", "4M"]);
    assert_eq!(export_size(&d, "v"), 4 * MIB);
}

#[test]
fn invalid_requests_get_distinct_exit_codes() {
    let mut d = Daemon::start_default();
    let err = expect_exit(&d, &["volume", "show", "nope"], EXIT_NOT_FOUND);
    assert!(err.contains("\"nope\""), "{err}");
    expect_exit(
        &d,
        &["volume", "resize", "nope", "--size", "1G"],
        EXIT_NOT_FOUND,
    );
    let long = "x".repeat(65);
    for name in ["../x", "a@b", "", ".hidden", "a/b", long.as_str()] {
        let err = expect_exit(
            &d,
            &["volume", "create", name, "--size", "1M"],
            EXIT_INVALID,
        );
        assert!(err.contains("invalid volume name"), "{name:?}: {err}");
    }
    for size in ["1.5G", "--size=-1", "0", "4097", "10X", ""] {
        let arg = if size.starts_with("--") {
            size.to_owned()
        } else {
            format!("--size={size}")
        };
        let err = expect_exit(&d, &["volume", "create", "ok", &arg], EXIT_INVALID);
        assert!(err.contains("size"), "{size:?}: {err}");
    }
    // Usage errors are invalid arguments too.
    expect_exit(&d, &["volume", "create", "ok"], EXIT_INVALID);
    expect_exit(&d, &["volume", "frobnicate"], EXIT_INVALID);
    let err = expect_exit(
        &d,
        &["volume", "create", "vol0", "--size", "1M"],
        EXIT_EXISTS,
    );
    assert!(err.contains("already exists"), "{err}");
    // None of that created anything.
    let list = d.evsctl_json(&["volume", "list"]);
    assert_eq!(list["volumes"].as_array().unwrap().len(), 1, "{list:#}");

    d.terminate_ok();
    assert!(
        !d.admin_path().exists(),
        "admin socket left behind after SIGTERM"
    );
    let err = expect_exit(&d, &["status"], EXIT_UNREACHABLE);
    assert!(err.contains("unreachable"), "{err}");
}

struct AdminConn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl AdminConn {
    fn open(d: &Daemon) -> (AdminConn, String) {
        let stream = UnixStream::connect(d.admin_path())
            .unwrap_or_else(|e| panic!("connect {}: {e}", d.admin_path().display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut conn = AdminConn {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = conn.line();
        (conn, greeting)
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read admin line");
        line
    }

    fn ask(&mut self, request: &[u8]) -> Value {
        self.writer.write_all(request).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let line = self.line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("response {line:?}: {e}"))
    }
}

#[test]
fn raw_admin_protocol() {
    let mut d = Daemon::start_default();
    let mode = std::fs::metadata(d.admin_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");

    let (mut c, greeting) = AdminConn::open(&d);
    assert_eq!(
        greeting,
        "{\"evsd\":{\"version\":\"0.1.0\",\"protocol\":1}}\n"
    );
    let r = c.ask(b"{this is not json");
    assert_eq!(r["id"], Value::Null, "{r}");
    assert_eq!(r["error"]["code"], "parse_error", "{r}");
    let r = c.ask(br#"{"id":"abc","method":"volume.list"}"#);
    assert_eq!(r["id"], "abc", "{r}");
    assert_eq!(r["result"]["volumes"][0]["name"], "vol0", "{r}");
    let r = c.ask(br#"{"id":[1,2],"method":"volume.explode","params":{}}"#);
    assert_eq!(r["id"], json!([1, 2]), "{r}");
    assert_eq!(r["error"]["code"], "unknown_method", "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("volume.explode"));
    let r = c.ask(
        br#"{"id":3,"method":"volume.create","params":{"name":"n","size":4096,"colour":"red"}}"#,
    );
    assert_eq!(r["error"]["code"], "invalid_argument", "{r}");
    let r = c.ask(br#"{"id":4,"method":"volume.create","params":{"name":"n","size":"8K"}}"#);
    assert_eq!(r["result"]["size_bytes"], json!(8192), "{r}");
    let r = c.ask(br#"{"id":5,"method":"volume.delete","params":{"name":"n"}}"#);
    assert_eq!(r["result"]["name"], "n", "{r}");

    // An overlong line: parse_error, then the daemon closes that connection.
    let (mut c2, _) = AdminConn::open(&d);
    let long = vec![b'x'; 100 * 1024];
    let _ = c2.writer.write_all(&long);
    let _ = c2.writer.write_all(b"\n");
    let r: Value = serde_json::from_str(&c2.line()).expect("a response to the overlong line");
    assert_eq!(r["error"]["code"], "parse_error", "{r}");
    let mut rest = Vec::new();
    let _ = c2.reader.read_to_end(&mut rest);
    assert!(rest.is_empty(), "more after the overlong line: {rest:?}");

    // The first connection and fresh ones still work; many clients at once.
    let r = c.ask(br#"{"id":6,"method":"status"}"#);
    assert_eq!(r["result"]["version"], "0.1.0", "{r}");
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let path = d.admin_path().to_owned();
            std::thread::spawn(move || {
                let stream = UnixStream::connect(&path).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let request = json!({"id": i, "method": "volume.create",
                    "params": {"name": format!("c{i}"), "size": "1M"}});
                writer.write_all(format!("{request}\n").as_bytes()).unwrap();
                line.clear();
                reader.read_line(&mut line).unwrap();
                serde_json::from_str::<Value>(&line).unwrap()
            })
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let r = client.join().unwrap();
        assert_eq!(r["id"], json!(i), "{r}");
        assert_eq!(r["result"]["size_bytes"], json!(MIB), "{r}");
    }
    let r = c.ask(br#"{"id":7,"method":"volume.list"}"#);
    assert_eq!(r["result"]["volumes"].as_array().unwrap().len(), 17, "{r}");
    d.assert_alive();
}

/// `evsctl --socket ADMIN ARGS…` from any thread; asserts exit 0 and returns stdout.
fn evsctl_at(admin: &std::path::Path, args: &[&str]) -> String {
    let socket = admin.display().to_string();
    let mut all = vec!["--socket", socket.as_str()];
    all.extend_from_slice(args);
    let out = run_timeout(
        &evsctl_bin().display().to_string(),
        &all,
        Duration::from_secs(60),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn volume_names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("no volumes array: {list:#}"))
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

fn volume_dirs(d: &Daemon) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(d.data_dir().join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn invalid_names_and_sizes_are_rejected_with_the_value_named() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume());
    let long = "n".repeat(65);
    for name in ["../x", "a@b", "", long.as_str()] {
        let err = expect_exit(
            &d,
            &["volume", "create", name, "--size", "1M"],
            EXIT_INVALID,
        );
        assert!(
            err.contains(&format!("invalid volume name {name:?}")),
            "{name:?}: {err}"
        );
        assert!(err.contains("[A-Za-z0-9._-]"), "{name:?}: {err}");
    }
    for size in ["1.5G", "-1", "0"] {
        let arg = format!("--size={size}");
        let err = expect_exit(&d, &["volume", "create", "ok", &arg], EXIT_INVALID);
        assert!(err.contains(size), "{size:?}: {err}");
        assert!(err.contains("size"), "{size:?}: {err}");
        // Resizing an existing volume checks the size the same way.
        d.evsctl_ok(&["volume", "create", "sized", "--size", "4M"]);
        expect_exit(&d, &["volume", "resize", "sized", &arg], EXIT_INVALID);
        d.evsctl_ok(&["volume", "delete", "sized"]);
    }
    // Past the largest volume (64 TiB), up to the largest 4 KiB multiple a u64 holds: refused
    // with the size named, before any file is made; the daemon keeps serving.
    for size in ["65T", "1024P", "18446744073709547520"] {
        let arg = format!("--size={size}");
        let err = expect_exit(&d, &["volume", "create", "huge", &arg], EXIT_INVALID);
        assert!(err.contains("64 TiB"), "{size:?}: {err}");
        d.evsctl_ok(&["volume", "create", "sized", "--size", "4M"]);
        let err = expect_exit(&d, &["volume", "resize", "sized", &arg], EXIT_INVALID);
        assert!(err.contains("64 TiB"), "resize to {size:?}: {err}");
        d.evsctl_ok(&["volume", "delete", "sized"]);
    }
    assert!(!volume_dirs(&d).iter().any(|v| v == "huge"));
    let list = d.evsctl_json(&["volume", "list"]);
    assert!(volume_names(&list).is_empty(), "{list:#}");
}

#[test]
fn many_admin_clients_at_once() {
    const CLIENTS: usize = 32;
    let d = Daemon::start(DaemonOpts::new().no_default_volume());
    let admin = d.admin_path().to_path_buf();
    std::thread::scope(|scope| {
        for i in 0..CLIENTS {
            let admin = &admin;
            scope.spawn(move || {
                let name = format!("client-{i:02}");
                evsctl_at(admin, &["volume", "create", &name, "--size", "4M"]);
                let shown = evsctl_at(admin, &["--json", "volume", "show", &name]);
                let shown: Value = serde_json::from_str(&shown).unwrap();
                assert_eq!(shown["size_bytes"], json!(4 * MIB), "{shown:#}");
                let list = evsctl_at(admin, &["--json", "volume", "list"]);
                let list: Value = serde_json::from_str(&list).unwrap();
                assert!(volume_names(&list).contains(&name), "{name}: {list:#}");
                // Even clients delete their volume again; odd ones keep it.
                if i % 2 == 0 {
                    evsctl_at(admin, &["volume", "delete", &name]);
                }
            });
        }
    });
    let expected: Vec<String> = (0..CLIENTS)
        .filter(|i| i % 2 == 1)
        .map(|i| format!("client-{i:02}"))
        .collect();
    let list = d.evsctl_json(&["volume", "list"]);
    assert_eq!(volume_names(&list), expected, "{list:#}");
    let mut exported: Vec<String> = exports(&d).into_iter().map(|(n, _)| n).collect();
    exported.sort();
    assert_eq!(exported, expected);
}

#[test]
fn kill9_right_after_create_or_delete_leaves_a_consistent_list() {
    require_tool("nbdinfo");
    // Created through the admin socket: a --create-volume flag would bring "gone" back on restart.
    let mut d = Daemon::start(DaemonOpts::new().no_default_volume());
    d.evsctl_ok(&["volume", "create", "gone", "--size", "8M"]);
    d.evsctl_ok(&["volume", "create", "kept", "--size", "8M"]);
    d.evsctl_ok(&["volume", "create", "fresh", "--size", "16M"]);
    d.kill9();
    d.restart();
    let list = d.evsctl_json(&["volume", "list"]);
    assert_eq!(volume_names(&list), ["fresh", "gone", "kept"], "{list:#}");

    d.evsctl_ok(&["volume", "delete", "gone"]);
    d.kill9();
    d.restart();
    let list = d.evsctl_json(&["volume", "list"]);
    assert_eq!(volume_names(&list), ["fresh", "kept"], "{list:#}");
    let mut exported = exports(&d);
    exported.sort();
    assert_eq!(
        exported,
        [("fresh".to_owned(), 16 * MIB), ("kept".to_owned(), 8 * MIB)]
    );
    // No half-created or half-deleted directory survives the restart.
    assert_eq!(volume_dirs(&d), ["fresh", "kept"]);
}

/// 64 admin clients that connect and then say nothing hold every place the socket serves; they
/// are disconnected after `--admin-idle-timeout-secs` (told why), and evsctl gets in again. A
/// client that keeps sending requests is not idle.
#[test]
fn idle_admin_clients_are_disconnected_and_do_not_lock_evsctl_out() {
    let d = Daemon::start(
        DaemonOpts::new()
            .no_default_volume()
            .arg("--admin-idle-timeout-secs")
            .arg("5"),
    );
    let mut idle: Vec<BufReader<UnixStream>> = (0..64)
        .map(|i| {
            let s = UnixStream::connect(d.admin_path()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let mut r = BufReader::new(s);
            let mut greeting = String::new();
            r.read_line(&mut greeting).unwrap();
            assert!(greeting.contains("evsd"), "client {i}: {greeting:?}");
            r
        })
        .collect();
    // Every place is taken: one more client is told so.
    let out = d.evsctl(&["status"]);
    assert!(!out.status.success(), "{}", format_output("status", &out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("too many admin clients"),
        "{}",
        format_output("status", &out)
    );
    let started = std::time::Instant::now();
    for r in &mut idle {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("no request for 5 s")),
            "{v}"
        );
        let mut rest = String::new();
        assert_eq!(r.read_line(&mut rest).unwrap(), 0, "still open: {rest:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    // A client that keeps sending requests (every 0.5 s for 4 s) is not idle.
    let mut busy = evsd_e2e::admin::Admin::connect(d.admin_path());
    for _ in 0..8 {
        let listed = busy
            .call("volume.list", &json!({}))
            .expect("a busy admin client was disconnected")
            .unwrap();
        assert!(listed["volumes"].is_array(), "{listed}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // One that sends only blank lines (every second) is idle all the same.
    let blank = UnixStream::connect(d.admin_path()).unwrap();
    blank
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut reader = BufReader::new(blank.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    let mut blank = blank;
    blank
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut said = String::new();
    while said.is_empty() && started.elapsed() < Duration::from_secs(12) {
        use std::io::Write;
        let _ = blank.write_all(b"\n");
        let _ = reader.read_line(&mut said);
    }
    assert!(said.contains("no request for 5 s"), "{said:?}");
    d.evsctl_ok(&["status"]);
}

/// The admin socket serves the daemon's user (and root) only, even if its file were opened
/// to others (its mode comes from the umask between bind and chmod): a client running as
/// `nobody` is closed without a reply.
#[test]
fn admin_clients_of_another_user_are_refused() {
    require_tool("setpriv");
    let d = Daemon::start_default();
    let socket = d.admin_path().to_path_buf();
    // Let `nobody` reach and connect to the socket, as a wide umask would have.
    let mut dir = socket.parent();
    while let Some(p) = dir {
        if p == std::path::Path::new("/") || p == std::path::Path::new("/tmp") {
            break;
        }
        let mode = std::fs::metadata(p).unwrap().permissions().mode();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode | 0o011)).unwrap();
        dir = p.parent();
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
data = b""
try:
    # The daemon may close before the request is sent (EPIPE) or while it is unread (reset).
    s.sendall(b'{"id":1,"method":"volume.list"}\n')
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except (BrokenPipeError, ConnectionResetError):
    pass  # closed before the request was sent, or with it unread
print("got %d bytes" % len(data))
"#;
    let socket_arg = socket.to_str().unwrap();
    let out = run_unchecked(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            // The system's python (the libnbd binding needs it too): `nobody` cannot reach a
            // user's own python under a home directory.
            "/usr/bin/python3",
            "-c",
            script,
            socket_arg,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "got 0 bytes", "another user was served");
    // The daemon's own user still is.
    let (mut c, _) = AdminConn::open(&d);
    let r = c.ask(br#"{"id":2,"method":"volume.list"}"#);
    assert_eq!(r["result"]["volumes"][0]["name"], "vol0", "{r}");
}
