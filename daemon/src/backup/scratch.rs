//! Memory an incremental backup names its changed chunks in, kept from one chunk, batch and
//! backup to the next.
//!
//! Naming a changed chunk needs a 48 KiB tree and a delta of some tens of KiB. Allocated per
//! chunk, nearly all of it was memory the allocator had to fault in fresh: a 1% incremental of
//! a 4 GiB volume took 16,800 page faults (66 MiB). The delta is freed on another thread once
//! packed, and after an idle spell the pages of the last backup have gone back to the kernel.
//! On this VM a fresh page costs far more than the bytes written into it: run after other
//! programs, 47% of an incremental's CPU was the kernel clearing new pages. Here the buffers
//! stay the daemon's between uses, bounded in number and size.

use std::sync::Mutex;

/// Idle values kept for reuse, at most `max_idle`; `keep` turns away those not worth holding.
pub struct Pool<T> {
    idle: Mutex<Vec<T>>,
    max_idle: usize,
    keep: fn(&T) -> bool,
}

impl<T> Pool<T> {
    pub fn new(max_idle: usize, keep: fn(&T) -> bool) -> Pool<T> {
        Pool {
            idle: Mutex::new(Vec::with_capacity(max_idle)),
            max_idle,
            keep,
        }
    }

    /// An idle value, or a new one from `make`.
    pub fn take_or(&self, make: impl FnOnce() -> T) -> T {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        idle.unwrap_or_else(make)
    }

    /// Keeps `value` for the next `take_or`, unless the pool is full or `keep` refuses it.
    pub fn give(&self, value: T) {
        if !(self.keep)(&value) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_back_up_to_the_bound_and_as_kept() {
        let pool: Pool<Vec<u8>> = Pool::new(2, |v| v.capacity() <= 64);
        let mut a = pool.take_or(Vec::new);
        a.reserve_exact(32);
        let a_ptr = a.as_ptr();
        pool.give(a);
        let again = pool.take_or(|| panic!("the idle buffer is reused"));
        assert_eq!(again.as_ptr(), a_ptr, "the same memory comes back");
        pool.give(again);
        pool.give(Vec::with_capacity(16));
        // Full: a third is dropped.
        pool.give(Vec::with_capacity(8));
        assert_eq!(pool.idle.lock().unwrap().len(), 2);
        // Too large to keep.
        let _ = pool.take_or(Vec::new);
        pool.give(Vec::with_capacity(1024));
        assert_eq!(pool.idle.lock().unwrap().len(), 1);
    }
}
