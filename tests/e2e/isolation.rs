//! A broken route stops only itself, and dead letters can be replayed. A route's table renamed
//! column, dropped, or its grant revoked, each while the default route streams and a second
//! route flows: only that route is suspended (its messages `route_unavailable` dead letters),
//! everything else keeps flowing; once the table is fixed the route resumes by itself and replays
//! its own dead letters. `leasehold replay`: a widened column, a fixed mapping, two replays at
//! once across a leader's `kill -9`, and a dry run.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use leasehold_testkit::publish::{publish_all, Stream};
use leasehold_testkit::{eventually, http};

use crate::helpers::{check, msg, out, Cluster};

const TABLES: &str = "
CREATE TABLE plant (device text, ts timestamptz, temp numeric, PRIMARY KEY (device, ts));
CREATE TABLE other (device text, ts timestamptz, v numeric, PRIMARY KEY (device, ts));";

const ROUTES: &str = r#"
[[routes]]
name = "plant"
topics = ["plant/+/data"]
table = "plant"
key = ["device", "ts"]
[routes.columns]
device = "topic[1]"
ts = "timestamp"
temp = "$.temp"

[[routes]]
name = "other"
topics = ["other/+/data"]
table = "other"
key = ["device", "ts"]
[routes.columns]
device = "topic[1]"
ts = "timestamp"
v = "$.temp"
"#;

const LIMITED: &str = "CREATE ROLE limited LOGIN;
GRANT USAGE, CREATE ON SCHEMA public TO limited;
GRANT ALL ON ALL TABLES IN SCHEMA public TO limited;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO limited;";

/// `n` readings on `<prefix>/<device>/data` from `from`, each its own timestamp.
fn readings(prefix: &str, from: u64, n: u64) -> Vec<(String, Vec<u8>)> {
    let base = chrono::DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_default();
    (from..from + n)
        .map(|i| {
            let ts = (base + chrono::Duration::seconds(i as i64)).to_rfc3339();
            msg(
                &format!("{prefix}/d{}/data", i % 3),
                format!("{{\"ts\":\"{ts}\",\"temp\":{i}}}"),
            )
        })
        .collect()
}

async fn count_is(c: &Cluster, sql: &str, want: i64) -> Result<()> {
    eventually(
        Duration::from_secs(30),
        &format!("{sql} = {want}"),
        || async { Ok(c.count(sql).await? == want) },
    )
    .await?;
    Ok(())
}

/// [`ROUTES`] as the config file nodes are started with.
fn routes_file(c: &Cluster) -> Result<String> {
    let file = c.logs.path().join("routes.toml");
    std::fs::write(&file, ROUTES)?;
    Ok(file.display().to_string())
}

/// The schema migrated, [`TABLES`] created, and [`ROUTES`] as the config file nodes start with.
async fn with_tables(c: &Cluster) -> Result<String> {
    let (code, so, err) = out(&c.cli(&["migrate"])?);
    ensure!(code == 0, "{so}{err}");
    c.pg.client().await?.batch_execute(TABLES).await?;
    routes_file(c)
}

/// Waits, evaluating the alerts on the node at `port`, until the `route_suspended` alert naming
/// route `plant` is open (`open`, within 20 s) or resolved (within 30 s).
async fn plant_alert_open(c: &Cluster, port: u16, open: bool) -> Result<()> {
    let alert = "SELECT count(*) FROM alerts WHERE kind = 'route_suspended' AND resolved_at IS NULL AND message LIKE '%plant%'";
    eventually(
        Duration::from_secs(if open { 20 } else { 30 }),
        &format!("route_suspended of plant open: {open}"),
        || async {
            http(port, "POST", "/health/alerts/check").await?;
            Ok(c.count(alert).await? == i64::from(open))
        },
    )
    .await?;
    Ok(())
}

const UNAVAILABLE: &str =
    "SELECT count(*) FROM dead_letters WHERE reason = 'route_unavailable' AND route = 'plant'";

/// The table of route `plant` broken by `break_sql` (as a superuser) while the default route
/// streams and route `other` flows, then fixed by `fix_sql`; `plant_kept` of its 10 rows from
/// before the break survive the fix (a dropped table loses them).
async fn only_its_route_stops(
    case: &str,
    break_sql: &str,
    fix_sql: &str,
    limited: bool,
    plant_kept: i64,
) {
    let mut c = Cluster::start().await.expect("cluster");
    let res = async {
        let (code, so, err) = out(&c.cli(&["migrate"])?);
        ensure!(code == 0, "{so}{err}");
        let db = c.pg.client().await?;
        db.batch_execute(TABLES).await?;
        if limited {
            db.batch_execute(LIMITED).await?;
        }
        let file = routes_file(&c)?;
        let env: Vec<(&'static str, String)> = match limited {
            true => vec![("DATABASE_URL", c.pg.url_as("limited"))],
            false => Vec::new(),
        };
        c.spawn_args("a", &["--config", &file], &env)?;
        c.spawn_args("b", &["--config", &file], &env)?;
        let (leader, epoch) = c.wait_leader().await?;
        let stream = Stream::start(c.mq.port, &format!("iso-{case}"), 10, 100);
        publish_all(c.mq.port, readings("plant", 0, 10)).await?;
        publish_all(c.mq.port, readings("other", 0, 10)).await?;
        count_is(&c, "SELECT count(*) FROM plant", 10).await?;
        count_is(&c, "SELECT count(*) FROM other", 10).await?;

        db.batch_execute(break_sql).await?;
        let written_before = c.count("SELECT count(*) FROM telemetry").await?;
        publish_all(c.mq.port, readings("plant", 10, 40)).await?;
        publish_all(c.mq.port, readings("other", 10, 40)).await?;
        // Every other route and the default route keep flowing; the broken one waits.
        count_is(&c, "SELECT count(*) FROM other", 50).await?;
        count_is(&c, UNAVAILABLE, 40).await?;
        ensure!(
            c.count("SELECT count(*) FROM telemetry").await? > written_before,
            "the default route stopped while a route's table was broken"
        );
        let port = c.node(&leader).http_port();
        let (_, body) = http(port, "GET", "/health").await?;
        let h: serde_json::Value = serde_json::from_str(&body)?;
        let plant = h["routes"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["name"] == "plant"))
            .context("plant in /health routes")?;
        ensure!(plant["suspended"].is_string(), "not shown suspended: {h}");
        let (_, m) = http(port, "GET", "/metrics").await?;
        ensure!(
            m.contains("leasehold_route_suspended{route=\"plant\"} 1"),
            "no suspended gauge"
        );
        let err: String = db
            .query_one(
                "SELECT error FROM dead_letters WHERE reason = 'route_unavailable' LIMIT 1",
                &[],
            )
            .await?
            .get(0);
        ensure!(err.contains("route plant is suspended"), "{err}");
        plant_alert_open(&c, port, true).await?;
        let (_, so, _) = out(&c.cli(&["status"])?);
        ensure!(so.contains("ROUTE    plant SUSPENDED"), "{so}");
        // A node (re)started meanwhile starts, with the route suspended: a restart of both
        // hosts during a table's migration still leaves a leader.
        c.spawn_args("late", &["--config", &file], &env)?;
        eventually(
            Duration::from_secs(20),
            "the late node runs with plant suspended",
            || async {
                let (_, body) = http(c.node("late").http_port(), "GET", "/health").await?;
                // A rule is no catalog problem: a node sees it only when it writes.
                let suspended = matches!(case, "rule" | "trigger")
                    || c.node("late").log().contains("runs suspended");
                Ok(body.contains("\"config\"") && suspended)
            },
        )
        .await?;

        // Fixed: it resumes by itself and replays its own dead letters.
        db.batch_execute(fix_sql).await?;
        count_is(&c, UNAVAILABLE, 0).await?;
        count_is(&c, "SELECT count(*) FROM plant", plant_kept + 40).await?;
        let n = stream.stop().await?;
        c.assert_exactly_once(&format!("iso-{case}"), n).await?;
        ensure!(c.count("SELECT count(*) FROM other").await? == 50, "other");
        let (still, now) = c.wait_leader().await?;
        ensure!(
            still == leader && now == epoch,
            "no failover needed: {leader}@{epoch} -> {still}@{now}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test]
async fn a_renamed_column_suspends_only_its_route() {
    only_its_route_stops(
        "rename",
        "ALTER TABLE plant RENAME COLUMN temp TO temperature",
        "ALTER TABLE plant RENAME COLUMN temperature TO temp",
        false,
        10,
    )
    .await;
}

#[tokio::test]
async fn a_dropped_table_suspends_only_its_route() {
    only_its_route_stops(
        "drop",
        "DROP TABLE plant",
        "CREATE TABLE plant (device text, ts timestamptz, temp numeric, PRIMARY KEY (device, ts))",
        false,
        0,
    )
    .await;
}

#[tokio::test]
async fn a_revoked_grant_suspends_only_its_route() {
    only_its_route_stops(
        "revoke",
        "REVOKE INSERT ON plant FROM limited",
        "GRANT INSERT ON plant TO limited",
        true,
        10,
    )
    .await;
}

const NARROW: &str =
    "CREATE TABLE narrow (device text, ts timestamptz, label varchar(3), PRIMARY KEY (device, ts))";

const NARROW_ROUTE: &str = r#"
[[routes]]
name = "narrow"
topics = ["narrow/+/data"]
table = "narrow"
key = ["device", "ts"]
[routes.columns]
device = "topic[1]"
ts = "timestamp"
label = "$.label"
"#;

/// `n` readings whose label does not fit `varchar(3)`.
fn long_labels(from: u64, n: u64) -> Vec<(String, Vec<u8>)> {
    (from..from + n)
        .map(|i| {
            msg(
                &format!("narrow/n{}/data", i % 5),
                format!(
                    "{{\"ts\":\"2026-12-01T00:00:{:02}.{:06}Z\",\"label\":\"too-long-{i}\",\"seq\":{i},\"run\":\"narrow\"}}",
                    i / 1_000_000 % 60,
                    i % 1_000_000
                ),
            )
        })
        .collect()
}

/// Replay counts from its summary table: (processed, stored).
fn replayed(stdout: &str) -> (i64, i64) {
    let num = |label: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(label))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1)
    };
    (num("processed"), num("stored (removed)"))
}

/// `leasehold <args>` against the cluster's database, running, its output piped.
fn replay_child(c: &Cluster, args: &[&str]) -> std::io::Result<std::process::Child> {
    std::process::Command::new(&c.bin)
        .args(args)
        .args(["--database-url", c.pg.url().as_str()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
}

async fn narrow_cluster(n: u64) -> Result<Cluster> {
    let mut c = Cluster::start().await?;
    c.pg.client().await?.batch_execute(NARROW).await?;
    let file = c.logs.path().join("narrow.toml");
    std::fs::write(&file, NARROW_ROUTE)?;
    let file = file.display().to_string();
    c.spawn_args("a", &["--config", &file], &[])?;
    c.spawn_args("b", &["--config", &file], &[])?;
    c.wait_leader().await?;
    publish_all(c.mq.port, long_labels(0, n)).await?;
    count_is(
        &c,
        "SELECT count(*) FROM dead_letters WHERE route = 'narrow' AND reason = 'rejected_by_database'",
        n as i64,
    )
    .await?;
    Ok(c)
}

#[tokio::test]
async fn a_widened_column_replays_its_dead_letters_and_a_dry_run_changes_nothing() {
    let c = narrow_cluster(30).await.expect("cluster");
    let res = async {
        let db = c.pg.client().await?;
        db.batch_execute("ALTER TABLE narrow ALTER COLUMN label TYPE text")
            .await?;
        let (code, so, err) = out(&c.cli(&["replay", "--route", "narrow", "--dry-run"])?);
        ensure!(
            code == 0 && so.contains("dry run") && replayed(&so) == (30, 30),
            "exit {code}: {so}{err}"
        );
        ensure!(
            c.count("SELECT count(*) FROM narrow").await? == 0,
            "a dry run wrote rows"
        );
        // Ten of them received two hours ago: `--since 1h` leaves them.
        db.batch_execute(
            "UPDATE dead_letters SET received_at = received_at - interval '2 hours'
             WHERE id IN (SELECT id FROM dead_letters ORDER BY id LIMIT 10)",
        )
        .await?;
        let (code, so, err) = out(&c.cli(&["replay", "--route", "narrow", "--since", "1h"])?);
        ensure!(
            code == 0 && replayed(&so) == (20, 20),
            "exit {code}: {so}{err}"
        );
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 10,
            "the older ten"
        );
        // A trigger's notices, one per row, are read as the replay goes (and logged at
        // debug), not left to pile up on its connection.
        db.batch_execute(
            "CREATE FUNCTION narrow_notice() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE NOTICE 'narrow took %', NEW.label; RETURN NEW; END $$;
             CREATE TRIGGER narrow_notice BEFORE INSERT ON narrow
             FOR EACH ROW EXECUTE FUNCTION narrow_notice()",
        )
        .await?;
        let (code, so, err) = out(&c.cli_env(
            &[
                "replay",
                "--route",
                "narrow",
                "--reason",
                "rejected_by_database",
            ],
            &[("LOG_LEVEL", "debug".into())],
        )?);
        ensure!(
            code == 0 && replayed(&so) == (10, 10),
            "exit {code}: {so}{err}"
        );
        // Distinct rows: a chunk retried (halved, or fenced) raises its rows' notices again.
        let took: std::collections::BTreeSet<&str> = err
            .split("narrow took ")
            .skip(1)
            .filter_map(|rest| rest.split(|c: char| c == '"' || c.is_whitespace()).next())
            .collect();
        ensure!(
            took.len() == 10 && took.iter().all(|l| l.starts_with("too-long-")),
            "notices read of {} rows, not 10: {took:?}",
            took.len()
        );
        ensure!(c.count("SELECT count(*) FROM narrow").await? == 30, "rows");
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "dead letters left"
        );
        // Their receipt times are the original ones.
        let kept = c
            .count("SELECT count(*) FROM narrow WHERE ts < '2026-12-02'")
            .await?;
        ensure!(kept == 30, "timestamps");
        let (code, so, _) = out(&c.cli(&["replay"])?);
        ensure!(
            code == 0 && replayed(&so) == (0, 0),
            "nothing left to replay: {so}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A chunk that cannot be written within the replay's hold limit (a sixth of the leader's TTL:
/// here a trigger that takes 40 ms a row) is halved until it can, not given up.
#[tokio::test]
async fn a_chunk_too_slow_for_the_hold_limit_is_replayed_in_halves() {
    let c = narrow_cluster(40).await.expect("cluster");
    let res = async {
        let db = c.pg.client().await?;
        // `attempts` counts the rows tried (a sequence: rolled back with nothing).
        db.batch_execute(
            "ALTER TABLE narrow ALTER COLUMN label TYPE text;
             CREATE SEQUENCE attempts;
             CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql
                 AS $$ BEGIN PERFORM nextval('attempts'); PERFORM pg_sleep(0.04); RETURN NEW; END $$;
             CREATE TRIGGER slow_row BEFORE INSERT ON narrow
                 FOR EACH ROW EXECUTE FUNCTION slow_row();",
        )
        .await?;
        let hold = leasehold_store::Fence::step_limit(leasehold_testkit::cluster::TTL);
        ensure!(
            hold < Duration::from_millis(40 * 40),
            "the chunk of 40 would fit {hold:?}"
        );
        let (code, so, err) = out(&c.cli(&["replay", "--route", "narrow"])?);
        ensure!(
            code == 0 && replayed(&so) == (40, 40),
            "exit {code}: {so}{err}"
        );
        ensure!(c.count("SELECT count(*) FROM narrow").await? == 40, "rows");
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "dead letters left"
        );
        // The whole chunk was tried first, and cut short at the hold limit.
        let tried = c.count("SELECT last_value FROM attempts").await?;
        ensure!(tried > 40, "{tried} rows tried: the chunk was not cut short");
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test]
async fn a_since_window_is_fixed_when_the_replay_starts() {
    let c = narrow_cluster(30).await.expect("cluster");
    let res = async {
        let db = c.pg.client().await?;
        db.batch_execute("ALTER TABLE narrow ALTER COLUMN label TYPE text")
            .await?;
        // The replay fixes its selection, then waits for the route's table (preparing its
        // insert) while the dead letters become exactly an hour old: outside `--since 1h` from
        // then on, inside it as it was when the replay started.
        let mut holder = c.pg.client().await?;
        let lock = holder.transaction().await?;
        lock.batch_execute("LOCK TABLE narrow IN ACCESS EXCLUSIVE MODE")
            .await?;
        let spawned: chrono::DateTime<chrono::Utc> =
            db.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
        let replay = replay_child(&c, &["replay", "--route", "narrow", "--since", "1h"])?;
        eventually(
            Duration::from_secs(60),
            "the replay waiting for narrow",
            || async {
                let n: i64 = db
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = 'leasehold-writer' AND backend_start > $1
                       AND wait_event_type = 'Lock'",
                        &[&spawned],
                    )
                    .await?
                    .get(0);
                Ok(n == 1)
            },
        )
        .await?;
        db.batch_execute(
            "UPDATE dead_letters SET received_at = clock_timestamp() - interval '1 hour'",
        )
        .await?;
        lock.commit().await?;
        let done = tokio::task::spawn_blocking(move || replay.wait_with_output()).await??;
        let (code, so, err) = out(&done);
        ensure!(
            code == 0 && so.starts_with("30 dead letters selected") && replayed(&so) == (30, 30),
            "exit {code}: {so}{err}"
        );
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "dead letters left"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// Replaying into a route that does not fit its table would only turn its dead letters into
/// `route_unavailable` ones, their words lost: they are left as they were.
#[tokio::test]
async fn dead_letters_of_a_route_that_does_not_fit_now_are_left_as_they_were() {
    let c = narrow_cluster(5).await.expect("cluster");
    let res = async {
        let db = c.pg.client().await?;
        db.batch_execute("ALTER TABLE narrow RENAME COLUMN label TO lbl")
            .await?;
        let stored = "SELECT string_agg(id || ':' || reason || ':' || error, ' ' ORDER BY id)
                      FROM dead_letters";
        let before: Option<String> = db.query_one(stored, &[]).await?.get(0);
        let (code, so, err) = out(&c.cli(&["replay", "--route", "narrow"])?);
        ensure!(
            code == 0
                && replayed(&so) == (5, 0)
                && so.contains("left as they were (its route does not fit its table now)"),
            "exit {code}: {so}{err}"
        );
        let after: Option<String> = db.query_one(stored, &[]).await?.get(0);
        ensure!(before == after, "{before:?}\nbecame\n{after:?}");
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A replay never cuts a stored payload, nor reads a cut one as the whole message.
#[tokio::test]
async fn a_payload_cut_when_received_or_over_the_limit_now_is_left_as_it_was() {
    let c = narrow_cluster(1).await.expect("cluster");
    let res = async {
        let db = c.pg.client().await?;
        // Over MAX_PAYLOAD_BYTES (256 KiB) when received: stored cut, its first bytes only.
        let big = format!(
            "{{\"device_id\":\"d1\",\"ts\":\"2026-12-01T00:00:00Z\",\"v\":\"{}\"}}",
            "x".repeat(300_000)
        );
        publish_all(c.mq.port, vec![msg("devices/d1/telemetry", big)]).await?;
        count_is(
            &c,
            "SELECT count(*) FROM dead_letters WHERE reason = 'too_large'",
            1,
        )
        .await?;
        // Whole and over the limit now (as after MAX_PAYLOAD_BYTES was lowered); and cut when
        // received, within the limit now (as after it was raised): 150,000 of 200,000 bytes.
        db.batch_execute(
            "INSERT INTO dead_letters (topic, payload, size, reason, error, received_at,
                                       written_by, lease_epoch, content_hash)
             SELECT topic, p, v.size, r, 'then', received_at, written_by, lease_epoch, md5(p)
             FROM dead_letters,
                  LATERAL (VALUES
                      (convert_to('{\"device_id\":\"d2\",\"ts\":\"2026-12-01T00:00:00Z\",\"v\":\"'
                                  || repeat('y', 300000) || '\"}', 'UTF8'), 300037, 'not_json'),
                      (convert_to('{\"device_id\":\"d3\",\"ts\":\"2026-12-01T00:00:00Z\",\"v\":\"'
                                  || repeat('z', 150000), 'UTF8'), 200000, 'too_large'))
                      AS v(p, size, r)
             WHERE reason = 'too_large'",
        )
        .await?;
        // Payloads, sizes and reasons (the first is refused again: a new id, its bytes intact).
        let stored =
            "SELECT string_agg(md5(payload) || ':' || size || ':' || reason, ' ' ORDER BY size)
             FROM dead_letters WHERE route IS NULL";
        let before: Option<String> = db.query_one(stored, &[]).await?.get(0);
        let (code, so, err) = out(&c.cli(&["replay", "--route", "default"])?);
        ensure!(
            code == 0
                && replayed(&so) == (3, 0)
                && so.contains("failing again: too_large")
                && so.lines().any(|l| l.starts_with(
                    "left as they were (over MAX_PAYLOAD_BYTES now, or cut when received)"
                ) && l.ends_with(" 2")),
            "exit {code}: {so}{err}"
        );
        let after: Option<String> = db.query_one(stored, &[]).await?.get(0);
        ensure!(before == after, "{before:?}\nbecame\n{after:?}");
        ensure!(
            c.count("SELECT count(*) FROM telemetry").await? == 0,
            "a cut payload was stored as a reading"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// Readings of one key are written one round after another in a chunk's transaction: together
/// they hold the lease row no longer than one statement may.
#[tokio::test]
async fn a_chunks_rounds_together_stay_within_the_hold_limit() {
    let c = narrow_cluster(1).await.expect("cluster");
    let res = async {
        let db = c.pg.client().await?;
        // 20 more readings of the one key, each with other content: 21 rounds of 150 ms.
        db.batch_execute(
            "ALTER TABLE narrow ALTER COLUMN label TYPE text;
             INSERT INTO dead_letters (topic, payload, size, reason, error, received_at,
                                       written_by, lease_epoch, content_hash, route)
             SELECT topic, p, octet_length(p), reason, error, received_at + n * interval '1 ms',
                    written_by, lease_epoch, md5(p), route
             FROM dead_letters, generate_series(1, 20) AS n,
                  convert_to(replace(convert_from(payload, 'UTF8'), 'too-long-0', 'other-' || n),
                             'UTF8') AS p;
             CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql
                 AS $$ BEGIN PERFORM pg_sleep(0.15); RETURN NEW; END $$;
             CREATE TRIGGER slow_row BEFORE INSERT ON narrow
                 FOR EACH ROW EXECUTE FUNCTION slow_row();",
        )
        .await?;
        let hold = leasehold_store::Fence::step_limit(leasehold_testkit::cluster::TTL);
        ensure!(
            hold < Duration::from_millis(21 * 150) / 2,
            "21 rounds would fit {hold:?}"
        );
        let epoch = "SELECT max(epoch) FROM instance_lock";
        let before = c.count(epoch).await?;
        let (code, so, err) = out(&c.cli(&["replay", "--route", "narrow"])?);
        ensure!(code == 0 && replayed(&so).0 == 21, "exit {code}: {so}{err}");
        // One reading stored, the others conflicts with it.
        ensure!(c.count("SELECT count(*) FROM narrow").await? == 1, "rows");
        let after = c.count(epoch).await?;
        ensure!(
            before == after,
            "the leader lost its lease: epoch {before} -> {after}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test]
async fn a_fixed_mapping_replays_through_the_new_configuration() {
    let c = narrow_cluster(20).await.expect("cluster");
    let res = async {
        // The fix is the mapping: the label goes through a wider field of the payload.
        let fixed = c.logs.path().join("fixed.toml");
        std::fs::write(
            &fixed,
            NARROW_ROUTE.replace("label = \"$.label\"", "label = \"$.seq\""),
        )?;
        let (code, so, err) = out(&c.cli(&["config", "apply", &fixed.display().to_string()])?);
        ensure!(code == 0, "{so}{err}");
        let (code, so, err) = out(&c.cli(&["replay", "--route", "narrow"])?);
        ensure!(
            code == 0 && replayed(&so) == (20, 20),
            "exit {code}: {so}{err}"
        );
        let labels = c
            .count("SELECT count(*) FROM narrow WHERE label ~ '^[0-9]+$'")
            .await?;
        ensure!(labels == 20, "{labels} rows through the new mapping");
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test]
async fn two_replays_at_once_across_a_leader_kill_store_each_dead_letter_once() {
    let mut c = narrow_cluster(3000).await.expect("cluster");
    let res = async {
        c.pg.client()
            .await?
            .batch_execute("ALTER TABLE narrow ALTER COLUMN label TYPE text")
            .await?;
        let args = ["replay", "--route", "narrow"];
        let (one, two) = (replay_child(&c, &args)?, replay_child(&c, &args)?);
        let (leader, _) = c.wait_leader().await?;
        c.node_mut(&leader).kill9();
        let one = one.wait_with_output()?;
        let two = two.wait_with_output()?;
        let (c1, s1, e1) = out(&one);
        let (c2, s2, e2) = out(&two);
        ensure!(c1 == 0 && c2 == 0, "{s1}{e1}\n{s2}{e2}");
        let (p1, st1) = replayed(&s1);
        let (p2, st2) = replayed(&s2);
        ensure!(p1 + p2 == 3000 && st1 + st2 == 3000, "{s1}\n{s2}");
        // Each says how many of those it selected the other held when it reached them.
        for (so, p) in [(&s1, p1), (&s2, p2)] {
            let first = |prefix: &str, at: usize| {
                so.lines()
                    .find(|l| l.starts_with(prefix))
                    .and_then(|l| l.split_whitespace().nth(at)?.parse::<i64>().ok())
            };
            let selected = first("", 0).unwrap_or(-1);
            let missed = first("not processed", 2).unwrap_or(0);
            ensure!(p + missed == selected, "{so}");
        }
        ensure!(
            c.count("SELECT count(*) FROM narrow").await? == 3000,
            "rows"
        );
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "dead letters left"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// Two routes take one topic and both refused the same messages: replaying their dead letters
/// writes each message once into each route, at its original receipt time.
#[tokio::test]
async fn a_message_dead_lettered_by_two_routes_is_replayed_once_into_each_at_its_receipt_time() {
    let mut c = Cluster::start().await.expect("cluster");
    let res = async {
        c.pg
            .client()
            .await?
            .batch_execute(
                "CREATE TABLE ta (device text, ts timestamptz, seq bigint CHECK (seq < 0), PRIMARY KEY (device, ts));
                 CREATE TABLE tb (device text, ts timestamptz, seq bigint CHECK (seq < 0), PRIMARY KEY (device, ts));",
            )
            .await?;
        let routes = ["ta", "tb"]
            .iter()
            .map(|t| format!("[[routes]]\nname = \"{t}\"\ntopics = [\"shared/+/data\"]\ntable = \"{t}\"\nkey = [\"device\", \"ts\"]\n[routes.columns]\ndevice = \"topic[1]\"\nts = \"timestamp\"\nseq = \"$.seq\"\n"))
            .collect::<String>();
        let file = c.logs.path().join("shared.toml");
        std::fs::write(&file, routes)?;
        c.spawn_args("a", &["--config", &file.display().to_string()], &[])?;
        c.wait_leader().await?;
        // No timestamp: the key's time is the receipt time.
        let msgs = (1..=3).map(|i| msg(&format!("shared/d{i}/data"), format!("{{\"seq\":{i}}}"))).collect();
        publish_all(c.mq.port, msgs).await?;
        count_is(&c, "SELECT count(*) FROM dead_letters WHERE reason = 'rejected_by_database'", 6).await?;
        let db = c.pg.client().await?;
        db.batch_execute("ALTER TABLE ta DROP CONSTRAINT ta_seq_check; ALTER TABLE tb DROP CONSTRAINT tb_seq_check;").await?;
        let (code, so, err) = out(&c.cli(&["replay"])?);
        ensure!(code == 0, "{so}{err}");
        for t in ["ta", "tb"] {
            ensure!(c.count(&format!("SELECT count(*) FROM {t}")).await? == 3, "{t}: {so}");
        }
        ensure!(c.count("SELECT count(*) FROM dead_letters").await? == 0, "left: {so}");
        // Both tables hold each message at the same instant: its receipt.
        let same = c
            .count("SELECT count(*) FROM ta JOIN tb USING (device, ts)")
            .await?;
        ensure!(same == 3, "receipt times not kept: {same} of 3 match");
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test]
async fn a_rule_that_refuses_inserts_suspends_only_its_route() {
    only_its_route_stops(
        "rule",
        "CREATE RULE no_insert AS ON INSERT TO plant DO INSTEAD NOTHING",
        "DROP RULE no_insert ON plant",
        false,
        10,
    )
    .await;
}

/// A column's type changed under a running route: the other routes keep flowing, the route is
/// prepared again for the new type by itself, and none of its messages is lost.
#[tokio::test]
async fn a_changed_column_type_costs_its_route_a_few_seconds_and_nothing_else() {
    let mut c = Cluster::start().await.expect("cluster");
    let res = async {
        let db = c.pg.client().await?;
        db.batch_execute(TABLES).await?;
        let file = routes_file(&c)?;
        c.spawn_args("a", &["--config", &file], &[])?;
        c.wait_leader().await?;
        let stream = Stream::start(c.mq.port, "iso-type", 10, 100);
        publish_all(c.mq.port, readings("plant", 0, 10)).await?;
        count_is(&c, "SELECT count(*) FROM plant", 10).await?;
        db.batch_execute("ALTER TABLE plant ALTER COLUMN temp TYPE text")
            .await?;
        publish_all(c.mq.port, readings("plant", 10, 40)).await?;
        publish_all(c.mq.port, readings("other", 0, 40)).await?;
        count_is(&c, "SELECT count(*) FROM other", 40).await?;
        count_is(&c, "SELECT count(*) FROM plant", 50).await?;
        count_is(&c, "SELECT count(*) FROM dead_letters", 0).await?;
        let n = stream.stop().await?;
        c.assert_exactly_once("iso-type", n).await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

/// The database read-only for a while (a promotion in progress, an operator's setting): the
/// connections opened meanwhile do not stay read-only once it is writable again — heartbeats,
/// the subscription ledger and a new version's topics work again.
#[tokio::test]
async fn a_read_only_episode_leaves_no_connection_read_only() {
    let mut c = Cluster::start().await.expect("cluster");
    let res = async {
        c.spawn("a")?;
        c.wait_leader().await?;
        let db = c.pg.client().await?;
        db.batch_execute(
            "ALTER DATABASE postgres SET default_transaction_read_only = on;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = 'postgres' AND pid <> pg_backend_pid();",
        )
        .await?;
        // The node reconnects while it is read-only.
        eventually(Duration::from_secs(20), "the node's connections are back", || async {
            Ok(c.count("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'leasehold%' AND pid <> pg_backend_pid()").await? >= 3)
        })
        .await?;
        db.batch_execute("ALTER DATABASE postgres RESET default_transaction_read_only").await?;
        let extra = c.logs.path().join("extra.toml");
        std::fs::write(&extra, "mqtt_topics = [\"devices/+/telemetry\", \"extra/+/data\"]\nbatch_max_wait = \"20ms\"\n")?;
        let (code, so, err) = out(&c.cli(&["config", "apply", &extra.display().to_string()])?);
        ensure!(code == 0, "{so}{err}");
        let port = c.node("a").http_port();
        eventually(Duration::from_secs(30), "the new topic subscribed", || async {
            Ok(leasehold_testkit::leading_and_subscribed(port).await.unwrap_or(false)
                && http(port, "GET", "/health/mqtt").await?.1.contains("\"subscribed\":2"))
        })
        .await?;
        publish_all(c.mq.port, readings("extra", 0, 10)).await?;
        // Without a device id these are dead letters: stored either way, so received.
        count_is(
            &c,
            "SELECT (SELECT count(*) FROM telemetry WHERE topic LIKE 'extra/%') + (SELECT count(*) FROM dead_letters WHERE topic LIKE 'extra/%')",
            10,
        )
        .await?;
        eventually(Duration::from_secs(20), "heartbeats again", || async {
            let (_, so, _) = out(&c.cli(&["status"])?);
            Ok(so.contains("NODES    1 alive"))
        })
        .await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A NOT NULL column added without a default refuses every row of its route: the route is
/// suspended (not every message dead-lettered one by one), the rest flows, and after the fix
/// nothing is missing.
#[tokio::test]
async fn a_not_null_column_added_suspends_its_route_instead_of_refusing_row_by_row() {
    let mut c = Cluster::start().await.expect("cluster");
    let res = async {
        let db = c.pg.client().await?;
        db.batch_execute(TABLES).await?;
        let file = routes_file(&c)?;
        c.spawn_args("a", &["--config", &file], &[])?;
        let (leader, _) = c.wait_leader().await?;
        db.batch_execute(
            "ALTER TABLE plant ADD COLUMN site text NOT NULL DEFAULT 'x';
             ALTER TABLE plant ALTER COLUMN site DROP DEFAULT;",
        )
        .await?;
        publish_all(c.mq.port, readings("plant", 0, 200)).await?;
        publish_all(c.mq.port, readings("other", 0, 50)).await?;
        count_is(&c, "SELECT count(*) FROM other", 50).await?;
        count_is(
            &c,
            "SELECT count(*) FROM dead_letters WHERE route = 'plant'",
            200,
        )
        .await?;
        let unavailable = c.count(UNAVAILABLE).await?;
        ensure!(
            unavailable > 0,
            "never suspended: every row refused one by one"
        );
        let (_, body) = http(c.node(&leader).http_port(), "GET", "/health").await?;
        ensure!(
            body.contains("NOT NULL") || body.contains("not null") || body.contains("site"),
            "{body}"
        );
        db.batch_execute("ALTER TABLE plant DROP COLUMN site")
            .await?;
        // What was refused row by row before the suspension is replayed by hand.
        count_is(&c, UNAVAILABLE, 0).await?;
        let (code, so, err) = out(&c.cli(&["replay", "--route", "plant"])?);
        ensure!(code == 0, "{so}{err}");
        count_is(&c, "SELECT count(*) FROM plant", 200).await?;
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "dead letters left"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test]
async fn a_statement_trigger_that_raises_suspends_only_its_route() {
    only_its_route_stops(
        "trigger",
        "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'maintenance'; END $$;
         CREATE TRIGGER t_boom BEFORE INSERT ON plant FOR EACH STATEMENT EXECUTE FUNCTION boom();",
        "DROP TRIGGER t_boom ON plant",
        false,
        10,
    )
    .await;
}

/// A route suspended by a node that stopped before its table was fixed: the next leader, finding
/// the table fits, replays the route's dead letters.
#[tokio::test]
async fn a_suspension_outlives_its_leader_and_the_next_one_replays() {
    let mut c = Cluster::start().await.expect("cluster");
    let res = async {
        let db = c.pg.client().await?;
        db.batch_execute(TABLES).await?;
        let file = routes_file(&c)?;
        c.spawn_args("a", &["--config", &file], &[])?;
        c.wait_leader().await?;
        let port = c.node("a").http_port();
        eventually(Duration::from_secs(20), "a subscribed", || async {
            Ok(leasehold_testkit::leading_and_subscribed(port)
                .await
                .unwrap_or(false))
        })
        .await?;
        db.batch_execute("ALTER TABLE plant RENAME TO plant_off")
            .await?;
        publish_all(c.mq.port, readings("plant", 0, 20)).await?;
        count_is(&c, UNAVAILABLE, 20).await?;
        c.node_mut("a").signal(libc::SIGTERM);
        c.node_mut("a").wait_exit(Duration::from_secs(20)).await?;
        db.batch_execute("ALTER TABLE plant_off RENAME TO plant")
            .await?;
        c.spawn_args("b", &["--config", &file], &[])?;
        count_is(&c, UNAVAILABLE, 0).await?;
        count_is(&c, "SELECT count(*) FROM plant", 20).await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A route whose table was broken while no node ran is suspended from its leader's start: the
/// alert and `leasehold status` say so though no message came for it (no dead letter to judge
/// by), and both clear once the table is fixed and the route resumes by itself.
#[tokio::test]
async fn a_route_suspended_without_traffic_still_alerts_and_clears_when_it_resumes() {
    let mut c = Cluster::start().await.expect("cluster");
    let res = async {
        let file = with_tables(&c).await?;
        let db = c.pg.client().await?;
        // The routes stored as the cluster's configuration (checked against the catalog),
        // then the table broken while no node runs.
        c.spawn_args("a", &["--config", &file], &[])?;
        c.wait_leader().await?;
        c.node_mut("a").signal(libc::SIGTERM);
        c.node_mut("a").wait_exit(Duration::from_secs(20)).await?;
        db.batch_execute("ALTER TABLE plant RENAME COLUMN temp TO temperature")
            .await?;
        c.spawn_args("b", &["--config", &file], &[])?;
        c.wait_leader().await?;
        let port = c.node("b").http_port();
        plant_alert_open(&c, port, true).await?;
        let (_, so, _) = out(&c.cli(&["status"])?);
        ensure!(so.contains("ROUTE    plant SUSPENDED"), "{so}");
        ensure!(
            c.count(UNAVAILABLE).await? == 0,
            "a dead letter without a message"
        );

        db.batch_execute("ALTER TABLE plant RENAME COLUMN temperature TO temp")
            .await?;
        plant_alert_open(&c, port, false).await?;
        let (_, so, _) = out(&c.cli(&["status"])?);
        ensure!(!so.contains("SUSPENDED"), "{so}");
        publish_all(c.mq.port, readings("plant", 0, 5)).await?;
        count_is(&c, "SELECT count(*) FROM plant", 5).await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A database-wide error is no route's: PostgreSQL stopped and started again while the default
/// route streams and both routes get messages suspends no route. Every batch waits and is
/// written whole once the database is back; nothing is a `route_unavailable` dead letter.
#[tokio::test]
async fn a_database_restart_suspends_no_route() {
    let mut c = Cluster::start().await.expect("cluster");
    let res = async {
        let file = with_tables(&c).await?;
        c.spawn_args("a", &["--config", &file], &[])?;
        c.spawn_args("b", &["--config", &file], &[])?;
        c.wait_leader().await?;
        let stream = Stream::start(c.mq.port, "iso-restart", 10, 100);
        publish_all(c.mq.port, readings("plant", 0, 10)).await?;
        publish_all(c.mq.port, readings("other", 0, 10)).await?;
        count_is(&c, "SELECT count(*) FROM plant", 10).await?;
        count_is(&c, "SELECT count(*) FROM other", 10).await?;

        c.pg.stop()?;
        publish_all(c.mq.port, readings("plant", 10, 30)).await?;
        publish_all(c.mq.port, readings("other", 10, 30)).await?;
        // Down until the writer met it: a batch with both routes' rows failed on it.
        eventually(Duration::from_secs(20), "a batch write failed", || async {
            Ok(["a", "b"]
                .iter()
                .any(|n| c.node(n).log().contains("batch write failed")))
        })
        .await?;
        c.pg.start_again().await?;
        eventually(Duration::from_secs(60), "both routes written", || async {
            Ok(c.count("SELECT count(*) FROM plant").await? == 40
                && c.count("SELECT count(*) FROM other").await? == 40)
        })
        .await?;
        let n = stream.stop().await?;
        c.assert_exactly_once("iso-restart", n).await?;
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "dead letters"
        );
        for name in ["a", "b"] {
            ensure!(
                !c.node(name).log().contains("route suspended"),
                "{name} suspended a route for a database-wide error"
            );
        }
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A route's table broken while a standby waited, with no message for the route: the standby,
/// taking over, finds it at the start of its term and holds the route suspended; the alert
/// opens without a dead letter.
#[tokio::test]
async fn a_new_leader_finds_a_broken_route_table_at_the_start_of_its_term() {
    let mut c = Cluster::start().await.expect("cluster");
    let res = async {
        let file = with_tables(&c).await?;
        c.spawn_args("a", &["--config", &file], &[])?;
        let (first, _) = c.wait_leader().await?;
        ensure!(first == "a", "a leads first");
        c.spawn_args("b", &["--config", &file], &[])?;
        eventually(Duration::from_secs(20), "b up", || async {
            Ok(http(c.node("b").http_port(), "GET", "/health")
                .await
                .is_ok())
        })
        .await?;
        c.pg.client()
            .await?
            .batch_execute("ALTER TABLE plant RENAME COLUMN temp TO temperature")
            .await?;
        c.node_mut("a").kill9();
        eventually(Duration::from_secs(30), "b leads", || async {
            Ok(c.wait_leader().await?.0 == "b")
        })
        .await?;
        let port = c.node("b").http_port();
        plant_alert_open(&c, port, true).await?;
        let (_, body) = http(port, "GET", "/health").await?;
        let h: serde_json::Value = serde_json::from_str(&body)?;
        ensure!(
            h["routes"].as_array().is_some_and(|r| r
                .iter()
                .any(|r| r["name"] == "plant" && r["suspended"].is_string())),
            "{h}"
        );
        ensure!(
            c.count(UNAVAILABLE).await? == 0,
            "a dead letter without a message"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A dead letter flagged DUP is the redelivery of a copy with its topic, packet id and bytes only
/// if that copy was received within REDELIVERY_WINDOW and the last MAX_PENDING + 2,048 readings
/// before it, in a replay as live. A replay's chunk holds dead letters of hours or days: judged
/// against the chunk's earliest DUP-flagged one, or collapsed inside the chunk without the
/// count, a later publish (the broker reuses packet ids) was removed as a redelivery and its
/// reading lost. And a chunk is written in the order its dead letters were received.
#[tokio::test]
async fn a_replayed_dup_is_a_redelivery_only_within_the_redelivery_window() {
    let mut c = Cluster::start().await.expect("cluster");
    let res = async {
        c.spawn("a")?;
        c.wait_leader().await?;
        let db = c.pg.client().await?;
        // Timestamp-less (its receipt time is its `ts`), each device's messages the same bytes
        // with packet id 7. Dead letters: "far" 2 h apart (the window is 1 h), "near" 5 s
        // apart; "count" 25 min apart with 13,000 readings between (over MAX_PENDING + 2,048);
        // "old" 1 h ago, a copy of it stored 2 days ago, and "other" 3 days ago (the chunk's
        // earliest DUP-flagged one).
        db.batch_execute(
            "CREATE FUNCTION pg_temp.h(tp text, p bytea) RETURNS text LANGUAGE sql AS
                 $$ SELECT encode(substr(sha256(convert_to(tp, 'UTF8') || '\\x00'::bytea || p), 1, 16), 'hex') $$;
             INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by,
                                    lease_epoch)
             SELECT 'filler', 'devices/filler/t', t, '{}', t, 'n', 1
             FROM generate_series(1, 13000) AS n,
                  LATERAL (SELECT now() - interval '50 minutes' + n * interval '100 ms') AS x(t);
             INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by,
                                    lease_epoch, content_hash, mqtt_pkid)
             SELECT 'old', tp, now() - interval '2 days', convert_from(p, 'UTF8')::jsonb,
                    now() - interval '2 days', 'n', 1, pg_temp.h(tp, p), 7
             FROM (VALUES ('devices/old/state',
                           convert_to('{\"device_id\":\"old\",\"state\":\"ON\"}', 'UTF8'))) AS v(tp, p);
             INSERT INTO dead_letters (topic, payload, size, reason, error, received_at,
                                       written_by, lease_epoch, content_hash, mqtt_pkid,
                                       possible_duplicate)
             SELECT 'devices/' || d || '/state', p, octet_length(p), 'not_stored', 'then',
                    now() - back, 'n', 1, pg_temp.h('devices/' || d || '/state', p), 7, dup
             FROM (VALUES ('far', interval '3 hours', false), ('far', interval '1 hour', true),
                          ('near', interval '2 hours', false),
                          ('near', interval '2 hours' - interval '5 seconds', true),
                          ('count', interval '50 minutes', false),
                          ('count', interval '25 minutes', true),
                          ('other', interval '3 days', true),
                          ('old', interval '1 hour', true),
                          -- burst: its copy and its redelivery 0.3 s apart, in the statement
                          -- of lead (DUP-flagged 0.3 s before); late: its redelivery 1.5 s
                          -- after lead2, its copy 0.3 s before it in the statement of lead2.
                          ('lead', interval '20 minutes', true),
                          ('burst', interval '20 minutes' - interval '300 ms', false),
                          ('burst', interval '20 minutes' - interval '600 ms', true),
                          ('lead2', interval '15 minutes', true),
                          ('late', interval '15 minutes' - interval '1200 ms', false),
                          ('late', interval '15 minutes' - interval '1500 ms', true)) AS v(d, back, dup),
                  convert_to('{\"device_id\":\"' || d || '\",\"state\":\"ON\"}', 'UTF8') AS p;
             -- Two readings of one key, the first received flagged DUP (its first copy lost
             -- with a leader): the first by arrival is the one stored, the other a conflict.
             INSERT INTO dead_letters (topic, payload, size, reason, error, received_at,
                                       written_by, lease_epoch, content_hash, mqtt_pkid,
                                       possible_duplicate)
             SELECT 'devices/key/t', p, octet_length(p), 'not_stored', 'then', now() - back,
                    'n', 1, pg_temp.h('devices/key/t', p), 9, dup
             FROM (VALUES (1, interval '40 minutes', true), (2, interval '30 minutes', false))
                      AS v(n, back, dup),
                  convert_to('{\"device_id\":\"key\",\"ts\":\"2026-12-01T00:00:00Z\",\"v\":' || n || '}',
                             'UTF8') AS p;",
        )
        .await?;
        let (code, so, err) = out(&c.cli(&["replay", "--route", "default"])?);
        ensure!(code == 0 && replayed(&so).0 == 16, "exit {code}: {so}{err}");
        let rows = "SELECT string_agg(device_id || ':' || n, ' ' ORDER BY device_id)
                    FROM (SELECT device_id, count(*) AS n FROM telemetry GROUP BY 1) t";
        let rows: Option<String> = db.query_one(rows, &[]).await?.get(0);
        ensure!(
            rows.as_deref() == Some("burst:1 count:2 far:2 filler:13000 key:1 late:1 lead:1 lead2:1 near:1 old:2 other:1"),
            "readings per device: {rows:?}\n{so}"
        );
        let key = "SELECT (SELECT payload->>'v' FROM telemetry WHERE device_id = 'key')
                        || ' ' || string_agg(reason || ':' || convert_from(payload, 'UTF8'), ' ')
                    FROM dead_letters";
        let key: Option<String> = db.query_one(key, &[]).await?.get(0);
        ensure!(
            key.as_deref()
                == Some(r#"1 conflict:{"device_id":"key","ts":"2026-12-01T00:00:00Z","v":2}"#),
            "the key's reading and the dead letters left: {key:?}\n{so}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A dead letter of the default route (stored before a route took its topic) and one of that
/// route's own, one key of a table whose key is not text, replayed in one chunk: the first by
/// arrival is stored and the other is a conflict dead letter. Both kinds in one statement, each
/// prepared apart, stored one of them and dropped the other without a word (review finding).
#[tokio::test]
async fn replayed_dead_letters_of_two_kinds_with_one_key_keep_arrival_order() {
    let mut c = Cluster::start().await.expect("cluster");
    let res = async {
        let db = c.pg.client().await?;
        db.batch_execute(
            "CREATE TABLE nk (n int, ts timestamptz, v int, PRIMARY KEY (n, ts))",
        )
        .await?;
        let route = "[[routes]]\nname = \"nk\"\ntopics = [\"nk/+/data\"]\ntable = \"nk\"\nkey = [\"n\", \"ts\"]\n[routes.columns]\nn = \"$.n\"\nts = \"timestamp\"\nv = \"$.v\"\n";
        let file = c.logs.path().join("nk.toml");
        std::fs::write(&file, route)?;
        c.spawn_args("a", &["--config", &file.display().to_string()], &[])?;
        c.wait_leader().await?;
        // v:1 of the default route received first, v:2 of the route after it; then v:3 of the
        // default route and v:4 of the route, another key, the route's first.
        db.batch_execute(
            "INSERT INTO dead_letters (topic, payload, size, reason, error, received_at,
                                       written_by, lease_epoch, content_hash, mqtt_pkid,
                                       possible_duplicate, route)
             SELECT 'nk/a/data', p, octet_length(p), 'not_stored', 'then', now() - back, 'n', 1,
                    encode(substr(sha256(convert_to('nk/a/data', 'UTF8') || '\\x00'::bytea || p), 1, 16), 'hex'),
                    v, false, route
             FROM (VALUES (1, 1, interval '40 minutes', NULL), (2, 1, interval '30 minutes', 'nk'),
                          (3, 2, interval '20 minutes', NULL), (4, 2, interval '25 minutes', 'nk'))
                      AS x(v, n, back, route),
                  convert_to('{\"n\":' || n || ',\"ts\":\"2026-12-01T00:00:00Z\",\"v\":' || v || '}',
                             'UTF8') AS p",
        )
        .await?;
        let (code, so, err) = out(&c.cli(&["replay"])?);
        ensure!(code == 0, "exit {code}: {so}{err}");
        let stored: Option<String> = db
            .query_one("SELECT string_agg(n || ':' || v, ' ' ORDER BY n) FROM nk", &[])
            .await?
            .get(0);
        let left: Option<String> = db
            .query_one(
                "SELECT string_agg(reason || ':' || (convert_from(payload, 'UTF8')::jsonb->>'v'), ' '
                                   ORDER BY received_at) FROM dead_letters",
                &[],
            )
            .await?
            .get(0);
        ensure!(
            stored.as_deref() == Some("1:1 2:4") && left.as_deref() == Some("conflict:2 conflict:3"),
            "rows of nk: {stored:?}, dead letters left: {left:?}\n{so}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}
