//! `telemetry` in time partitions (`docs/partitions.md`): one partition per UTC day of the
//! reading's `ts`, made ahead of time by the leader; a default partition for readings no
//! partition takes yet (far in the future, or older than every partition); retention that drops
//! whole partitions. Every step that changes `telemetry` is a short transaction that first locks
//! the lease row as the batch statement does ([`crate::queries::FENCE_CTE`]): a deposed leader
//! changes nothing.
//!
//! An installation whose `telemetry` is a plain table moves online ([`round`] resumes wherever
//! the last one stopped):
//!
//! 1. **swap** (one short transaction): the table is renamed (`telemetry_before_<cutover>`) and a
//!    partitioned `telemetry` takes its name, with a partition from the cutover (the database's
//!    `now()`) to the next midnight and a default partition. Writers resolve the name at their
//!    next statement; nobody writes the old table again.
//! 2. **future rows out**: the old table's readings at or after the cutover (device clocks ahead)
//!    are moved into `telemetry`, found by a scan that locks nothing and moved by key.
//! 3. **validate** `CHECK (ts < cutover)` on the old table, with a lock that blocks no one.
//! 4. **attach** it as the partition `[MINVALUE, cutover)`: readings stored since the swap with
//!    `ts` before the cutover (late readings, in the default partition) move into it first, where
//!    a reading already stored under their key wins, as the batch statement's rules say (the same
//!    content is a duplicate, a different one a `conflict` dead letter). No row is scanned under a
//!    lock that stops the writer.

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveTime, TimeDelta, Utc};
use tokio_postgres::{Client, GenericClient, Transaction};

use crate::batch::Fence;
use crate::op::{self, Op};
use crate::{Result, StoreError};

/// The partitioned table.
pub const PARENT: &str = "telemetry";
/// Readings no other partition takes.
pub const DEFAULT_PARTITION: &str = "telemetry_default";
/// Days ahead of today that have a partition after every round.
pub const AHEAD_DAYS: i64 = 3;
/// Partitions a round creates for readings in the default partition, at most.
const FROM_DEFAULT_PER_ROUND: i64 = 32;
/// Rows moved or deleted per statement when a step works through many.
const ROWS_PER_STEP: i64 = 10_000;
/// A step that cannot get its locks this quickly waits for the next round (the writer's
/// statements queue behind a waiting DDL lock).
const LOCK_TIMEOUT: &str = "2s";

/// One partition of `telemetry`: `[from, to)`, `None` for MINVALUE / MAXVALUE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub is_default: bool,
}

impl Partition {
    fn overlaps(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
        !self.is_default && self.from.is_none_or(|f| f < to) && self.to.is_none_or(|t| t > from)
    }
}

/// A partition retention dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    pub partition: Partition,
    /// Its size on disk, indexes included.
    pub bytes: i64,
    /// The planner's estimate of its rows (`pg_class.reltuples`), 0 when never analysed.
    pub rows_estimate: i64,
}

/// The move of a plain `telemetry` under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub legacy: String,
    pub cutover: DateTime<Utc>,
}

/// A step of the move a round completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Swapped,
    /// Readings at or after the cutover moved out of the old table.
    FutureMoved(u64),
    Validated,
    /// The old table is a partition; readings stored meanwhile with a `ts` before the cutover
    /// moved into it (`moved`), of which `conflicts` were dead-lettered.
    Attached {
        moved: u64,
        conflicts: u64,
    },
    /// The old table was empty (a new installation): dropped, not attached.
    DroppedEmpty,
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Round {
    /// Partitions created, each with the rows moved into it from the default partition.
    pub created: Vec<(Partition, u64)>,
    pub dropped: Vec<Dropped>,
    /// Rows of the default partition older than the retention, deleted.
    pub expired_in_default: u64,
    /// Partitions after the round, the default one included.
    pub partitions: usize,
}

/// The start of `t`'s UTC day.
pub fn day_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.date_naive().and_time(NaiveTime::MIN).and_utc()
}

/// `telemetry_p20261206` for a partition starting at midnight, `telemetry_p20261206_084425`
/// otherwise.
pub fn partition_name(from: DateTime<Utc>) -> String {
    let stamp = match from == day_of(from) {
        true => "%Y%m%d",
        false => "%Y%m%d_%H%M%S",
    };
    format!("telemetry_p{}", from.format(stamp))
}

/// An SQL literal of `t` (bounds and constraints take no parameters).
fn lit(t: DateTime<Utc>) -> String {
    format!("'{}'", t.format("%Y-%m-%d %H:%M:%S%.6f+00"))
}

/// The free range around `[from, to)` once `taken` are excluded, when rows in it would land
/// there: starts after partitions that begin before it, ends before those that begin in it.
pub fn gap(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    taken: &[Partition],
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let (mut lo, mut hi) = (from, to);
    for p in taken.iter().filter(|p| p.overlaps(from, to)) {
        match (p.from, p.to) {
            (Some(f), _) if f > lo => hi = hi.min(f),
            (_, Some(t)) => lo = lo.max(t),
            (_, None) => return None,
        }
    }
    (lo < hi).then_some((lo, hi))
}

/// `"r"` for a plain table, `"p"` for a partitioned one, `None` when there is no `telemetry`.
async fn kind(c: &impl GenericClient) -> Result<Option<String>> {
    op::one(
        c,
        Op::Partitions,
        "SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass('telemetry')) AS kind",
        &[],
        |r| r.try_get("kind"),
    )
    .await
}

/// The partitions of `telemetry`, oldest first (none while it is a plain table).
pub async fn partitions(c: &impl GenericClient) -> Result<Vec<Partition>> {
    if kind(c).await?.as_deref() != Some("p") {
        return Ok(Vec::new());
    }
    // The name as PostgreSQL writes a regclass: quoted and schema-qualified where needed, so an
    // operator's own partition is named exactly in DDL. A bound holds constants only: deparsed
    // without its relation (relid 0), which would open and lock every partition — and wait
    // behind an operator's DROP of one in an open transaction: such a partition is listed, and
    // the step that then finds it gone fails and is tried again at the next round.
    op::all(
        c,
        Op::Partitions,
        r#"SELECT c.oid::regclass::text AS name, p.b = 'DEFAULT' AS is_default,
                  substring(p.b from $re$FROM \('([^']*)'\)$re$)::timestamptz AS lo,
                  substring(p.b from $re$TO \('([^']*)'\)$re$)::timestamptz AS hi
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid,
                LATERAL (SELECT pg_get_expr(c.relpartbound, 0) AS b) p
           WHERE i.inhparent = 'telemetry'::regclass AND p.b IS NOT NULL
           ORDER BY lo NULLS FIRST"#,
        &[],
        |r| from_row!(r => Partition { name, from: "lo", to: "hi", is_default }),
    )
    .await
}

/// The earliest `ts` a question about the last `window` needs to read: the start of the UTC day
/// holding `now - window`, so the partitions before it are pruned and every entry of the others
/// passes the bound; and not before the cutover of a move while its old table is a partition (it
/// holds only readings timestamped before the move, and reading its index with a bound inside it
/// would walk a device's whole history). Two short catalog reads, whatever the partitions.
pub async fn recent_floor(c: &impl GenericClient, window: Duration) -> Result<DateTime<Utc>> {
    let earliest = DateTime::<Utc>::from_timestamp(-62_135_596_800, 0).unwrap_or_default();
    if kind(c).await?.as_deref() != Some("p") {
        return Ok(earliest);
    }
    let since = Utc::now() - TimeDelta::from_std(window).unwrap_or(TimeDelta::MAX);
    let cutover = op::one(
        c,
        Op::Partitions,
        r"SELECT max(c.relname)::text AS legacy FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'telemetry'::regclass AND c.relname LIKE 'telemetry\_before\_%'",
        &[],
        |r| r.try_get::<_, Option<String>>("legacy"),
    )
    .await?
    .and_then(|name| cutover_of(&name));
    Ok(cutover.map_or(day_of(since), |c| c.max(day_of(since))))
}

/// The cutover a `telemetry_before_YYYYMMDD_HHMMSS` table is named for.
pub fn cutover_of(name: &str) -> Option<DateTime<Utc>> {
    let stamp = name.strip_prefix("telemetry_before_")?;
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%d_%H%M%S")
        .ok()
        .map(|t| t.and_utc())
}

/// The move under way, if any.
pub async fn pending_of(c: &impl GenericClient) -> Result<Option<Pending>> {
    op::opt(
        c,
        Op::Partitions,
        "SELECT legacy, cutover FROM telemetry_partitioning ORDER BY cutover LIMIT 1",
        &[],
        |r| from_row!(r => Pending { legacy, cutover }),
    )
    .await
}

/// The fence, and how long a fenced step may hold the lease row.
struct Fenced<'a> {
    fence: &'a Fence,
    timeout: Duration,
}

/// Locks `telemetry` whole: the moment a partition is created, attached or detached.
const LOCK_ALL: &str = "LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE";

/// A transaction that holds the lease row `FOR SHARE` (the fence), with short lock waits.
/// `locks` (SQL) are taken first: the lease row is held only for the work, never across a wait
/// for the writer's statements, so the leader's renewals are not held up by one; and a client
/// that stops inside it (a leader paused) loses its session, not the cluster its lease row.
async fn fenced<'a>(c: &'a mut Client, fence: &Fenced<'_>, locks: &str) -> Result<Transaction<'a>> {
    let tx = c.transaction().await?;
    tx.batch_execute(&format!(
        "{}; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; {locks}; {}",
        crate::batch::idle_limit_sql(fence.timeout),
        crate::batch::local_limit_sql("statement_timeout", fence.timeout)
    ))
    .await?;
    let fence = fence.fence;
    let held = op::opt(
        &tx,
        Op::Partitions,
        "SELECT 1 AS one FROM instance_lock
         WHERE service_name = $1 AND holder_id = $2 AND epoch = $3 AND expires_at > clock_timestamp()
         FOR SHARE",
        &[&fence.lease_name, &fence.holder_id, &fence.epoch],
        |r| r.try_get::<_, i32>("one"),
    )
    .await?;
    held.map(|_| tx)
        .ok_or(StoreError::Fenced { epoch: fence.epoch })
}

async fn run(c: &impl GenericClient, sql: &str) -> Result<()> {
    op::batch(c, Op::Partitions, sql).await
}

/// The columns of `table`, quoted, in order: what a move copies (an operator's own columns too;
/// generated ones are computed again where the rows land).
async fn columns(c: &impl GenericClient, table: &str) -> Result<String> {
    op::one(
        c,
        Op::Partitions,
        "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) AS cols
         FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped
           AND attgenerated = ''",
        &[&table],
        |r| r.try_get("cols"),
    )
    .await
}

async fn db_now(c: &impl GenericClient) -> Result<DateTime<Utc>> {
    op::one(c, Op::Partitions, "SELECT now() AS now", &[], |r| {
        r.try_get("now")
    })
    .await
}

/// Dead letters for readings `later` (an SQL relation of `telemetry` rows) that a different
/// reading already stored under their key (`first`, joined on the key) keeps out.
fn conflicts_sql(later: &str, first: &str) -> String {
    format!(
        "INSERT INTO dead_letters (topic, payload, size, reason, error, received_at, written_by,
                                   lease_epoch, content_hash, mqtt_pkid, possible_duplicate)
         SELECT l.topic, convert_to(l.payload::text, 'UTF8'), octet_length(l.payload::text),
                'conflict',
                format('conflict: a different row is stored in telemetry for key (device_id, topic, ts) = (%s, %s, %s); this one was not stored (found when telemetry moved to time partitions)',
                       l.device_id, l.topic, l.ts),
                l.received_at, l.written_by, l.lease_epoch,
                coalesce(l.content_hash, encode(substr(sha256(convert_to(l.topic, 'UTF8') || '\\x00'::bytea
                         || convert_to(l.payload::text, 'UTF8')), 1, 16), 'hex')),
                l.mqtt_pkid,
                l.possible_duplicate
         FROM {later} l JOIN {first} f USING (device_id, topic, ts)
         WHERE f.payload IS DISTINCT FROM l.payload"
    )
}

/// Step 1: the partitioned table takes the name. Returns the move now under way.
async fn swap(c: &mut Client, fence: &Fenced<'_>) -> Result<Pending> {
    let tx = fenced(c, fence, LOCK_ALL).await?;
    // PostgreSQL 15 has no identity columns on a partitioned table: an operator's own would
    // leave every reading without its value. Refused, by name, before anything changes.
    let identity: Option<String> = op::one(
        &tx,
        Op::Partitions,
        "SELECT string_agg(attname, ', ') AS cols FROM pg_attribute
         WHERE attrelid = 'telemetry'::regclass AND attidentity <> '' AND NOT attisdropped",
        &[],
        |r| r.try_get("cols"),
    )
    .await?;
    if let Some(cols) = identity {
        return Err(StoreError::Refused(format!(
            "telemetry cannot move to time partitions: identity column(s) {cols} (PostgreSQL 15 \
             has none on a partitioned table); make them plain columns with a sequence default \
             (ALTER TABLE telemetry ALTER COLUMN ... DROP IDENTITY)"
        )));
    }
    let now = db_now(&tx).await?;
    // Whole seconds, up: the cutover is after every reading received before the swap.
    let cutover = DateTime::<Utc>::from_timestamp(now.timestamp() + 1, 0).unwrap_or(now);
    let legacy = format!("telemetry_before_{}", cutover.format("%Y%m%d_%H%M%S"));
    let midnight = day_of(cutover) + TimeDelta::days(1);
    run(
        &tx,
        &format!(
            "ALTER TABLE telemetry RENAME TO {legacy};
             ALTER TABLE {legacy} RENAME CONSTRAINT telemetry_pkey TO {legacy}_pkey;
             ALTER INDEX IF EXISTS telemetry_received_at_idx RENAME TO {legacy}_received_at_idx;
             CREATE TABLE telemetry (LIKE {legacy} INCLUDING DEFAULTS INCLUDING CONSTRAINTS
                                     INCLUDING GENERATED INCLUDING STORAGE INCLUDING COMMENTS)
                 PARTITION BY RANGE (ts);
             ALTER TABLE telemetry ADD CONSTRAINT telemetry_pkey PRIMARY KEY (device_id, topic, ts);
             CREATE INDEX telemetry_received_at_idx ON telemetry (received_at);
             CREATE TABLE {DEFAULT_PARTITION} PARTITION OF telemetry DEFAULT;
             CREATE TABLE {first} PARTITION OF telemetry FOR VALUES FROM ({from}) TO ({to});",
            first = partition_name(cutover),
            from = lit(cutover),
            to = lit(midnight),
        ),
    )
    .await?;
    // Statements that carry the old table's sequences and grants over, each read by its column.
    let carried = [
        // A sequence an operator's `serial` column owns follows the column to the new table: the
        // old one (dropped by retention, or empty) must not take it along.
        ("q", "SELECT format('ALTER SEQUENCE %s OWNED BY telemetry.%I', d.objid::regclass, a.attname) AS q
         FROM pg_depend d JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
              JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
         WHERE d.classid = 'pg_class'::regclass AND d.refobjid = to_regclass($1)
           AND d.deptype = 'a' AND d.refobjsubid > 0"),
        // Whoever could read or write the old table can the new one.
        ("g", "SELECT format('GRANT %s ON telemetry TO %s', a.privilege_type,
                       CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                            ELSE quote_ident(pg_get_userbyid(a.grantee)) END) AS g
         FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = to_regclass($1) AND a.grantee <> c.relowner"),
    ];
    for (column, sql) in carried {
        let statements = op::all(&tx, Op::Partitions, sql, &[&legacy], |r| {
            r.try_get::<_, String>(column)
        })
        .await?;
        for q in statements {
            run(&tx, &q).await?;
        }
    }
    op::exec(
        &tx,
        Op::Partitions,
        "INSERT INTO telemetry_partitioning (legacy, cutover) VALUES ($1, $2)",
        &[&legacy, &cutover],
    )
    .await?;
    tx.commit().await?;
    Ok(Pending { legacy, cutover })
}

/// Step 2: up to [`ROWS_PER_STEP`] readings of the old table at or after the cutover move into
/// `telemetry`; the old table's copy of a key wins (it was stored first). Returns the rows moved.
async fn move_future(c: &mut Client, fence: &Fenced<'_>, p: &Pending) -> Result<u64> {
    let legacy = &p.legacy;
    // A scan that locks nothing the writer needs: nobody writes the old table any more.
    let keys = op::all(
        &*c,
        Op::Partitions,
        &format!("SELECT device_id, topic, ts FROM {legacy} WHERE ts >= $1 LIMIT $2"),
        &[&p.cutover, &ROWS_PER_STEP],
        |r| {
            Ok((
                r.try_get::<_, String>("device_id")?,
                r.try_get::<_, String>("topic")?,
                r.try_get::<_, DateTime<Utc>>("ts")?,
            ))
        },
    )
    .await?;
    if keys.is_empty() {
        return Ok(0);
    }
    let devices: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let topics: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let times: Vec<DateTime<Utc>> = keys.iter().map(|k| k.2).collect();
    let cols = columns(&*c, legacy).await?;
    let tx = fenced(c, fence, "").await?;
    let k = "(SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS k(device_id, topic, ts))";
    // Copies stored since the swap under the same key: the old table's reading came first.
    op::exec(
        &tx,
        Op::Partitions,
        &format!(
            "WITH later AS (DELETE FROM telemetry t USING {k} k
                            WHERE t.device_id = k.device_id AND t.topic = k.topic AND t.ts = k.ts
                            RETURNING t.*)
             {}",
            conflicts_sql("later", legacy)
        ),
        &[&devices, &topics, &times],
    )
    .await?;
    let moved = op::exec(
        &tx,
        Op::Partitions,
        &format!(
            "WITH moved AS (DELETE FROM {legacy} o USING {k} k
                            WHERE o.device_id = k.device_id AND o.topic = k.topic AND o.ts = k.ts
                            RETURNING o.*)
             INSERT INTO telemetry ({cols}) SELECT {cols} FROM moved"
        ),
        &[&devices, &topics, &times],
    )
    .await?;
    tx.commit().await?;
    Ok(moved)
}

/// Step 3: the old table proves it holds nothing at or after the cutover. `false` when a reading
/// there is left to move.
async fn validate(c: &Client, p: &Pending) -> Result<bool> {
    let legacy = &p.legacy;
    // A round that validated it and then could not attach (a lock held elsewhere) left it valid:
    // the whole table is not read again.
    let valid: Option<bool> = op::opt(
        c,
        Op::Partitions,
        "SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass($1) AND conname = $2",
        &[legacy, &format!("{legacy}_range")],
        |r| r.try_get("convalidated"),
    )
    .await?;
    match valid {
        Some(true) => return Ok(true),
        Some(false) => {}
        None => {
            let cutover = lit(p.cutover);
            run(c, &format!(
                "ALTER TABLE {legacy} ADD CONSTRAINT {legacy}_range CHECK (ts < {cutover}) NOT VALID"
            ))
            .await?;
        }
    }
    c.batch_execute("SET statement_timeout = 0").await?;
    // What the attach would otherwise do under its lock, done here where nothing waits: the
    // old table's own NOT VALID constraints validated (the copies on the new table are valid)
    // and the index on received_at built if the old table had none.
    let unvalidated = op::all(
        c,
        Op::Partitions,
        "SELECT quote_ident(conname) AS n FROM pg_constraint
         WHERE conrelid = to_regclass($1) AND contype = 'c' AND NOT convalidated AND conname <> $2",
        &[legacy, &format!("{legacy}_range")],
        |r| r.try_get::<_, String>("n"),
    )
    .await?;
    for n in unvalidated {
        c.batch_execute(&format!("ALTER TABLE {legacy} VALIDATE CONSTRAINT {n}"))
            .await?;
    }
    c.batch_execute(&format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {legacy}_received_at_idx ON {legacy} (received_at)"
    ))
    .await?;
    // SHARE UPDATE EXCLUSIVE: reads of the old table go on while it is scanned.
    let res = run(
        c,
        &format!("ALTER TABLE {legacy} VALIDATE CONSTRAINT {legacy}_range"),
    )
    .await;
    c.batch_execute("RESET statement_timeout").await?;
    match res {
        Ok(()) => Ok(true),
        Err(StoreError::Db(e))
            if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Step 4: readings stored since the swap with a `ts` before the cutover join the old table,
/// which becomes the partition before the cutover.
async fn attach(c: &mut Client, fence: &Fenced<'_>, p: &Pending) -> Result<Step> {
    let legacy = &p.legacy;
    let cols = columns(&*c, PARENT).await?;
    // The whole table, for the instant of the move: a query planned before the attach would
    // not see the rows it moves out of the default partition.
    let mut tx = fenced(c, fence, LOCK_ALL).await?;
    let empty: bool = op::one(
        &tx,
        Op::Partitions,
        &format!("SELECT NOT EXISTS (SELECT 1 FROM {legacy}) AS empty"),
        &[],
        |r| r.try_get("empty"),
    )
    .await?;
    // A new installation: no partition before the cutover; earlier readings get their own
    // days, like any reading waiting in the default partition. Unless an operator's object
    // depends on the empty table (a view made before the first round): then it is attached like
    // a full one, rather than the move failing at every round.
    let dropped = empty
        && {
            let sp = tx.savepoint("drop_empty").await?;
            match run(&sp, &format!("DROP TABLE {legacy}")).await {
                Ok(()) => {
                    sp.commit().await?;
                    true
                }
                Err(StoreError::Db(e))
                    if e.code()
                        == Some(
                            &tokio_postgres::error::SqlState::DEPENDENT_OBJECTS_STILL_EXIST,
                        ) =>
                {
                    sp.rollback().await?;
                    tracing::warn!(
                        table = %legacy,
                        error = %crate::database_words(&e),
                        "objects depend on the empty telemetry the move replaced: it stays, as the partition before the cutover; re-create them on telemetry"
                    );
                    false
                }
                Err(e) => return Err(e),
            }
        };
    let step = if dropped {
        Step::DroppedEmpty
    } else {
        let (moved, conflicts) = op::one(
            &tx,
            Op::Partitions,
            &format!(
                "WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE ts < $1 RETURNING *),
                      kept AS (INSERT INTO {legacy} ({cols}) SELECT {cols} FROM moved
                               ON CONFLICT (device_id, topic, ts) DO NOTHING RETURNING 1),
                      dl AS ({} RETURNING 1)
                 SELECT (SELECT count(*) FROM moved) AS moved, (SELECT count(*) FROM dl) AS conflicts",
                conflicts_sql("moved", legacy)
            ),
            &[&p.cutover],
            |r| {
                Ok((
                    r.try_get::<_, i64>("moved")?,
                    r.try_get::<_, i64>("conflicts")?,
                ))
            },
        )
        .await?;
        run(
            &tx,
            &format!(
                "ALTER TABLE telemetry ATTACH PARTITION {legacy} FOR VALUES FROM (MINVALUE) TO ({})",
                lit(p.cutover)
            ),
        )
        .await?;
        Step::Attached {
            moved: moved.max(0) as u64,
            conflicts: conflicts.max(0) as u64,
        }
    };
    op::exec(
        &tx,
        Op::Partitions,
        "DELETE FROM telemetry_partitioning WHERE legacy = $1",
        &[&p.legacy],
    )
    .await?;
    tx.commit().await?;
    Ok(step)
}

/// Creates the partition `[from, to)`, moving into it the default partition's rows of that
/// range. Returns the rows moved. The whole table is locked for the instant it takes (the default
/// partition is small): a query planned before the attach would not see the moved rows, and
/// one planned after must not find them still in the default partition.
async fn create(
    c: &mut Client,
    fence: &Fenced<'_>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<(Partition, u64)> {
    let name = partition_name(from);
    let cols = columns(&*c, PARENT).await?;
    let tx = fenced(c, fence, LOCK_ALL).await?;
    run(
        &tx,
        &format!(
            "CREATE TABLE {name} (LIKE telemetry INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING STORAGE)"
        ),
    )
    .await?;
    let moved = op::exec(
        &tx,
        Op::Partitions,
        &format!(
            "WITH m AS (DELETE FROM {DEFAULT_PARTITION} WHERE ts >= $1 AND ts < $2 RETURNING *)
             INSERT INTO {name} ({cols}) SELECT {cols} FROM m"
        ),
        &[&from, &to],
    )
    .await?;
    run(
        &tx,
        &format!(
            "ALTER TABLE telemetry ATTACH PARTITION {name} FOR VALUES FROM ({}) TO ({})",
            lit(from),
            lit(to)
        ),
    )
    .await?;
    tx.commit().await?;
    Ok((
        Partition {
            name,
            from: Some(from),
            to: Some(to),
            is_default: false,
        },
        moved,
    ))
}

/// Detaches and drops `p` (every reading in it older than the retention).
async fn drop_partition(c: &mut Client, fence: &Fenced<'_>, p: &Partition) -> Result<Dropped> {
    let tx = fenced(c, fence, LOCK_ALL).await?;
    let (bytes, rows_estimate) = op::one(
        &tx,
        Op::Partitions,
        "SELECT pg_total_relation_size(c.oid) AS bytes, greatest(c.reltuples, 0)::int8 AS rows
         FROM pg_class c WHERE c.oid = to_regclass($1)",
        &[&p.name],
        |r| Ok((r.try_get::<_, i64>("bytes")?, r.try_get::<_, i64>("rows")?)),
    )
    .await?;
    run(
        &tx,
        &format!(
            "ALTER TABLE telemetry DETACH PARTITION {name}; DROP TABLE {name}",
            name = p.name
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(Dropped {
        partition: p.clone(),
        bytes,
        rows_estimate,
    })
}

/// The days of readings waiting in the default partition.
async fn default_days(c: &impl GenericClient) -> Result<Vec<DateTime<Utc>>> {
    op::all(
        c,
        Op::Partitions,
        &format!(
            "SELECT DISTINCT date_trunc('day', ts, 'UTC') AS day FROM {DEFAULT_PARTITION}
             ORDER BY 1 LIMIT $1"
        ),
        &[&FROM_DEFAULT_PER_ROUND],
        |r| r.try_get("day"),
    )
    .await
}

/// One round: the move of a plain `telemetry` as far as it goes, partitions through
/// [`AHEAD_DAYS`] from today (the database's clock), partitions for readings waiting in the
/// default one, and, with `keep`, partitions whose readings are all older than it dropped.
/// `on_step` hears each step of a move as it completes (a validation can take minutes). A step
/// that fails does not stop the others: the days ahead are made first, whatever else fails, so
/// readings of now never wait in the default partition; the failures come back together.
pub async fn round(
    c: &mut Client,
    fence: &Fence,
    keep: Option<Duration>,
    lease_ttl: Duration,
    on_step: &mut (dyn FnMut(Step) + Send),
) -> Result<Round> {
    // The lease row is held for each step's work, a few statements of at most a sixth of the
    // lease's life each, with waits for the client as short ([`Fence::step_limit`]).
    // A step that needs longer (a day of readings to move out of the default partition) fails
    // and is left for the next round; readings wait where they are, never lost.
    let fence = &Fenced {
        fence,
        timeout: Fence::step_limit(lease_ttl),
    };
    let mut done = Round::default();
    match kind(&*c).await?.as_deref() {
        None => return Ok(done),
        Some("p") => {}
        Some(_) => {
            swap(c, fence).await?;
            on_step(Step::Swapped);
        }
    }
    let now = db_now(&*c).await?;
    let today = day_of(now);
    // A retention too long to subtract keeps everything.
    let oldest_kept = keep
        .and_then(|k| TimeDelta::from_std(k).ok())
        .and_then(|k| now.checked_sub_signed(k));
    let mut failed: Vec<StoreError> = Vec::new();
    let ahead: Vec<DateTime<Utc>> = (0..=AHEAD_DAYS)
        .map(|d| today + TimeDelta::days(d))
        .collect();
    create_days(c, fence, &ahead, &mut done, &mut failed).await?;
    if let Some(p) = &pending_of(&*c).await? {
        if let Err(e) = advance(c, fence, p, on_step).await {
            failed.push(e);
        }
    }
    let mut waiting = Vec::new();
    for d in default_days(&*c).await? {
        let expired = oldest_kept.is_some_and(|o| d + TimeDelta::days(1) <= o);
        if !expired && d <= today + TimeDelta::days(AHEAD_DAYS) {
            waiting.push(d);
        }
    }
    create_days(c, fence, &waiting, &mut done, &mut failed).await?;
    if let Some(oldest) = oldest_kept {
        let unattached = pending_of(&*c).await?.map(|p| p.legacy);
        let expired = partitions(&*c)
            .await?
            .into_iter()
            .filter(|p| !p.is_default && Some(&p.name) != unattached.as_ref())
            .filter(|p| p.to.is_some_and(|t| t <= oldest));
        for p in expired {
            match drop_partition(c, fence, &p).await {
                Ok(d) => done.dropped.push(d),
                Err(e) => failed.push(e),
            }
        }
        match expire_default(c, fence, oldest).await {
            Ok(n) => done.expired_in_default = n,
            Err(e) => failed.push(e),
        }
    }
    // A count, not the listing: reading every partition's bound costs ~0.08 ms a partition.
    done.partitions = op::one(
        &*c,
        Op::Partitions,
        "SELECT count(*) AS n FROM pg_inherits WHERE inhparent = 'telemetry'::regclass",
        &[],
        |r| r.try_get::<_, i64>("n"),
    )
    .await?
    .max(0) as usize;
    // The first failure stands for the round; the next round tries every step again.
    failed.into_iter().next().map_or(Ok(done), Err)
}

/// The move's remaining steps, as far as they go.
async fn advance(
    c: &mut Client,
    fence: &Fenced<'_>,
    p: &Pending,
    on_step: &mut (dyn FnMut(Step) + Send),
) -> Result<()> {
    while let n @ 1.. = move_future(c, fence, p).await? {
        on_step(Step::FutureMoved(n));
    }
    if validate(c, p).await? {
        on_step(Step::Validated);
        on_step(attach(c, fence, p).await?);
    }
    Ok(())
}

/// Makes the partition of each of `days` that no partition (or a move's old table) covers yet.
/// A day that cannot be made (its readings in the default partition too many to move within
/// the statement's bound, a year PostgreSQL does not have) is left and reported; the others go on.
async fn create_days(
    c: &mut Client,
    fence: &Fenced<'_>,
    days: &[DateTime<Utc>],
    done: &mut Round,
    failed: &mut Vec<StoreError>,
) -> Result<()> {
    if days.is_empty() {
        return Ok(());
    }
    let mut taken = partitions(&*c).await?;
    taken.extend(pending_of(&*c).await?.map(|p| Partition {
        name: p.legacy,
        from: None,
        to: Some(p.cutover),
        is_default: false,
    }));
    for &d in days {
        // PostgreSQL's years are 1 BC .. 294276 AD, chrono's literal of year 0 is not one.
        if !(1..=9999).contains(&d.year()) {
            continue;
        }
        if let Some((from, to)) = gap(d, d + TimeDelta::days(1), &taken) {
            match create(c, fence, from, to).await {
                Ok((p, moved)) => {
                    taken.push(p.clone());
                    done.created.push((p, moved));
                }
                Err(e) => failed.push(e),
            }
        }
    }
    Ok(())
}

/// Deletes the default partition's readings older than `oldest`, [`ROWS_PER_STEP`] at a time.
async fn expire_default(c: &mut Client, fence: &Fenced<'_>, oldest: DateTime<Utc>) -> Result<u64> {
    let mut total = 0;
    loop {
        let tx = fenced(c, fence, "").await?;
        let n = op::exec(
            &tx,
            Op::Partitions,
            &format!(
                "DELETE FROM {DEFAULT_PARTITION} WHERE ctid = ANY(ARRAY(
                     SELECT ctid FROM {DEFAULT_PARTITION} WHERE ts < $1 LIMIT $2))"
            ),
            &[&oldest, &ROWS_PER_STEP],
        )
        .await?;
        tx.commit().await?;
        total += n;
        if n < ROWS_PER_STEP as u64 {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 6, h, 0, 0)
            .single()
            .expect("valid")
    }

    fn part(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Partition {
        Partition {
            name: "p".into(),
            from,
            to,
            is_default: false,
        }
    }

    #[test]
    fn names_say_the_day_and_the_time_when_not_midnight() {
        assert_eq!(partition_name(t(0)), "telemetry_p20261206");
        assert_eq!(
            partition_name(t(8) + TimeDelta::seconds(65)),
            "telemetry_p20261206_080105"
        );
        assert_eq!(day_of(t(23)), t(0));
    }

    #[test]
    fn a_gap_is_what_no_partition_takes() {
        let day = (t(0), t(0) + TimeDelta::days(1));
        assert_eq!(gap(day.0, day.1, &[]), Some(day));
        // The old table until 08:00 and the first partition from then: nothing left.
        let before = part(None, Some(t(8)));
        let rest = part(Some(t(8)), Some(day.1));
        assert_eq!(gap(day.0, day.1, &[before.clone(), rest.clone()]), None);
        assert_eq!(gap(day.0, day.1, &[before]), Some((t(8), day.1)));
        assert_eq!(gap(day.0, day.1, &[rest]), Some((day.0, t(8))));
        let default = Partition {
            is_default: true,
            ..part(None, None)
        };
        assert_eq!(gap(day.0, day.1, &[default]), Some(day));
        assert_eq!(
            gap(day.0, day.1, &[part(Some(t(3)), None)]),
            Some((day.0, t(3)))
        );
    }

    #[test]
    fn a_cutover_is_read_back_from_its_table_name() {
        let c = t(8) + TimeDelta::seconds(65);
        let name = format!("telemetry_before_{}", c.format("%Y%m%d_%H%M%S"));
        assert_eq!(cutover_of(&name), Some(c));
        assert_eq!(cutover_of("telemetry_p20261206"), None);
        assert_eq!(cutover_of("telemetry_before_x"), None);
    }

    #[test]
    fn literals_are_utc_with_microseconds() {
        assert_eq!(lit(t(8)), "'2026-12-06 08:00:00.000000+00'");
    }
}
