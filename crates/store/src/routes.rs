//! Routes checked against the live database.

use leasehold_config::{RouteSpec, Source};
use tokio_postgres::Client;

use crate::Result;

/// A route checked against the live database.
#[derive(Debug, Clone)]
pub struct ResolvedRoute {
    pub spec: RouteSpec,
    pub schema: String,
    pub table: String,
    pub qualified: String,
    pub columns: Vec<ResolvedColumn>,
    pub key: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct ResolvedColumn {
    pub name: String,
    pub quoted: String,
    pub source: Source,
    pub sql_type: String,
    pub kind: ColumnKind,
    pub not_null: bool,
    pub has_default: bool,
}

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
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteProblem {
    pub route: String,
    pub column: Option<String>,
    pub message: String,
}

pub async fn resolve(
    _client: &Client,
    _specs: &[RouteSpec],
) -> Result<(Vec<ResolvedRoute>, Vec<RouteProblem>)> {
    Ok((Vec::new(), Vec::new()))
}
