//! A volume as the NBD side sees it: read, write, write_zeroes, trim, flush, block_status, size.
//!
//! Behind these methods sits a chain of copy-on-write layers (see `layer/`): writes go to the
//! head, reads resolve each 4 KiB block to the topmost layer holding it. A snapshot export is a
//! `Volume` too, read-only, over the snapshot's frozen layers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;

use crate::error::StorageError;
use crate::io::IoEngine;
use crate::storage::attachments::Attachments;
use crate::storage::buffers::BufferPool;
use crate::storage::epoch::{Epoch, EpochGuard};
use crate::storage::fence::{Fence, Seat};
use crate::storage::holes;
use crate::storage::layer::chain::{Chain, Hit, RunBudget};
use crate::storage::layer::{BlockState, Layer, BLOCK_BYTES};
use crate::storage::persist::ManifestPersist;
use crate::storage::restore_mark::RestoreMark;
use crate::storage::stripes::Stripes;

mod in_place;
mod mapped_read;
mod seat_changes;
pub use in_place::{InPlaceHead, PartialBlock};
pub use mapped_read::MappedBytes;

/// Allocation bits of a `StatusQuery::Allocation` extent.
pub const EXTENT_HOLE: u32 = 1;
pub const EXTENT_ZERO: u32 = 2;

/// Blocks examined by one block-status call at most (4 GiB): bounds the CPU one request costs;
/// clients ask again from where the answer ended.
const MAX_STATUS_BLOCKS: u64 = 1 << 20;
/// Steps of a BLOCK_STATUS walk (see `RunBudget`): 256 MiB of allocated blocks one by one, a
/// millisecond or so of the connection's thread.
const MAX_STATUS_STEPS: u64 = 1 << 16;

/// Largest buffer used when zeroes must be written out by hand.
const ZERO_WRITE_CHUNK_BYTES: u64 = 1 << 20;

/// How a write reaches a layer's data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Through the page cache; the I/O engine's threads copy large writes.
    PageCache,
    /// Through the page cache; the calling thread copies large writes (see `write_here`).
    PageCacheHere,
    /// O_DIRECT where the buffer and range are aligned, else the page cache.
    Direct,
}

/// Bytes of a volume as they lie in one of its files (see [`Volume::cached_range`]).
#[derive(Debug, Clone)]
pub struct FileRange {
    pub file: Arc<std::fs::File>,
    pub offset_bytes: u64,
    pub length_bytes: u64,
    /// The chain the range was found in, held until the bytes are sent: pruning waits for
    /// it before punching blocks out of a layer below the head (see `readers_done`).
    pub _resolved_in: Arc<Chain>,
}

/// How WRITE_ZEROES may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroMode {
    /// The range may be deallocated (no NO_HOLE flag).
    pub may_trim: bool,
    /// Fail with FastZeroUnsupported rather than write zero bytes (FAST_ZERO flag).
    pub fast_only: bool,
}

/// What a block-status call reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusQuery {
    /// `EXTENT_HOLE` / `EXTENT_ZERO` bits.
    Allocation,
    /// 0 unallocated, 1 the top layer, 2 the layer below, ...
    Depth,
    /// 1 where a block changed since the snapshot, else 0: the one named, in the incarnation
    /// the connection found when it attached (see [`SnapshotBase`]); any other (none then, or
    /// one deleted and made again under the name since) answers "all changed".
    ChangedSince {
        snapshot: String,
        incarnation: Option<u64>,
    },
}

/// A snapshot below the head, a base for "changed since". `incarnation` tells apart snapshots
/// that had the same name one after the other (a rotation deleting and taking `daily` again):
/// a connection's `qemu:dirty-bitmap:daily` keeps meaning the one it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotBase {
    pub name: String,
    pub layer: String,
    pub incarnation: u64,
}

/// Who a volume is, beyond its name: fixed at creation, shown by the admin socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeIdentity {
    pub uuid: String,
    pub created_unix_secs: u64,
}

/// What only a writable volume has.
#[derive(Default)]
pub struct Writer {
    /// Writes hold it shared for their whole duration; freezing a group of heads and resizing
    /// hold it exclusively, so no write is half in the old head and half after. (Freezing one
    /// head needs no exclusion: see `epoch.rs`.)
    pub gate: tokio::sync::RwLock<()>,
    /// Held exclusively from a head swap until its manifest is in place and published to
    /// `persist`; FLUSH takes it shared to read the generation it must wait for, so a flush
    /// never reports writes durable that sit in a head the disk does not record.
    pub commit: tokio::sync::RwLock<()>,
    /// The last manifest write after a head swap failed: FLUSH fails until one succeeds.
    pub commit_failed: std::sync::atomic::AtomicBool,
    /// The background fsyncs of the manifests snapshot create put in place.
    pub persist: Arc<ManifestPersist>,
    /// A write, zero or trim failed after it may have changed the head's data file (a map
    /// entry that could not be set after its bytes landed, a short write, a punch refused):
    /// bytes may lie under blocks the map does not call data, so the shutdown leaves no
    /// clean-stop marker and the next load punches them (see `storage/clean_stop.rs`).
    pub unmapped_bytes: std::sync::atomic::AtomicBool,
    /// Writes the volume's manifest again after a failed manifest write (installed by the
    /// volume's entry, which owns the manifest): FLUSH runs it, so a volume whose data dir
    /// was full heals once there is room, without waiting for the next snapshot.
    pub repair: std::sync::OnceLock<ManifestRepair>,
    stripes: Stripes,
}

/// See [`Writer::repair`].
pub type ManifestRepair = Box<
    dyn Fn()
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StorageError>> + Send>>
        + Send
        + Sync,
>;

impl Writer {
    /// Notes a change that failed once it held the gate (see `unmapped_bytes`).
    fn note_change<T>(&self, result: &Result<T, StorageError>) {
        if result.is_err() {
            self.unmapped_bytes.store(true, Ordering::SeqCst);
        }
    }

    /// A manifest write failed (a freeze's, a tree change's or a background persist) and no
    /// manifest was written since: FLUSH cannot vouch for the layout on disk.
    pub fn manifest_failed(&self) -> bool {
        self.commit_failed.load(Ordering::SeqCst) || self.persist.failed()
    }

    /// Holds client writes off the head's blocks `[start, end)`: the gate shared, then their
    /// stripes (merges working on a live head).
    pub async fn hold_blocks(&self, start: u64, end: u64) -> BlocksHeld<'_> {
        let gate = self.gate.read().await;
        let stripes = self.stripes.lock(start, end).await;
        BlocksHeld {
            _gate: gate,
            _stripes: stripes,
        }
    }
}

/// Blocks held by [`Writer::hold_blocks`] until dropped.
pub struct BlocksHeld<'a> {
    _gate: tokio::sync::RwLockReadGuard<'a, ()>,
    _stripes: Vec<tokio::sync::MutexGuard<'a, ()>>,
}

struct ChainSlot {
    chain: Arc<Chain>,
    epoch: Arc<Epoch>,
    /// Chains swapped out while reads (or replies sent from their files) may still hold them:
    /// `readers_done` waits for all of them, not only the one it swaps out, since a reply
    /// queued behind a slow client may hold a chain two swaps old (a snapshot, then pruning).
    retired: Vec<std::sync::Weak<Chain>>,
}

impl ChainSlot {
    fn replace(&mut self, chain: Arc<Chain>) {
        self.retired.retain(|weak| weak.strong_count() > 0);
        self.retired.push(Arc::downgrade(&self.chain));
        self.chain = chain;
    }
}

pub struct Volume {
    name: String,
    /// Changed online by resize; a connection keeps the size it negotiated.
    size_bytes: AtomicU64,
    identity: VolumeIdentity,
    attachments: Arc<Attachments>,
    engine: IoEngine,
    buffers: Arc<BufferPool>,
    /// The layers reads resolve through (the head on top), and the epoch writes on that head
    /// belong to: swapped together (see `epoch.rs`).
    chain: RwLock<ChainSlot>,
    writer: Option<Writer>,
    /// Snapshots below the head: the bases for "changed since".
    bases: RwLock<Vec<SnapshotBase>>,
    /// Cleared the first time the filesystem refuses fallocate, so later zeroing of allocated
    /// blocks goes straight to writing zero bytes.
    fallocate_works: AtomicBool,
    /// Hole punching works on the head's filesystem (cleared at its first EOPNOTSUPP).
    punch_works: AtomicBool,
    /// Set while the volume holds an incomplete restore (see `restore_mark.rs`): the handshake
    /// refuses clients then.
    restore_mark: std::sync::Mutex<Option<RestoreMark>>,
    /// A snapshot's export just made: the writes still landing in its layer (the epoch of the
    /// head it froze), which a client must not read before they are done.
    settling: std::sync::Mutex<Option<Arc<Epoch>>>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("size_bytes", &self.size_bytes())
            .finish()
    }
}

impl Volume {
    /// A writable volume over `chain` (its top is the head).
    pub fn new(
        name: String,
        size_bytes: u64,
        chain: Chain,
        engine: IoEngine,
        buffers: Arc<BufferPool>,
    ) -> Volume {
        Volume::build(
            name,
            size_bytes,
            chain,
            engine,
            buffers,
            Some(Writer::default()),
        )
    }

    /// A read-only view (a snapshot export) over `chain`.
    pub fn read_only_view(
        name: String,
        size_bytes: u64,
        chain: Chain,
        engine: IoEngine,
        buffers: Arc<BufferPool>,
    ) -> Volume {
        Volume::build(name, size_bytes, chain, engine, buffers, None)
    }

    fn build(
        name: String,
        size_bytes: u64,
        chain: Chain,
        engine: IoEngine,
        buffers: Arc<BufferPool>,
        writer: Option<Writer>,
    ) -> Volume {
        // Only a writable volume ever punches.
        let punch_works =
            writer.is_none() || crate::storage::holes::punches_holes(chain.top().data());
        Volume {
            name,
            size_bytes: AtomicU64::new(size_bytes),
            identity: VolumeIdentity::default(),
            attachments: Arc::new(Attachments::default()),
            engine,
            buffers,
            chain: RwLock::new(ChainSlot {
                chain: Arc::new(chain),
                epoch: Arc::new(Epoch::default()),
                retired: Vec::new(),
            }),
            writer,
            bases: RwLock::new(Vec::new()),
            fallocate_works: AtomicBool::new(true),
            punch_works: AtomicBool::new(punch_works),
            restore_mark: std::sync::Mutex::new(None),
            settling: std::sync::Mutex::new(None),
        }
    }

    /// This snapshot export's content is final once the writes of `epoch` (in flight on the
    /// head its snapshot froze) are done: see [`Volume::settled`].
    pub(crate) fn settle_after(&self, epoch: Arc<Epoch>) {
        *self.settling.lock().unwrap_or_else(|p| p.into_inner()) = Some(epoch);
    }

    /// Waits until the content is final: at once but for a snapshot's export made a moment
    /// ago, whose layer may still take the writes in flight when it was frozen (its snapshot's
    /// create answers only after them). Clients attach after this, so they never read a block
    /// such a write then changes.
    pub async fn settled(&self) {
        let settling = self
            .settling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(epoch) = settling {
            epoch.drained().await;
            self.settling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
    }

    /// The incomplete restore this volume holds, if any.
    pub fn restore_mark(&self) -> Option<RestoreMark> {
        self.restore_mark
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Only `VolumeEntry`, which keeps the mark's file in step, sets it.
    pub(crate) fn set_restore_mark(&self, mark: Option<RestoreMark>) {
        *self.restore_mark.lock().unwrap_or_else(|p| p.into_inner()) = mark;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn with_identity(mut self, identity: VolumeIdentity) -> Volume {
        self.identity = identity;
        self
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    pub fn identity(&self) -> &VolumeIdentity {
        &self.identity
    }

    pub fn is_read_only(&self) -> bool {
        self.writer.is_none()
    }

    /// The NBD connections using this volume.
    pub fn attachments(&self) -> &Arc<Attachments> {
        &self.attachments
    }

    /// The write fence of this volume's connections.
    pub fn fence(&self) -> &Fence {
        self.attachments.fence()
    }

    /// New connections negotiate this size from now on.
    pub fn publish_size(&self, size_bytes: u64) {
        self.size_bytes.store(size_bytes, Ordering::Release);
    }

    fn slot(&self) -> std::sync::RwLockReadGuard<'_, ChainSlot> {
        self.chain.read().unwrap_or_else(|p| p.into_inner())
    }

    fn slot_mut(&self) -> std::sync::RwLockWriteGuard<'_, ChainSlot> {
        self.chain.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn chain(&self) -> Arc<Chain> {
        Arc::clone(&self.slot().chain)
    }

    /// The chain a write lands in, and its membership in that head's epoch, taken together.
    /// Holds the gate shared and takes the chain a change lands in. `seat`: the connection
    /// that asked for the change, if a client's. A connection closed by force gets nothing:
    /// the rollback, restore or delete that closed it goes ahead after its drain timeout, and
    /// a change that passed the fence before the close but then waited here (a resize or a
    /// group freeze holding the gate, a stalled thread) would land in the volume that
    /// operation left. The seat is read after the chain is taken.
    async fn enter_for_change<'w>(
        &self,
        writer: &'w Writer,
        seat: Option<&Seat>,
    ) -> Result<(tokio::sync::RwLockReadGuard<'w, ()>, Arc<Chain>, EpochGuard), StorageError> {
        let gate = writer.gate.read().await;
        let (chain, epoch) = self.chain_for_write();
        if seat.is_some_and(Seat::is_forced) {
            return Err(StorageError::Withdrawn(self.name.clone()));
        }
        Ok((gate, chain, epoch))
    }

    fn chain_for_write(&self) -> (Arc<Chain>, EpochGuard) {
        let slot = self.slot();
        (Arc::clone(&slot.chain), slot.epoch.enter())
    }

    /// Waits until every read that resolved its blocks before this call (and every write in
    /// flight) is done with them: a copy of the chain replaces the shared one, and the old one
    /// is waited out, with every chain swapped out before that a read still holds. Pruning calls it before punching out, below the head, blocks a read may
    /// still be about to read there. False when one still held it after `wait` (a reply sent
    /// from the file, waiting on a slow client).
    pub async fn readers_done(&self, wait: std::time::Duration) -> bool {
        let retired = {
            let mut slot = self.slot_mut();
            let copy = Arc::new(Chain::clone(&slot.chain));
            slot.replace(copy);
            slot.retired.clone()
        };
        let deadline = tokio::time::Instant::now() + wait;
        while retired.iter().any(|weak| weak.strong_count() > 0) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        true
    }

    /// Swaps in a new chain with the same head. Readers holding the old one finish with it
    /// (its layers stay open).
    pub fn set_chain(&self, chain: Chain) {
        self.slot_mut().replace(Arc::new(chain));
    }

    /// Swaps in a chain with a new head: writes starting from now on are in a new epoch.
    /// Returns the old epoch, whose writes may still be landing in the old head.
    pub fn set_chain_new_head(&self, chain: Chain) -> Arc<Epoch> {
        let mut slot = self.slot_mut();
        let next = slot.epoch.next();
        slot.replace(Arc::new(chain));
        std::mem::replace(&mut slot.epoch, next)
    }

    /// Forgets the previous epoch once it has drained (see [`Epoch::forget_earlier`]).
    pub fn earlier_epoch_drained(&self) {
        self.slot().epoch.forget_earlier();
    }

    pub fn writer(&self) -> Option<&Writer> {
        self.writer.as_ref()
    }

    fn writable(&self) -> Result<&Writer, StorageError> {
        self.writer
            .as_ref()
            .ok_or_else(|| StorageError::ReadOnly(self.name.clone()))
    }

    /// Names of the snapshots a "changed since" query may name.
    pub fn changed_since_names(&self) -> Vec<String> {
        self.bases
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|base| base.name.clone())
            .collect()
    }

    pub fn set_bases(&self, bases: Vec<SnapshotBase>) {
        *self.bases.write().unwrap_or_else(|p| p.into_inner()) = bases;
    }

    /// The "changed since" query for snapshot `name` as it is now (its incarnation, if it is
    /// a base).
    pub fn changed_since(&self, name: &str) -> StatusQuery {
        let incarnation = self
            .bases
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|base| base.name == name)
            .map(|base| base.incarnation);
        StatusQuery::ChangedSince {
            snapshot: name.to_owned(),
            incarnation,
        }
    }

    pub async fn read(
        &self,
        offset_bytes: u64,
        length_bytes: usize,
    ) -> Result<Bytes, StorageError> {
        let chain = self.chain();
        let end_bytes = offset_bytes + length_bytes as u64;
        let runs = chain.runs(offset_bytes / BLOCK_BYTES, end_bytes.div_ceil(BLOCK_BYTES));
        let mut buf = self.buffers.take(length_bytes);
        if let [(_, _, hit)] = runs[..] {
            // One source for the whole range: the common case, read straight into the buffer.
            if let Hit::Data(i) = hit {
                buf = self.read_layer(chain.layer(i), offset_bytes, buf).await?;
            } else {
                buf.fill(0);
            }
            return Ok(self.buffers.freeze(buf));
        }
        // Several sources: split the buffer into one piece per run (no copies), fill each,
        // and join the pieces back in order.
        let mut pieces = Vec::with_capacity(runs.len());
        for (start, end, hit) in runs {
            let piece_start = (start * BLOCK_BYTES).max(offset_bytes);
            let piece_end = (end * BLOCK_BYTES).min(end_bytes);
            let mut piece = buf.split_to((piece_end - piece_start) as usize);
            match hit {
                Hit::Data(i) => {
                    pieces.push(either(self.read_layer(chain.layer(i), piece_start, piece)))
                }
                _ => {
                    piece.fill(0);
                    pieces.push(ready(piece));
                }
            }
        }
        let mut joined = BytesMut::new();
        for piece in join_all(pieces).await {
            joined.unsplit(piece?);
        }
        Ok(self.buffers.freeze(joined))
    }

    /// Where a read of `length_bytes` at `offset_bytes` lies when one layer's data file holds
    /// all of it and every page is in the page cache: a caller can then send it from the cache
    /// (`sendfile`) instead of reading it first, without waiting for the disk. `None` when the
    /// range spans layers or holes, or is not all cached. The file holds what the read would
    /// have returned until a later write changes it, like the page-cache copy a read makes.
    /// Pages evicted between this check and the send make that one send wait for the disk.
    pub fn cached_range(&self, offset_bytes: u64, length_bytes: u64) -> Option<FileRange> {
        let end_bytes = offset_bytes.checked_add(length_bytes)?;
        if length_bytes == 0 || end_bytes > self.size_bytes() {
            return None;
        }
        let chain = self.chain();
        let runs = chain.runs(offset_bytes / BLOCK_BYTES, end_bytes.div_ceil(BLOCK_BYTES));
        let [(_, _, Hit::Data(i))] = runs[..] else {
            return None;
        };
        let file = chain.layer(i).data();
        self.engine
            .all_cached(file, offset_bytes, length_bytes)
            .then(|| FileRange {
                file: Arc::clone(file),
                offset_bytes,
                length_bytes,
                _resolved_in: Arc::clone(&chain),
            })
    }

    async fn read_layer(
        &self,
        layer: &Layer,
        offset_bytes: u64,
        buf: BytesMut,
    ) -> Result<BytesMut, StorageError> {
        let length_bytes = buf.len() as u64;
        let (buf, result) = self
            .engine
            .read_exact_at(layer.data(), offset_bytes, buf)
            .await;
        result.map_err(|e| StorageError::io("read", offset_bytes, length_bytes, e))?;
        Ok(buf)
    }

    /// Writes `data`; with `fua` it is durable when this returns. Clients' writes go through
    /// `changes_of`, which withdraws those of a connection closed by force.
    #[cfg(test)]
    pub async fn write(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), StorageError> {
        self.write_via(offset_bytes, data, fua, Via::PageCache, None)
            .await
    }

    /// `write` for a caller whose thread may spend the time to copy a large write into the
    /// page cache itself (see `IoEngine::write_all_at_here`): one that loses nothing while it
    /// does, because its next input keeps arriving meanwhile.
    #[cfg(test)]
    pub async fn write_here(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), StorageError> {
        self.write_via(offset_bytes, data, fua, Via::PageCacheHere, None)
            .await
    }

    /// `seat`: the connection that asked for the write, if a client's (see `enter_for_change`).
    async fn write_via(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
        via: Via,
        seat: Option<&Seat>,
    ) -> Result<(), StorageError> {
        let writer = self.writable()?;
        {
            let (_gate, chain, epoch) = self.enter_for_change(writer, seat).await?;
            let written = self
                .write_in(writer, &chain, &epoch, offset_bytes, data, via)
                .await;
            writer.note_change(&written);
            written?;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// A restore's write: as `write` without FUA, but the whole blocks of a 4 KiB-aligned
    /// `data` (see `storage::aligned`) bypass the page cache, which saves the copy into it and
    /// the writeback after it. The map, dirty flag and `flush` work as for any write.
    ///
    /// The caller makes sure nothing writes the same range through the page cache while this
    /// runs (a restore has the volume to itself: clients are disconnected and each chunk is
    /// written once). Cached pages of the range, clean or dirty, are no problem: the kernel
    /// writes them back and drops them around the direct write.
    pub async fn write_bulk(&self, offset_bytes: u64, data: Bytes) -> Result<(), StorageError> {
        let writer = self.writable()?;
        let _gate = writer.gate.read().await;
        let (chain, epoch) = self.chain_for_write();
        let written = self
            .write_in(writer, &chain, &epoch, offset_bytes, data, Via::Direct)
            .await;
        writer.note_change(&written);
        written
    }

    /// A write split into a partial first block, whole blocks, and a partial last block. The
    /// caller holds the gate, so the whole write lands in one head.
    async fn write_in(
        &self,
        writer: &Writer,
        chain: &Chain,
        epoch: &EpochGuard,
        offset_bytes: u64,
        data: Bytes,
        via: Via,
    ) -> Result<(), StorageError> {
        let end_bytes = offset_bytes + data.len() as u64;
        let first_full = offset_bytes.div_ceil(BLOCK_BYTES);
        let end_full = end_bytes / BLOCK_BYTES;
        if first_full > end_full {
            // Inside one block, touching neither of its edges.
            return self
                .write_partial(writer, chain, epoch, offset_bytes, data)
                .await;
        }
        let lead_bytes = (first_full * BLOCK_BYTES - offset_bytes) as usize;
        let tail_bytes = (end_bytes - end_full * BLOCK_BYTES) as usize;
        if lead_bytes > 0 {
            self.write_partial(writer, chain, epoch, offset_bytes, data.slice(..lead_bytes))
                .await?;
        }
        if end_full > first_full {
            let middle = data.slice(lead_bytes..data.len() - tail_bytes);
            self.write_blocks(writer, chain, first_full, middle, via)
                .await?;
        }
        if tail_bytes > 0 {
            let tail = data.slice(data.len() - tail_bytes..);
            self.write_partial(writer, chain, epoch, end_full * BLOCK_BYTES, tail)
                .await?;
        }
        Ok(())
    }

    /// Whole blocks from `first_block`. Blocks the head already holds are overwritten in place
    /// without a lock; otherwise the stripes are locked so no read-modify-write or merge on the
    /// same blocks interleaves, and the map says "data" only once the bytes are written.
    async fn write_blocks(
        &self,
        writer: &Writer,
        chain: &Chain,
        first_block: u64,
        data: Bytes,
        via: Via,
    ) -> Result<(), StorageError> {
        let head = chain.top();
        let end_block = first_block + data.len() as u64 / BLOCK_BYTES;
        let offset_bytes = first_block * BLOCK_BYTES;
        let overwrite = writer.stripes.begin_overwrite(first_block, end_block);
        if (first_block..end_block).all(|b| head.state(b) == BlockState::Data) {
            self.write_layer_via(head, offset_bytes, data, via).await?;
            head.mark_dirty();
            return Ok(());
        }
        drop(overwrite);
        let _locks = writer.stripes.lock(first_block, end_block).await;
        self.write_layer_via(head, offset_bytes, data, via).await?;
        head.mark_written(first_block, end_block, chain.layers().len() > 1)?;
        Ok(())
    }

    /// Part of one block. When the head does not hold the block yet, its old content (from the
    /// layers below, or zeroes) is merged with the new bytes and the whole block written.
    async fn write_partial(
        &self,
        writer: &Writer,
        chain: &Chain,
        epoch: &EpochGuard,
        offset_bytes: u64,
        data: Bytes,
    ) -> Result<(), StorageError> {
        let head = chain.top();
        let block = offset_bytes / BLOCK_BYTES;
        let overwrite = writer.stripes.begin_overwrite(block, block + 1);
        if head.state(block) == BlockState::Data {
            self.write_layer(head, offset_bytes, data).await?;
            head.mark_dirty();
            return Ok(());
        }
        drop(overwrite);
        if chain.layers().len() > 1 {
            // The block's old content may still be landing below (see `epoch.rs`). Waited for
            // before the stripe is locked: a write of the earlier epoch may need that stripe to
            // finish (a trim or an unaligned write locks its stripes after its first await),
            // and the epoch would never drain.
            epoch.wait_earlier().await;
        }
        let _locks = writer.stripes.lock(block, block + 1).await;
        let block_start = block * BLOCK_BYTES;
        let mut whole = match head.state(block) {
            BlockState::Data => {
                self.write_layer(head, offset_bytes, data).await?;
                head.mark_dirty();
                return Ok(());
            }
            BlockState::Zero => BytesMut::zeroed(BLOCK_BYTES as usize),
            BlockState::Absent => match chain.below_top() {
                // The earlier epoch has drained (above).
                Some(below) => self.read_chain(&below, block_start).await?,
                None => BytesMut::zeroed(BLOCK_BYTES as usize),
            },
        };
        let at = (offset_bytes - block_start) as usize;
        whole[at..at + data.len()].copy_from_slice(&data);
        self.write_layer(head, block_start, whole.freeze()).await?;
        head.mark_written(block, block + 1, chain.layers().len() > 1)?;
        Ok(())
    }

    /// One block as `chain` resolves it.
    async fn read_chain(&self, chain: &Chain, block_start: u64) -> Result<BytesMut, StorageError> {
        let buf = BytesMut::zeroed(BLOCK_BYTES as usize);
        match chain.hit(block_start / BLOCK_BYTES) {
            Hit::Data(i) => self.read_layer(chain.layer(i), block_start, buf).await,
            _ => Ok(buf),
        }
    }

    async fn write_layer_via(
        &self,
        layer: &Layer,
        offset_bytes: u64,
        data: Bytes,
        via: Via,
    ) -> Result<(), StorageError> {
        let length_bytes = data.len() as u64;
        let written = match via {
            Via::Direct => match layer.write_direct(&self.engine, offset_bytes, &data).await {
                Some(result) => result,
                None => {
                    self.engine
                        .write_all_at(layer.data(), offset_bytes, data, false)
                        .await
                }
            },
            Via::PageCacheHere => {
                self.engine
                    .write_all_at_here(layer.data(), offset_bytes, data, false)
                    .await
            }
            Via::PageCache => {
                self.engine
                    .write_all_at(layer.data(), offset_bytes, data, false)
                    .await
            }
        };
        written.map_err(|e| StorageError::io("write", offset_bytes, length_bytes, e))
    }

    async fn write_layer(
        &self,
        layer: &Layer,
        offset_bytes: u64,
        data: Bytes,
    ) -> Result<(), StorageError> {
        self.write_layer_via(layer, offset_bytes, data, Via::PageCache)
            .await
    }

    /// Makes the range read as zeroes, deallocating it when allowed.
    pub async fn write_zeroes(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<(), StorageError> {
        self.write_zeroes_for(offset_bytes, length_bytes, mode, fua, None)
            .await
    }

    async fn write_zeroes_for(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        mode: ZeroMode,
        fua: bool,
        seat: Option<&Seat>,
    ) -> Result<(), StorageError> {
        let writer = self.writable()?;
        {
            // One gate for the whole request: a snapshot sees all of it or none of it.
            let (_gate, chain, epoch) = self.enter_for_change(writer, seat).await?;
            let zeroed = self
                .zero_in(writer, &chain, &epoch, offset_bytes, length_bytes, mode)
                .await;
            // A FAST_ZERO that cannot be fast fails before it changes anything.
            if !matches!(zeroed, Err(StorageError::FastZeroUnsupported { .. })) {
                writer.note_change(&zeroed);
            }
            zeroed?;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// The caller holds the gate.
    async fn zero_in(
        &self,
        writer: &Writer,
        chain: &Chain,
        epoch: &EpochGuard,
        offset_bytes: u64,
        length_bytes: u64,
        mode: ZeroMode,
    ) -> Result<(), StorageError> {
        let end_bytes = offset_bytes + length_bytes;
        let first_full = offset_bytes.div_ceil(BLOCK_BYTES);
        let end_full = end_bytes / BLOCK_BYTES;
        // Partial blocks at the edges are written as zero bytes.
        let zeroes = |from: u64, to: u64| Bytes::from(vec![0u8; (to - from) as usize]);
        if first_full > end_full {
            let data = zeroes(offset_bytes, end_bytes);
            return self
                .write_in(writer, chain, epoch, offset_bytes, data, Via::PageCache)
                .await;
        }
        // The whole blocks first: a FAST_ZERO that cannot be fast fails there, and must leave
        // the export unchanged (the spec), edges included.
        if end_full > first_full {
            self.zero_blocks(writer, chain, first_full, end_full, mode)
                .await?;
        }
        let lead_end = first_full * BLOCK_BYTES;
        if offset_bytes < lead_end {
            let lead = zeroes(offset_bytes, lead_end);
            self.write_in(writer, chain, epoch, offset_bytes, lead, Via::PageCache)
                .await?;
        }
        let tail_start = end_full * BLOCK_BYTES;
        if tail_start < end_bytes {
            let tail = zeroes(tail_start, end_bytes);
            self.write_in(writer, chain, epoch, tail_start, tail, Via::PageCache)
                .await?;
        }
        Ok(())
    }

    async fn zero_blocks(
        &self,
        writer: &Writer,
        chain: &Chain,
        start: u64,
        end: u64,
        mode: ZeroMode,
    ) -> Result<(), StorageError> {
        let head = chain.top();
        let _locks = writer.stripes.lock(start, end).await;
        let (offset_bytes, length_bytes) = (start * BLOCK_BYTES, (end - start) * BLOCK_BYTES);
        // Without hole punching a deallocation writes zeroes over the head's bytes: not fast,
        // so FAST_ZERO takes a zero range, or fails.
        if mode.may_trim && (!mode.fast_only || self.punch_works.load(Ordering::Relaxed)) {
            return self.deallocate(writer, chain, start, end).await;
        }
        if mode.fast_only && !self.fallocate_works.load(Ordering::Relaxed) {
            return Err(StorageError::FastZeroUnsupported {
                offset_bytes,
                length_bytes,
            });
        }
        // NO_HOLE: the head keeps allocated blocks that read as zeroes. A payload landing in
        // place in them learns of it (see `stripes`).
        let _zeroing = writer.stripes.zeroing(start, end).await;
        if self.fallocate_works.load(Ordering::Relaxed) {
            let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            match self
                .engine
                .fallocate(head.data(), zero_range, offset_bytes, length_bytes)
                .await
            {
                Ok(()) => {
                    head.set_range(start, end, BlockState::Data)?;
                    return Ok(());
                }
                Err(e) if is_unsupported(&e) => {
                    tracing::warn!(volume = %self.name, error = %e, "fallocate unsupported here; zeroing by writing zero bytes");
                    self.fallocate_works.store(false, Ordering::Relaxed);
                }
                Err(e) => {
                    return Err(StorageError::io(
                        "write_zeroes",
                        offset_bytes,
                        length_bytes,
                        e,
                    ))
                }
            }
        }
        if mode.fast_only {
            return Err(StorageError::FastZeroUnsupported {
                offset_bytes,
                length_bytes,
            });
        }
        self.write_zero_bytes(head, offset_bytes, length_bytes)
            .await?;
        head.set_range(start, end, BlockState::Data)?;
        Ok(())
    }

    /// Writes zero bytes over `length_bytes` of `layer` from `offset_bytes`, in chunks.
    async fn write_zero_bytes(
        &self,
        layer: &Layer,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<(), StorageError> {
        let zeroes = Bytes::from(vec![0u8; ZERO_WRITE_CHUNK_BYTES.min(length_bytes) as usize]);
        let mut done_bytes = 0;
        while done_bytes < length_bytes {
            let n = (length_bytes - done_bytes).min(ZERO_WRITE_CHUNK_BYTES);
            self.write_layer(layer, offset_bytes + done_bytes, zeroes.slice(..n as usize))
                .await?;
            done_bytes += n;
        }
        Ok(())
    }

    /// Marks head blocks `[start, end)` as reading zero (masking the layers below; "absent"
    /// when there are none) and gives their space back. The caller holds their stripes.
    /// When the map has no room for the change (a full disk), the bytes are freed all the
    /// same (blocks the head holds then read as zeroes, as asked) and the error returned: the
    /// blocks it does not hold still read from the layers below.
    async fn deallocate(
        &self,
        writer: &Writer,
        chain: &Chain,
        start: u64,
        end: u64,
    ) -> Result<(), StorageError> {
        let head = chain.top();
        let state = if chain.layers().len() == 1 {
            BlockState::Absent
        } else {
            BlockState::Zero
        };
        let marked = head.set_range(start, end, state);
        // Overwrites that saw the blocks as data before the mark land before the punch.
        let _zeroing = writer.stripes.zeroing(start, end).await;
        // Reads follow the map from here; the bytes under it go (a hole, or zeroes below).
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let (offset_bytes, length_bytes) = (start * BLOCK_BYTES, (end - start) * BLOCK_BYTES);
        let punched = if self.punch_works.load(Ordering::Relaxed) {
            self.engine
                .fallocate(head.data(), punch, offset_bytes, length_bytes)
                .await
        } else {
            Err(std::io::ErrorKind::Unsupported.into())
        };
        if let Err(e) = punched {
            if is_unsupported(&e) && self.punch_works.swap(false, Ordering::Relaxed) {
                // From now on TRIM is ignored (the spec allows it; it would give nothing
                // back) and WRITE_ZEROES writes zeroes over the bytes it marks zero.
                tracing::warn!(volume = %self.name, error = %e, "hole punching unsupported here; trims are ignored");
            }
            // Bytes left under blocks marked zero would come back after a power loss once a
            // later write marks such a block data again and only the map reaches the disk:
            // the bytes the range holds are overwritten with zeroes instead (in place, so a
            // full disk, which can refuse a punch that splits an extent, takes them).
            tracing::debug!(volume = %self.name, error = %e, "no hole punched; zeroing the range's bytes");
            if let Err(e) = self
                .zero_range_or_bytes(head, offset_bytes, length_bytes)
                .await
            {
                tracing::warn!(volume = %self.name, offset_bytes, length_bytes, error = %e, "neither a hole nor zeroes replaced the bytes of blocks marked zero; a power loss may show them again");
                writer.unmapped_bytes.store(true, Ordering::SeqCst);
            }
        }
        // Dirty again after the punch, not only when the map changed before it: a FLUSH that
        // ran in between found the layer clean, and the next must make the hole durable. A
        // block marked zero over old bytes would show them again after a power loss once a
        // later write marks it data and its bytes are lost.
        head.mark_dirty();
        marked
    }

    /// Replaces with zeroes the parts of `length_bytes` from `offset_bytes` that hold bytes in
    /// `layer`'s data file (holes read as zeroes already, and are left holes: a zero range over
    /// them would allocate them): each by a zero range where the filesystem has one (no byte
    /// written), else by writing zero bytes.
    async fn zero_range_or_bytes(
        &self,
        layer: &Layer,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<(), StorageError> {
        let end_bytes = offset_bytes + length_bytes;
        let ranges = holes::data_ranges(layer.data(), offset_bytes, end_bytes)
            .map_err(|e| StorageError::io("seek_data", offset_bytes, length_bytes, e))?;
        for (start_bytes, range_end_bytes) in ranges {
            let range_bytes = range_end_bytes - start_bytes;
            if self.fallocate_works.load(Ordering::Relaxed) {
                let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
                let zeroed = self
                    .engine
                    .fallocate(layer.data(), zero_range, start_bytes, range_bytes)
                    .await;
                match zeroed {
                    Ok(()) => continue,
                    Err(e) if is_unsupported(&e) => {
                        self.fallocate_works.store(false, Ordering::Relaxed);
                    }
                    // A full disk may refuse it as it refused the punch: zeroes in place then.
                    Err(_) => {}
                }
            }
            self.write_zero_bytes(layer, start_bytes, range_bytes)
                .await?;
        }
        Ok(())
    }

    /// Deallocates whole blocks in the range; partial blocks are left alone (the spec lets a
    /// server ignore trims).
    #[cfg(test)]
    pub async fn trim(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        fua: bool,
    ) -> Result<(), StorageError> {
        self.trim_for(offset_bytes, length_bytes, fua, None).await
    }

    async fn trim_for(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        fua: bool,
        seat: Option<&Seat>,
    ) -> Result<(), StorageError> {
        let writer = self.writable()?;
        let start = offset_bytes.div_ceil(BLOCK_BYTES);
        let end = (offset_bytes + length_bytes) / BLOCK_BYTES;
        // Without hole punching a trim would have to write zeroes to give nothing back.
        if end > start && self.punch_works.load(Ordering::Relaxed) {
            let (_gate, chain, _epoch) = self.enter_for_change(writer, seat).await?;
            let _locks = writer.stripes.lock(start, end).await;
            if let Err(error) = self.deallocate(writer, &chain, start, end).await {
                // A server may ignore a trim; the space it could free is freed.
                tracing::debug!(volume = %self.name, %error, "trim not recorded in the block map");
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes every write completed before the call durable, whichever connection sent it: all
    /// connections share these layers and their page cache, which is what makes multi-conn
    /// true. Frozen layers not yet synced since their freeze are synced too.
    pub async fn flush(&self) -> Result<(), StorageError> {
        if let Some(writer) = &self.writer {
            if writer.manifest_failed() {
                // A manifest write failed (a full data dir): try it again now. Whatever the
                // outcome, the checks below decide.
                if let Some(repair) = writer.repair.get() {
                    if let Err(e) = repair().await {
                        tracing::debug!(volume = %self.name, error = %e, "writing the volume manifest again failed");
                    }
                }
            }
            let generation = {
                let _commit = writer.commit.read().await;
                if writer.commit_failed.load(Ordering::SeqCst) {
                    return Err(StorageError::io(
                        "flush",
                        0,
                        0,
                        std::io::Error::other("the volume manifest could not be saved"),
                    ));
                }
                writer.persist.visible()
            };
            // Every manifest in place when the flush began (the one recording the head that
            // holds the writes being flushed included) must be durable first. A head swapped in
            // after this point keeps the older heads in its chain, which are synced below.
            writer.persist.wait_durable(generation).await?;
        }
        self.sync_layers(0).await
    }

    /// Syncs every layer below the head: after a freeze, the writes acknowledged before it.
    pub(crate) async fn sync_frozen(&self) -> Result<(), StorageError> {
        self.sync_layers(1).await
    }

    /// Syncs the chain's layers from the `first_layer`-th (0: the head) down.
    async fn sync_layers(&self, first_layer: usize) -> Result<(), StorageError> {
        let chain = self.chain();
        for layer in chain.layers().iter().skip(first_layer) {
            layer.sync(&self.engine).await?;
        }
        Ok(())
    }

    /// Prefetch hint (NBD_CMD_CACHE): asks the kernel to read the range ahead in the layers
    /// that hold it.
    pub fn cache(&self, offset_bytes: u64, length_bytes: u64) {
        let chain = self.chain();
        let start = offset_bytes / BLOCK_BYTES;
        let end = (offset_bytes + length_bytes)
            .div_ceil(BLOCK_BYTES)
            .min(start + MAX_STATUS_BLOCKS);
        let budget = RunBudget {
            max_runs: usize::MAX,
            max_steps: MAX_STATUS_STEPS,
        };
        // A hint: past the budget the rest is left to the kernel's own read-ahead.
        for (a, z, hit) in chain.runs_within(start, end, budget) {
            if let Hit::Data(i) = hit {
                advise_willneed(chain.layer(i), a * BLOCK_BYTES, (z - a) * BLOCK_BYTES);
            }
        }
    }

    /// `query` over `[offset, offset+length)` as at most `max_extents` runs of
    /// `(length_bytes, value)`. The runs start at `offset` and never pass the end of the range
    /// or of the volume; they may stop short of the range's end.
    pub async fn block_status(
        &self,
        query: &StatusQuery,
        offset_bytes: u64,
        length_bytes: u64,
        max_extents: usize,
    ) -> Result<Vec<(u64, u32)>, StorageError> {
        let chain = self.chain();
        let end_bytes = offset_bytes
            .saturating_add(length_bytes)
            .min(self.size_bytes());
        if end_bytes <= offset_bytes {
            return Ok(Vec::new());
        }
        let start = offset_bytes / BLOCK_BYTES;
        let end = end_bytes
            .div_ceil(BLOCK_BYTES)
            .min(start + MAX_STATUS_BLOCKS);
        // Walked only as far as the reply can go: a client asking for 4 GiB of allocated
        // blocks one by one must not hold the connection's thread for long.
        let budget = RunBudget {
            max_runs: max_extents.max(1),
            max_steps: MAX_STATUS_STEPS,
        };
        let runs: Vec<(u64, u64, u32)> = match query {
            StatusQuery::Allocation => chain
                .runs_within(start, end, budget)
                .into_iter()
                .map(|(a, z, hit)| {
                    let value = match hit {
                        Hit::Data(_) => 0,
                        Hit::Zero(_) | Hit::Unallocated => EXTENT_HOLE | EXTENT_ZERO,
                    };
                    (a, z, value)
                })
                .collect(),
            StatusQuery::Depth => chain
                .runs_within(start, end, budget)
                .into_iter()
                .map(|(a, z, hit)| (a, z, hit.depth()))
                .collect(),
            StatusQuery::ChangedSince {
                snapshot,
                incarnation,
            } => {
                let layer = self
                    .bases
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .find(|base| base.name == *snapshot && Some(base.incarnation) == *incarnation)
                    .map(|base| base.layer.clone());
                match layer.and_then(|id| chain.position(&id)) {
                    Some(top_layers) => chain
                        .changed_runs_within(top_layers, start, end, budget)
                        .into_iter()
                        .map(|(a, z, changed)| (a, z, u32::from(changed)))
                        .collect(),
                    // The snapshot went away: everything counts as changed, the safe answer
                    // for a client copying changes.
                    None => vec![(start, end, 1)],
                }
            }
        };
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut last_value = None;
        for (a, z, value) in runs {
            let from = (a * BLOCK_BYTES).max(offset_bytes);
            let to = (z * BLOCK_BYTES).min(end_bytes);
            if to <= from {
                continue;
            }
            if last_value == Some(value) {
                if let Some(prev) = out.last_mut() {
                    prev.0 += to - from;
                    continue;
                }
            }
            if out.len() == max_extents.max(1) {
                break;
            }
            out.push((to - from, value));
            last_value = Some(value);
        }
        Ok(out)
    }
}

fn advise_willneed(layer: &Layer, offset_bytes: u64, length_bytes: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; the fd stays open because the
    // layer holds the File for the whole call.
    let _ = unsafe {
        libc::posix_fadvise(
            layer.data().as_raw_fd(),
            offset_bytes as libc::off_t,
            length_bytes as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        )
    };
}

pub(crate) fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

type PieceFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<BytesMut, StorageError>> + Send + 'a>,
>;

fn either<'a>(
    f: impl std::future::Future<Output = Result<BytesMut, StorageError>> + Send + 'a,
) -> PieceFuture<'a> {
    Box::pin(f)
}

fn ready<'a>(piece: BytesMut) -> PieceFuture<'a> {
    Box::pin(std::future::ready(Ok(piece)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::io::{EngineConfig, EngineKind};
    use crate::storage::{volume_of_ones, Registry};

    /// What the head's data file itself holds (not what the map makes reads return).
    fn head_file_bytes(volume: &Volume, offset_bytes: u64, length_bytes: u64) -> Vec<u8> {
        let mut bytes = vec![7u8; length_bytes as usize];
        let head = volume.chain().top().data().clone();
        std::os::unix::fs::FileExt::read_exact_at(head.as_ref(), &mut bytes, offset_bytes).unwrap();
        bytes
    }

    /// A FAST_ZERO that cannot be fast fails before it changes anything: its unaligned edges
    /// are not zeroed either (the spec: the export SHOULD NOT be altered by the failure).
    #[tokio::test]
    async fn a_fast_zero_that_cannot_be_fast_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_registry, volume) = volume_of_ones(dir.path(), None, 4 * BLOCK_BYTES).await;
        volume.fallocate_works.store(false, Ordering::Relaxed);
        let mode = ZeroMode {
            may_trim: false,
            fast_only: true,
        };
        let failed = volume.write_zeroes(512, 2 * BLOCK_BYTES, mode, false).await;
        assert!(
            matches!(failed, Err(StorageError::FastZeroUnsupported { .. })),
            "{failed:?}"
        );
        let back = volume.read(0, 4 * BLOCK_BYTES as usize).await.unwrap();
        assert!(back.iter().all(|&b| b == 1), "the export changed");
    }

    /// Where holes cannot be punched, a FAST_ZERO that may trim takes a zero range when it can
    /// and otherwise fails with nothing changed: deallocating would write zeroes over every byte
    /// the head holds in the range (qemu-img convert's pre-zeroing of a whole image).
    #[tokio::test]
    async fn a_fast_zero_where_holes_cannot_be_punched_is_a_zero_range_or_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (_registry, volume) = volume_of_ones(dir.path(), None, 4 * BLOCK_BYTES).await;
        volume.punch_works.store(false, Ordering::Relaxed);
        volume.fallocate_works.store(false, Ordering::Relaxed);
        let mode = ZeroMode {
            may_trim: true,
            fast_only: true,
        };
        let failed = volume.write_zeroes(0, 2 * BLOCK_BYTES, mode, false).await;
        assert!(
            matches!(failed, Err(StorageError::FastZeroUnsupported { .. })),
            "{failed:?}"
        );
        let back = volume.read(0, 4 * BLOCK_BYTES as usize).await.unwrap();
        assert!(back.iter().all(|&b| b == 1), "the export changed");

        volume.fallocate_works.store(true, Ordering::Relaxed);
        volume
            .write_zeroes(0, 2 * BLOCK_BYTES, mode, false)
            .await
            .unwrap();
        let back = volume.read(0, 4 * BLOCK_BYTES as usize).await.unwrap();
        let (zeroed, kept) = back.split_at(2 * BLOCK_BYTES as usize);
        assert!(zeroed.iter().all(|&b| b == 0) && kept.iter().all(|&b| b == 1));
        assert_eq!(
            head_file_bytes(&volume, 0, BLOCK_BYTES),
            vec![0u8; BLOCK_BYTES as usize]
        );
    }

    /// A zero that gives blocks back waits, after marking them, for overwrites of them that saw
    /// them as data (taking no lock) before it punches: their bytes landing after the punch
    /// would lie under blocks marked zero.
    #[tokio::test]
    async fn a_zero_punches_only_after_overwrites_that_saw_the_blocks_as_data() {
        let dir = tempfile::tempdir().unwrap();
        let (_registry, volume) = volume_of_ones(dir.path(), None, 64 * BLOCK_BYTES).await;
        let writer = volume.writer.as_ref().unwrap();
        // An overwrite of block 8 past its map check, its bytes not landed yet.
        let overwrite = writer.stripes.begin_overwrite(8, 9);
        let zeroing = Arc::clone(&volume);
        let zero = tokio::spawn(async move {
            let mode = ZeroMode {
                may_trim: true,
                fast_only: false,
            };
            zeroing
                .write_zeroes(8 * BLOCK_BYTES, 8 * BLOCK_BYTES, mode, false)
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!zero.is_finished(), "the zero waits for the overwrite");
        let head = Arc::clone(volume.chain().top());
        std::os::unix::fs::FileExt::write_all_at(
            head.data().as_ref(),
            &[9u8; BLOCK_BYTES as usize],
            8 * BLOCK_BYTES,
        )
        .unwrap();
        drop(overwrite);
        zero.await.unwrap().unwrap();
        let block = head_file_bytes(&volume, 8 * BLOCK_BYTES, BLOCK_BYTES);
        assert!(
            block.iter().all(|&b| b == 0),
            "the late overwrite's bytes were punched"
        );
        let back = volume.read(8 * BLOCK_BYTES, 4096).await.unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }

    /// Where hole punching is unsupported: zeroes mark their blocks and write zeroes over the
    /// bytes under them, and trims, from the first failed punch on, are ignored (the spec allows
    /// it; giving nothing back, they would only cost writes).
    #[tokio::test]
    async fn without_hole_punching_trims_are_ignored_and_zeroes_written_under_the_marks() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let (_registry, volume) =
            volume_of_ones(dir.path(), Some(engine.clone()), 64 * BLOCK_BYTES).await;
        engine.fail_fallocate_for_test(libc::FALLOC_FL_PUNCH_HOLE, libc::EOPNOTSUPP);
        let may_trim = ZeroMode {
            may_trim: true,
            fast_only: false,
        };
        volume
            .write_zeroes(0, 4 * BLOCK_BYTES, may_trim, false)
            .await
            .unwrap();
        volume
            .trim(8 * BLOCK_BYTES, 4 * BLOCK_BYTES, false)
            .await
            .unwrap();
        volume
            .write_zeroes(16 * BLOCK_BYTES, 4 * BLOCK_BYTES, may_trim, false)
            .await
            .unwrap();
        let back = volume.read(0, 64 * BLOCK_BYTES as usize).await.unwrap();
        let block = |b: usize| &back[b * 4096..(b + 1) * 4096];
        assert!(block(0).iter().all(|&b| b == 0), "zeroed");
        assert!(block(8).iter().all(|&b| b == 1), "the trim was ignored");
        assert!(block(16).iter().all(|&b| b == 0), "zeroed");
        assert_eq!(volume.chain().top().state(16), BlockState::Absent);
        assert!(block(24).iter().all(|&b| b == 1));
        let file_bytes = head_file_bytes(&volume, 16 * BLOCK_BYTES, 4 * BLOCK_BYTES);
        assert!(
            file_bytes.iter().all(|&b| b == 0),
            "no old bytes under blocks marked zero"
        );
    }

    /// After a refused punch only the ranges of the head's file that hold bytes are zeroed:
    /// its holes stay holes (a zero range over them would allocate them, on a disk that is
    /// full already).
    #[tokio::test]
    async fn a_refused_punch_leaves_the_holes_in_its_range_holes() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let registry = Registry::open(dir.path(), engine.clone()).unwrap();
        let volume = registry.create("v", 64 * BLOCK_BYTES).unwrap();
        let ones = Bytes::from(vec![1u8; 4 * BLOCK_BYTES as usize]);
        volume.write(0, ones, false).await.unwrap();
        let head = Arc::clone(volume.chain().top());
        let allocated = || {
            let meta = head.data().metadata().unwrap();
            std::os::unix::fs::MetadataExt::blocks(&meta)
        };
        let allocated_before = allocated();
        engine.fail_fallocate_for_test(libc::FALLOC_FL_PUNCH_HOLE, libc::ENOSPC);
        let zero = ZeroMode {
            may_trim: true,
            fast_only: false,
        };
        volume
            .write_zeroes(0, 32 * BLOCK_BYTES, zero, false)
            .await
            .unwrap();
        assert!(
            allocated() <= allocated_before,
            "{} sectors allocated, {allocated_before} before",
            allocated()
        );
        assert_eq!(
            head_file_bytes(&volume, 0, 4 * BLOCK_BYTES),
            vec![0u8; 4 * BLOCK_BYTES as usize]
        );
        let held = holes::data_ranges(head.data(), 4 * BLOCK_BYTES, 32 * BLOCK_BYTES).unwrap();
        assert!(held.is_empty(), "holes were allocated: {held:?}");
        let back = volume.read(0, 32 * BLOCK_BYTES as usize).await.unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }

    /// A hole punch that fails (a full disk can refuse one that splits an extent) leaves no old
    /// bytes under blocks marked zero: they would read again after a power loss once a later
    /// write marked such a block data and only the map reached the disk.
    #[tokio::test]
    async fn a_refused_punch_zeroes_the_bytes_under_blocks_marked_zero() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let (_registry, volume) =
            volume_of_ones(dir.path(), Some(engine.clone()), 64 * BLOCK_BYTES).await;
        engine.fail_fallocate_for_test(libc::FALLOC_FL_PUNCH_HOLE, libc::ENOSPC);
        let (start, length) = (8 * BLOCK_BYTES, 16 * BLOCK_BYTES);
        let zero = ZeroMode {
            may_trim: true,
            fast_only: false,
        };
        volume
            .write_zeroes(start, length, zero, false)
            .await
            .unwrap();
        volume
            .trim(40 * BLOCK_BYTES, 8 * BLOCK_BYTES, false)
            .await
            .unwrap();
        volume.flush().await.unwrap();

        let back = volume.read(0, 64 * BLOCK_BYTES as usize).await.unwrap();
        let file_bytes = head_file_bytes(&volume, 0, 64 * BLOCK_BYTES);
        for (block, what) in [
            (0, "before"),
            (8, "zeroed"),
            (24, "between"),
            (40, "trimmed"),
            (48, "after"),
        ] {
            let at = block * BLOCK_BYTES as usize;
            let zeroed = matches!(what, "zeroed" | "trimmed");
            let want = if zeroed { 0 } else { 1 };
            assert!(
                back[at..at + 4096].iter().all(|&b| b == want),
                "{what} reads"
            );
            assert!(
                file_bytes[at..at + 4096].iter().all(|&b| b == want),
                "{what} in the head's file"
            );
        }
    }

    /// A snapshot's export made by a freeze takes clients only once the writes in flight on
    /// the head it froze have landed in its layer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_snapshots_export_settles_once_the_writes_in_flight_on_its_layer_are_done() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, volume) = volume_of_ones(dir.path(), None, 16 * BLOCK_BYTES).await;
        let entry = registry.entry("v").unwrap();
        // A write of the current epoch, in flight until the guard is dropped.
        let (_chain, in_flight) = volume.chain_for_write();
        let snapshot = {
            let entry = Arc::clone(&entry);
            tokio::spawn(async move { entry.create_snapshot("s").await })
        };
        let view = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(view) = registry.get("v@s") {
                    break view;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the snapshot's export appears");
        let settled = tokio::time::timeout(Duration::from_millis(100), view.settled()).await;
        assert!(
            settled.is_err(),
            "settled with a write still landing in its layer"
        );
        drop(in_flight);
        tokio::time::timeout(Duration::from_secs(5), view.settled())
            .await
            .expect("settled once the write was done");
        snapshot.await.unwrap().unwrap();
        // Settled for good: later attaches do not wait.
        tokio::time::timeout(Duration::from_millis(100), view.settled())
            .await
            .unwrap();
    }

    /// A partial write after a snapshot, to a block the new head lacks, waits for the writes of
    /// the epoch before the snapshot. It must not hold its block's stripe meanwhile: one of
    /// those writes (a trim, an unaligned write past its first await) may need the stripe to
    /// finish, and the snapshot, the partial write and that write would wait on each other.
    #[test]
    fn a_partial_write_waits_for_the_earlier_epoch_without_holding_its_stripe() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (registry, volume) = volume_of_ones(dir.path(), None, 16 * BLOCK_BYTES).await;
            let entry = registry.entry("v").unwrap();
            // A write of the current epoch, in flight until the guard is dropped.
            let (_chain, earlier_write) = volume.chain_for_write();
            let old_head = Arc::clone(volume.chain().top());
            let snapshot = tokio::spawn(async move { entry.create_snapshot("s").await });
            let swapped = async {
                while Arc::ptr_eq(volume.chain().top(), &old_head) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(5), swapped)
                .await
                .expect("the snapshot swaps in a new head");
            let partial = {
                let volume = Arc::clone(&volume);
                tokio::spawn(async move {
                    volume
                        .write(7 * BLOCK_BYTES + 512, Bytes::from(vec![9u8; 512]), false)
                        .await
                })
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                !partial.is_finished(),
                "the partial write waits for the earlier epoch"
            );
            // The earlier write needs the partial write's stripe to finish.
            let writer = volume.writer().unwrap();
            let stripe = tokio::time::timeout(Duration::from_secs(2), writer.stripes.lock(7, 8))
                .await
                .expect("the stripe is held by a write waiting for the epoch this one is in");
            drop(stripe);
            drop(earlier_write);
            tokio::time::timeout(Duration::from_secs(5), partial)
                .await
                .expect("the partial write ends once the earlier epoch drained")
                .unwrap()
                .unwrap();
            tokio::time::timeout(Duration::from_secs(5), snapshot)
                .await
                .expect("the snapshot ends")
                .unwrap()
                .unwrap();
            let mut expected = vec![1u8; BLOCK_BYTES as usize];
            expected[512..1024].fill(9);
            let block = volume
                .read(7 * BLOCK_BYTES, BLOCK_BYTES as usize)
                .await
                .unwrap();
            assert_eq!(&block[..], &expected[..]);
            let view = registry.get("v@s").unwrap();
            let before = view
                .read(7 * BLOCK_BYTES, BLOCK_BYTES as usize)
                .await
                .unwrap();
            assert!(
                before.iter().all(|&b| b == 1),
                "the snapshot holds the block as it was"
            );
        });
    }

    /// Pruning's wait for reads below the head: a read (or a reply sent from the file) that
    /// resolved its blocks in the chain before the call holds it off until done; reads that
    /// start after it do not.
    #[tokio::test]
    async fn readers_done_waits_for_reads_resolved_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let registry = Registry::open(dir.path(), engine).unwrap();
        let volume = registry.create("v", 16 * BLOCK_BYTES).unwrap();
        assert!(volume.readers_done(Duration::from_millis(50)).await);
        let in_flight = volume.chain();
        assert!(
            !volume.readers_done(Duration::from_millis(50)).await,
            "a read resolved before the call was not waited for"
        );
        // The chain held across the call was swapped out by it; a read starting now holds
        // the new one, which the next call swaps out in turn.
        drop(in_flight);
        let later = volume.chain();
        let waited = {
            let volume = Arc::clone(&volume);
            tokio::spawn(async move { volume.readers_done(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waited.is_finished(), "a read in flight was not waited for");
        drop(later);
        assert!(waited.await.unwrap());

        // A read holding a chain that an earlier swap (a snapshot's, say) retired is waited
        // for too, however many swaps ago that was.
        let old = volume.chain();
        volume.set_chain(Chain::clone(&old));
        volume.set_chain(Chain::clone(&old));
        assert!(
            !volume.readers_done(Duration::from_millis(50)).await,
            "a read holding a chain two swaps old was not waited for"
        );
        drop(old);
        assert!(volume.readers_done(Duration::from_millis(50)).await);
    }

    /// Large writes copied on the caller's thread land as ordinary ones do: over blocks the
    /// head holds, over blocks only a snapshot below holds (the map is set), unaligned at both
    /// ends; the snapshot keeps what it had, and a restart finds the same bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_writes_here_land_like_ordinary_ones() {
        const MIB: usize = 1 << 20;
        for kind in [EngineKind::Uring, EngineKind::Threads] {
            let dir = tempfile::tempdir().unwrap();
            let engine = IoEngine::new(Some(kind), &EngineConfig::default()).unwrap();
            let registry = Registry::open(dir.path(), engine.clone()).unwrap();
            let volume = registry.create("v", 8 * MIB as u64).unwrap();
            let pattern = |len: usize, seed: u8| -> Vec<u8> {
                (0..len)
                    .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 12) as u8)
                    .collect()
            };
            let mut model = pattern(8 * MIB, 1);
            volume
                .write_here(0, Bytes::from(model.clone()), false)
                .await
                .unwrap();
            // Over blocks the head holds, whole blocks.
            let data = pattern(MIB + 4096, 2);
            volume
                .write_here(MIB as u64, Bytes::from(data.clone()), false)
                .await
                .unwrap();
            model[MIB..2 * MIB + 4096].copy_from_slice(&data);
            registry
                .entry("v")
                .unwrap()
                .create_snapshot("s")
                .await
                .unwrap();
            let before = model.clone();
            // Over blocks only the snapshot holds, unaligned at both ends.
            let (at, data) = (3 * MIB + 1000, pattern(2 * MIB + 777, 3));
            volume
                .write_here(at as u64, Bytes::from(data.clone()), false)
                .await
                .unwrap();
            model[at..at + data.len()].copy_from_slice(&data);
            // FUA: one whole write, durable.
            let (at, data) = (6 * MIB, pattern(MIB, 4));
            volume
                .write_here(at as u64, Bytes::from(data.clone()), true)
                .await
                .unwrap();
            model[at..at + data.len()].copy_from_slice(&data);
            let got = volume.read(0, 8 * MIB).await.unwrap();
            assert!(got[..] == model[..], "{kind}: the volume differs");
            let view = registry.get("v@s").unwrap();
            let got = view.read(0, 8 * MIB).await.unwrap();
            assert!(got[..] == before[..], "{kind}: the snapshot changed");
            volume.flush().await.unwrap();
            drop((volume, view, registry));
            let registry = Registry::open(dir.path(), engine).unwrap();
            let got = registry.get("v").unwrap().read(0, 8 * MIB).await.unwrap();
            assert!(got[..] == model[..], "{kind}: differs after a restart");
        }
    }
}
