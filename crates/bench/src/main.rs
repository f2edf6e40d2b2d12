//! `make bench`: in one run, with the same broker, the same publisher and the same messages:
//!
//! 1. **broker ceiling** — a subscriber that only acknowledges (rumqttc, like Leasehold);
//! 2. **per-message upsert** — what Leasehold replaces: each message decoded, written with its own
//!    `INSERT ... ON CONFLICT DO NOTHING` in its own transaction, acknowledged after;
//! 3. **Leasehold** — the real `leasehold` leader, fencing on, ack after commit;
//! 4. **routes** — the same queued messages drained into `telemetry` (the default route) and
//!    through a typed route into a user table (`on_conflict = "update"`), with CPU per message;
//! 5. 2 and 3 again on a PostgreSQL whose every flush takes 1 ms (`leasehold-flushdelay`): the
//!    commit cost of the machine class in docs/performance.md, which sets the upsert's rate.
//!
//! Throughput is live (the publisher as fast as it goes; first receipt to last commit, from
//! `pg_xact_commit_timestamp`) and, as capacity, the drain of a session into which the same
//! messages were queued first. Latency is receive-to-commit at half of Leasehold's measured rate,
//! exact per row. Memory is the peak RSS of each consumer process, and the leader's RSS across a
//! 60 s PostgreSQL outage under load. Each phase's consumer is the only session on the broker
//! while it runs.
//!
//! The two baselines run as child processes of this binary (`leasehold-bench ceiling|upsert ...`)
//! so their memory is their own.
//!
//! # Layout
//! - `args`: the flags (clap) and the two hidden child modes.
//! - `phases`: the run, one function per measured phase, and the slow-flush pass.
//! - `rig`: one PostgreSQL with the shared broker; a leader started, fed and stopped; an upsert
//!   run.
//! - `child`: the two baselines, run as child processes.
//! - `mqtt`: persistent sessions and the publisher of numbered messages.
//! - `probes`: rows, commit timestamps and percentiles read back from PostgreSQL; `pg_test_fsync`.
//! - `route`: the typed route's drain beside the default route's, with CPU per message.
//! - `report`: the measurements, the table, the targets and the JSON report.

mod args;
mod child;
mod mqtt;
mod phases;
mod probes;
mod report;
mod rig;
mod route;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = args::Args::parse();
    let res = match args.child.take() {
        Some(child) => child::run(child).await,
        None => phases::orchestrate(args).await,
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
