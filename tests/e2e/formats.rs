//! Payload formats end to end: routes take a bare value, a SenML record's name and an array
//! element's fields; a redelivered array, pack or value is stored once (and a new publish of the
//! same bytes again); dead letters of payloads no format read yet (a bare value, a SenML pack
//! read as a JSON array, element by element) are replayed into readings once `[[formats]]` is
//! applied, live, with every node running.

use std::time::Duration;

use anyhow::{ensure, Result};
use leasehold_decode::{Decoder, Format, FormatSpec};
use leasehold_ingest::Inbound;
use leasehold_testkit::publish::publish_all;
use leasehold_testkit::{eventually, leading_and_subscribed};

use crate::generated::{migrated, write_inbound, writer_config_with};
use crate::helpers::{check, out, Cluster};

const FORMATS: &str = r#"
mqtt_topics = ["stat/+/POWER", "senml/#", "gw/+/up"]

[[formats]]
topics = ["stat/+/POWER"]
format = "value"
device_topic_pattern = "stat/{device_id}/POWER"

[[formats]]
topics = ["senml/#"]
format = "senml"
"#;

const ROUTES: &str = r#"
[[routes]]
name = "power"
topics = ["stat/+/POWER"]
table = "power"
key = ["device", "at"]
[routes.columns]
device = "topic[1]"
at = "timestamp"
state = "$.value"

[[routes]]
name = "temps"
topics = ["senml/#"]
table = "temps"
key = ["device", "at"]
[routes.columns]
device = "device_id"
at = "timestamp"
temp = "$.temp"

[[routes]]
name = "gateway"
topics = ["gw/+/up"]
table = "gateway"
key = ["device", "at"]
[routes.columns]
device = "device_id"
at = "timestamp"
v = "$.v"
"#;

const TABLES: &str = "
    CREATE TABLE power (device text, at timestamptz, state text, PRIMARY KEY (device, at));
    CREATE TABLE temps (device text, at timestamptz, temp float8, PRIMARY KEY (device, at));
    CREATE TABLE gateway (device text, at timestamptz, v int, PRIMARY KEY (device, at));
    GRANT ALL ON power, temps, gateway TO PUBLIC;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_take_a_bare_value_a_senml_name_and_an_array_elements_fields() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.pg.client().await?.batch_execute(TABLES).await?;
        let file = c.logs.path().join("formats.toml");
        std::fs::write(&file, format!("{FORMATS}{ROUTES}"))?;
        c.spawn_args("a", &["--config", &file.display().to_string()], &[])?;
        c.wait_leader().await?;
        let port = c.node("a").http_port();
        eventually(Duration::from_secs(20), "leading and subscribed", || {
            leading_and_subscribed(port)
        })
        .await?;
        publish_all(
            c.mq.port,
            vec![
                ("stat/plug-1/POWER".into(), b"ON".to_vec()),
                ("stat/plug-2/POWER".into(), b"OFF".to_vec()),
                (
                    "senml/kitchen".into(),
                    br#"[{"bn":"urn:dev:ow:7:","bt":1.7e9,"n":"temp","u":"Cel","v":21.5},{"n":"temp","t":60,"v":22}]"#.to_vec(),
                ),
                (
                    "gw/site-1/up".into(),
                    br#"[{"device_id":"m1","ts":1700000000,"v":1},{"device_id":"m2","ts":1700000000,"v":2},{"device_id":"m3","ts":1700000000,"v":"three"}]"#.to_vec(),
                ),
            ],
        )
        .await?;
        eventually(Duration::from_secs(20), "every reading in its route", || async {
            Ok(c.count("SELECT count(*) FROM power").await? == 2
                && c.count("SELECT count(*) FROM temps").await? == 2
                && c.count("SELECT count(*) FROM gateway").await? == 2
                && c.count("SELECT count(*) FROM dead_letters").await? == 1)
        })
        .await?;
        let db = c.pg.client().await?;
        let states: Vec<(String, String)> = db
            .query("SELECT device, state FROM power ORDER BY device", &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        ensure!(
            states == [("plug-1".into(), "ON".into()), ("plug-2".into(), "OFF".into())],
            "{states:?}"
        );
        let temps: Vec<(String, f64, f64)> = db
            .query(
                "SELECT device, extract(epoch FROM at)::float8, temp FROM temps ORDER BY at",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        ensure!(
            temps
                == [
                    ("urn:dev:ow:7".into(), 1.7e9, 21.5),
                    ("urn:dev:ow:7".into(), 1.7e9 + 60.0, 22.0)
                ],
            "{temps:?}"
        );
        // The element whose `v` is no integer is its own dead letter, naming its place.
        let (reason, error, payload): (String, String, Vec<u8>) = {
            let r = db
                .query_one("SELECT reason, error, payload FROM dead_letters", &[])
                .await?;
            (r.get(0), r.get(1), r.get(2))
        };
        ensure!(
            reason == "mapping_failed" && error.starts_with("element 3 of 3: route gateway"),
            "{reason}: {error}"
        );
        ensure!(
            payload == br#"{"device_id":"m3","ts":1700000000,"v":"three"}"#,
            "the element's own bytes: {}",
            String::from_utf8_lossy(&payload)
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// The default decoder with the bare values of `stat/+/POWER` (their own device pattern) and
/// the SenML of `senml/#`.
pub(crate) fn decoder() -> Decoder {
    Decoder::new("devices/{device_id}/#", 256 * 1024).with_formats(&[
        FormatSpec {
            topics: vec!["stat/+/POWER".into()],
            format: Format::Value,
            device_topic_pattern: Some("stat/{device_id}/POWER".into()),
        },
        FormatSpec {
            topics: vec!["senml/#".into()],
            format: Format::Senml,
            device_topic_pattern: None,
        },
    ])
}

/// A message as the ingest hands it over: packet id and DUP flag as received.
pub(crate) fn inbound(topic: &str, payload: &[u8], pkid: u16, dup: bool) -> Inbound {
    let mut m = Inbound::detached(topic, payload);
    m.pkid = pkid;
    m.dup = dup;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_array_pack_or_value_is_stored_once_and_a_new_publish_again() -> Result<()> {
    let pg = migrated().await?;
    let db = pg.client().await?;
    let decoder = decoder();
    let untimed_array =
        br#"[{"device_id":"a","v":1},{"device_id":"b","v":2},{"device_id":"a","w":3}]"#;
    let timed_array =
        br#"[{"device_id":"c","ts":1700000000,"v":1},{"device_id":"d","ts":1700000000,"v":2}]"#;
    let pack = br#"[{"bn":"urn:x:1:","n":"t","v":1},{"bn":"urn:x:2:","n":"t","v":2}]"#;
    let messages = |dup: bool| {
        vec![
            inbound("gw/1/up", untimed_array, 11, dup),
            inbound("gw/1/timed", timed_array, 12, dup),
            inbound("senml/p", pack, 13, dup),
            inbound("stat/plug/POWER", b"23.5", 14, dup),
        ]
    };
    let counts = || async {
        let topics = ["gw/1/up", "gw/1/timed", "senml/p", "stat/plug/POWER"];
        let mut out = Vec::new();
        for t in topics {
            let n: i64 = db
                .query_one("SELECT count(*) FROM telemetry WHERE topic = $1", &[&t])
                .await?
                .get(0);
            out.push(n);
        }
        anyhow::Ok(out)
    };
    let cfg = || writer_config_with(&pg, 1000, decoder.clone());
    write_inbound(cfg(), messages(false)).await?;
    // Untimed: one reading per device (a's two elements agree, so they are one reading).
    ensure!(counts().await? == [2, 2, 2, 1], "{:?}", counts().await?);
    // The broker redelivers them all (DUP, same packet ids and bytes) on a later connection.
    write_inbound(cfg(), messages(true)).await?;
    ensure!(
        counts().await? == [2, 2, 2, 1],
        "stored twice: {:?}",
        counts().await?
    );
    // And inside one batch, the first delivery and its redelivery together.
    let mut both = vec![inbound("gw/2/up", untimed_array, 21, false)];
    both.push(inbound("gw/2/up", untimed_array, 21, true));
    write_inbound(cfg(), both).await?;
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM telemetry WHERE topic = 'gw/2/up'",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        n == 2,
        "{n} rows for one array and its redelivery in one batch"
    );
    let dead: i64 = db
        .query_one("SELECT count(*) FROM dead_letters", &[])
        .await?
        .get(0);
    ensure!(
        dead == 0,
        "{dead} dead letters: a redelivery is no conflict"
    );
    // A new publish of the same untimed bytes (no DUP) is new readings (G3).
    write_inbound(cfg(), messages(false)).await?;
    ensure!(
        counts().await? == [4, 2, 4, 2],
        "a new publish of untimed readings is stored again, a timed one is a duplicate: {:?}",
        counts().await?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_a_format_not_yet_configured_are_replayed_into_readings() {
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env
        .push(("MQTT_TOPICS", "stat/+/POWER,senml/#,gw/+/up".to_string()));
    let res = async {
        c.spawn("a")?;
        c.spawn("b")?;
        let (leader, _) = c.wait_leader().await?;
        let port = c.node(&leader).http_port();
        eventually(Duration::from_secs(20), "leading and subscribed", || {
            leading_and_subscribed(port)
        })
        .await?;
        let early = vec![
            ("stat/plug-1/POWER".to_string(), b"ON".to_vec()),
            ("stat/plug-2/POWER".to_string(), b"23.5".to_vec()),
            (
                "senml/kitchen".to_string(),
                br#"[{"bn":"urn:dev:ow:7:","bt":1.7e9,"n":"temp","v":21.5},{"n":"hum","v":40}]"#
                    .to_vec(),
            ),
        ];
        publish_all(c.mq.port, early).await?;
        // Read as JSON, the pack is an array of two records that are no readings (no device
        // id): two dead letters, one per element.
        eventually(Duration::from_secs(20), "dead-lettered without a format", || async {
            Ok(c.count("SELECT count(*) FROM dead_letters").await? == 4)
        })
        .await?;
        // The operator configures the formats: applied live, no node restarted.
        let file = c.logs.path().join("formats.toml");
        std::fs::write(&file, FORMATS)?;
        let (code, stdout, stderr) = out(&c.cli(&["config", "apply", &file.display().to_string()])?);
        ensure!(code == 0, "config apply: {stdout}{stderr}");
        ensure!(stdout.contains("formats changed"), "{stdout}");
        // A format filter nothing subscribes, and one an earlier entry shadows, are named.
        let odd = c.logs.path().join("odd.toml");
        std::fs::write(
            &odd,
            format!("{FORMATS}\n[[formats]]\ntopics = [\"tele/#\", \"stat/x/POWER\"]\nformat = \"senml\"\n"),
        )?;
        let (code, stdout, stderr) =
            out(&c.cli(&["config", "apply", "--dry-run", &odd.display().to_string()])?);
        ensure!(code == 0, "dry run: {stdout}{stderr}");
        ensure!(
            stdout.contains("note: formats[3] topic \"tele/#\" is not in MQTT_TOPICS")
                && stdout.contains("note: formats[3] topic \"stat/x/POWER\" is never read as senml: formats[1]"),
            "{stdout}"
        );
        // New messages are read with the new formats as soon as the leader runs the version.
        eventually(Duration::from_secs(20), "a new bare value is stored", || async {
            publish_all(c.mq.port, vec![("stat/plug-3/POWER".into(), b"true".to_vec())]).await?;
            Ok(c.count("SELECT count(*) FROM telemetry WHERE device_id = 'plug-3'").await? >= 1)
        })
        .await?;
        // The dead letters from before replay into readings.
        let (code, stdout, stderr) = out(&c.cli(&["replay"])?);
        ensure!(code == 0, "replay: {stdout}{stderr}");
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "dead letters left after the replay: {stdout}{stderr}\n{:?}",
            c.pg.client().await?.query("SELECT reason, error FROM dead_letters", &[]).await?.iter().map(|r| (r.get::<_, String>(0), r.get::<_, String>(1))).collect::<Vec<_>>()
        );
        let db = c.pg.client().await?;
        let rows: Vec<(String, String)> = db
            .query(
                "SELECT device_id, payload::text FROM telemetry
                 WHERE device_id <> 'plug-3' ORDER BY device_id",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        ensure!(
            rows == [
                ("plug-1".into(), r#"{"value": "ON"}"#.into()),
                ("plug-2".into(), r#"{"value": 23.5}"#.into()),
                (
                    "urn:dev:ow:7".into(),
                    r#"{"ts": "2023-11-14T22:13:20.000000Z", "hum": 40.0, "temp": 21.5, "device_id": "urn:dev:ow:7"}"#
                        .into()
                ),
            ],
            "{rows:?}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}
