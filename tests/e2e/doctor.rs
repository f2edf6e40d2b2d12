//! `leasehold doctor` and the same checks at start: against a broker with Mosquitto's default
//! queue limit and a small message size limit (problems), the shipped broker configuration (ok),
//! a database without standbys (a warning) and one with a real synchronous standby (shown in
//! doctor, `/health/database`, `leasehold status` and the gauges), and two clusters (two
//! databases) sharing one client id on one broker (the claim check).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use leasehold_testkit::{eventually, http, metric, Dir, Mosquitto, Postgres};
use serde_json::Value;

use crate::helpers::{check, Cluster};

/// PostgreSQL settings under which commits are durable (the test default turns them off).
const DURABLE: &str = "fsync = on\nfull_page_writes = on\nsynchronous_commit = on";

/// Runs `leasehold doctor --json` with the cluster's settings plus `extra`: (exit code, report).
fn doctor(c: &Cluster, extra: &[(&str, String)]) -> Result<(i32, Value)> {
    let out = c.cli_env(&["doctor", "--json"], extra)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "doctor --json: {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.code().unwrap_or(-1), v))
}

/// The check `id` of a report: (level, summary).
fn found(report: &Value, id: &str) -> Result<(String, String)> {
    let c = report["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id))
        .with_context(|| format!("no check {id} in {report}"))?;
    Ok((
        c["level"].as_str().unwrap_or("").to_string(),
        c["summary"].as_str().unwrap_or("").to_string(),
    ))
}

fn migrate(c: &Cluster, url: &str) -> Result<()> {
    let out = c.cli_env(&["migrate"], &[("DATABASE_URL", url.to_string())])?;
    ensure!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Mosquitto's default `max_queued_messages 1000` drops the probe's queue past 1,000, and a
/// `message_size_limit` below `MAX_PAYLOAD_BYTES` drops the large probe message: both problems,
/// exit 1; the human form names them one line each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_finds_the_default_queue_limit_and_a_small_message_limit() {
    let pg = Postgres::start_with(DURABLE).await.expect("postgres");
    let mq = Mosquitto::start_with(
        Dir::temp("leasehold-mqtt-").expect("dir"),
        "max_queued_messages 1000\nmessage_size_limit 10000",
    )
    .await
    .expect("mosquitto");
    let c = Cluster::with_servers(pg, mq).expect("cluster");
    let res = async {
        migrate(&c, &c.pg.url())?;
        let (code, report) = doctor(&c, &[])?;
        ensure!(code == 1, "exit {code}: {report}");
        let (level, summary) = found(&report, "broker.queue")?;
        ensure!(level == "problem", "{summary}");
        ensure!(summary.contains("kept only 1000 of 2000"), "{summary}");
        let (level, summary) = found(&report, "broker.payload")?;
        ensure!(level == "problem", "{summary}");
        let (level, summary) = found(&report, "broker.qos")?;
        ensure!(level == "ok", "{summary}");
        // The probe's persistent session was removed: a clean-session connect with its id.
        let log = c.mq.log();
        ensure!(
            log.lines()
                .any(|l| l.contains("as leasehold-doctor-") && l.contains("c1")),
            "no clean-up connect in the broker's log:\n{log}"
        );
        let out = c.cli_env(&["doctor"], &[])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.code() == Some(1), "{text}");
        ensure!(
            text.lines().any(|l| l.starts_with("problem")
                && l.contains("broker.queue")
                && l.contains("max_queued_messages")),
            "{text}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// The shipped broker configuration and a durable database without standbys: every broker
/// check ok, replication a warning saying what a failover can lose, exit 0. A node started on
/// them shows the same checks in `/health`, and its replication as not synchronous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_the_shipped_broker_and_warns_without_standbys() {
    let pg = Postgres::start_with(DURABLE).await.expect("postgres");
    let mq = Mosquitto::start().await.expect("mosquitto");
    let mut c = Cluster::with_servers(pg, mq).expect("cluster");
    let res = async {
        migrate(&c, &c.pg.url())?;
        let (code, report) = doctor(&c, &[])?;
        ensure!(code == 0, "exit {code}: {report}");
        for id in [
            "broker.queue",
            "broker.queue_qos0",
            "broker.payload",
            "broker.qos",
            "broker.anonymous",
            "database.durability",
            "database.privileges",
            "database.round_trip",
            "cluster.identity",
            "cluster.claim",
        ] {
            let (level, summary) = found(&report, id)?;
            ensure!(level == "ok", "{id}: {level} {summary}");
        }
        let (level, summary) = found(&report, "database.replication")?;
        ensure!(level == "warning", "{summary}");
        ensure!(
            summary.contains("not synchronously replicated"),
            "{summary}"
        );
        ensure!(summary.contains("failover"), "{summary}");

        c.spawn("node-a")?;
        c.wait_leader().await?;
        let port = c.node("node-a").http_port();
        eventually(
            Duration::from_secs(30),
            "the start-up checks in /health",
            || async move {
                let (_, body) = http(port, "GET", "/health").await?;
                let v: Value = serde_json::from_str(&body)?;
                Ok(v["checks_status"] == "warning" && v["checks_ran_at"].is_string())
            },
        )
        .await?;
        let (_, body) = http(port, "GET", "/health").await?;
        let v: Value = serde_json::from_str(&body)?;
        ensure!(found(&v, "broker.queue")?.0 == "ok", "{v}");
        ensure!(found(&v, "database.replication")?.0 == "warning", "{v}");
        let (_, body) = http(port, "GET", "/health/database").await?;
        let v: Value = serde_json::from_str(&body)?;
        ensure!(v["replication"]["synchronous"] == false, "{v}");
        let (_, m) = http(port, "GET", "/metrics").await?;
        ensure!(
            metric(&m, "leasehold_db_sync_replication") == Some(0.0),
            "{m}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A real synchronous standby (`pg_basebackup -R`, named in the primary's
/// `synchronous_standby_names`): doctor says commits are synchronously replicated, and the
/// node shows it in `/health/database`, `leasehold status` and the gauges. A role that may not
/// see the standbys' state is told so, and what it lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_standby_is_shown_by_doctor_health_status_and_metrics() {
    let pg = Postgres::start_with(DURABLE).await.expect("postgres");
    // Dropped after the cluster: commits would wait for it forever.
    let _standby = Postgres::start_standby(&pg).await.expect("standby");
    let mq = Mosquitto::start().await.expect("mosquitto");
    let mut c = Cluster::with_servers(pg, mq).expect("cluster");
    let res = async {
        migrate(&c, &c.pg.url())?;
        let (code, report) = doctor(&c, &[])?;
        ensure!(code == 0, "exit {code}: {report}");
        let (level, summary) = found(&report, "database.replication")?;
        ensure!(level == "ok", "{summary}");
        ensure!(
            summary.contains("synchronously replicated")
                && summary.contains(Postgres::STANDBY_NAME),
            "{summary}"
        );

        c.spawn("node-a")?;
        c.wait_leader().await?;
        let port = c.node("node-a").http_port();
        eventually(
            Duration::from_secs(20),
            "replication in /health/database",
            || async move {
                let (_, body) = http(port, "GET", "/health/database").await?;
                let v: Value = serde_json::from_str(&body)?;
                Ok(v["replication"]["synchronous"] == true)
            },
        )
        .await?;
        let (_, body) = http(port, "GET", "/health/database").await?;
        let v: Value = serde_json::from_str(&body)?;
        let r = &v["replication"];
        ensure!(r["synchronous_commit"] == "on", "{v}");
        ensure!(
            r["synchronous_standby_names"] == Postgres::STANDBY_NAME,
            "{v}"
        );
        ensure!(
            r["standbys"][0]["application_name"] == Postgres::STANDBY_NAME,
            "{v}"
        );
        ensure!(r["standbys"][0]["sync_state"] == "sync", "{v}");
        let (_, m) = http(port, "GET", "/metrics").await?;
        ensure!(
            metric(&m, "leasehold_db_sync_replication") == Some(1.0),
            "{m}"
        );
        ensure!(
            metric(&m, "leasehold_db_standbys{sync_state=\"sync\"}") == Some(1.0),
            "{m}"
        );
        let out = c.cli(&["status", "--json"])?;
        let status: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(status["replication"]["synchronous"] == true, "{status}");
        let out = c.cli(&["status"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("DATABASE commits synchronously replicated"),
            "{text}"
        );

        // A role without pg_monitor cannot see the standbys' state: doctor says so instead of
        // guessing, and names the privileges it lacks on Leasehold's tables.
        c.pg.client()
            .await?
            .batch_execute("CREATE ROLE watcher LOGIN")
            .await?;
        let url =
            c.pg.url()
                .replace("postgres://postgres@", "postgres://watcher@");
        let (code, report) = doctor(&c, &[("DATABASE_URL", url)])?;
        ensure!(code == 1, "exit {code}: {report}");
        let (level, summary) = found(&report, "database.replication")?;
        ensure!(
            level == "warning" && summary.contains("pg_monitor"),
            "{summary}"
        );
        let (level, summary) = found(&report, "database.privileges")?;
        ensure!(
            level == "problem" && summary.contains("INSERT on telemetry"),
            "{summary}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// Two clusters (two databases) with one explicit MQTT_CLIENT_ID on one broker: the running
/// leader's retained claim names its database; doctor against it is ok, doctor with the other
/// database finds the claim of another cluster, naming both. The leader subscribes to `#` and
/// still stores neither its claim nor the probes as readings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_sharing_a_client_id_are_found_by_the_claim() {
    let pg = Postgres::start_with(DURABLE).await.expect("postgres");
    let other = Postgres::start_with(DURABLE)
        .await
        .expect("second postgres");
    let mq = Mosquitto::start().await.expect("mosquitto");
    let mut c = Cluster::with_servers(pg, mq).expect("cluster");
    c.extra_env = vec![
        ("MQTT_CLIENT_ID", "shared-session".to_string()),
        ("MQTT_TOPICS", "#".to_string()),
    ];
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        let log_has_claim = || {
            c.node("node-a")
                .log()
                .contains("claimed the client id at the broker")
        };
        eventually(Duration::from_secs(20), "the leader's claim", || async {
            Ok(log_has_claim())
        })
        .await?;
        let (_, report) = doctor(&c, &[])?;
        let (level, summary) = found(&report, "cluster.claim")?;
        ensure!(
            level == "ok" && summary.contains("this cluster"),
            "{summary}"
        );
        let (level, summary) = found(&report, "cluster.identity")?;
        ensure!(
            level == "warning" && summary.contains("explicit"),
            "{summary}"
        );

        migrate(&c, &other.url())?;
        let (code, report) = doctor(&c, &[("DATABASE_URL", other.url())])?;
        ensure!(code == 1, "exit {code}: {report}");
        let (level, summary) = found(&report, "cluster.claim")?;
        ensure!(level == "problem", "{summary}");
        let db = c.pg.client().await?;
        let ours: String = db
            .query_one("SELECT cluster_id::text FROM cluster_identity", &[])
            .await?
            .get(0);
        let theirs: String = other
            .client()
            .await?
            .query_one("SELECT cluster_id::text FROM cluster_identity", &[])
            .await?
            .get(0);
        ensure!(
            summary.contains(&ours) && summary.contains(&theirs),
            "{summary} should name {ours} and {theirs}"
        );
        // The leader took its claim and the probes under `#`, and stored none of them.
        let own: i64 = db
            .query_one(
                "SELECT (SELECT count(*) FROM telemetry WHERE topic LIKE 'leasehold/%')
                      + (SELECT count(*) FROM dead_letters WHERE topic LIKE 'leasehold/%')",
                &[],
            )
            .await?
            .get(0);
        ensure!(own == 0, "{own} of Leasehold's own messages stored");
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A broker that refuses the claim topic (publishing and subscribing): the leader's claim is
/// lost, never its ingest — every message lands once — and doctor warns that another cluster on
/// this client id cannot be detected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_refusing_the_claim_costs_a_warning_never_the_ingest() {
    use leasehold_testkit::cluster::msg;
    use leasehold_testkit::publish::{numbered, publish_all};
    let mq = Mosquitto::start_refusing(serde_json::json!([
        {"acltype": "publishClientSend", "topic": "leasehold/clusters/#", "allow": false, "priority": 0},
        {"acltype": "subscribePattern", "topic": "leasehold/clusters/#", "allow": false, "priority": 0},
    ]))
    .await
    .expect("broker");
    let pg = Postgres::start_with(DURABLE).await.expect("postgres");
    let mut c = Cluster::with_servers(pg, mq).expect("cluster");
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        let port = c.node("node-a").http_port();
        eventually(
            Duration::from_secs(20),
            "leading and subscribed",
            || async move { leasehold_testkit::leading_and_subscribed(port).await },
        )
        .await?;
        let msgs = (0..20)
            .map(|seq| msg("devices/d1/telemetry", numbered("claimless", "d1", seq)))
            .collect();
        publish_all(c.mq.port, msgs).await?;
        c.assert_exactly_once("claimless", 20).await?;
        let (_, report) = doctor(&c, &[])?;
        let (level, summary) = found(&report, "cluster.claim")?;
        ensure!(
            level == "warning" && summary.contains("refused"),
            "{summary}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}
