//! G5 in bytes: a backlog of large payloads drains with the leader's memory bounded by
//! MAX_PENDING_BYTES, not by MAX_PENDING messages.

use std::time::Duration;

use crate::helpers::{check, Cluster};
use anyhow::ensure;
use leasehold_testkit::publish::publish_all;
use leasehold_testkit::{eventually, http, memory_of, metric};

/// docs/performance.md, targets: resident memory while draining a backlog of 200 KiB payloads.
const RSS_LIMIT: u64 = 64 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_200_kib_payloads_drains_with_bounded_memory() {
    let mut c = Cluster::start().await.expect("servers");
    // The default MAX_PENDING_BYTES must keep the leader within the bound.
    let max_pending_bytes = leasehold_config::DEFAULT_MAX_PENDING_BYTES as u64;
    let res = async {
        // Establish the session, then queue the backlog while no leader is connected.
        c.spawn("node-a")?;
        c.wait_leader().await?;
        c.node("node-a").signal(libc::SIGTERM);
        c.node_mut("node-a")
            .wait_exit(Duration::from_secs(10))
            .await?;
        let n = 300u64;
        let pad = "x".repeat(200 * 1024);
        let msgs: Vec<(String, Vec<u8>)> = (0..n)
            .map(|i| {
                let body = format!(
                    r#"{{"device_id":"big-{d}","run":"big","seq":{i},"ts":{ts},"pad":"{pad}"}}"#,
                    d = i % 5,
                    ts = 1_700_000_000 + i
                );
                (format!("devices/big-{}/telemetry", i % 5), body.into_bytes())
            })
            .collect();
        publish_all(c.mq.port, msgs).await?;

        c.spawn("node-b")?;
        let pid = c.node("node-b").pid();
        let port = c.node("node-b").http_port();
        let peak = std::cell::Cell::new(0.0f64);
        eventually(Duration::from_secs(120), "the backlog stored", || async {
            if let Ok((_, m)) = http(port, "GET", "/metrics").await {
                if let Some(b) = metric(&m, "leasehold_messages_pending_bytes") {
                    peak.set(peak.get().max(b));
                }
            }
            Ok(c.seq_counts("big").await?.len() as u64 >= n)
        })
        .await?;
        let peak_pending_bytes = peak.get();
        let (peak_rss, _) = memory_of(pid).unwrap_or((u64::MAX, 0));
        c.assert_exactly_once("big", n).await?;
        println!(
            "backlog of {n} x 200 KiB: peak RSS {:.1} MiB, peak pending bytes {:.1} MiB (MAX_PENDING_BYTES {} MiB)",
            peak_rss as f64 / 1048576.0,
            peak_pending_bytes / 1048576.0,
            max_pending_bytes >> 20
        );
        ensure!(
            peak_pending_bytes <= max_pending_bytes as f64,
            "pending bytes reached {peak_pending_bytes}, above MAX_PENDING_BYTES"
        );
        ensure!(
            peak_rss <= RSS_LIMIT,
            "peak RSS {:.1} MiB while draining, above {} MiB",
            peak_rss as f64 / 1048576.0,
            RSS_LIMIT >> 20
        );
        Ok(())
    }
    .await;
    check(&c, res);
}
