//! The failover tests again with a route: the leader killed, paused past its lease, and asked to
//! step down, while numbered readings stream into a table the operator owns. Every message must
//! be in the route's table exactly once, and a leader that lost its lease must not commit one row
//! into it.

use std::time::{Duration, Instant};

use crate::helpers::{check, Cluster, POLL, TTL};
use anyhow::{ensure, Context, Result};
use leasehold_testkit::publish::Stream;
use leasehold_testkit::{eventually, http};

/// The operator's table: values from the topic, the JSON, the reading's timestamp, and the
/// writer's identity, so that a stale epoch can be seen.
const TABLE: &str = "CREATE TABLE plant.readings (
    device  text        NOT NULL,
    ts      timestamptz NOT NULL,
    run     text        NOT NULL,
    seq     bigint      NOT NULL,
    epoch   bigint      NOT NULL,
    writer  text        NOT NULL,
    PRIMARY KEY (device, ts))";

fn route(on_conflict: &str) -> String {
    format!(
        r#"[[routes]]
name = "plant"
topics = ["devices/+/telemetry"]
table = "plant.readings"
key = ["device", "ts"]
on_conflict = "{on_conflict}"

[routes.columns]
device = "topic[1]"
ts = "timestamp"
run = "$.run"
seq = "$.seq"
epoch = "lease_epoch"
writer = "written_by"
"#
    )
}

/// Two nodes configured with the route (`on_conflict`), its table created first; the leader.
async fn start(on_conflict: &str) -> Result<(Cluster, String, i64)> {
    let mut c = Cluster::start().await?;
    c.pg.client()
        .await?
        .batch_execute(&format!("CREATE SCHEMA plant; {TABLE}"))
        .await?;
    let file = c.logs.path().join("routes.toml");
    std::fs::write(&file, route(on_conflict))?;
    c.extra_env
        .push(("LEASEHOLD_CONFIG", file.display().to_string()));
    c.spawn("node-a")?;
    c.spawn("node-b")?;
    let (leader, epoch) = c.wait_leader().await?;
    Ok((c, leader, epoch))
}

/// The route table's rows of run `$1` by seq, and its rows written by node `$1`.
const SEQ_COUNTS: &str = "SELECT seq, count(*) FROM plant.readings WHERE run = $1 GROUP BY seq";
const WRITTEN_BY: &str = "SELECT count(*) FROM plant.readings WHERE writer = $1";

/// Every seq of 0..n in the route's table once, nothing of the run in `telemetry`, and no dead
/// letter.
async fn exactly_once_in_route(c: &Cluster, run: &str, n: u64) -> Result<()> {
    c.assert_exactly_once_in(SEQ_COUNTS, run, n).await?;
    let elsewhere = c
        .count(&format!(
            "SELECT count(*) FROM telemetry WHERE payload->>'run' = '{run}'"
        ))
        .await?;
    ensure!(
        elsewhere == 0,
        "{elsewhere} messages of the route went to telemetry"
    );
    let dead = c.count("SELECT count(*) FROM dead_letters").await?;
    ensure!(dead == 0, "{dead} dead letters");
    Ok(())
}

/// Waits until `node` has written more than `rows` rows into the route's table.
async fn wait_route_written(c: &Cluster, node: &str, rows: i64, within: Duration) -> Result<()> {
    c.wait_written_in(WRITTEN_BY, node, rows, within).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_through_kill_9_of_the_leader_loses_nothing_and_stores_nothing_twice() {
    let (mut c, leader, _) = start("nothing").await.expect("cluster");
    let res = async {
        let standby = c.other_than(&leader);
        let stream = Stream::start(c.mq.port, "route-kill9", 5, 200);
        wait_route_written(&c, &leader, 50, Duration::from_secs(10)).await?;
        let killed = Instant::now();
        c.node_mut(&leader).kill9();
        wait_route_written(&c, &standby, 0, Duration::from_secs(15)).await?;
        let took = killed.elapsed();
        println!("kill -9 failover with a route: standby writing after {took:?}");
        ensure!(
            took < TTL + POLL + Duration::from_secs(2),
            "failover took {took:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = stream.stop().await?;
        exactly_once_in_route(&c, "route-kill9", n).await
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_through_a_paused_leader_gets_no_row_under_the_stale_epoch() {
    let (c, leader, old_epoch) = start("update").await.expect("cluster");
    let res = async {
        let standby = c.other_than(&leader);
        let stream = Stream::start(c.mq.port, "route-sigstop", 5, 200);
        wait_route_written(&c, &leader, 50, Duration::from_secs(10)).await?;
        c.node(&leader).signal(libc::SIGSTOP);
        wait_route_written(&c, &standby, 0, Duration::from_secs(15)).await?;
        let stale = format!("SELECT count(*) FROM plant.readings WHERE epoch = {old_epoch}");
        let before = c.count(&stale).await?;
        // Resume the old leader well past its TTL; it must see itself as a standby and commit
        // nothing more under its old epoch (with "update", the new leader may rewrite some of
        // its rows on redelivery, so the count may fall; it must never rise).
        c.node(&leader).signal(libc::SIGCONT);
        let port = c.node(&leader).http_port();
        eventually(
            Duration::from_secs(10),
            "the resumed node to see itself as standby",
            || async {
                let (_, body) = http(port, "GET", "/health/lease").await?;
                Ok(body.contains("\"role\":\"standby\""))
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let n = stream.stop().await?;
        exactly_once_in_route(&c, "route-sigstop", n).await?;
        let after = c.count(&stale).await?;
        ensure!(
            after <= before,
            "the paused leader committed {} rows into the route after the takeover",
            after - before
        );
        let (now, epoch) = c.leader().await?.context("a leader")?;
        ensure!(
            now == standby && epoch > old_epoch,
            "leadership went back: {now} epoch {epoch}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_through_step_down_loses_nothing() {
    let (c, leader, epoch) = start("nothing").await.expect("cluster");
    let res = async {
        let stream = Stream::start(c.mq.port, "route-step-down", 5, 200);
        wait_route_written(&c, &leader, 20, Duration::from_secs(10)).await?;
        let out = c.cli(&["step-down"])?;
        ensure!(
            out.status.success(),
            "step-down failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let (now, new_epoch) = c.leader().await?.context("a leader")?;
        ensure!(
            now != leader && new_epoch == epoch + 1,
            "{now} epoch {new_epoch}"
        );
        wait_route_written(&c, &now, 0, Duration::from_secs(10)).await?;
        let n = stream.stop().await?;
        exactly_once_in_route(&c, "route-step-down", n).await
    }
    .await;
    check(&c, res);
}
