//! The cluster's configuration versions (`cluster_config`): read the active one, apply a new one
//! with a compare-and-set on the version, import the first. The text is opaque here; the
//! config crate reads it.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use crate::op::{self, Op};
use crate::{Result, StoreError};

/// Where a new version is announced (payload: the version): nodes LISTEN and apply it.
pub const CONFIG_CHANNEL: &str = "leasehold_config";

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredConfig {
    pub version: i64,
    /// Canonical TOML, secrets in clear.
    #[serde(skip)]
    pub settings: String,
    pub applied_at: DateTime<Utc>,
    pub applied_by: String,
    pub changes: String,
}

const COLUMNS: &str = "version, settings, applied_at, applied_by, changes";

fn row(r: &tokio_postgres::Row) -> Result<StoredConfig, tokio_postgres::Error> {
    from_row!(r => StoredConfig { version, settings, applied_at, applied_by, changes })
}

/// The active version: the highest. `None` before the first was applied or imported.
pub async fn active(c: &impl GenericClient) -> Result<Option<StoredConfig>> {
    let sql = format!("SELECT {COLUMNS} FROM cluster_config ORDER BY version DESC LIMIT 1");
    op::opt(c, Op::ConfigRead, sql.as_str(), &[], row).await
}

/// The active version's number only (what every node compares against, every heartbeat).
pub async fn active_version(c: &impl GenericClient) -> Result<Option<i64>> {
    op::one(
        c,
        Op::ConfigRead,
        "SELECT max(version) AS v FROM cluster_config",
        &[],
        |r| r.try_get("v"),
    )
    .await
}

/// Version `version`, if it exists.
pub async fn version(c: &impl GenericClient, version: i64) -> Result<Option<StoredConfig>> {
    let sql = format!("SELECT {COLUMNS} FROM cluster_config WHERE version = $1");
    op::opt(c, Op::ConfigRead, sql.as_str(), &[&version], row).await
}

/// Every version, the newest first.
pub async fn history(c: &impl GenericClient) -> Result<Vec<StoredConfig>> {
    let sql = format!("SELECT {COLUMNS} FROM cluster_config ORDER BY version DESC");
    op::all(c, Op::ConfigRead, sql.as_str(), &[], row).await
}

/// What a new version must say.
#[derive(Debug, Clone)]
pub struct NewVersion<'a> {
    /// The active version it was checked against (`None`: there is none yet).
    pub after: Option<i64>,
    pub settings: &'a str,
    pub applied_by: &'a str,
    pub changes: &'a str,
}

/// Why a version was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Another version became active since `after` was read: compare-and-set lost.
    #[error("version {taken} was applied by someone else meanwhile (this change was checked against version {}); nothing was stored: look at `leasehold config history` and apply again", .after.map_or("none".to_string(), |v| v.to_string()))]
    Conflict { after: Option<i64>, taken: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Stores `new` as version `after + 1` and announces it, or refuses if that version exists
/// (another apply won): the primary key is the compare-and-set.
pub async fn apply(c: &impl GenericClient, new: &NewVersion<'_>) -> Result<i64, ApplyError> {
    let next = new.after.unwrap_or(0) + 1;
    let inserted = op::opt(
        c,
        Op::ConfigApply,
        "WITH ins AS (
             INSERT INTO cluster_config (version, settings, applied_by, changes)
             VALUES ($1, $2, $3, $4) ON CONFLICT (version) DO NOTHING RETURNING version)
         SELECT version, pg_notify($5, version::text) FROM ins",
        &[
            &next,
            &new.settings,
            &new.applied_by,
            &new.changes,
            &CONFIG_CHANNEL,
        ],
        |r| r.try_get::<_, i64>("version"),
    )
    .await?;
    match inserted {
        Some(v) => Ok(v),
        None => Err(ApplyError::Conflict {
            after: new.after,
            taken: next,
        }),
    }
}

/// The first start of a cluster without a version stores `settings` as version 1; when
/// another node got there first (nodes started together), its version stands. Returns the
/// active version either way.
pub async fn import(
    c: &impl GenericClient,
    settings: &str,
    applied_by: &str,
) -> Result<StoredConfig> {
    let first = NewVersion {
        after: None,
        settings,
        applied_by,
        changes: "imported from the first node's own settings",
    };
    match apply(c, &first).await {
        Ok(_) | Err(ApplyError::Conflict { .. }) => {}
        Err(ApplyError::Store(e)) => return Err(e),
    }
    active(c)
        .await?
        .ok_or_else(|| StoreError::Pool("cluster_config is empty right after an import".into()))
}
