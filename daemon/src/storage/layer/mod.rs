//! One copy-on-write layer: a sparse data file laid out at the volume's own offsets plus its
//! allocation map (`<id>.data` and `<id>.map` in the volume's folder). A layer is written only
//! while it is a volume's head; once frozen under a snapshot it is never written again except by
//! merges, which only ever add blocks that read the same through every view that contains it.

pub mod blockmap;
pub mod chain;
pub mod direct;
pub mod mapped;
mod open_files;
pub mod resident;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::error::StorageError;
use crate::io::IoEngine;

pub use blockmap::{blocks_for, BlockMap, BlockState, BLOCK_BYTES};

/// Pages of map (each 16,384 blocks, 64 MiB of volume) one sync settles at a time: a sync
/// over more goes in rounds, each syncing the data again first, which bounds what it holds.
const SETTLE_ROUND_PAGES: usize = 4096;

pub struct Layer {
    id: String,
    size_bytes: u64,
    data: Arc<File>,
    map_file: Arc<File>,
    map: BlockMap,
    /// The data file again with O_DIRECT, for restores; opened on first use.
    direct: direct::DirectFile,
    /// Cleared by a sync, set by anything that changes the data or the map.
    dirty: AtomicBool,
    /// Serialises syncs so a flush never returns while another flush's sync of the same layer
    /// is still running (it would otherwise see `dirty == false` too early).
    sync_lock: tokio::sync::Mutex<()>,
    /// A sync failed: the kernel reports a write-back error to one `fdatasync` only and then
    /// marks the pages clean, so a later sync would succeed over data that never reached the
    /// disk. Every later sync fails instead, for as long as the files stay open (shared with
    /// the instances a resize makes). Set by every sync of the layer's files, not only `sync`'s
    /// (a resize's, a merge's): whichever one the kernel tells.
    sync_failed: Arc<AtomicBool>,
    #[cfg(test)]
    fail_syncs_for_test: AtomicBool,
    /// The data file mapped shared, for payloads received in place; mapped on first use.
    mapped: mapped::MappedData,
    /// Counts this instance among the process's holders of the data file.
    open: open_files::OpenFile,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("id", &self.id)
            .field("size_bytes", &self.size_bytes)
            .finish()
    }
}

pub fn data_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.data"))
}

pub fn map_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.map"))
}

/// Makes `[offset_bytes, offset_bytes + length_bytes)` of `file` read as zeroes, freeing it
/// where the filesystem can punch holes and writing zero bytes where it cannot; the file keeps
/// its length either way.
fn zero_range(file: &File, offset_bytes: u64, length_bytes: u64) -> std::io::Result<()> {
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    match crate::io::fallocate_blocking(file, punch, offset_bytes, length_bytes) {
        Err(e) if crate::storage::volume::is_unsupported(&e) => {
            use std::os::unix::fs::FileExt;
            let zeroes = vec![0u8; length_bytes.min(1 << 20) as usize];
            let mut at = offset_bytes;
            let end = offset_bytes + length_bytes;
            while at < end {
                let n = (end - at).min(zeroes.len() as u64) as usize;
                file.write_all_at(&zeroes[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        other => other,
    }
}

fn open_rw(path: &Path, create: bool) -> Result<File, StorageError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path)
        .map_err(|e| StorageError::fs(if create { "create" } else { "open" }, path, e))
}

impl Layer {
    /// Creates an empty layer's two files, sized. Not fsynced: the manifest that names the layer
    /// is written afterwards with an fsync of the folder, which makes the new names durable, and
    /// a file whose length was lost in a crash is grown back by [`Layer::open`]. O(1) whatever
    /// the size (both files are sparse and the new map is known to be empty).
    pub fn create(dir: &Path, id: &str, size_bytes: u64) -> Result<Layer, StorageError> {
        let data_path = data_path(dir, id);
        let map_path = map_path(dir, id);
        let data = open_rw(&data_path, true)?;
        data.set_len(size_bytes)
            .map_err(|e| StorageError::fs("size", &data_path, e))?;
        let map_file = open_rw(&map_path, true)?;
        crate::storage::holes::no_copy_on_write(&map_file, &map_path);
        map_file
            .set_len(blockmap::map_file_bytes(blocks_for(size_bytes)))
            .map_err(|e| StorageError::fs("size", &map_path, e))?;
        Layer::from_files(id, size_bytes, data, map_file, &map_path, true)
    }

    /// Opens an existing layer, growing its files if a crash left them short (a short data file
    /// only lacks trailing zeroes; a short map only lacks absent blocks).
    pub fn open(dir: &Path, id: &str, size_bytes: u64) -> Result<Layer, StorageError> {
        let data_path = data_path(dir, id);
        let map_path = map_path(dir, id);
        let data = open_rw(&data_path, false)?;
        let map_file = open_rw(&map_path, false)?;
        let map_bytes = blockmap::map_file_bytes(blocks_for(size_bytes));
        let len = |f: &File, p: &Path| {
            f.metadata()
                .map(|m| m.len())
                .map_err(|e| StorageError::fs("stat", p, e))
        };
        if len(&data, &data_path)? < size_bytes {
            data.set_len(size_bytes)
                .map_err(|e| StorageError::fs("size", &data_path, e))?;
        }
        if len(&map_file, &map_path)? < map_bytes {
            map_file
                .set_len(map_bytes)
                .map_err(|e| StorageError::fs("size", &map_path, e))?;
        }
        let layer = Layer::from_files(id, size_bytes, data, map_file, &map_path, false)?;
        layer.resolve_written(&data_path);
        Ok(layer)
    }

    /// After an open: blocks still "written" (the daemon or the machine went down before a
    /// sync settled them) stay so if the data file holds their bytes (the next FLUSH settles
    /// them: the layer starts dirty) and are absent again if not (see
    /// `blockmap/written.rs`). Never fails the open: what cannot be checked is kept as data.
    fn resolve_written(&self, data_path: &Path) {
        if !self.map.has_written() {
            return;
        }
        if !crate::storage::holes::hole_means_unwritten(&self.data) {
            tracing::info!(layer = %self.id, "a hole here may not mean bytes never written (ZFS stores zeroes as holes, or the filesystem could not be asked): blocks written before a stop are kept as data");
            return;
        }
        match self.map.resolve_written(&self.data) {
            Ok((_, 0)) => {}
            Ok((written_blocks, lost_blocks)) => {
                tracing::warn!(layer = %self.id, written_bytes = written_blocks * BLOCK_BYTES, lost_bytes = lost_blocks * BLOCK_BYTES, "blocks written before a crash lost their bytes with it; they read from the layers below again");
            }
            Err(error) => {
                tracing::warn!(layer = %self.id, path = %data_path.display(), %error, "cannot tell which blocks written before a stop have bytes; keeping them all as data");
            }
        }
    }

    /// After a load that follows anything but a clean stop (see `storage/clean_stop.rs`), on
    /// the head before anything writes it: punches the bytes its data file holds under blocks
    /// that are not data (absent, or zero), so that a block marked "written" later and cut
    /// short by a crash is a hole again, not the bytes of an earlier write that never counted.
    /// The walk follows the file's data ranges, not its blocks. Returns the bytes punched.
    pub fn punch_unmapped(&self) -> std::io::Result<u64> {
        /// Blocks whose runs are listed at once (a data range can span the whole file, when
        /// the filesystem cannot tell data from holes).
        const WINDOW_BLOCKS: u64 = 1 << 18;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let end_bytes = self.map.blocks() * BLOCK_BYTES;
        let mut punched_bytes = 0;
        let mut at = 0;
        while let Some((from, to)) = crate::storage::holes::next_data(&self.data, at, end_bytes)? {
            at = to;
            let mut window = from / BLOCK_BYTES;
            let last = to.div_ceil(BLOCK_BYTES);
            while window < last {
                let window_end = window.saturating_add(WINDOW_BLOCKS).min(last);
                let runs = self.map.present_runs(window, window_end);
                let data_runs = runs.iter().filter(|r| r.2 == BlockState::Data);
                let mut block = window;
                for (start, end) in data_runs
                    .map(|r| (r.0, r.1))
                    .chain([(window_end, window_end)])
                {
                    if block < start {
                        let (offset, length) = (block * BLOCK_BYTES, (start - block) * BLOCK_BYTES);
                        crate::io::fallocate_blocking(&self.data, punch, offset, length)?;
                        punched_bytes += length;
                    }
                    block = block.max(end);
                }
                window = window_end;
            }
        }
        // Durable before anything writes the head: a block written and marked after this,
        // then cut short by a crash, must find the hole, not the punch undone. A failure here
        // is one the first FLUSH must report (the kernel tells it once).
        if punched_bytes > 0 {
            self.noted(self.data.sync_all())?;
        }
        Ok(punched_bytes)
    }

    fn from_files(
        id: &str,
        size_bytes: u64,
        data: File,
        map_file: File,
        map_path: &Path,
        empty: bool,
    ) -> Result<Layer, StorageError> {
        let map = BlockMap::open(&map_file, blocks_for(size_bytes), empty)
            .map_err(|e| StorageError::fs("map", map_path, e))?;
        // Written blocks an earlier instance or run left wait for a sync to settle them.
        let starts_dirty = !empty && map.has_written();
        let open = open_files::OpenFile::of(&data)
            .map_err(|e| StorageError::fs("stat", map_path.with_extension("data"), e))?;
        Ok(Layer {
            id: id.to_owned(),
            size_bytes,
            data: Arc::new(data),
            map_file: Arc::new(map_file),
            map,
            direct: direct::DirectFile::default(),
            dirty: AtomicBool::new(starts_dirty),
            sync_lock: tokio::sync::Mutex::new(()),
            sync_failed: Arc::new(AtomicBool::new(false)),
            #[cfg(test)]
            fail_syncs_for_test: AtomicBool::new(false),
            mapped: mapped::MappedData::default(),
            open,
        })
    }

    /// The same layer grown to `size_bytes`, its map mapped anew. Whatever lies past the old
    /// end in either file is dropped first, so the new blocks read as absent: a shrink leaves
    /// its map file at the old length (an instance may still map it) with the tail marked
    /// absent, and an interrupted one (its cut runs after the manifest, see
    /// [`Layer::cut_tail`]) may leave old states and data there. The caller
    /// makes sure nothing writes the old instance any more (resize holds the write gate) and
    /// syncs the map before the manifest names the new size.
    pub fn grown(&self, dir: &Path, size_bytes: u64) -> Result<Layer, StorageError> {
        debug_assert!(size_bytes > self.size_bytes);
        let data_path = data_path(dir, &self.id);
        let map_path = map_path(dir, &self.id);
        let resize_error = |e| self.resize_error(size_bytes, e);
        let len = |f: &File, p: &Path| {
            f.metadata()
                .map(|m| m.len())
                .map_err(|e| StorageError::fs("stat", p, e))
        };
        if len(&self.data, &data_path)? > self.size_bytes {
            self.data.set_len(self.size_bytes).map_err(resize_error)?;
        }
        let old_map_bytes = blockmap::map_file_bytes(self.map.blocks());
        let map_file_bytes = len(&self.map_file, &map_path)?;
        if map_file_bytes > old_map_bytes {
            // Zeroed, not truncated: an older instance may still map those bytes.
            zero_range(
                &self.map_file,
                old_map_bytes,
                map_file_bytes - old_map_bytes,
            )
            .map_err(|e| StorageError::fs("zero", &map_path, e))?;
        }
        self.data
            .set_len(size_bytes)
            .and_then(|()| self.noted(self.data.sync_all()))
            .map_err(resize_error)?;
        let map_bytes = blockmap::map_file_bytes(blocks_for(size_bytes));
        if map_bytes > map_file_bytes {
            self.map_file
                .set_len(map_bytes)
                .map_err(|e| StorageError::fs("size", &map_path, e))?;
        }
        self.noted(self.map_file.sync_all())
            .map_err(|e| StorageError::fs("fsync", &map_path, e))?;
        let grown = self.reopened(dir, size_bytes)?;
        // The old last word's states past the old end (an interrupted cut's) are the new
        // instance's first blocks: cleared like the words after it.
        let old_blocks = self.map.blocks();
        grown.set_range(
            old_blocks,
            old_blocks.next_multiple_of(blockmap::BLOCKS_PER_WORD),
            BlockState::Absent,
        )?;
        Ok(grown)
    }

    /// The same layer seen at `size_bytes` (its files untouched): a shrink commits the new
    /// size with it before anything is cut, so a failure before the commit loses nothing.
    pub fn reopened(&self, dir: &Path, size_bytes: u64) -> Result<Layer, StorageError> {
        let data_path = data_path(dir, &self.id);
        let map_path = map_path(dir, &self.id);
        let data = self
            .data
            .try_clone()
            .map_err(|e| StorageError::fs("dup", &data_path, e))?;
        let map_file = self
            .map_file
            .try_clone()
            .map_err(|e| StorageError::fs("dup", &map_path, e))?;
        let mut layer = Layer::from_files(&self.id, size_bytes, data, map_file, &map_path, false)?;
        layer.sync_failed = Arc::clone(&self.sync_failed);
        Ok(layer)
    }

    /// Cuts this (old, larger) instance's tail from `size_bytes` on, once a manifest with that
    /// size is durable: its blocks are marked absent, so growing again later finds none, and
    /// the data file loses its bytes. A failure here only leaves the files longer than the
    /// volume; [`Layer::grown`] drops such leftovers.
    pub fn cut_tail(&self, size_bytes: u64) -> Result<(), StorageError> {
        self.set_range(
            blocks_for(size_bytes),
            self.map.blocks(),
            BlockState::Absent,
        )?;
        self.sync_map_blocking()?;
        self.data
            .set_len(size_bytes)
            .and_then(|()| self.noted(self.data.sync_all()))
            .map_err(|e| self.resize_error(size_bytes, e))
    }

    fn resize_error(&self, size_bytes: u64, source: std::io::Error) -> StorageError {
        StorageError::Resize {
            name: self.id.clone(),
            size_bytes,
            source,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn blocks(&self) -> u64 {
        self.map.blocks()
    }

    pub fn map(&self) -> &BlockMap {
        &self.map
    }

    pub fn data(&self) -> &Arc<File> {
        &self.data
    }

    /// Where `offset_bytes..offset_bytes + length_bytes` of the data file sits in its shared
    /// mapping; `None` when the file cannot be mapped or the range leaves it. Only the kernel
    /// may copy into it (see `mapped`).
    pub fn mapped_range(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Option<mapped::MappedRange> {
        self.mapped
            .range(&self.data, self.size_bytes, offset_bytes, length_bytes)
    }

    /// `mapped_range` for a read, which counts against the mapping's touch budget only once
    /// `charge_mapped` says it will be sent from there.
    pub fn mapped_range_uncharged(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Option<mapped::MappedRange> {
        self.mapped
            .range_uncharged(&self.data, self.size_bytes, offset_bytes, length_bytes)
    }

    pub fn charge_mapped(&self, offset_bytes: u64, length_bytes: u64) {
        self.mapped.charge(offset_bytes, length_bytes);
    }

    /// Lets the data file's mapping go, for a layer that is no longer a volume's head (it is
    /// mapped again if it ever is).
    pub fn release_mapping(&self) {
        self.mapped.release();
    }

    #[cfg(test)]
    pub fn is_mapped(&self) -> bool {
        self.mapped.is_mapped()
    }

    /// Writes `data` to the data file bypassing the page cache; `None` when it has to go
    /// through the page cache instead (unaligned, or O_DIRECT refused on this filesystem).
    /// Like any data write, the caller marks the layer dirty afterwards.
    pub async fn write_direct(
        &self,
        engine: &IoEngine,
        offset_bytes: u64,
        data: &Bytes,
    ) -> Option<std::io::Result<()>> {
        self.direct
            .write(engine, &self.data, &self.id, offset_bytes, data)
            .await
    }

    /// Whether bulk writes have used (and may still use) O_DIRECT on this layer.
    #[cfg(test)]
    pub fn direct_in_use(&self) -> bool {
        self.direct.is_open() && !self.direct.is_refused()
    }

    /// Makes later `write_direct` calls answer `None`, as when the filesystem refuses.
    #[cfg(test)]
    pub fn refuse_direct(&self) {
        let refused = std::io::Error::from_raw_os_error(libc::EINVAL);
        self.direct.refuse(&self.id, &refused);
    }

    pub fn state(&self, block: u64) -> BlockState {
        self.map.state(block)
    }

    /// Changes the map; dirty is marked after the change, so a flush that finds the layer
    /// clean never misses it. Fails, changing nothing, when the map file has no room for the
    /// change (see [`BlockMap::ensure_backed`]). Marking blocks absent never needs room: absent
    /// is all-zero bits, so it stores only into words already holding others, whose pages
    /// were stored into, and so allocated, before; a hole stays untouched.
    pub fn set_range(&self, start: u64, end: u64, state: BlockState) -> Result<(), StorageError> {
        if state != BlockState::Absent {
            self.ensure_backed(start, end)?;
        }
        self.map.set_range(start, end, state);
        self.mark_dirty();
        Ok(())
    }

    /// Marks blocks `[start, end)` as holding bytes just written. In a layer with layers
    /// below it (`over_layers`), blocks it did not hold become "written" until a sync has their
    /// bytes durable (see `blockmap/written.rs`); in a bottom layer a lost block reads as the
    /// zeroes it was before, so they are plain data at once. Fails as [`Layer::set_range`].
    pub fn mark_written(
        &self,
        start: u64,
        end: u64,
        over_layers: bool,
    ) -> Result<(), StorageError> {
        if !over_layers {
            return self.set_range(start, end, BlockState::Data);
        }
        self.ensure_backed(start, end)?;
        self.map.set_written(start, end);
        self.mark_dirty();
        Ok(())
    }

    fn ensure_backed(&self, start: u64, end: u64) -> Result<(), StorageError> {
        self.map
            .ensure_backed(&self.map_file, start, end)
            .map_err(|e| {
                StorageError::io(
                    "make room in the block map",
                    start.saturating_mul(BLOCK_BYTES),
                    end.saturating_sub(start).saturating_mul(BLOCK_BYTES),
                    e,
                )
            })
    }

    /// Whether something changed since the last sync.
    #[cfg(test)]
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Called after a data write completes (never before: a concurrent flush could clear the
    /// flag and sync before the bytes are there).
    pub fn mark_dirty(&self) {
        if !self.dirty.load(Ordering::Relaxed) {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Whether only this volume links the layer's files (clones hard-link frozen layers), and
    /// no other `Layer` of the process holds them (a volume that dropped its link may still
    /// be reading through its own: see `open_files`). Only then may the files be rewritten in
    /// place; until then a compaction merges up instead of copying down, or leaves a prune to
    /// the next snapshot delete, rollback or start.
    pub fn is_exclusive(&self) -> bool {
        self.data
            .metadata()
            .map(|m| m.nlink() == 1)
            .unwrap_or(false)
            && self.open.alone()
    }

    /// Makes a new layer's files durable, their lengths included, before a durable manifest
    /// names them. Blocking; cheap on a new layer (nothing written yet).
    pub fn sync_created(&self) -> Result<(), StorageError> {
        self.data
            .sync_all()
            .and_then(|()| self.map_file.sync_all())
            .map_err(|e| StorageError::io("fsync new layer", 0, self.size_bytes, e))
    }

    /// Makes the map's changes durable (its data untouched). Blocking.
    pub fn sync_map_blocking(&self) -> Result<(), StorageError> {
        self.noted(self.map_file.sync_data())
            .map_err(|e| StorageError::io("flush map", 0, self.size_bytes, e))
    }

    /// Makes the data file's bytes durable (not the map, which its caller settles after): for
    /// a merge that copied blocks in. A failure fails every later `sync` (see `sync_failed`).
    pub async fn sync_data(&self, engine: &IoEngine) -> Result<(), StorageError> {
        let synced = self.fdatasync_noted(engine, &self.data).await;
        self.noted(synced)
            .map_err(|e| StorageError::io("merge sync", 0, self.size_bytes, e))
    }

    /// `fdatasync` of one of the layer's files on a task of its own, which records a failure
    /// in `sync_failed` itself: a caller that stops waiting (its future dropped midway) must
    /// not lose the kernel's one report of a write-back error, or the next sync would succeed
    /// over lost data.
    async fn fdatasync_noted(&self, engine: &IoEngine, file: &Arc<File>) -> std::io::Result<()> {
        let (engine, file) = (engine.clone(), Arc::clone(file));
        let (failed, id) = (Arc::clone(&self.sync_failed), self.id.clone());
        let task = tokio::spawn(async move {
            let synced = engine.fdatasync(&file).await;
            if let Err(error) = &synced {
                remember_sync_failure(&failed, &id, error);
            }
            synced
        });
        task.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// Passes on the result of a sync of this layer's files done outside `sync`, remembering a
    /// failure so that every later `sync` fails too (see `sync_failed`).
    fn noted(&self, synced: std::io::Result<()>) -> std::io::Result<()> {
        #[cfg(test)]
        let synced = match self.fail_syncs_for_test.load(Ordering::Acquire) {
            true => synced.and(Err(std::io::Error::from_raw_os_error(libc::EIO))),
            false => synced,
        };
        if let Err(error) = &synced {
            self.remember_sync_failure(error);
        }
        synced
    }

    fn remember_sync_failure(&self, error: &dyn std::fmt::Display) {
        remember_sync_failure(&self.sync_failed, &self.id, error);
    }

    /// Makes every change made before the call durable: data first, then the map.
    /// Once one has failed, every later one fails too (see `sync_failed`).
    pub async fn sync(&self, engine: &IoEngine) -> Result<(), StorageError> {
        let _serial = self.sync_lock.lock().await;
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(StorageError::io(
                "flush after an earlier flush failed",
                0,
                self.size_bytes,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        // Dirty again unless this sync ends well: a failed one, or one whose future is dropped
        // midway, must not let the next flush find the layer clean.
        let mut redirty = RedirtyOnDrop(Some(&self.dirty));
        let result = async {
            #[cfg(test)]
            if self.fail_syncs_for_test.load(Ordering::Acquire) {
                return Err(StorageError::io(
                    "flush",
                    0,
                    self.size_bytes,
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            let mut from_page = 0;
            loop {
                // Noted before the data sync, settled after it: see `BlockMap::take_written`.
                let written = self.map.take_written(from_page, SETTLE_ROUND_PAGES);
                self.fdatasync_noted(engine, &self.data)
                    .await
                    .map_err(|e| StorageError::io("flush", 0, self.size_bytes, e))?;
                let next_page = written.next_page();
                written.settle();
                match next_page {
                    Some(page) => from_page = page,
                    None => break,
                }
            }
            self.fdatasync_noted(engine, &self.map_file)
                .await
                .map_err(|e| StorageError::io("flush map", 0, self.size_bytes, e))
        }
        .await;
        if result.is_ok() {
            redirty.0 = None;
        }
        drop(redirty);
        if let Err(error) = &result {
            self.remember_sync_failure(error);
        }
        result
    }

    #[cfg(test)]
    pub fn fail_syncs_for_test(&self, fail: bool) {
        self.fail_syncs_for_test.store(fail, Ordering::Release);
    }
}

/// Marks layer `id`'s syncs failed for good (see `Layer::sync_failed`), logging the first time.
fn remember_sync_failure(failed: &AtomicBool, id: &str, error: &dyn std::fmt::Display) {
    if !failed.swap(true, Ordering::AcqRel) {
        tracing::error!(layer = %id, %error, "a layer's flush failed: data written since the last good flush may not be on disk, and every later flush of it fails until the daemon restarts");
    }
}

/// Sets a layer's dirty flag again when dropped still armed.
struct RedirtyOnDrop<'a>(Option<&'a AtomicBool>);

impl Drop for RedirtyOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(dirty) = self.0 {
            dirty.store(true, Ordering::Release);
        }
    }
}

/// A fresh random layer id (16 hex digits).
pub fn new_layer_id() -> Result<String, StorageError> {
    let uuid = crate::storage::manifest::new_uuid()?;
    Ok(uuid.replace('-', "")[..16].to_owned())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::map_path;
    use crate::io::{EngineConfig, EngineKind, IoEngine};
    use crate::storage::Registry;

    /// A registry in a temp dir with one 1 MiB volume "v", on the threads engine.
    fn one_volume() -> (
        tempfile::TempDir,
        IoEngine,
        Registry,
        std::sync::Arc<crate::storage::Volume>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let registry = Registry::open(dir.path(), engine.clone()).unwrap();
        let volume = registry.create("v", 1 << 20).unwrap();
        (dir, engine, registry, volume)
    }

    /// `one_volume` with blocks 0-3 written with 1s, flushed, and snapshot "s" taken.
    async fn one_volume_over_a_snapshot() -> (
        tempfile::TempDir,
        IoEngine,
        Registry,
        std::sync::Arc<crate::storage::Volume>,
    ) {
        let (dir, engine, registry, volume) = one_volume();
        volume
            .write(0, Bytes::from(vec![1u8; 4 * 4096]), false)
            .await
            .unwrap();
        volume.flush().await.unwrap();
        let entry = registry.entry("v").unwrap();
        entry.create_snapshot("s").await.unwrap();
        (dir, engine, registry, volume)
    }

    /// A layer file another `Layer` of the process still holds (a volume that dropped its link
    /// to a file a clone shares, with a reply still reading it) is not exclusive, even with one
    /// link left: rewriting it in place would change what that reply sends.
    #[test]
    fn a_layer_another_instance_holds_is_not_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let layer = super::Layer::create(dir.path(), "l1", 1 << 20).unwrap();
        assert!(layer.is_exclusive());
        let other = super::Layer::open(dir.path(), "l1", 1 << 20).unwrap();
        assert!(!layer.is_exclusive() && !other.is_exclusive());
        drop(other);
        assert!(layer.is_exclusive());
        // A second link (a clone's) is not exclusive either, held or not.
        std::fs::hard_link(
            super::data_path(dir.path(), "l1"),
            dir.path().join("clone.data"),
        )
        .unwrap();
        assert!(!layer.is_exclusive());
    }

    /// A power loss can take a block's bytes and leave the map page that marks it (the kernel
    /// writes them back in any order). A head block over a snapshot must then read what the
    /// snapshot holds, not the zeroes of the hole its bytes left.
    #[tokio::test]
    async fn a_written_block_whose_bytes_were_lost_reads_from_the_layer_below() {
        let (dir, engine, registry, volume) = one_volume_over_a_snapshot().await;
        volume
            .write(4096, Bytes::from(vec![2u8; 2 * 4096]), false)
            .await
            .unwrap();
        let head = std::sync::Arc::clone(volume.chain().top());
        let volume_dir = dir.path().join("volumes").join("v");
        let map_file = map_path(&volume_dir, head.id());
        // Block `b`'s two bits in the map file, as a power loss could leave them.
        let on_disk = |b: u64| {
            let bytes = std::fs::read(&map_file).unwrap();
            (u64::from_ne_bytes(bytes[..8].try_into().unwrap()) >> (b * 2)) & 3
        };
        assert_eq!([on_disk(1), on_disk(2)], [3, 3], "written, not yet synced");
        // Block 1's bytes never reached the disk; block 2's did.
        let data = std::fs::OpenOptions::new()
            .write(true)
            .open(super::data_path(&volume_dir, head.id()))
            .unwrap();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        crate::io::fallocate_blocking(&data, punch, 4096, 4096).unwrap();
        drop((volume, head, registry));
        let registry = Registry::open(dir.path(), engine).unwrap();
        let volume = registry.get("v").unwrap();
        let got = volume.read(0, 4 * 4096).await.unwrap();
        let blocks: Vec<u8> = got.chunks(4096).map(|b| b[0]).collect();
        assert_eq!(blocks, [1, 1, 2, 1], "block 1 from the snapshot again");
        // The survivor stays written until a flush settles it (the layer starts dirty).
        assert_eq!([on_disk(1), on_disk(2)], [0, 3]);
        volume.flush().await.unwrap();
        assert_eq!([on_disk(1), on_disk(2)], [0, 1]);
        // And a flush settles blocks written since.
        volume
            .write(3 * 4096, Bytes::from(vec![3u8; 4096]), false)
            .await
            .unwrap();
        assert_eq!(on_disk(3), 3);
        volume.flush().await.unwrap();
        assert_eq!(on_disk(3), 1);
    }

    /// A write killed between its bytes and its map entry leaves bytes under a head block the
    /// map calls absent (it reads from the snapshot, as it should). Written again, marked
    /// "written", and its new bytes lost in a second crash, the block must read from the
    /// snapshot again, not as the first write's bytes, which never counted.
    #[tokio::test]
    async fn bytes_a_crash_left_under_an_absent_block_do_not_come_back_after_a_second_crash() {
        use std::os::unix::fs::FileExt;
        let (dir, engine, registry, volume) = one_volume_over_a_snapshot().await;
        let entry = registry.entry("v").unwrap();
        let head_id = volume.chain().top().id().to_owned();
        let data_file = super::data_path(&dir.path().join("volumes").join("v"), &head_id);
        let file = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&data_file)
                .unwrap()
        };
        // First crash: block 1's bytes reached the head's file, its map entry did not.
        file().write_all_at(&[9u8; 4096], 4096).unwrap();
        drop((volume, entry, registry));
        let registry = Registry::open(dir.path(), engine.clone()).unwrap();
        let volume = registry.get("v").unwrap();
        assert_eq!(
            volume.read(4096, 4096).await.unwrap()[0],
            1,
            "from the snapshot"
        );
        assert_eq!(
            crate::storage::holes::next_data(&file(), 4096, 8192).unwrap(),
            None,
            "the bytes no map entry names are punched at the load after the crash"
        );
        volume
            .write(4096, Bytes::from(vec![2u8; 4096]), false)
            .await
            .unwrap();
        // Second crash: the map page marking block 1 "written" reached the disk, its bytes did
        // not, and the file holds there what it held before this write: a hole.
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        crate::io::fallocate_blocking(&file(), punch, 4096, 4096).unwrap();
        drop((volume, registry));
        let registry = Registry::open(dir.path(), engine).unwrap();
        let volume = registry.get("v").unwrap();
        let got = volume.read(0, 4 * 4096).await.unwrap();
        let blocks: Vec<u8> = got.chunks(4096).map(|b| b[0]).collect();
        assert_eq!(
            blocks,
            [1, 1, 1, 1],
            "block 1 from the snapshot, not the first write"
        );
    }

    /// A change that failed midway may have left bytes under blocks the map does not call
    /// data: the shutdown then leaves no marker, and the next load walks the head.
    #[tokio::test]
    async fn a_change_that_failed_midway_leaves_no_clean_stop_marker() {
        let (dir, engine, registry, volume) = one_volume();
        engine.fail_fallocate_for_test(libc::FALLOC_FL_ZERO_RANGE, libc::EIO);
        let no_hole = crate::storage::volume::ZeroMode {
            may_trim: false,
            fast_only: false,
        };
        let zeroed = volume.write_zeroes(0, 8 * 4096, no_hole, false).await;
        assert!(zeroed.is_err(), "the zero range fails: {zeroed:?}");
        registry.stop_all().await.unwrap();
        let marker = dir.path().join("volumes").join("v").join("clean-stop");
        assert!(!marker.exists(), "no clean stop after a failed change");
        // A run whose changes all succeeded leaves it.
        drop((volume, registry));
        let registry = Registry::open(
            dir.path(),
            IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap(),
        )
        .unwrap();
        registry.stop_all().await.unwrap();
        assert!(marker.exists());
    }

    /// The shutdown leaves the marker only with the volume's writes held off for good, and the
    /// next load takes it away before anything can write (a crash in that run is no clean
    /// stop). A load after a clean stop does not walk the head.
    #[tokio::test]
    async fn a_clean_stop_is_marked_once_writes_are_held_off_and_taken_at_the_next_load() {
        use std::os::unix::fs::FileExt;
        let (dir, engine, registry, volume) = one_volume();
        volume
            .write(0, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
        let volume_dir = dir.path().join("volumes").join("v");
        let marker = volume_dir.join("clean-stop");
        registry.stop_all().await.unwrap();
        assert!(marker.exists());
        let late_write = volume.write(4096, Bytes::from(vec![2u8; 4096]), false);
        let late = tokio::time::timeout(std::time::Duration::from_millis(200), late_write).await;
        assert!(late.is_err(), "a write after the clean stop is held off");
        // Bytes under an absent block after a clean stop can only be a test's: they stay.
        let head_id = volume.chain().top().id().to_owned();
        let data_file = super::data_path(&volume_dir, &head_id);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&data_file)
            .unwrap();
        file.write_all_at(&[9u8; 4096], 8192).unwrap();
        drop((volume, registry));
        let registry = Registry::open(dir.path(), engine.clone()).unwrap();
        assert!(!marker.exists(), "taken by the load");
        assert!(crate::storage::holes::next_data(&file, 8192, 12288)
            .unwrap()
            .is_some());
        let volume = registry.get("v").unwrap();
        assert_eq!(volume.read(0, 4096).await.unwrap()[0], 1);
        // This run ends without a clean stop: the next load walks the head.
        drop((volume, registry));
        let _registry = Registry::open(dir.path(), engine).unwrap();
        assert!(crate::storage::holes::next_data(&file, 8192, 12288)
            .unwrap()
            .is_none());
    }

    /// A sync whose future is dropped midway leaves the layer dirty and its written blocks
    /// taken back: the next flush does the whole work.
    #[tokio::test]
    async fn a_sync_dropped_midway_leaves_everything_for_the_next() {
        use futures_util::FutureExt;
        let (_dir, engine, registry, volume) = one_volume();
        let entry = registry.entry("v").unwrap();
        entry.create_snapshot("s").await.unwrap();
        volume
            .write(0, Bytes::from(vec![2u8; 4096]), false)
            .await
            .unwrap();
        let head = std::sync::Arc::clone(volume.chain().top());
        assert!(head.is_dirty() && head.map().has_written());
        // Polled once (the fdatasync is on the engine's threads), then dropped.
        assert!(head.sync(&engine).now_or_never().is_none());
        assert!(head.is_dirty(), "dirty again");
        assert!(head.map().has_written(), "written blocks given back");
        volume.flush().await.unwrap();
        assert!(!head.is_dirty() && !head.map().has_written());
    }

    /// Writes a block of `byte` at 0 and gives back the head it landed in.
    async fn write_a_block(
        volume: &crate::storage::Volume,
        byte: u8,
    ) -> std::sync::Arc<super::Layer> {
        volume
            .write(0, Bytes::from(vec![byte; 4096]), false)
            .await
            .unwrap();
        std::sync::Arc::clone(volume.chain().top())
    }

    /// The next flush of `volume` fails with EIO, as every later one does.
    async fn assert_flushes_fail_for_good(volume: &crate::storage::Volume) {
        let failed = volume.flush().await.unwrap_err();
        assert_eq!(failed.to_errno(), evsd_proto::Errno::Io, "{failed}");
        assert!(
            failed.to_string().contains("earlier flush failed"),
            "{failed}"
        );
        // Even with nothing written since.
        assert!(volume.flush().await.is_err());
    }

    #[tokio::test]
    async fn once_a_flush_failed_every_later_flush_fails_too() {
        let (_dir, _engine, _registry, volume) = one_volume();
        write_a_block(&volume, 1).await;
        volume.flush().await.unwrap();
        let head = write_a_block(&volume, 2).await;
        head.fail_syncs_for_test(true);
        let failed = volume.flush().await.unwrap_err();
        assert_eq!(failed.to_errno(), evsd_proto::Errno::Io);
        // The kernel would report the write-back error once; the next fdatasync succeeds.
        head.fail_syncs_for_test(false);
        assert_flushes_fail_for_good(&volume).await;
    }

    /// A sync whose caller stopped waiting still records the failure it met: the kernel reports
    /// a write-back error to one `fdatasync` only.
    #[tokio::test]
    async fn a_failure_met_by_a_sync_dropped_midway_fails_the_next_flush() {
        use futures_util::FutureExt;
        let (_dir, engine, _registry, volume) = one_volume();
        let head = write_a_block(&volume, 1).await;
        engine.fail_syncs_after_for_test(Some(std::time::Duration::from_millis(20)));
        assert!(
            head.sync(&engine).now_or_never().is_none(),
            "waiting for the engine"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        engine.fail_syncs_after_for_test(None);
        assert_flushes_fail_for_good(&volume).await;
    }

    /// A merge's and a resize's syncs of the head's files take the kernel's one report of a
    /// write-back error as much as a flush's: a later flush must not succeed over it.
    #[tokio::test]
    async fn a_failed_merge_or_resize_sync_fails_every_later_flush() {
        let (_dir, engine, _registry, volume) = one_volume();
        let head = write_a_block(&volume, 1).await;
        head.fail_syncs_for_test(true);
        assert!(head.sync_data(&engine).await.is_err());
        head.fail_syncs_for_test(false);
        assert_flushes_fail_for_good(&volume).await;

        let (_dir, _engine, registry, volume) = one_volume();
        let head = write_a_block(&volume, 1).await;
        head.fail_syncs_for_test(true);
        let entry = registry.entry("v").unwrap();
        assert!(entry.resize(2 << 20, false).await.is_err());
        head.fail_syncs_for_test(false);
        assert_flushes_fail_for_good(&registry.get("v").unwrap()).await;
    }
}
