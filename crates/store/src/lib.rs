//! PostgreSQL access for Leasehold.
//!
//! # Layout
//! - [`connect`] / [`pool`]: the one place connections are made (timeouts, application name).
//! - [`migrate`]: applies `migrations/` under an advisory lock, so nodes starting together do not race.
//! - [`BatchWriter`]: one transaction per batch, fencing check first, set-based inserts.
//! - [`queries`]: small reads and writes for status, heartbeats and topics.

pub mod listener;
pub mod queries;
pub mod tls;

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Statement};

pub use deadpool_postgres::Pool;
/// A connection borrowed from the pool.
pub type PooledClient = deadpool_postgres::Object;
pub use tokio_postgres;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database did not answer within {0:?}")]
    Timeout(Duration),
    #[error("database pool: {0}")]
    Pool(String),
    #[error("invalid DATABASE_URL: {0}")]
    Url(String),
    #[error("fenced: the lease is no longer held by this node at epoch {epoch}")]
    Fenced { epoch: i64 },
    #[error("migration {version} failed: {source}")]
    Migration {
        version: i32,
        source: tokio_postgres::Error,
    },
}

impl StoreError {
    /// The short label used for the `kind` of write-error metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Db(_) => "db",
            StoreError::Timeout(_) => "timeout",
            StoreError::Pool(_) => "pool",
            StoreError::Url(_) => "config",
            StoreError::Fenced { .. } => "fenced",
            StoreError::Migration { .. } => "migration",
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Parses `DATABASE_URL` (with libpq's TLS options) and applies Leasehold's connection defaults.
pub fn pg_config(
    url: &str,
    application_name: &str,
) -> Result<(tokio_postgres::Config, tls::MakeRustls)> {
    let (url, tls) = tls::split(url)?;
    let tls = tls::MakeRustls::new(tls.client_config()?);
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| StoreError::Url(e.to_string()))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(5));
    }
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .application_name(application_name);
    Ok((cfg, tls))
}

/// A dedicated connection whose driver task ends with the connection. Used where no other work may
/// starve the connection (lease renewals, LISTEN, the writer).
pub async fn connect(url: &str, application_name: &str) -> Result<Client> {
    let (cfg, tls) = pg_config(url, application_name)?;
    let timeout = cfg
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(5));
    let (client, conn) = tokio::time::timeout(timeout, cfg.connect(tls))
        .await
        .map_err(|_| StoreError::Timeout(timeout))??;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// A small pool for short queries (health, status, heartbeats, topic reloads).
pub fn pool(url: &str, application_name: &str, size: usize) -> Result<Pool> {
    let (cfg, tls) = pg_config(url, application_name)?;
    let mgr = deadpool_postgres::Manager::from_config(
        cfg,
        tls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| StoreError::Pool(e.to_string()))
}

/// Takes a pooled connection, turning pool errors into [`StoreError`].
pub async fn pooled(pool: &Pool) -> Result<deadpool_postgres::Object> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => StoreError::Db(e),
        other => StoreError::Pool(other.to_string()),
    })
}

/// The migrations, in order. Embedded so the binary carries its schema.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../../migrations/V1__initial.sql"),
    ),
    (
        2,
        "operations",
        include_str!("../../../migrations/V2__operations.sql"),
    ),
    (
        5,
        "subscriptions",
        include_str!("../../../migrations/V5__subscriptions.sql"),
    ),
];

/// Arbitrary but fixed: the advisory lock every node takes around migration.
const MIGRATION_LOCK_KEY: i64 = 0x1ea5_e401d;

/// Applies missing migrations; returns the versions applied. Safe to call from many nodes at once.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let result = apply_migrations(client).await;
    // Unlock even on failure; the session ending would release it too.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn apply_migrations(client: &mut Client) -> Result<Vec<i32>> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS leasehold_schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let done: Vec<i32> = client
        .query("SELECT version FROM leasehold_schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .map_err(|source| StoreError::Migration {
                version: *version,
                source,
            })?;
        tx.execute(
            "INSERT INTO leasehold_schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        applied.push(*version);
    }
    Ok(applied)
}

/// The lease a write transaction must still hold (SPEC section 3, fencing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub lease_name: String,
    pub holder_id: String,
    pub epoch: i64,
}

/// A message that could not be decoded.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub topic: String,
    pub payload: Vec<u8>,
    pub error: String,
    pub received_at: DateTime<Utc>,
}

/// A decoded message ready to insert.
#[derive(Debug, Clone)]
pub struct Row {
    pub reading: leasehold_decode::Reading,
    pub topic: String,
    pub received_at: DateTime<Utc>,
}

/// What one committed batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub inserted: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
}

/// The whole batch in ONE statement (one round trip, one implicit transaction):
///
/// 1. `fence` locks the lease row `FOR SHARE` if, and only if, this holder still holds it at this
///    epoch and it has not expired on the database clock. A concurrent takeover (an `UPDATE` of
///    that row) waits for this statement to finish, and this statement waits for a takeover in
///    progress and then re-checks the new row version: a stale writer commits before a takeover or
///    not at all.
/// 2. Both inserts are conditional on the fence (`WHERE EXISTS`), `ON CONFLICT DO NOTHING` (no
///    target: the primary key and the content-hash key both count), from `unnest` arrays, so the
///    parameter count is fixed (15) whatever the batch size.
///
/// One statement rather than BEGIN / check / insert / COMMIT keeps the share lock only for the
/// server-side execution time: on a slow network a multi-round-trip transaction would hold it
/// across round trips and starve the leader's own renewals.
pub const BATCH_SQL: &str = "WITH fence AS (
        SELECT 1 FROM instance_lock
        WHERE service_name = $1 AND holder_id = $2 AND epoch = $3 AND expires_at > clock_timestamp()
        FOR SHARE),
    rows AS (
        INSERT INTO telemetry (device_id, ts, payload, topic, received_at, written_by, lease_epoch, content_hash)
        SELECT d, t, p::jsonb, tp, r, $4, $3, h
        FROM unnest($5::text[], $6::timestamptz[], $7::text[], $8::text[], $9::timestamptz[], $10::text[])
             AS u(d, t, p, tp, r, h)
        WHERE EXISTS (SELECT 1 FROM fence)
        ON CONFLICT DO NOTHING
        RETURNING 1),
    dead AS (
        INSERT INTO dead_letters (topic, payload, error, received_at, written_by, lease_epoch, content_hash)
        SELECT tp, p, e, r, $4, $3, h
        FROM unnest($11::text[], $12::bytea[], $13::text[], $14::timestamptz[], $15::text[])
             AS u(tp, p, e, r, h)
        WHERE EXISTS (SELECT 1 FROM fence)
        ON CONFLICT DO NOTHING
        RETURNING 1)
    SELECT (SELECT count(*) FROM fence), (SELECT count(*) FROM rows), (SELECT count(*) FROM dead)";

/// Writes batches on one connection with the statement prepared once. See [`BATCH_SQL`].
pub struct BatchWriter {
    client: Client,
    stmt: Statement,
    written_by: String,
}

impl BatchWriter {
    pub async fn new(client: Client, written_by: String) -> Result<Self> {
        let stmt = client.prepare(BATCH_SQL).await?;
        Ok(BatchWriter {
            client,
            stmt,
            written_by,
        })
    }

    /// Whether the connection is gone (the caller reconnects).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Commits `rows` and `dead` if the fence holds; [`StoreError::Fenced`] (nothing written)
    /// otherwise.
    pub async fn write(
        &mut self,
        fence: &Fence,
        rows: &[Row],
        dead: &[DeadLetter],
    ) -> Result<BatchOutcome> {
        let mut d = Vec::with_capacity(rows.len());
        let mut t = Vec::with_capacity(rows.len());
        let mut p = Vec::with_capacity(rows.len());
        let mut tp = Vec::with_capacity(rows.len());
        let mut r = Vec::with_capacity(rows.len());
        let mut h = Vec::with_capacity(rows.len());
        for row in rows {
            d.push(row.reading.device_id.as_str());
            t.push(row.reading.ts);
            p.push(row.reading.payload.as_str());
            tp.push(row.topic.as_str());
            r.push(row.received_at);
            h.push(row.reading.content_hash.as_deref());
        }
        let dtp: Vec<&str> = dead.iter().map(|x| x.topic.as_str()).collect();
        let dp: Vec<&[u8]> = dead.iter().map(|x| x.payload.as_slice()).collect();
        let de: Vec<&str> = dead.iter().map(|x| x.error.as_str()).collect();
        let dr: Vec<DateTime<Utc>> = dead.iter().map(|x| x.received_at).collect();
        let dh: Vec<String> = dead
            .iter()
            .map(|x| leasehold_decode::content_hash(&x.topic, &x.payload))
            .collect();
        let row = self
            .client
            .query_one(
                &self.stmt,
                &[
                    &fence.lease_name,
                    &fence.holder_id,
                    &fence.epoch,
                    &self.written_by,
                    &d,
                    &t,
                    &p,
                    &tp,
                    &r,
                    &h,
                    &dtp,
                    &dp,
                    &de,
                    &dr,
                    &dh,
                ],
            )
            .await?;
        let (held, inserted, dead_lettered): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if held == 0 {
            return Err(StoreError::Fenced { epoch: fence.epoch });
        }
        let (inserted, dead_lettered) = (inserted as u64, dead_lettered as u64);
        Ok(BatchOutcome {
            inserted,
            duplicates: (rows.len() as u64 - inserted) + (dead.len() as u64 - dead_lettered),
            dead_lettered,
        })
    }
}
