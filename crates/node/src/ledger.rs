//! The leader's subscription ledger: the `mqtt_subscriptions` table, every write fenced by the
//! term's lease (a node that lost its lease cannot change what the next leader reads).

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

fn unavailable(e: StoreError) -> LedgerError {
    match e {
        StoreError::Fenced { .. } => LedgerError::Fenced,
        other => LedgerError::Unavailable(other.to_string()),
    }
}

impl PgLedger {
    async fn write_change(
        &self,
        client_id: &str,
        change: LedgerChange<'_>,
    ) -> Result<(), StoreError> {
        let c = leasehold_store::pooled(&self.pool).await?;
        match change {
            LedgerChange::Forget => {
                queries::write_ledger(&**c, &self.fence, client_id, &LedgerWrite::Forget).await?;
            }
            LedgerChange::Pending(f) => {
                queries::write_ledger(&**c, &self.fence, client_id, &LedgerWrite::Pending(f))
                    .await?;
            }
            LedgerChange::Granted(g) => {
                let (f, q): (Vec<String>, Vec<i16>) =
                    g.iter().map(|(f, q)| (f.clone(), i16::from(*q))).unzip();
                queries::write_ledger(&**c, &self.fence, client_id, &LedgerWrite::Granted(&f, &q))
                    .await?;
            }
            LedgerChange::Refused(r) => {
                let (f, why): (Vec<String>, Vec<String>) = r.iter().cloned().unzip();
                queries::write_ledger(
                    &**c,
                    &self.fence,
                    client_id,
                    &LedgerWrite::Refused(&f, &why),
                )
                .await?;
            }
            LedgerChange::Removed(f) => {
                queries::write_ledger(&**c, &self.fence, client_id, &LedgerWrite::Removed(f))
                    .await?;
            }
        }
        Ok(())
    }
}

impl SubscriptionLedger for PgLedger {
    fn load<'a>(&'a self, client_id: &'a str) -> LedgerFuture<'a, Vec<(String, bool)>> {
        Box::pin(async move {
            let read = async {
                let c = leasehold_store::pooled(&self.pool).await?;
                queries::ledger(&**c, client_id).await
            };
            match tokio::time::timeout(CALL_TIMEOUT, read).await {
                Ok(Ok(rows)) => Ok(rows
                    .into_iter()
                    .map(|r| (r.topic_filter, r.subscribed))
                    .collect()),
                Ok(Err(e)) => Err(unavailable(e)),
                Err(_) => Err(LedgerError::Unavailable(format!(
                    "no answer within {CALL_TIMEOUT:?}"
                ))),
            }
        })
    }

    fn write<'a>(&'a self, client_id: &'a str, change: LedgerChange<'a>) -> LedgerFuture<'a, ()> {
        Box::pin(async move {
            match tokio::time::timeout(CALL_TIMEOUT, self.write_change(client_id, change)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(unavailable(e)),
                Err(_) => Err(LedgerError::Unavailable(format!(
                    "no answer within {CALL_TIMEOUT:?}"
                ))),
            }
        })
    }
}
