//! nbdcopy with 4 connections in both directions over a 256 MiB volume.

use evsd_e2e::*;

fn roundtrip(uri_of: impl Fn(&Daemon) -> String) {
    require_tool("nbdcopy");
    let d = Daemon::start(
        DaemonOpts::new()
            .volume("vol1:256M")
            .metrics_listen("127.0.0.1:0"),
    );
    let uri = uri_of(&d);
    let tmp = tempdir();
    let src = tmp.path().join("src.img");
    let out = tmp.path().join("out.img");
    write_random_file(&src, 256 * MIB);
    let accepted = || {
        let metrics = d.metrics_addr().expect("metrics address");
        let text = evsd_e2e::metrics::scrape(metrics);
        evsd_e2e::metrics::value(&text, "evsd_connections_accepted_total")
    };
    let before = accepted();
    run(
        "nbdcopy",
        &["-C", "4", "-T", "4", "--flush", src.to_str().unwrap(), &uri],
    );
    let after_in = accepted();
    run(
        "nbdcopy",
        &["-C", "4", "-T", "4", &uri, out.to_str().unwrap()],
    );
    let after_out = accepted();
    assert_files_equal(&src, &out);
    // nbdcopy drops to one connection where multi-conn is not offered (and uses no more
    // connections than threads, hence -T 4 on a 2-core machine).
    assert!(
        after_in - before >= 4.0 && after_out - after_in >= 4.0,
        "nbdcopy -C 4 made {} and {} connections",
        after_in - before,
        after_out - after_in
    );
}

#[test]
fn nbdcopy_256m_roundtrip_tcp() {
    roundtrip(|d| d.tcp_uri("vol1"));
}

#[test]
fn nbdcopy_256m_roundtrip_unix_after_restart() {
    require_tool("nbdcopy");
    let mut d = Daemon::start(DaemonOpts::new().volume("vol1:256M"));
    let tmp = tempdir();
    let src = tmp.path().join("src.img");
    let out = tmp.path().join("out.img");
    write_random_file(&src, 256 * MIB);
    run(
        "nbdcopy",
        &[
            "-C",
            "4",
            "-T",
            "4",
            "-R",
            "32",
            "--flush",
            src.to_str().unwrap(),
            &d.unix_uri("vol1"),
        ],
    );
    d.restart();
    run(
        "nbdcopy",
        &[
            "-C",
            "4",
            "-T",
            "4",
            &d.unix_uri("vol1"),
            out.to_str().unwrap(),
        ],
    );
    assert_files_equal(&src, &out);
}

/// A sparse source: nbdcopy zeroes/trims the holes on the destination
/// (WRITE_ZEROES / fast-zero paths) and the result must still match.
#[test]
fn nbdcopy_sparse_source_over_dirty_volume() {
    require_tool("nbdcopy");
    require_tool("qemu-io");
    let d = Daemon::start(DaemonOpts::new().volume("vol1:64M"));
    let uri = d.tcp_uri("vol1");
    // Dirty the whole volume first so holes in the source must be zeroed.
    qemu_io(&uri, &["write -P 0xee 0 64M", "flush"]);
    let tmp = tempdir();
    let src = tmp.path().join("sparse.img");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&src).unwrap();
        f.set_len(64 * MIB).unwrap();
        let mut rng = Prng::new(7);
        for i in [0u64, 3, 10, 31, 63] {
            f.seek(SeekFrom::Start(i * MIB)).unwrap();
            f.write_all(&rng.bytes(MIB as usize)).unwrap();
        }
    }
    run(
        "nbdcopy",
        &["-C", "4", "-T", "4", src.to_str().unwrap(), &uri],
    );
    let out = tmp.path().join("out.img");
    run("nbdcopy", &[&uri, out.to_str().unwrap()]);
    assert_files_equal(&src, &out);
}
