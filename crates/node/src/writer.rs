//! The writer of a leadership term: batches by count, bytes and time, one fenced statement per
//! batch, acks after commit, retries with backoff (nothing acknowledged meanwhile).
//!
//! A value PostgreSQL refuses (a number out of range, a trigger's exception, an index row too
//! large) fails a whole statement. Such a row error is isolated instead of retried: the failing
//! part is split in halves until the one message that causes it is found, and that message
//! becomes a dead letter carrying the database's words; the rest commits. Parts already
//! committed are not written again when a later part fails.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_decode::Decoder;
use leasehold_ingest::{Acker, Inbound};
use leasehold_store::routes::ResolvedRoute;
use leasehold_store::{BatchWriter, DeadLetter, Fence, RouteRow, StoreError};
use leasehold_telemetry::events;
use leasehold_telemetry::status::{NodeStatus, RouteCounts};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::batch::reason_label;
use crate::batch::{prepare, rejected, DbClock, Prepared, Routing};
use crate::cluster_config::ActiveRx;

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("fenced at epoch {0}: another node holds the lease")]
    Fenced(i64),
    /// A batch was committed locally but may not be on the synchronous standby: its messages
    /// are left unacknowledged (the term ends and the broker redelivers them; the redelivery
    /// is stored once).
    #[error("a commit was not replicated: {0}")]
    Unreplicated(String),
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
    pub routes: Vec<ResolvedRoute>,
    /// `REQUIRE_SYNC_REPLICATION`: ingest only while commits are synchronously replicated, and
    /// acknowledge a batch only once a synchronous standby has flushed WAL past it.
    pub require_sync_replication: bool,
}

pub struct Writer {
    pub cfg: WriterConfig,
    pub fence: Fence,
    pub rx: mpsc::Receiver<Inbound>,
    pub acker: Acker,
    /// Where the per-route counts, and an intake held for replication, are shown (`/health`).
    pub status: NodeStatus,
    /// The cluster configuration, followed between batches (`None`: fixed for the term).
    pub active: Option<ActiveRx>,
}

/// The writer's connection, and the routes its statement is prepared for (`telemetry` first).
struct Conn {
    writer: Option<BatchWriter>,
    routes: Arc<[ResolvedRoute]>,
}

/// How often the writer reads the database's clock again.
const CLOCK_EVERY: Duration = Duration::from_secs(60);

/// One statement's worth of a batch. Split in halves while a row error is being isolated.
#[derive(Debug, Default)]
struct Part {
    /// Each one message's row in one route, so isolation dead-letters only the failing row.
    rows: Vec<RouteRow>,
    dead: Vec<DeadLetter>,
}

impl Part {
    fn len(&self) -> usize {
        self.rows.len() + self.dead.len()
    }

    /// Two non-empty parts (for a part of two or more): rows, then dead letters, split at the
    /// middle.
    fn halves(mut self) -> (Part, Part) {
        let first = self.len().div_ceil(2);
        let mut second = Part::default();
        if first < self.rows.len() {
            second.rows = self.rows.split_off(first);
            second.dead = std::mem::take(&mut self.dead);
        } else {
            second.dead = self.dead.split_off(first - self.rows.len());
        }
        (self, second)
    }
}

/// A batch while it is committed.
struct Committing<'a> {
    routes: &'a [ResolvedRoute],
    /// `"update"` rows replaced by a later one of their key (see `Prepared::replaced`).
    replaced: HashMap<(usize, usize), RouteRow>,
    tally: Tally,
}

/// What a batch came to, for its events.
#[derive(Debug, Default)]
struct Tally {
    dead_lettered: u64,
    /// Per route (the term's order, `telemetry` first).
    routes: Vec<RouteTally>,
}

#[derive(Debug, Default, Clone, Copy)]
struct RouteTally {
    written: u64,
    duplicates: u64,
    conflicts: u64,
    dead_letters: u64,
}

impl Committing<'_> {
    /// Counts what a committed part did, and emits its dead letters' events.
    fn committed(&mut self, part: &Part, out: &leasehold_store::BatchOutcome) {
        let tally = &mut self.tally;
        tally.dead_lettered += out.dead_lettered;
        tally.routes[0].duplicates += out.redelivered.len() as u64;
        for d in part
            .dead
            .iter()
            .filter(|d| !out.redelivered.contains(&d.idx))
        {
            events::DeadLettered {
                topic: &d.topic,
                reason: d.reason,
                error: &d.error,
                route: d.route.as_deref().unwrap_or(events::DEFAULT_ROUTE),
            }
            .emit();
            // A message dead-lettered for several routes counts once, under its first.
            let first = d.route.as_deref().and_then(|r| r.split(',').next());
            if let Some(k) = self
                .routes
                .iter()
                .position(|r| Some(r.spec.name.as_str()) == first)
            {
                tally.routes[k].dead_letters += 1;
            }
        }
        for (k, (o, r)) in out.routes.iter().zip(self.routes).enumerate() {
            let t = &mut tally.routes[k];
            t.written += o.written;
            t.duplicates += o.duplicates.len() as u64;
            t.conflicts += o.conflicts.len() as u64;
            t.dead_letters += (o.conflicts.len() + o.unstored.len()) as u64;
            let dead = o
                .conflicts
                .iter()
                .map(|i| (i, "conflict", "a different row is stored for its key"))
                .chain(o.unstored.iter().map(|i| {
                    (
                        i,
                        "not_stored",
                        "the table neither took the row nor holds its key",
                    )
                }));
            for (i, reason, what) in dead {
                let topic = part
                    .rows
                    .iter()
                    .find(|x| x.idx == *i && x.route == k)
                    .map_or("", |x| x.message.topic.as_str());
                let error = if r.is_default() {
                    what.to_string()
                } else {
                    format!("route {}: {what}", r.spec.name)
                };
                events::DeadLettered {
                    topic,
                    reason,
                    error: &error,
                    route: &r.spec.name,
                }
                .emit();
            }
        }
    }

    /// The part that replaces a single row PostgreSQL refused: its dead letter, and for
    /// `"update"` the row of the same key it replaced in this batch, now the newest the table
    /// can take (counted when written, not as written over).
    fn refused(&mut self, row: &RouteRow, text: &str) -> Part {
        let route = &self.routes[row.route];
        events::RowRejected {
            topic: &row.message.topic,
            error: text,
        }
        .emit();
        let mut next = Part {
            dead: vec![rejected(row, route, text)],
            ..Part::default()
        };
        if let Some(earlier) = self.replaced.remove(&(row.route, row.idx)) {
            if let Some(t) = self.tally.routes.get_mut(row.route) {
                t.written = t.written.saturating_sub(1);
            }
            next.rows.push(earlier);
        }
        next
    }
}

enum Stop {
    Cancelled,
    Fenced(i64),
}

/// How long a commit's WAL may wait for the standby's flush report before intake is said to
/// be held (the report trails a commit by other sessions' WAL, usually by well under this).
const HOLD_AFTER: Duration = Duration::from_millis(500);
/// How often a held writer asks again whether replication is back.
const HOLD_POLL: Duration = Duration::from_millis(250);

impl Writer {
    /// Runs until `cancel` (drop what is uncommitted) or until the ingest closes the channel
    /// (drain: commit and ack everything first).
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), WriterError> {
        let res = self.run_term(cancel).await;
        // A hold belongs to this term's writer: the next term judges replication afresh.
        if let Some(why) = self.status.ingest_hold() {
            self.status.set_ingest_hold(None);
            events::IngestResumed {
                held: Duration::ZERO,
                why: &format!("the term ended while held ({why})"),
            }
            .emit();
        }
        res
    }

    async fn run_term(&mut self, cancel: CancellationToken) -> Result<(), WriterError> {
        let mut conn = Conn {
            writer: None,
            routes: std::iter::once(ResolvedRoute::telemetry())
                .chain(self.cfg.routes.iter().cloned())
                .collect(),
        };
        self.status
            .update_routes(|counts| show_routes(counts, &conn.routes[1..]));
        // Whether the last commit was confirmed on a synchronous standby (REQUIRE_SYNC_REPLICATION):
        // until then, each batch first waits for replication to be in place.
        let mut replicated = false;
        let mut clock: Option<DbClock> = None;
        let mut retry = Backoff::default();
        loop {
            let Some(batch) = self.gather(&cancel).await else {
                return Ok(());
            };
            self.follow(&mut conn);
            let Some(clock) = self.clock(&mut conn, &mut clock, &cancel, &mut retry).await else {
                return Ok(());
            };
            if self.cfg.require_sync_replication && !replicated {
                if !self.until_replicated(&mut conn, &cancel, &mut retry).await {
                    return Ok(());
                }
                replicated = true;
            }
            let started = Instant::now();
            let routes = conn.routes.clone();
            let prepared = prepare(
                &self.cfg.decoder,
                &batch,
                clock,
                self.cfg.max_payload_bytes,
                Routing {
                    routes: &routes,
                    written_by: &self.cfg.instance_id,
                    lease_epoch: self.fence.epoch,
                },
            );
            match self
                .commit(&mut conn, prepared, &routes, &cancel, &mut retry)
                .await
            {
                Ok(tally) => {
                    self.route_events(&routes, &tally);
                    events::BatchCommitted {
                        rows: batch.len(),
                        dead_lettered: tally.dead_lettered,
                        duration: started.elapsed(),
                    }
                    .emit();
                    let now = Instant::now();
                    events::MessagesCommitted {
                        waited: batch
                            .iter()
                            .map(|m| now.saturating_duration_since(m.received)),
                    }
                    .emit();
                    if !self.after_commit(&mut conn, &cancel).await? {
                        return Ok(());
                    }
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

    /// Receipt times are placed on the database's clock, read at the start of the term and
    /// again every minute (a batch is prepared once, so its retries keep its times). `None` when
    /// cancelled.
    async fn clock<'c>(
        &self,
        conn: &mut Conn,
        clock: &'c mut Option<DbClock>,
        cancel: &CancellationToken,
        retry: &mut Backoff,
    ) -> Option<&'c mut DbClock> {
        loop {
            if let Some(c) = clock {
                if c.measured_at().elapsed() >= CLOCK_EVERY {
                    if let Some(w) = conn.writer.as_ref().filter(|w| !w.is_closed()) {
                        if let Ok((db, local)) = w.clock().await {
                            c.remeasure(db, local);
                        }
                    }
                }
                return clock.as_mut();
            }
            let measured = tokio::select! {
                _ = cancel.cancelled() => return None,
                r = async { self.connection(conn).await?.clock().await } => r,
            };
            match measured {
                Ok((db, local)) => *clock = Some(DbClock::new(db, local)),
                Err(e) => {
                    conn.writer = None;
                    if !retry.wait(&e, cancel).await {
                        return None;
                    }
                }
            }
        }
    }

    /// After a batch committed: whether it may be acknowledged. A commit the server says it
    /// made locally but did not replicate ends the term unacknowledged; with
    /// REQUIRE_SYNC_REPLICATION, waits for a synchronous standby's flush past it. `Ok(false)`
    /// when cancelled meanwhile.
    async fn after_commit(
        &self,
        conn: &mut Conn,
        cancel: &CancellationToken,
    ) -> Result<bool, WriterError> {
        let unreplicated = |why: String| {
            events::CommitUnreplicated {
                why: &why,
                redelivered: true,
            }
            .emit();
            WriterError::Unreplicated(why)
        };
        if let Some(why) = conn.writer.as_mut().and_then(|w| w.unreplicated_commit()) {
            return Err(unreplicated(why));
        }
        if !self.cfg.require_sync_replication {
            return Ok(true);
        }
        self.confirm(conn, cancel)
            .await
            .map_err(|e| unreplicated(format!("could not confirm the commit on a standby: {e}")))
    }

    /// Before a term's first commit, and after the writer's connection changed: waits until the
    /// database's commits are synchronously replicated (intake held meanwhile: the ingest's
    /// pending limit stops it, and the broker keeps the rest). False when cancelled.
    async fn until_replicated(
        &self,
        conn: &mut Conn,
        cancel: &CancellationToken,
        retry: &mut Backoff,
    ) -> bool {
        let held_since = Instant::now();
        loop {
            let read = tokio::select! {
                _ = cancel.cancelled() => return false,
                r = async { self.connection(conn).await?.replication().await } => r,
            };
            match read {
                Ok(s) => match s.why_not() {
                    None => {
                        self.release_hold(held_since);
                        return true;
                    }
                    Some(why) => {
                        self.hold(&why);
                        tokio::select! {
                            _ = cancel.cancelled() => return false,
                            _ = tokio::time::sleep(HOLD_POLL) => {}
                        }
                    }
                },
                Err(e) => {
                    conn.writer = None;
                    if !retry.wait(&e, cancel).await {
                        return false;
                    }
                }
            }
        }
    }

    /// After a commit (REQUIRE_SYNC_REPLICATION): waits until a synchronous standby has flushed
    /// WAL past it, holding intake and acknowledgements meanwhile however long that takes.
    /// `Ok(false)` when cancelled; an error when the connection cannot tell (the caller leaves
    /// the batch unacknowledged).
    async fn confirm(&self, conn: &Conn, cancel: &CancellationToken) -> Result<bool, StoreError> {
        let w = conn
            .writer
            .as_ref()
            .ok_or_else(|| StoreError::Pool("no writer connection".into()))?;
        let (lsn, flushed) = w.after_commit().await?;
        if flushed {
            return Ok(true);
        }
        let started = Instant::now();
        let mut held = false;
        loop {
            let pause = if held {
                HOLD_POLL
            } else {
                Duration::from_millis(5)
            };
            tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                _ = tokio::time::sleep(pause) => {}
            }
            if w.flushed_past(lsn).await? {
                if held {
                    self.release_hold(started);
                }
                return Ok(true);
            }
            if !held && started.elapsed() >= HOLD_AFTER {
                let why = w
                    .replication()
                    .await
                    .ok()
                    .and_then(|s| s.why_not())
                    .unwrap_or_else(|| {
                        "no synchronous standby has flushed the last commit yet".into()
                    });
                events::CommitUnreplicated {
                    why: &why,
                    redelivered: false,
                }
                .emit();
                self.hold(&why);
                held = true;
            }
        }
    }

    /// Says (once per hold) that intake is held and why.
    fn hold(&self, why: &str) {
        let text = format!("commits are not synchronously replicated: {why}");
        if self.status.ingest_hold().as_deref() != Some(text.as_str()) {
            self.status.set_ingest_hold(Some(text));
            events::IngestHeld { reason: why }.emit();
        }
    }

    fn release_hold(&self, since: Instant) {
        if self.status.ingest_hold().is_some() {
            self.status.set_ingest_hold(None);
            events::IngestResumed {
                held: since.elapsed(),
                why: "commits are synchronously replicated again",
            }
            .emit();
        }
    }

    /// Commits every part of `prepared`, isolating row errors, retrying other errors.
    async fn commit(
        &self,
        conn: &mut Conn,
        prepared: Prepared,
        routes: &[ResolvedRoute],
        cancel: &CancellationToken,
        retry: &mut Backoff,
    ) -> Result<Tally, Stop> {
        let mut tally = Tally {
            routes: prepared
                .superseded
                .iter()
                .map(|&n| RouteTally {
                    written: n,
                    ..RouteTally::default()
                })
                .collect(),
            ..Tally::default()
        };
        tally.routes.resize(routes.len(), RouteTally::default());
        // Redeliveries of a message earlier in the batch: duplicates of their route (the
        // default one's when the batch alone cannot tell).
        tally.routes[0].duplicates += prepared.redelivered;
        let mut batch = Committing {
            routes,
            replaced: prepared.replaced,
            tally,
        };
        let first = Part {
            rows: prepared.rows,
            dead: prepared.dead,
        };
        let later = prepared.later.into_iter().map(|rows| Part {
            rows,
            dead: Vec::new(),
        });
        for part in std::iter::once(first).chain(later) {
            self.commit_part(conn, part, &mut batch, cancel, retry)
                .await?;
        }
        Ok(batch.tally)
    }

    /// The events and typed counts of a committed batch's routes.
    fn route_events(&self, routes: &[ResolvedRoute], tally: &Tally) {
        for (r, t) in routes.iter().zip(&tally.routes) {
            events::RouteCommitted {
                route: &r.spec.name,
                written: t.written,
                duplicates: t.duplicates,
                conflicts: t.conflicts,
            }
            .emit();
        }
        if routes.len() > 1 {
            self.status.update_routes(|counts| {
                show_routes(counts, &routes[1..]);
                for (c, t) in counts.iter_mut().zip(&tally.routes[1..]) {
                    c.written += t.written;
                    c.duplicates += t.duplicates;
                    c.conflicts += t.conflicts;
                    c.dead_letters += t.dead_letters;
                }
            });
        }
    }

    /// Commits one part whose keys are unique per route, halving it around row errors.
    async fn commit_part(
        &self,
        conn: &mut Conn,
        part: Part,
        batch: &mut Committing<'_>,
        cancel: &CancellationToken,
        retry: &mut Backoff,
    ) -> Result<(), Stop> {
        let mut work = VecDeque::from([part]);
        while let Some(part) = work.pop_front() {
            if part.len() == 0 {
                continue;
            }
            let res = self.write_part(conn, &part, cancel).await?;
            match res {
                Ok(out) => {
                    retry.reset();
                    batch.committed(&part, &out);
                }
                Err(StoreError::Fenced { epoch }) => return Err(Stop::Fenced(epoch)),
                Err(e) if e.is_row_error() && part.len() > 1 => {
                    let (a, b) = part.halves();
                    work.push_front(b);
                    work.push_front(a);
                }
                Err(e) if e.is_row_error() && part.rows.len() == 1 => {
                    work.push_front(batch.refused(&part.rows[0], &e.database_text()));
                }
                Err(e) => {
                    // Connection, time, resources, or a dead letter itself refused (which
                    // `storable_text` and `bytea` should make impossible): retry, acknowledging
                    // nothing meanwhile.
                    conn.writer = None;
                    work.push_front(part);
                    if !retry.wait(&e, cancel).await {
                        return Err(Stop::Cancelled);
                    }
                }
            }
        }
        Ok(())
    }

    /// One statement for `part`, raced against `cancel` (the connection is made inside the
    /// race too: a connect can take its whole timeout). A cancelled statement is cancelled on
    /// the server too: it would go on holding the fence's share lock, delaying the next
    /// leader's takeover.
    async fn write_part(
        &self,
        conn: &mut Conn,
        part: &Part,
        cancel: &CancellationToken,
    ) -> Result<Result<leasehold_store::BatchOutcome, StoreError>, Stop> {
        let mut stop = None;
        let res = tokio::select! {
            _ = cancel.cancelled() => None,
            r = async {
                let w = self.connection(conn).await?;
                stop = Some(w.cancel_handle());
                w.write(&self.fence, &part.rows, &part.dead).await
            } => Some(r),
        };
        match res {
            Some(r) => Ok(r),
            None => {
                if let Some(stop) = stop {
                    tokio::spawn(async move {
                        if let Err(e) = stop.cancel().await {
                            tracing::debug!(error = %e, "could not cancel the running batch statement");
                        }
                    });
                }
                conn.writer = None;
                Err(Stop::Cancelled)
            }
        }
    }

    /// The writer's connection, made when there is none or it closed, with the named routes'
    /// statement prepared (`connect` prepares `telemetry`'s alone).
    async fn connection<'a>(&self, conn: &'a mut Conn) -> Result<&'a mut BatchWriter, StoreError> {
        if conn.writer.as_ref().is_none_or(|c| c.is_closed()) {
            conn.writer = None;
            let mut w = BatchWriter::connect(
                &self.cfg.database_url,
                self.cfg.instance_id.clone(),
                self.cfg.statement_timeout,
                self.cfg.redelivery_window,
            )
            .await?
            .with_redelivery_span(self.cfg.max_pending + 2048);
            if conn.routes.len() > 1 {
                w.use_routes(conn.routes.clone()).await?;
            }
            conn.writer = Some(w);
        }
        conn.writer
            .as_mut()
            .ok_or_else(|| StoreError::Pool("no writer connection".into()))
    }

    /// Between batches: a new cluster configuration's limits, decoding and routes. The
    /// connection is made again, so its statement is prepared for the new routes.
    fn follow(&mut self, conn: &mut Conn) {
        let Some(rx) = self.active.as_mut() else {
            return;
        };
        if !rx.has_changed().unwrap_or(false) {
            return;
        }
        let a = rx.borrow_and_update().clone();
        let (c, w) = (&a.cfg, &mut self.cfg);
        w.batch_max_rows = c.batch_max_rows;
        w.batch_max_bytes = c.batch_max_bytes;
        w.batch_max_wait = c.batch_max_wait;
        w.redelivery_window = c.redelivery_window;
        // MAX_PAYLOAD_BYTES is the term's: a new value starts a new term (the supervisor).
        w.decoder = Decoder::new(&c.device_topic_pattern, w.max_payload_bytes);
        w.routes = a.routes.clone();
        conn.routes = std::iter::once(ResolvedRoute::telemetry())
            .chain(a.routes.iter().cloned())
            .collect();
        conn.writer = None;
        self.status
            .update_routes(|counts| show_routes(counts, &conn.routes[1..]));
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

/// Lists `routes` in the typed status (counts kept from an earlier term of this node).
fn show_routes(counts: &mut Vec<RouteCounts>, routes: &[ResolvedRoute]) {
    if counts.len() != routes.len()
        || counts
            .iter()
            .zip(routes)
            .any(|(c, r)| c.name != r.spec.name)
    {
        *counts = routes
            .iter()
            .map(|r| RouteCounts {
                name: r.spec.name.clone(),
                table: format!("{}.{}", r.schema, r.table),
                ..RouteCounts::default()
            })
            .collect();
    }
}

/// Failed writes back off by the one retry policy (50 ms doubling to 5 s).
struct Backoff(leasehold_retry::Backoff);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(leasehold_retry::Backoff::new(leasehold_retry::Policy::new(
            Duration::from_millis(50),
            Duration::from_secs(5),
        )))
    }
}

impl Backoff {
    fn reset(&mut self) {
        self.0.reset();
    }

    /// Reports `e` in the database's own words (message, SQLSTATE: "db error" alone tells an
    /// operator nothing about a revoked grant) and waits; `false` when cancelled meanwhile.
    async fn wait(&mut self, e: &StoreError, cancel: &CancellationToken) -> bool {
        let report = |r: leasehold_retry::Retry| {
            events::WriteFailed {
                error: &e.database_text(),
                kind: e.kind(),
                attempt: r.attempt,
                retry_in_ms: r.wait.as_millis(),
            }
            .emit()
        };
        self.0.wait(report, cancel).await
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
        let message = Arc::new(leasehold_store::Message {
            topic: "t".into(),
            payload: Default::default(),
            received_at: t,
            pkid: 0,
            dup: false,
            content_hash: None,
        });
        Part {
            rows: (0..rows)
                .map(|i| RouteRow {
                    idx: i,
                    route: i % 2,
                    values: Vec::new(),
                    message: message.clone(),
                })
                .collect(),
            dead: (0..dead)
                .map(|i| DeadLetter {
                    idx: rows + i,
                    topic: "t".into(),
                    payload: Default::default(),
                    size: 0,
                    reason: "not_json",
                    error: String::new(),
                    received_at: t,
                    pkid: 0,
                    dup: false,
                    route: None,
                })
                .collect(),
        }
    }

    #[test]
    fn halving_always_makes_progress() {
        for rows in 0..8 {
            for dead in 0..8 {
                let n = rows + dead;
                if n < 2 {
                    continue;
                }
                let (a, b) = part(rows, dead).halves();
                assert!(
                    a.len() > 0 && b.len() > 0,
                    "{rows}+{dead} -> {}+{}",
                    a.len(),
                    b.len()
                );
                assert_eq!(a.len() + b.len(), n);
                let mut idx: Vec<usize> = [&a, &b]
                    .iter()
                    .flat_map(|p| {
                        p.rows
                            .iter()
                            .map(|r| r.idx)
                            .chain(p.dead.iter().map(|d| d.idx))
                    })
                    .collect();
                idx.sort_unstable();
                assert_eq!(idx, (0..n).collect::<Vec<_>>());
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
