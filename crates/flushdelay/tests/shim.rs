//! The shim, loaded into the processes it is for: a real PostgreSQL server and a plain program.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use leasehold_testkit::{Dir, Postgres};

/// target/<profile>/libleasehold_flushdelay.so. Cargo does not build a cdylib-only package's
/// library for its integration tests, so this builds it (a no-op when it is fresh).
fn shim() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary outside target/<profile>/deps")?;
    let target_dir = profile_dir.parent().context("no target directory")?;
    let mut build = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "leasehold-flushdelay",
            "--target-dir",
        ])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let out = build.output().context("running cargo build")?;
    ensure!(
        out.status.success(),
        "cargo build -p leasehold-flushdelay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    // Each autocommit INSERT waits for a WAL flush, and no flush returns before the latency. Half
    // the sum leaves room for a flush the WAL writer did ahead of a backend; without the shim
    // the 25 commits take about 10 ms.
    ensure!(
        elapsed >= Duration::from_millis(LATENCY_MS * COMMITS / 2),
        "{COMMITS} commits took {elapsed:?}: flushes are not being delayed"
    );
    // A backend hands its WAL statistics over at most once a second unless asked to.
    db.batch_execute("SELECT pg_stat_force_next_flush()")
        .await?;
    let row = db
        .query_one("SELECT wal_sync, wal_sync_time FROM pg_stat_wal", &[])
        .await?;
    let (syncs, sync_ms): (i64, f64) = (row.get(0), row.get(1));
    // The WAL writer may flush a commit before its backend does, and reports its statistics on
    // its own schedule, so the count is not exact; every flush, whoever did it, is timed.
    ensure!(
        syncs > 0,
        "PostgreSQL timed no WAL flush for {COMMITS} commits"
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
