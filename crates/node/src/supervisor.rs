//! The supervisor turns the lease's role into running work.
//!
//! Per leadership term it starts the MQTT ingest and the writer under a term token: on `Leader`
//! it starts them, on `Draining` it lets them finish (intake stops, the writer commits and acks,
//! DISCONNECT) and then tells the lease to release, on `Standby` it cancels them at once (nothing
//! more is acknowledged; uncommitted messages are redelivered to the next leader).

use std::sync::Arc;
use std::time::Duration;

use leasehold_config::{ClientId, Config};
use leasehold_decode::Decoder;
use leasehold_ingest::{IngestConfig, MqttIngest};
use leasehold_lease::{LeaseHandle, Role};
use leasehold_store::Fence;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster_config::ActiveRx;
use crate::writer::{Writer, WriterConfig};

/// The failpoint of the fault tests (`FAILPOINTS=demotion-hang=return`, in a binary built with
/// the `testing` feature): demotion hangs, so the watchdog must end the process.
pub const DEMOTION_HANG: &str = "demotion-hang";

fn demotion_hangs() -> bool {
    fail::fail_point!(DEMOTION_HANG, |_| true);
    false
}

/// A standby that reached the broker this recently may take over from a leader cut off from it
/// (standbys probe every 5 s and heartbeat every 2 s).
pub const REACHED_WITHIN: Duration = Duration::from_secs(15);

struct Term {
    epoch: i64,
    /// `MAX_PAYLOAD_BYTES` of the term: fixed per broker connection (the largest packet it
    /// accepts), so a new value starts a new term.
    max_payload_bytes: usize,
    /// The Sparkplug B host id whose STATE the term's connection publishes (and has as its
    /// will): a new one starts a new term too.
    sparkplug_host: Option<String>,
    /// Cancelled as soon as any task of the term ends: a term is whole or over.
    ended: CancellationToken,
    broker: watch::Receiver<bool>,
    hard: CancellationToken,
    drain: CancellationToken,
    tracker: TaskTracker,
}

pub struct Supervisor {
    /// The node's configuration at start (its node settings never change).
    pub cfg: Config,
    /// The cluster configuration it runs: each term starts on the newest, and follows it.
    pub active: ActiveRx,
    /// The configured topic filters of the active configuration (`MQTT_TOPICS` and routes').
    pub topics: watch::Receiver<Vec<String>>,
    /// The shared session's client id, resolved at start from the cluster's identity.
    pub client_id: ClientId,
    /// The cluster's identity, named in the leader's claim on its client id.
    pub cluster_id: Option<String>,
    pub lease: LeaseHandle,
    pub device_topics: watch::Receiver<leasehold_ingest::DeviceTopics>,
    /// For the subscription ledger (production nodes always have a database).
    pub pool: Option<leasehold_store::Pool>,
    /// Each term's ingest reports into it.
    pub status: leasehold_telemetry::NodeStatus,
}

impl Supervisor {
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut role_rx = self.lease.watch();
        let mut active = self.active.clone();
        let mut follow = true;
        let mut term: Option<Term> = None;
        loop {
            let role = *role_rx.borrow_and_update();
            match (role, term.take()) {
                (Role::Leader { epoch }, None) => term = Some(self.start_term(epoch)),
                (Role::Leader { epoch }, Some(t)) if t.epoch != epoch => {
                    self.stop_hard(t).await;
                    term = Some(self.start_term(epoch));
                }
                (Role::Leader { .. }, Some(t)) => term = Some(t),
                (Role::Draining { .. }, Some(t)) => {
                    self.drain(t).await;
                    self.lease.term_drained();
                }
                (Role::Draining { .. }, None) => self.lease.term_drained(),
                (Role::Standby, Some(t)) => self.stop_hard(t).await,
                (Role::Standby, None) => {}
            }
            let ended = async {
                match &term {
                    Some(t) => t.ended.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            let step_down_after = self.cfg.node.mqtt_step_down_after;
            let mut broker = term.as_ref().map(|t| t.broker.clone());
            let unreachable = async {
                match broker.as_mut() {
                    Some(rx) if !step_down_after.is_zero() => down_for(rx, step_down_after).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = role_rx.changed() => {
                    if changed.is_err() {
                        // The lease task ended: nothing may run without it.
                        break;
                    }
                }
                _ = unreachable => {
                    if !self.broker_unreachable(&mut role_rx, step_down_after).await {
                        // The lease task ended during the hand-over: the term stops with it.
                        break;
                    }
                }
                changed = active.changed(), if follow => {
                    if changed.is_err() {
                        // The configuration task is gone (shutting down): keep what runs.
                        follow = false;
                        continue;
                    }
                    let (max, host) = {
                        let a = active.borrow_and_update();
                        (a.cfg.cluster.max_payload_bytes, a.cfg.sparkplug_host_id(&self.client_id.id))
                    };
                    if let Some(t) = term.take() {
                        term = Some(self.reconnect_if_needed(t, max, host).await);
                    }
                }
                _ = ended => {
                    // A term task stopped on its own (the writer fenced, the ingest no longer
                    // allowed to connect). A term is whole or over: stop the rest, have the lease
                    // re-check at once, and start a fresh term if still leading (the lease row
                    // can expire under a live leader — a clock step, an operator's UPDATE — and
                    // be renewed at the same epoch).
                    if let Some(t) = term.take() {
                        tracing::warn!(epoch = t.epoch, "leadership term ended unexpectedly; re-checking the lease");
                        self.stop_hard(t).await;
                    }
                    self.lease.recheck();
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    role_rx.mark_changed();
                }
            }
        }
        // Cancelled, or the lease task ended: the term stops with it.
        if let Some(t) = term.take() {
            self.stop_hard(t).await;
        }
        Ok(())
    }

    /// The broker unreachable for `step_down_after`: hands over only to a standby that reaches
    /// it; when none does, a hand-over would move the lease for nothing (and back again), so
    /// this node keeps it and says why. False when the lease task is gone.
    async fn broker_unreachable(
        &self,
        role_rx: &mut watch::Receiver<Role>,
        step_down_after: Duration,
    ) -> bool {
        match self.standby_reaching_broker().await {
            Some(standby) => {
                tracing::error!(after = %leasehold_config::fmt_dur(step_down_after), standby = %standby, "leader cannot reach the broker: stepping down; a standby that reaches it takes over");
                self.status.update_mqtt(|m| m.keeps_lease = None);
                self.lease.step_down();
                // Wait for the role change rather than firing again.
                if role_rx.changed().await.is_err() {
                    return false;
                }
                role_rx.mark_changed();
            }
            None => {
                let why = format!(
                    "cannot reach the broker for {} and no standby reached it within {} either: keeping the lease (the broker, the network to it or the credentials are at fault; a hand-over would not help)",
                    leasehold_config::fmt_dur(step_down_after),
                    leasehold_config::fmt_dur(REACHED_WITHIN)
                );
                if self.status.mqtt().keeps_lease.is_none() {
                    tracing::error!("leader {why}");
                }
                self.status.update_mqtt(|m| m.keeps_lease = Some(why));
            }
        }
        true
    }

    /// A new packet limit or a new Sparkplug STATE (and will) needs a new connection: the term
    /// is handed over to a new one (intake stops, the writer commits and acks, DISCONNECT).
    async fn reconnect_if_needed(&self, t: Term, max: usize, host: Option<String>) -> Term {
        if t.max_payload_bytes == max && t.sparkplug_host == host {
            return t;
        }
        tracing::info!(max_payload_bytes = max, sparkplug_host_id = host.as_deref(), "MAX_PAYLOAD_BYTES or the Sparkplug host changed: restarting the leadership term on a new broker connection");
        let epoch = t.epoch;
        self.drain(t).await;
        self.start_term(epoch)
    }

    /// A standby alive that reached the broker within [`REACHED_WITHIN`], by name. When that
    /// cannot be read, any standby: handing over is what a leader cut off from the broker did
    /// before standbys reported it.
    async fn standby_reaching_broker(&self) -> Option<String> {
        let Some(pool) = &self.pool else {
            return Some("(unknown)".into());
        };
        let read = async {
            let c = leasehold_store::pooled(pool).await?;
            leasehold_store::queries::standby_reached_broker(
                &**c,
                &self.lease.holder_id,
                REACHED_WITHIN,
            )
            .await
        };
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(found)) => return found,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read which standbys reach the broker; handing over")
            }
            Err(_) => {}
        }
        Some("(unknown)".into())
    }

    /// The term's writer settings, from the active configuration.
    fn writer_config(&self, active: &crate::cluster_config::Active) -> WriterConfig {
        let cfg = &active.cfg;
        WriterConfig {
            database_url: cfg
                .node
                .database_url
                .as_deref()
                .unwrap_or_default()
                .to_string(),
            instance_id: cfg.instance_id.clone(),
            batch_max_rows: cfg.cluster.batch_max_rows,
            batch_max_bytes: crate::writer::batch_bytes(cfg),
            batch_max_wait: cfg.cluster.batch_max_wait,
            max_payload_bytes: cfg.cluster.max_payload_bytes,
            decoder: Decoder::configured(cfg),
            redelivery_window: cfg.cluster.redelivery_window,
            max_pending: cfg.max_pending,
            // A backstop only: the lease deadline cancels a hung write (on the server too)
            // long before this.
            statement_timeout: cfg.lease.ttl,
            routes: active.routes.clone(),
            suspended: active.suspended.clone(),
            require_sync_replication: cfg.node.require_sync_replication,
            sparkplug_host_id: cfg.sparkplug_host_id(&self.client_id.id),
        }
    }

    /// The tasks beside a term, not part of it (a refused or slow claim never ends or delays
    /// it): the claim on the client id, and `telemetry`'s partitions under the term's fence.
    fn spawn_beside(&self, cfg: &Config, epoch: i64, fence: &Fence, hard: &CancellationToken) {
        if let Some(pool) = &self.pool {
            tokio::spawn(crate::checks::claim(
                cfg.clone(),
                self.client_id.id.clone(),
                self.cluster_id.clone(),
                pool.clone(),
                epoch,
                hard.clone(),
            ));
        }
        if let Some(url) = cfg.node.database_url.as_deref() {
            tokio::spawn(crate::partitions::maintain(
                url.to_string(),
                fence.clone(),
                self.active.clone(),
                hard.clone(),
            ));
        }
    }

    fn start_term(&self, epoch: i64) -> Term {
        let active = self.active.borrow().clone();
        let cfg = &active.cfg;
        let hard = CancellationToken::new();
        let drain = CancellationToken::new();
        let tracker = TaskTracker::new();
        let ended = CancellationToken::new();
        let lease = self.lease.clone();
        let may_connect: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || lease.is_valid());
        let (ingest, acker, rx) = MqttIngest::new(
            IngestConfig::shared_session(cfg, &self.client_id, epoch > 1),
            self.device_topics.clone(),
            may_connect,
        );
        let ingest = ingest
            .with_status(self.status.clone())
            .with_configured_topics(self.topics.clone());
        let fence = Fence {
            lease_name: cfg.node.lease_name.clone(),
            holder_id: self.lease.holder_id.clone(),
            epoch,
        };
        let ingest = match &self.pool {
            Some(pool) => ingest.with_ledger(Arc::new(crate::ledger::PgLedger {
                pool: pool.clone(),
                fence: fence.clone(),
            })),
            None => ingest,
        };
        let writer = Writer {
            cfg: self.writer_config(&active),
            fence: fence.clone(),
            rx,
            acker,
            status: self.status.clone(),
            active: Some(self.active.clone()),
            publisher: Some(ingest.publisher()),
        };
        let broker = ingest.connected();
        self.lease.set_term_active(true);
        self.spawn_beside(cfg, epoch, &fence, &hard);
        let (h, d, end) = (hard.clone(), drain.clone(), ended.clone());
        tracker.spawn(async move {
            let _end = end.drop_guard();
            if let Err(e) = ingest.run(h, d).await {
                tracing::error!(error = %e, "MQTT ingest stopped");
            }
        });
        let (h, end) = (hard.clone(), ended.clone());
        tracker.spawn(async move {
            let _end = end.drop_guard();
            if let Err(e) = writer.run(h).await {
                tracing::error!(error = %e, "writer stopped");
            }
        });
        tracker.close();
        tracing::info!(epoch, "leadership term started: connecting to the broker");
        Term {
            epoch,
            max_payload_bytes: cfg.cluster.max_payload_bytes,
            sparkplug_host: cfg.sparkplug_host_id(&self.client_id.id),
            ended,
            broker,
            hard,
            drain,
            tracker,
        }
    }

    /// Graceful: stop intake, let the writer commit and ack, flush, disconnect. Bounded by the
    /// lease's own deadline; past it the term is cut off.
    async fn drain(&self, t: Term) {
        t.drain.cancel();
        let budget = self.lease.remaining().unwrap_or(Duration::from_millis(200));
        if tokio::time::timeout(budget, t.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                epoch = t.epoch,
                "drain did not finish before the lease deadline; cutting the term off"
            );
            t.hard.cancel();
            t.tracker.wait().await;
        }
        self.lease.set_term_active(false);
        tracing::info!(epoch = t.epoch, "leadership term drained");
    }

    async fn stop_hard(&self, t: Term) {
        if demotion_hangs() {
            tracing::error!("failpoint {DEMOTION_HANG}: simulating a demotion that hangs");
            std::future::pending::<()>().await;
        }
        t.hard.cancel();
        t.tracker.wait().await;
        self.lease.set_term_active(false);
        tracing::info!(epoch = t.epoch, "leadership term stopped");
    }
}

/// Resolves once `connected` has been false for `grace` without interruption.
async fn down_for(connected: &mut watch::Receiver<bool>, grace: Duration) {
    loop {
        while *connected.borrow_and_update() {
            if connected.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
        let reconnected = async {
            loop {
                if connected.changed().await.is_err() {
                    return std::future::pending::<()>().await;
                }
                if *connected.borrow() {
                    return;
                }
            }
        };
        if tokio::time::timeout(grace, reconnected).await.is_err() {
            return;
        }
    }
}
