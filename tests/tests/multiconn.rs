//! Multi-conn consistency: write on A (no flush), FLUSH on B, read on C.

use std::time::Duration;

use evsd_e2e::raw::*;
use evsd_e2e::*;

#[test]
fn write_a_flush_b_read_c_raw() {
    let mut d = Daemon::start_default();
    let (mut a, ia) = Raw::open(d.tcp_addr(), "vol0");
    let (mut b, _) = Raw::open(d.tcp_addr(), "vol0");
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    assert_ne!(
        ia.flags & TF_CAN_MULTI_CONN,
        0,
        "CAN_MULTI_CONN not advertised"
    );
    for round in 0..20u64 {
        let off = round * 1_000_000 + 13;
        // C reads first so any per-connection cache holds the old data.
        let old = c.read(1, off, 65536);
        let data = Prng::new(round).bytes(65536);
        assert!(old != data);
        a.write(2, 0, off, &data);
        b.flush(3);
        let got = c.read(4, off, 65536);
        assert!(
            got == data,
            "round {round}: C does not see A's write after B's FLUSH"
        );
        // and with FUA on A only
        let data2 = Prng::new(round + 1000).bytes(4096);
        a.write(5, CMD_FLAG_FUA, off, &data2);
        assert!(
            c.read(6, off, 4096) == data2,
            "round {round}: FUA write not visible on C"
        );
    }
    a.disconnect();
    b.disconnect();
    c.disconnect();
    d.assert_alive();
}

/// The same with libnbd (nbdsh), over the Unix socket, several handles.
#[test]
fn write_a_flush_b_read_c_nbdsh() {
    let d = Daemon::start_default();
    let uri = d.unix_uri("vol0");
    let script = format!(
        r#"
import nbd, os
uri = {uri:?}
hs = []
for i in range(3):
    x = nbd.NBD()
    x.connect_uri(uri)
    assert x.can_multi_conn(), "CAN_MULTI_CONN not advertised"
    hs.append(x)
a, b, c = hs
for r in range(16):
    off = r * 4096 * 257
    before = c.pread(65536, off)
    buf = os.urandom(65536)
    assert before != buf
    a.pwrite(buf, off)
    b.flush()
    got = c.pread(65536, off)
    assert got == buf, "round %d: C does not see A's write after B's flush" % r
    # zeroes and trims go through the same path
    a.zero(4096, off)
    b.flush()
    assert c.pread(4096, off) == bytes(4096), "round %d: zero not visible" % r
    a.trim(4096, off + 4096)
    b.flush()
    assert c.pread(4096, off + 4096) == bytes(4096), "round %d: trim not visible" % r
for x in hs:
    x.shutdown()
print("multiconn ok")
"#
    );
    let out = nbdsh(&script);
    assert!(out.contains("multiconn ok"), "nbdsh output: {out}");
}

#[test]
fn concurrent_writers_on_distinct_regions() {
    let d = Daemon::start_default();
    let addr = d.tcp_addr();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let (mut c, _) = Raw::open(addr, "vol0");
                let mut rng = Prng::new(t);
                let mut expect = Vec::new();
                for i in 0..64u64 {
                    let off = t * 64 * MIB + i * 65536;
                    let data = rng.bytes(65536);
                    c.write(i, 0, off, &data);
                    expect.push((off, data));
                }
                c.flush(999);
                c.disconnect();
                expect
            })
        })
        .collect();
    let all: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let (mut c, _) = Raw::open(addr, "vol0");
    for (i, (off, data)) in all.iter().enumerate() {
        assert!(
            c.read(i as u64, *off, 65536) == *data,
            "region at {off} wrong"
        );
    }
}

/// Connections go to the connection thread serving the fewest, each keeps working there, and a
/// thread's count drops when its connection closes (`evsd_connection_thread_connections`).
#[test]
fn connections_spread_over_connection_threads() {
    use evsd_e2e::metrics::{scrape, value};
    let d = Daemon::start(
        DaemonOpts::new()
            .with_vol0()
            .arg("--worker-threads")
            .arg("2"),
    );
    let metrics = d.metrics_addr().expect("metrics address");
    let on_thread = |t: usize| {
        value(
            &scrape(metrics),
            &format!("evsd_connection_thread_connections{{thread=\"{t}\"}}"),
        )
    };
    assert_eq!((on_thread(0), on_thread(1)), (0.0, 0.0));
    let mut clients: Vec<Raw> = (0..3).map(|_| Raw::open(d.tcp_addr(), "vol0").0).collect();
    assert_eq!(
        (on_thread(0), on_thread(1)),
        (2.0, 1.0),
        "three connections over two threads: the fewest-first rule gives 2 and 1"
    );
    // Every connection writes its own region and reads every region back.
    for (i, c) in clients.iter_mut().enumerate() {
        let data = Prng::new(77 + i as u64).bytes(65536);
        c.write(1, 0, i as u64 * 65536, &data);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        for j in 0..3u64 {
            let expected = Prng::new(77 + j).bytes(65536);
            assert!(
                c.read(2, j * 65536, 65536) == expected,
                "connection {i} reads region {j} wrong"
            );
        }
    }
    // The first connection went to thread 0; closing it leaves 1 and 1, and the next
    // connection goes to the lower-numbered of the tied threads.
    clients.remove(0).disconnect();
    assert!(
        wait_until(Duration::from_secs(10), || on_thread(0) == 1.0),
        "thread 0 still counts the closed connection: {}",
        on_thread(0)
    );
    clients.push(Raw::open(d.tcp_addr(), "vol0").0);
    assert_eq!((on_thread(0), on_thread(1)), (2.0, 1.0));
    for c in clients {
        c.disconnect();
    }
    assert!(
        wait_until(Duration::from_secs(10), || on_thread(0) + on_thread(1)
            == 0.0),
        "connections still counted after all closed: {} and {}",
        on_thread(0),
        on_thread(1)
    );
}
