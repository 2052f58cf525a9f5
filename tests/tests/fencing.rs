//! Write fencing: a connection that dies with writes in flight must not have them land after a
//! newer write from the client's next connection (ydb-platform/nbs#7070: the kernel client times
//! out, reconnects and re-sends, and the old connection's stuck write overwrites the newer data).
//!
//! A race, so each engine runs many rounds: without the fence (or with a fence raised only once
//! the old connection's task reads its way to the reset) most runs of this file fail within 30
//! rounds; with it none has.

use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use evsd_e2e::metrics::{scrape, value};
use evsd_e2e::raw::*;
use evsd_e2e::*;

const REGION_BYTES: usize = 1 << 20;
/// Writes connection A pipelines over the region before it dies.
const STALE_WRITES: u64 = 48;
const ROUNDS: u64 = 30;

/// Closes with an RST (SO_LINGER 0), the way a client that gave up on a connection vanishes,
/// rather than with a FIN the server would only read after the data queued before it.
fn reset(raw: Raw) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open (owned by `raw.s` until the drop below) and `linger` is a valid
    // `struct linger` for the size passed.
    let rc = unsafe {
        libc::setsockopt(
            raw.s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(raw);
}

/// Whole region equal to `fill`; else the first offset that differs and its byte.
fn first_difference(data: &[u8], fill: u8) -> Option<(usize, u8)> {
    data.iter()
        .position(|&b| b != fill)
        .map(|at| (at, data[at]))
}

fn stale_writes_never_overwrite_newer_ones(engine: &str) {
    // Every write goes through the engine (no inline page-cache fast path), so A's writes are
    // still queued there when it dies: the window a stale write lands in.
    let d = Daemon::start(
        DaemonOpts::new()
            .io_engine(engine)
            .arg("--no-inline-cached-io"),
    );
    let addr = d.tcp_addr();
    let started = Instant::now();
    for round in 0..ROUNDS {
        let (stale, fresh) = (0xA0 | round as u8, 0x50 | round as u8);
        let (mut a, _) = Raw::open(addr, "vol0");
        let sender = thread::spawn(move || {
            let payload = vec![stale; REGION_BYTES];
            for cookie in 0..STALE_WRITES {
                let header = Raw::request_bytes(0, CMD_WRITE, cookie, 0, REGION_BYTES as u32);
                // The replies are never read: the client has given up on this connection.
                if a.try_send(&header).is_err() || a.try_send(&payload).is_err() {
                    break;
                }
            }
            reset(a);
        });
        sender.join().unwrap();

        // The client reconnects and re-sends: the newer write, acknowledged.
        let (mut b, _) = Raw::open(addr, "vol0");
        b.write(1, 0, 0, &vec![fresh; REGION_BYTES]);
        let got = b.read(2, 0, REGION_BYTES as u32);
        if let Some((at, byte)) = first_difference(&got, fresh) {
            panic!(
                "round {round}: right after B's acknowledged write, offset {at} holds {byte:#04x} \
                 (A's stale data is {stale:#04x}, B's {fresh:#04x})"
            );
        }
        thread::sleep(Duration::from_millis(200));
        let got = b.read(3, 0, REGION_BYTES as u32);
        if let Some((at, byte)) = first_difference(&got, fresh) {
            panic!(
                "round {round}: 200 ms after B's acknowledged write, offset {at} holds {byte:#04x} \
                 (A's stale data is {stale:#04x}, B's {fresh:#04x})"
            );
        }
        b.disconnect();
    }
    if let Some(metrics) = d.metrics_addr() {
        let text = scrape(metrics);
        // Informational: how often B's attach found A already gone and fenced it, and how
        // often B's write actually had to wait.
        let fenced_on_attach = d
            .stderr()
            .matches("fenced the writes of connections whose clients are gone")
            .count();
        eprintln!(
            "{engine}: {ROUNDS} rounds in {:?}; A fenced at B's attach {fenced_on_attach} times; \
             B's requests held by a fence {} times",
            started.elapsed(),
            value(&text, "evsd_volume_fence_waits_total{volume=\"vol0\"}")
        );
    }
}

#[test]
fn stale_writes_never_overwrite_newer_ones_threads() {
    stale_writes_never_overwrite_newer_ones("threads");
}

#[test]
fn stale_writes_never_overwrite_newer_ones_uring() {
    stale_writes_never_overwrite_newer_ones("uring");
}
