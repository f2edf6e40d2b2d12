//! MAX_PENDING_BYTES against a real broker: what the ingest holds never exceeds it, intake
//! pauses (nothing refused, the connection kept alive) until acks free room, and an oversized
//! payload is cut to MAX_PAYLOAD_BYTES on arrival.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use leasehold_config::MqttEndpoint;
use leasehold_ingest::{Inbound, IngestConfig, MqttIngest};
use leasehold_testkit::publish::publish_all;
use leasehold_testkit::Mosquitto;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const KIB: usize = 1024;

fn config(port: u16, client_id: &str, max_pending_bytes: usize) -> IngestConfig {
    IngestConfig {
        endpoint: MqttEndpoint {
            host: "127.0.0.1".into(),
            port,
            tls: false,
            username: None,
            password: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
        },
        client_id: client_id.into(),
        clean_session: false,
        manual_acks: true,
        keep_alive: Duration::from_secs(2),
        reconnect_max: Duration::from_millis(500),
        max_payload_bytes: 100 * KIB,
        max_pending: 1000,
        max_pending_bytes,
        topics: vec!["big/#".into()],
        expect_session: false,
        sparkplug_host: None,
    }
}

/// Publishes warm-up messages until one arrives (the subscription is active), and acks it.
async fn warm_up(
    port: u16,
    rx: &mut leasehold_ingest::Inbox,
    acker: &leasehold_ingest::Acker,
) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the subscription never became active"
        );
        publish_all(port, vec![("big/warmup".into(), b"w".to_vec())]).await?;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            acker.ack(vec![m]);
            while let Ok(m) = rx.try_recv() {
                acker.ack(vec![m]);
            }
            return Ok(());
        }
    }
}

fn held_bytes(held: &[Inbound]) -> usize {
    held.iter().map(|m| m.payload.len() + m.topic.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_bytes_never_exceed_max_pending_bytes_and_intake_resumes_on_acks() -> Result<()> {
    let mq = Mosquitto::start().await?;
    let limit = 1024 * KIB;
    let (_topics_tx, topics_rx) = watch::channel(Some(Vec::new()));
    let (ingest, acker, mut rx) = MqttIngest::new(
        config(mq.port, "budget-test", limit),
        topics_rx,
        Arc::new(|| true),
    );
    let cancel = CancellationToken::new();
    let run = tokio::spawn(ingest.run(cancel.clone(), CancellationToken::new()));
    warm_up(mq.port, &mut rx, &acker).await?;

    // 40 messages of 90 KiB: 3.6 MiB, more than three times the budget.
    let n = 40usize;
    let msgs: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let mut body = format!("{i:04}").into_bytes();
            body.resize(90 * KIB, b'x');
            (format!("big/{i}"), body)
        })
        .collect();
    publish_all(mq.port, msgs).await?;

    let mut held: Vec<Inbound> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut conns = std::collections::BTreeSet::new();
    let mut pauses = 0;
    let mut most = 0;
    while seen.len() < n {
        // Hold everything until nothing more comes: then intake has paused on the budget.
        match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            Ok(Some(m)) => {
                let seq: usize = std::str::from_utf8(&m.payload[..4])?.parse()?;
                ensure!(seen.insert(seq), "message {seq} delivered twice");
                conns.insert(m.conn);
                held.push(m);
                let bytes = held_bytes(&held);
                most = most.max(bytes);
                ensure!(
                    bytes <= limit,
                    "{bytes} bytes held, above MAX_PENDING_BYTES {limit}"
                );
            }
            Ok(None) => anyhow::bail!("the ingest stopped"),
            Err(_) => {
                ensure!(!held.is_empty(), "intake paused with nothing held");
                pauses += 1;
                if pauses == 1 {
                    // Paused well past 1.5 x the keep-alive: the ingest must keep the connection
                    // alive itself, or the broker drops it and redelivers on a new connection.
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    ensure!(
                        rx.try_recv().is_err(),
                        "a message arrived while the budget was full"
                    );
                }
                acker.ack(std::mem::take(&mut held));
            }
        }
    }
    acker.ack(std::mem::take(&mut held));
    ensure!(
        pauses >= 3,
        "intake paused only {pauses} time(s) for 3.6 MiB against 1 MiB"
    );
    ensure!(
        most > limit - 2 * 90 * KIB,
        "the budget was never nearly used ({most} bytes)"
    );
    ensure!(
        conns.len() == 1,
        "the connection was dropped while intake was paused: messages came on {conns:?}\n{}",
        mq.log()
    );
    cancel.cancel();
    run.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_payload_keeps_only_its_first_max_payload_bytes_and_its_size() -> Result<()> {
    let mq = Mosquitto::start().await?;
    let (_topics_tx, topics_rx) = watch::channel(Some(Vec::new()));
    let (ingest, acker, mut rx) = MqttIngest::new(
        config(mq.port, "truncate-test", 1024 * KIB),
        topics_rx,
        Arc::new(|| true),
    );
    let cancel = CancellationToken::new();
    let run = tokio::spawn(ingest.run(cancel.clone(), CancellationToken::new()));
    warm_up(mq.port, &mut rx, &acker).await?;
    let body: Vec<u8> = (0..300 * KIB).map(|i| (i % 251) as u8).collect();
    publish_all(mq.port, vec![("big/huge".into(), body.clone())]).await?;
    let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .context("not delivered")?
        .context("ingest stopped")?;
    ensure!(
        m.original_size == 300 * KIB,
        "original size {}",
        m.original_size
    );
    ensure!(
        m.payload.len() == 100 * KIB,
        "kept {} bytes",
        m.payload.len()
    );
    ensure!(m.payload[..] == body[..100 * KIB], "not the first bytes");
    acker.ack(vec![m]);
    let small = Inbound::detached("big/x", b"{}");
    ensure!(small.original_size == 2);
    cancel.cancel();
    run.await??;
    Ok(())
}
