//! The batch statement when named routes are configured: [`crate::batch::BATCH_SQL`] with a
//! `route` on every dead letter, plus, for each route, its insert into the operator's table and
//! the duplicate/conflict check of the rows it did not insert. Everything stays in ONE statement
//! behind the same `fence`, so a stale leader commits no row into any route's table either.
//!
//! Values arrive as text arrays (one per mapped column, converted and checked by the caller) and
//! are cast here to each column's own type: the parameter count depends only on the routes, and
//! the statement is built and prepared once per connection.

use std::fmt::Write as _;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use leasehold_config::{OnConflict, Source};

use crate::batch::BATCH_SQL;
use crate::routes::{ColumnKind, ResolvedColumn, ResolvedRoute};

/// The message a route row came from: what its dead letter would keep.
#[derive(Debug, Clone)]
pub struct RoutedMessage {
    pub topic: String,
    /// The bytes as received (a JSON object of at most `MAX_PAYLOAD_BYTES`), shared with the
    /// ingest's copy.
    pub payload: bytes::Bytes,
    pub received_at: DateTime<Utc>,
    pub pkid: i32,
    pub dup: bool,
}

/// One message's row in one named route.
#[derive(Debug, Clone)]
pub struct RouteRow {
    /// Position of the message in its batch (results are reported by it).
    pub idx: usize,
    /// Index of the route in the writer's resolved routes.
    pub route: usize,
    /// One value per mapped column, in the route's column order, as text the column's type
    /// accepts (`None`: NULL, or the column's default when it has one).
    pub values: Vec<Option<String>>,
    pub message: Arc<RoutedMessage>,
}

/// What one route's part of a committed statement did, by message position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteOutcome {
    /// Rows inserted (or, with `on_conflict = "update"`, inserted or updated).
    pub written: u64,
    /// Rows whose key was stored with the same values: skipped.
    pub duplicates: Vec<usize>,
    /// Rows whose key was stored with different values: dead-lettered.
    pub conflicts: Vec<usize>,
    /// Rows the table neither took nor holds a row for (a trigger or rule skipped them):
    /// dead-lettered.
    pub unstored: Vec<usize>,
}

/// Quotes `s` as an SQL string literal.
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Whether a column's value comes from the message (not from who wrote it or when): only these
/// decide whether a row with a stored key is a duplicate or a conflict.
pub fn from_message(source: &Source) -> bool {
    !matches!(
        source,
        Source::ReceivedAt | Source::WrittenBy | Source::LeaseEpoch
    )
}

/// The value of column `j` of row alias `a`, cast to the column's type; `default` is the
/// column's default expression, used for NULL. Text goes in uncast: an explicit cast to
/// `varchar(3)` or `char(3)` would cut a longer value silently, where storing text into the
/// column refuses it ("value too long"), which isolates that row as the database's refusal.
fn value(a: &str, j: usize, c: &ResolvedColumn, default: Option<&str>) -> String {
    let cast = match c.kind {
        ColumnKind::Text => format!("{a}.v{j}"),
        _ => format!("CAST({a}.v{j} AS {})", c.sql_type),
    };
    match default {
        Some(d) => format!("coalesce({cast}, ({d}))"),
        None => cast,
    }
}

/// `stored IS NOT DISTINCT FROM sent`, for types without equality (json, anything unknown)
/// compared as their text.
fn same(stored: &str, sent: &str, kind: ColumnKind) -> String {
    match kind {
        ColumnKind::Json => {
            format!("{stored}::text::jsonb IS NOT DISTINCT FROM {sent}::text::jsonb")
        }
        ColumnKind::Other => format!("{stored}::text IS NOT DISTINCT FROM {sent}::text"),
        _ => format!("{stored} IS NOT DISTINCT FROM {sent}"),
    }
}

/// Number of parameters of [`BATCH_SQL`] plus the dead letters' `route` ($26) and the routed
/// messages' arrays ($27..$33).
const FIXED_PARAMS: usize = 33;

/// The statement for `routes` (`defaults[k][j]`: the default expression of column `j` of route
/// `k`, when it has one). Parameters: those of [`BATCH_SQL`]; `$26` the dead letters' routes;
/// `$27..$33` the routed messages (position, topic, payload, received_at, content hash, packet
/// id, DUP); then per route its rows' positions and one text array per column.
pub fn routed_sql(routes: &[ResolvedRoute], defaults: &[Vec<Option<String>>]) -> String {
    let mut sql = BATCH_SQL.to_string();
    // Dead letters carry their route.
    sql = sql.replacen(
        "$23::int[], $24::bool[])\n             AS u(i, tp, p, sz, reason, e, rcv, h, k, dup))",
        "$23::int[], $24::bool[], $26::text[])\n             AS u(i, tp, p, sz, reason, e, rcv, h, k, dup, route))",
        1,
    );
    sql = sql.replacen(
        "lease_epoch, content_hash, mqtt_pkid, possible_duplicate)\n        SELECT tp, p, sz, reason, e, rcv, $4, $3, h, k, dup\n",
        "lease_epoch, content_hash, mqtt_pkid, possible_duplicate, route)\n        SELECT tp, p, sz, reason, e, rcv, $4, $3, h, k, dup, route\n",
        1,
    );
    sql = sql.replacen(
        "c.rcv, $4, $3, c.hh, c.k, c.dup\n",
        "c.rcv, $4, $3, c.hh, c.k, c.dup, NULL\n",
        1,
    );
    let (head, tail) = sql
        .split_once("\n    SELECT (SELECT count(*) FROM fence) AS held,")
        .unwrap_or((&sql, ""));
    let mut ctes = String::from(head);
    ctes.push_str(
        ",
    g AS MATERIALIZED (
        SELECT * FROM unnest($27::int[], $28::text[], $29::bytea[], $30::timestamptz[], $31::text[],
                             $32::int[], $33::bool[])
             AS u(i, tp, p, rcv, h, k, dup))",
    );
    let mut param = FIXED_PARAMS;
    let mut dead_arms = Vec::new();
    let mut outputs = String::new();
    for (k, r) in routes.iter().enumerate() {
        let none = Vec::new();
        let defaults = defaults.get(k).unwrap_or(&none);
        let default = |j: usize| defaults.get(j).and_then(|d| d.as_deref());
        let n = r.columns.len();
        let mut arrays = vec![format!("${}::int[]", param + 1)];
        let mut names = vec!["i".to_string()];
        for j in 0..n {
            arrays.push(format!("${}::text[]", param + 2 + j));
            names.push(format!("v{j}"));
        }
        param += 1 + n;
        let cols: Vec<&str> = r.columns.iter().map(|c| c.quoted.as_str()).collect();
        let exprs: Vec<String> = (0..n)
            .map(|j| value("q", j, &r.columns[j], default(j)))
            .collect();
        let keys: Vec<&str> = r
            .key
            .iter()
            .map(|&j| r.columns[j].quoted.as_str())
            .collect();
        let on_key = |a: &str, row: &str| -> String {
            r.key
                .iter()
                .map(|&j| {
                    let c = &r.columns[j];
                    format!("{a}.{} = {}", c.quoted, value(row, j, c, None))
                })
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let non_key: Vec<String> = (0..n)
            .filter(|j| !r.key.contains(j))
            .map(|j| format!("{0} = EXCLUDED.{0}", r.columns[j].quoted))
            .collect();
        let action = match r.spec.on_conflict {
            OnConflict::Update if !non_key.is_empty() => {
                format!("DO UPDATE SET {}", non_key.join(", "))
            }
            _ => "DO NOTHING".to_string(),
        };
        let compared: Vec<String> = (0..n)
            .filter(|&j| from_message(&r.columns[j].source))
            .map(|j| {
                let c = &r.columns[j];
                same(
                    &format!("x.{}", c.quoted),
                    &value("m", j, c, default(j)),
                    c.kind,
                )
            })
            .collect();
        let compared = if compared.is_empty() {
            "true".to_string()
        } else {
            compared.join(" AND ")
        };
        // "nothing": a row whose key equals an earlier row's of this statement only once cast
        // (`1e2` and `100` numeric, `ABC` and `abc` citext: apart in the batch's text keys) was
        // skipped by the database, yet the key the earlier one inserted matches it too. It is
        // compared with that earlier row instead (the table's snapshot does not hold it yet), so
        // it becomes a duplicate or a conflict, never a row counted as written and lost.
        let (earlier, by_earlier) = match r.spec.on_conflict {
            OnConflict::Nothing => {
                let keys_equal = |a: &str, b: &str| -> String {
                    r.key
                        .iter()
                        .map(|&j| {
                            let c = &r.columns[j];
                            format!("{} = {}", value(a, j, c, None), value(b, j, c, None))
                        })
                        .collect::<Vec<_>>()
                        .join(" AND ")
                };
                let compared_p: Vec<String> = (0..n)
                    .filter(|&j| from_message(&r.columns[j].source))
                    .map(|j| {
                        let c = &r.columns[j];
                        same(
                            &value("p", j, c, default(j)),
                            &value("m", j, c, default(j)),
                            c.kind,
                        )
                    })
                    .collect();
                let compared_p = if compared_p.is_empty() {
                    "true".to_string()
                } else {
                    compared_p.join(" AND ")
                };
                (
                    format!(
                        "\n               OR EXISTS (SELECT 1 FROM q{k} p WHERE p.i < q.i AND {})",
                        keys_equal("p", "q")
                    ),
                    Some((keys_equal("p", "m"), compared_p)),
                )
            }
            OnConflict::Update => (String::new(), None),
        };
        // m{k} (rows not inserted) is empty when the insert returned a row for every row sent:
        // matching by key alone would miss a row whose key a BEFORE trigger rewrote
        // (`upper(code)`) and dead-letter it as not stored although it was.
        let key_text = r
            .key
            .iter()
            .map(|&j| format!("coalesce(m.v{j}, 'NULL')"))
            .collect::<Vec<_>>()
            .join(", ");
        let key_names = literal(
            &r.key
                .iter()
                .map(|&j| r.columns[j].name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        );
        let name = literal(&r.spec.name);
        let _ = write!(
            ctes,
            ",
    q{k} AS MATERIALIZED (
        SELECT * FROM unnest({arrays}) AS u({names})),
    i{k} AS (
        INSERT INTO {table} ({cols})
        SELECT {exprs} FROM q{k} q
        WHERE EXISTS (SELECT 1 FROM fence)
        ORDER BY q.i
        ON CONFLICT ({keys}) {action}
        RETURNING {keys}),
    m{k} AS MATERIALIZED (
        SELECT q.* FROM q{k} q
        WHERE EXISTS (SELECT 1 FROM fence)
          AND (SELECT count(*) FROM i{k}) < (SELECT count(*) FROM q{k})
          AND (NOT EXISTS (SELECT 1 FROM i{k} x WHERE {ins_key}){earlier})),
    c{k} AS MATERIALIZED (
        SELECT m.i, ({compared}) AS same, concat_ws(', ', {key_text}) AS key
        FROM m{k} m JOIN {table} x ON {stored_key}{by_earlier}),
    a{k} AS MATERIALIZED (
        SELECT c.i FROM c{k} c JOIN g ON g.i = c.i
        WHERE NOT c.same AND g.dup AND EXISTS (
            SELECT 1 FROM dead_letters y
            WHERE y.content_hash = g.h AND y.mqtt_pkid = g.k AND y.route = {name}
              AND y.reason = 'conflict'
              AND y.received_at > g.rcv - $5::interval AND y.received_at < g.rcv)),
    u{k} AS MATERIALIZED (
        SELECT m.i FROM m{k} m WHERE m.i NOT IN (SELECT i FROM c{k}))",
            arrays = arrays.join(", "),
            names = names.join(", "),
            table = r.qualified,
            cols = cols.join(", "),
            exprs = exprs.join(", "),
            keys = keys.join(", "),
            ins_key = on_key("x", "q"),
            stored_key = on_key("x", "m"),
            by_earlier = by_earlier.map_or(String::new(), |(keys_equal, compared_p)| format!(
                "
        UNION ALL
        SELECT m.i, ({compared_p}) AS same, concat_ws(', ', {key_text}) AS key
        FROM m{k} m JOIN LATERAL (
            SELECT * FROM q{k} p WHERE p.i < m.i AND {keys_equal} ORDER BY p.i LIMIT 1) p ON true
        WHERE NOT EXISTS (SELECT 1 FROM {table} x WHERE {stored_key})",
                table = r.qualified,
                stored_key = on_key("x", "m"),
            )),
        );
        let table = literal(&r.qualified);
        dead_arms.push(format!(
            "SELECT g.tp, g.p, octet_length(g.p), 'conflict',
               format('route %s: conflict: a different row is stored in %s for key (%s) = (%s); this one was not stored', {name}, {table}, {key_names}, c.key),
               g.rcv, $4, $3, g.h, g.k, g.dup, {name}
        FROM c{k} c JOIN g ON g.i = c.i WHERE NOT c.same AND c.i NOT IN (SELECT i FROM a{k})"
        ));
        dead_arms.push(format!(
            "SELECT g.tp, g.p, octet_length(g.p), 'not_stored',
               format('route %s: %s neither took the row nor holds one with its key (a trigger or rule skipped it)', {name}, {table}),
               g.rcv, $4, $3, g.h, g.k, g.dup, {name}
        FROM u{k} u JOIN g ON g.i = u.i"
        ));
        let _ = write!(
            outputs,
            ",
           (SELECT count(*) FROM i{k}) AS written_{k},
           ARRAY(SELECT i FROM c{k} WHERE same UNION ALL SELECT i FROM a{k}) AS duplicates_{k},
           ARRAY(SELECT i FROM c{k} WHERE NOT same AND i NOT IN (SELECT i FROM a{k})) AS conflicts_{k},
           ARRAY(SELECT i FROM u{k}) AS unstored_{k}"
        );
    }
    if !dead_arms.is_empty() {
        let _ = write!(
            ctes,
            ",
    rdead AS (
        INSERT INTO dead_letters (topic, payload, size, reason, error, received_at, written_by,
                                  lease_epoch, content_hash, mqtt_pkid, possible_duplicate, route)
        {}
        RETURNING 1)",
            dead_arms.join("\n        UNION ALL\n        ")
        );
    }
    let route_dead = if routes.is_empty() {
        "0::bigint"
    } else {
        "(SELECT count(*) FROM rdead)"
    };
    format!(
        "{ctes}\n    SELECT (SELECT count(*) FROM fence) AS held,{tail},\n           {route_dead} AS route_dead_lettered{outputs}"
    )
}

/// The default expressions of the columns of `routes` that have one, read from the catalog.
pub(crate) const DEFAULTS_SQL: &str = "SELECT pg_get_expr(d.adbin, d.adrelid)
    FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
    WHERE d.adrelid = to_regclass($1) AND a.attname = $2";

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use leasehold_config::RouteSpec;

    pub fn column(name: &str, source: Source, sql_type: &str, kind: ColumnKind) -> ResolvedColumn {
        ResolvedColumn {
            name: name.into(),
            quoted: format!("\"{name}\""),
            source,
            sql_type: sql_type.into(),
            kind,
            not_null: false,
            has_default: false,
        }
    }

    pub fn route(name: &str, on_conflict: OnConflict) -> ResolvedRoute {
        let columns = vec![
            column("id", Source::TopicSegment(1), "text", ColumnKind::Text),
            column(
                "at",
                Source::Timestamp,
                "timestamp with time zone",
                ColumnKind::Timestamptz,
            ),
            column(
                "v",
                Source::JsonPath(vec![]),
                "numeric(5,2)",
                ColumnKind::Numeric,
            ),
            column("by", Source::WrittenBy, "text", ColumnKind::Text),
        ];
        let spec = RouteSpec {
            name: name.into(),
            topics: vec!["eq/+/d".into()],
            table: "t".into(),
            key: vec!["id".into(), "at".into()],
            on_conflict,
            columns: columns
                .iter()
                .map(|c| (c.name.clone(), c.source.clone()))
                .collect(),
        };
        ResolvedRoute::new(spec, "public".into(), "t".into(), columns)
    }

    #[test]
    fn every_dead_letter_gets_a_route_and_every_route_is_behind_the_fence() {
        let sql = routed_sql(
            &[
                route("a", OnConflict::Nothing),
                route("b", OnConflict::Update),
            ],
            &[],
        );
        assert!(sql.contains("AS u(i, tp, p, sz, reason, e, rcv, h, k, dup, route))"));
        assert!(sql.contains("possible_duplicate, route)\n        SELECT tp, p, sz, reason, e, rcv, $4, $3, h, k, dup, route\n"));
        assert!(sql.contains("c.k, c.dup, NULL\n"));
        assert_eq!(
            sql.matches("WHERE EXISTS (SELECT 1 FROM fence)\n        ORDER BY q.i")
                .count(),
            2
        );
        assert!(sql.contains("ON CONFLICT (\"id\", \"at\") DO NOTHING"));
        assert!(sql.contains("ON CONFLICT (\"id\", \"at\") DO UPDATE SET \"v\" = EXCLUDED.\"v\", \"by\" = EXCLUDED.\"by\""));
        // Parameters: 33 fixed, then per route 1 + 4 columns.
        assert!(sql.contains("$43::text[]") && !sql.contains("$44"));
        // written_by is not compared: a redelivery written by another node is a duplicate.
        assert!(!sql.contains("x.\"by\" IS NOT DISTINCT"));
        assert!(sql.contains("written_1") && sql.contains("route_dead_lettered"));
        // "nothing": a key equal to an earlier row's only once cast is compared with that row.
        assert!(sql.contains("OR EXISTS (SELECT 1 FROM q0 p WHERE p.i < q.i AND p.v0 = q.v0 AND"));
        assert!(!sql.contains("FROM q1 p WHERE p.i < q.i"));
    }

    #[test]
    fn a_default_fills_a_null() {
        let sql = routed_sql(
            &[route("a", OnConflict::Nothing)],
            &[vec![None, None, Some("0".into()), None]],
        );
        assert!(sql.contains("coalesce(CAST(q.v2 AS numeric(5,2)), (0))"));
    }
}
