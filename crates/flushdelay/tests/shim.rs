//! The shim, loaded into the processes it is for: a real PostgreSQL server and a plain program.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use leasehold_testkit::{Dir, Postgres};

/// target/<profile>/libleasehold_flushdelay.so, built by cargo with this package's tests.
fn shim() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary outside target/<profile>/deps")?;
    let so = profile_dir.join("libleasehold_flushdelay.so");
    ensure!(so.exists(), "{} not built", so.display());
    Ok(so)
}

#[tokio::test]
async fn postgres_commits_wait_for_the_set_flush_latency() -> Result<()> {
    const LATENCY_MS: u64 = 20;
    const COMMITS: u64 = 25;
    let pg = Postgres::start_durable_env(
        Dir::temp("leasehold-flushdelay-")?,
        "track_wal_io_timing = on\nwal_sync_method = fdatasync",
        &[
            ("LD_PRELOAD", shim()?.display().to_string()),
            (
                "LEASEHOLD_FLUSH_LATENCY_US",
                (LATENCY_MS * 1000).to_string(),
            ),
        ],
    )
    .await?;
    let db = pg.client().await?;
    db.batch_execute("CREATE TABLE t (n int PRIMARY KEY); SELECT pg_stat_reset_shared('wal')")
        .await?;
    let start = Instant::now();
    for n in 0..COMMITS as i32 {
        db.execute("INSERT INTO t VALUES ($1)", &[&n]).await?;
    }
    let elapsed = start.elapsed();
    // Each autocommit INSERT waits for its own WAL flush, and no flush returns before the latency.
    ensure!(
        elapsed >= Duration::from_millis(LATENCY_MS * COMMITS),
        "{COMMITS} commits took {elapsed:?}: flushes are not being delayed"
    );
    // A backend hands its WAL statistics over at most once a second unless asked to.
    db.batch_execute("SELECT pg_stat_force_next_flush()")
        .await?;
    let row = db
        .query_one("SELECT wal_sync, wal_sync_time FROM pg_stat_wal", &[])
        .await?;
    let (syncs, sync_ms): (i64, f64) = (row.get(0), row.get(1));
    ensure!(
        syncs >= COMMITS as i64,
        "only {syncs} WAL flushes for {COMMITS} commits"
    );
    ensure!(
        sync_ms / syncs as f64 >= LATENCY_MS as f64,
        "PostgreSQL timed its WAL flushes at {:.2} ms on average, below {LATENCY_MS} ms",
        sync_ms / syncs as f64
    );
    Ok(())
}

#[test]
fn a_failed_flush_keeps_its_error() -> Result<()> {
    // fsync of a descriptor that is not open must still fail with EBADF through the shim,
    // after the delay (the sleep must not clobber errno).
    let start = Instant::now();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, errno\ntry:\n    os.fsync(987)\nexcept OSError as e:\n    print(errno.errorcode[e.errno])",
        ])
        .env("LD_PRELOAD", shim()?)
        .env("LEASEHOLD_FLUSH_LATENCY_US", "300000")
        .output()
        .context("python3")?;
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.trim() == "EBADF",
        "fsync(987) through the shim gave {stdout:?} / {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        elapsed >= Duration::from_millis(300),
        "the failed fsync returned after {elapsed:?}: the shim was not in the call"
    );
    Ok(())
}
