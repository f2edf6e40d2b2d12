//! What a trial can find wrong: a broken guarantee, a missed bound, or a trial that could not run.
//! Printed and written to the JSON report as one sentence each.

use std::process::ExitStatus;
use std::time::Duration;

use serde::{Serialize, Serializer};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Problem {
    #[error("{0} acknowledged messages lost")]
    Lost(u64),
    #[error("{0} duplicate rows")]
    Duplicates(u64),
    #[error("{0} rows committed under a superseded epoch")]
    StaleEpochRows(u64),
    #[error("{flaps} unexplained leadership changes: {changes:?}")]
    Flaps {
        flaps: u64,
        changes: Vec<(String, i64)>,
    },
    #[error("client-id fight: {0} takeovers at the broker")]
    Fight(u64),
    #[error("took {took:?}, bound {bound:?}")]
    OverBound { took: Duration, bound: Duration },
    #[error("no takeover/resume observed")]
    NoTakeover,
    #[error("false failover: the lease changed although the slowness stayed below the deadline")]
    FalseFailover,
    #[error("{0} nodes believed they led at the same time")]
    SeveralLeaders(usize),
    #[error("{0} epochs were written by more than one node")]
    SharedEpochs(i64),
    #[error("expected the watchdog's exit code 70, got {0}")]
    WatchdogExit(ExitStatus),
    #[error("step-down failed: {0}")]
    StepDownFailed(String),
    /// The environment failed under the trial (the error, with its causes).
    #[error("trial could not run: {0}")]
    CouldNotRun(String),
}

impl Serialize for Problem {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
