//! Which pages of a layer's mapping were in the page cache a moment ago, so READs sent from the
//! mapping (`storage::volume::mapped_read`) do not each pay a `mincore` of their own.
//!
//! A READ may only be sent from the mapping when its pages are in the page cache: the kernel's
//! copy would otherwise read them from the disk on the connection's thread. Asking `mincore`
//! for each READ was 15% of the server's CPU on 4 KiB random reads over one Unix connection
//! (0.4-0.6 µs a call, most of it the system call and the page-table walk's set-up), where one
//! `mincore` of a whole 2 MiB chunk whose pages are mapped costs 0.7 µs. So a chunk that READs
//! keep coming to is checked whole, and its answer trusted for `TRUSTED_FOR`; a chunk read
//! rarely is asked range by range, as before (a whole check of a chunk whose pages are not
//! mapped yet looks each one up in the page cache: 34 µs for 512 pages).
//!
//! What trusting an old answer risks: a page evicted since (memory pressure, a `DONTNEED` from
//! outside) is read back from the disk inside the `writev` that sends it, on the connection's
//! thread: the stall the check is there to avoid, never wrong bytes or an error. The window is
//! `TRUSTED_FOR`, next to the microseconds between a per-READ check and its `writev`. Pages the
//! old answer calls missing are asked about again, so pages cached since are used at once.

use std::ptr::NonNull;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What one slot describes: the span one page of page tables maps (512 entries of 4 KiB).
pub const CHUNK_BYTES: u64 = 2 << 20;
/// Pages per chunk at the smallest page size (4 KiB); one bit each.
const MAX_CHUNK_PAGES: usize = 512;
/// How long a whole chunk's answer is trusted.
pub const TRUSTED_FOR: Duration = Duration::from_millis(100);
/// A chunk is checked whole at its slot's this many-th READ (since the slot took it): rarely
/// read chunks keep the cheaper per-range check.
const READS_BEFORE_WHOLE_CHECK: u32 = 4;
/// Slots per mapping, at most (about 100 bytes each): chunks beyond share them, one at a time.
const MAX_SLOTS: usize = 1024;

/// Asks the kernel about the pages under a range of the mapping: one byte per page into the
/// vector (bit 0: in the page cache), which has exactly one per page; false when it cannot tell.
pub trait PageCheck: Fn(NonNull<u8>, usize, &mut [u8]) -> bool {}
impl<F: Fn(NonNull<u8>, usize, &mut [u8]) -> bool> PageCheck for F {}

/// The residency answers for one mapping, which is `size_bytes` long from `base`.
pub struct ResidentChunks {
    slots: Box<[Mutex<Slot>]>,
}

#[derive(Default)]
struct Slot {
    /// The chunk this slot describes, plus one (0: none).
    chunk_plus_one: u64,
    /// When the chunk was last checked whole; `resident` holds that answer, with pages found
    /// cached since added.
    checked_at: Option<Instant>,
    /// READs that asked since the slot took the chunk, while it had no whole answer.
    reads: u32,
    resident: [u64; MAX_CHUNK_PAGES / 64],
}

impl Slot {
    fn all_set(&self, pages: std::ops::Range<usize>) -> bool {
        pages
            .into_iter()
            .all(|page| self.resident[page / 64] & (1 << (page % 64)) != 0)
    }

    fn set(&mut self, first_page: usize, vector: &[u8]) {
        for (i, byte) in vector.iter().enumerate() {
            let page = first_page + i;
            if byte & 1 == 1 {
                self.resident[page / 64] |= 1 << (page % 64);
            } else {
                self.resident[page / 64] &= !(1 << (page % 64));
            }
        }
    }
}

impl ResidentChunks {
    pub fn new(size_bytes: u64) -> ResidentChunks {
        let slots = size_bytes.div_ceil(CHUNK_BYTES).clamp(1, MAX_SLOTS as u64) as usize;
        ResidentChunks {
            slots: (0..slots).map(|_| Mutex::default()).collect(),
        }
    }

    /// Whether every page of `offset_bytes..offset_bytes + length_bytes` of the mapping at
    /// `base` (`size_bytes` long, page-aligned, pages of `page_bytes`) is in the page cache, as
    /// far as an answer at most `TRUSTED_FOR` old tells (see the module's comment), else as
    /// `check` tells now.
    #[allow(clippy::too_many_arguments)]
    pub fn all_resident(
        &self,
        base: NonNull<u8>,
        size_bytes: u64,
        page_bytes: u64,
        offset_bytes: u64,
        length_bytes: u64,
        now: Instant,
        check: &impl PageCheck,
    ) -> bool {
        let Some(end_bytes) = offset_bytes.checked_add(length_bytes) else {
            return false;
        };
        if length_bytes == 0 || end_bytes > size_bytes || !CHUNK_BYTES.is_multiple_of(page_bytes) {
            return false;
        }
        let mut from_bytes = offset_bytes;
        while from_bytes < end_bytes {
            let chunk = from_bytes / CHUNK_BYTES;
            let to_bytes = end_bytes.min((chunk + 1) * CHUNK_BYTES);
            let piece = Piece {
                base,
                size_bytes,
                page_bytes,
                chunk,
                from_bytes,
                to_bytes,
            };
            if !self.piece_resident(&piece, now, check) {
                return false;
            }
            from_bytes = to_bytes;
        }
        true
    }

    fn piece_resident(&self, piece: &Piece, now: Instant, check: &impl PageCheck) -> bool {
        let slot = &self.slots[(piece.chunk % self.slots.len() as u64) as usize];
        // Another connection's thread is at this slot (maybe checking the chunk whole): ask
        // about this range alone rather than wait.
        let Ok(mut slot) = slot.try_lock() else {
            return piece
                .check_range(check, &mut [0; MAX_CHUNK_PAGES])
                .is_some_and(all_cached);
        };
        if slot.chunk_plus_one != piece.chunk + 1 {
            *slot = Slot {
                chunk_plus_one: piece.chunk + 1,
                ..Slot::default()
            };
        }
        let pages = piece.pages();
        let trusted = slot
            .checked_at
            .is_some_and(|at| now.saturating_duration_since(at) < TRUSTED_FOR);
        if trusted && slot.all_set(pages.clone()) {
            return true;
        }
        if slot.checked_at.is_none() {
            slot.reads += 1;
        }
        // A chunk checked whole before and out of date, or one READs kept asking about.
        if !trusted && (slot.checked_at.is_some() || slot.reads >= READS_BEFORE_WHOLE_CHECK) {
            let mut vector = [0; MAX_CHUNK_PAGES];
            let whole = piece.whole_chunk(&mut vector);
            if check(whole.0, whole.1, whole.2) {
                slot.set(0, whole.2);
                slot.checked_at = Some(now);
                slot.reads = 0;
                return slot.all_set(pages);
            }
            slot.checked_at = None;
            slot.reads = 0;
            return false;
        }
        match piece.check_range(check, &mut [0; MAX_CHUNK_PAGES]) {
            Some(found) => {
                slot.set(pages.start, found);
                all_cached(found)
            }
            None => false,
        }
    }
}

fn all_cached(vector: &[u8]) -> bool {
    vector.iter().all(|page| page & 1 == 1)
}

/// The part of one chunk a range covers.
struct Piece {
    base: NonNull<u8>,
    size_bytes: u64,
    page_bytes: u64,
    chunk: u64,
    from_bytes: u64,
    to_bytes: u64,
}

impl Piece {
    /// The pages of the piece, numbered within its chunk.
    fn pages(&self) -> std::ops::Range<usize> {
        let chunk_start = self.chunk * CHUNK_BYTES;
        let first = (self.from_bytes - chunk_start) / self.page_bytes;
        let end = (self.to_bytes - chunk_start).div_ceil(self.page_bytes);
        first as usize..end as usize
    }

    fn at(&self, offset_bytes: u64) -> NonNull<u8> {
        // SAFETY: callers pass offsets within the mapping (`all_resident` checked the range
        // against `size_bytes`), so the pointer stays inside it.
        unsafe { self.base.add(offset_bytes as usize) }
    }

    /// Asks `check` about this piece's pages alone, into the front of `vector`; the answer's
    /// bytes, or `None` when it cannot tell.
    fn check_range<'v>(
        &self,
        check: &impl PageCheck,
        vector: &'v mut [u8; MAX_CHUNK_PAGES],
    ) -> Option<&'v [u8]> {
        let pages = self.pages().len();
        let start = self.at(self.from_bytes);
        let length = (self.to_bytes - self.from_bytes) as usize;
        check(start, length, &mut vector[..pages]).then_some(&vector[..pages])
    }

    /// The whole chunk, as far as the mapping goes: its start, length, and vector.
    fn whole_chunk<'v>(
        &self,
        vector: &'v mut [u8; MAX_CHUNK_PAGES],
    ) -> (NonNull<u8>, usize, &'v mut [u8]) {
        let chunk_start = self.chunk * CHUNK_BYTES;
        let chunk_end = self.size_bytes.min(chunk_start + CHUNK_BYTES);
        let pages = (chunk_end - chunk_start).div_ceil(self.page_bytes) as usize;
        (
            self.at(chunk_start),
            (chunk_end - chunk_start) as usize,
            &mut vector[..pages],
        )
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::collections::BTreeSet;

    use super::*;

    const PAGE: u64 = 4096;
    const MIB: u64 = 1 << 20;

    /// A mapping stand-in (`base` must point into a real allocation that long) and a kernel
    /// whose cached pages the test sets; counts the questions asked.
    struct Kernel {
        memory: Vec<u8>,
        cached: RefCell<BTreeSet<u64>>,
        asked: Cell<u32>,
        asked_pages: Cell<usize>,
        fails: Cell<bool>,
    }

    impl Kernel {
        fn new(size_bytes: u64) -> Kernel {
            Kernel {
                memory: vec![0; size_bytes as usize],
                cached: RefCell::default(),
                asked: Cell::new(0),
                asked_pages: Cell::new(0),
                fails: Cell::new(false),
            }
        }

        fn base(&self) -> NonNull<u8> {
            NonNull::new(self.memory.as_ptr().cast_mut()).unwrap()
        }

        fn cache(&self, pages: std::ops::Range<u64>) {
            self.cached.borrow_mut().extend(pages);
        }

        fn evict(&self, page: u64) {
            self.cached.borrow_mut().remove(&page);
        }

        fn check(&self) -> impl PageCheck + '_ {
            |start: NonNull<u8>, length: usize, vector: &mut [u8]| {
                self.asked.set(self.asked.get() + 1);
                self.asked_pages.set(self.asked_pages.get() + vector.len());
                if self.fails.get() {
                    return false;
                }
                let first = (start.as_ptr() as u64 - self.base().as_ptr() as u64) / PAGE;
                assert_eq!(vector.len() as u64, (length as u64).div_ceil(PAGE));
                for (i, byte) in vector.iter_mut().enumerate() {
                    *byte = self.cached.borrow().contains(&(first + i as u64)) as u8;
                }
                true
            }
        }

        fn take_asked(&self) -> (u32, usize) {
            (self.asked.replace(0), self.asked_pages.replace(0))
        }
    }

    fn ask(
        chunks: &ResidentChunks,
        kernel: &Kernel,
        offset_bytes: u64,
        length_bytes: u64,
        now: Instant,
    ) -> bool {
        chunks.all_resident(
            kernel.base(),
            kernel.memory.len() as u64,
            PAGE,
            offset_bytes,
            length_bytes,
            now,
            &kernel.check(),
        )
    }

    #[test]
    fn a_chunk_read_often_is_checked_whole_and_trusted_for_a_while() {
        let kernel = Kernel::new(4 * MIB);
        kernel.cache(0..512);
        let chunks = ResidentChunks::new(4 * MIB);
        let now = Instant::now();
        // The first reads of a chunk ask about their own pages.
        for i in 0..READS_BEFORE_WHOLE_CHECK as u64 - 1 {
            assert!(ask(&chunks, &kernel, i * 8192, 4096, now));
            assert_eq!(kernel.take_asked(), (1, 1));
        }
        // The next one checks the whole chunk; later ones ask nothing.
        assert!(ask(&chunks, &kernel, 100 * PAGE, 4096, now));
        assert_eq!(kernel.take_asked(), (1, 512));
        for page in [0, 7, 300, 511] {
            assert!(ask(&chunks, &kernel, page * PAGE + 17, 4000, now));
        }
        assert_eq!(kernel.take_asked(), (0, 0));
        // An eviction is not seen while the answer is trusted (the risk the module names)...
        kernel.evict(300);
        assert!(ask(
            &chunks,
            &kernel,
            300 * PAGE,
            4096,
            now + TRUSTED_FOR / 2
        ));
        assert_eq!(kernel.take_asked(), (0, 0));
        // ...and is once it is out of date: the chunk is checked whole again at once.
        let later = now + TRUSTED_FOR;
        assert!(!ask(&chunks, &kernel, 300 * PAGE, 4096, later));
        assert_eq!(kernel.take_asked(), (1, 512));
        assert!(ask(&chunks, &kernel, 301 * PAGE, 4096, later));
        assert_eq!(kernel.take_asked(), (0, 0));
    }

    #[test]
    fn pages_found_missing_are_asked_about_again_and_learned_once_cached() {
        let kernel = Kernel::new(2 * MIB);
        kernel.cache(0..10);
        let chunks = ResidentChunks::new(2 * MIB);
        let now = Instant::now();
        for _ in 0..READS_BEFORE_WHOLE_CHECK {
            assert!(ask(&chunks, &kernel, 0, 4096, now));
        }
        kernel.take_asked();
        // Page 20 was not cached at the whole check: asked about on its own, each time.
        assert!(!ask(&chunks, &kernel, 20 * PAGE, 4096, now));
        assert_eq!(kernel.take_asked(), (1, 1));
        kernel.cache(20..21);
        assert!(ask(&chunks, &kernel, 20 * PAGE, 4096, now));
        assert_eq!(kernel.take_asked(), (1, 1));
        // Learned: not asked again while the chunk's answer is trusted.
        assert!(ask(&chunks, &kernel, 20 * PAGE, 4096, now));
        assert_eq!(kernel.take_asked(), (0, 0));
        // A range with one cached and one missing page is not resident.
        assert!(!ask(&chunks, &kernel, 9 * PAGE, 8192, now));
    }

    #[test]
    fn ranges_across_chunks_the_last_chunk_and_failures() {
        // 2 MiB and a half: the last chunk is half a chunk, checked only as far as it goes.
        let size = 5 * MIB / 2;
        let kernel = Kernel::new(size);
        kernel.cache(0..size / PAGE);
        let chunks = ResidentChunks::new(size);
        let now = Instant::now();
        let last = size - 4096;
        for _ in 0..READS_BEFORE_WHOLE_CHECK {
            assert!(ask(&chunks, &kernel, last, 4096, now));
        }
        assert_eq!(kernel.take_asked(), (READS_BEFORE_WHOLE_CHECK, 3 + 128));
        // Across the chunks' boundary: each chunk's part is asked about on its own.
        assert!(ask(&chunks, &kernel, 2 * MIB - 4096, 8192, now));
        assert_eq!(kernel.take_asked(), (1, 1));
        kernel.evict(511);
        assert!(!ask(&chunks, &kernel, 2 * MIB - 4096, 8192, now));
        // Past the end, empty, or a kernel that cannot tell: not resident.
        assert!(!ask(&chunks, &kernel, last, 8192, now));
        assert!(!ask(&chunks, &kernel, 0, 0, now));
        kernel.fails.set(true);
        assert!(!ask(&chunks, &kernel, 4096, 4096, now));
    }

    #[test]
    fn chunks_sharing_a_slot_take_turns_without_mixing_answers() {
        // More chunks than slots: chunk 0 and chunk MAX_SLOTS share slot 0.
        let size = (MAX_SLOTS as u64 + 1) * CHUNK_BYTES;
        let kernel = Kernel::new(size);
        kernel.cache(0..512);
        let chunks = ResidentChunks::new(size);
        assert_eq!(chunks.slots.len(), MAX_SLOTS);
        let now = Instant::now();
        for _ in 0..READS_BEFORE_WHOLE_CHECK {
            assert!(ask(&chunks, &kernel, 0, 4096, now));
        }
        // The other chunk's pages are not cached: chunk 0's answer does not speak for them.
        let other = MAX_SLOTS as u64 * CHUNK_BYTES;
        assert!(!ask(&chunks, &kernel, other, 4096, now));
        // And chunk 0 lost the slot: asked about again.
        kernel.take_asked();
        assert!(ask(&chunks, &kernel, 0, 4096, now));
        assert_eq!(kernel.take_asked(), (1, 1));
    }
}
