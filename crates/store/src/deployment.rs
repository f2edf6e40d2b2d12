//! What `leasehold doctor` asks the database about the deployment: how it commits, what this
//! role may do on Leasehold's tables, its clock, and which database this is.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use crate::op::{self, Op};
use crate::Result;

/// Leasehold's tables and the privileges its role needs on each (reads, the lease, the batch
/// write, the ledger, alerts, retention's deletes, the replay of a resumed route's dead letters).
pub const TABLES: &[(&str, &str)] = &[
    ("instance_lock", "SELECT,INSERT,UPDATE"),
    ("lease_history", "SELECT,INSERT,DELETE"),
    ("telemetry", "SELECT,INSERT"),
    // Data age's record: every batch statement that stores a reading updates it.
    ("telemetry_newest", "SELECT,INSERT,UPDATE"),
    ("dead_letters", "SELECT,INSERT,UPDATE,DELETE"),
    ("devices", "SELECT"),
    ("cluster_nodes", "SELECT,INSERT,UPDATE,DELETE"),
    ("cluster_identity", "SELECT"),
    ("alerts", "SELECT,INSERT,UPDATE,DELETE"),
    ("mqtt_subscriptions", "SELECT,INSERT,UPDATE,DELETE"),
];

/// The settings a commit's durability depends on, as this session sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    pub fsync: String,
    pub synchronous_commit: String,
    pub full_page_writes: String,
}

pub async fn durability(c: &impl GenericClient) -> Result<Durability> {
    op::one(
        c,
        Op::Doctor,
        "SELECT current_setting('fsync') AS fsync,
                current_setting('synchronous_commit') AS synchronous_commit,
                current_setting('full_page_writes') AS full_page_writes",
        &[],
        |r| from_row!(r => Durability { fsync, synchronous_commit, full_page_writes }),
    )
    .await
}

/// A table of [`TABLES`] and what this role lacks on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableAccess {
    pub table: String,
    /// The table exists (the migrations created it).
    pub present: bool,
    /// Privileges of [`TABLES`] this role does not have on it.
    pub missing: Vec<String>,
}

/// This role's privileges on each of [`TABLES`].
pub async fn table_access(c: &impl GenericClient) -> Result<Vec<TableAccess>> {
    let names: Vec<&str> = TABLES.iter().map(|(t, _)| *t).collect();
    let privs: Vec<&str> = TABLES.iter().map(|(_, p)| *p).collect();
    op::all(
        c,
        Op::Doctor,
        "SELECT name, to_regclass(name) IS NOT NULL AS present,
                ARRAY(SELECT p FROM unnest(string_to_array(privs, ',')) AS p
                      WHERE to_regclass(name) IS NOT NULL
                        AND NOT has_table_privilege(to_regclass(name), p)) AS missing
         FROM unnest($1::text[], $2::text[]) AS t(name, privs)",
        &[&names, &privs],
        |r| from_row!(r => TableAccess { table: "name", present, missing }),
    )
    .await
}

/// Reads the database's clock (`clock_timestamp()`) in one round trip each: the statement is
/// prepared once, so a sample's duration is the network's and the server's, not a preparation's.
pub struct ClockProbe(tokio_postgres::Statement);

impl ClockProbe {
    pub async fn prepare(c: &impl GenericClient) -> Result<Self> {
        op::measured(Op::Doctor, async {
            Ok(ClockProbe(
                c.prepare("SELECT clock_timestamp() AS now").await?,
            ))
        })
        .await
    }

    /// The database's clock now, for one offset sample.
    pub async fn read(&self, c: &impl GenericClient) -> Result<DateTime<Utc>> {
        op::one(c, Op::Doctor, &self.0, &[], |r| r.try_get("now")).await
    }
}

/// Which database this is: its name, and the system identifier of its PostgreSQL cluster
/// (kept by physical standbys, so the same across a failover; `None` when this role may not
/// read `pg_control_system()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseIdentity {
    pub database: String,
    pub system_identifier: Option<String>,
}

pub async fn database_identity(c: &impl GenericClient) -> Result<DatabaseIdentity> {
    let database = op::one(
        c,
        Op::Doctor,
        "SELECT current_database()::text AS database",
        &[],
        |r| r.try_get("database"),
    )
    .await?;
    let system_identifier = op::one(
        c,
        Op::Doctor,
        "SELECT system_identifier::text AS id FROM pg_control_system()",
        &[],
        |r| r.try_get("id"),
    )
    .await
    .ok();
    Ok(DatabaseIdentity {
        database,
        system_identifier,
    })
}
