//! A gathered batch turned into what the store writes: readings with unique keys (later readings
//! of a key in later rounds) and dead letters, each tagged with its position in the batch, and
//! what could already be decided without the database (decode failures, redeliveries of a
//! message that is in the same batch).
//!
//! Pure: no I/O, so the rules are unit-tested here and the store only checks against what is
//! stored.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use leasehold_config::OnConflict;
use leasehold_decode::{DecodeError, Decoder};
use leasehold_ingest::Inbound;
use leasehold_store::routes::ResolvedRoute;
use leasehold_store::{DeadLetter, RouteRow, RoutedMessage, Row};

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
}

impl DbClock {
    /// `db` was the database's time at the local instant `local`.
    pub fn new(db: DateTime<Utc>, local: Instant) -> Self {
        DbClock {
            db_micros: db.timestamp_micros(),
            local,
            last: i64::MIN,
        }
    }

    /// Reads the database's clock again (a node's monotonic clock drifts from it over a long
    /// term), keeping receipt times strictly increasing.
    pub fn remeasure(&mut self, db: DateTime<Utc>, local: Instant) {
        self.db_micros = db.timestamp_micros();
        self.local = local;
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
        let us = (self.db_micros + offset).max(self.last.saturating_add(1));
        self.last = us;
        DateTime::from_timestamp_micros(us).unwrap_or_else(Utc::now)
    }
}

/// A batch ready for the store.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Readings with keys unique in the batch: the first of each key by arrival.
    pub rows: Vec<Row>,
    pub dead: Vec<DeadLetter>,
    /// Leasehold's own messages (cluster claims, `leasehold doctor`'s probes), received only
    /// under a filter such as `#`: acknowledged, never stored as readings.
    pub own: u64,
    /// Later readings of a key already in `rows`: `later[0]` holds each key's second reading,
    /// `later[1]` its third, ... Each round is written after the previous one committed, so the
    /// table itself settles duplicate or conflict against what was really stored (the first may
    /// have been refused), with jsonb's own equality.
    pub later: Vec<Vec<Row>>,
    /// Redeliveries of an earlier message of the batch (DUP, same packet id and bytes).
    pub redelivered: u64,
    /// Rows of named routes, keys unique per route: the first of each key by arrival
    /// (`on_conflict = "nothing"`) or the last (`"update"`).
    pub routed: Vec<RouteRow>,
    /// Later rows of a key already in `routed` (`"nothing"` only), by round like `later`.
    pub later_routed: Vec<Vec<RouteRow>>,
    /// Per route: rows replaced by a later message of the same key in this batch
    /// (`"update"`: the last by arrival wins, the earlier count as written over).
    pub superseded: Vec<u64>,
    /// `(route, position)` of a row in `routed` -> the row of the same key it replaced. When
    /// the database refuses the later row, the one it replaced is written instead, as if the
    /// messages had been written one by one.
    pub replaced: HashMap<(usize, usize), RouteRow>,
}

/// A row's route and its key's values (see [`routing::batch_key`]).
type RouteKey = (usize, Vec<Option<String>>);

/// The named routes of the term and what their sources `written_by` and `lease_epoch` read.
#[derive(Debug, Clone, Copy)]
pub struct Routing<'a> {
    pub routes: &'a [ResolvedRoute],
    pub written_by: &'a str,
    pub lease_epoch: i64,
}

/// Decodes `batch` and settles what the batch alone can settle. `max_payload_bytes` bounds the
/// bytes a dead letter keeps.
pub fn prepare(
    decoder: &Decoder,
    batch: &[Inbound],
    clock: &mut DbClock,
    max_payload_bytes: usize,
    routing: Routing<'_>,
) -> Prepared {
    let mut out = Prepared {
        rows: Vec::with_capacity(batch.len()),
        superseded: vec![0; routing.routes.len()],
        ..Prepared::default()
    };
    // (route, key) -> how many rows of it came so far, and where the last one is in `routed`.
    let mut route_keys: HashMap<RouteKey, (usize, usize)> = HashMap::new();
    // Hash of a reading's key -> (round, position) of the readings with that hash (compared in
    // full on a hit), so the common case of unique keys costs no copy of the key.
    let mut keys: HashMap<u64, Vec<(usize, usize)>> = HashMap::with_capacity(batch.len());
    let hasher = std::collections::hash_map::RandomState::new();
    // (topic, content hash, packet id) of timestamp-less readings and dead letters seen.
    let mut deliveries: HashSet<(String, String, u16)> = HashSet::new();
    for (idx, m) in batch.iter().enumerate() {
        if leasehold_config::is_own_topic(&m.topic) {
            out.own += 1;
            continue;
        }
        let received_at = clock.at(m.received);
        let pkid = i32::from(m.pkid);
        let matched = routing::matching(routing.routes, &m.topic);
        if !matched.is_empty() {
            let held = &m.payload[..m.payload.len().min(max_payload_bytes)];
            let delivery = (
                m.topic.clone(),
                leasehold_decode::content_hash(&m.topic, held),
                m.pkid,
            );
            if m.dup && deliveries.contains(&delivery) {
                out.redelivered += 1;
                continue;
            }
            deliveries.insert(delivery);
            let dead = |reason: &'static str, route: String, error: String| DeadLetter {
                idx,
                topic: m.topic.clone(),
                payload: held.to_vec(),
                size: m.original_size.max(m.payload.len()),
                reason,
                error,
                received_at,
                pkid,
                dup: m.dup,
                route: Some(route),
            };
            let parsed = if m.original_size > max_payload_bytes {
                Err(DecodeError::TooLarge {
                    size: m.original_size,
                    max: max_payload_bytes,
                })
            } else {
                decoder.parse(&m.topic, &m.payload)
            };
            let parsed = match parsed {
                Ok(p) => p,
                Err(e) => {
                    // One dead letter for the message, naming every route it was for.
                    let names: Vec<&str> = matched
                        .iter()
                        .map(|&k| routing.routes[k].spec.name.as_str())
                        .collect();
                    let word = if names.len() == 1 { "route" } else { "routes" };
                    out.dead.push(dead(
                        reason_label(&e),
                        names.join(","),
                        format!("{word} {}: {e}", names.join(", ")),
                    ));
                    continue;
                }
            };
            let message = Arc::new(RoutedMessage {
                topic: m.topic.clone(),
                payload: m.payload.clone(),
                received_at,
                pkid,
                dup: m.dup,
            });
            let cx = routing::Context {
                topic: &m.topic,
                received_at,
                written_by: routing.written_by,
                lease_epoch: routing.lease_epoch,
            };
            for k in matched {
                let route = &routing.routes[k];
                match routing::row(route, &parsed, cx) {
                    Ok(values) => {
                        let key = (k, routing::batch_key(route, &values));
                        let row = RouteRow {
                            idx,
                            route: k,
                            values,
                            message: message.clone(),
                        };
                        match (route_keys.get_mut(&key), route.spec.on_conflict) {
                            (None, _) => {
                                route_keys.insert(key, (1, out.routed.len()));
                                out.routed.push(row);
                            }
                            (Some((_, at)), OnConflict::Update) => {
                                let old = std::mem::replace(&mut out.routed[*at], row);
                                out.replaced.insert((k, idx), old);
                                out.superseded[k] += 1;
                            }
                            (Some((seen, _)), OnConflict::Nothing) => {
                                let round = *seen;
                                *seen += 1;
                                if out.later_routed.len() < round {
                                    out.later_routed.resize_with(round, Vec::new);
                                }
                                out.later_routed[round - 1].push(row);
                            }
                        }
                    }
                    Err(e) => out.dead.push(dead(
                        "mapping_failed",
                        route.spec.name.clone(),
                        format!(
                            "route {}: column {:?}: {}",
                            route.spec.name, e.column, e.reason
                        ),
                    )),
                }
            }
            continue;
        }
        // The ingest keeps only the first MAX_PAYLOAD_BYTES of an oversized payload.
        let decoded = if m.original_size > max_payload_bytes {
            Err(DecodeError::TooLarge {
                size: m.original_size,
                max: max_payload_bytes,
            })
        } else {
            decoder.decode(&m.topic, &m.payload, received_at)
        };
        match decoded {
            Ok(reading) => {
                if let Some(h) = &reading.content_hash {
                    let delivery = (m.topic.clone(), h.clone(), m.pkid);
                    if m.dup && deliveries.contains(&delivery) {
                        out.redelivered += 1;
                        continue;
                    }
                    deliveries.insert(delivery);
                }
                let h = hasher.hash_one((&reading.device_id, &m.topic, reading.ts));
                let row = Row {
                    idx,
                    device_id: reading.device_id,
                    topic: m.topic.clone(),
                    ts: reading.ts,
                    payload: reading.payload,
                    received_at,
                    content_hash: reading.content_hash,
                    pkid,
                    dup: m.dup,
                };
                // How many readings of this key came earlier in the batch (compared in full on a
                // hash hit).
                let at = keys.entry(h).or_default();
                let round = at
                    .iter()
                    .filter(|&&(r, i)| {
                        let other = if r == 0 {
                            &out.rows[i]
                        } else {
                            &out.later[r - 1][i]
                        };
                        other.ts == row.ts
                            && other.device_id == row.device_id
                            && other.topic == row.topic
                    })
                    .count();
                if round == 0 {
                    at.push((0, out.rows.len()));
                    out.rows.push(row);
                } else {
                    if out.later.len() < round {
                        out.later.resize_with(round, Vec::new);
                    }
                    at.push((round, out.later[round - 1].len()));
                    out.later[round - 1].push(row);
                }
            }
            Err(e) => {
                let held = &m.payload[..m.payload.len().min(max_payload_bytes)];
                let h = leasehold_decode::content_hash(&m.topic, held);
                let delivery = (m.topic.clone(), h, m.pkid);
                if m.dup && deliveries.contains(&delivery) {
                    out.redelivered += 1;
                    continue;
                }
                deliveries.insert(delivery);
                out.dead.push(DeadLetter {
                    idx,
                    topic: m.topic.clone(),
                    payload: held.to_vec(),
                    size: m.original_size.max(m.payload.len()),
                    reason: reason_label(&e),
                    error: e.to_string(),
                    received_at,
                    pkid,
                    dup: m.dup,
                    route: None,
                });
            }
        }
    }
    out
}

/// A reading PostgreSQL refused, as the dead letter that replaces it.
pub fn rejected(row: &Row, database_text: &str) -> DeadLetter {
    DeadLetter {
        idx: row.idx,
        topic: row.topic.clone(),
        payload: row.payload.clone().into_bytes(),
        size: row.payload.len(),
        reason: "rejected_by_database",
        error: format!("PostgreSQL rejected the reading: {database_text}"),
        received_at: row.received_at,
        pkid: row.pkid,
        dup: row.dup,
        route: None,
    }
}

/// A route's row PostgreSQL refused, as the dead letter that replaces it (the message's other
/// routes still write).
pub fn rejected_route_row(row: &RouteRow, route: &str, database_text: &str) -> DeadLetter {
    DeadLetter {
        idx: row.idx,
        topic: row.message.topic.clone(),
        payload: row.message.payload.to_vec(),
        size: row.message.payload.len(),
        reason: "rejected_by_database",
        error: format!("route {route}: PostgreSQL rejected the row: {database_text}"),
        received_at: row.message.received_at,
        pkid: row.message.pkid,
        dup: row.message.dup,
        route: Some(route.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                routes: &[],
                written_by: "n",
                lease_epoch: 1,
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
            },
        );
        let rows = |k: usize, rs: &[RouteRow]| -> Vec<usize> {
            rs.iter().filter(|r| r.route == k).map(|r| r.idx).collect()
        };
        // "first": message 0 now, message 1 (same key) in the next round; "last": message 1
        // replaced message 0, and message 3 (r/b/c) only matches "last".
        assert_eq!(rows(0, &p.routed), vec![0]);
        assert_eq!(rows(1, &p.routed), vec![1, 3]);
        assert_eq!(p.later_routed.len(), 1);
        assert_eq!(rows(0, &p.later_routed[0]), vec![1]);
        assert_eq!(p.superseded, vec![0, 1]);
        // Kept in case the database refuses the row that replaced it.
        assert_eq!(p.replaced.get(&(1, 1)).map(|r| r.idx), Some(0));
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
        assert_eq!(p.rows.len(), 1);
        assert_eq!(p.rows[0].idx, 5);
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
        assert_eq!(p.rows[0].topic, "devices/m/t");
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
        let ts: HashSet<_> = p.rows.iter().map(|r| r.ts).collect();
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
        assert!(p.rows[1].dup);
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
