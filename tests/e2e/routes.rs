//! Routes writing into tables the operator owns: every supported column kind from topic
//! segments, nested JSON paths, literals and the node's own facts; a message feeding two routes;
//! the default route kept for topics no route matches; both conflict modes with one key twice in
//! a batch; a mapping that fails and a value the table refuses, each dead-lettering only that
//! route's row; fencing of every route's insert; and no message lost across a failover.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use leasehold_store::{Fence, StoreError};
use leasehold_testkit::publish::publish_all;
use leasehold_testkit::{eventually, http, metric, Postgres};

use crate::helpers::{check, msg, owned_row, owned_writer, Cluster};

/// A cluster whose nodes run with `routes` as their config file, after `sql` created the
/// tables they write into.
pub(crate) async fn routed(sql: &str, routes: &str) -> Result<Cluster> {
    let c = Cluster::start().await?;
    c.pg.client().await?.batch_execute(sql).await?;
    std::fs::write(config(&c), routes)?;
    Ok(c)
}

/// The config file [`routed`] wrote.
pub(crate) fn config(c: &Cluster) -> std::path::PathBuf {
    c.logs.path().join("routes.toml")
}

/// Starts node `name` with the routes of [`routed`].
pub(crate) fn spawn(c: &mut Cluster, name: &str) -> Result<usize> {
    let file = config(c).display().to_string();
    c.spawn_args(name, &["--config", &file], &[])
}

pub(crate) async fn count_reaches(c: &Cluster, sql: &str, want: i64) -> Result<()> {
    eventually(
        Duration::from_secs(15),
        &format!("{sql} = {want}"),
        || async { Ok(c.count(sql).await? == want) },
    )
    .await?;
    Ok(())
}

pub(crate) async fn metrics(c: &Cluster, node: &str) -> Result<String> {
    Ok(http(c.node(node).http_port(), "GET", "/metrics").await?.1)
}

const EVERY_KIND: &str = "
    CREATE TABLE equipamentos_dados (
        equipamento_id  text        NOT NULL,
        timestamp_dados timestamptz NOT NULL,
        dados           jsonb       NOT NULL,
        fonte           varchar(10),
        processed_by    text,
        epoch           bigint,
        received        timestamptz,
        topic           text,
        voltage         numeric(6,2),
        first_amps      integer,
        small           smallint,
        big             bigint,
        ratio           double precision,
        f4              real,
        ok              boolean,
        uid             uuid,
        day             date,
        local_at        timestamp,
        readings        json,
        tag             char(4),
        inserted        timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (equipamento_id, timestamp_dados));
    CREATE SCHEMA audit;
    CREATE TABLE audit.\"Seen\" (topic text, seq int, dev text NOT NULL, PRIMARY KEY (topic, seq));";

const EVERY_KIND_ROUTES: &str = r#"
[[routes]]
name = "equipment"
topics = ["equipamentos/+/dados"]
table = "equipamentos_dados"
key = ["equipamento_id", "timestamp_dados"]

[routes.columns]
equipamento_id  = "topic[1]"
timestamp_dados = "timestamp"
dados           = "payload"
fonte           = "'MQTT'"
processed_by    = "written_by"
epoch           = "lease_epoch"
received        = "received_at"
topic           = "topic"
voltage         = "$.readings.voltage"
first_amps      = "$.phases[0].amps"
small           = "$.small"
big             = "$.big"
ratio           = "$.ratio"
f4              = "$.f4"
ok              = "$.ok"
uid             = "$.uid"
day             = "$.day"
local_at        = "$.ts"
readings        = "$.readings"
tag             = "$[\"tag.name\"]"
inserted        = "$.nowhere"

[[routes]]
name = "audit"
topics = ["equipamentos/#"]
table = 'audit."Seen"'
key = ["topic", "seq"]
on_conflict = "update"

[routes.columns]
topic = "topic"
seq   = "$.seq"
dev   = "device_id"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_column_is_filled_and_one_message_feeds_two_routes() {
    let mut c = routed(EVERY_KIND, EVERY_KIND_ROUTES)
        .await
        .expect("servers");
    let res = async {
        spawn(&mut c, "node-a")?;
        let (_, epoch) = c.wait_leader().await?;
        // A `devices` topic that no route matches: subscribed, and into telemetry.
        c.pg.client()
            .await?
            .execute(
                "INSERT INTO devices (device_id, topic) VALUES ('p1', 'devices/p1/status')",
                &[],
            )
            .await?;
        let port = c.node("node-a").http_port();
        eventually(Duration::from_secs(15), "the device topic subscribed", || async {
            let (_, body) = http(port, "GET", "/health/mqtt").await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            Ok(v["subscriptions"]["subscribed"] == 4 && v["subscriptions"]["pending"] == 0)
        })
        .await?;
        let body = |seq: u32, ts: &str| {
            format!(
                r#"{{"ts":"{ts}","seq":{seq},"device_id":"meter-{seq}","readings":{{"voltage":"229.47","phase":[1]}},"phases":[{{"amps":12}},{{"amps":13}}],"small":-7,"big":9007199254740993,"ratio":0.25,"f4":1.5,"ok":true,"uid":"A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11","day":"2026-03-04","tag.name":"ab"}}"#
            )
        };
        publish_all(
            c.mq.port,
            vec![
                msg("equipamentos/E1/dados", body(1, "2026-01-02T03:04:05.123456Z")),
                msg("equipamentos/E2/dados", body(2, "2026-01-02T03:04:06Z")),
                // Only the audit route matches this one.
                msg("equipamentos/E1/status", r#"{"seq":3,"device_id":"meter-3"}"#),
                // No route matches: the default route, as without routes.
                msg("devices/d1/telemetry", r#"{"ts":1700000000,"v":1}"#),
                msg("devices/p1/status", r#"{"ts":1700000000,"on":true}"#),
            ],
        )
        .await?;
        count_reaches(&c, "SELECT count(*) FROM equipamentos_dados", 2).await?;
        count_reaches(&c, r#"SELECT count(*) FROM audit."Seen""#, 3).await?;
        count_reaches(&c, "SELECT count(*) FROM telemetry", 2).await?;
        let db = c.pg.client().await?;
        let r = db
            .query_one(
                "SELECT timestamp_dados = '2026-01-02T03:04:05.123456Z', dados->>'seq', fonte,
                        processed_by, epoch, received IS NOT NULL AND inserted IS NOT NULL, topic,
                        voltage::text, first_amps, small, big, ratio, f4, ok, uid::text, day::text,
                        local_at::text, readings::jsonb = '{\"voltage\":\"229.47\",\"phase\":[1]}', tag
                 FROM equipamentos_dados WHERE equipamento_id = 'E1'",
                &[],
            )
            .await?;
        ensure!(r.get::<_, bool>(0), "timestamp_dados");
        ensure!(r.get::<_, String>(1) == "1", "dados: the whole payload");
        ensure!(r.get::<_, String>(2) == "MQTT", "fonte: the literal");
        ensure!(r.get::<_, String>(3) == "node-a", "processed_by: written_by");
        ensure!(r.get::<_, i64>(4) == epoch, "epoch: lease_epoch");
        ensure!(r.get::<_, bool>(5), "received_at, and a NULL filled by the default");
        ensure!(r.get::<_, String>(6) == "equipamentos/E1/dados", "topic");
        ensure!(r.get::<_, String>(7) == "229.47", "numeric from a numeric string");
        ensure!(r.get::<_, i32>(8) == 12, "nested path with an index");
        ensure!(r.get::<_, i16>(9) == -7, "smallint");
        ensure!(r.get::<_, i64>(10) == 9_007_199_254_740_993, "bigint beyond f64");
        ensure!(r.get::<_, f64>(11) == 0.25, "double");
        ensure!(r.get::<_, f32>(12) == 1.5, "real");
        ensure!(r.get::<_, bool>(13), "boolean");
        ensure!(
            r.get::<_, String>(14) == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "uuid"
        );
        ensure!(r.get::<_, String>(15) == "2026-03-04", "date");
        ensure!(
            r.get::<_, String>(16) == "2026-01-02 03:04:05.123456",
            "timestamp without time zone, in UTC: {}",
            r.get::<_, String>(16)
        );
        ensure!(r.get::<_, bool>(17), "json keeps the object");
        ensure!(r.get::<_, String>(18) == "ab  ", "a key with a dot");
        let devs: Vec<String> = db
            .query(r#"SELECT dev FROM audit."Seen" ORDER BY seq"#, &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ensure!(devs == ["meter-1", "meter-2", "meter-3"], "{devs:?}");
        ensure!(
            c.count("SELECT count(*) FROM telemetry WHERE topic LIKE 'equipamentos/%'")
                .await?
                == 0,
            "a routed message is not also written to telemetry"
        );
        ensure!(c.count("SELECT count(*) FROM dead_letters").await? == 0);
        let m = metrics(&c, "node-a").await?;
        for (route, n) in [("equipment", 2.0), ("audit", 3.0), ("default", 2.0)] {
            let name = format!("leasehold_messages_written_total{{route=\"{route}\"}}");
            ensure!(metric(&m, &name) == Some(n), "{name}:\n{m}");
        }
        let (_, health) = http(c.node("node-a").http_port(), "GET", "/health").await?;
        let v: serde_json::Value = serde_json::from_str(&health)?;
        let routes = v["routes"].as_array().context("routes in /health")?;
        ensure!(
            routes.len() == 2
                && routes[0]["name"] == "equipment"
                && routes[0]["table"] == "public.equipamentos_dados"
                && routes[0]["written"] == 2
                && routes[1]["table"] == "audit.Seen"
                && routes[1]["written"] == 3,
            "{health}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

const TWO_MODES: &str = "
    CREATE TABLE first_wins (id text, at timestamptz, v int, PRIMARY KEY (id, at));
    CREATE TABLE last_wins (id text, at timestamptz, v int, PRIMARY KEY (id, at));";

const TWO_MODES_ROUTES: &str = r#"
[[routes]]
name = "first"
topics = ["m/+"]
table = "first_wins"
key = ["id", "at"]
[routes.columns]
id = "topic[1]"
at = "timestamp"
v = "$.v"

[[routes]]
name = "last"
topics = ["m/+"]
table = "last_wins"
key = ["id", "at"]
on_conflict = "update"
[routes.columns]
id = "topic[1]"
at = "timestamp"
v = "$.v"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_write_wins_or_last_write_wins_even_for_one_key_twice_in_a_batch() {
    let mut c = routed(TWO_MODES, TWO_MODES_ROUTES).await.expect("servers");
    // One batch for everything published at once.
    c.extra_env.push(("BATCH_MAX_WAIT", "2s".to_string()));
    let res = async {
        spawn(&mut c, "node-a")?;
        c.wait_leader().await?;
        let t = r#""ts":1700000000"#;
        publish_all(
            c.mq.port,
            vec![
                msg("m/a", format!(r#"{{{t},"v":1}}"#)),
                msg("m/a", format!(r#"{{"v":1,{t}}}"#)),
                msg("m/a", format!(r#"{{{t},"v":2}}"#)),
                msg("m/b", format!(r#"{{{t},"v":5}}"#)),
            ],
        )
        .await?;
        count_reaches(&c, "SELECT count(*) FROM last_wins WHERE v = 2", 1).await?;
        // A later batch: against the stored rows.
        publish_all(c.mq.port, vec![msg("m/b", format!(r#"{{{t},"v":6}}"#))]).await?;
        count_reaches(
            &c,
            "SELECT count(*) FROM last_wins WHERE id = 'b' AND v = 6",
            1,
        )
        .await?;
        count_reaches(
            &c,
            "SELECT count(*) FROM dead_letters WHERE route = 'first' AND reason = 'conflict'",
            2,
        )
        .await?;
        let db = c.pg.client().await?;
        let values = |table: &'static str| {
            let db = &db;
            async move {
                let rows = db
                    .query(&format!("SELECT id, v FROM {table} ORDER BY id"), &[])
                    .await?;
                anyhow::Ok(
                    rows.iter()
                        .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1)))
                        .collect::<Vec<_>>(),
                )
            }
        };
        let first = values("first_wins").await?;
        ensure!(first == [("a".into(), 1), ("b".into(), 5)], "{first:?}");
        let last = values("last_wins").await?;
        ensure!(last == [("a".into(), 2), ("b".into(), 6)], "{last:?}");
        let errors: Vec<String> = db
            .query(
                "SELECT error FROM dead_letters WHERE route = 'first' ORDER BY id",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ensure!(
            errors
                .iter()
                .all(|e| e.contains("route first: conflict") && e.contains("key (id, at) = (")),
            "{errors:?}"
        );
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 2,
            "only the first-wins route's conflicts are dead letters"
        );
        let m = metrics(&c, "node-a").await?;
        for (name, want) in [
            ("leasehold_messages_duplicate_total{route=\"first\"}", 1.0),
            ("leasehold_messages_conflict_total{route=\"first\"}", 2.0),
            ("leasehold_messages_written_total{route=\"first\"}", 2.0),
            ("leasehold_messages_conflict_total{route=\"last\"}", 0.0),
            ("leasehold_messages_written_total{route=\"last\"}", 5.0),
            (
                "leasehold_messages_dead_lettered_total{reason=\"conflict\",route=\"first\"}",
                2.0,
            ),
            // Two batches: the four messages published together shared the first.
            ("leasehold_batch_rows_count", 2.0),
            ("leasehold_batch_rows_sum", 5.0),
        ] {
            ensure!(metric(&m, name) == Some(want), "{name} != {want}:\n{m}");
        }
        Ok(())
    }
    .await;
    check(&c, res);
}

const STRICT: &str = "
    CREATE TABLE strict (id text PRIMARY KEY, v int NOT NULL, code varchar(3));
    CREATE TABLE everything (topic text, seq int, PRIMARY KEY (topic, seq));";

const STRICT_ROUTES: &str = r#"
[[routes]]
name = "strict"
topics = ["s/+"]
table = "strict"
key = ["id"]
[routes.columns]
id = "$.id"
v = "$.v"
code = "$.code"

[[routes]]
name = "all"
topics = ["s/#"]
table = "everything"
key = ["topic", "seq"]
[routes.columns]
topic = "topic"
seq = "$.seq"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_mapping_or_a_refused_value_dead_letters_only_that_routes_row() {
    let mut c = routed(STRICT, STRICT_ROUTES).await.expect("servers");
    let res = async {
        spawn(&mut c, "node-a")?;
        c.wait_leader().await?;
        publish_all(
            c.mq.port,
            vec![
                msg("s/x", r#"{"id":"a","seq":1,"v":1,"code":"ok"}"#),
                msg("s/x", r#"{"id":"b","seq":2,"v":"abc"}"#),
                msg("s/x", r#"{"id":"c","seq":3}"#),
                msg("s/x", r#"{"id":"d","seq":4,"v":4,"code":"TOOLONG"}"#),
                msg("s/x", r#"{"id":"e","seq":5,"v":5}"#),
                msg("s/x", "not json"),
            ],
        )
        .await?;
        count_reaches(&c, "SELECT count(*) FROM dead_letters", 4).await?;
        count_reaches(&c, "SELECT count(*) FROM everything", 5).await?;
        let db = c.pg.client().await?;
        let ids: Vec<String> = db
            .query("SELECT id FROM strict ORDER BY id", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ensure!(ids == ["a", "e"], "{ids:?}");
        let dead: Vec<(String, String, String)> = db
            .query(
                "SELECT route, reason, error FROM dead_letters ORDER BY id",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let find = |reason: &str, text: &str| {
            dead.iter()
                .any(|(_, r, e)| r == reason && e.contains(text))
        };
        ensure!(
            find("mapping_failed", r#"route strict: column "v": the string "abc" is not an integer"#),
            "{dead:#?}"
        );
        ensure!(
            find("mapping_failed", r#"route strict: column "v": no value (NULL) for a NOT NULL column"#),
            "{dead:#?}"
        );
        ensure!(
            find("rejected_by_database", "route strict: PostgreSQL rejected the row: value too long for type character varying(3)"),
            "{dead:#?}"
        );
        ensure!(
            dead.iter()
                .any(|(route, r, _)| route == "strict,all" && r == "not_json"),
            "one dead letter naming both routes: {dead:#?}"
        );
        ensure!(
            dead.iter().filter(|(route, _, _)| route == "strict").count() == 3,
            "{dead:#?}"
        );
        let m = metrics(&c, "node-a").await?;
        ensure!(
            metric(&m, "leasehold_messages_dead_lettered_total{route=\"strict\"}") == Some(3.0),
            "{m}"
        );
        ensure!(
            metric(&m, "leasehold_messages_written_total{route=\"all\"}") == Some(5.0),
            "{m}"
        );
        ensure!(c.node_mut("node-a").try_status().is_none(), "node exited");
        // `leasehold status` with the same configuration shows every route and its dead letters
        // (the one naming both routes counts for each).
        let file = config(&c).display().to_string();
        let out = c.cli(&["status", "--config", &file])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = |start: &str| text.lines().find(|l| l.starts_with(start)).unwrap_or("");
        ensure!(
            line("ROUTE    default -> telemetry").ends_with(": 0 dead letters in the last hour")
                && line("ROUTE    strict -> strict [s/+]")
                    .ends_with(": 4 dead letters in the last hour")
                && line("ROUTE    all -> everything [s/#]")
                    .ends_with(": 1 dead letters in the last hour"),
            "{text}"
        );
        let out = c.cli(&["status", "--json", "--config", &file])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let dead = |name: &str| {
            v["routes"]
                .as_array()
                .and_then(|rs| rs.iter().find(|r| r["name"] == name))
                .map(|r| r["dead_letters_last_hour"].clone())
        };
        ensure!(
            dead("strict") == Some(4.into()) && dead("all") == Some(1.into()) && dead("default") == Some(0.into()),
            "{v:#}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test]
async fn a_writer_whose_lease_was_taken_over_commits_no_row_into_a_route() -> Result<()> {
    let pg = Postgres::start().await?;
    let mut admin = leasehold_store::connect(&pg.url(), "test").await?;
    leasehold_store::migrate(&mut admin).await?;
    admin
        .batch_execute(
            "CREATE TABLE owned (id text PRIMARY KEY, v int);
             INSERT INTO instance_lock (service_name, holder_id, instance_id, epoch, expires_at)
             VALUES ('mqtt-ingest', 'h1', 'a', 7, now() + interval '1 minute')",
        )
        .await?;
    let mut w = owned_writer(&pg, &admin).await?;
    let fence = Fence {
        lease_name: "mqtt-ingest".into(),
        holder_id: "h1".into(),
        epoch: 7,
    };
    let row = |idx: usize, id: &str| owned_row(idx, id, 1, 1, false);
    let out = w.write(&fence, &[row(0, "x")], &[]).await?;
    ensure!(out.routes[1].written == 1, "{out:?}");
    admin
        .execute(
            "UPDATE instance_lock SET holder_id = 'h2', instance_id = 'b', epoch = 8",
            &[],
        )
        .await?;
    let err = w.write(&fence, &[row(0, "y"), row(1, "z")], &[]).await;
    ensure!(
        matches!(err, Err(StoreError::Fenced { epoch: 7 })),
        "expected fenced, got {err:?}"
    );
    let n: i64 = admin
        .query_one("SELECT count(*) FROM owned", &[])
        .await?
        .get(0);
    ensure!(
        n == 1,
        "{n} rows: a fenced writer committed into the route's table"
    );
    Ok(())
}

const FAILOVER: &str = "
    CREATE TABLE left_side (seq int PRIMARY KEY, v int);
    CREATE TABLE right_side (seq int PRIMARY KEY, at timestamptz NOT NULL);";

const FAILOVER_ROUTES: &str = r#"
[[routes]]
name = "left"
topics = ["f/+"]
table = "left_side"
key = ["seq"]
[routes.columns]
seq = "$.seq"
v = "$.v"

[[routes]]
name = "right"
topics = ["f/#"]
table = "right_side"
key = ["seq"]
on_conflict = "update"
[routes.columns]
seq = "$.seq"
at = "timestamp"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_reaches_every_route_across_a_leader_killed_mid_stream() {
    let mut c = routed(FAILOVER, FAILOVER_ROUTES).await.expect("servers");
    let res = async {
        spawn(&mut c, "node-a")?;
        spawn(&mut c, "node-b")?;
        let (leader, _) = c.wait_leader().await?;
        let batch = |from: u32, to: u32| {
            (from..to)
                .map(|s| {
                    msg(
                        &format!("f/{}", s % 7),
                        format!(r#"{{"seq":{s},"v":{s},"ts":{}}}"#, 1_700_000_000 + s),
                    )
                })
                .collect::<Vec<_>>()
        };
        publish_all(c.mq.port, batch(0, 150)).await?;
        // Killed with whatever it has not committed or acknowledged yet.
        c.node_mut(&leader).kill9();
        publish_all(c.mq.port, batch(150, 300)).await?;
        for table in ["left_side", "right_side"] {
            eventually(
                Duration::from_secs(30),
                &format!("300 rows in {table}"),
                || async { Ok(c.count(&format!("SELECT count(*) FROM {table}")).await? == 300) },
            )
            .await?;
            ensure!(
                c.count(&format!(
                    "SELECT count(DISTINCT seq) FROM {table} WHERE seq BETWEEN 0 AND 299"
                ))
                .await?
                    == 300
            );
        }
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "a redelivery is a duplicate, not a conflict"
        );
        ensure!(c.count("SELECT count(*) FROM telemetry").await? == 0);
        let survivor = c.other_than(&leader);
        let m = metrics(&c, &survivor).await?;
        ensure!(
            metric(&m, "leasehold_messages_written_total{route=\"left\"}").unwrap_or(0.0) > 0.0,
            "the standby took over and wrote:\n{m}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test]
async fn a_redelivered_conflict_is_one_dead_letter_and_a_row_a_trigger_skips_is_not_lost(
) -> Result<()> {
    let pg = Postgres::start().await?;
    let mut admin = leasehold_store::connect(&pg.url(), "test").await?;
    leasehold_store::migrate(&mut admin).await?;
    admin
        .batch_execute(
            "CREATE TABLE owned (id text PRIMARY KEY, v int);
             CREATE FUNCTION skip_negative() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF NEW.v < 0 THEN RETURN NULL; END IF; RETURN NEW; END $$;
             CREATE TRIGGER skip_negative BEFORE INSERT ON owned
                 FOR EACH ROW EXECUTE FUNCTION skip_negative();
             INSERT INTO instance_lock (service_name, holder_id, instance_id, epoch, expires_at)
             VALUES ('mqtt-ingest', 'h1', 'a', 1, now() + interval '1 minute')",
        )
        .await?;
    let mut w = owned_writer(&pg, &admin).await?;
    let fence = Fence {
        lease_name: "mqtt-ingest".into(),
        holder_id: "h1".into(),
        epoch: 1,
    };
    let row = |id: &str, v: i32, dup: bool| owned_row(0, id, v, 9, dup);
    let out = w.write(&fence, &[row("x", 1, false)], &[]).await?;
    ensure!(out.routes[1].written == 1, "{out:?}");
    let out = w.write(&fence, &[row("x", 2, false)], &[]).await?;
    ensure!(out.routes[1].conflicts == [0], "{out:?}");
    // The broker redelivers the conflicting message (DUP, same packet id and bytes).
    let out = w.write(&fence, &[row("x", 2, true)], &[]).await?;
    ensure!(
        out.routes[1].conflicts.is_empty() && out.routes[1].duplicates == [0],
        "{out:?}"
    );
    let out = w.write(&fence, &[row("y", -1, false)], &[]).await?;
    ensure!(out.routes[1].unstored == [0], "{out:?}");
    let dead: Vec<(String, String)> = admin
        .query("SELECT reason, route FROM dead_letters ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    ensure!(
        dead == [
            ("conflict".to_string(), "owned".to_string()),
            ("not_stored".to_string(), "owned".to_string())
        ],
        "{dead:?}"
    );
    Ok(())
}
