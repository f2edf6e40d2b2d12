//! The environment reused across trials: testkit's [`Cluster`] harness (a private PostgreSQL with
//! commit timestamps, a private Mosquitto with the project's broker configuration, the node logs
//! and the settings every node gets), and `leasehold` nodes each behind its own TCP proxies to
//! the database and the broker, healed back to a connected pair between trials.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use leasehold_testkit::cluster::Cluster;
use leasehold_testkit::proxy::Proxy;
use leasehold_testkit::{eventually, leading_and_subscribed, Dir, Mosquitto, NodeProc, Postgres};

use crate::{KEEP_ALIVE, POLL, STEP_DOWN_AFTER, TTL};

pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) proc: Option<NodeProc>,
    pub(crate) db: Proxy,
    pub(crate) mqtt: Proxy,
    pub(crate) extra: Vec<(&'static str, String)>,
}

/// The servers and nodes, reused across trials.
pub struct Env {
    /// The servers, the logs, the binary and the settings of every node. The nodes are this
    /// crate's own, not the cluster's: each reaches the servers through its proxies.
    pub cluster: Cluster,
    pub(crate) nodes: Vec<Node>,
    pub(crate) db: tokio_postgres::Client,
}

impl Env {
    pub async fn new(bin: &Path) -> Result<Env> {
        let pg = Postgres::start_with("track_commit_timestamp = on").await?;
        let mq = Mosquitto::start().await?;
        let mut logs = Dir::temp("leasehold-chaos-")?;
        if let (Some(_), Dir::Temp(t)) = (std::env::var_os("CHAOS_KEEP_LOGS"), &mut logs) {
            t.disable_cleanup(true);
            eprintln!("chaos: node logs kept in {}", t.path().display());
        }
        let db = pg.client().await?;
        let mut cluster = Cluster::new(bin, pg, mq, logs);
        cluster.settings = settings();
        let mut env = Env {
            cluster,
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
        self.cluster.logs.path()
    }

    async fn add_node(&mut self, name: &str) -> Result<()> {
        self.add_node_stopped(name).await?;
        self.relaunch(name)
    }

    /// (Re)starts the node `name` with its current extra settings.
    pub(crate) fn relaunch(&mut self, name: &str) -> Result<()> {
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .context("no such node")?;
        launch(&self.cluster, &mut self.nodes[i])
    }
}

/// The matrix's settings: short lease timings, so many trials fit in minutes.
fn settings() -> Vec<(&'static str, String)> {
    vec![
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
    ]
}

/// Starts `node` with the cluster's settings, reaching the servers through its proxies.
fn launch(cluster: &Cluster, node: &mut Node) -> Result<()> {
    let mut env = cluster.env();
    env.push((
        "DATABASE_URL",
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?connect_timeout=2",
            node.db.port
        ),
    ));
    env.push(("MQTT_URL", format!("mqtt://127.0.0.1:{}", node.mqtt.port)));
    env.extend(node.extra.iter().cloned());
    node.proc = Some(NodeProc::spawn(
        &cluster.bin,
        &node.name,
        &env,
        cluster.logs.path(),
    )?);
    Ok(())
}

impl Env {
    pub(crate) fn node(&mut self, name: &str) -> Result<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .context("no such node")
    }

    /// A leader that is connected to the broker.
    pub(crate) async fn wait_leader(&self) -> Result<(String, i64)> {
        eventually(
            Duration::from_secs(30),
            "a leader connected to the broker and subscribed",
            || async {
                let Some((name, _)) = self.leader().await? else {
                    return Ok(false);
                };
                let Some(n) = self.nodes.iter().find(|n| n.name == name) else {
                    return Ok(false);
                };
                let Some(p) = &n.proc else { return Ok(false) };
                leading_and_subscribed(p.http_port()).await
            },
        )
        .await?;
        self.leader().await?.context("leader vanished")
    }

    /// Back to two healthy nodes, clean proxies, servers up, a connected leader.
    pub(crate) async fn heal(&mut self) -> Result<(String, i64)> {
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
                    launch(&self.cluster, &mut n)?;
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
    pub(crate) async fn add_node_stopped(&mut self, name: &str) -> Result<()> {
        let db = Proxy::start(self.cluster.pg.port).await?;
        let mqtt = Proxy::start(self.cluster.mq.port).await?;
        self.nodes.push(Node {
            name: name.to_string(),
            proc: None,
            db,
            mqtt,
            extra: Vec::new(),
        });
        Ok(())
    }

    pub(crate) async fn reconnect_db(&mut self) -> Result<()> {
        self.db = self.cluster.pg.client().await?;
        Ok(())
    }
}
