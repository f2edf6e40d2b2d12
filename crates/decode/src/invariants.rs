//! The decoder's invariants, checked on any input: by the fuzz target (`fuzz/`, `make fuzz`) and by
//! the replay of the committed corpora in `make test` (`tests/corpus.rs` of this crate), so the
//! two can never disagree on what is checked.
//!
//! For every input the decoder returns without panicking, the same result twice, and:
//! - over `MAX_PAYLOAD_BYTES`: [`DecodeError::TooLarge`] with the sizes;
//! - a reading: its payload is the input as text, byte for byte, a JSON object without `\u0000`
//!   (jsonb can store it); its device id is non-empty and at most [`MAX_DEVICE_ID_LEN`]
//!   characters, taken from the topic when the topic names one, else from the payload; its
//!   content hash is set if, and only if, the payload has no timestamp (then its time is the
//!   receipt time and the hash is [`content_hash`] of topic and bytes); a timestamp has
//!   microsecond resolution, like `timestamptz`;
//! - the payload read as JSON is what `serde_json` reads from the bytes, value or error
//!   ([`crate::json`] checks the UTF-8 once, then reads text).

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde_json::Value;

use bytes::Bytes;

use crate::{content_hash, DecodeError, Decoder, Format, FormatSpec, MAX_DEVICE_ID_LEN};

/// Topics an input can be published on: the device in the topic, an empty or long device segment,
/// a gateway topic (the device id is in the payload).
const TOPICS: &[&str] = &[
    "devices/meter-1/telemetry",
    "gw/site-1/up",
    "devices//telemetry",
    "devices/x/a/b/c",
];

/// Runs one fuzz input: its first byte picks the topic and the size limit (`MAX_PAYLOAD_BYTES`'s
/// default, or 1 KiB so that the limit itself is reached), the rest is the payload. Panics if an
/// invariant does not hold.
pub fn fuzz_one(data: &[u8]) {
    let Some((&sel, payload)) = data.split_first() else {
        return;
    };
    if sel & 0x20 != 0 {
        // Bit 5: Sparkplug B, read alone (replay) and in order by a host.
        return check_sparkplug(payload, sel);
    }
    let topic = TOPICS[usize::from(sel & 0x03)];
    let max = if sel & 0x04 == 0 { 256 * 1024 } else { 1024 };
    let decoder = Decoder::new("devices/{device_id}/#", max);
    check(&decoder, topic, payload, max);
    // Bits 3-4: the format every topic is read with (json, value, senml, senml with the
    // device id from the topic's own pattern).
    let format = match (sel >> 3) & 0x03 {
        0 => None,
        1 => Some((Format::Value, None)),
        2 => Some((Format::Senml, None)),
        _ => Some((Format::Senml, Some("gw/{device_id}/#".to_string()))),
    };
    let decoder = match format {
        None => decoder,
        Some((format, device_topic_pattern)) => decoder.with_formats(&[FormatSpec {
            topics: vec!["#".into()],
            format,
            device_topic_pattern,
        }]),
    };
    check_units(&decoder, topic, payload, max);
}

/// Sparkplug topics of every data kind, a death and a command.
const SPARKPLUG_TOPICS: &[&str] = &[
    "spBv1.0/plant/NBIRTH/edge1",
    "spBv1.0/plant/DBIRTH/edge1/pump1",
    "spBv1.0/plant/NDATA/edge1",
    "spBv1.0/plant/DDATA/edge1/pump1",
    "spBv1.0/plant/NDEATH/edge1",
    "spBv1.0/plant/NCMD/edge1",
];

/// A Sparkplug B payload read alone on each topic (the [`check_units`] invariants), and in order
/// by one [`crate::sparkplug::Host`] as a birth, data and a death: never a panic, each reading a
/// JSON object without `\u0000` of the topic's device, the same for the same history.
fn check_sparkplug(payload: &[u8], sel: u8) {
    let decoder = Decoder::new("devices/{device_id}/#", 256 * 1024).with_formats(&[FormatSpec {
        topics: vec!["spBv1.0/#".into()],
        format: Format::SparkplugB,
        device_topic_pattern: None,
    }]);
    let bytes = Bytes::copy_from_slice(payload);
    for topic in &SPARKPLUG_TOPICS[..4] {
        check_units(&decoder, topic, payload, 256 * 1024);
    }
    let run = || {
        let mut host = crate::sparkplug::Host::default();
        let mut out = Vec::new();
        // The order of the topics is the selector's: births first or data first.
        let mut order: Vec<&str> = SPARKPLUG_TOPICS.to_vec();
        let n = order.len();
        order.rotate_left(usize::from(sel & 0x07) % n);
        for topic in order {
            for u in host.read(topic, &bytes, false) {
                if let Some(Ok(p)) = &u.decoded {
                    let value: Value = serde_json::from_slice(&u.payload).expect("JSON");
                    assert!(value.is_object() && !has_nul(&value), "{value}");
                    let device = p.device_id.clone().unwrap_or_default();
                    assert!(device.starts_with("plant/edge1"), "device {device:?}");
                }
                out.push(u.payload);
            }
            let _ = host.take_changes();
        }
        out
    };
    assert_eq!(run(), run(), "not deterministic");
}

/// The invariants of a message's readings ([`Decoder::units`]), whatever its format: at least
/// one unit, the same twice; a reading is a JSON object without `\u0000`, its device id
/// non-empty and bounded; and its dead letter's bytes read back into the very same reading (what
/// `leasehold replay` relies on).
pub fn check_units(decoder: &Decoder, topic: &str, payload: &[u8], max: usize) {
    if payload.len() > max {
        return; // refused whole before any format reads it
    }
    let at = received_at();
    let bytes = Bytes::copy_from_slice(payload);
    let units = decoder.units(topic, &bytes, at);
    assert!(!units.is_empty(), "a message with no unit at all");
    let texts = |u: &[crate::Unit]| -> Vec<(Bytes, Bytes)> {
        u.iter()
            .map(|u| (u.payload.clone(), u.raw.clone()))
            .collect()
    };
    assert_eq!(
        texts(&units),
        texts(&decoder.units(topic, &bytes, at)),
        "not deterministic"
    );
    for u in &units {
        let decoded = match &u.decoded {
            Some(d) => d.clone(),
            None => decoder.parse(topic, &u.payload),
        };
        let Ok(p) = decoded else { continue };
        let value: Value = serde_json::from_slice(&u.payload).expect("a reading is JSON");
        assert!(value.is_object(), "a reading that is not an object");
        assert!(!has_nul(&value), "a reading carries U+0000");
        if p.reading_error(topic).is_some() {
            continue;
        }
        let device = p.device_id.clone().unwrap_or_default();
        assert!(!device.is_empty(), "empty device id");
        assert!(
            device.chars().count() <= MAX_DEVICE_ID_LEN,
            "device id too long"
        );
        let back = decoder.units(topic, &u.raw, at);
        assert!(
            back.iter().any(|b| b.payload == u.payload),
            "the dead letter's bytes {:?} do not read back into the reading {:?}",
            String::from_utf8_lossy(&u.raw),
            String::from_utf8_lossy(&u.payload)
        );
    }
}

/// The writer reads a payload with [`Decoder::parse_light`] (or [`Decoder::parse`] for a route
/// that reads JSON paths) and [`crate::Parsed::reading_error`]: both must accept exactly what
/// [`Decoder::decode`] accepts, refuse the rest with the same error, and read the same device id
/// and timestamp.
fn same_as_the_writers_parse(
    decoder: &Decoder,
    topic: &str,
    payload: &[u8],
    decoded: &Result<crate::Reading, DecodeError>,
) {
    for (how, parsed) in [
        ("parse", decoder.parse(topic, payload)),
        ("parse_light", decoder.parse_light(topic, payload)),
    ] {
        let read = parsed.and_then(|p| match p.reading_error(topic) {
            Some(e) => Err(e),
            None => Ok((p.device_id, p.timestamp)),
        });
        match (decoded, read) {
            (Ok(r), Ok((device_id, ts))) => {
                assert_eq!(device_id.as_deref(), Some(r.device_id.as_str()), "{how}");
                let ts = ts.expect("checked by reading_error");
                assert_eq!(ts.is_none(), r.content_hash.is_some(), "{how}");
                if let Some(ts) = ts {
                    assert_eq!(ts, r.ts, "{how}");
                }
            }
            (Err(a), Err(b)) => assert_eq!(a, &b, "{how}"),
            (a, b) => panic!("{how} disagrees with decode: {a:?} / {b:?}"),
        }
    }
}

/// The decoder's invariants for one message (see the module's documentation).
pub fn check(decoder: &Decoder, topic: &str, payload: &[u8], max: usize) {
    let received_at = received_at();
    let result = decoder.decode(topic, payload, received_at);
    assert_eq!(
        result,
        decoder.decode(topic, payload, received_at),
        "not deterministic"
    );
    same_as_the_writers_parse(decoder, topic, payload, &result);
    let text = |e: serde_json::Error| e.to_string();
    assert_eq!(
        crate::json::<Value>(payload).map_err(text),
        serde_json::from_slice::<Value>(payload).map_err(text),
        "read as JSON otherwise than serde_json reads the bytes"
    );
    if payload.len() > max {
        assert_eq!(
            result,
            Err(DecodeError::TooLarge {
                size: payload.len(),
                max
            })
        );
        return;
    }
    let Ok(reading) = result else {
        return;
    };
    assert_eq!(
        reading.payload.as_bytes(),
        payload,
        "the stored payload is not the input"
    );
    let value: Value = serde_json::from_slice(payload).expect("an accepted payload is JSON");
    let Value::Object(obj) = &value else {
        panic!("an accepted payload is not an object");
    };
    assert!(
        !has_nul(&value),
        "an accepted payload carries U+0000, which jsonb refuses"
    );
    assert!(!reading.device_id.is_empty(), "empty device id");
    assert!(
        reading.device_id.chars().count() <= MAX_DEVICE_ID_LEN,
        "device id over {MAX_DEVICE_ID_LEN} characters"
    );
    let from_topic = decoder.pattern.device_id(topic);
    match (from_topic, obj.get("device_id")) {
        (Some(d), _) => assert_eq!(reading.device_id, d, "the topic's device id was not used"),
        (None, Some(Value::String(s))) => assert_eq!(reading.device_id, *s),
        (None, Some(Value::Number(n))) => assert_eq!(reading.device_id, n.to_string()),
        (None, other) => panic!("a device id from nowhere: {other:?}"),
    }
    let timestamped = ["timestamp", "ts"]
        .iter()
        .any(|k| obj.get(*k).is_some_and(|v| !v.is_null()));
    assert_eq!(
        reading.content_hash.is_some(),
        !timestamped,
        "content hash set iff there is no timestamp"
    );
    match &reading.content_hash {
        Some(h) => {
            assert_eq!(reading.ts, received_at, "an untimed reading's time");
            assert_eq!(*h, content_hash(topic, payload));
        }
        None => {
            assert_eq!(
                reading.ts.timestamp_subsec_nanos() % 1000,
                0,
                "a timestamp finer than timestamptz keeps"
            );
            // Within timestamptz's range (4713 BC to 294276 AD).
            assert!(
                (-4712..=294_276).contains(&reading.ts.year()),
                "timestamp {} out of timestamptz's range",
                reading.ts
            );
        }
    }
}

/// The receipt time every checked message is given.
fn received_at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
        .single()
        .expect("a valid instant")
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}
