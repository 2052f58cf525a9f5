//! Buffered writes done right on the calling thread when the filesystem has no non-blocking
//! buffered writes (ext4 refuses RWF_NOWAIT for them): small ones, and the pieces of large ones
//! whose caller copies them itself (`IoEngine::write_all_at_here`). Handing each 4 KiB write to
//! an engine thread and back costs more than the write itself (a copy into the page cache), and
//! nbdkit's synchronous threads do not pay that. The guard: writes that take long (dirty page
//! throttling, a journal commit) pause inline writes for a while, so a stalled filesystem does
//! not keep stalling the runtime threads that serve every other connection. One slow write is
//! not enough: on a busy machine a write is sometimes slow only because its thread was
//! preempted, so it takes a few within a short window, or one as long as that window.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Larger writes block longer, and a caller must choose to copy them itself (see
/// `IoEngine::write_all_at_here`, in pieces, and `ClientStream::copies_large_writes`): over a
/// Unix socket, 1 MiB sequential writes at depth 8 fell from 1700-2374 to 648-1807 MiB/s when
/// copied inline (A/B, three runs each), because while the connection's task copies 1 MiB it
/// reads nothing from a socket whose buffer holds a fifth of that.
pub(crate) const MAX_INLINE_WRITE_BYTES: usize = 64 << 10;
/// An inline write slower than this counts as slow.
const SLOW_WRITE: Duration = Duration::from_micros(1000);
/// This many slow writes within `SLOW_WINDOW` pause inline writes for `PAUSE`.
const SLOW_WRITES_TO_PAUSE: u64 = 3;
const SLOW_WINDOW: Duration = Duration::from_millis(50);
const PAUSE: Duration = Duration::from_millis(200);

pub(crate) struct InlineWrites {
    enabled: AtomicBool,
    started: Instant,
    /// Microseconds since `started` before which writes are not done inline.
    paused_until_us: AtomicU64,
    /// When the current window of slow writes began, and how many it has seen. Updated without
    /// a lock: two slow writes racing may miscount one, which only shifts the pause a little.
    slow_window_start_us: AtomicU64,
    slow_in_window: AtomicU64,
    /// Set by tests that must not see a preempted write pause inline writes.
    ignore_slow_writes: AtomicBool,
}

impl InlineWrites {
    pub(crate) fn new(enabled: bool) -> InlineWrites {
        InlineWrites {
            enabled: AtomicBool::new(enabled),
            started: Instant::now(),
            paused_until_us: AtomicU64::new(0),
            slow_window_start_us: AtomicU64::new(0),
            slow_in_window: AtomicU64::new(0),
            ignore_slow_writes: AtomicBool::new(false),
        }
    }

    /// Counts a slow write; pauses inline writes when the window has seen enough of them, or
    /// at once for a write as long as the window (each such write would open a window of its
    /// own and never count up to the others).
    fn slow_write(&self, took: Duration) {
        if self.ignore_slow_writes.load(Ordering::Relaxed) {
            return;
        }
        let now = self.now_us();
        let window_start = self.slow_window_start_us.load(Ordering::Relaxed);
        let slow = if now.saturating_sub(window_start) > SLOW_WINDOW.as_micros() as u64 {
            self.slow_window_start_us.store(now, Ordering::Relaxed);
            self.slow_in_window.store(1, Ordering::Relaxed);
            1
        } else {
            self.slow_in_window.fetch_add(1, Ordering::Relaxed) + 1
        };
        if slow >= SLOW_WRITES_TO_PAUSE || took >= SLOW_WINDOW {
            self.slow_in_window.store(0, Ordering::Relaxed);
            let until = now + PAUSE.as_micros() as u64;
            self.paused_until_us.store(until, Ordering::Relaxed);
            tracing::debug!(
                took_us = took.as_micros() as u64,
                "slow inline writes; queueing writes for a while"
            );
        }
    }

    #[cfg(test)]
    pub(crate) fn ignore_slow_writes_for_test(&self) {
        self.ignore_slow_writes.store(true, Ordering::Relaxed);
    }

    /// Pauses inline writes as slow writes would, but for good: a test on a busy machine must
    /// not see the pause run out.
    #[cfg(test)]
    pub(crate) fn pause_for_test(&self) {
        self.paused_until_us.store(u64::MAX, Ordering::Relaxed);
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Whether inline writes are on and not paused.
    pub(crate) fn allowed(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
            && self.now_us() >= self.paused_until_us.load(Ordering::Relaxed)
    }

    /// `Some(result)` when the write was done here, `None` when the caller must queue it.
    pub(crate) fn try_write(
        &self,
        file: &File,
        offset: u64,
        data: &[u8],
    ) -> Option<io::Result<usize>> {
        if data.len() > MAX_INLINE_WRITE_BYTES || data.is_empty() || !self.allowed() {
            return None;
        }
        let began = Instant::now();
        let result = write_at(file, offset, data);
        let took = began.elapsed();
        if took > SLOW_WRITE {
            self.slow_write(took);
        }
        Some(result)
    }

    /// `try_write` for one piece of a large write whose caller chose to copy it on its own
    /// thread (`IoEngine::write_all_at_here`): any size, judged as a large copy.
    pub(crate) fn try_write_piece(
        &self,
        file: &File,
        offset: u64,
        data: &[u8],
    ) -> Option<io::Result<usize>> {
        if data.is_empty() || !self.allowed() {
            return None;
        }
        Some(self.time_large_copy(|| write_at(file, offset, data)))
    }

    /// Runs a large copy into the page cache on the caller's thread (a piece of a large write,
    /// a payload landing in place) and counts it slow only if the thread blocked meanwhile (a
    /// voluntary context switch: dirty page throttling, a journal commit, a locked page).
    /// Being preempted is not the filesystem's doing: with four clients busy on two cores,
    /// preempted copies kept large copies paused most of the time (1 MiB sequential writes over
    /// four TCP connections landed a fifth of their bytes in place, and every slow landing
    /// measured had been preempted, none blocked). The two `getrusage` calls cost little next
    /// to a 128 KiB copy; small writes keep the cheaper rule of `try_write`.
    pub(crate) fn time_large_copy<T>(&self, copy: impl FnOnce() -> T) -> T {
        let switches_before = voluntary_switches();
        let began = Instant::now();
        let result = copy();
        let took = began.elapsed();
        if took > SLOW_WRITE {
            let blocked = match (switches_before, voluntary_switches()) {
                (Some(before), Some(after)) => after > before,
                // Unknown: as if it had blocked.
                _ => true,
            };
            if blocked {
                self.slow_write(took);
            }
        }
        result
    }
}

fn write_at(file: &File, offset: u64, data: &[u8]) -> io::Result<usize> {
    loop {
        match file.write_at(data, offset) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The calling thread's voluntary context switches so far.
fn voluntary_switches() -> Option<i64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: `usage` is a live, writable rusage the kernel fills; it is read only on success.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    Some(usage.ru_nvcsw)
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
    fn a_few_slow_writes_in_a_short_window_pause_inline_writes() {
        let file = tempfile::tempfile().unwrap();
        let inline = InlineWrites::new(true);
        let slow = SLOW_WRITE * 2;
        for _ in 1..SLOW_WRITES_TO_PAUSE {
            inline.slow_write(slow);
        }
        assert!(inline.try_write(&file, 0, &[1u8; 512]).is_some(), "not yet");
        inline.slow_write(slow);
        assert!(inline.try_write(&file, 0, &[1u8; 512]).is_none(), "paused");
    }

    #[test]
    fn one_write_as_long_as_the_window_pauses_inline_writes() {
        let file = tempfile::tempfile().unwrap();
        let inline = InlineWrites::new(true);
        inline.slow_write(SLOW_WINDOW / 2);
        assert!(inline.try_write(&file, 0, &[1u8; 512]).is_some(), "not yet");
        inline.slow_write(SLOW_WINDOW);
        assert!(inline.try_write(&file, 0, &[1u8; 512]).is_none(), "paused");
    }

    #[test]
    fn a_large_copy_counts_as_slow_only_when_its_thread_blocked() {
        let inline = InlineWrites::new(true);
        // Busy for longer than the window, never blocking: preemption at most.
        inline.time_large_copy(|| {
            let began = Instant::now();
            while began.elapsed() < SLOW_WINDOW + Duration::from_millis(5) {
                std::hint::spin_loop();
            }
        });
        assert!(inline.allowed(), "a copy that never blocked pauses nothing");
        inline.time_large_copy(|| std::thread::sleep(SLOW_WINDOW));
        assert!(
            !inline.allowed(),
            "a copy that blocked as long as the window"
        );
    }

    #[test]
    fn a_paused_engine_queues_writes() {
        let file = tempfile::tempfile().unwrap();
        let inline = InlineWrites::new(true);
        inline.paused_until_us.store(
            inline.now_us() + PAUSE.as_micros() as u64,
            Ordering::Relaxed,
        );
        assert!(inline.try_write(&file, 0, &[1u8; 512]).is_none(), "paused");
    }
}
