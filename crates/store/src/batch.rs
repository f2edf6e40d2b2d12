//! The leader's batch write: one statement per batch, generated from the routes' descriptions
//! ([`crate::statement`]), that checks the fence and stores every route's rows and the dead
//! letters together, on the writer's own connection ([`BatchWriter`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use leasehold_decode::sparkplug::{Node, NodeChange, NodeKey};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use crate::op::{self, Op};
use crate::routes::ResolvedRoute;
use crate::sparkplug::NodeArrays;
use crate::statement::{batch_sql, optimistic_sql, sent_columns, Records, Wire, DEFAULTS_SQL};
use crate::{pg_config, tls, Result, StoreError};

/// The lease a write transaction must still hold ("One writer" in `docs/guarantees.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub lease_name: String,
    pub holder_id: String,
    pub epoch: i64,
}

impl Fence {
    /// How long a transaction of several statements that holds the lease row `FOR SHARE` may
    /// spend on each statement, and on each wait for the next one: a sixth of the lease's life.
    /// A renewal waits for the whole transaction, so such a transaction is kept to a few short
    /// statements; and a client that stops in the middle frees the row this long after its
    /// last answer ([`idle_limit_sql`]).
    pub fn step_limit(lease_ttl: Duration) -> Duration {
        (lease_ttl / 6).max(Duration::from_millis(100))
    }
}

/// `SET LOCAL` that ends the session when its transaction waits longer than `limit` for its
/// client. A fenced transaction whose client stops between two statements (a process paused, a
/// laptop suspended, a VM frozen, a network cut) would otherwise hold the lease row until the
/// server declares the TCP connection dead, hours later, and no renewal or takeover could update
/// the row meanwhile: the whole cluster would stop ingesting.
pub(crate) fn idle_limit_sql(limit: Duration) -> String {
    local_limit_sql("idle_in_transaction_session_timeout", limit)
}

/// `SET LOCAL` of a timeout `setting` to `limit`.
pub(crate) fn local_limit_sql(setting: &str, limit: Duration) -> String {
    // PostgreSQL takes at most i32::MAX ms; a lease row written by hand can say longer.
    format!(
        "SET LOCAL {setting} = {}",
        limit.as_millis().clamp(1, i32::MAX as u128)
    )
}

/// A message stored in `dead_letters` instead of a table: it could not be decoded or mapped,
/// or PostgreSQL refused its row.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Position of the message in its batch (results are reported by it).
    pub idx: usize,
    pub topic: String,
    /// The bytes as received, at most `MAX_PAYLOAD_BYTES` of them.
    pub payload: bytes::Bytes,
    /// The size of the payload as received.
    pub size: usize,
    /// Short label (metrics, grouping): `not_json`, `rejected_by_database`, `mapping_failed`, ...
    pub reason: &'static str,
    pub error: String,
    pub received_at: DateTime<Utc>,
    pub pkid: i32,
    pub dup: bool,
    /// The named route(s) whose row this replaces; `None` for the default route (`telemetry`).
    pub route: Option<String>,
}

/// The message a route row came from: what the statement reads shared columns and dead letters
/// from. Sent once per statement however many rows it has.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    /// The payload as received: JSON text (a message whose row reached a route was decoded).
    pub payload: bytes::Bytes,
    /// What a dead letter of this reading keeps when it is not `payload`: the message as
    /// received (a bare value), so that its format reads it again on replay.
    pub raw: Option<bytes::Bytes>,
    /// Its place in its message (`element 3 of 10`), when the message held several readings:
    /// put before the words of its dead letters.
    pub label: Option<String>,
    pub received_at: DateTime<Utc>,
    pub pkid: i32,
    pub dup: bool,
    /// The content hash of topic and payload when the payload has no timestamp and a route
    /// maps `content_hash` or `possible_duplicate` (else `None`: the statement computes it where
    /// a dead letter needs it).
    pub content_hash: Option<String>,
}

/// `error` with `label` (a reading's place in its message, `element 3 of 10`) before it.
pub fn placed(label: Option<&str>, error: String) -> String {
    match label {
        Some(label) => format!("{label}: {error}"),
        None => error,
    }
}

impl Message {
    /// `error` with this reading's place in its message before it.
    pub fn placed(&self, error: String) -> String {
        placed(self.label.as_deref(), error)
    }

    /// The bytes a dead letter of this reading keeps.
    pub fn dead_letter_bytes(&self) -> bytes::Bytes {
        self.raw.clone().unwrap_or_else(|| self.payload.clone())
    }
}

/// One value of a route row, typed as it is sent ([`crate::statement::carry`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    Text(String),
    Int(i64),
    Bool(bool),
    Time(DateTime<Utc>),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

/// One message's row in one route.
#[derive(Debug, Clone)]
pub struct RouteRow {
    /// Position of the message in its batch (results are reported by it).
    pub idx: usize,
    /// Index of the route in the writer's routes (0: `telemetry`).
    pub route: usize,
    /// One value per column of the route, in its column order (`Null` for a column the
    /// statement reads from the message, unless it is part of the key).
    pub values: Vec<Value>,
    pub message: Arc<Message>,
}

impl RouteRow {
    /// The `telemetry` row (route 0, [`ResolvedRoute::telemetry`]'s columns) of a reading that
    /// carried its own timestamp, delivered once: what a tool or a test writes directly.
    pub fn reading(
        idx: usize,
        device_id: &str,
        topic: &str,
        ts: DateTime<Utc>,
        payload: &str,
    ) -> Self {
        let mut values = vec![Value::Null; 10];
        values[0] = Value::Text(device_id.into());
        values[1] = Value::Text(topic.into());
        values[2] = Value::Time(ts);
        values[9] = Value::Bool(false);
        RouteRow {
            idx,
            route: 0,
            values,
            message: Arc::new(Message {
                topic: topic.into(),
                payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
                raw: None,
                label: None,
                received_at: Utc::now(),
                pkid: 0,
                dup: false,
                content_hash: None,
            }),
        }
    }
}

/// What one route's part of a committed statement did, by message position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteOutcome {
    /// Rows inserted (or, with `on_conflict = "update"`, inserted or updated).
    pub written: u64,
    /// Rows whose key was stored with the same content, and redeliveries of a stored row or
    /// conflict: skipped.
    pub duplicates: Vec<usize>,
    /// Rows whose key was stored with different content: dead-lettered.
    pub conflicts: Vec<usize>,
    /// Rows the table neither took nor holds a row for (a trigger or rule skipped them):
    /// dead-lettered.
    pub unstored: Vec<usize>,
}

/// What one committed statement did, by message position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows inserted into `dead_letters` (decode and mapping failures, refusals, conflicts).
    pub dead_lettered: u64,
    /// Dead letters skipped: redeliveries (DUP, same packet id and bytes) of a stored one.
    pub redelivered: Vec<usize>,
    /// Per route (the writer's order): its rows' outcome.
    pub routes: Vec<RouteOutcome>,
}

impl BatchOutcome {
    /// The batch statement's answer; `None` when the fence did not hold (nothing written).
    fn read(
        row: &tokio_postgres::Row,
        routes: usize,
    ) -> Result<Option<Self>, tokio_postgres::Error> {
        if row.try_get::<_, i64>(0)? == 0 {
            return Ok(None);
        }
        let idx = |at: usize| -> Result<Vec<usize>, tokio_postgres::Error> {
            Ok(row
                .try_get::<_, Vec<i32>>(at)?
                .into_iter()
                .map(|i| i as usize)
                .collect())
        };
        let mut out = BatchOutcome {
            dead_lettered: row.try_get::<_, i64>(1)? as u64,
            redelivered: idx(2)?,
            routes: Vec::with_capacity(routes),
        };
        for k in 0..routes {
            let at = 3 + 4 * k;
            out.routes.push(RouteOutcome {
                written: row.try_get::<_, i64>(at)? as u64,
                duplicates: idx(at + 1)?,
                conflicts: idx(at + 2)?,
                unstored: idx(at + 3)?,
            });
        }
        Ok(Some(out))
    }
}

/// Default of [`BatchWriter::with_redelivery_span`]: the default `MAX_PENDING` plus headroom.
pub const DEFAULT_REDELIVERY_SPAN: i64 = 12_048;

/// How far back a redelivery's first copy is looked for (see `docs/guarantees.md`).
pub const DEFAULT_REDELIVERY_WINDOW: Duration = Duration::from_secs(3600);

/// Writes that go straight to the full statement after an optimistic one failed.
pub const FULL_AFTER_FALLBACK: u32 = 100;

/// The SQLSTATE of `leasehold_all_stored` (migration 12): a row the table did not take.
const NOT_ALL_STORED: &str = "LH001";

/// Prepares the full statement for `routes`, then the optimistic one with its parameter types
/// (it leaves the redelivery window and span unused, so PostgreSQL could not infer them).
async fn prepare_both(
    client: &Client,
    routes: &[ResolvedRoute],
    defaults: &[Vec<Option<String>>],
    records: Records,
) -> Result<(Statement, Statement)> {
    let full = client
        .prepare(&batch_sql(routes, defaults, records))
        .await?;
    let optimistic = client
        .prepare_typed(&optimistic_sql(routes, defaults, records), full.params())
        .await?;
    Ok((full, optimistic))
}

/// How many readings a redelivered message of `rows` holds, at most (1 without a DUP-flagged
/// one). The span a redelivery's first copy is looked for in counts readings, and is sized for
/// one reading per message: a leader that held `MAX_PENDING` arrays of 50 readings stored up to
/// 50 times as many rows between a first copy and its redelivery.
fn readings_per_redelivery(rows: &[RouteRow]) -> i64 {
    if !rows.iter().any(|r| r.message.dup) {
        return 1;
    }
    let mut per: std::collections::HashMap<(&str, i32, DateTime<Utc>), HashSet<usize>> =
        std::collections::HashMap::new();
    for r in rows.iter().filter(|r| r.message.dup) {
        // The readings of one message share its topic, packet id and receipt (to the second:
        // reading k is k microseconds after it).
        let at = r.message.received_at;
        let second = DateTime::from_timestamp(at.timestamp(), 0).unwrap_or(at);
        per.entry((r.message.topic.as_str(), r.message.pkid, second))
            .or_default()
            .insert(r.idx);
    }
    per.values()
        .map(|s| s.len() as i64)
        .max()
        .unwrap_or(1)
        .max(1)
}

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
    pub(crate) client: Client,
    stmt: Statement,
    /// [`optimistic_sql`]'s statement, with `stmt`'s parameters.
    optimistic: Statement,
    /// The two with the Sparkplug B edge nodes' record ([`crate::sparkplug::record_ctes`]),
    /// prepared at the first batch that changes them.
    with_nodes: Option<(Statement, Statement)>,
    /// The routes' columns' default expressions, for `with_nodes`.
    defaults: Vec<Vec<Option<String>>>,
    /// Writes left that go straight to `stmt`: keys already stored tend to come in runs (a
    /// device that sends its readings twice, two routes into one table), and each optimistic
    /// attempt that fails costs a statement.
    full_for: u32,
    written_by: String,
    redelivery_window: Duration,
    redelivery_span: i64,
    cancel: CancelHandle,
    /// The server's warnings on this connection, each delivered before the answer to the
    /// statement that caused it ([`crate::connect_with_notices`]).
    notices: tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::error::DbError>,
    /// The routes the statement is prepared for: `telemetry` first, then the named ones.
    routes: Arc<[ResolvedRoute]>,
    /// Whether its statements record the newest receipt for data age ([`Records::newest`]).
    newest: bool,
    /// In a transaction opened by [`BatchWriter::begin`]: how long it may hold the lease row,
    /// its statements together, from its first write; and how long it may wait for this client
    /// ([`idle_limit_sql`]).
    pub(crate) hold_limit: Option<Duration>,
    /// When that transaction's first write took the lease row.
    pub(crate) held_since: Option<Instant>,
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
    /// Connects the writer's own connection, its statement prepared for `telemetry` alone.
    /// Statements are bounded server-side by `statement_timeout`; a cancelled write is also
    /// cancelled on the server ([`CancelHandle`]).
    pub async fn connect(
        url: &str,
        written_by: String,
        statement_timeout: Duration,
        redelivery_window: Duration,
    ) -> Result<Self> {
        let (_, tls) = pg_config(url, "leasehold-writer")?;
        let (client, notices) = crate::connect_with_notices(url, "leasehold-writer").await?;
        let routes: Arc<[ResolvedRoute]> = Arc::from(vec![ResolvedRoute::telemetry()]);
        let stmt = op::measured(Op::Session, async {
            client
                // No JIT: the batch statement runs for milliseconds, and compiling it (its cost
                // estimate crosses `jit_above_cost` with a few hundred rows) cost more than
                // running it, at every batch.
                .batch_execute(&format!(
                    "SET statement_timeout = {}; SET jit = off",
                    statement_timeout.as_millis().max(1)
                ))
                .await?;
            prepare_both(
                &client,
                &routes,
                &[],
                Records {
                    nodes: false,
                    newest: true,
                },
            )
            .await
        })
        .await?;
        let cancel = CancelHandle::with_tls(&client, tls);
        let (stmt, optimistic) = stmt;
        Ok(BatchWriter {
            client,
            stmt,
            optimistic,
            with_nodes: None,
            defaults: Vec::new(),
            full_for: 0,
            written_by,
            redelivery_window,
            redelivery_span: DEFAULT_REDELIVERY_SPAN,
            cancel,
            notices,
            routes,
            newest: true,
            hold_limit: None,
            held_since: None,
        })
    }

    /// What this writer's statements record besides the rows: the Sparkplug B edge nodes'
    /// changes (`nodes`), and the newest receipt unless [`Self::without_data_age`].
    fn records(&self, nodes: bool) -> Records {
        Records {
            nodes,
            newest: self.newest,
        }
    }

    /// This writer's statements prepared again without the record of the newest receipt for
    /// data age ([`Records::newest`]): for `leasehold replay`, whose transactions span several
    /// statements.
    pub async fn without_data_age(mut self) -> Result<Self> {
        self.newest = false;
        let routes = self.routes.clone();
        self.use_routes(routes).await?;
        Ok(self)
    }

    /// Writes into `routes` from now on (`telemetry` first, as [`ResolvedRoute::telemetry`]
    /// describes it, then the named routes): builds and prepares their statement (the columns'
    /// default expressions, which fill a NULL, are read here).
    pub async fn use_routes(&mut self, routes: Arc<[ResolvedRoute]>) -> Result<()> {
        let records = self.records(false);
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
            let both = prepare_both(client, &routes, &defaults, records).await?;
            Ok((both, defaults))
        })
        .await?;
        ((self.stmt, self.optimistic), self.defaults) = stmt;
        self.with_nodes = None;
        self.routes = routes;
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

    /// The Sparkplug B edge nodes recorded ([`crate::sparkplug::load`]), on this connection.
    pub async fn sparkplug_nodes(&self) -> Result<Vec<(NodeKey, Node)>> {
        crate::sparkplug::load(&self.client).await
    }

    /// Records what a batch changed of Sparkplug B edge nodes, under `fence`.
    pub async fn record_sparkplug(&self, fence: &Fence, nodes: &[NodeChange]) -> Result<()> {
        crate::sparkplug::record(&self.client, fence, nodes).await
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

    /// [`BatchWriter::write`], first by the optimistic statement ([`optimistic_sql`]) when no
    /// message of `rows` or `dead` is a redelivery: the rows of a batch's first round, whose
    /// keys are unique among themselves. A key already stored, or a row the table did not
    /// take, fails that statement whole; the full one runs then, and for the next
    /// [`FULL_AFTER_FALLBACK`] writes.
    pub async fn write_optimistic(
        &mut self,
        fence: &Fence,
        rows: &[RouteRow],
        dead: &[DeadLetter],
    ) -> Result<BatchOutcome> {
        self.attempt(fence, rows, dead, None).await
    }

    /// [`BatchWriter::write_optimistic`] (`optimistic`) or [`BatchWriter::write`], and `nodes`,
    /// what the batch changed of Sparkplug B edge nodes, in the same statement: a leader that
    /// dies after the commit leaves the next one the sequence numbers and births its rows were
    /// read with, and the lease row is share-locked for one statement, as for any batch. A
    /// row error is the rows' or the record's: the rows alone tell which; when they commit
    /// alone, the record's error is returned beside their outcome.
    pub async fn write_with_nodes(
        &mut self,
        fence: &Fence,
        rows: &[RouteRow],
        dead: &[DeadLetter],
        optimistic: bool,
        nodes: &[NodeChange],
    ) -> Result<(BatchOutcome, Option<StoreError>)> {
        let arrays = match nodes.is_empty() {
            true => None,
            false => Some(NodeArrays::new(nodes)?),
        };
        if arrays.is_some() && self.with_nodes.is_none() {
            let both = op::measured(Op::Session, async {
                prepare_both(
                    &self.client,
                    &self.routes,
                    &self.defaults,
                    self.records(true),
                )
                .await
            })
            .await?;
            self.with_nodes = Some(both);
        }
        let written = self
            .write_as(fence, rows, dead, optimistic, arrays.as_ref())
            .await;
        match written {
            Err(e) if e.is_row_error() && arrays.is_some() => {
                let out = self.write_as(fence, rows, dead, optimistic, None).await?;
                Ok((out, Some(e)))
            }
            other => Ok((other?, None)),
        }
    }

    /// The optimistic statement first ([`BatchWriter::attempt`]), or the full one alone.
    async fn write_as(
        &mut self,
        fence: &Fence,
        rows: &[RouteRow],
        dead: &[DeadLetter],
        optimistic: bool,
        nodes: Option<&NodeArrays<'_>>,
    ) -> Result<BatchOutcome> {
        match optimistic {
            true => self.attempt(fence, rows, dead, nodes).await,
            false => self.full(fence, rows, dead, nodes).await,
        }
    }

    /// The optimistic statement, then the full one if it failed as it may.
    async fn attempt(
        &mut self,
        fence: &Fence,
        rows: &[RouteRow],
        dead: &[DeadLetter],
        nodes: Option<&NodeArrays<'_>>,
    ) -> Result<BatchOutcome> {
        let redelivery = rows.iter().any(|r| r.message.dup) || dead.iter().any(|d| d.dup);
        if redelivery || self.full_for > 0 {
            self.full_for = self.full_for.saturating_sub(1);
            return self.full(fence, rows, dead, nodes).await;
        }
        let optimistic = match (nodes, &self.with_nodes) {
            (Some(_), Some((_, o))) => o.clone(),
            _ => self.optimistic.clone(),
        };
        match self
            .run(Op::WriteOptimistic, &optimistic, fence, rows, dead, nodes)
            .await
        {
            Err(StoreError::Db(e))
                if e.code().is_some_and(|c| {
                    *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                        || c.code() == NOT_ALL_STORED
                }) =>
            {
                self.full_for = FULL_AFTER_FALLBACK;
                self.full(fence, rows, dead, nodes).await
            }
            other => other,
        }
    }

    /// The full statement (with `nodes`' record, if any).
    async fn full(
        &self,
        fence: &Fence,
        rows: &[RouteRow],
        dead: &[DeadLetter],
        nodes: Option<&NodeArrays<'_>>,
    ) -> Result<BatchOutcome> {
        let stmt = match (nodes, &self.with_nodes) {
            (Some(_), Some((f, _))) => f.clone(),
            _ => self.stmt.clone(),
        };
        self.run(Op::WriteBatch, &stmt, fence, rows, dead, nodes)
            .await
    }

    /// Commits `rows` (each key at most once per route) and `dead` if the fence holds;
    /// [`StoreError::Fenced`] (nothing written) otherwise.
    ///
    /// The first write of a transaction opened by [`BatchWriter::begin`] takes the lease row until
    /// the transaction ends; the transaction's statements and its waits for this client are
    /// bounded from then on. Both bounds are pipelined with the write. The statements' is sent
    /// before it (a statement's time starts once it has arrived), the waits' right behind it: set
    /// before, the time to send a large statement would count as waiting; set after its answer,
    /// a client stopped in between would hold the row unbounded. A later write of the same
    /// transaction (a chunk's later round: its readings whose key came twice) gets what is left
    /// of the hold limit, so many rounds together hold the row no longer than one may;
    /// [`StoreError::Timeout`] when nothing is left.
    pub async fn write(
        &mut self,
        fence: &Fence,
        rows: &[RouteRow],
        dead: &[DeadLetter],
    ) -> Result<BatchOutcome> {
        let Some(limit) = self.hold_limit else {
            return self.full(fence, rows, dead, None).await;
        };
        let first = self.held_since.is_none();
        self.held_since.get_or_insert_with(Instant::now);
        let before = self.hold_left_sql()?;
        // Set once: the wait for this client is bounded from the first write on.
        let after = first.then(|| idle_limit_sql(limit));
        // `biased`: polled in this order, each queues its request before its first await (the
        // write is prepared: SQL text would queue a Parse first, and the bound behind it would
        // overtake it). Not through `op`: their time would be the write's, and they fail
        // whenever the write does.
        let (before, out, after) = tokio::join!(
            biased;
            self.batch_if(before.as_deref()),
            self.full(fence, rows, dead, None),
            self.batch_if(after.as_deref()),
        );
        // The write's error before the bound's behind it: after a refused row that bound fails
        // too (the transaction is aborted), and the caller tells a refused row by the write's
        // error. The bound before it fails only if the write then fails for its sake.
        before.map_err(StoreError::Db)?;
        let out = out?;
        after.map_err(StoreError::Db)?;
        Ok(out)
    }

    /// `sql`, if any, queued at the first poll (so that in a `biased` join it goes out before
    /// what is polled after it).
    pub(crate) async fn batch_if(
        &self,
        sql: Option<&str>,
    ) -> std::result::Result<(), tokio_postgres::Error> {
        match sql {
            Some(sql) => self.client.batch_execute(sql).await,
            None => Ok(()),
        }
    }

    /// `SET LOCAL` of the statement and lock timeouts to what is left of the hold limit, in a
    /// transaction whose first write took the lease row (`None` otherwise);
    /// [`StoreError::Timeout`] when nothing is left.
    pub(crate) fn hold_left_sql(&self) -> Result<Option<String>> {
        let (Some(limit), Some(since)) = (self.hold_limit, self.held_since) else {
            return Ok(None);
        };
        let left = limit.saturating_sub(since.elapsed());
        if left < Duration::from_millis(1) {
            return Err(StoreError::Timeout(limit));
        }
        Ok(Some(format!(
            "{}; {}",
            local_limit_sql("statement_timeout", left),
            local_limit_sql("lock_timeout", left)
        )))
    }

    /// Runs `stmt` (the full or the optimistic statement) on the batch's parameters.
    async fn run(
        &self,
        op: Op,
        stmt: &Statement,
        fence: &Fence,
        rows: &[RouteRow],
        dead: &[DeadLetter],
        nodes: Option<&NodeArrays<'_>>,
    ) -> Result<BatchOutcome> {
        let messages = Messages::new(rows);
        let arrays = RouteArrays::new(&self.routes, rows, &messages)?;
        let messages = message_params(&messages);
        let dead = dead_params(dead);
        let window = PgInterval(self.redelivery_window);
        let span = self.redelivery_span * readings_per_redelivery(rows);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
            &fence.lease_name,
            &fence.holder_id,
            &fence.epoch,
            &self.written_by,
            &window,
            &span,
        ];
        params.extend(
            messages
                .iter()
                .chain(&dead)
                .map(|p| p.as_ref() as &(dyn ToSql + Sync)),
        );
        arrays.push(&mut params);
        if let Some(n) = nodes {
            n.push(&mut params);
        }
        let n_routes = self.routes.len();
        let outcome = op::one(&self.client, op, stmt, &params, |r| {
            BatchOutcome::read(r, n_routes)
        })
        .await?;
        // The statement ran; the fence decides whether it wrote anything.
        outcome.ok_or(StoreError::Fenced { epoch: fence.epoch })
    }
}

/// A time sent as `timestamptz`'s binary form (microseconds since 2000-01-01 UTC), without
/// chrono's conversion through a duration for every value of a batch.
#[derive(Debug, Clone, Copy)]
struct PgTime(i64);

impl From<DateTime<Utc>> for PgTime {
    fn from(t: DateTime<Utc>) -> Self {
        PgTime(t.timestamp_micros().saturating_sub(946_684_800_000_000))
    }
}

impl ToSql for PgTime {
    fn to_sql(
        &self,
        _ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        bytes::BufMut::put_i64(out, self.0);
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::TIMESTAMPTZ
    }

    tokio_postgres::types::to_sql_checked!();
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

/// A statement parameter built for one write.
type Param<'a> = Box<dyn ToSql + Send + Sync + 'a>;

/// One array parameter: `f` of each of `items`.
fn array<'a, I: IntoIterator, U>(items: I, f: impl FnMut(I::Item) -> U) -> Param<'a>
where
    U: ToSql + Send + Sync + 'a,
{
    Box::new(items.into_iter().map(f).collect::<Vec<U>>())
}

/// A part's messages, once each, in the order of their first rows (`g` in the statement), and
/// where each row's message is among them.
struct Messages<'a> {
    first: Vec<&'a RouteRow>,
    /// Per row of the part, its message's place in `first`.
    at: Vec<usize>,
}

impl<'a> Messages<'a> {
    fn new(rows: &'a [RouteRow]) -> Self {
        let mut place = vec![usize::MAX; rows.iter().map(|r| r.idx + 1).max().unwrap_or(0)];
        let mut first = Vec::new();
        let at = rows
            .iter()
            .map(|r| {
                if place[r.idx] == usize::MAX {
                    place[r.idx] = first.len();
                    first.push(r);
                }
                place[r.idx]
            })
            .collect();
        Messages { first, at }
    }
}

/// The messages' arrays (`g` in the statement: `$7..$13`).
fn message_params<'a>(m: &Messages<'a>) -> [Param<'a>; 7] {
    let each = || m.first.iter().copied();
    [
        array(each(), |r| r.idx as i32),
        array(each(), |r| storable_text(&r.message.topic)),
        // A routed message was decoded from JSON: UTF-8, without NUL.
        array(each(), |r| match std::str::from_utf8(&r.message.payload) {
            Ok(text) => std::borrow::Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(&r.message.payload),
        }),
        array(each(), |r| PgTime::from(r.message.received_at)),
        array(each(), |r| r.message.content_hash.as_deref()),
        array(each(), |r| r.message.pkid),
        array(each(), |r| r.message.dup),
    ]
}

/// The dead letters' arrays (`dl` in the statement: `$14..$24`).
fn dead_params(dead: &[DeadLetter]) -> [Param<'_>; 11] {
    use leasehold_decode::content_hash;
    [
        array(dead, |x| x.idx as i32),
        array(dead, |x| storable_text(&x.topic)),
        array(dead, |x| &x.payload[..]),
        array(dead, |x| i32::try_from(x.size).unwrap_or(i32::MAX)),
        array(dead, |x| x.reason),
        array(dead, |x| storable_text(&x.error)),
        array(dead, |x| x.received_at),
        array(dead, |x| content_hash(&x.topic, &x.payload)),
        array(dead, |x| x.pkid),
        array(dead, |x| x.dup),
        array(dead, |x| x.route.as_deref()),
    ]
}

/// One column's values as sent: an array of the column's wire type.
#[derive(Debug)]
enum Array<'a> {
    Text(Vec<Option<std::borrow::Cow<'a, str>>>),
    Int(Vec<Option<i64>>),
    Bool(Vec<Option<bool>>),
    Time(Vec<Option<PgTime>>),
}

impl<'a> Array<'a> {
    fn new(wire: Wire, n: usize) -> Self {
        match wire {
            Wire::Text => Array::Text(Vec::with_capacity(n)),
            Wire::Int8 => Array::Int(Vec::with_capacity(n)),
            Wire::Bool => Array::Bool(Vec::with_capacity(n)),
            Wire::Time => Array::Time(Vec::with_capacity(n)),
        }
    }

    /// Appends `v`. The writer's conversion makes values of the array's shape; text (from a
    /// caller that did not convert) is read as the array's type where it parses.
    fn push(&mut self, v: &'a Value) {
        match (self, v) {
            (Array::Text(a), Value::Text(s)) => a.push(Some(std::borrow::Cow::Borrowed(s))),
            (Array::Text(a), Value::Null) => a.push(None),
            (Array::Text(a), other) => a.push(Some(std::borrow::Cow::Owned(text_of(other)))),
            (Array::Int(a), Value::Int(n)) => a.push(Some(*n)),
            (Array::Bool(a), Value::Bool(b)) => a.push(Some(*b)),
            (Array::Time(a), Value::Time(t)) => a.push(Some(PgTime::from(*t))),
            (Array::Int(a), Value::Text(s)) => a.push(s.trim().parse().ok()),
            (Array::Bool(a), Value::Text(s)) => a.push(s.trim().parse().ok()),
            (Array::Time(a), Value::Text(s)) => a.push(
                DateTime::parse_from_rfc3339(s.trim())
                    .ok()
                    .map(|t| PgTime::from(t.with_timezone(&Utc))),
            ),
            (Array::Int(a), _) => a.push(None),
            (Array::Bool(a), _) => a.push(None),
            (Array::Time(a), _) => a.push(None),
        }
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Text(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Time(t) => t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
    }
}

impl ToSql for Array<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        match self {
            Array::Text(a) => a.to_sql(ty, out),
            Array::Int(a) => a.to_sql(ty, out),
            Array::Bool(a) => a.to_sql(ty, out),
            Array::Time(a) => a.to_sql(ty, out),
        }
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <Vec<Option<String>> as ToSql>::accepts(ty)
            || <Vec<Option<i64>> as ToSql>::accepts(ty)
            || <Vec<Option<bool>> as ToSql>::accepts(ty)
            || <Vec<Option<PgTime>> as ToSql>::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

static NULL: Value = Value::Null;

/// Per route: its rows' positions, then one array per column sent; each aligned with the
/// messages' arrays (`g`), NULL where the route has no row of that message, so that the
/// optimistic statement reads a row and its message from one `unnest` without a join.
struct RouteArrays<'a> {
    routes: Vec<(Vec<Option<i32>>, Vec<Array<'a>>)>,
}

impl<'a> RouteArrays<'a> {
    /// [`StoreError::Refused`] if a route has two rows of one message, which the writer's
    /// batching never makes (one row per route and reading): one would not be written.
    fn new(routes: &[ResolvedRoute], rows: &'a [RouteRow], m: &Messages<'a>) -> Result<Self> {
        let n = m.first.len();
        let mut slots: Vec<Vec<Option<&'a RouteRow>>> = vec![vec![None; n]; routes.len()];
        for (r, &at) in rows.iter().zip(&m.at) {
            let Some(route) = slots.get_mut(r.route) else {
                continue;
            };
            if route[at].replace(r).is_some() {
                let name = routes.get(r.route).map_or("?", |x| x.spec.name.as_str());
                return Err(StoreError::Refused(format!(
                    "internal: route {name} has two rows of message {} in one statement",
                    r.idx
                )));
            }
        }
        let routes = routes
            .iter()
            .zip(slots)
            .map(|(route, slots)| {
                let idx = slots.iter().map(|s| s.map(|r| r.idx as i32)).collect();
                let arrays = sent_columns(route)
                    .map(|(j, w)| {
                        let mut a = Array::new(w, n);
                        for s in &slots {
                            a.push(s.and_then(|r| r.values.get(j)).unwrap_or(&NULL));
                        }
                        a
                    })
                    .collect();
                (idx, arrays)
            })
            .collect();
        Ok(RouteArrays { routes })
    }

    fn push(&'a self, params: &mut Vec<&'a (dyn ToSql + Sync)>) {
        for (idx, arrays) in &self.routes {
            params.push(idx);
            for a in arrays {
                params.push(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(idx: usize, route: usize, device: &str) -> RouteRow {
        RouteRow {
            route,
            ..RouteRow::reading(idx, device, "t", Utc::now(), "{}")
        }
    }

    fn text(a: &Array<'_>) -> Vec<Option<String>> {
        match a {
            Array::Text(v) => v.iter().map(|s| s.as_deref().map(str::to_owned)).collect(),
            other => panic!("not text: {other:?}"),
        }
    }

    /// A route's arrays line up with the messages' (`g`), in the order of each message's first
    /// row, whatever order the routes' rows come in; NULL where a route has no row.
    #[test]
    fn route_arrays_are_aligned_with_the_messages() {
        let routes = [ResolvedRoute::telemetry(), ResolvedRoute::telemetry()];
        let rows = [
            row(5, 1, "a"),
            row(3, 0, "b"),
            row(5, 0, "c"),
            row(7, 0, "d"),
        ];
        let m = Messages::new(&rows);
        let idx: Vec<usize> = m.first.iter().map(|r| r.idx).collect();
        assert_eq!(idx, [5, 3, 7]);
        assert_eq!(m.at, [0, 1, 0, 2]);
        let arrays = RouteArrays::new(&routes, &rows, &m).expect("one row per route and message");
        let (pos0, cols0) = &arrays.routes[0];
        let (pos1, cols1) = &arrays.routes[1];
        assert_eq!(pos0, &[Some(5), Some(3), Some(7)]);
        assert_eq!(pos1, &[Some(5), None, None]);
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(text(&cols0[0]), [some("c"), some("b"), some("d")]);
        assert_eq!(text(&cols1[0]), [some("a"), None, None]);
    }

    /// Two rows of one route and message would leave one unwritten: refused, never dropped.
    #[test]
    fn two_rows_of_one_route_and_message_are_refused() {
        let routes = [ResolvedRoute::telemetry()];
        let rows = [row(1, 0, "a"), row(1, 0, "b")];
        let m = Messages::new(&rows);
        assert!(matches!(
            RouteArrays::new(&routes, &rows, &m),
            Err(StoreError::Refused(_))
        ));
    }
}
