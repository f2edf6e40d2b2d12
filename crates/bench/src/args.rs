//! The command line: the orchestrator's flags (used by the Makefile and docs/performance.md) and
//! the two hidden child modes the orchestrator starts itself.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "leasehold-bench",
    about = "Leasehold against the broker's ceiling and the per-message upsert, side by side"
)]
pub struct Args {
    /// Messages per approach (live, capacity and latency runs).
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Messages published to the per-message upsert (about 1k/s: it takes a while).
    #[arg(long, default_value_t = 100_000)]
    pub upsert_messages: u64,
    /// Seconds PostgreSQL is stopped under load to watch the leader's memory (0: skip).
    #[arg(long, default_value_t = 60)]
    pub outage_secs: u64,
    /// The leasehold binary under test.
    #[arg(long, default_value = "target/release/leasehold")]
    pub bin: PathBuf,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/bench.json")]
    pub json: PathBuf,
    /// Latency of every PostgreSQL flush in the slow-flush pass, microseconds (0: skip the pass).
    #[arg(long, default_value_t = 1000)]
    pub flush_latency_us: u64,
    /// The `leasehold-flushdelay` shim (default: libleasehold_flushdelay.so beside this binary).
    #[arg(long)]
    pub flush_shim: Option<PathBuf>,
    /// Run one phase alone: `routes` drains the queued messages into `telemetry` and through the
    /// typed route, with leader, PostgreSQL and broker CPU per message (about a minute a run).
    #[arg(long, value_enum)]
    pub only: Option<Only>,
    /// Older readings loaded into `telemetry` (day partitions over 230 days) before the
    /// default route drains into it twice, each time followed by a drain into the same table
    /// with the history detached (0: skip).
    #[arg(long, default_value_t = 20_000_000)]
    pub history_rows: u64,
    /// With `--only routes`: how many times each route is drained, each into emptied tables.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    #[command(subcommand)]
    pub child: Option<Child>,
}

/// A phase that runs alone.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Only {
    Routes,
}

/// A baseline run as a child process of the orchestrator, so that its peak RSS is its own. Each
/// prints its [`crate::child::ChildReport`] as JSON on stdout.
#[derive(Subcommand, Debug)]
pub enum Child {
    /// Drain `n` messages from a session, acknowledging each on receipt.
    #[command(hide = true)]
    Ceiling {
        port: u16,
        client_id: String,
        n: u64,
    },
    /// One upsert per message in its own transaction, acknowledged after its commit.
    #[command(hide = true)]
    Upsert {
        port: u16,
        pg_url: String,
        client_id: String,
        n: u64,
        max_secs: u64,
    },
}

impl Child {
    /// The arguments that run this child (the inverse of parsing).
    pub fn to_args(&self) -> Vec<String> {
        match self {
            Child::Ceiling { port, client_id, n } => {
                vec![
                    "ceiling".into(),
                    port.to_string(),
                    client_id.clone(),
                    n.to_string(),
                ]
            }
            Child::Upsert {
                port,
                pg_url,
                client_id,
                n,
                max_secs,
            } => vec![
                "upsert".into(),
                port.to_string(),
                pg_url.clone(),
                client_id.clone(),
                n.to_string(),
                max_secs.to_string(),
            ],
        }
    }
}
