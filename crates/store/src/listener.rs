//! One LISTEN connection per node, fanned out to whoever cares (lease, topic reloads, step-down).

use std::time::Duration;

use futures_util::{stream, StreamExt};
use leasehold_retry::{Backoff, Policy, Retry};
use tokio::sync::broadcast;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::op::Op;
use crate::queries::{CONTROL_CHANNEL, DEVICES_CHANNEL, LEASE_CHANNEL};

/// A notification, or [`Notice::Resync`] after the LISTEN connection was re-established
/// (notifications may have been missed; consumers re-read their state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Notify { channel: String, payload: String },
    Resync,
}

/// Reconnects: 200 ms doubling to 5 s, not randomised (one connection per node).
const RECONNECT: Policy =
    Policy::new(Duration::from_millis(200), Duration::from_secs(5)).jitter(0.0);

pub struct Listener {
    url: String,
    tx: broadcast::Sender<Notice>,
}

impl Listener {
    pub fn new(url: String) -> Self {
        let (tx, _) = broadcast::channel(256);
        Listener { url, tx }
    }

    /// The fan-out sender; subscribe through it, even after `run` took the listener.
    pub fn sender(&self) -> broadcast::Sender<Notice> {
        self.tx.clone()
    }

    /// Listens until cancelled, reconnecting with capped backoff.
    pub async fn run(self, cancel: CancellationToken) -> crate::Result<()> {
        let mut retry = Backoff::new(RECONNECT);
        let mut first = true;
        while !cancel.is_cancelled() {
            let Err(e) = self.listen_once(&cancel, first).await else {
                return Ok(());
            };
            first = false;
            let report = |r: Retry| tracing::warn!(error = %e, retry_in_ms = r.wait.as_millis() as u64, "LISTEN connection lost; reconnecting");
            if !retry.wait(report, &cancel).await {
                break;
            }
        }
        Ok(())
    }

    async fn listen_once(&self, cancel: &CancellationToken, first: bool) -> crate::Result<()> {
        let (cfg, tls) = crate::pg_config(&self.url, "leasehold-listen")?;
        let (client, mut conn) = crate::connect_hosts(&cfg, &tls).await?;
        // A driver task owns the connection so queries below can be awaited while it is polled.
        let (mtx, mut mrx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        if mtx.send(Ok(n)).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = mtx.send(Err(e));
                        break;
                    }
                }
            }
        });
        let listen = format!(
            "LISTEN {LEASE_CHANNEL}; LISTEN {DEVICES_CHANNEL}; LISTEN {CONTROL_CHANNEL}; LISTEN {};",
            crate::config::CONFIG_CHANNEL
        );
        crate::op::batch(&client, Op::Listen, &listen).await?;
        tracing::info!(
            reconnect = !first,
            "listening for lease, device, control and configuration notifications"
        );
        if !first {
            let _ = self.tx.send(Notice::Resync);
        }
        // A cheap query now and then detects a dead connection that TCP would not report.
        let mut ping = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = ping.tick() => {
                    tokio::time::timeout(Duration::from_secs(5), crate::queries::ping(&client))
                        .await
                        .map_err(|_| crate::StoreError::Timeout(Duration::from_secs(5)))??;
                }
                m = mrx.recv() => match m {
                    Some(Ok(n)) => {
                        tracing::debug!(channel = n.channel(), payload = n.payload(), "notification");
                        let _ = self.tx.send(Notice::Notify {
                            channel: n.channel().to_string(),
                            payload: n.payload().to_string(),
                        });
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(crate::StoreError::Pool("LISTEN connection closed".into())),
                }
            }
        }
    }
}
