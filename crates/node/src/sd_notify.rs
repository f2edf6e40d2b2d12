//! systemd's notify protocol (`Type=notify`, `WatchdogSec=`), without libsystemd.
//!
//! The watchdog is fed only while the node is actually working: a leader past its renewal
//! deadline (renewals stopped: a stuck process) stops feeding it, and systemd restarts the node.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use leasehold_lease::LeaseHandle;
use tokio_util::sync::CancellationToken;

/// The socket systemd gave us, if any.
pub struct Notifier {
    sock: UnixDatagram,
    addr: String,
}

impl Notifier {
    /// `None` when not started by systemd with `Type=notify`.
    pub fn from_env() -> Option<Notifier> {
        let addr = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|a| !a.is_empty())?;
        match UnixDatagram::unbound() {
            Ok(sock) => Some(Notifier { sock, addr }),
            Err(e) => {
                tracing::warn!(error = %e, "NOTIFY_SOCKET is set but no datagram socket could be made");
                None
            }
        }
    }

    pub fn notify(&self, state: &str) {
        let res = if let Some(name) = self.addr.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|a| self.sock.send_to_addr(state.as_bytes(), &a))
        } else {
            self.sock.send_to(state.as_bytes(), &self.addr)
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, state, "sd_notify failed");
        }
    }
}

/// `WATCHDOG_USEC` from systemd: how often it expects a ping (we ping at half of it).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Feeds the watchdog until `cancel`, skipping pings while the node is stuck
/// ([`LeaseHandle::is_stuck`]).
pub async fn watchdog(
    n: std::sync::Arc<Notifier>,
    every: Duration,
    lease: Option<LeaseHandle>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stuck = lease.as_ref().is_some_and(|l| l.is_stuck());
        if stuck {
            tracing::warn!("not feeding the systemd watchdog: past the lease deadline while leading or draining");
        } else {
            n.notify("WATCHDOG=1");
        }
    }
}
