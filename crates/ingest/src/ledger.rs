//! Where the session's subscriptions are remembered between connections and leaders (see
//! [`crate::subscriptions`]), and the task that writes there without ever making the MQTT event
//! loop wait for the database.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_retry::{Backoff, Policy};
use tokio::sync::mpsc;

use crate::subscriptions::LedgerOp;

/// What ledger calls return.
pub type LedgerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LedgerError>> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// This node no longer holds the lease: nothing was written, and nothing more may be.
    #[error("fenced: the lease is no longer held by this node")]
    Fenced,
    /// Transient (database unreachable, timeout): retried.
    #[error("{0}")]
    Unavailable(String),
}

/// A change to the ledger of one client id.
#[derive(Debug, Clone, Copy)]
pub enum LedgerChange<'a> {
    /// The broker has no session: forget every row.
    Forget,
    /// A SUBSCRIBE or UNSUBSCRIBE for these filters is about to be sent.
    Pending(&'a [String]),
    Granted(&'a [(String, u8)]),
    Refused(&'a [(String, String)]),
    Removed(&'a [String]),
}

/// The subscription ledger of the shared session. The leader's is a PostgreSQL table whose
/// writes are fenced; observers (their own clean sessions) use a [`MemoryLedger`].
pub trait SubscriptionLedger: Send + Sync {
    /// Every row of `client_id`: (filter, subscribed). `false` means "maybe subscribed".
    fn load<'a>(&'a self, client_id: &'a str) -> LedgerFuture<'a, Vec<(String, bool)>>;
    fn write<'a>(&'a self, client_id: &'a str, change: LedgerChange<'a>) -> LedgerFuture<'a, ()>;
}

/// A ledger that lives as long as the process: right for a clean session (the broker forgets
/// it on disconnect anyway) and for tests.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    rows: Mutex<BTreeMap<(String, String), bool>>,
}

impl SubscriptionLedger for MemoryLedger {
    fn load<'a>(&'a self, client_id: &'a str) -> LedgerFuture<'a, Vec<(String, bool)>> {
        let rows = self
            .rows
            .lock()
            .map(|r| {
                r.iter()
                    .filter(|((c, _), _)| c == client_id)
                    .map(|((_, f), s)| (f.clone(), *s))
                    .collect()
            })
            .unwrap_or_default();
        Box::pin(async move { Ok(rows) })
    }

    fn write<'a>(&'a self, client_id: &'a str, change: LedgerChange<'a>) -> LedgerFuture<'a, ()> {
        if let Ok(mut rows) = self.rows.lock() {
            let key = |f: &str| (client_id.to_string(), f.to_string());
            match change {
                LedgerChange::Forget => rows.retain(|(c, _), _| c != client_id),
                LedgerChange::Pending(fs) => {
                    for f in fs {
                        rows.insert(key(f), false);
                    }
                }
                LedgerChange::Granted(fs) => {
                    for (f, _) in fs {
                        rows.insert(key(f), true);
                    }
                }
                LedgerChange::Refused(fs) => {
                    for (f, _) in fs {
                        rows.insert(key(f), false);
                    }
                }
                LedgerChange::Removed(fs) => {
                    for f in fs {
                        rows.remove(&key(f));
                    }
                }
            }
        }
        Box::pin(async { Ok(()) })
    }
}

/// What the ledger task reports back to the ingest task.
#[derive(Debug)]
pub(crate) enum Reply {
    Loaded {
        conn: u64,
        rows: Vec<(String, bool)>,
    },
    IntentWritten(u64),
    Fenced,
}

/// Pauses between attempts: 200 ms doubling to 5 s.
const RETRY: Policy = Policy::new(Duration::from_millis(200), Duration::from_secs(5));
/// One attempt at a ledger call; retried, so it must not hang.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies `ops` in order, each until it succeeds (backoff between attempts), and answers on
/// `replies`. Ends when `ops` closes, or at once when the ledger says this node is fenced.
pub(crate) async fn run(
    ledger: Arc<dyn SubscriptionLedger>,
    client_id: String,
    mut ops: mpsc::UnboundedReceiver<LedgerOp>,
    replies: mpsc::UnboundedSender<Reply>,
) {
    while let Some(op) = ops.recv().await {
        let mut retry = Backoff::new(RETRY);
        loop {
            let error =
                match tokio::time::timeout(OP_TIMEOUT, apply(&*ledger, &client_id, &op)).await {
                    Ok(Ok(reply)) => {
                        if let Some(r) = reply {
                            let _ = replies.send(r);
                        }
                        break;
                    }
                    Ok(Err(LedgerError::Fenced)) => {
                        let _ = replies.send(Reply::Fenced);
                        return;
                    }
                    Ok(Err(LedgerError::Unavailable(e))) => e,
                    Err(_) => format!("no answer within {OP_TIMEOUT:?}"),
                };
            let r = retry.fail();
            tracing::warn!(%error, attempt = r.attempt, "subscription ledger write failed; retrying (subscription changes wait)");
            tokio::time::sleep(r.wait).await;
        }
    }
}

async fn apply(
    ledger: &dyn SubscriptionLedger,
    client_id: &str,
    op: &LedgerOp,
) -> Result<Option<Reply>, LedgerError> {
    let change = match op {
        LedgerOp::Load { conn, forget } => {
            let rows = if *forget {
                ledger.write(client_id, LedgerChange::Forget).await?;
                Vec::new()
            } else {
                ledger.load(client_id).await?
            };
            return Ok(Some(Reply::Loaded { conn: *conn, rows }));
        }
        LedgerOp::Intent { chunk, filters } => {
            ledger
                .write(client_id, LedgerChange::Pending(filters))
                .await?;
            return Ok(Some(Reply::IntentWritten(*chunk)));
        }
        LedgerOp::Granted(g) => LedgerChange::Granted(g),
        LedgerOp::Refused(r) => LedgerChange::Refused(r),
        LedgerOp::Removed(f) => LedgerChange::Removed(f),
    };
    ledger.write(client_id, change).await?;
    Ok(None)
}
