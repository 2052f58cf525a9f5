//! Data survives kill -9 (after FLUSH) and graceful shutdown (even without FLUSH).

use evsd_e2e::raw::*;
use evsd_e2e::*;

#[test]
fn flushed_writes_survive_kill9() {
    require_tool("qemu-io");
    let mut d = Daemon::start(DaemonOpts::new().with_vol0().volume("vol1:64M"));
    let uri = d.unix_uri("vol0");
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 4M",
            "write -P 0x5b 100M 1M",
            "write -z -u 1M 1M",
            "discard 2M 512k",
            "write -P 0x5c 1073737728 4096",
            "flush",
        ],
    );
    qemu_io(&d.tcp_uri("vol1"), &["write -P 0x71 60M 4M", "flush"]);
    // FUA write without a later flush must be durable too.
    let data = Prng::new(1).bytes(8192);
    {
        let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
        c.write(1, CMD_FLAG_FUA, 200 * MIB, &data);
        // no FLUSH, no DISC: kill right after the FUA reply
        d.kill9();
    }
    d.restart();
    let uri = d.unix_uri("vol0");
    qemu_io(
        &uri,
        &[
            "read -P 0x5a 0 1M",
            "read -P 0 1M 1M",
            "read -P 0 2M 512k",
            "read -P 0x5a 2621440 1572864",
            "read -P 0x5b 100M 1M",
            "read -P 0x5c 1073737728 4096",
            "read -P 0 4M 96M",
        ],
    );
    qemu_io(
        &d.tcp_uri("vol1"),
        &["read -P 0x71 60M 4M", "read -P 0 0 60M"],
    );
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    assert!(
        c.read(2, 200 * MIB, 8192) == data,
        "FUA write lost by kill -9"
    );
}

#[test]
fn unflushed_writes_survive_sigterm() {
    let mut d = Daemon::start_default();
    let mut rng = Prng::new(99);
    let blocks: Vec<(u64, Vec<u8>)> = (0..64u64)
        .map(|i| {
            (
                i * 3 * MIB + (i % 7) * 512,
                rng.bytes(4096 * (1 + (i as usize % 5))),
            )
        })
        .collect();
    // Data where the unflushed trim and zero go, flushed, so that zeroes there after the
    // restart show they were kept.
    {
        let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
        c.write(1, 0, 900 * MIB, &vec![0x6d; 2 * MIB as usize]);
        c.flush(2);
        c.disconnect();
    }
    {
        let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
        for (i, (off, b)) in blocks.iter().enumerate() {
            c.write(i as u64, 0, *off, b);
        }
        // trim and zero, no flush either
        assert_eq!(c.command(0, CMD_TRIM, 100, 900 * MIB, MIB as u32), 0);
        let zero = c.command(0, CMD_WRITE_ZEROES, 101, 901 * MIB, MIB as u32);
        assert_eq!(zero, 0);
        // leave the connection open: shutdown must cope with a live client
        d.terminate_ok();
    }
    d.restart();
    let (mut c, _) = Raw::open(d.tcp_addr(), "vol0");
    for (i, (off, b)) in blocks.iter().enumerate() {
        let got = c.read(i as u64, *off, b.len() as u32);
        assert!(
            got == *b,
            "unflushed block {i} at {off} lost across SIGTERM + restart"
        );
    }
    let trimmed_and_zeroed = c.read(200, 900 * MIB, 2 * MIB as u32);
    assert!(
        trimmed_and_zeroed.iter().all(|&b| b == 0),
        "unflushed trim or zero lost across SIGTERM + restart"
    );
    c.disconnect();
}

#[test]
fn repeated_kill9_restart_cycles() {
    require_tool("qemu-io");
    let mut d = Daemon::start_default();
    for round in 0..4u64 {
        let uri = d.tcp_uri("vol0");
        qemu_io(
            &uri,
            &[
                &format!("write -P {} {}M 1M", 0x10 + round, round * 4),
                "flush",
            ],
        );
        // daemon killed with idle clients connected
        let _idle = Raw::open(d.tcp_addr(), "vol0");
        d.kill9();
        d.restart();
        let uri = d.unix_uri("vol0");
        let cmds: Vec<String> = (0..=round)
            .map(|r| format!("read -P {} {}M 1M", 0x10 + r, r * 4))
            .collect();
        let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
        qemu_io(&uri, &refs);
    }
}

#[test]
fn created_volume_persists_and_is_not_recreated() {
    require_tool("qemu-io");
    let mut d = Daemon::start(DaemonOpts::new().volume("keep:32M"));
    qemu_io(&d.tcp_uri("keep"), &["write -P 0x33 0 32M", "flush"]);
    d.terminate_ok();
    // Restart with the same --create-volume: the existing data must stay.
    d.restart();
    qemu_io(&d.tcp_uri("keep"), &["read -P 0x33 0 32M"]);
}
