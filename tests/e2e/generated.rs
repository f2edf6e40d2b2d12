//! Generative tests where input is the risk (G2, G3, G6): adversarial payloads, mixed in batches
//! with numbered good readings, through the real write path against the real PostgreSQL server,
//! never a model of it.
//!
//! The property, per generated case: every message lands in exactly one place. A payload the
//! decoder refuses is one dead letter with the decoder's reason; a payload it accepts is one
//! `telemetry` row (its device id, timestamp and jsonb as decoded) or, if PostgreSQL refuses it,
//! one dead letter `rejected_by_database` of its own; every good reading is stored exactly once;
//! nothing is in both places, nothing is missing, nothing else is written; and the writer drains
//! the case within a bounded time (no stall).
//!
//! - `the_write_path_puts_every_generated_message_in_exactly_one_place`: a term's real `Writer`
//!   (gather, decode, one fenced statement per batch, row errors isolated by halving) in-process
//!   against a private PostgreSQL, random batch sizes; 64 cases, `PROPTEST_CASES=n` for more.
//! - `the_binary_puts_every_generated_message_in_exactly_one_place`: the same property end to end
//!   through Mosquitto and the `leasehold` binary (topics valid for MQTT); 8 cases, or
//!   `PROPTEST_CASES / 8`, in one cluster whose node must stay live throughout.
//! - `a_pair_with_one_key_is_settled_alike_in_one_batch_or_two`: two readings with the same key
//!   and payloads that differ only in form (key order, spacing, number spelling, digits past
//!   f64) are a duplicate in one batch only when PostgreSQL also finds them equal (a reading it
//!   finds different, dropped as a duplicate, would be lost silently).
//! - `any_payload_through_any_mapping_lands_in_its_route_or_in_dead_letters`: routes with a
//!   generated mapping (any source into columns of every kind, typmods included) and any
//!   payload, through a term's real `Writer`: each message is, per route, one row of the route's
//!   table or one dead letter naming the route, and the writer drains (no stuck batch).
//!
//! A failing case is shrunk and printed; rerun it with `PROPTEST_CASES` and the printed seed
//! (`PROPTEST_RNG_SEED`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::helpers::Cluster;
use anyhow::{bail, ensure, Context, Result};
use leasehold_decode::Decoder;
use leasehold_ingest::{Acker, Inbound};
use leasehold_node::writer::{reason_label, Writer, WriterConfig};
use leasehold_store::Fence;
use leasehold_testkit::publish::{numbered_from, publish_all};
use leasehold_testkit::{eventually, http, Postgres};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use tokio_util::sync::CancellationToken;

/// The pattern the node uses by default.
const PATTERN: &str = "devices/{device_id}/#";
/// `MAX_PAYLOAD_BYTES`'s default.
const MAX_PAYLOAD: usize = 256 * 1024;
/// The longest a case may take to drain through the writer: a stall fails the case.
const DRAIN_BOUND: Duration = Duration::from_secs(10);

/// Cases per property: 64 in `make test`, `PROPTEST_CASES` for more.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        // A failing case is shrunk against the real server; bounded so a failure reports in time.
        max_shrink_time: 120_000,
        max_shrink_iters: 400,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Generators. Payloads are built as JSON text, not through serde, so that every spelling a
// device can send (escapes, number forms, duplicate keys, whitespace, depth) can be produced.
// ---------------------------------------------------------------------------------------------

/// Numbers at every limit: f64's and i64/u64's edges, jsonb numeric's digit and scale limits,
/// huge and tiny exponents, negative zero.
const EDGE_NUMBERS: &[&str] = &[
    "0",
    "-0",
    "-0.0",
    "0e0",
    "0.0e-0",
    "1E+2",
    "1e308",
    "-1e308",
    "1.7976931348623157e308",
    "1e-400",
    "5e-324",
    "4.9e-325",
    "2.2250738585072014e-308",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "123456789012345678901234567890.123456789012345678901234567890",
    "0.30000000000000001",
    "1e-16383",
    "1e-16384",
    "1e-20000",
    "-1e-99999",
];

/// Numbers past f64's range: valid JSON, and numeric in PostgreSQL, but serde_json refuses them.
const OVERFLOWING_NUMBERS: &[&str] = &[
    "1.7976931348623159e308",
    "1e309",
    "-1e400",
    "1e131071",
    "1e131072",
    "1e200000",
];

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        120 => valid_number(),
        1 => prop::sample::select(OVERFLOWING_NUMBERS).prop_map(str::to_string),
    ]
}

fn valid_number() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(EDGE_NUMBERS).prop_map(str::to_string),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        2 => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        1 => (1usize..308).prop_map(|n| format!("9{}", "9".repeat(n))),
        1 => (1usize..20000).prop_map(|n| format!("0.{}1", "0".repeat(n))),
        1 => (1usize..400).prop_map(|n| format!("-{}.5", "7".repeat(n))),
        2 => (-330i32..330).prop_map(|e| format!("1e{e}")),
        1 => (-40000i32..308).prop_map(|e| format!("-2.5E{e:+}")),
    ]
}

/// Literal text with a special meaning somewhere: controls, quotes, backslashes, NUL in its
/// spellings (valid, invalid and the escaped-backslash one that is plain text), surrogates
/// paired and alone, non-characters, RTL overrides, zero-width characters, non-BMP.
const STRING_PIECES: &[&str] = &[
    "\\n",
    "\\t",
    "\\\"",
    "\\\\",
    "\\/",
    "\\b",
    "\\f",
    "\\r",
    "\\\\u0000",
    "C:\\\\u0000\\\\temp",
    "\\u001f",
    "\\u001F",
    "\\u007f",
    "\\u0080",
    "\\ud83d\\ude00",
    "\\uD83D\\uDE00",
    "\\udbff\\udfff",
    "\\ufffe",
    "\\uffff",
    "\\ufeff",
    "\\u202e",
    "\u{202E}evil\u{202C}",
    "\u{200B}",
    "\u{200D}",
    "\u{FEFF}",
    "\u{FFFF}",
    "\u{FFFE}",
    "\u{10FFFF}",
    "\u{1F600}",
    "\u{1F3F3}\u{FE0F}\u{200D}\u{1F308}",
    "e\u{301}",
    "\u{5D0}\u{5D1}\u{5D2}",
    "\u{639}\u{631}\u{628}\u{64A}",
    "漢字",
    "\u{7F}",
    "\u{85}",
    "\u{2028}\u{2029}",
];

/// Pieces that make the text invalid JSON, or unstorable (NUL): raw control characters, a raw
/// NUL, the escape of NUL, a stray quote,
/// escapes that do not exist, and lone or mismatched surrogate escapes.
const BROKEN_PIECES: &[&str] = &[
    "\\u0000",
    "x\\u0000y",
    "\0",
    "\u{1}",
    "\n",
    "\t",
    "\"",
    "\\x41",
    "\\",
    "\\U0000",
    "\\u000",
    "\\ud800",
    "\\udfff",
    "\\udc00\\ud800",
    "\\ud83d\\u0041",
    "\\ud83d",
];

fn string_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-zA-Z0-9 _.:-]{0,12}".prop_map(|s| s),
        4 => prop::sample::select(STRING_PIECES).prop_map(str::to_string),
        2 => any::<u16>()
            .prop_filter("not a surrogate", |u| !(0xD800..0xE000).contains(u))
            .prop_map(|u| format!("\\u{u:04x}")),
        2 => any::<char>()
            .prop_filter("needs no escape", |c| *c >= ' ' && *c != '"' && *c != '\\')
            .prop_map(|c| c.to_string()),
        1 => (0x10000u32..0x110000).prop_map(|c| {
            let c = c - 0x10000;
            format!("\\u{:04x}\\u{:04x}", 0xD800 + (c >> 10), 0xDC00 + (c & 0x3FF))
        }),
        1 => (0u8..0x20).prop_map(|c| format!("\\u{c:04X}")),
        1 => (1usize..6000).prop_map(|n| "w".repeat(n)),
    ]
}

/// A piece of a string literal; rarely one that breaks it.
fn string_piece_or_broken() -> impl Strategy<Value = String> {
    prop_oneof![
        120 => string_piece(),
        1 => prop::sample::select(BROKEN_PIECES).prop_map(str::to_string),
    ]
}

/// A JSON string literal (with its quotes); mostly valid, sometimes not.
fn json_string() -> impl Strategy<Value = String> {
    prop::collection::vec(string_piece_or_broken(), 0..6)
        .prop_map(|p| format!("\"{}\"", p.concat()))
}

/// Whitespace JSON allows, and rarely a form feed or vertical tab, which it does not.
fn ws() -> impl Strategy<Value = String> {
    prop_oneof![
        180 => Just(String::new()),
        60 => prop::sample::select(&[" ", "\n", "\t", "\r\n", "  \n\t "][..]).prop_map(str::to_string),
        1 => prop::sample::select(&["\u{c}", "\u{b}", "\u{a0}"][..]).prop_map(str::to_string),
    ]
}

fn leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => number(),
        3 => json_string(),
        1 => prop::sample::select(&["true", "false", "null", "{}", "[]"][..]).prop_map(str::to_string),
    ]
}

/// A JSON value: leaves, arrays and objects (duplicate keys included), a few levels deep.
fn value() -> impl Strategy<Value = String> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec((ws(), inner.clone()), 0..6).prop_map(|items| {
                let body: Vec<String> = items.into_iter().map(|(w, v)| format!("{w}{v}")).collect();
                format!("[{}]", body.join(","))
            }),
            prop::collection::vec((key(), ws(), inner), 0..6).prop_map(|members| {
                let body: Vec<String> = members
                    .into_iter()
                    .map(|(k, w, v)| format!("{k}{w}:{w}{v}"))
                    .collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

/// Object keys: plain, the decoder's own field names (so they can come twice), adversarial
/// strings, and huge ones.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(&["\"v\"", "\"value\"", "\"temp\"", "\"a\"", "\"\""][..])
            .prop_map(str::to_string),
        1 => prop::sample::select(&["\"ts\"", "\"timestamp\"", "\"device_id\""][..])
            .prop_map(str::to_string),
        2 => json_string(),
        1 => (1usize..40000).prop_map(|n| format!("\"{}\"", "k".repeat(n))),
    ]
}

/// Nesting to and past serde_json's recursion limit (128) in arrays, objects or both.
fn deep() -> impl Strategy<Value = String> {
    (1usize..200, 0u8..3, leaf()).prop_map(|(depth, kind, leaf)| {
        let mut s = String::new();
        for level in 0..depth {
            match (kind, level % 2) {
                (0, _) | (2, 0) => s.push('['),
                _ => s.push_str("{\"n\":"),
            }
        }
        s.push_str(&leaf);
        for level in (0..depth).rev() {
            match (kind, level % 2) {
                (0, _) | (2, 0) => s.push(']'),
                _ => s.push('}'),
            }
        }
        s
    })
}

/// Timestamps in every form: epoch seconds and milliseconds (int, float, string), at and past
/// every limit of the decoder (year 9999, the milliseconds threshold) and of PostgreSQL, RFC 3339
/// in its variants, and things that are not timestamps at all.
const TIMESTAMPS: &[&str] = &[
    "1700000000",
    "1700000000000",
    "1700000000.123456",
    "1700000000.1234567891",
    "\"1700000000\"",
    "\" 1700000000 \"",
    "\"1.7e9\"",
    "99999999999.9",
    "1e11",
    "100000000000",
    "253402300799",
    "253402300800",
    "253402300799999",
    "253402300800000",
    "9223372036854775807",
    "18446744073709551616",
    "1e308",
    "1e-400",
    "0",
    "-0",
    "-1",
    "-1e-9",
    "\"NaN\"",
    "\"inf\"",
    "\"-infinity\"",
    "\"0x10\"",
    "\"\"",
    "\"2023-11-14T22:13:20Z\"",
    "\"2023-11-14t22:13:20z\"",
    "\"2023-11-14 22:13:20Z\"",
    "\"2023-11-14T22:13:20.123456789+05:30\"",
    "\"2023-11-14T22:13:20-23:59\"",
    "\"2023-11-14T22:13:20+24:00\"",
    "\"2023-11-14T22:13:20\"",
    "\"2023-11-14\"",
    "\"0000-01-01T00:00:00Z\"",
    "\"0000-01-01T00:00:00+23:59\"",
    "\"9999-12-31T23:59:59.999999999Z\"",
    "\"9999-12-31T23:59:59-23:59\"",
    "\"10000-01-01T00:00:00Z\"",
    "\"2023-02-30T00:00:00Z\"",
    "\"2016-12-31T23:59:60Z\"",
    "\"2016-12-31T23:59:60.5+00:00\"",
    "\"yesterday\"",
    "null",
    "true",
    "{}",
    "[1700000000]",
];

fn timestamp() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(TIMESTAMPS).prop_map(str::to_string),
        2 => (0u64..400_000_000_000).prop_map(|n| n.to_string()),
        1 => (0u64..253_402_300_799_999).prop_map(|n| n.to_string()),
        1 => (0u64..u64::MAX).prop_map(|n| format!("\"{n}\"")),
        1 => (0i32..10000, 1u32..13, 1u32..29, 0u32..24, 0u32..60, 0u32..60, 0u32..1_000_000_000)
            .prop_map(|(y, mo, d, h, mi, s, ns)| {
                format!("\"{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ns:09}Z\"")
            }),
    ]
}

/// Device ids: short, around the decoder's limit of 256 characters (one or four bytes each),
/// and with unicode an operator would not expect. Never contains `/`, `+`, `#` or NUL, so it is
/// also a valid topic segment.
fn device_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u32..50).prop_map(|n| format!("dev-{n}")),
        1 => (250usize..262).prop_map(|n| "L".repeat(n)),
        1 => (250usize..262).prop_map(|n| "\u{1F600}".repeat(n)),
        1 => prop::collection::vec(
            prop::sample::select(&["a", "\u{202E}", "\u{200B}", "\u{5D0}", "\u{1F600}", " ", "e\u{301}", "\u{FEFF}", "."][..]),
            1..40,
        )
        .prop_map(|v| v.concat()),
    ]
}

/// The value of a payload's `device_id` field: mostly a string, sometimes a number or junk.
fn device_id_field() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => device_id().prop_map(|d| format!("\"{d}\"")),
        1 => number(),
        1 => prop::sample::select(&["\"\"", "null", "true", "{}", "[\"dev-1\"]"][..]).prop_map(str::to_string),
    ]
}

/// A generated adversarial payload (a JSON object most of the time, mutated sometimes).
#[derive(Clone)]
struct Payload(Vec<u8>);

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = String::from_utf8_lossy(&self.0);
        if text.len() > 600 {
            let head: String = text.chars().take(300).collect();
            write!(f, "{} bytes: {head:?}...", self.0.len())
        } else {
            write!(f, "{text:?}")
        }
    }
}

/// Ways a valid object is spoiled, or replaced, on its way from a device.
#[derive(Debug, Clone, Copy)]
enum Mutation {
    None,
    Bom,
    TrailingGarbage,
    TrailingWhitespace,
    Truncated(usize),
    InArray,
    NotAnObject,
    Empty,
    Whitespace,
    Bytes,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        30 => Just(Mutation::None),
        1 => Just(Mutation::Bom),
        1 => Just(Mutation::TrailingGarbage),
        1 => Just(Mutation::TrailingWhitespace),
        1 => any::<usize>().prop_map(Mutation::Truncated),
        1 => Just(Mutation::InArray),
        1 => Just(Mutation::NotAnObject),
        1 => Just(Mutation::Empty),
        1 => Just(Mutation::Whitespace),
        1 => Just(Mutation::Bytes),
    ]
}

/// An object payload: maybe a device id, maybe one or two timestamp fields, members of every
/// kind (duplicate keys included), maybe a deep member, maybe a filler that brings it near or
/// past `MAX_PAYLOAD_BYTES`; then maybe spoiled.
fn payload() -> impl Strategy<Value = Payload> {
    (
        prop::option::weighted(0.7, device_id_field()),
        prop::option::weighted(
            0.7,
            (prop::sample::select(&["ts", "timestamp"][..]), timestamp()),
        ),
        prop::option::weighted(0.1, timestamp()),
        prop::collection::vec((key(), value()), 0..5),
        prop::option::weighted(0.15, deep()),
        prop::option::weighted(0.04, (MAX_PAYLOAD - 2000)..(MAX_PAYLOAD + 2000)),
        (ws(), ws()),
        mutation(),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(dev, ts, ts2, members, deep, fill, (w1, w2), m, junk)| {
            let mut fields: Vec<String> = Vec::new();
            if let Some(d) = dev {
                fields.push(format!("\"device_id\":{d}"));
            }
            if let Some((k, v)) = ts {
                fields.push(format!("\"{k}\"{w1}:{w2}{v}"));
            }
            for (k, v) in members {
                fields.push(format!("{k}:{v}"));
            }
            if let Some(v) = ts2 {
                fields.push(format!("\"ts\":{v}"));
            }
            if let Some(d) = deep {
                fields.push(format!("\"deep\":{d}"));
            }
            let mut text = format!("{{{w1}{}{w2}}}", fields.join(&format!(",{w2}")));
            if let Some(target) = fill {
                let pad = target.saturating_sub(text.len() + 12);
                text = format!("{{\"fill\":\"{}\",{}", "f".repeat(pad), &text[1..]);
            }
            let bytes = match m {
                Mutation::None => text.into_bytes(),
                Mutation::Bom => [&b"\xEF\xBB\xBF"[..], text.as_bytes()].concat(),
                Mutation::TrailingGarbage => format!("{text} trailing").into_bytes(),
                Mutation::TrailingWhitespace => format!("{text}\r\n\t ").into_bytes(),
                Mutation::Truncated(at) => {
                    let b = text.into_bytes();
                    b[..at % b.len().max(1)].to_vec()
                }
                Mutation::InArray => format!("[{text},{text}]").into_bytes(),
                Mutation::NotAnObject => junk.first().map_or(b"42".to_vec(), |b| match b % 4 {
                    0 => b"null".to_vec(),
                    1 => b"\"a string\"".to_vec(),
                    2 => b"-0".to_vec(),
                    _ => b"[]".to_vec(),
                }),
                Mutation::Empty => Vec::new(),
                Mutation::Whitespace => b" \n\t\r ".to_vec(),
                Mutation::Bytes => junk,
            };
            Payload(bytes)
        })
}

/// Where a message is published: a device's own topic (the device id is the topic's segment,
/// maybe empty, maybe long) or a gateway's topic (the id is in the payload), maybe with a
/// long segment. The case's unique suffix is added when the case runs.
#[derive(Debug, Clone)]
enum Place {
    Device(String),
    Gateway { long: usize },
}

fn place() -> impl Strategy<Value = Place> {
    prop_oneof![
        3 => device_id().prop_map(Place::Device),
        1 => Just(Place::Device(String::new())),
        2 => prop_oneof![4 => Just(0usize), 1 => 1usize..4000].prop_map(|long| Place::Gateway { long }),
    ]
}

#[derive(Debug, Clone)]
enum Item {
    /// A numbered good reading of device `good-N`.
    Good(u8),
    Bad(Place, Payload),
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        2 => (0u8..4).prop_map(Item::Good),
        3 => (place(), payload()).prop_map(|(p, b)| Item::Bad(p, b)),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    items: Vec<Item>,
    /// BATCH_MAX_ROWS for the in-process writer: one batch, or several.
    batch_rows: usize,
}

fn case(max_items: usize) -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(item(), 1..max_items),
        prop_oneof![1 => 1usize..4, 3 => 4usize..1000],
    )
        .prop_map(|(items, batch_rows)| Case { items, batch_rows })
}

// ---------------------------------------------------------------------------------------------
// The oracle.
// ---------------------------------------------------------------------------------------------

/// A message as published, and what may become of it.
struct Sent {
    topic: String,
    payload: Vec<u8>,
    /// The decoder's verdict on each of its readings, with the settings the node uses.
    expect: Vec<Expect>,
    good: bool,
}

/// What one reading of a message (one element of an array, one bare value, one instant of a
/// SenML pack) must become.
#[derive(Debug)]
enum Expect {
    /// Refused by the decoder: one dead letter with this reason, these bytes and size.
    Dead {
        reason: &'static str,
        error: String,
        raw: Vec<u8>,
        size: usize,
    },
    /// Accepted: a `telemetry` row of this device (at `ts` when the reading has its own time) and
    /// payload, or a dead letter of PostgreSQL's (refused, or a conflict with another reading).
    Reading {
        device: String,
        ts: Option<chrono::DateTime<chrono::Utc>>,
        text: Vec<u8>,
        raw: Vec<u8>,
    },
}

/// The decoder's verdict on every reading of a message, as the writer reaches it.
fn expect(decoder: &Decoder, topic: &str, payload: &[u8]) -> Vec<Expect> {
    let now = chrono::Utc::now();
    if payload.len() > MAX_PAYLOAD {
        let e = leasehold_decode::DecodeError::TooLarge {
            size: payload.len(),
            max: MAX_PAYLOAD,
        };
        return vec![Expect::Dead {
            reason: reason_label(&e),
            error: e.to_string(),
            raw: payload[..MAX_PAYLOAD].to_vec(),
            size: payload.len(),
        }];
    }
    let bytes = bytes::Bytes::copy_from_slice(payload);
    decoder
        .units(topic, &bytes, now)
        .into_iter()
        .map(|u| {
            let whole = u.label.is_none() && u.raw == bytes;
            let decoded = match u.decoded {
                Some(d) => d,
                None => decoder.parse(topic, &u.payload),
            };
            let read = decoded.and_then(|p| match p.reading_error(topic) {
                Some(e) => Err(e),
                None => Ok(p),
            });
            match read {
                Ok(p) => Expect::Reading {
                    device: p.device_id.unwrap_or_default(),
                    ts: p.timestamp.ok().flatten(),
                    text: u.payload.to_vec(),
                    raw: u.raw.to_vec(),
                },
                Err(e) => Expect::Dead {
                    reason: reason_label(&e),
                    error: e.to_string(),
                    size: if whole { payload.len() } else { u.raw.len() },
                    raw: u.raw.to_vec(),
                },
            }
        })
        .collect()
}

static CASE_NO: AtomicU64 = AtomicU64::new(0);

/// Turns a case into messages with unique topics (so each can be found again), numbering the
/// good readings of run `run`.
fn messages(case: &Case, run: &str) -> Vec<Sent> {
    let decoder = Decoder::new(PATTERN, MAX_PAYLOAD);
    let mut out = Vec::new();
    for (i, item) in case.items.iter().enumerate() {
        let (topic, payload, good) = match item {
            Item::Good(d) => {
                let device = format!("good-{d}");
                (
                    format!("devices/{device}/{run}/m{i}"),
                    numbered_from(1_800_000_000_000_000, run, &device, i as u64).into_bytes(),
                    true,
                )
            }
            Item::Bad(Place::Device(d), p) => {
                (format!("devices/{d}/{run}/m{i}"), p.0.clone(), false)
            }
            Item::Bad(Place::Gateway { long }, p) => {
                // Pseudo-random letters, so the index entry does not compress below its limit.
                let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let seg: String = (0..*long)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        char::from(b'a' + ((x >> 33) % 26) as u8)
                    })
                    .collect();
                (format!("gw/{run}/m{i}/{seg}"), p.0.clone(), false)
            }
        };
        out.push(Sent {
            expect: expect(&decoder, &topic, &payload),
            topic,
            payload,
            good,
        });
    }
    out
}

/// Outcome classes seen over a property's run, printed at its end (`--nocapture`).
type Seen = Mutex<BTreeMap<String, u64>>;

fn report(seen: &Seen, title: &str) {
    if let Ok(s) = seen.lock() {
        println!("{title}: outcomes of the generated messages");
        for (class, n) in s.iter() {
            println!("  {n:>6}  {class}");
        }
    }
}

/// An error's words without its values (quoted text, numbers, positions), for the report.
fn class_of(error: &str) -> String {
    let e = error.trim_start_matches("PostgreSQL rejected the reading: ");
    let e = e.split(" at line ").next().unwrap_or(e);
    let e = e.split("; ").next().unwrap_or(e);
    let mut out = String::new();
    let mut quoted = false;
    for c in e.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                if quoted {
                    out.push_str("\"…\"");
                }
            }
            _ if quoted => {}
            '0'..='9' if out.ends_with('N') => {}
            '0'..='9' => out.push('N'),
            c => out.push(c),
        }
    }
    out.chars().take(110).collect()
}

/// How many of `sent` are in `telemetry` or `dead_letters` (end to end, to wait for them).
async fn landed(db: &tokio_postgres::Client, sent: &[Sent]) -> Result<usize> {
    let topics: Vec<&str> = sent.iter().map(|s| s.topic.as_str()).collect();
    crate::helpers::topics_landed(db, &topics).await
}

/// A dead letter: reason, bytes kept, size, error text.
type Dead = (String, Vec<u8>, i32, String);

/// Checks where every message of `sent` landed: each of its readings in exactly one place, as
/// the decoder and PostgreSQL decide.
async fn check_landed(db: &tokio_postgres::Client, sent: &[Sent], outcomes: &Seen) -> Result<()> {
    let seen = |class: String| {
        if let Ok(mut s) = outcomes.lock() {
            *s.entry(class).or_default() += 1;
        }
    };
    let topics: Vec<&str> = sent.iter().map(|s| s.topic.as_str()).collect();
    type Row = (String, chrono::DateTime<chrono::Utc>, String);
    let mut rows: HashMap<String, Vec<Row>> = HashMap::new();
    for r in db
        .query(
            "SELECT topic, device_id, ts, payload::text FROM telemetry WHERE topic = ANY($1)",
            &[&topics],
        )
        .await?
    {
        rows.entry(r.get(0))
            .or_default()
            .push((r.get(1), r.get(2), r.get(3)));
    }
    let mut dead: HashMap<String, Vec<Dead>> = HashMap::new();
    for r in db
        .query(
            "SELECT topic, reason, payload, size, error FROM dead_letters WHERE topic = ANY($1)",
            &[&topics],
        )
        .await?
    {
        dead.entry(r.get(0))
            .or_default()
            .push((r.get(1), r.get(2), r.get(3), r.get(4)));
    }
    for s in sent {
        let r = rows.get(&s.topic).cloned().unwrap_or_default();
        let d = dead.get(&s.topic).cloned().unwrap_or_default();
        let what = || format!("message on {:?}: {:?}", s.topic, Payload(s.payload.clone()));
        ensure!(
            r.len() + d.len() == s.expect.len(),
            "{} telemetry rows and {} dead letters (want {} readings, each in exactly one place) for the {}: expected {:?}, dead letters {:?}",
            r.len(),
            d.len(),
            s.expect.len(),
            what(),
            s.expect,
            d.iter().map(|x| (&x.0, &x.3)).collect::<Vec<_>>()
        );
        if s.good {
            ensure!(
                r.len() == 1 && d.is_empty(),
                "a good reading was not stored once"
            );
            seen("good: stored".into());
        }
        let mut dead_left = d;
        let mut readings = Vec::new();
        for e in &s.expect {
            match e {
                Expect::Dead {
                    reason,
                    error,
                    raw,
                    size,
                } => {
                    // A SenML record's relative time is resolved against the receipt instant,
                    // which the oracle cannot know: its bytes are compared only elsewhere.
                    let timed_by_receipt =
                        s.topic.starts_with("senml/") || s.topic.starts_with("sml/");
                    let at = dead_left
                        .iter()
                        .position(|(r, p, z, _)| r == reason && p == raw && *z as usize == *size)
                        .or_else(|| {
                            dead_left
                                .iter()
                                .position(|(r, _, _, _)| timed_by_receipt && r == reason)
                        })
                        .with_context(|| {
                            format!(
                                "no dead letter {reason} ({error}) of {} bytes for the {}",
                                size,
                                what()
                            )
                        })?;
                    dead_left.remove(at);
                    seen(format!("dead letter {reason}: {}", class_of(error)));
                }
                Expect::Reading { .. } => readings.push(e),
            }
        }
        // PostgreSQL's own refusals, and conflicts between two readings of one key.
        for (reason, payload, _, error) in dead_left {
            ensure!(
                !s.good,
                "a good reading was dead-lettered ({reason}: {error})"
            );
            ensure!(
                reason == "rejected_by_database" || reason == "conflict",
                "decoded fine but dead-lettered as {reason:?} ({error}): the {}",
                what()
            );
            let at = readings
                .iter()
                .position(|e| matches!(e, Expect::Reading { text, raw, .. } if *raw == payload || *text == payload))
                .or_else(|| {
                    let timed_by_receipt = s.topic.starts_with("senml/") || s.topic.starts_with("sml/");
                    let untimed = |b: &[u8]| {
                        serde_json::from_slice::<serde_json::Value>(b).ok().map(|mut v| {
                            if let Some(o) = v.as_object_mut() {
                                o.remove("ts");
                            }
                            v
                        })
                    };
                    readings.iter().position(|e| {
                        timed_by_receipt
                            && matches!(e, Expect::Reading { text, .. } if untimed(text).is_some() && untimed(text) == untimed(&payload))
                    })
                })
                .with_context(|| format!("a {reason} dead letter with bytes of no reading of the {}", what()))?;
            readings.remove(at);
            seen(format!("accepted, then {reason}: {}", class_of(&error)));
        }
        let timed_by_receipt = s.topic.starts_with("senml/") || s.topic.starts_with("sml/");
        let same = match timed_by_receipt {
            // A relative SenML time is the receipt's, unknown to the oracle.
            true => "SELECT ($1::text::jsonb - 'ts') = ($2::text::jsonb - 'ts')",
            false => "SELECT $1::text::jsonb = $2::text::jsonb",
        };
        for (device, ts, stored) in r {
            let mut at = None;
            for (k, e) in readings.iter().enumerate() {
                if let Expect::Reading {
                    device: d,
                    ts: t,
                    text,
                    ..
                } = e
                {
                    // Equal as PostgreSQL's jsonb compares (1e11 is 100000000000, -0 is 0).
                    if *d == device
                        && (timed_by_receipt || t.is_none_or(|t| t == ts))
                        && db
                            .query_one(
                                same,
                                &[&String::from_utf8_lossy(text).into_owned(), &stored],
                            )
                            .await
                            .is_ok_and(|row| row.get::<_, bool>(0))
                    {
                        at = Some(k);
                        break;
                    }
                }
            }
            let at = at.with_context(|| {
                format!(
                    "a row of device {device:?} at {ts} with {stored} that no reading of the {} is",
                    what()
                )
            })?;
            readings.remove(at);
            if !s.good {
                seen("accepted: stored".into());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// In-process: a term's real Writer against a private PostgreSQL.
// ---------------------------------------------------------------------------------------------

const HOLDER: &str = "prop-holder";

pub(crate) async fn migrated() -> Result<Postgres> {
    let pg = Postgres::start().await?;
    let mut c = leasehold_store::connect(&pg.url(), "test").await?;
    leasehold_store::migrate(&mut c).await?;
    c.execute(
        "INSERT INTO instance_lock (service_name, holder_id, instance_id, epoch, expires_at)
         VALUES ('mqtt-ingest', $1, 'prop', 1, now() + interval '1 day')",
        &[&HOLDER],
    )
    .await?;
    Ok(pg)
}

fn writer_config(pg: &Postgres, batch_rows: usize) -> WriterConfig {
    writer_config_with(pg, batch_rows, Decoder::new(PATTERN, MAX_PAYLOAD))
}

pub(crate) fn writer_config_with(
    pg: &Postgres,
    batch_rows: usize,
    decoder: Decoder,
) -> WriterConfig {
    WriterConfig {
        database_url: pg.url(),
        instance_id: "prop".into(),
        batch_max_rows: batch_rows,
        batch_max_bytes: 4 * 1024 * 1024,
        batch_max_wait: Duration::from_millis(5),
        max_payload_bytes: MAX_PAYLOAD,
        decoder,
        redelivery_window: leasehold_store::DEFAULT_REDELIVERY_WINDOW,
        max_pending: 10_000,
        statement_timeout: Duration::from_secs(10),
        routes: Vec::new(),
        suspended: Vec::new(),
        require_sync_replication: false,
        sparkplug_host_id: None,
    }
}

/// Runs `sent` through a term's writer, as the ingest hands messages over, and waits for it to
/// drain (commit everything and return), at most [`DRAIN_BOUND`].
async fn write_through(
    pg: &Postgres,
    batch_rows: usize,
    sent: &[(String, Vec<u8>)],
) -> Result<Duration> {
    write_with(writer_config(pg, batch_rows), sent).await
}

/// [`write_through`] with a writer configured as `cfg` says.
async fn write_with(cfg: WriterConfig, sent: &[(String, Vec<u8>)]) -> Result<Duration> {
    let sent = sent
        .iter()
        .map(|(topic, payload)| Inbound::detached(topic, payload))
        .collect();
    write_inbound(cfg, sent).await
}

/// [`write_with`] for messages as the ingest hands them over (packet id, DUP flag).
pub(crate) async fn write_inbound(cfg: WriterConfig, sent: Vec<Inbound>) -> Result<Duration> {
    let (tx, rx) = leasehold_ingest::Inbox::channel(sent.len().max(1));
    let n = sent.len();
    // In runs of seven, as the ingest hands over what it read together: a batch ends inside
    // a run as often as at its end.
    let mut sent = sent.into_iter().peekable();
    while sent.peek().is_some() {
        tx.try_send(sent.by_ref().take(7).collect())
            .map_err(|_| anyhow::anyhow!("channel full"))?;
    }
    drop(tx);
    let writer = Writer {
        cfg,
        fence: Fence {
            lease_name: "mqtt-ingest".into(),
            holder_id: HOLDER.into(),
            epoch: 1,
        },
        rx,
        acker: Acker::detached(),
        status: Default::default(),
        active: None,
        publisher: None,
    };
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let mut run = tokio::spawn(writer.run(cancel.clone()));
    match tokio::time::timeout(DRAIN_BOUND, &mut run).await {
        Ok(done) => {
            done.context("writer task")?.context("writer")?;
            Ok(started.elapsed())
        }
        Err(_) => {
            cancel.cancel();
            let _ = run.await;
            bail!("the writer did not drain {n} messages within {DRAIN_BOUND:?} (a stall)")
        }
    }
}

#[test]
fn the_write_path_puts_every_generated_message_in_exactly_one_place() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pg = rt.block_on(migrated()).expect("postgres");
    let db = rt.block_on(pg.client()).expect("client");
    let n = cases(64);
    let mut runner = TestRunner::new(config(n));
    let outcomes = Seen::default();
    let slowest = Mutex::new(Duration::ZERO);
    let started = Instant::now();
    let result = runner.run(&case(48), |case| {
        let run = format!("c{}", CASE_NO.fetch_add(1, Ordering::SeqCst));
        let sent = messages(&case, &run);
        let wire: Vec<(String, Vec<u8>)> = sent
            .iter()
            .map(|s| (s.topic.clone(), s.payload.clone()))
            .collect();
        rt.block_on(async {
            let took = write_through(&pg, case.batch_rows, &wire).await?;
            if let Ok(mut s) = slowest.lock() {
                *s = (*s).max(took);
            }
            check_landed(&db, &sent, &outcomes).await?;
            anyhow::Ok(())
        })
        .map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    report(
        &outcomes,
        &format!(
            "in-process writer, {n} cases in {:?}, slowest drain {:?}",
            started.elapsed(),
            slowest.lock().map(|s| *s).unwrap_or_default()
        ),
    );
    if let Err(e) = result {
        panic!("{e}\n--- postgres log (tail) ---\n{}", tail(&pg.log(), 40));
    }
}

// ---------------------------------------------------------------------------------------------
// End to end: Mosquitto and the `leasehold` binary.
// ---------------------------------------------------------------------------------------------

#[test]
fn the_binary_puts_every_generated_message_in_exactly_one_place() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut c = rt.block_on(Cluster::start()).expect("servers");
    c.extra_env
        .push(("MQTT_TOPICS", "devices/#,gw/#".to_string()));
    let started = rt.block_on(async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        c.pg.client().await
    });
    let db = match started {
        Ok(db) => db,
        Err(e) => panic!("{e:#}\n--- logs ---{}", c.dump()),
    };
    let n = (cases(64) / 8).max(1);
    let mut runner = TestRunner::new(config(n));
    let outcomes = Seen::default();
    let began = Instant::now();
    let port = c.mq.port;
    let http_port = c.node("node-a").http_port();
    let result = runner.run(&case(24), |case| {
        let run = format!("e{}", CASE_NO.fetch_add(1, Ordering::SeqCst));
        let sent = messages(&case, &run);
        let wire: Vec<(String, Vec<u8>)> = sent
            .iter()
            .map(|s| (s.topic.clone(), s.payload.clone()))
            .collect();
        rt.block_on(async {
            publish_all(port, wire).await?;
            // Bounded: a stall (or a lost message) fails here.
            eventually(DRAIN_BOUND, "every message of the case landed", || async {
                Ok(landed(&db, &sent).await? >= sent.len())
            })
            .await?;
            check_landed(&db, &sent, &outcomes).await?;
            let (code, body) = http(http_port, "GET", "/health/live").await?;
            ensure!(code == 200, "/health/live {code}: {body}");
            anyhow::Ok(())
        })
        .map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    report(
        &outcomes,
        &format!(
            "end to end through the binary, {n} cases in {:?}",
            began.elapsed()
        ),
    );
    let exited = c.node_mut("node-a").try_status();
    if let Err(e) = result {
        panic!("{e}\n--- logs ---{}", c.dump());
    }
    assert!(exited.is_none(), "node-a exited: {exited:?}{}", c.dump());
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Found by the property above: the decoder kept nanoseconds, `telemetry.ts` keeps microseconds.
/// Two readings nanoseconds apart were two keys in their batch but one in the table, so the
/// second was neither inserted nor a duplicate nor a conflict: acknowledged and gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_nanoseconds_apart_are_one_key_in_a_batch_as_in_the_table() -> Result<()> {
    let pg = migrated().await?;
    let t = "devices/ns/telemetry";
    let first = r#"{"ts":"2023-11-14T22:13:20.0000001Z","v":1}"#;
    let second = r#"{"ts":"2023-11-14T22:13:20.0000002Z","v":2}"#;
    write_through(
        &pg,
        1000,
        &[(t.into(), first.into()), (t.into(), second.into())],
    )
    .await?;
    let db = pg.client().await?;
    let stored: Vec<String> = db
        .query(
            "SELECT payload->>'v' FROM telemetry WHERE topic = $1",
            &[&t],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let dead: Vec<(String, Vec<u8>)> = db
        .query(
            "SELECT reason, payload FROM dead_letters WHERE topic = $1",
            &[&t],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    ensure!(
        stored == ["1"] && dead == [("conflict".to_string(), second.as_bytes().to_vec())],
        "stored {stored:?}, dead letters {dead:?}: the second reading must be a conflict"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Duplicate or conflict: the same in one batch as in two.
// ---------------------------------------------------------------------------------------------

/// Two spellings of a member's value. Whether they are one value is PostgreSQL's to say (`jsonb =`
/// decides against a stored row); the batch must say the same.
const SPELLINGS: &[(&str, &str)] = &[
    ("1", "1.0"),
    ("1", "1e0"),
    ("100", "1E2"),
    ("1.5", "1.50"),
    ("0", "-0"),
    ("0.0", "-0.0"),
    ("1", "2"),
    ("0.3", "0.30000000000000001"),
    ("12345678901234567890123", "12345678901234567890124"),
    ("1.0", "1.00000000000000000001"),
    ("9007199254740992", "9007199254740993"),
    ("18446744073709551615", "18446744073709551616"),
    ("1e-400", "0"),
    ("1e-400", "2e-400"),
    ("\"\u{e9}\"", "\"\\u00e9\""),
    ("\"a/b\"", "\"a\\/b\""),
    ("\"\\ud83d\\ude00\"", "\"\u{1F600}\""),
    ("\"a\"", "\"b\""),
    ("[1,2]", "[1, 2]"),
    ("[1,2]", "[2,1]"),
    ("{\"a\":1,\"b\":2}", "{\"b\":2, \"a\":1.0}"),
    ("{\"a\":0,\"a\":1}", "{\"a\":1}"),
    ("{\"a\":1,\"a\":0}", "{\"a\":1}"),
    ("null", "false"),
    ("1", "\"1\""),
];

#[derive(Debug, Clone)]
struct Pair {
    /// (spelling, which side goes to the first payload, which to the second).
    members: Vec<(usize, bool, bool)>,
    reorder: bool,
}

fn pair() -> impl Strategy<Value = Pair> {
    (
        prop::collection::vec((0..SPELLINGS.len(), any::<bool>(), any::<bool>()), 1..4),
        any::<bool>(),
    )
        .prop_map(|(members, reorder)| Pair { members, reorder })
}

fn pair_payloads(p: &Pair) -> (String, String) {
    let side = |i: usize, b: bool| if b { SPELLINGS[i].1 } else { SPELLINGS[i].0 };
    let mut first: Vec<String> = vec!["\"ts\":1800000000".into()];
    let mut second = first.clone();
    for (k, (i, a, b)) in p.members.iter().enumerate() {
        first.push(format!("\"m{k}\":{}", side(*i, *a)));
        second.push(format!("\"m{k}\":{}", side(*i, *b)));
    }
    if p.reorder {
        second.reverse();
    }
    (
        format!("{{{}}}", first.join(",")),
        format!("{{{}}}", second.join(",")),
    )
}

/// The second message of a pair with one key: `true` a conflict (a dead letter), `false` a
/// duplicate (neither stored nor dead-lettered). The first is stored.
async fn second_is_conflict(db: &tokio_postgres::Client, topic: &str) -> Result<bool> {
    let stored: i64 = db
        .query_one("SELECT count(*) FROM telemetry WHERE topic = $1", &[&topic])
        .await?
        .get(0);
    let reasons: Vec<String> = db
        .query(
            "SELECT reason FROM dead_letters WHERE topic = $1",
            &[&topic],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(stored == 1, "{stored} rows stored for {topic}");
    ensure!(
        reasons.is_empty() || reasons == ["conflict"],
        "dead letters {reasons:?} for {topic}"
    );
    Ok(!reasons.is_empty())
}

#[test]
fn a_pair_with_one_key_is_settled_alike_in_one_batch_or_two() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pg = rt.block_on(migrated()).expect("postgres");
    let db = rt.block_on(pg.client()).expect("client");
    let mut runner = TestRunner::new(config(cases(64)));
    let result = runner.run(&pair(), |p| {
        let (first, second) = pair_payloads(&p);
        let n = CASE_NO.fetch_add(1, Ordering::SeqCst);
        let (one, two) = (
            format!("devices/pair/one-{n}"),
            format!("devices/pair/two-{n}"),
        );
        rt.block_on(async {
            write_through(
                &pg,
                1000,
                &[
                    (one.clone(), first.clone().into_bytes()),
                    (one.clone(), second.clone().into_bytes()),
                ],
            )
            .await?;
            write_through(&pg, 1000, &[(two.clone(), first.clone().into_bytes())]).await?;
            write_through(&pg, 1000, &[(two.clone(), second.clone().into_bytes())]).await?;
            let in_batch = second_is_conflict(&db, &one).await?;
            let in_table = second_is_conflict(&db, &two).await?;
            ensure!(
                in_batch == in_table,
                "{second} after {first}: in one batch a {}, against the stored row a {}",
                if in_batch { "conflict" } else { "duplicate" },
                if in_table { "conflict" } else { "duplicate" },
            );
            anyhow::Ok(())
        })
        .map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Found by the property above: in a batch, payloads were compared as serde_json values, whose
/// numbers past u64 are f64. A reading whose 23-digit counter differs from the first's in the
/// last digit was dropped as a duplicate - silently - where the table (jsonb) sees a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_differing_past_f64_precision_is_a_conflict_not_a_duplicate() -> Result<()> {
    let pg = migrated().await?;
    let t = "devices/counter/telemetry";
    let first = r#"{"ts":1800000000,"count":12345678901234567890123}"#;
    let second = r#"{"ts":1800000000,"count":12345678901234567890124}"#;
    write_through(
        &pg,
        1000,
        &[(t.into(), first.into()), (t.into(), second.into())],
    )
    .await?;
    let db = pg.client().await?;
    let dead: Vec<(String, Vec<u8>)> = db
        .query(
            "SELECT reason, payload FROM dead_letters WHERE topic = $1",
            &[&t],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    ensure!(
        dead == [("conflict".to_string(), second.as_bytes().to_vec())],
        "dead letters {dead:?}: the second reading must be a conflict"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Routes: any payload through any mapping lands in its route's table or in dead_letters.
// ---------------------------------------------------------------------------------------------

/// Columns of every kind a route converts for, with typmods the database enforces itself.
const ROUTE_TABLES: &str = "
    CREATE TABLE prop_typed (k bigint PRIMARY KEY, txt varchar(8), n numeric(8,2), i integer,
        s smallint, b boolean, t timestamptz, j jsonb, u uuid, f real, d date, nn text NOT NULL);
    CREATE TABLE prop_all (k bigint PRIMARY KEY, p jsonb NOT NULL, at timestamptz);";

/// Where a generated mapping may read a column from.
const ROUTE_SOURCES: &[&str] = &[
    "$.v",
    "$.v[0]",
    "$.v.a",
    "$.a",
    "$.ts",
    "$.device_id",
    "topic[1]",
    "topic",
    "timestamp",
    "device_id",
    "payload",
    "'lit'",
    "'12'",
    "received_at",
    "lease_epoch",
    "written_by",
];

/// A payload that is any generated device payload, or an object whose `v` is any JSON value.
fn route_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => payload().prop_map(|p| p.0),
        2 => (value(), prop::option::of(value()))
            .prop_map(|(v, a)| match a {
                Some(a) => format!(r#"{{"v":{v},"a":{a}}}"#).into_bytes(),
                None => format!(r#"{{"v":{v}}}"#).into_bytes(),
            }),
    ]
}

#[derive(Debug, Clone)]
struct RouteCase {
    /// A source (index into [`ROUTE_SOURCES`]) per mapped column of `prop_typed`.
    mapping: Vec<usize>,
    update: bool,
    payloads: Vec<Vec<u8>>,
    batch_rows: usize,
    /// Messages share this many keys (duplicates and conflicts, in a batch and across), or
    /// each has its own.
    shared_keys: Option<usize>,
}

fn route_case() -> impl Strategy<Value = RouteCase> {
    (
        prop::collection::vec(0..ROUTE_SOURCES.len(), 11),
        any::<bool>(),
        prop::collection::vec(route_payload(), 1..24),
        prop_oneof![1 => 1usize..4, 3 => 4usize..1000],
        prop::option::weighted(0.35, 1usize..4),
    )
        .prop_map(
            |(mapping, update, payloads, batch_rows, shared_keys)| RouteCase {
                mapping,
                update,
                payloads,
                batch_rows,
                shared_keys,
            },
        )
}

/// The two routes of a case, as the node resolves them; columns whose generated source cannot
/// go into their type at all (refused at start) are left out of the mapping.
async fn route_specs(
    db: &tokio_postgres::Client,
    case: &RouteCase,
) -> Result<Vec<leasehold_store::routes::ResolvedRoute>> {
    use leasehold_config::OnConflict;
    let cols = ["txt", "n", "i", "s", "b", "t", "j", "u", "f", "d", "nn"];
    let mut text = format!(
        "[[routes]]\nname = \"typed\"\ntopics = [\"rp/+\"]\ntable = \"prop_typed\"\nkey = [\"k\"]\non_conflict = \"{}\"\n[routes.columns]\nk = \"topic[1]\"\n",
        if case.update { "update" } else { "nothing" }
    );
    for (c, &s) in cols.iter().zip(&case.mapping) {
        text.push_str(&format!("{c} = {:?}\n", ROUTE_SOURCES[s]));
    }
    text.push_str("[[routes]]\nname = \"all\"\ntopics = [\"rp/#\"]\ntable = \"prop_all\"\nkey = [\"k\"]\n[routes.columns]\nk = \"topic[1]\"\np = \"payload\"\nat = \"timestamp\"\n");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("routes.toml");
    std::fs::write(&file, &text)?;
    let sources = leasehold_config::Sources::gather(
        Some(&file),
        [("DATABASE_URL".to_string(), "postgres://u@h/d".to_string())],
        Vec::new(),
    )
    .context("sources")?;
    let cfg = leasehold_config::Config::load(&sources).context("config")?;
    let mut specs = cfg.routes;
    loop {
        let (resolved, problems) = leasehold_store::routes::resolve(db, &specs).await?;
        if problems.is_empty() {
            ensure!(
                resolved.iter().all(|r| r.spec.on_conflict
                    == if r.spec.name == "typed" && case.update {
                        OnConflict::Update
                    } else {
                        OnConflict::Nothing
                    }),
                "on_conflict"
            );
            return Ok(resolved);
        }
        let before: usize = specs.iter().map(|s| s.columns.len()).sum();
        for p in &problems {
            let column = p.column.clone().context(format!("a route problem: {p}"))?;
            ensure!(column != "k" && column != "p", "the fixed columns fit: {p}");
            for s in specs.iter_mut().filter(|s| s.name == p.route) {
                s.columns.retain(|(c, _)| *c != column);
            }
        }
        let after: usize = specs.iter().map(|s| s.columns.len()).sum();
        ensure!(
            after < before,
            "problems without a column to drop: {problems:?}"
        );
    }
}

static ROUTE_KEY: AtomicU64 = AtomicU64::new(1);

#[test]
fn any_payload_through_any_mapping_lands_in_its_route_or_in_dead_letters() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pg = rt.block_on(migrated()).expect("postgres");
    let db = rt.block_on(pg.client()).expect("client");
    rt.block_on(db.batch_execute(ROUTE_TABLES)).expect("tables");
    let n = cases(24);
    let mut runner = TestRunner::new(config(n));
    let result = runner.run(&route_case(), |case| {
        rt.block_on(async {
            let routes = route_specs(&db, &case).await?;
            let first = ROUTE_KEY.fetch_add(case.payloads.len() as u64, Ordering::SeqCst);
            let wire: Vec<(String, Vec<u8>)> = case
                .payloads
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let i = case.shared_keys.map_or(i, |n| i % n);
                    (format!("rp/{}", first + i as u64), p.clone())
                })
                .collect();
            let mut cfg = writer_config(&pg, case.batch_rows);
            cfg.routes = routes;
            write_routes_through(cfg, &wire).await?;
            // Per key and route: the messages of a key without a row were all dead-lettered
            // (nothing lost), and a key's row and dead letters never outnumber its messages (no
            // message in two places). With one message per key: exactly one of the two.
            // A message counts once per reading it holds (an array: one per element).
            let decoder = Decoder::new(PATTERN, MAX_PAYLOAD);
            let mut per_key: BTreeMap<&str, (i64, &[u8])> = BTreeMap::new();
            for (topic, payload) in &wire {
                // Over MAX_PAYLOAD_BYTES a message is one `too_large` dead letter, unread.
                let readings = match payload.len() > MAX_PAYLOAD {
                    true => 1,
                    false => decoder
                        .units(topic, &bytes::Bytes::copy_from_slice(payload), chrono::Utc::now())
                        .len() as i64,
                };
                per_key.entry(topic).or_insert((0, payload)).0 += readings;
            }
            for (topic, (sent, payload)) in per_key {
                let k: i64 = topic[3..].parse()?;
                for (route, table) in [("typed", "prop_typed"), ("all", "prop_all")] {
                    let rows: i64 = db
                        .query_one(&format!("SELECT count(*) FROM {table} WHERE k = $1"), &[&k])
                        .await?
                        .get(0);
                    let dead: i64 = db
                        .query_one(
                            "SELECT count(*) FROM dead_letters
                             WHERE topic = $1 AND $2 = ANY (string_to_array(route, ','))",
                            &[&topic, &route],
                        )
                        .await?
                        .get(0);
                    if !((rows == 1 || dead == sent) && rows + dead <= sent) {
                        let all: Vec<(String, Option<String>, String)> = db
                            .query(
                                "SELECT reason, route, left(error, 200) FROM dead_letters WHERE topic = $1",
                                &[&topic],
                            )
                            .await?
                            .iter()
                            .map(|r| (r.get(0), r.get(1), r.get(2)))
                            .collect();
                        eprintln!("dead letters of {topic}: {all:#?}");
                    }
                    ensure!(
                        (rows == 1 || dead == sent) && rows + dead <= sent,
                        "{topic} in route {route}: {sent} message(s), {rows} row(s), {dead} dead letter(s); a payload {:?}",
                        String::from_utf8_lossy(payload)
                    );
                }
            }
            anyhow::Ok(())
        })
        .map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    if let Err(e) = result {
        panic!("{e}\n--- postgres log (tail) ---\n{}", tail(&pg.log(), 40));
    }
    // Not vacuous: the cases stored rows and dead-lettered some, by mapping and by the database.
    let count = |sql: &'static str| {
        rt.block_on(db.query_one(sql, &[]))
            .map(|r| r.get::<_, i64>(0))
            .expect("count")
    };
    let typed = count("SELECT count(*) FROM prop_typed");
    let mapped = count(
        "SELECT count(*) FROM dead_letters WHERE route = 'typed' AND reason = 'mapping_failed'",
    );
    let all = count("SELECT count(*) FROM prop_all");
    let refused = count("SELECT count(*) FROM dead_letters WHERE route = 'typed' AND reason = 'rejected_by_database'");
    eprintln!(
        "routes: {typed} typed rows, {all} rows of all, {mapped} mapping failures, {refused} refused by the database"
    );
    assert!(typed > 0 && all > 0 && mapped > 0, "{typed} {all} {mapped}");
}

/// [`write_through`] with routes: every message committed (or the case fails as a stall).
async fn write_routes_through(cfg: WriterConfig, sent: &[(String, Vec<u8>)]) -> Result<()> {
    let (tx, rx) = leasehold_ingest::Inbox::channel(sent.len().max(1));
    for (topic, payload) in sent {
        tx.try_send(vec![Inbound::detached(topic, payload)])
            .map_err(|_| anyhow::anyhow!("channel full"))?;
    }
    drop(tx);
    let writer = Writer {
        cfg,
        fence: Fence {
            lease_name: "mqtt-ingest".into(),
            holder_id: HOLDER.into(),
            epoch: 1,
        },
        rx,
        acker: Acker::detached(),
        status: Default::default(),
        active: None,
        publisher: None,
    };
    let cancel = CancellationToken::new();
    let mut run = tokio::spawn(writer.run(cancel.clone()));
    match tokio::time::timeout(DRAIN_BOUND, &mut run).await {
        Ok(done) => done.context("writer task")?.context("writer"),
        Err(_) => {
            cancel.cancel();
            let _ = run.await;
            bail!(
                "the writer did not drain {} routed messages within {DRAIN_BOUND:?} (a stall)",
                sent.len()
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Formats: arrays, bare values and SenML packs, reading by reading.
// ---------------------------------------------------------------------------------------------

/// The `[[formats]]` of the formats property.
fn formats() -> Vec<leasehold_decode::FormatSpec> {
    use leasehold_decode::{Format, FormatSpec};
    vec![
        FormatSpec {
            topics: vec!["val/#".into()],
            format: Format::Value,
            device_topic_pattern: Some("val/{device_id}/#".into()),
        },
        FormatSpec {
            topics: vec!["senml/#".into()],
            format: Format::Senml,
            device_topic_pattern: None,
        },
        FormatSpec {
            topics: vec!["sml/#".into()],
            format: Format::Senml,
            device_topic_pattern: Some("sml/{device_id}/#".into()),
        },
    ]
}

/// A bare value as devices send them, and what they get wrong.
fn value_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => number().prop_map(String::into_bytes),
        2 => json_string().prop_map(String::into_bytes),
        2 => prop::sample::select(&["ON", "OFF", "true", "false", "null", " 23.5 \n", "", "  ", "{\"a\":1}", "[1,2]", "NaN", "-0", "a\u{0}b"][..])
            .prop_map(|s| s.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..32),
        1 => string_piece().prop_map(String::into_bytes),
    ]
}

/// A JSON array of generated payloads (objects mostly; any of `payload`'s spoilings inside).
fn array_payload() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(payload(), 0..6), ws()).prop_map(|(items, w)| {
        let parts: Vec<Vec<u8>> = items.into_iter().map(|p| p.0).collect();
        let mut out = format!("[{w}").into_bytes();
        out.extend(parts.join(&b","[..]));
        out.extend(format!("{w}]").into_bytes());
        out
    })
}

/// A SenML record: base and regular fields, each maybe present, maybe of the wrong type.
fn senml_record() -> impl Strategy<Value = String> {
    let name = || prop_oneof![3 => Just("\"temp\"".to_string()), 2 => Just("\"hum\"".to_string()), 1 => json_string(), 1 => number()];
    (
        prop::option::weighted(0.3, prop_oneof![3 => Just("\"urn:dev:ow:1:\"".to_string()), 2 => device_id().prop_map(|d| format!("\"{d}\"")), 1 => json_string(), 1 => number()]),
        prop::option::weighted(0.3, prop_oneof![3 => Just("1.7e9".to_string()), 1 => timestamp(), 1 => number()]),
        prop::option::weighted(0.6, name()),
        prop::option::weighted(0.7, prop_oneof![6 => valid_number(), 1 => json_string()]),
        prop::option::weighted(0.1, json_string()),
        prop::option::weighted(0.1, prop::sample::select(&["true", "false", "1"][..]).prop_map(str::to_string)),
        prop::option::weighted(0.1, valid_number()),
        prop::option::weighted(0.4, prop_oneof![Just("0".to_string()), Just("-5".to_string()), Just("10".to_string()), Just("1700000000".to_string()), valid_number()]),
        prop::option::weighted(0.2, json_string()),
    )
        .prop_map(|(bn, bt, n, v, vs, vb, sum, t, u)| {
            let fields: Vec<String> = [("bn", bn), ("bt", bt), ("n", n), ("v", v), ("vs", vs), ("vb", vb), ("s", sum), ("t", t), ("u", u)]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| format!("\"{k}\":{v}")))
                .collect();
            format!("{{{}}}", fields.join(","))
        })
}

fn senml_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::collection::vec(senml_record(), 0..6).prop_map(|r| format!("[{}]", r.join(",")).into_bytes()),
        1 => payload().prop_map(|p| p.0),
    ]
}

#[derive(Debug, Clone)]
enum FormatItem {
    Good(u8),
    Array { gateway: bool, body: Vec<u8> },
    Value(Vec<u8>),
    Senml { own_device: bool, body: Vec<u8> },
}

fn format_item() -> impl Strategy<Value = FormatItem> {
    prop_oneof![
        1 => (0u8..4).prop_map(FormatItem::Good),
        2 => (any::<bool>(), array_payload()).prop_map(|(gateway, body)| FormatItem::Array { gateway, body }),
        2 => value_payload().prop_map(FormatItem::Value),
        2 => (any::<bool>(), senml_payload()).prop_map(|(own_device, body)| FormatItem::Senml { own_device, body }),
    ]
}

fn format_messages(items: &[FormatItem], run: &str, decoder: &Decoder) -> Vec<Sent> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let (topic, payload, good) = match item {
                FormatItem::Good(d) => {
                    let device = format!("good-{d}");
                    let body = numbered_from(1_800_000_000_000_000, run, &device, i as u64);
                    (
                        format!("devices/{device}/{run}/m{i}"),
                        body.into_bytes(),
                        true,
                    )
                }
                FormatItem::Array {
                    gateway: true,
                    body,
                } => (format!("gw/{run}/m{i}"), body.clone(), false),
                FormatItem::Array {
                    gateway: false,
                    body,
                } => (
                    format!("devices/arr-{}/{run}/m{i}", i % 3),
                    body.clone(),
                    false,
                ),
                FormatItem::Value(body) => {
                    (format!("val/v-{}/{run}/m{i}", i % 3), body.clone(), false)
                }
                FormatItem::Senml {
                    own_device: true,
                    body,
                } => (format!("sml/s-{}/{run}/m{i}", i % 3), body.clone(), false),
                FormatItem::Senml {
                    own_device: false,
                    body,
                } => (format!("senml/{run}/m{i}"), body.clone(), false),
            };
            Sent {
                expect: expect(decoder, &topic, &payload),
                topic,
                payload,
                good,
            }
        })
        .collect()
}

/// Arrays, bare values and SenML packs through a term's real `Writer`: each reading of each
/// message in exactly one place (a row, or a dead letter with the decoder's reason and the
/// bytes its format reads back, or PostgreSQL's refusal), every good reading stored once, no
/// stall.
#[test]
fn every_reading_of_an_array_a_value_or_a_pack_lands_in_exactly_one_place() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pg = rt.block_on(migrated()).expect("postgres");
    let db = rt.block_on(pg.client()).expect("client");
    let decoder = Decoder::new(PATTERN, MAX_PAYLOAD).with_formats(&formats());
    let n = cases(48);
    let mut runner = TestRunner::new(config(n));
    let outcomes = Seen::default();
    let started = Instant::now();
    let strategy = (
        prop::collection::vec(format_item(), 1..24),
        prop_oneof![1 => 1usize..4, 3 => 4usize..1000],
    );
    let result = runner.run(&strategy, |(items, batch_rows)| {
        let run = format!("f{}", CASE_NO.fetch_add(1, Ordering::SeqCst));
        let sent = format_messages(&items, &run, &decoder);
        let wire: Vec<(String, Vec<u8>)> = sent
            .iter()
            .map(|s| (s.topic.clone(), s.payload.clone()))
            .collect();
        rt.block_on(async {
            let cfg = writer_config_with(&pg, batch_rows, decoder.clone());
            write_with(cfg, &wire).await?;
            check_landed(&db, &sent, &outcomes).await?;
            anyhow::Ok(())
        })
        .map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    report(
        &outcomes,
        &format!(
            "formats through the writer, {n} cases in {:?}",
            started.elapsed()
        ),
    );
    if let Err(e) = result {
        panic!("{e}\n--- postgres log (tail) ---\n{}", tail(&pg.log(), 40));
    }
}
