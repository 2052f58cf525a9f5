//! Reusable read buffers.
//!
//! Every READ needs a buffer as long as the request, which lives until the reply has left the
//! socket. Allocating and zeroing a fresh one each time cost more CPU than the copy out of the
//! page cache for 1 MiB reads; here buffers come back to the pool when their last `Bytes` clone
//! is dropped. The pool is bounded, so idle memory stays small.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

/// Smallest pooled size; smaller requests still get a buffer of this class.
const MIN_CLASS_BYTES: usize = 4096;
/// Largest pooled size (the NBD maximum payload); larger buffers are allocated and freed.
const MAX_CLASS_BYTES: usize = 32 << 20;
const CLASSES: usize = (MAX_CLASS_BYTES / MIN_CLASS_BYTES).trailing_zeros() as usize + 1;

pub struct BufferPool {
    classes: [Mutex<Vec<Vec<u8>>>; CLASSES],
    max_cached_bytes_per_class: usize,
}

impl BufferPool {
    /// Keeps at most `max_cached_bytes_per_class` of idle buffers in each size class.
    pub fn new(max_cached_bytes_per_class: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            classes: std::array::from_fn(|_| Mutex::new(Vec::new())),
            max_cached_bytes_per_class,
        })
    }

    fn class_of(len_bytes: usize) -> Option<usize> {
        if len_bytes > MAX_CLASS_BYTES {
            return None;
        }
        let size = len_bytes.max(MIN_CLASS_BYTES).next_power_of_two();
        Some((size / MIN_CLASS_BYTES).trailing_zeros() as usize)
    }

    /// A buffer of exactly `len_bytes`. Its content is whatever an earlier read left there: the
    /// caller overwrites all of it before anyone sees it.
    pub fn take(&self, len_bytes: usize) -> BytesMut {
        let Some(class) = Self::class_of(len_bytes) else {
            return BytesMut::zeroed(len_bytes);
        };
        let recycled = self.classes[class]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut vec = recycled.unwrap_or_else(|| vec![0u8; MIN_CLASS_BYTES << class]);
        vec.truncate(len_bytes);
        // Through `Bytes`: a uniquely owned Vec becomes a BytesMut without a copy.
        BytesMut::from(Bytes::from(vec))
    }

    /// Freezes a filled buffer into `Bytes` that return their memory here when dropped.
    pub fn freeze(self: &Arc<Self>, buf: BytesMut) -> Bytes {
        let vec = Vec::from(buf);
        match Self::class_of(vec.capacity()) {
            Some(class) if vec.capacity() == MIN_CLASS_BYTES << class => {
                Bytes::from_owner(Pooled {
                    vec,
                    pool: Arc::clone(self),
                    class,
                })
            }
            _ => Bytes::from(vec),
        }
    }

    fn give_back(&self, mut vec: Vec<u8>, class: usize) {
        let capacity = vec.capacity();
        let mut idle = self.classes[class]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if (idle.len() + 1) * capacity <= self.max_cached_bytes_per_class {
            // Restore the full length so `take` can truncate without reinitialising memory.
            vec.resize(capacity, 0);
            idle.push(vec);
        }
    }
}

struct Pooled {
    vec: Vec<u8>,
    pool: Arc<BufferPool>,
    class: usize,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.vec
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool
            .give_back(std::mem::take(&mut self.vec), self.class);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_sized_exactly() {
        let pool = BufferPool::new(1 << 20);
        let mut buf = pool.take(5000);
        assert_eq!(buf.len(), 5000);
        buf.fill(7);
        let ptr = buf.as_ptr();
        let bytes = pool.freeze(buf);
        assert_eq!(bytes.len(), 5000);
        assert!(bytes.iter().all(|&b| b == 7));
        let slice = bytes.slice(10..20);
        drop(bytes);
        // Still referenced by the slice: not back in the pool yet.
        assert_ne!(pool.take(5000).as_ptr(), ptr);
        drop(slice);
        assert_eq!(pool.take(8192).as_ptr(), ptr);
    }

    #[test]
    fn oversized_and_overflowing_buffers_are_not_kept() {
        let pool = BufferPool::new(8192);
        let big = pool.take((32 << 20) + 1);
        assert_eq!(big.len(), (32 << 20) + 1);
        drop(pool.freeze(big));
        let a = pool.freeze(pool.take(4096));
        let b = pool.freeze(pool.take(4096));
        let c = pool.freeze(pool.take(4096));
        drop((a, b, c));
        let idle = pool.classes[0].lock().unwrap().len();
        assert_eq!(idle, 2, "class capped at 8 KiB of idle buffers");
    }
}
