//! The `alerts` table and the cluster facts alerts are judged on. Every time is read on the
//! database clock, so that every node reaches the same verdict whatever its own clock says;
//! judging is `leasehold-alerts`' business.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::op::{self, Op};
use crate::Result;

/// One row of `alerts`.
#[derive(Debug, Clone, Serialize)]
pub struct AlertRow {
    pub id: i64,
    pub kind: String,
    pub level: String,
    pub message: String,
    pub opened_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub opened_by: Option<String>,
    pub resolved_by: Option<String>,
}

/// Open alerts first, then the most recent resolved ones.
pub async fn recent(c: &impl GenericClient, limit: i64) -> Result<Vec<AlertRow>> {
    op::all(
        c,
        Op::AlertsRecent,
        "SELECT id, kind, level, message, opened_at, resolved_at, opened_by, resolved_by
         FROM alerts ORDER BY (resolved_at IS NULL) DESC, opened_at DESC, id DESC LIMIT $1",
        &[&limit],
        |r| {
            from_row!(r => AlertRow {
                id, kind, level, message, opened_at, resolved_at, opened_by, resolved_by,
            })
        },
    )
    .await
}

/// What an alert is about to say: its kind, level and message as stored.
#[derive(Debug, Clone, Copy)]
pub struct AlertText<'a> {
    pub kind: &'a str,
    pub level: &'a str,
    pub message: &'a str,
    pub details: &'a serde_json::Value,
}

/// Opens an alert of this kind; its id, or `None` when one is open already (the unique index
/// on open alerts lets exactly one node win the race).
pub async fn open(c: &impl GenericClient, a: &AlertText<'_>, by: &str) -> Result<Option<i64>> {
    op::opt(
        c,
        Op::AlertOpen,
        "INSERT INTO alerts (kind, level, message, opened_by, details)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (kind) WHERE resolved_at IS NULL DO NOTHING
         RETURNING id",
        &[&a.kind, &a.level, &a.message, &by, a.details],
        |r| r.try_get("id"),
    )
    .await
}

/// The open alert after [`update`]: its id and the level it had before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Updated {
    pub id: i64,
    pub old_level: String,
}

/// Rewrites the open alert of this kind (level, message, details); `None` when none is open.
pub async fn update(c: &impl GenericClient, a: &AlertText<'_>) -> Result<Option<Updated>> {
    op::opt(
        c,
        Op::AlertUpdate,
        "WITH old AS (SELECT id, level FROM alerts WHERE kind = $1 AND resolved_at IS NULL FOR UPDATE)
         UPDATE alerts a SET level = $2, message = $3, details = $4
         FROM old WHERE a.id = old.id
         RETURNING a.id, old.level AS old_level",
        &[&a.kind, &a.level, &a.message, a.details],
        |r| from_row!(r => Updated { id, old_level }),
    )
    .await
}

/// The alert [`resolve`] closed.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub id: i64,
    pub level: String,
    pub message: String,
    /// Seconds it was open.
    pub lasted: f64,
}

/// Resolves the open alert of this kind; `None` when none is open (or another node won).
pub async fn resolve(c: &impl GenericClient, kind: &str, by: &str) -> Result<Option<Resolved>> {
    op::opt(
        c,
        Op::AlertResolve,
        "UPDATE alerts SET resolved_at = now(), resolved_by = $2
         WHERE kind = $1 AND resolved_at IS NULL
         RETURNING id, level, message,
                   extract(epoch from (resolved_at - opened_at))::float8 AS lasted",
        &[&kind, &by],
        |r| from_row!(r => Resolved { id, level, message, lasted }),
    )
    .await
}

/// Seconds node `holder_id` has been without a broker connection, counted from no earlier than
/// `since`; `None` while it is connected (or has not reported yet).
pub async fn disconnected_for(
    c: &impl GenericClient,
    holder_id: &str,
    since: DateTime<Utc>,
) -> Result<Option<f64>> {
    op::opt(
        c,
        Op::AlertFacts,
        "SELECT extract(epoch from least(
                     clock_timestamp() - coalesce(mqtt_changed_at, started_at),
                     clock_timestamp() - $2::timestamptz))::float8 AS secs
         FROM cluster_nodes WHERE holder_id = $1 AND NOT mqtt_connected",
        &[&holder_id, &since],
        |r| r.try_get("secs"),
    )
    .await
}

/// A broker event a node reports in its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeEvent {
    /// The broker had no session when the node reconnected.
    SessionLost,
    /// The node was disconnected right after connecting: its client id is taken.
    ClientIdConflict,
}

/// The nodes (by instance id) that saw `event` within `within`.
pub async fn nodes_that_saw(
    c: &impl GenericClient,
    event: NodeEvent,
    within: Duration,
) -> Result<Vec<String>> {
    let sql = match event {
        NodeEvent::SessionLost => {
            "SELECT DISTINCT instance_id FROM cluster_nodes
             WHERE session_lost_at > clock_timestamp() - make_interval(secs => $1) ORDER BY 1"
        }
        NodeEvent::ClientIdConflict => {
            "SELECT DISTINCT instance_id FROM cluster_nodes
             WHERE client_id_conflict_at > clock_timestamp() - make_interval(secs => $1) ORDER BY 1"
        }
    };
    op::all(c, Op::AlertFacts, sql, &[&within.as_secs_f64()], |r| {
        r.try_get("instance_id")
    })
    .await
}

/// Dead letters stored within a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetters {
    pub count: i64,
    /// The error of the newest dead letter, whenever it was stored.
    pub latest_error: Option<String>,
}

pub async fn dead_letters_within(c: &impl GenericClient, within: Duration) -> Result<DeadLetters> {
    op::one(
        c,
        Op::AlertFacts,
        "SELECT count(*) AS count,
                (SELECT error FROM dead_letters ORDER BY received_at DESC, id DESC LIMIT 1)
                    AS latest_error
         FROM dead_letters WHERE received_at > clock_timestamp() - make_interval(secs => $1)",
        &[&within.as_secs_f64()],
        |r| from_row!(r => DeadLetters { count, latest_error }),
    )
    .await
}

/// How many times lease `name` changed hands within `within`.
pub async fn leader_changes_within(
    c: &impl GenericClient,
    name: &str,
    within: Duration,
) -> Result<i64> {
    op::one(
        c,
        Op::AlertFacts,
        "SELECT count(*) AS changes FROM lease_history
         WHERE service_name = $1 AND acquired_at > clock_timestamp() - make_interval(secs => $2)",
        &[&name, &within.as_secs_f64()],
        |r| r.try_get("changes"),
    )
    .await
}

/// The routes held suspended, each with its `route_unavailable` dead letters within `within`
/// and why: as the live holder of lease `lease_name` last said in its heartbeat (within 10 s, in
/// its current term), whether or not messages come for them. Until it has said — a failover's
/// gap, a new leader before its writer's first word, a leader of a release that does not say —
/// the routes with `route_unavailable` dead letters within `within`, with the newest one's error,
/// so that an alert open across a failover does not resolve and open again.
pub async fn suspended_routes(
    c: &impl GenericClient,
    lease_name: &str,
    within: Duration,
) -> Result<Vec<(String, i64, String)>> {
    op::all(
        c,
        Op::AlertFacts,
        "WITH said AS (
             SELECT n.suspended_routes AS s
             FROM instance_lock l JOIN cluster_nodes n ON n.holder_id = l.holder_id
             WHERE l.service_name = $1 AND l.expires_at > clock_timestamp()
               AND n.last_seen >= l.acquired_at
               AND n.last_seen > clock_timestamp() - interval '10 seconds'
               AND jsonb_typeof(n.suspended_routes) = 'object'),
         unavailable AS (
             SELECT route, error, received_at FROM dead_letters
             WHERE reason = 'route_unavailable' AND route IS NOT NULL
               AND received_at > clock_timestamp() - make_interval(secs => $2)),
         suspended AS (
             SELECT e.key AS route, e.value #>> '{}' AS error FROM said, jsonb_each(said.s) e
             UNION ALL
             (SELECT DISTINCT ON (route) route, error FROM unavailable
              WHERE NOT EXISTS (SELECT 1 FROM said)
              ORDER BY route, received_at DESC))
         SELECT s.route, s.error,
                (SELECT count(*) FROM unavailable u WHERE u.route = s.route) AS n
         FROM suspended s ORDER BY s.route",
        &[&lease_name, &within.as_secs_f64()],
        |r| Ok((r.try_get("route")?, r.try_get("n")?, r.try_get("error")?)),
    )
    .await
}
