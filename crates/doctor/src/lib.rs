//! Checks of what Leasehold's guarantees stand on outside Leasehold: the broker keeps an
//! offline session's queue, passes messages of `MAX_PAYLOAD_BYTES` and grants QoS 1; the
//! database commits durably and (or not) synchronously replicated, lets the role do its work,
//! and answers within what the lease tolerates; no other cluster uses this cluster's client id.
//! `leasehold doctor` prints them; `leasehold run` runs them in the background at start and
//! shows them in `/health`.
//!
//! # Layout
//! - [`run`]: every check, in order, as [`Checks`].
//! - [`database`]: durability, replication, privileges, clock, round trip.
//! - [`broker`]: the probes (temporary client ids `leasehold-doctor-<random>`, topics under
//!   `leasehold/doctor/`, sessions removed afterwards).
//! - [`cluster`]: the cluster's identity and its claim on its client id at the broker.
//! - [`mqtt`]: a short-lived broker connection, stepped and bounded.

pub mod broker;
pub mod cluster;
pub mod database;
pub mod mqtt;

use chrono::Utc;
use leasehold_config::{Config, Mode};
pub use leasehold_telemetry::{Check, CheckLevel, Checks};
use tokio_util::sync::CancellationToken;

/// Runs every check of the deployment `cfg` describes. Never fails: what could not be checked
/// is a problem line saying why.
pub async fn run(cfg: &Config) -> Checks {
    let ran_at = Utc::now();
    run_until(cfg, &CancellationToken::new())
        .await
        .unwrap_or(Checks {
            ran_at,
            checks: Vec::new(),
        })
}

/// [`run`], ended early by `cancel` (`None` then): a node stopping mid-check. The queue probe's
/// persistent session is removed even then, or it would stay at the broker with its queue,
/// since nothing connects with its random id again.
pub async fn run_until(cfg: &Config, cancel: &CancellationToken) -> Option<Checks> {
    let ran_at = Utc::now();
    let mut checks = Vec::new();
    let facts = tokio::select! {
        f = database::checks(cfg, &mut checks) => f,
        _ = cancel.cancelled() => return None,
    };
    let (identity, client_id) = cluster::identity(cfg, facts.as_ref());
    checks.push(identity);
    if cfg.node.mqtt_mode == Mode::Disabled {
        checks.push(Check::ok(
            "broker",
            "MQTT_MODE=disabled: the broker is not used, not checked",
        ));
    } else {
        checks.extend(broker::checks(cfg, cancel).await?);
        if let (Some(id), Some(facts)) = (&client_id, &facts) {
            checks.push(tokio::select! {
                c = cluster::claim_check(cfg, id, facts) => c,
                _ = cancel.cancelled() => return None,
            });
        }
    }
    Some(Checks { ran_at, checks })
}

/// The lines `leasehold doctor` prints, one per check.
pub fn lines(checks: &Checks) -> Vec<String> {
    checks.checks.iter().map(Check::line).collect()
}
