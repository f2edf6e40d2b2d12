//! `telemetry` in time partitions (docs/partitions.md): readings of any time land, each day has
//! its partition, retention drops whole partitions, and an installation full of readings moves
//! to the layout while it ingests, losing nothing.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use chrono::{DateTime, TimeDelta, Utc};
use leasehold_testkit::publish::{numbered_from, numbered_untimed, publish_all, Stream};
use leasehold_testkit::{eventually, http, metric, Mosquitto, Postgres};

use crate::helpers::{check, msg, out, Cluster};

fn write(c: &Cluster, name: &str, text: &str) -> Result<String> {
    let path = c.logs.path().join(name);
    std::fs::write(&path, text)?;
    Ok(path.display().to_string())
}

/// `telemetry` is partitioned and no move is under way.
async fn partitioned(c: &Cluster) -> Result<()> {
    eventually(Duration::from_secs(30), "telemetry partitioned", || async {
        Ok(c.count(
            "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = 'telemetry'::regclass",
        )
        .await?
            == 1
            && c.count("SELECT count(*) FROM telemetry_partitioning")
                .await?
                == 0)
    })
    .await?;
    Ok(())
}

/// Node `a` leads, with a partition round every second, and `telemetry` is partitioned.
async fn leading_with_partitions(c: &mut Cluster) -> Result<()> {
    c.extra_env = vec![("RETENTION_INTERVAL", "1s".into())];
    c.spawn("a")?;
    c.wait_leader().await?;
    partitioned(c).await
}

/// The partition each of `device`'s readings is in.
async fn partitions_of(c: &Cluster, device: &str) -> Result<Vec<String>> {
    let db = c.pg.client().await?;
    let rows = db
        .query(
            "SELECT tableoid::regclass::text AS p FROM telemetry WHERE device_id = $1 ORDER BY ts",
            &[&device],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get("p")).collect())
}

fn reading(device: &str, ts: DateTime<Utc>) -> (String, Vec<u8>) {
    msg(
        &format!("devices/{device}/telemetry"),
        format!(r#"{{"ts":"{}","v":1}}"#, ts.to_rfc3339()),
    )
}

fn day(ts: DateTime<Utc>) -> String {
    format!("telemetry_p{}", ts.format("%Y%m%d"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_keeps_telemetry_in_day_partitions_and_a_reading_of_any_time_lands() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        leading_with_partitions(&mut c).await?;
        // The empty table it replaced is gone: no partition without a lower bound.
        ensure!(
            c.count("SELECT count(*) FROM pg_class WHERE relname LIKE 'telemetry_before_%'")
                .await?
                == 0,
            "the empty old table was dropped"
        );
        let now = Utc::now();
        let far = DateTime::parse_from_rfc3339("2099-01-01T00:00:00Z")?.to_utc();
        let ancient = DateTime::parse_from_rfc3339("1970-01-02T03:04:05Z")?.to_utc();
        let cases = [
            ("now", now, Some(day(now))),
            (
                "yesterday",
                now - TimeDelta::days(1),
                Some(day(now - TimeDelta::days(1))),
            ),
            (
                "past",
                now - TimeDelta::days(40),
                Some(day(now - TimeDelta::days(40))),
            ),
            (
                "ahead",
                now + TimeDelta::days(2),
                Some(day(now + TimeDelta::days(2))),
            ),
            ("ancient", ancient, Some(day(ancient))),
            // Beyond the days made ahead: the default partition keeps it until its day comes.
            ("far", far, None),
        ];
        publish_all(
            c.mq.port,
            cases.iter().map(|(d, ts, _)| reading(d, *ts)).collect(),
        )
        .await?;
        eventually(
            Duration::from_secs(30),
            "every reading stored in the partition of its day",
            || async {
                for (device, _, want) in &cases {
                    let got = partitions_of(&c, device).await?;
                    let ok = match want {
                        // The day's partition, or the part of it after the cutover.
                        Some(day) => got.len() == 1 && got[0].starts_with(day.as_str()),
                        None => got == ["telemetry_default"],
                    };
                    if !ok {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )
        .await?;
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "no reading is a dead letter for its time"
        );
        // Data age reads no partition: the statements that store readings record the newest
        // one's receive time, the newest `received_at` the table holds to the second.
        eventually(
            Duration::from_secs(15),
            "the newest reading recorded for data age",
            || async {
                c.count(
                    "SELECT count(*) FROM telemetry_newest
                     WHERE at > (SELECT max(received_at) FROM telemetry) - interval '1 second'
                       AND at <= (SELECT max(received_at) FROM telemetry)",
                )
                .await
                .map(|n| n == 1)
            },
        )
        .await?;
        // The leader's heartbeat records its term; a removed record is made again at its next
        // beat, from what the table holds.
        let db = c.pg.client().await?;
        let recorded = "SELECT count(*) FROM telemetry_newest n, instance_lock l
                        WHERE n.epoch = l.epoch
                          AND n.at > (SELECT max(received_at) FROM telemetry) - interval '1 second'
                          AND n.at <= (SELECT max(received_at) FROM telemetry)";
        eventually(Duration::from_secs(15), "the term recorded", || async {
            c.count(recorded).await.map(|n| n == 1)
        })
        .await?;
        db.batch_execute("DELETE FROM telemetry_newest").await?;
        eventually(Duration::from_secs(15), "the record made again", || async {
            c.count(recorded).await.map(|n| n == 1)
        })
        .await?;
        // As the node's next heartbeat reads it.
        eventually(
            Duration::from_secs(15),
            "data age of readings just stored in /health",
            || async {
                let (_, body) = http(c.node("a").http_port(), "GET", "/health").await?;
                let health: serde_json::Value = serde_json::from_str(&body)?;
                Ok(health["newest_data_age_seconds"]
                    .as_f64()
                    .is_some_and(|a| (0.0..60.0).contains(&a)))
            },
        )
        .await?;
        // Days ahead exist before any reading needs them.
        let ahead = day(now + TimeDelta::days(3));
        ensure!(
            c.count(&format!(
                "SELECT count(*) FROM pg_class WHERE relname = '{ahead}'"
            ))
            .await?
                == 1,
            "{ahead} made ahead"
        );
        let (_, m) = http(c.node("a").http_port(), "GET", "/metrics").await?;
        ensure!(
            metric(&m, "leasehold_telemetry_partitions").is_some_and(|n| n >= 8.0),
            "partitions gauge: {:?}",
            metric(&m, "leasehold_telemetry_partitions")
        );
        // What a leader of the current epoch recorded is trusted without reading the table;
        // an earlier term's record is not, past a term's first seconds: the table is read
        // instead. With the leader gone, whose heartbeat would record its term again.
        c.node_mut("a").kill9();
        let read = "SELECT leasehold_newest_reading() = (SELECT max(received_at) FROM telemetry)";
        db.batch_execute("UPDATE telemetry_newest SET at = '2000-01-01Z'")
            .await?;
        ensure!(
            !db.query_one(read, &[]).await?.get::<_, bool>(0),
            "trusted without a read"
        );
        // An earlier term's record stands for the first 10 s of a term, not after.
        db.batch_execute("UPDATE telemetry_newest SET epoch = epoch - 1")
            .await?;
        db.batch_execute("UPDATE instance_lock SET acquired_at = now()")
            .await?;
        ensure!(
            !db.query_one(read, &[]).await?.get::<_, bool>(0),
            "an earlier epoch's record in a term's first seconds"
        );
        db.batch_execute("UPDATE instance_lock SET acquired_at = now() - interval '1 minute'")
            .await?;
        ensure!(
            db.query_one(read, &[]).await?.get::<_, bool>(0),
            "an earlier epoch's record"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_retention_drops_whole_partitions_older_than_it() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        leading_with_partitions(&mut c).await?;
        let now = Utc::now();
        let far = DateTime::parse_from_rfc3339("2099-01-01T00:00:00Z")?.to_utc();
        publish_all(
            c.mq.port,
            vec![
                reading("ten", now - TimeDelta::days(10)),
                reading("five", now - TimeDelta::days(5)),
                reading("now", now),
                reading("far", far),
            ],
        )
        .await?;
        let old = day(now - TimeDelta::days(10));
        eventually(Duration::from_secs(30), "the old day has its partition", || async {
            Ok(partitions_of(&c, "ten").await? == [old.clone()])
        })
        .await?;

        // Shorter than a partition: refused, naming the setting.
        let short = write(&c, "short.toml", "batch_max_wait = \"20ms\"\ntelemetry_retention = \"12h\"\n")?;
        let (code, so, err) = out(&c.cli(&["config", "apply", &short])?);
        ensure!(code == 2 && err.contains("TELEMETRY_RETENTION") && err.contains("1d"), "{code} {so}{err}");

        let keep = write(
            &c,
            "keep.toml",
            "batch_max_wait = \"20ms\"\nretention_interval = \"1s\"\ntelemetry_retention = \"7d\"\n",
        )?;
        let (code, so, err) = out(&c.cli(&["config", "apply", &keep])?);
        ensure!(code == 0, "{so}{err}");
        eventually(Duration::from_secs(30), "the partition older than 7d dropped", || async {
            Ok(c.count(&format!("SELECT count(*) FROM pg_class WHERE relname = '{old}'")).await? == 0)
        })
        .await?;
        for (device, want) in [("ten", 0), ("five", 1), ("now", 1), ("far", 1)] {
            let n = c
                .count(&format!("SELECT count(*) FROM telemetry WHERE device_id = '{device}'"))
                .await?;
            ensure!(n == want, "{device}: {n} readings, want {want}");
        }
        // A reading older than the retention that arrives now is not kept either.
        publish_all(c.mq.port, vec![reading("late", now - TimeDelta::days(20))]).await?;
        eventually(Duration::from_secs(30), "a late reading past retention removed", || async {
            Ok(c.count("SELECT count(*) FROM telemetry WHERE device_id = 'late'").await? == 0
                && c.count("SELECT count(*) FROM dead_letters").await? == 0
                && std::fs::read_to_string(c.logs.path().join("a.log"))?
                    .contains("old readings deleted from telemetry's default partition"))
        })
        .await?;
        let (_, m) = http(c.node("a").http_port(), "GET", "/metrics").await?;
        ensure!(
            metric(&m, "leasehold_telemetry_partitions_dropped_total") == Some(1.0)
                && metric(&m, "leasehold_telemetry_dropped_bytes_total").is_some_and(|b| b > 0.0),
            "metrics of what was dropped"
        );
        let log = std::fs::read_to_string(c.logs.path().join("a.log"))?;
        ensure!(
            log.contains("retention: telemetry partition dropped") && log.contains(&old),
            "the log line names the partition"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// Late readings' first timestamp: an hour ago.
static LATE_BASE: std::sync::LazyLock<i64> =
    std::sync::LazyLock::new(|| (Utc::now() - TimeDelta::hours(1)).timestamp_micros());

/// Rows of the installation before the move: a month of 3,000 devices, one reading a second.
const HISTORY: i64 = 3_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installation_with_millions_of_readings_moves_to_partitions_while_it_ingests() {
    let pg = Postgres::start_with("track_commit_timestamp = on\n")
        .await
        .expect("postgres");
    let mq = Mosquitto::start().await.expect("mosquitto");
    let mut c = Cluster::with_servers(pg, mq).expect("cluster");
    let res = async {
        // Today's schema before this change, filled as a year-old installation would be.
        let mut db = c.pg.client().await?;
        leasehold_store::migrate_up_to(&mut db, 8).await?;
        let filled = Instant::now();
        db.batch_execute(&format!(
            "INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by, lease_epoch)
             SELECT 'old-' || (i % 3000), 'devices/old-' || (i % 3000) || '/telemetry',
                    now() - i * interval '1 second', jsonb_build_object('v', i),
                    now() - i * interval '1 second', 'old', 1
             FROM generate_series(1, {HISTORY}) i;
             -- Device clocks ahead: readings after any cutover.
             INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by, lease_epoch)
             SELECT 'ahead', 'devices/ahead/telemetry', now() + interval '5 days' + i * interval '1 minute',
                    jsonb_build_object('v', i), now(), 'old', 1
             FROM generate_series(1, 100) i;
             -- A reading a device will send again with other content, and one it sends again as it was.
             INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by, lease_epoch) VALUES
                 ('again', 'devices/again/telemetry', '2026-01-01T00:00:00Z', '{{\"ts\":\"2026-01-01T00:00:00Z\",\"v\":1}}', now(), 'old', 1),
                 ('same', 'devices/same/telemetry', '2026-01-01T00:00:00Z', '{{\"ts\":\"2026-01-01T00:00:00Z\",\"v\":1}}', now(), 'old', 1);
             ANALYZE telemetry;"
        ))
        .await?;
        eprintln!("history of {HISTORY} rows loaded in {:?}", filled.elapsed());
        c.spawn("a")?;
        c.spawn("b")?;
        let (first, _) = c.wait_leader().await?;
        // Live readings stamped with their receipt time: after the cutover, in the new
        // partitions, so their commit times show every pause in ingest.
        let stream = Stream::start_with(c.mq.port, "move", 50, 300, numbered_untimed);
        // The move resumes on the next leader: kill the first once the swap is done.
        eventually(Duration::from_secs(60), "the swap", || async {
            Ok(c.count("SELECT count(*) FROM pg_partitioned_table WHERE partrelid = 'telemetry'::regclass").await? == 1)
        })
        .await?;
        c.wait_written(&first, 100, Duration::from_secs(30)).await?;
        let resumed = c.count("SELECT count(*) FROM telemetry_partitioning").await? == 1;
        c.node_mut(&first).kill9();
        // Late readings, timestamped within the last hour (before the cutover): stored in the
        // default partition while the move runs, they join the old table when it is attached.
        let late: Vec<_> = (0..500)
            .map(|i| msg(&format!("devices/late-{}/telemetry", i % 10), numbered_from(*LATE_BASE, "late", &format!("late-{}", i % 10), i)))
            .collect();
        publish_all(c.mq.port, late).await?;
        publish_all(
            c.mq.port,
            vec![
                reading_with("again", "2026-01-01T00:00:00Z", 2),
                reading_with("same", "2026-01-01T00:00:00Z", 1),
                msg(
                    "devices/ahead/telemetry",
                    format!(r#"{{"ts":"{}","v":0}}"#, (Utc::now() + TimeDelta::days(5)).to_rfc3339()),
                ),
            ],
        )
        .await?;
        c.wait_leader().await?;
        partitioned(&c).await?;
        for n in ["a", "b"] {
            let log = std::fs::read_to_string(c.logs.path().join(format!("{n}.log")))?;
            for l in log.lines().filter(|l| l.contains("partition")) {
                eprintln!("{n}: {}", &l[..l.len().min(300)]);
            }
        }
        let n = stream.stop().await?;
        ensure!(n > 1000, "published {n}");
        c.assert_exactly_once("move", n).await?;
        c.assert_exactly_once("late", 500).await?;

        // Every old row is still there, each in the partition its time says.
        ensure!(
            c.count("SELECT count(*) FROM telemetry WHERE written_by = 'old'").await? == HISTORY + 102,
            "old rows kept"
        );
        let legacy = c
            .count("SELECT count(*) FROM telemetry WHERE written_by = 'old' AND tableoid::regclass::text LIKE 'telemetry_before_%'")
            .await?;
        ensure!(
            c.count("SELECT count(*) FROM telemetry WHERE payload->>'run' = 'late' AND tableoid::regclass::text LIKE 'telemetry_before_%'").await? == 500,
            "late readings are in the partition of their time"
        );
        ensure!(legacy == HISTORY + 2, "the old table is the partition before the cutover: {legacy}");
        ensure!(
            c.count("SELECT count(*) FROM telemetry WHERE device_id = 'ahead' AND tableoid::regclass::text LIKE 'telemetry_before_%'").await? == 0,
            "readings after the cutover moved out of the old table"
        );
        // The first copy of a key wins, as in any write: the same content is a duplicate, a
        // different one a conflict dead letter.
        ensure!(
            c.count("SELECT count(*) FROM telemetry WHERE device_id = 'again' AND payload->>'v' = '1'").await? == 1
                && c.count("SELECT count(*) FROM telemetry WHERE device_id IN ('again', 'same')").await? == 2,
            "first copies kept"
        );
        ensure!(
            c.count("SELECT count(*) FROM dead_letters WHERE reason = 'conflict' AND topic = 'devices/again/telemetry'").await? == 1
                && c.count("SELECT count(*) FROM dead_letters WHERE topic <> 'devices/again/telemetry'").await? == 0,
            "one conflict dead letter, nothing else"
        );
        // Ingest never stopped for longer than a failover (the leader was killed meanwhile).
        let gap: f64 = c
            .pg
            .client()
            .await?
            .query_one(
                "SELECT coalesce(max(d), 0)::float8 AS gap FROM (
                     SELECT extract(epoch FROM t - lag(t) OVER (ORDER BY t)) AS d
                     FROM (SELECT DISTINCT pg_xact_commit_timestamp(xmin) AS t
                           FROM telemetry WHERE payload->>'run' = 'move') s) g",
                &[],
            )
            .await?
            .get("gap");
        ensure!(gap < 15.0, "ingest stopped for {gap:.1}s");
        eprintln!("longest pause in ingest: {gap:.2}s; move resumed by the next leader: {resumed}");
        Ok(())
    }
    .await;
    check(&c, res);
}

fn reading_with(device: &str, ts: &str, v: i64) -> (String, Vec<u8>) {
    msg(
        &format!("devices/{device}/telemetry"),
        format!(r#"{{"ts":"{ts}","v":{v}}}"#),
    )
}

#[tokio::test]
async fn a_round_without_the_lease_changes_nothing_and_with_it_moves_the_table() {
    use leasehold_store::batch::Fence;
    use leasehold_store::partitions::{self, Step};
    const TTL: Duration = Duration::from_secs(3);
    let pg = Postgres::start().await.expect("postgres");
    let res: Result<()> = async {
        let mut db = leased(&pg).await?;
        db.batch_execute(
            "INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by, lease_epoch)
             VALUES ('d', 'devices/d/telemetry', now() - interval '1 day', '{}', now(), 'w', 1)",
        )
        .await?;
        let kind = "SELECT relkind::text FROM pg_class WHERE oid = 'telemetry'::regclass";
        // A leader deposed (epoch 1 where the lease is at 2) changes nothing.
        let stale = Fence {
            epoch: 1,
            ..holder()
        };
        let err = partitions::round(&mut db, &stale, None, TTL, &mut |_| {}).await;
        ensure!(
            matches!(err, Err(leasehold_store::StoreError::Fenced { epoch: 1 })),
            "{err:?}"
        );
        let k: String = db.query_one(kind, &[]).await?.get(0);
        ensure!(k == "r", "telemetry untouched: {k}");
        // The holder moves it in one round, and a second round finds nothing to do.
        let held = holder();
        let mut steps = Vec::new();
        let done = partitions::round(&mut db, &held, None, TTL, &mut |s| steps.push(s)).await?;
        ensure!(
            steps == [Step::Swapped, Step::Validated, Step::Attached { moved: 0, conflicts: 0 }],
            "{steps:?}"
        );
        // Before the cutover, the rest of its day, the next 3 days, the default.
        ensure!(done.partitions == 6, "{done:?}");
        let k: String = db.query_one(kind, &[]).await?.get(0);
        ensure!(k == "p", "partitioned: {k}");
        let p: String = db
            .query_one("SELECT tableoid::regclass::text FROM telemetry", &[])
            .await?
            .get(0);
        ensure!(p.starts_with("telemetry_before_"), "the old row: {p}");
        let mut again = Vec::new();
        let done = partitions::round(&mut db, &held, None, TTL, &mut |s| again.push(s)).await?;
        ensure!(again.is_empty() && done.created.is_empty() && done.partitions == 6, "{again:?} {done:?}");
        Ok(())
    }
    .await;
    if let Err(e) = res {
        panic!("{e:#}\n{}", pg.log());
    }
}

/// A leader stopped in the middle of a partition step (SIGSTOP, a frozen VM, a cut link) does not
/// hold the lease row: its session ends after `Fence::step_limit` without a statement, and a
/// leader's renewals go through. Here every statement of the round reaches the server 3 s
/// late, longer than a renewal below waits for a lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_whose_client_goes_quiet_does_not_hold_the_lease_row() {
    use leasehold_store::lease::{Attempt::Renewal, LeaseConn};
    use leasehold_store::partitions;
    use leasehold_testkit::proxy::Proxy;
    const TTL: Duration = Duration::from_secs(3);
    let pg = Postgres::start().await.expect("postgres");
    let res: Result<()> = async {
        let db = leased(&pg).await?;
        let proxy = Proxy::start(pg.port).await?;
        let url = pg.url_via(proxy.port);
        let mut quiet = leasehold_store::connect(&url, "quiet-round").await?;
        proxy.set_delay(Duration::from_secs(3));
        let round = tokio::spawn(async move {
            partitions::round(&mut quiet, &holder(), None, TTL, &mut |_| {}).await
        });
        // The leader renews every 100 ms while the round runs, waiting at most 2 s for the lease
        // row each time.
        let leader = LeaseConn::connect(&pg.url(), Duration::from_secs(2)).await?;
        let mut renewals = 0;
        while !round.is_finished() {
            let epoch = leader
                .acquire(Renewal, "lease", "holder", "i", TTL)
                .await
                .with_context(|| {
                    format!("renewal {renewals}: the quiet round held the lease row")
                })?;
            ensure!(epoch == Some(2), "renewal {renewals}: {epoch:?}");
            renewals += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let done = round.await?;
        ensure!(done.is_err(), "the quiet round finished: {done:?}");
        let k: String = db
            .query_one(
                "SELECT relkind::text FROM pg_class WHERE oid = 'telemetry'::regclass",
                &[],
            )
            .await?
            .get(0);
        ensure!(
            k == "r",
            "the quiet round's step committed: telemetry is {k}"
        );
        Ok(())
    }
    .await;
    if let Err(e) = res {
        panic!("{e:#}\n{}", pg.log());
    }
}

/// A database migrated to version 9, with a lease held by `holder` at epoch 2.
async fn leased(pg: &Postgres) -> Result<tokio_postgres::Client> {
    let mut db = pg.client().await?;
    leasehold_store::migrate(&mut db).await?;
    db.batch_execute(
        "INSERT INTO instance_lock (service_name, holder_id, instance_id, epoch, expires_at)
         VALUES ('lease', 'holder', 'i', 2, now() + interval '1 hour')",
    )
    .await?;
    Ok(db)
}

fn holder() -> leasehold_store::batch::Fence {
    leasehold_store::batch::Fence {
        lease_name: "lease".into(),
        holder_id: "holder".into(),
        epoch: 2,
    }
}

#[tokio::test]
async fn an_operators_own_columns_and_constraints_move_with_the_table_or_the_move_says_why_not() {
    use leasehold_store::partitions::{self, Step};
    let ttl = Duration::from_secs(3);
    let pg = Postgres::start().await.expect("postgres");
    let res: Result<()> = async {
        // A serial id, a generated column and a CHECK added NOT VALID (as on a big table).
        let mut db = leased(&pg).await?;
        db.batch_execute(
            "ALTER TABLE telemetry ADD COLUMN id bigserial,
                                   ADD COLUMN v numeric GENERATED ALWAYS AS ((payload->>'v')::numeric) STORED;
             ALTER TABLE telemetry ADD CONSTRAINT epoch_positive CHECK (lease_epoch > 0) NOT VALID;
             INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by, lease_epoch)
             VALUES ('d', 't', now() - interval '1 day', '{\"v\": 1}', now(), 'w', 1);",
        )
        .await?;
        let mut steps = Vec::new();
        partitions::round(&mut db, &holder(), None, ttl, &mut |s| steps.push(s)).await?;
        ensure!(
            steps == [Step::Swapped, Step::Validated, Step::Attached { moved: 0, conflicts: 0 }],
            "{steps:?}"
        );
        // New readings get the next id and their computed value, in the new partitions.
        db.batch_execute(
            "INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by, lease_epoch)
             VALUES ('d', 't', now(), '{\"v\": 2}', now(), 'w', 1)",
        )
        .await?;
        let r = db
            .query_one("SELECT id, v::float8 FROM telemetry WHERE ts > now() - interval '1 hour'", &[])
            .await?;
        let (id, v): (i64, f64) = (r.get(0), r.get(1));
        ensure!(id == 2 && v == 2.0, "id {id}, v {v}");
        // The old partition goes whole (as retention drops it); the sequence stays with the table.
        let old: String = db
            .query_one("SELECT relname::text FROM pg_class WHERE relname LIKE 'telemetry_before_%' AND relkind = 'r'", &[])
            .await?
            .get(0);
        db.batch_execute(&format!("ALTER TABLE telemetry DETACH PARTITION {old}; DROP TABLE {old}"))
            .await?;
        db.batch_execute(
            "INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by, lease_epoch)
             VALUES ('d', 't', now() + interval '1 minute', '{}', now(), 'w', 1)",
        )
        .await?;

        // An identity column cannot be on a partitioned table in PostgreSQL 15: refused by name,
        // the table left as it was.
        let pg2 = Postgres::start().await?;
        let mut db2 = leased(&pg2).await?;
        db2.batch_execute("ALTER TABLE telemetry ADD COLUMN n bigint GENERATED ALWAYS AS IDENTITY")
            .await?;
        let err = partitions::round(&mut db2, &holder(), None, ttl, &mut |_| {}).await;
        ensure!(
            err.as_ref().is_err_and(|e| e.to_string().contains("identity column(s) n")),
            "{err:?}"
        );
        let k: String = db2
            .query_one("SELECT relkind::text FROM pg_class WHERE oid = 'telemetry'::regclass", &[])
            .await?
            .get(0);
        ensure!(k == "r", "left as it was: {k}");

        // A reading from a year PostgreSQL has and chrono's literals do not (1 BC) waits in the
        // default partition; every other day still gets its partition.
        db.batch_execute(
            "INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by, lease_epoch)
             VALUES ('bc', 't', '0001-06-01 00:00:00+00 BC', '{}', now(), 'w', 1),
                    ('old', 't', now() - interval '40 days', '{}', now(), 'w', 1)",
        )
        .await?;
        partitions::round(&mut db, &holder(), None, ttl, &mut |_| {}).await?;
        let place = |d: &'static str| {
            let db = &db;
            async move {
                let p: String = db
                    .query_one("SELECT tableoid::regclass::text FROM telemetry WHERE device_id = $1", &[&d])
                    .await?
                    .get(0);
                anyhow::Ok(p)
            }
        };
        ensure!(place("bc").await? == "telemetry_default", "1 BC waits");
        ensure!(place("old").await?.starts_with("telemetry_p"), "the old day has its partition");
        Ok(())
    }
    .await;
    if let Err(e) = res {
        panic!("{e:#}\n{}", pg.log());
    }
}

#[tokio::test]
async fn a_view_made_on_the_migrations_empty_telemetry_does_not_stop_the_move() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        let o = c.cli(&["migrate"])?;
        ensure!(o.status.success(), "migrate: {o:?}");
        // Made before any leader ran: it binds to the empty table the first round replaces.
        c.pg.client()
            .await?
            .batch_execute("CREATE VIEW early AS SELECT device_id, ts FROM telemetry")
            .await?;
        leading_with_partitions(&mut c).await?;
        // The move finished (the empty table was kept as the partition before the cutover,
        // which it could not drop) and said why.
        partitioned(&c).await?;
        ensure!(
            c.count("SELECT count(*) FROM early").await? == 0,
            "the view still answers"
        );
        ensure!(
            c.node("a")
                .log()
                .contains("objects depend on the empty telemetry the move replaced"),
            "no warning naming the dependent objects"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}
