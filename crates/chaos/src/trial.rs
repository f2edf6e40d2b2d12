//! One trial as steps: start (heal, publish numbered messages, wait for them to be written),
//! inject the fault (`inject`), finish (keep publishing a moment after the repair, then count
//! from the database what was lost, stored twice or stale), and judge.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use leasehold_testkit::eventually;
use leasehold_testkit::publish::Tracked;
use serde::Serialize;

use crate::env::Env;
use crate::fault::Fault;
use crate::inject::inject;
use crate::probes::first_some;
use crate::problem::Problem;
use crate::watch::LeaseWatch;
use crate::{ms, sleep, Options};

/// One trial's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub fault: Fault,
    pub trial: usize,
    pub failover_ms: Option<f64>,
    pub published: u64,
    pub acked: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub stale_epoch_rows: u64,
    pub flaps: u64,
    pub takeovers: u64,
    pub problems: Vec<Problem>,
}

impl Trial {
    /// The record of a trial the environment failed under: nothing measured.
    pub(crate) fn could_not_run(fault: Fault, trial: usize, problem: Problem) -> Trial {
        Trial {
            fault,
            trial,
            failover_ms: None,
            published: 0,
            acked: 0,
            lost: 0,
            duplicates: 0,
            stale_epoch_rows: 0,
            flaps: 0,
            takeovers: 0,
            problems: vec![problem],
        }
    }
}

/// Runs one trial of `fault` on a healed environment.
pub(crate) async fn trial(
    env: &mut Env,
    opts: &Options,
    fault: Fault,
    idx: usize,
) -> Result<Trial> {
    let run = Run::start(env, opts, fault, idx).await?;
    let injected = inject(env, &run).await?;
    let mut problems = injected.problems;
    let counts = run.finish(env).await?;
    problems.extend(counts.problems(fault, injected.measured));
    Ok(Trial {
        fault,
        trial: idx,
        failover_ms: injected.measured.map(ms),
        published: counts.published,
        acked: counts.acked,
        lost: counts.lost,
        duplicates: counts.duplicates,
        stale_epoch_rows: counts.stale,
        flaps: counts.flaps,
        takeovers: counts.takeovers,
        problems,
    })
}

/// A trial under way: its messages, the lease it started under, and the counts before it that
/// its own are taken against.
pub(crate) struct Run {
    pub fault: Fault,
    /// Names the trial's messages (`payload->>'run'`).
    pub name: String,
    pub leader: String,
    pub epoch: i64,
    /// When the fault was injected.
    pub fault_at: DateTime<Utc>,
    pub publisher: Tracked,
    stale_before: u64,
    takeovers_before: u64,
    watch: LeaseWatch,
}

/// What the database and the broker show of a finished run.
struct Counts {
    published: u64,
    acked: u64,
    lost: u64,
    duplicates: u64,
    stale: u64,
    flaps: u64,
    changes: Vec<(String, i64)>,
    takeovers: u64,
}

impl Run {
    /// Heals, starts the publisher and the lease watch, and returns once the leader writes.
    async fn start(env: &mut Env, opts: &Options, fault: Fault, idx: usize) -> Result<Run> {
        let (leader, epoch) = env.heal().await?;
        let name = format!("{:?}-{idx}-{}", fault, Utc::now().timestamp_millis()).to_lowercase();
        let rate = if matches!(fault, Fault::StepDown | Fault::Sigterm) {
            opts.full_rate
        } else {
            opts.rate
        };
        let stale_before = env.stale_epoch_rows().await?;
        let takeovers_before = env.takeovers();
        let watch = LeaseWatch::start(env.cluster.pg.url());
        let publisher = Tracked::start(env.cluster.mq.port, &name, 20, rate);
        eventually(
            Duration::from_secs(10),
            "the leader writing the run",
            || async { Ok(env.rows_of(&name).await? > 20) },
        )
        .await?;
        Ok(Run {
            fault,
            name,
            leader,
            epoch,
            fault_at: Utc::now(),
            publisher,
            stale_before,
            takeovers_before,
            watch,
        })
    }

    /// Keeps publishing a moment after the repair, then counts.
    async fn finish(self, env: &mut Env) -> Result<Counts> {
        sleep(Duration::from_millis(800)).await;
        let report = self.publisher.stop().await?;
        // Everything acknowledged by the broker must arrive (healing first if a node is down).
        if matches!(self.fault, Fault::Kill9 | Fault::Sigterm) {
            env.heal().await?;
        }
        let acked = report.acked;
        let stored = wait_stored(env, &self.name, &acked).await?;
        let lost = acked.iter().filter(|s| !stored.contains_key(s)).count() as u64;
        let duplicates = stored.values().map(|c| (*c - 1).max(0) as u64).sum();
        let stale = env
            .stale_epoch_rows()
            .await?
            .saturating_sub(self.stale_before);
        let changes = self.watch.stop();
        let flaps = changes.len().saturating_sub(self.fault.max_changes()) as u64;
        Ok(Counts {
            published: report.published,
            acked: acked.len() as u64,
            lost,
            duplicates,
            stale,
            flaps,
            changes,
            takeovers: env.takeovers().saturating_sub(self.takeovers_before),
        })
    }
}

/// The stored sequence numbers of `run` once every acknowledged one is there, or as they are
/// after 20 s.
async fn wait_stored(env: &Env, run: &str, acked: &BTreeSet<u64>) -> Result<BTreeMap<u64, i64>> {
    let complete = first_some(Duration::from_secs(20), move || async move {
        let stored = env.stored_seqs(run).await?;
        Ok(acked
            .iter()
            .all(|s| stored.contains_key(s))
            .then_some(stored))
    })
    .await;
    match complete {
        Some(s) => Ok(s),
        None => env.stored_seqs(run).await,
    }
}

impl Counts {
    /// The guarantees and the fault's bound, judged.
    fn problems(&self, fault: Fault, measured: Option<Duration>) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.lost > 0 && !fault.loss_is_broker_limit() {
            problems.push(Problem::Lost(self.lost));
        }
        if self.duplicates > 0 {
            problems.push(Problem::Duplicates(self.duplicates));
        }
        if self.stale > 0 {
            problems.push(Problem::StaleEpochRows(self.stale));
        }
        if self.flaps > 0 {
            problems.push(Problem::Flaps {
                flaps: self.flaps,
                changes: self.changes.clone(),
            });
        }
        if self.takeovers > 1 {
            problems.push(Problem::Fight(self.takeovers));
        }
        if let Some(bound) = fault.bound() {
            match measured {
                Some(took) if took > bound => problems.push(Problem::OverBound { took, bound }),
                None => problems.push(Problem::NoTakeover),
                _ => {}
            }
        }
        problems
    }
}
