//! Large WRITEs over plain sockets, to whole blocks the head already holds with all their pages
//! cached, are received from the socket straight into the page cache
//! (`evsd_volume_write_bytes_received_in_place_total`). Checked here: the bytes land exactly, on
//! both transports, with compact and extended headers; exactly the writes that qualify are
//! counted; a snapshot taken halfway through a payload keeps the part that landed before it
//! while the rest goes to the new head; a client leaving halfway leaves the rest of the range
//! untouched and the daemon serving; a refused write keeps the stream in sync.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use evsd_e2e::admin::{admin_ok, assert_same};
use evsd_e2e::metrics::{scrape, value};
use evsd_e2e::raw::*;
use evsd_e2e::*;
use serde_json::json;

const MIB: usize = 1 << 20;
const VOLUME_BYTES: usize = 64 * MIB;
/// Each (transport, header) pass writes its own stretch of the volume.
const REGION_BYTES: usize = 8 * MIB;
const ERR_TYPE_BIT: u16 = 1 << 15;
const REPLY_FLAG_DONE: u16 = 1;

fn in_place_series(volume: &str) -> String {
    format!("evsd_volume_write_bytes_received_in_place_total{{volume=\"{volume}\"}}")
}

/// A client speaking compact or extended headers over any stream.
struct Client<S> {
    s: S,
    extended: bool,
}

impl<S: Read + Write> Client<S> {
    fn open(mut s: S, export: &str, extended: bool) -> Client<S> {
        let options: &[u32] = if extended {
            &[OPT_EXTENDED_HEADERS]
        } else {
            &[]
        };
        open_stream(&mut s, export, options);
        Client { s, extended }
    }

    fn header(&self, flags: u16, cookie: u64, offset: usize, length: usize) -> Vec<u8> {
        if self.extended {
            Raw::ext_request_bytes(flags, CMD_WRITE, cookie, offset as u64, length as u64)
        } else {
            Raw::request_bytes(flags, CMD_WRITE, cookie, offset as u64, length as u32)
        }
    }

    fn send_write(&mut self, flags: u16, cookie: u64, offset: usize, data: &[u8]) {
        let mut bytes = self.header(flags, cookie, offset, data.len());
        bytes.extend_from_slice(data);
        self.s.write_all(&bytes).unwrap();
    }

    /// The next reply to a request without data: (cookie, error).
    fn reply(&mut self) -> (u64, u32) {
        if self.extended {
            let h = recv_exact(&mut self.s, 32);
            assert_eq!(be32(&h[0..4]), EXT_REPLY_MAGIC, "{h:02x?}");
            let (flags, typ, cookie) = (be16(&h[4..6]), be16(&h[6..8]), be64(&h[8..16]));
            let payload = recv_exact(&mut self.s, be64(&h[24..32]) as usize);
            assert_ne!(flags & REPLY_FLAG_DONE, 0, "one chunk per write reply");
            let err = if typ & ERR_TYPE_BIT != 0 {
                be32(&payload[0..4])
            } else {
                0
            };
            (cookie, err)
        } else {
            let h = recv_exact(&mut self.s, 16);
            assert_eq!(be32(&h[0..4]), SIMPLE_REPLY_MAGIC, "{h:02x?}");
            (be64(&h[8..16]), be32(&h[4..8]))
        }
    }

    /// Replies to `count` requests, in whatever order, all successful.
    fn all_ok(&mut self, count: usize, what: &str) {
        for _ in 0..count {
            let (cookie, err) = self.reply();
            assert_eq!(err, 0, "{what}: request {cookie} failed with error {err}");
        }
    }
}

/// `length` bytes of `export` from `offset`, read over TCP in 1 MiB pieces.
fn read_back(d: &Daemon, export: &str, offset: usize, length: usize) -> Vec<u8> {
    let (mut r, _) = Raw::open(d.tcp_addr(), export);
    let mut out = Vec::with_capacity(length);
    for (i, at) in (offset..offset + length).step_by(MIB).enumerate() {
        let n = MIB.min(offset + length - at);
        out.extend(r.read(i as u64, at as u64, n as u32));
    }
    r.disconnect();
    out
}

/// One pass over `region`: a first round of writes to blocks never written (none lands in
/// place), a second over them (the aligned ones do, FUA included; an unaligned one and one to
/// blocks never written do not), then a write crossing the end (refused) and a flush.
fn pass<S: Read + Write>(
    d: &Daemon,
    client: &mut Client<S>,
    region: usize,
    image: &mut [u8],
    rng: &mut Prng,
    what: &str,
) {
    let metrics = d.metrics_addr().expect("metrics address");
    let landed = || value(&scrape(metrics), &in_place_series("p"));
    let base = region * REGION_BYTES;

    let before = landed();
    rng.fill(&mut image[base..base + 6 * MIB]);
    for i in 0..6 {
        let at = base + i * MIB;
        client.send_write(0, i as u64, at, &image[at..at + MIB]);
    }
    client.all_ok(6, what);
    assert_eq!(
        landed() - before,
        0.0,
        "{what}: writes to blocks never written go through buffers"
    );

    let before = landed();
    let unaligned = base + 5 * MIB + 512;
    let fresh = base + 6 * MIB;
    rng.fill(&mut image[base..base + 5 * MIB]);
    rng.fill(&mut image[unaligned..unaligned + MIB / 2]);
    rng.fill(&mut image[fresh..fresh + MIB]);
    let mut cookie = 100;
    for i in 0..5 {
        let at = base + i * MIB;
        let flags = if i == 4 { CMD_FLAG_FUA } else { 0 };
        client.send_write(flags, cookie, at, &image[at..at + MIB]);
        cookie += 1;
    }
    // Unaligned, inside blocks already written; then 1 MiB never written.
    client.send_write(0, cookie, unaligned, &image[unaligned..unaligned + MIB / 2]);
    client.send_write(0, cookie + 1, fresh, &image[fresh..fresh + MIB]);
    client.all_ok(7, what);
    assert_eq!(
        landed() - before,
        (5 * MIB) as f64,
        "{what}: exactly the five aligned writes over written blocks land in place"
    );

    let crossing = VOLUME_BYTES - MIB / 2;
    client.send_write(0, 900, crossing, &vec![5u8; MIB]);
    let (c, err) = client.reply();
    assert_eq!((c, err), (900, ENOSPC), "{what}: a write past the end");
    client.s.write_all(&client_flush(client.extended)).unwrap();
    assert_eq!(client.reply(), (901, 0), "{what}: the stream stays in sync");
    assert_same(
        what,
        &read_back(d, "p", base, 7 * MIB),
        &image[base..base + 7 * MIB],
    );
}

fn client_flush(extended: bool) -> Vec<u8> {
    if extended {
        Raw::ext_request_bytes(0, CMD_FLUSH, 901, 0, 0)
    } else {
        Raw::request_bytes(0, CMD_FLUSH, 901, 0, 0)
    }
}

#[test]
fn large_writes_over_cached_blocks_land_in_place_byte_exact() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume().volume("p:64M"));
    let mut image = vec![0u8; VOLUME_BYTES];
    let mut rng = Prng::new(0x1a_91ace);
    for (region, (unix, extended)) in [(false, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .enumerate()
    {
        let what = format!("unix={unix} extended={extended}");
        if unix {
            let s = UnixStream::connect(d.unix_path()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut client = Client::open(s, "p", extended);
            pass(&d, &mut client, region, &mut image, &mut rng, &what);
        } else {
            let s = d.connect_tcp();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut client = Client::open(s, "p", extended);
            pass(&d, &mut client, region, &mut image, &mut rng, &what);
        }
    }
}

/// A snapshot while a payload is landing: the frozen head keeps what landed before it (a
/// write in flight at a crash may be cut anywhere), the new head gets the rest, the volume reads
/// the whole write. Then a client that leaves halfway: what it sent landed, the rest of the
/// range is untouched, and the daemon serves the next client.
#[test]
fn a_payload_cut_by_a_snapshot_or_a_departure_lands_in_parts() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume().volume("p:16M"));
    let metrics = d.metrics_addr().expect("metrics address");
    let landed = || value(&scrape(metrics), &in_place_series("p"));
    let mut rng = Prng::new(77);
    let old = rng.bytes(6 * MIB);
    let new = rng.bytes(6 * MIB);
    let (mut r, _) = Raw::open(d.tcp_addr(), "p");
    r.write(1, 0, 0, &old[..2 * MIB]);
    r.write(2, 0, (4 * MIB) as u64, &old[4 * MIB..]);
    r.flush(3);

    let before = landed();
    let mut header = Raw::request_bytes(0, CMD_WRITE, 10, 0, (2 * MIB) as u32);
    header.extend_from_slice(&new[..MIB]);
    r.send(&header);
    assert!(
        wait_until(Duration::from_secs(10), || landed() - before >= MIB as f64),
        "the first half lands in place ({} bytes counted)",
        landed() - before
    );
    admin_ok(&d, "snapshot.create", json!({"volume": "p", "name": "s1"}));
    r.send(&new[MIB..2 * MIB]);
    assert_eq!(r.read_status(10), 0, "the write cut by the snapshot");
    assert_eq!(
        landed() - before,
        MIB as f64,
        "the rest goes to the new head the ordinary way"
    );
    assert_same("volume", &read_back(&d, "p", 0, 2 * MIB), &new[..2 * MIB]);
    let mut frozen = new[..MIB].to_vec();
    frozen.extend_from_slice(&old[MIB..2 * MIB]);
    assert_same("snapshot", &read_back(&d, "p@s1", 0, 2 * MIB), &frozen);

    // Blocks 4..6 MiB were written before the snapshot, so the new head lacks them: written
    // once more (through a buffer), the head holds them.
    r.write(11, 0, (4 * MIB) as u64, &old[4 * MIB..]);
    let before = landed();
    let mut header = Raw::request_bytes(0, CMD_WRITE, 12, (4 * MIB) as u64, (2 * MIB) as u32);
    header.extend_from_slice(&new[4 * MIB..5 * MIB]);
    r.send(&header);
    assert!(
        wait_until(Duration::from_secs(10), || landed() - before >= MIB as f64),
        "half a payload lands before the client leaves"
    );
    drop(r);
    let mut want = new[4 * MIB..5 * MIB].to_vec();
    want.extend_from_slice(&old[5 * MIB..]);
    assert_same(
        "after a departure",
        &read_back(&d, "p", 4 * MIB, 2 * MIB),
        &want,
    );
}

/// The next extended reply header: (cookie, offset, error), its payload read.
fn extended_reply<S: Read>(s: &mut S) -> (u64, u64, u32) {
    let h = recv_exact(s, 32);
    assert_eq!(be32(&h[0..4]), EXT_REPLY_MAGIC, "{h:02x?}");
    let (typ, cookie, offset) = (be16(&h[6..8]), be64(&h[8..16]), be64(&h[16..24]));
    let payload = recv_exact(s, be64(&h[24..32]) as usize);
    let err = if typ & ERR_TYPE_BIT != 0 {
        be32(&payload[0..4])
    } else {
        0
    };
    (cookie, offset, err)
}

/// A TRIM, from another client, of the block a payload's landed part ends in, between two
/// landings: the rest of the write starts at that block (its landed bytes in front) and writes
/// it whole, so it never reads part zeroes, part payload (a rest from the cut merged its bytes
/// onto the trimmed block). With extended headers the reply echoes the offset the client sent
/// (libnbd fails a command whose extended reply names another).
#[test]
fn a_block_trimmed_between_two_landings_is_written_whole_and_the_reply_echoes_the_offset() {
    const CUT_BYTES: usize = MIB + 1000;
    let d = Daemon::start(DaemonOpts::new().no_default_volume().volume("q:8M"));
    let metrics = d.metrics_addr().expect("metrics address");
    let landed = || value(&scrape(metrics), &in_place_series("q"));
    let mut rng = Prng::new(78);
    let old = rng.bytes(2 * MIB);
    let new = rng.bytes(2 * MIB);
    let (mut r, _) = Raw::open(d.tcp_addr(), "q");
    r.write(1, 0, MIB as u64, &old);
    r.flush(2);

    let s = UnixStream::connect(d.unix_path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut c = Client::open(s, "q", true);
    let write_series = |name: &str| format!("{name}{{volume=\"q\",kind=\"write\"}}");
    let writes = || {
        let text = scrape(metrics);
        (
            value(&text, &write_series("evsd_volume_operations_total")),
            value(&text, &write_series("evsd_volume_bytes_total")),
        )
    };
    let writes_before = writes();
    let before = landed();
    let mut bytes = c.header(0, 20, MIB, 2 * MIB);
    bytes.extend_from_slice(&new[..CUT_BYTES]);
    c.s.write_all(&bytes).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || landed() - before
            >= CUT_BYTES as f64),
        "what was sent lands in place ({} bytes counted)",
        landed() - before
    );
    let cut_block = (MIB + MIB) as u64;
    assert_eq!(r.command(0, CMD_TRIM, 3, cut_block, 4096), 0, "trim");
    c.s.write_all(&new[CUT_BYTES..]).unwrap();
    let (cookie, offset, err) = extended_reply(&mut c.s);
    assert_eq!((cookie, err), (20, 0), "the write cut by the trim");
    assert_eq!(offset, MIB as u64, "the reply's offset is the request's");
    let writes_after = writes();
    assert_eq!(
        (
            writes_after.0 - writes_before.0,
            writes_after.1 - writes_before.1
        ),
        (1.0, (2 * MIB) as f64),
        "one WRITE of the client's length, not the rest's"
    );
    assert_same("volume", &read_back(&d, "q", MIB, 2 * MIB), &new);
    r.disconnect();
}

/// SIGTERM while a payload is landing in place: the client that sent its header is answered
/// ESHUTDOWN, not left with end of stream only.
#[test]
fn a_write_landing_in_place_at_shutdown_is_answered() {
    let mut d = Daemon::start(DaemonOpts::new().no_default_volume().volume("q:4M"));
    let metrics = d.metrics_addr().expect("metrics address");
    let landed = || value(&scrape(metrics), &in_place_series("q"));
    let mut rng = Prng::new(79);
    let (mut r, _) = Raw::open(d.tcp_addr(), "q");
    r.write(1, 0, 0, &rng.bytes(2 * MIB));
    r.flush(2);
    r.disconnect();

    let s = UnixStream::connect(d.unix_path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut c = Client::open(s, "q", true);
    let mut bytes = c.header(0, 30, 0, 2 * MIB);
    bytes.extend_from_slice(&rng.bytes(MIB));
    c.s.write_all(&bytes).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || landed() >= MIB as f64),
        "half the payload lands in place"
    );
    d.signal(libc::SIGTERM);
    let (cookie, offset, err) = extended_reply(&mut c.s);
    assert_eq!((cookie, offset, err), (30, 0, ESHUTDOWN));
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}\n{}", d.stderr());
}
