//! The second review of payload formats: a redelivered backlog of gateway arrays, an element
//! PostgreSQL refuses, a replay whose dead letter fails as several readings, and batches of
//! arrays of non-readings (bounded readings per message, dead letters per statement).

use std::time::Duration;

use anyhow::{ensure, Result};
use leasehold_ingest::Inbound;
use leasehold_testkit::publish::publish_all;
use leasehold_testkit::{eventually, leading_and_subscribed};

use crate::formats::{decoder, inbound};
use crate::generated::{migrated, write_inbound, writer_config_with};
use crate::helpers::{check, out, Cluster};

/// A leader that held a backlog of gateway arrays (260 messages of 50 untimed readings, more
/// rows than MAX_PENDING + 2,048) is replaced; the broker redelivers the first of them (DUP, same
/// packet id): its first copy lies further back than one reading per message would reach, and it
/// is stored once. Before the span counted readings per redelivered message, it was stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_gateway_array_behind_a_backlog_is_stored_once() -> Result<()> {
    let pg = migrated().await?;
    let db = pg.client().await?;
    let array = |m: usize| {
        let e: Vec<String> = (0..50)
            .map(|k| format!("{{\"device_id\":\"d{k}\",\"v\":{m}}}"))
            .collect();
        format!("[{}]", e.join(","))
    };
    let backlog: Vec<Inbound> = (0..260)
        .map(|m| {
            inbound(
                &format!("gw/{}/up", m % 7),
                array(m).as_bytes(),
                1 + m as u16,
                false,
            )
        })
        .collect();
    write_inbound(writer_config_with(&pg, 1000, decoder()), backlog).await?;
    let first: i64 = db
        .query_one("SELECT count(*) FROM telemetry", &[])
        .await?
        .get(0);
    ensure!(first == 13_000, "{first} rows of the backlog");
    write_inbound(
        writer_config_with(&pg, 1000, decoder()),
        vec![inbound("gw/0/up", array(0).as_bytes(), 1, true)],
    )
    .await?;
    let after: i64 = db
        .query_one("SELECT count(*) FROM telemetry", &[])
        .await?
        .get(0);
    let dead: i64 = db
        .query_one("SELECT count(*) FROM dead_letters", &[])
        .await?
        .get(0);
    ensure!(
        after == first && dead == 0,
        "after the redelivery {after} rows (want {first}), {dead} dead letters"
    );
    Ok(())
}

/// An element of an array refused by PostgreSQL: only it is a dead letter, naming its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_element_postgresql_refuses_is_its_own_dead_letter_naming_its_place() -> Result<()> {
    let pg = migrated().await?;
    let db = pg.client().await?;
    db.batch_execute(
        "CREATE FUNCTION refuse_forbidden() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.payload ? 'forbidden' THEN RAISE EXCEPTION 'field forbidden here'; END IF;
         RETURN NEW; END $$;
         CREATE TRIGGER refuse_forbidden BEFORE INSERT ON telemetry
             FOR EACH ROW EXECUTE FUNCTION refuse_forbidden();",
    )
    .await?;
    let arr = br#"[{"device_id":"a","ts":1700000000,"v":1},{"device_id":"b","ts":1700000000,"forbidden":1},{"device_id":"c","ts":1700000000,"v":3}]"#;
    write_inbound(
        writer_config_with(&pg, 1000, decoder()),
        vec![inbound("gw/1/up", arr, 5, false)],
    )
    .await?;
    let n: i64 = db
        .query_one("SELECT count(*) FROM telemetry", &[])
        .await?
        .get(0);
    let dead: Vec<(String, String, Vec<u8>)> = db
        .query("SELECT reason, error, payload FROM dead_letters", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    ensure!(n == 2 && dead.len() == 1, "{n} rows, {} dead", dead.len());
    let (reason, error, payload) = &dead[0];
    ensure!(
        reason == "rejected_by_database" && error.starts_with("element 2 of 3"),
        "{reason}: {error} ({})",
        String::from_utf8_lossy(payload)
    );
    Ok(())
}

/// A pack dead-lettered whole (`bad_senml`: a record that is no object), replayed after the
/// topic's format is removed: read as a JSON array it is several failing readings of one dead
/// letter. The summary counted readings against dead letters and underflowed (a panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_as_several_failing_readings_is_counted_once() {
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env.push(("MQTT_TOPICS", "senml/#".to_string()));
    let res = async {
        c.spawn("a")?;
        let (leader, _) = c.wait_leader().await?;
        let port = c.node(&leader).http_port();
        eventually(Duration::from_secs(20), "leading and subscribed", || {
            leading_and_subscribed(port)
        })
        .await?;
        let with = c.logs.path().join("with.toml");
        std::fs::write(&with, "mqtt_topics = [\"senml/#\"]\n[[formats]]\ntopics = [\"senml/#\"]\nformat = \"senml\"\n")?;
        let (code, so, se) = out(&c.cli(&["config", "apply", &with.display().to_string()])?);
        ensure!(code == 0, "config apply: {so}{se}");
        eventually(Duration::from_secs(20), "senml read", || async {
            publish_all(c.mq.port, vec![("senml/probe".into(), br#"[{"bn":"probe:","n":"a","v":1}]"#.to_vec())]).await?;
            Ok(c.count("SELECT count(*) FROM telemetry WHERE device_id = 'probe'").await? >= 1)
        })
        .await?;
        publish_all(
            c.mq.port,
            vec![("senml/kitchen".into(), br#"[{"bn":"x:","n":"a","v":1},{"n":"b","v":2},7]"#.to_vec())],
        )
        .await?;
        eventually(Duration::from_secs(20), "bad_senml", || async {
            Ok(c.count("SELECT count(*) FROM dead_letters WHERE reason = 'bad_senml'").await? == 1)
        })
        .await?;
        let without = c.logs.path().join("without.toml");
        std::fs::write(&without, "mqtt_topics = [\"senml/#\"]\n")?;
        let (code, so, se) = out(&c.cli(&["config", "apply", &without.display().to_string()])?);
        ensure!(code == 0, "config apply: {so}{se}");
        let (code, so, se) = out(&c.cli(&["replay"])?);
        eprintln!("R8 replay exit {code}:\n{so}\n{se}");
        ensure!(code == 0 && !so.contains("18446744073709551"), "replay exit {code}: {so}{se}");
        Ok(())
    }
    .await;
    check(&c, res);
}

/// Arrays of elements that are no readings: one over MAX_READINGS elements is one dead letter
/// (`too_many_readings`), and a batch of eight arrays of 10,000 (80,000 element dead letters)
/// drains within the bound, in statements of BATCH_MAX_ROWS dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrays_of_non_readings_are_bounded_and_drain() -> Result<()> {
    let pg = migrated().await?;
    let db = pg.client().await?;
    let ones = |n: usize| format!("[{}]", vec!["1"; n].join(","));
    write_inbound(
        writer_config_with(&pg, 1000, decoder()),
        vec![inbound("gw/1/up", ones(100_000).as_bytes(), 1, false)],
    )
    .await?;
    let reasons: Vec<String> = db
        .query("SELECT reason FROM dead_letters", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(reasons == ["too_many_readings"], "{reasons:?}");
    write_inbound(
        writer_config_with(&pg, 1000, decoder()),
        (0..8)
            .map(|k| inbound("gw/2/up", ones(10_000).as_bytes(), 10 + k, false))
            .collect(),
    )
    .await?;
    let dead: i64 = db
        .query_one(
            "SELECT count(*) FROM dead_letters WHERE topic = 'gw/2/up'",
            &[],
        )
        .await?
        .get(0);
    ensure!(dead == 80_000, "{dead} element dead letters");
    Ok(())
}
