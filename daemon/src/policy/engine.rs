//! The policy engine: the durable set of policies, deciding which are due, and starting runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::store::{self, PolicyState};
use super::{Clock, PolicyError, PolicyInfo, PolicySpec, RunContext, RunReport, Runner, Target};
use crate::metrics::policy::{PolicyMetrics, PolicySample};

/// How often the real-time loop looks for due policies. Schedules have minute (daily/weekly)
/// or second (every) resolution, so a second of latency is invisible.
const TICK_INTERVAL: Duration = Duration::from_secs(1);

struct Entry {
    spec: PolicySpec,
    state: PolicyState,
    /// In memory only: a run cannot survive a restart.
    running: bool,
}

pub struct Policies {
    path: PathBuf,
    clock: Arc<dyn Clock>,
    /// Held across the file write so the file always reflects the latest change, in order.
    entries: Mutex<BTreeMap<String, Entry>>,
    metrics: OnceLock<Arc<PolicyMetrics>>,
    /// Cancelled when the daemon stops (see `spawn`): runs under way stop where they are.
    stopping: CancellationToken,
}

/// How far in the future a recorded slot may lie before the clock counts as set back.
const CLOCK_BACK_TOLERANCE_SECS: u64 = 300;

impl Policies {
    #[cfg(test)]
    pub fn specs(&self) -> Vec<PolicySpec> {
        self.lock().values().map(|e| e.spec.clone()).collect()
    }

    /// Loads DATA_DIR/policies.json (none yet: no policies). No policy is running after open.
    pub fn open(data_dir: &Path, clock: Arc<dyn Clock>) -> Result<Arc<Policies>, PolicyError> {
        let path = data_dir.join(store::FILE_NAME);
        let mut entries = BTreeMap::new();
        for (spec, state) in store::load(&path)? {
            let name = spec.name.clone();
            let entry = Entry {
                spec,
                state,
                running: false,
            };
            if entries.insert(name.clone(), entry).is_some() {
                return Err(PolicyError::File {
                    path,
                    reason: format!("policy {name:?} appears twice"),
                });
            }
        }
        Ok(Arc::new(Policies {
            path,
            clock,
            entries: Mutex::new(entries),
            metrics: OnceLock::new(),
            stopping: CancellationToken::new(),
        }))
    }

    /// Exports the policies' series from now on (the first call wins).
    pub fn with_metrics(self: Arc<Self>, metrics: Arc<PolicyMetrics>) -> Arc<Self> {
        if self.metrics.set(metrics).is_ok() {
            let entries = self.lock();
            for entry in entries.values() {
                self.publish(entry);
            }
        }
        self
    }

    pub fn create(&self, spec: PolicySpec) -> Result<PolicyInfo, PolicyError> {
        spec.validate()?;
        let now = self.clock.now_unix_secs();
        let mut entries = self.lock();
        if entries.contains_key(&spec.name) {
            return Err(PolicyError::AlreadyExists(spec.name));
        }
        let name = spec.name.clone();
        let entry = Entry {
            spec,
            state: PolicyState {
                enabled: true,
                created_unix_secs: now,
                ..PolicyState::default()
            },
            running: false,
        };
        entries.insert(name.clone(), entry);
        if let Err(e) = self.save(&entries) {
            entries.remove(&name);
            return Err(e);
        }
        let entry = &entries[&name];
        self.publish(entry);
        Ok(self.info(entry, now))
    }

    /// Every policy, by name.
    pub fn list(&self) -> Vec<PolicyInfo> {
        let now = self.clock.now_unix_secs();
        self.lock().values().map(|e| self.info(e, now)).collect()
    }

    pub fn show(&self, name: &str) -> Result<PolicyInfo, PolicyError> {
        let now = self.clock.now_unix_secs();
        let entries = self.lock();
        let entry = entries
            .get(name)
            .ok_or_else(|| PolicyError::NotFound(name.to_owned()))?;
        Ok(self.info(entry, now))
    }

    /// Enabling starts from the next slot: slots that passed while the policy was disabled
    /// were skipped on purpose and are not caught up (unlike slots missed while the daemon
    /// was down).
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<PolicyInfo, PolicyError> {
        let now = self.clock.now_unix_secs();
        let mut entries = self.lock();
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| PolicyError::NotFound(name.to_owned()))?;
        let before = entry.state.clone();
        if enabled && !entry.state.enabled {
            let latest = entry
                .spec
                .schedule
                .latest_slot_at_or_before(entry.state.created_unix_secs, now);
            entry.state.last_slot_unix_secs = entry.state.last_slot_unix_secs.max(latest);
        }
        entry.state.enabled = enabled;
        if let Err(e) = self.save(&entries) {
            if let Some(entry) = entries.get_mut(name) {
                entry.state = before;
            }
            return Err(e);
        }
        let entry = &entries[name];
        self.publish(entry);
        Ok(self.info(entry, now))
    }

    /// Forgets the policy (its backups stay). Refused while it runs: the run's outcome would
    /// have nowhere to go, or land on a new policy of the same name.
    pub fn delete(&self, name: &str) -> Result<(), PolicyError> {
        let mut entries = self.lock();
        let entry = entries
            .get(name)
            .ok_or_else(|| PolicyError::NotFound(name.to_owned()))?;
        if entry.running {
            return Err(PolicyError::Busy(name.to_owned()));
        }
        let removed = entries.remove(name);
        if let Err(e) = self.save(&entries) {
            if let Some(entry) = removed {
                entries.insert(name.to_owned(), entry);
            }
            return Err(e);
        }
        if let Some(metrics) = self.metrics.get() {
            metrics.remove(name);
        }
        Ok(())
    }

    /// Starts a run now, outside the schedule (also when disabled). The schedule is untouched:
    /// a slot that comes due during this run starts once this run has finished.
    pub fn run_now(
        self: &Arc<Self>,
        name: &str,
        runner: Arc<dyn Runner>,
    ) -> Result<PolicyInfo, PolicyError> {
        let now = self.clock.now_unix_secs();
        let (spec, context, info) = {
            let mut entries = self.lock();
            let entry = entries
                .get_mut(name)
                .ok_or_else(|| PolicyError::NotFound(name.to_owned()))?;
            if entry.running {
                return Err(PolicyError::Busy(name.to_owned()));
            }
            entry.running = true;
            entry.state.run_in_progress = true;
            entry.state.last_run_unix_secs = Some(now);
            let spec = entry.spec.clone();
            let context = RunContext {
                resumed_since: None,
                created_unix_secs: entry.state.created_unix_secs,
            };
            // Only last_run changed; the outcome is persisted anyway, so a failed write here
            // must not stop a run the operator asked for.
            if let Err(e) = self.save(&entries) {
                tracing::warn!(policy = name, error = %e, "cannot record the start of a policy run");
            }
            let entry = &entries[name];
            self.publish(entry);
            (spec, context, self.info(entry, now))
        };
        self.start_run(spec, runner, context);
        Ok(info)
    }

    /// Starts every due policy and returns their names. A policy is due when enabled, not
    /// running, and its latest schedule slot is newer than the last one started. That slot is
    /// recorded (durably) before the run starts, so no slot ever starts twice, and slots missed
    /// while the daemon was down start once, not once each.
    pub fn tick(self: &Arc<Self>, runner: &Arc<dyn Runner>) -> Vec<String> {
        let now = self.clock.now_unix_secs();
        // Each with the state before and, for a run started again, when the stopped one began.
        let mut started: Vec<(PolicySpec, PolicyState, Option<u64>)> = Vec::new();
        let mut clock_fixed = false;
        let mut entries = self.lock();
        // Checked under the lock the stop takes to mark a run stopped (after cancelling): a
        // tick under way as the daemon stops would take a run in progress for one to do again
        // now, clear that flag, and the run, aborted at once, would not run at the next start.
        if self.stopping.is_cancelled() {
            return Vec::new();
        }
        for entry in entries.values_mut() {
            if entry.running {
                continue;
            }
            if entry.state.run_in_progress {
                // The daemon stopped during this run (a crash or a shutdown): it runs again,
                // enabled or not, as the slot or the operator that started it asked. Once: the
                // flag is not set for the second attempt, so a run that brings the daemon down
                // every time does not come back at every start.
                tracing::info!(policy = %entry.spec.name, "running again a policy run the daemon stopped during");
                let since = entry.state.last_run_unix_secs;
                started.push((entry.spec.clone(), entry.state.clone(), since));
                entry.state.run_in_progress = false;
                entry.state.last_run_unix_secs = Some(now);
                entry.running = true;
                continue;
            }
            if !entry.state.enabled {
                continue;
            }
            if entry.state.created_unix_secs > now.saturating_add(CLOCK_BACK_TOLERANCE_SECS) {
                // Created while the clock ran ahead: no slot would come until it caught up.
                tracing::warn!(policy = %entry.spec.name, created_unix_secs = entry.state.created_unix_secs, now_unix_secs = now, "the policy was created at a time in the future (the clock was set back): counting from now");
                entry.state.created_unix_secs = now;
                // Its runs so far lie in that future too.
                entry.state.last_slot_unix_secs = None;
                clock_fixed = true;
            }
            let Some(slot) = entry
                .spec
                .schedule
                .latest_slot_at_or_before(entry.state.created_unix_secs, now)
            else {
                continue;
            };
            if entry
                .state
                .last_slot_unix_secs
                .is_some_and(|last| last > now.saturating_add(CLOCK_BACK_TOLERANCE_SECS))
            {
                // The clock was set back after a run at a time now in the future: that slot
                // would hold every run off until the clock caught up with it.
                tracing::warn!(policy = %entry.spec.name, last_slot_unix_secs = ?entry.state.last_slot_unix_secs, now_unix_secs = now, "the last run's slot lies in the future (the clock was set back): counting from now");
                entry.state.last_slot_unix_secs = Some(slot);
                clock_fixed = true;
                continue;
            }
            if Some(slot) <= entry.state.last_slot_unix_secs {
                continue;
            }
            started.push((entry.spec.clone(), entry.state.clone(), None));
            entry.state.last_slot_unix_secs = Some(slot);
            entry.state.last_run_unix_secs = Some(now);
            entry.state.run_in_progress = true;
            entry.running = true;
        }
        if started.is_empty() {
            if clock_fixed {
                // Kept, so that each start does not count from its own time again.
                if let Err(e) = self.save(&entries) {
                    tracing::warn!(error = %e, "cannot record a schedule counted from now");
                }
            }
            return Vec::new();
        }
        if let Err(e) = self.save(&entries) {
            // Starting without the slot on disk could repeat it after a restart; the next
            // tick retries.
            tracing::warn!(error = %e, "cannot record due policy runs; not starting them");
            for (spec, before, _) in started {
                if let Some(entry) = entries.get_mut(&spec.name) {
                    entry.state = before;
                    entry.running = false;
                }
            }
            return Vec::new();
        }
        for (spec, _, _) in &started {
            self.publish(&entries[&spec.name]);
        }
        drop(entries);
        started
            .into_iter()
            .map(|(spec, before, resumed_since)| {
                let name = spec.name.clone();
                tracing::info!(policy = %name, "starting scheduled policy run");
                let context = RunContext {
                    resumed_since,
                    created_unix_secs: before.created_unix_secs,
                };
                self.start_run(spec, Arc::clone(runner), context);
                name
            })
            .collect()
    }

    /// The real-time loop: ticks every second until `shutdown`. A run in progress at shutdown
    /// stops there, its outcome not recorded: it stays in progress on disk and runs again at
    /// the next start (see `start_run`).
    pub fn spawn(self: &Arc<Self>, runner: Arc<dyn Runner>, shutdown: CancellationToken) {
        // Runs stop the moment the shutdown comes, not once the loop gets round to it.
        let (stopping, watched) = (self.stopping.clone(), shutdown.clone());
        tokio::spawn(async move {
            watched.cancelled().await;
            stopping.cancel();
        });
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                // A tick that starts runs writes the file durably: off the runtime's threads.
                let (ticking, runner) = (Arc::clone(&this), Arc::clone(&runner));
                if let Err(e) = tokio::task::spawn_blocking(move || ticking.tick(&runner)).await {
                    tracing::error!(error = %e, "a policy tick failed");
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(TICK_INTERVAL) => {}
                }
            }
            this.stopping.cancel();
        });
    }

    fn start_run(self: &Arc<Self>, spec: PolicySpec, runner: Arc<dyn Runner>, context: RunContext) {
        let this = Arc::clone(self);
        let name = spec.name.clone();
        tokio::spawn(async move {
            // The runner gets its own task so that a panic in it becomes a failed run instead
            // of a policy marked running forever.
            let mut run = tokio::spawn(async move { runner.run(&spec, context).await });
            let outcome = tokio::select! {
                // A run ending as the shutdown comes ended because of it, most likely.
                biased;
                () = this.stopping.cancelled() => {
                    // The shutdown interrupts the run's backup jobs, which then fail: recorded,
                    // that would read as the run's failure and clear it from the runs to do
                    // again, and the run would go on to retention meanwhile. Its jobs resume by
                    // themselves at the next start, and the run with them.
                    run.abort();
                    tracing::info!(policy = %name, "policy run stopped by the shutdown; it runs again at the next start");
                    if let Some(entry) = this.lock().get_mut(&name) {
                        entry.running = false;
                    }
                    return;
                }
                outcome = &mut run => outcome,
            };
            let outcome =
                outcome.unwrap_or_else(|e| Err(format!("policy run ended abnormally: {e}")));
            // Written durably: off the runtime's threads.
            let finishing = Arc::clone(&this);
            let finished =
                tokio::task::spawn_blocking(move || finishing.finish(&name, outcome)).await;
            if let Err(e) = finished {
                tracing::error!(error = %e, "recording a policy run's outcome failed");
            }
        });
    }

    fn finish(&self, name: &str, outcome: Result<RunReport, String>) {
        let now = self.clock.now_unix_secs();
        let mut entries = self.lock();
        // delete refuses running policies, so the entry is there.
        let Some(entry) = entries.get_mut(name) else {
            return;
        };
        entry.running = false;
        entry.state.run_in_progress = false;
        match outcome {
            Ok(report) => {
                tracing::info!(
                    policy = name,
                    backups_kept = report.backups_kept,
                    "policy run succeeded"
                );
                entry.state.last_success_unix_secs = Some(now);
                entry.state.last_error = None;
                entry.state.backups_kept = report.backups_kept;
                entry.state.stored_bytes = report.stored_bytes;
            }
            Err(message) => {
                tracing::warn!(policy = name, error = %message, "policy run failed");
                entry.state.last_failure_unix_secs = Some(now);
                entry.state.last_error = Some(message);
            }
        }
        if let Err(e) = self.save(&entries) {
            // The outcome stays visible in memory; the slot itself is already on disk.
            tracing::warn!(policy = name, error = %e, "cannot record a policy run's outcome");
        }
        self.publish(&entries[name]);
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // A poisoned lock only means a thread panicked mid-update of plain data; keep going.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, entries: &BTreeMap<String, Entry>) -> Result<(), PolicyError> {
        store::save(&self.path, entries.values().map(|e| (&e.spec, &e.state)))
    }

    fn publish(&self, entry: &Entry) {
        if let Some(metrics) = self.metrics.get() {
            metrics.update(
                &entry.spec.name,
                &PolicySample {
                    last_success_unix_secs: entry.state.last_success_unix_secs,
                    last_failure_unix_secs: entry.state.last_failure_unix_secs,
                    backups_kept: entry.state.backups_kept,
                    stored_bytes: entry.state.stored_bytes,
                    running: entry.running,
                },
            );
        }
    }

    fn info(&self, entry: &Entry, now_unix_secs: u64) -> PolicyInfo {
        let state = &entry.state;
        let (volumes, servers) = match &entry.spec.target {
            Target::Volumes(v) => (v.clone(), Vec::new()),
            Target::Servers(s) => (Vec::new(), s.clone()),
        };
        let next_run_unix_secs = state
            .enabled
            .then(|| {
                let after = now_unix_secs.max(state.last_slot_unix_secs.unwrap_or(0));
                entry
                    .spec
                    .schedule
                    .next_slot_after(state.created_unix_secs, after)
            })
            // A schedule that never fires saturates; show it as "no next run".
            .filter(|slot| *slot != u64::MAX);
        PolicyInfo {
            name: entry.spec.name.clone(),
            schedule: entry.spec.schedule.to_string(),
            keep: entry.spec.keep,
            keep_days: entry.spec.keep_days,
            volumes,
            servers,
            enabled: state.enabled,
            created_unix_secs: state.created_unix_secs,
            next_run_unix_secs,
            running: entry.running,
            last_run_unix_secs: state.last_run_unix_secs,
            last_success_unix_secs: state.last_success_unix_secs,
            last_failure_unix_secs: state.last_failure_unix_secs,
            last_error: state.last_error.clone(),
            backups_kept: state.backups_kept,
        }
    }
}

#[cfg(test)]
mod tests;
