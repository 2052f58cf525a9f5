//! Page-aligned buffers for O_DIRECT writes, and a pool that recycles them.
//!
//! O_DIRECT needs the memory, the file offset and the length aligned to the device's logical
//! block size; 4 KiB covers every device the daemon runs on. The buffers are zeroed once when
//! allocated and then reused as they are: a restore fills each one completely before it is
//! written, so recycling skips both the allocation (page faults on 4 MiB of fresh memory) and
//! a memset per chunk.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Alignment of every buffer's start (and the unit O_DIRECT lengths and offsets must keep).
pub const ALIGN_BYTES: usize = 4096;

/// A heap buffer whose first byte is [`ALIGN_BYTES`]-aligned. Its whole capacity is
/// initialised (zeroed at allocation), so any length up to the capacity may be exposed.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: an AlignedBuf owns its allocation exclusively (like a Vec<u8>); nothing else holds
// the pointer, so moving it to or sharing `&` with another thread is as safe as for Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` only gives out `&[u8]`; mutation needs `&mut`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `capacity` bytes (rounded up to [`ALIGN_BYTES`]), `len == capacity`.
    pub fn zeroed(capacity: usize) -> AlignedBuf {
        let size = capacity.max(1).next_multiple_of(ALIGN_BYTES);
        let layout = match Layout::from_size_align(size, ALIGN_BYTES) {
            Ok(layout) => layout,
            // Only a size near usize::MAX gets here, which no allocation could satisfy anyway.
            Err(_) => alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        // SAFETY: the layout's size is at least ALIGN_BYTES, never zero.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            len: size,
            layout,
        }
    }

    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// Exposes the first `len` bytes (at most the capacity). They hold whatever was last
    /// written there, or zeroes: never uninitialised memory.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "aligned buffer length {len} exceeds its capacity {}",
            self.capacity()
        );
        self.len = len;
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `capacity` initialised bytes (zeroed at allocation) for
        // as long as `self` lives, `len <= capacity`, and `&self` excludes writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference to the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly `layout` and is freed only here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Idle buffers of one capacity, handed out by `take` and returned when the last `Bytes`
/// made by `freeze` is dropped (with io_uring that is after the kernel finished the write).
pub struct AlignedPool {
    capacity: usize,
    max_idle: usize,
    idle: Mutex<Vec<AlignedBuf>>,
}

impl AlignedPool {
    /// Buffers of `capacity` bytes (rounded up to [`ALIGN_BYTES`]); at most `max_idle` are
    /// kept for reuse.
    pub fn new(capacity: usize, max_idle: usize) -> Arc<AlignedPool> {
        Arc::new(AlignedPool {
            capacity: capacity.max(1).next_multiple_of(ALIGN_BYTES),
            max_idle,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// The size of every buffer, the longest `take` may ask for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A buffer of exactly `len` bytes (at most the pool's capacity). Its content is left over
    /// from an earlier use: the caller overwrites all of it before anyone reads it.
    pub fn take(&self, len: usize) -> AlignedBuf {
        let recycled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut buf = recycled.unwrap_or_else(|| AlignedBuf::zeroed(self.capacity));
        buf.set_len(len);
        buf
    }

    /// `Bytes` over a filled buffer; the buffer comes back here when they are dropped.
    pub fn freeze(self: &Arc<Self>, buf: AlignedBuf) -> Bytes {
        Bytes::from_owner(Pooled {
            buf: Some(buf),
            pool: Arc::clone(self),
        })
    }

    fn give_back(&self, buf: AlignedBuf) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle && buf.capacity() == self.capacity {
            idle.push(buf);
        }
    }
}

struct Pooled {
    /// Only `None` while dropping.
    buf: Option<AlignedBuf>,
    pool: Arc<AlignedPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or_default()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give_back(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_sized() {
        let mut buf = AlignedBuf::zeroed(10_000);
        assert_eq!(buf.capacity(), 12_288);
        assert_eq!(buf.as_ptr() as usize % ALIGN_BYTES, 0);
        assert!(buf.iter().all(|&b| b == 0));
        buf.set_len(5);
        buf.copy_from_slice(b"hello");
        assert_eq!(&buf[..], b"hello");
    }

    #[test]
    fn pool_recycles_after_the_last_bytes_is_dropped() {
        let pool = AlignedPool::new(8000, 1);
        assert_eq!(pool.capacity(), 8192);
        let mut buf = pool.take(4096);
        buf.fill(3);
        let ptr = buf.as_ptr();
        let bytes = pool.freeze(buf);
        assert_eq!(bytes.as_ptr(), ptr);
        assert_eq!(bytes.len(), 4096);
        let slice = bytes.slice(100..200);
        drop(bytes);
        assert_ne!(
            pool.take(4096).as_ptr(),
            ptr,
            "still referenced by the slice"
        );
        drop(slice);
        let again = pool.take(8192);
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), 8192);
        // The pool keeps at most one idle buffer.
        let (a, b) = (pool.freeze(again), pool.freeze(pool.take(1)));
        drop((a, b));
        assert_eq!(pool.idle.lock().unwrap().len(), 1);
    }

    #[test]
    #[should_panic(expected = "exceeds its capacity")]
    fn overlong_length_is_refused() {
        AlignedPool::new(4096, 1).take(4097);
    }
}
