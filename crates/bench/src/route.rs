//! The typed route beside the default route: the same queued messages drained by a leader whose
//! `[[routes]]` extracts them into typed columns of a user table (`on_conflict = "update"`), and
//! what each drain cost the leader's, PostgreSQL's and the broker's CPU per message.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use leasehold_testkit::{eventually_every, http, memory_of, metric, NodeProc};
use serde::Serialize;
use tokio_postgres::Client;

use crate::mqtt::{
    clear_retained, create_session, drop_session, publish, publish_gateways, publish_sparkplug,
};
use crate::probes::{cpu_seconds, postgres_cpu_seconds};
use crate::rig::{leader_summary, stop_node, Rig, LEADER_SESSION};

/// The user table of the typed route: four values from the JSON, the payload, the receipt time.
const TABLE: &str = "CREATE TABLE IF NOT EXISTS bench_route (
    device_id   text        NOT NULL,
    ts          timestamptz NOT NULL,
    run         text        NOT NULL,
    seq         bigint      NOT NULL,
    received_at timestamptz NOT NULL,
    dados       jsonb       NOT NULL,
    PRIMARY KEY (device_id, ts))";

/// The cluster's configuration of the default and gateway drains: `telemetry` alone.
const DEFAULT: &str = r#"mqtt_topics = ["devices/+/telemetry", "gw/+/up"]
"#;

/// The Sparkplug drain's: its namespace read as `sparkplug_b`, into `telemetry`.
const SPARKPLUG: &str = r#"mqtt_topics = ["devices/+/telemetry", "gw/+/up", "spBv1.0/#"]

[sparkplug]
host_id = "bench"

[[formats]]
topics = ["spBv1.0/#"]
format = "sparkplug_b"
"#;

const ROUTE: &str = r#"mqtt_topics = ["devices/+/telemetry", "gw/+/up"]

[[routes]]
name = "typed"
topics = ["devices/+/telemetry"]
table = "bench_route"
key = ["device_id", "ts"]
on_conflict = "update"

[routes.columns]
device_id = "$.device_id"
ts = "timestamp"
run = "$.run"
seq = "$.seq"
received_at = "received_at"
dados = "payload"
"#;

/// Which table a drain writes.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// No routes: `telemetry`.
    Default,
    /// The typed route into `bench_route`.
    Typed,
    /// `telemetry`, the readings sent by gateways as JSON arrays of [`GATEWAY_READINGS`].
    Gateway,
    /// `telemetry` holding older readings in day partitions (`--history-rows`).
    History,
    /// `telemetry`, the readings sent by Sparkplug B edge nodes: DDATA of 20 metrics by alias.
    Sparkplug,
}

/// Readings per gateway message.
pub const GATEWAY_READINGS: u64 = 50;

impl Target {
    fn table(self) -> &'static str {
        match self {
            Target::Default | Target::Gateway | Target::History | Target::Sparkplug => "telemetry",
            Target::Typed => "bench_route",
        }
    }

    /// The `route` label of its metrics.
    fn route(self) -> &'static str {
        match self {
            Target::Default | Target::Gateway | Target::History | Target::Sparkplug => "default",
            Target::Typed => "typed",
        }
    }

    fn run_of(self) -> &'static str {
        match self {
            // Readings of the drain are stamped now: the bound keeps the count to the
            // partitions of the last days, whatever history the table holds.
            Target::Default | Target::Gateway | Target::History => {
                "ts > now() - interval '2 days' AND payload->>'run'"
            }
            Target::Typed => "run",
            // The run is the edge nodes' group; its data messages, not its births.
            Target::Sparkplug => {
                "ts > now() - interval '2 days' AND topic LIKE 'spBv1.0/%/DDATA/%' AND split_part(device_id, '/', 1)"
            }
        }
    }
}

/// One drain of a queued session.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Drain {
    /// Readings stored (for the gateway drain, 50 per message).
    pub messages: u64,
    /// Readings per second, first receipt to last commit.
    pub rate: f64,
    pub peak_rss: u64,
    /// The leader's CPU (user + system, its whole life) per message, microseconds.
    pub leader_cpu_us: Option<f64>,
    /// PostgreSQL's CPU over the drain per message, microseconds; the harness sends it nothing
    /// meanwhile (it waits on the leader's metrics and `/health`), so this is the leader's
    /// statements' cost and its checks' (each `/health` runs a database probe).
    pub postgres_cpu_us: Option<f64>,
    /// The broker's CPU over the drain per message, microseconds.
    pub broker_cpu_us: Option<f64>,
    /// What PostgreSQL spent its time on during the drain (`pg_stat_statements`, when loaded).
    pub statements: Vec<Statement>,
    /// Older readings `telemetry` held before the drain (set by the history drain's caller).
    pub history_rows: i64,
}

/// One normalized statement's share of a drain, from `pg_stat_statements`.
#[derive(Debug, Clone, Serialize)]
pub struct Statement {
    pub calls: i64,
    pub rows: i64,
    /// Execution time (not planning) per drained message, microseconds: wall time inside the
    /// executor, which for these in-memory statements is close to CPU.
    pub exec_us_per_msg: f64,
    /// WAL written per drained message, bytes.
    pub wal_bytes_per_msg: f64,
    /// The statement's first characters, whitespace folded.
    pub query: String,
}

/// The typed route's drain and the default route's, in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Routes {
    /// The default route: its rate and CPU figures each the median of [`ROUNDS`]
    /// drains ([`Routes::default_rounds`]), its other fields (statements, peak RSS) the first
    /// drain's.
    pub default: Drain,
    /// Each drain of the default route, in order.
    pub default_rounds: Vec<Drain>,
    /// The typed route, judged against the default one: medians as for the default route.
    pub typed: Drain,
    pub typed_rounds: Vec<Drain>,
    /// The same readings as the default drain, sent 50 to a message by gateways: medians too.
    pub gateway: Drain,
    pub gateway_rounds: Vec<Drain>,
    /// Sparkplug B DDATA of 20 metrics by alias, one reading each, into `telemetry`.
    pub sparkplug: Drain,
    /// The default drain again, into a `telemetry` that holds that many older readings
    /// ([`HISTORY_ROUNDS`] times, alternating with [`Routes::history_empty`]).
    pub history: Vec<Drain>,
    /// The default drain into the same `telemetry` with its history detached, each right after
    /// a drain of [`Routes::history`] in odd rounds and right before one in even rounds.
    pub history_empty: Vec<Drain>,
    /// What a leader's start costs without a message to drain (migrations check, connections,
    /// the deployment checks' broker probes), CPU milliseconds, the median of [`ROUNDS`]
    /// starts: part of each drain's leader figure, but not per message.
    pub leader_start_cpu_ms: Option<f64>,
    /// What the same starts cost PostgreSQL (a backend per connection and its first queries,
    /// the term's partition round, the checks' queries), CPU milliseconds, their median: part of
    /// each drain's PostgreSQL figure, but not per message.
    pub postgres_start_cpu_ms: Option<f64>,
}

impl Drain {
    /// The leader's CPU per message without its start (`start_ms`, [`Routes::leader_start_cpu_ms`]).
    pub fn leader_cpu_us_after_start(&self, start_ms: Option<f64>) -> Option<f64> {
        self.after_start(self.leader_cpu_us, start_ms)
    }

    /// PostgreSQL's CPU per message without the leader's start ([`Routes::postgres_start_cpu_ms`]).
    pub fn postgres_cpu_us_after_start(&self, start_ms: Option<f64>) -> Option<f64> {
        self.after_start(self.postgres_cpu_us, start_ms)
    }

    fn after_start(&self, us: Option<f64>, start_ms: Option<f64>) -> Option<f64> {
        Some(us? - start_ms? * 1e3 / self.messages.max(1) as f64)
    }
}

impl Routes {
    pub fn ratio(&self) -> f64 {
        self.typed.rate / self.default.rate.max(1e-9)
    }

    /// Readings per second of the gateway drain against the default drain's.
    pub fn gateway_ratio(&self) -> f64 {
        self.gateway.rate / self.default.rate.max(1e-9)
    }

    /// The median drain rate into a `telemetry` full of history against the median of the
    /// drains alternating with them into the same table with its history detached, judged like
    /// the compared routes. The first drain after the bulk load and its vacuum was the slowest
    /// of the phase in each full run: [`Routes::history_first_ratio`] reports it apart.
    pub fn history_ratio(&self) -> Option<f64> {
        Some(
            median_of(&self.history, |d| Some(d.rate))?
                / median_of(&self.history_empty, |d| Some(d.rate))?.max(1e-9),
        )
    }

    /// The first drain into the history (a leader's first start on the table after its load)
    /// against the empty drains' median: reported, not judged.
    pub fn history_first_ratio(&self) -> Option<f64> {
        Some(
            self.history.first()?.rate
                / median_of(&self.history_empty, |d| Some(d.rate))?.max(1e-9),
        )
    }

    /// PostgreSQL's CPU per message into the history against into the empty table, medians of
    /// the whole drains (the leader's start included: what it does on a table of many
    /// partitions is part of what the history costs).
    pub fn history_postgres_ratio(&self) -> Option<f64> {
        Some(
            median_of(&self.history, |d| d.postgres_cpu_us)?
                / median_of(&self.history_empty, |d| d.postgres_cpu_us)?.max(1e-9),
        )
    }
}

/// The median of `f` over the drains that have it.
fn median_of(drains: &[Drain], f: impl Fn(&Drain) -> Option<f64>) -> Option<f64> {
    median(drains.iter().filter_map(f).collect())
}

/// The leader stopped, `n` messages of `run` queued in its session, then drained by a new leader
/// writing `target`.
///
/// While it drains, the harness sends PostgreSQL nothing: it watches the leader's
/// `leasehold_messages_written_total` instead of counting rows (a `count(*)` every 50 ms cost
/// PostgreSQL more CPU than the writes it waited for), and reads the rows once at the end.
pub async fn drain(rig: &Rig<'_>, run: &str, n: u64, target: Target) -> Result<(Drain, NodeProc)> {
    create_session(rig.mq.port, LEADER_SESSION).await?;
    // Rows the drain writes besides its `n` readings (Sparkplug's births).
    let mut extra_rows = 0;
    match target {
        Target::Gateway => {
            publish_gateways(rig.mq.port, run, n).await?;
        }
        Target::Sparkplug => {
            extra_rows = publish_sparkplug(rig.mq.port, run, n).await?;
        }
        _ => {
            publish(rig.mq.port, run, n, 0).await?;
        }
    }
    match target {
        Target::Default | Target::Gateway | Target::History => {
            rig.apply_config("default", DEFAULT)?
        }
        Target::Sparkplug => rig.apply_config("sparkplug", SPARKPLUG)?,
        Target::Typed => {
            rig.db.batch_execute(TABLE).await?;
            rig.apply_config("typed-route", ROUTE)?;
        }
    }
    let extra = vec![];
    // Every drain starts from a checkpoint, so each pays the same full-page writes.
    rig.db.batch_execute("CHECKPOINT").await?;
    let statements = Statements::reset(&rig.db).await;
    let pg_before = postgres_cpu_seconds(&rig.pg.data_dir());
    let broker_before = rig.mq.pid().and_then(|p| cpu_seconds(p, false));
    let node = rig.spawn_node_with(&format!("bench-leader-{run}"), &extra)?;
    wait_written(&node, target.route(), n + extra_rows, run).await?;
    // The idle start subtracted from this drain's figures ran its checks to the end: so does
    // the drain, before its CPU is read.
    wait_checks_done(&node).await?;
    let leader_cpu = cpu_seconds(node.pid(), false);
    let pg_after = postgres_cpu_seconds(&rig.pg.data_dir());
    let broker_after = rig.mq.pid().and_then(|p| cpu_seconds(p, false));
    let statements = match statements {
        Some(s) => s.top(&rig.db, n).await?,
        None => Vec::new(),
    };
    let rate = format!(
        "SELECT count(*), extract(epoch from max(pg_xact_commit_timestamp(xmin)) - min(received_at))::float8
         FROM {} WHERE {} = $1",
        target.table(),
        target.run_of()
    );
    let mut r = rig.db.query_one(rate.as_str(), &[&run]).await?;
    if r.get::<_, i64>(0) < n as i64 {
        // The counters ran ahead of the rows: redeliveries after a reconnect count as
        // duplicates. Rarely, then: the CPU figures are already taken.
        eprintln!(
            "bench: the leader's counters reached {n} before {} held every row of {run}; counting rows",
            target.table()
        );
        let start = Instant::now();
        while r.get::<_, i64>(0) < n as i64 {
            if start.elapsed() > DRAIN_TIMEOUT {
                bail!("{run}: {} of {n} rows stored", r.get::<_, i64>(0));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            r = rig.db.query_one(rate.as_str(), &[&run]).await?;
        }
    }
    let (rows, secs): (i64, Option<f64>) = (r.get(0), r.get(1));
    let per_msg = |s: Option<f64>| s.map(|s| s * 1e6 / n.max(1) as f64);
    let d = Drain {
        messages: rows as u64,
        rate: rows as f64 / secs.unwrap_or(0.0).max(1e-9),
        peak_rss: memory_of(node.pid()).map(|m| m.0).unwrap_or(0),
        leader_cpu_us: per_msg(leader_cpu),
        postgres_cpu_us: per_msg(pg_before.zip(pg_after).map(|(b, a)| a - b)),
        broker_cpu_us: per_msg(broker_before.zip(broker_after).map(|(b, a)| a - b)),
        statements,
        history_rows: 0,
    };
    eprintln!(
        "bench: {} drain {:.0} msg/s, CPU per message: leader {} us, PostgreSQL {} us, broker {} us; leader: {}",
        target.table(),
        d.rate,
        fmt_us(d.leader_cpu_us),
        fmt_us(d.postgres_cpu_us),
        fmt_us(d.broker_cpu_us),
        leader_summary(&node).await
    );
    for s in &d.statements {
        eprintln!(
            "bench:   {:5.2} us/msg exec, {:4.0} WAL bytes/msg, {} calls, {} rows: {}",
            s.exec_us_per_msg, s.wal_bytes_per_msg, s.calls, s.rows, s.query
        );
    }
    Ok((d, node))
}

/// Waits until the leader's metrics count `n` messages of `route` done (written, duplicate or
/// dead-lettered), reading them every 250 ms: a scrape costs the leader about a million
/// instructions (some 0.3 ms, or 1% of a 100,000-message drain at this pace), PostgreSQL nothing.
async fn wait_written(node: &NodeProc, route: &str, n: u64, run: &str) -> Result<()> {
    let done = [
        format!("leasehold_messages_written_total{{route=\"{route}\"}}"),
        format!("leasehold_messages_duplicate_total{{route=\"{route}\"}}"),
        format!("leasehold_messages_dead_lettered_total{{route=\"{route}\"}}"),
    ];
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < DRAIN_TIMEOUT {
        if let Ok((200, m)) = http(node.http_port(), "GET", "/metrics").await {
            let sum: f64 = done.iter().filter_map(|k| metric(&m, k)).sum();
            if sum >= n as f64 {
                return Ok(());
            }
            last = format!("{sum} of {n}");
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("timed out after {DRAIN_TIMEOUT:?} waiting for leasehold to drain {run} into route {route} ({last})")
}

const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// `pg_stat_statements`, when the server loaded it: reset before a drain, read after.
struct Statements;

impl Statements {
    /// Resets the statistics; `None` when the extension is not available.
    async fn reset(db: &Client) -> Option<Statements> {
        db.batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()",
        )
        .await
        .ok()
        .map(|_| Statements)
    }

    /// The statements that took the most execution time, per drained message.
    async fn top(self, db: &Client, n: u64) -> Result<Vec<Statement>> {
        let rows = db
            .query(
                "SELECT calls, rows, total_exec_time, wal_bytes::float8, left(regexp_replace(query, '\\s+', ' ', 'g'), 110)
                 FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 5",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Statement {
                calls: r.get(0),
                rows: r.get(1),
                exec_us_per_msg: r.get::<_, f64>(2) * 1e3 / n.max(1) as f64,
                wal_bytes_per_msg: r.get::<_, f64>(3) / n.max(1) as f64,
                query: r.get(4),
            })
            .collect())
    }
}

fn fmt_us(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "?".into())
}

/// The default route's, the typed route's and the gateways' drains of the same `n` messages, in
/// turn, [`ROUNDS`] times over; then Sparkplug's; then (with `history_rows`) the default route's
/// again into a `telemetry` holding that many older readings; `suffix` tells repeated runs apart.
pub async fn routes_phase(
    rig: &Rig<'_>,
    n: u64,
    suffix: &str,
    history_rows: u64,
) -> Result<Routes> {
    // Subtracted from every drain's leader figure: the median of three starts, like the drains.
    let (mut starts, mut pg_starts) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let (leader, pg) = idle_start(rig, &format!("{suffix}-{round}")).await?;
        starts.extend(leader);
        pg_starts.extend(pg);
    }
    let (leader_start_cpu_ms, postgres_start_cpu_ms) = (median(starts), median(pg_starts));
    // The three compared routes alike: each drained ROUNDS times, judged by medians, and in
    // turn, so that a VM slowing down or speeding up during the run weighs on all three alike.
    let (mut default_rounds, mut typed_rounds, mut gateway_rounds) = (vec![], vec![], vec![]);
    for round in 1..=ROUNDS {
        for (out, name, target) in [
            (&mut default_rounds, "default", Target::Default),
            (&mut typed_rounds, "typed", Target::Typed),
            (&mut gateway_rounds, "gateway", Target::Gateway),
        ] {
            let run = format!("route-{name}{suffix}-{round}");
            out.push(fresh_drain(rig, &run, n, target).await?);
        }
    }
    let (default, typed, gateway) = (
        medians(&default_rounds),
        medians(&typed_rounds),
        medians(&gateway_rounds),
    );
    let sparkplug = drain_and_stop(
        rig,
        &format!("route-sparkplug{suffix}"),
        n,
        Target::Sparkplug,
    )
    .await?;
    // The host's STATE stays retained at the broker after the drain: every later session that
    // subscribes `spBv1.0/#` (the per-message upsert's) would receive it.
    clear_retained(rig.mq.port, "spBv1.0/STATE/bench").await?;
    let (mut history, mut history_empty) = (Vec::new(), Vec::new());
    if history_rows > 0 {
        empty_telemetry(rig).await?;
        load_history(rig, history_rows).await?;
        // Full and empty alternate on one table, its history detached for the empty drains
        // and attached again (a catalog change each way), in the order full, empty, then
        // empty, full, and so on: a machine that speeds up or slows down over the minutes of
        // the phase weighs on both alike, where full-then-empty each round would favour the
        // empty drains on a machine getting faster.
        for round in 1..=HISTORY_ROUNDS {
            let empty_first = round % 2 == 0;
            if empty_first {
                history_empty.push(detached_drain(rig, suffix, round, n).await?);
            }
            let d = drain_and_stop(
                rig,
                &format!("route-history{suffix}-{round}"),
                n,
                Target::History,
            )
            .await?;
            history.push(Drain {
                history_rows: history_rows as i64,
                ..d
            });
            if !empty_first {
                history_empty.push(detached_drain(rig, suffix, round, n).await?);
            }
        }
        // After the judged drains: its leader start would warm the history for those after it.
        capture_plans(rig, &format!("plans{suffix}")).await?;
        // Gone, so that the phases after and the next run start from an empty table.
        history_partitions(rig, "DROP TABLE %I").await?;
        empty_telemetry(rig).await?;
    }
    Ok(Routes {
        default,
        default_rounds,
        typed,
        typed_rounds,
        gateway,
        gateway_rounds,
        sparkplug,
        history,
        history_empty,
        leader_start_cpu_ms,
        postgres_start_cpu_ms,
    })
}

/// Where [`capture_plans`] writes the plans.
pub const PLANS: &str = "target/bench/plans.txt";

/// The plan of every statement a leader runs against `telemetry` full of history, as it runs
/// them (`auto_explain`, with its buffers): a short drain with 100 enabled devices, so the alerts'
/// data age and device coverage run too. Written to [`PLANS`], once per statement text.
async fn capture_plans(rig: &Rig<'_>, run: &str) -> Result<()> {
    let settings = [
        ("session_preload_libraries", "'auto_explain'"),
        ("auto_explain.log_min_duration", "0"),
        ("auto_explain.log_analyze", "on"),
        ("auto_explain.log_buffers", "on"),
        ("auto_explain.log_timing", "off"),
        ("auto_explain.log_nested_statements", "on"),
    ];
    // Loaded here so ALTER SYSTEM knows its settings; ALTER SYSTEM cannot run in the
    // transaction of a multi-statement query: one at a time.
    rig.db.batch_execute("LOAD 'auto_explain'").await?;
    for (k, v) in settings {
        rig.db
            .batch_execute(&format!("ALTER SYSTEM SET {k} = {v}"))
            .await?;
    }
    rig.db.batch_execute("SELECT pg_reload_conf()").await?;
    rig.db
        .batch_execute(&format!(
            "INSERT INTO devices (device_id, topic)
             SELECT 'dev-' || lpad(i::text, 3, '0'), 'devices/dev-' || lpad(i::text, 3, '0') || '/telemetry'
             FROM generate_series(0, {}) i ON CONFLICT DO NOTHING",
            crate::mqtt::DEVICES - 1
        ))
        .await?;
    let from = rig.pg.log().len();
    let n = 2000;
    create_session(rig.mq.port, LEADER_SESSION).await?;
    publish(rig.mq.port, run, n, 0).await?;
    rig.apply_config(run, &format!("{DEFAULT}alert_check_interval = \"1s\"\n"))?;
    let mut node = rig.spawn_node_with(&format!("bench-leader-{run}"), &[])?;
    wait_written(&node, "default", n, run).await?;
    // Two rounds of the alerts' queries on the full table.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_node(&mut node).await?;
    drop_session(rig.mq.port, LEADER_SESSION).await?;
    // The batch statement's rare look-ups, which a drain without redeliveries or conflicts
    // never calls: each once, with values of a stored reading.
    rig.db
        .batch_execute(
            "SELECT leasehold_telemetry_floor(now(), 60000);
             SELECT leasehold_telemetry_copy('dev-001', 'devices/dev-001/telemetry',
                                             now() - interval '1 hour', now(), 'x', 1);
             SELECT * FROM leasehold_telemetry_row('dev-001', 'devices/dev-001/telemetry',
                 (SELECT max(ts) FROM telemetry WHERE device_id = 'dev-001'
                    AND topic = 'devices/dev-001/telemetry' AND ts < current_date - 100))",
        )
        .await?;
    for (k, _) in settings {
        rig.db
            .batch_execute(&format!("ALTER SYSTEM RESET {k}"))
            .await?;
    }
    rig.db
        .batch_execute("SELECT pg_reload_conf(); TRUNCATE devices")
        .await?;
    let log = rig.pg.log();
    let plans = plans_of(log.get(from..).unwrap_or_default());
    std::fs::create_dir_all("target/bench")?;
    std::fs::write(PLANS, plans.join("\n\n"))?;
    eprintln!(
        "bench: {} plans of statements on telemetry with history written to {PLANS}",
        plans.len()
    );
    Ok(())
}

/// `auto_explain`'s entries (a `plan:` line, then lines indented by a tab) whose query reads or
/// writes `telemetry`, the last of each query text.
fn plans_of(log: &str) -> Vec<String> {
    let mut entries: Vec<String> = Vec::new();
    for line in log.lines() {
        if line.contains("plan:") {
            entries.push(String::new());
        } else if let Some(e) = entries.last_mut().filter(|_| line.starts_with('\t')) {
            e.push_str(line.trim_start_matches('\t'));
            e.push('\n');
        }
    }
    let mut by_query: Vec<(String, String)> = Vec::new();
    for e in entries {
        // The query text runs over several lines: its start names it.
        let query: String = e.split_whitespace().take(60).collect::<Vec<_>>().join(" ");
        let on_telemetry = e.contains("FROM telemetry") || e.contains("INTO telemetry");
        if !on_telemetry || query.contains("pg_stat_statements") {
            continue;
        }
        by_query.retain(|(q, _)| *q != query);
        by_query.push((query, e));
    }
    by_query.into_iter().map(|(_, e)| e).collect()
}

/// Days the history spans, ending yesterday.
const HISTORY_DAYS: i64 = 230;

/// `rows` older readings of the drains' devices, one `INSERT ... SELECT` into the day partitions
/// they would have got as they arrived (the leader makes a day's partition ahead of it), then
/// vacuumed and analysed as autovacuum leaves an aged table. The drain's `CHECKPOINT` follows.
async fn load_history(rig: &Rig<'_>, rows: u64) -> Result<()> {
    let started = Instant::now();
    let days = HISTORY_DAYS;
    // What a run that failed midway may have left, detached or not.
    history_partitions(rig, "DROP TABLE IF EXISTS %I").await?;
    history_partitions(
        rig,
        "CREATE TABLE %I PARTITION OF telemetry FOR VALUES FROM (%L) TO (%L)",
    )
    .await?;
    // Each day's bounds as a CHECK too, so that attaching it again is a catalog change, not a
    // scan of its rows (see `attach_history`); added while the days are empty.
    history_partitions(rig, "ALTER TABLE %I ADD CHECK (ts >= %L AND ts < %L)").await?;
    rig.db
        .batch_execute(&format!(
            "SET TimeZone = 'UTC';
             INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by, lease_epoch)
             SELECT dev, 'devices/' || dev || '/telemetry', ts,
                    jsonb_build_object('device_id', dev, 'run', 'history', 'seq', i, 'ts', extract(epoch FROM ts)),
                    ts, 'history', 1
             FROM (SELECT i, 'dev-' || lpad((i % {devices})::text, 3, '0') AS dev,
                          current_date::timestamptz - (i * ({days} * 86400.0 / {rows})) * interval '1 second' AS ts
                   FROM generate_series(1, {rows}) i) s;
             RESET TimeZone;",
            devices = crate::mqtt::DEVICES,
        ))
        .await?;
    rig.db.batch_execute("VACUUM ANALYZE telemetry").await?;
    eprintln!(
        "bench: {rows} older readings over {days} days loaded into telemetry in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// How many times the history drain and the empty drain alternate: as many as the compared
/// routes' drains, for a median.
const HISTORY_ROUNDS: u32 = ROUNDS;

/// Drains of each compared route (default, typed, gateway) per run. On a shared machine one
/// drain's rate and CPU figures move by a fifth either way from one minute to the next; the median
/// of three holds still.
pub const ROUNDS: u32 = 3;

/// The median of `v` (of an even count, the mean of the middle two); `None` when empty.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n % 2 {
        1 => v.get(n / 2).copied(),
        _ => Some((v.get(n / 2)? + v.get(n / 2 - 1)?) / 2.0),
    }
}

/// A drain of `target` into emptied tables (`telemetry` empty and vacuumed, the typed route's
/// table gone).
async fn fresh_drain(rig: &Rig<'_>, run: &str, n: u64, target: Target) -> Result<Drain> {
    empty_telemetry(rig).await?;
    rig.db
        .batch_execute("DROP TABLE IF EXISTS bench_route")
        .await?;
    drain_and_stop(rig, run, n, target).await
}

/// The first of `rounds` with its rate and CPU figures replaced by their medians over all of them.
fn medians(rounds: &[Drain]) -> Drain {
    let of = |f: fn(&Drain) -> Option<f64>| median(rounds.iter().filter_map(f).collect());
    let first = rounds.first().cloned().unwrap_or_default();
    Drain {
        rate: of(|d| Some(d.rate)).unwrap_or(first.rate),
        leader_cpu_us: of(|d| d.leader_cpu_us),
        postgres_cpu_us: of(|d| d.postgres_cpu_us),
        broker_cpu_us: of(|d| d.broker_cpu_us),
        ..first
    }
}

/// The history's day partitions detached from `telemetry` (`attach = false`) or attached again,
/// and what the drain before wrote emptied: `TRUNCATE telemetry` empties every partition
/// attached, so it runs after the history is detached and before it is attached again.
async fn attach_history(rig: &Rig<'_>, attach: bool) -> Result<()> {
    if attach {
        rig.db.batch_execute("TRUNCATE telemetry").await?;
        history_partitions(
            rig,
            "ALTER TABLE telemetry ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)",
        )
        .await?;
    } else {
        history_partitions(rig, "ALTER TABLE telemetry DETACH PARTITION %I").await?;
        rig.db.batch_execute("TRUNCATE telemetry").await?;
    }
    rig.db.batch_execute("VACUUM ANALYZE telemetry").await?;
    Ok(())
}

/// A default drain of `n` with the history detached from `telemetry`, attached again after it.
async fn detached_drain(rig: &Rig<'_>, suffix: &str, round: u32, n: u64) -> Result<Drain> {
    attach_history(rig, false).await?;
    let d = drain_and_stop(
        rig,
        &format!("route-history-empty{suffix}-{round}"),
        n,
        Target::Default,
    )
    .await?;
    attach_history(rig, true).await?;
    Ok(d)
}

/// `sql` (a `format()` string: the day's table, its lower and its upper bound) run for each
/// day of the history, in UTC like the partitions.
async fn history_partitions(rig: &Rig<'_>, sql: &str) -> Result<()> {
    let days = HISTORY_DAYS;
    rig.db
        .batch_execute(&format!(
            "SET TimeZone = 'UTC';
             DO $$
             DECLARE d date;
             BEGIN
               FOR d IN SELECT generate_series(current_date - {days}, current_date - 1, interval '1 day')::date LOOP
                 EXECUTE format('{sql}',
                                'telemetry_p' || to_char(d, 'YYYYMMDD'), d::timestamptz, (d + 1)::timestamptz);
               END LOOP;
             END $$;
             RESET TimeZone;"
        ))
        .await?;
    Ok(())
}

/// `telemetry` emptied, and vacuumed (VACUUM cannot run in a multi-statement query's
/// transaction: alone).
async fn empty_telemetry(rig: &Rig<'_>) -> Result<()> {
    rig.db.batch_execute("TRUNCATE telemetry").await?;
    rig.db.batch_execute("VACUUM ANALYZE telemetry").await?;
    Ok(())
}

/// A leader started on an empty session: its CPU and PostgreSQL's from its spawn until it leads
/// and its deployment checks are done, milliseconds.
async fn idle_start(rig: &Rig<'_>, suffix: &str) -> Result<(Option<f64>, Option<f64>)> {
    create_session(rig.mq.port, LEADER_SESSION).await?;
    // As before a drain, so that the background writes PostgreSQL does meanwhile are alike.
    rig.db.batch_execute("CHECKPOINT").await?;
    let pg_before = postgres_cpu_seconds(&rig.pg.data_dir());
    let mut node = rig.spawn_node_with(&format!("bench-leader-idle{suffix}"), &[])?;
    crate::rig::wait_leading(&node).await?;
    wait_checks_done(&node).await?;
    let cpu = cpu_seconds(node.pid(), false).map(|s| s * 1e3);
    let pg = postgres_cpu_seconds(&rig.pg.data_dir())
        .zip(pg_before)
        .map(|(a, b)| (a - b) * 1e3);
    stop_node(&mut node).await?;
    drop_session(rig.mq.port, LEADER_SESSION).await?;
    let ms = |v: Option<f64>| v.map_or("?".into(), |c| format!("{c:.0}"));
    eprintln!(
        "bench: a leader's start without messages: {} ms CPU, PostgreSQL {} ms",
        ms(cpu),
        ms(pg)
    );
    Ok((cpu, pg))
}

/// Until the node's deployment checks are done, asked at the drains' cadence: each `/health`
/// runs a database probe, and what the harness's polls cost the leader and PostgreSQL during an
/// idle start is subtracted from every drain, so once it leads they are no more frequent than
/// during a drain (until it leads, [`crate::rig::wait_leading`] polls as often in both).
async fn wait_checks_done(node: &NodeProc) -> Result<()> {
    let what = "the deployment checks to finish";
    eventually_every(DRAIN_TIMEOUT, POLL, what, || async {
        let (_, body) = http(node.http_port(), "GET", "/health").await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["checks_status"] != "pending")
    })
    .await?;
    Ok(())
}

/// How often the harness asks a leader how far it got.
const POLL: Duration = Duration::from_millis(250);

/// [`drain`], then the leader stopped and its session deleted.
pub async fn drain_and_stop(rig: &Rig<'_>, run: &str, n: u64, target: Target) -> Result<Drain> {
    let (d, mut node) = drain(rig, run, n, target).await?;
    stop_node(&mut node).await?;
    drop_session(rig.mq.port, LEADER_SESSION).await?;
    Ok(d)
}
