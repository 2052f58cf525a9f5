//! TLS (STARTTLS) against real clients: nbdinfo and nbdcopy (libnbd/GnuTLS), qemu-img and qemu-io
//! (qemu's tls-creds-x509), plus raw option checks in require mode. Certificates are made here with
//! the openssl CLI, in GnuTLS's directory layout (ca-cert.pem, client-cert.pem, client-key.pem).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use evsd_e2e::pki::*;
use evsd_e2e::raw::*;
use evsd_e2e::*;

fn tls_daemon(pki: &Path, mode: &str, extra: &[&str]) -> Daemon {
    let mut opts = DaemonOpts::new()
        .arg("--tls")
        .arg(mode)
        .arg("--tls-cert")
        .arg(pki.join("server-cert.pem").to_str().unwrap())
        .arg("--tls-key")
        .arg(pki.join("server-key.pem").to_str().unwrap());
    for a in extra {
        opts = opts.arg(a);
    }
    Daemon::start(opts)
}

fn nbds_uri(addr: SocketAddr, dir: &Path) -> String {
    format!("nbds://{addr}/vol0?tls-certificates={}", dir.display())
}

fn nbdinfo_json(addr: SocketAddr, dir: &Path) -> serde_json::Value {
    let out = run_stdout("nbdinfo", &["--json", &nbds_uri(addr, dir)]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json: {e}\n{out}"))
}

fn assert_nbdinfo_tls(d: &Daemon, dir: &Path) {
    let v = nbdinfo_json(d.tcp_addr(), dir);
    assert_eq!(v["TLS"], true, "{v:#}");
    assert_eq!(v["structured"], true, "{v:#}");
    assert_eq!(v["exports"][0]["export-size"].as_u64(), Some(GIB), "{v:#}");
}

fn nbdinfo_fails(uri: &str) -> String {
    let out = run_unchecked("nbdinfo", &[uri]);
    assert!(
        !out.status.success(),
        "{}",
        format_output("nbdinfo should have been refused", &out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn qemu_tls_args(addr: SocketAddr, dir: &Path) -> [String; 4] {
    [
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        ),
        "--image-opts".into(),
        format!(
            "driver=nbd,host={},port={},export=vol0,tls-creds=tls0",
            addr.ip(),
            addr.port()
        ),
    ]
}

#[test]
fn on_mode_serves_tls_and_plaintext_clients() {
    require_tool("nbdinfo");
    require_tool("openssl");
    let root = tempdir();
    let pki = root.path().join("pki");
    make_pki(&pki, "evsd test CA");
    let d = tls_daemon(&pki, "on", &[]);
    assert_nbdinfo_tls(&d, &pki);
    // TLS over the Unix socket too.
    let unix = format!(
        "nbds+unix:///vol0?socket={}&tls-certificates={}",
        d.unix_path().display(),
        pki.display()
    );
    let out = run_stdout("nbdinfo", &["--json", &unix]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["TLS"], true, "{v:#}");
    // Plaintext is still served in "on" mode.
    let out = run_stdout("nbdinfo", &["--json", &d.tcp_uri("vol0")]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["TLS"], false, "{v:#}");
}

#[test]
fn require_mode_serves_nbdinfo_and_qemu_and_refuses_plaintext() {
    require_tool("nbdinfo");
    require_tool("qemu-img");
    require_tool("openssl");
    let root = tempdir();
    let pki = root.path().join("pki");
    make_pki(&pki, "evsd test CA");
    let mut d = tls_daemon(&pki, "require", &[]);
    assert_nbdinfo_tls(&d, &pki);

    let out = run_stdout(
        "qemu-img",
        &[
            &["info".to_string(), "--output=json".into()][..],
            &qemu_tls_args(d.tcp_addr(), &pki),
        ]
        .concat(),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["virtual-size"].as_u64(), Some(GIB), "{v:#}");

    // A plaintext client is refused, and the daemon keeps serving TLS clients.
    // libnbd 1.14 reports ERR_TLS_REQD as "Operation not supported".
    nbdinfo_fails(&d.tcp_uri("vol0"));
    d.assert_alive();
    assert_nbdinfo_tls(&d, &pki);
}

#[test]
fn require_mode_options_before_starttls_get_tls_reqd() {
    require_tool("openssl");
    let root = tempdir();
    let pki = root.path().join("pki");
    make_pki(&pki, "evsd test CA");
    let mut d = tls_daemon(&pki, "require", &[]);
    let addr = d.tcp_addr();

    let mut c = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    c.send_opt(OPT_LIST, &[]);
    c.expect_opt_reply(OPT_LIST, REP_ERR_TLS_REQD);
    c.send_opt(OPT_GO, &Raw::go_payload("vol0", &[]));
    c.expect_opt_reply(OPT_GO, REP_ERR_TLS_REQD);
    c.send_opt(OPT_INFO, &Raw::go_payload("vol0", &[]));
    c.expect_opt_reply(OPT_INFO, REP_ERR_TLS_REQD);
    c.send_opt(OPT_STRUCTURED_REPLY, &[]);
    c.expect_opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD);
    c.send_opt(0x4242, &[1, 2, 3]);
    c.expect_opt_reply(0x4242, REP_ERR_TLS_REQD);
    // ABORT still works.
    c.send_opt(OPT_ABORT, &[]);
    c.expect_opt_reply(OPT_ABORT, REP_ACK);
    c.expect_closed("after ABORT");

    // EXPORT_NAME has no error reply: the server hangs up.
    let mut c = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    c.send_opt(OPT_EXPORT_NAME, b"vol0");
    c.expect_closed("plaintext EXPORT_NAME in require mode");

    // STARTTLS is acknowledged; the server then waits for a ClientHello.
    let mut c = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    c.send_opt(OPT_STARTTLS, b"junk");
    c.expect_opt_reply(OPT_STARTTLS, REP_ERR_INVALID);
    c.send_opt(OPT_STARTTLS, &[]);
    c.expect_opt_reply(OPT_STARTTLS, REP_ACK);
    // Garbage instead of a ClientHello ends the connection.
    c.send(&[0u8; 64]);
    c.expect_closed("garbage instead of a TLS handshake");

    d.assert_alive();
    assert_nbdinfo_tls(&d, &pki);
}

#[test]
fn off_mode_refuses_starttls_with_err_policy() {
    let d = Daemon::start(DaemonOpts::new());
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    c.send_opt(OPT_STARTTLS, &[]);
    c.expect_opt_reply(OPT_STARTTLS, REP_ERR_POLICY);
    c.send_opt(OPT_LIST, &[]);
    let r = c.read_opt_reply();
    assert_eq!(r.typ, REP_SERVER);
}

#[test]
fn client_ca_refuses_a_foreign_client_certificate() {
    require_tool("nbdinfo");
    require_tool("openssl");
    let root = tempdir();
    let pki = root.path().join("pki");
    let foreign = root.path().join("foreign");
    make_pki(&pki, "evsd test CA");
    make_pki(&foreign, "foreign CA");
    let ca = pki.join("ca-cert.pem");
    let mut d = tls_daemon(&pki, "require", &["--tls-ca", ca.to_str().unwrap()]);
    // Trusts our server, but presents a certificate from the foreign CA.
    let stranger = client_dir(root.path(), "stranger", &pki, &foreign);
    nbdinfo_fails(&nbds_uri(d.tcp_addr(), &stranger));
    // No client certificate at all.
    let anonymous = root.path().join("anonymous");
    std::fs::create_dir_all(&anonymous).unwrap();
    std::fs::copy(&ca, anonymous.join("ca-cert.pem")).unwrap();
    nbdinfo_fails(&nbds_uri(d.tcp_addr(), &anonymous));
    d.assert_alive();
    assert_nbdinfo_tls(&d, &pki);
}

/// With client certificates required, every connection is a full TLS handshake: a resumed
/// session would carry the certificate of the one it resumes, never checked again (one that
/// expired since would go on opening exports).
#[test]
fn client_certificates_are_verified_on_every_connection() {
    require_tool("openssl");
    let root = tempdir();
    let pki = root.path().join("pki");
    make_pki(&pki, "evsd test CA");
    let ca = pki.join("ca-cert.pem");
    let d = tls_daemon(&pki, "require", &["--tls-ca", ca.to_str().unwrap()]);
    let config = evsd_e2e::tls_client::client_config_with_cert(&pki);
    for round in 0..3 {
        let tls = evsd_e2e::tls_client::open_tls_with(d.tcp_addr(), Arc::clone(&config), "vol0");
        assert_eq!(
            tls.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "connection {round} resumed a session"
        );
    }
}

#[test]
fn reads_and_writes_over_tls_read_back() {
    require_tool("nbdcopy");
    require_tool("qemu-io");
    require_tool("openssl");
    let root = tempdir();
    let pki = root.path().join("pki");
    make_pki(&pki, "evsd test CA");
    let ca = pki.join("ca-cert.pem");
    let d = tls_daemon(&pki, "require", &["--tls-ca", ca.to_str().unwrap()]);
    let uri = nbds_uri(d.tcp_addr(), &pki);

    let src = root.path().join("src.img");
    let back = root.path().join("back.img");
    write_random_file(&src, 16 * MIB);
    run("nbdcopy", &[src.to_str().unwrap(), &uri]);
    let back_uri = format!(
        "nbds://{}/vol0?tls-certificates={}",
        d.tcp_addr(),
        pki.display()
    );
    // nbdcopy 1.14 has no --length: copy the whole (sparse) volume and cut it.
    run("nbdcopy", &[&back_uri, back.to_str().unwrap()]);
    let file = std::fs::OpenOptions::new().write(true).open(&back).unwrap();
    assert_eq!(file.metadata().unwrap().len(), GIB);
    file.set_len(16 * MIB).unwrap();
    assert_files_equal(&src, &back);

    let mut args: Vec<String> = qemu_tls_args(d.tcp_addr(), &pki).to_vec();
    for c in [
        "write -P 0xab 32M 1M",
        "read -P 0xab 32M 1M",
        "write -z 33M 64k",
        "read -P 0 33M 64k",
        "flush",
    ] {
        args.push("-c".into());
        args.push(c.into());
    }
    let out = run_stdout("qemu-io", &args);
    assert!(
        !out.contains("fail") && out.matches("read ").count() >= 2,
        "qemu-io over TLS:\n{out}"
    );
}

/// A long-lived nbdsh client: writes, waits for `go`, then writes and reads again on the same
/// connection.
fn spawn_long_client(uri: &str, ready: &Path, go: &Path) -> std::process::Child {
    let script = format!(
        r#"
import os, time
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri({uri:?})
h.pwrite(b"a" * 4096, 0)
open({ready:?}, "w").close()
deadline = time.time() + 60
while not os.path.exists({go:?}):
    assert time.time() < deadline, "never told to go on"
    time.sleep(0.05)
h.pwrite(b"b" * 4096, 4096)
assert h.pread(4096, 0) == b"a" * 4096
assert h.pread(4096, 4096) == b"b" * 4096
h.shutdown()
print("long client ok")
"#,
        ready = ready.display().to_string(),
        go = go.display().to_string(),
    );
    let mut path = std::ffi::OsString::from("/usr/bin:/bin:");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    Command::new("nbdsh")
        .args(["-c", &script])
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn nbdsh: {e}"))
}

#[test]
fn sighup_reloads_certificates_without_dropping_connections() {
    require_tool("nbdsh");
    require_tool("nbdinfo");
    require_tool("openssl");
    let root = tempdir();
    let old = root.path().join("old");
    let new = root.path().join("new");
    make_pki(&old, "old CA");
    make_pki(&new, "new CA");
    let live = root.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let install = |from: &Path| {
        for f in ["server-cert.pem", "server-key.pem"] {
            std::fs::copy(from.join(f), live.join(f)).unwrap();
        }
    };
    install(&old);
    let mut d = tls_daemon(&live, "require", &[]);
    assert_nbdinfo_tls(&d, &old);

    let ready = root.path().join("ready");
    let go = root.path().join("go");
    let mut long = spawn_long_client(&nbds_uri(d.tcp_addr(), &old), &ready, &go);
    if !wait_until(Duration::from_secs(30), || {
        ready.exists() || long.try_wait().ok().flatten().is_some()
    }) || !ready.exists()
    {
        let _ = long.kill();
        let out = long.wait_with_output().unwrap();
        panic!(
            "{}\n--- evsd ---\n{}",
            format_output("long-lived client never connected", &out),
            d.stderr()
        );
    }

    install(&new);
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || d
            .stderr()
            .contains("TLS credentials reloaded")),
        "no reload logged:\n{}",
        d.stderr()
    );
    // New connections get the new certificate: trusted by the new CA only.
    assert_nbdinfo_tls(&d, &new);
    nbdinfo_fails(&nbds_uri(d.tcp_addr(), &old));

    // A broken reload keeps the current certificate.
    std::fs::write(live.join("server-key.pem"), "garbage\n").unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || d
            .stderr()
            .contains("keeping the old ones")),
        "no reload failure logged:\n{}",
        d.stderr()
    );
    assert_nbdinfo_tls(&d, &new);

    // The connection opened before the reload still works.
    std::fs::write(&go, "").unwrap();
    let out = long.wait_with_output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("long client ok"),
        "{}\n--- evsd ---\n{}",
        format_output("long-lived TLS client", &out),
        d.stderr()
    );
    d.assert_alive();
}

/// A TLS client that sends its requests, NBD_CMD_DISC, its close_notify (or none, as many TLS
/// libraries close) and a half-close all at once has every request before the DISC served, also
/// while another connection is attached (whose fence the queued writes of a client seen gone
/// give up at) and with the requests held back by the in-flight limit, so most are still in the
/// socket when the hang-up is seen.
#[test]
fn requests_before_disc_are_served_when_a_tls_client_closes_right_after_it() {
    for close_notify in [true, false] {
        tls_close_after_disc(close_notify);
    }
}

fn tls_close_after_disc(close_notify: bool) {
    use evsd_e2e::tls_client::*;
    use std::io::{Read, Write};
    require_tool("openssl");
    let root = tempdir();
    let pki = root.path().join("pki");
    make_pki(&pki, "evsd test CA");
    let mut d = tls_daemon(&pki, "on", &["--max-inflight-requests", "2"]);
    let (other, _) = Raw::open(d.tcp_addr(), "vol0");
    let mut tls = open_tls(d.tcp_addr(), &pki.join("ca-cert.pem"), "vol0");
    let (count, write_bytes) = (200u64, 4096u64);
    let data = Prng::new(201).bytes((count * write_bytes) as usize);
    let burst = Raw::writes_then_disc(&data, write_bytes, 0x1000);
    tls.write_all(&burst).unwrap();
    if close_notify {
        tls.conn.send_close_notify();
    }
    tls.flush().unwrap();
    tls.sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answered = std::collections::HashSet::new();
    for _ in 0..count {
        let (err, cookie) = read_simple_reply(&mut tls);
        assert_eq!(
            err, 0,
            "WRITE {cookie:#x} failed (close_notify sent: {close_notify})"
        );
        assert!(
            (0x1000..0x1000 + count).contains(&cookie) && answered.insert(cookie),
            "unexpected or repeated cookie {cookie:#x}"
        );
    }
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    assert!(rest.is_empty(), "bytes after the last reply: {rest:02x?}");
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(
        c.read(1, 0, (count * write_bytes) as u32) == data,
        "every write landed"
    );
    c.disconnect();
    other.disconnect();
    d.assert_alive();
}
