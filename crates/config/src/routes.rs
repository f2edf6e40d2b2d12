//! `[[routes]]`: the tables of the config file that send the messages of some topic filters into
//! a user's own table (docs/routes.md). Routes come only from the file: a list of tables has no
//! form as one environment variable or flag.
//!
//! Reading is in two steps, like the settings: [`parse`] turns each raw table into a
//! [`RouteSpec`] (every source parsed, file order of the columns kept), then [`validate`] applies
//! the rules between fields and between routes. Every error is one line naming the route (and
//! the column): `routes[1] "equipment": column "x": unknown source "$$a"; sources are ...`.
//! Whether the table and its columns fit is only known to the database (`leasehold routes`).

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;
use toml::{Spanned, Value};

use crate::{validate_filter, ConfigError};

/// One `[[routes]]` entry, validated (names, filters, sources parsed). File order is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// `[A-Za-z0-9_-]+`, unique, not `default` (the name of the route into `telemetry`).
    pub name: String,
    /// MQTT filters, validated like `MQTT_TOPICS`, at least one.
    pub topics: Vec<String>,
    /// As written: `t`, `s.t`, `"My T"`, `s."T"` (resolved by the database, search_path included).
    pub table: String,
    /// Column names; each is a mapped column.
    pub key: Vec<String>,
    pub on_conflict: OnConflict,
    /// `column = source`, in file order, never empty.
    pub columns: Vec<(String, Source)>,
}

crate::named! {
    /// What a row whose key already exists does.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub enum OnConflict {
        /// First write wins; different values under an existing key are a conflict.
        #[default]
        Nothing = "nothing",
        /// Last write wins: the row takes the newest message's values.
        Update = "update",
    }
}

/// Where a column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `topic[1]`: one level of the topic, 0-based.
    TopicSegment(usize),
    /// `topic`
    Topic,
    /// `payload`: the whole JSON object.
    Payload,
    /// `$.a.b`, `$.a[0]`, `$.a[0].b`, `$["key with.dots"]`
    JsonPath(Vec<PathStep>),
    /// `timestamp`: the reading's timestamp (payload `timestamp`/`ts`, or receipt time).
    Timestamp,
    /// `received_at` (database clock)
    ReceivedAt,
    /// `written_by` (`INSTANCE_ID`)
    WrittenBy,
    /// `lease_epoch`
    LeaseEpoch,
    /// `device_id` (`DEVICE_TOPIC_PATTERN` or the payload's `device_id`)
    DeviceId,
    /// `'MQTT'` (`''` inside for a quote)
    Literal(String),
    /// `content_hash`: the idempotency key of a reading without its own timestamp (hash of the
    /// topic and the bytes; NULL when the payload has a timestamp). With `mqtt_pkid` mapped too,
    /// a broker's redelivery of such a reading is recognised and stored once.
    ContentHash,
    /// `mqtt_pkid`: the MQTT packet id the message was delivered with.
    PacketId,
    /// `possible_duplicate`: delivered with the DUP flag and without its own timestamp (a
    /// redelivery whose first copy could not be found is kept, and marked).
    PossibleDuplicate,
}

/// One step of a JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathStep {
    Key(String),
    Index(usize),
}

/// The forms a source takes, for error messages.
pub const SOURCES_HELP: &str = "sources are topic, topic[N], payload, $.json.path, timestamp, received_at, written_by, lease_epoch, device_id, content_hash, mqtt_pkid, possible_duplicate or a 'literal'";

impl Source {
    /// Reads a source as written in `[routes.columns]`.
    pub fn parse(s: &str) -> Result<Source, String> {
        let unknown = || format!("unknown source {s:?}; {SOURCES_HELP}");
        Ok(match s {
            "topic" => Source::Topic,
            "payload" => Source::Payload,
            "timestamp" => Source::Timestamp,
            "received_at" => Source::ReceivedAt,
            "content_hash" => Source::ContentHash,
            "mqtt_pkid" => Source::PacketId,
            "possible_duplicate" => Source::PossibleDuplicate,
            "written_by" => Source::WrittenBy,
            "lease_epoch" => Source::LeaseEpoch,
            "device_id" => Source::DeviceId,
            _ if s.starts_with('\'') => Source::Literal(literal(s)?),
            _ if s.starts_with('$') && !s[1..].starts_with(['.', '[']) && s.len() > 1 => {
                return Err(unknown())
            }
            _ if s.starts_with('$') => Source::JsonPath(json_path(s).map_err(|e| {
                format!("bad JSON path {s:?}: {e}; a path is $.a.b, $.a[0] or $[\"a.b\"]")
            })?),
            _ => match s.strip_prefix("topic[").and_then(|r| r.strip_suffix(']')) {
                Some(n) => Source::TopicSegment(n.parse().map_err(|_| {
                    format!("bad topic segment {s:?}: expected topic[N], N a level number from 0")
                })?),
                None => return Err(unknown()),
            },
        })
    }
}

impl std::fmt::Display for Source {
    /// The source as it is written in the file.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::TopicSegment(n) => write!(f, "topic[{n}]"),
            Source::Topic => f.write_str("topic"),
            Source::Payload => f.write_str("payload"),
            Source::JsonPath(steps) => {
                f.write_str("$")?;
                for step in steps {
                    match step {
                        PathStep::Index(i) => write!(f, "[{i}]")?,
                        PathStep::Key(k) if is_plain_key(k) => write!(f, ".{k}")?,
                        PathStep::Key(k) => write!(f, "[{k:?}]")?,
                    }
                }
                Ok(())
            }
            Source::Timestamp => f.write_str("timestamp"),
            Source::ReceivedAt => f.write_str("received_at"),
            Source::ContentHash => f.write_str("content_hash"),
            Source::PacketId => f.write_str("mqtt_pkid"),
            Source::PossibleDuplicate => f.write_str("possible_duplicate"),
            Source::WrittenBy => f.write_str("written_by"),
            Source::LeaseEpoch => f.write_str("lease_epoch"),
            Source::DeviceId => f.write_str("device_id"),
            Source::Literal(v) => write!(f, "'{}'", v.replace('\'', "''")),
        }
    }
}

/// A key written after a dot: anything but the path's own punctuation.
fn is_plain_key(k: &str) -> bool {
    !k.is_empty() && !k.contains(['.', '[', ']', '"', '\'', '$', ' '])
}

/// `'text'`, a quote inside doubled.
fn literal(s: &str) -> Result<String, String> {
    let bad =
        || format!("bad literal {s}: write it in single quotes, a quote inside as '' ('it''s')");
    let inner = s
        .strip_prefix('\'')
        .and_then(|r| r.strip_suffix('\''))
        .filter(|_| s.len() >= 2)
        .ok_or_else(bad)?;
    if inner.replace("''", "").contains('\'') {
        return Err(bad());
    }
    Ok(inner.replace("''", "'"))
}

/// `$` then `.key`, `[N]` or `["key"]` steps, at least one.
fn json_path(s: &str) -> Result<Vec<PathStep>, String> {
    let mut rest = s.strip_prefix('$').ok_or("it must start with $")?;
    let mut steps = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let key = &r[..end];
            if !is_plain_key(key) {
                return Err(format!("bad key {key:?} after a dot (quote it: [\"...\"])"));
            }
            steps.push(PathStep::Key(key.to_string()));
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix("[\"") {
            let mut key = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c @ ('"' | '\\'))) => key.push(c),
                        _ => return Err("only \\\" and \\\\ are escapes in a quoted key".into()),
                    },
                    Some((_, c)) => key.push(c),
                    None => return Err("unterminated quoted key".into()),
                }
            };
            rest = r[end + 1..]
                .strip_prefix(']')
                .ok_or("a quoted key must be closed with \"]")?;
            steps.push(PathStep::Key(key));
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or("unclosed [")?;
            let index = r[..end]
                .parse()
                .map_err(|_| format!("bad array index {:?}", &r[..end]))?;
            steps.push(PathStep::Index(index));
            rest = &r[end + 1..];
        } else {
            return Err(format!("unexpected {rest:?}"));
        }
    }
    if steps.is_empty() {
        return Err("it has no step (for the whole payload use payload)".into());
    }
    Ok(steps)
}

/// The raw `[[routes]]` of a config file, as read from it.
#[derive(Debug, Clone)]
pub(crate) struct RawRoutes {
    pub routes: Vec<RawRoute>,
}

/// One `[[routes]]` table: its keys, and its columns in file order.
#[derive(Debug, Clone)]
pub(crate) struct RawRoute {
    pub fields: toml::Table,
    pub columns: Vec<(String, Value)>,
}

/// Only what file order needs: each route's columns with their place in the file.
#[derive(Deserialize)]
struct Ordered {
    #[serde(default)]
    routes: Vec<OrderedRoute>,
}

#[derive(Deserialize)]
struct OrderedRoute {
    #[serde(default)]
    columns: BTreeMap<String, Spanned<Value>>,
}

/// Takes `routes` out of a config file's table. `text` is the file, read again for the order of
/// the columns (the table keeps its keys sorted).
pub(crate) fn take_raw(
    table: &mut toml::Table,
    text: &str,
    path: &str,
) -> Result<Option<RawRoutes>, ConfigError> {
    let Some(value) = table.remove("routes") else {
        return Ok(None);
    };
    let err = |message: String| ConfigError::Route {
        route: "routes".into(),
        column: None,
        message,
    };
    let Value::Array(items) = value else {
        return Err(err(format!(
            "must be a list of tables, written [[routes]] (in {path})"
        )));
    };
    let ordered: Ordered = toml::from_str(text).unwrap_or(Ordered { routes: Vec::new() });
    let mut routes = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let Value::Table(mut fields) = item else {
            return Err(err(format!(
                "must be a list of tables, written [[routes]] (in {path})"
            )));
        };
        let mut columns: Vec<(String, Value)> = match fields.remove("columns") {
            Some(Value::Table(t)) => t.into_iter().collect(),
            Some(_) => {
                return Err(ConfigError::Route {
                    route: route_label(i, &fields),
                    column: None,
                    message: "columns must be a table: [routes.columns] then column = \"source\""
                        .into(),
                })
            }
            None => Vec::new(),
        };
        if let Some(o) = ordered.routes.get(i) {
            let place = |name: &str| o.columns.get(name).map_or(usize::MAX, |v| v.span().start);
            columns.sort_by_key(|(name, _)| place(name));
        }
        routes.push(RawRoute { fields, columns });
    }
    Ok(Some(RawRoutes { routes }))
}

/// `routes[N] "name"` (1-based, as the tables are counted in the file).
fn route_label(i: usize, fields: &toml::Table) -> String {
    match fields.get("name").and_then(Value::as_str) {
        Some(n) => format!("routes[{}] {n:?}", i + 1),
        None => format!("routes[{}]", i + 1),
    }
}

/// The keys a `[[routes]]` table may have.
const ROUTE_KEYS: &[&str] = &["name", "topics", "table", "key", "on_conflict", "columns"];

/// Parses every raw route: types, sources, names. Rules between fields and routes are in
/// [`validate`].
pub(crate) fn parse(raw: &RawRoutes) -> Result<Vec<RouteSpec>, ConfigError> {
    raw.routes
        .iter()
        .enumerate()
        .map(|(i, r)| parse_one(i, r))
        .collect()
}

fn parse_one(i: usize, raw: &RawRoute) -> Result<RouteSpec, ConfigError> {
    let route = route_label(i, &raw.fields);
    let err = |column: Option<&str>, message: String| ConfigError::Route {
        route: route.clone(),
        column: column.map(str::to_string),
        message,
    };
    if let Some(k) = raw
        .fields
        .keys()
        .find(|k| !ROUTE_KEYS.contains(&k.as_str()))
    {
        return Err(err(
            None,
            format!("unknown key {k:?}; a route has {}", ROUTE_KEYS.join(", ")),
        ));
    }
    let string = |key: &str| -> Result<Option<String>, ConfigError> {
        match raw.fields.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
            Some(_) => Err(err(None, format!("{key} must be a string"))),
        }
    };
    let list = |key: &str, example: &str| -> Result<Vec<String>, ConfigError> {
        let bad = || {
            err(
                None,
                format!("{key} must be a list of strings, e.g. {key} = {example}"),
            )
        };
        match raw.fields.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(|s| s.trim().to_string()).ok_or_else(bad))
                .collect(),
            Some(_) => Err(bad()),
        }
    };
    let name = string("name")?.filter(|n| !n.is_empty()).ok_or_else(|| {
        err(
            None,
            "name is required (used in metrics, logs and dead letters)".into(),
        )
    })?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(err(
            None,
            "name may hold only letters A-Z a-z, digits, _ and -".into(),
        ));
    }
    if name == "default" {
        return Err(err(
            None,
            "name \"default\" is taken by the route into telemetry; choose another".into(),
        ));
    }
    let on_conflict = match string("on_conflict")?.as_deref() {
        None | Some("nothing") => OnConflict::Nothing,
        Some("update") => OnConflict::Update,
        Some(other) => {
            return Err(err(
                None,
                format!("on_conflict {other:?} must be \"nothing\" (first write wins) or \"update\" (last write wins)"),
            ))
        }
    };
    let mut columns = Vec::new();
    for (column, v) in &raw.columns {
        let Value::String(s) = v else {
            return Err(err(
                Some(column),
                format!("the source must be a string; {SOURCES_HELP}"),
            ));
        };
        let source = Source::parse(s.trim()).map_err(|e| err(Some(column), e))?;
        columns.push((column.clone(), source));
    }
    Ok(RouteSpec {
        topics: list("topics", "[\"equipment/+/data\"]")?,
        table: string("table")?.unwrap_or_default(),
        key: list("key", "[\"device\", \"ts\"]")?,
        name,
        on_conflict,
        columns,
    })
}

/// The rules between the fields of a route, and between routes.
pub(crate) fn validate(routes: &[RouteSpec]) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for (i, r) in routes.iter().enumerate() {
        let route = format!("routes[{}] {:?}", i + 1, r.name);
        let err = |column: Option<&str>, message: String| ConfigError::Route {
            route: route.clone(),
            column: column.map(str::to_string),
            message,
        };
        let refuse = |failed: bool, message: &str| match failed {
            true => Err(err(None, message.into())),
            false => Ok(()),
        };
        refuse(
            !names.insert(r.name.as_str()),
            "the name is used by an earlier route; names must be unique",
        )?;
        refuse(
            r.topics.is_empty(),
            "topics is required: at least one MQTT filter, e.g. topics = [\"equipment/+/data\"]",
        )?;
        for t in &r.topics {
            validate_filter(t).map_err(|e| err(None, format!("topic filter {t:?}: {e}")))?;
        }
        refuse(
            r.table.is_empty(),
            "table is required: the table to write, optionally schema-qualified",
        )?;
        refuse(
            r.columns.is_empty(),
            "no columns: add [routes.columns] with column = \"source\" lines",
        )?;
        refuse(
            r.key.is_empty(),
            "key is required: the columns of a unique index or primary key of the table",
        )?;
        let mut seen = HashSet::new();
        for k in &r.key {
            if !seen.insert(k) {
                return Err(err(Some(k), "named twice in key".into()));
            }
            if !r.columns.iter().any(|(c, _)| c == k) {
                return Err(err(
                    Some(k),
                    "is in key but not mapped: add it to [routes.columns]".into(),
                ));
            }
        }
        for (column, source) in &r.columns {
            let Source::TopicSegment(n) = source else {
                continue;
            };
            // A level no topic of a filter can have would be NULL in every row.
            if let Some(f) = r.topics.iter().find(|f| {
                let levels: Vec<&str> = f.split('/').collect();
                levels.last() != Some(&"#") && *n >= levels.len()
            }) {
                return Err(err(
                    Some(column),
                    format!(
                        "topic[{n}] is past the last level of filter {f:?} (levels 0 to {})",
                        f.split('/').count() - 1
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_form_parses_and_shows_as_written() {
        let cases = [
            ("topic", Source::Topic),
            ("topic[0]", Source::TopicSegment(0)),
            ("topic[12]", Source::TopicSegment(12)),
            ("payload", Source::Payload),
            ("timestamp", Source::Timestamp),
            ("received_at", Source::ReceivedAt),
            ("content_hash", Source::ContentHash),
            ("mqtt_pkid", Source::PacketId),
            ("possible_duplicate", Source::PossibleDuplicate),
            ("written_by", Source::WrittenBy),
            ("lease_epoch", Source::LeaseEpoch),
            ("device_id", Source::DeviceId),
            ("'MQTT'", Source::Literal("MQTT".into())),
            ("''", Source::Literal(String::new())),
            ("'it''s'", Source::Literal("it's".into())),
            (
                "$.a.b",
                Source::JsonPath(vec![PathStep::Key("a".into()), PathStep::Key("b".into())]),
            ),
            (
                "$.a[0]",
                Source::JsonPath(vec![PathStep::Key("a".into()), PathStep::Index(0)]),
            ),
            (
                "$.a[0].b",
                Source::JsonPath(vec![
                    PathStep::Key("a".into()),
                    PathStep::Index(0),
                    PathStep::Key("b".into()),
                ]),
            ),
            (
                "$[\"key with.dots\"]",
                Source::JsonPath(vec![PathStep::Key("key with.dots".into())]),
            ),
            ("$[3]", Source::JsonPath(vec![PathStep::Index(3)])),
        ];
        for (text, want) in cases {
            let got = Source::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), text, "shown as written");
        }
        assert_eq!(
            Source::parse("$[\"q\\\"uote\"]"),
            Ok(Source::JsonPath(vec![PathStep::Key("q\"uote".into())]))
        );
    }

    #[test]
    fn bad_sources_say_what_is_accepted() {
        for (bad, says) in [
            ("$$a", "unknown source"),
            ("$a", "unknown source"),
            ("$", "no step"),
            ("$.", "bad key"),
            ("$.a[x]", "array index"),
            ("$.a[0", "unclosed"),
            ("$[\"a", "unterminated"),
            ("topic[x]", "topic[N]"),
            ("topic[-1]", "topic[N]"),
            ("topics", "unknown source"),
            ("Payload", "unknown source"),
            ("'open", "single quotes"),
            ("'a'b'", "single quotes"),
            ("'", "single quotes"),
            ("", "unknown source"),
        ] {
            let e = Source::parse(bad).expect_err(bad);
            assert!(e.contains(says) && !e.contains('\n'), "{bad:?}: {e}");
        }
        let e = Source::parse("nope").expect_err("unknown");
        assert!(e.contains(SOURCES_HELP), "{e}");
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;
    use crate::{Config, Sources};

    const EQUIPMENT: &str = r#"
[[routes]]
name = "equipment"
topics = ["equipamentos/+/dados"]
table = "equipamentos_dados"
key = ["equipamento_id", "timestamp_dados"]
on_conflict = "update"

[routes.columns]
timestamp_dados = "timestamp"
equipamento_id  = "topic[1]"
dados           = "payload"
voltage         = "$.readings.voltage"
fonte           = "'MQTT'"
processed_by    = "written_by"
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let path = crate::tests::file(text);
        Config::load(&Sources::gather(Some(&path), Vec::new(), Vec::new())?)
    }

    /// The message of a refused file, checked to be one line naming `route` (and `column`).
    fn refused(name: &str, text: &str, route: &str, column: Option<&str>, says: &str) {
        let e = load(text).expect_err(name);
        let shown = e.to_string();
        match &e {
            ConfigError::Route {
                route: r,
                column: c,
                ..
            } => {
                assert_eq!(r, route, "{name}: {shown}");
                assert_eq!(c.as_deref(), column, "{name}: {shown}");
            }
            other => panic!("{name}: not a route error: {other:?}"),
        }
        assert!(
            shown.contains(says) && !shown.contains('\n'),
            "{name}: {shown}"
        );
        if let Some(c) = column {
            assert!(shown.contains(&format!("column {c:?}")), "{shown}");
        }
    }

    #[test]
    fn a_route_reads_into_its_spec_in_file_order() {
        let c = load(EQUIPMENT).expect("load");
        assert_eq!(
            c.routes,
            vec![RouteSpec {
                name: "equipment".into(),
                topics: vec!["equipamentos/+/dados".into()],
                table: "equipamentos_dados".into(),
                key: vec!["equipamento_id".into(), "timestamp_dados".into()],
                on_conflict: OnConflict::Update,
                columns: vec![
                    ("timestamp_dados".into(), Source::Timestamp),
                    ("equipamento_id".into(), Source::TopicSegment(1)),
                    ("dados".into(), Source::Payload),
                    (
                        "voltage".into(),
                        Source::JsonPath(vec![
                            PathStep::Key("readings".into()),
                            PathStep::Key("voltage".into())
                        ])
                    ),
                    ("fonte".into(), Source::Literal("MQTT".into())),
                    ("processed_by".into(), Source::WrittenBy),
                ],
            }]
        );
        // Without routes: only the default route.
        assert_eq!(load("lease_ttl = \"10s\"\n").expect("load").routes, vec![]);
    }

    #[test]
    fn several_routes_keep_their_order_and_defaults() {
        let text = r#"
[[routes]]
name = "b-2"
topics = ["b/#", "c/+"]
table = 's."My T"'
key = ["Id"]
columns = { "Id" = "topic[0]", z = "topic", a = "device_id" }

[[routes]]
name = "a_1"
topics = ["a/+"]
table = "a"
key = ["k"]
[routes.columns]
k = "lease_epoch"
r = "received_at"
"#;
        let c = load(text).expect("load");
        let names: Vec<&str> = c.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["b-2", "a_1"]);
        assert_eq!(c.routes[0].table, "s.\"My T\"");
        assert_eq!(c.routes[0].on_conflict, OnConflict::Nothing);
        let cols: Vec<&str> = c.routes[0]
            .columns
            .iter()
            .map(|(c, _)| c.as_str())
            .collect();
        assert_eq!(cols, ["Id", "z", "a"]);
        assert_eq!(c.routes[1].columns[1], ("r".into(), Source::ReceivedAt));
    }

    #[test]
    fn every_mistake_is_one_line_naming_route_and_column() {
        let with = |from: &str, to: &str| {
            assert!(EQUIPMENT.contains(from), "{from}");
            EQUIPMENT.replacen(from, to, 1)
        };
        let r = "routes[1] \"equipment\"";
        refused(
            "bad-source",
            &with("\"$.readings.voltage\"", "\"$$a\""),
            r,
            Some("voltage"),
            "unknown source \"$$a\"; sources are",
        );
        refused(
            "segment",
            &with("\"topic[1]\"", "\"topic[x]\""),
            r,
            Some("equipamento_id"),
            "topic[N]",
        );
        refused(
            "segment-past-filter",
            &with("\"topic[1]\"", "\"topic[3]\""),
            r,
            Some("equipamento_id"),
            "past the last level",
        );
        refused(
            "not-a-string",
            &with("\"'MQTT'\"", "5"),
            r,
            Some("fonte"),
            "must be a string",
        );
        refused(
            "empty-topics",
            &with("[\"equipamentos/+/dados\"]", "[]"),
            r,
            None,
            "topics is required",
        );
        refused(
            "no-topics",
            &with("topics = [\"equipamentos/+/dados\"]", ""),
            r,
            None,
            "topics is required",
        );
        refused(
            "topics-string",
            &with("[\"equipamentos/+/dados\"]", "\"a/b\""),
            r,
            None,
            "list of strings",
        );
        refused(
            "bad-filter",
            &with("equipamentos/+/dados", "equipamentos/#/dados"),
            r,
            None,
            "topic filter \"equipamentos/#/dados\"",
        );
        refused(
            "key-unmapped",
            &with("\"timestamp_dados\"]", "\"ts\"]"),
            r,
            Some("ts"),
            "not mapped",
        );
        refused(
            "key-twice",
            &with("\"timestamp_dados\"]", "\"equipamento_id\"]"),
            r,
            Some("equipamento_id"),
            "twice",
        );
        refused(
            "no-key",
            &with("key = [", "ke = ["),
            r,
            None,
            "unknown key \"ke\"",
        );
        refused(
            "empty-key",
            &with("[\"equipamento_id\", \"timestamp_dados\"]", "[]"),
            r,
            None,
            "key is required",
        );
        refused(
            "on-conflict",
            &with("\"update\"", "\"replace\""),
            r,
            None,
            "on_conflict \"replace\"",
        );
        refused(
            "no-table",
            &with("table = \"equipamentos_dados\"", ""),
            r,
            None,
            "table is required",
        );
        let no_columns = EQUIPMENT.split("[routes.columns]").next().expect("head");
        refused("no-columns", no_columns, r, None, "no columns");
        refused(
            "empty-columns",
            &format!("{no_columns}[routes.columns]\n"),
            r,
            None,
            "no columns",
        );
        refused(
            "columns-not-a-table",
            &format!("{no_columns}columns = [\"a\"]\n"),
            r,
            None,
            "columns must be a table",
        );
        refused(
            "default-name",
            &with("\"equipment\"", "\"default\""),
            "routes[1] \"default\"",
            None,
            "taken",
        );
        refused(
            "bad-name",
            &with("\"equipment\"", "\"eq uipment\""),
            "routes[1] \"eq uipment\"",
            None,
            "letters",
        );
        refused(
            "no-name",
            &with("name = \"equipment\"", ""),
            "routes[1]",
            None,
            "name is required",
        );
        refused(
            "duplicate",
            &format!("{EQUIPMENT}{EQUIPMENT}"),
            "routes[2] \"equipment\"",
            None,
            "unique",
        );
        let e = load("routes = 5\n").expect_err("refused");
        assert!(
            matches!(e, ConfigError::Route { .. }) && e.to_string().contains("[[routes]]"),
            "{e}"
        );
    }

    #[test]
    fn routes_come_only_from_the_file() {
        let route = "name=x,topics=a,table=t";
        let s = Sources::gather(
            None,
            vec![("ROUTES".to_string(), route.to_string())],
            Vec::new(),
        )
        .expect("unknown variables are ignored");
        assert_eq!(Config::load(&s).expect("load").routes, vec![]);
        let e = Sources::gather(None, Vec::new(), vec![("routes".into(), route.into())])
            .expect_err("no flag");
        assert!(matches!(e, ConfigError::Unknown { .. }), "{e:?}");
    }
}
