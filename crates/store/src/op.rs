//! The one measured entry point every statement goes through, named by what it is for (after
//! neon's `storage_controller` persistence layer): [`measured`] times it and counts its failure
//! under its [`Op`], so `leasehold_db_query_duration_seconds{op}` and
//! `leasehold_db_query_errors_total{op}` cover every query in one place (see
//! `docs/runbook.md`). [`one`], [`opt`], [`all`] and [`exec`] are the usual shapes on top.

use std::future::Future;
use std::time::Instant;

use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Row, ToStatement};

use crate::Result;

/// What a statement is for: the `op` label of the query metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A standby's campaign for the lease.
    LeaseAcquire,
    /// The leader's renewal (the same statement as [`Op::LeaseAcquire`]).
    LeaseRenew,
    LeaseRelease,
    LeaseRead,
    WriteBatch,
    /// The batch's optimistic statement; a failure is a fallback to [`Op::WriteBatch`]'s (a
    /// key already stored, a row the table did not take).
    WriteOptimistic,
    DbClock,
    /// Session settings and statement preparation on a new dedicated connection.
    Session,
    Migrate,
    ClusterIdentity,
    ClusterNodes,
    Heartbeat,
    NewestDataAge,
    NoteNewest,
    /// The Sparkplug B edge nodes recorded (a term's start, `leasehold status`).
    SparkplugLoad,
    /// What a batch changed of Sparkplug B edge nodes, under the fence.
    SparkplugRecord,
    /// `leasehold status`: recent dead letters by route.
    DeadLettersByRoute,
    DeviceTopics,
    DeviceCoverage,
    Ping,
    StepDown,
    LedgerRead,
    LedgerWrite,
    RefusedSubscriptions,
    AlertsRecent,
    AlertOpen,
    AlertUpdate,
    AlertResolve,
    AlertFacts,
    Prune,
    Listen,
    /// After a commit, whether a synchronous standby has flushed it (`REQUIRE_SYNC_REPLICATION`).
    SyncConfirm,
    /// Checking `[[routes]]` against the catalog at start and in `leasehold routes`.
    RouteCheck,
    /// Replication settings and standbys (`pg_stat_replication`).
    Replication,
    /// The cluster's configuration: the active version, a version, its history.
    ConfigRead,
    /// `leasehold config apply`, and the import of a first start.
    ConfigApply,
    /// `leasehold replay`: dead letters locked, removed, counted.
    Replay,
    /// `leasehold doctor`'s reads: settings, privileges, clock samples, the database's identity.
    Doctor,
    /// `telemetry`'s partitions: the move to them, created ahead, dropped by retention.
    Partitions,
}

impl Op {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::LeaseAcquire => "lease_acquire",
            Op::LeaseRenew => "lease_renew",
            Op::LeaseRelease => "lease_release",
            Op::LeaseRead => "lease_read",
            Op::WriteBatch => "write_batch",
            Op::WriteOptimistic => "write_optimistic",
            Op::DbClock => "db_clock",
            Op::Session => "session",
            Op::Migrate => "migrate",
            Op::ClusterIdentity => "cluster_identity",
            Op::ClusterNodes => "cluster_nodes",
            Op::Heartbeat => "heartbeat",
            Op::ConfigRead => "config_read",
            Op::ConfigApply => "config_apply",
            Op::Replay => "replay",
            Op::NewestDataAge => "newest_data_age",
            Op::NoteNewest => "note_newest",
            Op::SparkplugLoad => "sparkplug_load",
            Op::SparkplugRecord => "sparkplug_record",
            Op::DeadLettersByRoute => "dead_letters_by_route",
            Op::DeviceTopics => "device_topics",
            Op::DeviceCoverage => "device_coverage",
            Op::Ping => "ping",
            Op::StepDown => "step_down",
            Op::LedgerRead => "ledger_read",
            Op::LedgerWrite => "ledger_write",
            Op::RefusedSubscriptions => "refused_subscriptions",
            Op::AlertsRecent => "alerts_recent",
            Op::AlertOpen => "alert_open",
            Op::AlertUpdate => "alert_update",
            Op::AlertResolve => "alert_resolve",
            Op::AlertFacts => "alert_facts",
            Op::Prune => "prune",
            Op::Listen => "listen",
            Op::SyncConfirm => "sync_confirm",
            Op::RouteCheck => "route_check",
            Op::Replication => "replication",
            Op::Doctor => "doctor",
            Op::Partitions => "partitions",
        }
    }
}

/// Runs `work` (one or more statements of `op`), recording its duration and whether it failed.
pub async fn measured<T, F>(op: Op, work: F) -> Result<T>
where
    F: Future<Output = Result<T>>,
{
    let started = Instant::now();
    let res = work.await;
    leasehold_telemetry::events::DbQuery {
        op: op.as_str(),
        elapsed: started.elapsed(),
        error: res.as_ref().err().map(|e| e as &dyn std::fmt::Display),
    }
    .emit();
    res
}

/// The parameters of a statement.
pub(crate) type Params<'a> = [&'a (dyn ToSql + Sync)];

/// Exactly one row, read by `read`.
pub(crate) async fn one<T, S>(
    c: &impl GenericClient,
    op: Op,
    sql: &S,
    params: &Params<'_>,
    read: impl FnOnce(&Row) -> Result<T, tokio_postgres::Error>,
) -> Result<T>
where
    S: ?Sized + ToStatement + Sync + Send,
{
    measured(op, async { Ok(read(&c.query_one(sql, params).await?)?) }).await
}

/// At most one row, read by `read`.
pub(crate) async fn opt<T, S>(
    c: &impl GenericClient,
    op: Op,
    sql: &S,
    params: &Params<'_>,
    read: impl FnOnce(&Row) -> Result<T, tokio_postgres::Error>,
) -> Result<Option<T>>
where
    S: ?Sized + ToStatement + Sync + Send,
{
    measured(op, async {
        Ok(c.query_opt(sql, params)
            .await?
            .as_ref()
            .map(read)
            .transpose()?)
    })
    .await
}

/// Every row, each read by `read`.
pub(crate) async fn all<T, S>(
    c: &impl GenericClient,
    op: Op,
    sql: &S,
    params: &Params<'_>,
    read: impl FnMut(&Row) -> Result<T, tokio_postgres::Error>,
) -> Result<Vec<T>>
where
    S: ?Sized + ToStatement + Sync + Send,
{
    measured(op, async {
        Ok(c.query(sql, params)
            .await?
            .iter()
            .map(read)
            .collect::<Result<Vec<T>, _>>()?)
    })
    .await
}

/// Statements without parameters or rows, by the simple query protocol.
pub(crate) async fn batch(c: &impl GenericClient, op: Op, sql: &str) -> Result<()> {
    measured(op, async { Ok(c.batch_execute(sql).await?) }).await
}

/// A statement's count of rows changed.
pub(crate) async fn exec<S>(
    c: &impl GenericClient,
    op: Op,
    sql: &S,
    params: &Params<'_>,
) -> Result<u64>
where
    S: ?Sized + ToStatement + Sync + Send,
{
    measured(op, async { Ok(c.execute(sql, params).await?) }).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreError;
    use leasehold_telemetry::metrics;

    #[tokio::test]
    async fn measured_times_every_statement_and_counts_failures_by_op() {
        let m = metrics();
        let timed = || {
            m.db_query_duration
                .with_label_values(&["step_down"])
                .get_sample_count()
        };
        let failed = || m.db_query_errors.with_label_values(&["step_down"]).get();
        let (t0, f0) = (timed(), failed());
        measured(Op::StepDown, async { Ok(()) }).await.expect("ok");
        assert_eq!((timed(), failed()), (t0 + 1, f0));
        let err = measured(Op::StepDown, async {
            Err::<(), _>(StoreError::Timeout(std::time::Duration::from_secs(1)))
        })
        .await;
        assert!(matches!(err, Err(StoreError::Timeout(_))));
        assert_eq!((timed(), failed()), (t0 + 2, f0 + 1));
    }
}
