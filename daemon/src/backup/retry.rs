//! Retrying store operations while the store is unreachable: exponential backoff, shown on
//! the job as "retrying", ended only by success, a permanent error, or daemon shutdown.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backup::error::BackupError;
use crate::backup::job::Job;

const FIRST_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(10);

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
        match op().await {
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
                retrying.get_or_insert(RetryingOp { job });
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {
                        return Err(BackupError::Cancelled("the daemon is shutting down".into()));
                    }
                }
                delay = (delay * 2).min(MAX_DELAY);
            }
            Err(e) => return Err(e),
        }
    }
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
