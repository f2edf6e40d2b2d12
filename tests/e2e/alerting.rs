//! Who evaluates alerts, and what a flood of `POST /health/alerts/check` may cost (docs/interfaces.md, "Alerts"):
//! observers never evaluate or write alerts; checks are rate-limited; evaluation has its own
//! database connection, so neither a flood nor a blocked evaluation delays heartbeats.

use std::time::{Duration, Instant};

use crate::helpers::{check, Cluster};
use anyhow::{ensure, Context, Result};
use leasehold_testkit::{eventually, http, http_full};
use serde_json::Value;

/// `POST /health/alerts/check`: (status, Retry-After, body).
async fn post_check(port: u16) -> Result<(u16, Option<u64>, String)> {
    let (status, headers, body) = http_full(
        port,
        "POST",
        "/health/alerts/check",
        Duration::from_secs(15),
    )
    .await?;
    let retry_after = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    Ok((status, retry_after, body))
}

async fn alert_writers(c: &Cluster) -> Result<Vec<String>> {
    let db = c.pg.client().await?;
    Ok(db
        .query(
            "SELECT DISTINCT w FROM alerts, LATERAL (VALUES (opened_by), (resolved_by)) v(w)
             WHERE w IS NOT NULL ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Seconds `name` has been heartbeating: last_seen - started_at, on the database clock.
async fn beating_for(c: &Cluster, name: &str) -> Result<f64> {
    let db = c.pg.client().await?;
    let row = db
        .query_opt(
            "SELECT extract(epoch from (last_seen - started_at))::float8 FROM cluster_nodes
             WHERE instance_id = $1 ORDER BY last_seen DESC LIMIT 1",
            &[&name],
        )
        .await?;
    Ok(row.map(|r| r.get(0)).unwrap_or(-1.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_never_evaluates_or_writes_alerts() {
    let mut c = Cluster::start().await.expect("servers");
    // Thresholds that make "no data ever stored" an alert after a second.
    c.extra_env = vec![
        ("STALE_WARNING", "1s".into()),
        ("STALE_CRITICAL", "2s".into()),
        ("ALERT_CHECK_INTERVAL", "200ms".into()),
        ("ALERT_GRACE", "1s".into()),
    ];
    let res = async {
        c.spawn_with("laptop", &[("MQTT_MODE", "development".into())])?;
        // Up for 3 s: 15 timer ticks past the threshold, where an evaluating node opens data_stale.
        eventually(
            Duration::from_secs(30),
            "the observer up for 3 s",
            || async { Ok(beating_for(&c, "laptop").await? >= 3.0) },
        )
        .await?;
        ensure!(
            c.count("SELECT count(*) FROM alerts").await? == 0,
            "the observer wrote alerts: {:?}",
            alert_writers(&c).await?
        );
        let port = c.node("laptop").http_port();
        let (code, _, body) = post_check(port).await?;
        ensure!(code == 409, "an observer's check answers 409: {code} {body}");
        let v: Value = serde_json::from_str(&body)?;
        ensure!(v["evaluates"] == false, "{body}");
        ensure!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("observer") && e.contains("does not evaluate")),
            "{body}"
        );
        let (code, body) = http(port, "GET", "/health/alerts").await?;
        ensure!(code == 200, "an observer still shows alerts: {code} {body}");

        // The condition was real: a production node with the same settings raises it.
        c.spawn("node-a")?;
        eventually(
            Duration::from_secs(30),
            "data_stale opened by node-a",
            || async {
                c.count("SELECT count(*) FROM alerts WHERE kind = 'data_stale' AND opened_by = 'node-a'")
                    .await
                    .map(|n| n == 1)
            },
        )
        .await?;
        let (code, _, _) = post_check(port).await?;
        ensure!(code == 409, "{code}");
        let writers = alert_writers(&c).await?;
        ensure!(
            writers == ["node-a"],
            "only the production node writes alerts: {writers:?}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_checks_are_rate_limited() {
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env = vec![("ALERT_CHECK_INTERVAL", "1h".into())];
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        let port = c.node("node-a").http_port();

        // A flood: 32 clients posting checks back to back for 3 s.
        let started = Instant::now();
        let flood = Duration::from_secs(3);
        let clients: Vec<_> = (0..32)
            .map(|_| {
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    while started.elapsed() < flood {
                        answers.push(post_check(port).await);
                    }
                    answers
                })
            })
            .collect();
        let mut answers = Vec::new();
        for client in clients {
            answers.extend(client.await?);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let mut evaluations = std::collections::BTreeSet::new();
        let (mut ok, mut limited) = (0, 0);
        for a in answers {
            let (code, retry_after, body) = a?;
            match code {
                200 => {
                    ok += 1;
                    let v: Value = serde_json::from_str(&body)?;
                    evaluations.insert(
                        v["evaluated_at"]
                            .as_str()
                            .context("evaluated_at")?
                            .to_string(),
                    );
                }
                429 => {
                    limited += 1;
                    ensure!(
                        retry_after.is_some_and(|s| s >= 1),
                        "429 without Retry-After: {body}"
                    );
                }
                other => anyhow::bail!("a check answered {other}: {body}"),
            }
        }
        ensure!(
            ok + limited >= 64,
            "the flood was real: {ok} answered, {limited} limited"
        );
        ensure!(
            evaluations.len() as f64 <= elapsed.ceil() + 1.0,
            "{} evaluations in {elapsed:.1}s for {ok} answers: at most one per second",
            evaluations.len()
        );

        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_alert_evaluation_never_delays_heartbeats() {
    let mut c = Cluster::start().await.expect("servers");
    // One shared connection: on it, an evaluation that holds the connection starves heartbeats.
    c.extra_env = vec![
        ("DATABASE_POOL_SIZE", "1".into()),
        ("ALERT_CHECK_INTERVAL", "1h".into()),
    ];
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        let port = c.node("node-a").http_port();

        // An evaluation blocked on the alerts table holds its connection for as long as the
        // lock is held: heartbeats must go on.
        let locker = c.pg.client().await?;
        locker
            .batch_execute("BEGIN; LOCK TABLE alerts IN ACCESS EXCLUSIVE MODE")
            .await?;
        let db = c.pg.client().await?;
        let blocked = || async {
            Ok::<_, anyhow::Error>(
                db.query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE wait_event_type = 'Lock' AND query ILIKE '%alerts%'
                       AND application_name LIKE 'leasehold%'",
                    &[],
                )
                .await?
                .get::<_, i64>(0)
                    > 0,
            )
        };
        eventually(
            Duration::from_secs(15),
            "an evaluation waiting on the locked alerts table",
            || async {
                tokio::spawn(post_check(port));
                blocked().await
            },
        )
        .await?;
        let from = beating_for(&c, "node-a").await?;
        eventually(
            Duration::from_secs(15),
            "two heartbeats while the evaluation is blocked",
            || async { Ok(beating_for(&c, "node-a").await? >= from + 3.5) },
        )
        .await?;
        ensure!(blocked().await?, "the evaluation was blocked throughout");
        // Meanwhile a check gets its answer at once.
        let asked = Instant::now();
        let (code, retry_after, body) = post_check(port).await?;
        ensure!(
            code == 429 && retry_after.is_some() && asked.elapsed() < Duration::from_secs(2),
            "a check during a running evaluation: {code} {retry_after:?} {body} after {:?}",
            asked.elapsed()
        );
        let (code, body) = http(port, "GET", "/health").await?;
        ensure!(
            code == 200,
            "/health during a blocked evaluation: {code} {body}"
        );
        locker.batch_execute("ROLLBACK").await?;

        // Released: checks evaluate again.
        eventually(Duration::from_secs(20), "a fresh evaluation", || async {
            let (code, _, body) = post_check(port).await?;
            Ok(code == 200 && serde_json::from_str::<Value>(&body)?["fresh"] == true)
        })
        .await?;
        Ok(())
    }
    .await;
    check(&c, res);
}
