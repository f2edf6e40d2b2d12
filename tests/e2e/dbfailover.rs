//! The database fails over too: Leasehold on a replicated PostgreSQL run by a real failover
//! manager (pg_auto_failover: a monitor and two nodes on loopback), with numbered QoS 1
//! messages at a steady rate through each fault, checked against the new primary: every message
//! stored once, nothing committed under a stale epoch.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use leasehold_testkit::cluster::{self, check};
use leasehold_testkit::eventually;
use leasehold_testkit::pgaf::Pgaf;
use leasehold_testkit::publish::Stream;

use crate::helpers::BIN;

type Cluster = cluster::Cluster<Pgaf>;

/// Rows of `run` stored so far (on the current primary).
async fn rows_of(c: &Cluster, run: &str) -> Result<i64> {
    c.count(&format!(
        "SELECT count(*) FROM telemetry WHERE payload->>'run' = '{run}'"
    ))
    .await
}

/// Two nodes leading and streaming `run`; returns once the leader has written some of it.
async fn streaming(c: &mut Cluster, run: &str) -> Result<Stream> {
    c.spawn("node-a")?;
    c.spawn("node-b")?;
    let (leader, _) = c.wait_leader().await?;
    let stream = Stream::start(c.mq.port, run, 5, 200);
    c.wait_written(&leader, 50, Duration::from_secs(15)).await?;
    Ok(stream)
}

/// Waits until `run` has more rows than `before`: a leader writing again (on the new primary).
async fn writing_again(c: &Cluster, run: &str, before: i64) -> Result<Duration> {
    eventually(
        Duration::from_secs(60),
        "a leader writing again after the database failover",
        || async { Ok(rows_of(c, run).await? > before) },
    )
    .await
}

/// Every message once, nothing under a stale epoch, on the database as it is now.
async fn exactly_once_no_stale(c: &Cluster, run: &str, stream: Stream) -> Result<()> {
    let n = stream.stop().await?;
    c.assert_exactly_once(run, n).await?;
    let stale = c.stale_epoch_rows().await?;
    ensure!(stale == 0, "{stale} rows committed under a stale epoch");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_host_lost_the_standby_is_promoted_and_nothing_is_lost() {
    let mut c = Cluster::start_replicated(BIN).await.expect("servers");
    let res = async {
        let stream = streaming(&mut c, "db-primary-lost").await?;
        let before = rows_of(&c, "db-primary-lost").await?;
        let killed = Instant::now();
        let old = c.pg.kill_primary_host().await?;
        let took = writing_again(&c, "db-primary-lost", before).await?;
        let took = took.max(killed.elapsed().saturating_sub(Duration::from_millis(50)));
        let new = c.pg.primary().await?;
        ensure!(new != old, "the primary did not change: {old}");
        println!("database primary host lost: a leader writing again after {took:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        exactly_once_no_stale(&c, "db-primary-lost", stream).await
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_loses_nothing() {
    let mut c = Cluster::start_replicated(BIN).await.expect("servers");
    let res = async {
        let stream = streaming(&mut c, "db-switchover").await?;
        let old = c.pg.primary().await?;
        let started = Instant::now();
        c.pg.perform_switchover().await?;
        let before = rows_of(&c, "db-switchover").await?;
        writing_again(&c, "db-switchover", before).await?;
        println!(
            "database switchover: a leader writing again {:?} after it began",
            started.elapsed()
        );
        let new = c.pg.primary().await?;
        ensure!(new != old, "the primary did not change: {old}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        exactly_once_no_stale(&c, "db-switchover", stream).await
    }
    .await;
    check(&c, res);
}
