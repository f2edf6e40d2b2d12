//! Routes checked against the live database: the table and its columns as stored, each column's
//! type and how a value reaches it, the unique index `key` names, the role's privileges. A node
//! resolves its routes at start and refuses to start on any problem; `leasehold routes` prints
//! the result. The default route (`telemetry`) is route 0, described by [`ResolvedRoute::telemetry`]
//! and written by the same statement builder as every named route.

use std::fmt;

pub use leasehold_config::routes::{OnConflict, PathStep, RouteSpec, Source};

use crate::op::{self, measured, Op};
use crate::{Client, Result};

/// A route checked against the live database.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedRoute {
    pub spec: RouteSpec,
    /// As stored in `pg_catalog` (unquoted).
    pub schema: String,
    pub table: String,
    /// Quoted, ready for SQL: `"s"."t"`.
    pub qualified: String,
    /// The mapped columns, in the spec's order.
    pub columns: Vec<ResolvedColumn>,
    /// Indexes into `columns`: the key, in the spec's order.
    pub key: Vec<usize>,
}

impl ResolvedRoute {
    /// A route whose checks passed, on table `schema`.`table` (as stored): the quoted name and the
    /// key's positions follow from the names.
    pub fn new(
        spec: RouteSpec,
        schema: String,
        table: String,
        columns: Vec<ResolvedColumn>,
    ) -> Self {
        let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
        let key = spec
            .key
            .iter()
            .filter_map(|k| columns.iter().position(|c| &c.name == k))
            .collect();
        ResolvedRoute {
            spec,
            schema,
            table,
            qualified,
            columns,
            key,
        }
    }
}

/// The name of the built-in route into `telemetry` (the `route` label of its metrics; its dead
/// letters carry no route).
pub const DEFAULT_ROUTE: &str = "default";

impl ResolvedRoute {
    /// The built-in route 0: every message no named route takes, into `telemetry`, keyed by
    /// `(device_id, topic, ts)`, with the identity columns that let a redelivery of a
    /// timestamp-less reading be told from a new publish (`docs/guarantees.md`).
    /// A route whose table could not be resolved now (gone, renamed, not granted): it keeps its
    /// place and its filters, so its messages are told apart, but it is suspended and never
    /// written until it resolves again.
    pub fn unresolved(spec: RouteSpec) -> Self {
        let table = spec.table.clone();
        ResolvedRoute {
            qualified: quote_ident(&table),
            spec,
            schema: String::new(),
            table,
            columns: Vec::new(),
            key: Vec::new(),
        }
    }

    pub fn telemetry() -> Self {
        use ColumnKind::*;
        let col = |name: &str, source: Source, sql_type: &str, kind: ColumnKind| ResolvedColumn {
            name: name.into(),
            quoted: quote_ident(name),
            source,
            sql_type: sql_type.into(),
            kind,
            not_null: true,
            has_default: false,
            collation: None,
        };
        const TZ: &str = "timestamp with time zone";
        let mut columns = vec![
            col("device_id", Source::DeviceId, "text", Text),
            col("topic", Source::Topic, "text", Text),
            col("ts", Source::Timestamp, TZ, Timestamptz),
            col("payload", Source::Payload, "jsonb", Jsonb),
            col("received_at", Source::ReceivedAt, TZ, Timestamptz),
            col("written_by", Source::WrittenBy, "text", Text),
            col("lease_epoch", Source::LeaseEpoch, "bigint", Int8),
            col("content_hash", Source::ContentHash, "text", Text),
            col("mqtt_pkid", Source::PacketId, "integer", Int4),
            col(
                "possible_duplicate",
                Source::PossibleDuplicate,
                "boolean",
                Bool,
            ),
        ];
        for c in &mut columns[7..] {
            c.not_null = false;
        }
        let spec = RouteSpec {
            name: DEFAULT_ROUTE.into(),
            topics: vec!["#".into()],
            table: "telemetry".into(),
            key: vec!["device_id".into(), "topic".into(), "ts".into()],
            on_conflict: OnConflict::Nothing,
            columns: columns
                .iter()
                .map(|c| (c.name.clone(), c.source.clone()))
                .collect(),
        };
        let mut route = ResolvedRoute::new(spec, "public".into(), "telemetry".into(), columns);
        // Where the migrations made it: the connection's search path, as every query here.
        route.qualified = "telemetry".into();
        route
    }

    /// Whether this is the built-in route into `telemetry`.
    pub fn is_default(&self) -> bool {
        self.spec.name == DEFAULT_ROUTE && self.table == "telemetry"
    }

    /// The column whose value comes from `source`, if the route maps one.
    pub fn column_of(&self, source: &Source) -> Option<usize> {
        self.columns.iter().position(|c| &c.source == source)
    }
}

/// One mapped column as the database has it.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedColumn {
    /// As stored.
    pub name: String,
    /// `"name"` quoted for SQL.
    pub quoted: String,
    pub source: Source,
    /// `format_type(atttypid, atttypmod)`, used in the statement's casts.
    pub sql_type: String,
    /// How the writer validates or converts a value before sending it.
    pub kind: ColumnKind,
    pub not_null: bool,
    pub has_default: bool,
    /// The column's own collation (`"public"."ci"`), when it is not its type's: the table's
    /// equality for text, which the statement's comparisons of sent values must use too.
    pub collation: Option<String>,
}

/// The families of column types a value is converted for; anything else is sent as text and
/// cast by SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Text,
    Int2,
    Int4,
    Int8,
    Numeric,
    Float4,
    Float8,
    Bool,
    Timestamptz,
    Timestamp,
    Date,
    Jsonb,
    Json,
    Uuid,
    /// Anything else: sent as text, cast by SQL.
    Other,
}

/// One start-up problem of a route; its `Display` is one line naming the route (and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteProblem {
    pub route: String,
    pub column: Option<String>,
    pub message: String,
}

impl fmt::Display for RouteProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.column {
            Some(c) => write!(f, "route {:?}: column {c:?}: {}", self.route, self.message),
            None => write!(f, "route {:?}: {}", self.route, self.message),
        }
    }
}

/// Checks every route against the database: the routes that resolved, and every problem found
/// (a route with a problem is not among the resolved ones). `Err` only when the database could
/// not be asked.
pub async fn resolve(
    client: &Client,
    specs: &[RouteSpec],
) -> Result<(Vec<ResolvedRoute>, Vec<RouteProblem>)> {
    let (user, search_path) = op::one(
        client,
        Op::RouteCheck,
        "SELECT current_user::text AS u, current_setting('search_path') AS sp",
        &[],
        |r| Ok((r.try_get::<_, String>("u")?, r.try_get::<_, String>("sp")?)),
    )
    .await?;
    let who = Who { user, search_path };
    let mut resolved = Vec::new();
    let mut problems = Vec::new();
    for spec in specs {
        let mut found = Problems {
            route: &spec.name,
            list: Vec::new(),
        };
        if let Some(r) = resolve_one(client, spec, &who, &mut found).await? {
            if found.list.is_empty() {
                resolved.push(r);
            }
        }
        problems.extend(found.list);
    }
    Ok((resolved, problems))
}

/// The role and search path the node resolves with, for the messages.
struct Who {
    user: String,
    search_path: String,
}

/// The problems of one route, as they are found.
struct Problems<'a> {
    route: &'a str,
    list: Vec<RouteProblem>,
}

impl Problems<'_> {
    fn add(&mut self, column: Option<&str>, message: String) {
        self.list.push(RouteProblem {
            route: self.route.to_string(),
            column: column.map(str::to_string),
            message,
        });
    }
}

/// A column of the table, as the catalog has it.
struct CatalogColumn {
    name: String,
    sql_type: String,
    /// The base type's name (through domains).
    base_type: String,
    not_null: bool,
    has_default: bool,
    /// The column's own collation, qualified and quoted, when it is not its type's.
    collation: Option<String>,
    /// `a` (always), `d` (by default) or empty.
    identity: String,
    /// `s` (stored) or empty.
    generated: String,
    may_insert: bool,
    may_update: bool,
    may_select: bool,
}

/// A unique index of the table.
struct UniqueIndex {
    name: String,
    columns: Vec<String>,
    partial: bool,
    expressions: bool,
    deferrable: bool,
}

async fn resolve_one(
    client: &Client,
    spec: &RouteSpec,
    who: &Who,
    found: &mut Problems<'_>,
) -> Result<Option<ResolvedRoute>> {
    let Some(Table {
        oid,
        schema,
        name,
        qualified,
    }) = find_table(client, spec, who, found).await?
    else {
        return Ok(None);
    };
    let catalog = catalog(client, oid).await?;
    let (columns, mapped) = map_columns(client, spec, &catalog, &qualified, found).await?;
    unmapped_not_null(spec, &catalog, &qualified, found);
    privileges(spec, &mapped, &qualified, who, found);

    check_key(client, spec, oid, &qualified, found).await?;
    if !found.list.is_empty() {
        return Ok(None);
    }
    Ok(Some(ResolvedRoute::new(
        spec.clone(),
        schema,
        name,
        columns,
    )))
}

/// The route's table as the catalog has it.
struct Table {
    oid: u32,
    schema: String,
    name: String,
    qualified: String,
}

/// Finds the route's table: it must exist, be a table (plain or partitioned) and its schema
/// usable by the role.
async fn find_table(
    client: &Client,
    spec: &RouteSpec,
    who: &Who,
    found: &mut Problems<'_>,
) -> Result<Option<Table>> {
    // to_regclass follows the search path and SQL's quoting, and refuses a malformed name.
    let table = measured(Op::RouteCheck, async {
        let sql = "SELECT c.oid, n.nspname::text AS schema, c.relname::text AS name,
                          c.relkind::text AS kind,
                          has_schema_privilege(n.oid, 'USAGE') AS usage
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE c.oid = to_regclass($1::text)";
        refusal(client.query_opt(sql, &[&spec.table]).await)
    })
    .await?;
    let row = match table {
        Ok(Some(row)) => row,
        Ok(None) => {
            found.add(
                None,
                format!(
                    "table {:?} does not exist (or the role {:?} cannot see it; search_path is {}): create it, or fix table (schema-qualified: schema.table; quoted for capitals: \"My Table\")",
                    spec.table, who.user, who.search_path
                ),
            );
            return Ok(None);
        }
        Err(words) => {
            found.add(
                None,
                format!("table {:?} is not a valid table name: {words}", spec.table),
            );
            return Ok(None);
        }
    };
    let (oid, schema, name, kind, usage): (u32, String, String, String, bool) = (
        row.try_get("oid")?,
        row.try_get("schema")?,
        row.try_get("name")?,
        row.try_get("kind")?,
        row.try_get("usage")?,
    );
    let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
    if kind != "r" && kind != "p" {
        found.add(
            None,
            format!(
                "{qualified} is {}, not a table: routes write into tables (plain or partitioned)",
                relkind_words(&kind)
            ),
        );
        return Ok(None);
    }
    if !usage {
        found.add(
            None,
            format!(
                "the role {:?} has no USAGE on schema {}: GRANT USAGE ON SCHEMA {} TO {}",
                who.user,
                quote_ident(&schema),
                quote_ident(&schema),
                quote_ident(&who.user)
            ),
        );
    }
    Ok(Some(Table {
        oid,
        schema,
        name,
        qualified,
    }))
}

/// The table's columns, with what the role may do with each.
async fn catalog(client: &Client, oid: u32) -> Result<Vec<CatalogColumn>> {
    op::all(
        client,
        Op::RouteCheck,
        "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS sql_type,
                coalesce(b.typname, t.typname)::text AS base_type,
                a.attnotnull AS not_null, a.atthasdef AS has_default,
                (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.collname)
                 FROM pg_collation c JOIN pg_namespace n ON n.oid = c.collnamespace
                 WHERE c.oid = a.attcollation AND a.attcollation <> t.typcollation) AS collation,
                a.attidentity::text AS identity, a.attgenerated::text AS generated,
                has_column_privilege(a.attrelid, a.attnum, 'INSERT') AS may_insert,
                has_column_privilege(a.attrelid, a.attnum, 'UPDATE') AS may_update,
                has_column_privilege(a.attrelid, a.attnum, 'SELECT') AS may_select
         FROM pg_attribute a
         JOIN pg_type t ON t.oid = a.atttypid
         LEFT JOIN pg_type b ON b.oid = t.typbasetype AND t.typtype = 'd'
         WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
        &[&oid],
        |r| {
            from_row!(r => CatalogColumn {
                name, sql_type, base_type, not_null, has_default, collation, identity, generated,
                may_insert, may_update, may_select,
            })
        },
    )
    .await
}

/// Each mapped column checked against the catalog: the resolved columns, and the catalog's
/// entries of those that resolved (for the privilege check).
async fn map_columns<'c>(
    client: &Client,
    spec: &RouteSpec,
    catalog: &'c [CatalogColumn],
    qualified: &str,
    found: &mut Problems<'_>,
) -> Result<(Vec<ResolvedColumn>, Vec<&'c CatalogColumn>)> {
    let mut columns = Vec::new();
    let mut mapped = Vec::new();
    for (col, source) in &spec.columns {
        let Some(c) = catalog.iter().find(|c| &c.name == col) else {
            let hint = catalog
                .iter()
                .find(|c| c.name.eq_ignore_ascii_case(col))
                .map(|c| format!(" (there is {:?}: names are matched exactly)", c.name))
                .unwrap_or_default();
            found.add(
                Some(col),
                format!("{qualified} has no such column{hint}: add it to the table, or remove it from [routes.columns]"),
            );
            continue;
        };
        if c.generated == "s" {
            found.add(
                Some(col),
                "is a generated column: the database computes it; remove it from [routes.columns]"
                    .into(),
            );
            continue;
        }
        if c.identity == "a" {
            found.add(
                Some(col),
                format!("is an identity column GENERATED ALWAYS: remove it from [routes.columns], or ALTER TABLE {qualified} ALTER COLUMN {} SET GENERATED BY DEFAULT", quote_ident(&c.name)),
            );
            continue;
        }
        let kind = column_kind(&c.base_type);
        if let Err(why) = castable(source, kind) {
            found.add(
                Some(col),
                format!("{} cannot go into type {}: {why}", source, c.sql_type),
            );
            continue;
        }
        if let Source::Literal(text) = source {
            if let Err(words) = cast_literal(client, text, &c.sql_type).await? {
                found.add(
                    Some(col),
                    format!(
                        "the literal {source} is not a valid {}: {words}",
                        c.sql_type
                    ),
                );
                continue;
            }
        }
        mapped.push(c);
        columns.push(ResolvedColumn {
            name: c.name.clone(),
            quoted: quote_ident(&c.name),
            source: source.clone(),
            sql_type: c.sql_type.clone(),
            kind,
            not_null: c.not_null,
            has_default: c.has_default || !c.identity.is_empty(),
            collation: c.collation.clone(),
        });
    }
    Ok((columns, mapped))
}

/// Every NOT NULL column without a default must be mapped.
fn unmapped_not_null(
    spec: &RouteSpec,
    catalog: &[CatalogColumn],
    qualified: &str,
    found: &mut Problems<'_>,
) {
    for c in catalog {
        let fills_itself = c.has_default || !c.identity.is_empty() || !c.generated.is_empty();
        if c.not_null && !fills_itself && !spec.columns.iter().any(|(n, _)| n == &c.name) {
            found.add(
                Some(&c.name),
                format!("is NOT NULL without a default and not mapped: map it in [routes.columns], or give it a default (ALTER TABLE {qualified} ALTER COLUMN {} SET DEFAULT ...)", quote_ident(&c.name)),
            );
        }
    }
}

/// INSERT on every mapped column; SELECT too (the stored row is read back to tell a duplicate
/// from a conflict); UPDATE on the columns an upsert sets (those outside the key).
fn privileges(
    spec: &RouteSpec,
    mapped: &[&CatalogColumn],
    qualified: &str,
    who: &Who,
    found: &mut Problems<'_>,
) {
    let is_key = |c: &CatalogColumn| spec.key.iter().any(|k| k == &c.name);
    // An upsert sets the columns outside the key; with none, it has nothing to update.
    let updated: Vec<&CatalogColumn> = mapped.iter().copied().filter(|c| !is_key(c)).collect();
    let mut check = |privilege: &str,
                     cols: &[&CatalogColumn],
                     allowed: fn(&CatalogColumn) -> bool,
                     why: &str| {
        let missing: Vec<String> = cols
            .iter()
            .filter(|c| !allowed(c))
            .map(|c| quote_ident(&c.name))
            .collect();
        if missing.is_empty() {
            return;
        }
        found.add(
            None,
            format!(
                "the role {:?} may not {privilege} {} of {qualified}{why}: GRANT {privilege} ON {qualified} TO {} (or GRANT {privilege} ({}) ON {qualified} TO {})",
                who.user,
                if missing.len() == cols.len() { "the mapped columns".to_string() } else { format!("column(s) {}", missing.join(", ")) },
                quote_ident(&who.user),
                missing.join(", "),
                quote_ident(&who.user),
            ),
        );
    };
    check("INSERT", mapped, |c| c.may_insert, "");
    check(
        "SELECT",
        mapped,
        |c| c.may_select,
        " (the stored row is read to tell a duplicate from a conflict)",
    );
    if spec.on_conflict == OnConflict::Update && !updated.is_empty() {
        check(
            "UPDATE",
            &updated,
            |c| c.may_update,
            " (on_conflict = \"update\")",
        );
    }
}

/// `key` must be exactly the columns of a unique index or primary key that `ON CONFLICT` can
/// use: not partial, no expressions, not deferrable.
async fn check_key(
    client: &Client,
    spec: &RouteSpec,
    oid: u32,
    qualified: &str,
    found: &mut Problems<'_>,
) -> Result<()> {
    let indexes = op::all(
        client,
        Op::RouteCheck,
        "SELECT i.indexrelid::regclass::text AS name,
                i.indpred IS NOT NULL AS partial,
                i.indexprs IS NOT NULL AS expressions,
                NOT i.indimmediate AS deferrable,
                ARRAY(SELECT a.attname::text
                      FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                      WHERE k.ord <= i.indnkeyatts
                      ORDER BY k.ord) AS columns
         FROM pg_index i
         WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid
         ORDER BY i.indisprimary DESC, 1",
        &[&oid],
        |r| from_row!(r => UniqueIndex { name, columns, partial, expressions, deferrable }),
    )
    .await?;
    let mut want: Vec<&String> = spec.key.iter().collect();
    want.sort();
    let same = |ix: &UniqueIndex| {
        let mut have: Vec<&String> = ix.columns.iter().collect();
        have.sort();
        have == want
    };
    let usable = |ix: &UniqueIndex| !ix.partial && !ix.expressions && !ix.deferrable;
    if indexes.iter().any(|ix| usable(ix) && same(ix)) {
        return Ok(());
    }
    let key = spec
        .key
        .iter()
        .map(|k| quote_ident(k))
        .collect::<Vec<_>>()
        .join(", ");
    let message = match indexes.iter().find(|ix| same(ix)) {
        Some(ix) if ix.partial => format!(
            "key ({key}) matches only the partial unique index {} (it has a WHERE clause), which ON CONFLICT cannot use: CREATE UNIQUE INDEX ON {qualified} ({key}) without WHERE",
            ix.name
        ),
        Some(ix) if ix.deferrable => format!(
            "key ({key}) matches only the deferrable unique constraint of index {}, which ON CONFLICT cannot use: make it NOT DEFERRABLE, or CREATE UNIQUE INDEX ON {qualified} ({key})",
            ix.name
        ),
        _ => {
            let others: Vec<String> = indexes
                .iter()
                .filter(|ix| usable(ix))
                .map(|ix| format!("({})", ix.columns.join(", ")))
                .collect();
            format!(
                "key ({key}) matches no unique index or primary key of {qualified} ({}): set key to one of those, or CREATE UNIQUE INDEX ON {qualified} ({key})",
                if others.is_empty() { "it has none".to_string() } else { format!("it has {}", others.join(", ")) }
            )
        }
    };
    found.add(None, message);
    Ok(())
}

/// Casts a literal to the column's type once, in SQL: `Err` holds the database's words.
async fn cast_literal(
    client: &Client,
    text: &str,
    sql_type: &str,
) -> Result<std::result::Result<(), String>> {
    // `sql_type` comes from format_type(), which quotes what needs quoting.
    let sql = format!("SELECT CAST($1::text AS {sql_type}) IS NULL AS n");
    measured(Op::RouteCheck, async {
        refusal(client.query_one(&sql, &[&text]).await.map(|_| ()))
    })
    .await
}

/// A statement's answer, or the database's words when it refused the statement; `Err` when the
/// database could not be asked.
fn refusal<T>(
    answer: std::result::Result<T, tokio_postgres::Error>,
) -> Result<std::result::Result<T, String>> {
    match answer {
        Ok(v) => Ok(Ok(v)),
        Err(e) if e.as_db_error().is_some() => Ok(Err(crate::database_words(&e))),
        Err(e) => Err(e.into()),
    }
}

/// How a value of `source` can reach a column of `kind`, or why it cannot.
fn castable(source: &Source, kind: ColumnKind) -> std::result::Result<(), &'static str> {
    use ColumnKind::*;
    let ok = match source {
        Source::Payload => matches!(kind, Jsonb | Json | Text),
        Source::LeaseEpoch => matches!(kind, Int8 | Numeric | Text),
        Source::Timestamp | Source::ReceivedAt => {
            matches!(kind, Timestamptz | Timestamp | Date | Text)
        }
        Source::Topic | Source::WrittenBy | Source::ContentHash => matches!(kind, Text | Other),
        Source::TopicSegment(_) | Source::DeviceId => !matches!(kind, Json | Jsonb),
        Source::JsonPath(_) | Source::Literal(_) => true,
        Source::PacketId => matches!(kind, Int4 | Int8 | Numeric | Text),
        Source::PossibleDuplicate => matches!(kind, Bool | Text),
    };
    if ok {
        return Ok(());
    }
    Err(match source {
        Source::Payload => "the payload is a JSON object: map it to a jsonb, json or text column",
        Source::LeaseEpoch => "the lease epoch is a bigint: map it to a bigint, numeric or text column",
        Source::Timestamp | Source::ReceivedAt => {
            "a time goes into a timestamptz, timestamp, date or text column"
        }
        Source::Topic | Source::WrittenBy | Source::ContentHash => {
            "it is text: map it to a text column"
        }
        Source::PacketId => "the packet id is an integer: map it to an integer, numeric or text column",
        Source::PossibleDuplicate => "it is a boolean: map it to a boolean or text column",
        _ => "a topic level or device id is text, not JSON: map it to another type, or use payload or a JSON path",
    })
}

/// The kind of a column from its base type's name.
fn column_kind(base_type: &str) -> ColumnKind {
    match base_type {
        "text" | "varchar" | "bpchar" | "name" => ColumnKind::Text,
        "int2" => ColumnKind::Int2,
        "int4" => ColumnKind::Int4,
        "int8" => ColumnKind::Int8,
        "numeric" => ColumnKind::Numeric,
        "float4" => ColumnKind::Float4,
        "float8" => ColumnKind::Float8,
        "bool" => ColumnKind::Bool,
        "timestamptz" => ColumnKind::Timestamptz,
        "timestamp" => ColumnKind::Timestamp,
        "date" => ColumnKind::Date,
        "jsonb" => ColumnKind::Jsonb,
        "json" => ColumnKind::Json,
        "uuid" => ColumnKind::Uuid,
        _ => ColumnKind::Other,
    }
}

fn relkind_words(kind: &str) -> &'static str {
    match kind {
        "v" => "a view",
        "m" => "a materialized view",
        "f" => "a foreign table",
        "S" => "a sequence",
        "i" | "I" => "an index",
        "c" => "a composite type",
        _ => "not a table",
    }
}

/// An identifier quoted for SQL (always: a stored name may hold anything).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_whatever_they_hold() {
        assert_eq!(quote_ident("t"), "\"t\"");
        assert_eq!(quote_ident("My \"T\""), "\"My \"\"T\"\"\"");
    }

    #[test]
    fn sources_reach_only_the_types_they_can_become() {
        use ColumnKind::*;
        assert!(castable(&Source::Payload, Jsonb).is_ok());
        assert!(castable(&Source::Payload, Text).is_ok());
        assert!(castable(&Source::Payload, Int4).is_err());
        assert!(castable(&Source::LeaseEpoch, Int8).is_ok());
        assert!(castable(&Source::LeaseEpoch, Timestamptz).is_err());
        assert!(castable(&Source::Timestamp, Date).is_ok());
        assert!(castable(&Source::ReceivedAt, Bool).is_err());
        assert!(castable(&Source::TopicSegment(1), Int4).is_ok());
        assert!(castable(&Source::TopicSegment(1), Jsonb).is_err());
        assert!(castable(&Source::JsonPath(vec![]), Uuid).is_ok());
        assert_eq!(column_kind("varchar"), Text);
        assert_eq!(column_kind("inet"), Other);
    }

    #[test]
    fn a_problem_is_one_line_naming_route_and_column() {
        let p = RouteProblem {
            route: "equipment".into(),
            column: Some("dados".into()),
            message: "x".into(),
        };
        assert_eq!(p.to_string(), "route \"equipment\": column \"dados\": x");
    }
}
