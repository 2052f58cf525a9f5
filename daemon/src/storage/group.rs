//! Freezing heads: one volume's (a snapshot) or several volumes' from the same instant (a
//! consistency group, for server backups). A single head is swapped without holding writes
//! (see `epoch.rs`); a group holds new writes only while its heads are swapped in memory. The
//! new manifests are put in place (written and renamed, what a restart loads) before the heads
//! swap, so a write answered from a new head survives the daemon being killed, and made
//! durable in the background (`persist.rs`). Until they are, a FLUSH on any of the volumes
//! waits (so no write is acknowledged as durable while its head is not recorded durably).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::StorageError;
use crate::storage::entry::{now_unix_secs, VolumeEntry};
use crate::storage::layer::{self, Layer};
use crate::storage::manifest::{LayerRecord, SnapshotRecord, VolumeManifest};
use crate::storage::name::validate_snapshot_name;
use crate::storage::volume::Volume;
use crate::storage::Registry;

#[cfg(test)]
type SwapHook = Box<dyn Fn(&VolumeEntry)>;

#[cfg(test)]
thread_local! {
    /// Called with each member right after the heads swapped, on the freezing thread.
    static AFTER_SWAP_FOR_TEST: std::cell::RefCell<Option<SwapHook>> =
        const { std::cell::RefCell::new(None) };
    /// The volume whose new manifest's store fails, and whether after its rename (true) or
    /// before (false).
    static FAIL_STORE_FOR_TEST: std::cell::RefCell<Option<(String, bool)>> =
        const { std::cell::RefCell::new(None) };
}

/// Longest the first barrier attempt holds new writes while writes in flight finish; each
/// failed attempt doubles it, up to GATE_WAIT_MAX.
const GATE_WAIT: Duration = Duration::from_millis(5);
/// Pause after a failed attempt, doubling up to the maximum.
const GATE_RETRY_FIRST_PAUSE: Duration = Duration::from_millis(2);
const GATE_RETRY_MAX_PAUSE: Duration = Duration::from_millis(200);
/// The longest an attempt holds new writes. Attempts grow to it because the barrier holds its
/// members' commit locks, so every FLUSH of theirs waits for it: writes that always outlast a
/// 5 ms attempt (throttled writeback) must not hold those FLUSHes off for good, nor may one
/// write throttled for seconds hold every new write behind it that long.
const GATE_WAIT_MAX: Duration = Duration::from_millis(500);

/// One member of a freeze: the volume and the snapshot name its frozen head gets (None: an
/// anonymous frozen layer).
pub struct FreezeMember<'a> {
    pub entry: &'a VolumeEntry,
    pub snapshot: Option<&'a str>,
}

/// The manifests a freeze put in place, with their generations: durable once each volume's
/// persist reaches its generation.
#[must_use = "a freeze's manifests are not durable yet"]
pub(crate) struct Published {
    members: Vec<(Arc<Volume>, u64)>,
}

impl Published {
    /// Waits until every manifest the freeze put in place is durable, and with it every write
    /// acknowledged before the freeze (the frozen layers synced; the new heads, which clients
    /// write on meanwhile, are not waited for): a backup reads the snapshot,
    /// and a power loss must not take writes it has read, or a job resumed after it would
    /// mix the two states and the next incremental would start from a state the volume no
    /// longer has.
    pub(crate) async fn wait_durable(&self) -> Result<(), StorageError> {
        let members = self.members.iter().map(|(volume, generation)| async move {
            if let Some(writer) = volume.writer() {
                writer.persist.wait_durable(*generation).await?;
            }
            volume.sync_frozen().await
        });
        futures_util::future::try_join_all(members).await?;
        Ok(())
    }
}

/// Freezes every member's head at one instant and puts the new manifests in place; their
/// fsyncs run in the background (see `persist.rs`). The caller holds each entry's `admin`
/// lock. Returns how long writes were held, in microseconds (from the first gate requested
/// to the last released, in the attempt that succeeded; a failed attempt held them at most
/// `GATE_WAIT`), and what to wait for to have the manifests durable.
pub(crate) async fn freeze_heads(
    members: &[FreezeMember<'_>],
) -> Result<(u64, Published), StorageError> {
    let started = Instant::now();
    // Everything that touches the filesystem happens before writes are held.
    let mut prepared = Vec::with_capacity(members.len());
    for m in members {
        let Some(writer) = m.entry.volume.writer() else {
            return Err(StorageError::ReadOnly(m.entry.name().to_owned()));
        };
        // A manifest write that failed earlier (volume.json, or only its .prev copy) is
        // written again first: the new manifest goes in place without an fsync, trusting
        // .prev as the last durable one, and a stale .prev would take a power loss back past
        // a change reported done (a rollback, a shrink). Refused while that cannot be done.
        m.entry.repair_manifest_locked().await?;
        if let Some(name) = m.snapshot {
            validate_snapshot_name(name)?;
            if m.entry.manifest().snapshot(name).is_some() {
                return Err(StorageError::SnapshotExists {
                    volume: m.entry.name().to_owned(),
                    name: name.to_owned(),
                });
            }
        }
        let size_bytes = m.entry.manifest().size_bytes;
        // Not fsynced: a crash before the manifest naming it is durable may lose its files,
        // and the load starts a missing head again empty (no FLUSH can have returned since).
        let new_head = match m.entry.spare_head.take(&m.entry.dir, size_bytes) {
            Some(spare) => spare,
            None => Arc::new(Layer::create(
                &m.entry.dir,
                &layer::new_layer_id()?,
                size_bytes,
            )?),
        };
        let id = new_head.id().to_owned();
        prepared.push((m, writer, id, new_head, size_bytes));
    }
    let prepared_us = started.elapsed().as_micros() as u64;
    // FLUSHes queue from here until the manifests are durable.
    let mut commits = Vec::with_capacity(prepared.len());
    for (_, writer, ..) in &prepared {
        commits.push(writer.commit.write().await);
    }
    let created_unix_secs = now_unix_secs();
    let mut nexts: Vec<VolumeManifest> = Vec::with_capacity(prepared.len());
    for (m, _, id, _, size_bytes) in &prepared {
        let state = m.entry.lock();
        let old_head = state.manifest.head.clone();
        let mut next = state.manifest.clone();
        next.layers.push(LayerRecord {
            id: id.clone(),
            parent: Some(old_head.clone()),
            size_bytes: *size_bytes,
        });
        next.head = id.clone();
        if let Some(name) = m.snapshot {
            next.snapshots.push(SnapshotRecord {
                name: name.to_owned(),
                layer: old_head,
                created_unix_secs,
            });
        }
        next.check().map_err(|reason| StorageError::BadManifest {
            path: m.entry.dir.join(crate::storage::manifest::MANIFEST_FILE),
            reason,
        })?;
        nexts.push(next);
    }
    // The new manifests are put in place before any head swaps: a write that lands on a new
    // head and is answered must find that head named on disk if the daemon is killed right
    // after (the load removes the files of layers no manifest names). Until the swap below the
    // volumes keep writing their old heads, which the manifests keep in their chains.
    let mut first_error: Option<StorageError> = None;
    let mut published = Published {
        members: Vec::with_capacity(prepared.len()),
    };
    // Per member: whether its volume.json may now hold the new manifest.
    let mut in_place = Vec::with_capacity(prepared.len());
    for ((m, writer, ..), next) in prepared.iter().zip(&nexts) {
        #[cfg(not(test))]
        let stored = next.store_visible(&m.entry.dir);
        #[cfg(test)]
        let stored = {
            let hook = FAIL_STORE_FOR_TEST.with_borrow(|f| {
                f.as_ref()
                    .filter(|(name, _)| name == m.entry.name())
                    .map(|(_, after_rename)| *after_rename)
            });
            let failure = |in_place| crate::storage::manifest::VisibleStoreError {
                error: StorageError::fs(
                    "open",
                    &m.entry.dir,
                    std::io::Error::other("for the test"),
                ),
                in_place,
            };
            match hook {
                // Before the rename: volume.json is not touched.
                Some(false) => Err(failure(false)),
                // After it: the new manifest is in place, the harder case.
                Some(true) => next
                    .store_visible(&m.entry.dir)
                    .and_then(|_| Err(failure(true))),
                None => next.store_visible(&m.entry.dir),
            }
        };
        match stored {
            Ok(manifest) => {
                writer.commit_failed.store(false, Ordering::SeqCst);
                let generation = writer.persist.publish(manifest);
                published
                    .members
                    .push((Arc::clone(&m.entry.volume), generation));
                in_place.push(true);
            }
            Err(e) => {
                tracing::error!(volume = m.entry.name(), error = %e.error, "recording a frozen head failed");
                first_error.get_or_insert(e.error);
                in_place.push(e.in_place);
            }
        }
    }
    if let Some(error) = first_error {
        // No head swaps: each volume keeps writing the head it had, which every manifest
        // (memory's, and any new one already in place) names. What the disk holds is not what
        // memory runs on for the members whose new manifest went in (or may have: a failure
        // after the rename), so their FLUSH fails until the next one writes memory's manifest
        // again. One whose store failed before the rename (a full disk) still holds memory's:
        // its FLUSHes go on (each would otherwise fail while the disk stays full).
        for ((_, writer, ..), in_place) in prepared.iter().zip(in_place) {
            if in_place {
                writer.commit_failed.store(true, Ordering::SeqCst);
            }
        }
        return Err(error);
    }
    // One head swaps without holding writes: writes from then on go to the new head, and the
    // freeze waits below only for those already in flight on the old one (see `epoch.rs`).
    // Several heads frozen from one instant (a consistency group) hold new writes on all of
    // them while they swap, which is what makes the set crash-consistent across volumes.
    //
    // Waiting for the writes in flight with new ones held is bounded: one the kernel throttles
    // (writeback under a saturated disk) would otherwise hold every new write behind it for
    // seconds. After GATE_WAIT the attempt is dropped, writes flow again, and the barrier
    // retries later.
    let mut attempts = 0u32;
    let mut pause = GATE_RETRY_FIRST_PAUSE;
    let mut gate_wait = GATE_WAIT;
    let (gates, held_since) = loop {
        attempts += 1;
        let requested = Instant::now();
        if prepared.len() == 1 {
            break (Vec::new(), requested);
        }
        let acquire = async {
            let mut gates = Vec::with_capacity(prepared.len());
            for (_, writer, ..) in &prepared {
                gates.push(writer.gate.write().await);
            }
            gates
        };
        match tokio::time::timeout(gate_wait, acquire).await {
            Ok(gates) => break (gates, requested),
            Err(_) => {
                tracing::debug!(attempts, "writes in flight delayed the barrier; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(GATE_RETRY_MAX_PAUSE);
                gate_wait = (gate_wait * 2).min(GATE_WAIT_MAX);
            }
        }
    };
    let mut old_epochs = Vec::with_capacity(prepared.len());
    for ((m, _, id, new_head, _), next) in prepared.iter().zip(&nexts) {
        let mut state = m.entry.lock();
        state.layers.insert(id.clone(), Arc::clone(new_head));
        state.manifest = next.clone();
        old_epochs.push(m.entry.refresh_new_head(&mut state)?);
    }
    drop(gates);
    #[cfg(test)]
    AFTER_SWAP_FOR_TEST.with_borrow(|hook| {
        if let Some(hook) = hook {
            prepared.iter().for_each(|(m, ..)| hook(m.entry));
        }
    });
    let hold_us = held_since.elapsed().as_micros() as u64;
    let swapped_us = started.elapsed().as_micros() as u64;

    // FLUSHes from here wait for the generations just published.
    drop(commits);
    let visible_us = started.elapsed().as_micros() as u64;
    // The frozen heads take no write once those in flight on them are done; only then may the
    // freeze answer (a write acknowledged afterwards must not be in the snapshot).
    for (epoch, (m, ..)) in old_epochs.iter().zip(&prepared) {
        epoch.drained().await;
        m.entry.volume.earlier_epoch_drained();
    }
    tracing::debug!(
        prepared_us,
        swapped_us,
        hold_us,
        attempts,
        visible_us,
        drained_us = started.elapsed().as_micros() as u64,
        "froze heads"
    );
    for (m, _, _, _, size_bytes) in &prepared {
        m.entry.spare_head.replenish(&m.entry.dir, *size_bytes);
    }
    // The frozen layers' unflushed writes become durable at the next FLUSH, which syncs every
    // layer of the chain, or whenever the kernel writes them back (a backup's snapshot syncs
    // them in `Published::wait_durable`, after writes resume). Syncing them right away, as
    // this once did, wrote back a whole head's dirty pages while clients kept writing: with a
    // snapshot every 100 ms, fio's 4 KiB writes on a 1 TiB volume ran at a third of their rate
    // and snapshot creates waited up to 464 ms for the writes caught in flight.
    Ok((hold_us, published))
}

impl Registry {
    /// Snapshots every `(volume, snapshot name)` from the same instant: new writes on every
    /// member are held, writes in flight finish, all heads are frozen, writes resume. Durable
    /// when it returns. Returns the hold time in microseconds.
    pub async fn snapshot_group(&self, members: &[(String, String)]) -> Result<u64, StorageError> {
        let mut sorted: Vec<&(String, String)> = members.iter().collect();
        // One order for every caller, so two groups sharing volumes cannot deadlock.
        sorted.sort();
        let mut entries = Vec::with_capacity(sorted.len());
        for (volume, snapshot) in &sorted {
            let entry = self
                .entry(volume)
                .ok_or_else(|| StorageError::NotFound(volume.clone()))?;
            entries.push((entry, snapshot.as_str()));
        }
        let mut admins = Vec::with_capacity(entries.len());
        for (entry, _) in &entries {
            admins.push(entry.admin.lock().await);
            entry.check_present()?;
            entry.check_whole()?;
        }
        let members: Vec<FreezeMember<'_>> = entries
            .iter()
            .map(|(entry, snapshot)| FreezeMember {
                entry: entry.as_ref(),
                snapshot: Some(snapshot),
            })
            .collect();
        let (hold_us, published) = freeze_heads(&members).await?;
        // Durable before returning: the backup job records that follow say the snapshots
        // exist.
        published.wait_durable().await?;
        tracing::info!(volumes = members.len(), hold_us, "group snapshot taken");
        Ok(hold_us)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::io::{EngineConfig, EngineKind, IoEngine};
    use crate::storage::manifest::VolumeManifest;

    /// A registry with volumes "v" and "w" of 1 MiB.
    fn two_volumes() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let registry = Registry::open(dir.path(), engine).unwrap();
        registry.create("v", 1 << 20).unwrap();
        registry.create("w", 1 << 20).unwrap();
        (dir, registry)
    }

    /// A write answered from a new head must find that head named in the manifest a restart
    /// loads (the load removes the files of layers none names): put in place before the swap.
    #[tokio::test]
    async fn the_manifest_on_disk_names_a_new_head_from_the_moment_it_takes_writes() {
        let (_dir, registry) = two_volumes();
        let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let record = Arc::clone(&seen);
        AFTER_SWAP_FOR_TEST.set(Some(Box::new(move |entry: &VolumeEntry| {
            let on_disk = VolumeManifest::load(&entry.dir).unwrap().head;
            let running = entry.volume.chain().top().id().to_owned();
            record.lock().unwrap().push((running, on_disk));
        })));
        let v = registry.entry("v").unwrap();
        v.create_snapshot("s1").await.unwrap();
        registry
            .snapshot_group(&[("v".into(), "s2".into()), ("w".into(), "s2".into())])
            .await
            .unwrap();
        AFTER_SWAP_FOR_TEST.set(None);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
        for (running, on_disk) in seen.iter() {
            assert_eq!(running, on_disk);
        }
    }

    /// Writes that always outlast the first attempts (each in flight longer than GATE_WAIT,
    /// overlapping) no longer hold the barrier, and with it the members' FLUSHes, off for
    /// good: the attempts grow until one outlasts them.
    #[tokio::test]
    async fn a_barrier_gets_through_writes_that_always_outlast_its_attempts() {
        let (_dir, registry) = two_volumes();
        let w = registry.get("w").unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut holders = Vec::new();
        // 25 writers, each with one write in flight for 20-80 ms after the other: whenever
        // the barrier asks, one of them has more than its 5 ms to go.
        for seed in 1..=25u64 {
            let (w, stop) = (Arc::clone(&w), Arc::clone(&stop));
            holders.push(tokio::spawn(async move {
                let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                while !stop.load(Ordering::SeqCst) {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let hold_ms = 20 + (state >> 33) % 61;
                    let _in_flight = w.writer().unwrap().gate.read().await;
                    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        let members = [("v".into(), "s".into()), ("w".into(), "s".into())];
        let group = registry.snapshot_group(&members);
        let taken = tokio::time::timeout(Duration::from_secs(15), group).await;
        stop.store(true, Ordering::SeqCst);
        for holder in holders {
            holder.await.unwrap();
        }
        assert!(
            matches!(taken, Ok(Ok(_))),
            "the barrier never got through: {taken:?}"
        );
    }

    /// A snapshot whose manifest cannot even be written (a full disk: before the rename)
    /// leaves volume.json as memory has it: FLUSH goes on (it failed until a repair that the
    /// full disk would keep failing).
    #[tokio::test]
    async fn a_snapshot_whose_manifest_is_not_written_leaves_flush_working() {
        let (_dir, registry) = two_volumes();
        let v = registry.entry("v").unwrap();
        FAIL_STORE_FOR_TEST.set(Some(("v".into(), false)));
        let failed = v.create_snapshot("s").await;
        FAIL_STORE_FOR_TEST.set(None);
        assert!(failed.is_err());
        // The disk stays full: no manifest can be written (a repair would fail).
        for blocker in ["volume.tmp", "volume.json.tmp"] {
            std::fs::create_dir(v.dir.join(blocker)).unwrap();
        }
        let volume = registry.get("v").unwrap();
        volume
            .write(0, bytes::Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        volume.flush().await.unwrap();
        assert!(v.manifest().snapshot("s").is_none());
    }

    /// A group whose member's manifest cannot be stored swaps no head: every volume keeps
    /// writing the head every manifest names, and FLUSH heals by writing memory's again.
    #[tokio::test]
    async fn a_freeze_whose_manifest_store_fails_swaps_no_head() {
        let (_dir, registry) = two_volumes();
        let heads =
            || ["v", "w"].map(|name| registry.get(name).unwrap().chain().top().id().to_owned());
        let before = heads();
        FAIL_STORE_FOR_TEST.set(Some(("w".into(), true)));
        let failed = registry
            .snapshot_group(&[("v".into(), "s".into()), ("w".into(), "s".into())])
            .await;
        FAIL_STORE_FOR_TEST.set(None);
        assert!(failed.is_err());
        assert_eq!(heads(), before, "no head swapped");
        for name in ["v", "w"] {
            let volume = registry.get(name).unwrap();
            volume
                .write(0, bytes::Bytes::from(vec![7u8; 4096]), false)
                .await
                .unwrap();
            volume.flush().await.unwrap();
            let on_disk = VolumeManifest::load(&registry.entry(name).unwrap().dir).unwrap();
            assert_eq!(on_disk.head, volume.chain().top().id(), "{name}");
            assert!(on_disk.snapshot("s").is_none(), "{name}");
        }
    }
}
