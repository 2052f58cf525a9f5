//! nbdcopy with 4 connections in both directions over a 256 MiB volume.

use evsd_e2e::*;

fn roundtrip(uri_of: impl Fn(&Daemon) -> String) {
    require_tool("nbdcopy");
    let d = Daemon::start(DaemonOpts::new().volume("vol1:256M"));
    let uri = uri_of(&d);
    let tmp = tempdir();
    let src = tmp.path().join("src.img");
    let out = tmp.path().join("out.img");
    write_random_file(&src, 256 * MIB);
    run(
        "nbdcopy",
        &["-C", "4", "--flush", src.to_str().unwrap(), &uri],
    );
    run("nbdcopy", &["-C", "4", &uri, out.to_str().unwrap()]);
    assert_files_equal(&src, &out);
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
        &["-C", "4", &d.unix_uri("vol1"), out.to_str().unwrap()],
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
    run("nbdcopy", &["-C", "4", src.to_str().unwrap(), &uri]);
    let out = tmp.path().join("out.img");
    run("nbdcopy", &[&uri, out.to_str().unwrap()]);
    assert_files_equal(&src, &out);
}
