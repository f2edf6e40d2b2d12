//! Slack-compatible webhook delivery (`{"text": ...}`), with retries.
//!
//! Deliveries run on their own task, in the order the changes happened, so a slow or dead
//! receiver never delays an evaluation, and "resolved" never overtakes "opened".

use std::time::Duration;

use leasehold_retry::{Backoff, Policy, Retry};
use leasehold_telemetry::events;
use serde_json::json;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use crate::{Action, AlertsConfig, Change, Kind, Level};

/// Attempts per notification.
pub const ATTEMPTS: u32 = 5;
/// The pause before each retry: 0.5, 1, 2, 4 s.
pub const RETRY: Policy =
    Policy::new(Duration::from_millis(500), Duration::from_secs(4)).jitter(0.0);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// After shutdown, queued notifications still get this long.
const DRAIN_FOR: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Message {
    /// Where to post it: `ALERT_WEBHOOK_URL` when the change was found (a cluster setting, so
    /// it can change while messages are queued).
    pub url: String,
    pub kind: Kind,
    pub action: Action,
    pub body: serde_json::Value,
}

impl Message {
    pub fn for_change(ch: &Change, cfg: &AlertsConfig, url: String) -> Message {
        let icon = match (ch.action, ch.level) {
            (Action::Resolved, _) => ":white_check_mark: RESOLVED",
            (_, Level::Critical) => ":rotating_light: CRITICAL",
            (_, Level::Warning) => ":warning: WARNING",
        };
        let text = format!(
            "{icon} [{cluster}] {kind} ({action}, alert #{id}, seen by {by}): {msg}",
            cluster = cfg.cluster_name,
            kind = ch.kind.as_str(),
            action = ch.action.as_str(),
            id = ch.alert_id,
            by = cfg.instance_id,
            msg = ch.message
        );
        Message {
            url,
            kind: ch.kind,
            action: ch.action,
            body: json!({ "text": text }),
        }
    }
}

pub struct Notifier {
    rx: UnboundedReceiver<Message>,
    client: tokio::sync::OnceCell<Option<reqwest::Client>>,
}

/// Outcome of one delivery attempt.
enum Attempt {
    Delivered,
    Retry(String),
    GiveUp(String),
}

impl Notifier {
    /// The HTTP client is built at the first alert to post: it reads the system's CA
    /// certificates, which costs a leader's start more than the rest of it.
    pub fn new(rx: UnboundedReceiver<Message>) -> Self {
        Notifier {
            rx,
            client: tokio::sync::OnceCell::new(),
        }
    }

    /// Built off the runtime's workers: reading the certificates blocks.
    async fn client(&self) -> Option<&reqwest::Client> {
        let build = || {
            // rustls is built with one provider (aws-lc-rs); make it the process default so that
            // reqwest's no-provider build finds it. Fails only if one is installed already: fine.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            let client = reqwest::Client::builder()
                .timeout(ATTEMPT_TIMEOUT)
                .user_agent(concat!("leasehold/", env!("CARGO_PKG_VERSION")))
                .build();
            client
                .map_err(|e| tracing::error!(error = %e, "cannot build the webhook HTTP client; alerts are recorded but not posted"))
                .ok()
        };
        let built = async { tokio::task::spawn_blocking(build).await.ok().flatten() };
        self.client.get_or_init(|| built).await.as_ref()
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let msg = tokio::select! {
                m = self.rx.recv() => m,
                _ = cancel.cancelled() => break,
            };
            let Some(msg) = msg else { return };
            self.deliver(&msg, &cancel).await;
        }
        // Shutting down: what is queued still goes out, briefly and without retries past the deadline.
        let drain = async {
            while let Ok(msg) = self.rx.try_recv() {
                self.deliver(&msg, &CancellationToken::new()).await;
            }
        };
        let _ = tokio::time::timeout(DRAIN_FOR, drain).await;
    }

    async fn deliver(&self, msg: &Message, cancel: &CancellationToken) {
        let Some(client) = self.client().await else {
            return;
        };
        let mut retry = Backoff::new(RETRY);
        let mut attempts = 1;
        let error = loop {
            match self.attempt(client, msg).await {
                Attempt::Delivered => break None,
                Attempt::Retry(e) if attempts < ATTEMPTS => {
                    let report = |r: Retry| tracing::warn!(kind = msg.kind.as_str(), action = msg.action.as_str(), attempt = r.attempt, error = %e, "alert webhook failed; retrying");
                    // Cancelled (shutting down): the remaining attempts go out without pauses.
                    retry.wait(report, cancel).await;
                    attempts += 1;
                }
                Attempt::Retry(e) | Attempt::GiveUp(e) => break Some(e),
            }
        };
        events::AlertNotified {
            kind: msg.kind.as_str(),
            action: msg.action.as_str(),
            attempts: attempts as usize,
            error: error.as_ref().map(|e| e as &dyn std::fmt::Display),
        }
        .emit();
    }

    async fn attempt(&self, client: &reqwest::Client, msg: &Message) -> Attempt {
        match client.post(&msg.url).json(&msg.body).send().await {
            Ok(r) if r.status().is_success() => Attempt::Delivered,
            Ok(r) => {
                let s = r.status();
                let e = format!("receiver answered {s}");
                // 429 and 5xx are transient; any other refusal will not change on retry.
                if s.is_server_error() || s == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    Attempt::Retry(e)
                } else {
                    Attempt::GiveUp(e)
                }
            }
            // The URL holds the secret (Slack's token is in its path): never log it.
            Err(e) => Attempt::Retry(e.without_url().to_string()),
        }
    }
}
