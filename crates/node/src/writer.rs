//! The writer of a leadership term: batches by size and time, one fenced transaction per batch,
//! acks after commit, retries with backoff (nothing acknowledged meanwhile).

use std::time::{Duration, Instant};

use leasehold_decode::{DecodeError, Decoder};
use leasehold_ingest::{Acker, Inbound};
use leasehold_store::{BatchWriter, DeadLetter, Fence, Row, StoreError};
use leasehold_telemetry::{events, metrics};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("fenced at epoch {0}: another node holds the lease")]
    Fenced(i64),
}

// No Debug: the URL holds the password.
#[derive(Clone)]
pub struct WriterConfig {
    pub database_url: String,
    pub instance_id: String,
    pub batch_max_rows: usize,
    pub batch_max_wait: Duration,
    pub decoder: Decoder,
}

pub struct Writer {
    pub cfg: WriterConfig,
    pub fence: Fence,
    pub rx: mpsc::Receiver<Inbound>,
    pub acker: Acker,
}

/// The label of a dead-letter reason in metrics.
pub fn reason_label(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::TooLarge { .. } => "too_large",
        DecodeError::NotJson(_) => "not_json",
        DecodeError::NotObject(_) => "not_object",
        DecodeError::NulEscape => "nul_escape",
        DecodeError::NoDeviceId { .. } => "no_device_id",
        DecodeError::DeviceIdTooLong => "device_id_too_long",
        DecodeError::BadTimestamp { .. } => "bad_timestamp",
    }
}

/// Splits a batch into rows and dead letters (with their metric labels).
pub fn decode_batch(
    decoder: &Decoder,
    batch: &[Inbound],
) -> (Vec<Row>, Vec<DeadLetter>, Vec<&'static str>) {
    let mut rows = Vec::with_capacity(batch.len());
    let mut dead = Vec::new();
    let mut reasons = Vec::new();
    for m in batch {
        match decoder.decode(&m.topic, &m.payload, m.received_at) {
            Ok(reading) => rows.push(Row {
                reading,
                topic: m.topic.clone(),
                received_at: m.received_at,
            }),
            Err(e) => {
                reasons.push(reason_label(&e));
                dead.push(DeadLetter {
                    topic: m.topic.clone(),
                    payload: m.payload.to_vec(),
                    error: e.to_string(),
                    received_at: m.received_at,
                });
            }
        }
    }
    (rows, dead, reasons)
}

impl Writer {
    /// Runs until `cancel` (drop what is uncommitted) or until the ingest closes the channel
    /// (drain: commit and ack everything first).
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), WriterError> {
        let mut conn: Option<BatchWriter> = None;
        loop {
            let Some(batch) = self.gather(&cancel).await else {
                return Ok(());
            };
            let (rows, dead, reasons) = decode_batch(&self.cfg.decoder, &batch);
            let mut attempt = 0u32;
            let mut backoff = Duration::from_millis(50);
            loop {
                if cancel.is_cancelled() {
                    return Ok(());
                }
                let started = Instant::now();
                let res = tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    r = write_once(&mut conn, &self.cfg, &self.fence, &rows, &dead) => r,
                };
                match res {
                    Ok(out) => {
                        let took = started.elapsed();
                        events::BatchCommitted {
                            rows: batch.len(),
                            inserted: out.inserted,
                            duplicates: out.duplicates,
                            dead_lettered: out.dead_lettered,
                            duration: took,
                        }
                        .emit();
                        for (d, reason) in dead.iter().zip(&reasons) {
                            events::DeadLettered {
                                topic: &d.topic,
                                reason,
                                error: &d.error,
                            }
                            .emit();
                        }
                        let lat = &metrics().ingest_latency;
                        for m in &batch {
                            lat.observe(m.received.elapsed().as_secs_f64());
                        }
                        self.acker.ack(batch);
                        break;
                    }
                    Err(StoreError::Fenced { epoch }) => {
                        events::WriteFenced { epoch }.emit();
                        return Err(WriterError::Fenced(epoch));
                    }
                    Err(e) => {
                        conn = None;
                        attempt += 1;
                        let wait = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
                        events::WriteFailed {
                            error: &e,
                            kind: e.kind(),
                            attempt,
                            retry_in_ms: wait.as_millis(),
                        }
                        .emit();
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        tokio::select! {
                            _ = cancel.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
    }

    /// Up to `batch_max_rows` messages, until `batch_max_wait` after the first was received.
    /// `None` when cancelled or when the channel is closed and empty.
    async fn gather(&mut self, cancel: &CancellationToken) -> Option<Vec<Inbound>> {
        gather(
            &mut self.rx,
            self.cfg.batch_max_rows,
            self.cfg.batch_max_wait,
            cancel,
        )
        .await
    }
}

/// Waits for a first message, then takes more until `max` or until `wait` has passed since that
/// message was received. A message that queued while the previous batch was being written has
/// already waited; counting from its receipt keeps BATCH_MAX_WAIT the longest wait of any message.
async fn gather(
    rx: &mut mpsc::Receiver<Inbound>,
    max: usize,
    wait: Duration,
    cancel: &CancellationToken,
) -> Option<Vec<Inbound>> {
    let first = tokio::select! {
        _ = cancel.cancelled() => return None,
        m = rx.recv() => m?,
    };
    let deadline = tokio::time::Instant::from_std(first.received + wait);
    let mut batch = Vec::with_capacity(max.min(4096));
    batch.push(first);
    while batch.len() < max {
        // Take what is already queued without waking the timer.
        while batch.len() < max {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if batch.len() >= max {
            break;
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep_until(deadline) => break,
            m = rx.recv() => match m {
                Some(m) => batch.push(m),
                None => break,
            },
        }
    }
    Some(batch)
}

async fn write_once(
    conn: &mut Option<BatchWriter>,
    cfg: &WriterConfig,
    fence: &Fence,
    rows: &[Row],
    dead: &[DeadLetter],
) -> Result<leasehold_store::BatchOutcome, StoreError> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        let client = leasehold_store::connect(&cfg.database_url, "leasehold-writer").await?;
        // A backstop: the lease deadline cancels a hung write long before this.
        client
            .batch_execute("SET statement_timeout = '60s'")
            .await?;
        *conn = Some(BatchWriter::new(client, cfg.instance_id.clone()).await?);
    }
    match conn.as_mut() {
        Some(w) => w.write(fence, rows, dead).await,
        None => Err(StoreError::Pool("no writer connection".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(waited: Duration) -> Inbound {
        let mut m = Inbound::detached("devices/d/telemetry", b"{}");
        m.received -= waited;
        m
    }

    #[tokio::test]
    async fn a_message_that_already_waited_closes_its_batch_at_once() {
        // Queued while the previous batch was written: it has waited its BATCH_MAX_WAIT already.
        let wait = Duration::from_secs(3);
        let (tx, mut rx) = mpsc::channel(10);
        tx.try_send(message(wait)).expect("queued");
        let start = Instant::now();
        let batch = gather(&mut rx, 1000, wait, &CancellationToken::new())
            .await
            .expect("a batch");
        assert_eq!(batch.len(), 1);
        assert!(
            start.elapsed() < wait / 2,
            "the batch was held {:?} more after its message had waited {wait:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn a_batch_takes_what_arrives_within_the_wait_of_its_first_message() {
        let (tx, mut rx) = mpsc::channel(10);
        tx.try_send(message(Duration::ZERO)).expect("queued");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(message(Duration::ZERO)).await;
        });
        let batch = gather(
            &mut rx,
            1000,
            Duration::from_secs(2),
            &CancellationToken::new(),
        )
        .await
        .expect("a batch");
        assert_eq!(
            batch.len(),
            2,
            "the batch closed before its first message's wait"
        );
    }
}
