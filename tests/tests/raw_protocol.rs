//! Raw wire tests: hand-built big-endian frames over TCP, no dependency on the
//! project's proto crate. After every malformed-input test a fresh client
//! must still read and write data, and the daemon must still be running.

use std::io::Read;
use std::time::{Duration, Instant};

use evsd_e2e::raw::*;
use evsd_e2e::*;

const VOL0: u64 = GIB;

/// Write a unique pattern with a brand-new client, read it back with another.
fn assert_healthy(d: &mut Daemon, what: &str) {
    d.assert_alive();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let data = Prng::new(seed ^ 0xfeed).bytes(8192);
    let off = 512 * MIB + 4096 * (seed % 1000);
    {
        let (mut c, info) = Raw::open(d.tcp_addr(), "vol0");
        assert_eq!(info.size, VOL0, "{what}: fresh client sees wrong size");
        c.write(1, 0, off, &data);
        c.flush(2);
        c.disconnect();
    }
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    let got = c.read(3, off, data.len() as u32);
    assert!(got == data, "{what}: fresh client read back wrong data");
    c.disconnect();
    d.assert_alive();
}

fn expected_tflags_base() -> u16 {
    TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN
        | TF_SEND_CACHE
        | TF_SEND_FAST_ZERO
}

fn check_tflags(flags: u16, structured: bool) {
    let want = expected_tflags_base();
    assert_eq!(
        flags & want,
        want,
        "transmission flags {flags:#06x} lack some of {want:#06x}"
    );
    assert_eq!(flags & TF_READ_ONLY, 0, "export is read-only? {flags:#06x}");
    if structured {
        assert_ne!(
            flags & TF_SEND_DF,
            0,
            "SEND_DF missing with structured replies: {flags:#06x}"
        );
    } else {
        assert_eq!(
            flags & TF_SEND_DF,
            0,
            "SEND_DF set without structured replies: {flags:#06x}"
        );
    }
}

/// WRITE/READ/FLUSH/TRIM/WRITE_ZEROES/CACHE/DISC with simple replies.
fn simple_io_session(mut c: Raw, seed: u64) {
    let a = Prng::new(seed).bytes(65536);
    let b = Prng::new(seed + 1).bytes(4096 + 123);
    c.write(0x1111, 0, MIB, &a);
    c.write(0xdead_beef_cafe_babe, CMD_FLAG_FUA, 3 * MIB + 17, &b);
    assert!(c.read(0x2222, MIB, 65536) == a, "READ returned other data");
    assert!(
        c.read(u64::MAX, 3 * MIB + 17, b.len() as u32) == b,
        "READ at odd offset returned other data"
    );
    // partial, overlapping read
    let got = c.read(5, MIB + 1000, 2000);
    assert!(got[..] == a[1000..3000], "partial READ mismatch");
    c.flush(6);
    // TRIM then read zeroes
    let e = c.command(0, CMD_TRIM, 7, MIB, 65536);
    assert_eq!(e, 0, "TRIM failed: {e}");
    assert!(
        c.read(8, MIB, 65536).iter().all(|&x| x == 0),
        "trimmed range does not read as zeroes"
    );
    // WRITE_ZEROES with NO_HOLE over data
    let e = c.command(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 9, 3 * MIB + 17, 100);
    assert_eq!(e, 0, "WRITE_ZEROES failed: {e}");
    let got = c.read(10, 3 * MIB + 17, b.len() as u32);
    assert!(got[..100].iter().all(|&x| x == 0), "zeroed bytes not zero");
    assert!(
        got[100..] == b[100..],
        "WRITE_ZEROES touched bytes after its range"
    );
    // CACHE is a hint; must succeed
    let e = c.command(0, CMD_CACHE, 11, 0, 1 << 20);
    assert_eq!(e, 0, "CACHE failed: {e}");
    c.flush(12);
    c.disconnect();
}

#[test]
fn export_name_without_no_zeroes_then_simple_io() {
    let mut d = Daemon::start_default();
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE);
    let info = c.export_name("vol0", false); // reads and checks the 124 zero bytes
    assert_eq!(info.size, VOL0);
    check_tflags(info.flags, false);
    simple_io_session(c, 1);
    assert_healthy(&mut d, "after EXPORT_NAME session");
}

#[test]
fn export_name_with_no_zeroes_then_simple_io() {
    let mut d = Daemon::start_default();
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    let info = c.export_name("vol0", true);
    assert_eq!(info.size, VOL0);
    check_tflags(info.flags, false);
    // If the server wrongly sent 124 padding bytes, the next reply header
    // would not start with the simple-reply magic.
    simple_io_session(c, 2);
    assert_healthy(&mut d, "after NO_ZEROES EXPORT_NAME session");
}

#[test]
fn data_written_on_one_connection_is_read_on_another() {
    let mut d = Daemon::start(DaemonOpts::new().with_vol0().volume("v2:8M"));
    let data = Prng::new(9).bytes(3 * 4096);
    {
        let (mut c, info) = Raw::open(d.tcp_addr(), "v2");
        assert_eq!(info.size, 8 * MIB);
        c.write(1, 0, 8 * MIB - data.len() as u64, &data);
        c.disconnect();
    }
    let (mut c, _) = Raw::open(d.tcp_addr(), "v2");
    assert!(c.read(1, 8 * MIB - data.len() as u64, data.len() as u32) == data);
    // vol0 is a different volume: untouched there.
    let (mut c0, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(c0
        .read(1, 8 * MIB - data.len() as u64, data.len() as u32)
        .iter()
        .all(|&x| x == 0));
    assert_healthy(&mut d, "two volumes");
}

#[test]
fn info_and_go_with_info_requests() {
    let mut d = Daemon::start_default();
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    let infos = [INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION, 0x7777];
    let check = |replies: &[OptReply], opt: u32| -> (u64, u16) {
        let last = replies.last().unwrap();
        assert_eq!(last.typ, REP_ACK, "opt {opt}: final reply {last:?}");
        assert!(last.data.is_empty());
        let mut export = None;
        let mut bs = None;
        for r in &replies[..replies.len() - 1] {
            assert_eq!(
                r.typ, REP_INFO,
                "opt {opt}: non-INFO reply before ACK: {r:?}"
            );
            assert!(r.data.len() >= 2);
            match be16(&r.data) {
                INFO_EXPORT => {
                    assert_eq!(r.data.len(), 12, "INFO_EXPORT length");
                    export = Some((be64(&r.data[2..]), be16(&r.data[10..])));
                }
                INFO_BLOCK_SIZE => {
                    assert_eq!(r.data.len(), 14, "INFO_BLOCK_SIZE length");
                    bs = Some((be32(&r.data[2..]), be32(&r.data[6..]), be32(&r.data[10..])));
                }
                INFO_NAME => {
                    assert_eq!(&r.data[2..], b"vol0", "INFO_NAME payload");
                }
                INFO_DESCRIPTION => {}
                t => panic!("opt {opt}: server sent info type {t} nobody asked for"),
            }
        }
        assert_eq!(
            bs,
            Some((1, 4096, 32 * 1024 * 1024)),
            "opt {opt}: block sizes min/preferred/max"
        );
        export.unwrap_or_else(|| panic!("opt {opt}: no INFO_EXPORT"))
    };
    let r = c.info_or_go(OPT_INFO, "vol0", &infos);
    let (size_i, flags_i) = check(&r, OPT_INFO);
    assert_eq!(size_i, VOL0);
    check_tflags(flags_i, false);
    // Still negotiating: LIST works after INFO.
    let names = c.list();
    assert!(names.contains(&"vol0".to_string()), "LIST: {names:?}");
    // GO with the same requests: identical data, then transmission.
    let r = c.info_or_go(OPT_GO, "vol0", &infos);
    let (size_g, flags_g) = check(&r, OPT_GO);
    assert_eq!((size_g, flags_g), (size_i, flags_i), "INFO and GO disagree");
    simple_io_session(c, 3);
    assert_healthy(&mut d, "after INFO/GO");
}

#[test]
fn go_on_unknown_export_is_err_unknown_and_stream_stays_usable() {
    let mut d = Daemon::start_default();
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    let r = c.info_or_go(OPT_GO, "does-not-exist", &[]);
    let last = r.last().unwrap();
    assert_eq!(
        last.typ, REP_ERR_UNKNOWN,
        "GO on unknown export: expected NBD_REP_ERR_UNKNOWN, got {:#x}",
        last.typ
    );
    let r = c.info_or_go(OPT_INFO, "does-not-exist", &[]);
    assert_eq!(
        r.last().unwrap().typ,
        REP_ERR_UNKNOWN,
        "INFO unknown export"
    );
    let (info, _) = c.go("vol0", &[]);
    assert_eq!(info.size, VOL0);
    simple_io_session(c, 4);
    assert_healthy(&mut d, "after GO on unknown export");
}

#[test]
fn list_exports_and_list_with_payload() {
    let mut d = Daemon::start(
        DaemonOpts::new()
            .with_vol0()
            .volume("a1:1M")
            .volume("b2:2M"),
    );
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    let mut names = c.list();
    names.sort();
    assert_eq!(names, vec!["a1", "b2", "vol0"]);
    // LIST with data is invalid; the server replies an error and stays in sync.
    c.send_opt(OPT_LIST, b"junk");
    let r = c.read_opt_reply();
    assert_eq!(r.opt, OPT_LIST);
    assert_eq!(
        r.typ, REP_ERR_INVALID,
        "LIST with payload: expected ERR_INVALID, got {:#x}",
        r.typ
    );
    assert_eq!(c.list().len(), 3);
    c.opt_ack(OPT_ABORT);
    assert_healthy(&mut d, "after LIST");
}

#[test]
fn unknown_option_with_payload_is_err_unsup_and_in_sync() {
    let mut d = Daemon::start_default();
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    c.send_opt(0x0765_4321, &[0x5a; 100]);
    let r = c.read_opt_reply();
    assert_eq!(r.opt, 0x0765_4321, "reply echoes the option");
    assert_eq!(
        r.typ, REP_ERR_UNSUP,
        "unknown option: expected ERR_UNSUP, got {r:?}"
    );
    // The 100 payload bytes were skipped: the next option parses fine.
    let names = c.list();
    assert!(
        names.contains(&"vol0".to_string()),
        "LIST after unknown option: {names:?}"
    );
    // Twice more, with other sizes.
    c.send_opt(0x0765_4321, &[]);
    assert_eq!(c.read_opt_reply().typ, REP_ERR_UNSUP);
    c.send_opt(0x1234, &[0; 4096]);
    assert_eq!(c.read_opt_reply().typ, REP_ERR_UNSUP);
    let (info, _) = c.go("vol0", &[]);
    assert_eq!(info.size, VOL0);
    c.disconnect();
    assert_healthy(&mut d, "after unknown options");
}

#[test]
fn starttls_is_err_policy() {
    let mut d = Daemon::start_default();
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    c.send_opt(OPT_STARTTLS, &[]);
    let r = c.read_opt_reply();
    assert_eq!(r.opt, OPT_STARTTLS);
    assert_eq!(
        r.typ, REP_ERR_POLICY,
        "STARTTLS: expected ERR_POLICY (0x80000002), got {:#x}",
        r.typ
    );
    // still negotiating in plaintext
    assert!(!c.list().is_empty());
    c.opt_ack(OPT_ABORT);
    assert_healthy(&mut d, "after STARTTLS");
}

#[test]
fn abort_is_acked_and_connection_closed() {
    let mut d = Daemon::start_default();
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    c.send_opt(OPT_ABORT, &[]);
    let r = c.read_opt_reply();
    assert_eq!((r.opt, r.typ), (OPT_ABORT, REP_ACK), "ABORT reply {r:?}");
    c.expect_closed("after OPT_ABORT");
    assert_healthy(&mut d, "after ABORT");
}

#[test]
fn unknown_client_flags_close_connection() {
    let mut d = Daemon::start_default();
    for flags in [
        0x80u32,
        CFLAG_FIXED_NEWSTYLE | 0x80,
        0xffff_ffff,
        CFLAG_FIXED_NEWSTYLE | 4,
    ] {
        let mut c = Raw::handshake(d.tcp_addr(), flags);
        // Whatever we send next must not be answered.
        let _ = c.try_send(&{
            let mut b = IHAVEOPT.to_be_bytes().to_vec();
            b.extend_from_slice(&OPT_LIST.to_be_bytes());
            b.extend_from_slice(&0u32.to_be_bytes());
            b
        });
        c.expect_closed(&format!("client flags {flags:#x}"));
    }
    assert_healthy(&mut d, "after unknown client flags");
}

#[test]
fn bad_option_magic_closes_connection() {
    let mut d = Daemon::start_default();
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    let mut b = 0x1122_3344_5566_7788u64.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_LIST.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    c.send(&b);
    c.expect_closed("bad option magic");
    assert_healthy(&mut d, "after bad option magic");
}

#[test]
fn export_name_of_unknown_export_closes_connection() {
    let mut d = Daemon::start_default();
    for nz in [true, false] {
        let flags = CFLAG_FIXED_NEWSTYLE | if nz { CFLAG_NO_ZEROES } else { 0 };
        let mut c = Raw::handshake(d.tcp_addr(), flags);
        c.send_opt(OPT_EXPORT_NAME, b"nope");
        c.expect_closed("EXPORT_NAME of an unknown export");
    }
    assert_healthy(&mut d, "after EXPORT_NAME unknown");
}

/// A 100 MiB option: the server may refuse it at once (error reply or close),
/// or skip the payload and then reply an error. Whichever it does, it must
/// not die, and if it keeps the connection it must stay in sync.
#[test]
fn oversized_option_length_is_refused() {
    let mut d = Daemon::start_default();
    const LEN: usize = 100 << 20;
    for opt in [OPT_GO, OPT_LIST, 0x0765_4321, OPT_EXPORT_NAME] {
        let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(LEN as u32).to_be_bytes());
        b.extend_from_slice(&[0u8; 64]);
        c.send(&b);
        c.s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut h = [0u8; 20];
        let mut skipped = false;
        let first = c.s.read_exact(&mut h);
        c.s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let got_reply = match first {
            Ok(()) => true,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                // Presumably skipping the payload: send the rest of it.
                let chunk = vec![0u8; 1 << 20];
                let mut left = LEN - 64;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if c.try_send(&chunk[..n]).is_err() {
                        break;
                    }
                    left -= n;
                }
                skipped = true;
                c.s.read_exact(&mut h).is_ok()
            }
            Err(_) => false, // closed
        };
        if got_reply {
            assert_eq!(
                be64(&h),
                OPT_REPLY_MAGIC,
                "opt {opt}: garbage reply {h:02x?}"
            );
            assert_eq!(be32(&h[8..]), opt, "opt {opt}: reply echoes wrong option");
            let typ = be32(&h[12..]);
            assert!(
                typ & 0x8000_0000 != 0,
                "opt {opt}: 100 MiB option answered with non-error reply type {typ:#x}"
            );
            let len = be32(&h[16..]) as usize;
            assert!(len < 4096, "opt {opt}: error reply of {len} bytes");
            let _ = c.recv(len);
            if skipped {
                // The payload was skipped, so the stream must still be in sync.
                let names = c.list();
                assert!(
                    names.contains(&"vol0".to_string()),
                    "opt {opt}: LIST after skipped 100 MiB option: {names:?}"
                );
            }
        }
        drop(c);
        d.assert_alive();
    }
    assert_healthy(&mut d, "after oversized option");
}

#[test]
fn handshake_timeout_closes_idle_negotiation() {
    let mut d = Daemon::start(DaemonOpts::new().handshake_timeout(2));
    let start = Instant::now();
    let mut c = Raw::connect(d.tcp_addr());
    c.read_greeting();
    c.expect_closed("idle client during handshake with --handshake-timeout-secs 2");
    let el = start.elapsed();
    assert!(
        el >= Duration::from_millis(1500) && el < Duration::from_secs(12),
        "idle handshake closed after {el:?}, expected about 2 s"
    );
    // An established session is not subject to the handshake timeout.
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    std::thread::sleep(Duration::from_secs(3));
    let _ = c.read(1, 0, 512);
    c.disconnect();
    assert_healthy(&mut d, "after handshake timeout");
}

#[test]
fn connection_limit_refuses_extra_clients_until_a_slot_frees() {
    let mut d = Daemon::start(DaemonOpts::new().max_connections(2));
    let (mut a, _) = Raw::open(d.tcp_addr(), "vol0");
    let (mut b, _) = Raw::open(d.tcp_addr(), "vol0");
    // A third client is closed at once, before any greeting.
    let mut c = Raw::connect(d.tcp_addr());
    c.expect_closed("third client with --max-connections 2");
    // The two admitted clients are unaffected.
    let data = Prng::new(11).bytes(4096);
    a.write(1, 0, 0, &data);
    assert_eq!(b.read(2, 0, 4096), data);
    // Closing one frees its slot for a newcomer.
    a.disconnect();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let Ok(mut probe) = std::net::TcpStream::connect(d.tcp_addr()) else {
                return false;
            };
            let _ = probe.set_read_timeout(Some(Duration::from_secs(2)));
            let mut greeting = [0u8; 18];
            std::io::Read::read_exact(&mut probe, &mut greeting).is_ok()
                && &greeting[..8] == b"NBDMAGIC"
        }),
        "a slot did not free after a client disconnected"
    );
    b.disconnect();
    assert_healthy(&mut d, "after connection-limit refusals");
}

#[test]
fn unknown_command_is_einval_and_connection_usable() {
    let mut d = Daemon::start_default();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    for (typ, off, len) in [(99u16, 0u64, 0u32), (99, 0, 4096), (0x7fff, 0, 0)] {
        let e = c.command(0, typ, 0xabc, off, len);
        assert_eq!(
            e, EINVAL,
            "unknown command {typ}: expected EINVAL(22), got {e}"
        );
    }
    let data = Prng::new(5).bytes(4096);
    c.write(1, 0, 0, &data);
    assert!(c.read(2, 0, 4096) == data);
    c.disconnect();
    assert_healthy(&mut d, "after unknown commands");
}

#[test]
fn out_of_range_requests() {
    let mut d = Daemon::start(DaemonOpts::new().with_vol0().volume("small:1M"));
    let size = MIB;
    let (mut c, info) = Raw::open(d.tcp_addr(), "small");
    assert_eq!(info.size, size);
    // READ past the end / crossing the end / far beyond
    for (off, len) in [
        (size, 512u32),
        (size - 512, 1024),
        (u64::MAX - 511, 512),
        (size * 4, 1),
    ] {
        c.send_req(0, CMD_READ, 7, off, len, &[]);
        let (e, ck) = c.read_simple_reply();
        assert_eq!(ck, 7);
        assert_eq!(
            e, EINVAL,
            "READ {off}+{len} past end: expected EINVAL(22), got {e}"
        );
    }
    // WRITE past the end: payload is consumed, ENOSPC, stream in sync
    for (off, len) in [(size, 4096u32), (size - 2048, 4096), (size * 2, 1)] {
        c.send_req(0, CMD_WRITE, 8, off, len, &vec![0x77; len as usize]);
        let e = c.read_status(8);
        assert_eq!(
            e, ENOSPC,
            "WRITE {off}+{len} past end: expected ENOSPC(28), got {e}"
        );
    }
    // The partial write crossing the end must not have modified anything.
    assert!(
        c.read(9, size - 2048, 2048).iter().all(|&x| x == 0),
        "failed WRITE crossing the end changed data"
    );
    // TRIM / WRITE_ZEROES past end: an error (EINVAL or ENOSPC), not success.
    for typ in [CMD_TRIM, CMD_WRITE_ZEROES] {
        let e = c.command(0, typ, 10, size - 4096, 8192);
        assert!(
            e == EINVAL || e == ENOSPC,
            "command {typ} past end: expected EINVAL or ENOSPC, got {e}"
        );
    }
    // READ of 64 MiB (over the 32 MiB maximum): EOVERFLOW or EINVAL, no data.
    c.send_req(0, CMD_READ, 11, 0, 64 << 20, &[]);
    let (e, ck) = c.read_simple_reply();
    assert_eq!(ck, 11);
    assert!(
        e == EOVERFLOW || e == EINVAL,
        "64 MiB READ: expected EOVERFLOW(75) or EINVAL(22), got {e}"
    );
    // exactly at the end is fine
    let data = Prng::new(11).bytes(512);
    c.write(12, 0, size - 512, &data);
    assert!(c.read(13, size - 512, 512) == data);
    c.disconnect();
    assert_healthy(&mut d, "after out-of-range requests");
}

#[test]
fn max_size_read_and_write_32m() {
    let mut d = Daemon::start_default();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    let data = Prng::new(32).bytes(32 << 20);
    c.write(1, 0, 100 * MIB, &data);
    let got = c.read(2, 100 * MIB, 32 << 20);
    assert!(got == data, "32 MiB READ mismatch");
    c.disconnect();
    assert_healthy(&mut d, "after 32 MiB requests");
}

#[test]
fn oversized_write_payload_disconnects() {
    let mut d = Daemon::start_default();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    let len: u32 = (64 << 20) + 4096;
    let mut b = Raw::request_bytes(0, CMD_WRITE, 1, 0, len);
    b.extend_from_slice(&vec![0x42; 1 << 20]);
    let _ = c.try_send(&b); // the server may close before reading all of it
    c.expect_closed("WRITE declaring a 64 MiB+ payload");
    assert_healthy(&mut d, "after oversized WRITE");
    // nothing of it was written
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(c.read(2, 0, 4096).iter().all(|&x| x == 0));
}

#[test]
fn bad_request_magic_disconnects() {
    let mut d = Daemon::start_default();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    let mut b = Raw::request_bytes(0, CMD_READ, 1, 0, 512);
    b[0..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    c.send(&b);
    c.expect_closed("bad request magic");
    // extended magic without having negotiated extended headers
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    c.send(&Raw::ext_request_bytes(0, CMD_READ, 1, 0, 512));
    c.expect_closed("extended request without NBD_OPT_EXTENDED_HEADERS");
    assert_healthy(&mut d, "after bad request magic");
}

#[test]
fn client_vanishing_mid_payload_and_mid_handshake() {
    let mut d = Daemon::start_default();
    // mid write payload
    for _ in 0..5 {
        let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
        let mut b = Raw::request_bytes(0, CMD_WRITE, 1, 4096, 1 << 20);
        b.extend_from_slice(&[0x99; 4096]);
        c.send(&b);
        drop(c);
    }
    // mid request header, mid option, right after connect, after greeting
    for stage in 0..4 {
        let mut c = Raw::connect(d.tcp_addr());
        if stage >= 1 {
            c.read_greeting();
        }
        if stage >= 2 {
            c.send(&(CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES).to_be_bytes());
        }
        if stage >= 3 {
            c.send(&IHAVEOPT.to_be_bytes()[..5]);
        }
        drop(c);
    }
    {
        let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
        c.send(&Raw::request_bytes(0, CMD_READ, 1, 0, 512)[..13]);
    }
    // reads in flight when the client goes away
    {
        let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
        for i in 0..64 {
            c.send_req(0, CMD_READ, i, i * MIB, 1 << 20, &[]);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_healthy(&mut d, "after vanishing clients");
    // the 4096-byte-prefix write must not have been applied partially
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(
        c.read(2, 4096, 1 << 20).iter().all(|&x| x == 0),
        "an incomplete WRITE payload was applied"
    );
}

#[test]
fn rapid_connect_disconnect_churn() {
    let mut d = Daemon::start_default();
    let addr = d.tcp_addr();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..50 {
                    match (t + i) % 3 {
                        0 => drop(std::net::TcpStream::connect(addr).unwrap()),
                        1 => {
                            let mut c = Raw::connect(addr);
                            c.read_greeting();
                        }
                        _ => {
                            let (mut c, _) = Raw::open(addr, "vol0");
                            let _ = c.read(1, 0, 4096);
                            if i % 2 == 0 {
                                c.disconnect();
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("churn thread");
    }
    assert_healthy(&mut d, "after connection churn");
}

#[test]
fn pipelined_requests_replies_matched_by_cookie() {
    let mut d = Daemon::start_default();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    let n = 128u64;
    let blocks: Vec<Vec<u8>> = (0..n).map(|i| Prng::new(1000 + i).bytes(16384)).collect();
    // all writes back to back, then collect replies in whatever order
    let mut buf = Vec::new();
    for i in 0..n {
        let cookie = 0x5700_0000_0000_0000 | i;
        buf.extend_from_slice(&Raw::request_bytes(0, CMD_WRITE, cookie, i * 65536, 16384));
        buf.extend_from_slice(&blocks[i as usize]);
    }
    c.send(&buf);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let (e, ck) = c.read_simple_reply();
        assert_eq!(e, 0, "pipelined WRITE {ck:#x} failed: {e}");
        assert!(
            ck >> 56 == 0x57 && (ck & 0xffff) < n,
            "unknown cookie {ck:#x}"
        );
        assert!(seen.insert(ck), "duplicate reply for cookie {ck:#x}");
    }
    c.flush(1);
    // pipelined reads; replies carry their data, matched by cookie
    let mut buf = Vec::new();
    for i in (0..n).rev() {
        buf.extend_from_slice(&Raw::request_bytes(
            0,
            CMD_READ,
            0x5200 + i,
            i * 65536,
            16384,
        ));
    }
    c.send(&buf);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let (e, ck) = c.read_simple_reply();
        assert_eq!(e, 0);
        let i = ck.checked_sub(0x5200).filter(|i| *i < n).expect("cookie");
        assert!(seen.insert(i));
        let data = c.recv(16384);
        assert!(
            data == blocks[i as usize],
            "pipelined READ {i} returned other data"
        );
    }
    c.disconnect();
    assert_healthy(&mut d, "after pipelining");
}

#[test]
fn structured_replies_read_data_hole_and_error_chunks() {
    let mut d = Daemon::start(DaemonOpts::new().with_vol0().volume("s:16M"));
    let (mut c, info) = Raw::open_structured(d.tcp_addr(), "s");
    assert_eq!(info.size, 16 * MIB);
    check_tflags(info.flags, true);
    let a = Prng::new(77).bytes(128 * 1024);
    c.write(1, 0, MIB, &a);
    // READ of written data
    let (got, chunks) = c.read_structured(2, MIB, a.len() as u32);
    assert!(got == a, "structured READ data mismatch");
    assert!(
        chunks.iter().any(|ch| ch.typ == CHUNK_OFFSET_DATA),
        "written range returned no OFFSET_DATA chunk: {:?}",
        chunks.iter().map(|c| c.typ).collect::<Vec<_>>()
    );
    // READ spanning never-written + written + never-written
    let (got, _) = c.read_structured(3, MIB - 65536, a.len() as u32 + 131072);
    assert!(
        got[..65536].iter().all(|&x| x == 0),
        "leading hole not zero"
    );
    assert!(got[65536..65536 + a.len()] == a[..], "middle data mismatch");
    assert!(
        got[65536 + a.len()..].iter().all(|&x| x == 0),
        "trailing hole not zero"
    );
    // READ of a never-written range: zeroes (hole or data chunks)
    let (got, _) = c.read_structured(4, 8 * MIB, 1 << 20);
    assert!(got.iter().all(|&x| x == 0));
    // DF: a single OFFSET_DATA chunk covering the range, no holes
    c.send_req(CMD_FLAG_DF, CMD_READ, 5, MIB - 4096, 16384, &[]);
    let chunks = c.read_chunks(5);
    let content: Vec<_> = chunks
        .iter()
        .filter(|ch| ch.typ == CHUNK_OFFSET_DATA || ch.typ == CHUNK_OFFSET_HOLE)
        .collect();
    assert_eq!(
        content.len(),
        1,
        "DF read fragmented: {:?}",
        chunks.iter().map(|c| c.typ).collect::<Vec<_>>()
    );
    assert_eq!(
        content[0].typ, CHUNK_OFFSET_DATA,
        "DF read used a hole chunk"
    );
    let got = assemble_read(MIB - 4096, 16384, &chunks);
    assert!(got[..4096].iter().all(|&x| x == 0) && got[4096..] == a[..12288]);
    // READ past the end: ERROR chunk with EINVAL
    for (off, len) in [(16 * MIB, 512u32), (16 * MIB - 512, 1024)] {
        c.send_req(0, CMD_READ, 6, off, len, &[]);
        let chunks = c.read_chunks(6);
        let errs: Vec<_> = chunks.iter().filter(|ch| ch.typ & 0x8000 != 0).collect();
        assert_eq!(
            errs.len(),
            1,
            "READ {off}+{len} past end: expected one error chunk, got types {:?}",
            chunks.iter().map(|c| c.typ).collect::<Vec<_>>()
        );
        assert_eq!(errs[0].typ, CHUNK_ERROR, "error chunk type");
        assert!(errs[0].payload.len() >= 6, "short error chunk");
        let e = be32(&errs[0].payload);
        let msglen = be16(&errs[0].payload[4..]) as usize;
        assert_eq!(
            errs[0].payload.len(),
            6 + msglen,
            "error chunk message length"
        );
        assert_eq!(e, EINVAL, "READ past end: expected EINVAL, got {e}");
        assert!(
            !chunks
                .iter()
                .any(|ch| ch.typ == CHUNK_OFFSET_DATA || ch.typ == CHUNK_OFFSET_HOLE),
            "error READ also returned data"
        );
    }
    // a 64 MiB structured read: error, not data
    c.send_req(0, CMD_READ, 7, 0, 64 << 20, &[]);
    let chunks = c.read_chunks(7);
    let e = chunks
        .iter()
        .find(|ch| ch.typ & 0x8000 != 0)
        .map(|ch| be32(&ch.payload))
        .expect("64 MiB structured READ: no error chunk");
    assert!(e == EOVERFLOW || e == EINVAL, "64 MiB READ: got errno {e}");
    // still usable
    let (got, _) = c.read_structured(8, MIB, 4096);
    assert!(got[..] == a[..4096]);
    c.disconnect();
    assert_healthy(&mut d, "after structured replies");
}

/// With structured replies (compact headers), a command with no reply payload that succeeds gets
/// a 16-byte simple reply, as qemu-nbd and nbdkit send (libnbd reads it with one `recv`); one
/// that fails still gets an ERROR chunk with its message.
#[test]
fn structured_mode_plain_success_is_a_simple_reply() {
    let mut d = Daemon::start(DaemonOpts::new().volume("p:4M"));
    let (mut c, _) = Raw::open_structured(d.tcp_addr(), "p");
    let data = Prng::new(5).bytes(8192);
    let requests: [(u16, u16, u64, u32, &[u8]); 5] = [
        (CMD_WRITE, 0, 0, 8192, &data),
        (CMD_WRITE, CMD_FLAG_FUA, 8192, 8192, &data),
        (CMD_FLUSH, 0, 0, 0, &[]),
        (CMD_TRIM, 0, 0, 4096, &[]),
        (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 4096, 4096, &[]),
    ];
    for (i, (typ, flags, offset, len, payload)) in requests.into_iter().enumerate() {
        let cookie = 0x51 + i as u64;
        c.send_req(flags, typ, cookie, offset, len, payload);
        assert_eq!(
            c.read_simple_reply(),
            (0, cookie),
            "command {typ} flags {flags:#x}"
        );
    }
    let (got, _) = c.read_structured(0x60, 8192, 8192);
    assert!(got == data, "data written with FUA reads back");
    c.send_req(0, CMD_WRITE, 0x61, 4 * MIB - 4096, 8192, &data);
    let chunks = c.read_chunks(0x61);
    assert_eq!(chunks.len(), 1, "one chunk for a failed WRITE: {chunks:?}");
    assert_eq!(chunks[0].typ, CHUNK_ERROR);
    assert_eq!(be32(&chunks[0].payload), ENOSPC);
    c.disconnect();
    assert_healthy(&mut d, "after simple replies in structured mode");
}

#[test]
fn structured_reply_then_export_name() {
    let mut d = Daemon::start_default();
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    c.opt_ack(OPT_STRUCTURED_REPLY);
    c.structured = true;
    let info = c.export_name("vol0", true);
    check_tflags(info.flags, true);
    let data = Prng::new(3).bytes(5000);
    c.write(1, 0, 12345, &data);
    let (got, _) = c.read_structured(2, 12345, 5000);
    assert!(got == data);
    c.disconnect();
    assert_healthy(&mut d, "after structured EXPORT_NAME");
}

#[test]
fn block_status_base_allocation() {
    let mut d = Daemon::start(DaemonOpts::new().with_vol0().volume("bs:8M"));
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    c.opt_ack(OPT_STRUCTURED_REPLY);
    c.structured = true;
    // LIST_META_CONTEXT with no queries lists base:allocation
    let mut q = Vec::new();
    q.extend_from_slice(&2u32.to_be_bytes());
    q.extend_from_slice(b"bs");
    q.extend_from_slice(&0u32.to_be_bytes());
    c.send_opt(OPT_LIST_META_CONTEXT, &q);
    let mut listed = Vec::new();
    loop {
        let r = c.read_opt_reply();
        match r.typ {
            REP_META_CONTEXT => listed.push(String::from_utf8_lossy(&r.data[4..]).into_owned()),
            REP_ACK => break,
            t => panic!("LIST_META_CONTEXT reply {t:#x}"),
        }
    }
    assert!(
        listed.contains(&"base:allocation".to_string()),
        "{listed:?}"
    );
    // SET_META_CONTEXT base:allocation (plus an unknown namespace, ignored)
    let mut q = Vec::new();
    q.extend_from_slice(&2u32.to_be_bytes());
    q.extend_from_slice(b"bs");
    q.extend_from_slice(&2u32.to_be_bytes());
    for name in ["base:allocation", "x-nonsense:foo"] {
        q.extend_from_slice(&(name.len() as u32).to_be_bytes());
        q.extend_from_slice(name.as_bytes());
    }
    c.send_opt(OPT_SET_META_CONTEXT, &q);
    let mut id = None;
    loop {
        let r = c.read_opt_reply();
        match r.typ {
            REP_META_CONTEXT => {
                assert_eq!(&r.data[4..], b"base:allocation", "selected context");
                assert!(id.is_none(), "two contexts selected");
                id = Some(be32(&r.data));
            }
            REP_ACK => break,
            t => panic!("SET_META_CONTEXT reply {t:#x}"),
        }
    }
    let id = id.expect("base:allocation not selected");
    let (_, _) = c.go("bs", &[]);
    c.write(1, 0, 0, &vec![0x31; MIB as usize]);
    c.flush(2);
    c.send_req(0, CMD_BLOCK_STATUS, 3, 0, 8 << 20, &[]);
    let chunks = c.read_chunks(3);
    let bs: Vec<_> = chunks
        .iter()
        .filter(|ch| ch.typ == CHUNK_BLOCK_STATUS)
        .collect();
    assert_eq!(bs.len(), 1, "expected one BLOCK_STATUS chunk: {chunks:?}");
    let p = &bs[0].payload;
    assert_eq!(be32(p), id, "context id");
    assert!(
        (p.len() - 4) % 8 == 0 && p.len() > 4,
        "descriptor list length"
    );
    let mut pos = 0u64;
    let mut ext = Vec::new();
    for e in p[4..].chunks(8) {
        let (len, flags) = (be32(e) as u64, be32(&e[4..]));
        assert!(len > 0, "zero-length extent");
        ext.push((pos, len, flags));
        pos += len;
    }
    assert!(pos <= 8 * MIB + MIB, "extents go far past the request");
    for &(o, l, f) in &ext {
        if o < MIB {
            assert_eq!(f, 0, "0..1M is data but extent {o}+{l} has flags {f}");
            assert!(o + l <= MIB, "data extent {o}+{l} overhangs into the hole");
        }
        if (MIB..8 * MIB).contains(&o) {
            assert_eq!(f, 3, "{o}+{l} was never written but has flags {f}");
        }
    }
    assert!(
        ext.iter().any(|&(o, _, _)| o == MIB),
        "no extent boundary at 1M: {ext:?}"
    );
    c.disconnect();
    assert_healthy(&mut d, "after block status");
}

#[test]
fn extended_headers_read_write() {
    let mut d = Daemon::start_default();
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    c.opt_ack(OPT_EXTENDED_HEADERS);
    c.extended = true;
    let (info, _) = c.go("vol0", &[]);
    assert_eq!(info.size, VOL0);
    let data = Prng::new(64).bytes(70000);
    let mut b = Raw::ext_request_bytes(
        CMD_FLAG_PAYLOAD_LEN,
        CMD_WRITE,
        0xe1,
        2 * MIB,
        data.len() as u64,
    );
    b.extend_from_slice(&data);
    c.send(&b);
    let chunks = c.read_chunks(0xe1);
    assert!(
        chunks.iter().all(|ch| ch.typ & 0x8000 == 0),
        "extended WRITE failed: {chunks:?}"
    );
    c.send(&Raw::ext_request_bytes(
        0,
        CMD_READ,
        0xe2,
        2 * MIB,
        data.len() as u64,
    ));
    let chunks = c.read_chunks(0xe2);
    let got = assemble_read(2 * MIB, data.len() as u32, &chunks);
    assert!(got == data, "extended READ mismatch");
    // FLUSH and a past-end READ error
    c.send(&Raw::ext_request_bytes(0, CMD_FLUSH, 0xe3, 0, 0));
    let chunks = c.read_chunks(0xe3);
    assert!(
        chunks.iter().all(|ch| ch.typ & 0x8000 == 0),
        "FLUSH: {chunks:?}"
    );
    c.send(&Raw::ext_request_bytes(0, CMD_READ, 0xe4, VOL0, 512));
    let chunks = c.read_chunks(0xe4);
    let e = chunks
        .iter()
        .find(|ch| ch.typ & 0x8000 != 0)
        .map(|ch| be32(&ch.payload))
        .expect("no error chunk for extended READ past end");
    assert_eq!(e, EINVAL);
    // compact magic after extended negotiation is a protocol violation
    // (padded to the 32 bytes the server reads for an extended header)
    let mut b = Raw::request_bytes(0, CMD_READ, 0xe5, 0, 512);
    b.extend_from_slice(&[0; 4]);
    c.send(&b);
    c.expect_closed("compact request after extended headers");
    assert_healthy(&mut d, "after extended headers");
}

#[test]
fn fua_fast_zero_and_flags() {
    let mut d = Daemon::start_default();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    let data = Prng::new(8).bytes(65536);
    c.write(1, CMD_FLAG_FUA, 0, &data);
    // WRITE_ZEROES with FAST_ZERO: either done (then zeroes) or ENOTSUP with data intact
    let e = c.command(1 << 4, CMD_WRITE_ZEROES, 2, 0, 65536);
    let got = c.read(3, 0, 65536);
    match e {
        0 => assert!(
            got.iter().all(|&x| x == 0),
            "fast zero succeeded but data not zero"
        ),
        ENOTSUP => assert!(got == data, "fast zero failed but changed data"),
        e => panic!("FAST_ZERO: expected 0 or ENOTSUP, got {e}"),
    }
    // FUA on TRIM and WRITE_ZEROES
    c.write(4, 0, MIB, &data);
    assert_eq!(c.command(CMD_FLAG_FUA, CMD_TRIM, 5, MIB, 4096), 0);
    assert_eq!(
        c.command(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 6, MIB + 4096, 4096),
        0
    );
    let got = c.read(7, MIB, 65536);
    assert!(got[..8192].iter().all(|&x| x == 0));
    assert!(got[8192..] == data[8192..]);
    c.disconnect();
    assert_healthy(&mut d, "after FUA/FAST_ZERO");
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line");
    kib * 1024
}

/// Sends `request` a thousand at a time, reading no reply, until the server stops reading
/// (the socket's 3 s write timeout fires); fails if it takes `max_requests`. Returns how many
/// were sent.
fn send_until_blocked(c: &mut Raw, request: &[u8], max_requests: u64) -> u64 {
    c.s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let batch: Vec<u8> = request
        .iter()
        .copied()
        .cycle()
        .take(request.len() * 1000)
        .collect();
    let mut sent_requests = 0u64;
    let blocked = loop {
        match std::io::Write::write_all(&mut c.s, &batch) {
            Ok(()) => sent_requests += 1000,
            Err(e) => break e,
        }
        assert!(
            sent_requests < max_requests,
            "server kept accepting requests it could not answer"
        );
    };
    assert!(
        matches!(
            blocked.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "expected our sends to block, got {blocked}"
    );
    sent_requests
}

#[test]
fn client_that_never_reads_replies_gets_back_pressure_not_memory_growth() {
    let mut d = Daemon::start(DaemonOpts::new().arg("--max-inflight-mib").arg("64"));
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    c.s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    // 2 million reads of 32 MiB would be 64 TiB of replies; the server must stop reading requests
    // once 64 MiB of replies wait for this client, so our writes soon block.
    send_until_blocked(&mut c, &Raw::request_bytes(0, 0, 7, 0, 32 << 20), 2_000_000);
    let rss = rss_bytes(d.pid());
    assert!(
        rss < 512 << 20,
        "evsd grew to {} MiB buffering unread replies",
        rss >> 20
    );
    drop(c);
    assert_healthy(&mut d, "after a client that never read its replies");
}

/// The same with replies of 16 bytes (errors to an unknown command): their memory, not their
/// wire bytes, must be what the budget holds back. Charged 16 bytes each, the server queued a
/// million of them under a 16 MiB budget, some 200 MiB of memory.
#[test]
fn unread_small_replies_are_held_to_the_budget_in_memory() {
    let mut d = Daemon::start(DaemonOpts::new().arg("--max-inflight-mib").arg("16"));
    let before = rss_bytes(d.pid());
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    let sent_requests =
        send_until_blocked(&mut c, &Raw::request_bytes(0, 0x42, 7, 0, 4096), 4_000_000);
    let grown = rss_bytes(d.pid()).saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "evsd grew by {} MiB queueing {sent_requests} small unread replies",
        grown >> 20
    );
    drop(c);
    assert_healthy(&mut d, "after a client that never read its small replies");
}
