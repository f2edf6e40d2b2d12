//! The evaluation loop: gathers the [`Facts`](crate::Facts), judges them, applies the result to
//! `alerts` through the store (the database decides which node reports a change) and queues
//! the changes this node won for the webhook.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use leasehold_store::alerts::AlertText;
use leasehold_store::{Client, Pool};
use leasehold_telemetry::events;
use serde::Serialize;
use tokio::sync::{watch, Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

use crate::rules::{human, judge, Finding, Kind, Level};
use crate::{facts, webhook, AlertError, AlertsConfig};

leasehold_config::named! {
    /// What a change did to an alert.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Action {
        Opened = "opened",
        Escalated = "escalated",
        Deescalated = "deescalated",
        Resolved = "resolved",
    }
}

/// What one evaluation changed.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub alert_id: i64,
    pub kind: Kind,
    pub level: Level,
    pub action: Action,
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
    /// The configuration of the next round: thresholds, interval and webhook are cluster
    /// settings, changed live.
    cfg: watch::Receiver<AlertsConfig>,
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
        Self::live(watch::channel(cfg).1, pool)
    }

    /// An evaluator whose configuration follows `cfg`: each round reads the newest.
    pub fn live(cfg: watch::Receiver<AlertsConfig>, pool: Pool) -> Self {
        let (queue, notifier) = match cfg.borrow().evaluates {
            true => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (Some(tx), Some(webhook::Notifier::new(rx)))
            }
            false => (None, None),
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
        if !self.inner.cfg().evaluates {
            tracing::info!("observer: alerts are evaluated by the production nodes, not here");
            return Ok(());
        }
        let notifier = self.notifier.map(|n| {
            let token = cancel.clone();
            tokio::spawn(n.run(token))
        });
        let mut first = true;
        loop {
            // The first round at once, then every ALERT_CHECK_INTERVAL as it is now.
            let wait = match std::mem::take(&mut first) {
                true => Duration::ZERO,
                false => self.inner.cfg().check_interval,
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
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
        if !inner.cfg().evaluates {
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
    /// The configuration as it is now.
    fn cfg(&self) -> AlertsConfig {
        self.cfg.borrow().clone()
    }

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
        let cfg = &self.cfg();
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
                self.announce(&ch, cfg);
                changes.push(ch);
            }
        }
        let firing: Vec<(&str, bool)> = Kind::ALL
            .iter()
            .map(|k| (k.as_str(), findings.iter().any(|f| f.kind == *k)))
            .collect();
        events::AlertsEvaluated {
            devices_enabled: facts.devices_enabled,
            devices_heard: facts.devices_heard,
            firing: &firing,
        }
        .emit();
        Ok(Report {
            evaluated_at: Utc::now(),
            evaluated_by: cfg.instance_id.clone(),
            findings,
            changes,
        })
    }

    /// The node that won the change logs it and posts it; the others saw nothing change.
    fn announce(&self, ch: &Change, cfg: &AlertsConfig) {
        events::AlertChanged {
            alert_id: ch.alert_id,
            kind: ch.kind.as_str(),
            action: ch.action.as_str(),
            critical: ch.level == Level::Critical,
            message: &ch.message,
        }
        .emit();
        if let (Some(q), Some(url)) = (&self.queue, &cfg.webhook_url) {
            let _ = q.send(webhook::Message::for_change(ch, cfg, url.clone()));
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
            action: Action::Opened,
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
                Action::Escalated
            } else {
                Action::Deescalated
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
        level: Level::from_stored(&r.level),
        action: Action::Resolved,
        message: format!("resolved after {}: {}", human(r.lasted), r.message),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::tests::t;

    fn config(evaluates: bool) -> AlertsConfig {
        AlertsConfig {
            instance_id: "n".into(),
            lease_name: "l".into(),
            cluster_name: "c".into(),
            thresholds: t(),
            check_interval: Duration::from_secs(3600),
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

    /// Reports and webhooks name actions as they always did: `/health/alerts/check` clients
    /// and the `action` label read these words.
    #[test]
    fn actions_keep_their_words() {
        for (a, word) in [
            (Action::Opened, "opened"),
            (Action::Escalated, "escalated"),
            (Action::Deescalated, "deescalated"),
            (Action::Resolved, "resolved"),
        ] {
            assert_eq!(a.as_str(), word);
            assert_eq!(serde_json::to_value(a).expect("serializes"), word);
        }
        assert_eq!(Level::from_stored("critical"), Level::Critical);
        assert_eq!(Level::from_stored("warning"), Level::Warning);
    }
}
