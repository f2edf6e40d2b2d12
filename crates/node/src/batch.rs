//! A gathered batch turned into what the store writes: readings with unique keys (later readings
//! of a key in later rounds) and dead letters, each tagged with its position in the batch, and
//! what could already be decided without the database (decode failures, redeliveries of a
//! message that is in the same batch).
//!
//! Pure: no I/O, so the rules are unit-tested here and the store only checks against what is
//! stored.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::time::Instant;

use chrono::{DateTime, Utc};
use leasehold_decode::{DecodeError, Decoder};
use leasehold_ingest::Inbound;
use leasehold_store::{DeadLetter, Row};

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
}

/// Decodes `batch` and settles what the batch alone can settle. `max_payload_bytes` bounds the
/// bytes a dead letter keeps.
pub fn prepare(
    decoder: &Decoder,
    batch: &[Inbound],
    clock: &mut DbClock,
    max_payload_bytes: usize,
) -> Prepared {
    let mut out = Prepared {
        rows: Vec::with_capacity(batch.len()),
        ..Prepared::default()
    };
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
        )
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
