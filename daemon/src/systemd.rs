//! sd_notify messages for `Type=notify`; each is a no-op when NOTIFY_SOCKET is unset.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    // A lost notification must not stop the daemon: systemd's own timeouts handle it.
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "sd_notify failed");
    }
}

/// Every listener is bound and the volumes are loaded.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("shutting down: finishing requests in flight"),
    ]);
}
