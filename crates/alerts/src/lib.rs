//! Alerts (SPEC section 13): every node judges the whole cluster from Postgres, on a timer and on
//! demand, and the database decides which node reports a change.
//!
//! Why every node: the system this replaces learnt about a 3.5-hour outage from a customer
//! because the only process that could notice was the one that had stopped. Here a standby whose
//! leader died, or a leader whose broker went away, raises the alert; and because opening and
//! resolving are conditional writes on `alerts` (one open row per kind, enforced by a unique
//! index), exactly one node wins each change and only that node posts the webhook.
//!
//! # Layout
//! - [`Kind`], [`Level`], [`Finding`]: what can be wrong, and a condition that holds now.
//! - [`Evaluator`]: gathers the facts ([`facts`]), judges them ([`judge`], pure), applies the
//!   result to `alerts` and queues notifications; [`AlertsHandle::check`] runs it now.
//! - [`webhook`]: Slack-compatible delivery with retries, in order, off the evaluation path.

pub mod facts;
pub mod webhook;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use leasehold_store::alerts::AlertText;
use leasehold_store::{Client, Pool, StoreError};
use leasehold_telemetry::metrics;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

pub use facts::Facts;

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("alert evaluation did not finish within {0:?}")]
    Timeout(Duration),
    /// An observer (`MQTT_MODE=development`) never evaluates: its thresholds are a developer's,
    /// and its verdicts would flap against the production nodes' and page people (SPEC §13).
    #[error("this node is an observer (MQTT_MODE=development): it does not evaluate or write alerts; ask a production node")]
    NotEvaluating,
    /// An evaluation is running and no result is recent enough to stand for a new one.
    #[error("an alert evaluation is already running on this node; retry in {}s", .retry_after.as_secs().max(1))]
    Busy { retry_after: Duration },
}

/// Everything that can be wrong with the cluster, as stored in `alerts.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    DataStale,
    NoLeader,
    LeaderMqttDisconnected,
    MqttSessionLost,
    MqttClientIdFight,
    DeadLettersRising,
    LeaseFlapping,
    MqttSubscriptionRefused,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::DataStale,
        Kind::NoLeader,
        Kind::LeaderMqttDisconnected,
        Kind::MqttSessionLost,
        Kind::MqttClientIdFight,
        Kind::DeadLettersRising,
        Kind::LeaseFlapping,
        Kind::MqttSubscriptionRefused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::DataStale => "data_stale",
            Kind::NoLeader => "no_leader",
            Kind::LeaderMqttDisconnected => "leader_mqtt_disconnected",
            Kind::MqttSessionLost => "mqtt_session_lost",
            Kind::MqttClientIdFight => "mqtt_client_id_fight",
            Kind::DeadLettersRising => "dead_letters_rising",
            Kind::LeaseFlapping => "lease_flapping",
            Kind::MqttSubscriptionRefused => "mqtt_subscription_refused",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Warning,
    Critical,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }
}

/// A condition that holds now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub kind: Kind,
    pub level: Level,
    pub message: String,
    pub details: Value,
}

/// The thresholds alerts are judged against.
#[derive(Debug, Clone)]
pub struct Thresholds {
    pub stale_warning: Duration,
    pub stale_critical: Duration,
    /// How long "no leader" or "leader not connected" must last before it is an alert: a failover
    /// or a broker restart that heals itself within this is not worth a page.
    pub grace: Duration,
    /// Event-like alerts (session lost, client-id fight, dead letters, flapping) count what happened
    /// within this window and resolve once it has passed quietly.
    pub window: Duration,
    /// This many changes of leader within `window` is flapping.
    pub flap_changes: i64,
}

/// Judges the facts. Pure, so every rule is tested without a cluster.
pub fn judge(f: &Facts, t: &Thresholds) -> Vec<Finding> {
    let mut out = Vec::new();
    let secs = |d: Duration| d.as_secs_f64();

    match f.newest_data_age {
        Some(age) if age >= secs(t.stale_warning) => {
            let level = if age >= secs(t.stale_critical) {
                Level::Critical
            } else {
                Level::Warning
            };
            out.push(Finding {
                kind: Kind::DataStale,
                level,
                message: format!(
                    "no new telemetry for {} (warning at {}, critical at {}); {} of {} enabled devices heard from in the last {}",
                    human(age),
                    human(secs(t.stale_warning)),
                    human(secs(t.stale_critical)),
                    f.devices_heard,
                    f.devices_enabled,
                    human(secs(t.stale_warning)),
                ),
                details: json!({"newest_data_age_seconds": age, "devices_enabled": f.devices_enabled, "devices_heard": f.devices_heard}),
            });
        }
        None if f.cluster_uptime >= secs(t.stale_warning) => out.push(Finding {
            kind: Kind::DataStale,
            level: Level::Warning,
            message: format!(
                "no telemetry has ever been stored, and the cluster has been up for {}",
                human(f.cluster_uptime)
            ),
            details: json!({"newest_data_age_seconds": null}),
        }),
        _ => {}
    }

    match &f.lease {
        None if f.cluster_uptime >= secs(t.grace) && f.production_nodes_alive > 0 => {
            out.push(Finding {
                kind: Kind::NoLeader,
                level: Level::Critical,
                message: format!(
                    "no node has ever taken the lease, although {} production node(s) are running",
                    f.production_nodes_alive
                ),
                details: json!({"production_nodes_alive": f.production_nodes_alive}),
            })
        }
        Some(l) if l.expired_for >= secs(t.grace) => out.push(Finding {
            kind: Kind::NoLeader,
            level: Level::Critical,
            message: format!(
                "no leader for {}: the lease of {} (epoch {}) expired and no node took it; {} production node(s) alive. Nothing is being written.",
                human(l.expired_for),
                l.instance_id,
                l.epoch,
                f.production_nodes_alive
            ),
            details: json!({"last_holder": l.instance_id, "epoch": l.epoch, "expired_for_seconds": l.expired_for, "production_nodes_alive": f.production_nodes_alive}),
        }),
        _ => {}
    }

    if let Some(l) = f.lease.as_ref().filter(|l| l.expired_for <= 0.0) {
        if let Some(d) = l.leader_disconnected_for.filter(|d| *d >= secs(t.grace)) {
            out.push(Finding {
                kind: Kind::LeaderMqttDisconnected,
                level: Level::Critical,
                message: format!(
                    "leader {} (epoch {}) has not been connected to the broker for {}; it hands over if this lasts MQTT_STEP_DOWN_AFTER",
                    l.instance_id,
                    l.epoch,
                    human(d)
                ),
                details: json!({"leader": l.instance_id, "epoch": l.epoch, "disconnected_for_seconds": d}),
            });
        }
    }

    if !f.session_lost.is_empty() {
        out.push(Finding {
            kind: Kind::MqttSessionLost,
            level: Level::Critical,
            message: format!(
                "the broker had no session for the cluster's client id when {} reconnected (within the last {}): messages queued for it were lost. Check the broker's persistence.",
                f.session_lost.join(", "),
                human(secs(t.window))
            ),
            details: json!({"nodes": f.session_lost}),
        });
    }

    if !f.client_id_conflicts.is_empty() {
        out.push(Finding {
            kind: Kind::MqttClientIdFight,
            level: Level::Critical,
            message: format!(
                "another process is using the cluster's MQTT client id: {} was disconnected right after connecting (within the last {})",
                f.client_id_conflicts.join(", "),
                human(secs(t.window))
            ),
            details: json!({"nodes": f.client_id_conflicts}),
        });
    }

    if f.dead_letters_in_window > 0 {
        out.push(Finding {
            kind: Kind::DeadLettersRising,
            level: Level::Warning,
            message: format!(
                "{} message(s) dead-lettered in the last {} (latest error: {})",
                f.dead_letters_in_window,
                human(secs(t.window)),
                f.latest_dead_letter_error.as_deref().unwrap_or("-")
            ),
            details: json!({"count": f.dead_letters_in_window, "latest_error": f.latest_dead_letter_error}),
        });
    }

    if f.subscriptions_refused > 0 {
        let first: Vec<String> = f
            .refused_filters
            .iter()
            .map(|(filter, reason, attempts)| format!("{filter} ({reason}; {attempts} attempt(s))"))
            .collect();
        out.push(Finding {
            kind: Kind::MqttSubscriptionRefused,
            level: Level::Critical,
            message: format!(
                "the broker refuses {} topic filter(s) of the cluster's session, so nothing published on them is received: {}. Check the broker's ACL for the cluster's user; the leader retries on its own.",
                f.subscriptions_refused,
                first.join(", ")
            ),
            details: json!({"count": f.subscriptions_refused, "filters": f.refused_filters.iter().map(|(filter, reason, attempts)| json!({"filter": filter, "error": reason, "attempts": attempts})).collect::<Vec<_>>()}),
        });
    }

    if f.leader_changes_in_window >= t.flap_changes {
        out.push(Finding {
            kind: Kind::LeaseFlapping,
            level: Level::Warning,
            message: format!(
                "leadership changed {} times in the last {}",
                f.leader_changes_in_window,
                human(secs(t.window))
            ),
            details: json!({"changes": f.leader_changes_in_window}),
        });
    }
    out
}

/// `90` -> `1m 30s`: for messages read by people.
pub fn human(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

/// What one evaluation changed.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub alert_id: i64,
    pub kind: Kind,
    pub level: Level,
    /// `opened`, `escalated`, `deescalated` or `resolved`.
    pub action: &'static str,
    pub message: String,
}

/// The result of one evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub evaluated_at: DateTime<Utc>,
    pub evaluated_by: String,
    pub findings: Vec<Finding>,
    pub changes: Vec<Change>,
}

pub use leasehold_store::alerts::AlertRow;

/// Open alerts first, then the most recent resolved ones.
pub async fn recent(c: &Client, limit: i64) -> Result<Vec<AlertRow>, AlertError> {
    Ok(leasehold_store::alerts::recent(c, limit).await?)
}

#[derive(Clone)]
pub struct AlertsConfig {
    pub instance_id: String,
    pub lease_name: String,
    pub cluster_name: String,
    pub thresholds: Thresholds,
    pub check_interval: Duration,
    /// Nodes seen within this are alive.
    pub alive_within: Duration,
    pub webhook_url: Option<String>,
    /// `false` on observers: they show alerts but never judge, write or post them.
    pub evaluates: bool,
}

/// The webhook URL is a secret (Slack's token is its path).
impl std::fmt::Debug for AlertsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertsConfig")
            .field("instance_id", &self.instance_id)
            .field("lease_name", &self.lease_name)
            .field("cluster_name", &self.cluster_name)
            .field("thresholds", &self.thresholds)
            .field("check_interval", &self.check_interval)
            .field("alive_within", &self.alive_within)
            .field(
                "webhook_url",
                &self
                    .webhook_url
                    .as_deref()
                    .map(leasehold_config::redact_url),
            )
            .field("evaluates", &self.evaluates)
            .finish()
    }
}

/// `POST /health/alerts/check` starts at most one evaluation per this interval: a result this
/// recent answers the request instead, so a flood of checks costs no database work.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The answer to a check.
#[derive(Debug, Clone)]
pub struct Checked {
    pub report: Report,
    /// `false` when a result from the last [`MIN_CHECK_INTERVAL`] answered instead of a new
    /// evaluation.
    pub fresh: bool,
}

/// Runs evaluations on a timer; [`AlertsHandle`] runs one now.
pub struct Evaluator {
    inner: Arc<Inner>,
    notifier: Option<webhook::Notifier>,
}

struct Inner {
    cfg: AlertsConfig,
    /// Evaluation's own connections: a slow or blocked evaluation never holds a connection that
    /// heartbeats or health answers need.
    pool: Pool,
    /// Evaluations run one at a time on a node (timer and `POST /health/alerts/check`).
    lock: Mutex<()>,
    last: std::sync::Mutex<Last>,
    queue: Option<tokio::sync::mpsc::UnboundedSender<webhook::Message>>,
}

/// The latest evaluation on this node.
#[derive(Default)]
struct Last {
    started: Option<Instant>,
    /// The latest successful result and when it was found.
    report: Option<(Instant, Report)>,
}

/// Cheap to clone; given to the HTTP surface.
#[derive(Clone)]
pub struct AlertsHandle {
    inner: Arc<Inner>,
}

impl Evaluator {
    /// `pool` should be the evaluator's own (one connection is enough), so that a slow or blocked
    /// evaluation never holds a connection heartbeats or health answers need.
    pub fn new(cfg: AlertsConfig, pool: Pool) -> Self {
        let (queue, notifier) = match &cfg.webhook_url {
            Some(url) if cfg.evaluates => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (Some(tx), Some(webhook::Notifier::new(url.clone(), rx)))
            }
            _ => (None, None),
        };
        Evaluator {
            inner: Arc::new(Inner {
                cfg,
                pool,
                lock: Mutex::new(()),
                last: std::sync::Mutex::new(Last::default()),
                queue,
            }),
            notifier,
        }
    }

    pub fn handle(&self) -> AlertsHandle {
        AlertsHandle {
            inner: self.inner.clone(),
        }
    }

    /// Evaluates every `check_interval` until `cancel`; the webhook queue is drained for a short
    /// while after, so a resolution found at shutdown is still delivered.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), AlertError> {
        if !self.inner.cfg.evaluates {
            tracing::info!("observer: alerts are evaluated by the production nodes, not here");
            return Ok(());
        }
        let notifier = self.notifier.map(|n| {
            let token = cancel.clone();
            tokio::spawn(n.run(token))
        });
        let mut tick = tokio::time::interval(self.inner.cfg.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let one = self.inner.lock.lock().await;
            match self.inner.evaluate(one).await {
                Ok(r) => tracing::debug!(
                    findings = r.findings.len(),
                    changes = r.changes.len(),
                    "alerts evaluated"
                ),
                // Handled here: an unreachable database is itself visible on /health and in metrics.
                Err(e) => {
                    tracing::warn!(error = %e, "alert evaluation failed; retrying on the next tick")
                }
            }
        }
        drop(self.inner);
        if let Some(n) = notifier {
            let _ = n.await;
        }
        Ok(())
    }
}

impl AlertsHandle {
    /// Evaluates now (`POST /health/alerts/check`), at most once per [`MIN_CHECK_INTERVAL`] and
    /// one at a time: a result found within the interval answers instead ([`Checked::fresh`]
    /// false); with none, [`AlertError::Busy`] says when to come back.
    pub async fn check(&self) -> Result<Checked, AlertError> {
        let inner = &self.inner;
        if !inner.cfg.evaluates {
            return Err(AlertError::NotEvaluating);
        }
        let Ok(one) = inner.lock.try_lock() else {
            // One is running (a timer's, or another check's): its result answers this check too
            // if it comes within the interval. The wait is bounded, so a flood parks nothing long.
            if let Ok(done) = tokio::time::timeout(MIN_CHECK_INTERVAL, inner.lock.lock()).await {
                drop(done);
            }
            return inner.recent_or_busy();
        };
        let too_soon = inner
            .last()
            .started
            .is_some_and(|t| t.elapsed() < MIN_CHECK_INTERVAL);
        if too_soon {
            return inner.recent_or_busy();
        }
        let report = inner.evaluate(one).await?;
        Ok(Checked {
            report,
            fresh: true,
        })
    }
}

const EVALUATION_TIMEOUT: Duration = Duration::from_secs(10);

impl Inner {
    fn last(&self) -> std::sync::MutexGuard<'_, Last> {
        // A panic while holding it cannot leave `Last` inconsistent: every write is one field.
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest result if it is within [`MIN_CHECK_INTERVAL`], else when to retry.
    fn recent_or_busy(&self) -> Result<Checked, AlertError> {
        let last = self.last();
        if let Some((at, report)) = &last.report {
            if at.elapsed() < MIN_CHECK_INTERVAL {
                return Ok(Checked {
                    report: report.clone(),
                    fresh: false,
                });
            }
        }
        let retry_after = last
            .started
            .map(|t| MIN_CHECK_INTERVAL.saturating_sub(t.elapsed()))
            .filter(|d| !d.is_zero())
            .unwrap_or(MIN_CHECK_INTERVAL);
        Err(AlertError::Busy { retry_after })
    }

    /// Runs one evaluation; `_one` proves the caller holds the evaluation lock.
    async fn evaluate(&self, _one: MutexGuard<'_, ()>) -> Result<Report, AlertError> {
        self.last().started = Some(Instant::now());
        let report = tokio::time::timeout(EVALUATION_TIMEOUT, self.evaluate_locked())
            .await
            .map_err(|_| AlertError::Timeout(EVALUATION_TIMEOUT))??;
        self.last().report = Some((Instant::now(), report.clone()));
        Ok(report)
    }

    async fn evaluate_locked(&self) -> Result<Report, AlertError> {
        let cfg = &self.cfg;
        let c = leasehold_store::pooled(&self.pool).await?;
        let facts = facts::gather(&c, cfg).await?;
        let findings = judge(&facts, &cfg.thresholds);
        let mut changes = Vec::new();
        for kind in Kind::ALL {
            let change = match findings.iter().find(|f| f.kind == kind) {
                Some(f) => open_or_update(&c, f, &cfg.instance_id).await?,
                None => resolve(&c, kind, &cfg.instance_id).await?,
            };
            if let Some(ch) = change {
                self.announce(&ch);
                changes.push(ch);
            }
        }
        metrics().devices_enabled.set(facts.devices_enabled);
        metrics().devices_heard.set(facts.devices_heard);
        let open: Vec<&str> = findings.iter().map(|f| f.kind.as_str()).collect();
        for kind in Kind::ALL {
            metrics()
                .alerts_firing
                .with_label_values(&[kind.as_str()])
                .set(i64::from(open.contains(&kind.as_str())));
        }
        Ok(Report {
            evaluated_at: Utc::now(),
            evaluated_by: cfg.instance_id.clone(),
            findings,
            changes,
        })
    }

    /// The node that won the change logs it and posts it; the others saw nothing change.
    fn announce(&self, ch: &Change) {
        let m = metrics();
        m.alert_changes
            .with_label_values(&[ch.kind.as_str(), ch.action])
            .inc();
        match (ch.action, ch.level) {
            ("resolved", _) => {
                tracing::info!(
                    alert_id = ch.alert_id,
                    kind = ch.kind.as_str(),
                    "alert resolved"
                )
            }
            (_, Level::Critical) => {
                tracing::error!(alert_id = ch.alert_id, kind = ch.kind.as_str(), action = ch.action, message = %ch.message, "alert")
            }
            (_, Level::Warning) => {
                tracing::warn!(alert_id = ch.alert_id, kind = ch.kind.as_str(), action = ch.action, message = %ch.message, "alert")
            }
        }
        if let Some(q) = &self.queue {
            let _ = q.send(webhook::Message::for_change(ch, &self.cfg));
        }
    }
}

/// Opens the alert, or changes its level; `None` when it was already open at this level (or
/// another node won the race to open it).
async fn open_or_update(c: &Client, f: &Finding, by: &str) -> Result<Option<Change>, AlertError> {
    let text = AlertText {
        kind: f.kind.as_str(),
        level: f.level.as_str(),
        message: &f.message,
        details: &f.details,
    };
    if let Some(alert_id) = leasehold_store::alerts::open(c, &text, by).await? {
        return Ok(Some(Change {
            alert_id,
            kind: f.kind,
            level: f.level,
            action: "opened",
            message: f.message.clone(),
        }));
    }
    // Still open: keep the message current; report only a change of level.
    let updated = leasehold_store::alerts::update(c, &text).await?;
    Ok(updated.and_then(|u| {
        (u.old_level != text.level).then(|| Change {
            alert_id: u.id,
            kind: f.kind,
            level: f.level,
            action: if f.level == Level::Critical {
                "escalated"
            } else {
                "deescalated"
            },
            message: f.message.clone(),
        })
    }))
}

async fn resolve(c: &Client, kind: Kind, by: &str) -> Result<Option<Change>, AlertError> {
    let resolved = leasehold_store::alerts::resolve(c, kind.as_str(), by).await?;
    Ok(resolved.map(|r| Change {
        alert_id: r.id,
        kind,
        level: if r.level == "critical" {
            Level::Critical
        } else {
            Level::Warning
        },
        action: "resolved",
        message: format!("resolved after {}: {}", human(r.lasted), r.message),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use facts::LeaseFacts;

    fn t() -> Thresholds {
        Thresholds {
            stale_warning: Duration::from_secs(300),
            stale_critical: Duration::from_secs(600),
            grace: Duration::from_secs(10),
            window: Duration::from_secs(600),
            flap_changes: 4,
        }
    }

    fn healthy() -> Facts {
        Facts {
            newest_data_age: Some(1.0),
            devices_enabled: 3,
            devices_heard: 3,
            cluster_uptime: 3600.0,
            production_nodes_alive: 2,
            lease: Some(LeaseFacts {
                instance_id: "a".into(),
                epoch: 7,
                expired_for: -5.0,
                leader_disconnected_for: None,
            }),
            session_lost: vec![],
            client_id_conflicts: vec![],
            dead_letters_in_window: 0,
            latest_dead_letter_error: None,
            leader_changes_in_window: 1,
            subscriptions_refused: 0,
            refused_filters: vec![],
        }
    }

    fn lease(f: &mut Facts) -> &mut LeaseFacts {
        f.lease.as_mut().expect("healthy facts have a lease")
    }

    fn kinds(f: &Facts) -> Vec<(Kind, Level)> {
        judge(f, &t()).iter().map(|x| (x.kind, x.level)).collect()
    }

    #[test]
    fn a_healthy_cluster_has_no_findings() {
        assert!(kinds(&healthy()).is_empty());
    }

    #[test]
    fn stale_data_is_a_warning_then_critical() {
        let mut f = healthy();
        f.newest_data_age = Some(299.0);
        assert!(kinds(&f).is_empty());
        f.newest_data_age = Some(301.0);
        assert_eq!(kinds(&f), vec![(Kind::DataStale, Level::Warning)]);
        f.newest_data_age = Some(601.0);
        assert_eq!(kinds(&f), vec![(Kind::DataStale, Level::Critical)]);
        f.newest_data_age = None;
        assert_eq!(kinds(&f), vec![(Kind::DataStale, Level::Warning)]);
        f.cluster_uptime = 10.0;
        assert!(kinds(&f).is_empty(), "a fresh cluster is not stale yet");
    }

    #[test]
    fn an_expired_lease_is_no_leader_only_after_the_grace() {
        let mut f = healthy();
        lease(&mut f).expired_for = 3.0;
        assert!(kinds(&f).is_empty(), "an ordinary failover is not an alert");
        lease(&mut f).expired_for = 11.0;
        assert_eq!(kinds(&f), vec![(Kind::NoLeader, Level::Critical)]);
        f.lease = None;
        assert_eq!(kinds(&f), vec![(Kind::NoLeader, Level::Critical)]);
        f.production_nodes_alive = 0;
        assert!(kinds(&f).is_empty(), "never taken and nobody to take it");
    }

    #[test]
    fn a_leader_off_the_broker_after_the_grace() {
        let mut f = healthy();
        lease(&mut f).leader_disconnected_for = Some(5.0);
        assert!(kinds(&f).is_empty());
        lease(&mut f).leader_disconnected_for = Some(12.0);
        assert_eq!(
            kinds(&f),
            vec![(Kind::LeaderMqttDisconnected, Level::Critical)]
        );
    }

    #[test]
    fn events_in_the_window() {
        let mut f = healthy();
        f.session_lost = vec!["a".into()];
        f.client_id_conflicts = vec!["b".into()];
        f.dead_letters_in_window = 2;
        f.leader_changes_in_window = 4;
        assert_eq!(
            kinds(&f),
            vec![
                (Kind::MqttSessionLost, Level::Critical),
                (Kind::MqttClientIdFight, Level::Critical),
                (Kind::DeadLettersRising, Level::Warning),
                (Kind::LeaseFlapping, Level::Warning),
            ]
        );
        f.leader_changes_in_window = 3;
        assert!(!kinds(&f).contains(&(Kind::LeaseFlapping, Level::Warning)));
    }

    fn config(evaluates: bool) -> AlertsConfig {
        AlertsConfig {
            instance_id: "n".into(),
            lease_name: "l".into(),
            cluster_name: "c".into(),
            thresholds: t(),
            check_interval: Duration::from_secs(3600),
            alive_within: Duration::from_secs(10),
            webhook_url: Some("https://hooks.example/services/T/B/tok3n".into()),
            evaluates,
        }
    }

    /// A database that refuses connections: every evaluation fails at once.
    fn unreachable() -> Pool {
        leasehold_store::pool("postgres://u@127.0.0.1:1/x?connect_timeout=1", "t", 1)
            .expect("a pool is created without connecting")
    }

    /// Failed evaluations count too: a flood against a broken database starts one a second.
    #[tokio::test]
    async fn checks_start_at_most_one_evaluation_per_second_even_when_they_fail() {
        let h = Evaluator::new(config(true), unreachable()).handle();
        let first = h.check().await;
        assert!(matches!(first, Err(AlertError::Store(_))), "{first:?}");
        for _ in 0..20 {
            match h.check().await {
                Err(AlertError::Busy { retry_after }) => {
                    assert!(retry_after > Duration::ZERO && retry_after <= MIN_CHECK_INTERVAL)
                }
                other => panic!("expected Busy, got {other:?}"),
            }
        }
        tokio::time::sleep(MIN_CHECK_INTERVAL).await;
        assert!(matches!(h.check().await, Err(AlertError::Store(_))));
    }

    #[tokio::test]
    async fn an_observer_does_not_evaluate() {
        let ev = Evaluator::new(config(false), unreachable());
        assert!(ev.notifier.is_none(), "an observer posts nothing");
        let h = ev.handle();
        assert!(matches!(h.check().await, Err(AlertError::NotEvaluating)));
        // Its timer loop returns at once instead of evaluating.
        tokio::time::timeout(Duration::from_secs(1), ev.run(CancellationToken::new()))
            .await
            .expect("returns at once")
            .expect("ok");
        let shown = format!("{:?}", config(true));
        assert!(
            !shown.contains("tok3n") && shown.contains("hooks.example"),
            "{shown}"
        );
    }

    #[test]
    fn a_refused_subscription_is_critical_and_names_the_filter() {
        let mut f = healthy();
        f.subscriptions_refused = 1;
        f.refused_filters = vec![(
            "plant/secret/data".into(),
            "refused by the broker (SUBACK 0x80)".into(),
            3,
        )];
        let found = judge(&f, &t());
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].kind, found[0].level),
            (Kind::MqttSubscriptionRefused, Level::Critical)
        );
        assert!(
            found[0].message.contains("plant/secret/data"),
            "{}",
            found[0].message
        );
        assert_eq!(
            Kind::MqttSubscriptionRefused.as_str(),
            "mqtt_subscription_refused"
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(5.4), "5s");
        assert_eq!(human(90.0), "1m 30s");
        assert_eq!(human(12_600.0), "3h 30m");
    }
}
