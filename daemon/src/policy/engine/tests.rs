//! Engine tests with a hand-moved clock and a scripted runner; nothing sleeps beyond a few ms.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Semaphore;

use super::*;
use crate::policy::Schedule;

struct FakeClock(AtomicU64);

impl FakeClock {
    fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
    fn set(&self, secs: u64) {
        self.0.store(secs, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_unix_secs(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Counts runs, tracks how many overlap, returns scripted outcomes (Ok by default), and
/// optionally blocks each run until a permit is released.
#[derive(Default)]
struct FakeRunner {
    runs: AtomicU64,
    active: AtomicU64,
    max_active: AtomicU64,
    outcomes: Mutex<VecDeque<Result<RunReport, String>>>,
    gate: Option<Semaphore>,
    /// The `resumed_since` of each run, in order.
    resumed: Mutex<Vec<Option<u64>>>,
}

impl FakeRunner {
    fn gated() -> FakeRunner {
        FakeRunner {
            gate: Some(Semaphore::new(0)),
            ..FakeRunner::default()
        }
    }
    fn script(&self, outcome: Result<RunReport, String>) {
        self.outcomes.lock().unwrap().push_back(outcome);
    }
    fn release(&self, runs: usize) {
        if let Some(gate) = &self.gate {
            gate.add_permits(runs);
        }
    }
    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Runner for FakeRunner {
    async fn run(&self, _policy: &PolicySpec, context: RunContext) -> Result<RunReport, String> {
        self.resumed.lock().unwrap().push(context.resumed_since);
        self.runs.fetch_add(1, Ordering::SeqCst);
        let active = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(active, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
        let scripted = self.outcomes.lock().unwrap().pop_front();
        scripted.unwrap_or(Ok(RunReport {
            backups_kept: 2,
            stored_bytes: 1 << 20,
        }))
    }
}

const T0: u64 = 1_704_067_200; // 2024-01-01T00:00:00Z, a Monday

struct Fixture {
    dir: tempfile::TempDir,
    clock: Arc<FakeClock>,
    policies: Arc<Policies>,
    fake: Arc<FakeRunner>,
    runner: Arc<dyn Runner>,
    /// The engines before each `restart`: runs they started still end there, and write the
    /// file when they do.
    before_restarts: Vec<Arc<Policies>>,
}

impl Fixture {
    fn new(fake: FakeRunner) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock(AtomicU64::new(T0)));
        let policies = Policies::open(dir.path(), clock.clone()).unwrap();
        let fake = Arc::new(fake);
        let runner: Arc<dyn Runner> = fake.clone();
        Fixture {
            dir,
            clock,
            policies,
            fake,
            runner,
            before_restarts: Vec::new(),
        }
    }

    /// Opens the engine again from the same directory ("restart").
    fn restart(&mut self) {
        let reopened = Policies::open(self.dir.path(), self.clock.clone()).unwrap();
        let before = std::mem::replace(&mut self.policies, reopened);
        self.before_restarts.push(before);
    }

    fn tick(&self) -> Vec<String> {
        self.policies.tick(&self.runner)
    }

    /// Waits (about 200 ms at most) until the runner has started `runs` runs.
    async fn wait_runs(&self, runs: u64) {
        for _ in 0..200 {
            if self.fake.runs() == runs {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(self.fake.runs(), runs);
    }

    /// Waits (5 s at most: the outcome is written on a blocking thread) for the run to end,
    /// and for those of the engines before restarts.
    async fn wait_idle(&self, name: &str) -> PolicyInfo {
        for _ in 0..5_000 {
            let info = self.policies.show(name).unwrap();
            let earlier_done =
                (self.before_restarts.iter()).all(|p| p.show(name).is_ok_and(|info| !info.running));
            if !info.running && earlier_done {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("policy {name} still running");
    }
}

fn every(name: &str, interval_secs: u64) -> PolicySpec {
    PolicySpec {
        name: name.to_owned(),
        schedule: Schedule::Every { interval_secs },
        keep: Some(3),
        keep_days: None,
        target: Target::Volumes(vec!["vol1".into()]),
    }
}

#[tokio::test]
async fn every_policy_is_due_at_its_first_slot_and_once_per_slot() {
    let f = Fixture::new(FakeRunner::default());
    let info = f.policies.create(every("p", 60)).unwrap();
    assert_eq!(info.created_unix_secs, T0);
    assert_eq!(info.next_run_unix_secs, Some(T0 + 60));
    assert!(info.enabled && !info.running && info.last_run_unix_secs.is_none());

    f.clock.advance(59);
    assert!(f.tick().is_empty(), "not due before the first slot");
    f.clock.advance(1);
    assert_eq!(f.tick(), vec!["p"]);
    let info = f.wait_idle("p").await;
    assert_eq!(f.fake.runs(), 1);
    assert_eq!(info.last_run_unix_secs, Some(T0 + 60));
    assert_eq!(info.last_success_unix_secs, Some(T0 + 60));
    assert_eq!(info.backups_kept, 2);
    assert_eq!(info.next_run_unix_secs, Some(T0 + 120));

    f.clock.advance(30);
    assert!(f.tick().is_empty(), "one run per slot");
    assert!(f.tick().is_empty());
    f.clock.advance(30);
    assert_eq!(f.tick(), vec!["p"]);
    f.wait_idle("p").await;
    assert_eq!(f.fake.runs(), 2);
}

#[tokio::test]
async fn a_clock_set_back_does_not_hold_the_schedule_off() {
    let f = Fixture::new(FakeRunner::default());
    f.policies.create(every("p", 60)).unwrap();
    // The clock runs a year ahead, a slot runs there, then the clock is set right.
    f.clock.advance(365 * 86_400);
    assert_eq!(f.tick(), vec!["p"]);
    f.wait_idle("p").await;
    f.clock.set(T0 + 120);
    assert!(f.tick().is_empty(), "the current slot counts as started");
    f.clock.advance(60);
    assert_eq!(f.tick(), vec!["p"], "the next slot runs");
    f.wait_idle("p").await;
    assert_eq!(f.fake.runs(), 2);
}

#[tokio::test]
async fn a_policy_created_while_the_clock_ran_ahead_runs_once_it_is_set_right() {
    let mut f = Fixture::new(FakeRunner::default());
    f.clock.advance(365 * 86_400);
    f.policies.create(every("p", 60)).unwrap();
    f.clock.set(T0);
    assert!(f.tick().is_empty());
    // The new count is kept: a restart does not start it again from its own time.
    f.restart();
    f.clock.advance(30);
    assert!(f.tick().is_empty());
    f.clock.advance(30);
    assert_eq!(f.tick(), vec!["p"]);
    f.wait_idle("p").await;
}

#[tokio::test]
async fn failures_are_recorded_and_cleared_by_success() {
    let f = Fixture::new(FakeRunner::default());
    f.policies.create(every("p", 10)).unwrap();
    f.fake.script(Err("store unavailable: bucket b".into()));
    f.clock.advance(10);
    f.tick();
    let info = f.wait_idle("p").await;
    assert_eq!(
        info.last_error.as_deref(),
        Some("store unavailable: bucket b")
    );
    assert_eq!(info.last_failure_unix_secs, Some(T0 + 10));
    assert_eq!(info.last_success_unix_secs, None);
    f.clock.advance(10);
    f.tick();
    let info = f.wait_idle("p").await;
    assert_eq!(info.last_error, None);
    assert_eq!(info.last_success_unix_secs, Some(T0 + 20));
    assert_eq!(info.last_failure_unix_secs, Some(T0 + 10));
}

#[tokio::test]
async fn slots_missed_across_a_restart_run_exactly_once() {
    let mut f = Fixture::new(FakeRunner::default());
    f.policies.create(every("p", 60)).unwrap();
    f.clock.advance(60);
    assert_eq!(f.tick(), vec!["p"]);
    f.wait_idle("p").await;

    f.restart();
    f.clock.advance(5 * 60 + 10); // five slots pass while "down"
    assert_eq!(f.tick(), vec!["p"]);
    f.wait_idle("p").await;
    assert!(f.tick().is_empty());
    assert_eq!(f.fake.runs(), 2);
    // The next one is the schedule's next slot, not a catch-up.
    let info = f.policies.show("p").unwrap();
    assert_eq!(info.next_run_unix_secs, Some(T0 + 7 * 60));

    // A restart right after a started slot does not start it again.
    f.restart();
    assert!(f.tick().is_empty());
    assert_eq!(f.fake.runs(), 2);
}

#[tokio::test]
async fn an_interrupted_run_runs_again_once_and_its_slot_is_not_repeated() {
    // The daemon stops mid-run: after the restart that run runs again (its targets may not
    // all be backed up), once; the slot stays recorded, so the next run is the next slot's.
    let mut f = Fixture::new(FakeRunner::gated());
    f.policies.create(every("p", 60)).unwrap();
    f.clock.advance(60);
    assert_eq!(f.tick(), vec!["p"]);
    f.restart();
    assert!(!f.policies.show("p").unwrap().running);
    f.clock.advance(5);
    assert_eq!(f.tick(), vec!["p"], "the interrupted run runs again");
    assert!(f.tick().is_empty());
    // Interrupted again (say it brings the daemon down): not a third time.
    f.restart();
    assert!(
        f.tick().is_empty(),
        "an interrupted run runs again only once"
    );
    f.fake.release(2);
    // The engines before the restarts record their runs' outcomes first (one engine, one
    // writer of the file, as in the daemon).
    f.wait_idle("p").await;
    f.clock.advance(60);
    assert_eq!(f.tick(), vec!["p"], "the next slot runs");
    f.fake.release(1);
    let info = f.wait_idle("p").await;
    assert!(info.last_success_unix_secs.is_some());
    // The second attempt was told when the stopped run began (so it can count what that run
    // backed up); the others were not.
    let mut resumed = f.fake.resumed.lock().unwrap().clone();
    resumed.sort();
    assert_eq!(resumed, [None, None, Some(T0 + 60)]);
    // Finished: a restart now starts nothing until the next slot.
    f.restart();
    assert!(f.tick().is_empty());
}

#[tokio::test]
async fn never_two_runs_of_one_policy_at_once() {
    let f = Fixture::new(FakeRunner::gated());
    f.policies.create(every("p", 10)).unwrap();
    f.clock.advance(10);
    assert_eq!(f.tick(), vec!["p"]);
    assert!(f.policies.show("p").unwrap().running);
    // Slots come due while it runs: nothing starts.
    f.clock.advance(30);
    assert!(f.tick().is_empty());
    assert!(matches!(
        f.policies.run_now("p", f.runner.clone()),
        Err(PolicyError::Busy(n)) if n == "p"
    ));
    assert!(matches!(f.policies.delete("p"), Err(PolicyError::Busy(_))));
    f.fake.release(1);
    f.wait_idle("p").await;
    // The slot that passed during the run starts once, afterwards.
    assert_eq!(f.tick(), vec!["p"]);
    assert!(f.tick().is_empty());
    f.fake.release(1);
    f.wait_idle("p").await;
    assert_eq!(f.fake.runs(), 2);
    assert_eq!(f.fake.max_active.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn run_now_runs_even_when_disabled_and_blocks_tick() {
    let f = Fixture::new(FakeRunner::gated());
    f.policies.create(every("p", 10)).unwrap();
    f.policies.set_enabled("p", false).unwrap();
    let info = f.policies.run_now("p", f.runner.clone()).unwrap();
    assert!(info.running);
    assert_eq!(info.last_run_unix_secs, Some(T0));
    assert!(matches!(
        f.policies.run_now("p", f.runner.clone()),
        Err(PolicyError::Busy(_))
    ));
    f.policies.set_enabled("p", true).unwrap();
    f.clock.advance(10);
    assert!(
        f.tick().is_empty(),
        "a run_now in progress holds the slot back"
    );
    f.fake.release(1);
    f.wait_idle("p").await;
    assert_eq!(f.tick(), vec!["p"]);
    f.fake.release(1);
    f.wait_idle("p").await;
    assert_eq!(f.fake.runs(), 2);
    assert_eq!(f.fake.max_active.load(Ordering::SeqCst), 1);
    assert!(matches!(
        f.policies.run_now("nope", f.runner.clone()),
        Err(PolicyError::NotFound(_))
    ));
}

#[tokio::test]
async fn disabled_policies_are_not_ticked_and_skip_missed_slots() {
    let f = Fixture::new(FakeRunner::default());
    f.policies.create(every("p", 10)).unwrap();
    let info = f.policies.set_enabled("p", false).unwrap();
    assert!(!info.enabled);
    assert_eq!(info.next_run_unix_secs, None);
    f.clock.advance(35);
    assert!(f.tick().is_empty());
    // Re-enabled: the slots passed while disabled are skipped; the next one runs.
    let info = f.policies.set_enabled("p", true).unwrap();
    assert_eq!(info.next_run_unix_secs, Some(T0 + 40));
    assert!(f.tick().is_empty());
    f.clock.advance(5);
    assert_eq!(f.tick(), vec!["p"]);
    f.wait_idle("p").await;
    assert_eq!(f.fake.runs(), 1);
}

#[tokio::test]
async fn daily_and_weekly_policies_run_at_wall_clock_times() {
    let f = Fixture::new(FakeRunner::default());
    f.clock.set(T0 + 3_600); // Monday 01:00
    let mut daily = every("daily", 1);
    daily.schedule = Schedule::daily("02:00").unwrap();
    let mut weekly = every("weekly", 1);
    weekly.schedule = Schedule::weekly("WED@00:30").unwrap();
    weekly.target = Target::Servers(vec!["web1".into()]);
    assert_eq!(
        f.policies.create(daily).unwrap().next_run_unix_secs,
        Some(T0 + 7_200)
    );
    let info = f.policies.create(weekly).unwrap();
    assert_eq!(info.next_run_unix_secs, Some(T0 + 2 * 86_400 + 1_800));
    assert_eq!(info.servers, vec!["web1"]);
    assert!(info.volumes.is_empty());

    f.clock.set(T0 + 7_199);
    assert!(f.tick().is_empty());
    f.clock.set(T0 + 7_200);
    assert_eq!(f.tick(), vec!["daily"]);
    f.wait_idle("daily").await;
    // Wednesday 01:00: the daily missed Tuesday's and Wednesday's slots (runs once), the
    // weekly is due.
    f.clock.set(T0 + 2 * 86_400 + 3_600);
    assert_eq!(f.tick(), vec!["daily", "weekly"]);
    f.wait_idle("daily").await;
    f.wait_idle("weekly").await;
    assert!(f.tick().is_empty());
    assert_eq!(f.fake.runs(), 3);
    let info = f.policies.show("weekly").unwrap();
    assert_eq!(info.next_run_unix_secs, Some(T0 + 9 * 86_400 + 1_800));
}

#[tokio::test]
async fn policies_persist_across_open() {
    let mut f = Fixture::new(FakeRunner::default());
    let mut spec = every("nightly", 3_600);
    spec.schedule = Schedule::weekly("MON,THU@03:30").unwrap();
    spec.keep = None;
    spec.keep_days = Some(14);
    f.policies.create(spec).unwrap();
    f.policies.create(every("often", 30)).unwrap();
    f.policies.set_enabled("often", false).unwrap();
    f.fake.script(Err("volume vol1 not found".into()));
    f.policies.run_now("nightly", f.runner.clone()).unwrap();
    let before = f.wait_idle("nightly").await;
    let listed = f.policies.list();

    f.restart();
    assert_eq!(f.policies.list(), listed);
    assert_eq!(f.policies.show("nightly").unwrap(), before);
    assert_eq!(before.schedule, "weekly MON,THU@03:30");
    assert_eq!(before.keep_days, Some(14));
    assert_eq!(before.last_error.as_deref(), Some("volume vol1 not found"));
    let specs = f.policies.specs();
    assert_eq!(specs.len(), 2);
    assert_eq!(specs[1].target, Target::Volumes(vec!["vol1".into()]));

    f.policies.delete("often").unwrap();
    f.restart();
    assert!(matches!(
        f.policies.show("often"),
        Err(PolicyError::NotFound(_))
    ));
    assert_eq!(f.policies.list().len(), 1);
}

#[tokio::test]
async fn create_and_friends_refuse_bad_requests() {
    let f = Fixture::new(FakeRunner::default());
    f.policies.create(every("p", 10)).unwrap();
    assert!(matches!(
        f.policies.create(every("p", 20)),
        Err(PolicyError::AlreadyExists(n)) if n == "p"
    ));
    assert!(matches!(
        f.policies.create(every(".p", 20)),
        Err(PolicyError::InvalidName(_))
    ));
    let mut no_target = every("q", 10);
    no_target.target = Target::Volumes(vec![]);
    assert!(matches!(
        f.policies.create(no_target),
        Err(PolicyError::InvalidArgument(_))
    ));
    assert!(matches!(
        f.policies.show("q"),
        Err(PolicyError::NotFound(_))
    ));
    assert!(matches!(
        f.policies.set_enabled("q", true),
        Err(PolicyError::NotFound(_))
    ));
    assert!(matches!(
        f.policies.delete("q"),
        Err(PolicyError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_broken_policy_file_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.json");
    std::fs::write(&path, b"{not json").unwrap();
    let clock = Arc::new(FakeClock(AtomicU64::new(T0)));
    let err = Policies::open(dir.path(), clock.clone()).err().unwrap();
    assert!(
        matches!(&err, PolicyError::File { path: p, .. } if *p == path),
        "{err}"
    );
    std::fs::write(&path, br#"{"format_version": 9, "policies": []}"#).unwrap();
    let err = Policies::open(dir.path(), clock).err().unwrap();
    assert!(err.to_string().contains("format_version 9"), "{err}");
}

#[tokio::test]
async fn a_failed_write_starts_nothing() {
    let f = Fixture::new(FakeRunner::default());
    f.policies.create(every("p", 10)).unwrap();
    // Replace the file's location with a directory so the rename over it fails.
    let path = f.dir.path().join("policies.json");
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    f.clock.advance(10);
    assert!(f.tick().is_empty());
    assert!(!f.policies.show("p").unwrap().running);
    assert!(matches!(
        f.policies.create(every("q", 10)),
        Err(PolicyError::File { .. })
    ));
    assert!(
        f.policies.show("q").is_err(),
        "a create that was not saved is undone"
    );
    std::fs::remove_dir(&path).unwrap();
    assert_eq!(f.tick(), vec!["p"]);
    f.wait_idle("p").await;
}

#[tokio::test]
async fn a_panicking_runner_is_a_failed_run() {
    struct Panics;
    #[async_trait::async_trait]
    impl Runner for Panics {
        async fn run(&self, policy: &PolicySpec, _: RunContext) -> Result<RunReport, String> {
            panic!("runner bug for {}", policy.name);
        }
    }
    let f = Fixture::new(FakeRunner::default());
    f.policies.create(every("p", 10)).unwrap();
    f.policies.run_now("p", Arc::new(Panics)).unwrap();
    let info = f.wait_idle("p").await;
    assert!(info.last_error.unwrap().contains("ended abnormally"));
}

#[tokio::test]
async fn metrics_follow_the_policies() {
    let f = Fixture::new(FakeRunner::gated());
    let metrics = Arc::new(PolicyMetrics::default());
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    f.policies.create(every("p", 10)).unwrap();
    let policies = Arc::clone(&f.policies).with_metrics(Arc::clone(&metrics));
    let encode = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    };
    assert!(encode().contains(r#"evsd_policy_running{policy="p"} 0"#));
    f.clock.advance(10);
    policies.tick(&f.runner);
    assert!(encode().contains(r#"evsd_policy_running{policy="p"} 1"#));
    f.fake.release(1);
    f.wait_idle("p").await;
    let text = encode();
    assert!(
        text.contains(r#"evsd_policy_running{policy="p"} 0"#),
        "{text}"
    );
    assert!(text.contains(&format!(
        r#"evsd_policy_last_success_unix_seconds{{policy="p"}} {}"#,
        T0 + 10
    )));
    assert!(text.contains(r#"evsd_policy_stored_bytes{policy="p"} 1048576"#));
    assert!(text.contains(r#"evsd_policy_backups_kept{policy="p"} 2"#));
    policies.delete("p").unwrap();
    assert!(!encode().contains(r#"policy="p""#));
}

#[tokio::test]
async fn the_real_time_loop_ticks_until_shutdown() {
    let f = Fixture::new(FakeRunner::default());
    f.policies.create(every("p", 10)).unwrap();
    f.clock.advance(10);
    let shutdown = CancellationToken::new();
    f.policies.spawn(f.runner.clone(), shutdown.clone());
    // The loop ticks at once, then every second; the first tick starts the due run.
    f.wait_runs(1).await;
    shutdown.cancel();
    f.wait_idle("p").await;
}

#[tokio::test]
async fn a_run_under_way_at_shutdown_records_no_outcome_and_runs_again() {
    let mut f = Fixture::new(FakeRunner::gated());
    f.policies.create(every("p", 60)).unwrap();
    f.clock.advance(60);
    let shutdown = CancellationToken::new();
    f.policies.spawn(f.runner.clone(), shutdown.clone());
    f.wait_runs(1).await;
    // Its jobs interrupted by the shutdown, the run would fail: it must not be recorded so.
    f.fake
        .script(Err("backup of volume \"v\" failed: interrupted".into()));
    shutdown.cancel();
    let info = f.wait_idle("p").await;
    f.fake.release(1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let info_later = f.policies.show("p").unwrap();
    for info in [info, info_later] {
        assert!(info.last_error.is_none() && info.last_failure_unix_secs.is_none());
    }
    // A tick as the daemon stops starts nothing, so the stopped run is still to do.
    assert!(f.tick().is_empty(), "a tick after the stop started a run");
    f.restart();
    f.clock.advance(5);
    assert_eq!(f.tick(), vec!["p"], "the stopped run runs again");
    f.wait_runs(2).await;
    assert_eq!(f.fake.resumed.lock().unwrap().last(), Some(&Some(T0 + 60)));
}
