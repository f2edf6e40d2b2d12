//! Alerts (see `docs/runbook.md`, "How alerts work"): every node judges the whole cluster from Postgres, on a timer and on
//! demand, and the database decides which node reports a change.
//!
//! Why every node: the system this replaces learnt about a 3.5-hour outage from a customer
//! because the only process that could notice was the one that had stopped. Here a standby whose
//! leader died, or a leader whose broker went away, raises the alert; and because opening and
//! resolving are conditional writes on `alerts` (one open row per kind, enforced by a unique
//! index), exactly one node wins each change and only that node posts the webhook.
//!
//! # Layout
//! - [`rules`]: [`Kind`], [`Level`], [`Finding`] and [`judge`] (pure): what can be wrong, and
//!   whether it is now.
//! - [`facts`]: what the rules judge, read through `leasehold_store::alerts` (all SQL is there).
//! - [`runner`]: [`Evaluator`] gathers, judges, applies the result to `alerts` and queues the
//!   changes ([`Change`], [`Action`]); [`AlertsHandle::check`] runs it now.
//! - [`webhook`]: Slack-compatible delivery with retries, in order, off the evaluation path.

pub mod facts;
pub mod rules;
pub mod runner;
pub mod webhook;

use std::time::Duration;

use leasehold_store::{Client, StoreError};

pub use facts::Facts;
pub use rules::{human, judge, Finding, Kind, Level, Thresholds};
pub use runner::{Action, AlertsHandle, Change, Checked, Evaluator, Report, MIN_CHECK_INTERVAL};

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("alert evaluation did not finish within {0:?}")]
    Timeout(Duration),
    /// An observer (`MQTT_MODE=development`) never evaluates: its thresholds are a developer's,
    /// and its verdicts would flap against the production nodes' and page people.
    #[error("this node is an observer (MQTT_MODE=development): it does not evaluate or write alerts; ask a production node")]
    NotEvaluating,
    /// An evaluation is running and no result is recent enough to stand for a new one.
    #[error("an alert evaluation is already running on this node; retry in {}s", .retry_after.as_secs().max(1))]
    Busy { retry_after: Duration },
}

pub use leasehold_store::alerts::AlertRow;

/// Open alerts first, then the most recent resolved ones.
pub async fn recent(c: &Client, limit: i64) -> Result<Vec<AlertRow>, AlertError> {
    Ok(leasehold_store::alerts::recent(c, limit).await?)
}

#[derive(Clone, PartialEq)]
pub struct AlertsConfig {
    pub instance_id: String,
    pub lease_name: String,
    pub cluster_name: String,
    pub thresholds: Thresholds,
    pub check_interval: Duration,
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
