//! Formats: how one message's payload becomes its readings ([`Unit`]s), before each reading is
//! decoded as a JSON object like any other (`Decoder::parse`). `json` (an object, or an array of
//! objects), `value` (one bare value) and `senml` (RFC 8428). A format is chosen per topic by
//! `[[formats]]`; one more format is one more arm of [`Decoder::units`].
//!
//! A unit keeps two texts: the reading's JSON object (what is stored) and what its dead letter
//! keeps — bytes that the same format reads back into the same reading, so `leasehold replay`
//! works on them: the message as received, an array's element, a SenML reading's records with
//! their base fields resolved.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use bytes::Bytes;
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use leasehold_config::{Format, FormatSpec};
use serde_json::value::RawValue;
use serde_json::{json, Map, Number, Value};

use crate::{contains_nul_escape, DecodeError, Decoder, Parsed, TopicPattern};

/// One reading of a message, or why a part of it is none.
#[derive(Debug, Clone)]
pub struct Unit {
    /// The reading's JSON object text: what `telemetry.payload` stores and its content hash is of.
    pub payload: Bytes,
    /// What the unit's dead letter keeps.
    pub raw: Bytes,
    /// `element 3 of 10`, `record 2 of 4`: put before the unit's errors.
    pub label: Option<String>,
    /// Decoded already (array elements, SenML readings), or refused before decoding; `None`: a
    /// whole JSON payload, decoded by the writer as it always was.
    pub decoded: Option<Result<Parsed, DecodeError>>,
}

impl Unit {
    /// Whether the dead letter's bytes are the reading's own (the same slice): a JSON object or
    /// an array's element, unlike a bare value or a SenML reading.
    pub fn raw_is_payload(&self) -> bool {
        self.raw.as_ptr() == self.payload.as_ptr() && self.raw.len() == self.payload.len()
    }

    /// A message that is one JSON object: the writer decodes it as it always did.
    pub fn whole(payload: &Bytes) -> Unit {
        Unit {
            payload: payload.clone(),
            raw: payload.clone(),
            label: None,
            decoded: None,
        }
    }

    /// A message, or a part of one, that is no reading: `e` says why.
    pub fn refused(raw: Bytes, e: DecodeError) -> Unit {
        Unit::refused_part(raw, None, e)
    }

    fn refused_part(raw: Bytes, label: Option<String>, e: DecodeError) -> Unit {
        Unit::part(raw, label, Err(e))
    }

    /// A part of a message decoded here, whose dead letter keeps its own bytes.
    fn part(raw: Bytes, label: Option<String>, decoded: Result<Parsed, DecodeError>) -> Unit {
        Unit {
            payload: raw.clone(),
            raw,
            label,
            decoded: Some(decoded),
        }
    }
}

/// The place of element `k` (1-based) of an array of `n`, as its dead letter's error begins.
pub fn element_label(k: usize, n: usize) -> String {
    // Written once per element of every array: `format!` was a twentieth of a reading's cost.
    let (mut a, mut b) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (k, n) = (a.format(k), b.format(n));
    let mut label = String::with_capacity(12 + k.len() + n.len());
    for part in ["element ", k, " of ", n] {
        label.push_str(part);
    }
    label
}

/// The `(k, n)` of a dead letter's error that begins with [`element_label`].
pub fn element_place(error: &str) -> Option<(usize, usize)> {
    let rest = error.strip_prefix("element ")?;
    let (k, rest) = rest.split_once(" of ")?;
    let (n, _) = rest.split_once(": ")?;
    Some((k.parse().ok()?, n.parse().ok()?))
}

/// Whether a JSON payload is an array (its first non-blank byte a `[`).
fn is_array(payload: &[u8]) -> bool {
    payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
}

/// MQTT filter matching (`+` one level, `#` the rest; a `$` topic only by a filter that names
/// its first level).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && !filter.starts_with('$') {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (lit, Some(level)) if lit == level => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

impl Decoder {
    /// The decoder a configuration describes: its topic pattern, size limit and formats.
    pub fn configured(cfg: &leasehold_config::Config) -> Decoder {
        Decoder::new(
            &cfg.cluster.device_topic_pattern,
            cfg.cluster.max_payload_bytes,
        )
        .with_formats(&cfg.formats)
    }

    /// What each reading of a message would be for `telemetry` (an observer's dry run): its
    /// label and its refusal, if any.
    pub fn check(
        &self,
        topic: &str,
        payload: &Bytes,
        received_at: DateTime<Utc>,
    ) -> Vec<Result<(), String>> {
        self.check_with(topic, payload, received_at, None)
    }

    /// [`Decoder::check`], with the Sparkplug B births an observer has seen (it records nothing
    /// and asks for no rebirth: what the host would ask is dropped).
    pub fn check_with(
        &self,
        topic: &str,
        payload: &Bytes,
        received_at: DateTime<Utc>,
        sparkplug: Option<&mut crate::sparkplug::Host>,
    ) -> Vec<Result<(), String>> {
        if let Err(e) = self.check_size(payload) {
            return vec![Err(e.to_string())];
        }
        let units = match sparkplug {
            Some(host) if self.format_of(topic) == Format::SparkplugB => {
                let units = host.read(topic, payload, false);
                let _ = (
                    host.take_changes(),
                    host.take_rebirths(),
                    host.take_happened(),
                );
                units
            }
            _ => self.units(topic, payload, received_at),
        };
        units
            .into_iter()
            .map(|u| {
                let decoded = u
                    .decoded
                    .unwrap_or_else(|| self.parse_light(topic, &u.payload));
                let e = decoded.map_or_else(Some, |p| p.reading_error(topic));
                match (e, u.label) {
                    (None, _) => Ok(()),
                    (Some(e), Some(l)) => Err(format!("{l}: {e}")),
                    (Some(e), None) => Err(e.to_string()),
                }
            })
            .collect()
    }

    /// Reads the topics of `formats` their way (the first entry whose filters match decides).
    pub fn with_formats(mut self, formats: &[FormatSpec]) -> Self {
        self.formats = formats
            .iter()
            .map(|f| {
                (
                    f.clone(),
                    f.device_topic_pattern.as_deref().map(TopicPattern::new),
                )
            })
            .collect();
        self
    }

    /// The `[[formats]]` entry of `topic`, if one takes it.
    fn entry_of(&self, topic: &str) -> Option<&(FormatSpec, Option<TopicPattern>)> {
        self.formats
            .iter()
            .find(|(f, _)| f.topics.iter().any(|filter| topic_matches(filter, topic)))
    }

    /// A reading's object in full (for routes that read JSON paths), its device id read as its
    /// topic's format entry says: what a unit decoded without its object becomes.
    pub fn parse_full(&self, topic: &str, payload: &[u8]) -> Result<Parsed, DecodeError> {
        let pattern = self
            .entry_of(topic)
            .and_then(|(_, own)| own.as_ref())
            .unwrap_or(&self.pattern);
        self.parse_with(pattern, topic, payload)
    }

    /// Whether `payload` is read as one JSON object by the writer itself (`json`, not an
    /// array, no entry of its own): the common message, which needs no [`Decoder::units`].
    pub fn is_plain(&self, topic: &str, payload: &[u8]) -> bool {
        (self.formats.is_empty() || self.entry_of(topic).is_none()) && !is_array(payload)
    }

    /// Whether some `[[formats]]` entry reads `format`.
    pub fn reads(&self, format: Format) -> bool {
        self.formats.iter().any(|(f, _)| f.format == format)
    }

    /// The format of `topic`'s payloads.
    pub fn format_of(&self, topic: &str) -> Format {
        self.entry_of(topic).map_or(Format::Json, |(f, _)| f.format)
    }

    /// The readings of one message (at least one unit: a message that holds no reading is one
    /// refused unit). `payload` is within `MAX_PAYLOAD_BYTES` (a larger one never gets here);
    /// `received_at` times SenML's relative times.
    pub fn units(&self, topic: &str, payload: &Bytes, received_at: DateTime<Utc>) -> Vec<Unit> {
        let (format, own) = match self.entry_of(topic) {
            Some((f, own)) => (f.format, own.as_ref()),
            None => (Format::Json, None),
        };
        let read = Reader {
            d: self,
            topic,
            pattern: own.unwrap_or(&self.pattern),
            own_pattern: own.is_some(),
        };
        match format {
            Format::Json => read.json(payload),
            Format::Value => vec![read.value(payload)],
            Format::Senml => read.senml(payload, received_at),
            // Without the edge node's births: the leader reads these in order with a
            // `sparkplug::Host`; alone, only metrics sent by name are read.
            Format::SparkplugB => crate::sparkplug::read_alone(topic, payload),
        }
    }
}

/// One message's topic, read with the device id pattern of its format entry.
struct Reader<'a> {
    d: &'a Decoder,
    topic: &'a str,
    pattern: &'a TopicPattern,
    /// The entry has its own pattern: even an object is decoded here, with it.
    own_pattern: bool,
}

impl Reader<'_> {
    fn parse(&self, payload: &[u8]) -> Result<Parsed, DecodeError> {
        self.d.parse_with(self.pattern, self.topic, payload)
    }

    /// Device id and timestamp only (no object): what an array's element needs here.
    fn light(&self, payload: &[u8]) -> Result<Parsed, DecodeError> {
        self.d.light_with(self.pattern, self.topic, payload)
    }

    /// An object is itself; an array is one unit per element, elements of one device at one
    /// instant merged into one reading where their fields agree.
    fn json(&self, payload: &Bytes) -> Vec<Unit> {
        if !is_array(payload) {
            return vec![match self.own_pattern {
                false => Unit::whole(payload),
                true => Unit {
                    decoded: Some(self.parse(payload)),
                    ..Unit::whole(payload)
                },
            }];
        }
        let elements = match self.elements_once(payload) {
            Some(e) => e,
            None => match self.elements(payload) {
                Ok(e) => e,
                Err(e) => return vec![Unit::refused(payload.clone(), e)],
            },
        };
        let n = elements.len();
        let mut merged = Merger::with_capacity(n);
        for (k, (raw, read)) in elements.into_iter().enumerate() {
            let label = element_label(k + 1, n);
            match read {
                Ok(p) => merged.add(self, raw, label, p),
                Err(e) => merged.units.push(Unit::refused_part(raw, Some(label), e)),
            }
        }
        merged.finish(self)
    }

    /// Array `payload`'s elements (each its own bytes, a slice of the message's) and their
    /// light reads; the array's refusal when it is not well-formed JSON, empty or too long.
    fn elements(&self, payload: &Bytes) -> Result<Elements, DecodeError> {
        let elements: Vec<&RawValue> =
            crate::json(payload).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        if elements.len() > crate::MAX_READINGS {
            return Err(DecodeError::TooManyReadings { n: elements.len() });
        }
        if elements.is_empty() {
            return Err(DecodeError::NoReadings(
                "an empty array holds no reading".into(),
            ));
        }
        Ok(elements
            .into_iter()
            .map(|e| {
                let raw = payload.slice_ref(e.get().as_bytes());
                let read = self.light(&raw);
                (raw, read)
            })
            .collect())
    }

    /// [`Reader::elements`] in one pass over the array, each element read as it is met: the
    /// array split first cost a gateway's reading a sixth of its decoding. Each element is read
    /// by a reader of its own, as the split reads it (which skips the elements' values without
    /// a depth limit). `None` where the two could word things differently — bytes that are not
    /// UTF-8, an array not well-formed, empty or too long — for [`Reader::elements`] to read,
    /// and word the refusal, as always.
    fn elements_once(&self, payload: &Bytes) -> Option<Elements> {
        let text = std::str::from_utf8(payload).ok()?;
        let b = text.as_bytes();
        let skip = |mut i: usize| {
            while matches!(b.get(i), Some(b' ' | b'\n' | b'\t' | b'\r')) {
                i += 1;
            }
            i
        };
        let mut i = skip(0);
        if b.get(i) != Some(&b'[') {
            return None;
        }
        i = skip(i + 1);
        if b.get(i) == Some(&b']') {
            return None;
        }
        let mut out = Elements::new();
        loop {
            if out.len() == crate::MAX_READINGS {
                return None;
            }
            let mut stream =
                serde_json::Deserializer::from_str(&text[i..]).into_iter::<crate::light::Shape>();
            let (end, read) = match stream.next()? {
                Ok(shape) => {
                    let end = i + stream.byte_offset();
                    (
                        end,
                        self.d
                            .light_of(self.pattern, self.topic, &b[i..end], Ok(shape)),
                    )
                }
                // Not JSON, or JSON the light reader refuses: the element alone as the split
                // read it, and as it reads it alone.
                Err(_) => {
                    crate::light::raw_token_seen();
                    let mut raw =
                        serde_json::Deserializer::from_str(&text[i..]).into_iter::<&RawValue>();
                    raw.next()?.ok()?;
                    let end = i + raw.byte_offset();
                    (end, self.light(&b[i..end]))
                }
            };
            out.push((payload.slice(i..end), read));
            i = skip(end);
            match b.get(i) {
                Some(b',') => {
                    i = skip(i + 1);
                    if b.get(i) == Some(&b']') {
                        return None;
                    }
                }
                Some(b']') if skip(i + 1) == b.len() => return Some(out),
                _ => return None,
            }
        }
    }

    /// `{"value": ...}`: a JSON scalar as it was written (numbers keep their digits), anything
    /// else the text itself, trimmed.
    fn value(&self, payload: &Bytes) -> Unit {
        let Ok(text) = std::str::from_utf8(payload) else {
            return Unit::refused(payload.clone(), DecodeError::NotUtf8);
        };
        let t = text.trim();
        if t.is_empty() {
            let e = DecodeError::NoReadings("an empty payload holds no value".into());
            return Unit::refused(payload.clone(), e);
        }
        let object = match serde_json::from_str::<Value>(t) {
            Ok(_) => format!("{{\"value\":{t}}}"),
            Err(_) => json!({ "value": t }).to_string(),
        };
        let reading = Bytes::from(object);
        let decoded = self.parse(&reading);
        Unit {
            payload: reading,
            raw: payload.clone(),
            label: None,
            decoded: Some(decoded),
        }
    }

    /// RFC 8428: base fields carried forward, names `bn + n`, times `bt + t` (below 2^28:
    /// relative to receipt; 0: the receipt itself), values `bv + v`, sums `bs + s`. The records
    /// of one device at one instant are one reading.
    fn senml(&self, payload: &Bytes, received_at: DateTime<Utc>) -> Vec<Unit> {
        let refused = |e: DecodeError| vec![Unit::refused(payload.clone(), e)];
        let records = match senml_records(payload) {
            Ok(records) => records,
            Err(e) => return refused(e),
        };
        let n = records.len();
        if n > crate::MAX_READINGS {
            return refused(DecodeError::TooManyReadings { n });
        }
        let topic_device = self.pattern.device_id(self.topic).map(str::to_string);
        let mut base = Base::default();
        let mut gathered = Gathered::default();
        let mut units = Vec::new();
        for (k, r) in records.iter().enumerate() {
            let label = format!("record {} of {n}", k + 1);
            let resolved = match base.resolve(r, received_at) {
                Ok(Some(x)) => x,
                Ok(None) => continue,
                Err(m) => {
                    let raw = Bytes::from(Value::Array(vec![Value::Object(r.clone())]).to_string());
                    units.push(Unit::refused_part(
                        raw,
                        Some(label),
                        DecodeError::BadSenml(m),
                    ));
                    continue;
                }
            };
            let (device, field) = resolved.names(topic_device.as_deref());
            if RESERVED.contains(&field.as_str()) {
                let raw = Bytes::from(Value::Array(vec![resolved.record(true)]).to_string());
                let e = DecodeError::BadSenml(format!(
                    "the name {field:?} is the reading's own field (device id or timestamp), not a measurement's"
                ));
                units.push(Unit::refused_part(raw, Some(label), e));
                continue;
            }
            let fields = resolved.fields(&field);
            gathered.add(device, fields, &resolved, k + 1);
        }
        for g in gathered.groups {
            units.push(self.senml_unit(g, topic_device.is_none(), n));
        }
        if units.is_empty() {
            return refused(DecodeError::NoReadings(
                "the SenML pack holds no value".into(),
            ));
        }
        units
    }

    /// A SenML reading as a unit of a pack of `n` records, its dead letter the reading's own
    /// records (base fields resolved); `with_device`: its device is named by the records, not
    /// by the topic, so the reading carries it.
    fn senml_unit(&self, g: Group, with_device: bool, n: usize) -> Unit {
        let mut object = g.fields;
        if let Some(t) = g.time {
            object.insert(
                "ts".into(),
                Value::String(t.to_rfc3339_opts(SecondsFormat::Micros, true)),
            );
        }
        if with_device {
            if let Some(d) = &g.device {
                object.insert("device_id".into(), Value::String(d.clone()));
            }
        }
        let reading = Bytes::from(Value::Object(object).to_string());
        let raw = Bytes::from(Value::Array(g.records).to_string());
        let label = records_label(&g.labels, n);
        let decoded = match contains_nul_escape(&reading) {
            true => Err(DecodeError::NulEscape),
            false => self.parse(&reading),
        };
        Unit {
            payload: reading,
            raw,
            label: Some(label),
            decoded: Some(decoded),
        }
    }
}

/// A SenML pack's records: the message is refused whole unless it is a JSON array of objects.
fn senml_records(payload: &[u8]) -> Result<Vec<Map<String, Value>>, DecodeError> {
    match crate::json::<Value>(payload) {
        Ok(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for (k, item) in items.into_iter().enumerate() {
                match item {
                    Value::Object(o) => out.push(o),
                    other => {
                        return Err(DecodeError::BadSenml(format!(
                            "record {} is {}, not an object",
                            k + 1,
                            crate::kind(&other)
                        )))
                    }
                }
            }
            Ok(out)
        }
        Ok(other) => Err(DecodeError::BadSenml(format!(
            "a SenML pack is a JSON array of records, got {}",
            crate::kind(&other)
        ))),
        Err(e) => Err(DecodeError::NotJson(e.to_string())),
    }
}

fn records_label(labels: &[usize], n: usize) -> String {
    let list: Vec<String> = labels.iter().map(usize::to_string).collect();
    let word = if labels.len() == 1 {
        "record"
    } else {
        "records"
    };
    format!("{word} {} of {n}", list.join(", "))
}

/// A reading's place among those gathered, by its key (foldhash, seeded per map).
type Places<K> = HashMap<K, usize, foldhash::fast::RandomState>;

/// An array's elements: each its own bytes and its light read.
type Elements = Vec<(Bytes, Result<Parsed, DecodeError>)>;

/// Array elements grouped by device and instant: an element joins the first reading of its
/// device and instant whose fields it agrees with (the same value for every field both have).
struct Merger {
    units: Vec<Unit>,
    /// (device, time) -> the latest of `pending` with that key. Hashed with foldhash, seeded
    /// per array: SipHash, twice per element, was a tenth of an array's reading. Not built to
    /// resist a crafted flood of colliding ids, but an array holds at most `MAX_READINGS`.
    keys: Places<(String, Option<DateTime<Utc>>)>,
    pending: Vec<Pending>,
}

struct Pending {
    raw: Bytes,
    labels: Vec<String>,
    parsed: Parsed,
    /// Merged fields, once a second element joined.
    merged: Option<Map<String, Value>>,
}

impl Merger {
    /// For an array of `n` elements.
    fn with_capacity(n: usize) -> Self {
        Merger {
            units: Vec::with_capacity(n),
            keys: Places::with_capacity_and_hasher(n, Default::default()),
            pending: Vec::with_capacity(n),
        }
    }

    /// Element `raw` (`p`: its device id and timestamp, no object): a reading of its own, or
    /// merged into the latest reading of its device and instant when their fields agree (only
    /// then are the objects read in full).
    fn add(&mut self, reader: &Reader<'_>, raw: Bytes, label: String, p: Parsed) {
        let key = match (&p.device_id, &p.timestamp, p.reading_error(reader.topic)) {
            (Some(d), Ok(t), None) => (d.clone(), *t),
            // Not a reading for `telemetry` (a route may still take it): kept alone.
            _ => return self.units.push(Unit::part(raw, Some(label), Ok(p))),
        };
        // Only the latest reading of the key is tried: one comparison per element, however
        // many elements an array has.
        let next = self.pending.len();
        let latest = match self.keys.entry(key) {
            Entry::Occupied(e) => Some(e.into_mut()),
            Entry::Vacant(e) => {
                e.insert(next);
                None
            }
        };
        if let Some(i) = latest {
            let into = &mut self.pending[*i];
            let object = |raw: &[u8]| reader.parse(raw).ok().and_then(|p| p.object);
            if into.merged.is_none() {
                into.merged = object(&into.raw);
            }
            if let (Some(fields), Some(object)) = (into.merged.as_mut(), object(&raw)) {
                // The key's own fields are equal as read (`1700000000` and `1700000000000` are
                // one instant): the first element's spelling is kept.
                let own = |k: &str| matches!(k, "ts" | "timestamp" | "device_id");
                if object
                    .iter()
                    .all(|(k, v)| own(k) || fields.get(k).is_none_or(|w| w == v))
                {
                    fields.extend(object.into_iter().filter(|(k, _)| !own(k)));
                    into.labels.push(label);
                    return;
                }
            }
            // They disagree: this element is the key's latest reading.
            *i = next;
        }
        self.pending.push(Pending {
            raw,
            labels: vec![label],
            parsed: p,
            merged: None,
        });
    }

    fn finish(mut self, reader: &Reader<'_>) -> Vec<Unit> {
        for p in self.pending {
            match p.merged.filter(|_| p.labels.len() > 1) {
                None => {
                    let label = p.labels.into_iter().next();
                    self.units.push(Unit::part(p.raw, label, Ok(p.parsed)))
                }
                Some(fields) => {
                    let text = Bytes::from(Value::Object(fields).to_string());
                    let labels: Vec<&str> = p
                        .labels
                        .iter()
                        .map(|l| l.split(" of ").next().unwrap_or(l))
                        .collect();
                    let of = p.labels[0].split(" of ").nth(1).unwrap_or("");
                    let label = Some(format!("{} of {of}", labels.join(", ")));
                    let decoded = reader.parse(&text);
                    self.units.push(Unit::part(text, label, decoded));
                }
            }
        }
        self.units
    }
}

/// SenML's base fields in effect.
#[derive(Default)]
struct Base {
    bn: String,
    bt: f64,
    bu: Option<String>,
    bv: f64,
    bs: f64,
}

/// One record with its base fields applied.
struct Resolved {
    bn: String,
    n: String,
    /// `None`: the receipt instant (timed by it, like any reading without a timestamp).
    time: Option<DateTime<Utc>>,
    /// An absolute time as the pack gave it (`bt` + `t`, seconds): written back as it is, so
    /// the dead letter reads back into the very same instant.
    secs: Option<f64>,
    value: Value,
    sum: Option<Value>,
    unit: Option<String>,
}

impl Resolved {
    /// This record with its base fields resolved, as one of its reading's pack: the first
    /// (`base`) carries the base name and the reading's time as `bn` and `bt` for the records
    /// after it (one device, one instant), each of which carries only its own name, value, sum
    /// and unit; a pack about the size of the records it came from, that reads back into the
    /// same reading.
    fn record(&self, base: bool) -> Value {
        let mut m = Map::new();
        if base {
            m.insert("bn".into(), Value::String(self.bn.clone()));
            let micros = self.time.map(|t| t.timestamp_micros() as f64 / 1e6);
            if let Some(bt) = self.secs.or(micros) {
                m.insert("bt".into(), number(bt));
            }
        }
        m.insert("n".into(), Value::String(self.n.clone()));
        let value_key = match &self.value {
            Value::Null => None,
            Value::Number(_) => Some("v"),
            Value::Bool(_) => Some("vb"),
            _ => Some("vs"),
        };
        if let Some(k) = value_key {
            m.insert(k.into(), self.value.clone());
        }
        if let Some(s) = &self.sum {
            m.insert("s".into(), s.clone());
        }
        if let Some(u) = &self.unit {
            m.insert("u".into(), Value::String(u.clone()));
        }
        Value::Object(m)
    }

    /// The record's device and field. A device named by the topic takes the whole name
    /// (`bn + n`) as the field; otherwise the base name, without its separator, is the device.
    /// A record without a name is its device's `value`.
    fn names(&self, topic_device: Option<&str>) -> (Option<String>, String) {
        let (device, field) = match topic_device {
            Some(d) => (Some(d.to_string()), format!("{}{}", self.bn, self.n)),
            None => {
                let d = self.bn.trim_end_matches([':', '/']).to_string();
                (Some(d).filter(|d| !d.is_empty()), self.n.clone())
            }
        };
        let field = if field.is_empty() {
            "value".to_string()
        } else {
            field
        };
        (device, field)
    }

    /// The fields the record gives its reading: `field` its value, `field_sum`, `field_unit`.
    fn fields(&self, field: &str) -> Vec<(String, Value)> {
        let mut fields = Vec::with_capacity(3);
        if !self.value.is_null() {
            fields.push((field.to_string(), self.value.clone()));
        }
        if let Some(s) = &self.sum {
            fields.push((format!("{field}_sum"), s.clone()));
        }
        if let Some(u) = &self.unit {
            fields.push((format!("{field}_unit"), Value::String(u.clone())));
        }
        fields
    }
}

fn number(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// A SenML time of `t` seconds since the Unix epoch (always seconds, unlike a JSON reading's
/// `ts`, which may be milliseconds), at microsecond resolution.
fn absolute(t: f64) -> Result<DateTime<Utc>, String> {
    let micros = (t * 1e6).round();
    if !(0.0..=253_402_300_799e6).contains(&micros) {
        return Err(format!(
            "time {t} is not between the Unix epoch and the year 9999"
        ));
    }
    DateTime::from_timestamp_micros(micros as i64)
        .ok_or_else(|| format!("time {t} is out of range"))
}

/// Names a SenML record cannot have: the reading's own fields.
const RESERVED: &[&str] = &["device_id", "ts", "timestamp"];

/// Below this, a SenML time is relative to now (RFC 8428, 4.5.3).
const RELATIVE_LIMIT: f64 = 268_435_456.0;

impl Base {
    /// Applies `r`'s base fields, then resolves its own; `None` for a record with no value and
    /// no sum (base fields only).
    fn resolve(
        &mut self,
        r: &Map<String, Value>,
        received_at: DateTime<Utc>,
    ) -> Result<Option<Resolved>, String> {
        let num = |k: &str| -> Result<Option<f64>, String> {
            match r.get(k) {
                None => Ok(None),
                Some(Value::Number(n)) => n
                    .as_f64()
                    .filter(|f| f.is_finite())
                    .map(Some)
                    .ok_or_else(|| format!("{k} is not a finite number")),
                Some(other) => Err(format!("{k} must be a number, got {}", crate::kind(other))),
            }
        };
        let text = |k: &str| -> Result<Option<String>, String> {
            match r.get(k) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(format!("{k} must be a string, got {}", crate::kind(other))),
            }
        };
        if let Some(v) = num("bver")? {
            if v > 10.0 {
                return Err(format!(
                    "bver {v} is a SenML version this reader does not know"
                ));
            }
        }
        self.bn = text("bn")?.unwrap_or_else(|| std::mem::take(&mut self.bn));
        self.bt = num("bt")?.unwrap_or(self.bt);
        self.bu = text("bu")?.or(self.bu.take());
        self.bv = num("bv")?.unwrap_or(self.bv);
        self.bs = num("bs")?.unwrap_or(self.bs);
        let finite = |what: &str, x: f64| {
            Some(x)
                .filter(|x| x.is_finite())
                .map(number)
                .ok_or_else(|| format!("{what} {x} is out of range (past f64)"))
        };
        let value = if let Some(v) = num("v")? {
            finite("value", self.bv + v)?
        } else if let Some(vs) = text("vs")? {
            Value::String(vs)
        } else if let Some(vd) = text("vd")? {
            Value::String(vd)
        } else {
            match r.get("vb") {
                None => Value::Null,
                Some(Value::Bool(b)) => Value::Bool(*b),
                Some(other) => {
                    return Err(format!("vb must be a boolean, got {}", crate::kind(other)))
                }
            }
        };
        let sum = num("s")?.map(|s| finite("sum", self.bs + s)).transpose()?;
        if value.is_null() && sum.is_none() {
            return Ok(None);
        }
        let n = text("n")?.unwrap_or_default();
        let t = self.bt + num("t")?.unwrap_or(0.0);
        let (time, secs) = if t == 0.0 {
            (None, None)
        } else if t.abs() < RELATIVE_LIMIT {
            let offset = Duration::microseconds((t * 1e6).round() as i64);
            (Some(received_at + offset), None)
        } else {
            (Some(absolute(t)?), Some(t))
        };
        Ok(Some(Resolved {
            bn: self.bn.clone(),
            n,
            time,
            secs,
            value,
            sum,
            unit: text("u")?.or_else(|| self.bu.clone()),
        }))
    }
}

/// A reading being gathered from the records of one device at one instant.
struct Group {
    device: Option<String>,
    time: Option<DateTime<Utc>>,
    fields: Map<String, Value>,
    records: Vec<Value>,
    labels: Vec<usize>,
    /// The base name the group's records were last written with.
    bn: Option<String>,
}

impl Group {
    /// Whether `fields` can join without changing a value already here.
    fn agrees(&self, fields: &[(String, Value)]) -> bool {
        fields
            .iter()
            .all(|(k, v)| self.fields.get(k).is_none_or(|w| w == v))
    }
}

/// The readings of a SenML pack being gathered, in the order they began.
#[derive(Default)]
struct Gathered {
    groups: Vec<Group>,
    /// (device, time) -> the latest group with that key (the only one a record may join).
    latest: Places<(Option<String>, Option<DateTime<Utc>>)>,
}

impl Gathered {
    /// Record `label` (its number in the pack) into the latest reading of its device and
    /// instant, if its fields agree with that one's, else into a new reading.
    fn add(
        &mut self,
        device: Option<String>,
        fields: Vec<(String, Value)>,
        resolved: &Resolved,
        label: usize,
    ) {
        let key = (device.clone(), resolved.time);
        let at = self
            .latest
            .get(&key)
            .copied()
            .filter(|&i| self.groups[i].agrees(&fields));
        let g = match at {
            Some(i) => &mut self.groups[i],
            None => {
                self.latest.insert(key, self.groups.len());
                self.groups.push(Group {
                    device: device.clone(),
                    time: resolved.time,
                    fields: Map::new(),
                    records: Vec::new(),
                    labels: Vec::new(),
                    bn: None,
                });
                self.groups.last_mut().expect("just pushed")
            }
        };
        g.fields.extend(fields);
        // The base fields again on a record whose base name changed within the group (a
        // device named by the topic keeps one reading across base names).
        let base = g.bn.as_deref() != Some(resolved.bn.as_str());
        g.bn = Some(resolved.bn.clone());
        g.records.push(resolved.record(base));
        g.labels.push(label);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::now;

    fn decoder(format: Format, filter: &str) -> Decoder {
        Decoder::new("devices/{device_id}/#", 1 << 20).with_formats(&[FormatSpec {
            topics: vec![filter.into()],
            format,
            device_topic_pattern: None,
        }])
    }

    /// What [`Reader::elements_once`] read, and whether [`Reader::elements`] read the same
    /// (each element's bytes and light read); `None` when it left the array to it.
    fn once_as_split(payload: &[u8]) -> Option<Result<(), String>> {
        let d = Decoder::new("devices/{device_id}/#", 1 << 20);
        let read = Reader {
            d: &d,
            topic: "gw/site-1/up",
            pattern: &d.pattern,
            own_pattern: false,
        };
        let payload = Bytes::copy_from_slice(payload);
        let once = read.elements_once(&payload)?;
        let split = read.elements(&payload);
        Some(match split {
            Ok(split) if format!("{split:?}") == format!("{once:?}") => Ok(()),
            other => Err(format!("once {once:?}, split {other:?}")),
        })
    }

    /// Arrays of `counts` generated JSON texts (`broken`: broken ones too), with `gaps` around
    /// and between them and one of `separators` between each two.
    fn arrays_of(
        gaps: Vec<&'static str>,
        separators: Vec<&'static str>,
        broken: bool,
        counts: std::ops::Range<usize>,
    ) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let gap = proptest::sample::select(gaps);
        let element = (gap.clone(), crate::tests::json_text(broken), gap.clone());
        (
            gap.clone(),
            proptest::collection::vec(element, counts),
            gap,
            proptest::sample::select(separators),
        )
            .prop_map(|(before, elements, after, sep)| {
                let inner: Vec<String> = elements
                    .into_iter()
                    .map(|(a, t, b)| format!("{a}{t}{b}"))
                    .collect();
                format!("{before}[{}]{after}", inner.join(sep)).into_bytes()
            })
    }

    /// Arrays of generated JSON texts (broken ones too), with whitespace and separators
    /// around and between them, JSON's and not.
    fn arrays() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        let gaps = vec!["", "", " ", "\n\t", "\r", "x", ",", "\u{feff}"];
        let separators = vec![",", ",", ",", ", ", " ,\n", ",,", ""];
        arrays_of(gaps, separators, true, 0..6)
    }

    /// Well-formed arrays of well-formed JSON texts, with JSON's whitespace around and between.
    fn good_arrays() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        arrays_of(vec!["", "", " ", "\n\t", "\r "], vec![","], false, 1..8)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// An array read in one pass holds what the split read, element by element, or is left
        /// to it.
        #[test]
        fn an_array_read_once_reads_as_split(bytes in proptest::prop_oneof![
            3 => arrays(),
            1 => crate::tests::json_bytes(),
        ]) {
            if let Some(r) = once_as_split(&bytes) {
                proptest::prop_assert!(r.is_ok(), "{}: {:?}", String::from_utf8_lossy(&bytes), r);
            }
        }

        /// A well-formed array is always read in one pass, as the split reads it.
        #[test]
        fn a_well_formed_array_is_read_once_as_split(bytes in good_arrays()) {
            // (The texts hold an `f64`'s `NaN` or `inf` now and then.)
            proptest::prop_assume!(serde_json::from_slice::<Vec<&RawValue>>(&bytes).is_ok());
            let r = once_as_split(&bytes);
            proptest::prop_assert!(
                matches!(r, Some(Ok(()))),
                "{}: {:?}",
                String::from_utf8_lossy(&bytes),
                r
            );
        }
    }

    #[test]
    fn an_array_read_once_reads_as_split_at_the_edges() {
        let deep = |n: usize| format!("[{}1{}]", "[".repeat(n), "]".repeat(n));
        let many = |n: usize| format!("[{}]", vec!["{}"; n].join(","));
        let cases = [
            r#"[{"device_id":"a","ts":1},{"device_id":"b","ts":2}]"#.to_string(),
            r#" [ 1 , "x" , null , [] , {} ] "#.to_string(),
            r#"[{"device_id":"a\u0000"},{"$serde_json::private::RawValue":"1"},{"k":1}]"#.into(),
            r#"[{"k":"\udc00"},{"device_id":"b"}]"#.to_string(),
            r#"[{"k":1e999},{"device_id":"b"}]"#.to_string(),
            deep(98),
            deep(99),
            deep(126),
            deep(127),
            deep(200),
            many(crate::MAX_READINGS),
            many(crate::MAX_READINGS + 1),
        ];
        let mut once = 0;
        for c in &cases {
            if let Some(r) = once_as_split(c.as_bytes()) {
                assert!(r.is_ok(), "{c}: {r:?}");
                once += 1;
            }
        }
        // All but the too long are read in one pass, the deepest too (each element has a reader
        // of its own in both).
        assert_eq!(once, cases.len() - 1);
        assert!(once_as_split(many(crate::MAX_READINGS + 1).as_bytes()).is_none());
    }

    fn texts(units: &[Unit]) -> Vec<String> {
        units
            .iter()
            .map(|u| String::from_utf8_lossy(&u.payload).into_owned())
            .collect()
    }

    #[test]
    fn filters_match_like_a_broker() {
        for (f, t, want) in [
            ("a/+/c", "a/b/c", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("+/b", "a/b/c", false),
            ("#", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/b", "a/b/", false),
        ] {
            assert_eq!(topic_matches(f, t), want, "{f} {t}");
        }
    }

    #[test]
    fn bare_values_keep_their_type_and_digits() {
        let d = decoder(Format::Value, "stat/#");
        for (payload, want) in [
            ("23.5", r#"{"value":23.5}"#),
            (" true\n", r#"{"value":true}"#),
            ("ON", r#"{"value":"ON"}"#),
            ("\"ON\"", r#"{"value":"ON"}"#),
            (
                "123456789012345678901234567890",
                r#"{"value":123456789012345678901234567890}"#,
            ),
            ("1e400", r#"{"value":"1e400"}"#),
            ("NaN", r#"{"value":"NaN"}"#),
            ("say \"hi\"", r#"{"value":"say \"hi\""}"#),
        ] {
            let u = d.units("stat/plug-1/POWER", &Bytes::from(payload), now());
            assert_eq!(texts(&u), [want], "{payload}");
            assert_eq!(
                &u[0].raw[..],
                payload.as_bytes(),
                "the dead letter keeps the bytes"
            );
        }
        let own = Decoder::new("devices/{device_id}/#", 1 << 20).with_formats(&[FormatSpec {
            topics: vec!["stat/+/POWER".into()],
            format: Format::Value,
            device_topic_pattern: Some("stat/{device_id}/POWER".into()),
        }]);
        let u = own.units("stat/plug-1/POWER", &Bytes::from_static(b"ON"), now());
        let parsed = u[0].decoded.clone().expect("decoded").expect("a reading");
        assert_eq!(
            parsed.device_id.as_deref(),
            Some("plug-1"),
            "the entry's own pattern"
        );
        let u = d.units("stat/x", &Bytes::from_static(b"\xff\xfe"), now());
        assert!(matches!(u[0].decoded, Some(Err(DecodeError::NotUtf8))));
        let u = d.units("stat/x", &Bytes::from_static(b"  "), now());
        assert!(matches!(
            u[0].decoded,
            Some(Err(DecodeError::NoReadings(_)))
        ));
        let u = d.units("stat/x", &Bytes::from_static(b"a\0b"), now());
        assert!(
            matches!(u[0].decoded, Some(Err(DecodeError::NulEscape))),
            "{u:?}"
        );
    }

    #[test]
    fn arrays_are_one_reading_per_element_and_one_instant_of_one_device_is_one_reading() {
        let d = Decoder::new("devices/{device_id}/#", 1 << 20);
        let body = br#"[{"device_id":"a","ts":1700000000,"t":1},{"device_id":"b","ts":1700000000,"t":2},
            {"device_id":"a","ts":1700000000,"h":5}, 7, {"device_id":"a","ts":1700000000,"t":9}, {"x":1}]"#;
        let u = d.units("gw/1/up", &Bytes::from_static(body), now());
        let t = texts(&u);
        // 7 refused; {"x":1} has no device id (kept alone for routes); a@ts merged (t and h);
        // a third element of a@ts with another t is a reading of its own (a real conflict).
        assert_eq!(u.len(), 5, "{t:?}");
        assert!(
            t.contains(&r#"{"device_id":"a","h":5,"t":1,"ts":1700000000}"#.to_string()),
            "{t:?}"
        );
        let seven = u.iter().find(|u| &u.raw[..] == b"7").expect("7");
        assert_eq!(seven.label.as_deref(), Some("element 4 of 6"));
        assert!(matches!(
            seven.decoded,
            Some(Err(DecodeError::NotObject(_)))
        ));
        let merged = u
            .iter()
            .find(|u| u.label.as_deref() == Some("element 1, element 3 of 6"));
        assert!(
            merged.is_some(),
            "{:?}",
            u.iter().map(|u| &u.label).collect::<Vec<_>>()
        );
        let u = d.units("gw/1/up", &Bytes::from_static(b" [] "), now());
        assert!(matches!(
            u[0].decoded,
            Some(Err(DecodeError::NoReadings(_)))
        ));
        let u = d.units("gw/1/up", &Bytes::from_static(b"[[{}]]"), now());
        assert!(matches!(u[0].decoded, Some(Err(DecodeError::NotObject(_)))));
        let u = d.units("devices/x/y", &Bytes::from_static(br#"{"a":1}"#), now());
        assert!(
            u[0].decoded.is_none(),
            "an object is the writer's to decode, as always"
        );
    }

    #[test]
    fn senml_resolves_base_fields_and_groups_by_device_and_instant() {
        let d = decoder(Format::Senml, "senml/#");
        let pack =
            br#"[{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.320067464e+09,"bu":"%RH","v":20},
            {"u":"lon","v":24.30621},{"n":"lat","u":"lat","v":50.048972},
            {"n":"temp","t":60,"u":"Cel","v":23.1},{"n":"on","vb":true}]"#;
        let u = d.units("senml/gw", &Bytes::from_static(pack), now());
        let t = texts(&u);
        // The unnamed first record and the `lon` one share a name (`value`, from bn alone) at
        // one instant with different values: two readings of one key, which the database
        // settles (a conflict); the records after `lon` at that instant joined its reading
        // (the latest of the key).
        assert_eq!(u.len(), 3, "{t:?}");
        assert!(
            t[0].contains(r#""device_id":"urn:dev:ow:10e2073a01080063""#),
            "{t:?}"
        );
        assert!(
            t[1].contains(r#""lat":50.048972"#) && t[1].contains(r#""on":true"#),
            "{t:?}"
        );
        assert!(
            t[0].contains(r#""ts":"2011-10-31T13:24:24.000000Z""#),
            "{t:?}"
        );
        assert!(
            t[2].contains(r#""temp":23.1"#) && t[2].contains(r#""temp_unit":"Cel""#),
            "{t:?}"
        );
        for unit in &u {
            assert!(matches!(unit.decoded, Some(Ok(_))), "{unit:?}");
            // Each reading's dead letter is a pack that reads back into the same reading.
            let again = d.units("senml/gw", &unit.raw, now());
            assert_eq!(texts(&again), [String::from_utf8_lossy(&unit.payload)]);
        }
        let only_base = d.units("senml/gw", &Bytes::from_static(br#"[{"bn":"x:"}]"#), now());
        assert!(matches!(
            only_base[0].decoded,
            Some(Err(DecodeError::NoReadings(_)))
        ));
        let d2 = decoder(Format::Senml, "devices/+/senml");
        let now_pack = d2.units(
            "devices/m1/senml",
            &Bytes::from_static(br#"[{"n":"a","v":1},{"n":"b","v":2}]"#),
            now(),
        );
        assert_eq!(
            texts(&now_pack),
            [r#"{"a":1.0,"b":2.0}"#],
            "no time: the receipt's, one reading"
        );
        for bad in [
            &b"{}"[..],
            b"[1]",
            br#"[{"bt":"x","v":1}]"#,
            br#"[{"v":1,"t":1e300}]"#,
        ] {
            let u = d.units("senml/gw", &Bytes::copy_from_slice(bad), now());
            assert!(
                u.iter().all(|u| matches!(u.decoded, Some(Err(_)))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_second_review_an_overflow_a_spelling_of_one_instant_and_a_compact_dead_letter() {
        let d = decoder(Format::Senml, "senml/#");
        // A value past f64 is a dead letter of its record, not a record silently dropped.
        let u = d.units(
            "senml/x",
            &Bytes::from_static(br#"[{"bn":"dev:","n":"a","bv":1e308,"v":1e308},{"n":"b","v":1}]"#),
            now(),
        );
        assert_eq!(u.len(), 2, "{u:?}");
        assert!(
            matches!(&u[0].decoded, Some(Err(DecodeError::BadSenml(m))) if m.contains("out of range")),
            "{u:?}"
        );
        // Two spellings of one instant (seconds, milliseconds) merge: their key is one.
        let j = Decoder::new("devices/{device_id}/#", 1 << 20);
        let u = j.units(
            "gw/1/up",
            &Bytes::from_static(br#"[{"device_id":"a","ts":1700000000,"t":1},{"device_id":"a","ts":1700000000000,"h":2}]"#),
            now(),
        );
        assert_eq!(
            texts(&u),
            [r#"{"device_id":"a","h":2,"t":1,"ts":1700000000}"#]
        );
        // A reading's dead letter is about the size of its records (the base name and time once).
        let records: Vec<String> = (0..500)
            .map(|k| format!(r#"{{"n":"m{k}","v":{k}}}"#))
            .collect();
        let pack = format!(
            r#"[{{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.7e9,"bu":"W",{}]"#,
            &records.join(",")[1..]
        );
        let u = d.units("senml/x", &Bytes::from(pack.clone()), now());
        assert_eq!(u.len(), 1);
        assert!(
            u[0].raw.len() < pack.len() * 2,
            "{} bytes of dead letter for a pack of {}",
            u[0].raw.len(),
            pack.len()
        );
        let again = d.units("senml/x", &u[0].raw, now());
        assert_eq!(
            texts(&again),
            texts(&u),
            "it reads back into the same reading"
        );
    }
}
