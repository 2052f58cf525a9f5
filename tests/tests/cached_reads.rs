//! Large READs whose bytes are all in the page cache go from the cache to the socket with
//! `sendfile`: Unix sockets, and TCP connections whose congestion control does not pace itself
//! (a loopback client's, under the default `--tcp-congestion auto`); a connection paced from
//! the start (BBR) gets them written from the head's mapping instead, up to 8 MiB of replies
//! waiting, and through buffers beyond. Smaller ones of data the head holds, all cached, are
//! written to a Unix socket from the head's mapping (never to TCP). Checked here, with simple
//! and structured replies on both transports: the bytes are right with replies piling up
//! behind a client that does not read (so sends stop part-way and resume), and the metrics
//! count exactly the reads that took each path and none of the others (holes, mixed ranges,
//! small reads); a head file cut short under mapped replies still queued gives zeroes, and the
//! daemon keeps serving.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::sleep;
use std::time::Duration;

use evsd_e2e::metrics::{scrape, value};
use evsd_e2e::raw::*;
use evsd_e2e::*;

const MIB: u64 = 1 << 20;
const SENT: &str = "evsd_volume_read_bytes_sent_from_cache_total{volume=\"c\"}";
const MAPPED: &str = "evsd_volume_read_bytes_written_from_mapping_total{volume=\"c\"}";

/// (offset, length, all data in one layer): only those may be sent from the cache.
const READS: [(u64, u64, bool); 7] = [
    (MIB, MIB, true),
    (2 * MIB, 2 * MIB, true),
    (MIB + 4096 + 512, MIB, true),
    (0, MIB, false),                 // never written
    (4 * MIB + MIB / 2, MIB, false), // data, then never written
    (3 * MIB, 4096, false),          // too small to be worth a system call; mapped on Unix
    (MIB, 16 * MIB, false),          // data and 12 MiB never written
];
const ROUNDS: u64 = 3;

/// Fixed newstyle, NO_ZEROES, optionally structured replies, GO on `export`.
fn open<S: Read + Write>(s: &mut S, export: &str, structured: bool) {
    let options: &[u32] = if structured {
        &[OPT_STRUCTURED_REPLY]
    } else {
        &[]
    };
    open_stream(s, export, options);
}

/// Sends every read of READS `ROUNDS` times at once, waits before reading anything, then checks
/// each reply against `image`, whatever order the replies come in.
fn pipelined_reads<S: Read + Write>(s: &mut S, structured: bool, image: &[u8], what: &str) {
    let mut wanted: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut batch = Vec::new();
    for round in 0..ROUNDS {
        for (i, &(offset, len, _)) in READS.iter().enumerate() {
            let cookie = 100 + round * 10 + i as u64;
            batch.extend(Raw::request_bytes(0, CMD_READ, cookie, offset, len as u32));
            wanted.insert(cookie, (offset, len));
        }
    }
    s.write_all(&batch).unwrap();
    sleep(Duration::from_millis(300));
    // Per cookie: the bytes assembled so far (structured replies may come in chunks).
    let mut got: HashMap<u64, Vec<u8>> = HashMap::new();
    while !wanted.is_empty() {
        let (cookie, done) = if structured {
            let h = recv_exact(s, 20);
            assert_eq!(be32(&h[0..4]), STRUCTURED_REPLY_MAGIC, "{what}: {h:02x?}");
            let (flags, typ, cookie) = (be16(&h[4..6]), be16(&h[6..8]), be64(&h[8..16]));
            let payload = recv_exact(s, be32(&h[16..20]) as usize);
            let &(offset, len) = wanted
                .get(&cookie)
                .unwrap_or_else(|| panic!("{what}: chunk for unknown cookie {cookie}"));
            let buf = got.entry(cookie).or_insert_with(|| vec![0u8; len as usize]);
            match typ {
                CHUNK_OFFSET_DATA => {
                    let at = (be64(&payload[0..8]) - offset) as usize;
                    buf[at..at + payload.len() - 8].copy_from_slice(&payload[8..]);
                }
                CHUNK_OFFSET_HOLE | CHUNK_NONE => {} // zeroes already
                other => panic!("{what}: READ {cookie} answered with chunk type {other:#x}"),
            }
            (cookie, flags & REPLY_FLAG_DONE != 0)
        } else {
            let h = recv_exact(s, 16);
            assert_eq!(be32(&h[0..4]), SIMPLE_REPLY_MAGIC, "{what}: {h:02x?}");
            let (err, cookie) = (be32(&h[4..8]), be64(&h[8..16]));
            assert_eq!(err, 0, "{what}: READ {cookie} failed with error {err}");
            let &(_, len) = wanted
                .get(&cookie)
                .unwrap_or_else(|| panic!("{what}: reply for unknown cookie {cookie}"));
            got.insert(cookie, recv_exact(s, len as usize));
            (cookie, true)
        };
        if done {
            let (offset, len) = wanted.remove(&cookie).unwrap();
            let bytes = got.remove(&cookie).unwrap();
            assert!(
                bytes[..] == image[offset as usize..(offset + len) as usize],
                "{what}: READ {offset}+{len} (cookie {cookie}) returned other bytes"
            );
        }
    }
}

#[test]
fn cached_reads_go_from_the_page_cache_to_sockets_byte_exact() {
    cached_reads(None, "127.0.0.1:0", true);
}

/// BBR, set by name here, is what the default leaves a remote client on such a system.
#[test]
fn cached_reads_go_from_the_mapping_to_a_bbr_connection() {
    cached_reads(Some("bbr"), "127.0.0.1:0", false);
}

/// A wildcard listener keeps the system's algorithm; a loopback client is switched off BBR when
/// accepted, but the kernel keeps pacing a socket BBR started on, so it takes no file ranges.
#[test]
fn cached_reads_go_from_the_mapping_to_a_connection_switched_off_bbr() {
    let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap();
    cached_reads(None, "0.0.0.0:0", !system.trim().starts_with("bbr"));
}

/// `congestion`: `--tcp-congestion`; `tcp_sends_files`: whether TCP READs must take the path.
fn cached_reads(congestion: Option<&str>, listen: &str, tcp_sends_files: bool) {
    let mut opts = DaemonOpts::new()
        .no_default_volume()
        .volume("c:64M")
        .listen(listen);
    if let Some(name) = congestion {
        opts = opts.arg("--tcp-congestion").arg(name);
    }
    let d = Daemon::start(opts);
    let metrics = d.metrics_addr().expect("metrics address");
    // 1..5 MiB written with random data, the rest never written.
    let mut image = vec![0u8; 64 * MIB as usize];
    Prng::new(4242).fill(&mut image[MIB as usize..5 * MIB as usize]);
    let (mut w, _) = Raw::open(d.tcp_addr(), "c");
    for i in 1..5 {
        let at = (i * MIB) as usize;
        w.write(i, 0, i * MIB, &image[at..at + MIB as usize]);
    }
    w.flush(9);
    let sent = || value(&scrape(metrics), SENT);
    let mapped = || value(&scrape(metrics), MAPPED);
    let from_cache_per_pass: u64 = ROUNDS * READS.iter().filter(|r| r.2).map(|r| r.1).sum::<u64>();
    let from_mapping_per_pass = (ROUNDS * 4096) as f64;

    for structured in [false, true] {
        let what = format!("tcp structured={structured}");
        let before = sent();
        let mapped_before = mapped();
        let mut tcp = d.connect_tcp();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        open(&mut tcp, "c", structured);
        pipelined_reads(&mut tcp, structured, &image, &what);
        let expected = if tcp_sends_files {
            from_cache_per_pass
        } else {
            0
        };
        assert_eq!(
            sent() - before,
            expected as f64,
            "{what} ({congestion:?}): bytes sent from the page cache"
        );
        let from_mapping = mapped() - mapped_before;
        if tcp_sends_files {
            assert_eq!(from_mapping, 0.0, "{what}: never from the mapping");
        } else {
            // The large all-data reads (whole MiBs, never the 4 KiB one) until 8 MiB of
            // replies wait for this client, which reads nothing for a while.
            assert!(
                from_mapping > 0.0
                    && from_mapping <= from_cache_per_pass as f64
                    && from_mapping % MIB as f64 == 0.0,
                "{what} ({congestion:?}): {from_mapping} bytes from the mapping"
            );
        }

        let what = format!("unix structured={structured}");
        let before = sent();
        let mapped_before = mapped();
        let mut unix = UnixStream::connect(d.unix_path()).unwrap();
        unix.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        open(&mut unix, "c", structured);
        pipelined_reads(&mut unix, structured, &image, &what);
        assert_eq!(
            sent() - before,
            from_cache_per_pass as f64,
            "{what}: bytes sent from the page cache must be exactly the all-data reads"
        );
        assert_eq!(
            mapped() - mapped_before,
            from_mapping_per_pass,
            "{what}: bytes written from the mapping must be exactly the small all-data reads"
        );
    }

    // A real client over the Unix socket: nbdcopy reads the data in 256 KiB requests.
    require_tool("nbdcopy");
    let before = sent();
    let dir = tempdir();
    let out = dir.path().join("out.img");
    run(
        "nbdcopy",
        &[d.unix_uri("c"), out.to_string_lossy().into_owned()],
    );
    assert!(std::fs::read(&out).unwrap() == image, "nbdcopy over unix");
    assert!(
        sent() - before >= (2 * MIB) as f64,
        "nbdcopy over the Unix socket was not sent from the cache"
    );
}

/// The daemon's end of a Unix connection gets a send buffer as large as TCP's autotuned ceiling
/// (2 MiB asked, which Linux doubles), or as large as net.core.wmem_max lets it. `ss -xmp` shows
/// it as `tb` in the socket's memory line.
#[test]
fn unix_connections_get_a_large_send_buffer() {
    require_tool("ss");
    let d = Daemon::start(DaemonOpts::new().no_default_volume().volume("b:16M"));
    let mut unix = UnixStream::connect(d.unix_path()).unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The greeting comes after the buffer is set.
    let greeting = recv_exact(&mut unix, 18);
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let wmem_max: u64 = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let expected = 2 * wmem_max.min(2 << 20);
    let out = run_stdout("ss", &["-x", "-m", "-p", "-n"]);
    let owner = format!("pid={},", d.pid());
    let path = d.unix_path().to_string_lossy().into_owned();
    let lines: Vec<&str> = out.lines().collect();
    // The listener and the accepted socket both name the path; only the accepted one is ESTAB.
    let at = lines
        .iter()
        .position(|l| l.contains("ESTAB") && l.contains(&path) && l.contains(&owner))
        .unwrap_or_else(|| panic!("no established socket of evsd on {path} in:\n{out}"));
    let memory = lines[at..]
        .iter()
        .find(|l| l.contains("skmem:("))
        .unwrap_or_else(|| panic!("no skmem line after the socket in:\n{out}"));
    let send_buffer: u64 = memory
        .split(['(', ',', ')'])
        .find_map(|field| field.trim().strip_prefix("tb"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tb field in {memory:?}"));
    assert_eq!(
        send_buffer, expected,
        "send buffer of evsd's end of a Unix connection (wmem_max {wmem_max})"
    );
}

/// A daemon with volume "c" (16 MiB) whose first MiB holds random data from `seed`, flushed;
/// that data, and the path of the volume's head data file.
fn written_volume(seed: u64) -> (Daemon, Vec<u8>, std::path::PathBuf) {
    let d = Daemon::start(DaemonOpts::new().no_default_volume().volume("c:16M"));
    let mut image = vec![0u8; MIB as usize];
    Prng::new(seed).fill(&mut image);
    let (mut w, _) = Raw::open(d.tcp_addr(), "c");
    w.write(1, 0, 0, &image);
    w.flush(2);
    w.disconnect();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.data_dir().join("volumes/c/volume.json")).unwrap())
            .unwrap();
    let head = manifest["head"].as_str().expect("head id");
    let data = d.data_dir().join(format!("volumes/c/{head}.data"));
    (d, image, data)
}

/// The head's data file cut short (from outside: a shrink never cuts what a client may still
/// read) while READ replies written from its mapping wait behind a client that does not read:
/// the kernel's EFAULT does not say which range it could not read, so the replies are read
/// from the file one by one until the writev goes through; those of blocks below the cut keep
/// their bytes, the others carry zeroes (past a file's end reads as zeroes) from where they
/// stood when the file was cut, the stream stays whole,
/// and the daemon, which never touches the mapping itself, lives on to serve the next client.
#[test]
fn a_head_cut_short_under_queued_mapped_replies_gives_zeroes_past_the_cut() {
    const READS: u64 = 4096;
    const BLOCKS: u64 = 256;
    const CUT_BYTES: u64 = 512 << 10;
    let (mut d, image, data) = written_volume(77);
    let metrics = d.metrics_addr().expect("metrics address");

    let mut unix = UnixStream::connect(d.unix_path()).unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    open(&mut unix, "c", false);
    // Blocks in a stride: any 8 replies in a row have some past the cut.
    let block_of = |cookie: u64| (cookie * 37) % BLOCKS;
    let mut batch = Vec::new();
    for i in 0..READS {
        batch.extend(Raw::request_bytes(0, CMD_READ, i, block_of(i) * 4096, 4096));
    }
    unix.write_all(&batch).unwrap();
    // The reads are written from the mapping until the replies fill the socket and 256 KiB
    // of them wait behind it; later ones take buffers (a client that stopped reading must not
    // hold the volume's chain with ever more replies).
    let mut mapped = -1.0;
    let settled = wait_until(Duration::from_secs(20), || {
        let before = mapped;
        sleep(Duration::from_millis(300));
        mapped = value(&scrape(metrics), MAPPED);
        mapped > 0.0 && mapped == before
    });
    assert!(
        settled,
        "reads still being written from the mapping: {mapped} bytes"
    );
    assert!(
        mapped >= (256 << 10) as f64 && mapped < (READS * 4096 / 2) as f64,
        "{mapped} bytes of {} written from the mapping",
        READS * 4096
    );

    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(CUT_BYTES)
        .unwrap();

    let mut zeroed = 0;
    for _ in 0..READS {
        let h = recv_exact(&mut unix, 16);
        assert_eq!(be32(&h[0..4]), SIMPLE_REPLY_MAGIC, "{h:02x?}");
        let (err, cookie) = (be32(&h[4..8]), be64(&h[8..16]));
        assert_eq!(err, 0, "READ {cookie} failed");
        let got = recv_exact(&mut unix, 4096);
        let at = (block_of(cookie) * 4096) as usize;
        // A reply part-sent when the file was cut ends in zeroes.
        let block = &image[at..at + 4096];
        let same = got.iter().zip(block).take_while(|(a, b)| a == b).count();
        assert!(
            got[same..].iter().all(|&b| b == 0),
            "READ {cookie}: other bytes from byte {same} on"
        );
        if same < 4096 {
            assert!(
                at as u64 >= CUT_BYTES,
                "READ {cookie} of block {at} below the cut: zeroes from byte {same} on"
            );
            zeroed += 1;
        }
    }
    assert!(zeroed > 0, "no reply was sent after the file was cut short");
    assert!(d.is_running(), "the daemon died");
    let (mut r, _) = Raw::open(d.tcp_addr(), "c");
    assert!(r.read(5, 0, 4096) == image[..4096], "below the cut");
    assert_eq!(
        r.read(6, CUT_BYTES, 4096),
        vec![0u8; 4096],
        "past the file's end"
    );
    r.disconnect();
}

/// Resident bytes of `path` after asking the kernel to drop its clean pages, as
/// `dd iflag=nocache` does: only pages something maps stay.
fn resident_after_dropping(path: &std::path::Path) -> u64 {
    run(
        "dd",
        &[
            &format!("if={}", path.display()),
            "iflag=nocache",
            "count=0",
            "status=none",
        ],
    );
    run_stdout(
        "fincore",
        &[
            "--bytes",
            "--noheadings",
            "--output",
            "RES",
            &path.to_string_lossy(),
        ],
    )
    .trim()
    .parse()
    .unwrap()
}

/// Pages the head's mapping reached stay mapped while a client is attached, so they are not
/// dropped by POSIX_FADV_DONTNEED; once the volume's last client has gone the mapping goes
/// too, and they can be.
#[test]
fn the_heads_mapping_goes_with_the_last_client() {
    require_tool("fincore");
    let (d, image, data) = written_volume(78);
    let metrics = d.metrics_addr().expect("metrics address");

    let mut unix = UnixStream::connect(d.unix_path()).unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    open(&mut unix, "c", false);
    let before = value(&scrape(metrics), MAPPED);
    for block in 0..256u64 {
        let at = (block * 4096) as usize;
        unix.write_all(&Raw::request_bytes(0, CMD_READ, block, block * 4096, 4096))
            .unwrap();
        let h = recv_exact(&mut unix, 16);
        assert_eq!(be32(&h[4..8]), 0, "READ of block {block}");
        assert!(
            recv_exact(&mut unix, 4096) == image[at..at + 4096],
            "block {block}"
        );
    }
    assert_eq!(value(&scrape(metrics), MAPPED) - before, MIB as f64);
    let pinned = resident_after_dropping(&data);
    assert!(
        pinned >= MIB,
        "{pinned} bytes stayed cached while the client was attached: the mapping did not pin them"
    );

    unix.write_all(&Raw::request_bytes(0, CMD_DISC, 999, 0, 0))
        .unwrap();
    drop(unix);
    let mut resident = pinned;
    let dropped = wait_until(Duration::from_secs(10), || {
        resident = resident_after_dropping(&data);
        resident == 0
    });
    assert!(
        dropped,
        "{resident} bytes still cached after the last client left"
    );
}
