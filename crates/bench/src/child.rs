//! The two baselines, each run as a child process of the orchestrator so that its memory is its
//! own: the broker ceiling (a subscriber that only acknowledges) and the per-message upsert.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use leasehold_testkit::memory_of;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use serde::{Deserialize, Serialize};

use crate::args::Child;

fn own_peak_rss() -> u64 {
    memory_of(std::process::id()).map(|m| m.0).unwrap_or(0)
}

/// What a baseline child process reports on stdout.
#[derive(Debug, Serialize, Deserialize, Default, Clone)]
pub struct ChildReport {
    pub messages: u64,
    pub seconds: f64,
    pub rate: f64,
    pub peak_rss: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
}

/// Child: drain `n` messages from session `client_id`, acknowledging each on receipt.
pub async fn ceiling(port: u16, client_id: &str, n: u64) -> Result<ChildReport> {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = AsyncClient::new(opts, 200_000);
    let mut got = 0u64;
    let mut first = None;
    let mut last = Instant::now();
    while got < n {
        match tokio::time::timeout(Duration::from_secs(30), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
                got += 1;
                c.try_ack(&p)?;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("ceiling subscriber: {e}"),
            Err(_) => bail!("ceiling subscriber: stalled at {got} of {n}"),
        }
    }
    let secs = first
        .map(|f| last.duration_since(f).as_secs_f64())
        .unwrap_or(0.0);
    Ok(ChildReport {
        messages: got,
        seconds: secs,
        rate: got as f64 / secs.max(1e-9),
        peak_rss: own_peak_rss(),
        ..Default::default()
    })
}

/// Child: the system Leasehold replaces. One upsert per message, in its own transaction,
/// acknowledged after its commit. Stops after `n` messages or `max_secs`.
pub async fn upsert(
    port: u16,
    pg_url: &str,
    client_id: &str,
    n: u64,
    max_secs: u64,
) -> Result<ChildReport> {
    let (db, conn) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let stmt = db
        .prepare(
            "INSERT INTO telemetry (device_id, ts, payload, topic, received_at, written_by, lease_epoch)
             VALUES ($1, $2, $3::text::jsonb, $4, $5, 'upsert', 0) ON CONFLICT DO NOTHING",
        )
        .await?;
    let decoder = leasehold_decode::Decoder::new("devices/{device_id}/#", 256 * 1024);
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    // Mosquitto 2.0.11 sends a queued session's whole backlog at once, so a PINGRESP can wait
    // behind the whole backlog: at ~1k upserts/s that is longer than a usual keep-alive.
    opts.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(max_secs.max(60) + 60));
    let (c, mut el) = AsyncClient::new(opts, 200_000);
    let mut got = 0u64;
    let mut first = None;
    let mut last = Instant::now();
    let mut lat = Vec::new();
    let mut started = None;
    while got < n && started.is_none_or(|s: Instant| s.elapsed() < Duration::from_secs(max_secs)) {
        match tokio::time::timeout(Duration::from_secs(30), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let received = Instant::now();
                let received_at = chrono::Utc::now();
                first.get_or_insert(received);
                started.get_or_insert(received);
                let r = decoder
                    .decode(&p.topic, &p.payload, received_at)
                    .map_err(|e| anyhow::anyhow!("bench message did not decode: {e}"))?;
                db.execute(
                    &stmt,
                    &[&r.device_id, &r.ts, &r.payload, &p.topic, &received_at],
                )
                .await?;
                lat.push(received.elapsed().as_secs_f64() * 1e3);
                c.try_ack(&p)?;
                got += 1;
                last = Instant::now();
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("upsert subscriber: {e}"),
            Err(_) => break,
        }
    }
    let secs = first
        .map(|f| last.duration_since(f).as_secs_f64())
        .unwrap_or(0.0);
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(ChildReport {
        messages: got,
        seconds: secs,
        rate: got as f64 / secs.max(1e-9),
        peak_rss: own_peak_rss(),
        latency_p50_ms: percentile(&lat, 0.5),
        latency_p99_ms: percentile(&lat, 0.99),
    })
}

/// Runs `child` as a child process of this binary and reads its report.
pub async fn spawn(child: Child) -> Result<ChildReport> {
    let args = child.to_args();
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new(exe)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("child {args:?} failed ({}): {}", out.status, stderr.trim());
    }
    eprint!("{stderr}");
    serde_json::from_slice(&out.stdout).context("child report")
}

/// Runs `child` in this process and prints its report for the orchestrator.
pub async fn run(child: Child) -> Result<()> {
    let report = match child {
        Child::Ceiling { port, client_id, n } => ceiling(port, &client_id, n).await?,
        Child::Upsert {
            port,
            pg_url,
            client_id,
            n,
            max_secs,
        } => upsert(port, &pg_url, &client_id, n, max_secs).await?,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
