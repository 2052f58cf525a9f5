//! Servers (volume groups) and their crash-consistent backups (CSBS): membership rules that
//! survive a restart, a writer that orders its writes across three volumes while server backups
//! are taken (each restored set must show that order; separate per-volume backups are shown to
//! break it, so the check can fail), set listing, restore to new volumes and to the originals,
//! and set deletion.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use evsd_e2e::admin::*;
use evsd_e2e::backups::*;
use evsd_e2e::raw::*;
use evsd_e2e::*;
use serde_json::{json, Value};

const VOLUMES: [&str; 3] = ["a", "b", "c"];

fn server_backup(d: &Daemon, name: &str) -> Value {
    let set = admin_ok(d, "server.backup", json!({"name": name}));
    assert_eq!(set["state"], "running", "{set:#}");
    for job in set["jobs"].as_array().unwrap() {
        wait_job_ok(d, job["id"].as_str().unwrap());
    }
    let id = set["id"].as_str().unwrap().to_owned();
    wait_set_complete(d, &id);
    admin_ok(d, "backup_set.show", json!({"id": id}))
}

/// Waits until server backup `id` is recorded complete.
fn wait_set_complete(d: &Daemon, id: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || admin_ok(
            d,
            "backup_set.show",
            json!({"id": id})
        )["state"]
            == "complete"),
        "set {id} never completed"
    );
}

/// The counter a volume holds in its first 8 bytes.
fn counter(d: &Daemon, export: &str) -> u64 {
    let (mut raw, _) = Raw::open(d.tcp_addr(), export);
    let block = raw.read(1, 0, 4096);
    raw.disconnect();
    u64::from_le_bytes(block[..8].try_into().unwrap())
}

/// Writes n to A, then B, then C (each acknowledged before the next), n = 1, 2, … until
/// stopped. Returns the last n written to every volume.
fn start_writer(d: &Daemon, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    let mut conns: Vec<Raw> = VOLUMES
        .iter()
        .map(|v| Raw::open(d.tcp_addr(), v).0)
        .collect();
    let progress = Arc::new(AtomicU64::new(0));
    thread::spawn(move || {
        let mut n = 0u64;
        let mut block = vec![0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            block[..8].copy_from_slice(&n.to_le_bytes());
            for (i, raw) in conns.iter_mut().enumerate() {
                raw.write(n * 4 + i as u64, 0, 0, &block);
            }
            progress.store(n, Ordering::Relaxed);
        }
        n
    })
}

/// Counters of a restored group in write order: every later volume may be at most the
/// earlier one, and all within one of each other.
fn ordered(counters: &[u64]) -> bool {
    counters.windows(2).all(|w| w[0] >= w[1]) && counters[0] - counters[counters.len() - 1] <= 1
}

fn setup(d: &Daemon) {
    for v in VOLUMES {
        create_volume(d, v, 16 * MIB);
    }
    let s = admin_ok(
        d,
        "server.create",
        json!({"name": "web", "volumes": VOLUMES}),
    );
    assert_eq!(s["volumes"], json!(VOLUMES), "{s:#}");
}

#[test]
fn server_membership_rules_survive_restart() {
    let mut d = Daemon::start(DaemonOpts::new().no_default_volume());
    setup(&d);
    create_volume(&d, "d", 16 * MIB);
    admin_err(
        &d,
        "server.create",
        json!({"name": "db", "volumes": ["a"]}),
        "busy",
    );
    // A bad name is invalid whatever the volumes; a missing server is not found whatever
    // the volume.
    admin_err(
        &d,
        "server.create",
        json!({"name": "../db", "volumes": ["missing"]}),
        "invalid_argument",
    );
    admin_err(
        &d,
        "server.add_volume",
        json!({"name": "missing", "volume": "a"}),
        "not_found",
    );
    admin_err(
        &d,
        "server.create",
        json!({"name": "db", "volumes": ["nope"]}),
        "not_found",
    );
    admin_err(
        &d,
        "server.create",
        json!({"name": "web", "volumes": ["d"]}),
        "already_exists",
    );
    admin_err(
        &d,
        "server.create",
        json!({"name": "../x", "volumes": ["d"]}),
        "invalid_argument",
    );
    admin_ok(
        &d,
        "server.add_volume",
        json!({"name": "web", "volume": "d"}),
    );
    admin_ok(
        &d,
        "server.remove_volume",
        json!({"name": "web", "volume": "a"}),
    );
    d.terminate_ok();
    d.restart();
    let s = admin_ok(&d, "server.show", json!({"name": "web"}));
    assert_eq!(s["volumes"], json!(["b", "c", "d"]), "{s:#}");
    // A deleted volume leaves its server; deleting the server keeps its volumes.
    admin_ok_when_idle(&d, "volume.delete", json!({"name": "d"}));
    let s = admin_ok(&d, "server.show", json!({"name": "web"}));
    assert_eq!(s["volumes"], json!(["b", "c"]), "{s:#}");
    admin_ok(&d, "server.delete", json!({"name": "web"}));
    admin_err(&d, "server.show", json!({"name": "web"}), "not_found");
    admin_ok(&d, "volume.show", json!({"name": "b"}));
    let list = admin_ok(&d, "server.list", json!({}));
    assert_eq!(list["servers"], json!([]), "{list:#}");
}

#[test]
fn server_backups_are_consistent_across_volumes_and_separate_ones_are_not() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume());
    setup(&d);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(&d, Arc::clone(&stop));
    thread::sleep(Duration::from_millis(300));

    let mut sets = Vec::new();
    for _ in 0..4 {
        sets.push(server_backup(&d, "web"));
        thread::sleep(Duration::from_millis(100));
    }
    // The same writer against separate per-volume backups taken one after another.
    let mut separate = Vec::new();
    for _ in 0..4 {
        let mut ids = Vec::new();
        for v in VOLUMES {
            ids.push(backup_now(&d, v, false)["id"].as_str().unwrap().to_owned());
        }
        separate.push(ids);
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 100, "the writer wrote only {written} rounds");

    for (i, set) in sets.iter().enumerate() {
        assert!(u(set, "barrier_hold_us") > 0, "{set:#}");
        assert_eq!(set["members"].as_array().unwrap().len(), 3, "{set:#}");
        let suffix = format!("-s{i}");
        let r = admin_ok(
            &d,
            "server.restore",
            json!({"set_id": set["id"], "to_new_suffix": suffix}),
        );
        for job in r["jobs"].as_array().unwrap() {
            wait_job_ok(&d, job["id"].as_str().unwrap());
        }
        let counters: Vec<u64> = VOLUMES
            .iter()
            .map(|v| counter(&d, &format!("{v}{suffix}")))
            .collect();
        assert!(counters[0] > 0, "set {i} restored nothing: {counters:?}");
        assert!(
            ordered(&counters),
            "server backup {i} is not consistent: a/b/c = {counters:?}"
        );
        // Every member manifest carries the set's group id.
        let member = &set["members"][0]["backup_id"];
        let b = admin_ok(&d, "backup.show", json!({"id": member}));
        assert_eq!(b["group_id"], set["id"], "{b:#}");
    }
    let mut broken = 0;
    for (i, ids) in separate.iter().enumerate() {
        let mut counters = Vec::new();
        for (v, id) in VOLUMES.iter().zip(ids) {
            let name = format!("{v}-sep{i}");
            restore_new(&d, &name, id);
            counters.push(counter(&d, &name));
        }
        if !ordered(&counters) {
            broken += 1;
        }
    }
    assert!(
        broken > 0,
        "separate per-volume backups all looked consistent: the check cannot tell"
    );

    // Listing, metrics, restore onto the originals, deletion.
    let listed = admin_ok(&d, "server.backups", json!({"name": "web"}));
    assert_eq!(
        listed["backup_sets"].as_array().unwrap().len(),
        4,
        "{listed:#}"
    );
    let text = evsd_e2e::metrics::scrape(d.metrics_addr().unwrap());
    assert!(
        text.contains("evsd_group_snapshot_hold_seconds_count 4"),
        "{text}"
    );
    assert!(
        text.contains("evsd_server_backup_sets{server=\"web\"} 4"),
        "{text}"
    );
    let first = &sets[0];
    let r = admin_ok(&d, "server.restore", json!({"set_id": first["id"]}));
    for job in r["jobs"].as_array().unwrap() {
        wait_job_ok(&d, job["id"].as_str().unwrap());
    }
    let restored: Vec<u64> = VOLUMES.iter().map(|v| counter(&d, v)).collect();
    assert!(ordered(&restored), "{restored:?}");
    // A member goes only with its set.
    let e = admin_err(
        &d,
        "backup.delete",
        json!({"id": first["members"][0]["backup_id"]}),
        "invalid_argument",
    );
    assert!(e.contains(first["id"].as_str().unwrap()), "{e}");
    // A record cut short (a member dropped) restores nothing: its restore would have left
    // that member's volume as it is and reported the server restored.
    let cut_path = d.data_dir().join(format!(
        "backups/backup-sets/{}.json",
        sets[2]["id"].as_str().unwrap()
    ));
    let whole = std::fs::read(&cut_path).unwrap();
    let mut cut: Value = serde_json::from_slice(&whole).unwrap();
    cut["members"].as_array_mut().unwrap().remove(0);
    std::fs::write(&cut_path, serde_json::to_vec(&cut).unwrap()).unwrap();
    let e = admin_err(
        &d,
        "server.restore",
        json!({"set_id": sets[2]["id"], "to_new_suffix": "-cut"}),
        "internal",
    );
    assert!(e.contains("does not name"), "{e}");
    assert!(
        admin(
            &d,
            "volume.show",
            json!({"name": format!("{}-cut", VOLUMES[1])})
        )
        .is_err(),
        "a member was restored from a cut record"
    );
    std::fs::write(&cut_path, whole).unwrap();
    // A damaged record naming another set's member (in place of its own first) deletes only
    // the backups that say they are its own.
    let record_path = d.data_dir().join(format!(
        "backups/backup-sets/{}.json",
        first["id"].as_str().unwrap()
    ));
    let mut record: Value = serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    let others = sets[1]["members"][0]["backup_id"].clone();
    let replaced = record["members"][0]["backup_id"].clone();
    record["members"][0]["backup_id"] = others.clone();
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
    let r = admin_ok(&d, "backup_set.delete", json!({"id": first["id"]}));
    assert_eq!(r["gc"]["deferred"], false, "{r:#}");
    admin_ok(&d, "backup.show", json!({"id": others}));
    admin_ok(&d, "backup_set.show", json!({"id": sets[1]["id"]}));
    // The member the damaged record no longer named is left, for deleting by hand.
    admin_ok(&d, "backup.delete", json!({"id": replaced}));
    admin_err(
        &d,
        "backup.show",
        json!({"id": first["members"][1]["backup_id"]}),
        "not_found",
    );
    admin_err(
        &d,
        "backup_set.show",
        json!({"id": first["id"]}),
        "not_found",
    );
}

/// A member's delete right after its job ended, while its set is still to be recorded, is
/// refused: the set's record would otherwise name a backup that no longer exists.
#[test]
fn a_member_is_not_deleted_while_its_set_is_being_recorded() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume());
    setup(&d);
    let set = admin_ok(&d, "server.backup", json!({"name": "web"}));
    let member = set["members"][0]["backup_id"].as_str().unwrap().to_owned();
    for job in set["jobs"].as_array().unwrap() {
        wait_job_ok(&d, job["id"].as_str().unwrap());
    }
    let refused = admin(&d, "backup.delete", json!({"id": member}))
        .expect_err("a member of a server backup was deleted");
    // Busy while the set is being recorded (its coordinator looks every 200 ms), a plain
    // refusal once it is.
    assert!(
        ["busy", "invalid_argument"].contains(&refused.code.as_str()),
        "{refused:?}"
    );
    let id = set["id"].as_str().unwrap().to_owned();
    wait_set_complete(&d, &id);
    admin_ok(&d, "backup.show", json!({"id": member}));
}

#[test]
fn server_restore_refuses_busy_originals_unless_forced() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume());
    setup(&d);
    let mut model = vec![0u8; (16 * MIB) as usize];
    write_at(&d, "b", 0, &random(31, 2 * MIB), &mut model);
    let set = server_backup(&d, "web");
    write_at(&d, "b", 0, &random(32, MIB), &mut model.clone());
    let (_held, _) = Raw::open(d.tcp_addr(), "b");
    admin_err(&d, "server.restore", json!({"set_id": set["id"]}), "busy");
    admin_err(
        &d,
        "server.restore",
        json!({"set_id": set["id"], "to_new_suffix": "/x"}),
        "invalid_argument",
    );
    let r = admin_ok(
        &d,
        "server.restore",
        json!({"set_id": set["id"], "force": true}),
    );
    for job in r["jobs"].as_array().unwrap() {
        wait_job_ok(&d, job["id"].as_str().unwrap());
    }
    assert_same("b restored", &read_export(&d, "b"), &model);
}

/// A server backup that failed (one member's job cancelled) leaves the other members' backups;
/// `backup_set.delete` with the set's id deletes them, as it finishes a set delete that stopped
/// after the set's record went.
#[test]
fn deleting_a_failed_server_backup_deletes_the_members_it_left() {
    let opts = DaemonOpts::new()
        .no_default_volume()
        .arg("--backup-rate-limit-mib-per-sec")
        .arg("16");
    let d = Daemon::start(opts);
    half_random(&d, "a", 8 * MIB, 60);
    half_random(&d, "b", 128 * MIB, 61);
    admin_ok(
        &d,
        "server.create",
        json!({"name": "web", "volumes": ["a", "b"]}),
    );
    let set = admin_ok(&d, "server.backup", json!({"name": "web"}));
    let set_id = set["id"].as_str().unwrap().to_owned();
    let jobs: Vec<Value> = set["jobs"].as_array().unwrap().clone();
    let job_of = |v: &str| {
        jobs.iter().find(|j| j["volume"] == v).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    wait_job_ok(&d, &job_of("a"));
    // Still being made: its members are not deleted.
    admin_err(
        &d,
        "backup_set.delete",
        json!({"id": set_id}),
        "invalid_argument",
    );
    admin_ok(&d, "job.cancel", json!({"id": job_of("b")}));
    assert!(
        wait_until(Duration::from_secs(30), || admin_ok(
            &d,
            "backup_set.show",
            json!({"id": set_id})
        )["state"]
            == "failed"),
        "the set did not fail"
    );
    let left = admin_ok(&d, "backup.list", json!({}))["backups"].clone();
    let left = left.as_array().unwrap();
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(left[0]["volume"], "a");
    assert_eq!(left[0]["group_id"], set_id.as_str());

    let deleted = admin_ok(&d, "backup_set.delete", json!({"id": set_id}));
    assert_eq!(deleted["deleted"], set_id.as_str(), "{deleted:#}");
    let left = admin_ok(&d, "backup.list", json!({}))["backups"].clone();
    assert_eq!(left.as_array().unwrap().len(), 0, "{left:#}");
    admin_err(&d, "backup_set.delete", json!({"id": set_id}), "not_found");
}

/// A set another daemon sharing the store is still making has no record yet, like a failed
/// one: `backup_set.delete` of its id here is refused and its finished members stay, so the
/// set completes there.
#[test]
fn a_set_another_daemon_is_making_is_not_deleted_here() {
    let a = Daemon::start(DaemonOpts::new().no_default_volume());
    let opts = DaemonOpts::new()
        .no_default_volume()
        .arg("--backup-rate-limit-mib-per-sec")
        .arg("16");
    let b = Daemon::start(sharing_store_of(&a, opts));
    half_random(&b, "small", 8 * MIB, 62);
    half_random(&b, "big", 128 * MIB, 63);
    admin_ok(
        &b,
        "server.create",
        json!({"name": "web", "volumes": ["small", "big"]}),
    );
    let set = admin_ok(&b, "server.backup", json!({"name": "web"}));
    let set_id = set["id"].as_str().unwrap().to_owned();
    let small_job = set["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["volume"] == "small")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_job_ok(&b, &small_job);
    let message = admin_err(
        &a,
        "backup_set.delete",
        json!({"id": set_id}),
        "invalid_argument",
    );
    assert!(message.contains("not on this daemon"), "{message}");
    assert!(
        wait_until(Duration::from_secs(60), || admin_ok(
            &b,
            "backup_set.show",
            json!({"id": set_id})
        )["state"]
            == "complete"),
        "the set did not complete: {:#}",
        admin_ok(&b, "backup_set.show", json!({"id": set_id}))
    );
    // Recorded now: a's delete takes it (records are the store's, not one daemon's).
    admin_ok(&a, "backup_set.delete", json!({"id": set_id}));
    let left = admin_ok(&b, "backup.list", json!({}))["backups"].clone();
    assert_eq!(left.as_array().unwrap().len(), 0, "{left:#}");
}

/// A set restored onto "the originals" goes onto the volumes it was taken of: on another daemon
/// sharing the store, volumes of the same names and sizes are refused and keep their data; the
/// set still restores there as new volumes.
#[test]
fn a_set_is_restored_in_place_only_onto_the_volumes_it_was_taken_of() {
    let a = Daemon::start(DaemonOpts::new().no_default_volume());
    let b = Daemon::start(sharing_store_of(&a, DaemonOpts::new().no_default_volume()));
    let of_a = half_random(&a, "v", 8 * MIB, 70);
    let of_b = half_random(&b, "v", 8 * MIB, 71);
    for d in [&a, &b] {
        admin_ok(d, "server.create", json!({"name": "web", "volumes": ["v"]}));
    }
    let set = server_backup(&a, "web");
    let message = admin_err(
        &b,
        "server.restore",
        json!({"set_id": set["id"], "force": true}),
        "invalid_argument",
    );
    assert!(message.contains("not the volume"), "{message}");
    assert_same("b's v after the refusal", &read_export(&b, "v"), &of_b);
    let r = admin_ok(
        &b,
        "server.restore",
        json!({"set_id": set["id"], "to_new_suffix": "-of-a"}),
    );
    for job in r["jobs"].as_array().unwrap() {
        wait_job_ok(&b, job["id"].as_str().unwrap());
    }
    assert_same("a's v restored on b", &read_export(&b, "v-of-a"), &of_a);
    // On a, the set's own daemon, in place works.
    let mut changed = of_a.clone();
    write_at(&a, "v", 0, &random(72, MIB), &mut changed);
    let r = admin_ok(&a, "server.restore", json!({"set_id": set["id"]}));
    for job in r["jobs"].as_array().unwrap() {
        wait_job_ok(&a, job["id"].as_str().unwrap());
    }
    assert_same("a's v restored in place", &read_export(&a, "v"), &of_a);
}

/// `server.backups` names: one that is no server and has no set is not found (and gets no
/// metric series); a deleted server's sets stay listed; a bad name is refused. A set that
/// ends after its server was deleted brings none of its series back.
#[test]
fn server_backups_of_unknown_deleted_and_bad_names() {
    let d = Daemon::start(
        DaemonOpts::new()
            .no_default_volume()
            .arg("--backup-rate-limit-mib-per-sec")
            .arg("32"),
    );
    half_random(&d, "v", 8 * MIB, 73);
    admin_ok(
        &d,
        "server.create",
        json!({"name": "web", "volumes": ["v"]}),
    );
    let set = server_backup(&d, "web");
    admin_err(&d, "server.backups", json!({"name": "nosuch"}), "not_found");
    admin_err(
        &d,
        "server.backups",
        json!({"name": "a/b"}),
        "invalid_argument",
    );
    // Listing a server's sets sets its series.
    admin_ok(&d, "server.backups", json!({"name": "web"}));
    let text = evsd_e2e::metrics::scrape(d.metrics_addr().unwrap());
    assert!(!text.contains("server=\"nosuch\""), "{text}");
    assert!(
        text.contains("evsd_server_backup_sets{server=\"web\"} 1"),
        "{text}"
    );
    admin_ok(&d, "server.delete", json!({"name": "web"}));
    let text = evsd_e2e::metrics::scrape(d.metrics_addr().unwrap());
    assert!(!text.contains("server=\"web\""), "{text}");
    let listed = admin_ok(&d, "server.backups", json!({"name": "web"}));
    let ids: Vec<&str> = listed["backup_sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [set["id"].as_str().unwrap()], "{listed:#}");

    // 32 MiB of data at 32 MiB/s: the set is still being made when its server goes.
    half_random(&d, "w", 64 * MIB, 74);
    admin_ok(&d, "server.create", json!({"name": "db", "volumes": ["w"]}));
    let running = admin_ok(&d, "server.backup", json!({"name": "db"}));
    admin_ok(&d, "server.delete", json!({"name": "db"}));
    for job in running["jobs"].as_array().unwrap() {
        wait_job_ok(&d, job["id"].as_str().unwrap());
    }
    let id = running["id"].as_str().unwrap().to_owned();
    wait_set_complete(&d, &id);
    let text = evsd_e2e::metrics::scrape(d.metrics_addr().unwrap());
    assert!(!text.contains("server=\"db\""), "{text}");

    // The same through a policy, whose retention lists the server's sets after its set ends.
    admin_ok(
        &d,
        "server.create",
        json!({"name": "db2", "volumes": ["w"]}),
    );
    admin_ok(
        &d,
        "policy.create",
        json!({"name": "p", "daily": "03:00", "keep": 2, "servers": ["db2"]}),
    );
    admin_ok(&d, "policy.run", json!({"name": "p"}));
    assert!(
        wait_until(Duration::from_secs(30), || {
            admin_ok(&d, "job.list", json!({}))["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|j| j["policy"] == "p")
        }),
        "the policy's set did not start"
    );
    admin_ok(&d, "server.delete", json!({"name": "db2"}));
    assert!(
        wait_until(Duration::from_secs(60), || admin_ok(
            &d,
            "policy.show",
            json!({"name": "p"})
        )["running"]
            == false),
        "the policy run did not end"
    );
    let text = evsd_e2e::metrics::scrape(d.metrics_addr().unwrap());
    assert!(!text.contains("server=\"db2\""), "{text}");
}

/// Damages the stored chunks of backup `backup_id` (a local store): its restore then fails.
fn damage_chunks_of(d: &Daemon, backup_id: &str) {
    let store = d.data_dir().join("backups");
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(store.join("manifests").join(format!("{backup_id}.json"))).unwrap(),
    )
    .unwrap();
    let mut damaged = 0;
    for chunk in manifest["chunks"].as_array().unwrap() {
        let Some(hex) = chunk.as_str() else { continue };
        for dir in std::fs::read_dir(store.join("chunks")).unwrap().flatten() {
            let path = dir.path().join(hex);
            if let Ok(mut bytes) = std::fs::read(&path) {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x40;
                std::fs::write(&path, &bytes).unwrap();
                damaged += 1;
            }
        }
    }
    assert!(damaged > 0, "no stored chunk of {backup_id} found");
}

/// A server restore one member of which fails (its chunks damaged in the store) takes back
/// what the others restored once every member's job has ended: in place, every member holds
/// what it held before and serves clients again; to new volumes, none of them is left. No
/// `pre-restore-` snapshot stays behind.
/// Volumes "a" and "b" (8 MiB, half random) of server "web", a server backup of them, then new
/// data in both: returns the daemon, the set, and what each volume holds now. The set's member
/// of "b" is damaged in the store, so restoring it fails.
fn server_restore_with_a_bad_member() -> (Daemon, Value, [Vec<u8>; 2]) {
    let d = Daemon::start(DaemonOpts::new().no_default_volume());
    let mut models = [
        half_random(&d, "a", 8 * MIB, 91),
        half_random(&d, "b", 8 * MIB, 92),
    ];
    admin_ok(
        &d,
        "server.create",
        json!({"name": "web", "volumes": ["a", "b"]}),
    );
    let set = server_backup(&d, "web");
    for ((volume, model), seed) in ["a", "b"].iter().zip(models.iter_mut()).zip([93, 94]) {
        write_at(&d, volume, 0, &random(seed, MIB), model);
    }
    let member_b = (set["members"].as_array().unwrap().iter())
        .find(|m| m["volume"] == "b")
        .unwrap()["backup_id"]
        .as_str()
        .unwrap()
        .to_owned();
    damage_chunks_of(&d, &member_b);
    (d, set, models)
}

#[test]
fn a_server_restore_with_a_failed_member_leaves_every_member_as_it_was() {
    let (d, set, models) = server_restore_with_a_bad_member();
    // The snapshots the restore takes have names of their own.
    admin_err(
        &d,
        "snapshot.create",
        json!({"volume": "a", "name": "pre-restore-mine"}),
        "invalid_argument",
    );
    for suffix in [None, Some("-new")] {
        let params = match suffix {
            None => json!({"set_id": set["id"]}),
            Some(s) => json!({"set_id": set["id"], "to_new_suffix": s}),
        };
        let r = admin_ok(&d, "server.restore", params);
        // Both jobs end failed: b's own, a's taken back with it, which its error says.
        let ended: Vec<Value> = (r["jobs"].as_array().unwrap().iter())
            .map(|j| wait_job_end(&d, j["id"].as_str().unwrap()))
            .collect();
        assert!(ended.iter().all(|j| j["state"] == "failed"), "{ended:#?}");
        let of_a = ended
            .iter()
            .find(|j| j["volume"].as_str().unwrap().starts_with('a'));
        let error = of_a.unwrap()["error"].as_str().unwrap();
        assert!(
            error.contains("restored, then") && error.contains("taken back"),
            "{error}"
        );
        // Decided when the jobs end: every member open (or gone) soon after (a loaded
        // machine may take a while for the rollbacks and the polls).
        let decided =
            wait_until(Duration::from_secs(10), || {
                ["a", "b"].iter().all(|v| {
                    let name = format!("{v}{}", suffix.unwrap_or(""));
                    match suffix {
                        Some(_) => admin(&d, "volume.show", json!({"name": name})).is_err(),
                        None => {
                            let shown = admin_ok(&d, "volume.show", json!({"name": name}));
                            let snapshots = admin_ok(&d, "snapshot.list", json!({"volume": name}));
                            shown["closed_for"].is_null()
                                && shown["incomplete_restore"].is_null()
                                && snapshots["snapshots"].as_array().unwrap().iter().all(|s| {
                                    !s["name"].as_str().unwrap().starts_with("pre-restore-")
                                })
                        }
                    }
                })
            });
        assert!(
            decided,
            "the server restore was not taken back ({suffix:?})"
        );
        for (volume, model) in ["a", "b"].iter().zip(&models) {
            assert_same(volume, &read_export(&d, volume), model);
        }
    }
}

/// A server restore in place cut off by `kill -9` while its members' jobs wait (a GC lock
/// planted in the store holds them) is decided at the next start, from the snapshots and marks
/// it left: the jobs resume, b's fails, and both members go back to what they held before.
/// Also when b's job was never recorded (a crash right after the set marked its members:
/// staged by removing b's record and putting the set's own mark back on b): b counts as not
/// restored, and a, restored by its resumed job, is taken back.
#[test]
fn a_server_restore_cut_off_by_kill9_is_decided_at_the_next_start() {
    // b's job record kept; gone; gone with b's mark torn (unreadable: it names no set, and
    // counted as restored it let a keep the backup and the rollback point go).
    for (without_b_job, torn_b_mark) in [(false, false), (true, false), (true, true)] {
        let (mut d, set, models) = server_restore_with_a_bad_member();
        let set_id = set["id"].as_str().unwrap().to_owned();
        let gc_lock = d.data_dir().join("backups/locks/exclusive-planted.json");
        std::fs::create_dir_all(gc_lock.parent().unwrap()).unwrap();
        std::fs::write(&gc_lock, b"{}").unwrap();
        let r = admin_ok(&d, "server.restore", json!({"set_id": set_id}));
        let jobs: Vec<(String, String)> = (r["jobs"].as_array().unwrap().iter())
            .map(|j| {
                (
                    j["id"].as_str().unwrap().to_owned(),
                    j["volume"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(jobs.len(), 2, "{r:#}");
        // What the members would go back to stays while the set decides.
        let snapshot = format!("pre-restore-{set_id}");
        admin_err(
            &d,
            "snapshot.delete",
            json!({"volume": "a", "name": snapshot}),
            "busy",
        );
        d.kill9();
        std::fs::remove_file(&gc_lock).unwrap();
        if without_b_job {
            let (b_job, _) = jobs.iter().find(|(_, v)| v == "b").unwrap();
            std::fs::remove_file(d.data_dir().join(format!("jobs/{b_job}.json"))).unwrap();
            let mark_path = d.data_dir().join("volumes/b/restore.json");
            let mut mark: Value =
                serde_json::from_slice(&std::fs::read(&mark_path).unwrap()).unwrap();
            assert_eq!(mark["set_id"], json!(set_id), "{mark:#}");
            mark["job_id"] = json!(format!("(server restore {set_id})"));
            std::fs::write(&mark_path, serde_json::to_vec(&mark).unwrap()).unwrap();
            if torn_b_mark {
                std::fs::write(&mark_path, b"{\"backup_").unwrap();
            }
        }
        d.restart();
        for (id, volume) in &jobs {
            if without_b_job && volume == "b" {
                admin_err(&d, "job.show", json!({"id": id}), "not_found");
                continue;
            }
            let j = wait_job_end(&d, id);
            assert_eq!(j["state"], "failed", "{j:#}");
        }
        for (volume, model) in ["a", "b"].iter().zip(&models) {
            // Decided as the jobs end (a job-less member's set right after the restart).
            let whole = wait_until(Duration::from_secs(10), || {
                admin_ok(&d, "volume.show", json!({"name": volume}))["incomplete_restore"].is_null()
            });
            assert!(
                whole,
                "{volume} still marked ({without_b_job}, {torn_b_mark})"
            );
            assert_same(volume, &read_export(&d, volume), model);
            let snapshots = admin_ok(&d, "snapshot.list", json!({"volume": volume}));
            assert!(
                !snapshots.to_string().contains("pre-restore-"),
                "{snapshots:#}"
            );
        }
    }
}
