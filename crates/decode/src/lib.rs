//! Decoding of device payloads.
//!
//! A message becomes either a [`Reading`] (a `telemetry` row) or a [`DecodeError`] whose text is
//! stored in `dead_letters`. Decoding never panics and never blocks: it is the G6 boundary.
//!
//! # Layout
//! - [`TopicPattern`]: where the device id sits in the topic.
//! - [`Decoder::decode`]: size check, JSON object check, device id, timestamp, idempotency key.
//! - [`invariants`]: what holds for any input (checked by `make fuzz` and the corpus replay).

mod formats;
pub mod invariants;
mod light;
pub mod sparkplug;

pub use formats::{element_label, element_place, topic_matches, Unit};
pub use leasehold_config::{Format, FormatSpec};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value};

use light::Field;
use sha2::{Digest, Sha256};

/// Most readings one message may hold (array elements, SenML records): what a leader holds per
/// message stays bounded (memory, dead letters), and an array of 10,000 still reads.
pub const MAX_READINGS: usize = 10_000;

/// Longest device id accepted; longer ids are dead-lettered rather than bloating the primary key.
pub const MAX_DEVICE_ID_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload of {size} bytes exceeds MAX_PAYLOAD_BYTES ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("payload is JSON but not an object (got {0})")]
    NotObject(&'static str),
    #[error("payload contains \\u0000, which PostgreSQL jsonb cannot store")]
    NulEscape,
    #[error("no device id: topic {topic:?} does not match DEVICE_TOPIC_PATTERN and the payload has no string field \"device_id\"")]
    NoDeviceId { topic: String },
    #[error("device id is longer than {MAX_DEVICE_ID_LEN} characters")]
    DeviceIdTooLong,
    #[error("bad timestamp in field {field:?}: {reason}")]
    BadTimestamp { field: &'static str, reason: String },
    /// `value` format: the payload is neither JSON nor UTF-8 text.
    #[error("payload is not UTF-8 text")]
    NotUtf8,
    /// An empty array, an empty payload, a SenML pack without a value.
    #[error("no reading: {0}")]
    NoReadings(String),
    /// An array or a pack of more than [`MAX_READINGS`] elements or records: one dead letter.
    #[error("{n} elements: at most {MAX_READINGS} readings are read from one message")]
    TooManyReadings { n: usize },
    /// `senml` format: not a pack, or a record that breaks RFC 8428.
    #[error("not SenML: {0}")]
    BadSenml(String),
    /// `sparkplug_b` format: not a Sparkplug B topic or payload, or a metric that cannot be read.
    #[error("not Sparkplug B: {0}")]
    BadSparkplug(String),
    /// `sparkplug_b`: an alias no birth of the edge node or device defined.
    #[error("unknown alias: {0}")]
    UnknownAlias(String),
    /// `sparkplug_b`: data of an edge node or device whose birth is not held.
    #[error("no birth: {0}")]
    NoBirth(String),
    /// `sparkplug_b`: a message after a gap in the edge node's sequence numbers.
    #[error("sequence gap: {0}")]
    SequenceGap(String),
}

/// A decoded reading, ready for the set-based insert.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device_id: String,
    pub ts: DateTime<Utc>,
    /// The payload text as received (already validated as a JSON object).
    pub payload: String,
    /// Set only when the payload carried no timestamp: the idempotency key of the row.
    pub content_hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Literal(String),
    DeviceId,
    AnyOne,
    Rest,
}

/// A topic pattern such as `devices/{device_id}/#`: literals, `+`, a trailing `#` and one
/// `{device_id}` segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    segs: Vec<Seg>,
}

impl TopicPattern {
    pub fn new(pattern: &str) -> Self {
        let segs = pattern
            .split('/')
            .map(|s| match s {
                "{device_id}" => Seg::DeviceId,
                "+" => Seg::AnyOne,
                "#" => Seg::Rest,
                lit => Seg::Literal(lit.to_string()),
            })
            .collect();
        TopicPattern { segs }
    }

    /// The device id segment of `topic`, if the topic matches the pattern.
    pub fn device_id<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let mut found = None;
        // A plain byte search: `split('/')` costs more than the rest of this on a short topic.
        let mut rest = Some(topic);
        let mut parts = std::iter::from_fn(|| {
            let t = rest?;
            match t.bytes().position(|b| b == b'/') {
                Some(i) => {
                    rest = Some(&t[i + 1..]);
                    Some(&t[..i])
                }
                None => {
                    rest = None;
                    Some(t)
                }
            }
        });
        for seg in &self.segs {
            match seg {
                Seg::Rest => return found,
                _ => {
                    let part = parts.next()?;
                    match seg {
                        Seg::Literal(l) if l != part => return None,
                        Seg::DeviceId if part.is_empty() => return None,
                        Seg::DeviceId => found = Some(part),
                        _ => {}
                    }
                }
            }
        }
        if parts.next().is_some() {
            return None;
        }
        found
    }
}

/// Decoding settings.
#[derive(Debug, Clone)]
pub struct Decoder {
    pattern: TopicPattern,
    max_payload_bytes: usize,
    /// `[[formats]]`, each with its own device id pattern when it has one.
    formats: Vec<(FormatSpec, Option<TopicPattern>)>,
}

impl Decoder {
    pub fn new(pattern: &str, max_payload_bytes: usize) -> Self {
        Decoder {
            pattern: TopicPattern::new(pattern),
            max_payload_bytes,
            formats: Vec::new(),
        }
    }

    /// A `telemetry` reading: [`Decoder::parse_light`]'s checks, then a device id (at most
    /// [`MAX_DEVICE_ID_LEN`] characters) and a valid timestamp are required; without a
    /// timestamp the reading is at `received_at`, identified by its content hash.
    pub fn decode(
        &self,
        topic: &str,
        payload: &[u8],
        received_at: DateTime<Utc>,
    ) -> Result<Reading, DecodeError> {
        let parsed = self.parse_light(topic, payload)?;
        if let Some(e) = parsed.reading_error(topic) {
            return Err(e);
        }
        // Parsed from UTF-8 JSON: valid UTF-8.
        let payload_text = String::from_utf8_lossy(payload).into_owned();
        let (ts, content_hash) = match parsed.timestamp.ok().flatten() {
            Some(ts) => (ts, None),
            None => (received_at, Some(content_hash(topic, payload))),
        };
        Ok(Reading {
            device_id: parsed.device_id.unwrap_or_default(),
            ts,
            payload: payload_text,
            content_hash,
        })
    }
}

/// A payload checked for a route, with what the route's sources may read. Unlike
/// [`Decoder::decode`], a missing device id or a bad timestamp is not an error here: it matters
/// only to a route with a column that reads it ([`Parsed::reading_error`] for `telemetry`).
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The whole object and the payload's text: only from [`Decoder::parse`], for routes that
    /// read JSON paths; [`Decoder::parse_light`] leaves them out.
    pub object: Option<Map<String, Value>>,
    pub text: Option<String>,
    pub device_id: Option<String>,
    /// The reading's timestamp (`timestamp` or `ts`), `Ok(None)` when the payload has none.
    pub timestamp: Result<Option<DateTime<Utc>>, DecodeError>,
}

impl Decoder {
    /// Checks size, JSON object and `\u0000` like [`Decoder::decode`], and reads the device id
    /// and timestamp without requiring them; keeps the whole object.
    pub fn parse(&self, topic: &str, payload: &[u8]) -> Result<Parsed, DecodeError> {
        self.check_size(payload)?;
        self.parse_object(topic, payload)
    }

    /// [`Decoder::parse`] without the size check: a reading a format made from a message whose
    /// size was checked (`{"value": ...}` is a few bytes longer than the value).
    pub(crate) fn parse_object(&self, topic: &str, payload: &[u8]) -> Result<Parsed, DecodeError> {
        self.parse_with(&self.pattern, topic, payload)
    }

    /// [`Decoder::parse_object`] with the device id read by `pattern`.
    pub(crate) fn parse_with(
        &self,
        pattern: &TopicPattern,
        topic: &str,
        payload: &[u8],
    ) -> Result<Parsed, DecodeError> {
        let value: Value = json(payload).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let object = match value {
            Value::Object(o) => o,
            other => return Err(DecodeError::NotObject(kind(&other))),
        };
        if contains_nul_escape(payload) {
            return Err(DecodeError::NulEscape);
        }
        let fields = light::Fields {
            device_id: object.get("device_id").map(Field::of),
            ts: object.get("ts").map(Field::of),
            timestamp: object.get("timestamp").map(Field::of),
        };
        let mut parsed = parsed(pattern, topic, fields);
        parsed.text = Some(String::from_utf8_lossy(payload).into_owned());
        parsed.object = Some(object);
        Ok(parsed)
    }

    /// [`Decoder::parse`] without keeping the object: the same checks (the same JSON grammar
    /// and limits, every value read as `serde_json` reads it), but only the device id and the
    /// timestamp are kept, so no map is built. What a route that reads no JSON path needs.
    pub fn parse_light(&self, topic: &str, payload: &[u8]) -> Result<Parsed, DecodeError> {
        self.check_size(payload)?;
        self.light_with(&self.pattern, topic, payload)
    }

    /// [`Decoder::parse_light`] without the size check, the device id read by `pattern`.
    pub(crate) fn light_with(
        &self,
        pattern: &TopicPattern,
        topic: &str,
        payload: &[u8],
    ) -> Result<Parsed, DecodeError> {
        // Text without an escape has no NUL escape either.
        match std::str::from_utf8(payload).ok().and_then(light::quick) {
            Some(fields) => Ok(parsed(pattern, topic, fields)),
            None => self.light_of(pattern, topic, payload, json::<light::Shape>(payload)),
        }
    }

    /// What the light read `read` of `payload` gives (a read of its own, or one element's of
    /// an array read once: [`formats`]).
    pub(crate) fn light_of(
        &self,
        pattern: &TopicPattern,
        topic: &str,
        payload: &[u8],
        read: serde_json::Result<light::Shape<'_>>,
    ) -> Result<Parsed, DecodeError> {
        if light::raw_token_seen() {
            // A key only serde_json's own reader gives a meaning to: read as it reads it.
            let mut p = self.parse_with(pattern, topic, payload)?;
            (p.object, p.text) = (None, None);
            return Ok(p);
        }
        let fields = match read {
            Ok(light::Shape::Object(f)) => f,
            Ok(light::Shape::Other(k)) => return Err(DecodeError::NotObject(k)),
            Err(e) => return Err(DecodeError::NotJson(e.to_string())),
        };
        if contains_nul_escape(payload) {
            return Err(DecodeError::NulEscape);
        }
        Ok(parsed(pattern, topic, fields))
    }

    fn check_size(&self, payload: &[u8]) -> Result<(), DecodeError> {
        if payload.len() > self.max_payload_bytes {
            return Err(DecodeError::TooLarge {
                size: payload.len(),
                max: self.max_payload_bytes,
            });
        }
        Ok(())
    }
}

/// `payload` read by serde_json. Read from bytes, it checks that every string is UTF-8, one by
/// one; checked here at once, the text is read as a `str` (the same grammar, errors and
/// positions). Bytes that are not UTF-8 are read as bytes, for serde_json's own error.
pub(crate) fn json<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(payload) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(payload),
    }
}

/// The device id (the topic's by `pattern`, else the payload's) and the timestamp.
fn parsed(pattern: &TopicPattern, topic: &str, f: light::Fields<'_>) -> Parsed {
    let device_id = match pattern.device_id(topic) {
        Some(d) => Some(d.to_string()),
        None => match f.device_id {
            Some(Field::Str(s)) if !s.is_empty() => Some(s.into_owned()),
            Some(Field::Num(n)) => Some(n.to_string()),
            _ => None,
        },
    };
    Parsed {
        object: None,
        text: None,
        device_id,
        timestamp: timestamp_of(f.timestamp.as_ref(), f.ts.as_ref()),
    }
}
impl Parsed {
    /// Why this payload is not a reading for `telemetry`, which [`Decoder::decode`] would refuse
    /// it for beyond what [`Decoder::parse`] checks: no device id, one too long, a bad timestamp.
    pub fn reading_error(&self, topic: &str) -> Option<DecodeError> {
        match &self.device_id {
            None => Some(DecodeError::NoDeviceId {
                topic: topic.to_string(),
            }),
            Some(d) if d.chars().count() > MAX_DEVICE_ID_LEN => Some(DecodeError::DeviceIdTooLong),
            Some(_) => self.timestamp.as_ref().err().cloned(),
        }
    }
}

/// What a JSON value is, in words ("a number").
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether valid JSON text carries U+0000, which it can only do as the escape `\u0000` (a raw NUL
/// byte is not valid JSON). Each escape is stepped over whole, so the text `\\u0000` (an escaped
/// backslash, then `u0000`: a plain string jsonb stores) is not one; every occurrence counts, the
/// value of a key given twice included (jsonb refuses the text before it drops that value).
fn contains_nul_escape(json: &[u8]) -> bool {
    let mut i = 0;
    // Backslashes are rare in telemetry: jump between them rather than look at every byte.
    while let Some(at) = memchr::memchr(b'\\', &json[i..]) {
        let at = i + at;
        if json.get(at + 1..at + 6) == Some(&b"u0000"[..]) {
            return true;
        }
        i = (at + 2).min(json.len());
    }
    false
}

/// Idempotency key for readings without a timestamp: a redelivery has the same topic and bytes.
pub fn content_hash(topic: &str, payload: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(topic.as_bytes());
    h.update([0u8]);
    h.update(payload);
    hex::encode(&h.finalize()[..16])
}

/// Epoch numbers at or above this are milliseconds (1e11 s is the year 5138).
const MILLIS_THRESHOLD: f64 = 1e11;

fn timestamp_of(
    timestamp: Option<&Field<'_>>,
    ts: Option<&Field<'_>>,
) -> Result<Option<DateTime<Utc>>, DecodeError> {
    let (field, v) = match (timestamp, ts) {
        (Some(v), _) if *v != Field::Null => ("timestamp", v),
        (_, Some(v)) if *v != Field::Null => ("ts", v),
        _ => return Ok(None),
    };
    let bad = |reason: String| DecodeError::BadTimestamp { field, reason };
    timestamp_field(v).map(Some).map_err(bad)
}

/// A JSON value read as a point in time: an RFC 3339 string, or a Unix epoch in seconds or
/// milliseconds (a number or a numeric string), at microsecond resolution.
pub fn timestamp_value(v: &Value) -> Result<DateTime<Utc>, String> {
    timestamp_field(&Field::of(v))
}

/// [`timestamp_value`] of a field read without its `Value`.
fn timestamp_field(v: &Field<'_>) -> Result<DateTime<Utc>, String> {
    match v {
        Field::Str(s) => match s.trim().parse::<f64>() {
            Ok(n) => from_epoch(n),
            Err(_) => DateTime::parse_from_rfc3339(s.trim())
                .map_err(|e| format!("{s:?} is neither RFC 3339 nor a Unix epoch ({e})"))
                .and_then(|d| to_micros(d.with_timezone(&Utc))),
        },
        Field::Num(n) => n
            .as_f64()
            .ok_or_else(|| "not a finite number".to_string())
            .and_then(from_epoch),
        Field::Null => Err("expected a string or a number, got null".to_string()),
        Field::Other(k) => Err(format!("expected a string or a number, got {k}")),
    }
}

/// `t` at the resolution PostgreSQL stores (microseconds, rounded as PostgreSQL rounds text).
/// A reading's key must be the key that is stored: two readings a few nanoseconds apart are one
/// key in `telemetry`, so they must be one key in a batch too (or the second vanishes from the
/// batch's insert without being a duplicate or a conflict).
fn to_micros(t: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    // Nanoseconds may exceed a second on a leap second (23:59:60).
    let nanos = i64::from(t.timestamp_subsec_nanos());
    t.timestamp()
        .checked_mul(1_000_000)
        .and_then(|us| us.checked_add((nanos + 500) / 1000))
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(|| format!("{t} is out of range"))
}

fn from_epoch(n: f64) -> Result<DateTime<Utc>, String> {
    if !n.is_finite() || n < 0.0 {
        return Err(format!("epoch {n} is not a non-negative finite number"));
    }
    let micros = if n >= MILLIS_THRESHOLD {
        n * 1e3
    } else {
        n * 1e6
    };
    if micros > 253_402_300_799e6 {
        return Err(format!("epoch {n} is past the year 9999"));
    }
    Utc.timestamp_micros(micros.round() as i64)
        .single()
        .ok_or_else(|| format!("epoch {n} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    /// The receipt instant of the crate's tests.
    pub(crate) fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
            .single()
            .expect("valid")
    }

    fn d() -> Decoder {
        Decoder::new("devices/{device_id}/#", 1024)
    }

    /// JSON text built from its grammar: nested objects and arrays, keys the light reader keeps
    /// (also spelled with escapes) and the raw-value token, escapes and surrogates, numbers at
    /// the edges of their ranges, newlines between members.
    /// `broken`: with lone surrogates and numbers out of range or malformed among the leaves.
    pub(crate) fn json_text(broken: bool) -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let string = prop_oneof![
            6 => proptest::sample::select(vec![
                "device_id",
                "ts",
                "timestamp",
                "d\\u0065vice_id",
                "$serde_json::private::RawValue",
                "\\ud83d\\ude00",
                "\\u0000",
                "é€😀",
                "\\\"\\n\\/",
                "\u{feff}",
                "\u{2028}",
            ])
            .prop_map(str::to_string),
            u32::from(broken) => proptest::sample::select(vec!["\\udc00", "\\ud800x"])
                .prop_map(str::to_string),
            3 => "[a-z0-9 ]{0,4}",
        ]
        .prop_map(|s| format!("\"{s}\""));
        let leaf = prop_oneof![
            4 => string.clone(),
            4 => proptest::sample::select(vec![
                "null",
                "true",
                "false",
                "-0",
                "1.7e308",
                "-1e-400",
                "1700000000.123456",
                "18446744073709551615",
                "18446744073709551616",
                "-9223372036854775809",
            ])
            .prop_map(str::to_string),
            u32::from(broken) => proptest::sample::select(vec!["1e400", "01", "1."])
                .prop_map(str::to_string),
            2 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<f64>().prop_map(|n| n.to_string()),
        ];
        let members = |m: Vec<(String, String)>| {
            let m: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("{{{}}}", m.join(",\n"))
        };
        let nested = leaf.prop_recursive(6, 128, 4, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::vec((string.clone(), inner), 0..5).prop_map(members),
            ]
        });
        // Most payloads are objects with the keys the light reader keeps.
        let kept = proptest::sample::select(vec![
            "\"device_id\"",
            "\"ts\"",
            "\"timestamp\"",
            "\"d\\u0065vice_id\"",
            "\"$serde_json::private::RawValue\"",
        ])
        .prop_map(str::to_string);
        let object = proptest::collection::vec((kept, nested.clone()), 1..5).prop_map(members);
        prop_oneof![2 => object, 1 => nested]
    }

    /// Bytes for the reader: JSON text as built, between whitespace, a byte order mark or
    /// trailing text, and sometimes with one byte put in, replaced or cut off (bytes no UTF-8
    /// has, the start of a character cut short, a character's middle, ASCII).
    pub(crate) fn json_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let byte = proptest::sample::select(vec![
            0xff, 0xc3, 0x80, 0xed, 0xe2, b'"', b'\\', b'}', b'\t', 0x01,
        ]);
        let edit =
            proptest::option::weighted(0.2, (0u8..3, any::<proptest::sample::Index>(), byte));
        let ends = proptest::sample::select(vec!["", "", "", "", "", " ", "\n", "\u{feff}", "x"]);
        let text = prop_oneof![3 => json_text(false), 1 => json_text(true)];
        (ends.clone(), text, ends, edit).prop_map(|(before, text, after, edit)| {
            let mut b = format!("{before}{text}{after}").into_bytes();
            if let Some((op, at, byte)) = edit {
                let i = at.index(b.len() + 1);
                match op {
                    0 => b.insert(i, byte),
                    1 if i < b.len() => b[i] = byte,
                    _ => b.truncate(i),
                }
            }
            b
        })
    }

    /// What the light reader made of a payload, and whether it met the raw-value token: the
    /// fields with whether each string was borrowed from the payload.
    fn light_reading(r: serde_json::Result<light::Shape<'_>>) -> Result<String, String> {
        let token = light::raw_token_seen();
        let field = |f: &Option<Field<'_>>| match f {
            Some(Field::Str(c)) => format!("{c:?} borrowed {}", matches!(c, Cow::Borrowed(_))),
            other => format!("{other:?}"),
        };
        r.map(|s| match s {
            light::Shape::Object(f) => format!(
                "{} {} {} {token}",
                field(&f.device_id),
                field(&f.ts),
                field(&f.timestamp)
            ),
            light::Shape::Other(k) => format!("{k} {token}"),
        })
        .map_err(|e| format!("{e} {token}"))
    }

    /// `json` against serde_json's own reading of the bytes: a value, a gateway's raw elements,
    /// the light reader.
    fn reads_as_serde_json(bytes: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
        use serde_json::value::RawValue;
        let text = |e: serde_json::Error| e.to_string();
        proptest::prop_assert_eq!(
            json::<Value>(bytes).map_err(text),
            serde_json::from_slice::<Value>(bytes).map_err(text)
        );
        let raw = |r: Vec<&RawValue>| r.iter().map(|v| v.get().to_string()).collect::<Vec<_>>();
        proptest::prop_assert_eq!(
            json::<Vec<&RawValue>>(bytes).map(raw).map_err(text),
            serde_json::from_slice::<Vec<&RawValue>>(bytes)
                .map(raw)
                .map_err(text)
        );
        let ours = light_reading(json::<light::Shape>(bytes));
        let theirs = light_reading(serde_json::from_slice::<light::Shape>(bytes));
        proptest::prop_assert_eq!(&ours, &theirs);
        if let Some(f) = std::str::from_utf8(bytes).ok().and_then(light::quick) {
            proptest::prop_assert_eq!(light_reading(Ok(light::Shape::Object(f))), theirs);
        }
        Ok(())
    }

    /// How many of `cases` payloads [`light::quick`] answered for, each checked against
    /// serde_json by [`reads_as_serde_json`].
    fn quick_answers(
        cases: u32,
        payload: impl proptest::strategy::Strategy<Value = Vec<u8>>,
    ) -> u32 {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut answered = 0;
        for _ in 0..cases {
            let bytes = payload.new_tree(&mut runner).expect("a payload").current();
            reads_as_serde_json(&bytes).expect("the same reading");
            answered += u32::from(
                std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(light::quick)
                    .is_some(),
            );
        }
        answered
    }

    /// The quick reader answers only where serde_json reads the same fields, and it does answer
    /// for payloads without escapes: the generated ones with every backslash taken out (which
    /// also breaks strings and leaves `u0000`-like text behind). Most of those it leaves to
    /// serde_json are not JSON any more or hold a number with an exponent.
    #[test]
    fn the_quick_read_answers_only_as_serde_json_reads() {
        use proptest::strategy::Strategy;
        let plain = |b: Vec<u8>| b.into_iter().filter(|&c| c != b'\\').collect::<Vec<u8>>();
        let text = json_text(false).prop_map(move |t| plain(t.into_bytes()));
        let answered = quick_answers(3000, text);
        assert!(
            answered > 400,
            "the quick reader answered for {answered} of 3000"
        );
        let answered = quick_answers(3000, json_bytes().prop_map(plain));
        assert!(
            answered > 150,
            "the quick reader answered for {answered} of 3000 edited"
        );
        quick_answers(1000, json_bytes());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// A kept number is the `Number` serde_json reads: integers at and past the edges of
        /// `u64` and `i64`, floats to any number of places (serde_json's `float_roundtrip`
        /// against Rust's parse), negative zero.
        #[test]
        fn the_quick_read_takes_numbers_as_serde_json_does(
            float in proptest::prelude::any::<f64>(),
            places in 0usize..25,
            int in proptest::prelude::any::<i64>(),
            big in proptest::prelude::any::<u64>(),
            digits in "[0-9]{1,40}",
            pick in 0u8..6,
        ) {
            let text = match pick {
                0 => format!("{float:.places$}"),
                1 => format!("{}", float.abs() % 4e9),
                2 => int.to_string(),
                3 => format!("{big}{}", "0".repeat(places % 3)),
                4 => format!("-{}", digits.trim_start_matches('0')),
                _ => format!("{}.{digits}", int / 1000),
            };
            for key in ["ts", "timestamp", "device_id"] {
                let payload = format!("{{\"{key}\":{text}}}");
                reads_as_serde_json(payload.as_bytes())?;
                let answered = light::quick(&payload).is_some();
                proptest::prop_assert!(answered || text.len() > 300 || text == "-", "{payload}");
            }
        }
    }

    #[test]
    fn the_quick_read_leaves_to_serde_json_what_it_could_read_otherwise() {
        let answers = |s: &str| light::quick(s).is_some();
        for s in [
            r#"{"device_id":"dev-001","run":"default-1","seq":12345,"ts":1796700000.123456}"#,
            " {\"a\" : [1, -0, 0.5, {\"b\": [true, false, null, \"é\"]}], \"ts\": null}\n",
            "{}",
            r#"{"device_id":7,"ts":{"x":[]},"timestamp":[1]}"#,
        ] {
            assert!(answers(s), "{s}");
        }
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(64), "]".repeat(64));
        let long = format!("{{\"a\":{}}}", "9".repeat(301));
        for s in [
            r#"{"a":1e3}"#,
            r#"{"a":1E3}"#,
            r#"{"a":"\u0041"}"#,
            r#"{"$serde_json::private::RawValue":1}"#,
            "{\"a\":\"tab\there\"}",
            "\u{feff}{}",
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":-}"#,
            r#"{"a":1,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":tru}"#,
            r#"{} x"#,
            r#"[]"#,
            r#"{"a" 1}"#,
            deep.as_str(),
            long.as_str(),
        ] {
            assert!(!answers(s), "{s}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// `json` reads what serde_json reads from bytes: the same value or the same error
        /// (its text and position).
        #[test]
        fn json_reads_bytes_as_serde_json_does(bytes in json_bytes()) {
            reads_as_serde_json(&bytes)?;
        }
    }

    #[test]
    fn json_reads_deep_nesting_as_serde_json_does() {
        for depth in [127, 128, 129, 200] {
            for tail in [&b""[..], b"\xff"] {
                let b = [&b"[".repeat(depth), tail, &b"]".repeat(depth)].concat();
                reads_as_serde_json(&b).expect("the same reading");
            }
        }
    }

    #[test]
    fn device_id_from_topic_then_payload() {
        let r = d()
            .decode("devices/m-1/telemetry", br#"{"ts": 1700000000}"#, now())
            .expect("ok");
        assert_eq!(r.device_id, "m-1");
        let r = d()
            .decode("other/x", br#"{"device_id":"p-9","ts":1700000000}"#, now())
            .expect("ok");
        assert_eq!(r.device_id, "p-9");
        let e = d()
            .decode("other/x", br#"{"ts":1700000000}"#, now())
            .unwrap_err();
        assert!(matches!(e, DecodeError::NoDeviceId { .. }));
    }

    #[test]
    fn the_device_id_is_the_segment_split_on_slashes_reads() {
        // Against the plain reading of the pattern over `split('/')`, on topics of every shape.
        let reference = |p: &TopicPattern, topic: &str| -> Option<String> {
            let parts: Vec<&str> = topic.split('/').collect();
            let mut found = None;
            for (i, seg) in p.segs.iter().enumerate() {
                match (seg, parts.get(i)) {
                    (Seg::Rest, _) => return found,
                    (_, None) => return None,
                    (Seg::Literal(l), Some(part)) if l != part => return None,
                    (Seg::DeviceId, Some(&"")) => return None,
                    (Seg::DeviceId, Some(part)) => found = Some(part.to_string()),
                    _ => {}
                }
            }
            (parts.len() == p.segs.len()).then_some(found).flatten()
        };
        let segs = ["", "a", "d\u{e9}v", "devices", "+"];
        let mut topics = vec![String::new()];
        for _ in 0..4 {
            let longer: Vec<String> = topics
                .iter()
                .flat_map(|t| segs.iter().map(move |s| format!("{t}/{s}")))
                .collect();
            topics.extend(longer);
        }
        for pattern in [
            "devices/{device_id}/#",
            "{device_id}",
            "+/{device_id}",
            "a/{device_id}/+",
        ] {
            let p = TopicPattern::new(pattern);
            for t in topics.iter().map(|t| t.strip_prefix('/').unwrap_or(t)) {
                assert_eq!(
                    p.device_id(t).map(str::to_string),
                    reference(&p, t),
                    "{pattern} {t:?}"
                );
            }
        }
    }

    #[test]
    fn pattern_matching() {
        let p = TopicPattern::new("site/+/{device_id}/telemetry");
        assert_eq!(p.device_id("site/a/dev/telemetry"), Some("dev"));
        assert_eq!(p.device_id("site/a/dev/other"), None);
        assert_eq!(p.device_id("site/a/dev/telemetry/x"), None);
        assert_eq!(
            TopicPattern::new("devices/{device_id}/#").device_id("devices/x"),
            Some("x")
        );
        assert_eq!(
            TopicPattern::new("devices/{device_id}/#").device_id("devices//t"),
            None
        );
    }

    #[test]
    fn timestamps_in_every_accepted_form() {
        let want = Utc.timestamp_opt(1_700_000_000, 0).single().expect("valid");
        for body in [
            r#"{"timestamp":"2023-11-14T22:13:20Z"}"#,
            r#"{"timestamp":"2023-11-14T23:13:20+01:00"}"#,
            r#"{"ts":1700000000}"#,
            r#"{"ts":1700000000000}"#,
            r#"{"ts":"1700000000"}"#,
        ] {
            let r = d()
                .decode("devices/a/t", body.as_bytes(), now())
                .expect(body);
            assert_eq!(r.ts, want, "{body}");
            assert!(r.content_hash.is_none());
        }
        let r = d()
            .decode("devices/a/t", br#"{"ts":1700000000.25}"#, now())
            .expect("frac");
        assert_eq!(r.ts.timestamp_subsec_millis(), 250);
    }

    #[test]
    fn timestamps_have_the_stored_resolution_microseconds() {
        let at = |body: &str| {
            d().decode("devices/a/t", body.as_bytes(), now())
                .expect(body)
                .ts
        };
        let base = Utc.timestamp_opt(1_700_000_000, 0).single().expect("valid");
        let us = chrono::Duration::microseconds;
        // Nanoseconds apart: one key, as in telemetry.
        assert_eq!(at(r#"{"ts":"2023-11-14T22:13:20.0000001Z"}"#), base);
        assert_eq!(at(r#"{"ts":"2023-11-14T22:13:20.0000004Z"}"#), base);
        assert_eq!(at(r#"{"ts":"2023-11-14T22:13:20.0000005Z"}"#), base + us(1));
        assert_eq!(
            at(r#"{"ts":"2023-11-14T22:13:20.123456789Z"}"#),
            base + us(123_457)
        );
        // Before 1970 and 2000 too (no rounding toward an epoch).
        let zero = at(r#"{"ts":"0000-01-01T00:00:00.000000001Z"}"#);
        assert_eq!(zero.timestamp_subsec_nanos(), 0);
        assert_eq!(zero.timestamp(), -62_167_219_200);
        // A leap second is the next second's start.
        assert_eq!(
            at(r#"{"ts":"2016-12-31T23:59:60Z"}"#),
            Utc.with_ymd_and_hms(2017, 1, 1, 0, 0, 0)
                .single()
                .expect("valid")
        );
    }

    #[test]
    fn only_a_real_nul_escape_is_refused() {
        // An escaped backslash followed by "u0000" is plain text that jsonb stores.
        for body in [
            r#"{"path":"C:\\u0000\\temp"}"#,
            r#"{"s":"\\\\u0000"}"#,
            r#"{"s":"\\"}"#,
        ] {
            d().decode("devices/a/t", body.as_bytes(), now())
                .unwrap_or_else(|e| panic!("{body}: {e}"));
        }
        for body in [
            r#"{"s":"\u0000"}"#,
            r#"{"\u0000":1}"#,
            r#"{"s":"\\\u0000"}"#,
            // jsonb refuses the text before it keeps the last of the duplicate keys.
            r#"{"s":"\u0000","s":"ok"}"#,
        ] {
            assert_eq!(
                d().decode("devices/a/t", body.as_bytes(), now()),
                Err(DecodeError::NulEscape),
                "{body}"
            );
        }
    }

    #[test]
    fn missing_timestamp_uses_receive_time_and_a_content_key() {
        let a = d().decode("devices/a/t", br#"{"v":1}"#, now()).expect("ok");
        let later = now() + chrono::Duration::seconds(5);
        let b = d().decode("devices/a/t", br#"{"v":1}"#, later).expect("ok");
        assert_eq!(a.ts, now());
        assert!(a.content_hash.is_some());
        assert_eq!(
            a.content_hash, b.content_hash,
            "a redelivery must get the same key"
        );
        let c = d().decode("devices/a/t", br#"{"v":2}"#, now()).expect("ok");
        assert_ne!(a.content_hash, c.content_hash);
    }

    #[test]
    fn the_light_parse_refuses_and_reads_exactly_what_the_full_parse_does() {
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        let cases: Vec<&[u8]> = vec![
            br#"{"v":1e400}"#,
            br#"{"v":-1e400,"ts":1700000000}"#,
            br#"{"v":"\ud800"}"#,
            br#"{"\ud800":1}"#,
            br#"{"ts":1,"ts":2}"#,
            br#"{"ts":null,"timestamp":1700000000}"#,
            br#"{"timestamp":null,"ts":1700000000}"#,
            br#"{"device_id":"a","device_id":7}"#,
            br#"{"device_id":""}"#,
            br#"{"d\u0065vice_id":"escaped-key"}"#,
            br#"{"v":[1,{"x":[true,null]}],"ts":"2026-01-02T03:04:05.123456789Z"}"#,
            br#"{} "#,
            br#"{}x"#,
            br#"{"a":1,}"#,
            b"",
            b"null",
            b"\"s\"",
            b"[]",
            deep.as_bytes(),
        ];
        for body in cases {
            for topic in ["devices/m/t", "gw/1/up"] {
                invariants::check(
                    &Decoder::new("devices/{device_id}/#", 1 << 16),
                    topic,
                    body,
                    1 << 16,
                );
            }
        }
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        type Check = fn(&DecodeError) -> bool;
        let cases: &[(&[u8], Check)] = &[
            (b"not json", |e| matches!(e, DecodeError::NotJson(_))),
            (b"[1,2]", |e| matches!(e, DecodeError::NotObject(_))),
            (b"42", |e| matches!(e, DecodeError::NotObject(_))),
            (br#"{"ts":"yesterday"}"#, |e| {
                matches!(e, DecodeError::BadTimestamp { .. })
            }),
            (br#"{"ts":-5}"#, |e| {
                matches!(e, DecodeError::BadTimestamp { .. })
            }),
            (br#"{"ts":1e300}"#, |e| {
                matches!(e, DecodeError::BadTimestamp { .. })
            }),
            (br#"{"ts":true}"#, |e| {
                matches!(e, DecodeError::BadTimestamp { .. })
            }),
            (br#"{"s":"a\u0000b"}"#, |e| {
                matches!(e, DecodeError::NulEscape)
            }),
            (&[0xff, 0xfe, b'{'], |e| {
                matches!(e, DecodeError::NotJson(_))
            }),
        ];
        for (body, check) in cases {
            let e = d().decode("devices/a/t", body, now()).unwrap_err();
            assert!(check(&e), "{:?} -> {e}", String::from_utf8_lossy(body));
        }
        let big = vec![b' '; 2000];
        assert!(matches!(
            d().decode("devices/a/t", &big, now()),
            Err(DecodeError::TooLarge {
                size: 2000,
                max: 1024
            })
        ));
    }

    /// `decode` as it was before it read the payload without building a `serde_json::Value`:
    /// the reference the light parse must agree with, result and error text alike.
    fn decode_via_value(d: &Decoder, topic: &str, payload: &[u8]) -> Result<Reading, DecodeError> {
        if payload.len() > d.max_payload_bytes {
            return Err(DecodeError::TooLarge {
                size: payload.len(),
                max: d.max_payload_bytes,
            });
        }
        let value: Value =
            serde_json::from_slice(payload).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let obj = match &value {
            Value::Object(o) => o,
            other => return Err(DecodeError::NotObject(kind(other))),
        };
        if contains_nul_escape(payload) {
            return Err(DecodeError::NulEscape);
        }
        let device_id = match d.pattern.device_id(topic) {
            Some(id) => id.to_string(),
            None => match obj.get("device_id") {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => {
                    return Err(DecodeError::NoDeviceId {
                        topic: topic.to_string(),
                    })
                }
            },
        };
        if device_id.chars().count() > MAX_DEVICE_ID_LEN {
            return Err(DecodeError::DeviceIdTooLong);
        }
        let text = String::from_utf8_lossy(payload).into_owned();
        Ok(
            match timestamp_of(
                obj.get("timestamp").map(Field::of).as_ref(),
                obj.get("ts").map(Field::of).as_ref(),
            )? {
                Some(ts) => Reading {
                    device_id,
                    ts,
                    payload: text,
                    content_hash: None,
                },
                None => Reading {
                    device_id,
                    ts: now(),
                    payload: text,
                    content_hash: Some(content_hash(topic, payload)),
                },
            },
        )
    }

    #[test]
    fn the_light_parse_decodes_exactly_as_a_parsed_value_did() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for dir in ["fuzz/corpus/decode", "tests/corpus"] {
            for e in std::fs::read_dir(root.join(dir)).expect("corpus").flatten() {
                let data = std::fs::read(e.path()).expect("readable");
                inputs.push(data.get(1..).unwrap_or_default().to_vec());
                inputs.push(data);
            }
        }
        let deep_object = format!("{}{}", r#"{"a":"#.repeat(200), "}".repeat(200));
        let deep_array = format!(r#"{{"a":{}1{}}}"#, "[".repeat(127), "]".repeat(127));
        for s in [
            r#"{"device_id":"a","device_id":"b","ts":1,"ts":null,"timestamp":null}"#,
            r#"{"device_id":"","device_id":7.5e3,"timestamp":"2026-01-02T03:04:05.123456789Z"}"#,
            r#"{"devic\u0065_id":"esc","t\u0073":"1700000000"}"#,
            r#"{"x":1e400,"ts":1}"#,
            r#"{"x":-1e400}"#,
            r#"{"x":18446744073709551616,"ts":1e-400}"#,
            r#"{"x":[1,{"y":[true,false,null,"s\n"]}],"ts":1.5}"#,
            // Each field read without its Value (light::Field) as the Value reader reads it.
            r#"{"ts":{"a":[1,{"b":null}]}}"#,
            r#"{"timestamp":[1,2],"ts":5}"#,
            r#"{"ts":true,"device_id":false}"#,
            r#"{"device_id":"d\u0065v","ts":"2026-01-02T03:04:05\u005a"}"#,
            r#"{"device_id":-0.0,"ts":"1700000000.5"}"#,
            r#"{"device_id":12345678901234567890,"timestamp":1.7e12}"#,
            r#"{"device_id":{"x":1},"ts":-1}"#,
            r#"{"device_id":[],"ts":" 1700000000 "}"#,
            // The key serde_json's Value reader reads raw JSON text by (its raw_value feature).
            r#"{"device_id":"a","ts":{"$serde_json::private::RawValue":"1700000000"}}"#,
            r#"{"device_id":{"$serde_json::private::RawValue":"\"m\""}}"#,
            r#"{"ts":{"$serde_json::private::RawValue":7}}"#,
            r#"{"x":{"$serde_json::private::RawValue":7},"device_id":"a","ts":1}"#,
            r#"{"x":{"\u0024serde_json::private::RawValue":"1"},"device_id":"a","ts":1}"#,
            r#"{"x":"\ud800"}"#,
            r#"{"x":"\uD83D\uDE00","device_id":null}"#,
            r#"{"x":1,}"#,
            r#"{"x":01}"#,
            r#"{"ts":1} trailing"#,
            r#"{"ts":1}   "#,
            r#"[{"device_id":"a"}]"#,
            r#""text""#,
            "null",
            "true",
            "-0.5",
            "",
            "{",
            r#"{"a":"\u0000"}"#,
            r#"{"a":"\\u0000"}"#,
            &deep_object,
            &deep_array,
        ] {
            inputs.push(s.as_bytes().to_vec());
        }
        inputs.push(b"{\"x\":\"\xff\xfe\",\"ts\":1}".to_vec());
        inputs.push(b"{\"\xc3\x28\":1,\"ts\":1}".to_vec());
        inputs.push(b"{\"ts\":1,\"x\":\"caf\xc3\xa9\"}".to_vec());
        let decoder = Decoder::new("devices/{device_id}/#", 4096);
        for payload in &inputs {
            for topic in ["devices/m-1/t", "gw/site/up"] {
                assert_eq!(
                    decoder.decode(topic, payload, now()),
                    decode_via_value(&decoder, topic, payload),
                    "{topic} {:?}",
                    String::from_utf8_lossy(payload)
                );
            }
        }
    }
}
