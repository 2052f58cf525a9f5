//! A layer's data file mapped shared, so a large write's bytes can be received from the client's
//! socket straight into the page cache (see `storage::volume::in_place`), and a READ's bytes
//! written to the socket straight from it (see `storage::volume::mapped_read`). The mapping is let go
//! when the layer stops being the head, and made anew when landings touched too much of it.
//!
//! Only the kernel ever copies into or out of this mapping (`recv` into a range of it, `writev`
//! from one), never our own code: a page the kernel cannot make present (an I/O error reading
//! it, a full disk, a file cut short by a shrink) then fails that system call with EFAULT. A copy
//! by our own code would take SIGBUS instead and end the daemon.

use std::fs::File;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};

use super::resident::{PageCheck, ResidentChunks};
use crate::io::page_bytes;

/// The mapping is made anew once landings have touched this much of it: the page tables of a
/// range landed in stay until the mapping goes (the pages themselves are reclaimed as any page
/// cache), so the kernel memory a mapping pins grows with the ranges written through it, however
/// large the volume: 32 MiB of page tables at most at this budget. Pages only land in place
/// while they are cached, so a working set that fits in memory stays well inside it.
pub const MAX_MAPPED_TOUCHED_BYTES: u64 = 16 << 30;

/// What the budget counts in: the span one page of page tables maps (512 entries of 4 KiB), so
/// that touched chunks count the page-table pages a mapping pins.
const TOUCH_CHUNK_BYTES: u64 = 2 << 20;

/// After a mapping made anew failed (the file mapped before, so it can be: address space or
/// memory short for a moment), the next try waits this long; ranges meanwhile take the
/// ordinary paths.
const REMAP_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The mapping of one layer's data file while the layer is a volume's head, made on first use.
/// A layer whose file cannot be mapped at first (no address space left for a huge volume, a
/// filesystem without shared mappings) takes the ordinary paths for good; one whose mapping
/// made anew fails tries again later (`REMAP_RETRY_AFTER`).
#[derive(Default)]
pub struct MappedData {
    state: Mutex<MapState>,
}

#[derive(Default)]
struct MapState {
    map: Option<Arc<Mapping>>,
    unmappable: bool,
    /// The file was mapped once: a failure to map it anew is not for good.
    mapped_before: bool,
    /// A mapping made anew failed: no try before then.
    retry_at: Option<Instant>,
    /// One bit per TOUCH_CHUNK_BYTES of the current mapping that a range was handed out in.
    touched: Vec<u64>,
    touched_bytes: u64,
}

/// A shared mapping; unmapped once the last range handed out of it is dropped.
struct Mapping {
    map: Option<MmapRaw>,
    /// Which of its pages were cached a moment ago (see `resident`).
    resident: ResidentChunks,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Unmapping tears down a page-table entry for every page landed in, which for gigabytes
        // is milliseconds: not on a connection's thread, where the last range is dropped.
        if let Some(map) = self.map.take() {
            let spawned = std::thread::Builder::new()
                .name("evsd-unmap".into())
                .spawn(move || drop(map));
            if let Err(error) = spawned {
                tracing::debug!(%error, "no thread to unmap a layer's mapping on; unmapping here");
            }
        }
    }
}

/// A range of a layer's mapping; the mapping stays in place while this lives.
pub struct MappedRange {
    _map: Arc<Mapping>,
    start: NonNull<u8>,
}

// SAFETY: the pointer addresses the mapping that `_map` keeps in place wherever the range goes,
// and is never dereferenced by our code, only handed to system calls (see the module's comment),
// so no thread can see a torn or dangling access through it.
unsafe impl Send for MappedRange {}
// SAFETY: as for `Send`; a shared range gives out only the pointer's value.
unsafe impl Sync for MappedRange {}

impl MappedRange {
    pub fn start(&self) -> NonNull<u8> {
        self.start
    }

    /// Whether the first `length_bytes` of the range are all in the page cache, as far as an
    /// answer at most `resident::TRUSTED_FOR` old tells, else as `check` (`mincore`, see
    /// `IoEngine::resident_pages`) tells now (`now`: the caller's clock reading, taken once
    /// per READ).
    pub fn all_resident(&self, length_bytes: u64, now: Instant, check: &impl PageCheck) -> bool {
        let Some(map) = self._map.map.as_ref() else {
            return false;
        };
        let offset_bytes = self.start.as_ptr() as u64 - map.as_ptr() as u64;
        let Some(base) = NonNull::new(map.as_mut_ptr()) else {
            return false;
        };
        self._map.resident.all_resident(
            base,
            map.len() as u64,
            page_bytes() as u64,
            offset_bytes,
            length_bytes,
            now,
            check,
        )
    }
}

impl MappedData {
    /// `offset_bytes..offset_bytes + length_bytes` of the mapping of `data` (`size_bytes`
    /// long), or `None` when the file is not mapped or the range leaves it.
    pub fn range(
        &self,
        data: &File,
        size_bytes: u64,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Option<MappedRange> {
        let range = self.range_uncharged(data, size_bytes, offset_bytes, length_bytes)?;
        self.charge(offset_bytes, length_bytes);
        Some(range)
    }

    /// `range` without counting the range against the touch budget: for a caller that may not
    /// touch it after all (a read whose pages turn out not to be cached), and calls
    /// [`MappedData::charge`] once it will.
    pub fn range_uncharged(
        &self,
        data: &File,
        size_bytes: u64,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Option<MappedRange> {
        let end_bytes = offset_bytes.checked_add(length_bytes)?;
        if end_bytes > size_bytes {
            return None;
        }
        let mut state = self.lock();
        if state.unmappable {
            return None;
        }
        let chunks = offset_bytes / TOUCH_CHUNK_BYTES..end_bytes.div_ceil(TOUCH_CHUNK_BYTES);
        let fresh_bytes =
            chunks.clone().filter(|&c| !state.is_touched(c)).count() as u64 * TOUCH_CHUNK_BYTES;
        if state.map.is_some() && state.touched_bytes + fresh_bytes > MAX_MAPPED_TOUCHED_BYTES {
            state.release();
        }
        if state.map.is_none() {
            if state.retry_at.is_some_and(|at| Instant::now() < at) {
                return None;
            }
            let map = match map_shared(data, size_bytes) {
                Ok(map) => map,
                Err(error) if state.mapped_before => {
                    tracing::debug!(%error, size_bytes, "a layer's data file could not be mapped anew; trying again in a second");
                    state.retry_at = Some(Instant::now() + REMAP_RETRY_AFTER);
                    return None;
                }
                Err(error) => {
                    tracing::info!(%error, size_bytes, "a layer's data file could not be mapped; its reads and large writes take the ordinary paths");
                    state.unmappable = true;
                    return None;
                }
            };
            state.mapped_before = true;
            state.retry_at = None;
            state.map = Some(Arc::new(Mapping {
                map: Some(map),
                resident: ResidentChunks::new(size_bytes),
            }));
            state.touched = vec![0; size_bytes.div_ceil(TOUCH_CHUNK_BYTES).div_ceil(64) as usize];
        }
        let mapping = Arc::clone(state.map.as_ref()?);
        let map = mapping.map.as_ref()?;
        if end_bytes > map.len() as u64 {
            return None;
        }
        // SAFETY: `offset_bytes` lies within the mapping (checked just above), so the pointer
        // stays inside the one allocation `as_mut_ptr` points into.
        let start = NonNull::new(unsafe { map.as_mut_ptr().add(offset_bytes as usize) })?;
        Some(MappedRange {
            _map: mapping,
            start,
        })
    }

    /// Counts a range handed out by `range_uncharged` against the touch budget (the next range
    /// maps the file anew when it is spent).
    pub fn charge(&self, offset_bytes: u64, length_bytes: u64) {
        let Some(end_bytes) = offset_bytes.checked_add(length_bytes) else {
            return;
        };
        let mut state = self.lock();
        if state.map.is_none() {
            return;
        }
        for chunk in offset_bytes / TOUCH_CHUNK_BYTES..end_bytes.div_ceil(TOUCH_CHUNK_BYTES) {
            state.touch(chunk);
        }
    }

    /// Lets the mapping go (once ranges handed out of it are dropped); the next range maps the
    /// file anew. For a layer that stopped being the head: nothing lands in it any more.
    pub fn release(&self) {
        self.lock().release();
    }

    /// Whether the file is mapped now.
    #[cfg(test)]
    pub fn is_mapped(&self) -> bool {
        self.lock().map.is_some()
    }

    fn lock(&self) -> MutexGuard<'_, MapState> {
        // The state is a handful of plain fields, consistent after any panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl MapState {
    fn release(&mut self) {
        self.map = None;
        self.touched.clear();
        self.touched_bytes = 0;
    }

    fn is_touched(&self, chunk: u64) -> bool {
        self.touched
            .get((chunk / 64) as usize)
            .is_some_and(|word| word & (1 << (chunk % 64)) != 0)
    }

    fn touch(&mut self, chunk: u64) {
        if let Some(word) = self.touched.get_mut((chunk / 64) as usize) {
            if *word & (1 << (chunk % 64)) == 0 {
                *word |= 1 << (chunk % 64);
                self.touched_bytes += TOUCH_CHUNK_BYTES;
            }
        }
    }
}

/// Asks the CPU to fetch one cache line of each page of `start..start + length_bytes`, a range of
/// a live mapping, so the kernel's copy out of it right after (a socket's `writev`) finds the
/// pages' translations and first lines on their way: without it each page of a cold 4 KiB READ
/// starts with a page walk (two-dimensional under a hypervisor) that the copy waits for, one
/// page after the other. Measured in C, one `writev` of 8 replies of random cached 4 KiB pages
/// from a 1 GiB mapping: 2.0-2.2 µs of the sender's CPU per reply without, 1.6-1.7 with the first
/// line of each page, 1.4-1.6 with two to eight lines (within the noise of one). Issued as the
/// `writev` is built, after every `mincore` of the batch: issued at each READ, between one
/// `mincore` and the next, the page walks did not overlap and the copy's share of the server's
/// CPU fell only by what the prefetches themselves took. In evsd (fio, unix randread-4k over
/// four connections, A/B, three runs each): 274-281k IOPS at 4.24-4.25 server CPU seconds of 5
/// without, 285-331k at 3.92-4.17 with; the copy out of the mapping went from 36% of the
/// server's CPU to 27% (one connection, `perf`).
///
/// A prefetch is a hint, not an access: it never faults, whatever the page's state (not present,
/// truncated, poisoned), so it keeps to the module's rule that only the kernel touches mapped
/// bytes.
pub fn prefetch_pages(start: NonNull<u8>, length_bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const PAGE_BYTES: usize = 4096;
        let start = start.as_ptr() as usize;
        let Some(end) = start.checked_add(length_bytes) else {
            return;
        };
        let mut line = start;
        while line < end {
            // SAFETY: PREFETCHh reads nothing architecturally and raises no fault for any
            // address (Intel SDM vol. 2, PREFETCHh), so no address can make it misbehave.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
            line = (line & !(PAGE_BYTES - 1)) + PAGE_BYTES;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, length_bytes);
}

fn map_shared(data: &File, size_bytes: u64) -> std::io::Result<MmapRaw> {
    let len = usize::try_from(size_bytes)
        .ok()
        .filter(|&len| len > 0)
        .ok_or_else(|| std::io::Error::other(format!("cannot map {size_bytes} bytes")))?;
    let map = MmapOptions::new().len(len).map_raw(data)?;
    // Faults through the mapping find cached pages (checked first): none may start readahead
    // from the connection's thread on a page an earlier sequential read marked. A/B: unix
    // randread-4k j1 and write-1m j1 the same within the noise.
    if let Err(error) = map.advise(memmap2::Advice::Random) {
        tracing::debug!(%error, "advising a layer's mapping as random access failed");
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    /// One `recv` of up to `length` bytes from `receiver` into `at`, as the daemon does.
    fn recv_into(
        receiver: &std::os::unix::net::UnixStream,
        at: NonNull<u8>,
        length: usize,
    ) -> isize {
        // SAFETY: the callers pass the start of a live `length`-byte range of a mapping that
        // only the kernel writes.
        unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(receiver),
                at.as_ptr().cast(),
                length,
                0,
            )
        }
    }

    /// 4 KiB of `byte` received into `at` as the daemon does, then read back from `file` at
    /// `offset_bytes`.
    fn assert_lands(file: &File, at: NonNull<u8>, offset_bytes: u64, byte: u8) {
        let (mut sender, receiver) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut sender, &[byte; 4096]).unwrap();
        assert_eq!(recv_into(&receiver, at, 4096), 4096);
        let mut back = [0u8; 4096];
        file.read_exact_at(&mut back, offset_bytes).unwrap();
        assert!(
            back.iter().all(|&b| b == byte),
            "the bytes landed in the file"
        );
    }

    #[test]
    fn a_range_points_into_the_file_and_ranges_past_its_end_are_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let mapped = MappedData::default();
        let at = mapped.range(&file, 1 << 20, 8192, 4096).expect("mapped");
        assert_lands(&file, at.start(), 8192, 9);
        assert!(mapped
            .range(&file, 1 << 20, (1 << 20) - 4096, 8192)
            .is_none());
        assert!(mapped.range(&file, 1 << 20, u64::MAX, 1).is_none());
    }

    #[test]
    fn a_fault_the_kernel_cannot_serve_fails_the_receive_instead_of_raising_sigbus() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let mapped = MappedData::default();
        let at = mapped
            .range(&file, 1 << 20, 512 << 10, 4096)
            .expect("mapped");
        // Cut the file short under the mapping: a page past the end cannot be faulted in.
        file.set_len(4096).unwrap();
        let (mut sender, receiver) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut sender, &[1u8; 4096]).unwrap();
        // The range is still mapped; only the file behind it is gone.
        assert_eq!(recv_into(&receiver, at.start(), 4096), -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EFAULT)
        );
        // The bytes stay in the socket for the ordinary path.
        let mut back = [0u8; 4096];
        std::io::Read::read_exact(&mut &receiver, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 1));
    }

    #[test]
    fn prefetching_pages_the_kernel_cannot_serve_raises_nothing() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[7u8; 8192], 0).unwrap();
        let mapped = MappedData::default();
        let whole = mapped.range(&file, 1 << 20, 0, 1 << 20).expect("mapped");
        // Cached, a hole, and (after the cut) past the end of the file, where a read by our
        // own code would take SIGBUS and end the test run.
        prefetch_pages(whole.start(), 1 << 20);
        file.set_len(4096).unwrap();
        prefetch_pages(whole.start(), 1 << 20);
        // SAFETY: 100 bytes into the 1 MiB mapping `whole` keeps in place: inside it, not null.
        let mid = unsafe { NonNull::new_unchecked(whole.start().as_ptr().add(100)) };
        prefetch_pages(mid, (1 << 20) - 100);
        // The bytes still cached before the cut read back through the file, unchanged.
        let mut back = [0u8; 4096];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 7));
    }

    #[test]
    fn a_released_mapping_stays_while_a_range_of_it_is_held_and_the_next_range_maps_anew() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let mapped = MappedData::default();
        let held = mapped.range(&file, 1 << 20, 0, 4096).expect("mapped");
        mapped.release();
        assert!(!mapped.is_mapped());
        // The released mapping is still there for the range that was handed out.
        assert_lands(&file, held.start(), 0, 7);
        let again = mapped.range(&file, 1 << 20, 0, 4096).expect("mapped anew");
        assert!(mapped.is_mapped());
        assert_ne!(
            again.start(),
            held.start(),
            "a new mapping, not the released one"
        );
    }

    #[test]
    fn a_failed_first_mapping_is_for_good_and_a_failed_remapping_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        // A shared writable mapping needs the file open for reading and writing.
        let write_only = std::fs::OpenOptions::new().write(true).open(&path).unwrap();

        let never = MappedData::default();
        assert!(never.range(&write_only, 1 << 20, 0, 4096).is_none());
        assert!(
            never.range(&file, 1 << 20, 0, 4096).is_none(),
            "a file that could not be mapped at first is not tried again"
        );

        let mapped = MappedData::default();
        assert!(mapped.range(&file, 1 << 20, 0, 4096).is_some());
        mapped.release();
        assert!(mapped.range(&write_only, 1 << 20, 0, 4096).is_none());
        assert!(
            mapped.range(&file, 1 << 20, 0, 4096).is_none(),
            "no new try before the retry delay"
        );
        mapped.lock().retry_at = Some(Instant::now());
        let again = mapped
            .range(&file, 1 << 20, 4096, 4096)
            .expect("mapped anew");
        assert_lands(&file, again.start(), 4096, 3);
    }

    #[test]
    fn touching_more_than_the_budget_maps_the_file_anew() {
        let file = tempfile::tempfile().unwrap();
        let size = MAX_MAPPED_TOUCHED_BYTES * 2;
        file.set_len(size).unwrap();
        let mapped = MappedData::default();
        // Held to the end, so the first mapping's addresses are not reused by the next.
        let first_range = mapped.range(&file, size, 0, 4096).expect("mapped");
        let first = first_range.start();
        // Every chunk of the budget once (the first is touched already), then again: no remap.
        let chunks = MAX_MAPPED_TOUCHED_BYTES / TOUCH_CHUNK_BYTES;
        for round in 0..2 {
            for chunk in 0..chunks {
                let at = mapped
                    .range(&file, size, chunk * TOUCH_CHUNK_BYTES, 4096)
                    .expect("mapped");
                assert_eq!(
                    at.start().as_ptr() as usize - first.as_ptr() as usize,
                    (chunk * TOUCH_CHUNK_BYTES) as usize,
                    "same mapping within the budget (round {round}, chunk {chunk})"
                );
            }
        }
        // One chunk more: a new mapping, whose budget starts with that chunk.
        let past = mapped
            .range(&file, size, MAX_MAPPED_TOUCHED_BYTES, 4096)
            .expect("mapped");
        let new_start = past.start().as_ptr() as usize - MAX_MAPPED_TOUCHED_BYTES as usize;
        assert_ne!(new_start, first.as_ptr() as usize, "mapped anew");
        let next = mapped
            .range(&file, size, 0, 4096)
            .expect("mapped")
            .start()
            .as_ptr() as usize;
        assert_eq!(next, new_start, "the new mapping serves the rest");
    }
}
