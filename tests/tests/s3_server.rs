//! The S3 test server harness (tests/src/s3.rs) on its own, without the daemon: s3s-fs starts,
//! enforces SigV4 with the test credentials, stores objects as files the harness can see, and
//! keeps them across a stop and a restart on the same port.
//!
//! The client is curl with `--aws-sigv4` (path-style URLs). The second test checks that the
//! daemon gets the server's AWS_* variables through `DaemonOpts::envs`.

use std::fs;
use std::process::Output;

use evsd_e2e::s3::{S3Server, ACCESS_KEY, BUCKET, REGION, SECRET_KEY};
use evsd_e2e::{format_output, require_tool, run_unchecked, tempdir, Daemon, DaemonOpts, Prng};

/// curl signing with SigV4 for `service` s3 in the test region, as `user:secret`.
fn curl(secret: &str, extra: &[&str], url: &str) -> Output {
    require_tool("curl");
    let sigv4 = format!("aws:amz:{REGION}:s3");
    let user = format!("{ACCESS_KEY}:{secret}");
    let mut args: Vec<&str> = vec![
        "--silent",
        "--show-error",
        "--fail",
        "--max-time",
        "30",
        "--aws-sigv4",
        &sigv4,
        "--user",
        &user,
        // curl 7.88 (bookworm) does not send this header itself; s3s requires it. curl signs it
        // and uses its value as the payload hash.
        "--header",
        "x-amz-content-sha256: UNSIGNED-PAYLOAD",
    ];
    args.extend_from_slice(extra);
    args.push(url);
    run_unchecked("curl", &args)
}

fn curl_ok(extra: &[&str], url: &str, s3: &S3Server) -> Output {
    let out = curl(SECRET_KEY, extra, url);
    assert!(
        out.status.success(),
        "{}\n--- s3s-fs output ---\n{}",
        format_output(&format!("curl {extra:?} {url}"), &out),
        s3.log()
    );
    out
}

#[test]
fn s3s_fs_put_get_list_survives_restart() {
    let mut s3 = S3Server::start();
    let dir = tempdir();
    let data = Prng::new(5).bytes(1024 * 1024 + 123);
    let src = dir.path().join("src.bin");
    fs::write(&src, &data).unwrap();

    // Nothing in the fresh bucket.
    assert_eq!(s3.object_count(""), 0, "fresh bucket is not empty");

    // PUT a nested key, GET it back.
    let key = "smoke/sub/obj.bin";
    let url = s3.http_url(key);
    curl_ok(&["--upload-file", src.to_str().unwrap()], &url, &s3);
    let got = curl_ok(&[], &url, &s3).stdout;
    assert!(
        got == data,
        "GET returned {} bytes that differ from the {} bytes PUT",
        got.len(),
        data.len()
    );

    // The harness sees the object on disk, and only it.
    assert_eq!(s3.keys(""), vec![key.to_string()]);
    assert_eq!(s3.object_count("smoke/"), 1);
    assert_eq!(s3.object_count("smoke/sub/"), 1);
    assert_eq!(s3.object_count("other/"), 0);
    assert_eq!(s3.total_bytes("smoke/"), data.len() as u64);
    assert!(
        s3.read_object(key) == data,
        "file on disk differs from the object PUT"
    );
    assert_eq!(s3.path_of(key), s3.bucket_dir().join("smoke/sub/obj.bin"));

    // ListObjectsV2 with a prefix names it. (The query is written percent-encoded: curl 7.88
    // signs it as written, and SigV4's canonical query encodes '/'.)
    let list = curl_ok(
        &[],
        &format!("{}/{BUCKET}?list-type=2&prefix=smoke%2F", s3.endpoint()),
        &s3,
    );
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        list.contains(&format!("<Key>{key}</Key>")),
        "ListObjectsV2 does not name {key}: {list}"
    );

    // SigV4 is enforced: a wrong secret is refused (curl --fail: exit 22 on HTTP >= 400).
    let bad = curl("wrong-secret", &[], &url);
    assert_eq!(
        bad.status.code(),
        Some(22),
        "a request signed with a wrong secret was not refused with an HTTP error:\n{}",
        format_output("curl with a wrong secret", &bad)
    );

    // Stopped: requests fail (connection refused = curl exit 7).
    s3.stop();
    assert!(!s3.is_running(), "s3s-fs still running after stop()");
    let down = curl(SECRET_KEY, &[], &url);
    assert_eq!(
        down.status.code(),
        Some(7),
        "GET while the server is stopped did not fail to connect:\n{}",
        format_output("curl while stopped", &down)
    );

    // Started again on the same port and root: the object is still there.
    let port = s3.port();
    s3.start_again();
    assert_eq!(s3.port(), port, "start_again changed the port");
    let got = curl_ok(&[], &url, &s3).stdout;
    assert!(got == data, "object changed across a stop and start_again");
    assert_eq!(s3.object_count(""), 1);

    // A corrupted file is served as it is (what the backup verify tests rely on).
    s3.corrupt_object(key, 4096);
    let got = curl_ok(&[], &url, &s3).stdout;
    assert_eq!(got.len(), data.len());
    assert_eq!(
        got[4096],
        data[4096] ^ 0xff,
        "corruption not visible through GET"
    );
    assert!(got[..4096] == data[..4096] && got[4097..] == data[4097..]);

    // The environment for object_store's AmazonS3Builder::from_env.
    let env = s3.env();
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("env() lacks {k}: {env:?}"))
    };
    assert_eq!(get("AWS_ENDPOINT"), format!("http://127.0.0.1:{port}"));
    assert_eq!(get("AWS_ACCESS_KEY_ID"), ACCESS_KEY);
    assert_eq!(get("AWS_SECRET_ACCESS_KEY"), SECRET_KEY);
    assert_eq!(get("AWS_REGION"), REGION);
    assert_eq!(get("AWS_ALLOW_HTTP"), "true");
    assert_eq!(s3.url("/backups/"), format!("s3://{BUCKET}/backups"));
    assert_eq!(s3.url(""), format!("s3://{BUCKET}"));
}

/// `DaemonOpts::envs(s3.env())` reaches the evsd process (read back from /proc/PID/environ),
/// on the first start and after a restart.
#[test]
fn daemon_opts_env_reaches_the_daemon() {
    let s3 = S3Server::start();
    let mut d = Daemon::start(
        DaemonOpts::new()
            .no_default_volume()
            .envs(s3.env())
            .env("EVSD_E2E_MARKER", "first")
            .env("EVSD_E2E_MARKER", "second"),
    );
    let environ = |pid: u32| -> Vec<(String, String)> {
        let raw = fs::read(format!("/proc/{pid}/environ"))
            .unwrap_or_else(|e| panic!("read /proc/{pid}/environ: {e}"));
        raw.split(|&b| b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| {
                let v = String::from_utf8_lossy(v);
                let (k, val) = v.split_once('=').unwrap_or((&v, ""));
                (k.to_string(), val.to_string())
            })
            .collect()
    };
    for round in ["first start", "after restart"] {
        let env = environ(d.pid());
        let get = |k: &str| {
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("{round}: evsd's environment lacks {k}: {env:?}"))
        };
        for (k, v) in s3.env() {
            assert_eq!(get(&k), v, "{round}: {k}");
        }
        assert_eq!(
            get("EVSD_E2E_MARKER"),
            "second",
            "{round}: the later value must win"
        );
        assert_eq!(
            get("NO_COLOR"),
            "1",
            "{round}: the harness's own variables are kept"
        );
        if round == "first start" {
            d.restart();
        }
    }
}
