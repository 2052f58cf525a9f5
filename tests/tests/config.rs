//! `--config FILE` and `--print-default-config` against the real binary.

use std::os::unix::net::UnixStream;
use std::process::Command;

use evsd_e2e::raw::*;
use evsd_e2e::*;

/// Kills the daemon when the test ends, however it ends.
struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn config_file_alone_configures_the_daemon() {
    let dir = tempdir();
    let data = dir.path().join("from-config");
    let ready = dir.path().join("ready.json");
    let config = dir.path().join("evsd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {data:?}\nadmin_socket = {admin:?}\n\
             ready_file = {ready:?}\nmetrics_listen = \"off\"\nno_default_volume = true\n\
             create_volumes = [\"cfgvol:8M\"]\n",
            data = data.display().to_string(),
            admin = dir.path().join("admin.sock").display().to_string(),
            ready = ready.display().to_string(),
        ),
    )
    .unwrap();
    let child = Command::new(evsd_bin())
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let _guard = Kill(child);
    assert!(
        wait_until(std::time::Duration::from_secs(20), || ready.exists()),
        "no ready file from the config's ready_file"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    assert_eq!(
        v["metrics"],
        serde_json::Value::Null,
        "metrics_listen = off: {v}"
    );
    let tcp = v["tcp"].as_str().unwrap().parse().unwrap();
    let mut c = Raw::handshake(tcp, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    assert_eq!(c.list(), vec!["cfgvol".to_string()]);
    let (_c, info) = Raw::open(tcp, "cfgvol");
    assert_eq!(info.size, 8 << 20);
    assert!(
        data.join("volumes").is_dir(),
        "data_dir from the file not used"
    );
}

/// Paths given relative to the working directory, a bare file name among them, as a user
/// trying the daemon in a scratch directory types them. The ready file's directory entry is
/// synced after its rename: a bare name's parent is the empty path, which once failed the start
/// after the file was written.
#[test]
fn relative_paths_and_a_bare_ready_file_name_work() {
    let dir = tempdir();
    let child = Command::new(evsd_bin())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "data",
            "--ready-file",
            "ready",
            "--unix",
            "nbd.sock",
            "--admin-socket",
            "admin.sock",
            "--metrics-listen",
            "off",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let mut guard = Kill(child);
    let ready = dir.path().join("ready");
    assert!(
        wait_until(std::time::Duration::from_secs(20), || ready.exists()),
        "no ready file"
    );
    // Still running once the ready file is there, and serving the default volume.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        guard.0.try_wait().unwrap().is_none(),
        "evsd exited after writing its ready file"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    let tcp = v["tcp"].as_str().unwrap().parse().unwrap();
    let (_c, info) = Raw::open(tcp, "vol0");
    assert_eq!(info.size, 1 << 30);
    assert!(
        dir.path().join("data/volumes").is_dir(),
        "data dir not made"
    );
    let unix = UnixStream::connect(dir.path().join("nbd.sock"));
    assert!(unix.is_ok(), "relative unix socket: {unix:?}");
}

#[test]
fn flags_override_the_config_file() {
    let dir = tempdir();
    let config = dir.path().join("evsd.toml");
    let unused = dir.path().join("unused-data");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\ncreate_volumes = [\"filevol:8M\"]\n",
            unused.display().to_string()
        ),
    )
    .unwrap();
    // The harness passes --data-dir and --create-volume, which must win over the file.
    let d = Daemon::start(
        DaemonOpts::new()
            .no_default_volume()
            .volume("flagvol:4M")
            .arg("--config")
            .arg(config.to_str().unwrap()),
    );
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    assert_eq!(c.list(), vec!["flagvol".to_string()]);
    assert!(
        !unused.exists(),
        "the file's data_dir was used despite --data-dir"
    );
}

/// A volume the start is told to create that exists but fails to load is skipped like any
/// volume that fails to load: the daemon still starts and serves the others.
#[test]
fn a_volume_to_create_that_fails_to_load_does_not_stop_the_start() {
    let mut d = Daemon::start(
        DaemonOpts::new()
            .no_default_volume()
            .volume("a:8M")
            .volume("b:8M"),
    );
    d.terminate_ok();
    let manifest = d.data_dir().join("volumes/a/volume.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    // Of a newer format: refused, not repaired.
    v["format_version"] = serde_json::json!(999);
    std::fs::write(&manifest, serde_json::to_vec(&v).unwrap()).unwrap();
    d.restart();
    assert!(d.stderr().contains("skipping volume"), "{}", d.stderr());
    let (mut c, info) = Raw::open(d.tcp_addr(), "b");
    assert_eq!(info.size, 8 << 20);
    c.write(1, 0, 0, &[3u8; 4096]);
    assert_eq!(c.read(2, 0, 4096), [3u8; 4096]);
}

#[test]
fn print_default_config_is_complete_and_accepted() {
    let out = Command::new(evsd_bin())
        .arg("--print-default-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", format_output("print", &out));
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "listen",
        "data_dir",
        "metrics_listen",
        "max_connections",
        "log_format",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{key} = "))),
            "{key} missing:\n{text}"
        );
    }
}

#[test]
fn unknown_key_fails_start_with_its_name() {
    let dir = tempdir();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nmax_conections = 3\n").unwrap();
    let out = Command::new(evsd_bin())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("max_conections") && stderr.contains("bad.toml"),
        "{stderr}"
    );
}

/// `evsd ARGS`, expected to exit with an error at once; its stderr.
fn refused_start(args: &[&std::ffi::OsStr]) -> String {
    let dir = tempdir();
    let stderr_path = dir.path().join("stderr");
    let child = Command::new(evsd_bin())
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let exited = wait_until(std::time::Duration::from_secs(15), || {
        child.0.try_wait().unwrap().is_some()
    });
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(exited, "a second daemon started and runs:\n{stderr}");
    assert!(!child.0.wait().unwrap().success(), "{stderr}");
    stderr
}

/// A second daemon may not use a data directory in use, nor take over a socket path a running
/// daemon listens on: it exits with a clear error and the first keeps serving. A daemon killed
/// with `kill -9` keeps neither from its successor.
#[test]
fn a_second_daemon_cannot_take_a_data_directory_or_a_socket_in_use() {
    let mut d = Daemon::start_default();
    let other = tempdir();
    let other_admin = other.path().join("admin.sock");
    let data_dir = d.data_dir();
    let stderr = refused_start(&[
        "--data-dir".as_ref(),
        data_dir.as_os_str(),
        "--admin-socket".as_ref(),
        other_admin.as_os_str(),
    ]);
    assert!(
        stderr.contains("is in use by another evsd")
            && stderr.contains(&format!("pid {}", d.pid())),
        "{stderr}"
    );
    assert!(
        !other_admin.exists(),
        "the refused daemon bound its admin socket"
    );

    let other_data = other.path().join("data");
    for (flag, taken) in [
        ("--unix", d.unix_path()),
        ("--admin-socket", d.admin_path()),
    ] {
        let mut args = vec!["--data-dir".as_ref(), other_data.as_os_str()];
        if flag == "--unix" {
            args.extend(["--admin-socket".as_ref(), other_admin.as_os_str()]);
        }
        args.extend([flag.as_ref(), taken.as_os_str()]);
        let stderr = refused_start(&args);
        assert!(
            stderr.contains("another process accepts connections on it"),
            "{flag}: {stderr}"
        );
    }

    // The first daemon still answers on both of its socket paths.
    let mut unix = UnixStream::connect(d.unix_path()).unwrap();
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut unix, &mut greeting).unwrap();
    assert_eq!(be64(&greeting[0..8]), NBDMAGIC);
    assert!(d.evsctl_ok(&["volume", "list"]).contains("vol0"));
    d.assert_alive();

    // kill -9 leaves a stale socket file and lock file: the next daemon takes both.
    d.kill9();
    d.restart();
    assert!(d.evsctl_ok(&["volume", "list"]).contains("vol0"));
}

/// The congestion control algorithm of the daemon's end of the one connection on `port`, as
/// `ss` reports it.
fn server_congestion(port: u16) -> String {
    require_tool("ss");
    let filter = format!("( sport = :{port} )");
    let text = run_stdout("ss", &["-tinH", "state", "established", &filter]);
    let loaded =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").unwrap();
    let known: Vec<&str> = loaded.split_whitespace().collect();
    text.split_whitespace()
        .find(|word| known.contains(word))
        .unwrap_or_else(|| panic!("none of {known:?} in `ss` output:\n{text}"))
        .to_owned()
}

fn system_congestion() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .unwrap()
        .trim()
        .to_owned()
}

/// What `--tcp-congestion auto` must give a client on this host.
fn assert_served_off_pacing(algorithm: &str, system: &str, log: &str) {
    if system.starts_with("bbr") {
        assert!(
            algorithm == "cubic" || algorithm == "reno",
            "client on this host served with {algorithm} (system: {system})"
        );
        assert!(log.contains("paces loopback traffic"), "{log}");
    } else {
        assert_eq!(algorithm, system, "auto changed a non-pacing algorithm");
    }
}

/// `--tcp-congestion`: by default a client on this host is served off BBR (whose pacing
/// reorders loopback traffic), on a loopback listener as on a wildcard one, and otherwise with
/// the system's algorithm; "system" keeps the system's; a name is used for every connection,
/// and one the kernel refuses stops the start with the reason.
#[test]
fn tcp_congestion_follows_the_setting() {
    let system = system_congestion();
    let serve = |setting: Option<&str>, listen: &str| {
        let mut opts = DaemonOpts::new()
            .no_default_volume()
            .volume("cc:1M")
            .listen(listen);
        if let Some(setting) = setting {
            opts = opts.arg("--tcp-congestion").arg(setting);
        }
        let d = Daemon::start(opts);
        let asked: std::net::SocketAddr = listen.parse().unwrap();
        assert_eq!(d.tcp_addr().ip(), asked.ip(), "bound elsewhere than asked");
        // To 0.0.0.0 Linux connects over loopback, from 127.0.0.1.
        let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
        assert_eq!(c.list(), vec!["cc".to_string()]);
        let algorithm = server_congestion(d.tcp_addr().port());
        (algorithm, d.stderr())
    };

    let (auto, log) = serve(None, "127.0.0.1:0");
    assert_served_off_pacing(&auto, &system, &log);
    assert_eq!(serve(Some("system"), "127.0.0.1:0").0, system);
    assert_eq!(serve(Some("reno"), "127.0.0.1:0").0, "reno");

    // A wildcard listener keeps the system's algorithm; its loopback clients are switched
    // one by one.
    let (wildcard, log) = serve(None, "0.0.0.0:0");
    assert_served_off_pacing(&wildcard, &system, &log);

    // Refused before anything is made or bound.
    let scratch = tempdir();
    let data_dir = scratch.path().join("d");
    let socket = scratch.path().join("nbd.sock");
    let stderr = refused_start(&[
        "--tcp-congestion".as_ref(),
        "no_such_algo".as_ref(),
        "--data-dir".as_ref(),
        data_dir.as_os_str(),
        "--unix".as_ref(),
        socket.as_os_str(),
    ]);
    assert!(
        stderr.contains("tcp_congestion \"no_such_algo\"")
            && stderr.contains("modprobe tcp_no_such_algo"),
        "{stderr}"
    );
    assert!(!data_dir.exists(), "the data directory was made: {stderr}");
    assert!(!socket.exists(), "the Unix socket was bound: {stderr}");
    let stderr = refused_start(&["--tcp-congestion".as_ref(), "a b".as_ref()]);
    assert!(stderr.contains("tcp_congestion \"a b\""), "{stderr}");
}
