//! `make demo`: a local Leasehold cluster under `.demo/` — its own PostgreSQL and Mosquitto, two
//! nodes and two device simulators — with a status line every few seconds. Ctrl-C stops
//! everything.
//!
//! The nodes start with the default route only (`devices/+/telemetry` into Leasehold's own
//! `telemetry`); the first imports its settings as the cluster configuration's version 1. Ten
//! seconds in, the demo adds a second route live with `leasehold config apply
//! .demo/cluster.toml`, no node restarted: into a table the operator already owns, shaped like the
//! `equipamentos_dados` of the system Leasehold replaces (`equipamentos/+/dados`, key
//! `(equipamento_id, timestamp_dados)`), and starts that route's devices.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use leasehold_testkit::cluster::Cluster;
use leasehold_testkit::{
    free_port, http, leading_and_subscribed, metric, Dir, Mosquitto, Postgres,
};

/// The table the replaced system wrote and its readers still read.
const EQUIPMENT_TABLE: &str = "CREATE TABLE IF NOT EXISTS equipamentos_dados (
    equipamento_id  text        NOT NULL,
    timestamp_dados timestamptz NOT NULL,
    dados           jsonb       NOT NULL,
    fonte           text,
    processed_by    text,
    UNIQUE (equipamento_id, timestamp_dados))";

/// The cluster configuration the demo applies live: one route into that table; the default
/// route stays.
const ROUTES: &str = r#"# Written by `make demo` and applied with `leasehold config apply` while the nodes run.
# Messages on equipamentos/+/dados go into the operator's own table; everything else subscribed
# (devices/+/telemetry) goes to the default route, Leasehold's telemetry.
mqtt_topics = ["devices/+/telemetry"]

[[routes]]
name = "equipment"
topics = ["equipamentos/+/dados"]
table = "equipamentos_dados"
key = ["equipamento_id", "timestamp_dados"]
on_conflict = "update"

[routes.columns]
equipamento_id = "topic[1]"
timestamp_dados = "timestamp"
dados = "payload"
fonte = "'MQTT'"
processed_by = "written_by"
"#;

/// Starts `leasehold simulate` (until stopped) with `args`, its output into `log`.
fn simulator(
    bin: &std::path::Path,
    mqtt_url: &str,
    log: &std::path::Path,
    args: &[&str],
) -> Result<tokio::process::Child> {
    let log = std::fs::File::create(log)?;
    Ok(tokio::process::Command::new(bin)
        .arg("simulate")
        .args(args)
        .args(["--count", "0", "--progress-every", "5"])
        .env("MQTT_URL", mqtt_url)
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()?)
}

fn port_or_free(p: u16) -> u16 {
    if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
        p
    } else {
        free_port().unwrap_or(p)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let root = PathBuf::from(std::env::var("DEMO_DIR").unwrap_or_else(|_| ".demo".into()));
    let root = std::fs::canonicalize(".")?.join(root);
    let bin = PathBuf::from(
        std::env::var("LEASEHOLD_BIN").unwrap_or_else(|_| "target/release/leasehold".into()),
    );
    let bin =
        std::fs::canonicalize(&bin).with_context(|| format!("{} not built", bin.display()))?;
    let (mut c, config, logs) = start(&root, &bin).await?;
    wait_subscribed(&c).await?;
    let mut sim = simulator(
        &bin,
        &c.mq.url(),
        &logs.join("simulator.log"),
        &["--devices", "20", "--rate", "50", "--invalid-every", "500"],
    )?;
    print_banner(&c, &bin, &config, &logs);

    let db = c.pg.client().await?;
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    let started = std::time::Instant::now();
    let mut sim_equipment: Option<tokio::process::Child> = None;
    loop {
        let equipment_stopped = async {
            match sim_equipment.as_mut() {
                Some(s) => s.wait().await.map(|_| ()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sim.wait() => { eprintln!("demo: simulator stopped"); break; }
            _ = equipment_stopped => { eprintln!("demo: equipment simulator stopped"); break; }
            _ = tick.tick() => {}
        }
        println!("{}", progress(&mut c, &db).await);
        if sim_equipment.is_none() && started.elapsed() >= Duration::from_secs(10) {
            add_route_live(&c, &bin, &config).await?;
            sim_equipment = Some(simulator(
                &bin,
                &c.mq.url(),
                &logs.join("simulator-equipamentos.log"),
                &[
                    "--devices",
                    "5",
                    "--rate",
                    "10",
                    "--topic",
                    "equipamentos/{device}/dados",
                ],
            )?);
        }
    }
    eprintln!("demo: stopping nodes, simulator, Mosquitto and PostgreSQL");
    let _ = sim.kill().await;
    if let Some(mut s) = sim_equipment {
        let _ = s.kill().await;
    }
    for n in &c.nodes {
        n.signal(libc::SIGTERM);
    }
    for n in &mut c.nodes {
        let _ = n.wait_exit(Duration::from_secs(10)).await;
    }
    // The nodes before the servers they use.
    c.nodes.clear();
    drop(c);
    Ok(())
}

/// The servers, the operator's own table, the demo's routes and two nodes: the cluster, the
/// routes file and the log directory.
async fn start(root: &Path, bin: &Path) -> Result<(Cluster, PathBuf, PathBuf)> {
    eprintln!(
        "demo: starting PostgreSQL and Mosquitto under {}",
        root.display()
    );
    let pg = Postgres::start_durable(Dir::fixed(root.join("postgres"))?).await?;
    let mq = Mosquitto::start_with(Dir::fixed(root.join("mosquitto"))?, "").await?;
    // The operator's own table, as the system Leasehold replaces created it: Leasehold creates
    // nothing here, it is pointed at the table by the route below.
    pg.client()
        .await?
        .batch_execute(EQUIPMENT_TABLE)
        .await
        .context("creating equipamentos_dados")?;
    let config = root.join("cluster.toml");
    std::fs::write(&config, ROUTES).context("writing the demo's cluster configuration")?;
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs)?;
    // The logs of earlier runs stay: a node appends to its log.
    let mut c = Cluster::new(bin, pg, mq, Dir::Fixed(logs.clone()));
    c.settings = vec![
        ("LEASE_TTL", "6s".into()),
        ("LEASE_POLL_INTERVAL", "500ms".into()),
        ("LOG_FORMAT", "pretty".into()),
        ("LOG_LEVEL", "info".into()),
    ];
    for (name, port) in [("node-a", 8081), ("node-b", 8082)] {
        let port = port_or_free(port);
        c.spawn_with(name, &[("HTTP_ADDR", format!("127.0.0.1:{port}"))])?;
    }
    Ok((c, config, logs))
}

/// `leasehold config apply` of the demo's route while the nodes run, then waits until every node
/// runs the active version (each node's `/health`).
async fn add_route_live(c: &Cluster, bin: &Path, config: &Path) -> Result<()> {
    eprintln!(
        "demo: adding the route \"equipment\" live: {} config apply {}",
        bin.display(),
        config.display()
    );
    let out = tokio::process::Command::new(bin)
        .args(["config", "apply"])
        .arg(config)
        .env("DATABASE_URL", c.pg.url())
        .output()
        .await?;
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "config apply failed");
    let ports: Vec<u16> = c.nodes.iter().map(|n| n.http_port()).collect();
    leasehold_testkit::eventually(
        Duration::from_secs(30),
        "every node runs the new version",
        || {
            let ports = ports.clone();
            let db = c.pg.client();
            async move {
                let active: Option<i64> = db
                    .await?
                    .query_one("SELECT max(version) FROM cluster_config", &[])
                    .await?
                    .get(0);
                for p in ports {
                    let (_, body) = http(p, "GET", "/health").await?;
                    let h: serde_json::Value = serde_json::from_str(&body)?;
                    if h["config"]["version"].as_i64() != active {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        },
    )
    .await?;
    eprintln!(
        "demo: every node runs it, none restarted; starting 5 devices on equipamentos/+/dados"
    );
    Ok(())
}

/// Publishing starts once a leader's shared session is subscribed, so the broker queues every
/// message (what is published before the first SUBACK is not queued for the session).
async fn wait_subscribed(c: &Cluster) -> Result<()> {
    eprintln!("demo: waiting for a leader subscribed to its topics");
    let ports: Vec<u16> = c.nodes.iter().map(|n| n.http_port()).collect();
    leasehold_testkit::eventually(
        Duration::from_secs(60),
        "a leader subscribed to its topics",
        || {
            let ports = ports.clone();
            async move {
                for p in ports {
                    if leading_and_subscribed(p).await.unwrap_or(false) {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
        },
    )
    .await?;
    Ok(())
}

/// What runs where, and the commands to try.
fn print_banner(c: &Cluster, bin: &Path, config: &Path, logs: &Path) {
    println!();
    println!("Leasehold demo is running. Ctrl-C stops everything it started.");
    println!("  PostgreSQL  {}", c.pg.url());
    println!("  Mosquitto   {}", c.mq.url());
    for n in &c.nodes {
        println!(
            "  {:<10}  pid {:<7} http://127.0.0.1:{}/health   /metrics   log {}/{}.log",
            n.name,
            n.pid(),
            n.http_port(),
            logs.display(),
            n.name
        );
    }
    println!("  simulator   20 devices, 50 msg/s on devices/+/telemetry, every 500th message malformed (dead letter); log {}/simulator.log", logs.display());
    println!("  in 10 s     `leasehold config apply {}` adds the route \"equipment\" (into equipamentos_dados) live,", config.display());
    println!("              then 5 devices publish 10 msg/s on equipamentos/+/dados; log {}/simulator-equipamentos.log", logs.display());
    println!();
    println!("Watch failover: kill -9 the leader's pid below; the other node takes over within LEASE_TTL (6s) + poll.");
    println!("  {} status --database-url '{}'", bin.display(), c.pg.url());
    println!(
        "  {} config history --database-url '{}'",
        bin.display(),
        c.pg.url()
    );
    println!(
        "  {} step-down --database-url '{}'",
        bin.display(),
        c.pg.url()
    );
    println!();
}

/// One progress line: the leader, the rows in each table, each node's state.
async fn progress(c: &mut Cluster, db: &tokio_postgres::Client) -> String {
    let leader = c
        .leader()
        .await
        .ok()
        .flatten()
        .map(|(name, epoch)| format!("{name} (epoch {epoch})"))
        .unwrap_or_else(|| "none".into());
    let count = |table: &'static str| async move {
        db.query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(-1)
    };
    let rows = count("telemetry").await;
    let equipment = count("equipamentos_dados").await;
    let dead = count("dead_letters").await;
    let mut alive = Vec::new();
    for n in &mut c.nodes {
        let state = match n.try_status() {
            Some(s) => format!("exited ({s})"),
            None => match http(n.http_port(), "GET", "/metrics").await {
                Ok((_, m)) if metric(&m, "leasehold_lease_is_leader") == Some(1.0) => {
                    format!("LEADER pid {}", n.pid())
                }
                Ok(_) => format!("standby pid {}", n.pid()),
                Err(_) => "not answering".into(),
            },
        };
        alive.push(format!("{}: {state}", n.name));
    }
    format!(
        "leader {leader:<22} telemetry {rows:<8} equipamentos_dados {equipment:<7} dead letters {dead:<5} | {}",
        alive.join(" | ")
    )
}
