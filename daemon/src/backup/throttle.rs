//! The optional upload bandwidth limit shared by all of a daemon's backup jobs.

use std::time::Duration;

use tokio::time::Instant;

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
        tokio::time::sleep_until(start).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spreads_uploads_at_the_configured_rate() {
        let throttle = Throttle::new(Some(8 << 20));
        let t0 = Instant::now();
        for _ in 0..4 {
            throttle.take(1 << 20).await;
        }
        // The first MiB goes at once; the next three wait 125 ms each.
        assert_eq!(t0.elapsed(), Duration::from_millis(375));
        let unlimited = Throttle::new(None);
        let t1 = Instant::now();
        unlimited.take(u64::MAX).await;
        assert_eq!(t1.elapsed(), Duration::ZERO);
    }
}
