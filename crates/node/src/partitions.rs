//! The leader's partition round (`docs/partitions.md`): at the start of every term and then
//! every `RETENTION_INTERVAL` (at most an hour, so tomorrow always has its partition), under
//! the term's fence. Beside the term, not part of it: a failed round never ends or delays the
//! term; readings without a partition land in the default one meanwhile.

use std::time::Duration;

use leasehold_store::batch::Fence;
use leasehold_store::partitions::{self, Partition, Round, Step};
use leasehold_telemetry::events;
use tokio_util::sync::CancellationToken;

use crate::cluster_config::ActiveRx;

/// The longest wait between two rounds, whatever `RETENTION_INTERVAL` says.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// How soon a failed round is tried again (a lock another session held, a move half done),
/// doubling while rounds keep failing.
pub const RETRY: Duration = Duration::from_secs(5);

/// Rounds until `cancel` (the end of the term).
pub async fn maintain(url: String, fence: Fence, active: ActiveRx, cancel: CancellationToken) {
    let mut failed = 0u32;
    loop {
        let (keep, interval, ttl) = {
            let a = active.borrow();
            let r = a.cfg.cluster.retention();
            (r.telemetry, r.interval.min(MAX_INTERVAL), a.cfg.lease.ttl)
        };
        let res = tokio::select! {
            _ = cancel.cancelled() => return,
            r = async {
                let mut c = leasehold_store::connect(&url, "leasehold-partitions").await?;
                partitions::round(&mut c, &fence, keep, ttl, &mut step).await
            } => r,
        };
        let interval = match res {
            Ok(done) => {
                failed = 0;
                report(&done, keep);
                interval
            }
            Err(e) => {
                events::PartitionRoundFailed { error: &e }.emit();
                // 5 s, 10 s, 20 s ... up to the interval: a lock held elsewhere clears soon, a
                // missing privilege does not and need not fill the log.
                failed = failed.saturating_add(1);
                interval.min(RETRY.saturating_mul(1 << (failed - 1).min(10)))
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

fn range(p: &Partition) -> String {
    let end = |t: Option<chrono::DateTime<chrono::Utc>>, open: &str| {
        t.map_or(open.to_string(), |t| t.to_rfc3339())
    };
    format!("[{}, {})", end(p.from, "MINVALUE"), end(p.to, "MAXVALUE"))
}

fn step(s: Step) {
    let (step, detail) = match s {
        Step::Swapped => ("swapped", "a partitioned telemetry took the name; the old table is moved next".to_string()),
        Step::FutureMoved(n) => ("future_moved", format!("{n} readings at or after the cutover moved out of the old table")),
        Step::Validated => ("validated", "the old table holds nothing at or after the cutover".into()),
        Step::Attached { moved, conflicts } => (
            "attached",
            format!("the old table is a partition; {moved} late readings joined it, {conflicts} of them conflict dead letters"),
        ),
        Step::DroppedEmpty => ("dropped_empty", "the old table was empty: dropped".into()),
    };
    events::PartitioningStep { step, detail }.emit();
}

fn report(done: &Round, keep: Option<Duration>) {
    for (p, moved) in &done.created {
        events::PartitionCreated {
            name: &p.name,
            range: range(p),
            moved_from_default: *moved,
        }
        .emit();
    }
    let older_than = keep
        .map(leasehold_store::retention::short)
        .unwrap_or_default();
    for d in &done.dropped {
        events::PartitionDropped {
            name: &d.partition.name,
            range: range(&d.partition),
            bytes: d.bytes,
            rows_estimate: d.rows_estimate,
            older_than: &older_than,
        }
        .emit();
    }
    events::PartitionRound {
        partitions: done.partitions,
        expired_in_default: done.expired_in_default,
    }
    .emit();
}
