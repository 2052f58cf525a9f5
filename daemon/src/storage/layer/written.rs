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

use super::{BlockMap, BLOCKS_PER_WORD, BLOCK_BYTES};

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
struct WrittenBlocks {
    words: Vec<(usize, u64)>,
    pages: Vec<u64>,
    /// The page to go on from, when the take stopped at its bound.
    next_page: Option<u64>,
}

/// Blocks a sync took, to settle once the data is synced. Dropped unsettled (the sync failed,
/// or its future was dropped), their pages are marked again for the next sync.
#[derive(Debug)]
pub struct TakenWritten<'a> {
    map: &'a BlockMap,
    taken: Option<WrittenBlocks>,
}

impl TakenWritten<'_> {
    /// Where the next round goes on, if this one stopped at its bound.
    pub fn next_page(&self) -> Option<u64> {
        self.taken.as_ref().and_then(|t| t.next_page)
    }

    /// Turns the blocks taken into plain data: call only once their bytes are durable.
    pub fn settle(mut self) {
        if let Some(taken) = self.taken.take() {
            self.map.settle(&taken);
        }
    }
}

impl Drop for TakenWritten<'_> {
    fn drop(&mut self) {
        if let Some(taken) = self.taken.take() {
            self.map.restore_written(&taken);
        }
    }
}

impl BlockMap {
    /// Marks blocks `[start, end)` as holding bytes just written: absent blocks become
    /// "written", zero blocks data, data blocks stay as they are. The caller has made sure the
    /// words are backed ([`BlockMap::ensure_backed`]).
    pub fn set_written(&self, start: u64, end: u64) {
        let end = end.min(self.blocks);
        self.mark_regions(start, end);
        self.update_words(
            start,
            end,
            |old, mask| {
                let absent = !(old | (old >> 1)) & LOW_BITS;
                let high = ((absent | written_fields(old)) & mask) << 1;
                (old & !mask) | (LOW_BITS & mask) | high
            },
            |word_index, new| {
                if written_fields(new) != 0 {
                    // After the store: a sync that takes the bit sees the new word.
                    self.mark_written_page(word_index);
                }
            },
        );
    }

    pub(super) fn mark_written_page(&self, word_index: u64) {
        let page = word_index / WORDS_PER_TRACKED_PAGE;
        let (bits, bit) = (
            &self.written_pages[(page / 64) as usize],
            1u64 << (page % 64),
        );
        // SeqCst here, on the word's store and on both sides of `take_written`: the store and
        // this check against the take's clear and word load is the store-buffering pattern,
        // where weaker orderings let both sides miss each other (free on x86).
        if bits.load(Ordering::SeqCst) & bit == 0 {
            bits.fetch_or(bit, Ordering::SeqCst);
        }
    }

    /// Whether some page may hold "written" blocks.
    pub fn has_written(&self) -> bool {
        self.written_pages
            .iter()
            .any(|bits| bits.load(Ordering::SeqCst) != 0)
    }

    /// Whether any of blocks `[start, end)` is "written".
    pub fn any_written(&self, start: u64, end: u64) -> bool {
        let words = self.words();
        self.word_spans(start, end).any(|(word_index, mask)| {
            written_fields(words[word_index as usize].load(Ordering::SeqCst)) & mask != 0
        })
    }

    /// Notes which blocks are "written" now, in at most `max_pages` marked pages from page
    /// `from_page` on (`next_page` says where to go on). A sync calls it before it syncs the
    /// data file: each of them was marked after its bytes were written, so that sync covers
    /// them, and settling may call them data after it. A sync goes over the pages once, in
    /// rounds from page 0: blocks written meanwhile mark their page again for the next sync.
    pub fn take_written(&self, from_page: u64, max_pages: usize) -> TakenWritten<'_> {
        TakenWritten {
            map: self,
            taken: Some(self.take_written_blocks(from_page, max_pages)),
        }
    }

    fn take_written_blocks(&self, from_page: u64, max_pages: usize) -> WrittenBlocks {
        let words = self.words();
        let mut taken = WrittenBlocks::default();
        let first_index = (from_page / 64) as usize;
        for (index, bits) in self.written_pages.iter().enumerate().skip(first_index) {
            let mut pending = bits.load(Ordering::SeqCst);
            if index == first_index {
                pending &= u64::MAX << (from_page % 64);
            }
            while pending != 0 {
                let bit = pending.trailing_zeros();
                if taken.pages.len() >= max_pages {
                    taken.next_page = Some(index as u64 * 64 + u64::from(bit));
                    return taken;
                }
                pending &= pending - 1;
                // Cleared before the words are read: a mark after this sets it again.
                if bits.fetch_and(!(1u64 << bit), Ordering::SeqCst) & (1u64 << bit) == 0 {
                    continue;
                }
                let page = index as u64 * 64 + u64::from(bit);
                taken.pages.push(page);
                let first = (page * WORDS_PER_TRACKED_PAGE) as usize;
                let end = (first + WORDS_PER_TRACKED_PAGE as usize).min(self.words_len);
                for (i, word) in words[first..end].iter().enumerate() {
                    let fields = written_fields(word.load(Ordering::SeqCst));
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
    fn settle(&self, taken: &WrittenBlocks) {
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
    fn restore_written(&self, taken: &WrittenBlocks) {
        for &page in &taken.pages {
            self.written_pages[(page / 64) as usize]
                .fetch_or(1u64 << (page % 64), Ordering::AcqRel);
        }
    }

    /// Runs of "written" blocks among map words `[first_word, end_word)`, in order.
    fn written_runs_in(&self, first_word: usize, end_word: usize) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (index, word) in self.words()[first_word..end_word].iter().enumerate() {
            let mut fields = written_fields(word.load(Ordering::Acquire));
            while fields != 0 {
                let block = (first_word + index) as u64 * BLOCKS_PER_WORD
                    + u64::from(fields.trailing_zeros() / 2);
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

    /// Spans of consecutive pages marked as possibly holding "written" blocks (an open marks
    /// those it finds), as map word ranges.
    fn marked_spans(&self) -> Vec<(usize, usize)> {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for (index, bits) in self.written_pages.iter().enumerate() {
            let mut pending = bits.load(Ordering::SeqCst);
            while pending != 0 {
                let page = index as u64 * 64 + u64::from(pending.trailing_zeros());
                pending &= pending - 1;
                let first = (page * WORDS_PER_TRACKED_PAGE) as usize;
                let end = (first + WORDS_PER_TRACKED_PAGE as usize).min(self.words_len);
                match spans.last_mut() {
                    Some(span) if span.1 == first => span.1 = end,
                    _ => spans.push((first, end)),
                }
            }
        }
        spans
    }

    /// After an open: asks `data` (the layer's data file) about every "written" block. One
    /// with bytes behind it (on disk, or in the page cache after the daemon alone went down)
    /// stays "written", its page marked, for the next sync to settle; one that is a hole lost
    /// its bytes with the machine and is absent again. The filesystem is asked only where a
    /// run of written blocks lies past the data range last found, so the cost follows the
    /// runs, not the file. Returns how many blocks were written and how many were lost.
    pub fn resolve_written(&self, data: &File) -> std::io::Result<(u64, u64)> {
        let (mut written_blocks, mut lost_blocks) = (0, 0);
        let file_end = self.blocks * BLOCK_BYTES;
        // The data range at or after the last position asked (None: none to the end).
        let mut found: Option<Option<(u64, u64)>> = None;
        for (first_word, end_word) in self.marked_spans() {
            for (start, end) in self.written_runs_in(first_word, end_word) {
                written_blocks += end - start;
                let mut block = start;
                while block < end {
                    let at = block * BLOCK_BYTES;
                    let stale = match found {
                        None => true,
                        Some(Some((_, to))) => to <= at,
                        Some(None) => false,
                    };
                    if stale {
                        found = Some(crate::storage::holes::next_data(data, at, file_end)?);
                    }
                    let lost_until = match found.flatten() {
                        // Bytes behind (part of) the block: it stays written.
                        Some((from, to)) if from / BLOCK_BYTES <= block => {
                            block = to.div_ceil(BLOCK_BYTES).min(end);
                            continue;
                        }
                        Some((from, _)) => (from / BLOCK_BYTES).min(end),
                        None => end,
                    };
                    self.set_range(block, lost_until, super::BlockState::Absent);
                    lost_blocks += lost_until - block;
                    block = lost_until;
                }
            }
        }
        Ok((written_blocks, lost_blocks))
    }
}

#[cfg(test)]
mod tests {
    use super::super::BlockState;
    use super::*;

    fn map(blocks: u64) -> (tempfile::TempDir, File, BlockMap) {
        let (dir, file) = super::super::tests::map_file(blocks);
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
        assert!(map.any_written(9, 11) && map.any_written(13, 15) && map.any_written(0, 100));
        assert!(!map.any_written(10, 14) && !map.any_written(0, 8));
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
        let first = map.take_written(0, 1);
        assert_eq!(first.next_page(), Some(2));
        // Written after the take (same page): not covered by the data sync that follows.
        map.set_written(7, 8);
        first.settle();
        assert_eq!([raw(&map, 5), raw(&map, 6), raw(&map, 7)], [1, 1, 3]);
        // The rest of this sync's pass, then the next sync's (page 0 again).
        let rest = map.take_written(2, usize::MAX);
        assert_eq!(rest.next_page(), None);
        rest.settle();
        assert_eq!(raw(&map, 7), 3);
        map.take_written(0, usize::MAX).settle();
        assert_eq!([raw(&map, 7), raw(&map, 2 * per_page)], [1, 1]);
        assert!(!map.has_written());
        // Zeroed between the take and the settle: stays zero.
        map.set_written(20, 21);
        let taken = map.take_written(0, usize::MAX);
        map.set_range(20, 21, BlockState::Zero);
        taken.settle();
        assert_eq!(raw(&map, 20), 2);
        // A failed sync gives its pages back.
        map.set_written(30, 31);
        drop(map.take_written(0, usize::MAX));
        assert!(map.has_written());
        map.take_written(0, usize::MAX).settle();
        assert_eq!(raw(&map, 30), 1);
        // 5, 6, 7, the one on page 2, 30.
        assert_eq!(map.data_blocks(), 5);
    }

    #[test]
    fn an_open_keeps_written_blocks_with_bytes_and_drops_those_without() {
        use std::os::unix::fs::FileExt;
        let blocks = 64;
        let (dir, file, map) = map(blocks);
        let data = crate::storage::sized_test_file(dir.path(), "d", blocks * BLOCK_BYTES);
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
        reopened.take_written(0, usize::MAX).settle();
        assert_eq!(raw(&reopened, 4), 1);
        assert_eq!(raw(&reopened, 20), 1);
    }
}
