//! Per-volume access rules against the real daemon: network allow-lists, client certificate
//! names (CN and DNS SAN, verified by `--tls-ca`), TLS-only volumes, read-only, per-volume
//! connection limits, rules from the config file with SIGHUP reload, persistence, and open
//! connections ended when the rules tighten. Clients: nbdinfo (libnbd), qemu-io, qemu-img and
//! the raw wire client for exact option replies.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use evsd_e2e::pki::*;
use evsd_e2e::raw::*;
use evsd_e2e::*;

/// The reply type a fresh plaintext connection gets for NBD_OPT_GO on `export`.
fn go_reply(addr: SocketAddr, export: &str) -> (u32, String) {
    let mut raw = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    let last = raw.info_or_go(OPT_GO, export, &[]).pop().unwrap();
    (last.typ, String::from_utf8_lossy(&last.data).into_owned())
}

fn raw_list(addr: SocketAddr) -> Vec<String> {
    let mut raw = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    raw.list()
}

fn nbdinfo_list(uri: &str) -> Vec<String> {
    let out = run_stdout("nbdinfo", &["--list", "--json", uri]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --list: {e}\n{out}"));
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports array: {v:#}"))
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

fn evsctl_fails(d: &Daemon, args: &[&str], code: i32) -> String {
    let out = d.evsctl(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        format_output(&format!("evsctl {args:?}"), &out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits until the server closes `raw`'s connection (EOF or reset), at most `timeout`.
fn closed_by_server(raw: &mut Raw, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        raw.s.set_read_timeout(Some(left)).unwrap();
        match raw.s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn network_rules_hide_volumes_from_list_and_open() {
    require_tool("nbdinfo");
    let d = Daemon::start(DaemonOpts::new().with_vol0().volume("vol1:64M"));
    let addr = d.tcp_addr();
    assert_eq!(nbdinfo_list(&d.tcp_uri("")), ["vol0", "vol1"]);

    // Only a network the client is not in: hidden everywhere, exactly like a missing volume.
    d.evsctl_ok(&["access", "set", "vol1", "--allow-network", "10.0.0.0/8"]);
    assert_eq!(nbdinfo_list(&d.tcp_uri("")), ["vol0"]);
    assert_eq!(nbdinfo_list(&d.unix_uri("")), ["vol0"]);
    let (hidden, msg) = go_reply(addr, "vol1");
    let (missing, _) = go_reply(addr, "no-such-volume");
    assert_eq!(hidden, REP_ERR_UNKNOWN, "{msg}");
    assert_eq!(hidden, missing);
    let out = run_unchecked("nbdinfo", &[&d.tcp_uri("vol1")]);
    assert!(!out.status.success(), "{}", format_output("nbdinfo", &out));
    // INFO and meta contexts give nothing away either.
    let mut raw = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    let last = raw.info_or_go(OPT_INFO, "vol1", &[]).pop().unwrap();
    assert_eq!(last.typ, REP_ERR_UNKNOWN);
    // EXPORT_NAME has no error reply: the server disconnects.
    let mut raw = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    raw.send_opt(OPT_EXPORT_NAME, b"vol1");
    assert!(closed_by_server(&mut raw, Duration::from_secs(5)));

    // Loopback allowed: TCP sees it, the Unix socket does not until "unix" is listed.
    d.evsctl_ok(&["access", "set", "vol1", "--allow-network", "127.0.0.0/8"]);
    assert_eq!(nbdinfo_list(&d.tcp_uri("")), ["vol0", "vol1"]);
    assert_eq!(nbdinfo_list(&d.unix_uri("")), ["vol0"]);
    d.evsctl_ok(&[
        "access",
        "set",
        "vol1",
        "--allow-network",
        "127.0.0.1",
        "--allow-network",
        "unix",
    ]);
    assert_eq!(nbdinfo_list(&d.unix_uri("")), ["vol0", "vol1"]);
    let out = qemu_io(
        &d.unix_uri("vol1"),
        &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"],
    );
    assert!(out.contains("wrote 65536/65536"), "{out}");

    // Bad rules are refused with the value and change nothing.
    let err = evsctl_fails(
        &d,
        &["access", "set", "vol1", "--allow-network", "10.1.2.3/8"],
        2,
    );
    assert!(err.contains("10.1.2.3/8"), "{err}");
    evsctl_fails(&d, &["access", "set", "nope", "--read-only"], 4);
    evsctl_fails(&d, &["access", "set", "vol1", "--max-connections", "0"], 2);
    assert_eq!(nbdinfo_list(&d.unix_uri("")), ["vol0", "vol1"]);

    // Cleared: open to everyone again.
    d.evsctl_ok(&["access", "clear", "vol1"]);
    assert_eq!(raw_list(addr), ["vol0", "vol1"]);
}

#[test]
fn read_only_rule_is_enforced_and_ends_open_writers() {
    require_tool("qemu-io");
    let d = Daemon::start(DaemonOpts::new().with_vol0());
    let uri = d.tcp_uri("vol0");
    qemu_io(&uri, &["write -P 0x11 0 1M"]);
    let (mut writer, info) = Raw::open(d.tcp_addr(), "vol0");
    assert_eq!(info.flags & TF_READ_ONLY, 0);

    let shown = d.evsctl_json(&["access", "set", "vol0", "--read-only"]);
    assert_eq!(shown["read_only"], true, "{shown:#}");
    assert_eq!(shown["source"], "admin", "{shown:#}");
    // The writer's connection is ended; a new one is read-only.
    assert!(closed_by_server(&mut writer, Duration::from_secs(10)));
    let (_reader, info) = Raw::open(d.tcp_addr(), "vol0");
    assert_ne!(info.flags & TF_READ_ONLY, 0);
    assert_eq!(info.flags & TF_SEND_TRIM, 0);
    let out = run_unchecked("qemu-io", &["-f", "raw", "-c", "write -P 0x22 0 4k", &uri]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("ermission denied")
            || text.contains("read-only")
            || text.contains("Read-only"),
        "{text}"
    );
    let out = qemu_io_read_only(&uri, &["read -P 0x11 0 1M"]);
    assert!(out.contains("read 1048576/1048576"), "{out}");
    // Readers are not disturbed by a change that still allows them.
    let (mut reader, _) = Raw::open(d.tcp_addr(), "vol0");
    d.evsctl_ok(&[
        "access",
        "set",
        "vol0",
        "--read-only",
        "--max-connections",
        "8",
    ]);
    reader.send_req(0, CMD_READ, 7, 0, 4096, &[]);
    let (err, cookie) = reader.read_simple_reply();
    assert_eq!((err, cookie), (0, 7));
    assert_eq!(reader.recv(4096), vec![0x11; 4096]);
    // Snapshot exports follow their volume's rules.
    d.evsctl_ok(&["snapshot", "create", "vol0", "s1"]);
    d.evsctl_ok(&["access", "set", "vol0", "--allow-network", "10.0.0.0/8"]);
    assert_eq!(go_reply(d.tcp_addr(), "vol0@s1").0, REP_ERR_UNKNOWN);
    assert!(closed_by_server(&mut reader, Duration::from_secs(10)));
}

#[test]
fn per_volume_connection_limit() {
    let d = Daemon::start(
        DaemonOpts::new()
            .with_vol0()
            .volume("vol1:64M")
            .metrics_listen("127.0.0.1:0"),
    );
    let addr = d.tcp_addr();
    d.evsctl_ok(&["access", "set", "vol0", "--max-connections", "2"]);
    let first = Raw::open(addr, "vol0");
    let _second = Raw::open(addr, "vol0");
    let (typ, msg) = go_reply(addr, "vol0");
    assert_eq!(typ, REP_ERR_POLICY, "{msg}");
    assert!(msg.contains("connection limit of 2"), "{msg}");
    let hits = evsd_e2e::metrics::value(
        &evsd_e2e::metrics::scrape(d.metrics_addr().unwrap()),
        "evsd_limit_hits_total{limit=\"volume_connections\"}",
    );
    assert_eq!(hits, 1.0);
    // Other volumes are not affected, and LIST still shows the full volume.
    let _other = Raw::open(addr, "vol1");
    assert!(raw_list(addr).contains(&"vol0".to_owned()));
    // A freed slot is usable again.
    drop(first);
    assert!(wait_until(Duration::from_secs(10), || go_reply(
        addr, "vol0"
    )
    .0 == REP_ACK));
}

/// Two clients finishing GO at once on a volume with one slot left: both pass the handshake's
/// check, one attaches, and the other, refused when it attaches, still gets the refusal as an
/// option reply rather than a closed connection.
#[test]
fn racing_clients_over_a_connection_limit_each_get_an_answer() {
    let d = Daemon::start(DaemonOpts::new().with_vol0());
    let addr = d.tcp_addr();
    d.evsctl_ok(&["access", "set", "vol0", "--max-connections", "1"]);
    for round in 0..100 {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let barrier = std::sync::Arc::clone(&barrier);
                std::thread::spawn(move || {
                    let mut raw = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
                    barrier.wait();
                    // Panics (failing the round) if the server closes instead of answering.
                    let last = raw.info_or_go(OPT_GO, "vol0", &[]).pop().unwrap();
                    (raw, last)
                })
            })
            .collect();
        let mut answers: Vec<(Raw, OptReply)> = racers
            .into_iter()
            .map(|racer| racer.join().expect("a racer got no answer"))
            .collect();
        answers.sort_by_key(|(_, reply)| reply.typ);
        let (winner, won) = answers.remove(0);
        let (_, lost) = answers.remove(0);
        assert_eq!(won.typ, REP_ACK, "round {round}");
        let message = String::from_utf8_lossy(&lost.data).into_owned();
        assert_eq!(lost.typ, REP_ERR_POLICY, "round {round}: {message}");
        assert!(
            message.contains("connection limit of 1"),
            "round {round}: {message}"
        );
        winner.disconnect();
        assert!(
            wait_until(Duration::from_secs(10), || {
                d.evsctl_json(&["volume", "show", "vol0"])["connections"] == 0
            }),
            "round {round}: the winner's slot was not freed"
        );
    }
}

#[test]
fn rules_persist_across_restart_and_die_with_the_volume() {
    let mut d = Daemon::start(DaemonOpts::new().with_vol0().volume("vol1:64M"));
    d.evsctl_ok(&["access", "set", "vol1", "--allow-network", "10.0.0.0/8"]);
    d.restart();
    assert_eq!(go_reply(d.tcp_addr(), "vol1").0, REP_ERR_UNKNOWN);
    let listed = d.evsctl_json(&["access", "list"]);
    assert_eq!(listed[0]["name"], "vol1", "{listed:#}");
    assert_eq!(listed[0]["allow_networks"][0], "10.0.0.0/8", "{listed:#}");
    d.evsctl_ok(&["volume", "delete", "vol1"]);
    d.evsctl_ok(&["volume", "create", "vol1", "--size", "64M"]);
    assert_eq!(go_reply(d.tcp_addr(), "vol1").0, REP_ACK);
    assert_eq!(d.evsctl_json(&["access", "list"]), serde_json::json!([]));
}

/// A volume that fails to load at a start (here its manifest says a format this daemon does not
/// know) keeps its rules: once it loads again it is as closed as before, not open to all.
/// Nor does that start make a default `vol0` in place of the only volume.
#[test]
fn a_volume_that_fails_to_load_keeps_its_rules() {
    let mut d = Daemon::start(DaemonOpts::new());
    d.evsctl_ok(&["volume", "create", "vault", "--size", "64M"]);
    d.evsctl_ok(&["volume", "delete", "vol0"]);
    d.evsctl_ok(&["access", "set", "vault", "--allow-network", "10.0.0.0/8"]);
    d.terminate_ok();
    let manifest = d.data_dir().join("volumes/vault/volume.json");
    let good = std::fs::read(&manifest).unwrap();
    let mut newer: serde_json::Value = serde_json::from_slice(&good).unwrap();
    newer["format_version"] = serde_json::json!(99);
    std::fs::write(&manifest, serde_json::to_vec(&newer).unwrap()).unwrap();
    d.restart();
    assert_eq!(go_reply(d.tcp_addr(), "vault").0, REP_ERR_UNKNOWN);
    assert_eq!(go_reply(d.tcp_addr(), "vol0").0, REP_ERR_UNKNOWN);
    d.terminate_ok();
    std::fs::write(&manifest, &good).unwrap();
    d.restart();
    assert_eq!(go_reply(d.tcp_addr(), "vault").0, REP_ERR_UNKNOWN);
    let listed = d.evsctl_json(&["access", "list"]);
    assert_eq!(listed[0]["name"], "vault", "{listed:#}");
    assert_eq!(listed[0]["allow_networks"][0], "10.0.0.0/8", "{listed:#}");
}

#[test]
fn config_file_rules_win_and_reload_on_sighup() {
    let dir = tempdir();
    let config = dir.path().join("evsd.toml");
    std::fs::write(
        &config,
        "[access.vol1]\nallow_networks = [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    let d = Daemon::start(
        DaemonOpts::new()
            .with_vol0()
            .volume("vol1:64M")
            .arg("--config")
            .arg(config.to_str().unwrap()),
    );
    assert_eq!(go_reply(d.tcp_addr(), "vol1").0, REP_ERR_UNKNOWN);
    let shown = d.evsctl_json(&["access", "show", "vol1"]);
    assert_eq!(shown["source"], "config", "{shown:#}");
    let err = evsctl_fails(&d, &["access", "set", "vol1", "--read-only"], 2);
    assert!(err.contains("config file"), "{err}");

    std::fs::write(&config, "[access.vol1]\nread_only = true\n").unwrap();
    d.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || go_reply(
        d.tcp_addr(),
        "vol1"
    )
    .0 == REP_ACK));
    let (_raw, info) = Raw::open(d.tcp_addr(), "vol1");
    assert_ne!(info.flags & TF_READ_ONLY, 0);

    // A broken file on reload keeps the rules in force.
    std::fs::write(&config, "[access.vol1]\nallow_networks = [\"nonsense\"]\n").unwrap();
    d.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || d
        .all_stderr()
        .contains("keeping the old access rules")));
    let (_raw, info) = Raw::open(d.tcp_addr(), "vol1");
    assert_ne!(info.flags & TF_READ_ONLY, 0);

    // A file the next start would refuse is refused whole, good access rules and all.
    std::fs::write(&config, "tls = \"yes\"\n[access.vol1]\nread_only = false\n").unwrap();
    d.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || d
        .all_stderr()
        .contains("the next start would refuse it too")));
    let (_raw, info) = Raw::open(d.tcp_addr(), "vol1");
    assert_ne!(info.flags & TF_READ_ONLY, 0);

    // A good file with another setting changed: its rules apply now, the setting at a restart.
    std::fs::write(
        &config,
        "handshake_timeout_secs = 31\n[access.vol1]\nread_only = false\n",
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || d
        .all_stderr()
        .contains("take effect at the next start")));
    assert!(wait_until(Duration::from_secs(10), || {
        let (_raw, info) = Raw::open(d.tcp_addr(), "vol1");
        info.flags & TF_READ_ONLY == 0
    }));

    // An invalid rule in the config file stops the daemon from starting, naming it.
    std::fs::write(&config, "[access.vol1]\nmax_connections = 0\n").unwrap();
    let out = run_unchecked(
        evsd_bin().to_str().unwrap(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[access.vol1]") && err.contains("max_connections"),
        "{err}"
    );
}

fn tls_daemon(pki: &Path) -> Daemon {
    Daemon::start(
        tls_opts(pki)
            .volume("secure:64M")
            .volume("named:64M")
            .arg("--tls-ca")
            .arg(pki.join("ca-cert.pem").to_str().unwrap()),
    )
}

/// vol0 served with TLS on, the server's certificate from `pki`, no client CA.
fn tls_opts(pki: &Path) -> DaemonOpts {
    DaemonOpts::new()
        .with_vol0()
        .arg("--tls")
        .arg("on")
        .arg("--tls-cert")
        .arg(pki.join("server-cert.pem").to_str().unwrap())
        .arg("--tls-key")
        .arg(pki.join("server-key.pem").to_str().unwrap())
}

fn nbds(addr: SocketAddr, export: &str, client: &Path) -> String {
    format!(
        "nbds://{addr}/{export}?tls-certificates={}",
        client.display()
    )
}

#[test]
fn tls_only_volumes_and_certificate_names() {
    require_tool("nbdinfo");
    require_tool("openssl");
    require_tool("qemu-img");
    let root = tempdir();
    let pki = root.path().join("pki");
    make_pki(&pki, "evsd test CA");
    make_client(&pki, "alice", "client-a", None);
    make_client(&pki, "bob", "bob", Some("b.clients.example"));
    make_client(&pki, "carol", "carol", Some("c.clients.example"));
    let alice = client_dir_for(root.path(), &pki, "alice");
    let bob = client_dir_for(root.path(), &pki, "bob");
    let carol = client_dir_for(root.path(), &pki, "carol");
    let d = tls_daemon(&pki);
    let addr = d.tcp_addr();
    d.evsctl_ok(&["access", "set", "secure", "--tls-only"]);
    let shown = d.evsctl_json(&[
        "access",
        "set",
        "named",
        "--allow-name",
        "CLIENT-A",
        "--allow-name",
        "b.clients.example",
    ]);
    assert!(shown.get("warning").is_none(), "{shown:#}");

    // Plaintext: TLS-only volumes answer TLS_REQD (the spec's SELECTIVETLS) and are not listed;
    // a plaintext EXPORT_NAME is disconnected; vol0 is served as before.
    assert_eq!(go_reply(addr, "secure").0, REP_ERR_TLS_REQD);
    assert_eq!(go_reply(addr, "named").0, REP_ERR_TLS_REQD);
    assert_eq!(go_reply(addr, "vol0").0, REP_ACK);
    assert_eq!(raw_list(addr), ["vol0"]);
    let mut raw = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    raw.send_opt(OPT_EXPORT_NAME, b"secure");
    assert!(closed_by_server(&mut raw, Duration::from_secs(5)));
    let out = run_unchecked("nbdinfo", &[&d.tcp_uri("secure")]);
    assert!(!out.status.success(), "{}", format_output("nbdinfo", &out));

    // Over TLS: any verified client opens the TLS-only volume; names decide "named".
    let out = run_stdout("nbdinfo", &["--json", &nbds(addr, "secure", &carol)]);
    assert!(out.contains("\"TLS\": true"), "{out}");
    for (who, dir) in [("CN client-a", &alice), ("DNS SAN", &bob)] {
        let out = run_unchecked("nbdinfo", &["--json", &nbds(addr, "named", dir)]);
        assert!(
            out.status.success(),
            "{who}: {}",
            format_output("nbdinfo", &out)
        );
    }
    let out = run_unchecked("nbdinfo", &[&nbds(addr, "named", &carol)]);
    assert!(
        !out.status.success(),
        "{}",
        format_output("nbdinfo carol", &out)
    );
    assert_eq!(
        nbdinfo_list(&nbds(addr, "", &carol)),
        ["secure", "vol0"],
        "carol must not see 'named'"
    );
    assert_eq!(
        nbdinfo_list(&nbds(addr, "", &alice)),
        ["named", "secure", "vol0"]
    );
    // qemu with alice's certificate writes and reads back through the name rule.
    let out = run_stdout(
        "qemu-io",
        &[
            "--object".to_string(),
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                alice.display()
            ),
            "--image-opts".into(),
            format!(
                "driver=nbd,host={},port={},export=named,tls-creds=tls0",
                addr.ip(),
                addr.port()
            ),
            "-c".into(),
            "write -P 0x7e 0 64k".into(),
            "-c".into(),
            "read -P 0x7e 0 64k".into(),
        ],
    );
    assert!(out.contains("read 65536/65536"), "{out}");
}

/// Name rules on a TLS server that verifies no client certificates (no `--tls-ca`) admit
/// nobody: setting them says so.
#[test]
fn name_rules_without_a_client_ca_warn() {
    require_tool("openssl");
    let root = tempdir();
    let pki = root.path().join("pki");
    make_pki(&pki, "evsd test CA");
    let d = Daemon::start(tls_opts(&pki));
    let shown = d.evsctl_json(&["access", "set", "vol0", "--allow-name", "alice"]);
    assert!(
        shown["warning"]
            .as_str()
            .is_some_and(|w| w.contains("--tls-ca")),
        "{shown:#}"
    );
    let shown = d.evsctl_json(&["access", "set", "vol0", "--tls-only"]);
    assert!(shown.get("warning").is_none(), "{shown:#}");
}

#[test]
fn rules_needing_tls_on_a_server_without_it_warn_and_refuse_with_policy() {
    let d = Daemon::start(DaemonOpts::new().with_vol0());
    let shown = d.evsctl_json(&["access", "set", "vol0", "--tls-only"]);
    assert!(
        shown["warning"].as_str().is_some_and(|w| w.contains("TLS")),
        "{shown:#}"
    );
    // Without TLS on the server, the spec forbids TLS_REQD: ERR_POLICY says why.
    let (typ, msg) = go_reply(d.tcp_addr(), "vol0");
    assert_eq!(typ, REP_ERR_POLICY, "{msg}");
    assert!(msg.contains("TLS"), "{msg}");
}

/// Rules and memberships stored while the volume is being deleted go with it: each round sets
/// rules and adds the volume to a server over and over from two other admin connections while
/// the volume is deleted, then nothing may name it. (A stress check of the end state: the
/// window `Registry::was_deleted` closes is too narrow for it to hit in 20 rounds; the unit
/// test of `was_deleted` covers the check itself.)
#[test]
fn rules_and_memberships_racing_a_delete_go_with_the_volume() {
    use evsd_e2e::admin::{admin_ok, Admin};
    use serde_json::json;
    let d = Daemon::start(DaemonOpts::new().no_default_volume().volume("anchor:1M"));
    admin_ok(
        &d,
        "server.create",
        json!({"name": "srv", "volumes": ["anchor"]}),
    );
    for round in 0..20 {
        let name = format!("race{round}");
        admin_ok(&d, "volume.create", json!({"name": name, "size": "1M"}));
        let spam = |method: &'static str, params: serde_json::Value| {
            let path = d.admin_path().to_owned();
            let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let seen = std::sync::Arc::clone(&progress);
            let thread = std::thread::spawn(move || {
                let mut admin = Admin::connect(&path);
                let mut stored = 0;
                loop {
                    match admin.call(method, &params).expect("admin connection") {
                        Ok(_) => {
                            stored += 1;
                            seen.store(stored, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(e) if e.code == "not_found" => break,
                        Err(e) => panic!("{method} {params}: {e:?}"),
                    }
                    if method == "server.add_volume" {
                        let _ = admin.call("server.remove_volume", &params);
                    }
                }
                stored
            });
            (thread, progress)
        };
        let (rules, rules_stored) = spam(
            "access.set",
            json!({"name": name, "allow_networks": ["10.0.0.0/8"]}),
        );
        let (member, members_stored) =
            spam("server.add_volume", json!({"name": "srv", "volume": name}));
        // Both sides under way (a fixed pause was too short on a loaded machine), then a
        // varying delay so the delete lands at different points of their loops.
        let stored =
            |n: &std::sync::atomic::AtomicUsize| n.load(std::sync::atomic::Ordering::SeqCst) > 0;
        assert!(
            wait_until(Duration::from_secs(10), || stored(&rules_stored)
                && stored(&members_stored)),
            "round {round}: the calls made no progress"
        );
        std::thread::sleep(Duration::from_millis(round % 7));
        admin_ok(&d, "volume.delete", json!({"name": name}));
        // Each side stored at least once before the delete: the calls ran against it.
        assert!(rules.join().unwrap() > 0, "round {round}: no rule was set");
        assert!(
            member.join().unwrap() > 0,
            "round {round}: no member was added"
        );
        let listed = admin_ok(&d, "access.list", json!({}));
        assert_eq!(
            listed,
            json!([]),
            "round {round}: rules outlived the volume"
        );
        let server = admin_ok(&d, "server.show", json!({"name": "srv"}));
        assert_eq!(
            server["volumes"],
            json!(["anchor"]),
            "round {round}: membership outlived the volume"
        );
    }
}
