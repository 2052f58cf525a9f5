//! Who is using a volume: one entry per attached NBD connection, each with the token that ends
//! it, so that delete can refuse a busy volume or, when forced, disconnect its clients first,
//! and with its seat at the volume's write fence (see `fence`).

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::io::hangups::HangupSet;
use crate::storage::fence::{Fence, Seat};

#[derive(Debug, Default)]
pub struct Attachments {
    state: Mutex<State>,
    /// Connections attached, readable without the lock.
    attached: AtomicUsize,
    /// Woken whenever a connection detaches.
    detached: Notify,
    fence: Fence,
    /// The attached clients' sockets, watched for hang-ups; made on first use. None when the
    /// kernel refused one: fencing then relies on each connection noticing its own end.
    hangups: OnceLock<Option<HangupSet>>,
    /// Set once a failure of `hangups` has been logged.
    hangups_failed: AtomicBool,
}

#[derive(Debug)]
struct Connection {
    stop: CancellationToken,
    seat: Arc<Seat>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    connections: HashMap<u64, Connection>,
    /// Set while no connection may attach, with the operation that closed the volume.
    closed: Option<Closure>,
}

/// The operation a volume (or snapshot view) is closed to clients for. Kept with the closed
/// state, so whoever finds it closed (a client, `volume.delete`, a rollback) is told what is
/// going on rather than that the volume does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Closure {
    /// It is being deleted: for good.
    Deletion,
    /// A restore is writing it.
    Restore,
    /// It is switching its head to a snapshot.
    Rollback,
    /// It is being shrunk.
    Shrink,
}

impl Closure {
    /// What the volume is undergoing, for messages ("volume X is being ...").
    pub fn doing(self) -> &'static str {
        match self {
            Closure::Deletion => "deleted",
            Closure::Restore => "restored",
            Closure::Rollback => "rolled back to a snapshot",
            Closure::Shrink => "shrunk",
        }
    }

    /// What someone who found the volume closed can do about it.
    pub fn advice(self) -> &'static str {
        match self {
            Closure::Restore => "wait for its restore job to end, or cancel it (job cancel)",
            Closure::Deletion | Closure::Rollback | Closure::Shrink => "try again when it ends",
        }
    }
}

/// Why [`Attachments::close`] did not close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseRefused {
    /// This many connections are attached and the close was not forced.
    Busy(usize),
    /// Another operation closed it first.
    AlreadyClosed(Closure),
}

/// Why [`Attachments::attach_limited`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachRefused {
    /// The volume is closed to clients for this operation.
    Closed(Closure),
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

    /// Registers a connection that stops when `stop` is cancelled, and whose client's socket
    /// `client_fd` is. None once the volume is being deleted.
    #[cfg(test)]
    pub fn attach(
        self: &Arc<Self>,
        stop: CancellationToken,
        client_fd: Option<RawFd>,
    ) -> Option<Attachment> {
        self.attach_limited(stop, client_fd, None).ok()
    }

    /// Registers a connection that stops when `stop` is cancelled, refusing once the volume is
    /// being deleted or when `max_connections` are attached already. `client_fd`, the client's
    /// socket, is watched for a hang-up (see [`Attachment::fence_departed`]); it must stay open
    /// for as long as its connection reads requests, and is never used after it is closed.
    pub fn attach_limited(
        self: &Arc<Self>,
        stop: CancellationToken,
        client_fd: Option<RawFd>,
        max_connections: Option<usize>,
    ) -> Result<Attachment, AttachRefused> {
        let mut state = self.state();
        if let Some(closure) = state.closed {
            return Err(AttachRefused::Closed(closure));
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
        };
        if let Some(fd) = client_fd {
            self.watch(fd, id);
        }
        state.connections.insert(id, connection);
        self.attached
            .store(state.connections.len(), Ordering::SeqCst);
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

    fn hangups(&self) -> Option<&HangupSet> {
        self.hangups
            .get_or_init(|| match HangupSet::new() {
                Ok(set) => Some(set),
                Err(e) => {
                    self.hangup_watch_failed(&e);
                    None
                }
            })
            .as_ref()
    }

    fn watch(&self, fd: RawFd, id: u64) {
        if let Some(hangups) = self.hangups() {
            if let Err(e) = hangups.watch(fd, id) {
                self.hangup_watch_failed(&e);
            }
        }
    }

    fn hangup_watch_failed(&self, error: &std::io::Error) {
        if !self.hangups_failed.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "cannot watch clients for hang-ups: a dead connection's writes are fenced only once its own task notices");
        }
    }

    pub fn count(&self) -> usize {
        self.state().connections.len()
    }

    /// Runs `f` with the number of attached connections (or the operation the volume is closed
    /// for) while no connection can attach or detach, so a decision taken on that number
    /// (e.g. "shrink only when idle") still holds when `f` acts on it.
    pub fn with_count_locked<T>(&self, f: impl FnOnce(Result<usize, Closure>) -> T) -> T {
        let state = self.state();
        f(match state.closed {
            None => Ok(state.connections.len()),
            Some(closure) => Err(closure),
        })
    }

    /// Closes the volume to new connections for `closure`. With `force`, cancels the attached
    /// ones and returns how many; without it, refuses when any is attached.
    pub fn close(&self, force: bool, closure: Closure) -> Result<usize, CloseRefused> {
        let mut state = self.state();
        if let Some(earlier) = state.closed {
            return Err(CloseRefused::AlreadyClosed(earlier));
        }
        let attached = state.connections.len();
        if attached > 0 && !force {
            return Err(CloseRefused::Busy(attached));
        }
        state.closed = Some(closure);
        for connection in state.connections.values() {
            connection.seat.force_closed(&self.fence);
            connection.stop.cancel();
        }
        Ok(attached)
    }

    /// The operation the volume is closed to clients for, if any.
    pub fn closure(&self) -> Option<Closure> {
        self.state().closed
    }

    /// Undoes [`Attachments::close`] once the operation it was for, `closure`, has ended (or
    /// failed). A volume closed for another operation meanwhile stays closed.
    pub fn reopen(&self, closure: Closure) {
        let mut state = self.state();
        if state.closed == Some(closure) {
            state.closed = None;
        }
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

    /// Raises the fence for every connection of the volume whose client has hung up or reset
    /// but whose task has not read its way to the end yet (it may still be starting writes
    /// queued before the hang-up, which the client has given up on and may re-send on another
    /// connection). Called when a connection attaches, which is when a client comes back, and
    /// before a connection starts writes or flushes, so a write re-sent on a connection that
    /// was already open cannot overtake the stale one either. One `epoll_wait` while other
    /// connections are attached, nothing otherwise. Returns how many it fenced.
    pub fn fence_departed(&self) -> usize {
        let attachments = &*self.attachments;
        if attachments.attached.load(Ordering::SeqCst) < 2 {
            return 0;
        }
        let Some(hangups) = attachments.hangups() else {
            return 0;
        };
        // Taken before asking, so that when two connections check at once and one gets the
        // report, the other returns only after the fence it raises is up.
        let state = attachments.state();
        let mut hung_up = Vec::new();
        if let Err(e) = hangups.take_hung_up(&mut hung_up) {
            attachments.hangup_watch_failed(&e);
        }
        // A connection's own hang-up counts too: its queued writes are as stale as anyone's.
        hung_up
            .iter()
            .filter_map(|id| state.connections.get(id))
            .filter(|connection| connection.seat.hung_up(&attachments.fence))
            .count()
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        {
            let mut state = self.attachments.state();
            state.connections.remove(&self.id);
            self.attachments
                .attached
                .store(state.connections.len(), Ordering::SeqCst);
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
        assert_eq!(
            attachments.close(false, Closure::Deletion),
            Err(CloseRefused::Busy(1))
        );
        assert!(!stop.is_cancelled());
        assert!(!attachments.wait_detached(Duration::from_millis(20)).await);

        assert_eq!(attachments.close(true, Closure::Restore), Ok(1));
        assert!(stop.is_cancelled());
        assert_eq!(
            attachments
                .attach_limited(CancellationToken::new(), None, None)
                .err(),
            Some(AttachRefused::Closed(Closure::Restore))
        );
        assert_eq!(
            attachments.close(true, Closure::Deletion),
            Err(CloseRefused::AlreadyClosed(Closure::Restore))
        );
        let waiter = {
            let attachments = Arc::clone(&attachments);
            tokio::spawn(async move { attachments.wait_detached(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(held);
        assert!(waiter.await.unwrap());
        assert_eq!(attachments.count(), 0);

        // Only the operation that closed it reopens it.
        attachments.reopen(Closure::Deletion);
        assert!(attachments.attach(CancellationToken::new(), None).is_none());
        attachments.reopen(Closure::Restore);
        assert!(attachments.attach(CancellationToken::new(), None).is_some());
    }

    #[tokio::test]
    async fn a_connection_whose_client_hung_up_is_fenced_once() {
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;

        let attachments = Arc::new(Attachments::default());
        let (old_socket, old_client) = UnixStream::pair().unwrap();
        let old = attachments
            .attach(CancellationToken::new(), Some(old_socket.as_raw_fd()))
            .unwrap();
        assert_eq!(
            old.fence_departed(),
            0,
            "alone on the volume: nothing to fence"
        );
        let (new_socket, _new_client) = UnixStream::pair().unwrap();
        let new = attachments
            .attach(CancellationToken::new(), Some(new_socket.as_raw_fd()))
            .unwrap();
        assert_eq!(new.fence_departed(), 0, "the old client is still there");
        assert!(!attachments.fence().is_raised());

        drop(old_client);
        assert_eq!(new.fence_departed(), 1);
        assert!(attachments.fence().is_raised());
        assert!(old.seat().is_draining());
        assert_eq!(new.fence_departed(), 0, "fenced once");

        // Detaching settles the seat even if its task never did.
        drop(old);
        drop(old_socket);
        assert!(!attachments.fence().is_raised());
        drop(new);
    }

    #[tokio::test]
    async fn a_hang_up_after_the_task_drained_raises_nothing() {
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;

        let attachments = Arc::new(Attachments::default());
        let (socket, client) = UnixStream::pair().unwrap();
        let draining = attachments
            .attach(CancellationToken::new(), Some(socket.as_raw_fd()))
            .unwrap();
        let other = attachments.attach(CancellationToken::new(), None).unwrap();
        draining.seat().drain(attachments.fence(), false, false);
        drop(client);
        assert_eq!(other.fence_departed(), 0);
        assert!(!attachments.fence().is_raised());
        drop((draining, other));
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
