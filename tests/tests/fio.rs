//! fio's nbd engine: 4 connections, iodepth 32, random 4k read/write with
//! crc32c verification on disjoint regions.

use evsd_e2e::fio::fio;
use evsd_e2e::*;
use serde_json::Value;

fn check_jobs(v: &Value, want_jobs: usize, want_reads: bool, want_writes: bool) {
    let jobs = v["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), want_jobs, "fio jobs: {v:#}");
    let mut total_r = 0;
    let mut total_w = 0;
    for j in jobs {
        assert_eq!(j["error"].as_i64(), Some(0), "fio job error: {j:#}");
        let r = j["read"]["total_ios"].as_u64().unwrap_or(0);
        let w = j["write"]["total_ios"].as_u64().unwrap_or(0);
        if want_writes {
            assert!(w > 0, "fio job did no writes: {j:#}");
        }
        if want_reads {
            assert!(r > 0, "fio job did no reads: {j:#}");
        }
        total_r += r;
        total_w += w;
    }
    assert!(total_r + total_w > 0, "fio did no I/O at all");
}

#[test]
fn fio_randrw_verify_4_connections_tcp() {
    let d = Daemon::start_default();
    let v = fio(
        &d.tcp_uri("vol0"),
        &[
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=4",
            "--size=16m",
            "--offset_increment=16m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // fio would otherwise drop local-*-verify.state files into the working directory.
            "--verify_state_save=0",
        ],
    );
    check_jobs(&v, 4, true, true);
}

#[test]
fn fio_mixed_sizes_verify_unix() {
    let d = Daemon::start_default();
    let v = fio(
        &d.unix_uri("vol0"),
        &[
            "--rw=randwrite",
            "--bsrange=512-256k",
            "--bs_unaligned=1",
            "--iodepth=32",
            "--numjobs=2",
            "--size=24m",
            "--offset=128m",
            "--offset_increment=32m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // fio would otherwise drop local-*-verify.state files into the working directory.
            "--verify_state_save=0",
        ],
    );
    // randwrite + do_verify: the verify phase shows up as reads.
    check_jobs(&v, 2, true, true);
}

#[test]
fn fio_time_based_randrw_with_trim_and_flush() {
    let d = Daemon::start_default();
    let v = fio(
        &d.tcp_uri("vol0"),
        &[
            "--rw=randrw",
            "--rwmixread=60",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=2",
            "--size=64m",
            "--fsync=64",
            "--time_based=1",
            "--runtime=3",
        ],
    );
    check_jobs(&v, 2, true, true);
    let v = fio(
        &d.tcp_uri("vol0"),
        &[
            "--rw=randtrim",
            "--bs=64k",
            "--iodepth=16",
            "--numjobs=1",
            "--size=64m",
        ],
    );
    let j = &v["jobs"][0];
    assert_eq!(j["error"].as_i64(), Some(0), "{j:#}");
    assert!(
        j["trim"]["total_ios"].as_u64().unwrap_or(0) > 0,
        "no trims: {j:#}"
    );
}
