//! Backups against a real S3 server on loopback (s3s-fs, started per test): full and
//! incremental backups restored byte for byte with the objects where the format says, the S3
//! server killed in the middle of an upload and started again, and two daemons with separate
//! data directories sharing one store.

use std::thread;
use std::time::Duration;

use evsd_e2e::admin::*;
use evsd_e2e::backups::*;
use evsd_e2e::s3::S3Server;
use evsd_e2e::*;
use serde_json::json;

const PREFIX: &str = "evsd/site-a";

fn start_with(s3: &S3Server, extra: &[&str]) -> Daemon {
    let mut opts = DaemonOpts::new()
        .no_default_volume()
        .arg("--backup-store")
        .arg(&s3.url(PREFIX))
        .envs(s3.env());
    for a in extra {
        opts = opts.arg(a);
    }
    Daemon::start(opts)
}

#[test]
fn s3_full_and_incremental_restore_byte_identical() {
    let s3 = S3Server::start();
    let d = start_with(&s3, &[]);
    let mut model = half_random(&d, "vol0", 64 * MIB, 21);
    let a = model.clone();
    let b1 = backup_now(&d, "vol0", false);
    assert_eq!(u(&b1, "new_chunks"), 8, "{b1:#}");
    assert_eq!(s3.object_count(&format!("{PREFIX}/chunks")), 8);
    assert_eq!(s3.object_count(&format!("{PREFIX}/manifests")), 1);
    // No lock is left behind once the backup is done.
    assert_eq!(s3.object_count(&format!("{PREFIX}/locks")), 0);
    let stored: u64 = s3.total_bytes(&format!("{PREFIX}/chunks"));
    assert_eq!(stored, u(&b1, "new_stored_bytes"), "{b1:#}");

    write_at(&d, "vol0", 40 * MIB, &random(22, 4096), &mut model);
    let b2 = backup_now(&d, "vol0", false);
    assert_eq!(b2["incremental"], true, "{b2:#}");
    // Only the 4 KiB block written is read; the chunk (zeroes before) is stored as a delta
    // over zeroes.
    assert_eq!(u(&b2, "read_bytes"), 4096, "{b2:#}");
    assert_eq!(u(&b2, "new_chunks"), 1, "{b2:#}");
    assert_eq!(u(&b2, "delta_chunks"), 1, "{b2:#}");
    // The delta sits in the backup's one pack, not in an object of its own.
    assert_eq!(s3.object_count(&format!("{PREFIX}/chunks")), 8);
    assert_eq!(s3.object_count(&format!("{PREFIX}/packs")), 1);

    restore_new(&d, "r1", b1["id"].as_str().unwrap());
    restore_new(&d, "r2", b2["id"].as_str().unwrap());
    assert_same("s3 restore of b1", &read_export(&d, "r1"), &a);
    assert_same("s3 restore of b2", &read_export(&d, "r2"), &model);

    // A corrupted object is named by verify.
    let key = s3.keys(&format!("{PREFIX}/chunks"))[0].clone();
    s3.corrupt_object(&key, 100);
    let v = admin_ok(&d, "backup.verify", json!({"id": b2["id"]}));
    let j = wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
    let bad = j["result"]["bad_chunks"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{j:#}");
    assert!(
        key.ends_with(bad[0]["chunk_id"].as_str().unwrap()),
        "{key} vs {j:#}"
    );
}

#[test]
fn s3_full_backup_stores_packed_chunks_whole_and_gc_frees_what_it_no_longer_needs() {
    let s3 = S3Server::start();
    let d = start_with(&s3, &[]);
    let mut model = half_random(&d, "vol0", 32 * MIB, 24);
    let b1 = backup_now(&d, "vol0", false);
    write_at(&d, "vol0", 2 * CHUNK + 4096, &random(25, 4096), &mut model);
    let b2 = backup_now(&d, "vol0", false);
    assert_eq!(u(&b2, "delta_chunks"), 1, "a delta of b1's chunk 2: {b2:#}");
    assert_eq!(s3.object_count(&format!("{PREFIX}/packs")), 1, "b2's pack");
    // A full backup reads every chunk: the three whole ones are in the store, chunk 2, which
    // b2 keeps only as a delta in its pack, is stored whole. So after b1 and b2 are deleted,
    // GC takes b2's pack and b1's chunk 2 (the delta's base).
    let b3 = backup_now(&d, "vol0", true);
    assert_eq!(u(&b3, "new_chunks"), 1, "{b3:#}");
    for b in [&b1, &b2] {
        admin_ok(&d, "backup.delete", json!({"id": b["id"]}));
    }
    let gc = admin_ok(&d, "backup.gc", json!({}));
    assert_eq!(gc["deferred"], false, "{gc:#}");
    assert_eq!(
        s3.object_count(&format!("{PREFIX}/chunks")),
        4,
        "b3's 4 whole chunks"
    );
    assert_eq!(s3.object_count(&format!("{PREFIX}/packs")), 0, "{gc:#}");
    restore_new(&d, "r3", b3["id"].as_str().unwrap());
    assert_same("s3 restore of b3 after GC", &read_export(&d, "r3"), &model);
}

#[test]
fn s3_outage_mid_upload_then_backup_completes() {
    let mut s3 = S3Server::start();
    let d = start_with(&s3, &["--backup-rate-limit-mib-per-sec", "24"]);
    let model = half_random(&d, "vol0", 256 * MIB, 23);
    let (job_id, backup_id) = backup_start(&d, &["vol0"], false).remove(0);
    assert!(
        wait_until(Duration::from_secs(60), || u(
            &job(&d, &job_id)["progress"],
            "bytes_done"
        ) >= 32 * MIB),
        "no progress before the outage"
    );
    s3.stop();
    assert!(
        wait_until(Duration::from_secs(30), || job(&d, &job_id)["state"]
            == "retrying"),
        "the job never reported the outage: {:#}",
        job(&d, &job_id)
    );
    let during = job(&d, &job_id);
    assert!(
        during["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{during:#}"
    );
    thread::sleep(Duration::from_secs(2));
    s3.start_again();
    let j = wait_job_ok(&d, &job_id);
    assert_eq!(j["error"], serde_json::Value::Null, "{j:#}");
    let b = admin_ok(&d, "backup.show", json!({"id": backup_id}));
    assert_eq!(u(&b, "data_chunks"), 32, "{b:#}");
    assert_eq!(s3.object_count(&format!("{PREFIX}/chunks")), 32);
    restore_new(&d, "r", &backup_id);
    assert_same("restore after the outage", &read_export(&d, "r"), &model);
}

/// A backup stuck retrying a store that is gone is ended by `job.cancel`: its snapshot is
/// released, the volume's previous base stays the base, the job does not come back after a
/// restart, and the next backup is an incremental on the old base.
#[test]
fn cancel_ends_a_backup_retrying_a_dead_store() {
    let mut s3 = S3Server::start();
    let mut d = start_with(&s3, &[]);
    let mut model = half_random(&d, "vol0", 64 * MIB, 41);
    let b1 = backup_now(&d, "vol0", false);
    let b1_id = b1["id"].as_str().unwrap().to_owned();
    write_at(&d, "vol0", 3 * CHUNK, &random(42, 2 * CHUNK), &mut model);
    s3.stop();
    let (job_id, backup_id) = backup_start(&d, &["vol0"], false).remove(0);
    let snapshot = format!("vbs-{backup_id}");
    assert!(
        wait_until(Duration::from_secs(30), || job(&d, &job_id)["state"]
            == "retrying"),
        "the job never reported the dead store: {:#}",
        job(&d, &job_id)
    );
    let snapshots = || -> Vec<String> {
        admin_ok(&d, "snapshot.list", json!({"volume": "vol0"}))["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(snapshots().contains(&snapshot), "{:?}", snapshots());

    let cancelled = admin_ok(&d, "job.cancel", json!({"id": job_id}));
    assert_eq!(cancelled["state"], "cancelled", "{cancelled:#}");
    let error = cancelled["error"].as_str().unwrap();
    assert!(
        error.contains("cancelled by job.cancel") && error.contains(&snapshot),
        "{error}"
    );
    assert_eq!(
        snapshots(),
        [format!("vbs-{b1_id}")],
        "only the old base is kept"
    );
    // Once only; unknown jobs are not found.
    admin_err(&d, "job.cancel", json!({"id": job_id}), "invalid_argument");
    admin_err(
        &d,
        "job.cancel",
        json!({"id": "j-000000000000"}),
        "not_found",
    );
    // The volume is free for another backup; the cancelled one is not resumed after a restart.
    d.restart();
    admin_err(&d, "job.show", json!({"id": job_id}), "not_found");
    assert_eq!(admin_ok(&d, "job.list", json!({}))["jobs"], json!([]));

    s3.start_again();
    let b3 = backup_now(&d, "vol0", false);
    assert_eq!(b3["parent"], json!(b1_id), "{b3:#}");
    assert_eq!(b3["incremental"], true, "{b3:#}");
    assert!(
        admin(&d, "backup.show", json!({"id": backup_id})).is_err(),
        "the cancelled backup has no manifest"
    );
    restore_new(&d, "r", b3["id"].as_str().unwrap());
    assert_same("restore of the next backup", &read_export(&d, "r"), &model);
}

#[test]
fn two_daemons_share_one_store() {
    let s3 = S3Server::start();
    let a = start_with(&s3, &[]);
    let b = start_with(&s3, &[]);
    let model = half_random(&a, "vol0", 32 * MIB, 24);
    let backup = backup_now(&a, "vol0", false);
    let id = backup["id"].as_str().unwrap();
    // The other host sees it, restores it, and verifies it.
    let listed = admin_ok(&b, "backup.list", json!({}));
    assert_eq!(listed["backups"][0]["id"], backup["id"], "{listed:#}");
    assert_eq!(listed["backups"][0]["volume"], "vol0", "{listed:#}");
    restore_new(&b, "vol0", id);
    assert_same(
        "restored on the other daemon",
        &read_export(&b, "vol0"),
        &model,
    );
    // Host B's own backup of the restored volume dedups against A's chunks.
    let again = backup_now(&b, "vol0", false);
    assert_eq!(u(&again, "new_chunks"), 0, "{again:#}");
    // A deletion on B is seen by A; GC keeps the chunks B's backup still uses.
    let r = admin_ok(&b, "backup.delete", json!({"id": id}));
    assert_eq!(r["gc"]["chunks_deleted"], 0, "{r:#}");
    let listed = admin_ok(&a, "backup.list", json!({}));
    let ids: Vec<&str> = listed["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![again["id"].as_str().unwrap()], "{listed:#}");
}

/// Credentials the store turns down are no outage to wait out: the job fails at once, naming
/// the refusal, and releases its snapshot, instead of retrying for good.
#[test]
fn a_backup_with_credentials_the_store_refuses_fails_at_once() {
    let s3 = S3Server::start();
    let opts = DaemonOpts::new()
        .no_default_volume()
        .arg("--backup-store")
        .arg(&s3.url(PREFIX))
        .envs(s3.env())
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let d = Daemon::start(opts);
    half_random(&d, "vol0", 16 * MIB, 51);
    let (job_id, backup_id) = backup_start(&d, &["vol0"], false).remove(0);
    assert!(
        wait_until(Duration::from_secs(20), || {
            let state = job(&d, &job_id)["state"].clone();
            state != "running" && state != "retrying"
        }),
        "still trying after 20 s: {:#}",
        job(&d, &job_id)
    );
    let j = job(&d, &job_id);
    assert_eq!(j["state"], "failed", "{j:#}");
    let error = j["error"].as_str().unwrap();
    assert!(
        error.contains("403") || error.contains("SignatureDoesNotMatch"),
        "{error}"
    );
    let snapshots = admin_ok(&d, "snapshot.list", json!({"volume": "vol0"}))["snapshots"].clone();
    assert!(
        !snapshots.to_string().contains(&backup_id),
        "its snapshot was kept: {snapshots:#}"
    );
}
