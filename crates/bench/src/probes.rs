//! What the benchmark reads back from PostgreSQL (rows, commit timestamps, percentiles), and the
//! disk's own commit cost from `pg_test_fsync`.

use anyhow::{bail, Result};
use tokio_postgres::Client;

pub async fn count(db: &Client, run: &str) -> Result<i64> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM telemetry WHERE payload->>'run' = $1",
            &[&run],
        )
        .await?
        .get(0))
}

/// (rows, seconds from the first receipt to the last commit) of `run`.
pub async fn receive_to_last_commit(db: &Client, run: &str) -> Result<(i64, f64)> {
    let r = db
        .query_one(
            "SELECT count(*), extract(epoch from max(pg_xact_commit_timestamp(xmin)) - min(received_at))::float8
             FROM telemetry WHERE payload->>'run' = $1",
            &[&run],
        )
        .await?;
    Ok((r.get(0), r.get::<_, Option<f64>>(1).unwrap_or(0.0)))
}

/// Exact receive-to-commit percentiles of `run`'s rows, in ms.
pub async fn latency(db: &Client, run: &str) -> Result<(f64, f64)> {
    let r = db
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.99) WITHIN GROUP (ORDER BY d)
             FROM (SELECT extract(epoch from pg_xact_commit_timestamp(xmin) - received_at) * 1000 AS d
                   FROM telemetry WHERE payload->>'run' = $1) s",
            &[&run],
        )
        .await?;
    Ok((
        r.get::<_, Option<f64>>(0).unwrap_or(f64::NAN),
        r.get::<_, Option<f64>>(1).unwrap_or(f64::NAN),
    ))
}

/// Every one of the `n` rows the upsert baseline reported for `run` is its own insert; a row
/// someone else wrote first would have made its commit a no-op without a flush.
pub async fn check_upsert_wrote(db: &Client, run: &str, n: u64) -> Result<()> {
    let own: i64 = db
        .query_one(
            "SELECT count(*) FROM telemetry WHERE payload->>'run' = $1 AND written_by = 'upsert'",
            &[&run],
        )
        .await?
        .get(0);
    if own != n as i64 {
        bail!("the upsert baseline reported {n} messages of {run:?} but wrote {own} rows itself");
    }
    Ok(())
}

/// fdatasync operations per second (pg_test_fsync), the cost of a commit, with `env` (the shim).
pub fn fsync_per_sec(env: &[(&str, String)]) -> Option<f64> {
    let bin = leasehold_testkit::pg_bin().ok()?.join("pg_test_fsync");
    let file = std::env::temp_dir().join(format!("leasehold-bench-fsync-{}", std::process::id()));
    let out = std::process::Command::new(bin)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["-s", "1", "-f"])
        .arg(&file)
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&file);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.trim_start().starts_with("fdatasync"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// CPU seconds (user + system) used by `pid`; with `reaped`, also by its children it waited for.
pub fn cpu_seconds(pid: u32, reaped: bool) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: state is [0], utime [11], stime [12],
    // cutime [13], cstime [14] (proc(5)).
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    let mut ticks = tick(11)? + tick(12)?;
    if reaped {
        ticks += tick(13)? + tick(14)?;
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks / hz)
}

/// CPU seconds used by a PostgreSQL server so far: the postmaster with every backend it reaped,
/// plus the backends still running.
pub fn postgres_cpu_seconds(data_dir: &std::path::Path) -> Option<f64> {
    let pm: u32 = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()?;
    let mut total = cpu_seconds(pm, true)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pm) {
            total += cpu_seconds(pid, false).unwrap_or(0.0);
        }
    }
    Some(total)
}
