//! "Nothing lost, once" against ordinary traffic: readings that share a timestamp, repeated
//! timestamp-less states, conflicting readings, payloads PostgreSQL refuses, repeated bad
//! payloads, a lease row that expires under a live leader, a write that hangs in the database,
//! and timestamp-less readings across a failover. Each test failed before the change it covers.

use std::time::{Duration, Instant};

use crate::helpers::{check, msg, Cluster, TTL};
use anyhow::{ensure, Result};
use leasehold_testkit::publish::{numbered, numbered_untimed, publish_all, Stream};
use leasehold_testkit::{eventually, http, metric};

async fn metric_reaches(c: &Cluster, node: &str, name: &str, want: f64) -> Result<()> {
    let port = c.node(node).http_port();
    eventually(
        Duration::from_secs(10),
        &format!("{name} = {want}"),
        || async {
            let (_, m) = http(port, "GET", "/metrics").await?;
            Ok(metric(&m, name) == Some(want))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_metrics_at_one_timestamp_and_a_repeated_state_are_all_stored() {
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env.push(("MQTT_TOPICS", "devices/#".to_string()));
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        // 20 meters publish temperature and humidity at the same second: 40 readings.
        let mut msgs = Vec::new();
        for d in 0..20 {
            for metric in ["temperature", "humidity"] {
                msgs.push(msg(
                    &format!("devices/meter-{d}/{metric}"),
                    format!(r#"{{"ts":1700000000,"metric":"{metric}","v":{d}}}"#),
                ));
            }
        }
        publish_all(c.mq.port, msgs).await?;
        // A switch publishes the same timestamp-less state three times: three readings.
        for _ in 0..3 {
            publish_all(
                c.mq.port,
                vec![msg("devices/switch-1/state", r#"{"state":"ON"}"#)],
            )
            .await?;
        }
        eventually(Duration::from_secs(10), "43 readings", || async {
            Ok(c.count("SELECT count(*) FROM telemetry").await? == 43)
        })
        .await?;
        ensure!(
            c.count("SELECT count(DISTINCT ts) FROM telemetry WHERE device_id = 'switch-1'")
                .await?
                == 3,
            "each publish of the state is its own reading, at its own receipt time"
        );
        ensure!(c.count("SELECT count(*) FROM dead_letters").await? == 0);
        metric_reaches(&c, "node-a", "leasehold_messages_duplicate_total", 0.0).await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_reading_is_a_counted_dead_letter_never_silently_dropped() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        let t = "devices/m1/telemetry";
        publish_all(c.mq.port, vec![msg(t, r#"{"ts":1700000000,"v":1}"#)]).await?;
        eventually(Duration::from_secs(10), "the first reading", || async {
            Ok(c.count("SELECT count(*) FROM telemetry").await? == 1)
        })
        .await?;
        // Against the stored row, then twice inside one batch.
        publish_all(c.mq.port, vec![msg(t, r#"{"ts":1700000000,"v":2}"#)]).await?;
        publish_all(
            c.mq.port,
            vec![
                msg(t, r#"{"ts":1700000001,"v":10}"#),
                msg(t, r#"{"ts":1700000001,"v":11}"#),
            ],
        )
        .await?;
        eventually(
            Duration::from_secs(10),
            "two conflicts dead-lettered",
            || async {
                Ok(
                    c.count("SELECT count(*) FROM dead_letters WHERE reason = 'conflict'")
                        .await?
                        == 2,
                )
            },
        )
        .await?;
        let db = c.pg.client().await?;
        let stored: Vec<String> = db
            .query("SELECT payload->>'v' FROM telemetry ORDER BY ts", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ensure!(
            stored == ["1", "10"],
            "first reading of each key kept: {stored:?}"
        );
        let dead: Vec<(Vec<u8>, String)> = db
            .query(
                "SELECT payload, error FROM dead_letters ORDER BY payload",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        ensure!(dead[0].0 == br#"{"ts":1700000000,"v":2}"#, "{dead:?}");
        ensure!(dead[1].0 == br#"{"ts":1700000001,"v":11}"#, "{dead:?}");
        ensure!(dead.iter().all(|(_, e)| e.contains("conflict")), "{dead:?}");
        metric_reaches(&c, "node-a", "leasehold_messages_conflict_total", 2.0).await?;
        metric_reaches(&c, "node-a", "leasehold_messages_duplicate_total", 0.0).await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_postgres_refuses_are_isolated_and_the_stream_keeps_flowing() {
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env.push(("MQTT_TOPICS", "devices/#".to_string()));
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        // What an operator adds to the table: a range check and a trigger that refuses a field.
        let db = c.pg.client().await?;
        db.batch_execute(
            "ALTER TABLE telemetry ADD CONSTRAINT v_in_range
                 CHECK (NOT payload ? 'v' OR (payload->>'v')::numeric BETWEEN -1000 AND 1000);
             CREATE FUNCTION refuse_forbidden() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.payload ? 'forbidden' THEN RAISE EXCEPTION 'field forbidden here'; END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_forbidden BEFORE INSERT ON telemetry
                 FOR EACH ROW EXECUTE FUNCTION refuse_forbidden();",
        )
        .await?;
        let t = "devices/d1/telemetry";
        // Too long for the primary key's index entry once stored (and it does not compress).
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: String = (0..3000)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                char::from(b'a' + ((x >> 33) % 26) as u8)
            })
            .collect();
        let long_topic = format!("devices/d1/{noise}");
        let bad: Vec<(String, Vec<u8>, &str)> = vec![
            (t.into(), br#"{"ts":1,"v":1e200}"#.to_vec(), "v_in_range"),
            (
                t.into(),
                br#"{"ts":2,"v":"many"}"#.to_vec(),
                "invalid input syntax",
            ),
            (
                t.into(),
                br#"{"ts":3,"forbidden":true}"#.to_vec(),
                "field forbidden here",
            ),
            (long_topic.clone(), br#"{"ts":4}"#.to_vec(), "index row"),
        ];
        // Good messages before, between and after, in as few batches as the broker allows.
        let mut msgs = Vec::new();
        let mut seq = 0;
        for (topic, body, _) in &bad {
            msgs.push(msg(t, numbered("rej", "d1", seq)));
            seq += 1;
            msgs.push((topic.clone(), body.clone()));
        }
        for _ in 0..20 {
            msgs.push(msg(t, numbered("rej", "d1", seq)));
            seq += 1;
        }
        publish_all(c.mq.port, msgs).await?;
        c.assert_exactly_once("rej", seq).await?;
        eventually(
            Duration::from_secs(10),
            "every refused reading dead-lettered",
            || async {
                Ok(c.count(
                    "SELECT count(*) FROM dead_letters WHERE reason = 'rejected_by_database'",
                )
                .await?
                    == bad.len() as i64)
            },
        )
        .await?;
        for (topic, body, words) in &bad {
            let row = db
                .query_one(
                    "SELECT error, size FROM dead_letters WHERE topic = $1 AND payload = $2",
                    &[topic, body],
                )
                .await?;
            let error: String = row.get(0);
            ensure!(
                error.contains(words),
                "dead letter says {error:?}, expected {words:?}"
            );
            ensure!(row.get::<_, i32>(1) as usize == body.len());
        }
        // Still leading and ingesting.
        publish_all(c.mq.port, vec![msg(t, numbered("rej", "d1", seq))]).await?;
        c.assert_exactly_once("rej", seq + 1).await?;
        ensure!(c.node_mut("node-a").try_status().is_none(), "node exited");
        metric_reaches(
            &c,
            "node-a",
            "leasehold_messages_dead_lettered_total{reason=\"rejected_by_database\"}",
            bad.len() as f64,
        )
        .await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_bad_payload_five_times_is_five_dead_letters() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        for _ in 0..5 {
            publish_all(
                c.mq.port,
                vec![msg("devices/d1/telemetry", "not json at all")],
            )
            .await?;
        }
        eventually(Duration::from_secs(10), "five dead letters", || async {
            Ok(c.count("SELECT count(*) FROM dead_letters").await? == 5)
        })
        .await?;
        metric_reaches(
            &c,
            "node-a",
            "leasehold_messages_dead_lettered_total{reason=\"not_json\"}",
            5.0,
        )
        .await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_row_expired_under_a_live_leader_does_not_leave_a_zombie() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        let stream = Stream::start(c.mq.port, "zombie", 5, 300);
        c.wait_written("node-a", 100, Duration::from_secs(10))
            .await?;
        // An operator's UPDATE (or a clock step, or a lagging promoted replica): the row expires
        // under the live leader, whose next write is fenced.
        let db = c.pg.client().await?;
        db.execute(
            "UPDATE instance_lock SET expires_at = now() - interval '1 second'",
            &[],
        )
        .await?;
        let before = c.written_by("node-a").await?;
        c.wait_written("node-a", before + 300, Duration::from_secs(15))
            .await?;
        let n = stream.stop().await?;
        c.assert_exactly_once("zombie", n).await?;
        let (code, _) = http(c.node("node-a").http_port(), "GET", "/health/live").await?;
        ensure!(code == 200, "/health/live {code}");
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_hung_in_the_database_is_cancelled_there_and_the_standby_takes_over() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        c.spawn("node-b")?;
        // The first reading marked "slow" takes 60 s in an operator's trigger (a sequence is not
        // rolled back by the cancel, so later leaders are not slowed).
        let db = c.pg.client().await?;
        db.batch_execute(
            "CREATE SEQUENCE slow_once;
             CREATE FUNCTION slow_once() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.payload ? 'slow' AND nextval('slow_once') = 1 THEN PERFORM pg_sleep(60); END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER slow_once BEFORE INSERT ON telemetry
                 FOR EACH ROW EXECUTE FUNCTION slow_once();",
        )
        .await?;
        eventually(Duration::from_secs(10), "the standby up", || async {
            Ok(c.count("SELECT count(*) FROM cluster_nodes WHERE role = 'standby'").await? == 1)
        })
        .await?;
        let started = Instant::now();
        publish_all(
            c.mq.port,
            vec![msg("devices/d1/telemetry", r#"{"ts":1700000000,"slow":true}"#)],
        )
        .await?;
        // The hung statement holds the fence's share lock: the leader cannot renew and demotes at
        // its deadline; its cancelled write must be cancelled on the server too, or no node can
        // take (or keep) the lease until the statement ends, and nothing is written meanwhile.
        eventually(Duration::from_secs(70), "the slow reading stored", || async {
            Ok(c.count("SELECT count(*) FROM telemetry WHERE payload ? 'slow'").await? == 1)
        })
        .await?;
        let took = started.elapsed();
        println!("the reading whose write hung was stored {took:?} later");
        ensure!(
            took < TTL * 5,
            "the lease waited {took:?} for the hung statement"
        );
        ensure!(
            c.count("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'WITH fence%' AND wait_event = 'PgSleep'")
                .await?
                == 0,
            "the old leader's statement is still running on the server"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_less_readings_across_a_kill_9_failover_are_stored_exactly_once() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.spawn("node-b")?;
        let (leader, _) = c.wait_leader().await?;
        let standby = c.other_than(&leader);
        let stream = Stream::start_with(c.mq.port, "untimed", 5, 300, numbered_untimed);
        // A switch that publishes the same state again and again, through the same failover.
        let switch = tokio::spawn({
            let port = c.mq.port;
            async move {
                for _ in 0..60 {
                    publish_all(
                        port,
                        vec![msg("devices/switch/telemetry", r#"{"state":"ON"}"#)],
                    )
                    .await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                anyhow::Ok(())
            }
        });
        c.wait_written(&leader, 200, Duration::from_secs(10))
            .await?;
        c.node_mut(&leader).kill9();
        c.wait_written(&standby, 0, Duration::from_secs(15)).await?;
        switch.await??;
        let n = stream.stop().await?;
        c.assert_exactly_once("untimed", n).await?;
        eventually(
            Duration::from_secs(10),
            "every publish of the switch",
            || async {
                Ok(
                    c.count("SELECT count(*) FROM telemetry WHERE device_id = 'switch'")
                        .await?
                        >= 60,
                )
            },
        )
        .await?;
        ensure!(
            c.count("SELECT count(*) FROM telemetry WHERE device_id = 'switch'")
                .await?
                == 60,
            "the switch's 60 publishes, each once"
        );
        println!(
            "rows marked possible_duplicate: {}",
            c.count("SELECT count(*) FROM telemetry WHERE possible_duplicate")
                .await?
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_clock_running_ahead_does_not_hide_stale_data() {
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env.push(("STALE_WARNING", "3s".to_string()));
    c.extra_env.push(("STALE_CRITICAL", "1h".to_string()));
    let res = async {
        let lib = std::fs::read_dir("/usr/lib")?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
            .find(|p| p.exists())
            .ok_or_else(|| {
                anyhow::anyhow!("libfaketime is not installed (scripts/install-deps.sh)")
            })?;
        // The node's wall clock runs ten minutes ahead of the database's.
        c.spawn_with(
            "node-a",
            &[
                ("LD_PRELOAD", lib.display().to_string()),
                ("FAKETIME", "+10m".to_string()),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
            ],
        )?;
        c.wait_leader().await?;
        publish_all(
            c.mq.port,
            vec![
                msg("devices/d1/telemetry", r#"{"state":"ON"}"#),
                msg("devices/d1/telemetry", numbered("clock", "d1", 0)),
            ],
        )
        .await?;
        eventually(Duration::from_secs(10), "both readings stored", || async {
            Ok(c.count("SELECT count(*) FROM telemetry").await? == 2)
        })
        .await?;
        ensure!(
            c.count(
                "SELECT count(*) FROM telemetry
                 WHERE abs(extract(epoch from received_at - now())) < 60"
            )
            .await?
                == 2,
            "receipt times are on the database's clock"
        );
        ensure!(
            c.count(
                "SELECT count(*) FROM telemetry
                 WHERE payload ? 'state' AND abs(extract(epoch from ts - now())) < 60"
            )
            .await?
                == 1,
            "a timestamp-less reading is stamped on the database's clock"
        );
        let port = c.node("node-a").http_port();
        eventually(
            Duration::from_secs(15),
            "recent-data says warning",
            || async {
                let (_, body) = http(port, "GET", "/health/recent-data").await?;
                let v: serde_json::Value = serde_json::from_str(&body)?;
                Ok(v["status"] == "warning")
            },
        )
        .await?;
        Ok(())
    }
    .await;
    check(&c, res);
}
