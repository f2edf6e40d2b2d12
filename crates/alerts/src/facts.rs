//! The facts alerts are judged on, read from Postgres on the database clock, so that every node
//! reaches the same verdict whatever its own clock says.

use leasehold_store::queries;
use leasehold_store::tokio_postgres::GenericClient;

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
}

/// A refusal older than this is not current: the leader retries a refused filter at least every
/// 30 s, so one still refused is refreshed well within it (and with no leader, the no-leader
/// alert says more).
const REFUSAL_CURRENT: std::time::Duration = std::time::Duration::from_secs(120);

pub async fn gather(c: &impl GenericClient, cfg: &AlertsConfig) -> Result<Facts, AlertError> {
    let window = cfg.thresholds.window.as_secs_f64();
    let newest_data_age = queries::newest_data_age(c).await?;
    let coverage = queries::device_coverage(c, cfg.thresholds.stale_warning, 0).await?;

    let r = c
        .query_one(
            "SELECT coalesce(extract(epoch from (clock_timestamp() - min(started_at)))::float8, 0),
                    count(*) FILTER (WHERE mode = 'production')
             FROM cluster_nodes
             WHERE last_seen > clock_timestamp() - make_interval(secs => $1)",
            &[&cfg.alive_within.as_secs_f64()],
        )
        .await?;
    let (cluster_uptime, production_nodes_alive): (f64, i64) = (r.get(0), r.get(1));

    let lease = match queries::lease(c, &cfg.lease_name).await? {
        None => None,
        Some(l) => {
            let disconnected = c
                .query_opt(
                    "SELECT extract(epoch from least(
                                 clock_timestamp() - coalesce(mqtt_changed_at, started_at),
                                 clock_timestamp() - $2::timestamptz))::float8
                     FROM cluster_nodes WHERE holder_id = $1 AND NOT mqtt_connected",
                    &[&l.holder_id, &l.acquired_at],
                )
                .await?
                .map(|r| r.get::<_, f64>(0));
            Some(LeaseFacts {
                instance_id: l.instance_id,
                epoch: l.epoch,
                expired_for: -(l.expires_in_ms as f64) / 1000.0,
                leader_disconnected_for: disconnected,
            })
        }
    };

    let names = |sql: &'static str| async move {
        let rows = c.query(sql, &[&window]).await?;
        Ok::<Vec<String>, AlertError>(rows.iter().map(|r| r.get(0)).collect())
    };
    let session_lost = names(
        "SELECT DISTINCT instance_id FROM cluster_nodes
         WHERE session_lost_at > clock_timestamp() - make_interval(secs => $1) ORDER BY 1",
    )
    .await?;
    let client_id_conflicts = names(
        "SELECT DISTINCT instance_id FROM cluster_nodes
         WHERE client_id_conflict_at > clock_timestamp() - make_interval(secs => $1) ORDER BY 1",
    )
    .await?;

    let r = c
        .query_one(
            "SELECT count(*),
                    (SELECT error FROM dead_letters ORDER BY received_at DESC, id DESC LIMIT 1)
             FROM dead_letters WHERE received_at > clock_timestamp() - make_interval(secs => $1)",
            &[&window],
        )
        .await?;
    let (dead_letters_in_window, latest_dead_letter_error) = (r.get(0), r.get(1));

    let leader_changes_in_window: i64 = c
        .query_one(
            "SELECT count(*) FROM lease_history
             WHERE service_name = $1 AND acquired_at > clock_timestamp() - make_interval(secs => $2)",
            &[&cfg.lease_name, &window],
        )
        .await?
        .get(0);

    let refused = queries::refused_subscriptions(c, REFUSAL_CURRENT, 5).await?;

    Ok(Facts {
        newest_data_age,
        devices_enabled: coverage.enabled,
        devices_heard: coverage.heard,
        cluster_uptime,
        production_nodes_alive,
        lease,
        session_lost,
        client_id_conflicts,
        dead_letters_in_window,
        latest_dead_letter_error,
        leader_changes_in_window,
        subscriptions_refused: refused.count,
        refused_filters: refused.latest,
    })
}
