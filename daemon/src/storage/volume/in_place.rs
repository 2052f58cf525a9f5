//! Writes received in place: a large WRITE's payload goes from the client's socket straight into
//! the head's page cache, through a shared mapping of the head's data file (`layer::mapped`). The
//! kernel then copies each byte once (socket → page cache) where a buffer costs two (socket →
//! buffer → page cache), and the copy into the page cache moves from the I/O engine's worker to
//! the connection's thread, inside its `recv`.
//!
//! Only writes that need nothing else qualify: whole blocks the head already holds (a write there
//! takes no stripe lock and changes no map, as in `Volume::write_blocks`) whose pages are all in
//! the page cache (a write fault on a page that is not reads it from the disk first, where a
//! `pwrite` of whole pages does not).
//!
//! The copy is done on the connection's thread, under the guard inline writes have (see
//! `io::inline_write`): slow copies (dirty page throttling, a journal commit) pause receiving in
//! place for a while, as they pause inline writes.
//!
//! What a write holds (the gate shared, its epoch) is held only while one `recv` lands bytes,
//! never while the client is awaited: a client that stops halfway holds nothing. When a snapshot
//! or a resize swaps the head between two of them, the caller writes the rest of the payload the
//! ordinary way (into the new head); the frozen head keeps the part that landed before, as a
//! crash at that instant would have left it.

use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::storage::layer::{BlockState, Layer, BLOCK_BYTES};
use crate::storage::stripes::ZeroGeneration;

use super::Volume;

/// The head a write's payload is being received into.
pub struct InPlaceHead {
    layer: Arc<Layer>,
}

/// A block a payload landing in place has landed part of (see [`Volume::land_in_place`]).
#[derive(Debug, Clone, Copy)]
pub struct PartialBlock {
    pub block: u64,
    pub zero_generation: Option<ZeroGeneration>,
}

impl InPlaceHead {
    /// Reads back bytes of the head's data file (landed bytes, from the page cache).
    pub fn read_exact_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.layer.data().read_exact_at(buf, offset_bytes)
    }
}

impl Volume {
    /// `block`'s zero generation (see `stripes`); None while a zero of it is under way, or on
    /// a read-only volume.
    pub fn zero_generation(&self, block: u64) -> Option<ZeroGeneration> {
        self.writer.as_ref()?.stripes.zero_generation(block)
    }

    /// The head to receive a write of `offset_bytes..offset_bytes + length_bytes` into, when
    /// the whole range qualifies (see the module's comment); `None` sends the write the
    /// ordinary way.
    pub fn in_place_head(&self, offset_bytes: u64, length_bytes: u64) -> Option<InPlaceHead> {
        self.writer.as_ref()?;
        if !self.engine.copies_inline_now() {
            return None;
        }
        if length_bytes == 0
            || !offset_bytes.is_multiple_of(BLOCK_BYTES)
            || !length_bytes.is_multiple_of(BLOCK_BYTES)
        {
            return None;
        }
        let end_bytes = offset_bytes.checked_add(length_bytes)?;
        if end_bytes > self.size_bytes() {
            return None;
        }
        let chain = self.chain();
        let head = chain.top();
        let blocks = offset_bytes / BLOCK_BYTES..end_bytes / BLOCK_BYTES;
        if !blocks
            .into_iter()
            .all(|b| head.state(b) == BlockState::Data)
        {
            return None;
        }
        if !self
            .engine
            .all_cached(head.data(), offset_bytes, length_bytes)
        {
            return None;
        }
        head.mapped_range(offset_bytes, length_bytes)?;
        Some(InPlaceHead {
            layer: Arc::clone(head),
        })
    }

    /// Lands up to `length_bytes` at `offset_bytes` in `head`: `land` is given where they go in
    /// the head's mapping and returns how many it placed there. Only the kernel may copy them
    /// (see `layer::mapped`). `None` when `head` is no longer the volume's head, a freeze or
    /// resize is holding writes off, or slow copies paused copying here: the caller writes the
    /// rest the ordinary way.
    ///
    /// The pages are checked to be cached again for each landing (`mincore` over the mapped
    /// range): a client may send a header and then take its time with the payload while memory
    /// pressure evicts them, and a write fault on an evicted page would read it from the disk
    /// on the connection's thread. Not `cachestat`, which counts a page still being read in
    /// (readahead of another reader) as cached: the fault would wait for that read.
    ///
    /// `partial`: the block an earlier landing of the same payload ended in, part landed, with
    /// its zero generation then; a zero of it since (or under way then) refuses this landing,
    /// as the part landed may have been zeroed.
    pub fn land_in_place(
        &self,
        head: &InPlaceHead,
        offset_bytes: u64,
        length_bytes: usize,
        partial: Option<PartialBlock>,
        land: impl FnOnce(NonNull<u8>, usize) -> io::Result<usize>,
    ) -> Option<io::Result<usize>> {
        self.holding_head(head, offset_bytes, length_bytes as u64, partial, || {
            // Mapped only once the layer is known to be the head (a frozen one lets its
            // mapping go), and held through the landing even if the layer lets it go meanwhile:
            // `land` writes into it through the kernel, so `range` must outlive that call.
            let range = head.layer.mapped_range(offset_bytes, length_bytes as u64)?;
            if !self.engine.all_resident(range.start(), length_bytes) {
                return None;
            }
            Some(land(range.start(), length_bytes))
        })
    }

    /// Writes bytes of the payload that were read into a buffer with its header, with
    /// `pwrite` (a copy by the kernel, so an error comes back as one), in pieces of at most
    /// `piece_bytes`, each judged by the slow-copy guard as a landing is. `None` as for
    /// [`Volume::land_in_place`], possibly after some pieces were written (the caller then
    /// writes the whole payload the ordinary way, those bytes again).
    pub fn land_read_in_place(
        &self,
        head: &InPlaceHead,
        offset_bytes: u64,
        data: &[u8],
        piece_bytes: usize,
    ) -> Option<io::Result<()>> {
        use std::os::unix::fs::FileExt;
        let mut at_bytes = offset_bytes;
        for piece in data.chunks(piece_bytes.max(1)) {
            let written = self.holding_head(head, at_bytes, piece.len() as u64, None, || {
                Some(head.layer.data().write_all_at(piece, at_bytes))
            })?;
            if written.is_err() {
                return Some(written);
            }
            at_bytes += piece.len() as u64;
        }
        Some(Ok(()))
    }

    /// Runs `land`, which writes `length_bytes` at `offset_bytes`, holding what a write holds,
    /// if `head` is still the head, still holds those blocks (a TRIM or WRITE_ZEROES may have
    /// given them back since the write started) and copies on the caller's thread are not
    /// paused. Counted as an overwrite meanwhile, so such a zero waits for it before it punches
    /// (see `stripes`).
    /// `land` returns `None` when it could not land anything.
    fn holding_head<T>(
        &self,
        head: &InPlaceHead,
        offset_bytes: u64,
        length_bytes: u64,
        partial: Option<PartialBlock>,
        land: impl FnOnce() -> Option<io::Result<T>>,
    ) -> Option<io::Result<T>> {
        let writer = self.writer.as_ref()?;
        if !self.engine.copies_inline_now() {
            return None;
        }
        // A freeze or resize waiting for the gate makes this fail too (the lock is fair).
        let _gate = writer.gate.try_read().ok()?;
        let (chain, _epoch) = self.chain_for_write();
        if !Arc::ptr_eq(chain.top(), &head.layer) {
            return None;
        }
        let blocks =
            offset_bytes / BLOCK_BYTES..(offset_bytes + length_bytes).div_ceil(BLOCK_BYTES);
        let _overwrite = writer.stripes.begin_overwrite(blocks.start, blocks.end);
        if !blocks
            .clone()
            .all(|b| head.layer.state(b) == BlockState::Data)
        {
            return None;
        }
        // A zero under way that left the blocks data (NO_HOLE) did not see this count (else
        // it would wait for it): it may be zeroing them now.
        if writer.stripes.zero_under_way(blocks.start, blocks.end) {
            return None;
        }
        if let Some(partial) = partial {
            let now = writer.stripes.zero_generation(partial.block);
            if partial.zero_generation.is_none() || now != partial.zero_generation {
                return None;
            }
        }
        let landed = self.engine.copy_inline(land);
        // Marked before the epoch is left: a freeze waiting for it, and any later flush, see
        // the layer dirty.
        head.layer.mark_dirty();
        landed
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::io::{EngineConfig, EngineKind, IoEngine};
    use crate::storage::Registry;

    const MIB: u64 = 1 << 20;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Volume "v" of 4 MiB in a registry in `dir`, its first `written_bytes` holding 1s.
    async fn volume(dir: &std::path::Path, written_bytes: u64) -> (Arc<Registry>, Arc<Volume>) {
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        // CI's failure: a landing that blocked on a busy machine paused landings, and the
        // next one in the test was refused.
        engine.ignore_slow_copies_for_test();
        let registry = Arc::new(Registry::open(dir, engine).unwrap());
        let volume = registry.create("v", 4 * MIB).unwrap();
        if written_bytes > 0 {
            let ones = Bytes::from(vec![1u8; written_bytes as usize]);
            volume.write(0, ones, false).await.unwrap();
        }
        (registry, volume)
    }

    /// `land_in_place` with a kernel copy, as the NBD side does: `recv` from a socket holding
    /// the start of `data` (what fits in its buffer).
    fn land(volume: &Volume, head: &InPlaceHead, offset: u64, data: &[u8]) -> Option<usize> {
        let (mut sender, receiver) = std::os::unix::net::UnixStream::pair().unwrap();
        let data = &data[..data.len().min(64 << 10)];
        std::io::Write::write_all(&mut sender, data).unwrap();
        let landed = volume.land_in_place(head, offset, data.len(), None, |at, length| {
            // SAFETY: `at..at + length` is a live range of the head's mapping; only the kernel
            // writes it.
            let got = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&receiver),
                    at.as_ptr().cast(),
                    length,
                    0,
                )
            };
            if got < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(got as usize)
            }
        })?;
        Some(landed.unwrap())
    }

    #[test]
    fn only_whole_cached_blocks_the_head_holds_qualify_and_they_land_readable() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (_registry, volume) = volume(dir.path(), 2 * MIB).await;
            assert!(
                volume.in_place_head(2 * MIB, MIB).is_none(),
                "blocks never written are not in the head"
            );
            assert!(volume.in_place_head(512, MIB).is_none(), "unaligned start");
            assert!(
                volume.in_place_head(0, MIB - 512).is_none(),
                "partial block"
            );
            assert!(volume.in_place_head(MIB, 2 * MIB).is_none(), "half absent");
            assert!(volume.in_place_head(4 * MIB, MIB).is_none(), "past the end");
            assert!(volume.in_place_head(0, 0).is_none(), "empty");
            let head = volume.in_place_head(4096, MIB).expect("held and cached");

            let data: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
            let mut landed = 0;
            while landed < data.len() {
                landed += land(&volume, &head, 4096 + landed as u64, &data[landed..]).unwrap();
            }
            let read_data: &[u8] = &[7u8; 8192];
            volume
                .land_read_in_place(&head, MIB + 4096, read_data, 64 << 10)
                .unwrap()
                .unwrap();
            let back = volume.read(0, 2 * MIB as usize).await.unwrap();
            assert!(back[..4096].iter().all(|&b| b == 1));
            assert!(back[4096..4096 + MIB as usize] == data[..]);
            assert!(back[MIB as usize + 4096..MIB as usize + 12288]
                .iter()
                .all(|&b| b == 7));
            assert!(back[MIB as usize + 12288..].iter().all(|&b| b == 1));
            assert!(volume.chain().top().is_dirty(), "a flush must sync it");
            volume.flush().await.unwrap();
            assert!(!volume.chain().top().is_dirty());
        });
    }

    #[test]
    fn pages_evicted_after_the_header_send_the_rest_the_ordinary_way() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (_registry, volume) = volume(dir.path(), MIB).await;
            let head = volume.in_place_head(0, MIB).expect("cached");
            // Memory pressure takes the range's pages while the payload is awaited (they are
            // clean once synced).
            volume.flush().await.unwrap();
            let data = volume.chain().top().data().clone();
            // SAFETY: plain advice on an open descriptor.
            let advised = unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&*data),
                    0,
                    0,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            assert_eq!(advised, 0);
            assert!(!volume.engine.all_cached(&data, 0, 65536));
            assert_eq!(
                land(&volume, &head, 0, &[2u8; 65536]),
                None,
                "a write fault would read the pages from the disk"
            );
            // Read back in, they take landings again.
            assert!(volume.read(0, 65536).await.unwrap().iter().all(|&b| b == 1));
            assert_eq!(land(&volume, &head, 0, &[2u8; 65536]), Some(65536));
        });
    }

    /// A zero under way on the blocks (a NO_HOLE one leaves the map saying data) refuses a
    /// landing; so does one done since the landed part of a block was recorded.
    #[test]
    fn a_zero_under_way_or_since_refuses_a_landing() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (_registry, volume) = volume(dir.path(), MIB).await;
            let head = volume.in_place_head(0, MIB).unwrap();
            let stripes = &volume.writer.as_ref().unwrap().stripes;
            let zeroing = stripes.zeroing(0, 2).await;
            assert_eq!(land(&volume, &head, 0, &[2u8; 8192]), None, "under way");
            assert_eq!(volume.zero_generation(1), None);
            drop(zeroing);
            let generation = volume.zero_generation(1);
            assert!(generation.is_some());
            assert_eq!(land(&volume, &head, 0, &[2u8; 6000]), Some(6000));
            let partial = |zero_generation| {
                Some(PartialBlock {
                    block: 1,
                    zero_generation,
                })
            };
            // The landings' copies are left out: only whether they may run is looked at.
            let landed = volume.land_in_place(&head, 6000, 2192, partial(generation), |_, n| Ok(n));
            assert_eq!(landed.map(Result::unwrap), Some(2192), "no zero since");
            drop(stripes.zeroing(1, 2).await);
            assert!(volume
                .land_in_place(&head, 6000, 2192, partial(generation), |_, n| Ok(n))
                .is_none());
        });
    }

    #[test]
    fn a_new_head_between_two_landings_sends_the_rest_the_ordinary_way() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (registry, volume) = volume(dir.path(), MIB).await;
            let head = volume.in_place_head(0, MIB).unwrap();
            assert_eq!(land(&volume, &head, 0, &[2u8; 8192]), Some(8192));
            assert!(head.layer.is_mapped());
            registry
                .entry("v")
                .unwrap()
                .create_snapshot("s")
                .await
                .unwrap();
            assert_eq!(
                land(&volume, &head, 8192, &[2u8; 8192]),
                None,
                "the old head is frozen now"
            );
            assert!(volume
                .land_read_in_place(&head, 8192, &[2u8; 8192], 4096)
                .is_none());
            assert!(
                !head.layer.is_mapped(),
                "the frozen head's mapping was let go and not made again"
            );
            // Blocks written to the new head (the ordinary way) land in place there.
            volume
                .write(0, Bytes::from(vec![3u8; 8192]), false)
                .await
                .unwrap();
            let new_head = volume
                .in_place_head(0, 8192)
                .expect("the new head holds them");
            assert_eq!(land(&volume, &new_head, 0, &[4u8; 8192]), Some(8192));
            assert!(new_head.layer.is_mapped());
            assert!(volume.read(0, 8192).await.unwrap().iter().all(|&b| b == 4));
            // What landed before the snapshot is in it; nothing after.
            let snapshot = registry.get("v@s").unwrap();
            let frozen = snapshot.read(0, 16384).await.unwrap();
            assert!(frozen[..8192].iter().all(|&b| b == 2));
            assert!(frozen[8192..].iter().all(|&b| b == 1));
            let read_only = registry.get("v@s").unwrap();
            assert!(read_only.in_place_head(0, 4096).is_none(), "read-only view");
        });
    }
}
