//! Large READs whose bytes are all in the page cache go from the cache to the socket with
//! `sendfile`. Checked here: the bytes are right in simple and structured replies, over TCP and
//! a Unix socket, with replies piling up behind a client that does not read (partial sends);
//! the metric counts exactly the reads that took that path and none of the others (holes,
//! mixed ranges, small reads).

use std::collections::HashMap;
use std::thread::sleep;
use std::time::Duration;

use evsd_e2e::metrics::{scrape, value};
use evsd_e2e::raw::*;
use evsd_e2e::*;

const MIB: u64 = 1 << 20;
const SENT: &str = "evsd_volume_read_bytes_sent_from_cache_total{volume=\"c\"}";

fn written_image() -> Vec<u8> {
    // 64 MiB volume; 1..5 MiB written with random data, the rest never written.
    let mut image = vec![0u8; 64 * MIB as usize];
    Prng::new(4242).fill(&mut image[MIB as usize..5 * MIB as usize]);
    image
}

fn slice(image: &[u8], offset: u64, len: u64) -> &[u8] {
    &image[offset as usize..(offset + len) as usize]
}

#[test]
fn cached_reads_are_sent_from_the_page_cache_byte_exact() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume().volume("c:64M"));
    let metrics = d.metrics_addr().expect("metrics address");
    let image = written_image();
    let (mut c, _) = Raw::open(d.tcp_addr(), "c");
    for i in 1..5 {
        c.write(i, 0, i * MIB, slice(&image, i * MIB, MIB));
    }
    c.flush(9);
    let before = value(&scrape(metrics), SENT);

    // (offset, length, all data in one layer): only those are sent from the cache.
    let reads: [(u64, u64, bool); 7] = [
        (MIB, MIB, true),
        (2 * MIB, 2 * MIB, true),
        (MIB + 4096 + 512, MIB, true),
        (0, MIB, false),                 // never written
        (4 * MIB + MIB / 2, MIB, false), // data, then never written
        (3 * MIB, 4096, false),          // too small to be worth a system call
        (MIB, 16 * MIB, false),          // data and 12 MiB never written
    ];
    // All at once, then a pause before reading anything: the replies pile up past what the
    // socket buffers hold, so sends stop part-way and resume when the client reads.
    let mut wanted: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut batch = Vec::new();
    for round in 0..3u64 {
        for (i, &(offset, len, _)) in reads.iter().enumerate() {
            let cookie = 100 + round * 10 + i as u64;
            batch.extend(Raw::request_bytes(0, CMD_READ, cookie, offset, len as u32));
            wanted.insert(cookie, (offset, len));
        }
    }
    c.send(&batch);
    sleep(Duration::from_millis(300));
    while !wanted.is_empty() {
        let (err, cookie) = c.read_simple_reply();
        assert_eq!(err, 0, "READ {cookie} failed with error {err}");
        let (offset, len) = wanted
            .remove(&cookie)
            .unwrap_or_else(|| panic!("reply for unknown or repeated cookie {cookie}"));
        let got = c.recv(len as usize);
        assert!(
            got == slice(&image, offset, len),
            "READ {offset}+{len} (cookie {cookie}) returned other bytes"
        );
    }
    let expected: u64 = 3 * reads.iter().filter(|r| r.2).map(|r| r.1).sum::<u64>();
    let sent = value(&scrape(metrics), SENT) - before;
    assert_eq!(
        sent, expected as f64,
        "bytes sent from the page cache: exactly the all-data reads"
    );

    // Structured replies: one data chunk carries it all.
    let (mut s, _) = Raw::open_structured(d.tcp_addr(), "c");
    let (got, chunks) = s.read_structured(1, 2 * MIB, MIB as u32);
    assert!(got == slice(&image, 2 * MIB, MIB), "structured READ bytes");
    let data_chunks = chunks
        .iter()
        .filter(|ch| ch.typ == CHUNK_OFFSET_DATA)
        .count();
    assert_eq!(data_chunks, 1, "structured READ chunks");
    let sent = value(&scrape(metrics), SENT) - before;
    assert_eq!(sent, (expected + MIB) as f64);

    // A Unix socket takes the same path: nbdcopy reads the volume out in large requests.
    require_tool("nbdcopy");
    let dir = tempdir();
    let out = dir.path().join("out.img");
    run(
        "nbdcopy",
        &[d.unix_uri("c"), out.to_string_lossy().into_owned()],
    );
    assert!(std::fs::read(&out).unwrap() == image, "nbdcopy over unix");
    let sent_unix = value(&scrape(metrics), SENT) - before - (expected + MIB) as f64;
    assert!(
        sent_unix >= (2 * MIB) as f64,
        "nbdcopy over the Unix socket was not sent from the cache ({sent_unix} bytes)"
    );
}
