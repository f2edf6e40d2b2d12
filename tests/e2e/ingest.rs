//! The ingest path end to end: bad input, redelivery, live topic changes, database outage,
//! configuration errors.

use std::time::Duration;

use crate::helpers::{check, msg, Cluster};
use anyhow::ensure;
use leasehold_testkit::publish::{numbered, publish_all, Stream};
use leasehold_testkit::{eventually, http, metric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_go_to_dead_letters_and_the_good_ones_around_them_are_stored() {
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env.push(("MAX_PAYLOAD_BYTES", "1000".to_string()));
    c.extra_env
        .push(("MQTT_TOPICS", "devices/+/telemetry,misc/#".to_string()));
    let res = async {
        c.spawn("node-a")?;
        let (leader, _) = c.wait_leader().await?;
        let t = "devices/d1/telemetry";
        let mut msgs = Vec::new();
        let bad: Vec<(String, Vec<u8>, &str)> = vec![
            (t.into(), b"this is not json".to_vec(), "not valid JSON"),
            // (An array is one reading per element: tests/e2e/formats.rs.)
            (t.into(), b"42".to_vec(), "not an object"),
            (
                t.into(),
                format!(r#"{{"ts":1700000000,"pad":"{}"}}"#, "x".repeat(2000)).into_bytes(),
                "exceeds MAX_PAYLOAD_BYTES",
            ),
            (
                t.into(),
                br#"{"timestamp":"last tuesday"}"#.to_vec(),
                "bad timestamp",
            ),
            (
                "misc/no-device".into(),
                br#"{"ts":1700000000}"#.to_vec(),
                "no device id",
            ),
            (t.into(), vec![0xff, 0x00, 0xfe], "not valid JSON"),
        ];
        // Good messages before, between and after the bad ones.
        let mut seq = 0;
        for (topic, body, _) in &bad {
            msgs.push(msg(t, numbered("dl", "d1", seq)));
            seq += 1;
            msgs.push((topic.clone(), body.clone()));
        }
        msgs.push(msg(t, numbered("dl", "d1", seq)));
        seq += 1;
        publish_all(c.mq.port, msgs).await?;
        c.assert_exactly_once("dl", seq).await?;
        eventually(
            Duration::from_secs(10),
            "every bad message dead-lettered",
            || async {
                Ok(c.count("SELECT count(*) FROM dead_letters").await? == bad.len() as i64)
            },
        )
        .await?;
        let db = c.pg.client().await?;
        for (topic, body, reason) in &bad {
            let row = db
                .query_one(
                    // An oversized payload keeps its first MAX_PAYLOAD_BYTES and its size.
                    "SELECT error, written_by FROM dead_letters WHERE topic = $1
                       AND payload = substring($2::bytea for 1000) AND size = octet_length($2::bytea)",
                    &[topic, body],
                )
                .await?;
            let error: String = row.get(0);
            ensure!(
                error.contains(reason),
                "dead letter for {reason:?} says {error:?}"
            );
            ensure!(row.get::<_, String>(1) == leader, "written_by");
        }
        // The node kept going and says so.
        ensure!(c.node_mut("node-a").try_status().is_none(), "node exited");
        let (_, m) = http(c.node("node-a").http_port(), "GET", "/metrics").await?;
        ensure!(
            m.contains(
                "leasehold_messages_dead_lettered_total{reason=\"not_json\",route=\"default\"} 2"
            ),
            "metrics:\n{m}"
        );
        // The same bad bytes published again are another occurrence: another dead letter, so
        // "dead letters rising" sees every one.
        publish_all(c.mq.port, vec![msg(t, b"this is not json".to_vec())]).await?;
        publish_all(c.mq.port, vec![msg(t, numbered("dl", "d1", seq))]).await?;
        c.assert_exactly_once("dl", seq + 1).await?;
        eventually(
            Duration::from_secs(10),
            "the second occurrence dead-lettered",
            || async {
                Ok(c.count(
                    "SELECT count(*) FROM dead_letters WHERE payload = convert_to('this is not json', 'UTF8')",
                )
                .await?
                    == 2)
            },
        )
        .await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_reading_published_twice_is_stored_once() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        let t = "devices/d2/telemetry";
        let with_ts = numbered("dup", "d2", 0);
        publish_all(c.mq.port, vec![msg(t, with_ts.clone())]).await?;
        c.assert_exactly_once("dup", 1).await?;
        // The same reading again, one at a time and twice inside one batch.
        publish_all(
            c.mq.port,
            vec![msg(t, with_ts.clone()), msg(t, with_ts.clone())],
        )
        .await?;
        publish_all(c.mq.port, vec![msg(t, numbered("dup", "d2", 1))]).await?;
        c.assert_exactly_once("dup", 2).await?;
        let port = c.node("node-a").http_port();
        eventually(Duration::from_secs(5), "duplicates counted", || async {
            let (_, m) = http(port, "GET", "/metrics").await?;
            Ok(metric(&m, "leasehold_messages_duplicate_total") == Some(2.0))
        })
        .await?;
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "the same reading again is not a conflict"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_row_inserted_while_running_is_subscribed_within_seconds() {
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env
        .push(("MQTT_TOPICS", "devices/+/telemetry".to_string()));
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        // A topic outside MQTT_TOPICS: not received until the device row exists.
        let topic = "plant/pump-7/data";
        publish_all(
            c.mq.port,
            vec![msg(
                topic,
                r#"{"device_id":"pump-7","run":"dev","seq":0,"ts":1700000000}"#,
            )],
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        ensure!(
            c.count("SELECT count(*) FROM telemetry WHERE device_id = 'pump-7'")
                .await?
                == 0,
            "received before subscribing"
        );
        let db = c.pg.client().await?;
        db.execute(
            "INSERT INTO devices (device_id, topic) VALUES ('pump-7', $1)",
            &[&topic],
        )
        .await?;
        let mut seq = 1u64;
        let took = eventually(
            Duration::from_secs(10),
            "a reading on the new device topic stored",
            || {
                seq += 1;
                let body = format!(
                    r#"{{"device_id":"pump-7","run":"dev","seq":{seq},"ts":{}}}"#,
                    1_700_000_000 + seq
                );
                let port = c.mq.port;
                let c = &c;
                async move {
                    publish_all(port, vec![msg(topic, body)]).await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(
                        c.count("SELECT count(*) FROM telemetry WHERE device_id = 'pump-7'")
                            .await?
                            > 0,
                    )
                }
            },
        )
        .await?;
        println!("device topic subscribed and stored after {took:?}");
        ensure!(
            c.node("node-a").log().contains("device topics changed"),
            "no log line about the new topic"
        );
        // Disabling it unsubscribes.
        db.execute(
            "UPDATE devices SET enabled = false WHERE device_id = 'pump-7'",
            &[],
        )
        .await?;
        let port = c.node("node-a").http_port();
        eventually(
            Duration::from_secs(10),
            "the topic unsubscribed",
            || async {
                let (_, m) = http(port, "GET", "/metrics").await?;
                Ok(metric(&m, "leasehold_mqtt_subscribed_topics") == Some(1.0))
            },
        )
        .await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_ten_seconds_loses_nothing_and_ingest_resumes_by_itself() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.spawn("node-b")?;
        c.wait_leader().await?;
        let stream = Stream::start(c.mq.port, "pg-outage", 5, 200);
        eventually(Duration::from_secs(10), "rows flowing", || async {
            Ok(c.count("SELECT count(*) FROM telemetry").await? > 50)
        })
        .await?;
        c.pg.stop()?;
        tokio::time::sleep(Duration::from_secs(10)).await;
        c.pg.start_again().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let n = stream.stop().await?;
        c.assert_exactly_once("pg-outage", n).await?;
        for name in ["node-a", "node-b"] {
            ensure!(
                c.node_mut(name).try_status().is_none(),
                "{name} exited during the outage"
            );
        }
        let (leader, _) = c.wait_leader().await?;
        // Still flowing afterwards.
        publish_all(
            c.mq.port,
            vec![msg("devices/x/telemetry", numbered("after", "x", 0))],
        )
        .await?;
        c.assert_exactly_once("after", 1).await?;
        println!("leader after the outage: {leader}");
        Ok(())
    }
    .await;
    check(&c, res);
}

/// Runs `leasehold run` with `env` and returns (exit code, stderr).
fn run_with(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(crate::helpers::BIN);
    cmd.arg("run").env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    match cmd.output() {
        Ok(out) => (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        Err(e) => (None, e.to_string()),
    }
}

#[test]
fn bad_configuration_stops_start_up_with_one_line_naming_the_setting() {
    let db = ("DATABASE_URL", "postgres://u:secret@127.0.0.1:1/x");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[db, ("LEASE_TTL", "ten")], "LEASE_TTL"),
        (
            &[db, ("LEASE_TTL", "9s"), ("LEASE_RENEW_INTERVAL", "7s")],
            "LEASE_RENEW_INTERVAL",
        ),
        (&[db, ("BATCH_MAX_ROWS", "-3")], "BATCH_MAX_ROWS"),
        (&[db, ("MQTT_MODE", "prod")], "MQTT_MODE"),
        (&[db, ("MQTT_URL", "http://broker")], "MQTT_URL"),
        (&[db, ("HTTP_ADDR", "localhost")], "HTTP_ADDR"),
        (&[db, ("MAX_PAYLOAD_BYTES", "big")], "MAX_PAYLOAD_BYTES"),
        (&[("MQTT_MODE", "production")], "DATABASE_URL"),
    ];
    for (env, setting) in cases {
        let (code, stderr) = run_with(env);
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{env:?}: not one line: {stderr}"
        );
        assert!(
            stderr.contains(setting),
            "{env:?}: does not name {setting}: {stderr}"
        );
        assert!(
            !stderr.contains("secret"),
            "{env:?}: leaks a secret: {stderr}"
        );
    }
    let out = std::process::Command::new(crate::helpers::BIN)
        .args(["run", "--bogus"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    for sub in ["run", "migrate", "status", "step-down", "simulate"] {
        let out = std::process::Command::new(crate::helpers::BIN)
            .args([sub, "--help"])
            .output()
            .expect("help");
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "{sub} --help"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_credentials_are_used_and_wrong_ones_are_reported() {
    use leasehold_testkit::{Dir, Mosquitto, Postgres};
    let dir = Dir::temp("leasehold-mqtt-auth-").expect("dir");
    let pw = dir.path().join("passwd");
    let ok = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&pw)
        .args(["ingest", "s3cret-pw"])
        .status()
        .expect("mosquitto_passwd (mosquitto package)");
    assert!(ok.success());
    // Readable by the unprivileged broker user.
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let extra = format!("allow_anonymous false\npassword_file {}\n", pw.display());
    let mq = Mosquitto::start_with(dir, &extra).await.expect("broker");
    let pg = Postgres::start().await.expect("postgres");
    let mut c = Cluster::with_servers(pg, mq).expect("cluster");
    let res = async {
        let good = format!("mqtt://ingest:s3cret-pw@127.0.0.1:{}", c.mq.port);
        c.spawn_with("authed", &[("MQTT_URL", good)])?;
        c.wait_leader().await?;
        ensure!(
            !c.node("authed").log().contains("s3cret-pw"),
            "password in the log"
        );
        c.node("authed").signal(libc::SIGTERM);
        c.node_mut("authed")
            .wait_exit(Duration::from_secs(10))
            .await?;
        let bad = format!("mqtt://ingest:wrong@127.0.0.1:{}", c.mq.port);
        c.spawn_with("refused", &[("MQTT_URL", bad)])?;
        let port = c.node("refused").http_port();
        eventually(
            Duration::from_secs(15),
            "a refused connection logged",
            || async {
                Ok(c.node("refused")
                    .log()
                    .contains("connection refused by broker"))
            },
        )
        .await?;
        let (code, _) = http(port, "GET", "/health").await?;
        ensure!(
            code == 503,
            "a leader that cannot reach the broker must not be healthy (got {code})"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_beyond_max_pending_waits_at_the_broker_and_arrives_exactly_once() {
    let mut c = Cluster::start().await.expect("servers");
    // A tiny budget: the broker (Mosquitto 2.0.11 does not always enforce max_inflight_messages
    // for a queued session) sends more than the node may hold.
    c.extra_env.push(("BATCH_MAX_ROWS", "50".to_string()));
    c.extra_env.push(("MAX_PENDING", "100".to_string()));
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        // Queue a backlog while no leader is connected.
        c.node("node-a").signal(libc::SIGTERM);
        c.node_mut("node-a")
            .wait_exit(Duration::from_secs(10))
            .await?;
        let n = 3000u64;
        let msgs = (0..n)
            .map(|i| {
                msg(
                    &format!("devices/d{}/telemetry", i % 7),
                    numbered("backlog", "x", i),
                )
            })
            .collect();
        publish_all(c.mq.port, msgs).await?;
        c.spawn("node-b")?;
        c.assert_exactly_once("backlog", n).await?;
        let (_, m) = http(c.node("node-b").http_port(), "GET", "/metrics").await?;
        let peak_pending = m.contains("leasehold_messages_pending");
        ensure!(peak_pending, "pending metric missing");
        println!(
            "backlog of {n}: overflow {:?}, duplicates {:?}",
            metric(&m, "leasehold_messages_overflow_total"),
            metric(&m, "leasehold_messages_duplicate_total")
        );
        // Every committed message was acknowledged on its connection: the next leader on the
        // same session is sent nothing again. The broker resends what is unacknowledged before
        // anything new, so once a marker published now is stored, the count is final.
        c.node("node-b").signal(libc::SIGTERM);
        c.node_mut("node-b")
            .wait_exit(Duration::from_secs(10))
            .await?;
        c.spawn("node-c")?;
        publish_all(
            c.mq.port,
            vec![msg("devices/marker/telemetry", numbered("marker", "m", 0))],
        )
        .await?;
        c.assert_exactly_once("marker", 1).await?;
        let (_, m) = http(c.node("node-c").http_port(), "GET", "/metrics").await?;
        let received = metric(&m, "leasehold_messages_received_total");
        ensure!(
            received == Some(1.0),
            "the next leader was sent {received:?} messages for 1 new one: acks of committed messages were lost"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}
