//! A layer's allocation map: one 2-bit state per 4 KiB block (absent, data, zero) in a
//! memory-mapped file of our own, plus in-memory summary bits (one per 2 MiB region) that let a
//! lookup skip a layer that holds nothing near a block without touching its map pages.
//!
//! The map is the truth about what a layer holds; it is derived from the data file's holes
//! only for blocks in the "written" state after a crash (see `written.rs`). Updates are atomic
//! per 64-bit word, so concurrent writers of nearby blocks never lose each other's bits, and
//! the kernel persists the mapped pages like any dirty file page (a FLUSH fdatasyncs the map
//! file after the data file).

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Advice, MmapOptions, MmapRaw};

#[path = "written.rs"]
mod written;

/// Bytes of volume data one map entry describes.
pub const BLOCK_BYTES: u64 = 4096;
/// Blocks per 64-bit map word.
pub(crate) const BLOCKS_PER_WORD: u64 = 32;
/// Blocks per summary bit (2 MiB of volume).
const SUMMARY_REGION_BLOCKS: u64 = 512;

/// What one layer says about one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockState {
    /// The layer does not hold the block: look below.
    Absent = 0,
    /// The layer's data file holds the block's bytes (raw bits `01`, or `11` while they may
    /// not be durable yet: see `written.rs`).
    Data = 1,
    /// The block reads as zeroes, masking any layer below.
    Zero = 2,
}

impl BlockState {
    fn from_bits(bits: u64) -> BlockState {
        match bits & 3 {
            0 => BlockState::Absent,
            2 => BlockState::Zero,
            // 3: written, not yet known durable (still data).
            _ => BlockState::Data,
        }
    }
}

/// Bytes of map file needed for `blocks` blocks (whole words).
pub fn map_file_bytes(blocks: u64) -> u64 {
    blocks.div_ceil(BLOCKS_PER_WORD) * 8
}

pub fn blocks_for(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(BLOCK_BYTES)
}

pub struct BlockMap {
    /// Keeps the mapping alive for as long as `words` points into it.
    mmap: MmapRaw,
    words_len: usize,
    blocks: u64,
    summary: Box<[AtomicU64]>,
    present_blocks: AtomicU64,
    data_blocks: AtomicU64,
    /// One bit per BACKED_CHUNK_BYTES of the map file known to have disk space behind it.
    backed: Box<[AtomicU64]>,
    /// One bit per page of map words that may hold "written" blocks (see `written.rs`).
    written_pages: Box<[AtomicU64]>,
}

/// How much of the map file [`BlockMap::ensure_backed`] allocates at a time.
const BACKED_CHUNK_BYTES: u64 = 64 << 10;

// SAFETY: the mapping is only accessed through atomics (see `words`), so sharing it between
// threads is as safe as sharing a slice of AtomicU64.
unsafe impl Send for BlockMap {}
// SAFETY: as above.
unsafe impl Sync for BlockMap {}

impl std::fmt::Debug for BlockMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockMap")
            .field("blocks", &self.blocks)
            .field("present_blocks", &self.present_blocks())
            .finish()
    }
}

impl BlockMap {
    /// Maps `file`, which must be at least [`map_file_bytes`]`(blocks)` long, and builds the
    /// summary and counters from its contents, unless the caller knows it `empty` (just
    /// created), which keeps a new layer O(1) whatever its size.
    pub fn open(file: &File, blocks: u64, empty: bool) -> std::io::Result<BlockMap> {
        let words_len = blocks.div_ceil(BLOCKS_PER_WORD) as usize;
        let file_len = file.metadata()?.len();
        if file_len < words_len as u64 * 8 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "map file holds {file_len} bytes, {} needed for {blocks} blocks",
                    words_len * 8
                ),
            ));
        }
        let mmap = MmapOptions::new().len(words_len * 8).map_raw(file)?;
        let regions = blocks.div_ceil(SUMMARY_REGION_BLOCKS);
        let summary = (0..regions.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect::<Vec<_>>()
            .into_boxed_slice();
        let chunks = (words_len as u64 * 8).div_ceil(BACKED_CHUNK_BYTES);
        let backed = (0..chunks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect::<Vec<_>>()
            .into_boxed_slice();
        let pages = (words_len as u64).div_ceil(written::WORDS_PER_TRACKED_PAGE);
        let written_pages = (0..pages.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect::<Vec<_>>()
            .into_boxed_slice();
        let map = BlockMap {
            mmap,
            words_len,
            blocks,
            summary,
            present_blocks: AtomicU64::new(0),
            data_blocks: AtomicU64::new(0),
            backed,
            written_pages,
        };
        if !empty {
            // The one sequential pass over the map: let the kernel read ahead for it.
            map.mmap.advise(Advice::Sequential)?;
            map.rebuild_summary();
        }
        // From here on the map is touched where writes and reads land, at random. Without this
        // a fault on a map page that is still a hole reads ahead by zeroing the pages around
        // it: under 4 KiB random writes to a fresh 1 TiB head (a 64 MiB map) that was half the
        // daemon's CPU, and single faults held a runtime thread for over 20 ms.
        map.mmap.advise(Advice::Random)?;
        Ok(map)
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `words_len * 8` bytes long, page aligned (so aligned for u64),
        // lives as long as `self`, and the file is at least that long (checked in `open`), so
        // no access faults. Every access goes through AtomicU64, which has the same layout as
        // u64; other processes never write our map files.
        unsafe {
            std::slice::from_raw_parts(self.mmap.as_ptr() as *const AtomicU64, self.words_len)
        }
    }

    fn rebuild_summary(&self) {
        let mut present = 0u64;
        let mut data = 0u64;
        // States past the last block in the last word are a cut tail's, not this map's.
        let last_word_mask = match self.blocks % BLOCKS_PER_WORD {
            0 => u64::MAX,
            used => bits_mask(0, used),
        };
        let last = self.words_len.saturating_sub(1);
        for (i, word) in self.words().iter().enumerate() {
            let mut w = word.load(Ordering::Relaxed);
            if i == last {
                w &= last_word_mask;
            }
            if w == 0 {
                continue;
            }
            present += count_present(w);
            data += count_data(w);
            self.mark_region(i as u64 * BLOCKS_PER_WORD);
            if w & (w >> 1) & 0x5555_5555_5555_5555 != 0 {
                // Written blocks another instance left (a resize's): settled by this one's syncs.
                self.mark_written_page(i as u64);
            }
        }
        self.present_blocks.store(present, Ordering::Relaxed);
        self.data_blocks.store(data, Ordering::Relaxed);
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Blocks not absent (data or zero): the layer's weight when choosing a merge direction.
    pub fn present_blocks(&self) -> u64 {
        self.present_blocks.load(Ordering::Relaxed)
    }

    /// Blocks whose bytes this layer holds.
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks.load(Ordering::Relaxed)
    }

    fn mark_region(&self, block: u64) {
        let region = block / SUMMARY_REGION_BLOCKS;
        let bit = 1u64 << (region % 64);
        let word = &self.summary[(region / 64) as usize];
        if word.load(Ordering::Relaxed) & bit == 0 {
            word.fetch_or(bit, Ordering::Release);
        }
    }

    /// Whether any block of the 2 MiB region around `block` may be present.
    fn region_may_hold(&self, block: u64) -> bool {
        let region = block / SUMMARY_REGION_BLOCKS;
        self.summary[(region / 64) as usize].load(Ordering::Acquire) & (1 << (region % 64)) != 0
    }

    pub fn state(&self, block: u64) -> BlockState {
        if block >= self.blocks || !self.region_may_hold(block) {
            return BlockState::Absent;
        }
        let w = self.words()[(block / BLOCKS_PER_WORD) as usize].load(Ordering::Acquire);
        BlockState::from_bits(w >> ((block % BLOCKS_PER_WORD) * 2))
    }

    /// The first block at or after `block` (and before `end`) that may be present, skipping
    /// empty regions and words; `end` when there is none, even past this map's blocks (a
    /// smaller layer below a grown volume holds nothing there: the caller's walk jumps over it).
    pub fn next_candidate(&self, mut block: u64, end: u64) -> u64 {
        let limit = end.min(self.blocks);
        while block < limit {
            if !self.region_may_hold(block) {
                block = (block / SUMMARY_REGION_BLOCKS + 1) * SUMMARY_REGION_BLOCKS;
                continue;
            }
            let word_index = block / BLOCKS_PER_WORD;
            let w = self.words()[word_index as usize].load(Ordering::Acquire);
            let shifted = w >> ((block % BLOCKS_PER_WORD) * 2);
            if shifted == 0 {
                block = (word_index + 1) * BLOCKS_PER_WORD;
                continue;
            }
            let candidate = block + u64::from(shifted.trailing_zeros() / 2);
            if candidate < limit {
                return candidate;
            }
            break;
        }
        end
    }

    /// Makes sure the map file `file` (the one mapped) has disk space behind the words of blocks
    /// `[start, end)` before [`BlockMap::set_range`] stores into them. Map files are sparse,
    /// and a store into a page that is still a hole makes the kernel allocate it in the page
    /// fault: on a full disk (or a page it cannot read) that is SIGBUS, which would end the
    /// daemon. Allocating first turns that into an error for the one request. Each chunk is
    /// allocated once per opening (filesystems without fallocate are taken as they are).
    pub fn ensure_backed(&self, file: &File, start: u64, end: u64) -> std::io::Result<()> {
        let end = end.min(self.blocks);
        if start >= end {
            return Ok(());
        }
        let map_bytes = self.words_len as u64 * 8;
        let first_byte = start / BLOCKS_PER_WORD * 8;
        let end_byte = end.div_ceil(BLOCKS_PER_WORD) * 8;
        for chunk in first_byte / BACKED_CHUNK_BYTES..end_byte.div_ceil(BACKED_CHUNK_BYTES) {
            let (word, bit) = ((chunk / 64) as usize, 1u64 << (chunk % 64));
            if self.backed[word].load(Ordering::Acquire) & bit != 0 {
                continue;
            }
            let offset_bytes = chunk * BACKED_CHUNK_BYTES;
            let length_bytes = BACKED_CHUNK_BYTES.min(map_bytes - offset_bytes);
            match crate::io::fallocate_blocking(
                file,
                libc::FALLOC_FL_KEEP_SIZE,
                offset_bytes,
                length_bytes,
            ) {
                Ok(()) => {}
                Err(e) if crate::storage::volume::is_unsupported(&e) => {}
                Err(e) => return Err(e),
            }
            self.backed[word].fetch_or(bit, Ordering::Release);
        }
        Ok(())
    }

    /// Sets blocks `[start, end)` to `state`. The summary is marked before the words, so a
    /// reader that sees a word's new bits also sees its region as possibly present. The caller
    /// has made sure the words are backed ([`BlockMap::ensure_backed`]).
    pub fn set_range(&self, start: u64, end: u64, state: BlockState) {
        let end = end.min(self.blocks);
        if start >= end {
            return;
        }
        if state != BlockState::Absent {
            self.mark_regions(start, end);
        }
        let pattern = match state {
            BlockState::Absent => 0,
            BlockState::Data => 0x5555_5555_5555_5555u64,
            BlockState::Zero => 0xaaaa_aaaa_aaaa_aaaau64,
        };
        self.update_words(
            start,
            end,
            |old, mask| (old & !mask) | (pattern & mask),
            |_, _| {},
        );
    }

    /// Marks the summary regions of blocks `[start, end)` as possibly present: done before the
    /// words change, so a reader that sees a word's new bits also sees its region marked.
    fn mark_regions(&self, start: u64, end: u64) {
        let mut region_block = start;
        while region_block < end {
            self.mark_region(region_block);
            region_block = (region_block / SUMMARY_REGION_BLOCKS + 1) * SUMMARY_REGION_BLOCKS;
        }
    }

    /// Replaces, in each map word holding blocks `[start, end)`, the fields of those blocks
    /// (`mask`) with what `change(old_word, mask)` makes of them, atomically per word (so
    /// concurrent writers of nearby blocks keep each other's bits), counting the change;
    /// `stored(word_index, new_word)` runs after each store.
    fn update_words(
        &self,
        start: u64,
        end: u64,
        change: impl Fn(u64, u64) -> u64,
        stored: impl Fn(u64, u64),
    ) {
        let words = self.words();
        for (word_index, mask) in self.word_spans(start, end) {
            let word = &words[word_index as usize];
            let mut old = word.load(Ordering::Relaxed);
            loop {
                let new = change(old, mask);
                if new == old {
                    break;
                }
                // SeqCst: `written.rs` pairs this store with a page-bit check.
                match word.compare_exchange_weak(old, new, Ordering::SeqCst, Ordering::Relaxed) {
                    Ok(_) => {
                        self.account(old & mask, new & mask);
                        stored(word_index, new);
                        break;
                    }
                    Err(current) => old = current,
                }
            }
        }
    }

    /// The map words holding blocks `[start, end)` (clipped to the map), each with the mask of
    /// those blocks' fields in it.
    fn word_spans(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
        let end = end.min(self.blocks);
        let mut block = start;
        std::iter::from_fn(move || {
            if block >= end {
                return None;
            }
            let word_index = block / BLOCKS_PER_WORD;
            let first = block % BLOCKS_PER_WORD;
            let last = (end - word_index * BLOCKS_PER_WORD).min(BLOCKS_PER_WORD);
            block = (word_index + 1) * BLOCKS_PER_WORD;
            Some((word_index, bits_mask(first, last)))
        })
    }

    fn account(&self, old: u64, new: u64) {
        let (old_present, new_present) = (count_present(old), count_present(new));
        let (old_data, new_data) = (count_data(old), count_data(new));
        if new_present >= old_present {
            self.present_blocks
                .fetch_add(new_present - old_present, Ordering::Relaxed);
        } else {
            self.present_blocks
                .fetch_sub(old_present - new_present, Ordering::Relaxed);
        }
        if new_data >= old_data {
            self.data_blocks
                .fetch_add(new_data - old_data, Ordering::Relaxed);
        } else {
            self.data_blocks
                .fetch_sub(old_data - new_data, Ordering::Relaxed);
        }
    }

    /// Runs of present blocks in `[start, end)` as `(first, end, state)`, in order.
    pub fn present_runs(&self, start: u64, end: u64) -> Vec<(u64, u64, BlockState)> {
        let end = end.min(self.blocks);
        let mut runs: Vec<(u64, u64, BlockState)> = Vec::new();
        let mut block = self.next_candidate(start, end);
        while block < end {
            let state = self.state(block);
            if state == BlockState::Absent {
                block = self.next_candidate(block + 1, end);
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.1 == block && run.2 == state => run.1 += 1,
                _ => runs.push((block, block + 1, state)),
            }
            block += 1;
        }
        runs
    }
}

/// Mask over the 2-bit fields of blocks `[first, last)` within one word.
fn bits_mask(first: u64, last: u64) -> u64 {
    let high = if last >= BLOCKS_PER_WORD {
        u64::MAX
    } else {
        (1u64 << (last * 2)) - 1
    };
    let low = (1u64 << (first * 2)) - 1;
    high & !low
}

fn count_present(w: u64) -> u64 {
    // A field is present when either of its bits is set.
    let fields = (w | (w >> 1)) & 0x5555_5555_5555_5555;
    u64::from(fields.count_ones())
}

fn count_data(w: u64) -> u64 {
    // Data is `01` or `11` (written): the low bit set; zero is `10`.
    u64::from((w & 0x5555_5555_5555_5555).count_ones())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ensure_backed_allocates_the_chunks_of_the_words_a_change_stores_into() {
        use std::os::unix::fs::MetadataExt;
        // 64 chunks of map: 256 Ki blocks per 64 KiB chunk.
        let blocks = 64 * (BACKED_CHUNK_BYTES * 8 / 2);
        let (_dir, file) = map_file(blocks);
        let map = BlockMap::open(&file, blocks, true).unwrap();
        let allocated = |f: &File| f.metadata().unwrap().blocks() * 512;
        assert_eq!(allocated(&file), 0, "a new map file is sparse");
        let per_chunk = BACKED_CHUNK_BYTES * 4;
        // Blocks straddling chunks 2 and 3.
        map.ensure_backed(&file, 3 * per_chunk - 10, 3 * per_chunk + 10)
            .unwrap();
        assert_eq!(allocated(&file), 2 * BACKED_CHUNK_BYTES);
        // Known backed now: no more space, and a change there stores into allocated pages.
        map.ensure_backed(&file, 3 * per_chunk, 3 * per_chunk + 1)
            .unwrap();
        assert_eq!(allocated(&file), 2 * BACKED_CHUNK_BYTES);
        map.set_range(3 * per_chunk - 10, 3 * per_chunk + 10, BlockState::Data);
        assert_eq!(allocated(&file), 2 * BACKED_CHUNK_BYTES);
        // Past the end: clipped to the map.
        map.ensure_backed(&file, blocks - 1, blocks + 1000).unwrap();
        assert_eq!(allocated(&file), 3 * BACKED_CHUNK_BYTES);
    }

    pub(super) fn map_file(blocks: u64) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let file = crate::storage::sized_test_file(dir.path(), "m", map_file_bytes(blocks));
        (dir, file)
    }

    #[test]
    fn states_round_trip_and_persist() {
        let (_dir, file) = map_file(2000);
        let map = BlockMap::open(&file, 2000, true).unwrap();
        assert_eq!(map.state(5), BlockState::Absent);
        map.set_range(3, 40, BlockState::Data);
        map.set_range(10, 12, BlockState::Zero);
        assert_eq!(map.state(2), BlockState::Absent);
        assert_eq!(map.state(3), BlockState::Data);
        assert_eq!(map.state(10), BlockState::Zero);
        assert_eq!(map.state(12), BlockState::Data);
        assert_eq!(map.state(40), BlockState::Absent);
        assert_eq!(map.present_blocks(), 37);
        assert_eq!(map.data_blocks(), 35);
        assert_eq!(
            map.present_runs(0, 2000),
            [
                (3, 10, BlockState::Data),
                (10, 12, BlockState::Zero),
                (12, 40, BlockState::Data)
            ]
        );
        drop(map);
        let again = BlockMap::open(&file, 2000, false).unwrap();
        assert_eq!(again.state(11), BlockState::Zero);
        assert_eq!(again.present_blocks(), 37);
        assert_eq!(again.state(1999), BlockState::Absent);
        assert_eq!(again.state(5000), BlockState::Absent);
    }

    #[test]
    fn short_map_file_is_refused() {
        let (_dir, file) = map_file(10);
        assert!(BlockMap::open(&file, 10_000, false).is_err());
    }

    proptest! {
        /// The map agrees with a plain Vec model after any sequence of range updates (writes
        /// marking blocks "written" among them), and its counters and runs agree too.
        #[test]
        fn matches_a_vec_model(ops in proptest::collection::vec((0u64..3000, 0u64..700, 0u8..4), 1..40)) {
            let blocks = 3000;
            let (_dir, file) = map_file(blocks);
            let map = BlockMap::open(&file, blocks, true).unwrap();
            let mut model = vec![BlockState::Absent; blocks as usize];
            for (start, len, s) in ops {
                let state = BlockState::from_bits(u64::from(s));
                let end = (start + len).min(blocks);
                if s == 3 {
                    // Written: data, in whatever raw form.
                    map.set_written(start, end);
                } else {
                    map.set_range(start, end, state);
                }
                for b in start..end {
                    model[b as usize] = state;
                }
            }
            for (b, expected) in model.iter().enumerate() {
                prop_assert_eq!(map.state(b as u64), *expected);
            }
            let present = model.iter().filter(|s| **s != BlockState::Absent).count() as u64;
            prop_assert_eq!(map.present_blocks(), present);
            let data = model.iter().filter(|s| **s == BlockState::Data).count() as u64;
            prop_assert_eq!(map.data_blocks(), data);
            let mut from_runs = vec![BlockState::Absent; blocks as usize];
            for (a, z, s) in map.present_runs(0, blocks) {
                for b in a..z { from_runs[b as usize] = s; }
            }
            prop_assert_eq!(from_runs, model);
        }
    }
}
