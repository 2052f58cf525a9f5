//! The two steps of a graceful shutdown, as connections see them.

use tokio_util::sync::CancellationToken;

/// Cancelled by the server, `stop` first; `give_up` only once the grace period ran out.
#[derive(Clone)]
pub struct Shutdown {
    /// Read no new request; answer the ones already received.
    pub stop: CancellationToken,
    /// The grace period is over: send no more replies and close once the requests in flight
    /// are through, so the final flush comes after every write a client was told about and no
    /// reply goes out after it.
    pub give_up: CancellationToken,
}
