//! Write epochs: which head a write started on. Freezing the head (snapshot create) swaps in a
//! new head and a new epoch in one step; writes that start afterwards go to the new head at once,
//! and the freeze waits only for the writes of the old epoch, the ones already in flight on the
//! old head, before it answers. So new writes are never held behind a slow one in flight, and
//! no write acknowledged after the create answered is in the snapshot.
//!
//! One hazard remains across the two heads: a write into a block the new head does not hold yet
//! that covers only part of it reads the rest of the block from below, where a write of the old
//! epoch may still be landing. Such read-modify-writes wait for the earlier epoch first
//! ([`EpochGuard::wait_earlier`]); whole-block writes never read below and never wait.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Epoch {
    /// Writes started in this epoch and not finished.
    in_flight: AtomicUsize,
    /// A newer epoch has started: no write enters this one any more.
    closed: AtomicBool,
    /// Woken when the last write of a closed epoch finishes.
    drained: Notify,
    /// The epoch before this one, until it is known to be drained.
    earlier: Mutex<Option<Arc<Epoch>>>,
}

/// A write's membership in its epoch; leaves on drop.
#[derive(Debug)]
pub struct EpochGuard {
    epoch: Arc<Epoch>,
}

impl Epoch {
    fn earlier(&self) -> MutexGuard<'_, Option<Arc<Epoch>>> {
        // Replaced whole: recover from poisoning.
        self.earlier.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a write starting in this epoch. The caller holds the lock under which epochs
    /// are swapped, so the write cannot enter an epoch already closed.
    pub fn enter(self: &Arc<Self>) -> EpochGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        EpochGuard {
            epoch: Arc::clone(self),
        }
    }

    /// Closes this epoch and starts the next one. The caller holds the swap lock.
    pub fn next(self: &Arc<Self>) -> Arc<Epoch> {
        self.closed.store(true, Ordering::SeqCst);
        Arc::new(Epoch {
            earlier: Mutex::new(Some(Arc::clone(self))),
            ..Epoch::default()
        })
    }

    /// Waits until every write of this (closed) epoch has finished.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            // Registered before checking, so a last write finishing in between is not missed.
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The earlier epoch is drained: later read-modify-writes need not look at it.
    pub fn forget_earlier(&self) {
        self.earlier().take();
    }
}

impl EpochGuard {
    /// Waits until the writes of the epoch before this one are done (at once when there is
    /// none, or when it is known to be drained).
    pub async fn wait_earlier(&self) {
        let earlier = self.epoch.earlier().clone();
        if let Some(earlier) = earlier {
            earlier.drained().await;
        }
    }
}

impl Drop for EpochGuard {
    fn drop(&mut self) {
        let epoch = &self.epoch;
        if epoch.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && epoch.closed.load(Ordering::SeqCst)
        {
            epoch.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SOON: Duration = Duration::from_millis(20);

    #[tokio::test]
    async fn a_closed_epoch_drains_when_its_last_write_finishes() {
        let first = Arc::new(Epoch::default());
        let (a, b) = (first.enter(), first.enter());
        let second = first.next();
        let late = second.enter();
        let waiter = {
            let first = Arc::clone(&first);
            tokio::spawn(async move { first.drained().await })
        };
        tokio::time::sleep(SOON).await;
        assert!(!waiter.is_finished(), "two writes still in flight");
        drop(a);
        tokio::time::sleep(SOON).await;
        assert!(!waiter.is_finished(), "one write still in flight");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the last write")
            .unwrap();
        drop(late);
    }

    #[tokio::test]
    async fn read_modify_writes_of_the_new_epoch_wait_for_the_old_one() {
        let first = Arc::new(Epoch::default());
        let old_write = first.enter();
        let second = first.next();
        let rmw = second.enter();
        let waiting = tokio::spawn(async move {
            rmw.wait_earlier().await;
            rmw
        });
        tokio::time::sleep(SOON).await;
        assert!(!waiting.is_finished());
        drop(old_write);
        let rmw = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("released once the old epoch drained")
            .unwrap();
        drop(rmw);
        second.forget_earlier();
        let after = second.enter();
        tokio::time::timeout(Duration::from_millis(100), after.wait_earlier())
            .await
            .expect("nothing to wait for once forgotten");
    }

    #[tokio::test]
    async fn an_epoch_closed_with_nothing_in_flight_is_drained() {
        let first = Arc::new(Epoch::default());
        drop(first.enter());
        let _second = first.next();
        tokio::time::timeout(Duration::from_millis(100), first.drained())
            .await
            .expect("already drained");
    }
}
