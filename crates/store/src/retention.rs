//! Retention (`*_RETENTION` and `RETENTION_INTERVAL` in `docs/configuration.md`): the tables a
//! node fills for operations lose their old rows.
//!
//! Production nodes prune every `RETENTION_INTERVAL`; an advisory lock lets one of them do a
//! round while the others skip it. Rows go in batches of [`BATCH`], each its own short
//! statement that skips rows another transaction holds, so pruning a large backlog never holds
//! locks for long nor blocks the writer, heartbeats or alert evaluation.

use std::time::Duration;

use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::op::{self, Op};
use crate::Result;

leasehold_config::named! {
    /// A table Leasehold fills for operations.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Table {
        DeadLetters = "dead_letters",
        /// Resolved alerts only: an open alert stays, however old.
        Alerts = "alerts",
        LeaseHistory = "lease_history",
        ClusterNodes = "cluster_nodes",
    }
}

impl Table {
    /// One batch: rows older than `$1` seconds, at most `$2` of them, found by an index on the
    /// age column where there is one (`alerts` by `opened_at`: resolved after it was opened).
    fn sql(self) -> String {
        let older = "< now() - make_interval(secs => $1)";
        let expired = match self {
            Table::DeadLetters => format!("received_at {older}"),
            Table::Alerts => format!("opened_at {older} AND resolved_at {older}"),
            Table::LeaseHistory => format!("acquired_at {older}"),
            Table::ClusterNodes => format!("last_seen {older}"),
        };
        let t = self.as_str();
        format!(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM {t} WHERE {expired} LIMIT $2 FOR UPDATE SKIP LOCKED))"
        )
    }
}

/// Rows per delete statement.
pub const BATCH: i64 = 1000;
/// Batches per table and round; what is left waits for the next round.
pub const MAX_BATCHES: u32 = 500;

/// What one round did to one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pruned {
    pub rows: u64,
    pub batches: u32,
    /// `false` when [`MAX_BATCHES`] ran out before the old rows did.
    pub complete: bool,
}

/// Deletes the rows of `table` older than `keep`, `batch` at a time, at most `max_batches`.
pub async fn prune(
    c: &impl GenericClient,
    table: Table,
    keep: Duration,
    batch: i64,
    max_batches: u32,
) -> Result<Pruned> {
    let stmt = op::measured(Op::Prune, async { Ok(c.prepare(&table.sql()).await?) }).await?;
    let mut done = Pruned::default();
    while done.batches < max_batches {
        let n = op::exec(c, Op::Prune, &stmt, &[&keep.as_secs_f64(), &batch]).await?;
        done.rows += n;
        if n > 0 {
            done.batches += 1;
        }
        if n < batch as u64 {
            done.complete = true;
            return Ok(done);
        }
        tokio::task::yield_now().await;
    }
    Ok(done)
}

/// Arbitrary but fixed: the advisory lock of a pruning round.
const RETENTION_LOCK_KEY: i64 = 0x1ea5_e4e7e;

/// One round over `policy`, on a connection of its own; `None` when another node is pruning.
pub async fn round(
    url: &str,
    policy: &[(Table, Duration)],
) -> Result<Option<Vec<(Table, Pruned)>>> {
    let c = crate::connect(url, "leasehold-retention").await?;
    // A batch that cannot get its locks quickly waits for the next round instead.
    op::batch(
        &c,
        Op::Session,
        "SET statement_timeout = '30s'; SET lock_timeout = '5s'",
    )
    .await?;
    let locked: bool = op::one(
        &c,
        Op::Prune,
        "SELECT pg_try_advisory_lock($1) AS locked",
        &[&RETENTION_LOCK_KEY],
        |r| r.try_get("locked"),
    )
    .await?;
    if !locked {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(policy.len());
    for (table, keep) in policy {
        out.push((*table, prune(&c, *table, *keep, BATCH, MAX_BATCHES).await?));
    }
    // Closing the connection releases the lock too; this is only tidier.
    let _ = op::exec(
        &c,
        Op::Prune,
        "SELECT pg_advisory_unlock($1)",
        &[&RETENTION_LOCK_KEY],
    )
    .await;
    Ok(Some(out))
}

/// What to keep, and how often to prune.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub tables: Vec<(Table, Duration)>,
    pub interval: Duration,
}

/// Prunes at once and then every `interval` until `cancel`, logging what each round deleted.
/// `current` is read for every round: retention is a cluster setting, changed live.
pub async fn run(url: String, current: impl Fn() -> Policy, cancel: CancellationToken) {
    let mut first = true;
    loop {
        let wait = match std::mem::take(&mut first) {
            true => Duration::ZERO,
            false => current().interval,
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let policy = current().tables;
        let res = tokio::select! {
            _ = cancel.cancelled() => return,
            r = round(&url, &policy) => r,
        };
        match res {
            Ok(None) => tracing::debug!("retention: another node is pruning"),
            Ok(Some(done)) => {
                for ((table, p), (_, keep)) in done.iter().zip(&policy) {
                    let older_than = short(*keep);
                    if p.rows > 0 {
                        tracing::info!(
                            table = table.as_str(),
                            deleted = p.rows,
                            batches = p.batches,
                            %older_than,
                            complete = p.complete,
                            "retention: old rows deleted"
                        );
                    } else {
                        tracing::debug!(table = table.as_str(), %older_than, "retention: nothing to delete");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention round failed; retrying at the next interval")
            }
        }
    }
}

/// `30d`, `12h`, `90s`: how log lines name a retention.
pub fn short(d: Duration) -> String {
    match d.as_secs() {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s => format!("{s}s"),
    }
}
