//! One PostgreSQL with the shared broker, and the runs every pass makes on it: a leader started,
//! fed and stopped, the latency run, one per-message upsert run.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use leasehold_testkit::{
    eventually, http, leading_and_subscribed, memory_of, metric, Mosquitto, NodeProc, Postgres,
};

use crate::args::Child;
use crate::child::{self, ChildReport};
use crate::mqtt::{create_session, drop_session, publish};
use crate::probes::{check_upsert_wrote, count, latency, receive_to_last_commit};

/// The leader's persistent MQTT session.
pub const LEADER_SESSION: &str = "bench-leasehold";

/// What a pass runs against: the binary, the shared broker and logs, and its own PostgreSQL.
pub struct Rig<'a> {
    pub bin: &'a Path,
    pub mq: &'a Mosquitto,
    pub logs: &'a Path,
    pub pg: Postgres,
    pub db: tokio_postgres::Client,
}

impl<'a> Rig<'a> {
    /// Migrates `pg` and connects to it.
    pub async fn new(
        bin: &'a Path,
        mq: &'a Mosquitto,
        logs: &'a Path,
        pg: Postgres,
    ) -> Result<Rig<'a>> {
        let db = pg.client().await?;
        migrate(bin, &pg)?;
        Ok(Rig {
            bin,
            mq,
            logs,
            pg,
            db,
        })
    }

    /// Starts a leasehold node on this rig's servers, with the leader's session.
    pub fn spawn_node(&self, name: &str) -> Result<NodeProc> {
        self.spawn_node_with(name, &[])
    }

    /// [`Rig::spawn_node`] with settings of its own (a config file with routes).
    pub fn spawn_node_with(
        &self,
        name: &str,
        extra: &[(&'static str, String)],
    ) -> Result<NodeProc> {
        let mut env = vec![
            ("DATABASE_URL", self.pg.url()),
            ("MQTT_URL", self.mq.url()),
            ("MQTT_CLIENT_ID", LEADER_SESSION.into()),
            ("LOG_LEVEL", "info".into()),
            ("LOG_FORMAT", "json".into()),
        ];
        env.extend(extra.iter().cloned());
        NodeProc::spawn(self.bin, name, &env, self.logs)
    }
}

impl Rig<'_> {
    /// Makes `toml` the cluster's configuration (`leasehold config apply`): what the next leader
    /// runs, whatever its own environment says.
    pub fn apply_config(&self, name: &str, toml: &str) -> Result<()> {
        let file = self.logs.join(format!("{name}.toml"));
        std::fs::write(&file, toml)?;
        let st = std::process::Command::new(self.bin)
            .args(["config", "apply", &file.display().to_string()])
            .args(["--database-url", &self.pg.url()])
            .output()?;
        if !st.status.success() {
            bail!(
                "config apply {name} failed: {}{}",
                String::from_utf8_lossy(&st.stdout),
                String::from_utf8_lossy(&st.stderr)
            );
        }
        Ok(())
    }
}

fn migrate(bin: &Path, pg: &Postgres) -> Result<()> {
    let st = std::process::Command::new(bin)
        .args(["migrate", "--database-url", &pg.url()])
        .output()?;
    if !st.status.success() {
        bail!("migrate failed: {}", String::from_utf8_lossy(&st.stderr));
    }
    Ok(())
}

/// A new leader that took `n` messages of `run`, published as fast as the publisher goes.
pub struct LiveRun {
    pub node: NodeProc,
    pub rows: i64,
    /// First receipt to last commit.
    pub rate: f64,
    pub peak_rss: u64,
    pub publish_time: Duration,
}

pub async fn leasehold_live(rig: &Rig<'_>, run: &str, n: u64) -> Result<LiveRun> {
    let node = rig.spawn_node(&format!("bench-leader-{run}"))?;
    wait_leading(&node).await?;
    let publish_time = publish(rig.mq.port, run, n, 0).await?;
    eventually(
        Duration::from_secs(300),
        &format!("leasehold to store every message of {run}"),
        || async { Ok(count(&rig.db, run).await? >= n as i64) },
    )
    .await?;
    let (rows, secs) = receive_to_last_commit(&rig.db, run).await?;
    Ok(LiveRun {
        rate: rows as f64 / secs.max(1e-9),
        peak_rss: memory_of(node.pid()).map(|m| m.0).unwrap_or(0),
        node,
        rows,
        publish_time,
    })
}

/// Publishes up to 10 s of messages of `run` at `rate` (at most `n`) to the running leader and
/// returns their receive-to-commit p50 and p99 in ms.
pub async fn latency_run(rig: &Rig<'_>, run: &str, rate: u64, n: u64) -> Result<(f64, f64)> {
    let lat_n = (rate * 10).min(n);
    publish(rig.mq.port, run, lat_n, rate).await?;
    eventually(
        Duration::from_secs(60),
        &format!("the {run} run stored"),
        || async { Ok(count(&rig.db, run).await? >= lat_n as i64) },
    )
    .await?;
    latency(&rig.db, run).await
}

/// The leader's own account of its batches, from its metrics.
pub async fn leader_summary(node: &NodeProc) -> String {
    let Ok((_, m)) = http(node.http_port(), "GET", "/metrics").await else {
        return "no metrics".into();
    };
    let g = |k: &str| metric(&m, k).unwrap_or(f64::NAN);
    let writes = g("leasehold_batch_write_duration_seconds_count");
    format!(
        "{writes} batches, {:.0} rows/batch, {:.1} ms/batch write ({} over 250 ms), received {}, duplicates {}, overflow {}, reconnects {}",
        g("leasehold_batch_rows_sum") / g("leasehold_batch_rows_count"),
        1e3 * g("leasehold_batch_write_duration_seconds_sum") / writes,
        writes - g("leasehold_batch_write_duration_seconds_bucket{le=\"0.25\"}"),
        g("leasehold_messages_received_total"),
        g("leasehold_messages_duplicate_total"),
        g("leasehold_messages_overflow_total"),
        g("leasehold_mqtt_reconnects_total"),
    )
}

pub async fn stop_node(node: &mut NodeProc) -> Result<()> {
    node.signal(libc::SIGTERM);
    node.wait_exit(Duration::from_secs(15)).await?;
    Ok(())
}

pub async fn wait_leading(node: &NodeProc) -> Result<()> {
    eventually(
        Duration::from_secs(30),
        "the leader connected and subscribed",
        || leading_and_subscribed(node.http_port()),
    )
    .await?;
    Ok(())
}

/// One live run of the per-message upsert in its own session: `n` messages at `rate` (0: as fast
/// as the publisher goes), for at most `max_secs` after the first.
pub async fn upsert_run(
    rig: &Rig<'_>,
    run: &str,
    n: u64,
    rate: u64,
    max_secs: u64,
) -> Result<ChildReport> {
    let port = rig.mq.port;
    let session = format!("bench-{run}");
    create_session(port, &session).await?;
    let child = tokio::spawn(child::spawn(Child::Upsert {
        port,
        pg_url: rig.pg.url(),
        client_id: session.clone(),
        n,
        max_secs,
    }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish(port, run, n, rate).await?;
    let report = child.await??;
    drop_session(port, &session).await?;
    check_upsert_wrote(&rig.db, run, report.messages).await?;
    Ok(report)
}
