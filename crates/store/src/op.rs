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

leasehold_config::named! {
    /// What a statement is for: the `op` label of the query metrics ([`Op::as_str`]).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Op {
        /// A standby's campaign for the lease.
        LeaseAcquire = "lease_acquire",
        /// The leader's renewal (the same statement as [`Op::LeaseAcquire`]).
        LeaseRenew = "lease_renew",
        LeaseRelease = "lease_release",
        LeaseRead = "lease_read",
        WriteBatch = "write_batch",
        /// The batch's optimistic statement; a failure is a fallback to [`Op::WriteBatch`]'s (a
        /// key already stored, a row the table did not take).
        WriteOptimistic = "write_optimistic",
        DbClock = "db_clock",
        /// Session settings and statement preparation on a new dedicated connection.
        Session = "session",
        Migrate = "migrate",
        ClusterIdentity = "cluster_identity",
        ClusterNodes = "cluster_nodes",
        Heartbeat = "heartbeat",
        NewestDataAge = "newest_data_age",
        NoteNewest = "note_newest",
        /// The Sparkplug B edge nodes recorded (a term's start, `leasehold status`).
        SparkplugLoad = "sparkplug_load",
        /// What a batch changed of Sparkplug B edge nodes, under the fence.
        SparkplugRecord = "sparkplug_record",
        /// `leasehold status`: recent dead letters by route.
        DeadLettersByRoute = "dead_letters_by_route",
        DeviceTopics = "device_topics",
        DeviceCoverage = "device_coverage",
        Ping = "ping",
        StepDown = "step_down",
        LedgerRead = "ledger_read",
        LedgerWrite = "ledger_write",
        RefusedSubscriptions = "refused_subscriptions",
        AlertsRecent = "alerts_recent",
        AlertOpen = "alert_open",
        AlertUpdate = "alert_update",
        AlertResolve = "alert_resolve",
        AlertFacts = "alert_facts",
        Prune = "prune",
        Listen = "listen",
        /// After a commit, whether a synchronous standby has flushed it (`REQUIRE_SYNC_REPLICATION`).
        SyncConfirm = "sync_confirm",
        /// Checking `[[routes]]` against the catalog at start and in `leasehold routes`.
        RouteCheck = "route_check",
        /// Replication settings and standbys (`pg_stat_replication`).
        Replication = "replication",
        /// The cluster's configuration: the active version, a version, its history.
        ConfigRead = "config_read",
        /// `leasehold config apply`, and the import of a first start.
        ConfigApply = "config_apply",
        /// `leasehold replay`: dead letters locked, removed, counted.
        Replay = "replay",
        /// `leasehold doctor`'s reads: settings, privileges, clock samples, the database's identity.
        Doctor = "doctor",
        /// `telemetry`'s partitions: the move to them, created ahead, dropped by retention.
        Partitions = "partitions",
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
