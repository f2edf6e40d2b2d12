//! Schema migrations: applied in order under an advisory lock, so nodes starting together do not
//! race, each recorded in `leasehold_schema_migrations` with the sha256 of its SQL. A migration
//! whose file changed after it was applied is refused by name: the database is not what the
//! file now says, and applying later migrations on top of it would be guesswork. A migration and
//! its ledger row go in one message, one transaction: a file holds no transaction control
//! (`BEGIN`, `COMMIT`, `SAVEPOINT`, ...), which would split them or leave the transaction open.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::op::{self, Op};
use crate::statement::literal;
use crate::{Result, StoreError};

/// One file of `migrations/`, embedded so the binary carries its schema.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// Its file name under `migrations/`.
    pub fn file(&self) -> String {
        format!("V{}__{}.sql", self.version, self.name)
    }

    /// The sha256 of its SQL, hex: what the ledger records.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }

    fn error(&self, problem: Problem) -> StoreError {
        StoreError::Migration {
            version: self.version,
            file: self.file(),
            problem,
        }
    }
}

/// What went wrong with a migration.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The database's own words are in the message: the error is shown as one line, without
    /// its chain of sources.
    #[error("failed: {}", crate::database_words(.0))]
    Failed(tokio_postgres::Error),
    #[error("changed after it was applied (recorded sha256 {recorded}, the file's now {now}); restore the file as it was applied and put the change in a new migration")]
    Changed { recorded: String, now: String },
}

macro_rules! migration {
    ($version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!(
                "../../../migrations/V",
                $version,
                "__",
                $name,
                ".sql"
            )),
        }
    };
}

/// The migrations, in order.
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "initial"),
    migration!(2, "operations"),
    migration!(3, "reading_identity"),
    migration!(4, "cluster_identity"),
    migration!(5, "subscriptions"),
    migration!(6, "routes"),
    migration!(7, "cluster_config"),
    migration!(8, "broker_reach"),
    migration!(9, "partitions"),
    migration!(10, "telemetry_newest"),
    migration!(11, "sparkplug"),
    migration!(12, "optimistic_write"),
    migration!(13, "route_suspensions"),
];

/// Arbitrary but fixed: the advisory lock every node takes around migration.
const MIGRATION_LOCK_KEY: i64 = 0x1ea5_e401d;

/// How long a migrating session may sit idle holding [`MIGRATION_LOCK_KEY`]; its own round trips
/// take milliseconds.
const IDLE_LIMIT: &str = "10s";

/// Applies missing migrations; returns the versions applied. Safe to call from many nodes at once.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>> {
    migrate_up_to(client, i32::MAX).await
}

/// Applies missing migrations up to and including `version` (tests build a database as an
/// earlier release left it, then upgrade it).
pub async fn migrate_up_to(client: &mut Client, version: i32) -> Result<Vec<i32>> {
    op::measured(Op::Migrate, async {
        // A session that holds the lock and goes quiet (its process stopped, its link cut) is
        // ended by the server after `IDLE_LIMIT`, so it cannot keep every other node from
        // starting. Waiting for the lock is not idling: a long migration elsewhere is waited for.
        // Through `pg_settings`, so a server without the setting (before PostgreSQL 14) goes on.
        client
            .batch_execute(&format!(
                "SELECT set_config(name, '{IDLE_LIMIT}', false) FROM pg_settings
                 WHERE name = 'idle_session_timeout';
                 SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"
            ))
            .await?;
        let result = apply(client, version).await;
        // Unlock even on failure; the session ending would release it too.
        let unlock = client
            .batch_execute(&format!(
                "SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY});
                 SELECT set_config(name, reset_val, false) FROM pg_settings
                 WHERE name = 'idle_session_timeout'"
            ))
            .await;
        let applied = result?;
        unlock?;
        Ok(applied)
    })
    .await
}

async fn apply(client: &mut Client, up_to: i32) -> Result<Vec<i32>> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS leasehold_schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(),
                checksum text)",
        )
        .await?;
    let checksums = checksum_column(client).await?;
    let read = if checksums {
        "SELECT version, checksum FROM leasehold_schema_migrations"
    } else {
        "SELECT version, NULL::text AS checksum FROM leasehold_schema_migrations"
    };
    let done = client
        .query(read, &[])
        .await?
        .iter()
        .map(|r| Ok((r.try_get("version")?, r.try_get("checksum")?)))
        .collect::<Result<Vec<(i32, Option<String>)>, tokio_postgres::Error>>()?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let now = m.checksum();
        match done.iter().find(|(v, _)| *v == m.version) {
            Some((_, Some(recorded))) if *recorded != now => {
                return Err(m.error(Problem::Changed {
                    recorded: recorded.clone(),
                    now,
                }));
            }
            Some((_, Some(_))) => {}
            Some((_, None)) if !checksums => {}
            Some((_, None)) => {
                client
                    .execute(
                        "UPDATE leasehold_schema_migrations SET checksum = $2
                         WHERE version = $1 AND checksum IS NULL",
                        &[&m.version, &now],
                    )
                    .await?;
            }
            None if m.version > up_to => {}
            None => {
                let (version, name) = (m.version, literal(m.name));
                let record = if checksums {
                    format!("INSERT INTO leasehold_schema_migrations (version, name, checksum) VALUES ({version}, {name}, {})", literal(&now))
                } else {
                    format!("INSERT INTO leasehold_schema_migrations (version, name) VALUES ({version}, {name})")
                };
                // The migration and its record in one message, which PostgreSQL runs as one
                // transaction without waiting for us in between: a node that stops mid-migration
                // cannot leave it open, holding its locks (on `telemetry` too) until its
                // connection is found dead. The newline ends a last line that is a comment.
                client
                    .batch_execute(&format!("{}\n;\n{record}", m.sql))
                    .await
                    .map_err(|e| match transient(&e) {
                        // Not the file's fault: the start retries it.
                        true => e.into(),
                        false => m.error(Problem::Failed(e)),
                    })?;
                applied.push(m.version);
            }
        }
    }
    Ok(applied)
}

/// An error that says nothing about the migration and passes by itself: the connection lost or
/// ended by the server (a restart, a failover, an administrator), a deadlock or serialization
/// failure. A timeout or a lack of resources would come back at every try: it fails the start,
/// naming the file.
fn transient(e: &tokio_postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else {
        return true;
    };
    let code = db.code().code();
    code.starts_with("08") || code.starts_with("40") || ["57P01", "57P02", "57P03"].contains(&code)
}

/// Whether the ledger has its `checksum` column. An installation from before it gains the
/// column here (its applied migrations their checksums, from the files as they are now); the
/// check comes first because `ALTER TABLE` locks the table out even when there is nothing to add,
/// which would make every start wait for any reader (a backup). A role that may not alter the
/// table (it does not own it) starts without checksums, as before, and says so.
async fn checksum_column(client: &Client) -> Result<bool> {
    let present = client
        .query_opt(
            "SELECT 1 FROM pg_attribute
             WHERE attrelid = 'leasehold_schema_migrations'::regclass
               AND attname = 'checksum' AND NOT attisdropped",
            &[],
        )
        .await?
        .is_some();
    if present {
        return Ok(true);
    }
    match client
        .batch_execute(
            "ALTER TABLE leasehold_schema_migrations ADD COLUMN IF NOT EXISTS checksum text",
        )
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            tracing::warn!(error = %crate::database_words(&e), "cannot add the checksum column to leasehold_schema_migrations (this role does not own it): migrations are applied without checking that applied ones are unchanged; run `leasehold migrate` once as the table's owner");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_is_named_by_its_file_and_checksummed() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "in order, without gaps");
            let path = format!(
                "{}/../../migrations/{}",
                env!("CARGO_MANIFEST_DIR"),
                m.file()
            );
            let on_disk = std::fs::read_to_string(&path).expect("the file exists");
            assert_eq!(on_disk, m.sql, "{path}");
            assert_eq!(m.checksum().len(), 64);
            for statement in top_level_statements(m.sql) {
                let first = statement
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_ascii_uppercase();
                let control = [
                    "BEGIN",
                    "START",
                    "COMMIT",
                    "END",
                    "ABORT",
                    "ROLLBACK",
                    "SAVEPOINT",
                    "RELEASE",
                ]
                .contains(&first.as_str())
                    || statement
                        .to_ascii_uppercase()
                        .starts_with("PREPARE TRANSACTION");
                assert!(!control, "{path}: transaction control: {statement}");
            }
        }
        assert_ne!(MIGRATIONS[0].checksum(), MIGRATIONS[1].checksum());
    }

    /// The statements of `sql` as PostgreSQL splits them: on `;` outside strings, quoted names,
    /// comments and dollar-quoted bodies (a function's `BEGIN ... END;` is not a statement).
    fn top_level_statements(sql: &str) -> Vec<String> {
        let (mut out, mut cur, mut rest) = (Vec::new(), String::new(), sql);
        while let Some(c) = rest.chars().next() {
            let skip = match c {
                '\'' | '"' => rest[1..].find(c).map_or(rest.len(), |i| i + 2),
                '-' if rest.starts_with("--") => rest.find('\n').unwrap_or(rest.len()),
                '/' if rest.starts_with("/*") => rest.find("*/").map_or(rest.len(), |i| i + 2),
                '$' => match rest[1..].find('$') {
                    Some(i) if rest[1..=i].chars().all(|c| c.is_alphanumeric() || c == '_') => {
                        let tag = &rest[..i + 2];
                        rest[tag.len()..]
                            .find(tag)
                            .map_or(rest.len(), |j| tag.len() + j + tag.len())
                    }
                    _ => 1,
                },
                ';' => {
                    out.push(std::mem::take(&mut cur));
                    1
                }
                _ => c.len_utf8(),
            };
            if c != ';' && !rest.starts_with("--") && !rest.starts_with("/*") {
                cur.push_str(&rest[..skip]);
            }
            rest = &rest[skip..];
        }
        out.push(cur);
        out.into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    #[test]
    fn statements_are_split_as_postgresql_splits_them() {
        let sql = "-- a; comment\nCREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$
            BEGIN RETURN 1; END $body$; SELECT 'a;b', \"c;d\" /* e; */ FROM x;BEGIN;\nCOMMIT";
        assert_eq!(
            top_level_statements(sql),
            [
                "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\n            BEGIN RETURN 1; END $body$",
                "SELECT 'a;b', \"c;d\"  FROM x",
                "BEGIN",
                "COMMIT",
            ]
        );
    }
}
