//! Backup policies on the real daemon with short intervals: retention keeps exactly N of the
//! policy's own backups (manual backups untouched), server policies keep backup sets, disabled
//! policies stop, `policy run` starts one now, and policies survive a restart.
//! (The scheduler's slot logic is unit-tested with a fake clock in daemon/src/policy.)

use std::thread;
use std::time::Duration;

use evsd_e2e::admin::*;
use evsd_e2e::backups::*;
use evsd_e2e::*;
use serde_json::{json, Value};

fn policy(d: &Daemon, name: &str) -> Value {
    admin_ok(d, "policy.show", json!({"name": name}))
}

/// Waits until the policy has succeeded `runs` more times than `seen` successes so far.
fn wait_successes(d: &Daemon, name: &str, runs: usize) {
    let mut seen = Vec::new();
    let ok = wait_until(Duration::from_secs(90), || {
        let p = policy(d, name);
        assert_eq!(p["last_error"], Value::Null, "policy {name} failed: {p:#}");
        if let Some(t) = p["last_success_unix_secs"].as_u64() {
            if seen.last() != Some(&t) {
                seen.push(t);
            }
        }
        seen.len() > runs
    });
    assert!(
        ok,
        "policy {name} did not run {runs} times: {:#}",
        policy(d, name)
    );
}

/// Runs policy `name` now and waits (up to 90 s) for the run to end; returns the policy.
fn run_now(d: &Daemon, name: &str) -> Value {
    admin_ok(d, "policy.run", json!({"name": name}));
    assert!(
        wait_until(Duration::from_secs(90), || policy(d, name)["running"]
            == false),
        "the run of {name} did not end: {:#}",
        policy(d, name)
    );
    policy(d, name)
}

/// Runs policy `name` now and asserts the run succeeded.
fn run_ok(d: &Daemon, name: &str) {
    let p = run_now(d, name);
    assert_eq!(p["last_error"], Value::Null, "{p:#}");
}

/// The ids of server `server`'s complete backup sets, oldest first.
fn complete_sets(d: &Daemon, server: &str) -> Vec<String> {
    admin_ok(d, "server.backups", json!({"name": server}))["backup_sets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "complete")
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A daemon with volume `volume` (8 MiB, half random from `seed`) in server "web", and policy
/// `policy` of that server keeping `keep` sets, on a daily slot that never comes in a test.
fn server_policy_daemon(
    opts: DaemonOpts,
    volume: &str,
    seed: u64,
    policy: &str,
    keep: u32,
) -> Daemon {
    let d = Daemon::start(opts);
    half_random(&d, volume, 8 * MIB, seed);
    admin_ok(
        &d,
        "server.create",
        json!({"name": "web", "volumes": [volume]}),
    );
    admin_ok(
        &d,
        "policy.create",
        json!({"name": policy, "daily": "03:00", "keep": keep, "servers": ["web"]}),
    );
    d
}

fn policy_backups(d: &Daemon, name: &str) -> Vec<Value> {
    admin_ok(d, "backup.list", json!({}))["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["policy"] == name)
        .cloned()
        .collect()
}

#[test]
fn volume_policy_keeps_n_and_never_touches_manual_backups() {
    let mut d = Daemon::start(DaemonOpts::new().no_default_volume());
    half_random(&d, "v", 16 * MIB, 41);
    let manual = backup_now(&d, "v", false);
    let p = admin_ok(
        &d,
        "policy.create",
        json!({"name": "often", "every": "1s", "keep": 2, "volumes": ["v"]}),
    );
    assert_eq!(p["schedule"], "every 1s", "{p:#}");
    assert_eq!(p["enabled"], true, "{p:#}");
    admin_err(
        &d,
        "policy.create",
        json!({"name": "bad", "every": "0s", "volumes": ["v"]}),
        "invalid_argument",
    );
    admin_err(
        &d,
        "policy.create",
        json!({"name": "bad", "daily": "02:00", "volumes": ["nope"]}),
        "not_found",
    );
    // A bad name (or keep) is invalid whatever the targets.
    admin_err(
        &d,
        "policy.create",
        json!({"name": "bad/x", "daily": "02:00", "volumes": ["nope"]}),
        "invalid_argument",
    );
    admin_err(
        &d,
        "policy.create",
        json!({"name": "bad", "daily": "02:00", "keep": 0, "volumes": ["nope"]}),
        "invalid_argument",
    );
    admin_err(
        &d,
        "policy.create",
        json!({"name": "often", "every": "5s", "volumes": ["v"]}),
        "already_exists",
    );
    wait_successes(&d, "often", 4);
    // Retention ran after each success: the policy's two newest, plus the manual one.
    let mine = policy_backups(&d, "often");
    assert_eq!(mine.len(), 2, "{mine:#?}");
    let listed = admin_ok(&d, "backup.list", json!({}));
    assert!(
        listed["backups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["id"] == manual["id"]),
        "the manual backup was deleted: {listed:#}"
    );
    let p = policy(&d, "often");
    assert_eq!(p["backups_kept"], 2, "{p:#}");
    let jobs = admin_ok(&d, "job.list", json!({}));
    assert!(
        jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["policy"] == "often"),
        "{jobs:#}"
    );
    let text = evsd_e2e::metrics::scrape(d.metrics_addr().unwrap());
    assert!(
        text.contains("evsd_policy_backups_kept{policy=\"often\"} 2"),
        "{text}"
    );

    // Disabled: no more runs; `policy run` still runs it once.
    admin_ok(&d, "policy.disable", json!({"name": "often"}));
    thread::sleep(Duration::from_millis(1500));
    let before = policy(&d, "often")["last_run_unix_secs"].clone();
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(policy(&d, "often")["last_run_unix_secs"], before);
    let p = admin_ok(&d, "policy.run", json!({"name": "often"}));
    assert_eq!(p["running"], true, "{p:#}");
    assert!(wait_until(Duration::from_secs(60), || policy(&d, "often")
        ["running"]
        == false));
    assert_eq!(policy_backups(&d, "often").len(), 2);

    // Durable across a restart.
    d.terminate_ok();
    d.restart();
    let p = policy(&d, "often");
    assert_eq!(p["enabled"], false, "{p:#}");
    assert_eq!(p["keep"], 2, "{p:#}");
    admin_ok(&d, "policy.delete", json!({"name": "often"}));
    admin_err(&d, "policy.show", json!({"name": "often"}), "not_found");
    // Its backups stay, and a new policy of its name does not take them over: they are not
    // its to count or delete.
    assert_eq!(policy_backups(&d, "often").len(), 2);
    thread::sleep(Duration::from_millis(1100));
    admin_ok(
        &d,
        "policy.create",
        json!({"name": "often", "daily": "03:00", "keep": 1, "volumes": ["v"]}),
    );
    run_ok(&d, "often");
    run_ok(&d, "often");
    assert_eq!(policy_backups(&d, "often").len(), 3);
    assert_eq!(policy(&d, "often")["backups_kept"], 1);
}

/// One volume a policy names cannot be backed up (deleted): the others still are, and their
/// retention runs; the run's error names the missing one. A volume made again under a deleted
/// one's name does not inherit its backups into retention.
#[test]
fn a_failing_volume_costs_only_its_own_backup_and_retention_goes_by_identity() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume());
    half_random(&d, "a", 8 * MIB, 42);
    half_random(&d, "b", 8 * MIB, 43);
    admin_ok(
        &d,
        "policy.create",
        json!({"name": "p", "daily": "03:00", "keep": 1, "volumes": ["a", "b"]}),
    );
    let run = |d: &Daemon| run_now(d, "p");
    let p = run(&d);
    assert_eq!(p["last_error"], Value::Null, "{p:#}");
    let old_b: Vec<Value> = policy_backups(&d, "p")
        .into_iter()
        .filter(|x| x["volume"] == "b")
        .collect();
    assert_eq!(old_b.len(), 1);
    let of_a = |d: &Daemon| -> Vec<Value> {
        policy_backups(d, "p")
            .into_iter()
            .filter(|x| x["volume"] == "a")
            .collect()
    };
    let first_a = of_a(&d);
    assert_eq!(first_a.len(), 1);

    // b goes: a is still backed up (a new backup, the old one retired); the error names b.
    admin_ok(&d, "volume.delete", json!({"name": "b"}));
    let p = run(&d);
    let error = p["last_error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("\"b\"") && !error.contains("\"a\""), "{p:#}");
    let second_a = of_a(&d);
    assert_eq!(second_a.len(), 1);
    assert_ne!(
        second_a[0]["id"], first_a[0]["id"],
        "a was not backed up: {p:#}"
    );

    // A new b: its first policy backup does not make retention delete the old b's.
    half_random(&d, "b", 8 * MIB, 44);
    let p = run(&d);
    assert_eq!(p["last_error"], Value::Null, "{p:#}");
    let listed = policy_backups(&d, "p");
    assert!(
        listed.iter().any(|x| x["id"] == old_b[0]["id"]),
        "the deleted volume's backup went: {listed:#?}"
    );
    assert_eq!(listed.iter().filter(|x| x["volume"] == "b").count(), 2);
    assert_eq!(of_a(&d).len(), 1);
}

/// A policy run that finds a job on its volume (resumed after a restart, or started by hand)
/// waits for it and then backs the volume up, instead of failing as busy. The hand-made
/// backup is held back by a garbage collection's lock planted in the store.
#[test]
fn a_policy_backup_waits_for_the_job_running_on_its_volume() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume());
    half_random(&d, "v", 8 * MIB, 46);
    admin_ok(
        &d,
        "policy.create",
        json!({"name": "p", "daily": "03:00", "keep": 2, "volumes": ["v"]}),
    );
    let gc_lock = d
        .data_dir()
        .join("backups")
        .join("locks")
        .join("exclusive-planted.json");
    std::fs::create_dir_all(gc_lock.parent().unwrap()).unwrap();
    std::fs::write(&gc_lock, b"{}").unwrap();
    let (job_id, _) = backup_start(&d, &["v"], false).remove(0);
    admin_ok(&d, "policy.run", json!({"name": "p"}));
    thread::sleep(Duration::from_millis(600));
    assert_eq!(policy(&d, "p")["running"], true, "the run did not wait");
    std::fs::remove_file(&gc_lock).unwrap();
    wait_job_ok(&d, &job_id);
    assert!(wait_until(Duration::from_secs(60), || policy(&d, "p")
        ["running"]
        == false));
    let p = policy(&d, "p");
    assert_eq!(p["last_error"], Value::Null, "{p:#}");
    assert_eq!(policy_backups(&d, "p").len(), 1);
}

/// `kill -9` during a policy run: at the next start the run runs again, once, and counts the
/// backup the stopped run had started (resumed by the daemon) instead of making a second one.
#[test]
fn a_policy_run_killed_midway_runs_again_without_backing_up_twice() {
    let opts = DaemonOpts::new()
        .no_default_volume()
        .arg("--backup-rate-limit-mib-per-sec")
        .arg("16");
    let mut d = Daemon::start(opts);
    half_random(&d, "v", 128 * MIB, 47);
    admin_ok(
        &d,
        "policy.create",
        json!({"name": "p", "daily": "03:00", "keep": 5, "volumes": ["v"]}),
    );
    admin_ok(&d, "policy.run", json!({"name": "p"}));
    assert!(
        wait_until(Duration::from_secs(30), || {
            admin_ok(&d, "job.list", json!({}))["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|j| j["policy"] == "p" && u(&j["progress"], "bytes_done") > 0)
        }),
        "the policy's backup did not start"
    );
    d.kill9();
    d.restart();
    assert!(
        wait_until(Duration::from_secs(90), || {
            let p = policy(&d, "p");
            p["running"] == false && p["last_success_unix_secs"].is_u64()
        }),
        "the run did not run again: {:#}",
        policy(&d, "p")
    );
    let p = policy(&d, "p");
    assert_eq!(p["last_error"], Value::Null, "{p:#}");
    let mine = policy_backups(&d, "p");
    assert_eq!(mine.len(), 1, "backed up twice: {mine:#?}");
    // Not a third time at the next start.
    d.terminate_ok();
    d.restart();
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(policy(&d, "p")["running"], false);
    assert_eq!(policy_backups(&d, "p").len(), 1);
}

#[test]
fn server_policy_keeps_backup_sets() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume());
    for v in ["a", "b"] {
        half_random(&d, v, 8 * MIB, 42);
    }
    admin_ok(
        &d,
        "server.create",
        json!({"name": "web", "volumes": ["a", "b"]}),
    );
    admin_ok(
        &d,
        "policy.create",
        json!({"name": "web-often", "every": "1s", "keep": 1, "servers": ["web"]}),
    );
    wait_successes(&d, "web-often", 3);
    admin_ok(&d, "policy.disable", json!({"name": "web-often"}));
    assert!(wait_until(Duration::from_secs(60), || policy(
        &d,
        "web-often"
    )["running"]
        == false));
    let sets = admin_ok(&d, "server.backups", json!({"name": "web"}));
    let complete: Vec<&Value> = sets["backup_sets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "complete")
        .collect();
    assert_eq!(complete.len(), 1, "{sets:#}");
    assert_eq!(complete[0]["policy"], "web-often", "{sets:#}");
    // The deleted sets' member backups went with them.
    assert_eq!(policy_backups(&d, "web-often").len(), 2);
}

/// A volume that leaves a server keeps its newest backup through the server policy's
/// retention: the sets that hold it would otherwise all age out, its last backup with them.
#[test]
fn a_volume_that_left_the_server_keeps_its_newest_backup() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume());
    for v in ["a", "b"] {
        half_random(&d, v, 8 * MIB, 52);
    }
    admin_ok(
        &d,
        "server.create",
        json!({"name": "web", "volumes": ["a", "b"]}),
    );
    admin_ok(
        &d,
        "policy.create",
        json!({"name": "p", "daily": "03:00", "keep": 1, "servers": ["web"]}),
    );
    run_ok(&d, "p");
    let backups_of = |v: &str| -> Vec<Value> {
        admin_ok(&d, "backup.list", json!({"volume": v}))["backups"]
            .as_array()
            .unwrap()
            .clone()
    };
    assert_eq!(backups_of("b").len(), 1);
    admin_ok(
        &d,
        "server.remove_volume",
        json!({"name": "web", "volume": "b"}),
    );
    run_ok(&d, "p");
    run_ok(&d, "p");
    assert_eq!(backups_of("b").len(), 1, "b's last backup was aged out");
    // a's newest set is the policy's one kept; the older one with b stays for b.
    assert_eq!(complete_sets(&d, "web").len(), 2);
}

/// Runs server policy `p` once with b's job cancelled halfway (a's completes), so its set
/// fails; returns the policy's backups afterwards. Jobs of earlier runs are told apart by id.
fn run_with_b_cancelled(d: &Daemon) -> Vec<Value> {
    let ids = |jobs: &Value| -> Vec<String> {
        jobs.as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let before = ids(&admin_ok(d, "job.list", json!({}))["jobs"]);
    admin_ok(d, "policy.run", json!({"name": "p"}));
    let mut b_job = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            let jobs = admin_ok(d, "job.list", json!({}))["jobs"].clone();
            let new: Vec<&Value> = jobs
                .as_array()
                .unwrap()
                .iter()
                .filter(|j| !before.contains(&j["id"].as_str().unwrap().to_owned()))
                .collect();
            let a_done = new
                .iter()
                .any(|j| j["volume"] == "a" && j["policy"] == "p" && j["state"] == "succeeded");
            b_job = new
                .iter()
                .find(|j| {
                    j["volume"] == "b" && j["policy"] == "p" && u(&j["progress"], "bytes_done") > 0
                })
                .map(|j| j["id"].as_str().unwrap().to_owned());
            a_done && b_job.is_some()
        }),
        "the set's jobs did not get going"
    );
    admin_ok(d, "job.cancel", json!({"id": b_job.unwrap()}));
    assert!(wait_until(Duration::from_secs(60), || policy(d, "p")
        ["running"]
        == false));
    let p = policy(d, "p");
    assert!(
        p["last_error"].as_str().is_some_and(|e| e.contains("web")),
        "{p:#}"
    );
    policy_backups(d, "p")
}

/// A server policy's run whose set fails (one member's job cancelled) leaves the other members'
/// backups behind; the policy's next failed set retires the earlier failed set's, and its next
/// complete set retires them all, since no set record names them and its retention counts sets.
#[test]
fn members_of_a_failed_policy_set_go_once_a_later_set_is_complete() {
    let opts = DaemonOpts::new()
        .no_default_volume()
        .arg("--backup-rate-limit-mib-per-sec")
        .arg("16");
    let d = Daemon::start(opts);
    half_random(&d, "a", 8 * MIB, 48);
    half_random(&d, "b", 128 * MIB, 49);
    admin_ok(
        &d,
        "server.create",
        json!({"name": "web", "volumes": ["a", "b"]}),
    );
    admin_ok(
        &d,
        "policy.create",
        json!({"name": "p", "daily": "03:00", "keep": 3, "servers": ["web"]}),
    );
    let run = |d: &Daemon| run_now(d, "p");
    let first = run_with_b_cancelled(&d);
    assert_eq!(first.len(), 1, "{first:#?}");
    assert_eq!(first[0]["volume"], "a");
    // A second failing run (a second later): while b keeps failing, a's backups do not pile
    // up; the newest failed set's member of a stays.
    thread::sleep(Duration::from_millis(1100));
    let orphan = run_with_b_cancelled(&d);
    assert_eq!(
        orphan.len(),
        1,
        "the earlier failed set's member stayed: {orphan:#?}"
    );
    assert_eq!(orphan[0]["volume"], "a");
    assert_ne!(orphan[0]["id"], first[0]["id"]);

    // The second second: the next set is newer than the orphan.
    thread::sleep(Duration::from_millis(1100));
    let p = run(&d);
    assert_eq!(p["last_error"], Value::Null, "{p:#}");
    let sets = admin_ok(&d, "server.backups", json!({"name": "web"}));
    let sets = sets["backup_sets"].as_array().unwrap().clone();
    assert_eq!(sets.len(), 1, "{sets:#?}");
    let mut members: Vec<String> = sets[0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["backup_id"].as_str().unwrap().to_owned())
        .collect();
    members.sort();
    let mut kept: Vec<String> = policy_backups(&d, "p")
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, members, "the failed set's member is still there");
    assert!(!kept.contains(&orphan[0]["id"].as_str().unwrap().to_owned()));
    // What remains restores: the set's member of a, byte for byte.
    let b_of_a = sets[0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["volume"] == "a")
        .unwrap()["backup_id"]
        .clone();
    let v = admin_ok(
        &d,
        "volume.create",
        json!({"name": "a2", "from_backup": b_of_a}),
    );
    wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
    assert_same("a restored", &read_export(&d, "a2"), &read_export(&d, "a"));
}

/// The set a server policy's run makes survives its retention even when an earlier set's time
/// lies ahead of the clock (the clock was set back since): with keep 1 the earlier one goes.
#[test]
fn a_server_policys_newest_set_is_kept_when_an_older_one_is_stamped_in_the_future() {
    let d = server_policy_daemon(DaemonOpts::new().no_default_volume(), "a", 53, "p", 1);
    run_ok(&d, "p");
    let first = complete_sets(&d, "web");
    assert_eq!(first.len(), 1, "{first:?}");
    // As if made before the clock went back ten days.
    let path = d
        .data_dir()
        .join("backups/backup-sets")
        .join(format!("{}.json", first[0]));
    let mut record: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let created = record["created_unix_secs"].as_u64().unwrap();
    record["created_unix_secs"] = json!(created + 10 * 86_400);
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    run_ok(&d, "p");
    let second = complete_sets(&d, "web");
    assert_eq!(second.len(), 1, "keep 1 kept {second:?}");
    assert_ne!(
        second[0], first[0],
        "retention deleted the set its own run had just made"
    );
}

/// A volume policy counts only backups of its own: the members of server backup sets a
/// deleted server policy of the same name made belong to those sets, which must still restore.
#[test]
fn a_volume_policy_leaves_the_members_of_server_sets_alone() {
    let d = server_policy_daemon(DaemonOpts::new().no_default_volume(), "a", 54, "nightly", 3);
    for _ in 0..2 {
        run_ok(&d, "nightly");
    }
    let set_ids = complete_sets(&d, "web");
    assert_eq!(set_ids.len(), 2, "{set_ids:?}");
    admin_ok(&d, "policy.delete", json!({"name": "nightly"}));
    admin_ok(
        &d,
        "policy.create",
        json!({"name": "nightly", "daily": "03:00", "keep": 1, "volumes": ["a"]}),
    );
    for _ in 0..2 {
        run_ok(&d, "nightly");
    }
    let own: Vec<Value> = policy_backups(&d, "nightly")
        .into_iter()
        .filter(|b| b["group_id"].is_null())
        .collect();
    assert_eq!(
        own.len(),
        1,
        "the volume policy keeps 1 of its own: {own:#?}"
    );
    for id in &set_ids {
        let set = admin_ok(&d, "backup_set.show", json!({"id": id}));
        assert_eq!(set["state"], "complete", "{set:#}");
        let member = set["members"][0]["backup_id"].as_str().unwrap().to_owned();
        // Fails the test if the member was deleted.
        admin_ok(&d, "backup.show", json!({"id": member}));
        let v = admin_ok(
            &d,
            "volume.create",
            json!({"name": format!("r-{id}"), "from_backup": member}),
        );
        wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
        assert_same(
            "restored from the set's member",
            &read_export(&d, &format!("r-{id}")),
            &read_export(&d, "a"),
        );
    }
}

/// Two daemons sharing a store, each with a server "web" and a server policy "p": each one's
/// retention counts and deletes only its own daemon's sets.
#[test]
fn a_server_policy_counts_only_its_own_daemons_sets_in_a_shared_store() {
    let a = server_policy_daemon(DaemonOpts::new().no_default_volume(), "v", 50, "p", 1);
    let opts = sharing_store_of(&a, DaemonOpts::new().no_default_volume());
    let b = server_policy_daemon(opts, "v", 51, "p", 1);
    let run = |d: &Daemon| run_ok(d, "p");
    let set_ids = |d: &Daemon| complete_sets(d, "web");
    run(&b);
    let of_b = set_ids(&b);
    assert_eq!(of_b.len(), 1);
    run(&a);
    let mut first_of_a = set_ids(&a);
    first_of_a.retain(|id| !of_b.contains(id));
    assert_eq!(first_of_a.len(), 1);
    // Sets are ordered by second: the next one is newer.
    thread::sleep(Duration::from_millis(1100));
    run(&a);
    let listed = set_ids(&a);
    assert!(
        listed.contains(&of_b[0]),
        "a's retention deleted b's set: {listed:?}"
    );
    assert!(
        !listed.contains(&first_of_a[0]),
        "a's retention kept two of its sets: {listed:?}"
    );
    assert_eq!(listed.len(), 2, "{listed:?}");
    // b's set still restores b's volume.
    let members = admin_ok(&b, "backup_set.show", json!({"id": of_b[0]}));
    let member = members["members"][0]["backup_id"].clone();
    let v = admin_ok(
        &b,
        "volume.create",
        json!({"name": "v2", "from_backup": member}),
    );
    wait_job_ok(&b, v["job"]["id"].as_str().unwrap());
    assert_same(
        "b's v restored",
        &read_export(&b, "v2"),
        &read_export(&b, "v"),
    );
}

#[test]
fn evsctl_server_and_policy_commands() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume());
    for v in ["a", "b"] {
        half_random(&d, v, 8 * MIB, 43);
    }
    d.evsctl_ok(&["server", "create", "web", "--volume", "a", "--volume", "b"]);
    let text = d.evsctl_ok(&["server", "list"]);
    assert!(text.contains("web") && text.contains("a"), "{text}");
    let out = d.evsctl(&["server", "backup", "web", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        format_output("server backup", &out)
    );
    let sets = d.evsctl_json(&["server", "backups", "web"]);
    let id = sets["backup_sets"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(sets["backup_sets"][0]["state"], "complete", "{sets:#}");
    let text = d.evsctl_ok(&["backup-set", "show", &id]);
    assert!(text.contains(&id), "{text}");
    let out = d.evsctl(&["server", "restore", &id, "--to-new", "-r", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        format_output("server restore", &out)
    );
    assert_same(
        "a restored by evsctl",
        &read_export(&d, "a-r"),
        &read_export(&d, "a"),
    );
    d.evsctl_ok(&[
        "policy", "create", "nightly", "--daily", "02:00", "--keep", "7", "--server", "web",
    ]);
    let text = d.evsctl_ok(&["policy", "list"]);
    assert!(
        text.contains("nightly") && text.contains("daily 02:00"),
        "{text}"
    );
    // Exactly one schedule: clap refuses two with the usage exit code.
    let out = d.evsctl(&[
        "policy", "create", "x", "--daily", "02:00", "--every", "1h", "--volume", "a",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        d.evsctl(&["policy", "show", "missing"]).status.code(),
        Some(4)
    );
    d.evsctl_ok(&["backup-set", "delete", &id]);
    assert_eq!(
        d.evsctl(&["backup-set", "show", &id]).status.code(),
        Some(4)
    );
}
