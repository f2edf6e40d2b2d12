//! The cluster's identity (SPEC section 4): the default MQTT client id comes from an identity
//! stored in the cluster's database, so a node pointed at another database is another cluster
//! to the broker and can never take the production session.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{check, Cluster};
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
    let port = c.node(name).http_port;
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
    let (_, v) = get_json(c.node(name).http_port, "/health/mqtt").await?;
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
                Ok(db
                    .query_opt(
                        "SELECT 1 FROM instance_lock WHERE expires_at > clock_timestamp()",
                        &[],
                    )
                    .await?
                    .is_some())
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
        let (_, m) = http(c.node("prod-a").http_port, "GET", "/metrics").await?;
        for name in [
            "leasehold_mqtt_client_id_conflicts_total",
            "leasehold_mqtt_reconnects_total",
        ] {
            ensure!(metric(&m, name) == Some(0.0), "prod-a: {name} is not 0");
        }
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
