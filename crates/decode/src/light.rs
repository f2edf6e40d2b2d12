//! A payload read without building its object: every value is still read as `serde_json` reads
//! it into a `Value` (the same grammar, number range and nesting limit, so the same payloads are
//! refused), but only `device_id`, `ts` and `timestamp` are kept.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The fields a reading needs; a key given twice keeps its last value, as a map would.
#[derive(Debug, Default)]
pub(crate) struct Fields<'a> {
    pub device_id: Option<Field<'a>>,
    pub ts: Option<Field<'a>>,
    pub timestamp: Option<Field<'a>>,
}

/// One of those fields as read, without building a `Value` of it (an allocation per string):
/// a string borrowed from the payload unless it has escapes, a number as `serde_json` reads it
/// into a `Value` (a non-finite one is `Null`, as there), or what else it is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Field<'a> {
    Null,
    Str(Cow<'a, str>),
    Num(serde_json::Number),
    /// "a boolean", "an array", "an object" ([`crate::kind`]'s words).
    Other(&'static str),
}

impl<'a> Field<'a> {
    /// The field of a `Value` already built.
    pub(crate) fn of(v: &'a Value) -> Field<'a> {
        match v {
            Value::Null => Field::Null,
            Value::String(s) => Field::Str(Cow::Borrowed(s)),
            Value::Number(n) => Field::Num(n.clone()),
            other => Field::Other(crate::kind(other)),
        }
    }
}

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field<'de>, A::Error> {
        while map.next_entry::<Key<'de>, Checked>()?.is_some() {}
        Ok(Field::Other("an object"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field<'de>, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Field::Other("an array"))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Field<'de>, E> {
        Ok(Field::Other("a boolean"))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Field<'de>, E> {
        Ok(Field::Num(n.into()))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Field<'de>, E> {
        Ok(Field::Num(n.into()))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Field<'de>, E> {
        Ok(serde_json::Number::from_f64(n).map_or(Field::Null, Field::Num))
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Borrowed(s)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(s.to_string())))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(s)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }
}

/// A payload's top level: an object's fields, or what it is instead.
pub(crate) enum Shape<'a> {
    Object(Fields<'a>),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Shape<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape<'de>, A::Error> {
        let mut f = Fields::default();
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "device_id" => f.device_id = Some(map.next_value()?),
                "ts" => f.ts = Some(map.next_value()?),
                "timestamp" => f.timestamp = Some(map.next_value()?),
                _ => {
                    map.next_value::<Checked>()?;
                }
            }
        }
        Ok(Shape::Object(f))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape<'de>, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Shape::Other("an array"))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape<'de>, E> {
        Ok(Shape::Other("a boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape<'de>, E> {
        Ok(Shape::Other("a number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape<'de>, E> {
        Ok(Shape::Other("a number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape<'de>, E> {
        Ok(Shape::Other("a number"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Shape<'de>, E> {
        Ok(Shape::Other("a string"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Shape<'de>, E> {
        Ok(Shape::Other("null"))
    }
}

/// The key by which serde_json's `Value` reader (with its `raw_value` feature) takes an object
/// for raw JSON text to read again: a payload holding it anywhere is read by that reader
/// instead ([`raw_token_seen`]), so that both readers accept and refuse the same payloads.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

thread_local! {
    static RAW_TOKEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the last light read on this thread met [`RAW_VALUE_TOKEN`] as a key; clears it.
pub(crate) fn raw_token_seen() -> bool {
    RAW_TOKEN.with(|c| c.replace(false))
}

fn key_of(k: &str) {
    if k.starts_with('$') && k == RAW_VALUE_TOKEN {
        RAW_TOKEN.with(|c| c.set(true));
    }
}

/// An object key, borrowed from the payload unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                key_of(s);
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                key_of(s);
                Ok(Key(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Any value, read through `deserialize_any` as a `Value` would be (numbers parsed and range
/// checked), and dropped.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Key<'de>, Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
}

/// The fields of a payload read without serde_json, or `None` wherever serde_json's reading
/// could differ from this one: an escape, a number with an exponent or of more than
/// [`QUICK_NUMBER_MAX`] characters, nesting deeper than [`QUICK_DEPTH_MAX`], the raw-value
/// token, anything outside the grammar. `None` costs only the caller's serde_json read, which
/// then gives the answer (or the error, in its words); so this reader needs to be right only
/// where it answers: on such text JSON's grammar leaves serde_json no error to give, and the
/// kept numbers are read as serde_json reads them ([`number`]). Most telemetry is such text,
/// and this reads it in a fraction of serde_json's instructions (a visitor call per token
/// there).
pub(crate) fn quick(text: &str) -> Option<Fields<'_>> {
    let mut q = Quick { text, at: 0 };
    q.blank();
    if q.next() != Some(b'{') {
        return None;
    }
    let mut f = Fields::default();
    q.members(1, |key, v| {
        let slot = match key {
            "device_id" => &mut f.device_id,
            "ts" => &mut f.ts,
            "timestamp" => &mut f.timestamp,
            _ => return Some(()),
        };
        *slot = Some(match v {
            Got::Null => Field::Null,
            Got::Str(s) => Field::Str(Cow::Borrowed(s)),
            Got::Num(n) => Field::Num(number(n)?),
            Got::Other(k) => Field::Other(k),
        });
        Some(())
    })?;
    q.blank();
    (q.at == text.len()).then_some(f)
}

/// A kept number's text (as [`Quick::number`] took it) as serde_json reads it: a `u64`, else
/// an `i64`, else the nearest `f64` (serde_json's `float_roundtrip`, as Rust's own parse). An
/// integer that may not fit, and `-0` (a float there), are serde_json's to read.
fn number(n: &str) -> Option<serde_json::Number> {
    if n.contains('.') {
        return serde_json::Number::from_f64(n.parse().ok()?);
    }
    if n.len() <= 18 && n != "-0" {
        return Some(match n.strip_prefix('-') {
            Some(_) => n.parse::<i64>().ok()?.into(),
            None => n.parse::<u64>().ok()?.into(),
        });
    }
    match serde_json::from_str::<Field<'_>>(n).ok()? {
        Field::Num(n) => Some(n),
        _ => None,
    }
}

/// Numbers longer than this are left to serde_json: without an exponent, this many characters
/// stay inside an `f64`'s range (at most about 1e300 against 1.8e308; serde_json refuses a
/// number beyond it).
const QUICK_NUMBER_MAX: usize = 300;

/// Nesting deeper than this is left to serde_json, which refuses it at 128.
const QUICK_DEPTH_MAX: u32 = 64;

/// A value as [`quick`] met it.
enum Got<'a> {
    Str(&'a str),
    /// The number's text.
    Num(&'a str),
    Null,
    /// A boolean, an array or an object, in [`crate::kind`]'s words.
    Other(&'static str),
}

struct Quick<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Quick<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.at += 1;
        Some(c)
    }

    /// JSON's whitespace (serde_json's too; a byte order mark is not).
    fn blank(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\t' | b'\r')) {
            self.at += 1;
        }
    }

    /// After `{`: the members through `}`, each given to `each` (the top level's keeps the
    /// fields; a nested object's does nothing).
    fn members(
        &mut self,
        depth: u32,
        mut each: impl FnMut(&'a str, Got<'a>) -> Option<()>,
    ) -> Option<()> {
        self.blank();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Some(());
        }
        loop {
            self.blank();
            if self.next()? != b'"' {
                return None;
            }
            let key = self.string()?;
            if key == RAW_VALUE_TOKEN {
                return None;
            }
            self.blank();
            if self.next()? != b':' {
                return None;
            }
            self.blank();
            let v = self.value(depth)?;
            each(key, v)?;
            self.blank();
            match self.next()? {
                b',' => {}
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// After `[`: the elements through `]`.
    fn elements(&mut self, depth: u32) -> Option<()> {
        self.blank();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Some(());
        }
        loop {
            self.blank();
            self.value(depth)?;
            self.blank();
            match self.next()? {
                b',' => {}
                b']' => return Some(()),
                _ => return None,
            }
        }
    }

    /// One value, inside a container `depth` deep.
    fn value(&mut self, depth: u32) -> Option<Got<'a>> {
        Some(match self.next()? {
            b'"' => Got::Str(self.string()?),
            b'{' if depth < QUICK_DEPTH_MAX => {
                self.members(depth + 1, |_, _| Some(()))?;
                Got::Other("an object")
            }
            b'[' if depth < QUICK_DEPTH_MAX => {
                self.elements(depth + 1)?;
                Got::Other("an array")
            }
            b'-' | b'0'..=b'9' => {
                self.at -= 1;
                Got::Num(self.number()?)
            }
            b't' => self.word("rue", Got::Other("a boolean"))?,
            b'f' => self.word("alse", Got::Other("a boolean"))?,
            b'n' => self.word("ull", Got::Null)?,
            _ => return None,
        })
    }

    fn word(&mut self, rest: &str, got: Got<'a>) -> Option<Got<'a>> {
        let end = self.at + rest.len();
        (self.text.as_bytes().get(self.at..end)? == rest.as_bytes()).then(|| {
            self.at = end;
            got
        })
    }

    /// After the opening quote: the string's text through the closing quote, unless it has an
    /// escape or a control character (serde_json's error). Strings in telemetry are short: a
    /// byte loop, without `memchr`'s set-up per string.
    fn string(&mut self) -> Option<&'a str> {
        let b = self.text.as_bytes();
        let start = self.at;
        let mut end = start;
        loop {
            match *b.get(end)? {
                b'"' => break,
                b'\\' | 0..=0x1f => return None,
                _ => end += 1,
            }
        }
        self.at = end + 1;
        self.text.get(start..end)
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)?`, not followed by a digit, an exponent or a point.
    fn number(&mut self) -> Option<&'a str> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            let from = self.at;
            self.digits();
            if self.at == from {
                return None;
            }
        }
        if matches!(self.peek(), Some(b'0'..=b'9' | b'e' | b'E' | b'.'))
            || self.at - start > QUICK_NUMBER_MAX
        {
            return None;
        }
        self.text.get(start..self.at)
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
    }
}
