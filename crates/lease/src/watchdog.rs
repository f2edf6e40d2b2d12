//! The watchdog: a plain OS thread, so it still runs when the async runtime is wedged.
//!
//! If a leadership term is still running past the local deadline plus a margin (a sixth of the TTL,
//! which keeps the exit before the TTL measured from the last renewal), demotion has hung: the
//! process exits and the service manager restarts it. After the process itself was paused
//! (SIGSTOP, VM freeze) the watchdog first gives the runtime the same margin to demote normally.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{LeaseHandle, Shared};

/// Exit code when the watchdog ends the process.
pub const EXIT_CODE: i32 = 70;

pub fn spawn(handle: &LeaseHandle, ttl: Duration) -> std::io::Result<()> {
    let shared: Arc<Shared> = handle.shared.clone();
    let margin = ttl / 6;
    let tick = (ttl / 30).clamp(Duration::from_millis(10), Duration::from_millis(100));
    std::thread::Builder::new()
        .name("leasehold-watchdog".into())
        .spawn(move || {
            let mut last = Instant::now();
            let mut grace_until = Instant::now();
            loop {
                std::thread::sleep(tick);
                let now = Instant::now();
                if now.duration_since(last) > tick * 10 + Duration::from_millis(500) {
                    // We were paused: let the runtime notice and demote first.
                    grace_until = now + margin;
                }
                last = now;
                if now < grace_until || !shared.term_active.load(Ordering::Acquire) {
                    continue;
                }
                if let Some(deadline) = shared.valid_until() {
                    if now > deadline + margin {
                        eprintln!(
                            "leasehold watchdog: leadership term still running {:?} after the lease deadline; demotion is hung, exiting with code {EXIT_CODE} so no stale leader survives",
                            now.duration_since(deadline)
                        );
                        std::process::exit(EXIT_CODE);
                    }
                }
            }
        })
        .map(|_| ())
}
