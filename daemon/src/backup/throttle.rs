//! The optional upload bandwidth limit shared by all of a daemon's backup jobs.

use std::time::{Duration, Instant};

pub struct Throttle {
    bytes_per_sec: Option<u64>,
    /// When the bandwidth already promised to earlier uploads is used up.
    next_free: tokio::sync::Mutex<Instant>,
}

impl Throttle {
    pub fn new(bytes_per_sec: Option<u64>) -> Throttle {
        Throttle {
            bytes_per_sec: bytes_per_sec.filter(|&r| r > 0),
            next_free: tokio::sync::Mutex::new(Instant::now()),
        }
    }

    /// Waits until `bytes` more may be sent without passing the limit.
    pub async fn take(&self, bytes: u64) {
        let Some(rate) = self.bytes_per_sec else {
            return;
        };
        let start = {
            let mut next = self.next_free.lock().await;
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spreads_uploads_at_the_configured_rate() {
        let throttle = Throttle::new(Some(8 << 20));
        let t0 = tokio::time::Instant::now();
        for _ in 0..4 {
            throttle.take(1 << 20).await;
        }
        // The first MiB goes at once; the next three wait 125 ms each.
        let waited = t0.elapsed();
        assert!(
            waited >= std::time::Duration::from_millis(370)
                && waited < std::time::Duration::from_secs(2),
            "{waited:?}"
        );
        let unlimited = Throttle::new(None);
        let t1 = tokio::time::Instant::now();
        unlimited.take(u64::MAX).await;
        assert!(t1.elapsed() < std::time::Duration::from_millis(100));
    }
}
