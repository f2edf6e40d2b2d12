//! A fault's trials aggregated into a row, and the whole run as the table of
//! docs/failure-modes.md and the JSON report.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::fault::Fault;
use crate::trial::Trial;

/// A fault's trials, aggregated.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub fault: Fault,
    pub name: &'static str,
    pub trials: usize,
    pub failover_p50_ms: Option<f64>,
    pub failover_max_ms: Option<f64>,
    pub lost: u64,
    pub duplicates: u64,
    pub stale_epoch_rows: u64,
    pub flaps: u64,
    pub takeovers: u64,
    pub fights: u64,
    pub failed_trials: usize,
    pub problems: Vec<String>,
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).copied()
}

pub(crate) fn aggregate(fault: Fault, trials: &[Trial]) -> Row {
    let mut times: Vec<f64> = trials.iter().filter_map(|t| t.failover_ms).collect();
    times.sort_by(|a, b| a.total_cmp(b));
    Row {
        fault,
        name: fault.name(),
        trials: trials.len(),
        failover_p50_ms: percentile(&times, 0.5),
        failover_max_ms: times.last().copied(),
        lost: trials.iter().map(|t| t.lost).sum(),
        duplicates: trials.iter().map(|t| t.duplicates).sum(),
        stale_epoch_rows: trials.iter().map(|t| t.stale_epoch_rows).sum(),
        flaps: trials.iter().map(|t| t.flaps).sum(),
        takeovers: trials.iter().map(|t| t.takeovers).sum(),
        fights: trials.iter().filter(|t| t.takeovers > 1).count() as u64,
        failed_trials: trials.iter().filter(|t| !t.problems.is_empty()).count(),
        problems: trials
            .iter()
            .flat_map(|t| {
                t.problems
                    .iter()
                    .map(move |p| format!("trial {}: {p}", t.trial))
            })
            .collect(),
    }
}

/// The whole report of a matrix run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_at: DateTime<Utc>,
    pub seconds: f64,
    pub lease_ttl_ms: f64,
    pub poll_interval_ms: f64,
    pub rate: u64,
    pub full_rate: u64,
    pub rows: Vec<Row>,
    pub trials: Vec<Trial>,
}

impl Report {
    /// Faults whose trials broke a guarantee or a bound.
    pub fn failures(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.failed_trials > 0).collect()
    }

    pub fn table(&self) -> String {
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        let mut s = format!(
            "{:<33} {:>6} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}\n",
            "fault",
            "trials",
            "p50 ms",
            "max ms",
            "lost",
            "dups",
            "stale",
            "flaps",
            "tkovr",
            "failed"
        );
        for r in &self.rows {
            let lost = if r.fault.loss_is_broker_limit() {
                format!("{}*", r.lost)
            } else {
                r.lost.to_string()
            };
            s.push_str(&format!(
                "{:<33} {:>6} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}\n",
                r.name,
                r.trials,
                opt(r.failover_p50_ms),
                opt(r.failover_max_ms),
                lost,
                r.duplicates,
                r.stale_epoch_rows,
                r.flaps,
                r.takeovers,
                r.failed_trials
            ));
        }
        s.push_str(&format!(
            "LEASE_TTL {} ms, poll {} ms, {} msg/s steady, {} msg/s full rate, {:.0} s.\n\
             ms = fault to first commit under the new epoch (restart faults: repair to first commit; watchdog: cut to exit).\n\
             * broker kill -9 without waiting for its autosave: what the broker had not saved is the broker's limit, not judged.\n",
            self.lease_ttl_ms, self.poll_interval_ms, self.rate, self.full_rate, self.seconds
        ));
        for r in &self.rows {
            for p in &r.problems {
                s.push_str(&format!("  {}: {p}\n", r.name));
            }
        }
        s
    }
}
