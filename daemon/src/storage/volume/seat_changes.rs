//! A client connection's changes to a volume: `Volume`'s write, write_zeroes and trim, each
//! withdrawn (`StorageError::Withdrawn`, nothing changed) when it reaches the volume's gate
//! after its connection was closed by force (see `Volume::enter_for_change`).

use bytes::Bytes;

use crate::error::StorageError;
use crate::storage::fence::Seat;

use super::{Via, Volume, ZeroMode};

/// `volume`'s changes asked for by the connection sitting in `seat`.
pub struct SeatChanges<'a> {
    volume: &'a Volume,
    seat: &'a Seat,
}

impl Volume {
    /// The changes of the connection in `seat` (see [`SeatChanges`]).
    pub fn changes_of<'a>(&'a self, seat: &'a Seat) -> SeatChanges<'a> {
        SeatChanges { volume: self, seat }
    }
}

impl SeatChanges<'_> {
    /// `Volume::write`.
    pub async fn write(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), StorageError> {
        let via = Via::PageCache;
        self.volume
            .write_via(offset_bytes, data, fua, via, Some(self.seat))
            .await
    }

    /// `write` for a caller whose thread may spend the time to copy a large write into the
    /// page cache itself (see `IoEngine::write_all_at_here`): one that loses nothing while it
    /// does, because its next input keeps arriving meanwhile.
    pub async fn write_here(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), StorageError> {
        let via = Via::PageCacheHere;
        self.volume
            .write_via(offset_bytes, data, fua, via, Some(self.seat))
            .await
    }

    /// `Volume::write_zeroes`.
    pub async fn write_zeroes(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<(), StorageError> {
        self.volume
            .write_zeroes_for(offset_bytes, length_bytes, mode, fua, Some(self.seat))
            .await
    }

    /// `Volume::trim`.
    pub async fn trim(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        fua: bool,
    ) -> Result<(), StorageError> {
        self.volume
            .trim_for(offset_bytes, length_bytes, fua, Some(self.seat))
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::storage::layer::BLOCK_BYTES;
    use crate::storage::volume_of_ones;

    /// Changes that passed the fence and then waited for the gate (a resize or group freeze
    /// held it) while a rollback closed their connection by force change nothing once they
    /// get it; another connection's go ahead.
    #[tokio::test]
    async fn changes_waiting_for_the_gate_are_withdrawn_once_their_connection_is_forced_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (_registry, volume) = volume_of_ones(dir.path(), None, 4 * BLOCK_BYTES).await;
        let (forced, other) = (Arc::new(Seat::default()), Arc::new(Seat::default()));
        let held = volume.writer.as_ref().unwrap().gate.write().await;
        let change = |seat: &Arc<Seat>, what: u8| {
            let (volume, seat) = (Arc::clone(&volume), Arc::clone(seat));
            tokio::spawn(async move {
                let changes = volume.changes_of(&seat);
                let at = u64::from(what) * BLOCK_BYTES;
                let data = Bytes::from(vec![9u8; BLOCK_BYTES as usize]);
                let zero = ZeroMode {
                    may_trim: true,
                    fast_only: false,
                };
                match what {
                    0 => changes.write(at, data, false).await,
                    1 => changes.write_zeroes(at, BLOCK_BYTES, zero, false).await,
                    2 => changes.trim(at, BLOCK_BYTES, false).await,
                    _ => changes.write_here(at, data, false).await,
                }
            })
        };
        let withdrawn = [change(&forced, 0), change(&forced, 1), change(&forced, 2)];
        let made = change(&other, 3);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(withdrawn.iter().all(|c| !c.is_finished()) && !made.is_finished());
        forced.force_closed(volume.fence());
        drop(held);
        for change in withdrawn {
            let result = change.await.unwrap();
            assert!(
                matches!(result, Err(StorageError::Withdrawn(_))),
                "{result:?}"
            );
        }
        made.await.unwrap().unwrap();
        let back = volume.read(0, 4 * BLOCK_BYTES as usize).await.unwrap();
        let (kept, written) = back.split_at(3 * BLOCK_BYTES as usize);
        assert!(kept.iter().all(|&b| b == 1), "a withdrawn change landed");
        assert!(
            written.iter().all(|&b| b == 9),
            "the other connection's write is missing"
        );
    }
}
