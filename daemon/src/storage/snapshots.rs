//! Snapshot operations on one volume: create (freeze the head), delete (merge layers to give
//! space back), rollback (a new head over the snapshot), and the merges behind them.
//!
//! Every change of the tree is made durable in the manifest before anyone can observe it.
//! A merge is recorded before it starts and is redone at the next start if interrupted: both
//! merge directions only ever write blocks that read the same through every view that can
//! reach them, so a half-done merge is as correct as a finished one.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use serde::Serialize;

use crate::error::StorageError;
use crate::storage::attachments::{CloseRefused, Closure};
use crate::storage::entry::VolumeEntry;
use crate::storage::group::{freeze_heads, FreezeMember};
use crate::storage::layer::{self, BlockState, Layer, BLOCK_BYTES};
use crate::storage::manifest::{LayerRecord, MergeRecord, SnapshotRecord, VolumeManifest};
use crate::storage::name::validate_snapshot_name;

/// Blocks copied per step of a merge (1 MiB): bounds its memory and how long it holds the
/// stripes of a live head.
const MERGE_STEP_BLOCKS: u64 = 256;
/// Data a merge copies into a survivor above the victim before it syncs it and marks it in the
/// survivor's map (see `copy_blocks`).
const FILL_SYNC_BYTES: u64 = 64 << 20;

/// Runs of blocks whose data a merge copied into a survivor above and whose map still says
/// absent.
#[derive(Default)]
struct Unmarked {
    runs: Vec<(u64, u64)>,
    blocks: u64,
}

/// Blocks of a layer whose present runs are listed at once: a layer fragmented by random
/// writes has about a run per block, so listing a whole 1 TiB layer took gigabytes.
const RUNS_WINDOW_BLOCKS: u64 = 1 << 18;

/// The present runs of `layer` in `start..end`, listed a window at a time (a run that crosses
/// a window's edge comes in two parts).
fn windowed_runs(
    layer: &Layer,
    start: u64,
    end: u64,
) -> impl Iterator<Item = (u64, u64, BlockState)> + '_ {
    (start..end)
        .step_by(RUNS_WINDOW_BLOCKS as usize)
        .flat_map(move |from| {
            let to = from.saturating_add(RUNS_WINDOW_BLOCKS).min(end);
            layer.map().present_runs(from, to)
        })
}

/// The runs of `start..end` that `layer` lacks (absent blocks).
fn absent_runs(layer: &Layer, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for block in start..end {
        if layer.state(block) == BlockState::Absent {
            match runs.last_mut() {
                Some(run) if run.1 == block => run.1 += 1,
                _ => runs.push((block, block + 1)),
            }
        }
    }
    runs
}

/// How long a forced rollback waits for disconnected clients to finish their requests: longer
/// than the 10 s a closing connection's untaken replies may wait, so a client that stopped
/// reading is let go before this ends.
const ROLLBACK_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long pruning waits for reads below the head to finish before it punches; a reply held
/// longer by a slow client stops pruning until the next compaction.
const PRUNE_READER_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    pub created_unix_secs: u64,
    pub size_bytes: u64,
    /// Bytes of data the snapshot's own layer holds.
    pub own_bytes: u64,
}

impl VolumeEntry {
    fn info(&self, record: &SnapshotRecord) -> SnapshotInfo {
        let state = self.lock();
        let layer = state.layers.get(&record.layer);
        SnapshotInfo {
            volume: self.name().to_owned(),
            name: record.name.clone(),
            created_unix_secs: record.created_unix_secs,
            size_bytes: layer.map_or(0, |l| l.size_bytes()),
            own_bytes: layer.map_or(0, |l| l.map().data_blocks() * BLOCK_BYTES),
        }
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let records = self.manifest().snapshots;
        records.iter().map(|r| self.info(r)).collect()
    }

    fn find_snapshot(&self, name: &str) -> Result<SnapshotRecord, StorageError> {
        self.manifest()
            .snapshot(name)
            .cloned()
            .ok_or_else(|| StorageError::SnapshotNotFound {
                volume: self.name().to_owned(),
                name: name.to_owned(),
            })
    }

    /// Freezes the head under a new snapshot. O(1): waits for writes in flight, starts an
    /// empty head above the old one, puts the new manifest in place. Returns before that
    /// manifest is durable (its fsyncs run in the background; the next FLUSH on the volume
    /// waits for them): a power loss right after may lose the snapshot, never flushed data.
    pub async fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo, StorageError> {
        self.create_snapshot_with(name, false).await
    }

    /// [`VolumeEntry::create_snapshot`], durable when it returns, with every write acknowledged
    /// before it: for callers that record the snapshot elsewhere right after and read it
    /// (backup jobs).
    pub async fn create_snapshot_durable(&self, name: &str) -> Result<SnapshotInfo, StorageError> {
        self.create_snapshot_with(name, true).await
    }

    async fn create_snapshot_with(
        &self,
        name: &str,
        durable: bool,
    ) -> Result<SnapshotInfo, StorageError> {
        validate_snapshot_name(name)?;
        // Not `lock_admin`: the persists of earlier creates may still run; this one's
        // supersedes them, and FLUSH waits for all.
        let _admin = self.admin.lock().await;
        self.check_present()?;
        self.check_whole()?;
        if self.manifest().snapshot(name).is_some() {
            return Err(StorageError::SnapshotExists {
                volume: self.name().to_owned(),
                name: name.to_owned(),
            });
        }
        let (hold_us, published) = freeze_heads(&[FreezeMember {
            entry: self,
            snapshot: Some(name),
        }])
        .await?;
        if durable {
            published.wait_durable().await?;
        }
        tracing::debug!(volume = self.name(), hold_us, durable, "head frozen");
        Ok(self.info(&self.find_snapshot(name)?))
    }

    /// Deletes a snapshot and merges away the layers nobody needs any more. Refused while
    /// clients read the snapshot's export.
    pub async fn delete_snapshot(&self, name: &str) -> Result<SnapshotInfo, StorageError> {
        let _admin = self.lock_admin().await?;
        let record = self.find_snapshot(name)?;
        let info = self.info(&record);
        if self.is_pinned(name) {
            return Err(StorageError::SnapshotInUse {
                volume: self.name().to_owned(),
                name: name.to_owned(),
            });
        }
        if let Some(view) = self.view(name) {
            view.attachments().close(false, Closure::Deletion).map_err(
                |refused| match refused {
                    CloseRefused::Busy(connections) => StorageError::Busy {
                        name: view.name().to_owned(),
                        connections,
                    },
                    CloseRefused::AlreadyClosed(_) => StorageError::SnapshotNotFound {
                        volume: self.name().to_owned(),
                        name: name.to_owned(),
                    },
                },
            )?;
        }
        {
            let mut state = self.lock();
            // Again under the state lock: a backup may have pinned it since (see pin_snapshot).
            if self.is_pinned(name) {
                if let Some(view) = state.views.get(name) {
                    view.attachments().reopen(Closure::Deletion);
                }
                return Err(StorageError::SnapshotInUse {
                    volume: self.name().to_owned(),
                    name: name.to_owned(),
                });
            }
            let mut next = state.manifest.clone();
            next.snapshots.retain(|s| s.name != name);
            if let Err(e) = self.commit(&mut state, next) {
                if let Some(view) = state.views.get(name) {
                    view.attachments().reopen(Closure::Deletion);
                }
                return Err(e);
            }
        }
        tracing::info!(volume = self.name(), snapshot = name, "deleted snapshot");
        self.compact_after_commit().await;
        Ok(info)
    }

    /// Makes the volume read as the snapshot: a new empty head over the snapshot's layer
    /// (O(1)); the old head goes, newer snapshots stay. Refused while clients are connected
    /// unless `force`, which disconnects them first.
    pub async fn rollback(&self, name: &str, force: bool) -> Result<(), StorageError> {
        let _admin = self.lock_admin().await?;
        let record = self.find_snapshot(name)?;
        let attachments = Arc::clone(self.volume.attachments());
        let disconnected = attachments
            .close(force, Closure::Rollback)
            .map_err(|refused| match refused {
                CloseRefused::Busy(connections) => StorageError::Busy {
                    name: self.name().to_owned(),
                    connections,
                },
                CloseRefused::AlreadyClosed(closure) => self.closed_error(closure),
            })?;
        if disconnected > 0 && !attachments.wait_detached(ROLLBACK_DRAIN_TIMEOUT).await {
            tracing::warn!(
                volume = self.name(),
                "clients still attached after the drain timeout"
            );
        }
        let result = self.switch_head_to(&record);
        attachments.reopen(Closure::Rollback);
        result?;
        self.after_rollback(name, disconnected).await
    }

    /// [`VolumeEntry::rollback`] of a volume its caller holds closed to clients (a server
    /// restore taking back what it wrote over its members).
    pub async fn rollback_closed(&self, name: &str) -> Result<(), StorageError> {
        let _admin = self.lock_admin().await?;
        let record = self.find_snapshot(name)?;
        self.switch_head_to(&record)?;
        self.after_rollback(name, 0).await
    }

    /// The caller holds `admin`.
    async fn after_rollback(&self, name: &str, disconnected: usize) -> Result<(), StorageError> {
        // The snapshot's data is whole: an incomplete restore over the old head is gone.
        self.clear_restore_mark_locked().await?;
        tracing::info!(
            volume = self.name(),
            snapshot = name,
            disconnected,
            "rolled back"
        );
        self.compact_after_commit().await;
        Ok(())
    }

    fn switch_head_to(&self, record: &SnapshotRecord) -> Result<(), StorageError> {
        let mut state = self.lock();
        let size_bytes = state
            .manifest
            .layer(&record.layer)
            .map_or(0, |l| l.size_bytes);
        let new_head = layer::new_layer_id()?;
        let layer = Layer::create(&self.dir, &new_head, size_bytes)?;
        let mut next = state.manifest.clone();
        next.layers.push(LayerRecord {
            id: new_head.clone(),
            parent: Some(record.layer.clone()),
            size_bytes,
        });
        next.head = new_head.clone();
        next.size_bytes = size_bytes;
        state.layers.insert(new_head, Arc::new(layer));
        self.commit(&mut state, next)?;
        self.volume.publish_size(size_bytes);
        Ok(())
    }

    /// Merges or drops layers that no view needs on their own, until none is left worth it.
    /// The caller holds `admin`.
    /// Compacts after a change that is committed: the change stands whatever compaction does,
    /// so its caller hears of success; a compaction that fails (a full disk, say) leaves every
    /// layer in place, reading the same, and is tried again at the next change or start.
    async fn compact_after_commit(&self) {
        if let Err(error) = self.compact().await {
            tracing::warn!(volume = self.name(), %error, "compacting the volume's layers failed; they stay as they are until its next snapshot delete, rollback or start");
        }
    }

    async fn compact(&self) -> Result<(), StorageError> {
        // A merge an earlier compaction recorded but did not finish (it failed) goes first:
        // the next one would replace its record.
        self.finish_merge().await?;
        while let Some(id) = self.next_to_eliminate() {
            self.eliminate(&id).await?;
        }
        if self.prune_below_head().await? {
            while let Some(id) = self.next_to_eliminate() {
                self.eliminate(&id).await?;
            }
        }
        Ok(())
    }

    /// Gives back the space of blocks in the layer right below the head that the head
    /// shadows, when no view but the volume's reads that layer (no snapshot on it, the head its
    /// only child, no clone linking it). Costs O(blocks the head holds). True if it ran.
    async fn prune_below_head(&self) -> Result<bool, StorageError> {
        let (head, below) = {
            let state = self.lock();
            let manifest = &state.manifest;
            let Some(below_id) = manifest
                .layer(&manifest.head)
                .and_then(|l| l.parent.clone())
            else {
                return Ok(false);
            };
            let anonymous = !manifest.snapshots.iter().any(|s| s.layer == below_id);
            if !anonymous || manifest.children(&below_id).len() != 1 {
                return Ok(false);
            }
            (
                Arc::clone(&state.layers[&manifest.head]),
                Arc::clone(&state.layers[&below_id]),
            )
        };
        if !below.is_exclusive() {
            return Ok(false);
        }
        let end = head.blocks().min(below.blocks());
        let mut pruned_blocks = 0;
        // Head blocks never go back to absent while the volume is open (an open after a crash
        // makes "written" ones whose bytes were lost absent again), so what they shadow stays
        // shadowed. A window's head blocks are made durable once listed and before what they
        // shadow is punched out below: after a power loss that took the head's unflushed
        // copies, a punched block would read from an older layer, or as zeroes. A run still
        // "written" after the sync (marked by a write the sync did not wait for) is left for
        // the next prune. (Clients write on meanwhile.)
        let mut head_runs = Vec::new();
        for window in (0..end).step_by(RUNS_WINDOW_BLOCKS as usize) {
            head_runs.clear();
            let window_end = window.saturating_add(RUNS_WINDOW_BLOCKS).min(end);
            head_runs.extend(head.map().present_runs(window, window_end));
            if head_runs.is_empty() {
                continue;
            }
            // Synced whether or not it is marked dirty: a TRIM or WRITE_ZEROES stores its map
            // state before it marks the layer dirty, and the listing may have seen that state
            // in between (the sync would then find the layer clean and skip it).
            head.mark_dirty();
            head.sync(&self.engine).await?;
            // A read that found one of these blocks below the head, before the head had it,
            // may not have read it yet: punched now, it would read zeroes.
            if !self.volume.readers_done(PRUNE_READER_WAIT).await {
                // Space only: the blocks stay until a later compaction prunes them.
                tracing::info!(
                    volume = self.name(),
                    wait_ms = PRUNE_READER_WAIT.as_millis() as u64,
                    "pruning stopped: a reply resolved before a snapshot is still waiting for its client"
                );
                break;
            }
            for &(a, z, _) in &head_runs {
                if head.map().any_written(a, z) {
                    continue;
                }
                for (b, c, _) in windowed_runs(&below, a, z) {
                    below.set_range(b, c, BlockState::Absent)?;
                    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    let (offset_bytes, length_bytes) = (b * BLOCK_BYTES, (c - b) * BLOCK_BYTES);
                    let _ = self
                        .engine
                        .fallocate(below.data(), punch, offset_bytes, length_bytes)
                        .await;
                    pruned_blocks += c - b;
                }
            }
        }
        below.sync(&self.engine).await?;
        if pruned_blocks > 0 {
            tracing::info!(
                volume = self.name(),
                freed_bytes = pruned_blocks * BLOCK_BYTES,
                "pruned blocks the head shadows"
            );
        }
        Ok(true)
    }

    /// A redundant layer worth removing. One whose only child is the live head stays when it
    /// holds more than the head: folding it up would copy more than it frees, and the head's
    /// writes keep shadowing it either way.
    fn next_to_eliminate(&self) -> Option<String> {
        let state = self.lock();
        let manifest = &state.manifest;
        manifest.redundant_layers().into_iter().find(|id| {
            let children = manifest.children(id);
            if children.first() != Some(&manifest.head) {
                return true;
            }
            let held = |id: &str| state.layers.get(id).map_or(0, |l| l.map().present_blocks());
            held(id) <= held(&manifest.head)
        })
    }

    /// Removes redundant layer `id`: dropped outright when nothing is above it, otherwise
    /// merged with its only child. Into a frozen child the copy goes from whichever of the two
    /// holds fewer blocks; into the live head, the layer's blocks fill what the head lacks.
    async fn eliminate(&self, id: &str) -> Result<(), StorageError> {
        let manifest = self.manifest();
        let children = manifest.children(id);
        let Some(child) = children.first().cloned() else {
            let mut state = self.lock();
            let mut next = state.manifest.clone();
            next.layers.retain(|l| l.id != id);
            self.commit(&mut state, next)?;
            remove_layer_files(&self.dir, id);
            return Ok(());
        };
        let (lower, upper) = {
            let state = self.lock();
            (
                Arc::clone(&state.layers[id]),
                Arc::clone(&state.layers[&child]),
            )
        };
        // Copying the upper layer down rewrites the lower layer in place: only allowed when no
        // other volume (a clone) links it, both describe the same size, and nothing writes the
        // upper one.
        let copy_down = child != manifest.head
            && lower.is_exclusive()
            && lower.size_bytes() == upper.size_bytes()
            && upper.map().present_blocks() < lower.map().present_blocks();
        let merge = if copy_down {
            MergeRecord {
                victim: child,
                survivor: id.to_owned(),
                survivor_is_lower: true,
            }
        } else {
            MergeRecord {
                victim: id.to_owned(),
                survivor: child,
                survivor_is_lower: false,
            }
        };
        {
            let mut state = self.lock();
            let mut next = state.manifest.clone();
            next.merge = Some(merge);
            self.commit(&mut state, next)?;
        }
        self.finish_merge().await
    }

    /// Finishes what a crash or a failure left of this volume's compaction (see
    /// `Registry::resume_compaction`).
    pub async fn resume_compaction(&self) -> Result<(), StorageError> {
        let _admin = self.lock_admin().await?;
        self.compact().await
    }

    /// Carries out the merge the manifest records, if any, then records its end. Safe to run
    /// again on a merge interrupted at any point.
    pub async fn finish_merge(&self) -> Result<(), StorageError> {
        let manifest = self.manifest();
        let Some(merge) = manifest.merge.clone() else {
            return Ok(());
        };
        let (victim, survivor) = {
            let state = self.lock();
            (
                Arc::clone(&state.layers[&merge.victim]),
                Arc::clone(&state.layers[&merge.survivor]),
            )
        };
        // The victim's blocks durable (and settled) first: a survivor below is overwritten
        // and marked without a sync, trusting a redo after a crash to copy every block again,
        // and a redo copies only what the open still finds in the victim.
        victim.sync(&self.engine).await?;
        let started = std::time::Instant::now();
        let into_head = merge.survivor == manifest.head;
        let copied_blocks = self
            .copy_blocks(&victim, &survivor, merge.survivor_is_lower, into_head)
            .await?;
        survivor.sync(&self.engine).await?;
        {
            let mut state = self.lock();
            let next = merged(&state.manifest, &merge);
            self.commit(&mut state, next)?;
        }
        remove_layer_files(&self.dir, &merge.victim);
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            volume = self.name(),
            copied_bytes = copied_blocks * BLOCK_BYTES,
            merge_secs = secs,
            "merged layers"
        );
        Ok(())
    }

    /// Copies the victim's blocks into the survivor. Survivor below: every present block of
    /// the victim overwrites it. Survivor above: only blocks the survivor lacks are filled. A
    /// live head survivor is written under its gate and stripes, re-checking each block, so a
    /// client's write to the same block always wins.
    ///
    /// A survivor above has its map say "data" only once the copied data is durable (synced
    /// every `FILL_SYNC_BYTES`): written in the other order, a power loss could leave the map
    /// on disk and the data not, and the merge, redone at the next start, skips blocks the
    /// survivor holds, so the victim's flushed data would read as zeroes once it is deleted.
    /// (Below, every block is copied again when the merge is redone.)
    async fn copy_blocks(
        &self,
        victim: &Layer,
        survivor: &Layer,
        survivor_is_lower: bool,
        into_head: bool,
    ) -> Result<u64, StorageError> {
        let end = victim.blocks().min(survivor.blocks());
        let mut copied_blocks = 0;
        let mut unmarked = Unmarked::default();
        for (run_start, run_end, state) in windowed_runs(victim, 0, end) {
            let mut start = run_start;
            while start < run_end {
                let stop = (start + MERGE_STEP_BLOCKS).min(run_end);
                let step = (start, stop, state, survivor_is_lower);
                copied_blocks += {
                    // Released before `mark_filled` below, which holds blocks of its own.
                    let _held = self.hold_head_blocks(into_head, start, stop).await;
                    self.copy_step(victim, survivor, step, &mut unmarked)
                        .await?
                };
                start = stop;
                if unmarked.blocks * BLOCK_BYTES >= FILL_SYNC_BYTES {
                    self.mark_filled(survivor, &mut unmarked, into_head).await?;
                }
            }
        }
        self.mark_filled(survivor, &mut unmarked, into_head).await?;
        Ok(copied_blocks)
    }

    /// With `into_head` (the survivor is the live head), holds client writes off blocks
    /// `[start, end)` until dropped; otherwise nothing.
    async fn hold_head_blocks(
        &self,
        into_head: bool,
        start: u64,
        end: u64,
    ) -> Option<crate::storage::volume::BlocksHeld<'_>> {
        if !into_head {
            return None;
        }
        let writer = self
            .volume
            .writer()
            .expect("a head belongs to a writable volume");
        Some(writer.hold_blocks(start, end).await)
    }

    /// Makes the data copied into a survivor above durable, then has its map say so for the
    /// blocks no client wrote, trimmed or zeroed meanwhile (those are no longer absent).
    async fn mark_filled(
        &self,
        survivor: &Layer,
        unmarked: &mut Unmarked,
        into_head: bool,
    ) -> Result<(), StorageError> {
        if unmarked.runs.is_empty() {
            return Ok(());
        }
        survivor.sync_data(&self.engine).await?;
        for (a, z) in std::mem::take(&mut unmarked.runs) {
            let _held = self.hold_head_blocks(into_head, a, z).await;
            for (run_start, run_end) in absent_runs(survivor, a, z) {
                survivor.set_range(run_start, run_end, BlockState::Data)?;
            }
        }
        unmarked.blocks = 0;
        Ok(())
    }

    /// Copies blocks `start..stop` (all `state`) of the victim. With `overwrite` (survivor
    /// below) all of them, marked at once; otherwise the ones the survivor lacks, data left in
    /// `unmarked` for `mark_filled`.
    async fn copy_step(
        &self,
        victim: &Layer,
        survivor: &Layer,
        (start, stop, state, overwrite): (u64, u64, BlockState, bool),
        unmarked: &mut Unmarked,
    ) -> Result<u64, StorageError> {
        // The sub-runs to copy: all of it, or the blocks the survivor lacks.
        let targets = if overwrite {
            vec![(start, stop)]
        } else {
            absent_runs(survivor, start, stop)
        };
        let mut copied = 0;
        for (a, z) in targets {
            let (offset_bytes, length_bytes) = (a * BLOCK_BYTES, (z - a) * BLOCK_BYTES);
            if state == BlockState::Data {
                let buf = BytesMut::zeroed(length_bytes as usize);
                let (buf, result) = self
                    .engine
                    .read_exact_at(victim.data(), offset_bytes, buf)
                    .await;
                result
                    .map_err(|e| StorageError::io("merge read", offset_bytes, length_bytes, e))?;
                self.engine
                    .write_all_at(survivor.data(), offset_bytes, buf.freeze(), false)
                    .await
                    .map_err(|e| StorageError::io("merge write", offset_bytes, length_bytes, e))?;
            } else {
                let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let _ = self
                    .engine
                    .fallocate(survivor.data(), punch, offset_bytes, length_bytes)
                    .await;
            }
            if state == BlockState::Data && !overwrite {
                unmarked.runs.push((a, z));
                unmarked.blocks += z - a;
            } else {
                // Zeroes read as zeroes whichever of the map and the hole lands first.
                survivor.set_range(a, z, state)?;
            }
            copied += z - a;
        }
        Ok(copied)
    }
}

/// The tree once `merge` is done: the victim leaves and the survivor takes its place.
fn merged(manifest: &VolumeManifest, merge: &MergeRecord) -> VolumeManifest {
    let mut next = manifest.clone();
    next.merge = None;
    let victim_parent = manifest.layer(&merge.victim).and_then(|l| l.parent.clone());
    if merge.survivor_is_lower {
        // The survivor (below) now holds the victim's view: re-point the victim's children and
        // snapshots at it.
        for layer in &mut next.layers {
            if layer.parent.as_deref() == Some(merge.victim.as_str()) {
                layer.parent = Some(merge.survivor.clone());
            }
        }
        for snapshot in &mut next.snapshots {
            if snapshot.layer == merge.victim {
                snapshot.layer = merge.survivor.clone();
            }
        }
        if next.head == merge.victim {
            next.head = merge.survivor.clone();
        }
    } else if let Some(survivor) = next.layers.iter_mut().find(|l| l.id == merge.survivor) {
        survivor.parent = victim_parent;
    }
    next.layers.retain(|l| l.id != merge.victim);
    next
}

fn remove_layer_files(dir: &std::path::Path, id: &str) {
    for path in [layer::data_path(dir, id), layer::map_path(dir, id)] {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "removing a merged layer's file failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, parent: Option<&str>) -> LayerRecord {
        LayerRecord {
            id: id.into(),
            parent: parent.map(Into::into),
            size_bytes: 4096,
        }
    }

    fn tree() -> VolumeManifest {
        VolumeManifest {
            format_version: 2,
            name: "v".into(),
            uuid: "u".into(),
            size_bytes: 4096,
            created_unix_secs: 0,
            head: "c".into(),
            layers: vec![
                record("a", None),
                record("b", Some("a")),
                record("c", Some("b")),
            ],
            snapshots: vec![SnapshotRecord {
                name: "s".into(),
                layer: "b".into(),
                created_unix_secs: 0,
            }],
            merge: None,
        }
    }

    #[test]
    fn merging_up_drops_the_lower_layer_and_reparents_the_survivor() {
        let next = merged(
            &tree(),
            &MergeRecord {
                victim: "a".into(),
                survivor: "b".into(),
                survivor_is_lower: false,
            },
        );
        assert_eq!(next.ancestry("c").unwrap(), ["c", "b"]);
        next.check().unwrap();
    }

    #[test]
    fn merging_down_moves_children_and_snapshots_to_the_survivor() {
        let next = merged(
            &tree(),
            &MergeRecord {
                victim: "b".into(),
                survivor: "a".into(),
                survivor_is_lower: true,
            },
        );
        assert_eq!(next.ancestry("c").unwrap(), ["c", "a"]);
        assert_eq!(next.snapshot("s").unwrap().layer, "a");
        next.check().unwrap();
    }

    #[test]
    fn windowed_runs_cover_what_present_runs_does_split_at_window_edges() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = 3 * RUNS_WINDOW_BLOCKS + 100;
        let layer = Layer::create(dir.path(), "l", blocks * BLOCK_BYTES).unwrap();
        let edge = RUNS_WINDOW_BLOCKS;
        layer.set_range(5, 9, BlockState::Data).unwrap();
        layer
            .set_range(edge - 3, edge + 4, BlockState::Data)
            .unwrap();
        layer
            .set_range(2 * edge, 2 * edge + 1, BlockState::Zero)
            .unwrap();
        layer
            .set_range(blocks - 2, blocks, BlockState::Data)
            .unwrap();
        let runs: Vec<_> = windowed_runs(&layer, 0, blocks).collect();
        assert_eq!(
            runs,
            [
                (5, 9, BlockState::Data),
                (edge - 3, edge, BlockState::Data),
                (edge, edge + 4, BlockState::Data),
                (2 * edge, 2 * edge + 1, BlockState::Zero),
                (blocks - 2, blocks, BlockState::Data),
            ]
        );
        // A range inside one window, and one starting past a window's start.
        let inner: Vec<_> = windowed_runs(&layer, 6, edge - 1).collect();
        assert_eq!(
            inner,
            [
                (6, 9, BlockState::Data),
                (edge - 3, edge - 1, BlockState::Data)
            ]
        );
        let late: Vec<_> = windowed_runs(&layer, edge + 2, blocks - 1).collect();
        assert_eq!(
            late,
            [
                (edge + 2, edge + 4, BlockState::Data),
                (2 * edge, 2 * edge + 1, BlockState::Zero),
                (blocks - 2, blocks - 1, BlockState::Data),
            ]
        );
    }
}
