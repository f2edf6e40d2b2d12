//! Leadership as a lease row in PostgreSQL ("One writer" in `docs/guarantees.md`).
//!
//! One task ([`Lease::run`]) owns the lease. It publishes this node's [`Role`] on a watch channel;
//! the node's supervisor starts a leadership term on `Leader`, drains it on `Draining` and cancels it
//! on `Standby`. The database decides who holds the lease (expiry on the database clock); this
//! process decides when *it* must stop, on its own monotonic clock: `sent_at + 2/3 TTL` after the
//! last successful renewal, whatever the database says or fails to say. A [`watchdog`] thread exits
//! the process if a term is still running past that deadline plus a margin (a hung demotion).
//!
//! # Layout
//! - [`Lease`]: the state machine (standby → leader → draining/standby).
//! - [`LeaseHandle`]: what the rest of the node reads (role, validity) and signals (drained, step down).
//! - `leasehold_store::lease`: the acquire/renew and release statements (SQL lives in the store;
//!   this crate decides what their answers mean).
//! - [`watchdog`]: the last line of defence, on a plain OS thread.

pub mod watchdog;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_config::LeaseTimings;
use leasehold_store::lease::{Attempt, LeaseConn};
use leasehold_store::listener::Notice;
use leasehold_store::queries::{CONTROL_CHANNEL, LEASE_CHANNEL};
use leasehold_telemetry::events;
use tokio::sync::{broadcast, watch, Notify};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Store(#[from] leasehold_store::StoreError),
}

/// This node's part in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Standby,
    /// Holds the lease at `epoch` and may ingest until its local deadline.
    Leader {
        epoch: i64,
    },
    /// Still holds the lease, handing over: stop intake, commit and ack what is held, then signal
    /// [`LeaseHandle::term_drained`]; the lease is released after that.
    Draining {
        epoch: i64,
    },
}

impl Role {
    pub fn epoch(&self) -> Option<i64> {
        match self {
            Role::Standby => None,
            Role::Leader { epoch } | Role::Draining { epoch } => Some(*epoch),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Standby => "standby",
            Role::Leader { .. } => "leader",
            Role::Draining { .. } => "draining",
        }
    }
}

/// Settings of one lease participant.
#[derive(Clone)]
pub struct LeaseConfig {
    pub database_url: String,
    pub lease_name: String,
    pub instance_id: String,
    /// Unique per process start.
    pub holder_id: String,
    pub timings: LeaseTimings,
}

/// The URL may hold the password.
impl std::fmt::Debug for LeaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseConfig")
            .field(
                "database_url",
                &leasehold_config::redact_url(&self.database_url),
            )
            .field("lease_name", &self.lease_name)
            .field("instance_id", &self.instance_id)
            .field("holder_id", &self.holder_id)
            .field("timings", &self.timings)
            .finish()
    }
}

/// State shared between the lease task, the supervisor, the watchdog and the HTTP surface.
#[derive(Debug)]
struct Shared {
    base: Instant,
    /// Local deadline as nanoseconds after `base`; 0 before the first term.
    valid_until_ns: AtomicU64,
    term_active: AtomicBool,
    /// When `term_active` or the role last changed, as nanoseconds after `base`.
    term_changed_ns: AtomicU64,
    /// When the lease was last acquired or renewed, as nanoseconds after `base`; 0: never.
    renewed_ns: AtomicU64,
    ttl: Duration,
    drained: Notify,
    step_down: Notify,
    recheck: Notify,
}

impl Shared {
    /// The instant `ns` holds (nanoseconds after `base`); `None` while it is 0.
    fn instant(&self, ns: &AtomicU64) -> Option<Instant> {
        match ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.base + Duration::from_nanos(ns)),
        }
    }

    fn valid_until(&self) -> Option<Instant> {
        self.instant(&self.valid_until_ns)
    }

    fn mark_term_change(&self) {
        let ns = self.base.elapsed().as_nanos() as u64;
        self.term_changed_ns.store(ns, Ordering::Release);
    }

    fn set_valid_until(&self, t: Instant) {
        let ns = t.saturating_duration_since(self.base).as_nanos().max(1) as u64;
        self.valid_until_ns.store(ns, Ordering::Release);
    }

    /// A campaign or renewal sent at `sent_at` succeeded: the deadline moves to `valid_until`.
    fn renewed(&self, sent_at: Instant, valid_until: Instant) {
        self.set_valid_until(valid_until);
        let ns = self.base.elapsed().as_nanos().max(1) as u64;
        self.renewed_ns.store(ns, Ordering::Release);
        events::LeaseRenewed {
            took: sent_at.elapsed(),
        }
        .emit();
    }
}

/// Read side of the lease for the rest of the node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LeaseHandle {
    role: watch::Receiver<Role>,
    shared: Arc<Shared>,
    pub holder_id: String,
    pub lease_name: String,
}

impl LeaseHandle {
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    pub fn watch(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Time left before this node must stop ingesting; `None` when not leading or already past.
    pub fn remaining(&self) -> Option<Duration> {
        self.role().epoch()?;
        let until = self.shared.valid_until()?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    /// Time since this node last acquired or renewed the lease; `None` if it never did.
    pub fn since_renew(&self) -> Option<Duration> {
        let renewed = self.shared.instant(&self.shared.renewed_ns)?;
        Some(renewed.elapsed())
    }

    /// Whether this node may still ingest right now (leading and before its local deadline).
    pub fn is_valid(&self) -> bool {
        self.remaining().is_some()
    }

    /// A leadership term still running after the local deadline: renewals stopped or a
    /// demotion hangs. Such a process must not look live (`/health/live`, systemd's watchdog);
    /// the watchdog thread ends it shortly after.
    pub fn is_stuck(&self) -> bool {
        self.shared.term_active.load(Ordering::Acquire)
            && self
                .shared
                .valid_until()
                .is_some_and(|t| Instant::now() >= t)
    }

    /// Holding the lease without a running term for longer than the TTL: a leader that does not
    /// ingest is a defect (`/health/live` says so; a term that ends is restarted at once).
    pub fn is_idle_leader(&self) -> bool {
        let since = Duration::from_nanos(self.shared.term_changed_ns.load(Ordering::Acquire));
        matches!(self.role(), Role::Leader { .. })
            && !self.shared.term_active.load(Ordering::Acquire)
            && self.shared.base.elapsed().saturating_sub(since) > self.shared.ttl
    }

    /// Asks the lease task to hand over gracefully.
    pub fn step_down(&self) {
        self.shared.step_down.notify_one();
    }

    /// The supervisor has committed and acknowledged everything of the draining term.
    pub fn term_drained(&self) {
        self.shared.drained.notify_one();
    }

    /// Something (a fenced write) suggests the lease is gone: renew now instead of at the next tick.
    pub fn recheck(&self) {
        self.shared.recheck.notify_one();
    }

    /// The supervisor reports whether term tasks are running (read by the watchdog).
    pub fn set_term_active(&self, active: bool) {
        self.shared.term_active.store(active, Ordering::Release);
        self.shared.mark_term_change();
    }
}

/// The lease participant. See the crate docs.
pub struct Lease {
    cfg: LeaseConfig,
    role_tx: watch::Sender<Role>,
    shared: Arc<Shared>,
    notices: Option<broadcast::Receiver<Notice>>,
    conn: Option<LeaseConn>,
    /// Consecutive attempts that timed out on the current connection.
    timeouts: u32,
    /// Whether this node may lead now (it runs the cluster's active configuration): one that
    /// may not does not campaign, and a leader that may no longer hands over.
    eligible: Arc<dyn Fn() -> Option<String> + Send + Sync>,
}

impl Lease {
    pub fn new(
        cfg: LeaseConfig,
        notices: Option<broadcast::Receiver<Notice>>,
    ) -> (Lease, LeaseHandle) {
        let (role_tx, role_rx) = watch::channel(Role::Standby);
        let shared = Arc::new(Shared {
            base: Instant::now(),
            valid_until_ns: AtomicU64::new(0),
            term_active: AtomicBool::new(false),
            term_changed_ns: AtomicU64::new(0),
            renewed_ns: AtomicU64::new(0),
            ttl: cfg.timings.ttl,
            drained: Notify::new(),
            step_down: Notify::new(),
            recheck: Notify::new(),
        });
        let handle = LeaseHandle {
            role: role_rx,
            shared: shared.clone(),
            holder_id: cfg.holder_id.clone(),
            lease_name: cfg.lease_name.clone(),
        };
        (
            Lease {
                cfg,
                role_tx,
                shared,
                notices,
                conn: None,
                timeouts: 0,
                eligible: Arc::new(|| None),
            },
            handle,
        )
    }

    /// Leads only while `barred` says nothing: `Some(why)` keeps a standby from campaigning and
    /// makes a leader hand over gracefully (checked at every attempt and renewal).
    pub fn with_eligibility(
        mut self,
        barred: Arc<dyn Fn() -> Option<String> + Send + Sync>,
    ) -> Self {
        self.eligible = barred;
        self
    }

    /// Campaigns and leads until `cancel`; on cancel a leader drains and releases before returning.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), LeaseError> {
        let t = self.cfg.timings;
        let mut not_before = Instant::now();
        loop {
            // Standby: campaign every poll interval (with jitter), or at once when notified.
            let epoch = loop {
                let wait = jitter(t.poll_interval);
                let next = Instant::now().max(not_before);
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep_until(next.into()) => {}
                }
                let sent_at = Instant::now();
                let barred = (self.eligible)();
                if let Some(why) = &barred {
                    tracing::debug!(why = %why, "not campaigning for the lease");
                }
                let res = match barred {
                    Some(_) => Ok(None),
                    None => self.attempt(t.renew_interval, Attempt::Campaign).await,
                };
                match res {
                    Ok(Some(epoch)) => {
                        self.shared.renewed(sent_at, sent_at + t.demote_after());
                        break epoch;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "lease campaign failed; will retry"),
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.woken() => {}
                }
            };
            events::LeaseAcquired {
                epoch,
                holder_id: &self.cfg.holder_id,
            }
            .emit();
            self.shared.mark_term_change();
            self.role_tx.send_replace(Role::Leader { epoch });
            let released = self.lead(epoch, &cancel).await;
            // After any loss wait one poll interval before campaigning again: no flapping, and
            // a graceful hand-over goes to another node.
            not_before = Instant::now() + t.poll_interval;
            if released && cancel.is_cancelled() {
                return Ok(());
            }
        }
    }

    /// Leads until demoted (returns false) or released gracefully (returns true).
    async fn lead(&mut self, epoch: i64, cancel: &CancellationToken) -> bool {
        let t = self.cfg.timings;
        let retry_delay = (t.renew_interval / 4).min(Duration::from_millis(250));
        let mut next_renew = Instant::now() + t.renew_interval;
        let mut draining = false;
        let mut drain_started = Instant::now();
        loop {
            let Some(deadline) = self.shared.valid_until() else {
                self.demote(epoch, "no deadline");
                return false;
            };
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline.into()) => {
                    self.demote(epoch, "renewal deadline passed without a successful renewal");
                    return false;
                }
                _ = cancel.cancelled(), if !draining => {
                    draining = true;
                    drain_started = Instant::now();
                    self.role_tx.send_replace(Role::Draining { epoch });
                    tracing::info!(epoch, "shutting down: draining the term before releasing the lease");
                }
                _ = self.shared.step_down.notified(), if !draining => {
                    draining = true;
                    drain_started = Instant::now();
                    self.role_tx.send_replace(Role::Draining { epoch });
                    tracing::info!(epoch, "step-down requested: draining the term before releasing the lease");
                }
                _ = self.shared.drained.notified(), if draining => {
                    self.release(epoch).await;
                    tracing::info!(epoch, drain_ms = drain_started.elapsed().as_millis() as u64, "hand-over complete");
                    return true;
                }
                _ = self.shared.recheck.notified() => {
                    next_renew = Instant::now();
                }
                n = next_notice(&mut self.notices), if !draining => {
                    if let Some(Notice::Notify { channel, payload }) = n {
                        tracing::debug!(%channel, %payload, "lease: notification while leading");
                        if channel == CONTROL_CHANNEL && is_step_down_for(&payload, &self.cfg.lease_name, &self.cfg.holder_id) {
                            self.shared.step_down.notify_one();
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_renew.into()) => {
                    let sent_at = Instant::now();
                    // Up to the deadline: a slow answer that still arrives before it keeps the lease.
                    let budget = deadline.saturating_duration_since(sent_at);
                    match self.attempt(budget, Attempt::Renewal).await {
                        Ok(Some(e)) if e == epoch => {
                            self.shared.renewed(sent_at, sent_at + t.demote_after());
                            next_renew = sent_at + t.renew_interval;
                            if let Some(why) = (self.eligible)() {
                                tracing::error!(epoch, why = %why, "this node may not lead: handing over");
                                self.shared.step_down.notify_one();
                            }
                        }
                        Ok(_) => {
                            self.demote(epoch, "lease is held by another node");
                            return false;
                        }
                        Err(e) => {
                            events::LeaseRenewFailed {
                                error: &e,
                                remaining_ms: deadline.saturating_duration_since(Instant::now()).as_millis(),
                            }
                            .emit();
                            next_renew = Instant::now() + retry_delay;
                        }
                    }
                }
            }
        }
    }

    fn demote(&mut self, epoch: i64, reason: &str) {
        self.role_tx.send_replace(Role::Standby);
        events::LeaseLost { epoch, reason }.emit();
        // The connection may be what is stuck; start the next campaign on a fresh one.
        self.conn = None;
    }

    async fn release(&mut self, epoch: i64) {
        let budget = self
            .shared
            .valid_until()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
            .max(Duration::from_millis(500));
        let res = async {
            let c = client(&mut self.conn, &self.cfg, budget).await?;
            tokio::time::timeout(
                budget,
                c.release(&self.cfg.lease_name, &self.cfg.holder_id, epoch),
            )
            .await
            .map_err(|_| leasehold_store::StoreError::Timeout(budget))?
        }
        .await;
        self.role_tx.send_replace(Role::Standby);
        match res {
            Ok(()) => events::LeaseReleased { epoch }.emit(),
            Err(e) => {
                // The lease expires by itself at its TTL; standbys take over then.
                tracing::warn!(error = %e, epoch, "could not release the lease; it will expire at its TTL");
                events::LeaseLost {
                    epoch,
                    reason: "release failed",
                }
                .emit();
                self.conn = None;
            }
        }
    }

    /// One acquire/renew statement within `budget` (client-side timeout and `statement_timeout`).
    async fn attempt(
        &mut self,
        budget: Duration,
        attempt: Attempt,
    ) -> Result<Option<i64>, leasehold_store::StoreError> {
        let budget = budget.max(Duration::from_millis(50));
        let cfg = &self.cfg;
        let ttl = cfg.timings.ttl;
        // One bound for connect + statement: the attempt must end by the caller's deadline.
        let res = tokio::time::timeout(budget, async {
            let c = client(&mut self.conn, cfg, budget).await?;
            c.acquire(
                attempt,
                &cfg.lease_name,
                &cfg.holder_id,
                &cfg.instance_id,
                ttl,
            )
            .await
        })
        .await
        .unwrap_or(Err(leasehold_store::StoreError::Timeout(budget)));
        match &res {
            Ok(_) => self.timeouts = 0,
            // A slow answer is discarded when it arrives; the connection stays, since opening a
            // new one costs several round trips. Twice in a row, it is presumed dead.
            Err(leasehold_store::StoreError::Timeout(_)) if self.timeouts == 0 => self.timeouts = 1,
            Err(_) => {
                self.conn = None;
                self.timeouts = 0;
            }
        }
        res
    }

    async fn woken(&mut self) {
        loop {
            match next_notice(&mut self.notices).await {
                Some(Notice::Notify { channel, .. }) if channel == LEASE_CHANNEL => return,
                Some(Notice::Resync) => return,
                _ => {}
            }
        }
    }
}

/// The dedicated lease connection, (re)connected within `budget`; no other work shares it.
async fn client<'a>(
    conn: &'a mut Option<LeaseConn>,
    cfg: &LeaseConfig,
    budget: Duration,
) -> Result<&'a LeaseConn, leasehold_store::StoreError> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        // The server-side bound is the client's outer bound: the deadline, never later.
        let stmt_timeout = cfg.timings.demote_after();
        let c = tokio::time::timeout(budget, LeaseConn::connect(&cfg.database_url, stmt_timeout))
            .await
            .map_err(|_| leasehold_store::StoreError::Timeout(budget))??;
        *conn = Some(c);
    }
    conn.as_ref()
        .ok_or_else(|| leasehold_store::StoreError::Pool("no lease connection".into()))
}

async fn next_notice(rx: &mut Option<broadcast::Receiver<Notice>>) -> Option<Notice> {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    match r.recv().await {
        Ok(n) => Some(n),
        Err(broadcast::error::RecvError::Lagged(_)) => Some(Notice::Resync),
        Err(broadcast::error::RecvError::Closed) => {
            *rx = None;
            std::future::pending().await
        }
    }
}

/// `step-down <lease> <holder>`; `*` as holder means whoever leads.
fn is_step_down_for(payload: &str, lease: &str, holder: &str) -> bool {
    let mut parts = payload.split_whitespace();
    parts.next() == Some("step-down")
        && parts.next() == Some(lease)
        && matches!(parts.next(), Some(h) if h == holder || h == "*")
}

/// `d` scaled by a random factor in [0.8, 1.2): standbys do not campaign in lockstep.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + fastrand::f64() * 0.4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_down_payloads() {
        assert!(is_step_down_for(
            "step-down mqtt-ingest h1",
            "mqtt-ingest",
            "h1"
        ));
        assert!(is_step_down_for(
            "step-down mqtt-ingest *",
            "mqtt-ingest",
            "h1"
        ));
        assert!(!is_step_down_for(
            "step-down mqtt-ingest h2",
            "mqtt-ingest",
            "h1"
        ));
        assert!(!is_step_down_for("step-down other h1", "mqtt-ingest", "h1"));
        assert!(!is_step_down_for("hello", "mqtt-ingest", "h1"));
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..1000 {
            let j = jitter(Duration::from_secs(1));
            assert!(j >= Duration::from_millis(800) && j < Duration::from_millis(1200));
        }
    }
}
