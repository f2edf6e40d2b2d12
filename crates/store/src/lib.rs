//! PostgreSQL access for Leasehold: the one crate that speaks SQL. Others call the functions
//! here, named for what they do, and get typed rows back (read by column name).
//!
//! # Layout
//! - [`connect`] / [`pool`]: the one place connections are made (timeouts, application name).
//! - [`op`]: [`Op`] and the one measured entry point every statement goes through (duration and
//!   errors per operation).
//! - [`migrate`](mod@migrate): applies `migrations/` under an advisory lock, so nodes starting
//!   together do not race, and refuses a migration changed since it was applied (sha256 ledger).
//! - [`batch`]: [`BatchWriter`], one statement per batch, fencing check first, set-based inserts.
//! - [`lease`]: the lease's acquire/renew and release statements on its own connection.
//! - [`queries`]: small reads and writes for status, heartbeats, topics, the subscription
//!   ledger and [`current_leader`].
//! - [`alerts`]: the `alerts` table and the facts alert rules judge.
//! - [`listener`]: the LISTEN connection and its fan-out.
//! - [`retention`]: batched pruning of the operational tables.
//! - [`routes`](mod@routes): `[[routes]]` checked against the live database ([`routes::resolve`]).
//! - [`tls`]: libpq's `sslmode` rules for `DATABASE_URL`, on `tokio-postgres-rustls` (SCRAM
//!   channel binding).

pub mod alerts;
pub mod batch;
pub mod lease;
pub mod listener;
pub mod migrate;
pub mod op;
pub mod queries;
pub mod retention;
pub mod routes;
pub mod tls;

use std::time::Duration;

pub use batch::{
    storable_text, BatchOutcome, BatchWriter, CancelHandle, DeadLetter, Fence, Row,
    DEFAULT_REDELIVERY_SPAN, DEFAULT_REDELIVERY_WINDOW,
};
pub use deadpool_postgres::Pool;
/// A connection borrowed from the pool.
pub type PooledClient = deadpool_postgres::Object;
pub use migrate::{migrate, migrate_up_to, Migration, MIGRATIONS};
pub use op::Op;
pub use queries::current_leader;
/// A database connection, as [`connect`] makes it and the functions here take it (a
/// [`PooledClient`] dereferences to one): callers hold one without depending on tokio-postgres,
/// and ask this crate for what they need from it, since the SQL lives here.
pub use tokio_postgres::Client;

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
    /// A migration failed or the database's record of it does not match this binary's: the
    /// node must not start (retrying cannot help).
    #[error("migration {file}: {problem}")]
    Migration {
        version: i32,
        /// The file under `migrations/`, e.g. `V2__operations.sql`.
        file: String,
        problem: migrate::Problem,
    },
}

/// The database's own words for an error: message, SQLSTATE, detail and where (the driver's
/// `Display` says only "db error").
pub(crate) fn database_words(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; {d}"));
            }
            if let Some(w) = db.where_() {
                s.push_str(&format!("; where: {w}"));
            }
            s
        }
        None => e.to_string(),
    }
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

impl StoreError {
    /// The SQLSTATE of the database's error, if it answered with one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            StoreError::Db(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// A value in the statement was refused: a type's range or syntax, a constraint, a trigger,
    /// a size limit. Retrying the same values fails the same way, so the writer isolates the
    /// message that causes it instead. Errors about the connection, time, locks, resources or
    /// the schema and the role are not row errors: those are retried (messages wait at the
    /// broker until they pass).
    pub fn is_row_error(&self) -> bool {
        // 22 data exception, 23 integrity constraint, 2F/38/39 routine exceptions, P0 PL/pgSQL
        // RAISE, 54 program limit (e.g. an index row too large).
        self.sqlstate().is_some_and(|code| {
            ["22", "23", "2F", "38", "39", "P0", "54"]
                .iter()
                .any(|class| code.starts_with(class))
        })
    }

    /// The database's own words for a refused value: message, detail and SQLSTATE.
    pub fn database_text(&self) -> String {
        match self {
            StoreError::Db(e) => database_words(e),
            other => other.to_string(),
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
        .map_err(|e: tokio_postgres::Error| tls::parse_error(&e))?;
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
