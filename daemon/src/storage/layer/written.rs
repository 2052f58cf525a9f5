//! The "written" state: a block a client wrote into a layer that has layers below it, whose
//! bytes may not be durable yet (raw bits `11`; it reads as data).
//!
//! The map is a shared mapping, so the kernel writes its pages back whenever it likes, before
//! the data file's pages as often as after. A head block over a snapshot marked plain "data"
//! on disk while its bytes were not would, after a power loss, read as the zeroes of a hole
//! instead of what the snapshot holds. Marked "written", the open after a crash asks the data
//! file: a block with bytes behind it is data, a hole is absent again (the layers below show
//! through, as before the write). A sync settles the blocks written before it to plain data
//! once their bytes are durable, so an open after a clean stop has (almost) nothing to ask.
//!
//! Only absent blocks become "written": a zero block's hole reads as the zeroes it held, and a
//! block that is data already stays what it is (one zeroed by fallocate has no bytes behind it
//! on disk and must not be taken for lost).

use std::fs::File;
use std::sync::atomic::Ordering;

use super::{bits_mask, BlockMap, BLOCKS_PER_WORD, BLOCK_BYTES};

/// Low bit of every 2-bit field.
const LOW_BITS: u64 = 0x5555_5555_5555_5555;
/// Map words one page of the map file holds: the unit whose "written" blocks are tracked.
pub(super) const WORDS_PER_TRACKED_PAGE: u64 = 512;

/// The low bits of the fields of `w` in the written state (`11`).
fn written_fields(w: u64) -> u64 {
    w & (w >> 1) & LOW_BITS
}

/// What [`BlockMap::take_written`] saw: per map word, the fields that were "written" then.
#[derive(Debug, Default)]
pub struct WrittenBlocks {
    words: Vec<(usize, u64)>,
    pages: Vec<u64>,
    /// Pages were left for another round (the take is bounded).
    pub more: bool,
}

impl BlockMap {
    /// Marks blocks `[start, end)` as holding bytes just written: absent blocks become
    /// "written", zero blocks data, data blocks stay as they are. The caller has made sure the
    /// words are backed ([`BlockMap::ensure_backed`]).
    pub fn set_written(&self, start: u64, end: u64) {
        let end = end.min(self.blocks);
        let mut block = start;
        while block < end {
            let word_index = block / BLOCKS_PER_WORD;
            let first = block % BLOCKS_PER_WORD;
            let last = (end - word_index * BLOCKS_PER_WORD).min(BLOCKS_PER_WORD);
            let mask = bits_mask(first, last);
            self.mark_region(block);
            let word = &self.words()[word_index as usize];
            let mut old = word.load(Ordering::Relaxed);
            loop {
                let absent = !(old | (old >> 1)) & LOW_BITS;
                let high = ((absent | written_fields(old)) & mask) << 1;
                let new = (old & !mask) | (LOW_BITS & mask) | high;
                if new == old {
                    break;
                }
                match word.compare_exchange_weak(old, new, Ordering::Release, Ordering::Relaxed) {
                    Ok(_) => {
                        self.account(old & mask, new & mask);
                        if written_fields(new) != 0 {
                            // After the store: a sync that takes the bit sees the new word.
                            self.mark_written_page(word_index);
                        }
                        break;
                    }
                    Err(current) => old = current,
                }
            }
            block = (word_index + 1) * BLOCKS_PER_WORD;
        }
    }

    pub(super) fn mark_written_page(&self, word_index: u64) {
        let page = word_index / WORDS_PER_TRACKED_PAGE;
        let (bits, bit) = (
            &self.written_pages[(page / 64) as usize],
            1u64 << (page % 64),
        );
        if bits.load(Ordering::Relaxed) & bit == 0 {
            bits.fetch_or(bit, Ordering::AcqRel);
        }
    }

    /// Notes which blocks are "written" now, in at most `max_pages` pages of the map (`more`
    /// says whether some are left). A sync calls it before it syncs the data file: each of
    /// them was marked after its bytes were written, so that sync covers them, and
    /// [`BlockMap::settle`] may call them data after it. Blocks written meanwhile mark their
    /// page again for the next sync.
    pub fn take_written(&self, max_pages: usize) -> WrittenBlocks {
        let words = self.words();
        let mut taken = WrittenBlocks::default();
        for (index, bits) in self.written_pages.iter().enumerate() {
            let mut pending = bits.load(Ordering::Acquire);
            while pending != 0 {
                if taken.pages.len() >= max_pages {
                    taken.more = true;
                    return taken;
                }
                let bit = pending.trailing_zeros();
                pending &= pending - 1;
                // Cleared before the words are read: a mark after this sets it again.
                if bits.fetch_and(!(1u64 << bit), Ordering::AcqRel) & (1u64 << bit) == 0 {
                    continue;
                }
                let page = index as u64 * 64 + u64::from(bit);
                taken.pages.push(page);
                let first = (page * WORDS_PER_TRACKED_PAGE) as usize;
                let end = (first + WORDS_PER_TRACKED_PAGE as usize).min(self.words_len);
                for (i, word) in words[first..end].iter().enumerate() {
                    let fields = written_fields(word.load(Ordering::Acquire));
                    if fields != 0 {
                        taken.words.push((first + i, fields));
                    }
                }
            }
        }
        taken
    }

    /// Turns the blocks `taken` saw "written" into plain data, now that their bytes are
    /// durable; a block changed since (zeroed, written again) keeps its new state.
    pub fn settle(&self, taken: &WrittenBlocks) {
        let words = self.words();
        for &(index, fields) in &taken.words {
            let word = &words[index];
            let mut old = word.load(Ordering::Relaxed);
            loop {
                let still = fields & written_fields(old);
                if still == 0 {
                    break;
                }
                match word.compare_exchange_weak(
                    old,
                    old & !(still << 1),
                    Ordering::Release,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(current) => old = current,
                }
            }
        }
    }

    /// Marks the pages of `taken` again, for a sync that failed before settling them.
    pub fn restore_written(&self, taken: &WrittenBlocks) {
        for &page in &taken.pages {
            self.written_pages[(page / 64) as usize]
                .fetch_or(1u64 << (page % 64), Ordering::AcqRel);
        }
    }

    /// Runs of "written" blocks, in order.
    fn written_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (index, word) in self.words().iter().enumerate() {
            let mut fields = written_fields(word.load(Ordering::Acquire));
            while fields != 0 {
                let block = index as u64 * BLOCKS_PER_WORD + u64::from(fields.trailing_zeros() / 2);
                fields &= fields - 1;
                if block >= self.blocks {
                    break;
                }
                match runs.last_mut() {
                    Some(run) if run.1 == block => run.1 += 1,
                    _ => runs.push((block, block + 1)),
                }
            }
        }
        runs
    }

    /// After an open: asks `data` (the layer's data file) about every "written" block. A
    /// block with bytes behind it (on disk, or in the page cache after the daemon alone went
    /// down) is data; one that is a hole lost its bytes with the machine, so it is absent
    /// again; the others stay "written", their pages marked for the next sync. Returns how
    /// many blocks were written and how many of them were lost.
    pub fn resolve_written(&self, data: &File) -> std::io::Result<(u64, u64)> {
        let (mut written_blocks, mut lost_blocks) = (0, 0);
        for (start, end) in self.written_runs() {
            written_blocks += end - start;
            let mut block = start;
            let ranges =
                crate::storage::holes::data_ranges(data, start * BLOCK_BYTES, end * BLOCK_BYTES)?;
            for (from, to) in ranges {
                let (first, stop) = (from / BLOCK_BYTES, to.div_ceil(BLOCK_BYTES).min(end));
                if first > block {
                    self.set_range(block, first, super::BlockState::Absent);
                    lost_blocks += first - block;
                }
                for word_index in first.max(block) / BLOCKS_PER_WORD..stop.div_ceil(BLOCKS_PER_WORD)
                {
                    self.mark_written_page(word_index);
                }
                block = block.max(stop);
            }
            if block < end {
                self.set_range(block, end, super::BlockState::Absent);
                lost_blocks += end - block;
            }
        }
        Ok((written_blocks, lost_blocks))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{map_file_bytes, BlockState};
    use super::*;

    fn map(blocks: u64) -> (tempfile::TempDir, File, BlockMap) {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("m"))
            .unwrap();
        file.set_len(map_file_bytes(blocks)).unwrap();
        let map = BlockMap::open(&file, blocks, true).unwrap();
        (dir, file, map)
    }

    fn raw(map: &BlockMap, block: u64) -> u64 {
        let w = map.words()[(block / BLOCKS_PER_WORD) as usize].load(Ordering::Relaxed);
        (w >> ((block % BLOCKS_PER_WORD) * 2)) & 3
    }

    #[test]
    fn only_absent_blocks_become_written_and_all_read_as_data() {
        let (_dir, _file, map) = map(100);
        map.set_range(10, 12, BlockState::Zero);
        map.set_range(12, 14, BlockState::Data);
        map.set_written(8, 16);
        let raws: Vec<u64> = (8..16).map(|b| raw(&map, b)).collect();
        // Absent → written; zero → data; data stays data.
        assert_eq!(raws, [3, 3, 1, 1, 1, 1, 3, 3]);
        assert!((8..16).all(|b| map.state(b) == BlockState::Data));
        assert_eq!((map.present_blocks(), map.data_blocks()), (8, 8));
        assert_eq!(map.present_runs(0, 100), [(8, 16, BlockState::Data)]);
        // Written again: still written, not settled by a write.
        map.set_written(8, 9);
        assert_eq!(raw(&map, 8), 3);
        // Zeroed: zero, whatever it was.
        map.set_range(9, 10, BlockState::Zero);
        assert_eq!(raw(&map, 9), 2);
        assert_eq!((map.present_blocks(), map.data_blocks()), (8, 7));
    }

    #[test]
    fn a_sync_settles_what_it_took_and_nothing_written_after() {
        let per_page = WORDS_PER_TRACKED_PAGE * BLOCKS_PER_WORD;
        let (_dir, _file, map) = map(3 * per_page);
        map.set_written(5, 7);
        map.set_written(2 * per_page, 2 * per_page + 1);
        // Bounded: one page per round.
        let first = map.take_written(1);
        assert!(first.more);
        // Written after the take (same page): not covered by the data sync that follows.
        map.set_written(7, 8);
        map.settle(&first);
        assert_eq!([raw(&map, 5), raw(&map, 6), raw(&map, 7)], [1, 1, 3]);
        let rest = map.take_written(usize::MAX);
        assert!(!rest.more);
        map.settle(&rest);
        assert_eq!([raw(&map, 7), raw(&map, 2 * per_page)], [1, 1]);
        assert!(map.take_written(usize::MAX).words.is_empty());
        // Zeroed between the take and the settle: stays zero.
        map.set_written(20, 21);
        let taken = map.take_written(usize::MAX);
        map.set_range(20, 21, BlockState::Zero);
        map.settle(&taken);
        assert_eq!(raw(&map, 20), 2);
        // A failed sync gives its pages back.
        map.set_written(30, 31);
        let failed = map.take_written(usize::MAX);
        map.restore_written(&failed);
        map.settle(&map.take_written(usize::MAX));
        assert_eq!(raw(&map, 30), 1);
        // 5, 6, 7, the one on page 2, 30.
        assert_eq!(map.data_blocks(), 5);
    }

    #[test]
    fn an_open_keeps_written_blocks_with_bytes_and_drops_those_without() {
        use std::os::unix::fs::FileExt;
        let blocks = 64;
        let (dir, file, map) = map(blocks);
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("d"))
            .unwrap();
        data.set_len(blocks * BLOCK_BYTES).unwrap();
        // Blocks 4..8 and 20 written with bytes; 8..12 and 30 marked with none behind them
        // (their bytes never reached the disk).
        data.write_all_at(&vec![7u8; 4 * BLOCK_BYTES as usize], 4 * BLOCK_BYTES)
            .unwrap();
        data.write_all_at(&vec![7u8; BLOCK_BYTES as usize], 20 * BLOCK_BYTES)
            .unwrap();
        map.set_written(4, 12);
        map.set_written(20, 21);
        map.set_written(30, 31);
        map.set_range(40, 41, BlockState::Data);
        drop(map);
        let reopened = BlockMap::open(&file, blocks, false).unwrap();
        assert_eq!(reopened.resolve_written(&data).unwrap(), (10, 5));
        let states: Vec<(u64, BlockState)> = [3, 4, 7, 8, 11, 20, 30, 40]
            .into_iter()
            .map(|b| (b, reopened.state(b)))
            .collect();
        use BlockState::{Absent, Data};
        assert_eq!(
            states,
            [
                (3, Absent),
                (4, Data),
                (7, Data),
                (8, Absent),
                (11, Absent),
                (20, Data),
                (30, Absent),
                // Plain data is never second-guessed.
                (40, Data)
            ]
        );
        assert_eq!(reopened.data_blocks(), 6);
        // The survivors stay written until a sync settles them.
        assert_eq!(raw(&reopened, 4), 3);
        let taken = reopened.take_written(usize::MAX);
        reopened.settle(&taken);
        assert_eq!(raw(&reopened, 4), 1);
        assert_eq!(raw(&reopened, 20), 1);
    }
}
