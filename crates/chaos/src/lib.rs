//! The fault matrix (issue: prove G1–G5 under every failure an active/standby pair meets).
//!
//! One environment — a private PostgreSQL (with commit timestamps), a private Mosquitto with the
//! project's broker configuration, and `leasehold` nodes each behind its own TCP proxies to the
//! database and the broker — is reused across trials. Every trial publishes numbered QoS 1
//! messages at a steady rate, injects one fault, heals, and verifies from the database:
//!
//! - **lost**: sequence numbers the broker acknowledged to the publisher but not in `telemetry`;
//! - **duplicates**: rows beyond one per sequence number;
//! - **stale-epoch rows**: rows committed under an epoch after a newer epoch's first commit
//!   (commit timestamps, `track_commit_timestamp = on`);
//! - **failover**: from the fault to the first commit under the new epoch (or, for faults that
//!   need no failover, from the repair to the first commit after it);
//! - **flaps**: lease holder changes beyond what the fault explains; **takeovers**: client-id
//!   takeovers in the broker log (a "fight" is more than one in a trial).
//!
//! # Layout
//! - [`Fault`]: what is injected and what is expected of it.
//! - [`Env`]: the servers, proxies and nodes; healing between trials.
//! - [`run_matrix`]: trials, aggregation, the table and the JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use leasehold_testkit::proxy::Proxy;
use leasehold_testkit::publish::Tracked;
use leasehold_testkit::{eventually, http, metric, Mosquitto, NodeProc, Postgres, LEASE_NAME};
use serde::Serialize;

/// Lease timings of the matrix: short, so many trials fit in minutes.
pub const TTL: Duration = Duration::from_secs(2);
pub const POLL: Duration = Duration::from_millis(200);
/// A leader that cannot reach the broker this long hands over.
pub const STEP_DOWN_AFTER: Duration = Duration::from_secs(2);
/// MQTT keep-alive of the nodes: a silently dead broker connection is noticed within two of these.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Leader killed with SIGKILL.
    Kill9,
    /// Leader paused (SIGSTOP) past the TTL, then resumed.
    Sigstop,
    /// Leader cut off from PostgreSQL (blackholed); the standby still reaches it.
    DbCut,
    /// Leader cut off from the broker; restored after the takeover.
    BrokerCut,
    /// Broker restarted gracefully.
    BrokerRestart,
    /// Broker SIGKILLed after an autosave.
    BrokerKill,
    /// Broker SIGKILLed at full speed, no autosave wait: the broker's own limit (reported, not judged).
    BrokerKillNoSave,
    /// PostgreSQL restarted.
    PgRestart,
    /// Leader's queries delayed below the demotion deadline: there must be no failover.
    PgSlowBelow,
    /// Leader's queries delayed above the demotion deadline: a clean failover.
    PgSlowAbove,
    /// Three nodes started at the same instant: one leader, no shared epoch.
    SimultaneousStart,
    /// Demotion hangs (test-only switch): the watchdog exits the process before the TTL.
    HungDemotion,
    /// `leasehold step-down` during full-rate ingest.
    StepDown,
    /// SIGTERM to the leader during full-rate ingest.
    Sigterm,
}

impl Fault {
    pub const ALL: [Fault; 14] = [
        Fault::Kill9,
        Fault::Sigstop,
        Fault::DbCut,
        Fault::BrokerCut,
        Fault::BrokerRestart,
        Fault::BrokerKill,
        Fault::BrokerKillNoSave,
        Fault::PgRestart,
        Fault::PgSlowBelow,
        Fault::PgSlowAbove,
        Fault::SimultaneousStart,
        Fault::HungDemotion,
        Fault::StepDown,
        Fault::Sigterm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill -9 leader",
            Fault::Sigstop => "SIGSTOP leader > TTL",
            Fault::DbCut => "leader cut from Postgres",
            Fault::BrokerCut => "leader cut from broker",
            Fault::BrokerRestart => "broker restart",
            Fault::BrokerKill => "broker kill -9 after autosave",
            Fault::BrokerKillNoSave => "broker kill -9, no autosave wait",
            Fault::PgRestart => "Postgres restart",
            Fault::PgSlowBelow => "Postgres slow < deadline",
            Fault::PgSlowAbove => "Postgres slow > deadline",
            Fault::SimultaneousStart => "3 nodes start at once",
            Fault::HungDemotion => "demotion hangs (watchdog)",
            Fault::StepDown => "step-down at full rate",
            Fault::Sigterm => "SIGTERM at full rate",
        }
    }

    /// Most lease holder changes the fault explains.
    fn max_changes(self) -> usize {
        match self {
            // The hung node takes over from the stopped pair, then the pair takes over from it.
            Fault::HungDemotion => 2,
            Fault::BrokerRestart
            | Fault::BrokerKill
            | Fault::BrokerKillNoSave
            | Fault::PgSlowBelow => 0,
            _ => 1,
        }
    }

    /// The bound on failover (or resume, or watchdog exit) time this fault must meet.
    fn bound(self) -> Option<Duration> {
        match self {
            Fault::Kill9 | Fault::Sigstop | Fault::DbCut | Fault::PgSlowAbove => {
                Some(TTL + POLL + Duration::from_secs(2))
            }
            // Noticing a silent connection (missed PINGRESP) + the step-down grace + hand-over.
            Fault::BrokerCut => {
                Some(KEEP_ALIVE * 2 + STEP_DOWN_AFTER + TTL + Duration::from_secs(2))
            }
            Fault::StepDown | Fault::Sigterm => Some(Duration::from_secs(1)),
            Fault::HungDemotion => Some(TTL),
            Fault::BrokerRestart
            | Fault::BrokerKill
            | Fault::BrokerKillNoSave
            | Fault::PgRestart => Some(Duration::from_secs(10)),
            Fault::PgSlowBelow | Fault::SimultaneousStart => None,
        }
    }

    /// Whether losses are the broker's documented limit rather than Leasehold's failure.
    fn loss_is_broker_limit(self) -> bool {
        self == Fault::BrokerKillNoSave
    }
}

/// One trial's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub fault: Fault,
    pub trial: usize,
    pub failover_ms: Option<f64>,
    pub published: u64,
    pub acked: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub stale_epoch_rows: u64,
    pub flaps: u64,
    pub takeovers: u64,
    pub problems: Vec<String>,
}

/// A fault's trials, aggregated.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub fault: Fault,
    pub name: &'static str,
    pub trials: usize,
    pub failover_p50_ms: Option<f64>,
    pub failover_max_ms: Option<f64>,
    pub lost: u64,
    pub duplicates: u64,
    pub stale_epoch_rows: u64,
    pub flaps: u64,
    pub takeovers: u64,
    pub fights: u64,
    pub failed_trials: usize,
    pub problems: Vec<String>,
}

struct Node {
    name: String,
    proc: Option<NodeProc>,
    db: Proxy,
    mqtt: Proxy,
    extra: Vec<(&'static str, String)>,
}

/// The servers and nodes, reused across trials.
pub struct Env {
    pub pg: Postgres,
    pub mq: Mosquitto,
    logs: tempfile::TempDir,
    bin: PathBuf,
    nodes: Vec<Node>,
    db: tokio_postgres::Client,
}

impl Env {
    pub async fn new(bin: &Path) -> Result<Env> {
        let pg = Postgres::start_with("track_commit_timestamp = on").await?;
        let mq = Mosquitto::start().await?;
        let mut logs = tempfile::Builder::new()
            .prefix("leasehold-chaos-")
            .tempdir()?;
        if std::env::var_os("CHAOS_KEEP_LOGS").is_some() {
            logs.disable_cleanup(true);
            eprintln!("chaos: node logs kept in {}", logs.path().display());
        }
        let db = pg.client().await?;
        let mut env = Env {
            pg,
            mq,
            logs,
            bin: bin.to_path_buf(),
            nodes: Vec::new(),
            db,
        };
        for name in ["node-a", "node-b"] {
            env.add_node(name).await?;
        }
        env.wait_leader().await?;
        Ok(env)
    }

    pub fn logs(&self) -> &Path {
        self.logs.path()
    }

    async fn add_node(&mut self, name: &str) -> Result<()> {
        self.add_node_stopped(name).await?;
        self.relaunch(name)
    }

    /// (Re)starts the node `name` with its current extra settings.
    fn relaunch(&mut self, name: &str) -> Result<()> {
        let (bin, logs) = (self.bin.clone(), self.logs.path().to_path_buf());
        launch(&bin, &logs, self.node(name)?)
    }
}

fn launch(bin: &Path, logs: &Path, node: &mut Node) -> Result<()> {
    let mut env: Vec<(&str, String)> = vec![
        (
            "DATABASE_URL",
            format!(
                "postgres://postgres@127.0.0.1:{}/postgres?connect_timeout=2",
                node.db.port
            ),
        ),
        ("MQTT_URL", format!("mqtt://127.0.0.1:{}", node.mqtt.port)),
        ("LEASE_TTL", format!("{}ms", TTL.as_millis())),
        ("LEASE_POLL_INTERVAL", format!("{}ms", POLL.as_millis())),
        (
            "MQTT_STEP_DOWN_AFTER",
            format!("{}ms", STEP_DOWN_AFTER.as_millis()),
        ),
        ("MQTT_KEEP_ALIVE", format!("{}ms", KEEP_ALIVE.as_millis())),
        ("MQTT_RECONNECT_MAX", "1s".into()),
        ("BATCH_MAX_WAIT", "20ms".into()),
        ("LOG_FORMAT", "pretty".into()),
        (
            "LOG_LEVEL",
            "info,leasehold_lease=debug,leasehold_store=debug".into(),
        ),
    ];
    env.extend(node.extra.iter().cloned());
    node.proc = Some(NodeProc::spawn(bin, &node.name, &env, logs)?);
    Ok(())
}

impl Env {
    fn node(&mut self, name: &str) -> Result<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .context("no such node")
    }

    async fn leader(&self) -> Result<Option<(String, i64)>> {
        let leader = leasehold_store::current_leader(&self.db, LEASE_NAME).await?;
        Ok(leader.map(|l| (l.instance_id, l.epoch)))
    }

    /// A leader that is connected to the broker.
    async fn wait_leader(&self) -> Result<(String, i64)> {
        eventually(
            Duration::from_secs(30),
            "a leader connected to the broker",
            || async {
                let Some((name, _)) = self.leader().await? else {
                    return Ok(false);
                };
                let Some(n) = self.nodes.iter().find(|n| n.name == name) else {
                    return Ok(false);
                };
                let Some(p) = &n.proc else { return Ok(false) };
                let (_, m) = http(p.http_port, "GET", "/metrics").await?;
                Ok(metric(&m, "leasehold_mqtt_connected") == Some(1.0)
                    && metric(&m, "leasehold_lease_is_leader") == Some(1.0))
            },
        )
        .await?;
        self.leader().await?.context("leader vanished")
    }

    /// Back to two healthy nodes, clean proxies, servers up, a connected leader.
    async fn heal(&mut self) -> Result<(String, i64)> {
        for i in 0..self.nodes.len() {
            // Only what a fault touched: restoring closes the proxy's connections.
            if self.nodes[i].db.is_cut() {
                self.nodes[i].db.restore();
            }
            if self.nodes[i].mqtt.is_cut() {
                self.nodes[i].mqtt.restore();
            }
            self.nodes[i].db.set_delay(Duration::ZERO);
            if let Some(p) = &self.nodes[i].proc {
                p.signal(libc::SIGCONT);
            }
        }
        // Only node-a and node-b stay; extra nodes of a trial are stopped.
        let mut keep = Vec::new();
        for mut n in std::mem::take(&mut self.nodes) {
            if n.name == "node-a" || n.name == "node-b" {
                let dead = n.proc.as_mut().is_none_or(|p| p.try_status().is_some());
                if dead || !n.extra.is_empty() {
                    if let Some(mut p) = n.proc.take() {
                        p.kill9();
                    }
                    n.extra.clear();
                    launch(&self.bin, self.logs.path(), &mut n)?;
                }
                keep.push(n);
            } else if let Some(mut p) = n.proc.take() {
                p.signal(libc::SIGTERM);
                let _ = p.wait_exit(Duration::from_secs(5)).await;
            }
        }
        self.nodes = keep;
        self.wait_leader().await
    }

    /// Adds a node with its proxies without starting it.
    async fn add_node_stopped(&mut self, name: &str) -> Result<()> {
        let db = Proxy::start(self.pg.port).await?;
        let mqtt = Proxy::start(self.mq.port).await?;
        self.nodes.push(Node {
            name: name.to_string(),
            proc: None,
            db,
            mqtt,
            extra: Vec::new(),
        });
        Ok(())
    }

    fn takeovers(&self) -> u64 {
        self.mq
            .log()
            .matches("already connected, closing old connection")
            .count() as u64
    }

    async fn stale_epoch_rows(&self) -> Result<u64> {
        let n: i64 = self
            .db
            .query_one(
                "WITH first AS (SELECT lease_epoch, min(pg_xact_commit_timestamp(xmin)) AS t FROM telemetry GROUP BY 1)
                 SELECT count(*) FROM telemetry r
                 WHERE EXISTS (SELECT 1 FROM first f WHERE f.lease_epoch > r.lease_epoch AND f.t < pg_xact_commit_timestamp(r.xmin))",
                &[],
            )
            .await?
            .get(0);
        Ok(n as u64)
    }

    async fn rows_of(&self, run: &str) -> Result<i64> {
        Ok(self
            .db
            .query_one(
                "SELECT count(*) FROM telemetry WHERE payload->>'run' = $1",
                &[&run],
            )
            .await?
            .get(0))
    }

    /// First commit of `run` under an epoch above `epoch`, after `after`.
    async fn first_commit(
        &self,
        run: &str,
        epoch_above: i64,
        after: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>> {
        Ok(self
            .db
            .query_one(
                "SELECT min(pg_xact_commit_timestamp(xmin)) FROM telemetry
                 WHERE payload->>'run' = $1 AND lease_epoch > $2 AND pg_xact_commit_timestamp(xmin) > $3",
                &[&run, &epoch_above, &after],
            )
            .await?
            .get(0))
    }

    async fn stored_seqs(&self, run: &str) -> Result<BTreeMap<u64, i64>> {
        let rows = self
            .db
            .query("SELECT (payload->>'seq')::bigint, count(*) FROM telemetry WHERE payload->>'run' = $1 GROUP BY 1", &[&run])
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1)))
            .collect())
    }

    async fn reconnect_db(&mut self) -> Result<()> {
        self.db = self.pg.client().await?;
        Ok(())
    }
}

/// Records every change of the lease holder while a trial runs.
struct LeaseWatch {
    changes: Arc<Mutex<Vec<(String, i64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseWatch {
    fn start(url: String) -> LeaseWatch {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let c = changes.clone();
        let task = tokio::spawn(async move {
            let mut client = None;
            let mut last: Option<(String, i64)> = None;
            loop {
                if client.is_none() {
                    client = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .ok()
                        .map(|(cl, conn)| {
                            tokio::spawn(conn);
                            cl
                        });
                }
                if let Some(cl) = &client {
                    // Every change of holder, live or expired: the lease row, not only a leader.
                    match leasehold_store::queries::lease(cl, LEASE_NAME).await {
                        Ok(Some(l)) => {
                            let now: (String, i64) = (l.holder_id, l.epoch);
                            if last.as_ref().is_some_and(|l| l.0 != now.0) {
                                if let Ok(mut v) = c.lock() {
                                    v.push(now.clone());
                                }
                            }
                            last = Some(now);
                        }
                        Ok(None) => {}
                        Err(_) => client = None,
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        LeaseWatch { changes, task }
    }

    fn stop(self) -> Vec<(String, i64)> {
        self.task.abort();
        self.changes.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Options of a matrix run.
#[derive(Debug, Clone)]
pub struct Options {
    pub bin: PathBuf,
    pub trials: usize,
    pub faults: Vec<Fault>,
    /// Steady publishing rate (messages/s).
    pub rate: u64,
    /// Rate for the "full rate" faults.
    pub full_rate: u64,
    /// Wall-clock budget for the whole run; trials beyond it are skipped (and reported).
    pub budget: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn sleep(d: Duration) {
    tokio::time::sleep(d).await
}

/// Polls `f` every 50 ms until it yields a value or `timeout` passes.
async fn first_some<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Ok(Some(v)) = f().await {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Time from `from` to the first commit of `run` under an epoch above `above` after `from`.
async fn wait_new_epoch(
    env: &Env,
    run: &str,
    above: i64,
    from: DateTime<Utc>,
    timeout: Duration,
) -> Option<Duration> {
    let t = first_some(timeout, || env.first_commit(run, above, from)).await?;
    (t - from).to_std().ok()
}

/// Runs one trial of `fault` on a healed environment.
async fn trial(env: &mut Env, opts: &Options, fault: Fault, idx: usize) -> Result<Trial> {
    let (leader, epoch) = env.heal().await?;
    let run = format!("{:?}-{idx}-{}", fault, Utc::now().timestamp_millis()).to_lowercase();
    let rate = if matches!(fault, Fault::StepDown | Fault::Sigterm) {
        opts.full_rate
    } else {
        opts.rate
    };
    let stale_before = env.stale_epoch_rows().await?;
    let takeovers_before = env.takeovers();
    let watch = LeaseWatch::start(env.pg.url());
    let publisher = Tracked::start(env.mq.port, &run, 20, rate);
    let mut problems = Vec::new();
    eventually(
        Duration::from_secs(10),
        "the leader writing the run",
        || async { Ok(env.rows_of(&run).await? > 20) },
    )
    .await?;

    let fault_at = Utc::now();
    let mut measured: Option<Duration> = None;
    match fault {
        Fault::Kill9 => {
            env.node(&leader)?.proc.as_mut().context("leader")?.kill9();
            measured = wait_new_epoch(env, &run, epoch, fault_at, Duration::from_secs(20)).await;
        }
        Fault::Sigstop => {
            env.node(&leader)?
                .proc
                .as_ref()
                .context("leader")?
                .signal(libc::SIGSTOP);
            measured = wait_new_epoch(env, &run, epoch, fault_at, Duration::from_secs(20)).await;
            sleep(TTL).await;
            env.node(&leader)?
                .proc
                .as_ref()
                .context("leader")?
                .signal(libc::SIGCONT);
            sleep(TTL).await;
        }
        Fault::DbCut => {
            env.node(&leader)?.db.blackhole();
            measured = wait_new_epoch(env, &run, epoch, fault_at, Duration::from_secs(20)).await;
            env.node(&leader)?.db.restore();
            sleep(TTL).await;
        }
        Fault::BrokerCut => {
            env.node(&leader)?.mqtt.blackhole();
            measured = wait_new_epoch(env, &run, epoch, fault_at, Duration::from_secs(20)).await;
            env.node(&leader)?.mqtt.restore();
            sleep(TTL).await;
        }
        Fault::BrokerRestart | Fault::BrokerKill | Fault::BrokerKillNoSave => {
            if fault == Fault::BrokerKill {
                // Let the broker save everything it acknowledged (autosave_interval 1 s).
                publisher.pause();
                sleep(Duration::from_millis(2500)).await;
            }
            if fault == Fault::BrokerRestart {
                env.mq.stop();
            } else {
                env.mq.kill();
            }
            env.mq.start_again().await?;
            publisher.resume();
            let repaired = Utc::now();
            measured = wait_new_epoch(env, &run, 0, repaired, Duration::from_secs(20)).await;
        }
        Fault::PgRestart => {
            env.pg.stop()?;
            env.pg.start_again().await?;
            env.reconnect_db().await?;
            let repaired = Utc::now();
            measured = wait_new_epoch(env, &run, 0, repaired, Duration::from_secs(20)).await;
        }
        Fault::PgSlowBelow => {
            env.node(&leader)?.db.set_delay(TTL / 5);
            sleep(TTL * 3).await;
            env.node(&leader)?.db.set_delay(Duration::ZERO);
            if env.leader().await?.map(|l| l.1) != Some(epoch) {
                problems.push("false failover: the lease changed although the slowness stayed below the deadline".into());
            }
        }
        Fault::PgSlowAbove => {
            env.node(&leader)?.db.set_delay(TTL * 4 / 5);
            measured = wait_new_epoch(env, &run, epoch, fault_at, Duration::from_secs(20)).await;
            env.node(&leader)?.db.set_delay(Duration::ZERO);
            sleep(TTL).await;
        }
        Fault::SimultaneousStart => {
            for n in &mut env.nodes {
                if let Some(p) = n.proc.as_mut() {
                    p.kill9();
                }
            }
            // Let the old lease expire so all three campaign from the same start line.
            sleep(TTL + POLL).await;
            env.add_node_stopped("node-c").await?;
            // All three at (nearly) the same instant: spawning takes microseconds each.
            for name in ["node-a", "node-b", "node-c"] {
                env.relaunch(name)?;
            }
            let mut most = 0;
            let start = Instant::now();
            while start.elapsed() < TTL * 3 {
                let mut leaders = 0;
                for n in &env.nodes {
                    if let Some(p) = &n.proc {
                        if let Ok((_, m)) = http(p.http_port, "GET", "/metrics").await {
                            if metric(&m, "leasehold_lease_is_leader") == Some(1.0) {
                                leaders += 1;
                            }
                        }
                    }
                }
                most = most.max(leaders);
                sleep(Duration::from_millis(50)).await;
            }
            if most > 1 {
                problems.push(format!("{most} nodes believed they led at the same time"));
            }
            let shared: i64 = env
                .db
                .query_one(
                    "SELECT count(*) FROM (SELECT lease_epoch FROM telemetry GROUP BY 1 HAVING count(DISTINCT written_by) > 1) s",
                    &[],
                )
                .await?
                .get(0);
            if shared > 0 {
                problems.push(format!(
                    "{shared} epochs were written by more than one node"
                ));
            }
        }
        Fault::HungDemotion => {
            // A lone leader with the hang switch; the others are stopped, the standby first so
            // the leader's graceful stop has nobody to hand over to.
            env.nodes.sort_by_key(|n| n.name == leader);
            for n in &mut env.nodes {
                if let Some(mut p) = n.proc.take() {
                    p.signal(libc::SIGTERM);
                    let _ = p.wait_exit(Duration::from_secs(10)).await;
                }
            }
            let hung = "node-a".to_string();
            env.node(&hung)?.extra = vec![("FAILPOINTS", "demotion-hang=return".into())];
            env.relaunch(&hung)?;
            let (l, _) = env.wait_leader().await?;
            if l != hung {
                bail!("expected {hung} to lead, got {l}");
            }
            let cut_at = Instant::now();
            env.node(&hung)?.db.blackhole();
            let status = env
                .node(&hung)?
                .proc
                .as_mut()
                .context("hung node")?
                .wait_exit(TTL * 3)
                .await?;
            measured = Some(cut_at.elapsed());
            if status.code() != Some(70) {
                problems.push(format!(
                    "expected the watchdog's exit code 70, got {status}"
                ));
            }
            env.node(&hung)?.db.restore();
            env.node(&hung)?.extra.clear();
            // The normal pair takes over and receives what the hung leader never acknowledged.
            env.relaunch("node-a")?;
            env.relaunch("node-b")?;
            env.wait_leader().await?;
        }
        Fault::StepDown => {
            let out = tokio::process::Command::new(&env.bin)
                .args(["step-down", "--database-url", &env.pg.url()])
                .output()
                .await?;
            if !out.status.success() {
                problems.push(format!(
                    "step-down failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            measured = wait_new_epoch(env, &run, epoch, fault_at, Duration::from_secs(10)).await;
        }
        Fault::Sigterm => {
            env.node(&leader)?
                .proc
                .as_ref()
                .context("leader")?
                .signal(libc::SIGTERM);
            measured = wait_new_epoch(env, &run, epoch, fault_at, Duration::from_secs(10)).await;
        }
    }
    // Keep publishing a moment after the repair, then verify.
    sleep(Duration::from_millis(800)).await;
    let report = publisher.stop().await?;
    // Everything acknowledged by the broker must arrive (healing first if a node is down).
    if matches!(fault, Fault::Kill9 | Fault::Sigterm) {
        env.heal().await?;
    }
    let acked = report.acked.clone();
    let (envr, runr, ackedr) = (&*env, run.as_str(), &acked);
    let complete = first_some(Duration::from_secs(20), move || async move {
        let stored = envr.stored_seqs(runr).await?;
        Ok(ackedr
            .iter()
            .all(|s| stored.contains_key(s))
            .then_some(stored))
    })
    .await;
    let stored = match complete {
        Some(s) => s,
        None => env.stored_seqs(&run).await?,
    };
    let lost = acked.iter().filter(|s| !stored.contains_key(s)).count() as u64;
    let duplicates = stored.values().map(|c| (*c - 1).max(0) as u64).sum();
    let stale = env.stale_epoch_rows().await?.saturating_sub(stale_before);
    let changes = watch.stop();
    let flaps = changes.len().saturating_sub(fault.max_changes()) as u64;
    let takeovers = env.takeovers().saturating_sub(takeovers_before);
    if lost > 0 && !fault.loss_is_broker_limit() {
        problems.push(format!("{lost} acknowledged messages lost"));
    }
    if duplicates > 0 {
        problems.push(format!("{duplicates} duplicate rows"));
    }
    if stale > 0 {
        problems.push(format!("{stale} rows committed under a superseded epoch"));
    }
    if flaps > 0 {
        problems.push(format!(
            "{flaps} unexplained leadership changes: {changes:?}"
        ));
    }
    if takeovers > 1 {
        problems.push(format!(
            "client-id fight: {takeovers} takeovers at the broker"
        ));
    }
    if let Some(bound) = fault.bound() {
        match measured {
            Some(m) if m > bound => problems.push(format!("took {m:?}, bound {bound:?}")),
            None => problems.push("no takeover/resume observed".into()),
            _ => {}
        }
    }
    Ok(Trial {
        fault,
        trial: idx,
        failover_ms: measured.map(ms),
        published: report.published,
        acked: acked.len() as u64,
        lost,
        duplicates,
        stale_epoch_rows: stale,
        flaps,
        takeovers,
        problems,
    })
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).copied()
}

fn aggregate(fault: Fault, trials: &[Trial]) -> Row {
    let mut times: Vec<f64> = trials.iter().filter_map(|t| t.failover_ms).collect();
    times.sort_by(|a, b| a.total_cmp(b));
    Row {
        fault,
        name: fault.name(),
        trials: trials.len(),
        failover_p50_ms: percentile(&times, 0.5),
        failover_max_ms: times.last().copied(),
        lost: trials.iter().map(|t| t.lost).sum(),
        duplicates: trials.iter().map(|t| t.duplicates).sum(),
        stale_epoch_rows: trials.iter().map(|t| t.stale_epoch_rows).sum(),
        flaps: trials.iter().map(|t| t.flaps).sum(),
        takeovers: trials.iter().map(|t| t.takeovers).sum(),
        fights: trials.iter().filter(|t| t.takeovers > 1).count() as u64,
        failed_trials: trials.iter().filter(|t| !t.problems.is_empty()).count(),
        problems: trials
            .iter()
            .flat_map(|t| {
                t.problems
                    .iter()
                    .map(move |p| format!("trial {}: {p}", t.trial))
            })
            .collect(),
    }
}

/// The whole report of a matrix run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_at: DateTime<Utc>,
    pub seconds: f64,
    pub lease_ttl_ms: f64,
    pub poll_interval_ms: f64,
    pub rate: u64,
    pub full_rate: u64,
    pub rows: Vec<Row>,
    pub trials: Vec<Trial>,
}

impl Report {
    /// Faults whose trials broke a guarantee or a bound.
    pub fn failures(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.failed_trials > 0).collect()
    }

    pub fn table(&self) -> String {
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        let mut s = format!(
            "{:<33} {:>6} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}\n",
            "fault",
            "trials",
            "p50 ms",
            "max ms",
            "lost",
            "dups",
            "stale",
            "flaps",
            "tkovr",
            "failed"
        );
        for r in &self.rows {
            let lost = if r.fault.loss_is_broker_limit() {
                format!("{}*", r.lost)
            } else {
                r.lost.to_string()
            };
            s.push_str(&format!(
                "{:<33} {:>6} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}\n",
                r.name,
                r.trials,
                opt(r.failover_p50_ms),
                opt(r.failover_max_ms),
                lost,
                r.duplicates,
                r.stale_epoch_rows,
                r.flaps,
                r.takeovers,
                r.failed_trials
            ));
        }
        s.push_str(&format!(
            "LEASE_TTL {} ms, poll {} ms, {} msg/s steady, {} msg/s full rate, {:.0} s.\n\
             ms = fault to first commit under the new epoch (restart faults: repair to first commit; watchdog: cut to exit).\n\
             * broker kill -9 without waiting for its autosave: what the broker had not saved is the broker's limit, not judged.\n",
            self.lease_ttl_ms, self.poll_interval_ms, self.rate, self.full_rate, self.seconds
        ));
        for r in &self.rows {
            for p in &r.problems {
                s.push_str(&format!("  {}: {p}\n", r.name));
            }
        }
        s
    }
}

/// Runs the matrix; trials that would start after the budget are skipped.
pub async fn run_matrix(opts: &Options) -> Result<Report> {
    let started_at = Utc::now();
    let start = Instant::now();
    let mut env = Env::new(&opts.bin).await?;
    let per_fault = opts.budget.div_f64(opts.faults.len().max(1) as f64);
    let mut all = Vec::new();
    let mut rows = Vec::new();
    for &fault in &opts.faults {
        let fault_start = Instant::now();
        let mut trials = Vec::new();
        for i in 1..=opts.trials {
            if i > 1 && fault_start.elapsed() > per_fault {
                eprintln!(
                    "chaos: {}: budget reached after {} trials",
                    fault.name(),
                    i - 1
                );
                break;
            }
            let t = match trial(&mut env, opts, fault, i).await {
                Ok(t) => t,
                Err(e) => {
                    // The environment may be wrecked: report the trial and start afresh.
                    let problem = format!("trial could not run: {e:#}");
                    eprintln!(
                        "chaos: {}: {problem}; logs in {}",
                        fault.name(),
                        env.logs().display()
                    );
                    env = Env::new(&opts.bin).await?;
                    Trial {
                        fault,
                        trial: i,
                        failover_ms: None,
                        published: 0,
                        acked: 0,
                        lost: 0,
                        duplicates: 0,
                        stale_epoch_rows: 0,
                        flaps: 0,
                        takeovers: 0,
                        problems: vec![problem],
                    }
                }
            };
            eprintln!(
                "chaos: {:<33} trial {i}: {} ms, {} acked, lost {}, dups {}, stale {}, flaps {}, takeovers {}{}",
                fault.name(),
                t.failover_ms.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into()),
                t.acked,
                t.lost,
                t.duplicates,
                t.stale_epoch_rows,
                t.flaps,
                t.takeovers,
                if t.problems.is_empty() { String::new() } else { format!("  PROBLEMS: {:?}", t.problems) }
            );
            trials.push(t);
        }
        rows.push(aggregate(fault, &trials));
        all.extend(trials);
    }
    Ok(Report {
        started_at,
        seconds: start.elapsed().as_secs_f64(),
        lease_ttl_ms: ms(TTL),
        poll_interval_ms: ms(POLL),
        rate: opts.rate,
        full_rate: opts.full_rate,
        rows,
        trials: all,
    })
}
