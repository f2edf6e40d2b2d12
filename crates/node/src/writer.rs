//! The writer of a leadership term: batches by count, bytes and time, one fenced statement per
//! batch, acks after commit, retries with backoff (nothing acknowledged meanwhile).
//!
//! A value PostgreSQL refuses (a number out of range, a trigger's exception, an index row too
//! large) fails a whole statement. Such a row error is isolated instead of retried: the failing
//! part is split in halves until the one message that causes it is found, and that message
//! becomes a dead letter carrying the database's words; the rest commits. Parts already
//! committed are not written again when a later part fails.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use leasehold_config::Format;
use leasehold_decode::sparkplug::{self, Change, Happened, Host, NodeChange, NodeKey};
use leasehold_decode::Decoder;
use leasehold_ingest::{Acker, Inbound, Inbox, Publisher};
use leasehold_store::routes::{ResolvedRoute, RouteProblem};
use leasehold_store::{BatchWriter, DeadLetter, Fence, RouteRow, StoreError};
use leasehold_telemetry::events;
use leasehold_telemetry::status::{NodeStatus, RouteCounts};
use tokio_util::sync::CancellationToken;

pub use crate::batch::reason_label;
use crate::batch::{
    prepare_with, rejected, statement_routes, unavailable, with_telemetry, DbClock, Prepared,
    Routing,
};
use crate::cluster_config::ActiveRx;
use crate::routes_cmd::problems_of;

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
    /// Per named route: why it starts suspended (its table did not fit the catalog), or `None`.
    pub suspended: Vec<Option<String>>,
    /// `REQUIRE_SYNC_REPLICATION`: ingest only while commits are synchronously replicated, and
    /// acknowledge a batch only once a synchronous standby has flushed WAL past it.
    pub require_sync_replication: bool,
    /// The Sparkplug B host id the session's STATE is published under (shown in `/health`).
    pub sparkplug_host_id: Option<String>,
}

pub struct Writer {
    pub cfg: WriterConfig,
    pub fence: Fence,
    pub rx: Inbox,
    pub acker: Acker,
    /// Where the per-route counts, and an intake held for replication, are shown (`/health`).
    pub status: NodeStatus,
    /// The cluster configuration, followed between batches (`None`: fixed for the term).
    pub active: Option<ActiveRx>,
    /// Where Sparkplug B rebirth requests go (the term's connection); `None`: nowhere.
    pub publisher: Option<Publisher>,
}

/// How often one edge node is asked to rebirth, at most: its messages keep arriving meanwhile
/// (each a reason to ask), and its births take a moment to come.
const REBIRTH_EVERY: Duration = Duration::from_secs(5);

/// A term's Sparkplug B host: loaded from the database the first time a batch holds a
/// `sparkplug_b` message, then kept by this writer alone.
#[derive(Default)]
struct Sparkplug {
    host: Option<Host>,
    /// When each edge node was last asked to rebirth (forgotten at its NBIRTH), and its asks
    /// of the last [`REBIRTH_STORM`].
    asked: HashMap<NodeKey, Instant>,
    recent: HashMap<NodeKey, VecDeque<Instant>>,
}

/// An edge node asked this many times within [`REBIRTH_STORM`] is asked no more until the
/// window passes: its births are read, but its data keeps failing (a birth too large, an alias
/// its births never define), and asking again changes nothing.
const REBIRTH_STORM_ASKS: usize = 5;
const REBIRTH_STORM: Duration = Duration::from_secs(60);

/// The writer's connection, the routes batches are prepared for (`telemetry` first), and which of
/// them are suspended.
struct Conn {
    writer: Option<BatchWriter>,
    /// Every route of the configuration, `telemetry` first: rows name a route by its place here.
    routes: Arc<[ResolvedRoute]>,
    /// Per route of `routes`: its suspension, if its table cannot be written now.
    suspended: Vec<Option<Suspension>>,
    /// The routes the statement writes (those not suspended), and each route's place among them.
    stmt: Arc<[ResolvedRoute]>,
    to_stmt: Vec<Option<usize>>,
    /// When each route's table was last checked after a row error (at most every [`RECHECK`]).
    row_checked: HashMap<usize, Instant>,
    /// Whether this term has checked its routes' tables (and so vouches for its suspensions),
    /// and when to try again if it could not.
    checked: bool,
    check_again_at: Instant,
}

/// A route whose table cannot be written now: its rows become `route_unavailable` dead letters
/// until a check of the catalog finds it fits again.
#[derive(Debug, Clone)]
struct Suspension {
    why: String,
    since: Instant,
    check_at: Instant,
}

/// How often a suspended route's table is checked again.
const RECHECK: Duration = Duration::from_secs(5);

impl Conn {
    /// How long a batch may wait for its first message: while a route is suspended, its table
    /// is checked on time even without messages.
    fn idle(&self) -> Option<Duration> {
        self.suspended
            .iter()
            .any(Option::is_some)
            .then_some(RECHECK)
    }

    fn new(routes: Arc<[ResolvedRoute]>, suspended: Vec<Option<Suspension>>) -> Conn {
        let mut c = Conn {
            writer: None,
            suspended,
            stmt: routes.clone(),
            to_stmt: Vec::new(),
            row_checked: HashMap::new(),
            checked: false,
            check_again_at: Instant::now(),
            routes,
        };
        c.suspended.resize(c.routes.len(), None);
        c.rebuild();
        c
    }

    /// The statement's routes after a suspension or a resumption; the connection is made again,
    /// so its statement is prepared for them.
    fn rebuild(&mut self) {
        let (stmt, to_stmt) = statement_routes(&self.routes, &self.suspended);
        (self.stmt, self.to_stmt) = (stmt.into(), to_stmt);
        self.writer = None;
    }

    /// The places of the named routes not suspended: those a check of the catalog judges.
    fn unsuspended(&self) -> Vec<usize> {
        (1..self.routes.len())
            .filter(|&k| self.suspended[k].is_none())
            .collect()
    }

    /// The routes of `places` that a check of the catalog found `problems` with, and why.
    fn unfit(&self, places: &[usize], problems: &[RouteProblem]) -> Vec<(usize, String)> {
        places
            .iter()
            .filter_map(|&k| Some((k, problems_of(problems, &self.routes[k].spec.name)?)))
            .collect()
    }

    /// Why each route is suspended, for `prepare` (empty when none is).
    fn reasons(&self) -> Vec<Option<String>> {
        if self.suspended.iter().all(Option::is_none) {
            return Vec::new();
        }
        self.suspended
            .iter()
            .map(|s| s.as_ref().map(|s| s.why.clone()))
            .collect()
    }
}

/// How often the writer reads the database's clock again.
const CLOCK_EVERY: Duration = Duration::from_secs(60);

/// One statement's worth of a batch. Split in halves while a row error is being isolated.
#[derive(Debug, Default)]
struct Part {
    /// Each one message's row in one route, so isolation dead-letters only the failing row.
    rows: Vec<RouteRow>,
    dead: Vec<DeadLetter>,
    /// Of the batch's first round, whose keys are unique among themselves: written first by
    /// the optimistic statement ([`BatchWriter::write_optimistic`]).
    optimistic: bool,
}

impl Part {
    fn len(&self) -> usize {
        self.rows.len() + self.dead.len()
    }

    /// Two non-empty parts (for a part of two or more): rows, then dead letters, split at the
    /// middle.
    fn halves(mut self) -> (Part, Part) {
        let first = self.len().div_ceil(2);
        let mut second = Part {
            optimistic: self.optimistic,
            ..Part::default()
        };
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
    /// What the batch changed of Sparkplug B edge nodes: recorded with its last statement.
    nodes: &'a [NodeChange],
}

/// What a batch came to, for its events.
#[derive(Debug, Default)]
struct Tally {
    dead_lettered: u64,
    /// Per route (the term's order, `telemetry` first).
    routes: Vec<RouteTally>,
    /// Whether the batch's changes of Sparkplug B edge nodes were recorded in its last
    /// statement's transaction (or refused there).
    nodes_recorded: bool,
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

    /// `part` without the rows of suspended routes: each becomes its `route_unavailable` dead
    /// letter.
    fn strip(&mut self, mut part: Part, suspended: &[Option<Suspension>]) -> Part {
        // The common case, nothing suspended, costs no look at the rows.
        if suspended.iter().all(Option::is_none)
            || !part
                .rows
                .iter()
                .any(|r| suspended.get(r.route).is_some_and(Option::is_some))
        {
            return part;
        }
        let rows = std::mem::take(&mut part.rows);
        for r in rows {
            match suspended.get(r.route).and_then(Option::as_ref) {
                Some(s) => part
                    .dead
                    .push(unavailable(&r, &self.routes[r.route], &s.why)),
                None => part.rows.push(r),
            }
        }
        part
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

/// One call on the writer's connection ([`Writer::retrying`]).
type Call<'w, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'w>>;

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
        self.clear_suspensions();
        // A hold belongs to this term's writer: the next term judges replication afresh.
        self.release_hold(Duration::ZERO, |why| {
            format!("the term ended while held ({why})")
        });
        res
    }

    async fn run_term(&mut self, cancel: CancellationToken) -> Result<(), WriterError> {
        let mut conn = self.open_term();
        self.check_at_start(&mut conn).await;
        // Whether the last commit was confirmed on a synchronous standby (REQUIRE_SYNC_REPLICATION):
        // until then, each batch first waits for replication to be in place.
        let mut replicated = false;
        let mut clock: Option<DbClock> = None;
        let mut retry = Backoff::default();
        let mut sparkplug = Sparkplug::default();
        loop {
            let limits = self.limits(conn.idle());
            let Some(batch) = gather(&mut self.rx, limits, &cancel).await else {
                return Ok(());
            };
            self.follow(&mut conn);
            self.recheck(&mut conn).await;
            if !conn.checked && Instant::now() >= conn.check_again_at {
                self.check_at_start(&mut conn).await;
            }
            if batch.is_empty() {
                continue;
            }
            let Some(clock) = self.clock(&mut conn, &mut clock, &cancel, &mut retry).await else {
                return Ok(());
            };
            if self.cfg.require_sync_replication && !replicated {
                if !self.until_replicated(&mut conn, &cancel, &mut retry).await {
                    return Ok(());
                }
                replicated = true;
            }
            if sparkplug.host.is_none() && self.reads_sparkplug(&batch) {
                let Some(host) = self.load_sparkplug(&mut conn, &cancel, &mut retry).await else {
                    return Ok(());
                };
                sparkplug.host = Some(host);
            }
            let started = Instant::now();
            let routes = conn.routes.clone();
            let suspended = conn.reasons();
            let prepared = prepare_with(
                &self.cfg.decoder,
                &batch,
                clock,
                self.cfg.max_payload_bytes,
                Routing {
                    routes: &routes,
                    written_by: &self.cfg.instance_id,
                    lease_epoch: self.fence.epoch,
                    suspended: &suspended,
                    redelivery_window: self.cfg.redelivery_window,
                },
                sparkplug.host.as_mut(),
            );
            let nodes = sparkplug
                .host
                .as_mut()
                .map(Host::take_changes)
                .unwrap_or_default();
            match self
                .commit(&mut conn, prepared, &routes, &nodes, &cancel, &mut retry)
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
                    crash_after_commit(&batch);
                    // Its Sparkplug B changes recorded, the commit confirmed (where replication
                    // is required), and only then its messages acknowledged; cancelled
                    // meanwhile, the batch stays unacknowledged.
                    let recorded = (nodes, tally.nodes_recorded);
                    let sp = &mut sparkplug;
                    let record =
                        self.record_sparkplug(&mut conn, sp, recorded, &cancel, &mut retry);
                    if !record.await? || !self.after_commit(&mut conn, &cancel).await? {
                        return Ok(());
                    }
                    self.acker.ack(batch);
                }
                Err(Stop::Cancelled) => return Ok(()),
                Err(Stop::Fenced(epoch)) => return Err(fenced(epoch)),
            }
        }
    }

    /// The term's routes, with the suspensions earlier terms left.
    fn open_term(&self) -> Conn {
        let conn = Conn::new(with_telemetry(&self.cfg.routes), self.initial_suspensions());
        self.report_suspensions(&conn);
        // A route suspended under an earlier term (of this node or another) that fits now
        // has its route_unavailable dead letters replayed by this one.
        for k in conn.unsuspended() {
            self.replay_resumed(conn.routes[k].spec.name.clone());
        }
        self.status
            .update_routes(|counts| show_routes(counts, &conn.routes[1..]));
        conn
    }

    /// Whether `batch` holds a message of a `sparkplug_b` topic.
    fn reads_sparkplug(&self, batch: &[Inbound]) -> bool {
        let d = &self.cfg.decoder;
        d.reads(Format::SparkplugB)
            && batch
                .iter()
                .any(|m| d.format_of(&m.topic) == Format::SparkplugB)
    }

    /// The Sparkplug B edge nodes the previous terms recorded; `None` when cancelled.
    async fn load_sparkplug(
        &self,
        conn: &mut Conn,
        cancel: &CancellationToken,
        retry: &mut Backoff,
    ) -> Option<Host> {
        let nodes = self
            .retrying(conn, cancel, retry, false, |w| {
                Box::pin(w.sparkplug_nodes())
            })
            .await?;
        retry.reset();
        // What a reconnect can redeliver: the pending messages, three times over.
        let host =
            Host::with_nodes(nodes).remembering(self.cfg.max_pending.saturating_mul(3).max(32_768));
        self.show_sparkplug(&host, 0);
        tracing::info!(
            edge_nodes = host.online().0,
            "Sparkplug edge nodes loaded: their aliases resolve without a rebirth"
        );
        Some(host)
    }

    /// After a batch committed: what it changed of the Sparkplug B edge nodes, recorded under
    /// the fence before its messages are acknowledged; then the births and deaths it read, and
    /// the rebirths it needs asked for. `Ok(false)` when cancelled meanwhile.
    async fn record_sparkplug(
        &self,
        conn: &mut Conn,
        sp: &mut Sparkplug,
        (changes, recorded): (Vec<NodeChange>, bool),
        cancel: &CancellationToken,
        retry: &mut Backoff,
    ) -> Result<bool, WriterError> {
        let Some(host) = sp.host.as_mut() else {
            return Ok(true);
        };
        // Recorded with the batch's last statement unless it wrote nothing (a batch of deaths).
        if !recorded && !self.store_sparkplug(conn, &changes, cancel, retry).await? {
            return Ok(false);
        }
        let happened = host.take_happened();
        for h in &happened {
            match h {
                Happened::Birth { node, device } => {
                    // Born again: a new reason to ask is asked at once.
                    if device.is_none() {
                        sp.asked.remove(node);
                    }
                    events::SparkplugBirth {
                        node: &format!("{}/{}", node.0, node.1),
                        device: device.as_deref(),
                    }
                    .emit()
                }
                Happened::Death { node, device } => events::SparkplugDeath {
                    node: &format!("{}/{}", node.0, node.1),
                    device: device.as_deref(),
                }
                .emit(),
            }
        }
        let sent = self.ask_rebirths(&mut sp.asked, &mut sp.recent, host.take_rebirths());
        // A sequence number alone changes nothing shown: no walk over every edge node then.
        if changes.iter().any(|(_, c, _)| *c == Change::Whole) || !happened.is_empty() || sent > 0 {
            self.show_sparkplug(host, sent);
        }
        Ok(true)
    }

    /// Records a batch's changes of the edge nodes under the fence, retrying what the database
    /// may answer later. `Ok(false)` when cancelled meanwhile.
    async fn store_sparkplug(
        &self,
        conn: &mut Conn,
        changes: &[NodeChange],
        cancel: &CancellationToken,
        retry: &mut Backoff,
    ) -> Result<bool, WriterError> {
        while !changes.is_empty() {
            let recorded = tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                r = async {
                    self.connection(conn).await?.record_sparkplug(&self.fence, changes).await
                } => r,
            };
            match recorded {
                Ok(()) => break,
                Err(StoreError::Fenced { epoch }) => return Err(fenced(epoch)),
                Err(e) if e.is_row_error() => {
                    // The same statement fails the same way every time: not worth a stalled
                    // stream. What is recorded stays as it was; the next leader asks those
                    // edge nodes to rebirth.
                    tracing::error!(error = %e, "Sparkplug edge nodes could not be recorded; kept in memory only");
                    break;
                }
                Err(e) => {
                    conn.writer = None;
                    if !retry.wait(&e, cancel).await {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    /// Publishes the rebirth requests `wanted`, each edge node asked at most once per
    /// `REBIRTH_EVERY` and `REBIRTH_STORM_ASKS` times per `REBIRTH_STORM`. Returns how many went.
    fn ask_rebirths(
        &self,
        asked: &mut HashMap<NodeKey, Instant>,
        recent: &mut HashMap<NodeKey, VecDeque<Instant>>,
        wanted: Vec<NodeKey>,
    ) -> u64 {
        let now = Instant::now();
        let mut sent_count = 0;
        for key in wanted {
            if asked
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < REBIRTH_EVERY)
            {
                continue;
            }
            let recent = recent.entry(key.clone()).or_default();
            recent.retain(|at| now.duration_since(*at) < REBIRTH_STORM);
            if recent.len() >= REBIRTH_STORM_ASKS {
                continue;
            }
            recent.push_back(now);
            let topic = format!("{}/{}/NCMD/{}", sparkplug::NAMESPACE, key.0, key.1);
            let payload = sparkplug::rebirth_request(Utc::now().timestamp_millis().max(0) as u64);
            let sent = self
                .publisher
                .as_ref()
                .is_some_and(|p| p.command(&topic, payload));
            events::SparkplugRebirthRequested {
                topic: &topic,
                sent,
            }
            .emit();
            if sent {
                asked.insert(key, now);
                sent_count += 1;
            }
        }
        sent_count
    }

    /// The host's edge nodes in the status and the metrics.
    fn show_sparkplug(&self, host: &Host, asked: u64) {
        let (nodes, devices) = host.online();
        let last = host.last_birth();
        self.status.update_sparkplug(|s| {
            s.host_id = self.cfg.sparkplug_host_id.clone();
            s.edge_nodes = host.len();
            s.edge_nodes_online = nodes;
            s.devices_online = devices;
            s.last_birth_at = last;
            s.rebirths_requested += asked;
        });
        events::SparkplugOnline {
            edge_nodes: nodes,
            devices,
            last_birth: last,
        }
        .emit();
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
        // A new connection prepares every route's statement: one whose table broke before it
        // was ever written is suspended here too.
        let (db, local) = self
            .retrying(conn, cancel, retry, true, |w| Box::pin(w.clock()))
            .await?;
        Some(clock.insert(DbClock::new(db, local)))
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
            let read = self.retrying(conn, cancel, retry, false, |w| Box::pin(w.replication()));
            let Some(s) = read.await else {
                return false;
            };
            let Some(why) = s.why_not() else {
                self.replicated(held_since);
                return true;
            };
            self.hold(&why);
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(HOLD_POLL) => {}
            }
        }
    }

    /// Runs `call` on the writer's connection (made when there is none) until it succeeds,
    /// raced against `cancel`: after a failure the connection is dropped and the failure waited
    /// out by `retry`. With `isolate`, a failure that belongs to a route's table suspends that
    /// route ([`Writer::isolate`]) and the call is made again at once. `None` when cancelled.
    async fn retrying<T>(
        &self,
        conn: &mut Conn,
        cancel: &CancellationToken,
        retry: &mut Backoff,
        isolate: bool,
        call: impl for<'w> Fn(&'w mut BatchWriter) -> Call<'w, T>,
    ) -> Option<T> {
        loop {
            let r = tokio::select! {
                _ = cancel.cancelled() => return None,
                r = async { call(self.connection(conn).await?).await } => r,
            };
            let e = match r {
                Ok(v) => return Some(v),
                Err(e) => e,
            };
            conn.writer = None;
            if isolate && self.isolate(&e, conn).await {
                continue;
            }
            if !retry.wait(&e, cancel).await {
                return None;
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
                    self.replicated(started);
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

    /// Says (if intake was held) that intake resumes after `held`, and why (told why it was held).
    fn release_hold(&self, held: Duration, why: impl FnOnce(String) -> String) {
        if let Some(was) = self.status.ingest_hold() {
            self.status.set_ingest_hold(None);
            let why = why(was);
            events::IngestResumed { held, why: &why }.emit();
        }
    }

    /// Intake resumes: replication is back.
    fn replicated(&self, since: Instant) {
        self.release_hold(since.elapsed(), |_| {
            "commits are synchronously replicated again".into()
        });
    }

    /// Commits every part of `prepared`, isolating row errors, retrying other errors.
    async fn commit(
        &self,
        conn: &mut Conn,
        prepared: Prepared,
        routes: &[ResolvedRoute],
        nodes: &[NodeChange],
        cancel: &CancellationToken,
        retry: &mut Backoff,
    ) -> Result<Tally, Stop> {
        let mut tally = Tally {
            routes: vec![RouteTally::default(); routes.len()],
            ..Tally::default()
        };
        for (t, &n) in tally.routes.iter_mut().zip(&prepared.superseded) {
            t.written = n;
        }
        // Redeliveries of a message earlier in the batch: duplicates of their route (the
        // default one's when the batch alone cannot tell).
        tally.routes[0].duplicates += prepared.redelivered;
        let mut batch = Committing {
            routes,
            replaced: prepared.replaced,
            tally,
            nodes,
        };
        // At most BATCH_MAX_ROWS rows per statement: a batch of gateway arrays holds many
        // readings per message, and one statement of tens of thousands of rows costs the
        // database several times more per row (its hash tables spill past work_mem). Keys
        // are unique within a round, so a round's statements are independent; each round
        // still commits before the next.
        let per = self.cfg.batch_max_rows.max(1);
        let mut parts = Vec::new();
        let mut dead = prepared.dead.into_iter().peekable();
        let rounds = std::iter::once(prepared.rows).chain(prepared.later);
        for (n, round) in rounds.enumerate() {
            let mut rows = round.into_iter().peekable();
            // Dead letters (an array's bad elements can be many) go with the first round,
            // BATCH_MAX_ROWS of them per statement too.
            while rows.peek().is_some() || dead.peek().is_some() {
                parts.push(Part {
                    rows: rows.by_ref().take(per).collect(),
                    dead: dead.by_ref().take(per).collect(),
                    optimistic: n == 0,
                });
            }
        }
        if parts.is_empty() {
            // A batch of nothing to write still commits its (empty) statement, as always.
            parts.push(Part::default());
        }
        let count = parts.len();
        for (n, part) in parts.into_iter().enumerate() {
            self.commit_part(conn, part, &mut batch, n + 1 == count, cancel, retry)
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

    /// Commits one part whose keys are unique per route, halving it around row errors. An error
    /// that belongs to one route's table suspends that route: its rows become dead letters and
    /// the rest is written; any other error is retried for everything.
    async fn commit_part(
        &self,
        conn: &mut Conn,
        part: Part,
        batch: &mut Committing<'_>,
        last: bool,
        cancel: &CancellationToken,
        retry: &mut Backoff,
    ) -> Result<(), Stop> {
        let mut work = VecDeque::from([part]);
        while let Some(part) = work.pop_front() {
            let part = batch.strip(part, &conn.suspended);
            if part.len() == 0 {
                continue;
            }
            // The edge nodes' changes go with the batch's last statement.
            let nodes = match last && work.is_empty() {
                true => batch.nodes,
                false => &[],
            };
            let res = self.write_part(conn, &part, nodes, cancel).await?;
            match res {
                Ok((out, refused)) => {
                    retry.reset();
                    batch.committed(&part, &out);
                    // Refused with the rows, the record is tried alone after the batch: the
                    // rows' error may have been passing.
                    if !nodes.is_empty() && refused.is_none() {
                        batch.tally.nodes_recorded = true;
                    }
                    if let Some(e) = refused {
                        tracing::debug!(error = %e, "the batch with its Sparkplug record failed, without it not: recording it alone");
                    }
                }
                Err(StoreError::Fenced { epoch }) => return Err(Stop::Fenced(epoch)),
                Err(e) if e.is_row_error() && (part.len() > 1 || part.rows.len() == 1) => {
                    // Every row refused can be the table's doing (a NOT NULL column added
                    // without a default): a route that no longer fits is suspended rather than
                    // every message dead-lettered one by one.
                    if self.unfit_after_row_error(&e, conn, &part).await {
                        work.push_front(part);
                    } else if part.len() > 1 {
                        let (a, b) = part.halves();
                        work.push_front(b);
                        work.push_front(a);
                    } else {
                        work.push_front(batch.refused(&part.rows[0], &e.database_text()));
                    }
                }
                Err(e) => {
                    if self.isolate(&e, conn).await {
                        // The part again, without the suspended routes' rows.
                        work.push_front(part);
                        continue;
                    }
                    // Connection, time, resources, the database as a whole, or a dead letter
                    // itself refused (which `storable_text` and `bytea` should make
                    // impossible): retry, acknowledging nothing meanwhile.
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

    /// After a statement failed for a reason other than a row: checks the statement's named
    /// routes against the catalog, and suspends each whose table no longer fits (gone, renamed,
    /// a column missing, a grant revoked). `false` when every route fits: the error is the
    /// database's as a whole (or not a database error at all), retried for everything.
    async fn isolate(&self, e: &StoreError, conn: &mut Conn) -> bool {
        if !e.is_database_error() {
            return false;
        }
        // Every route the statement writes: its text names each table, whatever rows the
        // part holds.
        let places = conn.unsuspended();
        if places.is_empty() {
            return false;
        }
        let Some((fresh, problems)) = self.check_routes(conn, &places).await else {
            tracing::debug!("routes could not be checked against the catalog; retrying everything");
            return false;
        };
        let words = e.database_text();
        // What failed, by route: its table no longer fits (the checks of a start); or it fits
        // but differs from what the statement was prepared for (a type changed: the route
        // resumes with the new shape at its next check); or its own statement fails when
        // prepared alone (a rule, a lock held past the probe's timeout).
        let mut found: Vec<(usize, String)> = Vec::new();
        for &k in &places {
            let route = &conn.routes[k];
            if let Some(mine) = problems_of(&problems, &route.spec.name) {
                found.push((k, mine));
            } else if fresh
                .iter()
                .find(|r| r.spec.name == route.spec.name)
                .is_some_and(|r| r != route)
            {
                found.push((k, "its table changed (a column's type, nullability, default or the key's index): the route is prepared again at its next check".into()));
            }
        }
        if found.is_empty() {
            found = self.probe_routes(conn).await;
        }
        self.suspend(conn, found, &format!("writing it failed with: {words}"))
    }

    /// Suspends each route of `found` (its place, and why), the database's words after; the
    /// statement is prepared again without them. Whether any was.
    fn suspend(&self, conn: &mut Conn, found: Vec<(usize, String)>, words: &str) -> bool {
        let now = Instant::now();
        let any = !found.is_empty();
        for (k, problem) in found {
            let why = format!("{problem}; {words}");
            events::RouteSuspended {
                route: &conn.routes[k].spec.name,
                why: &why,
            }
            .emit();
            conn.suspended[k] = Some(Suspension {
                why,
                since: now,
                check_at: now + RECHECK,
            });
        }
        if any {
            conn.rebuild();
            self.report_suspensions(conn);
        }
        any
    }

    /// After a row error: the named routes of `part` not checked within [`RECHECK`] checked
    /// against the catalog; each that no longer fits is suspended.
    async fn unfit_after_row_error(&self, e: &StoreError, conn: &mut Conn, part: &Part) -> bool {
        let now = Instant::now();
        let stale = |k: &usize| {
            let checked = conn.row_checked.get(k);
            checked.is_none_or(|t| now.duration_since(*t) >= RECHECK)
        };
        let mut due: Vec<usize> = part
            .rows
            .iter()
            .map(|r| r.route)
            .filter(|&k| k > 0 && conn.suspended[k].is_none() && stale(&k))
            .collect();
        due.sort_unstable();
        due.dedup();
        // The statement's probes, at most every RECHECK too (under the key of no route).
        let probe_due = stale(&usize::MAX);
        if due.is_empty() && !probe_due {
            return false;
        }
        for &k in &due {
            conn.row_checked.insert(k, now);
        }
        let problems = match due.is_empty() {
            true => Vec::new(),
            false => match self.check_routes(conn, &due).await {
                Some((_, p)) => p,
                None => return false,
            },
        };
        let mut found = conn.unfit(&due, &problems);
        if found.is_empty() && probe_due && conn.routes.len() > 1 {
            // A statement trigger that raises refuses every statement naming its table, rows
            // of its route or not.
            conn.row_checked.insert(usize::MAX, now);
            found = self.probe_routes(conn).await;
        }
        self.suspend(
            conn,
            found,
            &format!("its rows are refused: {}", e.database_text()),
        )
    }

    /// The routes of `places` resolved against the catalog now, and their problems, on a
    /// connection of its own; `None` when they could not be checked (the database unreachable:
    /// not a route's fault).
    async fn check_routes(
        &self,
        conn: &Conn,
        places: &[usize],
    ) -> Option<(Vec<ResolvedRoute>, Vec<RouteProblem>)> {
        let specs: Vec<_> = places
            .iter()
            .map(|&k| conn.routes[k].spec.clone())
            .collect();
        let check = async {
            let c =
                leasehold_store::connect(&self.cfg.database_url, "leasehold-route-check").await?;
            leasehold_store::routes::resolve(&c, &specs).await
        };
        match tokio::time::timeout(Duration::from_secs(5), check).await {
            Ok(Ok(found)) => Some(found),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "checking routes against the catalog failed");
                None
            }
            Err(_) => None,
        }
    }

    /// Runs `route`'s statement alone (beside `telemetry`'s; `None`: `telemetry`'s alone) with
    /// no rows, on a connection of its own, within 5 s: the database's words when that fails (a
    /// rule on its table, a statement trigger that raises, a lock held on it). Nothing is
    /// written: there are no rows.
    async fn probe_route(&self, route: Option<&ResolvedRoute>) -> Option<String> {
        let probe = async {
            let mut w = self.connect(Duration::from_secs(2)).await?;
            if let Some(route) = route {
                w.use_routes(with_telemetry([route])).await?;
            }
            w.write(&self.fence, &[], &[]).await.map(|_| ())
        };
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(())) | Ok(Err(StoreError::Fenced { .. })) => None,
            Ok(Err(e)) if e.is_database_error() => {
                Some(format!("its statement fails: {}", e.database_text()))
            }
            Ok(Err(_)) => None,
            Err(_) => Some("its statement did not run within 5 s (its table locked?)".into()),
        }
    }

    /// Probes each named route not suspended (`telemetry` first: when its own statement fails,
    /// no route is to blame): the places of those whose statement alone fails, with why.
    async fn probe_routes(&self, conn: &Conn) -> Vec<(usize, String)> {
        if self.probe_route(None).await.is_some() {
            return Vec::new();
        }
        let mut found = Vec::new();
        for k in conn.unsuspended() {
            if let Some(why) = self.probe_route(Some(&conn.routes[k])).await {
                found.push((k, why));
            }
        }
        found
    }

    /// Checks the suspended routes that are due; each that fits the catalog again resumes
    /// (resolved afresh) and replays its `route_unavailable` dead letters.
    async fn recheck(&self, conn: &mut Conn) {
        let now = Instant::now();
        let due: Vec<usize> = (1..conn.routes.len())
            .filter(|&k| {
                conn.suspended[k]
                    .as_ref()
                    .is_some_and(|s| s.check_at <= now)
            })
            .collect();
        if due.is_empty() {
            return;
        }
        let Some((resolved, problems)) = self.check_routes(conn, &due).await else {
            for &k in &due {
                if let Some(s) = conn.suspended[k].as_mut() {
                    s.check_at = now + RECHECK;
                }
            }
            return;
        };
        let mut routes = conn.routes.to_vec();
        let mut resumed = Vec::new();
        let mut reasons_changed = false;
        for k in due {
            let name = routes[k].spec.name.clone();
            let fits = !problems.iter().any(|p| p.route == name);
            let fresh = resolved
                .iter()
                .find(|r| r.spec.name == name)
                .filter(|_| fits);
            // Its statement must prepare too: a rule or a lock is no catalog problem.
            let blocked = match fresh {
                Some(r) => self.probe_route(Some(r)).await,
                None => None,
            };
            let Some(s) = conn.suspended[k].as_mut() else {
                continue;
            };
            match (fresh, blocked) {
                (Some(r), None) => {
                    events::RouteResumed {
                        route: &name,
                        suspended_for: s.since.elapsed(),
                    }
                    .emit();
                    conn.suspended[k] = None;
                    routes[k] = r.clone();
                    resumed.push(name);
                }
                (_, blocked) => {
                    if let Some(why) = blocked {
                        s.why = why;
                        reasons_changed = true;
                    }
                    s.check_at = now + RECHECK;
                }
            }
        }
        if resumed.is_empty() {
            if reasons_changed {
                self.report_suspensions(conn);
            }
            return;
        }
        conn.routes = routes.into();
        conn.rebuild();
        self.report_suspensions(conn);
        for route in resumed {
            self.replay_resumed(route);
        }
    }

    /// The suspensions the term starts with: routes whose table did not fit when the
    /// configuration was loaded.
    fn initial_suspensions(&self) -> Vec<Option<Suspension>> {
        let now = Instant::now();
        std::iter::once(None)
            .chain(self.cfg.suspended.iter().map(|why| {
                why.as_ref().map(|why| Suspension {
                    why: why.clone(),
                    since: now,
                    check_at: now,
                })
            }))
            .collect()
    }

    /// Shows which routes are suspended (`/health`, the gauge), vouched for by this term once it
    /// has checked its routes' tables (the heartbeat reports only what a term vouches for).
    fn report_suspensions(&self, conn: &Conn) {
        let named = conn.routes.get(1..).unwrap_or_default();
        let suspended = conn.suspended.get(1..).unwrap_or_default();
        let term = conn.checked.then_some(self.fence.epoch);
        self.status.update_routes_of_term(term, |counts| {
            show_routes(counts, named);
            for (c, s) in counts.iter_mut().zip(suspended) {
                c.suspended = s.as_ref().map(|s| s.why.clone());
            }
        });
        for (r, s) in named.iter().zip(suspended) {
            route_state(&r.spec.name, s.is_some());
        }
    }

    /// A term's first look at its routes' tables: each that no longer fits is suspended now, not
    /// at its first message, and only then does this term vouch for its suspensions. Until the
    /// catalog can be read, nothing is vouched for (the alerts judge by dead letters meanwhile).
    async fn check_at_start(&self, conn: &mut Conn) {
        let places = conn.unsuspended();
        let mut found = Vec::new();
        if !places.is_empty() {
            let Some((_, problems)) = self.check_routes(conn, &places).await else {
                conn.check_again_at = Instant::now() + RECHECK;
                return;
            };
            found = conn.unfit(&places, &problems);
        }
        conn.checked = true;
        if !self.suspend(conn, found, "found when the term started") {
            self.report_suspensions(conn);
        }
    }

    /// The term is over: this node holds no route suspended any more (the next leader judges).
    fn clear_suspensions(&self) {
        let mut was = Vec::new();
        self.status.update_routes_of_term(None, |counts| {
            for c in counts.iter_mut() {
                if c.suspended.take().is_some() {
                    was.push(c.name.clone());
                }
            }
        });
        for route in &was {
            route_state(route, false);
        }
    }

    /// A resumed route's `route_unavailable` dead letters, replayed in the background under this
    /// term's fence (`leasehold replay --route NAME --reason route_unavailable` does the same).
    fn replay_resumed(&self, route: String) {
        let job = crate::replay::Job {
            database_url: self.cfg.database_url.clone(),
            route: Some(route),
            reason: Some(crate::batch::ROUTE_UNAVAILABLE.to_string()),
            since: None,
        };
        let Some(cfg) = self.active.as_ref().map(|rx| rx.borrow().cfg.clone()) else {
            return;
        };
        tokio::spawn(async move {
            match crate::replay::run(&cfg, job, false, None).await {
                Ok(summary) if summary.processed > 0 => {
                    tracing::info!(%summary, "resumed route's dead letters replayed")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "replaying a resumed route's dead letters failed; `leasehold replay` can do it")
                }
            }
        });
    }

    /// One statement for `part`, raced against `cancel` (the connection is made inside the
    /// race too: a connect can take its whole timeout). A cancelled statement is cancelled on
    /// the server too: it would go on holding the fence's share lock, delaying the next
    /// leader's takeover.
    async fn write_part(
        &self,
        conn: &mut Conn,
        part: &Part,
        nodes: &[NodeChange],
        cancel: &CancellationToken,
    ) -> Result<Result<(leasehold_store::BatchOutcome, Option<StoreError>), StoreError>, Stop> {
        let mut stop = None;
        let res = tokio::select! {
            _ = cancel.cancelled() => None,
            r = async {
                let remap = (conn.stmt.len() != conn.routes.len()).then(|| conn.to_stmt.clone());
                let w = self.connection(conn).await?;
                stop = Some(w.cancel_handle());
                match remap {
                    None => {
                        let optimistic = part.optimistic;
                        w.write_with_nodes(&self.fence, &part.rows, &part.dead, optimistic, nodes)
                            .await
                    }
                    // Some routes are suspended: rows name their route's place in the statement,
                    // and the outcome comes back in the batch's places.
                    Some(to_stmt) => {
                        let rows: Vec<RouteRow> = part
                            .rows
                            .iter()
                            .filter_map(|r| Some(RouteRow { route: to_stmt[r.route]?, ..r.clone() }))
                            .collect();
                        let (mut out, refused) =
                            w.write_with_nodes(&self.fence, &rows, &part.dead, false, nodes).await?;
                        let mut by_stmt = std::mem::take(&mut out.routes).into_iter();
                        out.routes = to_stmt
                            .iter()
                            .map(|s| s.and_then(|_| by_stmt.next()).unwrap_or_default())
                            .collect();
                        Ok((out, refused))
                    }
                }
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

    /// A connection of this node's batch writer, each statement bounded by `timeout`.
    async fn connect(&self, timeout: Duration) -> Result<BatchWriter, StoreError> {
        let cfg = &self.cfg;
        let (url, id) = (&cfg.database_url, cfg.instance_id.clone());
        BatchWriter::connect(url, id, timeout, cfg.redelivery_window).await
    }

    /// The writer's connection, made when there is none or it closed, with the named routes'
    /// statement prepared (`connect` prepares `telemetry`'s alone).
    async fn connection<'a>(&self, conn: &'a mut Conn) -> Result<&'a mut BatchWriter, StoreError> {
        if conn.writer.as_ref().is_none_or(|c| c.is_closed()) {
            conn.writer = None;
            let mut w = self
                .connect(self.cfg.statement_timeout)
                .await?
                .with_redelivery_span(self.cfg.max_pending + 2048);
            if conn.stmt.len() > 1 {
                w.use_routes(conn.stmt.clone()).await?;
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
        w.batch_max_rows = c.cluster.batch_max_rows;
        w.batch_max_bytes = batch_bytes(c);
        w.batch_max_wait = c.cluster.batch_max_wait;
        w.redelivery_window = c.cluster.redelivery_window;
        // MAX_PAYLOAD_BYTES is the term's: a new value starts a new term (the supervisor).
        w.decoder = Decoder::new(&c.cluster.device_topic_pattern, w.max_payload_bytes)
            .with_formats(&c.formats);
        w.routes = a.routes.clone();
        w.suspended = a.suspended.clone();
        // A route suspended here stays so (checked again at once) if the new version keeps it.
        let mut carried = self.initial_suspensions();
        for (r, carry) in a.routes.iter().zip(&mut carried[1..]) {
            let mut held = conn.routes.iter().zip(&conn.suspended);
            let held = held.find(|(o, _)| o.spec.name == r.spec.name);
            if let (Some((_, Some(s))), None) = (held, &carry) {
                let check_at = Instant::now();
                *carry = Some(Suspension {
                    check_at,
                    ..s.clone()
                });
            }
        }
        for gone in conn.routes.iter().skip(1) {
            if !a.routes.iter().any(|r| r.spec.name == gone.spec.name) {
                route_state(&gone.spec.name, false);
            }
        }
        *conn = Conn::new(with_telemetry(&a.routes), carried);
        self.report_suspensions(conn);
    }

    /// A batch closes at `batch_max_rows` messages or `batch_max_bytes` of payload, or
    /// `batch_max_wait` after its first message was received ([`gather`]).
    fn limits(&self, idle: Option<Duration>) -> Limits {
        let c = &self.cfg;
        let (rows, bytes, wait) = (c.batch_max_rows, c.batch_max_bytes, c.batch_max_wait);
        Limits {
            rows,
            bytes,
            wait,
            idle,
        }
    }
}

/// The failpoint of the fault tests (`FAILPOINTS=crash-after-commit=return`, in a binary built
/// with the `testing` feature): the process dies after a batch holding Sparkplug B device data
/// committed, before anything else of it is done.
pub const CRASH_AFTER_COMMIT: &str = "crash-after-commit";

fn crash_after_commit(_batch: &[Inbound]) {
    fail::fail_point!(
        CRASH_AFTER_COMMIT,
        _batch.iter().any(|m| m.topic.contains("/DDATA/")),
        |_| std::process::abort()
    );
}

/// The bytes a batch gathers at most: `BATCH_MAX_BYTES`, and at most half of
/// `MAX_PENDING_BYTES`, so that the ingest takes in the next batch while one is written (a batch
/// of gateway arrays filled all of it, and receiving waited for every commit).
pub fn batch_bytes(cfg: &leasehold_config::Config) -> usize {
    cfg.cluster
        .batch_max_bytes
        .min(cfg.max_pending_bytes / 2)
        .max(1)
}

/// Another node holds the lease: the term's writes are over.
fn fenced(epoch: i64) -> WriterError {
    events::WriteFenced { epoch }.emit();
    WriterError::Fenced(epoch)
}

/// Says whether `route` is suspended (its event and gauge).
fn route_state(route: &str, suspended: bool) {
    events::RouteState { route, suspended }.emit();
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
    /// With nothing received for this long, an empty batch (the writer has work of its own:
    /// checking a suspended route's table).
    idle: Option<Duration>,
}

/// Waits for a first message, then takes more until `max` or until `wait` has passed since that
/// message was received. A message that queued while the previous batch was being written has
/// already waited; counting from its receipt keeps BATCH_MAX_WAIT the longest wait of any message.
async fn gather(
    rx: &mut Inbox,
    limits: Limits,
    cancel: &CancellationToken,
) -> Option<Vec<Inbound>> {
    let idle = async {
        match limits.idle {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let first = tokio::select! {
        _ = cancel.cancelled() => return None,
        // Nothing arrived for `idle`: an empty batch (nothing taken from the channel).
        _ = idle => return Some(Vec::new()),
        m = rx.recv() => m?,
    };
    let deadline = tokio::time::Instant::from_std(first.received + limits.wait);
    let mut bytes = first.payload.len();
    let mut batch = Vec::with_capacity(limits.rows.min(4096));
    batch.push(first);
    let full =
        |batch: &Vec<Inbound>, bytes: usize| batch.len() >= limits.rows || bytes >= limits.bytes;
    while !full(&batch, bytes) {
        // What is already queued is taken without waking the timer.
        let next = match rx.try_recv() {
            Ok(m) => Some(m),
            Err(_) => tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep_until(deadline) => None,
                m = rx.recv() => m,
            },
        };
        let Some(m) = next else {
            break;
        };
        bytes += m.payload.len();
        batch.push(m);
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
            raw: None,
            label: None,
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
            optimistic: false,
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
            idle: None,
        }
    }

    #[tokio::test]
    async fn an_idle_wait_ends_in_an_empty_batch_and_takes_nothing() {
        let (tx, mut rx) = Inbox::channel(10);
        let l = Limits {
            idle: Some(Duration::from_millis(20)),
            ..limits(10, Duration::from_millis(5))
        };
        let batch = gather(&mut rx, l, &CancellationToken::new()).await;
        assert_eq!(batch.map(|b| b.len()), Some(0));
        tx.try_send(vec![Inbound::detached("devices/d/t", b"{}")])
            .expect("queued");
        let batch = gather(&mut rx, l, &CancellationToken::new()).await;
        assert_eq!(
            batch.map(|b| b.len()),
            Some(1),
            "the next message is still there"
        );
    }

    #[tokio::test]
    async fn a_batch_closes_at_its_byte_limit() {
        let (tx, mut rx) = Inbox::channel(10);
        // Two runs, as the ingest sends them: a batch is cut inside a run.
        for n in [2, 3] {
            let run = (0..n)
                .map(|_| Inbound::detached("devices/d/t", &[b' '; 400]))
                .collect();
            tx.try_send(run).expect("queued");
        }
        let l = Limits {
            rows: 1000,
            bytes: 1000,
            wait: Duration::from_secs(5),
            idle: None,
        };
        let batch = gather(&mut rx, l, &CancellationToken::new())
            .await
            .expect("a batch");
        assert_eq!(
            batch.len(),
            3,
            "400 + 400 + 400 bytes reach the 1000-byte limit"
        );
        // With the sender gone, a rest lost with its run would end the next gather empty-handed.
        drop(tx);
        let rest = gather(&mut rx, l, &CancellationToken::new())
            .await
            .expect("a batch");
        assert_eq!(
            rest.len(),
            2,
            "the rest of the second run is the next batch"
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
        let (tx, mut rx) = Inbox::channel(10);
        tx.try_send(vec![message(wait)]).expect("queued");
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
        let (tx, mut rx) = Inbox::channel(10);
        tx.try_send(vec![message(Duration::ZERO)]).expect("queued");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(vec![message(Duration::ZERO)]).await;
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
