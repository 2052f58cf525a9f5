//! Striped locks over block ranges of a volume's head. Taken by every operation that changes a
//! head block from "not data" (a first write, a read-modify-write of a partial block, a zero or
//! trim, a merge copying into the head), so that two of them on the same block never interleave
//! their read and write halves. Overwrites of blocks the head already holds take no lock.
//!
//! Those overwrites are counted per stripe instead: a zero or trim that gives a range's bytes
//! back marks its blocks zero (or absent) and then punches them, and an overwrite that saw the
//! blocks as data before the mark must not land after the punch, leaving bytes under blocks
//! marked zero (a power loss could show them again once a later write marks such a block data
//! and only the map reaches the disk). An overwrite counts itself before it looks at the map,
//! the zero marks the map before it looks at the counts (a SeqCst fence on each side between
//! the two), so either the overwrite sees the mark and takes the locked path, or the zero sees
//! the count and waits for it.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};

/// Blocks per lock granule (64 KiB of volume).
const GRANULE_BLOCKS: u64 = 16;
const STRIPES: usize = 1024;
/// How often a zero waiting for overwrites looks again; they last one write each.
const OVERWRITE_POLL: Duration = Duration::from_micros(50);

pub struct Stripes {
    locks: Box<[Mutex<()>]>,
    overwrites: Box<[AtomicU32]>,
}

impl Default for Stripes {
    fn default() -> Self {
        Stripes {
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            overwrites: (0..STRIPES).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

/// An overwrite in flight; uncounted when dropped.
pub struct Overwrite<'s> {
    stripes: &'s Stripes,
    start: u64,
    end: u64,
}

impl Drop for Overwrite<'_> {
    fn drop(&mut self) {
        for i in stripe_indices(self.start, self.end) {
            self.stripes.overwrites[i].fetch_sub(1, Ordering::Release);
        }
    }
}

/// The stripes covering blocks `[start, end)`, each once at most when the range wraps the
/// table, unsorted.
fn stripe_indices(start: u64, end: u64) -> impl Iterator<Item = usize> {
    let first = start / GRANULE_BLOCKS;
    let last = end.max(start + 1).div_ceil(GRANULE_BLOCKS);
    let granules = (last - first).min(STRIPES as u64);
    (first..first + granules).map(|g| (g % STRIPES as u64) as usize)
}

impl Stripes {
    /// Locks every stripe covering blocks `[start, end)`, in index order so that two callers
    /// never wait on each other in a cycle.
    pub async fn lock(&self, start: u64, end: u64) -> Vec<MutexGuard<'_, ()>> {
        let mut indices: Vec<usize> = stripe_indices(start, end).collect();
        indices.sort_unstable();
        indices.dedup();
        let mut guards = Vec::with_capacity(indices.len());
        for i in indices {
            guards.push(self.locks[i].lock().await);
        }
        guards
    }

    /// Counts an overwrite of blocks `[start, end)` without a lock; the caller looks at the map
    /// only after this.
    pub fn begin_overwrite(&self, start: u64, end: u64) -> Overwrite<'_> {
        for i in stripe_indices(start, end) {
            self.overwrites[i].fetch_add(1, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        Overwrite {
            stripes: self,
            start,
            end,
        }
    }

    /// Waits until no overwrite counted on the stripes of blocks `[start, end)` is in flight;
    /// called with their locks held, after the map change they must see. Overwrites of other
    /// blocks sharing the stripes are waited for too: they are as short.
    pub async fn overwrites_done(&self, start: u64, end: u64) {
        fence(Ordering::SeqCst);
        while stripe_indices(start, end).any(|i| self.overwrites[i].load(Ordering::Acquire) > 0) {
            tokio::time::sleep(OVERWRITE_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlapping_ranges_exclude_each_other_and_wrapping_ranges_do_not_deadlock() {
        let stripes = Stripes::default();
        let held = stripes.lock(0, 16).await;
        assert_eq!(held.len(), 1);
        let blocked =
            tokio::time::timeout(std::time::Duration::from_millis(20), stripes.lock(15, 17));
        assert!(
            blocked.await.is_err(),
            "a lock on an overlapping range must wait"
        );
        drop(held);
        // A range that wraps around the stripe table locks each stripe once.
        let all = stripes.lock(0, GRANULE_BLOCKS * STRIPES as u64 * 3).await;
        assert_eq!(all.len(), STRIPES);
        drop(all);
        let wrap = stripes
            .lock(
                GRANULE_BLOCKS * (STRIPES as u64 - 1),
                GRANULE_BLOCKS * (STRIPES as u64 + 1),
            )
            .await;
        assert_eq!(wrap.len(), 2);
    }

    #[tokio::test]
    async fn a_zero_waits_for_the_overwrites_counted_on_its_stripes() {
        let stripes = Stripes::default();
        let overwrite = stripes.begin_overwrite(3, 4);
        let other = stripes.begin_overwrite(GRANULE_BLOCKS, GRANULE_BLOCKS + 1);
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            stripes.overwrites_done(0, 8),
        );
        assert!(
            waited.await.is_err(),
            "an overwrite in its stripe is waited for"
        );
        drop(overwrite);
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stripes.overwrites_done(0, 8),
        )
        .await
        .expect("done once it is uncounted, whatever other stripes hold");
        drop(other);
        // A range wrapping the table counts each stripe once and uncounts what it counted.
        let wrapping = stripes.begin_overwrite(0, GRANULE_BLOCKS * STRIPES as u64 * 2);
        assert!(stripes
            .overwrites
            .iter()
            .all(|c| c.load(Ordering::Relaxed) == 1));
        drop(wrapping);
        assert!(stripes
            .overwrites
            .iter()
            .all(|c| c.load(Ordering::Relaxed) == 0));
    }
}
