//! A gathered batch turned into what the store writes: readings with unique keys (later readings
//! of a key in later rounds) and dead letters, each tagged with its position in the batch, and
//! what could already be decided without the database (decode failures, redeliveries of a
//! message that is in the same batch).
//!
//! Pure: no I/O, so the rules are unit-tested here and the store only checks against what is
//! stored.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use leasehold_config::{Format, OnConflict, Source};
use leasehold_decode::sparkplug::Host;
use leasehold_decode::{DecodeError, Decoder, Unit};
use leasehold_ingest::Inbound;
use leasehold_store::routes::ResolvedRoute;
use leasehold_store::{DeadLetter, Message, RouteRow};

use crate::routing;

/// The label of a dead-letter reason in metrics and in `dead_letters.reason`.
pub fn reason_label(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::TooLarge { .. } => "too_large",
        DecodeError::NotJson(_) => "not_json",
        DecodeError::NotObject(_) => "not_object",
        DecodeError::NulEscape => "nul_escape",
        DecodeError::NoDeviceId { .. } => "no_device_id",
        DecodeError::DeviceIdTooLong => "device_id_too_long",
        DecodeError::BadTimestamp { .. } => "bad_timestamp",
        DecodeError::NotUtf8 => "not_utf8",
        DecodeError::NoReadings(_) => "no_readings",
        DecodeError::BadSenml(_) => "bad_senml",
        DecodeError::BadSparkplug(_) => "bad_sparkplug",
        DecodeError::UnknownAlias(_) => "unknown_alias",
        DecodeError::NoBirth(_) => "no_birth",
        DecodeError::SequenceGap(_) => "sequence_gap",
        DecodeError::TooManyReadings { .. } => "too_many_readings",
    }
}

/// Places local receipt instants on the database's clock, strictly increasing at microsecond
/// resolution: two timestamp-less readings of one device and topic never share a `ts`, and a
/// retried batch gets the very same times (its rows are prepared once).
#[derive(Debug, Clone, Copy)]
pub struct DbClock {
    db_micros: i64,
    local: Instant,
    last: i64,
    /// Times as given, not made strictly increasing (a replay keeps each original receipt time).
    exact: bool,
}

impl DbClock {
    /// `db` was the database's time at the local instant `local`.
    pub fn new(db: DateTime<Utc>, local: Instant) -> Self {
        DbClock {
            db_micros: db.timestamp_micros(),
            local,
            last: i64::MIN,
            exact: false,
        }
    }

    /// Reads times back exactly as placed, equal ones included (for replayed messages, whose
    /// receipt times are their identity).
    pub fn exact(mut self) -> Self {
        self.exact = true;
        self
    }

    /// Reads the database's clock again (a node's monotonic clock drifts from it over a long
    /// term), keeping receipt times strictly increasing.
    pub fn remeasure(&mut self, db: DateTime<Utc>, local: Instant) {
        self.db_micros = db.timestamp_micros();
        self.local = local;
    }

    /// Keeps the next `n` microseconds after the last time read for the readings of one
    /// message, each at its own instant (an array's elements after its first).
    pub fn reserve(&mut self, n: usize) {
        if !self.exact {
            self.last = self.last.saturating_add(n as i64);
        }
    }

    /// When the database's clock was last read, on the local clock.
    pub fn measured_at(&self) -> Instant {
        self.local
    }

    pub fn at(&mut self, when: Instant) -> DateTime<Utc> {
        let offset = match when.checked_duration_since(self.local) {
            Some(after) => after.as_micros() as i64,
            None => -(self.local.duration_since(when).as_micros() as i64),
        };
        let us = match self.exact {
            true => self.db_micros + offset,
            false => (self.db_micros + offset).max(self.last.saturating_add(1)),
        };
        self.last = us;
        DateTime::from_timestamp_micros(us).unwrap_or_else(Utc::now)
    }
}

/// A batch ready for the store.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Every route's rows, keys unique per route: the first of each key by arrival
    /// (`on_conflict = "nothing"`, `telemetry` too) or the last (`"update"`).
    pub rows: Vec<RouteRow>,
    pub dead: Vec<DeadLetter>,
    /// Leasehold's own messages (cluster claims, `leasehold doctor`'s probes), received only
    /// under a filter such as `#`: acknowledged, never stored as readings.
    pub own: u64,
    /// Later rows of a key already in `rows` (`"nothing"` only): `later[0]` holds each key's
    /// second row, `later[1]` its third, ... Each round is written after the previous one
    /// committed, so the table itself settles duplicate or conflict against what was really
    /// stored (the first may have been refused), with the column types' own equality.
    pub later: Vec<Vec<RouteRow>>,
    /// Redeliveries of an earlier message of the batch (DUP, same topic, packet id and bytes).
    pub redelivered: u64,
    /// Per route: rows replaced by a later message of the same key in this batch
    /// (`"update"`: the last by arrival wins, the earlier count as written over).
    pub superseded: Vec<u64>,
    /// `(route, position)` of a row in `rows` -> the row of the same key it replaced. When
    /// the database refuses the later row, the one it replaced is written instead, as if the
    /// messages had been written one by one.
    pub replaced: HashMap<(usize, usize), RouteRow>,
    /// How many readings (or parts refused) the messages made: rows and dead letters are
    /// numbered by them (`idx`), `0..units`. A JSON object is one; an array, one per element.
    pub units: usize,
    /// Per reading (`idx`): the place of its message in the batch.
    pub owners: Vec<usize>,
}

/// The term's routes (`telemetry` first) and what their sources `written_by` and `lease_epoch`
/// read.
#[derive(Debug, Clone, Copy)]
pub struct Routing<'a> {
    pub routes: &'a [ResolvedRoute],
    pub written_by: &'a str,
    pub lease_epoch: i64,
    /// Per route of `routes`: why it is suspended (its table cannot be written now), or `None`.
    /// A message for a suspended route is its `route_unavailable` dead letter; shorter than
    /// `routes` (empty, usually): the rest are not suspended.
    pub suspended: &'a [Option<String>],
    /// `REDELIVERY_WINDOW`: a DUP-flagged message is the redelivery of an earlier one of the
    /// batch (same topic, packet id and bytes) only if that was received less than this before
    /// it, as across batches. Further apart it is a publish of its own: the broker reuses packet
    /// ids.
    pub redelivery_window: Duration,
}

/// Decodes `batch` and settles what the batch alone can settle. `max_payload_bytes` bounds the
/// bytes a dead letter keeps. Without routes, `telemetry` alone.
pub fn prepare(
    decoder: &Decoder,
    batch: &[Inbound],
    clock: &mut DbClock,
    max_payload_bytes: usize,
    routing: Routing<'_>,
) -> Prepared {
    prepare_with(decoder, batch, clock, max_payload_bytes, routing, None)
}

/// [`prepare`], with the Sparkplug B host that reads `sparkplug_b` topics in order (its births
/// and sequence numbers); without one, each such message is read alone.
pub fn prepare_with(
    decoder: &Decoder,
    batch: &[Inbound],
    clock: &mut DbClock,
    max_payload_bytes: usize,
    routing: Routing<'_>,
    mut sparkplug: Option<&mut Host>,
) -> Prepared {
    let telemetry;
    let routing = if routing.routes.is_empty() {
        telemetry = [ResolvedRoute::telemetry()];
        Routing {
            routes: &telemetry,
            ..routing
        }
    } else {
        routing
    };
    // Only a DUP-flagged message can be a redelivery: a batch without one (the common case)
    // needs no index of its deliveries.
    let any_dup = batch.iter().any(|m| m.dup);
    let mut p = Preparer {
        decoder,
        batch,
        max_payload_bytes,
        routing,
        hashes: routing
            .routes
            .iter()
            .map(|r| {
                r.column_of(&Source::ContentHash).is_some()
                    || r.column_of(&Source::PossibleDuplicate).is_some()
            })
            .collect(),
        objects: routing.routes.iter().map(routing::reads_object).collect(),
        plans: routing.routes.iter().map(routing::Plan::of).collect(),
        out: Prepared {
            rows: Vec::with_capacity(batch.len()),
            owners: Vec::with_capacity(batch.len()),
            superseded: vec![0; routing.routes.len()],
            ..Prepared::default()
        },
        units: Vec::with_capacity(batch.len()),
        keys: HashMap::with_capacity_and_hasher(batch.len(), Default::default()),
        slots: Vec::with_capacity(batch.len()),
        hasher: foldhash::fast::RandomState::default(),
        deliveries: HashMap::default(),
        earlier_delivery: vec![usize::MAX; if any_dup { batch.len() } else { 0 }],
    };
    for (at, m) in batch.iter().enumerate() {
        if leasehold_config::is_own_topic(&m.topic) {
            p.out.own += 1;
            continue;
        }
        if any_dup && p.redelivered_in_batch(at, m) {
            p.out.redelivered += 1;
            continue;
        }
        let received_at = clock.at(m.received);
        let skipped = sparkplug.as_ref().map_or(0, |h| h.redeliveries_skipped());
        let units = units_of(
            decoder,
            m,
            max_payload_bytes,
            sparkplug.as_deref_mut(),
            received_at,
        );
        // A redelivery the Sparkplug host read already (its batch committed): a duplicate.
        if sparkplug.as_ref().map_or(0, |h| h.redeliveries_skipped()) > skipped {
            p.out.redelivered += 1;
            continue;
        }
        // Each reading of the message at its own microsecond: two readings of one device
        // without a timestamp of their own are never one key.
        clock.reserve(units.len().saturating_sub(1));
        for (k, u) in units.into_iter().enumerate() {
            let received_at = match k {
                0 => received_at,
                k => received_at + chrono::Duration::microseconds(k as i64),
            };
            p.unit(at, m, u, received_at);
        }
    }
    p.out.units = p.units.len();
    p.out
}

/// The routes a message goes to (places in `Routing::routes`): most go to one, without an
/// allocation.
type Matched = smallvec::SmallVec<[usize; 4]>;

/// The state of one [`prepare`].
struct Preparer<'a> {
    decoder: &'a Decoder,
    batch: &'a [Inbound],
    max_payload_bytes: usize,
    routing: Routing<'a>,
    /// Per route: whether it maps `content_hash` or `possible_duplicate` (then a timestamp-less
    /// message's hash is computed here, once: the statement reads both from the message).
    hashes: Vec<bool>,
    /// Per route: whether it reads the payload's object ([`routing::reads_object`]).
    objects: Vec<bool>,
    /// Per route: how its rows are made.
    plans: Vec<routing::Plan>,
    out: Prepared,
    /// Per unit (`idx`): its message and what its dead letter keeps.
    units: Vec<Held>,
    /// Hash of a row's route and key -> the last of `slots` with that hash; each slot is a
    /// row's (round, position) and the slot of the previous row with the same hash (compared in
    /// full on a hit), so the common case of unique keys costs no copy of the key.
    keys: HashMap<u64, usize, foldhash::fast::RandomState>,
    slots: Vec<(usize, usize, Option<usize>)>,
    hasher: foldhash::fast::RandomState,
    /// Hash of (topic, packet id) -> the last message of the batch with it; `earlier_delivery`
    /// chains each message to the previous one with the same hash.
    deliveries: HashMap<u64, usize, foldhash::fast::RandomState>,
    earlier_delivery: Vec<usize>,
}

/// A message's readings: one (most messages, without an allocation), or a format's list.
type Units = smallvec::SmallVec<[Unit; 1]>;

/// How message `m` is read: refused whole when it was cut at the size limit, itself when it is
/// a plain JSON object (most messages), else its format's list of readings (Sparkplug B in
/// order through `sparkplug` where there is a host).
fn units_of(
    decoder: &Decoder,
    m: &Inbound,
    max_payload_bytes: usize,
    sparkplug: Option<&mut Host>,
    received_at: DateTime<Utc>,
) -> Units {
    // The ingest keeps only the first MAX_PAYLOAD_BYTES of an oversized payload.
    if m.original_size > max_payload_bytes {
        let size = m.original_size;
        let e = DecodeError::TooLarge {
            size,
            max: max_payload_bytes,
        };
        smallvec::smallvec![Unit::refused(m.payload.clone(), e)]
    } else if decoder.is_plain(&m.topic, &m.payload) {
        // The common message, a JSON object: itself, without a list of one.
        smallvec::smallvec![Unit::whole(&m.payload)]
    } else if let Some(host) =
        sparkplug.filter(|_| decoder.format_of(&m.topic) == Format::SparkplugB)
    {
        Units::from_vec(host.read_delivery(&m.topic, &m.payload, m.dup, m.pkid))
    } else {
        Units::from_vec(decoder.units(&m.topic, &m.payload, received_at))
    }
}

/// What a unit's dead letter keeps (its message: `Prepared::owners`).
struct Held {
    /// `None`: the message's payload as held.
    raw: Option<bytes::Bytes>,
    /// The size as published (a whole message's), or the raw bytes' own.
    size: usize,
    label: Option<String>,
}

impl Preparer<'_> {
    /// Whether `m` is the broker's redelivery (DUP, same topic, packet id and bytes, within the
    /// redelivery window) of an earlier message of this batch; remembers `m` otherwise.
    fn redelivered_in_batch(&mut self, idx: usize, m: &Inbound) -> bool {
        let h = self.hasher.hash_one((&m.topic, m.pkid));
        let mut at = self.deliveries.get(&h).copied().unwrap_or(usize::MAX);
        if m.dup {
            let window = self.routing.redelivery_window;
            while let Some(e) = self.batch.get(at) {
                // Received before it, less than the window before (as the statement's
                // `received_at > floor` looks for a stored copy).
                let before = m.received.checked_duration_since(e.received);
                if e.pkid == m.pkid
                    && e.topic == m.topic
                    && e.payload == m.payload
                    && before.is_some_and(|d| d < window)
                {
                    return true;
                }
                at = self.earlier_delivery[at];
            }
        }
        self.earlier_delivery[idx] = self.deliveries.insert(h, idx).unwrap_or(usize::MAX);
        false
    }

    /// The routes `topic` goes to: the named routes whose filters match it, else `telemetry`.
    fn matching(&self, topic: &str) -> Matched {
        let named = self.routing.routes.get(1..).unwrap_or_default();
        let matched: Matched = routing::matching(named, topic)
            .into_iter()
            .map(|k| k + 1)
            .collect();
        match matched.is_empty() {
            true => smallvec::smallvec![0],
            false => matched,
        }
    }

    /// A dead letter for message `idx` (its bytes as held).
    fn dead(
        &mut self,
        idx: usize,
        received_at: DateTime<Utc>,
        reason: &'static str,
        route: Option<String>,
        error: String,
    ) {
        let u = &self.units[idx];
        let m = &self.batch[self.out.owners[idx]];
        let raw = u.raw.as_ref().unwrap_or(&m.payload);
        let error = leasehold_store::placed(u.label.as_deref(), error);
        self.out.dead.push(DeadLetter {
            idx,
            topic: m.topic.clone(),
            payload: raw.slice(..raw.len().min(self.max_payload_bytes)),
            size: u.size,
            reason,
            error,
            received_at,
            pkid: i32::from(m.pkid),
            dup: m.dup,
            route,
        });
    }

    /// Reading `u` of message `at`, its row or dead letter, its message's bytes held once.
    fn unit(&mut self, at: usize, m: &Inbound, u: Unit, received_at: DateTime<Utc>) {
        let idx = self.units.len();
        self.out.owners.push(at);
        // The message's own bytes: its size as published (a payload over the limit was cut).
        let whole = u.raw.as_ptr() == m.payload.as_ptr() && u.raw.len() == m.payload.len();
        self.units.push(Held {
            size: match whole {
                true => m.original_size.max(m.payload.len()),
                false => u.raw.len(),
            },
            raw: (!whole).then(|| u.raw.clone()),
            label: u.label.clone(),
        });
        self.message(idx, m, u, received_at);
    }

    /// Sets aside the routes of `matched` that are suspended: the message's share of each waits
    /// as a `route_unavailable` dead letter of its own.
    fn set_aside_suspended(
        &mut self,
        idx: usize,
        received_at: DateTime<Utc>,
        matched: &mut Matched,
    ) {
        let routes = self.routing.routes;
        // A suspended route's share of the message waits as a dead letter of its own.
        let suspended = self.routing.suspended;
        matched.retain(|&mut k| match suspended.get(k).and_then(Option::as_ref) {
            None => true,
            Some(why) => {
                let name = routes[k].spec.name.clone();
                let error = format!("route {name} is suspended: {why}");
                self.dead(idx, received_at, ROUTE_UNAVAILABLE, Some(name), error);
                false
            }
        });
    }

    /// The unit's reading: as its format decoded it, with the whole object where a route reads
    /// one; else the payload read now (in full only for such a route).
    fn parse(
        &self,
        m: &Inbound,
        decoded: Option<Result<leasehold_decode::Parsed, DecodeError>>,
        payload: &[u8],
        objects: bool,
    ) -> Result<leasehold_decode::Parsed, DecodeError> {
        match decoded {
            // A format read the device id and timestamp only: a route reads the object.
            // (Its device id and timestamp stay the format's: a Sparkplug metric named
            // `timestamp` is not the reading's time.)
            Some(Ok(p)) if objects && p.object.is_none() => self
                .decoder
                .parse_full(&m.topic, payload)
                .map(|full| leasehold_decode::Parsed {
                    device_id: p.device_id,
                    timestamp: p.timestamp,
                    ..full
                }),
            Some(decoded) => decoded,
            None if objects => self.decoder.parse(&m.topic, payload),
            None => self.decoder.parse_light(&m.topic, payload),
        }
    }

    /// A unit that could not be read: one dead letter for it, naming every named route it was
    /// for.
    fn undecodable(
        &mut self,
        idx: usize,
        received_at: DateTime<Utc>,
        matched: &[usize],
        e: &DecodeError,
    ) {
        let routes = self.routing.routes;
        let (route, error) = if matched == [0] {
            (None, e.to_string())
        } else {
            let names: Vec<&str> = matched
                .iter()
                .map(|&k| routes[k].spec.name.as_str())
                .collect();
            let word = if names.len() == 1 { "route" } else { "routes" };
            (
                Some(names.join(",")),
                format!("{word} {}: {e}", names.join(", ")),
            )
        };
        self.dead(idx, received_at, reason_label(e), route, error);
    }

    /// Unit `idx` of message `m`: its rows, or its dead letters.
    fn message(&mut self, idx: usize, m: &Inbound, unit: Unit, received_at: DateTime<Utc>) {
        let mut matched = self.matching(&m.topic);
        let routes = self.routing.routes;
        if !self.routing.suspended.is_empty() {
            self.set_aside_suspended(idx, received_at, &mut matched);
            if matched.is_empty() {
                return;
            }
        }
        let objects = matched.iter().any(|&k| self.objects[k]);
        let raw_is_payload = unit.raw_is_payload();
        let Unit {
            payload,
            raw,
            label,
            decoded,
        } = unit;
        let parsed = self.parse(m, decoded, &payload, objects);
        let mut parsed = match parsed {
            Ok(p) => p,
            Err(e) => {
                self.undecodable(idx, received_at, &matched, &e);
                return;
            }
        };
        let content_hash = (matches!(parsed.timestamp, Ok(None))
            && matched.iter().any(|&k| self.hashes[k]))
        .then(|| leasehold_decode::content_hash(&m.topic, &payload));
        let pkid = i32::from(m.pkid);
        let cx = routing::Context {
            topic: &m.topic,
            received_at,
            written_by: self.routing.written_by,
            lease_epoch: self.routing.lease_epoch,
            pkid,
            dup: m.dup,
            content_hash: content_hash.as_deref(),
        };
        let mut message: Option<Arc<Message>> = None;
        // Moved into the message when its first row is made (no copy of the bytes' handles).
        let mut parts = Some((payload, raw, label));
        let last = matched.last().copied();
        for k in matched {
            let route = &routes[k];
            if route.is_default() {
                if let Some(e) = parsed.reading_error(&m.topic) {
                    self.dead(idx, received_at, reason_label(&e), None, e.to_string());
                    continue;
                }
            }
            let values = match Some(k) == last {
                true => routing::last_row(route, &self.plans[k], &mut parsed, cx),
                false => routing::row(route, &self.plans[k], &parsed, cx),
            };
            match values {
                Ok(values) => {
                    let made = message.take().unwrap_or_else(|| {
                        let (payload, raw, label) = parts.take().unwrap_or_default();
                        Arc::new(Message {
                            topic: m.topic.clone(),
                            payload,
                            raw: (!raw_is_payload).then_some(raw),
                            label,
                            received_at,
                            pkid,
                            dup: m.dup,
                            content_hash: content_hash.clone(),
                        })
                    });
                    // The last row takes the message itself: a shared count raised only to be
                    // dropped again costs two locked instructions a message.
                    let message = match Some(k) == last {
                        true => made,
                        false => message.insert(made).clone(),
                    };
                    self.row(RouteRow {
                        idx,
                        route: k,
                        values,
                        message,
                    });
                }
                Err(e) => {
                    let name = &route.spec.name;
                    let error = format!("route {name}: column {:?}: {}", e.column, e.reason);
                    let route = (!route.is_default()).then(|| name.clone());
                    self.dead(idx, received_at, "mapping_failed", route, error);
                }
            }
        }
    }

    /// Places a row: first of its key now; a later one of a `"nothing"` route in a later round;
    /// a later one of an `"update"` route in place of the earlier.
    fn row(&mut self, row: RouteRow) {
        let route = &self.routing.routes[row.route];
        let key = || routing::batch_key(route, &row.values, &row.message.topic);
        let h = {
            let mut h = self.hasher.build_hasher();
            row.route.hash(&mut h);
            key().for_each(|p| p.hash(&mut h));
            h.finish()
        };
        // The rows of this route and key so far: their count, and where the first one is.
        let (mut same, mut first) = (0, None);
        let mut at = self.keys.get(&h).copied();
        while let Some(slot) = at {
            let (r, i, next) = self.slots[slot];
            let other = if r == 0 {
                &self.out.rows[i]
            } else {
                &self.out.later[r - 1][i]
            };
            if other.route == row.route
                && key().eq(routing::batch_key(
                    route,
                    &other.values,
                    &other.message.topic,
                ))
            {
                same += 1;
                first.get_or_insert(i);
            }
            at = next;
        }
        let (round, pos) = match (first, route.spec.on_conflict) {
            (Some(pos), OnConflict::Update) => {
                let (k, idx) = (row.route, row.idx);
                let old = std::mem::replace(&mut self.out.rows[pos], row);
                self.out.replaced.insert((k, idx), old);
                self.out.superseded[k] += 1;
                return;
            }
            (None, _) => {
                self.out.rows.push(row);
                (0, self.out.rows.len() - 1)
            }
            (Some(_), OnConflict::Nothing) => {
                if self.out.later.len() < same {
                    self.out.later.resize_with(same, Vec::new);
                }
                self.out.later[same - 1].push(row);
                (same, self.out.later[same - 1].len() - 1)
            }
        };
        let next = self.keys.insert(h, self.slots.len());
        self.slots.push((round, pos, next));
    }
}

/// `telemetry`, then the named routes: every route of a statement, in its place (the writer's
/// and replay's order).
pub fn with_telemetry<'a>(
    named: impl IntoIterator<Item = &'a ResolvedRoute>,
) -> Arc<[ResolvedRoute]> {
    std::iter::once(ResolvedRoute::telemetry())
        .chain(named.into_iter().cloned())
        .collect()
}

/// The routes a statement writes (those of `routes` not suspended), and each route's place
/// among them (`None`: suspended, not in it).
pub fn statement_routes<T>(
    routes: &[ResolvedRoute],
    suspended: &[Option<T>],
) -> (Vec<ResolvedRoute>, Vec<Option<usize>>) {
    let mut stmt = Vec::new();
    let places = routes
        .iter()
        .zip(suspended)
        .map(|(r, s)| {
            s.is_none().then(|| {
                stmt.push(r.clone());
                stmt.len() - 1
            })
        })
        .collect();
    (stmt, places)
}

/// The reason of a dead letter whose route was suspended: its table could not be written.
pub const ROUTE_UNAVAILABLE: &str = "route_unavailable";

/// A row of a route suspended while its batch was written, as its `route_unavailable` dead
/// letter (the message's other routes still write).
pub fn unavailable(row: &RouteRow, route: &ResolvedRoute, why: &str) -> DeadLetter {
    let name = &route.spec.name;
    let error = format!("route {name} is suspended: {why}");
    dead_letter(row, ROUTE_UNAVAILABLE, Some(name.clone()), error)
}

/// A row PostgreSQL refused, as the dead letter that replaces it (the message's other routes
/// still write).
pub fn rejected(row: &RouteRow, route: &ResolvedRoute, database_text: &str) -> DeadLetter {
    let (name, error) = if route.is_default() {
        (
            None,
            format!("PostgreSQL rejected the reading: {database_text}"),
        )
    } else {
        let name = &route.spec.name;
        (
            Some(name.clone()),
            format!("route {name}: PostgreSQL rejected the row: {database_text}"),
        )
    };
    dead_letter(row, "rejected_by_database", name, error)
}

/// `row`'s message as a dead letter of `route` (its bytes as kept), for `reason`.
fn dead_letter(
    row: &RouteRow,
    reason: &'static str,
    route: Option<String>,
    error: String,
) -> DeadLetter {
    let m = &row.message;
    let kept = m.dead_letter_bytes();
    DeadLetter {
        idx: row.idx,
        topic: m.topic.clone(),
        size: kept.len(),
        payload: kept,
        reason,
        error: m.placed(error),
        received_at: m.received_at,
        pkid: m.pkid,
        dup: m.dup,
        route,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_store::Value;
    use std::collections::HashSet;
    use std::time::Duration;

    fn msg(topic: &str, body: &str, pkid: u16, dup: bool, at: Instant) -> Inbound {
        let mut m = Inbound::detached(topic, body.as_bytes());
        m.pkid = pkid;
        m.dup = dup;
        m.received = at;
        m
    }

    fn run(batch: &[Inbound]) -> Prepared {
        let base = batch
            .first()
            .map(|m| m.received)
            .unwrap_or_else(Instant::now);
        let mut clock = DbClock::new(Utc::now(), base);
        prepare(
            &Decoder::new("devices/{device_id}/#", 1024),
            batch,
            &mut clock,
            1024,
            Routing {
                routes: &[ResolvedRoute::telemetry()],
                written_by: "n",
                lease_epoch: 1,
                suspended: &[],
                redelivery_window: Duration::from_secs(3600),
            },
        )
    }

    fn route(name: &str, filter: &str, on_conflict: OnConflict) -> ResolvedRoute {
        use leasehold_config::{PathStep, RouteSpec, Source};
        use leasehold_store::routes::{ColumnKind, ResolvedColumn};
        let col = |name: &str, source: Source, kind: ColumnKind| ResolvedColumn {
            name: name.into(),
            quoted: format!("\"{name}\""),
            source,
            sql_type: "text".into(),
            kind,
            not_null: true,
            has_default: false,
            collation: None,
        };
        let columns = vec![
            col("id", Source::TopicSegment(1), ColumnKind::Text),
            col(
                "v",
                Source::JsonPath(vec![PathStep::Key("v".into())]),
                ColumnKind::Int4,
            ),
        ];
        let spec = RouteSpec {
            name: name.into(),
            topics: vec![filter.into()],
            table: name.into(),
            key: vec!["id".into()],
            on_conflict,
            columns: columns
                .iter()
                .map(|c| (c.name.clone(), c.source.clone()))
                .collect(),
        };
        ResolvedRoute::new(spec, "public".into(), name.into(), columns)
    }

    #[test]
    fn routed_messages_get_a_row_per_route_keys_settled_by_each_routes_mode() {
        let routes = [
            ResolvedRoute::telemetry(),
            route("first", "r/+", OnConflict::Nothing),
            route("last", "r/#", OnConflict::Update),
        ];
        let t = Instant::now();
        let batch = [
            msg("r/a", r#"{"v":1}"#, 1, false, t),
            msg("r/a", r#"{"v":2}"#, 2, false, t),
            msg("r/a", r#"{"v":"x"}"#, 3, false, t),
            msg("r/b/c", r#"{"v":4}"#, 4, false, t),
            msg("r/a", "not json", 5, false, t),
            msg("devices/d/t", r#"{"ts":1700000000}"#, 6, false, t),
        ];
        let mut clock = DbClock::new(Utc::now(), t);
        let p = prepare(
            &Decoder::new("devices/{device_id}/#", 1024),
            &batch,
            &mut clock,
            1024,
            Routing {
                routes: &routes,
                written_by: "n",
                lease_epoch: 1,
                suspended: &[],
                redelivery_window: Duration::from_secs(3600),
            },
        );
        let rows = |k: usize, rs: &[RouteRow]| -> Vec<usize> {
            rs.iter().filter(|r| r.route == k).map(|r| r.idx).collect()
        };
        // "first": message 0 now, message 1 (same key) in the next round; "last": message 1
        // replaced message 0, and message 3 (r/b/c) only matches "last".
        assert_eq!(rows(1, &p.rows), vec![0]);
        assert_eq!(rows(2, &p.rows), vec![1, 3]);
        assert_eq!(p.later.len(), 1);
        assert_eq!(rows(1, &p.later[0]), vec![1]);
        assert_eq!(p.superseded, vec![0, 0, 1]);
        // Kept in case the database refuses the row that replaced it.
        assert_eq!(p.replaced.get(&(2, 1)).map(|r| r.idx), Some(0));
        // Message 2 fails the mapping of both routes: a dead letter each; message 4 is one
        // dead letter naming both; message 5 goes to the default route.
        let dead: Vec<(usize, &str, Option<&str>)> = p
            .dead
            .iter()
            .map(|d| (d.idx, d.reason, d.route.as_deref()))
            .collect();
        assert_eq!(
            dead,
            vec![
                (2, "mapping_failed", Some("first")),
                (2, "mapping_failed", Some("last")),
                (4, "not_json", Some("first,last")),
            ]
        );
        assert!(p.dead[0].error.contains(r#"route first: column "v""#));
        assert_eq!(rows(0, &p.rows).len(), 1);
        assert_eq!(rows(0, &p.rows), vec![5]);
    }

    #[test]
    fn without_routes_a_batch_goes_to_telemetry() {
        // `make bench`'s micro-benchmark passed no routes, and prepare indexed an empty list.
        let t = Instant::now();
        let mut clock = DbClock::new(Utc::now(), t);
        let routing = Routing {
            routes: &[],
            written_by: "n",
            lease_epoch: 1,
            suspended: &[],
            redelivery_window: Duration::from_secs(3600),
        };
        let batch = [msg("devices/m/t", r#"{"ts":1700000000}"#, 1, false, t)];
        let p = prepare(
            &Decoder::new("devices/{device_id}/#", 1024),
            &batch,
            &mut clock,
            1024,
            routing,
        );
        assert_eq!((p.rows.len(), p.rows[0].route, p.dead.len()), (1, 0, 0));
    }

    #[test]
    fn leaseholds_own_claims_and_probes_are_never_stored() {
        let t = Instant::now();
        let p = run(&[
            msg(
                "leasehold/clusters/lh-abc",
                r#"{"cluster_id":"x"}"#,
                1,
                false,
                t,
            ),
            msg("leasehold/doctor/p1", "probe 1", 2, false, t),
            msg("devices/m/t", r#"{"ts":1700000000,"v":1}"#, 3, false, t),
        ]);
        assert_eq!((p.own, p.rows.len(), p.dead.len()), (2, 1, 0));
        assert_eq!(p.rows[0].message.topic, "devices/m/t");
    }

    #[test]
    fn two_metrics_of_one_device_at_one_timestamp_are_two_readings() {
        let t = Instant::now();
        let p = run(&[
            msg(
                "devices/m/temperature",
                r#"{"ts":1700000000,"v":21}"#,
                1,
                false,
                t,
            ),
            msg(
                "devices/m/humidity",
                r#"{"ts":1700000000,"v":40}"#,
                2,
                false,
                t,
            ),
        ]);
        assert_eq!(p.rows.len(), 2);
        assert!(p.dead.is_empty());
    }

    #[test]
    fn the_same_timestamp_less_payload_published_again_is_a_new_reading() {
        let t = Instant::now();
        let p = run(&[
            msg("devices/s/state", r#"{"state":"ON"}"#, 1, false, t),
            msg("devices/s/state", r#"{"state":"ON"}"#, 2, false, t),
            msg("devices/s/state", r#"{"state":"ON"}"#, 1, false, t),
        ]);
        assert_eq!(
            p.rows.len(),
            3,
            "received in the same instant, still three readings"
        );
        let ts: HashSet<_> = p.rows.iter().map(|r| r.values[2].clone()).collect();
        assert!(ts.iter().all(|t| matches!(t, Value::Time(_))));
        assert_eq!(ts.len(), 3);
    }

    #[test]
    fn a_redelivery_in_the_same_batch_is_collapsed_only_with_the_dup_flag_and_its_packet_id() {
        let t = Instant::now();
        let later = t + Duration::from_millis(5);
        let p = run(&[
            msg("devices/s/state", r#"{"state":"ON"}"#, 7, false, t),
            msg("devices/s/state", r#"{"state":"ON"}"#, 7, true, later),
            msg("devices/s/state", r#"{"state":"ON"}"#, 8, true, later),
        ]);
        assert_eq!(p.redelivered, 1);
        assert_eq!(p.rows.len(), 2);
        assert!(p.rows[1].message.dup);
    }

    #[test]
    fn a_dup_copy_further_apart_than_the_redelivery_window_is_a_message_of_its_own() {
        // As in a replay's chunk: dead letters received hours apart, the broker's packet ids
        // reused meanwhile. `run` uses a window of one hour.
        let t = Instant::now();
        let p = run(&[
            msg("devices/s/state", r#"{"state":"ON"}"#, 7, false, t),
            msg(
                "devices/s/state",
                r#"{"state":"ON"}"#,
                7,
                true,
                t + Duration::from_secs(7200),
            ),
            msg(
                "devices/s/state",
                r#"{"state":"ON"}"#,
                7,
                true,
                t + Duration::from_secs(7205),
            ),
        ]);
        assert_eq!(p.redelivered, 1, "only the copy 5 s after the second");
        assert_eq!(p.rows.len(), 2);
        assert_eq!((p.rows[0].idx, p.rows[1].idx), (0, 1));
        // A copy received before the other is not its redelivery, whatever their order.
        let p = run(&[
            msg(
                "devices/s/state",
                r#"{"state":"ON"}"#,
                7,
                false,
                t + Duration::from_secs(10),
            ),
            msg("devices/s/state", r#"{"state":"ON"}"#, 7, true, t),
        ]);
        assert_eq!((p.redelivered, p.rows.len()), (0, 2));
    }

    #[test]
    fn later_readings_of_a_key_wait_for_a_later_round() {
        let t = Instant::now();
        let p = run(&[
            msg("devices/m/t", r#"{"ts":1700000000,"v":1}"#, 1, false, t),
            msg("devices/m/t", r#"{"v":1, "ts":1700000000}"#, 2, false, t),
            msg("devices/m/t", r#"{"ts":1700000000,"v":2}"#, 3, false, t),
            msg("devices/m/u", r#"{"ts":1700000000,"v":2}"#, 4, false, t),
        ]);
        assert_eq!(p.rows.len(), 2, "the first of each key");
        assert_eq!(p.later.len(), 2);
        assert_eq!(p.later[0][0].idx, 1);
        assert_eq!(p.later[1][0].idx, 2);
        assert!(p.dead.is_empty());
    }

    #[test]
    fn every_bad_occurrence_is_a_dead_letter_but_its_redelivery_is_not() {
        let t = Instant::now();
        let p = run(&[
            msg("devices/m/t", "garbage", 1, false, t),
            msg("devices/m/t", "garbage", 2, false, t),
            msg("devices/m/t", "garbage", 1, true, t),
        ]);
        assert_eq!(p.dead.len(), 2);
        assert_eq!(p.redelivered, 1);
        assert!(p.dead.iter().all(|d| d.reason == "not_json"));
    }

    #[test]
    fn receipt_times_follow_the_database_clock_and_never_repeat() {
        let local = Instant::now();
        let db = DateTime::from_timestamp(1_000_000, 0).expect("valid");
        let mut c = DbClock::new(db, local);
        let a = c.at(local + Duration::from_secs(2));
        assert_eq!(a.timestamp(), 1_000_002);
        let b = c.at(local + Duration::from_secs(2));
        assert!(b > a);
        let early = c.at(local - Duration::from_secs(1));
        assert!(early > b, "monotonic even for an earlier instant");
    }

    #[test]
    fn a_payload_cut_on_arrival_is_too_large_with_its_original_size() {
        let mut m = msg("devices/m/t", &"x".repeat(1024), 1, false, Instant::now());
        m.original_size = 300_000;
        let p = run(&[m]);
        assert_eq!(p.dead[0].reason, "too_large");
        assert_eq!(p.dead[0].size, 300_000);
        assert_eq!(p.dead[0].payload.len(), 1024);
    }

    #[test]
    fn a_dead_letter_keeps_at_most_max_payload_bytes_and_the_size() {
        let big = "x".repeat(5000);
        let p = run(&[msg("devices/m/t", &big, 1, false, Instant::now())]);
        assert_eq!(p.dead[0].payload.len(), 1024);
        assert_eq!(p.dead[0].size, 5000);
    }
}
