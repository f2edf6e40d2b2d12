//! The leader's subscription ledger: the `mqtt_subscriptions` table, every write fenced by the
//! term's lease (a node that lost its lease cannot change what the next leader reads).

use std::future::Future;
use std::time::Duration;

use leasehold_ingest::{LedgerChange, LedgerError, LedgerFuture, SubscriptionLedger};
use leasehold_store::queries::{self, LedgerWrite};
use leasehold_store::{Fence, Pool, StoreError};

/// Each call waits at most this long for a pooled connection and its statement.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct PgLedger {
    pub pool: Pool,
    pub fence: Fence,
}

/// `call`, given at most [`CALL_TIMEOUT`].
async fn timed<T>(call: impl Future<Output = Result<T, StoreError>>) -> Result<T, LedgerError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Err(StoreError::Fenced { .. })) => Err(LedgerError::Fenced),
        Ok(r) => r.map_err(|e| LedgerError::Unavailable(e.to_string())),
        Err(_) => Err(LedgerError::Unavailable(format!(
            "no answer within {CALL_TIMEOUT:?}"
        ))),
    }
}

impl PgLedger {
    async fn write_change(
        &self,
        client_id: &str,
        change: LedgerChange<'_>,
    ) -> Result<(), StoreError> {
        let (granted, qos): (Vec<String>, Vec<i16>);
        let (refused, why): (Vec<String>, Vec<String>);
        let write = match change {
            LedgerChange::Forget => LedgerWrite::Forget,
            LedgerChange::Pending(f) => LedgerWrite::Pending(f),
            LedgerChange::Granted(g) => {
                (granted, qos) = g.iter().map(|(f, q)| (f.clone(), i16::from(*q))).unzip();
                LedgerWrite::Granted(&granted, &qos)
            }
            LedgerChange::Refused(r) => {
                (refused, why) = r.iter().cloned().unzip();
                LedgerWrite::Refused(&refused, &why)
            }
            LedgerChange::Removed(f) => LedgerWrite::Removed(f),
        };
        let c = leasehold_store::pooled(&self.pool).await?;
        queries::write_ledger(&**c, &self.fence, client_id, &write).await?;
        Ok(())
    }
}

impl SubscriptionLedger for PgLedger {
    fn load<'a>(&'a self, client_id: &'a str) -> LedgerFuture<'a, Vec<(String, bool)>> {
        Box::pin(async move {
            let rows = timed(async {
                let c = leasehold_store::pooled(&self.pool).await?;
                queries::ledger(&**c, client_id).await
            })
            .await?;
            Ok(rows
                .into_iter()
                .map(|r| (r.topic_filter, r.subscribed))
                .collect())
        })
    }

    fn write<'a>(&'a self, client_id: &'a str, change: LedgerChange<'a>) -> LedgerFuture<'a, ()> {
        Box::pin(timed(self.write_change(client_id, change)))
    }
}
