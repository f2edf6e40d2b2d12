//! Routes checked against the live database: the table and its columns as stored, each column's
//! type and how a value reaches it, the unique index `key` names, the role's privileges. A node
//! resolves its routes at start and refuses to start on any problem; `leasehold routes` prints
//! the result. The default route (`telemetry`) is not a route here: it keeps its own code path.

use std::fmt;

pub use leasehold_config::routes::{OnConflict, PathStep, RouteSpec, Source};

use crate::{Client, Result};

/// A route checked against the live database.
#[derive(Debug, Clone)]
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

/// One mapped column as the database has it.
#[derive(Debug, Clone)]
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

/// Checks every route against the database: the routes that resolved, and every problem found.
/// A route with a problem is not among the resolved ones. `Err` only when the database could not
/// be asked.
pub async fn resolve(
    _client: &Client,
    specs: &[RouteSpec],
) -> Result<(Vec<ResolvedRoute>, Vec<RouteProblem>)> {
    // Filled in by the next commit; until then every route is refused rather than written blind.
    let problems = specs
        .iter()
        .map(|s| RouteProblem {
            route: s.name.clone(),
            column: None,
            message: "not checked yet".into(),
        })
        .collect();
    Ok((Vec::new(), problems))
}
