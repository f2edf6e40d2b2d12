//! The fault matrix, one trial of every fault, so CI guards it. `make chaos` runs the full,
//! repeated version and prints the table of docs/failure-modes.md.
//!
//! When it was a test binary of its own it ran alone; in the one binary it would share the
//! machine with another test's cluster, and some of its faults are timing bounds (no failover
//! while PostgreSQL is slow below the demotion deadline). So it is ignored in a plain run and
//! `make test` runs it afterwards, by itself: `cargo test --test e2e -- --ignored chaos::`.

use std::path::PathBuf;
use std::time::Duration;

use leasehold_chaos::{run_matrix, Fault, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run alone by `make test` (after the rest of the suite): its bounds assume no other cluster shares the machine"]
async fn every_fault_once_loses_nothing_duplicates_nothing_and_never_writes_a_stale_epoch() {
    let opts = Options {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_leasehold")),
        trials: 1,
        faults: Fault::ALL.to_vec(),
        rate: 300,
        full_rate: 2000,
        budget: Duration::from_secs(600),
    };
    let report = run_matrix(&opts).await.expect("the matrix ran");
    println!("{}", report.table());
    assert_eq!(report.rows.len(), Fault::ALL.len(), "every fault ran");
    for row in &report.rows {
        assert_eq!(row.trials, 1, "{}: no trial ran", row.name);
    }
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "guarantees broken:\n{}",
        failures
            .iter()
            .flat_map(|r| r.problems.iter().map(move |p| format!("{}: {p}", r.name)))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
