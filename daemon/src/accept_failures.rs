//! Accept failures of the listeners (NBD, admin, metrics). They are transient (EMFILE, ENFILE,
//! ENOBUFS) and repeat as fast as the loop retries: each one backs off briefly, the first is
//! logged, and then at most one line per interval says how many more there were.

use std::time::Duration;

use tokio::time::Instant;

/// The pause after a failed accept: the condition (a descriptor limit) clears when clients go.
const BACKOFF: Duration = Duration::from_millis(50);
/// At most one log line per listener this often while accepts keep failing.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

pub struct AcceptFailures {
    /// Which listener, for the log line.
    listener: &'static str,
    last_logged: Option<Instant>,
    /// Failures since the last line.
    unlogged: u64,
}

impl AcceptFailures {
    pub fn new(listener: &'static str) -> AcceptFailures {
        AcceptFailures {
            listener,
            last_logged: None,
            unlogged: 0,
        }
    }

    /// Logs `error` unless a line went out less than `LOG_INTERVAL` ago, then backs off.
    pub async fn failed(&mut self, error: std::io::Error) {
        if self.should_log(Instant::now()) {
            tracing::warn!(
                listener = self.listener,
                %error,
                failures_since_last_logged = self.unlogged,
                "accept failed; retrying"
            );
            self.unlogged = 0;
        }
        tokio::time::sleep(BACKOFF).await;
    }

    fn should_log(&mut self, now: Instant) -> bool {
        if self
            .last_logged
            .is_some_and(|last| now.duration_since(last) < LOG_INTERVAL)
        {
            self.unlogged += 1;
            return false;
        }
        self.last_logged = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counting_the_rest() {
        let mut failures = AcceptFailures::new("test");
        let start = Instant::now();
        assert!(failures.should_log(start));
        for k in 1..=199u64 {
            assert!(!failures.should_log(start + BACKOFF * k as u32));
        }
        assert_eq!(failures.unlogged, 199);
        assert!(failures.should_log(start + LOG_INTERVAL));
    }
}
