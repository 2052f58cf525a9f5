//! Small buffered writes done right on the calling thread when the filesystem has no
//! non-blocking buffered writes (ext4 refuses RWF_NOWAIT for them). Handing each 4 KiB write to
//! an engine thread and back costs more than the write itself (a copy into the page cache), and
//! nbdkit's synchronous threads do not pay that. The guard: a write that takes long (dirty page
//! throttling, a journal commit) pauses inline writes for a while, so a stalled filesystem does
//! not keep stalling the runtime threads that serve every other connection.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Larger writes cost enough on their own that a thread hop is noise; they also block longer.
pub(crate) const MAX_INLINE_WRITE_BYTES: usize = 64 << 10;
/// An inline write slower than this pauses inline writes.
const SLOW_WRITE: Duration = Duration::from_micros(500);
/// How long they stay paused.
const PAUSE: Duration = Duration::from_millis(200);

pub(crate) struct InlineWrites {
    enabled: AtomicBool,
    started: Instant,
    /// Microseconds since `started` before which writes are not done inline.
    paused_until_us: AtomicU64,
}

impl InlineWrites {
    pub(crate) fn new(enabled: bool) -> InlineWrites {
        InlineWrites {
            enabled: AtomicBool::new(enabled),
            started: Instant::now(),
            paused_until_us: AtomicU64::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// `Some(result)` when the write was done here, `None` when the caller must queue it.
    pub(crate) fn try_write(
        &self,
        file: &File,
        offset: u64,
        data: &[u8],
    ) -> Option<io::Result<usize>> {
        if data.is_empty()
            || data.len() > MAX_INLINE_WRITE_BYTES
            || !self.enabled.load(Ordering::Relaxed)
            || self.now_us() < self.paused_until_us.load(Ordering::Relaxed)
        {
            return None;
        }
        let began = Instant::now();
        let result = loop {
            match file.write_at(data, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let took = began.elapsed();
        if took > SLOW_WRITE {
            let until = self.now_us() + PAUSE.as_micros() as u64;
            self.paused_until_us.store(until, Ordering::Relaxed);
            tracing::debug!(
                took_us = took.as_micros() as u64,
                "slow inline write; queueing writes for a while"
            );
        }
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn small_writes_are_done_inline_large_ones_queued() {
        let file = tempfile::tempfile().unwrap();
        let inline = InlineWrites::new(true);
        assert_eq!(
            inline
                .try_write(&file, 4096, &[5u8; 4096])
                .unwrap()
                .unwrap(),
            4096
        );
        let mut back = [0u8; 4096];
        file.read_exact_at(&mut back, 4096).unwrap();
        assert!(back.iter().all(|&b| b == 5));
        let large = vec![1u8; MAX_INLINE_WRITE_BYTES + 1];
        assert!(inline.try_write(&file, 0, &large).is_none());
        assert!(InlineWrites::new(false)
            .try_write(&file, 0, &[1u8; 512])
            .is_none());
    }

    #[test]
    fn a_slow_write_pauses_inline_writes() {
        let file = tempfile::tempfile().unwrap();
        let inline = InlineWrites::new(true);
        inline.paused_until_us.store(
            inline.now_us() + PAUSE.as_micros() as u64,
            Ordering::Relaxed,
        );
        assert!(inline.try_write(&file, 0, &[1u8; 512]).is_none(), "paused");
    }
}
