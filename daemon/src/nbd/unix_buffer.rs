//! The send buffer of a client's Unix socket.
//!
//! Linux gives a Unix stream socket 208 KiB of send buffer (net.core.wmem_default), and a stream
//! sender waits whenever that much is queued and unread. A 1 MiB READ reply then goes out in
//! five or more rounds of "fill, sleep until the client has read, wake", each a pair of context
//! switches on both sides. TCP sockets are autotuned up to 4 MiB (net.ipv4.tcp_wmem), so the
//! same reads over loopback TCP never met that wall. Measured with fio (1 MiB reads at depth 8,
//! one connection, three A/B rounds): 1078-1725 MiB/s at the default, 3216-4351 MiB/s with the
//! larger buffer; 4 KiB reads were unchanged.
//!
//! The kernel caps the size at net.core.wmem_max (208 KiB on many distributions): the daemon
//! then says once how to lift it rather than forcing past the administrator's limit.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::UnixStream;

/// Asked of the kernel, which doubles it for its bookkeeping: 4 MiB, TCP's default ceiling.
const UNIX_SEND_BUFFER_BYTES: usize = 2 << 20;

static CAP_REPORTED: AtomicBool = AtomicBool::new(false);

/// Raises the socket's send buffer; reports once when the kernel's limit holds it lower.
pub fn enlarge_send_buffer(stream: &UnixStream) {
    let socket = socket2::SockRef::from(stream);
    if let Err(error) = socket.set_send_buffer_size(UNIX_SEND_BUFFER_BYTES) {
        tracing::debug!(%error, "could not set a Unix socket's send buffer");
        return;
    }
    let Ok(granted_bytes) = socket.send_buffer_size() else {
        return;
    };
    // Linux reports the doubled value.
    if granted_bytes < 2 * UNIX_SEND_BUFFER_BYTES && !CAP_REPORTED.swap(true, Ordering::Relaxed) {
        tracing::info!(
            granted_bytes,
            wanted_bytes = 2 * UNIX_SEND_BUFFER_BYTES,
            "Unix sockets' send buffer is capped by net.core.wmem_max; large reads over the Unix socket are faster with `sysctl net.core.wmem_max=4194304`"
        );
    }
}
