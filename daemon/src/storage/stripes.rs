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
//!
//! Every zero also moves its stripes' zero generation on, to odd before it waits and to even
//! once it is done, which a payload landing in place across several `recv`s compares between
//! two of them: a zero that left the blocks data (`NO_HOLE`) still zeroed the part of a block
//! that landed before it. An odd generation is a zero under way.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};

/// Blocks per lock granule (64 KiB of volume).
const GRANULE_BLOCKS: u64 = 16;
const STRIPES: usize = 1024;
/// A zero waiting for an overwrite yields this many times (an overwrite is one cached write,
/// microseconds) before it sleeps between looks.
const OVERWRITE_YIELDS: u32 = 64;
const OVERWRITE_POLL: Duration = Duration::from_millis(1);

pub struct Stripes {
    locks: Box<[Mutex<()>]>,
    overwrites: Box<[AtomicU32]>,
    zero_generations: Box<[AtomicU64]>,
}

impl Default for Stripes {
    fn default() -> Self {
        Stripes {
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            overwrites: (0..STRIPES).map(|_| AtomicU32::new(0)).collect(),
            zero_generations: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// A block's zero generation, even (see the module's comment).
pub type ZeroGeneration = u64;

/// A zero under way on a range's stripes; its generations move on to even when it drops.
pub struct Zeroing<'s> {
    stripes: &'s Stripes,
    start: u64,
    end: u64,
}

impl Drop for Zeroing<'_> {
    fn drop(&mut self) {
        for i in stripe_indices(self.start, self.end) {
            self.stripes.zero_generations[i].fetch_add(1, Ordering::Release);
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
    /// only after this. Uncounted when the guard drops, so a write future dropped while its
    /// engine job still runs would be uncounted early: the NBD side never drops one.
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

    /// The zero generation of `block`, None while a zero is under way on its stripe. Read
    /// while counted as an overwrite, it is the generation from before any zero that the
    /// overwrite did not make wait.
    pub fn zero_generation(&self, block: u64) -> Option<ZeroGeneration> {
        let i = stripe_indices(block, block + 1).next()?;
        let generation = self.zero_generations[i].load(Ordering::Acquire);
        generation.is_multiple_of(2).then_some(generation)
    }

    /// Whether a zero is under way on any stripe of blocks `[start, end)`; asked while counted
    /// as an overwrite that the map does not stop (a `NO_HOLE` zero leaves it saying data).
    pub fn zero_under_way(&self, start: u64, end: u64) -> bool {
        stripe_indices(start, end).any(|i| {
            !self.zero_generations[i]
                .load(Ordering::Acquire)
                .is_multiple_of(2)
        })
    }

    /// For a zero of blocks `[start, end)`, called with their locks held and after any map
    /// change overwrites must see: moves their zero generation on (to odd until the returned
    /// guard drops), then waits until no overwrite counted on their stripes is in flight. Each
    /// stripe is waited for in turn: seeing its count at zero once after the fence is enough,
    /// as an overwrite counted later sees the change. Overwrites of other blocks sharing the
    /// stripes are waited for too.
    pub async fn zeroing(&self, start: u64, end: u64) -> Zeroing<'_> {
        for i in stripe_indices(start, end) {
            self.zero_generations[i].fetch_add(1, Ordering::Relaxed);
        }
        let zeroing = Zeroing {
            stripes: self,
            start,
            end,
        };
        fence(Ordering::SeqCst);
        for i in stripe_indices(start, end) {
            let mut looks = 0;
            while self.overwrites[i].load(Ordering::Acquire) > 0 {
                looks += 1;
                if looks < OVERWRITE_YIELDS {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(OVERWRITE_POLL).await;
                }
            }
        }
        zeroing
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
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(20), stripes.zeroing(0, 8));
        assert!(
            waited.await.is_err(),
            "an overwrite in its stripe is waited for"
        );
        drop(overwrite);
        let before = stripes.zero_generation(5).expect("no zero under way");
        let zeroing =
            tokio::time::timeout(std::time::Duration::from_secs(5), stripes.zeroing(0, 8))
                .await
                .expect("done once it is uncounted, whatever other stripes hold");
        assert_eq!(stripes.zero_generation(5), None, "a zero is under way");
        drop(zeroing);
        let after = stripes.zero_generation(5).expect("the zero is done");
        assert_ne!(before, after);
        assert_eq!(
            stripes.zero_generation(GRANULE_BLOCKS + 1),
            Some(0),
            "other stripes keep theirs"
        );
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
