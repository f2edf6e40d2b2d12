//! The fault matrix (issue: prove G1–G5 under every failure an active/standby pair meets).
//!
//! One environment — a private PostgreSQL (with commit timestamps), a private Mosquitto with the
//! project's broker configuration, and `leasehold` nodes each behind its own TCP proxies to the
//! database and the broker — is reused across trials. Every trial publishes numbered QoS 1
//! messages at a steady rate, injects one fault, heals, and verifies from the database:
//!
//! - **lost**: sequence numbers the broker acknowledged to the publisher but not in `telemetry`;
//! - **duplicates**: rows beyond one per sequence number;
//! - **stale-epoch rows**: rows committed under an epoch after a newer epoch's first commit
//!   (commit timestamps, `track_commit_timestamp = on`);
//! - **failover**: from the fault to the first commit under the new epoch (or, for faults that
//!   need no failover, from the repair to the first commit after it);
//! - **flaps**: lease holder changes beyond what the fault explains; **takeovers**: client-id
//!   takeovers in the broker log (a "fight" is more than one in a trial).
//!
//! # Layout
//! - `fault`: [`Fault`], what is injected and what is expected of it (changes explained, bound).
//! - `env`: [`Env`], the servers, proxies and nodes; healing between trials.
//! - `dbfault`: the database's own failover (primary host lost, switchover) on a replicated
//!   pair run by pg_auto_failover, an environment of its own.
//! - `probes`: what the trials read back from PostgreSQL and the broker log, and the polling.
//! - `watch`: the lease holder polled while a trial runs (flaps).
//! - `trial`: one trial as steps (start, inject, finish, judge), [`Trial`].
//! - `inject`: one function per fault.
//! - `problem`: [`Problem`], what a trial can find wrong.
//! - `matrix`: [`run_matrix`], every fault's trials within the budget.
//! - `report`: a fault's [`Row`], the [`Report`] with its table and JSON.

mod dbfault;
mod env;
mod fault;
mod inject;
mod matrix;
mod probes;
mod problem;
mod report;
mod trial;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

pub use env::Env;
pub use fault::Fault;
pub use matrix::run_matrix;
pub use problem::Problem;
pub use report::{Report, Row};
pub use trial::Trial;

/// Lease timings of the matrix: short, so many trials fit in minutes.
pub const TTL: Duration = Duration::from_secs(2);
pub const POLL: Duration = Duration::from_millis(200);
/// A leader that cannot reach the broker this long hands over.
pub const STEP_DOWN_AFTER: Duration = Duration::from_secs(2);
/// MQTT keep-alive of the nodes: a silently dead broker connection is noticed within two of these.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// Options of a matrix run.
#[derive(Debug, Clone)]
pub struct Options {
    pub bin: PathBuf,
    pub trials: usize,
    pub faults: Vec<Fault>,
    /// Steady publishing rate (messages/s).
    pub rate: u64,
    /// Rate for the "full rate" faults.
    pub full_rate: u64,
    /// Wall-clock budget for the whole run; trials beyond it are skipped (and reported).
    pub budget: Duration,
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) async fn sleep(d: Duration) {
    tokio::time::sleep(d).await
}
