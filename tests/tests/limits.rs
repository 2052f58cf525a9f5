//! The server's limits against the real binary: each one enforced, counted in
//! `evsd_limit_hits_total{limit}`, and logged once per client however often it is hit.

use std::collections::HashSet;
use std::io::Read;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use evsd_e2e::admin::admin_ok;
use evsd_e2e::metrics::{open_connections, scrape, value};
use evsd_e2e::raw::*;
use evsd_e2e::*;

const FLAGS: u32 = CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES;

fn metrics_addr(d: &Daemon) -> SocketAddr {
    d.metrics_addr()
        .expect("ready file has no metrics address although --metrics-listen was given")
}

fn hits(d: &Daemon, limit: &str) -> f64 {
    value(
        &scrape(metrics_addr(d)),
        &format!("evsd_limit_hits_total{{limit=\"{limit}\"}}"),
    )
}

/// Waits for the limit's counter to reach `want` (counting happens on the server's side of a
/// close the client may see first), then checks it stays there.
fn assert_hits(d: &Daemon, limit: &str, want: f64) {
    assert!(
        wait_until(Duration::from_secs(5), || hits(d, limit) == want),
        "evsd_limit_hits_total{{limit=\"{limit}\"}} is {}, expected {want}\n{}",
        hits(d, limit),
        scrape(metrics_addr(d))
    );
}

/// Lines of the daemon's log containing `text`.
fn log_lines(d: &Daemon, text: &str) -> Vec<String> {
    d.stderr()
        .lines()
        .filter(|l| l.contains(text))
        .map(str::to_owned)
        .collect()
}

fn assert_logged_once(d: &Daemon, text: &str) {
    // The counter the caller waited for can be read before the log line has passed through
    // the pipe that collects the daemon's stderr.
    wait_until(Duration::from_secs(5), || !log_lines(d, text).is_empty());
    let lines = log_lines(d, text);
    assert_eq!(
        lines.len(),
        1,
        "expected one log line with {text:?}\n--- evsd stderr ---\n{}",
        d.stderr()
    );
    assert!(
        lines[0].contains("WARN") && lines[0].contains("127.0.0.1"),
        "{}",
        lines[0]
    );
}

/// Blocks until the server closes the connection; the time it took.
fn wait_for_eof(c: &mut Raw, what: &str) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 512];
    match c.s.read(&mut buf) {
        Ok(0) => start.elapsed(),
        Ok(n) => panic!("{what}: {n} unexpected bytes instead of EOF"),
        Err(e) => panic!("{what}: no EOF after {:?}: {e}", start.elapsed()),
    }
}

#[test]
fn idle_connection_is_closed_after_the_idle_timeout() {
    let d = Daemon::start(DaemonOpts::new().arg("--idle-timeout-secs").arg("1"));
    assert_eq!(hits(&d, "idle_timeout"), 0.0);
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    // One request first: the idle period starts over after its reply.
    c.read(1, 0, 4096);
    let closed_after = wait_for_eof(&mut c, "idle client");
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(10),
        "closed after {closed_after:?} with --idle-timeout-secs 1"
    );
    assert_hits(&d, "idle_timeout", 1.0);
    // A handshake in progress is the handshake timeout's business, not the idle timeout's.
    let mut in_handshake = Raw::handshake(d.tcp_addr(), FLAGS);
    thread::sleep(Duration::from_millis(2500));
    assert!(in_handshake.list().contains(&"vol0".to_string()));

    let (mut second, _) = Raw::open(d.tcp_addr(), "vol0");
    wait_for_eof(&mut second, "second idle client");
    assert_hits(&d, "idle_timeout", 2.0);
    assert_logged_once(&d, "idle for idle_timeout_secs");
}

#[test]
fn requests_keep_a_connection_open_past_the_idle_timeout() {
    let d = Daemon::start(DaemonOpts::new().arg("--idle-timeout-secs").arg("1"));
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    let data = Prng::new(3).bytes(4096);
    c.write(1, 0, 0, &data);
    // Ten requests 300 ms apart: at least 3 s, three idle timeouts' worth, on the connection.
    for cookie in 2..12 {
        thread::sleep(Duration::from_millis(300));
        assert_eq!(c.read(cookie, 0, 4096), data, "read {cookie}");
    }
    assert_eq!(hits(&d, "idle_timeout"), 0.0);
    c.disconnect();
}

/// A connection the server closes by force (here a forced delete of its volume) while its
/// client takes none of its replies is let go once they have waited untaken for the closing
/// bound (10 s): it held its seat, its volume and its queued replies for good.
#[test]
fn a_forced_close_of_a_client_that_stopped_reading_lets_it_go() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume().volume("gone:64M"));
    let (mut c, _) = Raw::open(d.tcp_addr(), "gone");
    c.send(&reads(64));
    // The replies fill our receive buffers meanwhile: the windows we advertise drop to zero.
    thread::sleep(Duration::from_millis(500));
    admin_ok(
        &d,
        "volume.delete",
        serde_json::json!({"name": "gone", "force": true}),
    );
    let closed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(40), || open_connections(metrics_addr(
            &d
        )) == 0.0),
        "the connection still holds its seat {:?} after the forced close",
        closed.elapsed()
    );
    drop(c);
}

/// A client that half-closes its connection with replies waiting that it never takes (its
/// reply budget full, so its connection reads nothing and would never see the end of the
/// stream) does not hold the volume's other writes at the fence for good: once another
/// connection finds it gone, its replies get the closing bound and it is let go.
#[test]
fn a_half_closed_client_taking_no_reply_does_not_hold_others_writes() {
    let d = Daemon::start(
        DaemonOpts::new()
            .with_vol0()
            .arg("--max-inflight-mib")
            .arg("1"),
    );
    let (mut gone, _) = Raw::open(d.tcp_addr(), "vol0");
    gone.send(&reads(64));
    // The replies fill the sockets' buffers meanwhile.
    thread::sleep(Duration::from_millis(500));
    gone.shutdown_write();
    thread::sleep(Duration::from_millis(200));
    let (mut other, _) = Raw::open(d.tcp_addr(), "vol0");
    // More than the closing bound (10 s) and the harness's 15 s.
    other
        .s
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let data = Prng::new(8).bytes(4096);
    other.write(1, 0, 8 << 20, &data);
    assert_eq!(other.read(2, 8 << 20, 4096), data);
    other.flush(3);
    assert_hits(&d, "replies_unread_at_close", 1.0);
    drop(gone);
}

/// A client whose handshakes fail in a loop logs one line per reason, not one per
/// connection; every failure is counted.
#[test]
fn a_client_failing_its_handshakes_in_a_loop_logs_once() {
    let d = Daemon::start_default();
    for _ in 0..200 {
        let mut c = Raw::connect(d.tcp_addr());
        c.read_greeting();
        c.send(&0xffff_ffffu32.to_be_bytes());
        c.expect_eof("after unknown client flags");
    }
    // The last failure is counted after its socket closed.
    let series = r#"evsd_handshake_failures_total{reason="bad_client_flags"}"#;
    let counted = || value(&scrape(metrics_addr(&d)), series);
    assert!(
        wait_until(Duration::from_secs(10), || counted() == 200.0),
        "{} failures counted of 200",
        counted()
    );
    assert_logged_once(&d, "handshake failed");
}

/// `count` 1 MiB READs of the first MiB, one after another.
fn reads(count: u64) -> Vec<u8> {
    let mut requests = Vec::new();
    for cookie in 1..=count {
        requests.extend(Raw::request_bytes(0, CMD_READ, cookie, 0, 1 << 20));
    }
    requests
}

/// A client that sends requests and then takes none of its replies is closed after the idle
/// timeout with its replies dropped, counted as `replies_unread`, though it keeps sending
/// requests; the daemon serves others.
#[test]
fn a_client_that_reads_no_reply_is_closed_after_the_idle_timeout() {
    let d = Daemon::start(DaemonOpts::new().arg("--idle-timeout-secs").arg("1"));
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    // 64 MiB of replies: far more than the sockets' buffers between us hold.
    c.send(&reads(64));
    // New requests are activity, but no excuse for leaving the replies where they are.
    let start = Instant::now();
    let mut cookie = 1000;
    let mut closed = false;
    while !closed && start.elapsed() < Duration::from_secs(8) {
        thread::sleep(Duration::from_millis(250));
        let request = Raw::request_bytes(0, CMD_READ, cookie, 0, 4096);
        closed = c.try_send(&request).is_err() || hits(&d, "replies_unread") == 1.0;
        cookie += 1;
    }
    assert!(
        closed,
        "still open after {:?} of requests with no reply taken",
        start.elapsed()
    );
    assert_hits(&d, "replies_unread", 1.0);
    assert_eq!(hits(&d, "idle_timeout"), 0.0);
    assert_logged_once(&d, "took no byte of its replies for idle_timeout_secs");
    // What reached our socket before the close is there to read, then the end of the stream
    // (or a reset: the daemon closed with our last requests unread).
    let mut received = 0;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match c.s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection did not end after {received} bytes: {e}"),
        }
    }
    assert!(
        received < 64 * ((1 << 20) + 16),
        "all {received} reply bytes arrived, none were dropped"
    );
    let (mut fresh, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(fresh.read(1, 0, 4096).iter().all(|&b| b == 0));
    fresh.disconnect();
}

/// TCP clients that end their connection (end of stream, NBD_CMD_DISC, a bad request magic)
/// with replies on the way, then shut their socket down both ways while their receive window is
/// zero, read what was queued (after SHUT_RD the kernel does not reopen the window for that) and
/// close with nothing unread: no reset comes, and their kernel answers our window probes from
/// FIN-WAIT-2 for a minute. With no idle timeout set, the daemon still lets each go once its
/// replies have waited untaken for the closing bound (10 s), and resets the connection.
#[test]
fn clients_gone_at_a_zero_window_after_ending_their_connection_are_let_go() {
    let d = Daemon::start(DaemonOpts::new());
    let endings: [&[u8]; 3] = [
        &[],
        &Raw::request_bytes(0, CMD_DISC, 99, 0, 0),
        // A request header whose magic is wrong.
        &[0xde; 28],
    ];
    let clients: Vec<_> = endings
        .iter()
        .map(|ending| {
            let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
            let mut requests = reads(64);
            requests.extend_from_slice(ending);
            c.send(&requests);
            c
        })
        .collect();
    // The replies fill our receive buffers meanwhile: the windows we advertise drop to zero.
    thread::sleep(Duration::from_millis(500));
    for mut c in clients {
        c.s.shutdown(std::net::Shutdown::Both).unwrap();
        c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut received = 0;
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n @ 1..) = c.s.read(&mut buf) {
            received += n;
        }
        assert!(
            received < 64 << 20,
            "all {received} reply bytes arrived: the window never closed"
        );
    }
    // One bound, or two when bytes taken just before the client left are seen at the first
    // expiry (they count as progress).
    let left = Instant::now();
    assert!(
        wait_until(Duration::from_secs(45), || open_connections(metrics_addr(
            &d
        )) == 0.0),
        "{} connections still hold their seat {:?} after their clients left",
        open_connections(metrics_addr(&d)),
        left.elapsed()
    );
    assert_hits(&d, "replies_unread_at_close", 3.0);
    assert_eq!(hits(&d, "replies_unread"), 0.0);
    assert_logged_once(&d, "took no byte of its replies for 10 s");
    let (mut fresh, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(fresh.read(1, 0, 4096).iter().all(|&b| b == 0));
    fresh.disconnect();
}

/// A client that reads its replies slowly, but reads, keeps its connection past the idle
/// timeout while they last and gets every byte. Over a Unix socket, whose writer the kernel
/// wakes only once three quarters of the (4 MiB) send buffer are free: at 640 KiB/s that
/// takes longer than the timeout, and only the shrinking send queue shows the client reading.
#[test]
fn a_client_that_reads_replies_slowly_is_not_closed() {
    let d = Daemon::start(DaemonOpts::new().arg("--idle-timeout-secs").arg("2"));
    let data = Prng::new(7).bytes(1 << 20);
    {
        let (mut w, _) = Raw::open(d.tcp_addr(), "vol0");
        w.write(1, 0, 0, &data);
        w.flush(2);
        w.disconnect();
    }
    let mut s = std::os::unix::net::UnixStream::connect(d.unix_path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    let mut hello = FLAGS.to_be_bytes().to_vec();
    hello.extend(IHAVEOPT.to_be_bytes());
    hello.extend(OPT_EXPORT_NAME.to_be_bytes());
    hello.extend(4u32.to_be_bytes());
    hello.extend(b"vol0");
    std::io::Write::write_all(&mut s, &hello).unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    let count = 6;
    std::io::Write::write_all(&mut s, &reads(count)).unwrap();
    let start = Instant::now();
    let mut reply = Vec::new();
    let total = count as usize * ((1 << 20) + 16);
    while reply.len() < total {
        thread::sleep(Duration::from_millis(100));
        let mut piece = vec![0u8; (64 << 10).min(total - reply.len())];
        s.read_exact(&mut piece)
            .unwrap_or_else(|e| panic!("after {} reply bytes: {e}", reply.len()));
        reply.extend(piece);
    }
    assert!(
        start.elapsed() > Duration::from_secs(8),
        "the replies were read in {:?}, not slowly",
        start.elapsed()
    );
    for (k, one) in reply.chunks_exact((1 << 20) + 16).enumerate() {
        assert_eq!(be32(&one[0..4]), SIMPLE_REPLY_MAGIC, "reply {k}");
        assert_eq!(be32(&one[4..8]), 0, "reply {k} failed");
        assert!(one[16..] == data[..], "reply {k} has other data");
    }
    // Once the last replies sat in the socket buffer, the connection was idle on the server's
    // side and may have been closed for that: only the unread-replies limit must not have hit.
    assert_eq!(hits(&d, "replies_unread"), 0.0);
}

#[test]
fn idle_connections_stay_open_by_default() {
    let d = Daemon::start_default();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    thread::sleep(Duration::from_secs(3));
    assert!(c.read(1, 0, 4096).iter().all(|&b| b == 0));
    assert_eq!(hits(&d, "idle_timeout"), 0.0);
    c.disconnect();
}

#[test]
fn connections_over_the_limit_are_counted_and_logged_once() {
    let d = Daemon::start(DaemonOpts::new().max_connections(2));
    let addr = metrics_addr(&d);
    // Both slots held by clients sitting in the handshake.
    let _a = Raw::handshake(d.tcp_addr(), FLAGS);
    let _b = Raw::handshake(d.tcp_addr(), FLAGS);
    for i in 0..5 {
        let mut refused = Raw::connect(d.tcp_addr());
        refused.expect_closed(&format!("connection {i} over --max-connections 2"));
    }
    assert_hits(&d, "connections", 5.0);
    let text = scrape(addr);
    assert_eq!(
        value(&text, "evsd_connections_refused_total{reason=\"limit\"}"),
        5.0
    );
    assert_eq!(value(&text, "evsd_connections_accepted_total"), 2.0);
    assert_logged_once(&d, "max_connections reached");
}

#[test]
fn handshake_timeouts_are_counted_and_logged_once() {
    let d = Daemon::start(DaemonOpts::new().handshake_timeout(1));
    let mut slow: Vec<Raw> = (0..2)
        .map(|_| {
            let mut c = Raw::connect(d.tcp_addr());
            c.read_greeting();
            c
        })
        .collect();
    for (i, c) in slow.iter_mut().enumerate() {
        let closed_after = wait_for_eof(c, &format!("client {i} stuck in the handshake"));
        assert!(closed_after < Duration::from_secs(3), "{closed_after:?}");
    }
    assert_hits(&d, "handshake_timeout", 2.0);
    assert_eq!(
        value(
            &scrape(metrics_addr(&d)),
            "evsd_handshake_failures_total{reason=\"timeout\"}"
        ),
        2.0
    );
    assert_logged_once(&d, "handshake_timeout_secs expired");
}

/// Sends every request at once, waits so the server runs into its limit with requests still
/// unread, then reads all replies and checks each against the data written.
fn pipelined_reads(c: &mut Raw, data: &[u8], count: u64, len: u32) {
    let mut batch = Vec::new();
    for i in 0..count {
        batch.extend(Raw::request_bytes(
            0,
            CMD_READ,
            1000 + i,
            i * u64::from(len),
            len,
        ));
    }
    c.send(&batch);
    thread::sleep(Duration::from_millis(300));
    let mut answered = HashSet::new();
    for _ in 0..count {
        let (err, cookie) = c.read_simple_reply();
        assert_eq!(err, 0, "READ {cookie} failed");
        let i = cookie.checked_sub(1000).filter(|&i| i < count);
        let i = i.unwrap_or_else(|| panic!("reply for unknown cookie {cookie}"));
        assert!(answered.insert(i), "second reply for cookie {cookie}");
        let at = (i * u64::from(len)) as usize;
        let got = c.recv(len as usize);
        assert!(
            got == data[at..at + len as usize],
            "READ {i} returned wrong data"
        );
    }
}

#[test]
fn pipelining_past_max_inflight_requests_is_held_back_and_counted() {
    let d = Daemon::start(DaemonOpts::new().arg("--max-inflight-requests").arg("4"));
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    let data = Prng::new(64).bytes(64 * 4096);
    c.write(1, 0, 0, &data);
    assert_eq!(hits(&d, "inflight_requests"), 0.0);
    pipelined_reads(&mut c, &data, 64, 4096);
    let counted = hits(&d, "inflight_requests");
    // At most one hit per request started after the first four.
    assert!(
        (1.0..=60.0).contains(&counted),
        "inflight_requests hits: {counted}"
    );
    assert_eq!(hits(&d, "inflight_bytes"), 0.0);
    assert_logged_once(&d, "max_inflight_requests requests in flight");
    // The connection is fine afterwards.
    assert_eq!(c.read(2, 4096, 4096), data[4096..8192]);
    c.disconnect();
}

/// A client may send its requests and DISC, shut its side down and then read: every request
/// before DISC is served and answered, however many the in-flight limit held back (they wait
/// in the socket, not in the server, so the end of stream comes after them). Also with another
/// connection attached to the volume, which makes each batch of writes ask whether a client
/// hung up: this one's half-close looks like one before its DISC is read (its queued writes
/// were refused with ESHUTDOWN), and without the in-flight limit's hold (the requests read
/// ahead to find the DISC were dropped, unanswered, as a truncated stream).
#[test]
fn requests_held_back_are_all_served_when_the_client_half_closes_after_disc() {
    for (other_connection, max_inflight_requests, count, write_bytes) in [
        (false, "2", 200, 4096),
        (true, "2", 200, 4096),
        (true, "256", 200, 4096),
        (true, "256", 16, 1 << 20),
    ] {
        half_close_after_disc(other_connection, max_inflight_requests, count, write_bytes);
    }
}

fn half_close_after_disc(
    other_connection: bool,
    max_inflight_requests: &str,
    count: u64,
    write_bytes: u64,
) {
    let mut d = Daemon::start(
        DaemonOpts::new()
            .arg("--max-inflight-requests")
            .arg(max_inflight_requests),
    );
    let other = other_connection.then(|| Raw::open(d.tcp_addr(), "vol0").0);
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    let data = Prng::new(200).bytes((count * write_bytes) as usize);
    let burst = Raw::writes_then_disc(&data, write_bytes, 0x1000);
    c.send(&burst);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answered = HashSet::new();
    for _ in 0..count {
        let (err, cookie) = c.read_simple_reply();
        assert_eq!(
            err, 0,
            "WRITE {cookie:#x} failed (another connection: {other_connection}, \
             {max_inflight_requests} in flight)"
        );
        assert!(
            (0x1000..0x1000 + count).contains(&cookie) && answered.insert(cookie),
            "unexpected or repeated cookie {cookie:#x}"
        );
    }
    c.expect_closed("after DISC");
    assert!(
        log_lines(&d, "in the middle of a request").is_empty(),
        "a clean DISC was logged as a cut request"
    );
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(
        c.read(1, 0, (count * write_bytes) as u32) == data,
        "every write landed"
    );
    c.disconnect();
    if let Some(other) = other {
        other.disconnect();
    }
    d.assert_alive();
}

#[test]
fn pipelining_past_max_inflight_mib_is_held_back_and_counted() {
    let d = Daemon::start(DaemonOpts::new().arg("--max-inflight-mib").arg("1"));
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    let data = Prng::new(8).bytes(8 << 20);
    c.write(1, 0, 0, &data);
    pipelined_reads(&mut c, &data, 8, 1 << 20);
    let counted = hits(&d, "inflight_bytes");
    assert!(
        (1.0..=7.0).contains(&counted),
        "inflight_bytes hits: {counted}"
    );
    assert_eq!(hits(&d, "inflight_requests"), 0.0);
    c.disconnect();
}

#[test]
fn oversized_requests_are_counted() {
    let mut d = Daemon::start_default();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    assert_eq!(hits(&d, "request_size"), 0.0);
    // A READ over the 32 MiB maximum is refused; the connection goes on.
    c.send_req(0, CMD_READ, 1, 0, 64 << 20, &[]);
    let (err, cookie) = c.read_simple_reply();
    assert_eq!((err, cookie), (EOVERFLOW, 1));
    assert_hits(&d, "request_size", 1.0);
    assert!(c.read(2, 0, 4096).iter().all(|&b| b == 0));
    // A WRITE declaring more payload than that cannot be skipped: the server hangs up.
    let mut b = Raw::request_bytes(0, CMD_WRITE, 3, 0, (64 << 20) + 4096);
    b.extend_from_slice(&vec![0x42; 1 << 20]);
    let _ = c.try_send(&b); // the server may close before reading all of it
    c.expect_closed("WRITE declaring a 64 MiB+ payload");
    assert_hits(&d, "request_size", 2.0);
    assert_logged_once(&d, "request over the maximum size refused");
    d.assert_alive();
    // Requests at the maximum are not limit hits.
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    let data = Prng::new(32).bytes(32 << 20);
    c.write(4, 0, 0, &data);
    assert!(c.read(5, 0, 32 << 20) == data);
    assert_eq!(hits(&d, "request_size"), 2.0);
    c.disconnect();
}
