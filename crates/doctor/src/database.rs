//! The database's side: commits durable and (or not) synchronously replicated, this role's
//! privileges, the clock offset and round trip against the lease timings.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use leasehold_config::{fmt_dur, Config, LeaseTimings};
use leasehold_store::deployment::{self, DatabaseIdentity, Durability, TableAccess};
use leasehold_store::queries::{self, ClusterIdentity};
use leasehold_store::replication::{self, ReplicationStatus};
use leasehold_store::Client;
use leasehold_telemetry::Check;

/// Clock samples taken; the one with the shortest round trip gives the offset.
const CLOCK_SAMPLES: usize = 5;

/// What the other checks need from the database.
#[derive(Debug, Clone)]
pub struct Facts {
    /// `None` when its row is missing (or the migrations have not run).
    pub cluster: Option<ClusterIdentity>,
    pub database: DatabaseIdentity,
}

/// Runs the database checks into `out`; the database's identity when it answered.
pub async fn checks(cfg: &Config, out: &mut Vec<Check>) -> Option<Facts> {
    let Some(url) = cfg.node.database_url.as_deref() else {
        out.push(Check::problem(
            "database.connect",
            "DATABASE_URL is not set",
            "set DATABASE_URL",
        ));
        return None;
    };
    let c = match leasehold_store::connect(url, "leasehold-doctor").await {
        Ok(c) => c,
        Err(e) => {
            out.push(Check::problem(
                "database.connect",
                format!(
                    "cannot connect to the database: {}",
                    leasehold_config::redact(&with_causes(&e))
                ),
                "check DATABASE_URL and that the database is running",
            ));
            return None;
        }
    };
    let failed = |id: &str, e: leasehold_store::StoreError| {
        Check::problem(
            id,
            format!(
                "could not read it: {}",
                leasehold_config::redact(&e.database_text())
            ),
            "check the role's access to the database",
        )
    };
    out.push(match deployment::durability(&c).await {
        Ok(d) => judge_durability(&d),
        Err(e) => failed("database.durability", e),
    });
    out.push(match replication::status(&c).await {
        Ok(r) => judge_replication(&r),
        Err(e) => failed("database.replication", e),
    });
    out.push(match deployment::table_access(&c).await {
        Ok(t) => judge_privileges(&t),
        Err(e) => failed("database.privileges", e),
    });
    match clock_samples(&c).await {
        Ok(samples) => {
            out.push(judge_clock(offset(&samples)));
            let worst = samples.iter().map(|s| s.rtt).max().unwrap_or_default();
            out.push(judge_round_trip(worst, &cfg.lease));
        }
        Err(e) => out.push(failed("database.clock", e)),
    }
    let database = match deployment::database_identity(&c).await {
        Ok(d) => d,
        Err(e) => {
            out.push(failed("database.identity", e));
            return None;
        }
    };
    let cluster = queries::cluster_identity(&c).await.ok().flatten();
    Some(Facts { cluster, database })
}

/// An error and its causes, one after the other (the driver's own text stops at "error
/// connecting to server").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

pub fn judge_durability(d: &Durability) -> Check {
    const ID: &str = "database.durability";
    let mut bad = Vec::new();
    if d.fsync != "on" {
        bad.push(format!("fsync is {}", d.fsync));
    }
    if d.full_page_writes != "on" {
        bad.push(format!("full_page_writes is {}", d.full_page_writes));
    }
    if d.synchronous_commit == "off" {
        bad.push("synchronous_commit is off".to_string());
    }
    if bad.is_empty() {
        return Check::ok(
            ID,
            format!(
                "commits are durable (fsync on, full_page_writes on, synchronous_commit {})",
                d.synchronous_commit
            ),
        );
    }
    Check::problem(
        ID,
        format!(
            "{}: a database crash can lose commits already acknowledged to the broker",
            bad.join(", ")
        ),
        "set fsync = on, full_page_writes = on and synchronous_commit = on (or remote_apply) for the database or Leasehold's role",
    )
}

pub fn judge_replication(r: &ReplicationStatus) -> Check {
    const ID: &str = "database.replication";
    if r.in_recovery {
        return Check::problem(
            ID,
            "connected to a standby (in recovery): it accepts no writes",
            "point DATABASE_URL at the primary, or name every host with target_session_attrs=read-write",
        );
    }
    let names = |v: &[leasehold_store::replication::Standby]| {
        v.iter()
            .map(|s| s.application_name.clone().unwrap_or_else(|| "?".into()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match r.why_not() {
        None => Check::ok(
            ID,
            format!(
                "commits are synchronously replicated (synchronous_commit {}, in sync: {})",
                r.synchronous_commit,
                names(&r.sync_standbys)
            ),
        ),
        Some(why) => Check::warning(
            ID,
            format!(
                "commits are not synchronously replicated: {why}{}; a failover to a standby can lose the last commits, already acknowledged to the broker (and so gone from it)",
                if r.async_standbys.is_empty() {
                    String::new()
                } else {
                    format!(" (other standbys: {})", names(&r.async_standbys))
                }
            ),
            "on the primary, name a standby in synchronous_standby_names with synchronous_commit on or remote_apply (pg_auto_failover does this by default); a single database without standbys has no failover to lose data in (docs/deployment.md, \"A replicated database\")",
        ),
    }
}

pub fn judge_privileges(tables: &[TableAccess]) -> Check {
    const ID: &str = "database.privileges";
    let absent: Vec<&str> = tables
        .iter()
        .filter(|t| !t.present)
        .map(|t| t.table.as_str())
        .collect();
    if !absent.is_empty() {
        return Check::problem(
            ID,
            format!("tables missing: {}", absent.join(", ")),
            "run `leasehold migrate` (or start a node, which migrates)",
        );
    }
    let lacking: Vec<String> = tables
        .iter()
        .filter(|t| !t.missing.is_empty())
        .map(|t| format!("{} on {}", t.missing.join("/"), t.table))
        .collect();
    if lacking.is_empty() {
        return Check::ok(
            ID,
            format!(
                "the role may do what Leasehold needs on its {} tables",
                tables.len()
            ),
        );
    }
    Check::problem(
        ID,
        format!("the role lacks {}", lacking.join(", ")),
        "GRANT these privileges to Leasehold's role (docs/deployment.md)",
    )
}

/// One clock sample: the database's time, this node's before and after, the round trip.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub before: DateTime<Utc>,
    pub db: DateTime<Utc>,
    pub rtt: Duration,
}

async fn clock_samples(c: &Client) -> leasehold_store::Result<Vec<Sample>> {
    let probe = deployment::ClockProbe::prepare(c).await?;
    let mut out = Vec::with_capacity(CLOCK_SAMPLES);
    for _ in 0..CLOCK_SAMPLES {
        let (before, started) = (Utc::now(), Instant::now());
        let db = probe.read(c).await?;
        out.push(Sample {
            before,
            db,
            rtt: started.elapsed(),
        });
    }
    Ok(out)
}

/// The database's clock minus this node's, from the sample with the shortest round trip (the
/// database read its clock about half-way through it).
pub fn offset(samples: &[Sample]) -> Option<chrono::Duration> {
    let s = samples.iter().min_by_key(|s| s.rtt)?;
    let mid = s.before + chrono::Duration::from_std(s.rtt / 2).ok()?;
    Some(s.db - mid)
}

/// Above this, times compared across hosts (logs, device timestamps, alerts) disagree visibly.
const CLOCK_TOLERANCE_MS: i64 = 1000;

pub fn judge_clock(offset: Option<chrono::Duration>) -> Check {
    const ID: &str = "database.clock";
    let Some(o) = offset else {
        return Check::warning(ID, "no clock sample", "run the check again");
    };
    let ms = o.num_milliseconds();
    let said = format!(
        "this node's clock is {} ms {} the database's",
        ms.abs(),
        if ms > 0 { "behind" } else { "ahead of" }
    );
    if ms.abs() <= CLOCK_TOLERANCE_MS {
        return Check::ok(ID, said);
    }
    Check::warning(
        ID,
        format!("{said}: the lease and receipt times use the database's clock, but logs, device timestamps and alerts compared across hosts disagree"),
        "synchronise both hosts' clocks (chrony or systemd-timesyncd)",
    )
}

pub fn judge_round_trip(rtt: Duration, lease: &LeaseTimings) -> Check {
    const ID: &str = "database.round_trip";
    // A renewal sent at the renew interval must answer before the leader's own deadline.
    let tolerated = lease.demote_after().saturating_sub(lease.renew_interval);
    let said = format!(
        "slowest of {CLOCK_SAMPLES} round trips {:.1} ms; the lease tolerates {} (2/3 x LEASE_TTL {} - LEASE_RENEW_INTERVAL {})",
        rtt.as_secs_f64() * 1e3,
        fmt_dur(tolerated),
        fmt_dur(lease.ttl),
        fmt_dur(lease.renew_interval)
    );
    let fix = "raise LEASE_TTL (and LEASE_RENEW_INTERVAL below 2/3 of it), or bring the database closer (docs/configuration.md, \"Lease timing\")";
    if rtt >= tolerated {
        return Check::problem(
            ID,
            format!("{said}: the leader demotes itself before a renewal answers"),
            fix,
        );
    }
    if rtt * 4 >= tolerated {
        return Check::warning(
            ID,
            format!(
                "{said}: one round trip 4 times slower than this breaks the lease (a failover)"
            ),
            fix,
        );
    }
    Check::ok(ID, said)
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_telemetry::CheckLevel;

    fn d(fsync: &str, commit: &str, fpw: &str) -> Durability {
        Durability {
            fsync: fsync.into(),
            synchronous_commit: commit.into(),
            full_page_writes: fpw.into(),
        }
    }

    #[test]
    fn durability_needs_fsync_full_page_writes_and_synchronous_commit() {
        assert_eq!(judge_durability(&d("on", "on", "on")).level, CheckLevel::Ok);
        assert_eq!(
            judge_durability(&d("on", "remote_apply", "on")).level,
            CheckLevel::Ok
        );
        let c = judge_durability(&d("off", "off", "off"));
        assert_eq!(c.level, CheckLevel::Problem);
        for s in [
            "fsync is off",
            "full_page_writes is off",
            "synchronous_commit is off",
        ] {
            assert!(c.summary.contains(s), "{}", c.summary);
        }
    }

    #[test]
    fn the_offset_comes_from_the_fastest_sample_at_its_midpoint() {
        let t = Utc::now();
        let samples = [
            Sample {
                before: t,
                db: t + chrono::Duration::milliseconds(900),
                rtt: Duration::from_millis(400),
            },
            Sample {
                before: t,
                db: t + chrono::Duration::milliseconds(1505),
                rtt: Duration::from_millis(10),
            },
        ];
        let o = offset(&samples).map(|o| o.num_milliseconds());
        assert_eq!(o, Some(1500));
        assert_eq!(
            judge_clock(Some(chrono::Duration::milliseconds(1500))).level,
            CheckLevel::Warning
        );
        assert_eq!(
            judge_clock(Some(chrono::Duration::milliseconds(-20))).level,
            CheckLevel::Ok
        );
    }

    #[test]
    fn a_round_trip_near_what_the_lease_tolerates_is_flagged() {
        let lease = LeaseTimings {
            ttl: Duration::from_secs(3),
            renew_interval: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
        };
        // Tolerated: 2 s - 1 s = 1 s.
        assert_eq!(
            judge_round_trip(Duration::from_millis(5), &lease).level,
            CheckLevel::Ok
        );
        assert_eq!(
            judge_round_trip(Duration::from_millis(300), &lease).level,
            CheckLevel::Warning
        );
        assert_eq!(
            judge_round_trip(Duration::from_millis(1200), &lease).level,
            CheckLevel::Problem
        );
    }

    #[test]
    fn missing_privileges_and_tables_are_named() {
        let t = |table: &str, present: bool, missing: &[&str]| TableAccess {
            table: table.into(),
            present,
            missing: missing.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            judge_privileges(&[t("telemetry", true, &[])]).level,
            CheckLevel::Ok
        );
        let c = judge_privileges(&[t("telemetry", true, &["INSERT"]), t("alerts", true, &[])]);
        assert_eq!(c.level, CheckLevel::Problem);
        assert!(c.summary.contains("INSERT on telemetry"), "{}", c.summary);
        let c = judge_privileges(&[t("telemetry", false, &[])]);
        assert!(c.summary.contains("missing: telemetry"), "{}", c.summary);
    }
}
