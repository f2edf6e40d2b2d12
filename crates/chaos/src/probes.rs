//! What the trials read back: the lease holder, the rows of a run, commit timestamps and the
//! broker's log of client-id takeovers; and the polling that waits for them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::{DateTime, Utc};

use leasehold_testkit::LEASE_NAME;

use crate::env::Env;
use crate::sleep;

impl Env {
    pub(crate) async fn leader(&self) -> Result<Option<(String, i64)>> {
        let leader = leasehold_store::current_leader(&self.db, LEASE_NAME).await?;
        Ok(leader.map(|l| (l.instance_id, l.epoch)))
    }

    pub(crate) fn takeovers(&self) -> u64 {
        self.cluster
            .mq
            .log()
            .matches("already connected, closing old connection")
            .count() as u64
    }

    pub(crate) async fn stale_epoch_rows(&self) -> Result<u64> {
        let n: i64 = self
            .db
            .query_one(
                "WITH first AS (SELECT lease_epoch, min(pg_xact_commit_timestamp(xmin)) AS t FROM telemetry GROUP BY 1)
                 SELECT count(*) FROM telemetry r
                 WHERE EXISTS (SELECT 1 FROM first f WHERE f.lease_epoch > r.lease_epoch AND f.t < pg_xact_commit_timestamp(r.xmin))",
                &[],
            )
            .await?
            .get(0);
        Ok(n as u64)
    }

    pub(crate) async fn rows_of(&self, run: &str) -> Result<i64> {
        Ok(self
            .db
            .query_one(
                "SELECT count(*) FROM telemetry WHERE payload->>'run' = $1",
                &[&run],
            )
            .await?
            .get(0))
    }

    /// First commit of `run` under an epoch above `epoch`, after `after`.
    pub(crate) async fn first_commit(
        &self,
        run: &str,
        epoch_above: i64,
        after: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>> {
        Ok(self
            .db
            .query_one(
                "SELECT min(pg_xact_commit_timestamp(xmin)) FROM telemetry
                 WHERE payload->>'run' = $1 AND lease_epoch > $2 AND pg_xact_commit_timestamp(xmin) > $3",
                &[&run, &epoch_above, &after],
            )
            .await?
            .get(0))
    }

    pub(crate) async fn stored_seqs(&self, run: &str) -> Result<BTreeMap<u64, i64>> {
        let rows = self
            .db
            .query("SELECT (payload->>'seq')::bigint, count(*) FROM telemetry WHERE payload->>'run' = $1 GROUP BY 1", &[&run])
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1)))
            .collect())
    }

    /// Epochs whose rows more than one node wrote.
    pub(crate) async fn epochs_written_by_several(&self) -> Result<i64> {
        Ok(self
            .db
            .query_one(
                "SELECT count(*) FROM (SELECT lease_epoch FROM telemetry GROUP BY 1 HAVING count(DISTINCT written_by) > 1) s",
                &[],
            )
            .await?
            .get(0))
    }
}

/// Polls `f` every 50 ms until it yields a value or `timeout` passes.
pub(crate) async fn first_some<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Ok(Some(v)) = f().await {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Time from `from` to the first commit of `run` under an epoch above `above` after `from`.
pub(crate) async fn wait_new_epoch(
    env: &Env,
    run: &str,
    above: i64,
    from: DateTime<Utc>,
    timeout: Duration,
) -> Option<Duration> {
    let t = first_some(timeout, || env.first_commit(run, above, from)).await?;
    (t - from).to_std().ok()
}
