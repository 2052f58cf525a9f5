//! Write fencing: while a connection whose client went away still has writes in flight, writes
//! from the volume's other connections wait before they start, so a stale write can never land
//! after a newer one (the client may already have reconnected and re-sent it).
//!
//! Waiting before the write *starts* matters: waiting only before its ack would still let the
//! new write reach the disk first and the stale one overwrite it afterwards.
//!
//! Each raise is numbered. A write waits for the raises up when it came to the fence, and for
//! those only, and never for its own connection's raise or a later one: a wait thus only ever
//! points from a raise to an older one, and no two connections can wait on each other. (A
//! request whose connection ends gives up, unless its client sent NBD_CMD_DISC: see
//! `nbd::drain`.)

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Fence {
    /// Connections whose seat holds the fence up (the hot path's check).
    raised: AtomicUsize,
    raises: Mutex<Raises>,
    /// Woken whenever a fence goes up or down; waiters re-check their condition.
    changed: Notify,
}

#[derive(Debug, Default)]
struct Raises {
    /// The number the next raise gets.
    next: u64,
    /// The numbers of the raises still up.
    up: BTreeSet<u64>,
}

/// Where a waiter stands: it waits for the raises numbered below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon(u64);

impl Fence {
    /// The hot-path check: one atomic load.
    #[inline]
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst) != 0
    }

    fn raises(&self) -> MutexGuard<'_, Raises> {
        // A counter and a set, each update complete in itself: recover from poisoning.
        self.raises.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every raise up now is below the horizon; every later one at or above it.
    pub fn horizon(&self) -> Horizon {
        Horizon(self.raises().next)
    }

    /// Where a request of `seat`'s connection stands: below the horizon, and below its own
    /// connection's raise if it has one (its requests in flight hold that raise up; waiting on
    /// it, or on a later one, could close a cycle of waits).
    pub fn horizon_for(&self, seat: &Seat) -> Horizon {
        let now = self.horizon();
        match seat.state().raised {
            Some(own) if own < now.0 => Horizon(own),
            _ => now,
        }
    }

    /// Whether a raise below `horizon` is still up.
    fn holds(&self, horizon: Horizon) -> bool {
        self.raises()
            .up
            .first()
            .is_some_and(|&oldest| oldest < horizon.0)
    }

    /// Waits until no raise below `horizon` is up, or `give_up()` says the waiter's request
    /// will never start (its client is gone). Returns how long it waited; None when it did
    /// not wait at all (no raise below the horizon: its own connection's, say).
    pub async fn wait(&self, horizon: Horizon, give_up: impl Fn() -> bool) -> Option<Duration> {
        if !self.is_raised() {
            return None;
        }
        let started = Instant::now();
        let mut first = true;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before checking, so a lowering in between is not missed.
            notified.as_mut().enable();
            if !self.holds(horizon) || give_up() {
                return (!first).then(|| started.elapsed());
            }
            first = false;
            notified.await;
        }
    }

    /// Raises the fence; returns the raise's number.
    fn raise(&self) -> u64 {
        let number = {
            let mut raises = self.raises();
            let number = raises.next;
            raises.next += 1;
            raises.up.insert(number);
            self.raised.fetch_add(1, Ordering::SeqCst);
            number
        };
        self.wake_waiters();
        number
    }

    fn lower(&self, number: u64) {
        {
            let mut raises = self.raises();
            if raises.up.remove(&number) {
                self.raised.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.wake_waiters();
    }

    /// Wakes every waiter to re-check its condition.
    fn wake_waiters(&self) {
        self.changed.notify_waiters();
    }
}

/// One connection's place at its volume's fence. Its transitions are rare (once per connection
/// death) and may come from two sides, the connection's own task and whichever connection of the
/// volume found its client gone first, so they are serialised by a lock; the request path never takes it
/// unless a fence is up.
#[derive(Debug, Default)]
pub struct Seat {
    state: Mutex<SeatState>,
    /// `SeatState::forced`, for the request path, which asks whether a request may start
    /// without taking the lock (a forced close may find the fence lowered long before a stalled
    /// connection thread takes its next request).
    forced: AtomicBool,
    /// `SeatState::hung_up`, for a connection task that checks without taking the lock.
    hung_up: AtomicBool,
    /// The connection's task while it reads nothing from its socket (its reply budget is
    /// full): it would not see the end of the stream, so `hung_up` wakes it instead.
    reader: AtomicWaker,
}

#[derive(Debug, Default)]
struct SeatState {
    /// The number of this seat's raise while it holds the fence up.
    raised: Option<u64>,
    /// The connection reads no more requests, or its client is known to be gone: its requests
    /// that come to the fence from now on do not wait.
    draining: bool,
    /// Its socket failed: requests not started yet never start.
    abandoned: bool,
    /// Its client sent NBD_CMD_DISC: requests it sent before are still handled, those waiting
    /// at the fence included.
    disconnecting: bool,
    /// A rollback, restore or delete closed it by force: requests not started never start.
    forced: bool,
    /// Its reading is over and its writes are done (or it detached): never raised again.
    settled: bool,
    /// Its client was seen gone (`hung_up`) before its task read the end of the stream.
    hung_up: bool,
}

impl Seat {
    fn state(&self) -> MutexGuard<'_, SeatState> {
        // The state is a few flags, each update complete in itself: recover from poisoning.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub fn is_draining(&self) -> bool {
        self.state().draining
    }

    #[cfg(test)]
    pub fn is_abandoned(&self) -> bool {
        self.state().abandoned
    }

    /// Whether a request of this connection at the fence is to give up: its connection ended
    /// for any reason but the client's own NBD_CMD_DISC, was closed by force, or its socket
    /// failed.
    pub fn gives_up_waiting(&self) -> bool {
        let state = self.state();
        state.abandoned || state.forced || (state.draining && !state.disconnecting)
    }

    /// A rollback, restore or delete closes the connection by force: its requests not started
    /// yet never start, even after its client's NBD_CMD_DISC (the operation may go ahead before
    /// they would).
    pub fn force_closed(&self, fence: &Fence) {
        self.state().forced = true;
        self.forced.store(true, Ordering::Release);
        fence.wake_waiters();
    }

    /// Whether a rollback, restore or delete closed the connection by force: none of its
    /// requests may start from then on, fence or none.
    pub fn is_forced(&self) -> bool {
        self.forced.load(Ordering::Acquire)
    }

    /// The client sent NBD_CMD_DISC: called before the connection drains, so that its requests
    /// waiting at the fence go on waiting, then run.
    pub fn client_disconnecting(&self) {
        self.state().disconnecting = true;
    }

    /// The connection stops reading requests (with `abandoned`, its socket failed). Raises the
    /// fence while `writes_in_flight`; wakes the waiters either way (an abandoned seat's
    /// waiting requests give up). Returns whether the fence is up for this seat.
    pub fn drain(&self, fence: &Fence, writes_in_flight: bool, abandoned: bool) -> bool {
        let mut state = self.state();
        let changed = !state.draining || (abandoned && !state.abandoned);
        state.draining = true;
        state.abandoned |= abandoned;
        if writes_in_flight && state.raised.is_none() && !state.settled {
            state.raised = Some(fence.raise());
        } else if changed {
            fence.wake_waiters();
        }
        state.raised.is_some()
    }

    /// The kernel reported this connection's client gone before the connection's own task
    /// noticed (it may still be reading requests queued before the hang-up): raise the fence
    /// now, until the task settles. Does nothing once the task drains or settles by itself.
    pub fn hung_up(&self, fence: &Fence) -> bool {
        let mut state = self.state();
        if state.draining || state.settled {
            return false;
        }
        state.draining = true;
        state.hung_up = true;
        state.raised = Some(fence.raise());
        drop(state);
        self.hung_up.store(true, Ordering::Release);
        self.reader.wake();
        true
    }

    /// Wakes the connection's task (`waker`) when [`Seat::hung_up`] finds its client gone;
    /// then [`Seat::was_hung_up`] says so.
    pub fn wake_on_hang_up(&self, waker: &Waker) {
        self.reader.register(waker);
    }

    /// Whether [`Seat::hung_up`] found the client gone (lock-free).
    pub fn was_hung_up(&self) -> bool {
        self.hung_up.load(Ordering::Acquire)
    }

    /// Whether `hung_up` found the client gone before it sent NBD_CMD_DISC, as far as is
    /// known: the connection's task then looks for one among the requests still queued.
    pub fn hung_up_without_disc(&self) -> bool {
        let state = self.state();
        state.hung_up && !state.disconnecting
    }

    /// Reading is over and no write is in flight: lowers the fence for good.
    pub fn settle(&self, fence: &Fence) {
        let mut state = self.state();
        state.settled = true;
        if let Some(number) = state.raised.take() {
            fence.lower(number);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const SOON: Duration = Duration::from_millis(20);

    /// A dying connection with writes in flight.
    fn raised(fence: &Fence) -> Seat {
        let seat = Seat::default();
        assert!(seat.drain(fence, true, false));
        seat
    }

    #[tokio::test]
    async fn lowered_fence_does_not_wait() {
        let fence = Fence::default();
        assert!(!fence.is_raised());
        assert_eq!(fence.wait(fence.horizon(), || false).await, None);
        let seat = Seat::default();
        assert!(
            !seat.drain(&fence, false, false),
            "no writes in flight, no fence"
        );
        assert!(!fence.is_raised());
        raised(&fence).settle(&fence);
        assert!(!fence.is_raised());
        assert_eq!(fence.wait(fence.horizon(), || false).await, None);
    }

    #[tokio::test]
    async fn waits_until_every_seat_settles() {
        let fence = Arc::new(Fence::default());
        let (first, second) = (raised(&fence), raised(&fence));
        let waiter = {
            let fence = Arc::clone(&fence);
            tokio::spawn(async move { fence.wait(fence.horizon(), || false).await })
        };
        tokio::time::sleep(SOON).await;
        assert!(!waiter.is_finished());
        first.settle(&fence);
        first.settle(&fence);
        tokio::time::sleep(SOON).await;
        assert!(!waiter.is_finished(), "one fence is still up");
        second.settle(&fence);
        let waited = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter woken")
            .unwrap();
        assert!(waited.expect("it waited") >= 2 * SOON);
        assert!(!fence.is_raised());
    }

    /// A request whose only raise up is its own connection's passes without waiting, and
    /// that counts as no wait.
    #[tokio::test]
    async fn a_raise_of_its_own_is_no_wait() {
        let fence = Fence::default();
        let own = raised(&fence);
        let horizon = fence.horizon_for(&own);
        assert_eq!(fence.wait(horizon, || false).await, None);
    }

    #[tokio::test]
    async fn a_waiter_waits_only_for_older_raises_and_gives_up_when_told() {
        let fence = Arc::new(Fence::default());
        let older = raised(&fence);
        let own = Arc::new(Seat::default());
        let waiter = {
            let (fence, own) = (Arc::clone(&fence), Arc::clone(&own));
            let horizon = fence.horizon();
            tokio::spawn(async move { fence.wait(horizon, || own.is_abandoned()).await })
        };
        tokio::time::sleep(SOON).await;
        assert!(!waiter.is_finished());
        // Its own connection drains with the waiting write in flight (a SIGTERM, a DISC): its
        // raise is newer than the wait, which still waits for the older one only.
        assert!(own.drain(&fence, true, false));
        let newer = raised(&fence);
        tokio::time::sleep(SOON).await;
        assert!(
            !waiter.is_finished(),
            "released before the older writes were done"
        );
        older.settle(&fence);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken when the older raise is lowered")
            .unwrap();
        assert!(fence.is_raised(), "the newer raises are still up");

        // A waiter whose client is gone gives up at once.
        let abandoned = Arc::new(Seat::default());
        let waiter = {
            let (fence, abandoned) = (Arc::clone(&fence), Arc::clone(&abandoned));
            let horizon = fence.horizon();
            tokio::spawn(async move { fence.wait(horizon, || abandoned.is_abandoned()).await })
        };
        tokio::time::sleep(SOON).await;
        assert!(!waiter.is_finished());
        abandoned.drain(&fence, false, true);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("an abandoned waiter gives up")
            .unwrap();
        own.settle(&fence);
        newer.settle(&fence);
        assert!(!fence.is_raised());
    }

    #[tokio::test]
    async fn hung_up_raises_until_the_connection_settles() {
        let fence = Fence::default();
        let seat = Seat::default();
        assert!(seat.hung_up(&fence));
        assert!(fence.is_raised() && seat.is_draining() && !seat.is_abandoned());
        assert!(!seat.hung_up(&fence), "raised once");
        // The connection's task notices later, with nothing in flight: still up, it may have
        // started requests queued before the hang-up.
        assert!(seat.drain(&fence, false, true));
        assert!(fence.is_raised() && seat.is_abandoned());
        seat.settle(&fence);
        assert!(!fence.is_raised());
        assert!(
            !seat.hung_up(&fence),
            "a settled seat is never raised again"
        );
        assert!(!seat.drain(&fence, true, true));
        assert!(!fence.is_raised());

        let drained = Seat::default();
        drained.drain(&fence, false, false);
        assert!(
            !drained.hung_up(&fence),
            "its own task is in charge once draining"
        );
        assert!(!fence.is_raised());
    }

    /// Lowering races with many waiters registering: none may sleep through it.
    #[test]
    fn no_lost_wakeup() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            for _ in 0..200 {
                let fence = Arc::new(Fence::default());
                let seat = raised(&fence);
                let waiters: Vec<_> = (0..8)
                    .map(|_| {
                        let fence = Arc::clone(&fence);
                        tokio::spawn(async move { fence.wait(fence.horizon(), || false).await })
                    })
                    .collect();
                tokio::task::yield_now().await;
                seat.settle(&fence);
                for waiter in waiters {
                    tokio::time::timeout(Duration::from_secs(5), waiter)
                        .await
                        .expect("a waiter slept through the lowering")
                        .unwrap();
                }
            }
        });
    }
}
