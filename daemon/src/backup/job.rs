//! One background job (backup, restore or verify): its progress counters, its state and what
//! `job.show` reports of it.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::backup::error::BackupError;
use crate::storage::entry::now_unix_secs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Backup,
    Restore,
    Verify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    /// Running, but the store is failing and the job backs off before trying again.
    Retrying,
    Succeeded,
    Failed,
    /// Ended by `job.cancel`; it does not resume.
    Cancelled,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_uploaded: u64,
    pub rate_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobInfo {
    pub id: String,
    pub kind: JobKind,
    pub state: JobState,
    pub volume: String,
    pub backup_id: String,
    /// The backup policy whose run started it (None: started by hand).
    pub policy: Option<String>,
    pub started_unix_secs: u64,
    pub finished_unix_secs: Option<u64>,
    pub progress: Progress,
    pub error: Option<String>,
    pub result: Option<Value>,
}

struct Status {
    policy: Option<String>,
    state: JobState,
    finished_unix_secs: Option<u64>,
    error: Option<String>,
    result: Option<Value>,
    /// Store operations of this job now waiting to try again: the job is `Retrying` while any
    /// is (its tasks retry each on their own).
    retrying_ops: u32,
    /// How long the job ran, once it has ended (its rate stays what it was).
    ran_for: Option<std::time::Duration>,
}

pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub volume: String,
    pub backup_id: String,
    started_unix_secs: u64,
    /// Rate and ETA count from here: the start of this run (a resumed job restarts it).
    started: Instant,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    bytes_uploaded: AtomicU64,
    status: Mutex<Status>,
    /// Turns true when the job finishes, for callers that wait on it.
    finished: tokio::sync::watch::Sender<bool>,
    /// Cancelled by `job.cancel` or by daemon shutdown (a child of the daemon's token):
    /// [`Job::stopped`] tells which.
    stop: CancellationToken,
    /// [`RUNNING`], [`CANCEL_REQUESTED`] or [`COMMITTED`]: a cancel and the commit point race
    /// for it, so a job is either cancelled or kept, never both.
    cancel_state: AtomicU8,
    /// A restore job has started writing to its volume.
    touched: std::sync::atomic::AtomicBool,
}

const RUNNING: u8 = 0;
/// `job.cancel` was asked: this wins over a shutdown at the same time (the job must not
/// resume).
const CANCEL_REQUESTED: u8 = 1;
/// The job reached the point from which it completes (a backup storing its manifest): a cancel
/// is refused from here.
const COMMITTED: u8 = 2;

/// Why [`Job::cancel`] did not cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRefused {
    Finished,
    AlreadyRequested,
    Committed,
}

impl Job {
    /// `shutdown`: the daemon's token; the job stops with it, or alone by [`Job::cancel`].
    pub fn new(
        id: String,
        kind: JobKind,
        volume: String,
        backup_id: String,
        shutdown: &CancellationToken,
    ) -> Job {
        Job {
            id,
            kind,
            volume,
            backup_id,
            started_unix_secs: now_unix_secs(),
            started: Instant::now(),
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            bytes_uploaded: AtomicU64::new(0),
            status: Mutex::new(Status {
                policy: None,
                state: JobState::Running,
                finished_unix_secs: None,
                error: None,
                result: None,
                retrying_ops: 0,
                ran_for: None,
            }),
            finished: tokio::sync::watch::Sender::new(false),
            stop: shutdown.child_token(),
            cancel_state: AtomicU8::new(RUNNING),
            touched: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Asks the job to stop; its loops and retries notice at once (an operation in flight is
    /// abandoned).
    pub fn cancel(&self) -> Result<(), CancelRefused> {
        if self.state().is_finished() {
            return Err(CancelRefused::Finished);
        }
        match self.cancel_state.compare_exchange(
            RUNNING,
            CANCEL_REQUESTED,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) => {
                self.stop.cancel();
                Ok(())
            }
            Err(CANCEL_REQUESTED) => Err(CancelRefused::AlreadyRequested),
            Err(_) => Err(CancelRefused::Committed),
        }
    }

    /// Marks the point from which the job completes rather than being cancelled (before a
    /// backup stores its manifest, which makes the backup exist). Err when a cancel came first.
    pub fn commit(&self) -> Result<(), BackupError> {
        match self.cancel_state.compare_exchange(
            RUNNING,
            COMMITTED,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) | Err(COMMITTED) => Ok(()),
            Err(_) => Err(BackupError::CancelledByRequest),
        }
    }

    /// Whether the job has passed its commit point (see [`Job::commit`]).
    pub fn committed(&self) -> bool {
        self.cancel_state.load(Ordering::SeqCst) == COMMITTED
    }

    /// Resolves once the job must stop what it is doing: it was cancelled before its commit
    /// point, or the daemon is shutting down.
    pub async fn stop_requested(&self) {
        self.stop.cancelled().await;
    }

    /// Why the job must stop now, if it must: it was cancelled (it does not resume; this wins
    /// over a shutdown at the same time), or the daemon is shutting down (it resumes at the
    /// next start).
    pub fn stopped(&self, shutdown: &CancellationToken) -> Option<BackupError> {
        if self.cancel_state.load(Ordering::SeqCst) == CANCEL_REQUESTED {
            Some(BackupError::CancelledByRequest)
        } else if shutdown.is_cancelled() {
            Some(BackupError::Cancelled("the daemon is shutting down".into()))
        } else {
            None
        }
    }

    /// Called before a restore's first write to its volume.
    pub fn touch(&self) {
        self.touched.store(true, Ordering::SeqCst);
    }

    /// Whether [`Job::touch`] was called: something may have been written.
    pub fn touched(&self) -> bool {
        self.touched.load(Ordering::SeqCst)
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_policy(&self, policy: Option<String>) {
        self.status().policy = policy;
    }

    pub fn set_total(&self, bytes: u64) {
        self.bytes_total.store(bytes, Ordering::Relaxed);
    }

    pub fn add_done(&self, bytes: u64) {
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_uploaded(&self, bytes: u64) {
        self.bytes_uploaded.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn bytes_done(&self) -> u64 {
        self.bytes_done.load(Ordering::Relaxed)
    }

    pub fn bytes_total(&self) -> u64 {
        self.bytes_total.load(Ordering::Relaxed)
    }

    pub fn bytes_uploaded(&self) -> u64 {
        self.bytes_uploaded.load(Ordering::Relaxed)
    }

    pub fn state(&self) -> JobState {
        self.status().state
    }

    /// A store operation failed with `error` and waits to try again; `first`: its first
    /// failure (it then counts among the retrying ones until [`Job::retry_ended`]).
    pub fn set_retrying(&self, error: &str, first: bool) {
        let mut status = self.status();
        if first {
            status.retrying_ops += 1;
        }
        if !status.state.is_finished() {
            status.state = JobState::Retrying;
            status.error = Some(error.to_owned());
        }
    }

    /// A store operation that had failed ended (answered, gave up, or was dropped). The job is
    /// running again once no other operation still waits.
    pub fn retry_ended(&self) {
        let mut status = self.status();
        status.retrying_ops = status.retrying_ops.saturating_sub(1);
        if status.retrying_ops == 0 && status.state == JobState::Retrying {
            status.state = JobState::Running;
            status.error = None;
        }
    }

    pub fn finish(&self, outcome: Result<Option<Value>, String>) {
        {
            let mut status = self.status();
            status.finished_unix_secs = Some(now_unix_secs());
            status.ran_for = Some(self.started.elapsed());
            match outcome {
                Ok(result) => {
                    status.state = JobState::Succeeded;
                    status.error = None;
                    status.result = result;
                }
                Err(error) => {
                    status.state = JobState::Failed;
                    status.error = Some(error);
                }
            }
        }
        self.finished.send_replace(true);
    }

    /// Ends a job that `job.cancel` stopped; `cleanup`: what was undone, for `job.show`.
    pub fn finish_cancelled(&self, cleanup: &str) {
        {
            let mut status = self.status();
            status.finished_unix_secs = Some(now_unix_secs());
            status.ran_for = Some(self.started.elapsed());
            status.state = JobState::Cancelled;
            status.error = Some(format!("cancelled by job.cancel; {cleanup}"));
        }
        self.finished.send_replace(true);
    }

    /// Returns once the job has finished or `max` has passed, whichever is first.
    pub async fn wait_finished(&self, max: Duration) {
        let mut finished = self.finished.subscribe();
        let _ = tokio::time::timeout(max, finished.wait_for(|done| *done)).await;
    }

    pub fn info(&self) -> JobInfo {
        let status = self.status();
        let done = self.bytes_done();
        let total = self.bytes_total().max(done);
        let elapsed_secs = status
            .ran_for
            .unwrap_or_else(|| self.started.elapsed())
            .as_secs_f64();
        let rate = if elapsed_secs > 0.0 {
            (done as f64 / elapsed_secs) as u64
        } else {
            0
        };
        let eta_secs = if status.state.is_finished() {
            Some(0)
        } else if rate > 0 {
            Some((total - done).div_ceil(rate))
        } else {
            None
        };
        JobInfo {
            id: self.id.clone(),
            kind: self.kind,
            state: status.state,
            volume: self.volume.clone(),
            backup_id: self.backup_id.clone(),
            policy: status.policy.clone(),
            started_unix_secs: self.started_unix_secs,
            finished_unix_secs: status.finished_unix_secs,
            progress: Progress {
                bytes_done: done,
                bytes_total: total,
                bytes_uploaded: self.bytes_uploaded(),
                rate_bytes_per_sec: rate,
                eta_secs,
            },
            error: status.error.clone(),
            result: status.result.clone(),
        }
    }
}

/// A job id: `j-` and 12 random hex digits.
pub fn new_job_id() -> String {
    let mut b = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    b[0] ^= nanos as u8;
    format!(
        "j-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backup job j-1 of vol0.
    fn backup_job(shutdown: &CancellationToken) -> Job {
        Job::new(
            "j-1".into(),
            JobKind::Backup,
            "vol0".into(),
            "b-1".into(),
            shutdown,
        )
    }

    /// A finished job's rate is what it was when it ended; it does not decay as it is listed.
    #[test]
    fn a_finished_jobs_rate_stays() {
        let shutdown = CancellationToken::new();
        let job = backup_job(&shutdown);
        job.add_done(1 << 20);
        std::thread::sleep(Duration::from_millis(20));
        job.finish(Ok(None));
        let rate = job.info().progress.rate_bytes_per_sec;
        assert!(rate > 0);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(job.info().progress.rate_bytes_per_sec, rate);
    }

    #[test]
    fn progress_and_outcome_show_in_info() {
        let shutdown = CancellationToken::new();
        let job = backup_job(&shutdown);
        job.set_total(100);
        job.add_done(40);
        job.add_uploaded(10);
        let info = job.info();
        assert_eq!(info.state, JobState::Running);
        assert_eq!(
            (info.progress.bytes_done, info.progress.bytes_total),
            (40, 100)
        );
        assert_eq!(info.progress.bytes_uploaded, 10);
        // Two operations fail; the job is retrying until both have ended.
        job.set_retrying("store down", true);
        job.set_retrying("disk full", true);
        job.set_retrying("disk full again", false);
        assert_eq!(job.info().state, JobState::Retrying);
        assert_eq!(job.info().error.as_deref(), Some("disk full again"));
        job.retry_ended();
        assert_eq!(job.info().state, JobState::Retrying);
        assert_eq!(job.info().error.as_deref(), Some("disk full again"));
        job.retry_ended();
        assert_eq!(job.info().state, JobState::Running);
        assert_eq!(job.info().error, None);
        job.finish(Err("boom".into()));
        assert_eq!(job.state(), JobState::Failed);
        let info = job.info();
        assert_eq!(info.error.as_deref(), Some("boom"));
        assert!(info.finished_unix_secs.is_some());
        assert_ne!(new_job_id(), new_job_id());
    }

    #[test]
    fn cancel_stops_a_running_job_once_and_wins_over_shutdown() {
        let shutdown = CancellationToken::new();
        let job = Job::new(
            "j-2".into(),
            JobKind::Restore,
            "vol0".into(),
            "b-1".into(),
            &shutdown,
        );
        assert!(job.stopped(&shutdown).is_none());
        assert_eq!(job.cancel(), Ok(()));
        assert_eq!(job.cancel(), Err(CancelRefused::AlreadyRequested));
        assert!(matches!(
            job.stopped(&shutdown),
            Some(BackupError::CancelledByRequest)
        ));
        // A cancelled job cannot commit afterwards.
        assert!(matches!(job.commit(), Err(BackupError::CancelledByRequest)));
        // A shutdown right after still ends it as cancelled: it must not resume.
        shutdown.cancel();
        assert!(matches!(
            job.stopped(&shutdown),
            Some(BackupError::CancelledByRequest)
        ));
        job.finish_cancelled("volume removed");
        let info = job.info();
        assert_eq!(info.state, JobState::Cancelled);
        assert!(info.state.is_finished());
        assert_eq!(
            info.error.as_deref(),
            Some("cancelled by job.cancel; volume removed")
        );
        assert_eq!(job.cancel(), Err(CancelRefused::Finished));
    }

    #[test]
    fn a_committed_job_refuses_cancel_and_stops_only_for_shutdown() {
        let shutdown = CancellationToken::new();
        let job = Job::new(
            "j-4".into(),
            JobKind::Backup,
            "vol0".into(),
            "b-1".into(),
            &shutdown,
        );
        job.commit().unwrap();
        job.commit().unwrap();
        assert_eq!(job.cancel(), Err(CancelRefused::Committed));
        assert!(job.stopped(&shutdown).is_none());
        shutdown.cancel();
        assert!(matches!(
            job.stopped(&shutdown),
            Some(BackupError::Cancelled(_))
        ));
        let done = Job::new(
            "j-3".into(),
            JobKind::Verify,
            "vol0".into(),
            "b-1".into(),
            &CancellationToken::new(),
        );
        done.finish(Ok(None));
        assert_eq!(done.cancel(), Err(CancelRefused::Finished));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_when_the_job_finishes_or_the_time_is_up() {
        let job = std::sync::Arc::new(Job::new(
            "j-1".into(),
            JobKind::Backup,
            "vol0".into(),
            "b-1".into(),
            &CancellationToken::new(),
        ));
        let started = tokio::time::Instant::now();
        job.wait_finished(Duration::from_millis(200)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        assert_eq!(job.state(), JobState::Running);

        let finisher = std::sync::Arc::clone(&job);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            finisher.finish(Ok(None));
        });
        let started = tokio::time::Instant::now();
        job.wait_finished(Duration::from_secs(10)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(30));
        assert_eq!(job.state(), JobState::Succeeded);
        // A finished job answers at once.
        let started = tokio::time::Instant::now();
        job.wait_finished(Duration::from_secs(10)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
