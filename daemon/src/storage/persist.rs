//! Making a volume's manifest durable behind snapshot create.
//!
//! Snapshot create puts its manifest in place (write + rename, what a restart loads) and
//! answers; the fsyncs run here, in the background, one persist at a time, each on the latest
//! manifest put in place (a newer one supersedes an older one still waiting). After a manifest
//! is durable, a durable copy of it is written as `volume.json.prev`: the fallback when a
//! crash tears the next manifest (its rename can reach the disk before its bytes). FLUSH waits
//! until every manifest put in place before it is durable, so "FLUSH returned" still implies
//! that the layout holding the flushed writes is on disk.
//!
//! Generations: each manifest put in place gets the next one (`visible`); the persist reports
//! the highest made durable. The synchronous path (`VolumeManifest::store`, used by every other
//! tree change) waits for the persists first and writes both files durably itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::StorageError;
use crate::storage::manifest::{self, UnsyncedManifest, PREV_MANIFEST_FILE};

/// What the persist has achieved so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Durability {
    /// Every manifest up to this generation is durable (or superseded by a durable one).
    generation: u64,
    /// The last persist failed: FLUSH fails until a later manifest is made durable.
    failed: bool,
}

/// One volume's manifest persists.
#[derive(Debug)]
pub struct ManifestPersist {
    visible: AtomicU64,
    durable: tokio::sync::watch::Sender<Durability>,
    /// The newest manifest put in place and not yet taken by a persist.
    latest: Mutex<Option<(u64, UnsyncedManifest)>>,
    /// One persist at a time, so `.prev` is never written back to an older manifest.
    serial: tokio::sync::Mutex<()>,
}

impl Default for ManifestPersist {
    fn default() -> Self {
        ManifestPersist {
            visible: AtomicU64::new(0),
            durable: tokio::sync::watch::channel(Durability::default()).0,
            latest: Mutex::new(None),
            serial: tokio::sync::Mutex::new(()),
        }
    }
}

impl ManifestPersist {
    /// The generation of the newest manifest put in place.
    pub fn visible(&self) -> u64 {
        self.visible.load(Ordering::SeqCst)
    }

    /// Records `manifest` (just put in place) as the newest and starts a persist for it.
    /// Returns its generation. The caller holds the writer's `commit` lock exclusively, so no
    /// FLUSH reads the generation between the head swap and this call.
    pub fn publish(self: &Arc<Self>, mut manifest: UnsyncedManifest) -> u64 {
        let generation = self.visible.fetch_add(1, Ordering::SeqCst) + 1;
        {
            let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, older)) = latest.take() {
                manifest.absorb(older);
            }
            *latest = Some((generation, manifest));
        }
        let this = Arc::clone(self);
        tokio::spawn(async move { this.persist().await });
        generation
    }

    async fn persist(self: Arc<Self>) {
        let _serial = self.serial.lock().await;
        self.persist_latest().await;
    }

    /// Makes the newest manifest durable, then its `.prev` copy; nothing to do when an earlier
    /// persist already took it. The caller holds `serial`.
    async fn persist_latest(&self) {
        let Some((generation, manifest)) =
            self.latest.lock().unwrap_or_else(|p| p.into_inner()).take()
        else {
            return;
        };
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            manifest.sync()?;
            manifest::write_durably(
                &manifest.dir_path().join(PREV_MANIFEST_FILE),
                manifest.bytes(),
            )?;
            manifest.remove_replaced();
            Ok(())
        })
        .await
        .unwrap_or_else(|join| {
            Err(StorageError::io(
                "fsync manifest",
                0,
                0,
                std::io::Error::other(join.to_string()),
            ))
        });
        match result {
            Ok(()) => {
                tracing::debug!(
                    generation,
                    synced_us = started.elapsed().as_micros() as u64,
                    "manifest durable"
                );
                self.durable.send_modify(|d| {
                    d.generation = d.generation.max(generation);
                    d.failed = false;
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "making a volume manifest durable failed");
                self.durable.send_modify(|d| d.failed = true);
            }
        }
    }

    /// Waits until every manifest up to `generation` is durable; an error if a persist failed
    /// on the way (until a later one succeeds).
    pub async fn wait_durable(&self, generation: u64) -> Result<(), StorageError> {
        let mut rx = self.durable.subscribe();
        loop {
            let now = *rx.borrow_and_update();
            if now.failed {
                return Err(StorageError::io(
                    "flush",
                    0,
                    0,
                    std::io::Error::other("the volume manifest could not be made durable"),
                ));
            }
            if now.generation >= generation {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                // Unreachable while `self` lives (it holds the sender).
                return Ok(());
            }
        }
    }

    /// The last persist failed and no manifest was made durable since.
    pub fn failed(&self) -> bool {
        self.durable.borrow().failed
    }

    /// Runs (or waits for) every pending persist, failed or not. The caller holds the volume's
    /// `admin` lock, so none starts after this returns until it lets go: the synchronous path
    /// then writes the manifest and `.prev` itself, never overtaken by an older persist.
    pub async fn settle(&self) {
        let _serial = self.serial.lock().await;
        self.persist_latest().await;
    }

    /// The synchronous path wrote the whole manifest (and `.prev`) durably.
    pub fn all_durable(&self) {
        let visible = self.visible();
        self.durable.send_modify(|d| {
            d.generation = d.generation.max(visible);
            d.failed = false;
        });
    }
}
