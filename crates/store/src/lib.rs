//! PostgreSQL access for Leasehold.
//!
//! # Layout
//! - [`connect`] / [`pool`]: the one place connections are made (timeouts, application name).
//! - [`migrate`]: applies `migrations/` under an advisory lock, so nodes starting together do not race.
//! - [`BatchWriter`]: one transaction per batch, fencing check first, set-based inserts.
//! - [`queries`]: small reads and writes for status, heartbeats and topics.

pub mod listener;
pub mod queries;

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::{types::Type, Client, NoTls, Statement};

pub use deadpool_postgres::Pool;
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

/// Parses `DATABASE_URL` and applies Leasehold's connection defaults.
pub fn pg_config(url: &str, application_name: &str) -> Result<tokio_postgres::Config> {
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| StoreError::Url(e.to_string()))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(5));
    }
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .application_name(application_name);
    Ok(cfg)
}

/// A dedicated connection whose driver task ends with the connection. Used where no other work may
/// starve the connection (lease renewals, LISTEN, the writer).
pub async fn connect(url: &str, application_name: &str) -> Result<Client> {
    let cfg = pg_config(url, application_name)?;
    let timeout = cfg
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(5));
    let (client, conn) = tokio::time::timeout(timeout, cfg.connect(NoTls))
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
    let cfg = pg_config(url, application_name)?;
    let mgr = deadpool_postgres::Manager::from_config(
        cfg,
        NoTls,
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
pub const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "initial",
    include_str!("../../../migrations/V1__initial.sql"),
)];

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

const FENCE_SQL: &str = "SELECT 1 FROM instance_lock \
     WHERE service_name = $1 AND holder_id = $2 AND epoch = $3 AND expires_at > clock_timestamp() \
     FOR SHARE";

const INSERT_SQL: &str = "INSERT INTO telemetry \
     (device_id, ts, payload, topic, received_at, written_by, lease_epoch, content_hash) \
     SELECT d, t, p::jsonb, tp, r, $7, $8, h \
     FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::timestamptz[], $6::text[]) \
          AS u(d, t, p, tp, r, h) \
     ON CONFLICT DO NOTHING";

const DEAD_SQL: &str = "INSERT INTO dead_letters \
     (topic, payload, error, received_at, written_by, lease_epoch, content_hash) \
     SELECT tp, p, e, r, $6, $7, h \
     FROM unnest($1::text[], $2::bytea[], $3::text[], $4::timestamptz[], $5::text[]) AS u(tp, p, e, r, h) \
     ON CONFLICT DO NOTHING";

/// Writes batches on one connection with statements prepared once.
///
/// Every batch is a single transaction: fencing check (`FOR SHARE` on the lease row, so a takeover
/// waits for this transaction and this transaction cannot start after a takeover), then one
/// `unnest` insert per table. Parameter count is fixed (8), whatever the batch size.
pub struct BatchWriter {
    client: Client,
    fence: Statement,
    insert: Statement,
    dead: Statement,
    written_by: String,
}

impl BatchWriter {
    pub async fn new(client: Client, written_by: String) -> Result<Self> {
        let fence = client
            .prepare_typed(FENCE_SQL, &[Type::TEXT, Type::TEXT, Type::INT8])
            .await?;
        let insert = client.prepare(INSERT_SQL).await?;
        let dead = client.prepare(DEAD_SQL).await?;
        Ok(BatchWriter {
            client,
            fence,
            insert,
            dead,
            written_by,
        })
    }

    /// Whether the connection is gone (the caller reconnects).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    pub async fn write(
        &mut self,
        fence: &Fence,
        rows: &[Row],
        dead: &[DeadLetter],
    ) -> Result<BatchOutcome> {
        let tx = self.client.transaction().await?;
        let held = tx
            .query_opt(
                &self.fence,
                &[&fence.lease_name, &fence.holder_id, &fence.epoch],
            )
            .await?;
        if held.is_none() {
            // Dropping the transaction rolls it back.
            return Err(StoreError::Fenced { epoch: fence.epoch });
        }
        let mut out = BatchOutcome::default();
        if !rows.is_empty() {
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
            out.inserted = tx
                .execute(
                    &self.insert,
                    &[&d, &t, &p, &tp, &r, &h, &self.written_by, &fence.epoch],
                )
                .await?;
            out.duplicates = rows.len() as u64 - out.inserted;
        }
        if !dead.is_empty() {
            let tp: Vec<&str> = dead.iter().map(|x| x.topic.as_str()).collect();
            let p: Vec<&[u8]> = dead.iter().map(|x| x.payload.as_slice()).collect();
            let e: Vec<&str> = dead.iter().map(|x| x.error.as_str()).collect();
            let r: Vec<DateTime<Utc>> = dead.iter().map(|x| x.received_at).collect();
            let h: Vec<String> = dead
                .iter()
                .map(|x| leasehold_decode::content_hash(&x.topic, &x.payload))
                .collect();
            out.dead_lettered = tx
                .execute(
                    &self.dead,
                    &[&tp, &p, &e, &r, &h, &self.written_by, &fence.epoch],
                )
                .await?;
            out.duplicates += dead.len() as u64 - out.dead_lettered;
        }
        tx.commit().await?;
        Ok(out)
    }
}
