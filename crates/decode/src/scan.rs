//! One pass over a payload that keeps only the fields [`crate::Decoder::decode`] reads
//! (`device_id`, `timestamp`, `ts`) and checks everything else exactly as parsing it into a
//! `serde_json::Value` does — the same parser calls, so the same syntax, UTF-8, number-range and
//! nesting-depth errors at the same positions — without building the tree: a `Value` costs an
//! allocation per key and per string, which was most of the leader's decoding time.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// A payload's top level.
pub(crate) enum Top {
    Object(Fields),
    /// Not an object: what it is, in words (as [`crate::kind`] says it).
    Other(&'static str),
}

/// The fields `decode` reads; of a key given twice, the last value, as a `Map` keeps it.
#[derive(Default)]
pub(crate) struct Fields {
    pub device_id: Option<Value>,
    pub timestamp: Option<Value>,
    pub ts: Option<Value>,
}

/// Parses `payload` as one JSON value (trailing characters are an error, as for
/// `serde_json::from_slice`).
pub(crate) fn scan(payload: &[u8]) -> serde_json::Result<Top> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let top = (&mut de).deserialize_any(TopVisitor)?;
    de.end()?;
    Ok(top)
}

struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Top, E> {
        Ok(Top::Other("a boolean"))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Top, E> {
        Ok(Top::Other("a number"))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Top, E> {
        Ok(Top::Other("a number"))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Top, E> {
        Ok(Top::Other("a number"))
    }

    fn visit_str<E>(self, _: &str) -> Result<Top, E> {
        Ok(Top::Other("a string"))
    }

    fn visit_unit<E>(self) -> Result<Top, E> {
        Ok(Top::Other("null"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Top, A::Error> {
        Skip.visit_seq(seq)?;
        Ok(Top::Other("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let mut f = Fields::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match key {
                Key::DeviceId => f.device_id = Some(map.next_value()?),
                Key::Timestamp => f.timestamp = Some(map.next_value()?),
                Key::Ts => f.ts = Some(map.next_value()?),
                Key::Other => map.next_value_seed(Skip)?,
            }
        }
        Ok(Top::Object(f))
    }
}

/// An object key: parsed (escapes decoded, UTF-8 checked) like a `Value`'s, then only compared.
enum Key {
    DeviceId,
    Timestamp,
    Ts,
    Other,
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, k: &str) -> Result<Key, E> {
        Ok(match k {
            "device_id" => Key::DeviceId,
            "timestamp" => Key::Timestamp,
            "ts" => Key::Ts,
            _ => Key::Other,
        })
    }
}

/// A value nobody reads: parsed through the same `deserialize_any` a `Value` goes through, and
/// dropped as it goes.
struct Skip;

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(KeySeed)?.is_some() {
            map.next_value_seed(Skip)?;
        }
        Ok(())
    }
}
