//! The writer of a leadership term: batches by count, bytes and time, one fenced statement per
//! batch, acks after commit, retries with backoff (nothing acknowledged meanwhile).
//!
//! A value PostgreSQL refuses (a number out of range, a trigger's exception, an index row too
//! large) fails a whole statement. Such a row error is isolated instead of retried: the failing
//! part is split in halves until the one message that causes it is found, and that message
//! becomes a dead letter carrying the database's words; the rest commits. Parts already
//! committed are not written again when a later part fails.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use leasehold_decode::Decoder;
use leasehold_ingest::{Acker, Inbound};
use leasehold_store::{BatchWriter, DeadLetter, Fence, Row, StoreError};
use leasehold_telemetry::events;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::batch::reason_label;
use crate::batch::{prepare, rejected, DbClock, Prepared};

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
    pub batch_max_bytes: usize,
    pub batch_max_wait: Duration,
    pub max_payload_bytes: usize,
    pub decoder: Decoder,
    pub redelivery_window: Duration,
    /// `MAX_PENDING`: how many messages a redelivery's first copy may precede it by.
    pub max_pending: usize,
    /// Server-side bound on a batch statement (a backstop: a cancelled write is also
    /// cancelled on the server).
    pub statement_timeout: Duration,
    /// The named routes, checked against the database at start (empty: only `telemetry`).
    pub routes: Vec<leasehold_store::routes::ResolvedRoute>,
}

pub struct Writer {
    pub cfg: WriterConfig,
    pub fence: Fence,
    pub rx: mpsc::Receiver<Inbound>,
    pub acker: Acker,
}

/// How often the writer reads the database's clock again.
const CLOCK_EVERY: Duration = Duration::from_secs(60);

/// One statement's worth of a batch. Split in halves while a row error is being isolated.
#[derive(Debug, Default)]
struct Part {
    rows: Vec<Row>,
    dead: Vec<DeadLetter>,
}

impl Part {
    fn len(&self) -> usize {
        self.rows.len() + self.dead.len()
    }

    /// Two non-empty parts (for a part of two or more), readings first, then dead letters.
    fn halves(mut self) -> (Part, Part) {
        let first = self.len().div_ceil(2);
        if first <= self.rows.len() {
            let rows = self.rows.split_off(first);
            let dead = std::mem::take(&mut self.dead);
            (self, Part { rows, dead })
        } else {
            let dead = self.dead.split_off(first - self.rows.len());
            (
                self,
                Part {
                    rows: Vec::new(),
                    dead,
                },
            )
        }
    }
}

/// What a batch came to, for its events.
#[derive(Debug, Default)]
struct Tally {
    inserted: u64,
    duplicates: u64,
    conflicts: u64,
    dead_lettered: u64,
}

enum Stop {
    Cancelled,
    Fenced(i64),
}

impl Writer {
    /// Runs until `cancel` (drop what is uncommitted) or until the ingest closes the channel
    /// (drain: commit and ack everything first).
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), WriterError> {
        let mut conn: Option<BatchWriter> = None;
        let mut clock: Option<DbClock> = None;
        let mut retry = Backoff::default();
        loop {
            let Some(batch) = self.gather(&cancel).await else {
                return Ok(());
            };
            // Receipt times are placed on the database's clock, read at the start of the term
            // and again every minute (a batch is prepared once, so its retries keep its times).
            let clock = loop {
                if let Some(c) = clock.as_mut() {
                    if c.measured_at().elapsed() >= CLOCK_EVERY {
                        if let Some(w) = conn.as_ref().filter(|w| !w.is_closed()) {
                            if let Ok((db, local)) = w.clock().await {
                                c.remeasure(db, local);
                            }
                        }
                    }
                    break c;
                }
                let measured = tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    r = async { self.connection(&mut conn).await?.clock().await } => r,
                };
                match measured {
                    Ok((db, local)) => clock = Some(DbClock::new(db, local)),
                    Err(e) => {
                        conn = None;
                        if !retry.wait(&e, &cancel).await {
                            return Ok(());
                        }
                    }
                }
            };
            let started = Instant::now();
            let prepared = prepare(&self.cfg.decoder, &batch, clock, self.cfg.max_payload_bytes);
            match self.commit(&mut conn, prepared, &cancel, &mut retry).await {
                Ok(tally) => {
                    events::BatchCommitted {
                        rows: batch.len(),
                        inserted: tally.inserted,
                        duplicates: tally.duplicates,
                        conflicts: tally.conflicts,
                        dead_lettered: tally.dead_lettered,
                        duration: started.elapsed(),
                    }
                    .emit();
                    events::MessagesCommitted {
                        waited: batch.iter().map(|m| m.received.elapsed()),
                    }
                    .emit();
                    self.acker.ack(batch);
                }
                Err(Stop::Cancelled) => return Ok(()),
                Err(Stop::Fenced(epoch)) => {
                    events::WriteFenced { epoch }.emit();
                    return Err(WriterError::Fenced(epoch));
                }
            }
        }
    }

    /// Commits every part of `prepared`, isolating row errors, retrying other errors.
    async fn commit(
        &self,
        conn: &mut Option<BatchWriter>,
        prepared: Prepared,
        cancel: &CancellationToken,
        retry: &mut Backoff,
    ) -> Result<Tally, Stop> {
        let mut tally = Tally {
            duplicates: prepared.redelivered,
            ..Tally::default()
        };
        let mut rounds = vec![Part {
            rows: prepared.rows,
            dead: prepared.dead,
        }];
        rounds.extend(prepared.later.into_iter().map(|rows| Part {
            rows,
            dead: Vec::new(),
        }));
        for round in rounds {
            self.commit_part(conn, round, &mut tally, cancel, retry)
                .await?;
        }
        Ok(tally)
    }

    /// Commits one part whose reading keys are unique, halving it around row errors.
    async fn commit_part(
        &self,
        conn: &mut Option<BatchWriter>,
        part: Part,
        tally: &mut Tally,
        cancel: &CancellationToken,
        retry: &mut Backoff,
    ) -> Result<(), Stop> {
        let mut work = VecDeque::from([part]);
        while let Some(part) = work.pop_front() {
            if part.len() == 0 {
                continue;
            }
            // The connection is made inside the race too: a connect can take its whole timeout.
            let mut stop = None;
            let res = tokio::select! {
                _ = cancel.cancelled() => None,
                r = async {
                    let w = self.connection(conn).await?;
                    stop = Some(w.cancel_handle());
                    w.write(&self.fence, &part.rows, &part.dead).await
                } => Some(r),
            };
            let Some(res) = res else {
                // The server would go on running the statement, holding the fence's share lock
                // and delaying the next leader's takeover.
                if let Some(stop) = stop {
                    tokio::spawn(async move {
                        if let Err(e) = stop.cancel().await {
                            tracing::debug!(error = %e, "could not cancel the running batch statement");
                        }
                    });
                }
                *conn = None;
                return Err(Stop::Cancelled);
            };
            match res {
                Ok(out) => {
                    retry.reset();
                    tally.inserted += out.inserted;
                    tally.dead_lettered += out.dead_lettered;
                    tally.duplicates += (out.duplicates.len() + out.redelivered.len()) as u64;
                    tally.conflicts += out.conflicts.len() as u64;
                    let skipped: std::collections::HashSet<usize> =
                        out.redelivered.iter().copied().collect();
                    for d in part.dead.iter().filter(|d| !skipped.contains(&d.idx)) {
                        events::DeadLettered {
                            topic: &d.topic,
                            reason: d.reason,
                            error: &d.error,
                        }
                        .emit();
                    }
                    for i in &out.conflicts {
                        if let Some(r) = part.rows.iter().find(|r| r.idx == *i) {
                            events::Conflict {
                                device_id: &r.device_id,
                                topic: &r.topic,
                                ts: r.ts,
                            }
                            .emit();
                        }
                    }
                }
                Err(StoreError::Fenced { epoch }) => return Err(Stop::Fenced(epoch)),
                Err(e) if e.is_row_error() && part.len() > 1 => {
                    let (a, b) = part.halves();
                    work.push_front(b);
                    work.push_front(a);
                }
                Err(e) if e.is_row_error() && part.rows.len() == 1 => {
                    let text = e.database_text();
                    let row = &part.rows[0];
                    events::RowRejected {
                        topic: &row.topic,
                        error: &text,
                    }
                    .emit();
                    work.push_front(Part {
                        rows: Vec::new(),
                        dead: vec![rejected(row, &text)],
                    });
                }
                Err(e) => {
                    // Connection, time, resources, or a dead letter itself refused (which
                    // `storable_text` and `bytea` should make impossible): retry, acknowledging
                    // nothing meanwhile.
                    *conn = None;
                    work.push_front(part);
                    if !retry.wait(&e, cancel).await {
                        return Err(Stop::Cancelled);
                    }
                }
            }
        }
        Ok(())
    }

    /// The writer's connection, made when there is none or it closed.
    async fn connection<'a>(
        &self,
        conn: &'a mut Option<BatchWriter>,
    ) -> Result<&'a mut BatchWriter, StoreError> {
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            *conn = Some(
                BatchWriter::connect(
                    &self.cfg.database_url,
                    self.cfg.instance_id.clone(),
                    self.cfg.statement_timeout,
                    self.cfg.redelivery_window,
                )
                .await?
                .with_redelivery_span(self.cfg.max_pending + 2048),
            );
        }
        conn.as_mut()
            .ok_or_else(|| StoreError::Pool("no writer connection".into()))
    }

    /// Up to `batch_max_rows` messages or `batch_max_bytes` of payload, until `batch_max_wait`
    /// after the first was received. `None` when cancelled or when the channel is closed and
    /// empty.
    async fn gather(&mut self, cancel: &CancellationToken) -> Option<Vec<Inbound>> {
        gather(
            &mut self.rx,
            Limits {
                rows: self.cfg.batch_max_rows,
                bytes: self.cfg.batch_max_bytes,
                wait: self.cfg.batch_max_wait,
            },
            cancel,
        )
        .await
    }
}

/// Exponential backoff with jitter for failed writes.
struct Backoff {
    attempt: u32,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            attempt: 0,
            next: Duration::from_millis(50),
        }
    }
}

impl Backoff {
    fn reset(&mut self) {
        *self = Backoff::default();
    }

    /// Reports `e` and waits; `false` when cancelled meanwhile.
    async fn wait(&mut self, e: &StoreError, cancel: &CancellationToken) -> bool {
        self.attempt += 1;
        let wait = self.next.mul_f64(0.5 + fastrand::f64() * 0.5);
        // The database's own words (message, SQLSTATE): "db error" alone tells an operator
        // nothing about a revoked grant or a trigger refusing a dead letter.
        events::WriteFailed {
            error: &e.database_text(),
            kind: e.kind(),
            attempt: self.attempt,
            retry_in_ms: wait.as_millis(),
        }
        .emit();
        self.next = (self.next * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

/// What closes a batch.
#[derive(Debug, Clone, Copy)]
struct Limits {
    rows: usize,
    bytes: usize,
    wait: Duration,
}

/// Waits for a first message, then takes more until `max` or until `wait` has passed since that
/// message was received. A message that queued while the previous batch was being written has
/// already waited; counting from its receipt keeps BATCH_MAX_WAIT the longest wait of any message.
async fn gather(
    rx: &mut mpsc::Receiver<Inbound>,
    limits: Limits,
    cancel: &CancellationToken,
) -> Option<Vec<Inbound>> {
    let first = tokio::select! {
        _ = cancel.cancelled() => return None,
        m = rx.recv() => m?,
    };
    let deadline = tokio::time::Instant::from_std(first.received + limits.wait);
    let mut bytes = first.payload.len();
    let mut batch = Vec::with_capacity(limits.rows.min(4096));
    batch.push(first);
    let full =
        |batch: &Vec<Inbound>, bytes: usize| batch.len() >= limits.rows || bytes >= limits.bytes;
    while !full(&batch, bytes) {
        // Take what is already queued without waking the timer.
        while !full(&batch, bytes) {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += m.payload.len();
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        if full(&batch, bytes) {
            break;
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep_until(deadline) => break,
            m = rx.recv() => match m {
                Some(m) => {
                    bytes += m.payload.len();
                    batch.push(m);
                }
                None => break,
            },
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(rows: usize, dead: usize) -> Part {
        let t = chrono::Utc::now();
        Part {
            rows: (0..rows)
                .map(|i| Row {
                    idx: i,
                    device_id: "d".into(),
                    topic: "t".into(),
                    ts: t,
                    payload: "{}".into(),
                    received_at: t,
                    content_hash: None,
                    pkid: 0,
                    dup: false,
                })
                .collect(),
            dead: (0..dead)
                .map(|i| DeadLetter {
                    idx: rows + i,
                    topic: "t".into(),
                    payload: Vec::new(),
                    size: 0,
                    reason: "not_json",
                    error: String::new(),
                    received_at: t,
                    pkid: 0,
                    dup: false,
                })
                .collect(),
        }
    }

    #[test]
    fn halving_always_makes_progress() {
        for rows in 0..6 {
            for dead in 0..6 {
                if rows + dead < 2 {
                    continue;
                }
                let (a, b) = part(rows, dead).halves();
                assert!(
                    a.len() > 0 && b.len() > 0,
                    "{rows}+{dead} -> {}+{}",
                    a.len(),
                    b.len()
                );
                assert_eq!(a.len() + b.len(), rows + dead);
                let mut idx: Vec<usize> = a
                    .rows
                    .iter()
                    .map(|r| r.idx)
                    .chain(a.dead.iter().map(|d| d.idx))
                    .chain(b.rows.iter().map(|r| r.idx))
                    .chain(b.dead.iter().map(|d| d.idx))
                    .collect();
                idx.sort_unstable();
                assert_eq!(idx, (0..rows + dead).collect::<Vec<_>>());
            }
        }
    }

    fn limits(rows: usize, wait: Duration) -> Limits {
        Limits {
            rows,
            bytes: usize::MAX,
            wait,
        }
    }

    #[tokio::test]
    async fn a_batch_closes_at_its_byte_limit() {
        let (tx, mut rx) = mpsc::channel(10);
        for _ in 0..5 {
            tx.try_send(Inbound::detached("devices/d/t", &[b' '; 400]))
                .expect("queued");
        }
        let l = Limits {
            rows: 1000,
            bytes: 1000,
            wait: Duration::from_secs(5),
        };
        let batch = gather(&mut rx, l, &CancellationToken::new())
            .await
            .expect("a batch");
        assert_eq!(
            batch.len(),
            3,
            "400 + 400 + 400 bytes reach the 1000-byte limit"
        );
    }

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
        let batch = gather(&mut rx, limits(1000, wait), &CancellationToken::new())
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
            limits(1000, Duration::from_secs(2)),
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
