//! The idle timer of a connection in transmission.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Expires once nothing has happened on a connection for `timeout`. Activity only records the
/// time; the timer is re-armed when it fires early, so a busy connection costs a clock read
/// per batch of work rather than a timer update per request.
pub struct IdleTimer {
    timeout: Duration,
    last_activity: Instant,
    sleep: Pin<Box<Sleep>>,
}

impl IdleTimer {
    pub fn new(timeout: Duration) -> IdleTimer {
        let now = Instant::now();
        IdleTimer {
            timeout,
            last_activity: now,
            sleep: Box::pin(tokio::time::sleep_until(now + timeout)),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Something was received, started, answered or written: the idle period starts over.
    pub fn touch(&mut self) {
        self.last_activity = Instant::now();
    }

    /// Ready once `timeout` has passed since the last activity. Poll only while the connection
    /// is idle: the waker is registered for the current deadline.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.last_activity + self.timeout;
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            // Fired for an earlier deadline: there was activity since it was armed.
            self.sleep.as_mut().reset(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    // Real time: the lower bounds are exact, the upper ones only catch a timer that never fires.
    const TIMEOUT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn expires_after_the_timeout_without_activity() {
        let started = Instant::now();
        let mut timer = IdleTimer::new(TIMEOUT);
        poll_fn(|cx| timer.poll_expired(cx)).await;
        let elapsed = started.elapsed();
        assert!(elapsed >= TIMEOUT && elapsed < 10 * TIMEOUT, "{elapsed:?}");
    }

    #[tokio::test]
    async fn activity_pushes_the_deadline_back() {
        let started = Instant::now();
        let mut timer = IdleTimer::new(TIMEOUT);
        for _ in 0..3 {
            tokio::time::sleep(TIMEOUT * 2 / 3).await;
            timer.touch();
        }
        let last_touch = Instant::now();
        poll_fn(|cx| timer.poll_expired(cx)).await;
        assert!(
            last_touch.elapsed() >= TIMEOUT,
            "{:?}",
            last_touch.elapsed()
        );
        assert!(started.elapsed() < 20 * TIMEOUT, "{:?}", started.elapsed());
    }
}
