//! qemu-img / qemu-io against evsd (qemu 10 negotiates extended headers).

use evsd_e2e::*;

fn tools() {
    require_tool("qemu-img");
    require_tool("qemu-io");
}

fn img_info(uri: &str) -> serde_json::Value {
    let out = run_stdout("qemu-img", &["info", "--output=json", uri]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img info JSON: {e}\n{out}"))
}

#[test]
fn qemu_img_info_reports_volume_sizes() {
    tools();
    let d = Daemon::start(
        DaemonOpts::new()
            .with_vol0()
            .volume("vol1:256M")
            .volume("small:1536K"),
    );
    for (export, size) in [("vol0", GIB), ("vol1", 256 * MIB), ("small", 1536 * KIB)] {
        for uri in [d.tcp_uri(export), d.unix_uri(export)] {
            let v = img_info(&uri);
            assert_eq!(
                v["virtual-size"].as_u64(),
                Some(size),
                "qemu-img info {uri}: virtual-size, full output {v}"
            );
        }
    }
}

#[test]
fn qemu_img_convert_and_compare_64m() {
    tools();
    let d = Daemon::start(DaemonOpts::new().volume("img:64M"));
    let tmp = tempdir();
    let src = tmp.path().join("src.raw");
    write_random_file(&src, 64 * MIB);
    let src_s = src.to_str().unwrap();
    let uri = d.tcp_uri("img");
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    );
    // Compare over both transports; qemu-img compare exits 1 on a mismatch.
    for u in [uri.clone(), d.unix_uri("img")] {
        let out = run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", src_s, &u],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Images are identical"),
            "qemu-img compare: {text}"
        );
    }
    // And back to a local file, byte for byte.
    let back = tmp.path().join("back.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            back.to_str().unwrap(),
        ],
    );
    assert_files_equal(&src, &back);
}

fn pattern_sequence(uri: &str) {
    qemu_io(
        uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0xcd 1M 1M",
            "write -P 0xef 2M 1M",
            "write -P 0x11 3M 1M",
            "flush",
            "read -P 0xcd 1M 1M",
            // zero without unmap (NO_HOLE), zero with unmap, discard
            "write -z 1M 1M",
            "write -z -u 2M 1M",
            "discard 3M 1M",
            "flush",
            "read -P 0 1M 1M",
            "read -P 0 2M 1M",
            "read -P 0 3M 1M",
            "read -P 0xab 0 1M",
            // unaligned, sub-block I/O
            "write -P 0x5a 20975617 3000",
            "read -P 0x5a 20975617 3000",
            "read -P 0 20M 4097",
            "read -P 0 20978617 1000",
            // FUA write
            "write -f -P 0x77 8M 64k",
            "read -P 0x77 8M 64k",
            // zero and discard of partial blocks
            "write -P 0x66 12M 64k",
            "write -z 12M 100",
            "read -P 0 12M 100",
            "read -P 0x66 12583012 65436",
            // near the end of the volume
            "write -P 0x99 1073741312 512",
            "read -P 0x99 1073741312 512",
            "flush",
        ],
    );
    // A second process must see the same data (nothing only in a client cache).
    qemu_io(
        uri,
        &[
            "read -P 0xab 0 1M",
            "read -P 0 1M 3M",
            "read -P 0x5a 20975617 3000",
            "read -P 0x77 8M 64k",
            "read -P 0 12M 100",
            "read -P 0x99 1073741312 512",
        ],
    );
}

#[test]
fn qemu_io_patterns_zero_discard_flush_tcp() {
    tools();
    let d = Daemon::start_default();
    pattern_sequence(&d.tcp_uri("vol0"));
}

#[test]
fn qemu_io_patterns_zero_discard_flush_unix() {
    tools();
    let d = Daemon::start_default();
    pattern_sequence(&d.unix_uri("vol0"));
}

/// Many requests in flight from one connection: exercises pipelining and
/// out-of-order replies. Every read checks its own pattern.
#[test]
fn qemu_io_aio_bursts() {
    tools();
    let d = Daemon::start_default();
    let uri = d.tcp_uri("vol0");
    let mut cmds: Vec<String> = Vec::new();
    // 64 x 64 KiB writes, then 16 x 1 MiB writes, interleaved, distinct patterns.
    for i in 0..64u64 {
        cmds.push(format!("aio_write -P {} {} 64k", 1 + i, i * 64 * 1024));
        if i % 4 == 0 {
            let j = i / 4;
            cmds.push(format!(
                "aio_write -P {} {} 1M",
                100 + j,
                16 * MIB + j * MIB
            ));
        }
    }
    // small writes at odd offsets
    for i in 0..32u64 {
        cmds.push(format!(
            "aio_write -P {} {} 512",
            200 + i,
            64 * MIB + i * 4096 + 7
        ));
    }
    // Data where the zero and discard go, so that reading zeroes there proves they ran.
    cmds.push("aio_write -P 0x5e 48M 2M".into());
    cmds.push("aio_flush".into());
    // zero / discard in flight together with reads
    cmds.push("aio_write -z 48M 1M".into());
    cmds.push("discard 49M 1M".into());
    for i in (0..64u64).rev() {
        cmds.push(format!("aio_read -P {} {} 64k", 1 + i, i * 64 * 1024));
    }
    for j in 0..16u64 {
        cmds.push(format!("aio_read -P {} {} 1M", 100 + j, 16 * MIB + j * MIB));
    }
    for i in 0..32u64 {
        cmds.push(format!(
            "aio_read -P {} {} 512",
            200 + i,
            64 * MIB + i * 4096 + 7
        ));
    }
    cmds.push("aio_flush".into());
    cmds.push("aio_read -P 0 48M 2M".into());
    // mixed sizes on top of each other: later write wins after a flush
    cmds.push("aio_flush".into());
    cmds.push("aio_write -P 0x21 80M 256k".into());
    cmds.push("aio_flush".into());
    cmds.push("aio_write -P 0x22 80M 4k".into());
    cmds.push("aio_flush".into());
    cmds.push("aio_read -P 0x22 80M 4k".into());
    cmds.push("aio_read -P 0x21 81924k 252k".into());
    cmds.push("aio_flush".into());
    let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    let out = qemu_io(&uri, &refs);
    let reads = out.lines().filter(|l| l.starts_with("read ")).count();
    assert_eq!(
        reads,
        64 + 16 + 32 + 1 + 2,
        "not every aio_read completed:\n{out}"
    );
    let writes = out.lines().filter(|l| l.starts_with("wrote ")).count();
    assert_eq!(
        writes,
        64 + 16 + 32 + 1 + 1 + 2,
        "not every aio_write completed:\n{out}"
    );
}

fn engine_roundtrip(engine: &str) {
    tools();
    let d = Daemon::start(DaemonOpts::new().io_engine(engine));
    let uri = d.unix_uri("vol0");
    qemu_io(
        &uri,
        &[
            "write -P 0x3c 0 4M",
            "aio_write -P 0x3d 4M 1M",
            "aio_write -P 0x3e 5M 1M",
            "aio_flush",
            "write -z -u 1M 1M",
            "flush",
            "read -P 0x3c 0 1M",
            "read -P 0 1M 1M",
            "read -P 0x3c 2M 2M",
            "read -P 0x3d 4M 1M",
            "read -P 0x3e 5M 1M",
        ],
    );
}

#[test]
fn io_engine_threads_roundtrip() {
    engine_roundtrip("threads");
}

#[test]
fn io_engine_uring_roundtrip() {
    engine_roundtrip("uring");
}

fn qemu_version() -> (u32, u32) {
    let out = run_stdout("qemu-io", &["--version"]);
    // "qemu-io version 10.0.2 (Debian ...)"
    let v = out
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .unwrap_or_else(|| panic!("cannot parse qemu-io --version: {out}"));
    let mut it = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// qemu >= 8.2 asks for extended headers first; evsd must accept them, and
/// the I/O must then run with extended replies. (Older qemu falls back to
/// structured replies, which is checked instead.)
#[test]
fn qemu_negotiates_extended_headers() {
    tools();
    let d = Daemon::start_default();
    let uri = d.unix_uri("vol0");
    let out = run(
        "qemu-io",
        &[
            "--trace",
            "nbd_*",
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x61 0 64k",
            "-c",
            "read -P 0x61 0 64k",
        ],
    );
    let trace = String::from_utf8_lossy(&out.stderr);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("read 65536/65536") && !text.contains("failed"),
        "qemu-io output: {text}"
    );
    // An older qemu would not ask for extended headers, and the test would check nothing
    // of them: it fails instead of skipping (install qemu-utils >= 8.2, on bookworm from
    // bookworm-backports).
    assert!(
        qemu_version() >= (8, 2),
        "qemu {:?} < 8.2 does not negotiate extended headers: install qemu-utils >= 8.2",
        qemu_version()
    );
    assert!(
        trace.contains("Received option reply 11 (extended headers), type 1 (ack)"),
        "qemu did not get extended headers acked:\n{trace}"
    );
    assert!(
        trace.contains("base:allocation"),
        "qemu did not negotiate base:allocation:\n{trace}"
    );
}
