//! An outside review of issue 18's single write path (`telemetry` as route 0, one statement
//! builder, typed arrays, the light JSON reader), attacking it where data could be lost, stored
//! twice, mislabelled or stalled. Each test runs a term's real `Writer` in-process against a
//! private PostgreSQL (decode, prepare, one fenced statement per batch, isolation by halving);
//! every batch of a test is its own term, so "across batches" means across statements.
//!
//! A test marked `#[ignore]` fails today; its reason says what is wrong.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use leasehold_config::{OnConflict, RouteSpec, Source};
use leasehold_decode::Decoder;
use leasehold_ingest::{Acker, Inbound};
use leasehold_node::writer::{Writer, WriterConfig};
use leasehold_store::routes::ResolvedRoute;
use leasehold_store::Fence;
use leasehold_testkit::Postgres;
use tokio_util::sync::CancellationToken;

const HOLDER: &str = "review18";
const PATTERN: &str = "devices/{device_id}/#";
const MAX_PAYLOAD: usize = 256 * 1024;

/// A private PostgreSQL, migrated, with the lease held by [`HOLDER`], and `sql` run.
async fn database(sql: &str) -> Result<(Postgres, tokio_postgres::Client)> {
    let pg = Postgres::start().await?;
    let mut c = leasehold_store::connect(&pg.url(), "test").await?;
    leasehold_store::migrate(&mut c).await?;
    c.execute(
        "INSERT INTO instance_lock (service_name, holder_id, instance_id, epoch, expires_at)
         VALUES ('mqtt-ingest', $1, 'r18', 1, now() + interval '1 day')",
        &[&HOLDER],
    )
    .await?;
    c.batch_execute(sql).await.context("set-up SQL")?;
    Ok((pg, c))
}

/// A route spec: `columns` as `(column, source as written in TOML)`.
fn spec(
    name: &str,
    topic: &str,
    table: &str,
    key: &[&str],
    on_conflict: OnConflict,
    columns: &[(&str, &str)],
) -> RouteSpec {
    RouteSpec {
        name: name.into(),
        topics: vec![topic.into()],
        table: table.into(),
        key: key.iter().map(|k| k.to_string()).collect(),
        on_conflict,
        columns: columns
            .iter()
            .map(|(c, s)| (c.to_string(), Source::parse(s).expect("source")))
            .collect(),
    }
}

/// The specs checked against the database as a node does at start: `Err` naming the problems.
async fn resolve(db: &tokio_postgres::Client, specs: &[RouteSpec]) -> Result<Vec<ResolvedRoute>> {
    let (routes, problems) = leasehold_store::routes::resolve(db, specs).await?;
    if !problems.is_empty() {
        bail!("refused at start: {problems:?}");
    }
    Ok(routes)
}

/// A message as the broker delivers it.
fn delivery(topic: &str, payload: &str, pkid: u16, dup: bool) -> Inbound {
    let mut m = Inbound::detached(topic, payload.as_bytes());
    m.pkid = pkid;
    m.dup = dup;
    m
}

/// Runs `batch` through one term's writer as one batch and waits for it to drain (10 s at
/// most: longer is a stall). `max_pending` sets the redelivery span (`max_pending + 2048`).
async fn term(
    pg: &Postgres,
    routes: &[ResolvedRoute],
    max_pending: usize,
    batch: Vec<Inbound>,
) -> Result<()> {
    let (tx, rx) = leasehold_ingest::Inbox::channel(batch.len().max(1));
    let n = batch.len();
    for mut m in batch {
        m.received = Instant::now();
        tx.try_send(vec![m])
            .map_err(|_| anyhow::anyhow!("channel full"))?;
    }
    drop(tx);
    let writer = Writer {
        cfg: WriterConfig {
            database_url: pg.url(),
            instance_id: "r18".into(),
            batch_max_rows: n.max(1),
            batch_max_bytes: 64 * 1024 * 1024,
            batch_max_wait: Duration::from_millis(200),
            max_payload_bytes: MAX_PAYLOAD,
            decoder: Decoder::new(PATTERN, MAX_PAYLOAD),
            redelivery_window: leasehold_store::DEFAULT_REDELIVERY_WINDOW,
            max_pending,
            statement_timeout: Duration::from_secs(10),
            routes: routes.to_vec(),
            suspended: Vec::new(),
            require_sync_replication: false,
            sparkplug_host_id: None,
        },
        fence: Fence {
            lease_name: "mqtt-ingest".into(),
            holder_id: HOLDER.into(),
            epoch: 1,
        },
        rx,
        acker: Acker::detached(),
        status: Default::default(),
        active: None,
        publisher: None,
    };
    let cancel = CancellationToken::new();
    let mut run = tokio::spawn(writer.run(cancel.clone()));
    match tokio::time::timeout(Duration::from_secs(10), &mut run).await {
        Ok(done) => done.context("writer task")?.context("writer"),
        Err(_) => {
            cancel.cancel();
            let _ = run.await;
            bail!("the writer did not drain {n} message(s) within 10 s (a stall)")
        }
    }
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> Result<i64> {
    Ok(db
        .query_one(sql, &[])
        .await
        .context(sql.to_string())?
        .get(0))
}

/// `(reason, route, error)` of every dead letter, oldest first.
async fn dead_letters(
    db: &tokio_postgres::Client,
) -> Result<Vec<(String, Option<String>, String)>> {
    Ok(db
        .query(
            "SELECT reason, route, error FROM dead_letters ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// New route sources: content_hash, mqtt_pkid, possible_duplicate
// ---------------------------------------------------------------------------------------------

/// A route whose reading time is kept in a `text` column (allowed: "a time goes into a
/// timestamptz, timestamp, date or text column") and that maps `content_hash` and `mqtt_pkid`
/// (as routes.md advises for timestamp-less payloads) passes every check at start, but its
/// statement compares the text column with a `timestamptz` (`x."at" > (SELECT f FROM floor)` in
/// `again{k}`): PostgreSQL cannot prepare it ("operator does not exist: text > timestamp with
/// time zone"), so every term's writer fails to prepare and retries forever. Nothing of any
/// route is written: the whole node stalls. Fixed: the rule applies only to a `timestamptz` or
/// `timestamp` reading time (`statement::Described::new`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_reading_time_with_the_redelivery_columns_is_refused_at_start_or_written(
) -> Result<()> {
    let (pg, db) =
        database("CREATE TABLE events (id text, at text, h text, k int, PRIMARY KEY (id, at))")
            .await?;
    let specs = [spec(
        "events",
        "e/+",
        "events",
        &["id", "at"],
        OnConflict::Nothing,
        &[
            ("id", "topic[1]"),
            ("at", "timestamp"),
            ("h", "content_hash"),
            ("k", "mqtt_pkid"),
        ],
    )];
    let routes = match resolve(&db, &specs).await {
        Ok(r) => r,
        // Refused at start, naming the column: acceptable.
        Err(_) => return Ok(()),
    };
    term(
        &pg,
        &routes,
        100,
        vec![delivery("e/a", r#"{"v":1}"#, 1, false)],
    )
    .await?;
    ensure!(count(&db, "SELECT count(*) FROM events").await? == 1);
    Ok(())
}

/// The same rule with the reading time in a `timestamp` (without time zone) column, which the
/// node fills with the time in UTC: `again{k}` compares it with `timestamptz` values
/// (`x."at" > floor AND x."at" < g.rcv`), which PostgreSQL does in the session's `TimeZone`.
/// On a server whose time zone is not UTC the first copy is never found: the broker's
/// redelivery of a timestamp-less message is stored a second time. Fixed: such a column is
/// compared with the times `AT TIME ZONE 'UTC'`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_is_one_row_with_a_timestamp_column_on_a_server_not_in_utc() -> Result<()> {
    let (_pg, db, _) = delivered_and_redelivered("timestamp").await?;
    let rows = count(&db, "SELECT count(*) FROM events").await?;
    let marked = count(&db, "SELECT count(*) FROM events WHERE dup").await?;
    ensure!(
        rows == 1,
        "the redelivery was stored again: {rows} rows ({marked} marked possible_duplicate)"
    );
    Ok(())
}

/// Control for the test above: the same route with a `timestamptz` reading time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_is_one_row_with_a_timestamptz_column() -> Result<()> {
    let (pg, db, routes) = delivered_and_redelivered("timestamptz").await?;
    // A second publish with the same bytes and a new packet id is a new row, unmarked; a DUP
    // delivery whose first copy is not found is stored and marked.
    term(
        &pg,
        &routes,
        100,
        vec![delivery("e/a", r#"{"state":"ON"}"#, 8, false)],
    )
    .await?;
    term(
        &pg,
        &routes,
        100,
        vec![delivery("e/a", r#"{"state":"ON"}"#, 9, true)],
    )
    .await?;
    let rows: Vec<(i32, bool, bool)> = db
        .query("SELECT k, dup, h IS NOT NULL FROM events ORDER BY at", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    ensure!(
        rows == [(7, false, true), (8, false, true), (9, true, true)],
        "{rows:?}"
    );
    ensure!(dead_letters(&db).await?.is_empty());
    Ok(())
}

/// G3 for a route that maps `content_hash` and `mqtt_pkid`: a DUP-flagged delivery matches a
/// stored copy only among the last `MAX_PENDING + 2048` readings, because the broker reuses a
/// packet id after 65,535 deliveries. That count is taken over `telemetry` alone (`floor` in the
/// statement), whatever the route. With traffic that goes to routes (`telemetry` empty, as
/// after a migration), the only bound left is `REDELIVERY_WINDOW` (1 h): a new publish of the
/// same bytes that got a reused packet id, redelivered, is collapsed onto the older copy and
/// lost. `telemetry` itself keeps it (control below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_publish_with_a_reused_packet_id_is_not_collapsed_in_a_route() -> Result<()> {
    reused_packet_id_in_a_route(false).await
}

/// The same with `received_at` mapped: the route then has the redelivery rule, its floor counted
/// over its own table's readings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_publish_with_a_reused_packet_id_is_not_collapsed_in_a_route_with_received_at(
) -> Result<()> {
    reused_packet_id_in_a_route(true).await
}

async fn reused_packet_id_in_a_route(with_received_at: bool) -> Result<()> {
    let (pg, db) = database(
        "CREATE TABLE events (id text, at timestamptz, h text, k int, dup bool, rcv timestamptz,
                              PRIMARY KEY (id, at))",
    )
    .await?;
    let mut columns = vec![
        ("id", "topic[1]"),
        ("at", "timestamp"),
        ("h", "content_hash"),
        ("k", "mqtt_pkid"),
        ("dup", "possible_duplicate"),
    ];
    if with_received_at {
        columns.push(("rcv", "received_at"));
    }
    let specs = [spec(
        "events",
        "e/#",
        "events",
        &["id", "at"],
        OnConflict::Nothing,
        &columns,
    )];
    let routes = resolve(&db, &specs).await?;
    // Span = 1 + 2048 readings.
    term(
        &pg,
        &routes,
        1,
        vec![delivery("e/s", r#"{"state":"ON"}"#, 7, false)],
    )
    .await?;
    let others: Vec<Inbound> = (0..2100u32)
        .map(|i| {
            delivery(
                &format!("e/o{i}"),
                r#"{"state":"OFF"}"#,
                (i % 60_000) as u16 + 100,
                false,
            )
        })
        .collect();
    term(&pg, &routes, 1, others).await?;
    // The switch publishes ON again; it gets packet id 7 again, and its delivery is redelivered.
    term(
        &pg,
        &routes,
        1,
        vec![delivery("e/s", r#"{"state":"ON"}"#, 7, true)],
    )
    .await?;
    let n = count(&db, "SELECT count(*) FROM events WHERE id = 's'").await?;
    ensure!(
        n == 2,
        "{n} row(s) for the switch: its second publish was collapsed onto one 2,100 deliveries older"
    );
    Ok(())
}

/// Control: the same sequence into `telemetry` keeps the second publish (stored, marked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_publish_with_a_reused_packet_id_is_not_collapsed_in_telemetry() -> Result<()> {
    let (pg, db) = database("").await?;
    term(
        &pg,
        &[],
        1,
        vec![delivery("devices/s/state", r#"{"state":"ON"}"#, 7, false)],
    )
    .await?;
    let others: Vec<Inbound> = (0..2100u32)
        .map(|i| {
            delivery(
                &format!("devices/o{i}/state"),
                r#"{"state":"OFF"}"#,
                (i % 60_000) as u16 + 100,
                false,
            )
        })
        .collect();
    term(&pg, &[], 1, others).await?;
    term(
        &pg,
        &[],
        1,
        vec![delivery("devices/s/state", r#"{"state":"ON"}"#, 7, true)],
    )
    .await?;
    let n = count(&db, "SELECT count(*) FROM telemetry WHERE device_id = 's'").await?;
    ensure!(n == 2, "{n} row(s) for the switch");
    Ok(())
}

/// The new sources into other column types: `mqtt_pkid` into numeric and text,
/// `possible_duplicate` into text, `content_hash` into varchar(32), with a timestamped and a
/// timestamp-less payload; `received_at` as part of a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_sources_reach_other_column_types() -> Result<()> {
    let (pg, db) = database(
        "CREATE TABLE src (id text, rcv timestamptz, kn numeric, kt text, pd text,
                           h varchar(32), PRIMARY KEY (id, rcv))",
    )
    .await?;
    let specs = [spec(
        "src",
        "s/+",
        "src",
        &["id", "rcv"],
        OnConflict::Nothing,
        &[
            ("id", "topic[1]"),
            ("rcv", "received_at"),
            ("kn", "mqtt_pkid"),
            ("kt", "mqtt_pkid"),
            ("pd", "possible_duplicate"),
            ("h", "content_hash"),
        ],
    )];
    let routes = resolve(&db, &specs).await?;
    term(
        &pg,
        &routes,
        100,
        vec![
            delivery("s/a", r#"{"ts":1700000000}"#, 65535, false),
            delivery("s/b", r#"{"v":1}"#, 3, true),
        ],
    )
    .await?;
    let rows: Vec<(String, String, String, String, Option<String>)> = db
        .query("SELECT id, kn::text, kt, pd, h FROM src ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    ensure!(rows.len() == 2, "{rows:?} {:?}", dead_letters(&db).await?);
    ensure!(
        rows[0].1 == "65535" && rows[0].2 == "65535" && rows[0].3 == "false" && rows[0].4.is_none(),
        "{rows:?}"
    );
    ensure!(
        rows[1].3 == "true" && rows[1].4.as_ref().is_some_and(|h| h.len() == 32),
        "{rows:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Keys that are not plain text
// ---------------------------------------------------------------------------------------------

/// A `text` key with a nondeterministic (case-insensitive) collation: the statement treats a
/// `text` key as compared exactly (`exact_key`: no insert order, no earlier-row check), but the
/// table's unique index finds `ABC` and `abc` equal. Two such rows in one batch of a `"nothing"`
/// route: the database skips the second, and since the key the insert returned matches it too
/// (with the column's collation) it is left out of the skipped rows: counted as written,
/// acknowledged, neither stored nor dead-lettered. routes.md promises the citext behaviour: the
/// later one is compared with the earlier one (here: a conflict).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_insensitive_text_key_in_one_batch_is_a_conflict_not_a_silent_loss() -> Result<()> {
    let (pg, db) = database(
        "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TABLE names (k text COLLATE ci PRIMARY KEY, v text);",
    )
    .await?;
    let specs = [spec(
        "names",
        "n",
        "names",
        &["k"],
        OnConflict::Nothing,
        &[("k", "$.k"), ("v", "$.v")],
    )];
    let routes = resolve(&db, &specs).await?;
    term(
        &pg,
        &routes,
        100,
        vec![
            delivery("n", r#"{"k":"ABC","v":"first"}"#, 1, false),
            delivery("n", r#"{"k":"abc","v":"second"}"#, 2, false),
        ],
    )
    .await?;
    let rows = count(&db, "SELECT count(*) FROM names").await?;
    let dead = dead_letters(&db).await?;
    ensure!(
        rows == 1 && dead.len() == 1 && dead[0].0 == "conflict",
        "{rows} row(s), dead letters {dead:?}: the second message vanished"
    );
    Ok(())
}

/// Control: across batches the same key is a conflict, as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_insensitive_text_key_across_batches_is_a_conflict() -> Result<()> {
    let (pg, db) = database(
        "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TABLE names (k text COLLATE ci PRIMARY KEY, v text);",
    )
    .await?;
    let specs = [spec(
        "names",
        "n",
        "names",
        &["k"],
        OnConflict::Nothing,
        &[("k", "$.k"), ("v", "$.v")],
    )];
    let routes = resolve(&db, &specs).await?;
    term(
        &pg,
        &routes,
        100,
        vec![delivery("n", r#"{"k":"ABC","v":"first"}"#, 1, false)],
    )
    .await?;
    term(
        &pg,
        &routes,
        100,
        vec![delivery("n", r#"{"k":"abc","v":"second"}"#, 2, false)],
    )
    .await?;
    let dead = dead_letters(&db).await?;
    ensure!(dead.len() == 1 && dead[0].0 == "conflict", "{dead:?}");
    Ok(())
}

/// A `char(n)` key: `'ab '` and `'ab'` are one key for `char(n)`, but the skipped row's check
/// compares the stored key as text (`x.k = q.v0`, the bpchar read as text without its padding),
/// so the second is found neither in the table nor in the insert, and is dead-lettered as
/// `not_stored` ("a trigger or rule skipped it") instead of being a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_char_key_with_trailing_spaces_is_a_duplicate_not_unstored() -> Result<()> {
    let (pg, db) = database("CREATE TABLE fixed (k char(4) PRIMARY KEY, v int);").await?;
    let specs = [spec(
        "fixed",
        "f",
        "fixed",
        &["k"],
        OnConflict::Nothing,
        &[("k", "$.k"), ("v", "$.v")],
    )];
    let routes = resolve(&db, &specs).await?;
    term(
        &pg,
        &routes,
        100,
        vec![delivery("f", r#"{"k":"ab","v":1}"#, 1, false)],
    )
    .await?;
    term(
        &pg,
        &routes,
        100,
        vec![delivery("f", r#"{"k":"ab ","v":1}"#, 2, false)],
    )
    .await?;
    let dead = dead_letters(&db).await?;
    ensure!(dead.is_empty(), "{dead:?}");
    ensure!(count(&db, "SELECT count(*) FROM fixed").await? == 1);
    Ok(())
}

/// Keys of other types in one batch and across batches: varchar(n), numeric spelled two ways,
/// and a key computed from `received_at`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varchar_and_numeric_keys_settle_alike_in_one_batch_and_across() -> Result<()> {
    let (pg, db) = database(
        "CREATE TABLE vk (k varchar(8) PRIMARY KEY, v int);
         CREATE TABLE nk (k numeric(10,2) PRIMARY KEY, v int);",
    )
    .await?;
    let specs = [
        spec(
            "vk",
            "v",
            "vk",
            &["k"],
            OnConflict::Nothing,
            &[("k", "$.k"), ("v", "$.v")],
        ),
        spec(
            "nk",
            "n",
            "nk",
            &["k"],
            OnConflict::Nothing,
            &[("k", "$.k"), ("v", "$.v")],
        ),
    ];
    let routes = resolve(&db, &specs).await?;
    term(
        &pg,
        &routes,
        100,
        vec![
            delivery("v", r#"{"k":"a","v":1}"#, 1, false),
            delivery("v", r#"{"k":"a","v":1}"#, 2, false),
            delivery("v", r#"{"k":"a","v":2}"#, 3, false),
            delivery("n", r#"{"k":1.5,"v":1}"#, 4, false),
            delivery("n", r#"{"k":"1.50","v":1}"#, 5, false),
            delivery("n", r#"{"k":"1.501","v":2}"#, 6, false),
        ],
    )
    .await?;
    term(
        &pg,
        &routes,
        100,
        vec![
            delivery("v", r#"{"k":"a","v":1}"#, 7, false),
            delivery("n", r#"{"k":"15e-1","v":1}"#, 8, false),
        ],
    )
    .await?;
    let dead = dead_letters(&db).await?;
    ensure!(count(&db, "SELECT count(*) FROM vk").await? == 1);
    ensure!(count(&db, "SELECT count(*) FROM nk").await? == 1);
    // "a"/2 is a conflict; 1.501 rounds to 1.50 for numeric(10,2): a conflict too.
    ensure!(
        dead.len() == 2 && dead.iter().all(|d| d.0 == "conflict"),
        "{dead:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Defaults
// ---------------------------------------------------------------------------------------------

/// A column with a volatile default (`DEFAULT now()`) mapped from an optional JSON field: a
/// message without the field stores the default. The same message again in a later batch (the
/// broker's redelivery after a failover, or the old consumer still writing during a migration
/// as routes.md describes) is compared with the stored row using the default evaluated *now*
/// (`coalesce(m.v, (now()))`): a different time, so a `conflict` dead letter instead of a
/// duplicate, for every redelivered message that lacks the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_that_took_a_volatile_default_is_a_duplicate_not_a_conflict() -> Result<()> {
    let (pg, db) = database(
        "CREATE TABLE noted (id text PRIMARY KEY, v int, noted timestamptz DEFAULT now())",
    )
    .await?;
    let specs = [spec(
        "noted",
        "n/+",
        "noted",
        &["id"],
        OnConflict::Nothing,
        &[("id", "topic[1]"), ("v", "$.v"), ("noted", "$.noted")],
    )];
    let routes = resolve(&db, &specs).await?;
    term(
        &pg,
        &routes,
        100,
        vec![delivery("n/a", r#"{"v":1}"#, 1, false)],
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    term(
        &pg,
        &routes,
        100,
        vec![delivery("n/a", r#"{"v":1}"#, 1, true)],
    )
    .await?;
    let dead = dead_letters(&db).await?;
    ensure!(dead.is_empty(), "the redelivery was a {dead:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Two routes into one table; isolation of refused rows
// ---------------------------------------------------------------------------------------------

/// A `"nothing"` route and a later `"update"` route into one table, one message: the update
/// cannot touch the row the earlier CTE inserted in the same statement ("cannot affect row a
/// second time"), so the batch is isolated; the later route's row must still win, nothing
/// dead-lettered. And the reverse order: the `"nothing"` route's different row is a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_then_update_into_one_table_the_later_route_wins() -> Result<()> {
    let (pg, db) = database(
        "CREATE TABLE one (id text PRIMARY KEY, v int, src text);
         CREATE TABLE two (id text PRIMARY KEY, v int, src text);",
    )
    .await?;
    let specs = [
        spec(
            "a",
            "m/+",
            "one",
            &["id"],
            OnConflict::Nothing,
            &[("id", "topic[1]"), ("v", "$.v"), ("src", "'a'")],
        ),
        spec(
            "b",
            "m/#",
            "one",
            &["id"],
            OnConflict::Update,
            &[("id", "topic[1]"), ("v", "$.v"), ("src", "'b'")],
        ),
        spec(
            "c",
            "m/+",
            "two",
            &["id"],
            OnConflict::Update,
            &[("id", "topic[1]"), ("v", "$.v"), ("src", "'c'")],
        ),
        spec(
            "d",
            "m/#",
            "two",
            &["id"],
            OnConflict::Nothing,
            &[("id", "topic[1]"), ("v", "$.v"), ("src", "'d'")],
        ),
    ];
    let routes = resolve(&db, &specs).await?;
    term(
        &pg,
        &routes,
        100,
        vec![
            delivery("m/x", r#"{"v":1}"#, 1, false),
            delivery("m/y", r#"{"v":2}"#, 2, false),
        ],
    )
    .await?;
    let one: Vec<(String, String)> = db
        .query("SELECT id, src FROM one ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    ensure!(
        one == [("x".into(), "b".into()), ("y".into(), "b".into())],
        "{one:?}"
    );
    let two: Vec<(String, String)> = db
        .query("SELECT id, src FROM two ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    ensure!(
        two == [("x".into(), "c".into()), ("y".into(), "c".into())],
        "{two:?}"
    );
    let dead = dead_letters(&db).await?;
    ensure!(
        dead.len() == 2
            && dead
                .iter()
                .all(|d| d.0 == "conflict" && d.1.as_deref() == Some("d")),
        "{dead:?}"
    );
    Ok(())
}

/// An `"update"` route whose table refuses the last two of three messages with one key
/// (a CHECK constraint): each refusal is one dead letter, and the row the first message wrote
/// is what stays (as writing them one by one would give). Also a numeric overflow, and a good
/// message of another key in the same batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_update_rows_fall_back_to_the_row_they_replaced() -> Result<()> {
    let (pg, db) = database(
        "CREATE TABLE checked (id text PRIMARY KEY, v int CHECK (v < 100), n numeric(4,1));",
    )
    .await?;
    let specs = [spec(
        "checked",
        "c/+",
        "checked",
        &["id"],
        OnConflict::Update,
        &[("id", "topic[1]"), ("v", "$.v"), ("n", "$.n")],
    )];
    let routes = resolve(&db, &specs).await?;
    term(
        &pg,
        &routes,
        100,
        vec![
            delivery("c/a", r#"{"v":1,"n":1}"#, 1, false),
            delivery("c/b", r#"{"v":5,"n":1}"#, 2, false),
            delivery("c/a", r#"{"v":500,"n":1}"#, 3, false),
            delivery("c/a", r#"{"v":2,"n":123456}"#, 4, false),
            delivery("c/c", r#"{"v":7,"n":99999}"#, 5, false),
        ],
    )
    .await?;
    let rows: Vec<(String, i32)> = db
        .query("SELECT id, v FROM checked ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    ensure!(rows == [("a".into(), 1), ("b".into(), 5)], "{rows:?}");
    let dead = dead_letters(&db).await?;
    ensure!(
        dead.len() == 3 && dead.iter().all(|d| d.0 == "rejected_by_database"),
        "{dead:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Typed arrays: far times, integers, booleans
// ---------------------------------------------------------------------------------------------

/// `timestamptz` values now travel in binary (`PgTime`, microseconds since 2000-01-01): far past,
/// far future, before 1970 with a fraction, a leap second and an offset across midnight of year
/// 0, into `telemetry` and into a route's typed columns (with negative and extreme integers and
/// booleans from strings). A time before year 1 into a `timestamp` column was written as
/// chrono prints it (`-0001-12-31 23:30:00`), which PostgreSQL refuses: a valid value became a
/// `rejected_by_database` dead letter. Fixed: written with `BC` (`routing::pg_time_text`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_times_and_extreme_integers_are_stored_exactly() -> Result<()> {
    let (pg, db) = database(
        "CREATE TABLE typed (id text PRIMARY KEY, at timestamptz, big bigint, small smallint,
                             flag boolean, plain timestamp)",
    )
    .await?;
    let times = [
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999Z",
        "1969-12-31T23:59:59.5Z",
        "1900-02-28T12:00:00.000001-03:00",
        "0000-01-01T00:30:00+01:00",
        "2016-12-31T23:59:60.5Z",
    ];
    let mut batch: Vec<Inbound> = times
        .iter()
        .enumerate()
        .map(|(i, t)| {
            delivery(
                &format!("devices/d{i}/t"),
                &format!(r#"{{"ts":"{t}"}}"#),
                i as u16 + 1,
                false,
            )
        })
        .collect();
    batch.extend(times.iter().enumerate().map(|(i, t)| {
        delivery(
            &format!("t/r{i}"),
            &format!(
                r#"{{"at":"{t}","big":"-9223372036854775808","small":-32768,"flag":"TRUE","plain":"{t}"}}"#
            ),
            i as u16 + 100,
            false,
        )
    }));
    let specs = [spec(
        "typed",
        "t/+",
        "typed",
        &["id"],
        OnConflict::Nothing,
        &[
            ("id", "topic[1]"),
            ("at", "$.at"),
            ("big", "$.big"),
            ("small", "$.small"),
            ("flag", "$.flag"),
            ("plain", "$.plain"),
        ],
    )];
    let routes = resolve(&db, &specs).await?;
    db.batch_execute("SET timezone = 'UTC'").await?;
    term(&pg, &routes, 100, batch).await?;
    ensure!(
        dead_letters(&db).await?.is_empty(),
        "{:?}",
        dead_letters(&db).await?
    );
    for (i, t) in times.iter().enumerate() {
        let t = t.replace(":60.5Z", ":59.5Z"); // as PostgreSQL reads a leap second: see below
        let leap = i == 5;
        let want = if leap {
            "2017-01-01 00:00:00.5+00".to_string()
        } else if i == 4 {
            // Year 0 at 00:30+01:00 is the last day of year -1: 2 BC.
            "0002-12-31 23:30:00+00 BC".to_string()
        } else {
            db.query_one("SELECT $1::text::timestamptz::text", &[&t])
                .await?
                .get(0)
        };
        let got: String = db
            .query_one(
                "SELECT ts::text FROM telemetry WHERE device_id = $1",
                &[&format!("d{i}")],
            )
            .await?
            .get(0);
        ensure!(got == want, "telemetry {t}: stored {got}, want {want}");
        let got: String = db
            .query_one(
                "SELECT at::text FROM typed WHERE id = $1 AND big = -9223372036854775808
                   AND small = -32768 AND flag",
                &[&format!("r{i}")],
            )
            .await
            .with_context(|| format!("route row {i}"))?
            .get(0);
        ensure!(got == want, "route {t}: stored {got}, want {want}");
        // The same time into `timestamp` (without time zone): the time in UTC.
        let ok: bool = db
            .query_one(
                "SELECT plain = ($2::text::timestamptz AT TIME ZONE 'UTC') FROM typed WHERE id = $1",
                &[&format!("r{i}"), &want],
            )
            .await?
            .get(0);
        ensure!(ok, "route {t}: the timestamp column differs");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The light JSON reader
// ---------------------------------------------------------------------------------------------

/// `parse_light` must accept and refuse exactly what `parse` does (it decides which payloads
/// become `telemetry` rows), and read the same device id and timestamp.
#[test]
fn the_light_reader_agrees_with_the_value_reader() {
    let deep_ok = format!("{{\"a\":{}1{}}}", "[".repeat(120), "]".repeat(120));
    let deep_bad = format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200));
    let payloads: Vec<Vec<u8>> = vec![
        br#"{"ts":1700000000,"ts":1700000001}"#.to_vec(),
        br#"{"ts":1700000000,"ts":null}"#.to_vec(),
        br#"{"\u0074s":1700000000}"#.to_vec(),
        br#"{"timestamp":"x","ts":1700000000}"#.to_vec(),
        br#"{"timestamp":null,"ts":1700000000}"#.to_vec(),
        br#"{"device_id":"a","device_id":"b"}"#.to_vec(),
        br#"{"device_id":12345678901234567890123}"#.to_vec(),
        br#"{"device_id":-0}"#.to_vec(),
        br#"{"v":1e400}"#.to_vec(),
        br#"{"v":-1e400}"#.to_vec(),
        br#"{"v":18446744073709551616}"#.to_vec(),
        br#"{"ts":1e400}"#.to_vec(),
        br#"{"v":"\ud800"}"#.to_vec(),
        br#"{"\ud800":1}"#.to_vec(),
        br#"{"v":"\u0000"}"#.to_vec(),
        br#"{"v":1} "#.to_vec(),
        br#"{"v":1} x"#.to_vec(),
        br#"{"v":1}{"v":2}"#.to_vec(),
        b"{\"v\":\"\xff\"}".to_vec(),
        b"{\"\xc3\x28\":1}".to_vec(),
        b"\xef\xbb\xbf{\"v\":1}".to_vec(),
        br#"{"v":[1,2,{"a":{"b":[]}}],"ts":"2024-01-01T00:00:00Z"}"#.to_vec(),
        br#"[1]"#.to_vec(),
        br#""s""#.to_vec(),
        br#"null"#.to_vec(),
        br#"{"a":1,}"#.to_vec(),
        br#"{"a":01}"#.to_vec(),
        br#"{"a":NaN}"#.to_vec(),
        deep_ok.into_bytes(),
        deep_bad.into_bytes(),
    ];
    let d = Decoder::new("devices/{device_id}/#", MAX_PAYLOAD);
    for p in &payloads {
        for topic in ["devices/x/t", "other/t"] {
            let full = d.parse(topic, p);
            let light = d.parse_light(topic, p);
            let show = String::from_utf8_lossy(p);
            match (&full, &light) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a.device_id, b.device_id, "{show}");
                    assert_eq!(
                        format!("{:?}", a.timestamp),
                        format!("{:?}", b.timestamp),
                        "{show}"
                    );
                }
                (Err(a), Err(b)) => assert_eq!(
                    leasehold_node::batch::reason_label(a),
                    leasehold_node::batch::reason_label(b),
                    "{show}: {a} / {b}"
                ),
                _ => panic!("{show}: parse {full:?}, parse_light {light:?}"),
            }
        }
    }
}

/// A route keeping the reading time in a column of type `at` with the redelivery columns, on a
/// server in Asia/Tokyo; one timestamp-less message, then the broker's redelivery of it (the
/// leader died before its ack: DUP, same packet id and bytes).
async fn delivered_and_redelivered(
    at: &str,
) -> Result<(Postgres, tokio_postgres::Client, Vec<ResolvedRoute>)> {
    let (pg, db) = database(&format!(
        "CREATE TABLE events (id text, at {at}, h text, k int, dup bool, rcv timestamptz,
                              PRIMARY KEY (id, at));
         DO $$ BEGIN
           EXECUTE format('ALTER DATABASE %I SET timezone = %L', current_database(), 'Asia/Tokyo');
         END $$;"
    ))
    .await?;
    let specs = [spec(
        "events",
        "e/+",
        "events",
        &["id", "at"],
        OnConflict::Nothing,
        &[
            ("id", "topic[1]"),
            ("at", "timestamp"),
            ("h", "content_hash"),
            ("k", "mqtt_pkid"),
            ("dup", "possible_duplicate"),
            ("rcv", "received_at"),
        ],
    )];
    let routes = resolve(&db, &specs).await?;
    term(
        &pg,
        &routes,
        100,
        vec![delivery("e/a", r#"{"state":"ON"}"#, 7, false)],
    )
    .await?;
    term(
        &pg,
        &routes,
        100,
        vec![delivery("e/a", r#"{"state":"ON"}"#, 7, true)],
    )
    .await?;
    Ok((pg, db, routes))
}
