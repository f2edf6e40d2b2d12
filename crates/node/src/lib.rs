//! The Leasehold node and its command line.
//!
//! # Layout
//! - [`cli`]: argument parsing, configuration loading, one-line errors, exit codes.
//! - [`node`]: `leasehold run`: [`node::Node`] (`build` on a bound listener, `port`,
//!   `run_until`), the wiring of one node and its shutdown sequence.
//! - [`cluster_config`]: the cluster configuration the node runs (stored versions over its own
//!   node settings), imported on a first start, applied live; [`config_cmd`]: `leasehold config`.
//! - [`identity`]: the client id of the cluster's shared session, from its stored identity.
//! - [`supervisor`]: starts, drains and cancels leadership terms as the lease role changes.
//! - [`writer`]: the batch writer of a term (fenced statements, row errors isolated, ack after
//!   commit).
//! - [`batch`]: a gathered batch decoded and settled as far as the batch alone can settle it.
//! - [`ledger`]: the leader's subscription ledger (`mqtt_subscriptions`, fenced writes).
//! - [`checks`]: `doctor`, the deployment checks at start, the leader's claim on its client
//!   id, the replication status the heartbeat refreshes.
//! - [`admin`]: `migrate`, `status`, `step-down`.
//! - [`routes_cmd`]: `[[routes]]` against the database: the start-up check and `leasehold routes`.
//! - [`replay`]: `leasehold replay`, and a resumed route's own dead letters: dead letters run
//!   again through the active configuration, each chunk written and removed in one fenced
//!   transaction.
//! - [`simulate`]: a device fleet publisher for demos, tests and benchmarks.
//! - [`sd_notify`]: readiness and the watchdog for systemd's `Type=notify`.

pub mod admin;
pub mod batch;
pub mod checks;
pub mod cli;
pub mod cluster_config;
pub mod config_cmd;
pub mod identity;
pub mod ledger;
pub mod node;
pub mod partitions;
pub mod replay;
pub mod routes_cmd;
pub mod routing;
pub mod sd_notify;
pub mod simulate;
pub mod supervisor;
pub mod writer;
