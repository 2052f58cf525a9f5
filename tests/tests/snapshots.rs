//! Snapshots end to end: frozen read-only `VOL@SNAP` exports, rollback, clones, deletion of the
//! oldest / a middle / the newest snapshot (with its merge), a 64-deep chain, the
//! `qemu:allocation-depth` and `qemu:dirty-bitmap:SNAP` metadata contexts, kill -9 during writes,
//! during `snapshot.create` and during a `snapshot.delete` merge, and fio with verification while
//! snapshots come and go underneath it.
//!
//! The admin methods are driven through the admin socket's JSON protocol directly
//! (docs/admin-protocol.md), so most tests do not depend on evsctl; `evsctl_snapshot_commands`
//! runs the evsctl `snapshot` commands as well. Whole contents are read back with nbdcopy and
//! compared byte for byte with an in-memory model of what each export must hold.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use evsd_e2e::admin::*;
use evsd_e2e::raw::*;
use evsd_e2e::*;
use serde_json::{json, Value};

const BLOCK: u64 = 4096;

// ---------------------------------------------------------------------------
// The admin socket, spoken directly
// ---------------------------------------------------------------------------

fn create_volume(d: &Daemon, name: &str, size: u64) -> Value {
    let v = admin_ok(d, "volume.create", json!({"name": name, "size": size}));
    assert_eq!(v["size_bytes"], json!(size), "{v:#}");
    v
}

fn snap_create(d: &Daemon, vol: &str, name: &str) -> Value {
    let v = admin_ok(d, "snapshot.create", json!({"volume": vol, "name": name}));
    assert_eq!(v["volume"], json!(vol), "{v:#}");
    assert_eq!(v["name"], json!(name), "{v:#}");
    v
}

/// Deletes (retrying while a reader that just finished is still attached); returns the info.
fn snap_delete(d: &Daemon, vol: &str, name: &str) -> Value {
    let v = admin_ok_when_idle(d, "snapshot.delete", json!({"volume": vol, "name": name}));
    assert_eq!(v["volume"], json!(vol), "{v:#}");
    assert_eq!(v["name"], json!(name), "{v:#}");
    v
}

fn rollback(d: &Daemon, vol: &str, name: &str) -> Value {
    admin_ok_when_idle(d, "snapshot.rollback", json!({"volume": vol, "name": name}))
}

fn snap_list_at(path: &Path, vol: &str) -> Vec<Value> {
    let v = admin_at(path, "snapshot.list", json!({"volume": vol}))
        .unwrap_or_else(|e| panic!("snapshot.list {vol}: {e:?}"));
    v["snapshots"]
        .as_array()
        .unwrap_or_else(|| panic!("snapshot.list: no snapshots array: {v:#}"))
        .clone()
}

fn snap_list(d: &Daemon, vol: &str) -> Vec<Value> {
    snap_list_at(d.admin_path(), vol)
}

fn snap_names_at(path: &Path, vol: &str) -> Vec<String> {
    snap_list_at(path, vol)
        .iter()
        .map(|s| {
            assert_eq!(s["volume"], json!(vol), "{s:#}");
            s["name"].as_str().expect("snapshot name").to_owned()
        })
        .collect()
}

fn snap_names(d: &Daemon, vol: &str) -> Vec<String> {
    snap_names_at(d.admin_path(), vol)
}

fn connections(d: &Daemon, vol: &str) -> u64 {
    admin_ok(d, "volume.show", json!({"name": vol}))["connections"]
        .as_u64()
        .expect("connections")
}

fn start() -> Daemon {
    Daemon::start(DaemonOpts::new().no_default_volume())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------
// Reading exports back
// ---------------------------------------------------------------------------

fn assert_content(d: &Daemon, export: &str, want: &[u8]) {
    let got = read_export(d, export);
    assert_same(&format!("export {export}"), &got, want);
}

fn export_size(d: &Daemon, export: &str) -> u64 {
    let out = run_stdout("nbdinfo", &["--size", &d.unix_uri(export)]);
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("nbdinfo --size {export}: {e}: {out:?}"))
}

/// `nbdinfo --list --json`: name -> the export's JSON object.
fn listed_exports(d: &Daemon) -> BTreeMap<String, Value> {
    nbdinfo_list_json(d.tcp_addr())
        .into_iter()
        .map(|e| (e["export-name"].as_str().unwrap().to_owned(), e))
        .collect()
}

/// Metadata contexts the export offers (`nbdinfo --json`).
fn contexts(d: &Daemon, export: &str) -> Vec<String> {
    let out = run_stdout("nbdinfo", &["--json", &d.unix_uri(export)]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
    let mut c: Vec<String> = v["exports"][0]["contexts"]
        .as_array()
        .unwrap_or_else(|| panic!("no contexts: {v:#}"))
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    c.sort();
    c
}

/// (offset, length, type)
type Extent = (u64, u64, u64);

/// Adjacent extents of the same type merged into one.
fn coalesce(ext: &[Extent]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for &(o, l, t) in ext {
        if let Some(last) = out.last_mut() {
            if last.2 == t && last.0 + last.1 == o {
                last.1 += l;
                continue;
            }
        }
        out.push((o, l, t));
    }
    out
}

/// `nbdinfo --map=CONTEXT --json`, checked to tile the export, coalesced.
fn map(d: &Daemon, export: &str, context: &str) -> Vec<Extent> {
    let uri = d.unix_uri(export);
    let out = run_stdout("nbdinfo", &[&format!("--map={context}"), "--json", &uri]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
    let ext: Vec<Extent> = v
        .as_array()
        .unwrap_or_else(|| panic!("map is not an array: {out}"))
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut pos = 0;
    for e in &ext {
        assert_eq!(
            e.0, pos,
            "{export} {context}: gap/overlap at {pos}: {ext:?}"
        );
        assert!(e.1 > 0, "{export} {context}: empty extent in {ext:?}");
        pos += e.1;
    }
    assert_eq!(
        pos,
        export_size(d, export),
        "{export} {context}: map does not cover the export"
    );
    coalesce(&ext)
}

fn assert_map(d: &Daemon, export: &str, context: &str, want: &[Extent]) {
    let got = map(d, export, context);
    assert_eq!(
        got,
        coalesce(want),
        "{export} {context}: extents (offset, length, type) differ"
    );
}

// ---------------------------------------------------------------------------
// Content models
// ---------------------------------------------------------------------------

fn fill(m: &mut [u8], off: u64, len: u64, byte: u8) {
    m[off as usize..(off + len) as usize].fill(byte);
}

fn put(m: &mut [u8], off: u64, data: &[u8]) {
    m[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// vol0 (16 MiB) with pattern A, snapshot s1, then pattern B (including a trim into A's data).
/// Returns the models of A and B.
fn setup_a_s1_b(d: &Daemon) -> (Vec<u8>, Vec<u8>) {
    create_volume(d, "vol0", 16 * MIB);
    let uri = d.unix_uri("vol0");
    let mut a = vec![0u8; (16 * MIB) as usize];
    qemu_io(&uri, &["write -P 0xa1 0 1M", "write -P 0xa1 8M 1M"]);
    fill(&mut a, 0, MIB, 0xa1);
    fill(&mut a, 8 * MIB, MIB, 0xa1);
    snap_create(d, "vol0", "s1");
    let mut b = a.clone();
    qemu_io(
        &uri,
        &[
            "write -P 0xb2 0 512K",
            "write -P 0xb2 4M 1M",
            "discard 8M 64K",
        ],
    );
    fill(&mut b, 0, 512 * KIB, 0xb2);
    fill(&mut b, 4 * MIB, MIB, 0xb2);
    fill(&mut b, 8 * MIB, 64 * KIB, 0);
    (a, b)
}

// ---------------------------------------------------------------------------
// 1. Semantics: frozen content, read-only export
// ---------------------------------------------------------------------------

#[test]
fn snapshot_freezes_content_and_is_exported_read_only() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let d = start();
    create_volume(&d, "vol0", 16 * MIB);
    let uri = d.unix_uri("vol0");
    let mut a = vec![0u8; (16 * MIB) as usize];
    qemu_io(&uri, &["write -P 0xa1 0 1M", "write -P 0xa1 8M 1M"]);
    fill(&mut a, 0, MIB, 0xa1);
    fill(&mut a, 8 * MIB, MIB, 0xa1);
    // Acknowledged but never flushed, on a connection that stays open across the snapshot.
    let (mut held, _) = Raw::open(d.tcp_addr(), "vol0");
    held.write(1, 0, 12 * MIB, &[0xa3; 4096]);
    fill(&mut a, 12 * MIB, BLOCK, 0xa3);

    let before = now_secs();
    let info = snap_create(&d, "vol0", "s1");
    assert_eq!(info["size_bytes"], json!(16 * MIB), "{info:#}");
    let created = info["created_unix_secs"]
        .as_u64()
        .expect("created_unix_secs");
    assert!(
        created + 5 >= before && created <= now_secs() + 5,
        "created_unix_secs {created} is not now ({before}): {info:#}"
    );
    // The snapshot's own layer holds exactly the data written so far: 2 MiB + 4 KiB.
    assert_eq!(info["own_bytes"], json!(2 * MIB + BLOCK), "{info:#}");
    let listed = snap_list(&d, "vol0");
    assert_eq!(
        listed,
        vec![info.clone()],
        "snapshot.list vs snapshot.create"
    );

    // Acknowledged after the snapshot: only in the volume.
    held.write(2, 0, 12 * MIB, &[0xb3; 4096]);
    let mut b = a.clone();
    fill(&mut b, 12 * MIB, BLOCK, 0xb3);
    qemu_io(
        &uri,
        &[
            "write -P 0xb2 0 512K",
            "write -P 0xb2 4M 1M",
            "discard 8M 64K",
        ],
    );
    fill(&mut b, 0, 512 * KIB, 0xb2);
    fill(&mut b, 4 * MIB, MIB, 0xb2);
    fill(&mut b, 8 * MIB, 64 * KIB, 0);

    // The snapshot reads A, through qemu over TCP and nbdcopy over the Unix socket.
    qemu_io_read_only(
        &d.tcp_uri("vol0@s1"),
        &[
            "read -P 0xa1 0 1M",
            "read -P 0 1M 7M",
            "read -P 0xa1 8M 1M",
            "read -P 0 9M 3M",
            "read -P 0xa3 12M 4K",
            "read -P 0 12292K 4092K",
        ],
    );
    assert_content(&d, "vol0@s1", &a);
    // The volume reads B, also on the connection made before the snapshot.
    qemu_io(
        &d.tcp_uri("vol0"),
        &[
            "read -P 0xb2 0 512K",
            "read -P 0xa1 512K 512K",
            "read -P 0xb2 4M 1M",
            "read -P 0 8M 64K",
            "read -P 0xa1 8256K 960K",
        ],
    );
    assert_content(&d, "vol0", &b);
    assert!(held.read(3, 12 * MIB, 4096).iter().all(|&x| x == 0xb3));
    held.disconnect();

    // Listed, with the snapshot's size, read-only.
    let exports = listed_exports(&d);
    let names: Vec<&String> = exports.keys().collect();
    assert_eq!(names, ["vol0", "vol0@s1"], "nbdinfo --list");
    assert_eq!(exports["vol0@s1"]["export-size"], json!(16 * MIB));
    assert_eq!(exports["vol0@s1"]["is_read_only"], json!(true));
    assert_eq!(exports["vol0"]["is_read_only"], json!(false));

    // Writes, trims and zeroes are refused by the server with EPERM (libnbd's own read-only
    // check is switched off so that the requests reach the server).
    let script = format!(
        r#"
import errno
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_COMMANDS)
h.connect_uri("{uri}")
print("read_only", h.is_read_only())
def attempt(name, f):
    try:
        f()
        print(name, "ok")
    except nbd.Error as e:
        print(name, errno.errorcode.get(e.errno, str(e.errno)))
attempt("write", lambda: h.pwrite(b"\xee" * 4096, 0))
attempt("write_fua", lambda: h.pwrite(b"\xee" * 4096, 8388608, nbd.CMD_FLAG_FUA))
attempt("trim", lambda: h.trim(65536, 0))
attempt("zero", lambda: h.zero(65536, 65536))
print("intact", h.pread(1048576, 0) == b"\xa1" * 1048576, h.pread(4096, 8388608) == b"\xa1" * 4096)
h.shutdown()
"#,
        uri = d.unix_uri("vol0@s1")
    );
    let out = nbdsh(&script);
    assert_eq!(
        out,
        "read_only True\nwrite EPERM\nwrite_fua EPERM\ntrim EPERM\nzero EPERM\nintact True True\n",
        "nbdsh against vol0@s1"
    );
    // The same with a hand-made client, checking the transmission flags and the error values.
    let (mut r, info) = Raw::open(d.tcp_addr(), "vol0@s1");
    assert_eq!(info.size, 16 * MIB);
    assert_ne!(
        info.flags & TF_READ_ONLY,
        0,
        "vol0@s1 flags {:#x}",
        info.flags
    );
    r.send_req(0, CMD_WRITE, 10, 0, 4096, &[0xee; 4096]);
    assert_eq!(r.read_status(10), EPERM, "WRITE to vol0@s1");
    assert_eq!(r.command(0, CMD_TRIM, 11, 0, 4096), EPERM, "TRIM");
    assert_eq!(
        r.command(0, CMD_WRITE_ZEROES, 12, 0, 4096),
        EPERM,
        "WRITE_ZEROES"
    );
    assert!(r.read(13, 0, 4096).iter().all(|&x| x == 0xa1));
    r.disconnect();
    assert_content(&d, "vol0@s1", &a);
    assert_content(&d, "vol0", &b);
}

#[test]
fn snapshot_admin_errors() {
    require_tool("nbdinfo");
    let d = start();
    create_volume(&d, "vol0", 8 * MIB);
    create_volume(&d, "vol1", 8 * MIB);
    admin_err(
        &d,
        "snapshot.create",
        json!({"volume": "nope", "name": "s1"}),
        "not_found",
    );
    admin_err(&d, "snapshot.list", json!({"volume": "nope"}), "not_found");
    for bad in ["", ".hidden", "a/b", "a@b", "sp ace", &"x".repeat(65)] {
        admin_err(
            &d,
            "snapshot.create",
            json!({"volume": "vol0", "name": bad}),
            "invalid_argument",
        );
    }
    // Backups own the "vbs-" names: they release every other one after a backup and take
    // one of them for the next incremental's base.
    let reserved = admin_err(
        &d,
        "snapshot.create",
        json!({"volume": "vol0", "name": "vbs-keep"}),
        "invalid_argument",
    );
    assert!(
        reserved.contains("vbs-keep") && reserved.contains("reserved"),
        "{reserved}"
    );
    assert_eq!(snap_names(&d, "vol0"), Vec::<String>::new());
    let long = "L".repeat(64);
    // Listed oldest first, not by name.
    for name in ["zz", "a.b-c_9", long.as_str(), "mm"] {
        snap_create(&d, "vol0", name);
    }
    assert_eq!(
        snap_names(&d, "vol0"),
        ["zz", "a.b-c_9", long.as_str(), "mm"]
    );
    admin_err(
        &d,
        "snapshot.create",
        json!({"volume": "vol0", "name": "zz"}),
        "already_exists",
    );
    // A snapshot export is not a volume: deleting it by that name is refused and leaves the
    // export serving.
    admin_err(
        &d,
        "volume.delete",
        json!({"name": "vol0@zz", "force": true}),
        "not_found",
    );
    assert_eq!(export_size(&d, "vol0@zz"), 8 * MIB);
    // Names are per volume.
    snap_create(&d, "vol1", "zz");
    assert_eq!(snap_names(&d, "vol1"), ["zz"]);
    for method in ["snapshot.delete", "snapshot.rollback"] {
        admin_err(
            &d,
            method,
            json!({"volume": "vol0", "name": "nope"}),
            "not_found",
        );
        admin_err(
            &d,
            method,
            json!({"volume": "nope", "name": "zz"}),
            "not_found",
        );
    }
    // Clones: exactly one of size and from_snapshot.
    admin_err(
        &d,
        "volume.create",
        json!({"name": "c", "size": 8 * MIB, "from_snapshot": "vol0@zz"}),
        "invalid_argument",
    );
    admin_err(
        &d,
        "volume.create",
        json!({"name": "c"}),
        "invalid_argument",
    );
    admin_err(
        &d,
        "volume.create",
        json!({"name": "c", "from_snapshot": "vol0"}),
        "invalid_argument",
    );
    admin_err(
        &d,
        "volume.create",
        json!({"name": "c", "from_snapshot": "vol0@nope"}),
        "not_found",
    );
    admin_err(
        &d,
        "volume.create",
        json!({"name": "c", "from_snapshot": "nope@zz"}),
        "not_found",
    );
    admin_err(
        &d,
        "volume.create",
        json!({"name": "vol1", "from_snapshot": "vol0@zz"}),
        "already_exists",
    );
    // A snapshot export that does not exist is refused at the handshake.
    let out = run_unchecked("nbdinfo", &[&d.unix_uri("vol0@nope")]);
    assert!(
        !out.status.success(),
        "{}",
        format_output("nbdinfo vol0@nope", &out)
    );

    // Deleting a snapshot while a client has it open: busy, until that client leaves.
    let (held, _) = Raw::open(d.tcp_addr(), "vol0@mm");
    let msg = admin_err(
        &d,
        "snapshot.delete",
        json!({"volume": "vol0", "name": "mm"}),
        "busy",
    );
    assert!(msg.contains("mm"), "{msg}");
    assert_eq!(snap_names(&d, "vol0").len(), 4);
    held.disconnect();
    snap_delete(&d, "vol0", "mm");
    assert_eq!(snap_names(&d, "vol0"), ["zz", "a.b-c_9", long.as_str()]);
    let names: Vec<String> = listed_exports(&d).into_keys().collect();
    assert_eq!(
        names,
        [
            "vol0".to_string(),
            format!("vol0@{long}"),
            "vol0@a.b-c_9".into(),
            "vol0@zz".into(),
            "vol1".into(),
            "vol1@zz".into()
        ]
    );
}

// ---------------------------------------------------------------------------
// 2. Rollback
// ---------------------------------------------------------------------------

#[test]
fn rollback_refused_with_clients_unless_forced_and_keeps_newer_snapshots() {
    require_tool("qemu-io");
    let mut d = start();
    let (a, b) = setup_a_s1_b(&d);
    snap_create(&d, "vol0", "s2");
    // Grow, write past the old end, snapshot at the new size.
    admin_ok(
        &d,
        "volume.resize",
        json!({"name": "vol0", "size": 24 * MIB}),
    );
    let uri = d.unix_uri("vol0");
    qemu_io(&uri, &["write -P 0xc3 20M 1M", "write -P 0xc3 0 64K"]);
    let mut c = b.clone();
    c.resize((24 * MIB) as usize, 0);
    fill(&mut c, 20 * MIB, MIB, 0xc3);
    fill(&mut c, 0, 64 * KIB, 0xc3);
    let s3 = snap_create(&d, "vol0", "s3");
    assert_eq!(s3["size_bytes"], json!(24 * MIB), "{s3:#}");
    qemu_io(&uri, &["write -P 0xd4 1M 1M"]);
    let mut head = c.clone();
    fill(&mut head, MIB, MIB, 0xd4);

    let (mut held, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(
        wait_until(DETACH_TIMEOUT, || connections(&d, "vol0") == 1),
        "vol0 should have exactly the held client"
    );
    let msg = admin_err(
        &d,
        "snapshot.rollback",
        json!({"volume": "vol0", "name": "s1"}),
        "busy",
    );
    assert!(msg.contains("vol0"), "{msg}");
    // Refused: nothing changed, the client still works.
    assert!(held.read(1, 0, 4096).iter().all(|&x| x == 0xc3));
    assert_content(&d, "vol0", &head);

    let info = admin_ok(
        &d,
        "snapshot.rollback",
        json!({"volume": "vol0", "name": "s1", "force": true}),
    );
    assert_eq!(info["name"], json!("vol0"), "{info:#}");
    assert_eq!(info["size_bytes"], json!(16 * MIB), "{info:#}");
    held.expect_closed("after a forced rollback");
    assert_eq!(export_size(&d, "vol0"), 16 * MIB);
    assert_content(&d, "vol0", &a);
    // Newer snapshots stay, with their own content and size.
    assert_eq!(snap_names(&d, "vol0"), ["s1", "s2", "s3"]);
    assert_content(&d, "vol0@s1", &a);
    assert_content(&d, "vol0@s2", &b);
    assert_content(&d, "vol0@s3", &c);

    // Writes after the rollback change the volume only.
    qemu_io(&uri, &["write -P 0xe5 2M 1M", "read -P 0xa1 0 1M"]);
    let mut e = a.clone();
    fill(&mut e, 2 * MIB, MIB, 0xe5);
    assert_content(&d, "vol0", &e);
    assert_content(&d, "vol0@s1", &a);

    // Forward to the newest, then back to the middle one; no client: no force needed.
    let info = rollback(&d, "vol0", "s3");
    assert_eq!(info["size_bytes"], json!(24 * MIB), "{info:#}");
    assert_content(&d, "vol0", &c);
    let info = rollback(&d, "vol0", "s2");
    assert_eq!(info["size_bytes"], json!(16 * MIB), "{info:#}");
    assert_content(&d, "vol0", &b);

    d.restart();
    assert_eq!(snap_names(&d, "vol0"), ["s1", "s2", "s3"]);
    assert_content(&d, "vol0", &b);
    assert_content(&d, "vol0@s1", &a);
    assert_content(&d, "vol0@s3", &c);
}

// ---------------------------------------------------------------------------
// 3. Clones
// ---------------------------------------------------------------------------

#[test]
fn clone_is_independent_and_outlives_its_source() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let mut d = start();
    let (a, b) = setup_a_s1_b(&d);
    let info = admin_ok(
        &d,
        "volume.create",
        json!({"name": "clone", "from_snapshot": "vol0@s1"}),
    );
    assert_eq!(info["name"], json!("clone"), "{info:#}");
    assert_eq!(info["size_bytes"], json!(16 * MIB), "{info:#}");
    assert_eq!(snap_names(&d, "clone"), Vec::<String>::new());
    assert_content(&d, "clone", &a);

    let cu = d.unix_uri("clone");
    qemu_io(
        &cu,
        &[
            "write -P 0xc3 0 256K",
            "write -P 0xc3 2M 1M",
            "discard 8M 64K",
        ],
    );
    let mut ac = a.clone();
    fill(&mut ac, 0, 256 * KIB, 0xc3);
    fill(&mut ac, 2 * MIB, MIB, 0xc3);
    fill(&mut ac, 8 * MIB, 64 * KIB, 0);
    assert_content(&d, "clone", &ac);
    assert_content(&d, "vol0", &b);
    assert_content(&d, "vol0@s1", &a);
    // The source keeps changing independently.
    qemu_io(&d.unix_uri("vol0"), &["write -P 0xb9 2M 64K"]);
    let mut b2 = b.clone();
    fill(&mut b2, 2 * MIB, 64 * KIB, 0xb9);
    assert_content(&d, "clone", &ac);
    snap_create(&d, "clone", "c1");

    // Deleting the source takes its snapshots along; the clone keeps its data.
    admin_ok_when_idle(&d, "volume.delete", json!({"name": "vol0"}));
    let names: Vec<String> = listed_exports(&d).into_keys().collect();
    assert_eq!(names, ["clone", "clone@c1"]);
    admin_err(&d, "snapshot.list", json!({"volume": "vol0"}), "not_found");
    assert_content(&d, "clone", &ac);
    assert_content(&d, "clone@c1", &ac);
    qemu_io(&cu, &["write -P 0xc4 8M 1M"]);
    let mut ac2 = ac.clone();
    fill(&mut ac2, 8 * MIB, MIB, 0xc4);

    // A clone of the clone's snapshot, and the name vol0 re-used for a fresh volume.
    admin_ok(
        &d,
        "volume.create",
        json!({"name": "clone2", "from_snapshot": "clone@c1"}),
    );
    create_volume(&d, "vol0", 16 * MIB);
    assert_eq!(snap_names(&d, "vol0"), Vec::<String>::new());
    assert_content(&d, "vol0", &vec![0u8; (16 * MIB) as usize]);

    d.kill9();
    d.restart();
    let names: Vec<String> = listed_exports(&d).into_keys().collect();
    assert_eq!(names, ["clone", "clone2", "clone@c1", "vol0"]);
    assert_content(&d, "clone", &ac2);
    assert_content(&d, "clone@c1", &ac);
    assert_content(&d, "clone2", &ac);
    // Deleting the snapshot both clones share leaves both intact.
    snap_delete(&d, "clone", "c1");
    assert_content(&d, "clone", &ac2);
    assert_content(&d, "clone2", &ac);
    admin_ok_when_idle(&d, "volume.delete", json!({"name": "clone"}));
    assert_content(&d, "clone2", &ac);
}

// ---------------------------------------------------------------------------
// 4. Deleting the middle, the oldest, the newest and the last snapshot
// ---------------------------------------------------------------------------

/// WRITE / TRIM / WRITE_ZEROES through a raw connection, mirrored into `model`.
struct ModelWriter {
    c: Raw,
    cookie: u64,
}

impl ModelWriter {
    fn write(&mut self, m: &mut [u8], off: u64, data: &[u8]) {
        self.cookie += 1;
        self.c.write(self.cookie, 0, off, data);
        put(m, off, data);
    }
    fn trim(&mut self, m: &mut [u8], off: u64, len: u64) {
        self.cookie += 1;
        let e = self.c.command(0, CMD_TRIM, self.cookie, off, len as u32);
        assert_eq!(e, 0, "TRIM {off}+{len}");
        fill(m, off, len, 0);
    }
    fn zero(&mut self, m: &mut [u8], off: u64, len: u64) {
        self.cookie += 1;
        let e = self
            .c
            .command(0, CMD_WRITE_ZEROES, self.cookie, off, len as u32);
        assert_eq!(e, 0, "WRITE_ZEROES {off}+{len}");
        fill(m, off, len, 0);
    }
}

#[test]
fn delete_middle_oldest_newest_keeps_every_other_view_intact() {
    require_tool("nbdcopy");
    let mut d = start();
    let size = 8 * MIB;
    create_volume(&d, "vol0", size);
    let mut rng = Prng::new(4);
    let mut m = vec![0u8; size as usize];
    let (c, _) = Raw::open(d.tcp_addr(), "vol0");
    let mut w = ModelWriter { c, cookie: 0 };

    w.write(&mut m, 0, &rng.bytes((4 * MIB) as usize));
    let s1 = m.clone();
    snap_create(&d, "vol0", "s1");
    w.write(&mut m, MIB, &rng.bytes(MIB as usize));
    w.trim(&mut m, 3 * MIB, 256 * KIB);
    w.zero(&mut m, 6 * MIB, 64 * KIB);
    w.write(&mut m, 5 * MIB + 4096, &rng.bytes(8192));
    let s2 = m.clone();
    snap_create(&d, "vol0", "s2");
    w.write(&mut m, 1536 * KIB, &rng.bytes((512 * KIB) as usize));
    w.write(&mut m, 7 * MIB, &rng.bytes(MIB as usize));
    w.zero(&mut m, 5 * MIB, 64 * KIB);
    let s3 = m.clone();
    snap_create(&d, "vol0", "s3");
    w.write(&mut m, 2 * MIB, &rng.bytes((512 * KIB) as usize));
    w.trim(&mut m, 7 * MIB + 128 * KIB, 128 * KIB);
    let s4 = m.clone();
    snap_create(&d, "vol0", "s4");
    w.write(&mut m, 0, &rng.bytes((64 * KIB) as usize));
    w.write(&mut m, 3 * MIB, &rng.bytes((64 * KIB) as usize));
    w.trim(&mut m, MIB, 64 * KIB);
    let head = m.clone();
    w.c.flush(999);

    let verify = |d: &Daemon, live: &[(&str, &Vec<u8>)], step: &str| {
        let names: Vec<&str> = live.iter().map(|(n, _)| *n).collect();
        assert_eq!(snap_names(d, "vol0"), names, "{step}: snapshot.list");
        for (n, want) in live {
            let got = read_export(d, &format!("vol0@{n}"));
            assert_same(&format!("{step}: vol0@{n}"), &got, want);
        }
        let got = read_export(d, "vol0");
        assert_same(&format!("{step}: vol0"), &got, &head);
    };
    verify(
        &d,
        &[("s1", &s1), ("s2", &s2), ("s3", &s3), ("s4", &s4)],
        "before any delete",
    );

    // A snapshot a client has open cannot go.
    let (held, _) = Raw::open(d.tcp_addr(), "vol0@s2");
    admin_err(
        &d,
        "snapshot.delete",
        json!({"volume": "vol0", "name": "s2"}),
        "busy",
    );
    held.disconnect();

    snap_delete(&d, "vol0", "s2");
    verify(
        &d,
        &[("s1", &s1), ("s3", &s3), ("s4", &s4)],
        "s2 (middle) deleted",
    );
    assert!(!listed_exports(&d).contains_key("vol0@s2"));
    let out = run_unchecked("nbdinfo", &[&d.unix_uri("vol0@s2")]);
    assert!(
        !out.status.success(),
        "vol0@s2 still opens after its delete"
    );

    snap_delete(&d, "vol0", "s1");
    verify(&d, &[("s3", &s3), ("s4", &s4)], "s1 (oldest) deleted");
    snap_delete(&d, "vol0", "s4");
    verify(&d, &[("s3", &s3)], "s4 (newest) deleted");
    // The volume stays writable across the merges, on the same connection.
    let mut head = head;
    w.write(&mut head, 4 * MIB, &rng.bytes(MIB as usize));
    snap_delete(&d, "vol0", "s3");
    let final_head = head.clone();
    let verify_head = |d: &Daemon, step: &str| {
        assert_eq!(snap_names(d, "vol0"), Vec::<String>::new(), "{step}");
        let got = read_export(d, "vol0");
        assert_same(&format!("{step}: vol0"), &got, &final_head);
    };
    verify_head(&d, "s3 (the last) deleted");
    w.c.flush(1000);
    w.c.disconnect();
    d.kill9();
    d.restart();
    verify_head(&d, "after kill -9 and restart");
}

// ---------------------------------------------------------------------------
// 5. A 64-deep chain
// ---------------------------------------------------------------------------

/// Checks with nbdsh (python3-libnbd) that each export holds, in 4 KiB blocks: `b0` at offset 0,
/// `blocks[i]` at (i+1)*64K, zeroes in the 4 KiB after each of those and in the tail [5M, 8M).
/// Returns the mismatches.
fn check_chain(d: &Daemon, exports: &[(String, u8, Vec<u8>)]) -> Vec<Value> {
    let spec: Vec<Value> = exports
        .iter()
        .map(|(n, b0, blocks)| json!({"uri": d.unix_uri(n), "name": n, "b0": b0, "blocks": blocks}))
        .collect();
    let script = format!(
        r#"
import json
spec = json.loads('{spec}')
errors = []
for e in spec:
    h = nbd.NBD()
    h.connect_uri(e["uri"])
    if h.get_size() != 8388608:
        errors.append({{"export": e["name"], "size": h.get_size()}})
    def want(off, byte):
        got = h.pread(4096, off)
        if got != bytes([byte]) * 4096:
            errors.append({{"export": e["name"], "offset": off, "want": byte, "got": sorted(set(got))[:4]}})
    want(0, e["b0"])
    want(4096, 0)
    for i, b in enumerate(e["blocks"]):
        want((i + 1) * 65536, b)
        want((i + 1) * 65536 + 4096, 0)
    tail = h.pread(3 * 1048576, 5 * 1048576)
    if tail != bytes(3 * 1048576):
        errors.append({{"export": e["name"], "tail": "not zero"}})
    h.shutdown()
print(json.dumps(errors))
"#,
        spec = serde_json::to_string(&spec).unwrap()
    );
    let out = nbdsh(&script);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    v.as_array().unwrap().clone()
}

#[test]
fn chain_of_64_snapshots_then_every_other_deleted() {
    require_tool("nbdsh");
    let mut d = start();
    create_volume(&d, "vol0", 8 * MIB);
    const N: usize = 64;
    let pat = |i: usize| (i + 1) as u8;
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    for i in 0..N {
        // A shared block rewritten every time, and a block of its own.
        c.write(2 * i as u64, 0, 0, &[pat(i); 4096]);
        c.write(
            2 * i as u64 + 1,
            0,
            (i as u64 + 1) * 64 * KIB,
            &[pat(i); 4096],
        );
        let info = snap_create(&d, "vol0", &format!("c{i:02}"));
        assert_eq!(info["own_bytes"], json!(2 * BLOCK), "c{i:02}: {info:#}");
    }
    c.write(1000, 0, 0, &[0xee; 4096]);
    c.flush(1001);
    c.disconnect();
    let expect = |live: &[usize]| -> Vec<(String, u8, Vec<u8>)> {
        let mut v: Vec<(String, u8, Vec<u8>)> = live
            .iter()
            .map(|&k| {
                let blocks = (0..N).map(|i| if i <= k { pat(i) } else { 0 }).collect();
                (format!("vol0@c{k:02}"), pat(k), blocks)
            })
            .collect();
        v.push(("vol0".into(), 0xee, (0..N).map(pat).collect()));
        v
    };
    let all: Vec<usize> = (0..N).collect();
    let listed = snap_list(&d, "vol0");
    assert_eq!(listed.len(), N);
    for (i, s) in listed.iter().enumerate() {
        assert_eq!(s["name"], json!(format!("c{i:02}")));
        assert_eq!(s["own_bytes"], json!(2 * BLOCK), "{s:#}");
    }
    let errors = check_chain(&d, &expect(&all));
    assert!(errors.is_empty(), "64-deep chain reads wrong: {errors:#?}");

    // Delete the odd ones (including the newest), in a scrambled order.
    let mut odd: Vec<usize> = (1..N).step_by(2).collect();
    let mut rng = Prng::new(5);
    for i in (1..odd.len()).rev() {
        odd.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    for &k in &odd {
        snap_delete(&d, "vol0", &format!("c{k:02}"));
    }
    let even: Vec<usize> = (0..N).step_by(2).collect();
    let listed = snap_list(&d, "vol0");
    let names: Vec<&str> = listed.iter().map(|s| s["name"].as_str().unwrap()).collect();
    let want: Vec<String> = even.iter().map(|k| format!("c{k:02}")).collect();
    assert_eq!(names, want);
    // Each survivor took over the deleted one's block: c00 owns 8K, the others 12K.
    for s in &listed {
        let want = if s["name"] == "c00" { 2 } else { 3 } * BLOCK;
        assert_eq!(s["own_bytes"], json!(want), "after merges: {s:#}");
    }
    let errors = check_chain(&d, &expect(&even));
    assert!(
        errors.is_empty(),
        "chain after deleting every other: {errors:#?}"
    );
    d.kill9();
    d.restart();
    let errors = check_chain(&d, &expect(&even));
    assert!(
        errors.is_empty(),
        "chain after kill -9 + restart: {errors:#?}"
    );
}

// ---------------------------------------------------------------------------
// 6. Metadata contexts
// ---------------------------------------------------------------------------

#[test]
fn block_status_allocation_depth_and_dirty_bitmaps() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    let mut d = start();
    create_volume(&d, "vol0", 4 * MIB);
    let uri = d.unix_uri("vol0");
    const K: u64 = KIB;
    const M: u64 = MIB;
    qemu_io(&uri, &["write -P 0xa1 0 1M"]);
    snap_create(&d, "vol0", "s1");
    qemu_io(&uri, &["write -P 0xb2 2M 64K", "discard 512K 64K"]);

    let ctx = contexts(&d, "vol0");
    assert_eq!(
        ctx,
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:s1"
        ],
        "contexts of vol0"
    );
    let ctx = contexts(&d, "vol0@s1");
    assert_eq!(
        ctx,
        ["base:allocation", "qemu:allocation-depth"],
        "contexts of vol0@s1"
    );
    // The same extents qemu-nbd reports for a qcow2 overlay with a bitmap after this sequence.
    let head_alloc = [
        (0, 512 * K, 0),
        (512 * K, 64 * K, 3),
        (576 * K, 448 * K, 0),
        (M, M, 3),
        (2 * M, 64 * K, 0),
        (2 * M + 64 * K, 2 * M - 64 * K, 3),
    ];
    assert_map(&d, "vol0", "base:allocation", &head_alloc);
    assert_map(
        &d,
        "vol0",
        "qemu:allocation-depth",
        &[
            (0, 512 * K, 2),
            (512 * K, 64 * K, 1),
            (576 * K, 448 * K, 2),
            (M, M, 0),
            (2 * M, 64 * K, 1),
            (2 * M + 64 * K, 2 * M - 64 * K, 0),
        ],
    );
    assert_map(
        &d,
        "vol0",
        "qemu:dirty-bitmap:s1",
        &[
            (0, 512 * K, 0),
            (512 * K, 64 * K, 1),
            (576 * K, 1472 * K, 0),
            (2 * M, 64 * K, 1),
            (2 * M + 64 * K, 2 * M - 64 * K, 0),
        ],
    );
    let s1_alloc = [(0, M, 0), (M, 3 * M, 3)];
    let s1_depth = [(0, M, 1), (M, 3 * M, 0)];
    assert_map(&d, "vol0@s1", "base:allocation", &s1_alloc);
    assert_map(&d, "vol0@s1", "qemu:allocation-depth", &s1_depth);

    // A second snapshot: one layer deeper for everything older, a second bitmap.
    snap_create(&d, "vol0", "s2");
    qemu_io(&uri, &["write -P 0xc3 3M 4K"]);
    assert_eq!(
        contexts(&d, "vol0"),
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:s1",
            "qemu:dirty-bitmap:s2"
        ]
    );
    assert_map(
        &d,
        "vol0",
        "qemu:allocation-depth",
        &[
            (0, 512 * K, 3),
            (512 * K, 64 * K, 2),
            (576 * K, 448 * K, 3),
            (M, M, 0),
            (2 * M, 64 * K, 2),
            (2 * M + 64 * K, M - 64 * K, 0),
            (3 * M, 4 * K, 1),
            (3 * M + 4 * K, M - 4 * K, 0),
        ],
    );
    assert_map(
        &d,
        "vol0",
        "qemu:dirty-bitmap:s1",
        &[
            (0, 512 * K, 0),
            (512 * K, 64 * K, 1),
            (576 * K, 1472 * K, 0),
            (2 * M, 64 * K, 1),
            (2 * M + 64 * K, M - 64 * K, 0),
            (3 * M, 4 * K, 1),
            (3 * M + 4 * K, M - 4 * K, 0),
        ],
    );
    assert_map(
        &d,
        "vol0",
        "qemu:dirty-bitmap:s2",
        &[
            (0, 3 * M, 0),
            (3 * M, 4 * K, 1),
            (3 * M + 4 * K, M - 4 * K, 0),
        ],
    );
    assert_map(
        &d,
        "vol0@s2",
        "qemu:allocation-depth",
        &[
            (0, 512 * K, 2),
            (512 * K, 64 * K, 1),
            (576 * K, 448 * K, 2),
            (M, M, 0),
            (2 * M, 64 * K, 1),
            (2 * M + 64 * K, 2 * M - 64 * K, 0),
        ],
    );
    assert_map(&d, "vol0@s2", "base:allocation", &head_alloc);
    assert_map(&d, "vol0@s1", "qemu:allocation-depth", &s1_depth);

    // Back to s1: its bitmap is clean, s2 is no ancestor any more and has no bitmap.
    rollback(&d, "vol0", "s1");
    assert_eq!(
        contexts(&d, "vol0"),
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:s1"
        ]
    );
    assert_map(&d, "vol0", "qemu:dirty-bitmap:s1", &[(0, 4 * M, 0)]);
    assert_map(&d, "vol0", "base:allocation", &s1_alloc);
    // Zeroing counts as a change too.
    qemu_io(&uri, &["write -z -u 1M 64K", "flush"]);
    let dirty = [(0, M, 0), (M, 64 * K, 1), (M + 64 * K, 3 * M - 64 * K, 0)];
    assert_map(&d, "vol0", "qemu:dirty-bitmap:s1", &dirty);
    let alloc = map(&d, "vol0", "base:allocation");
    assert_eq!(alloc[0], (0, M, 0), "{alloc:?}");
    for &(o, l, t) in &alloc[1..] {
        assert!(
            t & 2 != 0,
            "[{o}, +{l}) should read as zeroes, type {t}: {alloc:?}"
        );
    }
    d.kill9();
    d.restart();
    assert_map(&d, "vol0", "qemu:dirty-bitmap:s1", &dirty);
    assert_map(&d, "vol0@s1", "qemu:allocation-depth", &s1_depth);
}

// ---------------------------------------------------------------------------
// 7. kill -9
// ---------------------------------------------------------------------------

/// Content of a 4 KiB block identified by a tag (0 = never written = zeroes).
fn block_data(tag: u64) -> Vec<u8> {
    if tag == 0 {
        vec![0u8; BLOCK as usize]
    } else {
        Prng::new(tag).bytes(BLOCK as usize)
    }
}

fn content_of(tags: &[u64]) -> Vec<u8> {
    tags.iter().flat_map(|&t| block_data(t)).collect()
}

/// One NBD command on a connection opened by [`Raw::open`] (simple replies) that does not
/// panic when the daemon disappears: the NBD error value, or the I/O error.
fn try_cmd(s: &mut TcpStream, typ: u16, cookie: u64, offset: u64, data: &[u8]) -> io::Result<u32> {
    let len = if typ == CMD_WRITE {
        data.len() as u32
    } else {
        0
    };
    let mut b = Raw::request_bytes(0, typ, cookie, offset, len);
    b.extend_from_slice(data);
    s.write_all(&b)?;
    let mut h = [0u8; 16];
    s.read_exact(&mut h)?;
    if be32(&h[0..4]) != SIMPLE_REPLY_MAGIC || be64(&h[8..16]) != cookie {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("bad reply header {h:02x?}"),
        ));
    }
    Ok(be32(&h[4..8]))
}

/// Writes `tags` from block `first` on and, once acknowledged, records them as current. False
/// (with the reason in `stopped`) when the daemon is gone.
fn tracked_write(
    s: &mut TcpStream,
    i: u64,
    first: usize,
    tags: &[u64],
    model: &Mutex<CrashModel>,
) -> bool {
    let lock = || model.lock().unwrap_or_else(|e| e.into_inner());
    match try_cmd(s, CMD_WRITE, i, first as u64 * BLOCK, &content_of(tags)) {
        Ok(0) => {
            let mut m = lock();
            for (j, &t) in tags.iter().enumerate() {
                m.current[first + j] = t;
            }
            m.writes += 1;
            true
        }
        other => {
            lock().stopped = Some(format!("write {i}: {other:?}"));
            false
        }
    }
}

/// Sends a FLUSH and, once it is acknowledged, records the current state as flushed. False (with
/// the reason in `stopped`) when the daemon is gone.
fn tracked_flush(s: &mut TcpStream, i: u64, model: &Mutex<CrashModel>) -> bool {
    let lock = || model.lock().unwrap_or_else(|e| e.into_inner());
    match try_cmd(s, CMD_FLUSH, 1 << 40 | i, 0, &[]) {
        Ok(0) => {
            let mut m = lock();
            m.flushed = m.current.clone();
            for p in m.since_flush.iter_mut() {
                p.clear();
            }
            m.flushes += 1;
            true
        }
        other => {
            lock().stopped = Some(format!("flush {i}: {other:?}"));
            false
        }
    }
}

#[derive(Default)]
struct CrashModel {
    /// Per 4 KiB block: the tag of the last acknowledged write.
    current: Vec<u64>,
    /// Per block: the tag as of the last acknowledged FLUSH.
    flushed: Vec<u64>,
    /// Per block: tags sent since the last acknowledged FLUSH (acknowledged or not).
    since_flush: Vec<Vec<u64>>,
    writes: u64,
    flushes: u64,
    /// Acknowledged snapshots with their block tags.
    snapshots: Vec<(String, Vec<u64>)>,
    /// A snapshot.create sent but not answered.
    unanswered: Option<(String, Vec<u64>)>,
    stopped: Option<String>,
}

impl CrashModel {
    /// A volume of `nblocks` never written blocks, shared with the writer thread.
    fn shared(nblocks: usize) -> Arc<Mutex<CrashModel>> {
        Arc::new(Mutex::new(CrashModel {
            current: vec![0; nblocks],
            flushed: vec![0; nblocks],
            since_flush: vec![Vec::new(); nblocks],
            ..CrashModel::default()
        }))
    }
}

#[test]
fn kill9_during_random_writes_keeps_flushed_data_and_acknowledged_snapshots() {
    require_tool("nbdcopy");
    let mut d = start();
    let size = 16 * MIB;
    let nblocks = (size / BLOCK) as usize;
    create_volume(&d, "vol0", size);
    let model = CrashModel::shared(nblocks);
    let (raw, _) = Raw::open(d.tcp_addr(), "vol0");
    let admin_path = d.admin_path().to_path_buf();
    let m2 = Arc::clone(&model);
    let writer = thread::spawn(move || {
        let lock = || m2.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = raw.s;
        let mut admin = Admin::connect(&admin_path);
        let mut rng = Prng::new(7);
        let mut next_tag = 1u64;
        for i in 0u64.. {
            let first = (rng.next_u64() % nblocks as u64) as usize;
            let n = (1 + rng.next_u64() % 16).min((nblocks - first) as u64) as usize;
            let tags: Vec<u64> = (0..n as u64).map(|j| next_tag + j).collect();
            next_tag += n as u64;
            {
                let mut m = lock();
                for (j, &t) in tags.iter().enumerate() {
                    m.since_flush[first + j].push(t);
                }
            }
            if !tracked_write(&mut s, i, first, &tags, &m2) {
                return;
            }
            if i % 16 == 15 && !tracked_flush(&mut s, i, &m2) {
                return;
            }
            if i % 50 == 49 {
                let name = format!("k{i}");
                {
                    let mut m = lock();
                    let cur = m.current.clone();
                    m.unanswered = Some((name.clone(), cur));
                }
                let params = json!({"volume": "vol0", "name": name});
                match admin.call("snapshot.create", &params) {
                    Ok(Ok(_)) => {
                        let mut m = lock();
                        let snap = m.unanswered.take().unwrap();
                        m.snapshots.push(snap);
                    }
                    other => {
                        lock().stopped = Some(format!("snapshot.create {name}: {other:?}"));
                        return;
                    }
                }
            }
        }
    });
    let progressed = wait_until(Duration::from_secs(60), || {
        let m = model.lock().unwrap_or_else(|e| e.into_inner());
        m.snapshots.len() >= 4 && m.writes >= 300 || m.stopped.is_some()
    });
    {
        let m = model.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            progressed && m.stopped.is_none(),
            "writer made too little progress before the kill: {} writes, {} snapshots, stopped: {:?}",
            m.writes,
            m.snapshots.len(),
            m.stopped
        );
    }
    d.kill9();
    writer.join().expect("writer thread");
    let m = model.lock().unwrap_or_else(|e| e.into_inner());
    eprintln!(
        "killed after {} writes, {} flushes, {} snapshots; writer stopped at {:?}",
        m.writes,
        m.flushes,
        m.snapshots.len(),
        m.stopped
    );
    d.restart();

    // Every flushed write is there (or a later one to the same block).
    let got = read_export(&d, "vol0");
    assert_eq!(got.len() as u64, size);
    let mut bad = Vec::new();
    for b in 0..nblocks {
        let blk = &got[b * BLOCK as usize..(b + 1) * BLOCK as usize];
        let ok = std::iter::once(m.flushed[b])
            .chain(m.since_flush[b].iter().copied())
            .any(|t| blk == block_data(t).as_slice());
        if !ok {
            bad.push(b as u64 * BLOCK);
        }
    }
    assert!(
        bad.is_empty(),
        "{} blocks of vol0 hold neither their flushed content nor a later write, first at {:?}",
        bad.len(),
        &bad[..bad.len().min(16)]
    );
    // Every acknowledged snapshot exists and holds exactly what was acknowledged before it.
    let names = snap_names(&d, "vol0");
    let mut want: Vec<String> = m.snapshots.iter().map(|(n, _)| n.clone()).collect();
    if let Some((n, _)) = &m.unanswered {
        if names.contains(n) {
            want.push(n.clone());
        }
    }
    assert_eq!(names, want, "snapshots after kill -9");
    for (n, tags) in m.snapshots.iter().chain(m.unanswered.iter()) {
        if names.contains(n) {
            let got = read_export(&d, &format!("vol0@{n}"));
            assert_same(&format!("vol0@{n} after kill -9"), &got, &content_of(tags));
        }
    }
    // Still fully usable: merge every snapshot away, the volume does not change.
    for n in &names {
        snap_delete(&d, "vol0", n);
    }
    assert_content(&d, "vol0", &got);
}

/// snapshot.create answers once its manifest is in place, before it is durable (the fsyncs
/// run in the background and the next FLUSH waits for them). Kill -9 right after the answer
/// while a client keeps writing and flushing: after the restart the snapshot is there with
/// exactly the writes acknowledged before the call, and every flushed write reads back.
#[test]
fn kill9_right_after_snapshot_create_returns() {
    require_tool("nbdcopy");
    let mut d = start();
    let size = 8 * MIB;
    let nblocks = (size / BLOCK) as usize;
    create_volume(&d, "vol0", size);
    let mut expected_snapshots: Vec<(String, Vec<u64>)> = Vec::new();
    let mut next_tag = 1u64;
    for round in 0..4u64 {
        let model = CrashModel::shared(nblocks);
        // Start from a known volume: every block written and flushed with fresh tags.
        let (raw, _) = Raw::open(d.tcp_addr(), "vol0");
        let mut s = raw.s;
        {
            let mut m = model.lock().unwrap();
            for b in 0..nblocks {
                m.current[b] = next_tag;
                next_tag += 1;
            }
            let data = content_of(&m.current);
            for (i, chunk) in data.chunks(MIB as usize).enumerate() {
                assert_eq!(
                    try_cmd(&mut s, CMD_WRITE, i as u64, i as u64 * MIB, chunk).unwrap(),
                    0
                );
            }
            assert_eq!(try_cmd(&mut s, CMD_FLUSH, 99, 0, &[]).unwrap(), 0);
            m.flushed = m.current.clone();
        }
        let admin_path = d.admin_path().to_path_buf();
        let m2 = Arc::clone(&model);
        let snap_name = format!("w{round}");
        let mut tag = next_tag;
        let writer = thread::spawn(move || {
            let lock = || m2.lock().unwrap_or_else(|e| e.into_inner());
            let mut admin = Admin::connect(&admin_path);
            let mut rng = Prng::new(round + 11);
            for i in 0u64.. {
                let first = (rng.next_u64() % nblocks as u64) as usize;
                let n = (1 + rng.next_u64() % 8).min((nblocks - first) as u64) as usize;
                let tags: Vec<u64> = (0..n as u64).map(|j| tag + j).collect();
                tag += n as u64;
                for (j, &t) in tags.iter().enumerate() {
                    lock().since_flush[first + j].push(t);
                }
                if !tracked_write(&mut s, i, first, &tags, &m2) {
                    return;
                }
                if i == 200 {
                    let cur = lock().current.clone();
                    let params = json!({"volume": "vol0", "name": snap_name});
                    match admin.call("snapshot.create", &params) {
                        Ok(Ok(_)) => lock().snapshots.push((snap_name.clone(), cur)),
                        other => {
                            lock().stopped = Some(format!("snapshot.create: {other:?}"));
                            return;
                        }
                    }
                }
                // From the snapshot on, flush often: a FLUSH now waits for its manifest.
                if (i % 16 == 15 || i > 200) && !tracked_flush(&mut s, i, &m2) {
                    return;
                }
            }
        });
        let acked = wait_until(Duration::from_secs(60), || {
            let m = model.lock().unwrap_or_else(|e| e.into_inner());
            !m.snapshots.is_empty() || m.stopped.is_some()
        });
        // As soon as the answer is seen: the persist is most likely still running.
        d.kill9();
        writer.join().expect("writer thread");
        let m = model.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            acked && m.snapshots.len() == 1,
            "round {round}: the snapshot was not acknowledged before the kill: {:?}",
            m.stopped
        );
        eprintln!(
            "round {round}: killed after {} writes, {} flushes; writer stopped at {:?}",
            m.writes, m.flushes, m.stopped
        );
        next_tag = tag_after(&m) + 1;
        d.restart();

        let got = read_export(&d, "vol0");
        let mut bad = Vec::new();
        for b in 0..nblocks {
            let blk = &got[b * BLOCK as usize..(b + 1) * BLOCK as usize];
            if !std::iter::once(m.flushed[b])
                .chain(m.since_flush[b].iter().copied())
                .any(|t| blk == block_data(t).as_slice())
            {
                bad.push(b as u64 * BLOCK);
            }
        }
        assert!(
            bad.is_empty(),
            "round {round}: {} blocks of vol0 hold neither their flushed content nor a later write, first at {:?}",
            bad.len(),
            &bad[..bad.len().min(16)]
        );
        expected_snapshots.push(m.snapshots[0].clone());
        let names = snap_names(&d, "vol0");
        let want: Vec<String> = expected_snapshots.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, want, "round {round}: snapshots after kill -9");
        for (n, tags) in &expected_snapshots {
            let got = read_export(&d, &format!("vol0@{n}"));
            assert_same(
                &format!("round {round}: vol0@{n} after kill -9"),
                &got,
                &content_of(tags),
            );
        }
    }
}

fn tag_after(m: &CrashModel) -> u64 {
    m.current
        .iter()
        .chain(m.since_flush.iter().flatten())
        .copied()
        .max()
        .unwrap_or(0)
}

#[test]
fn kill9_during_snapshot_create() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let mut d = start();
    let size = 8 * MIB;
    create_volume(&d, "vol0", size);
    let mut head = vec![0u8; size as usize];
    let mut confirmed: Vec<(String, Vec<u8>)> = Vec::new();
    let mut acked_rounds = 0;
    for round in 0..6u64 {
        let byte = 0x20 + round as u8;
        qemu_io(
            &d.unix_uri("vol0"),
            &[&format!("write -P {byte} {round}M 1M"), "flush"],
        );
        fill(&mut head, round * MIB, MIB, byte);
        let name = format!("r{round}");
        let mut a = Admin::connect(d.admin_path());
        let id = a
            .send("snapshot.create", &json!({"volume": "vol0", "name": name}))
            .expect("send snapshot.create");
        // Kill at a different moment of the call each round.
        let t = Instant::now();
        let jitter = Duration::from_micros([0, 50, 200, 500, 1000, 3000][round as usize]);
        while t.elapsed() < jitter {
            std::hint::spin_loop();
        }
        d.kill9();
        let acked = matches!(a.recv(id), Ok(Ok(_)));
        acked_rounds += acked as u32;
        d.restart();
        let names = snap_names(&d, "vol0");
        let mut want: Vec<String> = confirmed.iter().map(|(n, _)| n.clone()).collect();
        let exists = names.contains(&name);
        assert!(
            exists || !acked,
            "round {round}: acknowledged snapshot {name} is gone after kill -9: {names:?}"
        );
        if exists {
            want.push(name.clone());
        }
        assert_eq!(names, want, "round {round}: snapshots after kill -9");
        if !exists {
            // Nothing half-made blocks the name.
            snap_create(&d, "vol0", &name);
        }
        confirmed.push((name, head.clone()));
        for (n, c) in &confirmed {
            assert_content(&d, &format!("vol0@{n}"), c);
        }
        assert_content(&d, "vol0", &head);
    }
    eprintln!("snapshot.create answered before the kill in {acked_rounds} of 6 rounds");
}

#[test]
fn kill9_during_snapshot_delete_merge() {
    require_tool("nbdcopy");
    let mut d = start();
    let size = 32 * MIB;
    let mut merge_time = Duration::ZERO;
    // Round 0 measures an undisturbed merge; the others kill at fractions of that time.
    for round in 0..4u32 {
        let vol = format!("m{round}");
        create_volume(&d, &vol, size);
        let mut rng = Prng::new(100 + round as u64);
        let big = rng.bytes(size as usize);
        let src = d.work_dir().join(format!("big{round}.img"));
        fs::write(&src, &big).unwrap();
        let src_s = src.display().to_string();
        run("nbdcopy", &["--flush", src_s.as_str(), &d.unix_uri(&vol)]);
        fs::remove_file(&src).ok();
        snap_create(&d, &vol, "big");
        let mut m = big.clone();
        let (c, _) = Raw::open(d.tcp_addr(), &vol);
        let mut w = ModelWriter { c, cookie: 0 };
        for k in 0..8u64 {
            w.write(
                &mut m,
                k * 4 * MIB + 64 * KIB,
                &rng.bytes((64 * KIB) as usize),
            );
        }
        w.trim(&mut m, 20 * MIB, MIB);
        let small = m.clone();
        snap_create(&d, &vol, "small");
        w.write(&mut m, 10 * MIB, &rng.bytes(MIB as usize));
        w.c.flush(77);
        w.c.disconnect();
        let head = m;

        let mut a = Admin::connect(d.admin_path());
        let params = json!({"volume": vol, "name": "big"});
        let t = Instant::now();
        let id = a.send("snapshot.delete", &params).expect("send");
        let acked = if round == 0 {
            let r = a.recv(id).expect("snapshot.delete answer");
            merge_time = t.elapsed();
            assert!(r.is_ok(), "snapshot.delete: {r:?}");
            true
        } else {
            let at = merge_time * round / 4;
            while t.elapsed() < at {
                std::hint::spin_loop();
            }
            d.kill9();
            matches!(a.recv(id), Ok(Ok(_)))
        };
        eprintln!(
            "round {round}: merge of 32 MiB took {merge_time:?} undisturbed; kill at {:?}; answered: {acked}",
            t.elapsed()
        );
        if round > 0 {
            d.restart();
        }
        let names = snap_names(&d, &vol);
        if acked {
            assert_eq!(
                names,
                ["small"],
                "round {round}: acknowledged delete undone"
            );
        } else {
            assert!(
                names == ["big", "small"] || names == ["small"],
                "round {round}: snapshots after a kill during delete: {names:?}"
            );
        }
        if names.contains(&"big".to_string()) {
            assert_content(&d, &format!("{vol}@big"), &big);
        }
        assert_content(&d, &format!("{vol}@small"), &small);
        assert_content(&d, &vol, &head);
        if names.contains(&"big".to_string()) {
            snap_delete(&d, &vol, "big");
            assert_content(&d, &format!("{vol}@small"), &small);
            assert_content(&d, &vol, &head);
        }
        admin_ok_when_idle(&d, "volume.delete", json!({"name": vol}));
    }
}

// ---------------------------------------------------------------------------
// 8. fio with verification while snapshots come and go
// ---------------------------------------------------------------------------

fn crc32c(data: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes(b[..2].try_into().unwrap())
}
fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}
fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// A 4 KiB block of a volume fio writes with `--bs=4k --verify=crc32c` is either all zero
/// (not written yet) or one whole fio block for that offset: the verify header (magic 0xacca,
/// len 4096, offset, header crc32c) and the crc32c of the data after it. (fio stores the crcs
/// without the final inversion.)
fn check_fio_block(b: &[u8], offset: u64) -> Result<(), String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(());
    }
    let (magic, len, off) = (le16(&b[0..]), le32(&b[4..]), le64(&b[16..]));
    if magic != 0xacca || len != 4096 || off != offset {
        return Err(format!(
            "block at {offset}: not a fio block for this offset (magic {magic:#x}, len {len}, offset {off})"
        ));
    }
    if le32(&b[0x24..]) != !crc32c(&b[..0x24]) {
        return Err(format!("block at {offset}: fio header crc mismatch"));
    }
    if le32(&b[0x28..]) != !crc32c(&b[0x2c..]) {
        return Err(format!(
            "block at {offset}: fio data crc mismatch (torn block?)"
        ));
    }
    Ok(())
}

fn fio_json(uri: &str, extra: &[&str]) -> Value {
    require_tool("fio");
    let mut args: Vec<String> = vec![
        "--name=snap".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--output-format=json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = run_timeout("fio", &args, Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio:\n{text}"));
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("fio JSON: {e}\n{text}"))
}

/// fio regions: two jobs of 8 MiB, at 0 and 32 MiB of a 64 MiB volume.
const FIO_REGIONS: [(u64, u64); 2] = [(0, 8 * MIB), (32 * MIB, 8 * MIB)];

/// The fio regions of a snapshot's content, after checking every block of them is a whole fio
/// block and everything else is zero.
fn fio_snapshot_regions(data: &[u8], what: &str) -> Result<Vec<u8>, String> {
    if data.len() as u64 != 64 * MIB {
        return Err(format!("{what}: {} bytes", data.len()));
    }
    let mut kept = Vec::new();
    let mut pos = 0u64;
    for &(off, len) in &FIO_REGIONS {
        if data[pos as usize..off as usize].iter().any(|&x| x != 0) {
            return Err(format!(
                "{what}: data outside fio's regions in [{pos}, {off})"
            ));
        }
        for b in (off..off + len).step_by(BLOCK as usize) {
            check_fio_block(&data[b as usize..(b + BLOCK) as usize], b)
                .map_err(|e| format!("{what}: {e}"))?;
        }
        kept.extend_from_slice(&data[off as usize..(off + len) as usize]);
        pos = off + len;
    }
    if data[pos as usize..].iter().any(|&x| x != 0) {
        return Err(format!("{what}: data after fio's regions"));
    }
    Ok(kept)
}

#[test]
fn fio_verify_while_snapshots_are_created_and_deleted() {
    require_tool("fio");
    require_tool("nbdcopy");
    let d = start();
    create_volume(&d, "vol0", 64 * MIB);
    let admin_path = d.admin_path().to_path_buf();
    let snap_uri = |n: &str| d.unix_uri(&format!("vol0@{n}"));
    let uris: Vec<String> = (0..20).map(|i| snap_uri(&format!("f{i:02}"))).collect();
    let work: PathBuf = d.work_dir().to_path_buf();
    let done = Arc::new(AtomicU64::new(0));
    let done2 = Arc::clone(&done);

    let churn = thread::spawn(move || -> Result<Vec<String>, String> {
        let result = (|| {
            let start = Instant::now();
            // name -> fio regions as read right after creation
            let mut live: Vec<(String, Vec<u8>)> = Vec::new();
            let mut deletes = 0;
            for i in 0..20usize {
                let due = start + Duration::from_millis(700) * i as u32;
                if let Some(w) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(w);
                }
                if i % 3 == 2 && !live.is_empty() {
                    // Alternately the oldest, a middle one and the newest.
                    let k = match deletes % 3 {
                        0 => 0,
                        1 => live.len() / 2,
                        _ => live.len() - 1,
                    };
                    deletes += 1;
                    let (name, _) = live.remove(k);
                    let params = json!({"volume": "vol0", "name": name});
                    admin_ok_when_idle_at(&admin_path, "snapshot.delete", params);
                    // The others are unchanged by the merge.
                    if let Some((n, regions)) = live.last() {
                        let idx: usize = n[1..].parse().unwrap();
                        let data = read_uri(&uris[idx], &work);
                        let got = fio_snapshot_regions(&data, n)?;
                        if got != *regions {
                            return Err(format!("vol0@{n} changed after deleting vol0@{name}"));
                        }
                    }
                } else {
                    let name = format!("f{i:02}");
                    let r = admin_at(
                        &admin_path,
                        "snapshot.create",
                        json!({"volume": "vol0", "name": name}),
                    );
                    r.map_err(|e| format!("snapshot.create {name}: {e:?}"))?;
                    let data = read_uri(&uris[i], &work);
                    let regions = fio_snapshot_regions(&data, &name)?;
                    live.push((name, regions));
                }
            }
            let names = snap_names_at(&admin_path, "vol0");
            let want: Vec<String> = live.iter().map(|(n, _)| n.clone()).collect();
            if names != want {
                return Err(format!("snapshot.list {names:?}, expected {want:?}"));
            }
            for (n, regions) in &live {
                let idx: usize = n[1..].parse().unwrap();
                let got = fio_snapshot_regions(&read_uri(&uris[idx], &work), n)?;
                if got != *regions {
                    return Err(format!("vol0@{n} changed during the run"));
                }
            }
            Ok(want)
        })();
        done2.store(1, Ordering::SeqCst);
        result
    });

    let mut runs = 0;
    while runs == 0 || done.load(Ordering::SeqCst) == 0 {
        let v = fio_json(
            &d.unix_uri("vol0"),
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--numjobs=2",
                "--size=8m",
                "--offset_increment=32m",
                "--randrepeat=0",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ],
        );
        let jobs = v["jobs"].as_array().expect("fio jobs");
        assert_eq!(jobs.len(), 2, "{v:#}");
        for j in jobs {
            assert_eq!(j["error"].as_i64(), Some(0), "fio job error: {j:#}");
            assert_eq!(
                j["write"]["total_ios"].as_u64(),
                Some(2048),
                "fio job wrote less than its region: {j:#}"
            );
            assert_eq!(
                j["read"]["total_ios"].as_u64(),
                Some(2048),
                "fio job did not verify its whole region: {j:#}"
            );
        }
        runs += 1;
        assert!(runs < 200, "snapshot churn never finished");
    }
    let live = churn
        .join()
        .expect("snapshot churn thread")
        .unwrap_or_else(|e| panic!("snapshot churn: {e}"));
    eprintln!("{runs} verified fio runs during 20 snapshot operations; left: {live:?}");
    assert!(
        runs >= 2,
        "fio ran only {runs} time(s) during the snapshot churn"
    );
}

// ---------------------------------------------------------------------------
// evsctl
// ---------------------------------------------------------------------------

#[test]
fn evsctl_snapshot_commands() {
    require_tool("qemu-io");
    let d = start();
    d.evsctl_ok(&["volume", "create", "vol0", "--size", "8M"]);
    let uri = d.unix_uri("vol0");
    qemu_io(&uri, &["write -P 0x5a 0 1M"]);
    let out = d.evsctl_ok(&["snapshot", "create", "vol0", "s1"]);
    assert!(out.contains("s1"), "{out}");
    let s2 = d.evsctl_json(&["snapshot", "create", "vol0", "s2"]);
    assert_eq!(s2["volume"], json!("vol0"), "{s2:#}");
    assert_eq!(s2["name"], json!("s2"), "{s2:#}");
    assert_eq!(s2["size_bytes"], json!(8 * MIB), "{s2:#}");
    let list = d.evsctl_json(&["snapshot", "list", "vol0"]);
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap_or_else(|| panic!("{list:#}"))
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s1", "s2"]);
    let human = d.evsctl_ok(&["snapshot", "list", "vol0"]);
    let (p1, p2) = (human.find("s1"), human.find("s2"));
    assert!(p1.is_some() && p2.is_some() && p1 < p2, "{human}");

    let code = |args: &[&str]| d.evsctl(args).status.code();
    assert_eq!(code(&["snapshot", "create", "vol0", "s1"]), Some(6));
    assert_eq!(code(&["snapshot", "create", "vol0", ".bad"]), Some(2));
    assert_eq!(code(&["snapshot", "create", "nope", "s9"]), Some(4));
    assert_eq!(code(&["snapshot", "delete", "vol0", "nope"]), Some(4));
    assert_eq!(code(&["snapshot", "rollback", "vol0", "nope"]), Some(4));
    assert_eq!(
        code(&[
            "volume",
            "create",
            "c2",
            "--from-snapshot",
            "vol0@s1",
            "--size",
            "8M"
        ]),
        Some(2)
    );

    qemu_io(&uri, &["write -P 0x6b 0 1M"]);
    d.evsctl_ok(&["volume", "create", "c1", "--from-snapshot", "vol0@s1"]);
    let show = d.evsctl_json(&["volume", "show", "c1"]);
    assert_eq!(show["size_bytes"], json!(8 * MIB), "{show:#}");
    qemu_io(&d.unix_uri("c1"), &["read -P 0x5a 0 1M", "read -P 0 1M 7M"]);

    let (held, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(wait_until(DETACH_TIMEOUT, || connections(&d, "vol0") == 1));
    assert_eq!(code(&["snapshot", "rollback", "vol0", "s1"]), Some(5));
    qemu_io(&uri, &["read -P 0x6b 0 1M"]);
    d.evsctl_ok(&["snapshot", "rollback", "vol0", "s1", "--force"]);
    let mut held = held;
    held.expect_closed("after evsctl snapshot rollback --force");
    qemu_io(&uri, &["read -P 0x5a 0 1M"]);

    let deleted = d.evsctl_json(&["snapshot", "delete", "vol0", "s1"]);
    assert_eq!(deleted["name"], json!("s1"), "{deleted:#}");
    d.evsctl_ok(&["snapshot", "delete", "vol0", "s2"]);
    let list = d.evsctl_json(&["snapshot", "list", "vol0"]);
    assert_eq!(list["snapshots"], json!([]), "{list:#}");
    qemu_io(&uri, &["read -P 0x5a 0 1M"]);
    qemu_io(&d.unix_uri("c1"), &["read -P 0x5a 0 1M"]);
}

/// qemu's `x-dirty-bitmap` reads `qemu:dirty-bitmap:SNAP` in place of `base:allocation` and shows
/// the blocks changed since SNAP as `"data": false` (its documented inversion), which is how
/// qemu-based backup tools pull increments.
#[test]
fn qemu_x_dirty_bitmap_pulls_changes_since_a_snapshot() {
    require_tool("qemu-img");
    let d = start();
    create_volume(&d, "vol0", 4 * MIB);
    let uri = d.unix_uri("vol0");
    qemu_io(&uri, &["write -P 0xa1 0 1M"]);
    snap_create(&d, "vol0", "s1");
    qemu_io(&uri, &["write -P 0xb2 2M 64K", "write -P 0xb3 3M 4K"]);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=vol0,x-dirty-bitmap=qemu:dirty-bitmap:s1",
        d.unix_path().display()
    );
    let out = run_stdout(
        "qemu-img",
        &["map", "--output=json", "--image-opts", opts.as_str()],
    );
    let extents: Vec<Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img map JSON ({e}): {out}"));
    let dirty: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e["data"] == json!(false))
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        dirty,
        vec![(2 * MIB, 64 * KIB), (3 * MIB, 4 * KIB)],
        "{out}"
    );
    let covered: u64 = extents.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(covered, 4 * MIB, "{out}");
}

/// The handshake's last reply leaves only once the connection is attached: a client that has
/// finished its handshake holds its export at once, on every try. (The reply used to go out
/// first, and a delete that came right after it could miss the client.)
#[test]
fn an_export_is_held_as_soon_as_its_handshake_ends() {
    let d = start();
    create_volume(&d, "vol0", 8 * MIB);
    snap_create(&d, "vol0", "s1");
    // Busy threads on every core, so the daemon's threads get preempted at any point, also
    // between a reply and what should come before it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..4)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    for round in 0..200 {
        let (held, _) = Raw::open(d.tcp_addr(), "vol0@s1");
        admin_err(
            &d,
            "snapshot.delete",
            json!({"volume": "vol0", "name": "s1"}),
            "busy",
        );
        held.disconnect();
        let (held, _) = Raw::open_structured(d.tcp_addr(), "vol0");
        let message = admin_err(&d, "volume.delete", json!({"name": "vol0"}), "busy");
        assert!(!message.is_empty(), "round {round}");
        held.disconnect();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for spinner in spinners {
        spinner.join().unwrap();
    }
}

/// A volume deleted while a snapshot delete is merging its layers, and created again under
/// the same name at once: the merge must not record the old volume's layers in the new
/// volume's directory (at the next start, the new volume's files would be removed as
/// orphans). The new volume's flushed data survives a kill -9.
#[test]
fn deleting_a_volume_during_a_merge_leaves_a_new_volume_of_that_name_intact() {
    let mut d = start();
    create_volume(&d, "v", 256 << 20);
    let uri = d.tcp_uri("v");
    qemu_io(&uri, &["write -P 0x11 0 256M"]);
    snap_create(&d, "v", "s1");
    // Half the blocks change: deleting s1 merges 128 MiB.
    qemu_io(&uri, &["write -P 0x22 0 128M"]);
    let merge = {
        let admin = d.admin_path().to_path_buf();
        std::thread::spawn(move || {
            admin_at(
                &admin,
                "snapshot.delete",
                json!({"volume": "v", "name": "s1"}),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(30));
    admin_ok(&d, "volume.delete", json!({"name": "v", "force": true}));
    create_volume(&d, "v", 8 << 20);
    qemu_io(&d.tcp_uri("v"), &["write -P 0x33 0 8M", "flush"]);
    // The merge either finished before the delete or found the volume gone.
    match merge.join().unwrap() {
        Ok(_) => {}
        Err(e) => assert_eq!(e.code, "not_found", "{e:?}"),
    }
    d.kill9();
    d.restart();
    assert_eq!(export_size(&d, "v"), 8 << 20);
    assert_content(&d, "v", &vec![0x33u8; 8 << 20]);
    assert_eq!(snap_names(&d, "v"), Vec::<String>::new());
}

/// A client of a snapshot export holds its volume as one of the volume's own does: deleting
/// the volume is refused `busy` without `force` and leaves everything serving, and with
/// `force` the client is counted among those disconnected.
#[test]
fn a_client_of_a_snapshot_export_refuses_the_volumes_delete_unless_forced() {
    let d = Daemon::start(DaemonOpts::new().with_vol0());
    let (mut writer, _) = Raw::open(d.tcp_addr(), "vol0");
    writer.write(1, 0, 0, &[0x5a; 4096]);
    drop(writer);
    snap_create(&d, "vol0", "s");
    let (mut reader, _) = Raw::open(d.tcp_addr(), "vol0@s");
    assert!(reader.read(1, 0, 4096).iter().all(|&b| b == 0x5a));
    let refused = admin_err(&d, "volume.delete", json!({"name": "vol0"}), "busy");
    assert!(refused.contains("vol0@s"), "{refused}");
    // Nothing was closed: the client reads on, a new one attaches to the export, and one to
    // the volume.
    assert!(reader.read(2, 0, 4096).iter().all(|&b| b == 0x5a));
    let (mut second, _) = Raw::open(d.tcp_addr(), "vol0@s");
    assert!(second.read(1, 0, 4096).iter().all(|&b| b == 0x5a));
    drop(second);
    let (mut live, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(live.read(1, 0, 4096).iter().all(|&b| b == 0x5a));
    drop(live);
    let deleted = admin_ok(&d, "volume.delete", json!({"name": "vol0", "force": true}));
    assert!(
        deleted["disconnected"].as_u64().is_some_and(|n| n >= 1),
        "{deleted:#}"
    );
    reader.expect_closed("the snapshot export's client after the forced delete");
}

/// A connection's `qemu:dirty-bitmap:NAME` keeps meaning the snapshot it was given when it
/// attached: once that one is deleted, even after another is taken under the same name (a
/// rotation), every block counts as changed (the safe answer), not the changes since the new
/// one, which would hide the writes made between the two.
#[test]
fn a_dirty_bitmap_keeps_its_snapshot_through_a_delete_and_a_new_one_of_its_name() {
    let d = start();
    create_volume(&d, "v", MIB);
    snap_create(&d, "v", "s");
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    c.opt_ack(OPT_STRUCTURED_REPLY);
    c.structured = true;
    let name = "qemu:dirty-bitmap:s";
    let mut query = Vec::new();
    query.extend_from_slice(&1u32.to_be_bytes());
    query.extend_from_slice(b"v");
    query.extend_from_slice(&1u32.to_be_bytes());
    query.extend_from_slice(&(name.len() as u32).to_be_bytes());
    query.extend_from_slice(name.as_bytes());
    c.send_opt(OPT_SET_META_CONTEXT, &query);
    let selected = c.expect_opt_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT);
    assert_eq!(&selected.data[4..], name.as_bytes());
    c.expect_opt_reply(OPT_SET_META_CONTEXT, REP_ACK);
    c.go("v", &[]);
    c.write(1, 0, 0, &[7u8; 4096]);
    let mut cookie = 10;
    let mut dirty = |c: &mut Raw| -> Vec<(u64, u32)> {
        cookie += 1;
        c.send_req(0, CMD_BLOCK_STATUS, cookie, 0, MIB as u32, &[]);
        let chunks = c.read_chunks(cookie);
        let status = chunks
            .iter()
            .find(|ch| ch.typ == CHUNK_BLOCK_STATUS)
            .expect("a block status chunk");
        status.payload[4..]
            .chunks(8)
            .map(|e| (be32(e) as u64, be32(&e[4..])))
            .collect()
    };
    assert_eq!(dirty(&mut c), [(4096, 1), (MIB - 4096, 0)]);
    snap_delete(&d, "v", "s");
    assert_eq!(dirty(&mut c), [(MIB, 1)], "the snapshot is gone");
    snap_create(&d, "v", "s");
    assert_eq!(
        dirty(&mut c),
        [(MIB, 1)],
        "the new snapshot of the name is not the one this connection was given"
    );
    // A new connection is given the new one: nothing changed since.
    require_tool("nbdinfo");
    assert_map(&d, "v", name, &[(0, MIB, 0)]);
}
