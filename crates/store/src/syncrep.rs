//! Whether a commit is on a synchronous standby, judged after the commit: what the writer asks
//! before it acknowledges a batch when `REQUIRE_SYNC_REPLICATION` is on.
//!
//! PostgreSQL can report a commit that only the primary has: when the wait for the standby is
//! cancelled (a query cancel or a terminated backend during COMMIT: a WARNING that "the
//! transaction has already committed locally, but might not have been replicated"), and,
//! silently, when a failover manager empties `synchronous_standby_names` after losing the
//! standby (pg_auto_failover's `wait_primary`), which releases every waiting commit. The rule
//! here catches both: WAL is one ordered stream, so a commit is replicated once a standby that
//! commits wait for has flushed WAL past a position read after the commit returned; a later
//! confirmed position confirms every earlier commit.

use tokio_postgres::error::DbError;
use tokio_postgres::types::PgLsn;
use tokio_postgres::GenericClient;

use crate::op::{self, Op};
use crate::Result;

/// Where the commit just made ends, at the latest (read after it returned), and whether a
/// synchronous standby has already flushed that far.
pub async fn after_commit(c: &impl GenericClient) -> Result<(PgLsn, bool)> {
    op::one(
        c,
        Op::SyncConfirm,
        "SELECT pg_current_wal_insert_lsn() AS lsn,
                COALESCE((SELECT max(flush_lsn) FROM pg_stat_replication
                          WHERE sync_state IN ('sync', 'quorum'))
                         >= pg_current_wal_insert_lsn(), false) AS flushed",
        &[],
        |r| Ok((r.try_get("lsn")?, r.try_get("flushed")?)),
    )
    .await
}

/// Whether a standby that commits wait for (`sync_state` `sync` or `quorum`) has flushed WAL
/// up to `lsn`.
pub async fn flushed_past(c: &impl GenericClient, lsn: PgLsn) -> Result<bool> {
    op::one(
        c,
        Op::SyncConfirm,
        "SELECT COALESCE(max(flush_lsn) >= $1, false) AS flushed
         FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')",
        &[&lsn],
        |r| r.try_get("flushed"),
    )
    .await
}

/// Whether a notice says a commit was made locally but its wait for a synchronous standby was
/// cancelled or cut short (PostgreSQL's `syncrep.c` warnings).
pub fn is_unreplicated_commit(n: &DbError) -> bool {
    n.message().contains("wait for synchronous replication")
        || n.detail()
            .is_some_and(|d| d.contains("committed locally, but might not have been replicated"))
}
