//! nbdinfo: advertised features, block sizes, contexts, --map, --list.

use evsd_e2e::*;
use serde_json::Value;

fn info_json(uri: &str) -> Value {
    let out = run_stdout("nbdinfo", &["--json", uri]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json: {e}\n{out}"))
}

fn check_export_features(v: &Value, uri: &str, size: u64) {
    assert_eq!(v["protocol"], "newstyle-fixed", "{uri}: {v:#}");
    assert_eq!(v["TLS"], false, "{uri}: {v:#}");
    assert_eq!(
        v["structured"], true,
        "{uri}: structured replies not negotiated: {v:#}"
    );
    let e = &v["exports"][0];
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[flag], true, "{uri}: {flag} should be true: {e:#}");
    }
    assert_eq!(e["is_read_only"], false, "{uri}: {e:#}");
    assert_eq!(e["is_rotational"], false, "{uri}: {e:#}");
    assert_eq!(e["export-size"].as_u64(), Some(size), "{uri}: size {e:#}");
    let ctx: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap_or_else(|| panic!("{uri}: no contexts: {e:#}"))
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        ctx.contains(&"base:allocation"),
        "{uri}: base:allocation missing from {ctx:?}"
    );
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{uri}: {e:#}");
    assert_eq!(
        e["block_size_preferred"].as_u64(),
        Some(4096),
        "{uri}: {e:#}"
    );
    assert_eq!(
        e["block_size_maximum"].as_u64(),
        Some(32 * MIB),
        "{uri}: {e:#}"
    );
}

#[test]
fn nbdinfo_json_features_tcp_and_unix() {
    require_tool("nbdinfo");
    let d = Daemon::start_default();
    for uri in [d.tcp_uri("vol0"), d.unix_uri("vol0")] {
        let v = info_json(&uri);
        check_export_features(&v, &uri, GIB);
    }
}

#[test]
fn nbdinfo_can_and_is_exit_codes() {
    require_tool("nbdinfo");
    let d = Daemon::start_default();
    let uri = d.unix_uri("vol0");
    for cap in [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "multi-conn",
        "cache",
        "df",
        "structured-reply",
    ] {
        let out = run_unchecked("nbdinfo", &["--can", cap, &uri]);
        assert!(
            out.status.success(),
            "{}",
            format_output(&format!("nbdinfo --can {cap} (expected true)"), &out)
        );
    }
    for is in ["read-only", "rotational", "tls"] {
        let out = run_unchecked("nbdinfo", &["--is", is, &uri]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            format_output(
                &format!("nbdinfo --is {is} (expected false = exit 2)"),
                &out
            )
        );
    }
}

#[test]
fn nbdinfo_list_shows_created_volumes() {
    require_tool("nbdinfo");
    let d = Daemon::start(
        DaemonOpts::new()
            .with_vol0()
            .volume("alpha:16M")
            .volume("beta:1G")
            // 12345 x 4096: not a power of two (evsd sizes are multiples of 4096)
            .volume("gamma:50565120"),
    );
    let expect = [
        ("vol0", GIB),
        ("alpha", 16 * MIB),
        ("beta", GIB),
        ("gamma", 50565120),
    ];
    for base in [
        format!("nbd://{}", d.tcp_addr()),
        format!("nbd+unix:///?socket={}", d.unix_path().display()),
    ] {
        let out = run_stdout("nbdinfo", &["--list", "--json", &base]);
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
        let exports = v["exports"].as_array().expect("exports array");
        assert_eq!(exports.len(), expect.len(), "nbdinfo --list {base}: {v:#}");
        for (name, size) in expect {
            let e = exports
                .iter()
                .find(|e| e["export-name"] == name)
                .unwrap_or_else(|| panic!("export {name} not listed: {v:#}"));
            assert_eq!(e["export-size"].as_u64(), Some(size), "{name}: {e:#}");
        }
    }
    // Plain-text listing too.
    let out = run_stdout("nbdinfo", &["--list", &format!("nbd://{}", d.tcp_addr())]);
    for (name, _) in expect {
        assert!(
            out.contains(&format!("export=\"{name}\"")),
            "{name} not in nbdinfo --list output:\n{out}"
        );
    }
}

#[test]
fn default_volume_is_vol0_of_1g() {
    require_tool("nbdinfo");
    let d = Daemon::start_default();
    let out = run_stdout(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://{}", d.tcp_addr())],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let exports = v["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 1, "{v:#}");
    assert_eq!(exports[0]["export-name"], "vol0", "{v:#}");
    assert_eq!(exports[0]["export-size"].as_u64(), Some(GIB), "{v:#}");
}

#[test]
fn no_default_volume_lists_only_created() {
    require_tool("nbdinfo");
    let d = Daemon::start(DaemonOpts::new().no_default_volume().volume("only:8M"));
    let out = run_stdout(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://{}", d.tcp_addr())],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["only"], "{v:#}");
}

#[derive(Debug, Clone, Copy)]
struct Extent {
    offset: u64,
    length: u64,
    typ: u64,
}

fn map(uri: &str) -> Vec<Extent> {
    let out = run_stdout("nbdinfo", &["--map", "--json", uri]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
    let ext: Vec<Extent> = v
        .as_array()
        .expect("map array")
        .iter()
        .map(|e| Extent {
            offset: e["offset"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            typ: e["type"].as_u64().unwrap(),
        })
        .collect();
    // The map must tile the whole export.
    let mut pos = 0;
    for e in &ext {
        assert_eq!(e.offset, pos, "map has a gap/overlap at {pos}: {ext:?}");
        assert!(e.length > 0, "zero-length extent {e:?}");
        pos += e.length;
    }
    ext
}

/// All extents overlapping [off, off+len) — asserted against `pred`.
fn assert_range(ext: &[Extent], off: u64, len: u64, what: &str, pred: impl Fn(u64) -> bool) {
    let mut seen = 0;
    for e in ext {
        let s = e.offset.max(off);
        let t = (e.offset + e.length).min(off + len);
        if s < t {
            seen += t - s;
            assert!(
                pred(e.typ),
                "{what}: range {off}+{len} has extent {e:?} with unexpected type {} \
                 (0=data, 1=hole, 2=zero, 3=hole,zero)\nfull map: {ext:?}",
                e.typ
            );
        }
    }
    assert_eq!(seen, len, "{what}: map does not cover {off}+{len}");
}

#[test]
fn nbdinfo_map_tracks_writes_trims_and_zeroes() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    let d = Daemon::start(DaemonOpts::new().volume("m:64M"));
    let uri = d.unix_uri("m");

    // Fresh sparse volume: all hole+zero.
    let ext = map(&uri);
    assert_range(&ext, 0, 64 * MIB, "fresh volume", |t| t == 3);

    qemu_io(
        &uri,
        &[
            "write -P 0x41 0 1M",
            "write -P 0x42 4M 4M",
            "write -P 0x43 16M 2M",
            "write -P 0x44 24M 1M",
            "write -P 0x45 60M 4M",
            "flush",
            // punch the middle of the 4M..8M data region
            "discard 5M 2M",
            // zero with unmap allowed, zero with NO_HOLE
            "write -z -u 16M 1M",
            "write -z 24M 1M",
            "flush",
        ],
    );
    let ext = map(&uri);
    assert_range(&ext, 0, MIB, "written 0..1M", |t| t == 0);
    assert_range(&ext, MIB, 3 * MIB, "never written 1M..4M", |t| t == 3);
    assert_range(&ext, 4 * MIB, MIB, "written 4M..5M", |t| t == 0);
    assert_range(&ext, 5 * MIB, 2 * MIB, "discarded 5M..7M", |t| t == 3);
    assert_range(&ext, 7 * MIB, MIB, "written 7M..8M", |t| t == 0);
    assert_range(&ext, 8 * MIB, 8 * MIB, "never written 8M..16M", |t| t == 3);
    assert_range(&ext, 16 * MIB, MIB, "zeroed with unmap 16M..17M", |t| {
        t & 2 != 0
    });
    assert_range(&ext, 17 * MIB, MIB, "written 17M..18M", |t| t == 0);
    // NO_HOLE zeroing: must read as zero; the map may say data or zero but
    // never "hole without zero" (undefined contents).
    assert_range(&ext, 24 * MIB, MIB, "zeroed (NO_HOLE) 24M..25M", |t| {
        t == 0 || t & 2 != 0
    });
    assert_range(&ext, 25 * MIB, 35 * MIB, "never written 25M..60M", |t| {
        t == 3
    });
    assert_range(&ext, 60 * MIB, 4 * MIB, "written 60M..64M", |t| t == 0);

    // The contents agree with the map.
    qemu_io(
        &uri,
        &[
            "read -P 0x41 0 1M",
            "read -P 0 1M 3M",
            "read -P 0x42 4M 1M",
            "read -P 0 5M 2M",
            "read -P 0x42 7M 1M",
            "read -P 0 16M 1M",
            "read -P 0x43 17M 1M",
            "read -P 0 24M 1M",
            "read -P 0x45 60M 4M",
        ],
    );

    // Rewriting a discarded range makes it data again; the map survives a restart.
    qemu_io(&uri, &["write -P 0x46 5M 1M", "flush"]);
    let mut d = d;
    d.restart();
    let uri = d.unix_uri("m");
    let ext = map(&uri);
    assert_range(&ext, 5 * MIB, MIB, "rewritten 5M..6M after restart", |t| {
        t == 0
    });
    assert_range(&ext, 6 * MIB, MIB, "discarded 6M..7M after restart", |t| {
        t == 3
    });
    assert_range(&ext, 0, MIB, "written 0..1M after restart", |t| t == 0);
    assert_range(&ext, 8 * MIB, 8 * MIB, "never written after restart", |t| {
        t == 3
    });
}

#[test]
fn nbdinfo_unknown_export_fails() {
    require_tool("nbdinfo");
    let d = Daemon::start_default();
    let out = run_unchecked("nbdinfo", &[&d.tcp_uri("no-such-volume")]);
    assert!(
        !out.status.success(),
        "{}",
        format_output("nbdinfo on an unknown export should fail", &out)
    );
    // daemon unaffected
    let v = info_json(&d.tcp_uri("vol0"));
    assert_eq!(v["exports"][0]["export-size"].as_u64(), Some(GIB));
}
