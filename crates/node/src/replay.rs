//! `leasehold replay`: dead letters run again through the active configuration. Each chunk is
//! one transaction: its dead letters locked (`FOR UPDATE SKIP LOCKED`: two replays at once never
//! take the same one), decoded and routed as the writer does, written by the fenced batch
//! statement under the current leader's lease, and removed. What still fails is written anew by
//! that statement with its new reason; a transaction that does not commit leaves everything as
//! it was. A failover in the middle fences the chunk: the lease is read again and the chunk
//! retried.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use leasehold_config::Config;
use leasehold_decode::Decoder;
use leasehold_ingest::Inbound;
use leasehold_store::replay::{Selection, StoredDeadLetter};
use leasehold_store::routes::ResolvedRoute;
use leasehold_store::{BatchWriter, DeadLetter, Fence, RouteRow, StoreError};

use crate::batch::{prepare, statement_routes, with_telemetry, DbClock, Routing};

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct Job {
    pub database_url: String,
    /// A route's name; `default` for the default route's dead letters.
    pub route: Option<String>,
    pub reason: Option<String>,
    /// Received within this long before the replay started.
    pub since: Option<Duration>,
}

impl Job {
    /// The dead letters this job selects, fixed now ([`Selection::fix`]).
    async fn selection(&self, c: &leasehold_store::Client) -> anyhow::Result<Selection> {
        let (route, reason) = (self.route.clone(), self.reason.clone());
        Selection::fix(c, route, reason, self.since)
            .await
            .with_context(|| match self.since {
                Some(d) => format!(
                    "selecting dead letters (--since {})",
                    leasehold_config::fmt_dur(d)
                ),
                None => "selecting dead letters".into(),
            })
    }
}

/// What a replay did (or, dry, would do).
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Dead letters taken (locked) and run again.
    pub processed: u64,
    /// Of them, stored now (written, or found stored already): removed from `dead_letters`.
    pub stored: u64,
    /// Of them, failing again, by their new reason: still in `dead_letters`.
    pub failing: BTreeMap<String, u64>,
    /// Of them, left as they were (not run again), by why.
    pub left: BTreeMap<Kept, u64>,
    pub dry_run: bool,
}

impl Summary {
    /// A chunk of `taken` dead letters run again.
    fn add(&mut self, taken: usize, done: Done) {
        self.processed += taken as u64;
        self.stored += done.replayed.len().saturating_sub(done.failing.len()) as u64;
        for reason in done.failing {
            *self.failing.entry(reason).or_default() += 1;
        }
        for why in done.kept {
            *self.left.entry(why).or_default() += 1;
        }
    }

    /// One dead letter whose row the database refused again.
    fn add_refused(&mut self) {
        self.processed += 1;
        *self
            .failing
            .entry("rejected_by_database".into())
            .or_default() += 1;
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let failing: u64 = self.failing.values().sum();
        let done = match self.dry_run {
            true => "tried (dry run: nothing changed)",
            false => "replayed",
        };
        let (processed, stored) = (self.processed, self.stored);
        write!(
            f,
            "{processed} dead letters {done}: {stored} stored, {failing} failing again"
        )?;
        for (reason, n) in &self.failing {
            write!(f, "; {reason}: {n}")?;
        }
        for (why, n) in &self.left {
            write!(f, "; left as they were ({why}): {n}")?;
        }
        Ok(())
    }
}

/// Dead letters per transaction.
const CHUNK: i64 = 500;
/// Fenced retries of a chunk in a row (a failover in the middle), each after reading the lease again.
const FENCED_RETRIES: u32 = 20;

/// The replay's own writer, its statement prepared for the routes that fit now (a dead letter
/// of one that does not stays, as `route_unavailable` again), and each route's place in it.
async fn replay_writer(
    cfg: &Config,
    url: &str,
    routes: &[ResolvedRoute],
    suspended: &[Option<String>],
) -> anyhow::Result<(BatchWriter, Vec<Option<usize>>)> {
    let mut w = BatchWriter::connect(
        url,
        format!("{} (replay)", cfg.instance_id),
        Duration::from_secs(60),
        cfg.cluster.redelivery_window,
    )
    .await?
    // As the leader's writer: a first copy among the last MAX_PENDING + 2,048 readings.
    .with_redelivery_span(cfg.max_pending + 2048)
    // Its readings were received in the past; its transaction spans several statements.
    .without_data_age()
    .await?;
    let (stmt, to_stmt) = statement_routes(routes, suspended);
    if stmt.len() > 1 {
        w.use_routes(stmt.into()).await?;
    }
    Ok((w, to_stmt))
}

/// Replays the dead letters `job` selects with `cfg` (the active configuration over this host's
/// node settings). `progress` is called after each chunk.
pub async fn run(
    cfg: &Config,
    job: Job,
    dry_run: bool,
    progress: Option<&mut (dyn FnMut(&Summary) + Send)>,
) -> anyhow::Result<Summary> {
    let c = crate::admin::connect_to(&job.database_url, "leasehold-replay").await?;
    let sel = job.selection(&c).await?;
    replay(cfg, &c, &job.database_url, &sel, dry_run, progress).await
}

/// Replays the dead letters of `sel` (on the database at `url`, `c` connected to it).
async fn replay(
    cfg: &Config,
    c: &leasehold_store::Client,
    url: &str,
    sel: &Selection,
    dry_run: bool,
    mut progress: Option<&mut (dyn FnMut(&Summary) + Send)>,
) -> anyhow::Result<Summary> {
    // The active routes, `telemetry` first, and why each does not fit the catalog now.
    let (named, why) = crate::routes_cmd::resolve_on(c, &cfg.routes).await?;
    let routes = with_telemetry(&named);
    let suspended: Vec<_> = std::iter::once(None).chain(why).collect();
    let (mut w, to_stmt) = replay_writer(cfg, url, &routes, &suspended).await?;
    let (mut fence, mut hold) = read_fence(c, &cfg.node.lease_name).await?;
    let decoder = Decoder::configured(cfg);
    let written_by = format!("{} (replay)", cfg.instance_id);
    let shape = Shape {
        decoder: &decoder,
        written_by: &written_by,
        routes: &routes,
        suspended: &suspended,
        to_stmt: &to_stmt,
        max_payload_bytes: cfg.cluster.max_payload_bytes,
        redelivery_window: cfg.cluster.redelivery_window,
    };
    let mut summary = Summary {
        dry_run,
        ..Summary::default()
    };
    let mut chunks = Chunks::default();
    let mut fenced = 0u32;
    while let Some(item) = chunks.next() {
        w.begin(hold).await?;
        let locked = lock(&mut w, sel, item.as_deref(), &chunks).await?;
        chunks.taken(&item, &locked);
        if locked.is_empty() {
            w.finish(true).await?;
            continue;
        }
        let ids: Vec<i64> = locked.iter().map(|d| d.id).collect();
        // The delete and the commit (a route's deferred trigger) hold the lease row too: what
        // fails there is handled as the write's failure is.
        let written = async {
            let done = attempt(&mut w, &fence, &locked, &shape).await?;
            w.delete_dead_letters(&done.replayed).await?;
            w.finish(!dry_run).await?;
            Ok::<_, StoreError>(done)
        }
        .await;
        match written {
            Ok(done) => {
                summary.add(ids.len(), done);
                fenced = 0;
            }
            Err(e) if (e.is_row_error() || cancelled(&e)) && ids.len() > 1 => {
                w.finish(false).await?;
                chunks.halve(&ids, cancelled(&e));
            }
            Err(e) if e.is_row_error() => {
                // This one dead letter's row is refused again: it stays, with the words of now.
                w.finish(false).await?;
                w.begin(hold).await?;
                let marked = w.refuse_dead_letter(ids[0], &e.database_text()).await?;
                w.finish(!dry_run).await?;
                if marked > 0 {
                    summary.add_refused();
                }
            }
            Err(StoreError::Fenced { .. }) if fenced < FENCED_RETRIES => {
                w.finish(false).await?;
                fenced += 1;
                tokio::time::sleep(Duration::from_millis(250 * u64::from(fenced.min(8)))).await;
                (fence, hold) = read_fence(c, &cfg.node.lease_name).await?;
                chunks.again(ids);
            }
            Err(e) if cancelled(&e) => {
                let _ = w.finish(false).await;
                return Err(cancelled_alone(e, ids[0], hold, dry_run));
            }
            Err(e) => {
                let _ = w.finish(false).await;
                return Err(anyhow::Error::new(e).context("replaying dead letters"));
            }
        }
        // The server's notices on this connection (a trigger's RAISE NOTICE, one per row) are
        // read after every chunk: left in their channel, a long replay kept them all in memory.
        if let Some(words) = w.unreplicated_commit() {
            tracing::warn!("a replay transaction (a chunk, or a refused dead letter's mark) was committed on the primary, but its wait for the synchronous standby was cancelled; if the primary fails before the standby has it, those dead letters come back: run the replay again then: {words}");
        }
        if let Some(p) = progress.as_mut() {
            p(&summary);
        }
    }
    Ok(summary)
}

/// The error of dead letter `id`, cancelled alone at the hold limit `hold` (or by an
/// administrator): the replay stops there.
fn cancelled_alone(e: StoreError, id: i64, hold: Duration, dry_run: bool) -> anyhow::Error {
    let before = if dry_run {
        "(a dry run: nothing is kept)"
    } else {
        "the chunks before it stay replayed"
    };
    let why = match e {
        // The statements' time together: rounds of readings of one key.
        StoreError::Timeout(_) => "its statements together (its write, later rounds of readings of one key, its delete) used up that time".to_string(),
        e => e.database_text(),
    };
    anyhow::anyhow!("replaying dead letters: writing dead letter {id} was cancelled: it ran, or waited for a lock, longer than {} ms, the longest a replay may hold the leader's lease row (a sixth of its LEASE_TTL), or an administrator cancelled it; it was not replayed, {before}. Look for what held it up (a trigger, a lock on its route's table) and run the replay again: {why}", hold.as_millis())
}

/// What is left of a replay, in the order it is taken.
struct Chunks {
    /// `None`: the next chunk by the selection; `Some(ids)`: those again (half of a chunk with a
    /// refused row or cancelled at the hold limit, or a chunk fenced by a failover).
    queue: VecDeque<Option<Vec<i64>>>,
    /// The last dead letter the selection gave.
    after: i64,
    /// Dead letters per chunk: halved for the rest of the replay by a chunk that ran out of time.
    size: i64,
}

impl Default for Chunks {
    fn default() -> Self {
        Chunks {
            queue: VecDeque::from([None]),
            after: 0,
            size: CHUNK,
        }
    }
}

impl Chunks {
    /// The next chunk; dead letters taken again in pieces of the size allowed now.
    fn next(&mut self) -> Option<Option<Vec<i64>>> {
        loop {
            match self.queue.pop_front()? {
                Some(ids) if ids.len() as i64 > self.size => {
                    for piece in ids.chunks(self.size as usize).rev() {
                        self.queue.push_front(Some(piece.to_vec()));
                    }
                }
                item => return Some(item),
            }
        }
    }

    /// `item` gave `locked`: the selection's next chunk is queued last, behind the halves and
    /// retries of this one (an empty chunk leaves the queue empty).
    fn taken(&mut self, item: &Option<Vec<i64>>, locked: &[StoredDeadLetter]) {
        if let (None, Some(last)) = (item, locked.last()) {
            self.after = last.id;
            self.queue.push_back(None);
        }
    }

    /// `ids` again, in halves; `out_of_time` (cancelled at the hold limit): smaller chunks from
    /// now on.
    fn halve(&mut self, ids: &[i64], out_of_time: bool) {
        if out_of_time {
            self.size = self.size.min(ids.len() as i64 / 2).max(1);
        }
        let (a, b) = ids.split_at(ids.len() / 2);
        self.queue.push_front(Some(b.to_vec()));
        self.queue.push_front(Some(a.to_vec()));
    }

    /// `ids` again, next.
    fn again(&mut self, ids: Vec<i64>) {
        self.queue.push_front(Some(ids));
    }
}

/// Locks the selection's next chunk (`ids`: `None`), or those dead letters again, in the open
/// transaction.
async fn lock(
    w: &mut BatchWriter,
    sel: &Selection,
    ids: Option<&[i64]>,
    chunks: &Chunks,
) -> Result<Vec<StoredDeadLetter>, StoreError> {
    let (from, n) = match ids {
        None => (chunks.after, chunks.size),
        Some(ids) => (0, ids.len() as i64),
    };
    w.lock_dead_letters(sel, from, n, ids).await
}

/// A statement cancelled by the server: past the hold limit, or waiting longer than it for a
/// lock, while it held the lease row ([`BatchWriter::begin`]); or by an administrator. Or a
/// chunk's later round with nothing left of the hold limit ([`BatchWriter::write`]).
fn cancelled(e: &StoreError) -> bool {
    matches!(e.sqlstate(), Some("57014" | "55P03")) || matches!(e, StoreError::Timeout(_))
}

/// How long a replay waits for a leader (a failover in the middle takes about `LEASE_TTL`).
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// The current leader's lease, which replayed rows are written under, and how long a chunk
/// may hold its row at a time ([`Fence::step_limit`] of the leader's TTL, not this host's
/// setting); waits up to [`LEADER_WAIT`] for a leader.
async fn read_fence(
    c: &leasehold_store::Client,
    lease_name: &str,
) -> anyhow::Result<(Fence, Duration)> {
    let started = Instant::now();
    loop {
        if let Some(l) = leasehold_store::queries::lease(c, lease_name).await? {
            if l.is_live() {
                let hold = Fence::step_limit(l.ttl());
                let fence = Fence {
                    lease_name: lease_name.to_string(),
                    holder_id: l.holder_id,
                    epoch: l.epoch,
                };
                return Ok((fence, hold));
            }
        }
        if started.elapsed() > LEADER_WAIT {
            bail!("no node has held the lease {lease_name:?} for {}s: replay writes under the leader's lease (its fence), so start a node and run it again", LEADER_WAIT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How messages become rows.
struct Shape<'a> {
    decoder: &'a Decoder,
    written_by: &'a str,
    /// Every route of the configuration, `telemetry` first; why each is suspended; each one's
    /// place in the statement (`None`: suspended, not in it).
    routes: &'a [ResolvedRoute],
    suspended: &'a [Option<String>],
    to_stmt: &'a [Option<usize>],
    max_payload_bytes: usize,
    redelivery_window: Duration,
}

/// What one chunk came to.
#[derive(Default)]
struct Done {
    /// Dead letters run again (removed: stored now, or written anew by the statement).
    replayed: Vec<i64>,
    /// Of them, the new reasons of those that failed again.
    failing: Vec<String>,
    /// Dead letters left as they were, and why.
    kept: Vec<Kept>,
}

/// Why a dead letter is left as it was, unread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kept {
    /// No route it was for is configured any more (or takes its topic).
    NoRoute,
    /// Its payload is larger than `MAX_PAYLOAD_BYTES` now, or was cut when it was received (too
    /// large then) and would fit now.
    TooLarge,
    /// A named route it is for does not fit its table now (`leasehold routes` says why).
    Unfit,
}

impl std::fmt::Display for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kept::NoRoute => "no configured route takes it",
            Kept::TooLarge => "over MAX_PAYLOAD_BYTES now, or cut when received",
            Kept::Unfit => "its route does not fit its table now",
        })
    }
}

/// The chunk's dead letters that run, in batches of one kind — the routes they go to (places
/// in `shape.routes`; `None`: all of them) — each written by a statement of its own, in order;
/// those left as they were are counted in `done.kept`.
///
/// In the order received, as the leader took them: the first of a key by arrival in the chunk
/// is the one written. A statement holds dead letters of one kind (the same routes): each kind
/// is prepared apart, so two kinds in one statement could bring one key of one route twice,
/// unordered — and a route whose key is not text would skip the second without a word. A
/// DUP-flagged dead letter is a redelivery only of a copy stored within REDELIVERY_WINDOW and
/// the last MAX_PENDING + 2,048 readings before it; a statement measures both from its first
/// DUP-flagged message's receipt time, and a chunk's dead letters may be days apart. So a
/// DUP-flagged one starts a new statement, and what was received before it is written by the
/// statements before; DUP-flagged ones within [`DUP_SLACK`] after it share its statement (as in
/// a live batch).
fn batches<'h>(items: &'h [Held], shape: &Shape<'_>, done: &mut Done) -> Vec<Batch<'h>> {
    let mut run = Vec::new();
    for item in items {
        let d = &item.0;
        let size = usize::try_from(d.size).unwrap_or(0);
        let why = match targets(d, shape.routes) {
            // Larger than the limit now: run again, it would be cut. Stored cut (too large when
            // received) and within the limit now: its first bytes would be read as the whole
            // message. (Cut and still over the limit, it is refused again, and nothing cut.)
            _ if d.payload.len() > shape.max_payload_bytes
                || (d.payload.len() < size && size <= shape.max_payload_bytes) =>
            {
                Kept::TooLarge
            }
            Some(t) if t.is_empty() => Kept::NoRoute,
            // Run now, it would only become `route_unavailable`, its reason and words lost.
            Some(t) if t.iter().any(|&k| shape.suspended[k].is_some()) => Kept::Unfit,
            t => {
                run.push((t, item));
                continue;
            }
        };
        // Each dead letter it stands for (a joined array stands for its elements').
        done.kept.extend(std::iter::repeat_n(why, item.1.len()));
    }
    run.sort_by_key(|(_, (d, _))| (d.received_at, d.id));
    let mut batches: Vec<Batch<'h>> = Vec::new();
    let mut first_dup = None;
    for (t, item) in run {
        let at = item.0.received_at;
        let near = |f: DateTime<Utc>| (at - f).to_std().is_ok_and(|d| d <= DUP_SLACK);
        let same = batches.last().is_some_and(|(k, _)| *k == t);
        let joins = match item.0.dup {
            true => same && first_dup.is_some_and(near),
            false => same,
        };
        match batches.last_mut() {
            Some((_, group)) if joins => group.push(item),
            _ => {
                first_dup = item.0.dup.then_some(at);
                batches.push((t, vec![item]));
            }
        }
    }
    batches
}

/// How long after a statement's first DUP-flagged dead letter others share its statement (and
/// its redelivery window and count, measured from that first one), as in a live batch.
const DUP_SLACK: Duration = Duration::from_secs(1);

/// Dead letters that go to the same routes, written by one statement.
type Batch<'h> = (Option<Vec<usize>>, Vec<&'h Held>);

/// Runs `locked` through the configuration and writes what it becomes, inside the open
/// transaction, in one or more statements ([`batches`]). A dead letter of a named route goes to
/// that route only (its other routes took their share when it was received); one of the
/// default route through the whole configuration.
async fn attempt(
    w: &mut BatchWriter,
    fence: &Fence,
    locked: &[StoredDeadLetter],
    shape: &Shape<'_>,
) -> Result<Done, StoreError> {
    let mut done = Done::default();
    let items = whole_arrays(locked, shape.max_payload_bytes);
    let batches = batches(&items, shape, &mut done);
    let mut reasons: BTreeMap<usize, String> = BTreeMap::new();
    let mut ids: Vec<i64> = Vec::new();
    let mut owner: Vec<Vec<i64>> = Vec::new();
    // Rows and dead letters are numbered by the readings of the chunk (a dead letter may hold
    // several: an array, a SenML pack).
    let mut units = 0;
    for (target, group) in batches {
        let places: Vec<usize> = match &target {
            Some(t) => std::iter::once(0).chain(t.iter().copied()).collect(),
            None => (0..shape.routes.len()).collect(),
        };
        let routes: Vec<ResolvedRoute> = places.iter().map(|&k| shape.routes[k].clone()).collect();
        let suspended: Vec<Option<String>> =
            places.iter().map(|&k| shape.suspended[k].clone()).collect();
        let held: Vec<&StoredDeadLetter> = group.iter().map(|(d, _)| d).collect();
        let (batch, clock) = messages(&held);
        let mut clock = clock.exact();
        ids.extend(group.iter().flat_map(|(_, ids)| ids.iter().copied()));
        let prepared = prepare(
            shape.decoder,
            &batch,
            &mut clock,
            shape.max_payload_bytes,
            Routing {
                routes: &routes,
                written_by: shape.written_by,
                lease_epoch: fence.epoch,
                suspended: &suspended,
                redelivery_window: shape.redelivery_window,
            },
        );
        let base = units;
        units += prepared.units;
        // Each reading's dead letter(s): the held item of the message it came from.
        owner.extend(prepared.owners.iter().map(|&m| group[m].1.clone()));
        // Rows name their route's place in the statement, and their reading by its place in
        // the chunk.
        let place = |mut r: RouteRow| -> Option<RouteRow> {
            r.route = shape.to_stmt[places[r.route]]?;
            r.idx += base;
            Some(r)
        };
        let mut dead = Vec::with_capacity(prepared.dead.len());
        for d in prepared.dead {
            reasons
                .entry(d.idx + base)
                .or_insert_with(|| d.reason.to_string());
            dead.push(DeadLetter {
                idx: d.idx + base,
                ..d
            });
        }
        let rows = prepared.rows.into_iter().filter_map(place).collect();
        let later = prepared.later.into_iter();
        let later = later.map(|round| round.into_iter().filter_map(place).collect());
        write_parts(w, fence, rows, dead, later.collect(), &mut reasons).await?;
    }
    let failing = failing_by_id(reasons, &owner);
    done.replayed = ids;
    done.failing = failing.into_values().collect();
    Ok(done)
}

/// Writes one statement's rows and dead letters of a chunk (the rows of a later round after the
/// first), noting each reading that failed (a conflict, not stored) and forgetting each the
/// statement found stored already.
async fn write_parts(
    w: &mut BatchWriter,
    fence: &Fence,
    rows: Vec<RouteRow>,
    dead: Vec<DeadLetter>,
    later: Vec<Vec<RouteRow>>,
    reasons: &mut BTreeMap<usize, String>,
) -> Result<(), StoreError> {
    let parts = std::iter::once((rows, dead)).chain(later.into_iter().map(|r| (r, Vec::new())));
    for (rows, dead) in parts {
        if rows.is_empty() && dead.is_empty() {
            continue;
        }
        let out = w.write(fence, &rows, &dead).await?;
        for o in &out.routes {
            for (failed, reason) in [(&o.conflicts, "conflict"), (&o.unstored, "not_stored")] {
                for &i in failed {
                    reasons.entry(i).or_insert_with(|| reason.into());
                }
            }
        }
        // A dead letter the statement found to be the redelivery of a stored one is stored.
        for i in &out.redelivered {
            reasons.remove(i);
        }
    }
    Ok(())
}

/// A dead letter fails again when any reading it holds does (one reason per dead letter, its
/// first reading's): the others of it are stored, once, by the same statement.
fn failing_by_id(reasons: BTreeMap<usize, String>, owner: &[Vec<i64>]) -> BTreeMap<i64, String> {
    let mut failing: BTreeMap<i64, String> = BTreeMap::new();
    for (unit, reason) in reasons {
        for &id in owner.get(unit).map(Vec::as_slice).unwrap_or_default() {
            failing.entry(id).or_insert_with(|| reason.clone());
        }
    }
    failing
}

/// A dead letter to run again, and the ids of the dead letters it stands for.
type Held = (StoredDeadLetter, Vec<i64>);

/// The dead letters, each with its id; the elements of one JSON array none of which became a
/// reading (all `n` of them here, `element k of n`, from one delivery) joined into that array
/// again, with all their ids: a format configured since (`senml`, a pack once read as a JSON
/// array) reads the message whole, as it would have on arrival.
fn whole_arrays(locked: &[StoredDeadLetter], max_payload_bytes: usize) -> Vec<Held> {
    type Key<'a> = (
        &'a str,
        Option<i32>,
        bool,
        Option<&'a str>,
        chrono::DateTime<Utc>,
        usize,
    );
    let mut arrays: BTreeMap<Key<'_>, Vec<(usize, &StoredDeadLetter)>> = BTreeMap::new();
    let mut out = Vec::new();
    for d in locked {
        match leasehold_decode::element_place(&d.error).filter(|&(k, n)| k >= 1 && k <= n) {
            Some((k, n)) => {
                // Element k was the array's k-th reading, k-1 microseconds after its receipt.
                let at = d.received_at - chrono::Duration::microseconds(k as i64 - 1);
                let key = (d.topic.as_str(), d.pkid, d.dup, d.route.as_deref(), at, n);
                arrays.entry(key).or_default().push((k, d));
            }
            None => out.push((d.clone(), vec![d.id])),
        }
    }
    for ((_, _, _, _, at, n), mut parts) in arrays {
        parts.sort_by_key(|(k, _)| *k);
        parts.dedup_by_key(|(k, _)| *k);
        if parts.len() != n {
            out.extend(parts.into_iter().map(|(_, d)| (d.clone(), vec![d.id])));
            continue;
        }
        let elements: Vec<&[u8]> = parts.iter().map(|(_, d)| &d.payload[..]).collect();
        let payload = [&b"["[..], &elements.join(&b','), b"]"].concat();
        // Over the limit now (lowered since): element by element, as it stands.
        if payload.len() > max_payload_bytes {
            out.extend(parts.into_iter().map(|(_, d)| (d.clone(), vec![d.id])));
            continue;
        }
        let first = parts[0].1;
        out.push((
            StoredDeadLetter {
                size: i32::try_from(payload.len()).unwrap_or(i32::MAX),
                payload,
                received_at: at,
                ..first.clone()
            },
            parts.iter().map(|(_, d)| d.id).collect(),
        ));
    }
    out
}

/// The places (in `routes`) of the named routes dead letter `d` was for and whose filters still
/// take its topic (empty: none is configured any more); `None` for the default route's.
fn targets(d: &StoredDeadLetter, routes: &[ResolvedRoute]) -> Option<Vec<usize>> {
    let names = d.route.as_deref()?;
    let mut t: Vec<usize> = names
        .split(',')
        .filter_map(|n| {
            routes.iter().enumerate().skip(1).find(|(_, r)| {
                r.spec.name == n && r.spec.topics.iter().any(|f| rumqttc::matches(&d.topic, f))
            })
        })
        .map(|(k, _)| k)
        .collect();
    // A name written twice (by hand) is one route: a statement holds one row per route and
    // message.
    t.sort_unstable();
    t.dedup();
    Some(t)
}

/// The dead letters as messages again: topic, bytes, packet id and DUP flag as received, their
/// receipt times kept (each placed on a clock that reads them back exactly).
fn messages(locked: &[&StoredDeadLetter]) -> (Vec<Inbound>, DbClock) {
    let earliest = locked
        .iter()
        .map(|d| d.received_at)
        .min()
        .unwrap_or_else(Utc::now);
    let base = Instant::now();
    let batch = locked
        .iter()
        .map(|d| {
            let mut m = Inbound::detached(&d.topic, &d.payload);
            m.pkid = d.pkid.and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
            m.dup = d.dup;
            m.original_size = usize::try_from(d.size).unwrap_or(d.payload.len());
            let after = (d.received_at - earliest).to_std().unwrap_or_default();
            m.received = base + after;
            m
        })
        .collect();
    (batch, DbClock::new(earliest, base))
}

/// `leasehold replay`: the selection's dead letters through the active configuration, progress
/// on a terminal, then a summary. Exit 0 when the replay ran to its end: every selected dead
/// letter processed (some may fail again: they stay, with their new reason), but those another
/// replay held or someone removed meanwhile, which the summary counts as not processed.
pub async fn command(
    own: &Config,
    job: Job,
    dry_run: bool,
) -> anyhow::Result<std::process::ExitCode> {
    use std::io::IsTerminal;
    let c = crate::admin::connect_to(&job.database_url, "leasehold-replay").await?;
    let cfg = crate::cluster_config::effective(own, &c).await?;
    let sel = job.selection(&c).await?;
    let found = leasehold_store::replay::count(&c, &sel).await?;
    let total: i64 = found.iter().map(|(_, n)| n).sum();
    let by: Vec<String> = found.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    let by = match by.is_empty() {
        true => String::new(),
        false => format!(" ({})", by.join(", ")),
    };
    let window = match sel.received_after {
        Some(t) => format!(
            ", received after {}",
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ),
        None => String::new(),
    };
    println!("{total} dead letters selected{by}{window}");
    let terminal = std::io::stderr().is_terminal();
    let mut show = |s: &Summary| {
        if terminal {
            eprint!(
                "\r{} of {total} processed, {} stored",
                s.processed, s.stored
            );
        }
    };
    let summary = replay(&cfg, &c, &job.database_url, &sel, dry_run, Some(&mut show)).await?;
    if terminal {
        eprintln!();
    }
    println!("{:<28} {:>10}", "", "dead letters");
    println!("{:<28} {:>10}", "processed", summary.processed);
    println!("{:<28} {:>10}", "stored (removed)", summary.stored);
    for (reason, n) in &summary.failing {
        println!("{:<28} {:>10}", format!("failing again: {reason}"), n);
    }
    for (why, n) in &summary.left {
        println!("{:<28} {:>10}", format!("left as they were ({why})"), n);
    }
    // Held by another replay (or a dry run, or the leader's replay of a resumed route) when
    // this one reached them, or removed: a later replay takes what is left.
    let missed = u64::try_from(total)
        .unwrap_or(0)
        .saturating_sub(summary.processed);
    if missed > 0 {
        println!("{:<28} {:>10}", "not processed", missed);
    }
    if dry_run {
        println!("dry run: every change was rolled back");
    }
    Ok(std::process::ExitCode::SUCCESS)
}
