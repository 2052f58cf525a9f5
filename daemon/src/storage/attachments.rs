//! Who is using a volume: one entry per attached NBD connection, each with the token that ends
//! it, so that delete can refuse a busy volume or, when forced, disconnect its clients first,
//! and with its seat at the volume's write fence (see `fence`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::storage::fence::{Fence, Seat};

#[derive(Debug, Default)]
pub struct Attachments {
    state: Mutex<State>,
    /// Woken whenever a connection detaches.
    detached: Notify,
    fence: Fence,
}

/// Tells whether a connection's client is gone (hung up or reset), even while requests it sent
/// before are still queued unread.
pub trait PeerProbe: Send + Sync + std::fmt::Debug {
    fn peer_gone(&self) -> bool;
}

#[derive(Debug)]
struct Connection {
    stop: CancellationToken,
    seat: Arc<Seat>,
    probe: Option<Box<dyn PeerProbe>>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    connections: HashMap<u64, Connection>,
    /// Set once the volume is being deleted: no connection may attach any more.
    closed: bool,
}

/// Why [`Attachments::close`] did not close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseRefused {
    /// This many connections are attached and the close was not forced.
    Busy(usize),
    /// Another deletion closed it first.
    AlreadyClosed,
}

/// Why [`Attachments::attach_limited`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachRefused {
    /// The volume is being deleted.
    Closed,
    /// This many connections are attached, the volume's limit.
    Full(usize),
}

/// Held by a connection for as long as it serves the volume; detaches on drop.
#[derive(Debug)]
pub struct Attachment {
    attachments: Arc<Attachments>,
    id: u64,
    seat: Arc<Seat>,
}

impl Attachments {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the map half-updated: recover it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection that stops when `stop` is cancelled, and whose client `probe`
    /// watches. None once the volume is being deleted.
    #[cfg(test)]
    pub fn attach(
        self: &Arc<Self>,
        stop: CancellationToken,
        probe: Option<Box<dyn PeerProbe>>,
    ) -> Option<Attachment> {
        self.attach_limited(stop, probe, None).ok()
    }

    /// Registers a connection that stops when `stop` is cancelled, and whose client `probe`
    /// watches, refusing once the volume is being deleted or when `max_connections` are
    /// attached already.
    pub fn attach_limited(
        self: &Arc<Self>,
        stop: CancellationToken,
        probe: Option<Box<dyn PeerProbe>>,
        max_connections: Option<usize>,
    ) -> Result<Attachment, AttachRefused> {
        let mut state = self.state();
        if state.closed {
            return Err(AttachRefused::Closed);
        }
        if let Some(max) = max_connections {
            if state.connections.len() >= max {
                return Err(AttachRefused::Full(max));
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let seat = Arc::new(Seat::default());
        let connection = Connection {
            stop,
            seat: Arc::clone(&seat),
            probe,
        };
        state.connections.insert(id, connection);
        Ok(Attachment {
            attachments: Arc::clone(self),
            id,
            seat,
        })
    }

    /// The write fence of this volume's connections.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    pub fn count(&self) -> usize {
        self.state().connections.len()
    }

    /// Runs `f` with the number of attached connections (None once the volume is being
    /// deleted) while no connection can attach or detach, so a decision taken on that number
    /// (e.g. "shrink only when idle") still holds when `f` acts on it.
    pub fn with_count_locked<T>(&self, f: impl FnOnce(Option<usize>) -> T) -> T {
        let state = self.state();
        f((!state.closed).then_some(state.connections.len()))
    }

    /// Closes the volume to new connections. With `force`, cancels the attached ones and
    /// returns how many; without it, refuses when any is attached.
    pub fn close(&self, force: bool) -> Result<usize, CloseRefused> {
        let mut state = self.state();
        if state.closed {
            return Err(CloseRefused::AlreadyClosed);
        }
        let attached = state.connections.len();
        if attached > 0 && !force {
            return Err(CloseRefused::Busy(attached));
        }
        state.closed = true;
        for connection in state.connections.values() {
            connection.stop.cancel();
        }
        Ok(attached)
    }

    /// Undoes [`Attachments::close`] when the deletion it was for failed.
    pub fn reopen(&self) {
        self.state().closed = false;
    }

    /// Waits until no connection is attached, at most `timeout`; true if none is.
    pub async fn wait_detached(&self, timeout: Duration) -> bool {
        let drained = async {
            loop {
                let notified = self.detached.notified();
                tokio::pin!(notified);
                // Registered before checking, so a detach in between is not missed.
                notified.as_mut().enable();
                if self.count() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, drained).await.is_ok()
    }
}

impl Attachment {
    /// This connection's seat at the volume's fence.
    pub fn seat(&self) -> &Seat {
        &self.seat
    }

    /// Raises the fence for every other connection of the volume whose client is already gone
    /// but whose task has not noticed yet. Called when a connection attaches: that is when a
    /// client that gave up on a connection comes back, and the old connection may still be
    /// reading requests queued before the hang-up. Returns how many it fenced.
    pub fn fence_departed(&self) -> usize {
        let state = self.attachments.state();
        let mut fenced = 0;
        for (id, connection) in &state.connections {
            let gone = *id != self.id
                && !connection.seat.is_draining()
                && connection.probe.as_ref().is_some_and(|p| p.peer_gone());
            if gone && connection.seat.hung_up(&self.attachments.fence) {
                fenced += 1;
            }
        }
        fenced
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        {
            let mut state = self.attachments.state();
            state.connections.remove(&self.id);
            // Under the lock, so `fence_departed` cannot raise it again afterwards.
            self.seat.settle(&self.attachments.fence);
        }
        self.attachments.detached.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn busy_until_forced_and_closed_afterwards() {
        let attachments = Arc::new(Attachments::default());
        let stop = CancellationToken::new();
        let held = attachments.attach(stop.clone(), None).unwrap();
        assert_eq!(attachments.count(), 1);
        assert_eq!(attachments.close(false), Err(CloseRefused::Busy(1)));
        assert!(!stop.is_cancelled());
        assert!(!attachments.wait_detached(Duration::from_millis(20)).await);

        assert_eq!(attachments.close(true), Ok(1));
        assert!(stop.is_cancelled());
        assert!(attachments.attach(CancellationToken::new(), None).is_none());
        assert_eq!(attachments.close(true), Err(CloseRefused::AlreadyClosed));
        let waiter = {
            let attachments = Arc::clone(&attachments);
            tokio::spawn(async move { attachments.wait_detached(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(held);
        assert!(waiter.await.unwrap());
        assert_eq!(attachments.count(), 0);

        attachments.reopen();
        assert!(attachments.attach(CancellationToken::new(), None).is_some());
    }

    #[derive(Debug)]
    struct FakeProbe(Arc<std::sync::atomic::AtomicBool>);

    impl PeerProbe for FakeProbe {
        fn peer_gone(&self) -> bool {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn a_new_connection_fences_one_whose_client_is_gone() {
        let attachments = Arc::new(Attachments::default());
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probe = Box::new(FakeProbe(Arc::clone(&gone)));
        let old = attachments
            .attach(CancellationToken::new(), Some(probe))
            .unwrap();
        let first = attachments.attach(CancellationToken::new(), None).unwrap();
        assert_eq!(first.fence_departed(), 0, "the old client is still there");
        assert!(!attachments.fence().is_raised());

        gone.store(true, std::sync::atomic::Ordering::SeqCst);
        let second = attachments.attach(CancellationToken::new(), None).unwrap();
        assert_eq!(second.fence_departed(), 1);
        assert!(attachments.fence().is_raised());
        assert!(old.seat().is_draining());
        assert_eq!(second.fence_departed(), 0, "fenced once");

        // Detaching settles the seat even if its task never did.
        drop(old);
        assert!(!attachments.fence().is_raised());
        drop((first, second));
    }

    #[test]
    fn limited_attach_refuses_past_the_limit_and_frees_on_drop() {
        let attachments = Arc::new(Attachments::default());
        let first = attachments
            .attach_limited(CancellationToken::new(), None, Some(1))
            .unwrap();
        assert_eq!(
            attachments
                .attach_limited(CancellationToken::new(), None, Some(1))
                .unwrap_err(),
            AttachRefused::Full(1)
        );
        assert!(attachments
            .attach_limited(CancellationToken::new(), None, None)
            .is_ok());
        drop(first);
        assert!(attachments
            .attach_limited(CancellationToken::new(), None, Some(2))
            .is_ok());
    }
}
