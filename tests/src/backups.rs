//! Backup helpers shared by the backup end-to-end tests: volumes filled with known data,
//! backups and restores driven through the admin socket, jobs waited for.

use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::admin::admin_ok;
use crate::raw::Raw;
use crate::{Daemon, DaemonOpts, Prng, MIB};

/// The backup chunk size.
pub const CHUNK: u64 = 4 * MIB;
pub const JOB_TIMEOUT: Duration = Duration::from_secs(180);

pub fn start() -> Daemon {
    Daemon::start(DaemonOpts::new().no_default_volume())
}

pub fn create_volume(d: &Daemon, name: &str, size: u64) {
    let v = admin_ok(d, "volume.create", json!({"name": name, "size": size}));
    assert_eq!(v["size_bytes"], json!(size), "{v:#}");
}

/// Writes `data` at `offset` over one NBD connection and flushes; mirrors it into `model`.
/// Returns once the daemon has let the connection go: a restore in place right after would
/// otherwise find the volume still busy with it.
pub fn write_at(d: &Daemon, vol: &str, offset: u64, data: &[u8], model: &mut [u8]) {
    let before = crate::admin::connections(d, vol);
    let (mut raw, _) = Raw::open(d.tcp_addr(), vol);
    for (i, piece) in data.chunks(MIB as usize).enumerate() {
        raw.write(i as u64 + 1, 0, offset + i as u64 * MIB, piece);
    }
    raw.flush(0xf1);
    raw.disconnect();
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    crate::admin::wait_clients_at_most(d, vol, before);
}

pub fn random(seed: u64, len: u64) -> Vec<u8> {
    Prng::new(seed).bytes(len as usize)
}

/// Starts backups of `vols`; returns (job id, backup id) per volume.
pub fn backup_start(d: &Daemon, vols: &[&str], full: bool) -> Vec<(String, String)> {
    let v = admin_ok(d, "backup.create", json!({"volumes": vols, "full": full}));
    let jobs = v["jobs"].as_array().unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(jobs.len(), vols.len(), "{v:#}");
    jobs.iter()
        .map(|j| {
            assert_eq!(j["kind"], "backup", "{j:#}");
            (
                j["id"].as_str().unwrap().to_owned(),
                j["backup_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

pub fn job(d: &Daemon, id: &str) -> Value {
    admin_ok(d, "job.show", json!({"id": id}))
}

/// Waits for a job to end and returns its final state, whatever it is.
pub fn wait_job_end(d: &Daemon, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let j = job(d, id);
        if j["state"] == "succeeded" || j["state"] == "failed" || j["state"] == "cancelled" {
            return j;
        }
        assert!(
            start.elapsed() < JOB_TIMEOUT,
            "job {id} still running: {j:#}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn wait_job_ok(d: &Daemon, id: &str) -> Value {
    let j = wait_job_end(d, id);
    assert_eq!(
        j["state"],
        "succeeded",
        "job {id}: {j:#}\n{}",
        d.all_stderr()
    );
    j
}

/// One complete backup of `vol`; returns its `backup.show`.
pub fn backup_now(d: &Daemon, vol: &str, full: bool) -> Value {
    let (job_id, backup_id) = backup_start(d, &[vol], full).remove(0);
    wait_job_ok(d, &job_id);
    let b = admin_ok(d, "backup.show", json!({"id": backup_id}));
    assert_eq!(b["state"], "complete", "{b:#}");
    assert_eq!(b["volume"], vol, "{b:#}");
    b
}

pub fn restore_new(d: &Daemon, name: &str, backup_id: &str) {
    let v = admin_ok(
        d,
        "volume.create",
        json!({"name": name, "from_backup": backup_id}),
    );
    let job_id = v["job"]["id"].as_str().unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(v["job"]["kind"], "restore", "{v:#}");
    wait_job_ok(d, job_id);
}

pub fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v:#}"))
}

/// A volume half random data, half never written.
pub fn half_random(d: &Daemon, vol: &str, size: u64, seed: u64) -> Vec<u8> {
    create_volume(d, vol, size);
    let mut model = vec![0u8; size as usize];
    write_at(d, vol, 0, &random(seed, size / 2), &mut model);
    model
}

/// `opts` set to use daemon `a`'s backup store (its default, `DATA_DIR/backups`): two daemons
/// sharing one store.
pub fn sharing_store_of(a: &Daemon, opts: DaemonOpts) -> DaemonOpts {
    let store = a.data_dir().join("backups");
    opts.arg("--backup-store")
        .arg(&format!("file://{}", store.display()))
}
