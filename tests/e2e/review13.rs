//! An outside review of the database-HA work, as an operator of two VPSes would meet it: a
//! primary with a streaming standby whose `synchronous_standby_names` stops matching it.

use std::time::Duration;

use anyhow::{ensure, Context};
use leasehold_testkit::{eventually, http, Dir, Mosquitto, Postgres};
use serde_json::Value;

use crate::helpers::{check, Cluster};

/// PostgreSQL settings under which commits are durable and wait for the synchronous standby.
const DURABLE: &str = "fsync = on\nfull_page_writes = on\nsynchronous_commit = on";

/// `synchronous_standby_names` renamed to a standby that does not exist: from then on every
/// commit on the primary waits forever (the lease's renewals too). Whatever the node does, its
/// `/health` must say that commits wait for a standby that is not there, within a bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_standby_name_matching_no_standby_is_named_in_health() {
    let pg = Postgres::start_with(DURABLE).await.expect("postgres");
    let _standby = Postgres::start_standby(&pg).await.expect("standby");
    let mq = Mosquitto::start().await.expect("mosquitto");
    let mut c = Cluster::with_servers(pg, mq).expect("cluster");
    c.extra_env
        .push(("REQUIRE_SYNC_REPLICATION", "true".to_string()));
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        let port = c.node("node-a").http_port();
        let admin = c.pg.client().await?;
        admin
            .batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'nosuchstandby'")
            .await?;
        admin.batch_execute("SELECT pg_reload_conf()").await?;
        let said = eventually(
            Duration::from_secs(30),
            "/health to say commits wait for a standby that is not there",
            || async move {
                let (code, body) = http(port, "GET", "/health").await?;
                let v: Value = serde_json::from_str(&body)?;
                let problem = v["problems"].as_array().is_some_and(|p| {
                    p.iter().any(|p| {
                        p.as_str()
                            .is_some_and(|p| p.contains("synchronous_standby_names"))
                    })
                });
                Ok(code == 503 && problem)
            },
        )
        .await;
        let (_, body) = http(port, "GET", "/health").await?;
        println!("/health: {body}");
        let (_, db) = http(port, "GET", "/health/database").await?;
        println!("/health/database: {db}");
        said?;
        let v: Value = serde_json::from_str(&db)?;
        ensure!(
            v["replication"]["why_not"]
                .as_str()
                .is_some_and(|w| w.contains("nosuchstandby")),
            "/health/database does not say why: {db}"
        );
        // Put back, the held commits complete and a leader is elected again, healthy.
        admin
            .batch_execute(&format!(
                "ALTER SYSTEM SET synchronous_standby_names = '{}'",
                Postgres::STANDBY_NAME
            ))
            .await?;
        admin.batch_execute("SELECT pg_reload_conf()").await?;
        c.wait_leader().await?;
        eventually(Duration::from_secs(30), "/health ok again", || async move {
            Ok(http(port, "GET", "/health").await?.0 == 200)
        })
        .await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

/// Runs `leasehold doctor --json` with the cluster's settings: (exit code, report).
fn doctor(c: &Cluster) -> anyhow::Result<(i32, Value)> {
    let out = c.cli_env(&["doctor", "--json"], &[])?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "doctor printed no report (exit {:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.code().unwrap_or(-1), v))
}

/// The check `id` of a report: (level, summary).
fn found(report: &Value, id: &str) -> (String, String) {
    let c = report["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id))
        .cloned()
        .unwrap_or_default();
    (
        c["level"].as_str().unwrap_or("").to_string(),
        c["summary"].as_str().unwrap_or("").to_string(),
    )
}

/// A broker with no message count limit but `max_queued_bytes 200000`: an offline session keeps
/// about 200 KB, a couple of hundred real readings, and drops the rest silently. Doctor's queue
/// probe must find it (probes of a few bytes each all fit under it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_finds_a_small_max_queued_bytes() {
    let pg = Postgres::start().await.expect("postgres");
    let mq = Mosquitto::start_with(
        Dir::temp("leasehold-mqtt-").expect("dir"),
        "max_queued_messages 0\nmax_queued_bytes 200000",
    )
    .await
    .expect("mosquitto");
    let c = Cluster::with_servers(pg, mq).expect("cluster");
    let res = async {
        let out = c.cli(&["migrate"])?;
        ensure!(out.status.success(), "migrate failed");
        let (code, report) = doctor(&c)?;
        let (level, summary) = found(&report, "broker.queue");
        println!("broker.queue: {level}: {summary}");
        ensure!(level == "problem", "exit {code}: {report}");
        ensure!(code == 1, "exit {code}");
        Ok(())
    }
    .await;
    check(&c, res);
}

/// The client ids of doctor's persistent probe sessions the broker saw connect (`c0`).
fn persistent_probe_ids(log: &str) -> Vec<String> {
    let mut ids: Vec<String> = log
        .lines()
        .filter(|l| l.contains(" as leasehold-doctor-") && l.contains("c0"))
        .filter_map(|l| l.split(" as ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Whether the broker still holds a persistent session for `id` (its CONNACK says so).
async fn session_kept(port: u16, id: &str) -> anyhow::Result<bool> {
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 10);
    let present = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c)) = el.poll().await? {
                return Ok::<_, anyhow::Error>(c.session_present);
            }
        }
    })
    .await??;
    // Leave no session of this test's own behind: reconnecting clean removes it.
    let _ = client.disconnect().await;
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(true);
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 10);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(e) = el.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) = e {
                break;
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
    Ok(present)
}

/// A node stopped (SIGTERM) while its start-up checks are in the queue probe: the probe's
/// persistent session, with up to 2,000 messages queued for it, must not stay at the broker
/// forever (nothing would ever connect with its random id again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_mid_probe_leaves_no_probe_session_behind() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        eventually(
            Duration::from_secs(20),
            "the start-up queue probe to connect its persistent session",
            || async { Ok(!persistent_probe_ids(&c.mq.log()).is_empty()) },
        )
        .await?;
        c.nodes[0].signal(libc::SIGTERM);
        c.nodes[0].wait_exit(Duration::from_secs(20)).await?;
        let ids = persistent_probe_ids(&c.mq.log());
        ensure!(!ids.is_empty(), "no probe session seen");
        for id in &ids {
            ensure!(
                !session_kept(c.mq.port, id).await?,
                "the broker still holds doctor's probe session {id} after the node stopped"
            );
        }
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A broker whose ACL refuses publishing under `leasehold/doctor/` (Mosquitto drops a refused
/// QoS 1 publish silently under MQTT 3.1.1): doctor cannot verify the queue, and must say so
/// rather than blame a queue or size limit the broker does not have, or its address (the fix would
/// be wrong).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_with_probe_publishes_refused_says_so_instead_of_blaming_a_limit() {
    let mq = Mosquitto::start_refusing(serde_json::json!([
        {"acltype": "publishClientSend", "topic": "leasehold/doctor/#", "allow": false, "priority": 0},
    ]))
    .await
    .expect("broker");
    let pg = Postgres::start().await.expect("postgres");
    let c = Cluster::with_servers(pg, mq).expect("cluster");
    let res = async {
        let out = c.cli(&["migrate"])?;
        ensure!(out.status.success(), "migrate failed");
        let (_, report) = doctor(&c)?;
        let (level, queue) = found(&report, "broker.queue");
        println!("broker.queue: {level}: {queue}");
        let (level_p, payload) = found(&report, "broker.payload");
        println!("broker.payload: {level_p}: {payload}");
        for (level, summary) in [(level, queue), (level_p, payload)] {
            ensure!(level == "problem", "{summary}");
            ensure!(
                !summary.contains("queue limit")
                    && !summary.contains("lost at the broker")
                    && summary.contains("leasehold/doctor/"),
                "doctor blames a limit, or the address, for refused probe publishes: {summary}"
            );
        }
        Ok(())
    }
    .await;
    check(&c, res);
}

/// `DATABASE_URL` in libpq's key=value form naming a read-only standby first and the primary
/// second, without `target_session_attrs`: the node leads and stores every message on the
/// primary, and doctor (its own connections) reads the primary's settings, not the standby's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_named_first_in_key_value_form_is_passed_over_by_the_node_and_doctor() {
    use leasehold_testkit::cluster::msg;
    use leasehold_testkit::publish::{numbered, publish_all};
    let pg = Postgres::start_with(DURABLE).await.expect("postgres");
    let standby = Postgres::start_standby(&pg).await.expect("standby");
    let mq = Mosquitto::start().await.expect("mosquitto");
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres connect_timeout=5",
        standby.port, pg.port
    );
    let mut c = Cluster::with_servers(pg, mq).expect("cluster");
    c.extra_env.push(("DATABASE_URL", url));
    let res = async {
        let out = c.cli(&["migrate"])?;
        ensure!(
            out.status.success(),
            "migrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
            .map(|seq| msg("devices/d1/telemetry", numbered("standby-first", "d1", seq)))
            .collect();
        publish_all(c.mq.port, msgs).await?;
        c.assert_exactly_once("standby-first", 20).await?;
        let (_, report) = doctor(&c)?;
        let (level, summary) = found(&report, "database.replication");
        ensure!(
            level == "ok" && summary.contains(Postgres::STANDBY_NAME),
            "doctor did not read the primary: {summary}"
        );
        let (level, summary) = found(&report, "database.privileges");
        ensure!(level == "ok", "{summary}");
        Ok(())
    }
    .await;
    check(&c, res);
    drop(c);
    drop(standby);
}
