//! Small queries shared by the node, the HTTP surface and the CLI.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Row};

use crate::op::{self, Op};
use crate::Result;

/// Channel the releasing leader notifies so standbys campaign at once.
pub const LEASE_CHANNEL: &str = "leasehold_lease";
/// Channel the `devices` trigger notifies.
pub const DEVICES_CHANNEL: &str = "leasehold_devices";
/// Channel `leasehold step-down` uses to ask a leader to hand over.
pub const CONTROL_CHANNEL: &str = "leasehold_control";

/// The lease row as stored, judged on the database clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseRow {
    pub holder_id: String,
    pub instance_id: String,
    pub epoch: i64,
    pub acquired_at: DateTime<Utc>,
    pub renewed_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Milliseconds until expiry on the database clock (negative once expired).
    pub expires_in_ms: i64,
}

impl LeaseRow {
    pub fn is_live(&self) -> bool {
        self.expires_in_ms > 0
    }

    /// The holder's `LEASE_TTL`, as its last renewal wrote it (the setting is each node's own).
    pub fn ttl(&self) -> std::time::Duration {
        (self.expires_at - self.renewed_at)
            .to_std()
            .unwrap_or_default()
    }

    fn read(r: &Row) -> Result<Self, tokio_postgres::Error> {
        from_row!(r => LeaseRow {
            holder_id, instance_id, epoch, acquired_at, renewed_at, expires_at, expires_in_ms
        })
    }
}

/// The lease row of `name`, live or not; `None` when it was never taken.
pub async fn lease(c: &impl GenericClient, name: &str) -> Result<Option<LeaseRow>> {
    op::opt(
        c,
        Op::LeaseRead,
        "SELECT holder_id, instance_id, epoch, acquired_at, renewed_at, expires_at,
                    (extract(epoch from (expires_at - clock_timestamp())) * 1000)::bigint
                        AS expires_in_ms
             FROM instance_lock WHERE service_name = $1",
        &[&name],
        LeaseRow::read,
    )
    .await
}

/// Who leads lease `name` now: its row while it is live on the database clock, `None` when it
/// was never taken or has expired. The one "who leads" question tests, chaos and the demo ask.
pub async fn current_leader(c: &impl GenericClient, name: &str) -> Result<Option<LeaseRow>> {
    Ok(lease(c, name).await?.filter(LeaseRow::is_live))
}

/// The cluster's identity: created once by migration 4, the same for every node of the cluster
/// (they share the database), different for every other database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterIdentity {
    /// A random UUID, in its canonical lower-case text form.
    pub cluster_id: String,
    pub created_at: DateTime<Utc>,
}

/// The cluster's identity, `None` when its row is missing (deleted by hand).
pub async fn cluster_identity(c: &impl GenericClient) -> Result<Option<ClusterIdentity>> {
    op::opt(
        c,
        Op::ClusterIdentity,
        "SELECT cluster_id::text AS cluster_id, created_at FROM cluster_identity",
        &[],
        |r| from_row!(r => ClusterIdentity { cluster_id, created_at }),
    )
    .await
}

/// The one rule for "alive", on the database clock: a node heartbeats every 2 s, so one not
/// seen for 10 s has stopped. Every count and flag of live nodes is this predicate.
macro_rules! alive {
    () => {
        "last_seen > clock_timestamp() - interval '10 seconds'"
    };
}

/// The cluster as `GET /cluster` and `leasehold status --json` both show it
/// (docs/interfaces.md); each adds its own fields beside these.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub lease_name: String,
    /// The lease row while it is live: who leads.
    pub leader: Option<LeaseRow>,
    /// The lease's epoch, live or not; `None` when it was never taken.
    pub last_epoch: Option<i64>,
    pub nodes_alive: usize,
    /// The cluster configuration's active version (`None`: none stored yet).
    pub config_version: Option<i64>,
    /// Up to 50 nodes seen within the last day, the most recently seen first.
    pub nodes: Vec<NodeRow>,
    /// The lease row, live or not (the CLI says how long ago it expired).
    #[serde(skip)]
    pub lease: Option<LeaseRow>,
}

impl ClusterReport {
    pub async fn read(c: &impl GenericClient, lease_name: &str) -> Result<ClusterReport> {
        let lease = lease(c, lease_name).await?;
        let leader = lease.clone().filter(LeaseRow::is_live);
        let mut nodes = cluster_nodes(c).await?;
        for n in &mut nodes {
            n.leads = leader.as_ref().is_some_and(|l| l.holder_id == n.holder_id);
        }
        Ok(ClusterReport {
            lease_name: lease_name.to_string(),
            leader,
            last_epoch: lease.as_ref().map(|l| l.epoch),
            nodes_alive: nodes.iter().filter(|n| n.alive).count(),
            config_version: crate::config::active_version(c).await?,
            nodes,
            lease,
        })
    }
}

/// One row of `cluster_nodes`, as the cluster report shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeRow {
    pub instance_id: String,
    pub holder_id: String,
    pub role: String,
    pub mode: String,
    pub version: String,
    pub http_url: Option<String>,
    pub mqtt_connected: bool,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub last_seen_seconds_ago: f64,
    pub alive: bool,
    /// Holds the live lease.
    pub leads: bool,
    /// The client id of the shared session and `derived` / `explicit` (production nodes).
    pub mqtt_client_id: Option<String>,
    pub mqtt_client_id_source: Option<String>,
    /// The cluster configuration version it runs (`None`: it reads none).
    pub config_version: Option<i64>,
}

/// Up to 50 nodes seen within the last day, the most recently seen first.
async fn cluster_nodes(c: &impl GenericClient) -> Result<Vec<NodeRow>> {
    op::all(
        c,
        Op::ClusterNodes,
        concat!(
            "SELECT holder_id, instance_id, role, mode, version, http_url, started_at, last_seen,
                    extract(epoch from (clock_timestamp() - last_seen))::float8 AS ago,
                    ",
            alive!(),
            " AS alive, mqtt_connected, mqtt_client_id, mqtt_client_id_source, config_version
             FROM cluster_nodes WHERE last_seen > clock_timestamp() - interval '1 day'
             ORDER BY last_seen DESC LIMIT 50"
        ),
        &[],
        |r| {
            from_row!(r => NodeRow {
                holder_id, instance_id, role, mode, version, http_url, started_at, last_seen,
                last_seen_seconds_ago: "ago", alive, leads = false, mqtt_connected,
                mqtt_client_id, mqtt_client_id_source, config_version,
            })
        },
    )
    .await
}

/// The nodes alive now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Alive {
    pub nodes: i64,
    /// Those in `production` mode: the ones that can lead.
    pub production: i64,
    /// Seconds since the oldest of them started (0 when none is alive).
    pub uptime: f64,
}

/// How many nodes are alive, how many can lead, and how long the cluster has run.
pub async fn alive(c: &impl GenericClient) -> Result<Alive> {
    op::one(
        c,
        Op::ClusterNodes,
        concat!(
            "SELECT count(*) AS nodes, count(*) FILTER (WHERE mode = 'production') AS production,
                coalesce(extract(epoch from (clock_timestamp() - min(started_at)))::float8, 0)
                    AS uptime
             FROM cluster_nodes WHERE ",
            alive!()
        ),
        &[],
        |r| from_row!(r => Alive { nodes, production, uptime }),
    )
    .await
}

/// What a node reports about itself every heartbeat.
#[derive(Debug, Clone)]
pub struct Heartbeat<'a> {
    pub holder_id: &'a str,
    pub instance_id: &'a str,
    pub role: &'a str,
    pub mode: &'a str,
    pub version: &'a str,
    pub http_url: Option<&'a str>,
    pub started_at: DateTime<Utc>,
    pub mqtt_connected: bool,
    /// When this node last saw the broker lose the session / its client id taken (kept if `None`).
    pub session_lost_at: Option<DateTime<Utc>>,
    pub client_id_conflict_at: Option<DateTime<Utc>>,
    /// The shared session's client id and `derived` / `explicit`; `None` for other modes.
    pub mqtt_client_id: Option<&'a str>,
    pub mqtt_client_id_source: Option<&'a str>,
    /// The cluster configuration version the node runs.
    pub config_version: Option<i64>,
    /// Seconds since this node last reached the broker (connected, or a standby's probe
    /// answered); `None`: not since it started. Stored on the database's clock.
    pub broker_reached_ago: Option<f64>,
    /// The routes this node holds suspended while it leads, `{"route": "why"}` (`{}`: none;
    /// `None`: not leading, or its writer has not said yet).
    pub suspended_routes: Option<serde_json::Value>,
}

pub async fn heartbeat(c: &impl GenericClient, hb: &Heartbeat<'_>) -> Result<()> {
    op::exec(
        c,
        Op::Heartbeat,
        "INSERT INTO cluster_nodes AS n (holder_id, instance_id, role, mode, version, http_url, started_at,
                last_seen, mqtt_connected, mqtt_changed_at, session_lost_at, client_id_conflict_at,
                mqtt_client_id, mqtt_client_id_source, config_version, broker_reached_at,
                suspended_routes)
         VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8, now(), $9, $10, $11, $12, $13,
                 CASE WHEN $14::float8 IS NULL THEN NULL
                      ELSE clock_timestamp() - make_interval(secs => $14::float8) END, $15)
         ON CONFLICT (holder_id) DO UPDATE SET role = EXCLUDED.role, last_seen = now(),
             config_version = EXCLUDED.config_version,
             suspended_routes = EXCLUDED.suspended_routes,
             broker_reached_at = coalesce(EXCLUDED.broker_reached_at, n.broker_reached_at),
             http_url = EXCLUDED.http_url,
             mqtt_changed_at = CASE WHEN n.mqtt_connected = EXCLUDED.mqtt_connected
                                    THEN n.mqtt_changed_at ELSE now() END,
             mqtt_connected = EXCLUDED.mqtt_connected,
             session_lost_at = coalesce(EXCLUDED.session_lost_at, n.session_lost_at),
             client_id_conflict_at = coalesce(EXCLUDED.client_id_conflict_at, n.client_id_conflict_at)",
        &[&hb.holder_id, &hb.instance_id, &hb.role, &hb.mode, &hb.version, &hb.http_url, &hb.started_at,
          &hb.mqtt_connected, &hb.session_lost_at, &hb.client_id_conflict_at,
          &hb.mqtt_client_id, &hb.mqtt_client_id_source, &hb.config_version,
          &hb.broker_reached_ago, &hb.suspended_routes],
    )
    .await?;
    Ok(())
}

/// Records, for data age, that a leader of `epoch` leads (its heartbeat, every beat): the
/// receipts it stores are recorded by the statements that store them ([`crate::statement`]'s
/// `newest`), and the record of the epoch the lease holds is trusted without reading
/// `telemetry` (`leasehold_newest_reading`, migration 10) even while it stores nothing. A
/// deposed leader's record of an older epoch is ignored. Once recorded, a beat writes nothing.
/// `false`: not recorded yet, because a statement holds the row; ask again.
///
/// The table is read, once a term, only when the record cannot be trusted to hold the newest
/// receipt: it holds no time (a database readings reached before migration 10, or none ever
/// reached `telemetry`), no row (removed), or a term between the one recorded and this one
/// recorded nothing (a leader of a release before migration 10 stores without recording). The
/// epoch is raised in the same statement as that read, so a read that fails is tried again at
/// the next beat; a statement of its own, so that the plan of every partition is made only then.
pub async fn note_term(c: &impl GenericClient, epoch: i64) -> Result<bool> {
    // SKIP LOCKED: the heartbeat never waits behind a batch statement's commit, but to read
    // the table.
    let (recorded, untrusted) = op::one(
        c,
        Op::NoteNewest,
        "WITH term AS (
             UPDATE telemetry_newest n SET epoch = $1
             WHERE n.one IN (SELECT one FROM telemetry_newest
                             WHERE coalesce(epoch, 0) < $1 FOR UPDATE SKIP LOCKED)
               AND n.at IS NOT NULL AND coalesce(n.epoch, 0) >= $1 - 1
             RETURNING 1)
         SELECT EXISTS (SELECT 1 FROM term)
                    OR EXISTS (SELECT 1 FROM telemetry_newest WHERE epoch >= $1) AS recorded,
                NOT EXISTS (SELECT 1 FROM telemetry_newest)
                    OR EXISTS (SELECT 1 FROM telemetry_newest
                               WHERE coalesce(epoch, 0) < $1
                                 AND (at IS NULL OR coalesce(epoch, 0) < $1 - 1)) AS untrusted",
        &[&epoch],
        |r| {
            Ok((
                r.try_get::<_, bool>("recorded")?,
                r.try_get::<_, bool>("untrusted")?,
            ))
        },
    )
    .await?;
    if recorded || !untrusted {
        return Ok(recorded);
    }
    op::exec(
        c,
        Op::NoteNewest,
        "INSERT INTO telemetry_newest AS n (one, at, epoch)
         VALUES (true, (SELECT max(x.received_at) FROM telemetry x
                        WHERE x.received_at <= clock_timestamp() + interval '1 minute'), $1)
         ON CONFLICT (one) DO UPDATE
             SET at = greatest(n.at, EXCLUDED.at), epoch = greatest(n.epoch, EXCLUDED.epoch)",
        &[&epoch],
    )
    .await?;
    Ok(true)
}

/// Seconds since the newest reading stored in `telemetry` was received, as the statements that
/// store readings record it (see [`note_term`]), or as the table holds it before a first record;
/// `None` when there is none. One row, whatever the table holds: `max(received_at)` would plan
/// and read every partition.
pub async fn newest_data_age(c: &impl GenericClient) -> Result<Option<f64>> {
    op::one(
        c,
        Op::NewestDataAge,
        "SELECT extract(epoch from (clock_timestamp() - leasehold_newest_reading()))::float8 AS age",
        &[],
        |r| r.try_get("age"),
    )
    .await
}

/// Dead letters received within the last `within_secs`, by route (`None`: the default route). A
/// dead letter of several routes (`route = "a,b"`) counts for each of them.
pub async fn dead_letters_by_route(
    c: &impl GenericClient,
    within_secs: f64,
) -> Result<Vec<(Option<String>, i64)>> {
    op::all(
        c,
        Op::DeadLettersByRoute,
        "SELECT r AS route, count(*) AS n
         FROM dead_letters,
              unnest(coalesce(string_to_array(route, ','), ARRAY[NULL::text])) AS r
         WHERE received_at > clock_timestamp() - make_interval(secs => $1)
         GROUP BY r ORDER BY r NULLS FIRST",
        &[&within_secs],
        |r| Ok((r.try_get("route")?, r.try_get("n")?)),
    )
    .await
}

/// A round trip that proves the database answers (`/health/ready`).
pub async fn ping(c: &impl GenericClient) -> Result<()> {
    op::measured(Op::Ping, async {
        c.simple_query("SELECT 1").await?;
        Ok(())
    })
    .await
}

/// Topic filters of enabled devices.
pub async fn device_topics(c: &impl GenericClient) -> Result<Vec<String>> {
    op::all(
        c,
        Op::DeviceTopics,
        "SELECT DISTINCT topic FROM devices WHERE enabled ORDER BY topic",
        &[],
        |r| r.try_get("topic"),
    )
    .await
}

/// Asks the current leader of `lease_name` to hand over (it LISTENs on [`CONTROL_CHANNEL`]).
pub async fn request_step_down(
    c: &impl GenericClient,
    lease_name: &str,
    holder_id: &str,
) -> Result<()> {
    let payload = format!("step-down {lease_name} {holder_id}");
    op::exec(
        c,
        Op::StepDown,
        "SELECT pg_notify($1, $2)",
        &[&CONTROL_CHANNEL, &payload],
    )
    .await?;
    Ok(())
}

/// Enabled devices and how many of them were heard from within a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    pub enabled: i64,
    pub heard: i64,
    /// Up to the requested number of enabled devices not heard from, by id.
    pub silent: Vec<String>,
}

/// Coverage judged by each device's newest reading per topic, found by a skip scan of the primary
/// key (device_id, topic, ts): one short index descent per topic of the device and recent
/// partition, whatever the size of `telemetry` ([`crate::partitions::recent_floor`]: only
/// readings timestamped from the start of the partition holding `now - window` are read; a
/// device whose clock runs further behind counts as not heard). Heard when the newest reading of
/// any of its topics was received within `window`.
pub async fn device_coverage(
    c: &impl GenericClient,
    window: std::time::Duration,
    list_silent: i64,
) -> Result<Coverage> {
    let since = crate::partitions::recent_floor(c, window).await?;
    // Each device's newest reading per topic must come from each partition's index, newest
    // first: with a partition's statistics taken while it was nearly empty (a new day, a burst),
    // the planner would rather read all of a device's readings of the day and sort them. No
    // sort then (and no JIT for a query of milliseconds), for this statement only.
    let begin = "BEGIN; SET LOCAL enable_sort = off; SET LOCAL jit = off";
    op::batch(c, Op::DeviceCoverage, begin).await?;
    let rows = op::all(
        c,
        Op::DeviceCoverage,
        "WITH d AS (
                SELECT d.device_id, EXISTS (
                    WITH RECURSIVE topics(topic) AS (
                        SELECT (SELECT min(t.topic) FROM telemetry t
                                WHERE t.device_id = d.device_id AND t.ts >= $3)
                        UNION ALL
                        SELECT (SELECT min(t.topic) FROM telemetry t
                                WHERE t.device_id = d.device_id AND t.topic > topics.topic
                                  AND t.ts >= $3)
                        FROM topics WHERE topics.topic IS NOT NULL)
                    SELECT 1 FROM topics
                    WHERE topics.topic IS NOT NULL
                      AND (SELECT t.received_at FROM telemetry t
                           WHERE t.device_id = d.device_id AND t.topic = topics.topic
                             AND t.ts >= $3
                           ORDER BY t.ts DESC LIMIT 1) > clock_timestamp() - make_interval(secs => $1)
                ) AS heard
                FROM devices d WHERE d.enabled)
             SELECT (SELECT count(*) FROM d) AS enabled, (SELECT count(*) FROM d WHERE heard) AS heard,
                    s.device_id
             FROM (SELECT 1) one
             LEFT JOIN LATERAL (SELECT device_id FROM d WHERE NOT heard
                                ORDER BY device_id LIMIT $2) s ON true",
        &[&window.as_secs_f64(), &list_silent, &since],
        |r| {
            Ok((
                r.try_get::<_, i64>("enabled")?,
                r.try_get::<_, i64>("heard")?,
                r.try_get::<_, Option<String>>("device_id")?,
            ))
        },
    )
    .await;
    let end = if rows.is_ok() { "COMMIT" } else { "ROLLBACK" };
    op::batch(c, Op::DeviceCoverage, end).await?;
    let rows = rows?;
    let (enabled, heard) = rows.first().map(|r| (r.0, r.1)).unwrap_or((0, 0));
    Ok(Coverage {
        enabled,
        heard,
        silent: rows.into_iter().filter_map(|r| r.2).collect(),
    })
}

/// One row of the subscription ledger (`mqtt_subscriptions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub topic_filter: String,
    /// Granted QoS >= 1 and not unsubscribed since; otherwise the session may or may not have it.
    pub subscribed: bool,
}

/// What the ledger says the session `client_id` is subscribed to.
pub async fn ledger(c: &impl GenericClient, client_id: &str) -> Result<Vec<LedgerRow>> {
    op::all(
        c,
        Op::LedgerRead,
        "SELECT topic_filter, state = 'subscribed' AS subscribed FROM mqtt_subscriptions
         WHERE client_id = $1 ORDER BY topic_filter",
        &[&client_id],
        |r| from_row!(r => LedgerRow { topic_filter, subscribed }),
    )
    .await
}

/// A change to the ledger, written only while `fence` holds (like every leader write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerWrite<'a> {
    /// The broker has no session (`session_present = false`): it has no subscriptions either.
    Forget,
    /// A SUBSCRIBE or UNSUBSCRIBE for these filters is about to be sent: maybe subscribed.
    Pending(&'a [String]),
    /// SUBACK granted these filters with these QoS levels (>= 1).
    Granted(&'a [String], &'a [i16]),
    /// SUBACK refused these filters (or granted below QoS 1), for these reasons.
    Refused(&'a [String], &'a [String]),
    /// UNSUBACK: the session no longer has these filters.
    Removed(&'a [String]),
}

/// The fence every leader write checks ("One writer" in `docs/guarantees.md`), as a CTE named
/// `fence`.
pub(crate) const FENCE_CTE: &str = "fence AS (
        SELECT 1 FROM instance_lock
        WHERE service_name = $1 AND holder_id = $2 AND epoch = $3 AND expires_at > clock_timestamp()
        FOR SHARE)";

/// Applies `write` to the ledger of `client_id` in one statement, if and only if `fence` still
/// holds; [`crate::StoreError::Fenced`] (nothing written) otherwise. Returns the rows changed.
pub async fn write_ledger(
    c: &impl GenericClient,
    fence: &crate::Fence,
    client_id: &str,
    write: &LedgerWrite<'_>,
) -> Result<u64> {
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![
        &fence.lease_name,
        &fence.holder_id,
        &fence.epoch,
        &client_id,
    ];
    let sql = match write {
        LedgerWrite::Forget => {
            "DELETE FROM mqtt_subscriptions WHERE client_id = $4 AND EXISTS (SELECT 1 FROM fence)
             RETURNING 1"
        }
        LedgerWrite::Pending(f) => {
            params.push(f);
            "INSERT INTO mqtt_subscriptions AS s (client_id, topic_filter, state, lease_epoch)
             SELECT $4, f, 'pending', $3 FROM unnest($5::text[]) AS u(f)
             WHERE EXISTS (SELECT 1 FROM fence)
             ON CONFLICT (client_id, topic_filter) DO UPDATE
                 SET state = 'pending', updated_at = now(), lease_epoch = EXCLUDED.lease_epoch
             RETURNING 1"
        }
        LedgerWrite::Granted(f, q) => {
            params.extend::<[&(dyn ToSql + Sync); 2]>([f, q]);
            "INSERT INTO mqtt_subscriptions AS s (client_id, topic_filter, state, granted_qos, lease_epoch)
             SELECT $4, f, 'subscribed', q, $3 FROM unnest($5::text[], $6::int2[]) AS u(f, q)
             WHERE EXISTS (SELECT 1 FROM fence)
             ON CONFLICT (client_id, topic_filter) DO UPDATE
                 SET state = 'subscribed', granted_qos = EXCLUDED.granted_qos, refused_at = NULL,
                     refusal = NULL, attempts = 0, updated_at = now(),
                     lease_epoch = EXCLUDED.lease_epoch
             RETURNING 1"
        }
        LedgerWrite::Refused(f, r) => {
            params.extend::<[&(dyn ToSql + Sync); 2]>([f, r]);
            "INSERT INTO mqtt_subscriptions AS s (client_id, topic_filter, state, refused_at, refusal,
                                               attempts, lease_epoch)
             SELECT $4, f, 'pending', now(), r, 1, $3 FROM unnest($5::text[], $6::text[]) AS u(f, r)
             WHERE EXISTS (SELECT 1 FROM fence)
             ON CONFLICT (client_id, topic_filter) DO UPDATE
                 SET state = 'pending', refused_at = now(), refusal = EXCLUDED.refusal,
                     attempts = s.attempts + 1, updated_at = now(),
                     lease_epoch = EXCLUDED.lease_epoch
             RETURNING 1"
        }
        LedgerWrite::Removed(f) => {
            params.push(f);
            "DELETE FROM mqtt_subscriptions
             WHERE client_id = $4 AND topic_filter = ANY($5::text[]) AND EXISTS (SELECT 1 FROM fence)
             RETURNING 1"
        }
    };
    let sql = format!(
        "WITH {FENCE_CTE}, w AS ({sql})
         SELECT (SELECT count(*) FROM fence) AS held, (SELECT count(*) FROM w) AS changed"
    );
    let (held, changed) = op::one(c, Op::LedgerWrite, &sql, &params, |r| {
        Ok((
            r.try_get::<_, i64>("held")?,
            r.try_get::<_, i64>("changed")?,
        ))
    })
    .await?;
    if held == 0 {
        return Err(crate::StoreError::Fenced { epoch: fence.epoch });
    }
    Ok(changed as u64)
}

/// Topic filters the broker refused lately, for the `mqtt_subscription_refused` alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedSubscriptions {
    pub count: i64,
    /// The most recently refused, up to the requested number: (filter, reason, attempts).
    pub latest: Vec<(String, String, i32)>,
}

/// Filters refused within `within` (a leader retries a refused filter well within a minute, so
/// a refusal that is still true keeps being refreshed) that are still in the ledger (a filter
/// subscribed since, or unsubscribed, no longer counts).
pub async fn refused_subscriptions(
    c: &impl GenericClient,
    within: std::time::Duration,
    list: i64,
) -> Result<RefusedSubscriptions> {
    let rows = op::all(
        c,
        Op::RefusedSubscriptions,
        "WITH r AS (SELECT topic_filter, refusal, attempts, refused_at FROM mqtt_subscriptions
                    WHERE refused_at > clock_timestamp() - make_interval(secs => $1))
         SELECT (SELECT count(*) FROM r) AS count, l.topic_filter, l.refusal, l.attempts
         FROM (SELECT 1) one
         LEFT JOIN LATERAL (SELECT * FROM r ORDER BY refused_at DESC, topic_filter LIMIT $2) l
             ON true",
        &[&within.as_secs_f64(), &list],
        |r| {
            let filter: Option<String> = r.try_get("topic_filter")?;
            let refusal: Option<String> = r.try_get("refusal")?;
            let attempts: Option<i32> = r.try_get("attempts")?;
            let latest = filter.map(|f| (f, refusal.unwrap_or_default(), attempts.unwrap_or(0)));
            Ok((r.try_get::<_, i64>("count")?, latest))
        },
    )
    .await?;
    Ok(RefusedSubscriptions {
        count: rows.first().map_or(0, |r| r.0),
        latest: rows.into_iter().filter_map(|r| r.1).collect(),
    })
}

/// A node alive now that does not run the active cluster configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutdatedNode {
    pub instance_id: String,
    /// The version it runs (`None`: a node that reads no stored version).
    pub running: Option<i64>,
    pub active: i64,
}

/// Nodes alive that run another version than the active one, which has been active for longer
/// than `grace` (a node applies a new version within a second or two of its NOTIFY).
pub async fn config_outdated(
    c: &impl GenericClient,
    grace: std::time::Duration,
) -> Result<Vec<OutdatedNode>> {
    op::all(
        c,
        Op::AlertFacts,
        concat!(
            "SELECT n.instance_id, n.config_version, a.version
             FROM cluster_nodes n,
                  (SELECT version, applied_at FROM cluster_config ORDER BY version DESC LIMIT 1) a
             WHERE ",
            alive!(),
            " AND n.config_version IS DISTINCT FROM a.version
               AND a.applied_at < clock_timestamp() - make_interval(secs => $1)
             ORDER BY 1"
        ),
        &[&grace.as_secs_f64()],
        |r| from_row!(r => OutdatedNode { instance_id, running: "config_version", active: "version" }),
    )
    .await
}

/// Whether a production node alive other than `holder_id` reached the broker within `within`
/// (on the database's clock): one that a leader cut off from the broker may hand over to.
pub async fn standby_reached_broker(
    c: &impl GenericClient,
    holder_id: &str,
    within: std::time::Duration,
) -> Result<Option<String>> {
    op::opt(
        c,
        Op::ClusterNodes,
        concat!(
            "SELECT instance_id FROM cluster_nodes
             WHERE holder_id <> $1 AND mode = 'production' AND ",
            alive!(),
            " AND broker_reached_at > clock_timestamp() - make_interval(secs => $2)
             ORDER BY broker_reached_at DESC LIMIT 1"
        ),
        &[&holder_id, &within.as_secs_f64()],
        |r| r.try_get("instance_id"),
    )
    .await
}
