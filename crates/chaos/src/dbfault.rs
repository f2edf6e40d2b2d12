//! The database's own failover as trials: a replicated PostgreSQL run by pg_auto_failover
//! (testkit's `Pgaf`: a monitor and two nodes on loopback) under two `leasehold` nodes, the
//! primary's host lost or a planned switchover, with the same counts as every other row: lost,
//! duplicated, committed under a stale epoch, and the failover time — from the fault to the
//! first row of the run stored after the manager named a new primary.
//!
//! The pair is its own environment (the matrix's proxies and single server have no part in it),
//! started once for these rows and healed between trials: a lost node's keeper is started again
//! and rejoins as the standby.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::Utc;
use leasehold_testkit::cluster::Cluster;
use leasehold_testkit::eventually;
use leasehold_testkit::pgaf::Pgaf;
use leasehold_testkit::publish::Tracked;

use crate::fault::Fault;
use crate::problem::Problem;
use crate::trial::Trial;
use crate::{ms, sleep, Options, POLL, TTL};

pub(crate) struct DbEnv {
    cluster: Cluster<Pgaf>,
}

impl DbEnv {
    pub(crate) async fn new(opts: &Options) -> Result<DbEnv> {
        let mut cluster = Cluster::start_replicated(&opts.bin).await?;
        // The matrix's lease timings (later settings win).
        cluster.settings.extend([
            ("LEASE_TTL", format!("{}ms", TTL.as_millis())),
            ("LEASE_POLL_INTERVAL", format!("{}ms", POLL.as_millis())),
        ]);
        cluster.spawn("node-a")?;
        cluster.spawn("node-b")?;
        Ok(DbEnv { cluster })
    }

    /// Every database node running and paired, and a leader on the broker.
    async fn heal(&mut self) -> Result<(String, i64)> {
        let stopped: Vec<String> = self
            .cluster
            .pg
            .nodes
            .iter()
            .filter(|n| !n.is_running())
            .map(|n| n.name.clone())
            .collect();
        for n in stopped {
            self.cluster.pg.start_node(&n)?;
        }
        self.cluster.pg.wait_pair(Duration::from_secs(120)).await?;
        self.cluster.wait_leader().await
    }

    async fn rows_of(&self, run: &str) -> Result<i64> {
        self.cluster
            .count(&format!(
                "SELECT count(*) FROM telemetry WHERE payload->>'run' = '{run}'"
            ))
            .await
    }
}

/// One trial of a database fault on a healed pair.
pub(crate) async fn trial(
    env: &mut DbEnv,
    opts: &Options,
    fault: Fault,
    idx: usize,
) -> Result<Trial> {
    let (_, epoch) = env.heal().await?;
    let name = format!("{:?}-{idx}-{}", fault, Utc::now().timestamp_millis()).to_lowercase();
    let stale_before = env.cluster.stale_epoch_rows().await?;
    let publisher = Tracked::start(env.cluster.mq.port, &name, 20, opts.rate);
    eventually(
        Duration::from_secs(15),
        "the leader writing the run",
        || async { Ok(env.rows_of(&name).await? > 20) },
    )
    .await?;
    let old = env.cluster.pg.primary().await?;
    let started = Instant::now();
    let switchover = match fault {
        Fault::DbPrimaryLost => {
            env.cluster.pg.kill_host(&old).await?;
            None
        }
        _ => {
            // The switchover command returns once done; the clock runs from its start.
            let pg = &env.cluster.pg;
            Some(pg.perform_switchover())
        }
    };
    let measured = new_primary_writing(env, &old, &name);
    let (measured, switched) = match switchover {
        Some(s) => {
            let (m, s) = tokio::join!(measured, s);
            (m, s)
        }
        None => (measured.await, Ok(())),
    };
    switched?;
    let took = measured.map(|_| started.elapsed()).context("failover")?;
    sleep(Duration::from_millis(800)).await;
    let report = publisher.stop().await?;
    let acked = report.acked;
    let _ = eventually(
        Duration::from_secs(20),
        "every acknowledged message stored",
        || async {
            let stored = env.cluster.seq_counts(&name).await?;
            Ok(acked.iter().all(|s| stored.contains_key(s)))
        },
    )
    .await;
    let stored = env.cluster.seq_counts(&name).await?;
    let lost = acked.iter().filter(|s| !stored.contains_key(s)).count() as u64;
    let duplicates: u64 = stored.values().map(|c| (*c - 1).max(0) as u64).sum();
    let stale = (env.cluster.stale_epoch_rows().await? - stale_before).max(0) as u64;
    let mut problems = Vec::new();
    if lost > 0 {
        problems.push(Problem::Lost(lost));
    }
    if duplicates > 0 {
        problems.push(Problem::Duplicates(duplicates));
    }
    if stale > 0 {
        problems.push(Problem::StaleEpochRows(stale));
    }
    if let Some(bound) = fault.bound().filter(|b| took > *b) {
        problems.push(Problem::OverBound { took, bound });
    }
    let epoch_now = env.cluster.leader().await?.map(|(_, e)| e).unwrap_or(epoch);
    Ok(Trial {
        fault,
        trial: idx,
        failover_ms: Some(ms(took)),
        published: report.published,
        acked: acked.len() as u64,
        lost,
        duplicates,
        stale_epoch_rows: stale,
        // Leadership changes the fault explains: the lease is lost while the database is away.
        flaps: (epoch_now - epoch)
            .saturating_sub(fault.max_changes() as i64)
            .max(0) as u64,
        takeovers: 0,
        problems,
    })
}

/// Until a primary other than `old` is named and run `name` has gained rows on it since.
async fn new_primary_writing(env: &DbEnv, old: &str, name: &str) -> Result<Duration> {
    let rows_at_change = std::sync::Mutex::new(None);
    eventually(
        Duration::from_secs(90),
        "a leader writing on the new primary",
        || async {
            let Ok(primary) = env.cluster.pg.primary().await else {
                return Ok(false);
            };
            if primary == old {
                return Ok(false);
            }
            let rows = env.rows_of(name).await?;
            let mut at_change = rows_at_change
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?;
            Ok(match *at_change {
                None => {
                    *at_change = Some(rows);
                    false
                }
                Some(r) => rows > r,
            })
        },
    )
    .await
}
