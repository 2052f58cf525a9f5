//! libnbd with its own checks turned off (`set_strict_mode(0)`), so misuse reaches the server:
//! past-the-end and zero-length requests, unknown command flags, oversized reads, DF without
//! structured replies, writes to a read-only snapshot export. Each must get the spec's errno and
//! leave the connection usable.

use evsd_e2e::*;

/// Runs `cases` (python lines appending `(name, errno name or 0)` to `results`) over one libnbd
/// connection with strict mode off, then checks the connection still reads; returns the
/// results as "name errno" lines.
fn misuse(uri: &str, structured: bool, cases: &str) -> Vec<String> {
    let script = format!(
        r#"
import errno
h.set_strict_mode(0)
h.set_request_structured_replies({structured})
h.connect_uri("{uri}")
size = h.get_size()
results = []
def expect(name, fn):
    try:
        fn()
        results.append((name, 0))
    except nbd.Error as e:
        results.append((name, e.errno))
{cases}
assert h.pread(4096, 0) is not None
for name, err in results:
    print(name, err)
"#,
        structured = if structured { "True" } else { "False" },
    );
    nbdsh(&script).lines().map(str::to_owned).collect()
}

#[test]
fn misuse_gets_the_specs_errors_and_the_connection_survives() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume().volume("vol0:16M"));
    let lines = misuse(
        &d.unix_uri("vol0"),
        true,
        r#"
expect("read_past_end", lambda: h.pread(4096, size))
expect("read_straddling_end", lambda: h.pread(8192, size - 4096))
expect("write_past_end", lambda: h.pwrite(b"x" * 4096, size))
expect("zero_past_end", lambda: h.zero(4096, size))
expect("trim_past_end", lambda: h.trim(4096, size))
expect("cache_past_end", lambda: h.cache(4096, size))
expect("read_zero_length", lambda: h.pread(0, 0))
expect("write_zero_length", lambda: h.pwrite(b"", 0))
expect("read_unknown_flag", lambda: h.pread(4096, 0, flags=1 << 10))
expect("flush_unknown_flag", lambda: h.flush(flags=1 << 12))
expect("read_oversized", lambda: h.pread(64 << 20, 0))
expect("read_unaligned_ok", lambda: h.pread(3, 1))
expect("write_unaligned_ok", lambda: h.pwrite(b"abc", 4097))
"#,
    );
    let want = [
        "read_past_end EINVAL",
        "read_straddling_end EINVAL",
        "write_past_end ENOSPC",
        "zero_past_end ENOSPC",
        "trim_past_end EINVAL",
        "cache_past_end EINVAL",
        "read_zero_length EINVAL",
        "write_zero_length EINVAL",
        "read_unknown_flag EINVAL",
        "flush_unknown_flag EINVAL",
        "read_oversized EOVERFLOW",
        "read_unaligned_ok 0",
        "write_unaligned_ok 0",
    ];
    assert_eq!(lines, want);
    d.evsctl_ok(&["snapshot", "create", "vol0", "s1"]);
    // DF needs structured replies; a snapshot export refuses writes.
    let lines = misuse(
        &d.unix_uri("vol0@s1"),
        false,
        r#"
expect("read_df_simple", lambda: h.pread(4096, 0, flags=nbd.CMD_FLAG_DF))
expect("write_read_only", lambda: h.pwrite(b"x" * 4096, 0))
expect("trim_read_only", lambda: h.trim(4096, 0))
expect("zero_read_only", lambda: h.zero(4096, 0))
"#,
    );
    assert_eq!(
        lines,
        [
            "read_df_simple EINVAL",
            "write_read_only EPERM",
            "trim_read_only EPERM",
            "zero_read_only EPERM",
        ]
    );
}
