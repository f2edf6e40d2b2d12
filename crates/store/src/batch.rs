//! The leader's batch write: one statement per batch that checks the fence and stores readings
//! and dead letters together ([`BATCH_SQL`]), on the writer's own connection ([`BatchWriter`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Statement};

use crate::op::{self, Op};
use crate::routed::{routed_sql, RouteOutcome, RouteRow, DEFAULTS_SQL};
use crate::routes::ResolvedRoute;
use crate::{pg_config, tls, Result, StoreError};
use std::sync::Arc;

/// The lease a write transaction must still hold ("One writer" in `docs/guarantees.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub lease_name: String,
    pub holder_id: String,
    pub epoch: i64,
}

/// A message stored in `dead_letters` instead of a table: it could not be decoded, PostgreSQL
/// rejected it, or it conflicts with a stored reading.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Position of the message in its batch (results are reported by it).
    pub idx: usize,
    pub topic: String,
    /// The bytes as received, at most `MAX_PAYLOAD_BYTES` of them.
    pub payload: Vec<u8>,
    /// The size of the payload as received.
    pub size: usize,
    /// Short label (metrics, grouping): `not_json`, `rejected_by_database`, `conflict`, ...
    pub reason: &'static str,
    pub error: String,
    pub received_at: DateTime<Utc>,
    pub pkid: i32,
    pub dup: bool,
    /// The named route(s) whose row this replaces; `None` for the default route (`telemetry`).
    pub route: Option<String>,
}

/// A reading ready to insert. Its identity is `(device_id, topic, ts)`.
#[derive(Debug, Clone)]
pub struct Row {
    /// Position of the message in its batch (results are reported by it).
    pub idx: usize,
    pub device_id: String,
    pub topic: String,
    pub ts: DateTime<Utc>,
    /// The payload text (a JSON object).
    pub payload: String,
    /// Receipt time on the database's clock.
    pub received_at: DateTime<Utc>,
    /// Set when the payload carried no timestamp (then `ts == received_at`): with `pkid` and
    /// `dup` it tells a redelivery from a new publish of the same bytes.
    pub content_hash: Option<String>,
    pub pkid: i32,
    pub dup: bool,
}

/// What one committed statement did, by message position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows inserted into `telemetry`.
    pub inserted: u64,
    /// Rows inserted into `dead_letters` (decode failures and conflicts).
    pub dead_lettered: u64,
    /// Readings whose key was stored with the same payload: redeliveries, skipped.
    pub duplicates: Vec<usize>,
    /// Readings whose key was stored with a different payload: now dead letters.
    pub conflicts: Vec<usize>,
    /// Redeliveries (DUP flag, same packet id and bytes) of a stored timestamp-less reading or
    /// dead letter, skipped.
    pub redelivered: Vec<usize>,
    /// Per named route (the writer's order): its rows' outcome. Empty without routes.
    pub routes: Vec<RouteOutcome>,
}

impl BatchOutcome {
    /// The batch statement's answer; `None` when the fence did not hold (nothing written).
    fn read(
        row: &tokio_postgres::Row,
        routes: usize,
    ) -> Result<Option<Self>, tokio_postgres::Error> {
        if row.try_get::<_, i64>("held")? == 0 {
            return Ok(None);
        }
        let idx = |name: &str| -> Result<Vec<usize>, tokio_postgres::Error> {
            Ok(row
                .try_get::<_, Vec<i32>>(name)?
                .into_iter()
                .map(|i| i as usize)
                .collect())
        };
        let mut out = BatchOutcome {
            inserted: row.try_get::<_, i64>("inserted")? as u64,
            dead_lettered: row.try_get::<_, i64>("dead_lettered")? as u64,
            duplicates: idx("duplicates")?,
            conflicts: idx("conflicts")?,
            redelivered: idx("redelivered")?,
            routes: Vec::with_capacity(routes),
        };
        if routes > 0 {
            out.dead_lettered += row.try_get::<_, i64>("route_dead_lettered")? as u64;
        }
        for k in 0..routes {
            out.routes.push(RouteOutcome {
                written: row.try_get::<_, i64>(format!("written_{k}").as_str())? as u64,
                duplicates: idx(&format!("duplicates_{k}"))?,
                conflicts: idx(&format!("conflicts_{k}"))?,
                unstored: idx(&format!("unstored_{k}"))?,
            });
        }
        Ok(Some(out))
    }
}

/// Default of [`BatchWriter::with_redelivery_span`]: the default `MAX_PENDING` plus headroom.
pub const DEFAULT_REDELIVERY_SPAN: i64 = 12_048;

/// How far back a redelivery's first copy is looked for (see `docs/guarantees.md`).
pub const DEFAULT_REDELIVERY_WINDOW: Duration = Duration::from_secs(3600);

/// The whole batch in ONE statement (one round trip, one implicit transaction):
///
/// 1. `fence` locks the lease row `FOR SHARE` if, and only if, this holder still holds it at this
///    epoch and it has not expired on the database clock. A concurrent takeover (an `UPDATE` of
///    that row) waits for this statement to finish, and this statement waits for a takeover in
///    progress and then re-checks the new row version: a stale writer commits before a takeover or
///    not at all. Every insert below is conditional on it.
/// 2. `again`: timestamp-less readings delivered with the DUP flag whose first copy (same device,
///    topic, bytes and packet id) is stored: skipped. The first copy is looked for only after
///    `floor`: within the redelivery window and among the last `redelivery_span` readings stored
///    before the redelivery — the broker reuses a packet id after 65,535 deliveries, so an older
///    copy with the same id is another publish, not this one.
/// 3. `ins`: the readings, `ON CONFLICT DO NOTHING`; the caller sends each key once.
/// 4. `clash`: readings not inserted, against the row that holds their key (the statement's
///    snapshot does not see `ins`, so that row was there before): the same payload is a
///    duplicate, a different one a conflict, dead-lettered in `dead` with its content hash. A
///    conflicting message redelivered (DUP, same packet id and bytes as a conflict dead letter)
///    is skipped like any redelivery.
/// 5. `dead`: decode failures (skipping their own redeliveries) and conflicts.
///
/// Parameters are arrays (`unnest`), so their count is fixed whatever the batch size. One
/// statement rather than BEGIN / check / insert / COMMIT keeps the share lock only for the
/// server-side execution time: a multi-round-trip transaction would hold it across round trips
/// and starve the leader's own renewals.
pub const BATCH_SQL: &str = "WITH fence AS (
        SELECT 1 FROM instance_lock
        WHERE service_name = $1 AND holder_id = $2 AND epoch = $3 AND expires_at > clock_timestamp()
        FOR SHARE),
    r AS MATERIALIZED (
        SELECT * FROM unnest($6::int[], $7::text[], $8::text[], $9::timestamptz[], $10::text[],
                             $11::timestamptz[], $12::text[], $13::int[], $14::bool[])
             AS u(i, d, tp, t, p, rcv, h, k, dup)),
    dl AS MATERIALIZED (
        SELECT * FROM unnest($15::int[], $16::text[], $17::bytea[], $18::int[], $19::text[], $20::text[],
                             $21::timestamptz[], $22::text[], $23::int[], $24::bool[])
             AS u(i, tp, p, sz, reason, e, rcv, h, k, dup)),
    floor AS MATERIALIZED (
        SELECT CASE WHEN EXISTS (SELECT 1 FROM r WHERE r.dup) OR EXISTS (SELECT 1 FROM dl WHERE dl.dup)
            THEN greatest(
                (SELECT min(u.rcv) FROM (SELECT rcv FROM r WHERE dup UNION ALL SELECT rcv FROM dl WHERE dup) u)
                    - $5::interval,
                coalesce((SELECT x.received_at FROM telemetry x
                          WHERE x.received_at < (SELECT min(u.rcv) FROM (SELECT rcv FROM r WHERE dup
                                                 UNION ALL SELECT rcv FROM dl WHERE dup) u)
                          ORDER BY x.received_at DESC OFFSET $25 LIMIT 1), '-infinity'::timestamptz))
            END AS f),
    again AS MATERIALIZED (
        SELECT r.i FROM r
        WHERE r.dup AND r.h IS NOT NULL AND EXISTS (
            SELECT 1 FROM telemetry x
            WHERE x.device_id = r.d AND x.topic = r.tp AND x.ts > (SELECT f FROM floor)
              AND x.ts < r.rcv AND x.content_hash = r.h AND x.mqtt_pkid = r.k)),
    ins AS (
        INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by, lease_epoch,
                               content_hash, mqtt_pkid, possible_duplicate)
        SELECT d, tp, t, p::jsonb, rcv, $4, $3, h, k, dup AND h IS NOT NULL
        FROM r
        WHERE EXISTS (SELECT 1 FROM fence) AND r.i NOT IN (SELECT i FROM again)
        ON CONFLICT DO NOTHING
        RETURNING device_id, topic, ts),
    missed AS MATERIALIZED (
        SELECT r.* FROM r
        WHERE EXISTS (SELECT 1 FROM fence) AND r.i NOT IN (SELECT i FROM again)
          AND NOT EXISTS (SELECT 1 FROM ins WHERE ins.device_id = r.d AND ins.topic = r.tp AND ins.ts = r.t)),
    clash AS MATERIALIZED (
        SELECT m.*, x.payload = m.p::jsonb AS same,
               encode(substr(sha256(convert_to(m.tp, 'UTF8') || '\\x00'::bytea || convert_to(m.p, 'UTF8')), 1, 16), 'hex') AS hh,
               x.lease_epoch AS stored_epoch
        FROM missed m JOIN telemetry x ON x.device_id = m.d AND x.topic = m.tp AND x.ts = m.t),
    clash_again AS MATERIALIZED (
        SELECT c.i FROM clash c
        WHERE NOT c.same AND c.dup AND EXISTS (
            SELECT 1 FROM dead_letters y
            WHERE y.content_hash = c.hh AND y.mqtt_pkid = c.k
              AND y.received_at > (SELECT f FROM floor) AND y.received_at < c.rcv)),
    dl_again AS MATERIALIZED (
        SELECT dl.i FROM dl
        WHERE dl.dup AND EXISTS (
            SELECT 1 FROM dead_letters y
            WHERE y.content_hash = dl.h AND y.mqtt_pkid = dl.k
              AND y.received_at > (SELECT f FROM floor) AND y.received_at < dl.rcv)),
    dead AS (
        INSERT INTO dead_letters (topic, payload, size, reason, error, received_at, written_by,
                                  lease_epoch, content_hash, mqtt_pkid, possible_duplicate)
        SELECT tp, p, sz, reason, e, rcv, $4, $3, h, k, dup
        FROM dl
        WHERE EXISTS (SELECT 1 FROM fence) AND dl.i NOT IN (SELECT i FROM dl_again)
        UNION ALL
        SELECT c.tp, convert_to(c.p, 'UTF8'), octet_length(c.p), 'conflict',
               format('conflict: a different reading is stored for device_id %s, topic %s, ts %s (written at epoch %s); this one was not stored',
                      c.d, c.tp, c.t, c.stored_epoch),
               c.rcv, $4, $3, c.hh, c.k, c.dup
        FROM clash c
        WHERE NOT c.same AND c.i NOT IN (SELECT i FROM clash_again)
        RETURNING 1)
    SELECT (SELECT count(*) FROM fence) AS held,
           (SELECT count(*) FROM ins) AS inserted,
           (SELECT count(*) FROM dead) AS dead_lettered,
           ARRAY(SELECT i FROM clash WHERE same) AS duplicates,
           ARRAY(SELECT i FROM clash WHERE NOT same AND i NOT IN (SELECT i FROM clash_again)) AS conflicts,
           ARRAY(SELECT i FROM again UNION ALL SELECT i FROM clash_again UNION ALL SELECT i FROM dl_again) AS redelivered";

/// Replaces NUL, which PostgreSQL `text` cannot hold, so a dead letter can always be stored.
pub fn storable_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Writes batches on one connection with the statement prepared once. See [`BATCH_SQL`].
pub struct BatchWriter {
    client: Client,
    stmt: Statement,
    written_by: String,
    redelivery_window: Duration,
    redelivery_span: i64,
    cancel: CancelHandle,
    /// The server's warnings on this connection, each delivered before the answer to the
    /// statement that caused it ([`crate::connect_with_notices`]).
    notices: tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::error::DbError>,
    /// The named routes and their statement, when there are any (else [`BATCH_SQL`] alone).
    routed: Option<(Arc<[ResolvedRoute]>, Statement)>,
}

/// Cancels the statement running on a connection (the server keeps running it otherwise, with
/// the fence's share lock held, after the client stops waiting).
#[derive(Clone)]
pub struct CancelHandle {
    token: tokio_postgres::CancelToken,
    tls: tls::MakeRustls,
}

impl CancelHandle {
    /// The handle of `client`, with the TLS settings of its server (`pg_config`'s), so the
    /// cancel request reaches the server's cancel port as the connection did. A caller that takes
    /// a handle per statement builds them once.
    pub fn with_tls(client: &tokio_postgres::Client, tls: tls::MakeRustls) -> Self {
        CancelHandle {
            token: client.cancel_token(),
            tls,
        }
    }

    pub async fn cancel(&self) -> Result<()> {
        tokio::time::timeout(
            Duration::from_secs(5),
            self.token.cancel_query(self.tls.clone()),
        )
        .await
        .map_err(|_| StoreError::Timeout(Duration::from_secs(5)))??;
        Ok(())
    }
}

impl BatchWriter {
    /// Connects the writer's own connection. Statements are bounded server-side by
    /// `statement_timeout`; a cancelled write is also cancelled on the server ([`CancelHandle`]).
    pub async fn connect(
        url: &str,
        written_by: String,
        statement_timeout: Duration,
        redelivery_window: Duration,
    ) -> Result<Self> {
        let (_, tls) = pg_config(url, "leasehold-writer")?;
        let (client, notices) = crate::connect_with_notices(url, "leasehold-writer").await?;
        let stmt = op::measured(Op::Session, async {
            client
                .batch_execute(&format!(
                    "SET statement_timeout = {}",
                    statement_timeout.as_millis().max(1)
                ))
                .await?;
            Ok(client.prepare(BATCH_SQL).await?)
        })
        .await?;
        let cancel = CancelHandle::with_tls(&client, tls);
        Ok(BatchWriter {
            client,
            stmt,
            written_by,
            redelivery_window,
            redelivery_span: DEFAULT_REDELIVERY_SPAN,
            cancel,
            notices,
            routed: None,
        })
    }

    /// Writes into `routes` from now on: builds and prepares their statement (the columns'
    /// default expressions, which fill a NULL, are read here). No routes: [`BATCH_SQL`] alone.
    pub async fn use_routes(&mut self, routes: Arc<[ResolvedRoute]>) -> Result<()> {
        if routes.is_empty() {
            self.routed = None;
            return Ok(());
        }
        let client = &self.client;
        let stmt = op::measured(Op::Session, async {
            let mut defaults = Vec::with_capacity(routes.len());
            for r in routes.iter() {
                let mut ds = Vec::with_capacity(r.columns.len());
                for c in &r.columns {
                    ds.push(if c.has_default {
                        client
                            .query_opt(DEFAULTS_SQL, &[&r.qualified, &c.name])
                            .await?
                            .map(|row| row.try_get::<_, Option<String>>(0))
                            .transpose()?
                            .flatten()
                    } else {
                        None
                    });
                }
                defaults.push(ds);
            }
            Ok(client.prepare(&routed_sql(&routes, &defaults)).await?)
        })
        .await?;
        self.routed = Some((routes, stmt));
        Ok(())
    }

    /// How many stored readings before a redelivery its first copy may lie: at least the
    /// messages a leader holds unacknowledged (`MAX_PENDING`) plus the broker's in-flight window,
    /// and well under the 65,535 deliveries after which the broker reuses a packet id.
    pub fn with_redelivery_span(mut self, readings: usize) -> Self {
        self.redelivery_span = readings.min(60_000) as i64;
        self
    }

    /// The server's words if a commit on this connection since the last call was made locally
    /// but not replicated (its wait for the synchronous standby was cancelled): such a batch
    /// must not be acknowledged. Other notices are logged.
    pub fn unreplicated_commit(&mut self) -> Option<String> {
        let mut found = None;
        while let Ok(n) = self.notices.try_recv() {
            if crate::syncrep::is_unreplicated_commit(&n) {
                found = Some(format!(
                    "{}{}",
                    n.message(),
                    n.detail().map(|d| format!(" ({d})")).unwrap_or_default()
                ));
            } else {
                tracing::debug!(
                    notice = n.message(),
                    "database notice on the writer's connection"
                );
            }
        }
        found
    }

    /// After a commit: a WAL position past it, and whether a synchronous standby has flushed
    /// that far ([`crate::syncrep::after_commit`]).
    pub async fn after_commit(&self) -> Result<(tokio_postgres::types::PgLsn, bool)> {
        crate::syncrep::after_commit(&self.client).await
    }

    /// Whether a synchronous standby has flushed WAL up to `lsn`.
    pub async fn flushed_past(&self, lsn: tokio_postgres::types::PgLsn) -> Result<bool> {
        crate::syncrep::flushed_past(&self.client, lsn).await
    }

    /// How the database replicates commits now, read on this connection.
    pub async fn replication(&self) -> Result<crate::replication::ReplicationStatus> {
        crate::replication::status(&self.client).await
    }

    /// Whether the connection is gone (the caller reconnects).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// The database's clock, read now: `(database time, local instant)` at the midpoint of the
    /// round trip. Receipt times are placed on the database clock from it.
    pub async fn clock(&self) -> Result<(DateTime<Utc>, std::time::Instant)> {
        let sent = std::time::Instant::now();
        let db: DateTime<Utc> = op::one(
            &self.client,
            Op::DbClock,
            "SELECT clock_timestamp() AS now",
            &[],
            |r| r.try_get("now"),
        )
        .await?;
        let rtt = sent.elapsed();
        Ok((db, sent + rtt / 2))
    }

    /// Commits `rows` and `dead` if the fence holds; [`StoreError::Fenced`] (nothing written)
    /// otherwise. Each reading key must appear at most once in `rows`.
    pub async fn write(
        &mut self,
        fence: &Fence,
        rows: &[Row],
        dead: &[DeadLetter],
        routed: &[RouteRow],
    ) -> Result<BatchOutcome> {
        let n = rows.len();
        let mut ri = Vec::with_capacity(n);
        let mut d = Vec::with_capacity(n);
        let mut tp = Vec::with_capacity(n);
        let mut t = Vec::with_capacity(n);
        let mut p = Vec::with_capacity(n);
        let mut rcv = Vec::with_capacity(n);
        let mut h = Vec::with_capacity(n);
        let mut k = Vec::with_capacity(n);
        let mut dup = Vec::with_capacity(n);
        for row in rows {
            ri.push(row.idx as i32);
            d.push(row.device_id.as_str());
            tp.push(row.topic.as_str());
            t.push(row.ts);
            p.push(row.payload.as_str());
            rcv.push(row.received_at);
            h.push(row.content_hash.as_deref());
            k.push(row.pkid);
            dup.push(row.dup);
        }
        let di: Vec<i32> = dead.iter().map(|x| x.idx as i32).collect();
        let dtp: Vec<std::borrow::Cow<'_, str>> =
            dead.iter().map(|x| storable_text(&x.topic)).collect();
        let dp: Vec<&[u8]> = dead.iter().map(|x| x.payload.as_slice()).collect();
        let dsz: Vec<i32> = dead
            .iter()
            .map(|x| i32::try_from(x.size).unwrap_or(i32::MAX))
            .collect();
        let dreason: Vec<&str> = dead.iter().map(|x| x.reason).collect();
        let de: Vec<std::borrow::Cow<'_, str>> =
            dead.iter().map(|x| storable_text(&x.error)).collect();
        let dr: Vec<DateTime<Utc>> = dead.iter().map(|x| x.received_at).collect();
        let dh: Vec<String> = dead
            .iter()
            .map(|x| leasehold_decode::content_hash(&x.topic, &x.payload))
            .collect();
        let dk: Vec<i32> = dead.iter().map(|x| x.pkid).collect();
        let ddup: Vec<bool> = dead.iter().map(|x| x.dup).collect();
        let dtp_ref: Vec<&str> = dtp.iter().map(|c| c.as_ref()).collect();
        let de_ref: Vec<&str> = de.iter().map(|c| c.as_ref()).collect();
        let window = PgInterval(self.redelivery_window);
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &fence.lease_name,
            &fence.holder_id,
            &fence.epoch,
            &self.written_by,
            &window,
            &ri,
            &d,
            &tp,
            &t,
            &p,
            &rcv,
            &h,
            &k,
            &dup,
            &di,
            &dtp_ref,
            &dp,
            &dsz,
            &dreason,
            &de_ref,
            &dr,
            &dh,
            &dk,
            &ddup,
            &self.redelivery_span,
        ];
        let dl_route: Vec<Option<&str>> = dead.iter().map(|x| x.route.as_deref()).collect();
        let routed_params = self
            .routed
            .as_ref()
            .map(|(routes, _)| RoutedParams::new(routes, routed));
        let (stmt, n_routes) = match (&self.routed, &routed_params) {
            (Some((routes, stmt)), Some(rp)) => {
                params.push(&dl_route);
                rp.push(&mut params);
                (stmt, routes.len())
            }
            _ => (&self.stmt, 0),
        };
        let outcome = op::one(&self.client, Op::WriteBatch, stmt, &params, |r| {
            BatchOutcome::read(r, n_routes)
        })
        .await?;
        // The statement ran; the fence decides whether it wrote anything.
        outcome.ok_or(StoreError::Fenced { epoch: fence.epoch })
    }
}

/// A `std::time::Duration` sent as a PostgreSQL `interval` (microseconds).
#[derive(Debug)]
struct PgInterval(Duration);

impl tokio_postgres::types::ToSql for PgInterval {
    fn to_sql(
        &self,
        _ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        use bytes::BufMut;
        // interval's binary form: microseconds (i64), days (i32), months (i32).
        out.put_i64(i64::try_from(self.0.as_micros()).unwrap_or(i64::MAX));
        out.put_i32(0);
        out.put_i32(0);
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::INTERVAL
    }

    tokio_postgres::types::to_sql_checked!();
}

/// The routed part of a batch statement's parameters: the routed messages once each, then per
/// route its rows' positions and one text array per column.
struct RoutedParams<'a> {
    gi: Vec<i32>,
    gtp: Vec<String>,
    gp: Vec<&'a [u8]>,
    grcv: Vec<DateTime<Utc>>,
    gh: Vec<String>,
    gk: Vec<i32>,
    gdup: Vec<bool>,
    /// Per route: positions, then per column its values.
    routes: Vec<(Vec<i32>, Columns<'a>)>,
}

/// One text array per column of a route (`None`: NULL).
type Columns<'a> = Vec<Vec<Option<&'a str>>>;

impl<'a> RoutedParams<'a> {
    fn new(routes: &[ResolvedRoute], rows: &'a [RouteRow]) -> Self {
        let mut p = RoutedParams {
            gi: Vec::new(),
            gtp: Vec::new(),
            gp: Vec::new(),
            grcv: Vec::new(),
            gh: Vec::new(),
            gk: Vec::new(),
            gdup: Vec::new(),
            routes: routes
                .iter()
                .map(|r| (Vec::new(), vec![Vec::new(); r.columns.len()]))
                .collect(),
        };
        let mut seen = std::collections::HashSet::new();
        for r in rows {
            if seen.insert(r.idx) {
                let m = &r.message;
                p.gi.push(r.idx as i32);
                p.gtp.push(storable_text(&m.topic).into_owned());
                p.gp.push(&m.payload[..]);
                p.grcv.push(m.received_at);
                p.gh.push(leasehold_decode::content_hash(&m.topic, &m.payload));
                p.gk.push(m.pkid);
                p.gdup.push(m.dup);
            }
            let Some((idx, cols)) = p.routes.get_mut(r.route) else {
                continue;
            };
            idx.push(r.idx as i32);
            for (j, col) in cols.iter_mut().enumerate() {
                col.push(r.values.get(j).and_then(|v| v.as_deref()));
            }
        }
        p
    }

    fn push(&'a self, params: &mut Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>) {
        params.extend([
            &self.gi as &(dyn tokio_postgres::types::ToSql + Sync),
            &self.gtp,
            &self.gp,
            &self.grcv,
            &self.gh,
            &self.gk,
            &self.gdup,
        ]);
        for (idx, cols) in &self.routes {
            params.push(idx);
            for c in cols {
                params.push(c);
            }
        }
    }
}
