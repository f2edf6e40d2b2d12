//! The lease holder, polled every 50 ms on its own connection while a trial runs, so that changes
//! the fault does not explain (flaps) are seen even when they come and go between checks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_testkit::LEASE_NAME;

/// Records every change of the lease holder while a trial runs.
pub(crate) struct LeaseWatch {
    changes: Arc<Mutex<Vec<(String, i64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseWatch {
    pub(crate) fn start(url: String) -> LeaseWatch {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let c = changes.clone();
        let task = tokio::spawn(async move {
            let mut client = None;
            let mut last: Option<(String, i64)> = None;
            loop {
                if client.is_none() {
                    client = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .ok()
                        .map(|(cl, conn)| {
                            tokio::spawn(conn);
                            cl
                        });
                }
                if let Some(cl) = &client {
                    // Every change of holder, live or expired: the lease row, not only a leader.
                    match leasehold_store::queries::lease(cl, LEASE_NAME).await {
                        Ok(Some(l)) => {
                            let now: (String, i64) = (l.holder_id, l.epoch);
                            if last.as_ref().is_some_and(|l| l.0 != now.0) {
                                if let Ok(mut v) = c.lock() {
                                    v.push(now.clone());
                                }
                            }
                            last = Some(now);
                        }
                        Ok(None) => {}
                        Err(_) => client = None,
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        LeaseWatch { changes, task }
    }

    pub(crate) fn stop(self) -> Vec<(String, i64)> {
        self.task.abort();
        self.changes.lock().map(|v| v.clone()).unwrap_or_default()
    }
}
