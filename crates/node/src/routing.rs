//! Named routes on the writer's side: which routes a message goes to ([`matching`]) and the
//! row each route gets from it ([`row`]). Every value is read from its source and checked and
//! converted here to its column's kind, then sent as text that the statement casts to the
//! column's own type: a value that cannot be converted (or a NULL a column cannot take) is that
//! route's dead letter naming the route, the column and why, decided before the database sees
//! it, so it never fails the batch.
//!
//! Pure: no I/O. The rules are listed in `docs/routes.md`.

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use leasehold_config::{PathStep, Source};
use leasehold_decode::{kind, timestamp_value, Parsed};
use leasehold_store::routes::{ColumnKind, ResolvedColumn, ResolvedRoute};
use leasehold_store::statement::{carry, Carry};
use leasehold_store::Value as Cell;
use serde_json::Value;

/// The routes (indexes into `routes`) with a filter matching `topic`. Empty: the default route.
pub fn matching(routes: &[ResolvedRoute], topic: &str) -> Vec<usize> {
    routes
        .iter()
        .enumerate()
        .filter(|(_, r)| r.spec.topics.iter().any(|f| rumqttc::matches(topic, f)))
        .map(|(k, _)| k)
        .collect()
}

/// What a message offers its routes' sources besides its payload.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub topic: &'a str,
    pub received_at: DateTime<Utc>,
    pub written_by: &'a str,
    pub lease_epoch: i64,
    pub pkid: i32,
    pub dup: bool,
    /// The content hash of a reading without its own timestamp (`Source::ContentHash`).
    pub content_hash: Option<&'a str>,
}

/// Why a route's row could not be made from a message: it becomes a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingError {
    pub column: String,
    pub reason: String,
}

/// A source's value before conversion.
enum Val<'a> {
    Null,
    /// The whole payload: its text as received goes into text and JSON columns unchanged.
    Payload(&'a Parsed),
    Str(String),
    Json(&'a Value),
    Time(DateTime<Utc>),
    Int(i64),
    Bool(bool),
}

/// How a route's row is made, column by column: worked out once per batch, not per row.
#[derive(Debug, Clone)]
pub struct Plan(Vec<Step>);

#[derive(Debug, Clone, Copy)]
struct Step {
    /// Left `Null`: the statement reads it from the message ([`Carry::Shared`]).
    skip: bool,
    key: bool,
    /// The last column that reads the device id: it takes the id rather than a copy.
    last_id: bool,
}

impl Plan {
    /// A column the statement reads from the message itself ([`Carry::Shared`]) is left `Null`,
    /// unless it is part of the key (the batch compares keys) and not the topic (which
    /// `batch_key` reads from the message).
    pub fn of(route: &ResolvedRoute) -> Plan {
        Plan::with(route, true)
    }

    fn with(route: &ResolvedRoute, skip_shared: bool) -> Plan {
        let cols = &route.columns;
        let last_id = cols.iter().rposition(|c| c.source == Source::DeviceId);
        let steps = cols.iter().enumerate().map(|(j, c)| {
            let key = route.key.contains(&j);
            Step {
                skip: skip_shared
                    && carry(c) == Carry::Shared
                    && (c.source == Source::Topic || !key),
                key,
                last_id: last_id == Some(j),
            }
        });
        Plan(steps.collect())
    }
}

/// The row of `route` (made by `plan`, [`Plan::of`] it) for a message as the writer sends it:
/// one value per mapped column, typed as it is sent.
pub fn row(
    route: &ResolvedRoute,
    plan: &Plan,
    parsed: &Parsed,
    cx: Context<'_>,
) -> Result<Vec<Cell>, MappingError> {
    row_with(route, plan, parsed, None, cx)
}

/// [`row`] for the last route a message goes to: the device id is moved into the row rather
/// than copied (`parsed` is left without it).
pub fn last_row(
    route: &ResolvedRoute,
    plan: &Plan,
    parsed: &mut Parsed,
    cx: Context<'_>,
) -> Result<Vec<Cell>, MappingError> {
    let mut id = parsed.device_id.take();
    row_with(route, plan, parsed, Some(&mut id), cx)
}

/// `id`: the device id taken out of `parsed`, to move into the last column that reads it.
fn row_with(
    route: &ResolvedRoute,
    plan: &Plan,
    parsed: &Parsed,
    mut id: Option<&mut Option<String>>,
    cx: Context<'_>,
) -> Result<Vec<Cell>, MappingError> {
    debug_assert_eq!(plan.0.len(), route.columns.len(), "a plan of another route");
    let mut out = Vec::with_capacity(route.columns.len());
    for (c, step) in route.columns.iter().zip(&plan.0) {
        if step.skip {
            out.push(Cell::Null);
            continue;
        }
        let fail = |reason: String| MappingError {
            column: c.name.clone(),
            reason,
        };
        let v = match (&c.source, id.as_deref_mut()) {
            (Source::DeviceId, Some(id)) => {
                let id = if step.last_id { id.take() } else { id.clone() };
                id.map_or(Val::Null, Val::Str)
            }
            _ => source(&c.source, parsed, cx).map_err(fail)?,
        };
        let v = convert(c, v).map_err(fail)?;
        if v.is_null() {
            if step.key {
                return Err(fail(
                    "no value (NULL) for a column of the route's key".into(),
                ));
            }
            if c.not_null && !c.has_default {
                return Err(fail(
                    "no value (NULL) for a NOT NULL column without a default".into(),
                ));
            }
        }
        out.push(v);
    }
    Ok(out)
}

fn source<'a>(s: &Source, parsed: &'a Parsed, cx: Context<'_>) -> Result<Val<'a>, String> {
    Ok(match s {
        Source::TopicSegment(n) => cx
            .topic
            .split('/')
            .nth(*n)
            .map_or(Val::Null, |s| Val::Str(s.to_string())),
        Source::Topic => Val::Str(cx.topic.to_string()),
        Source::Payload => Val::Payload(parsed),
        Source::JsonPath(steps) => {
            let Some((first, rest)) = steps.split_first() else {
                return Ok(Val::Payload(parsed));
            };
            let object = parsed.object.as_ref().ok_or_else(unparsed)?;
            let mut at = match first {
                PathStep::Key(k) => object.get(k),
                PathStep::Index(_) => None,
            };
            for step in rest {
                at = match (step, at) {
                    (PathStep::Key(k), Some(Value::Object(o))) => o.get(k),
                    (PathStep::Index(i), Some(Value::Array(a))) => a.get(*i),
                    _ => None,
                };
            }
            at.map_or(Val::Null, Val::Json)
        }
        Source::Timestamp => match &parsed.timestamp {
            Ok(Some(t)) => Val::Time(*t),
            Ok(None) => Val::Time(cx.received_at),
            Err(e) => return Err(e.to_string()),
        },
        Source::ReceivedAt => Val::Time(cx.received_at),
        Source::WrittenBy => Val::Str(cx.written_by.to_string()),
        Source::LeaseEpoch => Val::Int(cx.lease_epoch),
        Source::DeviceId => parsed.device_id.clone().map_or(Val::Null, Val::Str),
        Source::Literal(s) => Val::Str(s.clone()),
        Source::ContentHash => cx
            .content_hash
            .map_or(Val::Null, |h| Val::Str(h.to_string())),
        Source::PacketId => Val::Int(i64::from(cx.pkid)),
        Source::PossibleDuplicate => Val::Bool(cx.dup && cx.content_hash.is_some()),
    })
}

/// Whether a route reads more of the payload than its device id and timestamp: then its
/// messages are parsed whole ([`leasehold_decode::Decoder::parse`]).
pub fn reads_object(route: &ResolvedRoute) -> bool {
    route.columns.iter().any(|c| match c.source {
        Source::JsonPath(_) => true,
        Source::Payload => carry(c) != Carry::Shared,
        _ => false,
    })
}

/// A source read the object of a payload parsed without it: [`reads_object`] decides which
/// parse a message gets, so this is a defect, kept as the row's dead letter.
fn unparsed() -> String {
    "internal: the payload was not parsed whole for this route".into()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A JSON array as PostgreSQL's array text (`{"a b","c,d",NULL}`), for an array column: every
/// element quoted (an integer array takes `"1"` too), JSON `null` as NULL, a nested array as a
/// nested dimension, an object as its JSON text. What the element type refuses (a ragged nesting,
/// `"x"` for an integer) is the database's to refuse, isolated like any refused value.
fn array_literal(v: &Value) -> String {
    match v {
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(array_literal).collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Null => "NULL".into(),
        Value::String(s) => quote_element(s),
        other => quote_element(&other.to_string()),
    }
}

fn quote_element(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `v` as the column's type takes it: integers, booleans and times typed, the rest as text the
/// column's type reads; `Null` for NULL (a JSON `null` too).
fn convert(c: &ResolvedColumn, v: Val<'_>) -> Result<Cell, String> {
    if let Some(cell) = integer_literal(c.kind, &v) {
        return Ok(cell);
    }
    let whole;
    let text = match v {
        Val::Null | Val::Json(Value::Null) => return Ok(Cell::Null),
        Val::Payload(p) => match c.kind {
            ColumnKind::Text | ColumnKind::Other | ColumnKind::Json | ColumnKind::Jsonb => {
                return Ok(Cell::Text(p.text.clone().ok_or_else(unparsed)?))
            }
            _ => {
                whole = Value::Object(p.object.clone().ok_or_else(unparsed)?);
                Scalar::Composite(&whole)
            }
        },
        Val::Str(s) => Scalar::Str(s),
        Val::Json(Value::String(s)) => Scalar::Str(s.clone()),
        Val::Json(Value::Number(n)) => Scalar::Num(n.to_string()),
        Val::Json(Value::Bool(b)) => Scalar::Bool(*b),
        Val::Json(j) => Scalar::Composite(j),
        Val::Time(t) => Scalar::Time(t),
        Val::Int(i) => Scalar::Num(i.to_string()),
        Val::Bool(b) => Scalar::Bool(b),
    };
    if c.kind == ColumnKind::Other && c.sql_type.ends_with("[]") {
        if let Scalar::Composite(j @ Value::Array(_)) = &text {
            return Ok(Cell::Text(array_literal(j)));
        }
    }
    let out = match c.kind {
        ColumnKind::Text | ColumnKind::Other => match text {
            Scalar::Str(s) | Scalar::Num(s) => s,
            Scalar::Bool(b) => b.to_string(),
            Scalar::Time(t) => rfc3339(t),
            Scalar::Composite(j) => j.to_string(),
        },
        ColumnKind::Int2 => return integer(&text, INT2),
        ColumnKind::Int4 => return integer(&text, INT4),
        ColumnKind::Int8 => return integer(&text, INT8),
        ColumnKind::Numeric => number(&text, None)?,
        ColumnKind::Float4 => number(&text, Some(f64::from(f32::MAX)))?,
        ColumnKind::Float8 => number(&text, Some(f64::MAX))?,
        ColumnKind::Bool => match text {
            Scalar::Bool(b) => return Ok(Cell::Bool(b)),
            Scalar::Str(s) if s.eq_ignore_ascii_case("true") => return Ok(Cell::Bool(true)),
            Scalar::Str(s) if s.eq_ignore_ascii_case("false") => return Ok(Cell::Bool(false)),
            other => return Err(format!("{} is not a boolean (true or false)", other.what())),
        },
        ColumnKind::Timestamptz | ColumnKind::Timestamp | ColumnKind::Date => {
            let t = match text {
                Scalar::Time(t) => t,
                Scalar::Str(s) if c.kind == ColumnKind::Date => {
                    match NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d") {
                        Ok(d) => {
                            let midnight = d.and_time(chrono::NaiveTime::MIN).and_utc();
                            return Ok(Cell::Text(pg_time_text(midnight, "%m-%d")));
                        }
                        Err(_) => timestamp_value(&Value::String(s))?,
                    }
                }
                Scalar::Str(s) | Scalar::Num(s) => timestamp_value(&Value::String(s))?,
                other => {
                    return Err(format!(
                        "{} is not a time (RFC 3339, or Unix epoch seconds or milliseconds)",
                        other.what()
                    ))
                }
            };
            match c.kind {
                ColumnKind::Timestamptz => return Ok(Cell::Time(t)),
                // Without a time zone: the time in UTC.
                ColumnKind::Timestamp => pg_time_text(t, "%m-%d %H:%M:%S%.6f"),
                _ => pg_time_text(t, "%m-%d"),
            }
        }
        ColumnKind::Jsonb | ColumnKind::Json => match text {
            Scalar::Composite(j) => j.to_string(),
            Scalar::Num(n) => n,
            Scalar::Bool(b) => b.to_string(),
            Scalar::Str(s) => Value::String(s).to_string(),
            Scalar::Time(t) => Value::String(rfc3339(t)).to_string(),
        },
        ColumnKind::Uuid => match text {
            Scalar::Str(s) => uuid::Uuid::parse_str(s.trim())
                .map_err(|e| format!("{s:?} is not a UUID ({e})"))?
                .hyphenated()
                .to_string(),
            other => return Err(format!("{} is not a UUID", other.what())),
        },
    };
    if out.contains('\0') {
        return Err("the value contains U+0000, which PostgreSQL text cannot hold".into());
    }
    Ok(Cell::Text(out))
}

/// `t` in UTC as PostgreSQL's `timestamp`/`date` input reads it: `rest` after the year, and a
/// year before 1 as `BC` (chrono writes year 0 as `0000` and 2 BC as `-0001`, which PostgreSQL
/// refuses).
fn pg_time_text(t: DateTime<Utc>, rest: &str) -> String {
    use chrono::Datelike;
    let t = t.naive_utc();
    let year = t.year();
    let rest = t.format(rest);
    if year >= 1 {
        format!("{year:04}-{rest}")
    } else {
        format!("{:04}-{rest} BC", 1 - year)
    }
}

/// A source's value, by shape.
enum Scalar<'a> {
    Str(String),
    /// A JSON number or an integer source, as its text.
    Num(String),
    Bool(bool),
    Time(DateTime<Utc>),
    /// A JSON object or array.
    Composite(&'a Value),
}

impl Scalar<'_> {
    /// The value, described for an error.
    fn what(&self) -> String {
        match self {
            Scalar::Str(s) => format!("the string {s:?}"),
            Scalar::Num(n) => format!("the number {n}"),
            Scalar::Bool(b) => format!("the boolean {b}"),
            Scalar::Time(t) => format!("the time {}", rfc3339(*t)),
            Scalar::Composite(j) => kind(j).to_string(),
        }
    }
}

/// An integer literal into an integer column that holds it: its value, not written out and
/// read back (7 % of a typed route's message in the bench). `None` for anything else, which
/// takes the text's way, with the text's errors.
fn integer_literal(kind: ColumnKind, v: &Val<'_>) -> Option<Cell> {
    let (Val::Json(Value::Number(n)), Some(t)) = (v, int_type(kind)) else {
        return None;
    };
    n.as_i64()
        .filter(|i| (t.min..=t.max).contains(i))
        .map(Cell::Int)
}

/// An integer column's type: the values it holds, and its name.
#[derive(Debug, Clone, Copy)]
struct IntType {
    min: i64,
    max: i64,
    name: &'static str,
}

const INT2: IntType = IntType {
    min: i16::MIN as i64,
    max: i16::MAX as i64,
    name: "smallint",
};
const INT4: IntType = IntType {
    min: i32::MIN as i64,
    max: i32::MAX as i64,
    name: "integer",
};
const INT8: IntType = IntType {
    min: i64::MIN,
    max: i64::MAX,
    name: "bigint",
};

/// The type of an integer column; `None` for any other.
fn int_type(kind: ColumnKind) -> Option<IntType> {
    match kind {
        ColumnKind::Int2 => Some(INT2),
        ColumnKind::Int4 => Some(INT4),
        ColumnKind::Int8 => Some(INT8),
        _ => None,
    }
}

/// An integer that `t` holds: a JSON number without a fractional part, or a string holding one.
/// Read exactly from its decimal text (never through `f64`, which would round
/// `9007199254740993.0` to `...992` and `1e-400` to `0`).
fn integer(v: &Scalar<'_>, t: IntType) -> Result<Cell, String> {
    let s = match v {
        Scalar::Str(s) | Scalar::Num(s) => s.trim(),
        other => return Err(format!("{} is not an integer", other.what())),
    };
    if !is_decimal(s) {
        return Err(format!("{} is not an integer", v.what()));
    }
    match exact_integer(s) {
        Ok(n) if n >= i128::from(t.min) && n <= i128::from(t.max) => Ok(Cell::Int(n as i64)),
        Ok(_) | Err(Inexact::TooLarge) => Err(format!("{s} is out of range for {}", t.name)),
        Err(Inexact::Fraction) => Err(format!("{} is not an integer", v.what())),
    }
}

/// Why a decimal is not an `i128`.
enum Inexact {
    Fraction,
    TooLarge,
}

/// The integer a decimal (as accepted by [`is_decimal`]) denotes exactly.
fn exact_integer(s: &str) -> Result<i128, Inexact> {
    let (neg, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(at) => {
            let e = &s[at + 1..];
            // An exponent beyond i64 is as good as infinite either way.
            let exp = e.parse::<i64>().unwrap_or(if e.starts_with('-') {
                i64::MIN / 4
            } else {
                i64::MAX / 4
            });
            (&s[..at], exp)
        }
        None => (s, 0),
    };
    let (whole, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{whole}{frac}");
    // Position of the decimal point within `digits`.
    let mut point = i128::try_from(whole.len()).unwrap_or(i128::MAX) + i128::from(exp);
    let lead = digits.len() - digits.trim_start_matches('0').len();
    let digits = digits[lead..].trim_end_matches('0');
    point -= i128::try_from(lead).unwrap_or(0);
    if digits.is_empty() {
        return Ok(0);
    }
    let len = i128::try_from(digits.len()).unwrap_or(i128::MAX);
    if point < len {
        return Err(Inexact::Fraction);
    }
    if point > 20 {
        return Err(Inexact::TooLarge);
    }
    let mut n: i128 = digits.parse().map_err(|_| Inexact::TooLarge)?;
    for _ in len..point {
        n *= 10;
    }
    Ok(if neg { -n } else { n })
}

/// A number: a JSON number, or a string holding one in decimal or exponent notation
/// (`NaN`/`Infinity` too for floating point, whose range is `max`).
fn number(v: &Scalar<'_>, max: Option<f64>) -> Result<String, String> {
    let s = match v {
        Scalar::Str(s) | Scalar::Num(s) => s.trim(),
        other => return Err(format!("{} is not a number", other.what())),
    };
    let special = [
        "nan",
        "infinity",
        "+infinity",
        "-infinity",
        "inf",
        "-inf",
        "+inf",
    ]
    .contains(&s.to_ascii_lowercase().as_str());
    if max.is_some() && special {
        return Ok(s.to_string());
    }
    if !is_decimal(s) {
        return Err(format!("{} is not a number", v.what()));
    }
    if let Some(max) = max {
        match s.parse::<f64>() {
            Ok(f) if f.is_finite() && f.abs() <= max => {}
            _ => return Err(format!("{s} is out of range for its floating-point column")),
        }
    }
    Ok(s.to_string())
}

/// `[+-]digits[.digits][e[+-]digits]` with at least one digit before the exponent.
fn is_decimal(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    // The digits from `i` on, skipped: how many.
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    let mut n = digits(&mut i);
    if b.get(i) == Some(&b'.') {
        i += 1;
        n += digits(&mut i);
    }
    if n == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// One key column's value as compared inside one batch.
#[derive(Debug, PartialEq, Eq, Hash)]
pub enum KeyPart<'a> {
    Cell(&'a Cell),
    /// A numeric's text without trailing fractional zeros (`1.50` and `1.5` are one key).
    Number(&'a str),
    /// The message's topic (a shared column, not among the values sent).
    Topic(&'a str),
}

/// The key of a row as compared inside one batch, part by part: the values of the key columns
/// (`values` as [`row`] made them, of a message on `topic`), numbers without trailing
/// fractional zeros. Values that are equal only once cast in other ways (`citext`) are told apart
/// by the database.
pub fn batch_key<'a>(
    route: &'a ResolvedRoute,
    values: &'a [Cell],
    topic: &'a str,
) -> impl Iterator<Item = KeyPart<'a>> + 'a {
    static NULL: Cell = Cell::Null;
    route.key.iter().map(move |&j| {
        let v = values.get(j).unwrap_or(&NULL);
        match (route.columns.get(j), v) {
            (Some(c), _) if c.source == Source::Topic && carry(c) == Carry::Shared => {
                KeyPart::Topic(topic)
            }
            (Some(c), Cell::Text(s)) if c.kind == ColumnKind::Numeric => {
                KeyPart::Number(trim_zeros(s))
            }
            _ => KeyPart::Cell(v),
        }
    })
}

fn trim_zeros(s: &str) -> &str {
    if s.contains(['e', 'E']) || !s.contains('.') {
        return s;
    }
    s.trim_end_matches('0').trim_end_matches('.')
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_json_array_becomes_postgresql_array_text() {
        let v: Value = serde_json::json!([1, [2, 3], null, "a \"b\" \\ c", "x,y", {"k": 1}, true]);
        assert_eq!(
            array_literal(&v),
            r#"{"1",{"2","3"},NULL,"a \"b\" \\ c","x,y","{\"k\":1}","true"}"#
        );
        assert_eq!(array_literal(&serde_json::json!([])), "{}");
    }

    use super::*;
    use leasehold_config::{OnConflict, RouteSpec};
    use leasehold_decode::Decoder;

    #[test]
    fn an_integer_literal_converts_as_its_text_does() {
        let numbers = [
            "0",
            "-0",
            "1",
            "-1",
            "32767",
            "32768",
            "-32768",
            "-32769",
            "2147483647",
            "2147483648",
            "-2147483648",
            "-2147483649",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "18446744073709551615",
            "1.0",
            "1.5",
            "-2.0",
            "1e3",
            "-1E3",
            "1e20",
            "0.0",
            "-0.0",
        ];
        for kind in [ColumnKind::Int2, ColumnKind::Int4, ColumnKind::Int8] {
            let c = col("n", Source::JsonPath(Vec::new()), kind, false);
            let t = int_type(kind).expect("an integer column");
            for text in numbers {
                let v: Value = serde_json::from_str(text).expect("a JSON number");
                let Value::Number(n) = &v else {
                    panic!("{text} is not a number")
                };
                // What the conversion was before integer literals were taken as values.
                let by_text = integer(&Scalar::Num(n.to_string()), t);
                assert_eq!(
                    convert(&c, Val::Json(&v)),
                    by_text,
                    "{text} into {}",
                    t.name
                );
            }
        }
        // Only integer columns take them so: a number into text or numeric is its digits.
        for kind in [ColumnKind::Text, ColumnKind::Numeric] {
            let c = col("n", Source::JsonPath(Vec::new()), kind, false);
            let v = serde_json::json!(42);
            assert_eq!(convert(&c, Val::Json(&v)), Ok(Cell::Text("42".into())));
        }
    }

    fn col(name: &str, source: Source, kind: ColumnKind, not_null: bool) -> ResolvedColumn {
        ResolvedColumn {
            name: name.into(),
            quoted: format!("\"{name}\""),
            source,
            sql_type: "text".into(),
            kind,
            not_null,
            has_default: false,
            collation: None,
        }
    }

    fn route(columns: Vec<ResolvedColumn>) -> ResolvedRoute {
        let spec = RouteSpec {
            name: "r".into(),
            topics: vec!["eq/+/d".into()],
            table: "t".into(),
            key: vec![columns[0].name.clone()],
            on_conflict: OnConflict::Nothing,
            columns: columns
                .iter()
                .map(|c| (c.name.clone(), c.source.clone()))
                .collect(),
        };
        ResolvedRoute::new(spec, "public".into(), "t".into(), columns)
    }

    fn parse(body: &str) -> Parsed {
        Decoder::new("devices/{device_id}/#", 1 << 16)
            .parse("eq/7/d", body.as_bytes())
            .expect("a JSON object")
    }

    #[test]
    fn the_last_route_moves_the_device_id_into_every_column_that_reads_it() {
        let r = route(vec![
            col("a", Source::DeviceId, ColumnKind::Text, true),
            col("t", Source::Topic, ColumnKind::Text, false),
            col("b", Source::DeviceId, ColumnKind::Text, false),
        ]);
        let body = r#"{"device_id":"d1"}"#;
        let copied = super::row(&r, &Plan::of(&r), &parse(body), cx()).expect("a row");
        let mut parsed = parse(body);
        let moved = last_row(&r, &Plan::of(&r), &mut parsed, cx()).expect("a row");
        assert_eq!(moved, copied);
        assert_eq!(moved[0], Cell::Text("d1".into()));
        assert_eq!(moved[2], Cell::Text("d1".into()));
        assert_eq!(parsed.device_id, None, "moved, not copied");
    }

    fn cx() -> Context<'static> {
        Context {
            topic: "eq/7/d",
            received_at: DateTime::from_timestamp(1_700_000_000, 0).expect("valid"),
            written_by: "node-a",
            lease_epoch: 3,
            pkid: 1,
            dup: false,
            content_hash: None,
        }
    }

    /// A value as the text PostgreSQL reads for it.
    fn text(v: Cell) -> Option<String> {
        match v {
            Cell::Null => None,
            Cell::Text(s) => Some(s),
            Cell::Int(n) => Some(n.to_string()),
            Cell::Bool(b) => Some(b.to_string()),
            Cell::Time(t) => Some(rfc3339(t)),
        }
    }

    fn row(
        route: &ResolvedRoute,
        parsed: &Parsed,
        cx: Context<'_>,
    ) -> Result<Vec<Option<String>>, MappingError> {
        let plan = Plan::with(route, false);
        row_with(route, &plan, parsed, None, cx).map(|v| v.into_iter().map(text).collect())
    }

    fn path(p: &[&str]) -> Source {
        Source::JsonPath(
            p.iter()
                .map(|s| match s.parse::<usize>() {
                    Ok(i) => PathStep::Index(i),
                    Err(_) => PathStep::Key(s.to_string()),
                })
                .collect(),
        )
    }

    fn one(kind: ColumnKind, body: &str) -> Result<Option<String>, String> {
        let r = route(vec![
            col("id", Source::TopicSegment(1), ColumnKind::Text, true),
            col("x", path(&["x"]), kind, false),
        ]);
        row(&r, &parse(body), cx())
            .map(|mut v| v.remove(1))
            .map_err(|e| e.reason)
    }

    #[test]
    fn topics_match_filters_with_wildcards_and_unmatched_go_to_the_default_route() {
        let r = route(vec![col("id", Source::Topic, ColumnKind::Text, true)]);
        let mut other = r.clone();
        other.spec.topics = vec!["eq/#".into()];
        let specs = [r, other];
        assert_eq!(matching(&specs, "eq/7/d"), vec![0, 1]);
        assert_eq!(matching(&specs, "eq/7/x"), vec![1]);
        assert_eq!(matching(&specs, "eq"), vec![1]);
        assert!(matching(&specs, "devices/7/telemetry").is_empty());
    }

    #[test]
    fn every_source_is_read() {
        let r = route(vec![
            col("seg", Source::TopicSegment(1), ColumnKind::Text, true),
            col("topic", Source::Topic, ColumnKind::Text, false),
            col(
                "nested",
                path(&["a", "b", "0", "c"]),
                ColumnKind::Int4,
                false,
            ),
            col("missing", path(&["nope", "x"]), ColumnKind::Int4, false),
            col("obj", path(&["a"]), ColumnKind::Jsonb, false),
            col("ts", Source::Timestamp, ColumnKind::Timestamptz, false),
            col("rcv", Source::ReceivedAt, ColumnKind::Timestamptz, false),
            col("by", Source::WrittenBy, ColumnKind::Text, false),
            col("epoch", Source::LeaseEpoch, ColumnKind::Int8, false),
            col("dev", Source::DeviceId, ColumnKind::Text, false),
            col(
                "lit",
                Source::Literal("MQTT".into()),
                ColumnKind::Text,
                false,
            ),
            col("seg9", Source::TopicSegment(9), ColumnKind::Text, false),
        ]);
        let v = row(
            &r,
            &parse(r#"{"ts":1700000001500,"device_id":"d-1","a":{"b":[{"c":42}]}}"#),
            cx(),
        )
        .expect("a row");
        let want: Vec<Option<&str>> = vec![
            Some("7"),
            Some("eq/7/d"),
            Some("42"),
            None,
            Some(r#"{"b":[{"c":42}]}"#),
            Some("2023-11-14T22:13:21.500Z"),
            Some("2023-11-14T22:13:20Z"),
            Some("node-a"),
            Some("3"),
            Some("d-1"),
            Some("MQTT"),
            None,
        ];
        assert_eq!(
            v,
            want.iter().map(|s| s.map(String::from)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_payload_goes_into_text_and_json_columns_as_received() {
        let body = r#"{"b": 1,  "a":[2]}"#;
        for kind in [ColumnKind::Json, ColumnKind::Jsonb, ColumnKind::Text] {
            let r = route(vec![
                col("id", Source::TopicSegment(1), ColumnKind::Text, true),
                col("p", Source::Payload, kind, true),
            ]);
            assert_eq!(
                row(&r, &parse(body), cx()).map(|v| v[1].clone()),
                Ok(Some(body.to_string()))
            );
        }
        let int = route(vec![col("p", Source::Payload, ColumnKind::Int4, true)]);
        assert!(row(&int, &parse(body), cx())
            .unwrap_err()
            .reason
            .contains("an object is not an integer"));
    }

    #[test]
    fn integers_are_checked_against_their_column() {
        assert_eq!(
            one(ColumnKind::Int2, r#"{"x":32767}"#),
            Ok(Some("32767".into()))
        );
        assert!(one(ColumnKind::Int2, r#"{"x":32768}"#)
            .unwrap_err()
            .contains("out of range for smallint"));
        assert_eq!(
            one(ColumnKind::Int4, r#"{"x":"12"}"#),
            Ok(Some("12".into()))
        );
        assert_eq!(one(ColumnKind::Int8, r#"{"x":5.0}"#), Ok(Some("5".into())));
        assert!(one(ColumnKind::Int4, r#"{"x":1.5}"#).is_err());
        assert!(one(ColumnKind::Int4, r#"{"x":true}"#).is_err());
        assert!(one(ColumnKind::Int8, r#"{"x":1e30}"#).is_err());
        // Exactly, not through a float.
        assert_eq!(
            one(ColumnKind::Int8, r#"{"x":"9007199254740993.0"}"#),
            Ok(Some("9007199254740993".into()))
        );
        assert_eq!(
            one(ColumnKind::Int8, r#"{"x":"-9223372036854775808"}"#),
            Ok(Some("-9223372036854775808".into()))
        );
        assert!(one(ColumnKind::Int8, r#"{"x":"9223372036854775808"}"#)
            .unwrap_err()
            .contains("out of range for bigint"));
        assert!(one(ColumnKind::Int8, r#"{"x":"1e-400"}"#)
            .unwrap_err()
            .contains("is not an integer"));
        assert!(one(ColumnKind::Int8, r#"{"x":"1e999999999999999999999"}"#)
            .unwrap_err()
            .contains("out of range"));
        assert_eq!(
            one(ColumnKind::Int2, r#"{"x":"12.5e1"}"#),
            Ok(Some("125".into()))
        );
        assert_eq!(one(ColumnKind::Int2, r#"{"x":"-0"}"#), Ok(Some("0".into())));
        assert_eq!(
            one(ColumnKind::Int2, r#"{"x":"0.0e5"}"#),
            Ok(Some("0".into()))
        );
        assert!(one(ColumnKind::Int2, r#"{"x":"1.5e0"}"#).is_err());
        assert!(one(ColumnKind::Int2, r#"{"x":"NaN"}"#).is_err());
    }

    #[test]
    fn times_before_year_one_are_written_as_postgresql_reads_them() {
        assert_eq!(
            one(
                ColumnKind::Timestamp,
                r#"{"x":"0000-01-01T00:30:00+01:00"}"#
            ),
            Ok(Some("0002-12-31 23:30:00.000000 BC".into()))
        );
        assert_eq!(
            one(ColumnKind::Date, r#"{"x":"0000-06-01"}"#),
            Ok(Some("0001-06-01 BC".into()))
        );
        assert_eq!(
            one(ColumnKind::Date, r#"{"x":"0001-01-01T00:00:00Z"}"#),
            Ok(Some("0001-01-01".into()))
        );
    }

    #[test]
    fn numbers_bools_times_uuids_and_json_convert_or_say_why_not() {
        assert_eq!(
            one(ColumnKind::Numeric, r#"{"x":"1.50"}"#),
            Ok(Some("1.50".into()))
        );
        assert_eq!(
            one(ColumnKind::Numeric, r#"{"x":2.5e3}"#),
            Ok(Some("2500.0".into()))
        );
        assert!(one(ColumnKind::Numeric, r#"{"x":"abc"}"#)
            .unwrap_err()
            .contains("is not a number"));
        assert!(one(ColumnKind::Float4, r#"{"x":1e300}"#).is_err());
        assert_eq!(
            one(ColumnKind::Float8, r#"{"x":"NaN"}"#),
            Ok(Some("NaN".into()))
        );
        assert_eq!(
            one(ColumnKind::Bool, r#"{"x":true}"#),
            Ok(Some("true".into()))
        );
        assert!(one(ColumnKind::Bool, r#"{"x":1}"#).is_err());
        assert_eq!(
            one(
                ColumnKind::Timestamptz,
                r#"{"x":"2026-01-02T03:04:05+02:00"}"#
            ),
            Ok(Some("2026-01-02T01:04:05Z".into()))
        );
        assert_eq!(
            one(ColumnKind::Timestamp, r#"{"x":1700000000}"#),
            Ok(Some("2023-11-14 22:13:20.000000".into()))
        );
        assert_eq!(
            one(ColumnKind::Date, r#"{"x":"2026-03-04"}"#),
            Ok(Some("2026-03-04".into()))
        );
        assert!(one(ColumnKind::Timestamptz, r#"{"x":"yesterday"}"#).is_err());
        assert_eq!(
            one(
                ColumnKind::Uuid,
                r#"{"x":"A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"}"#
            ),
            Ok(Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".into()))
        );
        assert!(one(ColumnKind::Uuid, r#"{"x":"nope"}"#).is_err());
        assert_eq!(
            one(ColumnKind::Jsonb, r#"{"x":"s"}"#),
            Ok(Some("\"s\"".into()))
        );
        assert_eq!(
            one(ColumnKind::Jsonb, r#"{"x":[1,2]}"#),
            Ok(Some("[1,2]".into()))
        );
        assert_eq!(
            one(ColumnKind::Text, r#"{"x":{"a":1}}"#),
            Ok(Some(r#"{"a":1}"#.into()))
        );
        assert_eq!(one(ColumnKind::Text, r#"{"x":null}"#), Ok(None));
    }

    #[test]
    fn a_null_where_the_column_cannot_take_one_names_the_column() {
        let r = route(vec![
            col("id", Source::TopicSegment(1), ColumnKind::Text, true),
            col("v", path(&["v"]), ColumnKind::Int4, true),
        ]);
        let e = row(&r, &parse("{}"), cx()).unwrap_err();
        assert_eq!(e.column, "v");
        assert!(e.reason.contains("NOT NULL"), "{}", e.reason);
        let mut with_default = r.clone();
        with_default.columns[1].has_default = true;
        assert_eq!(
            row(&with_default, &parse("{}"), cx()),
            Ok(vec![Some("7".into()), None])
        );
        let key_missing = route(vec![col("k", path(&["k"]), ColumnKind::Text, false)]);
        assert!(row(&key_missing, &parse("{}"), cx())
            .unwrap_err()
            .reason
            .contains("key"));
    }

    #[test]
    fn a_bad_timestamp_fails_only_a_route_that_reads_it() {
        let body = r#"{"ts":"not a time","v":1}"#;
        let reads = route(vec![col(
            "t",
            Source::Timestamp,
            ColumnKind::Timestamptz,
            true,
        )]);
        assert!(row(&reads, &parse(body), cx()).is_err());
        let ignores = route(vec![col("v", path(&["v"]), ColumnKind::Int4, true)]);
        assert!(row(&ignores, &parse(body), cx()).is_ok());
    }

    #[test]
    fn numeric_keys_equal_in_value_are_one_key_in_a_batch() {
        let mut r = route(vec![col("k", path(&["k"]), ColumnKind::Numeric, true)]);
        r.columns[0].kind = ColumnKind::Numeric;
        let v = |s: &str| [Cell::Text(s.into())];
        let (a, b, c, d) = (v("1.50"), v("1.5"), v("10"), v("1"));
        let key = |x| batch_key(&r, x, "t").collect::<Vec<_>>();
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&c), key(&d));
    }
}
