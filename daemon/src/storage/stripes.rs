//! Striped locks over block ranges of a volume's head. Taken by every operation that changes a
//! head block from "not data" (a first write, a read-modify-write of a partial block, a zero or
//! trim, a merge copying into the head), so that two of them on the same block never interleave
//! their read and write halves. Overwrites of blocks the head already holds take no lock.

use tokio::sync::{Mutex, MutexGuard};

/// Blocks per lock granule (64 KiB of volume).
const GRANULE_BLOCKS: u64 = 16;
const STRIPES: usize = 1024;

pub struct Stripes {
    locks: Box<[Mutex<()>]>,
}

impl Default for Stripes {
    fn default() -> Self {
        Stripes {
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl Stripes {
    /// Locks every stripe covering blocks `[start, end)`, in index order so that two callers
    /// never wait on each other in a cycle.
    pub async fn lock(&self, start: u64, end: u64) -> Vec<MutexGuard<'_, ()>> {
        let first = start / GRANULE_BLOCKS;
        let last = end.max(start + 1).div_ceil(GRANULE_BLOCKS);
        let mut indices: Vec<usize> = if last - first >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (first..last)
                .map(|g| (g % STRIPES as u64) as usize)
                .collect()
        };
        indices.sort_unstable();
        indices.dedup();
        let mut guards = Vec::with_capacity(indices.len());
        for i in indices {
            guards.push(self.locks[i].lock().await);
        }
        guards
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
}
