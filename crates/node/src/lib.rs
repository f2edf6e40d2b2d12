//! The Leasehold node and its command line.
//!
//! # Layout
//! - [`cli`]: argument parsing, configuration loading, one-line errors, exit codes.
//! - [`node`]: `leasehold run`, the wiring of one node and its shutdown sequence.
//! - [`supervisor`]: starts, drains and cancels leadership terms as the lease role changes.
//! - [`writer`]: the batch writer of a term (fenced transactions, ack after commit).
//! - [`ledger`]: the leader's subscription ledger (`mqtt_subscriptions`, fenced writes).
//! - [`admin`]: `migrate`, `status`, `step-down`.
//! - [`simulate`]: a device fleet publisher for demos, tests and benchmarks.
//! - [`sd_notify`]: readiness and the watchdog for systemd's `Type=notify`.

pub mod admin;
pub mod cli;
pub mod ledger;
pub mod node;
pub mod sd_notify;
pub mod simulate;
pub mod supervisor;
pub mod writer;
