//! A Leasehold cluster on private servers: one PostgreSQL, one Mosquitto and any number of
//! `leasehold` node processes, with the queries that say who leads and what was stored. The
//! end-to-end suite, the demo, chaos and the bench build on it instead of each wiring nodes to
//! servers its own way. The database is one private server by default, or a replicated pair run
//! by a failover manager ([`crate::pgaf::Pgaf`]): both are a [`Database`].

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::pgaf::Pgaf;
use crate::{eventually, http, Dir, Mosquitto, NodeProc, Postgres};

/// What a cluster's nodes store into: its `DATABASE_URL` and a client on the server that
/// accepts writes now (after a failover, the new primary).
pub trait Database {
    fn url(&self) -> String;
    fn client(&self) -> impl Future<Output = Result<tokio_postgres::Client>> + Send;
    /// The database's own logs worth showing when a test fails (none by default).
    fn logs(&self) -> String {
        String::new()
    }
}

impl Database for Postgres {
    fn url(&self) -> String {
        Postgres::url(self)
    }

    fn client(&self) -> impl Future<Output = Result<tokio_postgres::Client>> + Send {
        Postgres::client(self)
    }
}

impl Database for Pgaf {
    fn url(&self) -> String {
        Pgaf::url(self)
    }

    fn client(&self) -> impl Future<Output = Result<tokio_postgres::Client>> + Send {
        Pgaf::client(self)
    }

    fn logs(&self) -> String {
        Pgaf::logs(self)
    }
}

/// Test lease timings: TTL 3 s (demotion deadline 2 s, renew every 1 s), poll every 250 ms.
pub const TTL: Duration = Duration::from_secs(3);
pub const POLL: Duration = Duration::from_millis(250);

/// The settings a test cluster gives every node: short lease timings and small batches, so that
/// failover and delivery take moments, not the production defaults' seconds.
pub fn test_settings() -> Vec<(&'static str, String)> {
    vec![
        ("LEASE_TTL", format!("{}ms", TTL.as_millis())),
        ("LEASE_POLL_INTERVAL", format!("{}ms", POLL.as_millis())),
        ("BATCH_MAX_WAIT", "20ms".to_string()),
        ("MQTT_KEEP_ALIVE", "5s".to_string()),
        ("LOG_FORMAT", "pretty".to_string()),
    ]
}

/// `telemetry`'s rows of run `$1` by seq (what [`Cluster::assert_exactly_once`] counts).
pub const TELEMETRY_SEQ_COUNTS: &str = "SELECT (payload->>'seq')::bigint, count(*) FROM telemetry WHERE payload->>'run' = $1 GROUP BY 1";

/// `telemetry`'s rows written by node `$1`.
pub const TELEMETRY_WRITTEN_BY: &str = "SELECT count(*) FROM telemetry WHERE written_by = $1";

pub struct Cluster<D: Database = Postgres> {
    /// The `leasehold` binary every node runs.
    pub bin: PathBuf,
    pub pg: D,
    pub mq: Mosquitto,
    /// Where each node's log goes (`<name>.log`).
    pub logs: Dir,
    pub nodes: Vec<NodeProc>,
    /// Settings of every node, after the servers' URLs ([`test_settings`] unless built with
    /// [`Cluster::new`]).
    pub settings: Vec<(&'static str, String)>,
    /// A test's own settings, after `settings` (a later entry wins).
    pub extra_env: Vec<(&'static str, String)>,
}

impl Cluster {
    /// Fresh private servers, test settings.
    pub async fn start(bin: impl Into<PathBuf>) -> Result<Self> {
        let pg = Postgres::start().await?;
        let mq = Mosquitto::start().await?;
        Self::with_servers(bin, pg, mq)
    }
}

impl Cluster<Pgaf> {
    /// A replicated database run by pg_auto_failover (started here, about 15 s) and a fresh
    /// broker, test settings.
    pub async fn start_replicated(bin: impl Into<PathBuf>) -> Result<Self> {
        let (pg, mq) = tokio::try_join!(Pgaf::start(), Mosquitto::start())?;
        Self::with_servers(bin, pg, mq)
    }
}

impl<D: Database> Cluster<D> {
    /// Test settings on servers the caller configured itself (TLS, for instance).
    pub fn with_servers(bin: impl Into<PathBuf>, pg: D, mq: Mosquitto) -> Result<Self> {
        let mut c = Self::new(bin, pg, mq, Dir::temp("leasehold-test-logs-")?);
        c.settings = test_settings();
        Ok(c)
    }

    /// Nodes get only the servers' URLs and `extra_env`: the binary's own defaults (the demo).
    pub fn new(bin: impl Into<PathBuf>, pg: D, mq: Mosquitto, logs: Dir) -> Self {
        Cluster {
            bin: bin.into(),
            pg,
            mq,
            logs,
            nodes: Vec::new(),
            settings: Vec::new(),
            extra_env: Vec::new(),
        }
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("DATABASE_URL", self.pg.url()), ("MQTT_URL", self.mq.url())];
        env.extend(self.settings.iter().cloned());
        env.extend(self.extra_env.iter().cloned());
        env
    }

    /// Starts a node named `name`; returns its index.
    pub fn spawn(&mut self, name: &str) -> Result<usize> {
        self.spawn_with(name, &[])
    }

    pub fn spawn_with(&mut self, name: &str, extra: &[(&'static str, String)]) -> Result<usize> {
        self.spawn_args(name, &[], extra)
    }

    /// Starts a node named `name` with arguments after `run` (`--config FILE`) and `extra`
    /// settings; returns its index.
    pub fn spawn_args(
        &mut self,
        name: &str,
        args: &[&str],
        extra: &[(&'static str, String)],
    ) -> Result<usize> {
        let mut env = self.env();
        env.extend(extra.iter().cloned());
        let n = NodeProc::spawn_args(&self.bin, name, args, &env, self.logs.path())?;
        self.nodes.push(n);
        Ok(self.nodes.len() - 1)
    }

    pub fn node(&self, name: &str) -> &NodeProc {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("node exists")
    }

    pub fn node_mut(&mut self, name: &str) -> &mut NodeProc {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("node exists")
    }

    /// The live lease holder: (instance_id, epoch).
    pub async fn leader(&self) -> Result<Option<(String, i64)>> {
        let c = self.pg.client().await?;
        let leader = leasehold_store::current_leader(&c, crate::LEASE_NAME).await?;
        Ok(leader.map(|l| (l.instance_id, l.epoch)))
    }

    /// Waits for a leader that is connected to the broker (its /health is 200).
    pub async fn wait_leader(&self) -> Result<(String, i64)> {
        eventually(
            Duration::from_secs(30),
            "a leader connected to the broker",
            || async {
                let Some((name, _)) = self.leader().await? else {
                    return Ok(false);
                };
                let Some(node) = self.nodes.iter().find(|n| n.name == name) else {
                    return Ok(false);
                };
                let (code, _) = http(node.http_port(), "GET", "/health").await?;
                Ok(code == 200)
            },
        )
        .await?;
        self.leader().await?.context("leader vanished")
    }

    /// seq -> number of telemetry rows for the run.
    pub async fn seq_counts(&self, run: &str) -> Result<BTreeMap<u64, i64>> {
        self.seq_counts_in(TELEMETRY_SEQ_COUNTS, run).await
    }

    /// seq -> rows for the run, by `sql`: `(seq bigint, count bigint)` of run `$1` (a route's
    /// table, say; [`TELEMETRY_SEQ_COUNTS`] for `telemetry`).
    pub async fn seq_counts_in(&self, sql: &str, run: &str) -> Result<BTreeMap<u64, i64>> {
        let c = self.pg.client().await?;
        let rows = c.query(sql, &[&run]).await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1)))
            .collect())
    }

    /// Waits until every seq in 0..n is stored in telemetry, then checks each exactly once.
    pub async fn assert_exactly_once(&self, run: &str, n: u64) -> Result<()> {
        self.assert_exactly_once_in(TELEMETRY_SEQ_COUNTS, run, n)
            .await
    }

    /// [`Cluster::assert_exactly_once`] for the rows `sql` counts (see [`Cluster::seq_counts_in`]).
    pub async fn assert_exactly_once_in(&self, sql: &str, run: &str, n: u64) -> Result<()> {
        let waited = eventually(
            Duration::from_secs(40),
            "every published message stored",
            || async { Ok(self.seq_counts_in(sql, run).await?.len() as u64 >= n) },
        )
        .await;
        let counts = self.seq_counts_in(sql, run).await?;
        let missing: Vec<u64> = (0..n).filter(|s| !counts.contains_key(s)).collect();
        let dups: Vec<(&u64, &i64)> = counts.iter().filter(|(_, c)| **c != 1).collect();
        let extra: Vec<&u64> = counts.keys().filter(|s| **s >= n).collect();
        if !missing.is_empty() || !dups.is_empty() || !extra.is_empty() || waited.is_err() {
            bail!(
                "exactly-once violated for run {run}: {} missing (first {:?}), {} duplicated, {} unexpected",
                missing.len(),
                missing.iter().take(10).collect::<Vec<_>>(),
                dups.len(),
                extra.len()
            );
        }
        Ok(())
    }

    /// Rows committed under an epoch after a newer epoch's first commit: a fencing failure.
    /// Needs `track_commit_timestamp = on` (the replicated database has it).
    pub async fn stale_epoch_rows(&self) -> Result<i64> {
        let c = self.pg.client().await?;
        let on: String = c
            .query_one("SHOW track_commit_timestamp", &[])
            .await?
            .get(0);
        if on != "on" {
            bail!("track_commit_timestamp is {on}: stale-epoch rows cannot be judged");
        }
        self.count(
            "WITH first AS (SELECT lease_epoch, min(pg_xact_commit_timestamp(xmin)) AS t FROM telemetry GROUP BY 1)
             SELECT count(*) FROM telemetry r
             WHERE EXISTS (SELECT 1 FROM first f WHERE f.lease_epoch > r.lease_epoch AND f.t < pg_xact_commit_timestamp(r.xmin))",
        )
        .await
    }

    /// Runs a `leasehold` command (`status`, `step-down`, ...) against this cluster's database.
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        self.cli_as(&self.pg.url(), args)
    }

    /// Runs a `leasehold` command against the database at `url` (another role, for instance).
    pub fn cli_as(&self, url: &str, args: &[&str]) -> Result<std::process::Output> {
        Ok(std::process::Command::new(&self.bin)
            .args(args)
            .args(["--database-url", url])
            .output()?)
    }

    /// Runs a `leasehold` command with every node's settings (both servers), plus `extra`
    /// (a later entry wins): commands that use the broker too, such as `doctor`.
    pub fn cli_env(&self, args: &[&str], extra: &[(&str, String)]) -> Result<std::process::Output> {
        Ok(std::process::Command::new(&self.bin)
            .args(args)
            .envs(self.env())
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .output()?)
    }

    /// Rows written by `node` so far.
    pub async fn written_by(&self, node: &str) -> Result<i64> {
        self.written_by_in(TELEMETRY_WRITTEN_BY, node).await
    }

    /// Rows `sql` counts for writer `$1` (a route's table, say; [`TELEMETRY_WRITTEN_BY`] for
    /// `telemetry`).
    pub async fn written_by_in(&self, sql: &str, node: &str) -> Result<i64> {
        let db = self.pg.client().await?;
        Ok(db.query_one(sql, &[&node]).await?.get(0))
    }

    /// Waits until `node` has written more than `rows` rows; returns how long that took.
    pub async fn wait_written(&self, node: &str, rows: i64, timeout: Duration) -> Result<Duration> {
        self.wait_written_in(TELEMETRY_WRITTEN_BY, node, rows, timeout)
            .await
    }

    /// [`Cluster::wait_written`] for the rows `sql` counts (see [`Cluster::written_by_in`]).
    pub async fn wait_written_in(
        &self,
        sql: &str,
        node: &str,
        rows: i64,
        timeout: Duration,
    ) -> Result<Duration> {
        eventually(timeout, &format!("{node} writing"), || async {
            Ok(self.written_by_in(sql, node).await? > rows)
        })
        .await
    }

    /// The name of a node other than `name`.
    pub fn other_than(&self, name: &str) -> String {
        self.nodes
            .iter()
            .map(|n| n.name.clone())
            .find(|n| n != name)
            .unwrap_or_default()
    }

    pub async fn count(&self, sql: &str) -> Result<i64> {
        let c = self.pg.client().await?;
        Ok(c.query_one(sql, &[]).await?.get(0))
    }

    /// Every node's log, for failure reports.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s.push_str(&format!(
                "\n===== {} =====\n{}",
                n.name,
                tail(&n.log(), 150)
            ));
        }
        s.push_str(&format!(
            "\n===== mosquitto =====\n{}",
            tail(&self.mq.log(), 60)
        ));
        s.push_str(&self.pg.logs());
        s
    }
}

/// A (topic, payload) pair for `publish_all`.
pub fn msg(topic: &str, body: impl Into<Vec<u8>>) -> (String, Vec<u8>) {
    (topic.to_string(), body.into())
}

/// How many of `topics` have landed somewhere: a `telemetry` row or a dead letter.
pub async fn topics_landed(db: &tokio_postgres::Client, topics: &[&str]) -> Result<usize> {
    let n: i64 = db
        .query_one(
            "SELECT count(DISTINCT topic) FROM (
                 SELECT topic FROM telemetry WHERE topic = ANY($1)
                 UNION ALL SELECT topic FROM dead_letters WHERE topic = ANY($1)) x",
            &[&topics],
        )
        .await?
        .get(0);
    Ok(n as usize)
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Ends a test: on failure, panics with the error and every log of the cluster.
pub fn check<D: Database>(cluster: &Cluster<D>, res: Result<()>) {
    if let Err(e) = res {
        panic!("{e:#}\n--- logs ---{}", cluster.dump());
    }
}
