//! Graceful shutdown: SIGTERM/SIGINT exit 0, data is kept.

use std::time::{Duration, Instant};

use evsd_e2e::raw::*;
use evsd_e2e::*;

#[test]
fn sigterm_exits_zero_and_data_reads_back() {
    require_tool("qemu-io");
    let mut d = Daemon::start(DaemonOpts::new().with_vol0().volume("vol1:16M"));
    qemu_io(&d.tcp_uri("vol0"), &["write -P 0x42 10M 2M"]);
    qemu_io(&d.unix_uri("vol1"), &["write -P 0x43 0 16M"]);
    let st = d.terminate();
    assert!(st.success(), "SIGTERM exit status {st}\n{}", d.stderr());
    assert!(!d.is_running());
    d.restart();
    qemu_io(
        &d.unix_uri("vol0"),
        &["read -P 0x42 10M 2M", "read -P 0 0 10M"],
    );
    qemu_io(&d.tcp_uri("vol1"), &["read -P 0x43 0 16M"]);
}

/// A graceful stop leaves a clean-stop marker in every volume's folder once its writes are
/// held off and synced; the next start takes it (a crash in that run is no clean stop), and
/// after a `kill -9` there is none, so the start after it walks the heads for bytes a write
/// cut short left under blocks the map does not name.
#[test]
fn a_clean_stop_is_marked_per_volume_and_taken_by_the_next_start() {
    let mut d = Daemon::start(DaemonOpts::new().with_vol0().volume("vol1:16M"));
    {
        let (mut c, _) = Raw::open(d.tcp_addr(), "vol1");
        c.write(1, 0, 0, &[5u8; 4096]);
        c.disconnect();
    }
    let markers = |d: &Daemon| {
        ["vol0", "vol1"].map(|v| {
            d.data_dir()
                .join("volumes")
                .join(v)
                .join("clean-stop")
                .exists()
        })
    };
    assert_eq!(markers(&d), [false, false]);
    let st = d.terminate();
    assert!(st.success(), "SIGTERM exit status {st}\n{}", d.stderr());
    assert_eq!(markers(&d), [true, true], "{}", d.stderr());
    d.restart();
    assert_eq!(markers(&d), [false, false], "taken by the start");
    d.kill9();
    assert_eq!(markers(&d), [false, false]);
    d.restart();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol1");
    assert!(c.read(1, 0, 4096).iter().all(|&x| x == 5));
}

#[test]
fn sigint_exits_zero() {
    let mut d = Daemon::start_default();
    {
        let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
        c.write(1, 0, 0, &[7u8; 4096]);
        c.disconnect();
    }
    d.signal(libc::SIGINT);
    let st = d.wait_exit(SHUTDOWN_TIMEOUT);
    assert!(st.success(), "SIGINT exit status {st}\n{}", d.stderr());
    d.restart();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(c.read(1, 0, 4096).iter().all(|&x| x == 7));
}

#[test]
fn sigterm_with_idle_clients_exits_promptly() {
    let mut d = Daemon::start_default();
    // One idle in transmission (after a completed write), one idle mid-handshake.
    let (mut idle, _) = Raw::open(d.tcp_addr(), "vol0");
    idle.write(1, 0, 0, &[1u8; 4096]);
    let mut hs = Raw::connect(d.tcp_addr());
    hs.read_greeting();
    let start = Instant::now();
    let st = d.terminate();
    let el = start.elapsed();
    assert!(
        st.success(),
        "SIGTERM with idle clients: exit status {st}\n{}",
        d.stderr()
    );
    assert!(
        el < Duration::from_secs(10),
        "shutdown with only idle clients took {el:?}"
    );
    idle.expect_closed("idle client at shutdown");
    hs.expect_closed("handshaking client at shutdown");
    d.restart();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(c.read(1, 0, 4096).iter().all(|&x| x == 1));
}

/// A client stuck in the middle of a WRITE payload may hold shutdown up for
/// the grace period, but the daemon must still exit 0 by itself and keep the
/// completed writes.
#[test]
fn sigterm_with_client_stalled_mid_payload_still_exits_zero() {
    let mut d = Daemon::start_default();
    let (mut busy, _) = Raw::open(d.tcp_addr(), "vol0");
    busy.write(1, 0, 0, &[1u8; 4096]);
    busy.send(&Raw::request_bytes(0, CMD_WRITE, 2, 4096, 65536));
    busy.send(&[2u8; 1000]);
    let st = d.terminate();
    assert!(
        st.success(),
        "SIGTERM with a stalled client: exit status {st}\n{}",
        d.stderr()
    );
    d.restart();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(c.read(1, 0, 4096).iter().all(|&x| x == 1));
    assert!(
        c.read(2, 4096, 65536).iter().all(|&x| x == 0),
        "the incomplete WRITE was applied"
    );
}

#[test]
fn unix_socket_reusable_after_kill9() {
    // kill -9 leaves a stale socket file; the restarted daemon must bind anyway.
    let mut d = Daemon::start_default();
    assert!(d.unix_path().exists());
    d.kill9();
    d.restart();
    let s = std::os::unix::net::UnixStream::connect(d.unix_path());
    assert!(
        s.is_ok(),
        "cannot connect to the Unix socket after restart: {s:?}"
    );
}

#[test]
fn ready_file_is_valid_json_with_pid() {
    let d = Daemon::start_default();
    // Daemon::start already validated tcp/unix/pid; check the file is complete JSON.
    let text = std::fs::read_to_string(d.work_dir().join("ready.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["pid"].as_u64(), Some(d.pid() as u64));
    assert_eq!(
        v["tcp"].as_str().unwrap(),
        d.tcp_addr().to_string(),
        "ready file tcp"
    );
}

/// Pipelined 256 KiB READs, `READS` of them from cookie `from` on.
fn reads_from(from: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    for cookie in from..from + READS {
        bytes.extend(Raw::request_bytes(0, CMD_READ, cookie, 0, READ_LEN));
    }
    bytes
}

const READS: u64 = 2000;
const READ_LEN: u32 = 256 << 10;

/// A daemon allowing one request and 1 MiB in flight, and a TCP client that sent `READS`
/// READs it has not read a reply of: 56 KB of requests for 500 MiB of replies. The server
/// stops starting them once 1 MiB of replies is waiting, with the rest read into its input
/// (counted as a hit of an in-flight limit).
fn held_back_client() -> (Daemon, Raw) {
    let d = Daemon::start(
        DaemonOpts::new()
            .with_vol0()
            .arg("--max-inflight-requests")
            .arg("1")
            .arg("--max-inflight-mib")
            .arg("1"),
    );
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    c.send(&reads_from(1));
    wait_until_held_back(&d, "");
    (d, c)
}

/// Requests the server has read but not started (its in-flight limits held them back) when it
/// shuts down get ESHUTDOWN: every request sent before the SIGTERM gets a reply, none is
/// dropped with the connection.
#[test]
fn sigterm_answers_every_request_already_received() {
    const LEN: u32 = READ_LEN;
    let (mut d, mut c) = held_back_client();
    d.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let (mut answered, mut refused) = (0u64, 0u64);
    let mut replied = std::collections::BTreeSet::new();
    for _ in 1..=READS {
        let (error, cookie) = c.read_simple_reply();
        assert!(replied.insert(cookie), "request {cookie} answered twice");
        match error {
            0 => {
                let data = c.recv(LEN as usize);
                assert!(data.iter().all(|&b| b == 0), "read {cookie}");
                answered += 1;
            }
            ESHUTDOWN => refused += 1,
            other => panic!("request {cookie}: error {other}"),
        }
    }
    assert_eq!(replied, (1..=READS).collect(), "requests left unanswered");
    assert!(
        answered > 0 && refused > 0,
        "{answered} answered, {refused} refused"
    );
    c.expect_closed("the connection after the last reply");
    let status = d.wait_exit(SHUTDOWN_TIMEOUT);
    assert!(status.success(), "exit status {status}\n{}", d.stderr());
}

/// A client that keeps pipelining requests while the server stops gets every reply to the
/// requests the server read, then an orderly end of stream: over TCP, closing with those
/// later requests unread would reset the connection and drop the replies still queued.
#[test]
fn requests_sent_after_a_stop_do_not_reset_the_replies_before_it() {
    const LEN: u32 = READ_LEN;
    let (mut d, mut c) = held_back_client();
    d.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    // Sent after the stop: never read, never answered.
    c.send(&reads_from(READS + 1));
    let mut replied = std::collections::BTreeSet::new();
    for _ in 1..=READS {
        let (error, cookie) = c.read_simple_reply();
        assert!(
            cookie <= READS,
            "request {cookie}, sent after the stop, was answered"
        );
        assert!(replied.insert(cookie), "request {cookie} answered twice");
        match error {
            0 => {
                let data = c.recv(LEN as usize);
                assert!(data.iter().all(|&b| b == 0), "read {cookie}");
            }
            ESHUTDOWN => {}
            other => panic!("request {cookie}: error {other}"),
        }
    }
    assert_eq!(replied, (1..=READS).collect(), "requests left unanswered");
    c.expect_eof("the connection after the last reply");
    drop(c);
    let status = d.wait_exit(SHUTDOWN_TIMEOUT);
    assert!(status.success(), "exit status {status}\n{}", d.stderr());
}

/// A client that stops reading its replies holds shutdown up only for the grace period. Then
/// the server stops sending to it, sees its requests in flight through, closes it, and only
/// after that makes the final flush: no reply leaves after it. The daemon exits 0 and the
/// writes the client sent before stalling read back.
#[test]
fn grace_period_over_closes_stalled_clients_before_the_final_flush() {
    const READS: u64 = 400;
    const LEN: u32 = 1 << 20;
    let mut d = Daemon::start(
        DaemonOpts::new()
            .with_vol0()
            .arg("--shutdown-grace-secs")
            .arg("1"),
    );
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    c.write(1, 0, 0, &[5u8; 4096]);
    let mut pipelined = Vec::new();
    for cookie in 2..READS + 2 {
        pipelined.extend(Raw::request_bytes(0, CMD_READ, cookie, 0, LEN));
    }
    // 400 MiB of replies, none read: far more than the socket buffers hold, so the server
    // holds requests back once its reply budget is full.
    c.send(&pipelined);
    wait_until_held_back(&d, ": the client is not stalled");
    let started = Instant::now();
    let st = d.terminate();
    let took = started.elapsed();
    let log = d.stderr();
    assert!(st.success(), "exit status {st}\n{log}");
    assert!(
        took < Duration::from_secs(20),
        "shutdown took {took:?} with a grace period of 1 s\n{log}"
    );
    let gave_up = log
        .find("their unsent replies are dropped")
        .unwrap_or_else(|| panic!("no give-up warning\n{log}"));
    let detached = log[gave_up..]
        .find("client detached")
        .map(|at| gave_up + at)
        .unwrap_or_else(|| panic!("the stalled client was never closed\n{log}"));
    let flushed = log
        .find("final flush done")
        .unwrap_or_else(|| panic!("no final flush\n{log}"));
    assert!(
        detached < flushed,
        "the stalled client was closed after the final flush\n{log}"
    );
    d.restart();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(c.read(1, 0, 4096).iter().all(|&x| x == 5));
}

/// Waits until the daemon held a client's requests back (an in-flight limit hit, counted once
/// replies fill its budget), failing the test after 30 s.
fn wait_until_held_back(d: &Daemon, what_if_not: &str) {
    let metrics = d.metrics_addr().expect("the daemon serves metrics");
    let held_back = || {
        let text = evsd_e2e::metrics::scrape(metrics);
        ["inflight_bytes", "inflight_requests"].iter().any(|limit| {
            let series = format!("evsd_limit_hits_total{{limit=\"{limit}\"}}");
            evsd_e2e::metrics::value(&text, &series) >= 1.0
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), held_back),
        "the server never held requests back{what_if_not}"
    );
}

/// A client still negotiating when the server starts shutting down gets ERR_SHUTDOWN for its
/// next option (the spec: then it aborts), not a dropped connection; an EXPORT_NAME, which has
/// no error reply, is closed.
#[test]
fn a_handshake_under_way_at_sigterm_gets_err_shutdown() {
    let mut d = Daemon::start(DaemonOpts::new().with_vol0());
    let mut negotiating = Raw::handshake(d.tcp_addr(), 3);
    assert_eq!(negotiating.list(), ["vol0"]);
    let mut naming = Raw::handshake(d.tcp_addr(), 3);
    d.signal(libc::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || d
            .stderr()
            .contains("shutting down")),
        "the daemon never logged its shutdown\n{}",
        d.stderr()
    );
    negotiating.send_opt(OPT_GO, &Raw::go_payload("vol0", &[]));
    let reply = negotiating.expect_opt_reply(OPT_GO, REP_ERR_SHUTDOWN);
    assert_eq!(reply.data, b"the server is shutting down");
    negotiating.send_opt(OPT_ABORT, &[]);
    negotiating.expect_opt_reply(OPT_ABORT, REP_ACK);
    negotiating.expect_eof("after ABORT");

    naming.send_opt(OPT_EXPORT_NAME, b"vol0");
    naming.expect_eof("EXPORT_NAME during the shutdown");
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}\n{}", d.stderr());
}

/// The NBD socket file goes as soon as the daemon stops accepting (a daemon starting on the
/// same path meanwhile would bind its own, which ours must not remove later); the ready file
/// goes when it exits. The socket is open to the daemon's group whatever the umask.
#[test]
fn the_socket_file_goes_at_the_stop_and_the_ready_file_at_the_exit() {
    use std::os::unix::fs::PermissionsExt;
    let (mut d, c) = held_back_client();
    let socket = d.unix_path().to_path_buf();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");
    let ready = d.work_dir().join("ready.json");
    assert!(ready.exists());
    d.signal(libc::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || !socket.exists()),
        "the socket file is still there after the stop"
    );
    assert!(d.is_running(), "the client's replies should hold the exit");
    drop(c);
    let status = d.wait_exit(SHUTDOWN_TIMEOUT);
    assert!(status.success(), "exit status {status}\n{}", d.stderr());
    assert!(!ready.exists(), "the ready file outlived the daemon");
}
