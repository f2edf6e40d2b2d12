//! Whether the database's commits are synchronously replicated: the settings this connection
//! commits under and the standbys the primary streams to. "Nothing lost" across a database
//! failover holds only when a commit waits for a standby; this is where that is read.

use tokio_postgres::{GenericClient, Row};

use crate::op::{self, Op};
use crate::Result;

pub use leasehold_telemetry::replication::{ReplicationStatus, Standby};

fn standby(r: &Row) -> Result<Standby, tokio_postgres::Error> {
    from_row!(r => Standby { application_name, state, sync_state, flush_lag_ms, replay_lag_ms })
}

/// The replication of this database's commits: settings from `current_setting`, standbys from
/// `pg_stat_replication`.
pub async fn status(c: &impl GenericClient) -> Result<ReplicationStatus> {
    op::measured(Op::Replication, async {
        let settings = c
            .query_one(
                "SELECT current_setting('synchronous_commit') AS synchronous_commit,
                        current_setting('synchronous_standby_names') AS synchronous_standby_names,
                        pg_is_in_recovery() AS in_recovery,
                        (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                            OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
                            AS details_visible",
                &[],
            )
            .await?;
        let standbys = c
            .query(
                "SELECT application_name, state, sync_state,
                        (extract(epoch from flush_lag) * 1000)::float8 AS flush_lag_ms,
                        (extract(epoch from replay_lag) * 1000)::float8 AS replay_lag_ms
                 FROM pg_stat_replication
                 ORDER BY application_name",
                &[],
            )
            .await?
            .iter()
            .map(standby)
            .collect::<Result<Vec<_>, _>>()?;
        let hidden_standbys = standbys.iter().filter(|s| s.sync_state.is_none()).count();
        let (sync_standbys, async_standbys) = standbys.into_iter().partition(Standby::is_sync);
        Ok(ReplicationStatus {
            synchronous_commit: settings.try_get("synchronous_commit")?,
            synchronous_standby_names: settings.try_get("synchronous_standby_names")?,
            sync_standbys,
            async_standbys,
            details_visible: settings
                .try_get::<_, Option<bool>>("details_visible")?
                .unwrap_or(false),
            hidden_standbys,
            in_recovery: settings.try_get("in_recovery")?,
        })
    })
    .await
}
