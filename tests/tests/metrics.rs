//! The Prometheus endpoint: counters checked against known I/O, connection accounting,
//! handshake failures by reason, and `--metrics-listen off`.

use std::net::SocketAddr;
use std::time::Duration;

use evsd_e2e::admin::admin_ok;
use evsd_e2e::metrics::{scrape, value};
use evsd_e2e::raw::*;
use evsd_e2e::*;

const MIB: f64 = (1u64 << 20) as f64;

fn vol(name: &str, volume: &str, kind: &str) -> String {
    format!("{name}{{volume=\"{volume}\",kind=\"{kind}\"}}")
}

fn metrics_addr(d: &Daemon) -> SocketAddr {
    d.metrics_addr()
        .expect("ready file has no metrics address although --metrics-listen was given")
}

#[test]
fn counters_match_known_io() {
    require_tool("qemu-io");
    let d = Daemon::start(DaemonOpts::new().no_default_volume().volume("m1:256M"));
    let addr = metrics_addr(&d);
    let before = scrape(addr);
    let accepted_before = value(&before, "evsd_connections_accepted_total");

    qemu_io(
        &d.tcp_uri("m1"),
        &["write -P 0x5a 0 64M", "read -P 0x5a 0 16M", "flush"],
    );

    let after = scrape(addr);
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        delta(&vol("evsd_volume_bytes_total", "m1", "write")),
        64.0 * MIB,
        "write bytes\n{after}"
    );
    assert_eq!(
        delta(&vol("evsd_volume_bytes_total", "m1", "read")),
        16.0 * MIB,
        "read bytes\n{after}"
    );
    assert!(
        delta(&vol("evsd_volume_operations_total", "m1", "flush")) >= 1.0,
        "flush ops\n{after}"
    );
    // 32 MiB is the largest payload, so 64 MiB took at least two writes.
    assert!(delta(&vol("evsd_volume_operations_total", "m1", "write")) >= 2.0);
    assert_eq!(delta(&vol("evsd_volume_errors_total", "m1", "write")), 0.0);
    assert_eq!(
        value(
            &after,
            &vol("evsd_volume_request_latency_seconds_count", "m1", "write")
        ),
        value(&after, &vol("evsd_volume_operations_total", "m1", "write"))
    );
    assert!(value(&after, "evsd_connections_accepted_total") >= accepted_before + 1.0);
    // qemu-io has disconnected: nothing attached, nothing in flight.
    assert!(wait_until(Duration::from_secs(5), || {
        let now = scrape(addr);
        value(&now, "evsd_volume_connections{volume=\"m1\"}") == 0.0
            && value(&now, "evsd_volume_requests_in_flight{volume=\"m1\"}") == 0.0
    }));
}

#[test]
fn handshake_failure_is_counted_with_its_reason() {
    let d = Daemon::start_default();
    let addr = metrics_addr(&d);
    let series = "evsd_handshake_failures_total{reason=\"bad_client_flags\"}";
    assert_eq!(value(&scrape(addr), series), 0.0);
    let mut c = Raw::connect(d.tcp_addr());
    c.read_greeting();
    c.send(&0x8000_0001u32.to_be_bytes());
    c.expect_closed("unknown client flags");
    assert!(
        wait_until(Duration::from_secs(5), || value(&scrape(addr), series)
            == 1.0),
        "{}",
        scrape(addr)
    );
}

#[test]
fn refused_connection_is_counted() {
    let d = Daemon::start(DaemonOpts::new().max_connections(1));
    let addr = metrics_addr(&d);
    let series = "evsd_connections_refused_total{reason=\"limit\"}";
    // Holds the only slot while it sits in the handshake.
    let _holder = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    let mut refused = Raw::connect(d.tcp_addr());
    refused.expect_closed("connection over --max-connections 1");
    assert!(
        wait_until(Duration::from_secs(5), || value(&scrape(addr), series)
            == 1.0),
        "{}",
        scrape(addr)
    );
    assert_eq!(value(&scrape(addr), "evsd_connections_accepted_total"), 1.0);
}

#[test]
fn metrics_listen_off_has_no_listener() {
    let d = Daemon::start(DaemonOpts::new().metrics_listen("off"));
    assert_eq!(d.metrics_addr(), None);
    // The daemon still serves NBD.
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    assert!(c.list().contains(&"vol0".to_string()));
}

/// A deleted volume's series, and its snapshot exports', stop being exported: a daemon that
/// makes and deletes volumes all day would otherwise carry every name it ever served.
#[test]
fn deleted_volumes_leave_no_series() {
    require_tool("qemu-io");
    let d = Daemon::start(
        DaemonOpts::new()
            .no_default_volume()
            .volume("kept:16M")
            .volume("short:16M"),
    );
    let addr = metrics_addr(&d);
    qemu_io(&d.tcp_uri("kept"), &["write -P 0x11 0 64k"]);
    qemu_io(&d.tcp_uri("short"), &["write -P 0x22 0 64k"]);
    admin_ok(
        &d,
        "snapshot.create",
        serde_json::json!({"volume": "short", "name": "s"}),
    );
    qemu_io_read_only(&d.tcp_uri("short@s"), &["read -P 0x22 0 64k"]);
    let before = scrape(addr);
    assert_eq!(
        value(&before, &vol("evsd_volume_bytes_total", "short", "write")),
        65536.0
    );
    assert_eq!(
        value(&before, &vol("evsd_volume_bytes_total", "short@s", "read")),
        65536.0
    );

    admin_ok(&d, "volume.delete", serde_json::json!({"name": "short"}));
    let after = scrape(addr);
    assert!(!after.contains("volume=\"short\""), "{after}");
    assert!(!after.contains("volume=\"short@s\""), "{after}");
    assert_eq!(
        value(&after, &vol("evsd_volume_bytes_total", "kept", "write")),
        65536.0
    );

    // Made again under the same name, it counts from zero.
    admin_ok(
        &d,
        "volume.create",
        serde_json::json!({"name": "short", "size": "16M"}),
    );
    qemu_io(&d.tcp_uri("short"), &["write -P 0x33 0 4k"]);
    let again = scrape(addr);
    assert_eq!(
        value(&again, &vol("evsd_volume_bytes_total", "short", "write")),
        4096.0
    );
}

/// Large WRITEs from a TCP client are copied into the page cache by its connection's thread;
/// a Unix socket's go to the I/O engine. The counter tells them apart, and both land. Assumes
/// the data dir is on ext4, as on CI: there the copies are plain blocking writes that only a
/// run of slow ones pauses, and nothing before this write was slow. (Where the filesystem has
/// non-blocking buffered writes, a piece it would block on goes to the engine.)
#[test]
fn large_tcp_writes_are_copied_by_their_connection_thread() {
    require_tool("qemu-io");
    let d = Daemon::start(DaemonOpts::new().no_default_volume().volume("lw:64M"));
    let addr = metrics_addr(&d);
    let copied = |text: &str| {
        value(
            text,
            "evsd_io_large_write_bytes_copied_by_connections_total",
        )
    };
    let before = scrape(addr);
    assert!(
        before.contains("evsd_io_large_write_bytes_copied_by_connections_total "),
        "the counter is not exported"
    );
    qemu_io(&d.unix_uri("lw"), &["write -P 0x11 0 8M", "flush"]);
    let after_unix = scrape(addr);
    assert_eq!(
        copied(&after_unix),
        copied(&before),
        "a Unix client's large write was copied by its connection thread"
    );
    qemu_io(&d.tcp_uri("lw"), &["write -P 0x22 8M 8M", "flush"]);
    let after_tcp = scrape(addr);
    let delta = copied(&after_tcp) - copied(&after_unix);
    // All of it unless slow writes paused copying part-way (the engine then takes the rest);
    // at least the first piece.
    assert!(
        (MIB / 8.0..=8.0 * MIB).contains(&delta),
        "a TCP client's 8 MiB write: {delta} bytes counted as copied by its connection thread"
    );
    qemu_io(
        &d.unix_uri("lw"),
        &["read -P 0x11 0 8M", "read -P 0x22 8M 8M"],
    );
}
