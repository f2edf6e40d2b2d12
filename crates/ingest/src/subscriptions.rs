//! The session's subscriptions: what is wanted, what the broker granted, and the packets that
//! bring one to the other. No I/O: the ingest task feeds it events (connect, ledger answers,
//! packets sent, SUBACK, UNSUBACK, topic changes, the retry timer) and carries out the
//! [`Action`]s it returns, in order.
//!
//! Rules:
//! - Subscriptions and unsubscriptions go out in packets of at most [`MAX_FILTERS_PER_PACKET`]
//!   filters and [`MAX_PACKET_BYTES`] bytes (a longer single filter goes alone), at most
//!   [`WINDOW`] packets in progress at a time: a fleet of any size never makes one packet above a
//!   broker's or the client's limit, nor a burst that fills the client's request queue.
//! - MQTT 3.1.1 cannot list a session's subscriptions, so a ledger (PostgreSQL, keyed by client
//!   id and filter) remembers them. Before a packet is sent its filters are written to the ledger
//!   as *pending* ("maybe subscribed"); a SUBACK granting QoS >= 1 makes a filter *subscribed*;
//!   an UNSUBACK deletes it. Whatever crashes when, the ledger never forgets a filter the session
//!   may still have, and never calls subscribed a filter it may not have.
//! - On every (re)connect the ledger is read (or, when the broker says it has no session,
//!   emptied) and the session reconciled: wanted filters not subscribed are subscribed, filters
//!   in the ledger that are no longer wanted are unsubscribed. Nothing is sent before that.
//! - SUBACK return codes are mapped to filters by packet id (rumqttc reports the id of every
//!   SUBSCRIBE it writes, in the order the requests were queued). A failure (0x80) or a grant
//!   below QoS 1 is an error: never counted as subscribed, retried with backoff.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use leasehold_retry::Policy;
use leasehold_telemetry::{events, FailedSubscription, SubscriptionStatus};
use rumqttc::{QoS, SubscribeReasonCode};

/// Topic filters per SUBSCRIBE or UNSUBSCRIBE packet, at most.
pub const MAX_FILTERS_PER_PACKET: usize = 100;
/// Encoded size of a SUBSCRIBE or UNSUBSCRIBE packet, at most (a single longer filter goes
/// alone; the client accepts outgoing packets up to [`MAX_OUTGOING_PACKET`]).
pub const MAX_PACKET_BYTES: usize = 16 * 1024;
/// The client's outgoing packet limit: one filter of the longest length MQTT allows fits.
pub const MAX_OUTGOING_PACKET: usize = 128 * 1024;
/// Packets (with their ledger writes) in progress at once. Far below the client's packet-id
/// cycle (rumqttc reuses ids after its `inflight` setting, 100), so an id names one packet.
pub const WINDOW: usize = 8;
/// First retry of a refused filter, doubling up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(2);
/// Refused filters are retried at least this often (the alert looks back further than this).
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// A refusal that repeats is logged again at most this often (new refusals at once).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Subscribe,
    Unsubscribe,
}

/// A write to the subscription ledger. Applied in order, one at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerOp {
    /// Read the session's rows (answer: [`Subscriptions::loaded`]); with `forget`, delete them
    /// first: the broker has no session.
    Load {
        conn: u64,
        forget: bool,
    },
    /// Mark these filters pending before their packet is sent (answer:
    /// [`Subscriptions::intent_written`]).
    Intent {
        chunk: u64,
        filters: Vec<String>,
    },
    Granted(Vec<(String, u8)>),
    Refused(Vec<(String, String)>),
    Removed(Vec<String>),
}

/// What the ingest task must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Ledger(LedgerOp),
    /// Queue this packet on the connection; then report it with [`Subscriptions::outgoing`]
    /// when the client writes it.
    Send {
        chunk: u64,
        kind: Kind,
        filters: Vec<String>,
    },
}

#[derive(Debug)]
enum Stage {
    /// Waiting for its ledger intent.
    Intent,
    /// Handed to the client; its packet id comes with the client's Outgoing event.
    Queued,
    Sent,
}

#[derive(Debug)]
struct Chunk {
    kind: Kind,
    filters: Vec<String>,
    stage: Stage,
}

#[derive(Debug, Clone)]
struct Failure {
    reason: String,
    attempts: u32,
    since: Instant,
    retry_at: Instant,
}

/// The encoded size a filter adds to a SUBSCRIBE (length prefix, bytes, options byte); an
/// UNSUBSCRIBE entry is one byte shorter.
fn entry_bytes(filter: &str) -> usize {
    2 + filter.len() + 1
}

/// Fixed header (at most 5 bytes) and packet id.
const PACKET_OVERHEAD: usize = 5 + 2;

/// Splits `filters` into packets by count and bytes, keeping their order.
pub fn chunk_filters(filters: impl IntoIterator<Item = String>) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    let mut bytes = PACKET_OVERHEAD;
    for f in filters {
        let add = entry_bytes(&f);
        if !cur.is_empty()
            && (cur.len() >= MAX_FILTERS_PER_PACKET || bytes + add > MAX_PACKET_BYTES)
        {
            out.push(std::mem::take(&mut cur));
            bytes = PACKET_OVERHEAD;
        }
        bytes += add;
        cur.push(f);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A refused filter's retries: each filter counts its own attempts, each pause 80–100 % of nominal.
const RETRY: Policy = Policy::new(RETRY_FIRST, RETRY_MAX).jitter(0.2);

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Subscriptions {
    configured: Vec<String>,
    /// The enabled `devices` topics, as last read.
    devices: Vec<String>,
    device_topics: usize,
    /// Whether the device topics were read yet: until then nothing is unsubscribed.
    devices_known: bool,
    wanted: BTreeSet<String>,
    /// Granted QoS >= 1 on this session.
    confirmed: BTreeSet<String>,
    /// The session may or may not have them (pending in the ledger, refused, granted QoS 0).
    uncertain: BTreeSet<String>,
    /// Wanted and not confirmed: to subscribe (kept up to date, so that a large fleet is not
    /// scanned for every SUBACK).
    missing: BTreeSet<String>,
    /// Confirmed or uncertain and not wanted: to unsubscribe.
    extra: BTreeSet<String>,
    failed: BTreeMap<String, Failure>,
    /// The current connection, once its CONNACK arrived.
    conn: Option<u64>,
    /// Whether `confirmed`/`uncertain` describe the current connection's session.
    loaded: bool,
    next_chunk: u64,
    chunks: BTreeMap<u64, Chunk>,
    busy: HashSet<String>,
    queued: HashMap<Kind, VecDeque<u64>>,
    by_pkid: HashMap<u16, u64>,
    next_retry_at: Option<Instant>,
    round_started: Option<Instant>,
    /// (connection, subscribed, refused) of the last "topics subscribed" line.
    reported: Option<(u64, usize, usize)>,
    last_refusal_log: Option<Instant>,
    /// Filters refused so far, every attempt counted.
    refusals: u64,
}

impl Subscriptions {
    pub fn new(configured: Vec<String>) -> Self {
        let wanted = configured.iter().cloned().collect();
        Subscriptions {
            configured,
            wanted,
            next_chunk: 1,
            ..Subscriptions::default()
        }
    }

    /// The wanted filters are now the configured ones plus `device_topics` (`None`: not read
    /// from the database yet).
    pub fn set_device_topics(
        &mut self,
        device_topics: Option<&[String]>,
        now: Instant,
    ) -> Vec<Action> {
        let known = device_topics.is_some();
        self.devices = device_topics.unwrap_or_default().to_vec();
        let newly_known = known && !self.devices_known;
        self.devices_known |= known;
        self.rewant(newly_known, "device topics changed", now)
    }

    /// The configured filters changed (a new cluster configuration applied live): new ones are
    /// subscribed before removed ones are unsubscribed.
    pub fn set_configured(&mut self, configured: Vec<String>, now: Instant) -> Vec<Action> {
        self.configured = configured;
        self.rewant(false, "configured topics changed", now)
    }

    /// Wanted = configured + device topics; what changed is subscribed or unsubscribed.
    fn rewant(&mut self, force: bool, why: &'static str, now: Instant) -> Vec<Action> {
        let wanted: BTreeSet<String> = self
            .configured
            .iter()
            .chain(self.devices.iter())
            .cloned()
            .collect();
        let added = wanted.difference(&self.wanted).count();
        let removed = self.wanted.difference(&wanted).count();
        self.device_topics = self.devices.len();
        if added == 0 && removed == 0 && !force {
            return Vec::new();
        }
        self.wanted = wanted;
        self.recompute();
        if self.conn.is_some() {
            tracing::info!(
                added,
                removed,
                wanted = self.wanted.len(),
                "{why}; subscriptions updated"
            );
        }
        self.round_started.get_or_insert(now);
        self.pump(now)
    }

    /// A CONNACK on connection `conn`. Without a session the broker has no subscriptions: the
    /// ledger is emptied and everything wanted is subscribed; with one, the ledger is read first.
    pub fn connected(&mut self, conn: u64, session_present: bool, now: Instant) -> Vec<Action> {
        self.reset_connection();
        self.conn = Some(conn);
        self.round_started = Some(now);
        let mut out = vec![Action::Ledger(LedgerOp::Load {
            conn,
            forget: !session_present,
        })];
        if !session_present {
            // Ledger writes are applied in order: the forget comes before any intent below.
            self.confirmed.clear();
            self.uncertain.clear();
            self.recompute();
            self.loaded = true;
            out.extend(self.pump(now));
        } else {
            self.loaded = false;
        }
        out
    }

    /// The connection is gone: whatever was in progress on it is void (its filters are pending
    /// in the ledger, and the next connection reads them back).
    pub fn disconnected(&mut self) {
        self.reset_connection();
        self.conn = None;
        self.loaded = false;
    }

    /// Derives `missing` and `extra` from `wanted`, `confirmed` and `uncertain`.
    fn recompute(&mut self) {
        self.missing = self.wanted.difference(&self.confirmed).cloned().collect();
        self.extra = self
            .confirmed
            .iter()
            .chain(self.uncertain.iter())
            .filter(|f| !self.wanted.contains(*f))
            .cloned()
            .collect();
    }

    fn reset_connection(&mut self) {
        self.chunks.clear();
        self.busy.clear();
        self.queued.clear();
        self.by_pkid.clear();
    }

    /// The ledger's rows for connection `conn`: (filter, subscribed).
    pub fn loaded(&mut self, conn: u64, rows: Vec<(String, bool)>, now: Instant) -> Vec<Action> {
        if self.conn != Some(conn) || self.loaded {
            return Vec::new();
        }
        self.confirmed.clear();
        self.uncertain.clear();
        for (f, subscribed) in rows {
            if let Err(reason) = leasehold_config::validate_filter(&f) {
                // Not written by Leasehold (it subscribes valid filters only); unsubscribing it
                // would make the broker drop the connection.
                tracing::warn!(filter = ?f, %reason, "ignoring an invalid filter in the subscription ledger");
                continue;
            }
            if subscribed {
                self.confirmed.insert(f);
            } else {
                self.uncertain.insert(f);
            }
        }
        self.loaded = true;
        self.recompute();
        let to_unsubscribe = self.extra.len();
        let to_subscribe = self.missing.len();
        tracing::info!(
            subscribed = self.confirmed.len(),
            uncertain = self.uncertain.len(),
            wanted = self.wanted.len(),
            configured = self.configured.len(),
            device_topics = self.device_topics,
            to_subscribe,
            to_unsubscribe,
            "topics loaded: reconciling the session's subscriptions with the subscription ledger"
        );
        self.pump(now)
    }

    /// The ledger marked chunk `chunk` pending: its packet may go.
    pub fn intent_written(&mut self, chunk: u64) -> Vec<Action> {
        let Some(c) = self.chunks.get_mut(&chunk) else {
            return Vec::new();
        };
        if !matches!(c.stage, Stage::Intent) {
            return Vec::new();
        }
        c.stage = Stage::Queued;
        self.queued.entry(c.kind).or_default().push_back(chunk);
        vec![Action::Send {
            chunk,
            kind: c.kind,
            filters: c.filters.clone(),
        }]
    }

    /// The client wrote the next queued packet of `kind` with packet id `pkid`.
    pub fn outgoing(&mut self, kind: Kind, pkid: u16) {
        let Some(chunk) = self.queued.get_mut(&kind).and_then(|q| q.pop_front()) else {
            tracing::warn!(
                ?kind,
                pkid,
                "a packet went out that no subscription chunk queued"
            );
            return;
        };
        if let Some(c) = self.chunks.get_mut(&chunk) {
            c.stage = Stage::Sent;
        }
        if let Some(old) = self.by_pkid.insert(pkid, chunk) {
            // Cannot happen with WINDOW far below the id cycle; if it did, the old chunk's
            // answer is lost: retry its filters.
            tracing::warn!(
                pkid,
                "packet id reused while its previous packet was unanswered"
            );
            self.drop_chunk(old);
        }
    }

    fn drop_chunk(&mut self, chunk: u64) -> Option<Chunk> {
        let c = self.chunks.remove(&chunk)?;
        for f in &c.filters {
            self.busy.remove(f);
        }
        Some(c)
    }

    /// The chunk a SUBACK or UNSUBACK (`kind`) with `pkid` answers, taken out of flight; `Err`
    /// with what to do instead when no such packet is in flight or it was of the other kind
    /// (its filters are then retried).
    fn answered(&mut self, pkid: u16, kind: Kind, now: Instant) -> Result<Chunk, Vec<Action>> {
        let (ack, sent) = match kind {
            Kind::Subscribe => ("SUBACK", "SUBSCRIBE"),
            Kind::Unsubscribe => ("UNSUBACK", "UNSUBSCRIBE"),
        };
        let Some(c) = self
            .by_pkid
            .remove(&pkid)
            .and_then(|id| self.drop_chunk(id))
        else {
            tracing::warn!(
                pkid,
                "{ack} for a packet id with no {sent} in flight; ignored"
            );
            return Err(Vec::new());
        };
        if c.kind != kind {
            tracing::warn!(
                pkid,
                "{ack} answered another kind of packet; its filters are retried"
            );
            return Err(self.pump(now));
        }
        Ok(c)
    }

    /// A SUBACK: one return code per filter of the SUBSCRIBE with the same packet id.
    pub fn suback(
        &mut self,
        pkid: u16,
        codes: &[SubscribeReasonCode],
        now: Instant,
    ) -> Vec<Action> {
        let c = match self.answered(pkid, Kind::Subscribe, now) {
            Ok(c) => c,
            Err(actions) => return actions,
        };
        let mut granted = Vec::new();
        let mut refused = Vec::new();
        for (i, f) in c.filters.into_iter().enumerate() {
            let outcome = match codes.get(i) {
                Some(SubscribeReasonCode::Success(QoS::AtLeastOnce)) => Ok(1u8),
                Some(SubscribeReasonCode::Success(QoS::ExactlyOnce)) => Ok(2u8),
                Some(SubscribeReasonCode::Success(QoS::AtMostOnce)) => {
                    Err("granted QoS 0 (QoS 1 requested): messages would not be redelivered".into())
                }
                Some(SubscribeReasonCode::Failure) => {
                    Err("refused by the broker (SUBACK 0x80)".into())
                }
                None => Err(format!(
                    "SUBACK had {} return codes for more filters",
                    codes.len()
                )),
            };
            match outcome {
                Ok(qos) => {
                    self.uncertain.remove(&f);
                    self.failed.remove(&f);
                    self.missing.remove(&f);
                    if !self.wanted.contains(&f) {
                        self.extra.insert(f.clone());
                    }
                    self.confirmed.insert(f.clone());
                    granted.push((f, qos));
                }
                Err(reason) => {
                    // It may be subscribed at QoS 0: keep it "maybe subscribed" so that it is
                    // unsubscribed if it stops being wanted.
                    self.confirmed.remove(&f);
                    self.uncertain.insert(f.clone());
                    if self.wanted.contains(&f) {
                        self.missing.insert(f.clone());
                    } else {
                        self.extra.insert(f.clone());
                    }
                    let prev = self.failed.get(&f);
                    let attempts = prev.map_or(0, |p| p.attempts) + 1;
                    let since = prev.map_or(now, |p| p.since);
                    self.failed.insert(
                        f.clone(),
                        Failure {
                            reason: reason.clone(),
                            attempts,
                            since,
                            retry_at: now + RETRY.delay(attempts, fastrand::f64()),
                        },
                    );
                    refused.push((f, reason));
                }
            }
        }
        let mut out = Vec::new();
        if !granted.is_empty() {
            out.push(Action::Ledger(LedgerOp::Granted(granted)));
        }
        if !refused.is_empty() {
            let retry_in = refused
                .iter()
                .filter_map(|(f, _)| self.failed.get(f))
                .map(|x| x.retry_at.saturating_duration_since(now))
                .min()
                .unwrap_or(RETRY_FIRST);
            let new = refused
                .iter()
                .any(|(f, _)| self.failed.get(f).is_some_and(|x| x.attempts == 1));
            let log = new
                || self
                    .last_refusal_log
                    .is_none_or(|t| now.saturating_duration_since(t) >= REFUSAL_LOG_EVERY);
            if log {
                self.last_refusal_log = Some(now);
            }
            self.refusals += refused.len() as u64;
            events::SubscriptionsRefused {
                refused: &refused,
                retry_in_ms: retry_in.as_millis(),
                log,
            }
            .emit();
            out.push(Action::Ledger(LedgerOp::Refused(refused)));
        }
        out.extend(self.pump(now));
        out
    }

    /// An UNSUBACK: the session no longer has the filters of that UNSUBSCRIBE.
    pub fn unsuback(&mut self, pkid: u16, now: Instant) -> Vec<Action> {
        let c = match self.answered(pkid, Kind::Unsubscribe, now) {
            Ok(c) => c,
            Err(actions) => return actions,
        };
        for f in &c.filters {
            self.confirmed.remove(f);
            self.uncertain.remove(f);
            self.failed.remove(f);
            self.extra.remove(f);
            if self.wanted.contains(f) {
                self.missing.insert(f.clone());
            }
        }
        let mut out = vec![Action::Ledger(LedgerOp::Removed(c.filters))];
        out.extend(self.pump(now));
        out
    }

    /// When a refused filter is due for its next attempt.
    pub fn next_retry(&self) -> Option<Instant> {
        self.next_retry_at
    }

    /// The retry timer fired.
    pub fn retry_due(&mut self, now: Instant) -> Vec<Action> {
        self.pump(now)
    }

    /// Starts packets (their ledger intents first) while the window has room.
    fn pump(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.conn.is_some() && self.loaded {
            let room = WINDOW.saturating_sub(self.chunks.len());
            if room > 0 {
                let due = |f: &String| self.failed.get(f).is_none_or(|x| x.retry_at <= now);
                let mut packets = self.packets(Kind::Subscribe, &self.missing, room, due);
                let room = room - packets.len();
                // Removed filters wait until the added ones are granted (or refused): a filter
                // replaced by a wider one never leaves a gap in which nothing matches.
                let subscribing =
                    !packets.is_empty() || self.chunks.values().any(|c| c.kind == Kind::Subscribe);
                if room > 0 && self.devices_known && !subscribing {
                    packets.extend(self.packets(Kind::Unsubscribe, &self.extra, room, |_| true));
                }
                for (kind, filters) in packets {
                    let id = self.next_chunk;
                    self.next_chunk += 1;
                    self.busy.extend(filters.iter().cloned());
                    out.push(Action::Ledger(LedgerOp::Intent {
                        chunk: id,
                        filters: filters.clone(),
                    }));
                    self.chunks.insert(
                        id,
                        Chunk {
                            kind,
                            filters,
                            stage: Stage::Intent,
                        },
                    );
                }
            }
        }
        self.next_retry_at = self
            .failed
            .iter()
            .filter(|(f, _)| {
                self.wanted.contains(*f) && !self.busy.contains(*f) && !self.confirmed.contains(*f)
            })
            .map(|(_, x)| x.retry_at)
            .min();
        self.report(now);
        out
    }

    /// Up to `room` packets of `kind` for the filters of `set` that no packet is busy with and
    /// that are `due`, in order.
    fn packets(
        &self,
        kind: Kind,
        set: &BTreeSet<String>,
        room: usize,
        due: impl Fn(&String) -> bool,
    ) -> Vec<(Kind, Vec<String>)> {
        let filters = set.iter().filter(|f| !self.busy.contains(*f) && due(f));
        let filters = filters.take(room * MAX_FILTERS_PER_PACKET).cloned();
        let packets = chunk_filters(filters).into_iter().take(room);
        packets.map(|c| (kind, c)).collect()
    }

    /// Whether the session matches what is wanted, as far as can be done now (refused filters
    /// waiting for their retry aside).
    pub fn settled(&self) -> bool {
        self.conn.is_some() && self.loaded && self.chunks.is_empty()
    }

    fn report(&mut self, now: Instant) {
        let status = self.status();
        let (Some(conn), true) = (self.conn, self.settled()) else {
            return;
        };
        let key = (conn, status.subscribed, status.failed_total);
        if self.reported == Some(key) {
            self.round_started = None;
            return;
        }
        self.reported = Some(key);
        let took = self
            .round_started
            .take()
            .map_or(0, |t| now.saturating_duration_since(t).as_millis());
        events::TopicsSubscribed {
            configured: &self.configured,
            devices: self.device_topics,
            subscribed: status.subscribed,
            refused: status.failed_total,
            took_ms: took,
        }
        .emit();
    }

    /// What `/health/mqtt` and the metrics show.
    pub fn status(&self) -> SubscriptionStatus {
        let failed: Vec<(&String, &Failure)> = self
            .failed
            .iter()
            .filter(|(f, _)| self.wanted.contains(*f))
            .collect();
        let pending = if self.loaded {
            self.missing
                .iter()
                .filter(|f| !self.failed.contains_key(*f))
                .count()
                + self.extra.len()
        } else {
            self.wanted.len()
        };
        SubscriptionStatus {
            loaded: self.loaded,
            wanted: self.wanted.len(),
            configured: self.configured.len(),
            device_topics: self.device_topics,
            subscribed: self.confirmed.len(),
            pending,
            refusals: self.refusals,
            failed_total: failed.len(),
            failed: failed
                .iter()
                .take(20)
                .map(|(f, x)| FailedSubscription {
                    filter: (*f).clone(),
                    reason: x.reason.clone(),
                    attempts: x.attempts,
                    since: x.since,
                    retry_at: x.retry_at,
                })
                .collect(),
        }
    }

    /// The wanted filters (configured and device topics).
    pub fn wanted(&self) -> &BTreeSet<String> {
        &self.wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("fleet/dev-{i:05}/data")).collect()
    }

    /// Carries out actions against a model broker that grants everything except `refuse`, with
    /// an in-memory ledger; returns the SUBSCRIBE / UNSUBSCRIBE packets sent.
    struct World {
        subs: Subscriptions,
        ledger: BTreeMap<String, bool>,
        session: BTreeSet<String>,
        refuse: BTreeSet<String>,
        next_pkid: u16,
        sent: Vec<(Kind, Vec<String>)>,
        conn: u64,
    }

    impl World {
        fn new(configured: &[&str]) -> Self {
            World {
                subs: Subscriptions::new(configured.iter().map(|s| s.to_string()).collect()),
                ledger: BTreeMap::new(),
                session: BTreeSet::new(),
                refuse: BTreeSet::new(),
                next_pkid: 0,
                sent: Vec::new(),
                conn: 0,
            }
        }

        /// Runs actions to completion: ledger writes applied at once, packets answered in order.
        fn run(&mut self, mut actions: Vec<Action>, now: Instant) {
            let mut wire: VecDeque<(u16, Kind, Vec<String>)> = VecDeque::new();
            loop {
                while !actions.is_empty() {
                    let a = actions.remove(0);
                    match a {
                        Action::Ledger(LedgerOp::Load { conn, forget }) => {
                            if forget {
                                self.ledger.clear();
                            }
                            let rows = self.ledger.iter().map(|(f, s)| (f.clone(), *s)).collect();
                            actions.extend(self.subs.loaded(conn, rows, now));
                        }
                        Action::Ledger(LedgerOp::Intent { chunk, filters }) => {
                            for f in filters {
                                self.ledger.insert(f, false);
                            }
                            actions.extend(self.subs.intent_written(chunk));
                        }
                        Action::Ledger(LedgerOp::Granted(g)) => {
                            for (f, _) in g {
                                self.ledger.insert(f, true);
                            }
                        }
                        Action::Ledger(LedgerOp::Refused(_)) => {}
                        Action::Ledger(LedgerOp::Removed(r)) => {
                            for f in r {
                                self.ledger.remove(&f);
                            }
                        }
                        Action::Send { kind, filters, .. } => {
                            self.next_pkid = self.next_pkid % 100 + 1;
                            self.subs.outgoing(kind, self.next_pkid);
                            self.sent.push((kind, filters.clone()));
                            wire.push_back((self.next_pkid, kind, filters));
                        }
                    }
                }
                let Some((pkid, kind, fs)) = wire.pop_front() else {
                    break;
                };
                match kind {
                    Kind::Subscribe => {
                        let codes: Vec<SubscribeReasonCode> = fs
                            .iter()
                            .map(|f| {
                                if self.refuse.contains(f) {
                                    SubscribeReasonCode::Failure
                                } else {
                                    self.session.insert(f.clone());
                                    SubscribeReasonCode::Success(QoS::AtLeastOnce)
                                }
                            })
                            .collect();
                        actions.extend(self.subs.suback(pkid, &codes, now));
                    }
                    Kind::Unsubscribe => {
                        for f in &fs {
                            self.session.remove(f);
                        }
                        actions.extend(self.subs.unsuback(pkid, now));
                    }
                }
            }
        }

        fn connect(&mut self, session_present: bool, now: Instant) {
            self.conn += 1;
            if !session_present {
                self.session.clear();
            }
            let a = self.subs.connected(self.conn, session_present, now);
            self.run(a, now);
        }

        fn devices(&mut self, d: &[String], now: Instant) {
            let a = self.subs.set_device_topics(Some(d), now);
            self.run(a, now);
        }
    }

    #[test]
    fn packets_respect_the_count_and_byte_limits() {
        let small = chunk_filters(filters(20_000));
        assert_eq!(small.len(), 200);
        assert!(small.iter().all(|c| c.len() <= MAX_FILTERS_PER_PACKET));
        let long: Vec<String> = (0..50)
            .map(|i| format!("{i}/{}", "x".repeat(1000)))
            .collect();
        for c in chunk_filters(long.clone()) {
            let size = PACKET_OVERHEAD + c.iter().map(|f| entry_bytes(f)).sum::<usize>();
            assert!(size <= MAX_PACKET_BYTES, "{size}");
        }
        assert_eq!(chunk_filters(long).concat().len(), 50, "nothing dropped");
        // A filter longer than the byte budget goes alone, and still fits the client's limit.
        let huge = "h/".to_string() + &"y".repeat(65_000);
        let c = chunk_filters(vec!["a".into(), huge.clone(), "b".into()]);
        assert_eq!(
            c,
            vec![
                vec!["a".to_string()],
                vec![huge.clone()],
                vec!["b".to_string()]
            ]
        );
        assert!(PACKET_OVERHEAD + entry_bytes(&huge) <= MAX_OUTGOING_PACKET);
    }

    #[test]
    fn a_large_fleet_is_subscribed_in_a_window_of_small_packets() {
        let now = Instant::now();
        let mut w = World::new(&["devices/+/telemetry"]);
        w.devices(&filters(20_000), now);
        assert!(w.sent.is_empty(), "nothing is sent before a connection");
        let a = w.subs.connected(1, false, now);
        let intents = a
            .iter()
            .filter(|x| matches!(x, Action::Ledger(LedgerOp::Intent { .. })))
            .count();
        assert_eq!(intents, WINDOW, "at most WINDOW packets in progress");
        w.conn = 1;
        w.run(a, now);
        assert_eq!(w.session.len(), 20_001);
        assert_eq!(w.ledger.values().filter(|s| **s).count(), 20_001);
        assert!(w
            .sent
            .iter()
            .all(|(k, f)| *k == Kind::Subscribe && f.len() <= 100));
        let s = w.subs.status();
        assert_eq!((s.subscribed, s.pending, s.failed_total), (20_001, 0, 0));
        assert!(w.subs.settled());
    }

    #[test]
    fn a_resumed_session_sends_only_the_difference_with_the_ledger() {
        let now = Instant::now();
        let mut w = World::new(&["devices/+/telemetry"]);
        let all = filters(3_000);
        w.devices(&all, now);
        w.connect(false, now);
        assert_eq!(w.session.len(), 3_001);
        // Broker restart with its session: nothing to send.
        w.subs.disconnected();
        w.sent.clear();
        w.connect(true, now);
        assert!(w.sent.is_empty(), "re-sent {} packets", w.sent.len());
        // Devices disabled while no leader was connected: a new term (fresh state) unsubscribes
        // them from the session the ledger describes.
        let ledger = w.ledger.clone();
        let session = w.session.clone();
        let mut w = World::new(&["devices/+/telemetry"]);
        w.ledger = ledger;
        w.session = session;
        w.devices(&all[10..], now);
        w.connect(true, now);
        assert_eq!(w.sent.len(), 1);
        assert_eq!(w.sent[0], (Kind::Unsubscribe, all[..10].to_vec()));
        assert_eq!(w.session.len(), 2_991);
        assert_eq!(w.ledger.len(), 2_991);
    }

    /// A configured filter replaced by another (`config apply`): the new one is subscribed, and
    /// the old one unsubscribed only once the broker granted the new one, so that nothing
    /// published meanwhile matches no filter.
    #[test]
    fn a_replaced_filter_is_unsubscribed_only_after_its_replacement_is_granted() {
        let now = Instant::now();
        let mut w = World::new(&["extra/+/data"]);
        w.devices(&[], now);
        w.connect(false, now);
        assert!(w.session.contains("extra/+/data"));
        w.sent.clear();
        let a = w.subs.set_configured(vec!["extra/#".into()], now);
        let intents: Vec<&Vec<String>> = a
            .iter()
            .filter_map(|x| match x {
                Action::Ledger(LedgerOp::Intent { filters, .. }) => Some(filters),
                _ => None,
            })
            .collect();
        assert_eq!(
            intents,
            [&vec!["extra/#".to_string()]],
            "only the subscribe while it is not granted: {a:?}"
        );
        w.run(a, now);
        assert_eq!(
            w.sent,
            [
                (Kind::Subscribe, vec!["extra/#".to_string()]),
                (Kind::Unsubscribe, vec!["extra/+/data".to_string()])
            ]
        );
        assert_eq!(w.session, BTreeSet::from(["extra/#".to_string()]));
        assert!(w.subs.settled());
    }

    #[test]
    fn nothing_is_unsubscribed_before_the_device_topics_are_known() {
        let now = Instant::now();
        let mut w = World::new(&["a/#"]);
        w.ledger.insert("fleet/1".into(), true);
        w.session.insert("fleet/1".into());
        w.connect(true, now);
        assert_eq!(w.sent, vec![(Kind::Subscribe, vec!["a/#".to_string()])]);
        assert!(
            w.session.contains("fleet/1"),
            "unsubscribed before the devices were read"
        );
        // Read, and fleet/1 is no longer enabled.
        w.devices(&[], now);
        assert!(!w.session.contains("fleet/1"));
        assert!(!w.ledger.contains_key("fleet/1"));
    }

    #[test]
    fn a_lost_session_is_subscribed_again_and_its_ledger_emptied() {
        let now = Instant::now();
        let mut w = World::new(&["a/#"]);
        w.devices(&filters(500), now);
        w.connect(false, now);
        w.subs.disconnected();
        // A stale row for a filter no longer wanted: the broker lost it too.
        w.ledger.insert("gone/x".into(), true);
        w.sent.clear();
        w.connect(false, now);
        assert_eq!(w.session.len(), 501);
        assert!(!w.ledger.contains_key("gone/x"));
        assert!(w.sent.iter().all(|(k, _)| *k == Kind::Subscribe));
    }

    #[test]
    fn pending_rows_are_subscribed_if_wanted_and_unsubscribed_if_not() {
        let now = Instant::now();
        let mut w = World::new(&["a/#"]);
        // A crash between intent and SUBACK / UNSUBACK left two "maybe" rows.
        w.ledger.insert("b/1".into(), false);
        w.ledger.insert("c/1".into(), false);
        w.session.insert("c/1".into());
        w.devices(&["b/1".to_string()], now);
        w.connect(true, now);
        assert_eq!(w.ledger.get("b/1"), Some(&true));
        assert_eq!(w.ledger.get("a/#"), Some(&true));
        assert!(!w.ledger.contains_key("c/1"));
        assert!(!w.session.contains("c/1"));
    }

    #[test]
    fn a_refused_filter_is_an_error_retried_with_backoff_and_the_rest_flows() {
        let now = Instant::now();
        let mut w = World::new(&["ok/#"]);
        w.refuse.insert("secret/1".into());
        w.devices(&["secret/1".to_string(), "fine/1".to_string()], now);
        w.connect(false, now);
        let s = w.subs.status();
        assert_eq!(s.subscribed, 2, "{s:?}");
        assert_eq!(s.failed_total, 1);
        assert_eq!(s.failed[0].filter, "secret/1");
        assert!(
            s.failed[0].reason.contains("0x80"),
            "{}",
            s.failed[0].reason
        );
        assert_eq!(
            w.ledger.get("secret/1"),
            Some(&false),
            "never recorded as subscribed"
        );
        let retry = w.subs.next_retry().expect("a retry is scheduled");
        assert!(retry > now && retry <= now + RETRY_FIRST);
        // Not retried before it is due.
        w.sent.clear();
        let a = w.subs.retry_due(now);
        w.run(a, now);
        assert!(w.sent.is_empty());
        // Retried when due; the broker now allows it.
        w.refuse.clear();
        let a = w.subs.retry_due(retry);
        w.run(a, retry);
        assert_eq!(
            w.sent,
            vec![(Kind::Subscribe, vec!["secret/1".to_string()])]
        );
        let s = w.subs.status();
        assert_eq!((s.subscribed, s.failed_total), (3, 0));
        assert_eq!(w.subs.next_retry(), None);
    }

    #[test]
    fn a_grant_below_qos_1_is_not_subscribed_and_is_unsubscribed_when_unwanted() {
        let now = Instant::now();
        let mut s = Subscriptions::new(vec!["q/#".into()]);
        let a = s.connected(1, false, now);
        let chunk = a
            .iter()
            .find_map(|x| match x {
                Action::Ledger(LedgerOp::Intent { chunk, .. }) => Some(*chunk),
                _ => None,
            })
            .expect("an intent");
        assert_eq!(s.intent_written(chunk).len(), 1);
        s.outgoing(Kind::Subscribe, 7);
        let a = s.suback(7, &[SubscribeReasonCode::Success(QoS::AtMostOnce)], now);
        assert!(a.iter().any(
            |x| matches!(x, Action::Ledger(LedgerOp::Refused(r)) if r[0].1.contains("QoS 0"))
        ));
        assert_eq!(s.status().subscribed, 0);
        // No longer wanted: unsubscribed (the session has it at QoS 0).
        s.configured.clear();
        let a = s.set_device_topics(Some(&[]), now);
        assert!(a.iter().any(|x| matches!(
            x,
            Action::Ledger(LedgerOp::Intent { filters, .. }) if filters == &vec!["q/#".to_string()]
        )));
    }

    #[test]
    fn answers_are_matched_by_packet_id_not_by_order() {
        let now = Instant::now();
        let mut s = Subscriptions::new(vec![]);
        s.connected(1, false, now);
        let many: Vec<String> = filters(250);
        let a = s.set_device_topics(Some(&many), now);
        let chunks: Vec<u64> = a
            .iter()
            .filter_map(|x| match x {
                Action::Ledger(LedgerOp::Intent { chunk, .. }) => Some(*chunk),
                _ => None,
            })
            .collect();
        assert_eq!(chunks.len(), 3);
        for (i, c) in chunks.iter().enumerate() {
            s.intent_written(*c);
            s.outgoing(Kind::Subscribe, 40 + i as u16);
        }
        // The last packet (50 filters) is answered first, with a refusal for its first filter.
        let mut codes = vec![SubscribeReasonCode::Success(QoS::AtLeastOnce); 50];
        codes[0] = SubscribeReasonCode::Failure;
        let a = s.suback(42, &codes, now);
        let refused = a.iter().find_map(|x| match x {
            Action::Ledger(LedgerOp::Refused(r)) => Some(r.clone()),
            _ => None,
        });
        assert_eq!(refused.map(|r| r[0].0.clone()), Some(many[200].clone()));
        assert_eq!(s.status().subscribed, 49);
        // An answer for an unknown packet id changes nothing.
        assert!(s.suback(99, &codes, now).is_empty());
    }

    #[test]
    fn a_disconnect_voids_what_was_in_flight_and_the_next_connection_reads_the_ledger() {
        let now = Instant::now();
        let mut s = Subscriptions::new(vec!["a/#".into()]);
        let a = s.connected(1, false, now);
        let chunk = a
            .iter()
            .find_map(|x| match x {
                Action::Ledger(LedgerOp::Intent { chunk, .. }) => Some(*chunk),
                _ => None,
            })
            .expect("an intent");
        s.disconnected();
        assert!(
            s.intent_written(chunk).is_empty(),
            "not sent on another connection"
        );
        let a = s.connected(2, true, now);
        assert_eq!(
            a,
            vec![Action::Ledger(LedgerOp::Load {
                conn: 2,
                forget: false
            })]
        );
        // An answer for an older connection is ignored.
        assert!(s.loaded(1, vec![], now).is_empty());
        let a = s.loaded(2, vec![("a/#".into(), false)], now);
        assert!(
            matches!(&a[0], Action::Ledger(LedgerOp::Intent { filters, .. }) if filters == &vec!["a/#".to_string()])
        );
    }
}
