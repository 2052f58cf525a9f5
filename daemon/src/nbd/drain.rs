//! A connection's part in write fencing (see `storage::fence`). When it stops serving with
//! writes in flight, it raises its volume's fence until they are done. Requests of a live
//! connection that change data wait at the fence before they start, for the raises up when they
//! came, never for its own connection's raise or a later one. One whose connection has ended
//! (SIGTERM, a forced close, its client gone) never starts while a fence is up: it could land
//! before a stale write it should wait for, or after the rollback or restore that closed its
//! connection. Once the client's own NBD_CMD_DISC has been read (the spec has the server
//! handle the requests sent before it), it waits, then runs, unless a forced close comes too.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::Sleep;

use crate::metrics::VolumeMetrics;
use crate::storage::fence::{Fence, Seat};

/// A fence up this long is logged: the clients of the volume are stalled behind it.
const FENCE_WARN_AFTER: Duration = Duration::from_secs(1);

/// A request cancelled because its connection ended before it started.
#[derive(Debug, thiserror::Error)]
#[error("the connection ended before the request started")]
pub struct Abandoned;

/// Holds a request that changes data (or flushes) while another connection's writes drain.
/// When no fence is up this is two atomic loads. A connection closed by force starts nothing
/// more, fence or none: the rollback, restore or delete that closed it goes ahead once it is
/// detached or after a timeout, and a thread stalled past that (a hung disk) may only then
/// take the requests it had read.
pub async fn pass_fence(
    fence: &Fence,
    seat: &Seat,
    metrics: &VolumeMetrics,
) -> Result<(), Abandoned> {
    if !fence.is_raised() {
        return if seat.is_forced() {
            Err(Abandoned)
        } else {
            Ok(())
        };
    }
    // The horizon first: a raise of this request's own connection before it is seen below.
    let horizon = fence.horizon_for(seat);
    if seat.gives_up_waiting() {
        return Err(Abandoned);
    }
    if let Some(waited) = fence.wait(horizon, || seat.gives_up_waiting()).await {
        metrics.fence_waited(waited);
    }
    if seat.gives_up_waiting() {
        return Err(Abandoned);
    }
    Ok(())
}

/// The connection loop's side: counts the writes in flight and settles the seat once reading
/// is over and they are done.
pub struct Drain<'s> {
    fence: &'s Fence,
    seat: &'s Seat,
    /// Writes, trims and zeroes started and not finished (flushes change no data).
    writes_in_flight: usize,
    /// No more requests are read.
    ended: bool,
    abandoned: bool,
    /// Fires once when this connection's fence has been up for [`FENCE_WARN_AFTER`].
    overdue: Option<Pin<Box<Sleep>>>,
}

impl<'s> Drain<'s> {
    pub fn new(fence: &'s Fence, seat: &'s Seat) -> Drain<'s> {
        Drain {
            fence,
            seat,
            writes_in_flight: 0,
            ended: false,
            abandoned: false,
            overdue: None,
        }
    }

    pub fn write_started(&mut self) {
        self.writes_in_flight += 1;
    }

    /// Lowers the fence with the last write in flight once reading is over.
    pub fn write_finished(&mut self) {
        self.writes_in_flight -= 1;
        if self.ended && self.writes_in_flight == 0 {
            self.settle();
        }
    }

    /// The client sent NBD_CMD_DISC; called before `start`.
    pub fn client_disconnecting(&self) {
        self.seat.client_disconnecting();
    }

    /// The connection reads no more requests; with `abandoned`, its socket is gone too. Raises
    /// the fence while writes are in flight. Cheap when repeated; may be upgraded to abandoned.
    pub fn start(&mut self, abandoned: bool) {
        if self.ended && (self.abandoned || !abandoned) {
            return;
        }
        self.ended = true;
        self.abandoned |= abandoned;
        let raised = self
            .seat
            .drain(self.fence, self.writes_in_flight > 0, abandoned);
        if self.writes_in_flight == 0 {
            self.settle();
        } else if raised && self.overdue.is_none() {
            self.overdue = Some(Box::pin(tokio::time::sleep(FENCE_WARN_AFTER)));
        }
    }

    fn settle(&mut self) {
        self.seat.settle(self.fence);
        self.overdue = None;
    }

    /// Warns once when this connection's fence has been up too long.
    pub fn poll_overdue(&mut self, cx: &mut Context<'_>, peer: &str, volume: &str) {
        let Some(overdue) = self.overdue.as_mut() else {
            return;
        };
        if overdue.as_mut().poll(cx).is_pending() {
            return;
        }
        self.overdue = None;
        tracing::warn!(
            %peer,
            volume,
            writes_in_flight = self.writes_in_flight,
            raised_secs = FENCE_WARN_AFTER.as_secs(),
            "a dead connection's writes are still in flight; the volume's other connections wait for them before writing"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::Metrics;

    #[tokio::test]
    async fn fence_is_up_only_while_draining_writes() {
        let (fence, seat) = (Fence::default(), Seat::default());
        let mut drain = Drain::new(&fence, &seat);
        drain.write_started();
        assert!(!fence.is_raised(), "a live connection raises nothing");
        drain.start(false);
        assert!(fence.is_raised());
        drain.start(true);
        assert!(fence.is_raised() && seat.is_abandoned());
        drain.write_finished();
        assert!(!fence.is_raised());
    }

    #[tokio::test]
    async fn a_forced_close_starts_nothing_more_with_no_fence_up() {
        let (fence, seat) = (Fence::default(), Seat::default());
        let metrics = Metrics::new().volume("v");
        assert!(pass_fence(&fence, &seat, &metrics).await.is_ok());
        seat.force_closed(&fence);
        assert!(!fence.is_raised());
        assert!(pass_fence(&fence, &seat, &metrics).await.is_err());
    }

    #[tokio::test]
    async fn no_writes_in_flight_no_fence() {
        let (fence, seat) = (Fence::default(), Seat::default());
        Drain::new(&fence, &seat).start(true);
        assert!(!fence.is_raised());
    }

    #[tokio::test]
    async fn a_fence_raised_on_hang_up_stays_until_reading_is_over() {
        let (fence, seat) = (Fence::default(), Seat::default());
        let mut drain = Drain::new(&fence, &seat);
        assert!(seat.hung_up(&fence));
        // Requests queued before the hang-up still run; between them nothing is in flight.
        drain.write_started();
        drain.write_finished();
        assert!(fence.is_raised());
        drain.start(false);
        assert!(!fence.is_raised());
    }

    /// A request of `seat`'s connection at the fence, in a task: whether it may start.
    fn spawn_request(
        fence: &Arc<Fence>,
        seat: &Arc<Seat>,
        metrics: &Arc<VolumeMetrics>,
    ) -> tokio::task::JoinHandle<bool> {
        let (fence, seat, metrics) = (Arc::clone(fence), Arc::clone(seat), Arc::clone(metrics));
        tokio::spawn(async move { pass_fence(&fence, &seat, &metrics).await.is_ok() })
    }

    #[tokio::test]
    async fn live_requests_wait_ended_ones_give_up_disconnecting_ones_wait_for_older_raises() {
        let fence = Arc::new(Fence::default());
        let metrics = Metrics::new();
        let volume_metrics = metrics.volume("v");
        let other = Seat::default();
        other.drain(&fence, true, false);

        let live = Arc::new(Seat::default());
        let waiter = spawn_request(&fence, &live, &volume_metrics);
        // At the fence before the raise below, which it therefore does not wait for.
        tokio::time::sleep(Duration::from_millis(20)).await;
        // After its client's DISC, with its own writes in flight (its own raise, newer): its
        // request waits for the older raise only.
        let disconnecting = Arc::new(Seat::default());
        disconnecting.client_disconnecting();
        assert!(disconnecting.drain(&fence, true, false));
        let sent_before_disc = spawn_request(&fence, &disconnecting, &volume_metrics);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "a live connection waits at a raised fence"
        );
        assert!(
            !sent_before_disc.is_finished(),
            "it did not wait for the older raise"
        );

        // Ended otherwise (SIGTERM) or abandoned: no start while a fence is up.
        let ended = Seat::default();
        ended.drain(&fence, false, false);
        assert!(pass_fence(&fence, &ended, &volume_metrics).await.is_err());
        let abandoned = Seat::default();
        abandoned.drain(&fence, false, true);
        assert!(pass_fence(&fence, &abandoned, &volume_metrics)
            .await
            .is_err());

        other.settle(&fence);
        for (what, request) in [("live", waiter), ("sent before DISC", sent_before_disc)] {
            let passed = tokio::time::timeout(Duration::from_secs(5), request)
                .await
                .expect("woken when the older raise is lowered")
                .unwrap();
            assert!(passed, "{what}");
        }
        assert!(fence.is_raised(), "the disconnecting connection's raise");
        disconnecting.settle(&fence);
        let text = metrics.encode();
        assert!(
            text.contains(r#"evsd_volume_fence_waits_total{volume="v"} 2"#),
            "{text}"
        );
    }

    /// A forced close (a rollback, restore or delete) makes a waiting request give up even
    /// after its client's DISC: the operation may go ahead before it would start.
    #[tokio::test]
    async fn a_forced_close_makes_a_request_give_up_even_after_disc() {
        let fence = Arc::new(Fence::default());
        let volume_metrics = Metrics::new().volume("v");
        let dead = Seat::default();
        dead.drain(&fence, true, false);
        let own = Arc::new(Seat::default());
        let request = spawn_request(&fence, &own, &volume_metrics);
        tokio::time::sleep(Duration::from_millis(20)).await;
        own.client_disconnecting();
        own.drain(&fence, true, false);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!request.is_finished());
        own.force_closed(&fence);
        let started = tokio::time::timeout(Duration::from_secs(5), request)
            .await
            .expect("woken by the forced close")
            .unwrap();
        assert!(!started, "a request started after a forced close");
        dead.settle(&fence);
        own.settle(&fence);
    }

    /// A request waiting at the fence whose own connection then ends (SIGTERM, a forced close,
    /// the client gone) never starts: it would race the stale write it waited for, or land
    /// after the rollback that closed its connection.
    #[tokio::test]
    async fn a_waiting_request_whose_connection_ends_never_starts() {
        let fence = Arc::new(Fence::default());
        let metrics = Metrics::new();
        let volume_metrics = metrics.volume("v");
        let dead = Seat::default();
        dead.drain(&fence, true, false);
        let own = Arc::new(Seat::default());
        let waiter = spawn_request(&fence, &own, &volume_metrics);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        // Its connection drains with the request counted in flight: its own raise comes after.
        assert!(own.drain(&fence, true, false));
        let started = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken when its connection ends")
            .unwrap();
        assert!(
            !started,
            "a request that waited started after its connection ended"
        );
        assert!(
            fence.is_raised(),
            "the dead connection's writes are still in flight"
        );
        dead.settle(&fence);
        own.settle(&fence);
        assert!(!fence.is_raised());

        // After the client's own DISC it waits on for the older raise, then starts.
        let dead = Seat::default();
        dead.drain(&fence, true, false);
        let own = Arc::new(Seat::default());
        let waiter = spawn_request(&fence, &own, &volume_metrics);
        tokio::time::sleep(Duration::from_millis(20)).await;
        own.client_disconnecting();
        own.drain(&fence, true, false);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "it stopped waiting for the older raise"
        );
        dead.settle(&fence);
        let started = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken when the older raise is lowered")
            .unwrap();
        assert!(started, "a request sent before DISC was not handled");
        own.settle(&fence);
    }
}
