//! Retrying store operations while the store is unreachable: exponential backoff, shown on
//! the job as "retrying", ended only by success, a permanent error, `job.cancel` or daemon
//! shutdown.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backup::error::BackupError;
use crate::backup::job::Job;

/// Backoff of retried store requests: doubled from the first delay up to the last.
pub(crate) const FIRST_DELAY: Duration = Duration::from_millis(250);
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(10);

pub async fn with_retry<T, F, Fut>(
    job: &Job,
    shutdown: &CancellationToken,
    what: &str,
    mut op: F,
) -> Result<T, BackupError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BackupError>>,
{
    let mut delay = FIRST_DELAY;
    let mut failures = 0u32;
    // Once this operation has failed, it counts among the job's retrying ones until it ends,
    // however it ends (the future may also be dropped).
    let mut retrying: Option<RetryingOp<'_>> = None;
    loop {
        if let Some(stopped) = job.stopped(shutdown) {
            return Err(stopped);
        }
        // A cancel abandons the operation in flight: it may wait on a store that never
        // answers, or on another daemon's garbage collection.
        let outcome = tokio::select! {
            outcome = op() => outcome,
            // Fires only for a cancel before the commit point or a shutdown.
            _ = job.stop_requested() => return Err(stop_reason(job, shutdown)),
        };
        match outcome {
            Ok(value) => {
                if failures > 0 {
                    tracing::info!(job = %job.id, what, failures, "backup store answers again");
                }
                drop(retrying);
                return Ok(value);
            }
            Err(e) if e.is_transient() => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(job = %job.id, what, error = %e, failures, "backup store failed; retrying");
                }
                job.set_retrying(&format!("{what}: {e}"), retrying.is_none());
                // Not get_or_insert: its argument, built on every failure, would be dropped on
                // the second one and end the count this operation still holds.
                if retrying.is_none() {
                    retrying = Some(RetryingOp { job });
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = job.stop_requested() => {}
                }
                delay = (delay * 2).min(MAX_DELAY);
            }
            Err(e) => return Err(e),
        }
    }
}

fn stop_reason(job: &Job, shutdown: &CancellationToken) -> BackupError {
    job.stopped(shutdown)
        .unwrap_or_else(|| BackupError::Cancelled("the daemon is shutting down".into()))
}

/// One failed operation of `job`, counted until dropped.
struct RetryingOp<'a> {
    job: &'a Job,
}

impl Drop for RetryingOp<'_> {
    fn drop(&mut self) {
        self.job.retry_ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::job::{JobKind, JobState};
    use std::sync::Arc;

    /// A job of `kind` on vol0 that stops with `shutdown`.
    fn new_job(id: &str, kind: JobKind, shutdown: &CancellationToken) -> Job {
        Job::new(id.into(), kind, "vol0".into(), "b-1".into(), shutdown)
    }

    fn unreachable() -> BackupError {
        BackupError::store(
            "put",
            "chunks/x",
            object_store::Error::Generic {
                store: "test",
                source: "connection refused".into(),
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_ends_a_retrying_operation_during_its_back_off() {
        let shutdown = CancellationToken::new();
        let job = Arc::new(new_job("j-1", JobKind::Backup, &shutdown));
        let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let retried = {
            let (job, shutdown, attempts) =
                (Arc::clone(&job), shutdown.clone(), Arc::clone(&attempts));
            tokio::spawn(async move {
                with_retry(&job, &shutdown, "uploading a chunk", || {
                    attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async { Err::<(), _>(unreachable()) }
                })
                .await
            })
        };
        // Backing off after the first failures (the delay caps at 10 s).
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!retried.is_finished());
        // Still retrying after many failures of the one operation.
        assert_eq!(job.state(), JobState::Retrying);
        let tried = attempts.load(std::sync::atomic::Ordering::SeqCst);
        assert!(tried >= 3, "{tried} attempts in 60 s");
        let cancelled_at = tokio::time::Instant::now();
        job.cancel().unwrap();
        let outcome = retried.await.unwrap();
        assert!(
            matches!(outcome, Err(BackupError::CancelledByRequest)),
            "{outcome:?}"
        );
        // Not after the rest of a 10 s back-off, and without another attempt.
        assert_eq!(cancelled_at.elapsed(), Duration::ZERO);
        assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), tried);
        // The operation no longer counts as retrying.
        assert_eq!(job.state(), JobState::Running);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_abandons_an_operation_in_flight_unless_the_job_committed() {
        let shutdown = CancellationToken::new();
        let job = Arc::new(new_job("j-1", JobKind::Backup, &shutdown));
        let hung = {
            let (job, shutdown) = (Arc::clone(&job), shutdown.clone());
            tokio::spawn(async move {
                with_retry(&job, &shutdown, "locking the store", || {
                    std::future::pending::<Result<(), BackupError>>()
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_secs(3600)).await;
        job.cancel().unwrap();
        let outcome = hung.await.unwrap();
        assert!(
            matches!(outcome, Err(BackupError::CancelledByRequest)),
            "{outcome:?}"
        );

        // Past its commit point a job refuses the cancel and its operation goes on.
        let job = Arc::new(new_job("j-2", JobKind::Backup, &shutdown));
        job.commit().unwrap();
        assert!(job.cancel().is_err());
        let done = {
            let (job, shutdown) = (Arc::clone(&job), shutdown.clone());
            tokio::spawn(async move {
                with_retry(&job, &shutdown, "writing the manifest", || async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok::<_, BackupError>(7)
                })
                .await
            })
        };
        assert_eq!(done.await.unwrap().unwrap(), 7);
    }

    #[tokio::test]
    async fn a_cancelled_job_starts_no_operation() {
        let shutdown = CancellationToken::new();
        let job = new_job("j-1", JobKind::Restore, &shutdown);
        job.cancel().unwrap();
        let outcome = with_retry(&job, &shutdown, "reading the manifest", || async {
            panic!("no operation may start once the job is cancelled")
        })
        .await;
        assert!(matches!(
            outcome,
            Err::<(), _>(BackupError::CancelledByRequest)
        ));
    }
}
