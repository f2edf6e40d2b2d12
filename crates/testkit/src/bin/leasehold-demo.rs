//! `make demo`: a local Leasehold cluster under `.demo/` — its own PostgreSQL and Mosquitto, two
//! nodes and a device simulator — with a status line every few seconds. Ctrl-C stops everything.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use leasehold_testkit::cluster::Cluster;
use leasehold_testkit::{
    free_port, http, leading_and_subscribed, metric, Dir, Mosquitto, Postgres,
};

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
    eprintln!(
        "demo: starting PostgreSQL and Mosquitto under {}",
        root.display()
    );
    let pg = Postgres::start_durable(Dir::fixed(root.join("postgres"))?).await?;
    let mq = Mosquitto::start_with(Dir::fixed(root.join("mosquitto"))?, "").await?;
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs)?;
    // The logs of earlier runs stay: a node appends to its log.
    let mut c = Cluster::new(&bin, pg, mq, Dir::Fixed(logs.clone()));
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
    // Start publishing once a leader's shared session is subscribed, so the broker queues every
    // message (what is published before the first SUBACK is not queued for the session).
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
    let sim_log = std::fs::File::create(logs.join("simulator.log"))?;
    let mut sim = tokio::process::Command::new(&bin)
        .args([
            "simulate",
            "--devices",
            "20",
            "--rate",
            "50",
            "--count",
            "0",
            "--invalid-every",
            "500",
            "--progress-every",
            "5",
        ])
        .env("MQTT_URL", c.mq.url())
        .stdout(Stdio::from(sim_log.try_clone()?))
        .stderr(Stdio::from(sim_log))
        .kill_on_drop(true)
        .spawn()?;

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
    println!("  simulator   20 devices, 50 msg/s, every 500th message malformed (dead letter); log {}/simulator.log", logs.display());
    println!();
    println!("Watch failover: kill -9 the leader's pid below; the other node takes over within LEASE_TTL (6s) + poll.");
    println!("  {} status --database-url '{}'", bin.display(), c.pg.url());
    println!(
        "  {} step-down --database-url '{}'",
        bin.display(),
        c.pg.url()
    );
    println!();

    let db = c.pg.client().await?;
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sim.wait() => { eprintln!("demo: simulator stopped"); break; }
            _ = tick.tick() => {}
        }
        let leader = c
            .leader()
            .await
            .ok()
            .flatten()
            .map(|(name, epoch)| format!("{name} (epoch {epoch})"))
            .unwrap_or_else(|| "none".into());
        let rows: i64 = db
            .query_one("SELECT count(*) FROM telemetry", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);
        let dead: i64 = db
            .query_one("SELECT count(*) FROM dead_letters", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);
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
        println!(
            "leader {leader:<22} rows {rows:<8} dead letters {dead:<5} | {}",
            alive.join(" | ")
        );
    }
    eprintln!("demo: stopping nodes, simulator, Mosquitto and PostgreSQL");
    let _ = sim.kill().await;
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
