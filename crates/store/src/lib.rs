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
//! - [`statement`]: that statement, generated from the routes' descriptions (`telemetry` is
//!   route 0).
//! - [`deployment`]: what `leasehold doctor` reads: durability settings, privileges, clock,
//!   the database's identity.
//! - [`lease`]: the lease's acquire/renew and release statements on its own connection.
//! - [`queries`]: small reads and writes for status, heartbeats, topics, the subscription
//!   ledger and [`current_leader`].
//! - [`alerts`]: the `alerts` table and the facts alert rules judge.
//! - [`listener`]: the LISTEN connection and its fan-out.
//! - [`replication`]: whether commits are synchronously replicated, and the standbys.
//! - [`retention`]: batched pruning of the operational tables.
//! - [`syncrep`]: whether a commit is on a synchronous standby, judged after it returned.
//! - [`routes`](mod@routes): `[[routes]]` checked against the live database ([`routes::resolve`]).
//! - [`tls`]: libpq's `sslmode` rules for `DATABASE_URL`, on `tokio-postgres-rustls` (SCRAM
//!   channel binding).

/// `Ok(T { field: row.try_get("field")?, ... })`: a struct read from a row, each field from the
/// column of its own name, or of the name given (`field: "column"`), or set to a value
/// (`field = value`).
macro_rules! from_row {
    (@field $r:ident, $f:ident) => { $r.try_get(stringify!($f))? };
    (@field $r:ident, $f:ident : $c:literal) => { $r.try_get($c)? };
    (@field $r:ident, $f:ident = $e:expr) => { $e };
    ($r:ident => $T:ident { $($f:ident $(: $c:literal)? $(= $e:expr)?),* $(,)? }) => {
        Ok($T { $($f: from_row!(@field $r, $f $(: $c)? $(= $e)?)),* })
    };
}

pub mod alerts;
pub mod batch;
pub mod config;
pub mod deployment;
pub mod lease;
pub mod listener;
pub mod migrate;
pub mod op;
pub mod partitions;
pub mod queries;
pub mod replay;
pub mod replication;
pub mod retention;
pub mod routes;
pub mod sparkplug;
pub mod statement;
pub mod syncrep;
pub mod tls;

use std::time::Duration;

pub use batch::{
    placed, storable_text, BatchOutcome, BatchWriter, CancelHandle, DeadLetter, Fence, Message,
    RouteOutcome, RouteRow, Value, DEFAULT_REDELIVERY_SPAN, DEFAULT_REDELIVERY_WINDOW,
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
    /// In the database's own words (message, SQLSTATE, detail): "db error" alone tells an
    /// operator nothing.
    #[error("database: {}", database_words(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database did not answer within {0:?}")]
    Timeout(Duration),
    #[error("database pool: {0}")]
    Pool(String),
    #[error("invalid DATABASE_URL: {0}")]
    Url(String),
    #[error("fenced: the lease is no longer held by this node at epoch {epoch}")]
    Fenced { epoch: i64 },
    /// The database is not in a state Leasehold can change safely; the words say what to do.
    #[error("{0}")]
    Refused(String),
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
            StoreError::Refused(_) => "refused",
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
        // 21 cardinality (an upsert touching one row twice: keys equal only once cast), 22 data
        // exception, 23 integrity constraint, 2F/38/39 routine exceptions, P0 PL/pgSQL
        // RAISE, 54 program limit (e.g. an index row too large).
        self.sqlstate().is_some_and(|code| {
            ["21", "22", "23", "2F", "38", "39", "P0", "54"]
                .iter()
                .any(|class| code.starts_with(class))
        })
    }

    /// Whether the database answered with an error (as opposed to a connection, a timeout or
    /// the pool failing).
    pub fn is_database_error(&self) -> bool {
        matches!(self, StoreError::Db(e) if e.as_db_error().is_some())
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
///
/// With several hosts (`postgres://h1:5432,h2:5432/db`) and no `target_session_attrs`, the
/// connection goes only to a server that accepts writes (`read-write`): every connection of a
/// node writes or must follow the primary, and libpq's default (`any`) would settle on a standby.
pub fn pg_config(
    url: &str,
    application_name: &str,
) -> Result<(tokio_postgres::Config, tls::MakeRustls)> {
    let (url, tls) = tls::split(url)?;
    let tls = tls::MakeRustls::new(tls.client_config()?);
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| tls::parse_error(&e))?;
    // Tried host by host, a port or hostaddr list of another length would quietly pair hosts
    // with the wrong ports or addresses; libpq refuses it.
    let (hosts, ports) = (host_count(&cfg), cfg.get_ports().len());
    if ports > 1 && ports != hosts {
        return Err(StoreError::Url(format!(
            "{ports} ports for {hosts} hosts: give one port for all, or one per host"
        )));
    }
    let addrs = cfg.get_hostaddrs().len();
    if addrs > 0 && !cfg.get_hosts().is_empty() && addrs != cfg.get_hosts().len() {
        return Err(StoreError::Url(format!(
            "{addrs} hostaddr values for {} hosts: give one per host",
            cfg.get_hosts().len()
        )));
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(5));
    }
    if host_count(&cfg) > 1 && !url.contains("target_session_attrs") {
        cfg.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    }
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .application_name(application_name);
    Ok((cfg, tls))
}

/// A connection's driver, as [`connect_hosts`] makes it.
type DbConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <tls::MakeRustls as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

fn host_count(cfg: &tokio_postgres::Config) -> usize {
    cfg.get_hosts().len().max(cfg.get_hostaddrs().len())
}

/// The connect timeout of each host (`connect_timeout`, default 5 s).
fn host_timeout(cfg: &tokio_postgres::Config) -> Duration {
    cfg.get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(5))
}

/// `cfg` naming only its `i`-th host (and port), so that each host is tried within a timeout
/// of its own: one bound around the driver's own walk over the hosts would let a first host
/// that accepts TCP and then hangs (a stopped server, a host half gone) spend the whole budget,
/// and the primary named second would never be tried.
fn one_host(cfg: &tokio_postgres::Config, i: usize) -> tokio_postgres::Config {
    use tokio_postgres::config::Host;
    let mut c = tokio_postgres::Config::new();
    if let Some(u) = cfg.get_user() {
        c.user(u);
    }
    if let Some(p) = cfg.get_password() {
        c.password(p);
    }
    if let Some(d) = cfg.get_dbname() {
        c.dbname(d);
    }
    if let Some(o) = cfg.get_options() {
        c.options(o);
    }
    if let Some(a) = cfg.get_application_name() {
        c.application_name(a);
    }
    match cfg.get_hosts().get(i) {
        Some(Host::Tcp(h)) => {
            c.host(h);
        }
        Some(Host::Unix(p)) => {
            c.host_path(p);
        }
        None => {}
    }
    if let Some(a) = cfg.get_hostaddrs().get(i) {
        c.hostaddr(*a);
    }
    let ports = cfg.get_ports();
    if let Some(p) = ports.get(i).or(ports.first()) {
        c.port(*p);
    }
    c.ssl_mode(cfg.get_ssl_mode())
        .ssl_negotiation(cfg.get_ssl_negotiation())
        .channel_binding(cfg.get_channel_binding())
        .target_session_attrs(cfg.get_target_session_attrs())
        .keepalives(cfg.get_keepalives())
        .keepalives_idle(cfg.get_keepalives_idle());
    if let Some(t) = cfg.get_connect_timeout() {
        c.connect_timeout(*t);
    }
    if let Some(t) = cfg.get_tcp_user_timeout() {
        c.tcp_user_timeout(*t);
    }
    if let Some(t) = cfg.get_keepalives_interval() {
        c.keepalives_interval(t);
    }
    if let Some(n) = cfg.get_keepalives_retries() {
        c.keepalives_retries(n);
    }
    c
}

/// A new connection and its driver, to the first host of `cfg` that accepts it (and, with
/// `target_session_attrs=read-write`, accepts writes), each host within its own connect
/// timeout, in the order `DATABASE_URL` names them.
pub(crate) async fn connect_hosts(
    cfg: &tokio_postgres::Config,
    tls: &tls::MakeRustls,
) -> Result<(Client, DbConnection)> {
    let timeout = host_timeout(cfg);
    let n = host_count(cfg);
    let mut last = StoreError::Url("no host".into());
    for i in 0..n.max(1) {
        let one;
        let cfg = if n > 1 {
            one = one_host(cfg, i);
            &one
        } else {
            cfg
        };
        match tokio::time::timeout(timeout, cfg.connect(tls.clone())).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => last = StoreError::Db(e),
            Err(_) => last = StoreError::Timeout(timeout),
        }
    }
    Err(last)
}

/// A dedicated connection whose driver task ends with the connection. Used where no other work may
/// starve the connection (lease renewals, LISTEN, the writer).
pub async fn connect(url: &str, application_name: &str) -> Result<Client> {
    let (cfg, tls) = pg_config(url, application_name)?;
    let (client, conn) = connect_hosts(&cfg, &tls).await?;
    drive(conn);
    Ok(client)
}

/// Runs a connection's driver until the connection ends.
fn drive(conn: DbConnection) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            closed(&e);
        }
    })
}

/// A connection's end. One the server ended for waiting inside a transaction (a fenced step or a
/// replay whose process stopped, [`batch::idle_limit_sql`]) is worth a warning: the statement
/// that meets the closed connection only says "connection closed".
fn closed(e: &tokio_postgres::Error) {
    if e.code() == Some(&tokio_postgres::error::SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT) {
        tracing::warn!(error = %database_words(e), "the database ended a connection that waited too long inside a transaction");
    } else {
        tracing::debug!(error = %e, "database connection closed");
    }
}

/// Like [`connect`], and the server's notices (warnings) on this connection arrive on the
/// returned channel, each before the answer to the statement that caused it: the writer reads
/// them to learn of a commit that was not replicated.
pub async fn connect_with_notices(
    url: &str,
    application_name: &str,
) -> Result<(
    Client,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::error::DbError>,
)> {
    use futures_util::StreamExt;
    let (cfg, tls) = pg_config(url, application_name)?;
    let (client, mut conn) = connect_hosts(&cfg, &tls).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notice(n)) => {
                    let _ = tx.send(n);
                }
                Ok(_) => {}
                Err(e) => {
                    closed(&e);
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}

/// Connects the pool's connections host by host, each within its own timeout, as [`connect`].
struct HostByHost {
    tls: tls::MakeRustls,
}

impl deadpool_postgres::Connect for HostByHost {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> futures_util::future::BoxFuture<
        '_,
        std::result::Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let cfg = pg_config.clone();
        Box::pin(async move {
            match connect_hosts(&cfg, &self.tls).await {
                Ok((client, conn)) => {
                    let driver = drive(conn);
                    client.batch_execute(POOL_SESSION).await?;
                    Ok((client, driver))
                }
                Err(StoreError::Db(e)) => Err(e),
                // The pool speaks tokio-postgres' errors only; its timeout error is the one that
                // says what happened.
                Err(_) => Err(tokio_postgres::Error::__private_api_timeout()),
            }
        })
    }
}

/// A pooled connection's session: a transaction left open on it (a caller's timeout dropped
/// its future between `BEGIN` and `COMMIT`) ends within seconds, with the locks it holds on
/// `telemetry`, which a partition step, and the leader's inserts queued behind that step,
/// would otherwise wait for.
const POOL_SESSION: &str = "SET idle_in_transaction_session_timeout = '5s'";

/// A small pool for short queries (health, status, heartbeats, topic reloads).
pub fn pool(url: &str, application_name: &str, size: usize) -> Result<Pool> {
    let (cfg, tls) = pg_config(url, application_name)?;
    // Every host may take its whole connect timeout before the primary answers.
    let create = host_timeout(&cfg) * host_count(&cfg).max(1) as u32;
    let mgr = deadpool_postgres::Manager::from_connect(
        cfg,
        HostByHost { tls },
        deadpool_postgres::ManagerConfig {
            // A connection opened while the database was read-only (a promotion in progress,
            // `default_transaction_read_only` set for a while) stays read-only for its life:
            // one that is read-only when taken is dropped, and a new one made. So is one still
            // inside a transaction ([`POOL_SESSION`]): its transaction began before this check.
            recycling_method: deadpool_postgres::RecyclingMethod::Custom(
                "SELECT 1 / (current_setting('transaction_read_only') = 'off'
                             AND now() = statement_timestamp())::int"
                    .into(),
            ),
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(create))
        .create_timeout(Some(create))
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::{Host, TargetSessionAttrs};

    #[test]
    fn several_hosts_go_to_the_primary_unless_told_otherwise() {
        let attrs = |url: &str| {
            pg_config(url, "t")
                .map(|(c, _)| c.get_target_session_attrs())
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            attrs("postgres://u@a:5432,b:5433/db"),
            Ok(TargetSessionAttrs::ReadWrite)
        );
        assert_eq!(attrs("postgres://u@a:5432/db"), Ok(TargetSessionAttrs::Any));
        assert_eq!(
            attrs("postgres://u@a:5432,b:5433/db?target_session_attrs=any"),
            Ok(TargetSessionAttrs::Any)
        );
    }

    /// libpq refuses a port list that is neither one port nor one per host ("could not match
    /// 2 port numbers to 3 hosts"); trying each host alone must not quietly give the third host
    /// the first host's port instead.
    #[test]
    fn a_port_list_that_does_not_match_the_hosts_is_refused() {
        for url in [
            "host=a,b,c port=5432,5433 user=u dbname=db",
            "host=a,b port=5432,5433,5434 user=u dbname=db",
            "host=a,b hostaddr=127.0.0.1 user=u dbname=db",
        ] {
            let res = pg_config(url, "t").map(|(c, _)| c.get_ports().to_vec());
            assert!(
                matches!(res, Err(StoreError::Url(ref m)) if m.contains("port") || m.contains("hostaddr")),
                "{url}: {res:?}"
            );
        }
        for url in [
            "host=a,b,c port=5433 user=u dbname=db",
            "host=a,b port=5432,5433 user=u dbname=db",
            "postgres://u@a:5432,b/db",
            "host=a,b hostaddr=127.0.0.1,127.0.0.2 user=u dbname=db",
            "hostaddr=127.0.0.1,127.0.0.2 port=5432,5433 user=u dbname=db",
        ] {
            assert!(pg_config(url, "t").is_ok(), "{url}");
        }
    }

    #[test]
    fn each_host_is_tried_alone_with_its_port_and_the_rest_of_the_settings() {
        let (cfg, _) = pg_config(
            "postgres://u:pw@a:5432,b:5433/db?connect_timeout=2&application_name=x",
            "leasehold-test",
        )
        .map_err(|e| e.to_string())
        .expect("parses");
        assert_eq!(host_count(&cfg), 2);
        let b = one_host(&cfg, 1);
        assert_eq!(b.get_hosts(), &[Host::Tcp("b".into())]);
        assert_eq!(b.get_ports(), &[5433]);
        assert_eq!(b.get_user(), Some("u"));
        assert_eq!(b.get_password(), Some(&b"pw"[..]));
        assert_eq!(b.get_dbname(), Some("db"));
        assert_eq!(b.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(b.get_target_session_attrs(), TargetSessionAttrs::ReadWrite);
        assert_eq!(b.get_application_name(), Some("leasehold-test"));
        assert!(b.get_keepalives());
    }
}
