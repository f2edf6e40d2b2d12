//! Subscriptions of a large fleet, reconciled on every connect, and refused by the broker: the
//! real binary against real PostgreSQL and Mosquitto.

use std::time::Duration;

use crate::helpers::{check, msg, Cluster};
use anyhow::{ensure, Context, Result};
use leasehold_testkit::publish::{numbered, numbered_from, publish_all};
use leasehold_testkit::{eventually, http, metric, Mosquitto, Postgres};

/// The topic of fleet device `i`.
fn fleet_topic(i: usize) -> String {
    format!("fleet/dev-{i:05}/data")
}

/// Applies the migrations and fills `devices` with `n` enabled devices.
async fn fleet_rows(c: &Cluster, n: usize) -> Result<()> {
    let out = c.cli(&["migrate"])?;
    ensure!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = c.pg.client().await?;
    db.execute(
        "INSERT INTO devices (device_id, topic)
         SELECT 'dev-' || lpad(i::text, 5, '0'), 'fleet/dev-' || lpad(i::text, 5, '0') || '/data'
         FROM generate_series(0, $1 - 1) AS i",
        &[&(n as i32)],
    )
    .await?;
    Ok(())
}

/// Waits until `node` is connected and its session has exactly `subscribed` filters granted,
/// after at least `reconnects` reconnections.
async fn wait_subscribed(
    c: &Cluster,
    node: &str,
    subscribed: usize,
    reconnects: f64,
) -> Result<()> {
    let port = c.node(node).http_port();
    eventually(
        Duration::from_secs(60),
        &format!("{subscribed} topic filters subscribed after {reconnects} reconnect(s)"),
        || async move {
            let (_, m) = http(port, "GET", "/metrics").await?;
            Ok(metric(&m, "leasehold_mqtt_connected") == Some(1.0)
                && metric(&m, "leasehold_mqtt_reconnects_total").unwrap_or(0.0) >= reconnects
                && metric(&m, "leasehold_mqtt_subscribed_topics") == Some(subscribed as f64)
                // Absent before the ledger existed: then the line above is all there is.
                && metric(&m, "leasehold_mqtt_subscriptions_pending").unwrap_or(0.0) == 0.0)
        },
    )
    .await?;
    Ok(())
}

/// 30 readings of `run` (the `round`-th), each on the topic of another device of an `n`-device
/// fleet, with timestamps of their own.
fn readings(run: &str, round: i64, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..30u64)
        .map(|s| {
            let i = (s as usize * 7919) % n;
            let base = 1_700_000_000_000_000 + round * 1_000_000_000;
            msg(
                &fleet_topic(i),
                numbered_from(base, run, &format!("dev-{i:05}"), s),
            )
        })
        .collect()
}

/// The fleet stays subscribed across a broker restart that keeps the session and one that
/// loses it: every reading on a device topic is stored exactly once.
async fn a_fleet_keeps_ingesting_across_broker_restarts(n: usize) {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        fleet_rows(&c, n).await?;
        c.spawn("node-a")?;
        c.wait_leader().await?;
        let started = std::time::Instant::now();
        wait_subscribed(&c, "node-a", n + 1, 0.0).await?;
        println!("{n} device topics subscribed in {:?}", started.elapsed());
        publish_all(c.mq.port, readings("fleet-1", 1, n)).await?;
        c.assert_exactly_once("fleet-1", 30).await?;

        // Restarted with its persistence: the session and its subscriptions are kept, and the
        // ledger says so; nothing needs to be sent again.
        c.mq.stop();
        c.mq.start_again().await?;
        wait_subscribed(&c, "node-a", n + 1, 1.0).await?;
        publish_all(c.mq.port, readings("fleet-2", 2, n)).await?;
        c.assert_exactly_once("fleet-2", 30).await?;

        // Restarted without its session (a lost disk): everything is subscribed again, in
        // packets that fit.
        c.mq.stop();
        c.mq.forget_sessions()?;
        c.mq.start_again().await?;
        wait_subscribed(&c, "node-a", n + 1, 2.0).await?;
        publish_all(c.mq.port, readings("fleet-3", 3, n)).await?;
        c.assert_exactly_once("fleet-3", 30).await?;

        let log = c.node("node-a").log();
        ensure!(log.contains("topics loaded"), "no 'topics loaded' line");
        ensure!(
            log.lines()
                .any(|l| l.contains("topics subscribed") && l.contains(&n.to_string())),
            "no 'topics subscribed' line with the device count"
        );
        let db = c.pg.client().await?;
        let ledger: i64 = db
            .query_one(
                "SELECT count(*) FROM mqtt_subscriptions WHERE state = 'subscribed'",
                &[],
            )
            .await?
            .get(0);
        ensure!(
            ledger == n as i64 + 1,
            "ledger has {ledger} subscribed rows"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_3000_devices_keeps_ingesting_across_broker_restarts() {
    a_fleet_keeps_ingesting_across_broker_restarts(3_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_20000_devices_keeps_ingesting_across_broker_restarts() {
    a_fleet_keeps_ingesting_across_broker_restarts(20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_disabled_while_no_leader_is_connected_is_unsubscribed_by_the_next_leader() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        let out = c.cli(&["migrate"])?;
        ensure!(out.status.success(), "migrate");
        let db = c.pg.client().await?;
        for d in ["pump-1", "pump-2", "pump-3"] {
            db.execute(
                "INSERT INTO devices (device_id, topic) VALUES ($1, 'plant/' || $1 || '/data')",
                &[&d],
            )
            .await?;
        }
        c.spawn("node-a")?;
        c.wait_leader().await?;
        wait_subscribed(&c, "node-a", 4, 0.0).await?;
        c.node("node-a").signal(libc::SIGTERM);
        c.node_mut("node-a")
            .wait_exit(Duration::from_secs(10))
            .await?;

        // While no leader is connected: one device disabled, one deleted.
        db.execute(
            "UPDATE devices SET enabled = false WHERE device_id = 'pump-1'",
            &[],
        )
        .await?;
        db.execute("DELETE FROM devices WHERE device_id = 'pump-3'", &[])
            .await?;

        c.spawn("node-b")?;
        c.wait_leader().await?;
        wait_subscribed(&c, "node-b", 2, 0.0).await?;
        // The session must no longer receive them: published first, then a reading on a kept
        // topic, which the broker delivers after them if they were still subscribed.
        publish_all(
            c.mq.port,
            vec![
                msg("plant/pump-1/data", numbered("gone", "pump-1", 0)),
                msg("plant/pump-3/data", numbered("gone", "pump-3", 1)),
                msg("plant/pump-2/data", numbered("kept", "pump-2", 0)),
                msg("devices/d9/telemetry", numbered("kept", "d9", 1)),
            ],
        )
        .await?;
        c.assert_exactly_once("kept", 2).await?;
        let gone = c
            .count("SELECT count(*) FROM telemetry WHERE payload->>'run' = 'gone'")
            .await?;
        ensure!(
            gone == 0,
            "{gone} reading(s) of disabled/deleted devices stored: the session kept their subscriptions"
        );
        let rows: Vec<String> = db
            .query(
                "SELECT topic_filter FROM mqtt_subscriptions ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ensure!(
            rows == vec!["devices/+/telemetry", "plant/pump-2/data"],
            "ledger: {rows:?}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A broker that refuses one filter.
async fn broker_refusing(filter: &str) -> Result<Mosquitto> {
    Mosquitto::start_refusing(serde_json::json!([
        {"acltype": "subscribeLiteral", "topic": filter, "allow": false, "priority": 0}
    ]))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_the_broker_refuses_is_reported_counted_alerted_and_the_rest_flows() {
    let secret = "plant/secret/data";
    let mq = broker_refusing(secret).await.expect("broker");
    let pg = Postgres::start().await.expect("postgres");
    let mut c = Cluster::with_servers(pg, mq).expect("cluster");
    let res = async {
        let out = c.cli(&["migrate"])?;
        ensure!(out.status.success(), "migrate");
        let db = c.pg.client().await?;
        db.execute(
            "INSERT INTO devices (device_id, topic) VALUES ('ok', 'plant/ok/data'), ('secret', $1)",
            &[&secret],
        )
        .await?;
        c.spawn("node-a")?;
        c.wait_leader().await?;
        let port = c.node("node-a").http_port();

        // /health/mqtt names the filter, with the broker's answer, and retries it.
        let body = std::sync::Mutex::new(String::new());
        eventually(
            Duration::from_secs(20),
            "the refused filter in /health/mqtt, retried",
            || async {
                let (code, b) = http(port, "GET", "/health/mqtt").await?;
                let v: serde_json::Value = serde_json::from_str(&b)?;
                let failed = &v["subscriptions"]["failed"];
                let ok = code == 503
                    && failed[0]["filter"] == secret
                    && failed[0]["attempts"].as_u64().unwrap_or(0) >= 2
                    && v["subscriptions"]["subscribed"] == 2;
                *body.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = b;
                Ok(ok)
            },
        )
        .await
        .with_context(|| {
            format!(
                "last /health/mqtt: {}",
                body.lock().map(|b| b.clone()).unwrap_or_default()
            )
        })?;
        let b = body.lock().map(|b| b.clone()).unwrap_or_default();
        ensure!(b.contains("0x80"), "no SUBACK code in {b}");

        let (_, m) = http(port, "GET", "/metrics").await?;
        ensure!(
            metric(&m, "leasehold_mqtt_subscribe_failures_total").unwrap_or(0.0) >= 2.0,
            "failures not counted"
        );
        ensure!(
            metric(&m, "leasehold_mqtt_subscribed_topics") == Some(2.0),
            "a refused filter counted as subscribed"
        );

        let (code, report) = http(port, "POST", "/health/alerts/check").await?;
        ensure!(code == 200, "alerts check: {code} {report}");
        let (_, alerts) = http(port, "GET", "/health/alerts").await?;
        let v: serde_json::Value = serde_json::from_str(&alerts)?;
        let open = v["open"].as_array().cloned().unwrap_or_default();
        let alert = open
            .iter()
            .find(|a| a["kind"] == "mqtt_subscription_refused")
            .with_context(|| format!("no mqtt_subscription_refused alert open: {alerts}"))?;
        ensure!(
            alert["message"].as_str().unwrap_or("").contains(secret),
            "the alert does not name the filter: {alert}"
        );
        ensure!(
            c.node("node-a")
                .log()
                .contains("broker refused topic filter"),
            "no log line"
        );

        // The other topics keep flowing.
        publish_all(
            c.mq.port,
            vec![
                msg(secret, numbered("refused", "secret", 0)),
                msg("plant/ok/data", numbered("flow", "ok", 0)),
                msg("devices/d1/telemetry", numbered("flow", "d1", 1)),
            ],
        )
        .await?;
        c.assert_exactly_once("flow", 2).await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_topic_the_broker_would_disconnect_for_is_ignored_and_the_others_flow() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        let out = c.cli(&["migrate"])?;
        ensure!(out.status.success(), "migrate");
        let db = c.pg.client().await?;
        // A trailing newline from a spreadsheet import: Mosquitto drops the connection of a
        // client that subscribes to it, and every reconnect would send it again.
        db.execute(
            "INSERT INTO devices (device_id, topic) VALUES ('ok', 'plant/ok/data'),
                    ('bad', E'plant/bad\\n/data')",
            &[],
        )
        .await?;
        c.spawn("node-a")?;
        c.wait_leader().await?;
        wait_subscribed(&c, "node-a", 2, 0.0).await?;
        publish_all(
            c.mq.port,
            vec![
                msg("plant/ok/data", numbered("flow", "ok", 0)),
                msg("devices/d1/telemetry", numbered("flow", "d1", 1)),
            ],
        )
        .await?;
        c.assert_exactly_once("flow", 2).await?;
        let (_, m) = http(c.node("node-a").http_port(), "GET", "/metrics").await?;
        ensure!(
            metric(&m, "leasehold_mqtt_reconnects_total") == Some(0.0),
            "the connection was dropped"
        );
        ensure!(
            c.node("node-a")
                .log()
                .contains("ignoring invalid topic in devices"),
            "the bad topic is not reported"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}
