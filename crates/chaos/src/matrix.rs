//! The matrix: every fault's trials on one environment, within the budget shared evenly between
//! faults; a trial the environment failed under is recorded and the environment started afresh.

use std::time::Instant;

use anyhow::Result;
use chrono::Utc;

use crate::dbfault::{self, DbEnv};
use crate::env::Env;
use crate::fault::Fault;
use crate::problem::Problem;
use crate::report::{aggregate, Report};
use crate::trial::{trial, Trial};
use crate::{ms, Options, POLL, TTL};

/// Runs the matrix; trials that would start after the budget are skipped.
pub async fn run_matrix(opts: &Options) -> Result<Report> {
    let started_at = Utc::now();
    let start = Instant::now();
    let mut env = Env::new(&opts.bin).await?;
    let per_fault = opts.budget.div_f64(opts.faults.len().max(1) as f64);
    let mut all = Vec::new();
    let mut rows = Vec::new();
    let mut db_env: Option<DbEnv> = None;
    for &fault in &opts.faults {
        let fault_start = Instant::now();
        let mut trials = Vec::new();
        for i in 1..=opts.trials {
            if i > 1 && fault_start.elapsed() > per_fault {
                eprintln!(
                    "chaos: {}: budget reached after {} trials",
                    fault.name(),
                    i - 1
                );
                break;
            }
            let t = if fault.is_database_failover() {
                db_trial(&mut db_env, opts, fault, i).await?
            } else {
                trial_or_restart(&mut env, opts, fault, i).await?
            };
            log_trial(&t);
            trials.push(t);
        }
        rows.push(aggregate(fault, &trials));
        all.extend(trials);
    }
    Ok(Report {
        started_at,
        seconds: start.elapsed().as_secs_f64(),
        lease_ttl_ms: ms(TTL),
        poll_interval_ms: ms(POLL),
        rate: opts.rate,
        full_rate: opts.full_rate,
        rows,
        trials: all,
    })
}

/// Runs trial `i` of `fault`; if it could not run, the environment may be wrecked: the trial is
/// recorded as such and the environment started afresh.
async fn trial_or_restart(env: &mut Env, opts: &Options, fault: Fault, i: usize) -> Result<Trial> {
    match trial(env, opts, fault, i).await {
        Ok(t) => Ok(t),
        Err(e) => {
            let problem = Problem::CouldNotRun(format!("{e:#}"));
            eprintln!(
                "chaos: {}: {problem}; logs in {}",
                fault.name(),
                env.logs().display()
            );
            *env = Env::new(&opts.bin).await?;
            Ok(Trial::could_not_run(fault, i, problem))
        }
    }
}

/// A database failover trial on the replicated pair, started on first use; a trial it failed
/// under is recorded and the pair started afresh.
async fn db_trial(
    env: &mut Option<DbEnv>,
    opts: &Options,
    fault: Fault,
    i: usize,
) -> Result<Trial> {
    let e = match env {
        Some(e) => e,
        None => env.insert(DbEnv::new(opts).await?),
    };
    match dbfault::trial(e, opts, fault, i).await {
        Ok(t) => Ok(t),
        Err(err) => {
            let problem = Problem::CouldNotRun(format!("{err:#}"));
            eprintln!("chaos: {}: {problem}", fault.name());
            *env = None;
            Ok(Trial::could_not_run(fault, i, problem))
        }
    }
}

/// One trial's line on stderr, as it finishes.
fn log_trial(t: &Trial) {
    let problems = if t.problems.is_empty() {
        String::new()
    } else {
        let p: Vec<String> = t.problems.iter().map(ToString::to_string).collect();
        format!("  PROBLEMS: {p:?}")
    };
    eprintln!(
        "chaos: {:<33} trial {}: {} ms, {} acked, lost {}, dups {}, stale {}, flaps {}, takeovers {}{}",
        t.fault.name(),
        t.trial,
        t.failover_ms.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into()),
        t.acked,
        t.lost,
        t.duplicates,
        t.stale_epoch_rows,
        t.flaps,
        t.takeovers,
        problems
    );
}
