//! The lease statements on the lease's dedicated connection. Times are judged on the database
//! clock only; what to do with the answers is `leasehold-lease`'s business.

use std::time::Duration;

use tokio_postgres::{Client, Statement};

use crate::op::{self, Op};
use crate::queries::LEASE_CHANNEL;
use crate::Result;

/// Acquire or renew in one statement. The guard lets a current holder renew before expiry and
/// anyone take an expired lease; the epoch rises only when the holder changes.
pub const ACQUIRE: &str = "INSERT INTO instance_lock AS l
        (service_name, holder_id, instance_id, epoch, acquired_at, renewed_at, expires_at)
    VALUES ($1, $2, $3, 1, now(), now(), now() + make_interval(secs => $4::float8))
    ON CONFLICT (service_name) DO UPDATE SET
        holder_id   = EXCLUDED.holder_id,
        instance_id = EXCLUDED.instance_id,
        epoch       = CASE WHEN l.holder_id = EXCLUDED.holder_id THEN l.epoch ELSE l.epoch + 1 END,
        acquired_at = CASE WHEN l.holder_id = EXCLUDED.holder_id THEN l.acquired_at ELSE now() END,
        renewed_at  = now(),
        expires_at  = EXCLUDED.expires_at
    WHERE l.expires_at < now() OR l.holder_id = EXCLUDED.holder_id
    RETURNING epoch";

/// Expire (never delete: the epoch must survive) and wake the standbys, only if still ours.
pub const RELEASE: &str = "WITH released AS (
        UPDATE instance_lock SET expires_at = now()
        WHERE service_name = $1 AND holder_id = $2 AND epoch = $3
        RETURNING 1)
    SELECT pg_notify($4, $1) FROM released";

/// Why [`LeaseConn::acquire`] runs: the statement is the same, its metrics are apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// A standby campaigns for the lease.
    Campaign,
    /// The leader renews it.
    Renewal,
}

/// The lease's dedicated connection with both statements prepared, so that a renewal is exactly
/// one round trip: on a slow link an unprepared statement costs two (Parse, then Execute) and
/// would halve the latency a leader tolerates before its deadline.
pub struct LeaseConn {
    client: Client,
    acquire: Statement,
    release: Statement,
}

impl LeaseConn {
    /// Connects, bounds every statement server-side by `statement_timeout`, prepares.
    pub async fn connect(url: &str, statement_timeout: Duration) -> Result<LeaseConn> {
        let client = crate::connect(url, "leasehold-lease").await?;
        let ms = statement_timeout.as_millis();
        let (acquire, release) = op::measured(Op::Session, async {
            client
                .batch_execute(&format!(
                    "SET statement_timeout = {ms}; SET lock_timeout = {ms}"
                ))
                .await?;
            Ok(tokio::try_join!(
                client.prepare(ACQUIRE),
                client.prepare(RELEASE)
            )?)
        })
        .await?;
        Ok(LeaseConn {
            client,
            acquire,
            release,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The epoch when this holder holds the lease after the statement, `None` otherwise.
    pub async fn acquire(
        &self,
        attempt: Attempt,
        lease: &str,
        holder: &str,
        instance: &str,
        ttl: Duration,
    ) -> Result<Option<i64>> {
        let op = match attempt {
            Attempt::Campaign => Op::LeaseAcquire,
            Attempt::Renewal => Op::LeaseRenew,
        };
        let params: &op::Params<'_> = &[&lease, &holder, &instance, &ttl.as_secs_f64()];
        op::opt(&self.client, op, &self.acquire, params, |r| {
            r.try_get("epoch")
        })
        .await
    }

    pub async fn release(&self, lease: &str, holder: &str, epoch: i64) -> Result<()> {
        op::all(
            &self.client,
            Op::LeaseRelease,
            &self.release,
            &[&lease, &holder, &epoch, &LEASE_CHANNEL],
            |_| Ok(()),
        )
        .await?;
        Ok(())
    }
}
