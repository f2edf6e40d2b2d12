//! The cluster's identity (docs/configuration.md, "The MQTT client id"): the default MQTT client id comes from an identity
//! stored in the cluster's database, so a node pointed at another database is another cluster
//! to the broker and can never take the production session.

use std::time::Duration;

use crate::helpers::{check, Cluster};
use anyhow::{ensure, Context, Result};
use leasehold_testkit::publish::{numbered, publish_all};
use leasehold_testkit::{eventually, http, metric, Postgres};
use serde_json::Value;

async fn get_json(port: u16, path: &str) -> Result<(u16, Value)> {
    let (code, body) = http(port, "GET", path).await?;
    let v = serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))?;
    Ok((code, v))
}

/// Waits until `name` answers /health 200 and has subscribed to its topics.
async fn wait_subscribed(c: &Cluster, name: &str) -> Result<()> {
    let port = c.node(name).http_port();
    eventually(
        Duration::from_secs(30),
        &format!("{name} connected and subscribed"),
        || async move {
            let (code, _) = http(port, "GET", "/health").await?;
            let (_, v) = get_json(port, "/health/mqtt").await?;
            Ok(code == 200 && v["subscribed_topics"].as_i64().unwrap_or(0) > 0)
        },
    )
    .await?;
    Ok(())
}

/// (client id, "derived" | "explicit") as the node reports it on /health/mqtt.
async fn client_id_of(c: &Cluster, name: &str) -> Result<(String, String)> {
    let (_, v) = get_json(c.node(name).http_port(), "/health/mqtt").await?;
    let field = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .with_context(|| format!("{name}: /health/mqtt has no {k}: {v}"))
    };
    Ok((field("client_id")?, field("client_id_source")?))
}

/// The seeds' incident (issue 10, item 5): a laptop started with a copy of the production env
/// file but its own database leads its own lease. Before the cluster identity it connected with
/// the production client id, took over the production session and acknowledged production's
/// messages into its own database (1,574 of 8,000 missing from production).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_laptop_with_the_production_env_and_its_own_database_cannot_take_the_production_session()
{
    let mut c = Cluster::start().await.expect("servers");
    let laptop_db = Postgres::start().await.expect("the laptop's postgres");
    let res = async {
        c.spawn("prod-a")?;
        c.wait_leader().await?;
        wait_subscribed(&c, "prod-a").await?;
        // The production environment, word for word, except DATABASE_URL.
        c.spawn_with("laptop", &[("DATABASE_URL", laptop_db.url())])?;
        eventually(
            Duration::from_secs(30),
            "the laptop leading its own lease",
            || async {
                let db = laptop_db.client().await?;
                let leader = leasehold_store::current_leader(&db, leasehold_testkit::LEASE_NAME);
                Ok(leader.await?.is_some())
            },
        )
        .await?;
        wait_subscribed(&c, "laptop").await?;

        const N: u64 = 8_000;
        for chunk in 0..16u64 {
            let msgs = (chunk * 500..(chunk + 1) * 500)
                .map(|seq| {
                    let device = format!("dev-{:02}", seq % 20);
                    (
                        format!("devices/{device}/telemetry"),
                        numbered("identity", &device, seq).into_bytes(),
                    )
                })
                .collect();
            publish_all(c.mq.port, msgs).await?;
        }
        c.assert_exactly_once("identity", N).await?;

        // Production was never displaced from its session.
        let (_, m) = http(c.node("prod-a").http_port(), "GET", "/metrics").await?;
        ensure!(
            metric(&m, "leasehold_mqtt_client_id_conflicts_total") == Some(0.0),
            "prod-a saw its client id taken"
        );
        ensure!(
            !c.mq
                .log()
                .contains("already connected, closing old connection"),
            "the broker handed a session over"
        );
        // Two clusters, two client ids, both derived from their own database.
        let prod = client_id_of(&c, "prod-a").await?;
        let laptop = client_id_of(&c, "laptop").await?;
        ensure!(
            prod.0 != laptop.0,
            "both nodes use the client id {}",
            prod.0
        );
        ensure!(
            prod.1 == "derived" && laptop.1 == "derived",
            "{prod:?} {laptop:?}"
        );
        // The laptop is a cluster of its own: it stored what it received in its own database,
        // and the broker log names both sessions.
        let db = laptop_db.client().await?;
        let laptop_rows: i64 = db
            .query_one("SELECT count(*) FROM telemetry", &[])
            .await?
            .get(0);
        ensure!(laptop_rows > 0, "the laptop stored nothing");
        let broker = c.mq.log();
        for id in [&prod.0, &laptop.0] {
            ensure!(
                broker.contains(&format!(" as {id} ")),
                "broker log lacks {id}"
            );
        }
        Ok(())
    }
    .await;
    check(&c, res);
}

async fn stored_identity(pg: &Postgres) -> Result<String> {
    let db = pg.client().await?;
    Ok(db
        .query_one("SELECT cluster_id::text FROM cluster_identity", &[])
        .await?
        .get(0))
}

fn migrate(url: &str) -> Result<()> {
    let out = std::process::Command::new(crate::helpers::BIN)
        .args(["migrate", "--database-url", url])
        .output()?;
    ensure!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn status_json(c: &Cluster) -> Result<Value> {
    let out = c.cli(&["status", "--json"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).with_context(|| format!("status --json: {text}"))
}

/// The identity is created once: migrating again, restarting the database and the nodes keep it
/// (the broker session is found again); another database gets another one. An explicit
/// MQTT_CLIENT_ID is used and warned about; without an identity a production node does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_identity_survives_restarts_and_differs_between_databases() {
    let mut c = Cluster::start().await.expect("servers");
    let other = Postgres::start().await.expect("second postgres");
    let res = async {
        migrate(&c.pg.url())?;
        migrate(&c.pg.url())?;
        let id = stored_identity(&c.pg).await?;
        let status = status_json(&c)?;
        ensure!(status["cluster"]["id"] == id.as_str(), "{status}");
        let default = status["cluster"]["default_client_id"]
            .as_str()
            .context("default_client_id")?
            .to_string();
        ensure!(default.len() <= 23, "{default} is longer than 23");

        c.spawn("node-a")?;
        c.wait_leader().await?;
        ensure!(client_id_of(&c, "node-a").await? == (default.clone(), "derived".into()));
        let log = c.node("node-a").log();
        ensure!(
            log.contains(&default) && log.contains("derived from the cluster identity"),
            "the start-up log does not name the client id"
        );

        // Restart the node and the database, migrate again: the same identity, the same id.
        c.node_mut("node-a").kill9();
        c.pg.stop()?;
        c.pg.start_again().await?;
        migrate(&c.pg.url())?;
        ensure!(stored_identity(&c.pg).await? == id, "the identity changed");
        c.spawn("node-a-again")?;
        c.wait_leader().await?;
        ensure!(client_id_of(&c, "node-a-again").await? == (default.clone(), "derived".into()));

        // Another database is another cluster.
        migrate(&other.url())?;
        let other_id = stored_identity(&other).await?;
        ensure!(other_id != id, "two databases share the identity {id}");
        let other_default = leasehold_config::derive_client_id(&other_id, "mqtt-ingest")?;
        ensure!(other_default != default);

        // An explicit MQTT_CLIENT_ID wins, and is warned about in the log, /health and status.
        c.spawn_with("pinned", &[("MQTT_CLIENT_ID", "plant-7".into())])?;
        let port = c.node("pinned").http_port();
        eventually(
            Duration::from_secs(30),
            "pinned serving HTTP",
            || async move { Ok(http(port, "GET", "/health/live").await.is_ok()) },
        )
        .await?;
        ensure!(client_id_of(&c, "pinned").await? == ("plant-7".into(), "explicit".into()));
        let (_, health) = get_json(c.node("pinned").http_port(), "/health").await?;
        ensure!(
            health["warnings"][0]
                .as_str()
                .is_some_and(|w| w.contains("MQTT_CLIENT_ID=plant-7")),
            "{health}"
        );
        ensure!(
            c.node("pinned")
                .log()
                .contains("MQTT_CLIENT_ID=plant-7 is set explicitly"),
            "no warning in the log"
        );
        eventually(
            Duration::from_secs(10),
            "status warning about the explicit client id",
            || async {
                let out = c.cli(&["status"])?;
                let text = String::from_utf8_lossy(&out.stdout);
                Ok(text.contains("WARNING  pinned uses MQTT_CLIENT_ID=plant-7")
                    && text.contains("client id plant-7 (explicit)")
                    && text.contains(&format!("client id {default} (derived)"))
                    && text.contains(&format!("default MQTT client id {default}")))
            },
        )
        .await?;

        // Without its identity a production node does not start: it never connects with a
        // default id it could not derive from its own database.
        other
            .client()
            .await?
            .execute("DELETE FROM cluster_identity", &[])
            .await?;
        c.spawn_with("orphan", &[("DATABASE_URL", other.url())])?;
        let exit = c
            .node_mut("orphan")
            .wait_exit(Duration::from_secs(30))
            .await?;
        ensure!(!exit.success(), "started without an identity");
        ensure!(
            c.node("orphan").log().contains("no cluster identity"),
            "the refusal does not say why"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// The shipped broker configuration (which every test's broker runs) bounds the queue a retired
/// cluster leaves at the broker, without expiring a live cluster's session within any outage it
/// must survive (docs/deployment.md, "Broker sessions").
#[test]
fn the_broker_config_expires_a_retired_clusters_session_but_not_within_an_outage() -> Result<()> {
    let conf = std::fs::read_to_string(leasehold_testkit::deploy_mosquitto_conf())?;
    let values: Vec<&str> = conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("persistent_client_expiration "))
        .collect();
    ensure!(
        values.len() == 1,
        "persistent_client_expiration set {} times",
        values.len()
    );
    let v = values[0].trim();
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().with_context(|| format!("{v:?}"))?;
    let hours = n * match unit {
        "h" => 1,
        "d" => 24,
        "w" => 24 * 7,
        "m" => 24 * 30,
        "y" => 24 * 365,
        _ => anyhow::bail!("{v:?}: unit must be h, d, w, m or y"),
    };
    // At least a long weekend without any leader; at most a month of a retired cluster's traffic.
    ensure!(
        (72..=24 * 31).contains(&hours),
        "persistent_client_expiration {v} is outside 3 days to 1 month"
    );
    Ok(())
}
