//! The facts alerts are judged on, read through `leasehold_store` on the database clock, so
//! that every node reaches the same verdict whatever its own clock says.

use leasehold_store::alerts::{self as store, NodeEvent};
use leasehold_store::{queries, Client};

use crate::{AlertError, AlertsConfig};

/// The lease as alerts see it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseFacts {
    pub instance_id: String,
    pub epoch: i64,
    /// Seconds since the lease expired; negative while it is live.
    pub expired_for: f64,
    /// Seconds the live leader has been without a broker connection, counted from no earlier
    /// than its acquisition (`None` while connected or when it has not reported yet).
    pub leader_disconnected_for: Option<f64>,
    /// A standby alive reached the broker within the last 15 s (it could take over).
    pub standby_reaches_broker: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub newest_data_age: Option<f64>,
    pub devices_enabled: i64,
    pub devices_heard: i64,
    /// Seconds since the oldest running node started: how long "no data yet" has been true.
    pub cluster_uptime: f64,
    pub production_nodes_alive: i64,
    pub lease: Option<LeaseFacts>,
    /// Nodes that saw the broker lose the session within the window.
    pub session_lost: Vec<String>,
    /// Nodes that saw their client id taken within the window.
    pub client_id_conflicts: Vec<String>,
    pub dead_letters_in_window: i64,
    pub latest_dead_letter_error: Option<String>,
    pub leader_changes_in_window: i64,
    /// Topic filters the broker refused lately (the leader retries them at least every 30 s),
    /// and the latest few: (filter, reason, attempts).
    pub subscriptions_refused: i64,
    pub refused_filters: Vec<(String, String, i32)>,
    /// How the database replicates commits, as this node's connection sees it (`None` when it
    /// could not be read: no finding either way).
    pub replication: Option<ReplicationFacts>,
    /// Nodes alive that do not run the active cluster configuration (for longer than the grace).
    pub config_outdated: Vec<queries::OutdatedNode>,
    /// Routes the leader holds suspended: (route, its recent `route_unavailable` dead letters,
    /// why); see `leasehold_store::alerts::suspended_routes`.
    pub suspended_routes: Vec<(String, i64, String)>,
}

/// The part of the database's replication alerts judge.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationFacts {
    /// Why commits are not synchronously replicated; `None` when they are.
    pub why_not: Option<String>,
    /// Standbys streaming from the database, in sync or not.
    pub standbys: usize,
}

/// A refusal older than this is not current: the leader retries a refused filter at least every
/// 30 s, so one still refused is refreshed well within it (and with no leader, the no-leader
/// alert says more).
const REFUSAL_CURRENT: std::time::Duration = std::time::Duration::from_secs(120);

pub async fn gather(c: &Client, cfg: &AlertsConfig) -> Result<Facts, AlertError> {
    let window = cfg.thresholds.window;
    let newest_data_age = queries::newest_data_age(c).await?;
    let coverage = queries::device_coverage(c, cfg.thresholds.stale_warning, 0).await?;
    let alive = queries::alive(c).await?;

    let lease = match queries::lease(c, &cfg.lease_name).await? {
        None => None,
        Some(l) => Some(LeaseFacts {
            leader_disconnected_for: store::disconnected_for(c, &l.holder_id, l.acquired_at)
                .await?,
            standby_reaches_broker: queries::standby_reached_broker(
                c,
                &l.holder_id,
                std::time::Duration::from_secs(15),
            )
            .await?
            .is_some(),
            instance_id: l.instance_id,
            epoch: l.epoch,
            expired_for: -(l.expires_in_ms as f64) / 1000.0,
        }),
    };

    let session_lost = store::nodes_that_saw(c, NodeEvent::SessionLost, window).await?;
    let client_id_conflicts = store::nodes_that_saw(c, NodeEvent::ClientIdConflict, window).await?;
    let dead = store::dead_letters_within(c, window).await?;
    let leader_changes_in_window = store::leader_changes_within(c, &cfg.lease_name, window).await?;
    let refused = queries::refused_subscriptions(c, REFUSAL_CURRENT, 5).await?;
    let config_outdated = queries::config_outdated(c, cfg.thresholds.grace).await?;
    let suspended_routes = store::suspended_routes(c, &cfg.lease_name, REFUSAL_CURRENT).await?;
    let replication =
        leasehold_store::replication::status(c)
            .await
            .ok()
            .map(|s| ReplicationFacts {
                why_not: s.why_not(),
                standbys: s.standbys().count(),
            });

    Ok(Facts {
        newest_data_age,
        devices_enabled: coverage.enabled,
        devices_heard: coverage.heard,
        cluster_uptime: alive.uptime,
        production_nodes_alive: alive.production,
        lease,
        session_lost,
        client_id_conflicts,
        dead_letters_in_window: dead.count,
        latest_dead_letter_error: dead.latest_error,
        leader_changes_in_window,
        subscriptions_refused: refused.count,
        refused_filters: refused.latest,
        replication,
        config_outdated,
        suspended_routes,
    })
}
