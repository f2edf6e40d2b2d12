//! `leasehold run`: wiring of one node and its shutdown sequence.
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
use leasehold_store::listener::{Listener, Notice};
use leasehold_store::queries::{self, DEVICES_CHANNEL};
use leasehold_store::Pool;
use leasehold_telemetry::metrics;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::supervisor::Supervisor;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How often every node reports itself in `cluster_nodes`.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// A node not seen for this long is not counted alive.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(10);
/// This many new leaders within ALERT_WINDOW is flapping: a rolling restart of the pair makes
/// two or three, a leader that keeps losing its lease makes more.
pub const FLAP_CHANGES: i64 = 4;

/// Runs a node until `shutdown` fires (a signal in production, a token in tests).
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let holder_id = format!("{}-{}", cfg.instance_id, uuid::Uuid::new_v4());
    tracing::info!(instance_id = %cfg.instance_id, holder_id = %holder_id, mode = cfg.mode.as_str(), version = VERSION, config = ?cfg, "starting leasehold node");

    if cfg.mqtt.tls && cfg.mode != Mode::Disabled {
        // Bad TLS material is a start-up error naming the setting, not a reconnect loop.
        leasehold_ingest::tls_config(&cfg.mqtt)?;
    }
    let listener = leasehold_http::bind(cfg.http_addr).await?;
    let http_url = format!(
        "http://{}",
        listener.local_addr().context("HTTP listener address")?
    );
    tracing::info!(%http_url, "HTTP listening (/health, /metrics)");

    let url = cfg.database_url.clone();
    let pool = match &url {
        Some(u) => Some(leasehold_store::pool(
            u,
            "leasehold-node",
            cfg.database_pool_size,
        )?),
        None if cfg.mode == Mode::Disabled => None,
        None => cfg.require_database_url().map(|_| None)?,
    };

    let root = CancellationToken::new();
    let lease_stop = CancellationToken::new();
    let tracker = TaskTracker::new();

    let identity = match &url {
        Some(u) => migrate_with_retry(u, &shutdown).await?,
        None => None,
    };
    if shutdown.is_cancelled() {
        return Ok(());
    }
    // The shared session's client id comes from the database: resolved before anything connects.
    let client_id = match cfg.mode {
        Mode::Production => Some(crate::identity::resolve(&cfg, identity.as_ref())?),
        _ => None,
    };

    let notices: Option<broadcast::Sender<Notice>> = url.as_ref().map(|u| {
        let l = Listener::new(u.clone());
        let tx = l.sender();
        let token = root.clone();
        tracker.spawn(async move {
            let _ = l.run(token).await;
        });
        tx
    });

    let (topics_tx, topics_rx) = watch::channel::<DeviceTopics>(None);
    if let (Some(pool), Some(n)) = (&pool, &notices) {
        tracker.spawn(device_topics(
            pool.clone(),
            n.subscribe(),
            topics_tx,
            root.clone(),
        ));
    }

    let mut lease_handle: Option<LeaseHandle> = None;
    let mut lease_task = None;
    match cfg.mode {
        Mode::Production => {
            let (lease, handle) = Lease::new(
                LeaseConfig {
                    database_url: url.clone().unwrap_or_default(),
                    lease_name: cfg.lease_name.clone(),
                    instance_id: cfg.instance_id.clone(),
                    holder_id: holder_id.clone(),
                    timings: cfg.lease,
                },
                notices.as_ref().map(|n| n.subscribe()),
            );
            leasehold_lease::watchdog::spawn(&handle, cfg.lease.ttl)
                .context("starting the watchdog thread")?;
            let sup = Supervisor {
                cfg: cfg.clone(),
                client_id: client_id
                    .clone()
                    .context("production mode resolves a client id")?,
                lease: handle.clone(),
                device_topics: topics_rx.clone(),
                pool: pool.clone(),
            };
            let token = root.clone();
            tracker.spawn(async move {
                if let Err(e) = sup.run(token).await {
                    tracing::error!(error = %e, "supervisor failed");
                }
            });
            let token = lease_stop.clone();
            lease_task = Some(tokio::spawn(async move {
                if let Err(e) = lease.run(token).await {
                    tracing::error!(error = %e, "lease task failed");
                }
            }));
            lease_handle = Some(handle);
        }
        Mode::Development => {
            tracker.spawn(observe(cfg.clone(), topics_rx.clone(), root.clone()));
        }
        Mode::Disabled => {
            tracing::info!("MQTT_MODE=disabled: no MQTT; health, metrics and CLI only")
        }
    }

    if let Some(u) = &url {
        // Its own connection: no burst of HTTP requests can delay the node's sign of life.
        tracker.spawn(heartbeat(
            leasehold_store::pool(u, "leasehold-heartbeat", 1)?,
            holder_id.clone(),
            cfg.instance_id.clone(),
            cfg.mode,
            http_url.clone(),
            lease_handle.clone(),
            client_id.clone(),
            root.clone(),
        ));
    }

    let alerts = match &url {
        Some(u) => {
            // Its own connection: a slow or flooded evaluation never holds one heartbeats need.
            let pool = leasehold_store::pool(u, "leasehold-alerts", 1)?;
            let ev = leasehold_alerts::Evaluator::new(alerts_config(&cfg), pool);
            let handle = ev.handle();
            let token = root.clone();
            tracker.spawn(async move {
                let _ = ev.run(token).await;
            });
            Some(handle)
        }
        None => None,
    };
    if let (Some(u), Mode::Production) = (&url, cfg.mode) {
        use leasehold_store::retention::Table;
        let r = cfg.retention;
        let policy = vec![
            (Table::DeadLetters, r.dead_letters),
            (Table::Alerts, r.alerts),
            (Table::LeaseHistory, r.lease_history),
            (Table::ClusterNodes, r.cluster_nodes),
        ];
        tracker.spawn(leasehold_store::retention::run(
            u.clone(),
            policy,
            r.interval,
            root.clone(),
        ));
    }

    let state = leasehold_http::HttpState {
        instance_id: cfg.instance_id.clone(),
        mode: cfg.mode.as_str(),
        version: VERSION,
        lease: lease_handle.clone(),
        pool: pool.clone(),
        lease_name: cfg.lease_name.clone(),
        observer: cfg.mode == Mode::Development,
        alerts,
        stale_warning: cfg.stale_warning,
        stale_critical: cfg.stale_critical,
        alive_within: ALIVE_WITHIN,
        mqtt_client_id: client_id.clone(),
        cluster_id: identity.as_ref().map(|i| i.cluster_id.clone()),
    };
    let token = root.clone();
    tracker.spawn(async move {
        if let Err(e) = leasehold_http::serve(listener, state, token).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    let systemd = crate::sd_notify::Notifier::from_env().map(std::sync::Arc::new);
    if let Some(n) = &systemd {
        n.notify(&format!("READY=1\nSTATUS=serving on {http_url}"));
        if let Some(every) = crate::sd_notify::watchdog_interval() {
            tracker.spawn(crate::sd_notify::watchdog(
                n.clone(),
                every,
                lease_handle.clone(),
                root.clone(),
            ));
        }
    }
    tracker.close();

    shutdown.cancelled().await;
    if let Some(n) = &systemd {
        n.notify("STOPPING=1");
    }
    let started = Instant::now();
    tracing::info!("shutdown requested: handing over before stopping");
    lease_stop.cancel();
    if let Some(task) = lease_task {
        // The lease task returns once its term is drained and the lease released (or lost).
        if tokio::time::timeout(cfg.lease.ttl, task).await.is_err() {
            tracing::warn!("hand-over did not finish within LEASE_TTL; stopping anyway");
        }
    }
    root.cancel();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop within 5s; exiting anyway");
    }
    tracing::info!(ms = started.elapsed().as_millis() as u64, "stopped");
    Ok(())
}

fn alerts_config(cfg: &Config) -> leasehold_alerts::AlertsConfig {
    leasehold_alerts::AlertsConfig {
        instance_id: cfg.instance_id.clone(),
        lease_name: cfg.lease_name.clone(),
        cluster_name: cfg.lease_name.clone(),
        thresholds: leasehold_alerts::Thresholds {
            stale_warning: cfg.stale_warning,
            stale_critical: cfg.stale_critical,
            grace: cfg.alert_grace,
            window: cfg.alert_window,
            flap_changes: FLAP_CHANGES,
        },
        check_interval: cfg.alert_check_interval,
        alive_within: ALIVE_WITHIN,
        webhook_url: cfg.alert_webhook_url.clone(),
        // Every production node evaluates (a leader cannot report its own death); so does a
        // `disabled` node (a watcher). An observer is a developer's: never (SPEC §13).
        evaluates: cfg.mode != Mode::Development,
    }
}

/// Applies migrations, then reads the cluster's identity (`None` if its row was deleted, or on
/// shutdown).
async fn migrate_with_retry(
    url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<queries::ClusterIdentity>> {
    let mut backoff = Duration::from_millis(250);
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
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "database not reachable for migrations; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
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
                tx.send_if_modified(|cur| {
                    if cur.as_ref() != Some(&valid) {
                        tracing::info!(devices_topics = valid.len(), "device topics loaded");
                        *cur = Some(valid);
                        true
                    } else {
                        false
                    }
                });
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

#[allow(clippy::too_many_arguments)]
async fn heartbeat(
    pool: Pool,
    holder_id: String,
    instance_id: String,
    mode: Mode,
    http_url: String,
    lease: Option<LeaseHandle>,
    client_id: Option<leasehold_config::ClientId>,
    cancel: CancellationToken,
) {
    let started_at = Utc::now();
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    // Counters seen at the last heartbeat: an increase is reported as "happened now", so every
    // node can judge the session-lost and client-id alerts from this table.
    let m = metrics();
    let mut seen = (m.mqtt_session_lost.get(), m.mqtt_client_id_conflicts.get());
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let role = match (&lease, mode) {
            (Some(l), _) => l.role().as_str(),
            (None, Mode::Development) => "observer",
            (None, _) => "disabled",
        };
        let now = (m.mqtt_session_lost.get(), m.mqtt_client_id_conflicts.get());
        let session_lost_at = (now.0 > seen.0).then(Utc::now);
        let client_id_conflict_at = (now.1 > seen.1).then(Utc::now);
        let work = async {
            let c = leasehold_store::pooled(&pool).await?;
            queries::heartbeat(
                &**c,
                &queries::Heartbeat {
                    holder_id: &holder_id,
                    instance_id: &instance_id,
                    role,
                    mode: mode.as_str(),
                    version: VERSION,
                    http_url: Some(&http_url),
                    started_at,
                    mqtt_connected: m.mqtt_connected.get() == 1,
                    session_lost_at,
                    client_id_conflict_at,
                    mqtt_client_id: client_id.as_ref().map(|c| c.id.as_str()),
                    mqtt_client_id_source: client_id.as_ref().map(|c| c.source.as_str()),
                },
            )
            .await?;
            let alive =
                queries::cluster_nodes(&**c, ALIVE_WITHIN.as_millis() as i64, false).await?;
            let age = queries::newest_data_age(&**c).await?;
            Ok::<_, leasehold_store::StoreError>((alive.len(), age))
        };
        match tokio::time::timeout(HEARTBEAT_EVERY, work).await {
            Ok(Ok((alive, age))) => {
                seen = now;
                m.cluster_nodes_alive.set(alive as i64);
                m.data_age.set(age.unwrap_or(-1.0));
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat failed"),
            Err(_) => tracing::debug!("heartbeat timed out"),
        }
    }
}

/// `MQTT_MODE=development`: a private clean session that decodes and counts, never writes.
async fn observe(cfg: Config, topics: watch::Receiver<DeviceTopics>, cancel: CancellationToken) {
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
    let decoder = Decoder::new(&cfg.device_topic_pattern, cfg.max_payload_bytes);
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
                metrics().messages_observed.inc();
                match decoder.decode(&m.topic, &m.payload, m.received_at) {
                    Ok(r) => { ok += 1; tracing::debug!(device_id = %r.device_id, ts = %r.ts, topic = %m.topic, "observer: would write"); }
                    Err(e) => { bad += 1; tracing::info!(topic = %m.topic, error = %e, "observer: would dead-letter"); }
                }
            }
        }
    }
    let _ = run.await;
}
