//! `leasehold run`: one node ([`Node`]: built on a bound listener, then run until shutdown),
//! its wiring and its shutdown sequence.
//!
//! Shutdown (SIGTERM/SIGINT): the lease is asked to stop first, so a leader drains its term and
//! releases the lease (standbys take over within a second); only then are the other components
//! (HTTP, heartbeats, LISTEN) cancelled. A second signal, or the stop deadline, exits at once.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use leasehold_config::{validate_filter, Config, Mode};
use leasehold_decode::Decoder;
use leasehold_ingest::{DeviceTopics, IngestConfig, MqttIngest};
use leasehold_lease::{Lease, LeaseConfig, LeaseHandle};
use leasehold_retry::{Backoff, Policy, Retry};
use leasehold_store::listener::{Listener, Notice};
use leasehold_store::queries::{self, DEVICES_CHANNEL};
use leasehold_store::Pool;
use leasehold_telemetry::{events, NodeStatus};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster_config::{derived, ActiveRx};
use crate::supervisor::Supervisor;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How often every node reports itself in `cluster_nodes`.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// This many new leaders within ALERT_WINDOW is flapping: a rolling restart of the pair makes
/// two or three, a leader that keeps losing its lease makes more.
pub const FLAP_CHANGES: i64 = 4;

/// One node, configured and listening, not yet running. Tests build it on port 0 and read the
/// port back; `leasehold run` binds `HTTP_ADDR`.
pub struct Node {
    cfg: Config,
    listener: tokio::net::TcpListener,
    port: u16,
}

/// The node's database side: its pool, LISTEN notices and the cluster's identity. `None` only
/// for a `disabled` node without `DATABASE_URL`.
struct Db {
    url: String,
    pool: Pool,
    notices: broadcast::Sender<Notice>,
    identity: Option<queries::ClusterIdentity>,
}

/// A production node's lease: the handle the others read, and the task to stop first.
struct Leadership {
    handle: LeaseHandle,
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

/// Everything a running node spawned, for the shutdown sequence.
struct Running {
    root: CancellationToken,
    tracker: TaskTracker,
    leadership: Option<Leadership>,
    systemd: Option<std::sync::Arc<crate::sd_notify::Notifier>>,
}

impl Node {
    /// Binds `HTTP_ADDR`, then [`Node::build`].
    pub async fn bind(cfg: Config) -> anyhow::Result<Node> {
        let listener = leasehold_http::bind(cfg.node.http_addr).await?;
        Node::build(cfg, listener)
    }

    /// Checks what can be checked before anything connects, on an HTTP listener already bound.
    pub fn build(cfg: Config, listener: tokio::net::TcpListener) -> anyhow::Result<Node> {
        if cfg.mqtt.tls && cfg.node.mqtt_mode != Mode::Disabled {
            // Bad TLS material is a start-up error naming the setting, not a reconnect loop.
            leasehold_ingest::tls_config(&cfg.mqtt)?;
        }
        let port = listener
            .local_addr()
            .context("HTTP listener address")?
            .port();
        Ok(Node {
            cfg,
            listener,
            port,
        })
    }

    /// The HTTP port (the one the OS chose when bound to port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs until `shutdown` fires (a signal in production, a token in tests), then hands over
    /// and stops.
    pub async fn run_until(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Node { cfg, listener, .. } = self;
        let holder_id = format!("{}-{}", cfg.instance_id, uuid::Uuid::new_v4());
        tracing::info!(instance_id = %cfg.instance_id, holder_id = %holder_id, mode = cfg.node.mqtt_mode.as_str(), version = VERSION, config = ?cfg, "starting leasehold node");
        let http_url = format!(
            "http://{}",
            listener.local_addr().context("HTTP listener address")?
        );
        tracing::info!(%http_url, "HTTP listening (/health, /metrics)");

        let root = CancellationToken::new();
        let tracker = TaskTracker::new();
        let db = match Db::open(&cfg, &root, &tracker, &shutdown).await? {
            Some(db) => Some(db),
            None if cfg.node.mqtt_mode == Mode::Disabled || shutdown.is_cancelled() => None,
            None => return cfg.require_database_url().map(|_| ()).map_err(Into::into),
        };
        if shutdown.is_cancelled() {
            return Ok(());
        }
        // The cluster's configuration (imported from this node's own on a first start); routes
        // that do not fit the database refuse the start, before the lease is campaigned for.
        let status = NodeStatus::default();
        let active = match &db {
            Some(db) => crate::cluster_config::start(&cfg, &db.pool, &status).await?,
            None => crate::cluster_config::Active {
                version: None,
                cfg: cfg.clone(),
                routes: Vec::new(),
                suspended: Vec::new(),
            },
        };
        let own = cfg;
        let cfg = active.cfg.clone();
        let (active_tx, active) = watch::channel(std::sync::Arc::new(active));
        // The shared session's client id comes from the database: resolved before anything connects.
        let client_id = match cfg.node.mqtt_mode {
            Mode::Production => Some(crate::identity::resolve(
                &cfg,
                db.as_ref().and_then(|d| d.identity.as_ref()),
            )?),
            _ => None,
        };
        let w = Wiring {
            cfg,
            holder_id,
            http_url,
            db,
            client_id,
            active,
            status,
            root,
            tracker,
        };
        if let Some(db) = &w.db {
            let watcher = crate::cluster_config::Watcher {
                own,
                pool: db.pool.clone(),
                notices: db.notices.subscribe(),
                tx: active_tx,
                status: w.status.clone(),
            };
            let run = watcher.run(w.root.clone());
            w.tracker
                .spawn(logged(run, "cluster configuration task failed"));
        }
        let leadership = w.roles()?;
        let lease = leadership.as_ref().map(|l| l.handle.clone());
        let alerts = w.database_tasks(&lease)?;
        w.serve_http(listener, &lease, alerts);
        w.start_checks();
        let systemd = w.systemd(&lease);
        w.tracker.close();

        shutdown.cancelled().await;
        Running {
            root: w.root,
            tracker: w.tracker,
            leadership,
            systemd,
        }
        .stop(w.cfg.lease.ttl)
        .await;
        Ok(())
    }
}

/// What the node's tasks are started from.
struct Wiring {
    cfg: Config,
    holder_id: String,
    http_url: String,
    db: Option<Db>,
    /// The shared session's client id (production nodes).
    client_id: Option<leasehold_config::ClientId>,
    /// The cluster configuration it runs, applied live (node settings never change).
    active: ActiveRx,
    status: NodeStatus,
    root: CancellationToken,
    tracker: TaskTracker,
}

impl Wiring {
    /// A channel of what `f` makes of the active configuration ([`derived`]).
    fn derived<T: PartialEq + Send + Sync + 'static>(
        &self,
        f: fn(&crate::cluster_config::Active) -> T,
    ) -> watch::Receiver<T> {
        derived(&self.active, f, &self.tracker, &self.root)
    }

    /// The node's part by `MQTT_MODE`: a production node campaigns for the lease and leads its
    /// terms, an observer decodes privately, a disabled node has no MQTT at all.
    fn roles(&self) -> anyhow::Result<Option<Leadership>> {
        let (topics_tx, topics_rx) = watch::channel::<DeviceTopics>(None);
        if let Some(db) = &self.db {
            self.tracker.spawn(device_topics(
                db.pool.clone(),
                db.notices.subscribe(),
                topics_tx,
                self.root.clone(),
            ));
        }
        match (self.cfg.node.mqtt_mode, &self.db, &self.client_id) {
            (Mode::Production, Some(db), Some(client_id)) => {
                lead(self, db, client_id.clone(), topics_rx).map(Some)
            }
            (Mode::Development, _, _) => {
                self.tracker.spawn(observe(
                    self.active.clone(),
                    self.derived(|a| leasehold_ingest::wanted_topics(&a.cfg)),
                    topics_rx,
                    self.status.clone(),
                    self.root.clone(),
                ));
                Ok(None)
            }
            _ => {
                tracing::info!("MQTT_MODE=disabled: no MQTT; health, metrics and CLI only");
                Ok(None)
            }
        }
    }

    /// Heartbeat, alert evaluation and (production) retention, each on its own connection:
    /// no burst of HTTP requests or slow evaluation can delay the node's sign of life.
    fn database_tasks(
        &self,
        lease: &Option<LeaseHandle>,
    ) -> anyhow::Result<Option<leasehold_alerts::AlertsHandle>> {
        let Some(db) = &self.db else {
            return Ok(None);
        };
        let cfg = &self.cfg;
        self.tracker.spawn(heartbeat(
            leasehold_store::pool(&db.url, "leasehold-heartbeat", 1)?,
            db.url.clone(),
            Beat {
                holder_id: self.holder_id.clone(),
                instance_id: cfg.instance_id.clone(),
                mode: cfg.node.mqtt_mode,
                http_url: self.http_url.clone(),
                lease: lease.clone(),
                client_id: self.client_id.clone(),
            },
            self.status.clone(),
            self.root.clone(),
        ));
        let pool = leasehold_store::pool(&db.url, "leasehold-alerts", 1)?;
        let ev = leasehold_alerts::Evaluator::live(self.derived(|a| alerts_config(&a.cfg)), pool);
        let alerts = ev.handle();
        let token = self.root.clone();
        self.tracker.spawn(async move {
            let _ = ev.run(token).await;
        });
        if cfg.node.mqtt_mode == Mode::Production {
            self.tracker
                .spawn(retention(self.active.clone(), &db.url, self.root.clone()));
        }
        Ok(Some(alerts))
    }

    fn serve_http(
        &self,
        listener: tokio::net::TcpListener,
        lease: &Option<LeaseHandle>,
        alerts: Option<leasehold_alerts::AlertsHandle>,
    ) {
        let cfg = &self.cfg;
        let state = leasehold_http::HttpState {
            instance_id: cfg.instance_id.clone(),
            mode: cfg.node.mqtt_mode.as_str(),
            version: VERSION,
            lease: lease.clone(),
            pool: self.db.as_ref().map(|d| d.pool.clone()),
            lease_name: cfg.node.lease_name.clone(),
            observer: cfg.node.mqtt_mode == Mode::Development,
            alerts,
            stale: self.derived(|a| (a.cfg.cluster.stale_warning, a.cfg.cluster.stale_critical)),
            mqtt_client_id: self.client_id.clone(),
            cluster_id: self
                .db
                .as_ref()
                .and_then(|d| d.identity.as_ref())
                .map(|i| i.cluster_id.clone()),
            status: self.status.clone(),
        };
        let serve = leasehold_http::serve(listener, state, self.root.clone());
        self.tracker.spawn(logged(serve, "HTTP server stopped"));
    }

    /// The deployment checks, once, in the background (`/health` shows them when done).
    fn start_checks(&self) {
        if self.db.is_some() {
            self.tracker.spawn(crate::checks::at_start(
                self.cfg.clone(),
                self.status.clone(),
                self.root.clone(),
            ));
        }
    }

    /// Under systemd (`Type=notify`): READY=1 now, and the watchdog pings while the node works.
    fn systemd(
        &self,
        lease: &Option<LeaseHandle>,
    ) -> Option<std::sync::Arc<crate::sd_notify::Notifier>> {
        let n = crate::sd_notify::Notifier::from_env().map(std::sync::Arc::new)?;
        n.notify(&format!("READY=1\nSTATUS=serving on {}", self.http_url));
        if let Some(every) = crate::sd_notify::watchdog_interval() {
            self.tracker.spawn(crate::sd_notify::watchdog(
                n.clone(),
                every,
                lease.clone(),
                self.root.clone(),
            ));
        }
        Some(n)
    }
}

/// Runs `task`, its error logged with `what` (the task ended).
async fn logged<E: std::fmt::Display>(
    task: impl std::future::Future<Output = Result<(), E>>,
    what: &'static str,
) {
    if let Err(e) = task.await {
        tracing::error!(error = %e, "{what}");
    }
}

/// Runs a node until `shutdown` fires, on `HTTP_ADDR`.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    Node::bind(cfg).await?.run_until(shutdown).await
}

impl Db {
    /// Migrates (retrying until the database answers or `shutdown`), then opens the pool and
    /// the LISTEN connection. `None` without `DATABASE_URL`, or on shutdown.
    async fn open(
        cfg: &Config,
        root: &CancellationToken,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Db>> {
        let Some(url) = cfg.node.database_url.as_deref().map(str::to_string) else {
            return Ok(None);
        };
        let pool = leasehold_store::pool(&url, "leasehold-node", cfg.node.database_pool_size)?;
        let identity = migrate_with_retry(&url, shutdown).await?;
        if shutdown.is_cancelled() {
            return Ok(None);
        }
        let l = Listener::new(url.clone());
        let notices = l.sender();
        let token = root.clone();
        tracker.spawn(async move {
            let _ = l.run(token).await;
        });
        Ok(Some(Db {
            url,
            pool,
            notices,
            identity,
        }))
    }
}

/// Starts the lease, its watchdog and the supervisor of leadership terms.
fn lead(
    w: &Wiring,
    db: &Db,
    client_id: leasehold_config::ClientId,
    device_topics: watch::Receiver<DeviceTopics>,
) -> anyhow::Result<Leadership> {
    let cfg = &w.cfg;
    let (lease, handle) = Lease::new(
        LeaseConfig {
            database_url: db.url.clone(),
            lease_name: cfg.node.lease_name.clone(),
            instance_id: cfg.instance_id.clone(),
            holder_id: w.holder_id.clone(),
            timings: cfg.lease,
        },
        Some(db.notices.subscribe()),
    );
    // A node that cannot run the cluster's active configuration does not lead: it would
    // subscribe, decode and route by an older one.
    let status = w.status.clone();
    let lease = lease.with_eligibility(std::sync::Arc::new(move || {
        let c = status.config();
        c.problem.map(|p| {
            format!(
                "it cannot run the cluster configuration's active version {}: {p}",
                c.latest.unwrap_or(0)
            )
        })
    }));
    leasehold_lease::watchdog::spawn(&handle, cfg.lease.ttl)
        .context("starting the watchdog thread")?;
    w.tracker.spawn(probe_broker(
        cfg.clone(),
        handle.clone(),
        w.status.clone(),
        w.root.clone(),
    ));
    let sup = Supervisor {
        cfg: cfg.clone(),
        active: w.active.clone(),
        topics: w.derived(|a| leasehold_ingest::wanted_topics(&a.cfg)),
        client_id,
        cluster_id: db.identity.as_ref().map(|i| i.cluster_id.clone()),
        lease: handle.clone(),
        device_topics,
        pool: Some(db.pool.clone()),
        status: w.status.clone(),
    };
    w.tracker
        .spawn(logged(sup.run(w.root.clone()), "supervisor failed"));
    let stop = CancellationToken::new();
    let task = tokio::spawn(logged(lease.run(stop.clone()), "lease task failed"));
    Ok(Leadership { handle, task, stop })
}

/// How often a standby checks that it can reach the broker (`cluster_nodes.broker_reached_at`).
const PROBE_BROKER_EVERY: Duration = Duration::from_secs(5);

/// A production standby connects to the broker every [`PROBE_BROKER_EVERY`] (a clean session of
/// its own, credentials and TLS as its term would use) and reports when it last could: a leader
/// cut off from the broker hands over only to a standby that can reach it.
async fn probe_broker(
    cfg: Config,
    lease: LeaseHandle,
    status: NodeStatus,
    cancel: CancellationToken,
) {
    use leasehold_doctor::mqtt::{options, random_suffix, Conn};
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(PROBE_BROKER_EVERY) => {}
        }
        if lease.role() != leasehold_lease::Role::Standby {
            continue;
        }
        let id = format!("leasehold-reach-{}", random_suffix());
        let opened = tokio::time::timeout(PROBE_BROKER_EVERY, Conn::open(options(&cfg, &id, true)));
        match opened.await {
            Ok(Ok((c, _))) => {
                c.close().await;
                status.update_mqtt(|m| m.probe_reached = Some(Instant::now()));
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "standby cannot reach the broker"),
            Err(_) => tracing::debug!("standby's broker probe timed out"),
        }
    }
}

/// The retention task of a production node: old dead letters, alerts, lease history and nodes,
/// as the cluster's configuration says at each round.
fn retention(
    active: ActiveRx,
    url: &str,
    cancel: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    use leasehold_store::retention::{Policy, Table};
    let current = move || {
        let r = active.borrow().cfg.cluster.retention();
        Policy {
            tables: vec![
                (Table::DeadLetters, r.dead_letters),
                (Table::Alerts, r.alerts),
                (Table::LeaseHistory, r.lease_history),
                (Table::ClusterNodes, r.cluster_nodes),
            ],
            interval: r.interval,
        }
    };
    leasehold_store::retention::run(url.to_string(), current, cancel)
}

impl Running {
    /// The lease is asked to stop first, so a leader drains its term and releases the lease;
    /// then everything else is cancelled.
    async fn stop(self, ttl: Duration) {
        if let Some(n) = &self.systemd {
            n.notify("STOPPING=1");
        }
        let started = Instant::now();
        tracing::info!("shutdown requested: handing over before stopping");
        if let Some(l) = self.leadership {
            l.stop.cancel();
            // The lease task returns once its term is drained and the lease released (or lost).
            if tokio::time::timeout(ttl, l.task).await.is_err() {
                tracing::warn!("hand-over did not finish within LEASE_TTL; stopping anyway");
            }
        }
        self.root.cancel();
        if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 5s; exiting anyway");
        }
        tracing::info!(ms = started.elapsed().as_millis() as u64, "stopped");
    }
}

fn alerts_config(cfg: &Config) -> leasehold_alerts::AlertsConfig {
    leasehold_alerts::AlertsConfig {
        instance_id: cfg.instance_id.clone(),
        lease_name: cfg.node.lease_name.clone(),
        cluster_name: cfg.node.lease_name.clone(),
        thresholds: leasehold_alerts::Thresholds {
            stale_warning: cfg.cluster.stale_warning,
            stale_critical: cfg.cluster.stale_critical,
            grace: cfg.cluster.alert_grace,
            window: cfg.cluster.alert_window,
            flap_changes: FLAP_CHANGES,
            require_sync_replication: cfg.node.require_sync_replication,
        },
        check_interval: cfg.cluster.alert_check_interval,
        webhook_url: cfg.cluster.alert_webhook_url.as_deref().map(str::to_string),
        // Every production node evaluates (a leader cannot report its own death); so does a
        // `disabled` node (a watcher). An observer is a developer's: never (docs/interfaces.md, alerts).
        evaluates: cfg.node.mqtt_mode != Mode::Development,
    }
}

/// Migrations wait for the database: 250 ms doubling to 5 s.
const MIGRATE_RETRY: Policy =
    Policy::new(Duration::from_millis(250), Duration::from_secs(5)).jitter(0.0);

/// Applies migrations, then reads the cluster's identity (`None` if its row was deleted, or on
/// shutdown).
async fn migrate_with_retry(
    url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<queries::ClusterIdentity>> {
    let mut retry = Backoff::new(MIGRATE_RETRY);
    loop {
        let res = async {
            let mut c = leasehold_store::connect(url, "leasehold-migrate").await?;
            let applied = leasehold_store::migrate(&mut c).await?;
            Ok::<_, leasehold_store::StoreError>((applied, queries::cluster_identity(&c).await?))
        }
        .await;
        match res {
            Ok((applied, identity)) => {
                if !applied.is_empty() {
                    tracing::info!(?applied, "migrations applied");
                }
                return Ok(identity);
            }
            Err(e @ leasehold_store::StoreError::Migration { .. })
            | Err(e @ leasehold_store::StoreError::Url(_)) => return Err(e.into()),
            Err(e) => {
                let report = |r: Retry| tracing::warn!(error = %e, retry_in_ms = r.wait.as_millis() as u64, "database not reachable for migrations; retrying");
                if !retry.wait(report, shutdown).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Keeps the enabled device topics current: at start, on NOTIFY from the `devices` trigger,
/// after a LISTEN reconnect, and every 30 s as a fallback.
async fn device_topics(
    pool: Pool,
    mut notices: broadcast::Receiver<Notice>,
    tx: watch::Sender<DeviceTopics>,
    cancel: CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_secs(30));
    loop {
        let load = async {
            let c = leasehold_store::pooled(&pool).await?;
            queries::device_topics(&**c).await
        };
        match tokio::time::timeout(Duration::from_secs(5), load).await {
            Ok(Ok(topics)) => {
                let valid: Vec<String> = topics
                    .into_iter()
                    .filter(|t| match validate_filter(t) {
                        Ok(()) => true,
                        Err(reason) => {
                            tracing::error!(topic = %t, %reason, "ignoring invalid topic in devices");
                            false
                        }
                    })
                    .collect();
                // This task is the channel's only sender.
                if tx.borrow().as_ref() != Some(&valid) {
                    tracing::info!(devices_topics = valid.len(), "device topics loaded");
                    tx.send_replace(Some(valid));
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not load device topics; keeping the current ones")
            }
            Err(_) => tracing::warn!("loading device topics timed out; keeping the current ones"),
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = every.tick() => break,
                n = notices.recv() => match n {
                    Ok(Notice::Notify { channel, .. }) if channel == DEVICES_CHANNEL => break,
                    Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }
}

/// Who this node is, as its heartbeat reports it in `cluster_nodes`.
struct Beat {
    holder_id: String,
    instance_id: String,
    mode: Mode,
    http_url: String,
    lease: Option<LeaseHandle>,
    client_id: Option<leasehold_config::ClientId>,
}

/// Every this many heartbeats the node reads how the database replicates commits.
const REPLICATION_EVERY: u32 = 3;

/// What a node's heartbeats carry from one beat to the next.
struct Beats {
    me: Beat,
    status: NodeStatus,
    started_at: chrono::DateTime<Utc>,
    /// Events already reported: one newer than these is reported as "happened now", so every
    /// node can judge the session-lost and client-id alerts from this table.
    reported: (Option<chrono::DateTime<Utc>>, Option<chrono::DateTime<Utc>>),
    /// Whether the last beat could not record the leader's term for data age (warned once).
    term_failing: bool,
}

/// What one beat read back.
struct BeatRead {
    alive_nodes: usize,
    newest_data_age: Option<f64>,
    reported: (Option<chrono::DateTime<Utc>>, Option<chrono::DateTime<Utc>>),
    /// Why the leader's term could not be recorded for data age, if it could not.
    term_failed: Option<String>,
}

impl Beats {
    /// The routes the writer of term `epoch` holds suspended, `{"route": "why"}` (`{}`: none);
    /// `None` until that term's writer has said (the alerts then judge by dead letters).
    fn suspended_routes(&self, epoch: i64) -> Option<serde_json::Value> {
        let (term, routes) = self.status.routes_of_term();
        if term != Some(epoch) {
            return None;
        }
        let suspended: serde_json::Map<String, serde_json::Value> = routes
            .into_iter()
            .filter_map(|r| Some((r.name, serde_json::Value::String(r.suspended?))))
            .collect();
        Some(serde_json::Value::Object(suspended))
    }

    /// One beat on connection `c`: a leader's term first (until a new one is recorded, every
    /// node reads data age from `telemetry` after the term's first seconds; a removed record
    /// is made again), then the node's row, then the cluster's view.
    async fn beat(
        &self,
        c: &leasehold_store::Client,
    ) -> Result<BeatRead, leasehold_store::StoreError> {
        let me = &self.me;
        let role = match (&me.lease, me.mode) {
            (Some(l), _) => l.role().as_str(),
            (None, Mode::Development) => "observer",
            (None, _) => "disabled",
        };
        let mqtt = self.status.mqtt();
        let now = (mqtt.session_lost_at, mqtt.client_id_conflict_at);
        let newer = |at: Option<chrono::DateTime<Utc>>, seen| at.filter(|_| at != seen);
        let leading = me.lease.as_ref().and_then(|l| l.role().epoch());
        // Not recorded (a statement holds the record): the next beat asks again. A failure (a
        // role that may not update the record: doctor names it) must not keep the node's own
        // row from being written.
        let mut term_failed = None;
        if let Some(epoch) = leading {
            if let Err(e) = queries::note_term(c, epoch).await {
                term_failed = Some(e.to_string());
            }
        }
        queries::heartbeat(
            c,
            &queries::Heartbeat {
                holder_id: &me.holder_id,
                instance_id: &me.instance_id,
                role,
                mode: me.mode.as_str(),
                version: VERSION,
                http_url: Some(&me.http_url),
                started_at: self.started_at,
                mqtt_connected: mqtt.connected,
                session_lost_at: newer(now.0, self.reported.0).map(|_| Utc::now()),
                client_id_conflict_at: newer(now.1, self.reported.1).map(|_| Utc::now()),
                mqtt_client_id: me.client_id.as_ref().map(|c| c.id.as_str()),
                mqtt_client_id_source: me.client_id.as_ref().map(|c| c.source.as_str()),
                config_version: self.status.config().version,
                broker_reached_ago: match mqtt.connected {
                    true => Some(0.0),
                    false => mqtt.probe_reached.map(|t| t.elapsed().as_secs_f64()),
                },
                suspended_routes: leading.and_then(|e| self.suspended_routes(e)),
            },
        )
        .await?;
        Ok(BeatRead {
            alive_nodes: queries::alive(c).await?.nodes as usize,
            newest_data_age: queries::newest_data_age(c).await?,
            reported: now,
            term_failed,
        })
    }

    /// Keeps what a beat read: in the status, and for the next beat.
    fn read(&mut self, r: BeatRead) {
        self.reported = r.reported;
        // Every node's data age reads `telemetry` while the term is not recorded.
        if let Some(e) = &r.term_failed {
            if !self.term_failing {
                tracing::warn!(error = %e, "could not record this leader's term for data age: every node reads telemetry for it");
            }
        }
        self.term_failing = r.term_failed.is_some();
        self.status.update_cluster(|c| {
            c.alive_nodes = Some(r.alive_nodes);
            c.newest_data_age = r.newest_data_age;
        });
        events::ClusterRead {
            alive_nodes: r.alive_nodes,
            newest_data_age: r.newest_data_age,
        }
        .emit();
    }
}

/// Reports the node in `cluster_nodes` every `HEARTBEAT_EVERY`, with a new leader's term (data
/// age), and reads back the cluster's view (nodes alive, newest data)
/// into the status; every `REPLICATION_EVERY` beats also how the
/// database replicates commits (a failover or a standby lost changes it).
async fn heartbeat(
    pool: Pool,
    url: String,
    me: Beat,
    status: NodeStatus,
    cancel: CancellationToken,
) {
    let mut beats = Beats {
        me,
        status,
        started_at: Utc::now(),
        reported: (None, None),
        term_failing: false,
    };
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    let mut count = 0u32;
    // How a stuck beat's statement is cancelled: the server's TLS settings, read once.
    let cancel_tls = match leasehold_store::pg_config(&url, "leasehold-cancel") {
        Ok((_, tls)) => Some(tls),
        Err(e) => {
            tracing::debug!(error = %e, "a stuck heartbeat statement cannot be cancelled");
            None
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if count.is_multiple_of(REPLICATION_EVERY) {
            crate::checks::read_replication(&pool, &beats.status).await;
        }
        count = count.wrapping_add(1);
        // The running statement, cancelled when the beat times out: a commit waiting for a
        // synchronous standby that is not there waits forever on the server (statement_timeout
        // does not bound it), and the pool's one connection would stay stuck behind it, the
        // replication reads (what /health says about it) included.
        let running = std::sync::Mutex::new(None);
        let work = async {
            let c = leasehold_store::pooled(&pool).await?;
            if let Ok(mut r) = running.lock() {
                *r = cancel_tls
                    .clone()
                    .map(|tls| leasehold_store::CancelHandle::with_tls(&c, tls));
            }
            beats.beat(&c).await
        };
        match tokio::time::timeout(HEARTBEAT_EVERY, work).await {
            Ok(Ok(read)) => beats.read(read),
            Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat failed"),
            Err(_) => {
                tracing::debug!("heartbeat timed out");
                let stop = running.lock().ok().and_then(|mut r| r.take());
                if let Some(stop) = stop {
                    if let Err(e) = stop.cancel().await {
                        tracing::debug!(error = %e, "could not cancel the heartbeat's statement");
                    }
                }
            }
        }
    }
}

/// `MQTT_MODE=development`: a private clean session that decodes and counts, never writes.
async fn observe(
    mut active: ActiveRx,
    configured: watch::Receiver<Vec<String>>,
    topics: watch::Receiver<DeviceTopics>,
    status: NodeStatus,
    cancel: CancellationToken,
) {
    let mut cfg = active.borrow_and_update().cfg.clone();
    let client_id = format!(
        "leasehold-dev-{}-{}",
        cfg.instance_id,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let (ingest, _acker, mut rx) = MqttIngest::new(
        IngestConfig::observer(&cfg, client_id),
        topics,
        std::sync::Arc::new(|| true),
    );
    // It follows the cluster's configuration as a leader would: topics, decoding, routes.
    let ingest = ingest
        .with_status(status)
        .with_configured_topics(configured);
    let mut decoder = Decoder::configured(&cfg);
    // Sparkplug B births seen by this observer: its own, in memory (a leader's are in the
    // database; the observer never writes).
    let mut sparkplug = leasehold_decode::sparkplug::Host::default();
    let drain = CancellationToken::new();
    let token = cancel.clone();
    let run = tokio::spawn(async move { ingest.run(token, drain).await });
    let mut summary = tokio::time::interval(Duration::from_secs(10));
    let (mut ok, mut bad) = (0u64, 0u64);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = summary.tick() => {
                if ok + bad > 0 {
                    tracing::info!(would_write = ok, would_dead_letter = bad, "observer: nothing written (development mode)");
                }
            }
            m = rx.recv() => {
                let Some(m) = m else { break };
                if active.has_changed().unwrap_or(false) {
                    cfg = active.borrow_and_update().cfg.clone();
                    decoder = Decoder::configured(&cfg);
                }
                events::MessageObserved.emit();
                // A routed message needs no device id or timestamp: only its routes' columns do.
                let routes: Vec<&str> = cfg
                    .routes
                    .iter()
                    .filter(|r| r.topics.iter().any(|f| rumqttc::matches(&m.topic, f)))
                    .map(|r| r.name.as_str())
                    .collect();
                if !routes.is_empty() {
                    match decoder.parse(&m.topic, &m.payload) {
                        Ok(_) => { ok += 1; tracing::debug!(topic = %m.topic, routes = ?routes, "observer: would write to its routes"); }
                        Err(e) => { bad += 1; tracing::info!(topic = %m.topic, routes = ?routes, error = %e, "observer: would dead-letter"); }
                    }
                    continue;
                }
                for reading in decoder.check_with(&m.topic, &m.payload, chrono::Utc::now(), Some(&mut sparkplug)) {
                    match reading {
                        Ok(()) => { ok += 1; tracing::debug!(topic = %m.topic, "observer: would write"); }
                        Err(e) => { bad += 1; tracing::info!(topic = %m.topic, error = %e, "observer: would dead-letter"); }
                    }
                }
            }
        }
    }
    let _ = run.await;
}
